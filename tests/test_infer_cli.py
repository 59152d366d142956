"""infer.py as a user types it: the bundled default, bad input, sampling options."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax.sampling import row_keys, sample

REPO = Path(__file__).resolve().parents[1]
IMG = str(REPO / "assets" / "images" / "portrait.png")


def infer(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env=env)


def test_compile_cache_fills_and_can_be_turned_off(tmp_path):
    import os
    on, off = tmp_path / "on", tmp_path / "off"
    args = ("--prompt", "Hi", "--max-new-tokens", "2")
    r = infer(*args, env=dict(os.environ, DYNLLAVA_JAX_COMPILE_CACHE=str(on)))
    assert r.returncode == 0, r.stderr
    assert len(list(on.iterdir())) > 0  # the compiled programs are kept for the next run
    r = infer(*args, "--no-compile-cache", env=dict(os.environ, DYNLLAVA_JAX_COMPILE_CACHE=str(off)))
    assert r.returncode == 0, r.stderr
    assert not off.exists()


def test_bundled_default_answers():
    r = infer("--image", IMG, "--prompt", "What is in the image?", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    assert ans["mode"] == "dynamic" and ans["image_tokens_total"] == 64
    assert ans["image_tokens_kept"] == 12 and len(ans["kept_image_indices"]) == 12
    assert ans["prompt_token_ids"].count(-200) == 1
    assert 0 < len(ans["token_ids"]) <= 8
    assert 0 < ans["kv_cache_bytes"] < ans["kv_cache_bytes_dense"]


def test_sampling_is_seeded():
    a = infer("--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3", "--json")
    b = infer("--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3", "--json")
    assert a.returncode == b.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


@pytest.mark.parametrize("args,msg", [
    (["--image", "missing.png", "--prompt", "x"], "image not found"),
    (["--image", __file__, "--prompt", "x"], "cannot load image"),
    (["--checkpoint", "no/such/dir", "--prompt", "x"], "checkpoint directory not found"),
    (["--prompt", "x " * 600], "does not fit"),
    (["--prompt", "x", "--max-new-tokens", "500"], "max_new_tokens 500 is too many for this prompt"),
    (["--prompt", "x", "--questions", "q.jsonl"], "exclusive"),
    (["--mode", "dense", "--vision-keep-rate", "0.5", "--prompt", "x"], "dynamic only"),
    (["--no-kv-cache", "--text-kv-budget", "0.5", "--prompt", "x"], "--no-kv-cache"),
    (["--image", IMG], "--image needs --prompt"),
    (["--checkpoint", "assets/tiny-dynamic-llava"], "nothing to answer"),
    (["--prompt", "x", "--seed", str(2 ** 70)], "--seed"),  # would repeat a smaller seed's key
    (["--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["--questions", "q.jsonl", "--answers-file", "a.jsonl", "--num-chunks", "2", "--chunk-idx", "2"],
     "--chunk-idx"),
])
def test_bad_input_is_one_line_exit_2(args, msg):
    r = infer(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    # Progress notices ("loading ...") may come first on a slow machine; one error line, no traceback.
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_attention_the_backend_cannot_run_is_one_line_exit_2():
    import jax
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN runs here")
    r = infer("--prompt", "x", "--attention", "cudnn")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and errors == [
        f"error: --attention cudnn: attention 'cudnn' needs an NVIDIA GPU; this backend is "
        f"{jax.default_backend()}"], r.stderr[-2000:]


def test_top_p_small_is_greedy_and_temperature_spreads():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 3
    greedy = sample(logits, None, True, 1.0, 1.0)
    nucleus = sample(logits, row_keys(jax.random.PRNGKey(1), range(4)), False, jnp.float32(1.0),
                     jnp.float32(1e-6))
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(nucleus))
    draws = [int(sample(logits[:1], row_keys(jax.random.PRNGKey(i), [0]), False, jnp.float32(5.0),
                        jnp.float32(1.0))[0]) for i in range(20)]
    assert len(set(draws)) > 1


def test_sampled_answers_do_not_depend_on_the_batch(tmp_path):
    """With temperature, a question's sampling key comes from its place in the file."""
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                         for i, t in enumerate(["Hi", "What is this?", "Tell me more.", "Why?"])))
    got = []
    for bs in ("1", "3"):
        r = infer("--questions", str(q), "--answers-file", str(tmp_path / f"a{bs}.jsonl"),
                  "--batch-size", bs, "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "6")
        assert r.returncode == 0, r.stderr[-2000:]
        got.append([json.loads(x)["text"] for x in (tmp_path / f"a{bs}.jsonl").read_text().splitlines()])
    assert got[0] == got[1]


def test_answers_file_that_is_an_input_or_a_directory_is_refused(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "text": "Hi"}) + "\n")
    before = q.read_text()
    for answers, msg in ((q, "is the --questions file"), (tmp_path, "is a directory")):
        r = infer("--questions", str(q), "--answers-file", str(answers), "--max-new-tokens", "2")
        assert r.returncode == 2 and r.stderr.startswith("error:") and msg in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1
    assert q.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]


def test_chunk_with_bad_questions_answers_the_rest(tmp_path):
    """--num-chunks 2 --chunk-idx 1 answers lines 4-6 (LLaVA's chunks of ceil(6 / 2)); the bad
    ones are named, each on its own line (not on the progress bar's), counted, and the exit
    status says so."""
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join([json.dumps({"question_id": 0, "text": "Hi"}),
                            json.dumps({"question_id": 1, "text": "Why?"}),
                            json.dumps({"question_id": 2, "text": "Who?"}),
                            "[1, 2]",
                            json.dumps({"question_id": 3, "text": "Where?", "image": "nope.png"}),
                            json.dumps({"question_id": 4, "text": "Name it."})]) + "\n")
    a = tmp_path / "a.jsonl"
    r = infer("--questions", str(q), "--image-folder", str(REPO / "assets" / "images"),
              "--answers-file", str(a), "--max-new-tokens", "3", "--num-chunks", "2", "--chunk-idx", "1")
    assert r.returncode == 1, r.stderr[-2000:]
    errors = re.findall(r"^error: .*$", r.stderr, re.M)
    assert len(errors) == 2 and errors[0].startswith(f"error: {q}:4: ") and \
        errors[1].startswith(f"error: {q}:5: ") and "nope.png" in errors[1], r.stderr[-2000:]
    assert "1 answered, 0 already in" in r.stderr and "2 skipped" in r.stderr
    assert [json.loads(l)["question_id"] for l in a.read_text().splitlines()] == [4]


def test_no_arguments_answers_the_bundled_question():
    """`python infer.py` alone: the bundled SynthVQA model, its example, what was saved."""
    ex = json.loads((REPO / "assets" / "synthvqa-dynamic-llava" / "example.json").read_text())
    r = infer("--json")
    assert r.returncode == 0, r.stderr[-2000:]
    ans = json.loads(r.stdout)
    assert ans["text"] == ex["answer"] == ans["expected"]
    assert ans["image_tokens_total"] == 144 and ans["image_tokens_kept"] == 28
    assert ans["prefill_flops_vs_dense"] < 1 and ans["kv_bytes"] < ans["kv_bytes_dense"]
    plain = infer()
    assert plain.returncode == 0 and f"answer: {ex['answer']}\n" in plain.stdout, plain.stderr[-2000:]


@pytest.mark.parametrize("dense,dynamic,undertrained", [(0.25, 0.24, True), (0.62, 0.61, True),
                                                         (0.86, 0.85, False)])
def test_accuracy_note_says_undertrained_only_when_it_is(tmp_path, dense, dynamic, undertrained):
    from dynllava_jax.demo import accuracy_note
    assert "not measured" in accuracy_note(tmp_path)
    (tmp_path / "eval").mkdir()
    modes = [{"run": k, "questions": 480, "accuracy": {"overall": v}}
             for k, v in (("dense", dense), ("dynamic", dynamic))]
    (tmp_path / "eval" / "synth_eval.json").write_text(json.dumps({"modes": modes}))
    note = accuracy_note(tmp_path)
    assert f"dense {100 * dense:.1f} %, dynamic {100 * dynamic:.1f} %" in note
    assert ("undertrained" in note) == undertrained
