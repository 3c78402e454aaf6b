"""One entry point for every task of this project.

    python train.py ctm --use_hyper          # Plastic CTM on generated mazes (plastic.py)
    python train.py lash ...                 # LASH transformer LM (lash.py)
    python train.py ashem ...                # ASHEM two-phase hard-example training (lash.py)
    python train.py hpcm --phase 3 ...       # HPCM + RWKV image codec (hpcm.py)

The model files never import each other or this file; everything shared by the tasks (seeding, device choice,
progress line, atomic checkpoints, metrics log, a stdlib PNG writer/reader) lives here, first, and each task's
flags and loop follow in its own section.
"""
import argparse
import json
import math
import os
import struct
import sys
import time
import zlib

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def make_generator(seed, device='cpu'):
    """Seed every global RNG and return an explicit generator for parameter init and data."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def pick_device(name):
    if name not in ('auto', 'cpu', 'cuda'):
        raise SystemExit(f"--device: expected cpu, cuda or auto, got {name!r}")
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def flatten(tree, prefix=''):
    """Nested dict of tensors -> flat {'a.b.c': tensor}, in insertion order."""
    flat = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            flat.update(flatten(value, name + '.'))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten({str(i): v for i, v in enumerate(value)}, name + '.'))
        else:
            flat[name] = value
    return flat


def tree_leaves(tree):
    return [v for v in flatten(tree).values() if isinstance(v, torch.Tensor)]


def save_checkpoint(path, payload):
    """Write to a temporary file in the same folder, then rename: a crash mid-write leaves the old file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_into(saved, tree, what):
    """Copy a saved flat/nested tensor dict into the live tree in place; refuse on the first mismatching key."""
    saved_flat, live_flat = flatten(saved), flatten(tree)
    for key in list(live_flat) + [k for k in saved_flat if k not in live_flat]:
        if key not in saved_flat:
            raise ValueError(f"checkpoint {what}: key {key!r} is missing from the checkpoint")
        if key not in live_flat:
            raise ValueError(f"checkpoint {what}: unexpected key {key!r} that this model does not have")
        s, t = saved_flat[key], live_flat[key]
        if isinstance(t, torch.Tensor):
            if not isinstance(s, torch.Tensor) or s.shape != t.shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"checkpoint {what}: {key!r} has shape {got}, the model expects {tuple(t.shape)}")
            with torch.no_grad():
                t.copy_(s.to(t.device, t.dtype))


def load_checkpoint(path, params, buffers=None, opt=None, args=None, must_match=()):
    """Restore params/buffers in place (and the optimizer); returns the payload (step, args, extra entries).

    `must_match` names the args whose saved value must equal the current one (e.g. model widths)."""
    try:
        payload = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or 'params' not in payload or 'step' not in payload:
        raise ValueError(f"checkpoint {path}: not a checkpoint of this project (no 'params'/'step')")
    saved_args = payload.get('args', {})
    for name in must_match:
        if args is not None and name in saved_args and saved_args[name] != getattr(args, name, None):
            raise ValueError(f"checkpoint {path}: it was trained with --{name} {saved_args[name]!r}, "
                             f"this run asks for {getattr(args, name, None)!r}")
    load_into(payload['params'], params, 'params')
    if buffers is not None:
        load_into(payload.get('buffers', {}), buffers, 'buffers')
    if opt is not None and payload.get('opt') is not None:
        opt.load_state_dict(payload['opt'])
    return payload


def checkpoint_path(args):
    return os.path.join(args.log_dir, 'ckpt.pt')


class MetricsLog:
    """Append-only JSONL: one JSON object per line, flushed at once so a crash loses nothing already logged."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path

    def write(self, **record):
        record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def format_seconds(s):
    s = int(s)
    return f'{s // 3600}h{s // 60 % 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


class Progress:
    """`step 120/1000 | loss 2.3100 | 14.2 steps/s | eta 1m02s` — speed measured since this run started."""

    def __init__(self, total, start=0):
        self.total, self.start, self.t0 = total, start, time.time()

    def line(self, step, **metrics):
        rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float('inf')
        parts = [f'step {step}/{self.total}']
        parts += [f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items()]
        parts += [f'{rate:.2f} steps/s', f'eta {format_seconds(eta) if math.isfinite(eta) else "?"}']
        return ' | '.join(parts)

    def print(self, step, **metrics):
        print(self.line(step, **metrics), flush=True)


def run_loop(total_steps, start_step, step_fn, save_fn, log_every=10, save_every=500, eval_every=0, eval_fn=None,
             log=None):
    """The loop every task shares: step_fn(step) -> dict of floats; progress, metrics, periodic eval and saving.

    The checkpoint is also written on Ctrl-C and on any exception, so nothing trained is lost; then it re-raises."""
    progress = Progress(total_steps, start_step)
    step = start_step
    try:
        while step < total_steps:
            metrics = step_fn(step)
            step += 1
            if log is not None:
                log.write(step=step, **metrics)
            if step % log_every == 0 or step == total_steps:
                progress.print(step, **metrics)
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == total_steps):
                eval_metrics = eval_fn(step)
                print('eval | ' + ' | '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                                             for k, v in eval_metrics.items()), flush=True)
                if log is not None:
                    log.write(step=step, **{f'eval_{k}': v for k, v in eval_metrics.items()})
            if step % save_every == 0 and step < total_steps:
                save_fn(step)
    except BaseException:
        save_fn(step)
        print(f'interrupted at step {step}: checkpoint saved, rerun with --resume to continue', file=sys.stderr)
        raise
    save_fn(step)
    return step


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)


def write_png(path, image):
    """uint8 (H, W) grey or (H, W, 3) RGB -> PNG file, stdlib only (filter 0 on every row)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"write_png: image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    colour = 0 if image.ndim == 2 else 2
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, -1)], axis=1)
    data = (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, colour, 0, 0, 0))
            + _png_chunk(b'IDAT', zlib.compress(rows.tobytes(), 6)) + _png_chunk(b'IEND', b''))
    with open(path, 'wb') as f:
        f.write(data)


def _unfilter_png(raw, h, w, channels):
    stride = w * channels
    rows = np.frombuffer(raw, np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 255
        else:  # Sub, Average and Paeth depend on the pixel to the left: walk the row
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                a = cur[x - channels] if x >= channels else 0
                b, c = prev[x], (prev[x - channels] if x >= channels else 0)
                if ftype == 1:
                    pred = a
                elif ftype == 3:
                    pred = (a + b) // 2
                elif ftype == 4:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                else:
                    raise ValueError(f"PNG: unknown filter type {ftype} in row {y}")
                cur[x] = (line[x] + pred) & 255
        out[y] = prev = cur
    return out.astype(np.uint8).reshape(h, w, channels)


def read_image(path):
    """PNG (8-bit grey/RGB/RGBA, non-interlaced) or binary PPM/PGM -> uint8 (H, W, 3). Stdlib + numpy only."""
    with open(path, 'rb') as f:
        data = f.read()
    if data[:2] in (b'P5', b'P6'):
        fields, pos = [], 2
        while len(fields) < 3:
            while data[pos:pos + 1].isspace():
                pos += 1
            if data[pos:pos + 1] == b'#':
                pos = data.index(b'\n', pos)
                continue
            end = pos
            while not data[end:end + 1].isspace():
                end += 1
            fields.append(int(data[pos:end]))
            pos = end
        w, h, maxval = fields
        if maxval != 255:
            raise ValueError(f"{path}: only 8-bit PPM/PGM is supported (maxval {maxval})")
        channels = 3 if data[:2] == b'P6' else 1
        img = np.frombuffer(data[pos + 1:pos + 1 + w * h * channels], np.uint8).reshape(h, w, channels)
        return np.repeat(img, 3, axis=2) if channels == 1 else img.copy()
    if data[:8] != b'\x89PNG\r\n\x1a\n':
        raise ValueError(f"{path}: not a PNG or binary PPM/PGM file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack('>I', data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b'IHDR':
            header = struct.unpack('>IIBBBBB', body)
        elif kind == b'IDAT':
            idat.append(body)
        elif kind == b'IEND':
            break
    w, h, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"{path}: only 8-bit, non-interlaced grey/RGB/RGBA PNG is supported")
    img = _unfilter_png(zlib.decompress(b''.join(idat)), h, w, channels)
    if channels in (1, 2):
        return np.repeat(img[..., :1], 3, axis=2)
    return img[..., :3].copy()


def add_common_args(p, log_dir, steps):
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='auto', help='cpu, cuda or auto')
    p.add_argument('--log_dir', default=log_dir, help='checkpoints, metrics.jsonl and pictures go here')
    p.add_argument('--resume', action='store_true', help='continue from LOG_DIR/ckpt.pt if it exists')
    p.add_argument('--training_iterations', type=int, default=steps)
    p.add_argument('--log_every', type=int, default=10)
    p.add_argument('--save_every', type=int, default=500)


# ----------------------------------------------------------------------------------------------------------------
# ctm: Plastic Continuous Thought Machine (plastic.py)

def add_ctm_args(p):
    add_common_args(p, 'runs/ctm', 1000)
    p.add_argument('--use_hyper', action='store_true')


def run_ctm(args):
    raise SystemExit("train.py ctm: the CTM (issue 3, plastic.py) is not built yet")


# ----------------------------------------------------------------------------------------------------------------
# lash: LASH layer-weighted transformer LM (lash.py)

def add_lash_args(p):
    add_common_args(p, 'runs/lash', 1000)


def run_lash(args):
    raise SystemExit("train.py lash: LASH (issue 5, lash.py) is not built yet")


# ----------------------------------------------------------------------------------------------------------------
# ashem: two-phase hard-example training (lash.py)

def add_ashem_args(p):
    add_common_args(p, 'runs/ashem', 1000)


def run_ashem(args):
    raise SystemExit("train.py ashem: ASHEM (issue 6, lash.py) is not built yet")


# ----------------------------------------------------------------------------------------------------------------
# hpcm: HPCM + RWKV learned image codec (hpcm.py)

def add_hpcm_args(p):
    add_common_args(p, 'runs/hpcm', 1000)


def run_hpcm(args):
    raise SystemExit("train.py hpcm: the HPCM codec (issue 8, hpcm.py) is not built yet")


# ----------------------------------------------------------------------------------------------------------------

SUBCOMMANDS = {
    'ctm': (add_ctm_args, run_ctm, 'Plastic Continuous Thought Machine on mazes / parity / images'),
    'lash': (add_lash_args, run_lash, 'LASH: layer-weighted loss, layer-wise lr, early exit'),
    'ashem': (add_ashem_args, run_ashem, 'ASHEM: two-phase hard-example training with routing'),
    'hpcm': (add_hpcm_args, run_hpcm, 'HPCM learned image codec with RWKV context (phases 0-3)'),
}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='task', metavar='{' + ','.join(SUBCOMMANDS) + '}')
    sub.required = True
    for name, (add_args, _, help_text) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.task][1](args)


if __name__ == '__main__':
    main()
