"""Batched generation in the three modes of SPEC §3, with static shapes.

- `prefill`: one compiled pass over the padded prompts. Layers < l see everything and
  fill the dense caches; at layer l the image predictor keeps the top-k image tokens of
  each sample, the sequence is compacted to a shorter static length (original RoPE
  positions carried along) and layers >= l run on it and fill the sparse caches.
- `decode_loop`: one compiled `lax.while_loop`; each step runs the new token through all
  layers, the output-text predictor at layer l decides whether the sparse layers keep it.
  It moves only what it must: the layers are separate buffers (`inference_params`), each
  layer's cache is its own buffer written one slot per step in place (the state is
  donated), and attention sees a per-row length (`kv_cache`).
- `generate_no_cache`: recomputes the sequence every step; image and generated tokens are
  pruned at layer l and layers >= l run on a compacted length. Lengths grow in buckets:
  one compiled loop per bucket, not per step.
Every sequence is exact on its own: lengths and decisions are per sequence, unused slots
masked, so a batch equals its sequences run one by one.
With a mesh (`generate(..., mesh=)`, params from `shard_inference_params`) the same code runs
SPMD: the batch split over ('data', 'fsdp'), the KV caches also on kv heads over 'tensor'
(`sharding.constrain_caches`), each process passing and getting back its own rows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from . import kv_cache
from . import sharding as S
from .attention import check_available as check_attention, prompt_attention
from .config import ModelConfig
from .inputs import Batch, round_up
from .llama import run_stack, split_layers
from .model import (compute_dtype, embed_inputs, image_features, image_scores,
                    image_token_mask, lm_logits, text_scores)
from .sampling import row_keys, sample, step_keys
from .sparsity import compaction_indices, gather_tokens, topk_keep_mask

logger = logging.getLogger(__name__)
TRACES = {"prefill": 0, "decode": 0, "no_cache": 0}  # trace counters (tests check compiles)
# Each compiled program holds hundreds of memory mappings (the process limit is ~65k); the
# no-cache loop compiles one per (chunk, lengths), so a long run keeps at most this many.
MAX_NO_CACHE_PROGRAMS = 48


@dataclasses.dataclass(frozen=True)
class GenOptions:
    max_new_tokens: int = 32
    mode: str = "dynamic"  # "dense" | "dynamic"
    use_cache: bool = True
    vision_keep_rate: Optional[float] = None  # None: the checkpoint's
    text_kv_budget: float = 1.0
    greedy: bool = True
    no_cache_bucket: int = 32  # generated-length bucket of the no-cache loop
    vocab_limit: int = 0  # ids >= this are never generated (a padded embedding's rows); 0: none
    # Prompt-pass attention (attention.prompt_attention): "auto" | "xla" | "cudnn" | "splash".
    attention: str = "auto"

    def prune_vision(self, cfg: ModelConfig) -> bool:
        return self.mode == "dynamic" and cfg.sparse.enabled and cfg.sparse.use_vision_predictor

    def prune_text(self, cfg: ModelConfig) -> bool:
        return self.mode == "dynamic" and cfg.sparse.enabled and cfg.sparse.use_output_text_predictor

    def keep_k(self, cfg: ModelConfig) -> int:
        rate = cfg.sparse.vision_keep_rate if self.vision_keep_rate is None else self.vision_keep_rate
        # floor(N x rate) as the official code, but never 0: a tiny rate keeps one token, not none.
        return max(1, int(cfg.num_image_tokens * rate)) if self.prune_vision(cfg) else cfg.num_image_tokens


def _layer_split(cfg: ModelConfig) -> int:
    return min(cfg.sparse.sparse_layer, cfg.llm.num_layers)


def compacted_length(batch: Batch, cfg: ModelConfig, opts: GenOptions) -> int:
    """Static length of the prompt after image pruning (all samples padded to it)."""
    return _compacted_length(batch.tokens.shape[1], bool(np.all(batch.image_start >= 0)), cfg, opts)


def _compacted_length(t: int, all_have_images: bool, cfg: ModelConfig, opts: GenOptions) -> int:
    return t - (cfg.num_image_tokens - opts.keep_k(cfg)) if all_have_images else t


def _image_keep(params, cfg, opts, h, image_start, t, has_images: bool = True):
    """[B,T] False exactly for the image tokens the predictor prunes; kept indices [B,N].

    has_images False (no pixels: a text-only batch) skips the image predictor, whose
    [B, heads, N, N] float32 scores over N placeholder tokens would be the largest buffer
    of a text-only prefill."""
    is_img = image_token_mask(cfg.num_image_tokens, image_start, t)
    if not (has_images and opts.prune_vision(cfg)):
        return jnp.ones(is_img.shape, bool), jnp.ones((h.shape[0], cfg.num_image_tokens), bool)
    logits = image_scores(params, cfg, h, image_start)
    score = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[..., 0]
    keep_n = topk_keep_mask(score, opts.keep_k(cfg))
    rel = jnp.clip(jnp.arange(t)[None, :] - image_start[:, None], 0, cfg.num_image_tokens - 1)
    keep_t = jnp.take_along_axis(keep_n, rel, axis=1)
    return ~is_img | keep_t, keep_n


def _text_keep(params, cfg, opts, h):
    """Output-text predictor decision (keep iff logit0 > logit1) and keep score."""
    if not opts.prune_text(cfg):
        return jnp.ones(h.shape[:-1], bool), jnp.zeros(h.shape[:-1], jnp.float32)
    logits = text_scores(params, cfg, h).astype(jnp.float32)
    return logits[..., 0] > logits[..., 1], jax.nn.log_softmax(logits, axis=-1)[..., 0]


def _last(x_BTH, count_B):
    return jnp.take_along_axis(x_BTH, (count_B - 1)[:, None, None], axis=1)[:, 0]


# -- KV-cache mode -------------------------------------------------------------------

@struct.dataclass
class DecodeState:
    """What the decode loop carries besides the tokens (donated into `decode_loop`)."""

    dense: list             # layers < l: one {"k", "v"} [B, S_dense, K, D] per layer
    sparse: list            # layers >= l: one {"k", "v"} [B, S_sparse, K, D] per layer
    dense_len: jax.Array    # [B] filled dense slots
    sparse_len: jax.Array   # [B] filled sparse slots
    sparse_limit: jax.Array  # [B] slots a row may fill (its prompt + the text budget)
    score: jax.Array        # [B, S_sparse] keep score per slot (+inf: prompt, never evicted)
    next_pos: jax.Array     # [B] RoPE position of the next token
    evicted: jax.Array      # [B] a budgeted cache replaced a kept token
    image_keep: jax.Array   # [B, N] the image tokens kept at prefill


def cache_layout(cfg: ModelConfig, opts: GenOptions, batch: int, prompt_len: int,
                 compact_len: int) -> kv_cache.CacheLayout:
    """The decode caches of a batch: used to allocate them and to report their bytes."""
    l = _layer_split(cfg)
    prune_text = opts.prune_text(cfg)
    cap = kv_cache.sparse_capacity(compact_len, opts.max_new_tokens,
                                   opts.text_kv_budget if prune_text else 1.0)
    # A dropped token is written at its row's length: one slot past the limit, needed
    # only when the predictor can drop a token.
    return kv_cache.CacheLayout(
        batch=batch, dense_layers=l, dense_slots=prompt_len + opts.max_new_tokens,
        sparse_layers=cfg.llm.num_layers - l, sparse_slots=cap + prune_text,
        kv_heads=cfg.llm.num_kv_heads, head_dim=cfg.llm.head_dim, dtype=compute_dtype(cfg).name)


def prefill(params, tokens, lengths, image_start, pixels, *, cfg: ModelConfig,
            opts: GenOptions, compact_len: int, mesh=None):
    """Prompt pass. Returns (first-token logits [B,V], DecodeState). With a `mesh`, the
    caches are sharded on batch and kv heads (`sharding.constrain_caches`)."""
    TRACES["prefill"] += 1
    with prompt_attention(opts.attention, mesh):
        return _prefill(params, tokens, lengths, image_start, pixels, cfg=cfg, opts=opts,
                        compact_len=compact_len, mesh=mesh)


def _prefill(params, tokens, lengths, image_start, pixels, *, cfg, opts, compact_len, mesh):
    params = inference_params(params)
    dt = compute_dtype(cfg)
    b, t = tokens.shape
    l = _layer_split(cfg)
    pre, post = split_layers(params["llm"]["layers"], l)
    feats = image_features(params, cfg, pixels) if pixels is not None else None
    x = embed_inputs(params, cfg, tokens, feats, image_start)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    lengths = lengths.astype(jnp.int32)
    layout = cache_layout(cfg, opts, b, t, compact_len)
    dense_c, sparse_c = S.constrain_caches(layout.init(), mesh)
    x, dense_c = run_stack(pre, cfg.llm, dt, x, pos, lengths, dense_c)

    keep_t, keep_n = _image_keep(params, cfg, opts, x, image_start, t, feats is not None)
    idx, cvalid = compaction_indices(keep_t & (pos < lengths[:, None]), compact_len)
    xc, posc = gather_tokens(x, idx), gather_tokens(pos, idx)
    count = cvalid.sum(-1).astype(jnp.int32)
    xc, sparse_c = run_stack(post, cfg.llm, dt, xc, posc, count, sparse_c)
    dense_c, sparse_c = S.constrain_caches((dense_c, sparse_c), mesh)
    logits = lm_logits(params, cfg, _last(xc, count))
    score = jnp.where(jnp.arange(layout.sparse_slots)[None] < count[:, None], jnp.inf, -jnp.inf)
    cap = layout.sparse_slots - opts.prune_text(cfg)
    state = DecodeState(dense=dense_c, sparse=sparse_c, dense_len=lengths, sparse_len=count,
                        sparse_limit=count + (cap - compact_len), score=score, next_pos=lengths,
                        evicted=jnp.zeros((b,), bool), image_keep=keep_n)
    return logits, state


def decode_step(params, token_B, state: DecodeState, active_B=None, *, cfg: ModelConfig,
                opts: GenOptions, mesh=None):
    """Feed one token per sequence through every layer; returns (logits [B,V], state).

    Each layer writes one slot of its own cache and attends the first `visible` slots of
    each row. active_B False marks sequences that already ended (EOS): their tokens never
    enter the sparse caches, so the cache statistics count only real answers."""
    params = inference_params(params)
    dt = compute_dtype(cfg)
    pre, post = split_layers(params["llm"]["layers"], _layer_split(cfg))
    x = embed_inputs(params, cfg, token_B[:, None], None, None, row_slices=mesh is None)
    pos = state.next_pos[:, None]
    d_slot = state.dense_len
    x, dense_c = run_stack(pre, cfg.llm, dt, x, pos, d_slot + 1, state.dense, d_slot[:, None],
                           attend_cache=True, causal=False)
    keep, score = _text_keep(params, cfg, opts, x[:, 0])
    if active_B is not None:
        keep = keep & active_B
    slot, s_len, s_score, evicted, visible = kv_cache.sparse_append(
        state.sparse_len, state.score, keep, score, state.sparse_limit)
    x, sparse_c = run_stack(post, cfg.llm, dt, x, pos, visible, state.sparse, slot[:, None],
                            attend_cache=True, causal=False)
    logits = lm_logits(params, cfg, x[:, 0])
    state = state.replace(dense=dense_c, sparse=sparse_c, dense_len=d_slot + 1, sparse_len=s_len,
                          score=s_score, next_pos=state.next_pos + 1,
                          evicted=state.evicted | evicted)
    return logits, state


def decode_loop(params, first_logits, state: DecodeState, keys, temperature, top_p, *,
                cfg: ModelConfig, opts: GenOptions, mesh=None):
    """All decoding steps in one `lax.while_loop`; stops when every sequence hit EOS.

    Returns (tokens [B, max_new], stats, final state). The state is returned so that the
    donated input caches alias it: the loop then updates them in place, never copying."""
    TRACES["decode"] += 1
    params = inference_params(params)  # outside the loop: a no-op for unstacked params
    b = first_logits.shape[0]
    n = opts.max_new_tokens
    tok = sample(first_logits, step_keys(keys, 0), opts.greedy, temperature, top_p,
                 vocab=opts.vocab_limit)
    out = jnp.full((b, n), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok)
    done = tok == cfg.eos_token_id
    first_gen = state.sparse_len

    def cond(c):
        i, _, _, done, _ = c
        return (i < n) & ~jnp.all(done)

    def body(c):
        i, tok, out, done, state = c
        logits, state = decode_step(params, tok, state, ~done, cfg=cfg, opts=opts, mesh=mesh)
        # The loop carry keeps the caches' sharding (batch x kv heads), step after step.
        dense, sparse = S.constrain_caches((state.dense, state.sparse), mesh)
        state = state.replace(dense=dense, sparse=sparse)
        nxt = sample(logits, step_keys(keys, i), opts.greedy, temperature, top_p,
                     vocab=opts.vocab_limit)
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        out = out.at[:, i].set(nxt)
        done = done | (nxt == cfg.eos_token_id)
        return i + 1, nxt, out, done, state

    _, _, out, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, done, state))
    stats = {"generated_in_cache": state.sparse_len - first_gen, "evicted": state.evicted,
             "image_keep": state.image_keep}
    return out, stats, state


# -- no-cache mode ---------------------------------------------------------------------

def no_cache_chunk(params, seq, lengths, image_start, feats, out, done, keys, stats, temperature,
                    top_p, start, stop, *, cfg: ModelConfig, opts: GenOptions, full_len: int,
                    compact_len: int, mesh=None):
    """Steps [start, stop) of no-cache decoding on static lengths (full_len, compact_len).

    `stats` carries, per sequence: `kept` (tokens kept at its last step, which bounds the
    compacted length the next chunk needs: earlier decisions never change), `in_cache`
    (generated tokens fed back and kept, frozen once the sequence ended) and `image_keep`."""
    TRACES["no_cache"] += 1
    with prompt_attention(opts.attention, mesh):
        return _no_cache_chunk(params, seq, lengths, image_start, feats, out, done, keys, stats,
                               temperature, top_p, start, stop, cfg=cfg, opts=opts,
                               full_len=full_len, compact_len=compact_len)


def _no_cache_chunk(params, seq, lengths, image_start, feats, out, done, keys, stats, temperature,
                    top_p, start, stop, *, cfg, opts, full_len, compact_len):
    params = inference_params(params)
    dt = compute_dtype(cfg)
    b = seq.shape[0]
    l = _layer_split(cfg)
    pre, post = split_layers(params["llm"]["layers"], l)
    pos = jnp.broadcast_to(jnp.arange(full_len, dtype=jnp.int32)[None], (b, full_len))

    def cond(c):
        i, _, _, done, _ = c
        return (i < stop) & ~jnp.all(done)

    def body(c):
        i, seq, out, done, stats = c
        cur = lengths + i  # tokens in each sequence at this step; the newest is cur - 1
        valid = pos < cur[:, None]
        x = embed_inputs(params, cfg, seq[:, :full_len], feats, image_start)
        x, _ = run_stack(pre, cfg.llm, dt, x, pos, cur)
        keep_t, keep_n = _image_keep(params, cfg, opts, x, image_start, full_len,
                                     feats is not None)
        gen_keep, _ = _text_keep(params, cfg, opts, x)
        is_gen = (pos >= lengths[:, None]) & (pos < cur[:, None] - 1)
        keep = valid & keep_t & (~is_gen | gen_keep)
        idx, cvalid = compaction_indices(keep, compact_len)
        xc = gather_tokens(x, idx)
        kept = cvalid.sum(-1).astype(jnp.int32)
        xc, _ = run_stack(post, cfg.llm, dt, xc, gather_tokens(pos, idx), kept)
        logits = lm_logits(params, cfg, _last(xc, kept))
        nxt = sample(logits, step_keys(keys, i), opts.greedy, temperature, top_p,
                 vocab=opts.vocab_limit)
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        out = out.at[:, i].set(nxt)
        seq = seq.at[jnp.arange(b), jnp.minimum(cur, seq.shape[1] - 1)].set(nxt)
        # Generated tokens fed so far (all before this step's output) that were kept.
        fed_kept = ((pos >= lengths[:, None]) & valid & gen_keep).sum(-1).astype(jnp.int32)
        stats = {"kept": kept, "image_keep": keep_n,
                 "in_cache": jnp.where(done, stats["in_cache"], fed_kept)}
        done = done | (nxt == cfg.eos_token_id)
        return i + 1, seq, out, done, stats

    _, seq, out, done, stats = jax.lax.while_loop(cond, body, (start, seq, out, done, stats))
    return seq, out, done, stats


# -- host-side driver ----------------------------------------------------------------

# XLA:CPU's YNNPACK dot fusions run a decoding step's few-row matmuls slower than XLA's own
# dot emitter (cpu-small, batch 4: 19.2 -> 15.2 ms/token without them; batch 1 within 5 %),
# while prompt-sized matmuls are a little faster with them (prefill 1.00-1.08x): so they are
# switched off for the decoding loops only, per compiled function (not process-wide).
DECODE_COMPILER_OPTIONS = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def known_compiler_options(options: Optional[dict]) -> Optional[dict]:
    """`options`, or None (with a warning) where this XLA does not know one of them: a tiny
    compile tells, once, so that every later compile (calls, `.lower().compile()`) can use
    them without a fallback of its own."""
    if not options:
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros((), jnp.float32)).compile()
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" not in str(e):
            raise
        logger.warning("decoding compiles with XLA's default options (%s)", e)
        return None
    return options


class DecodeJit:
    """`jax.jit(fn, **jit_kwargs)` compiled with `DECODE_COMPILER_OPTIONS` of the backend it
    runs on, chosen at the first use rather than at import (a multi-process job must start
    its runtime before the backend exists). An XLA without such an option compiles without it."""

    def __init__(self, fn, **jit_kwargs):
        self.fn, self.jit_kwargs, self._by_backend = fn, jit_kwargs, {}
        functools.update_wrapper(self, fn)

    def jitted(self):
        backend = jax.default_backend()
        if backend not in self._by_backend:
            options = known_compiler_options(DECODE_COMPILER_OPTIONS.get(backend))
            kw = dict(self.jit_kwargs, compiler_options=options) if options else self.jit_kwargs
            self._by_backend[backend] = jax.jit(self.fn, **kw)
        return self._by_backend[backend]

    def __call__(self, *args, **kwargs):
        return self.jitted()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted().lower(*args, **kwargs)


jit_prefill = jax.jit(prefill, static_argnames=("cfg", "opts", "compact_len", "mesh"))
jit_decode = DecodeJit(decode_loop, static_argnames=("cfg", "opts", "mesh"), donate_argnames=("state",))
jit_no_cache = jax.jit(no_cache_chunk, static_argnames=("cfg", "opts", "full_len", "compact_len", "mesh"))


def _features(params, pixels, cfg, attention, mesh):
    with prompt_attention(attention, mesh):
        return image_features(params, cfg, pixels)


_jit_features = jax.jit(_features, static_argnames=("cfg", "attention", "mesh"))


def inference_params(params):
    """Params with the LLM layers as a per-layer list (what generation runs on).

    Checkpoints and training stack the layers on axis 0; a decoding loop over stacked
    weights would slice (copy) each layer's weights on every step. Unstacking once gives
    each layer its own buffers (while both exist, the LLM layers take twice their memory:
    drop the stacked tree after this call). Idempotent."""
    layers = params["llm"]["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    per_layer = [jax.tree_util.tree_map(lambda a: a[i], layers) for i in range(n)]
    return dict(params, llm=dict(params["llm"], layers=per_layer))


def shard_inference_params(params, mesh):
    """`inference_params` of stacked params on `mesh`: each per-layer leaf in the sharding
    the logical-axis table gives it (`sharding.param_shardings`), split on the devices
    from a sharded stacked leaf. Consumes `params`: each stacked leaf is deleted once
    split, so the peak is the model plus one stacked leaf, per device its shards."""
    layers = params["llm"]["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]

    def split(path, a):
        sub = S.path_str(path)
        out = tuple(NamedSharding(mesh, S.logical_to_spec(
            S.param_logical_axes(f"llm/layers/{i}/{sub}", a.ndim - 1), a.shape[1:], mesh))
            for i in range(n))
        parts = jax.jit(lambda x: tuple(x[i] for i in range(n)), out_shardings=out)(a)
        a.delete()
        return parts

    parts = jax.tree_util.tree_map_with_path(split, layers)
    per_layer = [jax.tree_util.tree_map(lambda t: t[i], parts, is_leaf=lambda t: isinstance(t, tuple))
                 for i in range(n)]
    return dict(params, llm=dict(params["llm"], layers=per_layer))


@dataclasses.dataclass
class GenResult:
    tokens: np.ndarray                 # [B, max_new] (pad after EOS)
    new_token_ids: list[list[int]]      # per sequence, cut before EOS
    image_tokens_kept: np.ndarray       # [B] (0 for text-only)
    kept_image_indices: list[Optional[list[int]]]
    generated_tokens_in_cache: np.ndarray  # [B] generated tokens kept in the sparse caches
    kv_cache_bytes: int                 # allocated for this batch in this mode
    kv_cache_bytes_dense: int           # what dense mode would allocate
    evicted: np.ndarray                 # [B] a budgeted cache replaced a token


def kv_bytes(cfg: ModelConfig, opts: GenOptions, b: int, t: int, compact_len: int) -> tuple[int, int]:
    """(KV bytes allocated in this mode, in dense mode) for a batch [b, t]."""
    dense = cache_layout(cfg, dataclasses.replace(opts, mode="dense"), b, t, t).bytes
    if not opts.use_cache:
        return 0, dense
    return cache_layout(cfg, opts, b, t, compact_len).bytes, dense


def generate(params, cfg: ModelConfig, batch: Batch, pixels: Optional[np.ndarray],
             opts: GenOptions, rng=None, temperature: float = 1.0, top_p: float = 1.0,
             mesh=None) -> GenResult:
    """Generate for a right-padded batch (see inputs.prepare_batch).

    `params` may be stacked (as loaded) or `inference_params(params)`; pass the latter
    when calling repeatedly, so that the layers are unstacked once.

    mesh: `batch`, `pixels` and per-row keys `rng` [B, 2] are this process's rows of a
    global batch sharded over the mesh (`sharding.to_global`; in one process, the whole
    batch). Every process passes the same number of rows, a multiple of
    `sharding.local_batch_shards(mesh)`; prompt lengths may differ (padded to the longest
    of all processes). The result holds this process's rows; the KV bytes are the whole
    batch's."""
    if opts.mode not in ("dense", "dynamic"):
        raise ValueError(f"mode must be 'dense' or 'dynamic', not {opts.mode!r}")
    check_attention(opts.attention)
    if opts.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    params = inference_params(params)
    rng = jax.random.PRNGKey(0) if rng is None else jnp.asarray(rng)
    # One key per sequence, so a sampled answer does not depend on its batch.
    keys = rng if rng.ndim == 2 else row_keys(rng, np.arange(batch.tokens.shape[0]))
    has_img = batch.image_start >= 0
    if pixels is None and has_img.any():
        raise ValueError("the batch has image markers but no pixels")
    tokens = batch.tokens
    # What the rows of every process share: the padded length, whether any / all have images.
    facts = [tokens.shape[1], int(has_img.any()), int(not has_img.all())]
    t, any_img, not_all = S.across_processes(facts) if mesh is not None else facts
    if t > tokens.shape[1]:
        tokens = np.pad(tokens, ((0, 0), (0, t - tokens.shape[1])), constant_values=cfg.pad_token_id)
    if not any_img:
        pixels = None
    elif pixels is None:  # images elsewhere in the global batch, none in this process's rows
        s = cfg.vision.image_size
        pixels = np.zeros((tokens.shape[0], 3, s, s), np.float32)
    if mesh is None:
        place, local = jnp.asarray, np.asarray
        temperature, top_p = jnp.float32(temperature), jnp.float32(top_p)
    else:
        place, local = (lambda x: S.to_global(x, mesh)), (lambda x: S.to_local(x, mesh))
        temperature, top_p = np.float32(temperature), np.float32(top_p)
        keys = np.asarray(keys)
    b = tokens.shape[0] if mesh is None else S.global_rows(tokens.shape[0], mesh)
    tokens, lengths, image_start = place(tokens), place(batch.lengths), place(batch.image_start)
    pixels = None if pixels is None else place(pixels)
    keys = place(keys)
    clen = _compacted_length(t, not not_all, cfg, opts)
    if opts.use_cache:
        logits, state = jit_prefill(params, tokens, lengths, image_start, pixels, cfg=cfg,
                                    opts=opts, compact_len=clen, mesh=mesh)
        out, stats, state = jit_decode(params, logits, state, keys, temperature, top_p,
                                       cfg=cfg, opts=opts, mesh=mesh)
        del state
        image_keep = local(stats["image_keep"])
        in_cache = local(stats["generated_in_cache"])
        evicted = local(stats["evicted"])
    else:
        out, image_keep, in_cache = _generate_no_cache(params, cfg, opts, t, clen, tokens, lengths,
                                                        image_start, pixels, keys, temperature,
                                                        top_p, place, local, batch.tokens.shape[0],
                                                        mesh)
        evicted = np.zeros((batch.tokens.shape[0],), bool)
    out = local(out)
    new_ids = []
    for row in out:
        ids = row.tolist()
        new_ids.append(ids[: ids.index(cfg.eos_token_id)] if cfg.eos_token_id in ids else ids)
    kept_idx = [np.nonzero(image_keep[i])[0].tolist() if has_img[i] else None
                for i in range(len(out))]
    kept = np.array([len(k) if k is not None else 0 for k in kept_idx])
    allocated, dense = kv_bytes(cfg, opts, b, t, clen)
    return GenResult(out, new_ids, kept, kept_idx, in_cache, allocated, dense, evicted)


def _generate_no_cache(params, cfg, opts, t, clen, tokens, lengths, image_start, pixels, keys,
                       temperature, top_p, place, local, b_local, mesh=None):
    """`place` puts this process's rows (`b_local` of them) of a new batch array on the
    devices, `local` reads them back (see `generate`)."""
    n = opts.max_new_tokens
    feats = (None if pixels is None else
             _jit_features(params, pixels, cfg=cfg, attention=opts.attention, mesh=mesh))
    seq = jnp.pad(tokens, ((0, 0), (0, n)), constant_values=cfg.pad_token_id)
    out = place(np.full((b_local, n), cfg.pad_token_id, np.int32))
    done = place(np.zeros((b_local,), bool))
    start = 0
    bucket = max(1, opts.no_cache_bucket)
    kept_max = clen  # an upper bound on the tokens kept so far by any sequence
    stats = {"kept": place(np.zeros((b_local,), np.int32)),
             "in_cache": place(np.zeros((b_local,), np.int32)),
             "image_keep": place(np.ones((b_local, cfg.num_image_tokens), bool))}
    while start < n:
        stop = min(n, (start // bucket + 1) * bucket)
        # At step i a sequence holds lengths + i tokens: the longest is t + stop - 1. It keeps
        # at most what it kept at the previous step plus one token per step, so dropped
        # generated tokens are not computed from layer l on (the length is bucketed so that
        # chunks share compiles).
        need = kept_max + (stop - start) if start else clen + stop
        compact = min(clen + stop, round_up(need, bucket))
        _bound_no_cache_programs((cfg, opts, seq.shape[0], t, stop, compact, feats is None, mesh))
        seq, out, done, stats = jit_no_cache(
            params, seq, lengths, image_start, feats, out, done, keys, stats, temperature, top_p,
            np.int32(start), np.int32(stop), cfg=cfg, opts=opts, full_len=t + stop,
            compact_len=compact, mesh=mesh)
        if bool(jnp.all(done)):
            break
        kept_max = int(jnp.max(stats["kept"]))
        start = stop
    return out, local(stats["image_keep"]), local(stats["in_cache"])


_no_cache_shapes: set = set()  # the shapes jit_no_cache holds compiled programs for
_said_no_cache_cap = [False]


def _bound_no_cache_programs(key) -> None:
    """Before compiling a new no-cache shape beyond MAX_NO_CACHE_PROGRAMS, drop the compiled
    ones, and say so once: later shapes compile again, but the process never runs out of
    memory mappings."""
    if key in _no_cache_shapes:
        return
    if len(_no_cache_shapes) >= MAX_NO_CACHE_PROGRAMS:
        jit_no_cache.clear_cache()
        _no_cache_shapes.clear()
        if not _said_no_cache_cap[0]:
            _said_no_cache_cap[0] = True
            logger.warning("no-KV-cache decoding compiled %d shapes; dropping them to bound "
                           "memory (later shapes compile again; a larger "
                           "GenOptions.no_cache_bucket makes fewer)", MAX_NO_CACHE_PROGRAMS)
    _no_cache_shapes.add(key)
