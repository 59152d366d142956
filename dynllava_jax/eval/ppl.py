"""Perplexity of reference answers under teacher forcing, as Dynamic-LLaVA's
``llava/eval/model_lvis_for_ppl.py`` measures generation quality.

Protocol, as there: the prompt (image + question in the vicuna_v1 template) is prefilled; then the
reference answer's tokens (``tokenizer(answer + "</s>").input_ids[1:]``: the answer tokenized on its
own, BOS dropped, EOS last) are fed one at a time through the KV cache, exactly as decoding feeds
its own tokens. In dynamic mode the image predictor prunes the prompt's image tokens at prefill and
the output-text predictor decides for each fed token whether the sparse layers keep it, so the
perplexity shows what the sparse cache costs. A question's perplexity is exp(mean cross-entropy)
over its answer tokens; ``mean_ppl`` is the mean over questions.

Unlike the official script, a question without an image is scored as a text-only prompt (there it
prints "skip!" but still counts in the mean's denominator), and the summary is returned, not
appended to the answers file as a last row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..generate import DecodeJit, GenOptions, compacted_length, decode_step, jit_prefill
from ..inputs import expanded_length, prepare_batch, round_up
from ..inference import Request, prompt_bucket
from .files import UserError, read_json, read_jsonl

ANSWER_BUCKET = 32  # answers are padded to a multiple of this: one compile serves many batches


@partial(DecodeJit, static_argnames=("cfg", "opts"))  # compiled as the decoding loop is
def forced_steps(params, first_logits, state, targets_BN, target_len_B, *, cfg, opts):
    """After `prefill`: log-probabilities [B, N] of the targets fed through the cache one at a time
    (0 past target_len), each step's argmax [B, N], generated tokens kept in the sparse caches
    [B] and the image keep mask [B, N_img]."""
    first_gen = state.sparse_len

    def pick(logits, target):
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(lp, target[:, None], axis=1)[:, 0], jnp.argmax(logits, axis=-1)

    def step(state, j):
        # Feed target j-1 and score target j; a finished row's padding never enters the sparse
        # caches (as decoding treats rows past EOS).
        active = j < target_len_B
        logits, state = decode_step(params, targets_BN[:, j - 1], state, active, cfg=cfg, opts=opts)
        return state, pick(logits, targets_BN[:, j])

    lp0, am0 = pick(first_logits, targets_BN[:, 0])
    state, (lps, ams) = jax.lax.scan(step, state, jnp.arange(1, targets_BN.shape[1]))
    lp = jnp.concatenate([lp0[:, None], lps.T], axis=1)
    am = jnp.concatenate([am0[:, None], ams.T], axis=1)
    real = jnp.arange(targets_BN.shape[1])[None, :] < target_len_B[:, None]
    return jnp.where(real, lp, 0.0), am, state.sparse_len - first_gen, state.image_keep


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The reference tokens, as the official script makes them (first id dropped: BOS)."""
    return tokenizer(answer.strip() + "</s>")[1:]


def score_batch(model, requests: list[Request], answers: list[str], opts: GenOptions) -> list[dict]:
    """Perplexity and cache figures for each (request, reference answer)."""
    return score_ids(model, requests, [answer_ids(model.tokenizer, a) for a in answers], opts)


def score_ids(model, requests: list[Request], targets: list[list[int]], opts: GenOptions) -> list[dict]:
    """As `score_batch`, for answers given as token ids (each non-empty)."""
    cfg = model.cfg
    if any(not t for t in targets):
        raise UserError("an answer has no tokens")
    n = round_up(max(len(t) for t in targets), ANSWER_BUCKET)
    opts = dataclasses.replace(opts, max_new_tokens=n, use_cache=True)  # caches sized for the answers
    ids = [model.prompt_ids(r) for r in requests]
    limit = cfg.llm.max_position_embeddings
    for r, p, t in zip(requests, ids, targets):
        if expanded_length(p, cfg.num_image_tokens) + len(t) > limit:
            raise UserError(f"question {r.question[:40]!r}: prompt and answer take "
                            f"{expanded_length(p, cfg.num_image_tokens) + len(t)} positions, "
                            f"the model holds {limit}")
    longest = max(expanded_length(p, cfg.num_image_tokens) for p in ids)
    batch = prepare_batch(ids, cfg.num_image_tokens, model.tokenizer.pad_id,
                          pad_to=max(longest, prompt_bucket(longest, limit - n)))
    pixels = None
    if any(r.image is not None for r in requests):
        s = model.images.image_size
        pixels = np.zeros((len(requests), 3, s, s), np.float32)
        for i, r in enumerate(requests):
            if r.image is not None:
                pixels[i] = model.images.load(r.image)
    tgt = np.full((len(requests), n), model.tokenizer.pad_id, np.int32)
    for i, t in enumerate(targets):
        tgt[i, : len(t)] = t
    # The prompt pass is generation's own compiled prefill (shared with `generate` for equal options).
    logits, state = jit_prefill(model.params, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
                                jnp.asarray(batch.image_start), None if pixels is None else jnp.asarray(pixels),
                                cfg=cfg, opts=opts, compact_len=compacted_length(batch, cfg, opts))
    lp, argmax, in_cache, image_keep = forced_steps(model.params, logits, state, jnp.asarray(tgt),
                                                    jnp.asarray([len(t) for t in targets], jnp.int32),
                                                    cfg=cfg, opts=opts)
    lp, argmax, in_cache, image_keep = map(np.asarray, (lp, argmax, in_cache, image_keep))
    out = []
    for i, (r, t) in enumerate(zip(requests, targets)):
        nll = -float(lp[i, : len(t)].sum()) / len(t)
        out.append({"ppl": math.exp(nll), "nll": nll, "answer_tokens": len(t),
                    "output_token_length": len(t) - 1,  # answer tokens fed to the model
                    "output_cache_length": int(in_cache[i]),
                    "image_tokens_kept": int(image_keep[i].sum()) if r.image is not None else 0,
                    "argmax_ids": argmax[i, : len(t)].tolist(), "answer_ids": t})
    return out


def score_questions(model, questions: list[dict], image_folder, opts: GenOptions, batch_size: int = 8,
                    answers_file=None) -> list[dict]:
    """One row per question (``read_questions`` records), in batches of batch_size, each written
    and flushed to answers_file (if given) as it is made."""
    from tqdm import tqdm

    from ..inputs import InputError
    rows = []
    out = open(answers_file, "w") if answers_file else None
    try:
        with tqdm(total=len(questions), desc="ppl", unit="q", file=sys.stderr) as bar:
            for i in range(0, len(questions), batch_size):
                chunk = questions[i: i + batch_size]
                reqs = [Request(q["question"], str(Path(image_folder) / q["image"]) if q["image"] else None)
                        for q in chunk]
                # A short last batch is padded with copies so that it reuses the compiled shapes.
                pad = min(batch_size, len(questions)) - len(reqs)
                try:
                    res = score_batch(model, reqs + reqs[-1:] * pad,
                                      [q["answer"] for q in chunk + chunk[-1:] * pad], opts)
                except (OSError, ValueError) as e:  # bad image or prompt: say which questions
                    raise InputError(f"question(s) {[q['id'] for q in chunk]}: {e}") from None
                for q, r in zip(chunk, res):
                    row = {"question_id": q["id"], "prompt": ("<image>\n" if q["image"] else "") + q["question"],
                           "model_id": model.path.name, "mode": opts.mode,
                           **{k: v for k, v in r.items() if k not in ("argmax_ids", "answer_ids")}}
                    rows.append(row)
                    if out:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                bar.update(len(chunk))
    finally:
        if out:
            out.close()
    return rows


def summary(rows: list[dict]) -> dict:
    """Means over questions, as the official script's last line."""
    if not rows:
        raise UserError("no question was scored")
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    return {"questions": len(rows), "mean_ppl": mean("ppl"),
            "mean_output_token_length": mean("output_token_length"),
            "mean_output_cache_length": mean("output_cache_length"),
            "mean_image_tokens_kept": mean("image_tokens_kept")}


def read_questions(path) -> list[dict]:
    """The official LVIS-style question file: a JSON list (or JSONL) of {id, image, question, answer};
    ``question_id`` / ``text`` are accepted for ``id`` / ``question`` (LLaVA's eval .jsonl names)."""
    rows = read_jsonl(path) if Path(path).suffix == ".jsonl" else read_json(path)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a list of questions")
    out = []
    for i, r in enumerate(rows):
        qid = r.get("id", r.get("question_id")) if isinstance(r, dict) else None
        question = r.get("question", r.get("text")) if isinstance(r, dict) else None
        if qid is None or not isinstance(question, str) or not isinstance(r.get("answer"), str):
            raise UserError(f"{path}: question {i} needs id, question and answer (a string)")
        out.append({"id": qid, "image": r.get("image"), "question": question.replace("<image>", "").strip(),
                    "answer": r["answer"]})
    return out
