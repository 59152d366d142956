"""Training faults: preemption (SIGTERM) and Ctrl-C stop at a step boundary with a
checkpoint and resume bit-exactly; a second run on a locked workdir is refused; stale
export temporaries are removed; a corrupt newest checkpoint falls back to an intact one;
a torn last line of metrics.jsonl is dropped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import configs
from dynllava_jax import trainer as T

REPO = Path(__file__).resolve().parents[1]
KEYS = ("loss", "ce", "img_ratio_loss", "txt_ratio_loss", "img_kept", "txt_kept", "grad_norm")
BASE = {"train.total_steps": 8, "checkpoint.every": 100, "checkpoint.export": False}


def tiny_config(**overrides):
    c = configs.load(REPO / "configs" / "tiny_run.py")
    return configs.apply_overrides(c, [f"{k}={v}" for k, v in {**BASE, **overrides}.items()])


def assert_same_losses(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in KEYS:
            assert g[k] == w[k], (g["step"], k, g[k], w[k])  # bit-exact


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """8 uninterrupted steps; checkpoints only at the end."""
    wd = tmp_path_factory.mktemp("straight")
    tr = T.Trainer(tiny_config(), wd, progress=False)
    tr.run()
    tr.close()
    return T.read_metrics(wd)


def finish(wd):
    tr = T.Trainer(tiny_config(), wd, progress=False)
    start = tr.start_step
    tr.run()
    tr.close()
    return start


class SignalAt:
    """Wraps a data iterator; sends `sig` to this process when batch `at` is fetched."""

    def __init__(self, it, at, sig):
        self.it, self.at, self.sig, self.n = it, at, sig, 0

    def __getattr__(self, name):
        return getattr(self.it, name)

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), self.sig)
        return next(self.it)


def test_ctrl_c_saves_at_the_step_boundary_and_resumes_bit_exact(straight, tmp_path):
    # The handler in place before (Python's default; SIG_IGN in a pytest-xdist worker).
    before = signal.getsignal(signal.SIGINT)
    tr = T.Trainer(tiny_config(), tmp_path, progress=False)
    tr.iterator = SignalAt(tr.iterator, 3, signal.SIGINT)
    tr.run()
    tr.close()
    assert tr.stopped == "SIGINT" and tr.step == 3
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == 3
    assert not (tmp_path / "export").exists()
    assert signal.getsignal(signal.SIGINT) is before  # restored
    assert finish(tmp_path) == 3
    assert_same_losses(T.read_metrics(tmp_path), straight)


def test_sigterm_cli_stops_cleanly_and_resumes_bit_exact(straight, tmp_path):
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny_run.py"),
           "--workdir", str(tmp_path), "--no-progress"] + [f"--config.{k}={v}" for k, v in BASE.items()]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(T.read_metrics(tmp_path)) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "no training step in 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert len(line) == 1 and "run the same command to resume" in line[0], err[-3000:]
    step = int(line[0].split("after step ")[1].split(":")[0])
    assert 2 <= step < 8
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == step
    assert finish(tmp_path) == step
    assert_same_losses(T.read_metrics(tmp_path), straight)


# -- corrupt checkpoints, torn metrics, stale export temporaries, schedule changes -----------
FOUR = {"train.total_steps": 4, "checkpoint.every": 2}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step workdir with checkpoints 2 and 4 (and its metrics)."""
    wd = tmp_path_factory.mktemp("four")
    tr = T.Trainer(tiny_config(**FOUR), wd, progress=False)
    tr.run()
    tr.close()
    assert [p.name for p in sorted((wd / "checkpoints").iterdir())] == ["2", "4"]
    return wd, T.read_metrics(wd)


def biggest_array_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def corrupt(step_dir, kind):
    import shutil
    if kind == "truncated":
        f = biggest_array_file(step_dir)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "bit_flip":
        f = biggest_array_file(step_dir)
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))
    elif kind == "no_state":
        shutil.rmtree(step_dir / "state")
    elif kind == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif kind == "data_state":
        (step_dir / "data" / "process_0-of-1.json").write_text('{"index": ')
    elif kind == "manifest":
        (step_dir / "_CHECKPOINT_METADATA").write_text("\x00garbage")
    return {"truncated": "cannot be read", "bit_flip": "fingerprint",
            "no_state": "state is missing", "empty": "is missing",
            "data_state": "process_0-of-1.json is not valid JSON",
            "manifest": "_CHECKPOINT_METADATA is not valid JSON"}[kind]


def copy_workdir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", ["truncated", "no_state", "empty", "data_state", "manifest"])
def test_corrupt_newest_checkpoint_falls_back(four_steps, tmp_path, kind, caplog):
    wd = copy_workdir(four_steps[0], tmp_path / "wd")
    why = corrupt(wd / "checkpoints" / "4", kind)
    tr = T.Trainer(tiny_config(**FOUR), wd, progress=False)
    tr.close()
    assert tr.start_step == 2
    warn = [r.getMessage() for r in caplog.records if "checkpoint 4 skipped" in r.getMessage()]
    assert len(warn) == 1 and why in warn[0], (why, warn)
    assert (wd / "checkpoints" / "4.corrupt").exists()


def test_no_intact_checkpoint_is_one_error_naming_the_files(four_steps, tmp_path):
    from dynllava_jax.checkpoint import CheckpointDirError
    wd = copy_workdir(four_steps[0], tmp_path / "wd")
    corrupt(wd / "checkpoints" / "4", "data_state")
    corrupt(wd / "checkpoints" / "2", "no_state")
    with pytest.raises(CheckpointDirError) as e:
        T.Trainer(tiny_config(**FOUR), wd, progress=False)
    msg = str(e.value)
    assert "no intact checkpoint" in msg and "\n" not in msg
    assert "4/data/process_0-of-1.json" in msg and "2/state is missing" in msg
    assert not (wd / ".lock").exists()  # a failed start releases the workdir


def test_bit_flip_falls_back_and_the_rerun_is_bit_exact(four_steps, tmp_path, caplog):
    """Also: a torn last metrics line is dropped, stale export temporaries are removed,
    a second run on the workdir is refused, another total_steps is refused."""
    wd = copy_workdir(four_steps[0], tmp_path / "wd")
    corrupt(wd / "checkpoints" / "4", "bit_flip")
    with (wd / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a power loss mid-write
    (wd / ".export.tmp-dead1234" / "params").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"started with 4 total steps and this run asks for 8"):
        T.Trainer(tiny_config(**{**FOUR, "train.total_steps": 8}), wd, progress=False)
    tr = T.Trainer(tiny_config(**FOUR), wd, progress=False)
    try:
        assert tr.start_step == 2
        assert any("checkpoint 4 skipped" in r.getMessage() and "fingerprint" in r.getMessage()
                   for r in caplog.records)
        assert not (wd / ".export.tmp-dead1234").exists()
        with pytest.raises(ValueError, match=r"is in use by another training run \(pid"):
            T.Trainer(tiny_config(**FOUR), wd, progress=False)
        tr.run()
        assert any("torn last line" in r.getMessage() and "metrics.jsonl" in r.getMessage()
                   for r in caplog.records)
    finally:
        tr.close()
    assert_same_losses(T.read_metrics(wd), four_steps[1])
    assert (wd / "checkpoints" / "4").is_dir() and (wd / "export").is_dir() is False


def test_torn_metrics_line_elsewhere_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        T.read_metrics(tmp_path)


# -- the workdir lock and the export temporaries (no training) ------------------------------
def test_workdir_lock_refuses_a_second_run_and_takes_over_stale_ones(tmp_path, caplog):
    import json
    import socket
    from dynllava_jax.workdir_lock import WorkdirLock, WorkdirLocked
    a = WorkdirLock(tmp_path).acquire()
    with pytest.raises(WorkdirLocked, match=rf"{tmp_path} is in use by another training run "
                                            rf"\(pid {os.getpid()} on host"):
        WorkdirLock(tmp_path).acquire()
    a.release()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    now = time.time()
    for rec, why in (({"host": socket.gethostname(), "pid": int(dead), "heartbeat": now},
                      f"its process {dead} on this host is gone"),
                     ({"host": "elsewhere", "pid": 1, "heartbeat": now - 700}, "no heartbeat for")):
        (tmp_path / ".lock").write_text(json.dumps({"job": "old", **rec}))
        b = WorkdirLock(tmp_path, stale_after_s=600).acquire()
        assert any(why in r.getMessage() for r in caplog.records), why
        assert json.loads((tmp_path / ".lock").read_text())["job"] == b.job
        b.release()
    (tmp_path / ".lock").write_text(json.dumps({"job": "x", "host": "elsewhere", "pid": 1,
                                                "heartbeat": now - 10}))
    with pytest.raises(WorkdirLocked, match="on host elsewhere"):  # alive elsewhere
        WorkdirLock(tmp_path, stale_after_s=600).acquire()


def test_workdir_lock_heartbeat_refreshes(tmp_path):
    import json
    from dynllava_jax.workdir_lock import WorkdirLock
    lk = WorkdirLock(tmp_path, stale_after_s=60, heartbeat_s=0.05).acquire()
    try:
        first = json.loads((tmp_path / ".lock").read_text())["heartbeat"]
        deadline = time.monotonic() + 60
        while json.loads((tmp_path / ".lock").read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "the heartbeat never moved"
            time.sleep(0.05)
    finally:
        lk.release()


def test_stale_export_temporaries_are_cleaned(tmp_path):
    (tmp_path / ".export.tmp-abcd1234" / "params").mkdir(parents=True)
    (tmp_path / "export.old").mkdir()
    (tmp_path / "export.old" / "model_config.json").write_text("{}")
    T.clean_stale_temporaries(tmp_path)  # killed between replace_dir's two renames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "model_config.json").exists()
    (tmp_path / "export.old").mkdir()
    T.clean_stale_temporaries(tmp_path)  # killed after both renames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_one_step_schedule_works():
    from dynllava_jax import optim
    oc = tiny_config().optim
    for kind in ("cosine", "linear", "constant"):
        sched = optim.make_schedule(1e-3, 1, 0.03, kind)
        assert float(sched(0)) == 0.0  # HF: warm-up of ceil(0.03 * 1) = 1 step
    optim.make_optimizer(oc, 1)
