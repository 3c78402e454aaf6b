"""Benchmarks: `python bench.py SUB` prints a table and writes bench_SUB.json.

Speed and memory targets are checked here, never in timed tests. Ratios are measured side by side in one run;
absolute times are only quoted from a GPU.
"""
import argparse
import itertools
import json
import math
import os
import sys

import train


BENCHMARKS = {}


def add_lash_fastpath_args(p):
    p.add_argument('--vocab_sizes', default='256,8192', help='comma list; 256 = our bytes, the seed had ~70K words')
    p.add_argument('--dim', type=int, default=64)
    p.add_argument('--num_layers', type=int, default=3)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--seq_len', type=int, default=64)
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', default=None)


def run_lash_fastpath(args):
    """One training step (loss, backward) of standard last-layer training: fast path (head once) vs the general
    path (head after every layer), alternated step by step (paired_times); the median of each."""
    import torch

    import lash
    device = torch.device(args.device)
    sync = train.synchronizer(device)
    rows = []
    for vocab in (int(v) for v in args.vocab_sizes.split(',')):
        cfg = lash.ModelConfig(vocab_size=vocab, dim=args.dim, num_layers=args.num_layers)
        params = lash.map_tree(lambda t: t.to(device).requires_grad_(),
                               lash.init_transformer(cfg, torch.Generator().manual_seed(0)))
        config = lash.create_standard_config(args.num_layers)
        gen = torch.Generator().manual_seed(1)
        batch = tuple(torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(device)
                      for _ in range(2))
        losses = {}

        def step(fast):
            loss = lash.compute_loss(params, batch, config, cfg, fast_path=fast)
            loss.backward()
            losses[fast] = loss.detach()
        fast_s, general_s = paired_times(lambda _: step(True), lambda _: step(False), [None], args.repeats, sync)
        fast_ms, general_ms = 1000 * fast_s, 1000 * general_s
        rows.append({'vocab': vocab, 'dim': args.dim, 'layers': args.num_layers,
                     'tokens': args.batch_size * args.seq_len, 'fast_ms': fast_ms, 'general_ms': general_ms,
                     'time_saved_pct': 100 * (1 - fast_ms / general_ms),
                     'loss_diff': abs(losses[True] - losses[False]).item(), 'device': str(device)})
    return rows


BENCHMARKS['lash_fastpath'] = (add_lash_fastpath_args, run_lash_fastpath,
                               'LASH: fast path (head once) vs general path loss+backward, side by side')


# lash_exit / lash_generate: early exit timed against full depth on a trained checkpoint, paired: the two modes
# alternate batch by batch (generation: run by run), the first round is warm-up, medians over the repeats.

def add_lash_ckpt_args(p, thresholds, repeats):
    p.add_argument('--ckpt', default='runs/lash_asym/train.pt',
                   help="a `train.py lash` or `ashem` checkpoint; the default is README's LASH model (`python "
                        "train.py lash --layer_weights 1:0,2:0.5,3:0,4:0.5 --log_dir runs/lash_asym`)")
    p.add_argument('--thresholds', default=thresholds, help='comma list of routing thresholds')
    p.add_argument('--exit_layer', type=int, default=2)
    p.add_argument('--threads', default='1,2', help='comma list of CPU thread counts (torch.set_num_threads)')
    p.add_argument('--repeats', type=int, default=repeats)
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', default=None)


def lash_bench_setup(args):
    """-> (device, cfg, params, saved args, [(threshold, full config, routed config)], thread counts)."""
    import lash
    device = train.pick_device(args.device)
    cfg, params, saved = train.lash_load(args.ckpt, device)
    try:
        thresholds = [float(t) for t in args.thresholds.split(',')]
        threads = [int(t) for t in args.threads.split(',')]
    except ValueError:
        raise SystemExit(f'--thresholds/--threads: expected comma lists of numbers, got {args.thresholds!r}, '
                         f'{args.threads!r}') from None
    full = lash.create_standard_config(cfg.num_layers)
    try:
        configs = [(t, full, lash.TrainingConfig(full.layer_weights, routing_threshold=t, exit_layer=args.exit_layer))
                   for t in thresholds]
    except ValueError as e:
        raise SystemExit(f'--thresholds/--exit_layer: {e}') from None
    return device, cfg, params, saved, configs, threads


def paired_times(run_a, run_b, items, repeats, sync):
    """Time run_a(item) and run_b(item) back to back for every item, alternating which goes first, `repeats`
    rounds after one warm-up round. -> (a, b): each the sum over items of that item's median time. Medians per
    item, the two runs of an item side by side in time, are what a busy shared machine disturbs least."""
    import statistics
    import time
    times = {run_a: [[] for _ in items], run_b: [[] for _ in items]}
    for r in range(repeats + 1):
        for i, item in enumerate(items):
            for run in (run_a, run_b) if (r + i) % 2 == 0 else (run_b, run_a):
                sync()
                t0 = time.perf_counter()
                run(item)
                sync()
                if r:
                    times[run][i].append(time.perf_counter() - t0)
    return tuple(sum(statistics.median(t) for t in times[run]) for run in (run_a, run_b))


def run_lash_exit(args):
    """Routed against full-depth evaluation (lash.evaluate, statistics included) on the val and test splits of
    the checkpoint's data, one batch at a time (paired_times): wall time routed / full beside FLOP cost and PPL."""
    import torch

    import lash
    device, cfg, params, saved, configs, threads = lash_bench_setup(args)
    _, _, val, test, _ = train.lash_setup(argparse.Namespace(**dict(saved, device=args.device,
                                                              batch_size=args.batch_size or saved['batch_size'])))
    batches = val + test
    sync = train.synchronizer(device)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for threshold, full, routed in configs:
            f, r = (lash.evaluate(params, batches, c, cfg) for c in (full, routed))
            full_s, routed_s = paired_times(lambda b: lash.evaluate(params, [b], full, cfg),
                                            lambda b: lash.evaluate(params, [b], routed, cfg), batches,
                                            args.repeats, sync)
            rows.append({'threads': n, 'threshold': threshold, 'exit_layer': args.exit_layer,
                         'tokens': f['tokens'], 'exit_rate': r['exit_rate'], 'full_s': full_s, 'routed_s': routed_s,
                         'wall': routed_s / full_s, 'flop_cost': r['flop_cost'],
                         'wall_minus_flop': routed_s / full_s - r['flop_cost'],
                         'compute_cost': r['compute_cost'], 'ppl_full': f['ppl'], 'ppl_routed': r['ppl'],
                         'ppl_change_pct': 100 * (r['ppl'] / f['ppl'] - 1), 'device': str(device)})
            print(rows[-1], flush=True)
    return rows


def add_lash_exit_args(p):
    add_lash_ckpt_args(p, '0.9,0.8,0.5', 7)
    p.add_argument('--batch_size', type=int, default=None, help="default: the checkpoint's")


BENCHMARKS['lash_exit'] = (add_lash_exit_args, run_lash_exit,
                           'LASH/ASHEM: routed vs full evaluation, paired: wall time, FLOP cost, PPL')


def run_lash_generate(args):
    """Greedy generation of --new_tokens bytes after each of --prompts prompts (--prompt_len bytes from evenly
    spaced places in the validation split; each its own run, batch 1), full depth against early exit (paired_times):
    tokens/s, speed-up and the exit rate. Threshold 1 never exits (its speed-up is the routing's cost alone: the
    exit head and confidence on every token), a tiny one such as 0.001 always does (the most early exit can save);
    between them a threshold's speed-up follows its exit rate."""
    import torch

    import lash
    device, cfg, params, saved, configs, threads = lash_bench_setup(args)
    _, val, _ = lash.split_corpus(lash.load_corpus(saved['data']))
    starts = torch.linspace(0, len(val) - args.prompt_len, args.prompts).long().tolist()
    prompts = [val[s:s + args.prompt_len][None].to(device) for s in starts]
    sync = train.synchronizer(device)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for threshold, full, routed in configs:
            outputs, modes, items = {}, {'full': full, 'routed': routed}, range(len(prompts))

            def generate(mode, i):
                outputs[mode, i] = lash.generate(params, prompts[i], cfg, modes[mode], args.new_tokens)
            full_s, routed_s = paired_times(lambda i: generate('full', i), lambda i: generate('routed', i), items,
                                            args.repeats, sync)
            exit_mask = torch.cat([outputs['routed', i][1] for i in items], 1)
            same = sum(torch.equal(outputs['full', i][0], outputs['routed', i][0]) for i in items)
            total = args.new_tokens * len(prompts)
            rows.append({'threads': n, 'threshold': threshold, 'exit_layer': args.exit_layer,
                         'tokens': total, 'exit_rate': exit_mask.float().mean().item(),
                         'full_tok_s': total / full_s, 'routed_tok_s': total / routed_s, 'speedup': full_s / routed_s,
                         'same_text': f'{same}/{len(prompts)}', 'device': str(device)})
            print(rows[-1], flush=True)
    return rows


def add_lash_generate_args(p):
    add_lash_ckpt_args(p, '0.9,0.8', 5)
    p.add_argument('--prompts', type=int, default=8, help='how many prompts, from the validation split')
    p.add_argument('--prompt_len', type=int, default=32, help='bytes per prompt')
    p.add_argument('--new_tokens', type=int, default=96, help='prompt + new tokens stay within the trained 128')

BENCHMARKS['lash_generate'] = (add_lash_generate_args, run_lash_generate,
                               'LASH: tokens/s of greedy generation with a KV cache, full depth vs early exit')


# wkv: Bi-WKV4 forward+backward time, the codec's short rows and the long ones, every path side by side.

def add_wkv_args(p):
    p.add_argument('--small', default='1x640x64,1x640x256,8x256x1024,8x640x256,1x640x1024',
                   help="comma list of BxCxT: the codec's context cells (y of a 256² crop is 16x16 = 256 tokens)")
    p.add_argument('--sizes', default='1x640,16x512,64x640', help='comma list of BxC for the long rows')
    p.add_argument('--lengths', default='256,4096,16384', help='comma list of T for the long rows')
    p.add_argument('--paths', default='auto,naive,split,cuda,scan,dense,empty',
                   help='comma list of auto (bi_wkv\'s choice), naive, split, cuda (chunked), scan, dense, empty (an '
                        'autograd.Function that allocates y and the gradients and launches nothing: the host floor)')
    p.add_argument('--repeats', type=int, default=20, help='timed fwd+bwd calls per case and kernel path '
                   '(scan and dense: 1)')
    p.add_argument('--dense_max_T', type=int, default=256, help='dense is O(T²) in memory')
    p.add_argument('--scan_max_elems', type=int, default=2 ** 28, help='skip the scan above this B·T·C (memory)')
    p.add_argument('--vrwkv', default=None, metavar='DIR',
                   help="also time Vision-RWKV's kernel (path 'vrwkv'), built from DIR = a Vision-RWKV checkout's "
                        'classification/mmcls_custom/models/backbones/cuda_new (bi_wkv.cpp, bi_wkv_kernel.cu)')
    p.add_argument('--out', default=None)


def measure_copy_bandwidth(torch, nbytes=2 ** 30, repeats=10):
    """Device-to-device copy of nbytes: GB/s counting the read and the write."""
    src = torch.empty(nbytes // 4, device='cuda')
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def empty_wkv(torch):
    """What any custom autograd op pays on this host before its kernels: bi_wkv's allocations (y, log Z; gk, gv and
    the gw, gu partial sums), no launch."""
    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, u, k, v):
            y = torch.empty_like(k)
            ctx.save_for_backward(w, u, k, v, y, torch.empty_like(k))
            return y

        @staticmethod
        def backward(ctx, gy):
            k = ctx.saved_tensors[2]
            gw, gu = k.new_empty(2, k.shape[2])
            return gw, gu, torch.empty_like(k), torch.empty_like(k)

    return Empty.apply


def vision_rwkv_wkv(torch, folder):
    """Vision-RWKV's Bi-WKV4 (OpenGVLab/Vision-RWKV, cuda_new/) as its vrwkv.py calls it: the caller divides w, u by
    T; float32. Built with torch.utils.cpp_extension (nvcc, ninja) from a copy of its two files with two build fixes
    for current torch: the removed THC/THCAtomics.cuh header -> ATen/cuda/Atomic.cuh, k.type() -> k.scalar_type()
    in its dispatch. Its compile flags as in vrwkv.py, for this GPU's architecture."""
    import shutil
    import tempfile

    from torch.utils.cpp_extension import load
    names = ('bi_wkv.cpp', 'bi_wkv_kernel.cu')
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise SystemExit(f'--vrwkv: {folder} lacks {", ".join(missing)} (expected Vision-RWKV\'s '
                         'classification/mmcls_custom/models/backbones/cuda_new)')
    build = tempfile.mkdtemp(prefix='vrwkv_')
    shutil.copy(os.path.join(folder, names[0]), build)
    with open(os.path.join(folder, names[1])) as f:
        source = f.read().replace('<THC/THCAtomics.cuh>', '<ATen/cuda/Atomic.cuh>').replace(
            'AT_DISPATCH_FLOATING_TYPES(k.type(),', 'AT_DISPATCH_FLOATING_TYPES(k.scalar_type(),')
    with open(os.path.join(build, names[1]), 'w') as f:
        f.write(source)
    ext = load(name='vision_rwkv_bi_wkv', sources=[os.path.join(build, n) for n in names], build_directory=build,
               extra_cuda_cflags=['-res-usage', '--maxrregcount 60', '--use_fast_math', '-O3', '-Xptxas -O3'])

    class WKV(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, u, k, v):
            ctx.save_for_backward(w, u, k, v)
            return ext.bi_wkv_forward(w.contiguous(), u.contiguous(), k.contiguous(), v.contiguous())

        @staticmethod
        def backward(ctx, gy):
            return tuple(ext.bi_wkv_backward(*ctx.saved_tensors, gy.contiguous()))

    return lambda w, u, k, v: WKV.apply(w / k.shape[1], u / k.shape[1], k, v)


def time_wkv_paths(torch, fns, inputs, gy, repeats):
    """Wall time as a user meets it: fwd ms and fwd+bwd ms of single calls, a synchronize after the forward and after
    the backward, host work included. The paths take turns call by call (paired), each round starting one path
    later, so that no path is always first; round 0 warms up (and compiles); medians. Then gpu ms: CUDA events around
    `repeats` fwd+bwd calls queued back to back, as a training loop queues them, so the host's launch work overlaps
    the kernels."""
    import statistics
    import time
    fwd, both = {n: [] for n in fns}, {n: [] for n in fns}
    names = list(fns)
    for i in range(repeats + 1):
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn = fns[name]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = fn(*inputs)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            torch.autograd.backward(y, gy, inputs=inputs)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            for t in inputs:
                t.grad = None
            if i:
                fwd[name].append(t1 - t0)
                both[name].append(t2 - t0)
    out = {}
    for name, fn in fns.items():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.autograd.backward(fn(*inputs), gy, inputs=inputs)
            for t in inputs:
                t.grad = None
        end.record()
        torch.cuda.synchronize()
        out[name] = (1e3 * statistics.median(fwd[name]), 1e3 * statistics.median(both[name]),
                     start.elapsed_time(end) / repeats)
    return out


def run_wkv(args):
    """One row per (shape, path): the codec's short rows ('codec') first, then the long ones ('long'). The kernel
    paths (auto, naive, split, cuda, and vrwkv and empty when asked) are timed paired with `repeats` calls each,
    scan and dense with one call. GB/s
    and % of the copy bandwidth measured in the same run count only the minimal 8·B·T·C·4 bytes of fwd+bwd (k, v in
    and y out forward; k, v, gy in and gk, gv out backward) over gpu_ms."""
    import torch

    import hpcm
    if not torch.cuda.is_available():
        raise SystemExit('bench wkv needs a CUDA device')
    paths = {'auto': hpcm.bi_wkv, 'naive': hpcm.bi_wkv_naive, 'split': hpcm.bi_wkv_split, 'cuda': hpcm.bi_wkv_cuda,
             'scan': hpcm.bi_wkv_scan, 'dense': hpcm.bi_wkv_dense, 'empty': empty_wkv(torch)}
    chosen = args.paths.split(',')
    unknown = set(chosen) - set(paths)
    if unknown:
        raise SystemExit(f'--paths: expected a comma list of {", ".join(paths)}, got {sorted(unknown)}')
    try:
        shapes = [('codec', *(int(x) for x in s.split('x'))) for s in args.small.split(',') if s]
        shapes += [('long', *(int(x) for x in s.split('x')), int(T)) for s in args.sizes.split(',') if s
                   for T in args.lengths.split(',') if T]
        assert all(len(s) == 4 for s in shapes)
    except (ValueError, AssertionError):
        raise SystemExit(f'--small: expected BxCxT,..., --sizes BxC,... and --lengths T,...; got {args.small!r}, '
                         f'{args.sizes!r}, {args.lengths!r}')
    os.environ.pop('HPCM_WKV', None)  # 'auto' is bi_wkv's own choice
    if args.vrwkv:
        paths['vrwkv'] = vision_rwkv_wkv(torch, args.vrwkv)
        chosen.append('vrwkv')
    copy_gbs = measure_copy_bandwidth(torch)
    print(f'copy bandwidth {copy_gbs:.0f} GB/s; codec rows: the kernel paths timed paired (turn by turn)')
    rows = []
    for table, B, C, T in shapes:
        gen = torch.Generator(device='cuda').manual_seed(0)
        w = (torch.rand(C, device='cuda', generator=gen) * 3).requires_grad_()
        u = torch.randn(C, device='cuda', generator=gen).requires_grad_()
        k = torch.randn(B, T, C, device='cuda', generator=gen).requires_grad_()
        v = torch.randn(B, T, C, device='cuda', generator=gen).requires_grad_()
        gy = torch.randn(B, T, C, device='cuda', generator=gen)
        kernels = {n: paths[n] for n in chosen if n in ('auto', 'naive', 'split', 'cuda', 'vrwkv', 'empty')}
        others = {n: paths[n] for n in chosen if (n == 'scan' and B * T * C <= args.scan_max_elems)
                  or (n == 'dense' and T <= args.dense_max_T)}
        times = time_wkv_paths(torch, kernels, [w, u, k, v], gy, args.repeats) if kernels else {}
        for name, fn in others.items():
            times.update(time_wkv_paths(torch, {name: fn}, [w, u, k, v], gy, 1))
        for name in chosen:
            if name in times:
                fwd_ms, wall_ms, gpu_ms = times[name]
                gbs = 8 * B * T * C * 4 / (gpu_ms / 1e3) / 1e9
                rows.append({'rows': table, 'B': B, 'C': C, 'T': T, 'path': name, 'fwd_ms': fwd_ms,
                             'wall_ms': wall_ms, 'gpu_ms': gpu_ms, 'GB_s': gbs, 'pct_of_copy': 100 * gbs / copy_gbs})
        torch.cuda.empty_cache()
    return rows


BENCHMARKS['wkv'] = (add_wkv_args, run_wkv,
                     'Bi-WKV4 fwd+bwd: naive, split-row and chunked CUDA kernels vs torch scan vs dense (and '
                     "Vision-RWKV's kernel with --vrwkv)")


# ctm: training step time of the eager path against the CUDA-graph fast paths (paper ticks, fused ticks, compiled
# fused ticks; fp32 or bf16 autocast), plain and plastic, at the batch sizes asked for; the model is exactly
# `train.py ctm --preset ...`'s.

CTM_PATHS = {'eager': ['--eager'], 'cuda_graph': ['--cuda_graph', '--tick', 'paper'],
             'cuda_graph+bf16': ['--cuda_graph', '--tick', 'paper', '--use_amp'],
             'eager+bf16': ['--eager', '--use_amp'], 'cuda_graph+fused': ['--cuda_graph', '--tick', 'fused'],
             'cuda_graph+compiled': ['--cuda_graph', '--tick', 'compiled'],
             'cuda_graph+compiled+bf16': ['--cuda_graph', '--tick', 'compiled', '--use_amp']}
CTM_CONFIGS = {'plain': [], 'bottleneck': ['--use_hyper', '--hyper_layers', 'bottleneck', '--hyper_rank', '8'],
               'bottleneck+nlm': ['--use_hyper', '--hyper_layers', 'bottleneck', '--hyper_rank', '8',
                                  '--use_hyper_nlm', '--hyper_nlm_rank', '4']}


def add_ctm_args(p):
    p.add_argument('--preset', default='mazes-small', help="train.py ctm's --preset (default the seeds' mazes-small)")
    p.add_argument('--batch_sizes', type=int, nargs='+', default=[16, 64])
    p.add_argument('--paths', nargs='+', choices=tuple(CTM_PATHS),
                   default=['eager', 'cuda_graph', 'cuda_graph+fused', 'cuda_graph+compiled'])
    p.add_argument('--configs', nargs='+', choices=tuple(CTM_CONFIGS), default=list(CTM_CONFIGS))
    p.add_argument('--steps', type=int, default=10, help='timed steps after the 4 first (warm-up + capture) ones')
    p.add_argument('--ctm_flags', default='', help='more train.py ctm flags, e.g. "--iterations 10"')
    p.add_argument('--device', default='auto', help='cpu, cuda or auto')
    p.add_argument('--out', help='JSON output (default bench_ctm.json)')


def bench_ctm_one(argv, steps):
    """One (path, config, batch): `first_s` covers the first 4 steps (with --cuda_graph: 3 eager warm-up steps and
    the capture), then `steps` timed steps on one fixed batch; the same init and batch for every path."""
    import shlex
    import time

    import torch

    import plastic
    args = train.resolve_ctm_args(train.build_parser().parse_args(['ctm', *shlex.split(argv)]))
    device = train.pick_device(args.device)
    args = train.resolve_ctm_device(args, device)
    if device.type == 'cuda':
        torch.set_float32_matmul_precision('high')
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fields, batch, _, task_loss = train.ctm_task(args)
    cfg = train.ctm_config(args, fields)
    params, buffers = plastic.init_ctm(cfg, train.make_generator(0))
    params, buffers = train.tree_to(params, device, True), train.tree_to(buffers, device)
    opt = torch.optim.AdamW(train.tree_leaves(params), lr=args.lr, eps=1e-8)
    train.optimizer_mode(opt, args.cuda_graph, device)
    step = train.ctm_stepper(params, buffers, opt, cfg, task_loss, args)
    x, y = (torch.as_tensor(t).to(device) for t in batch(0))
    sync = train.synchronizer(device)
    sync()
    t0 = time.perf_counter()
    first_loss = step(x, y)[0].item()
    for _ in range(3):
        step(x, y)
    sync()
    t1 = time.perf_counter()
    for _ in range(steps):
        metrics = step(x, y)
    last_loss = metrics[0].item()
    t2 = time.perf_counter()
    ms = (t2 - t1) / steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else float('nan')
    return dict(ms_per_step=ms, mazes_per_s=args.batch_size / ms * 1e3, first_s=t1 - t0, peak_gib=peak,
                params=sum(t.numel() for t in train.tree_leaves(params)), loss_first=first_loss, loss_last=last_loss)


def run_ctm(args):
    """Every (batch, path, config) in turn; a failing one is reported in its row and the rest still run."""
    import gc
    rows = []
    for batch_size in args.batch_sizes:
        for path in args.paths:
            for config in args.configs:
                argv = ' '.join(['--preset', args.preset, '--batch_size', str(batch_size), '--n_test', '1',
                                 '--device', args.device, *CTM_PATHS[path], *CTM_CONFIGS[config], args.ctm_flags])
                row = dict(batch=batch_size, path=path, config=config)
                try:
                    row.update(bench_ctm_one(argv, args.steps))
                except Exception as e:  # e.g. out of memory, or a capture the driver refuses
                    row['error'] = f'{type(e).__name__}: {e}'[:200]
                gc.collect()
                base = next((r for r in rows if (r['batch'], r['path'], r['config']) == (batch_size, path, 'plain')),
                            row)
                if 'ms_per_step' in row and 'ms_per_step' in base:
                    row['hyper_overhead_pct'] = 100 * (row['ms_per_step'] / base['ms_per_step'] - 1)
                print(row, flush=True)
                rows.append(row)
    eager = {(r['batch'], r['config']): r.get('ms_per_step') for r in rows if r['path'] == 'eager'}
    for r in rows:
        if eager.get((r['batch'], r['config'])) and 'ms_per_step' in r:
            r['speedup'] = eager[(r['batch'], r['config'])] / r['ms_per_step']
    keys = ['batch', 'path', 'config', 'ms_per_step', 'speedup', 'hyper_overhead_pct', 'mazes_per_s', 'first_s',
            'peak_gib', 'params', 'loss_first', 'loss_last', 'error']
    return [{k: r.get(k, '') for k in keys} for r in rows]


BENCHMARKS['ctm'] = (add_ctm_args, run_ctm, 'CTM training step: eager vs CUDA graph (fp32/bf16), plain and plastic, '
                     'mazes-small')


# codec: encode/decode time of compress/decompress, and with --images an RD table against JPEG 4:2:0, WebP and AVIF
# at equal bpp (Pillow, an optional import used only here).

def add_codec_args(p):
    p.add_argument('--phases', type=int, nargs='+', default=[0, 3], help='random-weight models of these phases')
    p.add_argument('--ckpt', nargs='+', default=None, help='trained models (train.py hpcm ckpt.pt/model.pt) instead; '
                   'several (one per lambda) give an RD curve and BD-rates')
    p.add_argument('--size', type=int, nargs=2, default=[512, 768], metavar=('H', 'W'), help='timed image size')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--images', default=None, help='folder of png/ppm photographs: RD table against JPEG/WebP/AVIF')
    p.add_argument('--device', default='auto', help='cpu, cuda or auto')
    p.add_argument('--preset', default='auto', choices=('auto', 'small', 'full'), help='of the random-weight models')
    p.add_argument('--out', default=None)


def ssim_terms(x, y, window):
    """Luminance (l) and contrast-structure (cs) maps of SSIM (Wang et al. 2004, data range 1), per channel."""
    import torch.nn.functional as F
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    blur = lambda t: F.conv2d(t, window, groups=t.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    return (2 * mx * my + C1) / (mx ** 2 + my ** 2 + C1), (2 * cxy + C2) / (vx + vy + C2)


def ms_ssim(x, y):
    """MS-SSIM (Wang, Simoncelli, Bovik 2003) of (1, 3, H, W) images in [0, 1]: 11x11 Gaussian window (σ 1.5),
    5 scales with the paper's weights, fewer scales where the image is too small for 5."""
    import torch
    import torch.nn.functional as F
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    g = (g / g.sum()).to(x.device, x.dtype)
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, 11, 11).contiguous()
    scales = max(1, min(5, 1 + int(math.log2(min(x.shape[2:]) / 11))))
    weights = torch.tensor(weights[:scales], dtype=torch.float64)
    weights /= weights.sum()
    result = 1.0
    for s in range(scales):
        lum, cs = ssim_terms(x, y, window)
        value = (lum * cs if s == scales - 1 else cs).mean().item()
        result *= max(value, 1e-8) ** weights[s].item()
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result


def pillow_codecs():
    """name -> encode(uint8 image, quality) -> bytes, for the codecs this Pillow build has; {} without Pillow."""
    try:
        import io

        from PIL import Image, features
    except ImportError:
        return {}

    def encoder(fmt, **options):
        def encode(img, quality):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, fmt, quality=int(quality), **options)
            return buf.getvalue()
        return encode
    codecs = {'jpeg420': encoder('JPEG', subsampling=2, optimize=True)}
    if features.check('webp'):
        codecs['webp'] = encoder('WEBP', method=6)
    if features.check('avif'):
        codecs['avif'] = encoder('AVIF', subsampling='4:2:0', speed=4)
    return codecs


def decode_pillow(data):
    import io

    import numpy as np
    from PIL import Image
    return np.array(Image.open(io.BytesIO(data)).convert('RGB'))


def image_psnr(a, b):
    import numpy as np
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255 ** 2 / max(mse, 1e-12))


def codec_curve(encode, img, qualities=range(5, 100, 5)):
    """(bpp, PSNR, MS-SSIM) of a Pillow codec over its quality range, sorted by bpp."""
    import torch

    import hpcm
    points = []
    x = hpcm.image_to_tensor(img)
    for q in qualities:
        data = encode(img, q)
        out = decode_pillow(data)
        points.append((8 * len(data) / (img.shape[0] * img.shape[1]), image_psnr(img, out),
                       ms_ssim(x, hpcm.image_to_tensor(out))))
    return sorted(points)


def at_bpp(curve, bpp):
    """PSNR and MS-SSIM of a codec curve at a bpp, linearly interpolated between its two neighbouring points (nan
    outside the curve's range)."""
    import numpy as np
    rates = [p[0] for p in curve]
    if not rates[0] <= bpp <= rates[-1]:
        return float('nan'), float('nan')
    return tuple(float(np.interp(bpp, rates, [p[k] for p in curve])) for k in (1, 2))


def bd_rate(anchor, test):
    """Bjøntegaard delta rate (%) of `test` against `anchor`, both lists of (bpp, PSNR): the mean difference of
    log-rate over the PSNR range both cover, with log-rate interpolated piecewise-linearly in PSNR (needs 2+ points
    each; the classic cubic fit needs 4). Negative: test needs fewer bits for the same PSNR."""
    import numpy as np
    if len(anchor) < 2 or len(test) < 2:
        return float('nan')
    curves = [sorted((p, math.log(r)) for r, p in c) for c in (anchor, test)]
    lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    if lo >= hi:
        return float('nan')
    grid = np.linspace(lo, hi, 200)
    a, t = (np.interp(grid, [p for p, _ in c], [r for _, r in c]) for c in curves)
    return 100 * (math.exp(float(np.mean(t - a))) - 1)


def codec_config(args, hpcm, device, phase):
    """-> (preset, config) of a random-weight model of `phase`: --preset, 'auto' being 'full' on CUDA and 'small'
    elsewhere, as in train.py hpcm."""
    preset = args.preset if args.preset != 'auto' else ('full' if device.type == 'cuda' else 'small')
    return preset, hpcm.HPCMConfig(phase=phase) if preset == 'full' else hpcm.HPCMConfig.small(phase)


def codec_models(args, torch, hpcm, device):
    """[(name, params, cfg)]: the checkpoints of --ckpt, else random-weight models of --phases."""
    if args.ckpt:
        return [(path, *train.load_for_inference(path, device)) for path in args.ckpt]
    models = []
    for phase in args.phases:
        preset, cfg = codec_config(args, hpcm, device, phase)
        models.append((f'random phase {phase} ({preset})',
                       train.tree_to(hpcm.init_hpcm(cfg, torch.Generator().manual_seed(0)), device), cfg))
    return models


def run_codec(args):
    """Rows of timings (median of --repeats after one warm-up; the model already on the device, make_coder
    done once) for one --size image (the first of --images, cropped/padded, else a generated one); then, with
    --images, one row per image and model with the actual stream's bpp, PSNR, MS-SSIM and exact decode, and
    each Pillow codec's PSNR/MS-SSIM at that bpp; then BD-rates of the model curve against each codec."""
    import statistics
    import time

    import numpy as np
    import torch

    import hpcm
    device = train.pick_device(args.device)
    sync = train.synchronizer(device)
    H, W = args.size
    images, names = ([], [])
    if args.images:
        images, names = train.hpcm_images(args.images, '--images')
    timed = images[0] if images else hpcm.tensor_to_image(hpcm.synthetic_image(torch.Generator().manual_seed(0), H, W))
    timed = np.pad(timed, ((0, max(0, H - timed.shape[0])), (0, max(0, W - timed.shape[1])), (0, 0)), 'edge')[:H, :W]
    x = hpcm.image_to_tensor(timed).to(device)
    rows, models = [], codec_models(args, torch, hpcm, device)
    for name, params, cfg in models:
        sync()
        t0 = time.perf_counter()
        coder = hpcm.make_coder(params, cfg)
        sync()
        setup_s = time.perf_counter() - t0
        runs = [train.hpcm_code_timed(hpcm, coder, x, sync) for _ in range(args.repeats + 1)][1:]  # 1 warm-up
        data = runs[-1]['data']
        rows.append({'model': name, 'image': f'{W}x{H}', 'bytes': len(data), 'bpp': 8 * len(data) / (H * W),
                     'lanes': 1 << hpcm.HEADER.unpack_from(data)[6], 'exact': all(r['exact'] for r in runs),
                     **{k: statistics.median(r[k] for r in runs) for k in ('forward_s', 'enc_s', 'dec_s')},
                     'make_coder_s': setup_s, 'device': str(device)})
        print(rows[-1], flush=True)
    codecs = pillow_codecs() if images else {}
    if images and not codecs:
        print('Pillow is not installed: RD rows without JPEG/WebP/AVIF', flush=True)
    ours, curves = {name: [] for name, _, _ in models}, []
    for img, image_name in zip(images, names):
        curves.append({c: codec_curve(encode, img) for c, encode in codecs.items()})
        x = hpcm.image_to_tensor(img).to(device)
        for name, params, cfg in models:
            r = train.hpcm_code_timed(hpcm, hpcm.make_coder(params, cfg), x, sync)
            bpp, decoded = 8 * len(r['data']) / (img.shape[0] * img.shape[1]), r['decoded']
            out = hpcm.tensor_to_image(decoded)
            row = {'model': name, 'image': image_name, 'bpp': bpp, 'psnr': image_psnr(img, out),
                   'ms_ssim': ms_ssim(hpcm.image_to_tensor(img), hpcm.image_to_tensor(out)),
                   'exact': r['exact']}
            for c, curve in curves[-1].items():
                row[f'{c}_psnr'], row[f'{c}_ms_ssim'] = at_bpp(curve, bpp)
                row[f'gain_vs_{c}_db'] = row['psnr'] - row[f'{c}_psnr']
            ours[name].append(row)
            rows.append(row)
            print(row, flush=True)
    for name, own in ours.items() if images else ():  # averages over the images, per model
        rows.append({'model': name, 'image': 'average', 'exact': all(r['exact'] for r in own),
                     **{k: float(np.mean([r[k] for r in own])) for k, v in own[0].items() if isinstance(v, float)}})
    for c in codecs:  # BD-rate of the models' curve (one point per --ckpt) against each codec, averaged over images
        bd = [bd_rate([p[:2] for p in curves[i][c]], [(own[i]['bpp'], own[i]['psnr']) for own in ours.values()])
              for i in range(len(images))]
        rows.append({'model': 'curve of all models', 'image': 'average',
                     f'bd_rate_vs_{c}_pct': float(np.mean(bd))})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, '') for k in columns} for r in rows]


BENCHMARKS['codec'] = (add_codec_args, run_codec, 'HPCM compress/decompress time; RD vs JPEG/WebP/AVIF (--images)')


# codec_train: one training step of train.py hpcm (forward with noise, RD loss, backward, clip, Adam) per phase.

def add_codec_train_args(p):
    p.add_argument('--phases', type=int, nargs='+', default=[0, 3])
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--patch_size', type=int, default=256)
    p.add_argument('--steps', type=int, default=10, help='timed steps after 3 warm-up steps')
    p.add_argument('--cudnn_benchmark', type=int, nargs='+', default=[1], help='1: on (train.py hpcm), 0: off')
    p.add_argument('--channels_last', type=int, nargs='+', default=[0], help="1: train.py hpcm --channels_last")
    p.add_argument('--tf32', type=int, nargs='+', default=[0], help='1: train.py hpcm --tf32')
    p.add_argument('--device', default='auto', help='cpu, cuda or auto')
    p.add_argument('--preset', default='auto', choices=('auto', 'small', 'full'))
    p.add_argument('--out', default=None)


def run_codec_train(args):
    """ms per step (wall clock over --steps synchronised steps, one fixed batch) and peak memory, per phase and
    cuDNN benchmark setting; the step is train.py's hpcm_train_step."""
    import time

    import torch

    import hpcm
    device = train.pick_device(args.device)
    sync = train.synchronizer(device)
    rows = []
    for bench_flag, nhwc, tf32, phase in itertools.product(args.cudnn_benchmark, args.channels_last, args.tf32,
                                                           args.phases):
        torch.backends.cudnn.benchmark = bool(bench_flag)
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        _, cfg = codec_config(args, hpcm, device, phase)
        params = train.tree_to(hpcm.init_hpcm(cfg, torch.Generator().manual_seed(0)), device, True)
        params = train.channels_last(params) if nhwc else params
        opt = torch.optim.Adam(train.tree_leaves(params), lr=1e-4)
        step_args = argparse.Namespace(lmbda=0.013, clip_max_norm=1.0)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch_size, 3, args.patch_size, args.patch_size, generator=gen).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if nhwc else x
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        losses = [train.hpcm_train_step(params, opt, x, cfg, step_args)['loss'] for _ in range(3)]
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            losses.append(train.hpcm_train_step(params, opt, x, cfg, step_args)['loss'])
        sync()
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        rows.append({'phase': phase, 'cudnn_benchmark': bench_flag, 'channels_last': nhwc, 'tf32': tf32,
                     'batch': args.batch_size, 'patch': args.patch_size, 'ms_per_step': ms,
                     'peak_gib': torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else 0.0,
                     'params': sum(t.numel() for t in train.tree_leaves(params)), 'loss_first': losses[0],
                     'loss_last': losses[-1], 'device': str(device)})
        print(rows[-1], flush=True)
        del params, opt
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
    return rows


BENCHMARKS['codec_train'] = (add_codec_train_args, run_codec_train,
                             'HPCM training step time per phase, cuDNN benchmark on/off')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest='bench', metavar='{' + ','.join(BENCHMARKS) + '}')
    sub.required = True
    for name, (add_args, _, help_text) in BENCHMARKS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    rows = BENCHMARKS[args.bench][1](args)
    if rows:
        train.print_rows(rows)
    out = getattr(args, 'out', None) or f'bench_{args.bench}.json'
    with open(out, 'w') as f:
        json.dump({'argv': sys.argv, 'rows': rows}, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
