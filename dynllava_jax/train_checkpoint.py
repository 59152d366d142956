"""Training checkpoints (Orbax) and the final export.

``WORKDIR/checkpoints/<step>/`` holds two items, written together and atomically (Orbax
writes a temporary directory and renames it once complete, so a run killed at any moment
leaves only whole checkpoints):

* ``state``: the `TrainState` pytree (trainable and frozen params, optimiser state, step,
  base rng), each array saved in its sharding by every host (OCDBT);
* ``data``: the data iterator position, one ``process_<i>-of-<n>.json`` per host (grain's
  handler), so each host resumes its own share of the stream at the next batch.

Saves are asynchronous (the device -> host copy happens in `save`, the file writing in
the background), every `every` steps and at the end; the last `keep` are kept. On start
`restore_latest` resumes from the newest complete checkpoint. Because the step rng is
``fold_in(rng, step)`` and the data position is restored, a resumed run computes bit for
bit the steps the uninterrupted run would have computed.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from . import paths

log = logging.getLogger("dynllava_jax.train_checkpoint")


class IteratorSnapshot:
    """Carries a data-iterator state through grain's Orbax handler.

    The state is captured when the snapshot is made (not later, when a background thread
    might write it); any iterator with ``get_state``/``set_state`` works (a grain
    ``DatasetIterator`` or `trainer.SyntheticBatches`). The file holds JSON.
    """

    def __init__(self, iterator: Any = None):
        self.state = None if iterator is None else iterator.get_state()

    # the grain handler's protocol (for an object that is not a grain.DatasetIterator)
    def get_state(self) -> bytes:
        s = self.state
        if isinstance(s, (bytes, bytearray)):
            s = {"__bytes__": base64.b64encode(bytes(s)).decode()}
        return json.dumps(s, indent=1).encode()

    def set_state(self, raw: bytes) -> None:
        s = json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
        if isinstance(s, dict) and set(s) == {"__bytes__"}:
            s = base64.b64decode(s["__bytes__"])
        self.state = s

    def start_prefetch(self) -> None:  # called by the handler after restore
        pass

    def apply_to(self, iterator: Any) -> None:
        iterator.set_state(self.state)


class TrainCheckpointer:
    def __init__(self, directory: str | Path, every: int = 1000, keep: int = 3,
                 async_save: bool = True):
        import grain  # noqa: F401  (registers grain's CheckpointSave/Restore with Orbax)
        self.directory = paths.as_path(directory)  # a bucket URL stays one (Orbax takes it)
        self.every = max(int(every), 1)
        opts = ocp.CheckpointManagerOptions(
            save_interval_steps=self.every, max_to_keep=keep if keep > 0 else None,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any = None, force: bool = False) -> bool:
        """Save at `step` (if on the interval, or `force`). Returns whether it saved."""
        import grain
        if not force and not self.manager.should_save(step):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator))
        return bool(self.manager.save(step, args=ocp.args.Composite(**items), force=force))

    def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Any:
        """The state at `step` (placed like `abstract_state`: ShapeDtypeStructs with
        shardings); `iterator` is moved to the saved data position."""
        import grain
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        snap = IteratorSnapshot()
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(snap)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if iterator is not None:
            snap.apply_to(iterator)
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def export_converted(dst: str | Path, params: Any, cfg, assets_dir: Optional[Path],
                     preprocessor: Optional[dict] = None, force: bool = True) -> Path:
    """Write the trained model as a converted dir (`checkpoint.save_converted` layout):
    params gathered to host numpy, preprocessor + tokenizer files from `assets_dir`."""
    import numpy as np
    from .checkpoint import save_converted
    if preprocessor is None:
        pre = None if assets_dir is None else paths.as_path(assets_dir) / "preprocessor_config.json"
        if pre is None or not pre.exists():
            raise FileNotFoundError(f"no preprocessor_config.json in {assets_dir}")
        preprocessor = json.loads(pre.read_text())
    def to_host(x):
        # Arrays sharded over several hosts are gathered (a collective: every host calls this).
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    host = jax.tree_util.tree_map(to_host, params)
    out = paths.as_path(dst)
    if jax.process_index() == 0:
        out = save_converted(dst, host, cfg, preprocessor, assets_dir, force=force)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("export written")  # nobody exits before the write
    return out
