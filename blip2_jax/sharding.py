"""Sharding: device meshes, logical-axis rules, parameter / batch shardings and placement.

    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})       # (2, 2, 2) on 8 devices
    shardings = param_shardings(cfg, mesh)                        # NamedSharding per parameter
    params = shard_params(params, shardings)                      # device_put
    batch = shard_batch({"pixels": np_pixels, "ids": np_ids}, mesh)
    model = blip2_jax.Blip2.random("tiny-opt").shard(mesh)        # surfaces run SPMD

Mesh. Axes are named and ordered as given (default data × fsdp × tensor); one axis may be -1 and
absorbs the remaining devices. Devices are laid out by `jax.experimental.mesh_utils` (via
`jax.make_mesh`-style topology-aware ordering); with `dcn=` (multi-slice), `axes` are the sizes
within a slice (ICI) and `dcn` the number of slices along each axis, built with
`mesh_utils.create_hybrid_device_mesh` (a mesh axis then has size ici × dcn). Axis types are
`AxisType.Auto` (GSPMD/Shardy propagation, MaxText's `shard_mode: auto`), not `jax.make_mesh`'s
Explicit default: jitted functions follow their input shardings, which is what `Blip2.shard` and
a trainer with `in_shardings`/`out_shardings` need.

Rules (MaxText style). Parameters carry logical axis names (`blip2_jax.nn`); `rules` is an ordered
sequence of `(logical_name, mesh_axes)` where mesh_axes is a mesh-axis name, a tuple of names or
None (replicate). A logical name may appear more than once: the entries are candidates tried in
order. For each array, dimensions are resolved left to right and a candidate is taken when
  * none of its mesh axes is already used by an earlier dimension of the same array (a mesh axis
    shards at most one dimension: e.g. the Q-Former LM head's ("embed", "embed") kernel is
    sharded on its first dimension only), and
  * the dimension's size is divisible by the product of its mesh axes' sizes. If it is not,
    trailing mesh axes are dropped until it is, down to replication (**fallback**: e.g. an "mlp"
    of 37 on tensor=2 is replicated; a batch of 6 on ("data"=2, "fsdp"=4) is sharded over data).
Mesh axes a rule names but the mesh lacks are ignored, so the default rules work on any mesh whose
axes are a subset of data/fsdp/tensor. Logical names without a rule (and None) are replicated.

DEFAULT_RULES:
    batch   -> ("data", "fsdp")   activations / inputs: data parallel over data × fsdp
    embed   -> "fsdp"             model width: ZeRO-3 / FSDP (weights all-gathered per use)
    heads   -> "tensor"           attention heads*head_dim: Megatron tensor parallel
    kv_heads -> "tensor"          grouped-query key/value heads*head_dim (LLaMA GQA)
    mlp     -> "tensor"           FFN hidden: tensor parallel
    vocab   -> "tensor"           embeddings / LM heads over the vocabulary
    layers  -> None               the scan axis is never sharded (no pipeline stage axis yet)
    norm    -> None               LayerNorm scales/biases: small, replicated

Per-tower overrides (big_vision's regex strategy, kept simple): `overrides` is a sequence of
`(regex, rules)`; a parameter whose "/"-joined path (e.g. "qformer/layers/layer_0/self_attn/
query/kernel") fully matches a regex uses that entry's rules instead of `rules`; first match wins.
E.g. replicate the small trainable Q-Former and fully shard the frozen LLM:
    overrides = [(r"qformer/.*|query_tokens|llm_proj/.*", REPLICATED_RULES),
                 (r"llm/.*", FULLY_SHARDED_RULES)]
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from blip2_jax.config import Blip2Config, get_preset
from blip2_jax import nn as nn_lib
from blip2_jax.nn import BATCH
from blip2_jax.models.blip2 import abstract_init, init_fn

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_AXES = {"data": -1, "fsdp": 1, "tensor": 1}

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)
# Every parameter replicated (e.g. a small trainable Q-Former); the batch stays data parallel.
REPLICATED_RULES: tuple[tuple[str, MeshAxes], ...] = (("batch", ("data", "fsdp")),)
# Frozen weights sharded over every device: width over fsdp × data (ZeRO-3 across the data axis
# too), heads/mlp/vocab over tensor. Fine for towers that get no optimizer state.
FULLY_SHARDED_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp", "data")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
)


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------
def _resolve(sizes: Mapping[str, int], total: int, what: str) -> dict[str, int]:
    """Replace the one -1 in `sizes` so that the product is `total`; ValueError naming the axis."""
    sizes = dict(sizes)
    for name, s in sizes.items():
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or (s < 1 and s != -1):
            raise ValueError(f"{what} axis {name!r} has size {s!r}; use a positive int or -1")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"{what} axes {free} are all -1; at most one axis may absorb the rest")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    desc = ", ".join(f"{n}={s}" for n, s in sizes.items())
    if free:
        if total % fixed:
            raise ValueError(f"{what} axis {free[0]!r}=-1 cannot absorb the rest: {total} devices "
                             f"are not divisible by the other axes' product {fixed} ({desc})")
        sizes[free[0]] = total // fixed
    elif fixed != total:
        bad = max(sizes, key=lambda n: (total % sizes[n] != 0, sizes[n]))
        raise ValueError(f"{what} axes ({desc}) multiply to {fixed}, not the {total} devices; "
                         f"check axis {bad!r} (or set one axis to -1)")
    return sizes


def make_mesh(axes: Mapping[str, int] = DEFAULT_AXES, *, dcn: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A named device mesh over `devices` (default all), axes in the order of `axes`.

    axes: mesh axis name -> size; one size may be -1 (the remaining devices). With `dcn`, these are
    the sizes inside one slice (ICI) and `dcn` maps axis names to the number of slices along them
    (-1 allowed; unnamed axes 1). Slices are the devices' `slice_index` on TPU (multi-slice) and
    processes elsewhere (GPU/CPU hosts). In one CPU process only a dcn product of 1 can be built
    (shape checks); tests/test_sharding.py runs 2 CPU processes as 2 "slices". Real multi-slice
    TPU topology (ICI vs DCN device order) is not exercised here.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axes)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"mesh axes must be distinct and non-empty; got {names}")
    auto = (AxisType.Auto,) * len(names)
    if dcn is None:
        if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
            raise ValueError("the devices span several TPU slices; give `dcn=` (e.g. "
                             "{'data': -1}) so that only DCN-tolerant axes cross slices")
        sizes = _resolve(axes, len(devices), "mesh")
        shape = tuple(sizes[n] for n in names)
        # `jax.make_mesh`'s own topology-aware construction (it splits physical axes on v5e);
        # a logical shape that is no product of whole physical axes (128 x 2 on a 16 x 16 v5e)
        # splits them, as jax.make_mesh does when asked.
        split = devices[0].device_kind in (getattr(mesh_utils, "_TPU_V5_LITE", None),
                                           getattr(mesh_utils, "_TPU_V5E", None))
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
        except NotImplementedError:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, names, axis_types=auto)

    unknown = sorted(set(dcn) - set(names))
    if unknown:
        raise ValueError(f"dcn axes {unknown} are not mesh axes {list(names)}")
    # Granules: TPU slices (slice_index); elsewhere (GPU/CPU hosts over DCN/network) processes.
    slices = {getattr(d, "slice_index", 0) for d in devices}
    by_slice = len(slices) > 1 or devices[0].platform == "tpu"
    granules = len(slices) if by_slice else len({d.process_index for d in devices})
    dcn_sizes = _resolve({n: dcn.get(n, 1) for n in names}, granules,
                         "dcn (slices: " + ("slice_index" if by_slice else "processes") + ")")
    if len(devices) % granules:
        raise ValueError(f"{len(devices)} devices do not split evenly over {granules} slices")
    ici_sizes = _resolve(axes, len(devices) // granules, "ici (per-slice mesh)")
    grid = mesh_utils.create_hybrid_device_mesh(
        tuple(ici_sizes[n] for n in names), tuple(dcn_sizes[n] for n in names), devices,
        process_is_granule=not by_slice)
    return Mesh(grid, names, axis_types=auto)


def auto_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with every axis `AxisType.Auto` (the model's ops carry no explicit out-shardings, so
    a `jax.make_mesh` default Explicit mesh cannot run them; `Blip2.shard` converts)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


# ----------------------------------------------------------------------------------------------
# Logical names -> mesh axes
# ----------------------------------------------------------------------------------------------
def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_rules(rules: Rules) -> None:
    for r in rules:
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
            raise ValueError(f"a sharding rule is (logical_name, mesh_axes); got {r!r}")


def resolve_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> P:
    """The mesh PartitionSpec of an array of `shape` whose dims carry the `logical` names.

    Candidates per name in rule order; a mesh axis is used at most once per array; a dimension not
    divisible by its mesh axes' sizes drops trailing axes until it is (down to replication).
    """
    logical = tuple(logical) + (None,) * (len(shape) - len(logical))
    if len(logical) != len(shape):
        raise ValueError(f"{len(logical)} logical names {logical} for an array of shape {shape}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        chosen: tuple[str, ...] = ()
        if name is not None:
            for rule_name, axes in rules:
                if rule_name != name:
                    continue
                cand = tuple(a for a in _as_tuple(axes) if a in mesh.shape)
                if any(a in used for a in cand):
                    continue
                while cand and dim % math.prod(mesh.shape[a] for a in cand):
                    cand = cand[:-1]
                if cand:
                    chosen = cand
                    break
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*out)


def _config(cfg: Union[Blip2Config, str]) -> Blip2Config:
    return get_preset(cfg) if isinstance(cfg, str) else cfg


def _is_spec(x) -> bool:
    return isinstance(x, P)


def logical_specs(cfg: Union[Blip2Config, str]) -> dict:
    """PartitionSpecs of logical axis names for every parameter (the params' tree; no allocation).

    Unannotated parameters (e.g. the ITC temperature) get `P()`.
    """
    specs, _ = abstract_init(_config(cfg))
    return jax.tree.map(lambda s: s, specs, is_leaf=_is_spec)   # fresh tree; the cache's is shared


def _path(keypath) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in keypath)


def _rules_for(path: str, rules: Rules, overrides: Sequence[tuple[str, Rules]]) -> Rules:
    for pattern, r in overrides:
        if re.fullmatch(pattern, path):
            return r
    return rules


def shardings_from_logical(specs, shapes, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                           overrides: Sequence[tuple[str, Rules]] = ()):
    """NamedShardings for a tree of logical specs and the matching tree of shapes/arrays."""
    _check_rules(rules)
    for _, r in overrides:
        _check_rules(r)
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=_is_spec)
    flat_shapes, _ = jax.tree_util.tree_flatten_with_path(shapes)
    if len(flat_specs) != len(flat_shapes):
        raise ValueError(f"{len(flat_specs)} logical specs for {len(flat_shapes)} arrays")
    out = []
    for spec, (keypath, leaf) in zip(flat_specs, flat_shapes):
        r = _rules_for(_path(keypath), rules, overrides)
        out.append(NamedSharding(mesh, resolve_spec(tuple(spec), np.shape(leaf), mesh, r)))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def param_shardings(cfg: Union[Blip2Config, str], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    overrides: Sequence[tuple[str, Rules]] = ()) -> dict:
    """A NamedSharding for every parameter of `cfg` (same tree as the params; nothing allocated)."""
    specs, shapes = abstract_init(_config(cfg))
    return shardings_from_logical(specs, shapes, mesh, rules, overrides)


def sharded_init(cfg: Union[Blip2Config, str], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                 overrides: Sequence[tuple[str, Rules]] = ()):
    """A jitted `rng -> params` whose outputs are created in `param_shardings` (no full copy on
    one device; `.lower(rng).out_info` shows the placement without compiling)."""
    cfg = _config(cfg)
    return init_fn(cfg, out_shardings=param_shardings(cfg, mesh, rules, overrides))


def init_params(cfg: Union[Blip2Config, str], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                overrides: Sequence[tuple[str, Rules]] = (), seed: int = 0) -> dict:
    """Random parameters created directly in their shardings (the same values as
    `models.blip2.init_params(cfg, seed)`: jax's partitionable threefry makes them layout-independent)."""
    return sharded_init(cfg, mesh, rules, overrides)(jax.random.PRNGKey(seed))


def split_over_batch_axes(sharding: NamedSharding, shape: Sequence[int],
                          rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """`sharding` further split over the batch axes it does not use yet, on its first dimension
    that the added ways divide (ZeRO-1's layout for optimizer state: each device holds and
    updates a slice); unchanged where no dimension divides."""
    mesh = sharding.mesh
    spec = [_as_tuple(e) if e is not None else () for e in sharding.spec]
    spec += [()] * (len(shape) - len(spec))
    used = {a for entry in spec for a in entry}
    axes = tuple(a for a in batch_axes(mesh, rules) if a not in used and mesh.shape[a] > 1)
    n = math.prod(mesh.shape[a] for a in axes)
    if n == 1:
        return sharding
    for i, (entry, size) in enumerate(zip(spec, shape)):
        if size % (n * math.prod(mesh.shape[a] for a in entry)) == 0:
            spec[i] = entry + axes
            # PartitionSpec's own forms: None, an axis name, or a tuple of several.
            return NamedSharding(mesh, P(*(None if not e else e[0] if len(e) == 1 else e
                                           for e in spec)))
    return sharding


def shard_params(params, shardings):
    """`params` placed with `shardings` (a matching tree, e.g. from `param_shardings`).

    Multi-process: every process must pass the same (host) values, as for `jax.device_put`.
    """
    return jax.device_put(params, shardings)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def batch_axes(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the batch dimension is sharded over (first "batch" rule; the mesh's axes)."""
    for name, axes in rules:
        if name == BATCH:
            return tuple(a for a in _as_tuple(axes) if a in mesh.shape)
    return ()


def batch_shards(mesh: Optional[Mesh], rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the batch dimension is split on `mesh` (1 without a mesh): batch sizes
    must be multiples of it to be sharded rather than replicated."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, size: Optional[int] = None,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading dimension over the batch axes (("data", "fsdp") by default), the rest replicated.

    With `size` (the batch size), the fallback rule applies: trailing batch axes are dropped until
    they divide it, down to full replication. ndim=0 gives the replicated sharding.
    """
    if ndim == 0:
        return NamedSharding(mesh, P())
    logical = (BATCH,) + (None,) * (ndim - 1)
    if size is None:
        axes = batch_axes(mesh, rules)
        return NamedSharding(mesh, P(axes if len(axes) != 1 else axes[0]) if axes else P())
    return NamedSharding(mesh, resolve_spec(logical, (size,) + (1,) * (ndim - 1), mesh, rules))


_ACTIVATIONS: "contextvars.ContextVar[Optional[tuple]]" = contextvars.ContextVar(
    "blip2_jax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """While a step traces inside this context, `constrain_batch` shards activations' leading
    dimension over the batch axes of `mesh` (outside it, `constrain_batch` does nothing), and
    Pallas kernels run per device over `mesh` by the same rules (`nn.kernel_mesh`)."""
    token = _ACTIVATIONS.set((mesh, rules))
    try:
        with nn_lib.kernel_mesh(mesh, lambda logical, shape: resolve_spec(logical, shape, mesh,
                                                                          rules)):
            yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain_batch(x):
    """`x` (or each array of a tree) with its leading dimension sharded over the batch axes, where
    XLA's propagation would otherwise choose (e.g. replicate pairs gathered across devices)."""
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
        a, batch_sharding(mesh, a.ndim, a.shape[0] if a.ndim else None, rules)), x)


ROWS_PER_PEER = 8   # `gather_batch_rows`: rows one device may take from each other device


def gather_batch_rows(x, index, rows_per_peer: int = ROWS_PER_PEER):
    """x[index] along the leading (batch) dimension, `index` (B,) global row numbers: the
    result sharded like x (ITM's hard-negative images, drawn from the whole batch).

    Inside `activation_sharding`, with x's rows split over the batch axes, each device sends
    each other device only the rows that device asked of it, in one all-to-all of
    `rows_per_peer` rows per pair of devices; when some device asks more rows than that of
    one device (hard negatives bunched on one device's images), the step falls back to one
    all-gather of x, so the result is always exact. A plain gather of a sharded x compiles to
    an all-reduce of a zero-filled copy of the whole x on every device (stage-1 ViT-g on
    v5p-128: 1.25 GB of ViT tokens per chip), and so does an all-gather. Elsewhere
    `jnp.take`."""
    ctx = _ACTIVATIONS.get()
    if ctx is not None:
        mesh, rules = ctx
        spec = batch_sharding(mesh, x.ndim, x.shape[0], rules).spec
        axes = spec[0] if len(spec) else None
        if axes is not None and index.shape[0] == x.shape[0]:
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            n = math.prod(mesh.shape[a] for a in names)
            cap = min(rows_per_peer, x.shape[0] // n)
            return jax.shard_map(functools.partial(_exchange_rows, names=names, n=n, cap=cap),
                                 mesh=mesh, in_specs=(P(axes), P(axes)), out_specs=P(axes),
                                 check_vma=False)(x, index)
    return jnp.take(x, index, axis=0)


def _exchange_rows(rows, own_index, *, names, n: int, cap: int):
    """`gather_batch_rows` on one device: `rows` its r rows of x, `own_index` (r,) the global
    rows it wants. Every device sees every request (an all-gather of the indices), so all
    agree on each request's slot among those of the same (asking, owning) pair and on
    whether any pair needs more than `cap` slots."""
    r = rows.shape[0]
    wanted = jax.lax.all_gather(own_index, names, axis=0, tiled=False)      # (n, r)
    owner = wanted // r
    same_owner = owner[:, :, None] == jnp.arange(n)[None, None, :]           # (n, r, n)
    slot = jnp.take_along_axis(jnp.cumsum(same_owner, axis=1), owner[:, :, None],
                               axis=2)[..., 0] - 1                           # (n, r)
    me = jax.lax.axis_index(names)

    def exchange(rows):
        # Slot c for asking device d: its request k with owner me and slot c (row 0 if none).
        asked = (owner == me)[:, :, None] & (slot[:, :, None] == jnp.arange(cap))
        k = jnp.argmax(asked, axis=1)                                        # (n, cap)
        send = jnp.take(rows, (jnp.take_along_axis(wanted, k, axis=1) % r).reshape(-1), axis=0)
        got = jax.lax.all_to_all(send, names, 0, 0, tiled=True)          # (n * cap, ...)
        mine = own_index // r * cap + jnp.take(slot, me, axis=0)
        return jnp.take(got, mine, axis=0)

    def everything(rows):
        return jnp.take(jax.lax.all_gather(rows, names, axis=0, tiled=True), own_index, axis=0)

    return jax.lax.cond(jnp.any(slot >= cap), everything, exchange, rows)


def shard_batch(batch, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Host (numpy) arrays -> global jax Arrays with the batch dimension sharded.

    Single process: `jax.device_put`; a batch size not divisible by the batch axes falls back as in
    `batch_sharding` (replicated at worst). Multi-process: each process passes its own local rows
    and `jax.make_array_from_process_local_data` assembles the global batch (process_count × local
    rows); the global size must then be divisible by the batch axes (no replication fallback: the
    processes hold different data). Scalars are replicated; None leaves stay None.
    """
    multi = jax.process_count() > 1

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if not multi:
            return jax.device_put(x, batch_sharding(mesh, x.ndim, x.shape[0], rules))
        sharding = batch_sharding(mesh, x.ndim, None, rules)
        global_rows = x.shape[0] * jax.process_count()
        n = batch_shards(mesh, rules)
        if global_rows % n:
            raise ValueError(f"global batch {global_rows} (= {x.shape[0]} per process × "
                             f"{jax.process_count()}) is not divisible by the batch axes' size {n}")
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(place, batch)


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) jax Array → the whole global array as numpy on every process
    (`process_allgather`, tiled, when other processes hold some of its shards)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_rows(x) -> np.ndarray:
    """Each process's local rows (host numpy) → every process's rows in process order (the row
    layout `shard_batch` assembles a global batch in); a no-op in a single process."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
