"""`Blip2`: a config, a param pytree and jitted surfaces over `Blip2Module`.

    model = blip2_jax.load(path)              # HF save_pretrained dir or our native dir
    model.vision_embeds(pixel_values)         # (B, N, Dv)
    model.query_embeds(pixel_values)          # (B, Q, H)
    model.itc(pixel_values, ids, mask)        # (B_img, B_txt) max-over-queries cosine
    model.itm(pixel_values, ids, mask)        # (B, 2) ITM logits
    model.logits(pixel_values, ids, mask, decoder_input_ids=None, decoder_attention_mask=None)
    model.save(path, format="hf" | "native")

`pixel_values` are float (B, H, W, 3), normalised; `input_ids` hold text tokens only.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from blip2_jax import nn as bnn
from blip2_jax.config import Blip2Config, ConfigError, get_preset
from blip2_jax.convert import hf, mapping, native
from blip2_jax.models.blip2 import Blip2Module


class SurfaceError(AttributeError):
    """The model has no such surface (e.g. ITM on a captioning checkpoint)."""


def _dummy_inputs(cfg: Blip2Config):
    s = cfg.vision.image_size
    args = (jnp.zeros((1, s, s, 3), jnp.float32), jnp.ones((1, 4), jnp.int32),
            jnp.ones((1, 4), jnp.int32))
    if cfg.llm_kind == "t5":
        args += (jnp.zeros((1, 1), jnp.int32),)
    return args


def abstract_params(cfg: Blip2Config) -> dict:
    """ShapeDtypeStructs of every parameter of `cfg` (nothing allocated)."""
    module = Blip2Module(cfg)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *_dummy_inputs(cfg)))
    return nn.unbox(shapes["params"])


def init_params(cfg: Blip2Config, seed: int = 0) -> dict:
    module = Blip2Module(cfg)
    init = jax.jit(lambda rng: nn.unbox(module.init(rng, *_dummy_inputs(cfg))["params"]))
    return init(jax.random.PRNGKey(seed))


def check_params(cfg: Blip2Config, params, source: str = "params") -> None:
    """Raise MappingError unless `params` has exactly the names and shapes `cfg` needs."""
    want = {k: v.shape for k, v in mapping.flatten(abstract_params(cfg)).items()}
    have = {k: tuple(np.shape(v)) for k, v in mapping.flatten(params).items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(f"{k}: expected {want[k]}, found {have[k]}"
                   for k in set(want) & set(have) if tuple(want[k]) != have[k])
    mapping.check_names(f"{source} does not fit the model config:",
                        [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)])


def cast_params(cfg: Blip2Config, params):
    """Each tower's leaves in its config's param dtype."""
    towers = {"vision": cfg.vision, "ln_vision": cfg.vision,
              "llm": cfg.llm if cfg.llm is not None else cfg.qformer}
    return {k: jax.tree.map(lambda a, t=towers.get(k, cfg.qformer):
                            jnp.asarray(a, bnn.dtype_of(t.param_dtype)), v)
            for k, v in params.items()}


class Blip2:
    """A BLIP-2 model: `config`, `params` (plain pytree) and jitted surfaces."""

    def __init__(self, config: Blip2Config, params, *, check: bool = True):
        if check:
            check_params(config, params)
        self.config = config
        self.params = params
        self.module = Blip2Module(config)
        self._jitted: dict[str, Callable] = {}

    @classmethod
    def random(cls, config: Blip2Config | str, seed: int = 0) -> "Blip2":
        config = get_preset(config) if isinstance(config, str) else config
        return cls(config, init_params(config, seed), check=False)

    # -- surfaces --------------------------------------------------------------------------------
    def _call(self, method: str, *args):
        fn = self._jitted.get(method)
        if fn is None:
            module = self.module
            fn = jax.jit(lambda params, *a: module.apply({"params": params}, *a, method=method))
            self._jitted[method] = fn
        return fn(self.params, *args)

    def _pixels(self, pixel_values):
        x = jnp.asarray(pixel_values)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"pixel_values must be (B, H, W, 3) channels-last floats; got shape "
                             f"{x.shape} (HF's (B, 3, H, W) must be transposed)")
        p = self.config.vision.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1:3]} is not a multiple of the patch size {p}")
        return x.astype(jnp.float32)

    @staticmethod
    def _text(input_ids, attention_mask):
        ids = jnp.asarray(input_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T); got {ids.shape}")
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask,
                                                                            jnp.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        return ids, mask

    def _need(self, flag: bool, surface: str, what: str):
        if not flag:
            raise SurfaceError(f"this checkpoint has no {what}, so it cannot compute {surface}()")

    def vision_embeds(self, pixel_values):
        return self._call("image_embeds", self._pixels(pixel_values))

    def query_embeds(self, pixel_values):
        return self._call("query_embeds", self._pixels(pixel_values))

    def itc(self, pixel_values, input_ids, attention_mask=None):
        self._need(self.config.itc, "itc", "ITC projections (vision_proj/text_proj)")
        return self._call("itc", self._pixels(pixel_values), *self._text(input_ids, attention_mask))

    def itm(self, pixel_values, input_ids, attention_mask=None):
        self._need(self.config.itm, "itm", "ITM head (itm_head)")
        return self._call("itm", self._pixels(pixel_values), *self._text(input_ids, attention_mask))

    def logits(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None):
        cfg = self.config
        self._need(cfg.llm is not None or cfg.itg, "logits", "language model or ITG head")
        args = [self._pixels(pixel_values), *self._text(input_ids, attention_mask)]
        if cfg.llm_kind == "t5":
            if decoder_input_ids is None:
                decoder_input_ids = np.full((args[1].shape[0], 1), cfg.llm.decoder_start_token_id)
            dec = self._text(decoder_input_ids, decoder_attention_mask)
            args += [dec[0], None if decoder_attention_mask is None else dec[1]]
        elif decoder_input_ids is not None:
            raise ValueError("decoder_input_ids only apply to encoder-decoder (T5) models")
        return self._call("logits", *args)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str, format: str = "hf", max_shard_bytes: int =
             hf.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
        params = jax.tree.map(np.asarray, self.params)
        if format == "hf":
            return hf.write(path, self.config, params, max_shard_bytes)
        if format == "native":
            return native.write(path, self.config, params, max_shard_bytes)
        raise ValueError(f"format must be 'hf' or 'native', got {format!r}")


def load(path: str | os.PathLike, dtype: Optional[str] = "float32") -> Blip2:
    """A model from an HF `save_pretrained` directory or one written by `save(format="native")`.

    dtype: compute and parameter dtype of every tower ("float32", "bfloat16", "float16"), or None
    to keep the checkpoint's config (native) / float32 (HF).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if native.is_native(path):
        cfg, params = native.read(path)
    elif os.path.isfile(os.path.join(path, "config.json")):
        cfg, params = hf.read(path)
    else:
        raise ConfigError(f"{path} has neither {native.CONFIG_FILE} (blip2-jax) nor config.json "
                          "(Hugging Face)")
    if dtype is not None:
        cfg = cfg.with_dtypes(dtype)
    check_params(cfg, params, source=path)
    return Blip2(cfg, cast_params(cfg, params), check=False)
