"""The paper's training configs (configs/stage1.py, stage2.py, caption_coco_ft.py,
retrieval_coco_ft.py) hold together with the code that reads them, without allocating a full-size
parameter: each file and arg loads; `loop.model_config` resolves; the frozen patterns match
parameters of `models.blip2.abstract_init` (an `eval_shape`, cached per model config); every top-level
parameter has a source in `config.init`; the optimizer (decay mask, layer-wise LR scales) builds
and its init / update trace on the abstract trainable tree; the data config builds a Pipeline
(the tfds reader stubbed) with valid dataset names and image processors; `LossConfig(**c.loss)`
constructs; the batch divides the 8 fake devices and the mesh; the text setup works with real
vocabularies; and the headline values equal the paper's (§3.4 / Appendix) and LAVIS's yamls.

The last section checks, on tiny models, what the fine-tuning configs need from the code: the
LAVIS prompt length, a 224-px position table loaded into a larger model, and gradients through a
trainable ViT.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip2_jax import api, config as config_lib, processing
from blip2_jax.convert.mapping import flatten
from blip2_jax.data import builders, ops, pipeline
from blip2_jax.eval import evaluators as eval_lib
from blip2_jax.train import init as init_lib
from blip2_jax.train import state as state_lib
from blip2_jax.losses import LossConfig
import assets
from blip2_jax import run_config
from blip2_jax.models import blip2 as blip2_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("stage1", "vit_g"), ("stage1", "vit_l"),
    ("stage2", "opt-2.7b"), ("stage2", "opt-6.7b"), ("stage2", "flant5-xl"),
    ("stage2", "flant5-xxl"), ("stage2", "opt-2.7b,vit_l"), ("stage2", "flant5-xl,vit_l"),
    ("stage2", "llama3-8b"), ("caption_coco_ft", None),
    ("retrieval_coco_ft", "vit_g"), ("retrieval_coco_ft", "vit_l"),
    ("vqa_ft", "opt-2.7b"), ("vqa_ft", "opt-6.7b"), ("vqa_ft", "flant5-xl"),
    ("instruct", "vicuna-7b"), ("instruct", "vicuna-13b"), ("instruct", "flant5-xl"),
    ("instruct", "flant5-xxl"),
]
IDS = [f"{n}:{a}" if a else n for n, a in CASES]

# The top-level keys loop.run reads (anything else would be silently ignored).
LOOP_KEYS = {"model", "model_overrides", "init", "frozen", "frozen_dtype", "loss", "optimizer",
             "total_steps", "batch_size", "seed", "mesh", "log_every_steps",
             "checkpoint_every_steps", "keep_checkpoints", "stop_after_steps", "on_nonfinite",
             "peak_tflops_per_device", "data", "text", "eval", "microbatches", "pad_batch",
             "allow_config_change", "sharding"}
# What each config.init source provides (blip2_jax/train/init.py), by top-level name.
INIT_PROVIDES = {"stage1": {"vision", "ln_vision", "qformer", "query_tokens"},
                 "qformer_text": {"qformer"},
                 "qformer_bert": {"qformer", "query_tokens", "lm_head"},
                 "vision": {"vision", "ln_vision"},
                 "llm": {"llm"}}
TOWER_FILES = ("eva_vit_g", "clip_vit_L")       # LAVIS's image-encoder files


def _config(name, arg):
    return run_config.load(f"{name}.py:{arg}" if arg is not None else f"{name}.py")


@functools.lru_cache(maxsize=None)
def _model(name, arg):
    return run_config.model_config(_config(name, arg))


def _abstract(name, arg):
    """(paths, shapes) of every parameter: models.blip2.abstract_init is an lru_cached eval_shape."""
    return flatten(blip2_model.abstract_init(_model(name, arg))[1])


def _tops(paths):
    return {p.split("/")[0] for p in paths}


# ------------------------------------------------------------------------------------------------
# Per config and arg
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,arg", CASES, ids=IDS)
def test_loads_and_resolves(name, arg):
    c = _config(name, arg)
    assert set(c.keys()) <= LOOP_KEYS, set(c.keys()) - LOOP_KEYS
    assert set(c.keys()) == LOOP_KEYS        # every knob stated, as in configs/tiny_stage*.py
    cfg = _model(name, arg)
    stage1 = name in ("stage1", "retrieval_coco_ft")
    assert (cfg.llm is None) == stage1
    if stage1:
        assert cfg.itc and cfg.itm and cfg.itg
    else:
        assert cfg.llm_kind == ("t5" if "flant5" in (arg or "") else
                                "llama" if "llama" in (arg or "") or "vicuna" in (arg or "")
                                else "opt")
    assert cfg.vision.variant == ("clip" if "vit_l" in (arg or "") else "eva")
    assert cfg.vision.image_size == {"vqa_ft": 490}.get(name, 364 if name.endswith("_ft")
                                                        else 224)
    assert cfg.qformer_text_input == (name in ("vqa_ft", "instruct"))
    # Placeholders only: no real path of anyone's machine in the committed configs.
    paths = [v for k, v in run_config.plain(c.init).items() if k != "random"]
    paths += [c.data.data_dir] + [v for k, v in c.text.items() if k.endswith("_tokenizer")]
    assert all(p.startswith("/path/to/") for p in paths), paths
    # Its evaluators build (names, kinds and settings checked) and fit the model.
    evs = eval_lib.from_config(c.eval, data_dir=c.data.data_dir) if c.eval.evaluators else []
    for ev in evs:
        assert (ev.needs()[0] == "generate") == (not stage1), ev
    if name.endswith("_ft"):
        assert evs and c.eval.every_steps == c.total_steps // 5     # once per epoch
    if name == "instruct":                  # held-out tasks, every 3K steps (paper §2.6)
        assert {ev.name for ev in evs} == {"nocaps", "flickr30k", "gqa", "vizwiz", "textvqa"}
        assert c.eval.every_steps == 3000


@pytest.mark.parametrize("name,arg", CASES, ids=IDS)
def test_frozen_patterns_match(name, arg):
    c = _config(name, arg)
    paths = list(_abstract(name, arg))
    state_lib.check_patterns(paths, c.frozen)
    frozen = state_lib.frozen_paths(paths, c.frozen)
    expected = {"stage1": {"vision"}, "stage2": {"vision", "llm"}, "caption_coco_ft": {"llm"},
                "retrieval_coco_ft": set(), "vqa_ft": {"llm"},
                "instruct": {"vision", "llm"}}[name]
    assert _tops(frozen) == expected
    # Whole towers: nothing of a frozen tower is left trainable.
    assert all(p in frozen for p in paths if p.split("/")[0] in expected)
    assert (c.frozen_dtype == "bfloat16") == bool(expected)


@pytest.mark.parametrize("name,arg", CASES, ids=IDS)
def test_every_parameter_has_a_source(name, arg):
    init = run_config.plain(_config(name, arg).init)
    assert set(init) <= {"checkpoint", "stage1", "qformer_text", "qformer_bert", "vision", "llm",
                         "random"}
    tops = _tops(_abstract(name, arg))
    random = set(init.get("random") or ())
    assert "*" not in random and random <= tops, random - tops
    provided = set(tops) if init.get("checkpoint") else set()
    for key, names in INIT_PROVIDES.items():
        if init.get(key):
            if key == "vision" and os.path.basename(init[key]).startswith(TOWER_FILES):
                names = {"vision"}          # an image encoder's own file has no ln_vision
            provided |= names & tops
    # No leaf left silently random, and nothing loaded is also declared random.
    assert provided | random == tops, tops - provided - random
    assert not provided & random
    expected_random = {"stage1": {"ln_vision", "vision_proj", "text_proj", "temp", "itm_head"},
                       "stage2": {"llm_proj"}}.get(name, set())
    assert random == expected_random


@pytest.mark.parametrize("name,arg", CASES, ids=IDS)
def test_optimizer_builds(name, arg):
    c = _config(name, arg)
    cfg = _model(name, arg)
    opt = run_config.plain(c.optimizer)
    frozen = state_lib.frozen_paths(list(_abstract(name, arg)), c.frozen)
    t_specs, t_shapes = state_lib.trainable_abstract(cfg, frozen)
    mask = state_lib.decay_mask(t_specs, t_shapes)
    scales = state_lib.layer_lr_scales(cfg, t_shapes, opt.get("vit_layer_decay"))
    assert (scales is not None) == name.endswith("_ft")     # LLRD only for a trainable ViT
    tx, sched = state_lib.optimizer(opt, int(c.total_steps), mask, scales)
    opt_state = jax.eval_shape(tx.init, t_shapes)
    updates, _ = jax.eval_shape(tx.update, t_shapes, opt_state, t_shapes)
    assert jax.tree.structure(updates) == jax.tree.structure(t_shapes)
    # Decay exemptions as LAVIS: biases and 1-D leaves exempt, temp and query_tokens decay.
    flat_mask = flatten(mask)
    assert not any(v for k, v in flat_mask.items() if k.endswith("/bias"))
    assert flat_mask["query_tokens"]
    if "temp" in flat_mask:
        assert flat_mask["temp"]
    # The schedule: warm-up from warmup_lr to lr, cosine to min_lr at total_steps.
    np.testing.assert_allclose(float(sched(0)), opt["warmup_lr"], rtol=1e-4)
    np.testing.assert_allclose(float(sched(opt["warmup_steps"])), opt["lr"], rtol=1e-4)
    np.testing.assert_allclose(float(sched(int(c.total_steps))), opt["min_lr"], atol=1e-9)


@pytest.mark.parametrize("name,arg", CASES, ids=IDS)
def test_data_config_builds_a_pipeline(name, arg, monkeypatch, tmp_path):
    c = _config(name, arg)
    cfg = _model(name, arg)
    data = run_config.plain(c.data)
    raw = data["train"] if isinstance(data["train"], list) else [data["train"]]
    kind = {"vqa_ft": builders.VQA, "instruct": "(?:blip2_captions|blip2_vqa)"}.get(
        name, builders.CAPTIONS)
    assert run_config.trains_on_answers(c) == (name in ("vqa_ft", "instruct"))
    for s in raw:
        assert re.fullmatch(kind + r"/[A-Za-z0-9_-]+", s["name"]), s["name"]
        with pytest.raises(FileNotFoundError, match="not found"):   # a well-formed name
            builders.dataset_path(str(tmp_path), s["name"])
    # The pipeline as loop.run builds it, with the tfds reader stubbed out.
    opened = []
    monkeypatch.setattr(pipeline.builders, "open_split",
                        lambda d, n, s: opened.append((d, n, s)) or [])
    data.setdefault("image_size", cfg.vision.image_size)
    # VQA, instructions: the prompt, then the answer.
    prefix_lm = cfg.llm_kind == "t5" and name not in ("vqa_ft", "instruct")
    if prefix_lm:
        data["prefix_lm"] = True
    p = pipeline.from_config(data, batch_size=int(c.batch_size), seed=int(c.seed),
                             process_index=0, process_count=1)
    assert [n for _, n, _ in opened] == [s["name"] for s in raw]
    assert [(d, s) for d, _, s in opened] == [(c.data.data_dir, s.get("split", "train"))
                                              for s in raw]
    for src in p.sources:
        ops.image_processor(src.image_processor or data["image_processor"], cfg.vision.image_size)
    assert p._process.prefix_lm == prefix_lm


@pytest.mark.parametrize("name,arg", CASES, ids=IDS)
def test_loss_config_and_mesh(name, arg):
    c = _config(name, arg)
    loss = run_config.plain(c.loss)
    # run_config.text_setup supplies these two itself (passing them too would be a TypeError there).
    assert not {"dec_token_id", "prompt_length"} & set(loss)
    lc = LossConfig(**loss)
    if name in ("stage1", "retrieval_coco_ft"):
        assert (lc.itc, lc.itm, lc.itg) == (1.0, 1.0, 1.0)
        assert lc.image_id_itc == (name == "retrieval_coco_ft")
    else:
        assert lc.lm == 1.0
    assert jax.device_count() == 8
    assert c.batch_size % 8 == 0
    mesh = run_config.make_mesh(c)
    assert mesh.shape["data"] == 8 and mesh.shape["fsdp"] == mesh.shape["tensor"] == 1
    assert c.batch_size % mesh.shape["data"] == 0


# ------------------------------------------------------------------------------------------------
# Headline values against the paper and LAVIS's yamls
# ------------------------------------------------------------------------------------------------
# (batch, steps, peak lr, min lr, warm-up steps, beta2, vit_layer_decay)
PAPER = {
    ("stage1", "vit_g"): (1680, 250_000, 1e-4, 1e-5, 2000, 0.98, None),
    ("stage1", "vit_l"): (2320, 250_000, 1e-4, 1e-5, 2000, 0.98, None),
    ("stage2", "opt-2.7b"): (1920, 80_000, 1e-4, 5e-5, 2000, 0.98, None),
    ("stage2", "opt-6.7b"): (1920, 80_000, 1e-4, 5e-5, 2000, 0.98, None),
    ("stage2", "flant5-xl"): (1520, 80_000, 1e-4, 5e-5, 2000, 0.98, None),
    ("stage2", "flant5-xxl"): (1520, 80_000, 1e-4, 5e-5, 2000, 0.98, None),
    ("stage2", "opt-2.7b,vit_l"): (1920, 80_000, 1e-4, 5e-5, 2000, 0.98, None),
    ("stage2", "flant5-xl,vit_l"): (1520, 80_000, 1e-4, 5e-5, 2000, 0.98, None),
    ("stage2", "llama3-8b"): (1920, 80_000, 1e-4, 5e-5, 2000, 0.98, None),     # OPT's recipe
    # 5 epochs of the 566,747 Karpathy-train captions: 5 * (566747 // 256), 5 * (566747 // 224).
    ("caption_coco_ft", None): (256, 11_065, 1e-5, 0.0, 1000, 0.999, 0.95),
    ("retrieval_coco_ft", "vit_g"): (224, 12_650, 1e-5, 0.0, 1000, 0.999, 0.95),
    ("retrieval_coco_ft", "vit_l"): (224, 12_650, 5e-6, 0.0, 1000, 0.98, 0.95),
    # Table 8: 5 epochs of VQAv2 train + val (443,757 + 214,354 questions) and VG QA (the
    # config's approximate 1.44M) at batch 128; LLRD 0.95 / 0.95 / 0.9.
    ("vqa_ft", "opt-2.7b"): (128, 5 * (2_098_111 // 128), 1e-5, 0.0, 1000, 0.999, 0.95),
    ("vqa_ft", "opt-6.7b"): (128, 5 * (2_098_111 // 128), 1e-5, 0.0, 1000, 0.999, 0.9),
    ("vqa_ft", "flant5-xl"): (128, 5 * (2_098_111 // 128), 1e-5, 0.0, 1000, 0.999, 0.95),
    # InstructBLIP §2.6: batch 128 (7B) / 64 (13B, 11B) / 192 (3B), at most 60K steps, warm-up
    # 1e-8 -> 1e-5 over 1,000 steps, cosine to 0, AdamW (0.9, 0.999).
    ("instruct", "vicuna-7b"): (128, 60_000, 1e-5, 0.0, 1000, 0.999, None),
    ("instruct", "vicuna-13b"): (64, 60_000, 1e-5, 0.0, 1000, 0.999, None),
    ("instruct", "flant5-xl"): (192, 60_000, 1e-5, 0.0, 1000, 0.999, None),
    ("instruct", "flant5-xxl"): (64, 60_000, 1e-5, 0.0, 1000, 0.999, None),
}


@pytest.mark.parametrize("name,arg", CASES, ids=IDS)
def test_headline_values(name, arg):
    c = _config(name, arg)
    batch, steps, lr, min_lr, warmup, b2, llrd = PAPER[(name, arg)]
    o = c.optimizer
    assert (c.batch_size, c.total_steps) == (batch, steps)
    assert (o.lr, o.min_lr, o.warmup_steps, o.b1, o.b2, o.weight_decay) == (
        lr, min_lr, warmup, 0.9, b2, 0.05)
    assert o.get("vit_layer_decay") == llrd
    assert o.warmup_lr == (1e-6 if name.startswith("stage") else 1e-8)     # LAVIS
    assert c.text.max_length == {"vqa_ft": 48, "instruct": 128}.get(name, 32)
    assert c.data.prompt == ("a photo of " if name == "caption_coco_ft" else "")
    if name == "instruct":
        # Table 5's pools; the held-in sets, each ∝ √(its records) (no weight given).
        templates = c.data.templates
        assert len(templates.caption) == 13 and len(templates.vqa) == 10
        assert templates.caption[0] == "A short image caption:"
        assert "Question: {} Short answer:" in templates.vqa
        assert {s["name"] for s in c.data.train} == {
            "blip2_captions/coco_karpathy", "blip2_captions/capfilt14m",
            "blip2_captions/textcaps", "blip2_vqa/vqav2", "blip2_vqa/okvqa", "blip2_vqa/aokvqa",
            "blip2_vqa/ocrvqa"}
        assert all("weight" not in s for s in c.data.train)
        assert c.text.qformer_tokenizer and c.init.qformer_text
        assert c.eval.evaluators.nocaps.prompt == "A short image caption:"
        assert c.eval.evaluators.gqa.template == "Question: {} Short answer:"
    elif name == "vqa_ft":
        assert c.data.question_template == "Question: {} Answer:"          # Table 8
        assert {(s["name"], s["split"]) for s in c.data.train} == {
            ("blip2_vqa/vqav2", "train"), ("blip2_vqa/vqav2", "val"), ("blip2_vqa/vg_qa", "train")}
        ev = c.eval.evaluators.vqav2_heldout
        assert (ev.kind, ev.split, ev.template, ev.num_beams, ev.max_new_tokens) == (
            "vqa", "heldout", "Question: {} Answer:", 5, 10)
        assert c.data.image_processor == "blip_image_train"
    elif name.startswith("stage"):
        train = {s["name"]: s for s in c.data.train}
        assert set(train) == {f"blip2_captions/{n}" for n in
                              ("coco_karpathy", "vg", "cc3m", "cc12m", "sbu", "laion115m")}
        assert train["blip2_captions/laion115m"]["weight"] == 115.0        # 115M LAION images
        assert {n for n, s in train.items() if s["image_processor"] == "blip_image_train"} == {
            "blip2_captions/vg"}
    else:
        assert c.data.train.name == "blip2_captions/coco_karpathy"
        assert c.data.image_processor == ("blip_image_train" if name == "caption_coco_ft"
                                          else "blip2_image_train")


def test_models_and_defaults():
    assert _config("stage1", None).model == "blip2-pretrain-vit-g"
    assert _config("stage2", None).model == "blip2-opt-2.7b"
    assert _config("retrieval_coco_ft", None).model == "blip2-pretrain-vit-g"
    assert _config("caption_coco_ft", None).model == "blip2-opt-2.7b"
    assert _config("stage2", "flant5-xxl").model == "blip2-flan-t5-xxl"
    assert _config("stage2", "opt-2.7b,vit_l").init.stage1 == "/path/to/stage1_vit_l/final"
    assert _config("vqa_ft", "opt-6.7b,v5p-64").mesh.data == 32
    assert _config("instruct", "vicuna-13b,v5p-128").mesh.data == 64
    for name, bad in [("stage1", "vit_h"), ("stage2", "opt-13b"), ("stage2", "opt-6.7b,vit_l"),
                      ("stage2", "opt-2.7b,vit_h"), ("caption_coco_ft", "flant5-xl"),
                      ("retrieval_coco_ft", "vit_b"), ("vqa_ft", "flant5-xxl"),
                      ("vqa_ft", "opt-2.7b,v4-128"), ("instruct", "vicuna-33b"),
                      ("instruct", "flant5-xl,v5e-256")]:
        with pytest.raises(ValueError):
            _config(name, bad)


def test_command_line_overrides():
    """train.py's flags: `--config FILE:ARG` plus `--config.KEY=VALUE` on the placeholders."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["train.py", f"--config={ROOT}/configs/stage1.py:vit_l", "--config.init.vision=/m/vitl",
            "--config.data.data_dir=/d", "--config.total_steps=10"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    c = fv.config
    assert (c.init.vision, c.data.data_dir, c.total_steps, c.batch_size) == ("/m/vitl", "/d", 10,
                                                                             2320)


# ------------------------------------------------------------------------------------------------
# Text setup with real vocabularies (tests/assets.py)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    shutil.copy(assets.bert_vocab(), d / "vocab.txt")
    return str(d)


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    """GPT-2's BPE in OPT's layout (specials 0-3, then GPT-2's tokens shifted by 4)."""
    encoder_json, vocab_bpe = assets.gpt2_bpe()
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({t: i + 4 for t, i in sorted(encoder.items(), key=lambda kv: kv[1])
                  if t != "<|endoftext|>"})
    d = tmp_path_factory.mktemp("opt")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(vocab_bpe, d / "merges.txt")
    return str(d)


@pytest.mark.parametrize("name,arg", [("stage1", "vit_g"), ("retrieval_coco_ft", "vit_g")])
def test_text_setup_qformer(name, arg, bert_dir):
    c = _config(name, arg)
    c.text.qformer_tokenizer = bert_dir
    text = run_config.text_setup(c, _model(name, arg))
    specs, lc, prefix_lm = text.specs, text.loss, text.prefix_lm
    assert [(s.name, s.kind, s.max_length) for s in specs] == [("qformer", "qformer", 32)]
    assert lc.dec_token_id == 30522 and not prefix_lm         # [DEC] after bert-base-uncased
    assert lc.image_id_itc == (name == "retrieval_coco_ft")
    # Without the tokenizer (compiling for a topology), the model config gives the same [DEC].
    c.text.qformer_tokenizer = os.path.join(bert_dir, "absent")
    assert run_config.text_setup(c, _model(name, arg), tokenizers=False).loss == lc
    with pytest.raises(Exception):
        run_config.text_setup(c, _model(name, arg))


def test_text_setup_opt_pretraining(opt_dir):
    c = _config("stage2", "opt-2.7b")
    c.text.llm_tokenizer = opt_dir
    text = run_config.text_setup(c, _model("stage2", "opt-2.7b"))
    specs, lc, prefix_lm = text.specs, text.loss, text.prefix_lm
    assert [(s.name, s.kind, s.max_length, s.suffix) for s in specs] == [
        ("llm", "opt", 32, "\n")]
    assert lc.prompt_length == 0 and not prefix_lm            # prompt "": nothing masked


# ------------------------------------------------------------------------------------------------
# What the fine-tuning configs need from the code (on tiny models)
# ------------------------------------------------------------------------------------------------
def test_caption_prompt_length_matches_lavis(opt_dir):
    c = _config("caption_coco_ft", None)
    c.text.llm_tokenizer = opt_dir
    lc = run_config.text_setup(c, _model("caption_coco_ft", None)).loss
    assert lc.prompt_length == 4


def test_vqa_rows_are_the_whole_text_tokenized(opt_dir, bert_dir):
    """vqa_ft's text set-up with GPT-2's real BPE: a training row `[BOS] prompt answer "\n"`,
    tokenized in two parts, equals the whole text tokenized at once; its prompt part is what
    generation gets at inference; the targets are the rest. FlanT5: the prompt to the encoder,
    the answer to the decoder."""
    c = _config("vqa_ft", "opt-2.7b")
    c.text.llm_tokenizer, c.text.qformer_tokenizer = opt_dir, bert_dir
    text = run_config.text_setup(c, _model("vqa_ft", "opt-2.7b"))
    assert [(s.name, s.kind, s.max_length, s.field, s.suffix, s.target_field)
            for s in text.specs] == [("llm", "opt", 48, "text", "\n", "answer"),
                                     ("qformer", "qformer", 48, "text", "", "")]
    assert text.targets == ("llm",) and text.loss.prompt_length == 0 and not text.prefix_lm
    tok = processing.load_tokenizer(opt_dir, "opt")
    for question, answer in [("what is the man holding?", "frisbee"), ("how many?", "2"),
                             ("is it raining", "no"), ("what color is the bus?", "red and white")]:
        prompt = processing.fill_template(c.data.question_template, question)
        ids, mask, targets = processing.tokenize_prompt_answer(tok, prompt, answer, kind="opt",
                                                               max_length=48, suffix="\n")
        whole = [tok.bos_token_id] + tok(f"{prompt} {answer}\n",
                                         add_special_tokens=False)["input_ids"]
        assert ids[:len(whole)].tolist() == whole and mask.sum() == len(whole)
        inference, _ = processing.tokenize_prompts(tok, prompt, kind="opt")
        n = inference.shape[1]
        assert ids[:n].tolist() == inference[0].tolist()
        assert targets.tolist() == [0] * n + [1] * (len(whole) - n) + [0] * (48 - len(whole))
    c = _config("vqa_ft", "flant5-xl")
    c.text.qformer_tokenizer = bert_dir
    text = run_config.text_setup(c, _model("vqa_ft", "flant5-xl"))
    assert [(s.name, s.kind, s.field) for s in text.specs] == [
        ("llm", "t5", "text"), ("target", "t5", "answer"), ("qformer", "qformer", "text")]
    assert text.targets == () and not text.prefix_lm


def _random_params(cfg, seed=0):
    """Random parameters of the right shapes without compiling the model's init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        blip2_model.abstract_params(cfg))


def test_init_interpolates_position_table(tmp_path, monkeypatch):
    small = config_lib.get_preset("tiny-stage1")                    # 30 px: a 5x5 patch grid
    api.Blip2(small, _random_params(small), check=False).save(str(tmp_path), format="native")
    big = small.replace(vision=dataclasses.replace(small.vision, image_size=42))   # 7x7
    monkeypatch.setattr(init_lib.blip2_model, "init_params", lambda cfg, seed=0: _random_params(cfg))
    params, _ = init_lib.initial_params(big, {"checkpoint": str(tmp_path)})
    assert params["vision"]["pos_embed"].shape == (1, 50, small.vision.hidden_size)


def _depends_on_inputs(closed) -> list[bool]:
    """Per output of a traced function: whether it is computed from any input (an equation's
    outputs count as dependent when any of its operands is: conservative through nested calls)."""
    from jax.extend.core import Literal
    jaxpr = closed.jaxpr
    live = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in live for v in eqn.invars):
            live.update(eqn.outvars)
    return [not isinstance(v, Literal) and v in live for v in jaxpr.outvars]


@pytest.mark.parametrize("frozen, trains_vit", [((), True), (("vision/.*",), False)])
def test_trainable_vit_gets_gradients(frozen, trains_vit):
    """Traced, not run: with the ViT trainable (fine-tuning) its gradient depends on the inputs;
    frozen, the stop_gradient makes it a constant zero. ln_vision's depends on them either way.
    The Trainer decides from the frozen patterns."""
    from blip2_jax.train.step import loss_fn
    from blip2_jax.train.trainer import Trainer
    cfg = config_lib.get_preset("tiny-stage1")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    trainer = Trainer(cfg, LossConfig(itc=1.0, itm=0.0, itg=0.0), {"lr": 1e-5}, total_steps=10,
                      mesh=mesh, frozen=frozen, frozen_dtype=None)
    assert trainer.loss_cfg.train_vision == trains_vit
    s, b = cfg.vision.image_size, 2
    params = blip2_model.abstract_params(cfg)
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
             "qformer_ids": jax.ShapeDtypeStruct((b, 4), jnp.int32),
             "qformer_mask": jax.ShapeDtypeStruct((b, 4), jnp.int32)}
    lc = trainer.loss_cfg
    grad = jax.grad(lambda p, x: loss_fn(cfg, lc)(p, {}, x, jax.random.PRNGKey(0))[0])
    closed, out_shape = jax.make_jaxpr(grad, return_shape=True)(params, batch)
    dependent = jax.tree.unflatten(jax.tree.structure(out_shape), _depends_on_inputs(closed))
    assert dependent["ln_vision"]["scale"]
    assert dependent["vision"]["patch_embed"]["kernel"] == trains_vit


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_init_llm_from_a_plain_hf_language_model(tmp_path, monkeypatch, kind):
    """config.init.llm may name an `OPTForCausalLM` / `T5ForConditionalGeneration` directory
    (facebook/opt-*, google/flan-t5-*): its weights land in llm/, through the same tables as
    HF BLIP-2 checkpoints; a model of another family or shape is refused."""
    import torch
    from transformers import OPTForCausalLM, T5ForConditionalGeneration
    import hf_ref
    from blip2_jax.convert import hf_opt, hf_t5, mapping
    hcfg = hf_ref.opt_config() if kind == "opt" else hf_ref.t5_config()
    torch.manual_seed(0)
    hf_model = hf_ref.randomize((OPTForCausalLM if kind == "opt"
                                 else T5ForConditionalGeneration)(hcfg))
    hf_model.save_pretrained(str(tmp_path / "lm"))
    llm = config_lib.llm_from_hf(hcfg.to_dict())
    cfg = config_lib.get_preset(f"tiny-{kind}").replace(llm=llm)
    monkeypatch.setattr(init_lib.blip2_model, "init_params", lambda c, seed=0: _random_params(c))
    params, sources = init_lib.initial_params(cfg, {"llm": str(tmp_path / "lm"), "random": ["*"]})

    sd = hf_ref.state_dict_numpy(hf_model)
    table = hf_opt if kind == "opt" else hf_t5
    expected = mapping.load(table.rules(llm, ours="", theirs=""), sd.keys(), sd.__getitem__,
                            ignore=[re.escape(k) for k in table.tied_keys(llm, theirs="")])
    got, want = flatten(params["llm"]), flatten(expected)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert sources["llm"] == f"llm from {tmp_path / 'lm'}"

    other = config_lib.get_preset("tiny-t5" if kind == "opt" else "tiny-opt")
    with pytest.raises(init_lib.InitError, match=f"HF {kind} model"):
        init_lib.initial_params(other, {"llm": str(tmp_path / "lm"), "random": ["*"]})
    wider = cfg.replace(llm=dataclasses.replace(llm, **{("ffn_dim" if kind == "opt"
                                                         else "d_ff"): 40}))
    with pytest.raises((init_lib.InitError, ValueError), match="shape"):
        init_lib.initial_params(wider, {"llm": str(tmp_path / "lm"), "random": ["*"]})
