"""The Dynamic-LLaVA training objective (SPEC §4): training forward pass and loss.

Letters: B batch, T tokens, N image tokens, H hidden, V vocabulary.

Forward (nothing is removed; shapes are static):
  1. layers ``< l`` (``l = sparse_layer``) run plain causal attention over the whole
     sequence (padding keys masked);
  2. on the hidden states entering layer ``l``:
     * image decisions ``m_img [B, N] = gumbel_hard_keep(image_predictor(h_img), tau)``
       for samples with an image (the predictor's previous decision is all ones, as in the
       official code at its single sparse layer); text-only samples get no image decisions;
     * output-text decisions ``m_txt [B, T] = gumbel_hard_keep(text_predictor(h), tau)`` on
       the LAST assistant answer of each sample: the tokens after the last position whose
       label is ``-100``, up to the real length. This is exactly the official ``answer``
       span (``dynamic_llava_arch.py``: ``answer_start = where(labels == -100)[-1] + 1``,
       ``answer_end = len(sequence)``), so it includes the ``</s>`` that ends the answer.
       Answers shorter than ``output_text_len_for_training`` get decisions forced to 1
       (constants, no gradient) and contribute nothing to the text ratio loss. Unlike the
       official code (which switches all sparsification off for a batch holding a
       text-only sample, SPEC §5), text-only samples get output-text decisions too;
  3. policy ``p [B, T]``: 1 for every token that is neither an image token nor an answer
     token (padding included: padding keys are masked anyway), the decision otherwise;
     layers ``>= l`` run ``run_stack(..., policy=p)`` (MaskedSoftmax on top of the
     causal + padding mask).

Loss (per global batch; see `loss_denominators`):

  loss = CE + mask_loss_weight * (L_img + L_txt)

  CE    = next-token cross-entropy over every position whose *next* label is not -100
          (HF shift: logits[t] predict labels[t + 1]); these are all assistant answers of
          the conversation (not only the last) and each answer's closing ``</s>``.
          Which mean (`ce_weights`): ``ce_group_size = 0`` (default) is the token mean over
          the whole global batch; ``ce_group_size = k`` is the official one: the official
          ``CrossEntropyLoss()`` is a token mean over one device micro-batch, and DDP /
          gradient accumulation average those means (7B: 8 GPUs x 8 samples, k = 8;
          13B: 8 x 4 x 2 accumulation, k = 4), i.e. the mean over groups of k samples of
          each group's token mean. Either way each sample gets a weight computed from the
          whole global batch before it is split, so the loss does not depend on how the
          batch is split over devices or micro-batches (sharded == unsharded).
  L_img = sum_{b with image} (r_img - mean_i m_img[b, i])^2 / #(samples with an image)
          (official: ``((vision_keep_rate - mask.mean(1)) ** 2).mean()``; the official run
          uses image samples only (``--requires_image``), so its batch mean is this mean).
  L_txt = sum_{b: answer >= len_for_training} (r_txt - mean_{answer} m_txt[b])^2 / D_txt,
          D_txt = number of samples in the batch (the official code sets a short answer's
          target to its own ratio, so it adds 0 but still counts in ``.mean()``); setting
          ``text_ratio_mean = "eligible"`` divides by the number of long answers instead.

Optional dense rows (not in Dynamic-LLaVA; ``objective.dense_fraction`` f > 0): each step,
``round(f * B)`` rows of the global batch, drawn from the step's key (`dense_rows`), keep
every token (policy 1, no decisions) and count in neither ratio loss nor its denominator
(samples with an image, samples, long answers: the pruned rows' only). Their CE is the
dense model's, so the same weights stay good in dense inference while the other rows train
the model and the predictors under pruning.

Optional cell objective (not in Dynamic-LLaVA; ``objective.cell_loss_weight`` w > 0 with
batches that carry ``cell_targets [B, G*G, K]``, see ``data.cell_grid``): a direct path from
labels to the vision tower, for a tower trained from random weights (SynthVQA), which the
answers' loss alone reaches too weakly through the LLM's attention. The projected image
tokens are averaged over each cell of a G x G grid and scored against the LLM's input
embedding table (no new parameters: the cell's mean image token is pulled towards the
embeddings of the words that name its content, e.g. ``small red circle``):

  loss += w * sum_{b, cell, k: target >= 0} -log softmax(mean_cell(feats) E^T)[target]
            / #(targets >= 0 in the global batch)

With ``objective.ce_loss_weight = 0`` (tower pretraining) the CE is off and the LLM does not
run (``Objective.run_llm`` False): the loss is the cell objective alone.

Optional attention objective (not in Dynamic-LLaVA; ``objective.attention_loss_weight``
w > 0 with batches that carry ``turn_cells [B, R]``, see ``data.attention_turns``): a
supervised attention signal for an LLM trained from random weights, which otherwise does
not learn to find the object a question names among the image tokens (README, *The
SynthVQA model*: ``scripts/lookup_proxy.py``). At each position that predicts the first
token of an answer whose question names one grid cell (the r-th answer of a sample: the
r-th run of scored positions), head ``attention_head`` of layer ``attention_layer`` (its
softmax over the causal, unpadded keys, recomputed from the hidden states entering that
layer, before any sparsification) should put its mass on that cell's image tokens:

  loss += w * sum_{marked queries} -log(max(mass on the cell's image tokens, 1e-6))
            / #(marked queries in the global batch)

(``objective.attention_target = "uniform"``: -mean over the cell's image tokens of
log p(token) instead of -log(mass): the head is taught to read the whole cell.) With batches
that also carry ``pair_cells [B, R, 2]`` (``data.attention_pairs``: the two objects a
question about their relative position names) and ``objective.pair_loss_weight`` w > 0,
heads ``attention_head`` and ``attention_head + 1`` of that layer are taught the first and
the second object's cells in the same way, at the same position: w x the mean of those
-log(mass) over the marked (answer, object) pairs.

Optional choice objective (not in Dynamic-LLaVA; ``objective.choice_loss_weight`` w > 0
with batches that carry ``choice_keys [B, T]``, see ``data.choice_targets``): a multiple-
choice answer is the letter of the option whose text is the answer, so the LLM must find
that option in the prompt and copy the letter written before it. At the position that
predicts the first token of an answer that is one option's letter, head ``choice_head``
of layer ``choice_layer`` (its softmax as that layer computes it: at or past the sparse
layer the MaskedSoftmax of the step's decisions, held fixed) should put its mass on the
tokens of that option's text:

  loss += w * sum_{marked queries} -log(max(mass on the option's tokens, 1e-6))
            / #(marked queries in the global batch)

With ``objective.copy_loss_weight`` w > 0 (same batches), that head's own output there (its
attention-weighted values through its rows of ``o_proj``), read through the final norm and
the LM head alone, should predict the letter, so that what it reads is what it writes:

  loss += w * sum_{marked queries} -log softmax(lm_head(norm(head output)))[letter]
            / #(marked queries in the global batch)

What that head reads there must hold the letter to copy, which is written 2-3 tokens before
the option's text. Optional letter objective (``objective.letter_loss_weight`` w > 0, with
batches that carry ``option_letters [B, T]``, also from ``data.choice_targets``): at every
option's text, head ``letter_head`` of layer ``letter_layer`` should attend to the option's
letter:

  loss += w * sum_{option text tokens} -log(max(p(letter token), 1e-6))
            / #(option text tokens in the global batch)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M
from .config import ModelConfig
from .llama import RMSNorm, apply_rope, run_stack, split_layers
from .sparsity import gumbel_hard_keep, masked_softmax

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the loss holds and where its optional terms read: the ``objective.*`` options of
    the training config (same names; module doc), plus ``attention_grid`` (``data.cell_grid``:
    the grid of the attention objective's cells). The defaults are Dynamic-LLaVA's loss."""
    gumbel_start_tau: float = 1.0
    gumbel_end_tau: float = 0.1
    text_ratio_mean: str = "all"
    ce_group_size: int = 0
    ce_chunk: int = 0
    ce_loss_weight: float = 1.0
    cell_loss_weight: float = 0.0
    cell_per_token: bool = False
    attention_loss_weight: float = 0.0
    attention_grid: int = 0
    attention_layer: int = 1
    attention_head: int = 0
    attention_target: str = "mass"
    pair_loss_weight: float = 0.0
    choice_loss_weight: float = 0.0
    choice_layer: int = 2
    choice_head: int = 1
    letter_loss_weight: float = 0.0
    letter_layer: int = 0
    letter_head: int = 0
    copy_loss_weight: float = 0.0
    dense_fraction: float = 0.0

    @classmethod
    def from_config(cls, objective, cell_grid: int = 0) -> "Objective":
        """From a config's ``objective`` section (missing keys keep their defaults)."""
        kw = {f.name: type(f.default)(objective[f.name]) for f in dataclasses.fields(cls)
              if f.name in objective}
        return cls(**kw, attention_grid=int(cell_grid))

    @property
    def run_llm(self) -> bool:
        """False for tower pretraining (``ce_loss_weight = 0``): the LLM is not run."""
        return bool(self.ce_loss_weight)


def gumbel_tau(step, total_steps: int, tau_start: float = 1.0, tau_end: float = 0.1):
    """tau(step) = tau_start * (tau_end / tau_start) ** (step / total_steps) (official
    ``on_step_begin``: ``global_step / max_steps``, global_step counted from 0)."""
    frac = jnp.asarray(step, jnp.float32) / max(int(total_steps), 1)
    return tau_start * (tau_end / tau_start) ** frac


def answer_span(labels_BT, lengths_B):
    """(start [B], end [B]) of the last assistant answer: the tokens after the last
    ``-100`` label inside the real length, up to that length (official ``answer`` span)."""
    t = jnp.arange(labels_BT.shape[1])[None, :]
    ignored = (labels_BT == IGNORE) & (t < lengths_B[:, None])
    last = jnp.max(jnp.where(ignored, t, -1), axis=1)
    start = jnp.minimum(last + 1, lengths_B)
    return start.astype(jnp.int32), lengths_B.astype(jnp.int32)


def scored_targets(labels_BT):
    """(targets [B, T], weights [B, T]): position t is scored against labels[t + 1]."""
    tgt = jnp.concatenate([labels_BT[:, 1:], jnp.full_like(labels_BT[:, :1], IGNORE)], axis=1)
    return tgt, (tgt != IGNORE)


def ce_weights(labels_BT, group_size: int = 0):
    """Per-sample weight [B] of the summed token NLL in the CE term (see module doc)."""
    _, w = scored_targets(labels_BT)
    n = w.sum(1).astype(jnp.float32)
    b = labels_BT.shape[0]
    if group_size <= 0 or group_size >= b:  # one group: the token mean of the whole batch
        return jnp.full((b,), 1.0, jnp.float32) / jnp.maximum(n.sum(), 1.0)
    if b % group_size:
        raise ValueError(f"batch {b} is not a multiple of ce_group_size {group_size}")
    groups = b // group_size
    tok = n.reshape(groups, group_size).sum(1)
    per = 1.0 / (groups * jnp.maximum(tok, 1.0))
    return jnp.repeat(per, group_size)


def loss_denominators(batch: dict, cfg: ModelConfig, text_ratio_mean: str = "all") -> dict:
    """Global normalisers, computed once over the whole (global) batch before any split
    into micro-batches, so that summing micro-batch losses gives the full-batch loss."""
    _, w = scored_targets(batch["labels"])
    start, end = answer_span(batch["labels"], batch["lengths"])
    n = batch["labels"].shape[0]
    long = (end - start) >= cfg.sparse.output_text_len_for_training
    if text_ratio_mean not in ("all", "eligible"):
        raise ValueError(f"text_ratio_mean must be 'all' or 'eligible', not {text_ratio_mean!r}")
    one = jnp.float32(1.0)
    cells = batch.get("cell_targets")
    n_cells = (jnp.float32(0.0) if cells is None else
               scored_cells(cells, batch["image_start"]).sum().astype(jnp.float32))
    turns = batch.get("turn_cells")
    n_attn = (jnp.float32(0.0) if turns is None else
              (attention_queries(batch["labels"], turns, batch["image_start"]) >= 0)
              .sum().astype(jnp.float32))
    pairs = batch.get("pair_cells")
    n_pair = (jnp.float32(0.0) if pairs is None else sum(
        (attention_queries(batch["labels"], pairs[..., k], batch["image_start"]) >= 0)
        .sum().astype(jnp.float32) for k in range(2)))
    # dense rows (`dense_rows`) are not pruned: the ratio losses average over the others
    pruned = ~batch["dense_rows"] if "dense_rows" in batch else jnp.ones((n,), bool)
    if text_ratio_mean == "all":
        n_txt = pruned.sum().astype(jnp.float32)
    else:
        n_txt = (long & pruned).sum().astype(jnp.float32)
    ckeys = batch.get("choice_keys")
    n_choice = (jnp.float32(0.0) if ckeys is None else
                (choice_queries(batch["labels"], ckeys) >= 0).sum().astype(jnp.float32))
    letters = batch.get("option_letters")
    n_letter = (jnp.float32(0.0) if letters is None else
                (letters >= 0).sum().astype(jnp.float32))
    return {
        "attn": jnp.maximum(n_attn, one),
        "letter": jnp.maximum(n_letter, one),
        "choice": jnp.maximum(n_choice, one),
        "pair": jnp.maximum(n_pair, one),
        "cells": jnp.maximum(n_cells, one),
        "tokens": jnp.maximum(w.sum().astype(jnp.float32), one),
        "img": jnp.maximum(((batch["image_start"] >= 0) & pruned).sum().astype(jnp.float32),
                           one),
        "txt": jnp.maximum(n_txt, one),
        "txt_long": jnp.maximum((long & pruned).sum().astype(jnp.float32), one),
    }


def dense_rows(rng, batch_size: int, fraction: float):
    """[B] bool: which rows of a global batch run unpruned (``objective.dense_fraction``):
    ``round(fraction * B)`` rows, drawn afresh each step from the step's key, so that the
    same weights stay good with every token kept (dense inference) while the others train
    the predictors and the model under pruning."""
    n = int(round(fraction * batch_size))
    perm = jax.random.permutation(jax.random.fold_in(rng, 0x64656E), batch_size)
    return perm < n


def sample_keys(rng, sample_ids_B):
    """One key per sample from its index in the global batch: decisions do not depend on
    how the batch is split over devices or micro-batches."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(sample_ids_B)


def token_nll(params, cfg: ModelConfig, x_BTH, tgt_BT, chunk: int = 0, constrain=None):
    """-log p(target) per token from the last hidden states, in float32.

    chunk > 0 computes the LM head over `chunk` tokens at a time under `jax.checkpoint`, so
    the [B, T, V] logits (2 GB per 8 x 2048 tokens at V = 32000) never exist at once, in the
    forward or the backward pass; the values are the same per token."""
    cons = constrain if constrain is not None else (lambda a: a)

    def nll(x, tgt):
        logits = cons(M.lm_logits(params, cfg, x))
        # logsumexp(logits) - logit[target]: no second [B, T, V] buffer for log_softmax
        picked = jnp.take_along_axis(logits, jnp.clip(tgt, 0, logits.shape[-1] - 1)[..., None],
                                     axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    b, t, h = x_BTH.shape
    if chunk <= 0 or chunk >= t:
        return nll(cons(x_BTH), tgt_BT)
    if t % chunk:
        raise ValueError(f"objective.ce_chunk {chunk} must divide the sequence length {t}")
    xs = x_BTH.reshape(b, t // chunk, chunk, h).swapaxes(0, 1)
    ts = tgt_BT.reshape(b, t // chunk, chunk).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(lambda a: nll(*a)), (xs, ts))
    return out.swapaxes(0, 1).reshape(b, t)


def forward_train(params, cfg: ModelConfig, batch: dict, rng, tau, obj: Objective = Objective(),
                  *, remat: str = "none", constrain=None):
    """Training forward pass. Returns per-sample sums [B] (see `combine`) and the policy.

    batch: tokens [B,T] int32, labels [B,T] int32, lengths [B], image_start [B] (-1: none),
    pixels [B,3,S,S] float32, optional sample_id [B] (index in the global batch; default
    arange(B)), optional ce_weight [B] (`ce_weights` of the global batch; default: token
    mean over this batch), optional cell_targets [B,G*G,K] (cell objective), optional
    turn_cells [B,R] (attention objective, over an ``obj.attention_grid`` grid: head
    ``obj.attention_head`` of layer ``obj.attention_layer``), optional pair_cells [B,R,2]
    (with turn_cells: heads ``attention_head`` and ``attention_head + 1``), optional
    choice_keys [B,T] (choice objective: head ``obj.choice_head`` of layer
    ``obj.choice_layer``), optional option_letters [B,T] (letter objective: head
    ``obj.letter_head`` of layer ``obj.letter_layer``), optional dense_rows [B] bool
    (`dense_rows`: those rows keep every token).
    obj.copy_loss_weight > 0 (with choice_keys): also the copy term's sums (the choice head's
    output through the LM head; 0: ``copy_sum`` stays zero, no second LM-head pass runs).
    rng: the step's key; tau: Gumbel temperature (scalar).
    constrain: optional ``f(x) -> x`` applied to the batch-leading activations (hidden
    states, logits): the trainer passes a sharding constraint (batch over data x fsdp).
    ``obj.ce_loss_weight = 0`` (tower pretraining): only the vision tower, the projector
    and the cell objective run; every LLM sum is zero, the policy None.
    """
    sc = cfg.sparse
    dt = M.compute_dtype(cfg)
    copy = bool(obj.copy_loss_weight)   # the copy term's second LM-head pass
    tokens, labels = batch["tokens"], batch["labels"]
    lengths, image_start = batch["lengths"], batch["image_start"]
    b, t = tokens.shape
    sample_id = batch.get("sample_id", jnp.arange(b, dtype=jnp.int32))
    keys = sample_keys(rng, sample_id)
    pair = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    k_img, k_txt = pair[:, 0], pair[:, 1]

    feats = M.image_features(params, cfg, batch["pixels"])
    cells = batch.get("cell_targets")
    cell_sum = (cell_nll(params, feats, cells, image_start, obj.cell_per_token)
                if cells is not None else jnp.zeros((b,), jnp.float32))
    zeros_B = jnp.zeros((b,), jnp.float32)
    out = {"img_sq": zeros_B, "img_kept": zeros_B, "has_img": zeros_B,
           "txt_sq": zeros_B, "txt_kept": zeros_B, "txt_long": zeros_B,
           "attn_sum": zeros_B, "attn_mass": zeros_B, "pair_sum": zeros_B,
           "pair_mass": zeros_B, "choice_sum": zeros_B, "choice_mass": zeros_B,
           "letter_sum": zeros_B, "letter_mass": zeros_B, "copy_sum": zeros_B,
           "cell_sum": cell_sum}
    if not obj.run_llm:
        _, w = scored_targets(labels)
        out.update(ce_sum=zeros_B, ce_w=zeros_B, tokens=w.sum(1).astype(jnp.float32))
        return out, None
    cons = constrain if constrain is not None else (lambda a: a)
    x = cons(M.embed_inputs(params, cfg, tokens, feats, image_start))
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))

    sparse = sparsifies(cfg)
    turns, ckeys = batch.get("turn_cells"), batch.get("choice_keys")
    pairs = batch.get("pair_cells")
    if pairs is not None:
        if turns is None:
            raise ValueError("pair_cells come with turn_cells (data.attention_turns > 0)")
        check_attention_options(cfg, obj.attention_layer, obj.attention_head + 1,
                                obj.attention_target)
    if turns is not None:
        check_attention_options(cfg, obj.attention_layer, obj.attention_head, obj.attention_target)
        if obj.attention_grid <= 0:
            raise ValueError("the attention objective needs the grid of turn_cells "
                             "(data.cell_grid > 0)")
    if ckeys is not None:
        check_choice_options(cfg, obj.choice_layer, obj.choice_head)
    letters = batch.get("option_letters")
    if letters is not None:
        check_choice_options(cfg, obj.letter_layer, obj.letter_head, "letter")
    # The stack runs in segments: at each layer below where a term reads the hidden states
    # entering it, the term is computed, then the rest runs as without it.
    stops = {cfg.llm.num_layers}
    stops |= {obj.attention_layer} if turns is not None else set()
    stops |= {sc.sparse_layer} if sparse else set()
    stops |= {obj.choice_layer} if ckeys is not None else set()
    stops |= {obj.letter_layer} if letters is not None else set()
    rest, at, policy = params["llm"]["layers"], 0, None
    for stop in sorted(stops):
        if stop > at:
            seg, rest = split_layers(rest, stop - at) if stop < cfg.llm.num_layers else (rest, None)
            x, _ = run_stack(seg, cfg.llm, dt, x, positions, lengths, policy=policy, remat=remat)
            at = stop
        if stop == cfg.llm.num_layers:
            break
        x = cons(x)
        if turns is not None and stop == obj.attention_layer:   # before anything is dropped
            cells_BT = attention_queries(labels, turns, image_start)
            a_sum, a_mass = attention_nll(layer_at(rest, 0), cfg, x, positions, lengths,
                                          image_start, cells_BT, obj.attention_grid,
                                          obj.attention_head, obj.attention_target)
            out.update(attn_sum=a_sum, attn_mass=a_mass)
            for k in range(2 if pairs is not None else 0):   # object k: head attention_head + k
                p_sum, p_mass = attention_nll(
                    layer_at(rest, 0), cfg, x, positions, lengths, image_start,
                    attention_queries(labels, pairs[..., k], image_start), obj.attention_grid,
                    obj.attention_head + k, obj.attention_target)
                out.update(pair_sum=out["pair_sum"] + p_sum, pair_mass=out["pair_mass"] + p_mass)
        if sparse and stop == sc.sparse_layer:
            dense = batch.get("dense_rows")
            policy, dec = sparse_policy(params, cfg, x, labels, lengths, image_start, positions,
                                        k_img, k_txt, tau, None if dense is None else ~dense)
            out.update(dec)
        if ckeys is not None and stop == obj.choice_layer:
            rank_BT = choice_queries(labels, ckeys)
            c_sum, c_mass, head_out = choice_nll(
                layer_at(rest, 0), cfg, x, positions, lengths, rank_BT, ckeys, obj.choice_head,
                None if policy is None else jax.lax.stop_gradient(policy), output=copy)
            out.update(choice_sum=c_sum, choice_mass=c_mass)
            if copy:
                copy_nll = token_nll(params, cfg, head_out, scored_targets(labels)[0],
                                     obj.ce_chunk, constrain)
                out.update(copy_sum=jnp.where(rank_BT >= 0, copy_nll, 0.0).sum(1))
        if letters is not None and stop == obj.letter_layer:
            l_sum, l_mass = letter_nll(layer_at(rest, 0), cfg, x, positions, lengths, letters,
                                       obj.letter_head,
                                       None if policy is None else jax.lax.stop_gradient(policy))
            out.update(letter_sum=l_sum, letter_mass=l_mass)

    tgt, w = scored_targets(labels)
    nll = token_nll(params, cfg, x, tgt, obj.ce_chunk, constrain)
    out["ce_sum"] = jnp.where(w, nll, 0.0).sum(1)
    out["tokens"] = w.sum(1).astype(jnp.float32)
    cw = batch.get("ce_weight")
    if cw is None:
        cw = jnp.full((b,), 1.0, jnp.float32) / jnp.maximum(out["tokens"].sum(), 1.0)
    out["ce_w"] = out["ce_sum"] * cw
    return out, policy


def sparse_policy(params, cfg: ModelConfig, x_BTH, labels, lengths, image_start, positions,
                  k_img, k_txt, tau, pruned_B=None):
    """(policy [B, T], per-sample sums) at the sparse layer (module doc, step 2): Gumbel
    hard decisions of both predictors from the hidden states entering it. Rows where
    `pruned_B` is False (`dense_rows`) are treated like a text-only sample with a short
    answer: every token kept, nothing to the ratio losses."""
    sc = cfg.sparse
    b, t = labels.shape
    out = {}
    policy = jnp.ones((b, t), jnp.float32)
    n_img = cfg.num_image_tokens
    pruned = jnp.ones((b,), bool) if pruned_B is None else pruned_B
    has_img = (image_start >= 0) & pruned   # the rows whose image tokens are decided
    if sc.use_vision_predictor:
        logits = M.image_scores(params, cfg, x_BTH, image_start).astype(jnp.float32)
        m_img = jax.vmap(lambda lg, k: gumbel_hard_keep(lg, k, tau))(logits, k_img)  # [B,N]
        img_in = (jnp.clip(image_start, 0)[:, None] + jnp.arange(n_img)[None]) < lengths[:, None]
        img_in = img_in & has_img[:, None]
        m_img = jnp.where(has_img[:, None], m_img, 1.0)
        rel = jnp.arange(t)[None, :] - image_start[:, None]
        is_img = M.image_token_mask(cfg.num_image_tokens, image_start, t)
        p_img = jnp.take_along_axis(m_img, jnp.clip(rel, 0, n_img - 1), axis=1)
        policy = jnp.where(is_img, p_img, policy)
        r_b = (m_img * img_in).sum(1) / jnp.maximum(img_in.sum(1), 1)
        hf = has_img.astype(jnp.float32)
        out.update(img_sq=hf * (sc.vision_keep_rate - r_b) ** 2, img_kept=hf * r_b, has_img=hf)
    if sc.use_output_text_predictor:
        start, end = answer_span(labels, lengths)
        in_ans = (positions >= start[:, None]) & (positions < end[:, None])
        long = ((end - start) >= sc.output_text_len_for_training) & pruned
        logits = M.text_scores(params, cfg, x_BTH).astype(jnp.float32)
        m_txt = jax.vmap(lambda lg, k: gumbel_hard_keep(lg, k, tau))(logits, k_txt)  # [B,T]
        m_txt = jnp.where(long[:, None], m_txt, 1.0)
        policy = jnp.where(in_ans, m_txt, policy)
        r_b = (m_txt * in_ans).sum(1) / jnp.maximum(in_ans.sum(1), 1)
        lf = long.astype(jnp.float32)
        out.update(txt_sq=lf * (sc.output_text_keep_rate - r_b) ** 2, txt_kept=lf * r_b,
                   txt_long=lf)
    return policy, out


ATTENTION_TARGETS = ("mass", "uniform")


def sparsifies(cfg: ModelConfig) -> bool:
    """Whether training drops anything: a predictor is on (else every layer runs dense)."""
    sc = cfg.sparse
    return sc.enabled and (sc.use_vision_predictor or sc.use_output_text_predictor)


def check_attention_options(cfg: ModelConfig, layer: int, head: int, target: str) -> None:
    """Raise ValueError unless the attention objective can read head `head` of layer
    `layer` with `target`: a layer below the sparse layer (when training sparsifies), so
    that the term is computed before anything is dropped."""
    stop = cfg.sparse.sparse_layer if sparsifies(cfg) else cfg.llm.num_layers
    if not 0 <= layer < stop:
        raise ValueError(f"objective.attention_layer {layer} must be a layer of the LLM before "
                         f"{'the sparse layer ' if sparsifies(cfg) else ''}{stop}: the term is "
                         "computed before sparsification")
    if not 0 <= head < cfg.llm.num_heads:
        raise ValueError(f"objective.attention_head {head} is not one of the "
                         f"{cfg.llm.num_heads} heads")
    if target not in ATTENTION_TARGETS:
        raise ValueError(f"objective.attention_target must be one of {ATTENTION_TARGETS}, "
                         f"not {target!r}")


def check_choice_options(cfg: ModelConfig, layer: int, head: int, name: str = "choice") -> None:
    """Raise ValueError unless the choice (or letter: `name`) objective can read head `head`
    of layer `layer` (any layer: at or past the sparse layer the term sees that layer's
    MaskedSoftmax)."""
    if not 0 <= layer < cfg.llm.num_layers:
        raise ValueError(f"objective.{name}_layer {layer} is not a layer of the "
                         f"{cfg.llm.num_layers}-layer LLM")
    if not 0 <= head < cfg.llm.num_heads:
        raise ValueError(f"objective.{name}_head {head} is not one of the "
                         f"{cfg.llm.num_heads} heads")


def layer_at(layer_params, i: int):
    """The params of layer i of a stack (stacked on axis 0, or a per-layer list)."""
    if isinstance(layer_params, (list, tuple)):
        return layer_params[i]
    return jax.tree_util.tree_map(lambda a: a[i], layer_params)


def answer_starts(labels_BT):
    """(first [B, T] bool, rank [B, T]): the positions that predict the first token of an
    answer (the first of each run of scored positions), and the answer's index r there."""
    _, w = scored_targets(labels_BT)
    before = jnp.concatenate([jnp.zeros_like(w[:, :1]), w[:, :-1]], axis=1)
    first = w & ~before
    return first, jnp.cumsum(first, axis=1) - 1


def attention_queries(labels_BT, turn_cells_BR, image_start_B):
    """[B, T]: at the position that predicts the first token of a sample's r-th answer (the
    first of its r-th run of scored positions), ``turn_cells[:, r]``; -1 elsewhere, past
    the R given, and in samples without an image."""
    first, rank = answer_starts(labels_BT)
    r = turn_cells_BR.shape[1]
    cell = jnp.take_along_axis(turn_cells_BR, jnp.clip(rank, 0, r - 1), axis=1)
    ok = first & (rank < r) & (image_start_B >= 0)[:, None]
    return jnp.where(ok, cell, -1)


def image_token_cells(num_image_tokens: int, grid: int) -> np.ndarray:
    """[N]: the cell (row by row, of a grid x grid partition) each image token lies in,
    the layout of `cell_tokens`."""
    side = math.isqrt(num_image_tokens)
    if side * side != num_image_tokens or side % grid:
        raise ValueError(f"a {grid} x {grid} grid does not tile the {num_image_tokens} image "
                         "tokens evenly")
    i = np.arange(num_image_tokens)
    per = side // grid
    return ((i // side) // per * grid + (i % side) // per).astype(np.int32)


def head_scores(layer_p, cfg: ModelConfig, x_BTH, positions_BT, lengths_B, head: int):
    """(scores [B, T, S] float32, visible [B, T, S]): the scaled attention logits of query
    head `head` of the decoder layer `layer_p`, recomputed from the hidden states entering
    it, and the causal, unpadded keys each query sees."""
    c = cfg.llm
    d = c.head_dim
    kvh = head // (c.num_heads // c.num_kv_heads)   # the kv head query head `head` reads
    h = RMSNorm(c.rms_norm_eps, x_BTH.dtype).apply({"params": layer_p["input_norm"]}, x_BTH)
    wq = layer_p["q_proj"]["kernel"][:, head * d:(head + 1) * d].astype(h.dtype)
    wk = layer_p["k_proj"]["kernel"][:, kvh * d:(kvh + 1) * d].astype(h.dtype)
    q = apply_rope((h @ wq)[:, :, None], positions_BT, c.rope_theta)[:, :, 0]
    k = apply_rope((h @ wk)[:, :, None], positions_BT, c.rope_theta)[:, :, 0]
    s = jnp.einsum("btd,bsd->bts", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
    i = jnp.arange(x_BTH.shape[1])
    visible = (i[None, :, None] >= i[None, None, :]) & (i[None, None, :] < lengths_B[:, None, None])
    return s, visible


def attention_nll(layer_p, cfg: ModelConfig, x_BTH, positions_BT, lengths_B, image_start_B,
                  cells_BT, grid: int, head: int = 0, target: str = "mass"):
    """Per-sample sums [B] of the attention objective's NLL and of the attention mass (module
    doc): the causal softmax of query head `head` of the decoder layer `layer_p`, from the
    hidden states entering it, at the positions where ``cells_BT >= 0``, summed over the
    image tokens of that cell (float32). target "mass": NLL = -log(mass); "uniform": the
    cross-entropy to the uniform distribution over the cell's tokens, -mean_{cell} log p,
    so that the head reads the whole cell rather than the few tokens of one feature."""
    if target not in ATTENTION_TARGETS:
        raise ValueError(f"objective.attention_target must be one of {ATTENTION_TARGETS}, "
                         f"not {target!r}")
    s, visible = head_scores(layer_p, cfg, x_BTH, positions_BT, lengths_B, head)
    t = x_BTH.shape[1]
    i = jnp.arange(t)
    logp = jax.nn.log_softmax(jnp.where(visible, s, jnp.finfo(jnp.float32).min), axis=-1)
    p = jnp.exp(logp)
    n = cfg.num_image_tokens
    rel = i[None, :] - image_start_B[:, None]
    in_img = (rel >= 0) & (rel < n) & (image_start_B >= 0)[:, None]
    key_cell = jnp.where(in_img, jnp.asarray(image_token_cells(n, grid))[jnp.clip(rel, 0, n - 1)],
                         -2)                                                       # [B, S]
    in_cell = key_cell[:, None, :] == cells_BT[:, :, None]                        # [B, T, S]
    mass = jnp.where(in_cell, p, 0.0).sum(-1)                                      # [B, T]
    marked = cells_BT >= 0
    if target == "uniform":
        per = -jnp.where(in_cell, logp, 0.0).sum(-1) / jnp.maximum(in_cell.sum(-1), 1)
    else:
        per = -jnp.log(jnp.maximum(mass, 1e-6))
    nll = jnp.where(marked, per, 0.0).sum(1)
    return nll, jnp.where(marked, mass, 0.0).sum(1)


def choice_queries(labels_BT, choice_keys_BT):
    """[B, T]: r at the position that predicts the first token of a sample's r-th answer
    when some key holds r (the option that answer chooses), -1 elsewhere."""
    first, rank = answer_starts(labels_BT)
    has = (choice_keys_BT[:, None, :] == rank[:, :, None]).any(-1)
    return jnp.where(first & has, rank, -1)


def choice_nll(layer_p, cfg: ModelConfig, x_BTH, positions_BT, lengths_B, rank_BT,
               choice_keys_BT, head: int = 1, policy_BT=None, output: bool = True):
    """(per-sample sums [B] of the choice objective's NLL, -log(mass), and of the mass, and
    the head's output [B, T, H]): the attention of query head `head` of the decoder layer
    `layer_p` (with `policy_BT`, the training MaskedSoftmax that layer computes), at each
    position where ``rank_BT >= 0``, summed over the keys where ``choice_keys_BT`` equals
    that rank; the output (None unless `output`) is what the head adds to the residual stream
    (its attention-weighted values through its rows of ``o_proj``; the copy term reads it)."""
    s, visible = head_scores(layer_p, cfg, x_BTH, positions_BT, lengths_B, head)
    p = masked_softmax(s, visible, policy_BT)
    marked = rank_BT >= 0
    on = (choice_keys_BT[:, None, :] == rank_BT[:, :, None]) & marked[:, :, None]
    mass = jnp.where(on, p, 0.0).sum(-1)
    nll = jnp.where(marked, -jnp.log(jnp.maximum(mass, 1e-6)), 0.0).sum(1)
    if not output:
        return nll, jnp.where(marked, mass, 0.0).sum(1), None
    c = cfg.llm
    d = c.head_dim
    kvh = head // (c.num_heads // c.num_kv_heads)
    h = RMSNorm(c.rms_norm_eps, x_BTH.dtype).apply({"params": layer_p["input_norm"]}, x_BTH)
    v = h @ layer_p["v_proj"]["kernel"][:, kvh * d:(kvh + 1) * d].astype(h.dtype)
    o = jnp.einsum("bts,bsd->btd", p.astype(v.dtype), v)
    out = o @ layer_p["o_proj"]["kernel"][head * d:(head + 1) * d].astype(o.dtype)
    return nll, jnp.where(marked, mass, 0.0).sum(1), out


def letter_nll(layer_p, cfg: ModelConfig, x_BTH, positions_BT, lengths_B, letters_BT,
               head: int = 0, policy_BT=None):
    """Per-sample sums [B] of the letter objective's NLL, -log p(letter), and of p(letter):
    the attention of query head `head` of the decoder layer `layer_p` (with `policy_BT`, the
    training MaskedSoftmax that layer computes) at each option-text token (``letters_BT >=
    0``) on the token ``letters_BT`` names, its option's letter."""
    s, visible = head_scores(layer_p, cfg, x_BTH, positions_BT, lengths_B, head)
    p = masked_softmax(s, visible, policy_BT)
    marked = letters_BT >= 0
    on = jnp.take_along_axis(p, jnp.maximum(letters_BT, 0)[:, :, None], axis=-1)[:, :, 0]
    nll = jnp.where(marked, -jnp.log(jnp.maximum(on, 1e-6)), 0.0).sum(1)
    return nll, jnp.where(marked, on, 0.0).sum(1)


def cell_means(feats_BNH, grid: int):
    """[B, grid*grid, H] means of the image tokens (a square of N) over each cell of a
    grid x grid partition, row by row (numpy or jax arrays)."""
    return cell_tokens(feats_BNH, grid).mean(2)


def cell_tokens(feats_BNH, grid: int):
    """[B, grid*grid, P, H]: the image tokens (a square of N) grouped by the cell of a
    grid x grid partition they lie in, cells row by row, P = N / grid^2 tokens each
    (numpy or jax arrays)."""
    b, n, h = feats_BNH.shape
    side = math.isqrt(n)
    if side * side != n or side % grid:
        raise ValueError(f"a {grid} x {grid} grid does not tile the {n} image tokens evenly")
    per = side // grid
    x = feats_BNH.reshape(b, grid, per, grid, per, h).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * grid, per * per, h)


def scored_cells(targets_BCK, image_start_B):
    """Which cell targets count: set (>= 0), in a sample with an image."""
    return (targets_BCK >= 0) & (image_start_B >= 0)[:, None, None]


def cell_nll(params, feats_BNH, targets_BCK, image_start_B, per_token: bool = False):
    """Per-sample sums [B] of the cell objective's NLL (module doc). per_token: every token
    of a cell is scored against the cell's words (the mean of their NLLs) instead of the
    cell's mean token, so that each token names its cell's object on its own."""
    g = math.isqrt(targets_BCK.shape[1])
    if g * g != targets_BCK.shape[1]:
        raise ValueError(f"{targets_BCK.shape[1]} cell targets are not a G x G grid")
    f = feats_BNH.astype(jnp.float32)
    table = params["llm"]["embed_tokens"]["embedding"].astype(jnp.float32)
    tgt = jnp.clip(targets_BCK, 0)
    if per_token:
        logp = jax.nn.log_softmax(cell_tokens(f, g) @ table.T, axis=-1)          # [B, C, P, V]
        nll = -jnp.take_along_axis(logp, tgt[:, :, None, :], axis=-1).mean(2)  # [B, C, K]
    else:
        logp = jax.nn.log_softmax(cell_means(f, g) @ table.T, axis=-1)           # [B, C, V]
        nll = -jnp.take_along_axis(logp, tgt, axis=-1)                          # [B, C, K]
    return jnp.where(scored_cells(targets_BCK, image_start_B), nll, 0.0).sum((1, 2))


def combine(sums: dict, denom: dict, cfg: ModelConfig,
            obj: Objective = Objective()) -> tuple[jax.Array, dict]:
    """Loss and metrics from per-sample sums (already summed over micro-batches or not)."""
    s = {k: jnp.sum(v) for k, v in sums.items()}
    ce = s["ce_w"]
    l_img = s["img_sq"] / denom["img"]
    l_txt = s["txt_sq"] / denom["txt"]
    w = cfg.sparse.mask_loss_weight
    loss = obj.ce_loss_weight * ce + w * (l_img + l_txt)   # x * 1.0 is exact: default unchanged
    metrics = {
        "loss": loss, "ce": ce,
        "img_ratio_loss": w * l_img, "txt_ratio_loss": w * l_txt,
        "img_kept": s["img_kept"] / denom["img"],
        "txt_kept": s["txt_kept"] / denom["txt_long"],
        "answer_tokens": s["tokens"],
    }
    if obj.cell_loss_weight:
        l_cell = s["cell_sum"] / denom["cells"]
        loss = loss + obj.cell_loss_weight * l_cell
        metrics.update(loss=loss, cell_loss=l_cell)
    if obj.attention_loss_weight:
        l_attn = s["attn_sum"] / denom["attn"]
        loss = loss + obj.attention_loss_weight * l_attn
        metrics.update(loss=loss, attn_loss=l_attn, attn_mass=s["attn_mass"] / denom["attn"])
    if obj.pair_loss_weight:
        l_pair = s["pair_sum"] / denom["pair"]
        loss = loss + obj.pair_loss_weight * l_pair
        metrics.update(loss=loss, pair_loss=l_pair, pair_mass=s["pair_mass"] / denom["pair"])
    if obj.choice_loss_weight:
        l_choice = s["choice_sum"] / denom["choice"]
        loss = loss + obj.choice_loss_weight * l_choice
        metrics.update(loss=loss, choice_loss=l_choice,
                       choice_mass=s["choice_mass"] / denom["choice"])
    if obj.letter_loss_weight:
        l_letter = s["letter_sum"] / denom["letter"]
        loss = loss + obj.letter_loss_weight * l_letter
        metrics.update(loss=loss, letter_loss=l_letter,
                       letter_mass=s["letter_mass"] / denom["letter"])
    if obj.copy_loss_weight:
        l_copy = s["copy_sum"] / denom["choice"]
        loss = loss + obj.copy_loss_weight * l_copy
        metrics.update(loss=loss, copy_loss=l_copy)
    return loss, metrics


def step_inputs(batch: dict, cfg: ModelConfig, obj: Objective, rng) -> tuple[dict, dict]:
    """(the global batch as `forward_train` takes it, the loss's normalisers), computed once
    over the whole global batch before any split into micro-batches: the dense rows of
    ``obj.dense_fraction`` drawn from the step's key, `loss_denominators`, each sample's
    index and CE weight."""
    b = batch["tokens"].shape[0]
    if obj.dense_fraction:
        batch = dict(batch, dense_rows=dense_rows(rng, b, obj.dense_fraction))
    denom = loss_denominators(batch, cfg, obj.text_ratio_mean)
    batch = dict(batch, sample_id=jnp.arange(b, dtype=jnp.int32),
                 ce_weight=ce_weights(batch["labels"], obj.ce_group_size))
    return batch, denom


def loss_fn(params, cfg: ModelConfig, batch: dict, rng, tau, obj: Objective = Objective(), *,
            remat: str = "none"):
    """Whole-batch loss (no micro-batching): (loss, metrics), as one train step computes it.
    ``obj.ce_loss_weight = 0``: the LLM is not run (tower pretraining: the cell objective
    alone)."""
    batch, denom = step_inputs(batch, cfg, obj, rng)
    sums, _ = forward_train(params, cfg, batch, rng, tau, obj, remat=remat)
    return combine(sums, denom, cfg, obj)
