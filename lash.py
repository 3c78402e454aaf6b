"""LASH (Layered Adaptive Supervision Hierarchy) and ASHEM (adaptive supervision via hard example mining) on a
decoder-only transformer language model.

Pure functions over parameter dicts. Imports only torch, einops and the standard library.

LASH controls training with three options: `layer_weights` (which layers' outputs carry loss, through one shared
output head), `layer_lr_scales` (one learning rate per layer, Howard & Ruder 2018) and `routing_threshold` with
`exit_layer` (per-token early exit at inference, Teerapittayanon et al. 2016). Standard training (last layer only)
and deep supervision (all layers, Lee et al. 2015) are two settings of the same `TrainingConfig`.

ASHEM trains a shallow model on all data, marks the tokens it is least confident about as hard, stacks new layers
on the frozen shallow model and trains them on the hard tokens only; at inference the confident tokens leave after
the shallow part.

Early exit in a causal transformer: a token that exits at layer e is not processed by layers e+1..L, but tokens
after it still attend to it in those layers. We copy its exit hidden state upward (as CALM, Schuster et al. 2022,
does for skipped layers): layer l > e computes the exited token's key and value from that copied state, and
nothing else for it (no query, attention, output projection or feed-forward). `routed_flops` charges exactly that
(to keep a regular layout, the batched attention also computes some queries whose outputs it drops: see
`token_subset`).
`generate` decodes token by token with a key/value cache and the same upward copy.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange

IGNORE = -100  # target value that carries no loss (F.cross_entropy's default ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# configs


def _check_positive_ints(config, names):
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name}: expected an int >= 1, got {value!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 0  # 0: 4 * dim
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        _check_positive_ints(self, ('vocab_size', 'dim', 'num_layers', 'num_heads'))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"ModelConfig: dim ({self.dim}) must split into num_heads ({self.num_heads}) heads "
                             f"of even size (RoPE rotates pairs)")
        if self.ffn_dim == 0:
            self.ffn_dim = 4 * self.dim
        if self.ffn_dim < 1:
            raise ValueError(f"ModelConfig.ffn_dim: expected a positive int or 0, got {self.ffn_dim}")


def _check_layer_dict(name, d, num_layers=None):
    if not isinstance(d, dict) or not d:
        raise ValueError(f"TrainingConfig.{name}: expected a non-empty dict {{layer: value}}, got {d!r}")
    for key, value in d.items():
        if not isinstance(key, int) or isinstance(key, bool) or key < 1 or (num_layers and key > num_layers):
            upto = f'1..{num_layers}' if num_layers else '1, 2, ...'
            raise ValueError(f"TrainingConfig.{name}: keys must be layer numbers {upto}, got {key!r}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"TrainingConfig.{name}[{key}]: expected a finite number >= 0, got {value!r}")


@dataclass
class TrainingConfig:
    """The three LASH options. Layers are numbered 1..num_layers; `layer_weights` must name every layer.

    Missing `layer_lr_scales` entries are 1.0. With `routing_threshold`, `exit_layer` defaults to the lowest layer
    with a non-zero weight (the first layer whose output the head was trained to read); it must lie below the last."""
    layer_weights: dict
    layer_lr_scales: dict = None
    routing_threshold: float = None
    exit_layer: int = None

    def __post_init__(self):
        _check_layer_dict('layer_weights', self.layer_weights)
        n = len(self.layer_weights)
        if sorted(self.layer_weights) != list(range(1, n + 1)):
            raise ValueError(f"TrainingConfig.layer_weights: keys must name every layer 1..{max(self.layer_weights)} "
                             f"once, got {sorted(self.layer_weights)}")
        if not any(w > 0 for w in self.layer_weights.values()):
            raise ValueError("TrainingConfig.layer_weights: at least one weight must be non-zero")
        if self.layer_lr_scales is not None:
            _check_layer_dict('layer_lr_scales', self.layer_lr_scales, n)
        self.layer_lr_scales = {l: float((self.layer_lr_scales or {}).get(l, 1.0)) for l in range(1, n + 1)}
        if self.routing_threshold is None:
            if self.exit_layer is not None:
                raise ValueError("TrainingConfig.exit_layer: only used together with routing_threshold")
            return
        t = self.routing_threshold
        if not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"TrainingConfig.routing_threshold: expected a probability in (0, 1], got {t!r}")
        if self.exit_layer is None:
            self.exit_layer = min(l for l, w in self.layer_weights.items() if w > 0)
            if self.exit_layer == n:
                raise ValueError(f"TrainingConfig.exit_layer: no layer below the last carries loss weight, so there "
                                 f"is no default exit layer; name one in 1..{n - 1}")
        if not isinstance(self.exit_layer, int) or not 1 <= self.exit_layer < n:
            raise ValueError(f"TrainingConfig.exit_layer: expected a layer in 1..{n - 1} (exiting after the last "
                             f"skips nothing), got {self.exit_layer!r}")

    @property
    def num_layers(self):
        return len(self.layer_weights)

    @property
    def last_layer_only(self):
        return all(w == 0 for l, w in self.layer_weights.items() if l < self.num_layers)


def create_standard_config(num_layers):
    return TrainingConfig(layer_weights={l: float(l == num_layers) for l in range(1, num_layers + 1)})


def create_deep_supervision_config(num_layers):
    return TrainingConfig(layer_weights={l: 1.0 / num_layers for l in range(1, num_layers + 1)})


def _check_config(config, cfg):
    if config.num_layers != cfg.num_layers:
        raise ValueError(f"TrainingConfig names {config.num_layers} layers, the model has {cfg.num_layers}")


@dataclass
class ASHEMConfig:
    """Patience as in the seed (3 for the new layers, which need longer). The seed trained phase 2 at 0.1x the
    phase-1 learning rate for as long as early stopping allowed; within a few hundred steps the new, zero-started
    layers learn far faster at 1x (measured: NOTES.md), so 1.0 is the default here."""
    phase1_layers: int = 2
    hard_example_ratio: float = 0.5
    phase2_layers: int = 4
    phase1_patience: int = 1
    phase2_patience: int = 3
    phase2_lr_scale: float = 1.0

    def __post_init__(self):
        _check_positive_ints(self, ('phase1_layers', 'phase1_patience', 'phase2_patience'))
        if not isinstance(self.phase2_layers, int) or self.phase2_layers <= self.phase1_layers:
            raise ValueError(f"ASHEMConfig.phase2_layers: expected an int > phase1_layers "
                             f"({self.phase1_layers}), got {self.phase2_layers!r}")
        if not isinstance(self.hard_example_ratio, (int, float)) or not 0 < self.hard_example_ratio < 1:
            raise ValueError(f"ASHEMConfig.hard_example_ratio: expected a fraction in (0, 1), "
                             f"got {self.hard_example_ratio!r}")
        if not self.phase2_lr_scale > 0:
            raise ValueError(f"ASHEMConfig.phase2_lr_scale: expected > 0, got {self.phase2_lr_scale!r}")


# ----------------------------------------------------------------------------------------------------------------
# blocks


def init_linear(gen, in_dim, out_dim, std=0.02):
    return {'weight': torch.randn(out_dim, in_dim, generator=gen) * std}  # (Out, In), as F.linear wants


def linear(p, x):
    return F.linear(x, p['weight'])


def init_rms_norm(dim):
    return {'weight': torch.ones(dim)}


def rms_norm(p, x, eps=1e-6):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * p['weight']


def rope_tables(positions, head_dim, base=10000.0):
    """positions (...) -> cos, sin (..., head_dim / 2): angle pos * base^(-2i / head_dim) for pair i."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x_i, x_{i + Dh/2}) of x (..., Dh) by the angles; cos/sin broadcast to (..., Dh/2).

    A query at position m and a key at n then meet as q·R(n - m)·k: attention sees only relative positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def init_attention(gen, cfg, out_std):
    d = cfg.dim
    return {'wq': init_linear(gen, d, d), 'wk': init_linear(gen, d, d), 'wv': init_linear(gen, d, d),
            'wo': init_linear(gen, d, d, out_std)}


def attention(p, x, cfg, subset=None):
    """Causal multi-head attention over x (B, T, D) -> (B, T, D).

    With a subset (token_subset, in the early-exit section after the model: early exit runs only the continuing
    tokens), only those tokens' outputs are made -> (M, D); every token still supplies its key and value. The queries
    sit in the subset's (B, N) layout, and its mask keeps each one causal at its own position; in place (N = T),
    every token's query is made and the others' outputs dropped."""
    B, T, D = x.shape
    H = cfg.num_heads
    heads = lambda y: rearrange(y, 'b t (h d) -> b h t d', h=H)
    cos, sin = rope_tables(torch.arange(T, device=x.device), D // H, cfg.rope_base)  # (T, Dh/2)
    k, v = apply_rope(heads(linear(p['wk'], x)), cos, sin), heads(linear(p['wv'], x))
    visible = None if subset is None else subset['visible']
    if visible is None:  # every token's query, plainly causal
        q = apply_rope(heads(linear(p['wq'], x)), cos, sin)
    else:  # the kept tokens' queries, packed
        row, slot, pos = subset['row'], subset['slot'], subset['pos']
        q = x.new_zeros(*pos.shape, D).index_put_((row, slot), linear(p['wq'], x.flatten(0, 1)[subset['index']]))
        q = apply_rope(heads(q), cos[pos][:, None], sin[pos][:, None])  # tables (B, 1, N, Dh/2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=visible is None)  # (B, H, N, Dh)
    out = rearrange(out, 'b h n d -> b n (h d)')
    return linear(p['wo'], out if subset is None else out[subset['row'], subset['slot']])


def init_swiglu_ffn(gen, dim, hidden, out_std):
    return {'w_gate': init_linear(gen, dim, hidden), 'w_up': init_linear(gen, dim, hidden),
            'w_down': init_linear(gen, hidden, dim, out_std)}


def swiglu_ffn(p, x):
    """Gated feed-forward block (SwiGLU, Shazeer 2020): down(silu(gate(x)) * up(x))."""
    return linear(p['w_down'], F.silu(linear(p['w_gate'], x)) * linear(p['w_up'], x))


def init_block(gen, cfg, out_std):
    return {'attn_norm': init_rms_norm(cfg.dim), 'attn': init_attention(gen, cfg, out_std),
            'ffn_norm': init_rms_norm(cfg.dim), 'ffn': init_swiglu_ffn(gen, cfg.dim, cfg.ffn_dim, out_std)}


def block(p, h, cfg, subset=None):
    """Pre-norm block on h (B, T, D). With a subset (token_subset, early-exit section) it updates only those
    tokens: the others keep their state and supply keys and values (early exit)."""
    x = rms_norm(p['attn_norm'], h, cfg.norm_eps)  # every token's key and value is needed
    h_q = h if subset is None else h.flatten(0, 1)[subset['index']]
    out = h_q + attention(p['attn'], x, cfg, subset)
    out = out + swiglu_ffn(p['ffn'], rms_norm(p['ffn_norm'], out, cfg.norm_eps))
    return out if subset is None else h.flatten(0, 1).index_copy(0, subset['index'], out).view_as(h)


# ----------------------------------------------------------------------------------------------------------------
# the model


def init_transformer(cfg, gen):
    """Token embedding, cfg.num_layers pre-norm blocks, one output head (RMSNorm + Linear) shared by all layers.

    Residual output projections start at std 0.02 / sqrt(2 L) (GPT-2) so the residual stream does not grow with
    depth."""
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    return {'embed': torch.randn(cfg.vocab_size, cfg.dim, generator=gen) * 0.02,  # (V, D)
            'layers': [init_block(gen, cfg, out_std) for _ in range(cfg.num_layers)],
            'head': {'norm': init_rms_norm(cfg.dim), 'out': init_linear(gen, cfg.dim, cfg.vocab_size)}}


def output_head(params, h, cfg):
    return linear(params['head']['out'], rms_norm(params['head']['norm'], h, cfg.norm_eps))


def embed(params, tokens, cfg):
    if len(params['layers']) != cfg.num_layers:
        raise ValueError(f"params have {len(params['layers'])} layers, cfg.num_layers is {cfg.num_layers}")
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens: expected a (B, T) long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise ValueError(f"tokens: ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return params['embed'][tokens]  # (B, T, D)


def forward_all_layers(params, tokens, cfg):
    """-> list of logits (B, T, V); entry l is the head applied after layer l + 1."""
    h = embed(params, tokens, cfg)
    logits = []
    for layer in params['layers']:
        h = block(layer, h, cfg)
        logits.append(output_head(params, h, cfg))
    return logits


def hidden_after(params, tokens, cfg, num_layers):
    """-> the hidden state (B, T, D) after the first num_layers layers."""
    h = embed(params, tokens, cfg)
    for layer in params['layers'][:num_layers]:
        h = block(layer, h, cfg)
    return h


def forward(params, tokens, cfg):
    """-> final-layer logits (B, T, V); the head runs once."""
    return output_head(params, hidden_after(params, tokens, cfg, cfg.num_layers), cfg)


# ----------------------------------------------------------------------------------------------------------------
# early exit: the same model; tokens above the confidence threshold leave after exit_layer


def confidence(logits):
    """Max softmax probability. It needs the whole vocabulary; softmax + amax measured fastest on a CPU (one
    (32, 128, 256) batch: 0.7 ms, against 2.0 ms for exp(max - logsumexp) and ~100 ms for the forward)."""
    return logits.softmax(-1).amax(-1)


def token_subset(keep):
    """keep (B, T) bool -> the kept tokens, listed once for the layers that update only them (early exit):
    'index' (M,), their flat positions b·T + t; 'row', 'slot' (M,), where each one's query sits in a (B, N) layout;
    'pos' (B, N), the position of each slot; 'visible' (B, 1, N, T), each query's causal mask, or None when
    plainly causal. The queries are packed to the left of their rows (N the busiest row's count) when that skips an
    eighth of the attention at least; otherwise they stay in place (N = T). The 7/8 cut-off was measured on a CPU
    (T = 128), where SDPA's causal path computes the masked half too; not measured on CUDA."""
    B, T = keep.shape
    index = keep.flatten().nonzero().squeeze(1)
    row, t = index // T, index % T
    N = int(keep.sum(1).max())
    if 8 * N > 7 * T:
        return {'index': index, 'row': row, 'slot': t, 'pos': torch.arange(T, device=keep.device).expand(B, T),
                'visible': None}
    slot = (keep.cumsum(1) - 1)[keep]
    pos = torch.zeros(B, N, dtype=torch.long, device=keep.device).index_put_((row, slot), t)
    visible = torch.arange(T, device=keep.device) <= pos[:, None, :, None]
    return {'index': index, 'row': row, 'slot': slot, 'pos': pos, 'visible': visible}


def forward_routed(params, tokens, cfg, exit_layer, threshold=None, exit_mask=None):
    """Two-stage forward: every token runs layers 1..exit_layer; the head reads them there; tokens with max softmax
    probability >= threshold (or those marked in exit_mask (B, T)) exit with those logits; the others continue.

    The continuing tokens are listed once (token_subset), and the layers above exit_layer run their output
    projection and feed-forward on those M tokens only (queries and attention in token_subset's (B, N) layout);
    exited tokens keep their exit hidden state, which those layers read for keys and values.
    -> (logits (B, T, V), exit_mask (B, T))."""
    if threshold is None and exit_mask is None:
        raise ValueError("forward_routed: pass threshold (a probability) or exit_mask ((B, T) bool), got neither")
    if not 1 <= exit_layer <= cfg.num_layers:
        raise ValueError(f"forward_routed: exit_layer must be in 1..{cfg.num_layers}, got {exit_layer}")
    h = hidden_after(params, tokens, cfg, exit_layer)
    logits = output_head(params, h, cfg)  # (B, T, V)
    if exit_mask is None:
        exit_mask = confidence(logits) >= threshold
    if exit_layer == cfg.num_layers or exit_mask.all():
        return logits, exit_mask
    deep = token_subset(~exit_mask)
    for layer in params['layers'][exit_layer:]:
        h = block(layer, h, cfg, deep)
    deep_logits = output_head(params, h.flatten(0, 1)[deep['index']], cfg)  # (M, V)
    # in place is safe (no backward reads logits); view raises where flatten would silently copy
    logits.view(-1, logits.shape[-1]).index_copy_(0, deep['index'], deep_logits)
    return logits, exit_mask


def routed_flops(cfg, exit_mask, exit_layer):
    """Matrix-multiply FLOPs (2 per multiply-add) of early exit for one batch with this exit mask (B, T).

    Per token and layer: q, k, v, o projections 8 D^2, SwiGLU feed-forward 6 D F, attention scores and weighted
    sum 4 D (t + 1) at position t; an exited token costs 4 D^2 (its key and value) in each layer above the exit
    (the queries that forward_routed's attention computes and drops are not charged). The head costs 2 D V per
    token each time it runs: once at exit_layer for all tokens, once more for the continuing ones.
    exit_layer = num_layers with no exits is the plain forward."""
    D, V, L = cfg.dim, cfg.vocab_size, cfg.num_layers
    exit_mask = exit_mask.double()
    B, T = exit_mask.shape
    keys_seen = torch.arange(1, T + 1, dtype=torch.float64, device=exit_mask.device)  # (T,)
    per_token = 8 * D * D + 6 * D * cfg.ffn_dim + 4 * D * keys_seen
    go_on = 1 - exit_mask
    lower = exit_layer * B * per_token.sum()
    upper = (L - exit_layer) * ((go_on * per_token).sum() + 4 * D * D * exit_mask.sum())
    heads = 2 * D * V * (B * T + (go_on.sum() if exit_layer < L else 0))
    return float(lower + upper + heads)


# ----------------------------------------------------------------------------------------------------------------
# generation: one token at a time with a key/value cache


def block_cached(p, h, cache, pos, rope, cfg, rows=None, pending=None):
    """A block for S new tokens h (B, S, D) at positions pos..pos + S - 1 with a key/value cache {'k', 'v'}
    (B, H, T_max, Dh): they store their keys and values there and attend to every stored one. rope: (cos, sin)
    tables of all positions. With rows (R,), only those batch rows are updated (the others keep their state).

    Early exit defers the deeper layers' keys and values of exited tokens: pending (B, P, D) holds this layer's
    input state of the P positions just before pos that exited below it (their exit states, copied upward); their
    keys and values are computed here, in the same projection as the new tokens'."""
    S = h.shape[1]
    H, end = cfg.num_heads, pos + S
    heads = lambda name, y: rearrange(linear(p['attn'][name], y), 'b s (h d) -> b h s d', h=H)
    h_kv = h if pending is None else torch.cat([pending, h], 1)
    start = end - h_kv.shape[1]
    x_kv = rms_norm(p['attn_norm'], h_kv, cfg.norm_eps)
    x = x_kv[:, -S:]
    cos, sin = rope
    cache['k'][:, :, start:end] = apply_rope(heads('wk', x_kv), cos[start:end], sin[start:end])
    cache['v'][:, :, start:end] = heads('wv', x_kv)
    keys, values, h_q, x_q = cache['k'][:, :, :end], cache['v'][:, :, :end], h, x
    if rows is not None:
        keys, values, h_q, x_q = keys[rows], values[rows], h[rows], x[rows]
    # is_causal aligns the mask top-left, right only when pos = 0: S > 1 happens only for the prompt, at 0
    q = apply_rope(heads('wq', x_q), cos[pos:end], sin[pos:end])
    out = F.scaled_dot_product_attention(q, keys, values, is_causal=S > 1)
    out = h_q + linear(p['attn']['wo'], rearrange(out, 'b h s d -> b s (h d)'))
    out = out + swiglu_ffn(p['ffn'], rms_norm(p['ffn_norm'], out, cfg.norm_eps))
    return out if rows is None else h.index_copy(0, rows, out)


@torch.no_grad()
def generate(params, prompt, cfg, config, max_new_tokens, temperature=0.0, gen=None):
    """Continue prompt (B, T0) by max_new_tokens tokens, one at a time with a key/value cache per layer
    -> (tokens (B, T0 + max_new_tokens), exit_mask (B, max_new_tokens)).

    All but the last prompt token run at full depth once. Then each step feeds one token; with
    config.routing_threshold the head reads it after config.exit_layer, and a row whose max softmax probability
    there is >= the threshold takes that prediction (exit_mask) and skips the deeper layers' query, attention and
    feed-forward. Later tokens still attend to it in those layers: as CALM (Schuster et al. 2022) does, its exit
    hidden state is copied upward and each deeper layer computes its key and value from that copy, exactly what
    forward_routed does for a whole sequence (here they are computed when the deeper layers next run, for all
    tokens exited since in one go). temperature 0 is greedy; above 0, tokens are sampled from
    softmax(logits / temperature) with gen."""
    _check_config(config, cfg)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature: expected >= 0, got {temperature!r}")
    h = embed(params, prompt, cfg)  # checks the prompt
    if prompt.shape[1] < 1:
        raise ValueError("generate: prompt: expected at least one token")
    (B, T0), T_max = prompt.shape, prompt.shape[1] + max_new_tokens
    L, H, Dh = cfg.num_layers, cfg.num_heads, cfg.dim // cfg.num_heads
    exit_layer = config.exit_layer if config.routing_threshold is not None else L
    rope = rope_tables(torch.arange(T_max, device=h.device), Dh, cfg.rope_base)
    caches = [{'k': h.new_zeros(B, H, T_max, Dh), 'v': h.new_zeros(B, H, T_max, Dh)} for _ in range(L)]
    # exit states, the deeper layers' input for positions they skipped: written on steps where every row exited
    # (on a mixed step the deeper layers run and compute the exited rows' keys and values then)
    exit_states = h.new_zeros(B, T_max, cfg.dim)
    h = h[:, :-1]
    for layer, cache in zip(params['layers'], caches) if T0 > 1 else ():
        h = block_cached(layer, h, cache, 0, rope, cfg)
    stored = T0 - 1  # the deeper layers hold the keys and values of positions < stored
    token, tokens, exits = prompt[:, -1:], [prompt], []
    for t in range(T0 - 1, T_max - 1):
        h = params['embed'][token]  # (B, 1, D)
        for layer, cache in zip(params['layers'][:exit_layer], caches):
            h = block_cached(layer, h, cache, t, rope, cfg)
        logits = output_head(params, h[:, 0], cfg)  # (B, V)
        exit_mask = torch.zeros(B, dtype=torch.bool, device=h.device)
        if exit_layer < L:
            exit_mask = confidence(logits) >= config.routing_threshold
            go_on = [b for b, exited in enumerate(exit_mask.tolist()) if not exited]  # one host sync
            if not go_on:
                exit_states[:, t] = h[:, 0]  # copied upward; keys and values when the deeper layers next run
            else:
                rows = None if len(go_on) == B else torch.tensor(go_on, device=h.device)
                pending = exit_states[:, stored:t] if stored < t else None
                for layer, cache in zip(params['layers'][exit_layer:], caches[exit_layer:]):
                    h = block_cached(layer, h, cache, t, rope, cfg, rows, pending)
                stored = t + 1
                deep_logits = output_head(params, h[:, 0] if rows is None else h[rows, 0], cfg)
                logits = deep_logits if rows is None else logits.index_copy(0, rows, deep_logits)
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)
        tokens.append(token)
        exits.append(exit_mask)
    return torch.cat(tokens, 1), torch.stack(exits, 1)


# ----------------------------------------------------------------------------------------------------------------
# loss, optimizer, evaluation, early stopping


def compute_loss(params, batch, config, cfg, fast_path=True):
    """Σ_l w_l · CE(head(h_l), targets) over batch = (inputs (B, T), targets (B, T)); IGNORE targets carry no loss.

    When only the last weight is non-zero (standard training) and fast_path is on, the head runs once instead of
    after every layer; the loss is the same."""
    _check_config(config, cfg)
    inputs, targets = batch[0], batch[1]
    if fast_path and config.last_layer_only:
        logits = forward(params, inputs, cfg)
        return config.layer_weights[cfg.num_layers] * F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss = 0.0
    for l, logits in enumerate(forward_all_layers(params, inputs, cfg), start=1):
        if config.layer_weights[l] > 0:
            loss = loss + config.layer_weights[l] * F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return loss


def tree_leaves(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree
    return [leaf for item in items for leaf in tree_leaves(item)]


def create_optimizer(params, config, base_lr, weight_decay=0.0):
    """AdamW with one param group per layer, lr = base_lr · layer_lr_scales[l].

    The embedding feeds layer 1 and gets its scale; the head is shared by every exit layer, so no one layer's
    scale is its own: it gets base_lr. Tensors with requires_grad=False (ASHEM's frozen part) are left out."""
    if len(params['layers']) != config.num_layers:
        raise ValueError(f"TrainingConfig names {config.num_layers} layers, params have {len(params['layers'])}")
    named = [('embed', params['embed'], config.layer_lr_scales[1])]
    named += [(f'layer{l}', layer, config.layer_lr_scales[l]) for l, layer in enumerate(params['layers'], 1)]
    named.append(('head', params['head'], 1.0))
    groups = []
    for name, tree, scale in named:
        trainable = [t for t in tree_leaves(tree) if t.requires_grad]
        if trainable:
            groups.append({'params': trainable, 'lr': base_lr * scale, 'name': name})
    if not groups:
        raise ValueError("create_optimizer: no parameter requires grad")
    return torch.optim.AdamW(groups, lr=base_lr, weight_decay=weight_decay)


def _ppl(nll_sum, count):
    return math.exp(nll_sum / count) if count else float('nan')


@torch.no_grad()
def evaluate(params, batches, config, cfg, hard_masks=None):
    """Loss, PPL and accuracy over batches of (inputs, targets). With config.routing_threshold: per-token early exit
    at config.exit_layer; exit rate, accuracy of exited and continuing tokens, compute cost (token-layers run /
    (tokens · L)) and flop_cost (routed_flops / plain forward). hard_masks (one (B, T) bool per batch) adds the PPL
    of those tokens and of the rest."""
    _check_config(config, cfg)
    L = cfg.num_layers
    exit_layer = config.exit_layer if config.routing_threshold is not None else L
    sums = dict.fromkeys(('nll', 'correct', 'tokens', 'exited', 'exited_correct', 'token_layers', 'flops',
                          'full_flops', 'hard_nll', 'hard', 'easy_nll'), 0.0)
    for i, (inputs, targets) in enumerate(batches):
        if config.routing_threshold is None:
            logits, exit_mask = forward(params, inputs, cfg), torch.zeros_like(inputs, dtype=torch.bool)
        else:
            logits, exit_mask = forward_routed(params, inputs, cfg, exit_layer, config.routing_threshold)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='none').view_as(targets)
        correct = logits.argmax(-1) == targets
        sums['nll'] += nll.sum().item()
        sums['correct'] += correct.sum().item()
        sums['tokens'] += targets.numel()
        sums['exited'] += exit_mask.sum().item()
        sums['exited_correct'] += (correct & exit_mask).sum().item()
        sums['token_layers'] += targets.numel() * exit_layer + (~exit_mask).sum().item() * (L - exit_layer)
        sums['flops'] += routed_flops(cfg, exit_mask, exit_layer)
        sums['full_flops'] += routed_flops(cfg, torch.zeros_like(exit_mask), L)
        if hard_masks is not None:
            hard = hard_masks[i]
            sums['hard_nll'] += nll[hard].sum().item()
            sums['hard'] += hard.sum().item()
            sums['easy_nll'] += nll[~hard].sum().item()
    n, exited = sums['tokens'], sums['exited']
    stats = {'loss': sums['nll'] / n, 'ppl': _ppl(sums['nll'], n), 'accuracy': sums['correct'] / n,
             'exit_rate': exited / n,
             'exited_accuracy': sums['exited_correct'] / exited if exited else float('nan'),
             'continued_accuracy': ((sums['correct'] - sums['exited_correct']) / (n - exited)
                                    if n > exited else float('nan')),
             'compute_cost': sums['token_layers'] / (n * L), 'flop_cost': sums['flops'] / sums['full_flops'],
             'tokens': int(n), 'token_layers': sums['token_layers'], 'flops': sums['flops']}
    if hard_masks is not None:
        stats['hard_ppl'] = _ppl(sums['hard_nll'], sums['hard'])
        stats['easy_ppl'] = _ppl(sums['easy_nll'], n - sums['hard'])
        stats['hard_fraction'] = sums['hard'] / n
    return stats


def new_training_state():
    return {'epoch': 0, 'batch': 0, 'step': 0, 'best_loss': float('inf'), 'best_epoch': 0, 'best_params': None,
            'bad_epochs': 0, 'stopped': False, 'history': []}


def train_with_early_stopping(params, loss_fn, optimizer, train_batches, val_fn, max_epochs, patience=1,
                              max_steps=None, state=None, on_step=None, on_epoch=None):
    """Train epoch by epoch; stop once the validation loss has not improved for `patience` epochs in a row (or at
    max_epochs / max_steps) and copy the best epoch's params back into `params`.

    loss_fn(params, batch) -> scalar; train_batches(epoch) -> iterable of batches (deterministic per epoch, so a
    run resumed mid-epoch skips the batches it already took); val_fn(params) -> validation loss.
    `state` (from new_training_state or a checkpoint) is updated after every step; on_step(state, loss) and
    on_epoch(state, val_loss) are where a caller prints and saves. Returns the state."""
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience: expected an int >= 1, got {patience!r}")
    state = new_training_state() if state is None else state
    leaves = tree_leaves(params)
    if state['best_params'] is None:
        state['best_params'] = [t.detach().clone() for t in leaves]
    out_of_steps = lambda: max_steps is not None and state['step'] >= max_steps
    while not state['stopped'] and state['epoch'] < max_epochs and not out_of_steps():
        for i, batch in enumerate(train_batches(state['epoch'])):
            if i < state['batch']:
                continue
            if out_of_steps():
                break
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(params, batch)
            loss.backward()
            optimizer.step()
            state['batch'], state['step'] = i + 1, state['step'] + 1
            if on_step is not None:
                on_step(state, loss.item())
        val_loss = float(val_fn(params))
        state['history'].append(val_loss)
        if val_loss < state['best_loss']:
            state['best_loss'], state['best_epoch'], state['bad_epochs'] = val_loss, state['epoch'] + 1, 0
            state['best_params'] = [t.detach().clone() for t in leaves]
        else:
            state['bad_epochs'] += 1
            state['stopped'] = state['bad_epochs'] >= patience
        state['epoch'], state['batch'] = state['epoch'] + 1, 0
        if on_epoch is not None:
            on_epoch(state, val_loss)
    with torch.no_grad():
        for t, best in zip(leaves, state['best_params']):
            t.copy_(best)
    return state


# ----------------------------------------------------------------------------------------------------------------
# ASHEM: hard-example mining, growing the model, two-stage routing


def map_tree(fn, tree):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tree(fn, v) for k, v in tree.items()}
    return [map_tree(fn, v) for v in tree]


def grow_transformer(params, cfg, num_layers, gen):
    """Phase 2's model: a frozen copy of params (requires_grad=False: embedding, layers and the shared head) with
    num_layers - L new trainable blocks on top -> (params, cfg).

    The head stays frozen so that tokens exiting after the old layers get exactly the shallow model's predictions.
    The new blocks' residual output projections start at zero, so the grown model starts as the shallow one and
    phase 2 can only improve on it."""
    if num_layers <= cfg.num_layers:
        raise ValueError(f"grow_transformer: num_layers must exceed the current {cfg.num_layers}, got {num_layers}")
    new_cfg = replace(cfg, num_layers=num_layers)
    frozen = map_tree(lambda t: t.detach().clone(), params)
    device = params['embed'].device
    new_layers = map_tree(lambda t: t.to(device).requires_grad_(),
                          [init_block(gen, new_cfg, 0.0) for _ in range(num_layers - cfg.num_layers)])
    return {'embed': frozen['embed'], 'layers': frozen['layers'] + new_layers, 'head': frozen['head']}, new_cfg


@torch.no_grad()
def token_confidence(params, batches, cfg, layer):
    """Max softmax probability of the head after `layer`, for every input token: one (B, T) tensor per batch."""
    if not 1 <= layer <= cfg.num_layers:
        raise ValueError(f"token_confidence: layer must be in 1..{cfg.num_layers}, got {layer}")
    return [confidence(output_head(params, hidden_after(params, batch[0], cfg, layer), cfg)) for batch in batches]


def mine_hard_examples(conf, ratio):
    """conf (...) -> (hard (...) bool, threshold): exactly round(ratio · N) tokens, the least confident, are hard
    (ties broken by position); routing sends a token deep iff its confidence < threshold (the least confident
    easy token's confidence), which on these tokens reproduces the split up to exact ties."""
    flat = conf.flatten()
    k = round(ratio * flat.numel())
    if not 0 < k < flat.numel():
        raise ValueError(f"mine_hard_examples: ratio {ratio} of {flat.numel()} tokens leaves one side empty")
    order = torch.sort(flat, stable=True).indices
    hard = torch.zeros_like(flat, dtype=torch.bool)
    hard[order[:k]] = True
    return hard.view_as(conf), float(flat[order[k]])


def ashem_loss(params, batch, cfg, exit_layer):
    """Phase-2 loss on batch = (inputs, targets, exit_mask): the easy tokens (exit_mask) leave after exit_layer
    exactly as at inference, so the new layers see and learn from the hard tokens only."""
    inputs, targets, exit_mask = batch
    logits, _ = forward_routed(params, inputs, cfg, exit_layer, exit_mask=exit_mask)
    hard_targets = torch.where(exit_mask, torch.full_like(targets, IGNORE), targets)
    nll = F.cross_entropy(logits.flatten(0, 1), hard_targets.flatten(), reduction='sum')
    return nll / max(int((~exit_mask).sum()), 1)


# ----------------------------------------------------------------------------------------------------------------
# data: bytes of a UTF-8 text


def builtin_corpus():
    """The prose of Python's own documentation (the language reference topics `pydoc` shows: pydoc_data/topics.py,
    ~0.47 MB of English with code examples). It ships with every CPython, so it needs no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise RuntimeError("this Python has no pydoc_data (stripped install): pass --data PATH to a UTF-8 text "
                           "file") from e
    return '\n\n'.join(topics[key] for key in sorted(topics)).encode('utf-8')


def load_corpus(path=None):
    """UTF-8 file (or the built-in corpus) -> byte tokens (N,) long, vocabulary 256."""
    if path is None:
        data = builtin_corpus()
    else:
        with open(path, 'rb') as f:
            data = f.read()
        try:
            data.decode('utf-8')
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split_corpus(tokens, val_fraction=0.05, test_fraction=0.05):
    """Contiguous train / val / test pieces (the last val_fraction + test_fraction of the text is held out)."""
    n = tokens.numel()
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    if min(n - n_val - n_test, n_val, n_test) < 2:
        raise ValueError(f"split_corpus: {n} tokens are too few for fractions {val_fraction}, {test_fraction}")
    return tokens[:n - n_val - n_test], tokens[n - n_val - n_test:n - n_test], tokens[n - n_test:]


def make_windows(tokens, seq_len, offset=0):
    """Non-overlapping windows of seq_len + 1 tokens from `offset` on -> (W, seq_len + 1); inputs are [:, :-1],
    targets (the next byte) [:, 1:]."""
    count = (tokens.numel() - offset - 1) // seq_len
    if count < 1:
        raise ValueError(f"make_windows: {tokens.numel()} tokens give no window of seq_len {seq_len}")
    starts = offset + seq_len * torch.arange(count)
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]


def batch_windows(windows, batch_size, gen=None, mask=None):
    """(W, T + 1) windows -> list of (inputs (b, T), targets (b, T)[, mask (b, T)]), shuffled when gen is given."""
    order = torch.randperm(len(windows), generator=gen) if gen is not None else torch.arange(len(windows))
    batches = []
    for i in range(0, len(windows), batch_size):
        w = windows[order[i:i + batch_size]]
        batches.append((w[:, :-1], w[:, 1:]) + ((mask[order[i:i + batch_size]],) if mask is not None else ()))
    return batches


def epoch_batches(tokens, seq_len, batch_size, seed, epoch):
    """Training batches of one epoch: windows from a random offset, shuffled; the same for the same (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    offset = int(torch.randint(seq_len, (1,), generator=gen))
    return batch_windows(make_windows(tokens, seq_len, offset), batch_size, gen)
