"""TextVQA accuracy, as LLaVA's ``llava/eval/eval_textvqa.py`` with ``m4c_evaluator.py``.

The annotation file is the official ``TextVQA_0.5.1_val.json`` (``data``: rows with ``image_id``,
``question``, ten ``answers``). As there, a result row is matched to the annotation whose
``image_id`` equals the row's ``question_id`` and whose lowercased question equals the question
recovered from the row's ``prompt`` (so LLaVA's TextVQA question file must carry the image id as
question_id, and the question text tells apart questions on one image). The question is recovered
from the prompt as the official ``prompt_processor`` does:

* ``OCR tokens: ... Question: Q Short answer:`` -> Q;
* three lines containing ``Reference OCR token: `` -> the second line if the prompt starts with
  ``Reference OCR token:``, else the first;
* two lines -> the first; anything else is an error.

Score: the VQA soft accuracy of the normalised answer over the ten normalised references, in
percent (the official script prints it to two decimals).
"""

from __future__ import annotations

import re
from pathlib import Path

from .files import UserError, read_json, read_jsonl
from .normalize import vqa_score

_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_of(prompt: str) -> str | None:
    """The question a LLaVA TextVQA prompt asks, lowercased; None for an unknown prompt layout."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = _OCR_QUESTION.search(prompt)
        if m is None:
            return None
        q = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        q = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        q = lines[0]
    else:
        return None
    return q.lower()


def score(results: list[dict], annotations: list[dict]) -> dict:
    """results: rows with question_id, prompt, text; annotations: the file's ``data`` rows."""
    # Later duplicates win, as in the official dict comprehension.
    index = {(a["image_id"], a["question"].lower()): a for a in annotations}
    scores = []
    for n, r in enumerate(results, 1):
        q = question_of(r["prompt"])
        if q is None:
            raise UserError(f"result row {n} (question_id {r['question_id']!r}): prompt is not in a "
                            f"LLaVA TextVQA layout (question line + instruction line)")
        ann = index.get((r["question_id"], q))
        if ann is None:
            raise UserError(f"result row {n}: no annotation with image_id {r['question_id']!r} "
                            f"and question {q!r}")
        if len(ann["answers"]) != 10:
            raise UserError(f"annotation {ann['image_id']!r} {q!r} has {len(ann['answers'])} answers, "
                            f"TextVQA scoring needs 10")
        scores.append(vqa_score(r["text"], ann["answers"]))
    if not scores:
        raise UserError("the result file has no answers")
    return {"samples": len(scores), "accuracy": 100.0 * sum(scores) / len(scores)}


def score_files(annotation_file, result_file) -> dict:
    data = read_json(annotation_file)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{annotation_file}: expected a TextVQA annotation object with a 'data' list")
    for i, a in enumerate(data["data"]):
        if not isinstance(a, dict) or not all(k in a for k in ("image_id", "question", "answers")):
            raise UserError(f"{annotation_file}: data[{i}] lacks image_id, question or answers")
    results = read_jsonl(result_file, required=("question_id", "prompt", "text"))
    return score(results, data["data"])


def score_dir(annotation_file, result_dir) -> dict[str, dict]:
    """Every ``.jsonl`` of result_dir, in sorted order, keyed by its name without the extension
    (the "experiment name" the official script prints)."""
    d = Path(result_dir)
    if not d.is_dir():
        raise UserError(f"--result-dir is not a directory: {d}")
    files = sorted(p for p in d.iterdir() if p.name.endswith(".jsonl"))
    if not files:
        raise UserError(f"--result-dir has no .jsonl files: {d}")
    return {p.stem: score_files(annotation_file, p) for p in files}
