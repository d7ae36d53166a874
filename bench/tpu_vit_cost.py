"""A/B of the frozen ViT's forward in XLA's TPU cost model, without a TPU: N layers of a config's
ViT (unrolled), `--rows` images per chip, compiled for a TPU topology (libtpu, as
`python -m blip2_jax.aot`); printed per variant: XLA's estimated time, its FLOPs and bytes, and
the estimated cycles of each layer part (read by bench/hlo_traffic.py's parser).

    python bench/tpu_vit_cost.py                                   # ViT-g, 2 layers, 27 rows, v5p
    python bench/tpu_vit_cost.py --config configs/stage1.py:vit_l --layers 4 --rows 37

Variants:
  current   blip2_jax.nn as it is (TPU: `_tpu_attention`, the fused qkv sliced by features)
  jax_attn  attention by `jax.nn.dot_product_attention`'s XLA form (fp32 logits) and the fused
            qkv reshaped to (…, 3, heads, head_dim) before slicing: the TPU path before the change
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


def _reshaped_qkv(self, x):
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/stage1.py:vit_g")
    p.add_argument("--topology", default="v5p:2x2x1")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=27, help="images per chip")
    p.add_argument("--variants", default="jax_attn,current")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from blip2_jax import aot, nn as bnn
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
    frozen = getattr(jnp, config.get("frozen_dtype") or "float32")
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, frozen, sharding=NamedSharding(mesh, P())), shapes)
    pixels = jax.ShapeDtypeStruct(image, jnp.float32, sharding=NamedSharding(mesh, P("data")))
    print(f"{a.config}: ViT {vc.hidden_size} wide, {vc.num_heads} heads, {a.layers} layers "
          f"unrolled, compute {vc.dtype}, {a.rows} rows per chip, {a.topology}")
    current = (bnn.dot_product_attention, bnn.Attention._fused)
    for name in a.variants.split(","):
        bnn.dot_product_attention, bnn.Attention._fused = current
        if name == "jax_attn":
            bnn.dot_product_attention, bnn.Attention._fused = _jax_attention, _reshaped_qkv
        elif name != "current":
            raise SystemExit(f"unknown variant {name!r}")
        with bnn.unrolled_layers():
            compiled = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(
                params, pixels).compile()
        cost = aot._cost(compiled)
        parts: dict = collections.defaultdict(int)
        for *_, op_name, cycles in hlo_traffic.entry_ops(compiled.as_text()):
            if "layers/" in op_name:
                parts[op_name.split("layers/")[1].split("/")[0]] += cycles
        top = ", ".join(f"{k} {v / 1e6 / a.layers:.2f}"
                        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  {name:9s} XLA estimate {1e3 * cost.get('optimal_seconds', -1):.3f} ms, "
              f"{cost.get('flops', 0):.3e} FLOPs, {cost.get('bytes accessed', 0) / 2**30:.2f} "
              f"GiB; M cycles per layer: {top}")
    bnn.dot_product_attention, bnn.Attention._fused = current
    return 0


if __name__ == "__main__":
    sys.exit(main())
