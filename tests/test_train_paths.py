"""Cloud-storage workdirs: a `gs://` URL stays a URL through training, checkpoints,
metrics, TensorBoard, export and reloading (never a local folder `./gs:/...`).

No network here: `fake_bucket` maps `gs://` onto a local folder in the two places that
reach storage, epath's backend (`etils.epath.testing.mock_epath`) and the TensorStore
kvstore Orbax builds for a gs:// path, and runs from a different current directory so
that a URL treated as a relative folder would land elsewhere and fail the test."""

import os
from pathlib import Path
from unittest import mock

import pytest

import configs
from dynllava_jax import paths
from dynllava_jax import trainer as T
from dynllava_jax.checkpoint import load_converted

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    from etils.epath import testing as et
    import orbax.checkpoint._src.serialization.tensorstore_utils as tsu
    root, cwd = tmp_path / "bucket-store", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DYNLLAVA_CACHE", str(tmp_path / "cache"))

    def local(p):
        s = os.fspath(p)
        return f"{root}/{s[5:]}" if s.startswith("gs://") else s

    def url(s):
        s = os.fspath(s)
        return "gs://" + s[len(str(root)) + 1:] if s.startswith(f"{root}/") else s

    def one(fn, p, *a, **k):
        return fn(local(p), *a, **k)

    def two(fn, p, d, *a, **k):
        return fn(local(p), local(d), *a, **k)

    def glob(fn, p):
        return [url(x) for x in fn(local(p))]

    def walk(fn, p, **k):
        for r, d, f in fn(local(p), **k):
            yield url(r), d, f

    with et.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                       remove=one, rmtree=one, stat=one, rename=two, replace=two, copy=two,
                       glob=glob, walk=walk), \
            mock.patch.object(tsu.gcs_utils, "get_kvstore_for_gcs",
                              lambda p: {"driver": "file", "path": local(p)}), \
            mock.patch.object(tsu.gcs_utils, "is_hierarchical_namespace_enabled",
                              lambda p: False), \
            mock.patch.object(paths, "client_missing", lambda p: None):
        yield root, cwd


def test_urls_stay_urls():
    p = paths.as_path("gs://bucket/run")
    assert os.fspath(p) == "gs://bucket/run" and os.fspath(p / "x") == "gs://bucket/run/x"
    assert os.fspath(paths.as_path("rel/x")) == os.path.abspath("rel/x")
    with pytest.raises(ValueError, match="unsupported URL scheme ftp://"):
        paths.as_path("ftp://host/x")


def test_bucket_without_its_client_is_one_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "client_missing", lambda p: "gcsfs")
    with pytest.raises(ValueError, match=r"--workdir gs://b/run: gs:// paths need: pip install gcsfs"):
        T.Trainer(configs.load(REPO / "configs" / "tiny_run.py"), "gs://b/run", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bucket_workdir_end_to_end(fake_bucket):
    root, cwd = fake_bucket
    c = configs.apply_overrides(configs.load(REPO / "configs" / "tiny_run.py"),
                                ["train.total_steps=2", "checkpoint.every=1"])
    tr = T.Trainer(c, "gs://bucket/run", progress=False)
    assert os.fspath(tr.workdir) == "gs://bucket/run"
    tr.run()
    tr.close()
    run = root / "bucket" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "export" / "model_config.json").is_file()
    assert [r["step"] for r in T.read_metrics("gs://bucket/run")] == [1, 2]
    assert list(cwd.iterdir()) == []  # nothing became a local "gs:" folder
    tr = T.Trainer(c, "gs://bucket/run", progress=False)  # resumes from the bucket
    assert tr.start_step == 2
    tr.close()
    cfg, params = load_converted("gs://bucket/run/export")
    assert cfg.sparse.enabled and "image_predictor" in params
    assert list(cwd.iterdir()) == []


def test_converted_and_exported_dirs_on_a_bucket(fake_bucket, tmp_path):
    """save_converted / load_converted (convert_weights.py --dst, train's export) and the
    PyTorch-layout export (convert_weights.py --export --dst) with gs:// destinations."""
    import json
    import numpy as np
    import jax
    from dynllava_jax.checkpoint import save_converted
    from dynllava_jax.export import export
    root, cwd = fake_bucket
    assets = REPO / "assets" / "tiny-dynamic-llava"
    cfg, params = load_converted(assets)
    pre = json.loads((assets / "preprocessor_config.json").read_text())
    unused = {"extra": np.arange(4, dtype=np.float32)}
    save_converted("gs://bucket/conv", jax.device_get(params), cfg, pre, assets, unused=unused)
    got_cfg, got = load_converted("gs://bucket/conv")
    assert got_cfg == cfg
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    names = sorted(p.name for p in (root / "bucket" / "conv").iterdir())
    assert {"params", "model_config.json", "tokenizer.model", "unused_tensors.safetensors"} <= set(names)
    export(assets, "gs://bucket/pt", "original", progress=False)
    assert list((root / "bucket" / "pt").glob("*.safetensors"))
    assert not [p for p in (root / "bucket").iterdir() if ".tmp-" in p.name]
    assert list(cwd.iterdir()) == []
