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
from .sparsity import masked_softmax


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


def attend(q_BTND, k_BSKD, v_BSKD, mask_BTS, policy_BS=None):
    """Grouped-query attention; scores and softmax in float32."""
    b, t, n, d = q_BTND.shape
    kh = k_BSKD.shape[2]
    q = q_BTND.reshape(b, t, kh, n // kh, d)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32)
    s = s * (d ** -0.5)
    p = masked_softmax(s, mask_BTS[:, None, None, :, :], policy_BS)
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_BSKD.dtype), v_BSKD)
    return o.reshape(b, t, n, d)


def write_cache(cache_BSKD, new_BTKD, slots_BT):
    """cache[b, slots[b, t]] = new[b, t]; out-of-range slots are skipped."""
    b = jnp.arange(cache_BSKD.shape[0])[:, None]
    return cache_BSKD.at[b, slots_BT].set(new_BTKD.astype(cache_BSKD.dtype), mode="drop")


class DecoderLayer(nn.Module):
    cfg: LLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, write_slots=None,
                 attend_cache: bool = False, policy=None):
        """One decoder layer.

        x [B,T,H]; positions [B,T]; mask [B,T,S] (S = T, or the cache size when
        attend_cache); cache: dict(k, v) [B,S,K,D] or None; write_slots [B,T] where the new
        K/V go in the cache; policy [B,T] (training MaskedSoftmax) or None.
        Returns (x, cache).
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
            cache = {"k": write_cache(cache["k"], k, write_slots),
                     "v": write_cache(cache["v"], v, write_slots)}
        if attend_cache:
            o = attend(q, cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), mask, policy)
        else:
            o = attend(q, k, v, mask, policy)
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


def run_stack(layer_params, cfg: LLMConfig, dtype, x, positions, mask, caches=None,
              write_slots=None, attend_cache=False, policy=None, remat: str = "none"):
    """Run a stack of decoder layers (params and caches stacked on axis 0) with `lax.scan`."""
    layer = DecoderLayer(cfg, dtype)

    def body(h, xs):
        p, cache = xs
        h, cache = layer.apply({"params": p}, h, positions, mask, cache, write_slots,
                               attend_cache, policy)
        return h, cache

    if REMAT_POLICIES.get(remat, "bad") == "bad":
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    if jax.tree_util.tree_leaves(layer_params)[0].shape[0] == 0:
        return x, caches
    x, caches = jax.lax.scan(body, x, (layer_params, caches))
    return x, caches


def split_layers(layer_params, at: int):
    """Stacked layer params -> (layers [0, at), layers [at, L))."""
    return (jax.tree_util.tree_map(lambda a: a[:at], layer_params),
            jax.tree_util.tree_map(lambda a: a[at:], layer_params))


def causal_mask(valid_BT):
    """[B,T,T]: query i sees key j iff j <= i and j is a real token."""
    t = valid_BT.shape[1]
    tri = jnp.tril(jnp.ones((t, t), bool))
    return tri[None] & valid_BT[:, None, :]
