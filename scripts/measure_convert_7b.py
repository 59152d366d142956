#!/usr/bin/env python
"""Measure convert_weights.py on a checkpoint shaped like `liuhaotian/llava-v1.5-7b`.

Writes random float16 weights in the original LLaVA-1.5 layout, sharded the way the
release is (`save_pretrained` with `max_shard_size="10GB"`, state-dict order: a ~10 GB
`pytorch_model-00001-of-00002.bin` and the rest in `-00002`, with
`pytorch_model.bin.index.json`; the CLIP ViT-L/14-336 tower inside as
`model.vision_tower.vision_tower.*`, config naming `openai/clip-vit-large-patch14-336`),
then runs `convert_weights.py --dtype bfloat16` in a subprocess and reports its peak
memory (VmHWM from /usr/bin/time, and RssAnon / RssFile polled from /proc), wall time
and output size as one JSON line. Everything is written under --workdir and removed at
the end unless --keep.

    python scripts/measure_convert_7b.py [--workdir /tmp/dynllava-7b] [--format bin|safetensors]
        [--layers 32] [--keep] [--reuse-src]

Generating the source holds one shard's tensors in memory (about 10 GB of float16) while
it is saved, and nothing runs beside it; `--layers 4` gives a quick dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def llava_7b_tensors(layers: int = 32) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of llava-v1.5-7b in state-dict order (LlavaLlamaForCausalLM)."""
    H, I, V = 4096, 11008, 32000
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (H, H)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (I, H)), (p + "mlp.up_proj.weight", (I, H)),
                (p + "mlp.down_proj.weight", (H, I)), (p + "input_layernorm.weight", (H,)),
                (p + "post_attention_layernorm.weight", (H,))]
    out.append(("model.norm.weight", (H,)))
    v, D, F = "model.vision_tower.vision_tower.vision_model.", 1024, 4096
    out += [(v + "embeddings.class_embedding", (D,)),
            (v + "embeddings.patch_embedding.weight", (D, 3, 14, 14)),
            (v + "embeddings.position_embedding.weight", (577, D)),
            (v + "pre_layrnorm.weight", (D,)), (v + "pre_layrnorm.bias", (D,))]
    for i in range(24):
        p = f"{v}encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            out += [(p + f"self_attn.{n}_proj.weight", (D, D)), (p + f"self_attn.{n}_proj.bias", (D,))]
        out += [(p + "layer_norm1.weight", (D,)), (p + "layer_norm1.bias", (D,)),
                (p + "mlp.fc1.weight", (F, D)), (p + "mlp.fc1.bias", (F,)),
                (p + "mlp.fc2.weight", (D, F)), (p + "mlp.fc2.bias", (D,)),
                (p + "layer_norm2.weight", (D,)), (p + "layer_norm2.bias", (D,))]
    out += [(v + "post_layernorm.weight", (D,)), (v + "post_layernorm.bias", (D,))]
    out += [("model.mm_projector.0.weight", (H, D)), ("model.mm_projector.0.bias", (H,)),
            ("model.mm_projector.2.weight", (H, H)), ("model.mm_projector.2.bias", (H,)),
            ("lm_head.weight", (V, H))]
    return out


def llava_7b_config(layers: int) -> dict:
    return {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu", "hidden_size": 4096, "image_aspect_ratio": "pad",
        "initializer_range": 0.02, "intermediate_size": 11008, "max_length": 4096,
        "max_position_embeddings": 4096, "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava_llama",
        "num_attention_heads": 32, "num_hidden_layers": layers, "num_key_value_heads": 32,
        "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vocab_size": 32000,
    }


def shard_plan(tensors, max_bytes: float) -> list[list[tuple[str, tuple]]]:
    """save_pretrained's rule: fill a shard in order until the next tensor would overflow it."""
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = 2 * _numel(shape)
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    return shards


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_source(src: Path, layers: int, fmt: str) -> dict:
    import torch
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(llava_7b_config(layers), indent=2))
    tensors = llava_7b_tensors(layers)
    shards = shard_plan(tensors, 10 * GB)
    n = len(shards)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for s, part in enumerate(shards):
        fn = (f"pytorch_model-{s + 1:05d}-of-{n:05d}.bin" if fmt == "bin"
              else f"model-{s + 1:05d}-of-{n:05d}.safetensors")
        t0 = time.time()
        sd = {}
        for name, shape in part:
            sd[name] = torch.empty(shape, dtype=torch.float16).normal_(0.0, 0.02, generator=gen)
            weight_map[name] = fn
            total += 2 * _numel(shape)
        if fmt == "bin":
            torch.save(sd, src / fn)
        else:
            from safetensors.torch import save_file
            save_file(sd, str(src / fn), metadata={"format": "pt"})
        del sd
        print(f"wrote {fn}: {(src / fn).stat().st_size / GB:.2f} GB in {time.time() - t0:.0f} s",
              flush=True)
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (src / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                        indent=2))
    return {"tensors": len(tensors), "shards": n, "bytes": total}


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def run_convert(src: Path, dst: Path, log: Path) -> dict:
    cmd = [sys.executable, str(REPO / "convert_weights.py"), "--src", str(src), "--dst", str(dst),
           "--dtype", "bfloat16"]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll(root_pid):
        while not done.is_set():
            pids = [root_pid] + _children(root_pid)
            pids += [c for p in pids[1:] for c in _children(p)]
            for p in pids:
                st = _proc_status(p)
                for k in peaks:
                    peaks[k] = max(peaks[k], st.get(k, 0))
            time.sleep(0.1)

    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(timer + cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        th = threading.Thread(target=poll, args=(proc.pid,), daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    wall = time.time() - t0
    text = log.read_text()
    maxrss = None
    for line in text.splitlines():
        if "Maximum resident set size" in line:
            maxrss = int(line.split(":")[-1]) * 1024
    return {"rc": rc, "wall_s": round(wall, 1),
            "peak_rss_gb": round((maxrss or peaks["VmRSS"]) / GB, 2),
            "peak_rss_anon_gb": round(peaks["RssAnon"] / GB, 2),
            "peak_rss_file_gb": round(peaks["RssFile"] / GB, 2),
            "log_tail": text.splitlines()[-30:]}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/dynllava-7b-measure")
    ap.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the source and the output")
    ap.add_argument("--reuse-src", action="store_true", help="reuse a source written before")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    src, dst = work / "src", work / "converted"
    result = {"format": args.format, "layers": args.layers}
    try:
        if not (args.reuse_src and (src / "config.json").exists()):
            shutil.rmtree(src, ignore_errors=True)
            t0 = time.time()
            result["source"] = write_source(src, args.layers, args.format)
            result["source"]["write_s"] = round(time.time() - t0, 1)
        result["source_gb"] = round(du(src) / GB, 2)
        shutil.rmtree(dst, ignore_errors=True)
        result.update(run_convert(src, dst, work / "convert.log"))
        if dst.exists():
            result["output_gb"] = round(du(dst) / GB, 2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0 if result.get("rc") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
