#!/usr/bin/env python
"""Before/after timing of `generate()` for two checkouts of this repository, interleaved.

    python scripts/ab_generate.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 2] [--batch 1 4]

The jitted prefill and decode loop that `generate()` runs are timed separately (named
`_jit_prefill`/`_jit_decode` before this change, `jit_prefill`/`jit_decode` after). Each
round runs one subprocess per checkout (alternating, so both see the same machine load);
each compiles, then times `--repeats` prefills and decode loops of `--new-tokens` (EOS
disabled), dense and dynamic, on random weights of the shapes below (the LLM of the
issue's CPU table, a small CLIP tower at 336 px). Prints medians and new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from dynllava_jax.config import LLMConfig, ModelConfig, VisionConfig
from dynllava_jax.generate import GenOptions, generate
from dynllava_jax.inputs import prepare_batch
from dynllava_jax.model import init_params
a = json.loads(sys.argv[1])
cfg = ModelConfig(vision=VisionConfig(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=1024),
                  llm=LLMConfig(hidden_size=768, num_layers=6, num_heads=12, num_kv_heads=12,
                                intermediate_size=2048), eos_token_id=-1)
params = jax.jit(lambda k: init_params(cfg, k))(jax.random.PRNGKey(0))
try:  # the new revision unstacks the layers once (what infer.py's Llava does)
    from dynllava_jax.generate import inference_params
    params = inference_params(params)
except ImportError:
    pass
import dynllava_jax.generate as G
from dynllava_jax.generate import compacted_length
jp = getattr(G, "jit_prefill", None) or G._jit_prefill
jd = getattr(G, "jit_decode", None) or G._jit_decode
def block(t):
    jax.tree_util.tree_map(lambda x: x.block_until_ready(), t)
rng = np.random.default_rng(0)
out = {}
for b in a["batch"]:
    ids = [[1] + rng.integers(3, 32000, 34).tolist() + [-200] + rng.integers(3, 32000, 20).tolist()
           for _ in range(b)]
    batch = prepare_batch(ids, cfg.num_image_tokens, pad_to=640)
    px = jnp.asarray(rng.normal(size=(b, 3, 336, 336)).astype(np.float32))
    args = (jnp.asarray(batch.tokens), jnp.asarray(batch.lengths), jnp.asarray(batch.image_start), px)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(b, dtype=jnp.uint32))
    for mode in ("dense", "dynamic"):
        o = GenOptions(max_new_tokens=a["new_tokens"], mode=mode)
        clen = compacted_length(batch, cfg, o)
        pre, dec = [], []
        for r in range(a["repeats"] + 1):  # the first run compiles
            t0 = time.perf_counter()
            logits, state = jp(params, *args, cfg=cfg, opts=o, compact_len=clen)
            block((logits, state))
            t1 = time.perf_counter()
            res = jd(params, logits, state, keys, jnp.float32(1), jnp.float32(1), cfg=cfg, opts=o)
            block(res)
            t2 = time.perf_counter()
            if r:
                pre.append(t1 - t0); dec.append((t2 - t1) / (a["new_tokens"] - 1))
        out[f"{b}/{mode}"] = {"prefill": pre, "decode": dec}
print(json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    args = json.dumps({"batch": a.batch, "new_tokens": a.new_tokens, "repeats": a.repeats})
    runs = {"old": [], "new": []}
    for r in range(a.rounds):
        for which in ("old", "new"):
            print(f"round {r + 1}: {which}", file=sys.stderr, flush=True)
            env = dict(os.environ, PYTHONPATH=getattr(a, which), JAX_PLATFORMS="cpu")
            p = subprocess.run([sys.executable, "-c", CHILD, args], env=env, cwd=getattr(a, which),
                               capture_output=True, text=True)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            runs[which].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print("| batch/mode | prefill ms old / new (ratio) | decode ms/token old / new (ratio) |")
    print("|---|---|---|")
    for key in runs["old"][0]:
        med = {w: [1e3 * statistics.median(t for run in runs[w] for t in run[key][part])
                   for part in ("prefill", "decode")] for w in ("old", "new")}
        (po, do), (pn, dn) = med["old"], med["new"]
        print(f"| {key} | {po:.0f} / {pn:.0f} ({pn / po:.2f}x) | {do:.1f} / {dn:.1f} ({dn / do:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
