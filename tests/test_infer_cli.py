"""infer.py as a user types it: the bundled default, bad input, sampling options."""

import json
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


def infer(*args):
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *args], capture_output=True,
                          text=True, cwd=REPO)


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
    (["--prompt", "x", "--questions", "q.jsonl"], "exclusive"),
    (["--mode", "dense", "--vision-keep-rate", "0.5", "--prompt", "x"], "dynamic only"),
    (["--no-kv-cache", "--text-kv-budget", "0.5", "--prompt", "x"], "--no-kv-cache"),
    (["--image", IMG], "--image needs --prompt"),
    (["--checkpoint", "assets/tiny-dynamic-llava"], "nothing to answer"),
])
def test_bad_input_is_one_line_exit_2(args, msg):
    r = infer(*args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], r.stderr[-2000:]


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
