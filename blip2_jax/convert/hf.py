"""Hugging Face checkpoints: the whole-model key table, safetensors reading and writing.

Reads `save_pretrained` directories of `Blip2ForConditionalGeneration` (OPT, T5, LLaMA),
`Blip2Model`, `Blip2ForImageTextRetrieval` and `InstructBlipForConditionalGeneration` (its
Q-Former embeddings, text tables and LayerNorm, under `qformer.embeddings.`) — one `model.safetensors` or shards with
`model.safetensors.index.json` — with the `safetensors` numpy reader (no torch), lazily, one
tensor at a time. Writes the same layout back (sharded above `max_shard_bytes`).
Per-tower tables: hf_vision, hf_qformer, hf_opt, hf_t5, hf_llama.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional

import numpy as np

from blip2_jax import config as config_lib
from blip2_jax.config import Blip2Config
from blip2_jax.convert import hf_llama, hf_opt, hf_qformer, hf_t5, hf_vision, stream
from blip2_jax.convert.mapping import MappingError, Rule, linear, norm
from blip2_jax.convert.stream import CheckpointError, KeySource, SafetensorsReader  # noqa: F401
from blip2_jax.models.blip2 import LAVIS_INIT_TEMP

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Parameters HF has no place for. `temp` (the ITC temperature) only matters for training and
# HF's retrieval model never stores it: a load from HF sets LAVIS's initial value, a save drops it.
HF_ABSENT_OK = ("temp",)
# Source keys that are buffers, not parameters.
HF_BUFFERS = (r".*position_ids", r".*\.num_batches_tracked")
# The LLM's key table by `Blip2Config.llm_kind` (each has rules(cfg) and tied_keys(cfg)).
LLM_TABLES = {"opt": hf_opt, "t5": hf_t5, "llama": hf_llama}


def rules(cfg: Blip2Config) -> list[Rule]:
    """Every leaf of our param tree for `cfg` ↔ its HF key (HF ITG head excluded: HF has none)."""
    table = hf_vision.rules(cfg.vision)
    table += norm("ln_vision", "vision_model.post_layernorm")
    table += [Rule("query_tokens", "query_tokens")]
    if cfg.qformer_text_input:
        table += hf_qformer.rules(cfg.qformer, embeddings="qformer.embeddings",
                                  layernorm="embeddings.layernorm")
    else:
        table += hf_qformer.rules(cfg.qformer)
    if cfg.itc:
        table += linear("vision_proj", "vision_projection") + linear("text_proj", "text_projection")
    if cfg.itm:
        table += linear("itm_head", "itm_head")
    if cfg.llm is not None:
        table += linear("llm_proj", "language_projection")
        table += LLM_TABLES[cfg.llm_kind].rules(cfg.llm)
    return table


def ignorable(cfg: Blip2Config) -> list[str]:
    """Regexes of HF keys that may be present without being loaded (buffers, tied copies)."""
    out = list(HF_BUFFERS)
    if cfg.llm_kind == "llama":        # rotary inv_freq buffers of older checkpoints, tied head
        out += hf_llama.ignorable(cfg.llm)
    elif cfg.llm is not None:
        tied = LLM_TABLES[cfg.llm_kind].tied_keys(cfg.llm)
        out += [k.replace(".", r"\.") for k in tied]
    return out


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def source(path: str, cfg: Blip2Config, stem: str = "model") -> KeySource:
    """The checkpoint's tensors, legacy separate q/v vision biases presented as the fused one."""
    reader = SafetensorsReader(path, stem)
    return stream.fuse_present(reader, hf_vision.split_qkv_bias(reader.keys(),
                                                                cfg.vision.hidden_size))


def resolve(path: str, cfg: Optional[Blip2Config], reader: KeySource) -> Blip2Config:
    """`cfg` (from config.json when None) adjusted to what the checkpoint holds."""
    keys = reader.keys()
    if cfg.llm_kind == "t5":
        # transformers 5 writes tie_word_embeddings=true for every T5 and unties when the
        # checkpoint holds its own lm_head; so the checkpoint, not the flag, decides.
        untied = "language_model.lm_head.weight" in keys and (
            not cfg.llm.tie_word_embeddings or not np.array_equal(
                reader.get("language_model.lm_head.weight"),
                reader.get("language_model.shared.weight")))
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, tie_word_embeddings=not untied))
    if cfg.llm is None and not cfg.itc and any(k.startswith("vision_projection") for k in keys):
        cfg = cfg.replace(itc=True)
    if cfg.itg:
        raise CheckpointError(f"{path}: HF checkpoints have no Q-Former LM (ITG) head; the config "
                              "asks for one")
    return cfg


def leaves(path: str, cfg: Optional[Blip2Config] = None) -> tuple[Blip2Config, dict]:
    """(config, {leaf: stream.Leaf}) of an HF `save_pretrained` directory, read lazily; a key
    mismatch fails naming every key. `temp` (absent from HF) is LAVIS's initial value."""
    if cfg is None:
        cfg = config_lib.read_hf_config(path)
    reader = source(path, cfg)
    cfg = resolve(path, cfg, reader)
    try:
        out = stream.leaves_from_rules(rules(cfg), reader, ignore=ignorable(cfg),
                                       shapes=stream.model_shapes(cfg))
    except MappingError as e:
        raise CheckpointError(str(e)) from None
    if cfg.itc:
        out.update(stream.leaves_from_tree({"temp": np.asarray(LAVIS_INIT_TEMP, np.float32)},
                                           "LAVIS initial value"))
    return cfg, out


def read(path: str, cfg: Optional[Blip2Config] = None) -> tuple[Blip2Config, dict]:
    """(config, params) from an HF `save_pretrained` directory. Fails loudly on any key mismatch."""
    cfg, out = leaves(path, cfg)
    return cfg, stream.read_tree(out)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _check_writable(cfg: Blip2Config) -> None:
    if cfg.vision.variant != "eva":
        raise MappingError(f"HF BLIP-2's image encoder is the EVA ViT, this model's is "
                           f"{cfg.vision.variant!r}: save it with format='native' or 'lavis'")
    if cfg.itg:
        raise MappingError("HF BLIP-2 has no Q-Former LM (ITG) head; save this model with "
                           "format='native', or drop the head (config itg=False, no lm_head)")


def entries(cfg: Blip2Config, leaves: Mapping[str, stream.Leaf], dtype=None) -> list:
    """The HF tensors of our leaves, to stream (raises if a leaf has no HF name)."""
    _check_writable(cfg)
    return stream.entries_for_rules(rules(cfg), leaves, dtype, skip=HF_ABSENT_OK)


def write(path: str, cfg: Blip2Config, params_or_leaves: Mapping,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype=None) -> list[str]:
    """Write `config.json` + safetensors (sharded with an index above `max_shard_bytes`).
    `params_or_leaves`: our param tree, or {leaf: stream.Leaf} (streamed)."""
    leaves = stream.as_leaves(params_or_leaves)
    todo = entries(cfg, leaves, dtype)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_lib.to_hf_dict(cfg), f, indent=2)
    return stream.write_safetensors(path, todo, max_shard_bytes, stem="model")
