"""LLaVA benchmark scorers (python -m dynllava_jax.eval score ...) on hand-made files.

Every expected figure is worked out by hand in a comment. Where the official scripts are at hand
(LLAVA_EVAL_DIR: a folder with llava/eval/*.py from haotian-liu/LLaVA and mme/ with MME's
convert_answer_to_mme.py and calculation.py), the same inputs, and random ones, also go through
them in-process; without it those checks skip (CI has no copy).
"""

import contextlib
import io
import json
import os
import random
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dynllava_jax.eval import mme, pope, sqa, textvqa, vqa
from dynllava_jax.eval.__main__ import main
from dynllava_jax.eval.files import UserError
from dynllava_jax.eval.normalize import normalize_answer, vqa_score

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = Path(os.environ.get("LLAVA_EVAL_DIR", "/nonexistent"))


def official(rel):
    p = OFFICIAL / rel
    if not p.is_file():
        pytest.skip(f"official script {rel} not available (set LLAVA_EVAL_DIR)")
    return p


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- normaliser

@pytest.mark.parametrize("raw,norm", [
    ("Two dogs, a cat.", "2 dogs cat"),      # commas gone, "." gone, two -> 2, article dropped
    ("It's 3.5", "it 's 3.5"),              # "'s" split off; a "." before a digit stays
    ("dont", "don't"),                      # contraction table
    ("yes/no", "yes no"),                   # "/" not beside a space -> a space
    ("a - b", "b"),                         # "-" beside a space -> deleted; "a" is an article
    ("x" + "." * 40, "x" + "." * 8),        # re.UNICODE passed as sub's count: only 32 "." go
    ("Coca-Cola", "coca cola"),
    ("  The\tEnd\n", "end"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_soft_score():
    refs = ["coca cola"] * 4 + ["Coca-Cola"] * 2 + ["coke"] * 3 + ["pepsi"]
    # "coca cola" x6 after normalising: each of the 6 sees 5 others (min(1, 5/3) = 1), each of the
    # other 4 sees 6: (6 + 4) / 10 = 1.0. "coke" x3: (3 * min(1, 2/3) + 7 * 1) / 10 = 0.9.
    # "pepsi" x1: (1 * 0 + 9 * 1/3) / 10 = 0.3. Unmatched: 0.
    assert vqa_score("The Coca Cola.", refs) == pytest.approx(1.0)
    assert vqa_score("coke", refs) == pytest.approx(0.9)
    assert vqa_score("Pepsi", refs) == pytest.approx(0.3)
    assert vqa_score("fanta", refs) == 0.0


def _random_answers(rng, n):
    pieces = ["the", "a", "An", "two", "Ten", "none", "3", "3.5", "1,000", "dont", "isnt", "Im", "it's",
              "yes", "no", "cat", "dog's", ".", ",", "?", "!", "-", "/", "(", ")", ";", "\"", "'", "_", "@",
              " ", "\n", "\t", "x.", ".5", "somebody'd", "y'allll", "<", ">", "="]
    return ["".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 8)))
            for _ in range(n)]


def test_normalize_matches_official_on_random_text():
    path = official("llava/eval/m4c_evaluator.py")
    ns = runpy.run_path(str(path))
    proc, ev = ns["EvalAIAnswerProcessor"](), ns["TextVQAAccuracyEvaluator"]()
    rng = random.Random(0)
    texts = _random_answers(rng, 400)
    assert [normalize_answer(t) for t in texts] == [proc(t) for t in texts]
    for _ in range(100):
        refs = [rng.choice(texts[:12]) for _ in range(10)]
        pred = rng.choice(texts[:12])
        assert vqa_score(pred, refs) == pytest.approx(
            ev._compute_answer_scores(refs).get(proc(pred), 0.0))


# ----------------------------------------------------------------------------- POPE

@pytest.fixture(scope="module")
def pope_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pope")
    ann = d / "coco"
    ann.mkdir()
    write_jsonl(ann / "coco_pope_adversarial.json", [{"label": x} for x in ["yes", "no", "yes", "no"]])
    write_jsonl(ann / "coco_pope_random.json", [{"label": x} for x in ["yes", "yes", "no"]])
    cats = {1: "adversarial", 2: "adversarial", 3: "adversarial", 4: "adversarial",
            5: "random", 6: "random", 7: "random", 8: "random"}
    write_jsonl(d / "q.jsonl", [{"question_id": q, "text": "?", "category": c} for q, c in cats.items()])
    texts = {
        1: "Yes, there is a dog.",          # yes; label yes -> TP
        2: "There is no cat in the image.",  # "no" -> no; label no -> TN
        3: "No.",                            # "No" -> no; label yes -> FN
        4: "Not at all.",                    # "Not" is not a no-word -> yes; label no -> FP
        5: "Yes. But no dog.",               # first sentence "Yes" -> yes; label yes -> TP
        6: "Yes,no",                         # commas removed: "Yesno" -> yes; label yes -> TP
        7: "There is a cat.No dog",          # first sentence has no no-word -> yes; label no -> FP
        8: "no",                             # no, but random has 3 labels: unpaired, only yes_ratio sees it
    }
    order = [1, 5, 2, 6, 3, 7, 4, 8]  # interleaved: each category keeps its own order
    write_jsonl(d / "a.jsonl", [{"question_id": q, "prompt": "?", "text": texts[q]} for q in order])
    return d


def test_pope_hand_worked(pope_files):
    m = pope.score_files(pope_files / "coco", pope_files / "q.jsonl", pope_files / "a.jsonl")
    adv, rnd = m["categories"]["adversarial"], m["categories"]["random"]
    # adversarial: TP 1, FP 1, TN 1, FN 1 -> acc 2/4, precision 1/2, recall 1/2, f1 1/2; yes 2 of 4.
    assert (adv["TP"], adv["FP"], adv["TN"], adv["FN"]) == (1, 1, 1, 1)
    assert [adv[k] for k in pope.FIGURES] == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.5])
    # random: TP 2, FP 1 (answer 8 unpaired) -> acc 2/3, precision 2/3, recall 2/2,
    # f1 = 2 * 2/3 * 1 / (2/3 + 1) = 0.8; yes 3 of the 4 answers.
    assert (rnd["TP"], rnd["FP"], rnd["TN"], rnd["FN"]) == (2, 1, 0, 0)
    assert [rnd[k] for k in pope.FIGURES] == pytest.approx([2 / 3, 2 / 3, 1.0, 0.8, 0.75])
    # overall, pooled: TP 3, FP 2, TN 1, FN 1 -> acc 4/7, precision 3/5, recall 3/4,
    # f1 = 2 * 0.6 * 0.75 / 1.35 = 2/3; yes 5 of 8.
    assert [m["overall"][k] for k in pope.FIGURES] == pytest.approx([4 / 7, 0.6, 0.75, 2 / 3, 5 / 8])
    # mean of the two categories: acc (1/2 + 2/3) / 2 = 7/12, f1 (0.5 + 0.8) / 2 = 0.65.
    assert m["mean"]["accuracy"] == pytest.approx(7 / 12) and m["mean"]["f1"] == pytest.approx(0.65)


def test_pope_matches_official(pope_files):
    ns = runpy.run_path(str(official("llava/eval/eval_pope.py")))
    ours = pope.score_files(pope_files / "coco", pope_files / "q.jsonl", pope_files / "a.jsonl")
    qs = {q["question_id"]: q for q in map(json.loads, (pope_files / "q.jsonl").read_text().splitlines())}
    answers = list(map(json.loads, (pope_files / "a.jsonl").read_text().splitlines()))
    for cat, f in ours["categories"].items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ns["eval_pope"]([a for a in answers if qs[a["question_id"]]["category"] == cat],
                            str(pope_files / "coco" / f"coco_pope_{cat}.json"))
        lines = out.getvalue().splitlines()
        assert lines[1].split("\t") == [str(f[k]) for k in ("TP", "FP", "TN", "FN")]
        printed = dict(line.split(": ") for line in lines[2:7])
        assert [float(printed[k]) for k in ("Accuracy", "Precision", "Recall", "F1 score", "Yes ratio")] == \
            pytest.approx([f[k] for k in pope.FIGURES])


def test_pope_matches_official_on_random_answers(tmp_path):
    ns = runpy.run_path(str(official("llava/eval/eval_pope.py")))
    rng = random.Random(2)
    words = ["Yes", "yes", "No", "no", "not", "Not", "No,", "no.", "there", "is", "a", "dog", ".", ",", " ", "\n"]
    labels = [rng.choice(["yes", "no"]) for _ in range(60)]
    texts = ["".join(rng.choice(words) + rng.choice([" ", "", ". ", ", "]) for _ in range(rng.randint(1, 6)))
             for _ in labels]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ns["eval_pope"]([{"text": t} for t in texts], str(write_jsonl(tmp_path / "l.json", [{"label": x} for x in labels])))
    f = pope.figures(pope.confusion(texts, labels))
    assert out.getvalue().splitlines()[1].split("\t") == [str(f[k]) for k in ("TP", "FP", "TN", "FN")]


def test_pope_unknown_question_is_a_user_error(pope_files, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 99, "text": "yes"}])
    rc, out, err = run_cli("score", "pope", "--annotation-dir", pope_files / "coco",
                           "--question-file", pope_files / "q.jsonl", "--result-file", tmp_path / "a.jsonl")
    assert rc == 2 and err.strip().splitlines() == ["error: result question_id 99 is not in the question file"]


# ----------------------------------------------------------------------------- TextVQA

def test_textvqa_question_from_prompt():
    inst = "Answer the question using a single word or phrase."
    assert textvqa.question_of(f"What is the Brand?\nReference OCR token: Coca, Cola\n{inst}") == "what is the brand?"
    assert textvqa.question_of(f"Reference OCR token: stop\nWhat word?\n{inst}") == "what word?"
    assert textvqa.question_of(f"How many cans?\n{inst}") == "how many cans?"
    assert textvqa.question_of("OCR tokens: a b Question: What Word? Short answer:") == "what word?"
    assert textvqa.question_of("no instruction line") is None


@pytest.fixture(scope="module")
def textvqa_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("textvqa")
    inst = "Answer the question using a single word or phrase."
    data = [
        {"image_id": "img1", "question": "What is the brand?",
         "answers": ["coca cola"] * 4 + ["Coca-Cola"] * 2 + ["coke"] * 3 + ["pepsi"]},
        {"image_id": "img1", "question": "How many cans?", "answers": ["2", "two"] + ["3"] * 8},
        {"image_id": "img2", "question": "What word?", "answers": ["stop"] + ["halt"] * 9},
    ]
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    write_jsonl(d / "a.jsonl", [
        {"question_id": "img1", "prompt": f"What is the brand?\nReference OCR token: Coca\n{inst}", "text": "The Coca Cola."},
        {"question_id": "img1", "prompt": f"How many cans?\n{inst}", "text": "two"},
        {"question_id": "img2", "prompt": "OCR tokens: stop Question: What word? Short answer:", "text": "Stop!"},
    ])
    return d


def test_textvqa_hand_worked(textvqa_files):
    m = textvqa.score_files(textvqa_files / "TextVQA_0.5.1_val.json", textvqa_files / "a.jsonl")
    # 1: "coca cola" has 6 of 10 references -> 1.0 (see test_vqa_soft_score).
    # 2: "two" -> "2", 2 of 10: (2 * min(1, 1/3) + 8 * min(1, 2/3)) / 10 = 0.6.
    # 3: "Stop!" -> "stop", 1 of 10: (1 * 0 + 9 * 1/3) / 10 = 0.3.
    # accuracy = 100 * (1.0 + 0.6 + 0.3) / 3 = 63.33 %
    assert m == {"samples": 3, "accuracy": pytest.approx(190 / 3)}


def test_textvqa_result_dir(textvqa_files, tmp_path):
    (tmp_path / "b.jsonl").write_text((textvqa_files / "a.jsonl").read_text().splitlines()[0] + "\n")
    (tmp_path / "a.jsonl").write_text((textvqa_files / "a.jsonl").read_text())
    (tmp_path / "notes.txt").write_text("skipped: not .jsonl")
    m = textvqa.score_dir(textvqa_files / "TextVQA_0.5.1_val.json", tmp_path)
    # a: the three answers of test_textvqa_hand_worked (63.33 %); b: only the first (100 %).
    assert list(m) == ["a", "b"] and m["a"]["accuracy"] == pytest.approx(190 / 3)
    assert m["b"] == {"samples": 1, "accuracy": 100.0}


def test_textvqa_matches_official(textvqa_files):
    m4c = runpy.run_path(str(official("llava/eval/m4c_evaluator.py")))
    fake = types.ModuleType("llava.eval.m4c_evaluator")  # eval_textvqa imports it by package name
    fake.TextVQAAccuracyEvaluator = m4c["TextVQAAccuracyEvaluator"]
    saved = {k: sys.modules.get(k) for k in ("llava", "llava.eval", "llava.eval.m4c_evaluator")}
    sys.modules.update({"llava": types.ModuleType("llava"), "llava.eval": types.ModuleType("llava.eval"),
                        "llava.eval.m4c_evaluator": fake})
    try:
        ns = runpy.run_path(str(official("llava/eval/eval_textvqa.py")))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            ns["eval_single"](str(textvqa_files / "TextVQA_0.5.1_val.json"), str(textvqa_files / "a.jsonl"))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    rc, table, _ = run_cli("score", "textvqa", "--annotation-file", textvqa_files / "TextVQA_0.5.1_val.json",
                           "--result-file", textvqa_files / "a.jsonl")
    assert rc == 0 and "Accuracy: 63.33%" in out.getvalue() and "63.33" in table


# ----------------------------------------------------------------------------- ScienceQA

@pytest.fixture(scope="module")
def sqa_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sqa")
    problems = {
        "p1": {"choices": ["a", "b", "c"], "answer": 1},
        "p2": {"choices": ["a", "b"], "answer": 0},
        "p3": {"choices": ["a", "b", "c", "d"], "answer": 2},
        "p4": {"choices": ["a", "b"], "answer": 1},
        "p5": {"choices": ["a", "b"], "answer": 0},
        "p6": {"choices": ["a", "b"], "answer": 0},
        "p7": {"choices": ["a", "b"], "answer": 0},
    }
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "pid_splits.json").write_text(json.dumps({"test": [f"p{i}" for i in range(1, 7)], "val": ["p7"]}))
    img, txt = "<image>\nWhich one?", "Which one?"
    write_jsonl(d / "a.jsonl", [
        {"question_id": "p1", "prompt": img, "text": "B"},                        # right, image
        {"question_id": "p2", "prompt": txt, "text": "A. the first"},             # "A. " -> A, right
        {"question_id": "p3", "prompt": img, "text": "Because so. The answer is C."},  # right, image
        {"question_id": "p4", "prompt": img, "text": "The answer is B. The answer is A."},  # 2 matches: FAILED
        {"question_id": "p5", "prompt": txt, "text": "C"},                        # beyond 2 choices: wrong
        # p6: no answer row -> "FAILED", prompt "Unknown" (not an image question)
        {"question_id": "p7", "prompt": txt, "text": "A"},                        # val only
    ])
    return d


def test_sqa_parse_answer():
    assert sqa.parse_answer("B") == "B"
    assert sqa.parse_answer("B. because") == "B"
    assert sqa.parse_answer("B.because") == "FAILED"                 # needs ". "
    assert sqa.parse_answer("So The answer is D!") == "D"             # "." in the pattern is any char
    assert sqa.parse_answer("The answer is A. The answer is A.") == "FAILED"
    assert sqa.parse_answer("the answer is A.") == "FAILED"           # case-sensitive
    assert sqa.choice_index("E", 4) == -1 and sqa.choice_index("D", 4) == 3


def test_sqa_hand_worked(sqa_files):
    m = sqa.score_files(sqa_files, sqa_files / "a.jsonl")
    # test split p1..p6: right p1, p2, p3 -> 3/6 = 50 %; image questions p1 (right), p3 (right),
    # p4 (wrong) -> 2/3 = 66.67 %; p6 unanswered.
    assert (m["correct"], m["count"], m["multimodal_correct"], m["multimodal_count"]) == (3, 6, 2, 3)
    assert m["acc"] == pytest.approx(50.0) and m["multimodal_acc"] == pytest.approx(200 / 3)
    assert m["unanswered"] == 1
    # --options CBA names choices 0, 1, 2 C, B, A: p1 "B" -> 1 right; p2 "A" is not among the first
    # 2 letters (C, B) -> wrong; p3 "C" -> 0, wrong; p4 FAILED; p5 "C" -> 0, right; p6 wrong: 2/6.
    assert sqa.score_files(sqa_files, sqa_files / "a.jsonl", options=list("CBA"))["correct"] == 2
    # --options AB cannot name p3's answer (choice 3), where the official script fails with IndexError.
    with pytest.raises(UserError, match="'p3': its answer is choice 3, but --options has 2 letters"):
        sqa.score_files(sqa_files, sqa_files / "a.jsonl", options=list("AB"))
    # --split val: p7 right, text-only -> 100 %, image accuracy undefined.
    v = sqa.score_files(sqa_files, sqa_files / "a.jsonl", split="val")
    assert (v["acc"], v["multimodal_acc"]) == (100.0, None)


def test_sqa_matches_official(sqa_files, tmp_path, monkeypatch):
    path = official("llava/eval/eval_science_qa.py")
    for options in ([], ["--options", "CBA"]):
        args = ["--base-dir", sqa_files, "--result-file", sqa_files / "a.jsonl", *options]
        monkeypatch.setattr(sys, "argv", ["eval_science_qa.py", *map(str, args),
                                          "--output-file", str(tmp_path / "o.json"),
                                          "--output-result", str(tmp_path / "r.json")])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(path), run_name="__main__")
        rc, table, _ = run_cli("score", "sqa", *args, "--output-file", tmp_path / "o2.json",
                               "--output-result", tmp_path / "r2.json")
        assert rc == 0
        theirs, ours = json.loads((tmp_path / "r.json").read_text()), json.loads((tmp_path / "r2.json").read_text())
        assert {k: ours[k] for k in theirs} == theirs
        assert json.loads((tmp_path / "o.json").read_text()) == json.loads((tmp_path / "o2.json").read_text())
        acc = out.getvalue().split("Accuracy: ")[1].split("%")[0]
        assert f"{ours['acc']:.2f}" == acc and acc in table


def test_sqa_matches_official_on_random_answers(tmp_path, monkeypatch):
    path = official("llava/eval/eval_science_qa.py")
    rng = random.Random(3)
    pieces = ["A", "B", "C", "E", "Z", "The answer is ", "the answer is ", ".", ". ", " ", "x", "!"]
    problems, rows = {}, []
    for i in range(80):
        n = rng.randint(2, 5)
        problems[f"p{i}"] = {"choices": ["c"] * n, "answer": rng.randrange(n)}
        if rng.random() < 0.9:  # some problems get no answer
            rows.append({"question_id": f"p{i}", "prompt": rng.choice(["<image>\nQ", "Q"]),
                         "text": "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))})
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    write_jsonl(tmp_path / "a.jsonl", rows)
    monkeypatch.setattr(sys, "argv", ["eval_science_qa.py", "--base-dir", str(tmp_path), "--result-file",
                                      str(tmp_path / "a.jsonl"), "--output-file", str(tmp_path / "o.json"),
                                      "--output-result", str(tmp_path / "r.json")])
    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_path(str(path), run_name="__main__")
    sqa.score_files(tmp_path, tmp_path / "a.jsonl", output_file=tmp_path / "o2.json",
                    output_result=tmp_path / "r2.json")
    theirs, ours = json.loads((tmp_path / "r.json").read_text()), json.loads((tmp_path / "r2.json").read_text())
    assert {k: ours[k] for k in theirs} == theirs and 0 < theirs["correct"] < theirs["count"]


# ----------------------------------------------------------------------------- VQA

def test_vqa_single_reference_layouts(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"1": "Two", "2": {"answer": "left"}, "3": ["blue"] * 2 + ["navy"] * 8, "5": "red"}))
    res = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 1, "text": "2 ."},     # "2" == "Two" normalised; int 1 matches "1"
        {"question_id": "2", "text": "Left."},
        {"question_id": 3, "text": "blue"},
        {"question_id": 9, "text": "x"},       # no annotation: ignored, counted as unannotated
    ])                                          # question 5 unanswered: missing
    m = vqa.score_files(ann, res)
    # 3 scored, all exact matches; question 1 has one reference, so no VQA soft accuracy.
    assert m == {"questions": 3, "exact_match": 100.0, "vqa_accuracy": None, "missing": 1, "unannotated": 1}


def test_vqa_v2_annotation_layout(tmp_path):
    ann = tmp_path / "mscoco_val2014_annotations.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 11, "answers": [{"answer": "blue"}] * 2 + [{"answer": "navy"}] * 8},
        {"question_id": 12, "answers": [{"answer": "yes"}] * 10}]}))
    res = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 11, "text": "Blue"}, {"question_id": 12, "text": "no"}])
    m = vqa.score_files(ann, res)
    # 11: exact; soft (2 * 1/3 + 8 * 2/3) / 10 = 0.6. 12: 0 and 0. exact 1/2 = 50 %, VQA (0.6 + 0) / 2 = 30 %.
    assert m["exact_match"] == 50.0 and m["vqa_accuracy"] == pytest.approx(30.0)
    jl = write_jsonl(tmp_path / "ann.jsonl", [{"question_id": 11, "answers": ["navy"]}])
    assert vqa.score_files(jl, res)["exact_match"] == 0.0


# ----------------------------------------------------------------------------- MME

def _mme_data(root: Path, gt: dict):
    """gt: (task, image stem, flat?) -> [(question, answer), ...] written as MME's release does."""
    for (task, stem, flat), qas in gt.items():
        qa_dir = root / task if flat else root / task / "questions_answers_YN"
        qa_dir.mkdir(parents=True, exist_ok=True)
        if not flat:
            (root / task / "images").mkdir(exist_ok=True)
        (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qas))


@pytest.fixture(scope="module")
def mme_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mme")
    yn = " Please answer yes or no."
    _mme_data(d / "MME_Benchmark_release_version", {
        ("existence", "000000006040", True): [("Is there a train in this image?" + yn, "Yes"),
                                               ("Is there a bed in this image?" + yn, "No")],
        ("existence", "000000018150", True): [("Is there a bus?" + yn, "Yes"), ("Is there a cow?" + yn, "No")],
        # artwork keeps MME's double space before "Please"
        ("artwork", "10002", False): [("Is this by X? " + yn, "Yes"), ("Is this by Y? " + yn, "No")],
        ("artwork", "10003", False): [("Is this by Z? " + yn, "No"), ("Is this by W? " + yn, "No")],
    })
    inst = "\nAnswer the question using a single word or phrase."
    write_jsonl(d / "a.jsonl", [
        {"question_id": "existence/000000006040.jpg", "prompt": "Is there a train in this image?" + inst,
         "text": "Yes"},                                                  # right
        {"question_id": "existence/000000006040.jpg", "prompt": "Is there a bed in this image?" + yn,
         "text": "No, there is not."},                                    # "no, " -> no: right
        {"question_id": "existence/000000018150.jpg", "prompt": "Is there a bus?", "text": "Yes"},  # right
        {"question_id": "existence/000000018150.jpg", "prompt": "Is there a cow?",
         "text": "I think yes"},                                          # "i th" -> other: wrong
        {"question_id": "artwork/images/10002.jpg", "prompt": "Is this by X?", "text": "not sure"},  # "not " -> no: wrong
        {"question_id": "artwork/images/10002.jpg", "prompt": "Is this by Y?", "text": "nope"},      # no: right
        {"question_id": "artwork/images/10003.jpg", "prompt": "Is this by Z?", "text": "yes\tno"},   # 5 fields: skipped
        {"question_id": "artwork/images/10003.jpg", "prompt": "Is this by W?", "text": "No"},       # right
    ])
    return d


def test_mme_hand_worked(mme_files):
    m = mme.score_files(mme_files / "MME_Benchmark_release_version", mme_files / "a.jsonl")
    ex, art = m["tasks"]["existence"], m["tasks"]["artwork"]
    # existence: 3 of 4 right -> acc 75; image 6040 both right, 18150 not -> acc+ 1/2 = 50; score 125.
    assert (ex["acc"], ex["acc_plus"], ex["score"], ex["other_num"]) == (75.0, 50.0, 125.0, 1)
    # artwork: the tab line is skipped, so 3 questions asked, 2 right -> acc 66.67; no image has
    # both right -> acc+ 0; score 66.67.
    assert (art["questions"], art["acc_plus"]) == (3, 0.0) and art["acc"] == pytest.approx(200 / 3)
    # perception = 125 + 66.67 = 191.67 over the 2 subtasks present; cognition has none.
    assert m["perception"]["score"] == pytest.approx(125 + 200 / 3) and m["perception"]["tasks"] == 2
    assert m["cognition"]["score"] is None and len(m["cognition"]["missing"]) == 4


def test_mme_unknown_question_is_a_user_error(mme_files, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": "existence/000000006040.jpg", "prompt": "Huh?", "text": "y"}])
    rc, _, err = run_cli("score", "mme", "--data-path", mme_files / "MME_Benchmark_release_version",
                         "--result-file", tmp_path / "a.jsonl")
    assert rc == 2 and err.startswith("error: result row 1: no ground truth for existence/000000006040.txt")


def test_mme_matches_official_on_random_answers(tmp_path, monkeypatch):
    convert_py, calc_py = official("mme/convert_answer_to_mme.py"), official("mme/calculation.py")
    rng = random.Random(1)
    gt, answers = {}, []
    replies = ["Yes", "No", "yes.", "no, it is not", "Not really", "nope", "I think so", "YES!", "maybe no",
               "yes\tno", "none", "Yes, there is"]
    for task in mme.PERCEPTION + mme.COGNITION:
        for i in range(rng.randint(1, 4)):
            stem = f"{i:04d}"
            sep = "  " if task == "artwork" else " "  # MME spells some subtasks with two spaces
            qs = [f"{task} q{i}{k}?" for k in "ab"]
            gt[(task, stem, task in ("count", "OCR"))] = [(q + sep + "Please answer yes or no.",
                                                            rng.choice(["Yes", "No"])) for q in qs]
            sub = "" if task in ("count", "OCR") else "images/"
            for q in qs:
                answers.append({"question_id": f"{task}/{sub}{stem}.png", "prompt": q, "text": rng.choice(replies)})
    _mme_data(tmp_path / "MME_Benchmark_release_version", gt)
    (tmp_path / "answers").mkdir()
    write_jsonl(tmp_path / "answers" / "exp.jsonl", answers)
    ours = mme.score_files(tmp_path / "MME_Benchmark_release_version", tmp_path / "answers" / "exp.jsonl")

    # The official pair, in-process: convert (run from the MME folder), then calculation with a
    # minimal sklearn.metrics (only accuracy_score enters the score; the rest is printed, unused).
    sk = types.ModuleType("sklearn.metrics")
    sk.accuracy_score = lambda g, p: sum(a == b for a, b in zip(g, p)) / len(g)
    sk.precision_score = sk.recall_score = lambda *a, **k: 0.0
    sk.confusion_matrix = lambda *a, **k: [[0, 0], [0, 0]]
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.metrics", sk)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["convert_answer_to_mme.py", "--experiment", "exp"])
    runpy.run_path(str(convert_py), run_name="__main__")
    ns = runpy.run_path(str(calc_py))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ns["calculate_metrics"]().process_result(str(tmp_path / "eval_tool" / "answers" / "exp"))
    totals = [float(line.split(":")[1]) for line in out.getvalue().splitlines() if line.startswith("total score:")]
    tasks = {line.split()[0]: float(line.split("score:")[1]) for line in out.getvalue().splitlines()
             if line.startswith("\t")}
    assert totals == pytest.approx([ours["perception"]["score"], ours["cognition"]["score"]])
    assert tasks == pytest.approx({t: f["score"] for t, f in ours["tasks"].items()})
    # and from the converted files, as calculation.py's --results_dir
    again = mme.score_files(results_dir=tmp_path / "eval_tool" / "answers" / "exp")
    assert again["perception"] == ours["perception"] and again["tasks"] == ours["tasks"]


# ----------------------------------------------------------------------------- CLI

def test_cli_json_is_one_object(pope_files):
    rc, out, _ = run_cli("score", "pope", "--annotation-dir", pope_files / "coco", "--question-file",
                         pope_files / "q.jsonl", "--result-file", pope_files / "a.jsonl", "--json")
    assert rc == 0
    m = json.loads(out)
    assert m["categories"]["random"]["f1"] == pytest.approx(0.8)
    rc, table, _ = run_cli("score", "pope", "--annotation-dir", pope_files / "coco", "--question-file",
                           pope_files / "q.jsonl", "--result-file", pope_files / "a.jsonl")
    assert rc == 0 and "0.800" in table.splitlines()[3] and table.splitlines()[3].startswith("random")


@pytest.mark.parametrize("args,msg", [
    (["score", "textvqa", "--annotation-file", "missing.json", "--result-file", "x"], "file not found: missing.json"),
    (["score", "sqa", "--result-file", "x"], "--base-dir"),
    (["score", "mme", "--result-file", "x"], "needs --data-path"),
    (["score", "nosuch"], "invalid choice"),
    (["ppl", "--question-file", "missing.json"], "file not found: missing.json"),
    (["ppl", "--question-file", "missing.json", "--vision-keep-rate", "2"], "--vision-keep-rate must be in (0, 1]"),
])
def test_cli_user_errors_are_one_line(args, msg):
    rc, _, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], err


def test_bad_jsonl_line_is_named(tmp_path, sqa_files):
    (tmp_path / "a.jsonl").write_text('{"question_id": "p1", "prompt": "", "text": "A"}\n{oops\n')
    with pytest.raises(UserError, match=r"a.jsonl:2: not JSON"):
        sqa.score_files(sqa_files, tmp_path / "a.jsonl")


def test_merge_cli_puts_chunks_in_question_order(tmp_path):
    # The CLI as a user types it (its one subprocess): chunks of infer.py --num-chunks 2.
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": q, "text": "?"} for q in ["c", "a", "d", "b"]])
    write_jsonl(tmp_path / "2_0.jsonl", [{"question_id": q, "text": q.upper()} for q in ["c", "a"]])
    write_jsonl(tmp_path / "2_1.jsonl", [{"question_id": q, "text": q.upper()} for q in ["b", "d"]])
    r = subprocess.run([sys.executable, "-m", "dynllava_jax.eval", "merge", "--question-file", tmp_path / "q.jsonl",
                        "--result-files", tmp_path / "2_0.jsonl", tmp_path / "2_1.jsonl",
                        "--output-file", tmp_path / "merge.jsonl"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "merge.jsonl").read_text().splitlines()]
    assert [(x["question_id"], x["text"]) for x in rows] == [("c", "C"), ("a", "A"), ("d", "D"), ("b", "B")]
