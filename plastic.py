"""Plastic Continuous Thought Machine: the CTM (Darlow et al., 2025, SakanaAI/continuous-thought-machines) plus
hypernetworks that make the synapse and neuron-level weights plastic at inference.

Pure functions over parameter dicts: `init_x(gen, ...) -> dict` makes parameters, `x(p, ...) -> y` applies them.
Imports only torch, numpy, einops and the standard library, so this one file can be copied into another project.
"""

import collections
import functools
import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

NEURON_SELECT_TYPES = ('first-last', 'random', 'random-pairing')
BACKBONE_TYPES = ('none', 'conv', 'parity_backbone', 'shallow-wide') + tuple(
    f'resnet{n}-{k}' for n in (18, 34, 50, 101, 152) for k in (1, 2, 3, 4))
POSITIONAL_EMBEDDING_TYPES = ('none', 'learnable-fourier', 'multi-learnable-fourier', 'custom-rotational',
                              'custom-rotational-1d')
HYPER_LAYERS = ('none', 'bottleneck', 'down', 'up', 'all')


@dataclass
class CTMConfig:
    """The original constructor's arguments (models/ctm.py), plus `in_channels` (the original infers it with lazy
    layers: image channels, or the feature channels when backbone_type is 'none') and the plastic fields."""
    iterations: int = 50
    d_model: int = 1024
    d_input: int = 256
    heads: int = 4
    n_synch_out: int = 128
    n_synch_action: int = 128
    synapse_depth: int = 8
    memory_length: int = 25
    deep_nlms: bool = True
    memory_hidden_dims: int = 32
    do_layernorm_nlm: bool = False
    backbone_type: str = 'resnet18-1'
    positional_embedding_type: str = 'none'
    out_dims: int = 250
    prediction_reshaper: tuple = (-1,)
    dropout: float = 0.0
    dropout_nlm: float = None  # None: same as dropout, as in the original
    neuron_select_type: str = 'random-pairing'
    n_random_pairing_self: int = 0
    in_channels: int = 3
    hyper_layers: str = 'none'
    hyper_rank: int = 8
    use_hyper_nlm: bool = False
    hyper_nlm_rank: int = 4

    def __post_init__(self):
        """Refuse a configuration the model cannot build, naming the field and what it expects."""
        self.prediction_reshaper = tuple(self.prediction_reshaper)
        n_synch = min(self.n_synch_out, self.n_synch_action)
        checks = [(self.neuron_select_type in NEURON_SELECT_TYPES, 'neuron_select_type',
                   f'one of {NEURON_SELECT_TYPES}'),
                  (self.backbone_type in BACKBONE_TYPES, 'backbone_type', f'one of {BACKBONE_TYPES}'),
                  (self.positional_embedding_type in POSITIONAL_EMBEDDING_TYPES, 'positional_embedding_type',
                   f'one of {POSITIONAL_EMBEDDING_TYPES}'),
                  (self.hyper_layers in HYPER_LAYERS, 'hyper_layers', f'one of {HYPER_LAYERS}'),
                  (self.backbone_type != 'none' or self.positional_embedding_type == 'none',
                   'positional_embedding_type', "'none' when backbone_type is 'none' (no feature map to embed)"),
                  (self.heads >= 1 and self.d_input % self.heads == 0, 'heads',
                   f'a positive divisor of d_input={self.d_input}'),
                  (self.synapse_depth >= 1, 'synapse_depth', '>= 1'),
                  (self.iterations >= 1, 'iterations', '>= 1'), (self.memory_length >= 1, 'memory_length', '>= 1'),
                  (not self.deep_nlms or self.memory_hidden_dims >= 1, 'memory_hidden_dims', '>= 1 with deep_nlms'),
                  (self.hyper_rank >= 1, 'hyper_rank', '>= 1'), (self.hyper_nlm_rank >= 1, 'hyper_nlm_rank', '>= 1'),
                  (1 <= self.n_synch_out <= self.d_model, 'n_synch_out', f'between 1 and d_model={self.d_model}'),
                  (1 <= self.n_synch_action <= self.d_model, 'n_synch_action', f'between 1 and d_model={self.d_model}'),
                  (self.neuron_select_type != 'first-last' or self.n_synch_out + self.n_synch_action <= self.d_model,
                   'n_synch_action', f'<= d_model - n_synch_out = {self.d_model - self.n_synch_out} for first-last '
                   '(disjoint neuron subsets)'),
                  (self.neuron_select_type != 'random-pairing' or 0 <= self.n_random_pairing_self < n_synch,
                   'n_random_pairing_self', 'in [0, min(n_synch_out, n_synch_action))')]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f'CTMConfig.{name}: expected {expected}, got {getattr(self, name)!r}')


# ================================================================================================================
# building blocks: linear, layer norm, GLU, attention, SuperLinear, conv, batch norm


def uniform(gen, shape, bound):
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def init_linear(gen, d_in, d_out, bias=True):
    """PyTorch's nn.Linear init: weight and bias uniform in ±1/sqrt(d_in)."""
    p = {'weight': uniform(gen, (d_out, d_in), 1 / math.sqrt(d_in))}
    if bias:
        p['bias'] = uniform(gen, (d_out,), 1 / math.sqrt(d_in))
    return p


def linear(p, x):
    return F.linear(x, p['weight'], p.get('bias'))


def init_layer_norm(d):
    return {'weight': torch.ones(d), 'bias': torch.zeros(d)}


def layer_norm(p, x):
    return F.layer_norm(x, p['weight'].shape, p['weight'], p['bias'])


def glu(x, dim=-1):
    a, gate = x.chunk(2, dim=dim)
    return a * torch.sigmoid(gate)


def dropout(x, rate, train):
    """Randomness comes from torch's global RNG (seeded by train.make_generator), as nn.Dropout's does."""
    return F.dropout(x, rate, training=True) if train and rate > 0 else x


def init_attention(gen, d, heads):
    """nn.MultiheadAttention's init: packed q/k/v in-projection xavier-uniform, zero biases, out-projection as a
    Linear with zero bias."""
    out = init_linear(gen, d, d)
    out['bias'] = torch.zeros(d)
    in_proj = {'weight': uniform(gen, (3 * d, d), math.sqrt(6 / (d + 3 * d))), 'bias': torch.zeros(3 * d)}
    return {'in_proj': in_proj, 'out': out}


def attention_keys_values(p, kv, heads):
    """kv (B, S, d) -> keys, values (B, heads, S, d / heads). The CTM's features are fixed over its ticks, so it
    projects them once per input rather than once per tick (the original re-projects them every tick)."""
    d = kv.shape[-1]
    keys, values = F.linear(kv, p['in_proj']['weight'][d:], p['in_proj']['bias'][d:]).chunk(2, dim=-1)
    split = lambda t: rearrange(t, 'b s (h e) -> b h s e', h=heads)
    return split(keys), split(values)


def attention(p, q, keys_values, heads, rate=0.0, train=False, need_weights=False):
    """Multi-head attention of a query (B, Lq, d) over attention_keys_values' (keys, values) -> (B, Lq, d); with
    need_weights also each head's attention weights (B, heads, Lq, S), before dropout as nn.MultiheadAttention's."""
    d = q.shape[-1]
    query = rearrange(F.linear(q, p['in_proj']['weight'][:d], p['in_proj']['bias'][:d]), 'b l (h e) -> b h l e', h=heads)
    if need_weights:  # the weights spelled out: scaled_dot_product_attention does not return them
        keys, values = keys_values
        weights = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1]), dim=-1)
        out = dropout(weights, rate, train) @ values
    else:
        out = F.scaled_dot_product_attention(query, *keys_values, dropout_p=rate if train else 0.0)
    out = linear(p['out'], rearrange(out, 'b h l e -> b l (h e)'))
    return (out, weights) if need_weights else out


def init_super_linear(gen, in_dims, out_dims, n, do_norm=False):
    """N private linears (one per neuron), as the original SuperLinear: w1 (in, out, N) uniform in
    ±1/sqrt(in + out), b1 zeros, a learned output temperature T starting at 1. The keys keep the original's
    names (w1, b1, T), not 'weight'/'bias': w1 is (in, out, N), not a Linear's (out, in)."""
    p = {'w1': uniform(gen, (in_dims, out_dims, n), 1 / math.sqrt(in_dims + out_dims)),
         'b1': torch.zeros(1, n, out_dims), 'T': torch.ones(1)}
    if do_norm:
        p['ln'] = init_layer_norm(in_dims)
    return p


def super_linear(p, x, rate=0.0, train=False):
    """x (B, N, in) -> (B, N, out): neuron n applies its own weights w1[:, :, n] to its own history x[:, n]."""
    x = dropout(x, rate, train)
    if 'ln' in p:
        x = layer_norm(p['ln'], x)
    return (torch.einsum('bdm,mhd->bdh', x, p['w1']) + p['b1']) / p['T']


def init_conv(gen, c_in, c_out, k, bias=False, groups=1):
    """nn.Conv2d's init: uniform in ±1/sqrt(fan_in); `groups` splits the channels into independent convolutions."""
    bound = 1 / math.sqrt(c_in // groups * k * k)
    p = {'weight': uniform(gen, (c_out, c_in // groups, k, k), bound)}
    if bias:
        p['bias'] = uniform(gen, (c_out,), bound)
    return p


def conv(p, x, stride=1):
    """'Same' padding; the groups follow from the weight's input channels."""
    return F.conv2d(x, p['weight'], p.get('bias'), stride=stride, padding=p['weight'].shape[-1] // 2,
                    groups=x.shape[1] // p['weight'].shape[1])


def init_batch_norm(c):
    """(params, buffers): learned scale/shift, and the running statistics that are not learned."""
    return {'weight': torch.ones(c), 'bias': torch.zeros(c)}, {'mean': torch.zeros(c), 'var': torch.ones(c)}


def batch_norm(p, buf, x, train, momentum=0.1, eps=1e-5):
    """x (B, C, H, W) -> (y, new running stats). Training normalises with the batch statistics and returns the
    updated running stats (unbiased variance, as nn.BatchNorm2d) instead of writing them in place."""
    if not train:
        return F.batch_norm(x, buf['mean'], buf['var'], p['weight'], p['bias'], False, 0.0, eps), buf
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    n = x.numel() // x.shape[1]
    y = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + eps) * p['weight'][:, None, None] \
        + p['bias'][:, None, None]
    new = {'mean': (1 - momentum) * buf['mean'] + momentum * mean.detach(),
           'var': (1 - momentum) * buf['var'] + momentum * var.detach() * n / max(n - 1, 1)}
    return y, new


# ================================================================================================================
# plastic hypernetworks: HyperLoRALinear, HyperSuperLinear
#
# A plastic layer's weight follows the thought: W_t = W_base + gate(c) * U(c) V(c)^T with c = φ(context). φ, the
# context compressor, is Linear -> LayerNorm -> SiLU (the seeds: "a single-layer MLP with Layer Normalization";
# they do not name the activation, SiLU is the one the synapse U-Net already uses). Three heads read c, each a
# Linear: head_u gives U, head_v gives V, head_gate the gate. The product is never formed: y = x W^T + b + gate *
# scale * U (V^T x) costs O(In·Out + r(In + Out)).
#
# At init head_gate is all zeros, so gate = tanh(0) = 0 and every hyper configuration is exactly the plain CTM. The
# seeds state no init; we zero the gate rather than the U/V heads because the gate is the knob the NLM seed gives
# each neuron ("some neurons plastic, others fixed": all start fixed), and with U, V already random the gate's own
# gradient is non-zero from the first step (zero U/V heads and a zero gate together would never move). tanh keeps
# |gate| <= 1, and scale = 1/sqrt(In·r) keeps gate·U V^T x on the scale of W x: U and V come out of the heads with
# O(1) entries, so their product would otherwise grow like sqrt(In·r) and swamp the base layer.
#
# A hyper layer's dict is the plain layer's dict plus a 'hyper' subtree: the same tree without 'hyper' is the
# plain CTM's parameters, and code that reads only 'weight'/'bias' (or 'w1'/'b1'/'T') sees the base layer.

HYPER_CTX_HIDDEN = 16  # synapse compressor width: the seeds give none; see init_hyper_lora_linear
HYPER_NLM_CTX_HIDDEN = 128  # the NLM seed's "Context net: 1024 -> 128"
HYPER_HEADS = ('head_u', 'head_v', 'head_gate')


def init_hypernet(gen, ctx_dims, hidden, u_rows, v_rows, rank, n_gates):
    """{'compressor': φ (ctx_dims -> hidden), 'head_u': Linear(hidden -> u_rows·rank), 'head_v': Linear(hidden ->
    v_rows·rank), 'head_gate': Linear(hidden -> n_gates), all zeros}."""
    if rank < 1:
        raise ValueError(f"rank: expected a positive hyper rank, got {rank}")
    return {'compressor': {'lin': init_linear(gen, ctx_dims, hidden), 'ln': init_layer_norm(hidden)},
            'head_u': init_linear(gen, hidden, u_rows * rank), 'head_v': init_linear(gen, hidden, v_rows * rank),
            'head_gate': {'weight': torch.zeros(n_gates, hidden), 'bias': torch.zeros(n_gates)}}


def hypernet(h, ctx, u_rows, v_rows):
    """ctx (B, ctx_dims) -> U (B, u_rows, r), V (B, v_rows, r), gate (B, n_gates) in [-1, 1]."""
    ctx_dims = h['compressor']['lin']['weight'].shape[1]
    if ctx.dim() != 2 or ctx.shape[1] != ctx_dims:
        raise ValueError(f"ctx: expected a context of shape (B, {ctx_dims}), got {tuple(ctx.shape)}")
    c = F.silu(layer_norm(h['compressor']['ln'], linear(h['compressor']['lin'], ctx)))  # (B, hidden)
    u = linear(h['head_u'], c).unflatten(1, (u_rows, -1))
    v = linear(h['head_v'], c).unflatten(1, (v_rows, -1))
    return u, v, torch.tanh(linear(h['head_gate'], c))


def init_hyper_lora_linear(gen, in_dims, out_dims, rank, ctx_dims, hidden=HYPER_CTX_HIDDEN):
    """HyperLoRALinear: init_linear's 'weight' (Out, In) and 'bias', plus its own hypernetwork under 'hyper'.

    hidden=16, the U-Net's narrowest width, gives 88,962 added parameters for hyper_layers='bottleneck' at
    d_model=1024, d_input=256, depth 8, rank 8 against the seeds' ≈100K, the one synapse figure of theirs that
    pins the width down (`python train.py ctm --preset mazes-small --count_params` prints them all)."""
    return {**init_linear(gen, in_dims, out_dims),
            'hyper': init_hypernet(gen, ctx_dims, hidden, out_dims, in_dims, rank, 1)}


def lora_scale(in_dims, rank):
    """The low-rank update's scale 1/sqrt(In·r), which keeps its size independent of In and r."""
    return (in_dims * rank) ** -0.5


def lora(p, x, u, v, gate):
    """x (B, In) -> x W^T + b + gate·scale·U (V^T x) (B, Out), scale = 1/sqrt(In·r), never forming U V^T."""
    delta = torch.bmm(torch.bmm(x[:, None], v), u.transpose(1, 2)).squeeze(1)  # (B, Out): U (V^T x)
    return torch.addcmul(linear(p, x), gate, delta, value=lora_scale(x.shape[1], u.shape[-1]))


def hyper_lora_linear(p, x, ctx):
    """x (B, In), ctx (B, ctx_dims) -> x W_t^T + b (B, Out), W_t = W + gate·scale·U V^T, never forming W_t."""
    out_dims, in_dims = p['weight'].shape
    if x.dim() != 2 or x.shape[1] != in_dims or x.shape[0] != ctx.shape[0]:
        raise ValueError(f"x: expected (B, {in_dims}) with the context's B = {ctx.shape[0]}, got {tuple(x.shape)}")
    return lora(p, x, *hypernet(p['hyper'], ctx, out_dims, in_dims))


def hyper_lora_dense_weight(p, ctx):
    """W_t = W + gate·scale·U V^T as a dense (B, Out, In) tensor, for teaching and tests (never in a forward)."""
    out_dims, in_dims = p['weight'].shape
    u, v, gate = hypernet(p['hyper'], ctx, out_dims, in_dims)
    return p['weight'] + gate[:, :, None] * torch.einsum('bor,bir->boi', u, v) * lora_scale(in_dims, u.shape[-1])


def plastic_linear(p, x, ctx):
    """A Linear that is plastic (a HyperLoRALinear reading ctx) when its dict carries a hypernetwork."""
    return hyper_lora_linear(p, x, ctx) if 'hyper' in p else linear(p, x)


def init_hyper_super_linear(gen, in_dims, out_dims, n, rank, ctx_dims, do_norm=False, hidden=HYPER_NLM_CTX_HIDDEN):
    """HyperSuperLinear: init_super_linear's keys plus ONE hypernetwork for all n neurons, U (In·r) and V (Out·r)
    shared and a gate per neuron: one φ however many neurons, as the NLM seed designs it."""
    return {**init_super_linear(gen, in_dims, out_dims, n, do_norm),
            'hyper': init_hypernet(gen, ctx_dims, hidden, in_dims, out_dims, rank, n)}


def hyper_super_linear(p, trace, ctx, rate=0.0, train=False):
    """trace (B, N, In), ctx (B, ctx_dims) -> (B, N, Out): super_linear with neuron d's weight
    W_d + gate_d·scale·U V^T (In, Out), never formed."""
    in_dims, out_dims, n = p['w1'].shape
    if trace.dim() != 3 or trace.shape[1:] != (n, in_dims) or trace.shape[0] != ctx.shape[0]:
        raise ValueError(f"trace: expected (B, {n}, {in_dims}) with the context's B = {ctx.shape[0]}, "
                         f"got {tuple(trace.shape)}")
    x = dropout(trace, rate, train)  # once, so that the base and plastic paths see the same dropout mask
    if 'ln' in p:
        x = layer_norm(p['ln'], x)
    u, v, gate = hypernet(p['hyper'], ctx, in_dims, out_dims)
    delta = torch.bmm(torch.bmm(x, u), v.transpose(1, 2))  # (B, N, Out): (x U) V^T for every neuron at once
    # x is already dropped out and normalised: the base path is super_linear without its dropout and 'ln'
    return torch.addcmul(super_linear({k: p[k] for k in ('w1', 'b1', 'T')}, x), delta, (gate / p['T'])[:, :, None],
                         value=lora_scale(in_dims, u.shape[-1]))


def hyper_super_linear_dense_weight(p, ctx):
    """Every neuron's W_d + gate_d·scale·U V^T as a dense (B, In, Out, N) tensor, w1's layout (tests, teaching)."""
    in_dims, out_dims, n = p['w1'].shape
    u, v, gate = hypernet(p['hyper'], ctx, in_dims, out_dims)
    return (p['w1'] + gate[:, None, None, :] * torch.einsum('bmr,bhr->bmh', u, v)[..., None]
            * lora_scale(in_dims, u.shape[-1]))


def plastic_super_linear(p, x, ctx, rate=0.0, train=False):
    """A SuperLinear that is plastic when its dict carries a hypernetwork (the NLM's last SuperLinear)."""
    return hyper_super_linear(p, x, ctx, rate, train) if 'hyper' in p else super_linear(p, x, rate, train)


# ================================================================================================================
# synapses (SynapseUNET / HyperSynapseUNET), neuron-level models, synchronisation, certainty, backbones,
# positional embeddings


def synapse_widths(d_model, depth, minimum_width=16):
    """The U-Net's widths, as the original: `depth` points of linspace(d_model, 16), truncated to ints."""
    return [int(w) for w in np.linspace(d_model, minimum_width, depth)]


def init_synapse_unet(gen, d_in, d_model, depth, hyper_layers='none', hyper_rank=8):
    """SynapseUNET (depth > 1): first projection d_in -> widths[0], depth-1 down blocks, mirrored up blocks with
    skip connections. depth == 1 is the original's Dropout -> Linear(d_in -> 2 d_model) -> GLU -> LayerNorm.

    HyperSynapseUNET: `hyper_layers` makes Linears HyperLoRALinear, each with its own hypernetwork reading the
    pre_synapse_input: 'bottleneck' the two into and out of the narrowest level, 'down'/'up' every down/up Linear,
    'all' both and the first projection (at depth 1, the only Linear: 'all' or 'none')."""
    if depth == 1 and hyper_layers not in ('none', 'all'):
        raise ValueError(f"hyper_layers: synapse_depth 1 has no down/up Linears, expected 'none' or 'all', "
                         f"got {hyper_layers!r}")
    lin = lambda a, b, hyper: (init_hyper_lora_linear(gen, a, b, hyper_rank, d_in) if hyper
                               else init_linear(gen, a, b))
    if depth == 1:
        return {'first': {'lin': lin(d_in, 2 * d_model, hyper_layers == 'all'), 'ln': init_layer_norm(d_model)}}
    widths = synapse_widths(d_model, depth)
    level = lambda a, b, hyper: {'lin': lin(a, b, hyper), 'ln': init_layer_norm(b)}
    hyper = lambda way, i: hyper_layers in (way, 'all') or (hyper_layers == 'bottleneck' and i == depth - 2)
    return {'first': level(d_in, widths[0], hyper_layers == 'all'),
            'down': [level(widths[i], widths[i + 1], hyper('down', i)) for i in range(depth - 1)],
            'up': [level(widths[i + 1], widths[i], hyper('up', i)) for i in range(depth - 1)],
            'skip_ln': [init_layer_norm(widths[i]) for i in range(depth - 1)]}


def synapse_unet(p, x, rate=0.0, train=False, layer=None, norm=None):
    """pre_synapse_input x (B, d_input + d_model) -> state (B, d_model).

    Every Linear is plastic_linear(q, h, x): a HyperLoRALinear applies W_t = W + gate·U(c)V(c)^T with its own
    hypernetwork reading c = x, the pre_synapse_input. `layer(name, q, h)` and `norm(name, q, h)`, if given, apply
    Linear `name` ('first', 'down.i', 'up.i') and LayerNorm `name` ('first.ln', 'down.i.ln', 'up.i.ln', 'skip_ln.i')
    instead: the fast paths after the model (synapse_unet_stacked, ctm_think_fast)."""
    layer = layer or (lambda name, q, h: plastic_linear(q, h, x))
    norm = norm or (lambda name, q, h: layer_norm(q, h))
    if 'down' not in p:
        return norm('first.ln', p['first']['ln'], glu(layer('first', p['first']['lin'], dropout(x, rate, train))))
    outs_down = [F.silu(norm('first.ln', p['first']['ln'], layer('first', p['first']['lin'], x)))]
    for i, block in enumerate(p['down']):
        h = layer(f'down.{i}', block['lin'], dropout(outs_down[-1], rate, train))
        outs_down.append(F.silu(norm(f'down.{i}.ln', block['ln'], h)))
    out = outs_down[-1]
    for i in reversed(range(len(p['up']))):
        block = p['up'][i]
        up = F.silu(norm(f'up.{i}.ln', block['ln'], layer(f'up.{i}', block['lin'], dropout(out, rate, train))))
        out = norm(f'skip_ln.{i}', p['skip_ln'][i], up + outs_down[i])
    return out


def init_nlm(gen, cfg):
    """Neuron-level models: deep = SuperLinear(M -> 2H) -> GLU -> SuperLinear(H -> 2) -> GLU; shallow =
    SuperLinear(M -> 2) -> GLU. Each of the d_model neurons has its own weights. With use_hyper_nlm the last
    SuperLinear is a HyperSuperLinear read by the activated state (the deep NLM's first stays fixed, as the seed)."""
    last = lambda a: (init_hyper_super_linear(gen, a, 2, cfg.d_model, cfg.hyper_nlm_rank, cfg.d_model,
                                              cfg.do_layernorm_nlm) if cfg.use_hyper_nlm
                      else init_super_linear(gen, a, 2, cfg.d_model, cfg.do_layernorm_nlm))
    if cfg.deep_nlms:
        return {'l1': init_super_linear(gen, cfg.memory_length, 2 * cfg.memory_hidden_dims, cfg.d_model,
                                        cfg.do_layernorm_nlm),
                'l2': last(cfg.memory_hidden_dims)}
    return {'l1': last(cfg.memory_length)}


def nlm(p, trace, activated_state, cfg, train=False):
    """trace (B, d_model, M) -> new activated_state (B, d_model). `activated_state` (the previous one) is unused by
    the plain CTM; the plastic NLM reads it as the hypernetwork's context."""
    rate = cfg.dropout if cfg.dropout_nlm is None else cfg.dropout_nlm
    h = glu(plastic_super_linear(p['l1'], trace, activated_state, rate, train))
    if 'l2' in p:
        h = glu(plastic_super_linear(p['l2'], h, activated_state, rate, train))
    return h.squeeze(-1)


def synch_size(n_synch, select_type):
    return n_synch if select_type == 'random-pairing' else n_synch * (n_synch + 1) // 2


def init_synch_pairs(gen, d_model, n_synch, select_type, which, n_self=0):
    """The fixed neuron pairs (left[k], right[k]) whose product feeds synchronisation entry k.

    first-last: out uses the first n neurons, action the last n, all pairs i <= j (triu); random: two random
    subsets (with replacement, as np.random.choice in the original), all pairs i <= j of the dense outer product;
    random-pairing: n random pairs, the first n_self of them a neuron with itself."""
    if select_type == 'first-last':
        left = right = torch.arange(n_synch) if which == 'out' else torch.arange(d_model - n_synch, d_model)
    else:
        left = torch.randint(0, d_model, (n_synch,), generator=gen)
        right = torch.randint(0, d_model, (n_synch,), generator=gen)
    if select_type == 'random-pairing':
        return left, torch.cat([left[:n_self], right[n_self:]])
    i, j = torch.triu_indices(n_synch, n_synch)
    return left[i], right[j]


def synchronisation(activated_state, alpha, beta, r, left, right):
    """One step of the decayed synchronisation recursion; alpha=None starts it.

    With z_t the activated state at step t: alpha_t = r alpha_{t-1} + z_t[left] z_t[right], beta_t = r beta_{t-1} + 1,
    sync_t = alpha_t / sqrt(beta_t), i.e. a decay-weighted inner product of the two neurons' histories."""
    pairwise = activated_state[:, left] * activated_state[:, right]  # (B, synch size)
    if alpha is None:
        alpha, beta = pairwise, torch.ones_like(pairwise)
    else:
        alpha, beta = r * alpha + pairwise, r * beta + 1
    return alpha / torch.sqrt(beta), alpha, beta


def certainty(prediction, prediction_reshaper):
    """prediction (B, out_dims) -> (B, 2) = [normalised entropy, 1 - normalised entropy]; the entropy is taken over
    the last axis of the reshaped prediction (e.g. the 5 moves of each route step) and averaged over the rest."""
    logits = prediction.reshape(prediction.shape[0], *prediction_reshaper)
    logp = torch.log_softmax(logits, dim=-1)
    ne = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    ne = ne.flatten(1).mean(-1) if ne.dim() > 1 else ne
    return torch.stack([ne, 1 - ne], dim=-1)


# Blocks per stage. resnet152 is (3, 4, 36, 3) in the original's models/resnet.py (torchvision's has 8 blocks in its
# second stage): we build the original's, so that parameter counts and checkpoints carry over.
RESNET_BLOCKS = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3),
                 'resnet101': (3, 4, 23, 3), 'resnet152': (3, 4, 36, 3)}
BOTTLENECK_FAMILIES = ('resnet50', 'resnet101', 'resnet152')  # bottleneck blocks, 4x wider outputs
SHALLOW_WIDE_CHANNELS = 2048


def resnet_stride(stage, block):
    """Every stage after the first halves the resolution in its first block."""
    return 2 if stage > 0 and block == 0 else 1


def resnet_expansion(family):
    return 4 if family in BOTTLENECK_FAMILIES else 1


def d_backbone(cfg):
    """Channels of the backbone's feature map (the original's get_d_backbone)."""
    if cfg.backbone_type.startswith('resnet'):
        family, n_stages = cfg.backbone_type.split('-')
        return 64 * 2 ** (int(n_stages) - 1) * resnet_expansion(family)
    if cfg.backbone_type == 'shallow-wide':
        return SHALLOW_WIDE_CHANNELS
    return cfg.in_channels if cfg.backbone_type == 'none' else cfg.d_input


def init_resnet_block(gen, c_in, planes, stride, bottleneck):
    """(params, buffers) of a BasicBlock (conv1 3x3 -> conv2 3x3, `planes` out) or a Bottleneck (conv1 1x1 to planes
    -> conv2 3x3 -> conv3 1x1 to 4·planes), the original's (torchvision's) names: bias-free convs, each followed by
    its batch norm bnK, and 'down' (1x1 conv + batch norm) on the skip path when the shape changes."""
    c_out = planes * (4 if bottleneck else 1)
    shapes = [(c_in, planes, 1), (planes, planes, 3), (planes, c_out, 1)] if bottleneck else [(c_in, planes, 3),
                                                                                             (planes, planes, 3)]
    p, buf = {}, {}
    for k, (a, b, size) in enumerate(shapes, 1):
        p[f'conv{k}'] = init_conv(gen, a, b, size)
        p[f'bn{k}'], buf[f'bn{k}'] = init_batch_norm(b)
    if stride != 1 or c_in != c_out:
        bn_p, buf['down'] = init_batch_norm(c_out)
        p['down'] = {'conv': init_conv(gen, c_in, c_out, 1), 'bn': bn_p}
    return p, buf


def resnet_block(p, buf, x, stride, train):
    """BasicBlock or Bottleneck (whichever p holds) -> (relu(branch + skip), new batch-norm buffers). The stride sits
    on the 3x3 conv (conv1 of a BasicBlock, conv2 of a Bottleneck, as torchvision's v1.5) and on 'down'."""
    n = 3 if 'conv3' in p else 2
    new, out = {}, x
    for k in range(1, n + 1):
        step = stride if k == n - 1 else 1
        out, new[f'bn{k}'] = batch_norm(p[f'bn{k}'], buf[f'bn{k}'], conv(p[f'conv{k}'], out, step), train)
        out = F.relu(out) if k < n else out
    identity = x
    if 'down' in p:
        identity, new['down'] = batch_norm(p['down']['bn'], buf['down'], conv(p['down']['conv'], x, stride), train)
    return F.relu(out + identity), new


def init_backbone(gen, cfg):
    """(params, buffers) of the feature extractor.

    resnetNN-k: the original's truncated ResNet (models/resnet.py): a 1x1 conv to 3 channels (its `initial_rgb`),
    a 3x3 stride-1 stem (not 7x7: a small receptive field makes the CTM look around), max-pool, then the first k
    stages (stride 2 from stage 2 on) of BasicBlocks (18, 34) or Bottlenecks (50, 101, 152). conv: the original's
    small MNISTBackbone, two conv3x3 -> BN -> ReLU -> maxpool stages of d_input channels. shallow-wide: the
    original's ShallowWide, conv3x3 stride 2 to 4096 -> GLU over channels -> BN, grouped (32) conv3x3 to 4096 ->
    GLU -> BN: 2048 channels at half resolution. parity_backbone: an embedding of the two signs."""
    kind = cfg.backbone_type
    if kind == 'none':
        return {}, {}
    if kind == 'parity_backbone':
        return {'embedding': torch.randn(2, cfg.d_input, generator=gen)}, {}
    if kind in ('conv', 'shallow-wide'):
        c = SHALLOW_WIDE_CHANNELS
        stages = ([(cfg.in_channels, cfg.d_input, 1), (cfg.d_input, cfg.d_input, 1)] if kind == 'conv'
                  else [(cfg.in_channels, 2 * c, 1), (c, 2 * c, 32)])
        bns = [init_batch_norm(b // (1 if kind == 'conv' else 2)) for _, b, _ in stages]
        return ({'stages': [{'conv': init_conv(gen, a, b, 3, bias=True, groups=g), 'bn': bn[0]}
                            for (a, b, g), bn in zip(stages, bns)]}, {'stages': [{'bn': bn[1]} for bn in bns]})
    family, n_stages = kind.split('-')
    bn1 = init_batch_norm(64)
    params = {'rgb': init_conv(gen, cfg.in_channels, 3, 1, bias=True), 'conv1': init_conv(gen, 3, 64, 3),
              'bn1': bn1[0], 'stages': []}
    buffers = {'bn1': bn1[1], 'stages': []}
    c_in, expansion = 64, resnet_expansion(family)
    for s in range(int(n_stages)):
        planes = 64 * 2 ** s
        made = [init_resnet_block(gen, c_in if b == 0 else planes * expansion, planes, resnet_stride(s, b),
                                  expansion == 4) for b in range(RESNET_BLOCKS[family][s])]
        params['stages'].append([m[0] for m in made])
        buffers['stages'].append([m[1] for m in made])
        c_in = planes * expansion
    return params, buffers


def backbone(p, buf, x, cfg, train=False):
    """x -> (feature map (B, C, ...) channels first, updated buffers)."""
    kind = cfg.backbone_type
    if kind == 'none':
        return x, buf
    if kind == 'parity_backbone':
        return rearrange(p['embedding'][(x == 1).long()], 'b l c -> b c l'), buf
    if kind in ('conv', 'shallow-wide'):
        new = {'stages': []}
        for sp, sb, stride in zip(p['stages'], buf['stages'], (1, 1) if kind == 'conv' else (2, 1)):
            h = conv(sp['conv'], x, stride)
            x, bn = batch_norm(sp['bn'], sb['bn'], glu(h, dim=1) if kind == 'shallow-wide' else h, train)
            if kind == 'conv':
                x = F.max_pool2d(F.relu(x), 2, 2)
            new['stages'].append({'bn': bn})
        return x, new
    x, bn1 = batch_norm(p['bn1'], buf['bn1'], conv(p['conv1'], conv(p['rgb'], x)), train)
    x = F.max_pool2d(F.relu(x), 3, 2, 1)
    new = {'bn1': bn1, 'stages': []}
    for s, (stage_p, stage_b) in enumerate(zip(p['stages'], buf['stages'])):
        new_stage = []
        for b, (bp, bb) in enumerate(zip(stage_p, stage_b)):
            x, nb = resnet_block(bp, bb, x, resnet_stride(s, b), train)
            new_stage.append(nb)
        new['stages'].append(new_stage)
    return x, new


MULTI_FOURIER_GAMMAS = tuple(np.linspace(1.0, 0.1, 10).tolist())  # the original's gamma_range [1.0, 0.1], N = 10


def init_fourier_embedding(gen, d, gamma):
    """Li et al. 2021, Algorithm 1: Wr ~ N(0, gamma^-2) (F/2 = 128 frequencies of the 2 coordinates), then
    Linear(F = 256 -> H = 128) -> GLU -> Linear(64 -> d) -> LayerNorm."""
    return {'Wr': torch.randn(128, 2, generator=gen) * gamma ** -2, 'l1': init_linear(gen, 256, 128),
            'l2': init_linear(gen, 64, d), 'ln': init_layer_norm(d)}


def fourier_embedding(p, h, w, device, dtype):
    """-> (h, w, d): the learned Fourier features of every position's (x, y), both scaled into [0, 1]."""
    ys = torch.arange(h, device=device, dtype=dtype) / max(h - 1, 1)
    xs = torch.arange(w, device=device, dtype=dtype) / max(w - 1, 1)
    coords = torch.stack([xs[None].expand(h, w), ys[:, None].expand(h, w)], -1)  # (H, W, 2) as (x, y)
    projected = coords @ p['Wr'].t()
    fourier = torch.cat([torch.cos(projected), torch.sin(projected)], -1) / math.sqrt(256)
    return layer_norm(p['ln'], linear(p['l2'], glu(linear(p['l1'], fourier))))


def init_positional_embedding(gen, kind, d):
    """learnable-fourier: one Fourier embedding, gamma = 1/2.5; multi-learnable-fourier: ten, gamma from 1.0 down to
    0.1 (low to high frequencies), mixed by softmax(combination), a learned weight per embedding starting equal;
    custom-rotational(-1d): a fixed rotating 2-vector per position, projected by a Linear (the 2D one learns the
    start vector)."""
    if kind == 'learnable-fourier':
        return init_fourier_embedding(gen, d, 1 / 2.5)
    if kind == 'multi-learnable-fourier':
        return {'embedders': [init_fourier_embedding(gen, d, g) for g in MULTI_FOURIER_GAMMAS],
                'combination': torch.ones(len(MULTI_FOURIER_GAMMAS))}
    if kind == 'custom-rotational':
        return {'start_vector': torch.tensor([0.0, 1.0]), 'proj': init_linear(gen, 4, d)}
    if kind == 'custom-rotational-1d':
        return {'proj': init_linear(gen, 2, d)}
    return {}


def rotate(start_vector, n, device):
    """start_vector rotated by n angles from 0 to 180 degrees -> (n, 2)."""
    theta = torch.deg2rad(torch.linspace(0, 180, n, device=device))
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([c * start_vector[0] - s * start_vector[1], s * start_vector[0] + c * start_vector[1]], -1)


def positional_embedding(p, kind, features):
    """features (B, C, H, W) or (B, C, L) -> an embedding that broadcasts against them (or 0 for 'none')."""
    if kind == 'none':
        return 0
    if kind == 'custom-rotational-1d':
        pe = linear(p['proj'], rotate(torch.tensor([0.0, 1.0]), features.shape[-1], features.device))  # (L, C)
        return pe.t()[None]
    h, w = features.shape[-2:]
    if kind == 'custom-rotational':
        # The original rotates along the width only and builds a (W, W) grid; rows here use their own height.
        rows = rotate(p['start_vector'], h, features.device)
        cols = rotate(p['start_vector'], w, features.device)
        key = torch.cat([rows[:, None].expand(h, w, 2), cols[None].expand(h, w, 2)], -1)  # (H, W, 4)
        return rearrange(linear(p['proj'], key), 'h w c -> c h w')[None]
    if kind == 'learnable-fourier':
        y = fourier_embedding(p, h, w, features.device, features.dtype)
    else:
        ys = torch.stack([fourier_embedding(q, h, w, features.device, features.dtype) for q in p['embedders']])
        y = torch.einsum('n,nhwc->hwc', torch.softmax(p['combination'], 0), ys)
    return rearrange(y, 'h w c -> c h w')[None]


# ================================================================================================================
# the (Hyper) Continuous Thought Machine


def init_ctm(cfg, gen):
    """-> (params, buffers). Buffers hold what is not learned: the neuron pairs of both synchronisations and the
    backbone's batch-norm running statistics."""
    synch_out = synch_size(cfg.n_synch_out, cfg.neuron_select_type)
    synch_action = synch_size(cfg.n_synch_action, cfg.neuron_select_type)
    backbone_p, backbone_b = init_backbone(gen, cfg)
    d_feat = d_backbone(cfg)
    params = {
        'backbone': backbone_p,
        'positional_embedding': init_positional_embedding(gen, cfg.positional_embedding_type, d_feat),
        'kv_proj': {'lin': init_linear(gen, d_feat, cfg.d_input), 'ln': init_layer_norm(cfg.d_input)},
        'q_proj': init_linear(gen, synch_action, cfg.d_input),
        'attention': init_attention(gen, cfg.d_input, cfg.heads),
        'synapses': init_synapse_unet(gen, cfg.d_input + cfg.d_model, cfg.d_model, cfg.synapse_depth,
                                      cfg.hyper_layers, cfg.hyper_rank),
        'nlm': init_nlm(gen, cfg),
        'start_activated_state': uniform(gen, (cfg.d_model,), math.sqrt(1 / cfg.d_model)),
        'start_trace': uniform(gen, (cfg.d_model, cfg.memory_length), math.sqrt(1 / (cfg.d_model + cfg.memory_length))),
        'decay_params_action': torch.zeros(synch_action),
        'decay_params_out': torch.zeros(synch_out),
        'output_projector': init_linear(gen, synch_out, cfg.out_dims),
    }
    buffers = {'backbone': backbone_b}
    for which, n in (('action', cfg.n_synch_action), ('out', cfg.n_synch_out)):
        left, right = init_synch_pairs(gen, cfg.d_model, n, cfg.neuron_select_type, which, cfg.n_random_pairing_self)
        buffers[f'{which}_left'], buffers[f'{which}_right'] = left, right
    return params, buffers


def ctm_features(params, buffers, x, cfg, train=False):
    """x -> (kv (B, S, d_input), updated buffers): backbone, positional embedding, kv projection."""
    features, new_backbone = backbone(params['backbone'], buffers['backbone'], x, cfg, train)
    features = features + positional_embedding(params['positional_embedding'], cfg.positional_embedding_type,
                                               features)
    kv = layer_norm(params['kv_proj']['ln'], linear(params['kv_proj']['lin'], features.flatten(2).transpose(1, 2)))
    return kv, {**buffers, 'backbone': new_backbone}


def ctm_think(params, buffers, kv, cfg, train=False, stacked=False, track=False):
    """The internal ticks over fixed features kv -> (predictions (B, out_dims, T), certainties (B, 2, T), sync_out);
    with track=True a fourth output, the dict ctm_trace describes.

    decay_params are clamped to [0, 15] here, as a pure function; the original clamps the parameter in place every
    forward, which training reproduces by projecting it back into [0, 15] after each optimizer step. stacked=True
    runs the synapses on the fast path after the model (stack_hypernets, synapse_unet_stacked): the same function."""
    B = kv.shape[0]
    trace = params['start_trace'].expand(B, -1, -1)  # (B, D, M)
    activated_state = params['start_activated_state'].expand(B, -1)  # (B, D)
    r_action = torch.exp(-params['decay_params_action'].clamp(0, 15))
    r_out = torch.exp(-params['decay_params_out'].clamp(0, 15))
    pairs_action, pairs_out = (buffers['action_left'], buffers['action_right']), (buffers['out_left'],
                                                                                  buffers['out_right'])
    _, alpha_out, beta_out = synchronisation(activated_state, None, None, r_out, *pairs_out)
    alpha_action = beta_action = None
    keys_values = attention_keys_values(params['attention'], kv, cfg.heads)
    hypernets = stack_hypernets(params['synapses']) if stacked else None  # once per forward, like the keys
    predictions, certainties, tracked = [], [], []
    for _ in range(cfg.iterations):
        sync_action, alpha_action, beta_action = synchronisation(activated_state, alpha_action, beta_action,
                                                                 r_action, *pairs_action)
        q = linear(params['q_proj'], sync_action)[:, None]  # (B, 1, d_input)
        attn_out = attention(params['attention'], q, keys_values, cfg.heads, cfg.dropout, train, track)
        attn_out, weights = attn_out if track else (attn_out, None)
        pre_synapse_input = torch.cat([attn_out[:, 0], activated_state], dim=-1)  # (B, d_input + D)
        state = (synapse_unet_stacked(params['synapses'], hypernets, pre_synapse_input, cfg.dropout, train)
                 if stacked else synapse_unet(params['synapses'], pre_synapse_input, cfg.dropout, train))  # (B, D)
        trace = torch.cat([trace[..., 1:], state[..., None]], dim=-1)
        activated_state = nlm(params['nlm'], trace, activated_state, cfg, train)
        sync_out, alpha_out, beta_out = synchronisation(activated_state, alpha_out, beta_out, r_out, *pairs_out)
        prediction = linear(params['output_projector'], sync_out)  # (B, out_dims)
        predictions.append(prediction)
        certainties.append(certainty(prediction, cfg.prediction_reshaper))
        if track:
            tracked.append(dict(pre_activations=state, post_activations=activated_state, attention=weights[:, :, 0],
                                sync_action=sync_action, sync_out=sync_out))
    outputs = torch.stack(predictions, -1), torch.stack(certainties, -1), sync_out
    if not track:
        return outputs
    tracked = {k: torch.stack([t[k] for t in tracked]).detach() for k in tracked[0]}
    return (*outputs, dict(tracked, predictions=outputs[0].detach().permute(2, 0, 1),
                           certainties=outputs[1].detach().permute(2, 0, 1)))


def ctm_forward(params, buffers, x, cfg, train=False, stacked=False):
    """x -> (predictions (B, out_dims, T), certainties (B, 2, T), sync_out (B, synch size out)).

    Dropout (train=True) draws from torch's global RNG. Batch-norm running statistics are not updated here: a
    training step that wants them calls ctm_features (which returns the new buffers) and then ctm_think."""
    kv, _ = ctm_features(params, buffers, x, cfg, train)
    return ctm_think(params, buffers, kv, cfg, train, stacked)


def ctm_trace(params, buffers, x, cfg):
    """Watch the CTM think (the original's forward(track=True)), in eval mode -> a dict of per-tick (T, B, ...)
    tensors, detached: 'pre_activations' and 'post_activations' (T, B, d_model) (what the synapses produce, what
    the NLMs make of their trace), 'attention' (T, B, heads, S) over the S feature positions, 'sync_action' and
    'sync_out' (T, B, synch sizes), 'predictions' (T, B, out_dims) and 'certainties' (T, B, 2)."""
    kv, _ = ctm_features(params, buffers, x, cfg)
    return ctm_think(params, buffers, kv, cfg, track=True)[3]


# ================================================================================================================
# fast path: the synapse hypernetworks stacked (an optimisation of synapse_unet; ctm_think(stacked=True), which
# `train.py ctm --tick paper` uses on its captured CUDA path; the fused tick below stacks them too)
#
# A tick is launch-bound: each small matmul costs what a wide one does, in the forward and again in the backward
# (one gradient accumulation per tensor). Every hypernetwork of the U-Net reads the same pre_synapse_input, so they
# can run as one, the way torch.func.stack_module_state turns modules into stacked tensors: stack_hypernets builds
# the stacked tensors from the readable params (which stay the only ones stored and trained: it runs inside the
# forward, so gradients flow back through the stacking), synapse_unet_stacked applies them.


def synapse_hyper_layers(p):
    """{name: Linear dict} of HyperSynapseUNET's plastic Linears, named as synapse_unet's `layer` names them."""
    named = {'first': p['first']['lin'], **{f'{way}.{i}': block['lin'] for way in ('down', 'up')
                                             for i, block in enumerate(p.get(way, []))}}
    return {name: lin for name, lin in named.items() if 'hyper' in lin}


def stack_hypernets(p):
    """HyperSynapseUNET's hypernetworks as one (None without hyper layers): their φ Linears stacked row-wise into
    one Linear 'lin', their LayerNorms one GroupNorm 'norm' (a group per hypernetwork), each one's three heads
    packed into one Linear [U | V | gate] and, when all have one shape (the two bottleneck Linears do), stacked
    into one 'heads' of weight (n, rows, hidden) and bias (n, 1, rows) for one batched matmul (else 'heads' is the
    list of packed Linears)."""
    hypers = [lin['hyper'] for lin in synapse_hyper_layers(p).values()]
    if not hypers:
        return None
    if len({h['compressor']['ln']['weight'].shape for h in hypers}) != 1:
        raise ValueError('stack_hypernets: every φ must have one width, so that one GroupNorm can normalise them')
    cat = lambda tensors: {k: torch.cat([t[k] for t in tensors]) for k in ('weight', 'bias')}
    heads = [cat([h[head] for head in HYPER_HEADS]) for h in hypers]
    same = len({q['weight'].shape for q in heads}) == 1
    return {'lin': cat([h['compressor']['lin'] for h in hypers]), 'norm': cat([h['compressor']['ln'] for h in hypers]),
            'heads': {'weight': torch.stack([q['weight'] for q in heads]),
                      'bias': torch.stack([q['bias'] for q in heads])[:, None]} if same else heads}


def synapse_plastic_weights(p, stacked, x, tap=None):
    """pre_synapse_input x (B, ctx_dims) -> {name: (U, V, gate)} of every hyper Linear, from stack_hypernets(p);
    tap('hyper.heads', cs), if given, sees the stacked heads' input (ctm_think_fast)."""
    hypers = synapse_hyper_layers(p)
    n = len(hypers)
    c = F.silu(F.group_norm(linear(stacked['lin'], x), n, stacked['norm']['weight'], stacked['norm']['bias']))
    cs = rearrange(c, 'b (n h) -> n b h', n=n)
    if isinstance(stacked['heads'], list):
        outs = [linear(q, ci) for q, ci in zip(stacked['heads'], cs)]
    else:
        if tap is not None:
            tap('hyper.heads', cs)
        outs = torch.baddbmm(stacked['heads']['bias'], cs, stacked['heads']['weight'].transpose(1, 2))
    weights = {}
    for (name, lin), out in zip(hypers.items(), outs):
        u, v, gate = out.split([len(lin['hyper'][head]['bias']) for head in HYPER_HEADS], dim=1)
        out_dims, in_dims = lin['weight'].shape
        weights[name] = (u.unflatten(1, (out_dims, -1)), v.unflatten(1, (in_dims, -1)), torch.tanh(gate))
    return weights


def synapse_unet_stacked(p, stacked, x, rate=0.0, train=False, tap=None, norm=None):
    """synapse_unet(p, x, rate, train) with the hypernetworks run from stacked = stack_hypernets(p); tap(name, h),
    if given, sees each Linear's input, and norm replaces synapse_unet's LayerNorms (ctm_think_fast uses both)."""
    weights = synapse_plastic_weights(p, stacked, x, tap) if stacked is not None else {}

    def layer(name, q, h):
        if tap is not None:
            tap(name, h)
        return lora(q, h, *weights[name]) if name in weights else linear(q, h)
    return synapse_unet(p, x, rate, train, layer, norm)


# ================================================================================================================
# fast path: the fused tick (an optimisation of ctm_think: ctm_think_fast, selected by `train.py ctm --tick fused`
# or `--tick compiled`, tested equal to ctm_think)
#
# Inside a captured CUDA graph a tick still costs a kernel per small op, forward and backward (torch.profiler: 23,877
# kernels in a step of 50 paper ticks at the seeds' size). ctm_think_fast does the same arithmetic in fewer, wider
# ops; measured side by side (H200, mazes-small, batch 64, `python bench.py ctm`), a step takes 91.7 ms with the
# paper ticks, 53.0 ms fused, 46.1 ms compiled:
# - one synchronisation accumulator for both pair sets: the out sum after tick t and the action sum read by tick
#   t+1 add the same activated state, so their pairs are concatenated and updated together by one gather, one
#   product and one addcmul, a recurrence over fixed tensors (no None on the first tick); beta = 1 + r + ... +
#   r^(k-1) does not depend on the data, so 1/sqrt(beta) comes for all ticks at once (powers of r, a cumsum);
# - the output projection and the certainty run once over all ticks after the loop (nothing in the loop reads
#   them), and the per-tick outputs are stacked once at the end;
# - the trace is kept neuron-major (D, B, M), the layout of the NLMs' batched matmul, with w/T and b/T folded once
#   per forward: one baddbmm per SuperLinear instead of the einsum's permuted copies, the bias add and the division;
# - the weights every tick multiplies by (the U-Net's Linears and LayerNorms, the NLMs' folded weights, the query
#   and out Linears, the attention's keys and values) get their gradients once for all ticks (TickShared): the ticks
#   apply them detached and tap their inputs, and one wide matmul over all ticks' inputs and output gradients
#   replaces a narrow one a tick and the running sum autograd keeps of them; so do the hypernetworks' φ Linear and
#   stacked heads; the rest (the hypernetworks' GroupNorm or a list of heads, the NLM tree, r) is read through one
#   view per tick (views_per_tick), whose T gradients autograd gathers with one stack and one sum;
# - q_proj, the query in-projection and the 1/sqrt(head dim) scale are one Linear, folded once per forward, and the
#   attention of the one query is spelled out (two batched matmuls and a softmax): the fused attention kernels work
#   in blocks of 64 queries: with one query their backward took 11.4 ms of the paper ticks' 85 ms of GPU time a
#   step (torch.profiler, H200); the spelled-out form's own gain was not timed apart;
# - compile_backend='inductor' runs each tick as one torch.compile'd function, which fuses the remaining elementwise
#   work (the U-Net's layer norms with their SiLUs and skip adds, the GLUs, the synchronisation update). Its first
#   call compiles (about 25 s on an H200), so a CUDA graph is captured after it: train.py's warm-up steps do that.


def nlm_weights_folded(p):
    """A plain SuperLinear's (w1, b1) with the temperature folded in, neuron-major: (N, in, out), (N, 1, out)."""
    return (p['w1'] / p['T']).permute(2, 0, 1).contiguous(), (p['b1'] / p['T']).permute(1, 0, 2)


def nlm_fused(p, folded, trace, activated_state, cfg, train=False, tap=None):
    """nlm() on a neuron-major trace (D, B, M) -> (B, D): each plain SuperLinear one baddbmm with its folded (w, b)
    (folded: nlm_weights_folded per layer); a plastic NLM (folded None) runs the paper form on the (B, D, M) view.
    tap(name, h), if given, sees each baddbmm's input ('nlm.l1', 'nlm.l2')."""
    if folded is None:
        return nlm(p, trace.permute(1, 0, 2), activated_state, cfg, train)
    rate = cfg.dropout if cfg.dropout_nlm is None else cfg.dropout_nlm
    h = trace
    for layer, (w, b) in zip(('l1', 'l2'), folded):
        h = dropout(h, rate, train)
        if 'ln' in p[layer]:
            h = layer_norm(p[layer]['ln'], h)
        if tap is not None:
            tap(f'nlm.{layer}', h)
        h = glu(torch.baddbmm(b, h, w))
    return h.squeeze(-1).t()


def attention_query_folded(params, heads):
    """q_proj, attention's query in-projection and the scale 1/sqrt(d / heads) as one Linear."""
    d = params['q_proj']['weight'].shape[0]
    w_q, b_q = params['attention']['in_proj']['weight'][:d], params['attention']['in_proj']['bias'][:d]
    scale = (d // heads) ** -0.5
    return {'weight': w_q @ params['q_proj']['weight'] * scale,
            'bias': torch.addmv(b_q, w_q, params['q_proj']['bias']) * scale}


def per_tick(tree, T, leaf, name=''):
    """A tree of dicts, lists and tuples -> T trees of its shape: leaf(node, name) gives a node's T per-tick values,
    or None to descend into it; name is the node's place in the tree ('down.0.lin')."""
    ticks = leaf(tree, name)
    if ticks is not None:
        return ticks
    keys = tree.keys() if isinstance(tree, dict) else range(len(tree))
    children = {k: per_tick(tree[k], T, leaf, f'{name}.{k}'.lstrip('.')) for k in keys}
    if isinstance(tree, dict):
        return [{k: v[t] for k, v in children.items()} for t in range(T)]
    return [type(tree)(v[t] for v in children.values()) for t in range(T)]


def views_per_tick(tree, T):
    """A tree of tensors -> T trees, tick t's leaves the t-th of T views of each leaf (expand, then unbind): autograd
    then gathers a leaf's T gradients with one stack and one sum instead of T - 1 additions, one a tick."""
    def views(node, _):
        if isinstance(node, (dict, list, tuple)):
            return None
        if isinstance(node, torch.Tensor) and node.requires_grad:
            return node.expand(T, *node.shape).unbind(0)
        return [node] * T
    return per_tick(tree, T, views)


class TickShared(torch.autograd.Function):
    """A weight (and bias) that every tick multiplies by its input, its gradient formed once for all ticks.

    apply(eq, out_shape, taps, prepare, weight, bias) -> biases of shape out_shape, whose first dimension is T: tick t
    applies the weight detached and adds biases[t] (the bias broadcast, or zeros) to its output, so that the biases'
    gradient G holds every tick's output gradient. The caller appends each tick's input to the list taps before the
    backward reads it (outside save_for_backward, so autograd's in-place checks do not cover these tensors). The
    backward forms the weight's gradient from X = stack(taps)
    (prepare(X) if given: a LayerNorm's ticks tap their input, normalised here once for all) and G in one einsum,
    eq's 'x,w->y' read backwards (y,x->w; K = T·B for a Linear), and the bias's as G summed to its shape: one wide
    op where autograd would run one narrow matmul a tick and sum T gradients."""

    @staticmethod
    def forward(ctx, eq, out_shape, taps, prepare, weight, bias):
        ctx.eq, ctx.taps, ctx.prepare, ctx.bias_shape = eq, taps, prepare, None if bias is None else bias.shape
        return (weight.new_zeros(out_shape) if bias is None else bias.expand(out_shape))

    @staticmethod
    def backward(ctx, grad):
        x, w, y = ctx.eq.replace('->', ',').split(',')
        inputs = torch.stack(ctx.taps)
        weight_grad = torch.einsum(f'{y},{x}->{w}', grad, inputs if ctx.prepare is None else ctx.prepare(inputs))
        return None, None, None, None, weight_grad, None if ctx.bias_shape is None else grad.sum_to_size(ctx.bias_shape)


def shared_per_tick(q, name, eq, out_shape, taps, prepare=None):
    """A Linear or LayerNorm dict -> T dicts, tick t's {'weight': detached, 'bias': biases[t]} (TickShared; the
    rest of q, e.g. 'hyper', kept); taps[name] collects the ticks' inputs."""
    biases = TickShared.apply(eq, out_shape, taps[name], prepare, q['weight'], q.get('bias'))
    return [{**q, 'weight': q['weight'].detach(), 'bias': b} for b in biases.unbind(0)]


def linear_per_tick(q, name, T, B, taps):
    """shared_per_tick for a Linear whose ticks read (B, in) inputs: out_shape (T, B, out)."""
    return shared_per_tick(q, name, 'tbi,oi->tbo', (T, B, q['weight'].shape[0]), taps)


def synapses_per_tick(p, T, B, taps):
    """The U-Net's tree -> T trees whose Linears ('tbi,oi->tbo') and LayerNorms' affine parts ('tbd,d->tbd' on the
    normalised input) are TickShared, their taps named by their place in the tree ('first.lin', 'down.0.ln',
    'skip_ln.1', ...)."""
    def shared(q, name):
        if not (isinstance(q, dict) and 'weight' in q):
            return None
        if q['weight'].dim() == 2:
            return linear_per_tick(q, name, T, B, taps)
        return shared_per_tick(q, name, 'tbd,d->tbd', (T, B, q['weight'].shape[0]), taps,
                               lambda x: F.layer_norm(x, x.shape[-1:]))
    return per_tick(p, T, shared)


def layer_norm_tapped(tap, name, q, h):
    """A LayerNorm whose affine part is TickShared: tap its input; the bias is this tick's (B, D) slice."""
    tap(name, h)
    return F.layer_norm(h, h.shape[-1:], q['weight']) + q['bias']


def hypernets_per_tick(stacked, T, B, taps):
    """stack_hypernets' tree -> T trees (None without hypernetworks): its φ Linear reads the pre_synapse_input, as the
    U-Net's first Linear does, so it is TickShared on that Linear's taps ('first.lin'); stacked heads are TickShared
    ('tnbh,nrh->tnbr'), the GroupNorm (and a list of heads) one view per tick."""
    if stacked is None:
        return [None] * T
    lin = linear_per_tick(stacked['lin'], 'first.lin', T, B, taps)
    norm = views_per_tick(stacked['norm'], T)
    heads = stacked['heads']
    if isinstance(heads, list):
        heads = views_per_tick(heads, T)
    else:
        n, rows = heads['weight'].shape[:2]
        heads = shared_per_tick(heads, 'hyper.heads.lin', 'tnbh,nrh->tnbr', (T, n, B, rows), taps)
    return [{'lin': lin[t], 'norm': norm[t], 'heads': heads[t]} for t in range(T)]


def ctm_tick_fused(shared, pairs, inv_sqrt_beta, carry, cfg, train=False):
    """One tick of ctm_think_fast: carry = (trace (D, B, M), activated_state (B, D), alpha, sync) -> (the next one,
    {name: this tick's input to each TickShared op}). shared = this tick's (synapses, nlm, folded NLM weights,
    attention out Linear, folded query Linear, keys, values, stacked hypernetworks, r); alpha and sync hold both
    pair sets [action | out]; inv_sqrt_beta is this tick's row."""
    synapses, nlm_p, folded, out_p, query_p, keys, values, hypernets, r = shared
    trace, activated_state, alpha, sync = carry
    B = activated_state.shape[0]
    taps = {}
    tap = taps.__setitem__  # tap(name, x): x is this tick's input to TickShared op `name`
    tap('query', sync)
    query = linear(query_p, sync).reshape(B * cfg.heads, 1, -1)  # (B·heads, 1, d / heads), scaled
    tap('keys', query)
    weights = torch.softmax(torch.baddbmm(keys['bias'], query, keys['weight'].transpose(1, 2)), dim=-1)
    weights = dropout(weights, cfg.dropout, train)  # (B·heads, 1, S)
    tap('values', weights)
    attn = torch.baddbmm(values['bias'], weights, values['weight']).reshape(B, -1)  # (B, d_input)
    tap('out', attn)
    pre_synapse_input = torch.cat([linear(out_p, attn), activated_state], dim=-1)
    # a Linear's tap takes synapses_per_tick's tree path: 'first' -> 'first.lin', 'hyper.heads' -> 'hyper.heads.lin'
    state = synapse_unet_stacked(synapses, hypernets, pre_synapse_input, cfg.dropout, train,
                                 lambda name, h: tap(f'{name}.lin', h), functools.partial(layer_norm_tapped, tap))
    trace = torch.cat([trace[..., 1:], state.t()[..., None]], dim=-1)
    activated_state = nlm_fused(nlm_p, folded, trace, activated_state, cfg, train, tap).contiguous()  # (B, D)
    alpha = torch.addcmul(activated_state[:, pairs[0]] * activated_state[:, pairs[1]], r, alpha)  # r·alpha + z_i z_j
    return (trace, activated_state, alpha, alpha * inv_sqrt_beta), taps


def ctm_think_fast(params, buffers, kv, cfg, train=False, compile_backend=None):
    """ctm_think(params, buffers, kv, cfg, train) computed by the fused tick -> the same (predictions (B, out_dims,
    T), certainties (B, 2, T), sync_out). compile_backend: None (eager) or a torch.compile backend ('inductor')."""
    B, T = kv.shape[0], cfg.iterations
    n_action = buffers['action_left'].shape[0]
    pairs = tuple(torch.cat([buffers[f'action_{side}'], buffers[f'out_{side}']]) for side in ('left', 'right'))
    decay = torch.cat([params['decay_params_action'], params['decay_params_out']]).clamp(0, 15)
    r = torch.exp(-decay)
    # r^0 .. r^T as exp(-k·decay), not a cumprod: cumprod's backward asks the host whether an input is zero, which a
    # CUDA graph capture refuses
    powers = torch.exp(-torch.arange(T + 1, device=decay.device, dtype=decay.dtype)[:, None] * decay)
    inv_sqrt_beta = torch.rsqrt(torch.cumsum(powers, 0))  # row k: after k + 1 updates
    activated_state = params['start_activated_state'].expand(B, -1).contiguous()
    alpha = activated_state[:, pairs[0]] * activated_state[:, pairs[1]]  # both sums start from the start state
    carry = (params['start_trace'][:, None].expand(-1, B, -1).contiguous(), activated_state, alpha,
             alpha * inv_sqrt_beta[0])  # sync after one update (= alpha); a tensor of its own, as on every tick
    taps = collections.defaultdict(list)  # name -> each tick's input, filled by the tick loop, read by TickShared
    nlms = [params['nlm'][k] for k in ('l1', 'l2') if k in params['nlm']]
    if any('hyper' in q for q in nlms):
        folded = [None] * T
    else:
        layers = [shared_per_tick({'weight': w, 'bias': b}, f'nlm.{k}', 'tdbi,dio->tdbo', (T, len(w), B, w.shape[2]),
                                  taps) for k, (w, b) in zip(('l1', 'l2'), map(nlm_weights_folded, nlms))]
        folded = [[(q['weight'], q['bias']) for q in tick] for tick in zip(*layers)]
    keys, values = (t.flatten(0, 1) for t in attention_keys_values(params['attention'], kv, cfg.heads))  # (B·h, S, e)
    query = attention_query_folded(params, cfg.heads)
    query['weight'] = F.pad(query['weight'], (0, len(buffers['out_left'])))  # zeros for sync's out part: no slice
    # in ctm_tick_fused's order: synapses, nlm, folded NLM weights, out Linear, query Linear, keys, values,
    # hypernetworks, r
    ticks = zip(synapses_per_tick(params['synapses'], T, B, taps),
                views_per_tick(params['nlm'], T), folded,
                linear_per_tick(params['attention']['out'], 'out', T, B, taps),
                linear_per_tick(query, 'query', T, B, taps),
                shared_per_tick({'weight': keys}, 'keys', 'tnqe,nse->tnqs', (T, len(keys), 1, keys.shape[1]), taps),
                shared_per_tick({'weight': values}, 'values', 'tnqs,nse->tnqe', (T, len(values), 1, values.shape[2]),
                                taps),
                hypernets_per_tick(stack_hypernets(params['synapses']), T, B, taps), views_per_tick(r, T))
    tick = ctm_tick_fused if compile_backend is None else torch.compile(ctm_tick_fused, backend=compile_backend,
                                                                        dynamic=False)
    syncs = []
    for shared, row in zip(ticks, inv_sqrt_beta[1:].unbind(0)):
        carry, tapped = tick(shared, pairs, row, carry, cfg, train)
        for name, x in tapped.items():
            taps[name].append(x)
        syncs.append(carry[3])
    sync_out = torch.stack(syncs)[..., n_action:]  # (T, B, synch size out)
    predictions = linear(params['output_projector'], sync_out)  # (T, B, out_dims)
    certainties = certainty(predictions.flatten(0, 1), cfg.prediction_reshaper).unflatten(0, (T, B))
    return predictions.permute(1, 2, 0), certainties.permute(1, 2, 0), sync_out[-1]


# ================================================================================================================
# losses


def select_ticks(losses, certainties, use_most_certain=True):
    """losses (B, T) -> (per-example loss (B,), most certain tick (B,)): the mean of the loss at the tick where it is
    lowest and at the tick where the model is most certain (the last tick when use_most_certain is False)."""
    batch = torch.arange(losses.shape[0], device=losses.device)
    lowest = losses.argmin(dim=1)
    chosen = certainties[:, 1].argmax(-1) if use_most_certain else torch.full_like(lowest, losses.shape[1] - 1)
    return (losses[batch, lowest] + losses[batch, chosen]) / 2, chosen


def tick_cross_entropy(predictions, targets):
    """predictions (B, ..., C, T), targets (B, ...) -> cross-entropy (B, ..., T) at every tick."""
    logits = predictions.movedim(-2, 1)  # (B, C, ..., T): cross_entropy wants the classes on axis 1
    return F.cross_entropy(logits, targets[..., None].expand(*targets.shape, predictions.shape[-1]).long(),
                           reduction='none')


def classification_loss(predictions, certainties, targets, use_most_certain=True):
    """predictions (B, C, T), targets (B,) -> (loss, most certain tick (B,))."""
    per_example, chosen = select_ticks(tick_cross_entropy(predictions, targets), certainties, use_most_certain)
    return per_example.mean(), chosen


def parity_loss(predictions, certainties, targets, use_most_certain=True):
    """predictions (B, L, 2, T), targets (B, L): cross-entropy averaged over the sequence, then the tick rule."""
    per_example, chosen = select_ticks(tick_cross_entropy(predictions, targets).mean(1), certainties,
                                       use_most_certain)
    return per_example.mean(), chosen


def maze_loss(predictions, certainties, targets, cirriculum_lookahead=5, use_most_certain=True):
    """predictions (B, R, 5, T), targets (B, R) -> (loss, most certain tick (B,), route steps trained (B,)).

    The original's auto-curriculum: at each tick find the last step of the correctly predicted route prefix; only
    the route steps up to (the best tick's such step) + cirriculum_lookahead enter the loss, so the model learns
    the route from its start outwards."""
    losses = tick_cross_entropy(predictions, targets)  # (B, R, T)
    correct_prefix = (predictions.argmax(2) == targets[..., None]).long().cumprod(1).sum(1)  # (B, T)
    upto_where = ((correct_prefix - 1).clamp(min=0).max(1).values + cirriculum_lookahead).clamp(max=losses.shape[1])
    mask = (torch.arange(losses.shape[1], device=losses.device)[None] < upto_where[:, None]).float()  # (B, R)
    route_losses = (losses * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, T)
    per_example, chosen = select_ticks(route_losses, certainties, use_most_certain)
    return per_example.mean(), chosen, upto_where


# ================================================================================================================
# tasks: mazes, parity, images


def images_to_tensor(images):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # the original's classes 0..3: up, down, left, right
WAIT = 4  # class 4 pads routes shorter than route_length
MAZE_SIZES = {'mazes-small': 39, 'mazes-medium': 39, 'mazes-large': 99}  # image side in pixels, as the original's


def generate_maze(rng, size):
    """A random perfect maze on a size x size pixel grid -> (open (size, size) bool, start, end, moves).

    Cells sit at odd pixel coordinates and walls between them, as in the original dataset's images (39x39 pixels
    = 19x19 cells). A randomised depth-first search from the start cell carves a spanning tree, so there is exactly
    one route between any two cells; its moves (indices into MOVES, one per pixel) come from the tree's parents."""
    if size < 5 or size % 2 == 0:
        raise ValueError(f'maze size: expected an odd number of pixels >= 5, got {size}')
    cells = (size - 1) // 2
    to_pixel = lambda cell: (2 * cell[0] + 1, 2 * cell[1] + 1)
    open_ = np.zeros((size, size), dtype=bool)
    draws = iter(rng.random(cells * cells).tolist())
    start = (int(rng.integers(cells)), int(rng.integers(cells)))
    parent = {start: None}
    stack = [start]
    open_[to_pixel(start)] = True
    while stack:
        r, c = stack[-1]
        free = [(m, (r + dr, c + dc)) for m, (dr, dc) in enumerate(MOVES)
                if 0 <= r + dr < cells and 0 <= c + dc < cells and (r + dr, c + dc) not in parent]
        if not free:
            stack.pop()
            continue
        m, cell = free[int(next(draws) * len(free))]
        parent[cell] = (m, (r, c))
        open_[2 * r + 1 + MOVES[m][0], 2 * c + 1 + MOVES[m][1]] = True  # the wall pixel between the two cells
        open_[to_pixel(cell)] = True
        stack.append(cell)
    end = start
    while end == start:
        end = (int(rng.integers(cells)), int(rng.integers(cells)))
    moves, cell = [], end
    while parent[cell] is not None:
        m, cell = parent[cell]
        moves += [m, m]  # one cell step crosses the wall pixel between the two cells
    return open_, to_pixel(start), to_pixel(end), moves[::-1]


def maze_image(open_, start, end):
    """-> uint8 (H, W, 3): walls black, corridors white, start red, goal green (the original dataset's colours)."""
    image = np.repeat(open_[..., None].astype(np.uint8) * 255, 3, axis=2)
    image[start] = (255, 0, 0)
    image[end] = (0, 255, 0)
    return image


def maze_batch(rng, n, size, route_length):
    """-> (x float32 (n, 3, H, W) in [-1, 1] as the original's expand_range, targets int64 (n, route_length) of
    the first route_length moves padded with WAIT, uint8 images (n, H, W, 3))."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    targets = np.full((n, route_length), WAIT, dtype=np.int64)
    for i in range(n):
        open_, start, end, moves = generate_maze(rng, size)
        images[i] = maze_image(open_, start, end)
        targets[i, :min(len(moves), route_length)] = moves[:route_length]
    return images_to_tensor(images), torch.from_numpy(targets), images


def walk_route(image, moves):
    """Follow moves from the red start pixel of a maze image -> pixels visited until the first move into a wall
    (or off the image); WAIT stays put."""
    here = tuple(int(v) for v in np.argwhere((image == (255, 0, 0)).all(-1))[0])
    path = [here]
    for m in moves:
        if m == WAIT:
            continue
        y, x = here[0] + MOVES[m][0], here[1] + MOVES[m][1]
        if not (0 <= y < image.shape[0] and 0 <= x < image.shape[1]) or not image[y, x].any():
            break
        here = (y, x)
        path.append(here)
    return path


def parity_batch(gen, n, length):
    """The CTM paper's cumulative parity: x ±1 (n, length); target t = parity of the number of -1s in x[:t+1]."""
    x = torch.randint(0, 2, (n, length), generator=gen).float() * 2 - 1
    return x, (x == -1).long().cumsum(1) % 2


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only what a CIFAR-10 batch holds (numpy arrays, their dtypes, Python 3's
    bytes-as-latin-1 helper): any other global, e.g. one a crafted file names to run code, is refused."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refused global {module}.{name} (not part of a CIFAR-10 batch)')
        return super().find_class(module, name)


def load_cifar10(root):
    """CIFAR-10's python pickles (data_batch_1..5, test_batch) -> ((uint8 (N, 32, 32, 3), labels), same for test).

    Read with CifarUnpickler: a file that asks to run code is refused, not run."""
    def read(names):
        xs, ys = [], []
        for name in names:
            path = os.path.join(root, name)
            try:
                with open(path, 'rb') as f:
                    batch = CifarUnpickler(f, encoding='bytes').load()
                data = np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                labels = np.asarray(batch[b'labels'], dtype=np.int64)
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f'{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})') from None
            if len(labels) != len(data):
                raise ValueError(f'{path}: {len(data)} images but {len(labels)} labels')
            xs.append(data)
            ys.append(labels)
        return np.concatenate(xs), np.concatenate(ys)
    return read([f'data_batch_{i}' for i in range(1, 6)]), read(['test_batch'])


def resize_nearest(image, size):
    rows = np.arange(size) * image.shape[0] // size
    cols = np.arange(size) * image.shape[1] // size
    return image[rows][:, cols]


def load_image_folder(root, read_image, size):
    """ImageFolder layout (root/CLASS/*.png|ppm|pgm, or root/train/CLASS/... and root/test/CLASS/...) ->
    ((uint8 (N, size, size, 3), labels), test split, class names). read_image(path) -> uint8 (H, W, 3); without a
    test folder every 10th image of each class is held out."""
    def read(folder, classes):
        xs, ys, held = [], [], []
        for label, name in enumerate(classes):
            files = sorted(f for f in os.listdir(os.path.join(folder, name))
                           if f.lower().endswith(('.png', '.ppm', '.pgm')))
            for k, f in enumerate(files):
                xs.append(resize_nearest(read_image(os.path.join(folder, name, f)), size))
                ys.append(label)
                held.append(k % 10 == 9)
        if not xs:
            raise ValueError(f'{folder}: no .png/.ppm/.pgm images in class folders {classes}')
        return np.stack(xs), np.asarray(ys, dtype=np.int64), np.asarray(held)
    split = os.path.isdir(os.path.join(root, 'train')) and os.path.isdir(os.path.join(root, 'test'))
    top = os.path.join(root, 'train') if split else root
    classes = sorted(d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d)))
    if not classes:
        raise ValueError(f'{root}: expected one sub-folder per class (ImageFolder layout)')
    x, y, held = read(top, classes)
    if split:
        tx, ty, _ = read(os.path.join(root, 'test'), classes)
        return (x, y), (tx, ty), classes
    return (x[~held], y[~held]), (x[held], y[held]), classes


def generated_images(rng, n, size, n_classes=10):
    """A smoke-test image set: class k is a noisy stripe pattern at angle k·180°/n_classes, random phase and
    colour -> (uint8 (n, size, size, 3), labels)."""
    labels = rng.integers(0, n_classes, n)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = labels[:, None, None] * np.pi / n_classes
    phase = rng.random((n, 1, 1)) * 2 * np.pi
    wave = np.sin(2 * np.pi * 3 * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    colour = 0.3 + 0.7 * rng.random((n, 1, 1, 3))
    images = (wave[..., None] * 0.5 + 0.5) * colour + 0.15 * rng.standard_normal((n, size, size, 3))
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64)
