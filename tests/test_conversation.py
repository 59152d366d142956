"""vicuna_v1 rendering and preprocess_v1 labels.

Golden ids/labels come from a numpy transcription of the official
``preprocess_v1`` run with transformers 4.37.2's slow LlamaTokenizer on the
fixture tokenizer. The fixture's sentencepiece model strips trailing
whitespace (nmt_nfkc, remove_extra_whitespaces), so "...ASSISTANT: " loses its
final "▁" and the official ``instruction_len - 2`` leaves the ":" of
``ASSISTANT:`` labelled; with LLaMA's own tokenizer only the answer and its
``</s>`` are. We reproduce the official rule either way.
"""

import json
import logging
import shutil

import pytest

from dynllava_jax.conversation import (IGNORE_INDEX, SYSTEM, build_prompt, render_conversation,
                                       tokenize_conversation_with_labels)
from dynllava_jax.tokenizer import IMAGE_TOKEN_INDEX, LlavaTokenizer

IMAGE_CONV = [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
              {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]
TEXT_CONV = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
             {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}]
PREFIX_LEN = 74  # BOS + system text + " USER:" (identical to the fixture prompts' prefix)
# legacy -> name -> (total length, ids[PREFIX_LEN:], labelled [start, end) spans)
GOLDEN = {
    True: {
        "image": (120, [-200, 336, 371, 295, 301, 262, 344, 283, 364, 289, 314, 313, 352, 311, 352,
                        361, 289, 268, 280, 351, 2, 336, 315, 312, 361, 336, 70, 335, 348, 346, 343,
                        364, 289, 314, 313, 352, 311, 352, 361, 336, 69, 345, 316, 372, 351, 2],
                  [(89, 95), (112, 120)]),
        "text": (112, [336, 75, 339, 289, 314, 313, 352, 311, 352, 361, 336, 75, 322, 345, 348, 351,
                       2, 336, 315, 312, 361, 336, 69, 124, 337, 289, 314, 313, 352, 311, 352, 361,
                       336, 69, 124, 337, 351, 2],
                 [(83, 91), (105, 112)]),
    },
    False: {  # no "▁" (336) after each </s>; the off-by-one fix keeps the spans aligned
        "image": (119, [-200, 336, 371, 295, 301, 262, 344, 283, 364, 289, 314, 313, 352, 311, 352,
                        361, 289, 268, 280, 351, 2, 315, 312, 361, 336, 70, 335, 348, 346, 343, 364,
                        289, 314, 313, 352, 311, 352, 361, 336, 69, 345, 316, 372, 351, 2],
                  [(89, 95), (111, 119)]),
        "text": (111, [336, 75, 339, 289, 314, 313, 352, 311, 352, 361, 336, 75, 322, 345, 348, 351,
                       2, 315, 312, 361, 336, 69, 124, 337, 289, 314, 313, 352, 311, 352, 361, 336,
                       69, 124, 337, 351, 2],
                 [(83, 91), (104, 111)]),
    },
}


def make_tokenizer(fixtures_dir, tmp_path, legacy):
    src, dst = fixtures_dir / "dynamic-llava-tiny", tmp_path / f"tok{legacy}"
    dst.mkdir()
    shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["legacy"] = legacy
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return LlavaTokenizer.from_dir(dst)


@pytest.fixture
def tok(fixtures_dir, tmp_path):
    return make_tokenizer(fixtures_dir, tmp_path, True)


def test_render_multi_turn():
    text = render_conversation([("human", "<image>\nQ1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", None)])
    assert text == SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert build_prompt("Q?", has_image=False) == SYSTEM + " USER: Q? ASSISTANT:"
    assert build_prompt("Q?") == SYSTEM + " USER: <image>\nQ? ASSISTANT:"
    with pytest.raises(ValueError):
        render_conversation([("user", "hi")])


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("name", ["image", "text"])
def test_golden_labels(fixtures_dir, tmp_path, legacy, name):
    tok = make_tokenizer(fixtures_dir, tmp_path, legacy)
    conv, has_image = (IMAGE_CONV, True) if name == "image" else (TEXT_CONV, False)
    ids, labels = tokenize_conversation_with_labels(tok, conv, has_image, max_length=2048)
    length, tail, spans = GOLDEN[legacy][name]
    assert len(ids) == len(labels) == length
    assert ids[PREFIX_LEN:] == tail
    assert ids[:PREFIX_LEN] == tok.tokenize_prompt(build_prompt("x"))[:PREFIX_LEN]
    expected = [IGNORE_INDEX] * length
    for start, end in spans:
        expected[start:end] = ids[start:end]
    assert labels == expected
    # Every labelled span ends with the answer's </s>.
    assert all(ids[end - 1] == tok.eos_id for _, end in spans)
    assert ids.count(IMAGE_TOKEN_INDEX) == has_image


def test_image_moved_to_front_and_leading_gpt_dropped(tok):
    moved = [{"from": "gpt", "value": "ignored"},
             {"from": "human", "value": "  What is this? <image> "}, {"from": "gpt", "value": "A cat."}]
    front = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]
    assert (tokenize_conversation_with_labels(tok, moved, True, 2048)
            == tokenize_conversation_with_labels(tok, front, True, 2048))


def test_truncation(tok):
    for conv, has_image in ((IMAGE_CONV, True), (TEXT_CONV, False)):
        full_ids, full_labels = tokenize_conversation_with_labels(tok, conv, has_image, 2048)
        ids, labels = tokenize_conversation_with_labels(tok, conv, has_image, 100)
        assert (ids, labels) == (full_ids[:100], full_labels[:100])


def test_mismatch_masks_everything(tok, caplog):
    # "</s>" inside a user message breaks the round split, as in LLaVA: the
    # sample is kept but contributes no loss.
    conv = [{"from": "human", "value": "a</s>b"}, {"from": "gpt", "value": "c"}]
    with caplog.at_level(logging.WARNING):
        ids, labels = tokenize_conversation_with_labels(tok, conv, False, 2048)
    assert labels == [IGNORE_INDEX] * len(ids)
    assert "mismatch" in caplog.text


def test_bad_turn_order(tok):
    with pytest.raises(ValueError):
        tokenize_conversation_with_labels(
            tok, [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], False, 2048)
    with pytest.raises(ValueError):
        tokenize_conversation_with_labels(tok, [{"from": "gpt", "value": "a"}], False, 2048)
