"""Benchmarks: `python bench.py SUB` prints a table and writes bench_SUB.json.

Speed and memory targets are checked here, never in timed tests. Ratios are measured side by side in one run;
absolute times are only quoted from a GPU.
"""
import argparse
import json
import sys


def print_table(rows):
    """rows: list of dicts with the same keys -> aligned text table."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[f'{r[k]:.4g}' if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print('  '.join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print('  '.join(v.rjust(w) for v, w in zip(c, widths)))


BENCHMARKS = {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest='bench', metavar='{' + ','.join(BENCHMARKS) + '}')
    sub.required = True
    for name, (add_args, _, help_text) in BENCHMARKS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    rows = BENCHMARKS[args.bench][1](args)
    print_table(rows)
    out = getattr(args, 'out', None) or f'bench_{args.bench}.json'
    with open(out, 'w') as f:
        json.dump({'argv': sys.argv, 'rows': rows}, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
