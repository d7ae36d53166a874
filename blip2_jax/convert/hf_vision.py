"""HF `Blip2VisionModel` <-> our `VisionTransformer` (variant "eva") key table.

HF layout (blip2.md §7.2): `vision_model.embeddings.{class_embedding, position_embedding,
patch_embedding.{weight,bias}}`, `vision_model.encoder.layers.{i}.{layer_norm1, self_attn.qkv,
self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}.*`. `vision_model.post_layernorm` is not part
of this tower (the composite maps it to `ln_vision`). Early-2023 HF checkpoints store
`self_attn.q_bias` / `self_attn.v_bias` instead of `self_attn.qkv.bias`: `adapt_legacy_qkv_bias`.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from blip2_jax.config import VisionConfig
from blip2_jax.convert.mapping import MappingError, Rule, linear, norm


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


_Q, _V, _QKV = ".self_attn.q_bias", ".self_attn.v_bias", ".self_attn.qkv.bias"


def adapt_legacy_qkv_bias(keys: Iterable[str], get: Callable[[str], np.ndarray]
                          ) -> tuple[set[str], Callable[[str], np.ndarray]]:
    """Present a source with `...self_attn.{q_bias,v_bias}` as one with `...self_attn.qkv.bias`.

    The fused bias is concat(q_bias, zeros, v_bias) (the key has no bias), built lazily when read.
    Sources without legacy keys come back unchanged. A q_bias without its v_bias (or a layer that
    has both layouts) raises MappingError.
    """
    keys = set(keys)
    prefixes = {k[:-len(_Q)] for k in keys if k.endswith(_Q)} | \
               {k[:-len(_V)] for k in keys if k.endswith(_V)}
    if not prefixes:
        return keys, get
    bad = sorted(p for p in prefixes if p + _Q not in keys or p + _V not in keys
                 or p + _QKV in keys)
    if bad:
        raise MappingError("legacy q_bias/v_bias keys are incomplete or clash with "
                           f"self_attn.qkv.bias at: {', '.join(bad)}")
    fused = {p + _QKV: p for p in prefixes}
    new_keys = (keys - {p + s for p in prefixes for s in (_Q, _V)}) | set(fused)

    def new_get(key: str) -> np.ndarray:
        p = fused.get(key)
        if p is None:
            return get(key)
        q, v = np.asarray(get(p + _Q)), np.asarray(get(p + _V))
        return np.concatenate([q, np.zeros_like(v), v])

    return new_keys, new_get
