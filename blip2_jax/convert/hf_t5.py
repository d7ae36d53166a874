"""Conversion table: our `blip2_jax.models.t5.T5` params <-> HF `T5ForConditionalGeneration` keys.

HF keys (under `{theirs}.`, e.g. "language_model." inside Blip2ForConditionalGeneration, or no
prefix with theirs=""): shared.weight; {encoder,decoder}.block.{i}.layer.0.SelfAttention.{q,k,v,o}
(+ relative_attention_bias in block 0 only), layer.0.layer_norm; decoder layer.1.EncDecAttention
.{q,k,v,o} and layer.1.layer_norm; the FFN at layer.1 (encoder) / layer.2 (decoder):
DenseReluDense.{wi_0,wi_1,wo} (gated) or {wi,wo}, and its layer_norm; {encoder,decoder}
.final_layer_norm; lm_head.weight when untied. HF may also store encoder/decoder.embed_tokens
(and lm_head when tied) as duplicates of shared.weight: see `tied_keys`.
"""
from __future__ import annotations

from blip2_jax.config import T5Config
from blip2_jax.convert.mapping import Rule, linear, norm


def _join(prefix: str, name: str, sep: str) -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def _attn(ours: str, theirs: str, layers) -> list[Rule]:
    out = []
    for ours_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
        out += linear(f"{ours}/{ours_name}", f"{theirs}.{hf_name}", layers, bias=False)
    return out


def _stack(cfg: T5Config, ours: str, theirs: str, decoder: bool) -> list[Rule]:
    layers = range(cfg.num_decoder_layers if decoder else cfg.num_layers)
    blk = f"{theirs}.block.{{i}}.layer"
    ffn = 2 if decoder else 1
    out = [Rule(f"{ours}/rel_bias/embedding",
                f"{theirs}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")]
    out += norm(f"{ours}/layers/attn_ln", f"{blk}.0.layer_norm", layers, bias=False)
    out += _attn(f"{ours}/layers/attn", f"{blk}.0.SelfAttention", layers)
    if decoder:
        out += norm(f"{ours}/layers/cross_ln", f"{blk}.1.layer_norm", layers, bias=False)
        out += _attn(f"{ours}/layers/cross_attn", f"{blk}.1.EncDecAttention", layers)
    out += norm(f"{ours}/layers/ffn_ln", f"{blk}.{ffn}.layer_norm", layers, bias=False)
    mlp = f"{blk}.{ffn}.DenseReluDense"
    if cfg.gated:
        out += linear(f"{ours}/layers/mlp/gate", f"{mlp}.wi_0", layers, bias=False)
        out += linear(f"{ours}/layers/mlp/fc1", f"{mlp}.wi_1", layers, bias=False)
    else:
        out += linear(f"{ours}/layers/mlp/fc1", f"{mlp}.wi", layers, bias=False)
    out += linear(f"{ours}/layers/mlp/fc2", f"{mlp}.wo", layers, bias=False)
    out += norm(f"{ours}/final_ln", f"{theirs}.final_layer_norm", bias=False)
    return out


def rules(cfg: T5Config, ours: str = "llm", theirs: str = "language_model") -> list[Rule]:
    """Every leaf of our T5 subtree `ours` ("" = the T5 tree itself) with its HF key(s)."""
    o = lambda name: _join(ours, name, "/")                      # noqa: E731
    t = lambda name: _join(theirs, name, ".")                    # noqa: E731
    out = [Rule(o("shared/embedding"), t("shared.weight"))]
    out += _stack(cfg, o("encoder"), t("encoder"), decoder=False)
    out += _stack(cfg, o("decoder"), t("decoder"), decoder=True)
    if not cfg.tie_word_embeddings:
        out += linear(o("lm_head"), t("lm_head"), bias=False)
    return out


def tied_keys(cfg: T5Config, theirs: str = "language_model") -> list[str]:
    """HF keys that may be stored but duplicate the shared embedding (a reader may ignore them)."""
    keys = [_join(theirs, "encoder.embed_tokens.weight", "."),
            _join(theirs, "decoder.embed_tokens.weight", ".")]
    if cfg.tie_word_embeddings:
        keys.append(_join(theirs, "lm_head.weight", "."))
    return keys
