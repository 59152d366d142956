"""Training run configurations (big_vision style): each module's `get_config()` returns an
`ml_collections.ConfigDict`. `base_config()` holds every setting with its default; the run
configs change what differs. Load one with `configs.load("configs/tiny_run.py")` or
`train.py --config configs/NAME.py`, and override any field with `--config.a.b=value`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    from dynllava_jax.data.pipeline import default_data_config

    c = ml_collections.ConfigDict()
    # Model: a converted dir (convert_weights.py), or "random" (init_params of model_preset).
    # A plain LLaVA-1.5 checkpoint (no predictors) gets freshly initialised predictors.
    c.init_from = ""
    c.model_preset = "tiny"            # used with init_from = "random"
    c.assets_dir = ""                  # tokenizer + preprocessor files (default: init_from)
    c.dtype = "bfloat16"               # compute dtype
    c.param_dtype = "float32"          # dtype of the trained params and optimiser state
    # Fresh weights: > 0 draws the LLM's embeddings and kernels N(0, init_std) (LLaMA's
    # initializer_range) instead of flax's defaults; `reinit` ("llm", "projector", ...) names
    # param groups of init_from to draw anew instead of loading them.
    c.init_std = 0.0
    c.reinit = ""

    # Dynamic-LLaVA settings (SPEC §2, §4), written into the exported model_config.json.
    c.sparse = ml_collections.ConfigDict()
    c.sparse.vision_keep_rate = 0.2
    c.sparse.output_text_keep_rate = 0.5
    c.sparse.output_text_len_for_training = 50
    c.sparse.mask_loss_weight = 100.0
    c.sparse.use_vision_predictor = True
    c.sparse.use_output_text_predictor = True

    c.objective = ml_collections.ConfigDict()
    c.objective.gumbel_start_tau = 1.0
    c.objective.gumbel_end_tau = 0.1
    c.objective.text_ratio_mean = "all"   # "all" (official) | "eligible"
    # CE mean: 0 = token mean over the global batch; k = mean over groups of k samples of
    # their token means (the official per-device-batch mean; see objective.py).
    c.objective.ce_group_size = 0
    # > 0: LM head + cross-entropy over this many tokens at a time (saves the [B,T,V] logits).
    c.objective.ce_chunk = 0
    # Weight of the answers' cross-entropy. 0: the LLM is not run at all (tower pretraining:
    # the vision tower and projector learn from the cell objective alone, LLaVA's pretrained
    # tower for a model trained from random weights); needs cell_loss_weight > 0.
    c.objective.ce_loss_weight = 1.0
    # > 0: add the cell objective (objective.py; needs data.cell_grid and records with
    # cell_text): each grid cell's mean image token scored against the words naming it.
    c.objective.cell_loss_weight = 0.0
    # True: score every image token of a cell against its words, not the cell's mean token.
    c.objective.cell_per_token = False
    # > 0: add the attention objective (objective.py; needs data.attention_turns, data.cell_grid
    # and records with turn_cells): head `attention_head` of layer `attention_layer`, where it
    # predicts an answer, attends to the image tokens of the cell the question names.
    c.objective.attention_loss_weight = 0.0
    c.objective.attention_layer = 1
    c.objective.attention_head = 0
    # "mass": -log(its attention mass on the cell); "uniform": cross-entropy to the uniform
    # distribution over the cell's tokens (it reads the whole cell).
    c.objective.attention_target = "mass"
    # > 0 (needs data.attention_pairs and records with turn_pairs): heads attention_head and
    # attention_head + 1 of that layer attend to the two objects a position question names.
    c.objective.pair_loss_weight = 0.0
    # > 0: add the choice objective (objective.py; needs data.choice_targets): head
    # `choice_head` of layer `choice_layer`, where it predicts a multiple-choice answer's
    # letter, is taught to attend to the text of the option that letter names
    c.objective.choice_loss_weight = 0.0
    c.objective.choice_layer = 2
    c.objective.choice_head = 1
    # > 0: add the letter objective (needs data.choice_targets): head `letter_head` of layer
    # `letter_layer`, at each option's text, is taught to attend to that option's letter
    # (so that the choice head finds the letter to copy there)
    c.objective.letter_loss_weight = 0.0
    c.objective.letter_layer = 0
    c.objective.letter_head = 0
    # > 0 (needs data.choice_targets): the choice head's own output, read through the final
    # norm and the LM head, is taught to predict the letter (it writes what it reads)
    c.objective.copy_loss_weight = 0.0
    # > 0 (with a predictor on): this share of each global batch, drawn afresh every step,
    # runs unpruned (every token kept, no decisions, nothing to the ratio losses), so that
    # the same weights stay good in dense inference while the rest trains under pruning.
    c.objective.dense_fraction = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-6                  # LLM (+ projector)
    c.optim.predictor_lr = 2e-4
    c.optim.weight_decay = 0.0
    c.optim.predictor_weight_decay = 0.0
    c.optim.warmup_ratio = 0.03
    c.optim.schedule = "cosine"        # cosine | linear | constant (after warm-up)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0
    c.optim.train_projector = True     # official code: True; the paper: frozen
    c.optim.train_llm = True
    c.optim.train_vision = False       # True: train the vision tower too (from scratch)
    c.optim.vision_lr_scale = 1.0      # the trained vision tower's lr = lr x this

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 64
    c.train.microbatches = 1           # gradient accumulation steps
    c.train.num_epochs = 1.0
    c.train.total_steps = 0            # > 0 overrides num_epochs
    c.train.seed = 0
    c.train.log_every = 1
    c.train.remat = "full"             # none | full | dots | dots_no_batch
    c.train.data = "pipeline"          # pipeline | random (in-memory, for benchmarks)
    # Resuming with another total step count changes the lr/tau schedules mid-run: refused
    # unless this is true (WORKDIR/run.json records the total the run started with).
    c.train.allow_schedule_change = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1                   # -1: all remaining devices
    c.mesh.tensor = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.export = True         # WORKDIR/export at the end
    # WORKDIR/.lock: a lock whose heartbeat is older than this (seconds) is a dead run's.
    c.checkpoint.lock_stale_after_s = 600.0

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""     # host:port; empty = auto-detect (see sharding.py)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.data = default_data_config()
    c.data.num_epochs = None           # repeat; the run length is a step count
    # Written into WORKDIR/data when data.json_path is empty and synthetic.n > 0.
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.n = 0
    c.synthetic.seed = 0
    return c


def load(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_dynllava_cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    return mod.get_config()


def _parse_value(text: str, current):
    import ast
    if isinstance(current, str):
        return text
    if isinstance(current, bool) or current is None and text in ("true", "false", "True", "False"):
        low = text.lower()
        if low in ("1", "true", "yes"):
            return True
        if low in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Apply ``a.b.c=value`` strings (values parsed as Python literals, kept as text for
    string fields). Unknown keys are an error."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = config
        for p in parts[:-1]:
            if p not in node:
                raise ValueError(f"unknown config key {key!r}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            raise ValueError(f"unknown config key {key!r}")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ValueError(f"{key!r} is a group; set one of its fields")
        value = _parse_value(text, current)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"bad value for {key!r}: {e}") from None
    return config
