"""All tests. `python -m pytest -q test_all.py` (CPU, < 10 min on 2 cores); GPU tests: `pytest -m gpu test_all.py`.

Sections follow the files: foundation (train.py), plastic.py, lash.py, hpcm.py. Every test compares against an
independent computation (a dense matrix, an O(T^2) sum, a hand formula, a stdlib decoder), never the same code.
"""
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
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


def test_train_read_image_all_png_filters(tmp_path):
    """read_image undoes Sub/Up/Average/Paeth: encode rows with each filter by the PNG spec's formulas."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    rows, prev = [], np.zeros(15, np.int32)
    for y in range(6):
        cur, ftype = img[y].reshape(-1).astype(np.int32), y % 5
        left = np.concatenate([np.zeros(3, np.int32), cur[:-3]])
        upleft = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
        p = left + prev - upleft
        pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        pred = [0 * cur, left, prev, (left + prev) // 2, paeth][ftype]
        rows.append(bytes([ftype]) + ((cur - pred) & 255).astype(np.uint8).tobytes())
        prev = cur
    chunk = lambda k, d: struct.pack('>I', len(d)) + k + d + struct.pack('>I', zlib.crc32(k + d) & 0xffffffff)
    data = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 5, 6, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b''.join(rows))) + chunk(b'IEND', b''))
    (tmp_path / 'f.png').write_bytes(data)
    assert np.array_equal(train.read_image(str(tmp_path / 'f.png')), img)
    (tmp_path / 'f.ppm').write_bytes(b'P6\n# comment\n5 6\n255\n' + img.tobytes())
    assert np.array_equal(train.read_image(str(tmp_path / 'f.ppm')), img)


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


def test_train_resume_restores_step_params_and_optimizer(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    params, opt = tiny_model()
    for _ in range(3):
        opt.zero_grad()
        (params['layer']['w'].sum() ** 2 + params['layer']['b'].square().sum()).backward()
        opt.step()
    train.save_checkpoint(path, {'params': params, 'buffers': {}, 'opt': opt.state_dict(), 'step': 3,
                                 'args': {'width': 4}})
    fresh, fresh_opt = tiny_model()
    payload = train.load_checkpoint(path, fresh, {}, fresh_opt)
    assert payload['step'] == 3
    for a, b in zip(train.tree_leaves(params), train.tree_leaves(fresh)):
        assert torch.equal(a, b)
    saved_state, loaded_state = opt.state_dict()['state'], fresh_opt.state_dict()['state']
    for k in saved_state:
        assert torch.equal(saved_state[k]['exp_avg'], loaded_state[k]['exp_avg'])
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
# plastic.py: the CTM (issue 3)


# ================================================================================================================
# plastic.py: hypernetworks (issue 4)


# ================================================================================================================
# lash.py: LASH (issue 5) and ASHEM (issue 6)


# ================================================================================================================
# hpcm.py: Bi-WKV4 and RWKV blocks (issue 7)


# ================================================================================================================
# hpcm.py: the codec, rANS and bitstream (issue 8)
