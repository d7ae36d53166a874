"""The BLIP-2 composites: image encoder → Q-Former → (stage-1 heads | projection → frozen LLM).

One module, `Blip2Module`, whose configuration decides which parts exist:
  stage 1 (`config.llm is None`): ITC (vision_proj, text_proj, temp), ITM (itm_head) and ITG
  (lm_head, tied to the Q-Former word embeddings) surfaces — LAVIS `Blip2Qformer`, HF
  `Blip2ForImageTextRetrieval`;
  stage 2: `llm_proj` + a decoder-only LLM, OPT (HF `Blip2ForConditionalGeneration` with OPT,
  LAVIS `Blip2OPT`) or LLaMA (HF `Blip2ForConditionalGeneration` with a LLaMA `text_config`),
  which share one code path (queries prefix the text in one causal sequence), or T5 (LAVIS
  `Blip2T5`).
Parameter tree (top-level names are API: freezing, sharding and loading address them by regex):
  vision/ ln_vision/ qformer/ query_tokens  [vision_proj/ text_proj/ temp itm_head/ lm_head/]
  [llm_proj/ llm/]
Proven by tests/test_blip2.py (parity of every surface with HF, fp32, eager attention).
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax import nn as bnn
from blip2_jax.config import Blip2Config, QFormerConfig
from blip2_jax.models import llama as llama_lib, opt as opt_lib
from blip2_jax.models.llama import Llama
from blip2_jax.models.opt import OPT
from blip2_jax.models.qformer import QFormer
from blip2_jax.models.t5 import T5
from blip2_jax.models.vit import VisionTransformer

LAVIS_INIT_TEMP = 0.07   # Blip2Qformer.temp's initial value; HF checkpoints carry no temperature

# The decoder-only LLMs by `Blip2Config.llm_kind`: (module, its KV-cache constructor). Both take
# (inputs_embeds, mask, cache=, cache_index=, logits_from=) and return (logits, cache).
DECODERS = {"opt": (OPT, opt_lib.init_cache), "llama": (Llama, llama_lib.init_cache)}


class InstructionInputError(ValueError):
    """Q-Former instruction text (qformer_input_ids) given to a model that is not
    instruction-aware, or missing on one that is."""


def l2_normalize(x, axis=-1, eps=1e-12):
    """torch.nn.functional.normalize semantics: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class Blip2Module(nn.Module):
    config: Blip2Config

    def setup(self):
        cfg = self.config
        v, q = cfg.vision, cfg.qformer
        qdt, qpdt = bnn.dtype_of(q.dtype), bnn.dtype_of(q.param_dtype)
        self.vision = VisionTransformer(v)
        self.ln_vision = bnn.LayerNorm(v.post_layer_norm_eps, dtype=bnn.dtype_of(v.dtype),
                                       param_dtype=bnn.dtype_of(v.param_dtype))
        self.qformer = QFormer(q)
        self.query_tokens = self.param(
            "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                         (None, None, "embed")),
            (1, cfg.num_query_tokens, q.hidden_size), qpdt)
        dense = lambda n, axes: bnn.Dense(n, axes, dtype=qdt, param_dtype=qpdt)
        if cfg.itc:
            self.vision_proj = dense(cfg.embed_dim, ("embed", None))
            self.text_proj = dense(cfg.embed_dim, ("embed", None))
            self.temp = self.param("temp", nn.initializers.constant(LAVIS_INIT_TEMP), (), qpdt)
        if cfg.itm:
            self.itm_head = dense(2, ("embed", None))
        if cfg.itg:
            self.lm_head = QFormerLMHead(q)
        if cfg.llm is not None:
            llm = cfg.llm
            self.llm_proj = bnn.Dense(llm.hidden_size, (None, "embed"), dtype=qdt,
                                      param_dtype=qpdt)
            self.llm = DECODERS[cfg.llm_kind][0](llm) if cfg.decoder_only else T5(llm)

    # -- image side ------------------------------------------------------------------------------
    def image_embeds(self, pixel_values):
        """(B, N, Dv): the image encoder's tokens after its final LayerNorm."""
        return self.ln_vision(self.vision(pixel_values))

    def _instruction(self, qformer_input_ids, qformer_attention_mask):
        """The Q-Former text of an instruction-aware model (ids, mask or None); refuses it on a
        model without `qformer_text_input`, and requires it on one with (HF's InstructBLIP
        effectively does: its queries were trained next to an instruction)."""
        if not self.config.qformer_text_input:
            if qformer_input_ids is not None or qformer_attention_mask is not None:
                raise InstructionInputError(
                    "qformer_input_ids / qformer_attention_mask given, but this model's Q-Former "
                    "is not instruction-aware (Blip2Config.qformer_text_input=False)")
            return None, None
        if qformer_input_ids is None:
            raise InstructionInputError(
                "this model has an instruction-aware Q-Former (Blip2Config.qformer_text_input): "
                "pass qformer_input_ids (the instruction's BERT ids, [CLS] text [SEP]) and "
                "qformer_attention_mask")
        return qformer_input_ids, qformer_attention_mask

    def query_output(self, image_embeds, qformer_input_ids=None, qformer_attention_mask=None, *,
                     return_query_cache=False, return_image_kv=False, deterministic=True):
        """(B, Q, H) Q-Former outputs of the learned queries, and their per-layer K/V
        (`return_query_cache`) and the images' cross-attention K/V (`return_image_kv`; see
        `QFormer`). Instruction-aware models (`qformer_text_input`) run the queries with the
        instruction's BERT ids after them (the Q-Former's bidirectional queries + text pass;
        only the queries cross-attend) and return the query positions only."""
        dt = bnn.dtype_of(self.config.qformer.dtype)
        ids, mask = self._instruction(qformer_input_ids, qformer_attention_mask)
        queries = jnp.broadcast_to(self.query_tokens,
                                   (image_embeds.shape[0],) + self.query_tokens.shape[1:])
        h, cache = self.qformer(queries.astype(dt), ids, mask,
                                image_embeds=image_embeds.astype(dt),
                                return_query_cache=return_query_cache,
                                return_image_kv=return_image_kv, deterministic=deterministic)
        return h[:, :self.config.num_query_tokens], cache

    def query_embeds(self, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        return self.query_output(self.image_embeds(pixel_values), qformer_input_ids,
                                 qformer_attention_mask)[0]

    # -- stage-1 surfaces --------------------------------------------------------------------------
    def image_features(self, query_output):
        """(B, Q, E) L2-normalised ITC projections of every query."""
        return l2_normalize(self.vision_proj(query_output))

    def text_features(self, input_ids, attention_mask, *, deterministic=True):
        """(B, E) L2-normalised ITC projection of the text [CLS] output (text-only pass)."""
        h, _ = self.qformer(input_ids=input_ids, attention_mask=attention_mask,
                            deterministic=deterministic)
        return l2_normalize(self.text_proj(h[:, 0]))

    def itc(self, pixel_values, input_ids, attention_mask):
        """(B_img, B_txt): max over queries of the cosine similarity (no temperature)."""
        img = self.image_features(self.query_embeds(pixel_values))
        txt = self.text_features(input_ids, attention_mask)
        return jnp.max(jnp.einsum("iqe,te->itq", img, txt), axis=-1)

    def itm_logits(self, image_embeds, input_ids, attention_mask, *, image_index=None,
                   image_kv=None, deterministic=True):
        """(B, 2) ITM logits of image b with text b: itm_head over the query outputs, averaged.

        With image_index (B,) int, image_embeds (U, N, Dv) holds distinct images and text b is
        paired with image_embeds[image_index[b]]; the Q-Former then projects each image's
        cross-attention keys/values once instead of once per pair (retrieval re-ranking).
        image_kv: those keys/values as the query pass returned them (`query_output(...,
        return_image_kv=True)`), not projected again (training; image_embeds may be None)."""
        dt = bnn.dtype_of(self.config.qformer.dtype)
        b = input_ids.shape[0]
        queries = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
        h, _ = self.qformer(queries.astype(dt), input_ids, attention_mask,
                            None if image_embeds is None else image_embeds.astype(dt),
                            image_index=image_index, image_kv=image_kv,
                            deterministic=deterministic)
        return jnp.mean(self.itm_head(h[:, :self.config.num_query_tokens]), axis=1)

    def itm(self, pixel_values, input_ids, attention_mask):
        return self.itm_logits(self.image_embeds(pixel_values), input_ids, attention_mask)

    def itg_logits(self, query_cache, input_ids, attention_mask, *, deterministic=True):
        """(B, T, V) Q-Former LM logits of the text, attending to the cached query K/V (UniLM)."""
        h, _ = self.qformer(input_ids=input_ids, attention_mask=attention_mask, causal=True,
                            query_cache=query_cache, deterministic=deterministic)
        return self.lm_head(h, self.qformer.word_embedding())

    # -- stage 2 -----------------------------------------------------------------------------------
    def llm_prefix(self, query_output):
        """(B, Q, d_llm): the projected queries fed to the LLM as a soft visual prompt."""
        return self.llm_proj(query_output).astype(bnn.dtype_of(self.config.llm.dtype))

    def llm_inputs(self, pixel_values, input_ids, attention_mask, qformer_input_ids=None,
                   qformer_attention_mask=None):
        """LLM input embeddings [queries; text] and their mask [ones; attention_mask]. With no
        query tokens (`Blip2.without_image`) the text alone: the image is not read."""
        if not self.config.num_query_tokens:
            dt = bnn.dtype_of(self.config.llm.dtype)
            return self.llm.embed(input_ids).astype(dt), attention_mask
        prefix = self.llm_prefix(self.query_embeds(pixel_values, qformer_input_ids,
                                                   qformer_attention_mask))
        embeds = jnp.concatenate([prefix, self.llm.embed(input_ids).astype(prefix.dtype)], 1)
        mask = jnp.concatenate([jnp.ones(prefix.shape[:2], attention_mask.dtype),
                                attention_mask], 1)
        return embeds, mask

    def decoder_logits(self, embeds, mask, *, logits_from: int = 0):
        """A decoder-only LLM over a whole sequence (no cache), positioned as HF's forward: OPT
        from the mask (`cumsum(mask) - 1`, as its generate), LLaMA `arange` (HF's LlamaModel
        without position_ids; the same on the real tokens of right-padded rows). Logits (B,
        T - logits_from, V)."""
        kw = {}
        if self.config.llm_kind == "llama":
            kw["positions"] = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32),
                                               mask.shape)
        logits, _ = self.llm(embeds, mask, logits_from=logits_from, **kw)
        return logits

    def logits(self, pixel_values, input_ids, attention_mask, decoder_input_ids=None,
               decoder_attention_mask=None, qformer_input_ids=None, qformer_attention_mask=None):
        """LM logits over the text positions: OPT / LLaMA (B, T, V); T5 (B, T_dec, V); stage 1
        ITG. qformer_*: the instruction's Q-Former text (instruction-aware models only)."""
        cfg = self.config
        if cfg.llm is None:
            _, cache = self.query_output(self.image_embeds(pixel_values), qformer_input_ids,
                                         qformer_attention_mask, return_query_cache=True)
            return self.itg_logits(cache, input_ids, attention_mask)
        embeds, mask = self.llm_inputs(pixel_values, input_ids, attention_mask,
                                       qformer_input_ids, qformer_attention_mask)
        if cfg.decoder_only:
            return self.decoder_logits(embeds, mask, logits_from=cfg.num_query_tokens)
        if decoder_input_ids is None:
            decoder_input_ids = jnp.full((input_ids.shape[0], 1), cfg.llm.decoder_start_token_id,
                                         jnp.int32)
        encoded = self.llm.encode(embeds, mask)
        logits, _ = self.llm.decode(decoder_input_ids, encoded, mask,
                                    decoder_attention_mask=decoder_attention_mask)
        return logits

    # -- decoding (prefill + one-token step; the loops live in blip2_jax/generate.py) ------------
    def decode_prefill(self, pixel_values, input_ids, attention_mask, max_new_tokens: int,
                       qformer_input_ids=None, qformer_attention_mask=None):
        """Vision → Q-Former → projection → LLM over [queries; prompt], filling the LLM cache.
        qformer_*: the instruction's Q-Former text (instruction-aware models only).

        Returns (logits (B, V) after the last prompt position, cache, consts):
          OPT / LLaMA: the prompt must be LEFT-padded (its last position is a real token); cache
            {"k","v"} (L, B, Q + T + max_new_tokens, H or KV heads, D); consts {"mask": (B,
            Q+T+max_new)} (ones over queries and new tokens), positions come from the mask as
            in HF's generate (`cumsum(mask) - 1`);
          T5: the encoder runs once; cache = the decoder self-attention cache {"k","v"}
            (L, B, 1 + max_new_tokens, H, D) after the decoder start token; consts {"cross":
            {"k","v"} (L, B, Q + T, H, D), "enc_mask": (B, Q + T)}.
        Every cache leaf has the batch on axis 1 (beam search reorders it there); consts are not
        reordered (they are equal across the beams of a row). See `expand_decode_consts`.
        """
        cfg = self.config
        embeds, mask = self.llm_inputs(pixel_values, input_ids, attention_mask,
                                       qformer_input_ids, qformer_attention_mask)
        b, p = mask.shape
        if cfg.decoder_only:
            full = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), mask.dtype)], 1)
            cache = DECODERS[cfg.llm_kind][1](cfg.llm, b, p + max_new_tokens)
            logits, cache = self.llm(embeds, full, cache=cache, cache_index=0, logits_from=p - 1)
            return logits[:, -1], cache, {"mask": full}
        enc = self.llm.encode(embeds, mask)
        cache = self.llm.init_cache(enc, 1 + max_new_tokens)
        start = jnp.full((b, 1), cfg.llm.decoder_start_token_id, jnp.int32)
        logits, cache = self.llm.decode(start, None, mask, cache=cache, cache_index=0)
        return logits[:, -1], cache["self"], {"cross": cache["cross"], "enc_mask": mask}

    def decode_step(self, tokens, cache, consts, position):
        """Logits (N, V) after `tokens` (N,) at absolute decoder position `position` (see
        `decode_offset`), and the updated cache."""
        if self.config.decoder_only:
            logits, cache = self.llm(self.llm.embed(tokens[:, None]), consts["mask"], cache=cache,
                                     cache_index=position)
            return logits[:, -1], cache
        full = {"self": cache, "cross": consts["cross"]}
        logits, full = self.llm.decode(tokens[:, None], None, consts["enc_mask"], cache=full,
                                       cache_index=position)
        return logits[:, -1], full["self"]

    def decode_offset(self, prompt_len: int) -> int:
        """Absolute decoder position of new token 0: Q + T for OPT / LLaMA (after queries and
        prompt), 1 for T5 (after the decoder start token)."""
        if self.config.decoder_only:
            return self.config.num_query_tokens + prompt_len
        return 1

    def decode_seen_tokens(self, input_ids, attention_mask):
        """(B, V) bool: the tokens HF's RepetitionPenaltyLogitsProcessor counts before the first
        new token. OPT / LLaMA (decoder-only): HF's `input_ids` = [image_token_index x Q;
        prompt] with the left padding skipped (`prompt_ignore_length`), i.e. the image token id
        (when the config has one) and every unmasked prompt token. T5: the decoder ids, i.e.
        the decoder start token only (the encoder prompt is not counted)."""
        cfg = self.config
        v = cfg.llm.vocab_size
        b = input_ids.shape[0]
        seen = jnp.zeros((b, v), bool)
        if not cfg.decoder_only:
            return seen.at[:, cfg.llm.decoder_start_token_id].set(True)
        if cfg.image_token_index is not None and cfg.num_query_tokens > 0 and \
                0 <= cfg.image_token_index < v:
            seen = seen.at[:, cfg.image_token_index].set(True)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], input_ids.shape)
        ids = jnp.where(attention_mask > 0, input_ids, v)    # masked → out of range → dropped
        return seen.at[rows, ids].set(True, mode="drop")

    def __call__(self, pixel_values, input_ids, attention_mask, decoder_input_ids=None,
                 qformer_input_ids=None, qformer_attention_mask=None):
        """Touches every part that exists (used by `init`; an instruction-aware model without
        qformer_input_ids runs a one-token [0] instruction so that init needs no extra input)."""
        cfg = self.config
        if cfg.qformer_text_input and qformer_input_ids is None:
            qformer_input_ids = jnp.zeros((pixel_values.shape[0], 1), jnp.int32)
        image_embeds = self.image_embeds(pixel_values)
        out = {"image_embeds": image_embeds}
        if cfg.itc:
            out["itc"] = self.itc(pixel_values, input_ids, attention_mask) / self.temp
        if cfg.itm:
            out["itm"] = self.itm_logits(image_embeds, input_ids, attention_mask)
        if cfg.itg or cfg.llm is not None:
            out["logits"] = self.logits(pixel_values, input_ids, attention_mask, decoder_input_ids,
                                        qformer_input_ids=qformer_input_ids,
                                        qformer_attention_mask=qformer_attention_mask)
        if not (cfg.itc or cfg.itm or cfg.itg or cfg.llm is not None):
            out["query_embeds"] = self.query_embeds(pixel_values, qformer_input_ids,
                                                    qformer_attention_mask)
        return out

    # -- feature extraction (LAVIS `Blip2Qformer.extract_features`; used by `Blip2.features`) --
    def query_features(self, pixel_values):
        """(query outputs (B, Q, H), their L2-normalised ITC projections (B, Q, E) or None when
        the model has no vision_proj): LAVIS `image_embeds`, `image_embeds_proj`."""
        h = self.query_embeds(pixel_values)
        return h, (l2_normalize(self.vision_proj(h)) if self.config.itc else None)

    def text_embeds(self, input_ids, attention_mask):
        """(text-only Q-Former outputs (B, T, H), L2-normalised text_proj of every token
        (B, T, E) or None without ITC heads): LAVIS `text_embeds`, `text_embeds_proj`."""
        h, _ = self.qformer(input_ids=input_ids, attention_mask=attention_mask)
        return h, (l2_normalize(self.text_proj(h)) if self.config.itc else None)

    def multimodal_embeds(self, pixel_values, input_ids, attention_mask):
        """(B, Q, H): the query part of the fused [queries; text] Q-Former pass with image
        cross-attention and a bidirectional mask (the ITM pass): LAVIS `multimodal_embeds`."""
        dt = bnn.dtype_of(self.config.qformer.dtype)
        image_embeds = self.image_embeds(pixel_values)
        b = input_ids.shape[0]
        queries = jnp.broadcast_to(self.query_tokens, (b,) + self.query_tokens.shape[1:])
        h, _ = self.qformer(queries.astype(dt), input_ids, attention_mask, image_embeds.astype(dt))
        return h[:, :self.config.num_query_tokens]


class QFormerLMHead(nn.Module):
    """BERT LM head (LAVIS `Qformer.cls.predictions`): dense → GELU → LN → tied decoder + bias."""
    config: QFormerConfig

    @nn.compact
    def __call__(self, hidden, word_embedding):
        c = self.config
        dt, pdt = bnn.dtype_of(c.dtype), bnn.dtype_of(c.param_dtype)
        h = bnn.Dense(c.hidden_size, ("embed", "embed"), dtype=dt, param_dtype=pdt,
                      name="transform")(hidden)
        h = bnn.activation(c.activation)(h)
        h = bnn.LayerNorm(c.layer_norm_eps, dtype=dt, param_dtype=pdt, name="ln")(h)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (word_embedding.shape[0],), pdt)
        return h @ word_embedding.astype(dt).T + bias.astype(dt)


def expand_decode_consts(consts: dict, n: int) -> dict:
    """`Blip2Module.decode_prefill` consts for n beams per row: OPT's / LLaMA's mask repeated
    per beam; T5's cross K/V and encoder mask stay one per row (the decoder's cross-attention
    takes a row's beams as query positions; repeating them cost a whole copy every decode step,
    where XLA sank the repeat into the loop)."""
    if n == 1:
        return consts
    return {k: x if k in ("cross", "enc_mask") else jnp.repeat(x, n, axis=0)
            for k, x in consts.items()}


# ------------------------------------------------------------------------------------------------
# Parameters: shapes, logical specs and random init of a config (nothing else allocates them)
# ------------------------------------------------------------------------------------------------
def _dummy_inputs(cfg: Blip2Config):
    s = cfg.vision.image_size
    args = (jnp.zeros((1, s, s, 3), jnp.float32), jnp.ones((1, 4), jnp.int32),
            jnp.ones((1, 4), jnp.int32))
    if cfg.llm_kind == "t5":
        args += (jnp.zeros((1, 1), jnp.int32),)
    return args


@functools.lru_cache(maxsize=32)
def abstract_init(cfg: Blip2Config):
    """(logical PartitionSpecs, ShapeDtypeStructs) of every parameter, from one `eval_shape` of
    the module's init (nothing allocated; cached per config)."""
    module = Blip2Module(cfg)
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *_dummy_inputs(cfg)))
    return nn.get_partition_spec(boxed)["params"], nn.unbox(boxed["params"])


def abstract_params(cfg: Blip2Config) -> dict:
    """ShapeDtypeStructs of every parameter of `cfg` (nothing allocated)."""
    return abstract_init(cfg)[1]


def init_fn(cfg: Blip2Config, out_shardings=None) -> Callable:
    """A jitted `rng -> params` (random init; placed in `out_shardings` when given)."""
    module = Blip2Module(cfg)
    return jax.jit(lambda rng: nn.unbox(module.init(rng, *_dummy_inputs(cfg))["params"]),
                   out_shardings=out_shardings)


@functools.lru_cache(maxsize=16)
def _unplaced_init_fn(cfg: Blip2Config) -> Callable:
    """`init_fn(cfg)`, one per config: a second model of a config reuses the compiled init."""
    return init_fn(cfg)


def init_params(cfg: Blip2Config, seed: int = 0) -> dict:
    return _unplaced_init_fn(cfg)(jax.random.PRNGKey(seed))


def cast_params(cfg: Blip2Config, params):
    """Each tower's leaves in its config's param dtype."""
    towers = {"vision": cfg.vision, "ln_vision": cfg.vision,
              "llm": cfg.llm if cfg.llm is not None else cfg.qformer}
    return {k: jax.tree.map(lambda a, t=towers.get(k, cfg.qformer):
                            jnp.asarray(a, bnn.dtype_of(t.param_dtype)), v)
            for k, v in params.items()}
