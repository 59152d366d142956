"""The ``vicuna_v1`` prompt template and LLaVA's ``preprocess_v1`` labelling (SPEC §1, §4).

Rendered text, one image turn then a reply::

    {SYSTEM} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ...

The separator after a message alternates by turn index: ``" "`` after user
turns, ``"</s>"`` after assistant turns. A turn with an empty message renders
as ``ROLE:`` with nothing after it (the generation prompt ends ``ASSISTANT:``).
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from dynllava_jax.tokenizer import IMAGE_TOKEN, LlavaTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
SEP = " "
SEP2 = "</s>"


def render_conversation(turns: Iterable[tuple[str, str | None]]) -> str:
    """Full ``vicuna_v1`` text of ``[(role, text), ...]``, roles ``human``/``gpt``.

    Each assistant message is followed by ``</s>``; a ``None``/empty message
    leaves the role tag open (``"... ASSISTANT:"``) for generation.
    """
    out = SYSTEM + SEP
    for i, (role, text) in enumerate(turns):
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected 'human' or 'gpt'")
        # Like the official template, the separator follows the turn index.
        out += f"{ROLES[role]}: {text}{(SEP, SEP2)[i % 2]}" if text else f"{ROLES[role]}:"
    return out


def build_prompt(question: str, has_image: bool = True) -> str:
    """One-turn generation prompt; the user message is ``<image>\\n{question}`` with an image."""
    message = f"{IMAGE_TOKEN}\n{question}" if has_image else question
    return render_conversation([("human", message), ("gpt", None)])


def _move_image_to_front(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA's ``preprocess_multimodal`` (mm_use_im_start_end False): every message
    containing ``<image>`` becomes ``<image>\\n`` + the rest, stripped."""
    out = []
    for msg in conversations:
        value = msg["value"]
        if IMAGE_TOKEN in value:
            value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
        out.append({**msg, "value": value})
    return out


def tokenize_conversation_with_labels(
    tokenizer: LlavaTokenizer,
    conversations: Sequence[dict],
    has_image: bool,
    max_length: int | None,
) -> tuple[list[int], list[int]]:
    """Token ids and training labels of one LLaVA JSON conversation (``preprocess_v1``).

    ``conversations``: ``[{"from": "human"|"gpt", "value": str}, ...]``; for image
    samples ``<image>`` is moved to the front of its message and becomes
    ``IMAGE_TOKEN_INDEX`` in the ids. Labels are ``IGNORE_INDEX`` except on each
    assistant answer and its ``</s>``. If the per-round token count disagrees
    with the whole-text tokenisation (and the text fits in ``max_length``),
    every label is ignored, as in LLaVA. Both lists are cut to ``max_length``.
    """
    source = _move_image_to_front(conversations) if has_image else list(conversations)
    if source and source[0]["from"] != "human":
        source = source[1:]  # LLaVA drops a leading assistant turn
    if not source:
        raise ValueError("conversation has no human turn")
    for j, msg in enumerate(source):
        if msg["from"] != ("human", "gpt")[j % 2]:
            raise ValueError(f"turn {j} is from {msg['from']!r}; turns must alternate human/gpt")
    text = render_conversation([(m["from"], m["value"]) for m in source])

    def tok(s: str) -> list[int]:
        return tokenizer.tokenize_prompt(s) if has_image else tokenizer(s)

    ids = np.asarray(tok(text), dtype=np.int64)
    if not has_image and max_length is not None:
        ids = ids[:max_length]  # text-only: LLaVA truncates while tokenising
    total_len = int((ids != tokenizer.pad_id).sum())  # LLaVA counts non-pad ids
    labels = ids.copy()

    # Walk the rounds ("USER: ... ASSISTANT: answer") and mask each instruction.
    # numpy slicing reproduces the official torch slicing, edge cases included.
    sep = SEP + ROLES["gpt"] + ": "
    cur_len = 1  # BOS
    labels[:cur_len] = IGNORE_INDEX
    for i, rou in enumerate(text.split(SEP2)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        # Each round re-tokenised alone starts with BOS, which stands in for the
        # round's closing </s>; the instruction ends with "ASSISTANT: " whose
        # trailing "▁" is not in the full text: hence the -2.
        round_len = len(tok(rou))
        instruction_len = len(tok(parts[0] + sep)) - 2
        if i != 0 and not tokenizer.legacy:
            # legacy=False: no "▁" after </s> in the full text, but the round
            # tokenised alone starts with one.
            round_len -= 1
            instruction_len -= 1
        labels[cur_len:cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    labels[cur_len:] = IGNORE_INDEX

    if (max_length is None or cur_len < max_length) and cur_len != total_len:
        labels[:] = IGNORE_INDEX
        logger.warning("tokenization mismatch: %d vs. %d (sample ignored)", cur_len, total_len)

    if max_length is not None:  # image samples: LLaVA's collator truncates
        ids, labels = ids[:max_length], labels[:max_length]
    return ids.tolist(), labels.tolist()
