"""Streaming tensor I/O: a checkpoint is read one tensor (or one layer of a stacked leaf) at a time
and written into files whose layout is planned up front, so a conversion holds about one tensor.

    KeySource   a flat checkpoint: keys(), shape(k), dtype(k), get(k) (safetensors files, a torch
                `.pth` through `convert.pth`, an in-memory dict); `Fused` presents a tensor stored
                in pieces (LAVIS q_bias/v_bias, HF CLIP q/k/v) as one key, and splits it on write
    Leaf        one leaf of our parameter tree, not yet read: shape, dtype, read(j) -> layer j of a
                stacked leaf (or the whole leaf for j=None)
    leaves_from_rules / entries_for_rules    a key table (`mapping.Rule`s) turned into Leaves
                (reading) or into output tensors (writing), without materialising stacked leaves
    write_safetensors                        sharded safetensors + index, streamed

The safetensors library reads lazily but can only write tensors it holds all at once, and its
numpy reader keeps files mapped (resident pages add up over a multi-GB conversion); the format is
an 8-byte header length, a JSON header and raw little-endian bytes, so reading and writing it with
plain file I/O keeps memory at one tensor. Files are checked against the library in the tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import ml_dtypes
import numpy as np

from blip2_jax.convert.mapping import (MappingError, Rule, _to_ours, _to_theirs, check_names,
                                       flatten, unflatten)
from blip2_jax.models import blip2 as blip2_model

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
FLOAT_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16,
                "fp16": np.float16, "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint is missing files or holds something unexpected; the message names the file."""


def float_dtype(name: Optional[str]):
    """numpy dtype for "bf16" / "fp16" / "fp32" (or the long names); None stays None."""
    if name is None:
        return None
    try:
        return np.dtype(FLOAT_DTYPES[name])
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {name!r}") from None


def cast(a: np.ndarray, dtype) -> np.ndarray:
    """`a` in `dtype` when it is a floating array and a dtype is asked for; else unchanged."""
    if dtype is None or not np.issubdtype(a.dtype, np.floating) and a.dtype != ml_dtypes.bfloat16:
        return a
    return a.astype(dtype, copy=False)


# ----------------------------------------------------------------------------------------------
# Sources of flat tensors
# ----------------------------------------------------------------------------------------------
class KeySource:
    """A flat checkpoint. Subclasses implement keys/shape/dtype/get."""
    name = "checkpoint"

    def keys(self) -> set[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def get(self, key: str, index: Optional[int] = None) -> np.ndarray:
        """The tensor (or its `index`-th slice along axis 0)."""
        raise NotImplementedError


class DictSource(KeySource):
    """Arrays held in memory (a state dict, or our own flattened tree)."""

    def __init__(self, arrays: Mapping[str, object], name: str = "arrays"):
        self.arrays, self.name = arrays, name

    def keys(self):
        return set(self.arrays)

    def shape(self, key):
        return tuple(np.shape(self.arrays[key]))

    def dtype(self, key):
        return np.dtype(self.arrays[key].dtype)

    def get(self, key, index=None):
        a = self.arrays[key]
        return np.asarray(a if index is None else a[index])


class LazySource(KeySource):
    """Tensors that read themselves on demand (`convert.pth.LazyTensor`: shape, dtype, numpy())."""

    def __init__(self, tensors: Mapping[str, object], name: str):
        self.tensors, self.name = tensors, name

    def keys(self):
        return set(self.tensors)

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return np.dtype(self.tensors[key].dtype)

    def get(self, key, index=None):
        a = self.tensors[key].numpy()
        return a if index is None else contiguous(a[index])


class SafetensorsFile:
    """One safetensors file, read with plain file I/O (`get` reads only the bytes it returns)."""

    def __init__(self, file: str):
        self.file = file
        try:
            size = os.path.getsize(file)
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for key, e in header.items():
            try:
                dtype = np.dtype(ST_DTYPES[e["dtype"]])
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (8 + n + int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{file}: bad header entry for {key}: {e}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape)) or end > size:
                raise CheckpointError(f"{file}: {key} needs bytes {begin}..{end} of a {size}-byte "
                                      "file (truncated or corrupt)")
            self.entries[key] = (dtype, shape, begin)

    def read(self, key: str, index: Optional[int] = None) -> np.ndarray:
        dtype, shape, begin = self.entries[key]
        if index is not None:
            if not shape or not -shape[0] <= index < shape[0]:
                raise IndexError(f"{self.file}: {key} {shape} has no slice {index}")
            index %= shape[0]
            shape = shape[1:]
            begin += index * dtype.itemsize * int(np.prod(shape))
        count = dtype.itemsize * int(np.prod(shape))
        with open(self.file, "rb") as f:
            f.seek(begin)
            raw = np.fromfile(f, np.uint8, count) if count else np.zeros(0, np.uint8)
        if raw.size != count:
            raise CheckpointError(f"{self.file}: {key} is truncated")
        return raw.view(dtype).reshape(shape)


class SafetensorsReader(KeySource):
    """A single or sharded safetensors checkpoint in a directory (`{stem}.safetensors`, or shards
    named by `{stem}.safetensors.index.json`)."""

    def __init__(self, path: str, stem: str = "model"):
        self.path = self.name = path
        index = os.path.join(path, f"{stem}.safetensors.index.json")
        single = os.path.join(path, f"{stem}.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.exists(os.path.join(path, name)):
                    raise CheckpointError(f"{index} names shard {name}, which is missing")
            self._files = {name: SafetensorsFile(os.path.join(path, name)) for name in files}
            self._of = {k: self._files[v] for k, v in weight_map.items()}
            for k, f in self._of.items():
                if k not in f.entries:
                    raise CheckpointError(f"{index} puts {k} in {os.path.basename(f.file)}, "
                                          "which does not hold it")
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._of = {k: f for k in f.entries}
        else:
            found = sorted(os.listdir(path)) if os.path.isdir(path) else []
            raise CheckpointError(f"no {stem}.safetensors or {stem}.safetensors.index.json in "
                                  f"{path}; directory holds {found}")

    @property
    def file_of(self) -> dict[str, str]:
        return {k: f.file for k, f in self._of.items()}

    def keys(self):
        return set(self._of)

    def shape(self, key):
        return self._of[key].entries[key][1]

    def dtype(self, key):
        return self._of[key].entries[key][0]

    def get(self, key, index=None):
        return self._of[key].read(key, index)


@dataclasses.dataclass(frozen=True)
class Fused:
    """Tensor `key` is stored as `parts` concatenated on axis 0: (stored key, rows) pairs, a None
    key being rows of zeros that are not stored (LAVIS's absent key bias)."""
    key: str
    parts: tuple[tuple[Optional[str], int], ...]


class FusedSource(KeySource):
    """`base` with each `Fused` tensor presented under its own key instead of its parts."""

    def __init__(self, base: KeySource, fused: Sequence[Fused]):
        self.base, self.name = base, base.name
        self.fused = {f.key: f for f in fused}
        stored = [k for f in fused for k, _ in f.parts if k is not None]
        self._keys = (base.keys() - set(stored)) | set(self.fused)

    def keys(self):
        return set(self._keys)

    def _first(self, f: Fused) -> str:
        return next(k for k, _ in f.parts if k is not None)

    def shape(self, key):
        f = self.fused.get(key)
        if f is None:
            return self.base.shape(key)
        rest = self.base.shape(self._first(f))[1:]
        return (sum(n for _, n in f.parts),) + tuple(rest)

    def dtype(self, key):
        f = self.fused.get(key)
        return self.base.dtype(key if f is None else self._first(f))

    def get(self, key, index=None):
        f = self.fused.get(key)
        if f is None:
            return self.base.get(key, index)
        arrays = [np.zeros((n,) + self.shape(key)[1:], self.dtype(key)) if k is None
                  else self.base.get(k) for k, n in f.parts]
        for (k, n), a in zip(f.parts, arrays):
            if a.shape[0] != n:
                raise MappingError(f"{k}: {a.shape[0]} rows, expected {n} (part of {key})")
        out = np.concatenate(arrays)
        return out if index is None else out[index]


def fuse_present(source: KeySource, fused: Iterable[Fused]) -> KeySource:
    """Wrap `source` with the `Fused` tensors whose stored parts are all present; a partial set
    (e.g. a q_bias without its v_bias) raises MappingError naming the fused key."""
    keys = source.keys()
    use, bad = [], []
    for f in fused:
        stored = [k for k, _ in f.parts if k is not None]
        have = [k in keys for k in stored]
        if all(have):
            if f.key in keys:
                bad.append(f"{f.key} is stored both whole and in parts")
            use.append(f)
        elif any(have):
            bad.append(f"{f.key}: has {[k for k, h in zip(stored, have) if h]}, lacks "
                       f"{[k for k, h in zip(stored, have) if not h]}")
    check_names(f"{source.name}: tensors stored in parts are incomplete:", [("problems", bad)])
    return FusedSource(source, use) if use else source


# ----------------------------------------------------------------------------------------------
# Leaves of our tree, read lazily
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[Optional[int]], np.ndarray]   # read(j): slice j of axis 0; read(None): all
    stacked: bool = False                         # slices are cheap (one source tensor each)
    origin: str = ""

    def value(self) -> np.ndarray:
        return self.read(None)


def _ours_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_to_ours(kind, np.empty(shape, np.uint8)).shape)


def leaves_from_tree(params: Mapping, origin: str = "params") -> dict[str, Leaf]:
    """Leaves over an in-memory (nested) param tree."""
    flat = flatten(params)
    return {k: Leaf(tuple(np.shape(v)), np.dtype(v.dtype),
                    (lambda j, v=v: np.asarray(v if j is None else v[j])),
                    stacked=True, origin=origin) for k, v in flat.items()}


def as_leaves(tree: Mapping) -> dict[str, Leaf]:
    """{leaf: Leaf} as given, or over an in-memory param tree."""
    if tree and all(isinstance(v, Leaf) for v in tree.values()):
        return dict(tree)
    return leaves_from_tree(tree)


def leaves_from_native(source: KeySource) -> dict[str, Leaf]:
    """Leaves of a source whose keys are our "/"-joined leaf names (our native format)."""
    return {k: Leaf(source.shape(k), source.dtype(k), (lambda j, k=k: source.get(k, j)),
                    stacked=True, origin=source.name) for k in source.keys()}


def leaves_from_rules(rules: Sequence[Rule], source: KeySource, *, ignore: Sequence[str] = (),
                      partial: Union[bool, Sequence[str]] = False,
                      shapes: Optional[Mapping[str, tuple]] = None) -> dict[str, Leaf]:
    """Our leaves from a flat source through a key table, read lazily.

    Fails (MappingError, naming every key) on source keys no rule reads (unless a regex in
    `ignore` matches), on layers of one stacked leaf with different shapes, and — unless `partial`
    — on rules whose keys are absent. With `partial`, a rule whose keys are all absent is skipped
    (the leaf must come from another source) while one with only some of its keys fails;
    `partial` a sequence of key prefixes: only rules whose keys start with one of them may be
    absent (a tower file kept apart), every other absent key fails.
    `shapes` ({leaf: shape}, the model's): every source key of a wrong shape is named too (the
    ViT position table may differ in its grid: it is resized later).
    """
    keys = source.keys()
    needed = {k for r in rules for k in r.source_keys()}
    unexpected = sorted(k for k in keys - needed if not any(re.fullmatch(p, k) for p in ignore))
    missing, problems, out = [], [], {}
    for r in rules:
        src = r.source_keys()
        present = [k in keys for k in src]
        if not all(present):
            if not any(present) and (partial is True or (
                    partial and all(k.startswith(tuple(partial)) for k in src))):
                continue
            missing += [k for k, p in zip(src, present) if not p]
            continue
        if shapes is not None and r.ours in shapes and r.ours != "vision/pos_embed":
            want = tuple(shapes[r.ours])[0 if r.layers is None else 1:]
            want = _theirs_shape(r.kind, want)
            bad = [f"{k}: checkpoint {source.shape(k)}, model needs {want} (for {r.ours})"
                   for k in src if tuple(source.shape(k)) != want]
            if bad:
                problems += bad
                continue
        found = {source.shape(k) for k in src}
        if len(found) > 1:
            problems.append(f"{r.theirs}: layers have different shapes {sorted(found)}")
            continue
        shape = _ours_shape(r.kind, next(iter(found)))
        if r.layers is None:
            read = (lambda j, k=src[0], kind=r.kind:
                    _take(_to_ours(kind, source.get(k)), j))
            out[r.ours] = Leaf(shape, source.dtype(src[0]), read, origin=source.name)
        else:
            def read(j, src=src, kind=r.kind):
                if j is None:
                    return np.stack([_to_ours(kind, source.get(k)) for k in src])
                return contiguous(_to_ours(kind, source.get(src[j])))
            out[r.ours] = Leaf((len(src),) + shape, source.dtype(src[0]), read, stacked=True,
                               origin=source.name)
    check_names(f"{source.name} does not match the model's parameters:",
                [("missing keys", sorted(missing)), ("unexpected keys", unexpected),
                 ("wrong shapes", problems)])
    return out


def _take(a: np.ndarray, j: Optional[int]) -> np.ndarray:
    return contiguous(a if j is None else a[j])


def contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous `a`, 0-d arrays kept 0-d (np.ascontiguousarray makes them 1-d). A transposed
    matrix (a torch Linear weight <-> our kernel) is copied in row blocks: ~3x faster than
    numpy's strided copy, which dominates converting a checkpoint."""
    a = np.asarray(a)
    if a.flags.c_contiguous:
        return a
    if a.ndim == 2 and a.flags.f_contiguous and a.size >= 1 << 16:
        src, out = a.T, np.empty(a.shape, a.dtype)
        for i in range(0, src.shape[0], 256):
            out[:, i:i + 256] = src[i:i + 256].T
        return out
    return np.ascontiguousarray(a)


def model_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{leaf: shape} of a model config's parameters (abstract: nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in flatten(blip2_model.abstract_params(cfg)).items()}


def read_tree(leaves: Mapping[str, Leaf]) -> dict:
    """Every leaf read (a nested tree, as `mapping.unflatten`); a tensor holding NaN or inf is
    refused (`check_finite`)."""
    flat = {k: leaf.value() for k, leaf in leaves.items()}
    check_finite({k: (v, leaves[k].origin) for k, v in flat.items()})
    return unflatten(flat)


def nonfinite(a: np.ndarray) -> int:
    """How many NaN / inf entries a floating array holds (0 for other dtypes)."""
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16):
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(np.asarray(a, np.float32))))


def check_finite(arrays: Mapping[str, tuple[np.ndarray, str]]) -> None:
    """CheckpointError naming every parameter ({our path: (array, where it came from)}) that
    holds NaN or inf: weights like these make every output NaN, frozen or trained."""
    bad = [f"{k} ({n} of {np.size(a)} values, from {origin or '?'})"
           for k, (a, origin) in sorted(arrays.items()) if (n := nonfinite(a))]
    if bad:
        raise CheckpointError(f"{len(bad)} parameter(s) hold NaN or inf: " + "; ".join(bad[:20])
                              + (" ..." if len(bad) > 20 else ""))


# ----------------------------------------------------------------------------------------------
# Output tensors
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """One output tensor: its C-order bytes are the concatenation of what `chunks()` yields."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def value(self) -> np.ndarray:
        parts = [np.asarray(c) for c in self.chunks()]
        return (parts[0] if len(parts) == 1 else np.concatenate(
            [p.reshape((-1,) + tuple(self.shape[1:])) for p in parts])).reshape(self.shape)


def _dtype_of(leaf: Leaf, dtype) -> np.dtype:
    return np.dtype(cast(np.empty(0, leaf.dtype), dtype).dtype)


def entries_for_leaves(leaves: Mapping[str, Leaf], dtype=None) -> list[Entry]:
    """Our native layout: one tensor per leaf, a stacked leaf written layer by layer."""
    out = []
    for name, leaf in sorted(leaves.items()):
        if leaf.stacked and leaf.shape:
            chunks = (lambda leaf=leaf: (cast(leaf.read(j), dtype) for j in range(leaf.shape[0])))
        else:
            chunks = (lambda leaf=leaf: [cast(leaf.read(None), dtype)])
        out.append(Entry(name, leaf.shape, _dtype_of(leaf, dtype), chunks))
    return out


def entries_for_rules(rules: Sequence[Rule], leaves: Mapping[str, Leaf], dtype=None,
                      skip: Sequence[str] = ()) -> list[Entry]:
    """A per-key format (HF, LAVIS): one tensor per source key of each rule, read from the leaf
    (one layer at a time for stacked leaves). Every leaf must be covered by a rule and every rule
    must find its leaf, except leaves named in `skip` (dropped on purpose)."""
    covered = {r.ours for r in rules}
    check_names("parameter tree does not match the conversion table:",
                [("parameters with no target key", sorted(set(leaves) - covered - set(skip))),
                 ("table entries with no parameter", sorted(covered - set(leaves)))])
    out = []
    for r in rules:
        leaf = leaves[r.ours]
        if r.layers is None:
            shape = _theirs_shape(r.kind, leaf.shape)
            out.append(Entry(r.theirs, shape, _dtype_of(leaf, dtype),
                             lambda leaf=leaf, kind=r.kind: [_theirs(kind, leaf.read(None), dtype)]))
            continue
        if leaf.shape[0] != len(r.layers):
            raise MappingError(f"{r.ours}: leading axis {leaf.shape[0]} != {len(r.layers)} layers")
        shape = _theirs_shape(r.kind, leaf.shape[1:])
        for j, i in enumerate(r.layers):
            out.append(Entry(r.theirs.format(i=i), shape, _dtype_of(leaf, dtype),
                             lambda leaf=leaf, kind=r.kind, j=j: [_theirs(kind, leaf.read(j),
                                                                          dtype)]))
    return out


def _theirs(kind: str, a: np.ndarray, dtype) -> np.ndarray:
    return contiguous(cast(_to_theirs(kind, a), dtype))


def _theirs_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_to_theirs(kind, np.empty(shape, np.uint8)).shape)


def split_fused(entries: Sequence[Entry], fused: Sequence[Fused]) -> list[Entry]:
    """Entries of fused keys replaced by their stored parts; a None part must be all zeros."""
    by_key = {f.key: f for f in fused}
    out = []
    for e in entries:
        f = by_key.get(e.name)
        if f is None:
            out.append(e)
            continue
        start = 0
        for k, n in f.parts:
            if k is None:
                def check(e=e, start=start, n=n):
                    if np.any(e.value()[start:start + n] != 0):
                        raise MappingError(f"{e.name}: rows {start}..{start + n} are not zero, "
                                           "and the target format cannot store them")
                out.append(Entry("", (0,), e.dtype, lambda check=check: (check(), [])[1]))
            else:
                out.append(Entry(k, (n,) + tuple(e.shape[1:]), e.dtype,
                                 lambda e=e, start=start, n=n: [e.value()[start:start + n]]))
            start += n
    return out


def write_safetensors(path: str, entries: Sequence[Entry], max_shard_bytes: int,
                      stem: str = "model", metadata: Optional[dict] = None) -> list[str]:
    """`{stem}.safetensors`, or `{stem}-0000i-of-0000n.safetensors` + index above
    `max_shard_bytes`; tensors sorted by name, each streamed from its chunks."""
    os.makedirs(path, exist_ok=True)
    entries = sorted((e for e in entries if e.name), key=lambda e: e.name)
    names_seen = [e.name for e in entries]
    if len(set(names_seen)) != len(names_seen):
        dup = sorted({n for n in names_seen if names_seen.count(n) > 1})
        raise MappingError(f"two tensors would be written under one name: {dup}")
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    meta = dict({"format": "np"}, **(metadata or {}))
    if len(shards) == 1:
        name = f"{stem}.safetensors"
        _write_file(os.path.join(path, name), shards[0], meta)
        return [name]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(os.path.join(path, name), shard, meta)
        names.append(name)
        weight_map.update({e.name: name for e in shard})
    with open(os.path.join(path, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(e.nbytes for e in entries)},
                   "weight_map": weight_map}, f, indent=2)
    return names


def _write_file(file: str, entries: Sequence[Entry], metadata: dict) -> None:
    header, offset = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
    for e in entries:
        try:
            code = _ST_NAMES[np.dtype(e.dtype)]
        except KeyError:
            raise MappingError(f"{e.name}: dtype {e.dtype} has no safetensors name") from None
        header[e.name] = {"dtype": code, "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = file + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for e in entries:
                written = 0
                for chunk in e.chunks():
                    chunk = contiguous(chunk)
                    if chunk.dtype != e.dtype:
                        raise MappingError(f"{e.name}: produced {chunk.dtype}, planned {e.dtype}")
                    f.write(chunk.reshape(-1).view(np.uint8).data)
                    written += chunk.nbytes
                if written != e.nbytes:
                    raise MappingError(f"{e.name}: produced {written} bytes, planned {e.nbytes} "
                                       f"(shape {e.shape})")
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def iter_entries(entries: Sequence[Entry]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each entry that has a name, one at a time (for writers taking arrays)."""
    for e in entries:
        if e.name:
            yield e.name, e.value()
        else:
            list(e.chunks())      # a check-only entry (see split_fused)
