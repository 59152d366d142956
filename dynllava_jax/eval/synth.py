"""Accuracy on the SynthVQA held-out split (`dynllava_jax.data.synthvqa`), dense vs dynamic,
with what the sparsification saved, and a sweep over the keep rates.

    python -m dynllava_jax.eval synth --checkpoint assets/synthvqa-dynamic-llava \\
        --data data/synthvqa --out runs/synthvqa_eval [--sweep] [--max-per-type N]

Scores (one number in [0, 1] per question):
- colour, shape, count, position, presence: normalised exact match (lower case, no
  punctuation or articles, number words as digits), as VQAv2-style benchmarks;
- choice: the option letter, read as LLaVA's ScienceQA scorer reads it (the whole answer
  is a letter, or it says "The answer is X.");
- ocr: VQA accuracy over the ten reference answers (min(1, matches / 3), averaged over
  the ten leave-one-out subsets, as TextVQA's official evaluator);
- describe: the fraction of the reference description's sentences that the answer
  contains word for word (a sentence holds one fact of the scene).
`overall` is the mean over all questions. Each question's cost comes from its exact
lengths (`savings.py`): prefill FLOPs (vision tower, projector, LLM, image predictor) and
the KV-cache bytes its tokens occupy at the end of generation, both next to dense.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dynllava_jax.data.synthvqa import QUESTION_TYPES
from dynllava_jax.savings import answer_savings

MODES = (("dense", True), ("dynamic", True), ("dynamic", False))  # (mode, use_cache)
SWEEP_VISION = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
SWEEP_TEXT_BUDGET = (0.1, 0.25, 0.5, 0.75, 1.0)
MAX_NEW_TOKENS = {"describe": 192}
SHORT_MAX_NEW_TOKENS = 8

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalise(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def choice_letter(text: str, n_options: int = 4) -> Optional[str]:
    """The option letter of an answer, as LLaVA's eval_science_qa.py parses it."""
    letters = "ABCDE"[:n_options]
    t = text.strip()
    if t in letters:
        return t
    m = re.match(r"^The answer is ([A-Z])\.", t)
    if m and m.group(1) in letters:
        return m.group(1)
    if len(t) >= 2 and t[0] in letters and t[1] in ".):":
        return t[0]
    return None


def vqa_accuracy(pred: str, references: Sequence[str]) -> float:
    p = normalise(pred)
    refs = [normalise(r) for r in references]
    accs = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        accs.append(min(1.0, sum(r == p for r in others) / 3.0))
    return float(np.mean(accs))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text.strip()) if s.strip()]


def score(ann: dict, pred: str) -> float:
    t = ann["type"]
    if t == "choice":
        return float(choice_letter(pred, len(ann["choices"]) or 4) == ann["answer"])
    if t == "ocr":
        return vqa_accuracy(pred, ann["answers"])
    if t == "describe":
        ref = sentences(ann["answer"])
        got = set(sentences(pred))
        return sum(s in got for s in ref) / max(len(ref), 1)
    return float(normalise(pred) == normalise(ann["answer"]))


# -- the split ----------------------------------------------------------------------------
def load_split(data_dir: str | Path, max_per_type: int = 0,
               types: Optional[Sequence[str]] = None) -> list[tuple[dict, dict]]:
    """[(question, annotation)] of the held-out split, at most `max_per_type` of each type
    (0: all) and only `types` (None: all), in file order."""
    d = Path(data_dir) / "eval"
    qs = [json.loads(ln) for ln in (d / "questions.jsonl").read_text().splitlines() if ln.strip()]
    anns = {a["question_id"]: a for a in (json.loads(ln) for ln in
                                          (d / "annotations.jsonl").read_text().splitlines()
                                          if ln.strip())}
    out, seen = [], defaultdict(int)
    for q in qs:
        a = anns[q["question_id"]]
        if types is not None and a["type"] not in types:
            continue
        if max_per_type and seen[a["type"]] >= max_per_type:
            continue
        seen[a["type"]] += 1
        out.append((q, a))
    return out


# -- running ----------------------------------------------------------------------------------
@dataclasses.dataclass
class RunSpec:
    mode: str = "dense"
    use_cache: bool = True
    vision_keep_rate: Optional[float] = None
    text_kv_budget: Optional[float] = None   # None: 1.0 (exact)

    @property
    def name(self) -> str:
        n = self.mode if self.use_cache else f"{self.mode}-no-kv-cache"
        if self.mode == "dynamic" and self.vision_keep_rate is not None:
            n += f" r={self.vision_keep_rate:g}"
        if self.mode == "dynamic" and self.text_kv_budget is not None:
            n += f" b={self.text_kv_budget:g}"
        return n


def run(model, items: list[tuple[dict, dict]], spec: RunSpec, image_folder: str | Path,
        batch_size: int = 16, progress: bool = True) -> list[dict]:
    """Answer `items` with `model` (`inference.Llava`) in one mode; one row per question:
    the answer, its score and its costs. Questions are batched by type, so short answers
    never wait for long ones."""
    from tqdm import tqdm
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.inference import Request
    cfg = model.cfg
    by_type = defaultdict(list)
    for q, a in items:
        by_type[a["type"]].append((q, a))
    rows = []
    bar = tqdm(total=len(items), desc=spec.name, unit="q", file=sys.stderr, disable=not progress)
    for t in QUESTION_TYPES:
        group = by_type.get(t, [])
        if not group:
            continue
        opts = GenOptions(max_new_tokens=MAX_NEW_TOKENS.get(t, SHORT_MAX_NEW_TOKENS),
                          mode=spec.mode, use_cache=spec.use_cache,
                          vision_keep_rate=spec.vision_keep_rate,
                          text_kv_budget=(1.0 if spec.text_kv_budget is None or not spec.use_cache
                                          else spec.text_kv_budget))
        size = min(batch_size, len(group))
        for chunk in (group[i:i + size] for i in range(0, len(group), size)):
            reqs = [Request(q["text"], str(Path(image_folder) / q["image"])) for q, _ in chunk]
            reqs += reqs[-1:] * (size - len(reqs))  # same shapes: no recompile
            answers = model.answer(reqs, opts)
            for (q, a), ans in zip(chunk, answers):
                sv = answer_savings(cfg, ans, spec.mode == "dynamic", spec.use_cache)
                rows.append({
                    "question_id": q["question_id"], "type": t, "text": ans["text"],
                    "answer": a["answer"], "score": score(a, ans["text"]),
                    "image_tokens_kept": ans["image_tokens_kept"],
                    "image_tokens_total": ans["image_tokens_total"],
                    **{k: sv[k] for k in ("generated_tokens", "generated_tokens_in_cache",
                                          "prefill_flops", "prefill_flops_dense", "kv_bytes",
                                          "kv_bytes_dense")},
                    "kv_bytes_allocated": ans["kv_cache_bytes"] / size,
                    "kv_bytes_allocated_dense": ans["kv_cache_bytes_dense"] / size,
                })
            bar.update(len(chunk))
    bar.close()
    return rows


def summarise(rows: list[dict], spec: RunSpec) -> dict:
    """Accuracy per type and overall, kept fractions and costs relative to dense."""
    out = {"run": spec.name, **dataclasses.asdict(spec), "questions": len(rows)}
    acc = {}
    for t in QUESTION_TYPES:
        s = [r["score"] for r in rows if r["type"] == t]
        if s:
            acc[t] = float(np.mean(s))
    acc["overall"] = float(np.mean([r["score"] for r in rows])) if rows else float("nan")
    short = [r["score"] for r in rows if r["type"] != "describe"]
    acc["short_answers"] = float(np.mean(short)) if short else float("nan")
    out["accuracy"] = acc
    img = [r for r in rows if r["image_tokens_total"]]
    out["image_tokens_kept_fraction"] = (sum(r["image_tokens_kept"] for r in img)
                                         / max(sum(r["image_tokens_total"] for r in img), 1))
    gen = sum(r["generated_tokens"] for r in rows)
    out["generated_tokens_in_cache_fraction"] = (
        sum(r["generated_tokens_in_cache"] for r in rows) / max(gen, 1)
        if spec.use_cache else None)
    long = [r for r in rows if r["type"] == "describe"]
    out["describe_generated_in_cache_fraction"] = (
        sum(r["generated_tokens_in_cache"] for r in long)
        / max(sum(r["generated_tokens"] for r in long), 1) if long and spec.use_cache else None)
    out["prefill_flops_mean"] = float(np.mean([r["prefill_flops"] for r in rows]))
    out["prefill_flops_vs_dense"] = (sum(r["prefill_flops"] for r in rows)
                                     / max(sum(r["prefill_flops_dense"] for r in rows), 1))
    out["kv_bytes_mean"] = float(np.mean([r["kv_bytes"] for r in rows]))
    out["kv_bytes_vs_dense"] = (sum(r["kv_bytes"] for r in rows)
                                / max(sum(r["kv_bytes_dense"] for r in rows), 1))
    out["kv_bytes_allocated_vs_dense"] = (
        sum(r["kv_bytes_allocated"] for r in rows)
        / max(sum(r["kv_bytes_allocated_dense"] for r in rows), 1))
    return out


def vs_dense(rows: list[dict], dense_rows: list[dict]) -> Optional[float]:
    """This run's overall accuracy minus the dense run's on the same questions (the
    no-cache run and the sweeps answer a subset); None where dense lacks one of them."""
    dense = {r["question_id"]: r["score"] for r in dense_rows}
    if not rows or any(r["question_id"] not in dense for r in rows):
        return None
    return float(np.mean([r["score"] for r in rows])
                 - np.mean([dense[r["question_id"]] for r in rows]))


# -- reports ----------------------------------------------------------------------------------
def markdown_table(summaries: list[dict]) -> str:
    types = [t for t in QUESTION_TYPES if any(t in s["accuracy"] for s in summaries)]
    head = (["run", "n"] + types + ["overall", "short answers", "vs dense", "image kept",
                                    "gen. in cache", "prefill FLOPs", "KV bytes"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        a = s["accuracy"]
        gic = s["generated_tokens_in_cache_fraction"]
        cells = ([s["run"], str(s["questions"])]
                 + [f"{100 * a[t]:.1f}" if t in a else "-" for t in types]
                 + [f"{100 * a['overall']:.1f}",
                    "-" if np.isnan(a["short_answers"]) else f"{100 * a['short_answers']:.1f}",
                    "-" if s.get("vs_dense") is None else f"{100 * s['vs_dense']:+.1f}",
                    f"{s['image_tokens_kept_fraction']:.3f}",
                    "-" if gic is None else f"{gic:.3f}",
                    f"{s['prefill_flops_vs_dense']:.3f}x", f"{s['kv_bytes_vs_dense']:.3f}x"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(summaries: list[dict], path: Path) -> Optional[Path]:
    """Accuracy against prefill FLOPs and against KV bytes (relative to dense)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("warning: matplotlib is not installed: no plot", file=sys.stderr)
        return None
    vis = [s for s in summaries if s.get("sweep") == "vision"]
    txt = [s for s in summaries if s.get("sweep") == "text"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    _sweep_panel(ax[0], vis, "prefill_flops_vs_dense", "short_answers", "vision_keep_rate",
                 "prefill FLOPs / dense", "accuracy, short answers (%)",
                 "vision keep rate sweep (labels: rate)", "C0")
    _sweep_panel(ax[1], txt, "kv_bytes_vs_dense", "describe", "text_kv_budget",
                 "KV-cache bytes occupied / dense", "describe: sentences reproduced (%)",
                 "text KV budget sweep (labels: budget)", "C1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_panel(ax, rows, x_key, acc_key, label_key, xlabel, ylabel, title, color) -> None:
    """Accuracy against a cost ratio, each point labelled with its sweep value."""
    if not rows:
        return
    x = [r[x_key] for r in rows]
    y = [100 * r["accuracy"][acc_key] for r in rows]
    ax.plot(x, y, "o-", color=color)
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(f"{r[label_key]:g}", (xi, yi), textcoords="offset points", xytext=(3, -10),
                    fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def evaluate(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path,
             max_per_type: int = 0, no_cache_describe: int = 8, batch_size: int = 16,
             sweep: bool = False, dense_checkpoint: Optional[str] = None,
             types: Optional[Sequence[str]] = None, sweep_per_type: int = 16,
             progress: bool = True) -> dict:
    """The whole report: the three modes (plus `dense_checkpoint` in dense mode if given),
    optionally the sweeps (on the first `sweep_per_type` questions of each type); writes
    synth_eval.{json,md}, answers_*.jsonl, sweep.png."""
    from dynllava_jax.inference import Llava
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = load_split(data_dir, max_per_type, types)
    summaries, sweeps = [], []

    dense_rows = []   # the model's own dense run: each other run is compared with it

    def do(model, spec, its, tag=None, **extra):
        rows = run(model, its, spec, data_dir, batch_size, progress)
        s = dict(summarise(rows, spec), **extra)
        if spec.mode == "dense" and not tag:
            dense_rows.extend(rows)
        s["vs_dense"] = vs_dense(rows, dense_rows) if dense_rows else None
        if tag:
            s["run"] = f"{tag}: {s['run']}"
        fname = re.sub(r"[^\w.=-]+", "_", s["run"])
        (out / f"answers_{fname}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return s

    if dense_checkpoint:
        summaries.append(do(Llava(dense_checkpoint), RunSpec("dense"), items,
                            tag="dense-trained model"))
    model = Llava(checkpoint)
    no_cache_items = [(q, a) for q, a in items if a["type"] != "describe"]
    no_cache_items += [(q, a) for q, a in items if a["type"] == "describe"][:no_cache_describe]
    for mode, cache in MODES:
        if mode == "dynamic" and not model.has_predictors:
            continue
        summaries.append(do(model, RunSpec(mode, cache), items if cache else no_cache_items))
    if sweep and model.has_predictors:
        few = load_split(data_dir, sweep_per_type, types)
        short = [(q, a) for q, a in few if a["type"] != "describe"]
        long = [(q, a) for q, a in few if a["type"] == "describe"]
        for r in SWEEP_VISION:
            sweeps.append(do(model, RunSpec("dynamic", True, vision_keep_rate=r), short,
                             sweep="vision"))
        for b in SWEEP_TEXT_BUDGET:
            sweeps.append(do(model, RunSpec("dynamic", True, text_kv_budget=b), long,
                             sweep="text"))
    report = {"checkpoint": str(checkpoint), "data": str(data_dir), "modes": summaries,
              "sweep": sweeps}
    (out / "synth_eval.json").write_text(json.dumps(report, indent=1) + "\n")
    md = "## Modes\n\n" + markdown_table(summaries)
    if sweeps:
        md += ("\n## Sweep: vision keep rate (short answers) and text KV budget (describe)\n\n"
               + markdown_table(sweeps))
        plot_sweep(sweeps, out / "sweep.png")
    (out / "synth_eval.md").write_text(md)
    return report


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="converted checkpoint dir (dynamic)")
    p.add_argument("--data", required=True, help="the SynthVQA directory (its eval/ split)")
    p.add_argument("--out", required=True, help="where the report goes")
    p.add_argument("--dense-checkpoint", help="also score this (dense-trained) model, dense")
    p.add_argument("--max-per-type", type=int, default=0, help="questions per type (0: all)")
    p.add_argument("--no-cache-describe", type=int, default=8,
                   help="describe questions in the no-cache mode (it recomputes every step)")
    p.add_argument("--types", help=f"comma-separated question types (default: all of "
                                   f"{','.join(QUESTION_TYPES)})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sweep", action="store_true",
                   help="also sweep vision keep rates and text KV budgets")
    p.add_argument("--sweep-per-type", type=int, default=16, help="questions per type in the sweep")


def main(a) -> int:
    for path, what in ((a.checkpoint, "--checkpoint"), (a.dense_checkpoint, "--dense-checkpoint")):
        if path is not None and not Path(path).is_dir():
            print(f"error: {what} directory not found: {path}", file=sys.stderr)
            return 2
    if not (Path(a.data) / "eval" / "questions.jsonl").is_file():
        print(f"error: --data {a.data} has no eval/questions.jsonl "
              "(write it with python -m dynllava_jax.data.synthvqa)", file=sys.stderr)
        return 2
    if a.batch_size < 1 or a.max_per_type < 0 or a.no_cache_describe < 0:
        print("error: --batch-size must be >= 1, --max-per-type and --no-cache-describe >= 0",
              file=sys.stderr)
        return 2
    types = None
    if a.types:
        types = [t.strip() for t in a.types.split(",") if t.strip()]
        bad = [t for t in types if t not in QUESTION_TYPES]
        if bad:
            print(f"error: --types: unknown question type(s) {bad}; choose from "
                  f"{list(QUESTION_TYPES)}", file=sys.stderr)
            return 2
    evaluate(a.checkpoint, a.data, a.out, a.max_per_type, a.no_cache_describe,
             a.batch_size, a.sweep, a.dense_checkpoint, types, a.sweep_per_type)
    print((Path(a.out) / "synth_eval.md").read_text())
    return 0
