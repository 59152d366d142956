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


def parse_mesh(spec: Optional[str], devices=None, kv_heads: Optional[int] = None) -> Mesh:
    """A mesh from ``"data=2,tensor=4"`` (axes from `MESH_AXES`, unnamed ones 1; one size may
    be -1 = the remaining devices). Empty or None: every device on ``data``.

    kv_heads: the model's; a ``tensor`` size must divide it (tensor parallelism splits the
    attention by whole kv-head groups, and the KV caches on kv heads). Raises ValueError
    with a one-line reason."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {a: 1 for a in MESH_AXES}
    if not spec or not spec.strip():
        sizes["data"] = -1
    else:
        seen = set()
        for part in spec.split(","):
            name, eq, value = part.strip().partition("=")
            name = name.strip()
            if name not in sizes:
                raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; axes are {', '.join(MESH_AXES)}")
            if not eq or name in seen:
                raise ValueError(f"expected AXIS=SIZE, each axis once, got {spec!r}")
            try:
                size = int(value)
            except ValueError:
                raise ValueError(f"mesh axis {name} needs an integer size, got {value.strip()!r}") from None
            if size < 1 and size != -1:
                raise ValueError(f"mesh axis {name} has size {size}; sizes are >= 1 (or -1: the rest)")
            seen.add(name)
            sizes[name] = size
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 in {spec!r}")
    if -1 not in sizes.values() and fixed != len(devices):
        raise ValueError(f"mesh {spec!r} has {fixed} devices, there are {len(devices)}")
    if -1 in sizes.values():
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices are not divisible by the {fixed} of {spec!r}")
        sizes = {a: len(devices) // fixed if s == -1 else s for a, s in sizes.items()}
    if kv_heads is not None:
        check_tensor_size(sizes["tensor"], kv_heads)
    return make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices)


def check_tensor_size(tensor: int, kv_heads: int) -> None:
    """Tensor parallelism splits attention by whole kv-head groups (and the KV caches on
    kv heads): the 'tensor' size must divide the kv heads."""
    if kv_heads % tensor:
        raise ValueError(f"tensor={tensor} does not divide the model's {kv_heads} kv heads; "
                         f"choose a tensor size that divides {kv_heads}")


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


_UNSTACKED = re.compile(r"^(\w+/layers)/\d+/(.*)$")


def param_logical_axes(path: str, ndim: int) -> tuple:
    """Logical axes of a parameter. A per-layer path (``llm/layers/3/q_proj/kernel``, what
    `generate.inference_params` makes) takes its stacked entry without the 'layers' axis."""
    m = _UNSTACKED.match(path)
    if m:
        axes = param_logical_axes(f"{m[1]}/{m[2]}", ndim + 1)
        return axes[1:] if axes[0] == "layers" else (None,) * ndim
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


def constrain_caches(caches, mesh: Optional[Mesh]):
    """KV caches ([B, K, S, D] leaves) sharded on batch over ('data', 'fsdp') and on kv
    heads over 'tensor' (each device holds the heads its attention shard computes)."""
    if mesh is None:
        return caches
    def leaf(x):
        spec = logical_to_spec(("batch", "kv_heads", None, None), x.shape, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return jax.tree_util.tree_map(leaf, caches)


# -- one process's rows of a global batch ---------------------------------------------
def local_batch_shards(mesh: Mesh) -> int:
    """How many batch shards this process's devices hold (its rows must divide by it)."""
    me = jax.process_index()
    coords = {idx[:2] for idx, d in np.ndenumerate(mesh.devices) if d.process_index == me}
    return max(len(coords), 1)


def global_rows(local_rows: int, mesh: Mesh) -> int:
    return local_rows * data_parallel_size(mesh) // local_batch_shards(mesh)


def to_global(x_local, mesh: Mesh) -> jax.Array:
    """This process's rows (leading axis) -> a global array sharded on batch. Every process
    passes the same number of rows; in one process this is a sharded `device_put`."""
    x = np.asarray(x_local)
    sh = NamedSharding(mesh, batch_spec(x.ndim, mesh))
    return jax.make_array_from_process_local_data(sh, x, (global_rows(x.shape[0], mesh),) + x.shape[1:])


def to_local(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """The inverse of `to_global`: this process's rows of a batch-leading global array."""
    if x.is_fully_addressable:
        return np.asarray(x)
    x = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, batch_spec(x.ndim, mesh)))(x)
    shards = {(s.index[0].start or 0): s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def across_processes(values: Sequence[int], op=np.max) -> list[int]:
    """`op` over all processes of a few host integers (the identity in one process)."""
    v = np.asarray(values, np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        v = op(np.asarray(multihost_utils.process_allgather(v)), axis=0)
    return [int(x) for x in v]


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
