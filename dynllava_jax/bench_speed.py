"""`bench speed`: wall-clock prefill and decoding, memory, and bytes moved per decoding step,
dense vs dynamic, on the local backend with random weights (decisions are then those of
random predictors: the image keep count is fixed by the keep rate, the text keep rate is
whatever the random predictor decides and is reported).

    python -m dynllava_jax.bench speed --model cpu-small --batch 1 4 --vs-torch
    python -m dynllava_jax.bench speed --model llava-v1.5-7b --dtype bfloat16 --batch 1 8 --vs-torch
    python -m dynllava_jax.bench speed --model cpu-mem --batch 8 --text-only --new-tokens 512 --memory

Per batch size and implementation: prefill ms (vision tower included), decoding ms per
token (the compiled `lax.while_loop`, EOS disabled so every run makes `--new-tokens`),
whole generation and answers/s. `--vs-torch` runs transformers' PyTorch
`LlavaForConditionalGeneration` with the same shapes and dtype in the same process,
interleaved with ours, medians of `--repeats` runs (dense only: transformers has no
predictors). Bytes per decoding step: XLA's cost analysis of one compiled step against
the minimum a step must move (every weight it uses once, the KV slots its rows hold at
mid-generation, one slot written per layer), and that minimum in milliseconds at the device's
streaming rate (`stream_bandwidth`): the time a memory-bound step cannot beat; and the
prefill's FLOPs (XLA's cost analysis, layer scans unrolled), so that dynamic/dense prefill
time can be read against dynamic/dense compute. `--memory`:
peak growth of the process (resident memory on CPU, the device's peak bytes elsewhere) during
one whole generation, against the KV bytes `infer.py --json` reports as allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .attention import IMPLEMENTATIONS
from .config import PRESETS, LLMConfig, ModelConfig, SparseConfig, VisionConfig, preset
from .generate import (DecodeJit, GenOptions, compacted_length, decode_step, generate,
                       inference_params, jit_decode, jit_prefill, kv_bytes, prefill)
from .inputs import IMAGE_MARKER, Batch, length_bucket, prepare_batch
from .model import init_params
from .sampling import row_keys

# Shapes for CPU runs. cpu-small: the LLM of the issue's CPU table (6 x 768, 12 heads, MLP
# 2048, LLaMA vocabulary) with a small CLIP tower at 336 px (576 image tokens).
SPEED_PRESETS = {
    "cpu-small": ModelConfig(
        vision=VisionConfig(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=1024),
        llm=LLMConfig(hidden_size=768, num_layers=6, num_heads=12, num_kv_heads=12,
                      intermediate_size=2048)),
    "cpu-mem": ModelConfig(
        vision=VisionConfig(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=1024),
        llm=LLMConfig(hidden_size=1024, num_layers=4, num_heads=16, num_kv_heads=16,
                      intermediate_size=2816)),
}
IMAGE_START = 35  # BOS + the vicuna_v1 system text + "USER: "


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cpu-small",
                   help=f"a preset ({', '.join(sorted({**PRESETS, **SPEED_PRESETS}))}) or a converted "
                        "checkpoint directory (its shapes; weights are random)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    p.add_argument("--text-tokens", type=int, default=55, help="text tokens per prompt (default 55)")
    p.add_argument("--text-only", action="store_true", help="prompts without an image")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer (default 32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute and param dtype (default float32 for CPU presets, bfloat16 otherwise)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; default 3)")
    p.add_argument("--modes", nargs="+", choices=["dense", "dynamic"], default=["dense", "dynamic"])
    p.add_argument("--vs-torch", action="store_true",
                   help="also time transformers' PyTorch LLaVA (dense) with the same shapes, interleaved")
    p.add_argument("--no-cache", action="store_true",
                   help="also time whole generations without a KV cache (slow: a prompt pass per token)")
    p.add_argument("--memory", action="store_true",
                   help="measure the process's peak memory growth during one whole generation")
    p.add_argument("--no-bytes", action="store_true",
                   help="skip the cost analyses (prefill FLOPs, bytes per decoding step)")
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto",
                   help="prompt-pass attention (as infer.py --attention)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def _log(a, msg: str) -> None:
    if not a.quiet:
        print(f"[bench speed] {msg}", file=sys.stderr, flush=True)


def model_config(name: str, dtype: Optional[str]) -> ModelConfig:
    if name in SPEED_PRESETS:
        cfg, default = SPEED_PRESETS[name], "float32"
    elif name in PRESETS:
        cfg, default = preset(name), "bfloat16"
    elif (Path(name) / "model_config.json").is_file():
        cfg = ModelConfig.load(Path(name) / "model_config.json")
        default = cfg.dtype
    else:
        raise ValueError(f"--model: {name!r} is neither a preset nor a converted checkpoint directory")
    if not cfg.sparse.enabled:
        cfg = cfg.replace(sparse=SparseConfig())
    dt = dtype or default
    # EOS never matches a sampled id: every run generates exactly --new-tokens.
    return cfg.replace(dtype=dt, param_dtype=dt, eos_token_id=-1)


def random_params(cfg: ModelConfig, seed: int):
    """Random params in the param dtype, unstacked for generation (as `Llava` holds them)."""
    pdt = jnp.dtype(cfg.param_dtype)

    @jax.jit
    def make(key):
        p = init_params(cfg, key, with_predictors=True)
        return jax.tree_util.tree_map(lambda x: x.astype(pdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, p)
    return inference_params(make(jax.random.PRNGKey(seed)))


def make_inputs(cfg: ModelConfig, b: int, text_tokens: int, with_image: bool, seed: int,
                new_tokens: int = 0):
    rng = np.random.default_rng(seed)
    v = cfg.llm.vocab_size
    prompts = []
    for _ in range(b):
        ids = [1] + rng.integers(3, v, text_tokens - 1).tolist()
        if with_image:
            cut = min(IMAGE_START, len(ids))
            ids = ids[:cut] + [IMAGE_MARKER] + ids[cut:]
        prompts.append(ids)
    n_img = cfg.num_image_tokens
    length = text_tokens + (n_img if with_image else 0)
    # Padded as infer.py pads them (`inference.prompt_bucket`): the shapes a user's run compiles.
    pad_to = length_bucket(length, cfg.llm.max_position_embeddings - new_tokens)
    batch = prepare_batch(prompts, n_img, cfg.pad_token_id, pad_to=pad_to)
    s = cfg.vision.image_size
    pixels = rng.normal(size=(b, 3, s, s)).astype(np.float32) if with_image else None
    return prompts, batch, pixels


def stream_bandwidth(mib: int = 256, repeats: int = 20) -> float:
    """Bytes per second the default device reads when streaming: the best of `repeats` jitted
    sums over `mib` MiB of float32 (every byte read once). With it, a decoding step's minimum
    bytes give its lower bound in time: a memory-bound step cannot be faster."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return mib * 2**20 / best


def _block(tree):
    jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
    return tree


class Ours:
    """Timed prefill and decoding of one (batch, mode), the jitted functions generate() runs."""

    def __init__(self, params, cfg, batch: Batch, pixels, opts: GenOptions):
        self.params, self.cfg, self.opts = params, cfg, opts
        self.args = (jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
                     jnp.asarray(batch.image_start), None if pixels is None else jnp.asarray(pixels))
        self.clen = compacted_length(batch, cfg, opts)
        self.keys = row_keys(jax.random.PRNGKey(0), np.arange(batch.tokens.shape[0]))
        self.b, self.t = batch.tokens.shape

    def prefill(self):
        return _block(jit_prefill(self.params, *self.args, cfg=self.cfg, opts=self.opts,
                                  compact_len=self.clen))

    def decode(self, logits, state):
        return _block(jit_decode(self.params, logits, state, self.keys, jnp.float32(1.0),
                                 jnp.float32(1.0), cfg=self.cfg, opts=self.opts))

    def run(self) -> dict:
        t0 = time.perf_counter()
        logits, state = self.prefill()
        t1 = time.perf_counter()
        start = (np.asarray(state.dense_len), np.asarray(state.sparse_len))
        out, stats, state = self.decode(logits, state)
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "start": start,
                "end": (np.asarray(state.dense_len), np.asarray(state.sparse_len)),
                "in_cache": np.asarray(stats["generated_in_cache"]), "tokens": np.asarray(out)}

    def prefill_flops(self) -> float:
        """XLA's FLOPs of the prefill (layer scans unrolled: cost analysis counts a loop
        body once), to compare the prefill's time ratio with its compute ratio."""
        from .bench_flops import xla_flops
        abstract = lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)
        args = jax.tree_util.tree_map(abstract, (self.params, *self.args))
        return xla_flops(prefill, args, {"cfg": self.cfg, "opts": self.opts, "compact_len": self.clen})

    def step_bytes(self, run: dict) -> dict:
        """XLA's bytes accessed by one compiled decoding step vs the minimum it must move."""
        cfg, b = self.cfg, self.b
        logits, state = self.prefill()
        # Compiled as `decode_loop` is (DecodeJit: the backend's decoding options).
        step = DecodeJit(functools.partial(decode_step, cfg=cfg, opts=self.opts), donate_argnums=(2,))
        tok = jnp.zeros((b,), jnp.int32)
        compiled = step.lower(self.params, tok, state).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla = float(cost["bytes accessed"])
        item = jnp.dtype(cfg.dtype).itemsize
        p = self.params
        nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize
                                  for x in jax.tree_util.tree_leaves(tree))
        weights = (nbytes(p["llm"]["layers"]) + nbytes(p["llm"]["lm_head"]) + nbytes(p["llm"]["norm"])
                   + b * cfg.llm.hidden_size * p["llm"]["embed_tokens"]["embedding"].dtype.itemsize)
        if self.opts.prune_text(cfg):
            weights += nbytes(p["text_predictor"])
        l = min(cfg.sparse.sparse_layer, cfg.llm.num_layers)
        slot = 2 * cfg.llm.num_kv_heads * cfg.llm.head_dim * item  # K and V of one token, one layer
        mid = lambda i: float(np.sum((run["start"][i] + run["end"][i]) / 2.0))
        kv_read = slot * (l * mid(0) + (cfg.llm.num_layers - l) * mid(1))
        kv_write = slot * b * cfg.llm.num_layers
        minimum = weights + kv_read + kv_write
        del logits, state
        return {"xla_bytes_accessed": xla, "minimum": minimum, "ratio": xla / minimum,
                "weights": weights, "kv_read_mid_generation": kv_read, "kv_written": kv_write}


class Torch:
    """transformers' PyTorch LLaVA (dense) with the same shapes and dtype, random weights."""

    def __init__(self, cfg: ModelConfig, prompts, pixels, seed: int):
        import torch
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
        torch.manual_seed(seed)
        v, l = cfg.vision, cfg.llm
        image_token = l.vocab_size  # one extra row: llava-hf puts <image> after the vocabulary
        hf = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu"),
            text_config=LlamaConfig(
                vocab_size=l.vocab_size + 1, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
                num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads,
                num_key_value_heads=l.num_kv_heads, max_position_embeddings=l.max_position_embeddings,
                rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta),
            image_token_index=image_token, vision_feature_layer=v.select_layer,
            vision_feature_select_strategy="default", projector_hidden_act="gelu")
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
        # Built on the device in its dtype: a 7B model initialised on the host in float32
        # would take 28 GB and minutes before it moved.
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dt)
        try:
            with torch.device(self.device):
                self.model = LlavaForConditionalGeneration(hf).to(self.device, dt).eval()
        finally:
            torch.set_default_dtype(prev)
        ids = [sum(([image_token] * cfg.num_image_tokens if t == IMAGE_MARKER else [t] for t in p), [])
               for p in prompts]
        self.ids = torch.tensor(ids, device=self.device)
        self.pixels = None if pixels is None else torch.tensor(pixels, device=self.device, dtype=dt)

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, new_tokens: int) -> dict:
        torch = self.torch
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model(input_ids=self.ids, pixel_values=self.pixels, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            self._sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=tok[:, None], past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1)
            self._sync()
            t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1}


class PeakMemory:
    """Peak growth of memory during a block: device peak bytes where the backend keeps
    them, else the process's resident memory sampled every millisecond."""

    def __init__(self):
        dev = jax.local_devices()[0]
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        self.device = dev if stats and "peak_bytes_in_use" in stats else None
        self.kind = "device_peak_bytes" if self.device else "process_rss"

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device is not None:
            self.base = self.device.memory_stats()["bytes_in_use"]
            return self
        self.base = self.peak = self._rss()
        self._stop = False

        def sample():
            while not self._stop:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.001)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device is not None:
            self.growth = self.device.memory_stats()["peak_bytes_in_use"] - self.base
            return
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.base


def _median(xs):
    return statistics.median(xs) if xs else None


def bench_speed(a) -> dict:
    cfg = model_config(a.model, a.dtype)
    if a.new_tokens < 2 or a.repeats < 1 or min(a.batch) < 1 or a.text_tokens < 2:
        raise ValueError("--new-tokens must be at least 2, --repeats, --batch at least 1, "
                         "--text-tokens at least 2")
    prompt_len = a.text_tokens + (0 if a.text_only else cfg.num_image_tokens)
    if prompt_len + a.new_tokens > cfg.llm.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_len}) + --new-tokens exceeds the model's "
                         f"{cfg.llm.max_position_embeddings} positions")
    t_start = time.time()
    _log(a, f"random {a.model} parameters ({cfg.dtype}) ...")
    params = random_params(cfg, a.seed)
    results: dict[str, Any] = {"setup": {
        "model": a.model, "dtype": cfg.dtype, "backend": jax.default_backend(),
        "device": str(jax.local_devices()[0].device_kind), "jax": jax.__version__,
        "layers": cfg.llm.num_layers, "hidden": cfg.llm.hidden_size, "heads": cfg.llm.num_heads,
        "kv_heads": cfg.llm.num_kv_heads, "mlp": cfg.llm.intermediate_size,
        "vocab": cfg.llm.vocab_size, "vision": dataclasses.asdict(cfg.vision),
        "image_tokens": 0 if a.text_only else cfg.num_image_tokens, "text_tokens": a.text_tokens,
        "new_tokens": a.new_tokens, "repeats": a.repeats,
        "padded_prompt": length_bucket(prompt_len, cfg.llm.max_position_embeddings - a.new_tokens)},
        "batches": []}
    bandwidth = None
    if not a.no_bytes:
        _log(a, "streaming bandwidth ...")
        bandwidth = stream_bandwidth()
        results["setup"]["stream_bytes_per_s"] = bandwidth
    for b in a.batch:
        prompts, batch, pixels = make_inputs(cfg, b, a.text_tokens, not a.text_only, a.seed, a.new_tokens)
        impls: dict[str, Any] = {}
        for mode in a.modes:
            impls[mode] = Ours(params, cfg, batch, pixels, GenOptions(max_new_tokens=a.new_tokens, mode=mode,
                                                                       attention=a.attention))
        if a.vs_torch:
            _log(a, f"batch {b}: building the PyTorch model ...")
            impls["torch"] = Torch(cfg, prompts, pixels, a.seed)
        _log(a, f"batch {b}: compiling and warming up ...")
        warm = {k: (v.run() if k != "torch" else v.run(a.new_tokens)) for k, v in impls.items()}
        samples: dict[str, list] = {k: [] for k in impls}
        for r in range(a.repeats):  # interleaved: each repeat runs every implementation once
            _log(a, f"batch {b}: run {r + 1}/{a.repeats}")
            for k, v in impls.items():
                samples[k].append(v.run() if k != "torch" else v.run(a.new_tokens))
        row: dict[str, Any] = {"batch": b, "prompt_padded_to": int(batch.tokens.shape[1])}
        for k, runs in samples.items():
            pre = _median([x["prefill"] for x in runs])
            dec = _median([x["decode"] for x in runs])
            gen_s = _median([x["prefill"] + x["decode"] for x in runs])
            row[k] = {"prefill_ms": 1e3 * pre, "decode_ms_per_token": 1e3 * dec / (a.new_tokens - 1),
                      "generation_s": gen_s, "answers_per_s": b / gen_s}
            if k != "torch":
                o = impls[k]
                alloc, dense = kv_bytes(cfg, o.opts, b, o.t, o.clen)
                row[k].update(kv_cache_bytes=alloc, kv_cache_bytes_dense=dense,
                              tokens_after_pruning=o.clen,
                              generated_kept_fraction=float(np.mean(warm[k]["in_cache"])) / (a.new_tokens - 1))
                if not a.no_bytes:
                    _log(a, f"batch {b}: prefill FLOPs and bytes per decoding step ({k}) ...")
                    row[k]["prefill_flops"] = o.prefill_flops()
                    sb = row[k]["decode_step_bytes"] = o.step_bytes(warm[k])
                    # The step's minimum bytes at the streaming rate: what decoding cannot beat.
                    sb["bound_ms"] = 1e3 * sb["minimum"] / bandwidth
                    sb["decode_over_bound"] = row[k]["decode_ms_per_token"] / sb["bound_ms"]
        if "dense" in row and "dynamic" in row:
            row["dynamic_vs_dense"] = {m: row["dynamic"][m] / row["dense"][m]
                                       for m in ("prefill_ms", "decode_ms_per_token", "generation_s",
                                                 "prefill_flops") if m in row["dense"]}
        if "torch" in row:
            for k in a.modes:
                row[f"{k}_vs_torch"] = {m: row[k][m] / row["torch"][m]
                                        for m in ("prefill_ms", "decode_ms_per_token", "generation_s")}
        if a.no_cache:
            for mode in a.modes:
                opts = GenOptions(max_new_tokens=a.new_tokens, mode=mode, use_cache=False,
                                  attention=a.attention)
                generate(params, cfg, batch, pixels, opts)  # compiles every bucket
                ts = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    generate(params, cfg, batch, pixels, opts)
                    ts.append(time.perf_counter() - t0)
                row[mode]["no_cache_generation_s"] = _median(ts)
        if a.memory:
            for mode in a.modes:
                opts = GenOptions(max_new_tokens=a.new_tokens, mode=mode, attention=a.attention)
                res = generate(params, cfg, batch, pixels, opts)  # compiled before measuring
                del res
                with PeakMemory() as m:
                    res = generate(params, cfg, batch, pixels, opts)
                row[mode]["memory"] = {"kind": m.kind, "peak_growth_bytes": m.growth,
                                       "kv_cache_bytes": res.kv_cache_bytes,
                                       "growth_over_kv": m.growth / res.kv_cache_bytes}
        del impls, warm, samples
        results["batches"].append(row)
    results["elapsed_s"] = round(time.time() - t_start, 1)
    return results


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def format_table(r: dict) -> str:
    s = r["setup"]
    lines = [f"bench speed: {s['model']} ({s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, "
             f"MLP {s['mlp']}), {s['dtype']}, {s['backend']} ({s['device']}), {s['image_tokens']} image + "
             f"{s['text_tokens']} text tokens, {s['new_tokens']} new tokens, median of {s['repeats']}", ""]
    lines.append("| batch | prefill ms torch / dense / dynamic | decode ms/token torch / dense / dynamic "
                 "| dense/torch decode | dynamic/torch decode | dynamic/dense prefill time (FLOPs) |")
    lines.append("|---|---|---|---|---|---|")
    for row in r["batches"]:
        g = lambda k, m: row.get(k, {}).get(m)
        lines.append(
            f"| {row['batch']} | {_fmt(g('torch', 'prefill_ms'), '.0f')} / {_fmt(g('dense', 'prefill_ms'), '.0f')} / "
            f"{_fmt(g('dynamic', 'prefill_ms'), '.0f')} | {_fmt(g('torch', 'decode_ms_per_token'))} / "
            f"{_fmt(g('dense', 'decode_ms_per_token'))} / {_fmt(g('dynamic', 'decode_ms_per_token'))} | "
            f"{_fmt(g('dense_vs_torch', 'decode_ms_per_token'), '.2f')}x | "
            f"{_fmt(g('dynamic_vs_torch', 'decode_ms_per_token'), '.2f')}x | "
            f"{_fmt(g('dynamic_vs_dense', 'prefill_ms'), '.2f')}x "
            f"({_fmt(g('dynamic_vs_dense', 'prefill_flops'), '.2f')}x) |")
    lines.append("")
    for row in r["batches"]:
        for k in ("dense", "dynamic"):
            d = row.get(k)
            if not d:
                continue
            extra = []
            if "decode_step_bytes" in d:
                sb = d["decode_step_bytes"]
                extra.append(f"bytes/step XLA {sb['xla_bytes_accessed'] / 2**20:.1f} MiB vs minimum "
                             f"{sb['minimum'] / 2**20:.1f} MiB ({sb['ratio']:.2f}x); minimum at "
                             f"{s['stream_bytes_per_s'] / 1e9:.1f} GB/s streaming: {sb['bound_ms']:.2f} "
                             f"ms/step, decode {sb['decode_over_bound']:.2f}x of it")
            if "memory" in d:
                mm = d["memory"]
                extra.append(f"peak growth {mm['peak_growth_bytes'] / 2**20:.0f} MiB = "
                             f"{mm['growth_over_kv']:.2f}x the {mm['kv_cache_bytes'] / 2**20:.0f} MiB KV allocated")
            if "no_cache_generation_s" in d:
                extra.append(f"no-cache generation {d['no_cache_generation_s']:.2f} s")
            lines.append(f"batch {row['batch']} {k}: {d['answers_per_s']:.2f} answers/s, "
                         f"KV {d['kv_cache_bytes'] / 2**20:.1f} MiB (dense {d['kv_cache_bytes_dense'] / 2**20:.1f}), "
                         f"generated kept {d['generated_kept_fraction']:.2f}; " + "; ".join(extra))
    lines.append(f"({r['elapsed_s']} s)")
    return "\n".join(lines)


def run(a) -> int:
    from .bench import report
    return report(a, bench_speed, format_table)
