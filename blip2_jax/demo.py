"""The whole BLIP-2 recipe at toy scale, on this machine, in minutes: `python -m blip2_jax.demo`.

1. build the synthetic dataset and its tokenizers (WORK/data);
2. make the unimodal models that BLIP-2 freezes: a tiny image encoder and a tiny OPT-style LM,
   each pre-trained briefly (WORK/unimodal; blip2_jax/train/unimodal.py);
3. stage 1 with train.py's loop (configs/demo.py:stage1 → WORK/stage1);
4. stage 2 (configs/demo.py:stage2 → WORK/stage2);
5. evaluate on the held-out test split (100 scenes never trained on):
   - image→text and text→image R@1 by ITC (chance 1/100);
   - captions generated for the test images, and the share that are right: that name every
     object with its size, colour, shape and position and nothing else, in any of the
     paraphrases the dataset uses (`synthetic.parse_caption`);
   - zero-shot VQA: stage 2 asked "Question: ... Answer:" about each test image. Its LM was
     pre-trained on text alone (descriptions followed by questions and answers) and stage 2
     trained on captions alone; the same LM asked without the image (the answer prior) and a
     uniform guess among the answers of each question's kind (chance) are its baselines;
   - the configs' evaluators (blip2_jax/eval): retrieval with ITM re-ranking, caption metrics,
     zero-shot VQA, each stage with an HTML report (WORK/eval/stage1|stage2/report.html).
Your own data (LAVIS JSON annotations with "train" and "test" splits; the test split one record
per image with all its captions, as a retrieval split):

    python -m blip2_jax.demo --annotations train=TRAIN.json test=TEST.json \
        [--vqa train=VQA_TRAIN.json test=VQA_TEST.json] --image-root DIR [--work out/demo_own]

builds blip2_captions/NAME (and blip2_vqa/NAME) and tokenizers fitted to its training split's text
(`python -m blip2_jax.data.build tokenizers`), pre-trains the unimodal towers on its training
images and text with objectives that need no labels (`unimodal.make_unimodal_from_dataset`),
and runs the same stages and evaluation: a caption is right when it equals one of the image's
references (lower-cased, punctuation dropped), and VQA's kinds are the questions' first two
words.
`--ablation` also trains stage 2 from a fresh Q-Former (no stage 1; configs/demo.py:stage2_fresh)
for the same steps and scores it the same way (the paper's Fig. 5); its report
(WORK/eval/stage2_fresh/report.html) plots both arms' curves together.
Every finished step is kept, so re-running continues where it stopped. Results are printed (the
training loop's messages too: feature cache, compiling, in-training evaluation) and written to
WORK/results.json (`retrieval_r1_i2t`, `retrieval_r1_t2i`, `itm_rerank_r1_i2t`,
`itm_rerank_r1_t2i`, `vqa_zero_shot`, `vqa_answer_prior`, `vqa_chance`: fractions;
`captions_right` of `captions_total`: counts; `vqa_by_kind`; `ablation` with --ablation;
`vqa_finetuned` with --vqa-finetune; `phase_seconds`, each phase's wall time over all the
invocations that made the run, and their sum `seconds`).
`--vqa-finetune` then fine-tunes stage 2 for VQA on the training split's questions
(configs/demo.py:vqa_ft: the paper's question-aware Q-Former and answer loss) and scores it on
the same held-out questions.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time

import numpy as np

import blip2_jax
from blip2_jax import processing, run_config
from blip2_jax.data import build as build_cli, builders, pipeline, synthetic
from blip2_jax.eval import runner
from blip2_jax.eval.retrieval import k_for_images
from blip2_jax.train import loop, unimodal

TEST_IMAGES = 100


def _demo_config(stage: str, work: str, dataset: str, **overrides):
    return run_config.load(f"demo.py:{stage},{work},{dataset}", overrides)


def retrieval(model, data_dir: str, dataset: str, qtok, image_size: int, max_length: int) -> dict:
    name = f"{builders.CAPTIONS}/{dataset}"
    truth = builders.retrieval_truth(data_dir, name, "test")
    ev = pipeline.Pipeline([pipeline.Source(name, "test")],
                           data_dir=data_dir, batch_size=100, train=False, image_size=image_size,
                           image_processor="blip_image_eval")
    by_index = {}
    for b in ev:
        for i, px, ok in zip(b["index"], b["image"], b["valid"]):
            if ok:
                by_index[int(i)] = px
    pixels = np.stack([by_index[i] for i in sorted(by_index)])
    ids, mask = processing.tokenize_prompts(qtok, [processing.pre_caption(t)
                                                   for t in truth.texts],
                                            kind="qformer", max_length=max_length,
                                            padding="max_length")
    sims = np.asarray(model.itc(pixels, ids, mask))                 # (images, texts)
    i2t = np.mean([truth.text_to_image[np.argmax(row)] == i for i, row in enumerate(sims)])
    t2i = np.mean(np.argmax(sims, axis=0) == truth.text_to_image)
    return {"i2t_r1": float(i2t), "t2i_r1": float(t2i), "images": len(pixels),
            "texts": len(truth.texts)}


def captions_right(result, scenes: bool = True) -> tuple[list[dict], list[bool]]:
    """The caption evaluator's predictions (`result`, an EvalResult: image_id, prediction,
    references) and whether each is right. Right: `scenes` (the synthetic set) when it
    describes the same scene as the references (`synthetic.parse_caption`: any paraphrase);
    else when it equals one of them (both as `processing.pre_caption` normalises them)."""
    predictions = sorted(result.predictions, key=lambda p: p["position"])
    right = []
    for p in predictions:
        refs = [processing.pre_caption(t) for t in p["references"]]
        if scenes:
            right.append(synthetic.parse_caption(p["prediction"])
                         == synthetic.parse_caption(refs[0]))
        else:
            right.append(processing.pre_caption(p["prediction"]) in refs)
    return predictions, right


def question_start(question: str) -> str:
    """A question's kind on data of one's own: its first two words ("what color", "how many",
    "is there"), as VQAv2's question types begin."""
    return " ".join(question.lower().split()[:2])


def vqa_breakdown(result, kind_of=synthetic.question_kind) -> dict:
    """Per question kind (`kind_of(question)`: count, color, ...): accuracy, the answer
    prior's, and chance (a uniform guess among the answers that kind has in the test split);
    `result` a VQA EvalResult."""
    answers, scores = collections.defaultdict(set), collections.defaultdict(list)
    for p in result.predictions:
        kind = kind_of(p["question"])
        answers[kind].update(p["answers"])
        scores[kind].append(p["score"])
    return {k: {"questions": len(scores[k]), "accuracy": float(np.mean(scores[k])),
                "chance": 1 / len(answers[k])} for k in sorted(scores)}


def vqa_chance(by_kind: dict) -> float:
    """Chance over all questions, from `vqa_breakdown`'s per-kind figures."""
    return float(sum(v["chance"] * v["questions"] for v in by_kind.values())
                 / sum(v["questions"] for v in by_kind.values()))


class _Elapsed(logging.Formatter):
    """The demo's line format (seconds since it started) for the training loop's messages."""

    def __init__(self, start: float):
        super().__init__()
        self.start = start

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.perf_counter() - self.start:6.0f} s]     {record.getMessage()}"


class _Phases:
    """The demo's numbered phases ("3/6 stage1 ...") and their wall times, kept in
    WORK/timings.json, so a run finished over several invocations reports all of their time: a
    training stage adds each invocation's seconds (it resumes), every other phase starts over
    and keeps its last."""

    def __init__(self, work: str, names: list[str], log):
        self.path = os.path.join(work, "timings.json")
        self.names, self.log = names, log
        self.seconds: dict[str, float] = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.seconds = json.load(f)
        self.current, self.t0, self.resumes = None, 0.0, False

    def start(self, name: str, what: str, resumes: bool = False) -> None:
        self.finish()
        self.log(f"{self.names.index(name) + 1}/{len(self.names)} {what}")
        self.current, self.t0, self.resumes = name, time.perf_counter(), resumes

    def finish(self) -> None:
        if self.current is None:
            return
        took = time.perf_counter() - self.t0
        before = self.seconds.get(self.current, 0.0) if self.resumes else 0.0
        self.seconds[self.current] = before + took
        self.current = None
        with open(self.path, "w") as f:
            json.dump(self.seconds, f, indent=2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m blip2_jax.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="out/demo", help="output directory (kept between runs)")
    ap.add_argument("--captions", type=int, default=100, help="test images to caption")
    ap.add_argument("--ablation", action="store_true",
                    help="also train stage 2 from a fresh Q-Former (no stage 1) and compare")
    ap.add_argument("--vqa-finetune", action="store_true",
                    help="also fine-tune stage 2 on the training split's questions (question-"
                         "aware Q-Former, answer loss; configs/demo.py:vqa_ft) and score it")
    ap.add_argument("--annotations", nargs="+", metavar="SPLIT=FILE",
                    help="your own caption data instead of the synthetic scenes: LAVIS JSON "
                         "files for the train and test splits (test: one record per image with "
                         "all its captions)")
    ap.add_argument("--vqa", nargs="+", metavar="SPLIT=FILE",
                    help="with --annotations: LAVIS VQA JSON for the train and test splits of "
                         "the same images (zero-shot VQA is then evaluated)")
    ap.add_argument("--image-root", help="with --annotations: the directory their image paths "
                                         "are relative to")
    ap.add_argument("--name", default="own",
                    help="with --annotations: the dataset's name (blip2_captions/NAME)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (tests): a small dataset and 12 steps of batch 8 per stage; "
                         "its figures mean nothing")
    args = ap.parse_args(argv)
    _check_own_data(ap, args)
    sizes = (dict(train=256, test=10, vision_steps=6, vision_pool=256, llm_steps=6,
                  unimodal_batch=16, steps=12, batch=8, answer_scenes=5)
             if args.quick else
             # The image encoder's 800 steps over 8000 scenes: it names a fresh object's shape
             # 96.5 % right (400 over 4000: 84.5 %), and the captions follow it.
             dict(train=5000, test=TEST_IMAGES, vision_steps=800, vision_pool=8000,
                  llm_steps=800, unimodal_batch=64, steps=None, batch=None, answer_scenes=200))
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)  # noqa
    # The training loop says what it does between the demo's own lines (train/loop.py's INFO).
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Elapsed(t_start))
    train_log = logging.getLogger("blip2_jax.train")
    saved = train_log.level, train_log.propagate
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    train_log.propagate = False
    try:
        return _run(args, sizes, work, log)
    finally:
        train_log.removeHandler(handler)
        train_log.level, train_log.propagate = saved


def _check_own_data(ap, args) -> None:
    """--annotations' companions are there, and it and --vqa name a train and a test split."""
    if not args.annotations:
        if args.vqa or args.image_root:
            ap.error("--vqa and --image-root go with --annotations (your own data)")
        return
    if not args.image_root:
        ap.error("--annotations needs --image-root DIR (where its image paths start)")
    for flag, items in (("--annotations", args.annotations), ("--vqa", args.vqa)):
        if not items:
            continue
        try:
            splits = build_cli.annotation_splits(items, "train")
        except ValueError as e:
            ap.error(str(e))
        if not {"train", "test"} <= set(splits):
            ap.error(f"{flag} needs a train and a test split (train=FILE test=FILE), got "
                     f"{sorted(splits)}")


def _build_data(args, sizes: dict, data_dir: str, dataset: str, phases: _Phases) -> None:
    """The dataset (blip2_captions/ and blip2_vqa/DATASET) and its tokenizers, built once."""
    if os.path.isdir(build_cli.tokenizer_dir(data_dir, dataset)):
        return
    if not args.annotations:
        phases.start("data", "building the synthetic dataset")
        commands = [["synthetic", "--data-dir", data_dir, "--train", str(sizes["train"]),
                     "--test", str(sizes["test"]), "--val", "0", "--overwrite"]]
    else:
        phases.start("data", f"building your dataset ({dataset}) and tokenizers fitted to its "
                             "training text")
        commands = [[kind, "--annotations", *files, "--image-root", args.image_root,
                     "--data-dir", data_dir, "--name", dataset, "--overwrite"]
                    for kind, files in (("captions", args.annotations), ("vqa", args.vqa))
                    if files]
        commands.append(["tokenizers", "--data-dir", data_dir, "--name", dataset])
    for command in commands:
        if build_cli.main(command) != 0:
            raise SystemExit(f"building the dataset failed: python -m blip2_jax.data.build "
                             f"{' '.join(command)}")


def _vocabulary_overrides(stage: str, qtok, opt_tok) -> dict:
    """`model_overrides` sizing the towers' vocabularies to the tokenizers fitted to a dataset
    of one's own (OPT's rounded up to a multiple of 8; stage 1 has no LM)."""
    out = {"model_overrides.qformer.vocab_size": len(qtok)}
    if stage != "stage1":
        out["model_overrides.llm.vocab_size"] = -(-len(opt_tok) // 8) * 8
    return out


def _run(args, sizes: dict, work: str, log) -> dict:
    data_dir = os.path.join(work, "data")
    dataset = args.name if args.annotations else "synthetic"
    scenes = not args.annotations          # the synthetic scenes: their captions parse
    kind_of = synthetic.question_kind if scenes else question_start
    stages = (["stage1", "stage2"] + (["stage2_fresh"] if args.ablation else [])
              + (["vqa_ft"] if args.vqa_finetune else []))
    phases = _Phases(work, ["data", "unimodal", *stages, "evaluation"], log)
    _build_data(args, sizes, data_dir, dataset, phases)
    tok_dir = build_cli.tokenizer_dir(data_dir, dataset)
    opt_tok = processing.load_tokenizer(os.path.join(tok_dir, "opt"), "opt")
    qtok = processing.load_tokenizer(os.path.join(tok_dir, "qformer"), "qformer")
    has_vqa = f"{builders.VQA}/{dataset}" in builders.available(data_dir)

    # The smoke run warms up in 5 steps, not the recipe's 20, so its losses move in its 12.
    # (ITG and the LM loss do; ITC stays at log(batch) for far longer than 12 steps.)
    quick = ({"total_steps": sizes["steps"], "batch_size": sizes["batch"],
              "checkpoint_every_steps": 6, "log_every_steps": 3, "optimizer.warmup_steps": 5}
             if args.quick else {})
    if args.vqa_finetune and not has_vqa:
        raise SystemExit("--vqa-finetune needs VQA annotations: give --vqa train=FILE test=FILE")
    test_images = len(builders.open_split(data_dir, f"{builders.CAPTIONS}/{dataset}", "test"))
    configs = {}
    for name in stages:
        c = _demo_config(name, work, dataset, **quick,
                         **({} if scenes else _vocabulary_overrides(name, qtok, opt_tok)))
        if not has_vqa:
            c.eval.evaluators = {k: v for k, v in c.eval.evaluators.items() if v.kind != "vqa"}
        for ev in c.eval.evaluators.values():
            if ev["kind"] == "caption":
                ev["limit"] = args.captions         # the test images captioned
            elif ev["kind"] == "retrieval":
                ev["k"] = k_for_images(test_images)     # ITM re-ranks a short list
        configs[name] = c
    s1, s2 = configs["stage1"], configs["stage2"]
    if args.quick:
        for c in configs.values():
            c.eval.every_steps = 0      # the reports below evaluate once
    stage2_cfg = run_config.model_config(s2)
    unimodal_dir = os.path.join(work, "unimodal")
    if not os.path.isdir(unimodal_dir):
        phases.start("unimodal", "pre-training the unimodal models BLIP-2 freezes")
        steps = dict(vision_steps=sizes["vision_steps"], vision_pool=sizes["vision_pool"],
                     llm_steps=sizes["llm_steps"], batch_size=sizes["unimodal_batch"], seed=0,
                     log=log)
        if scenes:
            stats = unimodal.make_unimodal(stage2_cfg, unimodal_dir, opt_tok,
                                           answer_scenes=sizes["answer_scenes"], **steps)
            log(f"    image encoder: {stats['vision_cell_accuracy']:.1%} of grid cells parsed "
                f"right; language model: {stats['llm_token_accuracy']:.1%} of next tokens "
                f"right, {stats['llm_answers_described']:.1%} of answers right after a text "
                f"description of the scene, {stats['llm_answers_prior']:.1%} without one")
        else:
            stats = unimodal.make_unimodal_from_dataset(stage2_cfg, unimodal_dir, opt_tok,
                                                        data_dir=data_dir, name=dataset, **steps)
            log(f"    image encoder: R² {stats['vision_masked_r2']:.2f} on blanked patches; "
                f"language model: {stats['llm_token_accuracy']:.1%} of next tokens right")
        with open(os.path.join(unimodal_dir, "pretraining.json"), "w") as f:
            json.dump(stats, f, indent=2)
    for name in stages:
        c = configs[name]
        if not os.path.isdir(os.path.join(work, name, "final")):
            what = {"stage2_fresh": "stage 2 from a fresh Q-Former (ablation)",
                    "vqa_ft": "VQA fine-tuning of stage 2 (question-aware Q-Former)"
                    }.get(name, name)
            phases.start(name, f"{what} ({c.total_steps} steps)", resumes=True)
            out = loop.run(c, os.path.join(work, name))
            log(f"    {name} done: " + ", ".join(f"{k} {out[k]:.3f}" for k in
                                                    ("loss", "itc", "itm", "itg", "lm")
                                                    if k in out))

    phases.start("evaluation", "evaluating on the held-out test split")
    stage1 = blip2_jax.load(os.path.join(work, "stage1", "final"), qformer_tokenizer=qtok)
    log("    retrieval by ITC (stage 1)")
    r = retrieval(stage1, data_dir, dataset, qtok, stage1.config.vision.image_size,
                  int(s1.text.max_length))
    stage2 = blip2_jax.load(os.path.join(work, "stage2", "final"), tokenizer=opt_tok)
    results = {"retrieval_r1_i2t": r["i2t_r1"], "retrieval_r1_t2i": r["t2i_r1"],
               "retrieval_chance": 1 / r["images"],
               "test_images": r["images"], "test_texts": r["texts"]}
    # The configs' evaluators (retrieval with ITM re-ranking; captioning and zero-shot VQA
    # metrics), with an HTML report per stage.
    results["evaluators"], reports, vqa = {}, [], {}

    def metrics(name):
        return os.path.join(work, name, "metrics.jsonl")

    def evaluate(name, c, model, evs=None, toks=None, curves=None):
        if evs is None:
            evs, toks = run_config.evaluators(c)
        log(f"    {name}'s evaluators: {', '.join(ev.name for ev in evs)}")
        out = os.path.join(work, "eval", name)
        if curves is None and os.path.isfile(metrics(name)):
            curves = metrics(name)
        done = runner.run(model, evs, mesh=run_config.make_mesh(c), tokenizers=toks,
                          out_dir=out, info={"model": os.path.join(work, name, "final"),
                                             "demo": name}, metrics_jsonl=curves)
        reports.append(os.path.join(out, "report.html"))
        return {d.name: d for d in done}

    for name, c, model in (("stage1", s1, stage1), ("stage2", s2, stage2)):
        done = evaluate(name, c, model)
        results["evaluators"].update({k: d.numeric_metrics() for k, d in done.items()})
        if "vqa_test" in done:
            vqa[name] = done["vqa_test"]
    ev = results["evaluators"]
    predictions, right = captions_right(done["caption_test"], scenes)     # stage 2's
    n = len(right)
    results.update(captions_right=int(np.sum(right)), captions_total=n,
                   # The first few right captions and the first few wrong ones.
                   examples=[{"image_id": predictions[i]["image_id"],
                              "generated": predictions[i]["prediction"], "right": right[i],
                              "reference": predictions[i]["references"][0]}
                             for i in ([i for i in range(n) if right[i]][:4]
                                       + [i for i in range(n) if not right[i]][:2])])
    # The evaluators report percentages; results.json keeps fractions, as R@1 above.
    results.update(itm_rerank_r1_i2t=ev["retrieval_test"]["txt_r1"] / 100,
                   itm_rerank_r1_t2i=ev["retrieval_test"]["img_r1"] / 100)
    if has_vqa:
        # The answer prior: the same LM and prompt, no image.
        evs, toks = run_config.evaluators(s2)
        vqa["prior"] = evaluate("answer_prior", s2, stage2.without_image(),
                                [ev for ev in evs if ev.kind == "vqa"], toks)["vqa_test"]
        by_kind = vqa_breakdown(vqa["stage2"], kind_of)
        prior = vqa_breakdown(vqa["prior"], kind_of)
        results.update(vqa_zero_shot=ev["vqa_test"]["overall"] / 100,
                       vqa_answer_prior=vqa["prior"].metrics["overall"] / 100,
                       vqa_chance=vqa_chance(by_kind),
                       vqa_by_kind={k: {**v, "answer_prior": prior[k]["accuracy"]}
                                    for k, v in by_kind.items()})
    if args.ablation:
        fresh = blip2_jax.load(os.path.join(work, "stage2_fresh", "final"), tokenizer=opt_tok)
        # Its report plots both arms' training curves and in-training evaluations together.
        done = evaluate("stage2_fresh", configs["stage2_fresh"], fresh, curves={
            "from the stage-1 Q-Former": metrics("stage2"),
            "from a fresh Q-Former": metrics("stage2_fresh")})
        fresh_ev = {k: d.numeric_metrics() for k, d in done.items()}
        fresh_right = captions_right(done["caption_test"], scenes)[1]
        results["ablation"] = {
            arm: {**({"vqa_zero_shot": e["vqa_test"]["overall"] / 100} if has_vqa else {}),
                  "captions_right": int(np.sum(ok)), "captions_total": len(ok),
                  "caption_cider": e["caption_test"]["CIDEr"]}
            for arm, e, ok in (("stage1_qformer", ev, right), ("fresh_qformer", fresh_ev,
                                                               fresh_right))}
    if args.vqa_finetune:
        tuned = blip2_jax.load(os.path.join(work, "vqa_ft", "final"), tokenizer=opt_tok,
                               qformer_tokenizer=qtok)
        done = evaluate("vqa_ft", configs["vqa_ft"], tuned)["vqa_test"]
        results["vqa_finetuned"] = done.metrics["overall"] / 100
        for k, v in vqa_breakdown(done, kind_of).items():
            results["vqa_by_kind"][k]["finetuned"] = v["accuracy"]
    results["reports"] = reports
    phases.finish()
    # Wall time of every phase, over all the invocations that made this run.
    results["phase_seconds"] = {k: round(v, 1) for k, v in phases.seconds.items()}
    results["seconds"] = round(sum(phases.seconds.values()), 1)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _print(results, ev, log)
    return results


def _print(results: dict, ev: dict, log) -> None:
    log(f"held-out retrieval R@1 by ITC: image→text {results['retrieval_r1_i2t']:.1%}, "
        f"text→image {results['retrieval_r1_t2i']:.1%} (chance {results['retrieval_chance']:.1%});"
        f" with ITM re-ranking {results['itm_rerank_r1_i2t']:.1%} / "
        f"{results['itm_rerank_r1_t2i']:.1%}")
    log(f"captions fully right: {results['captions_right']} of {results['captions_total']} "
        f"held-out images (CIDEr {ev['caption_test']['CIDEr']:.3f}, BLEU-4 "
        f"{ev['caption_test']['Bleu_4']:.3f}); e.g.")
    for e in results["examples"]:
        log(f"    {'✓' if e['right'] else '✗'} {e['generated']!r}   (reference: "
            f"{e['reference']!r})")
    if "vqa_zero_shot" in results:
        tuned = "vqa_finetuned" in results
        log(f"zero-shot VQA accuracy {results['vqa_zero_shot']:.1%}; the same LM without the "
            f"image {results['vqa_answer_prior']:.1%}; chance {results['vqa_chance']:.1%}"
            + (f"; after the VQA fine-tune {results['vqa_finetuned']:.1%}" if tuned else "")
            + ". By kind (accuracy / without the image / chance"
            + (" / fine-tuned):" if tuned else "):"))
        for kind, v in results["vqa_by_kind"].items():
            log(f"    {kind:12s} {v['accuracy']:6.1%} / {v['answer_prior']:6.1%} / "
                f"{v['chance']:6.1%}" + (f" / {v['finetuned']:6.1%}" if tuned else "")
                + f"   ({v['questions']} questions)")
    if "ablation" in results:
        a = results["ablation"]
        vqa_line = (f"zero-shot VQA {a['stage1_qformer']['vqa_zero_shot']:.1%} vs "
                    f"{a['fresh_qformer']['vqa_zero_shot']:.1%}; "
                    if "vqa_zero_shot" in a["fresh_qformer"] else "")
        log("stage 2 from the stage-1 Q-Former vs from a fresh one (same steps): " + vqa_line
            + f"captions right {a['stage1_qformer']['captions_right']} vs "
            f"{a['fresh_qformer']['captions_right']} of {a['fresh_qformer']['captions_total']}")
    for r in results["reports"]:
        log(f"report: {r}")


if __name__ == "__main__":
    main()
