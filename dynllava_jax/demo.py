"""`python infer.py` with no arguments: the bundled SynthVQA model answers its bundled
question about its bundled image and says what sparsification saved.

The model (`assets/synthvqa-dynamic-llava/`) was trained by this project's `train.py` on
its own synthetic data (`dynllava_jax.data.synthvqa`, configs/synthvqa_*.py);
`example.json` there names the image, the question and the answer the scene implies.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "synthvqa-dynamic-llava"


def load_example(checkpoint: Path = DEMO_CHECKPOINT) -> dict:
    ex = json.loads((checkpoint / "example.json").read_text())
    ex["image"] = str(checkpoint / ex["image"])
    return ex


def run(mode: str = "dynamic", use_cache: bool = True, as_json: bool = False,
        vision_keep_rate=None, text_kv_budget: float = 1.0, max_new_tokens: int = 192,
        checkpoint: Path = DEMO_CHECKPOINT) -> dict:
    """Answer the example; returns the answer dict with the savings and the expected answer."""
    from .generate import GenOptions
    from .inference import Llava, Request
    from .savings import answer_savings
    ex = load_example(checkpoint)
    model = Llava(checkpoint)
    opts = GenOptions(max_new_tokens=max_new_tokens, mode=mode, use_cache=use_cache,
                      vision_keep_rate=vision_keep_rate, text_kv_budget=text_kv_budget)
    (ans,) = model.answer([Request(ex["question"], ex["image"])], opts)
    out = dict(ans, **answer_savings(model.cfg, ans, mode == "dynamic", use_cache),
               question=ex["question"], image=ex["image"], expected=ex["answer"])
    if as_json:
        print(json.dumps(out))
    else:
        print(format_report(out, checkpoint))
    return out


def format_report(r: dict, checkpoint: Path) -> str:
    def kib(b):
        return f"{b / 1024:.1f} KiB"
    lines = [
        f"model: {checkpoint.name} (trained by train.py on SynthVQA), mode: {r['mode']}",
        f"image: {r['image']}",
        f"question: {r['question']}",
        f"answer: {r['text']}",
        f"expected: {r['expected']}",
        f"image tokens kept: {r['image_tokens_kept']} / {r['image_tokens_total']}",
        f"generated tokens kept in the cache: {r['generated_tokens_in_cache']} / "
        f"{r['generated_tokens']}",
    ]
    if r["kv_bytes"]:
        lines.append(f"KV cache used: {kib(r['kv_bytes'])} vs {kib(r['kv_bytes_dense'])} dense "
                     f"({r['kv_bytes'] / r['kv_bytes_dense']:.2f}x)")
    lines.append(f"prefill FLOPs: {r['prefill_flops'] / 1e6:.0f} M vs "
                 f"{r['prefill_flops_dense'] / 1e6:.0f} M dense ({r['prefill_flops_vs_dense']:.2f}x)")
    lines.append(accuracy_note(checkpoint))
    return "\n".join(lines)


TARGET = 0.8   # the held-out accuracy the bundled model is meant to reach (issue 11)


def accuracy_note(checkpoint: Path) -> str:
    """What this model scores on the held-out split, as `eval synth` measured it (its
    `eval/synth_eval.json`), so that one right answer is not read as a model that works."""
    path = checkpoint / "eval" / "synth_eval.json"
    if not path.is_file():
        return "held-out accuracy: not measured (no eval/synth_eval.json)"
    runs = {r["run"]: r for r in json.loads(path.read_text())["modes"]}
    acc = {k: runs[k]["accuracy"]["overall"] for k in ("dense", "dynamic") if k in runs}
    n = max((r["questions"] for r in runs.values()), default=0)
    figures = ", ".join(f"{k} {100 * v:.1f} %" for k, v in acc.items())
    note = f"held-out accuracy of this model ({n} questions, eval/synth_eval.md): {figures}."
    if acc and min(acc.values()) < TARGET:  # below issue 11's target: say so
        note += (f" It is undertrained (below the {100 * TARGET:.0f} % target; see the README); "
                 "this example is one it answers right.")
    return note
