#!/usr/bin/env python
"""Training curves (loss, CE, the cell and attention objectives, kept fractions, attention mass)
of one or more consecutive runs.

    python scripts/plot_training.py runs/synthvqa_tower runs/synthvqa_dense \\
        runs/synthvqa_dynamic --out assets/synthvqa-dynamic-llava/training.png

Each WORKDIR's metrics.jsonl is read; a later run's steps continue after the earlier
run's last step, so a two-stage recipe reads as one curve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plot(workdirs, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dynllava_jax.trainer import read_metrics
    fig, ax = plt.subplots(1, 2, figsize=(12, 5.5))
    offset = 0
    for wd in workdirs:
        rows = read_metrics(wd)
        if not rows:
            raise FileNotFoundError(f"no metrics.jsonl rows in {wd}")
        x = [offset + r["step"] for r in rows]
        name = Path(wd).name
        ax[0].plot(x, [r["loss"] for r in rows], label=f"{name}: loss")
        if any(r["ce"] > 0 for r in rows):   # 0 throughout in tower pretraining
            ax[0].plot(x, [r["ce"] for r in rows], "--", label=f"{name}: CE")
        if "cell_loss" in rows[0]:
            ax[0].plot(x, [r["cell_loss"] for r in rows], ":", label=f"{name}: cell loss")
        if "attn_loss" in rows[0]:
            ax[0].plot(x, [r["attn_loss"] for r in rows], "-.", label=f"{name}: attention loss")
            ax[1].plot(x, [r["attn_mass"] for r in rows], lw=0.6, alpha=0.7,
                       label=f"{name}: attention mass on the named cell")
        if "pair_loss" in rows[0]:
            ax[1].plot(x, [r["pair_mass"] for r in rows], lw=0.6, alpha=0.7,
                       label=f"{name}: attention mass on a position question's objects")
        if "choice_loss" in rows[0]:
            ax[0].plot(x, [r["choice_loss"] for r in rows], lw=0.6, label=f"{name}: choice loss")
            ax[1].plot(x, [r["choice_mass"] for r in rows], lw=0.6, alpha=0.7,
                       label=f"{name}: attention mass on the chosen option")
        if "letter_loss" in rows[0]:
            ax[1].plot(x, [r["letter_mass"] for r in rows], lw=0.6, alpha=0.7,
                       label=f"{name}: attention on an option's letter")
        if any(r.get("img_kept", 0) > 0 for r in rows):
            ax[1].plot(x, [r["img_kept"] for r in rows], label=f"{name}: image tokens kept")
            # a step whose pruned rows hold no long answer logs txt_kept 0: not a point
            lx = [(xi, r["txt_kept"]) for xi, r in zip(x, rows) if r["txt_kept"] > 0]
            ax[1].plot([a for a, _ in lx], [b for _, b in lx],
                       label=f"{name}: long-answer tokens kept")
        offset = x[-1]
        ax[0].axvline(offset, color="grey", lw=0.5)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_title("loss, cross-entropy, cell, attention and choice losses")
    ax[1].set_xlabel("step")
    ax[1].set_ylim(0, 1)
    ax[1].set_title("kept fractions (targets 0.2 and 0.5), attention masses")
    for a, ncol in zip(ax, (2, 1)):   # below the axes: a dozen series would cover the curves
        a.grid(alpha=0.3)
        a.legend(fontsize=7, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--out", required=True, help="PNG file")
    a = ap.parse_args(argv)
    try:
        print(plot(a.workdirs, Path(a.out)))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
