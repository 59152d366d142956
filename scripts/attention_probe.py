#!/usr/bin/env python
"""Where a SynthVQA checkpoint looks when it answers: the attention objective's read-out
(docs/synthvqa_history.md).

    python scripts/attention_probe.py runs/synthvqa_dense/export [--scenes 64 --seed 777]

Fresh scenes are drawn in memory with `train_record`'s questions (not the held-out split);
at the position that predicts each answer whose question names one object (colour, shape,
presence "yes", multiple choice about a colour or a shape), the attention of head
`--head` of layer `--layer` (recomputed from the hidden states entering it, as
`objective.attention_nll` does) is summed over that object's 16 image tokens. Prints, per
question kind, the mean mass and the share of answers with more than half of it there
(uniform attention over a ~300-token prompt would put ~0.05 there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def question_kind(question: str) -> str:
    q = question.replace("<image>\n", "")
    kind = ("colour" if "colour is" in q else "shape" if "shape is" in q
            else "presence" if q.startswith("Is there") else "other")
    return f"choice ({kind})" if "\nA." in q else kind


def probe(checkpoint, scenes: int = 64, seed: int = 777, layer: int = 1,
          head: int = 0) -> dict[str, list[float]]:
    import jax.numpy as jnp
    from dynllava_jax import model as M
    from dynllava_jax import objective as O
    from dynllava_jax.checkpoint import load_converted
    from dynllava_jax.data import synthvqa as S
    from dynllava_jax.data.llava_json import encode_record, to_raw_record
    from dynllava_jax.image_processing import ImageProcessor
    from dynllava_jax.llama import run_stack, split_layers
    from dynllava_jax.tokenizer import LlavaTokenizer
    cfg, params = load_converted(checkpoint)
    tok, ip = LlavaTokenizer.from_dir(checkpoint), ImageProcessor.from_dir(checkpoint)
    tmp = tempfile.mkdtemp()
    recs, exs = [], []
    for i in range(scenes):
        rng = S.scene_rng(seed, "train", i)
        scene = S.make_scene(rng)
        S.draw_scene(scene, rng).save(os.path.join(tmp, f"x{i}.png"))
        rec = S.train_record(scene, rng, f"x{i}", f"x{i}.png", with_describe=False)
        recs.append(rec)
        exs.append(encode_record(to_raw_record(rec, i), tokenizer=tok, image_processor=ip,
                                 image_folder=tmp, num_image_tokens=cfg.num_image_tokens,
                                 seq_len=384, model_max_length=384, cell_grid=S.GRID,
                                 attention_turns=8))
    b = {k: jnp.asarray(np.stack([e[k] for e in exs])) for k in exs[0]}
    feats = M.image_features(params, cfg, b["pixels"])
    x = M.embed_inputs(params, cfg, b["tokens"], feats, b["image_start"])
    pos = jnp.broadcast_to(jnp.arange(x.shape[1])[None], x.shape[:2])
    first, _ = split_layers(params["llm"]["layers"], layer)
    x, _ = run_stack(first, cfg.llm, jnp.float32, x, pos, b["lengths"])
    marks = np.asarray(O.attention_queries(b["labels"], b["turn_cells"], b["image_start"]))
    lp = O.layer_at(params["llm"]["layers"], layer)
    out: dict[str, list[float]] = defaultdict(list)
    for i, rec in enumerate(recs):
        questions = [m["value"] for m in rec["conversations"][::2]]
        named = [k for k, c in enumerate(rec["turn_cells"]) if c >= 0]
        for t, k in zip(np.flatnonzero(marks[i] >= 0), named):   # one query at a time
            cells = np.full((1, marks.shape[1]), -1, np.int32)
            cells[0, t] = marks[i, t]
            _, mass = O.attention_nll(lp, cfg, x[i:i + 1], pos[i:i + 1], b["lengths"][i:i + 1],
                                      b["image_start"][i:i + 1], jnp.asarray(cells), S.GRID, head)
            out[question_kind(questions[k])].append(float(mass[0]))
    return dict(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--head", type=int, default=0)
    a = ap.parse_args(argv)
    res = probe(a.checkpoint, a.scenes, a.seed, a.layer, a.head)
    print(f"attention of head {a.head}, layer {a.layer} on the named object's cell "
          f"({a.scenes} fresh scenes):")
    for kind, v in sorted(res.items()):
        v = np.asarray(v)
        print(f"  {kind:18s} {len(v):4d} answers: mean mass {v.mean():.3f}, "
              f"> 0.5 in {100 * (v > 0.5).mean():.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
