"""The decode loop moves only what it must: one slot written per layer and step, donated
state updated in place, visibility a pure per-row length; tokens unchanged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax.checkpoint import load_converted
from dynllava_jax.config import LLMConfig, ModelConfig, VisionConfig
from dynllava_jax.generate import (GenOptions, compacted_length, decode_step, inference_params,
                                   jit_decode, jit_prefill)
from dynllava_jax.inference import DEFAULT_CHECKPOINT
from dynllava_jax.inputs import prepare_batch
from dynllava_jax.model import init_params
from dynllava_jax.sampling import row_keys

N_NEW = 10


@pytest.fixture(scope="module")
def setup():
    cfg, params = load_converted(DEFAULT_CHECKPOINT)
    cfg = cfg.replace(eos_token_id=-1)  # no early stop: the Python loop below runs every step
    params = inference_params(jax.tree_util.tree_map(jnp.asarray, params))
    rng = np.random.default_rng(3)
    v = cfg.llm.vocab_size
    prompts = [[1] + rng.integers(3, v, 6).tolist() + [-200] + rng.integers(3, v, 9).tolist(),
               [1] + rng.integers(3, v, 30).tolist(),
               [1] + rng.integers(3, v, 12).tolist() + [-200] + rng.integers(3, v, 2).tolist()]
    s = cfg.vision.image_size
    pixels = rng.normal(size=(3, 3, s, s)).astype(np.float32)
    batch = prepare_batch(prompts, cfg.num_image_tokens, pad_to=128)
    return cfg, params, batch, pixels


def _prefill(cfg, params, batch, pixels, opts):
    args = (jnp.asarray(batch.tokens), jnp.asarray(batch.lengths), jnp.asarray(batch.image_start),
            jnp.asarray(pixels))
    return jit_prefill(params, *args, cfg=cfg, opts=opts,
                       compact_len=compacted_length(batch, cfg, opts))


@pytest.mark.parametrize("budget", [1.0, 0.3])
def test_donated_loop_equals_python_steps(setup, budget):
    """The in-place `while_loop` (state donated) gives the tokens and cache lengths of a
    Python loop over a functional `decode_step`; the donated input caches are consumed."""
    cfg, params, batch, pixels = setup
    opts = GenOptions(max_new_tokens=N_NEW, mode="dynamic", text_kv_budget=budget)
    keys = row_keys(jax.random.PRNGKey(0), np.arange(3))
    logits, state = _prefill(cfg, params, batch, pixels, opts)
    out, stats, final = jit_decode(params, logits, state, keys, jnp.float32(1), jnp.float32(1),
                                   cfg=cfg, opts=opts)
    assert state.dense[0]["k"].is_deleted() and state.sparse[-1]["v"].is_deleted()

    logits, ref = _prefill(cfg, params, batch, pixels, opts)
    step = jax.jit(functools.partial(decode_step, cfg=cfg, opts=opts))
    toks = [np.asarray(jnp.argmax(logits, -1))]
    for _ in range(N_NEW - 1):
        logits, ref = step(params, jnp.asarray(toks[-1], jnp.int32), ref)
        toks.append(np.asarray(jnp.argmax(logits, -1)))
    np.testing.assert_array_equal(np.asarray(out), np.stack(toks, 1))
    np.testing.assert_array_equal(np.asarray(final.sparse_len), np.asarray(ref.sparse_len))
    np.testing.assert_array_equal(np.asarray(final.dense_len), np.asarray(ref.dense_len))
    assert int(jnp.max(final.sparse_len - final.sparse_limit)) <= 0


def test_step_writes_one_slot_per_layer_at_the_row_length(setup):
    cfg, params, batch, pixels = setup
    opts = GenOptions(max_new_tokens=N_NEW, mode="dynamic")
    _, state = _prefill(cfg, params, batch, pixels, opts)
    tok = jnp.asarray([5, 6, 7], jnp.int32)
    _, new = jax.jit(functools.partial(decode_step, cfg=cfg, opts=opts))(params, tok, state)
    for group, slot in (("dense", state.dense_len), ("sparse", state.sparse_len)):
        for before, after in zip(getattr(state, group), getattr(new, group)):
            for name in ("k", "v"):
                changed = np.any(np.asarray(before[name]) != np.asarray(after[name]), axis=(1, 3))  # [B, S]
                for b in range(3):
                    # Budget 1.0: every token (kept or dropped) is written at the row's length.
                    assert np.nonzero(changed[b])[0].tolist() == [int(slot[b])], (group, name, b)


def test_decode_step_bytes_near_minimum():
    """XLA's cost analysis of one decoding step at batch 4: within 1.3x of the weights the
    step must read plus its cache slots (no copy of a weight or a cache)."""
    cfg = ModelConfig(vision=VisionConfig(image_size=56, patch_size=14, hidden_size=32, num_layers=1,
                                          num_heads=2, intermediate_size=64),
                      llm=LLMConfig(vocab_size=4000, hidden_size=256, num_layers=4, num_heads=4,
                                    num_kv_heads=4, intermediate_size=768, max_position_embeddings=512))
    params = inference_params(init_params(cfg, jax.random.PRNGKey(0)))
    b, t = 4, 64
    batch = prepare_batch([[1] * 20 + [-200] + [1] * 20] * b, cfg.num_image_tokens, pad_to=t)
    pixels = np.zeros((b, 3, 56, 56), np.float32)
    for mode in ("dense", "dynamic"):
        opts = GenOptions(max_new_tokens=64, mode=mode)
        _, state = _prefill(cfg, params, batch, pixels, opts)
        step = jax.jit(functools.partial(decode_step, cfg=cfg, opts=opts), donate_argnums=(2,))
        cost = step.lower(params, jnp.zeros((b,), jnp.int32), state).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
        weights = nbytes(params["llm"]["layers"]) + nbytes(params["llm"]["lm_head"])
        if opts.prune_text(cfg):
            weights += nbytes(params["text_predictor"])
        caches = nbytes(state.dense) + nbytes(state.sparse)  # an upper bound on the slots read
        assert cost["bytes accessed"] < 1.3 * (weights + caches), mode


def test_text_only_prefill_skips_the_image_predictor(setup):
    """A batch without pixels never runs the image predictor (its [B, heads, N, N] scores
    over placeholder tokens were a text-only prefill's largest buffer): the compiled
    dynamic prefill then needs no more scratch memory than the dense one."""
    cfg, params, _, _ = setup
    batch = prepare_batch([[1, 5, 9, 11], [1, 7]], cfg.num_image_tokens, pad_to=64)
    args = (jnp.asarray(batch.tokens), jnp.asarray(batch.lengths), jnp.asarray(batch.image_start))

    def lowered(mode, pixels):
        opts = GenOptions(max_new_tokens=4, mode=mode)
        return jit_prefill.lower(params, *args, pixels, cfg=cfg, opts=opts,
                                 compact_len=compacted_length(batch, cfg, opts))

    s = cfg.vision.image_size
    with_image = lowered("dynamic", jnp.zeros((2, 3, s, s), jnp.float32)).compile().as_text()
    assert "/ImagePredictor/" in with_image  # the op name the check below looks for
    dyn = lowered("dynamic", None).compile()
    assert "/ImagePredictor/" not in dyn.as_text()
    dense = lowered("dense", None).compile()
    assert dyn.memory_analysis().temp_size_in_bytes <= dense.memory_analysis().temp_size_in_bytes


def test_decoding_compiles_with_the_backends_decode_options(setup, monkeypatch, caplog):
    """On CPU the decoding loop is compiled without XLA's YNNPACK dot fusions (slower on a
    step's few-row matmuls), the prefill with them; an option this XLA lacks is dropped with
    a warning, and decoding still runs."""
    from dynllava_jax import generate as G
    cfg, params, batch, pixels = setup
    opts = GenOptions(max_new_tokens=3, mode="dynamic")
    keys = row_keys(jax.random.PRNGKey(0), np.arange(3))
    logits, state = _prefill(cfg, params, batch, pixels, opts)
    args = (params, logits, state, keys, jnp.float32(1), jnp.float32(1))
    decode_hlo = jit_decode.lower(*args, cfg=cfg, opts=opts).compile().as_text()
    prefill_hlo = jit_prefill.lower(
        params, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths), jnp.asarray(batch.image_start),
        jnp.asarray(pixels), cfg=cfg, opts=opts,
        compact_len=compacted_length(batch, cfg, opts)).compile().as_text()
    if "__ynn_fusion" not in prefill_hlo:
        pytest.skip("this XLA forms no YNNPACK fusions by default: nothing to switch off")
    assert "__ynn_fusion" not in decode_hlo
    want, _, _ = jit_decode(*args, cfg=cfg, opts=opts)

    monkeypatch.setitem(G.DECODE_COMPILER_OPTIONS, "cpu", {"xla_cpu_no_such_option": ""})
    fresh = G.DecodeJit(G.decode_loop, static_argnames=("cfg", "opts", "mesh"),
                        donate_argnames=("state",))
    logits, state = _prefill(cfg, params, batch, pixels, opts)
    with caplog.at_level("WARNING"):
        got, _, _ = fresh(params, logits, state, keys, jnp.float32(1), jnp.float32(1), cfg=cfg, opts=opts)
    assert "xla_cpu_no_such_option" in caplog.text
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the same fallback through .lower().compile() (what `bench speed` uses)
    fresh = G.DecodeJit(G.decode_loop, static_argnames=("cfg", "opts", "mesh"),
                        donate_argnames=("state",))
    logits, state = _prefill(cfg, params, batch, pixels, opts)
    caplog.clear()
    with caplog.at_level("WARNING"):
        compiled = fresh.lower(params, logits, state, keys, jnp.float32(1), jnp.float32(1),
                               cfg=cfg, opts=opts).compile()
    assert "xla_cpu_no_such_option" in caplog.text
    got, _, _ = compiled(params, logits, state, keys, jnp.float32(1), jnp.float32(1))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
