"""Where a training run's parameters come from: every source named in `config.init`, and nothing
that should be loaded left silently random.

    config.init.checkpoint     a whole model (HF or native dir, LAVIS .pth): every leaf it has
    config.init.stage1         a stage-1 model (e.g. a stage-1 run's `final/`): vision, ln_vision,
                               the Q-Former leaves the target model has, query_tokens
    config.init.qformer_text   a model with the Q-Former's text side (a stage-1 model): the
                               Q-Former leaves no earlier source gave. A stage-2 checkpoint has
                               no word/position tables or text FFN (LAVIS deletes them), which
                               a question-aware Q-Former (VQA fine-tuning) needs
    config.init.qformer_bert   a BERT directory (bert-base-uncased layout) → the Q-Former
                               (`convert.bert_qformer`, LAVIS's from-scratch init)
    config.init.vision         a model (dir or LAVIS .pth) whose image encoder (vision/ +
                               ln_vision/) is taken, or the encoder's own file (eva_vit_g.pth,
                               clip_vit_L.pth: vision/ only — list ln_vision in random, LAVIS
                               makes it fresh too)
    config.init.llm            a model dir whose LLM (llm/) is taken, or a plain HF language-model
                               directory (`OPTForCausalLM`, `T5ForConditionalGeneration`
                               `save_pretrained`: facebook/opt-2.7b, google/flan-t5-xl;
                               safetensors or pytorch_model.bin, read safely)
    config.init.random         top-level names allowed to start from random init (the heads LAVIS
                               creates fresh, e.g. "vision_proj", "llm_proj", or "*" for a toy run)

A source is explicit: a path config.init names that is not there (a placeholder such as the
paper configs' `/path/to/...`, or a run not trained yet) fails naming the key (`MissingSource`)
before anything loads. `describe(sources)` is the one line a run logs of what it started from.

Later sources override earlier ones in the order above. A ViT position table made for another
image size (a 224-px source for 364-px fine-tuning) is resized bicubically to the model's grid. Every parameter not loaded must be under a
name in `random`, or init fails listing them. `sources` records, per top-level name, where it came
from (the checkpoint writes it beside each frozen tower's content hash).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from blip2_jax.config import Blip2Config, ConfigError
from blip2_jax.convert import bert_qformer, sources, stream
from blip2_jax.convert.mapping import MappingError, flatten, unflatten
from blip2_jax.models import blip2 as blip2_model


class InitError(ValueError):
    pass


class MissingSource(InitError, FileNotFoundError):
    """A path config.init names that is not there."""


# What each path-valued source names (for the error when it is not there), in load order.
SOURCES = {
    "checkpoint": "a whole model (a run's final/, an HF or native directory, a LAVIS .pth)",
    "stage1": "the stage-1 model this run starts from (a stage-1 run's final/)",
    "qformer_text": "a model with the Q-Former's text side (a stage-1 run's final/)",
    "qformer_bert": "a bert-base-uncased directory",
    "vision": "a model or image-encoder file whose ViT is taken",
    "llm": "a model or HF language-model directory whose LLM is taken",
}


def check_sources(init: Mapping) -> None:
    """Every path config.init names is there (MissingSource naming the first that is not)."""
    for key, what in SOURCES.items():
        path = init.get(key)
        if path and not os.path.exists(os.fspath(path)):
            raise MissingSource(f"config.init.{key} = {path!r} does not exist: set "
                                f"--config.init.{key}=PATH, {what}")


def describe(sources: Mapping[str, str]) -> str:
    """`initial_params`' record as one line: each source with the top-level names it gave,
    e.g. "vision, qformer <- stage-1 model /runs/s1/final; llm_proj <- random init"."""
    by: dict[str, list[str]] = {}
    for name, source in sources.items():
        by.setdefault(source, []).append(name)
    return "; ".join(f"{', '.join(names)} <- {source}" for source, names in by.items())


def _part(path: str, cfg: Blip2Config, part: str) -> dict:
    try:
        return sources.open_part(path, cfg, part)
    except (ConfigError, MappingError) as e:
        raise InitError(f"config.init.{part} {path}: {e}") from None


def _model_leaves(path: str, cfg: Blip2Config) -> dict:
    """Lazy leaves of a whole checkpoint: its own config for ours / HF, the model's for LAVIS."""
    config = cfg if sources.detect(path) == "pth" else None
    return sources.open_model(path, config).leaves


def _take(flat: dict, loaded: dict, src: Mapping, prefixes: Sequence[str], source: str,
          *, all_leaves: bool, cfg: Optional[Blip2Config] = None) -> int:
    """Copy leaves under `prefixes` from `src` ({leaf: stream.Leaf}, read here); fail on shape
    mismatches (and, when `all_leaves`, on target leaves under those prefixes the source lacks)."""
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
            value = sources._fit_pos_embed(cfg, value)
        if tuple(value.shape) != tuple(leaf.shape):
            problems.append(f"{path}: {source} has shape {tuple(value.shape)}, the model "
                            f"needs {tuple(leaf.shape)}")
            continue
        array = np.asarray(value.value())
        stream.check_finite({path: (array, source)})
        flat[path] = array.astype(leaf.dtype)
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
    known = {"checkpoint", "stage1", "qformer_text", "qformer_bert", "vision", "llm", "random"}
    unknown = set(init) - known
    if unknown:
        raise KeyError(f"unknown config.init keys {sorted(unknown)} (known {sorted(known)})")
    check_sources(init)
    flat = flatten(jax.tree.map(np.asarray, blip2_model.init_params(cfg, seed)))
    loaded: dict[str, str] = {}
    top = sorted({p.split("/")[0] for p in flat})

    if init.get("checkpoint"):
        src = _model_leaves(init["checkpoint"], cfg)
        _take(flat, loaded, src, top, f"checkpoint {init['checkpoint']}", all_leaves=False,
              cfg=cfg)
    if init.get("stage1"):
        src = _model_leaves(init["stage1"], cfg)
        _take(flat, loaded, src, ["vision", "ln_vision", "qformer", "query_tokens"],
              f"stage-1 model {init['stage1']}", all_leaves=False, cfg=cfg)
    if init.get("qformer_text"):
        rest = [p for p in flat if p.startswith("qformer/") and p not in loaded]
        if rest:
            _take(flat, loaded, _model_leaves(init["qformer_text"], cfg), rest,
                  f"Q-Former text side from {init['qformer_text']}", all_leaves=True, cfg=cfg)
    if init.get("qformer_bert"):
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
        src = _part(init["vision"], cfg, "vision")
        # an image encoder's own file (eva_vit_g.pth) has no ln_vision: LAVIS makes it fresh
        prefixes = ["vision", "ln_vision"] if "ln_vision/scale" in src else ["vision"]
        _take(flat, loaded, src, prefixes, f"vision from {init['vision']}",
              all_leaves=True, cfg=cfg)
    if init.get("llm"):
        src = _part(init["llm"], cfg, "llm")
        _take(flat, loaded, src, ["llm"], f"llm from {init['llm']}", all_leaves=True)

    random = tuple(init.get("random") or ())
    allowed = lambda p: "*" in random or p.split("/")[0] in random        # noqa: E731
    missing = sorted(p for p in flat if p not in loaded and not allowed(p))
    if missing:
        groups = sorted({p.split("/")[0] for p in missing})
        raise InitError(
            f"no source for {len(missing)} parameters under {groups} (e.g. {missing[:3]}); name "
            "a source in config.init (checkpoint / stage1 / qformer_text / qformer_bert / vision "
            "/ llm) or list "
            "the names that may start random in config.init.random")
    sources = {}
    for name in top:
        srcs = sorted({loaded.get(p, "random init") for p in flat if p.split("/")[0] == name})
        sources[name] = srcs[0] if len(srcs) == 1 else "; ".join(srcs)
    return unflatten(flat), sources
