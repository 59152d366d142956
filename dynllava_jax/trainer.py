"""Training: state, the jitted sharded train step (with gradient accumulation), the loop.

`Trainer(config, workdir)` builds everything from a run config (`configs/*.py`):
model + params (from a converted dir, or random for a preset), mesh and shardings,
optimiser, data iterator, checkpoint manager (auto-resume), metrics writers; `run()`
trains and exports. The pieces are plain functions that tests call directly:
`make_train_step`, `create_sharded_state`, `jit_train_step`, `SyntheticBatches`.

The step: ``state, metrics = step(state, batch)``. The global batch is split into
`microbatches` slices (sample ``i * G + g`` goes to slice ``g``, so every device keeps
its own samples) that a `lax.scan` runs one after the other, summing gradients. The loss
denominators (answer tokens, image samples, samples) are computed from the whole global
batch first, and every random decision is keyed by (step, sample index in the global
batch): the loss, gradients and decisions do not depend on the number of devices or
micro-batches (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import model as M
from . import objective as O
from . import optim
from . import paths
from . import sharding as S
from .checkpoint import CheckpointDirError, checkpoint_shapes
from .config import ModelConfig, preset as model_preset
from .preemption import StopSignals
from .workdir_lock import WorkdirLock
from .train_checkpoint import (CheckpointCorrupt, TrainCheckpointer, abstract_like,
                               export_converted)

log = logging.getLogger("dynllava_jax.trainer")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TINY = REPO_ROOT / "assets" / "tiny-dynamic-llava"
# What the data pipeline reads from the assets dir (copied locally when it is a URL).
ASSET_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.json", "added_tokens.json", "preprocessor_config.json")


# -- state ------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 [], optimiser updates done
    params: Any           # trainable groups (see optim.trainable_groups)
    frozen: Any           # frozen groups: no gradient, no optimiser state
    opt_state: Any
    rng: jax.Array        # uint32 [2]; step rng = fold_in(rng, step)

    def all_params(self):
        return optim.merge_params(self.params, self.frozen)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the jitted step needs besides the model config (static)."""
    total_steps: int
    microbatches: int = 1
    remat: str = "none"
    objective: O.Objective = O.Objective()


def make_train_step(cfg: ModelConfig, sc: StepConfig, tx: optax.GradientTransformation,
                    schedules: dict, mesh=None) -> Callable:
    """The (un-jitted) train step ``(state, batch) -> (state, metrics)``."""
    g, ob = int(sc.microbatches), sc.objective
    constrain = None
    if mesh is not None:  # activations: batch over ('data', 'fsdp')
        def constrain(x):
            return jax.lax.with_sharding_constraint(
                x, jax.sharding.NamedSharding(mesh, S.batch_spec(x.ndim, mesh)))

    def step_fn(state: TrainState, batch: dict):
        b = batch["tokens"].shape[0]
        if b % g:
            raise ValueError(f"batch {b} is not divisible by {g} micro-batches")
        tau = O.gumbel_tau(state.step, sc.total_steps, ob.gumbel_start_tau, ob.gumbel_end_tau)
        rng = jax.random.fold_in(state.rng, state.step)
        batch, denom = O.step_inputs(batch, cfg, ob, rng)

        def micro(tp, mb):
            sums, _ = O.forward_train(optim.merge_params(tp, state.frozen), cfg, mb, rng, tau,
                                      ob, remat=sc.remat, constrain=constrain)
            loss, _ = O.combine(sums, denom, cfg, ob)
            return loss, jax.tree_util.tree_map(jnp.sum, sums)

        grad_fn = jax.value_and_grad(micro, has_aux=True)
        if g == 1:
            (_, sums), grads = grad_fn(state.params, batch)
        else:
            mbs = jax.tree_util.tree_map(
                lambda x: x.reshape((b // g, g) + x.shape[1:]).swapaxes(0, 1), batch)
            if mesh is not None:
                mbs = jax.tree_util.tree_map(
                    lambda x: jax.lax.with_sharding_constraint(
                        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                            None, *S.batch_spec(x.ndim - 1, mesh)))), mbs)

            def body(carry, mb):
                gacc, sacc = carry
                (_, s), gr = grad_fn(state.params, mb)
                gacc = jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), gacc, gr)
                sacc = jax.tree_util.tree_map(jnp.add, sacc, s)
                return (gacc, sacc), None

            g0 = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            # zeros of whatever sums forward_train returns (its structure, traced, not run)
            s_shape = jax.eval_shape(grad_fn, state.params,
                                     jax.tree_util.tree_map(lambda x: x[0], mbs))[0][1]
            s0 = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), s_shape)
            (grads, sums), _ = jax.lax.scan(body, (g0, s0), mbs)
            grads = jax.tree_util.tree_map(lambda x, p: x.astype(p.dtype), grads, state.params)
        _, metrics = O.combine(sums, denom, cfg, ob)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(
            grad_norm=optax.tree.norm(grads), tau=tau,
            lr=schedules["lr"](state.step), predictor_lr=schedules["predictor_lr"](state.step))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return step_fn


def init_train_state(params: dict, tx, rng, groups) -> TrainState:
    trainable, frozen = optim.split_params(params, groups)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=rng)


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
    """Shardings of a TrainState (from its jax.eval_shape)."""
    rep = S.replicated(mesh)
    return TrainState(
        step=rep,
        params=S.param_shardings(abstract_state.params, mesh),
        frozen=S.param_shardings(abstract_state.frozen, mesh),
        opt_state=S.mirror_shardings(abstract_state.opt_state, abstract_state.params, mesh),
        rng=rep)


def jit_train_step(step_fn, state_sh, batch_sh, mesh):
    rep = S.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))


def create_sharded_state(params: dict, tx, rng, groups, mesh) -> tuple[TrainState, TrainState]:
    """(state placed on the mesh, its shardings). Params are put on the mesh leaf by leaf;
    the optimiser state is created by a jitted init directly in its sharding."""
    trainable, frozen = optim.split_params(params, groups)
    abstract = jax.eval_shape(lambda p, f: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, frozen=f, opt_state=tx.init(p),
        rng=jnp.zeros((2,), jnp.uint32)), trainable, frozen)
    sh = state_shardings(abstract, mesh)
    trainable = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), trainable, sh.params)
    frozen = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), frozen, sh.frozen)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(trainable)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sh.step), params=trainable,
                       frozen=frozen, opt_state=opt_state,
                       rng=jax.device_put(jnp.asarray(rng, jnp.uint32), sh.rng))
    return state, sh


# -- synthetic in-memory batches ---------------------------------------------------------
class SyntheticBatches:
    """Deterministic, learnable batches in the data pipeline's format (tests, benchmarks).

    Sample: BOS, a few prompt tokens, the image slots (for ``1 - text_only_frac`` of the
    samples), a question, then an answer (labels) counting up from a random token
    ``a, a+1, a+2, ...`` and EOS. Batch ``i`` depends only on (seed, i); the iterator
    state is the next index (``get_state``/``set_state``, grain style).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, seq_len: int, seed: int = 0,
                 text_only_frac: float = 0.25, answer_len: tuple[int, int] = (8, 40),
                 shard_index: int = 0, shard_count: int = 1):
        self.cfg, self.b, self.t, self.seed = cfg, batch_size, seq_len, seed
        self.text_only_frac, self.answer_len = text_only_frac, answer_len
        self.shard_index, self.shard_count = shard_index, shard_count
        self.index = 0

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        out = self.batch(self.index)
        self.index += 1
        return out

    def batch(self, i: int) -> dict:
        c, t = self.cfg, self.t
        v = c.llm.vocab_size
        n_img, s = c.num_image_tokens, c.vision.image_size
        full = self.b * self.shard_count
        rng = np.random.default_rng([self.seed, i])
        tokens = np.zeros((full, t), np.int32)
        labels = np.full((full, t), -100, np.int32)
        lengths = np.zeros((full,), np.int32)
        image_start = np.full((full,), -1, np.int32)
        pixels = np.zeros((full, 3, s, s), np.float32)
        for r in range(full):
            has_img = rng.random() >= self.text_only_frac
            pre = [c.bos_token_id] + list(rng.integers(3, v, 3))
            q = list(rng.integers(3, v, int(rng.integers(3, 9))))
            room = t - len(pre) - len(q) - 1 - (n_img if has_img else 0)
            lo, hi = self.answer_len
            n_ans = int(min(rng.integers(lo, hi + 1), room))
            if n_ans < 1:
                raise ValueError(f"seq_len {t} too short for a synthetic sample")
            a0 = int(rng.integers(3, v))
            ans = [3 + (a0 - 3 + k) % (v - 3) for k in range(n_ans)] + [c.eos_token_id]
            row = list(pre)
            if has_img:
                image_start[r] = len(row)
                row += [c.pad_token_id] * n_img
                pixels[r] = rng.standard_normal((3, s, s), np.float32)
            row += q
            a_start = len(row)
            row += ans
            tokens[r, :len(row)] = row
            labels[r, a_start:len(row)] = ans
            lengths[r] = len(row)
        sl = slice(self.shard_index * self.b, (self.shard_index + 1) * self.b)
        return {"tokens": tokens[sl], "labels": labels[sl], "lengths": lengths[sl],
                "image_start": image_start[sl], "pixels": pixels[sl]}


# -- the run -----------------------------------------------------------------------------
_STEP_CACHE: dict = {}


def clean_stale_temporaries(workdir) -> None:
    """Remove what a run killed during its export left in the workdir (the lock is held,
    so nothing else is writing): `.export.tmp-*` folders, and `export.old` (put back as
    `export` when the kill came between the two renames of `replace_dir`)."""
    wd = paths.as_path(workdir)
    for tmp in wd.glob(".export.tmp-*"):
        log.warning("removing %s, left by an export that did not finish", tmp)
        tmp.rmtree()
    old, export = wd / "export.old", wd / "export"
    if old.exists():
        if export.exists():
            log.warning("removing %s, left by an export that did not finish", old)
            old.rmtree()
        else:
            log.warning("restoring %s from %s (an export was interrupted)", export, old)
            old.rename(export)


def _frozen_items(cd) -> tuple:
    d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    return tuple(sorted((k, repr(v)) for k, v in d.items()))


def resolve_path(p: str, what: str = "init_from"):
    """A path as given, else relative to the repository root (configs name assets/...);
    a URL (gs://...) as an epath.Path."""
    if paths.is_url(p):
        return paths.check_usable(p, what)
    path = Path(p).expanduser()
    if path.exists() or path.is_absolute():
        return path
    alt = REPO_ROOT / path
    return alt if alt.exists() else path


class MetricsWriter:
    """metrics.jsonl + TensorBoard (tensorboardX) in the workdir; host 0 only.

    Local files are appended to. On a bucket (no appends) the file is rewritten whole,
    at most every `flush_every_s` seconds and at `close`; TensorBoard events likewise
    (`tb_events.register`).
    """

    def __init__(self, workdir, resume_step: int = 0, flush_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        self.path = paths.as_path(workdir) / "metrics.jsonl"
        self.remote = paths.is_url(self.path)
        self.flush_every_s, self._flushed = flush_every_s, time.monotonic()
        self.rows: list[str] = []
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():  # drop what a killed run logged after its last checkpoint
            self.rows = [json.dumps(r) for r in _read_rows(self.path)
                         if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in self.rows))
        try:
            from tensorboardX import SummaryWriter
            from .tb_events import register
            register()
            self.tb = SummaryWriter(os.fspath(paths.as_path(workdir) / "tb"))
        except Exception as e:  # pragma: no cover
            log.warning("TensorBoard disabled: %s", e)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
        self.rows.append(row)
        if not self.remote:
            with self.path.open("a") as f:
                f.write(row + "\n")
        elif time.monotonic() - self._flushed >= self.flush_every_s:
            self.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", float(v), int(step))

    def flush(self) -> None:
        if self.enabled and self.remote:
            self.path.write_text("".join(ln + "\n" for ln in self.rows))
            self._flushed = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


def _read_rows(path) -> list[dict]:
    """The JSON rows of a metrics.jsonl. A torn last line (a kill or power loss mid-write)
    is dropped with a warning; a bad line elsewhere is an error naming the file and line."""
    lines = paths.as_path(path).read_text().splitlines()
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            r = json.loads(ln)
            if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                raise ValueError("not a row with an integer 'step'")
        except ValueError as e:
            if all(not x.strip() for x in lines[i + 1:]):
                log.warning("%s: dropping a torn last line (%d bytes): %s", path, len(ln), e)
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics row: {e}") from None
        rows.append(r)
    return rows


def read_metrics(workdir) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (the last row per step wins)."""
    path = paths.as_path(workdir) / "metrics.jsonl"
    rows = {r["step"]: r for r in _read_rows(path)} if path.exists() else {}
    return [rows[k] for k in sorted(rows)]


def format_metrics(step: int, m: dict) -> str:
    def f(k, fmt="{:.4f}"):
        return fmt.format(m[k]) if k in m else "-"
    return (f"step {step} loss {f('loss')} ce {f('ce')} img_ratio_loss {f('img_ratio_loss')} "
            f"txt_ratio_loss {f('txt_ratio_loss')} "
            + (f"cell_loss {f('cell_loss')} " if "cell_loss" in m else "")
            + (f"attn_loss {f('attn_loss')} attn_mass {f('attn_mass', '{:.3f}')} "
               if "attn_loss" in m else "")
            + (f"pair_loss {f('pair_loss')} pair_mass {f('pair_mass', '{:.3f}')} "
               if "pair_loss" in m else "")
            + (f"choice_loss {f('choice_loss')} choice_mass {f('choice_mass', '{:.3f}')} "
               if "choice_loss" in m else "")
            + (f"letter_loss {f('letter_loss')} letter_mass {f('letter_mass', '{:.3f}')} "
               if "letter_loss" in m else "")
            + (f"copy_loss {f('copy_loss')} " if "copy_loss" in m else "")
            + f"img_kept {f('img_kept', '{:.3f}')} "
            f"txt_kept {f('txt_kept', '{:.3f}')} tau {f('tau', '{:.3f}')} "
            f"lr {f('lr', '{:.2e}')} pred_lr {f('predictor_lr', '{:.2e}')} "
            f"grad_norm {f('grad_norm', '{:.3f}')} tok/s {f('tokens_per_s', '{:.0f}')} "
            f"s/step {f('step_time', '{:.3f}')}")


def _check_assets(assets_dir: Path, cfg: ModelConfig) -> None:
    """A fresh model's tokenizer and image processor must fit its preset's shapes."""
    from .image_processing import ImageProcessor
    from .tokenizer import LlavaTokenizer
    for name in ("tokenizer.model", "preprocessor_config.json"):
        if not (assets_dir / name).is_file():
            raise FileNotFoundError(f"assets_dir {assets_dir} has no {name}")
    vocab = LlavaTokenizer.from_dir(assets_dir).vocab_size
    if vocab > cfg.llm.vocab_size:
        raise ValueError(f"the tokenizer in {assets_dir} has {vocab} pieces; the model preset "
                         f"holds {cfg.llm.vocab_size}")
    size = ImageProcessor.from_dir(assets_dir).image_size
    if size != cfg.vision.image_size:
        raise ValueError(f"{assets_dir}/preprocessor_config.json crops {size} px; the model "
                         f"preset takes {cfg.vision.image_size} px")


class Trainer:
    """One training run in a workdir (see the module docstring)."""

    def __init__(self, config, workdir: str | Path, init_from: Optional[str] = None,
                 progress: bool = True, export_only: bool = False):
        """`export_only`: no data pipeline (a checkpoint written by any number of hosts can
        then be restored and exported on one)."""
        self.config = config
        self.workdir = paths.check_usable(workdir, "--workdir")  # local or a bucket URL
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        dc = config.distributed
        S.maybe_initialize_distributed(dc.coordinator, dc.num_processes, dc.process_id)
        self.ckpt, self.stopped = None, None
        self.lock = WorkdirLock(self.workdir,
                                float(config.checkpoint.get("lock_stale_after_s", 600))).acquire()
        try:
            self._setup(config, init_from, export_only)
        except BaseException:
            if self.ckpt is not None:
                self.ckpt.close()
            self.lock.release()
            raise

    def _setup(self, config, init_from, export_only):
        if jax.process_index() == 0:
            clean_stale_temporaries(self.workdir)
        if init_from:
            config.init_from = init_from
        self.mesh = S.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        self._setup_model_config()
        tc = config.train
        self.global_batch = int(tc.global_batch_size)
        dp = S.data_parallel_size(self.mesh)
        g = int(tc.microbatches)
        if self.global_batch % (dp * g):
            raise ValueError(f"global_batch_size {self.global_batch} must be divisible by "
                             f"data x fsdp ({dp}) x microbatches ({g})")
        if self.global_batch % jax.process_count():
            raise ValueError(f"global_batch_size {self.global_batch} is not divisible by the "
                             f"{jax.process_count()} hosts")
        self.host_batch = self.global_batch // jax.process_count()
        if export_only:
            self.iterator, self.total_steps = None, max(int(tc.total_steps), 1)
        else:
            self.iterator, num_records = self._make_data()
            self.total_steps = self._total_steps(num_records)
        self.tx, self.schedules = optim.make_optimizer(config.optim, self.total_steps)
        self.step_config = StepConfig(
            total_steps=self.total_steps, microbatches=g, remat=tc.remat,
            objective=O.Objective.from_config(config.objective, config.data.get("cell_grid", 0)))
        self._check_tower_pretraining()
        self._check_dense_fraction()
        self._check_cells()
        ck = config.checkpoint
        self.ckpt = TrainCheckpointer(self.workdir / "checkpoints", ck.every, ck.keep,
                                      ck.async_save)
        if not export_only:
            self._check_schedule()
        self._init_state()
        self._compile_step()

    # -- setup ---------------------------------------------------------------------------
    def _check_tower_pretraining(self):
        """objective.ce_loss_weight 0 skips the LLM: only a loss that does not read it may be
        on (the cell objective), and something must be trained."""
        ob = self.step_config.objective
        if ob.ce_loss_weight < 0:
            raise ValueError(f"objective.ce_loss_weight must be >= 0, not {ob.ce_loss_weight}")
        if ob.ce_loss_weight:
            return
        on = [k for k in ("attention_loss_weight", "pair_loss_weight", "choice_loss_weight",
                          "letter_loss_weight", "copy_loss_weight") if getattr(ob, k)]
        if O.sparsifies(self.cfg):
            on.append("the predictors (sparse.use_vision_predictor / use_output_text_predictor)")
        if on:
            raise ValueError("objective.ce_loss_weight = 0 runs no LLM (tower pretraining), "
                             f"but these read it: {', '.join(on)}")
        if not ob.cell_loss_weight:
            raise ValueError("objective.ce_loss_weight = 0 leaves nothing to train: set "
                             "objective.cell_loss_weight > 0 (tower pretraining)")

    def _check_dense_fraction(self):
        """objective.dense_fraction: a share of each global batch that runs unpruned, only
        meaningful while a predictor prunes, and at least one row and one pruned row."""
        f = self.step_config.objective.dense_fraction
        b = int(self.config.train.global_batch_size)
        if not f:
            return
        if not 0.0 < f < 1.0:
            raise ValueError(f"objective.dense_fraction must be in [0, 1), not {f}")
        if not O.sparsifies(self.cfg):
            raise ValueError("objective.dense_fraction keeps rows unpruned, but no predictor "
                             "prunes (sparse.use_vision_predictor / use_output_text_predictor)")
        n = round(f * b)
        if not 0 < n < b:
            raise ValueError(f"objective.dense_fraction {f} of a global batch of {b} is {n} "
                             "rows: it must be at least one row and leave one pruned")

    def _check_cells(self):
        """The cell objective needs cell labels from the JSON pipeline and a grid that tiles
        the image tokens."""
        c, v = self.config, self.cfg.vision
        self.cell_grid = g = int(c.data.get("cell_grid", 0))
        if self.step_config.objective.cell_loss_weight and not g:
            raise ValueError("objective.cell_loss_weight needs data.cell_grid > 0 (records "
                             "with cell_text)")
        if g and c.train.data != "pipeline":
            raise ValueError("data.cell_grid needs train.data='pipeline'")
        side = v.image_size // v.patch_size
        if g and side % g:
            raise ValueError(f"data.cell_grid {g} does not divide the {side} x {side} image tokens")
        self.attention_turns = r = int(c.data.get("attention_turns", 0))
        ob = self.step_config.objective
        if ob.attention_loss_weight and not r:
            raise ValueError("objective.attention_loss_weight needs data.attention_turns > 0 "
                             "(records with turn_cells)")
        if r and not g:
            raise ValueError("data.attention_turns needs data.cell_grid > 0: turn_cells are "
                             "cells of that grid")
        if r and c.train.data != "pipeline":
            raise ValueError("data.attention_turns needs train.data='pipeline'")
        if r:
            O.check_attention_options(self.cfg, ob.attention_layer, ob.attention_head,
                                      ob.attention_target)
        self.attention_pairs = pr = bool(c.data.get("attention_pairs", False))
        if ob.pair_loss_weight and not pr:
            raise ValueError("objective.pair_loss_weight needs data.attention_pairs = True "
                             "(records with turn_pairs)")
        if pr and not r:
            raise ValueError("data.attention_pairs needs data.attention_turns > 0")
        if pr:
            O.check_attention_options(self.cfg, ob.attention_layer, ob.attention_head + 1,
                                      ob.attention_target)
        self.choice_targets = ch = bool(c.data.get("choice_targets", False))
        for k in ("choice_loss_weight", "letter_loss_weight", "copy_loss_weight"):
            if getattr(ob, k) and not ch:
                raise ValueError(f"objective.{k} needs data.choice_targets = True")
        if ch and c.train.data != "pipeline":
            raise ValueError("data.choice_targets needs train.data='pipeline'")
        if ch:
            O.check_choice_options(self.cfg, ob.choice_layer, ob.choice_head)
            O.check_choice_options(self.cfg, ob.letter_layer, ob.letter_head, "letter")

    def _setup_model_config(self):
        from .checkpoint import load_config
        c = self.config
        if c.init_from in ("", None):
            raise ValueError("no model: set --init-from CONVERTED_DIR (or config.init_from), "
                             "or init_from=random with model_preset")
        if c.init_from == "random":
            cfg = model_preset(c.model_preset)
            self.init_dir = None
            self.assets_dir = (resolve_path(c.assets_dir, "assets_dir") if c.assets_dir
                               else DEFAULT_TINY)
            _check_assets(self.assets_dir, cfg)
        else:
            self.init_dir = resolve_path(c.init_from)
            cfg = load_config(self.init_dir)
            self.assets_dir = (resolve_path(c.assets_dir, "assets_dir") if c.assets_dir
                               else self.init_dir)
        self.export_cfg_base = cfg
        sp = {k: v for k, v in c.sparse.to_dict().items()}
        cfg = cfg.replace_sparse(enabled=True, **sp)
        self.export_cfg = cfg  # dtype fields as in the source checkpoint
        self.cfg = cfg.replace(dtype=c.dtype, param_dtype=c.param_dtype)

    def _abstract_params(self) -> dict:
        """ShapeDtypeStructs (param_dtype) of the params this run trains: the init dir's
        tree read from its Orbax metadata (nothing loaded), plus predictors if missing; or
        the preset's `init_params` tree."""
        dt = jnp.dtype(self.cfg.param_dtype)
        pred = jax.eval_shape(lambda: M.init_predictors(self.cfg, jax.random.PRNGKey(0)))
        if self.init_dir is None:
            tree = jax.eval_shape(lambda: M.init_params(self.cfg, jax.random.PRNGKey(0),
                                                        with_predictors=True))
        else:
            tree = checkpoint_shapes(self.init_dir / "params")
            self.missing_predictors = [k for k in pred if k not in tree]
            tree.update({k: pred[k] for k in self.missing_predictors})
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, dt if jnp.issubdtype(x.dtype, jnp.floating)
                                           else x.dtype), tree)

    def _load_params(self, abstract: dict, shardings: dict) -> dict:
        """The initial params, created or restored directly in their shardings (a host
        never holds the whole model)."""
        seed = int(self.config.train.seed)
        key = jax.random.PRNGKey(seed)
        std = float(self.config.get("init_std", 0.0))

        def fresh_params(k):
            return optim.cast_tree(
                M.init_params(self.cfg, k, with_predictors=True, llm_init_std=std),
                self.cfg.param_dtype)
        if self.init_dir is None:
            return jax.jit(fresh_params, out_shardings=shardings)(key)
        from .checkpoint import load_params
        missing = set(self.missing_predictors)
        redraw = self.reinit_groups(set(abstract))
        target = {k: jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), v, shardings[k])
            for k, v in abstract.items() if k not in missing}
        params = dict(load_params(self.init_dir, target))  # all of it: checksums cover all
        if redraw:
            log.info("drawing %s anew (init_std %s) instead of loading them from %s",
                     sorted(redraw), std or "flax defaults", self.init_dir)
            params.update(jax.jit(lambda k: {n: v for n, v in fresh_params(k).items()
                                             if n in redraw},
                                  out_shardings={n: shardings[n] for n in redraw})(
                jax.random.fold_in(key, 2)))
        if missing:
            log.info("%s has no predictors: initialising %s", self.init_dir, sorted(missing))
            pred_sh = {k: shardings[k] for k in missing}
            fresh = jax.jit(lambda k: {n: v for n, v in optim.cast_tree(
                M.init_predictors(self.cfg, k), self.cfg.param_dtype).items() if n in missing},
                out_shardings=pred_sh)(jax.random.fold_in(key, 1))
            params.update(fresh)
        return params

    def reinit_groups(self, known: set) -> set:
        """The top-level param groups (of `known`) that `config.reinit` names ("llm",
        "projector", ...): drawn anew rather than loaded from init_from."""
        names = {n.strip() for n in str(self.config.get("reinit", "")).split(",") if n.strip()}
        if names - known:
            raise ValueError(f"reinit names {sorted(names - known)}; param groups are "
                             f"{sorted(known)}")
        if names and self.init_dir is None:
            raise ValueError("reinit needs init_from: with init_from=random every group is new")
        return names

    def _make_data(self):
        c, cfg = self.config, self.cfg
        seed = int(c.train.seed)
        if c.train.data == "random":
            it = SyntheticBatches(cfg, self.host_batch, int(c.data.seq_len), seed,
                                  shard_index=jax.process_index(),
                                  shard_count=jax.process_count())
            return it, 0
        if c.train.data != "pipeline":
            raise ValueError(f"train.data must be 'pipeline' or 'random', not {c.train.data!r}")
        from .data.pipeline import make_iterator, make_source
        from .image_processing import ImageProcessor
        from .tokenizer import LlavaTokenizer
        dc = c.data
        if dc.source == "json" and not dc.json_path:
            if c.synthetic.n <= 0:
                raise ValueError("no data: set data.json_path (or data.source=tfds), or "
                                 "synthetic.n > 0 for a generated dataset")
            out = self.workdir / "data"
            writer = jax.process_index() == 0
            if paths.is_url(out):
                # The pipeline reads local files: a bucket workdir gets the (deterministic)
                # generated set in a local cache, written by every host for itself.
                out = paths.cache_dir("synthetic") / (
                    f"n{int(c.synthetic.n)}-seed{int(c.synthetic.seed)}-"
                    f"px{cfg.vision.image_size}")
                writer = True
            if not (out / "data.json").exists() and writer:
                from .data.synthetic import write_synthetic_dataset
                write_synthetic_dataset(out, int(c.synthetic.n), int(c.synthetic.seed),
                                        cfg.vision.image_size)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("synthetic data written")
            dc.json_path = str(out / "data.json")
            dc.image_folder = str(out)
        local_assets = paths.local_copy(self.assets_dir, ASSET_FILES)
        tok = LlavaTokenizer.from_dir(local_assets)
        ip = ImageProcessor.from_dir(local_assets)
        source = make_source(dc)  # parsed once (mix665k's JSON takes seconds)
        num_records = len(source)
        if dc.get("requires_image", False):
            # An epoch holds only the image records (text-only ones are dropped).
            if hasattr(source, "num_with_image"):
                num_records = source.num_with_image
            elif not c.train.total_steps:
                logging.getLogger(__name__).warning(
                    "data.requires_image with a tfds source: the epoch length counts text-only "
                    "records too; set train.total_steps for an exact schedule")
        it = make_iterator(dc, tok, ip, cfg.num_image_tokens, seed=seed,
                           shard_index=jax.process_index(), shard_count=jax.process_count(),
                           batch_size=self.host_batch, source=source)
        return it, num_records

    def _total_steps(self, num_records: int) -> int:
        tc = self.config.train
        if tc.total_steps and tc.total_steps > 0:
            return int(tc.total_steps)
        if num_records <= 0:
            raise ValueError("set train.total_steps (the data size is unknown)")
        steps = int(math.floor(num_records * float(tc.num_epochs) / self.global_batch))
        return max(steps, 1)

    def _check_schedule(self) -> None:
        """The schedules (lr, tau) are functions of total_steps: a resumed run that asks for
        another total would change them mid-run. WORKDIR/run.json records the first one."""
        rec_path = self.workdir / "run.json"
        rec = None
        if rec_path.exists() and self.ckpt.latest_step() is not None:
            try:
                rec = json.loads(rec_path.read_text())
                old = int(rec["total_steps"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{rec_path} is not a valid run record ({e}); delete it to "
                                 "record this run's schedule afresh") from None
            if old != self.total_steps:
                if not self.config.train.get("allow_schedule_change", False):
                    raise ValueError(
                        f"{self.workdir} was started with {old} total steps and this run asks "
                        f"for {self.total_steps} (train.total_steps / num_epochs): the lr and "
                        "tau schedules would be recomputed mid-run. Train further in a new "
                        "--workdir with --init-from WORKDIR/export, or pass "
                        "--config.train.allow_schedule_change=true")
                log.warning("total steps %d -> %d: the lr and tau schedules change from the "
                            "resumed step on (train.allow_schedule_change)", old, self.total_steps)
                rec = None
        if rec is None and jax.process_index() == 0:
            rec_path.write_text(json.dumps({"total_steps": self.total_steps}) + "\n")

    def _groups(self, params) -> tuple:
        oc = self.config.optim
        return optim.trainable_groups(params, train_projector=oc.train_projector,
                                      train_llm=oc.train_llm,
                                      train_vision=bool(oc.get("train_vision", False)))

    def _init_state(self):
        rng = jax.random.PRNGKey(int(self.config.train.seed))
        abstract_params = self._abstract_params()
        self.groups = self._groups(abstract_params)
        tr, fr = optim.split_params(abstract_params, self.groups)
        abstract = jax.eval_shape(lambda p, f: TrainState(
            step=jnp.zeros((), jnp.int32), params=p, frozen=f, opt_state=self.tx.init(p),
            rng=jnp.zeros((2,), jnp.uint32)), tr, fr)
        self.shardings = state_shardings(abstract, self.mesh)
        steps = self.ckpt.all_steps()
        if steps:
            self.state = self._restore_newest_intact(steps, abstract_like(abstract, self.shardings))
            return
        sh = self.shardings
        params = self._load_params(abstract_params, optim.merge_params(sh.params, sh.frozen))
        trainable, frozen = optim.split_params(params, self.groups)
        opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(trainable)
        self.state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sh.step),
                                params=trainable, frozen=frozen, opt_state=opt_state,
                                rng=jax.device_put(rng, sh.rng))
        self.start_step = 0

    def _restore_newest_intact(self, steps, target):
        """Restore the newest checkpoint that reads back whole; an unusable newer one is
        set aside (`<step>.corrupt`) with a warning naming it and why."""
        problems = []
        for step in sorted(steps, reverse=True):
            try:
                state = self.ckpt.restore(step, target, self.iterator)
            except CheckpointCorrupt as e:
                problems.append(str(e))
                continue
            for bad, why in zip(sorted(steps, reverse=True), problems):
                moved = self.ckpt.set_aside(bad)
                log.warning("checkpoint %d skipped (%s); moved to %s; resuming from step %d",
                            bad, why, moved, step)
            self.start_step = int(step)
            log.info("resumed from step %d", step)
            return state
        raise CheckpointDirError(
            f"no intact checkpoint in {self.ckpt.directory}: " + "; ".join(problems)
            + " (move the checkpoints away to start from step 0)")

    def _compile_step(self):
        key = (self.cfg, self.step_config, self.cell_grid, self.attention_turns,
               self.attention_pairs, self.choice_targets,
               _frozen_items(self.config.optim),
               self.groups, self.mesh, self.total_steps)
        fn = _STEP_CACHE.get(key)
        if fn is None:
            step_fn = make_train_step(self.cfg, self.step_config, self.tx, self.schedules,
                                      self.mesh)
            example = {"tokens": np.zeros((1, 1), np.int32), "labels": np.zeros((1, 1), np.int32),
                       "lengths": np.zeros((1,), np.int32),
                       "image_start": np.zeros((1,), np.int32),
                       "pixels": np.zeros((1, 1, 1, 1), np.float32)}
            if self.cell_grid:
                example["cell_targets"] = np.zeros((1, 1, 1), np.int32)
            if self.attention_turns:
                example["turn_cells"] = np.zeros((1, 1), np.int32)
            if self.attention_pairs:
                example["pair_cells"] = np.zeros((1, 1, 1), np.int32)
            if self.choice_targets:
                example["choice_keys"] = np.zeros((1, 1), np.int32)
                example["option_letters"] = np.zeros((1, 1), np.int32)
            fn = jit_train_step(step_fn, self.shardings, S.batch_shardings(example, self.mesh),
                                self.mesh)
            _STEP_CACHE[key] = fn
        self.step_fn = fn

    # -- loop ----------------------------------------------------------------------------
    def _global_batch(self, host_batch: dict) -> dict:
        keys = ("tokens", "labels", "lengths", "image_start", "pixels") + (
            ("cell_targets",) if self.cell_grid else ()) + (
            ("turn_cells",) if self.attention_turns else ()) + (
            ("pair_cells",) if self.attention_pairs else ()) + (
            ("choice_keys", "option_letters") if self.choice_targets else ())
        return S.host_local_to_global({k: host_batch[k] for k in keys}, self.mesh,
                                      self.global_batch)

    def run(self, stop_at: Optional[int] = None) -> dict:
        """Train until step `stop_at` (default: the end). Checkpoints every `every` steps;
        at the end of the run a final checkpoint and (if configured) the export."""
        c = self.config
        end = self.total_steps if stop_at is None else min(int(stop_at), self.total_steps)
        writer = MetricsWriter(self.workdir, self.start_step)
        step = saved = int(self.start_step)
        last = {}
        bar = None
        if self.progress and jax.process_index() == 0:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=step, desc="train", unit="step",
                       dynamic_ncols=True)
        log_every = max(int(c.train.log_every), 1)
        t_last, tokens_acc, steps_acc = time.perf_counter(), 0.0, 0
        self.stopped = None
        signals = StopSignals()
        try:
            signals.__enter__()
            while step < end:
                try:
                    host = next(self.iterator)
                except StopIteration:
                    log.warning("data exhausted at step %d", step)
                    break
                batch = self._global_batch(host)
                first = steps_acc == 0 and step == self.start_step
                if first:  # the first call compiles (seconds to minutes): say so, not "0/N"
                    if bar is not None:
                        bar.set_description_str("train (compiling the train step)")
                        bar.refresh()
                    elif jax.process_index() == 0:
                        log.info("compiling the train step ...")
                self.state, metrics = self.step_fn(self.state, batch)
                if first and bar is not None:
                    bar.set_description_str("train")
                step += 1
                tokens_acc += float(np.sum(host["lengths"])) * jax.process_count()
                steps_acc += 1
                if self.ckpt.save(step, self.state, self.iterator):
                    saved = step
                if step % log_every == 0 or step == end:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    m["step_time"] = (now - t_last) / steps_acc
                    m["tokens_per_s"] = tokens_acc / max(now - t_last, 1e-9)
                    if hasattr(self.iterator, "metrics"):  # the pipeline's skip counters
                        m.update({k: float(v) for k, v in self.iterator.metrics().items()})
                    t_last, tokens_acc, steps_acc = now, 0.0, 0
                    writer.write(step, m)
                    last = m
                    line = format_metrics(step, m)
                    if bar is not None:
                        bar.write(line)
                    elif jax.process_index() == 0 and not self.progress:
                        log.info(line)
                if bar is not None:
                    bar.update(1)
                    if last:
                        bar.set_postfix(loss=f"{last['loss']:.3f}", ce=f"{last['ce']:.3f}")
                self.stopped = signals.should_stop()  # every host, at this step boundary
                if self.stopped:
                    if saved != step:
                        self.ckpt.save(step, self.state, self.iterator, force=True)
                        saved = step
                    break
            if step >= self.total_steps and saved != step:
                self.ckpt.save(step, self.state, self.iterator, force=True)
            self.ckpt.wait()
        finally:
            signals.__exit__()
            self.ckpt.wait()  # never leave a save half-written behind an exception
            if bar is not None:
                bar.close()
            writer.close()
        self.step = step
        if step >= self.total_steps and c.checkpoint.export and not self.stopped:
            self.export(self.workdir / "export")  # every host gathers; process 0 writes
        return last

    def export(self, dst: Path) -> Path:
        params = self.state.all_params()
        base = self.export_cfg_base
        params = optim.cast_tree(params, base.param_dtype)
        return export_converted(dst, params, self.export_cfg, self.assets_dir)

    def close(self):
        try:
            self.ckpt.close()
        finally:
            self.lock.release()
