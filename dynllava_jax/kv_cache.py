"""Fixed-capacity KV caches with a length per sequence (SPEC §3.2, DESIGN).

Two groups of caches: the dense layers (< sparse layer) append every token; the sparse
layers (>= sparse layer) hold only what was kept. Each layer has its own buffers (a list
of `{"k", "v"}` of [B, K, S, D]), so a decoding step writes one slot per layer in place
and never slices a stacked buffer. Heads come before slots so that the attention matmuls
read a cache as it lies (slots-major would make XLA transpose, i.e. copy, the whole cache
every step).

Visibility is a pure per-row length. A decoding token is always written at its row's own
length: a kept token then advances the length, a dropped one (or one that loses to the
cache's lowest-scoring token when a budgeted cache is full) does not, attends to itself
for its own step, and is overwritten by the next token. A row therefore sees slots
`[0, visible_len)`, which attention reads as `key_value_seq_lengths`. The sparse caches
need one slot beyond a row's limit only where the predictor can drop a token.

Letters: L layers, B batch, S slots, K kv heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes of the decode caches: what is allocated and what it costs, in one place."""

    batch: int
    dense_layers: int
    dense_slots: int
    sparse_layers: int
    sparse_slots: int
    kv_heads: int
    head_dim: int
    dtype: str

    def _bytes(self, layers: int, slots: int) -> int:
        item = jnp.dtype(self.dtype).itemsize
        return 2 * layers * self.batch * slots * self.kv_heads * self.head_dim * item

    @property
    def bytes(self) -> int:
        return (self._bytes(self.dense_layers, self.dense_slots)
                + self._bytes(self.sparse_layers, self.sparse_slots))

    def slot_bytes(self) -> int:
        """Bytes of one slot (K and V) of one layer for the whole batch."""
        return self._bytes(1, 1)

    def init(self) -> tuple[list, list]:
        """Zeroed (dense caches, sparse caches), one `{"k", "v"}` per layer."""
        def group(layers, slots):
            shape = (self.batch, self.kv_heads, slots, self.head_dim)
            return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                    for _ in range(layers)]
        return group(self.dense_layers, self.dense_slots), group(self.sparse_layers, self.sparse_slots)


def cache_bytes(n_layers: int, batch: int, slots: int, cfg: ModelConfig, dtype) -> int:
    return 2 * n_layers * batch * slots * cfg.llm.num_kv_heads * cfg.llm.head_dim * jnp.dtype(dtype).itemsize


def sparse_capacity(prompt_after_pruning: int, max_new_tokens: int, budget: float) -> int:
    """Slots for kept tokens: prompt after pruning + ceil(max_new_tokens x budget).

    At most max_new_tokens - 1 generated tokens are ever fed back, so budget 1.0 never
    fills the cache (exact semantics)."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"text KV budget must be in [0, 1], got {budget}")
    return prompt_after_pruning + math.ceil(max_new_tokens * budget)


def write(cache_BKSD, new_BTKD, slots_BT=None):
    """cache[b, :, slots[b, t]] = new[b, t]; out-of-range slots are skipped. slots None:
    the first T slots of every row (a prompt pass), one `dynamic_update_slice`.

    A decoding step (T == 1) writes each row with its own `dynamic_update_slice`: XLA
    updates those in place, touching one slot, where a batched scatter is a fusion over
    the whole cache (and costed as reading and writing all of it)."""
    new_BKTD = jnp.swapaxes(new_BTKD, 1, 2).astype(cache_BKSD.dtype)
    if slots_BT is None:
        return jax.lax.dynamic_update_slice(cache_BKSD, new_BKTD, (0, 0, 0, 0))
    b, t = slots_BT.shape
    if t == 1:
        # Decoding slots are always in range (the layout leaves room for every write).
        for i in range(b):
            cache_BKSD = jax.lax.dynamic_update_slice(cache_BKSD, new_BKTD[i:i + 1],
                                                      (i, 0, slots_BT[i, 0], 0))
        return cache_BKSD
    rows = jnp.arange(b)[:, None]
    return cache_BKSD.at[rows, :, slots_BT].set(new_BTKD.astype(cache_BKSD.dtype), mode="drop")


def sparse_append(length_B, score_BS, keep_B, score_B, limit_B):
    """Where a decoding token goes in the sparse caches, and the new bookkeeping.

    keep_B: the predictor keeps the token; score_B: its keep score (log-prob of keep).
    score_BS: scores of the slots (+inf for prompt tokens, which are never evicted).
    limit_B: slots a sequence may fill (its own prompt plus the generated-token budget),
    so its output never depends on the rest of the batch.
    Returns (write_slot_B, new_length_B, new_score_BS, evicted_B, visible_len_B), where
    evicted_B says the budget cost a kept token (what a user calls eviction): the cache was
    full, so the token either replaced a lower-scoring one or was itself left out.
    A kept token goes to slot `length` while there is room; in a full cache it replaces
    the lowest-scoring generated token if it scores higher; otherwise it is written at
    slot `length` without advancing it (seen for this step only, then overwritten).
    The token sees slots [0, visible_len): the filled ones and its own.
    """
    room = length_B < limit_B
    in_use = jnp.arange(score_BS.shape[1])[None, :] < length_B[:, None]
    low = jnp.argmin(jnp.where(in_use, score_BS, jnp.inf), axis=-1).astype(length_B.dtype)
    low_score = jnp.take_along_axis(score_BS, low[:, None], axis=-1)[:, 0]
    replace = keep_B & ~room & (score_B > low_score)
    slot = jnp.where(replace, low, length_B)
    stored = (keep_B & room) | replace
    new_len = length_B + (keep_B & room).astype(length_B.dtype)
    b = jnp.arange(score_BS.shape[0])
    new_score = score_BS.at[b, slot].set(jnp.where(stored, score_B, score_BS[b, slot]), mode="drop")
    visible_len = jnp.where(replace, length_B, length_B + 1)
    return slot, new_len, new_score, keep_B & ~room, visible_len
