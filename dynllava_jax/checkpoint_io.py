"""Reading PyTorch checkpoints shard by shard (safetensors or .bin, single or sharded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint cannot be read or converted; the message says why."""


def weight_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).exists():
            wm = json.loads((src / index).read_text())["weight_map"]
            files = sorted(set(wm.values()))
            missing = [f for f in files if not (src / f).exists()]
            if missing:
                raise CheckpointError(f"{src / index} names shards that are missing: {missing}")
            return [src / f for f in files]
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in src.glob(pattern) if p.is_file())
        if files:
            return files
    raise CheckpointError(f"no weights in {src}: expected *.safetensors or pytorch_model*.bin")


def tensor_names(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """name -> (shape, file) without loading the tensors where the format allows it."""
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out[k] = (tuple(h.get_slice(k).get_shape()), f)
        else:
            for k, t in _torch_load(f).items():
                out[k] = (tuple(t.shape), f)
    return out


def _torch_load(f: Path):
    import torch
    try:
        return torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise CheckpointError(f"cannot read {f}: {e}") from e


def iter_tensors(f: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 numpy array) for each tensor of one file, one at a time."""
    import torch
    if f.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                yield k, h.get_tensor(k).to(torch.float32).numpy()
    else:
        for k, t in _torch_load(f).items():
            yield k, t.to(torch.float32).numpy()
