"""A/B of the frozen ViT's forward in XLA's TPU cost model, without a TPU: N layers of a config's
ViT (unrolled), `--rows` images per chip, compiled for a TPU topology (libtpu, as
`python -m blip2_jax.aot`); printed per variant: XLA's estimated time, its FLOPs and bytes, and
the estimated cycles of each layer part (read by bench/hlo_traffic.py's parser).

    python bench/tpu_vit_cost.py                                   # ViT-g, 2 layers, 27 rows, v5p
    python bench/tpu_vit_cost.py --config configs/stage1.py:vit_l --layers 4 --rows 37
    python bench/tpu_vit_cost.py --config configs/vqa_ft.py:opt-2.7b --layers 1 --rows 2 --grad

Variants:
  current   blip2_jax.nn as it is (TPU: the ViT's self-attention by the Pallas flash kernel,
            `Attention._flash_self_attention`, = flash_nopad_hmo)
  xla       the XLA form: `_tpu_attention`, the fused qkv sliced by features (code B)
  jax_attn  attention by `jax.nn.dot_product_attention`'s XLA form (fp32 logits) and the fused
            qkv reshaped to (…, 3, heads, head_dim) before slicing: the TPU path before the change
  flash     the self-attention by JAX's Pallas TPU flash kernel (`nn._flash_attention`: tokens
            padded to a multiple of 128, pad keys masked by segment ids, within `jax.shard_map`
            over the batch axes); `flash:Q/K/B` with block_q, block_k (= block_k_major), block_b
            (default 128/128/1); `flash_nopad:Q/K/B`: no padding
            (block_k = the token count, no segment ids); `_hm`: q, k, v projected head-major
            (B, heads, T, D), as the kernel reads them; `_hmo`: also the output projection
            contracting (heads, D) of the kernel's output (no re-layout)
  no_core_hmo  `flash_nopad_hmo` with the attention core left out (q + k + v for its output):
            what the rest of the layer costs; the difference is what XLA charges for the kernel
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import hlo_traffic  # noqa: E402  (bench/, beside this file)
from blip2_jax import run_config


def _jax_attention(q, k, v, *, mask=None, bias=None, scale=1.0, dropout_rate=0.0,
                   dropout_rng=None):
    import jax
    return jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias, scale=scale)


_PLACEMENT = []    # blip2_jax.nn's own _flash_placement (the variants replace it)


def _flash(blocks, pad=True):
    import functools
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    from blip2_jax import nn as bnn
    sizes = None
    if blocks:
        bq, bk, bb = (int(x) for x in blocks.split("/"))
        sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=bb)

    def attention(q, k, v, *, mask=None, bias=None, scale=1.0, dropout_rate=0.0,
                  dropout_rng=None):
        assert mask is None and bias is None and not dropout_rate
        return bnn._flash_attention(q, k, v, scale=scale, placement=_PLACEMENT[0](),
                                    block_sizes=sizes, pad=pad)
    return attention


def _head_major_qkv(self, x):
    """q, k, v each by its own projection emitting (B, heads, T, D), given back as (B, T, heads, D):
    the layout the flash kernel reads, so XLA can write it from the matmul."""
    import jax.numpy as jnp
    import flax.linen
    p = flax.linen.unbox(self.qkv.variables["params"])
    n, d, dt = self.num_heads, self.head_dim, self.dtype
    w = p["kernel"].astype(dt).reshape(p["kernel"].shape[0], 3, n, d)
    b = p["bias"].astype(dt).reshape(3, n, d)
    x = x.astype(dt)
    return tuple((jnp.einsum("bte,ehd->bhtd", x, w[:, i]) + b[i][None, :, None]).transpose(
        0, 2, 1, 3) for i in range(3))


def _head_major_call(self, x, **kw):
    """`Attention.__call__` of fused self-attention with head-major q, k, v (`_head_major_qkv`)
    and the output projection contracting (heads, head_dim) of the attention's output directly,
    with no reshape of it to (…, heads·head_dim)."""
    import flax.linen
    import jax.numpy as jnp
    from blip2_jax import nn as bnn
    q, k, v = _head_major_qkv(self, x)
    y = bnn.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
    p = flax.linen.unbox(self.out.variables["params"])
    w = p["kernel"].astype(self.dtype).reshape(self.num_heads, self.head_dim, -1)
    return jnp.einsum("bthd,hde->bte", y, w) + p["bias"].astype(self.dtype), None


def _reshaped_qkv(self, x):
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/stage1.py:vit_g")
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=27, help="images per chip")
    p.add_argument("--variants", default="xla,current")
    p.add_argument("--grad", action="store_true",
                   help="the gradient of the output's sum by the parameters (fp32, the ViT trained "
                        "as in configs/vqa_ft.py) instead of the forward with frozen parameters")
    p.add_argument("--ops", action="store_true",
                   help="also list the attention's ops of the first layer with their cycles")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from blip2_jax import aot, nn as bnn, sharding
    from blip2_jax.models.vit import VisionTransformer

    path, _, arg = a.config.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    config = config_module.get_config(arg or None)
    vc = dataclasses.replace(run_config.model_config(config).vision, num_layers=a.layers)
    devices = aot.topology_devices(a.topology)
    mesh = Mesh(np.array(devices), ("data",))
    module = VisionTransformer(vc)
    image = (a.rows * len(devices), vc.image_size, vc.image_size, 3)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1,) + image[1:]))["params"])
    frozen = jnp.float32 if a.grad else getattr(jnp, config.get("frozen_dtype") or "float32")
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, frozen, sharding=NamedSharding(mesh, P())), shapes)
    pixels = jax.ShapeDtypeStruct(image, jnp.float32, sharding=NamedSharding(mesh, P("data")))
    print(f"{a.config}: ViT {vc.hidden_size} wide, {vc.num_heads} heads, {a.layers} layers "
          f"unrolled, compute {vc.dtype}, {a.rows} rows per chip, {a.topology}"
          + (f", gradient (remat {vc.remat_policy})" if a.grad else ""))
    current = (bnn.dot_product_attention, bnn.Attention._fused, bnn.Attention.__call__,
               bnn._flash_placement)
    _PLACEMENT[:] = [bnn._flash_placement]
    for name in a.variants.split(","):
        (bnn.dot_product_attention, bnn.Attention._fused, bnn.Attention.__call__,
         bnn._flash_placement) = current
        if name != "current":
            bnn._flash_placement = lambda: None          # Attention's XLA form, then patched
        if name == "xla":
            pass
        elif name == "jax_attn":
            bnn.dot_product_attention, bnn.Attention._fused = _jax_attention, _reshaped_qkv
        elif name.split(":")[0] in ("flash", "flash_nopad", "flash_hm", "flash_nopad_hm",
                                    "flash_hmo", "flash_nopad_hmo"):
            kind, _, blocks = name.partition(":")
            bnn.dot_product_attention = _flash(blocks, "nopad" not in kind)
            if kind.endswith("_hm"):
                bnn.Attention._fused = _head_major_qkv
            if kind.endswith("_hmo"):
                bnn.Attention.__call__ = _head_major_call
        elif name == "no_core_hmo":
            bnn.dot_product_attention = lambda q, k, v, **kw: q + k + v
            bnn.Attention.__call__ = _head_major_call
        elif name != "current":
            raise SystemExit(f"unknown variant {name!r}")
        with bnn.unrolled_layers(), sharding.activation_sharding(mesh):
            def forward(p, x):
                return module.apply({"params": p}, x)
            compiled = jax.jit(jax.grad(lambda p, x: forward(p, x).astype(jnp.float32).sum())
                               if a.grad else forward).lower(params, pixels).compile()
        cost = aot._cost(compiled)
        parts: dict = collections.defaultdict(int)
        attn_ops = []
        for op, shape, opcode, _, op_name, cycles in hlo_traffic.entry_ops(compiled.as_text()):
            if "layers/" in op_name:
                part = op_name.split("layers/")[1].split("/")[0]
                parts[part] += cycles
                if part == "attn":
                    attn_ops.append((opcode, shape, op_name.split("attn/")[-1], cycles))
        top = ", ".join(f"{k} {v / 1e6 / a.layers:.2f}"
                        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  {name:14s} XLA estimate {1e3 * cost.get('optimal_seconds', -1):.3f} ms, "
              f"{cost.get('flops', 0):.3e} FLOPs, {cost.get('bytes accessed', 0) / 2**30:.2f} "
              f"GiB; M cycles per layer: {top}")
        if a.ops:
            kinds: dict = collections.defaultdict(int)
            for opcode, shape, where, cycles in attn_ops:
                kinds[(opcode, shape, where)] += cycles
            for (opcode, shape, where), cycles in sorted(kinds.items(), key=lambda kv: -kv[1]):
                print(f"      {cycles / 1e6 / a.layers:6.3f} {opcode:12s} {shape[:56]:56s} "
                      f"{where[-60:]}")
    (bnn.dot_product_attention, bnn.Attention._fused, bnn.Attention.__call__,
     bnn._flash_placement) = current
    return 0


if __name__ == "__main__":
    sys.exit(main())
