"""Per-tensor checksums of a converted directory's params (`params_checksums.json`).

Written when the params are written (conversion, a training run's export), verified when
they are loaded: a flipped bit inside `params/` is then an error naming the tensor, not a
different answer. CRC-32 (zlib) of each leaf's bytes in C order: about 1 GB/s on one core,
so verifying costs a small fraction of reading the params. A directory without the file
(written before checksums existed) loads unverified.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .paths import as_path  # a local folder or a gs:// URL

CHECKSUM_FILE = "params_checksums.json"
_CHUNK = 1 << 26  # bytes per crc32 call: no whole-leaf temporary beyond the array itself


class ChecksumError(ValueError):
    """The params on disk are not the ones that were written (or the checksum file is bad)."""


def _leaves(params: Any) -> dict[str, Any]:
    import jax
    out = {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)] = leaf
    return out


def crc32(arr: np.ndarray) -> int:
    return crc32_update(arr, 0)


def crc32_update(arr: np.ndarray, c: int) -> int:
    """CRC-32 of `c`'s data followed by `arr`'s bytes (little-endian, C order)."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    raw = a.reshape(-1).view(np.uint8)
    for i in range(0, raw.size, _CHUNK):
        c = zlib.crc32(raw[i: i + _CHUNK], c)
    return c


def compute(params: Any) -> dict[str, dict]:
    """leaf path ('llm/embed_tokens/embedding') -> {crc32, dtype, shape}."""
    out = {}
    for name, leaf in _leaves(params).items():
        a = np.asarray(leaf)
        out[name] = {"crc32": crc32(a), "dtype": str(a.dtype), "shape": list(a.shape)}
    return out


def _write(path, key: str, sums: dict) -> None:
    body = {"algorithm": "crc32", key: sums}
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")


def _read(path, key: str) -> Optional[dict]:
    """The object under `key` of a checksum file (None: no such file)."""
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())[key]
        if not isinstance(sums, dict):
            raise TypeError(f"{key!r} is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise ChecksumError(f"{path} is not a valid checksum file: {e}") from e
    return sums


def write(directory: Path, params: Any) -> None:
    _write(as_path(directory) / CHECKSUM_FILE, "tensors", compute(params))


def expected(directory: Path) -> Optional[dict[str, dict]]:
    """The recorded checksums of a directory's params (None: no checksum file)."""
    return _read(as_path(directory) / CHECKSUM_FILE, "tensors")


def check_leaf(directory: Path, want: Optional[dict], name: str, arr: np.ndarray) -> None:
    """One leaf against the recorded checksums (nothing to check where none were recorded)."""
    if want is None:
        return
    w = want.get(name)
    if not isinstance(w, dict) or w.get("crc32") != crc32(arr):
        what = "has no checksum in" if not isinstance(w, dict) else "does not match its checksum in"
        raise ChecksumError(f"{as_path(directory) / 'params'}: tensor {name} {what} {CHECKSUM_FILE} "
                            "(the directory is corrupt; convert or export it again)")


# -- PyTorch checkpoints written by the export --------------------------------------------

EXPORT_CHECKSUM_FILE = "tensor_checksums.json"


def write_export(directory: Path, sums: dict[str, dict[str, int]]) -> None:
    """weight file -> tensor name -> CRC-32 of its bytes as written (what `verify_tensor` reads)."""
    _write(as_path(directory) / EXPORT_CHECKSUM_FILE, "files", sums)


def export_sums(directory: Path) -> Optional[dict]:
    return _read(as_path(directory) / EXPORT_CHECKSUM_FILE, "files")


def verify_tensor(sums: Optional[dict], file: Path, name: str, arr: np.ndarray) -> None:
    if sums is None or file.name not in sums or name not in sums[file.name]:
        return
    if sums[file.name][name] != crc32(arr):
        raise ChecksumError(f"{file}: tensor {name} does not match its checksum in "
                            f"{EXPORT_CHECKSUM_FILE} (the file is corrupt)")


def verify(directory: Path, params: Any) -> bool:
    """Raise ChecksumError naming the first tensor whose bytes differ; False where there is no
    checksum file. Checked: every leaf restored in its recorded dtype and held whole by this
    process (a multi-host restore's leaves are skipped, as are leaves restored cast to
    another dtype and leaves the file does not list: `checkpoint.check_params_match`
    checks the tree itself)."""
    want = expected(directory)
    if want is None:
        return False
    for name, leaf in _leaves(params).items():
        w = want.get(name)
        if not isinstance(w, dict) or not getattr(leaf, "is_fully_addressable", True):
            continue
        if str(np.dtype(leaf.dtype)) != w.get("dtype"):
            continue
        check_leaf(directory, want, name, np.asarray(leaf))
    return True
