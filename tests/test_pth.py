"""blip2_jax.convert.pth: torch-free, safe, streaming .pth reader/writer, against torch itself."""
import collections
import copy
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch     # the reference (requirements-test.txt); pth.py itself never imports it

from blip2_jax.convert import pth


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, bit-exact (bf16/float8/uint16 through same-size int views)."""
    t = t.detach().contiguous()
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.uint16: (torch.int16, np.uint16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    if t.dtype in special:
        view, np_dtype = special[t.dtype]
        return t.view(view).numpy().view(np_dtype)
    return t.numpy()


def assert_bits_equal(a: np.ndarray, b: np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.flags.c_contiguous and b.flags.c_contiguous
    assert a.tobytes() == b.tobytes()


def rand_tensors():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(6, 5, generator=g)
    shared = torch.arange(10, dtype=torch.float32)
    return collections.OrderedDict(
        fp32=torch.randn(3, 4, generator=g),
        fp16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 3, generator=g).bfloat16(),
        i64=torch.tensor([-(2**62), 5, 2**40 + 3]),
        flag=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        transposed=torch.randn(3, 5, generator=g).t(),
        view=big[2:4, 1:4],           # offset + non-contiguous rows inside a bigger storage
        share_a=shared[:4],
        share_b=shared[3:].view(7, 1),  # same storage as share_a, other offset
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    )


def test_reads_torch_save_bit_exact(tmp_path):
    tensors = rand_tensors()
    p = tmp_path / "lavis.pth"
    torch.save({"model": tensors, "epoch": 3, "config": {"a": [1, 2.5, "x", None]}}, p)

    obj = pth.load(p)
    assert obj["epoch"] == 3 and obj["config"] == {"a": [1, 2.5, "x", None]}
    assert type(obj["model"]) is dict and list(obj["model"]) == list(tensors)
    sd = pth.state_dict(p)  # picks "model"
    assert list(sd) == list(tensors)
    for name, t in tensors.items():
        lazy = sd[name]
        assert isinstance(lazy, pth.LazyTensor)
        assert lazy.shape == tuple(t.shape) and lazy.nbytes == t.numel() * t.element_size()
        assert_bits_equal(lazy.numpy(), to_numpy(t))
        assert_bits_equal(obj["model"][name].numpy(), to_numpy(t))
    assert sd["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert sd["scalar"].numpy().shape == ()
    # the two views really share one storage member
    assert sd["share_a"]._storage.member == sd["share_b"]._storage.member


def test_torch_pickle_variants(tmp_path):
    """bare state_dict with _metadata (BUILD), _rebuild_tensor_v3 dtypes, a tensor with Python
    attributes (_rebuild_from_type_v2), torch.device/dtype/Size, bytes, a bare storage."""
    lin = torch.nn.Linear(3, 2)
    p = tmp_path / "bare.bin"
    torch.save(lin.state_dict(), p)  # what HF pytorch_model.bin / EVA files are
    sd = pth.state_dict(p)
    assert list(sd) == ["weight", "bias"]
    assert_bits_equal(sd["weight"].numpy(), to_numpy(lin.weight))

    attr = torch.arange(4.0)
    attr.note = "hi"
    v3 = {"u16": torch.tensor([1, 65535], dtype=torch.uint16),
          "f8": torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
          "f8b": torch.tensor([1.5, 4.0], dtype=torch.float8_e5m2)}
    p2 = tmp_path / "misc.pth"
    torch.save({"model": {"attr": attr, **v3}, "dev": torch.device("cuda", 1),
                "cpu": torch.device("cpu"), "dt": torch.bfloat16, "size": torch.Size([2, 3]),
                "blob": b"\x00\xffab", "empty": b"", "raw": torch.arange(3, dtype=torch.uint8)
                .untyped_storage()}, p2)
    obj = pth.load(p2)
    assert (obj["dev"], obj["cpu"], obj["dt"], obj["size"]) == ("cuda:1", "cpu", "torch.bfloat16",
                                                                (2, 3))
    assert obj["blob"] == b"\x00\xffab" and obj["empty"] == b""
    assert_bits_equal(obj["raw"].numpy(), np.arange(3, dtype=np.uint8))
    sd = pth.state_dict(p2)
    assert_bits_equal(sd["attr"].numpy(), to_numpy(attr))
    for name, t in v3.items():
        assert_bits_equal(sd[name].numpy(), to_numpy(t))


def test_state_dict_selection_errors(tmp_path):
    p = tmp_path / "mixed.pth"
    torch.save({"model": {"w": torch.zeros(2), "step": 7}, "epoch": 1}, p)
    with pytest.raises(pth.PthFormatError, match=r"'step' \(int\)"):
        pth.state_dict(p)
    p2 = tmp_path / "none.pth"
    torch.save({"weights": {"w": torch.zeros(2)}, "epoch": 1}, p2)
    with pytest.raises(pth.PthFormatError, match=r"none\.pth.*top-level keys: \['weights', 'epoch'\]"):
        pth.state_dict(p2)
    assert list(pth.state_dict(p2, key="weights")) == ["w"]


def np_tensors():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "f64": rng.standard_normal(3),
        "i64": np.array([-(2**62), 5, 2**40 + 3], np.int64),
        "i32": np.array([-7, 2**31 - 1], np.int32),
        "i16": np.array([-3, 300], np.int16),
        "i8": np.array([-128, 127], np.int8),
        "u8": np.array([0, 255], np.uint8),
        "flag": np.array([[True, False]]),
        "scalar": np.array(1.25, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": rng.standard_normal((4, 3)).astype(np.float32).T,  # non-contiguous input
    }


def data_offsets(path):
    """Where each data/<key> member's bytes start in the file (from its local header)."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset)
                hdr = f.read(30)
                n, m = struct.unpack("<HH", hdr[26:30])
                out[info.filename] = info.header_offset + 30 + n + m
    return out


@pytest.mark.parametrize("wrap", ["model", None])
def test_writer_loads_in_torch(tmp_path, wrap):
    arrays = np_tensors()
    extra = {"epoch": 3, "config": {"a": [1, 2.5, "x", None], "b": True}} if wrap else None
    p = tmp_path / "ours.pth"
    pth.save(p, arrays, wrap=wrap, extra=extra)
    offsets = data_offsets(p)
    assert len(offsets) == len(arrays) and all(o % 64 == 0 for o in offsets.values())
    for kwargs in ({}, {"mmap": True}):
        obj = torch.load(p, weights_only=True, **kwargs)
        if wrap:
            assert {k: v for k, v in obj.items() if k != wrap} == extra
            obj = obj[wrap]
        assert isinstance(obj, collections.OrderedDict) and list(obj) == list(arrays)
        for name, a in arrays.items():
            assert_bits_equal(to_numpy(obj[name]), np.ascontiguousarray(a) if a.ndim else a)


def test_writer_reader_round_trip(tmp_path):
    arrays = np_tensors()
    p = tmp_path / "rt.pth"
    with pth.PthWriter(p, extra={"epoch": 2}) as w:
        for name, a in arrays.items():
            w.add(name, a)
    assert not os.path.exists(str(p) + ".tmp")
    obj = pth.load(p)
    assert obj["epoch"] == 2
    sd = pth.state_dict(p)
    assert list(sd) == list(arrays)
    for name, a in arrays.items():
        assert_bits_equal(sd[name].numpy(), np.ascontiguousarray(a) if a.ndim else a)
    assert_bits_equal(copy.deepcopy(sd)["f32"].numpy(), arrays["f32"])  # copyable, still lazy
    p2 = tmp_path / "bare.pth"
    pth.save(p2, arrays, wrap=None)
    assert list(pth.state_dict(p2)) == list(arrays)


def test_writer_exception_leaves_no_file(tmp_path):
    p = tmp_path / "out.pth"
    with pytest.raises(RuntimeError, match="boom"):
        with pth.PthWriter(p) as w:
            w.add("a", np.ones(4, np.float32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="not supported"):
        with pth.PthWriter(p) as w:
            w.add("a", np.ones(2, np.uint32))
    assert os.listdir(tmp_path) == []


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Evil(marker)}, p)
    for fn in (pth.load, pth.state_dict):
        with pytest.raises(pth.UnsafeCheckpointError, match=r"(posix|os)\.system") as e:
            fn(p)
        assert "malicious" in str(e.value) and "evil.pth" in str(e.value)
    assert not marker.exists()

    # builtins.eval, through torch.save (GLOBAL '__builtin__ eval') and through a protocol-4
    # pickle (STACK_GLOBAL) placed as data.pkl of a hand-made archive.
    p2 = tmp_path / "eval.pth"
    torch.save({"x": EvilEval(marker)}, p2)
    p3 = tmp_path / "eval4.pth"
    with zipfile.ZipFile(p3, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": EvilEval(marker)}, protocol=4))
        zf.writestr("archive/version", "3\n")
    for path in (p2, p3):
        with pytest.raises(pth.UnsafeCheckpointError, match=r"builtins\.eval"):
            pth.load(path)
    assert not marker.exists()


def test_bad_files(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(pth.PthFormatError, match=r"legacy\.pth.*legacy.*torch>=1\.6"):
        pth.load(legacy)

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(pth.PthFormatError, match=r"truncated\.pth.*truncated"):
        pth.load(truncated)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(pth.PthFormatError, match=r"notes\.txt.*not a PyTorch checkpoint"):
        pth.load(text)

    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("a.txt", "x")
    with pytest.raises(pth.PthFormatError, match=r"other\.zip"):
        pth.load(other_zip)

    def rewrite(name, member_suffix, new_payload):
        out = tmp_path / name
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                payload = src.read(info)
                dst.writestr(info.filename, new_payload(payload)
                             if info.filename.endswith(member_suffix) else payload)
        return out

    # a storage member shorter than the tensor needs (data.pkl kept, data/0 cut)
    with pytest.raises(pth.PthFormatError, match=r"short\.pth.*data/0"):
        pth.load(rewrite("short.pth", "data/0", lambda b: b[:10]))
    with pytest.raises(pth.PthFormatError, match=r"big\.pth.*little-endian"):
        pth.load(rewrite("big.pth", "/byteorder", lambda b: b"big"))


class CountingFile:
    """A file that records the size of every read."""

    def __init__(self, f, log):
        self._f, self._log = f, log

    def read(self, n=-1):
        b = self._f.read(n)
        self._log.append(len(b))
        return b

    def readinto(self, buf):
        n = self._f.readinto(buf)
        self._log.append(n)
        return n

    def seek(self, *a):
        return self._f.seek(*a)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_reads_only_the_tensor_bytes(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    big = {f"t{i}": torch.randn(64, 256, generator=g) for i in range(4)}  # 64 KiB each
    p = tmp_path / "big.pth"
    torch.save(big, p)

    log = []
    real_open = pth._Archive._open
    monkeypatch.setattr(pth._Archive, "_open", lambda self: CountingFile(real_open(self), log))
    sd = pth.state_dict(p)
    assert log == []  # loading reads the zip directory and data.pkl only, no tensor data

    a = sd["t2"].numpy()
    assert_bits_equal(a, to_numpy(big["t2"]))
    assert log == [30, sd["t2"].nbytes]  # the member's local header, then exactly the tensor
    assert sum(log) < os.path.getsize(p) // 3

    # a view reads only its own span: rows 10..12 of t3
    p2 = tmp_path / "view.pth"
    torch.save({"rows": big["t3"][10:13]}, p2)
    log.clear()
    rows = pth.state_dict(p2)["rows"]
    assert_bits_equal(rows.numpy(), to_numpy(big["t3"][10:13]))
    assert log == [30, 3 * 256 * 4]
