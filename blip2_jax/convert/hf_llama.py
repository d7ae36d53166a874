"""Conversion table: our `blip2_jax.models.llama.Llama` params <-> HF `LlamaForCausalLM` keys.

HF keys (under `{theirs}.`, e.g. "language_model." inside InstructBLIP, or no prefix with
theirs=""): model.embed_tokens, model.layers.{i}.{self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, model.norm, and
lm_head.weight (only when the head is untied; when tied HF may still store it as a duplicate,
see `tied_keys`). Old checkpoints may hold `...self_attn.rotary_emb.inv_freq` buffers, which we
recompute (see `ignorable`).
"""
from __future__ import annotations

from blip2_jax.config import LlamaConfig
from blip2_jax.convert.mapping import Rule, linear, norm


def _join(prefix: str, name: str, sep: str) -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def rules(cfg: LlamaConfig, ours: str = "llm", theirs: str = "language_model") -> list[Rule]:
    """Every leaf of our LLaMA subtree `ours` ("" = the LLaMA tree itself) with its HF key(s)."""
    o = lambda name: _join(ours, name, "/")                      # noqa: E731
    t = lambda name: _join(theirs, name, ".")                    # noqa: E731
    layers = range(cfg.num_layers)
    lay = t("model.layers.{i}")

    out = [Rule(o("embed_tokens/embedding"), t("model.embed_tokens.weight"))]
    for ours_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                               ("out", "o_proj")):
        out += linear(o(f"layers/attn/{ours_name}"), f"{lay}.self_attn.{hf_name}", layers,
                      cfg.attention_bias)
    for ours_name, hf_name in (("gate", "gate_proj"), ("fc1", "up_proj"), ("fc2", "down_proj")):
        out += linear(o(f"layers/mlp/{ours_name}"), f"{lay}.mlp.{hf_name}", layers, cfg.mlp_bias)
    out += norm(o("layers/attn_ln"), f"{lay}.input_layernorm", layers, bias=False)
    out += norm(o("layers/ffn_ln"), f"{lay}.post_attention_layernorm", layers, bias=False)
    out += norm(o("final_ln"), t("model.norm"), bias=False)
    if not cfg.tie_word_embeddings:
        out += linear(o("lm_head"), t("lm_head"), bias=False)
    return out


def tied_keys(cfg: LlamaConfig, theirs: str = "language_model") -> list[str]:
    """HF keys that may be stored but duplicate a tied weight (a reader may ignore them)."""
    return [_join(theirs, "lm_head.weight", ".")] if cfg.tie_word_embeddings else []


def ignorable(cfg: LlamaConfig, theirs: str = "language_model") -> list[str]:
    """Regexes of HF keys that may be present without being loaded: rotary `inv_freq` buffers
    (recomputed from the config) and tied duplicates."""
    prefix = _join(theirs, "", ".").replace(".", r"\.")
    return [prefix + r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
            prefix + r"model\.rotary_emb\.inv_freq"] + \
        [k.replace(".", r"\.") for k in tied_keys(cfg, theirs)]
