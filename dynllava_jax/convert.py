"""PyTorch LLaVA-1.5 / Dynamic-LLaVA / llava-hf checkpoints -> our converted directory.

The conversion is a declarative name map (canonical PyTorch name -> params path, layer,
transform). Source names of every layout are first rewritten to the canonical original
LLaVA names (SPEC §7); tensors then stream shard by shard into preallocated arrays, so the
peak memory is about one copy of the converted model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import paths
from .checkpoint_io import CheckpointError, iter_tensors, tensor_names, weight_files
from .config import ConfigError, LLMConfig, ModelConfig, SparseConfig, VisionConfig, check_type

VISION_PREFIX = "model.vision_tower.vision_tower."
# The public CLIP tower every LLaVA-1.5 checkpoint names; used only to recognise it.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(),
}
CLIP_336_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
IGNORED = [
    r".*rotary_emb\.inv_freq$", r"(model\.vision_tower\.vision_tower\.)?vision_model\.post_layernorm\..*",
    r"text_model\..*", r"logit_scale", r"(text|visual)_projection\..*",
    r"model\.(text|instruct)_score_predictor\..*",  # the released config switches them off
]

T = lambda w: w.T  # PyTorch Linear [out, in] -> Flax Dense [in, out]
ID = lambda w: w
CONV = lambda w: w.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
CONV_INV = lambda w: w.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
INVERSE = {T: T, ID: ID, CONV: CONV_INV}  # each transform's inverse (export.py)
# Source tensors the model does not compute with but that a faithful export gives back
# (CLIP's post_layernorm): kept beside the params in `unused_tensors.safetensors`.
KEPT_UNUSED = [VISION_PREFIX + "vision_model.post_layernorm.weight",
               VISION_PREFIX + "vision_model.post_layernorm.bias"]


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]
    layer: Optional[int]  # index into a stacked leading axis, or None
    fn: Callable[[np.ndarray], np.ndarray]


def _linear(prefix, path, layer=None, bias=True):
    out = {f"{prefix}.weight": Target(path + ("kernel",), layer, T)}
    if bias:
        out[f"{prefix}.bias"] = Target(path + ("bias",), layer, ID)
    return out


def _norm(prefix, path, layer=None, bias=True, scale="scale"):
    out = {f"{prefix}.weight": Target(path + (scale,), layer, ID)}
    if bias:
        out[f"{prefix}.bias"] = Target(path + ("bias",), layer, ID)
    return out


def name_map(cfg: ModelConfig) -> dict[str, Target]:
    """Canonical PyTorch name -> Target, for every tensor the model needs."""
    m: dict[str, Target] = {}
    L = ("llm", "layers")
    m["model.embed_tokens.weight"] = Target(("llm", "embed_tokens", "embedding"), None, ID)
    m["model.norm.weight"] = Target(("llm", "norm", "scale"), None, ID)
    m["lm_head.weight"] = Target(("llm", "lm_head", "kernel"), None, T)
    for i in range(cfg.llm.num_layers):
        p = f"model.layers.{i}."
        m.update(_norm(p + "input_layernorm", L + ("input_norm",), i, bias=False))
        m.update(_norm(p + "post_attention_layernorm", L + ("post_attention_norm",), i, bias=False))
        for n in ("q", "k", "v", "o"):
            m.update(_linear(f"{p}self_attn.{n}_proj", L + (f"{n}_proj",), i, bias=False))
        for n in ("gate", "up", "down"):
            m.update(_linear(f"{p}mlp.{n}_proj", L + (f"{n}_proj",), i, bias=False))
    m.update(_linear("model.mm_projector.0", ("projector", "linear_1")))
    m.update(_linear("model.mm_projector.2", ("projector", "linear_2")))
    v = VISION_PREFIX + "vision_model."
    E = ("vision", "embeddings")
    m[v + "embeddings.class_embedding"] = Target(E + ("class_embedding",), None, ID)
    m[v + "embeddings.patch_embedding.weight"] = Target(E + ("patch_embedding", "kernel"), None, CONV)
    m[v + "embeddings.position_embedding.weight"] = Target(E + ("position_embedding",), None, ID)
    m.update(_norm(v + "pre_layrnorm", E + ("pre_layrnorm",)))
    for i in range(cfg.vision.num_layers):
        p, VL = f"{v}encoder.layers.{i}.", ("vision", "layers")
        m.update(_norm(p + "layer_norm1", VL + ("layer_norm1",), i))
        m.update(_norm(p + "layer_norm2", VL + ("layer_norm2",), i))
        for n in ("q", "k", "v", "out"):
            m.update(_linear(f"{p}self_attn.{n}_proj", VL + (f"{n}_proj",), i))
        m.update(_linear(p + "mlp.fc1", VL + ("fc1",), i))
        m.update(_linear(p + "mlp.fc2", VL + ("fc2",), i))
    s = cfg.sparse
    if s.enabled and s.use_vision_predictor:
        p, P = "model.image_score_predictor.", ("image_predictor",)
        m.update(_norm(p + "down_mlp.0", P + ("down_norm",)))
        m.update(_linear(p + "down_mlp.1", P + ("down_proj",)))
        for j in range(s.num_layers):
            b, B = f"{p}transformer.{j}.", P + (f"block_{j}",)
            m.update(_norm(b + "norm1", B + ("norm1",)))
            m.update(_norm(b + "norm2", B + ("norm2",)))
            m.update(_linear(b + "attn.qkv", B + ("qkv",), bias=False))
            m.update(_linear(b + "attn.proj", B + ("proj",)))
            m.update(_linear(b + "mlp.fc1", B + ("fc1",)))
            m.update(_linear(b + "mlp.fc2", B + ("fc2",)))
        for k, n in zip((0, 2, 4), ("out_1", "out_2", "out_3")):
            m.update(_linear(f"{p}output_mlp.{k}", P + (n,)))
    if s.enabled and s.use_output_text_predictor:
        p, P = "model.output_text_score_predictor.output_mlp.", ("text_predictor",)
        m.update(_norm(p + "0", P + ("norm",)))
        for k, n in zip((1, 3, 5, 7), ("fc_1", "fc_2", "fc_3", "fc_4")):
            m.update(_linear(f"{p}{k}", P + (n,)))
    return m


# -- layouts -----------------------------------------------------------------

_HF_RULES = [  # llava-hf names (every transformers version seen) -> canonical
    (r"^(model\.)?language_model\.model\.", "model."),
    (r"^model\.language_model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^(model\.)?multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^(model\.)?multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^(model\.)?vision_tower\.vision_model\.", VISION_PREFIX + "vision_model."),
    (r"^(model\.)?vision_tower\.", VISION_PREFIX + "vision_model."),
]


def canonical_name(name: str, layout: str) -> str:
    if layout == "llava-hf":
        for pat, rep in _HF_RULES:
            new, n = re.subn(pat, rep, name)
            if n:
                return new
    return name


def detect_layout(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if "text_config" in hf or any("LlavaForConditionalGeneration" in a for a in archs):
        return "llava-hf"
    if "mm_projector_type" in hf or "mm_vision_tower" in hf or hf.get("model_type") in (
            "llava_llama", "dynamic_llava_llama", "llava"):
        return "original"
    raise CheckpointError(
        "config.json is neither an original LLaVA-1.5 / Dynamic-LLaVA config (no "
        "mm_projector_type / mm_vision_tower) nor a llava-hf LlavaForConditionalGeneration config")


class _Fields:
    """Typed reads of one source config object; errors name `config.json` and the field."""

    def __init__(self, d, file: Path, where: str = ""):
        if not isinstance(d, dict):
            raise CheckpointError(f"{file}: {where or 'the config'} must be a JSON object, got {json.dumps(d)[:60]}")
        self.d, self.file, self.where = d, file, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def sub(self, key: str) -> "_Fields":
        v = self.d.get(key)
        return _Fields({} if v is None else v, self.file, self.name(key))

    def get(self, key: str, default, kind: type, positive: bool = False):
        v = self.d.get(key)
        if v is None:
            return default
        try:
            v = check_type(v, kind, self.name(key))
        except ConfigError as e:
            raise CheckpointError(f"{self.file}: {e}") from e
        if positive and not v > 0:
            raise CheckpointError(f"{self.file}: {self.name(key)} must be positive, got {v}")
        return v

    def token_id(self, key: str, default: int) -> int:
        v = self.d.get(key)
        if isinstance(v, list):
            raise CheckpointError(f"{self.file}: {self.name(key)} is a list {v}; only one id is supported")
        v = self.get(key, default, int)
        if v < 0:
            raise CheckpointError(f"{self.file}: {self.name(key)} must be a token id >= 0, got {v}")
        return v


def _llm_config(t: _Fields) -> LLMConfig:
    heads = t.get("num_attention_heads", 32, int, positive=True)
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4 / 5 names
        scaling = t.d.get(key) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else scaling
        if kind not in ("default", None):
            raise CheckpointError(f"{t.file}: {t.name(key)} {scaling} is not supported (LLaVA-1.5 uses plain RoPE)")
    if t.d.get("attention_bias") or t.d.get("mlp_bias"):
        raise CheckpointError("attention_bias / mlp_bias are not supported (LLaMA has no biases)")
    rope = t.sub("rope_parameters").get("rope_theta", None, float, positive=True)
    out = LLMConfig(
        vocab_size=t.get("vocab_size", 32000, int, True), hidden_size=t.get("hidden_size", 4096, int, True),
        num_layers=t.get("num_hidden_layers", 32, int, True), num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads", heads, int, True),
        intermediate_size=t.get("intermediate_size", 11008, int, True),
        rms_norm_eps=t.get("rms_norm_eps", 1e-5, float, True),
        rope_theta=rope if rope is not None else t.get("rope_theta", 10000.0, float, True),
        max_position_embeddings=t.get("max_position_embeddings", 4096, int, True),
        tie_word_embeddings=t.get("tie_word_embeddings", False, bool))
    _check_divides(t, "num_attention_heads", out.num_heads, "hidden_size", out.hidden_size)
    _check_divides(t, "num_key_value_heads", out.num_kv_heads, "num_attention_heads", out.num_heads)
    hd = t.get("head_dim", out.head_dim, int, True)
    if hd != out.head_dim:
        raise CheckpointError(f"{t.file}: {t.name('head_dim')} {hd} is not hidden_size / num_attention_heads "
                              f"= {out.head_dim} (LLaMA's layout)")
    return out


def _check_divides(f, small: str, a: int, big: str, b: int) -> None:
    """`a` (field `small`) must divide `b` (field `big`) of the config fields `f`."""
    if b % a:
        raise CheckpointError(f"{f.file}: {f.name(small)} {a} does not divide {f.name(big)} {b}")


def _vision_config(v, select_layer: int, file: Path = Path("config.json")) -> VisionConfig:
    v = v if isinstance(v, _Fields) else _Fields(v, file, "vision_config")
    out = VisionConfig(
        image_size=v.get("image_size", 336, int, True), patch_size=v.get("patch_size", 14, int, True),
        hidden_size=v.get("hidden_size", 1024, int, True), num_layers=v.get("num_hidden_layers", 24, int, True),
        num_heads=v.get("num_attention_heads", 16, int, True),
        intermediate_size=v.get("intermediate_size", 4096, int, True),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5, float, True), select_layer=select_layer)
    _check_divides(v, "num_attention_heads", out.num_heads, "hidden_size", out.hidden_size)
    if out.image_size % out.patch_size:
        raise CheckpointError(f"{v.file}: {v.name('image_size')} {out.image_size} is not a multiple of "
                              f"{v.name('patch_size')} {out.patch_size}")
    return out


_SPARSE_TYPES = {"d_model": int, "nhead": int, "dim_feedforward": int, "num_layers": int,
                 "sparse_layer": int, "vision_keep_rate": float, "output_text_keep_rate": float,
                 "output_text_len_for_training": int, "mask_loss_weight": float,
                 "use_vision_predictor": bool, "use_output_text_predictor": bool}


def _sparse_config(sc: Optional[dict], file: Path = Path("config.json")) -> SparseConfig:
    if not sc:
        return SparseConfig(enabled=False)
    f = _Fields(sc, file, "sparse_config")
    kw = {k: f.get(k, None, kind) for k, kind in _SPARSE_TYPES.items() if sc.get(k) is not None}
    return SparseConfig(enabled=True, **kw)


def _check_act(c: dict, key: str, want: str, what: str) -> None:
    if c.get(key, want) != want:
        raise CheckpointError(f"{what} uses {key} {c[key]!r}; only {want!r} is supported")


def vision_from_shapes(shapes: dict[str, tuple], prefix: str, select_layer: int,
                       heads_from: Optional[VisionConfig]) -> VisionConfig:
    """The tower's config from its tensor shapes (heads come from a known config)."""
    pe = shapes[prefix + "embeddings.patch_embedding.weight"]
    pos = shapes[prefix + "embeddings.position_embedding.weight"]
    fc1 = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"]
    layers = prefix + "encoder.layers."
    nl = len({k[len(layers):].split(".")[0] for k in shapes if k.startswith(layers)})
    side = int(round((pos[0] - 1) ** 0.5)) * pe[2]
    cfg = VisionConfig(image_size=side, patch_size=pe[2], hidden_size=pe[0], num_layers=nl,
                       num_heads=heads_from.num_heads if heads_from else 0,
                       intermediate_size=fc1[0], select_layer=select_layer)
    return cfg


@dataclasses.dataclass
class Source:
    """What a source checkpoint holds: layout, configs, and where each tensor lives."""

    layout: str
    config: ModelConfig
    tensors: dict[str, tuple[tuple, Path, str]]  # canonical -> (shape, file, source name)
    ignored: list[str]
    preprocessor: dict
    tokenizer_dir: Path
    vision_source: str = ""  # where the vision tower's weights come from, for the summary
    raw_config: Optional[dict] = None  # the source's config.json, kept as source_config.json
    unused: Optional[dict] = None  # KEPT_UNUSED names -> (shape, file, source name)


def _read_json_object(path: Path, what: str = "") -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: {what or 'the file'} must be a JSON object, got {type(d).__name__}")
    return d


def read_preprocessor(d: Path) -> Optional[dict]:
    """CLIP image settings from `preprocessor_config.json`, or from the `image_processor` of
    transformers 5's `processor_config.json` (a LlavaImageProcessor: CLIP's settings plus
    `do_pad`, the square padding LLaVA always applies); None where neither exists."""
    if (d / "preprocessor_config.json").is_file():
        pre = _read_json_object(d / "preprocessor_config.json")
    elif (d / "processor_config.json").is_file():
        proc = _read_json_object(d / "processor_config.json")
        pre = proc.get("image_processor")
        if not isinstance(pre, dict):
            raise CheckpointError(f"{d / 'processor_config.json'}: no image_processor object")
    else:
        return None
    pre = {k: v for k, v in pre.items() if k not in ("do_pad", "processor_class")}
    pre["image_processor_type"] = "CLIPImageProcessor"
    return pre


def _pad_id(top: _Fields) -> int:
    """The config's pad id; -1 (early LLaMA configs' "none") means LLaVA's pad, <unk> = 0."""
    if top.d.get("pad_token_id") == -1:
        return 0
    return top.token_id("pad_token_id", 0)


def read_source(src: Path, vision_tower: Optional[Path] = None) -> Source:
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {src}")
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{src} has no config.json")
    hf = _read_json_object(cfg_file, "the config")
    top = _Fields(hf, cfg_file)
    layout = detect_layout(hf)
    raw = tensor_names(weight_files(src))
    tensors = {}
    for k, (shape, f) in raw.items():
        canon = canonical_name(k, layout)
        if canon in tensors:
            raise CheckpointError(f"tensors {tensors[canon][2]!r} and {k!r} are the same weight "
                                  f"({canon}); the checkpoint mixes two layouts")
        tensors[canon] = (shape, f, k)

    if layout == "llava-hf":
        text = top.sub("text_config")
        llm = _llm_config(text)
        sel = top.get("vision_feature_layer", -2, int)
        if hf.get("vision_feature_select_strategy", "default") != "default":
            raise CheckpointError("only vision_feature_select_strategy 'default' (drop CLS) is supported")
        if hf.get("projector_hidden_act", "gelu") != "gelu":
            raise CheckpointError("only the mlp2x_gelu projector is supported")
        _check_act(text.d, "hidden_act", "silu", "the LLM")
        _check_act(top.sub("vision_config").d, "hidden_act", "quick_gelu", "the vision tower")
        vision = _vision_config(top.sub("vision_config"), sel)
        sparse = SparseConfig(enabled=False)
        image_token = -200
        pre_dir = src
    else:
        text = top
        llm = _llm_config(top)
        if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise CheckpointError(f"projector {hf.get('mm_projector_type')!r} is not supported (mlp2x_gelu only)")
        sel = top.get("mm_vision_select_layer", -2, int)
        _check_act(hf, "hidden_act", "silu", "the LLM")
        if hf.get("mm_vision_select_feature", "patch") != "patch":
            raise CheckpointError("only mm_vision_select_feature 'patch' (drop CLS) is supported")
        hub = hf.get("mm_vision_tower")
        if vision_tower is None and isinstance(hub, str) and (Path(hub) / "config.json").is_file():
            vision_tower = Path(hub)  # original configs may name a local CLIP directory
        sc = hf.get("sparse_config")
        if sc is not None and not isinstance(sc, dict):
            raise CheckpointError(f"{cfg_file}: sparse_config must be a JSON object, got {json.dumps(sc)[:60]}")
        sparse = _sparse_config(sc, cfg_file)
        vision, pre_dir = None, None
        image_token = -200

    if vision_tower is not None:
        vt = Path(vision_tower)
        if not (vt / "config.json").exists():
            raise CheckpointError(f"--vision-tower {vt}: no config.json (a CLIP vision directory is expected)")
        vcfg = _read_json_object(vt / "config.json", "the config")
        vsec = vcfg.get("vision_config", vcfg)
        _check_act(vsec if isinstance(vsec, dict) else {}, "hidden_act", "quick_gelu", "the vision tower")
        vision = _vision_config(_Fields(vsec, vt / "config.json", "vision_config" if vsec is not vcfg else ""), sel)
        pre_dir = vt
        tensors = {k: v for k, v in tensors.items() if not k.startswith(VISION_PREFIX)}
        for k, (shape, f) in tensor_names(weight_files(vt)).items():
            key = k if k.startswith("vision_model.") else None
            if key is None and k.startswith("model.vision_model."):
                key = k[len("model."):]
            if key is None:
                continue
            tensors[VISION_PREFIX + key] = (shape, f, k)
    elif vision is None:
        hub = hf.get("mm_vision_tower", "?")
        vp = VISION_PREFIX + "vision_model."
        shapes = {k[len(vp):]: s for k, (s, _, _) in tensors.items() if k.startswith(vp)}
        known = KNOWN_TOWERS.get(hub) if isinstance(hub, str) else None
        if not shapes:
            raise CheckpointError(
                f"the checkpoint holds no vision tower weights and names {hub!r}, which cannot be "
                "downloaded here: pass --vision-tower DIR (a local CLIP vision directory)")
        guess = vision_from_shapes({"" + k: s for k, s in shapes.items()}, "", sel, known)
        if known is None or dataclasses.replace(guess, num_heads=known.num_heads,
                                                layer_norm_eps=known.layer_norm_eps) != \
                dataclasses.replace(known, select_layer=sel):
            raise CheckpointError(
                f"the vision tower inside the checkpoint does not have the shapes of {hub!r}, so its "
                "attention heads are unknown: pass --vision-tower DIR (its CLIP config and preprocessor)")
        vision = dataclasses.replace(known, select_layer=sel)

    preprocessor = read_preprocessor(pre_dir) if pre_dir is not None else None
    if preprocessor is None:
        if vision.image_size != 336:
            where = (f"--vision-tower {pre_dir}" if vision_tower is not None else str(src))
            fix = ("add it there" if vision_tower is not None or layout == "llava-hf"
                   else "pass --vision-tower DIR")
            raise CheckpointError(
                f"{where} has no preprocessor_config.json or processor_config.json, and the "
                f"{vision.image_size} px vision tower is not CLIP-336 (whose settings are known): {fix}")
        preprocessor = dict(CLIP_336_PREPROCESSOR)

    def token(key, default):  # top level first (original layout), then text_config (llava-hf)
        if hf.get(key) is not None:
            return top.token_id(key, default)
        return text.token_id(key, default) or default
    cfg = ModelConfig(vision=vision, llm=llm, sparse=sparse, image_token_index=image_token,
                      bos_token_id=token("bos_token_id", 1) or 1, eos_token_id=token("eos_token_id", 2) or 2,
                      pad_token_id=_pad_id(top))
    try:
        cfg.validate()
    except ConfigError as e:  # relations between fields, in our names (e.g. sparse.sparse_layer)
        raise CheckpointError(f"{cfg_file}: {e}") from e
    ignored = [k for k in tensors if any(re.fullmatch(p, k) for p in IGNORED)]
    unused = {k: tensors[k] for k in KEPT_UNUSED if k in tensors}
    for k in ignored:
        tensors.pop(k)
    vision_source = (f"{vision_tower} (CLIP directory)" if vision_tower is not None
                     else "inside the checkpoint")
    return Source(layout, cfg, tensors, ignored, preprocessor, src, vision_source, hf, unused)


def check_names(src: Source, nmap: dict[str, Target], expected_shapes: dict[str, tuple]) -> None:
    """Raise one CheckpointError that lists every missing, unexpected or mis-shaped tensor."""
    have, want = set(src.tensors), set(nmap)
    if src.config.llm.tie_word_embeddings and "lm_head.weight" not in have:
        want.discard("lm_head.weight")
    def shown(k):  # the name in the file, and the canonical name where they differ
        orig = src.tensors[k][2]
        return k if orig == k else f"{orig} (= {k})"

    missing = sorted(want - have)
    unexpected = sorted(shown(k) for k in have - want)
    bad = sorted(f"{shown(k)}: {tuple(src.tensors[k][0])} != expected {expected_shapes[k]}"
                 for k in want & have if tuple(src.tensors[k][0]) != expected_shapes[k])
    if missing or unexpected or bad:
        lines = []
        note = "" if src.layout == "original" else " (original LLaVA names)"
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
            if items:
                listed = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                suffix = note if title == "missing" else ""
                lines.append(f"{len(items)} {title} tensor(s){suffix}:\n  " + "\n  ".join(listed))
        raise CheckpointError("checkpoint does not match the model config; nothing was written.\n"
                              + "\n".join(lines))


def expected_torch_shapes(cfg: ModelConfig, nmap: dict[str, Target]) -> dict[str, tuple]:
    """The PyTorch shape each mapped tensor must have (from our param shapes)."""
    import jax
    from .model import init_params
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    out = {}
    for name, t in nmap.items():
        leaf = shapes
        for p in t.path:
            leaf = leaf[p]
        s = tuple(leaf.shape[1:] if t.layer is not None else leaf.shape)
        if t.fn is T:
            s = s[::-1]
        elif t.fn is CONV:
            s = (s[3], s[2], s[0], s[1])
        out[name] = s
    return out


def _assign(dest: np.ndarray, arr: np.ndarray, fn) -> None:
    """dest[...] = fn(arr), cast from the stored dtype with no whole-tensor temporary.

    Transposes go in blocks of rows, each cast first (contiguous) and then transposed into
    place: about 4x faster than one strided cast over a large matrix.
    """
    if fn is T and arr.ndim == 2 and arr.size > (1 << 20):
        rows = 256
        for i in range(0, arr.shape[0], rows):
            np.copyto(dest[:, i: i + rows], arr[i: i + rows].astype(dest.dtype).T)
    else:
        np.copyto(dest, fn(arr), casting="unsafe")


def check_tokenizer(d: Path) -> Optional[str]:
    """A note where `d` has no tokenizer; CheckpointError where its tokenizer is unusable."""
    from .tokenizer import LlavaTokenizer, has_tokenizer
    if not has_tokenizer(d):
        return (f"{d} has no tokenizer.model or tokenizer.json: infer.py needs one in the converted "
                "directory (copy the checkpoint's tokenizer files there)")
    try:
        LlavaTokenizer(d)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"the checkpoint's tokenizer cannot be used: {e}") from e
    return None


def _check_dtype(name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind in "biu":
        raise CheckpointError(f"tensor {name} is stored as {arr.dtype}, not floating point: "
                              "it cannot be a weight (refusing to cast it)")


def _check_finite(name: str, dest: np.ndarray, allow_nonfinite: bool) -> None:
    """NaN / Inf weights would make every answer token 0; checked after the cast (a float32
    value beyond bfloat16's range becomes Inf there)."""
    if not allow_nonfinite and not np.isfinite(dest).all():
        bad = int(dest.size - np.count_nonzero(np.isfinite(dest)))
        raise CheckpointError(f"tensor {name} has {bad} NaN/Inf value(s) (after the cast to {dest.dtype}); "
                              "pass --allow-nonfinite to convert it anyway")


def convert(src: str | Path, dst: str | Path, vision_tower: Optional[str | Path] = None,
            dtype: str = "float32", force: bool = False, progress: bool = True,
            info: Optional[dict] = None, allow_nonfinite: bool = False) -> ModelConfig:
    """Convert a PyTorch checkpoint directory into a converted directory at `dst`.

    Peak memory is the converted params (preallocated in the target dtype) plus one source
    tensor: tensors are read one at a time in their stored dtype and cast in place, and the
    Orbax save does not copy host arrays. `info`, when given, is filled with a summary
    (layout, params count, predictors, ignored tensors, dst) for the caller to print.
    """
    import ml_dtypes
    from tqdm import tqdm
    from . import checksums
    from .checkpoint import CheckpointDirError, check_disjoint, check_dst, save_converted

    if dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    url = paths.is_url(dst)
    dst = paths.as_path(dst) if url else Path(dst)  # a bucket URL stays one
    check_disjoint(dst, {"--src": src, "--vision-tower": vision_tower})
    if url:
        if dst.exists() and not force:
            raise CheckpointDirError(f"{dst} exists; pass --force to replace it")
    else:
        check_dst(dst.absolute(), force)
    source = read_source(Path(src), Path(vision_tower) if vision_tower else None)
    tokenizer_note = check_tokenizer(source.tokenizer_dir)
    cfg = source.config.replace(dtype="bfloat16" if dtype == "bfloat16" else "float32",
                                param_dtype=dtype)
    nmap = name_map(cfg)
    shapes = expected_torch_shapes(cfg, nmap)
    check_names(source, nmap, shapes)

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    import jax
    from .model import init_params
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map(lambda s: np.empty(s.shape, np_dtype), abstract)
    filled = set()
    by_file: dict[Path, list[str]] = {}
    for canon, (_, f, orig) in source.tensors.items():
        by_file.setdefault(f, []).append(canon)
    orig_to_canon = {(f, orig): canon for canon, (_, f, orig) in source.tensors.items()}
    bar = tqdm(total=len(source.tensors), desc="converting", unit="tensor", disable=not progress)
    try:  # the bar's line ends before any error is printed
        sums = {}  # a directory's tensor_checksums.json (our export writes one), verified as read
        for f in sorted(by_file):
            if f.parent not in sums:
                sums[f.parent] = checksums.export_sums(f.parent)
            wanted = {source.tensors[canon][2] for canon in by_file[f]}
            for name, arr in iter_tensors(f, native=True, names=wanted):
                canon = orig_to_canon.get((f, name))
                if canon is None:
                    continue
                checksums.verify_tensor(sums[f.parent], f, name, arr)
                t = nmap[canon]
                leaf = params
                for p in t.path[:-1]:
                    leaf = leaf[p]
                dest = leaf[t.path[-1]] if t.layer is None else leaf[t.path[-1]][t.layer]
                _check_dtype(name, arr)
                _assign(dest, arr, t.fn)
                _check_finite(name, dest, allow_nonfinite)
                del arr
                filled.add(canon)
                bar.update(1)
    finally:
        bar.close()
    if cfg.llm.tie_word_embeddings and "lm_head.weight" not in filled:
        params["llm"]["lm_head"]["kernel"] = params["llm"]["embed_tokens"]["embedding"].T.copy()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    unused = {}
    for canon, (_, f, orig) in (source.unused or {}).items():
        for _, arr in iter_tensors(f, native=True, names={orig}):
            _check_dtype(orig, arr)
            unused[canon] = arr.astype(np_dtype)
    out = save_converted(dst, params, cfg, source.preprocessor, source.tokenizer_dir, force=force,
                         source_config=source.raw_config, unused=unused)
    if info is not None:
        info.update(
            layout=source.layout, params=n_params, dtype=dtype, dst=str(out),
            predictors=[k for k in ("image_predictor", "text_predictor") if k in params],
            ignored=list(source.ignored), files=len(by_file),
            vision_tower=source.vision_source,
            tokenizer=tokenizer_note or ("tokenizer.model" if (source.tokenizer_dir / "tokenizer.model").is_file()
                                         else "tokenizer.json (LLaVA's rules on its sentencepiece model)"),
            warnings=[tokenizer_note] if tokenizer_note else [])
    return cfg
