"""One attention function for the LLM, the image predictor and the CLIP tower.

Visibility is described, not materialised: `causal` and a per-row key length
(`kv_lengths`: keys `[0, len)` of row b are real). That is all inference needs
(right-padded prompts, compacted prompts, per-row KV-cache lengths), so on NVIDIA GPUs those
calls go to cuDNN's fused flash attention (`jax.nn.dot_product_attention`) for bf16/fp16
prompts; on TPU, inside `prompt_attention` (what generation's prompt passes run in), to the
Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`: the
per-row length becomes segment ids, shapes are padded to its 128-token blocks, and under a
mesh it runs in `shard_map` on each device's rows and heads); elsewhere an einsum with
float32 scores and softmax. Training's MaskedSoftmax (SPEC §4: a key-side policy plus a
diagonal) and decoding steps (one query against a cache) always take the einsum path.

Letters: B batch, T queries, S keys, N query heads, K kv heads, G = N/K, D head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .sparsity import masked_softmax

logger = logging.getLogger(__name__)
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class _PromptSetting:
    implementation: str
    mesh: Any


_PROMPT = contextvars.ContextVar("dynllava_prompt_attention", default=None)
_warned_interpreter = [False]


def _check_name(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose from {', '.join(IMPLEMENTATIONS)}")


def check_available(implementation: str) -> None:
    """A ValueError, before any work, where `implementation` cannot run on this backend
    (cuDNN needs an NVIDIA GPU); a warning, once, where "splash" will run interpreted."""
    _check_name(implementation)
    backend = jax.default_backend()
    if implementation == "cudnn" and backend != "gpu":
        raise ValueError(f"attention 'cudnn' needs an NVIDIA GPU; this backend is {backend}")
    if implementation == "splash" and _interpret() and not _warned_interpreter[0]:
        _warned_interpreter[0] = True
        logger.warning("attention 'splash' is a TPU kernel; on %s it runs in Pallas's "
                       "interpreter (the same values, much slower)", backend)


@contextlib.contextmanager
def prompt_attention(implementation: str = "auto", mesh=None):
    """While tracing inside this block, attention without a training policy and with more
    than one query (prompt passes, the vision tower, the image predictor) uses
    `implementation`: "auto" picks cuDNN on NVIDIA GPUs (half precision), TPU splash
    attention where its kernel compiles for the shape, XLA otherwise; "xla", "cudnn",
    "splash" force one ("splash" off TPU runs Pallas's interpreter: slow, for tests).
    `mesh`: the mesh the prompt pass is sharded over (splash then runs per device in
    `shard_map`). Generation enters it from `GenOptions.attention`, a static option, so
    that each choice is its own compiled program."""
    _check_name(implementation)
    token = _PROMPT.set(_PromptSetting(implementation, mesh))
    try:
        yield
    finally:
        _PROMPT.reset(token)


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
    where it applies (see `_use_cudnn`), TPU splash attention inside `prompt_attention`
    where it compiles, else XLA; "xla" | "cudnn" | "splash" force one.

    The XLA path is written here rather than taken from `jax.nn.dot_product_attention(
    implementation="xla")`: that one computes the same einsum + float32 softmax, but with
    its own contraction order, which moved the official fixture's float32 logits by 1.3e-4
    (ours: 8e-5; the tests hold 1e-4), and it cannot read a [B, K, S, D] cache in place."""
    t = q_BTND.shape[1]
    impl = implementation
    prompt = _PROMPT.get()
    fused_ok = policy_BS is None and kv_layout == "bskd"
    if impl is None and prompt is not None and fused_ok and t > 1 and prompt.implementation != "auto":
        impl = prompt.implementation
    if impl is None:
        if fused_ok and _use_cudnn(q_BTND, t):
            impl = "cudnn"
        elif (prompt is not None and fused_ok and t > 1 and _on_tpu()
              and _splash_fits(q_BTND, k_BSKD, causal, prompt.mesh)):
            impl = "splash"
        else:
            impl = "xla"
    if impl == "splash":
        return _splash_attention(q_BTND, k_BSKD, v_BSKD, causal, kv_lengths_B,
                                 None if prompt is None else prompt.mesh)
    if impl == "cudnn":
        lens = None if kv_lengths_B is None else jnp.asarray(kv_lengths_B, jnp.int32)
        try:
            return jax.nn.dot_product_attention(q_BTND, k_BSKD.astype(q_BTND.dtype),
                                                v_BSKD.astype(q_BTND.dtype), is_causal=causal,
                                                key_value_seq_lengths=lens, implementation="cudnn")
        except Exception:  # a shape or version cuDNN does not take: XLA computes the same
            if implementation == "cudnn" or (prompt is not None and prompt.implementation == "cudnn"):
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


# -- TPU splash attention ----------------------------------------------------------------

_SPLASH_LANES = 128  # the kernel's block sizes are multiples of this


def _on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def _interpret() -> bool:
    """Off TPU the kernel runs in Pallas's interpreter (tests; the same semantics)."""
    return jax.default_backend() != "tpu"


def _splash_block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _splash_kernel(heads: int, t: int, s: int, causal: bool, interpret: bool):
    """The forward-only splash kernel for [heads, t, d] queries against [kv heads, s, d] keys
    (grouped heads are the kernel's own business), t and s multiples of 128. Made per
    trace, not cached: the kernel holds arrays, which must belong to the trace using them."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    one = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
    bq, bkv = _splash_block(t), _splash_block(s)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                              block_sizes=sa.BlockSizes(block_q=bq, block_kv=bkv,
                                                        block_kv_compute=bkv),
                              interpret=interpret)


def _splash_specs(mesh, b: int, n: int, kh: int):
    """shard_map specs: rows over the mesh's batch axes and heads over 'tensor' where they
    divide (otherwise that dimension is whole on every device)."""
    names = set(mesh.axis_names)
    batch = tuple(a for a in ("data", "fsdp") if a in names)
    rows = int(np.prod([mesh.shape[a] for a in batch])) if batch else 1
    tensor = mesh.shape["tensor"] if "tensor" in names else 1
    bspec = batch if batch and b % rows == 0 else None
    hspec = "tensor" if tensor > 1 and n % tensor == 0 and kh % tensor == 0 else None
    return P(bspec, hspec, None, None), P(bspec, None)


def _splash_local(q_BNTD, k_BKSD, v_BKSD, q_seg_BT, kv_seg_BS, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    kernel = _splash_kernel(q_BNTD.shape[1], q_BNTD.shape[2], k_BKSD.shape[2], causal, interpret)
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks)))(
        q_BNTD, k_BKSD, v_BKSD, q_seg_BT, kv_seg_BS)


def _splash_attention(q_BTND, k_BSKD, v_BSKD, causal, kv_lengths_B, mesh):
    """Splash attention with `attention`'s semantics. The per-row length is a segment id on
    the keys (queries all in segment 0, keys at or past the length in segment 1), so every
    query row, padding included, sees exactly the keys the einsum path lets it see; shapes
    are padded to whole 128-token blocks (padded keys in segment 1, padded queries cut)."""
    b, t, n, d = q_BTND.shape
    s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
    if causal and t != s:
        raise ValueError(f"splash attention: causal needs queries == keys, got {t} and {s}")
    tp, sp = -(-t // _SPLASH_LANES) * _SPLASH_LANES, -(-s // _SPLASH_LANES) * _SPLASH_LANES
    lens = (jnp.full((b,), s, jnp.int32) if kv_lengths_B is None
            else jnp.asarray(kv_lengths_B, jnp.int32))
    # The kernel takes no scale: fold it into the queries (in float32, then back).
    q = (q_BTND.astype(jnp.float32) * d ** -0.5).astype(q_BTND.dtype)
    q = jnp.pad(jnp.swapaxes(q, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    k, v = (jnp.pad(jnp.swapaxes(x.astype(q.dtype), 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
            for x in (k_BSKD, v_BSKD))
    q_seg = jnp.zeros((b, tp), jnp.int32)
    kv_seg = (jnp.arange(sp, dtype=jnp.int32)[None] >= lens[:, None]).astype(jnp.int32)
    run = functools.partial(_splash_local, causal=causal, interpret=_interpret())
    if mesh is not None:
        x_spec, seg_spec = _splash_specs(mesh, b, n, kh)
        run = jax.shard_map(run, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec, seg_spec),
                            out_specs=x_spec, check_vma=False)
    o = run(q, k, v, q_seg, kv_seg)
    return jnp.swapaxes(o[:, :, :t], 1, 2).astype(q_BTND.dtype)


def _splash_fits(q_BTND, k_BSKD, causal: bool, mesh) -> bool:
    """Whether the splash kernel compiles on this backend for one device's share of this
    shape (a small compile, once per shape): where it does not (a head dim or block layout
    this TPU or jax version rejects), the einsum path runs instead, with a warning."""
    b, t, n, d = q_BTND.shape
    s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
    if causal and t != s:
        return False
    if mesh is not None:
        x_spec, _ = _splash_specs(mesh, b, n, kh)
        b = b // (int(np.prod([mesh.shape[a] for a in x_spec[0]])) if x_spec[0] else 1)
        div = mesh.shape["tensor"] if x_spec[1] else 1
        n, kh = n // div, kh // div
    return _splash_compiles(b, t, s, n, kh, d, jnp.dtype(q_BTND.dtype).name, causal)


@functools.lru_cache(maxsize=64)
def _splash_compiles(b, t, s, n, kh, d, dtype, causal) -> bool:
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    lens = jax.ShapeDtypeStruct((b,), jnp.int32)
    try:
        jax.jit(lambda q, k, v, L: _splash_attention(q, k, v, causal, L, None)).lower(
            sd(b, t, n, d), sd(b, s, kh, d), sd(b, s, kh, d), lens).compile()
        return True
    except Exception as e:  # noqa: BLE001 - any refusal means: use the einsum path
        logger.warning("splash attention does not compile for queries %s, keys %s (%s): "
                       "using XLA's attention for this shape", (b, t, n, d), (b, s, kh, d),
                       str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return False
