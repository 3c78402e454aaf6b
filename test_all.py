"""All tests. `python -m pytest -q test_all.py` (CPU, < 10 min on 2 cores); GPU tests: `pytest -m gpu test_all.py`.

Sections follow the files: foundation (train.py), plastic.py, lash.py, hpcm.py. Every test compares against an
independent computation (a dense matrix, an O(T^2) sum, a hand formula, a stdlib decoder), never the same code.
"""
import argparse
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import train

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

settings.register_profile('ci', max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile('thorough', max_examples=200, deadline=None)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


def has_cupy():
    try:
        import cupy  # noqa: F401
        return torch.cuda.is_available()
    except Exception:
        return False


needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
needs_cupy = [pytest.mark.gpu, pytest.mark.skipif(not has_cupy(), reason='needs CUDA and cupy')]


def run_train(*argv, timeout=600):
    return subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


# ================================================================================================================
# foundation: train.py helpers


def decode_png_independently(data):
    """A second PNG decoder for filter-0 files, from the spec: chunks, CRCs, zlib, rows."""
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack('>I', data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack('>I', data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xffffffff
        chunks.setdefault(kind, []).append(body)
        pos += 12 + n
    w, h, depth, colour = struct.unpack('>IIBB', chunks[b'IHDR'][0][:10])
    c = {0: 1, 2: 3}[colour]
    raw = np.frombuffer(zlib.decompress(b''.join(chunks[b'IDAT'])), np.uint8).reshape(h, w * c + 1)
    assert depth == 8 and (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, c).squeeze(-1) if c == 1 else raw[:, 1:].reshape(h, w, c)


@given(h=st.integers(1, 17), w=st.integers(1, 17), rgb=st.booleans(), seed=st.integers(0, 2**16))
def test_train_png_roundtrip(tmp_path_factory, h, w, rgb, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp('png') / 'x.png')
    train.write_png(path, img)
    with open(path, 'rb') as f:
        assert np.array_equal(decode_png_independently(f.read()), img)
    back = train.read_image(path)
    assert np.array_equal(back, img if rgb else np.repeat(img[..., None], 3, axis=2))


@settings(max_examples=25)
@given(h=st.integers(1, 9), w=st.integers(1, 9), channels=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2**16),
       filters=st.sampled_from(['mixed', 'none/sub/up']))
def test_train_read_image_all_png_filters(tmp_path_factory, h, w, channels, seed, filters):
    """read_image undoes None/Sub/Up/Average/Paeth in any order of rows: rows encoded by the PNG spec's formulas,
    one byte at a time (grey, grey+alpha, RGB, RGBA; both the per-row and the anti-diagonal decoder)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    ftypes = rng.integers(0, 5 if filters == 'mixed' else 3, h)
    rows, prev = [], [0] * (w * channels)
    for y in range(h):
        cur = img[y].reshape(-1).tolist()
        out = [int(ftypes[y])]
        for x in range(w * channels):
            a, b = (cur[x - channels] if x >= channels else 0), prev[x]
            c = prev[x - channels] if x >= channels else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            paeth = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out.append((cur[x] - [0, a, b, (a + b) // 2, paeth][ftypes[y]]) % 256)
        rows.append(bytes(out))
        prev = cur
    chunk = lambda k, d: struct.pack('>I', len(d)) + k + d + struct.pack('>I', zlib.crc32(k + d) & 0xffffffff)
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    data = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, colour, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b''.join(rows))) + chunk(b'IEND', b''))
    path = tmp_path_factory.mktemp('png') / 'f.png'
    path.write_bytes(data)
    expected = np.repeat(img[..., :1], 3, axis=2) if channels < 3 else img[..., :3]
    assert np.array_equal(train.read_image(str(path)), expected)


def test_train_read_image_ppm_and_damaged_files_name_the_file(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    (tmp_path / 'f.ppm').write_bytes(b'P6\n# comment\n5 6\n255\n' + img.tobytes())
    assert np.array_equal(train.read_image(str(tmp_path / 'f.ppm')), img)
    train.write_png(str(tmp_path / 'ok.png'), img)
    good = (tmp_path / 'ok.png').read_bytes()
    for name, data in (('short.ppm', b'P6\n5 6\n255\n' + img.tobytes()[:-1]), ('trunc.png', good[:40]),
                       ('zlib.png', good[:41] + bytes(20) + good[61:]), ('text.png', b'hello')):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            train.read_image(str(tmp_path / name))


def tiny_model():
    params = {'layer': {'w': torch.randn(3, 4, requires_grad=True), 'b': torch.zeros(3, requires_grad=True)}}
    opt = torch.optim.AdamW(train.tree_leaves(params), lr=1e-2)
    return params, opt


def test_train_checkpoint_atomic_when_crashing_before_rename(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    params, _ = tiny_model()
    train.save_checkpoint(path, {'params': params, 'step': 1})

    def crash(src, dst):
        raise KeyboardInterrupt('simulated crash between write and rename')
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {'params': params, 'step': 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)['step'] == 1
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_train_resume_restores_step_params_and_optimizer(tmp_path, capsys):
    path = str(tmp_path / 'ckpt.pt')
    params, opt = tiny_model()
    for _ in range(3):
        opt.zero_grad()
        (params['layer']['w'].sum() ** 2 + params['layer']['b'].square().sum()).backward()
        opt.step()
    train.save_checkpoint(path, {'params': params, 'buffers': {}, 'opt': opt.state_dict(), 'step': 3,
                                 'args': {'width': 4, 'lr': 1e-2}})
    fresh, fresh_opt = tiny_model()
    payload = train.load_checkpoint(path, fresh, {}, fresh_opt)
    assert payload['step'] == 3
    for a, b in zip(train.tree_leaves(params), train.tree_leaves(fresh)):
        assert torch.equal(a, b)
    saved_state, loaded_state = opt.state_dict()['state'], fresh_opt.state_dict()['state']
    for k in saved_state:
        assert torch.equal(saved_state[k]['exp_avg'], loaded_state[k]['exp_avg'])
    assert capsys.readouterr().out == ''
    # a resumed run's own --lr and weight decay replace the checkpoint's; the moments stay the checkpoint's
    new = argparse.Namespace(lr=0.5, weight_decay=0.25)
    fresh, fresh_opt = tiny_model()
    for group in fresh_opt.param_groups:
        group['lr'], group['weight_decay'] = new.lr, new.weight_decay
    train.load_checkpoint(path, fresh, {}, fresh_opt, new)
    assert all(g['lr'] == 0.5 and g['weight_decay'] == 0.25 for g in fresh_opt.param_groups)
    for k in saved_state:
        assert torch.equal(saved_state[k]['exp_avg'], fresh_opt.state_dict()['state'][k]['exp_avg'])
    assert capsys.readouterr().out.endswith('resumed with --lr 0.5 (the checkpoint was trained with 0.01)\n')
    wrong = {'layer': {'w': torch.zeros(3, 5), 'b': torch.zeros(3)}}
    with pytest.raises(ValueError, match=r"'layer.w' has shape \(3, 4\)"):
        train.load_checkpoint(path, wrong)
    class Args:
        width = 8
    with pytest.raises(ValueError, match='--width'):
        train.load_checkpoint(path, fresh, args=Args(), must_match=('width',))
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='cannot be read'):
        train.load_checkpoint(str(tmp_path / 'junk.pt'), fresh)


def test_train_run_loop_saves_on_interrupt():
    saved = []

    def step_fn(step):
        if step == 4:
            raise KeyboardInterrupt
        return {'loss': 1.0 / (step + 1)}
    with pytest.raises(KeyboardInterrupt):
        train.run_loop(10, 0, step_fn, saved.append, log_every=100, save_every=100)
    assert saved == [4]
    assert train.run_loop(6, 4, lambda s: {'loss': 0.5}, saved.append, log_every=100, save_every=100) == 6
    assert saved[-1] == 6


def test_train_cli_errors_and_help(capsys):
    top = run_train('--help')
    assert top.returncode == 0 and all(s in top.stdout for s in ('ctm', 'lash', 'ashem', 'hpcm'))
    for sub in ('ctm', 'lash', 'ashem', 'hpcm'):
        with pytest.raises(SystemExit) as e:
            train.main([sub, '--help'])
        assert e.value.code == 0 and '--seed' in capsys.readouterr().out
    for argv, message in ((['nonsense'], 'invalid choice'), (['ctm', '--no_such_flag'], '--no_such_flag')):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code != 0 and message in capsys.readouterr().err


# ================================================================================================================
# plastic.py: the CTM

import math  # noqa: E402

import plastic  # noqa: E402  (imported in this section, as each section does)


def small_ctm_config(**over):
    base = dict(iterations=4, d_model=32, d_input=16, heads=2, n_synch_out=8, n_synch_action=8, synapse_depth=3,
                memory_length=4, deep_nlms=True, memory_hidden_dims=4, backbone_type='none',
                positional_embedding_type='none', out_dims=6, prediction_reshaper=(2, 3), in_channels=5)
    base.update(over)
    return plastic.CTMConfig(**base)


@given(b=st.integers(1, 3), n=st.integers(1, 5), m=st.integers(1, 6), h=st.integers(1, 4), norm=st.booleans(),
       seed=st.integers(0, 2**16))
def test_ctm_super_linear_matches_loop_over_neurons(b, n, m, h, norm, seed):
    gen = torch.Generator().manual_seed(seed)
    p = plastic.init_super_linear(gen, m, h, n, do_norm=norm)
    assert p['w1'].abs().max() <= 1 / np.sqrt(m + h) and torch.equal(p['T'], torch.ones(1))
    p['T'] = torch.tensor([0.7])
    p['b1'] = torch.randn(1, n, h, generator=gen)
    x = torch.randn(b, n, m, generator=gen)
    out = plastic.super_linear(p, x)
    for d in range(n):
        xd = x[:, d]
        if norm:
            xd = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
        expected = (xd @ p['w1'][:, :, d] + p['b1'][0, d]) / 0.7
        torch.testing.assert_close(out[:, d], expected, rtol=1e-5, atol=1e-5)


@given(steps=st.integers(1, 6), n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_ctm_synchronisation_equals_direct_decayed_sum(steps, n, seed):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(steps, 2, 6, generator=gen, dtype=torch.float64)
    left, right = torch.randint(0, 6, (n,), generator=gen), torch.randint(0, 6, (n,), generator=gen)
    decay = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    r = torch.exp(-decay)
    alpha = beta = None
    for t in range(steps):
        sync, alpha, beta = plastic.synchronisation(zs[t], alpha, beta, r, left, right)
    age = torch.arange(steps - 1, -1, -1, dtype=torch.float64)[:, None]  # ticks ago
    weights = torch.exp(-age * decay)  # (steps, n)
    direct = (weights[:, None] * zs[:, :, left] * zs[:, :, right]).sum(0) / torch.sqrt(weights.sum(0))
    torch.testing.assert_close(sync, direct)


def test_ctm_certainty_is_one_minus_hand_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0, 100.0, 0.0, 0.0]])
    ce = plastic.certainty(logits, (2, 3))
    # row 1: two uniform groups -> entropy 1; row 2: group (3/5, 1/5, 1/5) and a one-hot group
    p = [0.6, 0.2, 0.2]
    h = -sum(q * math.log(q) for q in p) / math.log(3)
    torch.testing.assert_close(ce, torch.tensor([[1.0, 0.0], [h / 2, 1 - h / 2]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(plastic.certainty(logits, (-1,))[0], torch.tensor([1.0, 0.0]))


def original_unet(p, x):
    """The original SynapseUNET forward written with torch.nn modules carrying the same weights."""
    def seq(level):
        lin = torch.nn.Linear(*reversed(level['lin']['weight'].shape))
        ln = torch.nn.LayerNorm(level['ln']['weight'].shape[0])
        with torch.no_grad():
            lin.weight.copy_(level['lin']['weight']), lin.bias.copy_(level['lin']['bias'])
        return torch.nn.Sequential(lin, ln, torch.nn.SiLU())
    first, downs, ups = seq(p['first']), [seq(q) for q in p['down']], [seq(q) for q in p['up']]
    outs_down = [first(x)]
    for layer in downs:
        outs_down.append(layer(outs_down[-1]))
    out = outs_down[-1]
    for i in range(len(ups)):
        idx = len(ups) - 1 - i
        skip = outs_down[idx]
        out = torch.nn.functional.layer_norm(ups[idx](out) + skip, skip.shape[-1:])
    return out


def test_ctm_synapse_unet_widths_and_forward():
    assert plastic.synapse_widths(1024, 8) == [1024, 880, 736, 592, 448, 304, 160, 16]
    assert plastic.synapse_widths(100, 3) == [100, 58, 16]
    gen = torch.Generator().manual_seed(0)
    p = plastic.init_synapse_unet(gen, 24, 100, 3)
    assert [q['lin']['weight'].shape for q in p['down']] == [(58, 100), (16, 58)]
    assert [q['lin']['weight'].shape for q in p['up']] == [(100, 58), (58, 16)]
    assert p['first']['lin']['weight'].shape == (100, 24)
    x = torch.randn(5, 24, generator=gen)
    torch.testing.assert_close(plastic.synapse_unet(p, x), original_unet(p, x))
    shallow = plastic.init_synapse_unet(gen, 24, 10, 1)
    h = x @ shallow['first']['lin']['weight'].t() + shallow['first']['lin']['bias']
    expected = torch.nn.functional.layer_norm(h[:, :10] * torch.sigmoid(h[:, 10:]), (10,))
    torch.testing.assert_close(plastic.synapse_unet(shallow, x), expected)


def test_ctm_attention_matches_torch_multihead_attention():
    gen = torch.Generator().manual_seed(1)
    p = plastic.init_attention(gen, 16, 4)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(p['in_proj']['weight'])
        mha.in_proj_bias.copy_(torch.randn(48, generator=gen))
        p['in_proj']['bias'] = mha.in_proj_bias.detach().clone()
        mha.out_proj.weight.copy_(p['out']['weight']), mha.out_proj.bias.copy_(p['out']['bias'])
    q, kv = torch.randn(3, 1, 16, generator=gen), torch.randn(3, 7, 16, generator=gen)
    keys_values = plastic.attention_keys_values(p, kv, 4)
    torch.testing.assert_close(plastic.attention(p, q, keys_values, 4), mha(q, kv, kv)[0], rtol=1e-5, atol=1e-5)


def test_ctm_synch_pairs_follow_the_select_type():
    gen = torch.Generator().manual_seed(0)
    left, right = plastic.init_synch_pairs(gen, 20, 4, 'first-last', 'action')
    i, j = torch.triu_indices(4, 4)
    assert torch.equal(left, 16 + i) and torch.equal(right, 16 + j) and len(left) == 4 * 5 // 2
    left, right = plastic.init_synch_pairs(gen, 20, 4, 'first-last', 'out')
    assert torch.equal(left, i) and torch.equal(right, j)
    left, right = plastic.init_synch_pairs(gen, 20, 6, 'random-pairing', 'out', n_self=2)
    assert len(left) == 6 == plastic.synch_size(6, 'random-pairing') and torch.equal(left[:2], right[:2])
    left, right = plastic.init_synch_pairs(gen, 20, 5, 'random', 'out')
    assert len(left) == 15 and ((left >= 0) & (left < 20)).all()


@pytest.mark.parametrize('over, message', [
    (dict(heads=3), 'heads'), (dict(n_synch_out=33), 'n_synch_out'), (dict(n_synch_action=0), 'n_synch_action'),
    (dict(neuron_select_type='nearest'), 'neuron_select_type'), (dict(backbone_type='vgg'), 'backbone_type'),
    (dict(neuron_select_type='first-last', n_synch_out=20, n_synch_action=20),
     'n_synch_action: expected <= d_model - '),
    (dict(positional_embedding_type='learnable-fourier'), 'positional_embedding_type'),
    (dict(n_random_pairing_self=8), 'n_random_pairing_self'), (dict(hyper_layers='middle'), 'hyper_layers')])
def test_ctm_bad_configs_fail_clearly(over, message):
    with pytest.raises(ValueError, match=message):
        small_ctm_config(**over)


def test_ctm_forward_shapes_and_decay_clamp():
    cfg = small_ctm_config()
    params, buffers = plastic.init_ctm(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 4, 4)
    predictions, certainties, sync_out = plastic.ctm_forward(params, buffers, x, cfg)
    assert predictions.shape == (3, 6, 4) and certainties.shape == (3, 2, 4) and sync_out.shape == (3, 8)
    torch.testing.assert_close(certainties.sum(1), torch.ones(3, 4))
    # decay outside [0, 15] acts as the clamped value, as the original's in-place clamp
    wild = dict(params, decay_params_out=torch.full((8,), -3.0), decay_params_action=torch.full((8,), 40.0))
    tame = dict(params, decay_params_out=torch.zeros(8), decay_params_action=torch.full((8,), 15.0))
    torch.testing.assert_close(plastic.ctm_forward(wild, buffers, x, cfg)[0], plastic.ctm_forward(tame, buffers, x, cfg)[0])
    assert torch.equal(params['decay_params_out'], torch.zeros(8))
    # a sample's prediction does not depend on the rest of its batch (eval mode)
    torch.testing.assert_close(plastic.ctm_forward(params, buffers, x[:1], cfg)[0], predictions[:1])


@pytest.mark.parametrize('hyper', [{}, dict(hyper_layers='bottleneck', use_hyper_nlm=True)])
def test_ctm_trace_equals_the_untracked_forward_and_recomputes_by_hand(hyper):
    """ctm_trace's per-tick arrays: predictions/certainties equal ctm_forward's; attention equals
    nn.MultiheadAttention's per-head weights for the tracked action synchronisation; both synchronisations equal the
    direct decay-weighted sums over the tracked post-activations (the start state first); predictions are the
    output projection of the tracked sync_out; the last pre-activations feed the NLMs into the last post-activations."""
    cfg = small_ctm_config(backbone_type='resnet18-1', in_channels=3, neuron_select_type='random', **hyper)
    params, buffers = plastic.init_ctm(cfg, torch.Generator().manual_seed(0))
    params['decay_params_action'] = torch.rand(36, generator=torch.Generator().manual_seed(1)) * 2
    params['decay_params_out'] = torch.rand(36, generator=torch.Generator().manual_seed(2)) * 2
    x = torch.randn(3, 3, 8, 8)
    tr = plastic.ctm_trace(params, buffers, x, cfg)
    T, B, D = cfg.iterations, 3, cfg.d_model
    predictions, certainties, sync_out = plastic.ctm_forward(params, buffers, x, cfg)
    shapes = dict(pre_activations=(T, B, D), post_activations=(T, B, D), attention=(T, B, 2, 16),
                  sync_action=(T, B, 36), sync_out=(T, B, 36), predictions=(T, B, 6), certainties=(T, B, 2))
    assert {k: tuple(v.shape) for k, v in tr.items()} == shapes and not any(v.requires_grad for v in tr.values())
    torch.testing.assert_close(tr['predictions'], predictions.permute(2, 0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr['certainties'], certainties.permute(2, 0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr['sync_out'][-1], sync_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr['predictions'], tr['sync_out'] @ params['output_projector']['weight'].t()
                               + params['output_projector']['bias'], rtol=1e-5, atol=1e-6)
    zs = torch.cat([params['start_activated_state'].expand(1, B, D), tr['post_activations']])  # (T + 1, B, D)
    for which in ('out', 'action'):
        left, right = buffers[f'{which}_left'], buffers[f'{which}_right']
        decay = params[f'decay_params_{which}']
        offset = 1 if which == 'out' else 0  # the out sum also holds the start state
        for t in range(T):
            history = zs[:t + 1 + offset]
            age = torch.arange(len(history) - 1, -1, -1, dtype=torch.float32)[:, None]
            weights = torch.exp(-age * decay)
            direct = (weights[:, None] * history[:, :, left] * history[:, :, right]).sum(0) / weights.sum(0).sqrt()
            torch.testing.assert_close(tr[f'sync_{which}'][t], direct, rtol=1e-4, atol=1e-5)
    mha = torch.nn.MultiheadAttention(cfg.d_input, cfg.heads, batch_first=True)
    att = params['attention']
    with torch.no_grad():
        mha.in_proj_weight.copy_(att['in_proj']['weight']), mha.in_proj_bias.copy_(att['in_proj']['bias'])
        mha.out_proj.weight.copy_(att['out']['weight']), mha.out_proj.bias.copy_(att['out']['bias'])
        kv, _ = plastic.ctm_features(params, buffers, x, cfg)
        for t in range(T):
            q = (tr['sync_action'][t] @ params['q_proj']['weight'].t() + params['q_proj']['bias'])[:, None]
            expected = mha(q, kv, kv, need_weights=True, average_attn_weights=False)[1][:, :, 0]
            torch.testing.assert_close(tr['attention'][t], expected, rtol=1e-5, atol=1e-6)
    trace = torch.cat([params['start_trace'].expand(B, D, cfg.memory_length), tr['pre_activations'].permute(1, 2, 0)],
                      -1)[..., -cfg.memory_length:]
    last = plastic.nlm(params['nlm'], trace, tr['post_activations'][-2], cfg)
    torch.testing.assert_close(last, tr['post_activations'][-1], rtol=1e-5, atol=1e-6)


def test_ctm_resnet_stride_and_lora_scale():
    # torchvision's ResNet: layer1 keeps the resolution, layers 2-4 halve it in their first block only
    assert [[plastic.resnet_stride(s, b) for b in range(3)] for s in range(4)] == [[1, 1, 1]] + [[2, 1, 1]] * 3
    assert plastic.lora_scale(16, 4) == 0.125 and plastic.lora_scale(1, 1) == 1.0


@pytest.mark.parametrize('kind, channels, side, embedding', [
    ('resnet18-1', 64, 4, 'learnable-fourier'), ('resnet18-2', 128, 2, 'learnable-fourier'),
    ('conv', 16, 2, 'learnable-fourier'), ('resnet50-1', 256, 4, 'multi-learnable-fourier'),
    ('resnet50-2', 512, 2, 'none'), ('resnet101-1', 256, 4, 'none'), ('resnet152-2', 512, 2, 'none'),
    ('shallow-wide', 2048, 4, 'multi-learnable-fourier')])
def test_ctm_backbones_shapes_and_batch_norm_buffers(kind, channels, side, embedding):
    cfg = small_ctm_config(backbone_type=kind, in_channels=3, positional_embedding_type=embedding)
    params, buffers = plastic.init_ctm(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8)
    features, new = plastic.backbone(params['backbone'], buffers['backbone'], x, cfg, train=True)
    assert features.shape == (2, channels, side, side) and plastic.d_backbone(cfg) == channels
    old_flat, new_flat = train.flatten(buffers['backbone']), train.flatten(new)
    assert old_flat.keys() == new_flat.keys()
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in old_flat.items() if k.endswith('mean'))
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in new_flat.items() if k.endswith('mean'))
    assert plastic.ctm_forward(params, buffers, x, cfg)[0].shape == (2, 6, 4)


# The original's backbone parameter counts (models/resnet.py's prepare_resnet_backbone, models/modules.py's
# ShallowWide on 3 channels), read off the original once; hand_backbone_params counts them from the architecture.
ORIGINAL_BACKBONE_PARAMS = {'resnet18-1': 149824, 'resnet18-4': 11168832, 'resnet34-2': 1340224,
                            'resnet50-1': 217664, 'resnet50-2': 1437248, 'resnet50-3': 8535616,
                            'resnet50-4': 23500352, 'resnet101-3': 27527744, 'resnet152-3': 42051136,
                            'shallow-wide': 2486272}


def hand_backbone_params(kind, in_channels=3):
    """Weights + biases + batch-norm scales/shifts, counted from the architecture: ResNet = 3x3 stem conv (3 -> 64,
    no bias) + BN, then per block conv weights (BasicBlock 3x3 + 3x3, Bottleneck 1x1 + 3x3 + 1x1 at width `planes`,
    4·planes out) + a BN per conv + a 1x1 conv + BN on the skip path of each stage's first block when the shape
    changes; ShallowWide = conv3x3 (in -> 4096, bias) + BN(2048) + grouped conv3x3 (2048 -> 4096, 32 groups,
    bias) + BN(2048). The 1x1 'rgb' conv in front of a ResNet (in -> 3, bias) is not counted here."""
    if kind == 'shallow-wide':
        return (in_channels * 9 * 4096 + 4096) + 2 * 2048 + (2048 // 32 * 9 * 4096 + 4096) + 2 * 2048
    family, stages = kind.split('-')
    blocks = {'resnet18': [2, 2, 2, 2], 'resnet34': [3, 4, 6, 3], 'resnet50': [3, 4, 6, 3],
              'resnet101': [3, 4, 23, 3], 'resnet152': [3, 4, 36, 3]}[family]
    bottleneck = family in ('resnet50', 'resnet101', 'resnet152')
    total, c = 3 * 9 * 64 + 2 * 64, 64
    for s in range(int(stages)):
        planes = 64 * 2 ** s
        out = 4 * planes if bottleneck else planes
        for b in range(blocks[s]):
            if bottleneck:
                total += c * planes + planes * planes * 9 + planes * out + 2 * (planes + planes + out)
            else:
                total += c * planes * 9 + planes * planes * 9 + 2 * (planes + planes)
            if b == 0 and (s > 0 or c != out):
                total += c * out + 2 * out
            c = out
    return total


@pytest.mark.parametrize('kind', list(ORIGINAL_BACKBONE_PARAMS))
def test_ctm_backbone_param_counts_equal_the_originals(kind, monkeypatch):
    # shapes are all that is counted: weights on the meta device are never drawn (resnet152-3 has 42M of them)
    monkeypatch.setattr(plastic, 'uniform', lambda gen, shape, bound: torch.empty(shape, device='meta'))
    cfg = small_ctm_config(backbone_type=kind, in_channels=3)
    params, _ = plastic.init_backbone(torch.Generator().manual_seed(0), cfg)
    rgb = 3 * 3 + 3 if kind.startswith('resnet') else 0
    n = sum(t.numel() for t in train.tree_leaves(params)) - rgb
    assert n == hand_backbone_params(kind) == ORIGINAL_BACKBONE_PARAMS[kind]


def test_ctm_bottleneck_block_matches_a_hand_written_one():
    """A Bottleneck against torch.nn layers holding the same weights: 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN ->
    ReLU -> 1x1 -> BN, plus a strided 1x1 -> BN skip, then ReLU (training-mode batch norm)."""
    gen = torch.Generator().manual_seed(0)
    p, buf = plastic.init_resnet_block(gen, 8, 4, 2, bottleneck=True)
    assert p['conv2']['weight'].shape == (4, 4, 3, 3) and p['conv3']['weight'].shape == (16, 4, 1, 1)
    x = torch.randn(2, 8, 6, 6, generator=gen)
    f = torch.nn.functional
    bn = lambda t: f.batch_norm(t, None, None, training=True)
    h = f.relu(bn(f.conv2d(x, p['conv1']['weight'])))
    h = f.relu(bn(f.conv2d(h, p['conv2']['weight'], stride=2, padding=1)))
    expected = f.relu(bn(f.conv2d(h, p['conv3']['weight'])) + bn(f.conv2d(x, p['down']['conv']['weight'], stride=2)))
    out, new = plastic.resnet_block(p, buf, x, 2, train=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert new.keys() == buf.keys() == {'bn1', 'bn2', 'bn3', 'down'}


def test_ctm_multi_learnable_fourier_is_a_softmax_mix_and_counts_like_the_original():
    gen = torch.Generator().manual_seed(0)
    p = plastic.init_positional_embedding(gen, 'multi-learnable-fourier', 256)
    single = 2 * 128 + (256 * 128 + 128) + (64 * 256 + 256) + 2 * 256  # Wr, Linear(256, 128), Linear(64, d), LN(d)
    assert sum(t.numel() for t in train.tree_leaves(p)) == 10 * single + 10 == 503050  # + the 10 mixing weights
    stds = [q['Wr'].std().item() for q in p['embedders']]
    assert stds[0] < 1.5 and stds[-1] > 50  # gamma 1.0 .. 0.1: Wr ~ N(0, gamma^-2), low to high frequencies
    p['combination'] = torch.tensor([2.0] + [0.0] * 9)
    features = torch.zeros(1, 256, 3, 4)
    mixed = plastic.positional_embedding(p, 'multi-learnable-fourier', features)
    w = torch.softmax(p['combination'], 0)
    parts = [plastic.positional_embedding(q, 'learnable-fourier', features) for q in p['embedders']]
    torch.testing.assert_close(mixed, sum(wi * part for wi, part in zip(w, parts)), rtol=1e-5, atol=1e-6)
    assert mixed.shape == (1, 256, 3, 4)


def test_ctm_batch_norm_matches_torch_and_returns_new_stats():
    gen = torch.Generator().manual_seed(0)
    p, buf = plastic.init_batch_norm(3)
    p = {'weight': torch.rand(3, generator=gen) + 0.5, 'bias': torch.randn(3, generator=gen)}
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(p['weight']), bn.bias.copy_(p['bias'])
    x = torch.randn(4, 3, 5, 5, generator=gen) * 2 + 1
    y, new = plastic.batch_norm(p, buf, x, train=True)
    torch.testing.assert_close(y, bn(x))
    torch.testing.assert_close(new['mean'], bn.running_mean)
    torch.testing.assert_close(new['var'], bn.running_var)
    assert torch.equal(buf['mean'], torch.zeros(3))
    bn.eval()
    torch.testing.assert_close(plastic.batch_norm(p, new, x, train=False)[0], bn(x))


def bfs_distances(open_, source):
    dist = {source: 0}
    frontier = [source]
    while frontier:
        nxt = []
        for y, x in frontier:
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                q = (y + dy, x + dx)
                if 0 <= q[0] < open_.shape[0] and 0 <= q[1] < open_.shape[1] and open_[q] and q not in dist:
                    dist[q] = dist[(y, x)] + 1
                    nxt.append(q)
        frontier = nxt
    return dist


@given(size=st.sampled_from([5, 7, 9, 13, 21]), seed=st.integers(0, 2**32 - 1))
def test_ctm_mazes_are_perfect_and_routes_shortest(size, seed):
    open_, start, end, moves = plastic.generate_maze(np.random.default_rng(seed), size)
    cells = ((size - 1) // 2) ** 2
    n_open = int(open_.sum())
    edges = sum(int(open_[y, x] and open_[y + dy, x + dx]) for y in range(size) for x in range(size)
                for dy, dx in ((0, 1), (1, 0)) if y + dy < size and x + dx < size)
    dist = bfs_distances(open_, start)
    assert len(dist) == n_open == 2 * cells - 1 and edges == n_open - 1  # connected and a tree: perfect
    assert not open_[0].any() and not open_[:, 0].any() and start != end
    here = start
    for m in moves:
        here = (here[0] + plastic.MOVES[m][0], here[1] + plastic.MOVES[m][1])
        assert open_[here]
    assert here == end and len(moves) == dist[end]
    image = plastic.maze_image(open_, start, end)
    assert plastic.walk_route(image, moves)[-1] == end
    x, targets, images = plastic.maze_batch(np.random.default_rng(seed), 2, size, 6)
    assert x.shape == (2, 3, size, size) and x.min() == -1 and x.max() == 1 and targets.shape == (2, 6)


def test_ctm_maze_targets_are_padded_with_wait():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, targets, images = plastic.maze_batch(rng, 1, 5, 40)
        path = plastic.walk_route(images[0], targets[0].tolist())
        n_moves = int((targets[0] != plastic.WAIT).sum())
        assert (targets[0, n_moves:] == plastic.WAIT).all() and tuple(images[0][path[-1]]) == (0, 255, 0)


def loop_tick_rule(losses, certain):
    t1 = min(range(len(losses)), key=lambda t: (losses[t], t))
    t2 = max(range(len(certain)), key=lambda t: (certain[t], -t))
    return (losses[t1] + losses[t2]) / 2, t2


def test_ctm_classification_loss_picks_lowest_and_most_certain_ticks():
    gen = torch.Generator().manual_seed(0)
    predictions, targets = torch.randn(4, 3, 5, generator=gen), torch.tensor([0, 2, 1, 1])
    certainties = torch.rand(4, 2, 5, generator=gen)
    loss, chosen = plastic.classification_loss(predictions, certainties, targets)
    expected, expected_last = [], []
    for b in range(4):
        ce = [-torch.log_softmax(predictions[b, :, t], 0)[targets[b]].item() for t in range(5)]
        value, t2 = loop_tick_rule(ce, certainties[b, 1].tolist())
        expected.append(value)
        expected_last.append((min(ce) + ce[4]) / 2)  # lowest tick and the last tick
        assert chosen[b] == t2
    assert abs(loss.item() - np.mean(expected)) < 1e-5
    last, chosen = plastic.classification_loss(predictions, certainties, targets, use_most_certain=False)
    assert (chosen == 4).all() and abs(last.item() - np.mean(expected_last)) < 1e-5


def test_ctm_maze_loss_curriculum_and_ticks():
    gen = torch.Generator().manual_seed(0)
    B, R, T = 3, 9, 4
    targets = torch.randint(0, 5, (B, R), generator=gen)
    predictions = torch.randn(B, R, 5, T, generator=gen)
    # example 0 gets its first 4 steps right at tick 2: the curriculum then trains steps 0..(3 + lookahead)
    predictions[0, :4, :, 2] = torch.nn.functional.one_hot(targets[0, :4], 5).float() * 10
    predictions[0, 4, :, 2] = -torch.nn.functional.one_hot(targets[0, 4], 5).float() * 10
    certainties = torch.rand(B, 2, T, generator=gen)
    loss, chosen, upto = plastic.maze_loss(predictions, certainties, targets, cirriculum_lookahead=2)
    expected = []
    for b in range(B):
        prefix = 0
        for t in range(T):
            right = 0
            while right < R and predictions[b, right, :, t].argmax() == targets[b, right]:
                right += 1
            prefix = max(prefix, right - 1)
        n = min(prefix + 2, R)
        assert upto[b] == n
        ce = [np.mean([-torch.log_softmax(predictions[b, s, :, t], 0)[targets[b, s]].item() for s in range(n)])
              for t in range(T)]
        value, t2 = loop_tick_rule(ce, certainties[b, 1].tolist())
        expected.append(value)
        assert chosen[b] == t2
    assert upto[0] == 5
    assert abs(loss.item() - np.mean(expected)) < 1e-5


def test_ctm_parity_data_and_loss():
    x, y = plastic.parity_batch(torch.Generator().manual_seed(0), 6, 10)
    assert set(x.unique().tolist()) <= {-1.0, 1.0}
    for b in range(6):
        negatives = 0
        for t in range(10):
            negatives += x[b, t].item() == -1
            assert y[b, t] == negatives % 2
    predictions = torch.nn.functional.one_hot(y, 2).float()[..., None].repeat(1, 1, 1, 3) * 20
    loss, _ = plastic.parity_loss(predictions, torch.rand(6, 2, 3), y)
    assert loss.item() < 1e-6


def test_ctm_positional_embeddings():
    gen = torch.Generator().manual_seed(0)
    features = torch.zeros(2, 8, 3, 5)
    for kind in ('learnable-fourier', 'custom-rotational'):
        pe = plastic.positional_embedding(plastic.init_positional_embedding(gen, kind, 8), kind, features)
        assert pe.shape == (1, 8, 3, 5)
    p = plastic.init_positional_embedding(gen, 'custom-rotational-1d', 4)
    pe = plastic.positional_embedding(p, 'custom-rotational-1d', torch.zeros(1, 4, 3))
    angles = [0.0, math.pi / 2, math.pi]  # (0, 1) rotated by 0, 90, 180 degrees
    for k, a in enumerate(angles):
        vec = torch.tensor([-math.sin(a), math.cos(a)])
        torch.testing.assert_close(pe[0, :, k], p['proj']['weight'] @ vec + p['proj']['bias'], atol=1e-6, rtol=0)
    assert plastic.positional_embedding({}, 'none', features) == 0


def test_ctm_image_sources(tmp_path):
    for c, name in enumerate(('cat', 'dog')):
        os.makedirs(tmp_path / 'imgs' / name)
        for k in range(10):
            train.write_png(str(tmp_path / 'imgs' / name / f'{k}.png'), np.full((6, 9, 3), 40 * c + k, np.uint8))
    (x, y), (tx, ty), classes = plastic.load_image_folder(str(tmp_path / 'imgs'), train.read_image, 4)
    assert classes == ['cat', 'dog'] and x.shape == (18, 4, 4, 3) and len(tx) == 2 and list(ty) == [0, 1]
    assert x[y == 1].min() >= 40
    import pickle
    os.makedirs(tmp_path / 'cifar')
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(tmp_path / 'cifar' / name, 'wb') as f:
            pickle.dump({b'data': np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8), b'labels': [3, 7]}, f)
    (x, y), (tx, ty) = plastic.load_cifar10(str(tmp_path / 'cifar'))
    assert x.shape == (10, 32, 32, 3) and tx.shape == (2, 32, 32, 3) and list(ty) == [3, 7]
    assert x[0, 0, 1, 0] == 1 and x[0, 0, 0, 1] == 1024 % 256  # channel-major rows -> HWC
    images, labels = plastic.generated_images(np.random.default_rng(0), 50, 8)
    assert images.shape == (50, 8, 8, 3) and images.dtype == np.uint8 and labels.max() < 10
    assert plastic.images_to_tensor(images).shape == (50, 3, 8, 8)


def test_ctm_short_training_lowers_the_loss():
    cfg = small_ctm_config(backbone_type='conv', in_channels=3, out_dims=5 * 4, prediction_reshaper=(4, 5),
                           iterations=3)
    params, buffers = plastic.init_ctm(cfg, torch.Generator().manual_seed(0))
    leaves = [t.requires_grad_() for t in train.tree_leaves(params)]
    opt = torch.optim.AdamW(leaves, lr=1e-2)
    x, y, _ = plastic.maze_batch(np.random.default_rng(0), 8, 7, 4)
    losses = []
    for _ in range(25):
        kv, new = plastic.ctm_features(params, buffers, x, cfg, train=True)
        predictions, certainties, _ = plastic.ctm_think(params, buffers, kv, cfg, train=True)
        loss = plastic.maze_loss(predictions.reshape(8, 4, 5, -1), certainties, y)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        buffers = new
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])


def read_apng_independently(data):
    """Chunks (CRCs checked) -> (acTL, [(fcTL fields, frame)]), frames decoded from IDAT/fdAT by zlib, filter 0."""
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack('>I', data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack('>I', data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xffffffff
        chunks.append((kind, body))
        pos += 12 + n
    kinds = [k for k, _ in chunks]
    assert kinds[:2] == [b'IHDR', b'acTL'] and kinds[-1] == b'IEND'
    w, h, depth, colour = struct.unpack('>IIBB', chunks[0][1][:10])
    assert depth == 8 and colour == 2
    frames, seqs = [], []
    for (kind, body), (next_kind, next_body) in zip(chunks, chunks[1:]):
        if kind != b'fcTL':
            continue
        fields = struct.unpack('>IIIIIHHBB', body)
        seqs.append(fields[0])
        if next_kind == b'fdAT':
            seqs.append(struct.unpack('>I', next_body[:4])[0])
            next_body = next_body[4:]
        else:
            assert next_kind == b'IDAT'
        raw = np.frombuffer(zlib.decompress(next_body), np.uint8).reshape(h, w * 3 + 1)
        assert (raw[:, 0] == 0).all()
        frames.append((fields, raw[:, 1:].reshape(h, w, 3)))
    assert seqs == list(range(len(seqs)))  # fcTL and fdAT share one sequence, from 0
    return struct.unpack('>II', chunks[1][1]), frames


def test_ctm_apng_chunks_decode_back_to_the_frames(tmp_path):
    frames = [np.random.default_rng(k).integers(0, 256, (5, 7, 3), dtype=np.uint8) for k in range(3)]
    train.write_apng(str(tmp_path / 'a.png'), frames, delay_ms=120)
    data = (tmp_path / 'a.png').read_bytes()
    (n_frames, plays), decoded = read_apng_independently(data)
    assert (n_frames, plays) == (3, 0) and len(decoded) == 3
    for (fields, frame), want in zip(decoded, frames):
        assert fields[1:] == (7, 5, 0, 0, 120, 1000, 0, 0) and np.array_equal(frame, want)
    assert np.array_equal(decode_png_independently(data[:data.index(b'fdAT') - 4] + data[-12:]), frames[0])
    with pytest.raises(ValueError, match='write_apng'):
        train.write_apng(str(tmp_path / 'b.png'), [frames[0], frames[1][:4]])


def test_ctm_draw_line_paints_the_hand_computed_pixels():
    canvas = np.zeros((4, 6, 3), np.uint8)
    train.draw_line(canvas, 0, 0, 4, 2, (9, 8, 7))  # y = x / 2 rounded half up: 0, 1, 1, 2, 2
    assert sorted(zip(*np.nonzero(canvas[..., 0]))) == [(0, 0), (1, 1), (1, 2), (2, 3), (2, 4)]
    assert (canvas[1, 1] == (9, 8, 7)).all()
    canvas[:] = 0
    train.draw_line(canvas, 5, 3, 5, -3, (1, 1, 1))  # vertical, partly off the canvas
    assert sorted(zip(*np.nonzero(canvas[..., 0]))) == [(0, 5), (1, 5), (2, 5), (3, 5)]
    plot = train.line_plot([[0.0, 1.0]], 20, 30, 0.0, 1.0)  # margin 6: x 6..23, y 13 (value 0) .. 6 (value 1)
    assert (plot[13, 6] == train.PALETTE[0]).all() and (plot[6, 23] == train.PALETTE[0]).all()
    assert (plot[15, 10] == 0).all() and (plot[10, 4] == 0).all() and (plot[2, 2] == 255).all()  # axes, background
    marked = train.line_plot([[0.0, 1.0]], 20, 30, 0.0, 1.0, mark=0)  # a red line at tick 0: x 6, y 6..13
    assert (marked[6:14, 6] == (214, 39, 40)).all() and (marked[5, 6] == 255).all()
    assert np.array_equal(np.delete(marked, 6, 1), np.delete(plot, 6, 1))


def test_ctm_paint_route_paints_the_walked_cells_and_marks_the_wall_hit():
    image = np.zeros((3, 4, 3), np.uint8)  # black walls; white open cells; the red start at (0, 0)
    image[0, :3] = image[1, 2] = 255
    image[0, 0] = (255, 0, 0)
    big = train.upsample(image, 2)
    train.paint_route(big, image, [3, 3, 1, 1], 2, 0)  # right, right, down, then down into the wall at (2, 2)
    cells = lambda colour: sorted({(r // 2, c // 2) for r, c in zip(*np.nonzero((big == colour).all(-1)))})
    assert cells((255, 150, 0)) == [(0, 1), (0, 2)] and cells((0, 90, 255)) == [(1, 2)]
    big = train.upsample(image, 4)
    train.paint_route(big, image, [3, plastic.WAIT, 3], 4, 1)  # no wall hit: all orange, each cell's 2x2 centre
    assert cells((0, 90, 255)) == [] and (big == (255, 150, 0)).all(-1).sum() == 2 * 4
    assert (big[1, 5] == (255, 150, 0)).all() and (big[0, 4] == 255).all()  # cell (0, 1): centre, corner


def test_ctm_attention_frames_put_the_weight_where_the_feature_sits():
    assert train.feature_grid(400, 39, 39) == (20, 20) and train.feature_grid(16, 1, 16) == (1, 16)
    assert train.feature_grid(12, 30, 40) == (3, 4)
    picture = np.full((4, 4, 3), 255, np.uint8)
    attention = np.zeros((2, 3, 4))
    attention[1, 1:] = 0.25
    attention[0, :, 3] = 1.0  # tick 0: all heads on feature (1, 1), the picture's lower-right 2x2 pixels
    attention[1, 0, 0] = 1.0  # tick 1: one head on feature (0, 0), the others uniform
    frames = train.attention_frames(picture, attention, np.array([0.25, 1.0]), scale=2)
    first, second = frames[0][:8], frames[1][:8]
    blue = lambda block: np.abs(block - (0.3 * 255 + 0.7 * np.array(train.HEAT))).max() <= 0.5  # 70% over white
    assert blue(first[4:, 4:]) and (first[:4] == 255).all() and (first[:, :4] == 255).all()
    assert blue(second[:4, :4]) and (second[4:] == 255).all() and (second[:, 4:] == 255).all()
    bars = frames[0][8:]  # tick bar half full (tick 1 of 2), certainty bar a quarter full
    assert (bars[1, :4] == 110).all() and (bars[1, 4:] == 255).all()
    assert (bars[5, :2] == (40, 170, 40)).all() and (bars[5, 2:] == 255).all()


CTM_TINY = ['--d_model', '16', '--d_input', '8', '--heads', '2', '--iterations', '2', '--synapse_depth', '2',
            '--memory_length', '3', '--memory_hidden_dims', '2', '--n_synch_out', '4', '--n_synch_action', '4',
            '--backbone_type', 'conv', '--maze_size', '7', '--maze_route_length', '4', '--batch_size', '4',
            '--n_test', '8', '--track_every', '3', '--log_every', '1', '--device', 'cpu']


def test_ctm_pictures_while_training_and_from_a_checkpoint(tmp_path, capsys):
    """--visualize_every writes the four pictures per example into LOG_DIR/think/stepN/, the animation one frame a
    tick; --visualize --ckpt rebuilds the model from the checkpoint's flags alone (images and parity too)."""
    log_dir = tmp_path / 'run'
    train.main(['ctm', *CTM_TINY, '--training_iterations', '2', '--visualize_every', '2', '--n_pngs', '2',
                '--log_dir', str(log_dir)])
    think = log_dir / 'think' / 'step2'
    assert sorted(os.listdir(think)) == sorted(f'example{b}_{kind}.png' for b in range(2)
                                               for kind in ('route', 'attention', 'ticks', 'neurons'))
    (n_frames, _), frames = read_apng_independently((think / 'example0_attention.png').read_bytes())
    assert n_frames == 2 and frames[0][1].shape[1] == 7 * (320 // 7)  # one frame per tick, the maze scaled up
    for name in os.listdir(think):
        os.remove(think / name)
    written = train.main(['ctm', '--visualize', '--ckpt', str(log_dir / 'ckpt.pt'), '--n_pngs', '1'])
    assert sorted(written) == sorted(str(think / f'example0_{k}.png') for k in ('route', 'attention', 'ticks',
                                                                                 'neurons'))
    assert 'wrote 4 pictures of 1 held-out examples' in capsys.readouterr().out
    for task, flags in (('images', ['--image_size', '8']), ('parity', ['--backbone_type', 'parity_backbone',
                                                                       '--parity_sequence_length', '4'])):
        run = tmp_path / task
        train.main(['ctm', *CTM_TINY, '--task', task, *flags, '--training_iterations', '1', '--track_every', '0',
                    '--log_dir', str(run)])
        written = train.main(['ctm', '--visualize', '--log_dir', str(run), '--n_pngs', '1'])
        assert len(written) == 3 and all(os.path.exists(p) for p in written)  # no route outside mazes
    with pytest.raises(SystemExit, match='--visualize: no checkpoint at'):
        train.main(['ctm', '--visualize', '--log_dir', str(tmp_path / 'nothing')])


def test_ctm_train_cli_resume_and_refusals(tmp_path):
    log_dir = str(tmp_path / 'run')
    first = run_train('ctm', *CTM_TINY, '--training_iterations', '3', '--log_dir', log_dir)
    assert first.returncode == 0, first.stderr
    assert 'solve_rate' in first.stdout and any(f.endswith('.png') for f in os.listdir(log_dir))
    saved = torch.load(os.path.join(log_dir, 'ckpt.pt'), weights_only=False)
    assert saved['step'] == 3 and (saved['params']['decay_params_out'] >= 0).all()
    again = run_train('ctm', *CTM_TINY, '--training_iterations', '5', '--log_dir', log_dir, '--resume')
    assert again.returncode == 0 and 'resumed' in again.stdout and 'step 4/5' in again.stdout
    assert torch.load(os.path.join(log_dir, 'ckpt.pt'), weights_only=False)['step'] == 5
    wrong = run_train('ctm', *CTM_TINY, '--d_model', '24', '--training_iterations', '6', '--log_dir', log_dir,
                      '--resume')
    assert wrong.returncode != 0 and '--d_model' in wrong.stderr
    bad = run_train('ctm', *CTM_TINY, '--heads', '3', '--log_dir', log_dir)
    assert bad.returncode != 0 and 'heads' in bad.stderr
    for task in ('parity', 'images'):
        ran = run_train('ctm', *CTM_TINY, '--task', task, '--training_iterations', '1', '--track_every', '1',
                        '--backbone_type', 'parity_backbone' if task == 'parity' else 'conv', '--parity_sequence_length', '4',
                        '--image_size', '8', '--log_dir', str(tmp_path / task))
        assert ran.returncode == 0 and 'eval' in ran.stdout, ran.stderr


# ================================================================================================================
# plastic.py: hypernetworks
import torch.nn.functional as F  # noqa: E402

import plastic  # noqa: E402


def open_gates(p, seed):
    """A random gate head: at init the gates are shut (zero), which would make every plastic check vacuous."""
    gen = torch.Generator().manual_seed(seed)
    gate = p['hyper']['head_gate']
    for k in gate:
        gate[k] = torch.randn(gate[k].shape, generator=gen, dtype=gate[k].dtype)
    return p


def to_double(tree):
    if isinstance(tree, dict):
        return {k: to_double(v) for k, v in tree.items()}
    return [to_double(v) for v in tree] if isinstance(tree, list) else tree.double()


def per_sample_jacobian(fn, x, ctx):
    """d fn(x_b, ctx_b) / d x_b for each sample b, by autograd on one sample at a time."""
    return torch.func.vmap(torch.func.jacrev(lambda xi, ci: fn(xi[None], ci[None])[0]))(x, ctx)


def rank_of(m):
    return torch.linalg.matrix_rank(m, rtol=1e-9).tolist()


def hand_hypernet(h, ctx, u_rows, v_rows, rank):
    """The hypernetwork as the seeds write it, head by head: c = SiLU(LayerNorm(Linear(ctx))), U, V, tanh gate."""
    c = ctx @ h['compressor']['lin']['weight'].t() + h['compressor']['lin']['bias']
    c = (c - c.mean(-1, keepdim=True)) / torch.sqrt(c.var(-1, unbiased=False, keepdim=True) + 1e-5)
    c = c * h['compressor']['ln']['weight'] + h['compressor']['ln']['bias']
    c = c * torch.sigmoid(c)
    head = lambda name: c @ h[name]['weight'].t() + h[name]['bias']
    return (head('head_u').reshape(len(ctx), u_rows, rank), head('head_v').reshape(len(ctx), v_rows, rank),
            torch.tanh(head('head_gate')))


hyper_shapes = dict(b=st.integers(1, 3), in_dims=st.integers(1, 12), out_dims=st.integers(1, 12),
                    rank=st.integers(1, 5), ctx_dims=st.integers(1, 9), seed=st.integers(0, 2**16))


@given(**hyper_shapes)
def test_hyper_lora_linear_equals_dense_weight_and_low_rank(b, in_dims, out_dims, rank, ctx_dims, seed):
    gen = torch.Generator().manual_seed(seed)
    p = to_double(open_gates(plastic.init_hyper_lora_linear(gen, in_dims, out_dims, rank, ctx_dims), seed))
    x, ctx, ctx2 = (torch.randn(b, d, generator=gen, dtype=torch.float64) for d in (in_dims, ctx_dims, ctx_dims))
    w_t = plastic.hyper_lora_dense_weight(p, ctx)  # (B, Out, In)
    u, v, gate = hand_hypernet(p['hyper'], ctx, out_dims, in_dims, rank)
    torch.testing.assert_close(w_t, p['weight'] + gate[:, :, None] * (u @ v.transpose(1, 2)) / math.sqrt(in_dims * rank))
    y = plastic.hyper_lora_linear(p, x, ctx)
    torch.testing.assert_close(y, torch.einsum('boi,bi->bo', w_t, x) + p['bias'])
    # the dense W_t is what autograd sees as dy/dx, and moving the context changes it by rank <= 2r
    jac = per_sample_jacobian(lambda xi, ci: plastic.hyper_lora_linear(p, xi, ci), x, ctx)
    torch.testing.assert_close(jac, w_t)
    jac2 = per_sample_jacobian(lambda xi, ci: plastic.hyper_lora_linear(p, xi, ci), x, ctx2)
    ranks = rank_of(jac - jac2)
    assert all(r <= 2 * rank for r in ranks), (ranks, rank)
    assert any(r > 0 for r in ranks), 'the context must change the weight once the gate is open'


@given(**hyper_shapes, neurons=st.integers(1, 5), do_norm=st.booleans())
def test_hyper_super_linear_per_neuron_loop_and_low_rank(b, in_dims, out_dims, rank, ctx_dims, seed, neurons,
                                                         do_norm):
    gen = torch.Generator().manual_seed(seed)
    p = plastic.init_hyper_super_linear(gen, in_dims, out_dims, neurons, rank, ctx_dims, do_norm)
    p = to_double(open_gates(p, seed))
    p['b1'] = torch.randn(p['b1'].shape, generator=gen, dtype=torch.float64)
    p['T'] = p['T'] * 1.7
    if do_norm:
        p['ln'] = {k: torch.randn(in_dims, generator=gen, dtype=torch.float64) for k in ('weight', 'bias')}
    trace = torch.randn(b, neurons, in_dims, generator=gen, dtype=torch.float64)
    ctx, ctx2 = (torch.randn(b, ctx_dims, generator=gen, dtype=torch.float64) for _ in range(2))
    x = F.layer_norm(trace, (in_dims,), p['ln']['weight'], p['ln']['bias']) if do_norm else trace
    w_t = plastic.hyper_super_linear_dense_weight(p, ctx)  # (B, In, Out, D)
    u, v, gate = hand_hypernet(p['hyper'], ctx, in_dims, out_dims, rank)
    shared = (u @ v.transpose(1, 2)) / math.sqrt(in_dims * rank)  # (B, In, Out): one U V^T, a gate per neuron
    y = plastic.hyper_super_linear(p, trace, ctx)  # (B, D, Out)
    for d in range(neurons):
        torch.testing.assert_close(w_t[..., d], p['w1'][..., d] + gate[:, d, None, None] * shared)
        expect = (torch.einsum('bm,bmh->bh', x[:, d], w_t[..., d]) + p['b1'][0, d]) / p['T']
        torch.testing.assert_close(y[:, d], expect)
    f = lambda tr, ci: plastic.hyper_super_linear(p, tr, ci)
    jac, jac2 = (per_sample_jacobian(f, trace, c) for c in (ctx, ctx2))  # (B, D, Out, D, In)
    for d in range(neurons):
        others = [e for e in range(neurons) if e != d]
        assert not jac[:, d, :, others].any(), 'a neuron must see only its own trace'
        if not do_norm:
            torch.testing.assert_close(jac[:, d, :, d], w_t[..., d].transpose(1, 2) / p['T'])
        # with the LayerNorm the difference is (dW1 - dW2)^T J_ln / T: still rank <= 2r
        ranks = rank_of(jac[:, d, :, d] - jac2[:, d, :, d])
        assert all(r <= 2 * rank for r in ranks), (ranks, rank)


def test_hyper_super_linear_one_dropout_mask_for_both_paths():
    gen = torch.Generator().manual_seed(3)
    p = open_gates(plastic.init_hyper_super_linear(gen, 6, 4, 5, 2, 3), 3)
    trace, ctx = torch.randn(8, 5, 6, generator=gen), torch.randn(8, 3, generator=gen)
    torch.manual_seed(11)
    y = plastic.hyper_super_linear(p, trace, ctx, rate=0.5, train=True)
    torch.manual_seed(11)
    dropped = F.dropout(trace, 0.5, training=True)
    w_t = plastic.hyper_super_linear_dense_weight(p, ctx)
    torch.testing.assert_close(y, (torch.einsum('bdm,bmhd->bdh', dropped, w_t) + p['b1']) / p['T'])


def hyper_parts(params):
    """name -> tensor of every hypernetwork parameter (compressor, head_u, head_v, head_gate)."""
    return {k: t for k, t in train.flatten(params).items() if '.hyper.' in f'.{k}'}


def assert_grads_reach_every_hyper_param(params, loss_fn):
    """At init only the gate heads learn (the rest is multiplied by a zero gate); after one step, everything."""
    leaves = train.tree_leaves(params)
    for t in leaves:
        t.requires_grad_(True)
    opt = torch.optim.SGD(leaves, lr=0.1)
    loss_fn().backward()
    hyper = hyper_parts(params)
    assert hyper
    for name, t in hyper.items():
        assert ('.head_gate.' in name) == bool(t.grad.abs().sum() > 0), name
    opt.step()
    opt.zero_grad()
    loss_fn().backward()
    silent = [name for name, t in hyper.items() if not t.grad.abs().sum() > 0]
    assert not silent, silent


def test_hyper_grads_reach_every_hyper_param_of_both_layers():
    gen = torch.Generator().manual_seed(0)
    lin = plastic.init_hyper_lora_linear(gen, 6, 5, 3, 4)
    x, ctx = torch.randn(4, 6, generator=gen), torch.randn(4, 4, generator=gen)
    assert_grads_reach_every_hyper_param(lin, lambda: plastic.hyper_lora_linear(lin, x, ctx).sin().sum())
    sup = plastic.init_hyper_super_linear(gen, 5, 3, 7, 2, 4)
    trace = torch.randn(4, 7, 5, generator=gen)
    assert_grads_reach_every_hyper_param(sup, lambda: plastic.hyper_super_linear(sup, trace, ctx).sin().sum())


def test_hyper_layers_start_as_the_plain_layers_and_reject_bad_input():
    gen = torch.Generator().manual_seed(1)
    lin = plastic.init_hyper_lora_linear(gen, 6, 5, 3, 4)
    x, ctx = torch.randn(2, 6, generator=gen), torch.randn(2, 4, generator=gen)
    assert torch.equal(plastic.hyper_lora_linear(lin, x, ctx), plastic.linear(lin, x))
    sup = plastic.init_hyper_super_linear(gen, 5, 3, 7, 2, 4)
    trace = torch.randn(2, 7, 5, generator=gen)
    assert torch.equal(plastic.hyper_super_linear(sup, trace, ctx), plastic.super_linear(sup, trace))
    with pytest.raises(ValueError, match=r'x: expected \(B, 6\)'):
        plastic.hyper_lora_linear(lin, x[:, :5], ctx)
    with pytest.raises(ValueError, match=r'ctx: expected a context of shape \(B, 4\)'):
        plastic.hyper_lora_linear(lin, x, ctx[:, :3])
    with pytest.raises(ValueError, match=r'trace: expected \(B, 7, 5\)'):
        plastic.hyper_super_linear(sup, trace[:, :6], ctx)
    with pytest.raises(ValueError, match='positive hyper rank'):
        plastic.init_hyper_lora_linear(gen, 6, 5, 0, 4)


def strip_hyper(tree):
    """The plain CTM's parameters inside a hyper CTM's: every dict without its 'hyper' subtree."""
    if isinstance(tree, dict):
        return {k: strip_hyper(v) for k, v in tree.items() if k != 'hyper'}
    if isinstance(tree, list):
        return [strip_hyper(v) for v in tree]
    return tree


def open_all_gates(tree, seed):
    if isinstance(tree, dict) and 'hyper' in tree:
        open_gates(tree, seed)
    for child in (tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else ()):
        open_all_gates(child, seed + 1)
    return tree


def hand_hyper_unet(p, x, rank):
    """HyperSynapseUNET written out layer by layer, each hyper Linear from its own hand_hypernet(pre_synapse_input):
    the oracle for synapse_unet and its stacked fast path (which must hand each layer its own φ and heads)."""
    def lin(q, h):
        y = h @ q['weight'].t() + q['bias']
        if 'hyper' not in q:
            return y
        u, v, gate = hand_hypernet(q['hyper'], x, q['weight'].shape[0], q['weight'].shape[1], rank)
        return y + gate * torch.einsum('bor,bir,bi->bo', u, v, h) / math.sqrt(q['weight'].shape[1] * rank)
    ln = lambda q, h: F.layer_norm(h, h.shape[-1:], q['weight'], q['bias'])
    if 'down' not in p:
        return ln(p['first']['ln'], F.glu(lin(p['first']['lin'], x)))
    outs = [F.silu(ln(p['first']['ln'], lin(p['first']['lin'], x)))]
    for q in p['down']:
        outs.append(F.silu(ln(q['ln'], lin(q['lin'], outs[-1]))))
    out = outs[-1]
    for i in reversed(range(len(p['up']))):
        out = ln(p['skip_ln'][i], F.silu(ln(p['up'][i]['ln'], lin(p['up'][i]['lin'], out))) + outs[i])
    return out


@settings(max_examples=10)
@given(hyper_layers=st.sampled_from(['none', 'bottleneck', 'down', 'up', 'all']), depth=st.integers(1, 4),
       rank=st.integers(1, 3), seed=st.integers(0, 2**16))
@example(hyper_layers='bottleneck', depth=4, rank=2, seed=1)  # stacked heads: one batched matmul
@example(hyper_layers='all', depth=3, rank=2, seed=2)  # heads of different shapes, one matmul each
def test_hyper_synapse_unet_and_its_stacked_fast_path_equal_the_hand_unet(hyper_layers, depth, rank, seed):
    """The paper form (hyper_lora_linear per layer) and the fast path (stack_hypernets, synapse_unet_stacked)
    against the U-Net written out by hand, in value and in the gradients that reach the readable params."""
    if depth == 1 and hyper_layers not in ('none', 'all'):
        return
    gen = torch.Generator().manual_seed(seed)
    p = to_double(plastic.init_synapse_unet(gen, 7, 20, depth, hyper_layers, rank))
    open_all_gates(p, seed)
    layers = plastic.synapse_hyper_layers(p)
    for q in layers.values():  # distinct φ LayerNorms, so that a swapped context would show
        q['hyper']['compressor']['ln'] = {k: torch.randn(16, generator=gen, dtype=torch.float64) for k in ('weight', 'bias')}
    assert sorted(f'synapses.{name}.lin' for name in layers) == [
        name for name, _, _ in expected_plastic_layers(hyper_layers, False, True, 7, 20, depth)]
    x = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in train.tree_leaves(p)]
    grads = []
    for form in (lambda: hand_hyper_unet(p, x, rank), lambda: plastic.synapse_unet(p, x),
                 lambda: plastic.synapse_unet_stacked(p, plastic.stack_hypernets(p), x)):
        y = form()
        grads.append((y, torch.autograd.grad(y.sin().sum(), leaves)))
    for y, g in grads[1:]:
        torch.testing.assert_close(y, grads[0][0])
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b)
    stacked = plastic.stack_hypernets(p)
    assert (stacked is None) == (hyper_layers == 'none')
    weights = plastic.synapse_plastic_weights(p, stacked, x) if layers else {}
    assert weights.keys() == layers.keys()
    for name, lin in layers.items():
        for a, b in zip(weights[name], hand_hypernet(lin['hyper'], x, *lin['weight'].shape, rank)):
            torch.testing.assert_close(a, b)
    if hyper_layers == 'bottleneck' or (hyper_layers in ('down', 'up') and depth == 2):
        assert not isinstance(stacked['heads'], list)  # the two bottleneck Linears share a shape: one matmul
    if hyper_layers in ('down', 'up', 'all') and depth >= 3:
        assert isinstance(stacked['heads'], list)
        next(iter(layers.values()))['hyper']['compressor']['ln'] = {k: torch.ones(5) for k in ('weight', 'bias')}
        with pytest.raises(ValueError, match='one width'):
            plastic.stack_hypernets(p)


def expected_plastic_layers(hyper_layers, use_hyper_nlm, deep, d_in, d_model, depth):
    """From the seeds' definitions: which Linears carry a hypernetwork, by (name, in, out)."""
    widths = [int(w) for w in np.linspace(d_model, 16, depth)]
    first = [('synapses.first.lin', d_in, 2 * d_model if depth == 1 else widths[0])]
    down = [(f'synapses.down.{i}.lin', widths[i], widths[i + 1]) for i in range(depth - 1)]
    up = [(f'synapses.up.{i}.lin', widths[i + 1], widths[i]) for i in range(depth - 1)]
    chosen = {'none': [], 'down': down, 'up': up, 'all': first + down + up,
              'bottleneck': [lin for lin in down + up if 16 in lin[1:]]}[hyper_layers]
    return sorted(chosen + ([('nlm.l2' if deep else 'nlm.l1', None, None)] if use_hyper_nlm else []))


@given(hyper_layers=st.sampled_from(('none', 'bottleneck', 'down', 'up', 'all')), use_hyper_nlm=st.booleans(),
       deep=st.booleans(), depth=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_hyper_ctm_starts_as_the_plain_ctm(hyper_layers, use_hyper_nlm, deep, depth, seed):
    cfg = small_ctm_config(hyper_layers=hyper_layers, use_hyper_nlm=use_hyper_nlm, deep_nlms=deep,
                           synapse_depth=depth, hyper_rank=2, hyper_nlm_rank=3)
    gen = torch.Generator().manual_seed(seed)
    if depth == 1 and hyper_layers in ('bottleneck', 'down', 'up'):
        with pytest.raises(ValueError, match="hyper_layers: synapse_depth 1 has no down/up"):
            plastic.init_ctm(cfg, gen)
        return
    params, buffers = plastic.init_ctm(cfg, gen)
    flat = train.flatten(params)
    plastic_layers = sorted({name.split('.hyper.')[0] for name in flat if '.hyper.' in name})
    expected = expected_plastic_layers(hyper_layers, use_hyper_nlm, deep, cfg.d_input + cfg.d_model, cfg.d_model,
                                       depth)
    assert plastic_layers == [name for name, _, _ in expected]
    for name, d_in, d_out in expected:
        if d_in is not None:
            assert flat[f'{name}.weight'].shape == (d_out, d_in)
            assert flat[f'{name}.hyper.compressor.lin.weight'].shape[1] == cfg.d_input + cfg.d_model  # pre_synapse_input
    plain_cfg = small_ctm_config(deep_nlms=deep, synapse_depth=depth)
    x = torch.randn(3, cfg.in_channels, 3, 3, generator=gen)
    hyper_out = plastic.ctm_forward(params, buffers, x, cfg)
    plain_out = plastic.ctm_forward(strip_hyper(params), buffers, x, plain_cfg)
    for a, b in zip(hyper_out, plain_out):
        assert torch.equal(a, b)
    if expected:  # the hypernetworks are wired in: once their gates open, the thought changes
        opened = plastic.ctm_forward(open_all_gates(params, seed), buffers, x, cfg)
        assert not torch.allclose(opened[0], plain_out[0])


def test_hyper_ctm_grads_reach_every_hyper_param():
    for deep in (True, False):
        cfg = small_ctm_config(hyper_layers='all', use_hyper_nlm=True, deep_nlms=deep)
        gen = torch.Generator().manual_seed(5)
        params, buffers = plastic.init_ctm(cfg, gen)
        x = torch.randn(4, cfg.in_channels, 3, 3, generator=gen)
        loss = lambda: plastic.ctm_forward(params, buffers, x, cfg)[0].sin().sum()
        assert_grads_reach_every_hyper_param(params, loss)


@pytest.mark.parametrize('hyper_layers', ['bottleneck', 'all'])
def test_hyper_ctm_stacked_fast_path_equals_the_paper_form(hyper_layers):
    """ctm_forward(stacked=True) (what --cuda_graph trains) against the default paper form: outputs and the
    gradients of every readable parameter, gates open, float64."""
    cfg = small_ctm_config(hyper_layers=hyper_layers, use_hyper_nlm=True, hyper_rank=2, dropout=0.0)
    gen = torch.Generator().manual_seed(7)
    params, buffers = plastic.init_ctm(cfg, gen)
    params = to_double(open_all_gates(params, 7))
    leaves = [t.requires_grad_() for t in train.tree_leaves(params)]
    x = torch.randn(3, cfg.in_channels, 3, 3, generator=gen, dtype=torch.float64)
    runs = []
    for stacked in (False, True):
        out = plastic.ctm_forward(params, buffers, x, cfg, stacked=stacked)
        runs.append((out, torch.autograd.grad(out[0].sin().sum() + out[1].sum(), leaves)))
    (out_paper, g_paper), (out_fast, g_fast) = runs
    for a, b in zip(out_paper, out_fast):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_paper, g_fast):
        torch.testing.assert_close(a, b)


def hyper_linear_count(d_in, d_out, rank, ctx, hidden):
    """Parameters of one hypernetwork, by hand: φ Linear + LayerNorm, U, V and gate heads."""
    return ctx * hidden + hidden + 2 * hidden + (hidden + 1) * (d_out * rank + d_in * rank) + hidden + 1


def test_hyper_train_cli_use_hyper_runs_and_flags_are_checked(tmp_path):
    ok = run_train('ctm', '--use_hyper', '--use_hyper_nlm', '--training_iterations', '2', '--iterations', '3',
                   '--batch_size', '4', '--n_test', '4', '--track_every', '2', '--n_pngs', '0',
                   '--log_dir', str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert 'solve_rate' in ok.stdout
    saved = torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert saved['args']['hyper_layers'] == 'bottleneck'
    assert {'synapses.down.2.lin.hyper.head_u.weight', 'nlm.l2.hyper.head_gate.weight'} <= set(train.flatten(saved['params']))
    bad = run_train('ctm', '--hyper_layers', 'down', '--training_iterations', '1', '--log_dir', str(tmp_path))
    assert bad.returncode != 0 and '--hyper_layers down needs --use_hyper' in bad.stderr
    for task, backbone in (('parity', 'resnet18-1'), ('mazes', 'parity_backbone')):  # one line, not a shape error
        bad = run_train('ctm', '--task', task, '--backbone_type', backbone, '--log_dir', str(tmp_path / task))
        assert bad.returncode == 2 and f'--backbone_type {backbone} with --task {task}' in bad.stderr, bad.stderr
    # a checkpoint from before the readable hypernetworks (three heads packed in one Linear 'heads') is refused
    saved['params'] = {k: v for k, v in train.flatten(saved['params']).items() if '.head_' not in k}
    saved['params']['synapses.down.2.lin.hyper.heads.weight'] = torch.zeros(1)
    train.save_checkpoint(str(tmp_path / 'ckpt.pt'), saved)
    old = run_train('ctm', '--use_hyper', '--use_hyper_nlm', '--training_iterations', '3', '--iterations', '3',
                    '--batch_size', '4', '--n_test', '4', '--log_dir', str(tmp_path), '--resume')
    assert old.returncode != 0 and "'synapses.down.2.lin.hyper.head_u.weight' is missing" in old.stderr, old.stderr


def test_hyper_train_count_params_matches_hand_count():
    out = run_train('ctm', '--count_params', '--d_model', '64', '--d_input', '32', '--synapse_depth', '3',
                    '--memory_length', '5', '--memory_hidden_dims', '6', '--n_test', '1').stdout
    rows = {tuple(line.split()[:3]): int(line.split()[3].replace(',', '')) for line in out.splitlines()[2:]}
    ctx = 32 + 64  # widths 64, 40, 16: the bottleneck Linears are 40 -> 16 and 16 -> 40
    assert rows['bottleneck', '8', '-'] == (hyper_linear_count(40, 16, 8, ctx, 16)
                                             + hyper_linear_count(16, 40, 8, ctx, 16))
    assert rows['all', '8', '-'] == sum(hyper_linear_count(a, b, 8, ctx, 16) for a, b in
                                        ((ctx, 64), (64, 40), (40, 16), (40, 64), (16, 40)))
    nlm = lambda r: 64 * 128 + 128 + 2 * 128 + 129 * (6 * r + 2 * r) + 129 * 64  # φ, U (H·r), V (2·r), gates
    assert rows['none', '-', '4'] == nlm(4) and rows['none', '-', '16'] == nlm(16)
    assert rows['bottleneck', '8', '4'] == rows['bottleneck', '8', '-'] + nlm(4)


# ================================================================================================================
# lash.py: LASH and ASHEM

import torch.nn.functional as F  # noqa: E402

import lash  # noqa: E402
from hypothesis import assume  # noqa: E402


def test_train_format_metrics_gives_floats_four_decimals_and_other_values_as_is():
    assert train.format_metrics({'loss': 1 / 3, 'step': 7, 'name': 'x'}) == ['loss 0.3333', 'step 7', 'name x']


def test_train_synchronizer_is_a_no_op_off_cuda():
    assert train.synchronizer(torch.device('cpu'))() is None


def test_lash_train_batches_are_the_seeded_epoch_batches():
    args = argparse.Namespace(seq_len=4, batch_size=2, seed=3)
    tokens = torch.arange(50)
    got = train.lash_train_batches(args, tokens, lambda batches: batches)(1)
    expect = lash.epoch_batches(tokens, 4, 2, 3, 1)
    assert len(got) == len(expect) and all(torch.equal(a, b) for g, e in zip(got, expect) for a, b in zip(g, e))


def lash_tiny(num_layers=3, dim=16, heads=2, vocab=11, seed=0):
    cfg = lash.ModelConfig(vocab_size=vocab, dim=dim, num_layers=num_layers, num_heads=heads, ffn_dim=24)
    return cfg, lash.init_transformer(cfg, torch.Generator().manual_seed(seed))


def lash_scrambled(params, seed=1):
    """Random values everywhere (zero-initialised or tiny weights would hide wiring mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    return lash.map_tree(lambda t: torch.randn(t.shape, generator=gen) * 0.5 + (t == 1).float(), params)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), dim=st.integers(1, 9), seed=st.integers(0, 99))
def test_lash_rms_norm_matches_formula(shape, dim, seed):
    gen = np.random.default_rng(seed)
    x, w = gen.normal(size=(*shape, dim)) * 3, gen.normal(size=dim)
    ref = np.empty_like(x)
    for idx in np.ndindex(*shape):
        ref[idx] = x[idx] / np.sqrt(sum(v * v for v in x[idx]) / dim + 1e-6) * w
    got = lash.rms_norm({'weight': torch.tensor(w)}, torch.tensor(x), 1e-6)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)


@given(dim=st.integers(1, 6), hidden=st.integers(1, 6), seed=st.integers(0, 99))
def test_lash_swiglu_ffn_matches_formula(dim, hidden, seed):
    gen = np.random.default_rng(seed)
    x, wg, wu, wd = gen.normal(size=dim), gen.normal(size=(hidden, dim)), gen.normal(size=(hidden, dim)), \
        gen.normal(size=(dim, hidden))
    silu = lambda a: a / (1 + np.exp(-a))
    ref = [sum(wd[o, j] * silu(wg[j] @ x) * (wu[j] @ x) for j in range(hidden)) for o in range(dim)]
    p = {'w_gate': {'weight': torch.tensor(wg)}, 'w_up': {'weight': torch.tensor(wu)},
         'w_down': {'weight': torch.tensor(wd)}}
    np.testing.assert_allclose(lash.swiglu_ffn(p, torch.tensor(x)).numpy(), ref, rtol=1e-9, atol=1e-12)


@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(-200, 200), half=st.integers(1, 6),
       seed=st.integers(0, 99))
def test_lash_rope_relative_position(m, n, shift, half, seed):
    """q·k after RoPE depends only on n - m; and RoPE is the complex rotation z_i · e^{i pos θ_i}."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2 * half, generator=gen, dtype=torch.float64)
    rot = lambda x, p: lash.apply_rope(x, *(t.double() for t in lash.rope_tables(torch.tensor(p), 2 * half)))
    assert torch.allclose(rot(q, m) @ rot(k, n), rot(q, m + shift) @ rot(k, n + shift), atol=1e-4)
    theta = 10000.0 ** (-np.arange(0, 2 * half, 2) / (2 * half))
    z = (q[:half] + 1j * q[half:]).numpy() * np.exp(1j * m * theta)
    np.testing.assert_allclose(rot(q, m).numpy(), np.concatenate([z.real, z.imag]), atol=1e-4)


@given(B=st.integers(1, 4), T=st.integers(1, 8), density=st.floats(0.1, 1), seed=st.integers(0, 99))
def test_lash_token_subset_lists_each_kept_token_once_at_its_slot(B, T, density, seed):
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
    keep[0, -1] = True  # at least one token
    s = lash.token_subset(keep)
    listed = [(b, t) for b in range(B) for t in range(T) if keep[b, t]]  # row-major order
    N = max(sum(row) for row in keep.tolist())
    assert s['index'].tolist() == [b * T + t for b, t in listed]
    packed = 8 * N <= 7 * T
    assert s['pos'].shape == (B, N if packed else T) and (s['visible'] is None) == (not packed)
    for m, (b, t) in enumerate(listed):
        slot = sum(keep[b, :t].tolist()) if packed else t  # packed: its rank in the row
        assert (s['row'][m], s['slot'][m], s['pos'][b, slot]) == (b, slot, t)
        if packed:
            assert s['visible'][b, 0, slot].tolist() == [j <= t for j in range(T)]


def test_lash_attention_matches_loop_for_any_query_subset():
    cfg, params = lash_tiny()
    p = lash_scrambled(params['layers'][0]['attn'])
    gen = torch.Generator().manual_seed(3)
    B, T, D, H = 2, 6, cfg.dim, cfg.num_heads
    x = torch.randn(B, T, D, generator=gen)
    q_pos = torch.tensor([[0, 3, 5], [1, 2, 4]])
    keep = torch.zeros(B, T, dtype=torch.bool).scatter(1, q_pos, True)
    got = lash.attention(p, x, cfg, lash.token_subset(keep)).view(B, 3, D)  # packed layout
    every = lash.attention(p, x, cfg)
    assert torch.allclose(every[torch.arange(B)[:, None], q_pos], got, atol=1e-6)
    keep[0] = True  # 6 queries in row 0: they stay in place
    assert lash.token_subset(keep)['visible'] is None
    assert torch.allclose(lash.attention(p, x, cfg, lash.token_subset(keep)), every[keep], atol=1e-6)
    Dh = D // H
    theta = cfg.rope_base ** (-np.arange(0, Dh, 2) / Dh)

    def rope(vec, pos):  # complex rotation of the pairs (i, i + Dh/2)
        z = (vec[:Dh // 2] + 1j * vec[Dh // 2:]) * np.exp(1j * pos * theta)
        return np.concatenate([z.real, z.imag])
    W = {k: p[k]['weight'].double().numpy() for k in ('wq', 'wk', 'wv', 'wo')}
    xs = x.double().numpy()
    for b in range(B):
        for n, i in enumerate(q_pos[b].tolist()):
            heads = []
            for h in range(H):
                sl = slice(h * Dh, (h + 1) * Dh)
                q = rope((W['wq'] @ xs[b, i])[sl], i)
                scores = [q @ rope((W['wk'] @ xs[b, j])[sl], j) / np.sqrt(Dh) for j in range(i + 1)]
                a = np.exp(np.array(scores) - max(scores))
                a /= a.sum()
                heads.append(sum(a[j] * (W['wv'] @ xs[b, j])[sl] for j in range(i + 1)))
            np.testing.assert_allclose(got[b, n].double().numpy(), W['wo'] @ np.concatenate(heads), atol=1e-5)


@given(seed=st.integers(0, 99), t=st.integers(0, 6))
def test_lash_causal_future_tokens_never_change_past_logits(seed, t):
    cfg, params = lash_tiny(seed=seed)
    params = lash_scrambled(params, seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=gen)
    changed = tokens.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1 + torch.randint(0, 5, changed[:, t + 1:].shape, generator=gen)) \
        % cfg.vocab_size
    before, after = lash.forward_all_layers(params, tokens, cfg), lash.forward_all_layers(params, changed, cfg)
    for a, b in zip(before, after):
        assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)
    assert torch.allclose(lash.forward(params, tokens, cfg), before[-1], atol=1e-6)


@given(seed=st.integers(0, 99), num_layers=st.integers(1, 4), weight=st.floats(0.1, 3.0))
def test_lash_fast_path_equals_general_path(seed, num_layers, weight):
    cfg, params = lash_tiny(num_layers, seed=seed)
    params = lash.map_tree(lambda t: t.requires_grad_(), lash_scrambled(params, seed))
    gen = torch.Generator().manual_seed(seed)
    batch = (torch.randint(0, cfg.vocab_size, (2, 7), generator=gen),
             torch.randint(0, cfg.vocab_size, (2, 7), generator=gen))
    config = lash.TrainingConfig({l: weight * (l == num_layers) for l in range(1, num_layers + 1)})
    assert config.last_layer_only
    fast, general = (lash.compute_loss(params, batch, config, cfg, fast_path=f) for f in (True, False))
    logits = lash.forward_all_layers(params, batch[0], cfg)[-1]
    by_hand = -weight * logits.log_softmax(-1).gather(-1, batch[1][..., None]).mean()
    assert torch.allclose(fast, general, atol=1e-6) and torch.allclose(fast, by_hand, atol=1e-5)
    leaves = lash.tree_leaves(params)
    g_fast = torch.autograd.grad(fast, leaves, allow_unused=True)
    g_general = torch.autograd.grad(general, leaves, allow_unused=True)
    for a, b in zip(g_fast, g_general):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


def test_lash_general_loss_is_weighted_sum_of_layer_losses():
    cfg, params = lash_tiny(3)
    params = lash_scrambled(params)
    batch = (torch.randint(0, cfg.vocab_size, (2, 5)), torch.randint(0, cfg.vocab_size, (2, 5)))
    config = lash.TrainingConfig({1: 0.7, 2: 0.0, 3: 0.3})
    per_layer = [F.cross_entropy(l.flatten(0, 1), batch[1].flatten()) for l in lash.forward_all_layers(
        params, batch[0], cfg)]
    assert torch.allclose(lash.compute_loss(params, batch, config, cfg), 0.7 * per_layer[0] + 0.3 * per_layer[2])


def test_lash_param_groups_carry_the_right_lr():
    cfg, params = lash_tiny(3)
    params = lash.map_tree(lambda t: t.requires_grad_(), params)
    config = lash.TrainingConfig({1: 0, 2: 0, 3: 1}, layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1})
    opt = lash.create_optimizer(params, config, 2e-3)
    lrs = {g['name']: g['lr'] for g in opt.param_groups}
    assert lrs == pytest.approx({'embed': 2e-3, 'layer1': 2e-3, 'layer2': 1e-3, 'layer3': 2e-4, 'head': 2e-3})
    owner = {id(t): g['name'] for g in opt.param_groups for t in g['params']}
    assert len(owner) == sum(len(g['params']) for g in opt.param_groups) == len(lash.tree_leaves(params))
    for l in range(3):
        assert all(owner[id(t)] == f'layer{l + 1}' for t in lash.tree_leaves(params['layers'][l]))
    assert owner[id(params['embed'])] == 'embed' and owner[id(params['head']['out']['weight'])] == 'head'
    with pytest.raises(ValueError, match='2 layers'):
        lash.create_optimizer(params, lash.create_standard_config(2), 1e-3)


def test_lash_training_config_validation_and_presets():
    assert lash.create_standard_config(3).layer_weights == {1: 0.0, 2: 0.0, 3: 1.0}
    assert lash.create_deep_supervision_config(3).layer_weights == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    c = lash.TrainingConfig({1: 0, 2: 0.5, 3: 0.5}, routing_threshold=0.9)
    assert c.exit_layer == 2 and c.layer_lr_scales == {1: 1.0, 2: 1.0, 3: 1.0} and not c.last_layer_only
    for kwargs, message in (
            (dict(layer_weights={1: -0.1, 2: 1}), r'layer_weights\[1\].*>= 0'),
            (dict(layer_weights={1: 0, 3: 1}), r'every layer 1\.\.3 once, got \[1, 3\]'),
            (dict(layer_weights={3: 1}), r'every layer 1\.\.3 once, got \[3\]'),
            (dict(layer_weights={0: 1}), 'layer numbers'),
            (dict(layer_weights={1: 0, 2: 0}), 'at least one weight'),
            (dict(layer_weights={}), 'non-empty dict'),
            (dict(layer_weights={1: 1, 2: 1}, layer_lr_scales={3: 1.0}), r'layer_lr_scales.*1\.\.2'),
            (dict(layer_weights={1: 1, 2: 1}, layer_lr_scales={1: float('nan')}), 'finite'),
            (dict(layer_weights={1: 1, 2: 1}, routing_threshold=1.5), r'probability in \(0, 1\]'),
            (dict(layer_weights={1: 1, 2: 1}, routing_threshold=0.9, exit_layer=2), r'exit_layer.*1\.\.1 \(exiting'),
            (dict(layer_weights={1: 0, 2: 1}, routing_threshold=0.9), 'no layer below the last carries loss weight'),
            (dict(layer_weights={1: 1, 2: 1}, exit_layer=1), 'only used together with routing_threshold')):
        with pytest.raises(ValueError, match=message):
            lash.TrainingConfig(**kwargs)
    cfg, params = lash_tiny(2)
    with pytest.raises(ValueError, match='names 3 layers, the model has 2'):
        lash.compute_loss(params, (torch.zeros(1, 2, dtype=torch.long),) * 2, lash.create_standard_config(3), cfg)
    with pytest.raises(ValueError, match=r'tokens: ids must be in \[0, 11\)'):
        lash.forward(params, torch.full((1, 2), 11), cfg)
    with pytest.raises(ValueError, match='pass threshold .* or exit_mask'):
        lash.forward_routed(params, torch.zeros(1, 2, dtype=torch.long), cfg, 1)
    for exit_layer in (0, 3):
        with pytest.raises(ValueError, match=r'exit_layer must be in 1\.\.2, got'):
            lash.forward_routed(params, torch.zeros(1, 2, dtype=torch.long), cfg, exit_layer, 0.5)
    with pytest.raises(ValueError, match='must split into num_heads'):
        lash.ModelConfig(dim=10, num_heads=4)
    for kwargs, message in ((dict(phase1_layers=2, phase2_layers=2), 'phase2_layers'),
                            (dict(hard_example_ratio=1.0), 'hard_example_ratio'),
                            (dict(phase2_patience=0), 'phase2_patience')):
        with pytest.raises(ValueError, match=message):
            lash.ASHEMConfig(**kwargs)


def dense_routed_logits(params, tokens, cfg, exit_layer, exit_mask):
    """Reference early exit without gathering: every layer runs on every token, then exited tokens are reset to
    their exit hidden state (the state that is copied upward)."""
    h = params['embed'][tokens]
    for layer in params['layers'][:exit_layer]:
        h = lash.block(layer, h, cfg)
    h_exit = h
    for layer in params['layers'][exit_layer:]:
        h = torch.where(exit_mask[..., None], h_exit, lash.block(layer, h, cfg))
    return lash.output_head(params, h, cfg)


def test_lash_routing_counts_cost_and_really_skips(monkeypatch):
    cfg, params = lash_tiny(4)
    params = lash_scrambled(params)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    conf = lash.forward_all_layers(params, tokens, cfg)[1].softmax(-1).amax(-1)  # exit layer 2
    threshold = float(conf.flatten().sort().values[4])  # the 4 tokens below it continue
    exit_mask = conf >= threshold
    assert int(exit_mask.sum()) == 6
    ffn_tokens = []
    real_ffn = lash.swiglu_ffn
    monkeypatch.setattr(lash, 'swiglu_ffn', lambda p, x: (ffn_tokens.append(x.shape[:-1].numel()), real_ffn(p, x))[1])
    logits, got_mask = lash.forward_routed(params, tokens, cfg, 2, threshold)
    assert torch.equal(got_mask, exit_mask)
    assert ffn_tokens == [10, 10, 4, 4]  # layers 3 and 4 run the feed-forward on the 4 continuing tokens only
    assert torch.allclose(logits, dense_routed_logits(params, tokens, cfg, 2, exit_mask), atol=1e-5)
    config = lash.TrainingConfig({1: 0, 2: 0.5, 3: 0, 4: 0.5}, routing_threshold=threshold, exit_layer=2)
    stats = lash.evaluate(params, [(tokens, tokens)], config, cfg)
    assert stats['exit_rate'] == 0.6
    assert stats['compute_cost'] == pytest.approx((10 * 2 + 4 * 2) / (10 * 4))
    correct = logits.argmax(-1) == tokens
    assert stats['exited_accuracy'] == pytest.approx(correct[exit_mask].float().mean().item())
    assert stats['continued_accuracy'] == pytest.approx(correct[~exit_mask].float().mean().item())
    # FLOPs by hand for one row of T=3 with the middle token exiting after layer 1 of 2:
    D, Fd, V = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    layer = lambda t: 8 * D * D + 6 * D * Fd + 4 * D * (t + 1)
    two = lash.ModelConfig(vocab_size=V, dim=D, num_layers=2, num_heads=2, ffn_dim=Fd)
    expected = (layer(0) + layer(1) + layer(2)) + (layer(0) + 4 * D * D + layer(2)) + 2 * D * V * (3 + 2)
    assert lash.routed_flops(two, torch.tensor([[False, True, False]]), 1) == expected
    assert lash.routed_flops(two, torch.zeros(1, 3, dtype=torch.bool), 2) == \
        2 * (layer(0) + layer(1) + layer(2)) + 2 * D * V * 3


def test_lash_routed_forward_matches_dense_reference_in_gradients():
    cfg, params = lash_tiny(3)
    params = lash.map_tree(lambda t: t.requires_grad_(), lash_scrambled(params))
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (3, 6), generator=gen)
    exit_mask = torch.rand(3, 6, generator=gen) < 0.5
    a = lash.forward_routed(params, tokens, cfg, 1, exit_mask=exit_mask)[0]
    b = dense_routed_logits(params, tokens, cfg, 1, exit_mask)
    assert torch.allclose(a, b, atol=1e-5)
    leaves = lash.tree_leaves(params)
    for ga, gb in zip(torch.autograd.grad(a.square().sum(), leaves), torch.autograd.grad(b.square().sum(), leaves)):
        assert torch.allclose(ga, gb, atol=1e-4)


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=2), vocab=st.integers(1, 7), seed=st.integers(0, 99))
def test_lash_confidence_is_the_largest_softmax_probability(shape, vocab, seed):
    logits = np.random.default_rng(seed).normal(size=(*shape, vocab)) * 4
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(lash.confidence(torch.tensor(logits)).numpy(), probs.max(-1), rtol=1e-12)


def lash_generation_setup(seed, B=2, T0=3):
    cfg, params = lash_tiny(4, seed=seed)
    params = lash_scrambled(params, seed)
    prompt = torch.randint(0, cfg.vocab_size, (B, T0), generator=torch.Generator().manual_seed(seed))
    return cfg, params, prompt


@settings(max_examples=4)
@given(seed=st.integers(0, 99), T0=st.integers(1, 4))
def test_lash_generate_full_depth_equals_argmax_of_forward_on_the_growing_sequence(seed, T0):
    cfg, params, prompt = lash_generation_setup(seed, T0=T0)
    tokens, exit_mask = lash.generate(params, prompt, cfg, lash.create_standard_config(4), 6)
    assert tokens.shape == (2, T0 + 6) and torch.equal(tokens[:, :T0], prompt) and not exit_mask.any()
    for t in range(T0, T0 + 6):  # no cache: the whole sequence so far, every step
        assert torch.equal(tokens[:, t], lash.forward(params, tokens[:, :t], cfg)[:, -1].argmax(-1))


@settings(max_examples=4)
@example(seed=0)
@given(seed=st.integers(0, 99))
def test_lash_generate_routed_equals_routed_forward_with_the_same_exits(seed):
    """Each new token is the argmax of forward_routed (no cache, every step) on the sequence so far with the exit
    mask generation took; that mask is the layer-2 head's confidence >= threshold, read off a plain forward."""
    cfg, params, prompt = lash_generation_setup(seed, B=3)
    conf = lash.confidence(lash.forward_all_layers(params, prompt, cfg)[1]).flatten().sort().values
    threshold = float(conf[4:6].mean())  # between two prompt tokens' confidences: some pass, some do not
    config = lash.TrainingConfig({1: 0, 2: 1, 3: 0, 4: 1}, routing_threshold=threshold)
    tokens, exit_mask = lash.generate(params, prompt, cfg, config, 8)
    T0 = prompt.shape[1]
    fed = tokens[:, T0 - 1:-1]  # the token each step fed in
    assume(exit_mask.any() and (~exit_mask).any())  # both kinds of step
    layer2 = lash.confidence(lash.output_head(params, lash.hidden_after(params, tokens[:, :-1], cfg, 2), cfg))
    clear = (layer2[:, T0 - 1:] - threshold).abs() > 1e-5  # float round-off may decide a tie either way
    assert torch.equal(exit_mask[clear], (layer2[:, T0 - 1:] >= threshold)[clear]) and fed.shape == exit_mask.shape
    mask = torch.cat([torch.zeros(3, T0 - 1, dtype=torch.bool), exit_mask], 1)  # the prompt ran at full depth
    for t in range(T0, T0 + 8):
        logits, _ = lash.forward_routed(params, tokens[:, :t], cfg, 2, exit_mask=mask[:, :t])
        assert torch.equal(tokens[:, t], logits[:, -1].argmax(-1))


def test_lash_generate_threshold_one_equals_full_depth_and_tiny_temperature_equals_greedy():
    cfg, params, prompt = lash_generation_setup(7)
    full, _ = lash.generate(params, prompt, cfg, lash.create_standard_config(4), 5)
    never = lash.TrainingConfig({1: 0, 2: 1, 3: 0, 4: 1}, routing_threshold=1.0)
    tokens, exit_mask = lash.generate(params, prompt, cfg, never, 5)
    assert torch.equal(tokens, full) and not exit_mask.any()
    sampled, _ = lash.generate(params, prompt, cfg, never, 5, temperature=1e-6, gen=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, full)
    hot = [lash.generate(params, prompt, cfg, never, 20, 5.0, torch.Generator().manual_seed(s))[0] for s in (0, 0, 1)]
    assert torch.equal(hot[0], hot[1]) and not torch.equal(hot[0], hot[2])  # seeded, and really sampled
    for kwargs, message in ((dict(max_new_tokens=0), 'max_new_tokens'), (dict(temperature=-1.0), 'temperature'),
                            (dict(prompt=prompt[:, :0]), 'at least one token')):
        with pytest.raises(ValueError, match=message):
            lash.generate(**dict(dict(params=params, prompt=prompt, cfg=cfg, config=never, max_new_tokens=5),
                                 **kwargs))


def test_lash_early_stopping_stops_and_restores():
    params = {'w': torch.zeros(2, requires_grad=True)}
    opt = torch.optim.SGD([params['w']], lr=1.0)
    val_losses = iter([3.0, 2.0, 2.5, 1.0, 0.5])
    seen = []
    state = lash.train_with_early_stopping(
        params, lambda p, b: -(p['w'] * b).sum(), opt, lambda epoch: [torch.ones(2)], lambda p: next(val_losses),
        max_epochs=10, on_epoch=lambda s, v: seen.append(params['w'].detach().clone()))
    assert state['epoch'] == 3 and state['stopped'] and state['best_epoch'] == 2 and state['step'] == 3
    assert torch.equal(params['w'].detach(), seen[1]) and not torch.equal(seen[1], seen[2])
    val_losses = iter([5.0, 4.0, 4.5, 4.6, 3.0])
    state = lash.train_with_early_stopping(
        params, lambda p, b: -(p['w'] * b).sum(), opt, lambda epoch: [torch.ones(2)] * 2,
        lambda p: next(val_losses), max_epochs=10, patience=2)
    assert state['epoch'] == 4 and state['step'] == 8 and state['best_epoch'] == 2


def test_lash_early_stopping_resumes_mid_epoch_like_an_uninterrupted_run():
    def run(interrupt_at):
        params = {'w': torch.zeros(3, requires_grad=True)}
        opt = torch.optim.Adam([params['w']], lr=0.1)
        batches = lambda epoch: [torch.full((3,), float(epoch * 10 + i)) for i in range(4)]
        loss_fn = lambda p, b: (p['w'] - b).square().sum()
        val_fn = lambda p: (p['w'] - 3.0).square().sum().item()

        def on_step(state, loss):
            if state['step'] == interrupt_at:
                raise KeyboardInterrupt
        state = lash.new_training_state()
        try:
            lash.train_with_early_stopping(params, loss_fn, opt, batches, val_fn, 3, 5, state=state,
                                           on_step=on_step)
        except KeyboardInterrupt:
            lash.train_with_early_stopping(params, loss_fn, opt, batches, val_fn, 3, 5, state=state)
        return params['w'].detach(), state
    (w_ref, s_ref), (w, s) = run(None), run(6)
    assert torch.equal(w, w_ref) and s['step'] == s_ref['step'] == 12 and s['history'] == s_ref['history']


def test_lash_data_windows_and_split(tmp_path):
    tokens = lash.load_corpus()
    assert tokens.dtype == torch.long and tokens.numel() > 100_000 and int(tokens.max()) < 256
    train_t, val_t, test_t = lash.split_corpus(tokens)
    assert torch.equal(torch.cat([train_t, val_t, test_t]), tokens) and len(val_t) == len(test_t)
    w = lash.make_windows(torch.arange(23), 5, offset=2)
    assert w.shape == (4, 6) and w[0].tolist() == [2, 3, 4, 5, 6, 7] and w[-1, -1] == 22
    b = lash.batch_windows(w, 3, mask=torch.arange(24).view(4, 6)[:, :5] > 3)
    assert [x[0].shape[0] for x in b] == [3, 1] and torch.equal(b[0][1], w[:3, 1:]) and b[1][2].all()
    assert all(torch.equal(x[0], y[0]) for x, y in zip(lash.epoch_batches(train_t, 16, 8, 1, 2),
                                                        lash.epoch_batches(train_t, 16, 8, 1, 2)))
    (tmp_path / 'bad.txt').write_bytes(b'ok \xff\xfe')
    with pytest.raises(ValueError, match='not UTF-8'):
        lash.load_corpus(str(tmp_path / 'bad.txt'))
    (tmp_path / 'ok.txt').write_text('héllo')
    assert lash.load_corpus(str(tmp_path / 'ok.txt')).tolist() == list('héllo'.encode())


@given(n=st.integers(2, 60), ratio=st.floats(0.05, 0.95), seed=st.integers(0, 99), levels=st.integers(2, 50))
def test_ashem_mining_selects_exactly_the_least_confident(n, ratio, seed, levels):
    conf = torch.randint(0, levels, (n, 3), generator=torch.Generator().manual_seed(seed)).float() / levels
    k = round(ratio * conf.numel())
    if not 0 < k < conf.numel():
        with pytest.raises(ValueError, match='leaves one side empty'):
            lash.mine_hard_examples(conf, ratio)
        return
    hard, threshold = lash.mine_hard_examples(conf, ratio)
    assert hard.shape == conf.shape and int(hard.sum()) == k
    assert conf[hard].max() <= conf[~hard].min() == threshold
    ranked = sorted(range(conf.numel()), key=lambda i: (conf.flatten()[i].item(), i))  # least confident first
    assert set(ranked[:k]) == set(torch.nonzero(hard.flatten()).flatten().tolist())


def ashem_setup(steps=3):
    cfg1, params1 = lash_tiny(2, seed=4)
    params1 = lash.map_tree(lambda t: t.requires_grad_(), lash_scrambled(params1, 4))  # as train.py's are
    params2, cfg2 = lash.grow_transformer(params1, cfg1, 4, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, cfg1.vocab_size, (4, 9), generator=gen)
    conf = lash.token_confidence(params1, [(tokens,)], cfg1, 2)[0]
    hard, threshold = lash.mine_hard_examples(conf, 0.5)
    opt = lash.create_optimizer(params2, lash.create_standard_config(4), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        lash.ashem_loss(params2, (tokens, tokens.roll(1, 1), ~hard), cfg2, 2).backward()
        opt.step()
    return cfg1, params1, cfg2, params2, tokens, conf, hard, threshold, opt


def test_ashem_frozen_phase1_params_do_not_change_in_phase2():
    cfg1, params1, cfg2, params2, *_, opt = ashem_setup()
    assert {g['name'] for g in opt.param_groups} == {'layer3', 'layer4'}
    before = lash.tree_leaves(params1)
    after = lash.tree_leaves({'embed': params2['embed'], 'layers': params2['layers'][:2], 'head': params2['head']})
    assert len(before) == len(after) and all(torch.equal(a, b) and not b.requires_grad for a, b in zip(before, after))
    assert any(t.abs().sum() > 0 for t in lash.tree_leaves(params2['layers'][2]['attn']['wo']))


def test_ashem_routing_exits_confident_tokens_and_charges_the_right_cost():
    cfg1, params1, cfg2, params2, tokens, conf, hard, threshold, _ = ashem_setup()
    shallow_conf = lash.forward(params1, tokens, cfg1).softmax(-1).amax(-1)  # independent: the shallow model
    config = lash.TrainingConfig({1: 0, 2: 0, 3: 0, 4: 1}, routing_threshold=threshold, exit_layer=2)
    _, exit_mask = lash.forward_routed(params2, tokens, cfg2, 2, threshold)
    assert torch.equal(exit_mask, shallow_conf >= threshold) and torch.equal(exit_mask, ~hard)
    stats = lash.evaluate(params2, [(tokens, tokens)], config, cfg2)
    n, deep = tokens.numel(), int(hard.sum())
    assert stats['exit_rate'] == (n - deep) / n
    assert stats['compute_cost'] == pytest.approx((2 * n + 2 * deep) / (4 * n))
    assert stats['flop_cost'] < 1


def test_ashem_exited_predictions_equal_the_shallow_model():
    cfg1, params1, cfg2, params2, tokens, conf, hard, threshold, _ = ashem_setup()
    logits, exit_mask = lash.forward_routed(params2, tokens, cfg2, 2, threshold)
    shallow = lash.forward(params1, tokens, cfg1)
    assert exit_mask.any() and (~exit_mask).any()
    assert torch.allclose(logits[exit_mask], shallow[exit_mask], atol=1e-6)
    assert not torch.allclose(logits[~exit_mask], shallow[~exit_mask], atol=1e-3)  # the deep part did learn
    hard_masks = [~exit_mask]
    stats = lash.evaluate(params2, [(tokens, tokens)], lash.TrainingConfig(
        {1: 0, 2: 0, 3: 0, 4: 1}, routing_threshold=threshold, exit_layer=2), cfg2, hard_masks)
    nll = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction='none').view_as(tokens)
    assert stats['hard_ppl'] == pytest.approx(np.exp(nll[~exit_mask].mean().item()), rel=1e-5)
    assert stats['easy_ppl'] == pytest.approx(np.exp(nll[exit_mask].mean().item()), rel=1e-5)


def ashem_table(stdout):
    """The rows of the final table."""
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.split()[:2] == ['model', 'steps'])
    return [l.split() for l in lines[start:start + 5]]


def test_ashem_and_lash_cli_run_resume_and_reject_bad_flags(tmp_path, capsys):
    text = tmp_path / 'text.txt'
    text.write_text(' '.join(f'word{i % 37} is {i % 7}.' for i in range(800)))
    common = ['--data', str(text), '--seq_len', '16', '--batch_size', '8', '--dim', '16', '--max_epochs', '1',
              '--log_every', '1000', '--device', 'cpu']
    train.main(['ashem', *common, '--training_iterations', '3', '--log_dir', str(tmp_path / 'a')])
    first = capsys.readouterr().out
    assert 'ASHEM two-stage (2+2 layers)' in first and 'hard PPL' in first
    train.main(['ashem', *common, '--training_iterations', '3', '--log_dir', str(tmp_path / 'a'), '--resume'])
    again = capsys.readouterr().out
    assert 'phase2: resumed at step 3' in again and ashem_table(again) == ashem_table(first)
    train.main(['lash', *common, '--training_iterations', '2', '--num_layers', '3', '--layer_weights', '1:0,2:1,3:1',
                '--routing_threshold', '0.2', '--log_dir', str(tmp_path / 'b')])
    out = capsys.readouterr().out
    assert 'routed' in out and 'exit_rate' in out
    for flags, message in ((['--layer_weights', '1:0,2:x'], "--layer_weights: expected 'layer:value"),
                           (['--layer_weights', '1:1,2:1'], 'they name 2 layers, --num_layers is 4'),
                           (['--exit_layer', '2'], 'only used together with routing_threshold')):
        with pytest.raises(SystemExit, match=message):
            train.main(['lash', *common, *flags, '--log_dir', str(tmp_path / 'c')])


def test_lash_cli_generate_and_benches_read_a_trained_checkpoint(tmp_path, capsys):
    import bench
    text = tmp_path / 'text.txt'
    text.write_text(' '.join(f'word{i % 37} is {i % 7}.' for i in range(400)))
    ckpt = str(tmp_path / 'b' / 'train.pt')
    train.main(['lash', '--data', str(text), '--seq_len', '16', '--batch_size', '8', '--dim', '16', '--max_epochs',
                '1', '--log_every', '1000', '--device', 'cpu', '--training_iterations', '2', '--num_layers', '3',
                '--layer_weights', '1:0,2:1,3:1', '--log_dir', str(tmp_path / 'b')])
    capsys.readouterr()
    tokens, exit_mask = train.main(['lash', '--generate', 'word1', '--ckpt', ckpt, '--max_new_tokens', '6',
                                    '--routing_threshold', '0.05', '--device', 'cpu'])
    out = capsys.readouterr().out
    assert tokens.shape == (1, 11) and out.startswith('word1') and 'exit rate' in out and '6 tokens in' in out
    cfg, params, _ = train.lash_load(ckpt, torch.device('cpu'))
    config = lash.TrainingConfig({1: 0, 2: 1, 3: 1}, routing_threshold=0.05)
    assert torch.equal(lash.generate(params, tokens[:, :5], cfg, config, 6)[0], tokens)
    for flags, message in ((['--generate', ''], 'non-empty prompt'),
                           (['--generate', 'x', '--ckpt', str(text)], 'cannot be read')):
        with pytest.raises(SystemExit, match=message):
            train.main(['lash', *flags, '--device', 'cpu', '--log_dir', str(tmp_path / 'b')])
    _, _, val, test, _ = train.lash_setup(argparse.Namespace(data=str(text), seq_len=16, batch_size=8, device='cpu'))
    threshold = float(torch.cat([lash.confidence(lash.forward_all_layers(params, b[0], cfg)[1]).detach().flatten()
                                 for b in val + test]).median())
    rows = bench.run_lash_exit(argparse.Namespace(ckpt=ckpt, thresholds=f'{threshold!r},1', exit_layer=2,
                                                  threads='1', repeats=1, device='cpu', batch_size=None))
    routed = lash.evaluate(params, val + test, lash.TrainingConfig({1: 0, 2: 0, 3: 1}, routing_threshold=threshold,
                                                                   exit_layer=2), cfg)
    assert rows[0]['exit_rate'] == routed['exit_rate'] > 0 and rows[0]['ppl_routed'] == pytest.approx(routed['ppl'])
    assert rows[1]['exit_rate'] == 0 and rows[1]['ppl_routed'] == pytest.approx(rows[1]['ppl_full'])
    assert rows[1]['flop_cost'] > 1  # threshold 1: nobody exits, and the exit head ran for nothing
    assert all(r['full_s'] > 0 and r['routed_s'] > 0 for r in rows)
    rows = bench.run_lash_generate(argparse.Namespace(ckpt=ckpt, thresholds='1', exit_layer=2, threads='1',
                                                      repeats=1, device='cpu', prompts=2, prompt_len=4,
                                                      new_tokens=3))
    assert rows[0]['exit_rate'] == 0 and rows[0]['same_text'] == '2/2' and rows[0]['tokens'] == 6


# ================================================================================================================
# hpcm.py: Bi-WKV4 and RWKV blocks

import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

import hpcm  # noqa: E402


def wkv_loop(w, u, k, v):
    """The Bi-WKV4 formula element by element (float64, tiny sizes): the oracle for bi_wkv_dense."""
    B, T, C = k.shape
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                num = den = 0.0
                for i in range(T):
                    e = (float(u[c]) / T if i == t else -(abs(t - i) - 1) * float(w[c]) / T) + float(k[b, i, c])
                    num += math.exp(e) * float(v[b, i, c])
                    den += math.exp(e)
                y[b, t, c] = num / den
    return y


def wkv_inputs(seed, B, T, C, k_scale, k_offset, w_scale, dtype=torch.float64, device='cpu', signed=False):
    """Raw w in [0, w_scale) (w is what decays across the sequence), or in (-w_scale, w_scale) when signed (w < 0:
    far tokens weigh more), u ~ N(0, 2²), k = offset + scale·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, generator=g) * w_scale
    if signed:
        w = w * torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0)
    u = torch.randn(C, generator=g) * 2
    k = torch.randn(B, T, C, generator=g) * k_scale + k_offset
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    return [t.to(dtype=dtype, device=device) for t in (w, u, k, v, gy)]


def wkv_value_and_grads(fn, w, u, k, v, gy):
    leaves = [t.detach().clone().requires_grad_() for t in (w, u, k, v)]
    y = fn(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, gy))


def relative_errors(got, ref, scales=None, floor=1e-20):
    """‖got - ref‖ / (‖ref‖ + scale) per tensor. The floor stands for float32's range: a gradient of size
    e^{-200} (w·T = 600 at T = 3) is exactly 0 in float32 and only exists in the float64 reference."""
    scales = scales or [0.0] * len(ref)
    return [((a.double() - b.double()).norm() / (b.double().norm() + s).clamp_min(floor)).item()
            for a, b, s in zip(got, ref, scales)]


def wkv_scales(gy, saturated):
    """Error scales for (y, gw, gu, gk, gv). gw and gu are sums of B·T signed terms, so their float32 error is set
    by the terms' size (~‖gy‖), not by the sum, which may cancel to anything. Where the weights saturate (widely
    spread keys, or w < 0 so large that one far term outweighs the rest), gk, gv shrink like 1 - p while the float32
    rounding of v_i - y_t (~1e-7 |v|) does not."""
    g = gy.norm().item()
    return [0.0, g, g] + [g if saturated else 0.0] * 2


def test_wkv_dense_matches_formula_loop():
    w, u, k, v, _ = wkv_inputs(0, 2, 5, 3, 2.0, 0.0, 20.0)
    torch.testing.assert_close(hpcm.bi_wkv_dense(w, u, k, v), wkv_loop(w, u, k, v), rtol=1e-12, atol=1e-12)


wkv_cases = dict(B=st.integers(1, 2), T=st.integers(1, 24), C=st.integers(1, 3),
                 k_scale=st.sampled_from([0.0, 1.0, 5.0, 30.0]), k_offset=st.sampled_from([0.0, -60.0, 500.0]),
                 w_scale=st.sampled_from([0.0, 1.0, 30.0, 3000.0]), seed=st.integers(0, 2**16))


@given(**wkv_cases)
def test_wkv_scan_matches_dense(B, T, C, k_scale, k_offset, w_scale, seed):
    """float32 scan vs float64 dense on the same (float32-representable) inputs, outputs and every gradient;
    k offsets of 500 overflow a naive exp, w·T up to 3000 underflows a naive decay."""
    w, u, k, v, gy = wkv_inputs(seed, B, T, C, k_scale, k_offset, w_scale, dtype=torch.float32)
    ref = wkv_value_and_grads(hpcm.bi_wkv_dense, *(t.double() for t in (w, u, k, v, gy)))
    got = wkv_value_and_grads(hpcm.bi_wkv_scan, w, u, k, v, gy)
    assert all(torch.isfinite(g).all() for g in got)
    errors = relative_errors(got, ref, wkv_scales(gy, k_scale > 1))
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize('w_scale', [500.0, 5000.0])
def test_wkv_scan_exact_for_large_negative_decays(w_scale):
    """w < 0 with |w| up to 5000: far tokens dominate and log Z_t reaches ~|w|; kept relative to the decay of the
    farthest term, its float32 rounding no longer reaches the gradients (without that, gv's error is 1.1e-4 at
    |w| = 5000)."""
    w, u, k, v, gy = wkv_inputs(9, 2, 40, 3, 1.0, 0.0, w_scale, dtype=torch.float32)
    w = -(w + w_scale) / 2  # all in (-w_scale, -w_scale / 2]
    ref = wkv_value_and_grads(hpcm.bi_wkv_dense, *(t.double() for t in (w, u, k, v, gy)))
    got = wkv_value_and_grads(hpcm.bi_wkv_scan, w, u, k, v, gy)
    assert max(relative_errors(got, ref, wkv_scales(gy, True))) < 1e-6


def test_wkv_scan_negative_decay_and_float64():
    w, u, k, v, gy = wkv_inputs(1, 2, 17, 3, 1.0, 0.0, 1.0)
    ref = wkv_value_and_grads(hpcm.bi_wkv_dense, -w, u, k, v, gy)
    got = wkv_value_and_grads(hpcm.bi_wkv_scan, -w, u, k, v, gy)
    assert max(relative_errors(got, ref)) < 1e-12


def test_wkv_scan_gradcheck():
    w, u, k, v, _ = wkv_inputs(2, 2, 6, 3, 2.0, 100.0, 5.0)
    args = [t.requires_grad_() for t in (w, u, k, v)]
    assert torch.autograd.gradcheck(hpcm.bi_wkv_scan, args)
    assert torch.autograd.gradcheck(hpcm.bi_wkv, args)  # the dispatching wrapper (scan on CPU)


def test_wkv_scan_long_sequence_stays_accurate():
    """T = 2048 in float32: the running maximum is never decayed step by step, so its exponent does not drift
    (decaying it step by step gave 1e-4 here); what is left is the sequential float32 summation of ~T terms."""
    w, u, k, v, gy = wkv_inputs(3, 1, 2048, 2, 1.0, 0.0, 3.0, dtype=torch.float32)
    ref = wkv_value_and_grads(hpcm.bi_wkv_dense, *(t.double() for t in (w, u, k, v, gy)))
    got = wkv_value_and_grads(hpcm.bi_wkv_scan, w, u, k, v, gy)
    assert max(relative_errors(got, ref)) < 3e-5


def test_wkv_paths_and_errors(monkeypatch):
    w, u, k, v, _ = wkv_inputs(4, 1, 9, 2, 1.0, 0.0, 1.0)
    monkeypatch.setenv('HPCM_WKV', 'dense')
    torch.testing.assert_close(hpcm.bi_wkv(w, u, k, v), hpcm.bi_wkv_dense(w, u, k, v), rtol=0, atol=0)
    monkeypatch.setenv('HPCM_WKV', 'scan')
    torch.testing.assert_close(hpcm.bi_wkv(w, u, k, v), hpcm.bi_wkv_scan(w, u, k, v), rtol=0, atol=0)
    monkeypatch.setenv('HPCM_WKV', 'fast')
    with pytest.raises(ValueError, match='HPCM_WKV'):
        hpcm.bi_wkv(w, u, k, v)
    for path in ('naive', 'split', 'cuda'):
        monkeypatch.setenv('HPCM_WKV', path)
        with pytest.raises(RuntimeError, match=f'bi_wkv_{path} needs CUDA tensors and cupy'):
            hpcm.bi_wkv(w, u, k, v)  # CPU tensors
    monkeypatch.delenv('HPCM_WKV')
    with pytest.raises(ValueError, match=r'w and u must be \(2,\)'):
        hpcm.bi_wkv(w[:1], u, k, v)
    with pytest.raises(ValueError, match='k and v must both be'):
        hpcm.bi_wkv(w, u, k, v[:, :3])
    with pytest.raises(ValueError, match='T = 0'):
        hpcm.bi_wkv(w, u, k[:, :0], v[:, :0])


WKV_KERNELS = ('naive', 'split', 'cuda')


def wkv_kernel_errors(path, inputs, saturated):
    """A CUDA kernel (bi_wkv_naive, bi_wkv_split or bi_wkv_cuda; or the scan) in float32 against the float64 dense
    formula: the errors of y and the four gradients."""
    got = wkv_value_and_grads(getattr(hpcm, f'bi_wkv_{path}'), *inputs)
    assert all(torch.isfinite(g).all() for g in got)
    ref = wkv_value_and_grads(hpcm.bi_wkv_dense, *(t.double() for t in inputs))
    return relative_errors(got, ref, wkv_scales(inputs[-1], saturated))


WKV_CASES = [(1, 1, 1, 1.0, 0.0, 1.0), (2, 7, 3, 3.0, 0.0, 30.0), (3, 129, 33, 1.0, 500.0, 3.0),
             (2, 257, 65, 5.0, -40.0, 0.0), (1, 1000, 5, 1.0, 0.0, 3000.0), (4, 128 * 12 + 5, 31, 2.0, 0.0, 1.0),
             (1, 128 * 128, 2, 1.0, 0.0, 3.0), (2, 500, 8, 40.0, 0.0, 1.0)]


@needs_cupy[0]
@needs_cupy[1]
@pytest.mark.parametrize('path, B, T, C, k_scale, k_offset, w_scale', [
    (path, *case) for path in WKV_KERNELS for case in WKV_CASES if path == 'cuda' or case[1] <= 4096])
def test_wkv_kernels_match_dense(path, B, T, C, k_scale, k_offset, w_scale):
    """float32 kernels vs float64 dense: outputs and every gradient, odd sizes, several chunks, T = 128·128, decays
    that take the chunked kernel's exact path (w = 3000), keys with standard deviation 40. The naive kernel adds a
    row's terms one after another (the split one T/64 of them), so with a weak decay their float32 error grows with
    T (1.3e-5 for split at T = 128·128); their T = 128·128 cases are in the test below, with decays that keep the
    sums short."""
    inputs = wkv_inputs(0, B, T, C, k_scale, k_offset, w_scale, dtype=torch.float32, device='cuda')
    errors = wkv_kernel_errors(path, inputs, k_scale > 1)
    assert max(errors) < 1e-5, errors


@needs_cupy[0]
@needs_cupy[1]
@settings(max_examples=20)
@given(path=st.sampled_from(WKV_KERNELS), B=st.integers(1, 2), C=st.integers(1, 40),
       T=st.one_of(st.integers(1, 300), st.sampled_from([96, 97, 128, 129, 1000, 4096])),
       w_scale=st.sampled_from([0.0, 1.0, 10.0, 90.0, 300.0, 3000.0]), k_scale=st.sampled_from([0.0, 1.0, 5.0, 30.0]),
       seed=st.integers(0, 2**16))
@example(path='cuda', B=1, C=2, T=16384, w_scale=300.0, k_scale=1.0, seed=0)
@example(path='naive', B=1, C=2, T=16384, w_scale=300.0, k_scale=1.0, seed=0)
@example(path='split', B=1, C=2, T=16384, w_scale=300.0, k_scale=1.0, seed=0)
def test_wkv_kernels_match_dense_for_either_decay_sign(path, B, C, T, w_scale, k_scale, seed):
    """Decays of both signs in one call (w < 0 weighs far tokens more; |w| = 300 is e^300 across the row, far past
    float32's range; larger |w| of either sign in the test below), keys of every spread, rows of one to many
    chunks."""
    C = C if T <= 1000 else min(C, 2)  # the dense reference holds B·T²·C float64 numbers
    if w_scale == 3000.0:  # large decays only with w >= 0, where far terms vanish instead of dominating
        inputs = wkv_inputs(seed, B, T, C, k_scale, 0.0, w_scale, dtype=torch.float32, device='cuda')
    else:
        inputs = wkv_inputs(seed, B, T, C, k_scale, 0.0, w_scale, dtype=torch.float32, device='cuda', signed=True)
    errors = wkv_kernel_errors(path, inputs, k_scale > 1)
    assert max(errors) < 1e-5, errors


@needs_cupy[0]
@needs_cupy[1]
@settings(max_examples=16)
@given(path=st.sampled_from(WKV_KERNELS + ('scan',)), sign=st.sampled_from([-1.0, 1.0]),
       w_scale=st.sampled_from([500.0, 1000.0, 2000.0, 5000.0]), T=st.sampled_from([2, 3, 64, 129, 300, 1000, 2048]),
       k_scale=st.sampled_from([1.0, 5.0]), seed=st.integers(0, 2**16))
@example(path='naive', sign=-1.0, w_scale=5000.0, T=1000, k_scale=1.0, seed=0)
@example(path='split', sign=-1.0, w_scale=5000.0, T=1000, k_scale=1.0, seed=0)
@example(path='cuda', sign=-1.0, w_scale=5000.0, T=1000, k_scale=1.0, seed=0)
@example(path='cuda', sign=-1.0, w_scale=2000.0, T=2048, k_scale=5.0, seed=0)
def test_wkv_float32_exact_for_large_decays_of_either_sign(path, sign, w_scale, T, k_scale, seed):
    """|w| from 500 to 5000 of either sign on every float32 path. With w < 0 log Z_t reaches ~|w| (log2 Z up to
    7200), whose float32 rounding would give the gradients errors of 1e-5 .. 8.6e-5 at |w| = 1000 .. 5000 were log Z
    not kept relative to the decay of the farthest term (wkv_kernel.cu, section 0). The weights saturate there (one far
    term outweighs the next by e^{|w|/T}), so gk, gv are measured against ‖gy‖."""
    B, C = (2, 5) if T <= 300 else (1, 2)  # the dense reference holds B·T²·C float64 numbers
    inputs = wkv_inputs(seed, B, T, C, k_scale, 0.0, w_scale, dtype=torch.float32, device='cuda')
    inputs[0] = sign * (inputs[0] + w_scale) / 2  # |w| in [w_scale / 2, w_scale)
    assert max(wkv_kernel_errors(path, inputs, True)) < 1e-5


@needs_cupy[0]
@needs_cupy[1]
@pytest.mark.parametrize('path', WKV_KERNELS)
def test_wkv_kernels_exact_where_a_lean_frame_underflows(path):
    """One key 150 above the three before it and the rest 150 below, with a bonus u/T = -150 that cancels the spike:
    y at the spike is set by the tokens before it, which a frame referenced to the spike weighs 2^-216, flushed to 0.
    The chunked forward must take its exact path there (without that fallback it returns NaN); the naive and split
    kernels have no frames."""
    T, C = 64, 4
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, T, C, generator=g) * 0.5
    k[:, 3] += 150
    k[:, 4:] -= 150
    w, u = torch.rand(C, generator=g), torch.full((C,), -150.0 * T)
    v, gy = torch.randn(1, T, C, generator=g), torch.randn(1, T, C, generator=g)
    assert max(wkv_kernel_errors(path, [t.cuda() for t in (w, u, k, v, gy)], True)) < 1e-5


@needs_cupy[0]
@needs_cupy[1]
def test_wkv_kernels_and_scan_agree_and_gradcheck():
    """naive, split and chunked kernels and torch scan on the same float32 inputs; float64 gradcheck of every kernel;
    the same y without a gradient (the chunked forward then writes no log Z)."""
    inputs = wkv_inputs(5, 2, 700, 40, 2.0, 10.0, 10.0, dtype=torch.float32, device='cuda', signed=True)
    got = {p: wkv_value_and_grads(getattr(hpcm, f'bi_wkv_{p}'), *inputs) for p in WKV_KERNELS + ('scan',)}
    for a, b in (('naive', 'scan'), ('split', 'scan'), ('cuda', 'scan'), ('naive', 'split'), ('naive', 'cuda')):
        errors = relative_errors(got[a], got[b], wkv_scales(inputs[-1], True))
        assert max(errors) < 1e-5, (a, b, errors)
    w, u, k, v, _ = wkv_inputs(6, 1, 300, 2, 1.0, 50.0, 5.0, device='cuda', signed=True)  # float64, 3 chunks
    for p in WKV_KERNELS:
        fn = getattr(hpcm, f'bi_wkv_{p}')
        assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in (w, u, k, v)], fast_mode=True)
        with torch.no_grad():
            assert torch.equal(fn(*inputs[:4]), got[p][0])


def test_wkv_split_pieces_hold_about_8_tokens_16_to_64_a_row():
    """The split kernels' pieces a row by T, a hand-made table: the largest power of two P <= T / 8, within 16..64."""
    table = {1: 16, 64: 16, 255: 16, 256: 32, 300: 32, 511: 32, 512: 64, 1000: 64, 1024: 64, 16384: 64}
    assert {T: hpcm._wkv_split_pieces(T) for T in table} == table
    assert all(P in hpcm._WKV_SPLIT_PIECES for P in table.values())


@needs_cupy[0]
@needs_cupy[1]
def test_wkv_default_path_on_cuda_is_split_for_short_rows_else_chunked(monkeypatch):
    monkeypatch.delenv('HPCM_WKV', raising=False)
    calls = []
    for p in WKV_KERNELS:
        kernel = getattr(hpcm, f'bi_wkv_{p}')
        counted = lambda *a, p=p, kernel=kernel: calls.append(p) or kernel(*a)
        monkeypatch.setattr(hpcm, f'bi_wkv_{p}', counted)
        monkeypatch.setitem(hpcm._WKV_PATHS, p, counted)
    most = hpcm._WKV_SPLIT_MAX_ELEMS // hpcm._WKV_SPLIT_MAX_T  # B·C at the longest split rows
    for B, T, C in ((2, 1, 3), (2, hpcm._WKV_SPLIT_MAX_T, most // 2), (2, hpcm._WKV_SPLIT_MAX_T + 1, 3),
                    (2, hpcm._WKV_SPLIT_MAX_T, most // 2 + 1)):
        hpcm.bi_wkv(*wkv_inputs(7, B, T, C, 1.0, 0.0, 1.0, dtype=torch.float32, device='cuda')[:4])
    assert calls == ['split', 'split', 'cuda', 'cuda']
    monkeypatch.setenv('HPCM_WKV', 'naive')
    hpcm.bi_wkv(*wkv_inputs(7, 1, 5, 3, 1.0, 0.0, 1.0, dtype=torch.float32, device='cuda')[:4])
    assert calls[-1] == 'naive'
    w, u, k, v, _ = wkv_inputs(8, 1, 1, 2, 1.0, 0.0, 1.0, dtype=torch.float32, device='cuda')
    with pytest.raises(ValueError, match='batch B must be at most 65535'):
        hpcm.bi_wkv_cuda(w, u, k.new_zeros(65536, 1, 2), v.new_zeros(65536, 1, 2))
    with pytest.raises(ValueError, match='float32 or float64'):
        hpcm.bi_wkv_naive(w, u, k.half(), v.half())


def test_rwkv_omni_shift_equals_its_four_branches():
    gen = torch.Generator().manual_seed(0)
    p = hpcm.init_omni_shift(gen, 6)
    x = torch.randn(2, 6, 7, 5, generator=gen)
    a = p['alpha']
    branches = (a[0] * x + a[1] * F.conv2d(x, p['conv1']['weight'], groups=6)
                + a[2] * F.conv2d(x, p['conv3']['weight'], padding=1, groups=6)
                + a[3] * F.conv2d(x, p['conv5']['weight'], padding=2, groups=6))
    torch.testing.assert_close(hpcm.omni_shift(p, x), branches, rtol=1e-5, atol=1e-5)


@settings(max_examples=5)
@given(B=st.integers(1, 2), dim=st.integers(1, 9), H=st.integers(1, 5), W=st.integers(1, 5),
       hidden_rate=st.sampled_from([1, 2, 4]))
def test_rwkv_block_shapes(B, dim, H, W, hidden_rate):
    gen = torch.Generator().manual_seed(dim)
    x, ctx = torch.randn(B, dim, H, W, generator=gen), torch.randn(B, dim, H, W, generator=gen)
    outs = [hpcm.spatial_mix(hpcm.init_spatial_mix(gen, dim), x),
            hpcm.spatial_mix(hpcm.init_spatial_mix(gen, dim, key_norm=True), x),
            hpcm.channel_mix(hpcm.init_channel_mix(gen, dim, hidden_rate), x),
            hpcm.rwkv_fusion_block(hpcm.init_rwkv_fusion_block(gen, dim, hidden_rate), x),
            hpcm.rwkv_context_cell(hpcm.init_rwkv_context_cell(gen, dim, hidden_rate), ctx, x),
            hpcm.rwkv_fusion_net(hpcm.init_rwkv_fusion_net(gen, dim, 2, hidden_rate), x)]
    for y in outs:
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_rwkv_spatial_mix_uses_whole_image():
    """A change in one corner pixel reaches the opposite corner through Bi-WKV (OmniShift alone reaches 2 px)."""
    gen = torch.Generator().manual_seed(1)
    p = hpcm.init_spatial_mix(gen, 4)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    x2 = x.clone()
    x2[0, :, 0, 0] += 1.0
    assert (hpcm.spatial_mix(p, x2) - hpcm.spatial_mix(p, x))[0, :, 7, 7].abs().max() > 1e-6
    seq = lambda t: t.flatten(2).transpose(1, 2)  # (B, H·W, C), pixels in raster order
    shifted = seq(hpcm.omni_shift(p['omni_shift'], x))  # omni_shift is checked against its branches above
    y = hpcm.bi_wkv_dense(p['time_decay'], p['time_first'], shifted @ p['key']['weight'].T,
                          shifted @ p['value']['weight'].T)
    out = (torch.sigmoid(seq(x) @ p['receptance']['weight'].T) * y) @ p['output']['weight'].T
    torch.testing.assert_close(hpcm.spatial_mix(p, x), out.transpose(1, 2).reshape(x.shape), rtol=1e-4, atol=1e-5)


def test_rwkv_channel_mix_formula():
    gen = torch.Generator().manual_seed(2)
    p = hpcm.init_channel_mix(gen, 3, 2)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    shifted = hpcm.omni_shift(p['omni_shift'], x)
    key = torch.einsum('hc,bcyx->bhyx', p['key']['weight'], shifted).relu() ** 2
    value = torch.einsum('ch,bhyx->bcyx', p['value']['weight'], key)
    gate = torch.einsum('dc,bcyx->bdyx', p['receptance']['weight'], x).sigmoid()
    torch.testing.assert_close(hpcm.channel_mix(p, x), gate * value, rtol=1e-5, atol=1e-6)


def test_rwkv_fusion_block_gamma_zero_is_identity():
    gen = torch.Generator().manual_seed(3)
    p = hpcm.init_rwkv_fusion_block(gen, 5, 2)
    p['gamma1'], p['gamma2'] = torch.zeros(5), torch.zeros(5)
    x = torch.randn(2, 5, 3, 4, generator=gen)
    torch.testing.assert_close(hpcm.rwkv_fusion_block(p, x), x, rtol=0, atol=0)
    p['gamma1'] = torch.ones(5)
    assert not torch.allclose(hpcm.rwkv_fusion_block(p, x), x)


def test_rwkv_context_cell_uses_both_streams():
    gen = torch.Generator().manual_seed(4)
    p = hpcm.init_rwkv_context_cell(gen, 4, 2)
    ctx, x = torch.randn(1, 4, 3, 3, generator=gen), torch.randn(1, 4, 3, 3, generator=gen)
    y = hpcm.rwkv_context_cell(p, ctx, x)
    assert not torch.allclose(hpcm.rwkv_context_cell(p, ctx + 1, x), y)
    assert not torch.allclose(hpcm.rwkv_context_cell(p, ctx, x + 1), y)
    with pytest.raises(ValueError, match='differ'):
        hpcm.rwkv_context_cell(p, ctx, x[..., :2])
    with pytest.raises(ValueError, match=r'\(B, 4, H, W\)'):
        hpcm.rwkv_context_cell(p, ctx[:, :3], x)


def test_rwkv_fusion_net_checkpoint_same_values_and_grads():
    gen = torch.Generator().manual_seed(5)
    p = hpcm.init_rwkv_fusion_net(gen, 4, num_blocks=2, hidden_rate=2)
    x = torch.randn(2, 4, 3, 5, generator=gen)
    results = []
    for checkpoint in (False, True):
        leaves = [t.requires_grad_() for t in train.tree_leaves(p)]
        y = hpcm.rwkv_fusion_net(p, x, checkpoint=checkpoint)
        results.append([y.detach()] + list(torch.autograd.grad(y.square().sum(), leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert hpcm.rwkv_fusion_net(hpcm.init_rwkv_fusion_net(gen, 4, num_blocks=0), x).shape == x.shape
    with pytest.raises(ValueError, match='num_blocks'):
        hpcm.init_rwkv_fusion_net(gen, 4, num_blocks=-1)


def test_hpcm_conv2d_matches_torch_and_refuses_bad_groups():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, 4, 5, generator=gen)
    conv = hpcm.init_conv2d(gen, 6, 4, 3, groups=2)
    torch.testing.assert_close(hpcm.conv2d(conv, x), F.conv2d(x, conv['weight'], conv['bias'], padding=1, groups=2))
    with pytest.raises(ValueError, match='groups=4'):
        hpcm.init_conv2d(gen, 6, 4, 3, groups=4)
    with pytest.raises(ValueError, match='multiple of 3'):
        hpcm.conv2d(conv, x[:, :4])


def test_hpcm_layer_norm_channels_normalises_each_pixel_over_channels():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 4, 5, generator=gen)
    ln = hpcm.init_layer_norm(gen, 6)
    ln['weight'], ln['bias'] = torch.rand(6, generator=gen), torch.randn(6, generator=gen)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    ref = (x - mean) / torch.sqrt(var + 1e-5) * ln['weight'][:, None, None] + ln['bias'][:, None, None]
    torch.testing.assert_close(hpcm.layer_norm_channels(ln, x), ref, rtol=1e-5, atol=1e-5)


def test_hpcm_linear_is_x_times_weight_transposed_plus_bias():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 5, 6, generator=gen)
    lin = hpcm.init_linear(gen, 6, 3)
    torch.testing.assert_close(hpcm.linear(lin, x), x @ lin['weight'].T + lin['bias'])


# ================================================================================================================
# hpcm.py: the codec, rANS and bitstream

import math  # noqa: E402

import hpcm  # noqa: E402  (kept local to this section: the model file stands alone)


def hpcm_tiny(phase=0, seed=0):
    """The smallest codec with the full structure: 8 channel groups, 11 steps, every cell kind of the phase."""
    cfg = hpcm.HPCMConfig(M=16, N=8, phase=phase, widths=(8, 8, 16), heads=4)
    return cfg, hpcm.init_hpcm(cfg, torch.Generator().manual_seed(seed))


# The layouts of LIC-HPCM (src/models/base.py), written out as 0/1 tiles: an independent statement of the masks.
HPCM_FOUR_PART_TILES = [((1, 0), (0, 0)), ((0, 1), (0, 0)), ((0, 0), (1, 0)), ((0, 0), (0, 1))]
HPCM_FOUR_PART_ORDER = [(0, 1, 2, 3), (3, 2, 1, 0), (2, 3, 0, 1), (1, 0, 3, 2)]
HPCM_EIGHT_PART_TILES = [
    ('1000', '0000', '0010', '0000'), ('0010', '0000', '1000', '0000'), ('0000', '0100', '0000', '0001'),
    ('0000', '0001', '0000', '0100'), ('0100', '0000', '0001', '0000'), ('0001', '0000', '0100', '0000'),
    ('0000', '1000', '0000', '0010'), ('0000', '0010', '0000', '1000')]
HPCM_EIGHT_PART_ORDER = [[(k + 2 * i) % 8 for i in range(4)] + [((k ^ 1) + 2 * i) % 8 for i in range(4)]
                         for k in range(8)]


@given(groups=st.integers(1, 2), h=st.integers(1, 4), w=st.integers(1, 4))
def test_hpcm_masks_partition_the_latent_once(groups, h, w):
    M, H, W = 8 * groups, 4 * h, 4 * w
    schedule = hpcm.coding_schedule(M, H, W)
    assert [s for s, _ in schedule] == [0] * 2 + [1] * 3 + [2] * 6
    full = torch.stack([hpcm.to_full_res(m, s)[0] for s, m in schedule])  # (11, M, H, W)
    assert ((full == 0) | (full == 1)).all() and torch.equal(full.sum(0), torch.ones(M, H, W))
    assert [int(m.sum()) for m in full] == [M * H * W // 32] * 2 + [M * H * W // 16] * 3 + [M * H * W // 8] * 6
    g = M // 8
    for k in range(2, 8):  # s3 parts against the original's 4x4 tiles
        for j in range(8):
            tile = torch.tensor([[int(c) for c in row] for row in HPCM_EIGHT_PART_TILES[HPCM_EIGHT_PART_ORDER[k][j]]])
            assert torch.equal(schedule[k + 3][1][0, j * g:(j + 1) * g], tile.repeat(h, w).float().expand(g, H, W))
    for k in range(1, 4):  # s2 parts against the original's 2x2 tiles, on the s2 grid
        for j in range(4):
            tile = torch.tensor(HPCM_FOUR_PART_TILES[HPCM_FOUR_PART_ORDER[k][j]]).float()
            assert torch.equal(schedule[k + 1][1][0, j * 2 * g:(j + 1) * 2 * g], tile.repeat(h, w).expand(2 * g, -1, -1))
    s2 = sum(full[:5])  # s1 and s2 sit on each group's every-other-row/column lattice
    for j, (r, c) in enumerate([(0, 0), (1, 1), (0, 1), (1, 0)] * 2):
        lattice = torch.zeros(H, W)
        lattice[r::2, c::2] = 1
        assert torch.equal(s2[j * g:(j + 1) * g], lattice.expand(g, H, W))


def test_hpcm_coded_positions_are_each_steps_mask_in_flat_order_and_cached():
    cfg, params = hpcm_tiny()
    coder = hpcm.make_coder(params, cfg)
    positions = hpcm.coded_positions(coder, 8, 12)
    assert len(positions) == 11 and hpcm.coded_positions(coder, 8, 12) is positions
    for (_, mask), pos in zip(hpcm.coding_schedule(cfg.M, 8, 12), positions):
        ones = mask[0].tolist()  # [M][h][w]
        h, w = len(ones[0]), len(ones[0][0])
        assert pos.tolist() == [(m * h + i) * w + j for m in range(cfg.M) for i in range(h) for j in range(w)
                                if ones[m][i][j]]


def test_hpcm_subgrid_roundtrip_against_loops():
    t = torch.randn(2, 16, 6, 8)
    sub = hpcm.subgrid(t, hpcm.S2_OFFSETS)
    for ch in range(16):
        r, c = hpcm.S2_OFFSETS[ch // 2]
        for i in range(3):
            for j in range(4):
                assert sub[1, ch, i, j] == t[1, ch, 2 * i + r, 2 * j + c]
    back = hpcm.unsubgrid(sub, hpcm.S2_OFFSETS)
    assert torch.equal(back, t * (back != 0)) and int((back != 0).sum()) == t.numel() // 4
    y = torch.randn(1, 16, 8, 8)
    s1, s2, same = hpcm.scale_grids(y)
    assert same is y and torch.equal(s2, hpcm.subgrid(y, hpcm.S2_OFFSETS)) and s1.shape == (1, 16, 2, 2)
    for ch in range(16):  # s1 (i, j) is s2 (2 i + r1, 2 j + c1), which is y (2 (2 i + r1) + r2, 2 (2 j + c1) + c2)
        r2, c2 = hpcm.S2_OFFSETS[ch // 2]
        r1, c1 = hpcm.S1_OFFSETS[ch // 4]
        for i in range(2):
            for j in range(2):
                assert s1[0, ch, i, j] == y[0, ch, 2 * (2 * i + r1) + r2, 2 * (2 * j + c1) + c2]


@settings(max_examples=6)
@given(phase=st.integers(0, 3), step=st.integers(0, 10), seed=st.integers(0, 1000))
def test_hpcm_context_uses_only_decoded_latents(phase, step, seed):
    """Perturb every latent coded at `step` or later: the entropy parameters of steps <= `step` must not move,
    and (so that the test can fail) those of the next step must."""
    cfg, params = hpcm_tiny(phase)
    rng = torch.Generator().manual_seed(seed)
    hyper = torch.randn(1, 2 * cfg.M, 8, 8, generator=rng)
    y = torch.randn(1, cfg.M, 8, 8, generator=rng) * 3
    later = sum(hpcm.to_full_res(m, s) for s, m in hpcm.coding_schedule(cfg.M, 8, 8)[step:])

    def run(y):
        grids = (hpcm.subgrid(hpcm.subgrid(y, hpcm.S2_OFFSETS), hpcm.S1_OFFSETS), hpcm.subgrid(y, hpcm.S2_OFFSETS), y)
        seen = []

        def code_step(k, scale, scales, means, mask):
            seen.append(torch.cat([scales, means], 1))
            return hpcm.dequantize(torch.round((grids[scale] - means) * mask), means, mask)
        with torch.no_grad():
            hpcm.hpcm_context(params, cfg, hyper, code_step)
        return seen
    before = run(y)
    after = run(y + later * (5 + torch.randn(y.shape, generator=rng)))
    for k in range(step + 1):
        assert torch.equal(before[k], after[k]), f'step {k} saw a latent of step >= {step}'
    if step < 10:
        assert not torch.equal(before[step + 1], after[step + 1])


def test_hpcm_cross_attention_cell_against_window_loop():
    """Per window, per head: softmax(q k^T / sqrt(d)) v over the real (unpadded) positions, plus conv_out(x)."""
    gen = torch.Generator().manual_seed(0)
    p = hpcm.init_cross_attention_cell(gen, 8)
    x, h_prev = torch.randn(2, 8, 6, 5, generator=gen), torch.randn(2, 8, 6, 5, generator=gen)
    out = hpcm.cross_attention_cell(p, x, h_prev, window=4, heads=2)
    conv1 = lambda q, t: torch.einsum('oc,bchw->bohw', q['weight'][:, :, 0, 0], t) + q['bias'].view(1, -1, 1, 1)
    q, k, v = conv1(p['q'], x), conv1(p['k'], h_prev), conv1(p['v'], h_prev)
    expected = conv1(p['out'], x)
    for b in range(2):
        for top in (0, 4):
            for left in (0, 4):
                rows, cols = slice(top, top + 4), slice(left, left + 4)
                for head in range(2):
                    ch = slice(4 * head, 4 * head + 4)
                    qs, ks, vs = (t[b, ch, rows, cols].reshape(4, -1).T for t in (q, k, v))
                    attn = torch.softmax(qs @ ks.T / 2.0, -1) @ vs
                    n_rows = expected[b, ch, rows, cols].shape[1]
                    expected[b, ch, rows, cols] += attn.T.reshape(4, n_rows, -1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_hpcm_gaussian_likelihood_against_erf_and_sums_to_one():
    scales = torch.tensor([0.05, 0.3, 1.0, 7.5, 40.0])
    x = torch.tensor([0.0, -1.0, 2.0, -5.0, 31.0])
    lik = hpcm.gaussian_likelihood(x, scales)
    for xi, si, li in zip(x.tolist(), scales.tolist(), lik.tolist()):
        s = max(si, 0.11)
        cdf = lambda t: 0.5 * (1 + math.erf(t / (s * math.sqrt(2))))
        assert math.isclose(li, max(cdf(xi + 0.5) - cdf(xi - 0.5), 1e-9), rel_tol=1e-4)
    grid = torch.arange(-400.0, 401.0).view(-1, 1)
    assert torch.allclose(hpcm.gaussian_likelihood(grid, scales.view(1, -1)).sum(0), torch.ones(5), atol=1e-4)
    s = torch.tensor([0.05], requires_grad=True)  # below the bound, the gradient may still push the scale up
    (-hpcm.gaussian_likelihood(torch.tensor([1.0]), s).log()).sum().backward()
    assert s.grad.item() < 0


@given(scales=st.lists(st.floats(0.11, 60.0), min_size=1, max_size=5), n=st.integers(0, 400),
       lanes=st.sampled_from([1, 2, 5, 16]), cuts=st.lists(st.integers(0, 400), max_size=3),
       seed=st.integers(0, 2**16))
def test_rans_roundtrip_and_size_near_information_content(scales, n, lanes, cuts, seed):
    rng = np.random.default_rng(seed)
    tables = hpcm.make_cdf_tables(np.array(scales))
    table = rng.integers(0, len(scales), n)
    values = np.rint(rng.normal(0, np.array(scales)[table] * 1.2)).astype(np.int64)
    values[rng.random(n) < 0.02] = rng.integers(-10**6, 10**6)  # beyond the tails: escapes
    states, words, escapes = hpcm.rans_encode(values, table, tables, lanes)
    dec = hpcm.rans_decoder(states, words, escapes)
    bounds = [0, *sorted(min(c, n) for c in cuts), n]  # decode in calls that cut rows of lanes anywhere
    out = np.concatenate([hpcm.rans_decode(dec, table[a:b], tables) for a, b in zip(bounds, bounds[1:])])
    hpcm.rans_finish(dec)
    assert np.array_equal(out, values)
    freq = np.concatenate([hpcm.gaussian_freqs(s)[0] for s in scales])  # -log2 p from the freq tables directly
    base = np.concatenate([[0], np.cumsum([len(hpcm.gaussian_freqs(s)[0]) for s in scales])])
    tails = np.array([hpcm.gaussian_freqs(s)[1] for s in scales])
    sym = np.clip(values + tails[table], -1, 2 * tails[table] + 1)
    sym = np.where((sym < 0) | (sym > 2 * tails[table]), 2 * tails[table] + 1, sym)
    ideal = -np.log2(freq[base[table] + sym] / 2**16).sum() / 8
    size = 8 * lanes + 4 * len(words)  # each lane's final state: 8 bytes, ~4 of them the encoder's start state
    assert 4 * lanes - 1 <= size - ideal <= 8 * lanes + 4


def test_rans_tables_and_varints():
    for s in (0.11, 1.0, 256.0):
        freqs, tail = hpcm.gaussian_freqs(s)
        assert freqs.sum() == 2**16 and freqs.min() >= 1 and len(freqs) == 2 * tail + 2
        assert abs(tail - math.ceil(s * 6.1094)) <= 1
    values = np.array([0, -1, 1, 2**40, -(2**40), 127, -64])
    assert hpcm.decode_varints(hpcm.encode_varints(values)) == values.tolist()
    with pytest.raises(ValueError, match='truncated'):
        hpcm.decode_varints(hpcm.encode_varints(np.array([2**20]))[:-1])


def test_rans_truncated_or_corrupt_streams_raise():
    tables = hpcm.make_cdf_tables(np.array([3.0]))
    values = np.random.default_rng(0).integers(-6, 7, 300)
    table = np.zeros(300, np.int64)
    states, words, escapes = hpcm.rans_encode(values, table, tables, 2)
    with pytest.raises(ValueError, match='truncated'):
        hpcm.rans_decode(hpcm.rans_decoder(states, words[:-3], escapes), table, tables)
    dec = hpcm.rans_decoder(states ^ np.uint64(12345), words, escapes)
    with pytest.raises(ValueError, match='did not end where the encoder began'):
        hpcm.rans_decode(dec, table, tables)
        hpcm.rans_finish(dec)


def test_hpcm_transform_shapes_and_image_padding():
    cfg, params = hpcm_tiny(0)
    x = torch.rand(1, 3, 64, 128)
    y = hpcm.transform(params['g_a'], cfg, 'g_a', x)
    z = hpcm.transform(params['h_a'], cfg, 'h_a', y)
    assert y.shape == (1, 16, 4, 8) and z.shape == (1, 8, 1, 2)
    assert hpcm.transform(params['h_s'], cfg, 'h_s', z).shape == (1, 32, 4, 8)
    assert hpcm.transform(params['g_s'], cfg, 'g_s', y).shape == (1, 3, 64, 128)
    padded = hpcm.pad_image(torch.rand(1, 3, 70, 64))
    assert padded.shape == (1, 3, 128, 64) and torch.equal(padded[:, :, 70:], padded[:, :, 69:70].expand(-1, -1, 58, -1))
    with pytest.raises(ValueError, match='x: expected a float image tensor'):
        hpcm.hpcm_forward(params, torch.rand(3, 64, 64), cfg)
    for field, bad in (('phase', 4), ('M', 12), ('M', 0), ('N', 0), ('widths', (8, 8)), ('widths', (8, 0, 8)),
                       ('heads', 7), ('windows', (4, 8)), ('rwkv_hidden_rates', (2, 0, 4)), ('fusion_blocks', -1),
                       ('fusion_hidden_rate', 0)):
        with pytest.raises(ValueError, match=f'HPCMConfig.{field}: expected .*, got {re.escape(repr(bad))}'):
            hpcm.HPCMConfig(**{field: bad})
    assert hpcm.HPCMConfig(widths=[96, 192, 384]).widths == (96, 192, 384)  # from a checkpoint's JSON-like dict


@pytest.mark.parametrize('phase', [0, 3])
def test_hpcm_compress_decompress_roundtrip(phase):
    """Decoding reproduces the encoder's reconstruction bit for bit (= hpcm_forward at test time), on a size that
    needs padding; the real size stays near the estimate plus the fixed costs (header, lane states)."""
    cfg, params = hpcm_tiny(phase, seed=phase)
    with torch.no_grad():  # a latent and scales of a trained model's size (a random one codes almost only zeros)
        params['g_a'][-1]['weight'] *= 20
        for q in (params['h_s'][-2], params['prior_s1_s2']['out'], params['prior_s3']['out']):
            q['bias'][:cfg.M] += 4
    x = hpcm.synthetic_image(torch.Generator().manual_seed(1), 72, 100)[None]
    coder = hpcm.make_coder(params, cfg)
    data = hpcm.compress(coder, x)
    decoded = hpcm.decompress(coder, data)
    with torch.no_grad():
        x_hat, likelihoods, bpp = hpcm.hpcm_forward(params, x, cfg)
    assert decoded.shape == x.shape and torch.equal(decoded, x_hat.clamp(0, 1))
    estimated = bpp.item() * 72 * 100 / 8  # bytes
    assert estimated > 400 and abs(len(data) - hpcm.HEADER.size - estimated) < 0.02 * estimated
    bits = -sum(lik.double().log2().sum() for lik in likelihoods.values())  # independent of total_bits
    assert math.isclose(bpp.item(), bits.item() / (72 * 100), rel_tol=1e-6)


def restamp(data, **fields):
    """A stream with header fields replaced and its CRC re-computed, as a forger would."""
    names = ('magic', 'version', 'phase', 'H', 'W', 'fingerprint', 'log2_lanes', 'n_words', 'n_escape', 'crc')
    values = dict(zip(names, hpcm.HEADER.unpack_from(data)))
    values.update(fields)
    head = hpcm.HEADER.pack(*[values[n] for n in names])[:-4]
    body = data[hpcm.HEADER.size:]
    return head + struct.pack('<I', zlib.crc32(head + body)) + body


def test_hpcm_bad_streams_raise_clear_errors():
    cfg, params = hpcm_tiny(0)
    coder = hpcm.make_coder(params, cfg)
    x = torch.rand(1, 3, 60, 64)
    data = hpcm.compress(coder, x)
    assert hpcm.HEADER.unpack_from(data)[3:5] == (60, 64)  # the exact size, not the padded one
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    for bad, message in ((bytes(flipped), 'checksum'), (data[:-7], 'truncated'), (data[:10], 'truncated'),
                         (b'JPEG' + data[4:], 'not an HPCM stream'), (data + b'\0', 'trailing')):
        with pytest.raises(ValueError, match=message):
            hpcm.decompress(coder, bad)
    for i in range(4, hpcm.HEADER.size):  # every header field after the magic: version, shape, lengths, CRC
        flipped = bytearray(data)
        flipped[i] ^= 0x04
        with pytest.raises(ValueError, match='bitstream'):
            hpcm.decompress(coder, bytes(flipped))
    # forged headers with a valid CRC: another size within the same padded size decodes nothing
    for H, W in ((61, 64), (60, 63), (64, 64)):
        with pytest.raises(ValueError, match='did not end where the encoder began'):
            hpcm.decompress(coder, restamp(data, H=H, W=W))
    for H, W in ((0, 64), (60, 0), (hpcm.MAX_SIDE + 1, 64), (8192, 8192)):
        with pytest.raises(ValueError, match=f'declares a {H}x{W} image'):
            hpcm.decompress(coder, restamp(data, H=H, W=W))
    _, other = hpcm_tiny(0, seed=1)
    with pytest.raises(ValueError, match='different model'):
        hpcm.decompress(hpcm.make_coder(other, cfg), data)
    with torch.no_grad():  # one weight of one tensor changed: another model
        params['adaptors'][3]['weight'][5, 7, 0, 0] += 1e-3
    with pytest.raises(ValueError, match='different model'):
        hpcm.decompress(hpcm.make_coder(params, cfg), data)
    cfg1, params1 = hpcm_tiny(1)
    with pytest.raises(ValueError, match='phase 0'):
        hpcm.decompress(hpcm.make_coder(params1, cfg1), data)


def test_hpcm_stream_bound_and_escape_forgery():
    """The size bound: n symbols need n * min_symbol_bits, which the tables guarantee (every symbol has frequency
    >= 1); a stream of a bigger declared size is refused before any decoding. An escaped value changed (CRC
    re-computed) fails at the end of decoding, since the lanes start from a CRC of the escapes."""
    tables = hpcm.make_cdf_tables(np.array([0.11, 3.0]))
    most = max(hpcm.gaussian_freqs(s)[0].max() for s in (0.11, 3.0))
    assert math.isclose(hpcm.min_symbol_bits(tables), -math.log2(most / 2**16) - 2**-15)
    n = 400_000  # the most likely symbol every time: the cheapest possible stream of n symbols
    values, table = np.zeros(n, np.int64), np.zeros(n, np.int64)
    states, words, _ = hpcm.rans_encode(values, table, tables, 16)
    added = np.log2(states.astype(np.float64) / 2**32).sum() + 32 * len(words)  # bits the lanes took on
    assert 0 < n * hpcm.min_symbol_bits(tables) <= added <= 32 * (len(words) + 16)
    cfg, params = hpcm_tiny(0)
    with torch.no_grad():
        for t in params['g_a'][-1].values():
            t *= 1e4  # latents far beyond the tables: escapes
    coder = hpcm.make_coder(params, cfg)
    data = hpcm.compress(coder, torch.rand(1, 3, 64, 64))
    n_escape = hpcm.HEADER.unpack_from(data)[8]
    assert n_escape > 0
    forged = bytearray(data)
    forged[-1] ^= 0x01  # the last escaped value, its last byte (still a complete varint)
    forged = restamp(bytes(forged))
    with pytest.raises(ValueError, match='did not end where the encoder began'):
        hpcm.decompress(coder, forged)


def test_hpcm_compress_checks_its_input():
    cfg, params = hpcm_tiny(0)
    coder = hpcm.make_coder(params, cfg)
    x = torch.rand(1, 3, 64, 64)
    data = hpcm.compress(coder, x)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # converted to float32, coded as that
        assert hpcm.compress(coder, x.to(dtype)) == hpcm.compress(coder, x.to(dtype).float())
    assert hpcm.compress(coder, x.double()) == data
    nan, inf = x.clone(), x.clone()
    nan[0, 1, 2, 3], inf[0, 0, 0, 0] = float('nan'), -float('inf')
    for bad, message in ((nan, 'NaN or infinite'), (inf, 'NaN or infinite'), (x * 255, r'\[0, 1\]'),
                         (x * 2 - 1, r'\[0, 1\]'), ((x * 255).byte(), 'uint8'), (torch.rand(1, 3, 0, 64), '0x64'),
                         (torch.rand(1, 3, 64, 0), '64x0'), (torch.rand(2, 3, 64, 64), r'\(2, 3, 64, 64\)'),
                         (x[0], r'\(3, 64, 64\)'), (x.numpy(), 'ndarray')):
        with pytest.raises(ValueError, match='compress: .*' + message):
            hpcm.compress(coder, bad)


def test_hpcm_fingerprint_covers_every_value_and_name():
    cfg, params = hpcm_tiny(0)
    base = hpcm.model_fingerprint(params)
    assert base == hpcm.model_fingerprint(hpcm_tiny(0)[1]) and base != hpcm.model_fingerprint(hpcm_tiny(0, 1)[1])
    for name, t in hpcm.named_leaves(params):  # every tensor, its last value
        old = t.view(-1)[-1].item()
        with torch.no_grad():
            t.view(-1)[-1] = old + 1
        assert hpcm.model_fingerprint(params) != base, name
        with torch.no_grad():
            t.view(-1)[-1] = old
    assert hpcm.model_fingerprint(params) == base
    names = [n for n, _ in hpcm.named_leaves(params)]
    assert len(names) == len(set(names)) == len(train.tree_leaves(params))


def test_hpcm_param_counts_and_context_net_beside_seed():
    """Full width (M=320): the baseline context_net is a 640->640 1x1 conv, 409,600 weights (+640 biases) x 2, as
    the seed says; the phase-3 RWKVFusionNet is much larger than the seed's '~450,000 x 2' (see README)."""
    gen = torch.Generator().manual_seed(0)
    count = lambda tree: sum(t.numel() for t in train.tree_leaves(tree))
    full = [hpcm.HPCMConfig(phase=phase) for phase in range(4)]
    nets = [count(hpcm.init_context_net(gen, cfg)) for cfg in full]
    assert nets[0] == nets[1] == nets[2] == 640 * 640 + 640
    cells = {(p, s): count(hpcm.init_context_cell(gen, full[p], s)) for p in range(4) for s in range(3)}
    assert cells[0, 0] == cells[0, 2] == cells[1, 0] == 4 * (640 * 640 + 640)  # q, k, v, out
    assert cells[1, 2] == cells[2, 2] == cells[3, 2] != cells[0, 2]
    d, hidden = 640, 4 * 640
    omni = 4 + d * (1 + 9 + 25)  # alpha + depthwise 1x1, 3x3, 5x5
    block = 2 * 2 * d + (omni + 4 * d * d + 2 * d) + (omni + 2 * d * hidden + d * d) + 2 * d  # LNs, mixes, gammas
    assert nets[3] == block + d * d + d  # one RWKVFusionBlock + out_proj: ~5.8M, not the seed's ~450,000
    small = [hpcm.HPCMConfig.small(phase) for phase in range(4)]
    totals = [count(hpcm.init_hpcm(cfg, gen)) for cfg in small]
    for p in range(1, 4):  # phases differ exactly by their cells and context nets
        diff = sum(count(hpcm.init_context_cell(gen, small[p], s)) - count(hpcm.init_context_cell(gen, small[0], s))
                   for s in range(3))
        diff += 2 * (count(hpcm.init_context_net(gen, small[p])) - count(hpcm.init_context_net(gen, small[0])))
        assert totals[p] - totals[0] == diff
    print('context_net per net, phases 0-3:', nets, '(seed: 409,600 and ~450,000)')


def test_hpcm_training_step_and_loss():
    cfg, params = hpcm_tiny(0)
    leaves = train.tree_leaves(params)
    for t in leaves:
        t.requires_grad_(True)
    x = hpcm.random_crops([hpcm.tensor_to_image(hpcm.synthetic_image(torch.Generator().manual_seed(0), 80, 96))], 64,
                          2, torch.Generator().manual_seed(1))
    assert x.shape == (2, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    x_hat, likelihoods, bpp = hpcm.hpcm_forward(params, x, cfg, training=True)
    out = hpcm.rate_distortion_loss(x, x_hat, likelihoods, hpcm.LAMBDAS[3])
    mse = ((x_hat - x) ** 2).mean()
    bits = -(likelihoods['y'].log().sum() + likelihoods['z'].log().sum()) / math.log(2)
    assert torch.allclose(out['loss'], 0.0130 * 255 ** 2 * mse + bits / (2 * 64 * 64))
    assert torch.allclose(out['bpp'], bits / (2 * 64 * 64))
    out['loss'].backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert math.isclose(hpcm.psnr(x, noisy), -10 * math.log10(((noisy - x) ** 2).mean().item()), rel_tol=1e-5)


def test_hpcm_train_cli_trains_resumes_and_evaluates(tmp_path, capsys):
    log_dir = str(tmp_path / 'run')
    common = ['hpcm', '--device', 'cpu', '--phase', '1', '--log_dir', log_dir, '--num_images', '2',
              '--eval_images', '1', '--eval_size', '64', '64', '--batch_size', '2', '--log_every', '1']
    train.main([*common, '--training_iterations', '2', '--eval_every', '2'])
    out = capsys.readouterr().out
    assert 'bpp_real' in out and os.path.exists(os.path.join(log_dir, 'recon_000002', 'generated_0.png'))
    train.main([*common, '--training_iterations', '3', '--eval_every', '0', '--resume', '--lr', '5e-05'])
    out = capsys.readouterr().out
    assert 'resumed' in out and 'step 3/3' in out
    assert 'resumed with --lr 5e-05 (the checkpoint was trained with 0.0001)' in out
    train.main(['hpcm', '--device', 'cpu', '--eval', os.path.join(log_dir, 'ckpt.pt'), '--log_dir', log_dir,
                '--eval_images', '1', '--eval_size', '64', '64'])
    row = [line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith('average')][0]
    assert row.split()[-3] == 'True'  # decoded == the encoder's reconstruction
    with pytest.raises(SystemExit) as exit_:
        train.main(['hpcm', '--device', 'cpu', '--patch_size', '100', '--log_dir', log_dir])
    assert exit_.value.code == 2 and '--patch_size' in capsys.readouterr().err
    os.makedirs(tmp_path / 'photos')
    train.write_png(str(tmp_path / 'photos' / 'big.png'), np.zeros((64, 80, 3), np.uint8))
    train.write_png(str(tmp_path / 'photos' / 'tiny.png'), np.zeros((40, 90, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_:
        train.main(['hpcm', '--device', 'cpu', '--data', str(tmp_path / 'photos'), '--log_dir', str(tmp_path / 'r2')])
    assert exit_.value.code == 2 and 'smaller than --patch_size 64: tiny.png (90x40)' in capsys.readouterr().err


def test_hpcm_cli_compresses_and_decompresses_files(tmp_path, capsys):
    """--compress / --decompress with model.pt (no optimizer state) or ckpt.pt: any size, the decoded PNG equals
    the encoder's reconstruction (computed here from load_for_inference's model), and clear errors, exit 2."""
    log_dir = str(tmp_path / 'run')
    train.main(['hpcm', '--device', 'cpu', '--phase', '0', '--log_dir', log_dir, '--num_images', '2', '--batch_size',
                '1', '--training_iterations', '1', '--eval_every', '0'])
    model = os.path.join(log_dir, 'model.pt')
    assert 'opt' not in torch.load(model, weights_only=False) and os.path.getsize(model) < 0.6 * os.path.getsize(
        os.path.join(log_dir, 'ckpt.pt'))
    img = hpcm.tensor_to_image(hpcm.synthetic_image(torch.Generator().manual_seed(3), 37, 70))
    train.write_png(str(tmp_path / 'in.png'), img)
    for ckpt in (model, os.path.join(log_dir, 'ckpt.pt')):
        stream, out = str(tmp_path / 'x.hpcm'), str(tmp_path / 'out.png')
        train.main(['hpcm', '--device', 'cpu', '--compress', str(tmp_path / 'in.png'), stream, '--ckpt', ckpt])
        train.main(['hpcm', '--device', 'cpu', '--decompress', stream, out, '--ckpt', ckpt])
        params, cfg = train.load_for_inference(ckpt)
        with torch.no_grad(), hpcm.deterministic(torch.device('cpu')):
            x_hat = hpcm.hpcm_forward(params, hpcm.image_to_tensor(img), cfg)[0]
        assert np.array_equal(train.read_image(out), hpcm.tensor_to_image(x_hat))
        assert sorted(os.listdir(tmp_path)) == ['in.png', 'out.png', 'run', 'x.hpcm']  # no temporary files left
    assert 'in.png (70x37) -> ' in capsys.readouterr().out
    (tmp_path / 'bad.hpcm').write_bytes(b'HPCM' + bytes(40))
    (tmp_path / 'other.pt').write_bytes(b'not a checkpoint')
    train.save_checkpoint(str(tmp_path / 'ctm.pt'), {'params': {}, 'step': 0})
    cases = [(['--decompress', str(tmp_path / 'bad.hpcm'), str(tmp_path / 'o.png'), '--ckpt', model], 'bitstream'),
             (['--decompress', str(tmp_path / 'nothing'), str(tmp_path / 'o.png'), '--ckpt', model], 'nothing'),
             (['--compress', str(tmp_path / 'bad.hpcm'), str(tmp_path / 'o.hpcm'), '--ckpt', model], 'bad.hpcm'),
             (['--compress', str(tmp_path / 'in.png'), str(tmp_path / 'o.hpcm'), '--ckpt', str(tmp_path / 'other.pt')],
              'cannot be read'),
             (['--compress', str(tmp_path / 'in.png'), str(tmp_path / 'o.hpcm'), '--ckpt', str(tmp_path / 'ctm.pt')],
              'not a checkpoint of train.py hpcm'),
             (['--compress', str(tmp_path / 'in.png'), str(tmp_path / 'o.hpcm')], '--ckpt')]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            train.main(['hpcm', '--device', 'cpu', *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    assert not os.path.exists(tmp_path / 'o.png') and not os.path.exists(tmp_path / 'o.hpcm')


def test_hpcm_batches_shard_one_global_batch():
    """Ranks take consecutive slices of one global batch of crops, fixed by (seed, step): resumable and sharded."""
    images = [hpcm.tensor_to_image(hpcm.synthetic_image(torch.Generator().manual_seed(k), 80, 96)) for k in range(3)]
    args = argparse.Namespace(seed=2, patch_size=64, batch_size=2)
    whole = train.hpcm_batch(images, argparse.Namespace(seed=2, patch_size=64, batch_size=4), 7)
    shards = [train.hpcm_batch(images, args, 7, rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat(shards), whole)
    assert not torch.equal(whole, train.hpcm_batch(images, argparse.Namespace(seed=2, patch_size=64, batch_size=4), 8))


def test_hpcm_random_crops_are_crops_or_mirrored_crops():
    img = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    crops = hpcm.random_crops([img], 64, 16, torch.Generator().manual_seed(0))
    found = {True: 0, False: 0}
    for crop in crops:
        c = (crop.permute(1, 2, 0) * 255).round().byte().numpy()
        for flipped in (False, True):
            view = c[:, ::-1] if flipped else c
            if any(np.array_equal(img[t:t + 64, s:s + 64], view) for t in range(7) for s in range(27)):
                found[flipped] += 1
    assert found[False] + found[True] == 16 and found[False] > 0 and found[True] > 0
    with pytest.raises(ValueError, match='smaller than the crop size 80'):
        hpcm.random_crops([img], 80, 1, torch.Generator())


def test_hpcm_dist_two_gloo_ranks_train_and_resume_on_one(tmp_path):
    """torchrun, 2 CPU ranks (gloo): rank 0 alone prints and saves; the checkpoint resumes on one process."""
    log_dir = str(tmp_path / 'two')
    tiny = ['hpcm', '--device', 'cpu', '--phase', '0', '--num_images', '2', '--batch_size', '1', '--eval_every', '0',
            '--log_every', '1', '--log_dir', log_dir]
    ran = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          os.path.join(HERE, 'train.py'), *tiny, '--training_iterations', '2'],
                         capture_output=True, text=True, timeout=300, cwd=HERE)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count('step 2/2') == 1 and '2 ranks x batch 1' in ran.stdout
    ran = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), *tiny, '--training_iterations', '3',
                          '--resume'], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert ran.returncode == 0 and 'resumed' in ran.stdout and 'step 3/3' in ran.stdout, ran.stderr[-3000:]


def test_hpcm_train_step_reports_the_mean_over_ranks_so_a_nan_on_one_rank_stops_all(monkeypatch):
    """With 2 ranks the step's metrics are the ranks' mean: another rank's NaN loss reaches this rank at the same step,
    so this rank's check_finite_loss stops it there, as it stops the other (none waits alone in the next all-reduce). The other rank is played
    by all_reduce: it adds NaN, bpp 0.5, mse 0.25 to the metrics and this rank's own values to the gradients."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    args = argparse.Namespace(lmbda=0.01, clip_max_norm=1.0)

    def step(world):
        torch.manual_seed(0)  # the same training noise
        cfg, params = hpcm_tiny()
        params = train.tree_to(params, 'cpu', requires_grad=True)
        opt = torch.optim.Adam(train.tree_leaves(params), lr=1e-4)
        return train.hpcm_train_step(params, opt, x, cfg, args, world)
    alone = step(1)
    other = torch.tensor([math.nan, 0.5, 0.25])
    monkeypatch.setattr(torch.distributed, 'all_reduce',
                        lambda t: t.add_(other) if t.numel() == 3 else t.mul_(2))
    both = step(2)
    assert math.isfinite(alone['loss']) and math.isnan(both['loss'])
    assert math.isclose(both['bpp'], (alone['bpp'] + 0.5) / 2, rel_tol=1e-5)
    with pytest.raises(train.Diverged):
        train.check_finite_loss(1, both['loss'])


def test_hpcm_bench_ms_ssim_against_window_loop():
    """One scale (a 16 x 15 image): the mean over every 11x11 window and channel of the SSIM formula with
    Gaussian weights, computed window by window; and MS-SSIM(x, x) = 1 at 5 scales."""
    import bench
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 15, generator=gen, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    g = [math.exp(-(i - 5) ** 2 / 4.5) for i in range(11)]
    w = torch.tensor([[a * b for b in g] for a in g], dtype=torch.float64)
    w /= w.sum()
    values = []
    for c in range(3):
        for i in range(16 - 10):
            for j in range(15 - 10):
                a, b = x[0, c, i:i + 11, j:j + 11], y[0, c, i:i + 11, j:j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
                values.append((2 * ma * mb + 1e-4) * (2 * cov + 9e-4) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
    assert math.isclose(bench.ms_ssim(x, y), torch.stack(values).mean().item(), rel_tol=1e-9)
    big = torch.rand(1, 3, 180, 176, generator=gen)
    assert math.isclose(bench.ms_ssim(big, big), 1.0, rel_tol=1e-6)
    assert bench.ms_ssim(big, (big + 0.1).clamp(0, 1)) < 0.999


def test_hpcm_bench_bd_rate_and_equal_bpp_interpolation():
    import bench
    anchor = [(0.2, 28.0), (0.4, 31.0), (0.8, 34.0), (1.6, 36.5)]
    assert math.isclose(bench.bd_rate(anchor, [(r * 0.8, p) for r, p in anchor]), -20.0, rel_tol=1e-9)
    assert math.isclose(bench.bd_rate(anchor, [(r * 1.5, p) for r, p in anchor]), 50.0, rel_tol=1e-9)
    assert math.isnan(bench.bd_rate(anchor, [(0.3, 30.0)]))
    curve = [(0.2, 28.0, 0.9), (0.4, 31.0, 0.95)]
    assert np.allclose(bench.at_bpp(curve, 0.3), (29.5, 0.925)) and all(math.isnan(v) for v in bench.at_bpp(curve, 0.5))


def test_hpcm_bench_codec_and_codec_train_rows(tmp_path, monkeypatch):
    """bench.py codec on a generated image and a folder (exact decode in every row, real bpp from the stream;
    Pillow codecs only where Pillow is installed) and codec_train, with hpcm_tiny's widths as the small preset."""
    import bench
    monkeypatch.setattr(hpcm.HPCMConfig, 'small', classmethod(lambda cls, phase: hpcm_tiny(phase)[0]))
    monkeypatch.setattr(bench, 'pillow_codecs', lambda: {})  # Pillow or not, the same test (codec_curve: below)
    for k in range(2):
        train.write_png(str(tmp_path / f'{k}.png'),
                        hpcm.tensor_to_image(hpcm.synthetic_image(torch.Generator().manual_seed(k), 64, 70)))
    args = argparse.Namespace(phases=[0], ckpt=None, size=[64, 64], repeats=1, images=str(tmp_path), device='cpu',
                              preset='small')
    rows = bench.run_codec(args)
    assert [r['image'] for r in rows[:4]] == ['64x64', '0.png', '1.png', 'average'] and all(r['exact'] for r in rows[:4])
    assert rows[0]['bpp'] == 8 * rows[0]['bytes'] / 64 ** 2 and rows[0]['enc_s'] > 0 and rows[0]['dec_s'] > 0
    assert 0 < rows[1]['ms_ssim'] <= 1 and math.isclose(rows[3]['psnr'], (rows[1]['psnr'] + rows[2]['psnr']) / 2)
    assert [r['image'] for r in bench.run_codec(argparse.Namespace(**{**vars(args), 'images': None}))] == ['64x64']
    img = hpcm.tensor_to_image(hpcm.synthetic_image(torch.Generator().manual_seed(0), 40, 48))
    grey = lambda im, q: bytes(q)  # a fake codec: 'quality' bytes of stream, a grey picture out
    monkeypatch.setattr(bench, 'decode_pillow', lambda data: np.full((40, 48, 3), 128, np.uint8))
    curve = bench.codec_curve(grey, img, qualities=[10, 20])
    assert [round(p[0] * 40 * 48 / 8) for p in curve] == [10, 20] and math.isclose(
        curve[0][1], 10 * math.log10(255 ** 2 / ((img.astype(float) - 128) ** 2).mean()))
    rows = bench.run_codec_train(argparse.Namespace(phases=[0], batch_size=1, patch_size=64, steps=1, tf32=[0],
                                                    cudnn_benchmark=[0], channels_last=[0, 1], device='cpu',
                                                    preset='small'))
    assert [r['channels_last'] for r in rows] == [0, 1] and all(r['ms_per_step'] > 0 for r in rows)


def test_hpcm_channels_last_params_compute_the_same_values():
    cfg, params = hpcm_tiny(3)
    nhwc = train.channels_last(params)
    assert all(a.is_contiguous(memory_format=torch.channels_last) for a in train.tree_leaves(nhwc) if a.dim() == 4)
    x = hpcm.synthetic_image(torch.Generator().manual_seed(0), 64, 64)[None]
    with torch.no_grad():
        ref = hpcm.hpcm_forward(params, x, cfg)
        out = hpcm.hpcm_forward(nhwc, x.contiguous(memory_format=torch.channels_last), cfg)
    assert torch.allclose(out[0], ref[0], atol=1e-5) and math.isclose(out[2].item(), ref[2].item(), rel_tol=1e-4)


# ================================================================================================================
# train.py ctm: the CUDA-graph fast path and data-parallel training

import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import plastic  # noqa: E402

SPEED_CFG = dict(iterations=3, d_model=16, d_input=8, heads=2, n_synch_out=4, n_synch_action=4, synapse_depth=3,
                 memory_length=3, memory_hidden_dims=2, backbone_type='resnet18-1', out_dims=20,
                 prediction_reshaper=(4, 5))


def speed_model(device, seed=0, dtype=torch.float32, **over):
    cfg = plastic.CTMConfig(**{**SPEED_CFG, **over})
    params, buffers = plastic.init_ctm(cfg, torch.Generator().manual_seed(seed))
    params, buffers = train.tree_to(params, device), train.tree_to(buffers, device)
    for tree in (params, buffers):
        for t in train.tree_leaves(tree):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return cfg, params, buffers, [t.requires_grad_(True) for t in train.tree_leaves(params)]


def speed_loss(predictions, certainties, y):
    return plastic.maze_loss(predictions.reshape(len(y), 4, 5, -1), certainties, y)[:2]


def speed_batches(n, device, batch=3, dtype=torch.float32):
    return [(x.to(device, dtype), y.to(device))
            for x, y, _ in (plastic.maze_batch(np.random.default_rng(i), batch, 7, 4) for i in range(n))]


@given(seed=st.integers(0, 3), clip=st.booleans(), decay=st.floats(-3, 20))
@settings(max_examples=4)
def test_speed_train_step_equals_the_spelled_out_step(seed, clip, decay):
    """ctm_train_step (what --cuda_graph captures, and what the eager path runs) against the same step spelled out
    here: buffers replaced rather than copied, accuracy by a loop over examples, torch's AdamW."""
    batches = speed_batches(2, 'cpu')
    runs = []
    for fast in (True, False):
        cfg, params, buffers, leaves = speed_model('cpu', seed)
        with torch.no_grad():
            params['decay_params_action'].fill_(decay)
        opt = torch.optim.AdamW(leaves, lr=1e-2, eps=1e-8)
        metrics = []
        for x, y in batches:
            if fast:
                metrics.append(train.ctm_train_step(params, buffers, opt, x, y, cfg, speed_loss,
                                                    gradient_clipping=0.5 if clip else -1).tolist())
                continue
            kv, new = plastic.ctm_features(params, buffers, x, cfg, train=True)
            predictions, certainties, _ = plastic.ctm_think(params, buffers, kv, cfg, train=True)
            loss, chosen = speed_loss(predictions, certainties, y)
            opt.zero_grad()
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(leaves, 0.5)
            opt.step()
            with torch.no_grad():
                params['decay_params_action'].clamp_(0, 15)
                params['decay_params_out'].clamp_(0, 15)
            buffers = new
            moves = [predictions[b, :, chosen[b]].reshape(4, 5).argmax(-1) for b in range(len(y))]
            metrics.append([loss.item(), np.mean([(m == t).float().mean().item() for m, t in zip(moves, y)])])
        runs.append((metrics, train.flatten(params), train.flatten(buffers)))
    (m_fast, p_fast, b_fast), (m_ref, p_ref, b_ref) = runs
    assert np.allclose(m_fast, m_ref, rtol=1e-5, atol=1e-6)
    assert 0 <= p_fast['decay_params_action'].min() and p_fast['decay_params_action'].max() <= 15
    for fast, ref in ((p_fast, p_ref), (b_fast, b_ref)):
        assert fast.keys() == ref.keys()
        assert all(torch.allclose(fast[k], ref[k], rtol=1e-5, atol=1e-6) for k in fast), 'params/buffers differ'


@given(hyper=st.sampled_from([{}, dict(hyper_layers='bottleneck', use_hyper_nlm=True), dict(hyper_layers='all')]),
       deep=st.booleans(), norm=st.booleans(), select=st.sampled_from(['first-last', 'random', 'random-pairing']),
       depth=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=8)
def test_speed_fused_tick_equals_the_paper_ticks_in_values_and_grads(hyper, deep, norm, select, depth, seed):
    """ctm_think_fast (one accumulator for both synchronisations, 1/sqrt(beta) for all ticks at once, outputs after
    the loop, neuron-major trace with folded NLM weights) against ctm_think, float64: outputs and every gradient."""
    if depth == 1 and hyper.get('hyper_layers') == 'bottleneck':
        hyper = {}
    cfg = small_ctm_config(neuron_select_type=select, deep_nlms=deep, do_layernorm_nlm=norm, synapse_depth=depth,
                           n_synch_action=6, **hyper)
    gen = torch.Generator().manual_seed(seed)
    params, buffers = plastic.init_ctm(cfg, gen)
    params['decay_params_action'] = torch.rand(params['decay_params_action'].shape, generator=gen) * 4 - 1
    params['decay_params_out'] = torch.rand(params['decay_params_out'].shape, generator=gen) * 20
    for layer in params['nlm'].values():  # a temperature and a bias that matter
        layer['T'], layer['b1'] = layer['T'] + 0.5, torch.rand(layer['b1'].shape, generator=gen)
    kv = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    runs = []
    for think in (plastic.ctm_think, plastic.ctm_think_fast):
        tree = train.tree_to(params, 'cpu', requires_grad=True)
        for t in train.tree_leaves(tree):
            t.data = t.data.double()
        outputs = think(tree, buffers, kv, cfg)
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                   for o in outputs]
        sum((w * o).sum() for w, o in zip(weights, outputs)).backward()
        runs.append((outputs, {k: v.grad for k, v in train.flatten(tree).items() if v.grad is not None}))
    (paper, paper_grads), (fast, fast_grads) = runs
    for a, b in zip(paper, fast):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert paper_grads.keys() == fast_grads.keys() and len(paper_grads) > 10
    for k in paper_grads:
        torch.testing.assert_close(fast_grads[k], paper_grads[k], rtol=1e-9, atol=1e-11, msg=k)


def test_speed_fused_train_step_equals_the_paper_step(monkeypatch):
    """ctm_train_step with tick='fused' against tick='paper', two steps in float64 with AdamW's eps at 1e-3 (which
    bounds how far it turns a rounding difference in a near-zero gradient into a step, as the GPU test explains)."""
    batches = speed_batches(2, 'cpu', dtype=torch.float64)
    calls = []
    fast = plastic.ctm_think_fast
    monkeypatch.setattr(plastic, 'ctm_think_fast', lambda *a, **k: calls.append(k) or fast(*a, **k))
    runs = []
    for tick in ('paper', 'fused'):
        cfg, params, buffers, leaves = speed_model('cpu', dtype=torch.float64, hyper_layers='bottleneck')
        opt = torch.optim.AdamW(leaves, lr=1e-2, eps=1e-3)
        metrics = [train.ctm_train_step(params, buffers, opt, x, y, cfg, speed_loss, tick=tick).tolist()
                   for x, y in batches]
        runs.append((metrics, train.flatten(params), train.flatten(buffers)))
    assert len(calls) == 2 and calls[0]['compile_backend'] is None  # the fused steps ran the fused ticks
    assert np.allclose(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    for paper, fused in ((runs[0][1], runs[1][1]), (runs[0][2], runs[1][2])):
        assert all(torch.allclose(paper[k], fused[k], rtol=1e-9, atol=1e-11) for k in paper)


@given(T=st.integers(1, 4), seed=st.integers(0, 2**16))
@settings(max_examples=5)
def test_speed_views_per_tick_read_the_leaves_and_sum_their_gradients(T, seed):
    """Tick t's tree holds views equal to the leaves (tensors without grad and non-tensors as they are), and the
    leaves' gradients are the sums over ticks, as when every tick reads the leaf itself."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, 3, generator=gen, requires_grad=True), torch.randn(4, generator=gen, requires_grad=True)
    fixed = torch.arange(3)
    trees = plastic.views_per_tick({'a': a, 'rest': [(b, fixed), None, 'x']}, T)
    assert len(trees) == T
    weights = torch.randn(T, 2, 3, generator=gen), torch.randn(T, 4, generator=gen)
    for t, tree in enumerate(trees):
        assert torch.equal(tree['a'], a) and torch.equal(tree['rest'][0][0], b)
        assert tree['rest'][0][1] is fixed and tree['rest'][1:] == [None, 'x']
        ((tree['a'] * weights[0][t]).sum() + (tree['rest'][0][0] * weights[1][t]).sum()).backward(retain_graph=True)
    torch.testing.assert_close(a.grad, weights[0].sum(0))
    torch.testing.assert_close(b.grad, weights[1].sum(0))


@given(kind=st.sampled_from(['linear', 'affine', 'neurons', 'keys']), T=st.integers(1, 4), seed=st.integers(0, 2**16))
@settings(max_examples=8)
def test_speed_tick_shared_gradients_equal_the_sum_over_ticks(kind, T, seed):
    """TickShared: ticks that apply the weight detached and add biases[t] give the weight and bias the gradients of
    ticks that apply them directly (autograd's sum over ticks), float64; each kind as ctm_think_fast uses it."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    prepare = (lambda x: x - 1) if kind == 'affine' else None  # e.g. a LayerNorm's normalisation
    eq, x_shape, w, b, apply = {
        'linear': ('tbi,oi->tbo', (3, 4), rand(5, 4), rand(5), lambda x, w, b: torch.addmm(b, x, w.T)),
        'affine': ('tbd,d->tbd', (3, 4), rand(4), rand(4), lambda x, w, b: torch.addcmul(b, x, w)),
        'neurons': ('tdbi,dio->tdbo', (2, 3, 4), rand(2, 4, 5), rand(2, 1, 5),
                    lambda x, w, b: torch.baddbmm(b, x, w)),
        'keys': ('tnqe,nse->tnqs', (2, 1, 4), rand(2, 6, 4), None,
                 lambda x, w, b=None: x @ w.transpose(1, 2) if b is None else torch.baddbmm(b, x, w.transpose(1, 2)))}[kind]
    xs = [rand(*x_shape) for _ in range(T)]
    out_grads = [rand(*apply(x, w, b).shape) for x in xs]
    leaves = [t.clone().requires_grad_() for t in (w, b) if t is not None]
    sum((apply(x, *leaves) * g).sum() for x, g in zip(xs, out_grads)).backward()
    expected = [t.grad for t in leaves]
    leaves = [t.clone().requires_grad_() for t in (w, b) if t is not None]
    taps = collections.defaultdict(list)
    ticks = plastic.shared_per_tick(dict(zip(('weight', 'bias'), leaves)), 'op', eq,
                                    (T, *apply(xs[0], w, b).shape), taps, prepare)
    total = 0
    for x, g, q in zip(xs, out_grads, ticks):
        assert not q['weight'].requires_grad
        taps['op'].append(x + 1 if prepare else x)
        total = total + (apply(x, q['weight'], q['bias']) * g).sum()
    total.backward()
    for got, want in zip([t.grad for t in leaves], expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_speed_synapses_and_hypernets_per_tick_apply_the_unet_and_tap_every_shared_op():
    """A tick's trees from synapses_per_tick and hypernets_per_tick, through synapse_unet_stacked with the taps and
    layer_norm_tapped, give the paper HyperSynapseUNET's output, and tap the input of every TickShared op (the names
    the *_per_tick functions gave them)."""
    gen = torch.Generator().manual_seed(0)
    p = plastic.init_synapse_unet(gen, 6, 8, 3, 'bottleneck', 2)
    for q in p['skip_ln'] + [p['first']['ln']]:
        q['weight'] = torch.rand(q['weight'].shape, generator=gen) + 0.5
        q['bias'] = torch.randn(q['bias'].shape, generator=gen)
    x = torch.randn(3, 6, generator=gen)
    taps = collections.defaultdict(list)
    tick = plastic.synapses_per_tick(p, 2, 3, taps)[1]
    hypernets = plastic.hypernets_per_tick(plastic.stack_hypernets(p), 2, 3, taps)[1]
    assert not hypernets['lin']['weight'].requires_grad and not hypernets['heads']['weight'].requires_grad
    tapped = {}
    out = plastic.synapse_unet_stacked(tick, hypernets, x,
                                       tap=lambda name, h: tapped.__setitem__(f'{name}.lin', h),
                                       norm=functools.partial(plastic.layer_norm_tapped, tapped.__setitem__))
    torch.testing.assert_close(out, plastic.synapse_unet(p, x))
    assert set(tapped) == set(taps) and len(taps) == 3 * 2 + 2 * 2 + 2 + 1  # Linears, norms, skips, hyper heads
    assert torch.equal(tapped['first.lin'], x)


def test_speed_folded_query_is_q_proj_then_the_scaled_in_projection():
    cfg = small_ctm_config()
    params, _ = plastic.init_ctm(cfg, torch.Generator().manual_seed(0))
    params['attention']['in_proj']['bias'] = torch.randn(3 * cfg.d_input)
    sync = torch.randn(5, params['q_proj']['weight'].shape[1])
    d = cfg.d_input
    q = sync @ params['q_proj']['weight'].T + params['q_proj']['bias']
    expected = (q @ params['attention']['in_proj']['weight'][:d].T + params['attention']['in_proj']['bias'][:d]) \
        / math.sqrt(d / cfg.heads)
    folded = plastic.attention_query_folded(params, cfg.heads)
    torch.testing.assert_close(sync @ folded['weight'].T + folded['bias'], expected)


def test_speed_compiled_tick_equals_the_paper_ticks():
    """The fused tick through torch.compile (backend aot_eager on a CPU: the traced graph, not inductor's code) gives
    ctm_think's outputs and gradients, one graph for all ticks (a recompiled tick would mean a guard on the tick)."""
    import torch._dynamo
    torch._dynamo.reset()
    cfg = small_ctm_config(iterations=3)
    params, buffers = plastic.init_ctm(cfg, torch.Generator().manual_seed(0))
    kv = torch.randn(2, 5, 16)
    runs = []
    for think in (plastic.ctm_think, functools.partial(plastic.ctm_think_fast, compile_backend='aot_eager')):
        leaves = train.tree_to(params, 'cpu', requires_grad=True)
        outputs = think(leaves, buffers, kv, cfg)
        outputs[0].square().sum().backward()
        runs.append((outputs, [t.grad for t in train.tree_leaves(leaves)]))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


def test_speed_optimizer_mode_and_set_lr_switch_between_plain_and_capturable():
    w = torch.ones(3, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=0.5)
    w.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    saved['param_groups'][0].update(lr=torch.tensor(0.25), capturable=True)  # as a --cuda_graph run saves it
    saved['state'][0]['step'] = saved['state'][0]['step'].clone()
    opt.load_state_dict(saved)
    train.optimizer_mode(opt, False, torch.device('cpu'))
    group = opt.param_groups[0]
    assert group['lr'] == 0.25 and isinstance(group['lr'], float) and group['capturable'] is False
    assert opt.state[w]['step'].device.type == 'cpu' and opt.state[w]['step'].item() == 1
    train.set_lr(opt, 0.125)
    assert group['lr'] == 0.125
    train.optimizer_mode(opt, True, torch.device('cpu'))
    lr = group['lr']
    train.set_lr(opt, 0.0625)
    assert group['capturable'] and group['lr'] is lr and lr.item() == 0.0625  # filled in place: a graph sees it
    with pytest.raises(SystemExit, match='--cuda_graph: needs a CUDA device'):
        train.main(['ctm', '--cuda_graph', '--device', 'cpu'])
    with pytest.raises(SystemExit, match='--cuda_graph and --eager: expected one of them'):
        train.main(['ctm', '--cuda_graph', '--eager'])


@pytest.mark.parametrize('device, flags, fast, workers, tick', [
    ('cpu', [], False, 0, 'paper'), ('cuda', [], True, min(4, os.cpu_count() - 1), 'fused'),
    ('cuda', ['--eager'], False, None, 'paper'), ('cuda', ['--num_workers_train', '2'], True, 2, 'fused'),
    ('cpu', ['--num_workers_train', '3'], False, 3, 'paper'), ('cuda', ['--tick', 'paper'], True, None, 'paper'),
    ('cpu', ['--tick', 'fused'], False, None, 'fused')])
def test_speed_cuda_defaults_to_the_captured_path_with_fused_ticks_and_maze_workers(device, flags, fast, workers,
                                                                                    tick):
    args = train.resolve_ctm_args(train.build_parser().parse_args(['ctm', *flags]))
    args = train.resolve_ctm_device(args, torch.device(device))
    assert args.cuda_graph == fast and args.tick == tick
    assert workers is None or args.num_workers_train == workers


def test_speed_batches_made_ahead_by_workers_equal_the_direct_ones():
    make = functools.partial(train.ctm_maze_batch, 5, n=2, size=7, route_length=4)
    with train.batches_ahead(make, 1, 4) as batch:
        ahead = [batch(step) for step in range(4)]
    for step, (x, y) in enumerate(ahead):
        assert np.array_equal(x, make(step)[0]) and np.array_equal(y, make(step)[1])


@needs_cuda[0]
@needs_cuda[1]
def test_ctm_cuda_graph_run_resumes_with_a_new_lr(tmp_path):
    """A CUDA-graph run (capturable AdamW, the learning rate a GPU tensor) saves, then resumes with another --lr:
    it says so, runs to step 5 and saves finite params."""
    log_dir = str(tmp_path / 'run')
    tiny = [*CTM_TINY, '--device', 'cuda', '--log_dir', log_dir]  # the last --device wins
    first = run_train('ctm', *tiny, '--training_iterations', '3')
    assert first.returncode == 0 and 'CUDA graph' in first.stdout, first.stderr[-3000:]
    again = run_train('ctm', *tiny, '--training_iterations', '5', '--resume', '--lr', '5e-05')
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'resumed with --lr 5e-05' in again.stdout and 'step 5/5' in again.stdout
    saved = torch.load(os.path.join(log_dir, 'ckpt.pt'), weights_only=False)
    assert saved['step'] == 5 and all(torch.isfinite(t).all() for t in train.tree_leaves(saved['params']))


@needs_cuda[0]
@needs_cuda[1]
@pytest.mark.parametrize('hyper, tick', [({}, 'paper'), (dict(hyper_layers='bottleneck', use_hyper_nlm=True), 'paper'),
                                         (dict(hyper_layers='bottleneck'), 'fused'), ({}, 'compiled'),
                                         (dict(hyper_layers='bottleneck'), 'compiled')])
def test_speed_cuda_graph_step_equals_eager(hyper, tick):
    """3 eager warm-up steps, the capture, 3 replays: the same losses, accuracies, params and batch-norm statistics
    as the eager path, with a learning rate that changes every step (the graph must read it, not bake it in).

    CUDA's atomic-add gradient sums make even two eager runs differ by rounding, and AdamW (update g/(sqrt(v)+eps))
    turns such a difference in a near-zero gradient into up to a whole lr-sized step: 0.008 seen at lr 1e-2 in
    float32, 5e-5 in float64, both with eps 1e-8. So: float64, eps 1e-3 (which bounds d update/d g by lr/eps), and
    the distance between the runs measured against how far training moved them. A graph that baked in the first
    learning rate, skipped a step or lost the batch-norm update would be ~0.3 apart on that scale. tick 'fused' or
    'compiled': the captured graph replays the fused tick (compiled: torch.compile'd in the warm-up steps), eager the
    paper one."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    device = torch.device('cuda')
    batches = speed_batches(7, device, dtype=torch.float64)
    runs = []
    try:
        for cuda_graph in (False, True):
            cfg, params, buffers, leaves = speed_model(device, dtype=torch.float64, **hyper)
            opt = torch.optim.AdamW(leaves, lr=1e-2, eps=1e-3)
            train.optimizer_mode(opt, cuda_graph, device)
            step = train.ctm_stepper(params, buffers, opt, cfg, speed_loss,
                                     argparse.Namespace(use_amp=False, gradient_clipping=1.0, cuda_graph=cuda_graph,
                                                        tick=tick if cuda_graph else 'paper'))
            metrics = []
            for i, (x, y) in enumerate(batches):
                train.set_lr(opt, 1e-2 / (i + 1))
                metrics.append(step(x, y).tolist())
            runs.append((metrics, train.flatten(params), train.flatten(buffers)))
    finally:
        torch.set_float32_matmul_precision(precision)
    (m_eager, p_eager, b_eager), (m_graph, p_graph, b_graph) = runs
    assert np.allclose(m_eager, m_graph, rtol=1e-6, atol=1e-7), (m_eager, m_graph)
    _, p_start, b_start, _ = speed_model(device, dtype=torch.float64, **hyper)
    for eager, graph, start in ((p_eager, p_graph, p_start), (b_eager, b_graph, b_start)):
        start = train.flatten(start)
        moved = torch.cat([(eager[k] - start[k]).flatten() for k in start if start[k].is_floating_point()]).norm()
        apart = torch.cat([(graph[k] - eager[k]).flatten() for k in start if start[k].is_floating_point()]).norm()
        assert moved > 1e-2 and apart < 1e-3 * moved, (apart.item(), moved.item())


def test_dist_maze_batches_shard_one_global_batch():
    whole = train.ctm_maze_batch(3, 5, 4, 7, 4)
    shards = [train.ctm_maze_batch(3, 5, 2, 7, 4, first) for first in (0, 2)]
    for k in range(2):
        assert np.array_equal(whole[k], np.concatenate([s[k] for s in shards]))
    maze = plastic.maze_batch(np.random.default_rng([3, 0, 5, 2]), 1, 7, 4)  # maze 2 of step 5, by hand
    assert np.array_equal(whole[0][2:3], maze[0].numpy()) and np.array_equal(whole[1][2:3], maze[1].numpy())
    assert not np.array_equal(whole[0], train.ctm_maze_batch(3, 6, 4, 7, 4)[0])


DIST_TINY = ['--d_model', '16', '--d_input', '8', '--heads', '2', '--iterations', '2', '--synapse_depth', '2',
             '--memory_length', '3', '--memory_hidden_dims', '2', '--n_synch_out', '4', '--n_synch_action', '4',
             '--backbone_type', 'none', '--maze_size', '7', '--maze_route_length', '4', '--n_test', '4',
             '--n_pngs', '0', '--track_every', '0', '--log_every', '1', '--device', 'cpu', '--lr', '1e-2',
             '--warmup_steps', '1', '--no-use_scheduler']


def test_dist_two_gloo_ranks_equal_one_process_on_the_union(tmp_path, capsys):
    """torchrun, 2 CPU ranks (gloo) at batch 2 = one process at batch 4 on the same mazes: same logged losses, same
    params; then each run resumes on ONE process for a third step, the two-rank checkpoint included. No batch norm
    (backbone 'none'): per-rank batch statistics are not those of the union, as with DDP without SyncBatchNorm."""
    two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
    ran = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          os.path.join(HERE, 'train.py'), 'ctm', *DIST_TINY, '--batch_size', '2',
                          '--training_iterations', '2', '--log_dir', two],
                         capture_output=True, text=True, timeout=300, cwd=HERE)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count('step 2/2') == 1 and '2 ranks x batch 2' in ran.stdout  # rank 0 alone prints
    train.main(['ctm', *DIST_TINY, '--batch_size', '4', '--training_iterations', '2', '--log_dir', one])
    logged = [[json.loads(line)['loss'] for line in open(os.path.join(d, 'metrics.jsonl'))] for d in (two, one)]
    assert len(logged[0]) == 2 and np.allclose(logged[0], logged[1], rtol=1e-5), logged
    for k in range(2):
        saved = [train.flatten(torch.load(os.path.join(d, 'ckpt.pt'), weights_only=False)['params'])
                 for d in (two, one)]
        assert saved[0].keys() == saved[1].keys()
        worst = max((saved[0][key] - saved[1][key]).abs().max().item() for key in saved[0])
        assert worst < 1e-5, worst
        if k == 0:
            for d in (two, one):
                train.main(['ctm', *DIST_TINY, '--batch_size', '4', '--training_iterations', '3', '--log_dir', d,
                            '--resume'])
    assert capsys.readouterr().out.count('resumed') == 2


@needs_cupy[0]
@needs_cupy[1]
def test_speed_bench_wkv_rows():
    """bench.py wkv: the codec rows, then the long rows, a row per (shape, path); dense only up to dense_max_T, the
    scan only up to scan_max_elems; every timing present."""
    import bench
    paths = ('auto', 'naive', 'split', 'cuda', 'scan', 'dense', 'empty')
    args = argparse.Namespace(small='1x8x5', sizes='2x8', lengths='16,300', paths=','.join(paths),
                              repeats=3, dense_max_T=64, scan_max_elems=2 * 300 * 8 - 1, vrwkv=None)
    rows = bench.run_wkv(args)
    long300 = [p for p in paths if p not in ('scan', 'dense')]
    assert [(r['rows'], r['T'], r['path']) for r in rows] == (
        [('codec', 5, p) for p in paths] + [('long', 16, p) for p in paths] + [('long', 300, p) for p in long300])
    assert all(0 < r['fwd_ms'] < r['wall_ms'] and r['gpu_ms'] > 0 for r in rows)


def test_speed_bench_ctm_rows_and_first_loss():
    """bench.py ctm on a tiny CPU model: one row per (batch, path, config), the first step's loss equal to the
    loss of train.py's model at init on the same batch, a refused path reported in its row, not raised."""
    import bench
    tiny = ('--d_model 16 --d_input 8 --heads 2 --iterations 2 --synapse_depth 3 --memory_length 3 '
            '--memory_hidden_dims 2 --n_synch_out 4 --n_synch_action 4 --backbone_type conv --maze_size 7 '
            '--maze_route_length 4')
    args = argparse.Namespace(preset='mazes-small', batch_sizes=[2], paths=['eager', 'cuda_graph'],
                              configs=['plain', 'bottleneck'], steps=1, ctm_flags=tiny, device='cpu')
    rows = bench.run_ctm(args)
    assert [(r['path'], r['config']) for r in rows] == [('eager', 'plain'), ('eager', 'bottleneck'),
                                                         ('cuda_graph', 'plain'), ('cuda_graph', 'bottleneck')]
    assert all(r['ms_per_step'] > 0 and r['error'] == '' for r in rows[:2])
    assert math.isclose(rows[1]['hyper_overhead_pct'], 100 * (rows[1]['ms_per_step'] / rows[0]['ms_per_step'] - 1))
    assert all(r['error'] for r in rows[2:])  # no CUDA here
    targs = train.resolve_ctm_args(train.build_parser().parse_args(['ctm', '--preset', 'mazes-small',
                                                                     '--batch_size', '2', *tiny.split()]))
    cfg = train.ctm_config(targs, dict(out_dims=20, prediction_reshaper=(4, 5), in_channels=3))
    params, buffers = plastic.init_ctm(cfg, train.make_generator(0))
    x, y = (torch.as_tensor(t) for t in train.ctm_maze_batch(0, 0, 2, 7, 4))
    predictions, certainties, _ = plastic.ctm_forward(params, buffers, x, cfg, train=True)
    assert math.isclose(rows[0]['loss_first'], speed_loss(predictions, certainties, y)[0].item(), rel_tol=1e-5)


# ================================================================================================================
# reliability: hostile files, damaged checkpoints, bad flags, divergence (train.py, plastic.load_cifar10)

import plastic  # noqa: E402


class RunsCode:
    """A pickle payload that creates a folder when unpickled: what a crafted file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_reliab_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    marker, path = tmp_path / 'ran', str(tmp_path / 'ckpt.pt')
    torch.save({'params': {}, 'step': 1, 'args': RunsCode(marker)}, path)
    with pytest.raises(train.BadFile, match=r'ckpt.pt: refused.*asks for posix.mkdir'):
        train.load_checkpoint(path, {})
    with pytest.raises(SystemExit) as e:
        train.main(['hpcm', '--device', 'cpu', '--eval', path, '--log_dir', str(tmp_path / 'eval')])
    assert e.value.code == 2 and 'ckpt.pt: refused' in capsys.readouterr().err
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file does what it says to an unrestricted loader
    assert marker.exists()


def test_reliab_crafted_cifar_batch_is_refused_and_runs_nothing(tmp_path):
    import pickle
    marker = tmp_path / 'ran'
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(tmp_path / name, 'wb') as f:
            pickle.dump({b'data': RunsCode(marker), b'labels': [3]}, f)
    with pytest.raises(ValueError, match=r'data_batch_1: not a CIFAR-10 python batch.*refused global posix.mkdir'):
        plastic.load_cifar10(str(tmp_path))
    assert not marker.exists()
    with open(tmp_path / 'data_batch_1', 'rb') as f:
        pickle.load(f)
    assert marker.exists()


def test_reliab_checkpoints_hold_only_plain_values(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    train.save_checkpoint(path, {'params': {'w': torch.ones(2)}, 'step': np.int64(3),
                                 'args': {'size': np.float32(0.5), 'shape': (2, 3), 'table': np.arange(3)}})
    saved = torch.load(path, weights_only=True)
    assert type(saved['step']) is int and saved['step'] == 3 and saved['args']['size'] == 0.5
    assert saved['args']['shape'] == (2, 3) and torch.equal(saved['args']['table'], torch.arange(3))
    with pytest.raises(TypeError, match=r'payload.args.ns is a Namespace'):
        train.save_checkpoint(path, {'params': {}, 'step': 4, 'args': {'ns': argparse.Namespace()}})
    assert torch.load(path, weights_only=True)['step'] == 3


COMMON_FLAGS = [('--seed', '-1', '0'), ('--device', 'gpu', 'cpu'), ('--training_iterations', '0', '1'),
                ('--training_iterations', '-5', '1'), ('--log_every', '0', '1'), ('--save_every', '0', '1')]
LASH_MODEL_FLAGS = [('--data', 'MISSING', 'FILE'), ('--seq_len', '0', '1'), ('--batch_size', '0', '1'),
                    ('--dim', '0', '1'), ('--num_heads', '0', '1'), ('--ffn_dim', '-1', '0'), ('--lr', '-1', '1e-3'),
                    ('--lr', 'nan', '2'), ('--weight_decay', '-1', '0'), ('--max_epochs', '0', '1')]
BOUNDED_FLAGS = {  # subcommand -> (flag, a value it must refuse, a value it must take)
    'ctm': COMMON_FLAGS + [
        ('--task', 'cifar', 'images'), ('--preset', 'huge', 'mazes-small'), ('--d_model', '0', '1'),
        ('--d_input', '0', '1'), ('--heads', '0', '1'), ('--iterations', '0', '1'), ('--synapse_depth', '0', '1'),
        ('--memory_length', '0', '1'), ('--memory_hidden_dims', '0', '1'), ('--n_synch_out', '0', '1'),
        ('--n_synch_action', '0', '1'), ('--n_random_pairing_self', '-1', '0'), ('--dropout', '1.5', '1'),
        ('--dropout_nlm', '-0.1', '0'), ('--neuron_select_type', 'all', 'random'),
        ('--positional_embedding_type', 'x', 'none'), ('--hyper_layers', 'some', 'all'), ('--hyper_rank', '0', '1'),
        ('--hyper_nlm_rank', '0', '1'), ('--lr', 'nan', '1'), ('--lr', '-1', '1'), ('--batch_size', '0', '1'),
        ('--batch_size', '-1', '1'), ('--batch_size_test', '0', '1'), ('--warmup_steps', '-1', '0'),
        ('--weight_decay', '-1', '0'), ('--gradient_clipping', 'inf', '-1'), ('--num_workers_train', '-1', '0'),
        ('--track_every', '-1', '0'), ('--n_test', '0', '1'), ('--dataset', 'mazes-tiny', 'mazes-large'),
        ('--maze_size', '8', '9'), ('--maze_size', '3', '5'), ('--maze_route_length', '0', '1'),
        ('--cirriculum_lookahead', '0', '1'), ('--n_pngs', '-1', '0'), ('--parity_sequence_length', '0', '1'),
        ('--data_root', 'MISSING', 'DIR'), ('--image_size', '0', '1'), ('--ckpt', 'MISSING', 'FILE'),
        ('--visualize_every', '-1', '0'), ('--tick', 'fast', 'fused')],
    'lash': COMMON_FLAGS + LASH_MODEL_FLAGS + [
        ('--num_layers', '0', '1'), ('--routing_threshold', '1.5', '1'), ('--exit_layer', '0', '1'),
        ('--patience', '0', '1'), ('--ckpt', 'MISSING', 'FILE'), ('--max_new_tokens', '0', '1'),
        ('--temperature', '-1', '0')],
    'ashem': COMMON_FLAGS + LASH_MODEL_FLAGS + [
        ('--phase1_layers', '0', '1'), ('--phase2_layers', '0', '1'), ('--hard_example_ratio', '0', '1'),
        ('--hard_example_ratio', '1.01', '0.01'), ('--phase1_patience', '0', '1'), ('--phase2_patience', '0', '1'),
        ('--phase2_lr_scale', '0', '0.1')],
    'hpcm': COMMON_FLAGS + [
        ('--phase', '4', '0'), ('--preset', 'tiny', 'small'), ('--data', 'MISSING', 'DIR'),
        ('--eval_data', 'MISSING', 'DIR'), ('--eval', 'MISSING', 'FILE'), ('--ckpt', 'MISSING', 'FILE'),
        ('--quality', '7', '6'),
        ('--lmbda', '-1', '0.01'), ('--lr', 'nan', '1e-4'), ('--lr', '1e31', '1e30'), ('--batch_size', '0', '1'),
        ('--patch_size', '0', '64'),
        ('--clip_max_norm', 'nan', '0'), ('--num_images', '0', '1'), ('--eval_images', '0', '1'),
        ('--eval_size', '0 64', '64 64'), ('--eval_every', '-1', '0')],
}


def test_reliab_every_bounded_flag_refuses_out_of_bound_values_in_one_line(tmp_path, capsys):
    (tmp_path / 'file.txt').write_text('x')
    where = {'MISSING': str(tmp_path / 'missing'), 'DIR': str(tmp_path), 'FILE': str(tmp_path / 'file.txt')}
    parser = train.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for sub, rows in BOUNDED_FLAGS.items():
        dest = {a.option_strings[0]: a.dest for a in subparsers[sub]._actions if a.type is not None or a.choices}
        assert set(dest) == {flag for flag, _, _ in rows}, f'{sub}: flags with a bound and no row in the table'
        for flag, bad, good in rows:
            with pytest.raises(SystemExit) as e:
                parser.parse_args([sub, flag, *where.get(bad, bad).split()])
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.count('\n') == 1 and f'argument {flag}' in err, (sub, flag, bad, err)
            value = getattr(parser.parse_args([sub, flag, *where.get(good, good).split()]), dest[flag])
            assert value == parsed_as(where.get(good, good)), (sub, flag, good, value)


def parsed_as(text):
    """'3' -> 3, '1e-3' -> 0.001, '64 64' -> [64, 64], 'cpu' -> 'cpu'."""
    for convert in (int, float, lambda t: [int(v) for v in t.split()]):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def test_reliab_help_shows_each_default_once_and_ashem_steps_per_phase(capsys):
    for sub in BOUNDED_FLAGS:
        with pytest.raises(SystemExit):
            train.main([sub, '--help'])
        out = ' '.join(capsys.readouterr().out.split())
        assert '(default: None)' not in out and '(default: False)' not in out
        assert '--seed SEED (default: 0)' in out and '--log_every LOG_EVERY (default: 10)' in out
        assert ('training steps per phase' in out) == (sub == 'ashem')


def test_reliab_bad_data_names_the_file_and_writes_no_checkpoint(tmp_path, capsys):
    for c in ('a', 'b'):
        os.makedirs(tmp_path / 'few' / c)
        for k in range(3):
            train.write_png(str(tmp_path / 'few' / c / f'{k}.png'), np.zeros((4, 4, 3), np.uint8))
    run = ['ctm', '--task', 'images', '--device', 'cpu', '--log_dir', str(tmp_path / 'run'), '--data_root']
    for root, message in ((tmp_path / 'few', r"no held-out image for class\(es\) \['a', 'b'\]"),
                          (tmp_path / 'few', r'few/a/0.png: not a PNG')):
        with pytest.raises(SystemExit, match=message) as e:
            train.main([*run, str(root)])
        assert e.value.code == 2 and capsys.readouterr().err.startswith('train.py ctm: error: --data_root')
        (tmp_path / 'few' / 'a' / '0.png').write_bytes(b'\x89PNG but not really')
    assert not (tmp_path / 'run').exists()


def same_content(a, b):
    """Independent of payload_digest: equal keys, values, and tensors equal in dtype, shape and every bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_content(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_content(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.detach().numpy().tobytes() == b.detach().numpy().tobytes())
    return type(a) is type(b) and (a == b or (a != a and b != b))


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')  # a flipped bit can name another protocol
def test_reliab_every_single_bit_flip_is_refused_or_harmless(tmp_path):
    import io
    params, opt = tiny_model()
    (params['layer']['w'].sum() ** 2).backward()
    opt.step()
    path = str(tmp_path / 'ckpt.pt')
    train.save_checkpoint(path, {'params': params, 'opt': opt.state_dict(), 'step': 3, 'args': {'lr': 0.01}})
    data = (tmp_path / 'ckpt.pt').read_bytes()
    original = train.read_checkpoint(path)
    refused = silently_wrong_without_checksum = 0
    for i in range(len(data)):  # every byte, one bit each
        damaged = bytearray(data)
        damaged[i] ^= 1 << (i % 8)
        try:
            loaded = train.read_checkpoint(io.BytesIO(bytes(damaged)))
        except train.BadFile:
            refused += 1
            try:
                raw = torch.load(io.BytesIO(bytes(damaged)), weights_only=True)
                raw.pop('sha256', None)
                silently_wrong_without_checksum += not same_content(raw, original)
            except Exception:
                pass
            continue
        assert same_content(loaded, original), f'byte {i}: a damaged file loaded different content'
    assert refused > len(data) // 3 and silently_wrong_without_checksum > 10
    with pytest.raises(train.BadFile, match=r'ckpt.pt: damaged'):
        tensor_at = data.index(params['layer']['w'].detach().numpy().tobytes())
        (tmp_path / 'ckpt.pt').write_bytes(data[:tensor_at] + bytes([data[tensor_at] ^ 1]) + data[tensor_at + 1:])
        train.load_checkpoint(path, tiny_model()[0])
    torch.save({'params': {}, 'step': 0}, path)
    with pytest.raises(train.BadFile, match=r'ckpt.pt: has no checksum'):
        train.read_checkpoint(path)


def reliab_tiny_runs(tmp_path):
    """task -> the argv of a tiny run of it (seconds on a CPU), without --log_dir."""
    text = tmp_path / 'text.txt'
    text.write_text(' '.join(f'word{i % 37} is {i % 7}.' for i in range(400)))
    lash_common = ['--data', str(text), '--seq_len', '16', '--batch_size', '8', '--dim', '16', '--max_epochs', '1',
                   '--device', 'cpu', '--training_iterations', '2']
    return {'ctm': ['ctm', *CTM_TINY, '--training_iterations', '2', '--n_pngs', '0'],
            'lash': ['lash', *lash_common, '--num_layers', '2'],
            'ashem': ['ashem', *lash_common],
            'hpcm': ['hpcm', '--device', 'cpu', '--phase', '0', '--num_images', '2', '--eval_images', '1',
                     '--eval_size', '64', '64', '--batch_size', '2', '--eval_every', '0', '--training_iterations', '2']}


def test_reliab_log_dir_with_checkpoints_needs_resume_or_overwrite(tmp_path, capsys):
    runs = reliab_tiny_runs(tmp_path)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    for task, first in (('ctm', 'ckpt.pt'), ('lash', 'train.pt'), ('ashem', 'phase1.pt'), ('hpcm', 'ckpt.pt')):
        log_dir = tmp_path / task
        os.makedirs(log_dir)
        (log_dir / first).write_bytes(b'an earlier run')
        (log_dir / f'{first}.tmp.{dead.pid}').write_bytes(b'a save killed midway')
        (log_dir / f'{first}.tmp.{os.getpid()}').write_bytes(b'a save under way')
        with pytest.raises(SystemExit, match=rf'--log_dir .*{task} holds checkpoint\(s\).*\({first}\): add --resume'):
            train.main([*runs[task], '--log_dir', str(log_dir)])
        capsys.readouterr()
        assert (log_dir / first).read_bytes() == b'an earlier run'
        assert sorted(os.listdir(log_dir)) == [first, f'{first}.tmp.{os.getpid()}']  # the killed save's file gone
        with pytest.raises(SystemExit, match=rf'{first}: cannot be read'):  # --resume reads it: damaged, one line
            train.main([*runs[task], '--log_dir', str(log_dir), '--resume'])
        err = capsys.readouterr().err
        assert err.startswith(f'train.py {task}') and err.count('\n') == 1 and 'Traceback' not in err
    capsys.readouterr()
    train.main([*runs['lash'], '--log_dir', str(tmp_path / 'lash'), '--overwrite'])
    assert '--overwrite: deleted train.pt' in capsys.readouterr().out
    assert train.read_checkpoint(str(tmp_path / 'lash' / 'train.pt'))['step'] == 2
    with pytest.raises(SystemExit) as e:
        train.main([*runs['lash'], '--log_dir', str(tmp_path / 'lash'), '--overwrite', '--resume'])
    assert e.value.code == 2 and 'not allowed with argument' in capsys.readouterr().err


def test_reliab_divergence_stops_every_task_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    runs = reliab_tiny_runs(tmp_path)
    log_dir = str(tmp_path / 'ctm_run')  # ctm sets --lr every step, so a resumed run can diverge
    train.main([*runs['ctm'], '--training_iterations', '1', '--log_dir', log_dir])
    before = open(os.path.join(log_dir, 'ckpt.pt'), 'rb').read()
    capsys.readouterr()
    for task in runs:
        log_dir = tmp_path / f'{task}_run'
        with pytest.raises(SystemExit) as e:
            train.main([*runs[task], '--training_iterations', '8', '--lr', '1e30', '--batch_size', '1',
                        '--log_dir', str(log_dir), *(['--warmup_steps', '0', '--resume'] if task == 'ctm' else
                                                     ['--save_every', '1'])])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(f'train.py {task}: error: ') and err.count('\n') == 1, err
        assert 'training diverged' in err and ('the loss is nan' in err or 'is not finite' in err)
        for name in (n for n in os.listdir(log_dir) if n.endswith('.pt')):
            saved = train.read_checkpoint(str(log_dir / name))
            assert saved['step'] < 8 and all(torch.isfinite(t).all() for t in train.tree_leaves(saved['params']))
    assert open(tmp_path / 'ctm_run' / 'ckpt.pt', 'rb').read() == before


def test_reliab_non_finite_weights_are_never_saved(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    params, opt = tiny_model()
    train.save_checkpoint(path, {'params': params, 'step': 1})
    before = (tmp_path / 'ckpt.pt').read_bytes()
    for bad in (float('nan'), float('inf')):
        with torch.no_grad():
            params['layer']['b'][1] = bad
        with pytest.raises(train.Diverged, match=r'payload.params.layer.b is not finite: .*ckpt.pt not written'):
            train.save_checkpoint(path, {'params': params, 'step': 2})
        assert (tmp_path / 'ckpt.pt').read_bytes() == before and os.listdir(tmp_path) == ['ckpt.pt']
    with pytest.raises(train.Diverged, match='step 3: the loss is inf'):
        train.run_loop(5, 0, lambda step: {'loss': [1.0, 0.5, float('inf')][step]}, lambda step: None)
