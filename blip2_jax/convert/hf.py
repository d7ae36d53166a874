"""Hugging Face checkpoints: the whole-model key table, safetensors reading and writing.

Reads `save_pretrained` directories of `Blip2ForConditionalGeneration` (OPT, T5), `Blip2Model`
and `Blip2ForImageTextRetrieval` — one `model.safetensors` or shards with
`model.safetensors.index.json` — with the `safetensors` numpy reader (no torch), lazily, one tensor
at a time. Writes the same layout back (sharded above `max_shard_bytes`).
Per-tower tables: hf_vision, hf_qformer, hf_opt, hf_t5.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping, Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from blip2_jax import config as config_lib
from blip2_jax.config import Blip2Config, OPTConfig
from blip2_jax.convert import hf_opt, hf_qformer, hf_t5, hf_vision, mapping
from blip2_jax.convert.mapping import MappingError, Rule, linear, norm
from blip2_jax.models.blip2 import LAVIS_INIT_TEMP

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Parameters HF has no place for. `temp` (the ITC temperature) only matters for training and
# HF's retrieval model never stores it: a load from HF sets LAVIS's initial value, a save drops it.
HF_ABSENT_OK = ("temp",)
# Source keys that are buffers, not parameters.
HF_BUFFERS = (r".*position_ids", r".*\.num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or holds something unexpected; names the file."""


def rules(cfg: Blip2Config) -> list[Rule]:
    """Every leaf of our param tree for `cfg` ↔ its HF key (HF ITG head excluded: HF has none)."""
    table = hf_vision.rules(cfg.vision)
    table += norm("ln_vision", "vision_model.post_layernorm")
    table += [Rule("query_tokens", "query_tokens")]
    table += hf_qformer.rules(cfg.qformer)
    if cfg.itc:
        table += linear("vision_proj", "vision_projection") + linear("text_proj", "text_projection")
    if cfg.itm:
        table += linear("itm_head", "itm_head")
    if cfg.llm is not None:
        table += linear("llm_proj", "language_projection")
        table += (hf_opt if isinstance(cfg.llm, OPTConfig) else hf_t5).rules(cfg.llm)
    return table


def ignorable(cfg: Blip2Config) -> list[str]:
    """Regexes of HF keys that may be present without being loaded (buffers, tied copies)."""
    out = list(HF_BUFFERS)
    if cfg.llm is not None:
        tied = (hf_opt if isinstance(cfg.llm, OPTConfig) else hf_t5).tied_keys(cfg.llm)
        out += [k.replace(".", r"\.") for k in tied]
    return out


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
class SafetensorsReader:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

    def __init__(self, path: str, stem: str = "model"):
        self.path = path
        index = os.path.join(path, f"{stem}.safetensors.index.json")
        single = os.path.join(path, f"{stem}.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            self.file_of = {k: os.path.join(path, v) for k, v in weight_map.items()}
            for f in sorted(set(self.file_of.values())):
                if not os.path.exists(f):
                    raise CheckpointError(f"{index} names shard {os.path.basename(f)}, which is "
                                          "missing")
        elif os.path.exists(single):
            with safe_open(single, framework="numpy") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            found = sorted(os.listdir(path)) if os.path.isdir(path) else []
            hint = (" (found PyTorch .bin weights: convert them to safetensors first)"
                    if any(n.endswith(".bin") for n in found) else "")
            raise CheckpointError(f"no {stem}.safetensors or {stem}.safetensors.index.json in "
                                  f"{path}{hint}; "
                                  f"directory holds {found}")
        self._handles: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self.file_of)

    def get(self, key: str) -> np.ndarray:
        file = self.file_of[key]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="numpy")
        return self._handles[file].get_tensor(key)


def read(path: str, cfg: Optional[Blip2Config] = None) -> tuple[Blip2Config, dict]:
    """(config, params) from an HF `save_pretrained` directory. Fails loudly on any key mismatch."""
    if cfg is None:
        cfg = config_lib.read_hf_config(path)
    reader = SafetensorsReader(path)
    keys, get = hf_vision.adapt_legacy_qkv_bias(reader.keys(), reader.get)
    if cfg.llm_kind == "t5":
        # transformers 5 writes tie_word_embeddings=true for every T5 and unties when the
        # checkpoint holds its own lm_head; so the checkpoint, not the flag, decides.
        untied = "language_model.lm_head.weight" in keys and (
            not cfg.llm.tie_word_embeddings or not np.array_equal(
                get("language_model.lm_head.weight"), get("language_model.shared.weight")))
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, tie_word_embeddings=not untied))
    if cfg.llm is None and not cfg.itc and any(k.startswith("vision_projection") for k in keys):
        cfg = cfg.replace(itc=True)
    try:
        params = mapping.load(rules(cfg), keys, get, ignore=ignorable(cfg), source=path)
    except MappingError as e:
        raise CheckpointError(str(e)) from None
    if cfg.itc:
        params["temp"] = np.asarray(LAVIS_INIT_TEMP, np.float32)
    if cfg.itg:
        raise CheckpointError(f"{path}: HF checkpoints have no Q-Former LM (ITG) head; the config "
                              "asks for one")
    return cfg, params


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def tensors(cfg: Blip2Config, params: Mapping) -> dict[str, np.ndarray]:
    """The flat HF state dict of our params (raises if a parameter has no HF name)."""
    if cfg.itg:
        raise MappingError("HF BLIP-2 has no Q-Former LM (ITG) head; save this model with "
                           "format='native', or drop the head (config itg=False, no lm_head)")
    params = {k: v for k, v in params.items() if k not in HF_ABSENT_OK}
    return mapping.save(rules(cfg), params)


def write(path: str, cfg: Blip2Config, params: Mapping,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `config.json` + safetensors (sharded with an index above `max_shard_bytes`)."""
    os.makedirs(path, exist_ok=True)
    flat = tensors(cfg, params)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_lib.to_hf_dict(cfg), f, indent=2)
    return write_safetensors(path, flat, max_shard_bytes, stem="model")


def write_safetensors(path: str, flat: Mapping[str, np.ndarray], max_shard_bytes: int,
                      stem: str = "model", metadata: Optional[dict] = None) -> list[str]:
    """One `{stem}.safetensors`, or `{stem}-0000i-of-0000n.safetensors` + index when larger."""
    shards: list[dict] = [{}]
    size = 0
    for key in sorted(flat):
        nbytes = flat[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = flat[key]
        size += nbytes
    meta = dict({"format": "np"}, **(metadata or {}))
    if len(shards) == 1:
        name = f"{stem}.safetensors"
        save_file(shards[0], os.path.join(path, name), metadata=meta)
        return [name]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in flat.values())
    with open(os.path.join(path, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
