"""The converted-checkpoint directory that `infer.py` and `train.py` read.

    DIR/model_config.json        ModelConfig
    DIR/params/                  Orbax checkpoint of the params pytree
    DIR/preprocessor_config.json CLIP image preprocessing
    DIR/tokenizer.model, tokenizer_config.json, ...  the checkpoint's tokenizer files
    DIR/source_config.json       the PyTorch checkpoint's config.json, verbatim (for export)
    DIR/unused_tensors.safetensors  source tensors the model does not use (CLIP post_layernorm)
    DIR/params_checksums.json    CRC-32 of each params tensor, verified on load (checksums.py)

Written to a temporary sibling and renamed at the end, so a failed write leaves nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional

from . import checksums, paths
from .config import ModelConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "added_tokens.json", "generation_config.json")
SOURCE_CONFIG = "source_config.json"
UNUSED_TENSORS = "unused_tensors.safetensors"


class CheckpointDirError(ValueError):
    pass


def save_converted(dst: str | Path, params: Any, cfg: ModelConfig, preprocessor: dict,
                   tokenizer_dir: Optional[Path], force: bool = False,
                   source_config: Optional[dict] = None, unused: Optional[dict] = None) -> Path:
    """`source_config` / `unused` (name -> array) are what an export restores; where they are
    not given, the files of a converted `tokenizer_dir` (a training run's init) are copied."""
    url = paths.is_url(dst)
    if url:  # a bucket: no mkdtemp; a unique sibling name instead
        dst = paths.as_path(dst)
        if dst.exists() and not force:
            raise CheckpointDirError(f"{dst} exists; pass --force to replace it")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = paths.temp_sibling(dst)
        tmp.mkdir(parents=True)
    else:
        dst = Path(dst).absolute()
        check_dst(dst, force)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_tmp_dir(dst)
    try:
        save_params(tmp / "params", params)
        checksums.write(tmp, params)
        cfg.save(tmp / "model_config.json")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        if tokenizer_dir is not None:
            src = paths.as_path(tokenizer_dir)
            given = {SOURCE_CONFIG: source_config is not None, UNUSED_TENSORS: bool(unused)}
            for name in TOKENIZER_FILES + tuple(k for k, v in given.items() if not v):
                if (src / name).exists():
                    if url or paths.is_url(src):
                        (src / name).copy(paths.as_path(tmp / name), overwrite=True)
                    else:
                        shutil.copy2(src / name, tmp / name)
        if source_config is not None:
            (tmp / SOURCE_CONFIG).write_text(json.dumps(source_config, indent=2) + "\n")
        if unused:
            from .checkpoint_io import write_safetensors
            if url:  # the writer needs a local file: write one, then copy it up
                with tempfile.TemporaryDirectory() as loc:
                    write_safetensors(Path(loc) / UNUSED_TENSORS, unused)
                    paths.as_path(Path(loc) / UNUSED_TENSORS).copy(tmp / UNUSED_TENSORS)
            else:
                write_safetensors(tmp / UNUSED_TENSORS, unused)
        replace_dir(tmp, dst)
    except BaseException:
        if url:
            if tmp.exists():
                tmp.rmtree()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def check_dst(dst: Path, force: bool) -> None:
    """Refuse a destination that exists without --force, or that is not a directory."""
    if dst.is_symlink():  # replacing would move the link, not what it points to
        raise CheckpointDirError(f"--dst {dst} is a symbolic link; give the directory itself")
    if dst.exists() and not dst.is_dir():
        raise CheckpointDirError(f"--dst {dst} exists and is not a directory; remove it or choose another --dst")
    if dst.exists() and not force:
        raise CheckpointDirError(f"{dst} exists; pass --force to replace it")


def check_disjoint(dst: Path, sources: dict[str, Any]) -> None:
    """Refuse a --dst that is, contains or is inside one of `sources` (flag -> path): replacing
    it would delete the source (and, for a parent folder, everything beside it)."""
    d = Path(os.path.realpath(dst))
    for flag, src in sources.items():
        if src is None:
            continue
        s = Path(os.path.realpath(src))
        if d == s or s in d.parents or d in s.parents:
            rel = "is" if d == s else "is inside" if s in d.parents else "contains"
            raise CheckpointDirError(f"--dst {dst} {rel} {flag} {src}: choose a destination outside it")


def make_tmp_dir(dst: Path) -> Path:
    """A temporary sibling of `dst` with the mode a plain mkdir gives (mkdtemp's is 0700,
    which would outlive the rename)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move a finished temporary directory to `dst`, replacing what is there.

    The old directory is moved aside under a fresh hidden name, so a `DST.old` left by
    anything else is neither in the way nor deleted."""
    if paths.is_url(dst):
        return paths.replace_dir(tmp, dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dst)


def save_params(path: Path, params: Any) -> None:
    """Write params as an Orbax checkpoint that `load_params` (StandardCheckpointer) reads.

    Host (NumPy) trees are written synchronously, without Orbax's defensive deep copy of
    host arrays, without OCDBT (which buffers the whole encoded checkpoint in memory until
    it commits: +0.8x the params) and in chunks of at most 128 MB, so saving a 7B model
    needs about half a gigabyte on top of the params instead of a second copy of them.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(isinstance(x, np.ndarray) for x in leaves):
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path, params)
        ckptr.wait_until_finished()
        return
    # A host tree is written by this process alone, also inside a multi-host job (where
    # Orbax would otherwise wait at barriers for processes that do not save).
    me = jax.process_index()
    solo = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                              barrier_sync_key_prefix=f"save_params_{me}")
    from orbax.checkpoint import type_handlers
    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=1,
                                          use_ocdbt=False, multiprocessing_options=solo)
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=128 << 20), params)
    absl_log = logging.getLogger("absl")  # quiet Orbax's notes on skipping OCDBT merges
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        with ocp.Checkpointer(handler, multiprocessing_options=solo) as ckptr:
            ckptr.save(path, args=ocp.args.PyTreeSave(params, save_args=save_args))
    finally:
        absl_log.setLevel(level)


def load_config(path: str | Path) -> ModelConfig:
    path = paths.as_path(path)
    if not path.exists():
        raise CheckpointDirError(f"{path} does not exist (expected a converted checkpoint "
                                 "directory, written by convert_weights.py)")
    if not (path / "model_config.json").exists():
        raise CheckpointDirError(
            f"{path} is not a converted checkpoint (no model_config.json); convert it with convert_weights.py")
    return ModelConfig.load(path / "model_config.json")  # ConfigError names the file and field


def check_params_match(cfg: ModelConfig, shapes: dict, path: Path) -> None:
    """Raise CheckpointDirError unless the params' leaves have the shapes `cfg` gives them."""
    import jax
    from .model import init_params
    want = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    flat = lambda t: {"/".join(str(getattr(k, "key", k)) for k in kp): tuple(x.shape)
                      for kp, x in jax.tree_util.tree_leaves_with_path(t)}
    w, h = flat(want), flat(shapes)
    bad = [f"{k} is {h[k]} in params/ but {w[k]} from the config" for k in sorted(set(w) & set(h))
           if w[k] != h[k]]
    bad += [f"{k} is missing from params/" for k in sorted(set(w) - set(h))]
    bad += [f"params/ has {k}, which the config has no place for" for k in sorted(set(h) - set(w))]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointDirError(f"{path / 'model_config.json'} does not match {path / 'params'}: "
                                 + "; ".join(bad[:3]) + more)


def load_params(path: str | Path, target: Any = None) -> Any:
    """Restore params; `target` (a pytree of jax.ShapeDtypeStruct with shardings) places them."""
    import orbax.checkpoint as ocp
    path = paths.as_path(path) / "params"
    if not path.exists():
        raise CheckpointDirError(f"{path.parent} has no params/ directory")
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(path, target) if target is not None else ckptr.restore(path)
    checksums.verify(path.parent, params)  # params_checksums.json, where the directory has one
    return params


def checkpoint_shapes(path: str | Path) -> dict:
    """Nested dict of ShapeDtypeStructs from an Orbax checkpoint's metadata (nothing loaded)."""
    import jax
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(paths.as_path(path))
    meta = getattr(meta, "item_metadata", meta)
    out: dict = {}
    for kp, m in jax.tree_util.tree_leaves_with_path(meta):
        node = out
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
    return out


def load_converted(path: str | Path, mesh=None):
    """(ModelConfig, params) of a converted directory.

    With a `mesh`, every parameter is restored straight into the sharding the training table
    gives it (`sharding.param_shardings`): no device ever holds the whole model."""
    cfg = load_config(path)
    path = paths.as_path(path)
    if not (path / "params").exists():
        raise CheckpointDirError(f"{path} has no params/ directory")
    shapes = checkpoint_shapes(path / "params")
    check_params_match(cfg, shapes, path)
    if mesh is None:
        return cfg, load_params(path)
    import jax
    from .sharding import param_shardings
    target = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                    shapes, param_shardings(shapes, mesh))
    return cfg, load_params(path, target)
