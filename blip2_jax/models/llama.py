"""LLaMA-family decoder-only language model (Vicuna, Llama 2 / 3: InstructBLIP's frozen LLM).

Reference matched: Hugging Face `transformers` `LlamaForCausalLM` (models/llama/modeling_llama.py
and modeling_rope_utils.py, transformers 5.x, eager attention): pre-norm blocks
x + o_proj(attn(RMSNorm(x))), x + down(silu(gate(h)) * up(h)); RMSNorm in fp32, cast back before
the weight multiply; rotary position embeddings in HF's rotate-half layout (dimension i pairs with
i + head_dim/2) on q and k, with `rope_theta` and the "linear" / "llama3" frequency scalings;
grouped-query attention (num_kv_heads divides num_heads; KV head j serves the query heads
j*G ... j*G + G - 1); no embedding scaling; a final RMSNorm; lm_head (no bias) or the token
embedding when tied. Optional q/k/v/o biases (`attention_bias`) and MLP biases (`mlp_bias`).

Positions: by default those HF `generate` gives (`cumsum(mask) - 1`, pads 0), so a left-padded
row is positioned as if unpadded; HF's plain `forward` uses `arange` instead, which `positions=`
reproduces.

Decoding uses an explicit functional KV cache {"k","v"} of shape
(L, B, S_max, num_kv_heads, head_dim) (`init_cache`); the rotated K and the V of the T input
positions are written at `cache_index`.

Proven by tests/test_llama.py: logits parity with HF (fp32, rel err <= 1e-5) over GQA with one,
some and all KV heads, no / linear / llama3 rope scaling, tied and untied heads, biases and
head_dim != hidden/heads, right- and left-padded; cached incremental decoding == full forward ==
HF with its cache; greedy and beam search through `blip2_jax.generate` token-identical to HF
`generate`; the rotary inverse frequencies bit-identical to HF's; remat; bf16.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax import nn as bnn
from blip2_jax.config import LlamaConfig


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies (head_dim/2,) float32, as HF computes them.

    `theta ** (arange(0, d, 2) / d)` is rounded once from float64 (torch's fp32 pow is within one
    ulp of that and bit-identical for the released theta/head_dim pairs); every later step is
    HF's fp32 arithmetic in HF's order, including torch's `scalar / tensor` =
    `tensor.reciprocal() * scalar`, so the scaled frequencies match HF's bit for bit.
    """
    f32 = np.float32
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(f32) / f32(d)
    power = (np.float64(f32(config.rope_theta)) ** exponent.astype(np.float64)).astype(f32)
    inv = f32(1.0) / power
    r = config.rope_scaling
    if r is None:
        return inv
    factor = f32(r.factor)
    if r.rope_type == "linear":
        return inv / factor
    # llama3 (modeling_rope_utils._compute_llama3_parameters)
    old = r.original_max_position_embeddings
    low_wavelen = f32(old / r.low_freq_factor)
    high_wavelen = f32(old / r.high_freq_factor)
    wavelen = (f32(1.0) / inv) * f32(2 * math.pi)
    inv_llama = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = ((f32(1.0) / wavelen) * f32(old) - f32(r.low_freq_factor)) / f32(
        r.high_freq_factor - r.low_freq_factor)
    smoothed = (f32(1.0) - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_llama).astype(f32)


def rotary_tables(positions, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, head_dim) float32 of integer `positions` (B, T) (HF
    `LlamaRotaryEmbedding.forward`: fp32 angles position * inv_freq, the halves repeated)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """Zero KV cache {"k", "v"}: (num_layers, batch, max_len, num_kv_heads, head_dim) each.

    dtype defaults to the compute dtype of `config`.
    """
    dtype = bnn.dtype_of(config.dtype if dtype is None else dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _rms_norm(config: LlamaConfig, name: Optional[str]) -> bnn.LayerNorm:
    return bnn.LayerNorm(epsilon=config.rms_norm_eps, rms=True, use_bias=False,
                         cast_before_scale=True, dtype=bnn.dtype_of(config.dtype),
                         param_dtype=bnn.dtype_of(config.param_dtype), name=name)


class LlamaBlock(nn.Module):
    """One LlamaDecoderLayer: RMSNorm → self-attention (rotary, GQA) → residual, RMSNorm →
    SwiGLU MLP → residual."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, carry, mask, rotary, cache_index):
        """carry: (x, every layer's cache or None, this layer's index or None)."""
        x, cache, layer = carry
        c = self.config
        dtype, pdtype = bnn.dtype_of(c.dtype), bnn.dtype_of(c.param_dtype)
        h = _rms_norm(c, "attn_ln")(x)
        h, new_cache = bnn.Attention(num_heads=c.num_heads, head_dim=c.head_dim,
                                     num_kv_heads=c.num_kv_heads, out_features=c.hidden_size,
                                     use_bias=c.attention_bias, dtype=dtype, param_dtype=pdtype,
                                     name="attn")(
            h, mask=mask, cache=cache, cache_index=cache_index, cache_layer=layer, rotary=rotary)
        x = x + h
        h = _rms_norm(c, "ffn_ln")(x)
        # fc1 = up_proj, gate = gate_proj, fc2 = down_proj: fc2(silu(gate(h)) * fc1(h))
        h = bnn.Mlp(hidden=c.intermediate_size, out_features=c.hidden_size, act=c.activation,
                    gated=True, use_bias=c.mlp_bias, dtype=dtype, param_dtype=pdtype,
                    name="mlp")(h)
        x = x + h
        return (x, new_cache, None if layer is None else layer + 1), None


class Llama(nn.Module):
    """HF `LlamaForCausalLM` over input embeddings; `embed` gives the token embeddings.

    Params: embed_tokens, layers {attn_ln, attn {query, key, value, out}, ffn_ln,
    mlp {fc1, gate, fc2}} stacked on a leading layer axis, final_ln, (lm_head when untied).
    """
    config: LlamaConfig

    def setup(self):
        c = self.config
        dtype, pdtype = bnn.dtype_of(c.dtype), bnn.dtype_of(c.param_dtype)
        self.embed_tokens = bnn.Embed(c.vocab_size, c.hidden_size, dtype=dtype,
                                      param_dtype=pdtype, axes=("vocab", "embed"))
        self.layers = bnn.scan_layers(LlamaBlock, c.num_layers,
                                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                                      remat=c.remat_policy, config=c)
        self.final_ln = _rms_norm(c, None)
        if not c.tie_word_embeddings:
            self.lm_head = bnn.Dense(c.vocab_size, ("embed", "vocab"), use_bias=False,
                                     dtype=dtype, param_dtype=pdtype)

    def embed(self, input_ids):
        """Token embeddings (B, T, hidden_size), compute dtype."""
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, *, cache: Optional[dict] = None,
                 cache_index: Any = 0, logits_from: int = 0, positions=None):
        """Logits (B, T - logits_from, vocab) in the compute dtype and the updated cache (None
        without one).

        attention_mask: (B, S) 1/0 over all key positions; S == T without a cache, S == the
        cache length with one (entries for positions not yet written are ignored).
        positions: (B, T) rotary positions of the inputs; default `cumsum(mask) - 1` over the
        key mask (pads 0) at the inputs' slots, as HF `generate` (HF `forward` without
        position_ids uses `cache_index + arange(T)`).
        logits_from (static): the head runs only on positions >= it.
        """
        c = self.config
        dtype = bnn.dtype_of(c.dtype)
        b, t, _ = inputs_embeds.shape
        s = t if cache is None else cache["k"].shape[2]
        key_mask = bnn.decoder_key_mask(attention_mask, b, s)
        if self.is_initializing() and not c.tie_word_embeddings:
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))   # create the input table too

        if positions is None:
            positions = (jnp.cumsum(key_mask, axis=1) - 1) * key_mask
            positions = jax.lax.dynamic_slice_in_dim(positions, cache_index, t, axis=1)
        elif positions.shape != (b, t):
            raise ValueError(f"positions shape {positions.shape} != {(b, t)} (batch, inputs)")
        rotary = rotary_tables(positions, rope_inv_freq(c))

        mask = bnn.attention_mask(key_mask, causal=True, query_len=t, key_len=s,
                                  query_offset=cache_index)
        # The cache rides in the scan's carry (written in place), not as a per-layer output.
        layer = None if cache is None else jnp.int32(0)
        (h, new_cache, _), _ = self.layers((inputs_embeds.astype(dtype), cache, layer), mask,
                                           rotary, cache_index)

        h = self.final_ln(h[:, logits_from:])
        if c.tie_word_embeddings:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(dtype), new_cache
