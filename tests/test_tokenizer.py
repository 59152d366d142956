"""LlavaTokenizer against the official recordings and transformers-4.37.2 outputs.

The hard-coded ids below were produced by transformers 4.37.2's slow
LlamaTokenizer (``encode(s, add_special_tokens=False)`` / ``decode(ids,
skip_special_tokens=True)``) on the fixture's tokenizer.model, with the
config's ``legacy`` flag set as named.
"""

import json
import shutil

import pytest

from dynllava_jax.conversation import build_prompt
from dynllava_jax.tokenizer import IMAGE_TOKEN_INDEX, LlavaTokenizer

GOLDEN_ENCODE = {
    True: {
        "</s>USER: hi": [2, 336, 315, 312, 361, 336, 344, 339],
        " Hello  world\n": [336, 75, 322, 345, 348, 336, 356, 348, 343, 345, 349],
        "a</s> b": [259, 2, 276],
        "Über 😀 日本": [336, 198, 159, 353, 263, 336, 243, 162, 155, 131, 336, 233, 154, 168, 233,
                       159, 175],
        "▁x <unk>y": [336, 123, 0, 336, 124],
    },
    False: {
        "</s>USER: hi": [2, 315, 312, 361, 336, 344, 339],  # no "▁" (336) after </s>
        " Hello  world\n": [336, 75, 322, 345, 348, 336, 356, 348, 343, 345, 349],
        "a</s> b": [259, 2, 276],
        "Über 😀 日本": [336, 198, 159, 353, 263, 336, 243, 162, 155, 131, 336, 233, 154, 168, 233,
                       159, 175],
        "▁x <unk>y": [336, 123, 0, 124],
    },
}
GOLDEN_DECODE = {
    True: {"</s>USER: hi": "USER: hi", " Hello  world\n": "Hello world", "a</s> b": "a b",
           "Über 😀 日本": "Über 😀 日本", "▁x <unk>y": "x y"},
    False: {"</s>USER: hi": "USER: hi", " Hello  world\n": "Hello world", "a</s> b": "a b",
            "Über 😀 日本": "Über 😀 日本", "▁x <unk>y": "xy"},
}


@pytest.fixture(scope="module")
def tok_dir(fixtures_dir):
    return fixtures_dir / "dynamic-llava-tiny"


@pytest.fixture(scope="module")
def cases(fixtures_dir):
    return json.loads((fixtures_dir / "expected.json").read_text())["cases"]


def tokenizer_with_legacy(src, dst, legacy):
    """Copy of the fixture tokenizer with ``legacy`` set (or removed when None)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    if legacy is None:
        cfg.pop("legacy", None)
    else:
        cfg["legacy"] = legacy
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return LlavaTokenizer.from_dir(dst)


def test_official_prompt_ids(tok_dir, cases):
    tok = LlavaTokenizer.from_dir(tok_dir)
    assert tok.legacy is True
    for case in cases:
        assert tok.tokenize_prompt(case["prompt"]) == case["prompt_ids"]
        assert build_prompt(case["question"], has_image=case["image"] is not None) == case["prompt"]
        assert case["prompt_ids"].count(IMAGE_TOKEN_INDEX) == (case["image"] is not None)


@pytest.mark.parametrize("legacy", [True, False])
def test_golden_encode_decode(tok_dir, tmp_path, legacy):
    tok = tokenizer_with_legacy(tok_dir, tmp_path / "tok", legacy)
    assert tok.legacy is legacy
    for text, ids in GOLDEN_ENCODE[legacy].items():
        assert tok.encode(text) == ids, text
        assert tok(text) == [tok.bos_id] + ids
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == GOLDEN_DECODE[legacy][text]


def test_prompt_structure(tok_dir):
    tok = LlavaTokenizer.from_dir(tok_dir)
    ids = tok.tokenize_prompt("before<image>after<image>")
    assert ids == ([tok.bos_id] + tok.encode("before") + [IMAGE_TOKEN_INDEX] + tok.encode("after")
                   + [IMAGE_TOKEN_INDEX])
    assert tok.tokenize_prompt("<image>") == [tok.bos_id, IMAGE_TOKEN_INDEX]
    assert tok.decode(ids) == tok.decode([i for i in ids if i >= 0])


def test_special_ids_and_defaults(tok_dir, tmp_path):
    tok = LlavaTokenizer.from_dir(tok_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 384)
    # A config without the flag means legacy=True, as in transformers 4.37.
    assert tokenizer_with_legacy(tok_dir, tmp_path / "nolegacy", None).legacy is True
    # No config at all: LLaMA defaults.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(tok_dir / "tokenizer.model", bare / "tokenizer.model")
    assert LlavaTokenizer.from_dir(bare).encode("a</s> b") == GOLDEN_ENCODE[True]["a</s> b"]
    with pytest.raises(FileNotFoundError):
        LlavaTokenizer.from_dir(tmp_path / "missing")


def test_save_roundtrip(tok_dir, tmp_path):
    tok = tokenizer_with_legacy(tok_dir, tmp_path / "src", False)
    tok.save(tmp_path / "dst")
    again = LlavaTokenizer.from_dir(tmp_path / "dst")
    assert again.legacy is False
    for text in GOLDEN_ENCODE[False]:
        assert again.encode(text) == tok.encode(text)
