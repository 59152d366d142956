"""FALLBACK, to be removed at merge: a minimal ``merge_answers`` for branches that lack
``dynllava_jax.answering`` (written in another branch). The CLI imports this only when that module
is absent, so that ``eval merge`` and its test run here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .files import UserError, read_jsonl


def merge_answers(part_paths, out_path, questions_path=None) -> int:
    """Join answer files into out_path, in question order when questions_path is given (else in
    part order), each question_id once (its first answer); returns the number of rows written."""
    rows, seen = [], set()
    for part in part_paths:
        for row in read_jsonl(part, required=("question_id",)):
            if row["question_id"] not in seen:
                seen.add(row["question_id"])
                rows.append(row)
    if questions_path is not None:
        order = {q["question_id"]: i for i, q in
                 enumerate(read_jsonl(questions_path, required=("question_id",)))}
        unknown = [r["question_id"] for r in rows if r["question_id"] not in order]
        if unknown:
            raise UserError(f"answer question_id {unknown[0]!r} is not in {questions_path}")
        rows.sort(key=lambda r: order[r["question_id"]])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    return len(rows)
