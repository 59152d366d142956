"""CLIP ViT vision tower (pre-LN, quick_gelu) and the `mlp2x_gelu` projector.

LLaVA reads the hidden states at `select_layer` (-2: the input of the last layer) and
drops CLS, so only the encoder layers below that one are run.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import attention
from .config import VisionConfig


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPEncoderLayer(nn.Module):
    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        b, t, d = x.shape
        hd = d // c.num_heads
        ln = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, name=name)
        h = ln("layer_norm1")(x)
        q = dense(d, "q_proj")(h).reshape(b, t, c.num_heads, hd)
        k = dense(d, "k_proj")(h).reshape(b, t, c.num_heads, hd)
        v = dense(d, "v_proj")(h).reshape(b, t, c.num_heads, hd)
        o = attention(q, k, v).reshape(b, t, d)
        x = x + dense(d, "out_proj")(o)
        h = ln("layer_norm2")(x)
        h = dense(d, "fc2")(quick_gelu(dense(c.intermediate_size, "fc1")(h)))
        return x + h


class CLIPEmbeddings(nn.Module):
    cfg: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels_BCHW):
        c = self.cfg
        x = jnp.transpose(pixels_BCHW, (0, 2, 3, 1)).astype(self.dtype)  # NHWC
        x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size,
                    padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        pos = self.param("position_embedding", nn.initializers.normal(0.02),
                         (c.num_patches + 1, c.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), x], 1)
        x = x + pos.astype(self.dtype)[None]
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)


def vision_features(params, cfg: VisionConfig, pixels_BCHW, dtype=jnp.float32):
    """Patch features [B, num_patches, hidden] at `cfg.select_layer`, CLS dropped."""
    x = CLIPEmbeddings(cfg, dtype).apply({"params": params["embeddings"]}, pixels_BCHW)
    layer = CLIPEncoderLayer(cfg, dtype)
    used = cfg.layers_used
    stacked = jax.tree_util.tree_map(lambda a: a[:used], params["layers"])

    def body(h, p):
        return layer.apply({"params": p}, h), None

    if used:
        x, _ = jax.lax.scan(body, x, stacked)
    return x[:, 1:]


class Projector(nn.Module):
    """`mlp2x_gelu`: Linear -> GELU (exact) -> Linear."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden_size, dtype=self.dtype, name="linear_1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="linear_2")(x)
