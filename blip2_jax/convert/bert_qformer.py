"""A stage-1 Q-Former initialised from a BERT checkpoint, as LAVIS does it (training from scratch).

Matches LAVIS `Blip2Base.init_Qformer` + `Blip2Qformer.__init__` for a
BERT directory in the HF `bert-base-uncased` layout (`config.json` + `model.safetensors`,
safetensors shards, or `pytorch_model.bin` read by the safe reader):
  loaded   embeddings (word, position, LayerNorm), every layer's self-attention and text FFN
           (`intermediate`, `output`), and the ITG head `lm_head/` from BERT's MLM head
           (`cls.predictions.transform.{dense,LayerNorm}`, `cls.predictions.bias`) when present;
  copied   every query-FFN leaf (`intermediate_query`, `output_query`) from the same layer's text
           FFN (LAVIS copies each `*_query` parameter from its twin after loading);
  fresh    BERT init (`_init_weights`: normal(0, initializer_range) kernels, zero biases, LayerNorm
           ones/zeros): the cross-attention layers (every cross_attention_frequency-th), the
           `query_tokens` (normal, std initializer_range), the `[DEC]` row appended to the word
           embedding (id = BERT vocab size; HF `resize_token_embeddings` init), its zero entry
           appended to `lm_head/bias` (HF pads the tied decoder bias with 0), and the whole
           `lm_head/` when the checkpoint has no MLM head (plain `BertModel`) — reported;
  ignored  `token_type_embeddings` (LAVIS's BertEmbeddings has no token types, so the Q-Former's
           text path is BERT with token types left out), the pooler, the NSP head
           (`cls.seq_relationship`), the tied `cls.predictions.decoder.*` copies, `position_ids`
           buffers, and the MLM head when the config has no ITG head — all named in the report.
Source keys may carry the `bert.` prefix (BertForMaskedLM / BertLMHeadModel / BertForPreTraining)
or none (BertModel); the hub's bert-base-uncased file uses the legacy `LayerNorm.gamma/beta` names,
which are read as HF reads them. The BERT table is the HF Q-Former table (`hf_qformer.rules`) with
its keys renamed. Everything outside the Q-Former (vision, ln_vision, ITC/ITM heads, temp) is left
as given, or made by `models.blip2.init_fn` when no params are given.
Tests: tests/test_bert_init.py — text path == HF BertModel, MLM logits == HF BertForMaskedLM,
query FFN == text FFN, the [DEC] row, BertModel gives a fresh lm_head in the report, unknown /
missing keys, config-field and tensor-shape mismatches, legacy names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.config import Blip2Config, ConfigError, QFormerConfig
from blip2_jax.convert import hf, hf_qformer, mapping, sources
from blip2_jax.convert.mapping import MappingError, Rule
from blip2_jax.models import blip2 as blip2_model

# HF BertConfig defaults (a field absent from config.json takes these).
BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                     max_position_embeddings=512, layer_norm_eps=1e-12, initializer_range=0.02,
                     position_embedding_type="absolute")
# BERT config.json field -> our QFormerConfig field (vocab_size is checked apart: ours has [DEC]).
_FIELDS = (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
           ("num_attention_heads", "num_heads"), ("intermediate_size", "intermediate_size"),
           ("max_position_embeddings", "max_position_embeddings"),
           ("layer_norm_eps", "layer_norm_eps"), ("hidden_act", "activation"))
# Our leaves that hold one row per token: BERT's rows, then the fresh [DEC] row / entry.
GROWN = ("qformer/embeddings/word/embedding", "lm_head/bias")
MLM_HEAD = "cls.predictions."


@dataclasses.dataclass(frozen=True)
class BertInitReport:
    """What `init_qformer_from_bert` did to each Q-Former leaf (names are ours unless noted)."""
    source: str
    loaded: int                   # BERT tensors read
    copied: tuple[str, ...]       # query-FFN leaves, each a copy of its layer's text-FFN twin
    fresh: tuple[str, ...]        # freshly initialised leaves; "leaf[i]" = only row/entry i
    ignored: tuple[str, ...]      # checkpoint keys present and deliberately not loaded (theirs)

    def summary(self) -> str:
        return "\n".join([f"Q-Former from BERT {self.source}: {self.loaded} tensors loaded",
                          f"  copied from the text FFN ({len(self.copied)}): "
                          f"{', '.join(self.copied)}",
                          f"  freshly initialised ({len(self.fresh)}): {', '.join(self.fresh)}",
                          f"  ignored checkpoint keys ({len(self.ignored)}): "
                          f"{', '.join(self.ignored)}"])


def read_bert_config(path: str) -> dict:
    """The BERT `config.json` of directory `path`, HF defaults filled in."""
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {file}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if d.get("model_type") not in (None, "bert"):
        raise ConfigError(f"{file}: model_type is {d.get('model_type')!r}, expected 'bert'")
    return dict(BERT_DEFAULTS, **{k: v for k, v in d.items() if v is not None})


def check_bert_config(cfg: QFormerConfig, bert: dict, source: str = "BERT config") -> None:
    """Raise ConfigError naming every field where the BERT config and our Q-Former disagree."""
    bad = [f"{theirs}: BERT {bert[theirs]!r}, Q-Former {ours} {getattr(cfg, ours)!r}"
           for theirs, ours in _FIELDS if bert[theirs] != getattr(cfg, ours)]
    if bert["vocab_size"] + 1 != cfg.vocab_size:
        bad.append(f"vocab_size: BERT {bert['vocab_size']} + 1 ([DEC]) = {bert['vocab_size'] + 1}, "
                   f"Q-Former vocab_size {cfg.vocab_size}")
    if bert["position_embedding_type"] != "absolute":
        bad.append(f"position_embedding_type: BERT {bert['position_embedding_type']!r}, the "
                   "Q-Former has absolute position embeddings only")
    if bad:
        raise ConfigError(f"{source} does not fit the Q-Former config:\n  " + "\n  ".join(bad))


def _bert_key(hf_key: str, body: str, legacy_norm_names: bool) -> str:
    """HF Q-Former key (table built with no prefix) -> BERT key; `*_query` -> its text twin."""
    key = hf_key.replace(".attention.attention.", ".attention.self.").replace("_query.", ".")
    if key.startswith("layernorm."):
        key = "embeddings.LayerNorm." + key[len("layernorm."):]
    return _legacy(body + key, legacy_norm_names)


def _legacy(key: str, legacy_norm_names: bool) -> str:
    if legacy_norm_names:
        key = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", key)
        key = re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", key)
    return key


def rules(cfg: Blip2Config, body: str = "bert.", mlm_head: bool = True,
          legacy_norm_names: bool = False) -> tuple[list[Rule], list[str], list[str]]:
    """(load table, copied leaves, fresh leaves) for a BERT checkpoint.

    body: prefix of BERT's body keys ("bert." or ""); mlm_head: the checkpoint has
    `cls.predictions.*` (the ITG head `lm_head/` loads from it when `cfg.itg`, else it is fresh).
    Copied leaves are in the load table too, reading their text twin's key.
    """
    table, copied, fresh = [], [], []
    for r in hf_qformer.rules(cfg.qformer, ours="qformer", theirs="", embeddings="embeddings"):
        if ".crossattention." in r.theirs:
            fresh.append(r.ours)
            continue
        table.append(dataclasses.replace(r, theirs=_bert_key(r.theirs, body, legacy_norm_names)))
        if "_query." in r.theirs:
            copied.append(r.ours)
    fresh.append("query_tokens")
    if cfg.itg:
        head = hf_qformer.mlm_head_rules()
        if mlm_head:
            table += [dataclasses.replace(r, theirs=_legacy(r.theirs, legacy_norm_names))
                      for r in head]
        else:
            fresh += [r.ours for r in head]
    return table, copied, fresh


def ignorable(body: str, itg: bool) -> list[str]:
    """Regexes of BERT keys that may be present without being loaded."""
    b = re.escape(body)
    out = [b + r"embeddings\.token_type_embeddings\.weight", b + r"pooler\.dense\.(weight|bias)",
           r"cls\.seq_relationship\.(weight|bias)", r"cls\.predictions\.decoder\.(weight|bias)",
           *hf.HF_BUFFERS]
    if not itg:
        out.append(r"cls\.predictions\..*")
    return out


def _check_shapes(table: list[Rule], abstract: dict, reader, source: str) -> None:
    """MappingError naming every present source key whose shape is not what our leaf needs."""
    want = {}
    for r in table:
        shape = tuple(abstract[r.ours].shape)
        if r.layers is not None:
            shape = shape[1:]
        if r.ours in GROWN:
            shape = (shape[0] - 1,) + shape[1:]       # the checkpoint lacks the [DEC] row
        if r.kind == "linear":
            shape = shape[::-1]
        for k in r.source_keys():
            want[k] = shape
    keys = reader.keys()
    wrong = [f"{k}: checkpoint {tuple(reader.shape(k))}, model needs {want[k]}"
             for k in sorted(want) if k in keys and tuple(reader.shape(k)) != want[k]]
    mapping.check_names(f"{source} does not fit the Q-Former's shapes:",
                        [("wrong shape", wrong)])


def _fresh_leaf(name: str, shape, dtype, key, std: float) -> np.ndarray:
    """BERT `_init_weights` for one of our leaves, by its name."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("kernel", "embedding") or name == "query_tokens":
        return np.asarray(jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
    if leaf == "scale":
        return np.ones(shape, dtype)
    if leaf == "bias":
        return np.zeros(shape, dtype)
    raise MappingError(f"{name}: no BERT initialiser for this leaf")


def init_qformer_from_bert(cfg: Blip2Config, bert_dir: str, rng, params: Optional[dict] = None
                           ) -> tuple[dict, BertInitReport]:
    """(params, report): the BLIP-2 params of `cfg` with the Q-Former initialised from BERT.

    rng: a jax PRNG key or an int seed. params: a full param tree of `cfg` whose Q-Former leaves
    (`qformer/`, `query_tokens`, `lm_head/`) are replaced (the input is not modified); None makes
    the rest with `models.blip2.init_fn`. Raises ConfigError (config.json disagrees with `cfg.qformer`,
    naming each field) or MappingError (missing / unexpected keys, wrong shapes, naming each).
    """
    if not cfg.qformer.has_text_input:
        raise ConfigError("initialising from BERT needs qformer.has_text_input=True (the text "
                          "embeddings and text FFN are what BERT provides)")
    bert = read_bert_config(bert_dir)
    check_bert_config(cfg.qformer, bert, f"BERT config {os.path.join(bert_dir, 'config.json')}")
    reader = sources.hf_weights(bert_dir)      # safetensors, or pytorch_model.bin read safely
    keys = reader.keys()
    body = "bert." if any(k.startswith("bert.") for k in keys) else ""
    legacy = any(k.endswith(("LayerNorm.gamma", "LayerNorm.beta")) for k in keys)
    has_head = any(k.startswith(MLM_HEAD) and not k.startswith(MLM_HEAD + "decoder.")
                   for k in keys)
    table, copied, fresh = rules(cfg, body, has_head, legacy)
    abstract = mapping.flatten(blip2_model.abstract_params(cfg))
    if params is not None:
        mapping.check_params(cfg, params)
    _check_shapes(table, abstract, reader, bert_dir)
    new = mapping.flatten(mapping.load(table, keys, reader.get, ignore=ignorable(body, cfg.itg),
                                       source=bert_dir))
    new = {k: np.asarray(v, abstract[k].dtype) for k, v in new.items()}

    rng = jax.random.PRNGKey(rng) if isinstance(rng, (int, np.integer)) else rng
    init_key, fresh_key, row_key = jax.random.split(rng, 3)
    std = bert["initializer_range"]
    for name, key in zip(fresh, jax.random.split(fresh_key, len(fresh))):
        a = abstract[name]
        new[name] = _fresh_leaf(name, a.shape, a.dtype, key, std)
    fresh_rows = []
    for name, key in zip(GROWN, jax.random.split(row_key, len(GROWN))):
        if name not in new or name in fresh:
            continue
        a = abstract[name]
        row = _fresh_leaf(name, (1,) + tuple(a.shape[1:]), a.dtype, key, std)
        new[name] = np.concatenate([new[name], row])
        fresh_rows.append(f"{name}[{bert['vocab_size']}]")

    targets = {k for k in abstract if k.startswith(("qformer/", "lm_head/")) or k == "query_tokens"}
    mapping.check_names("BERT initialisation table does not cover the Q-Former:",
                        [("leaves left as they were", sorted(targets - set(new))),
                         ("leaves the model lacks", sorted(set(new) - targets))])

    if params is None:
        params = blip2_model.init_fn(cfg)(init_key)
    flat = dict(mapping.flatten(params))
    flat.update(new)
    needed = {k for r in table for k in r.source_keys()}
    report = BertInitReport(source=bert_dir, loaded=len(needed), copied=tuple(sorted(copied)),
                            fresh=tuple(sorted(fresh + fresh_rows)),
                            ignored=tuple(sorted(keys - needed)))
    return mapping.unflatten(flat), report
