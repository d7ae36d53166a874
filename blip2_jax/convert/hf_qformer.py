"""Conversion table: our `blip2_jax.models.qformer.QFormer` params <-> HF Q-Former state_dict keys.

HF keys: `{theirs}.layernorm.*`, `{theirs}.encoder.layer.{i}.` + `attention.attention.{query,key,
value}`, `attention.output.{dense,LayerNorm}`, `crossattention.*` (layers i % F == 0),
`intermediate_query.dense`, `output_query.{dense,LayerNorm}` and, with `has_text_input`,
`intermediate.dense`, `output.{dense,LayerNorm}` plus the text tables
`{embeddings}.{word,position}_embeddings.weight` (top-level `embeddings.` in HF retrieval models).
Our layers are scanned in groups of F = cross_attention_frequency: leaf `layers/layer_{j}/...`
stacks HF layers j, F + j, 2F + j, ... of the G = L // F whole groups; when F does not divide the
depth L, `tail/layer_{j}/...` is HF layer G*F + j (`models.qformer.layout`).
"""
from __future__ import annotations

from blip2_jax.config import QFormerConfig
from blip2_jax.convert.mapping import Rule, linear, norm
from blip2_jax.models.qformer import layout


def _join(prefix: str, name: str, sep: str) -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def _attention(ours: str, theirs: str, layers) -> list[Rule]:
    out = []
    for name in ("query", "key", "value"):
        out += linear(f"{ours}/{name}", f"{theirs}.attention.{name}", layers)
    out += linear(f"{ours}/out", f"{theirs}.output.dense", layers)
    return out


def rules(cfg: QFormerConfig, ours: str = "qformer", theirs: str = "qformer",
          embeddings: str = "embeddings", layernorm: str = "layernorm") -> list[Rule]:
    """Every leaf of our Q-Former subtree `ours` ("" = the tree itself) with its HF key(s).
    `embeddings` prefixes the text tables; `layernorm` (under `theirs`) is the embeddings LN:
    BLIP-2 `qformer.layernorm`, InstructBLIP `qformer.embeddings.layernorm` with the tables at
    `qformer.embeddings.*`."""
    freq = cfg.cross_attention_frequency
    groups, tail = layout(cfg)
    o = lambda name: _join(ours, name, "/")                      # noqa: E731
    t = lambda name: _join(theirs, name, ".")                    # noqa: E731
    out = norm(o("embeddings/ln"), t(layernorm))
    if cfg.has_text_input:
        out += [Rule(o("embeddings/word/embedding"),
                     _join(embeddings, "word_embeddings.weight", ".")),
                Rule(o("embeddings/position/embedding"),
                     _join(embeddings, "position_embeddings.weight", "."))]
    # Scanned layer_j stacks HF layers j, F + j, ... of the whole groups; tail/layer_j is HF
    # layer G*F + j alone.
    blocks = [(o(f"layers/layer_{j}"), j, t("encoder.layer.{i}"),
               tuple(range(j, groups * freq, freq))) for j in range(freq) if groups]
    blocks += [(o(f"tail/layer_{j}"), j, t(f"encoder.layer.{groups * freq + j}"), None)
               for j in range(tail)]
    for p, j, lay, layers in blocks:
        out += _attention(f"{p}/self_attn", f"{lay}.attention", layers)
        out += norm(f"{p}/self_ln", f"{lay}.attention.output.LayerNorm", layers)
        if j == 0:
            out += _attention(f"{p}/cross_attn", f"{lay}.crossattention", layers)
            out += norm(f"{p}/cross_ln", f"{lay}.crossattention.output.LayerNorm", layers)
        out += linear(f"{p}/query_ffn/fc1", f"{lay}.intermediate_query.dense", layers)
        out += linear(f"{p}/query_ffn/fc2", f"{lay}.output_query.dense", layers)
        out += norm(f"{p}/query_ffn_ln", f"{lay}.output_query.LayerNorm", layers)
        if cfg.has_text_input:
            out += linear(f"{p}/text_ffn/fc1", f"{lay}.intermediate.dense", layers)
            out += linear(f"{p}/text_ffn/fc2", f"{lay}.output.dense", layers)
            out += norm(f"{p}/text_ffn_ln", f"{lay}.output.LayerNorm", layers)
    return out


def mlm_head_rules(prefix: str = "") -> list[Rule]:
    """Our ITG head `lm_head/` <-> BERT's MLM head (`{prefix}cls.predictions.*`, LAVIS
    `Qformer.cls.predictions.*`); its decoder weight/bias are tied copies, not in the table."""
    return (linear("lm_head/transform", f"{prefix}cls.predictions.transform.dense")
            + norm("lm_head/ln", f"{prefix}cls.predictions.transform.LayerNorm")
            + [Rule("lm_head/bias", f"{prefix}cls.predictions.bias")])
