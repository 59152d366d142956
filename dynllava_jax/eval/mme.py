"""MME: per-subtask acc and acc+, perception and cognition totals.

Two official steps, kept as they are because published MME scores come from them:

1. LLaVA's ``convert_answer_to_mme.py`` turns the answers into one tab-separated file per subtask
   (``image file, question, ground truth, answer`` a line). The subtask is the question_id's first
   path part and the ground-truth file its last part with the extension swapped for ``.txt``; the
   question is the prompt without "Answer the question using a single word or phrase.", with
   " Please answer yes or no." appended if absent (with two spaces if that is how MME spells it).
   Ground truth comes from ``MME_Benchmark_release_version/<subtask>/`` (``questions_answers_YN/``
   beside ``images/``, or the ``.txt`` files among the images).
2. MME's ``eval_tool/calculation.py`` reads those files back: consecutive lines pair up as the two
   questions of one image; an answer (lowercased) is "yes"/"no" if it is exactly that, else the
   one of them found in its first four characters ("yes" first), else "other". acc is the share
   of questions right, acc+ the share of images with both right, a subtask's score is
   100 * (acc + acc+), and perception / cognition are the sums over their subtasks.

We render step 1's text in memory and read it back as step 2 does, so that answers holding tabs
or line breaks shift and drop lines exactly as the official files would. acc and acc+ are
reported in percent, i.e. score = acc + acc_plus.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

from .files import UserError, read_jsonl

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
SHORT_ANSWER = "Answer the question using a single word or phrase."
YES_NO = " Please answer yes or no."


def read_ground_truth(data_path) -> dict[tuple[str, str, str], str]:
    """(subtask, question-list file, question) -> "Yes"/"No", from MME's release folder."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(f"--data-path is not a directory: {root}")
    gt = {}
    for task in os.listdir(root):
        task_dir = root / task
        if not task_dir.is_dir():
            continue
        qa_dir = task_dir / "questions_answers_YN" if (task_dir / "images").exists() else task_dir
        if not qa_dir.is_dir():
            raise UserError(f"{task_dir}: has images/ but no questions_answers_YN/")
        for name in os.listdir(qa_dir):
            if not name.endswith(".txt"):
                continue
            text = (qa_dir / name).read_bytes().decode("utf-8", errors="replace")
            for n, line in enumerate(io.StringIO(text, newline=None).readlines(), 1):
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise UserError(f"{qa_dir / name}:{n}: expected 'question<TAB>answer'")
                gt[(task, name, parts[0])] = parts[1]
    return gt


def convert(answers: list[dict], gt: dict) -> dict[str, str]:
    """subtask -> the text of its ``eval_tool/answers/<experiment>/<subtask>.txt`` (step 1)."""
    files: dict[str, list[str]] = {}
    for n, row in enumerate(answers, 1):
        qid = row["question_id"]
        if not isinstance(qid, str) or "/" not in qid:
            raise UserError(f"result row {n}: MME question_id must be '<subtask>/.../<image>', got {qid!r}")
        task = qid.split("/")[0]
        qfile = qid.split("/")[-1].split(".")[0] + ".txt"
        prompt = row["prompt"]
        if SHORT_ANSWER in prompt:
            prompt = prompt.replace(SHORT_ANSWER, "").strip()
        if YES_NO.strip() not in prompt:
            prompt = prompt + YES_NO
            if (task, qfile, prompt) not in gt:
                prompt = prompt.replace(YES_NO, " " + YES_NO)
        if (task, qfile, prompt) not in gt:
            raise UserError(f"result row {n}: no ground truth for {task}/{qfile} question {prompt!r}")
        files.setdefault(task, []).append("\t".join((qfile, prompt, gt[task, qfile, prompt], row["text"])) + "\n")
    return {task: "".join(lines) for task, lines in files.items()}


def yes_no(answer: str) -> str:
    """MME's reading of a lowercased answer: "yes", "no" or "other"."""
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def task_metrics(text: str, where: str = "") -> dict:
    """acc, acc+ (percent), score and counts of one subtask file's text (step 2)."""
    lines = io.StringIO(text, newline=None).readlines()  # as open() reads it: universal newlines
    if len(lines) % 2:
        raise UserError(f"{where}: {len(lines)} lines; MME pairs two questions per image")
    right = asked = both = other = 0
    for i in range(0, len(lines), 2):
        image_right = 0
        for line in lines[i:i + 2]:
            parts = line.split("\t")
            if len(parts) != 4:  # the official script prints such a line and skips it
                print(f"warning: {where}: skipping malformed line {line!r}", file=sys.stderr)
                continue
            gt, pred = parts[2].lower(), yes_no(parts[3].lower())
            if gt not in ("yes", "no"):
                raise UserError(f"{where}: ground truth {parts[2]!r} is not yes/no")
            asked += 1
            right += gt == pred
            image_right += gt == pred
            other += pred == "other"
        both += image_right == 2
    images = len(lines) // 2
    acc = 100.0 * right / asked if asked else None
    acc_plus = 100.0 * both / images if images else None
    return {"images": images, "questions": asked, "other_num": other, "acc": acc, "acc_plus": acc_plus,
            "score": None if acc is None or acc_plus is None else acc + acc_plus}


def score(task_texts: dict[str, str], where=lambda task: task) -> dict:
    """Per-subtask metrics and the perception / cognition totals over the subtasks present."""
    out = {"tasks": {}}
    for group, tasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [t for t in tasks if t in task_texts]
        for t in present:
            out["tasks"][t] = task_metrics(task_texts[t], where(t))
        scores = [out["tasks"][t]["score"] for t in present]
        out[group] = {"score": sum(scores) if present and None not in scores else None,
                      "tasks": len(present), "missing": [t for t in tasks if t not in task_texts]}
    out["ignored"] = sorted(t for t in task_texts if t not in PERCEPTION + COGNITION)
    return out


def read_results_dir(results_dir) -> dict[str, str]:
    """Already converted ``<subtask>.txt`` files (calculation.py's --results_dir)."""
    d = Path(results_dir)
    if not d.is_dir():
        raise UserError(f"--results-dir is not a directory: {d}")
    texts = {}
    for t in PERCEPTION + COGNITION:
        p = d / f"{t}.txt"
        if p.is_file():
            try:
                texts[t] = p.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts:
        raise UserError(f"{d}: no MME subtask files (<subtask>.txt, e.g. existence.txt)")
    return texts


def score_files(data_path=None, result_file=None, results_dir=None, output_dir=None) -> dict:
    if results_dir is not None:
        texts = read_results_dir(results_dir)
        return score(texts, where=lambda t: str(Path(results_dir) / f"{t}.txt"))
    answers = read_jsonl(result_file, required=("question_id", "prompt", "text"))
    texts = convert(answers, read_ground_truth(data_path))
    if output_dir is not None:  # the files calculation.py reads, for checking with the official tool
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for task, text in texts.items():
            (Path(output_dir) / f"{task}.txt").write_text(text, encoding="utf-8")
    return score(texts, where=lambda t: f"{t} answers")
