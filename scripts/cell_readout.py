#!/usr/bin/env python
"""How well a SynthVQA checkpoint's image tokens name what each grid cell holds: the cell
objective's read-out (docs/synthvqa_history.md).

    python scripts/cell_readout.py runs/synthvqa_dense/export [--scenes 200 --seed 123]

Fresh scenes are drawn in memory; for every cell that holds a shape (or the word), the
cell's mean projected image token is scored against the LLM's input embeddings of the
candidate words of each attribute (the four shapes, six colours, two sizes, twelve words),
and the argmax is compared with the truth. Prints the accuracy per attribute (chance: shape
25 %, colour 17 %, size 50 %, word 8 %). `--per-token` scores each of the cell's tokens on
its own instead of their mean (what `objective.cell_per_token` trains): whether every token
names the cell's object, as the LLM needs to find it by attending to any of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def readout(checkpoint, scenes: int = 200, seed: int = 123,
            per_token: bool = False) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from dynllava_jax import model as M
    from dynllava_jax.checkpoint import load_converted
    from dynllava_jax.data import synthvqa as S
    from dynllava_jax.image_processing import ImageProcessor
    from dynllava_jax.objective import cell_tokens
    from dynllava_jax.tokenizer import LlavaTokenizer
    cfg, params = load_converted(checkpoint)
    tok, ip = LlavaTokenizer.from_dir(checkpoint), ImageProcessor.from_dir(checkpoint)
    words = {"shape": list(S.SHAPES), "colour": list(S.COLOURS), "size": ["small", "large"],
             "word": list(S.WORDS)}
    ids = {k: np.array([tok.encode(w)[0] for w in ws]) for k, ws in words.items()}
    rng = np.random.default_rng(seed)
    drawn = [S.make_scene(rng) for _ in range(scenes)]
    pixels = np.stack([np.asarray(ip(S.draw_scene(s, rng))) for s in drawn])
    feats = jax.jit(lambda p, x: M.image_features(p, cfg, x))
    f = np.concatenate([np.asarray(feats(params, jnp.asarray(pixels[i:i + 50])))
                        for i in range(0, scenes, 50)])
    table = np.asarray(params["llm"]["embed_tokens"]["embedding"]).T
    # [B, C, P, V]: P = 1 (the cell's mean token) or every token of the cell
    cells = cell_tokens(f, S.GRID)
    logits = (cells if per_token else cells.mean(2, keepdims=True)) @ table
    hits: dict[str, list[bool]] = {k: [] for k in words}

    def pick(i, cell, k):
        return [words[k][int(j)] for j in np.argmax(logits[i, cell][:, ids[k]], axis=-1)]

    for i, s in enumerate(drawn):
        for o in s.objects:
            c = o.row * S.GRID + o.col
            truth = {"shape": o.shape, "colour": o.colour, "size": S.size_word(o)}
            for k, v in truth.items():
                hits[k] += [w == v for w in pick(i, c, k)]
        if s.word:
            hits["word"] += [w == s.word for w in pick(i, s.word_row * S.GRID + s.word_col, "word")]
    return {k: float(np.mean(v)) for k, v in hits.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a converted SynthVQA checkpoint (train.py's export)")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--per-token", action="store_true",
                    help="score every token of a cell, not the cell's mean token")
    a = ap.parse_args(argv)
    acc = readout(Path(a.checkpoint), a.scenes, a.seed, a.per_token)
    print(f"{'token' if a.per_token else 'cell'} read-out accuracy: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
