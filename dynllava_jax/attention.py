"""One attention function for the LLM, the image predictor and the CLIP tower.

Visibility is described, not materialised: `causal` and a per-row key length
(`kv_lengths`: keys `[0, len)` of row b are real). That is all inference needs
(right-padded prompts, compacted prompts, per-row KV-cache lengths), so on NVIDIA GPUs those
calls go to cuDNN's fused flash attention (`jax.nn.dot_product_attention`) for bf16/fp16
prompts; elsewhere an einsum with float32 scores and softmax. Training's MaskedSoftmax
(SPEC §4: a key-side policy plus a diagonal) always takes the einsum path. (On TPU the
Pallas splash kernels would fit behind the same function; not wired up yet.)

Letters: B batch, T queries, S keys, N query heads, K kv heads, G = N/K, D head dim.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from .sparsity import masked_softmax


def visibility_mask(t: int, s: int, causal: bool, kv_lengths_B=None):
    """[B|1, T, S] boolean: what `attention` lets query i of row b see (the reference
    semantics; the fast path never builds it). Causal alignment is top-left (T == S)."""
    m = jnp.ones((1, t, s), bool)
    if causal:
        m = m & jnp.tril(jnp.ones((t, s), bool))[None]
    if kv_lengths_B is not None:
        m = m & (jnp.arange(s)[None, None, :] < kv_lengths_B[:, None, None])
    return m


def _use_cudnn(q, t: int) -> bool:
    # cuDNN's fused kernel: NVIDIA GPU, half precision, head dim a multiple of 8 up to 128,
    # and worth it only for prompts (a decode step has one query).
    return (t > 1 and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 128 and jax.default_backend() == "gpu")


def attention(q_BTND, k_BSKD, v_BSKD, *, causal: bool = False, kv_lengths_B=None,
              policy_BS=None, kv_layout: str = "bskd", implementation: Optional[str] = None):
    """Scaled dot-product attention with grouped kv heads; softmax statistics in float32.

    causal: query i sees keys j <= i (T == S); kv_lengths_B: int32 [B], keys at or past
    a row's length are invisible; policy_BS: training's MaskedSoftmax key policy.
    kv_layout "bksd": keys/values are a KV cache laid out [B, K, S, D] (see kv_cache).
    implementation: None picks cuDNN's fused kernel through `jax.nn.dot_product_attention`
    where it applies (see `_use_cudnn`), else XLA; "xla" | "cudnn" force one.

    The XLA path is written here rather than taken from `jax.nn.dot_product_attention(
    implementation="xla")`: that one computes the same einsum + float32 softmax, but with
    its own contraction order, which moved the official fixture's float32 logits by 1.3e-4
    (ours: 8e-5; the tests hold 1e-4), and it cannot read a [B, K, S, D] cache in place."""
    t = q_BTND.shape[1]
    impl = implementation
    if impl is None:
        impl = "cudnn" if (policy_BS is None and kv_layout == "bskd" and _use_cudnn(q_BTND, t)) else "xla"
    if impl == "cudnn":
        lens = None if kv_lengths_B is None else jnp.asarray(kv_lengths_B, jnp.int32)
        try:
            return jax.nn.dot_product_attention(q_BTND, k_BSKD.astype(q_BTND.dtype),
                                                v_BSKD.astype(q_BTND.dtype), is_causal=causal,
                                                key_value_seq_lengths=lens, implementation="cudnn")
        except Exception:  # a shape or version cuDNN does not take: XLA computes the same
            if implementation == "cudnn":
                raise
    if kv_layout == "bskd":  # -> [B, K, S, D]: one layout for both matmuls below
        k_BSKD, v_BSKD = jnp.swapaxes(k_BSKD, 1, 2), jnp.swapaxes(v_BSKD, 1, 2)
    return _xla_attention(q_BTND, k_BSKD, v_BSKD, causal, kv_lengths_B, policy_BS)


def _xla_attention(q_BTND, k_BKSD, v_BKSD, causal, kv_lengths_B, policy_BS):
    """Einsum attention over keys/values laid out [B, K, S, D]. For a KV cache both matmuls
    take it as it lies, batched over (B, K): nothing is transposed, i.e. copied."""
    b, t, n, d = q_BTND.shape
    kh, s = k_BKSD.shape[1], k_BKSD.shape[2]
    q = q_BTND.reshape(b, t, kh, n // kh, d)
    mask = visibility_mask(t, s, causal, kv_lengths_B)[:, None, None]
    if t == 1:
        # A decoding step: the cache as the dot's left operand (the same products). With q
        # first, XLA:CPU at batch 1 fuses the cache write into this dot's operand as well as
        # into the loop's output and copies every key cache four times per step to keep both;
        # this way it transposes it once (cpu-small, batch 1: XLA's bytes per step 442 ->
        # 343 MiB against a minimum of 279). Batch > 1 had no copies either way.
        sc = jnp.einsum("bksd,btkgd->bkgts", k_BKSD.astype(q.dtype), q,
                        preferred_element_type=jnp.float32)
    else:
        sc = jnp.einsum("btkgd,bksd->bkgts", q, k_BKSD.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    p = masked_softmax(sc * (d ** -0.5), mask, policy_BS)
    o = jnp.einsum("bkgts,bksd->btkgd", p.astype(q.dtype), v_BKSD.astype(q.dtype))
    return o.reshape(b, t, n, d)
