"""Benchmarks of dense vs dynamic (Dynamic-LLaVA) inference.

    python -m dynllava_jax.bench flops --model llava-v1.5-7b [--output-tokens N] [--json]
    python -m dynllava_jax.bench speed --model cpu-small [--batch 1 4] [--vs-torch] [--json]

`flops` counts from shapes only (nothing allocated; `bench_flops.py`); `speed` times the
compiled functions on the local backend with random weights (`bench_speed.py`).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    from . import bench_flops, bench_speed
    ap = argparse.ArgumentParser(prog="python -m dynllava_jax.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    bench_flops.add_arguments(sub.add_parser(
        "flops", help="FLOPs and KV-cache bytes, dense vs dynamic, from shapes only",
        description=bench_flops.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    bench_speed.add_arguments(sub.add_parser(
        "speed", help="prefill/decode time, memory and bytes per step on the local backend",
        description=bench_speed.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return ap.parse_args(argv)


def report(a, measure, format_table) -> int:
    """Run a benchmark; print its table (or JSON); a bad setting is one `error:` line, exit 2."""
    import json
    try:
        r = measure(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if a.json else format_table(r))
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.command == "flops":
        from .bench_flops import run
    else:
        from .bench_speed import run
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
