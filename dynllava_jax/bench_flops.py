"""`bench flops`: FLOPs and KV-cache bytes, dense vs dynamic, from shapes only.

    python -m dynllava_jax.bench flops --model llava-v1.5-7b [--output-tokens N]
        [--batch B] [--prompt-tokens P] [--json]

Nothing is allocated: the parameters are `jax.eval_shape` structs, and the jitted
functions of `generate.py` are lowered on abstract arguments; XLA's cost analysis of
the lowered program gives the measured FLOPs. XLA counts the body of a loop once, not
once per trip, so while lowering, the layer scans (`lax.scan` over stacked layers) are
fully unrolled; the decoding loops (`lax.while_loop`) stay, which makes the cost of a
no-cache chunk exactly one decoding step. Whole generations are summed over steps with
the analytic model of `flops.py`, checked against XLA at a few lengths.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import flops as F
from . import kv_cache
from .config import PRESETS, ModelConfig, preset
from .generate import (GenOptions, compacted_length, decode_step, kv_bytes,
                       no_cache_chunk, prefill)
from .inputs import IMAGE_MARKER, length_bucket, prepare_batch
from .model import image_features, init_params


# Figures of the paper (SPEC §6), for the table.
PAPER = {
    "llava-v1.5-7b": {"image_prefill_tflops": {"dense": 10.1, "dynamic": 2.5, "fastv": 3.2}},
    "llava-v1.5-13b": {
        "image_prefill_tflops": {"dense": 19.6, "dynamic": 4.7, "fastv": 6.0},
        "no_cache_seconds_batch8": {"1000": [1453, 838], "2000": [4117, 2382], "4000": [13368, 6184]},
        "gpu_memory_gb_with_cache_batch8": {"1000": [46, 35], "2000": [58, 42], "4000": [None, 56]},
    },
    "all": {"no_cache_generation_tflops_change": "-45 % to -51 % (answers of 150-1500 tokens)",
            "kv_cache_peak_memory_change": "-35 % to -50 %"},
}

DEFAULT_IMAGE_START = 35  # BOS + the vicuna_v1 system text + "USER: "


# -- XLA cost of a jitted function on abstract arguments -----------------------------

@contextlib.contextmanager
def unrolled_scans():
    """Make every `jax.lax.scan` traced inside fully unrolled, so XLA's cost analysis
    sees each layer (it counts a loop body once)."""
    orig = jax.lax.scan

    @functools.wraps(orig)
    def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
        return orig(f, init, xs, length, reverse=reverse, unroll=True, **kw)

    jax.lax.scan = scan
    try:
        yield
    finally:
        jax.lax.scan = orig


def xla_flops(fn: Callable, args: tuple, static: dict, loops: int = 0,
              compiled: bool = False) -> float:
    """FLOPs XLA counts for `jax.jit(fn)(*args, **static)` (args abstract).

    `loops`: the number of `while` loops the program must keep (their bodies are counted
    once); anything else means a layer loop escaped unrolling and the count is wrong."""
    # A fresh function object: no trace cached from an un-unrolled call can be reused.
    fresh = lambda *a, **k: fn(*a, **k)  # noqa: E731
    with unrolled_scans():
        lowered = jax.jit(fresh, static_argnames=tuple(static)).lower(*args, **static)
    found = count_float_loops(lowered.as_text())
    if found != loops:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}: {found} while loops in the lowered "
                           f"program, expected {loops}; XLA would count their bodies once")
    cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def count_float_loops(stablehlo: str) -> int:
    """`while` loops that carry floating-point arrays (the PRNG's integer loops are not
    counted: they hold no model compute)."""
    return sum(1 for line in stablehlo.splitlines()
               if "stablehlo.while(" in line and _FLOAT_TYPE.search(line))


_FLOAT_TYPE = re.compile(r"(x|<)(f16|bf16|f32|f64)>")


def abstract_params(cfg: ModelConfig):
    """The params pytree as ShapeDtypeStructs in the checkpoint's param dtype."""
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
    pdt = jnp.dtype(cfg.param_dtype)
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, pdt if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
        shapes)


# -- the benchmark -------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    cfg: ModelConfig
    model: str
    batch: int
    prompt: int          # expanded prompt tokens (image included)
    image_start: int
    new_tokens: int
    text_keep_rate: float
    text_kv_budget: float
    bucket: int          # no-cache length bucket of generate.py
    compiled: bool
    every_chunk: bool = False  # XLA-count every no-cache chunk (slow for long outputs)

    @property
    def n_img(self) -> int:
        return self.cfg.num_image_tokens

    @property
    def kept(self) -> int:
        return GenOptions(mode="dynamic").keep_k(self.cfg)

    @property
    def text(self) -> int:
        return self.prompt - self.n_img

    @property
    def prompt_after(self) -> int:
        return self.prompt - self.n_img + self.kept

    def opts(self, mode: str, **kw) -> GenOptions:
        return GenOptions(max_new_tokens=self.new_tokens, mode=mode, **kw)


class Progress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    @contextlib.contextmanager
    def step(self, what: str):
        t = time.time()
        if not self.quiet:
            print(f"[bench] {what} ...", end="", file=sys.stderr, flush=True)
        yield
        if not self.quiet:
            print(f" {time.time() - t:.1f} s", file=sys.stderr, flush=True)


def _change(dense: float, dynamic: float) -> Optional[float]:
    return None if not dense else dynamic / dense - 1.0


def run_flops(s: Setup, progress: Progress) -> dict[str, Any]:
    cfg, b = s.cfg, s.batch
    S = jax.ShapeDtypeStruct
    i32 = jnp.int32
    dt = jnp.dtype(cfg.dtype)
    with progress.step("abstract parameters (jax.eval_shape)"):
        params = abstract_params(cfg)
    px = S((b, 3, cfg.vision.image_size, cfg.vision.image_size), jnp.float32)
    vec = S((b,), i32)
    xla = functools.partial(xla_flops, compiled=s.compiled)
    how = "compiled" if s.compiled else "lowered"
    out: dict[str, Any] = {}
    timings: dict[str, float] = {}

    def measure(name, fn, args, static, loops=0):
        t = time.time()
        with progress.step(f"XLA cost ({how}) of {name}"):
            v = xla(fn, args, static, loops)
        timings[name] = round(time.time() - t, 2)
        return v

    # 1. prefill --------------------------------------------------------------------
    feats_fn = lambda p, x, cfg: image_features(p, cfg, x)  # noqa: E731
    vision_x = measure("vision tower + projector", feats_fn, (params, px), {"cfg": cfg})
    vision_a = b * (F.vision_tower(cfg) + F.projector(cfg))
    tok = S((b, s.prompt), i32)
    pre = {}
    for mode in ("dense", "dynamic"):
        o = s.opts(mode)
        clen = s.prompt - (s.n_img - o.keep_k(cfg))
        total = measure(f"prefill ({mode})", prefill, (params, tok, vec, vec, px),
                        {"cfg": cfg, "opts": o, "compact_len": clen})
        llm_a = b * F.prefill_llm(cfg, s.prompt, clen, predictor=o.prune_vision(cfg))
        pre[mode] = {"llm_xla": total - vision_x, "llm_analytic": llm_a,
                     "total_xla": total, "total_analytic": llm_a + vision_a,
                     "tokens_in_layers_lt_l": s.prompt, "tokens_in_layers_ge_l": clen}
    pre["dynamic"]["image_predictor_analytic"] = b * F.image_predictor(cfg)
    text_only = measure("prefill (text only, dense)", prefill,
                        (params, S((b, s.text), i32), vec, vec, None),
                        {"cfg": cfg, "opts": s.opts("dense"), "compact_len": s.text})
    out["prefill"] = {
        "vision_projector": {"xla": vision_x, "analytic": vision_a},
        **pre,
        "text_only_prompt_llm": {"xla": text_only, "analytic": b * F.prefill_llm(cfg, s.text, s.text, False)},
        "llm_change": _change(pre["dense"]["llm_xla"], pre["dynamic"]["llm_xla"]),
        "total_change": _change(pre["dense"]["total_xla"], pre["dynamic"]["total_xla"]),
    }

    # 2. the image tokens in the LLM prefill -------------------------------------------
    img = {}
    for mode, kept, pred in (("dense", s.n_img, False), ("dynamic", s.kept, True)):
        per_layer = F.image_tokens_per_layer(cfg, kept)
        img[mode] = {
            "paper_formula": b * F.paper_image_tokens(cfg, per_layer),
            "real_layer_image_only": b * F.real_image_tokens(cfg, per_layer),
            "marginal_analytic": b * F.marginal_image_tokens(cfg, s.text, kept, pred),
            "marginal_xla": pre[mode]["llm_xla"] - text_only,
        }
    out["image_tokens_prefill"] = {
        **img,
        "change": {k: _change(img["dense"][k], img["dynamic"][k]) for k in img["dense"]},
        "paper_reported_tflops": PAPER.get(s.model, {}).get("image_prefill_tflops"),
    }

    # 3. no-cache generation ------------------------------------------------------------
    n = s.new_tokens
    feats = S((b, s.n_img, cfg.llm.hidden_size), dt)
    scal_i, scal_f = S((), i32), S((), jnp.float32)

    def step_xla(name, mode, full, compact):
        o = dataclasses.replace(s.opts(mode, use_cache=False), no_cache_bucket=s.bucket)
        stats = {"kept": vec, "in_cache": vec, "image_keep": S((b, s.n_img), jnp.bool_)}
        args = (params, S((b, full), i32), vec, vec, feats, S((b, n), i32), S((b,), jnp.bool_),
                S((b, 2), jnp.uint32), stats, scal_f, scal_f, scal_i, scal_i)
        return measure(name, no_cache_chunk, args,
                       {"cfg": cfg, "opts": o, "full_len": full, "compact_len": compact}, loops=1)

    checks = []
    for i in sorted({0, n // 2, n - 1}):
        for mode in ("dense", "dynamic"):
            dyn = mode == "dynamic"
            full = s.prompt + i
            compact = s.prompt_after + F.kept_generated(i, s.text_keep_rate) if dyn else full
            x = step_xla(f"no-cache step {i} ({mode}, exact lengths)", mode, full, compact)
            a = b * F.no_cache_step(cfg, full, compact, dyn)
            checks.append({"kind": "exact", "mode": mode, "step": i, "full_len": full,
                           "compact_len": compact, "xla": x, "analytic": a, "rel_diff": x / a - 1})
    buckets = F.no_cache_buckets(s.prompt, s.prompt_after, n, s.bucket, s.text_keep_rate)
    for j in sorted({0, len(buckets) // 2, len(buckets) - 1}):
        _, full, compact = buckets[j]
        for mode in ("dense", "dynamic"):
            dyn = mode == "dynamic"
            c = compact if dyn else full
            x = step_xla(f"no-cache chunk {j} ({mode}, as compiled)", mode, full, c)
            a = b * F.no_cache_step(cfg, full, c, dyn)
            checks.append({"kind": "implemented", "mode": mode, "chunk": j, "full_len": full,
                           "compact_len": c, "xla": x, "analytic": a, "rel_diff": x / a - 1})
    gen = {}
    for mode in ("dense", "dynamic"):
        dyn = mode == "dynamic"
        ideal = b * F.no_cache_ideal(cfg, s.prompt, s.prompt_after, n, dyn, s.text_keep_rate)
        impl = b * F.no_cache_implemented(cfg, s.prompt, s.prompt_after if dyn else s.prompt, n,
                                          dyn, s.bucket, s.text_keep_rate if dyn else 1.0)
        gen[mode] = {"exact_lengths": ideal + vision_a, "as_implemented": impl + vision_a}
        if s.every_chunk:
            gen[mode]["as_implemented"] = vision_x + sum(
                steps * step_xla(f"no-cache chunk {j + 1}/{len(buckets)} ({mode}, as compiled)", mode,
                                 full, compact if dyn else full)
                for j, (steps, full, compact) in enumerate(buckets))
            gen[mode]["as_implemented_analytic"] = impl + vision_a
    out["no_cache_generation"] = {
        **gen,
        "change": {k: _change(gen["dense"][k], gen["dynamic"][k]) for k in gen["dense"]},
        "output_text_keep_rate_assumed": s.text_keep_rate,
        "bucket": s.bucket,
        "chunks": len(buckets),
        "xla_every_chunk": s.every_chunk,
        "checks": checks,
        "max_abs_rel_diff": max(abs(c["rel_diff"]) for c in checks),
    }

    # 4. KV cache -----------------------------------------------------------------------
    ids = [1] * s.image_start + [IMAGE_MARKER] + [1] * (s.text - s.image_start)
    padded = prepare_batch([ids] * b, s.n_img, cfg.pad_token_id,
                           pad_to=length_bucket(s.prompt))  # as infer.py pads (prompt_bucket)
    t_pad = padded.tokens.shape[1]
    l, L = F.sparse_layer(cfg), cfg.llm.num_layers
    alloc = {}
    for key, mode, budget in (("dense", "dense", 1.0), ("dynamic_budget_1.0", "dynamic", 1.0),
                              (f"dynamic_budget_{s.text_kv_budget:g}", "dynamic", s.text_kv_budget)):
        o = s.opts(mode, text_kv_budget=budget)
        alloc[key] = kv_bytes(cfg, o, b, t_pad, compacted_length(padded, cfg, o))[0]
    fed = n - 1  # tokens fed back after n new ones (the last is never fed)
    kept_gen = F.kept_generated(n, s.text_keep_rate) - 1  # of the fed ones, at the keep rate
    occ = {"dense": kv_cache.cache_bytes(L, b, s.prompt + fed, cfg, dt),
           "dynamic": kv_cache.cache_bytes(l, b, s.prompt + fed, cfg, dt)
           + kv_cache.cache_bytes(L - l, b, s.prompt_after + kept_gen, cfg, dt)}
    weights = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    out["kv_cache_bytes"] = {
        "dtype": str(dt), "prompt_padded_to": t_pad,
        "allocated": alloc,
        "allocated_change": {k: _change(alloc["dense"], v) for k, v in alloc.items() if k != "dense"},
        "occupied_after_generation": occ,
        "occupied_change": _change(occ["dense"], occ["dynamic"]),
        "generated_tokens_in_sparse_layers": kept_gen, "generated_tokens_fed": fed,
        "weights_bytes": weights,
    }

    # 5. one KV-cache decoding step (per token, caches at capacity) -----------------------
    step = {}
    for mode in ("dense", "dynamic"):
        o = s.opts(mode)
        clen = s.prompt - (s.n_img - o.keep_k(cfg))
        _, state = jax.eval_shape(functools.partial(prefill, cfg=cfg, opts=o, compact_len=clen),
                                  params, tok, vec, vec, px)
        x = measure(f"KV-cache decode step ({mode})", decode_step, (params, vec, state),
                    {"cfg": cfg, "opts": o})
        d_slots, s_slots = state.dense[0]["k"].shape[2], state.sparse[0]["k"].shape[2]
        a = b * F.decode_step(cfg, d_slots, s_slots, o.prune_text(cfg))
        step[mode] = {"xla": x, "analytic": a, "dense_slots": int(d_slots),
                      "sparse_slots": int(s_slots)}
    step["change"] = _change(step["dense"]["xla"], step["dynamic"]["xla"])
    out["kv_decode_step"] = step
    out["timings_s"] = timings
    return out


# -- output ----------------------------------------------------------------------------

def notes(r: dict) -> list[str]:
    s, g, kv = r["setup"], r["no_cache_generation"], r["kv_cache_bytes"]
    every = g.get("xla_every_chunk")
    return [
        "Measured by XLA: rows marked XLA (cost_analysis of the whole jitted function of "
        "generate.py on abstract arguments, layer scans unrolled). Analytic rows count matrix "
        "products only (flops.py); XLA adds norms, RoPE, softmax, activations: "
        f"+{100 * r['prefill']['dense']['llm_xla'] / r['prefill']['dense']['llm_analytic'] - 100:.2f} % "
        "on the dense LLM prefill here.",
        f"No-cache generation is extrapolated: the analytic per-step count summed over "
        f"{s['output_tokens']} steps; XLA counted single steps (a chunk's while body = one step) "
        f"at {len(g['checks'])} points, largest difference {100 * g['max_abs_rel_diff']:.2f} %"
        + ("; the 'as compiled' row is XLA summed over every chunk." if every else "."),
        "Generated tokens are assumed kept at the output-text keep rate "
        f"{g['output_text_keep_rate_assumed']:g} (the trained predictor's target); the real rate "
        "depends on the weights and the answer.",
        "Paper formula 32 N C^2 + 4 N^2 C per layer: 32 N C^2 = 2 FLOPs x 16 C^2 multiply-adds "
        "per token (q,k,v,o 4 C^2 + a 3-matrix MLP of width 4C, 12 C^2). LLaMA's MLP is "
        f"{s['intermediate_size']} = {s['intermediate_size'] / s['hidden_size']:.4g} C wide, so its "
        "layer is ~24.1 C^2 FLOPs per token, 0.75x the formula; 4 N^2 C is image-image attention "
        "only. The XLA row also holds image-text attention and the image predictor.",
        "'as compiled': generate.py's no-cache loop runs chunks of "
        f"{g['bucket']} steps on static lengths; layers >= l run on the tokens kept by the end "
        "of the previous chunk plus one slot per step, rounded up to the bucket, so dropped "
        "generated tokens are removed up to that bucket's slack (keep rate assumed as above).",
        f"FLOPs use the exact prompt ({s['prompt_tokens']} tokens); infer.py pads prompts to a "
        f"bucket of 64, 96, 128, 192, 256, ... tokens ({kv['prompt_padded_to']} here), which the KV 'allocated' "
        "rows include (generate.kv_bytes, as infer.py reports it; dynamic layers >= l hold "
        "prompt_after_pruning + ceil(N x budget) + 1 scratch slot).",
    ]


def _unit(v: float) -> tuple[float, str]:
    for scale, name in ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs")):
        if v >= scale:
            return scale, name
    return 1e6, "MFLOPs"


def format_table(r: dict) -> str:
    s = r["setup"]
    p, it, g, kv, ds = (r["prefill"], r["image_tokens_prefill"], r["no_cache_generation"],
                        r["kv_cache_bytes"], r["kv_decode_step"])
    scale, unit = _unit(p["dense"]["total_xla"])
    bscale, bunit = next((2.0**k, u) for k, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "bytes"))
                         if kv["allocated"]["dense"] >= 2.0**k or k == 0)

    def num(v):
        if v is None:
            return "-"
        v /= scale
        return f"{v:,.0f}" if v >= 1000 else f"{v:.3f}" if v >= 1 else f"{v:.4g}"

    pct = lambda v: "-" if v is None else f"{100 * v:+.1f} %"  # noqa: E731
    lines = [
        f"{s['model']}: batch {s['batch']}, prompt {s['prompt_tokens']} tokens "
        f"({s['text_tokens']} text + {s['image_tokens']} image at offset {s['image_start']}), "
        f"{s['output_tokens']} output tokens, {s['dtype']}",
        f"sparse layer l = {s['sparse_layer']} of {s['num_layers']}; image tokens "
        f"{s['image_tokens']} -> {s['image_tokens_kept']} (prompt {s['prompt_tokens']} -> "
        f"{s['prompt_after_pruning']} in layers >= l); XLA: {s['xla']} program, jax {s['jax']}",
        "",
        f"{unit + ', whole batch':58s}{'dense':>12s}{'dynamic':>12s}{'change':>10s}  source",
    ]

    def row(name, d, y, src="", chg="auto"):
        c = _change(d, y) if chg == "auto" else chg
        lines.append(f"{name:58s}{num(d):>12s}{num(y):>12s}{pct(c):>10s}  {src}")

    lines.append("1. prefill (KV-cache mode)")
    row("  vision tower + projector", p["vision_projector"]["xla"], p["vision_projector"]["xla"], "XLA")
    row("  LLM, image predictor included", p["dense"]["llm_xla"], p["dynamic"]["llm_xla"], "XLA")
    row("  LLM, image predictor included", p["dense"]["llm_analytic"], p["dynamic"]["llm_analytic"], "analytic")
    row("    of which the image predictor", None, p["dynamic"]["image_predictor_analytic"], "analytic", None)
    row("  total", p["dense"]["total_xla"], p["dynamic"]["total_xla"], "XLA")
    lines.append("2. image tokens in the LLM prefill")
    pr = it.get("paper_reported_tflops")
    if pr:
        bx = f" x {s['batch']}" if s["batch"] > 1 else ""
        # The dense and Dynamic-LLaVA columns are the paper's; FastV, its baseline, only in the note.
        row(f"  paper, reported{bx}", s["batch"] * pr["dense"] * 1e12,
            s["batch"] * pr["dynamic"] * 1e12, f"paper (its FastV baseline: {pr['fastv']} TFLOPs{bx})")
    row("  paper formula: sum over layers 32 N C^2 + 4 N^2 C", it["dense"]["paper_formula"],
        it["dynamic"]["paper_formula"], "analytic")
    row("  same with the real layer (MLP width, GQA)", it["dense"]["real_layer_image_only"],
        it["dynamic"]["real_layer_image_only"], "analytic")
    row("  + image-text attention + image predictor", it["dense"]["marginal_analytic"],
        it["dynamic"]["marginal_analytic"], "analytic")
    row("  LLM prefill minus that of the text-only prompt", it["dense"]["marginal_xla"],
        it["dynamic"]["marginal_xla"], "XLA")
    lines.append(f"3. no-cache generation of {s['output_tokens']} tokens, vision once, generated "
                 f"tokens kept at {g['output_text_keep_rate_assumed']:g} (assumed)")
    row("  exact lengths (what the method computes)", g["dense"]["exact_lengths"],
        g["dynamic"]["exact_lengths"], "analytic, XLA-checked")
    row(f"  as generate.py compiles it ({g['chunks']} chunks of {g['bucket']})",
        g["dense"]["as_implemented"], g["dynamic"]["as_implemented"],
        "XLA, every chunk" if g.get("xla_every_chunk") else "analytic, XLA-checked")
    row("  average per generated token (exact lengths)", g["dense"]["exact_lengths"] / s["output_tokens"],
        g["dynamic"]["exact_lengths"] / s["output_tokens"], "analytic")
    lines.append("4. one KV-cache decoding step (attends every slot of its caches)")
    row("  all layers + LM head", ds["dense"]["xla"], ds["dynamic"]["xla"], "XLA")
    lines.append(f"5. KV cache ({bunit})")
    b = lambda v: f"{v / bscale:,.2f}"  # noqa: E731
    a = kv["allocated"]
    for k, v in a.items():
        if k != "dense":
            name = f"  allocated, {k.replace('dynamic_', '').replace('_', ' ')}"
            lines.append(f"{name:58s}{b(a['dense']):>12s}{b(v):>12s}{pct(_change(a['dense'], v)):>10s}  generate.kv_bytes")
    o = kv["occupied_after_generation"]
    name = (f"  occupied after {s['output_tokens']} tokens ({kv['generated_tokens_in_sparse_layers']}"
            f" of {kv['generated_tokens_fed']} fed kept)")
    lines.append(f"{name:58s}{b(o['dense']):>12s}{b(o['dynamic']):>12s}{pct(kv['occupied_change']):>10s}  kv_cache.cache_bytes")
    lines.append(f"  (weights: {kv['weights_bytes'] / 2**30:.2f} GiB in {s['dtype']})")
    lines += ["", "Notes:"] + [f"- {n}" for n in r["notes"]]
    if s.get("warning"):
        lines += [f"- warning: {s['warning']}"]
    lines += [f"- {len(r['timings_s'])} XLA cost analyses; {r['elapsed_s']:.1f} s in all."]
    return "\n".join(lines)


# -- CLI ---------------------------------------------------------------------------------

def _load_model(name: str) -> ModelConfig:
    if name in PRESETS:
        return preset(name)
    p = Path(name)
    if (p / "model_config.json").is_file():
        return ModelConfig.load(p / "model_config.json")
    raise ValueError(f"--model: {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                     f"nor a converted checkpoint directory")


def add_arguments(f: argparse.ArgumentParser) -> None:
    """The options of `bench flops`."""
    f.add_argument("--model", default="llava-v1.5-7b", help="preset name or converted checkpoint dir")
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--prompt-tokens", type=int, default=641,
                   help="expanded prompt length, image tokens included (default 641 = 35 + 576 + 30)")
    f.add_argument("--image-start", type=int, default=DEFAULT_IMAGE_START,
                   help="text tokens before the image (default 35)")
    f.add_argument("--output-tokens", type=int, default=1000)
    f.add_argument("--text-keep-rate", type=float, default=None,
                   help="fraction of generated tokens the output-text predictor keeps (assumed; "
                        "default the checkpoint's output_text_keep_rate, 0.5)")
    f.add_argument("--text-kv-budget", type=float, default=0.5,
                   help="sparse-cache budget for generated tokens reported besides 1.0 (infer.py's default)")
    f.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute/param dtype (default bfloat16 for presets, the checkpoint's otherwise)")
    f.add_argument("--compiled", action="store_true",
                   help="cost of the compiled program (slower, backend-specific: the CPU backend "
                        "emulates bfloat16 with integer ops it counts as FLOPs) instead of the lowered one")
    f.add_argument("--xla-every-chunk", action="store_true",
                   help="XLA-count every chunk of the no-cache loop as compiled (about 0.3 s per chunk "
                        "and mode) instead of summing the XLA-checked analytic step count")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.add_argument("--quiet", action="store_true", help="no progress messages")


def build_setup(a) -> Setup:
    cfg = _load_model(a.model)
    dtype = a.dtype or ("bfloat16" if a.model in PRESETS else cfg.dtype)
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    n_img = cfg.num_image_tokens
    if a.batch < 1 or a.output_tokens < 1:
        raise ValueError("--batch and --output-tokens must be at least 1")
    if a.prompt_tokens < n_img + 1:
        raise ValueError(f"--prompt-tokens must exceed the {n_img} image tokens")
    if not 0 <= a.image_start <= a.prompt_tokens - n_img:
        raise ValueError(f"--image-start must be in [0, {a.prompt_tokens - n_img}]")
    rate = cfg.sparse.output_text_keep_rate if a.text_keep_rate is None else a.text_keep_rate
    if not 0.0 <= rate <= 1.0 or not 0.0 <= a.text_kv_budget <= 1.0:
        raise ValueError("--text-keep-rate and --text-kv-budget must be in [0, 1]")
    if not cfg.sparse.enabled:
        raise ValueError("the model has no predictors: there is no dynamic mode to compare")
    return Setup(cfg, a.model, a.batch, a.prompt_tokens, a.image_start, a.output_tokens, rate,
                 a.text_kv_budget, GenOptions().no_cache_bucket, a.compiled, a.xla_every_chunk)


def bench_flops(a) -> dict:
    s = build_setup(a)
    cfg = s.cfg
    t0 = time.time()
    res = run_flops(s, Progress(a.quiet))
    warnings = []
    if s.prompt + s.new_tokens > cfg.llm.max_position_embeddings:
        warnings.append(f"prompt + output = {s.prompt + s.new_tokens} exceeds the model's "
                        f"{cfg.llm.max_position_embeddings} positions: infer.py refuses it; counted anyway")
    if s.compiled and cfg.dtype == "bfloat16" and jax.default_backend() == "cpu":
        warnings.append("compiled on CPU in bfloat16: XLA:CPU rewrites bfloat16 arithmetic into "
                        "float32 plus conversion code that its cost analysis counts as FLOPs (a "
                        "constant ~0.2 TFLOPs per pass at 7B); the lowered count (default) or "
                        "--dtype float32 is the model's")
    warning = "; ".join(warnings) or None
    setup = {"model": s.model, "batch": s.batch, "prompt_tokens": s.prompt, "text_tokens": s.text,
             "image_tokens": s.n_img, "image_tokens_kept": s.kept, "image_start": s.image_start,
             "prompt_after_pruning": s.prompt_after, "output_tokens": s.new_tokens,
             "dtype": cfg.dtype, "sparse_layer": F.sparse_layer(cfg), "num_layers": cfg.llm.num_layers,
             "hidden_size": cfg.llm.hidden_size, "intermediate_size": cfg.llm.intermediate_size,
             "xla": "compiled" if s.compiled else "lowered", "jax": jax.__version__,
             "backend": jax.default_backend(), "warning": warning}
    r = {"setup": setup, **res, "paper": {**PAPER.get(s.model, {}), **PAPER["all"]},
         "elapsed_s": round(time.time() - t0, 2)}
    r["notes"] = notes(r)
    return r


def run(a) -> int:
    from .bench import report
    return report(a, bench_flops, format_table)
