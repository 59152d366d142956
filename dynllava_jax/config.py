"""Typed model configuration: vision tower, projector, LLM, sparsity.

A converted checkpoint stores one `ModelConfig` as JSON (`model_config.json`);
presets name the shapes of the published models and of the tiny test model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


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
        return int(self.num_image_tokens * self.sparse.vision_keep_rate)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def replace_sparse(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, sparse=dataclasses.replace(self.sparse, **kw))

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        sub = {"vision": VisionConfig, "llm": LLMConfig, "sparse": SparseConfig}
        for key, typ in sub.items():
            if key in d:
                d[key] = _from_fields(typ, d[key])
        return _from_fields(cls, d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_fields(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


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
