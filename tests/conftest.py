"""Shared pytest fixtures."""

import os
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

# The shared fixtures live beside the repository: /work/shared when the repo is /work/main.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-tiny-public"


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
