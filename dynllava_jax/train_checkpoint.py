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
import jax.numpy as jnp
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


FINGERPRINT = "fingerprint"


class CheckpointCorrupt(Exception):
    pass


@jax.jit
def _fingerprints(tree):
    def leaf(x):
        x = jnp.ravel(x)
        if x.dtype == jnp.bool_:
            w = x.astype(jnp.uint32)
        else:
            u = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
            w = jnp.ravel(jax.lax.bitcast_convert_type(x, u)).astype(jnp.uint32)
        # odd weights that change with the position: any one flipped bit (or two swapped
        # values) changes the sum modulo 2**32
        k = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
        return jnp.sum(w * k, dtype=jnp.uint32)
    return jax.tree_util.tree_map(leaf, tree)


def fingerprint(tree: Any) -> dict:
    """{leaf path: uint32 hash of its bits}: computed on the devices (one pass over the
    state, no host copy), compared on restore to catch flipped bits Orbax would load."""
    sums = jax.device_get(_fingerprints(tree))
    return {jax.tree_util.keystr(k): int(v)
            for k, v in jax.tree_util.tree_leaves_with_path(sums)}


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

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, iterator: Any = None, force: bool = False) -> bool:
        """Save at `step` (if on the interval, or `force`). Returns whether it saved."""
        import grain
        if not force and not self.manager.should_save(step):
            return False
        items = {"state": ocp.args.StandardSave(state),
                 FINGERPRINT: ocp.args.JsonSave(fingerprint(state))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator))
        return bool(self.manager.save(step, args=ocp.args.Composite(**items), force=force))

    def check_files(self, step: int, with_data: bool) -> None:
        """Cheap checks of a step directory before Orbax reads it (`CheckpointCorrupt`
        naming the missing or unreadable file)."""
        d = self.directory / str(step)
        for name in ("state",) + (("data",) if with_data else ()):
            if not (d / name).is_dir():
                raise CheckpointCorrupt(f"{d / name} is missing")
        jsons = [d / "_CHECKPOINT_METADATA", d / "state" / "_METADATA"]
        if with_data:
            jsons.append(d / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if (d / FINGERPRINT).exists():
            jsons.append(d / FINGERPRINT / "metadata")
        for f in jsons:
            try:
                json.loads(f.read_text())
            except FileNotFoundError:
                raise CheckpointCorrupt(f"{f} is missing") from None
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointCorrupt(f"{f} is not valid JSON ({e})") from None

    def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Any:
        """The state at `step` (placed like `abstract_state`: ShapeDtypeStructs with
        shardings); `iterator` is moved to the saved data position. A checkpoint that
        cannot be read, or whose arrays do not match the fingerprint saved with them,
        raises `CheckpointCorrupt`."""
        import grain
        self.check_files(step, iterator is not None)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_fp = (self.directory / str(step) / FINGERPRINT).exists()  # older ones have none
        if has_fp:
            items[FINGERPRINT] = ocp.args.JsonRestore()
        snap = IteratorSnapshot()
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(snap)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # TensorStore/Orbax errors are long: keep their first line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointCorrupt(f"{self.directory / str(step)} cannot be read: "
                                    f"{type(e).__name__}: {first}") from e
        if has_fp:
            want, got = out[FINGERPRINT], fingerprint(out["state"])
            bad = sorted(k for k in want if got.get(k) != want[k])
            if bad or set(got) != set(want):
                raise CheckpointCorrupt(
                    f"{self.directory / str(step) / 'state'}: arrays differ from the "
                    f"fingerprint saved with them ({', '.join(bad[:3]) or 'tree structure'})")
        if iterator is not None:
            snap.apply_to(iterator)
        return out["state"]

    def set_aside(self, step: int) -> Any:
        """Rename an unusable step directory to `<step>.corrupt` (kept for inspection,
        out of Orbax's way) on process 0, and reread the step list on every host."""
        d = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt"
        if jax.process_index() == 0 and d.exists():
            if dst.exists():
                dst.rmtree()
            d.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        return dst

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
