"""Fixed-capacity KV caches with a length per sequence (SPEC §3.2, DESIGN).

Two stacks of caches: the dense layers (< sparse layer) append every token; the sparse
layers (>= sparse layer) hold only what was kept. The sparse caches have one extra
*scratch* slot at the end: a token that is not kept (or that loses to the cache's
lowest-scoring token when a budgeted cache is full) is written there, attends to itself
for its own step, and is overwritten by the next one.

Letters: L layers, B batch, S slots, K kv heads, D head dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .config import ModelConfig


def init_caches(n_layers: int, batch: int, slots: int, cfg: ModelConfig, dtype):
    shape = (n_layers, batch, slots, cfg.llm.num_kv_heads, cfg.llm.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_bytes(n_layers: int, batch: int, slots: int, cfg: ModelConfig, dtype) -> int:
    return 2 * n_layers * batch * slots * cfg.llm.num_kv_heads * cfg.llm.head_dim * jnp.dtype(dtype).itemsize


def sparse_capacity(prompt_after_pruning: int, max_new_tokens: int, budget: float) -> int:
    """Slots for kept tokens: prompt after pruning + ceil(max_new_tokens x budget).

    At most max_new_tokens - 1 generated tokens are ever fed back, so budget 1.0 never
    fills the cache (exact semantics)."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"text KV budget must be in [0, 1], got {budget}")
    return prompt_after_pruning + math.ceil(max_new_tokens * budget)


def visible(slots: int, length_B, write_slot_B):
    """[B, 1, S]: a decoding token sees the first `length` slots and its own slot."""
    s = jnp.arange(slots)[None, :]
    return ((s < length_B[:, None]) | (s == write_slot_B[:, None]))[:, None, :]


def sparse_append(length_B, score_BS, keep_B, score_B, limit_B):
    """Where a decoding token goes in the sparse caches, and the new bookkeeping.

    keep_B: the predictor keeps the token; score_B: its keep score (log-prob of keep).
    score_BS: scores of the slots (+inf for prompt tokens, which are never evicted); its
    last slot is the scratch slot. limit_B: slots a sequence may fill (its own prompt plus
    the generated-token budget), so its output never depends on the rest of the batch.
    Returns (write_slot_B, new_length_B, new_score_BS, evicted_B).
    A kept token goes to slot `length` while there is room; in a full cache it replaces
    the lowest-scoring generated token if it scores higher; otherwise it goes to the
    scratch slot and is gone after this step.
    """
    capacity = score_BS.shape[1] - 1
    room = length_B < limit_B
    in_use = jnp.arange(capacity)[None, :] < length_B[:, None]
    low = jnp.argmin(jnp.where(in_use, score_BS[:, :capacity], jnp.inf), axis=-1)
    low_score = jnp.take_along_axis(score_BS, low[:, None], axis=-1)[:, 0]
    replace = keep_B & ~room & (score_B > low_score)
    slot = jnp.where(keep_B & room, length_B, jnp.where(replace, low, capacity))
    new_len = length_B + (keep_B & room).astype(length_B.dtype)
    b = jnp.arange(score_BS.shape[0])
    new_score = score_BS.at[b, slot].set(jnp.where(slot < capacity, score_B, score_BS[b, slot]))
    return slot, new_len, new_score, replace
