"""Optimiser of the official Dynamic-LLaVA run (SPEC §4), in optax.

* Parameters are partitioned by their top-level group (`params` layout of `model.py`):
  trainable groups go to the optimiser, frozen ones (the vision tower always; the
  projector unless `train_projector`; the LLM unless `train_llm`) are kept aside, so no
  optimiser state is ever allocated for them and no gradient is computed for them.
* Two learning rates: the predictors (`predictor_lr`, 2e-4) and everything else trainable
  (`lr`, 5e-6: LLM and projector), each AdamW (weight decay 0 by default) with linear
  warm-up over `warmup_ratio` of the steps, then cosine decay to 0 (HF
  `get_cosine_schedule_with_warmup`: lr(0) = 0; warm-up steps = ceil(ratio * total)).
* `vision_lr_scale` (default 1): the vision tower's updates times this factor, when it is
  trained (`train_vision`; a tower learnt from random weights may want a larger step).
* Gradient clipping by the global norm over all trainable parameters (HF
  `max_grad_norm = 1.0`), before the update.
Gradient accumulation is done by the train step (a scan over micro-batches), not here.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PREDICTOR_GROUPS = ("image_predictor", "text_predictor")


def trainable_groups(params: dict, *, train_projector: bool = True, train_llm: bool = True,
                     train_vision: bool = False) -> tuple[str, ...]:
    """Top-level params groups that the optimiser updates."""
    wanted = {"vision": train_vision, "projector": train_projector, "llm": train_llm}
    return tuple(k for k in params if wanted.get(k, k in PREDICTOR_GROUPS))


def split_params(params: dict, groups) -> tuple[dict, dict]:
    """(trainable, frozen) dicts of top-level groups."""
    groups = set(groups)
    return ({k: v for k, v in params.items() if k in groups},
            {k: v for k, v in params.items() if k not in groups})


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio))


def make_schedule(peak_lr: float, total_steps: int, warmup_ratio: float = 0.03,
                  kind: str = "cosine") -> Callable:
    """Linear warm-up from 0, then `cosine` (to 0), `linear` (to 0) or `constant`."""
    total_steps = max(int(total_steps), 1)
    warm = warmup_steps(total_steps, warmup_ratio)
    if kind == "cosine":
        if warm >= total_steps:  # all warm-up (total_steps=1): optax needs a decay phase
            return optax.linear_schedule(0.0, peak_lr, max(warm, 1))
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warm, total_steps, 0.0)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, warm),
             optax.linear_schedule(peak_lr, 0.0, max(total_steps - warm, 1))], [warm])
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, warm), optax.constant_schedule(peak_lr)], [warm])
    raise ValueError(f"unknown lr schedule {kind!r}; choose cosine, linear or constant")


def group_labels(trainable: dict) -> dict:
    """'predictor' for the predictors' leaves, 'main' for the rest (LLM, projector)."""
    return {k: jax.tree_util.tree_map(lambda _: "predictor" if k in PREDICTOR_GROUPS else "main", v)
            for k, v in trainable.items()}


def decay_mask(tree):
    """Weight decay on matrices only (HF: no decay for biases and norm weights)."""
    def leaf(path, _):
        name = getattr(path[-1], "key", None)
        return name in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(leaf, tree)


def make_optimizer(ocfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """(optimiser, {"lr": schedule, "predictor_lr": schedule}) from an `optim` config with
    lr, predictor_lr, weight_decay, predictor_weight_decay, warmup_ratio, schedule, b1, b2,
    eps, max_grad_norm."""
    scheds = {"lr": make_schedule(ocfg.lr, total_steps, ocfg.warmup_ratio, ocfg.schedule),
              "predictor_lr": make_schedule(ocfg.predictor_lr, total_steps, ocfg.warmup_ratio,
                                            ocfg.schedule)}

    def adamw(sched, wd):
        return optax.adamw(sched, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=wd,
                           mask=decay_mask)

    tx = optax.multi_transform(
        {"main": adamw(scheds["lr"], ocfg.weight_decay),
         "predictor": adamw(scheds["predictor_lr"], ocfg.predictor_weight_decay)},
        group_labels)
    scale = float(getattr(ocfg, "vision_lr_scale", 1.0))
    if scale != 1.0:  # only then: the optimiser state of existing runs keeps its structure
        vision_only = lambda tree: {k: jax.tree_util.tree_map(lambda _: k == "vision", v)
                                    for k, v in tree.items()}
        tx = optax.chain(tx, optax.masked(optax.scale(scale), vision_only))
    if ocfg.max_grad_norm and ocfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(ocfg.max_grad_norm), tx)
    return tx, scheds


def cast_tree(tree, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
