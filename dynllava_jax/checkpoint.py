"""The converted-checkpoint directory that `infer.py` and `train.py` read.

    DIR/model_config.json        ModelConfig
    DIR/params/                  Orbax checkpoint of the params pytree
    DIR/preprocessor_config.json CLIP image preprocessing
    DIR/tokenizer.model, tokenizer_config.json, ...  the checkpoint's tokenizer files

Written to a temporary sibling and renamed at the end, so a failed write leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from .config import ModelConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json", "generation_config.json")


class CheckpointDirError(ValueError):
    pass


def save_converted(dst: str | Path, params: Any, cfg: ModelConfig, preprocessor: dict,
                   tokenizer_dir: Optional[Path], force: bool = False) -> Path:
    import orbax.checkpoint as ocp
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise CheckpointDirError(f"{dst} exists; pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        cfg.save(tmp / "model_config.json")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).exists():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        if dst.exists():
            old = dst.with_name(dst.name + ".old")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not (path / "model_config.json").exists():
        raise CheckpointDirError(
            f"{path} is not a converted checkpoint (no model_config.json); convert it with convert_weights.py")
    return ModelConfig.load(path / "model_config.json")


def load_params(path: str | Path, target: Any = None) -> Any:
    """Restore params; `target` (a pytree of jax.ShapeDtypeStruct with shardings) places them."""
    import orbax.checkpoint as ocp
    path = Path(path).absolute() / "params"
    if not path.exists():
        raise CheckpointDirError(f"{path.parent} has no params/ directory")
    ckptr = ocp.StandardCheckpointer()
    return ckptr.restore(path, target) if target is not None else ckptr.restore(path)


def load_converted(path: str | Path):
    """(ModelConfig, params) of a converted directory."""
    cfg = load_config(path)
    return cfg, load_params(path)
