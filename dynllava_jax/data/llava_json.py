"""The LLaVA instruction format: JSON records -> one training example (SPEC §1, §4).

A record of ``llava_v1_5_mix665k.json``::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",   # optional
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"},
                       {"from": "gpt", "value": "The ..."}, ...]}

Both data paths (the JSON file read directly, and the TFDS/ArrayRecord copy of it)
turn their records into the same :class:`RawRecord`, and :func:`encode_record`
turns a ``RawRecord`` into one example of fixed shapes, or into an
:class:`Invalid` marker (a bad record is skipped and counted, never fatal):

==================  ======================================================
``tokens``          int32 [T]: the ``vicuna_v1`` prompt, the image marker expanded
                    to ``num_image_tokens`` slots holding ``pad_id``, right-padded
``labels``          int32 [T]: target token AT each position (HF convention, the
                    loss shifts); -100 on image slots, system/user text, role tags
                    and padding (``preprocess_v1``)
``lengths``         int32 []: real tokens, image slots included
``image_start``     int32 []: first image slot, -1 for a text-only sample
``pixels``          float32 [3, S, S]: the preprocessed image, zeros if text-only
``cell_targets``    int32 [G*G, K], only with ``cell_grid`` G > 0: the first K token
                    ids of the record's ``cell_text`` (one string per cell of a G x G
                    grid over the image, row by row), -1 padded; all -1 when the
                    record has no ``cell_text`` (see ``objective.cell_nll``)
``turn_cells``      int32 [R], only with ``attention_turns`` R > 0: the record's
                    ``turn_cells`` (per answer, in order, the grid cell its question
                    names, -1 for none), -1 padded (see ``objective.attention_nll``)
``pair_cells``      int32 [R, 2], only with ``attention_pairs`` (and R > 0): the record's
                    ``turn_pairs`` (per answer, the cells of the two objects a question
                    about their relative position names; [-1, -1] for the others)
``choice_keys``     int32 [T], only with ``choice_targets``: r at the tokens of the
                    option the r-th answer chooses (a multiple-choice question answered
                    with its option's letter), -1 elsewhere (``data/choice_keys.py``,
                    ``objective.choice_nll``)
``option_letters``  int32 [T], only with ``choice_targets``: at the tokens of every
                    option's text in the prompt, the index of the token holding that
                    option's letter, -1 elsewhere (``objective.letter_nll``)
==================  ======================================================

Truncation follows LLaVA: the ids (one marker standing for the image) are cut to
``model_max_length``, the marker is expanded, and the result is cut to
``min(model_max_length, seq_len)``. A record whose image slots do not fit whole is
invalid (``image_truncated``), as is one left with no labelled token.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dynllava_jax.conversation import IGNORE_INDEX, tokenize_conversation_with_labels
from dynllava_jax.data.choice_keys import choice_keys, option_letters
from dynllava_jax.image_processing import ImageLoadError
from dynllava_jax.inputs import IMAGE_MARKER
from dynllava_jax.tokenizer import IMAGE_TOKEN

# Why a record is skipped (the keys of the skip counters).
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
EMPTY_CONVERSATION = "empty_conversation"
NO_GPT_TURN = "no_gpt_turn"
BAD_CONVERSATION = "bad_conversation"      # malformed turns, roles not alternating, ...
IMAGE_MARKER_COUNT = "image_marker_count"  # an image sample whose text has != 1 <image>
IMAGE_TRUNCATED = "image_truncated"        # the image slots cut by truncation
NO_TARGET = "no_target"                    # no labelled token left (truncation/mismatch)
TEXT_ONLY = "text_only"                    # excluded by requires_image (not a bad record)
BAD_CELL_TEXT = "bad_cell_text"            # cell_text not one string per grid cell
BAD_TURN_CELLS = "bad_turn_cells"          # turn_cells not one grid cell (or -1) per answer
SKIP_REASONS = (MISSING_IMAGE, CORRUPT_IMAGE, EMPTY_CONVERSATION, NO_GPT_TURN, BAD_CONVERSATION,
                IMAGE_MARKER_COUNT, IMAGE_TRUNCATED, NO_TARGET, TEXT_ONLY, BAD_CELL_TEXT,
                BAD_TURN_CELLS)

EXAMPLE_KEYS = ("tokens", "labels", "lengths", "image_start", "pixels")


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record, whatever storage it came from.

    ``image``: the relative image path (``None``: a text-only sample). The pixels come
    from ``image_bytes`` when set (the TFDS copy), else from ``image_folder / image``.
    ``image_missing``: the file was missing when the TFDS copy was built.
    """

    id: str
    conversations: Any
    image: str | None = None
    image_bytes: bytes | None = None
    image_missing: bool = False
    cell_text: Any = None
    turn_cells: Any = None
    turn_pairs: Any = None


@dataclasses.dataclass(frozen=True)
class Invalid:
    """A record that is skipped; ``reason`` is one of ``SKIP_REASONS``."""

    id: str
    reason: str
    detail: str = ""


class JsonRecords(Sequence[RawRecord]):
    """The records of a LLaVA JSON file, held compactly (random access, picklable).

    Each record is kept as its own JSON bytes in one buffer plus an offset table, so
    the memory is about the file size (Python dicts of ``mix665k`` would take several
    times that) and sending the source to grain worker processes is one memcpy.
    """

    def __init__(self, json_path: str | os.PathLike):
        path = Path(json_path)
        if not path.is_file():
            raise FileNotFoundError(f"LLaVA JSON file not found: {path}")
        with path.open("rb") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        self.path = str(path)
        # Records with an image: what one epoch has when text-only records are dropped.
        self.num_with_image = sum(1 for r in data if isinstance(r, dict) and r.get("image") not in (None, ""))
        chunks = [json.dumps(r, ensure_ascii=False).encode() for r in data]
        del data
        self._offsets = np.zeros(len(chunks) + 1, np.int64)
        np.cumsum([len(c) for c in chunks], out=self._offsets[1:])
        self._buffer = b"".join(chunks)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def record(self, index: int) -> Any:
        """The decoded JSON record ``index`` (whatever it holds)."""
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return json.loads(self._buffer[self._offsets[index]:self._offsets[index + 1]])

    def __getitem__(self, index: int) -> RawRecord:  # type: ignore[override]
        return to_raw_record(self.record(index), index)


def to_raw_record(record: Any, index: int) -> RawRecord:
    """A JSON record as a :class:`RawRecord` (malformed content is caught by ``encode_record``)."""
    if not isinstance(record, dict):
        return RawRecord(id=str(index), conversations=record)
    image = record.get("image")
    return RawRecord(id=str(record.get("id", index)), conversations=record.get("conversations"),
                     image=None if image in (None, "") else str(image),
                     cell_text=record.get("cell_text"), turn_cells=record.get("turn_cells"),
                     turn_pairs=record.get("turn_pairs"))


def _check_conversation(conversations: Any) -> str | None:
    """The skip reason of a malformed conversation, or None."""
    if not conversations:
        return EMPTY_CONVERSATION
    if not isinstance(conversations, list) or not all(
            isinstance(m, dict) and isinstance(m.get("value"), str)
            and m.get("from") in ("human", "gpt")
            for m in conversations):
        return BAD_CONVERSATION
    if not any(m["from"] == "gpt" for m in conversations):
        return NO_GPT_TURN
    return None


def _load_pixels(image_processor, raw: RawRecord, image_folder: str | None) -> np.ndarray | Invalid:
    """float32 [3, S, S] pixels of ``raw``'s image, or ``Invalid`` if it is missing or corrupt.

    Both storages decode the same bytes with PIL, so they give identical pixels.
    """
    if raw.image_bytes is None:
        path = Path(image_folder or "") / raw.image
        if not path.is_file():
            return Invalid(raw.id, MISSING_IMAGE, f"no such file: {path}")
        try:
            return image_processor.load(path)
        except ImageLoadError as e:
            return Invalid(raw.id, CORRUPT_IMAGE, str(e))
    if raw.image_missing:
        return Invalid(raw.id, MISSING_IMAGE, f"no such file: {raw.image} (when packed)")
    try:
        with Image.open(io.BytesIO(raw.image_bytes)) as image:
            image = image.convert("RGB")  # the full decode, inside the try
        # The padded square is bounded (image_processing.MAX_PADDED_SIDE); a MemoryError
        # left is this record's, not the run's.
        return image_processor(image)
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        return Invalid(raw.id, CORRUPT_IMAGE, f"cannot decode {raw.image}: {type(e).__name__}: {e}")


def encode_record(
    raw: RawRecord,
    *,
    tokenizer,
    image_processor,
    image_folder: str | None,
    num_image_tokens: int,
    seq_len: int,
    model_max_length: int,
    requires_image: bool = False,
    cell_grid: int = 0,
    cell_tokens: int = 3,
    attention_turns: int = 0,
    attention_pairs: bool = False,
    choice_targets: bool = False,
) -> dict[str, np.ndarray] | Invalid:
    """One training example of fixed shapes (see the module docstring), or ``Invalid``.

    ``requires_image``: text-only records are excluded (reason ``text_only``), as in the
    official Dynamic-LLaVA run. The cheap checks run first, so a bad conversation never
    costs an image decode. ``cell_grid`` > 0 adds ``cell_targets`` (``cell_tokens`` ids a
    cell); a ``cell_text`` that is not ``cell_grid**2`` strings is a bad record.
    ``attention_turns`` R > 0 adds ``turn_cells`` (needs ``cell_grid``: the cells index its
    grid); one that is not a list of cells or -1 is a bad record; ``attention_pairs`` adds
    ``pair_cells`` as well (bad pairs: the same reason). ``choice_targets`` adds
    ``choice_keys`` and ``option_letters``, found in the example's own text.
    """
    if requires_image and raw.image is None:
        return Invalid(raw.id, TEXT_ONLY)
    reason = _check_conversation(raw.conversations)
    if reason is not None:
        return Invalid(raw.id, reason)
    has_image = raw.image is not None
    if has_image:
        n_markers = sum(IMAGE_TOKEN in m["value"] for m in raw.conversations)
        if n_markers != 1:
            return Invalid(raw.id, IMAGE_MARKER_COUNT, f"{n_markers} messages hold {IMAGE_TOKEN}")
    try:
        ids, labels = tokenize_conversation_with_labels(
            tokenizer, raw.conversations, has_image, model_max_length)
    except ValueError as e:
        return Invalid(raw.id, BAD_CONVERSATION, str(e))

    cap = min(model_max_length, seq_len)
    image_start = -1
    if has_image:
        if IMAGE_MARKER not in ids:
            return Invalid(raw.id, IMAGE_TRUNCATED, "the image marker was cut")
        image_start = ids.index(IMAGE_MARKER)
        if image_start + num_image_tokens > cap:
            return Invalid(raw.id, IMAGE_TRUNCATED,
                           f"image slots end at {image_start + num_image_tokens} > {cap}")
        i = image_start
        ids = ids[:i] + [tokenizer.pad_id] * num_image_tokens + ids[i + 1:]
        labels = labels[:i] + [IGNORE_INDEX] * num_image_tokens + labels[i + 1:]
    ids, labels = ids[:cap], labels[:cap]
    if all(l == IGNORE_INDEX for l in labels):
        return Invalid(raw.id, NO_TARGET, "no labelled token after truncation")

    image_size = image_processor.image_size
    if has_image:
        pixels = _load_pixels(image_processor, raw, image_folder)
        if isinstance(pixels, Invalid):
            return pixels
    else:
        pixels = np.zeros((3, image_size, image_size), np.float32)

    if cell_grid > 0:
        cells = _cell_targets(tokenizer, raw.cell_text, cell_grid, cell_tokens)
        if isinstance(cells, str):
            return Invalid(raw.id, BAD_CELL_TEXT, cells)
    if attention_turns > 0:
        turns = _turn_cells(raw.turn_cells, cell_grid, attention_turns)
        if isinstance(turns, str):
            return Invalid(raw.id, BAD_TURN_CELLS, turns)
        if attention_pairs:
            pairs = _turn_pairs(raw.turn_pairs, cell_grid, attention_turns)
            if isinstance(pairs, str):
                return Invalid(raw.id, BAD_TURN_CELLS, pairs)

    n = len(ids)
    tokens = np.full((seq_len,), tokenizer.pad_id, np.int32)
    tokens[:n] = ids
    label_row = np.full((seq_len,), IGNORE_INDEX, np.int32)
    label_row[:n] = labels
    out = {
        "tokens": tokens,
        "labels": label_row,
        "lengths": np.int32(n),
        "image_start": np.int32(image_start),
        "pixels": np.asarray(pixels, np.float32),
    }
    if cell_grid > 0:
        out["cell_targets"] = cells
    if attention_turns > 0:
        out["turn_cells"] = turns
        if attention_pairs:
            out["pair_cells"] = pairs
    if choice_targets:
        keys = np.full((seq_len,), -1, np.int32)
        letters = np.full((seq_len,), -1, np.int32)
        texts = tokenizer.token_texts(ids)
        keys[:n] = choice_keys(texts, labels)
        letters[:n] = option_letters(texts, labels)
        out["choice_keys"] = keys
        out["option_letters"] = letters
    return out


def _turn_cells(turn_cells, grid: int, r: int) -> np.ndarray | str:
    """[r] grid cells named by the first r answers' questions (-1: none, or padding), or
    why the record's ``turn_cells`` is unusable."""
    out = np.full((r,), -1, np.int32)
    if turn_cells is None:
        return out
    if grid <= 0:
        return "turn_cells index the cells of data.cell_grid, which is 0"
    if (not isinstance(turn_cells, (list, tuple))
            or not all(isinstance(c, int) and not isinstance(c, bool) and -1 <= c < grid * grid
                       for c in turn_cells)):
        return f"turn_cells must be grid cells 0..{grid * grid - 1} or -1, one per answer"
    cells = list(turn_cells)[:r]
    out[:len(cells)] = cells
    return out


def _turn_pairs(turn_pairs, grid: int, r: int) -> np.ndarray | str:
    """[r, 2] the two grid cells named by each of the first r answers' questions (-1: none,
    or padding), or why the record's ``turn_pairs`` is unusable."""
    out = np.full((r, 2), -1, np.int32)
    if turn_pairs is None:
        return out
    if (not isinstance(turn_pairs, (list, tuple))
            or not all(isinstance(p, (list, tuple)) and len(p) == 2
                       and all(isinstance(c, int) and not isinstance(c, bool)
                               and -1 <= c < grid * grid for c in p) for p in turn_pairs)):
        return f"turn_pairs must be pairs of grid cells 0..{grid * grid - 1} or -1, one per answer"
    pairs = list(turn_pairs)[:r]
    if pairs:
        out[:len(pairs)] = pairs
    return out


def _cell_targets(tokenizer, cell_text, grid: int, k: int) -> np.ndarray | str:
    """[grid*grid, k] token ids of each cell's text (-1 padded), or why it is unusable."""
    out = np.full((grid * grid, k), -1, np.int32)
    if cell_text is None:
        return out
    if (not isinstance(cell_text, (list, tuple)) or len(cell_text) != grid * grid
            or not all(isinstance(t, str) for t in cell_text)):
        return f"cell_text must be {grid * grid} strings (a {grid} x {grid} grid)"
    for i, text in enumerate(cell_text):
        ids = tokenizer.encode(text)[:k]
        out[i, :len(ids)] = ids
    return out
