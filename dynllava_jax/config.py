"""Typed model configuration: vision tower, projector, LLM, sparsity.

A converted checkpoint stores one `ModelConfig` as JSON (`model_config.json`);
presets name the shapes of the published models and of the tiny test model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .paths import as_path

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A model config field has the wrong type or an impossible value; the message names it."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (pre-LN, quick_gelu)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # hidden_states index; -2 = input of the last layer

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """Encoder layers that actually run to produce the selected features."""
        idx = self.select_layer % (self.num_layers + 1)
        return idx


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """LLaMA-2 layout decoder (Vicuna v1.5)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Dynamic-LLaVA predictors and keep rates (SPEC §2, §4)."""

    enabled: bool = True  # False: a plain LLaVA-1.5 checkpoint, no predictors
    d_model: int = 512
    nhead: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 2
    sparse_layer: int = 2
    vision_keep_rate: float = 0.2
    output_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 50
    mask_loss_weight: float = 100.0
    use_vision_predictor: bool = True
    use_output_text_predictor: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)
    projector_type: str = "mlp2x_gelu"
    image_token_index: int = -200  # the marker in prompt ids (LLaVA's convention)
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def num_image_tokens_kept(self) -> int:
        return max(1, int(self.num_image_tokens * self.sparse.vision_keep_rate))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def replace_sparse(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, sparse=dataclasses.replace(self.sparse, **kw))

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Typed and range-checked: a `ConfigError` names the first bad field (e.g. `llm.num_heads`).

        The three sections must be present (a missing one would silently mean LLaVA-7B's
        shapes); fields missing inside a section take their defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        sub = {"vision": VisionConfig, "llm": LLMConfig, "sparse": SparseConfig}
        for key, typ in sub.items():
            if key not in d:
                raise ConfigError(f"{key}: missing section")
            d[key] = _from_fields(typ, d[key], key)
        cfg = _from_fields(cls, d, "")
        cfg.validate()
        return cfg

    def validate(self) -> "ModelConfig":
        """Check ranges and relations between fields; returns self."""
        v, l, s = self.vision, self.llm, self.sparse

        def need(ok: bool, field: str, what: str):
            if not ok:
                raise ConfigError(f"{field}: {what}")
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size"):
            need(getattr(v, name) > 0, f"vision.{name}", f"must be positive, got {getattr(v, name)}")
        need(v.image_size % v.patch_size == 0, "vision.image_size",
             f"{v.image_size} is not a multiple of patch_size {v.patch_size}")
        need(v.hidden_size % v.num_heads == 0, "vision.num_heads",
             f"{v.num_heads} does not divide hidden_size {v.hidden_size}")
        need(-(v.num_layers + 1) <= v.select_layer <= v.num_layers, "vision.select_layer",
             f"{v.select_layer} is not a hidden-state index of a {v.num_layers}-layer tower")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            need(getattr(l, name) > 0, f"llm.{name}", f"must be positive, got {getattr(l, name)}")
        need(l.hidden_size % l.num_heads == 0, "llm.num_heads",
             f"{l.num_heads} does not divide hidden_size {l.hidden_size}")
        need(l.num_heads % l.num_kv_heads == 0, "llm.num_kv_heads",
             f"{l.num_kv_heads} does not divide num_heads {l.num_heads}")
        for eps, field in ((v.layer_norm_eps, "vision.layer_norm_eps"), (l.rms_norm_eps, "llm.rms_norm_eps"),
                           (l.rope_theta, "llm.rope_theta")):
            need(eps > 0, field, f"must be positive, got {eps}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            need(0 <= tid < l.vocab_size, name, f"{tid} is not a token id of the {l.vocab_size}-token vocabulary")
        need(self.projector_type == "mlp2x_gelu", "projector_type",
             f"{self.projector_type!r} is not supported (mlp2x_gelu only)")
        for name in ("dtype", "param_dtype"):
            need(getattr(self, name) in DTYPES, name, f"{getattr(self, name)!r} is not one of {', '.join(DTYPES)}")
        if s.enabled:
            for name in ("d_model", "nhead", "dim_feedforward", "num_layers"):
                need(getattr(s, name) > 0, f"sparse.{name}", f"must be positive, got {getattr(s, name)}")
            need(s.d_model % s.nhead == 0, "sparse.nhead", f"{s.nhead} does not divide d_model {s.d_model}")
            need(0 <= s.sparse_layer < l.num_layers, "sparse.sparse_layer",
                 f"{s.sparse_layer} is not a layer of the {l.num_layers}-layer LLM")
            for name in ("vision_keep_rate", "output_text_keep_rate"):
                need(0.0 < getattr(s, name) <= 1.0, f"sparse.{name}", f"must be in (0, 1], got {getattr(s, name)}")
            need(s.output_text_len_for_training >= 0, "sparse.output_text_len_for_training",
                 f"must be >= 0, got {s.output_text_len_for_training}")
            need(s.mask_loss_weight >= 0, "sparse.mask_loss_weight", f"must be >= 0, got {s.mask_loss_weight}")
        return self

    def save(self, path: str | Path) -> None:
        as_path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read `path`; a `ConfigError` names the file and the bad field."""
        try:
            d = json.loads(as_path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def check_type(value: Any, kind: type, field: str) -> Any:
    """`value` as `kind` (an int is a float; nothing else converts); `ConfigError` otherwise."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{field}: must be a finite number, got {value}")
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (bool, str) and isinstance(value, kind):
        return value
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    raise ConfigError(f"{field}: must be {names[kind]}, got {json.dumps(value)}")


def _from_fields(cls, d: Any, where: str):
    prefix = f"{where}." if where else ""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be an object, got {json.dumps(d)}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(prefix + u for u in sorted(unknown))}")
    kw = {}
    for k, v in d.items():
        kind = _TYPES.get(str(names[k].type))
        kw[k] = v if kind is None else check_type(v, kind, prefix + k)
    return cls(**kw)


def _llava_7b() -> ModelConfig:
    return ModelConfig()


def _llava_13b() -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                      intermediate_size=13824))


def _tiny() -> ModelConfig:
    """The shapes of the official tiny fixture (SPEC §8): 5 layers, hidden 96, GQA 6/2."""
    return ModelConfig(
        vision=VisionConfig(image_size=112, patch_size=14, hidden_size=48, num_layers=3,
                            num_heads=4, intermediate_size=96),
        llm=LLMConfig(vocab_size=384, hidden_size=96, num_layers=5, num_heads=6,
                      num_kv_heads=2, intermediate_size=192, max_position_embeddings=512),
        sparse=SparseConfig(d_model=48, nhead=4, dim_feedforward=96, num_layers=2),
    )


def _synthvqa() -> ModelConfig:
    """The small model trained from scratch on SynthVQA (configs/synthvqa_*.py): 168 px
    images (144 image tokens), CLIP tower 3 x 96 (2 layers used), LLM 4 x 128, vocabulary
    512 (the SynthVQA tokenizer): sized to train in well under an hour on 2 CPU cores."""
    return ModelConfig(
        vision=VisionConfig(image_size=168, patch_size=14, hidden_size=96, num_layers=3,
                            num_heads=4, intermediate_size=384),
        llm=LLMConfig(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                      num_kv_heads=4, intermediate_size=344, max_position_embeddings=1024),
        sparse=SparseConfig(d_model=64, nhead=4, dim_feedforward=128, num_layers=2),
    )


PRESETS = {"tiny": _tiny, "synthvqa": _synthvqa, "llava-v1.5-7b": _llava_7b, "llava-v1.5-13b": _llava_13b}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
