"""SPEC §8: the official release's own greedy tokens, through convert_weights.py and infer.py.

Every case of ../shared/fixtures/official-tiny-public/expected.json (3 images x 2 questions +
1 text-only prompt, in dense / kv_cache / no_cache) must come out token for token, with the
same kept image indices and, in kv_cache mode, the same number of generated tokens kept.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODES = {"dense": ["--mode", "dense"], "kv_cache": ["--mode", "dynamic"],
         "no_cache": ["--mode", "dynamic", "--no-kv-cache"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixtures_dir):
    dst = tmp_path_factory.mktemp("conv") / "tiny"
    r = subprocess.run([sys.executable, str(REPO / "convert_weights.py"),
                        "--src", str(fixtures_dir / "dynamic-llava-tiny"), "--dst", str(dst),
                        "--vision-tower", str(fixtures_dir / "clip")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return dst


@pytest.fixture(scope="module")
def expected(fixtures_dir):
    return json.loads((fixtures_dir / "expected.json").read_text())["cases"]


def _questions(cases, tmp_path):
    seen, lines = {}, []
    for c in cases:
        key = (c["image"], c["question"])
        if key not in seen:
            seen[key] = len(seen)
            rec = {"question_id": seen[key], "text": c["question"]}
            if c["image"]:
                rec["image"] = c["image"]
            lines.append(json.dumps(rec))
    q = tmp_path / "questions.jsonl"
    q.write_text("\n".join(lines) + "\n")
    return q, seen


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch_size", [1, 7])
def test_official_tokens(mode, batch_size, converted, expected, fixtures_dir, tmp_path):
    _check_official_tokens(mode, batch_size, [], converted, expected, fixtures_dir, tmp_path)


@pytest.mark.parametrize("mode", list(MODES))
def test_official_tokens_with_splash_attention(mode, converted, expected, fixtures_dir, tmp_path):
    """The prompt passes (vision tower, image predictor, LLM; every chunk of no-cache mode)
    through TPU splash attention, here in Pallas's interpreter: the same tokens."""
    _check_official_tokens(mode, 7, ["--attention", "splash"], converted, expected, fixtures_dir,
                           tmp_path)


def _check_official_tokens(mode, batch_size, extra, converted, expected, fixtures_dir, tmp_path):
    cases = [c for c in expected if c["mode"] == mode]
    assert len(cases) == 7
    q, ids = _questions(cases, tmp_path)
    r = subprocess.run([sys.executable, str(REPO / "infer.py"), "--checkpoint", str(converted),
                        "--questions", str(q), "--image-folder", str(fixtures_dir / "images"),
                        "--answers-file", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "20",
                        "--batch-size", str(batch_size), "--json", *MODES[mode], *extra],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    got = {a["question_id"]: a for a in map(json.loads, r.stdout.splitlines())}
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["question_id"] for a in answers) == sorted(got)
    for c in cases:
        a = got[ids[(c["image"], c["question"])]]
        assert a["prompt_token_ids"] == c["prompt_ids"]
        assert a["token_ids"] == c["new_token_ids"], (mode, c["image"], c["question"])
        if mode != "dense" and c["kept_image_indices"] is not None:
            assert a["kept_image_indices"] == c["kept_image_indices"]
            assert a["image_tokens_kept"] == c["num_image_tokens_kept"]
        if mode == "kv_cache":
            assert a["generated_tokens_in_cache"] == c["kv_generated_tokens_kept"]
        if mode == "dense" and c["image"]:
            assert a["image_tokens_kept"] == a["image_tokens_total"] == c["num_image_tokens"]
