"""LLaMA-2 decoder (Vicuna v1.5): RMSNorm, RoPE from explicit positions, GQA, SwiGLU.

Layers are stacked (leading axis = layer) and run with `lax.scan` by `run_stack`, so a
stack can be split at the sparse layer without touching the checkpoint.
Letters: B batch, T query tokens, S key slots, N query heads, K kv heads, G = N/K, D head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import LLMConfig
from . import kv_cache
from .attention import attention


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the weight multiply.
        return (scale.astype(self.dtype) * xf.astype(self.dtype)).astype(self.dtype)


def apply_rope(x_BTHD, positions_BT, theta: float):
    """Rotary embedding (HF `rotate_half` layout) at explicit per-token positions."""
    d = x_BTHD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x_BTHD.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., d // 2:], xf[..., : d // 2]], axis=-1)
    return (xf * cos + rot * sin).astype(x_BTHD.dtype)


class DecoderLayer(nn.Module):
    cfg: LLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_lengths, cache=None, write_slots=None,
                 attend_cache: bool = False, policy=None, causal: bool = True):
        """One decoder layer.

        x [B,T,H]; positions [B,T]; kv_lengths [B]: keys at or past a row's length are
        invisible (right padding, or the filled part of a cache); causal: query i sees
        keys j <= i (prompt passes; a decode step attends its cache without it).
        cache: dict(k, v) [B,K,S,D] or None; write_slots [B,T] where the new K/V go in
        the cache (None: its first T slots); attend_cache: attend the cache (decode)
        instead of this pass's K/V; policy [B,T] (training MaskedSoftmax) or None. Returns (x, cache).
        """
        c = self.cfg
        dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=self.dtype, name=name)
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_norm")(x)
        b, t, _ = x.shape
        q = dense(c.num_heads * c.head_dim, "q_proj")(h).reshape(b, t, c.num_heads, c.head_dim)
        k = dense(c.num_kv_heads * c.head_dim, "k_proj")(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = dense(c.num_kv_heads * c.head_dim, "v_proj")(h).reshape(b, t, c.num_kv_heads, c.head_dim)
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k, positions, c.rope_theta)
        if cache is not None:
            cache = {"k": kv_cache.write(cache["k"], k, write_slots),
                     "v": kv_cache.write(cache["v"], v, write_slots)}
        if attend_cache:
            o = attention(q, cache["k"], cache["v"], causal=causal, kv_lengths_B=kv_lengths,
                          kv_layout="bksd")
        else:
            o = attention(q, k, v, causal=causal, kv_lengths_B=kv_lengths, policy_BS=policy)
        x = x + dense(c.hidden_size, "o_proj")(o.reshape(b, t, -1))
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_norm")(x)
        g = dense(c.intermediate_size, "gate_proj")(h)
        u = dense(c.intermediate_size, "up_proj")(h)
        x = x + dense(c.hidden_size, "down_proj")(nn.silu(g) * u)
        return x, cache


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def run_stack(layer_params, cfg: LLMConfig, dtype, x, positions, kv_lengths, caches=None,
              write_slots=None, attend_cache=False, policy=None, remat: str = "none",
              causal: bool = True):
    """Run a stack of decoder layers.

    `layer_params` (and `caches`) are either stacked on axis 0 (training, checkpoints:
    run with `lax.scan`) or a list with one entry per layer (inference, see
    `generate.inference_params`: a Python loop, so that no layer's weights or cache is sliced out of
    a stacked buffer, i.e. copied, inside a decoding loop)."""
    layer = DecoderLayer(cfg, dtype)
    if REMAT_POLICIES.get(remat, "bad") == "bad":
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")

    def body(h, xs):
        p, cache = xs
        return layer.apply({"params": p}, h, positions, kv_lengths, cache, write_slots,
                           attend_cache, policy, causal)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    if isinstance(layer_params, (list, tuple)):
        out = []
        for i, p in enumerate(layer_params):
            x, c = body(x, (p, None if caches is None else caches[i]))
            out.append(c)
        return x, (None if caches is None else out)
    if jax.tree_util.tree_leaves(layer_params)[0].shape[0] == 0:
        return x, caches
    x, caches = jax.lax.scan(body, x, (layer_params, caches))
    return x, caches


def split_layers(layer_params, at: int):
    """Layer params (stacked or a per-layer list) -> (layers [0, at), layers [at, L))."""
    if isinstance(layer_params, (list, tuple)):
        return list(layer_params[:at]), list(layer_params[at:])
    return (jax.tree_util.tree_map(lambda a: a[:at], layer_params),
            jax.tree_util.tree_map(lambda a: a[at:], layer_params))
