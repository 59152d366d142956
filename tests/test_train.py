"""Training runs on the tiny model: it learns, kill-and-resume is bit-exact, the export
loads, the optimiser allocates nothing for frozen params, configs and CLI behave."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from dynllava_jax import optim
from dynllava_jax import trainer as T
from dynllava_jax.checkpoint import load_converted, save_converted

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "tiny-dynamic-llava"


def tiny_config(**overrides):
    c = configs.load(REPO / "configs" / "tiny_run.py")
    return configs.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny run of configs/tiny_run.py, uninterrupted (40 steps, ~1 min on 2 cores)."""
    wd = tmp_path_factory.mktemp("straight")
    tr = T.Trainer(tiny_config(), wd, progress=False)
    tr.run()
    tr.close()
    return wd, T.read_metrics(wd)


def test_tiny_run_learns(straight):
    _, rows = straight
    assert [r["step"] for r in rows] == list(range(1, 41))
    ce = [r["ce"] for r in rows]
    assert np.mean(ce[-5:]) < 0.5 * np.mean(ce[:5]), ce
    kept = [r["img_kept"] for r in rows]
    assert abs(np.mean(kept[-10:]) - 0.2) < 0.05, kept
    txt = [r["txt_kept"] for r in rows]
    assert abs(np.mean(txt[-10:]) - 0.5) < 0.1, txt
    last = rows[-1]
    assert last["tau"] == pytest.approx(0.1 ** (39 / 40), rel=1e-5)  # tau at step 39 of 40
    for key in ("loss", "ce", "img_ratio_loss", "txt_ratio_loss", "img_kept", "txt_kept", "tau",
                "lr", "predictor_lr", "grad_norm", "tokens_per_s", "step_time"):
        assert key in last and math.isfinite(last[key])


def test_workdir_layout_and_export(straight):
    wd, _ = straight
    assert (wd / "metrics.jsonl").exists()
    assert list((wd / "tb").glob("events.out.tfevents.*"))
    assert (wd / "checkpoints" / "40").is_dir()
    cfg, params = load_converted(wd / "export")
    cfg0, params0 = load_converted(ASSETS)
    assert cfg.sparse.output_text_len_for_training == 16 and cfg.sparse.enabled
    assert cfg.llm == cfg0.llm and cfg.vision == cfg0.vision
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params0)
    for f in ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"):
        assert (wd / "export" / f).exists()
    # trained groups moved, the frozen vision tower did not
    np.testing.assert_array_equal(params["vision"]["layers"]["fc1"]["kernel"],
                                  params0["vision"]["layers"]["fc1"]["kernel"])
    assert not np.array_equal(params["llm"]["lm_head"]["kernel"], params0["llm"]["lm_head"]["kernel"])
    assert not np.array_equal(params["image_predictor"]["out_3"]["kernel"],
                              params0["image_predictor"]["out_3"]["kernel"])


def test_kill_and_resume_is_bit_exact(straight, tmp_path):
    _, want = straight
    cfg = tiny_config(**{"checkpoint.every": 2})
    tr = T.Trainer(cfg, tmp_path, progress=False)
    tr.run(stop_at=5)  # checkpoints at 2 and 4; step 5 is lost with the "kill"
    tr.close()
    del tr
    assert T.read_metrics(tmp_path)[-1]["step"] == 5
    tr = T.Trainer(tiny_config(**{"checkpoint.every": 2}), tmp_path, progress=False)
    assert tr.start_step == 4
    tr.run(stop_at=8)
    tr.close()
    got = T.read_metrics(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 9))
    for g, w in zip(got, want[:8]):
        for k in ("loss", "ce", "img_ratio_loss", "txt_ratio_loss", "img_kept", "txt_kept",
                  "grad_norm"):
            assert g[k] == w[k], (g["step"], k, g[k], w[k])  # bit-exact


def test_optimizer_has_no_state_for_frozen_params():
    cfg, params = load_converted(ASSETS)
    oc = tiny_config().optim
    tx, _ = optim.make_optimizer(oc, 10)
    groups = optim.trainable_groups(params, train_projector=False)
    assert set(groups) == {"llm", "image_predictor", "text_predictor"}
    tr, fr = optim.split_params(params, groups)
    opt = jax.eval_shape(tx.init, tr)
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(tr))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(opt) if x.ndim > 0)
    assert n_opt == 2 * n_train  # Adam mu + nu for trainable params only
    assert set(fr) == {"vision", "projector"}


def test_schedule_is_warmup_then_cosine():
    sched = optim.make_schedule(2e-4, 100, 0.03, "cosine")
    warm = math.ceil(0.03 * 100)
    assert float(sched(0)) == 0.0
    assert float(sched(warm)) == pytest.approx(2e-4)
    for s in (1, 2, 10, 50, 99):  # HF get_cosine_schedule_with_warmup
        if s < warm:
            want = 2e-4 * s / warm
        else:
            want = 2e-4 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (100 - warm)))
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=2e-4 * 1e-5)


def test_init_from_plain_llava_adds_predictors(tmp_path):
    cfg, params = load_converted(ASSETS)
    plain = {k: v for k, v in params.items() if not k.endswith("_predictor")}
    src = tmp_path / "plain"
    pre = json.loads((ASSETS / "preprocessor_config.json").read_text())
    save_converted(src, plain, cfg.replace_sparse(enabled=False), pre, ASSETS)
    tr = T.Trainer(tiny_config(**{"train.total_steps": 2}), tmp_path / "wd",
                   init_from=str(src), progress=False)
    assert tr.cfg.sparse.enabled
    assert "image_predictor" in tr.state.params and "text_predictor" in tr.state.params
    tr.close()


def test_reinit_draws_named_groups_anew_with_llama_init(tmp_path):
    """`reinit=llm` + `init_std`: the LLM is new, N(0, init_std) with unit norm scales,
    and every other group is init_from's, unchanged."""
    _, params = load_converted(ASSETS)
    tr = T.Trainer(tiny_config(**{"train.total_steps": 2, "reinit": "llm", "init_std": 0.02}),
                   tmp_path / "wd", init_from=str(ASSETS), progress=False)
    got = jax.device_get(optim.merge_params(tr.state.params, tr.state.frozen))
    tr.close()
    for k in ("vision", "projector", "image_predictor", "text_predictor"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, got[k], params[k])
    emb = np.asarray(got["llm"]["embed_tokens"]["embedding"])
    assert not np.allclose(emb, params["llm"]["embed_tokens"]["embedding"])
    assert abs(emb.std() - 0.02) < 0.002 and abs(emb.mean()) < 0.002
    assert np.asarray(got["llm"]["layers"]["q_proj"]["kernel"]).std() == pytest.approx(0.02, rel=0.1)
    np.testing.assert_array_equal(got["llm"]["norm"]["scale"], 1.0)
    with pytest.raises(ValueError, match="reinit names"):
        T.Trainer(tiny_config(**{"train.total_steps": 2, "reinit": "llm,tower"}),
                  tmp_path / "wd2", init_from=str(ASSETS), progress=False)


def test_config_overrides():
    c = tiny_config(**{"optim.lr": "3e-4", "train.total_steps": "7", "data.num_epochs": "2",
                       "init_from": "random", "checkpoint.async_save": "false"})
    assert c.optim.lr == 3e-4 and c.train.total_steps == 7 and c.data.num_epochs == 2
    assert c.init_from == "random" and c.checkpoint.async_save is False
    with pytest.raises(ValueError):
        tiny_config(**{"optim.nope": 1})
    for name in ("dynamic_llava_7b", "dynamic_llava_13b"):
        big = configs.load(REPO / "configs" / f"{name}.py")
        assert big.train.global_batch_size == 64 and big.data.model_max_length == 2048
        assert big.optim.lr == 5e-6 and big.optim.predictor_lr == 2e-4
        assert big.dtype == "bfloat16" and big.sparse.mask_loss_weight == 100.0


def test_train_cli_reports_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_run.py"),
         "--workdir", str(tmp_path), "--init-from", str(tmp_path / "missing"), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "missing does not exist" in proc.stderr  # not "not a converted checkpoint"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_run.py"),
         "--config.optim.nope=1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "unknown config key" in proc.stderr


def test_two_hosts_train_and_export(tmp_path):
    """Two train.py processes (jax.distributed over loopback, 2 CPU devices each): every host
    feeds its share of the batch; at the end all gather and process 0 writes the export,
    identical to what `--export-only` on one host makes of the same checkpoint."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    work = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny_run.py"),
           "--workdir", str(work), "--no-progress", "--config.train.total_steps=3",
           f"--config.distributed.coordinator=127.0.0.1:{port}",
           "--config.distributed.num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--config.distributed.process_id={i}"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    again = tmp_path / "again"
    again.mkdir()
    (again / "checkpoints").symlink_to(work / "checkpoints")
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--config",
                        str(REPO / "configs/tiny_run.py"), "--workdir", str(again), "--export-only",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    _, a = load_converted(work / "export")
    _, b = load_converted(again / "export")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_vision_lr_scale_multiplies_only_the_towers_updates():
    """`optim.vision_lr_scale` = 4: the vision tower's updates are 4x those of scale 1 (its
    learning rate, weight decay included), every other group's are unchanged; at 1 the
    optimiser state keeps its structure (existing runs resume)."""
    oc = tiny_config().optim
    oc.weight_decay = 0.1
    params = {"vision": {"w": {"kernel": jnp.ones((3, 2))}}, "llm": {"w": {"kernel": jnp.ones((2, 2))}}}
    grads = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
    updates = {}
    for scale in (1.0, 4.0):
        oc.vision_lr_scale = scale
        tx, _ = optim.make_optimizer(oc, 10)
        state = tx.init(params)
        _, state = tx.update(grads, state, params)  # step 0 has lr 0 (warm-up)
        updates[scale], _ = tx.update(grads, state, params)
        if scale == 1.0:
            base_def = jax.tree_util.tree_structure(state)
    v1, v4 = updates[1.0]["vision"]["w"]["kernel"], updates[4.0]["vision"]["w"]["kernel"]
    assert float(jnp.abs(v1).max()) > 0
    np.testing.assert_allclose(np.asarray(v4), 4 * np.asarray(v1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates[4.0]["llm"]["w"]["kernel"]),
                                  np.asarray(updates[1.0]["llm"]["w"]["kernel"]))
    del oc.vision_lr_scale  # a config without the field (an older run.json): scale 1
    tx, _ = optim.make_optimizer(oc, 10)
    assert jax.tree_util.tree_structure(tx.init(params)) == base_def
