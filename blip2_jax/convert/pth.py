"""PyTorch zip checkpoints (`torch.save` since torch 1.6) without torch: safe, streaming.

Reading never executes pickle code: `data.pkl` is unpickled with `find_class` limited to an
allowlist of our own rebuild functions, and tensors come back as `LazyTensor`s that read only
their own bytes (a seek inside the stored zip member), so converting a many-GB LAVIS / HF / EVA
checkpoint holds about one tensor in memory. Writing streams too: each `PthWriter.add` writes its
storage at once, and `data.pkl` (metadata only) is written at `close`. The files load with
`torch.load(weights_only=True)`, with or without `mmap=True`.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Mapping

import ml_dtypes
import numpy as np

__all__ = ["UnsafeCheckpointError", "PthFormatError", "LazyTensor", "load", "state_dict",
           "PthWriter", "save"]


class UnsafeCheckpointError(ValueError):
    """data.pkl names a global that is not on the allowlist (never imported nor called)."""


class PthFormatError(ValueError):
    """Not a readable torch zip checkpoint (legacy format, corrupt, unsupported content)."""


# ----------------------------------------------------------------------------------------------
# dtypes

_BF16 = np.dtype(ml_dtypes.bfloat16)

# `torch.<X>Storage` globals (the storage type in a persistent id; also what we write).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_WRITE_STORAGE = {dt: name for name, dt in _STORAGE_DTYPES.items()
                  if not name.startswith("Complex")}

# `torch.<dtype>` globals: values in the tree (kept as "torch.<name>" strings) and the dtype
# argument of `_rebuild_tensor_v3`, which torch>=2.1 uses for dtypes without a legacy storage
# class (uint16/32/64, float8 formats) over an UntypedStorage of bytes.
_TORCH_DTYPES = {
    "float64": np.dtype(np.float64), "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "bfloat16": _BF16,
    "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "float8_e8m0fnu"):
    if hasattr(ml_dtypes, _name):
        _TORCH_DTYPES[_name] = np.dtype(getattr(ml_dtypes, _name))
# Dtype names allowed as plain values although no tensor of them can be read here.
_OTHER_TORCH_DTYPES = {"complex32", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
                       "float8_e8m0fnu"}

# ----------------------------------------------------------------------------------------------
# reading


class _Archive:
    """Where the storages of one checkpoint live: the file and its stored zip members."""

    def __init__(self, path: str, members: dict[str, zipfile.ZipInfo]):
        self.path = path
        self.members = members
        self._data_offsets: dict[str, int] = {}

    def _open(self):
        # A fresh handle per read: nothing stays open between reads, and reads are independent.
        return open(self.path, "rb")

    def _data_offset(self, f, info: zipfile.ZipInfo) -> int:
        # The central directory does not give where the data starts: the local header's extra
        # field (torch pads it for 64-byte alignment) may differ from the central one.
        off = self._data_offsets.get(info.filename)
        if off is None:
            f.seek(info.header_offset)
            hdr = f.read(30)
            if len(hdr) != 30 or hdr[:4] != b"PK\x03\x04":
                raise PthFormatError(f"{self.path}: corrupt zip local header for "
                                     f"{info.filename!r}")
            name_len, extra_len = struct.unpack("<HH", hdr[26:30])
            off = info.header_offset + 30 + name_len + extra_len
            self._data_offsets[info.filename] = off
        return off

    def read(self, member: str, start: int, out: np.ndarray) -> None:
        """Fills `out` (uint8) with bytes [start, start + out.size) of the stored `member`."""
        info = self.members[member]
        with self._open() as f:
            f.seek(self._data_offset(f, info) + start)
            got = f.readinto(memoryview(out))
        if got != out.size:
            raise PthFormatError(f"{self.path}: {member!r} is truncated (wanted {out.size} bytes "
                                 f"at {start}, got {got})")


class _StorageType:
    """What find_class returns for `torch.<X>Storage` / `torch.storage.UntypedStorage`."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype


class _Storage:
    """A persistent-id storage: one `data/<key>` member; numel counts `dtype` elements."""

    def __init__(self, archive: _Archive, member: str, dtype: np.dtype, numel: int):
        self.archive, self.member, self.dtype, self.numel = archive, member, dtype, numel


class LazyTensor:
    """One tensor of a checkpoint, not yet read: `numpy()` reads only its own bytes."""

    __slots__ = ("shape", "dtype", "_storage", "_offset", "_strides")

    def __init__(self, storage: _Storage, offset: int, shape, strides, dtype: np.dtype):
        self._storage, self.dtype = storage, dtype
        self._offset, self.shape, self._strides = offset, tuple(shape), tuple(strides)
        nbytes = storage.numel * storage.dtype.itemsize
        start, length = self._span()
        if self.size and start + length > nbytes:
            raise PthFormatError(
                f"{storage.archive.path}: tensor (offset {offset}, shape {self.shape}, stride "
                f"{self._strides}) reaches past its storage {storage.member!r} ({nbytes} bytes)")

    def __setstate__(self, state):
        # Refuse pickle BUILD on a tensor: it could only overwrite our fields.
        raise PthFormatError("data.pkl tries to set state on a tensor")

    def __reduce__(self):
        # copy/deepcopy/pickle (e.g. to worker processes) rebuild through __init__, not BUILD.
        return LazyTensor, (self._storage, self._offset, self.shape, self._strides, self.dtype)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _span(self) -> tuple[int, int]:
        """(first byte, byte length) of the storage bytes the elements cover."""
        item = self.dtype.itemsize
        last = self._offset + sum((n - 1) * s for n, s in zip(self.shape, self._strides))
        return self._offset * item, (last - self._offset + 1) * item

    def numpy(self) -> np.ndarray:
        """This tensor as a new C-contiguous array, reading only the span its elements cover."""
        if self.size == 0:
            return np.empty(self.shape, self.dtype)
        start, length = self._span()
        buf = np.empty(length, np.uint8)
        self._storage.archive.read(self._storage.member, start, buf)
        flat = buf.view(self.dtype)
        contiguous = _c_strides(self.shape)
        if all(s == c for n, s, c in zip(self.shape, self._strides, contiguous) if n > 1):
            return flat.reshape(self.shape)  # the span is exactly the tensor: no second copy
        item = self.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat, self.shape, tuple(s * item for s in self._strides), writeable=False)
        return view.copy(order="C")

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def _c_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_tuple(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in x):
        raise PthFormatError(f"data.pkl: bad tensor {what} {x!r}")
    return tuple(x)


def _make_tensor(storage, offset, size, stride, dtype) -> LazyTensor:
    if not isinstance(storage, _Storage):
        raise PthFormatError(f"data.pkl: tensor storage is a {type(storage).__name__}")
    if not _is_int(offset) or offset < 0:
        raise PthFormatError(f"data.pkl: bad storage offset {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise PthFormatError(f"data.pkl: size {size} and stride {stride} differ in rank")
    return LazyTensor(storage, offset, size, stride, dtype)


# The only callables data.pkl can reach. Each checks its arguments (they come from the file).

def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # Legacy typed storage: its class gives the dtype. requires_grad/hooks/metadata don't matter
    # for weights.
    return _make_tensor(storage, storage_offset, size, stride,
                        storage.dtype if isinstance(storage, _Storage) else None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    # torch>=2.1 for dtypes without a legacy storage class: bytes storage + explicit dtype.
    if not isinstance(dtype, str) or dtype not in _TORCH_DTYPE_OF:
        raise PthFormatError(f"data.pkl: tensor dtype {dtype!r} is not supported")
    return _make_tensor(storage, storage_offset, size, stride, _TORCH_DTYPE_OF[dtype])


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    # nn.Parameter: the tensor itself (also `_rebuild_parameter_with_state`, state dropped).
    if not isinstance(data, LazyTensor):
        raise PthFormatError(f"data.pkl: parameter data is a {type(data).__name__}")
    return data


class _TensorClass:
    """`torch.Tensor` / `torch.nn.Parameter` as the type argument of _rebuild_from_type_v2."""


_TENSOR_CLASS = _TensorClass()


def _rebuild_from_type_v2(func, new_type, args, state):
    # A tensor carrying Python attributes: rebuild the tensor, drop the attributes.
    if func not in _REBUILD_FUNCS or new_type is not _TENSOR_CLASS or not isinstance(args, tuple):
        raise PthFormatError("data.pkl: unsupported _rebuild_from_type_v2 call")
    return func(*args)


_REBUILD_FUNCS = (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


class _Dict(dict):
    """OrderedDict while unpickling: accepts (and drops) the BUILD state of a state_dict
    (`_metadata`, module versions); turned into a plain dict afterwards."""

    def __setstate__(self, state):
        pass


def _ordered_dict(*args):
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple, dict))):
        raise PthFormatError("data.pkl: bad OrderedDict arguments")
    return _Dict(*args)


def _torch_size(dims=()):
    return _int_tuple(dims, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or _is_int(index)):
        raise PthFormatError(f"data.pkl: bad torch.device{(kind, index)!r}")
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding):
    # How protocol 2 pickles bytes; latin-1 only (anything else is no bytes object of ours).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PthFormatError("data.pkl: bad _codecs.encode call")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:
        raise PthFormatError("data.pkl: bad bytes() call")
    return b""


_TORCH_DTYPE_OF = {f"torch.{name}": dt for name, dt in _TORCH_DTYPES.items()}

_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "Tensor"): _TENSOR_CLASS,
    ("torch", "Tensor"): _TENSOR_CLASS,
    ("torch.nn.parameter", "Parameter"): _TENSOR_CLASS,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
}
_ALLOWED.update({("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", name): f"torch.{name}"
                 for name in set(_TORCH_DTYPES) | _OTHER_TORCH_DTYPES})


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, archive: _Archive, prefix: str):
        super().__init__(file, encoding="utf-8")
        self._path, self._archive, self._prefix = path, archive, prefix

    def find_class(self, module, name):
        # Called for every GLOBAL/STACK_GLOBAL/EXT opcode: the only way a pickle reaches code.
        # Python-2 names first (protocol 2 writes `__builtin__`), as the default find_class does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        hint = (" (a torch feature this reader does not support, e.g. quantized or sparse "
                "tensors, or a malicious file)" if str(module).startswith("torch") else
                "; the file may be malicious")
        raise UnsafeCheckpointError(
            f"{self._path}: data.pkl references the global '{module}.{name}', which is not on "
            f"the allowlist{hint}. Refusing to load it; nothing was executed.")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel): torch's reference to data/<key>.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PthFormatError(f"{self._path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise PthFormatError(f"{self._path}: bad storage type {stype!r}")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise PthFormatError(f"{self._path}: bad storage reference {pid!r}")
        member = f"{self._prefix}data/{key}"
        info = self._archive.members.get(member)
        if info is None:
            raise PthFormatError(f"{self._path}: storage member {member!r} is missing")
        if info.file_size < numel * stype.dtype.itemsize:
            raise PthFormatError(f"{self._path}: storage member {member!r} has {info.file_size} "
                                 f"bytes, expected {numel * stype.dtype.itemsize}")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            # torch always stores; seeking inside a compressed member would mean reading it all.
            raise PthFormatError(f"{self._path}: storage member {member!r} is compressed or "
                                 f"encrypted; re-save the checkpoint with torch.save")
        return _Storage(self._archive, member, stype.dtype, numel)


def _plain(obj, memo: dict):
    """The unpickled tree with our dict subclass as plain dicts (memo: shared/cyclic parts)."""
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in memo:
            return memo[id(obj)]
        if isinstance(obj, dict):
            out = memo[id(obj)] = {}
            for k, v in obj.items():
                out[_plain(k, memo)] = _plain(v, memo)
            return out
        if isinstance(obj, list):
            out = memo[id(obj)] = []
            out.extend(_plain(v, memo) for v in obj)
            return out
        out = memo[id(obj)] = tuple(_plain(v, memo) for v in obj)
        return out
    if isinstance(obj, _Storage):
        # A storage saved by itself (not through a tensor): its elements as a 1-D tensor.
        return LazyTensor(obj, 0, (obj.numel,), (1,), obj.dtype)
    return obj


def _not_zip_error(path: str) -> PthFormatError:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return PthFormatError(f"{path}: truncated or corrupt zip archive (an incomplete "
                              f"torch.save / download?)")
    if head.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19") or \
            tarfile.is_tarfile(path):
        return PthFormatError(f"{path}: legacy (pre-1.6, non-zip) torch.save format, which "
                              f"this reader does not support; re-save it with torch>=1.6 "
                              f"(torch.save(torch.load(f), f2))")
    if head.startswith(b"\x80"):
        return PthFormatError(f"{path}: a bare pickle, not a torch zip checkpoint (if torch<1.6 "
                              f"wrote it, re-save it with torch>=1.6)")
    return PthFormatError(f"{path}: not a PyTorch checkpoint (not a zip archive)")


def load(path) -> object:
    """The checkpoint's object tree with tensors as LazyTensor (only allowlisted globals)."""
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _not_zip_error(path) from None
    with zf:
        infos = zf.infolist()
        if any(i.filename.endswith("/constants.pkl") for i in infos):
            raise PthFormatError(f"{path}: a TorchScript archive (torch.jit.save), not a "
                                 f"torch.save checkpoint")
        pkls = [i.filename for i in infos
                if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pkls) != 1:
            raise PthFormatError(f"{path}: zip archive with {len(pkls)} <archive>/data.pkl "
                                 f"members; not a torch checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        members = {i.filename: i for i in infos}
        try:
            if prefix + "byteorder" in members:
                order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
                if order != "little":
                    raise PthFormatError(f"{path}: byteorder is {order!r}; only little-endian "
                                         f"checkpoints are supported")
            data = zf.read(pkls[0])  # metadata only; zipfile checks its CRC
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise PthFormatError(f"{path}: corrupt zip archive: {e}") from e
    archive = _Archive(path, members)
    try:
        obj = _SafeUnpickler(io.BytesIO(data), path, archive, prefix).load()
    except UnsafeCheckpointError:
        raise
    except PthFormatError as e:  # from a rebuild function: say which file
        if str(e).startswith(path):
            raise
        raise PthFormatError(f"{path}: {e}") from None
    except Exception as e:  # malformed pickle: whatever the unpickler raised
        raise PthFormatError(f"{path}: corrupt data.pkl: {type(e).__name__}: {e}") from e
    return _plain(obj, {})


def _tensor_dict(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, LazyTensor) for v in d.values())


def state_dict(path, key: str | None = None) -> dict[str, LazyTensor]:
    """The flat {name: LazyTensor}: the top level, or obj[key], or obj model/state_dict/module."""
    path = os.fspath(path)
    obj = load(path)
    if key is None and _tensor_dict(obj):
        chosen, where = obj, "the top-level dict"
    else:
        if not isinstance(obj, dict):
            raise PthFormatError(f"{path}: the checkpoint is a {type(obj).__name__}, not a dict")
        if key is not None:
            if key not in obj:
                raise PthFormatError(f"{path}: no entry {key!r}; top-level keys: {list(obj)}")
            candidates = [key]
        else:
            # LAVIS: {"model": sd, "optimizer": ..., "config": ..., "epoch": ...}; others use
            # "state_dict" (Lightning) or "module" (DeepSpeed). A dict holding any tensor counts.
            candidates = [k for k in ("model", "state_dict", "module")
                          if isinstance(obj.get(k), dict)
                          and any(isinstance(v, LazyTensor) for v in obj[k].values())]
            if not candidates:
                raise PthFormatError(f"{path}: no state dict found: the top level is no dict of "
                                     f"tensors and has none of 'model', 'state_dict', 'module' "
                                     f"holding tensors; top-level keys: {list(obj)}")
        chosen, where = obj[candidates[0]], f"entry {candidates[0]!r}"
        if not isinstance(chosen, dict):
            raise PthFormatError(f"{path}: {where} is a {type(chosen).__name__}, not a dict")
    bad = [k for k, v in chosen.items() if not isinstance(v, LazyTensor)]
    if bad:
        raise PthFormatError(f"{path}: {where} has non-tensor values: "
                             f"{', '.join(f'{k!r} ({type(chosen[k]).__name__})' for k in bad)}")
    bad_keys = [k for k in chosen if not isinstance(k, str)]
    if bad_keys:
        raise PthFormatError(f"{path}: {where} has non-string keys: {bad_keys}")
    return dict(chosen)


# ----------------------------------------------------------------------------------------------
# writing

_ALIGN = 64  # torch's storage alignment: lets torch.load(mmap=True) map storages in place
_CHUNK = 16 << 20
_ARCHIVE = "archive"  # the folder name torch uses for file-like targets; readers don't care
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: identical inputs give identical files


class _Global:
    """A `module name` reference written as a GLOBAL opcode without importing it (no torch)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce__(self):
        return self.name  # a string makes the pickler call save_global

    def __call__(self, *args):  # save_reduce requires a callable; never called
        raise TypeError("placeholder")


_G_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_G_STORAGE = {name: _Global("torch", name) for name in _WRITE_STORAGE.values()}


class _StorageRef:
    def __init__(self, storage_type: str, key: str, numel: int):
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _TensorRef:
    """Pickles as torch does: _rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        return (_G_REBUILD, (self.storage, 0, self.shape, _c_strides(self.shape), False,
                             collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):
    # The pure-Python pickler, because only it lets save_global be overridden: the C one would
    # import torch._utils to check the names.
    def save_global(self, obj, name=None):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _G_STORAGE[obj.storage_type], obj.key, "cpu", obj.numel)
        return None


def _check_plain(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"extra {where}: key {k!r} is not a str/int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"extra {where}: {type(value).__name__} is not plain python "
                    f"(int/float/str/bool/None/list/tuple/dict)")


class PthWriter:
    """Streams a torch zip checkpoint: `add` writes each tensor now, `close` writes data.pkl.

    The saved object is {wrap: OrderedDict(tensors), **extra} (LAVIS layout), or the bare
    OrderedDict when wrap is None. Written to path + ".tmp" and renamed by a successful close.
    """

    def __init__(self, path, wrap: str | None = "model", extra: dict | None = None):
        self.path = os.fspath(path)
        extra = dict(extra or {})
        if wrap is None and extra:
            raise ValueError("extra needs wrap (a bare state dict has no room for it)")
        if wrap is not None and wrap in extra:
            raise ValueError(f"extra has the key {wrap!r}, which wrap uses")
        for k, v in extra.items():
            if not isinstance(k, str):
                raise TypeError(f"extra key {k!r} is not a str")
            _check_plain(v, repr(k))
        self.wrap, self.extra = wrap, extra
        self._tensors: dict[str, _TensorRef] = {}
        self._tmp = self.path + ".tmp"
        self._file = open(self._tmp, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _write_member(self, name: str, data: memoryview, nbytes: int, align: bool):
        info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = nbytes
        # zipfile's own rule for a zip64 local header when the size is known up front.
        zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT
        if align:
            # Pad the local header like torch (an "FB" extra field of 'Z's) so the data starts
            # on a 64-byte boundary; the extra field has a 4-byte header, hence the +4.
            start = self._file.seek(0, os.SEEK_END)
            header = 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
            pad = -(start + header) % _ALIGN
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        with self._zip.open(info, "w", force_zip64=zip64) as w:
            if align and self._file.tell() % _ALIGN:
                raise AssertionError(f"{name}: data at {self._file.tell()} is not aligned")
            for i in range(0, nbytes, _CHUNK):
                w.write(data[i:i + _CHUNK])
        # Central directory without the padding (as torch writes it); the local header, with
        # the padding, is already final.
        info.extra = b""

    def add(self, name: str, array: np.ndarray) -> None:
        """Writes this tensor's storage now; keeps only its name, dtype and shape."""
        if self._done:
            raise ValueError(f"{self.path}: writer is closed")
        if not isinstance(name, str):
            raise TypeError(f"tensor name {name!r} is not a str")
        if name in self._tensors:
            raise ValueError(f"tensor {name!r} added twice")
        a = np.asarray(array)
        storage_type = _WRITE_STORAGE.get(a.dtype.newbyteorder("="))
        if storage_type is None:
            raise TypeError(f"{name}: dtype {a.dtype} is not supported (float32/float16/bfloat16/"
                            f"float64/int64/int32/int16/int8/uint8/bool)")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))  # torch storages are little-endian here
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        key = str(len(self._tensors))
        data = memoryview(a.reshape(-1).view(np.uint8))
        self._write_member(f"{_ARCHIVE}/data/{key}", data, a.nbytes, align=True)
        self._tensors[name] = _TensorRef(_StorageRef(storage_type, key, a.size), a.shape)

    def close(self) -> None:
        """Writes data.pkl, byteorder and version, then renames the file into place."""
        if self._done:
            return
        try:
            sd = collections.OrderedDict(self._tensors)
            obj = sd if self.wrap is None else {self.wrap: sd, **self.extra}
            buf = io.BytesIO()
            _TorchPickler(buf, protocol=2).dump(obj)  # torch's protocol
            # No ".format_version": it tells torch storages follow miniz's exact layout (data
            # right after data.pkl, sizes in descriptors), which this writer does not produce;
            # without it torch takes every offset from the zip directory.
            for member, payload, align in (("data.pkl", buf.getvalue(), False),
                                           ("byteorder", b"little", False),
                                           ("version", b"3\n", False)):
                self._write_member(f"{_ARCHIVE}/{member}", memoryview(payload), len(payload),
                                   align)
            self._zip.close()
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Drops the partial file; nothing is left at path (nor path + ".tmp")."""
        if self._done:
            return
        self._done = True
        try:
            self._zip.close()  # only to release zipfile's state; the file is deleted below
        except Exception:
            pass
        self._file.close()
        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass


def save(path, tensors: Mapping[str, np.ndarray], wrap: str | None = "model",
         extra: dict | None = None) -> None:
    """Writes `tensors` as a torch checkpoint ({wrap: tensors, **extra}, or bare if wrap=None)."""
    with PthWriter(path, wrap=wrap, extra=extra) as w:
        for name, array in tensors.items():
            w.add(name, array)
