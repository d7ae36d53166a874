"""eval.py and the evaluators end to end: tiny models trained on the synthetic dataset, evaluated
through the command; the output files, the report (parsed, every referenced file present), the
in-training evaluation and the metrics recomputed from the predictions."""
from __future__ import annotations

import html.parser
import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import blip2_jax
import runs
from blip2_jax import processing
from blip2_jax.data import ops
from blip2_jax.eval import evaluators as eval_lib
from blip2_jax.eval import retrieval
from blip2_jax.metrics import caption as caption_metrics
from blip2_jax.metrics import vqa as vqa_metrics
from blip2_jax.train import loop
from blip2_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_IMAGES = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return runs.synthetic_data(str(tmp_path_factory.mktemp("synthetic_eval")), train=48,
                               test=TEST_IMAGES)


def _config(name, arg, **overrides):
    # 6 test images in evaluation batches of 4: a padded, masked last batch.
    return runs.config(name, arg, **{"total_steps": 4, "eval.batch_size": 4, **overrides})


def _eval_cmd(config_arg, *args):
    return [sys.executable, os.path.join(ROOT, "eval.py"), "--config", config_arg, *args,
            "--config.eval.batch_size=4"]


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src"))
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])

    def handle_data(self, data):
        self.text.append(data)


def _page(out):
    page = _Page()
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        page.feed(f.read())
    return page


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Said(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


STAGE2_LOG = _Said()      # what the stage-2 run below logged


@pytest.fixture(scope="module")
def stage2_run(data_dir, tmp_path_factory):
    """tiny_stage2 (OPT), 4 steps, the config's evaluators every 2 steps."""
    workdir = str(tmp_path_factory.mktemp("stage2_eval"))
    logger = logging.getLogger("blip2_jax.train.loop")
    level = logger.level
    logger.addHandler(STAGE2_LOG)
    logger.setLevel(logging.INFO)
    try:
        loop.run(_config("tiny_stage2", f"opt,{data_dir}", **{"eval.every_steps": 2}), workdir)
    finally:
        logger.removeHandler(STAGE2_LOG)
        logger.setLevel(level)
    return workdir


def test_in_training_evaluation_is_logged(stage2_run):
    # Said as it starts (the progress bar stops meanwhile).
    for step in (2, 4):
        assert f"step {step}: evaluating caption_test, vqa_test" in STAGE2_LOG.lines
    rows = [r for r in _jsonl(os.path.join(stage2_run, "metrics.jsonl"))
            if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"eval/caption_test/CIDEr", "eval/caption_test/Bleu_4",
                "eval/vqa_test/overall"} <= set(r)
    for step in (2, 4):
        d = os.path.join(stage2_run, "eval", f"step_{step}")
        assert {"results.json", "predictions.jsonl"} <= set(os.listdir(d))


@pytest.fixture(scope="module")
def eval_py_out(stage2_run, data_dir, tmp_path_factory):
    """eval.py (one process, 8 devices) on the stage-2 run's work directory, with the run's own
    config (no --config, no override): its output directory."""
    out = str(tmp_path_factory.mktemp("eval_py") / "out")
    _run([sys.executable, os.path.join(ROOT, "eval.py"), "--workdir", stage2_run, "--output",
          out])
    return out


def test_eval_py_workdir_config_is_the_runs_own_with_overrides_on_top(stage2_run, data_dir,
                                                                       capsys):
    spec = importlib.util.spec_from_file_location("eval_py", os.path.join(ROOT, "eval.py"))
    eval_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_py)

    def resolved(*argv):
        p = eval_py.parser()
        args = p.parse_args(list(argv))
        eval_py.resolve_config(args, p)
        return args
    run = _config("tiny_stage2", f"opt,{data_dir}", **{"eval.every_steps": 2})
    args = resolved("--workdir", stage2_run, "--config.eval.batch_size=2")
    assert args.config_file == os.path.join(stage2_run, "config.json")
    assert args.config.eval.batch_size == 2 and args.config.total_steps == 4
    assert args.config.data.data_dir == data_dir and args.config.frozen == tuple(run.frozen)
    args.config.eval.batch_size = 4          # all else as the run's config
    assert run_config.config_changes(run, args.config) == []
    # --config still names another config, overrides on top.
    cfg = f"{os.path.join(ROOT, 'configs', 'tiny_stage2.py')}:opt,{data_dir}"
    assert resolved("--workdir", stage2_run, "--config", cfg,
                    "--config.total_steps=7").config.total_steps == 7
    for argv, message in (
            (("--workdir", stage2_run, "--config.eval.nothing=1"),
             "--config.eval.nothing: the run's config"),
            (("--checkpoint", os.path.join(stage2_run, "final")), "--checkpoint needs --config"),
            (("--workdir", data_dir), "holds no config.json")):
        with pytest.raises(SystemExit) as e:
            resolved(*argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("eval.py: error:") and message in err, err


def test_the_export_carries_the_runs_tokenizers_and_predict_uses_it(stage2_run, data_dir,
                                                                      tmp_path, capsys):
    """A run's final/ holds the tokenizers it read its text with, as HF's save_pretrained lays
    them out: `python -m blip2_jax.predict --checkpoint final/` captions with nothing else."""
    from PIL import Image
    from blip2_jax import predict
    final = os.path.join(stage2_run, "final")
    config = _config("tiny_stage2", f"opt,{data_dir}")
    want = processing.load_tokenizer(run_config.tokenizer_paths(config)["llm"], "opt")
    got = processing.load_tokenizer(final, "opt")
    text = "Question: what colour is the big cube? Answer: red\n"
    assert got(text)["input_ids"] == want(text)["input_ids"] and len(got) == len(want)
    assert (got.bos_token_id, got.pad_token_id) == (want.bos_token_id, want.pad_token_id)
    image = str(tmp_path / "scene.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(image)
    assert predict.main(["--checkpoint", final, "--image", image, "--num-beams", "1",
                         "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(image + "\t")


def test_eval_py_on_a_workdir_writes_results_predictions_and_report(eval_py_out):
    out = eval_py_out
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["info"]["step"] == 4
    cap, vqa = results["metrics"]["caption_test"], results["metrics"]["vqa_test"]
    assert cap["images"] == TEST_IMAGES and "SPICE_unavailable" in cap
    preds = _jsonl(os.path.join(out, "predictions.jsonl"))
    by = {name: [p for p in preds if p["evaluator"] == name] for name in ("caption_test",
                                                                          "vqa_test")}
    assert len(by["caption_test"]) == TEST_IMAGES
    assert len(by["vqa_test"]) == vqa["questions"] >= TEST_IMAGES
    assert len({p["question_id"] for p in by["vqa_test"]}) == len(by["vqa_test"])

    # The metrics follow from the predictions written (no hidden state between them).
    again = caption_metrics.caption_metrics(
        {p["image_id"]: p["references"] for p in by["caption_test"]},
        {p["image_id"]: p["prediction"] for p in by["caption_test"]}, meteor=False)
    for k in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert cap[k] == pytest.approx(again[k], abs=1e-12), k
    acc = vqa_metrics.vqa_accuracy({p["question_id"]: p["answers"] for p in by["vqa_test"]},
                                   {p["question_id"]: p["prediction"] for p in by["vqa_test"]})
    assert vqa["overall"] == acc["overall"]

    # The report renders and every file it references exists beside it.
    page = _page(out)
    assert page.images, "the report shows no image"
    for src in page.images + [h for h in page.links if not h.startswith("#")]:
        assert not src.startswith(("http:", "https:", "/")), src
        assert os.path.isfile(os.path.join(out, src)), src
    text = " ".join(page.text)
    assert "caption_test" in text and "vqa_test" in text
    assert by["caption_test"][0]["prediction"] in text or not by["caption_test"][0]["prediction"]
    assert any(src.endswith("losses.png") for src in page.images)   # curves from metrics.jsonl


def test_captions_equal_the_model_caption_api(stage2_run, data_dir):
    """The evaluator's sharded, batched, padded generation gives what `Blip2.caption` gives
    image by image."""
    config = _config("tiny_stage2", f"opt,{data_dir}")
    evs, toks = run_config.evaluators(config)
    caption = next(ev for ev in evs if ev.kind == "caption")
    mesh = run_config.make_mesh(config)
    model = blip2_jax.load(os.path.join(stage2_run, "final"), dtype=None, tokenizer=toks.llm)
    result = caption.run(model, mesh=mesh, tokenizers=toks, progress=False)
    src = caption.source()
    for p in result.predictions:
        rec = src[p["position"]]
        size = model.config.vision.image_size
        pix = ops.image_processor("blip_image_eval", size, False)(ops.decode(rec["image"]), None)
        alone = model.caption(pix[None], num_beams=3, max_new_tokens=12)[0]
        assert p["prediction"] == alone, p["image_id"]


def test_retrieval_through_eval_py_equals_evaluate_split(data_dir, tmp_path):
    workdir = str(tmp_path / "stage1")
    config = _config("tiny_stage1", data_dir)
    loop.run(config, workdir)
    # The stage-1 export carries the Q-Former tokenizer the run used (qformer_tokenizer/).
    want = processing.load_tokenizer(run_config.tokenizer_paths(config)["qformer"], "qformer")
    got = processing.load_tokenizer(os.path.join(workdir, "final"), "qformer")
    assert os.path.isdir(os.path.join(workdir, "final", processing.QFORMER_SUBDIR))
    text = "a small red cube left of a big blue ball"
    assert got(text)["input_ids"] == want(text)["input_ids"]
    assert (got.bos_token, got.bos_token_id) == (want.bos_token, want.bos_token_id) == \
        ("[DEC]", len(want) - 1)
    out = str(tmp_path / "out")
    cfg = f"{os.path.join(ROOT, 'configs', 'tiny_stage1.py')}:{data_dir}"
    _run(_eval_cmd(cfg, "--checkpoint", os.path.join(workdir, "final"), "--output", out))
    with open(os.path.join(out, "results.json")) as f:
        got = json.load(f)["metrics"]["retrieval_test"]
    model = blip2_jax.load(os.path.join(workdir, "final"), dtype=None,
                           qformer_tokenizer=processing.load_tokenizer(
                               run_config.tokenizer_paths(config)["qformer"], "qformer"))
    want, score_i2t, _ = retrieval.evaluate_split(model, data_dir, "blip2_captions/synthetic",
                                                  "test", image_batch_size=4, k=16)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    preds = _jsonl(os.path.join(out, "predictions.jsonl"))
    images = [p for p in preds if p["query"] == "image"]
    texts = [p for p in preds if p["query"] == "text"]
    assert len(images) == TEST_IMAGES and len(texts) == got["texts"]
    # R@1 (i2t) recomputed from the written ranks.
    assert 100.0 * np.mean([p["best_gt_rank"] == 0 for p in images]) == pytest.approx(
        got["txt_r1"])
    assert 100.0 * np.mean([p["gt_rank"] == 0 for p in texts]) == pytest.approx(got["img_r1"])
    page = _page(out)
    for src in page.images:
        assert os.path.isfile(os.path.join(out, src)), src
    assert "✓" in " ".join(page.text) or got["txt_r5"] == 0


def test_workdir_without_final_evaluates_its_latest_checkpoint(data_dir, tmp_path):
    """A run stopped at step 2 of 4: eval.py restores the checkpoint (trainable params) and
    the frozen towers from their sources; the restored trainable params have the norm the run
    logged at that step."""
    workdir = str(tmp_path / "stopped")
    config = _config("tiny_stage1", data_dir, stop_after_steps=2)
    loop.run(config, workdir)
    assert not os.path.isdir(os.path.join(workdir, "final"))
    model, source = loop.load_trained(config, workdir)
    assert source["step"] == 2
    logged = {r["step"]: r for r in _jsonl(os.path.join(workdir, "metrics.jsonl"))}[2]
    from blip2_jax.convert.mapping import flatten
    flat = flatten(model.params)
    trainable = [v for k, v in flat.items() if not k.startswith("vision/")]
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in trainable)))
    assert norm == pytest.approx(logged["param_norm"], rel=1e-5)


def test_bad_evaluator_settings_are_refused_by_name(data_dir):
    with pytest.raises(eval_lib.EvalConfigError, match="'cap'.*unknown setting.*num_beam"):
        eval_lib.make("cap", dict(kind="caption", dataset="blip2_captions/synthetic",
                                  num_beam=5), data_dir=data_dir)
    with pytest.raises(eval_lib.EvalConfigError, match="kind must be one of"):
        eval_lib.make("x", dict(kind="captioning", dataset="blip2_captions/synthetic"),
                      data_dir=data_dir)
    with pytest.raises(eval_lib.EvalConfigError, match="reads a blip2_vqa"):
        eval_lib.make("v", dict(kind="vqa", dataset="blip2_captions/synthetic"),
                      data_dir=data_dir)
    with pytest.raises(eval_lib.EvalConfigError, match="no '\\{\\}'"):
        eval_lib.make("v", dict(kind="vqa", dataset="blip2_vqa/synthetic",
                                template="Question: Answer:"), data_dir=data_dir)
    ev = eval_lib.make("r", dict(kind="retrieval", dataset="blip2_captions/synthetic"),
                       data_dir=data_dir)
    model = blip2_jax.Blip2.random("tiny-opt")
    with pytest.raises(eval_lib.EvalConfigError, match="ITC and ITM heads"):
        ev.run(model, tokenizers=eval_lib.Tokenizers(qformer=object()))


def test_evaluators_without_a_dataset_read_the_training_set(data_dir):
    """A config names its dataset once (config.data.train): its evaluators follow it."""
    config = run_config.load("demo.py:stage2,/tmp/unused,shapes")
    assert config.data.train.name == "blip2_captions/shapes"
    assert run_config.training_dataset_name(config) == "shapes"
    evs = eval_lib.from_config(config.eval, data_dir=data_dir,
                               dataset_name=run_config.training_dataset_name(config))
    assert {ev.kind: ev.opts["dataset"] for ev in evs} == {
        "caption": "blip2_captions/shapes", "vqa": "blip2_vqa/shapes"}
    named = eval_lib.make("v", dict(kind="vqa", dataset="blip2_vqa/other"), data_dir=data_dir,
                          dataset_name="shapes")
    assert named.opts["dataset"] == "blip2_vqa/other"         # a named dataset stays
    with pytest.raises(eval_lib.EvalConfigError, match="'v': no dataset"):
        eval_lib.make("v", dict(kind="vqa"), data_dir=data_dir)


def test_paper_eval_config_builds_every_evaluator():
    spec = importlib.util.spec_from_file_location("eval_blip2", os.path.join(ROOT, "configs",
                                                                            "eval_blip2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(",".join(module.EVALUATORS))
    evs = eval_lib.from_config(c.eval, data_dir=c.data.data_dir)
    kinds = {ev.name: ev.kind for ev in evs}
    assert kinds == {"coco_caption": "caption", "nocaps": "caption",
                     "flickr_caption": "caption", "vqav2": "vqa",
                     "okvqa": "vqa", "gqa": "vqa", "coco_retrieval": "retrieval",
                     "flickr_retrieval": "retrieval"}
    coco = next(ev for ev in evs if ev.name == "coco_caption")
    assert coco._generation_kwargs() == dict(num_beams=5, max_new_tokens=30, min_new_tokens=8,
                                             length_penalty=1.0, repetition_penalty=1.0)
    with pytest.raises(ValueError, match="eval_blip2 takes"):
        module.get_config("coco")


def test_two_processes_evaluate_as_one(stage2_run, eval_py_out, data_dir, tmp_path):
    """eval.py under jax.distributed (2 processes × 4 CPU devices, each reading its rows of every
    batch) against 1 process × 8 devices (eval.py's run above, on the same final parameters):
    the same predictions and metrics. VQA prompts differ in length between the processes' rows,
    so both must agree on the prompt bucket."""
    port = runs.free_port()
    cfg = f"{os.path.join(ROOT, 'configs', 'tiny_stage2.py')}:opt,{data_dir}"
    final = os.path.join(stage2_run, "final")

    def launch(out, devices, extra=()):
        return runs.spawn(_eval_cmd(cfg, "--checkpoint", final, "--output", out, "--no_report",
                                    *extra), devices)

    two, one = str(tmp_path / "two"), eval_py_out
    procs = [launch(two, 4, runs.distributed_flags(port, i)) for i in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for name in ("results.json",):
        with open(os.path.join(one, name)) as f1, open(os.path.join(two, name)) as f2:
            assert json.load(f1)["metrics"] == json.load(f2)["metrics"]
    a, b = _jsonl(os.path.join(one, "predictions.jsonl")), _jsonl(os.path.join(two,
                                                                              "predictions.jsonl"))
    assert a == b and len(a) > TEST_IMAGES


def test_eval_py_bad_input_is_one_clear_line(data_dir, tmp_path):
    cfg = f"{os.path.join(ROOT, 'configs', 'tiny_stage2.py')}:opt,{data_dir}"
    proc = subprocess.run(_eval_cmd(cfg, "--workdir", str(tmp_path / "nothing")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "eval.py: error:" in proc.stderr and "neither a final/ export nor checkpoints/" in \
        proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(_eval_cmd(cfg, "--workdir", str(tmp_path),
                                    "--config.eval.evaluators.caption_test.kind=captioning"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'caption_test': kind must be one of" in proc.stderr
