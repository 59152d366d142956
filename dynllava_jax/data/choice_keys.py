"""Where a multiple-choice answer's option is written: the keys of the choice objective.

A multiple-choice question in LLaVA's ScienceQA format lists its options one a line
(``"A. green"``) and its answer is the option's letter (``"A"``). To answer, the LLM must
find the option whose text is the answer and copy the letter written before it: a lookup in
the prompt's text. The choice objective (``objective.choice_loss_weight``) supervises it:
where the LLM predicts the r-th answer, one head should attend to the text of the right
option. This module finds that text in an encoded example, for any tokenizer: it works on
the tokens' surface text, so ``"\\nA. green"`` is found however it was split into pieces.
"""

from __future__ import annotations

import re

import numpy as np

from dynllava_jax.conversation import IGNORE_INDEX
_LETTER = re.compile(r"\s*([A-Z])\s*\.?\s*")


def answer_runs(labels) -> list[tuple[int, int]]:
    """[(start, end)] of each run of labelled positions (one an assistant answer)."""
    lab = np.asarray(labels) != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], lab.astype(np.int8), [0]])))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


def option_span(question: str, letter: str) -> tuple[int, int] | None:
    """(start, end) characters of the text of option ``letter`` in ``question`` (a line
    ``"<letter>. <text>"``), or None when it has no such line or the letter twice."""
    found = [m for m in re.finditer(rf"(?m)^[ \t]*{letter}\.[ \t]*(\S[^\n]*?)[ \t]*$", question)]
    if len(found) != 1:
        return None
    return found[0].span(1)


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
