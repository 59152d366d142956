"""Reading PyTorch checkpoints tensor by tensor (safetensors or .bin, single or sharded).

Neither format is memory-mapped: each tensor is read with plain file reads into its own
NumPy buffer, in the dtype it is stored in, so converting a 7B checkpoint holds one tensor
at a time on top of the converted model. Both readers are small and need no torch:
- safetensors: an 8-byte header length, a JSON header (name -> dtype, shape, byte range),
  then the raw little-endian data.
- `torch.save` zip files (`pytorch_model*.bin`): `<archive>/data.pkl` pickles the state
  dict with tensors as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
  ...)` and storages as persistent ids `('storage', torch.HalfStorage, key, location,
  numel)`; each storage is the uncompressed zip member `<archive>/data/<key>`. A
  restricted unpickler records where each tensor lives without reading its data.
Files in the legacy (pre-1.6, non-zip) format fall back to `torch.load`.

Writing (the export, `export.py`) is safetensors only: `SafetensorsWriter` writes the header
of tensors known up front, then streams each tensor's bytes in that order.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint cannot be read or converted; the message says why."""


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


# -- which files ---------------------------------------------------------------

def weight_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in shard order."""
    src = Path(src)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).exists():
            try:
                wm = json.loads((src / index).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{src / index} is not a valid shard index: {e}") from e
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{src / index}: weight_map must map tensor names to file names")
            files = sorted(set(wm.values()))
            root = src.resolve()
            outside = [f for f in files if Path(f).is_absolute()
                       or root not in (src / f).resolve().parents]
            if outside:
                raise CheckpointError(f"{src / index} names shards outside the checkpoint folder: "
                                      f"{outside[:3]} (refused)")
            missing = [f for f in files if not (src / f).exists()]
            if missing:
                raise CheckpointError(f"{src / index} names shards that are missing: {missing}")
            return [src / f for f in files]
    # Unindexed: one file (or shards without an index). Skip what is not model weights:
    # LoRA adapters, a stage-1 `mm_projector.bin`, `training_args.bin`, optimizer states.
    files = sorted(p for p in src.glob("*.safetensors")
                   if p.is_file() and not p.name.startswith("adapter"))
    if not files:
        files = sorted(p for p in src.glob("pytorch_model*.bin") if p.is_file())
    if files:
        return files
    raise CheckpointError(f"no weights in {src}: expected *.safetensors or pytorch_model*.bin")


# -- where each tensor lives -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor inside a file: its bytes start at `offset`; `stride` in elements."""

    file: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    stride: Optional[tuple[int, ...]] = None  # None: C-contiguous

    def load(self) -> np.ndarray:
        shape = tuple(self.shape)
        n = int(np.prod(shape, dtype=np.int64))
        item = self.dtype.itemsize
        contiguous = self.stride is None or _is_c_contiguous(shape, self.stride)
        span = n if contiguous else (
            1 + sum((s - 1) * st for s, st in zip(shape, self.stride)) if n else 0)
        buf = np.empty(span, self.dtype)
        _read_into(self.file, self.offset, buf.view(np.uint8))
        if contiguous:
            return buf.reshape(shape)
        view = np.lib.stride_tricks.as_strided(
            buf, shape, tuple(st * item for st in self.stride), writeable=False)
        return np.ascontiguousarray(view)


def _is_c_contiguous(shape, stride) -> bool:
    expect = 1
    for s, st in zip(reversed(shape), reversed(stride)):
        if s != 1 and st != expect:
            return False
        expect *= s
    return True


def _read_into(path: Path, offset: int, out_u8: np.ndarray) -> None:
    chunk = 1 << 28
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        mv = memoryview(out_u8)
        done = 0
        while done < len(mv):
            got = fh.readinto(mv[done: done + chunk])
            if not got:
                raise CheckpointError(f"{path} is truncated (a tensor ends past the end of the file)")
            done += got
        if hasattr(os, "posix_fadvise"):  # the page cache need not keep what we have read
            os.posix_fadvise(fh.fileno(), offset, len(mv), os.POSIX_FADV_DONTNEED)


_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_refs(f: Path) -> dict[str, TensorRef]:
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"cannot read {f}: not a safetensors file ({e})") from e
    size = f.stat().st_size
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        dt = _bf16() if v["dtype"] == "BF16" else _ST_DTYPES.get(v["dtype"])
        if dt is None:
            raise CheckpointError(f"{f}: tensor {k} has unsupported dtype {v['dtype']}")
        begin, end = v["data_offsets"]
        shape = tuple(v["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize \
                or 8 + n + end > size:
            raise CheckpointError(f"{f}: tensor {k} has an inconsistent byte range (truncated file?)")
        out[k] = TensorRef(f, 8 + n + begin, np.dtype(dt), shape)
    return out


_TORCH_STORAGES = {"HalfStorage": np.float16, "FloatStorage": np.float32,
                   "DoubleStorage": np.float64, "BFloat16Storage": "bf16",
                   "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                   "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return ("tensor", storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


class _LazyUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into placeholders; refuses any other global."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        stype = pid[1]
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r}")
        dt = _TORCH_STORAGES[stype.name]
        return _Storage(str(pid[2]), _bf16() if dt == "bf16" else np.dtype(dt))


def _member_data_offset(fh, info: zipfile.ZipInfo) -> int:
    fh.seek(info.header_offset)
    local = fh.read(30)
    if local[:4] != b"PK\x03\x04":
        raise CheckpointError("bad zip local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _torch_zip_refs(f: Path) -> Optional[dict[str, TensorRef]]:
    """Tensor refs of a torch zip file; None where the lazy reader cannot handle it."""
    if not zipfile.is_zipfile(f):
        return None
    try:
        with zipfile.ZipFile(f) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkls) != 1:
                return None
            prefix = pkls[0][: -len("data.pkl")]
            byteorder = prefix + "byteorder"
            if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
                return None
            state = _LazyUnpickler(zf.open(pkls[0])).load()
            infos = {i.filename: i for i in zf.infolist()}
            out, offsets = {}, {}
            with open(f, "rb") as fh:
                for k, v in state.items():
                    if not (isinstance(v, tuple) and v and v[0] == "tensor"):
                        return None
                    _, st, off, size, stride = v
                    if st.key not in offsets:
                        info = infos.get(f"{prefix}data/{st.key}")
                        if info is None or info.compress_type != zipfile.ZIP_STORED:
                            return None
                        offsets[st.key] = _member_data_offset(fh, info)
                    out[k] = TensorRef(f, offsets[st.key] + off * st.dtype.itemsize, st.dtype,
                                       size, None if _is_c_contiguous(size, stride) else stride)
            return out
    except (pickle.UnpicklingError, zipfile.BadZipFile, AttributeError, KeyError, TypeError,
            ValueError, EOFError):
        return None


def _refusal(f: Path, msg: str) -> Optional[str]:
    """Our message for a pickle that torch's weights-only loader refused (its own advises
    rerunning with weights_only=False, i.e. running the code inside: never do that here)."""
    if "Weights only load failed" not in msg and "weights_only" not in msg:
        return None
    import re
    what = re.search(r"(GLOBAL [\w.]+|Unsupported (?:global|operand)[^\n.]*)", msg)
    found = f" ({what.group(1)})" if what else ""
    return (f"cannot read {f}: it holds Python objects other than tensors{found}; refused, since "
            "loading it could run code from the file. Re-save the weights as safetensors from a "
            "trusted copy")


def _torch_load(f: Path):
    import torch
    try:
        return torch.load(str(f), map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(f))
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise CheckpointError(_refusal(f, str(e)) or f"cannot read {f}: {e}") from None


def _file_refs(f: Path) -> Optional[dict[str, TensorRef]]:
    if f.suffix == ".safetensors":
        return _safetensors_refs(f)
    return _torch_zip_refs(f)


def tensor_names(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """name -> (shape, file), reading only headers where the format allows it."""
    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        refs = _file_refs(f)
        if refs is not None:
            items = ((k, r.shape) for k, r in refs.items())
        else:
            items = ((k, tuple(t.shape)) for k, t in _torch_load(f).items())
        for k, shape in items:
            if k in out:
                raise CheckpointError(f"tensor {k} is stored twice ({out[k][1].name} and {f.name})")
            out[k] = (tuple(shape), f)
    return out


def iter_tensors(f: Path, native: bool = False,
                 names: Optional[set[str]] = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) for each tensor of one file (only `names` if given), one at a time.

    Arrays are float32 unless `native`, which keeps the stored dtype (float16, bfloat16,
    ...) so the caller can cast straight into its destination without a float32 copy.
    """
    refs = _file_refs(f)
    if refs is not None:
        for k, r in refs.items():
            if names is not None and k not in names:
                continue
            a = r.load()
            yield k, a if native else a.astype(np.float32)
        return
    import torch
    for k, t in _torch_load(f).items():
        if names is not None and k not in names:
            continue
        if native and t.dtype == torch.bfloat16:
            yield k, t.view(torch.int16).numpy().view(_bf16())
        else:
            yield k, (t if native else t.to(torch.float32)).numpy()


# -- writing safetensors -------------------------------------------------------

def _st_code(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == _bf16():
        return "BF16"
    for code, dt in _ST_DTYPES.items():
        if np.dtype(dt) == dtype:
            return code
    raise CheckpointError(f"dtype {dtype} cannot be written to safetensors")


class SafetensorsWriter:
    """One `.safetensors` file whose tensors (name, dtype, shape) are known up front.

    The header is written first; `write` then streams each tensor's bytes in the planned
    order (in parts along axis 0 if given so), so only the tensor being written is in memory.
    """

    def __init__(self, path: Path, plan: list[tuple[str, object, tuple]],
                 metadata: Optional[dict] = None):
        header: dict = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
        offset = 0
        self._plan = []
        for name, dtype, shape in plan:
            dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _st_code(dtype), "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
            self._plan.append((name, dtype, shape))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path, self.nbytes, self._next = Path(path), offset, 0
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, *parts: np.ndarray) -> None:
        """The next planned tensor, given whole or as parts to concatenate along axis 0."""
        if self._next >= len(self._plan):
            raise CheckpointError(f"{self.path.name}: tensor {name} was not planned")
        want, dtype, shape = self._plan[self._next]
        rows = sum(p.shape[0] for p in parts) if shape else None
        got = (rows, *parts[0].shape[1:]) if shape else parts[0].shape
        if name != want or got != shape or any(p.dtype != dtype for p in parts):
            raise CheckpointError(f"{self.path.name}: got {name} {got} {[str(p.dtype) for p in parts]}, "
                                  f"expected {want} {shape} {dtype} next")
        for p in parts:
            p = np.ascontiguousarray(p)
            if p.dtype.byteorder == ">":
                p = p.astype(p.dtype.newbyteorder("<"))
            self._fh.write(p.reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._plan):
            raise CheckpointError(f"{self.path.name}: {len(self._plan) - self._next} tensor(s) "
                                  "were planned but not written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray],
                      metadata: Optional[dict] = None) -> None:
    """Write a dict of (small) arrays as one safetensors file."""
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], metadata) as w:
        for k, v in tensors.items():
            w.write(k, np.asarray(v))
