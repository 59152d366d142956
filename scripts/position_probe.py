#!/usr/bin/env python
"""What a SynthVQA checkpoint's residual stream knows when it answers a position question
(README, *The SynthVQA model*: position is the one type still at chance).

    python scripts/position_probe.py assets/synthvqa-dynamic-llava [--scenes 800 --seed 777]

Fresh scenes are drawn in memory (not the held-out split), one position question each
("Is the red circle to the left or to the right of the blue square?"). At the position
that predicts the answer, the hidden state entering each decoder layer and leaving the last
one is read, and linear probes (multinomial logistic regression, fitted on three quarters
of the questions, scored on the rest) are asked for: the column of the first
object named (a), of the second (b), and the answer (left/right questions only); as
controls, the question's axis there (left/right or above/below: in its text), and a's column
from the mean of a's own image tokens. Chance: about 1/3 for a column, 1/2 for the answer.
Columns readable but the answer not: the comparison is missing; readable in a's tokens but
not at the answer position: the heads that find the objects do not carry their place.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hidden_states(checkpoint, scenes: int, seed: int):
    """([layers + 1, n, H] hidden states at each question's answer position, the same for
    the mean of object a's own image tokens, labels dict)."""
    import jax.numpy as jnp
    from dynllava_jax import model as M
    from dynllava_jax import objective as O
    from dynllava_jax.checkpoint import load_converted
    from dynllava_jax.data import synthvqa as S
    from dynllava_jax.data.llava_json import encode_record, to_raw_record
    from dynllava_jax.image_processing import ImageProcessor
    from dynllava_jax.llama import run_stack
    from dynllava_jax.tokenizer import LlavaTokenizer
    cfg, params = load_converted(checkpoint)
    tok, ip = LlavaTokenizer.from_dir(checkpoint), ImageProcessor.from_dir(checkpoint)
    tmp = tempfile.mkdtemp()
    exs, pairs, answers = [], [], []
    i = 0
    while len(exs) < scenes:
        rng = S.scene_rng(seed, "train", i)
        scene = S.make_scene(rng)
        qa = S.make_question(scene, "position", rng)
        i += 1
        if qa is None:
            continue
        S.draw_scene(scene, rng).save(os.path.join(tmp, f"x{i}.png"))
        rec = S._record([qa], f"x{i}", f"x{i}.png", scene)
        exs.append(encode_record(to_raw_record(rec, i), tokenizer=tok, image_processor=ip,
                                 image_folder=tmp, num_image_tokens=cfg.num_image_tokens,
                                 seq_len=256, model_max_length=256))
        pairs.append(qa.pair)
        answers.append(qa.answer)
    pairs = np.asarray(pairs)                                           # [n, 2] cells of a, b
    lab = {"cell_a": pairs[:, 0], "col_a": pairs[:, 0] % S.GRID, "col_b": pairs[:, 1] % S.GRID,
           "answer": np.asarray(answers)}
    cells = O.image_token_cells(cfg.num_image_tokens, S.GRID)          # [N] cell of each token
    cell_a = lab["cell_a"]
    states, own = [], []
    for s in range(0, len(exs), 64):
        b = {k: jnp.asarray(np.stack([e[k] for e in exs[s:s + 64]])) for k in exs[0]}
        feats = M.image_features(params, cfg, b["pixels"])
        x = M.embed_inputs(params, cfg, b["tokens"], feats, b["image_start"])
        pos = jnp.broadcast_to(jnp.arange(x.shape[1])[None], x.shape[:2])
        q = np.argmax(np.asarray(O.answer_starts(b["labels"])[0]), axis=1)
        rows = np.arange(x.shape[0])
        # a's own image tokens: [b, N] weights, the mean over its cell's tokens
        sel = (cells[None] == cell_a[s:s + x.shape[0], None]).astype(np.float32)
        sel /= sel.sum(1, keepdims=True)
        start = np.asarray(b["image_start"])

        def read(x):
            x = np.asarray(x)
            img = np.stack([x[r, start[r]:start[r] + len(cells)] for r in rows])
            return x[rows, q], np.einsum("bn,bnh->bh", sel, img)
        per_layer = [read(x)]
        for layer in range(cfg.llm.num_layers):
            x, _ = run_stack([O.layer_at(params["llm"]["layers"], layer)], cfg.llm,
                             jnp.float32, x, pos, b["lengths"])
            per_layer.append(read(x))
        states.append(np.stack([h for h, _ in per_layer]))
        own.append(np.stack([t for _, t in per_layer]))
    return np.concatenate(states, axis=1), np.concatenate(own, axis=1), lab


def probe_accuracy(x, y, train_frac: float = 0.75, l2: float = 1e-2) -> float:
    """Held-out accuracy of a linear probe from x [n, H] to the classes of y: multinomial
    logistic regression (L-BFGS, L2 penalty) on standardised features, fitted on the first
    `train_frac` of the rows. Unlike a least-squares probe it also reads a class that lies
    between two others along one direction (a column coded as a coordinate)."""
    from scipy.optimize import minimize
    classes, y = np.unique(y, return_inverse=True)
    n, c = len(y), len(classes)
    cut = int(n * train_frac)
    mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    z = np.concatenate([(x - mu) / sd, np.ones((n, 1))], axis=1)
    t = np.eye(c)[y[:cut]]

    def loss(w):
        w = w.reshape(z.shape[1], c)
        logits = z[:cut] @ w
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        nll = -np.log(p[np.arange(cut), y[:cut]] + 1e-12).mean() + l2 * (w[:-1] ** 2).sum()
        grad = z[:cut].T @ (p - t) / cut
        grad[:-1] += 2 * l2 * w[:-1]
        return nll, grad.ravel()
    w = minimize(loss, np.zeros(z.shape[1] * c), jac=True, method="L-BFGS-B",
                 options={"maxiter": 500}).x.reshape(z.shape[1], c)
    return float(((z[cut:] @ w).argmax(1) == y[cut:]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--scenes", type=int, default=800)
    ap.add_argument("--seed", type=int, default=777)
    a = ap.parse_args(argv)
    h, own, lab = hidden_states(a.checkpoint, a.scenes, a.seed)
    lr = np.isin(lab["answer"], ("left", "right"))
    print(f"linear probes ({a.scenes} fresh position questions, {lr.sum()} of them left/right; "
          "accuracy on a held-out quarter):")
    print("                      at the answer position:                             a's own tokens:")
    print("  hidden state        axis (control)  column of a  column of b  answer     column of a")
    for k in range(h.shape[0]):
        name = "embeddings" if k == 0 else f"after layer {k - 1}"
        print(f"  {name:18s}  {probe_accuracy(h[k], lr):14.2f}  "
              f"{probe_accuracy(h[k], lab['col_a']):11.2f}  "
              f"{probe_accuracy(h[k], lab['col_b']):11.2f}  "
              f"{probe_accuracy(h[k][lr], lab['answer'][lr]):6.2f}     "
              f"{probe_accuracy(own[k], lab['col_a']):11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
