"""One path type for local folders and cloud-storage URLs (`gs://bucket/...`).

Workdirs, converted checkpoints and exports may live on a bucket. Everything that names
such a place goes through `as_path`, which returns an `etils.epath.Path` (the path type
Orbax uses): a URL stays a URL (never a relative folder ``./gs:/...``), a local path is
made absolute. Code then uses the `pathlib`-style methods of that object, which epath
routes to the local file system or to the bucket's client (gcsfs via fsspec, or
TensorFlow's gfile when TensorFlow is installed).
"""

from __future__ import annotations

import os
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]

# The URL schemes supported, and the packages each needs: epath's client (fsspec's, when
# TensorFlow is absent) and the one Orbax itself imports. Only gs://: Orbax builds a
# TensorStore spec for gs:// alone (another scheme's arrays would go to a local file).
_CLIENTS = {"gs": ("gcsfs", "google-cloud-storage")}
_MODULES = {"google-cloud-storage": "google.cloud.storage"}
URL_SCHEMES = tuple(_CLIENTS)


def scheme(p: PathLike) -> str | None:
    """'gs' for 'gs://bucket/x', None for a local path."""
    s = os.fspath(p) if not isinstance(p, str) else p
    head, sep, _ = s.partition("://")
    return head if sep and head.isidentifier() else None


def is_url(p: PathLike) -> bool:
    return scheme(p) is not None


def as_path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: a URL as is, a local path absolute (``~`` expanded)."""
    if isinstance(p, epath.Path) and is_url(p):
        return p
    s = os.fspath(p)
    sch = scheme(s)
    if sch is None:
        return epath.Path(os.path.abspath(os.path.expanduser(s)))
    if sch not in _CLIENTS:
        raise ValueError(f"{s}: unsupported URL scheme {sch}:// (supported: "
                         + ", ".join(f"{k}://" for k in _CLIENTS) + ", or a local path)")
    return epath.Path(s)


def client_missing(p: PathLike) -> str | None:
    """The pip packages a URL needs and that are not installed (None when usable)."""
    sch = scheme(p)
    if sch is None:
        return None
    import importlib.util

    def have(pkg):
        mod = _MODULES.get(pkg, pkg)
        try:
            return importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # a parent package (google.cloud) is absent
            return False
    need = [p for p in _CLIENTS.get(sch, ()) if not have(p)]
    if have("tensorflow"):  # epath then uses TensorFlow's gfile, not gcsfs
        need = [p for p in need if p != "gcsfs"]
    return " ".join(need) or None


def check_usable(p: PathLike, what: str) -> epath.Path:
    """`as_path(p)`, or a ValueError naming the package a URL's client needs."""
    path = as_path(p)
    pkg = client_missing(path)
    if pkg:
        raise ValueError(f"{what} {path}: {scheme(path)}:// paths need: pip install {pkg}")
    return path


def temp_sibling(dst: epath.Path, tag: str = "tmp") -> epath.Path:
    """A fresh name beside `dst` (``.NAME.tmp-XXXXXXXX``) to write into before a rename."""
    return dst.parent / f".{dst.name}.{tag}-{uuid.uuid4().hex[:8]}"


def replace_dir(tmp: PathLike, dst: PathLike) -> None:
    """Move a finished temporary directory to `dst`, replacing what is there.

    Local: two renames (atomic each). On an object store a directory rename is a copy,
    so a reader may briefly see a partial `dst`; `model_config.json` marks a complete one.
    """
    tmp, dst = as_path(tmp), as_path(dst)
    if dst.exists():
        old = dst.parent / (dst.name + ".old")
        if old.exists():  # left by a run killed between the renames
            old.rmtree()
        dst.rename(old)
        tmp.rename(dst)
        old.rmtree()
    else:
        tmp.rename(dst)


def upload_dir(local_dir: PathLike, dst: PathLike) -> epath.Path:
    """Copy a finished local directory tree to `dst` (a URL), replacing what is there."""
    src, dst = as_path(local_dir), as_path(dst)
    tmp = temp_sibling(dst)
    try:
        for root, _, files in src.walk():
            rel = os.path.relpath(os.fspath(root), os.fspath(src))
            out = tmp if rel == "." else tmp / rel
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                (as_path(root) / f).copy(out / f, overwrite=True)
        replace_dir(tmp, dst)
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        raise
    return dst


def cache_dir(name: str) -> epath.Path:
    """A local cache folder: $DYNLLAVA_CACHE/NAME (default ~/.cache/dynllava_jax/NAME)."""
    root = os.environ.get("DYNLLAVA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dynllava_jax")
    return as_path(os.path.join(root, name))


def local_copy(directory: PathLike, names: tuple[str, ...]) -> epath.Path:
    """`directory` itself when local; for a URL, a local folder holding copies of those of
    `names` it has (libraries such as sentencepiece and transformers read local files)."""
    if not is_url(directory):
        return directory
    src = as_path(directory)
    out = cache_dir("assets") / uuid.uuid5(uuid.NAMESPACE_URL, os.fspath(src)).hex
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        if (src / n).exists():
            (src / n).copy(out / n, overwrite=True)
    return out
