"""Device mesh and shardings: one logical-axis table, one param-path table.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters
and optimiser state sharded, ZeRO-3 style) and ``tensor`` (tensor parallelism of the LLM
matrices). The batch is split over ``('data', 'fsdp')``.

Every parameter gets logical axis names from `PARAM_AXES` (first matching regex on its
``/``-joined path); `LOGICAL_RULES` maps logical names to mesh axes. A dimension that
the mapped mesh axes do not divide is replicated instead (small or odd shapes, e.g. the
tiny test model on a 2x2x2 mesh). Optimiser-state leaves take the sharding of the
parameter they mirror (matched by key path).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). The one table.
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "embed": "fsdp",          # the LLM hidden dimension of weights
    "vocab": "tensor",
    "q_heads": "tensor",      # N * D
    "kv_heads": "tensor",     # K * D
    "mlp": "tensor",
    "layers": None,           # the stacking axis of scanned layers
    "norm": None,
    "vision_in": "fsdp",      # vision-tower matrices: FSDP only
    "vision_out": None,
    "proj_out": "tensor",
    "replicated": None,
}

# (regex on the params path, logical axes per dimension). First match wins.
PARAM_AXES: Sequence[tuple[str, tuple]] = (
    (r"^llm/embed_tokens/embedding$", ("vocab", "embed")),
    (r"^llm/lm_head/kernel$", ("embed", "vocab")),
    (r"^llm/norm/scale$", ("norm",)),
    (r"^llm/layers/q_proj/kernel$", ("layers", "embed", "q_heads")),
    (r"^llm/layers/(k_proj|v_proj)/kernel$", ("layers", "embed", "kv_heads")),
    (r"^llm/layers/o_proj/kernel$", ("layers", "q_heads", "embed")),
    (r"^llm/layers/(gate_proj|up_proj)/kernel$", ("layers", "embed", "mlp")),
    (r"^llm/layers/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"^llm/layers/\w+/scale$", ("layers", "norm")),
    (r"^vision/layers/\w+/kernel$", ("layers", "vision_in", "vision_out")),
    (r"^projector/linear_1/kernel$", ("vision_in", "proj_out")),
    (r"^projector/linear_2/kernel$", ("proj_out", "embed")),
    (r"^(image|text)_predictor/(down_proj|fc_1)/kernel$", ("embed", "replicated")),
    (r".*", None),  # everything else (biases, norms, small predictor matrices): replicated
)


# -- mesh ----------------------------------------------------------------------------
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if n % rest:
            raise ValueError(f"{n} devices are not divisible by the fixed mesh axes {sizes}")
        sizes[sizes.index(-1)] = n // rest
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"there are {n}")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # odd topologies (e.g. simulated CPU devices)
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


# -- logical axes ----------------------------------------------------------------------
def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_logical_axes(path: str, ndim: int) -> tuple:
    for pattern, axes in PARAM_AXES:
        if re.match(pattern, path):
            if axes is None or len(axes) != ndim:
                return (None,) * ndim
            return axes
    return (None,) * ndim


def logical_to_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: dict = LOGICAL_RULES) -> P:
    """PartitionSpec for logical axes; an axis the mesh does not divide is replicated."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_specs(params, mesh: Mesh) -> Any:
    """PartitionSpec for every leaf of a params pytree (arrays or ShapeDtypeStructs)."""
    def leaf(path, x):
        return logical_to_spec(param_logical_axes(path_str(path), len(x.shape)), x.shape, mesh)
    return jax.tree_util.tree_map_with_path(leaf, params)


def named(mesh: Mesh, specs) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, P))


def param_shardings(params, mesh: Mesh) -> Any:
    return named(mesh, param_specs(params, mesh))


def mirror_shardings(tree, params, mesh: Mesh) -> Any:
    """Shardings for a tree whose leaves mirror params (optimiser state): a leaf whose key
    path ends with a param's path and has its shape gets that param's sharding; other
    leaves (step counts, scalars) are replicated."""
    by_path = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        by_path[tuple(path_str(path).split("/"))] = (tuple(x.shape), param_logical_axes(
            path_str(path), len(x.shape)))

    def leaf(path, x):
        names = tuple(path_str(path).split("/"))
        for i in range(len(names)):
            hit = by_path.get(names[i:])
            if hit is not None and hit[0] == tuple(x.shape):
                return NamedSharding(mesh, logical_to_spec(hit[1], x.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(leaf, tree)


# -- activations ----------------------------------------------------------------------
def batch_spec(ndim: int, mesh: Mesh) -> P:
    """Batch-leading arrays: batch over ('data', 'fsdp'), the rest replicated."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return P(lead, *([None] * (ndim - 1)))


def batch_shardings(batch, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x), mesh)), batch)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain_batch(tree, mesh: Mesh):
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec(x.ndim, mesh))),
        tree)


# -- multi-host ------------------------------------------------------------------------
def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> bool:
    """`jax.distributed.initialize()` when launched on several hosts.

    Triggers: explicit arguments (``--config.distributed.*``), or the environment of a
    multi-host launch (``JAX_COORDINATOR_ADDRESS``, or a cluster jax auto-detects: TPU pod
    slices, SLURM with ``SLURM_NTASKS > 1``, Open MPI ``OMPI_COMM_WORLD_SIZE > 1``).
    Must run before anything touches the devices. Returns whether it initialised.
    """
    env = os.environ
    explicit = bool(coordinator) or num_processes > 1
    auto = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
            or int(env.get("SLURM_NTASKS", "1") or 1) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
            or bool(env.get("TPU_WORKER_HOSTNAMES", "").count(",")))
    if not (explicit or auto):
        return False
    kw = {}
    if coordinator:
        kw["coordinator_address"] = coordinator
    if num_processes > 0:
        kw["num_processes"] = num_processes
    if process_id >= 0:
        kw["process_id"] = process_id
    jax.distributed.initialize(**kw)
    return True


def host_local_to_global(batch: dict, mesh: Mesh, global_batch: int) -> dict:
    """Each host's share of the batch (numpy, leading dim global_batch / process_count) ->
    global jax Arrays sharded over ('data', 'fsdp')."""
    out = {}
    for k, x in batch.items():
        x = np.asarray(x)
        sh = NamedSharding(mesh, batch_spec(x.ndim, mesh))
        out[k] = jax.make_array_from_process_local_data(sh, x, (global_batch,) + x.shape[1:])
    return out
