"""scripts/position_probe.py: its probe separates what is separable and not noise, and its
labels follow the questions (the README's position figures come from it)."""

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("position_probe", REPO / "scripts" / "position_probe.py")
P = importlib.util.module_from_spec(spec)
spec.loader.exec_module(P)


def test_probe_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(3, size=600)
    x = rng.normal(size=(600, 32))
    x[:, 5] += 5.0 * y    # the class as a coordinate: the middle one lies between the others
    assert P.probe_accuracy(x, y) > 0.95
    assert P.probe_accuracy(x, rng.permutation(y)) < 0.5  # chance 1/3


def test_hidden_states_of_the_bundled_model():
    h, own, lab = P.hidden_states(REPO / "assets" / "synthvqa-dynamic-llava", scenes=12, seed=5)
    assert h.shape == own.shape == (5, 12, 128)           # embeddings + 4 layers, hidden 128
    assert np.isfinite(h).all() and np.isfinite(own).all()
    lr = np.isin(lab["answer"], ("left", "right"))
    assert lr.any()
    # a left/right answer says how a's column compares with b's
    assert ((lab["col_a"] < lab["col_b"]) == (lab["answer"] == "left"))[lr].all()
    assert (lab["cell_a"] % 3 == lab["col_a"]).all()
