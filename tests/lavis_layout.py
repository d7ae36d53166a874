"""Test-side, independent construction of Salesforce LAVIS BLIP-2 state dicts (numpy in, numpy out).

Written from the LAVIS sources and HF's BLIP-2 conversion script, NOT from `blip2_jax.convert`'s tables, so converter
tests can check our converter against something built another way.

API (every dict maps a key to a numpy array; inputs are never aliased, outputs are fresh copies):

- `hf_to_lavis(hf_sd, kind, *, cls_head=None, temp=None, max_position_embeddings=None, seed=0,
  lm_head=None)` -> the FULL `model.state_dict()` of the LAVIS model of `kind`:
  "stage1" = `Blip2Qformer` (`blip2`, `blip2_feature_extractor`, `blip2_image_text_matching`) from
  an HF `Blip2ForImageTextRetrieval` state dict; "opt" = `Blip2OPT`, "t5" = `Blip2T5` from HF
  `Blip2ForConditionalGeneration` state dicts. It inverts §7.3 exactly (see below).
- `lavis_to_hf(lavis_sd, kind)` -> §7.3 applied forward: a replay of the HF convert script
  (`convert_blip_2_original_to_pytorch.py`): explicit renames (ITM-only ones for "stage1"), the
  generic substring rules *as written there* (`str.replace` on the whole key), q/v bias fused with a
  zero key bias, then the keys convert leaves as "unexpected" are dropped (`qformer.embeddings.
  position_ids` always; stage 1 also `temp` and `Qformer.cls.*`). Anything else left over that HF
  would not accept raises (convert asserts no missing and exactly those unexpected keys).
- `trainable_keys(lavis_sd, kind, freeze_vit=True, tied_aliases=False)` -> the keys LAVIS
  `RunnerBase._save_checkpoint` keeps (it deletes state-dict entries whose *parameter* has
  `requires_grad=False`; buffers stay).
- `zero_key_bias(hf_sd)` -> copy of an HF dict with the vision key bias zeroed (needed for
  `hf_ref` models, whose randomised fused qkv bias has a non-zero key part).
- `eva_checkpoint(lavis_sd, extra_block_seed=0)` -> layout of LAVIS's separate `eva_vit_g.pth`.
- `clip_lavis_from_hf_clip(hf_clip_vision_sd, *, visual_projection=None, proj_dim=None, seed=0,
  as_lavis_model=False, prefix="")` -> LAVIS `clip_vit.py` VisionTransformer layout
  (`clip_vit_L.pth`).

Round trip: `lavis_to_hf(hf_to_lavis(sd, kind), kind) == sd` key for key and bit for bit, for all
three kinds. HF has no key that LAVIS lacks; LAVIS has, on top of the HF keys,
`Qformer.bert.embeddings.position_ids` (all kinds) and, for stage 1, `temp` and the 7
`Qformer.cls.predictions.*` keys; these are exactly what `lavis_to_hf` drops.

§7.3 inverted (HF -> LAVIS):
- `vision_model.embeddings.{class_embedding, position_embedding, patch_embedding.*}` ->
  `visual_encoder.{cls_token, pos_embed, patch_embed.proj.*}`; `vision_model.encoder.layers.i.
  {layer_norm1, self_attn.qkv.weight, self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}` ->
  `visual_encoder.blocks.i.{norm1, attn.qkv.weight, attn.proj, norm2, mlp.fc1, mlp.fc2}`;
  `self_attn.qkv.bias` (3D) -> `attn.q_bias` = [:D], `attn.v_bias` = [2D:]; the key third [D:2D]
  must be exactly zero (LAVIS has no key bias; a fine-tuned HF model may have learnt one, §9.7),
  otherwise ValueError. `vision_model.post_layernorm` -> `ln_vision`.
- `qformer.layernorm` -> `Qformer.bert.embeddings.LayerNorm`; `qformer.encoder.layer.i.
  {attention,crossattention}.attention.` -> `....{attention,crossattention}.self.`; other `qformer.`
  -> `Qformer.bert.`; stage 1: `embeddings.{word,position}_embeddings` ->
  `Qformer.bert.embeddings.*`, `vision_projection` -> `vision_proj`, `text_projection` ->
  `text_proj`; `itm_head`, `query_tokens` unchanged. Stage 2: `language_projection` ->
  `opt_proj`/`t5_proj`, `language_model.` -> `opt_model.`/`t5_model.`.
- Added (HF has no counterpart): buffer `Qformer.bert.embeddings.position_ids` = arange(P)[None]
  int64 (LAVIS's own `Qformer.py` registers it persistent, whatever the transformers version, and
  stage 2 only deletes the word/position tables, not the buffer); P = rows of the position table
  (stage 1) or `max_position_embeddings` (stage 2, default 512 = bert-base). Stage 1 also `temp`
  (0-d float32, default 0.07) and the BERT MLM head `Qformer.cls.predictions.{bias,
  transform.dense.{weight,bias}, transform.LayerNorm.{weight,bias}, decoder.weight, decoder.bias}`
  from `cls_head` (the 5 non-tied entries, short or full names) or drawn from `seed`;
  `decoder.weight` is tied to the word embeddings and `decoder.bias` to `cls.predictions.bias` (a
  torch state_dict lists both names with equal values; here they are equal copies).
- Stage 2 has no word/position tables, no text FFN (`intermediate.`/`output.`), no `cls`: an HF dict
  that has them (`use_qformer_text_input=True`) raises, as convert would fail on it.

Tied keys of the frozen LLM, transformers 5.24 vs the 4.26-era models LAVIS runs (checked here by
instantiating tiny models; the test file asserts the key sets):
- torch `Module.state_dict()` never de-duplicates: every attribute path to a tensor is a key, so a
  tied weight appears under each of its names (same storage). Only `named_parameters()` and
  `save_pretrained` (safetensors) de-duplicate. Hence both in transformers 5.24 and in 4.26:
  `OPTForCausalLM.state_dict()` = `model.decoder.{embed_tokens, embed_positions, final_layer_norm,
  layers.*}` + `lm_head.weight` (tied to embed_tokens: 37 keys for 36 parameters in a 2-layer
  model); `T5ForConditionalGeneration.state_dict()` = `shared.weight`,
  `encoder.embed_tokens.weight`, `decoder.embed_tokens.weight` (both the same module as
  `shared`), `encoder.block.*`, `encoder.final_layer_norm`, `decoder.block.*`,
  `decoder.final_layer_norm`, `lm_head.weight` (54 keys for 51 parameters in 5.24).
  transformers 5.24 `save_pretrained` omits `lm_head.weight` (OPT) and
  `{encoder,decoder}.embed_tokens.weight`, `lm_head.weight` (T5), but `state_dict()` does not.
  So the HF `language_model.*` key set equals the 4.26 key set and the LLM part renames 1:1
  (convert loads it with zero missing keys, which also says so). The same de-duplication makes
  LAVIS `_save_checkpoint` keep the frozen alias names (see `trainable_keys(tied_aliases=True)`).
- One value-level difference: transformers 5 `T5Config` forces `tie_word_embeddings=True` (the
  passed value only sets `scale_decoder_outputs`), so an HF-5 T5 always has `lm_head` == `shared`,
  whereas FlanT5 under 4.26 (`tie_word_embeddings=False`) has an independent `lm_head`. Pass
  `lm_head=` (kind "t5" only) to give the LAVIS dict an independent head (then the round trip
  differs in `language_model.lm_head.weight` only).

dtypes: values keep the HF dtypes (the fp32 CPU layout: LAVIS calls `model.float()` on CPU). A live
GPU LAVIS model instead holds fp16 ViT Conv/Linear weights (`vit_precision="fp16"`), an fp16 OPT and
a bf16 T5; that is not emulated.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

KINDS = ("stage1", "opt", "t5")
LLM = {"opt": "opt_model.", "t5": "t5_model."}
PROJ = {"opt": "opt_proj.", "t5": "t5_proj."}
POSITION_IDS = "Qformer.bert.embeddings.position_ids"
CLS = "Qformer.cls.predictions."
CLS_HEAD_KEYS = ("bias", "transform.dense.weight", "transform.dense.bias",
                 "transform.LayerNorm.weight", "transform.LayerNorm.bias")
DEFAULT_TEMP = 0.07

_VIS_BLOCK = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
_EVA_BLOCK = re.compile(r"^(?:visual_encoder\.)?blocks\.(\d+)\.")
_QF_TEXT_FFN = re.compile(r"\.layer\.\d+\.(intermediate|output)\.")  # not *_query


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _copy(x) -> np.ndarray:
    return np.array(x, copy=True)


def _count(keys, pattern: re.Pattern) -> int:
    idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"non-contiguous block indices: {sorted(idx)}")
    return len(idx)


def _noise(rng: np.random.Generator, shape, dtype, name: str) -> np.ndarray:
    x = rng.normal(scale=0.1, size=shape)
    if name.endswith("LayerNorm.weight") or re.search(r"norm\d?\.weight$", name):
        x = x + 1.0
    return x.astype(dtype)


def zero_key_bias(hf_sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of an HF BLIP-2 state dict with the key third of every vision `qkv.bias` zeroed.

    `hf_ref.randomize` draws the whole fused bias, so the tiny HF models have a key bias that no
    LAVIS model can express; zero it (and load the result back into the torch model if it serves
    as the numerical reference) before `hf_to_lavis`.
    """
    out = {k: _copy(v) for k, v in hf_sd.items()}
    for k, v in out.items():
        if _VIS_BLOCK.match(k) and k.endswith("self_attn.qkv.bias"):
            n = v.shape[0] // 3
            v[n:2 * n] = 0
    return out


# ----------------------------------------------------------------------------------------------
# HF -> LAVIS
# ----------------------------------------------------------------------------------------------
def _vision_to_lavis(hf: Mapping[str, np.ndarray], take, vis: dict, ln_vision: dict) -> None:
    """The EVA ViT-g (§7.1) and ln_vision keys of an HF BLIP-2 / InstructBLIP dict, into `vis`
    and `ln_vision` (`take(key)` reads and marks an HF key)."""
    vis["visual_encoder.cls_token"] = take("vision_model.embeddings.class_embedding")
    vis["visual_encoder.pos_embed"] = take("vision_model.embeddings.position_embedding")
    for p in ("weight", "bias"):
        vis[f"visual_encoder.patch_embed.proj.{p}"] = take(
            f"vision_model.embeddings.patch_embedding.{p}")
    for i in range(_count(hf, _VIS_BLOCK)):
        s, d = f"vision_model.encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        for p in ("weight", "bias"):
            vis[f"{d}norm1.{p}"] = take(f"{s}layer_norm1.{p}")
        qkv_bias = take(f"{s}self_attn.qkv.bias")
        n = qkv_bias.shape[0] // 3
        if qkv_bias.shape != (3 * n,):
            raise ValueError(f"{s}self_attn.qkv.bias has shape {qkv_bias.shape}")
        if np.any(qkv_bias[n:2 * n] != 0):
            raise ValueError(f"{s}self_attn.qkv.bias has a non-zero key bias; LAVIS EVA attention "
                             "has q_bias and v_bias only")
        # Attention's own parameters (q_bias, v_bias) precede its children (qkv, proj)
        vis[f"{d}attn.q_bias"] = _copy(qkv_bias[:n])
        vis[f"{d}attn.v_bias"] = _copy(qkv_bias[2 * n:])
        vis[f"{d}attn.qkv.weight"] = take(f"{s}self_attn.qkv.weight")
        for p in ("weight", "bias"):
            vis[f"{d}attn.proj.{p}"] = take(f"{s}self_attn.projection.{p}")
        for p in ("weight", "bias"):
            vis[f"{d}norm2.{p}"] = take(f"{s}layer_norm2.{p}")
        for fc in ("fc1", "fc2"):
            for p in ("weight", "bias"):
                vis[f"{d}mlp.{fc}.{p}"] = take(f"{s}mlp.{fc}.{p}")
    for p in ("weight", "bias"):
        ln_vision[f"ln_vision.{p}"] = take(f"vision_model.post_layernorm.{p}")


def hf_to_lavis(hf_sd: Mapping[str, np.ndarray], kind: str, *, cls_head: dict | None = None,
                temp: float | None = None, max_position_embeddings: int | None = None,
                seed: int = 0, lm_head: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The full LAVIS `state_dict()` of `kind` (see the module docstring) from an HF state dict."""
    _check_kind(kind)
    hf = {k: np.asarray(v) for k, v in hf_sd.items()}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in hf:
            raise KeyError(f"HF state dict lacks {key!r} (kind {kind!r})")
        used.add(key)
        return _copy(hf[key])

    stage1 = kind == "stage1"
    sections: dict[str, dict[str, np.ndarray]] = {s: {} for s in (
        "own", "visual", "ln_vision", "embeddings", "encoder", "cls", "heads", "llm", "proj")}

    # own parameters of the top module come first in a torch state_dict
    sections["own"]["query_tokens"] = take("query_tokens")
    if stage1:
        sections["own"]["temp"] = np.asarray(DEFAULT_TEMP if temp is None else temp,
                                             np.float32).reshape(())
    elif temp is not None:
        raise ValueError("temp exists in the stage-1 model only")

    _vision_to_lavis(hf, take, sections["visual"], sections["ln_vision"])

    # ---- Q-Former ----
    emb = sections["embeddings"]
    if stage1:
        pos_table = hf.get("embeddings.position_embeddings.weight")
        if pos_table is None:
            raise KeyError("stage 1 needs embeddings.position_embeddings.weight")
        if max_position_embeddings is not None and max_position_embeddings != pos_table.shape[0]:
            raise ValueError(f"max_position_embeddings={max_position_embeddings} but the position "
                             f"table has {pos_table.shape[0]} rows")
        n_pos = pos_table.shape[0]
    else:
        n_pos = 512 if max_position_embeddings is None else max_position_embeddings
    # BertEmbeddings: its own buffer precedes its children
    emb[POSITION_IDS] = np.arange(n_pos, dtype=np.int64)[None]
    if stage1:
        emb["Qformer.bert.embeddings.word_embeddings.weight"] = take(
            "embeddings.word_embeddings.weight")
        emb["Qformer.bert.embeddings.position_embeddings.weight"] = take(
            "embeddings.position_embeddings.weight")
        used.add("embeddings.position_ids")  # tolerated if some HF version stores it
    for p in ("weight", "bias"):
        emb[f"Qformer.bert.embeddings.LayerNorm.{p}"] = take(f"qformer.layernorm.{p}")
    enc = sections["encoder"]
    has_text_ffn = False
    for k in hf:
        if not k.startswith("qformer.") or k in used:
            continue
        if not k.startswith("qformer.encoder.layer."):
            raise ValueError(f"unexpected HF Q-Former key {k!r}")
        has_text_ffn |= bool(_QF_TEXT_FFN.search(k))
        # "attention.attention." also matches inside "crossattention.attention."
        enc["Qformer.bert." + k[len("qformer."):].replace("attention.attention.",
                                                           "attention.self.")] = take(k)
    if stage1 and not has_text_ffn:
        raise ValueError("stage 1 needs the Q-Former text FFN (use_qformer_text_input=True)")
    if not stage1 and has_text_ffn:
        raise ValueError("LAVIS stage-2 models delete the Q-Former text FFN; the HF dict has one")
    if not enc:
        raise KeyError("HF state dict has no qformer.encoder.layer.* keys")

    # ---- stage-1 heads / stage-2 LLM ----
    if stage1:
        words = emb["Qformer.bert.embeddings.word_embeddings.weight"]
        vocab, hidden = words.shape
        shapes = {"bias": (vocab,), "transform.dense.weight": (hidden, hidden),
                  "transform.dense.bias": (hidden,), "transform.LayerNorm.weight": (hidden,),
                  "transform.LayerNorm.bias": (hidden,)}
        if cls_head is None:
            rng = np.random.default_rng(seed)
            head = {k: _noise(rng, shapes[k], words.dtype, k) for k in CLS_HEAD_KEYS}
        else:
            short = {(k[len(CLS):] if k.startswith(CLS) else k): v for k, v in cls_head.items()}
            if set(short) != set(CLS_HEAD_KEYS):
                raise ValueError(f"cls_head must have exactly {CLS_HEAD_KEYS}, got {sorted(short)}")
            head = {k: _copy(short[k]) for k in CLS_HEAD_KEYS}
            for k in CLS_HEAD_KEYS:
                if head[k].shape != shapes[k]:
                    raise ValueError(f"cls_head[{k!r}] has shape {head[k].shape}, want {shapes[k]}")
        cls = sections["cls"]
        cls[CLS + "bias"] = head["bias"]  # BertLMPredictionHead's own parameter comes first
        for k in CLS_HEAD_KEYS[1:]:
            cls[CLS + k] = head[k]
        cls[CLS + "decoder.weight"] = _copy(words)        # tied to word_embeddings
        cls[CLS + "decoder.bias"] = _copy(head["bias"])    # tied to cls.predictions.bias
        heads = sections["heads"]
        for src, dst in (("vision_projection", "vision_proj"), ("text_projection", "text_proj"),
                         ("itm_head", "itm_head")):
            for p in ("weight", "bias"):
                heads[f"{dst}.{p}"] = take(f"{src}.{p}")
        if lm_head is not None:
            raise ValueError("lm_head applies to kind 't5' only")
    else:
        llm = sections["llm"]
        for k in hf:
            if k.startswith("language_model."):
                llm[LLM[kind] + k[len("language_model."):]] = take(k)
        if not llm:
            raise KeyError("HF state dict has no language_model.* keys")
        for p in ("weight", "bias"):
            sections["proj"][f"{PROJ[kind]}{p}"] = take(f"language_projection.{p}")
        if lm_head is not None:
            if kind != "t5":
                raise ValueError("lm_head applies to kind 't5' only (OPT ties it in 4.26 too)")
            key = "t5_model.lm_head.weight"
            if np.shape(lm_head) != llm[key].shape:
                raise ValueError(f"lm_head shape {np.shape(lm_head)} != {llm[key].shape}")
            llm[key] = np.asarray(lm_head, llm[key].dtype).copy()

    left = sorted(set(hf) - used)
    if left:
        raise ValueError(f"HF keys with no LAVIS counterpart for kind {kind!r}: {left[:8]}"
                         f"{' ...' if len(left) > 8 else ''}")
    out: dict[str, np.ndarray] = {}
    for sec in sections.values():
        out.update(sec)
    return out


# ----------------------------------------------------------------------------------------------
# LAVIS -> HF (replay of the HF convert script)
# ----------------------------------------------------------------------------------------------
def _convert_rename_keys(n_blocks: int, itm: bool) -> list[tuple[str, str]]:
    r = [("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
         ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
         ("visual_encoder.patch_embed.proj.weight",
          "vision_model.embeddings.patch_embedding.weight"),
         ("visual_encoder.patch_embed.proj.bias", "vision_model.embeddings.patch_embedding.bias"),
         ("ln_vision.weight", "vision_model.post_layernorm.weight"),
         ("ln_vision.bias", "vision_model.post_layernorm.bias")]
    for i in range(n_blocks):
        s, d = f"visual_encoder.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            r.append((f"{s}norm1.{p}", f"{d}layer_norm1.{p}"))
            r.append((f"{s}norm2.{p}", f"{d}layer_norm2.{p}"))
        r.append((f"{s}attn.qkv.weight", f"{d}self_attn.qkv.weight"))
        for p in ("weight", "bias"):
            r.append((f"{s}attn.proj.{p}", f"{d}self_attn.projection.{p}"))
            r.append((f"{s}mlp.fc1.{p}", f"{d}mlp.fc1.{p}"))
            r.append((f"{s}mlp.fc2.{p}", f"{d}mlp.fc2.{p}"))
    r += [("Qformer.bert.embeddings.LayerNorm.weight", "qformer.layernorm.weight"),
          ("Qformer.bert.embeddings.LayerNorm.bias", "qformer.layernorm.bias")]
    if itm:
        r += [("Qformer.bert.embeddings.word_embeddings.weight",
               "embeddings.word_embeddings.weight"),
              ("Qformer.bert.embeddings.position_embeddings.weight",
               "embeddings.position_embeddings.weight"),
              ("vision_proj.weight", "vision_projection.weight"),
              ("vision_proj.bias", "vision_projection.bias"),
              ("text_proj.weight", "text_projection.weight"),
              ("text_proj.bias", "text_projection.bias")]
    return r


def _fuse_qv_bias(out: dict, n_blocks: int) -> None:
    """The HF conversion scripts' EVA q/v biases -> one qkv bias with a zero key part."""
    for i in range(n_blocks):
        q = out.pop(f"visual_encoder.blocks.{i}.attn.q_bias")
        v = out.pop(f"visual_encoder.blocks.{i}.attn.v_bias")
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = np.concatenate(
            [q, np.zeros_like(v), v])


def lavis_to_hf(lavis_sd: Mapping[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """§7.3 forward (HF convert script logic); returns the HF state dict of `kind`'s HF model."""
    _check_kind(kind)
    sd = {k: _copy(v) for k, v in lavis_sd.items()}
    n_blocks = _count(sd, _EVA_BLOCK)
    if n_blocks == 0:
        raise ValueError("no visual_encoder.blocks.* keys (EVA ViT-g layout expected)")
    # 1. explicit renames (convert's create_rename_keys)
    for src, dst in _convert_rename_keys(n_blocks, itm=kind == "stage1"):
        if src not in sd:
            raise KeyError(f"LAVIS state dict lacks {src!r}")
        sd[dst] = sd.pop(src)
    # 2. generic substring rules, exactly as convert writes them
    out: dict[str, np.ndarray] = {}
    for key, val in sd.items():
        if key.startswith("Qformer.bert"):
            key = key.replace("Qformer.bert", "qformer")
        if "attention.self" in key:
            key = key.replace("self", "attention")
        if "opt_proj" in key:
            key = key.replace("opt_proj", "language_projection")
        if "t5_proj" in key:
            key = key.replace("t5_proj", "language_projection")
        if key.startswith("opt"):
            key = key.replace("opt", "language")
        if key.startswith("t5"):
            key = key.replace("t5", "language")
        out[key] = val
    # 3. q/v bias -> one qkv bias with a zero key part
    _fuse_qv_bias(out, n_blocks)
    # 4. what convert's load_state_dict(strict=False) reports as unexpected (and asserts)
    out.pop("qformer.embeddings.position_ids", None)
    if kind == "stage1":
        out.pop("temp", None)
        for k in [k for k in out if k.startswith("Qformer.cls")]:
            del out[k]
    bad = [k for k in out if k.startswith(("visual_encoder", "Qformer", "ln_vision", "opt", "t5"))
           or (kind == "stage1" and k.startswith(("language", "temp")))
           or (kind != "stage1" and (k.startswith(("qformer.embeddings.", "embeddings.",
                                                   "vision_proj", "text_proj", "itm_head", "temp"))
                                     or (k.startswith("qformer.") and _QF_TEXT_FFN.search(k))))]
    if bad:
        raise ValueError(f"keys the HF {kind!r} model would not accept: {sorted(bad)[:8]}")
    return out


# ----------------------------------------------------------------------------------------------
# what LAVIS saves
# ----------------------------------------------------------------------------------------------
# Names that, in LAVIS's 4.26-era LLMs, are *aliases* of a frozen parameter listed earlier by
# named_parameters() (which de-duplicates), so `k in param_grad_dic` is False and
# _save_checkpoint keeps them although they are frozen.
TIED_ALIASES = {
    "opt": ("opt_model.lm_head.weight",),  # = opt_model.model.decoder.embed_tokens.weight
    "t5": ("t5_model.encoder.embed_tokens.weight",  # = t5_model.shared (same nn.Embedding)
           "t5_model.decoder.embed_tokens.weight"),  # FlanT5: lm_head is NOT tied (dropped)
}


def trainable_keys(lavis_sd: Mapping[str, np.ndarray], kind: str, freeze_vit: bool = True,
                   tied_aliases: bool = False) -> set[str]:
    """Keys LAVIS `_save_checkpoint` keeps.

    It builds `param_grad_dic = {k: p.requires_grad for k, p in model.named_parameters()}` and
    deletes the state-dict keys found there with False. Frozen: `visual_encoder.*` (freeze_vit:
    pre-training configs; COCO fine-tuning sets freeze_vit False) and the LLM (`opt_model.*`,
    `t5_model.*`). Kept: `ln_vision` (not part of visual_encoder), Q-Former, `query_tokens`,
    projections, heads, `temp`, the `position_ids` buffer, the tied `cls.predictions.decoder.*`.

    `tied_aliases=True` also returns the LLM's tied alias names (TIED_ALIASES): torch's
    `named_parameters()` de-duplicates shared parameters, so an alias never enters
    `param_grad_dic` and survives the deletion although frozen. This is what the code does; whether
    the released .pth files contain them is not verified here.
    """
    _check_kind(kind)
    frozen = (("visual_encoder.",) if freeze_vit else ()) + ((LLM[kind],) if kind in LLM else ())
    keep = {k for k in lavis_sd if not k.startswith(frozen)}
    if tied_aliases and kind in TIED_ALIASES:
        keep |= {k for k in TIED_ALIASES[kind] if k in lavis_sd}
    return keep


# ----------------------------------------------------------------------------------------------
# separate ViT checkpoints
# ----------------------------------------------------------------------------------------------
def eva_checkpoint(lavis_sd: Mapping[str, np.ndarray], extra_block_seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Layout of LAVIS's `eva_vit_g.pth` (EVA-CLIP ViT-g visual weights) for `lavis_sd`'s ViT.

    Keys are those of `visual_encoder.*` without the prefix (`cls_token`, `pos_embed`,
    `patch_embed.proj.*`, `blocks.{i}.*`), plus ONE extra random block `blocks.{n}.*` (same names,
    shapes and dtypes as block n-1, drawn from `extra_block_seed`): the original EVA-CLIP ViT-g has
    40 blocks; `create_eva_vit_g` builds depth=39 and loads this file with `strict=False`, so the
    40th block is an unexpected key and is silently dropped (BLIP-2 uses the second-to-last layer).

    Not modelled [UNVERIFIED]: whether the real file holds further keys (e.g. a final norm/head) and
    its dtype. The real file's `pos_embed` is the 224-px table (1, 257, 1408); for 364-px models
    LAVIS bicubically interpolates it at load (`interpolate_pos_embed`), which cannot be inverted,
    so this function just copies whatever `pos_embed` `lavis_sd` has.
    """
    vis = {k[len("visual_encoder."):]: _copy(v) for k, v in lavis_sd.items()
           if k.startswith("visual_encoder.")}
    n = _count(vis, _EVA_BLOCK)
    if n == 0:
        raise ValueError("no visual_encoder.blocks.* keys (EVA layout expected)")
    rng = np.random.default_rng(extra_block_seed)
    last = f"blocks.{n - 1}."
    for k in [k for k in vis if k.startswith(last)]:
        rest = k[len(last):]
        vis[f"blocks.{n}.{rest}"] = _noise(rng, vis[k].shape, vis[k].dtype, rest)
    return vis


def clip_lavis_from_hf_clip(hf_clip_vision_sd: Mapping[str, np.ndarray], *,
                            visual_projection: np.ndarray | None = None,
                            proj_dim: int | None = None, seed: int = 0,
                            as_lavis_model: bool = False, prefix: str = ""
                            ) -> dict[str, np.ndarray]:
    """LAVIS `clip_vit.py` / OpenAI CLIP VisionTransformer state dict from an HF CLIP vision one.

    Input: an HF `CLIPVisionModel` state dict (transformers 5.24 keys have no prefix:
    `embeddings.*`, `pre_layrnorm.*`, `encoder.layers.*`, `post_layernorm.*`; transformers 4 and
    `CLIPModel` put them under `vision_model.`; a full `CLIPModel` dict is accepted, its
    `visual_projection.weight` is used and `text_model.*`, `text_projection`, `logit_scale`
    ignored).

    Output (the `clip_vit_L.pth` checkpoint layout, torch state_dict order): `class_embedding` (W,),
    `positional_embedding` (N, W), `proj` (W, P), `conv1.weight` (no bias), `ln_pre.*`,
    `transformer.resblocks.{i}.{attn.in_proj_weight (3W, W) = cat(q, k, v), attn.in_proj_bias
    (3W,), attn.out_proj.*, ln_1.*, mlp.c_fc.*, mlp.c_proj.*, ln_2.*}`, `ln_post.*`.
    `proj` = `visual_projection` (HF Linear weight (P, W)) transposed (CLIP computes `x @ proj`)
    or, when absent, random (W, proj_dim or W) from `seed`.

    `as_lavis_model=True` returns what LAVIS's module holds after its `strict=False` load instead:
    the last resblock, `ln_post` and `proj` dropped (HEAD `create_clip_vit_L` builds 23 of 24
    blocks; an earlier LAVIS revision built `layers=22` -> 21 blocks). `prefix` (e.g.
    "visual_encoder.") is prepended to every key.
    """
    sd = {k: np.asarray(v) for k, v in hf_clip_vision_sd.items()}
    if visual_projection is None and "visual_projection.weight" in sd:
        visual_projection = sd["visual_projection.weight"]
    if any(k.startswith("vision_model.") for k in sd):
        sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    used = {"embeddings.position_ids"}

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise KeyError(f"HF CLIP vision state dict lacks {key!r}")
        used.add(key)
        return _copy(sd[key])

    pat = re.compile(r"^encoder\.layers\.(\d+)\.")
    n = _count(sd, pat)
    if n == 0:
        raise ValueError("no encoder.layers.* keys")
    out: dict[str, np.ndarray] = {}
    out["class_embedding"] = take("embeddings.class_embedding")
    out["positional_embedding"] = take("embeddings.position_embedding.weight")
    width = out["class_embedding"].shape[-1]
    if visual_projection is not None:
        vp = np.asarray(visual_projection)
        if vp.ndim != 2 or vp.shape[1] != width:
            raise ValueError(f"visual_projection must be (proj_dim, {width}), got {vp.shape}")
        proj = _copy(vp.T)
    else:
        proj = np.random.default_rng(seed).normal(scale=width ** -0.5,
                                                  size=(width, proj_dim or width))
        proj = proj.astype(out["class_embedding"].dtype)
    out["proj"] = proj
    out["conv1.weight"] = take("embeddings.patch_embedding.weight")
    for p in ("weight", "bias"):
        out[f"ln_pre.{p}"] = take(f"pre_layrnorm.{p}")
    for i in range(n):
        s, d = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[d + "attn." + name] = np.concatenate(
                [take(f"{s}self_attn.{x}_proj.{p}") for x in ("q", "k", "v")], axis=0)
        for p in ("weight", "bias"):
            out[f"{d}attn.out_proj.{p}"] = take(f"{s}self_attn.out_proj.{p}")
        for p in ("weight", "bias"):
            out[f"{d}ln_1.{p}"] = take(f"{s}layer_norm1.{p}")
        for src, dst in (("fc1", "c_fc"), ("fc2", "c_proj")):
            for p in ("weight", "bias"):
                out[f"{d}mlp.{dst}.{p}"] = take(f"{s}mlp.{src}.{p}")
        for p in ("weight", "bias"):
            out[f"{d}ln_2.{p}"] = take(f"{s}layer_norm2.{p}")
    for p in ("weight", "bias"):
        out[f"ln_post.{p}"] = take(f"post_layernorm.{p}")
    left = sorted(k for k in sd if k not in used and not k.startswith(
        ("text_model.", "visual_projection.", "text_projection.", "logit_scale")))
    if left:
        raise ValueError(f"unmapped HF CLIP keys: {left[:8]}")
    if as_lavis_model:
        last = f"transformer.resblocks.{n - 1}."
        out = {k: v for k, v in out.items()
               if not k.startswith((last, "ln_post.")) and k != "proj"}
    return {prefix + k: v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# InstructBLIP: LAVIS Blip2VicunaInstruct / Blip2T5Instruct
# ----------------------------------------------------------------------------------------------
# Written from LAVIS `blip2_vicuna_instruct.py` / `blip2_t5_instruct.py` (qformer_text_input=True:
# the Q-Former keeps BERT's word/position tables and text FFN, `Qformer.cls` is deleted; the LLM
# is `llm_model` + `llm_proj` / `t5_model` + `t5_proj`), LAVIS's `modeling_llama.py` (a
# transformers-4.28 copy whose LlamaRotaryEmbedding registers `inv_freq` as a persistent buffer,
# base 10000) and HF's `convert_instructblip_original_to_pytorch.py` (replayed in
# `instruct_lavis_to_hf`; it loads the renamed LAVIS dict with strict=True into the HF model of
# its day, whose position_ids / inv_freq buffers were persistent too).
INSTRUCT_KINDS = {"llama": ("llm_model.", "llm_proj."), "t5": ("t5_model.", "t5_proj.")}
ROTARY = "llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"


def instruct_hf_to_lavis(hf_sd: Mapping[str, np.ndarray], llm: str, *,
                         head_dim: int | None = None) -> dict[str, np.ndarray]:
    """The full LAVIS `state_dict()` of InstructBLIP with LLM `llm` ("llama": Vicuna, "t5":
    FlanT5) from an HF `InstructBlipForConditionalGeneration` state dict (torch `state_dict()`:
    transformers 5 stores no position_ids / inv_freq buffers, lists T5's tied copies). LAVIS adds
    `Qformer.bert.embeddings.position_ids` (rows of the position table) and, for LLaMA, one
    `inv_freq` per layer (`head_dim` needed: LAVIS's formula in torch fp32)."""
    if llm not in INSTRUCT_KINDS:
        raise ValueError(f"llm must be one of {sorted(INSTRUCT_KINDS)}, got {llm!r}")
    model, proj = INSTRUCT_KINDS[llm]
    hf = {k: np.asarray(v) for k, v in hf_sd.items()}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in hf:
            raise KeyError(f"HF state dict lacks {key!r}")
        used.add(key)
        return _copy(hf[key])

    out = {"query_tokens": take("query_tokens")}
    vis, ln = {}, {}
    _vision_to_lavis(hf, take, vis, ln)
    out.update(vis)
    out.update(ln)
    table = take("qformer.embeddings.position_embeddings.weight")
    out[POSITION_IDS] = np.arange(table.shape[0], dtype=np.int64)[None]
    out["Qformer.bert.embeddings.word_embeddings.weight"] = take(
        "qformer.embeddings.word_embeddings.weight")
    out["Qformer.bert.embeddings.position_embeddings.weight"] = table
    for p in ("weight", "bias"):
        out[f"Qformer.bert.embeddings.LayerNorm.{p}"] = take(f"qformer.embeddings.layernorm.{p}")
    used.add("qformer.embeddings.position_ids")         # tolerated if some HF version stores it
    text_ffn = False
    for k in list(hf):
        if k.startswith("qformer.encoder.layer."):
            text_ffn |= bool(_QF_TEXT_FFN.search(k))
            out["Qformer.bert." + k[len("qformer."):].replace("attention.attention.",
                                                               "attention.self.")] = take(k)
        elif k.startswith("language_model."):
            out[model + k[len("language_model."):]] = take(k)
    if not text_ffn:
        raise ValueError("an InstructBLIP Q-Former has the text FFN (intermediate / output)")
    for p in ("weight", "bias"):
        out[f"{proj}{p}"] = take(f"language_projection.{p}")
    if llm == "llama":
        import torch
        if head_dim is None:
            raise ValueError("llm 'llama' needs head_dim (for the inv_freq buffers)")
        layers = {int(m.group(1)) for k in out
                  if (m := re.match(r"llm_model\.model\.layers\.(\d+)\.", k))}
        inv = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).numpy()
        for i in sorted(layers):
            out[ROTARY.format(i=i)] = inv.copy()
    left = sorted(set(hf) - used)
    if left:
        raise ValueError(f"HF keys with no LAVIS InstructBLIP counterpart: {left[:8]}")
    return out


def instruct_lavis_to_hf(lavis_sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF's InstructBLIP conversion script on a LAVIS state dict: its renames (vision, the
    embeddings LayerNorm), its substring rules as written, q/v bias fused with a zero key bias;
    the buffers today's HF model lacks (qformer position_ids, LLaMA inv_freq) dropped."""
    sd = {k: _copy(v) for k, v in lavis_sd.items()}
    n_blocks = _count(sd, _EVA_BLOCK)
    renames = [r for r in _convert_rename_keys(n_blocks, itm=False)
               if not r[0].startswith("Qformer.")]
    renames += [("Qformer.bert.embeddings.LayerNorm.weight", "qformer.embeddings.layernorm.weight"),
                ("Qformer.bert.embeddings.LayerNorm.bias", "qformer.embeddings.layernorm.bias")]
    for src, dst in renames:
        if src not in sd:
            raise KeyError(f"LAVIS state dict lacks {src!r}")
        sd[dst] = sd.pop(src)
    out: dict[str, np.ndarray] = {}
    for key, val in sd.items():
        if key.startswith("Qformer.bert"):
            key = key.replace("Qformer.bert", "qformer")
        if "attention.self" in key:
            key = key.replace("self", "attention")
        if "llm_proj" in key:
            key = key.replace("llm_proj", "language_projection")
        if "t5_proj" in key:
            key = key.replace("t5_proj", "language_projection")
        if key.startswith("llm_model"):
            key = key.replace("llm_model", "language_model")
        if key.startswith("t5"):
            key = key.replace("t5", "language")
        out[key] = val
    _fuse_qv_bias(out, n_blocks)
    out.pop("qformer.embeddings.position_ids", None)
    for k in [k for k in out if k.endswith(".rotary_emb.inv_freq")]:
        del out[k]
    bad = [k for k in out if k.startswith(("visual_encoder", "Qformer", "ln_vision", "llm_",
                                           "t5_", "opt"))]
    if bad:
        raise ValueError(f"keys the HF InstructBLIP model would not accept: {sorted(bad)[:8]}")
    return out
