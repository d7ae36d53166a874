"""The attention forms of blip2_jax.nn.dot_product_attention agree: the TPU form
(`_tpu_attention`: logits in the inputs' dtype) is the explicit form's math in fp32, and in bf16
is what HF computes in half precision (bf16 logits, fp32 softmax)."""
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
