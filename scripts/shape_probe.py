#!/usr/bin/env python
"""Can the SynthVQA vision tower learn to tell shapes apart from random weights, when it is
supervised directly? A diagnostic for the recipe (docs/synthvqa_history.md).

    python scripts/shape_probe.py --radius 11 16      # the shapes' radius range, px
    python scripts/shape_probe.py --radius 17 23
    python scripts/shape_probe.py --lr 5e-4 --batch 8 --steps 4000   # stage 1's step and batch

The `synthvqa` preset's tower (random init, the layers LLaVA uses) plus a linear head on the
mean of the 4 x 4 patch features of each 3 x 3 grid cell is trained with AdamW to name the
cell's content (empty or one of the four shapes) on SynthVQA scenes drawn in memory; every
`--every` steps it prints the held-out accuracy on the cells that hold a shape (chance 25 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def scenes(n: int, seed: int, radius: tuple[int, int]):
    """[n, 3, 168, 168] normalised pixels and [n, 9] cell labels (0 empty, 1.. shapes)."""
    from dynllava_jax.data import synthvqa as S
    from dynllava_jax.image_processing import ClipSettings
    mean, std = (np.array(v, np.float32) for v in (ClipSettings.image_mean, ClipSettings.image_std))
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, S.IMAGE_SIZE, S.IMAGE_SIZE), np.float32)
    y = np.zeros((n, S.GRID * S.GRID), np.int32)
    for i in range(n):
        scene = S.make_scene(rng)
        objs = tuple(dataclasses.replace(o, radius=int(rng.integers(radius[0], radius[1] + 1)))
                     for o in scene.objects)
        scene = dataclasses.replace(scene, objects=objs)
        pix = np.asarray(S.draw_scene(scene, rng), np.float32) / 255.0
        x[i] = ((pix - mean) / std).transpose(2, 0, 1)
        for o in objs:
            y[i, o.row * S.GRID + o.col] = 1 + S.SHAPES.index(o.shape)
    return x, y


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--radius", type=int, nargs=2, default=(11, 16), metavar=("MIN", "MAX"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--every", type=int, default=250)
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    from dynllava_jax import model as M
    from dynllava_jax.config import preset
    from dynllava_jax.data.synthvqa import GRID
    from dynllava_jax.objective import cell_means
    from dynllava_jax.vision import vision_features

    t0 = time.time()
    xtr, ytr = scenes(a.train_images, 1, tuple(a.radius))
    xte, yte = scenes(500, 2, tuple(a.radius))
    cfg = preset("synthvqa")
    width = cfg.vision.hidden_size
    params = {"tower": M.init_params(cfg, jax.random.PRNGKey(0))["vision"],
              "w": jnp.zeros((width, 5)), "b": jnp.zeros((5,))}

    def logits(p, x):
        f = vision_features(p["tower"], cfg.vision, x)               # [B, 144, width]
        return cell_means(f, GRID) @ p["w"] + p["b"]

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()

    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, min(50, a.steps // 2), a.steps)
    tx = optax.adamw(sched, weight_decay=0.05)
    opt = tx.init(params)

    @jax.jit
    def step(p, opt, x, y):
        value, g = jax.value_and_grad(loss)(p, x, y)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, value

    predict = jax.jit(lambda p, x: logits(p, x).argmax(-1))
    rng = np.random.default_rng(0)
    print(f"radius {a.radius[0]}-{a.radius[1]} px, {a.train_images} images drawn in "
          f"{time.time() - t0:.0f} s", flush=True)
    for i in range(1, a.steps + 1):
        idx = rng.integers(0, a.train_images, a.batch)
        params, opt, value = step(params, opt, xtr[idx], ytr[idx])
        if i % a.every == 0 or i == a.steps:
            pred = np.concatenate([np.asarray(predict(params, xte[j:j + 100]))
                                   for j in range(0, len(xte), 100)])
            shape = yte > 0
            print(f"step {i}: loss {float(value):.3f}, held-out shape accuracy "
                  f"{(pred[shape] == yte[shape]).mean():.3f}, empty cells "
                  f"{(pred[~shape] == 0).mean():.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
