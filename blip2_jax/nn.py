"""The shared building blocks: the one attention, MLP, norm, dense and layer-scan of every tower.

Logical axis names used on parameters (resolved to mesh axes by the sharding rules):
  "embed"  model width            "heads"  flattened heads*head_dim   "mlp"  FFN hidden
  "vocab"  vocabulary             "layers" the scan axis              "norm" norm/bias vectors
  "kv_heads"  flattened kv_heads*head_dim of grouped-query attention's key/value projections
Parameters are created with `nn.with_logical_partitioning`; `init_params` unboxes them, and every
module applies to plain arrays.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BATCH = "batch"   # the logical name of the leading dimension of inputs and activations


def dtype_of(name) -> Any:
    """jnp dtype from a config string (or a dtype)."""
    if isinstance(name, str):
        try:
            return DTYPES[name]
        except KeyError:
            raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None
    return name


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),      # exact erf (torch nn.GELU)
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),   # tanh approximation
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# torch's default Linear/Embedding inits are irrelevant for loaded weights; these only matter for
# training from scratch (Q-Former cross-attention etc. use normal(0.02) as in BERT/LAVIS).
default_kernel_init = nn.initializers.normal(0.02)


def Dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype=jnp.float32,
          param_dtype=jnp.float32, name: Optional[str] = None,
          kernel_init=default_kernel_init) -> nn.Dense:
    """`nn.Dense` whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def Embed(num: int, features: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
          name: Optional[str] = None, axes=("vocab", "embed")) -> nn.Embed:
    return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, name=name,
                    embedding_init=nn.with_logical_partitioning(default_kernel_init, axes))


class LayerNorm(nn.Module):
    """LayerNorm (or T5's RMSNorm with `rms=True`), computed in fp32, output in `dtype`.

    Parameters: `scale` and (LayerNorm with `use_bias`) `bias`. Computing in fp32 matches LAVIS's
    fp32-casting LayerNorm and T5's fp32 variance. `cast_before_scale`: the normalised value is
    cast to `dtype` first and multiplied by the scale in `dtype` (HF `LlamaRMSNorm`:
    `weight * x.to(input_dtype)`); the same numbers in fp32, one more rounding in 16 bits.
    """
    epsilon: float = 1e-5
    rms: bool = False
    use_bias: bool = True
    use_scale: bool = True
    cast_before_scale: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        xf = x.astype(jnp.float32)
        if self.rms:
            y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.epsilon)
        else:
            mean = jnp.mean(xf, -1, keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
            y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                               (dim,), self.param_dtype)
            if self.cast_before_scale:
                y = y.astype(self.dtype) * scale.astype(self.dtype)
            else:
                y = y * scale.astype(jnp.float32)
        if self.use_bias and not self.rms:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                              (dim,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def decoder_key_mask(attention_mask: Optional[Array], batch: int, key_len: int) -> Array:
    """A decoder's (B, S) int32 key mask: all ones when None; S is the input length without a
    KV cache and the cache length with one (entries for positions not yet written are ignored)."""
    if attention_mask is None:
        return jnp.ones((batch, key_len), jnp.int32)
    if attention_mask.shape != (batch, key_len):
        raise ValueError(f"attention_mask shape {attention_mask.shape} != {(batch, key_len)} "
                         "(batch, key length: T without a cache, the cache length with one)")
    return attention_mask.astype(jnp.int32)


def attention_mask(key_mask: Optional[Array] = None, *, causal: bool = False,
                   query_len: Optional[int] = None, key_len: Optional[int] = None,
                   query_offset: Any = 0, prefix: int = 0) -> Optional[Array]:
    """Boolean mask broadcastable to (B, heads, T, S); True = may attend.

    key_mask: (B, S) 1/0 validity of keys (padding). causal: query t (at absolute position
    `query_offset + t`) sees keys at positions <= its own. prefix: the first `prefix` keys are
    visible to every query and the first `prefix` queries see only them (UniLM: queries then text).
    """
    mask = None
    if key_mask is not None:
        mask = key_mask.astype(bool)[:, None, None, :]
    if causal:
        assert query_len is not None and key_len is not None
        q_pos = jnp.arange(query_len)[:, None] + query_offset
        k_pos = jnp.arange(key_len)[None, :]
        c = k_pos <= q_pos
        if prefix:
            c = jnp.where(k_pos < prefix, True, c)          # everyone sees the query prefix
            c = jnp.where((q_pos < prefix) & (k_pos >= prefix), False, c)  # queries never see text
        c = c[None, None]
        mask = c if mask is None else mask & c
    return mask


_MASKED = -1e30   # additive logit of a masked key (a fully masked row becomes uniform, as in HF)


CUDNN_MIN_QUERIES = 16     # shorter query blocks (decode steps) use XLA's attention on GPU


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
                          bias: Optional[Array] = None, scale: float = 1.0,
                          dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> Array:
    """softmax(scale·q·kᵀ + bias, masked)·v over (B, T|S, heads, head_dim); softmax in fp32.

    k and v may have fewer heads than q (grouped-query attention): KV head j serves the
    heads/kv_heads consecutive query heads j·G ... j·G + G - 1 (HF `repeat_kv`), without
    repeating k and v in memory.

    GPU: `jax.nn.dot_product_attention` with cuDNN where it applies, else XLA's; TPU (and any
    other platform): `_tpu_attention`, also with attention-probability dropout (training the
    Q-Former). CPU, and dropout on GPU: `_explicit_attention`, the same math arranged so
    XLA:CPU keeps both matmuls on its fast path (3x faster there than the fused softmax·v form).
    """
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    if mask is not None:
        mask = jnp.broadcast_to(mask, shape)
    if bias is not None:
        bias = jnp.broadcast_to(bias, shape).astype(jnp.float32)
    explicit = functools.partial(_explicit_attention, mask=mask, bias=bias, scale=scale,
                                 dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    tpu = functools.partial(_tpu_attention, mask=mask, bias=bias, scale=scale,
                            dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if dropout_rate > 0.0 and dropout_rng is not None:
        return jax.lax.platform_dependent(q, k, v, cpu=explicit, cuda=explicit, default=tpu)

    def fused(q, k, v, implementation=None):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            bias=None if bias is None else bias.astype(q.dtype),
                                            implementation=implementation)

    def gpu(q, k, v):
        # cuDNN's fused attention where it applies and pays: 16-bit inputs, head_dim a multiple
        # of 8 up to 128, and more than a few queries (on an H200: 3.4x XLA's kernel on ViT-g's
        # shapes, the stage-1 step 357 -> 324 ms; but beam-search decoding, one query per step,
        # went 417 -> 445 ms, so decode steps keep XLA's). jax refuses unsupported cases at
        # trace time, and then XLA's version runs.
        if q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 \
                and q.shape[-1] <= 128 and q.shape[1] >= CUDNN_MIN_QUERIES:
            try:
                return fused(q, k, v, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                pass
        return fused(q, k, v)
    return jax.lax.platform_dependent(q, k, v, cpu=explicit, cuda=gpu, default=tpu)


def _tpu_attention(q, k, v, *, mask, bias, scale, dropout_rate=0.0, dropout_rng=None):
    """scale·q·kᵀ in the inputs' dtype, softmax in fp32, probabilities back in the inputs'
    dtype: with 16-bit inputs the logits are written in 16 bits, as HF and LAVIS compute them in
    half precision, instead of the fp32 logits of `jax.nn.dot_product_attention`'s XLA form
    (the same math in fp32). XLA's TPU cost model for ViT-g's attention (257 tokens, 27 rows
    per chip on v5p): 1.13 → 0.88 M cycles a layer."""
    logits = (_scores(q, k) * jnp.asarray(scale, q.dtype)).astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return _weighted(probs.astype(v.dtype), v)


FLASH_MIN_TOKENS = 128     # shorter self-attention keeps `_tpu_attention` on TPU
FLASH_BLOCK = 128          # the Pallas TPU flash kernel's query / key blocks
FLASH_WHOLE_KEYS = 2048    # up to this many keys, a forward over a length not a multiple of
                           # FLASH_BLOCK takes all keys as one block (no padding)


# Where Pallas kernels run while a program traces (`kernel_mesh`): None, or (mesh, spec_of) with
# spec_of(logical axis names, shape) -> PartitionSpec.
_KERNEL_MESH: "contextvars.ContextVar[Optional[tuple]]" = contextvars.ContextVar(
    "blip2_jax_kernel_mesh", default=None)


@contextlib.contextmanager
def kernel_mesh(mesh, spec_of: Callable):
    """While a program traces inside this context, Pallas kernels (which XLA's SPMD partitioner
    cannot split) run per device within `jax.shard_map` over `mesh`, their operands split as
    `spec_of(logical axis names, shape)` says (a PartitionSpec; names as on parameters, "batch"
    for the leading dimension). `sharding.activation_sharding` enters it with the run's logical
    axis rules."""
    token = _KERNEL_MESH.set((mesh, spec_of))
    try:
        yield
    finally:
        _KERNEL_MESH.reset(token)


def _flash_module():
    """JAX's Pallas TPU flash-attention kernel module, or None where this jax lacks it."""
    try:
        # optional dependency: Pallas's TPU kernels are absent from some jax builds
        from jax.experimental.pallas.ops.tpu import flash_attention
    except ImportError:
        return None
    return flash_attention


def _flash_placement():
    """Where the flash kernel may run in the program being traced: (mesh, spec_of) to run it
    within `jax.shard_map` (`kernel_mesh`: the train step's `sharding.activation_sharding`); ()
    to call it on the whole arrays (one TPU device, no mesh); None where it cannot be placed
    (several devices and no mesh known: XLA's partitioner would replicate the Pallas call) or
    the kernel is not importable."""
    if _flash_module() is None:
        return None
    ctx = _KERNEL_MESH.get()
    if ctx is not None:
        return ctx
    if jax.default_backend() == "tpu" and jax.device_count() == 1:
        return ()
    return None


def _flash_attention(q, k, v, *, scale, placement=(), block_sizes=None, pad=None,
                     head_major=False):
    """softmax(scale·q·kᵀ)·v of self-attention q, k, v (B, T, heads, D) by JAX's Pallas TPU
    flash-attention kernel. `head_major`: q, k, v and the output are (B, heads, T, D), the layout
    the kernel reads and writes (no re-layout around it).

    Token counts not a multiple of FLASH_BLOCK: the forward takes all keys as one block (up to
    FLASH_WHOLE_KEYS; ViT-g's 257 tokens) with 128-query blocks (`pad=False`: always, forward
    only). The kernel's backward needs lengths that are multiples of its blocks, so gradients
    (and longer sequences, or `pad=True`) use the tokens padded to a multiple of FLASH_BLOCK:
    the pad keys masked by segment ids (pad queries see only pad keys) and the pad queries'
    outputs dropped; the backward recomputes that padded forward (the whole-key forward keeps
    no residuals).

    The kernel is a Pallas call, which XLA's SPMD partitioner cannot split: with `placement`
    (mesh, spec_of) (`_flash_placement`) it runs inside `jax.shard_map`, batch and heads split
    as spec_of resolves "batch" and "heads" for the operands; with () it is called on the whole
    arrays."""
    if not head_major:
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    t = q.shape[2]
    run = functools.partial(_flash_heads_major, scale=scale, placement=placement,
                            block_sizes=block_sizes)
    if pad is None and t % FLASH_BLOCK and t <= FLASH_WHOLE_KEYS:
        @jax.custom_vjp
        def attend(q, k, v):
            return run(q, k, v, pad=False)

        def attend_fwd(q, k, v):
            return run(q, k, v, pad=False), (q, k, v)

        def attend_bwd(res, g):
            return jax.vjp(functools.partial(run, pad=True), *res)[1](g)
        attend.defvjp(attend_fwd, attend_bwd)
        out = attend(q, k, v)
    else:
        out = run(q, k, v, pad=t % FLASH_BLOCK != 0 if pad is None else pad)
    return out if head_major else out.transpose(0, 2, 1, 3)


def _flash_heads_major(q, k, v, *, scale, placement, block_sizes, pad):
    """`_flash_attention` of (B, heads, T, D) arrays: padded (`pad`), else with all keys in one
    block where T is not a multiple of FLASH_BLOCK."""
    fa = _flash_module()
    b, n, t, d = q.shape
    padded = -(-t // FLASH_BLOCK) * FLASH_BLOCK if pad else t
    if block_sizes is None and padded % FLASH_BLOCK:
        block_sizes = fa.BlockSizes(block_q=min(FLASH_BLOCK, t), block_k_major=t, block_k=t,
                                    block_b=1)
    if padded != t:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - t), (0, 0))) for x in (q, k, v))
    ids = jnp.broadcast_to((jnp.arange(padded) < t).astype(jnp.int32), (b, padded))

    def local(q, k, v, ids):
        seg = fa.SegmentIds(q=ids, kv=ids) if padded != t else None
        # 16-bit products are exact at any precision, and Mosaic refuses a 16-bit matmul asked
        # for fp32 contraction (`jax_default_matmul_precision="highest"`, as the tests set).
        with jax.default_matmul_precision("default") if q.dtype.itemsize < 4 \
                else contextlib.nullcontext():
            return fa.flash_attention(q, k, v, segment_ids=seg, sm_scale=scale,
                                      block_sizes=block_sizes)

    if not placement:
        out = local(q, k, v, ids)
    else:
        mesh, spec_of = placement
        spec = spec_of((BATCH, "heads", None, None), q.shape)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(spec[0])),
                            out_specs=spec, check_vma=False)(q, k, v, ids)
    return out[:, :, :t]


def _dense(x, params, dtype):
    """`Dense` (flax `nn.Dense`'s ops) of x with params {"kernel", "bias"?} computed in dtype."""
    kernel = jnp.asarray(params["kernel"], dtype)
    y = jax.lax.dot_general(jnp.asarray(x, dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if "bias" in params:
        y = y + jnp.reshape(jnp.asarray(params["bias"], dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def _scores(q, k, **kw):
    """q·kᵀ (B, heads, T, S) of q (B, T, heads, D) and k (B, S, kv_heads, D)."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    if kv == n:
        return jnp.einsum("btnh,bsnh->bnts", q, k, **kw)
    grouped = q.reshape(b, t, kv, n // kv, d)
    return jnp.einsum("btkgh,bskh->bkgts", grouped, k, **kw).reshape(b, n, t, k.shape[1])


def _weighted(p, v, **kw):
    """p·v (B, T, heads, D) of p (B, heads, T, S) and v (B, S, kv_heads, D)."""
    b, n, t, s = p.shape
    kv = v.shape[2]
    if kv == n:
        return jnp.einsum("bnts,bsnh->btnh", p, v, **kw)
    out = jnp.einsum("bkgts,bskh->btkgh", p.reshape(b, kv, n // kv, t, s), v, **kw)
    return out.reshape(b, t, n, v.shape[3])


def _explicit_attention(q, k, v, *, mask, bias, scale, dropout_rate, dropout_rng):
    logits = _scores(q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits + jnp.where(mask, 0.0, _MASKED)
    # Unnormalised probabilities times v, divided afterwards: one matmul with a cheap producer.
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    denom = jnp.sum(e, axis=-1)                                   # (B, heads, T)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, e.shape)
        e = jnp.where(keep, e / (1.0 - dropout_rate), 0.0)
    out = _weighted(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.transpose(denom, (0, 2, 1))[..., None]).astype(v.dtype)


def rotate_half(x: Array) -> Array:
    """concat(-x[D/2:], x[:D/2]) on the last axis: dimension i pairs with i + D/2 (HF's layout)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x·cos + rotate_half(x)·sin over x (B, T, heads, D), cos/sin (B, T, D) (HF
    `apply_rotary_pos_emb`; cos/sin are cast to x's dtype first, as HF does)."""
    cos = cos[:, :, None].astype(x.dtype)
    sin = sin[:, :, None].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention with flat (in, heads*head_dim) kernels.

    Params: `qkv` (fused, `fused_qkv=True`) or `query`/`key`/`value`, and `out`.
    Self-attention by default; cross-attention with `context`; precomputed `kv=(k, v)` (B, S, H, D)
    skips the key/value projections (Q-Former query cache, T5 cross-attention cache).
    With `cache={"k","v"}`, every layer's cache (L, B, S_max, H, D) carried through a layer
    scan, the new keys/values of layer `cache_layer` are written at `cache_index` (in place, where
    a scan's per-layer cache output rewrote the layer's whole cache every decode step) and
    attention runs over that layer's whole cache; the updated cache is returned.
    `num_kv_heads` < num_heads: grouped-query attention (key/value kernels (in, kv_heads*head_dim)
    on the "kv_heads" axis; the cache holds kv_heads heads). `rotary=(cos, sin)` (B, T, D):
    rotary position embeddings applied to q and the new k before the cache write.
    """
    num_heads: int
    head_dim: int
    out_features: int
    use_bias: bool = True
    fused_qkv: bool = False
    scale: Optional[float] = None      # default head_dim ** -0.5
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    num_kv_heads: Optional[int] = None   # None: num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def setup(self):
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads "
                             f"({self.kv_heads})")
        grouped = self.kv_heads != self.num_heads
        if grouped and self.fused_qkv:
            raise ValueError("a fused-qkv Attention has as many key/value heads as query heads")
        inner = self.num_heads * self.head_dim
        dense = functools.partial(Dense, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        if self.fused_qkv:
            self.qkv = dense(3 * inner, ("embed", "heads"))
        else:
            kv_axes = ("embed", "kv_heads" if grouped else "heads")
            self.query = dense(inner, ("embed", "heads"))
            self.key = dense(self.kv_heads * self.head_dim, kv_axes)
            self.value = dense(self.kv_heads * self.head_dim, kv_axes)
        self.out = dense(self.out_features, ("heads", "embed"))

    def _split(self, x):
        return x.reshape(*x.shape[:-1], -1, self.head_dim)

    def project_kv(self, context: Array) -> tuple[Array, Array]:
        """Keys and values (B, S, kv_heads, D) of `context` (usable as `kv=` later; no rotary)."""
        if self.fused_qkv:
            _, k, v = self._fused(context)
            return k, v
        return self._split(self.key(context)), self._split(self.value(context))

    def _fused(self, x):
        # Sliced along the feature axis, then split into heads: XLA's TPU layouts then need no
        # copy of the whole (…, 3, heads, head_dim) block (ViT-g: 0.87 → 0.55 M cycles a layer).
        qkv, inner = self.qkv(x), self.num_heads * self.head_dim
        return tuple(self._split(qkv[..., i * inner:(i + 1) * inner]) for i in range(3))

    def _flash_self_attention(self, x, placement):
        """Fused-qkv self-attention of x (B, T, in) without mask, bias or dropout: on TPU by the
        Pallas flash kernel (`_flash_attention`), with q, k, v projected straight into the
        (B, heads, T, D) layout it reads and the output projection contracting (heads, D) of
        what it writes, so XLA copies nothing around the kernel (ViT-g, 27 rows per chip on
        v5p: 1.37 → 1.17 ms a layer in XLA's estimate; the kernel alone, between the same
        projections in XLA's form, 1.41). Elsewhere the module's own form: the same ops as the
        `Dense` layers and `dot_product_attention`."""
        params = nn.unbox(self.variables["params"])
        n, d, dt = self.num_heads, self.head_dim, self.dtype
        inner = n * d
        scale = self.head_dim ** -0.5 if self.scale is None else self.scale

        def standard(x, params):
            y = _dense(x, params["qkv"], dt)
            q, k, v = (self._split(y[..., i * inner:(i + 1) * inner]) for i in range(3))
            y = dot_product_attention(q, k, v, scale=scale)
            return _dense(y.reshape(*y.shape[:-2], inner), params["out"], dt)

        def tpu(x, params):
            qkv, out = params["qkv"], params["out"]
            w = jnp.asarray(qkv["kernel"], dt).reshape(-1, 3, n, d)
            b = jnp.zeros((3, n, d), dt) if "bias" not in qkv else \
                jnp.asarray(qkv["bias"], dt).reshape(3, n, d)
            x = jnp.asarray(x, dt)
            q, k, v = (jnp.einsum("bte,ehd->bhtd", x, w[:, i]) + b[i][:, None]
                       for i in range(3))
            y = _flash_attention(q, k, v, scale=scale, placement=placement, head_major=True)
            y = jnp.einsum("bhtd,hde->bte", y, jnp.asarray(out["kernel"], dt).reshape(n, d, -1))
            return y + jnp.asarray(out["bias"], dt) if "bias" in out else y

        return jax.lax.platform_dependent(x, params, default=standard, tpu=tpu)

    def __call__(self, x: Array, context: Optional[Array] = None, *,
                 kv: Optional[tuple[Array, Array]] = None, mask: Optional[Array] = None,
                 bias: Optional[Array] = None, cache: Optional[dict] = None,
                 cache_index: Any = 0, cache_layer: Any = None, deterministic: bool = True,
                 rotary: Optional[tuple[Array, Array]] = None):
        if (self.fused_qkv and context is None and kv is None and mask is None and bias is None
                and cache is None and rotary is None and x.ndim == 3
                and x.shape[1] >= FLASH_MIN_TOKENS
                and (deterministic or self.dropout_rate == 0.0)
                and not self.is_initializing()):
            placement = _flash_placement()
            if placement is not None:
                return self._flash_self_attention(x, placement), None
        if self.fused_qkv:
            if context is not None or kv is not None:
                raise ValueError("a fused-qkv Attention is self-attention only")
            q, k, v = self._fused(x)
        else:
            q = self._split(self.query(x))
            k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        if rotary is not None:
            if context is not None or kv is not None:
                raise ValueError("rotary position embeddings are for self-attention only")
            q, k = (apply_rotary(a, *rotary) for a in (q, k))
        new_cache = None
        if cache is not None:
            if cache_layer is None:
                raise ValueError("a cache needs cache_layer: the layer's index in it")
            new_cache = {n: jax.lax.dynamic_update_slice(
                cache[n], x[None].astype(cache[n].dtype), (cache_layer, 0, cache_index, 0, 0))
                for n, x in (("k", k), ("v", v))}
            k, v = (jax.lax.dynamic_index_in_dim(new_cache[n], cache_layer, 0, keepdims=False)
                    for n in ("k", "v"))
        scale = self.head_dim ** -0.5 if self.scale is None else self.scale
        rng = None
        if not deterministic and self.dropout_rate > 0.0:
            rng = self.make_rng("dropout")
        y = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, bias=bias,
                                  scale=scale, dropout_rate=self.dropout_rate, dropout_rng=rng)
        y = y.reshape(*y.shape[:-2], self.num_heads * self.head_dim)
        return self.out(y), new_cache


class Mlp(nn.Module):
    """fc1 → activation → fc2; `gated=True`: act(gate(x)) * fc1(x) → fc2 (T5 v1.1)."""
    hidden: int
    out_features: int
    act: str = "gelu"
    gated: bool = False
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(Dense, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        h = dense(self.hidden, ("embed", "mlp"), name="fc1")(x)
        if self.gated:
            h = activation(self.act)(dense(self.hidden, ("embed", "mlp"), name="gate")(x)) * h
        else:
            h = activation(self.act)(h)
        return dense(self.out_features, ("mlp", "embed"), name="fc2")(h)


# ----------------------------------------------------------------------------------------------
# Layer stacks
# ----------------------------------------------------------------------------------------------
def remat_policy(name: str):
    """None for no remat, else a `jax.checkpoint_policies` policy ("full" = save nothing)."""
    if name in (None, "", "none"):
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        raise ValueError(f"unknown remat policy {name!r}: use 'none', 'full' or a "
                         "jax.checkpoint_policies name")
    return policy


_UNROLL_LAYERS = contextvars.ContextVar("blip2_jax_unroll_layers", default=False)


@contextlib.contextmanager
def unrolled_layers():
    """Within this context every layer scan (and the train step's microbatch loop) traces fully
    unrolled: the same math, but XLA's cost analysis (which counts a loop body once) then sees
    every layer and microbatch (`blip2_jax.aot`)."""
    token = _UNROLL_LAYERS.set(True)
    try:
        yield
    finally:
        _UNROLL_LAYERS.reset(token)


def scan_unroll(length: int) -> int:
    """The `unroll` of a scan over `length` layers or microbatches: 1, or all of them within
    `unrolled_layers()`."""
    return length if _UNROLL_LAYERS.get() else 1


def scan_layers(block: type[nn.Module], length: int, *, in_axes: Sequence[Any],
                remat: str = "none", name: Optional[str] = None, **block_kwargs) -> nn.Module:
    """`length` copies of `block` under `nn.scan`, params stacked on a leading "layers" axis.

    `block.__call__(carry, *args) -> (carry, per_layer_out)`; `in_axes` gives, per extra arg,
    `nn.broadcast` (same for every layer) or 0 (sliced per layer, e.g. a KV cache).
    """
    cls = block
    policy = remat_policy(remat)
    if policy is not None:
        cls = nn.remat(block, policy=policy, prevent_cse=False)
    scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=tuple(in_axes), length=length,
                      unroll=scan_unroll(length),
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(name=name, **block_kwargs)


def init_params(module: nn.Module, rng, *args, **kwargs):
    """Random parameters as a plain pytree (logical-partitioning boxes removed)."""
    variables = module.init(rng, *args, **kwargs)
    return nn.unbox(variables["params"])

