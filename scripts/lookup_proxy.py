#!/usr/bin/env python
"""Can an LLM of the SynthVQA size learn to look up a named object? A PyTorch proxy.

The LLM of the `synthvqa` preset (LLaMA, 4 layers x 128, 4 heads, MLP 344) is trained on
SynthVQA's colour and shape questions with a *perfect* vision tower: the image is `--cells`
tokens laid out as a 3 x 3 grid (9: one token a cell; 144: the 12 x 12 patch grid, 16
tokens a cell), each token the sum of the input embeddings of the colour and shape words of
its cell's object (`empty` where there is none). Prompt: ``USER: <cells> What shape is the
red object? ASSISTANT:``; the loss is on the one answer token; one question a sequence.
(`--questions N`: N such turns a sequence, each answer scored; a later turn may be answered
by an earlier answer, so the first questions' accuracy is printed too.)
Prints the training accuracy over the last 100 steps (chance: about 1 in 2-3 present
words, 0.35-0.55). Answering "some shape that is in the image" needs no lookup; above ~0.6
the model finds the named cell. (docs/synthvqa_history.md.)

    python scripts/lookup_proxy.py --embed-std 0.02      # LLaMA's init: learnt by ~step 900
    python scripts/lookup_proxy.py --embed-std 0.088     # flax's default scale: not by 1,500
    python scripts/lookup_proxy.py --cells 144           # the real token count: not by 1,500
    python scripts/lookup_proxy.py --cells 144 --batch 32 --lr 1e-3   # 0.70 by step 1,000
    python scripts/lookup_proxy.py --cells 144 --questions 4          # 0.75 by step 900
    python scripts/lookup_proxy.py --cells 144 --attention-loss 1     # see the README's table

`--features CHECKPOINT` gives the image as a real tower's tokens instead: the projected image
tokens of CHECKPOINT (a SynthVQA checkpoint, e.g. the bundled one) for `--scenes` scenes drawn
by SynthVQA's generator, asked about their objects (`--cells` does not apply); the last
`--heldout` scenes are kept out of training and their accuracy (one question each) is printed.

`--attention-loss W` adds W x the mean over answers of -log(the attention mass that head 0 of
layer `--attention-layer` puts, at the position that predicts the answer, on the named
object's cell tokens): a supervised attention signal (not in Dynamic-LLaVA), to see whether
the lookup is learnt once finding the cell is taught directly.

Needs torch and sentencepiece, and `data/synthvqa/tokenizer` (python -m dynllava_jax.data.synthvqa).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynllava_jax.data.synthvqa import COLOURS, GRID, SHAPES  # noqa: E402

COLOUR_WORDS = tuple(COLOURS)   # the dataset's colour names, in its order


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="data/synthvqa/tokenizer/tokenizer.model")
    ap.add_argument("--embed-std", type=float, default=0.02,
                    help="std of the input embedding table at init (every linear kernel: 0.02)")
    ap.add_argument("--cells", type=int, choices=(9, 144), default=9)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--questions", type=int, default=1,
                    help="questions a sequence, each answered (as a SynthVQA record's turns)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attention-loss", type=float, default=0.0,
                    help="weight of the supervised attention term (0: off)")
    ap.add_argument("--attention-layer", type=int, default=1)
    ap.add_argument("--features", default="",
                    help="a SynthVQA checkpoint whose image tokens replace the ideal ones")
    ap.add_argument("--scenes", type=int, default=6000, help="scenes drawn for --features")
    ap.add_argument("--heldout", type=int, default=500,
                    help="--features: the last N scenes are not trained on; one question each "
                         "is answered every 100 steps (held-out accuracy)")
    a = ap.parse_args(argv)
    if a.features:
        a.cells = 144
        scenes, feats = real_tokens(Path(a.features), a.scenes, a.seed)

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(a.seed)
    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)

    def piece(word: str) -> int:  # each of these words is one piece of the SynthVQA tokenizer
        return sp.encode(word)[0]

    cid, sid, empty = [piece(c) for c in COLOUR_WORDS], [piece(s) for s in SHAPES], piece("empty")
    cfg = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=344,
                      max_position_embeddings=1024, initializer_range=0.02,
                      # eager returns the attention weights; the default (sdpa) otherwise, as
                      # the README's runs without --attention-loss
                      attn_implementation="eager" if a.attention_loss > 0 else None)
    m = LlamaForCausalLM(cfg)
    emb = m.get_input_embeddings()
    with torch.no_grad():
        emb.weight.normal_(0.0, a.embed_std)
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.05)
    warm = max(1, int(0.05 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, s / warm) * 0.5 * (1 + np.cos(np.pi * min(s, a.steps) / a.steps)))
    rng = np.random.default_rng(a.seed)
    prefix = sp.encode("USER:")
    side = int(round(a.cells ** 0.5))

    def sample(i=None, r=rng, questions=a.questions):
        if a.features:  # one of the drawn scenes, questions about its objects
            i = int(r.integers(len(scenes) - a.heldout)) if i is None else i
            objs = scenes[i].objects
            turns = []
            for _ in range(questions):
                o = objs[int(r.integers(len(objs)))]
                if r.integers(2):
                    q, ans = f"What shape is the {o.colour} object? ASSISTANT:", piece(o.shape)
                else:
                    q, ans = f"What colour is the {o.shape}? ASSISTANT:", piece(o.colour)
                turns.append((sp.encode(q), ans, o.row * GRID + o.col))
            return i, turns
        n = int(rng.integers(1, 5))
        cells = rng.permutation(GRID * GRID)[:n]
        cs, ss = rng.permutation(len(COLOUR_WORDS))[:n], rng.permutation(len(SHAPES))[:n]
        grid = {int(c): (cid[ci], sid[si]) for c, ci, si in zip(cells, cs, ss)}
        turns = []
        for _ in range(a.questions):
            k = int(rng.integers(n))
            if rng.integers(2):
                q, ans = f"What shape is the {COLOUR_WORDS[cs[k]]} object? ASSISTANT:", sid[ss[k]]
            else:
                q, ans = f"What colour is the {SHAPES[ss[k]]}? ASSISTANT:", cid[cs[k]]
            turns.append((sp.encode(q), ans, int(cells[k])))
        return grid, turns

    per = side // GRID  # each grid cell's image tokens, as offsets
    cell_positions = {k: [r * side + c for r in range(side) for c in range(side)
                          if (r // per) * GRID + c // per == k] for k in range(GRID * GRID)}

    def cell_tokens(grid):
        if a.features:  # `grid` is the scene's index
            return torch.from_numpy(feats[grid])
        rows = []
        for r in range(side):
            for c in range(side):
                hit = grid.get((r // per) * GRID + c // per)
                rows.append(emb.weight[hit[0]] + emb.weight[hit[1]] if hit else emb.weight[empty])
        return torch.stack(rows)

    def inputs(batch):
        n_max = len(prefix) + a.cells + max(sum(len(q) + 1 for q, _, _ in t) for _, t in batch)
        x = torch.zeros(len(batch), n_max, cfg.hidden_size)
        labels = torch.full((len(batch), n_max), -100)
        att = torch.zeros(len(batch), n_max, dtype=torch.long)
        where = []  # (row, position predicting the answer, answer id, first turn?, cell)
        for j, (grid, turns) in enumerate(batch):
            ids = [i for q, ans, _ in turns for i in q + [ans]]
            row = torch.cat([emb(torch.tensor(prefix)), cell_tokens(grid), emb(torch.tensor(ids))])
            n = row.shape[0]
            x[j, :n], att[j, :n] = row, 1
            pos = len(prefix) + a.cells
            for t, (q, ans, cell) in enumerate(turns):
                pos += len(q)
                labels[j, pos] = ans
                where.append((j, pos - 1, ans, t == 0, cell))
                pos += 1
        return x, labels, att, where

    held = []
    if a.features:  # one fixed question about each held-out scene
        r = np.random.default_rng([a.seed, 99])
        held = [sample(i, r, 1) for i in range(len(scenes) - a.heldout, len(scenes))]

    def heldout_accuracy():
        right = []
        with torch.no_grad():
            for k in range(0, len(held), 100):
                x, labels, att, where = inputs(held[k:k + 100])
                pred = m(inputs_embeds=x, attention_mask=att).logits.argmax(-1)
                right += [int(pred[j, p]) == ans for j, p, ans, _, _ in where]
        return float(np.mean(right))

    hits, hits_first, t0 = [], [], time.time()
    for step in range(1, a.steps + 1):
        x, labels, att, where = inputs([sample() for _ in range(a.batch)])
        out = m(inputs_embeds=x, attention_mask=att, labels=labels,
                output_attentions=a.attention_loss > 0)
        loss = out.loss
        if a.attention_loss > 0:
            probs = out.attentions[a.attention_layer][:, 0]           # [B, query, key]
            mass = torch.stack([probs[j, p, [len(prefix) + o for o in cell_positions[c]]].sum()
                                for j, p, _, _, c in where])
            loss = loss + a.attention_loss * -mass.clamp_min(1e-6).log().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        pred = out.logits.argmax(-1)
        hits += [int(pred[j, p]) == ans for j, p, ans, _, _ in where]
        hits_first += [int(pred[j, p]) == ans for j, p, ans, f, _ in where if f]
        if step % 100 == 0:
            print(f"step {step}: loss {out.loss.item():.3f}, accuracy (last 100 steps) "
                  f"{np.mean(hits[-100 * a.batch * a.questions:]):.3f}"
                  + (f" (first questions {np.mean(hits_first[-100 * a.batch:]):.3f})" if a.questions > 1 else "")
                  + (f", attention mass on the cell {mass.mean().item():.2f}" if a.attention_loss > 0 else "")
                  + (f", held-out {heldout_accuracy():.3f}" if held else "")
                  + f", {time.time() - t0:.0f} s", flush=True)
    return 0


def real_tokens(checkpoint: Path, n: int, seed: int):
    """(scenes, projected image tokens [n, 144, hidden] float32) of `n` SynthVQA scenes
    drawn from `seed`, through the checkpoint's vision tower and projector (JAX)."""
    import jax
    import jax.numpy as jnp
    from dynllava_jax import model as M
    from dynllava_jax.checkpoint import load_converted
    from dynllava_jax.data import synthvqa as S
    from dynllava_jax.image_processing import ImageProcessor
    cfg, params = load_converted(checkpoint)
    ip = ImageProcessor.from_dir(checkpoint)
    rng = np.random.default_rng([seed, 1])
    scenes = [S.make_scene(rng) for _ in range(n)]
    f = jax.jit(lambda p, x: M.image_features(p, cfg, x))
    out = []
    for i in range(0, n, 100):
        px = np.stack([np.asarray(ip(S.draw_scene(sc, rng))) for sc in scenes[i:i + 100]])
        out.append(np.asarray(f(params, jnp.asarray(px)), np.float32))
    return scenes, np.concatenate(out)


if __name__ == "__main__":
    sys.exit(main())
