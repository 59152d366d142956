"""VQAv2 / GQA-style open answers: normalised exact match against reference answers.

``--annotation-file`` (JSON or JSONL) gives each question_id its reference answers, in any of:

* an object ``{"<question_id>": "answer" | ["answer", ...] | {"answer": ...} | {"answers": [...]}}``
  (GQA's ``*_questions.json`` is of this kind: question_id -> record with ``answer``);
* a list, or JSONL rows, of ``{"question_id": ..., "answers": [...]}`` or ``{"question_id": ...,
  "answer": "..."}``;
* VQAv2's ``mscoco_*_annotations.json``: ``{"annotations": [{"question_id", "answers":
  [{"answer": ...}, ...]}]}``.

question_ids are compared as strings, so 7 and "7" are the same question. Predictions (result
``text``) and references go through the official VQA answer normalisation (``normalize.py``).
Scored over the annotated questions that have an answer (as the VQA evaluation API scores the
questions in the results); ``missing`` counts annotated questions without one.

* ``exact_match``: percent whose normalised answer equals a normalised reference (GQA accuracy when
  there is one reference);
* ``vqa_accuracy``: the VQAv2 soft accuracy (mean over leaving out each reference of
  min(1, matches / 3)), in percent; None unless every scored question has 10 references.
"""

from __future__ import annotations

from pathlib import Path

from .files import UserError, read_json, read_jsonl
from .normalize import normalize_answer, vqa_score


def _references(value, where: str) -> list[str]:
    if isinstance(value, dict):
        if "answers" in value:
            value = value["answers"]
        elif "answer" in value:
            value = value["answer"]
        else:
            raise UserError(f"{where}: no 'answer' or 'answers'")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        refs = [a["answer"] if isinstance(a, dict) and "answer" in a else a for a in value]
        if all(isinstance(r, str) for r in refs):
            return refs
    raise UserError(f"{where}: answers must be a string or a non-empty list of strings")


def load_references(path) -> dict[str, list[str]]:
    """question_id (as a string) -> reference answers, from any layout the module docstring lists."""
    p = Path(path)
    data = read_jsonl(p, required=("question_id",)) if p.suffix == ".jsonl" else read_json(p)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if isinstance(data, dict):
        return {str(k): _references(v, f"{p}: question {k!r}") for k, v in data.items()}
    if isinstance(data, list):
        out = {}
        for i, row in enumerate(data):
            if not isinstance(row, dict) or "question_id" not in row:
                raise UserError(f"{p}: row {i} is not an object with a question_id")
            out[str(row["question_id"])] = _references(row, f"{p}: question {row['question_id']!r}")
        return out
    raise UserError(f"{p}: expected an object or a list of question records")


def score(results: list[dict], references: dict[str, list[str]]) -> dict:
    answers = {str(r["question_id"]): r["text"] for r in results}  # later rows win
    scored = [q for q in references if q in answers]
    if not scored:
        raise UserError("no result question_id is in the annotation file")
    exact = sum(normalize_answer(answers[q]) in {normalize_answer(a) for a in references[q]} for q in scored)
    ten = all(len(references[q]) == 10 for q in scored)
    soft = sum(vqa_score(answers[q], references[q]) for q in scored) if ten else None
    return {"questions": len(scored), "exact_match": 100.0 * exact / len(scored),
            "vqa_accuracy": None if soft is None else 100.0 * soft / len(scored),
            "missing": len(references) - len(scored),
            "unannotated": sum(q not in references for q in answers)}


def score_files(annotation_file, result_file) -> dict:
    return score(read_jsonl(result_file, required=("question_id", "text")), load_references(annotation_file))
