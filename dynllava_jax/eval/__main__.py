"""python -m dynllava_jax.eval: score LLaVA benchmark answers, merge split answer files.

  score pope    --annotation-dir D --question-file Q --result-file A
  score textvqa --annotation-file TextVQA_0.5.1_val.json --result-file A   (or --result-dir D)
  score sqa     --base-dir D --result-file A [--split test] [--options ABCDE]
                [--output-file F --output-result R]
  score vqa     --annotation-file ANN --result-file A
  score mme     --data-path MME_Benchmark_release_version --result-file A [--output-dir O]
  score mme     --results-dir eval_tool/answers/EXP
  merge         --question-file Q --result-files A1 A2 ... --output-file A
  ppl           --question-file Q.json --image-folder DIR --answers-file A.jsonl [--mode dense|dynamic]
  synth         --checkpoint C --data D --out O [--sweep]   (the SynthVQA held-out split)

Argument names follow LLaVA's own scripts; each score prints a table, or with --json one JSON
object of metrics.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import mme, pope, sqa, textvqa, vqa
from .files import UserError
from .table import render


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other user error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = _Parser(prog="python -m dynllava_jax.eval", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    score = cmd.add_parser("score", help="score a benchmark's answers").add_subparsers(
        dest="task", required=True, parser_class=_Parser)

    def task(name, help):
        t = score.add_parser(name, help=help)
        t.add_argument("--json", action="store_true", help="print one JSON object of metrics")
        return t

    t = task("pope", "POPE (llava/eval/eval_pope.py)")
    t.add_argument("--annotation-dir", required=True, help="folder of coco_pope_<category>.json label files")
    t.add_argument("--question-file", required=True, help="questions .jsonl with question_id and category")
    t.add_argument("--result-file", required=True, help="answers .jsonl")
    t = task("textvqa", "TextVQA (llava/eval/eval_textvqa.py)")
    t.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--result-file", help="answers .jsonl")
    src.add_argument("--result-dir", help="score every .jsonl in this folder (as the official script)")
    t = task("sqa", "ScienceQA (llava/eval/eval_science_qa.py)")
    t.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    t.add_argument("--result-file", required=True, help="answers .jsonl")
    t.add_argument("--split", default="test")
    # type=list as in the official script: "--options ABCD" means the letters A, B, C, D.
    t.add_argument("--options", type=list, default=list(sqa.OPTIONS), help="option letters, e.g. ABCDE")
    t.add_argument("--output-file", help="write the per-problem analysis here (as the official script)")
    t.add_argument("--output-result", help="write the result summary here (as the official script)")
    t = task("vqa", "VQAv2 / GQA-style normalised exact match and VQA accuracy")
    t.add_argument("--annotation-file", required=True, help="question_id -> reference answers (see vqa.py)")
    t.add_argument("--result-file", required=True, help="answers .jsonl")
    t = task("mme", "MME (convert_answer_to_mme.py + eval_tool/calculation.py)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--result-file", help="answers .jsonl (needs --data-path)")
    src.add_argument("--results-dir", "--results_dir", dest="results_dir",
                     help="already converted <subtask>.txt files, as calculation.py reads")
    t.add_argument("--data-path", help="MME_Benchmark_release_version (ground truth for --result-file)")
    t.add_argument("--output-dir", help="also write the converted <subtask>.txt files here")

    m = cmd.add_parser("merge", help="join the answer files of a job split with --num-chunks")
    m.add_argument("--question-file", help="questions .jsonl giving the order (default: files' order)")
    m.add_argument("--result-files", nargs="+", required=True, help="the answer files of the chunks")
    m.add_argument("--output-file", required=True, help="the merged answers .jsonl")
    q = cmd.add_parser("ppl", help="perplexity of reference answers under teacher forcing "
                                   "(Dynamic-LLaVA's model_lvis_for_ppl.py)")
    q.add_argument("--checkpoint", help="converted checkpoint directory (default: the bundled one)")
    q.add_argument("--question-file", required=True, help="JSON list (or .jsonl) of {id, image, question, answer}")
    q.add_argument("--image-folder", help="folder the questions' image paths are relative to")
    q.add_argument("--answers-file", help="write one row per question (its ppl and cache figures) here")
    q.add_argument("--mode", choices=["dense", "dynamic"],
                   help="default: dynamic for checkpoints with predictors, else dense")
    q.add_argument("--vision-keep-rate", type=float, help="fraction of image tokens kept (dynamic mode)")
    q.add_argument("--text-kv-budget", type=float, default=1.0,
                   help="sparse-layer cache slots for answer tokens, as a fraction of the batch's longest "
                        "answer rounded up to a multiple of 32 (default 1.0: exact)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--json", action="store_true", help="print one JSON object of metrics")
    from . import synth
    synth.add_arguments(cmd.add_parser("synth", help="accuracy on the SynthVQA held-out split, "
                                                     "dense vs dynamic, in all three modes"))
    a = p.parse_args(argv)
    if a.command == "score" and a.task == "mme" and a.result_file is not None and a.data_path is None:
        p.error("score mme --result-file needs --data-path (the MME_Benchmark_release_version folder)")
    return a


def pope_table(m) -> str:
    cols = ["TP", "FP", "TN", "FN", "accuracy", "precision", "recall", "f1", "yes_ratio"]
    rows = [[cat, f["samples"]] + [f[c] for c in cols] for cat, f in m["categories"].items()]
    rows.append(["overall", m["overall"]["samples"]] + [m["overall"][c] for c in cols])
    rows.append(["mean", ""] + [""] * 4 + [m["mean"][c] for c in pope.FIGURES])
    return render(["category", "samples"] + cols, rows, digits=3)


def mme_table(m) -> str:
    rows = [[t, f["images"], f["acc"], f["acc_plus"], f["score"]] for t, f in m["tasks"].items()]
    for group in ("perception", "cognition"):
        g = m[group]
        rows.append([f"{group} total ({g['tasks']} subtasks)", "", "", "", g["score"]])
    text = render(["subtask", "images", "acc", "acc+", "score"], rows)
    missing = m["perception"]["missing"] + m["cognition"]["missing"]
    if missing:
        text += f"\nmissing subtasks (not in the totals): {', '.join(missing)}"
    return text


def run_score(a) -> tuple[dict, str]:
    if a.task == "pope":
        m = pope.score_files(a.annotation_dir, a.question_file, a.result_file)
        return m, pope_table(m)
    if a.task == "textvqa":
        if a.result_dir is not None:
            m = textvqa.score_dir(a.annotation_file, a.result_dir)
            return m, render(["result file", "samples", "accuracy (%)"],
                             [[name, f["samples"], f["accuracy"]] for name, f in m.items()])
        m = textvqa.score_files(a.annotation_file, a.result_file)
        return m, render(["samples", "accuracy (%)"], [[m["samples"], m["accuracy"]]])
    if a.task == "sqa":
        m = sqa.score_files(a.base_dir, a.result_file, a.split, a.options, a.output_file, a.output_result)
        return m, render(["total", "correct", "accuracy (%)", "image total", "image correct", "IMG-accuracy (%)"],
                         [[m["count"], m["correct"], m["acc"], m["multimodal_count"], m["multimodal_correct"],
                           m["multimodal_acc"]]])
    if a.task == "vqa":
        m = vqa.score_files(a.annotation_file, a.result_file)
        return m, render(["questions", "exact match (%)", "VQA accuracy (%)", "missing", "unannotated"],
                         [[m["questions"], m["exact_match"], m["vqa_accuracy"], m["missing"], m["unannotated"]]])
    m = mme.score_files(a.data_path, a.result_file, a.results_dir, a.output_dir)
    return m, mme_table(m)


def merge(a) -> int:
    from ..answering import merge_answers
    try:
        n = merge_answers(a.result_files, a.output_file, questions_path=a.question_file)
    except ValueError as e:  # how a bad answer or question file is reported
        raise UserError(str(e)) from None
    print(f"wrote {n} answers to {a.output_file}", file=sys.stderr)
    return 0


def run_ppl(a) -> tuple[dict, str]:
    from pathlib import Path
    if a.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if a.vision_keep_rate is not None and not 0.0 < a.vision_keep_rate <= 1.0:
        raise UserError("--vision-keep-rate must be in (0, 1]")
    if not 0.0 <= a.text_kv_budget <= 1.0:
        raise UserError("--text-kv-budget must be in [0, 1]")
    from . import ppl
    questions = ppl.read_questions(a.question_file)
    if any(q["image"] for q in questions) and a.image_folder is None:
        raise UserError("image questions need --image-folder")
    from ..checkpoint import CheckpointDirError
    from ..generate import GenOptions
    from ..image_processing import ImageLoadError
    from ..inference import DEFAULT_CHECKPOINT, Llava
    from ..inputs import InputError
    ckpt = Path(a.checkpoint) if a.checkpoint else DEFAULT_CHECKPOINT
    if not ckpt.is_dir():
        raise UserError(f"checkpoint directory not found: {ckpt}")
    try:
        model = Llava(ckpt)
    except (CheckpointDirError, ValueError) as e:
        raise UserError(f"cannot load checkpoint {ckpt}: {e}") from None
    mode = a.mode or ("dynamic" if model.has_predictors else "dense")
    if mode == "dynamic" and not model.has_predictors:
        raise UserError(f"--mode dynamic needs a Dynamic-LLaVA checkpoint; {ckpt} has no predictors")
    if mode == "dense" and (a.vision_keep_rate is not None or a.text_kv_budget != 1.0):
        raise UserError("--vision-keep-rate and --text-kv-budget apply to --mode dynamic only")
    opts = GenOptions(mode=mode, vision_keep_rate=a.vision_keep_rate, text_kv_budget=a.text_kv_budget)
    try:
        rows = ppl.score_questions(model, questions, a.image_folder, opts, a.batch_size, a.answers_file)
    except (ImageLoadError, InputError) as e:
        raise UserError(str(e)) from None
    m = dict(ppl.summary(rows), mode=mode)
    return m, render(["mode", "questions", "mean ppl", "answer tokens fed", "kept in sparse cache",
                      "image tokens kept"],
                     [[mode, m["questions"], m["mean_ppl"], m["mean_output_token_length"],
                       m["mean_output_cache_length"], m["mean_image_tokens_kept"]]], digits=3)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.command == "synth":
        from . import synth
        return synth.main(a)
    try:
        if a.command == "merge":
            return merge(a)
        if a.command == "ppl":
            metrics, table = run_ppl(a)
            print(json.dumps(metrics) if a.json else table)
            return 0
        metrics, table = run_score(a)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics) if a.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
