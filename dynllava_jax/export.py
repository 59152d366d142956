"""Converted directory -> PyTorch checkpoint: the original LLaVA / Dynamic-LLaVA layout or llava-hf.

The reverse of `convert.py`, declared with the same tables: `convert.name_map` gives every
tensor's canonical (original LLaVA) name and its params leaf, `convert.INVERSE` undoes each
transform hook, and `HF_NAMES` renames canonical names to what transformers'
`LlavaForConditionalGeneration.save_pretrained` writes. Converting an export gives back
bit-identical params (tested for both layouts, float32 and bfloat16).

Memory: the params are read one Orbax leaf at a time (a partial restore of that leaf only);
each leaf's tensors (one per layer for the stacked ones) are transposed, cast and streamed
into `.safetensors` files whose headers were written up front. The peak is the largest leaf
plus one tensor: for a 7B model the stacked MLP weight, 32 x 4096 x 11008 (2.9 GB in
bfloat16, 5.8 GB in float32). The output is written to a temporary sibling of `dst` and
renamed at the end, as the converter does.

What the converted directory does not model is restored from what the converter kept:
`source_config.json` (the PyTorch checkpoint's config.json: llava-hf's image token id, the
original config's fields such as `mm_vision_tower` or `tokenizer_model_max_length`) and
`unused_tensors.safetensors` (CLIP's `post_layernorm`, unused by LLaVA; written as an
identity LayerNorm where the directory predates it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import checksums, paths
from .checkpoint import (SOURCE_CONFIG, TOKENIZER_FILES, UNUSED_TENSORS, CheckpointDirError, check_disjoint,
                         check_dst, load_config, make_tmp_dir, replace_dir)
from .checkpoint_io import CheckpointError, SafetensorsWriter, iter_tensors, tensor_names
from .config import ModelConfig
from .convert import (INVERSE, KEPT_UNUSED, KNOWN_TOWERS, VISION_PREFIX, _vision_config,
                      expected_torch_shapes, name_map)

FORMATS = ("original", "llava-hf")
DTYPES = ("float32", "float16", "bfloat16")
# canonical prefix -> llava-hf prefix, as transformers 5 saves LlavaForConditionalGeneration
# (the inverse of the 5.x rows of convert._HF_RULES; checked against save_pretrained in tests)
HF_NAMES = [
    (VISION_PREFIX + "vision_model.", "vision_tower."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
]
CLIP_HUB = "openai/clip-vit-large-patch14-336"
HF_IMAGE_TOKEN, HF_PAD_TOKEN = "<image>", "<pad>"
HF_VOCAB_MULTIPLE = 64  # llava-hf pads the vocabulary (32000 + <image> + <pad> -> 32064)
TOWER_DIR = "vision_tower"  # a CLIP directory written beside the weights for a non-hub tower
OFFICIAL_TRANSFORMERS = "4.37.2"  # the version the official release pins
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def hf_name(canonical: str) -> str:
    for old, new in HF_NAMES:
        if canonical.startswith(old):
            return new + canonical[len(old):]
    raise KeyError(canonical)


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20 (transformers' convention), or bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.upper().endswith(unit) and s[: -len(unit)].strip().isdigit():
            return int(s[: -len(unit)]) * mult
    if s.isdigit():
        return int(s)
    raise CheckpointError(f"--max-shard-size {size!r}: expected a size such as 5GB, 500MB or 2GiB")


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


# -- the source: a converted directory -------------------------------------------------

def _params_metadata(params_dir: Path) -> dict[tuple, tuple[tuple, np.dtype]]:
    """params leaf path -> (shape, dtype), from the Orbax metadata (nothing loaded)."""
    import jax
    import orbax.checkpoint as ocp
    try:
        meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(params_dir)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise CheckpointError(f"{params_dir} is not a readable Orbax checkpoint: {e}") from e
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    out = {}
    for kp, m in jax.tree_util.tree_leaves_with_path(meta):
        path = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
        out[path] = (tuple(m.shape), np.dtype(m.dtype))
    return out


class _LeafReader:
    """Restores one params leaf at a time (Orbax partial restore), as a NumPy array."""

    def __init__(self, params_dir: Path):
        import orbax.checkpoint as ocp
        self._ocp, self._dir = ocp, params_dir
        self._ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

    def __call__(self, path: tuple) -> np.ndarray:
        ocp = self._ocp
        item, args = {}, {}
        node_i, node_a = item, args
        for p in path[:-1]:
            node_i, node_a = node_i.setdefault(p, {}), node_a.setdefault(p, {})
        node_i[path[-1]] = 0
        node_a[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)
        try:
            out = self._ckptr.restore(self._dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=args, partial_restore=True))
        finally:
            absl_log.setLevel(level)
        for p in path:
            out = out[p]
        return np.asarray(out)


@dataclasses.dataclass
class _Tensor:
    """One output tensor: where it comes from and under which names it is written."""

    canonical: str
    shape: tuple            # PyTorch shape, vocabulary padding included
    leaf: Optional[tuple]   # params leaf (None: from unused_tensors or an identity default)
    layer: Optional[int]
    fn: Optional[Callable]  # inverse transform
    pad_rows: int = 0       # llava-hf vocabulary padding appended to the rows
    outputs: tuple = ()     # (writer key, name) pairs


def _torch_shape(leaf_shape: tuple, layer: Optional[int], fn: Callable) -> tuple:
    s = leaf_shape[1:] if layer is not None else leaf_shape
    return tuple(fn(np.broadcast_to(np.zeros((), np.int8), s)).shape)  # a view: nothing allocated


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


# -- configs -------------------------------------------------------------------------

def _is_original(c: Optional[dict]) -> bool:
    return bool(c) and "text_config" not in c and ("mm_projector_type" in c or "mm_vision_tower" in c)


def sparse_config(cfg: ModelConfig, source: Optional[dict]) -> dict:
    """`sparse_config` as the official training script writes it (`vars(SparseArguments)`)."""
    s = cfg.sparse
    old = (source or {}).get("sparse_config") or {}
    out = {k: getattr(s, k) for k in (
        "d_model", "nhead", "dim_feedforward", "num_layers", "sparse_layer", "vision_keep_rate",
        "output_text_keep_rate", "output_text_len_for_training", "mask_loss_weight",
        "use_vision_predictor", "use_output_text_predictor")}
    out.update(
        use_text_predictor=s.use_output_text_predictor,  # gates the text predictors in the official code
        use_instruct_predictor=False,  # never converted (the released configuration switches it off)
        instruct_keep_rate=old.get("instruct_keep_rate", 0.7),
        instruct_len_for_training=old.get("instruct_len_for_training", 25))
    return out


def original_config(cfg: ModelConfig, source: Optional[dict], vision_tower: str, dtype: str) -> dict:
    """config.json as the official code writes it: LlamaConfig's fields, LLaVA's `mm_*`,
    `sparse_config`. Fields our config does not model come from the source's original config."""
    l, v = cfg.llm, cfg.vision
    if _is_original(source):
        out = dict(source)
    else:  # what LLaVA-1.5's training writes, with transformers 4.37's LlamaConfig defaults
        out = {"attention_bias": False, "attention_dropout": 0.0, "freeze_mm_mlp_adapter": False,
               "initializer_range": 0.02, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
               "pretraining_tp": 1, "rope_scaling": None, "tokenizer_padding_side": "right",
               "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True,
               "transformers_version": OFFICIAL_TRANSFORMERS}
    sparse = cfg.sparse.enabled
    out.update({
        "architectures": ["DynamicLlavaLlamaForCausalLM" if sparse else "LlavaLlamaForCausalLM"],
        "model_type": "dynamic_llava_llama" if sparse else "llava_llama",
        "hidden_act": "silu", "hidden_size": l.hidden_size, "intermediate_size": l.intermediate_size,
        "num_attention_heads": l.num_heads, "num_hidden_layers": l.num_layers,
        "num_key_value_heads": l.num_kv_heads, "max_position_embeddings": l.max_position_embeddings,
        "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta, "vocab_size": l.vocab_size,
        "tie_word_embeddings": l.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "image_aspect_ratio": "pad", "mm_hidden_size": v.hidden_size,
        "mm_projector_type": cfg.projector_type, "mm_vision_select_layer": v.select_layer,
        "mm_vision_select_feature": "patch", "mm_vision_tower": vision_tower,
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "torch_dtype": dtype,
    })
    if sparse:
        out["sparse_config"] = sparse_config(cfg, source)
    else:
        out.pop("sparse_config", None)
    return out


def clip_config(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of a CLIP vision directory (what `CLIPVisionModel.from_pretrained` reads)."""
    v = cfg.vision
    return {"architectures": ["CLIPVisionModel"], "attention_dropout": 0.0, "hidden_act": "quick_gelu",
            "hidden_size": v.hidden_size, "image_size": v.image_size, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": v.intermediate_size,
            "layer_norm_eps": v.layer_norm_eps, "model_type": "clip_vision_model",
            "num_attention_heads": v.num_heads, "num_channels": 3, "num_hidden_layers": v.num_layers,
            "patch_size": v.patch_size, "projection_dim": v.hidden_size, "torch_dtype": dtype,
            "transformers_version": OFFICIAL_TRANSFORMERS}


def _tower_name(cfg: ModelConfig, source: Optional[dict]) -> Optional[str]:
    """The `mm_vision_tower` to write when it holds this tower, else None (bundle one)."""
    name = source.get("mm_vision_tower") if _is_original(source) else CLIP_HUB
    want = dataclasses.replace(cfg.vision, select_layer=-2)
    if name in KNOWN_TOWERS and KNOWN_TOWERS[name] == want:
        return name
    if isinstance(name, str) and (Path(name) / "config.json").is_file():
        c = _read_json(Path(name) / "config.json") or {}
        if _vision_config(c.get("vision_config", c), -2) == want:
            return name
    return None


def hf_config(cfg: ModelConfig, vocab: int, image_token: int, pad_token: int, dtype: str):
    """transformers' LlavaConfig for this model (saved with its own `save_pretrained`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    l, v = cfg.llm, cfg.vision
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=l.hidden_size, intermediate_size=l.intermediate_size,
        num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads,
        num_key_value_heads=l.num_kv_heads, head_dim=l.head_dim, hidden_act="silu",
        max_position_embeddings=l.max_position_embeddings, rms_norm_eps=l.rms_norm_eps,
        rope_theta=l.rope_theta, tie_word_embeddings=l.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=pad_token)
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
        patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act="quick_gelu")
    out = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                      image_seq_length=cfg.num_image_tokens, vision_feature_layer=v.select_layer,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      multimodal_projector_bias=True, tie_word_embeddings=l.tie_word_embeddings)
    out.architectures = ["LlavaForConditionalGeneration"]
    out.dtype = dtype
    return out


def _hf_vocab(cfg: ModelConfig, source: Optional[dict]) -> tuple[int, int, bool]:
    """(vocabulary size, image token id, whether <image> and <pad> are appended)."""
    V = cfg.llm.vocab_size
    img = (source or {}).get("image_token_index") if not _is_original(source) else None
    if isinstance(img, int) and 0 <= img < V:
        return V, img, False  # converted from llava-hf: its token is in the vocabulary
    return math.ceil((V + 2) / HF_VOCAB_MULTIPLE) * HF_VOCAB_MULTIPLE, V, True


def _hf_processor(src: Path, tmp: Path, cfg: ModelConfig, preprocessor: dict, image_token: int,
                  add_tokens: bool) -> Optional[str]:
    """Processor + tokenizer files; returns a note where the source has no tokenizer."""
    from transformers import AddedToken, AutoTokenizer, LlavaProcessor
    try:
        from transformers.models.llava import LlavaImageProcessorPil as ImageProc
    except ImportError:  # earlier 5.x: the PIL one is LlavaImageProcessor itself
        from transformers import LlavaImageProcessor as ImageProc
    pre = {k: v for k, v in preprocessor.items() if k not in ("image_processor_type", "processor_class")}
    image_processor = ImageProc(**{**pre, "do_pad": True})  # LLaVA-1.5's image_aspect_ratio "pad"
    image_processor.save_pretrained(tmp)
    if not ((src / "tokenizer.model").is_file() or (src / "tokenizer.json").is_file()):
        return "no tokenizer in the source: tokenizer and processor files not written"
    tok = AutoTokenizer.from_pretrained(str(src))
    if add_tokens:
        if len(tok) != image_token:
            raise CheckpointError(
                f"the tokenizer has {len(tok)} tokens but the model's vocabulary has {image_token}: "
                f"llava-hf's {HF_IMAGE_TOKEN} token cannot be placed after it")
        tok.add_tokens([AddedToken(HF_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        tok.add_special_tokens({"pad_token": HF_PAD_TOKEN})
    if tok.convert_tokens_to_ids(HF_IMAGE_TOKEN) != image_token:
        raise CheckpointError(f"the tokenizer's {HF_IMAGE_TOKEN} is not token {image_token}, "
                              "the image token of the source config")
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                          patch_size=cfg.vision.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=HF_IMAGE_TOKEN)
    proc.save_pretrained(tmp)
    if (src / "tokenizer.model").is_file():  # as the hub's llava-hf directories ship it
        shutil.copyfile(src / "tokenizer.model", tmp / "tokenizer.model")
    # transformers 5 drops the slow tokenizer's flags; LLaVA's tokenisation (SPEC §1) needs them
    old = _read_json(src / "tokenizer_config.json") or {}
    new = _read_json(tmp / "tokenizer_config.json") or {}
    keep = {k: old[k] for k in ("legacy", "add_bos_token", "add_eos_token") if k in old and k not in new}
    if keep:
        (tmp / "tokenizer_config.json").write_text(json.dumps({**new, **keep}, indent=2) + "\n")
    return None


# -- writing -----------------------------------------------------------------------------

def _shards(plan: list[tuple[str, np.dtype, tuple]], max_bytes: int) -> list[list]:
    """Greedy split in order, as transformers does (a tensor above the limit is a shard alone)."""
    shards, size = [[]], 0
    for item in plan:
        n = int(np.prod(item[2], dtype=np.int64)) * item[1].itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


class _ShardedWriter:
    """Planned tensors streamed into model[-0000i-of-0000n].safetensors (+ index)."""

    def __init__(self, directory: Path, plan: list, max_bytes: int):
        self.groups = _shards(plan, max_bytes)
        n = len(self.groups)
        self.files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.dir, self._i, self._left, self._w = directory, -1, 0, None
        self.weight_map = {name: f for f, g in zip(self.files, self.groups) for name, _, _ in g}
        self.subdir = directory.name if directory.name == TOWER_DIR else ""
        self.total_size = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, d, s in plan)

    def write(self, name: str, *parts: np.ndarray) -> None:
        if self._left == 0:
            self._i += 1
            self._w = SafetensorsWriter(self.dir / self.files[self._i], self.groups[self._i])
            self._left = len(self.groups[self._i])
        self._w.write(name, *parts)
        self._left -= 1
        if self._left == 0:
            self._w.close()

    def file_of(self, name: str) -> tuple[str, str]:
        """(folder relative to the export, weight file) holding tensor `name`."""
        return self.subdir, self.weight_map[name]

    def write_index(self, metadata: dict) -> None:
        if len(self.files) > 1:
            index = {"metadata": {**metadata, "total_size": self.total_size},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n")


def _identity_unused(cfg: ModelConfig, name: str) -> np.ndarray:
    fill = np.ones if name.endswith(".weight") else np.zeros
    return fill((cfg.vision.hidden_size,), np.float32)


def export(src: str | Path, dst: str | Path, fmt: str, dtype: Optional[str] = None,
           max_shard_size: str | int = "5GB", dense_only: bool = False, force: bool = False,
           progress: bool = True, info: Optional[dict] = None) -> Path:
    """Write the converted directory `src` (or train.py's WORKDIR/export) at `dst` in layout
    `fmt` ("original" or "llava-hf"). Bad input raises CheckpointError / CheckpointDirError
    before anything is written. `info`, when given, is filled with a summary."""
    from tqdm import tqdm

    if paths.is_url(dst):  # a bucket: write locally, then upload (the writers need files)
        url = paths.check_usable(dst, "--dst")
        if url.exists() and not force:
            raise CheckpointDirError(f"{url} exists; pass --force to replace it")
        with tempfile.TemporaryDirectory(prefix="dynllava-export-") as loc:
            export(src, Path(loc) / url.name, fmt, dtype, max_shard_size, dense_only, True,
                   progress, info)
            paths.upload_dir(Path(loc) / url.name, url)
        if info is not None:
            info["dst"] = str(url)
        return url
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown --format {fmt!r}: choose original or llava-hf")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be float32, float16 or bfloat16 for an export, not {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise CheckpointError("--max-shard-size must be positive")
    src, dst = Path(src), Path(dst).absolute()
    if not src.is_dir():
        raise CheckpointDirError(f"converted checkpoint directory not found: {src}")
    if not (src / "model_config.json").is_file():
        hint = (" (it looks like a PyTorch checkpoint: convert it first, or export from the "
                "converted directory)" if (src / "config.json").is_file() else "")
        raise CheckpointDirError(f"{src} is not a converted checkpoint: no model_config.json{hint}")
    check_disjoint(dst, {"--src": src})
    check_dst(dst, force)
    try:
        cfg = load_config(src)
    except (ValueError, TypeError) as e:
        raise CheckpointDirError(f"{src / 'model_config.json'} is not a valid model config: {e}") from e
    if not (src / "params").is_dir():
        raise CheckpointDirError(f"{src} has no params/ directory")
    meta = _params_metadata((src / "params").absolute())
    dtype = dtype or cfg.param_dtype
    out_dt = _np_dtype(dtype)
    source = _read_json(src / SOURCE_CONFIG)
    predictors = [k for k in ("image_predictor", "text_predictor") if any(p[0] == k for p in meta)]
    hf = fmt == "llava-hf"
    if hf and predictors and not dense_only:
        raise CheckpointError(
            f"{src} has Dynamic-LLaVA predictors ({', '.join(predictors)}) and transformers' "
            "LlavaForConditionalGeneration has no place for them: pass --dense-only to export the "
            "dense LLaVA model without them, or use --format original to keep them")
    if dense_only and not hf:
        raise CheckpointError("--dense-only applies to --format llava-hf (the original layout keeps the predictors)")

    # -- the plan: every tensor, its source leaf, its output names ------------------
    map_cfg = cfg.replace_sparse(enabled=False) if hf else cfg
    nmap = name_map(map_cfg)
    if cfg.llm.tie_word_embeddings:
        nmap.pop("lm_head.weight")  # tied: saved once, as the embedding
    expected = expected_torch_shapes(map_cfg, nmap)  # what the config says (shapes only)
    problems, tensors = [], []
    for canon, t in nmap.items():
        m = meta.get(t.path)
        if m is None:
            problems.append(f"missing params leaf {'/'.join(t.path)} (for {canon})")
        elif t.layer is not None and (not m[0] or m[0][0] <= t.layer):
            problems.append(f"params leaf {'/'.join(t.path)} {m[0]} has no layer {t.layer} (for {canon})")
        elif _torch_shape(m[0], t.layer, INVERSE[t.fn]) != expected[canon]:
            problems.append(f"{canon}: {_torch_shape(m[0], t.layer, INVERSE[t.fn])} != "
                            f"{expected[canon]} expected from the config")
        else:
            tensors.append(_Tensor(canon, expected[canon], t.path, t.layer, INVERSE[t.fn]))
    used = {t.path for t in nmap.values()}
    extra = sorted("/".join(p) for p in meta if p not in used and not (hf and p[0] in predictors))
    if extra:
        problems.append(f"params leaves the export does not know: {', '.join(extra[:10])}")
    if problems:
        raise CheckpointError(f"{src}/params does not match its model_config.json: " + "; ".join(problems))

    notes = []
    unused_path = src / UNUSED_TENSORS
    unused_names = set()
    if unused_path.is_file():
        unused_names = set(tensor_names([unused_path]))
    for canon in KEPT_UNUSED:
        tensors.append(_Tensor(canon, (cfg.vision.hidden_size,), None, None, None))
    if not set(KEPT_UNUSED) <= unused_names:
        notes.append("CLIP post_layernorm (unused by LLaVA) is not in the source: written as identity")

    tower, image_token, vocab, pad_token, add_tokens = None, None, cfg.llm.vocab_size, cfg.pad_token_id, False
    if hf:
        vocab, image_token, add_tokens = _hf_vocab(cfg, source)
        if add_tokens:
            pad_token = image_token + 1
            notes.append(f"vocabulary {cfg.llm.vocab_size} -> {vocab}: {HF_IMAGE_TOKEN} = {image_token}, "
                         f"{HF_PAD_TOKEN} = {pad_token}, new rows = the mean of the others")
        for t in tensors:
            if t.canonical in VOCAB_ROWS:
                t.pad_rows = vocab - t.shape[0]
                t.shape = (vocab, *t.shape[1:])
            t.outputs = (("main", hf_name(t.canonical)),)
    else:
        tower = _tower_name(cfg, source)
        for t in tensors:
            outs = [("main", t.canonical)]
            if tower is None and t.canonical.startswith(VISION_PREFIX):
                outs.append(("tower", t.canonical[len(VISION_PREFIX):]))
            t.outputs = tuple(outs)

    by_leaf: dict[tuple, list[_Tensor]] = {}  # the order they are produced and written in
    for t in tensors:
        by_leaf.setdefault(t.leaf, []).append(t)
    for items in by_leaf.values():
        items.sort(key=lambda t: -1 if t.layer is None else t.layer)
    tensors = [t for items in by_leaf.values() for t in items]
    plans: dict[str, list] = {"main": [], "tower": []}
    for t in tensors:
        for key, name in t.outputs:
            plans[key].append((name, out_dt, t.shape))
    preprocessor = _read_json(src / "preprocessor_config.json")
    if preprocessor is None:
        raise CheckpointDirError(f"{src} has no preprocessor_config.json")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_tmp_dir(dst)
    try:
        # -- configs, tokenizer, processor -----------------------------------------
        if hf:
            from transformers import GenerationConfig
            hcfg = hf_config(cfg, vocab, image_token, pad_token, dtype)
            hcfg.save_pretrained(tmp)
            GenerationConfig.from_model_config(hcfg).save_pretrained(tmp)
            note = _hf_processor(src, tmp, cfg, preprocessor, image_token, add_tokens)
            if note:
                notes.append(note)
        else:
            name = tower or str(dst / TOWER_DIR)
            conf = original_config(cfg, source, name, dtype)
            (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
            for f in TOKENIZER_FILES:
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / f)
            if not (src / "tokenizer.model").is_file() and (src / "tokenizer.json").is_file():
                # the official code's slow LlamaTokenizer reads only tokenizer.model
                from .tokenizer_json import read_tokenizer_json, sentencepiece_proto
                data = read_tokenizer_json(src / "tokenizer.json")
                (tmp / "tokenizer.model").write_bytes(sentencepiece_proto(data, src / "tokenizer.json"))
                notes.append("tokenizer.model rebuilt from tokenizer.json (the official code reads only it)")
            if not (tmp / "generation_config.json").exists():
                gen = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
                       "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                       "transformers_version": OFFICIAL_TRANSFORMERS}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
            if tower is None:
                (tmp / TOWER_DIR).mkdir()
                (tmp / TOWER_DIR / "config.json").write_text(
                    json.dumps(clip_config(cfg, dtype), indent=2, sort_keys=True) + "\n")
                (tmp / TOWER_DIR / "preprocessor_config.json").write_text(
                    json.dumps(preprocessor, indent=2) + "\n")

        # -- the weights, leaf by leaf ---------------------------------------------
        writers = {"main": _ShardedWriter(tmp, plans["main"], max_bytes)}
        if plans["tower"]:
            writers["tower"] = _ShardedWriter(tmp / TOWER_DIR, plans["tower"], 1 << 62)
        read = _LeafReader((src / "params").absolute())
        unused = dict(iter_tensors(unused_path, native=True)) if unused_names else {}
        want_sums = checksums.expected(src)  # the source's, verified as each leaf is read
        sums: dict[str, dict[str, int]] = {}  # the output's, for the converter to verify
        bar = tqdm(total=len(tensors), desc="exporting", unit="tensor", disable=not progress)
        for leaf, items in by_leaf.items():
            arr = read(leaf) if leaf is not None else None
            if arr is not None:
                checksums.check_leaf(src, want_sums, "/".join(leaf), arr)
            for t in items:
                if leaf is None:
                    w = unused.get(t.canonical)
                    w = _identity_unused(cfg, t.canonical) if w is None else w
                else:
                    w = t.fn(arr if t.layer is None else arr[t.layer])
                w = np.asarray(w).astype(out_dt, copy=False)
                parts = [w]
                if t.pad_rows:  # llava-hf's added tokens: the mean row, never the argmax
                    mean = w.mean(axis=0, dtype=np.float64)
                    parts.append(np.broadcast_to(mean.astype(out_dt), (t.pad_rows, *w.shape[1:])))
                crc = 0
                for p in parts:
                    crc = checksums.crc32_update(p, crc)
                for key, name in t.outputs:
                    writers[key].write(name, *parts)
                    out_dir, file = writers[key].file_of(name)
                    sums.setdefault(out_dir, {}).setdefault(file, {})[name] = crc
                del w, parts
                bar.update(1)
            del arr
        bar.close()
        n_params = sum(int(np.prod(s, dtype=np.int64)) for _, _, s in plans["main"])
        writers["main"].write_index({"total_parameters": n_params} if hf else {})
        for out_dir, files in sums.items():
            checksums.write_export(tmp / out_dir, files)

        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if info is not None:
        info.update(
            format=fmt, dtype=dtype, params=n_params, dst=str(dst), files=writers["main"].files,
            predictors=("not exported (--dense-only)" if hf and predictors
                        else ", ".join(predictors) if predictors else "none (plain LLaVA-1.5)"),
            vision=("inside the weights (llava-hf)" if hf else tower if tower is not None
                    else f"{dst / TOWER_DIR} (a CLIP directory written beside the weights; "
                         "mm_vision_tower names it)"),
            image_token=image_token, notes=notes)
    return dst
