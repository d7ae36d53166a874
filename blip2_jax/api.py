"""`Blip2`: a config, a param pytree and jitted surfaces over `Blip2Module`.

    model = blip2_jax.load(path)              # HF save_pretrained dir or our native dir
    model.vision_embeds(pixel_values)         # (B, N, Dv)
    model.query_embeds(pixel_values)          # (B, Q, H)
    model.itc(pixel_values, ids, mask)        # (B_img, B_txt) max-over-queries cosine
    model.itm(pixel_values, ids, mask)        # (B, 2) ITM logits
    model.logits(pixel_values, ids, mask, decoder_input_ids=None, decoder_attention_mask=None)
    model.generate(pixel_values, ids=None, mask=None, max_new_tokens=30, num_beams=1, ...)
                                              # (B, max_new_tokens) new token ids, pad after EOS
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

from blip2_jax import generate as gen
from blip2_jax import nn as bnn
from blip2_jax.config import Blip2Config, ConfigError, get_preset
from blip2_jax.convert import hf, mapping, native
from blip2_jax.models.blip2 import Blip2Module, expand_decode_consts

PROMPT_BUCKET = 8   # generate() pads prompts to a multiple of this (one program per bucket)


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
        self._jitted: dict[Any, Callable] = {}
        self._generate_traces = 0   # how many times a generate program was traced (= compiled)

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

    # -- generation ------------------------------------------------------------------------------
    def generate(self, pixel_values, input_ids=None, attention_mask=None, max_new_tokens=30,
                 min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0,
                 top_k=0, length_penalty=1.0, repetition_penalty=1.0, eos_token_id=None,
                 seed=0) -> np.ndarray:
        """New tokens (B, max_new_tokens) of HF `Blip2ForConditionalGeneration.generate`.

        pixel_values (B, H, W, 3); input_ids (B, T) prompt tokens (BOS included, no image
        placeholders), padded on either side (OPT runs it left-padded, T5 right-padded, so a row
        decodes the same alone or in a batch); None = HF's empty prompt, [bos_token_id] (OPT 2;
        T5 1 = "</s>", LAVIS's empty prompt). Greedy (num_beams=1), sampling (do_sample=True:
        temperature, top_k (0 = off), top_p; seeded by `seed`), beam search (num_beams > 1,
        early_stopping=False as HF's default; beam sampling with do_sample=True).
        eos_token_id: int or list; default the LLM config's. After EOS a row holds the LLM's
        pad_token_id. Sampling draws from jax.random (reproducible per seed; not torch's
        stream, so sampled tokens differ from HF's).
        Compilation: prompts are padded to a multiple of PROMPT_BUCKET; the prefill program is
        keyed by (batch, image size, prompt bucket, max_new_tokens), the decode loop by (batch,
        prompt bucket, max_new_tokens, num_beams, do_sample, top_k, top_p < 1,
        repetition_penalty != 1, eos ids). temperature, top_p, repetition_penalty values,
        min_new_tokens, length_penalty and seed are traced (no recompilation).
        """
        return self._generate(pixel_values, input_ids, attention_mask,
                              max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              num_beams=num_beams, do_sample=do_sample, temperature=temperature,
                              top_p=top_p, top_k=top_k, length_penalty=length_penalty,
                              repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                              seed=seed)

    def _generate(self, pixel_values, input_ids=None, attention_mask=None, *, max_new_tokens=30,
                  min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0,
                  top_k=0, length_penalty=1.0, repetition_penalty=1.0, eos_token_id=None,
                  seed=0, early_stopping=False) -> np.ndarray:
        """`generate` plus HF's beam-search `early_stopping` (False, True or "never")."""
        cfg = self.config
        self._need(cfg.llm is not None, "generate", "language model")
        llm = cfg.llm
        pix = self._pixels(pixel_values)
        b = pix.shape[0]
        is_opt = cfg.llm_kind == "opt"
        if eos_token_id is None:
            eos_token_id = llm.eos_token_id
        eos = tuple(int(e) for e in np.atleast_1d(np.asarray(eos_token_id)).reshape(-1))
        if not eos:
            raise ValueError("eos_token_id must name at least one token")
        pad = llm.pad_token_id if llm.pad_token_id is not None else eos[0]
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError("attention_mask given without input_ids")
            bos = llm.bos_token_id if llm.bos_token_id is not None else llm.eos_token_id
            ids, mask = np.full((b, 1), bos, np.int64), np.ones((b, 1), np.int64)
        else:
            ids = np.asarray(input_ids)
            mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
            if ids.ndim != 2 or mask.shape != ids.shape:
                raise ValueError(f"input_ids must be (B, T) with a matching attention_mask; got "
                                 f"{ids.shape} and {mask.shape}")
            if ids.shape[0] != b:
                raise ValueError(f"input_ids has {ids.shape[0]} rows but pixel_values {b} "
                                 "images (one prompt per image)")
            img = cfg.image_token_index
            if img is not None and np.any((ids == img) & (mask > 0)):
                raise ValueError(f"input_ids contain the image token {img}: pass text tokens "
                                 "only, the queries are prepended inside")
        ids, mask = pack_prompts(ids, mask, left=is_opt, pad_id=pad)
        if is_opt and ids.shape[1] and not mask[:, -1].all():
            raise ValueError("every prompt row needs at least one unmasked token (e.g. BOS) "
                             "when other rows have some")
        if is_opt and cfg.num_query_tokens + ids.shape[1] + max_new_tokens > \
                llm.max_position_embeddings:
            raise ValueError(f"{cfg.num_query_tokens} queries + prompt bucket {ids.shape[1]} + "
                             f"{max_new_tokens} new tokens exceed OPT's "
                             f"max_position_embeddings {llm.max_position_embeddings}")
        if min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        opts = gen.DecodeOptions(
            max_new_tokens=int(max_new_tokens), eos_token_ids=eos, pad_token_id=int(pad),
            num_beams=int(num_beams), do_sample=bool(do_sample),
            top_k=int(top_k) if do_sample else 0, use_top_p=bool(do_sample and top_p < 1.0),
            use_repetition_penalty=repetition_penalty != 1.0, early_stopping=early_stopping)
        knobs = gen.make_knobs(opts, temperature=temperature, top_p=top_p,
                               repetition_penalty=repetition_penalty,
                               min_new_tokens=min_new_tokens, length_penalty=length_penalty,
                               seed=seed)
        fn = self._generate_program(opts, pix.shape, ids.shape)
        out = fn(self.params, pix, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                 knobs)
        return np.asarray(out)

    def _generate_program(self, opts: gen.DecodeOptions, pixel_shape, prompt_shape) -> Callable:
        """prefill (per image/prompt/max_new shape) then the decode loop (per static options):
        two jitted programs, so changing the decoding options never recompiles the prefill."""
        module = self.module

        def apply(params, method, *args, **kw):
            return module.apply({"params": params}, *args, method=method, **kw)

        pkey = ("generate_prefill", tuple(pixel_shape), tuple(prompt_shape), opts.max_new_tokens)
        prefill = self._jitted.get(pkey)
        if prefill is None:
            def prefill_program(params, pixel_values, input_ids, attention_mask):
                self._generate_traces += 1
                logits, cache, consts = apply(params, "decode_prefill", pixel_values, input_ids,
                                              attention_mask, max_new_tokens=opts.max_new_tokens)
                seen = apply(params, "decode_seen_tokens", input_ids, attention_mask)
                return logits, cache, consts, seen
            prefill = self._jitted[pkey] = jax.jit(prefill_program)

        dkey = ("generate_decode", opts, pixel_shape[0], tuple(prompt_shape))
        loop = self._jitted.get(dkey)
        if loop is None:
            offset = apply(self.params, "decode_offset", prompt_shape[1])

            def decode_program(params, logits, cache, consts, seen, knobs):
                self._generate_traces += 1
                consts = expand_decode_consts(consts, opts.num_beams)

                def step(cache, tokens, t):
                    return apply(params, "decode_step", tokens, cache, consts, offset + t)

                return gen.decode(step, cache, logits, opts, knobs, seen)
            loop = self._jitted[dkey] = jax.jit(decode_program)

        def run(params, pixel_values, input_ids, attention_mask, knobs):
            logits, cache, consts, seen = prefill(params, pixel_values, input_ids, attention_mask)
            return loop(params, logits, cache, consts, seen, knobs)
        return run

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str, format: str = "hf", max_shard_bytes: int =
             hf.DEFAULT_MAX_SHARD_BYTES) -> list[str]:
        params = jax.tree.map(np.asarray, self.params)
        if format == "hf":
            return hf.write(path, self.config, params, max_shard_bytes)
        if format == "native":
            return native.write(path, self.config, params, max_shard_bytes)
        raise ValueError(f"format must be 'hf' or 'native', got {format!r}")

    # -- sharding --------------------------------------------------------------------------------
    def shard(self, mesh, rules=None, **kw) -> "Blip2":
        """This model with its params placed on `mesh` by `blip2_jax.sharding.param_shardings`
        (`rules` default `DEFAULT_RULES`; `overrides=` per-tower rules). Its surfaces take numpy
        inputs and shard their batch over the data axes (replicated when it does not divide)."""
        from blip2_jax import sharding
        return sharding.ShardedBlip2(self, mesh, rules, **kw)


def pack_prompts(input_ids, attention_mask, *, left: bool, pad_id: int,
                 multiple: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Prompts re-laid out for decoding: each row's unmasked tokens (in order) moved to the right
    end (`left=True`: left padding, OPT) or the left end (T5), the width rounded up to a multiple
    of `multiple` (the compile bucket), pad_id / mask 0 elsewhere. Masked positions are dropped,
    so any padding side gives each row the tokens it would have alone."""
    ids = np.asarray(input_ids)
    keep = np.asarray(attention_mask) > 0
    lengths = keep.sum(1)
    width = int(-(-int(lengths.max(initial=0)) // multiple) * multiple)
    out = np.full((ids.shape[0], width), pad_id, np.int32)
    mask = np.zeros((ids.shape[0], width), np.int32)
    for r, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        out[r, cols] = ids[r][keep[r]]
        mask[r, cols] = 1
    return out, mask


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
