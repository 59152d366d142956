"""`python -m dynllava_jax.bench flops`: XLA counts from shapes only vs the analytic model."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from dynllava_jax import bench, bench_flops, flops as F
from dynllava_jax.config import preset
from dynllava_jax.generate import GenOptions, kv_bytes, prefill

REPO = Path(__file__).resolve().parents[1]
S = jax.ShapeDtypeStruct


def _prefill_flops(cfg, mode, t=100, b=1, with_image=True):
    params = bench_flops.abstract_params(cfg)
    o = GenOptions(max_new_tokens=8, mode=mode)
    n_img = cfg.num_image_tokens
    clen = t - (n_img - o.keep_k(cfg)) if with_image else t
    px = S((b, 3, cfg.vision.image_size, cfg.vision.image_size), jnp.float32) if with_image else None
    vec = S((b,), jnp.int32)
    x = bench_flops.xla_flops(prefill, (params, S((b, t), jnp.int32), vec, vec, px),
                        {"cfg": cfg, "opts": o, "compact_len": clen})
    a = b * F.prefill_llm(cfg, t, clen, predictor=with_image and o.prune_vision(cfg))
    if with_image:
        a += b * (F.vision_tower(cfg) + F.projector(cfg))
    return x, a


def test_unrolled_scan_counts_every_layer_and_loops_are_refused():
    w = S((4, 32, 32), jnp.float32)
    x = S((8, 32), jnp.float32)

    def stack(w, x):
        return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]

    assert bench_flops.xla_flops(stack, (w, x), {}) == pytest.approx(4 * 2 * 8 * 32 * 32, rel=0.01)

    def loop(w, x):
        return jax.lax.fori_loop(0, jnp.int32(w.shape[0]), lambda i, h: h @ w[i], x)

    with pytest.raises(RuntimeError, match="while loops"):
        bench_flops.xla_flops(loop, (w, x), {})


@pytest.mark.parametrize("mode", ["dense", "dynamic"])
def test_tiny_prefill_xla_matches_analytic(mode):
    x, a = _prefill_flops(preset("tiny"), mode)
    # The analytic count is matrix products only; at hidden 96 XLA's elementwise ops
    # (norms, softmax, activations, predictor LayerNorms) add a few %.
    assert 0.0 <= x / a - 1 < 0.08, (x, a)


def test_wide_prefill_xla_matches_analytic_closely():
    """With a realistic head dim and width the elementwise share vanishes."""
    cfg = preset("tiny")
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, hidden_size=512, num_heads=8, num_kv_heads=8,
                                              intermediate_size=1376))
    for mode in ("dense", "dynamic"):
        x, a = _prefill_flops(cfg, mode, b=2)
        assert 0.0 <= x / a - 1 < 0.02, (mode, x, a)


def test_dynamic_prefill_and_text_only():
    cfg = preset("tiny")
    dense, _ = _prefill_flops(cfg, "dense")
    dynamic, _ = _prefill_flops(cfg, "dynamic")
    text, text_a = _prefill_flops(cfg, "dense", t=100 - cfg.num_image_tokens, with_image=False)
    assert dynamic < dense
    assert text < dynamic
    assert text / text_a - 1 < 0.08


def test_kv_bytes_dynamic_below_dense():
    cfg = preset("tiny")
    from dynllava_jax.inputs import IMAGE_MARKER, prepare_batch
    from dynllava_jax.generate import compacted_length
    batch = prepare_batch([[1] * 10 + [IMAGE_MARKER] + [1] * 20] * 2, cfg.num_image_tokens, pad_to=128)
    for budget in (1.0, 0.5):
        o = GenOptions(max_new_tokens=64, mode="dynamic", text_kv_budget=budget)
        alloc, dense = kv_bytes(cfg, o, 2, 128, compacted_length(batch, cfg, o))
        assert alloc < dense


def test_paper_formula_reproduces_the_paper():
    for name, (d, y) in {"llava-v1.5-7b": (10.1, 2.5), "llava-v1.5-13b": (19.6, 4.7)}.items():
        cfg = preset(name)
        kept = int(cfg.num_image_tokens * cfg.sparse.vision_keep_rate)
        dense = F.paper_image_tokens(cfg, F.image_tokens_per_layer(cfg, cfg.num_image_tokens))
        dyn = F.paper_image_tokens(cfg, F.image_tokens_per_layer(cfg, kept))
        assert round(dense / 1e12, 1) == d and round(dyn / 1e12, 1) == y


def test_no_cache_buckets_follow_generate():
    # generate._generate_no_cache: chunks end at multiples of the bucket, the last at n.
    assert F.no_cache_buckets(100, 40, 70, 32) == [(32, 132, 72), (32, 164, 104), (6, 170, 110)]
    assert F.kept_generated(0, 0.5) == 0 and F.kept_generated(1, 0.5) == 1
    assert F.kept_generated(11, 0.5) == 6


def test_cli_json_tiny():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "dynllava_jax.bench", "flops", "--model", "tiny", "--prompt-tokens",
           "100", "--image-start", "10", "--output-tokens", "40", "--batch", "2", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert "[bench]" in p.stderr  # progress goes to stderr
    assert r["setup"]["batch"] == 2 and r["setup"]["image_tokens_kept"] == 12
    pre = r["prefill"]
    assert pre["dynamic"]["llm_xla"] < pre["dense"]["llm_xla"]
    assert 0 <= pre["dense"]["llm_xla"] / pre["dense"]["llm_analytic"] - 1 < 0.08
    g = r["no_cache_generation"]
    assert g["max_abs_rel_diff"] < 0.08
    for kind in ("exact_lengths", "as_implemented"):
        assert g["dynamic"][kind] < g["dense"][kind]
    kv = r["kv_cache_bytes"]
    assert all(v < kv["allocated"]["dense"] for k, v in kv["allocated"].items() if k != "dense")
    assert kv["occupied_after_generation"]["dynamic"] < kv["occupied_after_generation"]["dense"]
    it = r["image_tokens_prefill"]
    assert it["dynamic"]["marginal_xla"] < it["dense"]["marginal_xla"]


def test_cli_bad_flags():
    assert bench.main(["flops", "--model", "tiny", "--prompt-tokens", "10", "--quiet"]) == 2
    assert bench.main(["flops", "--model", "nope", "--quiet"]) == 2


def test_bench_speed_tiny_reports_times_bytes_and_the_bandwidth_bound():
    """`bench speed` in process on the tiny preset: per mode a time per token, XLA's bytes per
    step against the minimum, and that minimum as a time at the measured streaming rate."""
    import argparse
    from dynllava_jax import bench_speed as BS
    p = argparse.ArgumentParser()
    BS.add_arguments(p)
    a = p.parse_args(["--model", "tiny", "--batch", "2", "--new-tokens", "4", "--repeats", "1",
                      "--text-tokens", "8", "--json", "--quiet"])
    r = BS.bench_speed(a)
    bw = r["setup"]["stream_bytes_per_s"]
    assert bw > 1e8
    (row,) = r["batches"]
    for mode in ("dense", "dynamic"):
        d, sb = row[mode], row[mode]["decode_step_bytes"]
        assert d["decode_ms_per_token"] > 0 and sb["minimum"] > 0
        assert sb["bound_ms"] == pytest.approx(1e3 * sb["minimum"] / bw)
        assert sb["decode_over_bound"] == pytest.approx(d["decode_ms_per_token"] / sb["bound_ms"])
        assert d["prefill_flops"] > 0
    assert row["dynamic_vs_dense"]["prefill_flops"] == pytest.approx(
        row["dynamic"]["prefill_flops"] / row["dense"]["prefill_flops"])
    assert row["dynamic_vs_dense"]["prefill_flops"] < 1  # image tokens pruned after layer 2
    assert "GB/s streaming" in BS.format_table(r)
