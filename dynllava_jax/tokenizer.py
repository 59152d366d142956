"""LLaMA tokenizer with the exact behaviour LLaVA relies on (SPEC §1).

The official code tokenises with transformers 4.37's *slow* ``LlamaTokenizer``.
transformers 5 changed that class, so this module re-implements the 4.37
behaviour directly on top of sentencepiece:

* text is first split at added/special tokens written in it (``</s>`` in
  multi-turn conversations); each piece goes through sentencepiece on its own;
* ``legacy: true`` (the LLaVA-1.5 checkpoints): every piece gets sentencepiece's
  dummy prefix ``▁``;
* ``legacy: false``: the model's dummy prefix is switched off, the text gets one
  leading ``▁``, and a piece starting with ``▁``/space is encoded behind an
  ``<unk>`` string that is then cut off, so its leading space survives
  sentencepiece's whitespace handling. A piece right after a special token
  therefore gets no ``▁``.

The sentencepiece model is ``tokenizer.model`` where present, else the one rebuilt from a
LLaMA ``tokenizer.json`` (``tokenizer_json.py``: what transformers 5 saves).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import sentencepiece as spm

from .tokenizer_json import TokenizerFileError, read_tokenizer_json, sentencepiece_proto, top_level_fields

IMAGE_TOKEN_INDEX = -200
IMAGE_TOKEN = "<image>"

_SPIECE_UNDERLINE = "\u2581"
_MODEL_FILE = "tokenizer.model"
_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_MAP_FILE = "special_tokens_map.json"
_JSON_FILE = "tokenizer.json"


def _content(token) -> str | None:
    """Token text from a config entry (a string or an AddedToken-like dict)."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise TokenizerFileError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer file this module reads (not whether it is valid)."""
    d = Path(directory)
    return (d / _MODEL_FILE).is_file() or (d / _JSON_FILE).is_file()


def _processor(proto: bytes, legacy: bool, source: Path) -> spm.SentencePieceProcessor:
    """The sentencepiece model of ``proto``; with ``add_dummy_prefix`` off unless ``legacy``."""
    # Pieces come first in the file: one cut at a piece boundary still parses, with fewer
    # pieces and no trainer / normaliser specs, and would tokenise differently.
    if not {1, 2, 3} <= top_level_fields(proto):
        raise TokenizerFileError(f"{source} is not a valid sentencepiece model (truncated?): "
                                 "pieces, trainer or normalizer spec missing")
    if not legacy:
        proto = proto + _NO_DUMMY_PREFIX
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:  # sentencepiece reports a truncated / garbled model this way
        raise TokenizerFileError(f"{source} is not a valid sentencepiece model (truncated?): "
                                 f"{str(e).strip() or 'parse error'}") from e
    if sp.get_piece_size() == 0:
        raise TokenizerFileError(f"{source} is not a valid sentencepiece model: no pieces")
    return sp


# Protobuf merges repeated occurrences of a message field, so appending a second
# ``normalizer_spec`` (field 3) holding only ``add_dummy_prefix`` (field 3, false) overrides
# the flag, as 4.37 does for legacy=False. Editing the wire bytes avoids the protobuf
# package and its descriptor-pool clashes with transformers' copy of the proto.
_NO_DUMMY_PREFIX = bytes([(3 << 3) | 2, 2, (3 << 3) | 0, 0])


class LlavaTokenizer:
    """transformers-4.37 slow ``LlamaTokenizer`` semantics, without torch/transformers."""

    def __init__(self, directory: str | Path):
        self._dir = Path(directory)
        model_file, json_file = self._dir / _MODEL_FILE, self._dir / _JSON_FILE
        if not (model_file.is_file() or json_file.is_file()):
            raise FileNotFoundError(f"no {_MODEL_FILE} or {_JSON_FILE} in {self._dir}")
        cfg = _read_config(self._dir / _CONFIG_FILE)
        special_map = _read_config(self._dir / _SPECIAL_MAP_FILE)

        # 4.37 treats a missing flag as legacy=True (with a warning).
        legacy = cfg.get("legacy")
        self.legacy: bool = True if legacy is None else bool(legacy)
        self.add_bos: bool = bool(cfg.get("add_bos_token", True))
        self.add_eos: bool = bool(cfg.get("add_eos_token", False))
        self.clean_up_spaces: bool = bool(cfg.get("clean_up_tokenization_spaces", False))

        json_added: dict = {}
        data = None
        if json_file.is_file() and (not model_file.is_file() or not cfg.get("added_tokens_decoder")):
            data = read_tokenizer_json(json_file)
            json_added = {str(a["id"]): a for a in data.get("added_tokens") or []
                          if isinstance(a, dict) and isinstance(a.get("id"), int)
                          and isinstance(a.get("content"), str)}
        if model_file.is_file():
            proto, source = model_file.read_bytes(), model_file
        else:
            proto, source = sentencepiece_proto(data, json_file), json_file
        self.sp = _processor(proto, self.legacy, source)

        def tok(name: str, default: str | None) -> str | None:
            value = _content(cfg.get(name))
            if value is None:
                value = _content(special_map.get(name))
            return default if value is None else value

        self.bos_token = tok("bos_token", "<s>")
        self.eos_token = tok("eos_token", "</s>")
        self.unk_token = tok("unk_token", "<unk>")
        self.pad_token = tok("pad_token", None)

        # Added tokens: content -> (id, lstrip, rstrip). 4.37 splits on all of
        # them, and always adds the named special tokens too.
        self._added: dict[str, tuple[int, bool, bool]] = {}
        # transformers 5 keeps them in tokenizer.json only.
        for idx, entry in (cfg.get("added_tokens_decoder") or json_added).items():
            self._added[entry["content"]] = (
                int(idx), bool(entry.get("lstrip")), bool(entry.get("rstrip")))
        extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        extra = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        extra = [t for t in extra if isinstance(t, str)]
        for t in [self.bos_token, self.eos_token, self.unk_token, self.pad_token, *extra]:
            if t is not None and t not in self._added:
                self._added[t] = (self.sp.piece_to_id(t), False, False)
        self._special = {t for t in [self.bos_token, self.eos_token, self.unk_token,
                                     self.pad_token, *extra] if t is not None}
        self._special_ids = {self._added[t][0] for t in self._special}
        self._id_to_added = {i: t for t, (i, _, _) in self._added.items()}
        # Longest first so that overlapping tokens match like 4.37's trie.
        alternatives = sorted(self._added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self._unk_len = len(self.sp.encode(self.unk_token))

    @classmethod
    def from_dir(cls, path: str | Path) -> "LlavaTokenizer":
        """Read ``tokenizer.model`` or ``tokenizer.json`` (+ ``tokenizer_config.json``) from ``path``."""
        return cls(path)

    def save(self, dst_dir: str | Path) -> None:
        """Copy the tokenizer files into ``dst_dir`` so ``from_dir`` reloads the same tokenizer."""
        dst = Path(dst_dir)
        dst.mkdir(parents=True, exist_ok=True)
        for name in (_MODEL_FILE, _JSON_FILE, _CONFIG_FILE, _SPECIAL_MAP_FILE):
            src = self._dir / name
            if src.is_file() and src.resolve() != (dst / name).resolve():
                shutil.copyfile(src, dst / name)
        if not (dst / _CONFIG_FILE).exists():
            # Record the flag explicitly: its absence means legacy=True on reload.
            (dst / _CONFIG_FILE).write_text(json.dumps({"legacy": self.legacy}, indent=2))

    # ------------------------------------------------------------------ ids
    @property
    def bos_id(self) -> int:
        return self._added[self.bos_token][0]

    @property
    def eos_id(self) -> int:
        return self._added[self.eos_token][0]

    @property
    def unk_id(self) -> int:
        return self._added[self.unk_token][0]

    @property
    def pad_id(self) -> int:
        """The config's pad token, else unk (LLaVA sets ``pad_token = unk_token``)."""
        return self._added[self.pad_token][0] if self.pad_token is not None else self.unk_id

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (4.37's ``vocab_size``; added tokens beyond it excluded)."""
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        """Ids ``0 .. len - 1`` decode: the pieces and the added tokens (llava-hf's ``<image>``,
        ``<pad>``). A padded embedding has more rows; generation never picks those."""
        return max([self.sp.get_piece_size(), *(i + 1 for i, _, _ in self._added.values())])

    # ------------------------------------------------------------- encoding
    def _split_added(self, text: str) -> list[tuple[str, bool]]:
        """Split at added tokens, applying their lstrip/rstrip; drop empty pieces."""
        parts = self._split_re.split(text)
        for i, part in enumerate(parts):
            if i % 2 == 1:  # odd positions are the captured added tokens
                _, lstrip, rstrip = self._added[part]
                if rstrip and i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
                if lstrip and i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    def _sp_pieces(self, text: str) -> list[str]:
        pieces = self.sp.encode(text, out_type=str)
        if self.legacy or not text.startswith((_SPIECE_UNDERLINE, " ")):
            return pieces
        # Without a dummy prefix sentencepiece would eat the leading space.
        pieces = self.sp.encode(self.unk_token + text, out_type=str)
        return pieces[self._unk_len:] if len(pieces) >= self._unk_len else pieces

    def _tokens(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = _SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for part, is_added in self._split_added(text):
            tokens.extend([part] if is_added else self._sp_pieces(part))
        if (not self.legacy and len(tokens) > 1 and tokens[0] == _SPIECE_UNDERLINE
                and tokens[1] in self._special):
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (4.37 ``tokenize`` + ``convert_tokens_to_ids``)."""
        return [self._added[t][0] if t in self._added else self.sp.piece_to_id(t)
                for t in self._tokens(text)]

    def __call__(self, text: str) -> list[int]:
        """Like 4.37 ``tokenizer(text).input_ids``: BOS/EOS per the config."""
        return (([self.bos_id] if self.add_bos else []) + self.encode(text)
                + ([self.eos_id] if self.add_eos else []))

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: BOS, chunks split at ``<image>``, -200 between."""
        ids = [self.bos_id] if self.add_bos else []
        for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode(chunk))
        return ids

    # ------------------------------------------------------------- decoding
    def token_texts(self, ids) -> list[str]:
        """The surface text of each id on its own ("▁" as a space, byte pieces as their
        character), "" for special tokens, image markers and ids past the vocabulary: their
        concatenation is the text the ids spell, so character offsets map to tokens."""
        out = []
        n = self.sp.get_piece_size()
        for i in (int(i) for i in ids):
            if i < 0 or i in self._special_ids:
                out.append("")
            elif i in self._id_to_added:
                out.append(self._id_to_added[i])
            elif i >= n:
                out.append("")
            else:
                piece = self.sp.id_to_piece(i)
                byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
                out.append(chr(int(byte.group(1), 16)) if byte else piece.replace(_SPIECE_UNDERLINE, " "))
        return out

    def _pieces_to_text(self, pieces: list[str]) -> str:
        # 4.37 removes the first piece's leading "▁" by hand (its own prefix).
        if pieces[0].startswith(_SPIECE_UNDERLINE):
            pieces = [pieces[0][1:], *pieces[1:]]
        return self.sp.decode(pieces)

    def decode(self, ids) -> str:
        """Text of ``ids``, skipping special tokens and image markers (negative ids)."""
        texts: list[str] = []
        pieces: list[str] = []
        for i in (int(i) for i in ids):
            if i < 0 or i in self._special_ids:
                continue
            added = self._id_to_added.get(i)
            if added is not None:  # non-special added token: emitted verbatim
                if pieces:
                    text = self._pieces_to_text(pieces)
                    if text:
                        texts.append(text)
                    pieces = []
                texts.append(added)
            elif i < self.sp.get_piece_size():
                pieces.append(self.sp.id_to_piece(i))
            # else: an id past the vocabulary (a padded embedding row) has no text
        if pieces:
            texts.append(self._pieces_to_text(pieces))
        # 4.37's _decode joins with spaces (its spaces_between_special_tokens
        # defaults to True whatever the config says).
        text = " ".join(texts)
        if self.clean_up_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                         (" 're", "'re")):
                text = text.replace(a, b)
        return text
