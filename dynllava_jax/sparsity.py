"""Pure functions for the sparsification rules (SPEC §2-§4).

Each is small, shape-static and tested against a loop-based reference.
Einsum letters: B batch, T tokens, S keys, N image tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_keep_mask(scores_BN: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the `k` highest scores per row (ties: lower index first)."""
    n = scores_BN.shape[-1]
    if k >= n:
        return jnp.ones(scores_BN.shape, bool)
    _, idx = jax.lax.top_k(scores_BN, k)
    mask = jnp.zeros(scores_BN.shape, bool)
    return jax.vmap(lambda m, i: m.at[i].set(True))(mask, idx)


def compaction_indices(keep_BT: jax.Array, out_len: int) -> tuple[jax.Array, jax.Array]:
    """Indices that gather the kept tokens of each row, in order, into `out_len` slots.

    Returns (index_BT', valid_BT'): slot j of row b holds token index_BT'[b, j] and is
    a real token iff valid_BT'[b, j]. Rows keeping more than `out_len` tokens are cut
    (callers size `out_len` so that this never happens).
    """
    t = keep_BT.shape[-1]
    # Stable sort: kept tokens first, each group in its original order.
    order = jnp.argsort(~keep_BT, axis=-1, stable=True)
    if out_len <= t:
        order = order[:, :out_len]
    else:
        order = jnp.pad(order, ((0, 0), (0, out_len - t)))
    count = keep_BT.sum(-1)
    valid = jnp.arange(out_len)[None, :] < count[:, None]
    return jnp.where(valid, order, 0), valid


def gather_tokens(x_BT, index_BT):
    """x[b, index[b, j]] for arrays shaped [B, T, ...]."""
    return jax.vmap(lambda xb, ib: xb[ib])(x_BT, index_BT)


def masked_softmax(scores, mask, policy_S=None, eps: float = 1e-6):
    """Softmax over the last axis with a boolean mask and an optional key policy.

    scores: [..., T, S] float32; mask: broadcastable to scores; policy_S: [B, S] with
    keys on the last axis (B leading, heads in between are broadcast). With a policy
    this is the "MaskedSoftmax" of SPEC §4: a_ij = exp(s_ij - max_j s_ij) * g_ij with
    g_ij = p_j (i != j), g_ii = 1; attn = (a + eps/S) / (sum_j a + eps). The diagonal
    means query i == key i, which needs T == S (training runs without a cache).
    """
    scores = scores.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask, scores, neg)
    if policy_S is None:
        return jax.nn.softmax(scores, axis=-1)
    t, s = scores.shape[-2], scores.shape[-1]
    assert t == s, "MaskedSoftmax needs queries == keys"
    p = policy_S.astype(jnp.float32)
    p = p.reshape(p.shape[:1] + (1,) * (scores.ndim - 2) + p.shape[1:])
    eye = jnp.eye(s, dtype=jnp.float32)
    g = p + (1.0 - p) * eye
    m = jnp.max(scores, axis=-1, keepdims=True)
    a = jnp.exp(scores - m) * g * mask
    return (a + eps / s) / (a.sum(-1, keepdims=True) + eps)


def gumbel_hard_keep(logits, rng, tau):
    """Hard keep decision (index 0 of `gumbel_softmax(log_softmax(logits), tau, hard=True)`)
    with the straight-through gradient of the soft sample. logits: [..., 2]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    g = jax.random.gumbel(rng, logp.shape, jnp.float32)
    soft = jax.nn.softmax((logp + g) / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
    st = hard - jax.lax.stop_gradient(soft) + soft
    return st[..., 0]
