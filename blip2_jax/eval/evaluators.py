"""Evaluators named in a config: captioning, VQA and retrieval over our tfds datasets.

    evaluators = from_config(config.eval, data_dir=config.data.data_dir)
    result = evaluators[0].run(model, mesh=mesh, tokenizers=tokenizers)   # an EvalResult

`config.eval.evaluators` maps a name to one evaluator's settings; `kind` picks it:

    caption:   dataset ("blip2_captions/NAME"), split, prompt (""), num_beams (5),
               max_new_tokens (30), min_new_tokens (1), length_penalty (1.0),
               repetition_penalty (1.0), meteor (True), tokenize ("python" | "java")
    vqa:       dataset ("blip2_vqa/NAME"), split, template ("Question: {} Short answer:"),
               num_beams (5), max_new_tokens (10), min_new_tokens (1), length_penalty (-1.0),
               metric ("vqa": official VQA accuracy | "gqa": exact match), rules ("lavis" |
               "vqa-master"), lemmatize (False; True = spaCy en_core_web_sm, as LAVIS OK-VQA)
    retrieval: dataset ("blip2_captions/NAME", one record per image with all its captions),
               split, k (128), itm_batch_size (0: `retrieval.itm_scores`'s default),
               max_length (35)
    every kind: dataset (default: the training set's NAME, `from_config(dataset_name=...)`),
               limit (0 = all; else the first `limit` records of the split in stored order),
               image_size (the model's), image_processor ("blip_image_eval"), max_words (50),
               data_dir (default: the config's data_dir), batch_size (default: config.eval's)

Generation evaluators read the split with an evaluation `pipeline.Pipeline` (one pass, last batch
padded and masked; each process reads its own rows of every global batch), generate on the mesh
(`ShardedBlip2`: the batch is sharded over the data axes) and gather the generated tokens and the
rows' record positions to every process; the texts are then decoded and scored on the host.
Captioning scores one prediction per `image_id` (the first record of an image; its references
are the captions of all its records), as COCO's evaluation does.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from blip2_jax import processing, sharding as sharding_lib
from blip2_jax.data import builders, pipeline
from blip2_jax.eval import retrieval
from blip2_jax.metrics import caption as caption_metrics, vqa as vqa_metrics
from blip2_jax import api

log = logging.getLogger(__name__)

KINDS = ("caption", "vqa", "retrieval")
CAPTION_DEFAULTS = dict(prompt="", num_beams=5, max_new_tokens=30, min_new_tokens=1,
                        length_penalty=1.0, repetition_penalty=1.0, meteor=True,
                        tokenize="python")
VQA_DEFAULTS = dict(template="Question: {} Short answer:", num_beams=5, max_new_tokens=10,
                    min_new_tokens=1, length_penalty=-1.0, repetition_penalty=1.0, metric="vqa",
                    rules="lavis", lemmatize=False)
RETRIEVAL_DEFAULTS = dict(k=128, itm_batch_size=0, max_length=35)
COMMON_DEFAULTS = dict(dataset=None, split="test", limit=0, image_size=0,
                       image_processor="blip_image_eval", max_words=50, data_dir=None,
                       batch_size=0)
_DEFAULTS = {"caption": CAPTION_DEFAULTS, "vqa": VQA_DEFAULTS, "retrieval": RETRIEVAL_DEFAULTS}
_DATASET_KIND = {"caption": builders.CAPTIONS, "vqa": builders.VQA,
                 "retrieval": builders.CAPTIONS}


class EvalConfigError(ValueError):
    """An evaluator's settings are wrong (the message names the evaluator and the key)."""


@dataclasses.dataclass
class EvalResult:
    """What one evaluator produced: `metrics` (numbers, or strings saying why a metric is
    missing), `predictions` (one JSON-able dict per sample, for predictions.jsonl) and
    `examples` (the report's data; images as encoded bytes)."""
    name: str
    kind: str
    metrics: dict
    predictions: list
    examples: Any

    def numeric_metrics(self) -> dict:
        return {k: float(v) for k, v in self.metrics.items()
                if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}


@dataclasses.dataclass
class Tokenizers:
    """The text side an evaluator needs: the LLM's tokenizer (caption, VQA), the Q-Former's
    (retrieval). Either may be None when no evaluator needs it."""
    llm: Any = None
    qformer: Any = None


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def _plain(x):
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def from_config(eval_cfg, *, data_dir: Optional[str] = None, batch_size: Optional[int] = None,
                examples: Optional[int] = None,
                dataset_name: Optional[str] = None) -> list["Evaluator"]:
    """The evaluators of `config.eval` (its `evaluators` dict, in order). `data_dir`: default
    dataset directory; `batch_size`: default global batch (else config.eval.batch_size);
    `dataset_name`: the NAME an evaluator without a `dataset` reads (`blip2_captions/NAME` or
    `blip2_vqa/NAME` by its kind): the run's training set (`run_config.evaluators`)."""
    eval_cfg = _plain(eval_cfg or {})
    named = _plain(eval_cfg.get("evaluators") or {})
    if not named:
        raise EvalConfigError("config.eval.evaluators names no evaluator")
    bs = int(batch_size or eval_cfg.get("batch_size") or 32)
    n_examples = int(examples if examples is not None else eval_cfg.get("report_examples", 16))
    return [make(name, _plain(spec), data_dir=data_dir, batch_size=bs, examples=n_examples,
                 dataset_name=dataset_name)
            for name, spec in named.items()]


def make(name: str, spec: Mapping, *, data_dir: Optional[str] = None, batch_size: int = 32,
         examples: int = 16, dataset_name: Optional[str] = None) -> "Evaluator":
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise EvalConfigError(f"evaluator {name!r}: kind must be one of {KINDS}, got {kind!r}")
    allowed = {**COMMON_DEFAULTS, **_DEFAULTS[kind]}
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise EvalConfigError(f"evaluator {name!r} ({kind}): unknown setting(s) {unknown}; "
                              f"known: {sorted(allowed)}")
    opts = {**allowed, **spec}
    if not opts["dataset"] and dataset_name:
        opts["dataset"] = f"{_DATASET_KIND[kind]}/{dataset_name}"
    if not opts["dataset"]:
        raise EvalConfigError(f"evaluator {name!r}: no dataset (e.g. "
                              f"'{_DATASET_KIND[kind]}/NAME')")
    if builders.kind_of(opts["dataset"]) != _DATASET_KIND[kind]:
        raise EvalConfigError(f"evaluator {name!r}: a {kind} evaluator reads a "
                              f"{_DATASET_KIND[kind]}/... dataset, got {opts['dataset']!r}")
    opts["data_dir"] = opts["data_dir"] or data_dir
    if not opts["data_dir"]:
        raise EvalConfigError(f"evaluator {name!r}: no data_dir (set config.data.data_dir or "
                              "the evaluator's data_dir)")
    opts["batch_size"] = int(opts["batch_size"] or batch_size)
    if kind == "vqa":
        if opts["metric"] not in ("vqa", "gqa"):
            raise EvalConfigError(f"evaluator {name!r}: metric must be 'vqa' or 'gqa', got "
                                  f"{opts['metric']!r}")
        if "{}" not in (opts["template"] or "{}"):
            raise EvalConfigError(f"evaluator {name!r}: template {opts['template']!r} has no "
                                  "'{}' for the question")
    cls = {"caption": CaptionEvaluator, "vqa": VqaEvaluator, "retrieval": RetrievalEvaluator}
    return cls[kind](name, opts, examples)


# ----------------------------------------------------------------------------------------------
# Evaluators
# ----------------------------------------------------------------------------------------------
class Evaluator:
    kind = ""

    def __init__(self, name: str, opts: dict, examples: int = 16):
        self.name, self.opts, self.examples = name, opts, int(examples)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, {self.opts['dataset']}:{self.opts['split']})"

    def needs(self) -> tuple[str, str]:
        """(surface, tokenizer) the model must have: e.g. ("generate", "llm")."""
        raise NotImplementedError

    def run(self, model, *, mesh=None, tokenizers: Tokenizers = Tokenizers(),
            progress: bool = True) -> EvalResult:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def source(self):
        return builders.open_split(self.opts["data_dir"], self.opts["dataset"], self.opts["split"])

    def _pipeline(self, model, mesh, question_template: str = "{}") -> pipeline.Pipeline:
        bs = _round_to_mesh(self.opts["batch_size"], mesh)
        return pipeline.Pipeline(
            [pipeline.Source(self.opts["dataset"], self.opts["split"])],
            data_dir=self.opts["data_dir"], batch_size=bs, train=False,
            image_size=int(self.opts["image_size"] or model.config.vision.image_size),
            image_processor=self.opts["image_processor"], max_words=int(self.opts["max_words"]),
            question_template=question_template, process_index=jax.process_index(),
            process_count=jax.process_count(), num_threads=4, prefetch=8)

    def _batches(self, pipe: pipeline.Pipeline, progress: bool,
                 limited: bool = True) -> Iterable[dict]:
        """The split's batches, stopping after `limit` records when `limited` (the same number
        of batches on every process)."""
        limit = int(self.opts["limit"] or 0) if limited else 0
        n = len(pipe) if not limit else min(len(pipe), -(-limit // pipe.batch_size))
        bar = _progress(n, self.name) if progress else None
        try:
            for i, batch in enumerate(pipe):
                if i == n:
                    break
                yield batch
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def _check_model(self, model, tokenizers: Tokenizers):
        surface, tok = self.needs()
        cfg = model.config
        if surface == "generate" and cfg.llm is None:
            raise EvalConfigError(f"evaluator {self.name!r} ({self.kind}) needs a model with a "
                                  "language model (a stage-2 model); this one is stage-1 only")
        if surface == "retrieval" and not (cfg.itc and cfg.itm):
            raise EvalConfigError(f"evaluator {self.name!r} (retrieval) needs a model with ITC "
                                  "and ITM heads (a stage-1 model)")
        if getattr(tokenizers, tok) is None:
            raise EvalConfigError(f"evaluator {self.name!r} needs the {tok} tokenizer "
                                  f"(config.text.{'llm_tokenizer' if tok == 'llm' else 'qformer_tokenizer'}"
                                  " or the checkpoint's own)")


class GenerationEvaluator(Evaluator):
    """What captioning and VQA share: generate from every valid record's image and prompt
    (`prompts`), decode, then `score` the (record positions, texts)."""

    def needs(self):
        return "generate", "llm"

    def question_template(self) -> str:
        return "{}"

    def prompts(self, batch: dict) -> list[str]:
        raise NotImplementedError

    def score(self, positions: list[int], texts: list[str]) -> EvalResult:
        raise NotImplementedError

    def run(self, model, *, mesh=None, tokenizers=Tokenizers(), progress=True) -> EvalResult:
        self._check_model(model, tokenizers)
        return self.score(*self._generated_rows(model, tokenizers, mesh, progress))

    def _generate(self, model, tokenizers: Tokenizers, prompts: list[str], pixels,
                  generate_kwargs: dict) -> np.ndarray:
        """Generated token rows of the GLOBAL batch (every process's rows, in process order).
        A question-aware (instruction-aware) Q-Former also reads each prompt, BERT-tokenized,
        as `Blip2.answer` / `caption` give it and VQA fine-tuning trains it."""
        tok = tokenizers.llm
        cfg = model.config
        ids = mask = None
        if any(prompts):
            ids, mask = processing.tokenize_prompts(tok, prompts, kind=cfg.llm_kind)
        if cfg.qformer_text_input:
            q_ids, q_mask = processing.tokenize_prompts(
                self._qformer_tokenizer(model, tokenizers), prompts, kind="qformer",
                max_length=cfg.qformer.max_position_embeddings)
            generate_kwargs = dict(generate_kwargs, qformer_input_ids=q_ids,
                                   qformer_attention_mask=q_mask)
        return model.generate(pixels, ids, mask, **generate_kwargs)

    def _qformer_tokenizer(self, model, tokenizers: Tokenizers):
        """The BERT tokenizer of a question-aware Q-Former: config.text's, else the
        checkpoint's own."""
        if tokenizers.qformer is not None:
            return tokenizers.qformer
        try:
            return model.qformer_tokenizer
        except (ValueError, FileNotFoundError) as e:
            raise EvalConfigError(f"evaluator {self.name!r}: the model's Q-Former reads the "
                                  "prompt (qformer_text_input), which needs its tokenizer: set "
                                  f"config.text.qformer_tokenizer ({e})") from None

    def _decode(self, model, tokenizers: Tokenizers, tokens: np.ndarray) -> list[str]:
        llm = model.config.llm
        pad = llm.pad_token_id if llm.pad_token_id is not None else llm.eos_token_id
        return processing.decode(tokenizers.llm, tokens, eos_token_id=llm.eos_token_id,
                                 pad_token_id=pad)

    def _generation_kwargs(self) -> dict:
        o = self.opts
        return dict(num_beams=int(o["num_beams"]), max_new_tokens=int(o["max_new_tokens"]),
                    min_new_tokens=int(o["min_new_tokens"]),
                    length_penalty=float(o["length_penalty"]),
                    repetition_penalty=float(o["repetition_penalty"]))

    def _generated_rows(self, model, tokenizers, mesh, progress):
        """(positions, texts) of every valid row of the split (all processes' rows)."""
        model = _on_mesh(model, mesh)
        pipe = self._pipeline(model, mesh, self.question_template())
        kwargs = self._generation_kwargs()
        positions, texts = [], []
        for batch in self._batches(pipe, progress):
            tokens = self._generate(model, tokenizers, self.prompts(batch), batch["image"],
                                    kwargs)
            valid = sharding_lib.gather_rows(batch["valid"])
            pos = sharding_lib.gather_rows(batch["position"])
            decoded = self._decode(model, tokenizers, tokens)
            positions += [int(p) for p, ok in zip(pos, valid) if ok]
            texts += [t for t, ok in zip(decoded, valid) if ok]
        limit = int(self.opts["limit"] or 0)
        if limit:
            positions, texts = positions[:limit], texts[:limit]
        return positions, texts


class CaptionEvaluator(GenerationEvaluator):
    """Captioning: beam search from `prompt` (the prompt is not part of the caption), scored
    with `metrics.caption.caption_metrics` (BLEU-1..4, METEOR when Java exists, ROUGE-L,
    CIDEr-D; SPICE reported unavailable)."""
    kind = "caption"

    def prompts(self, batch):
        return [self.opts["prompt"] or ""] * len(batch["image"])

    def score(self, positions, generated):
        src = self.source()
        refs: dict[str, list[str]] = {}
        for r in range(len(src)):            # references: every record of every scored image
            rec = src[r]
            refs.setdefault(_text(rec["image_id"]), []).extend(
                _text(c) for c in rec["captions"])
        preds, first = {}, {}
        for p, g in zip(positions, generated):
            image_id = _text(src[p]["image_id"])
            if image_id not in preds:
                preds[image_id], first[image_id] = g, p
        references = {k: refs[k] for k in preds}
        metrics = caption_metrics.caption_metrics(references, preds,
                                                  tokenize=self.opts["tokenize"],
                                                  meteor=bool(self.opts["meteor"]))
        metrics["images"] = len(preds)
        predictions = [{"evaluator": self.name, "image_id": k, "position": first[k],
                        "prediction": preds[k], "references": references[k]} for k in preds]
        examples = [{"id": k, "image": bytes(src[first[k]]["image"]), "prediction": preds[k],
                     "references": references[k]} for k in list(preds)[:self.examples]]
        return EvalResult(self.name, self.kind, metrics, predictions, examples)


class VqaEvaluator(GenerationEvaluator):
    """VQA: beam search from `template.format(question)` (the question cleaned as LAVIS's
    `blip_question`), scored with the official VQA accuracy or GQA exact match."""
    kind = "vqa"

    def question_template(self):
        return self.opts["template"] or "{}"

    def prompts(self, batch):
        return list(batch["text"])

    def score(self, positions, answers):
        src = self.source()
        records = {p: src[p] for p in positions}
        qid = {p: _text(records[p]["question_id"]) for p in positions}
        preds = {qid[p]: a for p, a in zip(positions, answers)}
        truth = {qid[p]: [_text(a) for a in records[p]["answers"]] for p in positions}
        o = self.opts
        if o["metric"] == "gqa":
            metrics = vqa_metrics.exact_match({q: a[0] for q, a in truth.items()}, preds,
                                              per_question=True)
        else:
            lemmatize = vqa_metrics.spacy_lemmatizer() if o["lemmatize"] else None
            metrics = vqa_metrics.vqa_accuracy(truth, preds, rules=o["rules"],
                                               lemmatize=lemmatize, per_question=True)
        per = {q: v / 100.0 for q, v in metrics.pop("per_question").items()}
        metrics = _flat(metrics)
        metrics["questions"] = len(preds)
        predictions = [{"evaluator": self.name, "question_id": qid[p], "position": p,
                        "image_id": _text(records[p]["image_id"]),
                        "question": _text(records[p]["question"]), "prediction": preds[qid[p]],
                        "answers": truth[qid[p]], "score": per[qid[p]]} for p in positions]
        examples = [{"id": d["question_id"], "image": bytes(records[d["position"]]["image"]),
                     "question": d["question"], "prediction": d["prediction"],
                     "answers": d["answers"], "score": d["score"]}
                    for d in predictions[:self.examples]]
        return EvalResult(self.name, self.kind, metrics, predictions, examples)


class RetrievalEvaluator(Evaluator):
    """Image-text retrieval with ITM re-ranking (`eval.retrieval`, LAVIS `compute_sim_matrix`):
    R@1/5/10 both ways on the split's images (in `index` order) and all their captions."""
    kind = "retrieval"

    def needs(self):
        return "retrieval", "qformer"

    def run(self, model, *, mesh=None, tokenizers=Tokenizers(), progress=True) -> EvalResult:
        self._check_model(model, tokenizers)
        if jax.process_count() > 1:
            raise NotImplementedError(
                f"evaluator {self.name!r}: retrieval evaluation runs in one process (it holds "
                "every feature and both score matrices on the host); run eval.py on one host")
        o = self.opts
        truth = builders.retrieval_truth(o["data_dir"], o["dataset"], o["split"])
        model = _on_mesh(model, mesh)
        pipe = self._pipeline(model, mesh)
        limit = int(o["limit"] or 0)
        keep_images = len(truth.image_ids) if not limit else min(limit, len(truth.image_ids))
        # A limit keeps the first images in `index` order (the truth's order) and their texts.
        batches = ({"image": b["image"], "index": b["index"],
                    "valid": b["valid"] & (b["index"] < keep_images)}
                   for b in self._batches(pipe, progress, limited=False))
        image_to_texts = truth.image_to_texts[:keep_images]
        n_texts = sum(len(t) for t in image_to_texts)
        texts = truth.texts[:n_texts]
        metrics, score_i2t, score_t2i = retrieval.evaluate(
            model, batches, texts, truth.text_to_image[:n_texts], image_to_texts,
            k=int(o["k"]), batch_size=int(o["itm_batch_size"]) or None,
            image_batch_size=pipe.batch_size, tokenizer=tokenizers.qformer,
            max_length=int(o["max_length"]))
        metrics = dict(metrics, images=keep_images, texts=n_texts)
        # LAVIS's order and ranks (the metrics' own), for the predictions and the report.
        top_t = retrieval.ranked(score_i2t)[:, :5]
        top_i = retrieval.ranked(score_t2i)[:, :5]
        rank_i2t, rank_t2i = retrieval.ranks(score_i2t, score_t2i,
                                             truth.text_to_image[:n_texts], image_to_texts)
        ids = truth.image_ids
        predictions = []
        for i in range(keep_images):
            predictions.append({"evaluator": self.name, "query": "image", "image_id": ids[i],
                                "top5_texts": [texts[t] for t in top_t[i]],
                                "top5_text_indices": [int(t) for t in top_t[i]],
                                "gt_text_indices": sorted(image_to_texts[i]),
                                "best_gt_rank": (int(rank_i2t[i]) if image_to_texts[i]
                                                 else None)})
        for t in range(n_texts):
            gt = int(truth.text_to_image[t])
            predictions.append({"evaluator": self.name, "query": "text", "text_index": t,
                                "text": texts[t], "top5_image_ids": [ids[i] for i in top_i[t]],
                                "gt_image_id": ids[gt], "gt_rank": int(rank_t2i[t])})
        src = self.source()
        image = lambda i: bytes(src[int(truth.records[i])]["image"])     # noqa: E731
        n = min(self.examples, keep_images)
        i2t = [{"id": ids[i], "image": image(i),
                "top": [{"text": texts[t], "score": float(score_i2t[i, t]),
                         "correct": int(t) in set(image_to_texts[i])} for t in top_t[i]]}
               for i in range(n)]
        # One text per image for the text→image examples: its first caption.
        t2i = [{"id": str(t), "text": texts[t],
                "top": [{"id": ids[i], "image": image(i), "score": float(score_t2i[t, i]),
                         "correct": int(i) == int(truth.text_to_image[t])} for i in top_i[t]]}
               for t in [image_to_texts[i][0] for i in range(n) if image_to_texts[i]]]
        return EvalResult(self.name, self.kind, metrics, predictions, {"i2t": i2t, "t2i": t2i})


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _flat(metrics: Mapping, prefix: str = "") -> dict:
    """Nested metric dicts (per answer type...) → one level, keys joined with '/'."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _round_to_mesh(batch_size: int, mesh) -> int:
    """`batch_size` rounded up so that it splits over the mesh's batch axes and the processes."""

    n = math.lcm(sharding_lib.batch_shards(mesh), jax.process_count())
    return -(-int(batch_size) // n) * n


def _on_mesh(model, mesh):
    if mesh is None or isinstance(model, api.ShardedBlip2):
        return model
    return model.shard(mesh)


def _progress(total: int, name: str):
    if jax.process_index() != 0:
        return None
    return tqdm(total=total, desc=f"eval {name}", dynamic_ncols=True, mininterval=1.0,
                leave=False)
