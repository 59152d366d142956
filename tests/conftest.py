"""Shared pytest fixtures."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Make the package importable when pytest runs from a plain checkout (no install).
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

# The CLIs under test keep compiled programs in one cache for this test session (not the
# user's ~/.cache): repeated CLI runs of the same shapes then load instead of compiling.
os.environ.setdefault("DYNLLAVA_JAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="dynllava-jax-cc-"))

# The shared fixtures live beside the repository: /work/shared when the repo is /work/main
# (DYNLLAVA_SHARED names another shared/ folder: scripts/gpu_check.sh carries a copy).
FIXTURES = (Path(os.environ.get("DYNLLAVA_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
            / "fixtures" / "official-tiny-public")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The official tiny public fixture directory (skips the test if it is absent)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"fixture directory {FIXTURES} not found")
    return FIXTURES


@pytest.fixture(scope="session")
def synthetic_llava_data(tmp_path_factory):
    """A tiny LLaVA-format dataset (32 good records, text-only ones included, 112 px images).

    A ``dynllava_jax.data.synthetic.SyntheticDataset``: ``json_path``, ``image_folder``, ...
    """
    from dynllava_jax.data.synthetic import write_synthetic_dataset
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic_llava"), 32, seed=0,
                                   image_size=112, with_text_only=True, with_bad=False)


class SimulatedDevices:
    """Runs code on n simulated CPU devices. XLA_FLAGS=--xla_force_host_platform_device_count
    must be set before jax is imported, and this pytest process has imported it: so in a
    subprocess. `env` is that subprocess's environment (for a CLI under test); `run(script)`
    runs Python source from the repository root and returns what it prints as
    ``RESULT <json>``."""

    def __init__(self, n: int):
        self.n = n
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = str(_REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.env = env

    def run(self, script: str, timeout: int = 600, xla_flags: str = "") -> dict:
        """xla_flags: more XLA flags, e.g. ``--xla_backend_optimization_level=0`` (a quarter
        less compile time, for tests whose programs run for milliseconds)."""
        env = dict(self.env, XLA_FLAGS=f"{self.env['XLA_FLAGS']} {xla_flags}".strip())
        proc = subprocess.run([sys.executable, "-c", script], cwd=_REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-4000:]
        return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="session")
def eight_cpu_devices() -> SimulatedDevices:
    return SimulatedDevices(8)


@pytest.fixture(scope="session")
def simulated_devices():
    """`SimulatedDevices` itself: `simulated_devices(2).env` for processes of 2 devices each."""
    return SimulatedDevices
