"""The grain input pipeline: LLaVA records -> fixed-shape host-local batches.

API (what the trainer calls)::

    ds = make_dataset(data_cfg, tokenizer, image_processor, num_image_tokens,
                      seed=0, shard_index=None, shard_count=None, batch_size=8)
    it = make_iterator(...same arguments...)      # == iter(ds): a LlavaBatchIterator
    batch = next(it)

``shard_index``/``shard_count`` default to ``jax.process_index()``/``jax.process_count()``;
``batch_size`` is the per-host batch. Each batch is a dict of numpy arrays:

==================  ==========  ===========  ========================================
key                 dtype       shape        content
==================  ==========  ===========  ========================================
``tokens``          int32       [b, T]       prompt + answers; the image marker expanded
                                             to ``num_image_tokens`` slots holding the
                                             pad id (0); right-padded with 0
``labels``          int32       [b, T]       target AT position t (the loss shifts);
                                             -100 = ignore (image slots, system/user
                                             text, role tags, padding)
``lengths``         int32       [b]          real tokens, image slots included
``image_start``     int32       [b]          first image slot, -1 without an image
``pixels``          float32     [b, 3, S, S] preprocessed image; zeros if text-only
``cell_targets``    int32       [b, G*G, K]  only with ``data_cfg.cell_grid`` G > 0: the
                                             ids of each cell's ``cell_text`` (-1 padded)
``turn_cells``      int32       [b, R]       only with ``data_cfg.attention_turns`` R > 0:
                                             the cell each answer's question names (-1)
``pair_cells``      int32       [b, R, 2]    only with ``data_cfg.attention_pairs``: the
                                             cells of the two objects each answer's
                                             question names (-1)
``choice_keys``     int32       [b, T]       only with ``data_cfg.choice_targets``: r at the
                                             tokens of the option the r-th answer chooses
``option_letters``  int32       [b, T]       with ``choice_keys``: at every option's text,
                                             the index of its letter's token (-1)
==================  ==========  ===========  ========================================

``T = data_cfg.seq_len``, ``S = image_processor.image_size``. Every batch has exactly
``batch_size`` rows, except the last one of a finite run with ``drop_remainder=False``.

Pipeline (grain's dataset API)::

    source (JSON records | TFDS ArrayRecord)                     MapDataset
      .shuffle(seed)                       one global permutation, same on every host
      [host's contiguous 1/shard_count]    ShardOptions(drop_remainder=True) semantics:
                                           equal-size disjoint shards, the < shard_count
                                           leftover records unused
      .shuffle(seed).repeat(num_epochs)    reshuffled every epoch
      .map(encode_record)                  tokenise, label, expand, pad, load the image;
                                           a bad record becomes an ``Invalid`` marker
      .to_iter_dataset(ReadOptions)        ``read_threads`` threads per process
      .mp_prefetch(worker_count)           worker processes (skipped when 0)
      -> LlavaBatchDataset                 main process: drop + count ``Invalid``,
                                           stack ``batch_size`` valid examples

Bad records (missing or corrupt image, empty conversation, no gpt turn, malformed
turns, image slots cut by truncation, nothing left to learn) are never fatal. The
choice: validate inside the per-record map (in the workers, where the work is), let
the small ``Invalid`` marker travel to the main process, and filter and count there,
in the one iterator that also batches. So the counts need no cross-process channel,
they are part of the iterator state (they survive checkpoint/restore), and the
output does not depend on ``worker_count`` (grain's workers read interleaved slices
and the main process reads them back in order, so any ``worker_count`` gives the
same batches). ``it.skipped`` (reason -> count), ``it.num_skipped`` and
``it.metrics()`` expose them; the first few and then every 1000th skip are logged.
``requires_image=True`` (the official Dynamic-LLaVA run) drops text-only records the
same way, counted under ``text_only`` but not as bad.
If more than ``max_skip_fraction`` of the records seen (after 200) are bad, the
iterator raises ``DataError``: a wrong ``image_folder`` should stop a run, not
silently train on the text-only remainder. Counts are per host.

Checkpointing (orbax-checkpoint 0.12.8, grain 0.2.18): the iterator is a
``grain.DatasetIterator``; ``get_state()`` is a JSON-able dict (position of the record
reader, per-worker positions with workers, the skip counts) and ``set_state`` resumes
exactly at the next batch. With orbax use grain's handler, which writes one
``process_<i>-of-<n>.json`` per host::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))   # restores ``it`` in place

Restore into an iterator made with the same config, seed, shard and batch size (and
the same ``worker_count``: the state of a worker pool records per-worker positions).

Workers are spawned processes that unpickle the pipeline (tokenizer, image processor
and record source included) and import its modules, a few seconds each at start; the
main script must be importable (not ``python -`` / ``-c``). Call ``it.close()`` when
done to stop them.

Multi-host note: every host yields full batches, but hosts skip different numbers of
bad records, so with a finite ``num_epochs`` they may run out at different steps;
train for a step count (``num_epochs=None`` repeats forever) rather than to exhaustion.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import grain
import ml_collections
import numpy as np

from dynllava_jax.data import llava_json
from dynllava_jax.data.llava_json import Invalid

logger = logging.getLogger(__name__)

_LOG_FIRST_SKIPS = 10
_LOG_SKIP_EVERY = 1000
_MIN_RECORDS_FOR_SKIP_CHECK = 200


class DataError(RuntimeError):
    """The data cannot be used (e.g. most records are bad)."""


def default_data_config() -> ml_collections.ConfigDict:
    """The data settings of a training run (LLaVA-1.5 / Dynamic-LLaVA defaults)."""
    cfg = ml_collections.ConfigDict()
    cfg.source = "json"                # 'json' | 'tfds'
    cfg.json_path = ""                 # llava_v1_5_mix665k.json
    cfg.image_folder = ""              # the records' image paths are relative to it
    cfg.tfds_data_dir = ""             # built by `python -m dynllava_jax.data.tfds_builder`
    cfg.tfds_name = "llava_instruct"
    cfg.tfds_split = "train"
    cfg.seq_len = 2048                 # T, the static sequence length of a batch
    cfg.model_max_length = 2048        # LLaVA's truncation length
    cfg.requires_image = False         # True: drop text-only records (the official run does)
    cfg.shuffle = True
    cfg.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
    cfg.worker_count = 0               # grain worker processes (0: main process only)
    cfg.drop_remainder = True
    cfg.read_threads = 4               # threads per process running the per-record map
    cfg.read_buffer_size = 16          # examples buffered per process by those threads
    cfg.worker_buffer_size = 4         # examples buffered per worker process
    cfg.max_skip_fraction = 0.5        # DataError above this fraction of bad records
    cfg.cell_grid = 0                  # G > 0: batches carry `cell_targets` from the records'
    cfg.cell_tokens = 3                # `cell_text` (G x G cells, this many ids each; JSON only)
    cfg.attention_turns = 0            # R > 0: batches carry `turn_cells` [b, R] from the records'
                                       # `turn_cells` (the attention objective; JSON only)
    cfg.attention_pairs = False        # True (with R > 0): batches carry `pair_cells` [b, R, 2]
                                       # from the records' `turn_pairs` (JSON only)
    cfg.choice_targets = False         # True: batches carry `choice_keys` [b, T], where each
                                       # multiple-choice answer's option is written, and
                                       # `option_letters` [b, T] (the choice and letter
                                       # objectives; found in the text, so any source)
    return cfg


def make_source(data_cfg) -> Any:
    """The record source of ``data_cfg.source`` (random access to ``RawRecord``)."""
    if data_cfg.source == "json":
        if not data_cfg.json_path:
            raise ValueError("data.json_path is not set")
        return llava_json.JsonRecords(data_cfg.json_path)
    if data_cfg.source == "tfds":
        if data_cfg.get("cell_grid", 0) or data_cfg.get("attention_turns", 0):
            raise ValueError("data.cell_grid and data.attention_turns read the records' cell_text "
                             "and turn_cells, which the tfds copy does not hold: use "
                             "data.source='json'")
        if not data_cfg.tfds_data_dir:
            raise ValueError("data.tfds_data_dir is not set")
        from dynllava_jax.data.tfds_builder import TfdsRecords  # tfds only when used
        return TfdsRecords(data_cfg.tfds_data_dir, data_cfg.get("tfds_name", "llava_instruct"),
                           data_cfg.get("tfds_split", "train"))
    raise ValueError(f"data.source must be 'json' or 'tfds', got {data_cfg.source!r}")


def _process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    return shard_index, shard_count


def make_record_dataset(data_cfg, tokenizer, image_processor, num_image_tokens: int, *, seed: int,
                        shard_index: int | None = None, shard_count: int | None = None,
                        source=None) -> grain.MapDataset:
    """This host's examples (dicts of one example, or ``Invalid``), shuffled and repeated."""
    shard_index, shard_count = _process_shard(shard_index, shard_count)
    if data_cfg.seq_len < num_image_tokens + 1:
        raise ValueError(f"seq_len {data_cfg.seq_len} cannot hold {num_image_tokens} image tokens")
    if data_cfg.seq_len < data_cfg.model_max_length:
        logger.warning("seq_len %d < model_max_length %d: sequences are cut to seq_len",
                       data_cfg.seq_len, data_cfg.model_max_length)
    source = make_source(data_cfg) if source is None else source
    seed = int(seed) % 2**32
    ds = grain.MapDataset.source(source)
    if data_cfg.shuffle:
        ds = ds.shuffle(seed)
    per_shard = len(ds) // shard_count
    if per_shard == 0:
        raise DataError(f"{len(ds)} records cannot be split over {shard_count} hosts")
    ds = ds[shard_index * per_shard:(shard_index + 1) * per_shard]
    if data_cfg.shuffle:
        ds = ds.shuffle(seed)
    ds = ds.repeat(data_cfg.num_epochs)
    encode = functools.partial(
        llava_json.encode_record, tokenizer=tokenizer, image_processor=image_processor,
        image_folder=data_cfg.image_folder or None, num_image_tokens=num_image_tokens,
        seq_len=data_cfg.seq_len, model_max_length=data_cfg.model_max_length,
        requires_image=data_cfg.get("requires_image", False),
        cell_grid=int(data_cfg.get("cell_grid", 0)), cell_tokens=int(data_cfg.get("cell_tokens", 3)),
        attention_turns=int(data_cfg.get("attention_turns", 0)),
        attention_pairs=bool(data_cfg.get("attention_pairs", False)),
        choice_targets=bool(data_cfg.get("choice_targets", False)))
    return ds.map(encode)


def make_dataset(data_cfg, tokenizer, image_processor, num_image_tokens: int, *, seed: int,
                 shard_index: int | None = None, shard_count: int | None = None,
                 batch_size: int, source=None) -> "LlavaBatchDataset":
    """The batched pipeline (a ``grain.IterDataset``; iterate it, or call ``make_iterator``).

    ``source`` overrides the record source built from ``data_cfg`` (tests, custom data).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = make_record_dataset(data_cfg, tokenizer, image_processor, num_image_tokens, seed=seed,
                             shard_index=shard_index, shard_count=shard_count, source=source)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=data_cfg.get("read_threads", 4),
        prefetch_buffer_size=data_cfg.get("read_buffer_size", 16)))
    if data_cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.worker_count,
            per_worker_buffer_size=data_cfg.get("worker_buffer_size", 4)))
    return LlavaBatchDataset(it_ds, batch_size=batch_size, drop_remainder=data_cfg.drop_remainder,
                             max_skip_fraction=data_cfg.get("max_skip_fraction", 0.5))


def _ensure_absl_flags_parsed() -> None:
    """grain's worker pool reads its absl flags; outside ``absl.app`` (pytest, notebooks,
    a plain ``main``) nothing parsed them, so take their defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(data_cfg, tokenizer, image_processor, num_image_tokens: int, *, seed: int,
                  shard_index: int | None = None, shard_count: int | None = None,
                  batch_size: int, source=None) -> "LlavaBatchIterator":
    """``iter(make_dataset(...))``: a checkpointable ``grain.DatasetIterator`` of batches."""
    return iter(make_dataset(data_cfg, tokenizer, image_processor, num_image_tokens, seed=seed,
                             shard_index=shard_index, shard_count=shard_count,
                             batch_size=batch_size, source=source))


def collate(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack single examples into a batch (the keys of ``EXAMPLE_KEYS``, and ``cell_targets``,
    ``turn_cells``, ``pair_cells``, ``choice_keys``, ``option_letters`` when the examples have
    them)."""
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


class LlavaBatchDataset(grain.IterDataset):
    """Drops and counts ``Invalid`` records, batches the rest (runs in the main process)."""

    def __init__(self, parent: grain.IterDataset, *, batch_size: int, drop_remainder: bool,
                 max_skip_fraction: float | None = 0.5):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_skip_fraction = max_skip_fraction

    def __iter__(self) -> "LlavaBatchIterator":
        return LlavaBatchIterator(self._parent.__iter__(), batch_size=self._batch_size,
                                  drop_remainder=self._drop_remainder,
                                  max_skip_fraction=self._max_skip_fraction)

    def __str__(self) -> str:
        return f"LlavaBatchDataset(batch_size={self._batch_size})"


class LlavaBatchIterator(grain.DatasetIterator):
    """Iterator of batches; its state includes the skip counts (see the module docstring)."""

    def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, drop_remainder: bool,
                 max_skip_fraction: float | None):
        super().__init__(parent)
        self._batch_size = batch_size
        self._drop_remainder = drop_remainder
        self._max_skip_fraction = max_skip_fraction
        self.skipped: dict[str, int] = {}
        self.num_examples = 0  # valid examples yielded in batches

    @property
    def num_skipped(self) -> int:
        """Records skipped as bad (text-only records excluded by ``requires_image`` not included)."""
        return sum(v for k, v in self.skipped.items() if k != llava_json.TEXT_ONLY)

    def metrics(self) -> dict[str, int]:
        """Counters for the training log.

        ``data/examples`` (valid examples yielded), ``data/skipped`` and ``data/skipped/<reason>``.
        """
        out = {"data/examples": self.num_examples, "data/skipped": self.num_skipped}  # bad ones
        out.update({f"data/skipped/{k}": v for k, v in sorted(self.skipped.items())})
        return out

    def _skip(self, bad: Invalid) -> None:
        self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + 1
        if bad.reason == llava_json.TEXT_ONLY:
            return
        n = self.num_skipped
        if n <= _LOG_FIRST_SKIPS:
            logger.warning("skipping record %s (%s)%s", bad.id, bad.reason,
                           f": {bad.detail}" if bad.detail else "")
        elif n % _LOG_SKIP_EVERY == 0:
            logger.warning("skipped %d bad records so far: %s", n, self.skipped)
        seen = n + self.num_examples
        if (self._max_skip_fraction is not None and seen >= _MIN_RECORDS_FOR_SKIP_CHECK
                and n > self._max_skip_fraction * seen):
            raise DataError(
                f"{n} of the {seen} records read are bad ({self.skipped}); check the data "
                "paths (image_folder?) or raise data.max_skip_fraction")

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        while len(examples) < self._batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                break
            if isinstance(ex, Invalid):
                self._skip(ex)
            else:
                examples.append(ex)
        if not examples or (self._drop_remainder and len(examples) < self._batch_size):
            raise StopIteration
        self.num_examples += len(examples)
        return collate(examples)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": dict(self.skipped),
                "num_examples": self.num_examples}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self.num_examples = int(state["num_examples"])

    def __str__(self) -> str:
        return f"LlavaBatchIterator(batch_size={self._batch_size})"
