"""Any checkpoint we read, as lazy leaves of our tree; several assembled into one model.

    open_model(path)           a whole BLIP-2 / InstructBLIP checkpoint: ours (native), HF, or
                               LAVIS `.pth` (which LAVIS model: `lavis.detect_model`; a
                               trainable-only LAVIS file gives only the leaves it holds)
    open_part(path, cfg, part) one tower: "vision" from a BLIP-2 checkpoint or an image encoder's
                               own file (eva_vit_g.pth, clip_vit_L.pth); "llm" from a BLIP-2
                               checkpoint or an HF OPT / T5 directory (safetensors or .bin)
    assemble(cfg, layers)      later layers override earlier ones; every shape checked against
                               the model; a missing tower is named with the source it needs
    convert(...)               `python -m blip2_jax.convert`, streamed tensor by tensor
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from blip2_jax import config as config_lib
from blip2_jax.config import Blip2Config, ConfigError
from blip2_jax.convert import hf, hf_llama, lavis, native, pth, stream
from blip2_jax.convert.mapping import MappingError, check_names, flatten
from blip2_jax.convert.stream import CheckpointError, Leaf
from blip2_jax.models import blip2 as blip2_model
from blip2_jax.models.vit import interpolate_pos_embed

FORMATS = ("native", "hf", "lavis")
PARTS = {"vision": ("vision",), "llm": ("llm",)}
HINTS = {"vision": "--vision / vision= (eva_vit_g.pth, clip_vit_L.pth, or a BLIP-2 checkpoint)",
         "llm": "--llm / llm= (an HF OPT or FlanT5 directory, or a BLIP-2 checkpoint)"}
OPT_NEWLINE = 50118      # LAVIS's OPT end of text: "\n"


@dataclasses.dataclass
class Loaded:
    kind: str                       # "native" | "hf" | "lavis"
    cfg: Blip2Config
    leaves: dict[str, Leaf]
    explicit_config: bool = False   # the config came from the caller, not the checkpoint
    lavis_model: Optional[str] = None   # kind "lavis": the LAVIS model its keys are of


def _hf_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {file}: {e}") from None


def detect(path: str) -> str:
    """"native", "hf", "hf-llm" (an HF OPT/T5/LLaMA directory) or "pth" (a torch file)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if native.is_native(path):
            return "native"
        if os.path.isfile(os.path.join(path, "config.json")):
            return ("hf-llm" if _hf_config(path).get("model_type") in hf.LLM_TABLES
                    else "hf")
        raise ConfigError(f"{path} has neither {native.CONFIG_FILE} (blip2-jax) nor config.json "
                          "(Hugging Face)")
    if os.path.isfile(path):
        return "pth"
    raise FileNotFoundError(f"checkpoint {path} does not exist")


def resolve_config(config) -> Optional[Blip2Config]:
    """A Blip2Config from a preset name, a config.json / blip2_jax.json (or their directory)."""
    if config is None or isinstance(config, Blip2Config):
        return config
    config = os.fspath(config)
    if config in config_lib.PRESETS:
        return config_lib.get_preset(config)
    if os.path.isdir(config):
        return (native.read_config(config) if native.is_native(config)
                else config_lib.read_hf_config(config))
    if os.path.isfile(config):
        with open(config) as f:
            try:
                d = json.load(f)
            except ValueError as e:
                raise ConfigError(f"{config} is not valid JSON: {e}") from None
        return (Blip2Config.from_dict(d["config"]) if d.get("format") == native.FORMAT
                else config_lib.from_hf_dict(d))
    raise ConfigError(f"config {config!r} is neither a preset ({sorted(config_lib.PRESETS)}) "
                      "nor a config file or directory")


def open_model(path: str, config=None) -> Loaded:
    """A whole BLIP-2 checkpoint's leaves. `config` (preset, file, Blip2Config) overrides what the
    checkpoint says; LAVIS files have none unless we wrote them, and are otherwise inferred from
    their shapes; either way a LAVIS file computes with LAVIS's ln_vision eps."""
    path = os.fspath(path)
    cfg = resolve_config(config)
    kind = detect(path)
    if kind == "native":
        saved, leaves = native.leaves(path)
        return Loaded("native", cfg or saved, leaves, cfg is not None)
    if kind == "hf":
        cfg2, leaves = hf.leaves(path, cfg)
        return Loaded("hf", cfg2, leaves, cfg is not None)
    if kind == "hf-llm":
        raise ConfigError(f"{path} is a plain HF language model; give it as the LLM source "
                          "(--llm / llm=) of a BLIP-2 model")
    source, saved = lavis.open_pth(path)
    model = lavis.detect_model(source)       # fails naming the keys of an unknown variant
    if model is None:
        raise ConfigError(f"{path} holds no BLIP-2 model (no Qformer / query_tokens / "
                          "ln_vision): an image encoder's file goes in --vision / vision=")
    # LAVIS numerics (ln_vision eps) for LAVIS's files; the config we stored in ours as it was
    cfg2 = (saved if cfg is None and saved is not None
            else lavis.lavis_numerics(cfg or lavis.infer_config(source)))
    return Loaded("lavis", cfg2, lavis.leaves(source, cfg2), cfg is not None, model)


def hf_weights(path: str) -> stream.KeySource:
    """An HF directory's tensors: safetensors (single/sharded) or pytorch_model.bin (read safely)."""
    try:
        return stream.SafetensorsReader(path)
    except CheckpointError:
        pass
    single = os.path.join(path, "pytorch_model.bin")
    index = single + ".index.json"
    if os.path.isfile(single):
        return stream.LazySource(pth.state_dict(single), single)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = {}
        for name in sorted(set(weight_map.values())):
            tensors.update(pth.state_dict(os.path.join(path, name)))
        return stream.LazySource(tensors, path)
    raise CheckpointError(f"no model.safetensors(.index.json) or pytorch_model.bin(.index.json) "
                          f"in {path}; directory holds {sorted(os.listdir(path))}")


def llm_config(path: str, kind: str) -> config_lib.LLMConfig:
    """The LLM config of an HF OPT/T5/LLaMA directory, as LAVIS runs it (OPT ends text at
    "\\n"; FlanT5's gated FFN uses exact GELU; blip2_vicuna_instruct adds a "[PAD]" token —
    one more vocabulary row, see `_llm_dir_leaves` — and uses "</s>" as BOS and EOS)."""
    llm = config_lib.llm_from_hf(_hf_config(path))
    if kind == "opt":
        return dataclasses.replace(llm, eos_token_id=OPT_NEWLINE)
    if kind == "llama":
        eos = llm.eos_token_ids[0] if llm.eos_token_ids else 2
        return dataclasses.replace(llm, vocab_size=llm.vocab_size + 1, bos_token_id=eos,
                                   eos_token_id=eos, pad_token_id=llm.vocab_size)
    return dataclasses.replace(llm, activation="gelu")


# Our leaves with one row per vocabulary entry (LLaMA), and the axis of that row.
_VOCAB_AXES = {"llm/embed_tokens/embedding": 0, "llm/lm_head/kernel": 1}


def _with_pad_row(leaf: Leaf, axis: int) -> Leaf:
    """`leaf` with one zero vocabulary row appended (LAVIS's "[PAD]", added to Vicuna by
    `resize_token_embeddings`: LAVIS draws it at random when it builds the model; it is the
    padding token's embedding, and its logit is 0 here)."""
    shape = list(leaf.shape)
    shape[axis] += 1

    def read(j):
        a = np.asarray(leaf.value())
        out = np.concatenate([a, np.zeros_like(np.take(a, [0], axis=axis))], axis=axis)
        return out if j is None else out[j]
    return Leaf(tuple(shape), leaf.dtype, read, origin=leaf.origin + " (+ a zero [PAD] row)")


def _llm_dir_leaves(path: str, cfg: Blip2Config) -> dict[str, Leaf]:
    hf_config = _hf_config(path)
    model_type = hf_config.get("model_type")
    if cfg.llm is None or cfg.llm_kind != model_type:
        raise ConfigError(f"{path} is an HF {model_type} model, but the model's LLM is "
                          f"{cfg.llm_kind}")
    theirs = config_lib.llm_from_hf(hf_config)
    reader = hf_weights(path)
    table = hf.LLM_TABLES[model_type]
    if model_type == "t5":   # as hf.read: the checkpoint, not the flag, says whether it is tied
        untied = "lm_head.weight" in reader.keys() and not np.array_equal(
            reader.get("lm_head.weight"), reader.get("shared.weight"))
        theirs = dataclasses.replace(theirs, tie_word_embeddings=not untied)
    if theirs.tie_word_embeddings != cfg.llm.tie_word_embeddings:
        raise ConfigError(f"{path}: tie_word_embeddings is {theirs.tie_word_embeddings} there "
                          f"and {cfg.llm.tie_word_embeddings} in the model's LLM config")
    ignore = list(hf.HF_BUFFERS) + [re.escape(k) for k in table.tied_keys(cfg.llm, theirs="")]
    if model_type == "llama":
        ignore += hf_llama.ignorable(cfg.llm, theirs="")
        # blip2_vicuna_instruct's LLM: the directory's Vicuna plus LAVIS's "[PAD]" row
        pad_row = (cfg.llm.vocab_size == theirs.vocab_size + 1
                   and cfg.llm.pad_token_id == theirs.vocab_size)
        if pad_row:
            cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=theirs.vocab_size))
    out = stream.leaves_from_rules(table.rules(cfg.llm, ours="llm", theirs=""), reader,
                                   ignore=ignore)
    if model_type == "llama" and pad_row:
        out.update({k: _with_pad_row(out[k], axis) for k, axis in _VOCAB_AXES.items()
                    if k in out})
    return out


def _under(leaves: Mapping[str, Leaf], prefixes: Sequence[str]) -> dict[str, Leaf]:
    return {k: v for k, v in leaves.items()
            if any(k == p or k.startswith(p + "/") for p in prefixes)}


def open_part(path: str, cfg: Blip2Config, part: str) -> dict[str, Leaf]:
    """The leaves of one tower ("vision": vision/ and, from a BLIP-2 checkpoint, ln_vision/;
    "llm": llm/) from any source that has it."""
    path = os.fspath(path)
    kind = detect(path)
    if kind == "hf-llm":
        if part != "llm":
            raise ConfigError(f"{path} is a language model, not a {part} source")
        return _llm_dir_leaves(path, cfg)
    if kind == "pth":
        source, _ = lavis.open_pth(path)
        if not lavis.is_blip2(source):
            if part != "vision":
                raise ConfigError(f"{path} is not a BLIP-2 checkpoint, so it has no {part}")
            return lavis.tower_leaves(source, cfg.vision)
        leaves = lavis.leaves(source, cfg)
    else:
        leaves = open_model(path).leaves
    prefixes = PARTS[part] + (("ln_vision",) if part == "vision" else ())
    found = _under(leaves, prefixes)
    if not _under(found, PARTS[part]):
        raise ConfigError(f"{path} holds no {part} parameters")
    return found


def _fit_pos_embed(cfg: Blip2Config, leaf: Leaf) -> Leaf:
    """A ViT position table made for another image size, resized to this model's patch grid
    (bicubic, as LAVIS does when it loads a 224-px tower into a 364-px model; CLS kept)."""
    side = cfg.vision.image_size // cfg.vision.patch_size
    eva = cfg.vision.variant == "eva"

    def read(j):
        table = np.asarray(leaf.value(), np.float32)
        flat = table[0] if eva else table
        out = np.asarray(interpolate_pos_embed(flat, (side, side), align_corners=not eva))
        out = (out[None] if eva else out).astype(leaf.dtype)
        return out if j is None else out[j]
    shape = ((1, side * side + 1, leaf.shape[-1]) if eva else (side * side + 1, leaf.shape[-1]))
    return Leaf(shape, leaf.dtype, read, origin=leaf.origin + " (position table resized)")


def assemble(cfg: Blip2Config, layers: Sequence[tuple[str, Mapping[str, Leaf]]],
             random: Sequence[str] = ()) -> dict[str, Leaf]:
    """One leaf per parameter of `cfg` from (label, leaves) layers, later ones winning. Fails
    naming every leaf the model lacks, every shape that does not fit, and every tower left
    without a source (with the option that supplies it); names in `random` may stay absent."""
    abstract = flatten(blip2_model.abstract_params(cfg))
    out: dict[str, Leaf] = {}
    unknown, wrong, misfit = [], [], set()
    sourced: dict[str, list[str]] = {}     # tower -> the sources that hold some of it
    for label, leaves in layers:
        for name, leaf in leaves.items():
            if name not in abstract:
                unknown.append(f"{name} (in {label})")
                continue
            tower = name.split("/")[0]
            if label not in sourced.setdefault(tower, []):
                sourced[tower].append(label)
            want = tuple(abstract[name].shape)
            if name == "vision/pos_embed" and leaf.shape != want and leaf.shape[-1] == want[-1]:
                leaf = _fit_pos_embed(cfg, leaf)
            if tuple(leaf.shape) != want:
                wrong.append(f"{name}: {label} has {tuple(leaf.shape)}, the model needs {want}")
                misfit.add(name)
                continue
            out[name] = leaf
            misfit.discard(name)
    missing = sorted(set(abstract) - set(out) - misfit
                     - {k for k in abstract if k.split("/")[0] in random})
    # A tower no source holds at all gets the option that supplies it; a tower a source holds
    # only part of gets each absent parameter named.
    absent = [k for k in missing if k.split("/")[0] in sourced]
    towers = sorted({k.split("/")[0] for k in missing} - set(sourced))
    needs = [f"{t}/ ({sum(k.split('/')[0] == t for k in missing)} leaves): pass "
             f"{HINTS.get(t, 'a checkpoint that has it')}" for t in towers]
    check_names("the sources do not make up the model:",
                [("parameters the model does not have", unknown), ("wrong shapes", wrong),
                 ("missing parameters", [f"{k} (not in {', '.join(sourced[k.split('/')[0]])})"
                                         for k in absent]),
                 ("towers with no source", needs)])
    return out


def load(path: str, config=None, vision: Optional[str] = None, llm: Optional[str] = None,
         ln_vision_eps: Optional[float] = None) -> tuple[Blip2Config, dict[str, Leaf], list[str]]:
    """(config, leaves, notes) of a model from `path` plus tower sources."""
    return _load(path, open_model(path, config), vision, llm, ln_vision_eps)


def _load(path: str, base: Loaded, vision: Optional[str], llm: Optional[str],
          ln_vision_eps: Optional[float]) -> tuple[Blip2Config, dict[str, Leaf], list[str]]:
    cfg, notes = base.cfg, []
    if llm is not None and base.kind == "lavis" and not base.explicit_config \
            and detect(llm) == "hf-llm" and cfg.llm is not None:
        cfg = cfg.replace(llm=dataclasses.replace(llm_config(llm, cfg.llm_kind),
                                                  dtype=cfg.llm.dtype,
                                                  param_dtype=cfg.llm.param_dtype))
        notes.append(f"LLM config from {llm} (as LAVIS runs it)" + (
            f"; LAVIS's [PAD] (id {cfg.llm.pad_token_id}) is a zero row appended to its "
            "embeddings and head" if cfg.llm_kind == "llama" else ""))
    if ln_vision_eps is not None:
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision,
                                                     post_layer_norm_eps=float(ln_vision_eps)))
    layers = [(path, base.leaves)]
    if vision is not None:
        layers.append((vision, open_part(vision, cfg, "vision")))
    if llm is not None:
        layers.append((llm, open_part(llm, cfg, "llm")))
    return cfg, assemble(cfg, layers), notes


def convert(src: str, dst: str, to: str, *, source_format: Optional[str] = None, config=None,
            vision: Optional[str] = None, llm: Optional[str] = None,
            dtype: Optional[str] = None, parts: str = "full",
            ln_vision_eps: Optional[float] = None,
            max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Convert a checkpoint (+ tower sources) to `to` in {"native", "hf", "lavis"}, one tensor
    at a time. Returns a report: formats (`lavis_model`: the LAVIS model read or written, e.g.
    "blip2_vicuna_instruct"), config, tensors written, notes."""
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {FORMATS}, got {to!r}")
    if source_format is not None:
        found = {"pth": "lavis", "hf-llm": "hf-llm"}.get(detect(src), detect(src))
        if found != source_format:
            raise ConfigError(f"{src} is a {found} checkpoint, not {source_format}")
    base = open_model(src, config)
    cfg, leaves, notes = _load(src, base, vision, llm, ln_vision_eps)
    out_dtype = stream.float_dtype(dtype)
    if to == "native":
        files = native.write(dst, cfg, leaves, max_shard_bytes, dtype=out_dtype)
    elif to == "hf":
        if cfg.itg:
            cfg = cfg.replace(itg=False)
            leaves = {k: v for k, v in leaves.items() if not k.startswith("lm_head/")}
            notes.append("the ITG head (LAVIS Qformer.cls.*) is dropped: HF BLIP-2 has none")
        if cfg.vision.post_layer_norm_eps != cfg.vision.layer_norm_eps:
            notes.append(f"ln_vision eps {cfg.vision.post_layer_norm_eps:g} becomes HF's "
                         f"post_layernorm eps {cfg.vision.layer_norm_eps:g} (HF shares one eps "
                         "with the blocks; HF's own LAVIS conversion does the same)")
            cfg = cfg.replace(vision=dataclasses.replace(
                cfg.vision, post_layer_norm_eps=cfg.vision.layer_norm_eps))
        if "temp" in leaves:
            notes.append("temp is not written: HF BLIP-2 has no ITC temperature")
        files = hf.write(dst, cfg, leaves, max_shard_bytes, dtype=out_dtype)
    else:
        lavis.check_writable(cfg)
        notes += lavis.write(dst, cfg, leaves, parts, dtype=out_dtype)
        files = [os.path.basename(dst)]
    report = {"source": os.fspath(src), "from": base.kind, "destination": os.fspath(dst),
              "to": to}
    if base.lavis_model is not None or to == "lavis":
        report["lavis_model"] = base.lavis_model or lavis.model_name(cfg)
    return dict(report, leaves=len(leaves), files=files, notes=notes, config=cfg)


# What reading a checkpoint raises on bad input (a path that is not there, files of another
# model or format, a torch pickle that is unsafe): the command lines report these in one line
# (`cli.report_errors`); anything else is a bug and keeps its traceback.
CHECKPOINT_ERRORS = (FileNotFoundError, ConfigError, MappingError, CheckpointError,
                     pth.PthFormatError, pth.UnsafeCheckpointError)

__all__ = ["CHECKPOINT_ERRORS", "FORMATS", "Loaded", "MappingError", "assemble", "convert",
           "detect", "load", "open_model", "open_part", "resolve_config"]
