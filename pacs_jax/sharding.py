"""Device mesh, logical-axis sharding rules, multi-host setup and array placement.

The model names the axes of every parameter (`logical_axes` metadata: embed, mlp, heads, ...);
ONE table, `LOGICAL_AXIS_RULES`, maps those names to the mesh axes ("data", "fsdp", "tensor").
Nothing else in the code base names a device or a mesh axis: to change the layout, edit the
table (or pass another one).

A dimension whose size the mapped mesh axes do not divide is left unsharded (replicated) and
the fallback is logged at debug level: the result stays correct, only that dimension costs
more memory. Checks that would make such a fallback a real waste (the tensor axis not dividing
the head counts, the batch not dividing over the data axes) are errors, raised before anything
compiles by `validate_mesh_for_model`.

Multi-host (multi-controller SPMD): every process runs the same program. The CLI calls
`initialize_distributed()` first (a no-op for one process), builds the same mesh everywhere,
and feeds each process its own contiguous slice of the global batch (`process_slice`) to
`shard_batch`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pacs_jax.config import ConfigError, MeshConfig

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The axes a batch is split over: every device holds different rows, except across `tensor`.
BATCH_AXES = ("data", "fsdp")

MeshAxes = Optional[str | tuple[str, ...]]
Rules = Sequence[tuple[str, MeshAxes]]

# logical axis -> mesh axis (or axes, or None = replicated). The one place layout is decided.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters (names from pacs_jax.models.llama): FSDP over the model width, Megatron-style
    # tensor parallelism over heads / MLP width / vocabulary.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # activations [batch, length, ...]: rows over the data axes; the model width is whole on
    # every device between layers (fsdp already shards the batch, it cannot shard both).
    ("batch", BATCH_AXES),
    ("length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # the KV cache [layers, batch, kv_heads, max_len, head_dim]
    ("cache_layers", None),
    ("cache_batch", BATCH_AXES),
    ("cache_kv_heads", "tensor"),
    ("cache_length", None),
    ("cache_head_dim", None),
)

KV_CACHE_AXES = ("cache_layers", "cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")


def with_rules(rules: Rules, **changes: MeshAxes) -> tuple[tuple[str, MeshAxes], ...]:
    """`rules` with some logical axes mapped elsewhere, e.g. `with_rules(LOGICAL_AXIS_RULES, embed=None)`."""
    known = {name for name, _ in rules}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown logical axis {unknown[0]!r}; known: {sorted(known)}")
    return tuple((name, changes.get(name, axes)) for name, axes in rules)


# An optional sampling layout: weights whole across `fsdp` (one all-gather per rollout), still
# split over `tensor`. NOT the default: with the training layout XLA already keeps FSDP weights
# in place during decode and all-reduces the small activations instead of gathering weights per
# token; on 8 CPU devices (bench/decode_layout.py) this layout won for a 128-wide model (x1.3-3.3)
# and lost for a 512-wide one on fsdp-only meshes (x0.2-0.3). Measure on the target TPU first.
DECODE_RULES = with_rules(LOGICAL_AXIS_RULES, embed=None)


# ------------------------------------------------------------------------------- the mesh


def make_mesh(mesh_config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes over `devices` (default: all of them).

    One axis may be -1: it takes whatever the other two leave. `tensor` is the fastest-varying
    axis, so its devices are neighbours (same host, fastest links).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {axis: getattr(mesh_config, axis) for axis in MESH_AXES}
    bad = [f"mesh.{axis}={size}" for axis, size in sizes.items() if not (size == -1 or (isinstance(size, int) and size >= 1))]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: each mesh axis must be >= 1, or -1 to fill the remaining devices")
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"only one of mesh.data / mesh.fsdp / mesh.tensor may be -1, got {', '.join('mesh.' + a for a in fill)} = -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ConfigError(
                f"mesh.{fill[0]}=-1 cannot fill {len(devices)} devices: the other axes "
                f"({_describe(sizes)}) multiply to {known}, which does not divide {len(devices)}"
            )
        sizes[fill[0]] = len(devices) // known
    product = math.prod(sizes.values())
    if product != len(devices):
        raise ConfigError(
            f"mesh.data * mesh.fsdp * mesh.tensor = {_describe(sizes)} = {product}, but there are "
            f"{len(devices)} devices; make the product {len(devices)} (or set one axis to -1 to fill)"
        )
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _describe(sizes: Mapping[str, int]) -> str:
    return " * ".join(f"{size} ({axis})" for axis, size in sizes.items())


def batch_size_divisor(mesh: Mesh) -> int:
    """How many ways a batch is split: data x fsdp."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def traced_batch_ways() -> int:
    """`batch_size_divisor` of the mesh set by `jax.set_mesh` around the code being traced (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def validate_mesh_for_model(
    mesh: Mesh,
    decoder_config,
    prompts_per_step: int,
    group_size: int,
    *,
    mini_batches: int = 1,
    micro_batches: int = 1,
) -> None:
    """Raise ConfigError, before anything compiles, when the model or the batch does not split
    over `mesh`: the head counts over `tensor`, the rollout's prompts (prefill), responses
    (decode) and each gradient micro-batch over data x fsdp."""
    tensor = mesh.shape["tensor"]
    heads, kv_heads = decoder_config.num_heads, decoder_config.num_kv_heads
    if heads % tensor or kv_heads % tensor:
        fits = [t for t in range(1, kv_heads + 1) if heads % t == 0 and kv_heads % t == 0]
        raise ConfigError(
            f"mesh.tensor={tensor} must divide the model's num_attention_heads={heads} and "
            f"num_key_value_heads={kv_heads}; use mesh.tensor in {fits} and give the rest to mesh.data / mesh.fsdp"
        )
    ways = batch_size_divisor(mesh)
    split = f"mesh.data * mesh.fsdp = {mesh.shape['data']} * {mesh.shape['fsdp']} = {ways}"
    if prompts_per_step % ways:
        raise ConfigError(
            f"trainer.prompts_per_step={prompts_per_step} must be divisible by {split} (the prefill "
            f"splits the prompts over those devices); use a multiple of {ways}"
        )
    rows_per_micro = prompts_per_step // (mini_batches * micro_batches) * group_size
    if rows_per_micro % ways:
        raise ConfigError(
            f"each gradient micro-batch holds trainer.prompts_per_step / (trainer.mini_batches * "
            f"trainer.micro_batches) * rollout.group_size = {prompts_per_step} / ({mini_batches} * "
            f"{micro_batches}) * {group_size} = {rows_per_micro} responses, which must be divisible by "
            f"{split}; use fewer mini/micro-batches or more prompts"
        )


# --------------------------------------------------------------------------- logical rules


def _rules_dict(rules: Rules) -> dict[str, MeshAxes]:
    return dict(rules)


def logical_to_spec(
    logical_axes: Sequence[Optional[str]],
    rules: Rules = LOGICAL_AXIS_RULES,
    shape: Optional[Sequence[int]] = None,
    mesh: Optional[Mesh | jax.sharding.AbstractMesh] = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names.

    A name may be None (never sharded). A mesh axis is used at most once per array: a later
    dimension that maps to an axis an earlier one took stays unsharded. With `shape` and `mesh`,
    a dimension the mapped mesh axes do not divide stays unsharded too (logged at debug level).
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; add it to pacs_jax.sharding.LOGICAL_AXIS_RULES")
        target = table[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            axes = tuple(axis for axis in axes if mesh.shape[axis] > 1)  # size-1 axes change nothing
        if used.intersection(axes):
            axes = ()
        if axes and shape is not None and mesh is not None:
            ways = math.prod(mesh.shape[axis] for axis in axes)
            if shape[dim] % ways:
                logger.debug(
                    "dimension %d (%s, size %d) of shape %s is not divisible by mesh axes %s (%d ways): "
                    "kept whole (replicated)", dim, name, shape[dim], tuple(shape), axes, ways,
                )
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding for every array of `tree` (an nnx.State, or any pytree holding Variables).

    A Variable follows its `logical_axes` metadata through `rules`; every other array (a
    Variable without that metadata, an optimizer step count) is replicated. Variables stay in
    the result (holding a NamedSharding), so it has the tree's exact structure and can be given
    to `jax.jit(out_shardings=...)` or `jax.device_put`. Leaves may be arrays or
    jax.ShapeDtypeStruct (from `jax.eval_shape`).
    """

    def leaf_sharding(x):
        if _is_variable(x):
            value = x.get_value() if hasattr(x, "get_value") else x.value
            axes = x.get_metadata().get("logical_axes")
            if axes is None or not hasattr(value, "shape"):
                return x.replace(NamedSharding(mesh, PartitionSpec()))
            if len(axes) != len(value.shape):
                raise ValueError(f"logical_axes {axes} do not match the shape {value.shape} of a {type(x).__name__}")
            return x.replace(NamedSharding(mesh, logical_to_spec(axes, rules, value.shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(leaf_sharding, tree, is_leaf=_is_variable)


def train_state_shardings(train_state: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Shardings matching a TrainState (params, opt_state), leaf for leaf.

    Optax states that mirror the params (AdamW's mu and nu) hold the params' Variables, so
    they get the params' shardings; scalars (`count`) are replicated.
    """
    return param_shardings(train_state, mesh, rules)


def shard_train_state(train_state: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """`train_state` placed on `mesh` as `rules` say. Every process must pass the same values."""
    return jax.device_put(train_state, train_state_shardings(train_state, mesh, rules))


def init_sharded(make_state: Callable[[], Any], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Run `make_state()` (a pure function returning arrays / nnx.State, e.g. the train state
    of a freshly initialised model) under jit with sharded outputs, so no device ever holds
    the whole unsharded state (for models that do not fit one device)."""
    abstract = jax.eval_shape(make_state)
    with jax.set_mesh(mesh):
        return jax.jit(make_state, out_shardings=param_shardings(abstract, mesh, rules))()


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]], rules: Rules = LOGICAL_AXIS_RULES) -> jax.Array:
    """with_sharding_constraint by logical names, for activations inside jitted code. A no-op
    unless traced under `jax.set_mesh(mesh)`, so model code can call it unconditionally."""
    mesh = jax.sharding.get_abstract_mesh()
    # On one device there is nothing to place, and the annotations still cost: the GRPO update of
    # bench/step.py compiled 2.8x slower and ran 2x slower with them (XLA CPU, jax 0.10.2).
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules, x.shape, mesh)))


# ------------------------------------------------------------------------------ batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _local_row_blocks(mesh: Mesh, n_rows: int) -> list[tuple[int, int]]:
    """The distinct (start, stop) row blocks of an [n_rows] batch that this process's devices hold."""
    ways = batch_size_divisor(mesh)
    if n_rows % ways:
        raise ConfigError(
            f"a batch of {n_rows} rows cannot be split over mesh.data * mesh.fsdp = {mesh.shape['data']} * "
            f"{mesh.shape['fsdp']} = {ways} devices; make trainer.prompts_per_step (times rollout.group_size "
            f"for responses) a multiple of {ways}"
        )
    indices = batch_sharding(mesh).addressable_devices_indices_map((n_rows,))
    return sorted({(index[0].start or 0, n_rows if index[0].stop is None else index[0].stop) for index in indices.values()})


def process_slice(n_rows: int, mesh: Mesh) -> tuple[int, int]:
    """(start, stop): the rows of a globally identical [n_rows, ...] batch that this process
    must give to `shard_batch`. With one process: (0, n_rows)."""
    blocks = _local_row_blocks(mesh, n_rows)
    for (_, stop), (start, _) in zip(blocks, blocks[1:]):
        if stop != start:
            raise ValueError(
                f"this process's devices hold non-contiguous rows {blocks} of the batch: build the mesh "
                "with make_mesh (devices in jax.devices() order) so each process holds one block"
            )
    return blocks[0][0], blocks[-1][1]


def shard_batch(host_arrays: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays, leading axis split over data x fsdp, from this process's rows.

    Every process must pass its own contiguous slice of each global array, the rows
    `process_slice(global_rows, mesh)` names (one process: the whole array). Processes whose
    devices differ only along `tensor` hold the same rows and must pass the same slice.
    Arrays may differ in length (prompts [P, ...] beside responses [P * G, ...]).
    """
    sharding = batch_sharding(mesh)
    ways = batch_size_divisor(mesh)
    # How many of the data x fsdp row blocks this process holds fixes each global size.
    local_blocks = len(_local_row_blocks(mesh, ways))
    out = {}
    for name, array in host_arrays.items():
        array = np.asarray(array)
        if array.ndim == 0:
            raise ValueError(f"batch[{name!r}] is a scalar; shard_batch places arrays with a leading batch axis")
        local_rows = array.shape[0]
        if local_rows % local_blocks:
            raise ConfigError(
                f"batch[{name!r}] has {local_rows} rows on this process, which holds {local_blocks} of the "
                f"{ways} (mesh.data * mesh.fsdp) batch blocks; the global batch must be a multiple of {ways} "
                f"rows and each process must pass rows[slice(*process_slice(global_rows, mesh))]"
            )
        global_rows = local_rows // local_blocks * ways
        out[name] = jax.make_array_from_process_local_data(sharding, array, (global_rows, *array.shape[1:]))
    return out


def to_host(tree: Any) -> Any:
    """Global arrays as NumPy on every process (several processes: gathered from all of them)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ---------------------------------------------------------------------------- processes

_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def _on_cloud_tpu_vm() -> bool:
    """libtpu installed and TPU chips attached: when JAX's own cluster detection can work."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:
        from jax._src import hardware_utils  # private; if it moves, treat the host as not a TPU VM
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError):
        return False


def _tpu_metadata(key: str) -> Optional[str]:
    """A TPU VM's instance attribute (what JAX's own cluster detection reads), or None."""
    import urllib.request

    request = urllib.request.Request(_METADATA_URL + key, headers={"Metadata-Flavor": "Google"})
    for attempt in range(3):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read().decode()
        except OSError:
            import time

            time.sleep(0.5 * (attempt + 1))
    return None


def tpu_slice_hosts() -> Optional[int]:
    """Hosts in this Cloud TPU VM's slice (times MEGASCALE_NUM_SLICES for multislice), from
    TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES (GKE) or the VM's metadata; None when unknown."""
    workers = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
    if workers is None:
        workers = _tpu_metadata("worker-network-endpoints")
    if workers is None:
        return None
    slices = int(os.environ.get("MEGASCALE_NUM_SLICES") or 1)
    return len([w for w in workers.split(",") if w.strip()]) * slices


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None


def initialize_distributed(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
    """Join the multi-process JAX runtime when this process is one of several; call before any
    other JAX call. Returns whether it did. The CLI (train, eval) calls it with no arguments.

    - `coordinator` ("host:port" of process 0) with num_processes and process_id, or the
      environment JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: an explicit
      cluster (several machines, or several local processes as in the tests).
    - A Cloud TPU VM of a multi-host slice (v5p-64: 8 hosts): JAX finds the coordinator, the
      process count and this host's id in the TPU metadata.
    - Anything else, a one-host TPU VM (v5litepod-8, v4-8) and one process of any kind included:
      a no-op. So is num_processes=1, and a runtime that is already initialised.
    """
    if num_processes == 1 or jax.distributed.is_initialized():
        return False
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator is not None:
        num_processes = _env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
        process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
        if num_processes is None or process_id is None:
            raise ConfigError(
                f"coordinator {coordinator} given (JAX_COORDINATOR_ADDRESS) without the process count and this "
                "process's id: set JAX_NUM_PROCESSES (how many processes) and JAX_PROCESS_ID (0 .. N-1, 0 on "
                "the coordinator's host) in every process, or unset JAX_COORDINATOR_ADDRESS for one process"
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"JAX_PROCESS_ID={process_id} must be in 0 .. JAX_NUM_PROCESSES-1 = {num_processes - 1}")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        if num_processes is not None or process_id is not None:
            raise ValueError(
                f"num_processes={num_processes}, process_id={process_id} given without a coordinator "
                "address; pass coordinator='host:port' (process 0's address) or set JAX_COORDINATOR_ADDRESS"
            )
        if not _on_cloud_tpu_vm():
            return False
        hosts = tpu_slice_hosts()
        if hosts == 1:
            return False
        if hosts is None:
            logger.warning("cannot read this TPU VM's worker list (metadata server); joining JAX's distributed "
                           "runtime anyway, which reads the same metadata")
        jax.distributed.initialize()
    logger.info("JAX distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def require_shared_dirs(dirs: Mapping[str, str]) -> None:
    """With several processes, every directory here (config key -> path) must be one every host
    sees: gs://, or a shared filesystem vouched for with PACS_JAX_SHARED_FS=1. Raises ConfigError
    naming the key otherwise. Orbax's multi-host save has every host write its shards into one
    directory, and a VM's own disk holds only its own shards (and goes with the VM)."""
    if jax.process_count() == 1 or os.environ.get("PACS_JAX_SHARED_FS") == "1":
        return
    for key, path in dirs.items():
        if path and "://" not in path:
            raise ConfigError(
                f"{key}={path} is a local folder, but this run has {jax.process_count()} processes (hosts) "
                f"and each sees only its own disk, while every host writes and reads its part of each "
                f"checkpoint in one shared folder. Use a bucket every host can reach, e.g. "
                f"{key}=gs://BUCKET/runs/NAME (or, for a filesystem every host mounts, export PACS_JAX_SHARED_FS=1)"
            )


def is_main_process() -> bool:
    """Process 0 writes logs and metadata; every process computes."""
    return jax.process_index() == 0
