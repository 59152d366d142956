"""Checks that need an NVIDIA GPU: skipped elsewhere (CI has none); `scripts/gpu_check.sh`
runs them, with the rest of the GPU check, on a lent one. The attention path that only a GPU
takes: cuDNN's fused kernel through `jax.nn.dot_product_attention` for half-precision
prompts must give the einsum path's values, and "auto" must pick it there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import attention as A

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


def _qkv(b, t, n, k, d, dtype):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    return tuple(jax.random.normal(kk, (b, t, h, d)).astype(dtype)
                 for kk, h in zip(ks, (n, k, k)))


@pytest.mark.parametrize("causal,lengths", [(True, [640, 301]), (False, None)])
def test_cudnn_attention_equals_the_einsum_path_in_bf16(causal, lengths):
    q, k, v = _qkv(2, 640, 32, 32, 128, jnp.bfloat16)  # LLaVA-7B's heads, a bucketed prompt
    lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    want = A.attention(q, k, v, causal=causal, kv_lengths_B=lens, implementation="xla")
    got = jax.jit(lambda q, k, v: A.attention(q, k, v, causal=causal, kv_lengths_B=lens,
                                              implementation="cudnn"))(q, k, v)
    # the rows the model reads: a row's own prompt (padding rows see other keys under cuDNN)
    rows = np.arange(640)[None, :] < np.asarray(lengths if lengths else [640, 640])[:, None]
    diff = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))[rows]
    assert diff.max() < 3e-2, diff.max()


def test_auto_takes_cudnn_for_half_precision_prompts(monkeypatch):
    seen = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **kw: seen.append(kw.get("implementation")) or real(*a, **kw))
    q, k, v = _qkv(1, 128, 8, 8, 64, jnp.bfloat16)
    A.attention(q, k, v, causal=True)
    assert seen == ["cudnn"]
    A.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=True)
    assert seen == ["cudnn"]  # float32 keeps the einsum path
