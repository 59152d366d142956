"""ScienceQA accuracy, as LLaVA's ``llava/eval/eval_science_qa.py``.

``--base-dir`` holds ``problems.json`` (pid -> problem with ``choices`` and ``answer``, the index of
the right choice) and ``pid_splits.json`` (split -> pids). Every problem of ``--split`` counts; one
without an answer row reads as "FAILED". An answer is parsed as there:

* the whole text is an option letter ("B") -> that letter;
* it starts with a letter followed by ". " ("B. the moon") -> that letter;
* else ``The answer is ([A-Z]).`` matches exactly once -> its letter; else "FAILED".

A letter beyond the problem's choices, or "FAILED", is wrong (the official script's random
fallback sits after a ``return -1`` and never runs). Image accuracy counts the problems whose result
``prompt`` contains ``<image>`` (LLaVA's ``model_vqa_science`` writes it there for image
questions). Accuracies are in percent; None where the official script would divide by zero.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .files import UserError, ratio, read_json, read_jsonl

OPTIONS = ["A", "B", "C", "D", "E"]
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_answer(text: str, options=OPTIONS) -> str:
    """The option letter an answer gives, or "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def choice_index(letter: str, n_choices: int, options=OPTIONS) -> int:
    """Index of the chosen option, -1 if it is not one of the problem's n_choices."""
    return options.index(letter) if letter in options[:n_choices] else -1


def score(problems: dict, pids: list, predictions: dict, options=OPTIONS) -> tuple[dict, dict, dict]:
    """(metrics, per-problem analysis as the official --output-file, result as --output-result).

    predictions: question_id -> result row (``text``, ``prompt``).
    """
    results = {"correct": [], "incorrect": []}
    parsed, outputs = {}, {}
    for pid in pids:
        if pid not in problems:
            raise UserError(f"pid_splits.json lists {pid!r}, which problems.json lacks")
        prob = problems[pid]
        if not 0 <= prob["answer"] < len(options):
            raise UserError(f"problem {pid!r}: its answer is choice {prob['answer'] + 1}, but --options "
                            f"has {len(options)} letters")
        pred = predictions.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        letter = parse_answer(pred["text"], options)
        idx = choice_index(letter, len(prob["choices"]), options)
        results["correct" if idx == prob["answer"] else "incorrect"].append({
            "question_id": pid, "parsed_ans": letter, "ground_truth": options[prob["answer"]],
            "question": pred["prompt"], "pred": pred["text"], "is_multimodal": "<image>" in pred["prompt"],
        })
        parsed[pid], outputs[pid] = idx, pred["text"]
    correct, total = len(results["correct"]), len(results["correct"]) + len(results["incorrect"])
    mm_correct = sum(r["is_multimodal"] for r in results["correct"])
    mm_total = mm_correct + sum(r["is_multimodal"] for r in results["incorrect"])
    pct = lambda n, d: None if not d else 100.0 * ratio(n, d)
    metrics = {"acc": pct(correct, total), "correct": correct, "count": total,
               "multimodal_acc": pct(mm_correct, mm_total), "multimodal_correct": mm_correct,
               "multimodal_count": mm_total,
               # Not in the official output: problems with no answer row (read as "FAILED").
               "unanswered": sum(pid not in predictions for pid in pids)}
    sqa_result = {k: v for k, v in metrics.items() if k != "unanswered"}
    sqa_result.update(results=parsed, outputs=outputs)
    return metrics, results, sqa_result


def score_files(base_dir, result_file, split="test", options=OPTIONS, output_file=None,
                output_result=None) -> dict:
    base = Path(base_dir)
    if not base.is_dir():
        raise UserError(f"--base-dir is not a directory: {base}")
    splits = read_json(base / "pid_splits.json")
    if not isinstance(splits, dict) or split not in splits:
        raise UserError(f"{base / 'pid_splits.json'} has no split {split!r} (--split)")
    problems = read_json(base / "problems.json")
    for pid in splits[split]:
        p = problems.get(pid) if isinstance(problems, dict) else None
        if p is not None and not ("choices" in p and "answer" in p):
            raise UserError(f"{base / 'problems.json'}: problem {pid!r} lacks choices or answer")
    rows = read_jsonl(result_file, required=("question_id", "text", "prompt"))
    predictions = {r["question_id"]: r for r in rows}  # later rows win, as there
    metrics, results, sqa_result = score(problems, splits[split], predictions, list(options))
    if output_file:
        Path(output_file).write_text(json.dumps(results, indent=2))
    if output_result:
        Path(output_result).write_text(json.dumps(sqa_result, indent=2))
    return metrics
