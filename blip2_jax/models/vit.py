"""The frozen image encoder of BLIP-2: EVA ViT-g (HF `Blip2VisionModel`) or LAVIS CLIP ViT-L.

References matched:
  variant "eva"  — HF `transformers` `Blip2VisionEmbeddings` + `Blip2Encoder` (v5.24): patch conv
                   with bias, CLS, learned positions, pre-LN blocks with a fused qkv (one 3·D bias),
                   exact-erf GELU MLP.
  variant "clip" — LAVIS `lavis/models/clip_vit.py` `VisionTransformer` (`create_clip_vit_L`):
                   bias-free patch conv, `ln_pre`, `nn.MultiheadAttention` blocks (packed in_proj),
                   QuickGELU MLP, no `ln_post`.
The output is the last block's output, before any final LayerNorm: HF `post_layernorm` / LAVIS
`ln_vision` belongs to the composite model (`ln_vision`).

Images whose patch grid differs from `config.image_size // patch_size` get the patch positions
bicubically resized like torch `F.interpolate(mode="bicubic", align_corners=False)` (HF
`interpolate_pos_encoding=True`); the CLS position is kept.

Proven by tests/test_vit.py: HF parity (several configs, interpolated sizes, legacy q/v bias
checkpoints), a LAVIS-structured torch CLIP reference, the torch bicubic kernel, bf16, remat and
the conversion round trip.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from blip2_jax import nn as bnn
from blip2_jax.config import VisionConfig

_CUBIC_A = -0.75   # torch's bicubic coefficient (jax.image.resize uses -0.5)


def bicubic_matrix(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with `M @ x` == torch 1-D bicubic resize of x.

    Mirrors ATen's CPU kernel (UpSampleKernel.cpp, `HelperInterpCubic`): float32 source index
    `scale·(i+0.5)−0.5` (align_corners=False, scale = in/out) or `scale·i` (True, scale =
    (in−1)/(out−1)), `guard_index_and_lambda`, Keys' cubic with A=−0.75, border indices clamped
    (their weights summed). Agrees with torch's float32 weights to ~1e-6 absolute: the cubic
    polynomials cancel (terms ~3, results ~0.08), so the last bits depend on torch's compiled
    operation order; ours are the closer to the exact values.
    """
    f = np.float32
    if align_corners:
        scale = f(in_size - 1) / f(out_size - 1) if out_size > 1 else f(0)
    else:
        scale = f(in_size) / f(out_size)
    a = f(_CUBIC_A)

    def cc1(x):   # |x| <= 1
        return ((a + f(2)) * x - (a + f(3))) * x * x + f(1)

    def cc2(x):   # 1 < |x| < 2
        return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a

    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        src = scale * f(i) if align_corners else scale * (f(i) + f(0.5)) - f(0.5)
        src = f(src)
        idx = min(int(np.floor(src)), in_size - 1)
        t = f(min(max(src - f(idx), f(0)), f(1)))
        weights = (cc2(t + f(1)), cc1(t), cc1(f(1) - t), cc2(f(2) - t))
        for j, w in enumerate(weights):
            m[i, min(max(idx - 1 + j, 0), in_size - 1)] += w
    return m


def resize_pos_grid(grid, new_hw: tuple[int, int], align_corners: bool = False):
    """Bicubically resize a (h, w, D) position grid to `new_hw` (torch semantics), in fp32."""
    h, w, _ = grid.shape
    mh = jnp.asarray(bicubic_matrix(h, new_hw[0], align_corners))
    mw = jnp.asarray(bicubic_matrix(w, new_hw[1], align_corners))
    g = grid.astype(jnp.float32)
    g = jnp.einsum("iw,hwd->hid", mw, g)           # along the width first
    return jnp.einsum("jh,hid->jid", mh, g)


def interpolate_pos_embed(pos, new_hw: tuple[int, int], align_corners: bool = False):
    """(1 + g·g, D) positions of a g×g grid -> (1 + h·w, D) for an h×w grid; CLS row kept."""
    n, dim = pos.shape
    g = int(round((n - 1) ** 0.5))
    if g * g != n - 1:
        raise ValueError(f"position table of {n - 1} patches is not a square grid")
    if tuple(new_hw) == (g, g):
        return pos
    grid = resize_pos_grid(pos[1:].reshape(g, g, dim), new_hw, align_corners)
    return jnp.concatenate([pos[:1].astype(jnp.float32), grid.reshape(-1, dim)], 0)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN1(x)), then x + MLP(LN2(x)). Scan-compatible."""
    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype, pdt = bnn.dtype_of(cfg.dtype), bnn.dtype_of(cfg.param_dtype)
        ln = functools.partial(bnn.LayerNorm, cfg.layer_norm_eps, dtype=dtype, param_dtype=pdt)
        h, _ = bnn.Attention(cfg.num_heads, cfg.head_dim, cfg.hidden_size, use_bias=True,
                             fused_qkv=True, dtype=dtype, param_dtype=pdt,
                             name="attn")(ln(name="ln1")(x))
        x = x + h
        h = bnn.Mlp(cfg.intermediate_size, cfg.hidden_size, act=cfg.activation, dtype=dtype,
                    param_dtype=pdt, name="mlp")(ln(name="ln2")(x))
        return x + h, None


class VisionTransformer(nn.Module):
    """pixel_values (B, H, W, 3), normalised, channels last -> (B, 1 + patches, hidden).

    Params: patch_embed/{kernel (p, p, 3, D), bias (D,) [eva only]}, cls, pos_embed,
    ln_pre/{scale, bias} [clip only], layers/{ln1, attn/{qkv, out}, ln2, mlp/{fc1, fc2}} stacked
    on a leading layer axis. `cls`/`pos_embed` keep their source shapes: eva (1, 1, D) and
    (1, 1 + N, D) like HF/LAVIS-EVA; clip (D,) and (1 + N, D) like LAVIS CLIP.
    """
    config: VisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        if cfg.variant not in ("eva", "clip"):
            raise ValueError(f"unknown vision variant {cfg.variant!r} (eva or clip)")
        eva = cfg.variant == "eva"
        dtype, pdt = bnn.dtype_of(cfg.dtype), bnn.dtype_of(cfg.param_dtype)
        dim, p = cfg.hidden_size, cfg.patch_size
        batch, height, width, _ = pixel_values.shape
        gh, gw = height // p, width // p
        if gh == 0 or gw == 0:
            raise ValueError(f"image {height}x{width} is smaller than one {p}x{p} patch")

        x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", use_bias=eva, dtype=dtype,
                    param_dtype=pdt,
                    kernel_init=nn.with_logical_partitioning(bnn.default_kernel_init,
                                                             (None, None, None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                    name="patch_embed")(pixel_values.astype(dtype))
        x = x.reshape(batch, gh * gw, dim)             # row-major over the grid (torch flatten)

        n_pos = cfg.num_patches + 1
        init = nn.initializers.truncated_normal(0.02)
        if eva:
            cls = self.param("cls", nn.with_logical_partitioning(init, (None, None, "embed")),
                             (1, 1, dim), pdt)
            pos = self.param("pos_embed", nn.with_logical_partitioning(init, (None, None, "embed")),
                             (1, n_pos, dim), pdt)
        else:
            cls = self.param("cls", nn.with_logical_partitioning(init, ("embed",)), (dim,), pdt)
            pos = self.param("pos_embed", nn.with_logical_partitioning(init, (None, "embed")),
                             (n_pos, dim), pdt)
        pos = interpolate_pos_embed(pos.reshape(n_pos, dim), (gh, gw))
        cls = jnp.broadcast_to(cls.reshape(1, 1, dim).astype(dtype), (batch, 1, dim))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(dtype)[None]

        if not eva:
            x = bnn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=pdt, name="ln_pre")(x)

        x, _ = bnn.scan_layers(Block, cfg.num_layers, in_axes=(), remat=cfg.remat_policy,
                               name="layers", config=cfg)(x)
        return x
