"""The two Dynamic-LLaVA predictors (SPEC §2). Each returns logits [..., 2]:
index 0 = keep, index 1 = drop."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .attention import attention
from .config import SparseConfig

_gelu = lambda x: nn.gelu(x, approximate=False)


class PredictorBlock(nn.Module):
    """Pre-LN transformer encoder block: qkv without bias, no layer scale, no mask."""

    d_model: int
    nhead: int
    dim_feedforward: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        hd = d // self.nhead
        h = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm1")(x)
        qkv = nn.Dense(3 * d, use_bias=False, dtype=self.dtype, name="qkv")(h)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.nhead, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        o = attention(q, k, v).reshape(b, t, d)
        x = x + nn.Dense(d, dtype=self.dtype, name="proj")(o)
        h = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm2")(x)
        h = nn.Dense(self.dim_feedforward, dtype=self.dtype, name="fc1")(h)
        return x + nn.Dense(d, dtype=self.dtype, name="fc2")(_gelu(h))


def _output_mlp(x, d, dtype, names):
    x = _gelu(nn.Dense(d // 2, dtype=dtype, name=names[0])(x))
    x = _gelu(nn.Dense(d // 4, dtype=dtype, name=names[1])(x))
    return nn.Dense(2, dtype=dtype, name=names[2])(x)


class ImagePredictor(nn.Module):
    """Scores the image tokens of each sample jointly (local + decision-weighted global)."""

    cfg: SparseConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BNH, decision_BN):
        c = self.cfg
        dec = decision_BN[..., None].astype(self.dtype)
        h = nn.LayerNorm(1e-5, dtype=self.dtype, name="down_norm")(x_BNH)
        h = _gelu(nn.Dense(c.d_model, dtype=self.dtype, name="down_proj")(h))
        h = h * dec
        for j in range(c.num_layers):
            h = PredictorBlock(c.d_model, c.nhead, c.dim_feedforward, self.dtype,
                               name=f"block_{j}")(h)
        half = c.d_model // 2
        local = h[..., :half]
        glob = (h[..., half:] * dec).sum(1, keepdims=True) / dec.sum(1, keepdims=True)
        h = jnp.concatenate([local, jnp.broadcast_to(glob, local.shape)], axis=-1)
        return _output_mlp(h, c.d_model, self.dtype, ("out_1", "out_2", "out_3"))


class TextPredictor(nn.Module):
    """Scores one token at a time (no interaction between tokens)."""

    cfg: SparseConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = nn.LayerNorm(1e-5, dtype=self.dtype, name="norm")(x)
        h = _gelu(nn.Dense(c.d_model, dtype=self.dtype, name="fc_1")(h))
        return _output_mlp(h, c.d_model, self.dtype, ("fc_2", "fc_3", "fc_4"))
