"""`convert_weights.py` as a user runs it, and the checkpoint readers under it.

Bad input must give exit code 2, one `error:` line (the list of bad tensors may follow),
no traceback, and nothing written. The official tiny Dynamic-LLaVA fixture converts
through the CLI and reproduces the recorded dense logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

try:  # pytest's default import mode puts tests/ on sys.path
    import test_parity_hf as tiny
except ImportError:  # tests/ imported as a package
    from tests import test_parity_hf as tiny

from dynllava_jax import checkpoint_io  # noqa: E402
from dynllava_jax.checkpoint import load_converted  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:
    from conftest import FIXTURES
except ImportError:  # the same path, where conftest.py is not importable by name
    FIXTURES = REPO.parent / "shared" / "fixtures" / "official-tiny-public"
OFFICIAL = FIXTURES / "dynamic-llava-tiny"
needs_fixture = pytest.mark.skipif(not OFFICIAL.exists(), reason="official fixture not present")


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "convert_weights.py"), "--quiet",
                           *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_clean_failure(r: subprocess.CompletedProcess, dst: Path, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]


def hf_copy(tmp_path: Path, edit=None) -> Path:
    """A copy of the tiny llava-hf checkpoint, its tensors passed through `edit`."""
    from safetensors.torch import save_file
    src = tmp_path / "src"
    shutil.copytree(tiny.hf_model()[1], src)
    if edit is not None:
        t = tiny.hf_tensors()
        edit(t)
        save_file({k: v.contiguous() for k, v in t.items()}, str(src / "model.safetensors"))
    return src


# -- the CLI on good input ---------------------------------------------------------------

def test_cli_converts_llava_hf(tmp_path):
    dst = tmp_path / "out"
    r = run_cli("--src", tiny.hf_model()[1], "--dst", dst)
    assert r.returncode == 0, r.stderr
    assert "layout:      llava-hf" in r.stdout
    assert "predictors:  none" in r.stdout
    assert str(dst) in r.stdout
    cfg, params = load_converted(dst)
    _, want = tiny.converted("hf")
    tiny.assert_same_params(params, want)
    assert (dst / "preprocessor_config.json").exists()
    assert json.loads((dst / "preprocessor_config.json").read_text())["crop_size"]["height"] == tiny.IMAGE_SIZE


def test_cli_force_replaces_existing_dst(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    r = run_cli("--src", tiny.hf_model()[1], "--dst", dst)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--force" in r.stderr
    assert (dst / "stale.txt").read_text() == "old"  # untouched
    r = run_cli("--src", tiny.hf_model()[1], "--dst", dst, "--force", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert not (dst / "stale.txt").exists() and (dst / "model_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no tmp / .old left over
    cfg, params = load_converted(dst)
    assert cfg.param_dtype == "bfloat16"
    assert str(np.asarray(params["llm"]["norm"]["scale"]).dtype) == "bfloat16"


@needs_fixture
def test_cli_official_fixture_reproduces_recorded_logits(tmp_path):
    import jax.numpy as jnp
    from dynllava_jax.inputs import prepare_batch
    from dynllava_jax.model import forward_dense

    dst = tmp_path / "tiny"
    r = run_cli("--src", OFFICIAL, "--dst", dst, "--vision-tower", FIXTURES / "clip")
    assert r.returncode == 0, r.stderr
    assert "layout:      original" in r.stdout
    assert "predictors:  image_predictor, text_predictor" in r.stdout
    cfg, params = load_converted(dst)
    assert cfg.sparse.enabled and cfg.sparse.sparse_layer == 2 and cfg.sparse.d_model == 48
    assert cfg.llm.num_layers == 5 and cfg.llm.num_kv_heads == 2 and cfg.num_image_tokens == 64
    for name in ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"):
        assert (dst / name).exists(), name
    # The text-only dense case: no image preprocessing involved, logits recorded by the
    # official code at the last prompt position.
    cases = json.loads((FIXTURES / "expected.json").read_text())["cases"]
    case = next(c for c in cases if c["mode"] == "dense" and -200 not in c["prompt_ids"])
    batch = prepare_batch([case["prompt_ids"]], cfg.num_image_tokens)
    logits = forward_dense(params, cfg, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths))
    got = np.asarray(logits)[0, batch.lengths[0] - 1]
    np.testing.assert_allclose(got, np.array(case["first_step_logits"], np.float32), atol=1e-4, rtol=0)


@needs_fixture
def test_cli_official_fixture_needs_vision_tower(tmp_path):
    """Its tower is tiny but config.json names the 336 px hub tower: say so, write nothing."""
    dst = tmp_path / "tiny"
    r = run_cli("--src", OFFICIAL, "--dst", dst)
    assert_clean_failure(r, dst, "--vision-tower", "openai/clip-vit-large-patch14-336")
    assert len(r.stderr.strip().splitlines()) == 1


# -- the CLI on bad input ------------------------------------------------------------------

def test_cli_missing_src(tmp_path):
    dst = tmp_path / "out"
    r = run_cli("--src", tmp_path / "nope", "--dst", dst)
    assert_clean_failure(r, dst, "not found", "nope")


def test_cli_src_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    dst = tmp_path / "out"
    assert_clean_failure(run_cli("--src", tmp_path / "empty", "--dst", dst), dst, "config.json")


def test_cli_missing_tensor(tmp_path):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    src = hf_copy(tmp_path, lambda t: t.pop(name))
    dst = tmp_path / "out"
    assert_clean_failure(run_cli("--src", src, "--dst", dst), dst, "1 missing",
                         "model.layers.1.mlp.up_proj.weight")


def test_cli_misshaped_tensor(tmp_path):
    name = "multi_modal_projector.linear_1.weight"

    def edit(t):
        t[name] = t[name][:, :-1]
    src = hf_copy(tmp_path, edit)
    dst = tmp_path / "out"
    assert_clean_failure(run_cli("--src", src, "--dst", dst), dst, "mis-shaped",
                         "multi_modal_projector.linear_1.weight (= model.mm_projector.0.weight): "
                         "(64, 31) != expected (64, 32)")


def test_cli_unexpected_tensor(tmp_path):
    def edit(t):
        t["language_model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    src = hf_copy(tmp_path, edit)
    dst = tmp_path / "out"
    assert_clean_failure(run_cli("--src", src, "--dst", dst), dst, "unexpected",
                         "model.layers.0.self_attn.q_proj.bias")


def test_cli_no_vision_tower_anywhere(tmp_path):
    src, _ = tiny.write_layout(tmp_path, "orig-no-tower")
    dst = tmp_path / "out"
    r = run_cli("--src", src, "--dst", dst)
    assert_clean_failure(r, dst, "no vision tower", "--vision-tower")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_bad_vision_tower_dir(tmp_path):
    src, _ = tiny.write_layout(tmp_path, "orig-no-tower")
    dst = tmp_path / "out"
    assert_clean_failure(run_cli("--src", src, "--dst", dst, "--vision-tower", tmp_path / "nope"),
                         dst, "--vision-tower")


def test_cli_truncated_weights(tmp_path):
    src = hf_copy(tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out"
    assert_clean_failure(run_cli("--src", src, "--dst", dst), dst, "truncated")


def test_cli_shard_index_names_missing_file(tmp_path):
    src, _ = tiny.write_layout(tmp_path, "orig-sharded-bin")
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    dst = tmp_path / "out"
    assert_clean_failure(run_cli("--src", src, "--dst", dst, "--vision-tower", tmp_path / "clip"),
                         dst, "missing", "pytorch_model-00002-of-00002.bin")


# -- the readers -----------------------------------------------------------------------

def _reference(t: "torch.Tensor") -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@pytest.mark.parametrize("legacy", [False, True])
def test_bin_reader_matches_torch_load(tmp_path, legacy):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g)
    sd = {"half": a.half(), "bf16": a.bfloat16(), "transposed": a.t(), "slice": a[2:4, 1:4],
          "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1), "scalar": torch.tensor(2.5),
          "ints": torch.arange(7), "shares_storage_with_half": a.half()[1]}
    f = tmp_path / "pytorch_model.bin"
    torch.save(sd, f, _use_new_zipfile_serialization=not legacy)
    assert (checkpoint_io._torch_zip_refs(f) is None) == legacy  # legacy files use torch.load
    names = checkpoint_io.tensor_names([f])
    got = dict(checkpoint_io.iter_tensors(f, native=True))
    for k, t in sd.items():
        assert names[k][0] == tuple(t.shape)
        assert got[k].shape == tuple(t.shape)
        np.testing.assert_array_equal(got[k].astype(np.float64), _reference(t).astype(np.float64))
    assert str(got["bf16"].dtype) == "bfloat16" and got["half"].dtype == np.float16
    f32 = dict(checkpoint_io.iter_tensors(f, names={"half"}))
    assert list(f32) == ["half"] and f32["half"].dtype == np.float32


def test_safetensors_reader_matches(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(3, 4, generator=g).half(), "b": torch.randn(5, generator=g).bfloat16(),
          "c": torch.randn(2, 2, 2, generator=g)}
    f = tmp_path / "model.safetensors"
    save_file(sd, str(f))
    got = dict(checkpoint_io.iter_tensors(f, native=True))
    for k, t in sd.items():
        np.testing.assert_array_equal(got[k].astype(np.float64), _reference(t).astype(np.float64))


def test_weight_files_skips_non_model_files(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    torch.save({"args": 1}, tmp_path / "training_args.bin")
    torch.save({"y": torch.zeros(1)}, tmp_path / "mm_projector.bin")
    assert checkpoint_io.weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    with pytest.raises(checkpoint_io.CheckpointError, match="no weights"):
        checkpoint_io.weight_files(tmp_path / "nothing-here")


def test_known_tower_is_recognised_from_its_shapes():
    """A checkpoint holding CLIP ViT-L/14-336 and naming it needs no --vision-tower."""
    from dynllava_jax.config import VisionConfig
    from dynllava_jax.convert import KNOWN_TOWERS, vision_from_shapes

    D, F = 1024, 4096
    shapes = {"embeddings.patch_embedding.weight": (D, 3, 14, 14),
              "embeddings.position_embedding.weight": (577, D)}
    for i in range(24):
        shapes[f"encoder.layers.{i}.mlp.fc1.weight"] = (F, D)
        shapes[f"encoder.layers.{i}.mlp.fc2.weight"] = (D, F)
    known = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]
    assert vision_from_shapes(shapes, "", -2, known) == VisionConfig()
    prefixed = {"vision_model." + k: v for k, v in shapes.items()}
    assert vision_from_shapes(prefixed, "vision_model.", -2, known).num_layers == 24
