"""HPCM (hierarchical progressive context modelling) learned image codec whose context cells are RWKV blocks
(SpatialMix with OmniShift and Bi-WKV4, ChannelMix), with a real rANS bitstream.

Pure functions over parameter dicts. Imports only torch, numpy, einops and the standard library; cupy is imported
lazily, inside the CUDA path of Bi-WKV4, to load wkv_kernel.cu.
"""

import contextlib
import functools
import hashlib
import math
import os
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


# ================================================================================================================
# configuration

@dataclass
class HPCMConfig:
    """Widths and phase of the codec. M: latent channels (y), N: hyper-latent channels (z), widths: g_a/g_s stages.
    phase 0: the HPCM baseline cells; 1: RWKVContextCell at s3; 2: at s1, s2, s3; 3: also RWKVFusionNet context_net."""
    M: int = 320
    N: int = 256
    phase: int = 3
    widths: tuple = (96, 192, 384)
    heads: int = 32  # of the baseline CrossAttentionCell
    windows: tuple = (4, 8, 8)  # of the baseline cell at s1, s2, s3
    rwkv_hidden_rates: tuple = (2, 3, 4)  # of RWKVContextCell at s1, s2, s3
    fusion_blocks: int = 1
    fusion_hidden_rate: int = 4
    checkpoint: bool = False  # gradient checkpointing inside the RWKV fusion nets

    def __post_init__(self):
        """Refuse a configuration the model cannot build, naming the field and what it expects."""
        self.widths, self.windows = tuple(self.widths), tuple(self.windows)
        self.rwkv_hidden_rates = tuple(self.rwkv_hidden_rates)
        checks = [(self.phase in (0, 1, 2, 3), 'phase', '0, 1, 2 or 3'),
                  (self.M > 0 and self.M % 8 == 0, 'M', 'a positive multiple of 8 (8 channel groups)'),
                  (self.N > 0, 'N', '> 0'),
                  (len(self.widths) == 3 and min(self.widths) > 0, 'widths', 'three positive g_a stage widths'),
                  (self.heads > 0 and 2 * self.M % self.heads == 0, 'heads', f'a divisor of 2M = {2 * self.M}'),
                  (len(self.windows) == 3 and min(self.windows) > 0, 'windows', 'three positive window sides'),
                  (len(self.rwkv_hidden_rates) == 3 and min(self.rwkv_hidden_rates) > 0, 'rwkv_hidden_rates',
                   'three positive rates'),
                  (self.fusion_blocks >= 0, 'fusion_blocks', '>= 0'),
                  (self.fusion_hidden_rate > 0, 'fusion_hidden_rate', '> 0')]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f'HPCMConfig.{name}: expected {expected}, got {getattr(self, name)!r}')

    def rwkv_at(self, scale):
        return self.phase >= 2 or (self.phase == 1 and scale == 2)

    @classmethod
    def small(cls, phase=3, **overrides):
        """A width that trains on a CPU in minutes; the structure (11 steps, groups, cells) is the full one."""
        return cls(**{'M': 32, 'N': 32, 'phase': phase, 'widths': (16, 24, 32), 'heads': 8, **overrides})


# ================================================================================================================
# small helpers: linear, conv2d, layer norm

def init_linear(gen, d_in, d_out, bias=True):
    """nn.Linear's default init: uniform in ±1/sqrt(d_in)."""
    bound = 1.0 / math.sqrt(d_in)
    p = {'weight': (torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound}  # (d_out, d_in)
    if bias:
        p['bias'] = (torch.rand(d_out, generator=gen) * 2 - 1) * bound
    return p


def linear(p, x):
    return F.linear(x, p['weight'], p.get('bias'))


def init_conv2d(gen, c_in, c_out, kernel_size, groups=1, bias=True):
    """nn.Conv2d's default init: uniform in ±1/sqrt(fan_in)."""
    if c_in % groups or c_out % groups:
        raise ValueError(f'groups={groups} must divide c_in={c_in} and c_out={c_out}')
    bound = 1.0 / math.sqrt(c_in // groups * kernel_size * kernel_size)
    shape = (c_out, c_in // groups, kernel_size, kernel_size)
    p = {'weight': (torch.rand(shape, generator=gen) * 2 - 1) * bound}
    if bias:
        p['bias'] = (torch.rand(c_out, generator=gen) * 2 - 1) * bound
    return p


def conv2d(p, x, stride=1, padding=None):
    """x (B, C_in, H, W); groups follow from the weight's shape (C_in / weight.shape[1]); padding defaults to k//2."""
    c_in, per_group, kh, _ = x.shape[1], p['weight'].shape[1], *p['weight'].shape[2:]
    if x.dim() != 4 or c_in % per_group:
        raise ValueError(f'conv2d: x must be (B, C, H, W) with C a multiple of {per_group}, got {tuple(x.shape)}')
    padding = kh // 2 if padding is None else padding
    return F.conv2d(x, p['weight'], p.get('bias'), stride=stride, padding=padding, groups=c_in // per_group)


def init_layer_norm(gen, dim):
    """gen is unused (the init is deterministic) but kept so every init has the same signature."""
    return {'weight': torch.ones(dim), 'bias': torch.zeros(dim)}


def layer_norm(p, x, eps=1e-5):
    """Normalises the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), p['weight'], p['bias'], eps)


def layer_norm_channels(p, x, eps=1e-5):
    """x (B, C, H, W), normalised over C at every pixel."""
    return layer_norm(p, x.permute(0, 2, 3, 1), eps).permute(0, 3, 1, 2)


# ================================================================================================================
# Bi-WKV4: dense reference, torch scan, CUDA kernels (naive, split rows, chunked) via cupy
#
# Pinned against OpenGVLab/Vision-RWKV (classification/mmcls_custom/models/backbones/vrwkv.py, the call
# `RUN_CUDA(B, T, C, self.spatial_decay / T, self.spatial_first / T, k, v)`, and cuda/wkv_cuda.cu) and
# sjtu-medialab/RwkvCompress (models/lalic.py: `RUN_BiWKV4(B, T, C, self.decay / T, self.boost / T, k, v)`): the
# learned decay w and bonus u are divided by the sequence length T at the call, then used as they are (no exp),
# per channel:
#     y_t = (Σ_{i≠t} e^{-(|t-i|-1)·w/T + k_i} v_i + e^{u/T + k_t} v_t)
#           / (Σ_{i≠t} e^{-(|t-i|-1)·w/T + k_i} + e^{u/T + k_t})
# Neighbours (|t-i| = 1) are not decayed; w < 0 (RwkvCompress inits w ~ N(0, 1)) makes far tokens weigh more.
# Vision-RWKV's kernel also adds 1e-6 to the denominator; we leave it out (the denominator is >= e^{u/T + k_t} > 0).
# All five paths take the raw w, u (C,) and k, v (B, T, C) and return y (B, T, C) in k's dtype.

def _check_wkv(w, u, k, v):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f'bi_wkv: k and v must both be (B, T, C), got k {tuple(k.shape)} and v {tuple(v.shape)}')
    C = k.shape[2]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f'bi_wkv: w and u must be ({C},), got w {tuple(w.shape)} and u {tuple(u.shape)}')
    if k.shape[1] == 0:
        raise ValueError('bi_wkv: the sequence is empty (T = 0)')


def bi_wkv_dense(w, u, k, v):
    """O(T²) reference straight from the formula: y_t is the softmax over i of (s_ti + k_i) applied to v."""
    _check_wkv(w, u, k, v)
    B, T, C = k.shape
    pos = torch.arange(T, device=k.device)
    dist = (pos[:, None] - pos[None, :]).abs().to(k.dtype)  # (T, T)
    s = -(dist - 1)[..., None] * (w / T)  # (T, T, C)
    s = torch.where((dist == 0)[..., None], (u / T).expand(T, T, C), s)
    weights = torch.softmax(s[None] + k[:, None], dim=2)  # (B, T, T, C): [b, t, i, c]
    return torch.einsum('btic,bic->btc', weights, v)


def _decayed_scan(w, keys, values, reverse, n0=0.0):
    """Exclusive decayed sums, one token at a time: for every t, (r_t, n_t, s_t) with
    e^{r_t - n_t·w} s_t = Σ_{i<t} e^{-(t-1-i)·w + keys_i - n0_i·w} values_i (i > t and distance i-t-1 when reverse).
    keys (B, T, C), values (n, B, T, C), n0 (T, C) or 0 -> r, n (B, T, C), s (n, B, T, C). The state keeps the key r
    of its largest term and that term's distance n (its decay in tokens, n0 included), not a decayed maximum, so an
    exponent r - n·w is rounded once however long T is; each step rescales by e^{-|diff|} <= 1."""
    B, T, C = keys.shape
    r = torch.full((B, C), -math.inf, dtype=keys.dtype, device=keys.device)
    n = torch.zeros_like(r)
    n0 = torch.as_tensor(n0, dtype=keys.dtype, device=keys.device).expand(T, C)
    s = values.new_zeros(values.shape[0], B, C)
    rs, ns, ss = [None] * T, [None] * T, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        rs[t], ns[t], ss[t] = r, n, s
        n = n + 1
        diff = (r - keys[:, t]) - (n - n0[t]) * w  # old largest term (decayed once more) minus the new one
        keep, e = diff >= 0, torch.exp(-diff.abs())
        s = torch.where(keep, s + values[:, :, t] * e, s * e + values[:, :, t])
        r, n = torch.where(keep, r, keys[:, t]), torch.where(keep, n, n0[t])
    return torch.stack(rs, 1), torch.stack(ns, 1), torch.stack(ss, 2)


def _far_reference(w, T):
    """nstar (T, C): with w < 0 far tokens weigh more and log Z_t reaches about
    (max(t, T-1-t) - 1)·|w|, whose float32 rounding (~|w|·1e-7) would cost the gradients their precision. Where the
    decay lets far tokens outweigh near ones by more than 2^32, log Z_t is kept relative to nstar_t tokens of decay
    (max(t, T-1-t) - 1), and the backward takes token t's key -log Z_t with -nstar_t tokens of decay counted: every
    exponent stays a difference of keys and an integer times w. Elsewhere nstar = 0."""
    t = torch.arange(T, dtype=w.dtype, device=w.device)
    far = w * (T - 1) < -32 * math.log(2)
    return torch.where(far, (torch.maximum(t, T - 1 - t) - 1).clamp_min(0)[:, None], torch.zeros_like(w))


def _wkv_scan_forward(w, u, k, v, ref):
    """w, u already divided by T, ref = _far_reference -> y, log Z + ref·w and the forward / reverse states (their
    exponents relative to ref) the backward needs."""
    vals = torch.stack([v, torch.ones_like(v)])
    r_a, n_a, (a, b) = _decayed_scan(w, k, vals, reverse=False)
    r_c, n_c, (c, d) = _decayed_scan(w, k, vals, reverse=True)
    m_a, m_c = r_a - (n_a - ref) * w, r_c - (n_c - ref) * w
    bonus = u + k + ref * w
    top = torch.maximum(torch.maximum(m_a, m_c), bonus)
    e_a, e_c, e_u = torch.exp(m_a - top), torch.exp(m_c - top), torch.exp(bonus - top)
    den = b * e_a + d * e_c + e_u
    y = (a * e_a + c * e_c + v * e_u) / den
    # v - y without cancelling v against y: the bonus token drops out of (v Z - N)
    v_minus_y = (v * (b * e_a + d * e_c) - (a * e_a + c * e_c)) / den
    return y, v_minus_y, top + torch.log(den), (m_a, a, b, m_c, c, d)


class _BiWKVScan(torch.autograd.Function):
    """O(T) forward and backward scans. The gradients, with Z_t the denominator, d_ti = |t-i| - 1 and
    q_t = gy_t / Z_t = gy_t e^{kappa_t}, kappa_t = -log Z_t (wkv_kernel.cu computes the same ones):
        gv_i = e^{k_i} (G_i + e^u q_i),   gk_i = e^{k_i} (v_i G_i - H_i + e^u q_i (v_i - y_i)),
        gu   = sum_t e^{u+k_t} q_t (v_t - y_t),   gw = -sum_i e^{k_i} (v_i G'_i - H'_i),
    with G_i = sum_{t!=i} e^{-d_ti w} q_t, H_i the same over q_t y_t, and G', H' the same sums weighted by d_ti:
    one more Bi-WKV scan, over keys kappa_t and values gy_t, gy_t y_t. Nothing overflows: e^{k_i - d_ti w} <= Z_t,
    so e^{k_i} times a gradient state is at most O(gy). v_i - y_i is formed without cancelling v against y.
    Here gw comes from the forward's states instead of distance-weighted sums (the kernels carry G', H' in their
    states): gw = -e^{-w} sum_j (A_j G>_j - B_j H>_j + C_j G<_j - D_j H<_j), with A, B (C, D) the forward (reverse)
    numerator / denominator states and G, H the gradient scan's states over gy_t, gy_t y_t (G = G< + G>)."""

    @staticmethod
    def forward(ctx, w, u, k, v):
        k = k - k[:, :1]  # y and its gradients do not change; exponents stay small when k has a large offset
        ref = _far_reference(w, k.shape[1])
        y, v_minus_y, log_z, states = _wkv_scan_forward(w, u, k, v, ref)
        ctx.save_for_backward(w, u, k, v, y, v_minus_y, log_z, ref, *states)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        w, u, k, v, y, v_minus_y, log_z, ref, m_a, a, b, m_c, c, d = ctx.saved_tensors
        kappa = -log_z  # q_t = gy_t / Z_t = gy_t e^{kappa_t + ref_t·w}: keys kappa with -ref tokens of decay counted
        vals = torch.stack([gy, gy * y])
        r_l, n_l, (g_l, h_l) = _decayed_scan(w, kappa, vals, reverse=False, n0=-ref)
        r_r, n_r, (g_r, h_r) = _decayed_scan(w, kappa, vals, reverse=True, n0=-ref)
        e_l, e_r = torch.exp(k + r_l - n_l * w), torch.exp(k + r_r - n_r * w)
        m_l, m_r = r_l - (n_l + ref) * w, r_r - (n_r + ref) * w  # relative to -ref, to meet m_a, m_c (relative to ref)
        bonus_q = torch.exp(u + k + kappa + ref * w) * gy
        gv = e_l * g_l + e_r * g_r + bonus_q
        gk = e_l * (v * g_l - h_l) + e_r * (v * g_r - h_r) + bonus_q * v_minus_y
        gu = (bonus_q * v_minus_y).sum((0, 1))
        gw = -(torch.exp(m_a + m_r - w) * (a * g_r - b * h_r) + torch.exp(m_c + m_l - w) * (c * g_l - d * h_l))
        return gw.sum((0, 1)), gu, gk, gv


def bi_wkv_scan(w, u, k, v):
    """O(T) time, O(B·T·C) memory: one forward and one reverse scan with running maxima, exact O(T) backward."""
    _check_wkv(w, u, k, v)
    T = k.shape[1]
    return _BiWKVScan.apply(w.to(k.dtype) / T, u.to(k.dtype) / T, k, v)


# The CUDA kernels (wkv_kernel.cu, compiled by cupy on first use). They take the raw w, u and divide by T themselves,
# and launch on torch's current stream without synchronising. The naive kernels (one thread per (b, c) walks the
# row) and the split-row ones (the row cut into 16 to 64 pieces, one thread a piece, one block a row tile) take one
# launch a pass; the chunked ones three (chunk summaries, a carry pass over chunks, the chunks again from their
# incoming states), or one where the row is a single chunk.
_WKV_MODULES = {}  # (dtype name, device index, pass, LT, NS) -> compiled kernels
# the chunked kernels' tokens per thread per pass (the backward holds seven values a token where the forward holds
# five: with 8 tokens its apply kernel spills 220 bytes a thread, with 6, 56), threads along T per block, channels per
# block
_WKV_LT, _WKV_NS, _WKV_CW = {'fwd': 8, 'bwd': 6}, 16, 32
# the split kernels' pieces a row P, each compiled with W = _WKV_SPLIT_THREADS / P channels a block
_WKV_SPLIT_PIECES, _WKV_SPLIT_THREADS = (16, 32, 64), 512
_WKV_NAIVE_THREADS = 32  # threads per block of the naive kernels: one warp, so short rows spread over many SMs


def _wkv_kernels(dtype, device_index, pass_):
    """pass_ 'fwd' or 'bwd': its naive kernel ('naive'), split-row kernels ('split16', 'split32', 'split64': P pieces a
    row) and its chunk summaries ('sum'), carry pass ('carry') and apply ('apply') kernels, compiled with that pass's
    tokens per thread."""
    import cupy
    name = {torch.float32: 'float', torch.float64: 'double'}[dtype]
    key = (name, device_index, pass_, _WKV_LT[pass_], _WKV_NS)
    if key not in _WKV_MODULES:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'wkv_kernel.cu')) as f:
            source = f.read()
        chunk = {'fwd': 'wkv_forward', 'bwd': 'wkv_backward'}[pass_]
        kernels = {'naive': f'{chunk}_naive<{name}>',
                   **{f'split{P}': f'{chunk}_split<{name}, {_WKV_SPLIT_THREADS // P}, {P}>' for P in _WKV_SPLIT_PIECES},
                   'sum': f'{chunk}<{name}, false>', 'apply': f'{chunk}<{name}, true>',
                   'carry': f'wkv_carry<{name}, {str(pass_ == "bwd").lower()}>'}
        options = ('-std=c++17', f'-DLT={_WKV_LT[pass_]}', f'-DNS={_WKV_NS}', f'-DCW={_WKV_CW}')
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=source, options=options, name_expressions=list(kernels.values()))
            # .kernel: the compiled function; _launch hands its .ptr to the driver
            _WKV_MODULES[key] = {k: module.get_function(v).kernel for k, v in kernels.items()}
    return _WKV_MODULES[key]


_WKV_SLOTS = np.arange(32, dtype=np.uint64) * 8  # byte offsets of the kernel arguments' 8-byte slots


def _launch(device, *launches):
    """Runs (kernel, grid, block, args) launches in order on torch's current stream of device, without
    synchronising. args: tensors (passed as their device pointers, None as a null one) and ints (the kernels' int
    parameters). They go to cuLaunchKernel as one buffer of 8-byte slots with a pointer to each slot (an int parameter
    reads the low 4 bytes of its slot): cupy's own launcher converts its arguments one by one, which took more host
    time than the kernel on a short row. Setting the device also makes its context current in this thread (autograd
    runs the backward in a thread of its own)."""
    import cupy
    stream = torch.cuda.current_stream(device).cuda_stream
    previous = cupy.cuda.runtime.getDevice()
    cupy.cuda.runtime.setDevice(device.index)
    try:
        for kernel, grid, block, args in launches:
            slots = np.array([a if isinstance(a, int) else 0 if a is None else a.data_ptr() for a in args], np.uint64)
            params = _WKV_SLOTS[:len(args)] + np.uint64(slots.ctypes.data)
            cupy.cuda.driver.launchKernel(kernel.ptr, *(*grid, 1, 1)[:3], *(*block, 1, 1)[:3], 0, stream,
                                          params.ctypes.data, 0)
    finally:
        if previous != device.index:
            cupy.cuda.runtime.setDevice(previous)


def _wkv_grid(B, T, C, pass_):
    """Chunks along T; the chunk kernels' grid (chunks x channel tiles, batch) and block (channels, sub-chunks); the
    carry kernel's grid, one thread per (direction, b, c) in blocks of 256."""
    nchunk = -(-T // (_WKV_LT[pass_] * _WKV_NS))
    return nchunk, (nchunk * -(-C // _WKV_CW), B), (_WKV_CW, _WKV_NS), (-(-2 * B * C // 256),)


def _wkv_split_pieces(T):
    """The split kernels' pieces a row for rows of T tokens: pieces of about 8 tokens, P a power of two in 16..64.
    Chosen from a sweep on an H200 (fwd+bwd, CUDA events around back-to-back launches; NOTES.md) for P = 32 / 64:
    (1, 640, 1024) 63 / 50 us, (8, 256, 1024) 96 / 96 us; for P = 16 / 32 / 64 at (8, 640, 256): 69 / 55 / 74 us.
    README's table gives torch.profiler's kernel times of the P chosen here."""
    P = 1 << (max(T // 8, 1).bit_length() - 1)
    return min(max(P, _WKV_SPLIT_PIECES[0]), _WKV_SPLIT_PIECES[-1])


def _wkv_pass(pass_, kind, k, w, states, args):
    """One pass over k's (B, T, C), pass_ 'fwd' or 'bwd'. kind 'naive': one launch, a thread per (b, c); 'split': one
    launch, a block of (channels, pieces) per row tile; 'chunked': the chunks' summaries, the carry pass over them,
    then the chunks again from their incoming states (states None: the row is one chunk, whose incoming states are
    empty, and only that last launch runs). args: the kernels' arguments."""
    B, T, C = k.shape
    kern = _wkv_kernels(k.dtype, k.device.index, pass_)
    if kind == 'naive':
        _launch(k.device, (kern['naive'], (-(-B * C // _WKV_NAIVE_THREADS),), (_WKV_NAIVE_THREADS,), args))
        return
    if kind == 'split':
        P = _wkv_split_pieces(T)
        W = _WKV_SPLIT_THREADS // P  # channels a block
        _launch(k.device, (kern[f'split{P}'], (-(-C // W) * B,), (W, P), args))
        return
    _, grid, threads, carry_grid = _wkv_grid(B, T, C, pass_)
    apply = (kern['apply'], grid, threads, args)
    if states is None:
        _launch(k.device, apply)
    else:
        _launch(k.device, (kern['sum'], grid, threads, args),
                (kern['carry'], carry_grid, (256,), (B, T, C, w, states)), apply)


class _BiWKVCuda(torch.autograd.Function):
    """wkv_kernel.cu, kind 'naive', 'split' or 'chunked'. The forward also writes log Z (one more (B, T, C) tensor
    kept for backward; only the chunked forward leaves it out when no gradient is wanted), so the backward is one
    Bi-WKV walk of the gradients and never recomputes the forward. The backward kernels write partial sums of gw, gu,
    over b (and chunks) for the caller to add."""

    @staticmethod
    def forward(ctx, w, u, k, v, kind):
        B, T, C = k.shape
        chunked = kind == 'chunked'
        y = torch.empty_like(k)
        log_z = torch.empty_like(k) if not chunked or any(ctx.needs_input_grad) else None  # (codec inference)
        nchunk = _wkv_grid(B, T, C, 'fwd')[0] if chunked else 1
        states = k.new_empty(B, nchunk, 2, 4, C) if nchunk > 1 else None  # per chunk, direction: r, n, a, b
        head = (B, T, C, w, u, k, v) + ((states,) if chunked else ())
        _wkv_pass('fwd', kind, k, w, states, (*head, y, log_z))
        ctx.kind = kind
        ctx.save_for_backward(w, u, k, v, y, log_z)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        w, u, k, v, y, log_z = ctx.saved_tensors
        B, T, C = k.shape
        gy = gy.contiguous()
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        chunked = ctx.kind == 'chunked'
        nchunk = _wkv_grid(B, T, C, 'bwd')[0] if chunked else 1
        parts = k.new_empty(2, B * nchunk, C)  # partial sums of gw and gu, per (b, chunk)
        states = k.new_empty(B, nchunk, 2, 6, C) if nchunk > 1 else None  # r, n, a, b, a2, b2
        head = (B, T, C, w, u, k, v, y, log_z, gy) + ((states,) if chunked else ())
        _wkv_pass('bwd', ctx.kind, k, w, states, (*head, gk, gv, *parts))
        gw, gu = parts.sum(1) if B * nchunk > 1 else parts[:, 0]  # one reduction for both
        return gw, gu, gk, gv, None


@functools.lru_cache(maxsize=None)
def _cupy_available():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _bi_wkv_kernel(w, u, k, v, kind):
    who = {'naive': 'bi_wkv_naive', 'split': 'bi_wkv_split', 'chunked': 'bi_wkv_cuda'}[kind]
    _check_wkv(w, u, k, v)
    if not (k.is_cuda and _cupy_available()):
        raise RuntimeError(f'{who} needs CUDA tensors and cupy (k is on {k.device}, cupy '
                           f'{"installed" if _cupy_available() else "not installed"})')
    if k.dtype not in (torch.float32, torch.float64) or v.dtype != k.dtype:
        raise ValueError(f'{who}: k and v must both be float32 or float64, got {k.dtype} and {v.dtype}')
    if kind == 'chunked' and k.shape[0] > 65535:  # the batch is the chunked kernels' grid.y
        raise ValueError(f'{who}: the batch B must be at most 65535, got {k.shape[0]}')
    w, u, k, v = (t.to(k.dtype).contiguous() for t in (w, u, k, v))
    return _BiWKVCuda.apply(w, u, k, v, kind)


def bi_wkv_naive(w, u, k, v):
    """The naive CUDA kernels: one thread per (b, c) walks its row, one launch a pass (float32 or float64 CUDA
    tensors, cupy installed). A row's terms are added one after another, so with a weak decay the float32 error grows
    with T (1.6e-6 at T = 4096)."""
    return _bi_wkv_kernel(w, u, k, v, 'naive')


def bi_wkv_split(w, u, k, v):
    """The naive kernels' walks with each row cut into P pieces (_wkv_split_pieces), one thread a piece, one launch a
    pass (float32 or float64 CUDA tensors, cupy installed): bi_wkv takes them for short rows, where they are the
    faster kernels."""
    return _bi_wkv_kernel(w, u, k, v, 'split')


def bi_wkv_cuda(w, u, k, v):
    """The chunked CUDA kernels: T/LT threads a row (LT = 8 tokens a thread forward, 6 backward; float32 or float64
    CUDA tensors, cupy installed)."""
    return _bi_wkv_kernel(w, u, k, v, 'chunked')


_WKV_PATHS = {'dense': bi_wkv_dense, 'scan': bi_wkv_scan, 'naive': bi_wkv_naive, 'split': bi_wkv_split,
              'cuda': bi_wkv_cuda}
# bi_wkv's choice on CUDA: the split-row kernels for rows of at most _WKV_SPLIT_MAX_T tokens and at most
# _WKV_SPLIT_MAX_ELEMS elements B·T·C in all, the chunked ones otherwise (paired wall times on an H200, bench.py wkv:
# split 0.79 vs chunked 0.85 ms at (8, 256, 1024), 10.4 vs 4.8 ms at (64, 640, 4096))
_WKV_SPLIT_MAX_T, _WKV_SPLIT_MAX_ELEMS = 1024, 2 ** 23


def bi_wkv(w, u, k, v):
    """Bi-WKV4 with raw decay w, bonus u (C,) over k, v (B, T, C) -> y (B, T, C). On float CUDA tensors with cupy
    installed the split-row kernels for short rows (few of them) and the chunked ones otherwise, else the torch scan;
    environment HPCM_WKV=dense|scan|naive|split|cuda forces a path."""
    forced = os.environ.get('HPCM_WKV', '')
    if forced:
        if forced not in _WKV_PATHS:
            raise ValueError(f'HPCM_WKV must be one of {sorted(_WKV_PATHS)}, got {forced!r}')
        return _WKV_PATHS[forced](w, u, k, v)
    if k.is_cuda and k.dtype in (torch.float32, torch.float64) and _cupy_available():
        split = k.shape[1] <= _WKV_SPLIT_MAX_T and k.numel() <= _WKV_SPLIT_MAX_ELEMS
        return (bi_wkv_split if split else bi_wkv_cuda)(w, u, k, v)
    return bi_wkv_scan(w, u, k, v)


# ================================================================================================================
# RWKV blocks: OmniShift, SpatialMix, ChannelMix, RWKVContextCell, RWKVFusionBlock, RWKVFusionNet
# Following RwkvCompress (models/lalic.py) and the seed's HPCM variants; x is (B, C, H, W) throughout and the
# Bi-WKV sequence is the H·W pixels in raster order.

def init_omni_shift(gen, dim):
    """Restore-RWKV's OmniShift: identity + depthwise 1x1 + 3x3 + 5x5, mixed by learned alpha (randn(4))."""
    return {'alpha': torch.randn(4, generator=gen),
            'conv1': init_conv2d(gen, dim, dim, 1, groups=dim, bias=False),
            'conv3': init_conv2d(gen, dim, dim, 3, groups=dim, bias=False),
            'conv5': init_conv2d(gen, dim, dim, 5, groups=dim, bias=False)}


def omni_shift(p, x):
    """x (B, dim, H, W) -> the same shape: alpha-weighted identity + depthwise 1x1, 3x3 and 5x5 convolutions."""
    a = p['alpha']
    return a[0] * x + a[1] * conv2d(p['conv1'], x) + a[2] * conv2d(p['conv3'], x) + a[3] * conv2d(p['conv5'], x)


def _check_channels(x, dim, who):
    if x.dim() != 4 or x.shape[1] != dim:
        raise ValueError(f'{who}: x must be (B, {dim}, H, W), got {tuple(x.shape)}')


def init_spatial_mix(gen, dim, key_norm=False):
    p = {'omni_shift': init_omni_shift(gen, dim),
         'key': init_linear(gen, dim, dim, bias=False), 'value': init_linear(gen, dim, dim, bias=False),
         'receptance': init_linear(gen, dim, dim, bias=False), 'output': init_linear(gen, dim, dim, bias=False),
         'time_decay': torch.randn(dim, generator=gen), 'time_first': torch.randn(dim, generator=gen)}
    if key_norm:
        p['key_norm'] = init_layer_norm(gen, dim)
    return p


def spatial_mix(p, x):
    """Keys and values from the OmniShift-ed x, Bi-WKV over the H·W pixels, gated by sigmoid(receptance(x))
    (the seed takes the receptance from the unshifted x; RwkvCompress from the shifted one), output Linear."""
    _check_channels(x, p['time_decay'].shape[0], 'spatial_mix')
    H = x.shape[2]
    shifted = rearrange(omni_shift(p['omni_shift'], x), 'b c h w -> b (h w) c')
    k, v = linear(p['key'], shifted), linear(p['value'], shifted)  # (B, T, C)
    r = linear(p['receptance'], rearrange(x, 'b c h w -> b (h w) c'))
    y = bi_wkv(p['time_decay'], p['time_first'], k, v)
    if 'key_norm' in p:
        y = layer_norm(p['key_norm'], y)
    y = linear(p['output'], torch.sigmoid(r) * y)
    return rearrange(y, 'b (h w) c -> b c h w', h=H)


def init_channel_mix(gen, dim, hidden_rate=4):
    hidden = int(hidden_rate * dim)
    if hidden < 1:
        raise ValueError(f'init_channel_mix: hidden_rate * dim must be >= 1, got {hidden_rate} * {dim}')
    return {'omni_shift': init_omni_shift(gen, dim), 'key': init_linear(gen, dim, hidden, bias=False),
            'value': init_linear(gen, hidden, dim, bias=False), 'receptance': init_linear(gen, dim, dim, bias=False)}


def channel_mix(p, x):
    """sigmoid(receptance(x)) * value(relu(key(OmniShift(x)))²): RWKV's squared-ReLU feed-forward."""
    _check_channels(x, p['receptance']['weight'].shape[0], 'channel_mix')
    H = x.shape[2]
    shifted = rearrange(omni_shift(p['omni_shift'], x), 'b c h w -> b (h w) c')
    kv = linear(p['value'], torch.relu(linear(p['key'], shifted)).square())
    r = linear(p['receptance'], rearrange(x, 'b c h w -> b (h w) c'))
    return rearrange(torch.sigmoid(r) * kv, 'b (h w) c -> b c h w', h=H)


def init_rwkv_fusion_block(gen, dim, hidden_rate=4):
    return {'ln1': init_layer_norm(gen, dim), 'ln2': init_layer_norm(gen, dim),
            'spatial_mix': init_spatial_mix(gen, dim), 'channel_mix': init_channel_mix(gen, dim, hidden_rate),
            'gamma1': torch.ones(dim), 'gamma2': torch.ones(dim)}


def rwkv_fusion_block(p, x):
    """x + γ1·(LN1(SpatialMix(x)) − LN1(x)), then the same with ChannelMix, LN2 and γ2 (the seed's form: with
    γ = 1 each step replaces the normalised x by the normalised mix; γ = 0 is the identity)."""
    g1, g2 = p['gamma1'][:, None, None], p['gamma2'][:, None, None]
    x = x + g1 * (layer_norm_channels(p['ln1'], spatial_mix(p['spatial_mix'], x)) - layer_norm_channels(p['ln1'], x))
    x = x + g2 * (layer_norm_channels(p['ln2'], channel_mix(p['channel_mix'], x)) - layer_norm_channels(p['ln2'], x))
    return x


def init_rwkv_context_cell(gen, dim, hidden_rate=4):
    return {'input_proj': init_conv2d(gen, 2 * dim, dim, 1), 'block': init_rwkv_fusion_block(gen, dim, hidden_rate)}


def rwkv_context_cell(p, context, x):
    """Two streams: the previous context and the current input (both (B, dim, H, W)) are concatenated, projected
    back to dim by a 1x1 conv and mixed by one RWKV block; drop-in for HPCM's `attn_sX(context, context_next)`."""
    dim = p['input_proj']['weight'].shape[0]
    _check_channels(context, dim, 'rwkv_context_cell (context)')
    _check_channels(x, dim, 'rwkv_context_cell (x)')
    if context.shape != x.shape:
        raise ValueError(f'rwkv_context_cell: context {tuple(context.shape)} and x {tuple(x.shape)} differ')
    return rwkv_fusion_block(p['block'], conv2d(p['input_proj'], torch.cat([context, x], 1)))


def init_rwkv_fusion_net(gen, dim, num_blocks=1, hidden_rate=4):
    if num_blocks < 0:
        raise ValueError(f'init_rwkv_fusion_net: num_blocks must be >= 0, got {num_blocks}')
    return {'blocks': [init_rwkv_fusion_block(gen, dim, hidden_rate) for _ in range(num_blocks)],
            'out_proj': init_conv2d(gen, dim, dim, 1)}


def rwkv_fusion_net(p, x, checkpoint=False):
    """RWKV blocks then a 1x1 conv (Phase 3's context_net); checkpoint=True recomputes each block in backward."""
    for block in p['blocks']:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(rwkv_fusion_block, block, x, use_reentrant=False)
        else:
            x = rwkv_fusion_block(block, x)
    return conv2d(p['out_proj'], x)


# ================================================================================================================
# transforms: PConvRB and DWConvRB blocks, g_a / g_s / h_a / h_s (LIC-HPCM)

def init_conv_transpose2d(gen, c_in, c_out, k):
    """PyTorch's default init for ConvTranspose2d: U(±1/sqrt(c_out·k·k)) for weight (c_in, c_out, k, k) and bias."""
    bound = 1 / math.sqrt(c_out * k * k)
    return {'weight': (torch.rand(c_in, c_out, k, k, generator=gen) * 2 - 1) * bound,
            'bias': (torch.rand(c_out, generator=gen) * 2 - 1) * bound}


def init_pconv_rb(gen, dim, mlp_ratio=4, partial_ratio=4):
    """Partial-conv residual block: a 3x3 conv on the first dim/partial_ratio channels, then a 1x1 MLP."""
    return {'pconv': init_conv2d(gen, dim // partial_ratio, dim // partial_ratio, 3),
            'fc1': init_conv2d(gen, dim, dim * mlp_ratio, 1), 'fc2': init_conv2d(gen, dim * mlp_ratio, dim, 1)}


def pconv_rb(p, x):
    part = p['pconv']['weight'].shape[0]
    h = torch.cat([conv2d(p['pconv'], x[:, :part]), x[:, part:]], 1)
    return x + conv2d(p['fc2'], F.leaky_relu(conv2d(p['fc1'], h)))


def init_dwconv_rb(gen, dim, mlp_ratio=2):
    return {'dw': init_conv2d(gen, dim, dim, 3, groups=dim),
            'fc1': init_conv2d(gen, dim, dim * mlp_ratio, 1), 'fc2': init_conv2d(gen, dim * mlp_ratio, dim, 1)}


def dwconv_rb(p, x):
    h = conv2d(p['dw'], x)  # depthwise: groups follow from the weight's shape
    return x + conv2d(p['fc2'], F.leaky_relu(conv2d(p['fc1'], h)))


def transform_layers(cfg, name):
    """The layer list of g_a, g_s, h_a, h_s (LIC-HPCM): ('down', c_in, c_out, k) is a stride-2 conv of kernel k
    (k=4 with padding 1), ('up', ...) its transpose, ('rb', dim) a PConvRB. y is at /16, z at /64."""
    c1, c2, c3 = cfg.widths
    M, N = cfg.M, cfg.N
    rb = lambda dim, n: [('rb', dim)] * n
    return {
        'g_a': [('down', 3, c1, 4), *rb(c1, 2), ('down', c1, c2, 2), *rb(c2, 2), ('down', c2, c3, 2), *rb(c3, 4),
                ('down', c3, M, 2)],
        'g_s': [('up', M, c3, 2), *rb(c3, 4), ('up', c3, c2, 2), *rb(c2, 2), ('up', c2, c1, 2), *rb(c1, 2),
                ('up', c1, 3, 4)],
        'h_a': [*rb(M, 1), ('down', M, N, 2), *rb(N, 3), ('down', N, N, 2)],
        'h_s': [('up', N, N, 2), *rb(N, 3), ('up', N, 2 * M, 2), *rb(2 * M, 1)],
    }[name]


def init_transform(gen, cfg, name):
    init = {'rb': lambda dim: init_pconv_rb(gen, dim), 'down': lambda *a: init_conv2d(gen, *a),
            'up': lambda *a: init_conv_transpose2d(gen, *a)}
    return [init[layer[0]](*layer[1:]) for layer in transform_layers(cfg, name)]


def transform(p, cfg, name, x):
    for layer, q in zip(transform_layers(cfg, name), p):
        if layer[0] == 'rb':
            x = pconv_rb(q, x)
        elif layer[0] == 'down':
            x = conv2d(q, x, stride=2, padding=layer[3] // 4)
        else:
            x = F.conv_transpose2d(x, q['weight'], q['bias'], stride=2, padding=layer[3] // 4)
    return x


# ================================================================================================================
# the hierarchical progressive context model: cells, spatial prior, sub-grids and the 11 coding steps

def init_cross_attention_cell(gen, dim):
    """The HPCM baseline context cell: 1x1-conv q from the new context, k and v from the previous one."""
    return {name: init_conv2d(gen, dim, dim, 1) for name in ('q', 'k', 'v', 'out')}


def cross_attention_cell(p, x, h_prev, window, heads):
    """Windowed multi-head cross-attention, h = attention + conv_out(x). x, h_prev: (B, C, H, W). Sizes that are not
    a multiple of the window are padded, and the padded keys are masked out of the softmax."""
    B, C, H, W = x.shape
    pad_h, pad_w = -H % window, -W % window
    to_windows = lambda t: rearrange(F.pad(t, (0, pad_w, 0, pad_h)), 'b (n d) (h p1) (w p2) -> (b h w) n (p1 p2) d',
                                     n=heads, p1=window, p2=window)
    q, k, v = to_windows(conv2d(p['q'], x)), to_windows(conv2d(p['k'], h_prev)), to_windows(conv2d(p['v'], h_prev))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // heads)  # (B*windows, heads, window^2, window^2)
    if pad_h or pad_w:
        real = to_windows(torch.ones(1, heads, H, W, dtype=x.dtype, device=x.device).expand(B, -1, -1, -1))
        scores = scores.masked_fill(real[..., 0].unsqueeze(-2) == 0, float('-inf'))
    attn = rearrange(scores.softmax(-1) @ v, '(b h w) n (p1 p2) d -> b (n d) (h p1) (w p2)',
                     b=B, h=(H + pad_h) // window, p1=window)
    return attn[:, :, :H, :W] + conv2d(p['out'], x)


def init_spatial_prior(gen, M, blocks_1, blocks_2):
    """Depthwise-conv residual blocks on cat(context, y_hat) (3M channels), scaled per step, then 1x1 to 2M."""
    return {'branch_1': [init_dwconv_rb(gen, 3 * M) for _ in range(blocks_1)],
            'branch_2': [init_dwconv_rb(gen, 3 * M) for _ in range(blocks_2)],
            'out': init_conv2d(gen, 3 * M, 2 * M, 1)}


def spatial_prior(p, x, adaptive_params):
    for q in p['branch_1']:
        x = dwconv_rb(q, x)
    x = x * adaptive_params
    for q in p['branch_2']:
        x = dwconv_rb(q, x)
    return conv2d(p['out'], x)


# Channel groups: the latent's M channels are cut into 8 (then 4) groups and each group takes its own sub-grid, so
# every coding step sees neighbours of every spatial phase in some group. (row, col) offsets of the 2x2 sub-grid:
S2_OFFSETS = ((0, 0), (1, 1), (0, 1), (1, 0)) * 2  # y (H, W) -> s2 (H/2, W/2), 8 groups of M/8
S1_OFFSETS = ((0, 0), (0, 1), (1, 0), (1, 1))  # s2 -> s1 (H/4, W/4), 4 groups of M/4
# s2 steps (4 parts of the s2 grid, 4 groups of M/4): part k of group j is the 2x2 phase j XOR S2_PART_XOR[k];
# part 0 is then exactly s1.
S2_PART_XOR = (0, 3, 2, 1)
# s3 steps (8 parts of y, 8 groups of M/8): each pattern is two cells of a 4x4 tile, (r, c) and (r+2, c+2 mod 4);
# S3_PARTS[k][j] is the pattern of group j in part k. Parts 0 and 1 together are exactly s2.
S3_PATTERNS = ((0, 0), (0, 2), (1, 1), (1, 3), (0, 1), (0, 3), (1, 0), (1, 2))
S3_PARTS = ((0, 2, 4, 6, 1, 3, 5, 7), (1, 3, 5, 7, 0, 2, 4, 6), (2, 4, 6, 0, 3, 5, 7, 1), (3, 5, 7, 1, 2, 4, 6, 0),
            (4, 6, 0, 2, 5, 7, 1, 3), (5, 7, 1, 3, 4, 6, 0, 2), (6, 0, 2, 4, 7, 1, 3, 5), (7, 1, 3, 5, 6, 0, 2, 4))


def subgrid(t, offsets):
    """(B, C, H, W) -> (B, C, H/2, W/2): channel group g keeps its sub-grid offsets[g]."""
    return torch.cat([g[:, :, r::2, c::2] for g, (r, c) in zip(t.chunk(len(offsets), 1), offsets)], 1)


def unsubgrid(t, offsets):
    """The inverse of subgrid: back onto the finer grid, zeros at the positions the sub-grids do not cover."""
    B, C, h, w = t.shape
    out = t.new_zeros(B, C, 2 * h, 2 * w)
    size = C // len(offsets)
    for g, (r, c) in enumerate(offsets):
        out[:, g * size:(g + 1) * size, r::2, c::2] = t[:, g * size:(g + 1) * size]
    return out


def per_half(fn, t, offsets):
    """Apply a sub-grid map to the scales half and the means half of a 2M-channel entropy-parameter tensor."""
    return torch.cat([fn(half, offsets) for half in t.chunk(2, 1)], 1)


def scale_grids(y):
    """y -> (its s1 grid, its s2 grid, y): the grids of scales 0, 1, 2 (to_full_res maps each back)."""
    return subgrid(subgrid(y, S2_OFFSETS), S1_OFFSETS), subgrid(y, S2_OFFSETS), y


def to_full_res(t, scale):
    """A tensor on the grid of scale 0 (s1), 1 (s2) or 2 (s3 = y) -> the y grid."""
    if scale == 0:
        t = unsubgrid(t, S1_OFFSETS)
    return unsubgrid(t, S2_OFFSETS) if scale < 2 else t


def coding_schedule(M, H, W, device=None, dtype=torch.float32):
    """The 11 coding steps for a latent (M, H, W): [(scale, mask (1, M, h, w) on that scale's grid)].
    s1 (H/4 x W/4): 2 checkerboard parts; s2 (H/2 x W/2): 3 new parts; s3 (H x W): 6 new parts."""
    def group_masks(h, w, cells_per_group):  # cells_per_group[g]: the (r, c, period) cells group g codes
        mask = torch.zeros(1, M, h, w, dtype=dtype, device=device)
        size = M // len(cells_per_group)
        for g, cells in enumerate(cells_per_group):
            for r, c, period in cells:
                mask[:, g * size:(g + 1) * size, r::period, c::period] = 1
        return mask
    h1, w1, h2, w2 = H // 4, W // 4, H // 2, W // 2
    checker = lambda phase: [(phase, 0, 2), (1 - phase, 1, 2)]
    steps = [(0, group_masks(h1, w1, [checker(k), checker(1 - k)])) for k in range(2)]
    steps += [(1, group_masks(h2, w2, [[(*divmod(j ^ S2_PART_XOR[k], 2), 2)] for j in range(4)]))
              for k in range(1, 4)]
    pattern = lambda p: [(r, c, 4) for r, c in (S3_PATTERNS[p], (S3_PATTERNS[p][0] + 2, (S3_PATTERNS[p][1] + 2) % 4))]
    steps += [(2, group_masks(H, W, [pattern(S3_PARTS[k][j]) for j in range(8)])) for k in range(2, 8)]
    return steps


def init_context_net(gen, cfg):
    dim = 2 * cfg.M
    if cfg.phase == 3:
        return init_rwkv_fusion_net(gen, dim, cfg.fusion_blocks, cfg.fusion_hidden_rate)
    return init_conv2d(gen, dim, dim, 1)


def context_net(p, cfg, x):
    return rwkv_fusion_net(p, x, checkpoint=cfg.checkpoint) if cfg.phase == 3 else conv2d(p, x)


def init_context_cell(gen, cfg, scale):
    dim = 2 * cfg.M
    if cfg.rwkv_at(scale):
        return init_rwkv_context_cell(gen, dim, cfg.rwkv_hidden_rates[scale])
    return init_cross_attention_cell(gen, dim)


def context_cell(p, cfg, scale, context, context_next):
    """The progressive-context update context_next = attn_sX(context, context_next)."""
    if cfg.rwkv_at(scale):
        return rwkv_context_cell(p, context, context_next)
    return cross_attention_cell(p, context, context_next, cfg.windows[scale], cfg.heads)


# ================================================================================================================
# entropy model: the Gaussian conditional (rate estimate)

SCALE_BOUND = 0.11  # CompressAI GaussianConditional: scales below this carry no information, only float trouble
LIKELIHOOD_BOUND = 1e-9


class _LowerBound(torch.autograd.Function):
    """max(x, bound); the gradient passes where x is above the bound or where it would push x back up."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= ctx.bound) | (grad < 0)).to(grad.dtype), None


def lower_bound(x, bound):
    return _LowerBound.apply(x, bound)


def standard_normal_cdf(x):
    return 0.5 * torch.erfc(-x * 2 ** -0.5)


def gaussian_likelihood(residual, scales):
    """P(the integer bin around `residual`) under N(0, scale): the mean is already subtracted. Using |residual|
    keeps the difference of CDFs in the accurate lower tail (CompressAI does the same)."""
    scales = lower_bound(scales, SCALE_BOUND)
    v = residual.abs()
    lik = standard_normal_cdf((0.5 - v) / scales) - standard_normal_cdf((-0.5 - v) / scales)
    return lower_bound(lik, LIKELIHOOD_BOUND)


def total_bits(likelihoods):
    return sum(-torch.log2(lik).sum() for lik in likelihoods.values())


# ================================================================================================================
# the full codec: init, the context loop shared by training and coding, forward

def init_hpcm(cfg, gen):
    M = cfg.M
    return {
        'g_a': init_transform(gen, cfg, 'g_a'), 'g_s': init_transform(gen, cfg, 'g_s'),
        'h_a': init_transform(gen, cfg, 'h_a'), 'h_s': init_transform(gen, cfg, 'h_s'),
        # z's learned per-channel Gaussian; z is rounded around means_hyper
        'means_hyper': torch.zeros(1, cfg.N, 1, 1), 'scales_hyper': torch.ones(1, cfg.N, 1, 1),
        'adaptors': [init_conv2d(gen, 3 * M, 3 * M, 1) for _ in range(10)],  # one per context-coded step
        'prior_s1_s2': init_spatial_prior(gen, M, 2, 1), 'prior_s3': init_spatial_prior(gen, M, 3, 2),
        'adaptive_params': [torch.ones(1, 3 * M, 1, 1) for _ in range(10)],
        'attn_s1': init_context_cell(gen, cfg, 0), 'attn_s2': init_context_cell(gen, cfg, 1),
        'attn_s3': init_context_cell(gen, cfg, 2),
        'context_net': [init_context_net(gen, cfg) for _ in range(2)],
    }


def hpcm_context(p, cfg, hyper, code_step):
    """The hierarchical progressive context model: the one path that training, compress and decompress all run.

    hyper: h_s(z_hat), (B, 2M, H, W) = (scales, means). For each of the 11 steps it predicts (scales, means) on
    the step's grid and calls code_step(step, scale, scales, means, mask) -> that step's y_hat (zero outside mask),
    which becomes context for the later steps. Returns y_hat (B, M, H, W)."""
    B, C, H, W = hyper.shape
    if C != 2 * cfg.M or H % 4 or W % 4:
        raise ValueError(f"hpcm_context: hyper must be (B, 2M={2 * cfg.M}, H, W) with H, W multiples of 4 (s1 is "
                         f"at /4), got {tuple(hyper.shape)}")
    hyper_s2 = per_half(subgrid, hyper, S2_OFFSETS)
    context_next = per_half(subgrid, hyper_s2, S1_OFFSETS)  # s1 starts from the hyperprior alone
    y_hat = hyper.new_zeros(B, cfg.M, H // 4, W // 4)
    cells = (p['attn_s1'], p['attn_s2'], p['attn_s3'])
    priors = (p['prior_s1_s2'], p['prior_s1_s2'], p['prior_s3'])
    last_scale = 0
    for step, (scale, mask) in enumerate(coding_schedule(cfg.M, H, W, hyper.device, hyper.dtype)):
        if scale != last_scale:  # carry y_hat and the context onto the finer grid; new positions get the hyperprior
            offsets = S1_OFFSETS if scale == 1 else S2_OFFSETS
            new_hyper = hyper_s2 if scale == 1 else hyper
            y_hat = unsubgrid(y_hat, offsets)
            coded = per_half(unsubgrid, torch.ones_like(context_next), offsets)
            context = per_half(unsubgrid, context_next, offsets) + new_hyper * (1 - coded)
            context_next = context_net(p['context_net'][scale - 1], cfg, context)
            last_scale = scale
        if step == 0:
            scales, means = context_next.chunk(2, 1)
        else:
            x = torch.cat([context_next, y_hat], 1)
            context = spatial_prior(priors[scale], conv2d(p['adaptors'][step - 1], x), p['adaptive_params'][step - 1])
            context_next = context_cell(cells[scale], cfg, scale, context, context_next)
            scales, means = context.chunk(2, 1)
        y_hat = y_hat + code_step(step, scale, scales, means, mask)
    return y_hat


def dequantize(q, means, mask):
    """y_hat of one step from its integer residuals: the same expression in the encoder and the decoder."""
    return (q + means) * mask


def ste_round(x):
    return x + (torch.round(x) - x).detach()


def pad_image(x, multiple=64):
    """Replicate-pad (B, 3, H, W) to a multiple of 64 (y is at /16 and s1 at /4 of y)."""
    return F.pad(x, (0, -x.shape[3] % multiple, 0, -x.shape[2] % multiple), mode='replicate')


def check_image(x, name='x'):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a float image tensor (B, 3, H, W) with values in [0, 1], got {got}")


def hpcm_forward(params, x, cfg, training=False):
    """x (B, 3, H, W) in [0, 1] -> (x_hat, {'y': likelihoods, 'z': likelihoods}, bpp estimate).

    training: uniform noise for the rates and straight-through rounding for y_hat; otherwise rounding around the
    means, as the real coder does. Sizes that are not multiples of 64 are padded and cropped back."""
    check_image(x)
    B, _, H, W = x.shape
    y = transform(params['g_a'], cfg, 'g_a', pad_image(x))
    z = transform(params['h_a'], cfg, 'h_a', y)
    z_res = z - params['means_hyper']
    if training:
        z_hat = ste_round(z_res) + params['means_hyper']
        z_lik = gaussian_likelihood(z_res + torch.rand_like(z_res) - 0.5, params['scales_hyper'])
    else:
        z_hat = torch.round(z_res) + params['means_hyper']
        z_lik = gaussian_likelihood(torch.round(z_res), params['scales_hyper'])
    y_grids = scale_grids(y)
    y_lik = torch.zeros_like(y)

    def code_step(step, scale, scales, means, mask):
        nonlocal y_lik
        res = (y_grids[scale] - means) * mask
        rate_res = res + torch.rand_like(res) - 0.5 if training else torch.round(res)
        y_lik = y_lik + to_full_res(gaussian_likelihood(rate_res, scales) * mask, scale)
        return dequantize(ste_round(res) if training else torch.round(res), means, mask)
    y_hat = hpcm_context(params, cfg, transform(params['h_s'], cfg, 'h_s', z_hat), code_step)
    x_hat = transform(params['g_s'], cfg, 'g_s', y_hat)[:, :, :H, :W]
    likelihoods = {'y': y_lik, 'z': z_lik}
    return x_hat, likelihoods, total_bits(likelihoods) / (B * H * W)


# ================================================================================================================
# loss

LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483)  # CompressAI's MSE lambdas for qualities 1..6


def rate_distortion_loss(x, x_hat, likelihoods, lmbda):
    """λ·255²·MSE + bpp, the rate over the pixels of x."""
    B, _, H, W = x.shape
    bpp = total_bits(likelihoods) / (B * H * W)
    mse = F.mse_loss(x_hat, x)
    return {'loss': lmbda * 255 ** 2 * mse + bpp, 'mse': mse, 'bpp': bpp}


def psnr(x, x_hat):
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return -10 * math.log10(max(F.mse_loss(x_hat.clamp(0, 1), x).item(), 1e-12))


# ================================================================================================================
# real coding: rANS on quantised Gaussian CDF tables, vectorised over lanes with numpy

TAIL_MASS = 1e-9  # the two Gaussian tails beyond the table share this mass, coded through an escape symbol
# The grid the decoder rounds every predicted scale to: its index picks the CDF table, so encoder and decoder agree
# on the table even where their floats differ in the last bit far from a grid boundary.
SCALE_TABLE = np.exp(np.linspace(np.log(SCALE_BOUND), np.log(256.0), 64))
PRECISION = 16  # bits of every quantised CDF
# rANS states live in [2^32, 2^64) and spill 32 bits at a time: states far above 2^PRECISION keep the
# rounding loss of each push negligible, even for the many near-certain symbols of a learned latent.
RANS_LOW = 1 << 32


@functools.lru_cache(maxsize=4096)
def gaussian_freqs(scale):
    """Integer frequencies summing to 2^PRECISION for the values -T..T of N(0, scale) plus one escape symbol (the
    tails); every symbol gets at least 1 so any value stays codable. Returns (freqs (2T+2,), T); cached, read-only."""
    half_tail = -torch.special.ndtri(torch.tensor(TAIL_MASS / 2, dtype=torch.float64)).item()
    tail = int(np.ceil(scale * half_tail))
    v = torch.arange(-tail, tail + 1, dtype=torch.float64)
    pmf = standard_normal_cdf((v + 0.5) / scale) - standard_normal_cdf((v - 0.5) / scale)
    probs = np.append(pmf.numpy(), max(0.0, 1.0 - pmf.sum().item()))
    freqs = np.maximum(1, np.rint(probs * (1 << PRECISION))).astype(np.int64)
    excess = int(freqs.sum()) - (1 << PRECISION)
    while excess:  # settle the rounding error one count each on the largest bins, never taking one below 1
        order = np.argsort(-freqs, kind='stable')
        if excess > 0:
            order = order[freqs[order] > 1]
        k = min(abs(excess), len(order))
        freqs[order[:k]] -= np.sign(excess)
        excess -= int(np.sign(excess)) * k
    freqs.setflags(write=False)
    return freqs, tail


def make_cdf_tables(scales):
    """One quantised Gaussian CDF table per scale, flattened for vectorised lookup: each symbol's frequency `freq`
    and cumulative frequency `cum`, each table's first symbol `base` and tail `tail`, and `symbol`, the decoder's
    table from (table << PRECISION) + slot to the symbol (within its table) whose interval holds that slot."""
    tables = [gaussian_freqs(float(s)) for s in scales]
    freq = np.concatenate([f for f, _ in tables])
    cum = np.concatenate([np.cumsum(f) - f for f, _ in tables])
    symbol = np.concatenate([np.repeat(np.arange(len(f), dtype=np.uint16), f) for f, _ in tables])
    return {'freq': freq.astype(np.uint64), 'cum': cum.astype(np.uint64), 'symbol': symbol,
            'base': np.concatenate([[0], np.cumsum([len(f) for f, _ in tables])]).astype(np.int64),
            'tail': np.array([t for _, t in tables], np.int64)}


def symbol_indices(values, table, tables):
    """Integer values -> flat indices into the tables; values beyond a table's tails map to its escape symbol."""
    tail = tables['tail'][table]
    sym = values + tail
    escaped = (sym < 0) | (sym > 2 * tail)
    return tables['base'][table] + np.where(escaped, 2 * tail + 1, sym), escaped


def ideal_bits(values, table, tables):
    """The information content -log2 p of the values under the quantised tables (escapes: their symbol only)."""
    flat, _ = symbol_indices(values, table, tables)
    return float(-np.log2(tables['freq'][flat] / (1 << PRECISION)).sum())


def min_symbol_bits(tables):
    """A lower bound on what any symbol adds to a stream (its most likely value in its table, less the rounding
    of a push): n symbols need at least n times this many bits, whatever they are."""
    return -math.log2(float(tables['freq'].max()) / (1 << PRECISION)) - 2 ** (1 - PRECISION)


def encode_varints(values):
    """Zigzag + LEB128: the few escaped values, which need not be small."""
    out = bytearray()
    for v in values.tolist():
        u = (v << 1) ^ (v >> 63)
        while u >= 0x80:
            out.append(u & 0x7F | 0x80)
            u >>= 7
        out.append(u)
    return bytes(out)


def decode_varints(data):
    values, u, shift = [], 0, 0
    for byte in data:
        u |= (byte & 0x7F) << shift
        shift += 7
        if shift > 70:
            raise ValueError("bitstream: an escaped value is longer than 64 bits (corrupt stream)")
        if byte < 0x80:
            values.append((u >> 1) ^ -(u & 1))
            u, shift = 0, 0
    if shift:
        raise ValueError("bitstream: the escaped values end in the middle of a number (truncated stream)")
    return values


def rans_encode(values, table, tables, lanes, seed=0):
    """Interleaved rANS: symbol i goes to lane i % lanes; numpy runs all lanes of one row at once.

    values, table: int64 (n,) in decoding order. Every lane starts at RANS_LOW + seed (seed < 2^32), where the
    decoder must end. Returns (states uint64 (lanes,), words uint32, escapes bytes). rANS is last-in first-out, so
    rows are pushed from the last to the first; a lane spills its low 32 bits before a push that would overflow 64
    bits, and the decoder reads that word back right after the matching pop."""
    flat, escaped = symbol_indices(values, table, tables)
    freq, cum = tables['freq'][flat], tables['cum'][flat]
    limit = freq << np.uint64(64 - PRECISION)  # a push from x >= limit would overflow
    x = np.full(lanes, RANS_LOW + seed, np.uint64)
    rows = []
    for r in range((len(values) + lanes - 1) // lanes - 1, -1, -1):
        row = slice(r * lanes, (r + 1) * lanes)
        f = freq[row]
        xs = x[:len(f)]
        spill = np.flatnonzero(xs >= limit[row])
        if len(spill):
            rows.append(xs[spill].astype(np.uint32))  # the low 32 bits
            xs[spill] >>= np.uint64(32)
        quotient, remainder = np.divmod(xs, f)
        np.left_shift(quotient, np.uint64(PRECISION), out=xs)  # x = (x // f) << PRECISION + x % f + cum, in place
        xs += remainder
        xs += cum[row]
    words = np.concatenate(rows[::-1]) if rows else np.zeros(0, np.uint32)
    return x, words, encode_varints(values[escaped])


def rans_decoder(states, words, escapes, seed=0):
    return {'x': states.astype(np.uint64), 'words': words.astype(np.uint64), 'pos': 0, 'count': 0,
            'escapes': decode_varints(escapes), 'escape_pos': 0, 'end': RANS_LOW + seed}


def rans_decode(dec, table, tables):
    """Pop the next len(table) symbols (table: int64 (n,)) from the decoder dict `dec`, updating it in place.
    A call may start and end in the middle of a row: lanes are independent, and words are read in lane order."""
    lanes, n = len(dec['x']), len(table)
    flat = np.empty(n, np.int64)
    key = table.astype(np.uint64) << np.uint64(PRECISION)
    base = tables['base'][table]
    mask = np.uint64((1 << PRECISION) - 1)
    i = 0
    while i < n:
        lane = dec['count'] % lanes
        k = min(lanes - lane, n - i)
        xs = dec['x'][lane:lane + k]  # updated in place: x = freq * (x >> PRECISION) + slot - cum
        slot = xs & mask
        idx = base[i:i + k] + tables['symbol'][key[i:i + k] | slot]
        xs >>= np.uint64(PRECISION)
        xs *= tables['freq'][idx]
        xs += slot
        xs -= tables['cum'][idx]
        low = np.flatnonzero(xs < RANS_LOW)
        if len(low):
            if dec['pos'] + len(low) > len(dec['words']):
                raise ValueError("bitstream: ran out of coded words (truncated or corrupt stream)")
            xs[low] = (xs[low] << np.uint64(32)) | dec['words'][dec['pos']:dec['pos'] + len(low)]
            dec['pos'] += len(low)
        dec['count'] += k
        flat[i:i + k] = idx
        i += k
    sym = flat - base
    tail = tables['tail'][table]
    values = sym - tail
    escaped = np.flatnonzero(sym == 2 * tail + 1)
    if dec['escape_pos'] + len(escaped) > len(dec['escapes']):
        raise ValueError("bitstream: more escape symbols than escaped values (corrupt stream)")
    values[escaped] = dec['escapes'][dec['escape_pos']:dec['escape_pos'] + len(escaped)]
    dec['escape_pos'] += len(escaped)
    return values


def rans_finish(dec):
    """The decoder must end exactly where the encoder began: every lane back at its start state, every word and
    escape used."""
    if (dec['x'] != dec['end']).any() or dec['pos'] != len(dec['words']) or dec['escape_pos'] != len(dec['escapes']):
        raise ValueError("bitstream: the decoder did not end where the encoder began: the stream is corrupt or its "
                         "header was altered, or the context model ran differently than when encoding (decode with "
                         "the same model and device type)")


# ================================================================================================================
# the bitstream: compress / decompress

BITSTREAM_MAGIC = b'HPCM'
BITSTREAM_VERSION = 2
# magic, version, phase, height, width, model fingerprint, log2(lanes), words, escape bytes, and a CRC32 of the
# header fields before it and the payload after it: a flipped bit anywhere is caught before decoding starts.
HEADER = struct.Struct('<4sBBHHQBIII')
# The largest image a stream may declare (8K UHD is 7680 x 4320): a decoder allocates nothing larger.
MAX_SIDE, MAX_PIXELS = 16384, 1 << 25


def named_leaves(params, prefix=''):
    """(name, tensor) for every tensor of a parameter tree, in a fixed order."""
    if isinstance(params, dict):
        return [leaf for k in sorted(params) for leaf in named_leaves(params[k], f'{prefix}.{k}')]
    if isinstance(params, (list, tuple)):
        return [leaf for i, v in enumerate(params) for leaf in named_leaves(v, f'{prefix}.{i}')]
    return [(prefix, params)]


def model_fingerprint(params):
    """BLAKE2b (8 bytes) of every tensor's name, shape, dtype and every value: a stream names the exact model that
    wrote it, and a model differing in any weight refuses it."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in named_leaves(params):
        h.update(f'{name}{tuple(t.shape)}{t.dtype};'.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), 'little')


def entropy_tables(params):
    """z: one table per channel at its learned scale; y: one per entry of SCALE_TABLE, after the N z tables."""
    z_scales = lower_bound(params['scales_hyper'].detach(), SCALE_BOUND).reshape(-1).double().cpu().numpy()
    return make_cdf_tables(np.concatenate([z_scales, SCALE_TABLE]))


@dataclass
class Coder:
    """A model ready to code images: its parameters and config, and what compress/decompress derive from them once
    per loaded model (the fingerprint streams carry, the rANS tables) or once per latent size (`positions`: each
    coding step's coded positions as flat indices on the model's device, so that no step waits for the GPU to find
    them). Build it with make_coder; build it again after the parameters change."""
    params: dict
    cfg: HPCMConfig
    fingerprint: int
    tables: dict
    positions: dict = field(default_factory=dict)


def make_coder(params, cfg):
    return Coder(params, cfg, model_fingerprint(params), entropy_tables(params))


def coded_positions(coder, H, W):
    """Flat indices into (1, M, h, w) of the 11 steps' coded positions for a latent of H x W, cached per size."""
    if (H, W) not in coder.positions:
        device = coder.params['means_hyper'].device
        coder.positions[H, W] = [mask.reshape(-1).nonzero().squeeze(1).to(device)
                                 for _, mask in coding_schedule(coder.cfg.M, H, W)]
    return coder.positions[H, W]


def scale_index(scales):
    """Round each predicted scale to the nearest SCALE_TABLE entry in log space."""
    step = math.log(SCALE_TABLE[1] / SCALE_TABLE[0])
    idx = torch.round((torch.log(scales.clamp(SCALE_BOUND, float(SCALE_TABLE[-1]))) - math.log(SCALE_BOUND)) / step)
    return idx.long().clamp(0, len(SCALE_TABLE) - 1)


def deterministic(device):
    """cuDNN must pick the same deterministic kernels when encoding and when decoding."""
    if device.type == 'cuda':
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)
    return contextlib.nullcontext()


def check_compress_input(x, device):
    """The one image compress codes, as float32 (1, 3, H, W) on the model's device; anything else is refused with
    the reason. Integers are refused rather than guessed at (255 or 1 as white?); floats of any width convert."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"compress: x must be a torch tensor (1, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[:2] != (1, 3):
        raise ValueError(f"compress: x must be one RGB image (1, 3, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"compress: x must hold floats in [0, 1], got {x.dtype} (uint8 pixels: x.float() / 255)")
    H, W = x.shape[2:]
    if not (0 < H <= MAX_SIDE and 0 < W <= MAX_SIDE and H * W <= MAX_PIXELS):
        raise ValueError(f"compress: x is {H}x{W}; sides must be 1..{MAX_SIDE} and H*W at most {MAX_PIXELS}")
    x = x.to(device, torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("compress: x holds NaN or infinite values")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"compress: x must lie in [0, 1], its values span [{lo:.4g}, {hi:.4g}]")
    return x


def stream_seed(fields, escapes):
    """Where every rANS lane starts and the decoder must end: a CRC of the header fields and the escaped values, so
    a header or escape changed with a re-computed CRC still fails at the end of decoding."""
    return zlib.crc32(escapes, zlib.crc32(fields))


def compress(coder, x):
    """One image (1, 3, H, W), values in [0, 1], sides up to MAX_SIDE and at most MAX_PIXELS pixels -> bytes:
    header, rANS lane states, 32-bit words, escaped values."""
    params, cfg, N = coder.params, coder.cfg, coder.cfg.N
    x = check_compress_input(x, params['means_hyper'].device)
    H, W = x.shape[2:]
    values, tables_of = [], []
    with torch.no_grad(), deterministic(x.device):
        y = transform(params['g_a'], cfg, 'g_a', pad_image(x))
        z_q = torch.round(transform(params['h_a'], cfg, 'h_a', y) - params['means_hyper'])
        values.append(z_q.reshape(-1))
        tables_of.append(torch.arange(N, device=x.device).view(1, N, 1, 1).expand_as(z_q).reshape(-1))
        y_grids = scale_grids(y)
        positions = coded_positions(coder, *y.shape[2:])

        def code_step(step, scale, scales, means, mask):
            q = torch.round((y_grids[scale] - means) * mask)
            values.append(q.reshape(-1)[positions[step]])
            tables_of.append(N + scale_index(scales.reshape(-1)[positions[step]]))
            return dequantize(q, means, mask)
        hpcm_context(params, cfg, transform(params['h_s'], cfg, 'h_s', z_q + params['means_hyper']), code_step)
        values = torch.cat(values).long().cpu().numpy()
        table = torch.cat(tables_of).cpu().numpy()
    # numpy's cost is per row of lanes, and each lane's final state costs ~6 bytes: as many lanes as keep that under
    # ~1% of the payload, and at least one per 8192 symbols (at most 16384 rows; 32 lanes, ~0.005 bpp, at 768x512).
    lanes = max(ideal_bits(values, table, coder.tables) / 8 / 600, len(values) / 8192, 1.0)
    log2_lanes = int(np.clip(np.log2(lanes), 0, 10))
    _, escaped = symbol_indices(values, table, coder.tables)
    escapes = encode_varints(values[escaped])
    fields = HEADER.pack(BITSTREAM_MAGIC, BITSTREAM_VERSION, cfg.phase, H, W, coder.fingerprint, log2_lanes, 0, 0,
                         0)[:-12]
    states, words, _ = rans_encode(values, table, coder.tables, 1 << log2_lanes, stream_seed(fields, escapes))
    body = states.astype('<u8').tobytes() + words.astype('<u4').tobytes() + escapes
    fields += struct.pack('<II', len(words), len(escapes))
    return fields + struct.pack('<I', zlib.crc32(fields + body)) + body


def read_header(data, coder):
    """Check a stream's header against its payload and the model -> (H, W, lanes, words, escapes, seed)."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"decompress: data must be bytes, got {type(data).__name__}")
    if len(data) < HEADER.size:
        raise ValueError(f"bitstream: {len(data)} bytes is shorter than the {HEADER.size}-byte header (truncated)")
    magic, version, phase, H, W, fingerprint, log2_lanes, n_words, n_escape, crc = HEADER.unpack_from(data)
    if magic != BITSTREAM_MAGIC:
        raise ValueError(f"bitstream: not an HPCM stream (magic {magic!r})")
    if version != BITSTREAM_VERSION:
        raise ValueError(f"bitstream: version {version}, this decoder reads version {BITSTREAM_VERSION}")
    lanes = 1 << log2_lanes
    body = bytes(data[HEADER.size:])
    expected = 8 * lanes + 4 * n_words + n_escape
    if len(body) != expected:
        raise ValueError(f"bitstream: the header announces {expected} bytes of payload, the stream has {len(body)} "
                         f"({'truncated' if len(body) < expected else 'trailing bytes'})")
    if zlib.crc32(bytes(data[:HEADER.size - 4]) + body) != crc:
        raise ValueError("bitstream: checksum mismatch, the stream is corrupt")
    if phase != coder.cfg.phase:
        raise ValueError(f"bitstream: written by a phase {phase} model, this model is phase {coder.cfg.phase}")
    if fingerprint != coder.fingerprint:
        raise ValueError("bitstream: written by a different model (parameter fingerprint mismatch)")
    if not (0 < H <= MAX_SIDE and 0 < W <= MAX_SIDE and H * W <= MAX_PIXELS):
        raise ValueError(f"bitstream: declares a {H}x{W} image; sides must be 1..{MAX_SIDE}, H*W at most {MAX_PIXELS}")
    Hp, Wp = H + -H % 64, W + -W % 64
    symbols = coder.cfg.N * (Hp // 64) * (Wp // 64) + coder.cfg.M * (Hp // 16) * (Wp // 16)
    if symbols * min_symbol_bits(coder.tables) > 32 * (n_words + lanes):
        raise ValueError(f"bitstream: declares a {H}x{W} image, whose {symbols} symbols cannot fit in "
                         f"{4 * (n_words + 2 * lanes)} bytes of rANS payload")
    escapes = body[8 * lanes + 4 * n_words:]
    seed = stream_seed(bytes(data[:HEADER.size - 12]), escapes)
    return H, W, np.frombuffer(body, '<u8', lanes), np.frombuffer(body, '<u4', n_words, 8 * lanes), escapes, seed


def decompress(coder, data):
    """bytes from compress -> x_hat (1, 3, H, W) in [0, 1], equal to the encoder's reconstruction."""
    params, cfg, N = coder.params, coder.cfg, coder.cfg.N
    H, W, states, words, escapes, seed = read_header(data, coder)
    dec = rans_decoder(states, words, escapes, seed)
    device = params['means_hyper'].device
    Hp, Wp = H + -H % 64, W + -W % 64
    z_table = np.repeat(np.arange(N), (Hp // 64) * (Wp // 64))
    with torch.no_grad(), deterministic(device):
        z_q = torch.from_numpy(rans_decode(dec, z_table, coder.tables)).to(device, torch.float32)
        hyper = transform(params['h_s'], cfg, 'h_s', z_q.view(1, N, Hp // 64, Wp // 64) + params['means_hyper'])

        positions = coded_positions(coder, Hp // 16, Wp // 16)

        def code_step(step, scale, scales, means, mask):  # one transfer each way
            table = (N + scale_index(scales.reshape(-1)[positions[step]])).cpu().numpy()
            q = torch.zeros_like(means)
            q.view(-1)[positions[step]] = torch.from_numpy(rans_decode(dec, table, coder.tables)).to(device, q.dtype)
            return dequantize(q, means, mask)
        y_hat = hpcm_context(params, cfg, hyper, code_step)
        rans_finish(dec)
        return transform(params['g_s'], cfg, 'g_s', y_hat)[:, :, :H, :W].clamp(0, 1)


# ================================================================================================================
# data

def synthetic_image(gen, H, W):
    """A generated photo-like image (3, H, W) in [0, 1]: a smooth colour gradient, random ellipses and rectangles
    with soft edges, and a little fine texture, so that both flat regions and edges have to be coded."""
    u = torch.linspace(0, 1, W).view(1, 1, W)
    v = torch.linspace(0, 1, H).view(1, H, 1)
    rand = lambda *shape: torch.rand(shape, generator=gen)
    img = rand(3, 1, 1) + (rand(3, 1, 1) - 0.5) * u + (rand(3, 1, 1) - 0.5) * v
    for _ in range(int(rand(1).item() * 12) + 4):
        cy, cx, ry, rx = rand(4).tolist()
        colour = rand(3, 1, 1)
        if rand(1).item() < 0.5:
            dist = ((v - cy) / (0.05 + 0.3 * ry)) ** 2 + ((u - cx) / (0.05 + 0.3 * rx)) ** 2
        else:
            dist = torch.maximum(((v - cy) / (0.05 + 0.3 * ry)).abs(), ((u - cx) / (0.05 + 0.3 * rx)).abs())
        alpha = torch.sigmoid((1 - dist) * 20)
        img = img * (1 - alpha) + colour * alpha
    texture = F.interpolate(rand(1, 3, H // 4 + 1, W // 4 + 1), size=(H, W), mode='bilinear', align_corners=False)
    return (img + 0.08 * (texture[0] - 0.5)).clamp(0, 1)


def image_to_tensor(img):
    """uint8 (H, W, 3) -> float (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255


def tensor_to_image(x):
    """float (1, 3, H, W) or (3, H, W) in [0, 1] -> uint8 (H, W, 3), rounded."""
    x = x[0] if x.dim() == 4 else x
    return (x.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def random_crops(images, size, batch, gen):
    """A batch (B, 3, size, size) in [0, 1] of random crops, each flipped left-right with probability 1/2, from a
    list of uint8 (H, W, 3) images at least size x size: images stay uint8 and only the crops become floats."""
    crops = []
    for _ in range(batch):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        H, W = img.shape[:2]
        if H < size or W < size:
            raise ValueError(f"random_crops: an image of {H}x{W} is smaller than the crop size {size}")
        top = int(torch.randint(H - size + 1, (1,), generator=gen))
        left = int(torch.randint(W - size + 1, (1,), generator=gen))
        crop = img[top:top + size, left:left + size]
        crops.append(crop[:, ::-1] if torch.rand(1, generator=gen).item() < 0.5 else crop)
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
