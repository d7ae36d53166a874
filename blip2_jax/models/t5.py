"""T5 / FlanT5 encoder-decoder (the frozen LLM of BLIP-2 FlanT5 checkpoints).

Reference matched: Hugging Face `transformers` 5.x `T5ForConditionalGeneration`
(models/t5/modeling_t5.py, eager attention).
  * shared token embedding (no scaling) for encoder and decoder inputs;
  * pre-RMSNorm blocks (fp32 variance, eps `layer_norm_eps`, no bias), attention without bias and
    without 1/sqrt(d) scaling; a relative position bias from the first block's bucket table is
    shared by every layer of its stack (bidirectional buckets in the encoder, unidirectional in the
    decoder self-attention, none in cross-attention);
  * FFN: gated `act(wi_0 x) * wi_1 x -> wo` (T5 v1.1 / FlanT5; act "gelu" = exact erf for
    BLIP-2's FlanT5, "gelu_new" = tanh for stock FlanT5) or `act(wi x) -> wo` (original T5, relu);
  * final RMSNorm per stack; LM head: untied `lm_head` (tie_word_embeddings=False, T5 v1.1) or the
    shared embedding with the decoder output scaled by d_model**-0.5 (tied, original T5). In HF v5
    this is `config.scale_decoder_outputs` (= the `tie_word_embeddings` value given to the HF
    config; HF v5 then always sets `tie_word_embeddings=True` and unties `lm_head` only when a
    checkpoint stores a different one). Our config keeps both: `tie_word_embeddings` (is the head the
    shared table) and `scale_decoder_outputs` (None: follow the tie, the 4.x rule).
  * HF clamps fp16 hidden states to +-(finfo.max - 1000) after each sub-layer; that only matters
    for float16 overflow and is not replicated (fp32 / bf16 are unaffected).

Relative buckets are computed exactly as HF (float32 log, truncation) through a static numpy
table over |relative position| in [0, max_distance], so the bias is identical on every backend and
works with a traced `cache_index`.

Decoding cache (`init_cache`): {"self": {"k","v"}: (L, B, T_max, heads, d_kv) zeros,
"cross": {"k","v"}: (L, B, S, heads, d_kv) the projected encoder output}. `decode` writes the new
self K/V at `cache_index` (queries at absolute positions cache_index + t) and reuses the cross K/V.

Proven by tests/test_t5.py: encoder output and decoder logits parity with HF (fp32 rel err <=
1e-5) over gated-gelu / gated-gelu_new / relu, tied / untied heads, unequal layer counts, padded
encoder and decoder batches; bucket function == HF; cached incremental decoding == full decode ==
HF with past key/values; greedy decoding token-identical to HF `generate`; remat "full"; bf16;
conversion-table round trip.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import nn as bnn
from blip2_jax.config import T5Config


# ----------------------------------------------------------------------------------------------
# Relative position buckets
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _magnitude_table(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of |relative position| n for n in [0, max_distance] (HF's float32 formula).

    `num_buckets` is the count for one direction (already halved when bidirectional). Every
    n >= max_distance lands in the last bucket, so the table covers all distances.
    """
    n = np.arange(max_distance + 1, dtype=np.int64)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        large = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact))
                 * np.float32(num_buckets - max_exact))
    large = max_exact + large.astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return np.where(n < max_exact, n, large).astype(np.int32)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """HF `T5Attention._relative_position_bucket` (relative_position = key_pos - query_pos)."""
    rel = jnp.asarray(relative_position, jnp.int32)
    base = 0
    if bidirectional:
        num_buckets //= 2
        base = (rel > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(rel)
    else:
        n = -jnp.minimum(rel, 0)
    table = jnp.asarray(_magnitude_table(num_buckets, max_distance))
    return base + table[jnp.minimum(n, max_distance)]


# ----------------------------------------------------------------------------------------------
# Blocks and stacks
# ----------------------------------------------------------------------------------------------
def _dtypes(c: T5Config):
    return bnn.dtype_of(c.dtype), bnn.dtype_of(c.param_dtype)


def _rms_norm(c: T5Config, name: Optional[str] = None) -> bnn.LayerNorm:
    dt, pdt = _dtypes(c)
    return bnn.LayerNorm(epsilon=c.layer_norm_eps, rms=True, dtype=dt, param_dtype=pdt,
                         name=name)


def _attention(c: T5Config, name: Optional[str] = None, **kw) -> bnn.Attention:
    dt, pdt = _dtypes(c)
    return bnn.Attention(num_heads=c.num_heads, head_dim=c.d_kv, out_features=c.d_model,
                         use_bias=False, scale=1.0, dtype=dt, param_dtype=pdt, name=name, **kw)


class T5Block(nn.Module):
    """One HF T5Block: [RMSNorm → self-attn] (+ [RMSNorm → cross-attn]) + [RMSNorm → FFN]."""
    config: T5Config
    decoder: bool = False

    @nn.compact
    def __call__(self, carry, mask, bias, enc=None, enc_mask=None, cross_kv=None, cache_index=0):
        """carry: (h, every layer's self-attention cache or None, this layer's index or None)."""
        h, cache, layer = carry
        c = self.config
        dt, pdt = _dtypes(c)
        y, new_cache = _attention(c, "attn")(_rms_norm(c, "attn_ln")(h), mask=mask, bias=bias,
                                             cache=cache, cache_index=cache_index,
                                             cache_layer=layer)
        h = h + y
        if self.decoder:
            kv = None if cross_kv is None else (cross_kv["k"], cross_kv["v"])
            x = _rms_norm(c, "cross_ln")(h)
            # Beam search: a row's beams share its encoder K/V (B rows for B * beams queries),
            # attended as extra query positions instead of K/V repeated per beam.
            group = 1 if kv is None else h.shape[0] // kv[0].shape[0]
            x = x.reshape(h.shape[0] // group, group * h.shape[1], h.shape[2])
            y, _ = _attention(c, "cross_attn")(x, enc, kv=kv, mask=enc_mask)
            h = h + y.reshape(h.shape)
        y = bnn.Mlp(hidden=c.d_ff, out_features=c.d_model, act=c.activation, gated=c.gated,
                    use_bias=False, dtype=dt, param_dtype=pdt, name="mlp")(
            _rms_norm(c, "ffn_ln")(h))
        return (h + y, new_cache, None if layer is None else layer + 1), None


class T5Stack(nn.Module):
    """HF T5Stack over input embeddings: rel_bias, scanned `layers`, final_ln."""
    config: T5Config
    decoder: bool = False

    def setup(self):
        c = self.config
        dt, pdt = _dtypes(c)
        self.rel_bias = bnn.Embed(c.relative_attention_num_buckets, c.num_heads, dtype=dt,
                                  param_dtype=pdt, axes=(None, None))
        n = c.num_decoder_layers if self.decoder else c.num_layers
        in_axes = ((nn.broadcast,) * 4 + (0, nn.broadcast)) if self.decoder else \
            (nn.broadcast, nn.broadcast)
        self.layers = bnn.scan_layers(T5Block, n, in_axes=in_axes, remat=c.remat_policy,
                                      config=c, decoder=self.decoder)
        self.final_ln = _rms_norm(c)

    def position_bias(self, query_len: int, key_len: int, query_offset: Any = 0):
        """(1, heads, T, S) bias for queries at query_offset + t and keys at 0..S-1."""
        c = self.config
        q = jnp.arange(query_len, dtype=jnp.int32)[:, None] + query_offset
        k = jnp.arange(key_len, dtype=jnp.int32)[None, :]
        buckets = relative_position_bucket(k - q, bidirectional=not self.decoder,
                                           num_buckets=c.relative_attention_num_buckets,
                                           max_distance=c.relative_attention_max_distance)
        return jnp.transpose(self.rel_bias(buckets), (2, 0, 1))[None]

    def __call__(self, h, mask, enc=None, enc_mask=None, cross_kv=None, cache=None,
                 cache_index: Any = 0, *, query_offset: Any = 0, key_len: Optional[int] = None):
        """(final hidden, updated self-attention cache or None). The cache rides in the layer
        scan's carry (written in place), not as a per-layer output."""
        t = h.shape[1]
        bias = self.position_bias(t, t if key_len is None else key_len, query_offset)
        carry = (h, cache, None if cache is None else jnp.int32(0))
        if self.decoder:
            (h, cache, _), _ = self.layers(carry, mask, bias, enc, enc_mask, cross_kv,
                                           cache_index)
        else:
            (h, cache, _), _ = self.layers(carry, mask, bias)
        return self.final_ln(h), cache

    def cross_kv(self, enc) -> dict:
        """Cross-attention K/V of every layer: {"k","v"} (L, B, S, heads, d_kv)."""
        stacked = nn.unbox(self.layers.variables["params"]["cross_attn"])
        attn = _attention(self.config, parent=None)     # unbound: applied to each layer's params

        def project(p):
            return attn.apply({"params": p}, enc, method=bnn.Attention.project_kv)

        k, v = jax.vmap(project)(stacked)
        return {"k": k, "v": v}


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class T5(nn.Module):
    """HF `T5ForConditionalGeneration`; `encode` takes input embeddings (BLIP-2 prepends queries).

    Params: shared {embedding}, encoder {rel_bias, layers {attn_ln, attn {query,key,value,out},
    ffn_ln, mlp {fc1, (gate), fc2}}, final_ln}, decoder {rel_bias, layers {attn_ln, attn,
    cross_ln, cross_attn, ffn_ln, mlp}, final_ln}, (lm_head when untied). Layers are stacked on a
    leading axis. mlp: gate = wi_0 (through the activation), fc1 = wi_1 (or wi), fc2 = wo.
    """
    config: T5Config

    def setup(self):
        c = self.config
        dt, pdt = _dtypes(c)
        self.shared = bnn.Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=pdt)
        self.encoder = T5Stack(c, decoder=False)
        self.decoder = T5Stack(c, decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = bnn.Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dt,
                                     param_dtype=pdt)

    def embed(self, input_ids):
        """Shared token embeddings (B, T, d_model) in the compute dtype."""
        return self.shared(input_ids)

    def encode(self, inputs_embeds, attention_mask=None):
        """Encoder output (B, S, d_model); attention_mask (B, S) 1/0 (None = all valid)."""
        dt, _ = _dtypes(self.config)
        mask = None if attention_mask is None else bnn.attention_mask(attention_mask)
        h, _ = self.encoder(inputs_embeds.astype(dt), mask)
        return h

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask=None, *,
               decoder_attention_mask=None, cache: Optional[dict] = None, cache_index: Any = 0):
        """Logits (B, T, vocab) in the compute dtype, and the updated cache (None without one).

        encoder_mask: (B, S) 1/0 over the encoder positions. decoder_attention_mask: (B, K) 1/0
        over the decoder key positions, K = T without a cache, T_max with one (None = all valid;
        causality is always applied). With `cache` (from `init_cache`), `encoder_hidden` is not
        used (the cross K/V come from the cache; it may be None) and the T new tokens sit at
        absolute positions cache_index .. cache_index + T - 1.
        """
        c = self.config
        dt, _ = _dtypes(c)
        t = decoder_input_ids.shape[1]
        if self.is_initializing() and cache is not None:
            raise ValueError("initialise T5 without a cache")
        h = self.embed(decoder_input_ids)
        if cache is None:
            key_len, self_cache, cross_kv, enc = t, None, None, encoder_hidden.astype(dt)
        else:
            key_len = cache["self"]["k"].shape[2]
            self_cache, cross_kv, enc = cache["self"], cache["cross"], None
        if decoder_attention_mask is not None and decoder_attention_mask.shape[1] != key_len:
            raise ValueError(f"decoder_attention_mask has {decoder_attention_mask.shape[1]} "
                             f"positions, expected {key_len} (T without a cache, T_max with one)")
        cache_index = jnp.asarray(cache_index, jnp.int32)
        mask = bnn.attention_mask(decoder_attention_mask, causal=True, query_len=t,
                                  key_len=key_len, query_offset=cache_index)
        enc_mask = None if encoder_mask is None else bnn.attention_mask(encoder_mask)
        h, new_self = self.decoder(h, mask, enc, enc_mask, cross_kv, self_cache, cache_index,
                                   query_offset=cache_index, key_len=key_len)
        if c.scales_decoder_output:
            h = h * jnp.asarray(c.d_model ** -0.5, h.dtype)
        logits = self.shared.attend(h) if c.tie_word_embeddings else self.lm_head(h)
        new_cache = None if cache is None else {"self": new_self, "cross": cache["cross"]}
        return logits.astype(dt), new_cache

    def init_cache(self, encoder_hidden, max_len: int) -> dict:
        """Decoding cache for `max_len` decoder positions over this encoder output.

        {"self": {"k","v"}: (L, B, max_len, heads, d_kv) zeros in the compute dtype,
         "cross": {"k","v"}: (L, B, S, heads, d_kv) the cross-attention K/V of every layer}.
        """
        c = self.config
        dt, _ = _dtypes(c)
        b = encoder_hidden.shape[0]
        if self.is_initializing():   # create the parameters the cross K/V are read from
            self.decode(jnp.zeros((b, 1), jnp.int32), encoder_hidden)
        shape = (c.num_decoder_layers, b, max_len, c.num_heads, c.d_kv)
        return {"self": {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)},
                "cross": self.decoder.cross_kv(encoder_hidden.astype(dt))}

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
        """Full forward from token ids (used by `init`): decoder logits (B, T, vocab)."""
        enc = self.encode(self.embed(input_ids), attention_mask)
        logits, _ = self.decode(decoder_input_ids, enc, attention_mask,
                                decoder_attention_mask=decoder_attention_mask)
        return logits
