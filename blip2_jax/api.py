"""`Blip2`: a config, a param pytree and jitted surfaces over `Blip2Module`.

    model = blip2_jax.load(path)              # HF save_pretrained dir, our native dir, LAVIS .pth
    model.vision_embeds(pixel_values)         # (B, N, Dv)
    model.query_embeds(pixel_values)          # (B, Q, H)
    model.itc(pixel_values, ids, mask)        # (B_img, B_txt) max-over-queries cosine
    model.itm(pixel_values, ids, mask)        # (B, 2) ITM logits
    model.logits(pixel_values, ids, mask, decoder_input_ids=None, decoder_attention_mask=None)
    model.generate(pixel_values, ids=None, mask=None, max_new_tokens=30, num_beams=1, ...)
                                              # (B, max_new_tokens) new token ids, pad after EOS
    model.save(path, format="hf" | "native" | "lavis")
    model.caption(images, prompt="")          # ["a dog on a couch", ...]   (LLM models)
    model.answer(images, "what is it?")       # zero-shot VQA, LAVIS defaults
    model.match(images, texts)                # (B,) ITM match probability  (stage-1 models)
    model.similarity(images, texts)           # (B_img, B_txt) ITC cosine
    model.features(images, texts, mode=...)   # LAVIS extract_features arrays

`pixel_values` are float (B, H, W, 3), normalised; `input_ids` hold text tokens only.
Instruction-aware models (InstructBLIP, `config.qformer_text_input`) take the instruction's
Q-Former text on every surface that takes an image: `qformer_input_ids=`,
`qformer_attention_mask=` (HF's names; required there, refused elsewhere).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from blip2_jax import generate as gen, processing, sharding
from blip2_jax.config import Blip2Config, get_preset
from blip2_jax.convert import hf, lavis, native, sources, stream
from blip2_jax.convert.mapping import check_params
from blip2_jax.models.blip2 import (Blip2Module, InstructionInputError, abstract_params,
                                    cast_params, expand_decode_consts, init_params)

PROMPT_BUCKET = 8   # generate() pads prompts to a multiple of this (one program per bucket)


class SurfaceError(AttributeError):
    """The model has no such surface (e.g. ITM on a captioning checkpoint)."""


@functools.lru_cache(maxsize=64)
def _surface_fn(config: Blip2Config, method: str) -> Callable:
    """The jitted `(params, *inputs) -> outputs` of one surface of a config's module, shared by
    every model of that config: a second model (another checkpoint, a sharded copy) reuses its
    traces and compiled programs."""
    module = Blip2Module(config)
    return jax.jit(lambda params, *a: module.apply({"params": params}, *a, method=method))


class Blip2:
    """A BLIP-2 model: `config`, `params` (plain pytree) and jitted surfaces."""

    def __init__(self, config: Blip2Config, params, *, check: bool = True, tokenizer=None,
                 qformer_tokenizer=None, checkpoint_dir: Optional[str | os.PathLike] = None):
        if check:
            check_params(config, params)
        self.config = config
        self.params = params
        # Text side (see "inference" below): explicit tokenizers, or loaded lazily from here.
        self._tokenizer, self._qformer_tokenizer = tokenizer, qformer_tokenizer
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.module = Blip2Module(config)
        self._jitted: dict[Any, Callable] = {}
        self._generate_traces = 0   # how many times a generate program was traced (= compiled)

    @classmethod
    def random(cls, config: Blip2Config | str, seed: int = 0) -> "Blip2":
        config = get_preset(config) if isinstance(config, str) else config
        return cls(config, init_params(config, seed), check=False)

    # -- surfaces --------------------------------------------------------------------------------
    def _place(self, x):
        """Where an input array goes before a jitted surface runs (sharded models override)."""
        return x

    def _call(self, method: str, *args):
        args = tuple(self._place(a) for a in args)
        return _surface_fn(self.config, method)(self.params, *args)

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

    def _instruction(self, qformer_input_ids, qformer_attention_mask, batch: int):
        """(ids, mask) of the Q-Former instruction text, or (None, None). A model without
        `qformer_text_input` refuses them, one with it requires them (InstructionInputError)."""
        if not self.config.qformer_text_input:
            if qformer_input_ids is not None or qformer_attention_mask is not None:
                raise InstructionInputError(
                    "qformer_input_ids / qformer_attention_mask given, but this model's Q-Former "
                    "is not instruction-aware (config.qformer_text_input=False)")
            return None, None
        if qformer_input_ids is None:
            raise InstructionInputError(
                "this model has an instruction-aware Q-Former (config.qformer_text_input): pass "
                "qformer_input_ids (the instruction's BERT ids, [CLS] text [SEP], e.g. from "
                "model.qformer_tokenizer) and qformer_attention_mask")
        ids, mask = self._text(qformer_input_ids, qformer_attention_mask)
        if ids.shape[0] != batch:
            raise ValueError(f"qformer_input_ids has {ids.shape[0]} rows but pixel_values {batch} "
                             "images (one instruction per image)")
        if ids.shape[1] > self.config.qformer.max_position_embeddings:
            raise ValueError(f"qformer_input_ids length {ids.shape[1]} exceeds the Q-Former's "
                             f"max_position_embeddings ({self.config.qformer.max_position_embeddings})")
        return ids, mask

    def query_embeds(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """(B, Q, H) query outputs; instruction-aware models take the instruction's Q-Former
        text (qformer_input_ids (B, T), qformer_attention_mask (B, T))."""
        pix = self._pixels(pixel_values)
        q = self._instruction(qformer_input_ids, qformer_attention_mask, pix.shape[0])
        return self._call("query_embeds", pix, *q)

    def itc(self, pixel_values, input_ids, attention_mask=None):
        self._need(self.config.itc, "itc", "ITC projections (vision_proj/text_proj)")
        return self._call("itc", self._pixels(pixel_values), *self._text(input_ids, attention_mask))

    def itm(self, pixel_values, input_ids, attention_mask=None):
        self._need(self.config.itm, "itm", "ITM head (itm_head)")
        return self._call("itm", self._pixels(pixel_values), *self._text(input_ids, attention_mask))

    def logits(self, pixel_values, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, qformer_input_ids=None, qformer_attention_mask=None):
        """LM logits over the text positions (see `Blip2Module.logits`); instruction-aware
        models take the instruction's Q-Former text (qformer_input_ids, qformer_attention_mask)."""
        cfg = self.config
        self._need(cfg.llm is not None or cfg.itg, "logits", "language model or ITG head")
        args = [self._pixels(pixel_values), *self._text(input_ids, attention_mask)]
        q = self._instruction(qformer_input_ids, qformer_attention_mask, args[0].shape[0])
        if cfg.llm_kind == "t5":
            if decoder_input_ids is None:
                decoder_input_ids = np.full((args[1].shape[0], 1), cfg.llm.decoder_start_token_id)
            dec = self._text(decoder_input_ids, decoder_attention_mask)
            args += [dec[0], None if decoder_attention_mask is None else dec[1]]
        elif decoder_input_ids is not None:
            raise ValueError("decoder_input_ids only apply to encoder-decoder (T5) models")
        else:
            args += [None, None]
        return self._call("logits", *args, *q)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, pixel_values, input_ids=None, attention_mask=None, max_new_tokens=30,
                 min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0,
                 top_k=0, length_penalty=1.0, repetition_penalty=1.0, eos_token_id=None,
                 seed=0, qformer_input_ids=None, qformer_attention_mask=None) -> np.ndarray:
        """New tokens (B, max_new_tokens) of HF `Blip2ForConditionalGeneration.generate`
        (`InstructBlipForConditionalGeneration.generate` for instruction-aware models, which
        require qformer_input_ids / qformer_attention_mask: the instruction's Q-Former text).

        pixel_values (B, H, W, 3); input_ids (B, T) prompt tokens (BOS included, no image
        placeholders), padded on either side (OPT / LLaMA run it left-padded, T5 right-padded, so
        a row decodes the same alone or in a batch); None = HF's empty prompt, [bos_token_id]
        (OPT 2; LLaMA 1 = "<s>"; T5 1 = "</s>", LAVIS's empty prompt). Greedy (num_beams=1),
        sampling (do_sample=True: temperature, top_k (0 = off), top_p; seeded by `seed`), beam
        search (num_beams > 1, early_stopping=False as HF's default; beam sampling with
        do_sample=True).
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
                              seed=seed, qformer_input_ids=qformer_input_ids,
                              qformer_attention_mask=qformer_attention_mask)

    def _generate(self, pixel_values, input_ids=None, attention_mask=None, *, max_new_tokens=30,
                  min_new_tokens=0, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0,
                  top_k=0, length_penalty=1.0, repetition_penalty=1.0, eos_token_id=None,
                  seed=0, early_stopping=False, qformer_input_ids=None,
                  qformer_attention_mask=None) -> np.ndarray:
        """`generate` plus HF's beam-search `early_stopping` (False, True or "never")."""
        cfg = self.config
        self._need(cfg.llm is not None, "generate", "language model")
        llm = cfg.llm
        pix = self._pixels(pixel_values)
        b = pix.shape[0]
        q_ids, q_mask = self._instruction(qformer_input_ids, qformer_attention_mask, b)
        left = cfg.decoder_only
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
        # Every process of a multi-host batch must build the same program: the widest prompt
        # of any process sets the bucket.
        width = int(sharding.gather_rows(np.array([(np.asarray(mask) > 0).sum(1).max(
            initial=0)])).max())
        ids, mask = pack_prompts(ids, mask, left=left, pad_id=pad, min_width=width)
        if left and ids.shape[1] and not mask[:, -1].all():
            raise ValueError("every prompt row needs at least one unmasked token (e.g. BOS) "
                             "when other rows have some")
        # OPT's learned position table ends there (LLaMA's rotary positions do not).
        if cfg.llm_kind == "opt" and cfg.num_query_tokens + ids.shape[1] + max_new_tokens > \
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
        fn = self._generate_program(opts, pix.shape, ids.shape,
                                    None if q_ids is None else q_ids.shape)
        q = None if q_ids is None else (self._place(q_ids), self._place(q_mask))
        out = fn(self.params, self._place(pix), self._place(jnp.asarray(ids, jnp.int32)),
                 self._place(jnp.asarray(mask, jnp.int32)), knobs, q)
        return sharding.to_host(out)

    def _generate_program(self, opts: gen.DecodeOptions, pixel_shape, prompt_shape,
                          qformer_shape=None) -> Callable:
        """prefill (per image/prompt/Q-Former text/max_new shape) then the decode loop (per
        static options): two jitted programs, so changing the decoding options never recompiles
        the prefill. The returned function takes the Q-Former text as (ids, mask) or None."""
        module = self.module

        def apply(params, method, *args, **kw):
            return module.apply({"params": params}, *args, method=method, **kw)

        pkey = ("generate_prefill", tuple(pixel_shape), tuple(prompt_shape), opts.max_new_tokens,
                None if qformer_shape is None else tuple(qformer_shape))
        prefill = self._jitted.get(pkey)
        if prefill is None:
            def prefill_program(params, pixel_values, input_ids, attention_mask, qformer_text):
                self._generate_traces += 1
                q = (None, None) if qformer_text is None else qformer_text
                logits, cache, consts = apply(params, "decode_prefill", pixel_values, input_ids,
                                              attention_mask, max_new_tokens=opts.max_new_tokens,
                                              qformer_input_ids=q[0],
                                              qformer_attention_mask=q[1])
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

        def run(params, pixel_values, input_ids, attention_mask, knobs, qformer_text=None):
            logits, cache, consts, seen = prefill(params, pixel_values, input_ids, attention_mask,
                                                  qformer_text)
            return loop(params, logits, cache, consts, seen, knobs)
        return run

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str, format: str = "hf", max_shard_bytes: int =
             hf.DEFAULT_MAX_SHARD_BYTES, lavis_parts: str = "full") -> list[str]:
        """Write the model: "hf" / "native" (a directory) or "lavis" (a `.pth` file LAVIS loads;
        `lavis_parts` "full" = every key, "trainable" = as LAVIS releases them). Returns the
        files written; what a LAVIS model has that this one lacks is warned about. A directory
        also gets the tokenizers the model holds (`_save_tokenizers`), as `save_pretrained`
        writes a processor's."""
        params = jax.tree.map(np.asarray, self.params)
        if format == "hf":
            return hf.write(path, self.config, params, max_shard_bytes) + \
                self._save_tokenizers(path)
        if format == "native":
            return native.write(path, self.config, params, max_shard_bytes) + \
                self._save_tokenizers(path)
        if format == "lavis":
            lavis.check_writable(self.config)
            for note in lavis.write(path, self.config, stream.leaves_from_tree(params),
                                    lavis_parts):
                warnings.warn(note, stacklevel=2)
            return [path]
        raise ValueError(f"format must be 'hf', 'native' or 'lavis', got {format!r}")

    def _save_tokenizers(self, path: str) -> list[str]:
        """The tokenizers this model holds (given, or loaded on use), written as HF's processors
        lay out a checkpoint directory: the LLM's in `path` itself (`Blip2Processor`), the
        Q-Former's in `path/qformer_tokenizer/` (`InstructBlipProcessor`), where
        `processing.load_tokenizer` and so `blip2_jax.load(path)` find them."""
        files = []
        held = ((self._tokenizer if self.config.llm is not None else None, path),
                (self._qformer_tokenizer, os.path.join(path, processing.QFORMER_SUBDIR)))
        for tok, where in held:
            if tok is not None and hasattr(tok, "save_pretrained"):
                files += [os.fspath(f) for f in tok.save_pretrained(where)]
        return files

    # -- sharding --------------------------------------------------------------------------------
    def shard(self, mesh, rules=None, **kw) -> "Blip2":
        """This model with its params placed on `mesh` by `blip2_jax.sharding.param_shardings`
        (`rules` default `DEFAULT_RULES`; `overrides=` per-tower rules). Its surfaces take numpy
        inputs and shard their batch over the data axes (replicated when it does not divide)."""
        out = ShardedBlip2(self, mesh, rules, **kw)
        out._copy_text_side(self)
        return out

    # -- inference: images and strings in, strings and numpy arrays out ------------------------
    # Text conventions (LAVIS `blip2_opt.py` / `blip2_t5.py` / `blip2_qformer.py`, HF BLIP-2):
    #   LLM prompts: OPT / LLaMA `[BOS] prompt` (left padded), T5 `prompt </s>` (right padded);
    #   generated tokens are cut at EOS and decoded with skip_special_tokens, then stripped.
    #   Q-Former texts: `[CLS] text [SEP]`, cleaned by LAVIS's eval text processor (`pre_caption`)
    #   unless clean_text=False; ITM truncates at 32 tokens, ITC pads/truncates to 35 (retrieval
    #   evaluation), features pad to the longest text (LAVIS `extract_features`).
    CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=1)
    VQA_DEFAULTS = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
    VQA_TEMPLATE = "Question: {} Short answer:"
    ITM_MAX_LENGTH = 32   # LAVIS Blip2ITM max_txt_len (truncation, padding to the longest)
    ITC_MAX_LENGTH = 35   # LAVIS retrieval evaluation (padding="max_length", truncation)

    @property
    def tokenizer(self):
        """The LLM's tokenizer (OPT GPT-2 BPE / T5 SentencePiece / LLaMA SentencePiece BPE),
        loaded on first use from `checkpoint_dir` with `processing.load_tokenizer(dir, "opt" |
        "t5" | "llama")`, or as given."""
        if self._tokenizer is None:
            self._need(self.config.llm is not None, "tokenizer", "language model")
            self._tokenizer = self._load_tokenizer(self.config.llm_kind, "tokenizer")
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value):
        self._tokenizer = value

    @property
    def qformer_tokenizer(self):
        """The Q-Former's BERT tokenizer (`[DEC]` added), loaded on first use from
        `checkpoint_dir` (or its qformer_tokenizer/) with `processing.load_tokenizer(dir,
        "qformer")`, or as given."""
        if self._qformer_tokenizer is None:
            self._need(self.config.qformer.has_text_input, "qformer_tokenizer",
                       "Q-Former text input (word embeddings)")
            self._qformer_tokenizer = self._load_tokenizer("qformer", "qformer_tokenizer")
        return self._qformer_tokenizer

    @qformer_tokenizer.setter
    def qformer_tokenizer(self, value):
        self._qformer_tokenizer = value

    def _load_tokenizer(self, kind: str, attr: str):
        if self.checkpoint_dir is None:
            raise ValueError(f"this model has no {attr} and no checkpoint directory to load one "
                             f"from; pass Blip2(..., {attr}=...) or set model.{attr}")
        return processing.load_tokenizer(self.checkpoint_dir, kind)

    def without_image(self) -> "Blip2":
        """The same model with no soft visual prompt (zero query tokens): its LLM reads the text
        alone, e.g. `model.without_image().answer(images, questions)` is the LLM's answer prior
        for those questions, the blind baseline of a VQA figure (images are taken and not
        read)."""
        self._need(self.config.llm is not None, "without_image", "language model")
        cfg = dataclasses.replace(self.config, num_query_tokens=0)
        # Only what the text-only module declares (no Q-Former, no projection).
        params = {k: self.params[k] for k in abstract_params(cfg)}
        params["query_tokens"] = params["query_tokens"][:, :0]
        out = Blip2(cfg, params)
        out._copy_text_side(self)
        return out

    def _copy_text_side(self, other: "Blip2") -> None:
        self._tokenizer = other._tokenizer
        self._qformer_tokenizer = other._qformer_tokenizer
        self.checkpoint_dir = other.checkpoint_dir

    def _images(self, images):
        """Pixel values (B, H, W, 3) from images (list of PIL images / uint8 arrays / paths, one
        such image, or a 4-D uint8 batch) via `processing.preprocess_images` at the config's
        image size, or from already preprocessed float pixel values (B, H, W, 3)."""
        dtype = getattr(images, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            return self._pixels(images)
        return self._pixels(processing.preprocess_images(images, self.config.vision.image_size))

    @staticmethod
    def _strings(texts, what: str) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{what} must be a string or a non-empty list of strings")
        return texts

    @staticmethod
    def _pair_up(pix, texts: list[str], what: str):
        """One text per image: a single text or a single image is broadcast to the other."""
        b, n = pix.shape[0], len(texts)
        if n == b:
            return pix, texts
        if n == 1:
            return pix, texts * b
        if b == 1:
            return jnp.repeat(pix, n, axis=0), texts
        raise ValueError(f"{n} {what} for {b} images: give one per image, or one for all")

    def _clean(self, texts: list[str], clean_text: bool) -> list[str]:
        return [processing.pre_caption(t) for t in texts] if clean_text else texts

    def _qformer_ids(self, texts: list[str], **kw):
        return processing.tokenize_prompts(self.qformer_tokenizer, texts, kind="qformer", **kw)

    def _text_and_decode(self, pix, prompts: Optional[list[str]], kwargs: dict) -> list[str]:
        """generate() on LLM prompts (None = the model's empty prompt), decoded to strings.
        Instruction-aware models also get each prompt (the whole instruction, as LAVIS's and
        HF's InstructBLIP) as Q-Former text: `[CLS] prompt [SEP]`, right padded, cut only at
        the Q-Former's position table (HF's processor does not truncate)."""
        cfg = self.config
        tok = self.tokenizer
        ids = mask = None
        if prompts is not None and any(prompts):
            ids, mask = processing.tokenize_prompts(tok, prompts, kind=cfg.llm_kind)
        if cfg.qformer_text_input:
            texts = prompts if prompts is not None else [""] * pix.shape[0]
            q_ids, q_mask = self._qformer_ids(
                texts, max_length=cfg.qformer.max_position_embeddings)
            kwargs = dict(kwargs, qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
        out = self.generate(pix, ids, mask, **kwargs)
        eos = kwargs.get("eos_token_id")
        eos = cfg.llm.eos_token_id if eos is None else eos
        eos_ids = [int(e) for e in np.atleast_1d(np.asarray(eos)).reshape(-1)]
        pad = cfg.llm.pad_token_id if cfg.llm.pad_token_id is not None else eos_ids[0]
        return processing.decode(tok, out, eos_token_id=eos_ids, pad_token_id=pad)

    def caption(self, images, prompt: str | list[str] = "", **generate_kwargs) -> list[str]:
        """One caption per image (LAVIS `Blip2OPT/Blip2T5.generate`).

        images: list of PIL images / uint8 arrays / paths, or preprocessed (B, H, W, 3) floats.
        prompt: text the caption continues (e.g. "a photo of", COCO fine-tuned models), one for
          all images or one per image; tokenised as the LLM wants (OPT / LLaMA `[BOS] prompt`,
          T5 `prompt </s>`); "" is the model's empty prompt (OPT / LLaMA `[BOS]`, T5 `</s>`).
        generate_kwargs: as `generate`; defaults LAVIS's captioning ones, CAPTION_DEFAULTS
          (num_beams=5, max_new_tokens=30, min_new_tokens=1, length_penalty=1).
        Returns the generated text (prompt excluded), cut at the EOS (OPT BLIP-2: "\\n"), stripped.
        Stage-1 (Q-Former-only) models raise SurfaceError.
        """
        self._need(self.config.llm is not None, "caption",
                   "language model (Q-Former-only captioning is not supported)")
        pix = self._images(images)
        prompts = self._strings(prompt, "prompt")
        pix, prompts = self._pair_up(pix, prompts, "prompts")
        return self._text_and_decode(pix, prompts, {**self.CAPTION_DEFAULTS, **generate_kwargs})

    def answer(self, images, questions: str | list[str], template: Optional[str] = VQA_TEMPLATE,
               clean_question: bool = False, **generate_kwargs) -> list[str]:
        """Zero-shot VQA (LAVIS `Blip2OPT/Blip2T5.predict_answers`, inference_method="generate";
        on an instruction-aware model `Blip2VicunaInstruct/Blip2T5Instruct.predict_answers`: the
        filled template goes to both the Q-Former, through its BERT tokenizer, and the LLM).

        questions: one per image, or one for all. Each becomes `template.format(question)` (no
          template when empty/None, as LAVIS with prompt=""). As `predict_answers` does with the
          text it is given, the question is used as is; LAVIS's VQA datasets run it through
          `blip_question` first, which clean_question=True applies (`processing.pre_question`).
        generate_kwargs: as `generate`; defaults LAVIS's, VQA_DEFAULTS (num_beams=5,
          max_new_tokens=10, min_new_tokens=1, length_penalty=-1).
        Returns the answers (decoded, cut at EOS, stripped).
        """
        self._need(self.config.llm is not None, "answer", "language model")
        pix = self._images(images)
        qs = self._strings(questions, "questions")
        if clean_question:
            qs = [processing.pre_question(q) for q in qs]
        prompts = [processing.fill_template(template, q) for q in qs] if template else qs
        pix, prompts = self._pair_up(pix, prompts, "questions")
        return self._text_and_decode(pix, prompts, {**self.VQA_DEFAULTS, **generate_kwargs})

    def match(self, images, texts: str | list[str], clean_text: bool = True) -> np.ndarray:
        """(B,) probability that image b matches text b: softmax of the ITM logits, class 1
        (LAVIS `Blip2ITM(match_head="itm")`, HF `use_image_text_matching_head=True`).

        A single image or text is broadcast. Texts: LAVIS's eval text processor `pre_caption`
        (clean_text=False: as given, HF's processor), `[CLS] text [SEP]` truncated at 32 tokens,
        padded to the longest.
        """
        self._need(self.config.itm, "match", "ITM head (itm_head)")
        pix = self._images(images)
        pix, texts = self._pair_up(pix, self._clean(self._strings(texts, "texts"), clean_text),
                                   "texts")
        ids, mask = self._qformer_ids(texts, max_length=self._qformer_max(self.ITM_MAX_LENGTH))
        logits = np.asarray(self.itm(pix, ids, mask), np.float32)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p[:, 1] / p.sum(axis=1)

    def similarity(self, images, texts: str | list[str], clean_text: bool = True) -> np.ndarray:
        """(B_img, B_txt) ITC cosine similarity: max over queries of normalised vision_proj(query)
        · normalised text_proj([CLS]), no temperature (LAVIS `match_head="itc"`, retrieval's ITC
        score; HF `logits_per_image`). Texts: `pre_caption` (unless clean_text=False),
        `[CLS] text [SEP]`, truncated and padded to 35 tokens (LAVIS retrieval evaluation)."""
        self._need(self.config.itc, "similarity", "ITC projections (vision_proj/text_proj)")
        pix = self._images(images)
        texts = self._clean(self._strings(texts, "texts"), clean_text)
        n = self._qformer_max(self.ITC_MAX_LENGTH)
        ids, mask = self._qformer_ids(texts, max_length=n, padding="max_length")
        return np.asarray(self.itc(pix, ids, mask), np.float32)

    def _qformer_max(self, n: int) -> int:
        return min(n, self.config.qformer.max_position_embeddings)

    def features(self, images=None, texts: Optional[str | list[str]] = None,
                 mode: str = "multimodal", clean_text: bool = True) -> dict[str, np.ndarray]:
        """LAVIS `Blip2Qformer.extract_features` (float32 numpy arrays; keys as LAVIS's
        `BlipOutputFeatures`, only those the mode computes):

        mode="image": `image_embeds` (B, Q, H) query outputs; `image_embeds_proj` (B, Q, E)
          normalised vision_proj of every query (when the model has ITC heads).
        mode="text": `text_embeds` (B, T, H) text-only Q-Former outputs (T = longest text);
          `text_embeds_proj` (B, T, E) normalised text_proj of every token ([:, 0] is the ITC
          text feature) (when the model has ITC heads).
        mode="multimodal" (LAVIS's default): `multimodal_embeds` (B, Q, H), the query part of the
          fused queries + text pass with image cross-attention (one text per image, or one
          for all).
        Texts: `pre_caption` (unless clean_text=False), `[CLS] text [SEP]`, padded to the longest
        and not truncated (as LAVIS) except at the Q-Former's position table.
        """
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        if mode != "text" and images is None:
            raise ValueError(f"mode={mode!r} needs images")
        if mode != "image":
            if texts is None:
                raise ValueError(f"mode={mode!r} needs texts")
            self._need(self.config.qformer.has_text_input, f"features(mode={mode!r})",
                       "Q-Former text input (word embeddings)")
        f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
        out = {}
        if mode == "image":
            h, proj = self._call("query_features", self._images(images))
            out["image_embeds"] = f32(h)
            if proj is not None:
                out["image_embeds_proj"] = f32(proj)
            return out
        texts = self._clean(self._strings(texts, "texts"), clean_text)
        limit = self.config.qformer.max_position_embeddings
        if mode == "text":
            ids, mask = self._qformer_ids(texts, max_length=limit)
            h, proj = self._call("text_embeds", *self._text(ids, mask))
            out["text_embeds"] = f32(h)
            if proj is not None:
                out["text_embeds_proj"] = f32(proj)
            return out
        pix, texts = self._pair_up(self._images(images), texts, "texts")
        ids, mask = self._qformer_ids(texts, max_length=limit)
        out["multimodal_embeds"] = f32(self._call("multimodal_embeds", pix,
                                                  *self._text(ids, mask)))
        return out


# ----------------------------------------------------------------------------------------------
# A sharded Blip2
# ----------------------------------------------------------------------------------------------
class ShardedBlip2(Blip2):
    """A `Blip2` whose params live on `mesh` and whose surfaces shard their inputs' batch.

    Surfaces are `jax.jit`-ed functions of (params, inputs) without explicit shardings, so they
    run SPMD following the shardings of their arguments: params as `sharding.param_shardings`, and each
    array input with its leading (batch) dimension over the batch axes, or replicated when its
    size does not divide them (e.g. a batch of 3 on data=2). Outputs are global arrays
    (`np.asarray` works in a single process). An Explicit-axes mesh is used as Auto. Built by
    `Blip2.shard(mesh, rules, overrides=...)`.
    """

    def __init__(self, model: Blip2, mesh: Mesh, rules: Optional[sharding.Rules] = None,
                 overrides: Sequence[tuple[str, sharding.Rules]] = ()):
        rules = sharding.DEFAULT_RULES if rules is None else tuple(rules)
        mesh = sharding.auto_mesh(mesh)
        shardings = sharding.param_shardings(model.config, mesh, rules, overrides)
        super().__init__(model.config, sharding.shard_params(model.params, shardings), check=False)
        self.mesh, self.rules, self.overrides = mesh, rules, overrides
        self.param_shardings = shardings

    def _place(self, x):
        """An array input's placement: batch-sharded (or replicated) unless already placed."""
        if isinstance(x, jax.Array) and (not x.is_fully_addressable
                                         or isinstance(x.sharding, NamedSharding)):
            return x   # a global / user-placed array keeps the caller's sharding
        if isinstance(x, (np.ndarray, jax.Array)) and x.ndim >= 1:
            return sharding.shard_batch(x, self.mesh, self.rules)
        return x


def pack_prompts(input_ids, attention_mask, *, left: bool, pad_id: int,
                 multiple: int = PROMPT_BUCKET, min_width: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts re-laid out for decoding: each row's unmasked tokens (in order) moved to the right
    end (`left=True`: left padding, OPT / LLaMA) or the left end (T5), the width (at least
    `min_width`) rounded up to a multiple of `multiple` (the compile bucket), pad_id / mask 0
    elsewhere.
    Masked positions are dropped, so any padding side gives each row the tokens it would have
    alone."""
    ids = np.asarray(input_ids)
    keep = np.asarray(attention_mask) > 0
    lengths = keep.sum(1)
    width = max(int(lengths.max(initial=0)), int(min_width))
    width = int(-(-width // multiple) * multiple)
    out = np.full((ids.shape[0], width), pad_id, np.int32)
    mask = np.zeros((ids.shape[0], width), np.int32)
    for r, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        out[r, cols] = ids[r][keep[r]]
        mask[r, cols] = 1
    return out, mask


def load(path: str | os.PathLike, dtype: Optional[str] = "float32", *, config=None,
         vision: Optional[str] = None, llm: Optional[str] = None,
         ln_vision_eps: Optional[float] = None, tokenizer=None,
         qformer_tokenizer=None) -> Blip2:
    """A model from an HF `save_pretrained` directory, one written by `save(format="native")`,
    or a LAVIS `.pth`.

    dtype: compute and parameter dtype of every tower ("float32", "bfloat16", "float16"), or None
    to keep the checkpoint's config (native) / float32 (HF).
    config: the model (preset name, config.json / blip2_jax.json, Blip2Config) where the checkpoint
    does not say it — LAVIS files are otherwise inferred from their shapes, with LAVIS numerics.
    vision, llm: tower sources for checkpoints that lack them (LAVIS releases trainable weights
    only): eva_vit_g.pth / clip_vit_L.pth / any BLIP-2 checkpoint; an HF OPT / FlanT5 directory.
    ln_vision_eps: override the final vision LayerNorm's eps (LAVIS 1e-5, HF 1e-6).
    tokenizer, qformer_tokenizer: `transformers` tokenizers to use; by default they are loaded
    from `path` on first use (`model.tokenizer`, `model.qformer_tokenizer`), so a checkpoint
    without tokenizer files loads and serves the array surfaces.
    """
    path = os.fspath(path)
    cfg, leaves, _ = sources.load(path, config, vision, llm, ln_vision_eps)
    params = stream.read_tree(leaves)
    if dtype is not None:
        cfg = cfg.with_dtypes(dtype)
    check_params(cfg, params, source=path)
    return Blip2(cfg, cast_params(cfg, params), check=False, tokenizer=tokenizer,
                 qformer_tokenizer=qformer_tokenizer,
                 checkpoint_dir=path if os.path.isdir(path) else None)
