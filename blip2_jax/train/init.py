"""Where a training run's parameters come from: every source named in `config.init`, and nothing
that should be loaded left silently random.

    config.init.checkpoint     a whole model (HF or native dir): every leaf it has
    config.init.stage1         a stage-1 model (e.g. a stage-1 run's `final/`): vision, ln_vision,
                               the Q-Former leaves the target model has, query_tokens
    config.init.qformer_bert   a BERT directory (bert-base-uncased layout) → the Q-Former
                               (`convert.bert_qformer`, LAVIS's from-scratch init)
    config.init.vision         a model dir whose image encoder (vision/ + ln_vision/) is taken
    config.init.llm            a model dir whose LLM (llm/) is taken, or a plain HF language-model
                               directory (`OPTForCausalLM`, `T5ForConditionalGeneration`
                               `save_pretrained`: facebook/opt-2.7b, google/flan-t5-xl)
    config.init.random         top-level names allowed to start from random init (the heads LAVIS
                               creates fresh, e.g. "vision_proj", "llm_proj", or "*" for a toy run)

Later sources override earlier ones in the order above. A ViT position table made for another
image size (a 224-px source for 364-px fine-tuning) is resized bicubically to the model's grid. Every parameter not loaded must be under a
name in `random`, or init fails listing them. `sources` records, per top-level name, where it came
from (the checkpoint writes it beside each frozen tower's content hash).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from blip2_jax import api
from blip2_jax.config import Blip2Config
from blip2_jax.convert.mapping import flatten, unflatten


class InitError(ValueError):
    pass


def _load_tree(path: str) -> tuple[Blip2Config, dict]:
    model = api.load(path, dtype=None)
    return model.config, flatten(jax.tree.map(np.asarray, model.params))


def _load_llm(path: str, cfg: Blip2Config) -> dict:
    """Flat params with the `llm/` subtree from a BLIP-2 model dir, or from a plain HF OPT/T5
    directory (its config must describe the model's LLM: same family, same shapes)."""
    import json
    import os
    import re
    from blip2_jax import config as config_lib
    from blip2_jax.convert import hf, hf_opt, hf_t5, mapping
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
    except (OSError, ValueError):
        hf_config = {}
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type not in ("opt", "t5"):
        return _load_tree(path)[1]
    if cfg.llm is None or cfg.llm_kind != model_type:
        raise InitError(f"config.init.llm {path} is an HF {model_type} model, but the model's "
                        f"LLM is {cfg.llm_kind}")
    theirs = config_lib.llm_from_hf(hf_config)
    reader = hf.SafetensorsReader(path)
    table = hf_opt if model_type == "opt" else hf_t5
    llm = cfg.llm
    if model_type == "t5":   # as hf.read: the checkpoint, not the flag, says whether it is tied
        untied = "lm_head.weight" in reader.keys() and not np.array_equal(
            reader.get("lm_head.weight"), reader.get("shared.weight"))
        theirs = dataclasses.replace(theirs, tie_word_embeddings=not untied)
    if theirs.tie_word_embeddings != llm.tie_word_embeddings:
        raise InitError(f"config.init.llm {path}: tie_word_embeddings is "
                        f"{theirs.tie_word_embeddings} there and {llm.tie_word_embeddings} in the "
                        "model's LLM config")
    ignore = list(hf.HF_BUFFERS) + [re.escape(k) for k in table.tied_keys(llm, theirs="")]
    try:
        params = mapping.load(table.rules(llm, ours="llm", theirs=""), reader.keys(), reader.get,
                              ignore=ignore, source=path)
    except mapping.MappingError as e:
        raise InitError(str(e)) from None
    return flatten(params)


def _fit_pos_embed(cfg: Blip2Config, table: np.ndarray) -> np.ndarray:
    """A ViT position table made for another image size, resized to this model's patch grid
    (bicubic, as LAVIS's `interpolate_pos_embed` when it fine-tunes at 364 / 490 px; CLS kept)."""
    from blip2_jax.models.vit import interpolate_pos_embed
    side = cfg.vision.image_size // cfg.vision.patch_size
    return np.asarray(interpolate_pos_embed(np.asarray(table, np.float32)[0], (side, side),
                                            align_corners=cfg.vision.variant == "clip"))[None]


def _take(flat: dict, loaded: dict, src: Mapping, prefixes: Sequence[str], source: str,
          *, all_leaves: bool, cfg: Optional[Blip2Config] = None) -> int:
    """Copy leaves under `prefixes` from `src`; fail on shape mismatches (and, when `all_leaves`,
    on target leaves under those prefixes the source lacks)."""
    n, problems = 0, []
    for path, leaf in flat.items():
        if not any(path == p or path.startswith(p + "/") for p in prefixes):
            continue
        if path not in src:
            if all_leaves:
                problems.append(f"{path}: missing from {source}")
            continue
        value = src[path]
        if path == "vision/pos_embed" and cfg is not None and value.shape != leaf.shape \
                and value.shape[-1] == leaf.shape[-1]:
            value = _fit_pos_embed(cfg, value)
        if tuple(value.shape) != tuple(leaf.shape):
            problems.append(f"{path}: {source} has shape {tuple(value.shape)}, the model "
                            f"needs {tuple(leaf.shape)}")
            continue
        flat[path] = np.asarray(value).astype(leaf.dtype)
        loaded[path] = source
        n += 1
    if problems:
        raise InitError(f"cannot initialise from {source}:\n  " + "\n  ".join(problems))
    if n == 0:
        raise InitError(f"{source} provides none of {list(prefixes)}")
    return n


def initial_params(cfg: Blip2Config, init: Mapping, seed: int = 0) -> tuple[dict, dict]:
    """(full parameter tree, {top-level name: source}) for the start of a run."""
    init = dict(init)
    known = {"checkpoint", "stage1", "qformer_bert", "vision", "llm", "random"}
    unknown = set(init) - known
    if unknown:
        raise KeyError(f"unknown config.init keys {sorted(unknown)} (known {sorted(known)})")
    flat = flatten(jax.tree.map(np.asarray, api.init_params(cfg, seed)))
    loaded: dict[str, str] = {}
    top = sorted({p.split("/")[0] for p in flat})

    if init.get("checkpoint"):
        _, src = _load_tree(init["checkpoint"])
        _take(flat, loaded, src, top, f"checkpoint {init['checkpoint']}", all_leaves=False,
              cfg=cfg)
    if init.get("stage1"):
        _, src = _load_tree(init["stage1"])
        _take(flat, loaded, src, ["vision", "ln_vision", "qformer", "query_tokens"],
              f"stage-1 model {init['stage1']}", all_leaves=False, cfg=cfg)
    if init.get("qformer_bert"):
        from blip2_jax.convert import bert_qformer
        params, report = bert_qformer.init_qformer_from_bert(
            cfg, init["qformer_bert"], jax.random.PRNGKey(seed + 1), params=unflatten(flat))
        fresh = {f for f in report.fresh if "[" not in f}     # "leaf[i]": one new row only
        new = flatten(jax.tree.map(np.asarray, params))
        for path in new:
            if path.startswith(("qformer/", "query_tokens", "lm_head/")):
                flat[path] = new[path]
                loaded[path] = (f"BERT init (fresh, as LAVIS) for {init['qformer_bert']}"
                                if path in fresh else f"bert {init['qformer_bert']}")
    if init.get("vision"):
        _, src = _load_tree(init["vision"])
        _take(flat, loaded, src, ["vision", "ln_vision"], f"vision from {init['vision']}",
              all_leaves=True, cfg=cfg)
    if init.get("llm"):
        src = _load_llm(init["llm"], cfg)
        _take(flat, loaded, src, ["llm"], f"llm from {init['llm']}", all_leaves=True)

    random = tuple(init.get("random") or ())
    allowed = lambda p: "*" in random or p.split("/")[0] in random        # noqa: E731
    missing = sorted(p for p in flat if p not in loaded and not allowed(p))
    if missing:
        groups = sorted({p.split("/")[0] for p in missing})
        raise InitError(
            f"no source for {len(missing)} parameters under {groups} (e.g. {missing[:3]}); name "
            "a source in config.init (checkpoint / stage1 / qformer_bert / vision / llm) or list "
            "the names that may start random in config.init.random")
    sources = {}
    for name in top:
        srcs = sorted({loaded.get(p, "random init") for p in flat if p.split("/")[0] == name})
        sources[name] = srcs[0] if len(srcs) == 1 else "; ".join(srcs)
    return unflatten(flat), sources
