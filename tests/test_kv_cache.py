"""The pure rules of pruning and cache appends against loop-based references."""

import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import kv_cache
from dynllava_jax.sparsity import compaction_indices, gather_tokens, topk_keep_mask


@pytest.mark.parametrize("k", [0, 1, 5, 12, 16])
def test_topk_keep_mask(k):
    rng = np.random.default_rng(k)
    scores = rng.normal(size=(3, 16)).astype(np.float32)
    got = np.asarray(topk_keep_mask(jnp.asarray(scores), k))
    for b in range(3):
        ref = sorted(range(16), key=lambda i: -scores[b, i])[:k]
        assert sorted(np.nonzero(got[b])[0].tolist()) == sorted(ref)


def test_compaction_keeps_order_and_masks_rest():
    rng = np.random.default_rng(0)
    keep = rng.random((4, 10)) < 0.5
    x = rng.normal(size=(4, 10, 3)).astype(np.float32)
    idx, valid = compaction_indices(jnp.asarray(keep), 7)
    xc = np.asarray(gather_tokens(jnp.asarray(x), idx))
    for b in range(4):
        ref = [x[b, i] for i in range(10) if keep[b, i]][:7]
        n = len(ref)
        assert np.asarray(valid[b]).tolist() == [True] * n + [False] * (7 - n)
        np.testing.assert_array_equal(xc[b, :n], np.asarray(ref).reshape(n, 3))


def test_sparse_append_matches_list_reference():
    """Decode 30 steps into per-sequence caches, as growing Python lists, with a budget."""
    rng = np.random.default_rng(1)
    b, prompt, budget_slots = 3, np.array([4, 6, 5]), 4
    capacity = 6 + budget_slots  # the longest prompt + budget
    length = jnp.asarray(prompt)
    limit = jnp.asarray(prompt + budget_slots)
    score = jnp.where(jnp.arange(capacity + 1)[None] < length[:, None], jnp.inf, -jnp.inf)
    lists = [[] for _ in range(b)]  # generated entries: (step, score)
    slots = np.full((b, capacity + 1), -1)  # which step's K/V each slot holds
    for step in range(30):
        keep = rng.random(b) < 0.6
        s = rng.normal(size=b).astype(np.float32)
        old_len = np.asarray(length)
        slot, length, score, evicted, visible = kv_cache.sparse_append(
            length, score, jnp.asarray(keep), jnp.asarray(s), limit)
        for i in range(b):
            # Reference: kept tokens append while there is room; when full, a kept token
            # replaces the lowest-scoring generated one if it scores higher.
            # Evicted: a kept token met a full cache (it replaced one, ev, or was left out).
            ev = full = False
            if keep[i]:
                if len(lists[i]) < budget_slots:
                    lists[i].append((step, s[i]))
                else:
                    full = True
                    j = min(range(len(lists[i])), key=lambda j: lists[i][j][1])
                    if s[i] > lists[i][j][1]:
                        lists[i][j] = (step, s[i])
                        ev = True
            assert bool(evicted[i]) == full
            assert int(length[i]) == prompt[i] + len(lists[i])
            # Every token is written at its row's length unless it replaces a slot, and
            # it sees exactly the filled slots plus its own: a pure per-row length.
            assert int(slot[i]) == (int(slot[i]) if ev else old_len[i]) <= int(limit[i])
            assert int(visible[i]) == (old_len[i] if ev else old_len[i] + 1)
            slots[i, int(slot[i])] = step
            seen = slots[i, prompt[i]: int(visible[i])].tolist()
            assert step in seen and sorted(x for x in seen if x != step) == sorted(
                st for st, _ in lists[i] if st != step)
        for i in range(b):
            in_cache = sorted(slots[i, prompt[i]: int(length[i])].tolist())
            assert in_cache == sorted(st for st, _ in lists[i])
    assert int(jnp.max(length - limit)) <= 0


def test_sparse_capacity():
    assert kv_cache.sparse_capacity(100, 20, 1.0) == 120
    assert kv_cache.sparse_capacity(100, 20, 0.25) == 105
    with pytest.raises(ValueError):
        kv_cache.sparse_capacity(100, 20, 1.5)
