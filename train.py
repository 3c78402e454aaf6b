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
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import re
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


def synchronizer(device):
    """-> a function that waits for the device's queued work (for timing); a no-op off CUDA."""
    return torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)


def tree_leaves(tree):
    return [v for v in flatten(tree).values() if isinstance(v, torch.Tensor)]


def tree_to(tree, device, requires_grad=None):
    """Move a nested dict/list of tensors to a device; with requires_grad set, as fresh leaves (for training)."""
    if isinstance(tree, dict):
        return {k: tree_to(v, device, requires_grad) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_to(v, device, requires_grad) for v in tree]
    if requires_grad is None:
        return tree.to(device)
    return tree.detach().to(device).requires_grad_(requires_grad)


def print_rows(rows, columns=None):
    """rows: list of dicts -> aligned table of `columns` (all keys by default; floats with 4 significant digits)."""
    columns = columns or list(rows[0])
    cells = [[f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print('  '.join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print('  '.join(v.rjust(w) for v, w in zip(row, widths)), flush=True)


class BadFile(ValueError):
    """A file the user named (checkpoint, image, data) that cannot be used; the message names the file.
    main() prints it as one line, no traceback, and exits with status 2."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or non-finite weights: the run stops without saving them, so the last
    checkpoint written stays the last good one. main() prints the message as one line and exits with status 1."""


def check_finite_loss(step, loss):
    if not math.isfinite(loss):
        raise Diverged(f'step {step}: the loss is {loss}: training diverged and stopped without saving (the last '
                       'checkpoint written, if any, is kept); try a lower --lr')


def first_non_finite(tree, key='payload'):
    """The key of the first floating-point tensor in a nested payload with a NaN or inf in it, or None."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return key if (isinstance(tree, torch.Tensor) and tree.is_floating_point()
                       and not bool(torch.isfinite(tree).all())) else None
    return next((bad for k, v in items if (bad := first_non_finite(v, f'{key}.{k}')) is not None), None)


def checkpoint_plain(value, key='payload'):
    """The payload with numpy values made tensors/Python numbers; anything else but tensors, numbers, strings,
    lists, tuples and dicts is refused (TypeError naming its key), so torch.load(weights_only=True) reads it back."""
    if isinstance(value, dict):
        return {k: checkpoint_plain(v, f'{key}.{k}') for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(checkpoint_plain(v, f'{key}.{i}') for i, v in enumerate(value))
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: {key} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, "
                    "strings, lists and dicts")


def payload_digest(value):
    """sha256 over a checkpoint payload's content: every key, number and string (type and repr) and every tensor
    (dtype, shape, bytes), in order. Stored in the file as 'sha256' and checked on load."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, dict):
            h.update(b'{%d' % len(v))
            for k, x in v.items():
                feed(k)
                feed(x)
        elif isinstance(v, (list, tuple)):
            h.update(b'[%d' % len(v))
            for x in v:
                feed(x)
        elif isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f'T{t.dtype}{tuple(v.shape)}'.encode())
            h.update(t.view(torch.uint8).numpy())
        else:
            h.update(f'{type(v).__name__}:{v!r};'.encode())
    feed(value)
    return h.hexdigest()


def save_checkpoint(path, payload):
    """Write payload and its sha256 to a temporary file in the same folder, then rename: a crash mid-write leaves
    the old file intact. Non-finite weights are never written (Diverged)."""
    payload = checkpoint_plain({k: v for k, v in payload.items() if k != 'sha256'})
    if (bad := first_non_finite(payload)) is not None:
        raise Diverged(f'{bad} is not finite: {path} not written (the last checkpoint written, if any, is kept); '
                       'training diverged, try a lower --lr')
    payload['sha256'] = payload_digest(payload)
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


def read_checkpoint(path):
    """A checkpoint file's payload, read with torch.load(weights_only=True): only tensors, numbers, strings, lists
    and dicts are built, so a crafted file cannot run code; then its sha256 is checked, so a damaged file is refused.
    BadFile names the file."""
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message is a paragraph: keep its line that says what failed
        if found := re.search(r'GLOBAL ([\w.]+)', str(e)):
            raise BadFile(f"checkpoint {path}: refused, it holds more than tensors, numbers, strings, lists and "
                          f"dicts (it asks for {found[1]})") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise BadFile(f"checkpoint {path}: cannot be read ({lines[-2] if len(lines) > 2 else lines[0]})") from None
    except Exception as e:
        raise BadFile(f"checkpoint {path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or 'params' not in payload or 'step' not in payload:
        raise BadFile(f"checkpoint {path}: not a checkpoint of this project (no 'params'/'step')")
    stored = payload.pop('sha256', None)
    if stored is None:
        raise BadFile(f"checkpoint {path}: has no checksum (not written by this version of train.py)")
    if stored != payload_digest(payload):
        raise BadFile(f"checkpoint {path}: damaged, its content does not match its sha256")
    return payload


def load_into(saved, tree, what):
    """Copy a saved flat/nested tensor dict into the live tree in place; refuse on the first mismatching key."""
    saved_flat, live_flat = flatten(saved), flatten(tree)
    for key in list(live_flat) + [k for k in saved_flat if k not in live_flat]:
        if key not in saved_flat:
            raise BadFile(f"checkpoint {what}: key {key!r} is missing from the checkpoint")
        if key not in live_flat:
            raise BadFile(f"checkpoint {what}: unexpected key {key!r} that this model does not have")
        s, t = saved_flat[key], live_flat[key]
        if isinstance(t, torch.Tensor):
            if not isinstance(s, torch.Tensor) or s.shape != t.shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise BadFile(f"checkpoint {what}: {key!r} has shape {got}, the model expects {tuple(t.shape)}")
            with torch.no_grad():
                t.copy_(s.to(t.device, t.dtype))


def load_checkpoint(path, params, buffers=None, opt=None, args=None, must_match=()):
    """Restore params/buffers in place (and the optimizer); returns the payload (step, args, extra entries).

    `must_match` names the args whose saved value must equal the current one (e.g. model widths)."""
    payload = read_checkpoint(path)
    saved_args = payload.get('args', {})
    for name in must_match:
        if args is not None and name in saved_args and saved_args[name] != getattr(args, name, None):
            raise BadFile(f"checkpoint {path}: it was trained with --{name} {saved_args[name]!r}, "
                          f"this run asks for {getattr(args, name, None)!r}")
    load_into(payload['params'], params, f'{path} params')
    if buffers is not None:
        load_into(payload.get('buffers', {}), buffers, f'{path} buffers')
    if opt is not None and payload.get('opt') is not None:
        # the checkpoint restores the optimizer's state (moments, step counts); this run's param groups keep every
        # other entry (lr, layer-wise rates, weight_decay, betas, eps, capturable), so a resumed run can change them
        this_run = [{k: v for k, v in group.items() if k != 'params'} for group in opt.param_groups]
        try:
            opt.load_state_dict(payload['opt'])
        except (ValueError, KeyError, TypeError) as e:
            raise BadFile(f"checkpoint {path}: its optimizer state does not fit this model ({e})") from None
        for group, hyper in zip(opt.param_groups, this_run):
            group.update(hyper)
        changed = [k for k in ('lr', 'weight_decay')
                   if k in saved_args and hasattr(args, k) and saved_args[k] != getattr(args, k)]
        if changed:
            print(f'{path}: resumed with ' + ', '.join(f'--{k} {getattr(args, k)!r} (the checkpoint was trained with '
                                                       f'{saved_args[k]!r})' for k in changed), flush=True)
    return payload


def checkpoint_path(args):
    return os.path.join(args.log_dir, 'ckpt.pt')


def claim_log_dir(args):
    """Before a training run writes into --log_dir: delete the temporary files of saves that were killed (their
    process is gone), and refuse to start over checkpoints of an earlier run unless --resume or --overwrite."""
    if not os.path.isdir(args.log_dir):
        return
    names = sorted(os.listdir(args.log_dir))
    for name in names:
        stem, _, pid = name.rpartition('.tmp.')
        if stem.endswith('.pt') and pid.isdigit() and not process_alive(int(pid)):
            remove_quietly(os.path.join(args.log_dir, name))
    checkpoints = [name for name in names if name.endswith('.pt')]
    if not checkpoints or args.resume:
        return
    if not args.overwrite:
        raise SystemExit(f"--log_dir {args.log_dir} holds checkpoint(s) of an earlier run ({', '.join(checkpoints)}): "
                         "add --resume to continue it, or --overwrite to delete them and start over")
    for name in checkpoints:
        remove_quietly(os.path.join(args.log_dir, name))
    print(f"--overwrite: deleted {', '.join(checkpoints)} in {args.log_dir}", flush=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_quietly(path):
    """os.remove that lets another process (another data-parallel rank) have removed it first."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class MetricsLog:
    """Append-only JSONL: one JSON object per line, flushed at once so a crash loses nothing already logged."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path

    def write(self, **record):
        record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def format_metrics(metrics):
    """{name: value} -> ['name value', ...], floats to 4 significant digits."""
    return [f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in metrics.items()]


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
        parts += format_metrics(metrics)
        parts += [f'{rate:.2f} steps/s', f'eta {format_seconds(eta) if math.isfinite(eta) else "?"}']
        return ' | '.join(parts)

    def print(self, step, **metrics):
        print(self.line(step, **metrics), flush=True)


def run_loop(total_steps, start_step, step_fn, save_fn, log_every=10, save_every=500, eval_every=0, eval_fn=None,
             log=None):
    """The loop every task shares: step_fn(step) -> dict of floats; progress, metrics, periodic eval and saving.

    The checkpoint is also written on Ctrl-C and on any exception, so nothing trained is lost; then it re-raises.
    A non-finite loss (metrics['loss']) stops the run without saving (Diverged)."""
    progress = Progress(total_steps, start_step)
    step = start_step
    try:
        while step < total_steps:
            metrics = step_fn(step)
            step += 1
            check_finite_loss(step, metrics.get('loss', 0.0))
            if log is not None:
                log.write(step=step, **metrics)
            if step % log_every == 0 or step == total_steps:
                progress.print(step, **metrics)
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == total_steps):
                eval_metrics = eval_fn(step)
                print('eval | ' + ' | '.join(format_metrics(eval_metrics)), flush=True)
                if log is not None:
                    log.write(step=step, **{f'eval_{k}': v for k, v in eval_metrics.items()})
            if step % save_every == 0 and step < total_steps:
                save_fn(step)
    except Diverged:
        raise
    except BaseException:
        save_fn(step)
        print(f'interrupted at step {step}: checkpoint saved, rerun with --resume to continue', file=sys.stderr)
        raise
    save_fn(step)
    return step


def _png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)


def write_file_atomic(path, data):
    """Write bytes to a temporary file in the same folder, then rename: readers never see a partial file."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _png_encode(image, who='write_png'):
    """uint8 (H, W) grey or (H, W, 3) RGB -> (IHDR body, zlib-compressed rows with filter 0)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"{who}: image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, -1)], axis=1)
    return struct.pack('>IIBBBBB', w, h, 8, 0 if image.ndim == 2 else 2, 0, 0, 0), zlib.compress(rows.tobytes(), 6)


def write_png(path, image):
    """uint8 (H, W) grey or (H, W, 3) RGB -> PNG file, stdlib only (filter 0 on every row)."""
    header, data = _png_encode(image)
    write_file_atomic(path, b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) + _png_chunk(b'IDAT', data)
                      + _png_chunk(b'IEND', b''))


def write_apng(path, frames, delay_ms=150):
    """Equal-sized uint8 frames -> an animated PNG that loops (APNG: acTL, then per frame an fcTL and its data, the
    first frame's in IDAT so that viewers without APNG show it, the rest in fdAT chunks numbered in one sequence)."""
    if not frames or any(np.shape(f) != np.shape(frames[0]) for f in frames):
        raise ValueError(f"write_apng: expected one or more frames of one shape, got {[np.shape(f) for f in frames]}")
    encoded = [_png_encode(f, 'write_apng') for f in frames]
    w, h = struct.unpack('>II', encoded[0][0][:8])
    out, seq = [b'\x89PNG\r\n\x1a\n', _png_chunk(b'IHDR', encoded[0][0]),
                _png_chunk(b'acTL', struct.pack('>II', len(frames), 0))], 0
    for i, (_, data) in enumerate(encoded):
        out.append(_png_chunk(b'fcTL', struct.pack('>IIIIIHHBB', seq, w, h, 0, 0, delay_ms, 1000, 0, 0)))
        seq += 1
        if i == 0:
            out.append(_png_chunk(b'IDAT', data))
        else:
            out.append(_png_chunk(b'fdAT', struct.pack('>I', seq) + data))
            seq += 1
    out.append(_png_chunk(b'IEND', b''))
    write_file_atomic(path, b''.join(out))


def _unfilter_png(raw, h, w, channels):
    """Undo the PNG row filters (None, Sub, Up, Average, Paeth) -> uint8 (h, w, channels).

    Rows that only use None/Sub/Up take a few numpy operations per row. Average and Paeth predict each byte from
    its left, upper and upper-left neighbours; then the image is decoded along anti-diagonals (x + y constant),
    whose pixels depend only on the two diagonals before: h + w - 1 vectorised steps instead of h·w pixel steps."""
    rows = np.frombuffer(raw, np.uint8, h * (w * channels + 1)).reshape(h, w * channels + 1)
    ftype, lines = rows[:, 0], rows[:, 1:].reshape(h, w, channels)
    if ftype.max(initial=0) > 4:
        raise ValueError(f"unknown PNG filter type {ftype.max()} in row {int(np.argmax(ftype > 4))}")
    if not ftype.any():
        return lines.copy()
    lines = lines.astype(np.int32)
    if (ftype <= 2).all():
        out = np.where((ftype == 1)[:, None, None], lines.cumsum(1), lines)  # None as is, Sub a running sum
        for y in np.flatnonzero(ftype == 2):  # Up adds the decoded row above
            out[y] = lines[y] + (out[y - 1] if y else 0)
        return (out & 255).astype(np.uint8)
    # Skewed layout: diagonal d = y + x, row y (1-based; row 0 and column x = 0 are the zero border), so that each
    # diagonal's left (a), upper (b) and upper-left (c) neighbours are contiguous slices of the two before.
    yy, xx = np.mgrid[1:h + 1, 1:w + 1]
    skewed = np.zeros((h + w + 1, h + 1, channels), np.int16)
    skewed[yy + xx, yy] = lines
    out = np.zeros_like(skewed)
    for d in range(2, h + w + 1):
        lo, hi = max(1, d - w), min(h, d - 1) + 1
        a, b, c = out[d - 1, lo:hi], out[d - 1, lo - 1:hi - 1], out[d - 2, lo - 1:hi - 1]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        f = ftype[lo - 1:hi - 1, None]
        pred = np.where(f == 4, paeth, np.where(f == 3, (a + b) >> 1, np.where(f == 2, b, np.where(f == 1, a, 0))))
        out[d, lo:hi] = (skewed[d, lo:hi] + pred) & 255
    return out[yy + xx, yy].astype(np.uint8)


def read_image(path):
    """PNG (8-bit grey/RGB/RGBA, non-interlaced) or binary PPM/PGM -> uint8 (H, W, 3). Stdlib + numpy only.
    A file that is not such an image, or is damaged, raises ValueError naming the file."""
    with open(path, 'rb') as f:
        data = f.read()
    try:
        img = _read_ppm(data) if data[:2] in (b'P5', b'P6') else _read_png(data)
    except (ValueError, IndexError, struct.error, zlib.error) as e:
        raise ValueError(f"{path}: {e}") from None
    return np.repeat(img[..., :1], 3, axis=2) if img.shape[2] < 3 else np.ascontiguousarray(img[..., :3])


def _read_ppm(data):
    fields, pos = [], 2
    while len(fields) < 3:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b'#':
            pos = data.index(b'\n', pos)
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        fields.append(int(data[pos:end]))
        pos = end
    w, h, maxval = fields
    if maxval != 255:
        raise ValueError(f"only 8-bit PPM/PGM is supported (maxval {maxval})")
    channels = 3 if data[:2] == b'P6' else 1
    if len(data) < pos + 1 + w * h * channels:
        raise ValueError(f"truncated PPM/PGM: {w}x{h} needs {w * h * channels} bytes of pixels")
    return np.frombuffer(data, np.uint8, w * h * channels, pos + 1).reshape(h, w, channels)


def _read_png(data):
    if data[:8] != b'\x89PNG\r\n\x1a\n':
        raise ValueError("not a PNG or binary PPM/PGM file")
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
    if header is None or not idat:
        raise ValueError("corrupt PNG: no IHDR or no IDAT chunk")
    w, h, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError("only 8-bit, non-interlaced grey/RGB/RGBA PNG is supported")
    raw = zlib.decompress(b''.join(idat))
    if len(raw) < h * (w * channels + 1):
        raise ValueError(f"corrupt PNG: {len(raw)} bytes of pixel data, {w}x{h} needs {h * (w * channels + 1)}")
    return _unfilter_png(raw, h, w, channels)


FLOAT_FLAG_LIMIT = 1e30  # beyond this float32 training overflows at once (Adam's step raises on lr >= 3.4e37)


def flag_type(kind, low=None, high=None, above=None, odd=False):
    """argparse type=: a finite `kind` (int or float) with low <= value <= high and value > above (None: no bound;
    floats within ±FLOAT_FLAG_LIMIT), odd if asked; anything else is refused by argparse as
    `argument --flag: expected ..., got '...'` (status 2)."""
    if kind is float:
        low = -FLOAT_FLAG_LIMIT if low is None and above is None else low
        high = FLOAT_FLAG_LIMIT if high is None else high
    bounds = [f'> {above}' if above is not None else '', f'>= {low:g}' if low is not None else '',
              f'<= {high:g}' if high is not None else '']
    expected = (f'{"an odd int" if odd else "an int" if kind is int else "a number"} '
                f'{" and ".join(b for b in bounds if b)}').strip()

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
                and (above is None or value > above) and (not odd or value % 2 == 1)):
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}')
        return value
    parse.__name__ = expected
    return parse


positive_int, nonneg_int = flag_type(int, above=0), flag_type(int, low=0)
positive_float, nonneg_float, finite_float = flag_type(float, above=0), flag_type(float, low=0), flag_type(float)
probability = flag_type(float, low=0, high=1)
odd_int = flag_type(int, low=5, odd=True)


def existing_dir(text):
    """argparse type=: a folder that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f'{text}: no such folder')
    return text


def existing_file(text):
    """argparse type=: a file that exists."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f'{text}: no such file')
    return text


def add_common_args(p, log_dir, steps, steps_help='training steps'):
    p.add_argument('--seed', type=nonneg_int, default=0)
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--log_dir', default=log_dir, help='checkpoints, metrics.jsonl and pictures go here')
    fresh = p.add_mutually_exclusive_group()
    fresh.add_argument('--resume', action='store_true', help='continue from the checkpoint(s) in LOG_DIR if any')
    fresh.add_argument('--overwrite', action='store_true',
                       help='start afresh in a LOG_DIR that holds checkpoints (they are deleted first)')
    p.add_argument('--training_iterations', type=positive_int, default=steps, help=steps_help)
    p.add_argument('--log_every', type=positive_int, default=10)
    p.add_argument('--save_every', type=positive_int, default=500)


# ----------------------------------------------------------------------------------------------------------------
# plumbing: data-parallel ranks, CUDA-graph capture, batches made ahead by worker processes. The loops call these;
# none of them changes what a training step computes.


def setup_distributed(device_name):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them: one process, rank 0."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    # NVLink multicast can take a shared host's GPUs out of service: off unless the user set it explicitly.
    os.environ.setdefault('NCCL_NVLS_ENABLE', '0')
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return torch.distributed.get_rank(), world, device


def quiet_unless_rank0(rank):
    """Data-parallel ranks other than 0 print nothing (rank 0 logs, evaluates and checkpoints for all)."""
    if rank != 0:
        sys.stdout = open(os.devnull, 'w')


def mean_over_ranks(t, world):
    """t averaged over ranks, in place (every rank holds a tensor of t's shape); t itself with one rank."""
    if world > 1:
        torch.distributed.all_reduce(t)
        t /= world
    return t


def all_reduce_grads(leaves, world):
    """Average gradients over ranks in one flat all-reduce (every rank holds the same parameter list)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves]
    flat = mean_over_ranks(torch.cat([g.reshape(-1) for g in grads]), world)
    offset = 0
    for p, g in zip(leaves, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)
        offset += g.numel()


def wait_for_ranks(world, device):
    """Every rank leaves together (rank 0 may still be saving after its last step)."""
    if world > 1:
        torch.distributed.barrier(**({'device_ids': [device.index]} if device.type == 'cuda' else {}))


def end_distributed(world):
    if world > 1:
        torch.distributed.destroy_process_group()


def cuda_graph_step(step_fn, warmup=3):
    """step_fn(*inputs) -> tensor, replayed from a CUDA graph: the first `warmup` calls run it eagerly on a side
    stream (real steps; they let autograd, cuBLAS, NCCL and the optimizer create their lazy state), the next call
    captures it and every call from then on copies its inputs into the graph's static input tensors and replays.
    step_fn must keep its shapes and never wait for the host. The returned tensor is the graph's static output:
    read it before the next call."""
    graph, static_inputs, static_output, calls = None, None, None, 0

    def step(*inputs):
        nonlocal graph, static_inputs, static_output, calls
        if graph is None and calls < warmup:
            calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                output = step_fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return output
        if graph is None:
            static_inputs = [t.clone() for t in inputs]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = step_fn(*static_inputs)
        else:
            for static, t in zip(static_inputs, inputs):
                static.copy_(t)
        graph.replay()  # capturing records without running: the capturing call's step runs here too
        return static_output
    return step


def optimizer_mode(opt, cuda_graph, device):
    """Make AdamW capturable for a CUDA graph (step counters on the GPU, the learning rate a GPU tensor that
    set_lr fills in place, so the replayed graph reads the current value), or plain; also after loading a
    checkpoint, whose step counters are where the saving run kept them."""
    for group in opt.param_groups:
        group['capturable'] = cuda_graph
        lr = float(group['lr'])
        group['lr'] = torch.tensor(lr, device=device) if cuda_graph else lr
    for state in opt.state.values():
        if 'step' in state:
            state['step'] = state['step'].to(device if cuda_graph else 'cpu', torch.float32)


def set_lr(opt, lr):
    for group in opt.param_groups:
        if isinstance(group['lr'], torch.Tensor):
            group['lr'].fill_(lr)
        else:
            group['lr'] = lr


@contextlib.contextmanager
def batches_ahead(make_batch, workers, total_steps):
    """-> batch(step) = make_batch(step); with workers > 0, `workers` processes make the next 2·workers batches
    while the GPU trains (make_batch must pickle: a module-level function or a functools.partial of one)."""
    if workers <= 0:
        yield make_batch
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'))
    ahead = {}

    def batch(step):
        for s in range(step, min(step + 2 * workers, total_steps)):
            if s not in ahead:
                ahead[s] = pool.submit(make_batch, s)
        return ahead.pop(step).result()
    try:
        yield batch
    finally:
        pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------------
# ctm: Plastic Continuous Thought Machine (plastic.py)

# `python train.py ctm` with no flag: a small model that learns 11x11-pixel mazes on a CPU in a few minutes.
CTM_DEFAULTS = dict(d_model=128, d_input=64, heads=4, iterations=12, synapse_depth=4, memory_length=8,
                    deep_memory=True, memory_hidden_dims=8, n_synch_out=64, n_synch_action=32,
                    neuron_select_type='random-pairing', n_random_pairing_self=0, backbone_type='resnet18-1',
                    positional_embedding_type='none', dropout=0.0, dropout_nlm=None, do_normalisation=False,
                    lr=1e-3, batch_size=32, batch_size_test=64, warmup_steps=100, maze_size=11, maze_route_length=8)
# The seeds' mazes configuration (plastic_ctm_readme / hyper guides: `--dataset mazes-small`).
CTM_PRESETS = {
    'mazes-small': dict(d_model=1024, d_input=256, heads=4, iterations=50, synapse_depth=8, memory_length=25,
                        deep_memory=True, memory_hidden_dims=32, n_synch_out=128, n_synch_action=128,
                        neuron_select_type='random-pairing', n_random_pairing_self=0, backbone_type='resnet18-1',
                        positional_embedding_type='none', dropout=0.0, lr=1e-4, batch_size=64, batch_size_test=64,
                        warmup_steps=1000, maze_size=39, maze_route_length=50),
    # The paper's maze run (tasks/mazes/README.md of the original), here with resnet34-2 as there.
    'mazes-medium': dict(d_model=2048, d_input=512, heads=8, iterations=75, synapse_depth=4, memory_length=25,
                         deep_memory=True, memory_hidden_dims=32, n_synch_out=64, n_synch_action=32,
                         neuron_select_type='first-last', backbone_type='resnet34-2',
                         positional_embedding_type='none', dropout=0.1, lr=1e-4, batch_size=64, batch_size_test=64,
                         warmup_steps=10000, maze_size=39, maze_route_length=100),
}
CTM_TASK_DEFAULTS = {'parity': dict(backbone_type='parity_backbone', positional_embedding_type='custom-rotational-1d',
                                    neuron_select_type='random', n_synch_out=32, n_synch_action=32)}
CTM_MODEL_ARGS = ('ctm_task', 'd_model', 'd_input', 'heads', 'iterations', 'synapse_depth', 'memory_length',
                  'deep_memory', 'memory_hidden_dims', 'do_normalisation', 'n_synch_out', 'n_synch_action',
                  'neuron_select_type', 'n_random_pairing_self', 'backbone_type', 'positional_embedding_type',
                  'maze_route_length', 'parity_sequence_length', 'hyper_layers', 'hyper_rank', 'use_hyper',
                  'use_hyper_nlm', 'hyper_nlm_rank')


def add_ctm_args(p):
    add_common_args(p, 'runs/ctm', 1500)
    none = dict(default=None)
    p.add_argument('--task', dest='ctm_task', default='mazes', choices=('mazes', 'parity', 'images'))
    p.add_argument('--preset', choices=tuple(CTM_PRESETS), help='a full configuration (the seeds\' mazes-small: '
                   'd_model 1024, resnet18-1, 50 ticks, 39x39 mazes, route 50); explicit flags still win')
    g = p.add_argument_group('model (default: the small CPU model, or --preset)')
    for name, kind in (('d_model', positive_int), ('d_input', positive_int), ('heads', positive_int),
                       ('iterations', positive_int), ('synapse_depth', positive_int), ('memory_length', positive_int),
                       ('memory_hidden_dims', positive_int), ('n_synch_out', positive_int),
                       ('n_synch_action', positive_int), ('n_random_pairing_self', nonneg_int),
                       ('dropout', probability), ('dropout_nlm', probability)):
        g.add_argument(f'--{name}', type=kind, help=f'default {CTM_DEFAULTS[name]}', **none)
    g.add_argument('--deep_memory', action=argparse.BooleanOptionalAction, help='deep NLMs (default on)', **none)
    g.add_argument('--do_normalisation', action=argparse.BooleanOptionalAction, help='LayerNorm in the NLMs', **none)
    g.add_argument('--neuron_select_type', choices=('first-last', 'random', 'random-pairing'), **none)
    g.add_argument('--backbone_type', help="none, conv, parity_backbone, shallow-wide, resnet{18,34,50,101,152}-{1..4}",
                   **none)
    g.add_argument('--positional_embedding_type', choices=('none', 'learnable-fourier', 'multi-learnable-fourier',
                                                           'custom-rotational', 'custom-rotational-1d'), **none)
    g.add_argument('--use_hyper', action='store_true', help='plastic synapses (HyperSynapseUNET)')
    g.add_argument('--hyper_layers', choices=('none', 'bottleneck', 'down', 'up', 'all'),
                   help='synapse Linears made plastic; needs --use_hyper (default with it: bottleneck)', **none)
    g.add_argument('--hyper_rank', type=positive_int, default=8, help='rank of the synapse hypernetworks\' U V^T')
    g.add_argument('--use_hyper_nlm', action='store_true', help='plastic neuron-level models (HyperSuperLinear)')
    g.add_argument('--hyper_nlm_rank', type=positive_int, default=4, help='rank of the NLM hypernetwork\'s U V^T')
    g.add_argument('--count_params', action='store_true',
                   help='print the parameters each hyper configuration adds to this model, then exit')
    g = p.add_argument_group('training')
    for name, kind in (('lr', positive_float), ('batch_size', positive_int), ('batch_size_test', positive_int),
                       ('warmup_steps', nonneg_int)):
        g.add_argument(f'--{name}', type=kind, help=f'default {CTM_DEFAULTS[name]}', **none)
    g.add_argument('--use_scheduler', action=argparse.BooleanOptionalAction, default=True,
                   help='linear warmup then cosine decay to 1e-7 (the original\'s WarmupCosineAnnealingLR)')
    g.add_argument('--weight_decay', type=nonneg_float, default=0.0)
    g.add_argument('--gradient_clipping', type=finite_float, default=-1, help='max gradient norm (-1: off)')
    g.add_argument('--use_amp', action='store_true', help='bfloat16 autocast on CUDA')
    g.add_argument('--cuda_graph', action='store_true', help='capture the whole training step in a CUDA graph '
                   'after 3 eager steps and replay it (same results, several times faster; the default on CUDA)')
    g.add_argument('--eager', action='store_true', help='on CUDA, run the training step op by op instead of '
                   'replaying it from a CUDA graph (the synapse hypernetworks in their paper form)')
    g.add_argument('--tick', choices=('paper', 'fused', 'compiled'), help='the training step\'s ticks: '
                   'plastic.ctm_think (paper; the default on a CPU and with --eager), ctm_think_fast (fused: fewer, '
                   'wider ops, same results; the default on the captured CUDA path), or its tick torch.compile\'d '
                   '(compiled: the first step compiles, about 25 s on an H200; fastest on a GPU)')
    g.add_argument('--num_workers_train', type=nonneg_int, help='processes generating maze batches ahead (default 4 '
                   'on CUDA, 0 on a CPU)')
    g.add_argument('--track_every', type=nonneg_int, default=250,
                   help='held-out evaluation every this many steps (0: never)')
    g.add_argument('--n_test', type=positive_int, default=512, help='held-out examples (generated once, own seed)')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=('mazes-small', 'mazes-medium', 'mazes-large'),
                   help='the original\'s maze datasets\' image size (39, 39, 99 pixels)', **none)
    g.add_argument('--maze_size', type=odd_int, help='maze image side in pixels, odd (default 11; 39 = mazes-small)',
                   **none)
    g.add_argument('--maze_route_length', type=positive_int, help='route steps predicted (default 8)', **none)
    g.add_argument('--cirriculum_lookahead', type=positive_int, default=5, help='(sic, the original\'s name)')
    g.add_argument('--n_pngs', type=nonneg_int, default=4, help='maze pictures written at each evaluation')
    g.add_argument('--parity_sequence_length', type=positive_int, default=16)
    g.add_argument('--data_root', type=existing_dir, help='images: an ImageFolder directory or CIFAR-10 python pickles '
                   '(default: a generated set)')
    g.add_argument('--image_size', type=positive_int, default=16, help='images are resized to this (generated/folder)')
    g = p.add_argument_group('pictures (per-tick attention, routes, neurons, certainty; README)')
    g.add_argument('--visualize', action='store_true', help='only write the pictures of a checkpoint\'s model for '
                   '--n_pngs held-out examples, beside it in think/stepN/ (model flags come from the checkpoint)')
    g.add_argument('--ckpt', type=existing_file, help='the checkpoint --visualize reads (default LOG_DIR/ckpt.pt)')
    g.add_argument('--visualize_every', type=nonneg_int, default=0, help='while training: pictures every N steps '
                   'into LOG_DIR/think/stepN/ (0: never)')


def resolve_ctm_args(args):
    """Fill the flags left unset: explicit flag > --preset > task default > the small CPU default."""
    import plastic
    filled = dict(CTM_DEFAULTS, **CTM_TASK_DEFAULTS.get(args.ctm_task, {}), **CTM_PRESETS.get(args.preset) or {})
    if args.dataset is not None:
        filled['maze_size'] = plastic.MAZE_SIZES[args.dataset]
    for name, value in filled.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.hyper_layers not in (None, 'none') and not args.use_hyper:
        raise SystemExit(f'train.py ctm: --hyper_layers {args.hyper_layers} needs --use_hyper (the plastic synapses '
                         'are off without it)')
    if (args.backbone_type == 'parity_backbone') != (args.ctm_task == 'parity'):
        raise SystemExit(f'train.py ctm: --backbone_type {args.backbone_type} with --task {args.ctm_task}: expected '
                         'parity_backbone for parity (its inputs are a sequence of signs, not an image) and any '
                         'other backbone for images and mazes')
    args.hyper_layers = (args.hyper_layers or 'bottleneck') if args.use_hyper else 'none'
    return args


def resolve_ctm_device(args, device):
    """The defaults that depend on the device: on CUDA the captured fast path with fused ticks unless --eager, and
    maze batches made ahead by --num_workers_train processes (default 4 on CUDA, else 0: on a CPU they would compete
    with the step)."""
    if args.cuda_graph and args.eager:
        raise ValueError('--cuda_graph and --eager: expected one of them (on CUDA the captured path is the default)')
    if args.cuda_graph and device.type != 'cuda':
        raise ValueError('--cuda_graph: needs a CUDA device (use --device cuda or auto on a GPU)')
    args.cuda_graph = device.type == 'cuda' and not args.eager
    if args.tick is None:
        args.tick = 'fused' if args.cuda_graph else 'paper'
    if args.num_workers_train is None:
        args.num_workers_train = min(4, (os.cpu_count() or 1) - 1) if device.type == 'cuda' else 0
    return args


def ctm_maze_batch(seed, step, n, size, route_length, first=0):
    """Mazes first .. first+n-1 of training step `step`, maze i drawn from its own generator seeded (seed, step, i).

    The step's global batch is then one well-defined sequence of mazes whatever reads it: resuming, worker
    processes, and N data-parallel ranks (rank r of batch size B takes mazes r·B .. r·B+B-1), so N ranks at batch B
    train on exactly the mazes of one process at batch N·B, and a run can resume with another N."""
    import plastic
    xs, ys = zip(*(plastic.maze_batch(np.random.default_rng([seed, 0, step, i]), 1, size, route_length)[:2]
                   for i in range(first, first + n)))
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def ctm_task(args, rank=0):
    """-> (CTMConfig fields of the task, train_batch(step) -> (x, y), test set (x, y), loss(pred, cert, y)).

    train_batch(step) is data-parallel rank `rank`'s own batch, a function of (seed, step, rank)."""
    import plastic
    if args.ctm_task == 'mazes':
        route, size = args.maze_route_length, args.maze_size
        make = lambda rng, n: plastic.maze_batch(rng, n, size, route)
        fields = dict(out_dims=5 * route, prediction_reshaper=(route, 5), in_channels=3)
        loss = lambda pred, cert, y: plastic.maze_loss(pred.reshape(pred.shape[0], route, 5, -1), cert, y,
                                                       args.cirriculum_lookahead)[:2]
        test = make(np.random.default_rng([args.seed, 1]), args.n_test)
        batch = functools.partial(ctm_maze_batch, args.seed, n=args.batch_size, size=size, route_length=route,
                                  first=rank * args.batch_size)  # a partial, not a lambda: worker processes take it
        return fields, batch, test, loss
    if args.ctm_task == 'parity':
        n = args.parity_sequence_length
        fields = dict(out_dims=2 * n, prediction_reshaper=(n, 2), in_channels=1)
        loss = lambda pred, cert, y: plastic.parity_loss(pred.reshape(pred.shape[0], n, 2, -1), cert, y)
        test = plastic.parity_batch(make_generator(args.seed + 1), args.n_test, n)
        gen = torch.Generator().manual_seed(args.seed)
        seed = lambda step: int(np.random.default_rng([args.seed, step, rank]).integers(2**62))
        batch = lambda step: plastic.parity_batch(gen.manual_seed(seed(step)), args.batch_size, n)
        return fields, batch, test, loss
    if args.data_root and os.path.exists(os.path.join(args.data_root, 'data_batch_1')):
        try:
            (x, y), (tx, ty) = plastic.load_cifar10(args.data_root)
        except ValueError as e:
            raise SystemExit(f'--data_root: {e}') from None
    elif args.data_root:
        try:
            (x, y), (tx, ty), classes = plastic.load_image_folder(args.data_root, read_image, args.image_size)
        except (OSError, ValueError) as e:
            raise SystemExit(f'--data_root: {e}') from None
        if unheld := [c for k, c in enumerate(classes) if not (ty == k).any()]:
            raise SystemExit(f'--data_root {args.data_root}: no held-out image for class(es) {unheld}: without '
                             'train/ and test/ folders every 10th image of a class is held out (>= 10 per class)')
    else:
        x, y = plastic.generated_images(np.random.default_rng([args.seed, 0]), 20000, args.image_size)
        tx, ty = plastic.generated_images(np.random.default_rng([args.seed, 1]), args.n_test, args.image_size)
    n_classes = int(max(y.max(), ty.max())) + 1
    fields = dict(out_dims=n_classes, prediction_reshaper=(-1,), in_channels=3)

    def batch(step):
        idx = np.random.default_rng([args.seed, 0, step, rank]).integers(0, len(x), args.batch_size)
        return plastic.images_to_tensor(x[idx]), torch.from_numpy(y[idx])
    test = (plastic.images_to_tensor(tx[:args.n_test]), torch.from_numpy(ty[:args.n_test]))
    return fields, batch, test, plastic.classification_loss


def ctm_config(args, fields):
    import plastic
    return plastic.CTMConfig(
        iterations=args.iterations, d_model=args.d_model, d_input=args.d_input, heads=args.heads,
        n_synch_out=args.n_synch_out, n_synch_action=args.n_synch_action, synapse_depth=args.synapse_depth,
        memory_length=args.memory_length, deep_nlms=args.deep_memory, memory_hidden_dims=args.memory_hidden_dims,
        do_layernorm_nlm=args.do_normalisation, backbone_type=args.backbone_type,
        positional_embedding_type=args.positional_embedding_type, dropout=args.dropout, dropout_nlm=args.dropout_nlm,
        neuron_select_type=args.neuron_select_type, n_random_pairing_self=args.n_random_pairing_self,
        hyper_layers=args.hyper_layers if args.use_hyper else 'none', hyper_rank=args.hyper_rank,
        use_hyper_nlm=args.use_hyper_nlm, hyper_nlm_rank=args.hyper_nlm_rank, **fields)


# The seeds' parameter overheads (hyper_ctm_guide, hyper_nlm_guide) for d_model 1024, synapse_depth 8,
# memory_length 25, memory_hidden_dims 32: (hyper_layers, hyper_rank, hyper_nlm_rank or 0) -> their estimate.
SEEDS_HYPER_PARAMS = {('bottleneck', 8, 0): '≈100K', ('down', 8, 0): '≈500K', ('up', 8, 0): '≈500K',
                      ('all', 8, 0): '≈1M', ('none', 8, 4): '≈200K', ('none', 8, 8): '≈400K',
                      ('none', 8, 16): '≈800K', ('bottleneck', 8, 4): '≈300K', ('bottleneck', 8, 8): '≈500K',
                      ('all', 16, 8): '≈1.5M'}


def print_ctm_param_counts(args, fields):
    """The exact parameters each of the seeds' hyper configurations adds to the model the other flags describe."""
    import dataclasses
    import plastic
    base = dataclasses.replace(ctm_config(args, fields), hyper_layers='none', use_hyper_nlm=False)
    count = lambda cfg: sum(t.numel() for t in tree_leaves(plastic.init_ctm(cfg, make_generator(0))[0]))
    plain = count(base)
    seeds_example = (args.d_model, args.synapse_depth, args.memory_length, args.memory_hidden_dims,
                     args.deep_memory) == (1024, 8, 25, 32, True)
    print(f'plain CTM: {plain:,} parameters (d_model {args.d_model}, d_input {args.d_input}, synapse_depth '
          f'{args.synapse_depth}, memory_length {args.memory_length}, memory_hidden_dims {args.memory_hidden_dims}, '
          f'{"deep" if args.deep_memory else "shallow"} NLM)')
    print(f'{"hyper_layers":>12} {"rank":>4} {"nlm_rank":>8} {"added":>11} {"seeds":>6}')
    for (layers, rank, nlm_rank), approx in SEEDS_HYPER_PARAMS.items():
        cfg = dataclasses.replace(base, hyper_layers=layers, hyper_rank=rank, use_hyper_nlm=nlm_rank > 0,
                                  hyper_nlm_rank=max(nlm_rank, 1))
        print(f'{layers:>12} {rank if layers != "none" else "-":>4} {nlm_rank or "-":>8} {count(cfg) - plain:>11,} '
              f'{approx if seeds_example else "-":>6}')


def ctm_lr(args, step):
    """Linear warmup from 0, then (with --use_scheduler) cosine decay to 1e-7 at --training_iterations."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if not args.use_scheduler:
        return args.lr
    done = (step - args.warmup_steps) / max(args.training_iterations - args.warmup_steps, 1)
    return 1e-7 + (args.lr - 1e-7) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def write_maze_pngs(args, step, images, predicted, targets, scale=8):
    """A few held-out mazes with the predicted route drawn over them (paint_route, below)."""
    solved = (predicted == targets).all(1)
    order = np.argsort(~solved, kind='stable')[:args.n_pngs]
    for k, i in enumerate(order):
        big = upsample(images[i], scale)
        paint_route(big, images[i], predicted[i], scale, 0)
        write_png(os.path.join(args.log_dir, f'maze_step{step}_{k}_{"solved" if solved[i] else "unsolved"}.png'), big)


# ctm pictures: watch it think. `train.py ctm --visualize [--ckpt CKPT]` (or --visualize_every N while training)
# traces a few held-out examples tick by tick (plastic.ctm_trace) and writes, into LOG_DIR/think/stepN/:
#   exampleK_route.png      mazes: the true route (green) under the route predicted at the most certain tick
#                           (orange; blue where it runs into a wall)
#   exampleK_attention.png  an animated PNG, one frame per tick: the attention (mean over heads, upsampled from the
#                           feature map) in blue over the input, the route predicted at that tick (mazes), and two
#                           bars at the bottom: the tick (grey) and the certainty (green)
#   exampleK_ticks.png      the same frames for up to 16 ticks as one grid (for viewers without APNG)
#   exampleK_neurons.png    the post-activations of the 6 neurons that move most over the ticks (top) and the
#                           certainty per tick on [0, 1] with the most certain tick marked (bottom)
# Drawn into numpy arrays (no plotting library) and written by the stdlib PNG writer above.

PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                    (227, 119, 194), (23, 190, 207)], np.uint8)
HEAT = (30, 90, 255)  # attention; the maze's start is red, its goal green, routes orange/light green


def draw_line(canvas, x0, y0, x1, y1, colour):
    """Paint the pixels of the segment (x0, y0)-(x1, y1) (column, row; floats allowed): one pixel per step along
    the longer axis, the other coordinate rounded half up. Pixels off the canvas are skipped."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.floor(np.linspace(x0, x1, n) + 0.5).astype(int)
    ys = np.floor(np.linspace(y0, y1, n) + 0.5).astype(int)
    keep = (xs >= 0) & (xs < canvas.shape[1]) & (ys >= 0) & (ys < canvas.shape[0])
    canvas[ys[keep], xs[keep]] = colour


def line_plot(series, height, width, lo=None, hi=None, colours=PALETTE, margin=6, mark=None):
    """series (n, T) -> uint8 (height, width, 3): one polyline per row on a white canvas with left and bottom axes,
    x = tick, y scaled from [lo, hi] (default: the data's range); a grey line at y = 0 when it is in range, and a
    red vertical line at tick `mark` if given."""
    series = np.asarray(series, np.float64)
    lo = series.min() if lo is None else lo
    hi = series.max() if hi is None else hi
    hi = hi if hi > lo else lo + 1
    canvas = np.full((height, width, 3), 255, np.uint8)
    x = lambda t: margin + t * (width - 2 * margin - 1) / max(series.shape[1] - 1, 1)
    y = lambda v: height - 1 - margin - (v - lo) * (height - 2 * margin - 1) / (hi - lo)
    if lo < 0 < hi:
        draw_line(canvas, margin, y(0), width - margin, y(0), (200, 200, 200))
    draw_line(canvas, margin - 2, height - margin + 1, width - margin, height - margin + 1, (0, 0, 0))
    draw_line(canvas, margin - 2, margin, margin - 2, height - margin + 1, (0, 0, 0))
    for k, row in enumerate(series):
        for t in range(len(row) - 1):
            draw_line(canvas, x(t), y(row[t]), x(t + 1), y(row[t + 1]), colours[k % len(colours)])
    if mark is not None:
        draw_line(canvas, x(mark), margin, x(mark), height - 1 - margin, (214, 39, 40))
    return canvas


def feature_grid(s, h, w):
    """The (rows, cols) of a feature map of s positions over an h x w input: the factor pair nearest its aspect."""
    rows = min((r for r in range(1, s + 1) if s % r == 0), key=lambda r: abs(math.log(r * r / s * w / h)))
    return rows, s // rows


def input_pictures(x):
    """The model's inputs as uint8 pictures (B, H, W, 3): images in [-1, 1], or ±1 sequences (B, L) as a row of
    white (+1) and black (-1) pixels."""
    x = x.float().cpu()
    if x.dim() == 2:
        return np.repeat((x[:, None, :, None] > 0).numpy().astype(np.uint8) * 255, 3, axis=3)
    return ((x.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)


def upsample(image, scale):
    return np.repeat(np.repeat(image, scale, 0), scale, 1)


def paint_cells(big, cells, scale, colour, inset):
    """Fill the inner part (`inset` pixels in from each side) of the scaled-up pixels `cells` (row, col)."""
    for r, c in cells:
        big[r * scale + inset:(r + 1) * scale - inset, c * scale + inset:(c + 1) * scale - inset] = colour


def paint_route(big, image, moves, scale, inset):
    """Paint the route the moves walk from the maze's start onto its scaled-up picture: orange, and blue on the
    last cell when a move runs into a wall (paint_cells' inset)."""
    import plastic
    path = plastic.walk_route(image, moves)
    paint_cells(big, path[1:], scale, (255, 150, 0), inset)
    if len(path) - 1 < (np.asarray(moves) != plastic.WAIT).sum():
        paint_cells(big, path[-1:], scale, (0, 90, 255), inset)


def maze_route_picture(image, predicted, target, scale):
    """The maze with the true route (green) under the predicted one (orange, blue at a wall it runs into)."""
    import plastic
    big = upsample(image, scale)
    paint_cells(big, plastic.walk_route(image, target)[1:-1], scale, (120, 220, 120), 0)
    paint_route(big, image, predicted, scale, scale // 4)
    return big


def attention_frames(picture, attention, certainty, scale, routes=None):
    """picture uint8 (H, W, 3), attention (T, heads, S), certainty (T,) -> T frames: each tick's attention (mean over
    heads, scaled from its lowest to its highest weight: uniform attention shows nothing) upsampled onto the picture
    in blue, the tick's predicted route (a list of (row, col) per tick, mazes) in orange, and two bars below: tick
    (grey) and certainty (green)."""
    H, W = picture.shape[:2]
    rows, cols = feature_grid(attention.shape[-1], H, W)
    big = upsample(picture, scale).astype(np.float64)
    ys, xs = np.arange(H * scale) * rows // (H * scale), np.arange(W * scale) * cols // (W * scale)
    thick = max(scale // 2, 3)  # of each bar
    frames = []
    for t, weights in enumerate(attention.mean(1)):
        heat = (weights - weights.min()) / max(weights.max() - weights.min(), 1e-12)
        heat = heat.reshape(rows, cols)[ys][:, xs][..., None]
        frame = (big * (1 - 0.7 * heat) + np.array(HEAT) * 0.7 * heat).round().astype(np.uint8)
        if routes is not None:
            paint_cells(frame, routes[t], scale, (255, 150, 0), scale * 3 // 8)
        bars = np.full((2 * thick + 2, W * scale, 3), 255, np.uint8)
        bars[1:1 + thick, :round(W * scale * (t + 1) / len(attention))] = (110, 110, 110)
        bars[2 + thick:2 + 2 * thick, :round(W * scale * float(certainty[t]))] = (40, 170, 40)
        frames.append(np.concatenate([frame, bars]))
    return frames


def tick_grid(frames, most=16, per_row=4, gap=4):
    """Up to `most` frames, evenly spaced over the ticks (first and last included), tiled `per_row` to a row."""
    picks = sorted(set(np.linspace(0, len(frames) - 1, min(most, len(frames))).round().astype(int).tolist()))
    h, w = frames[0].shape[:2]
    n_rows = -(-len(picks) // per_row)
    grid = np.full((n_rows * (h + gap) - gap, min(len(picks), per_row) * (w + gap) - gap, 3), 255, np.uint8)
    for k, t in enumerate(picks):
        r, c = divmod(k, per_row)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frames[t]
    return grid


def neurons_picture(post, certainty, width=480, neurons=6):
    """post-activations (T, D), certainty (T,) -> the `neurons` neurons that vary most over ticks (top) and the
    certainty on [0, 1] with a vertical line at its most certain tick (bottom)."""
    picked = np.argsort(-post.std(0), kind='stable')[:neurons]
    top = line_plot(post[:, picked].T, 200, width)
    bottom = line_plot(certainty[None], 100, width, 0.0, 1.0, colours=PALETTE[2:3], mark=int(np.argmax(certainty)))
    return np.concatenate([top, np.full((8, width, 3), 255, np.uint8), bottom])


def write_ctm_pictures(params, buffers, cfg, task, x, y, out_dir):
    """Trace the examples x (held out) and write the pictures described above into out_dir -> the paths written."""
    import plastic
    with torch.no_grad():
        tr = {k: v.float().cpu().numpy() for k, v in plastic.ctm_trace(params, buffers, x, cfg).items()}
    os.makedirs(out_dir, exist_ok=True)
    pictures = input_pictures(x)
    scale = max(2, 320 // max(pictures.shape[1:3]))  # about 320 pixels on the longer side
    certain = tr['certainties'][..., 1]  # (T, B)
    written = []
    for b in range(len(x)):
        stem = os.path.join(out_dir, f'example{b}')
        routes = None
        if task == 'mazes':
            moves = tr['predictions'][:, b].reshape(len(certain), *cfg.prediction_reshaper).argmax(-1)  # (T, R)
            routes = [plastic.walk_route(pictures[b], m)[1:] for m in moves]
            write_png(f'{stem}_route.png', maze_route_picture(pictures[b], moves[certain[:, b].argmax()],
                                                              y[b].tolist(), scale))
            written.append(f'{stem}_route.png')
        frames = attention_frames(pictures[b], tr['attention'][:, b], certain[:, b], scale, routes)
        write_apng(f'{stem}_attention.png', frames)
        write_png(f'{stem}_ticks.png', tick_grid(frames))
        write_png(f'{stem}_neurons.png', neurons_picture(tr['post_activations'][:, b], certain[:, b]))
        written += [f'{stem}_attention.png', f'{stem}_ticks.png', f'{stem}_neurons.png']
    return written


# --visualize takes these from the checkpoint, beside CTM_MODEL_ARGS: they choose its held-out examples
CTM_PICTURE_ARGS = ('maze_size', 'image_size', 'data_root', 'seed')


def ctm_visualize(args, device):
    """--visualize: the pictures of a checkpoint's model for the first --n_pngs held-out examples of its task (the
    model and task flags are the checkpoint's), into think/stepN/ beside the checkpoint."""
    import plastic
    path = args.ckpt or checkpoint_path(args)
    if not os.path.isfile(path):
        raise SystemExit(f'train.py ctm --visualize: no checkpoint at {path} (give --ckpt CKPT or the run\'s --log_dir)')
    saved = read_checkpoint(path).get('args', {})
    for name in CTM_MODEL_ARGS + CTM_PICTURE_ARGS:
        if name in saved:
            setattr(args, name, saved[name])
    fields, _, (test_x, test_y, *_), _ = ctm_task(args)
    cfg = ctm_config(args, fields)
    params, buffers = plastic.init_ctm(cfg, make_generator(args.seed))
    try:
        step = load_checkpoint(path, params, buffers)['step']
    except ValueError as e:
        raise SystemExit(f'train.py ctm --visualize: {e}')
    params, buffers = tree_to(params, device), tree_to(buffers, device)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(path)), 'think', f'step{step}')
    written = write_ctm_pictures(params, buffers, cfg, args.ctm_task, test_x[:args.n_pngs].to(device),
                                 test_y[:args.n_pngs], out_dir)
    print(f'wrote {len(written)} pictures of {min(args.n_pngs, len(test_x))} held-out examples to {out_dir}')
    return written


def ctm_answer(predictions, chosen, cfg):
    """The class predicted at each example's most certain tick: (B,) for images, (B, steps) for mazes/parity."""
    picked = predictions[torch.arange(len(chosen), device=chosen.device), :, chosen]  # (B, out_dims)
    return picked.reshape(len(chosen), *cfg.prediction_reshaper).argmax(-1)


# The training step. At the seeds' mazes-small size one eager step issues tens of thousands of small kernels (50
# ticks x ~15 U-Net Linears, norms, NLM einsums, synchronisation, forward and backward), so the GPU waits on Python
# and launches. ctm_train_step is the whole step as one host-sync-free function, so that the plumbing's
# cuda_graph_step can capture it once and replay it, one launch per step: the fast path, the default on CUDA
# (with the fused ticks, plastic.ctm_think_fast; --tick paper captures the paper ticks with the synapse hypernetworks
# stacked, plastic.stack_hypernets). --eager runs the same function step by step.


def ctm_train_step(params, buffers, opt, x, y, cfg, task_loss, use_amp=False, gradient_clipping=-1, world=1,
                   stacked=False, tick='paper'):
    """One training step in place -> tensor [loss, accuracy] (averaged over ranks): forward over all ticks, task
    loss, backward, gradients all-reduced over `world` ranks, optional clipping, optimizer step, decay_params
    projected back into [0, 15] (the original's in-place clamp), batch-norm running statistics copied into
    `buffers` in place (a captured graph keeps reading the same tensors). stacked: the synapse hypernetworks' fast
    path (plastic.stack_hypernets); tick: --tick (fused and compiled stack them too). Nothing here waits for the GPU."""
    import plastic
    leaves = [p for group in opt.param_groups for p in group['params']]
    # cache_enabled=False: autocast's weight-cast cache would hold tensors across a CUDA graph's capture
    with torch.autocast(x.device.type, torch.bfloat16, enabled=use_amp and x.device.type == 'cuda',
                        cache_enabled=False):
        kv, new_buffers = plastic.ctm_features(params, buffers, x, cfg, train=True)
        think = (functools.partial(plastic.ctm_think, stacked=stacked) if tick == 'paper' else
                 functools.partial(plastic.ctm_think_fast, compile_backend='inductor' if tick == 'compiled' else None))
        predictions, certainties, _ = think(params, buffers, kv, cfg, train=True)
    loss, chosen = task_loss(predictions.float(), certainties.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_grads(leaves, world)
    if gradient_clipping > 0:
        torch.nn.utils.clip_grad_norm_(leaves, gradient_clipping)
    opt.step()
    with torch.no_grad():
        for name in ('decay_params_action', 'decay_params_out'):
            params[name].clamp_(0, 15)
        for old, new in zip(tree_leaves(buffers['backbone']), tree_leaves(new_buffers['backbone'])):
            old.copy_(new)
        metrics = torch.stack([loss.detach(), (ctm_answer(predictions, chosen, cfg) == y).float().mean()])
    return mean_over_ranks(metrics, world)


def ctm_stepper(params, buffers, opt, cfg, task_loss, args, world=1):
    """-> step(x, y) -> tensor [loss, accuracy]: ctm_train_step, ticks per args.tick; with args.cuda_graph replayed
    from a CUDA graph (paper ticks then on the stacked hypernetworks; the optimizer must be in
    optimizer_mode(opt, True, device))."""
    step = functools.partial(ctm_train_step, params, buffers, opt, cfg=cfg, task_loss=task_loss, use_amp=args.use_amp,
                             gradient_clipping=args.gradient_clipping, world=world, stacked=args.cuda_graph,
                             tick=args.tick)
    return cuda_graph_step(step) if args.cuda_graph else step


def ctm_evaluate(params, buffers, cfg, test, task_loss, args, device):
    """Held-out loss and accuracy per answer step; whole-answer solve rate for mazes and parity. -> (metrics,
    answers (N, ...)): the paper form (ctm_forward), batch by batch, without gradients."""
    import plastic
    test_x, test_y = test[:2]
    answers, losses = [], []
    with torch.no_grad(), torch.autocast('cuda', torch.bfloat16, enabled=args.use_amp and device.type == 'cuda'):
        for i in range(0, len(test_x), args.batch_size_test):
            x, y = test_x[i:i + args.batch_size_test].to(device), test_y[i:i + args.batch_size_test].to(device)
            predictions, certainties, _ = plastic.ctm_forward(params, buffers, x, cfg)
            loss, chosen = task_loss(predictions.float(), certainties.float(), y)
            answers.append(ctm_answer(predictions, chosen, cfg).cpu())
            losses.append(loss.item())
    answers = torch.cat(answers)
    correct = answers == test_y
    metrics = {'loss': float(np.mean(losses)), 'step_acc': correct.float().mean().item()}
    if args.ctm_task != 'images':
        metrics['solve_rate'] = correct.flatten(1).all(1).float().mean().item()
    return metrics, answers


def run_ctm(args):
    """Set up (flags, ranks, data, model, optimizer, checkpoint), then the loop: a training step per batch,
    held-out evaluation every --track_every steps, a checkpoint every --save_every steps and at the end."""
    import plastic
    # set up
    args = resolve_ctm_args(args)
    rank, world, device = setup_distributed(args.device)
    quiet_unless_rank0(rank)
    try:
        args = resolve_ctm_device(args, device)
    except ValueError as e:
        raise SystemExit(f'train.py ctm {e}')
    if device.type == 'cuda':
        torch.set_float32_matmul_precision('high')
    if args.visualize:
        return ctm_visualize(args, device)
    gen = make_generator(args.seed)
    fields, train_batch, test, task_loss = ctm_task(args, rank)
    if args.count_params:
        return print_ctm_param_counts(args, fields)
    try:
        cfg = ctm_config(args, fields)
        params, buffers = plastic.init_ctm(cfg, gen)
    except ValueError as e:
        raise SystemExit(f'train.py ctm: {e}')
    params, buffers = tree_to(params, device, requires_grad=True), tree_to(buffers, device)
    leaves = tree_leaves(params)
    opt = torch.optim.AdamW(leaves, lr=args.lr, weight_decay=args.weight_decay, eps=1e-8)
    path = checkpoint_path(args)
    start = 0
    claim_log_dir(args)
    if args.resume and os.path.exists(path):
        try:
            start = load_checkpoint(path, params, buffers, opt, args, must_match=CTM_MODEL_ARGS)['step']
        except ValueError as e:
            raise SystemExit(f'train.py ctm --resume: {e}')
        print(f'resumed from {path} at step {start}')
    optimizer_mode(opt, args.cuda_graph, device)
    train_step = ctm_stepper(params, buffers, opt, cfg, task_loss, args, world)
    print(f'ctm | task {args.ctm_task} | {sum(t.numel() for t in leaves):,} parameters | device {device} | '
          + (f'{world} ranks x batch {args.batch_size} | ' if world > 1 else '')
          + ('CUDA graph (--eager: step by step) | ' if args.cuda_graph else 'eager | ')
          + (f'{args.tick} tick | ' if args.tick != 'paper' else '')
          + f'{cfg.iterations} ticks, d_model {cfg.d_model}, backbone {cfg.backbone_type}'
          + (f' | mazes {args.maze_size}x{args.maze_size}, route {args.maze_route_length}'
             if args.ctm_task == 'mazes' else ''), flush=True)

    # the loop: one step per batch
    def train(step):
        lr = ctm_lr(args, step)
        set_lr(opt, lr)
        x, y = (torch.as_tensor(t).to(device, non_blocking=True) for t in batch(step))
        loss, accuracy = train_step(x, y).tolist()
        if args.visualize_every and (step + 1) % args.visualize_every == 0 and rank == 0:
            write_ctm_pictures(params, buffers, cfg, args.ctm_task, test[0][:args.n_pngs].to(device),
                               test[1][:args.n_pngs], os.path.join(args.log_dir, 'think', f'step{step + 1}'))
        metrics = {'loss': loss, 'acc': accuracy, 'lr': lr}
        if device.type == 'cuda':
            metrics['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    # evaluate on the held-out set (and draw a few of its mazes)
    def evaluate(step):
        metrics, answers = ctm_evaluate(params, buffers, cfg, test, task_loss, args, device)
        if args.ctm_task == 'mazes' and args.n_pngs:
            write_maze_pngs(args, step, test[2], answers.numpy(), test[1].numpy())
        return metrics

    # save
    def save(step):
        save_checkpoint(path, {'params': params, 'buffers': buffers, 'opt': opt.state_dict(), 'step': step,
                               'args': vars(args)})

    lead = rank == 0  # the other ranks only train
    workers = args.num_workers_train if args.ctm_task == 'mazes' else 0  # the other tasks' batches are cheap
    try:
        with batches_ahead(train_batch, workers, args.training_iterations) as batch:
            run_loop(args.training_iterations, start, train, save if lead else (lambda step: None), args.log_every,
                     args.save_every, args.track_every if lead else 0, evaluate,
                     MetricsLog(os.path.join(args.log_dir, 'metrics.jsonl')) if lead else None)
        wait_for_ranks(world, device)
    finally:
        train_step = None  # a captured graph holds NCCL work: free it before its communicator
        end_distributed(world)


# ----------------------------------------------------------------------------------------------------------------
# lash: LASH layer-weighted transformer LM (lash.py)

LASH_MODEL_ARGS = ('data', 'seq_len', 'dim', 'num_heads', 'ffn_dim')


def add_lash_model_args(p, epochs):
    """Model, data and optimiser flags shared by `lash` and `ashem`."""
    p.add_argument('--data', type=existing_file, default=None,
                   help='UTF-8 text file (byte-level tokens); default: the built-in corpus, '
                   "Python's own documentation topics (pydoc_data), which every CPython has")
    p.add_argument('--seq_len', type=positive_int, default=128)
    p.add_argument('--batch_size', type=positive_int, default=32)
    p.add_argument('--dim', type=positive_int, default=64)
    p.add_argument('--num_heads', type=positive_int, default=4)
    p.add_argument('--ffn_dim', type=nonneg_int, default=0, help='SwiGLU feed-forward hidden width; 0: 4 * dim')
    p.add_argument('--lr', type=positive_float, default=1e-3, help='base learning rate (AdamW)')
    p.add_argument('--weight_decay', type=nonneg_float, default=0.0)
    p.add_argument('--max_epochs', type=positive_int, default=epochs,
                   help='an epoch is one pass over the training split; --training_iterations caps the steps')


def add_lash_args(p):
    add_common_args(p, 'runs/lash', 600)
    add_lash_model_args(p, 10)
    p.add_argument('--num_layers', type=positive_int, default=4)
    p.add_argument('--layer_weights', default=None,
                   help="loss weight per layer, e.g. 1:0,2:0,3:1 (every layer 1..num_layers); default: the last "
                        "layer only; 'deep' = uniform deep supervision")
    p.add_argument('--layer_lr_scales', default=None, help='lr scale per layer, e.g. 1:1,2:0.5 (missing: 1.0)')
    p.add_argument('--routing_threshold', type=probability, default=None,
                   help='evaluate with early exit: a token leaves at --exit_layer when its max softmax prob >= this')
    p.add_argument('--exit_layer', type=positive_int, default=None,
                   help='default: the lowest layer with a non-zero loss weight')
    p.add_argument('--patience', type=positive_int, default=1, help='early stopping: epochs without val improvement')
    p.add_argument('--generate', default=None, metavar='PROMPT',
                   help='do not train: continue PROMPT from --ckpt token by token (KV cache; early exit with '
                        '--routing_threshold) and print it')
    p.add_argument('--ckpt', type=existing_file, default=None,
                   help='checkpoint for --generate (default LOG_DIR/train.pt)')
    p.add_argument('--max_new_tokens', type=positive_int, default=None,
                   help="default: up to the checkpoint's --seq_len (RoPE positions beyond it were never trained)")
    p.add_argument('--temperature', type=nonneg_float, default=0.0, help='--generate: 0 is greedy; > 0 samples')


def parse_layer_dict(text, flag):
    try:
        return {int(k): float(v) for k, v in (item.split(':') for item in text.split(','))}
    except ValueError:
        raise SystemExit(f"--{flag}: expected 'layer:value,...' such as 1:0,2:0,3:1, got {text!r}") from None


def lash_setup(args):
    """Device, byte tokens split train/val/test, eval batches on the device."""
    import lash
    device = pick_device(args.device)
    if args.seq_len < 1 or args.batch_size < 1:
        raise SystemExit(f"--seq_len/--batch_size: expected positive ints, got {args.seq_len}, {args.batch_size}")
    try:
        train_tokens, val_tokens, test_tokens = lash.split_corpus(lash.load_corpus(args.data))
        to_device = lambda batches: [tuple(t.to(device) for t in b) for b in batches]
        val = to_device(lash.batch_windows(lash.make_windows(val_tokens, args.seq_len), args.batch_size))
        test = to_device(lash.batch_windows(lash.make_windows(test_tokens, args.seq_len), args.batch_size))
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"--data: {e}") from None
    print(f'data: {args.data or "built-in pydoc_data topics"}: {len(train_tokens)} train / {len(val_tokens)} val '
          f'/ {len(test_tokens)} test bytes', flush=True)
    return device, train_tokens, val, test, to_device


def lash_train_batches(args, tokens, to_device):
    """-> epoch -> that epoch's shuffled training batches (seeded by --seed), on the device."""
    import lash
    return lambda epoch: to_device(lash.epoch_batches(tokens, args.seq_len, args.batch_size, args.seed, epoch))


def lash_model(args, num_layers, gen, device):
    import lash
    try:
        cfg = lash.ModelConfig(dim=args.dim, num_layers=num_layers, num_heads=args.num_heads, ffn_dim=args.ffn_dim)
    except ValueError as e:
        raise SystemExit(f'--dim/--num_heads/--ffn_dim: {e}') from None
    params = tree_to(lash.init_transformer(cfg, gen), device, True)
    return cfg, params


def lash_fit(args, stage, params, loss_fn, opt, train_batches, val_fn, max_epochs, patience, max_steps,
             must_match):
    """Run lash.train_with_early_stopping as a resumable stage: LOG_DIR/<stage>.pt holds params, optimizer and the
    early-stopping state after every epoch, every --save_every steps and on Ctrl-C; a finished stage is skipped
    on --resume."""
    import lash
    path = os.path.join(args.log_dir, f'{stage}.pt')
    state = lash.new_training_state()
    if args.resume and os.path.exists(path):
        payload = load_checkpoint(path, params, opt=opt, args=args, must_match=must_match)
        state = payload['state']
        device = tree_leaves(params)[0].device
        state['best_params'] = [t.to(device) for t in state['best_params']]
        print(f'{stage}: resumed at step {state["step"]}, epoch {state["epoch"]} from {path}', flush=True)
        if payload.get('done'):
            return state
    log = MetricsLog(os.path.join(args.log_dir, 'metrics.jsonl'))
    steps_per_epoch = len(train_batches(0))
    progress = Progress(min(max_steps, max_epochs * steps_per_epoch), state['step'])

    def save(done=False):
        save_checkpoint(path, {'params': params, 'opt': opt.state_dict(), 'step': state['step'], 'state': state,
                               'args': vars(args), 'done': done})

    def on_step(state, loss):
        log.write(stage=stage, step=state['step'], loss=loss)
        check_finite_loss(state['step'], loss)
        if state['step'] % args.log_every == 0:
            print(f'{stage} | ' + progress.line(state['step'], epoch=state['epoch'] + 1, loss=loss), flush=True)
        if state['step'] % args.save_every == 0:
            save()

    def on_epoch(state, val_loss):
        log.write(stage=stage, step=state['step'], epoch=state['epoch'], val_loss=val_loss)
        print(f'{stage} | epoch {state["epoch"]} | step {state["step"]} | val_loss {val_loss:.4f} | '
              f'best {state["best_loss"]:.4f} (epoch {state["best_epoch"]})'
              + (' | early stop' if state['stopped'] else ''), flush=True)
        save()

    try:
        lash.train_with_early_stopping(params, loss_fn, opt, train_batches, val_fn, max_epochs, patience,
                                       max_steps, state, on_step, on_epoch)
    except Diverged:
        raise
    except BaseException:
        save()
        print(f'{stage}: interrupted at step {state["step"]}: checkpoint saved, rerun with --resume to continue',
              file=sys.stderr)
        raise
    save(done=True)
    print(f'{stage}: done after {state["step"]} steps; best val_loss {state["best_loss"]:.4f} '
          f'(epoch {state["best_epoch"]}) restored', flush=True)
    return state


def lash_training_config(args, n):
    """--layer_weights/--layer_lr_scales/--routing_threshold/--exit_layer -> lash.TrainingConfig for n layers."""
    import lash
    text = getattr(args, 'layer_weights', None)
    if text == 'deep':
        weights = lash.create_deep_supervision_config(n).layer_weights
    else:
        weights = parse_layer_dict(text, 'layer_weights') if text else lash.create_standard_config(n).layer_weights
    scales = getattr(args, 'layer_lr_scales', None)
    scales = parse_layer_dict(scales, 'layer_lr_scales') if scales else None
    try:
        config = lash.TrainingConfig(weights, scales, args.routing_threshold, args.exit_layer)
        if config.num_layers != n:
            raise ValueError(f'they name {config.num_layers} layers, --num_layers is {n}')
    except ValueError as e:
        raise SystemExit(f'--layer_weights/--layer_lr_scales/--routing_threshold/--exit_layer: {e}') from None
    return config


def lash_load(path, device):
    """A `lash` or `ashem` checkpoint -> (cfg, params, the args it was trained with): the model is rebuilt from
    those args and the number of saved layers."""
    payload = read_checkpoint(path)
    try:
        saved, num_layers = payload['args'], len(payload['params']['layers'])
        cfg, params = lash_model(argparse.Namespace(**saved), num_layers, torch.Generator(), device)
        load_into(payload['params'], params, 'params')
    except (KeyError, TypeError, ValueError) as e:
        raise BadFile(f'checkpoint {path}: not a lash/ashem checkpoint ({type(e).__name__}: {e})') from None
    return cfg, params, saved


def run_lash(args):
    import lash
    if args.generate is not None:
        return lash_generate(args)
    device, train_tokens, val, test, to_device = lash_setup(args)
    claim_log_dir(args)
    gen = make_generator(args.seed)
    cfg, params = lash_model(args, args.num_layers, gen, device)
    config = lash_training_config(args, args.num_layers)
    opt = lash.create_optimizer(params, config, args.lr, args.weight_decay)
    print(f'LASH: {cfg.num_layers} layers, dim {args.dim}; weights {config.layer_weights}; lr scales '
          f'{config.layer_lr_scales}; '
          f'{"fast path (head once)" if config.last_layer_only else "general path (head after every layer)"}',
          flush=True)
    full = lash.TrainingConfig(config.layer_weights, config.layer_lr_scales)
    state = lash_fit(args, 'train', params, lambda p, b: lash.compute_loss(p, b, config, cfg), opt,
                     lash_train_batches(args, train_tokens, to_device),
                     lambda p: lash.evaluate(p, val, full, cfg)['loss'], args.max_epochs, args.patience,
                     args.training_iterations, LASH_MODEL_ARGS + ('num_layers', 'layer_weights', 'layer_lr_scales'))
    rows = []
    for split, batches in (('val', val), ('test', test)):
        for mode, c in (('full', full), ('routed', config)) if config.routing_threshold else (('full', full),):
            rows.append(dict(split=split, mode=mode, steps=state['step'], **lash.evaluate(params, batches, c, cfg)))
    print(f'\nLASH results (exit layer {config.exit_layer}, threshold {config.routing_threshold}):')
    print_rows(rows, ['split', 'mode', 'steps', 'loss', 'ppl', 'accuracy', 'exit_rate', 'exited_accuracy',
                      'continued_accuracy', 'compute_cost', 'flop_cost'])
    if config.routing_threshold:
        print(f'wall time, paired: python bench.py lash_exit --ckpt {os.path.join(args.log_dir, "train.pt")} '
              f'--exit_layer {config.exit_layer} --thresholds {config.routing_threshold}')
    with open(os.path.join(args.log_dir, 'results.json'), 'w') as f:
        json.dump({'argv': sys.argv, 'rows': rows}, f, indent=1)
    return rows


def lash_generate(args):
    """`--generate PROMPT`: continue the prompt's bytes from a trained checkpoint with lash.generate."""
    import lash
    if not args.generate:
        raise SystemExit('--generate: expected a non-empty prompt')
    device = pick_device(args.device)
    path = args.ckpt or os.path.join(args.log_dir, 'train.pt')
    cfg, params, saved = lash_load(path, device)
    config = lash_training_config(argparse.Namespace(**dict(saved, routing_threshold=args.routing_threshold,
                                                            exit_layer=args.exit_layer)), cfg.num_layers)
    prompt = torch.tensor([list(args.generate.encode('utf-8'))], device=device)
    n = args.max_new_tokens or max(saved['seq_len'] - prompt.shape[1], 16)
    gen = make_generator(args.seed, device)
    t0 = time.perf_counter()
    try:
        tokens, exit_mask = lash.generate(params, prompt, cfg, config, n, args.temperature, gen)
    except ValueError as e:
        raise SystemExit(f'--generate/--max_new_tokens/--temperature: {e}') from None
    seconds = time.perf_counter() - t0
    print(bytes(tokens[0].tolist()).decode('utf-8', errors='replace'))
    routing = (f'exit rate {exit_mask.float().mean().item():.1%} at layer {config.exit_layer} (threshold '
               f'{config.routing_threshold})' if config.routing_threshold else 'full depth')
    print(f'\n{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s, '
          f'first call, warm-up included; paired figures: python bench.py lash_generate); {routing}', flush=True)
    return tokens, exit_mask


# ----------------------------------------------------------------------------------------------------------------
# ashem: two-phase hard-example training (lash.py)

def add_ashem_args(p):
    add_common_args(p, 'runs/ashem', 300, 'training steps per phase (phase 1 and phase 2 each; the baselines '
                    'get their sum)')
    add_lash_model_args(p, 10)
    p.add_argument('--phase1_layers', type=positive_int, default=2)
    p.add_argument('--phase2_layers', type=positive_int, default=4)
    p.add_argument('--hard_example_ratio', type=flag_type(float, above=0, high=1), default=0.5,
                   help='fraction of training tokens, the least confident after phase 1, that phase 2 trains on')
    p.add_argument('--phase1_patience', type=positive_int, default=1)
    p.add_argument('--phase2_patience', type=positive_int, default=3)
    p.add_argument('--phase2_lr_scale', type=positive_float, default=1.0,
                   help='phase-2 lr = --lr times this (the seed used 0.1 with a much longer phase 2; see README)')


def run_ashem(args):
    """Phase 1, mining, phase 2, the two baselines (same total steps, all data), then the comparison on the test
    split. Each training stage is its own checkpoint in LOG_DIR, so --resume continues where it stopped."""
    import lash
    device, train_tokens, val, test, to_device = lash_setup(args)
    claim_log_dir(args)
    try:
        acfg = lash.ASHEMConfig(args.phase1_layers, args.hard_example_ratio, args.phase2_layers,
                                args.phase1_patience, args.phase2_patience, args.phase2_lr_scale)
    except ValueError as e:
        raise SystemExit(f'--phase1_layers/--phase2_layers/--hard_example_ratio/--*_patience/--phase2_lr_scale: '
                         f'{e}') from None
    p1, p2 = acfg.phase1_layers, acfg.phase2_layers
    must_match = LASH_MODEL_ARGS + ('phase1_layers', 'phase2_layers', 'hard_example_ratio')
    train_batches = lash_train_batches(args, train_tokens, to_device)

    def fit_all_data(stage, num_layers, seed_offset, patience, max_steps, max_epochs):
        cfg, params = lash_model(args, num_layers, make_generator(args.seed + seed_offset), device)
        config = lash.create_standard_config(num_layers)
        opt = lash.create_optimizer(params, config, args.lr, args.weight_decay)
        state = lash_fit(args, stage, params, lambda p, b: lash.compute_loss(p, b, config, cfg), opt, train_batches,
                         lambda p: lash.evaluate(p, val, config, cfg)['loss'], max_epochs, patience, max_steps,
                         must_match)
        return cfg, params, state

    cfg1, params1, state1 = fit_all_data('phase1', p1, 0, acfg.phase1_patience, args.training_iterations,
                                         args.max_epochs)

    windows = lash.make_windows(train_tokens, args.seq_len)  # fixed windows: a token's context decides its score
    conf = torch.cat([c.cpu() for c in lash.token_confidence(params1, to_device(
        lash.batch_windows(windows, args.batch_size)), cfg1, p1)])
    hard, threshold = lash.mine_hard_examples(conf, acfg.hard_example_ratio)
    print(f'mining: {int(hard.sum())} of {hard.numel()} training tokens are hard; routing threshold (max softmax '
          f'prob after layer {p1}) {threshold:.4f}', flush=True)

    params2, cfg2 = lash.grow_transformer(params1, cfg1, p2, make_generator(args.seed + 1))
    routed = lash.TrainingConfig({l: float(l == p2) for l in range(1, p2 + 1)}, routing_threshold=threshold,
                                 exit_layer=p1)
    opt2 = lash.create_optimizer(params2, routed, args.lr * acfg.phase2_lr_scale, args.weight_decay)
    state2 = lash_fit(args, 'phase2', params2, lambda p, b: lash.ashem_loss(p, b, cfg2, p1), opt2,
                      lambda epoch: to_device(lash.batch_windows(
                          windows, args.batch_size, torch.Generator().manual_seed(args.seed * 100003 + epoch), ~hard)),
                      lambda p: lash.evaluate(p, val, routed, cfg2)['loss'], args.max_epochs, acfg.phase2_patience,
                      args.training_iterations, must_match)

    budget = state1['step'] + state2['step']
    print(f'baselines: {budget} steps each (phase 1 {state1["step"]} + phase 2 {state2["step"]}), all data, no '
          f'early stop, best val epoch restored', flush=True)
    _, small, state_small = fit_all_data('baseline_small', p1, seed_offset=2, patience=budget, max_steps=budget,
                                         max_epochs=budget)
    _, large, state_large = fit_all_data('baseline_large', p2, seed_offset=3, patience=budget, max_steps=budget,
                                         max_epochs=budget)

    hard_test = [c < threshold for c in lash.token_confidence(params1, test, cfg1, p1)]
    results = [(f'{p1}-layer baseline', state_small['step'],
                lash.evaluate(small, test, lash.create_standard_config(p1), cfg1, hard_test), p1),
               (f'{p2}-layer baseline', state_large['step'],
                lash.evaluate(large, test, lash.create_standard_config(p2), cfg2, hard_test), p2),
               (f'ASHEM phase 1 only ({p1} layers)', state1['step'],
                lash.evaluate(params1, test, lash.create_standard_config(p1), cfg1, hard_test), p1),
               (f'ASHEM two-stage ({p1}+{p2 - p1} layers)', budget,
                lash.evaluate(params2, test, routed, cfg2, hard_test), p2)]
    full_flops = results[1][2]['flops']
    rows = [dict(model=name, steps=steps, ppl=s['ppl'], hard_ppl=s['hard_ppl'], easy_ppl=s['easy_ppl'],
                 accuracy=s['accuracy'], deep_rate=1 - s['exit_rate'] if L == p2 else 0.0,
                 compute_cost=s['token_layers'] / (s['tokens'] * p2), flop_cost=s['flops'] / full_flops)
            for name, steps, s, L in results]
    print(f'\nASHEM on the test split ({results[0][2]["tokens"]} tokens; hard = phase-1 confidence < '
          f'{threshold:.4f}: {results[0][2]["hard_fraction"]:.1%} of them); compute cost = layers run / '
          f'(tokens x {p2}), flop_cost = FLOPs / the {p2}-layer model\'s; wall time: python bench.py lash_exit '
          f'--ckpt {os.path.join(args.log_dir, "phase2.pt")} --exit_layer {p1} --thresholds {threshold!r}):')
    print_rows(rows, ['model', 'steps', 'ppl', 'hard_ppl', 'easy_ppl', 'accuracy', 'deep_rate', 'compute_cost',
                      'flop_cost'])
    ashem, base1, phase1 = rows[3], rows[0], rows[2]
    print(f'hard PPL: {ashem["hard_ppl"] / phase1["hard_ppl"] - 1:+.1%} vs phase 1 alone, '
          f'{ashem["hard_ppl"] / base1["hard_ppl"] - 1:+.1%} vs the {p1}-layer baseline, '
          f'{ashem["hard_ppl"] / rows[1]["hard_ppl"] - 1:+.1%} vs the {p2}-layer baseline; '
          f'counted work {ashem["compute_cost"] - 1:+.1%} (layers run), {ashem["flop_cost"] - 1:+.1%} (FLOPs) vs '
          f'the {p2}-layer model, not wall time (seed, WikiText-2: hard PPL -78%, "compute" -36%)')
    with open(os.path.join(args.log_dir, 'results.json'), 'w') as f:
        json.dump({'argv': sys.argv, 'threshold': threshold, 'rows': rows}, f, indent=1)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# hpcm: HPCM + RWKV learned image codec (hpcm.py)

def add_hpcm_args(p):
    add_common_args(p, 'runs/hpcm', 200)
    p.add_argument('--phase', type=int, default=3, choices=(0, 1, 2, 3),
                   help='0: HPCM baseline cells; 1: RWKV cell at s3; 2: at all scales; 3: plus RWKV context_net')
    p.add_argument('--preset', default='auto', choices=('auto', 'small', 'full'),
                   help='full: M=320, N=256 (the paper); small: M=N=32 for CPU runs; auto: full on CUDA, else small')
    p.add_argument('--data', type=existing_dir, default=None,
                   help='folder of png/ppm training images (default: generated images)')
    p.add_argument('--eval_data', type=existing_dir, default=None,
                   help='folder of held-out images (default: generated, other seed)')
    p.add_argument('--eval', type=existing_file, default=None, metavar='CKPT',
                   help='only evaluate this checkpoint on --eval_data/--data')
    p.add_argument('--compress', nargs=2, default=None, metavar=('IMAGE', 'OUT'),
                   help='code the png/ppm IMAGE into the stream OUT with the model of --ckpt')
    p.add_argument('--decompress', nargs=2, default=None, metavar=('IN', 'PNG'),
                   help='decode the stream IN into the PNG file PNG with the model of --ckpt')
    p.add_argument('--ckpt', type=existing_file, default=None,
                   help='checkpoint for --compress/--decompress (ckpt.pt or model.pt)')
    p.add_argument('--quality', type=int, default=None, choices=range(1, 7),
                   help='pick lambda from CompressAI\'s list (1..6); overrides --lmbda')
    p.add_argument('--lmbda', type=positive_float, default=0.0130,
                   help='rate-distortion trade-off: λ·255²·MSE + bpp')
    p.add_argument('--lr', type=positive_float, default=1e-4)
    p.add_argument('--batch_size', type=positive_int, default=None, help='per rank; default: 8 full, 4 small')
    p.add_argument('--patch_size', type=positive_int, default=None,
                   help='training crop side (default: 256 full, 64 small)')
    p.add_argument('--clip_max_norm', type=finite_float, default=1.0, help='max gradient norm (<= 0: off)')
    p.add_argument('--num_images', type=positive_int, default=64, help='size of the generated training set')
    p.add_argument('--eval_images', type=positive_int, default=4, help='how many generated held-out images')
    p.add_argument('--eval_size', type=positive_int, nargs=2, default=None, metavar=('H', 'W'),
                   help='size of generated held-out images (default: 256 256 full, 128 128 small)')
    p.add_argument('--eval_every', type=nonneg_int, default=100, help='0: never')
    p.add_argument('--grad_checkpoint', action='store_true', help='gradient checkpointing in the RWKV fusion nets')
    p.add_argument('--channels_last', action='store_true',
                   help='keep images and conv weights in NHWC layout (cuDNN speed on GPUs; the same values)')
    p.add_argument('--tf32', action='store_true', help='TF32 matmuls on CUDA (convolutions use TF32 by default)')


def hpcm_error(message):
    """A user's mistake (a flag, a file): one line on stderr, exit status 2."""
    print(f'train.py hpcm: error: {message}', file=sys.stderr)
    sys.exit(2)


def hpcm_config(args, hpcm):
    if args.preset == 'full':
        return hpcm.HPCMConfig(phase=args.phase, checkpoint=args.grad_checkpoint)
    return hpcm.HPCMConfig.small(args.phase, checkpoint=args.grad_checkpoint)


def hpcm_images(folder, what):
    """Every png/ppm/pgm of a folder, decoded once -> (uint8 (H, W, 3) arrays, file names)."""
    if not os.path.isdir(folder):
        hpcm_error(f"{what} {folder}: not a folder")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.ppm', '.pgm')))
    if not names:
        hpcm_error(f"{what} {folder}: no .png/.ppm/.pgm images in this folder")
    try:
        return [read_image(os.path.join(folder, f)) for f in names], names
    except ValueError as e:
        hpcm_error(f"{what}: {e}")


def hpcm_batch(images, args, step, rank=0, world=1):
    """This rank's share of step `step`'s global batch of random crops: every rank draws the same world * batch
    crops (a generator seeded by seed and step, so a resumed run sees the data it would have seen) and keeps its
    slice."""
    import hpcm
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    crops = hpcm.random_crops(images, args.patch_size, args.batch_size * world, gen)
    return crops[rank * args.batch_size:(rank + 1) * args.batch_size]


def load_for_inference(path, device='cpu'):
    """A checkpoint written by `train.py hpcm` (ckpt.pt, or model.pt without the optimizer) -> (params, cfg) on
    `device`, ready for hpcm.make_coder. Refuses, naming the file, anything else."""
    import hpcm
    payload = read_checkpoint(path)
    if not isinstance(payload.get('hpcm_config'), dict):
        raise ValueError(f"checkpoint {path}: not a checkpoint of train.py hpcm (no model config in it)")
    try:
        cfg = hpcm.HPCMConfig(**payload['hpcm_config'])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path}: its model config is not valid ({e})") from None
    params = hpcm.init_hpcm(cfg, torch.Generator().manual_seed(0))
    load_into(payload.get('params', {}), params, f'{path} params')
    return tree_to(params, device), cfg


def hpcm_code_files(args):
    """--compress IMAGE OUT / --decompress IN PNG with the model of --ckpt."""
    import hpcm
    if args.ckpt is None:
        hpcm_error('--compress/--decompress need --ckpt (a ckpt.pt or model.pt of train.py hpcm)')
    device = pick_device(args.device)
    try:
        params, cfg = load_for_inference(args.ckpt, device)
    except (OSError, ValueError) as e:
        hpcm_error(f'--ckpt: {e}')
    coder = hpcm.make_coder(params, cfg)
    source, target = args.compress or args.decompress
    try:
        if args.compress:
            x = hpcm.image_to_tensor(read_image(source))
            data = hpcm.compress(coder, x)
            write_file_atomic(target, data)
            print(f'{source} ({x.shape[3]}x{x.shape[2]}) -> {target}: {len(data):,} bytes, '
                  f'{8 * len(data) / (x.shape[2] * x.shape[3]):.4f} bpp')
        else:
            with open(source, 'rb') as f:
                x_hat = hpcm.decompress(coder, f.read())
            write_png(target, hpcm.tensor_to_image(x_hat))
            print(f'{source} -> {target} ({x_hat.shape[3]}x{x_hat.shape[2]})')
    except (OSError, ValueError) as e:
        hpcm_error(f'{"--compress" if args.compress else "--decompress"}: {e}')


def hpcm_code_timed(hpcm, coder, x, sync):
    """The encoder's reconstruction (hpcm_forward as compress computes it), compress, decompress, each timed ->
    {'forward_s', 'enc_s', 'dec_s', 'bpp_est', 'data', 'decoded', 'exact': decoded == the encoder's}."""
    sync()
    t0 = time.perf_counter()
    with torch.no_grad(), hpcm.deterministic(x.device):
        x_hat, _, bpp = hpcm.hpcm_forward(coder.params, x, coder.cfg)
    sync()
    t1 = time.perf_counter()
    data = hpcm.compress(coder, x)
    sync()
    t2 = time.perf_counter()
    decoded = hpcm.decompress(coder, data)
    sync()
    t3 = time.perf_counter()
    return {'forward_s': t1 - t0, 'enc_s': t2 - t1, 'dec_s': t3 - t2, 'bpp_est': bpp.item(), 'data': data,
            'decoded': decoded, 'exact': bool(torch.equal(decoded, x_hat.clamp(0, 1)))}


def hpcm_evaluate(hpcm, params, cfg, images, names, device, png_dir=None):
    """Estimated and real bpp, PSNR, encode/decode seconds per image; checks that decoding reproduces the encoder."""
    rows = []
    sync = synchronizer(device)
    coder = hpcm.make_coder(params, cfg)
    for img, name in zip(images, names):
        x = hpcm.image_to_tensor(img).to(device)
        r = hpcm_code_timed(hpcm, coder, x, sync)
        rows.append({'image': name, 'size': f'{x.shape[3]}x{x.shape[2]}', 'bpp_est': r['bpp_est'],
                     'bpp_real': len(r['data']) * 8 / (x.shape[2] * x.shape[3]), 'bytes': len(r['data']),
                     'psnr': hpcm.psnr(x, r['decoded']), 'exact': r['exact'], 'enc_s': r['enc_s'], 'dec_s': r['dec_s']})
        decoded = r['decoded']
        if png_dir is not None:
            os.makedirs(png_dir, exist_ok=True)
            write_png(os.path.join(png_dir, os.path.splitext(name)[0] + '.png'), hpcm.tensor_to_image(decoded))
    return rows


def hpcm_print_table(rows):
    avg = {k: (sum(r[k] for r in rows) / len(rows) if isinstance(rows[0][k], float) else '') for k in rows[0]}
    avg.update(image='average', exact=all(r['exact'] for r in rows))
    print_rows(rows + [avg])
    return avg


def channels_last(tree):
    """Every 4-D tensor of a parameter tree in NHWC memory layout (values unchanged), as fresh leaves."""
    if isinstance(tree, dict):
        return {k: channels_last(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [channels_last(v) for v in tree]
    if tree.dim() != 4:
        return tree
    return tree.detach().contiguous(memory_format=torch.channels_last).requires_grad_(tree.requires_grad)


def hpcm_train_step(params, opt, x, cfg, args, world=1):
    """One step in place -> {'loss', 'bpp', 'psnr'} (averaged over ranks): forward with noise, RD loss, backward,
    gradients averaged over ranks, clipping, Adam."""
    import hpcm
    x_hat, likelihoods, _ = hpcm.hpcm_forward(params, x, cfg, training=True)
    out = hpcm.rate_distortion_loss(x, x_hat, likelihoods, args.lmbda)
    opt.zero_grad(set_to_none=True)
    out['loss'].backward()
    leaves = tree_leaves(params)
    all_reduce_grads(leaves, world)
    if args.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(leaves, args.clip_max_norm)
    opt.step()
    # every rank sees the same loss: a NaN on one rank stops all of them at this step, where a rank stopping alone
    # would leave the others waiting in the next all-reduce
    metrics = mean_over_ranks(torch.stack([out['loss'], out['bpp'], out['mse']]).detach(), world)
    loss, bpp, mse = metrics.tolist()
    return {'loss': loss, 'bpp': bpp, 'psnr': 10 * math.log10(1 / max(mse, 1e-12))}


def run_hpcm(args):
    import hpcm
    if args.compress or args.decompress:
        return hpcm_code_files(args)
    if args.eval is not None:  # the model's shape comes from the checkpoint it was trained with
        saved = read_checkpoint(args.eval).get('args', {})
        args.phase, args.preset = saved.get('phase', args.phase), saved.get('preset', args.preset)
    # set up: device and ranks, model, data, optimizer, checkpoint
    rank, world, device = setup_distributed(args.device)
    quiet_unless_rank0(rank)
    if args.preset == 'auto':
        args.preset = 'full' if device.type == 'cuda' else 'small'
    if args.quality is not None:
        args.lmbda = hpcm.LAMBDAS[args.quality - 1]
    args.patch_size = args.patch_size or (256 if args.preset == 'full' else 64)
    args.batch_size = args.batch_size or (8 if args.preset == 'full' else 4)
    if args.patch_size % 64:
        hpcm_error(f"--patch_size: expected a multiple of 64 (y is at /16, s1 at /64), got {args.patch_size}")
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # training only: compress/decompress pin deterministic kernels
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cfg = hpcm_config(args, hpcm)
    gen = make_generator(args.seed)
    params = tree_to(hpcm.init_hpcm(cfg, gen), device, True)
    if args.channels_last:
        params = channels_last(params)
    eval_h, eval_w = args.eval_size or ((256, 256) if args.preset == 'full' else (128, 128))
    if args.eval_data or (args.eval and args.data):
        eval_images, eval_names = hpcm_images(args.eval_data or args.data, '--eval_data')
    else:
        eval_gen = make_generator(args.seed + 1_000_003)
        eval_images = [hpcm.tensor_to_image(hpcm.synthetic_image(eval_gen, eval_h, eval_w))
                       for _ in range(args.eval_images)]
        eval_names = [f'generated_{i}.png' for i in range(args.eval_images)]
    print(f'hpcm phase {cfg.phase} ({args.preset}: M={cfg.M} N={cfg.N}) on {device}, '
          + (f'{world} ranks x batch {args.batch_size}, ' if world > 1 else '')
          + f'{sum(t.numel() for t in tree_leaves(params)):,} parameters, lambda {args.lmbda}', flush=True)
    if args.eval is not None:
        load_checkpoint(args.eval, params, args=args, must_match=('phase', 'preset'))
        hpcm_print_table(hpcm_evaluate(hpcm, params, cfg, eval_images, eval_names, device,
                                       os.path.join(args.log_dir, 'eval_png')))
        return
    if args.data:
        train_images, train_names = hpcm_images(args.data, '--data')
        small = [f'{n} ({i.shape[1]}x{i.shape[0]})' for i, n in zip(train_images, train_names)
                 if min(i.shape[:2]) < args.patch_size]
        if small:
            hpcm_error(f"--data {args.data}: images smaller than --patch_size {args.patch_size}: {', '.join(small)}")
    else:
        side = max(args.patch_size * 2, 256)
        train_images = [hpcm.tensor_to_image(hpcm.synthetic_image(gen, side, side)) for _ in range(args.num_images)]
    opt = torch.optim.Adam(tree_leaves(params), lr=args.lr)
    path = checkpoint_path(args)
    start = 0
    claim_log_dir(args)
    if args.resume and os.path.exists(path):
        start = load_checkpoint(path, params, {}, opt, args, must_match=('phase', 'preset'))['step']
        print(f'resumed from {path} at step {start}', flush=True)
    log = MetricsLog(os.path.join(args.log_dir, 'metrics.jsonl'))

    # the loop, evaluation and saving
    def step_fn(step):
        x = hpcm_batch(train_images, args, step, rank, world).to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return hpcm_train_step(params, opt, x, cfg, args, world)

    def eval_fn(step):
        avg = hpcm_print_table(hpcm_evaluate(hpcm, params, cfg, eval_images, eval_names, device,
                                             os.path.join(args.log_dir, f'recon_{step:06d}')))
        return {k: v for k, v in avg.items() if isinstance(v, (float, bool))}

    def save_fn(step):
        """ckpt.pt to resume; model.pt, without the optimizer's state, for compress/decompress (load_for_inference)."""
        model = {'params': params, 'hpcm_config': dataclasses.asdict(cfg), 'step': step, 'args': vars(args)}
        save_checkpoint(path, {**model, 'buffers': {}, 'opt': opt.state_dict()})
        save_checkpoint(os.path.join(args.log_dir, 'model.pt'), model)

    lead = rank == 0  # the other ranks only train
    try:
        run_loop(args.training_iterations, start, step_fn, save_fn if lead else (lambda step: None), args.log_every,
                 args.save_every, args.eval_every if lead else 0, eval_fn, log if lead else None)
        wait_for_ranks(world, device)
    finally:
        end_distributed(world)
    print(f'saved {path}', flush=True)


# ----------------------------------------------------------------------------------------------------------------

SUBCOMMANDS = {
    'ctm': (add_ctm_args, run_ctm, 'Plastic Continuous Thought Machine on mazes / parity / images'),
    'lash': (add_lash_args, run_lash, 'LASH: layer-weighted loss, layer-wise lr, early exit'),
    'ashem': (add_ashem_args, run_ashem, 'ASHEM: two-phase hard-example training with routing'),
    'hpcm': (add_hpcm_args, run_hpcm, 'HPCM learned image codec with RWKV context (phases 0-3)'),
}


class Parser(argparse.ArgumentParser):
    """An invalid invocation gets one line (the flag and what was expected) and exit status 2, not the usage."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default shown once: appended to its help unless the help already says it or there is none
    (None, or False for an on/off flag); a flag without help gets a line for its default."""

    def _format_action(self, action):
        text = action.help or ''
        if (action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
                and 'default' not in text):
            action = copy.copy(action)
            action.help = f'{text} (default: %(default)s)'.lstrip()
        return super()._format_action(action)


def build_parser():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='task', metavar='{' + ','.join(SUBCOMMANDS) + '}')
    sub.required = True
    for name, (add_args, _, help_text) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text,
                                formatter_class=HelpFormatter))
    return parser


class CliExit(SystemExit):
    """Exit with `status` after a one-line message (main has printed it); str() is the message."""

    def __init__(self, message, status):
        super().__init__(status)
        self.message = message

    def __str__(self):
        return self.message


def main(argv=None):
    args = build_parser().parse_args(argv)
    status = 2  # a bad flag or file, like argparse's own errors
    try:
        return SUBCOMMANDS[args.task][1](args)
    except KeyboardInterrupt:  # the task has saved its checkpoint and said so; no traceback for a Ctrl-C
        sys.exit(130)
    except BadFile as e:
        message = f'train.py {args.task}: error: {e}'
    except Diverged as e:
        message, status = f'train.py {args.task}: error: {e}', 1
    except SystemExit as e:  # raise SystemExit('message'): a bad flag or file
        if not isinstance(e.code, str):
            raise
        message = e.code if e.code.startswith('train.py') else f'train.py {args.task}: error: {e.code}'
    print(message, file=sys.stderr)
    raise CliExit(message, status) from None


if __name__ == '__main__':
    main()
