"""LAVIS CLIP ViT-L (`lavis/models/clip_vit.py`) <-> our `VisionTransformer` (variant "clip").

LAVIS layout: `visual_encoder.{conv1.weight, class_embedding (D,),
positional_embedding (1+N, D), ln_pre.*}`, `visual_encoder.transformer.resblocks.{i}.{ln_1,
attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}.*`.
`ln_vision` is not part of this tower (the composite maps it).

Note: LAVIS resizes `positional_embedding` at *load* time for other image sizes with
`align_corners=True` (clip_vit.py `interpolate_pos_embed`); do that on the source table with
`blip2_jax.models.vit.interpolate_pos_embed(..., align_corners=True)` before loading if a LAVIS
model built for another resolution must be reproduced. The original CLIP file has 24 blocks;
LAVIS builds 23 and loads with strict=False: `convert.lavis.tower_leaves` reads such files.
"""
from __future__ import annotations

from blip2_jax.config import VisionConfig
from blip2_jax.convert.mapping import Rule, linear, norm


def lavis_clip_rules(cfg: VisionConfig, ours: str = "vision",
                     theirs: str = "visual_encoder") -> list[Rule]:
    if cfg.variant != "clip":
        raise ValueError(f"lavis_clip_rules is for the CLIP ViT; this config is {cfg.variant!r}")
    p = f"{theirs}." if theirs else ""      # "" = the tower's own file (clip_vit_L.pth)
    block = f"{p}transformer.resblocks.{{i}}"
    ls = tuple(range(cfg.num_layers))
    out = [
        Rule(f"{ours}/patch_embed/kernel", f"{p}conv1.weight", "conv"),
        Rule(f"{ours}/cls", f"{p}class_embedding"),
        Rule(f"{ours}/pos_embed", f"{p}positional_embedding"),
    ]
    out += norm(f"{ours}/ln_pre", f"{p}ln_pre")
    out += norm(f"{ours}/layers/ln1", f"{block}.ln_1", ls)
    out += [Rule(f"{ours}/layers/attn/qkv/kernel", f"{block}.attn.in_proj_weight", "linear", ls),
            Rule(f"{ours}/layers/attn/qkv/bias", f"{block}.attn.in_proj_bias", "same", ls)]
    out += linear(f"{ours}/layers/attn/out", f"{block}.attn.out_proj", ls)
    out += norm(f"{ours}/layers/ln2", f"{block}.ln_2", ls)
    out += linear(f"{ours}/layers/mlp/fc1", f"{block}.mlp.c_fc", ls)
    out += linear(f"{ours}/layers/mlp/fc2", f"{block}.mlp.c_proj", ls)
    return out
