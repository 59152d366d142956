#!/usr/bin/env python
"""Before/after timing of `generate()` for two checkouts of this repository, interleaved.

    python scripts/ab_generate.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 2] [--batch 1 4]

Only the public `generate()` API is used, so any revision can be measured. Each round runs
one subprocess per checkout (alternating, so both see the same machine load); each
subprocess compiles, then times `--repeats` prefills (`max_new_tokens=1`) and whole
generations of `--new-tokens`, dense and dynamic, on random weights of the shapes below.
decode ms/token = (whole - prefill) / (new_tokens - 1). Prints a table of medians and
the new/old ratios.
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
rng = np.random.default_rng(0)
out = {}
for b in a["batch"]:
    ids = [[1] + rng.integers(3, 32000, 34).tolist() + [-200] + rng.integers(3, 32000, 20).tolist()
           for _ in range(b)]
    batch = prepare_batch(ids, cfg.num_image_tokens, pad_to=640)
    px = rng.normal(size=(b, 3, 336, 336)).astype(np.float32)
    for mode in ("dense", "dynamic"):
        res = {}
        for n in (1, a["new_tokens"]):
            o = GenOptions(max_new_tokens=n, mode=mode)
            generate(params, cfg, batch, px, o)
            ts = []
            for _ in range(a["repeats"]):
                t0 = time.perf_counter(); generate(params, cfg, batch, px, o); ts.append(time.perf_counter() - t0)
            res[n] = ts
        out[f"{b}/{mode}"] = res
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
    n = str(a.new_tokens)
    print(f"| batch/mode | prefill ms old / new (ratio) | decode ms/token old / new (ratio) |")
    print("|---|---|---|")
    for key in runs["old"][0]:
        med = {}
        for which in ("old", "new"):
            pre = statistics.median(t for run in runs[which] for t in run[key]["1"])
            whole = statistics.median(t for run in runs[which] for t in run[key][n])
            med[which] = (1e3 * pre, 1e3 * (whole - pre) / (a.new_tokens - 1))
        (po, do), (pn, dn) = med["old"], med["new"]
        print(f"| {key} | {po:.0f} / {pn:.0f} ({pn / po:.2f}x) | {do:.1f} / {dn:.1f} ({dn / do:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
