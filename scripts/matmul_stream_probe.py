#!/usr/bin/env python
"""How fast XLA on this backend streams a decoding step's weights through few-row matrix
products (README, *Speed*): the 42 layer matrices of `bench speed`'s cpu-small preset (6
layers of q, k, v, o 768x768, gate, up 768x2048, down 2048x768: 170 MB in float32), each
multiplied by a [batch, in] activation, chained so that they run one after another, as in a
decoding step. Prints ms per pass and GB/s of weights read, for each layout asked for:

    python scripts/matmul_stream_probe.py --batch 1 4                  # x @ W, W [in, out]
    python scripts/matmul_stream_probe.py --batch 1 4 --layout out_in  # W stored [out, in]
    python scripts/matmul_stream_probe.py --batch 1 4 --layout fused   # one QKV, one gate/up matrix
    python scripts/matmul_stream_probe.py --batch 4 --ynn              # with XLA:CPU's YNNPACK fusions

Compare with `bench speed`'s streaming rate (`bench_speed.stream_bandwidth`) printed beside.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, HIDDEN, MLP = 6, 768, 2048


def matrices(layout: str):
    """[(rows, cols)] per layer as stored, and how many outputs each product gives."""
    h, m = HIDDEN, MLP
    if layout == "fused":
        return [(h, 3 * h), (h, h), (h, 2 * m), (m, h)]
    return [(h, h)] * 4 + [(h, m)] * 2 + [(m, h)]


def probe(batch: int, layout: str, ynn: bool, calls: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = matrices(layout) * LAYERS
    key = jax.random.PRNGKey(0)
    ws = []
    for r, c in shapes:
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (r, c), jnp.float32) * 0.02
        ws.append(w.T if layout == "out_in" else w)  # [out, in] keeps the same products

    def run(x, ws):
        acc = jnp.float32(0)
        for w, (r, _) in zip(ws, shapes):
            xi = x[:, :r]
            y = jnp.einsum("bi,oi->bo", xi, w) if layout == "out_in" else xi @ w
            acc = acc + y[:, :HIDDEN].sum()
            x = x + 1e-6 * acc  # each product waits for the one before, as in a step
        return acc

    x = jnp.ones((batch, max(MLP, 3 * HIDDEN)), jnp.float32)
    lowered = jax.jit(run).lower(x, ws)
    options = None if ynn or jax.default_backend() != "cpu" else {
        "xla_cpu_experimental_ynn_fusion_type": ""}
    fn = lowered.compile(options) if options else lowered.compile()
    jax.block_until_ready(fn(x, ws))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, ws))
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    nbytes = sum(int(np.prod(s)) for s in shapes) * 4
    return sec * 1e3, nbytes / sec / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--layout", choices=["in_out", "out_in", "fused"], default="in_out")
    p.add_argument("--ynn", action="store_true", help="keep XLA:CPU's YNNPACK dot fusions "
                   "(generation's decoding loop compiles without them)")
    p.add_argument("--calls", type=int, default=30, help="timed calls (median)")
    a = p.parse_args(argv)
    from dynllava_jax.bench_speed import stream_bandwidth
    print(f"streaming rate: {stream_bandwidth() / 1e9:.1f} GB/s")
    for b in a.batch:
        ms, gbs = probe(b, a.layout, a.ynn, a.calls)
        print(f"batch {b}, {a.layout}{', YNNPACK' if a.ynn else ''}: {ms:.2f} ms per pass, "
              f"{gbs:.1f} GB/s of weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
