"""Conversion table: our `blip2_jax.models.opt.OPT` params <-> HF `OPTForCausalLM` state_dict keys.

HF keys (under `{theirs}.`, e.g. "language_model." inside Blip2ForConditionalGeneration, or no
prefix with theirs=""): model.decoder.{embed_tokens, embed_positions, project_in, project_out,
layers.{i}.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm},
final_layer_norm}, and lm_head.weight (only when the head is untied; when tied HF may still store
it as a duplicate, see `tied_keys`).
"""
from __future__ import annotations

from blip2_jax.config import OPTConfig
from blip2_jax.convert.mapping import Rule, linear, norm


def _join(prefix: str, name: str, sep: str) -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def rules(cfg: OPTConfig, ours: str = "llm", theirs: str = "language_model") -> list[Rule]:
    """Every leaf of our OPT subtree `ours` ("" = the OPT tree itself) with its HF key(s)."""
    o = lambda name: _join(ours, name, "/")                      # noqa: E731
    t = lambda name: _join(theirs, name, ".")                    # noqa: E731
    dec = t("model.decoder")
    layers = range(cfg.num_layers)
    lay = f"{dec}.layers.{{i}}"
    bias = cfg.enable_bias
    affine = cfg.layer_norm_elementwise_affine

    out = [Rule(o("embed_tokens/embedding"), f"{dec}.embed_tokens.weight"),
           Rule(o("embed_positions/embedding"), f"{dec}.embed_positions.weight")]
    if cfg.word_embed_proj_dim != cfg.hidden_size:
        out += linear(o("project_in"), f"{dec}.project_in", bias=False)
        out += linear(o("project_out"), f"{dec}.project_out", bias=False)
    for ours_name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                               ("out", "out_proj")):
        out += linear(o(f"layers/attn/{ours_name}"), f"{lay}.self_attn.{hf_name}", layers, bias)
    out += linear(o("layers/mlp/fc1"), f"{lay}.fc1", layers, bias)
    out += linear(o("layers/mlp/fc2"), f"{lay}.fc2", layers, bias)
    if affine:
        out += norm(o("layers/attn_ln"), f"{lay}.self_attn_layer_norm", layers)
        out += norm(o("layers/ffn_ln"), f"{lay}.final_layer_norm", layers)
        if cfg.do_layer_norm_before:
            out += norm(o("final_ln"), f"{dec}.final_layer_norm")
    if not cfg.tie_word_embeddings:
        out += linear(o("lm_head"), t("lm_head"), bias=False)
    return out


def tied_keys(cfg: OPTConfig, theirs: str = "language_model") -> list[str]:
    """HF keys that may be stored but duplicate a tied weight (a reader may ignore them)."""
    return [_join(theirs, "lm_head.weight", ".")] if cfg.tie_word_embeddings else []
