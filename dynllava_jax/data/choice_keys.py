"""Where a multiple-choice answer's option is written: the keys of the choice objective.

A multiple-choice question in LLaVA's ScienceQA format lists its options one a line
(``"A. green"``) and its answer is the option's letter (``"A"``). To answer, the LLM must
find the option whose text is the answer and copy the letter written before it: a lookup in
the prompt's text. The choice objective (``objective.choice_loss_weight``) supervises it:
where the LLM predicts the r-th answer, one head should attend to the text of the right
option; and (``objective.letter_loss_weight``) at each option's text, one head of a lower
layer should attend to the option's letter, so that what the first head reads there holds
the letter to copy. This module finds both in an encoded example, for any tokenizer: it
works on the tokens' surface text, so ``"\\nA. green"`` is found however it was split into
pieces.
"""

from __future__ import annotations

import re

import numpy as np

from dynllava_jax.conversation import IGNORE_INDEX
_LETTER = re.compile(r"\s*([A-Z])\s*\.?\s*")
_OPTION_LINE = re.compile(r"(?m)^[ \t]*([A-Z])\.[ \t]*(\S[^\n]*?)[ \t]*$")   # letter, text


def answer_runs(labels) -> list[tuple[int, int]]:
    """[(start, end)] of each run of labelled positions (one an assistant answer)."""
    lab = np.asarray(labels) != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], lab.astype(np.int8), [0]])))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


def option_span(question: str, letter: str) -> tuple[int, int] | None:
    """(start, end) characters of the text of option ``letter`` in ``question`` (a line
    ``"<letter>. <text>"``), or None when it has no such line or the letter twice."""
    found = [m for m in _OPTION_LINE.finditer(question) if m.group(1) == letter]
    if len(found) != 1:
        return None
    return found[0].span(2)


def choice_keys(texts: list[str], labels) -> np.ndarray:
    """int32 [T]: r at the tokens of the r-th answer's chosen option (the text of the
    option line whose letter that answer is, in the prompt between the previous answer and
    this one), -1 elsewhere and for answers that are not one option letter.

    texts: the surface text of each token (``LlavaTokenizer.token_texts``); labels: the
    example's labels (-100 outside the answers)."""
    t = len(texts)
    out = np.full((t,), -1, np.int32)
    prev = 0
    for r, (s, e) in enumerate(answer_runs(np.asarray(labels)[:t])):
        m = _LETTER.fullmatch("".join(texts[s:e]))
        if m:
            starts = np.cumsum([0] + [len(x) for x in texts[prev:s]])
            span = option_span("".join(texts[prev:s]), m.group(1))
            if span is not None:
                # the tokens whose text overlaps the option's characters
                lo = np.searchsorted(starts, span[0], side="right") - 1
                hi = np.searchsorted(starts, span[1], side="left")
                out[prev + lo:prev + hi] = r
        prev = e
    return out


def option_letters(texts: list[str], labels) -> np.ndarray:
    """int32 [T]: at the tokens of every option's text in the prompt (lines
    ``"<letter>. <text>"``), the index of the token that holds that line's letter; -1
    elsewhere, in the answers, and where the letter and the text share a token.

    texts: the surface text of each token; labels: the example's labels (-100 outside the
    answers)."""
    t = len(texts)
    out = np.full((t,), -1, np.int32)
    starts = np.cumsum([0] + [len(x) for x in texts])   # character offset of each token
    prompt = np.asarray(labels)[:t] == IGNORE_INDEX
    for m in _OPTION_LINE.finditer("".join(texts)):
        letter = int(np.searchsorted(starts, m.start(1), side="right") - 1)
        lo = int(np.searchsorted(starts, m.start(2), side="right") - 1)
        hi = int(np.searchsorted(starts, m.end(2), side="left"))
        if lo > letter and prompt[letter] and prompt[lo:hi].all():
            out[lo:hi] = letter
    return out
