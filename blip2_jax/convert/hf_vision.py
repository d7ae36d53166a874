"""HF `Blip2VisionModel` <-> our `VisionTransformer` (variant "eva") key table.

HF layout: `vision_model.embeddings.{class_embedding, position_embedding,
patch_embedding.{weight,bias}}`, `vision_model.encoder.layers.{i}.{layer_norm1, self_attn.qkv,
self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}.*`. `vision_model.post_layernorm` is not part
of this tower (the composite maps it to `ln_vision`). Early-2023 HF checkpoints store
`self_attn.q_bias` / `self_attn.v_bias` instead of `self_attn.qkv.bias`: `split_qkv_bias`.
"""
from __future__ import annotations

from typing import Iterable

from blip2_jax.config import VisionConfig
from blip2_jax.convert.mapping import Rule, linear, norm
from blip2_jax.convert.stream import Fused


def rules(cfg: VisionConfig, ours: str = "vision", theirs: str = "vision_model") -> list[Rule]:
    """Every leaf of our EVA vision subtree -> its HF key (one key per layer for stacked leaves)."""
    if cfg.variant != "eva":
        raise ValueError(f"HF Blip2VisionModel is the EVA ViT; this config is {cfg.variant!r} "
                         "(use convert.lavis_vision.lavis_clip_rules for CLIP ViT-L)")
    emb = f"{theirs}.embeddings"
    layer = f"{theirs}.encoder.layers.{{i}}"
    ls = tuple(range(cfg.num_layers))
    out = [
        Rule(f"{ours}/patch_embed/kernel", f"{emb}.patch_embedding.weight", "conv"),
        Rule(f"{ours}/patch_embed/bias", f"{emb}.patch_embedding.bias"),
        Rule(f"{ours}/cls", f"{emb}.class_embedding"),
        Rule(f"{ours}/pos_embed", f"{emb}.position_embedding"),
    ]
    out += norm(f"{ours}/layers/ln1", f"{layer}.layer_norm1", ls)
    out += linear(f"{ours}/layers/attn/qkv", f"{layer}.self_attn.qkv", ls)
    out += linear(f"{ours}/layers/attn/out", f"{layer}.self_attn.projection", ls)
    out += norm(f"{ours}/layers/ln2", f"{layer}.layer_norm2", ls)
    out += linear(f"{ours}/layers/mlp/fc1", f"{layer}.mlp.fc1", ls)
    out += linear(f"{ours}/layers/mlp/fc2", f"{layer}.mlp.fc2", ls)
    return out


def split_qkv_bias(keys: Iterable[str], hidden: int, q: str = ".self_attn.q_bias",
                   v: str = ".self_attn.v_bias", fused: str = ".self_attn.qkv.bias"
                   ) -> list[Fused]:
    """The fused qkv bias of every layer that stores `q_bias` / `v_bias` (early-2023 HF, LAVIS):
    concat(q_bias, zeros, v_bias), the key having no bias. Use with `stream.fuse_present`, which
    refuses a layer with only one of the two, or with both layouts."""
    keys = set(keys)
    prefixes = {k[:-len(q)] for k in keys if k.endswith(q)} | \
               {k[:-len(v)] for k in keys if k.endswith(v)}
    return [Fused(p + fused, ((p + q, hidden), (None, hidden), (p + v, hidden)))
            for p in sorted(prefixes)]
