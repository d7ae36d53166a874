"""A run's config turned into the objects the run needs, in one place.

A run config is an ml_collections ConfigDict made by a `configs/*.py` file (`train/defaults.py`
holds the shared keys). train.py, eval.py, `aot`, the feature-cache builder and the demo all read
it through these functions, so they agree on every derived value:

    config = run_config.load("configs/stage1.py:vit_g", {"batch_size": 64})
    cfg = run_config.model_config(config)          # Blip2Config: preset or checkpoint + overrides
    mesh = run_config.make_mesh(config)            # config.mesh
    rules, overrides = run_config.sharding_rules(config)    # config.sharding
    text = run_config.text_setup(config, cfg)      # TextSpecs, LossConfig, prefix LM
    fields = run_config.batch_fields(config, cfg)  # the step's batch: names, shapes, dtypes
    data = run_config.data_config(config, cfg, text)    # what data.pipeline.from_config takes
    evaluators, tokenizers = run_config.evaluators(config)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Mapping, Optional

import ml_collections

from blip2_jax import config as config_lib, processing, sharding as sharding_lib
from blip2_jax.convert import native
from blip2_jax.data import batch as batch_lib, builders
from blip2_jax.data.pipeline import TextSpec
from blip2_jax.eval import evaluators as eval_lib
from blip2_jax.losses import LossConfig

# The run configs: `load("stage1.py:vit_g")` looks there when the path given does not exist. An
# installed package carries them as blip2_jax/configs/; the repository keeps them at configs/.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = next((d for d in (os.path.join(_PACKAGE, "configs"),
                                os.path.join(os.path.dirname(_PACKAGE), "configs"))
                    if os.path.isdir(d)), os.path.join(os.path.dirname(_PACKAGE), "configs"))


class RunConfigError(ValueError):
    """A run config that cannot be turned into a run (unknown keys, impossible shapes)."""


def plain(x):
    """ml_collections / nested containers → plain Python (dicts, lists, scalars)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def section(config, key: str) -> dict:
    """config.KEY as a plain dict ({} when absent or None)."""
    return plain(config.get(key) or {})


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def config_path(spec: str) -> tuple[str, Optional[str]]:
    """"path/to/file.py[:arg]" → (an existing file, arg or None); a bare file name is looked up
    in the repository's configs/."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(CONFIGS_DIR, path)):
        path = os.path.join(CONFIGS_DIR, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r} (give configs/NAME.py[:ARG])")
    return path, (arg if sep else None)


STORED_CONFIG = "config.json"     # what train.py writes into its work directory (train/loop.py)


def load(spec: str, overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
    """The ConfigDict of "configs/NAME.py[:ARG]" (its `get_config(ARG)`), or of a train.py work
    directory (the config its run used, from WORKDIR/config.json), with `overrides`
    ({"optimizer.lr": 1e-4, ...}: dotted keys that must exist) applied."""
    if os.path.isdir(spec):
        config = load_stored(spec)
        for key, value in (overrides or {}).items():
            set_key(config, key, value)
        return config
    path, arg = config_path(spec)
    name = "blip2_run_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg is not None else module.get_config()
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    return config


def load_stored(workdir: str) -> ml_collections.ConfigDict:
    """The config a train.py run in `workdir` used (its config.json, as the run resolved it; a
    resume that changed it stores the latest). JSON has no tuples: lists come back as tuples,
    as the configs write them (and as `--config.KEY=VALUE` can override them)."""
    path = os.path.join(workdir, STORED_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} holds no {STORED_CONFIG} (is it a train.py work "
                                "directory?)")
    with open(path) as f:
        stored = json.load(f)

    def tuples(x):
        if isinstance(x, Mapping):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x
    return ml_collections.ConfigDict(tuples(stored["config"]))


def set_key(config, key: str, value) -> None:
    """config["a.b.c"] = value, refusing a key the config does not have."""
    node = config
    *path, last = key.split(".")
    for i, p in enumerate(path):
        if p not in node:
            raise RunConfigError(f"config has no key {'.'.join(path[:i + 1])!r}")
        node = node[p]
    if isinstance(node, ml_collections.ConfigDict) and last not in node:
        raise RunConfigError(f"config has no key {key!r}")
    node[last] = value


def validate(config) -> None:
    """The run's step counts and choices make sense (RunConfigError listing every one that
    does not)."""
    problems = []
    for key, least in (("total_steps", 1), ("batch_size", 1), ("log_every_steps", 1),
                       ("checkpoint_every_steps", 1), ("stop_after_steps", 0),
                       ("microbatches", 1)):
        value = config.get(key)
        if value is not None and int(value) < least:
            problems.append(f"config.{key} = {value} (must be >= {least})")
    if config.get("on_nonfinite", "stop") not in ("stop", "skip"):
        problems.append(f"config.on_nonfinite = {config.on_nonfinite!r} (\"stop\" or \"skip\")")
    if problems:
        raise RunConfigError("; ".join(problems))


# ------------------------------------------------------------------------------------------------
# Model, mesh, sharding
# ------------------------------------------------------------------------------------------------
def model_config(config) -> config_lib.Blip2Config:
    """`config.model`: a preset name, or a checkpoint dir (native or HF); then
    `config.model_overrides` (nested dict of config fields) applied on top."""
    name = config.model
    if os.path.isdir(str(name)):
        cfg = (native.read_config(name) if native.is_native(name)
               else config_lib.read_hf_config(name))
    else:
        cfg = config_lib.get_preset(name)
    overrides = section(config, "model_overrides")
    if overrides:
        d = cfg.to_dict()

        def update(dst, src, where):
            for k, v in src.items():
                if k not in dst:
                    raise RunConfigError(f"config.model_overrides: {where}{k} is not a model config "
                                   f"field (have {sorted(dst)})")
                if isinstance(v, Mapping):
                    update(dst[k], v, f"{where}{k}.")
                else:
                    dst[k] = v
        update(d, overrides, "")
        cfg = config_lib.Blip2Config.from_dict(d)
    return cfg


def make_mesh(config, devices=None):
    """config.mesh: {data, fsdp, tensor} axis sizes (-1: the rest), dcn_* for multi-slice."""
    m = plain(config.mesh)
    axes = {k: int(m.get(k, 1 if k != "data" else -1)) for k in ("data", "fsdp", "tensor")}
    dcn = {k[4:]: int(v) for k, v in m.items() if k.startswith("dcn_") and int(v) != 1}
    unknown = set(m) - set(axes) - {f"dcn_{k}" for k in axes}
    if unknown:
        raise RunConfigError(f"unknown config.mesh keys {sorted(unknown)}")
    return sharding_lib.make_mesh(axes, dcn=dcn or None, devices=devices)


def sharding_rules(config) -> tuple[tuple, tuple]:
    """(rules, per-tower overrides) from config.sharding: `rules` a list of
    (logical name, mesh axes) (default `sharding.DEFAULT_RULES`), `overrides` a dict
    {parameter-path regex: rules} (e.g. {"llm/.*": [["embed", None], ...]})."""
    s = section(config, "sharding")
    unknown = set(s) - {"rules", "overrides", "zero1"}
    if unknown:
        raise RunConfigError(f"unknown config.sharding keys {sorted(unknown)} (rules, overrides, "
                             f"zero1)")

    def rules_of(raw) -> tuple:
        return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes)
                     for name, axes in raw)
    rules = rules_of(s["rules"]) if s.get("rules") else sharding_lib.DEFAULT_RULES
    overrides = tuple((pattern, rules_of(r)) for pattern, r in (s.get("overrides") or {}).items())
    return rules, overrides


def trainer_options(config) -> dict:
    """The Trainer's keyword arguments a run config sets: frozen towers, their dtype,
    microbatches, the sharding rules and ZeRO-1."""
    rules, overrides = sharding_rules(config)
    return dict(frozen=tuple(config.get("frozen") or ()),
                frozen_dtype=config.get("frozen_dtype") or None,
                microbatches=int(config.get("microbatches") or 1),
                rules=rules, overrides=overrides,
                zero1=bool(section(config, "sharding").get("zero1")))


def step_batch(config, mesh) -> int:
    """The step's global batch. config.batch_size must split evenly over the mesh's batch axes:
    otherwise it would be replicated (every device computing every example), which no one wants
    in training. With config.pad_batch it is rounded up to the next multiple instead: the extra
    rows are padding (valid False) that the losses leave out (train/step.py `masked_rows`)."""
    n = sharding_lib.batch_shards(mesh)
    b = int(config.batch_size)
    if b % n == 0:
        return b
    if config.get("pad_batch"):
        return n * -(-b // n)
    axes = sharding_lib.batch_axes(mesh)
    raise RunConfigError(f"config.batch_size {b} is not divisible by the mesh's batch axes "
                     f"{axes} ({n} ways, mesh {dict(mesh.shape)}): use a mesh whose data x fsdp "
                     f"divides it (e.g. config.mesh.tensor > 1), another batch size, or "
                     f"config.pad_batch=True (steps of {n * -(-b // n)} rows, the extra "
                     f"{n * -(-b // n) - b} padding that the losses leave out)")


# ------------------------------------------------------------------------------------------------
# Text, losses, batch
# ------------------------------------------------------------------------------------------------
def tokenizer_paths(config) -> dict:
    """{"llm": dir or None, "qformer": dir or None} from config.text ("{data_dir}" expanded)."""
    data_dir = section(config, "data").get("data_dir", "")
    text = section(config, "text")
    return {k: (text[f"{k}_tokenizer"].format(data_dir=data_dir)
                if text.get(f"{k}_tokenizer") else None) for k in ("llm", "qformer")}


@dataclasses.dataclass(frozen=True)
class TextSetup:
    """How a stage tokenizes its text and what its losses need to know of the tokens."""
    specs: tuple          # data.pipeline.TextSpecs, one per tokenized batch field
    loss: LossConfig
    prefix_lm: bool       # T5: the caption is split into an encoder prefix and a decoder target
    max_length: int

    @property
    def fields(self) -> tuple:
        return tuple(s.name for s in self.specs)

    @property
    def targets(self) -> tuple:
        """Names of the specs whose rows carry a per-row target mask (a prompt → target row)."""
        return tuple(s.name for s in self.specs if s.target_field)


def _tokenizer(path: Optional[str], kind: str, required: bool):
    """The tokenizer at `path`, or None when it is not there and not required."""
    if not required and not (path and os.path.isdir(path)):
        return None
    return processing.load_tokenizer(path, kind)


def training_dataset_name(config) -> Optional[str]:
    """NAME of the run's first training source (`blip2_captions/NAME`): the dataset its
    evaluators read when they name none. None without a training source."""
    raw = section(config, "data").get("train") or []
    raw = [raw] if isinstance(raw, Mapping) else list(raw)
    name = str(raw[0].get("name", "")) if raw else ""
    return name.split("/", 1)[1] if "/" in name else None


def trains_on_answers(config) -> bool:
    """The run's training rows are prompt → response, the stage-2 step learning to generate the
    response: every training source is a VQA dataset (blip2_vqa/..., VQA fine-tuning: the
    question template filled with each question, then its answer), or config.data.templates
    gives instruction templates (InstructBLIP's instruction tuning: captions and VQA mixed, an
    instruction drawn per example, then its caption or answer)."""
    data = section(config, "data")
    if data.get("templates"):
        return True
    raw = data.get("train") or []
    raw = [raw] if isinstance(raw, Mapping) else list(raw)
    return bool(raw) and all(builders.kind_of(str(s.get("name", ""))) == builders.VQA
                             for s in raw)


def text_setup(config, cfg: config_lib.Blip2Config, *, tokenizers: bool = True) -> TextSetup:
    """The stage's TextSetup. Tokenizer paths may say "{data_dir}" (config.data.data_dir).

    The losses take two ids from the tokenizers: stage 1's [DEC] (the Q-Former tokenizer's BOS)
    and the length of OPT's masked prompt. tokenizers=False (compiling for a topology, where the
    tokenizers may not be on this machine): a tokenizer that is not there is replaced by the model
    config as LAVIS lays it out — [DEC] is the Q-Former's last id (BERT's vocabulary + 1), the OPT
    prompt is not masked. Neither changes the compiled program's shapes.

    VQA fine-tuning and instruction tuning (`trains_on_answers`; the pipeline's `text` is the
    prompt, config.data.question_template filled with the question, or the instruction drawn
    from config.data.templates, and its `answer` the response: the answer, or the caption):
    OPT / LLaMA read `[BOS] prompt answer END` (`llm_ids`, with `llm_targets` on the answer and
    END: "\\n" for OPT, EOS for LLaMA), T5's encoder reads the prompt (`llm_ids`) and its
    decoder the answer (`target_ids`). A question-aware Q-Former
    (`Blip2Config.qformer_text_input`) also reads the filled prompt (`qformer_ids`, BERT, cut
    at max_length on the right): the same text its LLM sees, as `Blip2.answer` gives it."""
    text = section(config, "text")
    max_length = int(text.get("max_length", 32))
    weights = section(config, "loss")
    paths = tokenizer_paths(config)
    if cfg.llm is None:
        tok = _tokenizer(paths["qformer"], "qformer", tokenizers)
        dec = int(tok.bos_token_id) if tok is not None else cfg.qformer.vocab_size - 1
        specs = (TextSpec("qformer", paths["qformer"], "qformer", max_length),)
        return TextSetup(specs, LossConfig(dec_token_id=dec, **weights), False, max_length)
    tok_dir = paths["llm"]
    if trains_on_answers(config):
        return _answer_text_setup(cfg, tok_dir, paths["qformer"], max_length, weights)
    if cfg.qformer_text_input:
        raise RunConfigError("a question-aware Q-Former (model qformer_text_input) trains on VQA "
                             "data or instructions: name blip2_vqa/... datasets in "
                             "config.data.train, or set config.data.templates")
    if cfg.llm_kind == "llama":
        # `[BOS] prompt caption EOS`, the caption and EOS the targets: the answer-generation row
        # (InstructBLIP's caption tasks) with config.data.prompt as the prompt.
        specs = (TextSpec("llm", tok_dir, "llama", max_length, field="prompt",
                          target_field="caption"),)
        return TextSetup(specs, LossConfig(**weights), False, max_length)
    if cfg.llm_kind == "opt":
        prompt = section(config, "data").get("prompt", "")
        tok = _tokenizer(tok_dir, "opt", tokenizers) if prompt else None
        # LAVIS: prompt_length = BOS + the model prompt's tokens ("a photo of", without the
        # space its text processor adds before the caption), masked only when a prompt is set.
        prompt_length = (1 + len(tok(prompt.rstrip(), add_special_tokens=False)["input_ids"])
                         if tok is not None else 0)
        specs = (TextSpec("llm", tok_dir, "opt", max_length, suffix="\n"),)
        return TextSetup(specs, LossConfig(prompt_length=prompt_length, **weights), False,
                         max_length)
    specs = (TextSpec("llm", tok_dir, "t5", max_length),
             TextSpec("target", tok_dir, "t5", max_length, field="target"))
    return TextSetup(specs, LossConfig(**weights), True, max_length)


def _answer_text_setup(cfg: config_lib.Blip2Config, tok_dir: Optional[str],
                       qformer_dir: Optional[str], max_length: int, weights: dict) -> TextSetup:
    """`text_setup` of a VQA fine-tune or instruction tuning (see there)."""
    if cfg.decoder_only:
        suffix = "\n" if cfg.llm_kind == "opt" else ""       # BLIP-2 OPT's EOS (with_caption_eos)
        specs = (TextSpec("llm", tok_dir, cfg.llm_kind, max_length, suffix=suffix,
                          target_field="answer"),)
    else:
        specs = (TextSpec("llm", tok_dir, "t5", max_length),
                 TextSpec("target", tok_dir, "t5", max_length, field="answer"))
    if cfg.qformer_text_input:
        if not qformer_dir:
            raise RunConfigError("the model's Q-Former reads the question "
                                 "(qformer_text_input): set config.text.qformer_tokenizer")
        positions = cfg.qformer.max_position_embeddings
        if max_length > positions:
            raise RunConfigError(f"config.text.max_length {max_length} exceeds the Q-Former's "
                                 f"{positions} text positions (max_position_embeddings): the "
                                 f"prompt's BERT ids would not fit; use max_length <= "
                                 f"{positions}")
        specs += (TextSpec("qformer", qformer_dir, "qformer", max_length),)
    return TextSetup(specs, LossConfig(**weights), False, max_length)


def with_caption_eos(config, cfg: config_lib.Blip2Config) -> config_lib.Blip2Config:
    """BLIP-2 OPT ends every training caption with "\\n" and generates up to it: the model's
    EOS becomes the "\\n" token (LAVIS `eos_token_id`, HF blip2-opt's text_config 50118), so
    the exported checkpoint captions as trained."""
    if cfg.llm is None or cfg.llm_kind != "opt":
        return cfg
    tok_dir = tokenizer_paths(config)["llm"]
    ids = processing.load_tokenizer(tok_dir, "opt")("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the OPT tokenizer at {tok_dir} splits '\\n' into {ids}; BLIP-2 OPT "
                         "needs it as one token (its caption EOS)")
    return cfg.replace(llm=dataclasses.replace(cfg.llm, eos_token_id=int(ids[0])))


def image_size(config, cfg: config_lib.Blip2Config) -> int:
    return int(section(config, "data").get("image_size") or cfg.vision.image_size)


def data_config(config, cfg: config_lib.Blip2Config, text: TextSetup) -> dict:
    """config.data with the stage's tokenizer specs, image size and prefix-LM split filled in:
    what `data.pipeline.from_config` takes."""
    data = {**section(config, "data"), "texts": [dataclasses.asdict(t) for t in text.specs]}
    data.setdefault("image_size", cfg.vision.image_size)
    if text.prefix_lm:
        data["prefix_lm"] = True
    return data


def batch_fields(config, cfg: config_lib.Blip2Config,
                 text: Optional[TextSetup] = None) -> dict[str, batch_lib.Field]:
    """The step's batch fields for this run (`data.batch.step_fields`): images or the feature
    cache's ViT tokens, the stage's tokenized texts."""
    text = text or text_setup(config, cfg, tokenizers=False)
    size = image_size(config, cfg)
    features = None
    if section(config, "data").get("features"):
        tokens = 1 + (size // cfg.vision.patch_size) ** 2          # [CLS] + patches
        features = ((tokens, cfg.vision.hidden_size), cfg.vision.dtype)
    return batch_lib.step_fields(text.fields, text.max_length, image_size=size,
                                 features=features, with_targets=text.targets)


# ------------------------------------------------------------------------------------------------
# Resuming
# ------------------------------------------------------------------------------------------------
# What a resumed run may change without `allow_config_change`: when it logs, saves, evaluates or
# stops, and how the same global batch is laid out over devices or read (the losses do not
# depend on the mesh, the data workers or the feature cache).
RESUMABLE_CHANGES = ("total_steps", "stop_after_steps", "log_every_steps",
                     "checkpoint_every_steps", "keep_checkpoints", "eval",
                     "allow_config_change", "peak_tflops_per_device", "mesh", "sharding",
                     "data.num_workers", "data.num_threads", "data.prefetch", "data.features")


def _leaves(d, prefix: str = "") -> dict:
    if isinstance(d, Mapping) and d:
        out = {}
        for k, v in d.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: Mapping, current) -> list[str]:
    """"KEY: SAVED -> NOW" for every config entry that differs between a checkpoint's config
    and `current`, except RESUMABLE_CHANGES (compared as JSON, as checkpoints store them)."""
    now = json.loads(json.dumps(plain(current), default=str))
    old = json.loads(json.dumps(plain(saved), default=str))
    a, b = _leaves(old), _leaves(now)
    free = lambda k: any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)  # noqa: E731
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if not free(k) and a.get(k) != b.get(k)]


def stage_of(model_config: Mapping) -> str:
    """"stage 1" (no LLM) or "stage 2 (KIND)" of a model config dict (`Blip2Config.to_dict`)."""
    llm = model_config.get("llm")
    if not llm:
        return "stage 1 (Q-Former, no LLM)"
    return f"stage 2 ({str(llm.get('kind', 'an')).upper()} LLM)"


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def evaluators(config, *, batch_size: Optional[int] = None):
    """(evaluators of config.eval, their Tokenizers loaded from config.text) — ([], None) when
    the config names none."""
    eval_cfg = section(config, "eval")
    if not eval_cfg.get("evaluators"):
        return [], None
    data_dir = section(config, "data").get("data_dir")
    evs = eval_lib.from_config(eval_cfg, data_dir=data_dir, batch_size=batch_size,
                               dataset_name=training_dataset_name(config))
    paths = tokenizer_paths(config)
    need = {ev.needs()[1] for ev in evs}
    if "llm" in need:
        need.add("qformer")        # a question-aware Q-Former reads the generation prompts
    toks = {k: processing.load_tokenizer(paths[k], k) for k in ("llm", "qformer")
            if k in need and paths[k]}
    return evs, eval_lib.Tokenizers(**toks)

