"""Salesforce LAVIS BLIP-2 checkpoints (`.pth`) <-> our parameter tree; EVA / CLIP tower files.

LAVIS models: stage 1 `Blip2Qformer` (`blip2`, `blip2_feature_extractor`,
`blip2_image_text_matching`), stage 2 `Blip2OPT` (`blip2_opt`) and `Blip2T5` (`blip2_t5`). Their
keys are HF's under HF's conversion renames run backwards, so the tables here are
the HF tables with renamed keys, plus what HF lacks:
  * the EVA attention bias stored as `attn.q_bias` + `attn.v_bias` (our fused qkv bias has a zero
    key part; writing refuses a non-zero one), and the CLIP ViT-L tower (`lavis_vision`);
  * `temp` and the ITG head `Qformer.cls.predictions.*`;
  * written, never read: what torch's `state_dict()` holds besides parameters — the
    `position_ids` buffer and tied copies (`cls.predictions.decoder.*`, the LLM's tied
    embeddings) — so a full export loads into LAVIS with `load_state_dict(strict=True)`.
Released LAVIS files hold only the trainable parameters (`save_checkpoint` drops the frozen
`visual_encoder.*` and `opt_model.*`/`t5_model.*`); the towers then come from their own files:
`eva_vit_g.pth` (EVA ViT-g, 40 blocks of which BLIP-2 uses 39), LAVIS's `clip_vit_L.pth` (or an
OpenAI CLIP state dict, `visual.` keys; 24 blocks, 23 used, no ln_post/proj) and the HF OPT /
FlanT5 directories (`convert.sources`). LAVIS numerics: `lavis_numerics`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Optional

import numpy as np

from blip2_jax import config as config_lib
from blip2_jax.config import Blip2Config, ConfigError, OPTConfig, VisionConfig
from blip2_jax.convert import hf_opt, hf_qformer, hf_t5, hf_vision, lavis_vision, pth, stream
from blip2_jax.convert.mapping import MappingError, Rule, linear, norm
from blip2_jax.convert.stream import Entry, Fused, KeySource

LAVIS_LN_VISION_EPS = 1e-5      # torch's default LayerNorm eps; HF's post_layernorm uses 1e-6
POSITION_IDS = "Qformer.bert.embeddings.position_ids"
FROZEN_PREFIXES = ("visual_encoder.", "opt_model.", "t5_model.")
PARTS = ("full", "trainable")
CONFIG_ENTRY = "blip2_jax_config"   # our config, stored beside "model" in the .pth we write

_EVA_RENAMES = (("embeddings.class_embedding", "cls_token"),
                ("embeddings.position_embedding", "pos_embed"),
                ("embeddings.patch_embedding.", "patch_embed.proj."),
                ("encoder.layers.", "blocks."), (".layer_norm1.", ".norm1."),
                (".layer_norm2.", ".norm2."), (".self_attn.qkv.", ".attn.qkv."),
                (".self_attn.projection.", ".attn.proj."))


def lavis_numerics(cfg: Blip2Config) -> Blip2Config:
    """`cfg` computing what LAVIS computes: `ln_vision` eps 1e-5. The other
    LAVIS/HF differences are either in the presets already (exact GELU in FlanT5's FFN, OPT's
    "\\n" EOS) or below fp32 resolution (LAVIS scales q before q·k, HF the product; -10000 vs
    dtype-min masks on all-ones image masks)."""
    return cfg.replace(vision=dataclasses.replace(cfg.vision,
                                                  post_layer_norm_eps=LAVIS_LN_VISION_EPS))


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def vision_rules(cfg: VisionConfig, prefix: str = "visual_encoder.") -> list[Rule]:
    """Our `vision/` <-> LAVIS's image encoder keys under `prefix` ("" = the tower's own file).
    EVA's attention bias appears as the fused key `...attn.qkv.bias` (see `fused`)."""
    if cfg.variant == "clip":
        return lavis_vision.lavis_clip_rules(cfg, theirs=prefix[:-1] if prefix else "")
    out = []
    for r in hf_vision.rules(cfg, theirs="V"):
        key = r.theirs[len("V."):]
        for hf_name, lavis_name in _EVA_RENAMES:
            key = key.replace(hf_name, lavis_name)
        out.append(dataclasses.replace(r, theirs=prefix + key))
    return out


def qformer_rules(cfg: Blip2Config) -> list[Rule]:
    out = []
    for r in hf_qformer.rules(cfg.qformer, theirs="Qformer.bert",
                              embeddings="Qformer.bert.embeddings"):
        key = r.theirs.replace("Qformer.bert.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
        out.append(dataclasses.replace(r, theirs=key.replace("attention.attention.",
                                                             "attention.self.")))
    return out


def _llm(cfg: Blip2Config):
    return (hf_opt if isinstance(cfg.llm, OPTConfig) else hf_t5), f"{cfg.llm_kind}_model"


def rules(cfg: Blip2Config) -> list[Rule]:
    """Every leaf of our tree for `cfg` <-> its LAVIS key."""
    table = vision_rules(cfg.vision) + norm("ln_vision", "ln_vision")
    table += [Rule("query_tokens", "query_tokens")] + qformer_rules(cfg)
    if cfg.itc:
        table += linear("vision_proj", "vision_proj") + linear("text_proj", "text_proj")
        table += [Rule("temp", "temp")]
    if cfg.itm:
        table += linear("itm_head", "itm_head")
    if cfg.itg:
        table += hf_qformer.mlm_head_rules("Qformer.")
    if cfg.llm is not None:
        module, prefix = _llm(cfg)
        table += linear("llm_proj", f"{cfg.llm_kind}_proj")
        table += module.rules(cfg.llm, ours="llm", theirs=prefix)
    return table


def fused(cfg: VisionConfig, prefix: str = "visual_encoder.") -> list[Fused]:
    """EVA blocks: the fused qkv bias <-> `attn.q_bias`, (no key bias), `attn.v_bias`."""
    if cfg.variant != "eva":
        return []
    d = cfg.hidden_size
    return [Fused(f"{prefix}blocks.{i}.attn.qkv.bias",
                  ((f"{prefix}blocks.{i}.attn.q_bias", d), (None, d),
                   (f"{prefix}blocks.{i}.attn.v_bias", d))) for i in range(cfg.num_layers)]


def _copies(cfg: Blip2Config) -> dict[str, str]:
    """Tied keys torch's state_dict also holds: LAVIS key -> our leaf it copies."""
    out = {}
    if cfg.itg:
        out["Qformer.cls.predictions.decoder.weight"] = "qformer/embeddings/word/embedding"
        out["Qformer.cls.predictions.decoder.bias"] = "lm_head/bias"
    if cfg.llm is not None:
        module, prefix = _llm(cfg)
        embed = "llm/embed_tokens/embedding" if cfg.llm_kind == "opt" else "llm/shared/embedding"
        out.update({k: embed for k in module.tied_keys(cfg.llm, theirs=prefix)})
    return out


def ignorable(cfg: Blip2Config) -> list[str]:
    """Regexes of LAVIS keys that may be present and are not read (buffers, tied copies)."""
    return [re.escape(POSITION_IDS)] + [re.escape(k) for k in _copies(cfg)]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def open_pth(path: str) -> tuple[KeySource, Optional[Blip2Config]]:
    """(the state dict's tensors, the config we stored beside it, if this file is ours)."""
    tree = pth.load(path)
    saved = tree.get(CONFIG_ENTRY) if isinstance(tree, dict) else None
    cfg = Blip2Config.from_dict(saved) if isinstance(saved, dict) else None
    return stream.LazySource(pth.state_dict(path), path), cfg


def is_blip2(source: KeySource) -> bool:
    return any(k.startswith(("Qformer.", "query_tokens", "ln_vision.")) for k in source.keys())


def leaves(source: KeySource, cfg: Blip2Config) -> dict[str, stream.Leaf]:
    """Our leaves that a LAVIS state dict holds (a trainable-only file lacks the frozen towers);
    unknown keys or a tower only partly present fail naming every key."""
    source = stream.fuse_present(source, hf_vision.split_qkv_bias(
        source.keys(), cfg.vision.hidden_size, ".attn.q_bias", ".attn.v_bias", ".attn.qkv.bias"))
    return stream.leaves_from_rules(rules(cfg), source, ignore=ignorable(cfg), partial=True,
                                    shapes=stream.model_shapes(cfg))


def _component_prefix(source: KeySource, marker: str) -> str:
    keys = source.keys()
    for prefix in ("", "visual.", "visual_encoder."):
        if prefix + marker in keys:
            return prefix
    raise MappingError(f"{source.name}: no {marker} (nor visual.{marker}): not this tower's file")


def tower_leaves(source: KeySource, cfg: VisionConfig) -> dict[str, stream.Leaf]:
    """`vision/` from an image encoder's own file: EVA (`eva_vit_g.pth`: `cls_token`,
    `blocks.{i}.*`) or CLIP (LAVIS `clip_vit_L.pth` / OpenAI: `conv1.weight`,
    `transformer.resblocks.{i}.*`), keys optionally under `visual.`. Blocks past the model's depth
    (BLIP-2 drops the last), the original heads (`norm`, `fc_norm`, `head`, CLIP `ln_post`,
    `proj`) and, under `visual.`, the other towers' keys are not read."""
    clip = cfg.variant == "clip"
    prefix = _component_prefix(source, "conv1.weight" if clip else "cls_token")
    blocks = "transformer.resblocks" if clip else "blocks"
    p = re.escape(prefix)
    deeper = sorted({int(m.group(1)) for k in source.keys()
                     if (m := re.match(rf"{p}{re.escape(blocks)}\.(\d+)\.", k))
                     and int(m.group(1)) >= cfg.num_layers})
    ignore = [rf"{p}{re.escape(blocks)}\.{i}\..*" for i in deeper]
    ignore += ([rf"{p}ln_post\..*", rf"{p}proj"] if clip else
               [rf"{p}norm\..*", rf"{p}fc_norm\..*", rf"{p}head\..*"])
    if prefix:
        ignore.append(rf"(?!{p}).*")
    src = stream.fuse_present(source, fused(cfg, prefix))
    shapes = {k[len("vision/"):]: v for k, v in stream.model_shapes(
        Blip2Config(vision=cfg, qformer=config_lib.QFormerConfig(
            encoder_hidden_size=cfg.hidden_size))).items() if k.startswith("vision/")}
    return stream.leaves_from_rules(vision_rules(cfg, prefix), src, ignore=ignore,
                                    shapes={f"vision/{k}": v for k, v in shapes.items()})


def infer_config(source: KeySource) -> Blip2Config:
    """The model a LAVIS state dict describes, from its keys and shapes (LAVIS numerics).

    The LLM's own shape comes from `opt_model.*`/`t5_model.*` when the file has them, else from
    the projection width (OPT-2.7B/6.7B as `facebook/opt-*`, FlanT5-XL/XXL); pass a config when
    the file is of another model.
    """
    keys, shape = source.keys(), source.shape
    if "ln_vision.weight" not in keys or "query_tokens" not in keys:
        raise ConfigError(f"{source.name}: no ln_vision / query_tokens: not a LAVIS BLIP-2 "
                          "state dict (pass the config, or the file as a tower source)")
    width = shape("ln_vision.weight")[0]
    towers = {1408: config_lib.EVA_VIT_G, 1024: config_lib.CLIP_VIT_L}
    if width not in towers:
        raise ConfigError(f"{source.name}: image features of width {width} are neither EVA "
                          "ViT-g (1408) nor CLIP ViT-L (1024); pass the config")
    vision = towers[width]
    pos = [k for k in ("visual_encoder.pos_embed", "visual_encoder.positional_embedding")
           if k in keys]
    if pos:
        side = math.isqrt(int(np.prod(shape(pos[0]))) // width - 1)
        vision = dataclasses.replace(vision, image_size=side * vision.patch_size)
    layers = {int(m.group(1)) for k in keys
              if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))}
    cross = {int(m.group(1)) for k in keys
             if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.", k))}
    words = "Qformer.bert.embeddings.word_embeddings.weight"
    qformer = config_lib.QFormerConfig(
        num_layers=len(layers), has_text_input=words in keys,
        cross_attention_frequency=2 if 1 not in cross else 1, encoder_hidden_size=width,
        **({"vocab_size": shape(words)[0]} if words in keys else {}))
    cfg = Blip2Config(vision=vision, qformer=qformer, num_query_tokens=shape("query_tokens")[1])
    if "opt_proj.weight" in keys or "t5_proj.weight" in keys:
        kind = "opt" if "opt_proj.weight" in keys else "t5"
        d = shape(f"{kind}_proj.weight")[0]
        known = ({2560: config_lib.OPT_2_7B, 4096: config_lib.OPT_6_7B} if kind == "opt" else
                 {2048: config_lib.FLAN_T5_XL, 4096: config_lib.FLAN_T5_XXL})
        if d not in known:
            raise ConfigError(f"{source.name}: {kind}_proj width {d} is no released LLM; pass "
                              "the config")
        llm = known[d]
        embed = ("opt_model.model.decoder.embed_tokens.weight" if kind == "opt"
                 else "t5_model.shared.weight")
        vocab = shape(embed)[0] if embed in keys else (50272 if kind == "opt" else None)
        if vocab is not None:
            llm = dataclasses.replace(llm, vocab_size=vocab)
        cfg = cfg.replace(llm=llm)
    else:
        cfg = cfg.replace(itc="vision_proj.weight" in keys, itm="itm_head.weight" in keys,
                          itg="Qformer.cls.predictions.bias" in keys)
        if "vision_proj.weight" in keys:
            cfg = cfg.replace(embed_dim=shape("vision_proj.weight")[0])
    return lavis_numerics(cfg)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def entries(cfg: Blip2Config, leaves: Mapping[str, stream.Leaf], parts: str = "full",
            dtype=None) -> tuple[list[Entry], list[str]]:
    """(tensors to write, notes on what a LAVIS model has that this one lacks).

    parts: "full" — every key of the LAVIS model's state_dict (strict=True loads it);
    "trainable" — what LAVIS's own checkpoints hold (no `visual_encoder.*`, no LLM).
    """
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
    table = rules(cfg)
    todo = stream.entries_for_rules(table, leaves, dtype)
    positions = cfg.qformer.max_position_embeddings
    todo.append(Entry(POSITION_IDS, (1, positions), np.dtype(np.int64),
                      lambda: [np.arange(positions, dtype=np.int64)[None]]))
    for key, leaf_name in _copies(cfg).items():
        leaf = leaves[leaf_name]
        todo.append(Entry(key, leaf.shape, np.dtype(stream.cast(np.empty(0, leaf.dtype),
                                                                dtype).dtype),
                          lambda leaf=leaf: [stream.cast(leaf.value(), dtype)]))
    if parts == "trainable":
        todo = [e for e in todo if not e.name.startswith(FROZEN_PREFIXES)]
    todo = stream.split_fused(todo, fused(cfg.vision))
    notes = []
    if cfg.llm is None:
        lacking = [name for flag, name in ((cfg.itc, "vision_proj/text_proj/temp (ITC)"),
                                           (cfg.itm, "itm_head (ITM)"),
                                           (cfg.itg, "Qformer.cls.* (the ITG head)")) if not flag]
        if lacking:
            notes.append("LAVIS Blip2Qformer also has " + ", ".join(lacking) + ", which this "
                         "model lacks: LAVIS keeps its fresh ones (load with strict=False)")
    if parts == "trainable":
        notes.append("trainable parameters only, as LAVIS releases them: LAVIS builds the image "
                     "encoder and the LLM from their own files")
    return todo, notes


def write(path: str, cfg: Blip2Config, leaves: Mapping[str, stream.Leaf], parts: str = "full",
          dtype=None) -> list[str]:
    """Write `{"model": state_dict, "blip2_jax_config": ...}` to `path`, streamed; the notes."""
    todo, notes = entries(cfg, leaves, parts, dtype)
    with pth.PthWriter(path, wrap="model", extra={CONFIG_ENTRY: cfg.to_dict()}) as writer:
        for name, array in stream.iter_entries(todo):
            writer.add(name, array)
    return notes


def check_writable(cfg: Blip2Config) -> None:
    """LAVIS has no model for a config whose towers it cannot build."""
    if cfg.llm is not None and (cfg.itc or cfg.itm or cfg.itg):
        raise ConfigError("LAVIS has no model with both stage-1 heads and an LLM")
    if cfg.qformer_text_input:
        raise ConfigError("LAVIS export writes BLIP-2 layouts; an instruction-aware Q-Former "
                          "(InstructBLIP, qformer_text_input) is not one of them: save with "
                          "format='hf' or 'native'")
    if cfg.llm_kind == "llama":
        raise ConfigError("LAVIS's BLIP-2 has no LLaMA model (its Vicuna models are "
                          "InstructBLIP); save with format='hf' or 'native'")
