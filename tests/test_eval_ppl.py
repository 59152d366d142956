"""eval ppl: teacher-forced perplexity through the (sparse) KV cache, on the bundled tiny checkpoint."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax.eval import ppl
from dynllava_jax.generate import GenOptions
from dynllava_jax.inference import Llava, Request
from dynllava_jax.inputs import prepare_batch
from dynllava_jax.model import forward_dense

jit_forward = jax.jit(forward_dense, static_argnames=("cfg",))

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "assets" / "images"
ANSWERS = ["A portrait of a person with a red hat.", "Blue and green."]


@pytest.fixture(scope="module")
def model():
    return Llava()


@pytest.fixture(scope="module")
def requests():
    return [Request("Describe the image.", str(IMAGES / "portrait.png")),
            Request("What colours?", str(IMAGES / "gradient.jpg"))]


@pytest.fixture(scope="module")
def dense(model, requests):
    return ppl.score_batch(model, requests, ANSWERS, GenOptions(mode="dense"))


def test_answer_ids_follow_the_official_tokenisation(model):
    ids = ppl.answer_ids(model.tokenizer, " Blue and green. ")
    # tokenizer("Blue and green.</s>").input_ids[1:]: BOS dropped, EOS last
    assert ids == model.tokenizer("Blue and green.</s>")[1:] and ids[-1] == model.tokenizer.eos_id
    assert model.tokenizer.bos_id not in ids


def test_dense_ppl_equals_full_sequence_logits(model, requests, dense):
    # One forward over prompt + answer: the logits at prompt_len - 1 + j predict answer token j.
    for req, answer, got in zip(requests, ANSWERS, dense):
        target = ppl.answer_ids(model.tokenizer, answer)
        b = prepare_batch([model.prompt_ids(req) + target], model.cfg.num_image_tokens, model.tokenizer.pad_id)
        pixels = jnp.asarray(model.images.load(req.image)[None])
        logits = np.asarray(jit_forward(model.params, cfg=model.cfg, tokens_BT=jnp.asarray(b.tokens),
                                        lengths_B=jnp.asarray(b.lengths), pixels_BCHW=pixels,
                                        image_start_B=jnp.asarray(b.image_start)))[0]
        start = int(b.lengths[0]) - len(target) - 1
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll = -np.mean([lp[start + j, t] for j, t in enumerate(target)])
        assert got["nll"] == pytest.approx(nll, rel=1e-4) and got["ppl"] == pytest.approx(np.exp(nll), rel=1e-3)
        assert got["output_cache_length"] == got["output_token_length"] == len(target) - 1


def test_dynamic_keeping_everything_equals_dense(model, requests, dense):
    # Vision keep rate 1 and no output-text predictor: dynamic mode drops nothing.
    cfg = model.cfg
    keep_all = dataclasses.replace(cfg, sparse=dataclasses.replace(cfg.sparse, use_output_text_predictor=False))
    model.cfg = keep_all
    try:
        got = ppl.score_batch(model, requests, ANSWERS, GenOptions(mode="dynamic", vision_keep_rate=1.0))
    finally:
        model.cfg = cfg
    assert [g["nll"] for g in got] == pytest.approx([d["nll"] for d in dense], rel=1e-5)
    assert [g["image_tokens_kept"] for g in got] == [cfg.num_image_tokens] * 2


def test_teacher_forcing_its_own_greedy_answer_retraces_decoding(model, requests):
    # Greedy dynamic decoding (20 % of image tokens, output-text predictor on), then the same tokens
    # teacher-forced: every step's argmax is the next token, and the sparse cache kept the same
    # generated tokens, so the perplexity is measured with the cache decoding really has.
    opts = GenOptions(mode="dynamic", max_new_tokens=ppl.ANSWER_BUCKET)  # the prefill compile is shared
    answers = model.answer(requests, opts)
    eos = model.tokenizer.eos_id
    targets = [a["token_ids"] + ([eos] if len(a["token_ids"]) < opts.max_new_tokens else []) for a in answers]
    got = ppl.score_ids(model, requests, targets, GenOptions(mode="dynamic"))
    for a, t, g in zip(answers, targets, got):
        assert g["argmax_ids"] == t
        assert g["output_cache_length"] == a["generated_tokens_in_cache"]
        assert g["image_tokens_kept"] == a["image_tokens_kept"] == int(0.2 * model.cfg.num_image_tokens)
    assert any(g["output_cache_length"] < g["output_token_length"] for g in got)  # the predictor dropped some


def test_ppl_cli_writes_rows_and_a_summary(tmp_path, model):
    from dynllava_jax.eval.__main__ import main
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"id": "a", "image": "portrait.png", "question": "<image>\nDescribe the image.",
                              "answer": ANSWERS[0]},
                             {"id": "b", "image": "gradient.jpg", "question": "What colours?", "answer": ANSWERS[1]}]))
    rc = main(["ppl", "--question-file", str(q), "--image-folder", str(IMAGES), "--answers-file",
               str(tmp_path / "a.jsonl"), "--mode", "dense", "--batch-size", "2", "--json"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["a", "b"] and rows[0]["prompt"] == "<image>\nDescribe the image."
    assert all(np.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
