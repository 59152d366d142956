"""TPU splash attention behind `attention.attention` (run here by Pallas's interpreter):
the same values as the einsum path for every visibility generation asks for (causal with
per-row lengths, full, grouped heads, lengths that are not whole blocks), chosen by "auto"
only on TPU inside a prompt pass and only where the kernel compiles, lowered for TPU
(`jax.export`, no TPU needed) as Mosaic kernels for 7B's prefill and on a mesh, and the
official fixture's tokens through `infer.py --attention splash`
(tests/test_official_fixture.py) and on a device mesh (tests/test_infer_sharded.py)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import attention as A


def _qkv(b, t, s, n, k, d, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, t, n, d)).astype(dtype),
            jax.random.normal(ks[1], (b, s, k, d)).astype(dtype),
            jax.random.normal(ks[2], (b, s, k, d)).astype(dtype))


@pytest.mark.parametrize("b,t,n,k,d,causal,lengths,dtype,tol", [
    (2, 200, 4, 2, 32, True, [200, 77], jnp.float32, 2e-6),   # prompts: causal, ragged, GQA
    (2, 130, 4, 4, 16, False, None, jnp.float32, 2e-6),       # vision tower / predictor: full
    (3, 256, 2, 1, 64, False, [256, 1, 129], jnp.float32, 2e-6),  # compacted rows, MQA
    (2, 200, 4, 2, 32, True, [200, 77], jnp.bfloat16, 3e-2),
])
def test_splash_equals_the_einsum_path(b, t, n, k, d, causal, lengths, dtype, tol):
    q, kk, v = _qkv(b, t, t, n, k, d, dtype)
    lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    want = A.attention(q, kk, v, causal=causal, kv_lengths_B=lens, implementation="xla")
    got = jax.jit(lambda q, kk, v: A.attention(q, kk, v, causal=causal, kv_lengths_B=lens,
                                               implementation="splash"))(q, kk, v)
    assert got.dtype == want.dtype and got.shape == want.shape
    # every row, padding rows included: they see the same keys as on the einsum path
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)


def _count_splash(monkeypatch):
    calls = []
    real = A._splash_local
    monkeypatch.setattr(A, "_splash_local", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_auto_picks_splash_only_on_tpu_inside_a_prompt_pass(monkeypatch):
    q, k, v = _qkv(1, 128, 128, 2, 2, 32, jnp.float32)
    calls = _count_splash(monkeypatch)
    f = lambda: A.attention(q, k, v, causal=True)
    want = A.attention(q, k, v, causal=True, implementation="xla")
    f()  # CPU, outside a prompt pass: XLA
    with A.prompt_attention("auto"):
        f()  # CPU: XLA
    assert calls == []
    monkeypatch.setattr(A, "_on_tpu", lambda: True)
    A._splash_compiles.cache_clear()
    f()  # "TPU", outside a prompt pass (training, scoring): XLA
    assert calls == []
    with A.prompt_attention("auto"):
        got = f()  # "TPU", prompt pass, the kernel compiles: splash
        A.attention(q[:, :1], k, v, kv_layout="bskd")  # one query (a decoding step): XLA
    assert len(calls) >= 1
    np.testing.assert_allclose(got, want, atol=2e-6)
    n = len(calls)
    with A.prompt_attention("xla"):
        f()  # forced off
    assert len(calls) == n


def test_auto_on_a_tpu_takes_splash_in_generation_with_the_same_tokens(monkeypatch):
    """The whole path as on a TPU (`_on_tpu` pretends; the kernel then runs interpreted):
    prefill's trace enters `prompt_attention`, each new shape is compiled once by the probe
    inside that trace, and the answers are those of the einsum path."""
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.inference import DEFAULT_CHECKPOINT, Llava, Request
    model = Llava(DEFAULT_CHECKPOINT)
    reqs = [Request("What is in the image?", "assets/images/portrait.png"), Request("Hi there")]
    # a max_new_tokens of its own: programs traced by other tests are not reused
    want = model.answer(reqs, GenOptions(max_new_tokens=5, attention="xla"))
    calls = _count_splash(monkeypatch)
    monkeypatch.setattr(A, "_on_tpu", lambda: True)
    A._splash_compiles.cache_clear()
    got = model.answer(reqs, GenOptions(max_new_tokens=5, attention="auto"))
    A._splash_compiles.cache_clear()
    assert [a["token_ids"] for a in got] == [a["token_ids"] for a in want]
    assert [a["kept_image_indices"] for a in got] == [a["kept_image_indices"] for a in want]
    # tower, predictor, LLM below and above the sparse layer: each probed, then run
    assert len(calls) >= 8, len(calls)


@pytest.mark.parametrize("mode,kernels", [("dense", 2), ("dynamic", 4)])
def test_7b_prefill_lowers_for_tpu_with_splash_kernels(monkeypatch, mode, kernels):
    """No TPU here, but `jax.export` lowers for one: LLaVA-1.5-7B's whole prefill in bf16
    (abstract weights), on a pretend TPU, lowers with the splash kernels as Mosaic TPU custom
    calls: the CLIP tower (head dim 64, 577 -> 640 tokens), the image predictor, and the LLM's
    32 layers on the prompt (and, dynamic, on its compacted length)."""
    import dataclasses
    from jax import export
    from dynllava_jax import generate as G, model as M
    from dynllava_jax.config import preset
    monkeypatch.setattr(A, "_on_tpu", lambda: True)
    monkeypatch.setattr(A, "_interpret", lambda: False)
    monkeypatch.setattr(A, "_splash_fits", lambda *a: True)  # its compile probe needs a TPU
    calls = _count_splash(monkeypatch)
    cfg = dataclasses.replace(preset("llava-v1.5-7b"), dtype="bfloat16", param_dtype="bfloat16")
    params = jax.eval_shape(lambda: G.inference_params(
        M.init_params(cfg, jax.random.PRNGKey(0), with_predictors=True)))
    b, t, px = 2, 640, cfg.vision.image_size
    sd = jax.ShapeDtypeStruct
    opts = G.GenOptions(mode=mode)
    exp = export.export(G.jit_prefill, platforms=["tpu"])(
        params, sd((b, t), jnp.int32), sd((b,), jnp.int32), sd((b,), jnp.int32),
        sd((b, 3, px, px), jnp.float32), cfg=cfg, opts=opts,
        compact_len=G._compacted_length(t, True, cfg, opts))
    text = exp.mlir_module()
    assert text.count("tpu_custom_call") == kernels  # one per distinct shape (a called function)
    # the tower is one scanned layer; the LLM's 32 layers each call it
    assert len(calls) == 1 + 32 + (cfg.sparse.num_layers if mode == "dynamic" else 0)


def test_splash_lowers_for_a_tpu_mesh_in_shard_map(monkeypatch):
    """On an (abstract) TPU mesh data=2 x tensor=4, 7B-shaped prompt attention lowers to the
    Mosaic kernel inside shard_map, each device holding its 4 rows and 8 of the 32 heads."""
    import re
    from jax import export
    from jax.sharding import AbstractMesh
    monkeypatch.setattr(A, "_interpret", lambda: False)
    mesh = AbstractMesh((2, 1, 4), ("data", "fsdp", "tensor"))
    sd = jax.ShapeDtypeStruct
    x = sd((8, 640, 32, 128), jnp.bfloat16)
    text = export.export(jax.jit(lambda q, k, v, L: A._splash_attention(q, k, v, True, L, mesh)),
                         platforms=["tpu"])(x, x, x, sd((8,), jnp.int32)).mlir_module()
    assert text.count("tpu_custom_call") == 1
    shapes = set(re.findall(r"tensor<(\d+x\d+)x640x128xbf16>", text))
    assert shapes == {"4x8", "8x32"}, shapes  # per device [rows, heads]; the global [B, N]


def test_a_shape_splash_cannot_compile_falls_back_to_xla(monkeypatch, caplog):
    q, k, v = _qkv(1, 136, 136, 2, 2, 32, jnp.float32)
    monkeypatch.setattr(A, "_on_tpu", lambda: True)

    def refuse(*a, **kw):
        raise NotImplementedError("block layout not supported")

    monkeypatch.setattr(A, "_splash_kernel", refuse)
    A._splash_compiles.cache_clear()
    with caplog.at_level(logging.WARNING, logger=A.__name__), A.prompt_attention("auto"):
        got = A.attention(q, k, v, causal=True)
    A._splash_compiles.cache_clear()
    np.testing.assert_allclose(got, A.attention(q, k, v, causal=True, implementation="xla"))
    assert "splash attention does not compile" in caplog.text
    assert "block layout not supported" in caplog.text


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        with A.prompt_attention("flash"):
            pass


def test_generate_refuses_an_attention_it_cannot_run():
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.inference import DEFAULT_CHECKPOINT, Llava, Request
    model = Llava(DEFAULT_CHECKPOINT)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        model.answer([Request("Hi")], GenOptions(attention="flash"))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="attention 'cudnn' needs an NVIDIA GPU; this backend is"):
            model.answer([Request("Hi")], GenOptions(attention="cudnn"))
