"""OPT decoder-only language model (the frozen LLM of BLIP-2 OPT checkpoints).

Reference matched: Hugging Face `transformers` `OPTForCausalLM` (models/opt/modeling_opt.py,
transformers 5.x, eager attention): learned positions from `cumsum(mask)*mask - 1` (+ offset 2,
so left padding works), optional project_in/project_out (word_embed_proj_dim != hidden_size),
pre-LN (do_layer_norm_before=True, with a final LayerNorm) or post-LN (OPT-350m, no final LN),
ReLU FFN, causal + padding mask, lm_head tied to the token embedding unless
tie_word_embeddings=False.

Decoding uses an explicit functional KV cache {"k","v"} of shape (L, B, S_max, heads, head_dim)
(`init_cache`); the K/V of the T input positions are written at `cache_index`.

Proven by tests/test_opt.py: logits parity with HF (fp32, rel err <= 1e-5) for right- and
left-padded batches over several configs; cached incremental decoding == full forward == HF with
past key/values; greedy decode token-identical to HF `generate`; remat; bf16; checkpoint round trip.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from blip2_jax import nn as bnn
from blip2_jax.config import OPTConfig

POSITION_OFFSET = 2   # HF OPTLearnedPositionalEmbedding.offset


def init_cache(config: OPTConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """Zero KV cache {"k", "v"}: (num_layers, batch, max_len, num_heads, head_dim) each.

    dtype defaults to the compute dtype of `config`.
    """
    dtype = bnn.dtype_of(config.dtype if dtype is None else dtype)
    shape = (config.num_layers, batch, max_len, config.num_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _layer_norm(config: OPTConfig, name: str) -> bnn.LayerNorm:
    affine = config.layer_norm_elementwise_affine
    return bnn.LayerNorm(epsilon=config.layer_norm_eps, use_scale=affine, use_bias=affine,
                         dtype=bnn.dtype_of(config.dtype),
                         param_dtype=bnn.dtype_of(config.param_dtype), name=name)


class OPTBlock(nn.Module):
    """One OPTDecoderLayer: self-attention then FFN, LayerNorm before (pre-LN) or after."""
    config: OPTConfig

    @nn.compact
    def __call__(self, carry, mask, cache_index):
        """carry: (x, every layer's cache or None, this layer's index or None)."""
        x, cache, layer = carry
        c = self.config
        dtype, pdtype = bnn.dtype_of(c.dtype), bnn.dtype_of(c.param_dtype)
        pre = c.do_layer_norm_before
        attn_ln = _layer_norm(c, "attn_ln")
        ffn_ln = _layer_norm(c, "ffn_ln")

        residual = x
        h = attn_ln(x) if pre else x
        h, new_cache = bnn.Attention(num_heads=c.num_heads, head_dim=c.head_dim,
                                     out_features=c.hidden_size, use_bias=c.enable_bias,
                                     dtype=dtype, param_dtype=pdtype, name="attn")(
            h, mask=mask, cache=cache, cache_index=cache_index, cache_layer=layer)
        x = residual + h
        if not pre:
            x = attn_ln(x)

        residual = x
        h = ffn_ln(x) if pre else x
        h = bnn.Mlp(hidden=c.ffn_dim, out_features=c.hidden_size, act=c.activation,
                    use_bias=c.enable_bias, dtype=dtype, param_dtype=pdtype, name="mlp")(h)
        x = residual + h
        if not pre:
            x = ffn_ln(x)
        return (x, new_cache, None if layer is None else layer + 1), None


class OPT(nn.Module):
    """HF `OPTForCausalLM` over input embeddings; `embed` gives the token embeddings.

    Params: embed_tokens, embed_positions, (project_in, project_out), layers {attn_ln,
    attn {query,key,value,out}, ffn_ln, mlp {fc1,fc2}} stacked on a leading layer axis,
    (final_ln), (lm_head when untied).
    """
    config: OPTConfig

    def setup(self):
        c = self.config
        dtype, pdtype = bnn.dtype_of(c.dtype), bnn.dtype_of(c.param_dtype)
        self.embed_tokens = bnn.Embed(c.vocab_size, c.word_embed_proj_dim, dtype=dtype,
                                      param_dtype=pdtype, axes=("vocab", "embed"))
        self.embed_positions = bnn.Embed(c.max_position_embeddings + POSITION_OFFSET,
                                         c.hidden_size, dtype=dtype, param_dtype=pdtype,
                                         axes=(None, "embed"))
        if c.word_embed_proj_dim != c.hidden_size:
            self.project_in = bnn.Dense(c.hidden_size, (None, "embed"), use_bias=False,
                                        dtype=dtype, param_dtype=pdtype)
            self.project_out = bnn.Dense(c.word_embed_proj_dim, ("embed", None), use_bias=False,
                                         dtype=dtype, param_dtype=pdtype)
        self.layers = bnn.scan_layers(OPTBlock, c.num_layers,
                                      in_axes=(nn.broadcast, nn.broadcast),
                                      remat=c.remat_policy, config=c)
        if c.do_layer_norm_before:
            self.final_ln = _layer_norm(c, None)
        if not c.tie_word_embeddings:
            self.lm_head = bnn.Dense(c.vocab_size, ("embed", "vocab"), use_bias=False,
                                     dtype=dtype, param_dtype=pdtype)

    @property
    def _has_proj(self) -> bool:
        return self.config.word_embed_proj_dim != self.config.hidden_size

    def embed(self, input_ids):
        """Token embeddings (B, T, word_embed_proj_dim), compute dtype; no positions."""
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, *, cache: Optional[dict] = None,
                 cache_index: Any = 0, logits_from: int = 0):
        """Logits (B, T - logits_from, vocab) in the compute dtype and the updated cache (None
        without one).

        attention_mask: (B, S) 1/0 over all key positions; S == T without a cache, S == the
        cache length with one (entries for positions not yet written are ignored).
        logits_from (static): the head runs only on positions >= it (BLIP-2 needs no logits at
        its query positions; decoding needs only the last one) — the vocab matmul is the largest.
        """
        c = self.config
        dtype = bnn.dtype_of(c.dtype)
        b, t, _ = inputs_embeds.shape
        s = t if cache is None else cache["k"].shape[2]
        key_mask = bnn.decoder_key_mask(attention_mask, b, s)
        if self.is_initializing() and not c.tie_word_embeddings:
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))   # create the input table too

        positions = jnp.cumsum(key_mask, axis=1) * key_mask - 1
        positions = jax.lax.dynamic_slice_in_dim(positions, cache_index, t, axis=1)

        h = inputs_embeds.astype(dtype)
        if self._has_proj:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + POSITION_OFFSET)

        mask = bnn.attention_mask(key_mask, causal=True, query_len=t, key_len=s,
                                  query_offset=cache_index)
        # The cache rides in the scan's carry (written in place), not as a per-layer output.
        layer = None if cache is None else jnp.int32(0)
        (h, new_cache, _), _ = self.layers((h, cache, layer), mask, cache_index)

        h = h[:, logits_from:]
        if c.do_layer_norm_before:
            h = self.final_ln(h)
        if self._has_proj:
            h = self.project_out(h)
        if c.tie_word_embeddings:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(dtype), new_cache
