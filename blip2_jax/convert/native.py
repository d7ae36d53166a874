"""Our own checkpoint format: `blip2_jax.json` (our config) + safetensors of "/"-joined param paths.

Bit-exact (dtypes kept, bf16 included), torch-free, sharded with an index above a size threshold.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

from blip2_jax.config import Blip2Config, ConfigError
from blip2_jax.convert import hf, mapping

CONFIG_FILE = "blip2_jax.json"
FORMAT = "blip2-jax"
VERSION = 1


def is_native(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def write(path: str, cfg: Blip2Config, params: Mapping,
          max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "config": cfg.to_dict()}, f, indent=2)
    return hf.write_safetensors(path, mapping.flatten(params), max_shard_bytes, stem="params")


def read_config(path: str) -> Blip2Config:
    file = os.path.join(path, CONFIG_FILE)
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{file}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{file}: version {meta.get('version')} is not supported ({VERSION})")
    return Blip2Config.from_dict(meta["config"])


def read(path: str) -> tuple[Blip2Config, dict]:
    cfg = read_config(path)
    reader = hf.SafetensorsReader(path, stem="params")
    return cfg, mapping.unflatten({k: reader.get(k) for k in sorted(reader.keys())})
