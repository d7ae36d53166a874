"""Salesforce LAVIS BLIP-2 / InstructBLIP checkpoints (`.pth`) <-> our parameter tree; EVA / CLIP
tower files.

LAVIS models: stage 1 `Blip2Qformer` (`blip2`, `blip2_feature_extractor`,
`blip2_image_text_matching`), stage 2 `Blip2OPT` (`blip2_opt`) and `Blip2T5` (`blip2_t5`), and
InstructBLIP `Blip2VicunaInstruct` (`blip2_vicuna_instruct`: LLaMA/Vicuna as `llm_model.*`,
projection `llm_proj`) and `Blip2T5Instruct` (`blip2_t5_instruct`: `t5_model.*`, `t5_proj`),
whose Q-Former keeps BERT's word/position tables and text FFN (the instruction goes through it;
`qformer_text_input=False` drops them as stage 2 does). Their keys are HF's under HF's
conversion renames (BLIP-2's and InstructBLIP's scripts) run backwards, so the tables here are
the HF tables with renamed keys, plus what HF lacks:
  * the EVA attention bias stored as `attn.q_bias` + `attn.v_bias` (our fused qkv bias has a zero
    key part; writing refuses a non-zero one), and the CLIP ViT-L tower (`lavis_vision`);
  * `temp` and the ITG head `Qformer.cls.predictions.*`;
  * written, never read: what torch's `state_dict()` holds besides parameters — the
    `position_ids` buffer, the rotary `inv_freq` buffer of each layer of LAVIS's own LLaMA
    (`modeling_llama.py`, a transformers-4.28 copy, registers it persistent) and tied copies
    (`cls.predictions.decoder.*`, the LLM's tied embeddings) — so a full export loads into
    LAVIS with `load_state_dict(strict=True)`.
Released LAVIS files hold only the trainable parameters (`save_checkpoint` drops the frozen
`visual_encoder.*` and `opt_model.*`/`t5_model.*`; the InstructBLIP `*_trimmed.pth` files are
loaded the same way, beside a Vicuna / FlanT5 directory and `eva_vit_g.pth`, and are taken to
hold the same parts — not checked against the released files); the towers then come from their
own files: `eva_vit_g.pth` (EVA ViT-g, 40 blocks of which BLIP-2 uses 39), LAVIS's
`clip_vit_L.pth` (or an OpenAI CLIP state dict, `visual.` keys; 24 blocks, 23 used, no
ln_post/proj) and the HF OPT / FlanT5 / LLaMA directories (`convert.sources`). A "trainable"
export drops everything under those prefixes, buffers included (LAVIS's own `save_checkpoint`
would keep the rotary buffers; LAVIS loads with strict=False and recomputes them). LAVIS
numerics: `lavis_numerics`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Optional

import numpy as np

from blip2_jax import config as config_lib
from blip2_jax.config import Blip2Config, ConfigError, LlamaConfig, VisionConfig
from blip2_jax.convert import (hf_llama, hf_opt, hf_qformer, hf_t5, hf_vision, lavis_vision, pth,
                               stream)
from blip2_jax.convert.mapping import MappingError, Rule, _clip, linear, norm
from blip2_jax.convert.stream import Entry, Fused, KeySource
from blip2_jax.models.llama import rope_inv_freq

LAVIS_LN_VISION_EPS = 1e-5      # torch's default LayerNorm eps; HF's post_layernorm uses 1e-6
POSITION_IDS = "Qformer.bert.embeddings.position_ids"
# LAVIS's attribute names of the language model and of its input projection, by our llm_kind.
LLM_NAMES = {"opt": ("opt_model", "opt_proj"), "t5": ("t5_model", "t5_proj"),
             "llama": ("llm_model", "llm_proj")}
LLM_TABLES = {"opt": hf_opt, "t5": hf_t5, "llama": hf_llama}
FROZEN_PREFIXES = ("visual_encoder.",) + tuple(f"{m}." for m, _ in LLM_NAMES.values())
PARTS = ("full", "trainable")
CONFIG_ENTRY = "blip2_jax_config"   # our config, stored beside "model" in the .pth we write
INSTRUCT_MODELS = {"llama": "blip2_vicuna_instruct", "t5": "blip2_t5_instruct"}
ROTARY_BUFFER = "llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"
# LAVIS's Vicuna: its LlamaTokenizer gets pad "[PAD]" (a new id 32000: the LLM is resized to
# 32001 rows) and "</s>" (2) as BOS, EOS and UNK.
LAVIS_VICUNA_IDS = dict(vocab_size=32001, bos_token_id=2, eos_token_id=2, pad_token_id=32000)
LAVIS_QFORMER_VOCAB = 30523     # bert-base-uncased + "[DEC]" (the instruct Q-Former's table)


class LavisVariantError(ConfigError):
    """A LAVIS state dict whose keys (or shapes) fit no LAVIS BLIP-2 / InstructBLIP model; the
    message names the keys or values at fault."""

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
    """(the LLM's key table, LAVIS's attribute name of the LLM, of its projection)."""
    return (LLM_TABLES[cfg.llm_kind],) + LLM_NAMES[cfg.llm_kind]


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
        module, prefix, proj = _llm(cfg)
        table += linear("llm_proj", proj)
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
        module, prefix, _ = _llm(cfg)
        embed = "llm/shared/embedding" if cfg.llm_kind == "t5" else "llm/embed_tokens/embedding"
        out.update({k: embed for k in module.tied_keys(cfg.llm, theirs=prefix)})
    return out


def ignorable(cfg: Blip2Config) -> list[str]:
    """Regexes of LAVIS keys that may be present and are not read (buffers, tied copies)."""
    out = [re.escape(POSITION_IDS)] + [re.escape(k) for k in _copies(cfg)]
    if cfg.llm_kind == "llama":          # rotary inv_freq buffers (recomputed from the config)
        out += hf_llama.ignorable(cfg.llm, theirs=LLM_NAMES["llama"][0])
    return out


# ----------------------------------------------------------------------------------------------
# Which LAVIS model a state dict is of
# ----------------------------------------------------------------------------------------------
# The Q-Former's text side: BERT's word/position tables and the text FFN of every layer (the
# query FFN is `*_query`; `attention.output` is the attention's own).
_QFORMER_TEXT = re.compile(r"Qformer\.bert\.(embeddings\.(word|position)_embeddings\.weight|"
                           r"encoder\.layer\.\d+\.(intermediate|output)\.)")
_STAGE1_HEADS = ("vision_proj.", "text_proj.", "itm_head.", "Qformer.cls.")   # + temp
_LLAMA_KEY = re.compile(
    r"llm_model\.(lm_head\.weight|model\.(embed_tokens\.weight|norm\.weight|rotary_emb\.inv_freq|"
    r"layers\.\d+\."
    r"(self_attn\.([qkvo]_proj\.(weight|bias)|rotary_emb\.inv_freq)|mlp\.(gate|up|down)_proj\."
    r"(weight|bias)|(input|post_attention)_layernorm\.weight)))")
# X-InstructBLIP (`blip2_vicuna_xinstruct`): one Q-Former, query set, LayerNorm and projection
# per modality.
_XINSTRUCT = re.compile(r"(image|video|audio|pc|shared)_(Qformer|query_tokens|llm_proj|ln|"
                        r"encoder|encoder_projection)(\.|$)")


def text_keys(keys) -> list[str]:
    """The Q-Former text weights among `keys` (sorted)."""
    return sorted(k for k in keys if _QFORMER_TEXT.match(k))


def detect_model(source: KeySource) -> Optional[str]:
    """The LAVIS model (registry name) a state dict is of, from its key names alone: "blip2"
    (stage 1, `Blip2Qformer`), "blip2_opt", "blip2_t5", "blip2_vicuna_instruct",
    "blip2_t5_instruct"; None when it holds no BLIP-2 model (a tower's own file). A FlanT5 file
    without the Q-Former text weights is "blip2_t5" (`blip2_t5_instruct` trained with
    qformer_text_input=False has the same keys); a Vicuna one is "blip2_vicuna_instruct
    (qformer_text_input=False)". Keys that fit none of them — X-InstructBLIP, two language
    models, stage-1 heads beside an LLM, an instruction-aware OPT (LAVIS has none), an
    `llm_model` that is not a LLaMA — raise LavisVariantError naming them."""
    keys = source.keys()
    x = sorted(k for k in keys if _XINSTRUCT.match(k))
    if x:
        raise LavisVariantError(
            f"{source.name}: an X-InstructBLIP (blip2_vicuna_xinstruct) state dict, one Q-Former "
            f"per modality, is not supported; its keys: {_clip(x, 8)}")
    if not is_blip2(source):
        return None
    found = {kind: sorted(k for k in keys if k.startswith((m + ".", p + ".")))
             for kind, (m, p) in LLM_NAMES.items()}
    found = {kind: names for kind, names in found.items() if names}
    text = text_keys(keys)
    if len(found) > 1:
        raise LavisVariantError(
            f"{source.name}: keys of {len(found)} language models (a LAVIS model has one): "
            + "; ".join(f"{LLM_NAMES[kind][0]}/{LLM_NAMES[kind][1]}: {_clip(names, 4)}"
                        for kind, names in sorted(found.items())))
    if not found:
        return "blip2"
    (kind, names), = found.items()
    heads = sorted(k for k in keys if k == "temp" or k.startswith(_STAGE1_HEADS))
    if heads:
        raise LavisVariantError(f"{source.name}: stage-1 heads beside a language model "
                                f"({LLM_NAMES[kind][1]}); no LAVIS model has both: {_clip(heads)}")
    if kind == "opt" and text:
        raise LavisVariantError(
            f"{source.name}: an OPT model with the Q-Former text weights (an instruction-aware "
            "Q-Former): LAVIS has none (blip2_opt drops them; InstructBLIP is "
            f"blip2_vicuna_instruct / blip2_t5_instruct): {_clip(text, 8)}")
    if kind == "llama":
        odd = [k for k in names if k.startswith("llm_model.") and not _LLAMA_KEY.fullmatch(k)]
        if odd:
            raise LavisVariantError(
                f"{source.name}: llm_model.* keys that are not a LLaMA's (blip2_vicuna_instruct's "
                f"LLM): {_clip(odd, 8)}")
        return INSTRUCT_MODELS[kind] + ("" if text else " (qformer_text_input=False)")
    return INSTRUCT_MODELS[kind] if kind == "t5" and text else f"blip2_{kind}"


def model_name(cfg: Blip2Config) -> str:
    """The LAVIS model (registry name) that has `cfg`'s layout (see `detect_model`)."""
    if cfg.llm is None:
        return "blip2"
    if cfg.llm_kind == "llama":
        return INSTRUCT_MODELS["llama"] + ("" if cfg.qformer_text_input
                                           else " (qformer_text_input=False)")
    return INSTRUCT_MODELS[cfg.llm_kind] if cfg.qformer_text_input else f"blip2_{cfg.llm_kind}"


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
    """Our leaves that a LAVIS state dict holds. Only the frozen towers (`visual_encoder.*`, the
    LLM) may be wholly absent (a trainable-only file); unknown keys, a tower only partly present
    or anything else absent — e.g. an InstructBLIP Q-Former's text weights — fail naming every
    key."""
    source = stream.fuse_present(source, hf_vision.split_qkv_bias(
        source.keys(), cfg.vision.hidden_size, ".attn.q_bias", ".attn.v_bias", ".attn.qkv.bias"))
    table = rules(cfg)
    try:
        return stream.leaves_from_rules(table, source, ignore=ignorable(cfg),
                                        partial=FROZEN_PREFIXES, shapes=stream.model_shapes(cfg))
    except MappingError as e:
        keys = source.keys()
        text = [k for k in text_keys(k for r in table for k in r.source_keys()) if k not in keys]
        if not text or not cfg.qformer_text_input:
            raise
        raise MappingError(
            f"{e}\n  ({len(text)} of the missing keys are the Q-Former's text weights, through "
            "which InstructBLIP's instruction enters: a LAVIS blip2_*_instruct file has them "
            "unless trained with qformer_text_input=False — then give a config without "
            "qformer_text_input)") from None


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


def _released_llms() -> dict:
    vicuna = lambda llm: dataclasses.replace(llm, **LAVIS_VICUNA_IDS)   # noqa: E731
    return {"opt": {2560: config_lib.OPT_2_7B, 4096: config_lib.OPT_6_7B},
            "t5": {2048: config_lib.FLAN_T5_XL, 4096: config_lib.FLAN_T5_XXL},
            "llama": {4096: vicuna(config_lib.VICUNA_7B), 5120: vicuna(config_lib.VICUNA_13B)}}


_LLM_EMBED = {"opt": "opt_model.model.decoder.embed_tokens.weight",
              "t5": "t5_model.shared.weight", "llama": "llm_model.model.embed_tokens.weight"}
_RELEASED_NAMES = {"opt": "OPT-2.7B/6.7B", "t5": "FlanT5-XL/XXL", "llama": "Vicuna-7B/13B"}


def infer_config(source: KeySource) -> Blip2Config:
    """The model a LAVIS state dict describes, from its keys and shapes (LAVIS numerics).

    The model kind is `detect_model`'s (which fails naming the keys of an unknown variant). The
    LLM's own shape comes from `opt_model.*`/`t5_model.*`/`llm_model.*` when the file has them,
    else from the projection width (OPT-2.7B/6.7B as `facebook/opt-*`, FlanT5-XL/XXL,
    Vicuna-7B/13B v1.1 with LAVIS's special tokens: `[PAD]` = 32000 added, `</s>` as BOS and
    EOS); pass a config when the file is of another model.
    """
    detect_model(source)
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
    positions = "Qformer.bert.embeddings.position_embeddings.weight"
    kinds = [kind for kind, (_, proj) in LLM_NAMES.items() if f"{proj}.weight" in keys]
    # Any text weight present makes the text side part of the model, so that a file lacking
    # only some of them fails naming those.
    text = bool(text_keys(keys))
    extra = {}
    if words in keys:
        extra["vocab_size"] = shape(words)[0]
    elif text and kinds:
        extra["vocab_size"] = LAVIS_QFORMER_VOCAB
    if positions in keys:
        extra["max_position_embeddings"] = shape(positions)[0]
    elif POSITION_IDS in keys:
        extra["max_position_embeddings"] = shape(POSITION_IDS)[-1]
    qformer = config_lib.QFormerConfig(
        num_layers=len(layers), has_text_input=text,
        cross_attention_frequency=2 if 1 not in cross else 1, encoder_hidden_size=width, **extra)
    cfg = Blip2Config(vision=vision, qformer=qformer, num_query_tokens=shape("query_tokens")[1])
    if kinds:
        kind, = kinds
        _, proj = LLM_NAMES[kind]
        d = shape(f"{proj}.weight")[0]
        known = _released_llms()[kind]
        if d not in known:
            raise LavisVariantError(
                f"{source.name}: {proj}.weight is {tuple(shape(f'{proj}.weight'))}: width {d} is "
                f"no released {_RELEASED_NAMES[kind]} ({', '.join(map(str, sorted(known)))}); "
                "pass the config")
        llm = known[d]
        embed = _LLM_EMBED[kind]
        vocab = shape(embed)[0] if embed in keys else (50272 if kind == "opt" else None)
        if vocab is not None:
            llm = dataclasses.replace(llm, vocab_size=vocab)
        cfg = cfg.replace(llm=llm, qformer_text_input=text)
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
    if cfg.llm_kind == "llama":          # LAVIS's LLaMA keeps inv_freq (fp32) in its state dict
        inv_freq = rope_inv_freq(cfg.llm)
        todo += [Entry(ROTARY_BUFFER.format(i=i), inv_freq.shape, np.dtype(np.float32),
                       lambda: [inv_freq]) for i in range(cfg.llm.num_layers)]
    for key, leaf_name in _copies(cfg).items():
        leaf = leaves[leaf_name]
        todo.append(Entry(key, leaf.shape, np.dtype(stream.cast(np.empty(0, leaf.dtype),
                                                                dtype).dtype),
                          lambda leaf=leaf: [stream.cast(leaf.value(), dtype)]))
    if parts == "trainable":
        todo = [e for e in todo if not e.name.startswith(FROZEN_PREFIXES)]
    todo = stream.split_fused(todo, fused(cfg.vision))
    notes = []
    if cfg.llm_kind == "llama" and not cfg.qformer_text_input:
        notes.append("a LAVIS blip2_vicuna_instruct without the Q-Former text weights: LAVIS "
                     "builds it with qformer_text_input: False in the model config")
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


def _lavis_llama_problems(llm: LlamaConfig) -> list[str]:
    """What LAVIS's LLaMA (`modeling_llama.py`, transformers 4.28: multi-head attention, no
    biases, head_dim = hidden / heads, rotary base 10000 unscaled, untied head) cannot be."""
    checks = [(llm.num_kv_heads != llm.num_heads,
               f"num_kv_heads {llm.num_kv_heads} != num_heads {llm.num_heads} (grouped-query "
               "attention)"),
              (llm.head_dim * llm.num_heads != llm.hidden_size,
               f"head_dim {llm.head_dim} x num_heads {llm.num_heads} != hidden_size "
               f"{llm.hidden_size}"),
              (llm.attention_bias, "attention_bias"), (llm.mlp_bias, "mlp_bias"),
              (llm.rope_theta != 10000.0, f"rope_theta {llm.rope_theta:g} (LAVIS: 10000)"),
              (llm.rope_scaling is not None, f"rope_scaling {llm.rope_scaling}"),
              (llm.tie_word_embeddings, "tie_word_embeddings"),
              (llm.activation != "silu", f"activation {llm.activation!r}")]
    return [text for bad, text in checks if bad]


def check_writable(cfg: Blip2Config) -> None:
    """LAVIS has no model for a config whose towers it cannot build."""
    if cfg.llm is not None and (cfg.itc or cfg.itm or cfg.itg):
        raise ConfigError("LAVIS has no model with both stage-1 heads and an LLM")
    if cfg.llm is not None and cfg.qformer.has_text_input and not cfg.qformer_text_input:
        raise ConfigError("LAVIS's models with an LLM keep the Q-Former text weights only for "
                          "the instruction (InstructBLIP, qformer_text_input); this model has "
                          "them unused: save with format='hf' or 'native'")
    if cfg.qformer_text_input and cfg.llm_kind not in INSTRUCT_MODELS:
        raise ConfigError(f"LAVIS has no instruction-aware Q-Former with {cfg.llm_kind} "
                          f"(InstructBLIP: {' / '.join(INSTRUCT_MODELS.values())}); save with "
                          "format='hf' or 'native'")
    if cfg.llm_kind == "llama":
        problems = _lavis_llama_problems(cfg.llm)
        if problems:
            raise ConfigError("LAVIS's LLaMA (blip2_vicuna_instruct) cannot hold this LLM: "
                              + "; ".join(problems) + "; save with format='hf' or 'native'")
