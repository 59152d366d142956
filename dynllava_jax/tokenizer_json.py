"""A LLaMA ``tokenizer.json`` (tokenizers' BPE with byte fallback) as a sentencepiece model.

transformers 5's ``save_pretrained`` writes only ``tokenizer.json``, no ``tokenizer.model``.
LLaVA's tokenisation rules (SPEC §1, ``tokenizer.py``) are defined on sentencepiece, so
the JSON's vocabulary and merges are turned back into the sentencepiece BPE model they were
converted from: the pieces in id order, each merged piece scored by the rank of the first
merge that makes it (sentencepiece merges the best-scored pair first, tokenizers the
lowest-ranked merge: the same order), LLaMA's normaliser (no rules, dummy prefix, spaces
kept). The model proto is written as wire bytes, so no protobuf classes are needed.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# sentencepiece piece types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE_T = 1, 2, 3, 4, 6


class TokenizerFileError(ValueError):
    """A tokenizer file is missing, unreadable or of a kind LLaVA's rules cannot use."""


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte varints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _msg(num: int, body: bytes) -> bytes:
    return _field(num, 2, _varint(len(body)) + body)


def _int(num: int, v: int) -> bytes:
    return _field(num, 0, _varint(int(v)))


def _str(num: int, s: str) -> bytes:
    raw = s.encode("utf-8")
    return _field(num, 2, _varint(len(raw)) + raw)


def _float(num: int, x: float) -> bytes:
    return _field(num, 5, struct.pack("<f", x))


def read_tokenizer_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerFileError(f"{path} is not a readable tokenizer.json: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerFileError(f"{path}: no 'model' object (not a tokenizers tokenizer.json)")
    return data


def sentencepiece_proto(data: dict, path: Path) -> bytes:
    """Serialized sentencepiece ModelProto of a LLaMA-style BPE ``tokenizer.json``."""
    model = data["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise TokenizerFileError(
            f"{path}: model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) is not a "
            "LLaMA sentencepiece BPE tokenizer; LLaVA's tokenisation needs tokenizer.model or one")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFileError(f"{path}: model.vocab is missing or empty")
    by_id = {}
    for piece, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0 or i in by_id:
            raise TokenizerFileError(f"{path}: model.vocab id {i!r} of {piece!r} is not a unique id >= 0")
        by_id[i] = piece
    n = len(by_id)
    if set(by_id) != set(range(n)):
        raise TokenizerFileError(f"{path}: model.vocab ids are not 0..{n - 1}")
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TokenizerFileError(f"{path}: model.merges[{r}] {m!r} is not a pair of pieces")
        rank.setdefault(pair[0] + pair[1], r)
    added = {a.get("id"): a for a in data.get("added_tokens") or [] if isinstance(a, dict)}
    unk = model.get("unk_token")
    special_ids = {"unk": None, "bos": None, "eos": None}
    body = bytearray()
    for i in range(n):
        piece, a = by_id[i], added.get(i)
        if (unk is not None and piece == unk) or (a and a.get("special") and piece == "<unk>"):
            kind, special_ids["unk"] = _UNKNOWN, i
        elif a and a.get("special"):
            kind = _CONTROL
            if piece == "<s>":
                special_ids["bos"] = i
            elif piece == "</s>":
                special_ids["eos"] = i
        elif a:
            kind = _USER_DEFINED
        elif _BYTE.match(piece):
            kind = _BYTE_T
        else:
            kind = _NORMAL
        score = -float(rank[piece]) if kind == _NORMAL and piece in rank else 0.0
        body += _msg(1, _str(1, piece) + _float(2, score) + _int(3, kind))
    if special_ids["unk"] is None:
        raise TokenizerFileError(f"{path}: no <unk> token in model.vocab (sentencepiece needs one)")
    trainer = (_int(3, 2) + _int(4, n) + _int(35, 1) + _int(40, special_ids["unk"])
               + _int(41, -1 if special_ids["bos"] is None else special_ids["bos"])
               + _int(42, -1 if special_ids["eos"] is None else special_ids["eos"]) + _int(43, -1))
    normalizer = _str(1, "identity") + _int(3, 1) + _int(4, 0) + _int(5, 1)
    return bytes(body) + _msg(2, trainer) + _msg(3, normalizer)


def top_level_fields(proto: bytes) -> set[int]:
    """Field numbers present at the top level of a protobuf message (empty if it is garbled)."""
    seen, i, n = set(), 0, len(proto)

    def varint(i):
        v, shift = 0, 0
        while i < n:
            b = proto[i]
            i += 1
            v |= (b & 0x7F) << shift
            if not b & 0x80:
                return v, i
            shift += 7
        raise ValueError("truncated varint")

    try:
        while i < n:
            key, i = varint(i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                _, i = varint(i)
            elif wire == 1:
                i += 8
            elif wire == 2:
                size, i = varint(i)
                i += size
            elif wire == 5:
                i += 4
            else:
                raise ValueError(f"wire type {wire}")
            if i > n:
                raise ValueError("field past the end")
            seen.add(num)
    except ValueError:
        return set()
    return seen
