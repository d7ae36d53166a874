"""Our own checkpoint format: `blip2_jax.json` (our config) + safetensors of "/"-joined param paths.

Bit-exact (dtypes kept, bf16 included), torch-free, sharded with an index above a size threshold.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

from blip2_jax.config import Blip2Config, ConfigError
from blip2_jax.convert import hf, stream

CONFIG_FILE = "blip2_jax.json"
FORMAT = "blip2-jax"
VERSION = 1


def is_native(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def write(path: str, cfg: Blip2Config, params_or_leaves: Mapping,
          max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, dtype=None) -> list[str]:
    """`params_or_leaves`: our param tree, or {leaf: stream.Leaf} (streamed, layer by layer)."""
    todo = stream.entries_for_leaves(stream.as_leaves(params_or_leaves), dtype)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "config": cfg.to_dict()}, f, indent=2)
    return stream.write_safetensors(path, todo, max_shard_bytes, stem="params")


def read_config(path: str) -> Blip2Config:
    file = os.path.join(path, CONFIG_FILE)
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{file}: version {meta.get('version')} is not supported ({VERSION})")
    return Blip2Config.from_dict(meta["config"])


def leaves(path: str) -> tuple[Blip2Config, dict]:
    """(config, {leaf: stream.Leaf}), read lazily (a stacked leaf one layer at a time)."""
    return read_config(path), stream.leaves_from_native(stream.SafetensorsReader(path, "params"))


def read(path: str) -> tuple[Blip2Config, dict]:
    cfg, out = leaves(path)
    return cfg, stream.read_tree(out)
