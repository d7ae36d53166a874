"""The attention forms of blip2_jax.nn.dot_product_attention agree: the TPU form
(`_tpu_attention`: logits in the inputs' dtype) is the explicit form's math in fp32, and in bf16
is what HF computes in half precision (bf16 logits, fp32 softmax)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import nn as bnn


def _inputs(dtype, b=2, t=5, s=7, h=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)) * 2, dtype) for n in (t, s, s))
    mask = rng.random((b, 1, t, s)) > 0.3
    mask[0, 0, 1, :] = False                                  # a fully masked query row
    bias = jnp.asarray(rng.normal(size=(1, h, t, s)), jnp.float32)
    return q, k, v, jnp.asarray(mask), bias


def _shaped(mask, bias, q, k):
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return jnp.broadcast_to(mask, shape), jnp.broadcast_to(bias, shape)


@pytest.mark.parametrize("masked", [False, True])
def test_tpu_form_is_the_explicit_math_in_fp32(masked):
    q, k, v, mask, bias = _inputs(jnp.float32)
    mask, bias = _shaped(mask, bias, q, k)
    kw = dict(mask=mask if masked else None, bias=bias if masked else None, scale=0.3)
    got = bnn._tpu_attention(q, k, v, **kw)
    want = bnn._explicit_attention(q, k, v, dropout_rate=0.0, dropout_rng=None, **kw)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if masked:                                   # the fully masked row: uniform over the keys
        np.testing.assert_allclose(got[0, 1], np.broadcast_to(v[0].mean(0), got[0, 1].shape),
                                   rtol=1e-6, atol=1e-6)


def test_tpu_form_in_bf16_is_hf_half_precision_math():
    q, k, v, mask, bias = _inputs(jnp.bfloat16)
    mask, bias = _shaped(mask, bias, q, k)
    got = bnn._tpu_attention(q, k, v, mask=mask, bias=bias, scale=0.3)
    assert got.dtype == jnp.bfloat16
    # HF eager attention in bf16: matmul and scale in bf16, softmax in fp32, probs cast back.
    logits = (jnp.einsum("btnh,bsnh->bnts", q, k) * jnp.bfloat16(0.3)).astype(jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, logits + bias, -1e30), -1).astype(jnp.bfloat16)
    hf = jnp.einsum("bnts,bsnh->btnh", probs, v)
    np.testing.assert_allclose(np.float32(got), np.float32(hf), rtol=1e-2, atol=1e-2)
    f32 = bnn._tpu_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask=mask, bias=bias,
                             scale=0.3)
    assert np.abs(np.float32(got) - np.float32(f32)).max() < 0.1 * np.abs(f32).max()


def test_cpu_dispatch_is_the_explicit_form():
    q, k, v, mask, _ = _inputs(jnp.float32)
    got = bnn.dot_product_attention(q, k, v, mask=mask, scale=0.3)
    want = bnn._explicit_attention(q, k, v, mask=jnp.broadcast_to(mask, (2, 3, 5, 7)), bias=None,
                                   scale=0.3, dropout_rate=0.0, dropout_rng=None)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_tpu_form_with_dropout_is_the_explicit_math_with_the_same_mask():
    """The same key draws the same keep mask in both forms, so the results agree in fp32; the
    dropped probabilities are zero and the kept ones scaled by 1 / (1 - rate)."""
    q, k, v, mask, bias = _inputs(jnp.float32)
    mask, bias = _shaped(mask, bias, q, k)
    kw = dict(mask=mask, bias=bias, scale=0.3, dropout_rate=0.25,
              dropout_rng=jax.random.PRNGKey(3))
    got = bnn._tpu_attention(q, k, v, **kw)
    np.testing.assert_allclose(got, bnn._explicit_attention(q, k, v, **kw), rtol=1e-5, atol=1e-6)
    assert np.abs(got - bnn._tpu_attention(q, k, v, mask=mask, bias=bias, scale=0.3)).max() > 0.01


# ----------------------------------------------------------------------------------------------
# The ViT's self-attention by the Pallas TPU flash kernel (`nn._flash_attention`,
# `Attention._flash_self_attention`), run on CPU by Pallas's TPU interpret mode.
# ----------------------------------------------------------------------------------------------
def _interpret():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.force_tpu_interpret_mode()


def _cpu_mesh(n=4):
    """A placement for the kernel: (mesh, spec_of) by the default logical axis rules."""
    from jax.sharding import Mesh
    from blip2_jax import sharding
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    return mesh, functools.partial(sharding.resolve_spec, mesh=mesh,
                                   rules=sharding.DEFAULT_RULES)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_flash_kernel_wrapper_is_plain_attention_for_257_tokens(pad, sharded):
    """257 tokens (ViT's 16x16 patches + CLS): one whole-key block, or (pad) padded to 384 with
    the pad keys masked by segment ids and the pad queries dropped; called directly or within
    shard_map over a mesh's batch axis. Equal to plain attention in fp32."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(4, 257, 2, 16)) * 2, jnp.float32) for _ in range(3))
    want = bnn._explicit_attention(q, k, v, mask=None, bias=None, scale=0.25, dropout_rate=0.0,
                                   dropout_rng=None)
    placement = _cpu_mesh() if sharded else ()
    with _interpret():
        got = jax.jit(lambda q, k, v: bnn._flash_attention(q, k, v, scale=0.25, pad=pad,
                                                           placement=placement))(q, k, v)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Head-major in and out is the same computation.
    hm = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
    with _interpret():
        got_hm = bnn._flash_attention(*hm, scale=0.25, pad=pad, head_major=True)
    np.testing.assert_allclose(got_hm.transpose(0, 2, 1, 3), want, rtol=1e-5, atol=1e-5)


def _vit_attention(x, **kw):
    module = bnn.Attention(4, 16, 48, use_bias=True, fused_qkv=True)
    params = bnn.init_params(module, jax.random.PRNGKey(0), x)
    # Non-zero biases, so a misplaced bias shows.
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)
                          / p.size, params)
    return module, params


def test_vit_self_attention_tpu_branch_is_the_xla_form(monkeypatch):
    """The TPU branch (q, k, v projected head-major, the kernel, the output projection over
    (heads, D)), taken on CPU with the kernel interpreted, equals the module's XLA form in fp32;
    the CPU branch is the XLA form's ops."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 257, 48)), jnp.float32)
    module, params = _vit_attention(x)
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
    monkeypatch.setattr(bnn, "_flash_placement", lambda: None)
    want = apply(params, x)                                   # `_tpu_attention` / explicit form
    taken = []

    def placement():
        taken.append(True)
        return ()
    monkeypatch.setattr(bnn, "_flash_placement", placement)
    cpu = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])(params, x)
    assert taken
    np.testing.assert_allclose(cpu, want, rtol=1e-6, atol=1e-6)

    def tpu_branch(*args, default, **per_platform):
        return per_platform.get("tpu", default)(*args)
    monkeypatch.setattr(bnn.jax.lax, "platform_dependent", tpu_branch)
    with _interpret():
        got = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Short sequences keep the XLA form (no placement asked for).
    taken.clear()
    module.apply({"params": params}, x[:, :FEW])
    assert not taken


FEW = bnn.FLASH_MIN_TOKENS - 1


def test_self_attention_with_a_mask_or_dropout_keeps_the_xla_form(monkeypatch):
    x = jnp.ones((1, 130, 48), jnp.float32)
    module, params = _vit_attention(x)
    monkeypatch.setattr(bnn, "_flash_placement", lambda: pytest.fail("flash path taken"))
    module.apply({"params": params}, x, mask=jnp.ones((1, 1, 130, 130), bool))
    module.apply({"params": params}, x, bias=jnp.zeros((1, 1, 130, 130)))
    dropping = bnn.Attention(4, 16, 48, fused_qkv=True, dropout_rate=0.1)
    dropping.apply({"params": params}, x, deterministic=False,
                   rngs={"dropout": jax.random.PRNGKey(0)})


@pytest.fixture
def _libtpu_flags():
    """libtpu reads XLA_FLAGS at its first compile and aborts on the XLA:CPU-only flag the
    tests set (tests/test_aot.py)."""
    jax.block_until_ready(jnp.zeros(2) + 1)
    import os
    before = os.environ.get("XLA_FLAGS")
    if before is not None:
        os.environ["XLA_FLAGS"] = " ".join(
            f for f in before.split() if f != "--xla_cpu_use_fusion_emitters=false")
    yield
    if before is not None:
        os.environ["XLA_FLAGS"] = before


def test_vit_compiles_for_tpu_with_the_flash_kernel_per_chip(_libtpu_flags):
    """A small ViT (145 tokens) compiled ahead of time for 4 v5p chips under the train step's
    activation sharding: the self-attention is the Pallas kernel (a TPU custom call) on each
    chip's rows, with no all-gather of the activations."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from blip2_jax import aot, sharding
    from blip2_jax.config import VisionConfig
    from blip2_jax.models.vit import VisionTransformer
    devices = aot.topology_devices("v5p:2x2x1")
    mesh = Mesh(np.array(devices), ("data",))
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                       image_size=48, patch_size=4, dtype="bfloat16")
    module = VisionTransformer(cfg)
    shapes = jax.eval_shape(lambda: bnn.init_params(module, jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 48, 48, 3))))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16,
                                                         sharding=NamedSharding(mesh, P())),
                          shapes)
    pixels = jax.ShapeDtypeStruct((8, 48, 48, 3), jnp.float32,
                                  sharding=NamedSharding(mesh, P("data")))
    with sharding.activation_sharding(mesh):
        text = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(
            params, pixels).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 1
    assert "all-gather" not in text


def test_flash_kernel_gradients_are_plain_attention_gradients():
    """The whole-key forward's gradients come from the padded kernel's backward (recomputed):
    equal to plain attention's in fp32."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 257, 2, 16)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(attention):
        return lambda q, k, v: (attention(q, k, v) * w).sum()
    flash = loss(lambda q, k, v: bnn._flash_attention(q, k, v, scale=0.25))
    plain = loss(lambda q, k, v: bnn._explicit_attention(q, k, v, mask=None, bias=None,
                                                          scale=0.25, dropout_rate=0.0,
                                                          dropout_rng=None))
    with _interpret():
        got = jax.jit(jax.grad(flash, argnums=(0, 1, 2)))(q, k, v)
    for g, want in zip(got, jax.grad(plain, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


def test_flash_placement_needs_a_mesh_on_several_devices():
    """The kernel is placed per chip only where the mesh is known (the train step's activation
    sharding, `nn.kernel_mesh`); otherwise (several CPU devices here) nowhere, since XLA's
    partitioner would replicate the Pallas call."""
    from jax.sharding import Mesh, PartitionSpec as P
    from blip2_jax import sharding
    assert bnn._flash_placement() is None
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    with sharding.activation_sharding(mesh):
        placed, spec_of = bnn._flash_placement()
        assert placed is mesh
        assert spec_of(("batch", "heads", None, None), (8, 6, 257, 64)) == P("data", None, None,
                                                                             None)
    assert bnn._flash_placement() is None
