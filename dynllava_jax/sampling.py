"""Next-token selection: greedy, temperature, top-p (nucleus)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def step_keys(keys_B, step):
    """Per-sequence keys of one decoding step: the same for a sequence whatever its batch."""
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)


def row_keys(rng, ids_B):
    """One key per sequence, from a seed key and the sequence's id (e.g. its request index)."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(ids_B, jnp.uint32))


def mask_vocab(logits_BV, vocab: int):
    """-inf for ids >= vocab: llava-hf pads its embedding (32064 rows for 32002 tokens) and
    the padded rows are no token the tokenizer can decode."""
    if not vocab or vocab >= logits_BV.shape[-1]:
        return logits_BV
    ids = jnp.arange(logits_BV.shape[-1])
    return jnp.where(ids < vocab, logits_BV, jnp.asarray(-jnp.inf, logits_BV.dtype))


def sample(logits_BV, keys_B, greedy: bool, temperature, top_p, vocab: int = 0):
    """Next tokens [B]; keys_B holds one PRNG key per sequence (unused when greedy); ids >=
    `vocab` (when given) are never picked."""
    logits_BV = mask_vocab(logits_BV, vocab)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(logits, axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
    draw = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))
    return draw(keys_B, logits).astype(jnp.int32)
