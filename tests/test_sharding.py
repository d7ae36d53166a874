"""blip2_jax.sharding on 8 fake CPU devices (conftest.py): meshes, rules, shardings, SPMD parity."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from blip2_jax import Blip2, sharding as S
from blip2_jax.config import get_preset
from blip2_jax.models import blip2 as blip2_model

TINY = ["tiny-stage1", "tiny-opt", "tiny-t5", "tiny-llama"]
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


def mesh_of(shape):
    return S.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))


def flat(tree, is_leaf=None):
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_mesh_shapes(shape):
    mesh = mesh_of(shape)
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_minus_one():
    assert dict(S.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(S.make_mesh({"data": 2, "fsdp": -1, "tensor": 2}).shape) == \
        {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(S.make_mesh({"fsdp": -1, "tensor": 4}).shape) == {"fsdp": 2, "tensor": 4}
    assert dict(S.make_mesh({"data": -1}, devices=jax.devices()[:4]).shape) == {"data": 4}


@pytest.mark.parametrize("axes, name", [
    ({"data": -1, "fsdp": 3, "tensor": 1}, "data"),      # -1 cannot absorb 8 / 3
    ({"data": 2, "fsdp": 3, "tensor": 1}, "fsdp"),       # product 6 != 8
    ({"data": 4, "fsdp": 4, "tensor": 1}, "data"),       # product 16 != 8
    ({"data": -1, "fsdp": -1}, "data"),                  # two -1
    ({"data": 0, "fsdp": -1}, "data"),                   # non-positive
])
def test_mesh_bad_sizes_name_the_axis(axes, name):
    with pytest.raises(ValueError, match=repr(name)):
        S.make_mesh(axes)


def test_mesh_dcn_shapes_on_cpu():
    # One process, no slice_index: the hybrid path only builds with one slice (shape checks only).
    mesh = S.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}, dcn={"data": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    mesh = S.make_mesh({"data": 2, "fsdp": -1}, dcn={"data": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="'data'"):
        S.make_mesh({"data": -1, "fsdp": 1}, dcn={"data": 2})     # 2 slices wanted, 1 present
    with pytest.raises(ValueError, match="pipe"):
        S.make_mesh({"data": -1}, dcn={"pipe": 1})


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------
def test_resolve_spec_rules():
    mesh = mesh_of((2, 2, 2))
    r = S.resolve_spec
    assert r(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert r(("embed", "mlp"), (32, 37), mesh) == P("fsdp", None)          # 37 % 2: replicated
    assert r(("embed", "embed"), (32, 32), mesh) == P("fsdp", None)        # fsdp used once
    assert r(("layers", "norm"), (4, 32), mesh) == P(None, None)
    assert r(("batch", None), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert r(("batch", None), (6, 5), mesh) == P("data", None)             # trailing axis dropped
    assert r(("batch", None), (3, 5), mesh) == P(None, None)
    assert r(("unknown", None), (8, 8), mesh) == P(None, None)
    # Candidates in order; a used or non-dividing candidate passes to the next one.
    rules = (("a", "fsdp"), ("b", "fsdp"), ("b", "tensor"), ("c", ("tensor", "data")))
    assert r(("a", "b"), (4, 4), mesh, rules) == P("fsdp", "tensor")
    assert r(("c",), (8,), mesh, rules) == P(("tensor", "data"))
    # Axes the mesh lacks are ignored.
    assert r(("batch", "embed"), (8, 8), S.make_mesh({"data": -1})) == P("data", None)


def test_model_names_all_have_rules():
    names = {n for cfg in TINY for spec in flat(S.logical_specs(cfg), S._is_spec).values()
             for n in spec if n is not None}
    assert names == {"embed", "heads", "kv_heads", "mlp", "vocab", "layers", "norm"}
    assert names <= {n for n, _ in S.DEFAULT_RULES}


@pytest.mark.parametrize("name", TINY)
def test_tiny_param_shardings_follow_rules(name):
    expected_shapes = flat(blip2_model.abstract_params(get_preset(name)))
    logical = flat(S.logical_specs(name), S._is_spec)
    assert set(logical) == set(expected_shapes)
    rule = dict(S.DEFAULT_RULES)
    for shape in [(2, 2, 2), (1, 4, 2), (8, 1, 1), (1, 8, 1)]:
        mesh = mesh_of(shape)
        shardings = flat(S.param_shardings(name, mesh))
        assert set(shardings) == set(expected_shapes)
        sharded_dims = 0
        for path, sh in shardings.items():
            dims = expected_shapes[path].shape
            spec = tuple(sh.spec)
            assert isinstance(sh, NamedSharding) and sh.mesh.shape == mesh.shape
            assert len(spec) == len(dims), path
            names = tuple(logical[path]) + (None,) * (len(dims) - len(logical[path]))
            used = set()
            for n, d, entry in zip(names, dims, spec):
                want = rule.get(n) if n is not None else None
                if want is None or want in used or d % mesh.shape[want]:
                    assert entry is None, (path, n, d, spec)
                else:
                    assert entry == want, (path, n, d, spec)
                    used.add(want)
                    sharded_dims += mesh.shape[want] > 1
            sh.shard_shape(dims)        # raises if a dimension does not divide
        if shape != (8, 1, 1):
            assert sharded_dims > 0
    # The concrete cases the rules are about on (1, 4, 2): embed 32 over fsdp=4, mlp 37 replicated,
    # vocab 100 over tensor=2.
    s = flat(S.param_shardings(name, mesh_of((1, 4, 2))))
    assert s["vision/layers/mlp/fc1/kernel"].spec == P(None, "fsdp", None)
    assert s["vision/layers/attn/qkv/kernel"].spec == P(None, "fsdp", "tensor")
    assert s["ln_vision/scale"].spec == P(None)
    if name == "tiny-opt":
        assert s["llm/embed_tokens/embedding"].spec == P("tensor", "fsdp")
    if name == "tiny-llama":   # 2 KV heads x 8 over tensor=2: each device keeps whole KV heads
        assert s["llm/layers/attn/key/kernel"].spec == P(None, "fsdp", "tensor")
        assert s["llm/layers/mlp/gate/kernel"].spec == P(None, "fsdp", None)     # 37 % 2
    if name == "tiny-stage1":
        assert s["lm_head/transform/kernel"].spec == P("fsdp", None)     # ("embed", "embed")
        assert s["temp"].spec == P()


def test_big_opt_is_sharded_abstractly():
    mesh = mesh_of((1, 4, 2))
    cfg = get_preset("blip2-opt-2.7b")
    shapes = flat(blip2_model.abstract_params(cfg))
    s = flat(S.param_shardings(cfg, mesh))
    assert s["llm/embed_tokens/embedding"].spec == P("tensor", "fsdp")        # (50304, 2560)
    for k in ("query", "key", "value"):
        assert s[f"llm/layers/attn/{k}/kernel"].spec == P(None, "fsdp", "tensor")
    assert s["llm/layers/attn/out/kernel"].spec == P(None, "tensor", "fsdp")
    assert s["llm/layers/mlp/fc1/kernel"].spec == P(None, "fsdp", "tensor")  # (32, 2560, 10240)
    assert s["llm/layers/mlp/fc2/kernel"].spec == P(None, "tensor", "fsdp")
    assert s["vision/layers/mlp/fc1/kernel"].spec == P(None, "fsdp", "tensor")

    def nbytes(shape, dtype):
        return math.prod(shape) * np.dtype(dtype).itemsize
    total = sum(nbytes(a.shape, a.dtype) for a in shapes.values())
    per_device = sum(nbytes(s[k].shard_shape(a.shape), a.dtype) for k, a in shapes.items())
    llm = [k for k in shapes if k.startswith("llm/")]
    llm_total = sum(nbytes(shapes[k].shape, shapes[k].dtype) for k in llm)
    llm_dev = sum(nbytes(s[k].shard_shape(shapes[k].shape), shapes[k].dtype) for k in llm)
    assert llm_total > 10e9                                  # ~3.8B params * 4 bytes: real sizes
    assert llm_dev < llm_total / 8 * 1.01                    # all but norms split 8 ways
    assert per_device < total / 8 * 1.05


def test_overrides_replicate_qformer_fully_shard_llm():
    mesh = mesh_of((2, 2, 2))
    overrides = [(r"qformer/.*|query_tokens|llm_proj/.*", S.REPLICATED_RULES),
                 (r"llm/.*", S.FULLY_SHARDED_RULES)]
    s = flat(S.param_shardings("tiny-opt", mesh, overrides=overrides))
    for k, sh in s.items():
        if k.startswith(("qformer/", "query_tokens", "llm_proj/")):
            assert all(e is None for e in sh.spec), k
    assert s["llm/layers/attn/query/kernel"].spec == P(None, ("fsdp", "data"), "tensor")
    assert s["llm/embed_tokens/embedding"].spec == P("tensor", ("fsdp", "data"))
    assert s["vision/layers/attn/qkv/kernel"].spec == P(None, "fsdp", "tensor")   # defaults


def test_batch_sharding_and_shard_batch():
    mesh = mesh_of((2, 2, 2))
    assert S.batch_sharding(mesh, 2).spec == P(("data", "fsdp"))
    assert S.batch_sharding(mesh, 3, 6).spec == P("data", None, None)
    assert S.batch_sharding(mesh, 2, 3).spec == P(None, None)
    x = np.arange(8 * 5).reshape(8, 5)
    out = S.shard_batch({"x": x, "y": np.arange(3), "t": np.float32(2.0), "n": None}, mesh)
    assert out["x"].sharding.spec == P(("data", "fsdp"), None)
    assert out["y"].sharding.spec == P(None)
    assert out["t"].sharding.spec == P() and out["n"] is None
    np.testing.assert_array_equal(np.asarray(out["x"]), x)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (2, 1, 4), (1, 1, 8)])
@pytest.mark.parametrize("rows_per_peer", [1, 8])
def test_gather_batch_rows(shape, rows_per_peer):
    """Rows of a batch-sharded array picked by global index (ITM's hard-negative images) equal
    a plain gather, values and gradients, inside the step's sharding: by an all-to-all of the
    rows asked for, or (rows_per_peer 1: device 0 asks two rows of the last device) the
    all-gather fallback; on a mesh that replicates the batch (1×1×8) a plain gather."""
    mesh = mesh_of(shape)
    x = np.random.default_rng(0).normal(size=(16, 3, 5)).astype(np.float32)
    index = np.array([15, 14, 7, 7, 3, 12, 1, 8, 9, 2, 14, 5, 5, 11, 6, 0], np.int32)
    weight = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    xs, index_s = S.shard_batch((x, index), mesh)

    def loss(x, index, rows_per_peer):
        with S.activation_sharding(mesh):
            got = S.gather_batch_rows(x, index, rows_per_peer)
        return (got * weight).sum(), got
    (_, got), grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)(
        xs, index_s, rows_per_peer)
    np.testing.assert_array_equal(np.asarray(got), x[index])
    want = np.zeros_like(x)
    np.add.at(want, index, weight)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-6)
    if shape[0] * shape[1] > 1:
        assert got.sharding.spec[0] == S.batch_sharding(mesh, 3, 16).spec[0]
        hlo = jax.jit(loss, static_argnums=2).lower(xs, index_s, rows_per_peer).as_text()
        assert "all_to_all" in hlo
    np.testing.assert_array_equal(np.asarray(S.gather_batch_rows(x, index)), x[index])


def test_split_over_batch_axes():
    """ZeRO-1's optimizer-state layout: the batch axes a parameter does not use are added to its
    first dimension they divide (with what already splits it)."""
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    split = lambda spec, shape: S.split_over_batch_axes(              # noqa: E731
        NamedSharding(mesh, spec), shape).spec
    assert split(P(None, "tensor"), (8, 4)) == P(("data", "fsdp"), "tensor")
    assert split(P(None, "tensor"), (6, 16)) == P(None, ("tensor", "data", "fsdp"))
    assert split(P(None, "tensor"), (6, 4)) == P(None, "tensor")            # none divides
    assert split(P("fsdp", None), (4, 6)) == P(("fsdp", "data"), None)
    assert split(P("fsdp", None), (2, 6)) == P("fsdp", "data")
    assert split(P(None), (3,)) == P(None)
    assert split(P(), ()) == P()
    assert split(P(("data", "fsdp")), (8,)) == P(("data", "fsdp"))         # all used already


def test_init_params_lands_in_shardings():
    """`init_params` creates each leaf in its sharding (checked on the lowering: no compile)."""
    mesh = mesh_of((2, 2, 2))
    out = S.sharded_init("tiny-opt", mesh).lower(jax.random.PRNGKey(3)).out_info
    want = S.param_shardings("tiny-opt", mesh)
    shapes = blip2_model.abstract_params(get_preset("tiny-opt"))
    for a, sh, ref in zip(jax.tree.leaves(out), jax.tree.leaves(want), jax.tree.leaves(shapes)):
        assert a.shape == ref.shape and a.sharding == sh


# ----------------------------------------------------------------------------------------------
# SPMD parity of the surfaces
# ----------------------------------------------------------------------------------------------
def all_surfaces(m, pixel_values, input_ids, attention_mask, decoder_input_ids=None):
    """Every surface of the model in one program (one compile per mesh instead of five)."""
    cfg = m.config
    out = {"vision_embeds": m.image_embeds(pixel_values),
           "query_embeds": m.query_embeds(pixel_values)}
    if cfg.itc:
        out["itc"] = m.itc(pixel_values, input_ids, attention_mask)
    if cfg.itm:
        out["itm"] = m.itm(pixel_values, input_ids, attention_mask)
    out["logits"] = m.logits(pixel_values, input_ids, attention_mask, decoder_input_ids)
    return out


def inputs(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size
    px = rng.normal(size=(batch, s, s, 3)).astype(np.float32)
    ids = rng.integers(3, 100, size=(batch, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, -2:] = 0
    args = [px, ids, mask]
    if cfg.llm_kind == "t5":
        args.append(rng.integers(3, 100, size=(batch, 3)).astype(np.int32))
    return args


@pytest.fixture(scope="module")
def reference():
    """Unsharded model, inputs (batch 8) and every surface's output, per tiny preset."""
    cache = {}

    def get(name):
        if name not in cache:
            model = Blip2.random(name)
            args = inputs(model.config, 8)
            out = jax.tree.map(np.asarray, model._call(all_surfaces, *args))
            cache[name] = model, args, out
        return cache[name]
    return get


def assert_close(out, ref, what):
    err = np.abs(np.asarray(out) - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= 1e-6, f"{what}: relative error {err:.2e}"


# Every mesh for the stage-1 model (all five surfaces); one mesh each for OPT, T5 and LLaMA (the
# compiles dominate this file's time: one program per (model, mesh, batch)).
PARITY = [("tiny-stage1", m) for m in MESHES] + [("tiny-opt", (1, 4, 2)), ("tiny-t5", (2, 2, 2)),
                                                  ("tiny-llama", (1, 4, 2))]


@pytest.mark.parametrize("name, shape", PARITY)
def test_sharded_surfaces_match(reference, name, shape):
    """vision_embeds / query_embeds / itc / itm / logits of a sharded model (numpy inputs, batch 8
    over data × fsdp) equal the unsharded model's, all computed in one program per mesh."""
    model, args, ref = reference(name)
    mesh = mesh_of(shape)
    sharded = model.shard(mesh)
    assert isinstance(sharded, Blip2) and sharded.config == model.config
    for p, sh in zip(jax.tree.leaves(sharded.params),
                     jax.tree.leaves(S.param_shardings(name, mesh))):
        assert p.sharding == sh
    assert sharded._place(args[0]).sharding.spec[0] == ("data", "fsdp")
    out = sharded._call(all_surfaces, *args)
    assert set(out) == set(ref)
    for k in ref:
        assert_close(out[k], ref[k], f"{name} {shape} {k}")


def test_public_surfaces_numpy_inputs(reference):
    """The public surfaces of a sharded model take numpy, also from a `jax.make_mesh` (Explicit)
    mesh. A batch of 3 does not divide data × fsdp = 4 and is replicated; itc pairs 3 images
    (replicated) with 8 texts (sharded)."""
    model, (px, ids, mask), ref = reference("tiny-stage1")
    sharded = model.shard(jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor")))
    assert sharded._place(px[:3]).sharding.is_fully_replicated
    assert sharded._place(ids).sharding.spec == P(("data", "fsdp"), None)
    assert_close(sharded.itc(px[:3], ids, mask), ref["itc"][:3], "itc 3x8")
    assert_close(sharded.logits(px[:3], ids[:3], mask[:3]), ref["logits"][:3], "itg logits")


# ----------------------------------------------------------------------------------------------
# Multi-process: the hybrid (DCN) mesh with processes as slices, and process-local batches
# ----------------------------------------------------------------------------------------------
_WORKER = r'''
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
import numpy as np
from jax.experimental import multihost_utils
from blip2_jax import sharding as S
i = jax.process_index()
mesh = S.make_mesh({"data": 1, "fsdp": -1}, dcn={"data": -1})      # data over the 2 processes
assert dict(mesh.shape) == {"data": 2, "fsdp": 2}, mesh.shape
assert [[d.process_index for d in row] for row in mesh.devices] == [[0, 0], [1, 1]]
local = np.arange(4 * 3).reshape(4, 3) + 100 * i
g = S.shard_batch({"x": local}, mesh)["x"]
assert g.shape == (8, 3) and g.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
full = multihost_utils.process_allgather(g, tiled=True)
assert full[:, 0].tolist() == [0, 3, 6, 9, 100, 103, 106, 109], full
try:
    S.shard_batch(local[:3], mesh)
    raise AssertionError("a global batch of 6 over 4 devices must raise")
except ValueError:
    pass
jax.distributed.shutdown()
print("ok", i)
'''


def test_multiprocess_dcn_mesh_and_batches(tmp_path):
    import os
    import subprocess
    import sys
    import runs
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = str(runs.free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]


@pytest.mark.parametrize("name, shape", [("tiny-opt", (2, 2, 2)), ("tiny-t5", (1, 2, 4)),
                                         ("tiny-llama", (2, 2, 2))])
def test_sharded_generate_matches(name, shape):
    """Generation on a sharded model (batch over data × fsdp, LLM weights over fsdp/tensor)
    gives the unsharded model's tokens, greedy and beam 3."""
    model = Blip2.random(name, seed=3)
    s = model.config.vision.image_size
    pix = np.random.default_rng(0).normal(size=(4, s, s, 3)).astype(np.float32)
    sharded = model.shard(mesh_of(shape))
    assert sharded._place(pix).sharding.spec[0] == ("data", "fsdp")
    for beams in (1, 3):
        ours = sharded.generate(pix, max_new_tokens=6, num_beams=beams)
        np.testing.assert_array_equal(ours, model.generate(pix, max_new_tokens=6, num_beams=beams))
