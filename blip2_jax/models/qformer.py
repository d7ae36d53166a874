"""The BLIP-2 Q-Former (BERT-style, post-LN) with cross-attention to image features.

Matches Hugging Face `transformers` `Blip2QFormerModel` (+ the word/position tables of
`Blip2TextEmbeddings`) in fp32, and the LAVIS `Qformer.py` modes HF lacks (UniLM-causal ITG, with or
without the query key/value cache).

Modes of `QFormer.__call__` (Q queries, T text tokens):
  a. queries only (`query_embeds`)                      → (B, Q, H)   ITC image side / stage 2
  b. text only (`input_ids`, `attention_mask`)          → (B, T, H)   ITC text side
  c. queries + text, bidirectional                      → (B, Q+T, H) ITM
  d. queries + text, `causal=True` (UniLM)              → (B, Q+T, H) ITG in one call
  e. text + `query_cache` from (a), `causal=True`       → (B, T, H)   ITG as LAVIS runs it
With `image_index` (B,), `image_embeds` holds U distinct images and row b attends to image
`image_index[b]`: every cross-attention layer projects the U images' keys/values once and gathers
them per row (ITM re-ranking, where each image meets many texts). Without it, U images may serve
B = r·U rows in consecutive groups of r (the ITM pairs of a row's own image): each image's r rows
of queries attend as one row, with its keys/values neither repeated nor gathered.
`return_image_kv` returns those keys/values from a query pass and `image_kv` takes them in a
later pass instead of projecting the images again (training: the ITM pass reuses the query
pass's).
Tests: tests/test_qformer.py — (a), (b), (c) against HF's Q-Former calls, (d) against HF fed the
explicit 4-D UniLM mask, (e) against (d), the query cache against HF's per-layer key/value
projections, dropout / remat behaviour and the HF weight round trip; tests/test_retrieval_eval.py
— `image_index` against the per-row images.

Parameter tree (`cross_attention_frequency` = F, `num_layers` = L, G = L // F groups, R = L % F):
  embeddings/{word, position}/embedding   only with `has_text_input`
  embeddings/ln/{scale, bias}
  layers/layer_{j}/...                    j = 0..F-1, every leaf stacked (G, ...); layer_{j} of group
                                          g is HF layer g*F + j; only layer_0 has cross-attention:
    self_attn/{query,key,value,out}/{kernel,bias}, self_ln
    cross_attn/{query,key,value,out}, cross_ln                 (j == 0)
    query_ffn/{fc1,fc2}, query_ffn_ln
    text_ffn/{fc1,fc2}, text_ffn_ln                            (only with `has_text_input`)
  tail/layer_{j}/...                      j = 0..R-1 when F does not divide L: HF layer G*F + j,
                                          unstacked (layer_0 has cross-attention, as HF's
                                          layer % F == 0 rule gives)
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax.config import QFormerConfig
from blip2_jax.nn import Attention, Embed, LayerNorm, Mlp, attention_mask as make_mask, dtype_of, \
    scan_layers

Array = jax.Array


def layout(cfg: QFormerConfig) -> tuple[int, int]:
    """(G, R): G scanned groups of F layers (one cross-attention layer + F-1 without), then R
    unscanned tail layers when F does not divide the depth (the first with cross-attention)."""
    f = cfg.cross_attention_frequency
    if f < 1:
        raise ValueError(f"QFormerConfig.cross_attention_frequency must be >= 1, got {f}")
    return divmod(cfg.num_layers, f)


class QFormerEmbeddings(nn.Module):
    """LN(concat(queries, word[ids] + position[0..T-1])); text tables only with `has_text_input`."""
    config: QFormerConfig

    @nn.compact
    def __call__(self, query_embeds: Optional[Array], input_ids: Optional[Array]) -> Array:
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.astype(dt))
        if cfg.has_text_input:
            word = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt, name="word")
            position = Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt,
                             param_dtype=pdt, name="position")
            if input_ids is not None:
                t = input_ids.shape[1]
                if t > cfg.max_position_embeddings:
                    raise ValueError(f"text length {t} exceeds max_position_embeddings "
                                     f"({cfg.max_position_embeddings})")
                parts.append(word(input_ids) + position(jnp.arange(t))[None])
            elif self.is_initializing():       # create the text tables on a queries-only init
                word(jnp.zeros((1, 1), jnp.int32))
                position(jnp.zeros((1,), jnp.int32))
        elif input_ids is not None:
            raise ValueError("this Q-Former has no text input (QFormerConfig.has_text_input=False)")
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="ln")(x)


class QFormerLayer(nn.Module):
    """One BERT layer: self-attn → [queries: cross-attn] → query FFN / text FFN, all post-LN.

    The first `query_len` positions of `h` are queries (cross-attention + query FFN), the rest text
    (text FFN). `kv_prefix=(k, v)` (B, P, heads, head_dim): keys/values prepended to the
    self-attention keys (the query cache in mode e). `image_index` (B,): row b cross-attends to
    `image_embeds[image_index[b]]` (keys/values projected once per image). Returns (h, (k, v) of
    the query positions or None).
    """
    config: QFormerConfig
    has_cross: bool
    query_len: int
    deterministic: bool = True
    return_kv: bool = False
    return_image_kv: bool = False

    @nn.compact
    def __call__(self, h, mask, image_embeds, kv_prefix=None, image_index=None, image_kv=None):
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        det = self.deterministic
        init = self.is_initializing()
        attn = functools.partial(Attention, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                                 out_features=cfg.hidden_size, dropout_rate=cfg.attention_dropout,
                                 dtype=dt, param_dtype=pdt)
        ln = functools.partial(LayerNorm, cfg.layer_norm_eps, dtype=dt, param_dtype=pdt)
        mlp = functools.partial(Mlp, cfg.intermediate_size, cfg.hidden_size, act=cfg.activation,
                                dtype=dt, param_dtype=pdt)
        drop = lambda x: nn.Dropout(cfg.hidden_dropout)(x, deterministic=det)

        def text_ffn(x):
            if not cfg.has_text_input:
                raise ValueError("text positions need the text FFN, which this Q-Former lacks "
                                 "(QFormerConfig.has_text_input=False)")
            return ln(name="text_ffn_ln")(x + drop(mlp(name="text_ffn")(x)))

        def query_ffn(x):
            return ln(name="query_ffn_ln")(x + drop(mlp(name="query_ffn")(x)))

        def cross(x, context, index=None, given=None):
            # The images' keys/values: given (projected by an earlier pass), or projected here
            # once per image; with `index`, gathered per row. U images for B = r·U rows (rows
            # in consecutive groups of r per image): each image's r rows of queries attend as
            # one row of r·Q queries (softmax is per query), so its K/V are never repeated.
            a = attn(name="cross_attn")
            kv = given if given is not None else a.project_kv(context.astype(dt))
            if index is not None:
                c, _ = a(x, kv=tuple(jnp.take(t, index, axis=0) for t in kv), deterministic=det)
            else:
                b, q, u = x.shape[0], x.shape[1], kv[0].shape[0]
                c, _ = a(x.reshape(u, (b // u) * q, x.shape[2]), kv=kv, deterministic=det)
                c = c.reshape(x.shape)
            return ln(name="cross_ln")(x + drop(c)), kv

        q_len = self.query_len
        image_kv_out = None
        self_attn = attn(name="self_attn")
        k, v = self_attn.project_kv(h)
        query_kv = (k[:, :q_len], v[:, :q_len]) if self.return_kv else None
        if kv_prefix is not None:
            k = jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1)
        a, _ = self_attn(h, kv=(k, v), mask=mask, deterministic=det)
        h = ln(name="self_ln")(h + drop(a))

        if q_len > 0:
            x = h[:, :q_len]
            if self.has_cross:
                if image_embeds is None and image_kv is None:
                    raise ValueError("queries need image_embeds or image_kv (layer with "
                                     "cross-attention)")
                given = None if image_kv is None else (image_kv["k"], image_kv["v"])
                x, kv = cross(x, image_embeds, image_index, given)
                if self.return_image_kv:
                    image_kv_out = {"k": kv[0], "v": kv[1]}
            x = query_ffn(x)
            if h.shape[1] > q_len:
                x = jnp.concatenate([x, text_ffn(h[:, q_len:])], axis=1)
            elif init and cfg.has_text_input:
                text_ffn(h)                         # create the text-FFN params
            return x, query_kv, image_kv_out
        if init:                                    # create the query-side params
            if self.has_cross:
                cross(h, jnp.zeros((h.shape[0], 1, cfg.encoder_hidden_size), dt)
                      if image_embeds is None else image_embeds)
            query_ffn(h)
        return text_ffn(h), query_kv, image_kv_out


class QFormerGroup(nn.Module):
    """`size` (default `cross_attention_frequency`) consecutive layers, the first with
    cross-attention: the scan body, and the tail of a depth F does not divide."""
    config: QFormerConfig
    query_len: int
    deterministic: bool = True
    return_kv: bool = False
    return_image_kv: bool = False
    size: Optional[int] = None

    @nn.compact
    def __call__(self, h, mask, image_embeds, kv_prefix, image_index=None, image_kv=None):
        cfg = self.config
        kvs = []
        out = {}
        for j in range(self.size or cfg.cross_attention_frequency):
            prefix = None if kv_prefix is None else (kv_prefix["k"][j], kv_prefix["v"][j])
            h, kv, ikv = QFormerLayer(
                cfg, has_cross=(j == 0), query_len=self.query_len,
                deterministic=self.deterministic, return_kv=self.return_kv,
                return_image_kv=self.return_image_kv, name=f"layer_{j}")(
                    h, mask, image_embeds, prefix, image_index, image_kv if j == 0 else None)
            kvs.append(kv)
            if ikv is not None:
                out["image_k"], out["image_v"] = ikv["k"], ikv["v"]
        if self.return_kv:
            out["k"] = jnp.stack([kv[0] for kv in kvs])
            out["v"] = jnp.stack([kv[1] for kv in kvs])
        return h, out or None


class QFormer(nn.Module):
    """BLIP-2 Q-Former: embeddings (text tables + LN) and the scanned layers.

    Not owned here: `query_tokens`, the ITC/ITM/LM heads (the composite model owns them).
    """
    config: QFormerConfig

    def word_embedding(self) -> Array:
        """(V, H) word-embedding table (for the tied ITG LM head); call after a text pass."""
        if not self.config.has_text_input:
            raise ValueError("this Q-Former has no word embeddings (has_text_input=False)")
        return nn.unbox(self.variables["params"]["embeddings"]["word"]["embedding"])

    @nn.compact
    def __call__(self, query_embeds: Optional[Array] = None, input_ids: Optional[Array] = None,
                 attention_mask: Optional[Array] = None, image_embeds: Optional[Array] = None, *,
                 image_index: Optional[Array] = None, image_kv: Optional[dict] = None,
                 causal: bool = False, query_cache: Optional[dict] = None,
                 return_query_cache: bool = False, return_image_kv: bool = False,
                 deterministic: bool = True) -> tuple[Array, Optional[dict]]:
        """Hidden states, and (with `return_query_cache`) the queries' self-attention K/V.

        query_embeds: (B, Q, H) query tokens (already broadcast to the batch).
        input_ids: (B, T) text ids; attention_mask: (B, T) 1 = real token, 0 = padding (text
          positions only; queries are always valid). image_embeds: (B, N, encoder_hidden_size),
          or (U, N, encoder_hidden_size) with image_index (B,) int: row b's image is
          image_embeds[image_index[b]] (cross-attention keys/values computed once per image),
          or (U, N, encoder_hidden_size) with U dividing B and no image_index: row b's image is
          b // (B / U) (`jnp.repeat`'s order; nothing is repeated).
        image_kv: {"k", "v"} each (G, U, N, heads, head_dim), the images' cross-attention
          keys/values as `return_image_kv` gave them (G = layers with cross-attention): used
          instead of projecting image_embeds again (which may then be None); U rows as for
          image_embeds.
        causal: UniLM mask — queries see only queries, text t sees all queries and text <= t.
        query_cache: {"k", "v"} each (L, B, Q, heads, head_dim), as returned by a queries-only
          call with `return_query_cache=True`; the text then attends to [cached queries ; text]
          (needs `causal=True`, no `query_embeds`, no cross-attention runs).
        Returns (hidden, cache): hidden is (B, Q+T, H) (queries first; Q = 0 with a query_cache);
        cache is {"k","v"} (L, B, Q, heads, head_dim) in layer order (`return_query_cache`),
        plus {"image_k", "image_v"} (G, B, N, heads, head_dim) (`return_image_kv`), or None.
        """
        cfg = self.config
        groups, tail = layout(cfg)
        freq = cfg.cross_attention_frequency
        dt = dtype_of(cfg.dtype)
        if query_embeds is None and input_ids is None:
            raise ValueError("QFormer needs query_embeds and/or input_ids")
        if attention_mask is not None and input_ids is None:
            raise ValueError("attention_mask covers text positions only; it needs input_ids")
        if query_cache is not None:
            if query_embeds is not None or input_ids is None:
                raise ValueError("query_cache is used with input_ids and without query_embeds")
            if not causal:
                raise ValueError("query_cache is only meaningful with causal=True (ITG): the "
                                 "cached queries never saw the text")
            if query_cache["k"].shape[0] != cfg.num_layers:
                raise ValueError(f"query_cache has {query_cache['k'].shape[0]} layers, the "
                                 f"Q-Former {cfg.num_layers}")
        if return_query_cache and query_embeds is None:
            raise ValueError("return_query_cache needs query_embeds")
        if image_index is not None and image_embeds is None and image_kv is None:
            raise ValueError("image_index selects rows of image_embeds; it needs image_embeds")
        if return_image_kv and (query_embeds is None or image_embeds is None):
            raise ValueError("return_image_kv needs query_embeds and image_embeds")

        q_len = 0 if query_embeds is None else query_embeds.shape[1]
        prefix_len = q_len if query_cache is None else query_cache["k"].shape[2]
        text_len = 0 if input_ids is None else input_ids.shape[1]
        batch = (query_embeds if query_embeds is not None else input_ids).shape[0]
        images = (image_kv["k"].shape[1] if image_kv is not None
                  else None if image_embeds is None else image_embeds.shape[0])
        if q_len and image_index is None and images is not None and batch % images:
            raise ValueError(f"{images} images for {batch} rows: give one image per row, a "
                             f"number of images dividing the rows (consecutive rows share one), "
                             f"or image_index")

        h = QFormerEmbeddings(cfg, name="embeddings")(query_embeds, input_ids)
        h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)

        mask = None
        if text_len:
            key_mask = (jnp.ones((batch, text_len), bool) if attention_mask is None
                        else jnp.asarray(attention_mask).astype(bool))
            if prefix_len:
                key_mask = jnp.concatenate([jnp.ones((batch, prefix_len), bool), key_mask], 1)
            if causal:
                mask = make_mask(key_mask, causal=True, query_len=q_len + text_len,
                                 key_len=prefix_len + text_len,
                                 query_offset=prefix_len - q_len, prefix=prefix_len)
            else:
                mask = make_mask(key_mask)

        if image_embeds is not None:
            image_embeds = image_embeds.astype(dt)
        # Scanned groups take the first G*F layers' query cache and the first G cross-attention
        # layers' image K/V; the tail takes the rest.
        split = groups * freq
        kv_prefix = tail_prefix = None
        if query_cache is not None:
            kv_prefix = {n: query_cache[n][:split].reshape(groups, freq,
                                                           *query_cache[n].shape[1:])
                         for n in ("k", "v")}
            tail_prefix = {n: query_cache[n][split:] for n in ("k", "v")}
        scan_kv = tail_kv = None
        if image_kv is not None:
            scan_kv = {n: image_kv[n][:groups] for n in ("k", "v")}
            tail_kv = {n: image_kv[n][groups] for n in ("k", "v")} if tail else None
        settings = dict(config=cfg, query_len=q_len, deterministic=deterministic,
                        return_kv=return_query_cache, return_image_kv=return_image_kv)
        kv = None
        if groups:
            stack = scan_layers(QFormerGroup, groups,
                                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                                remat=cfg.remat_policy, name="layers", **settings)
            h, kv = stack(h, mask, image_embeds, kv_prefix, image_index, scan_kv)
            if return_query_cache:
                kv.update({n: kv[n].reshape(split, *kv[n].shape[2:]) for n in ("k", "v")})
        if tail:
            h, last = QFormerGroup(size=tail, name="tail", **settings)(
                h, mask, image_embeds, tail_prefix, image_index, tail_kv)
            kv = _join_tail(kv, last)
        return h, kv


def _join_tail(kv: Optional[dict], last: Optional[dict]) -> Optional[dict]:
    """The scanned groups' outputs (layers / cross-attention layers leading) followed by the
    tail's: its per-layer query K/V, its one cross-attention layer's image K/V."""
    if last is None:
        return kv
    last = {n: (x if n in ("k", "v") else x[None]) for n, x in last.items()}
    if kv is None:
        return last
    return {n: jnp.concatenate([kv[n], last[n]]) for n in kv}
