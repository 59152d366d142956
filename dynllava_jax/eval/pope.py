"""POPE: yes/no object-hallucination accuracy, as LLaVA's ``llava/eval/eval_pope.py``.

Inputs as there: ``--annotation-dir`` holds ``coco_pope_<category>.json`` label files (JSONL rows
with ``label`` "yes"/"no"), ``--question-file`` maps ``question_id`` to its ``category``, and the
result file holds the answers. Rules kept from the official script:

* an answer is "no" when its first sentence (text before the first ".") with commas removed,
  split on single spaces, contains the word ``No``, ``not`` or ``no``; anything else is "yes";
* answers of a category are paired with that category's labels by position (result-file order
  against label-file order, the shorter list deciding), so answers must be in question order;
* yes_ratio counts every answer of the category, paired or not.

We add an ``overall`` row (the categories' counts pooled) and ``mean`` (the unweighted mean of
the per-category figures, as papers report POPE). Where the official script would divide by zero a
figure is None.
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import UserError, ratio, read_jsonl

PREFIX, SUFFIX = "coco_pope_", ".json"
FIGURES = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def says_no(text: str) -> bool:
    """POPE's reading of a free-form answer: True for "no"."""
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def confusion(answers: list[str], labels: list[str]) -> dict:
    """Counts of one category: answers (texts) and labels ("yes"/"no") paired by position."""
    preds = [not says_no(a) for a in answers]  # True = yes
    tp = fp = tn = fn = 0
    for pred, label in zip(preds, labels):
        pos = label != "no"  # the official script reads any label but "no" as yes
        if pred and pos:
            tp += 1
        elif pred:
            fp += 1
        elif not pos:
            tn += 1
        else:
            fn += 1
    return {"samples": len(preds), "yes": sum(preds), "TP": tp, "FP": fp, "TN": tn, "FN": fn}


def figures(c: dict) -> dict:
    """Accuracy, precision, recall, F1 and yes ratio from ``confusion`` counts."""
    precision = ratio(c["TP"], c["TP"] + c["FP"])
    recall = ratio(c["TP"], c["TP"] + c["FN"])
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall else None)
    acc = ratio(c["TP"] + c["TN"], c["TP"] + c["TN"] + c["FP"] + c["FN"])
    return dict(c, accuracy=acc, precision=precision, recall=recall, f1=f1,
                yes_ratio=ratio(c["yes"], c["samples"]))


def score(answers: list[dict], categories: dict, labels: dict[str, list[str]]) -> dict:
    """Metrics per category, ``overall`` and ``mean``.

    answers: result rows (``question_id``, ``text``) in file order; categories: question_id ->
    category; labels: category -> labels in label-file order.
    """
    by_cat = {cat: [] for cat in labels}
    for row in answers:
        qid = row["question_id"]
        if qid not in categories:
            raise UserError(f"result question_id {qid!r} is not in the question file")
        if categories[qid] in by_cat:  # categories without a label file are ignored, as there
            by_cat[categories[qid]].append(row["text"])
    counts = {cat: confusion(by_cat[cat], labels[cat]) for cat in sorted(labels)}
    out = {"categories": {cat: figures(c) for cat, c in counts.items()}}
    pooled = {k: sum(c[k] for c in counts.values()) for k in ("samples", "yes", "TP", "FP", "TN", "FN")}
    out["overall"] = figures(pooled)
    per = list(out["categories"].values())
    out["mean"] = {k: (sum(f[k] for f in per) / len(per) if per and all(f[k] is not None for f in per)
                       else None) for k in FIGURES}
    return out


def score_files(annotation_dir, question_file, result_file) -> dict:
    d = Path(annotation_dir)
    if not d.is_dir():
        raise UserError(f"--annotation-dir is not a directory: {d}")
    labels = {}
    for name in os.listdir(d):
        if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
            raise UserError(f"{d / name}: POPE label files are named {PREFIX}<category>{SUFFIX}")
        rows = read_jsonl(d / name, required=("label",))
        labels[name[len(PREFIX):-len(SUFFIX)]] = [r["label"] for r in rows]
    if not labels:
        raise UserError(f"--annotation-dir has no {PREFIX}<category>{SUFFIX} files: {d}")
    questions = read_jsonl(question_file, required=("question_id", "category"))
    categories = {q["question_id"]: q["category"] for q in questions}
    answers = read_jsonl(result_file, required=("question_id", "text"))
    return score(answers, categories, labels)
