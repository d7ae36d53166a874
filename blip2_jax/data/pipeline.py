"""grain input pipelines over our tfds datasets: deterministic, sharded per process, resumable.

    it = pipeline.from_config(config.data, batch_size=256, seed=0)    # this process's iterator
    batch = next(it)          # {"image": (b, S, S, 3) f32, "qformer_ids": (b, L) i32, ...}
    state = it.get_state()    # JSON-able; it.set_state(state) continues with the next batch

Order of operations (all lazy, per global example position `i`):
  source records ─ shuffle(seed, reshuffled every epoch) ─ repeat ─┐
  (one chain per dataset)                                          ├ mix(weights) ─ process(i)
  ─ this process's rows ─ read threads / worker processes ─ drop bad records
  ─ batch(global_batch / process_count)
`process(i)` draws its randomness (crop, flip, caption choice, answer, instruction template) from
(seed, i), so an example's content depends neither on the number of workers nor on the number of
hosts. Mixture weights are the sources' `weight`s, or ∝ √(the split's records) for a source that
gives none (InstructBLIP's balanced sampling, `balanced_weights`).

Instruction tuning (`templates`, InstructBLIP): sources of different kinds (captions and VQA) mix
in one run, and every example becomes an instruction → response pair. Each kind has a pool of
instruction templates ({"caption": [...], "vqa": [...]}); one template per example is drawn from
(seed, i) (`draw_template`). A caption example's instruction is its template ("A short image
caption:") and its response the caption drawn; a VQA example's instruction is its template filled
with the question ("Question: {} Short answer:") and its response the answer drawn. Every row then
has the same fields: `text` (the instruction), `answer` (the response), `answers` (all the
references: captions or answers), `question_id` ("" for captions) and `template` (the drawn
template's index in its pool). Process p of P takes
rows [p·b, (p+1)·b) of every global batch (b = B / P): `jax.make_array_from_process_local_data`
(`sharding.shard_batch`) then assembles exactly the batch one process would have read. The element-level
work (decode, augment, tokenize) runs in grain's read threads, or in `num_workers` processes.

Training batches (`train=True`): infinite, shuffled, full batches. Evaluation (`train=False`):
one pass in stored order over one dataset, the last batch padded (`valid` False on padding rows)
so every process runs the same number of batches.

A record whose image does not decode is dropped, counted and logged (`skipped(it)` gives the
count and the first few keys; both are part of the checkpointed state).

Batch fields: those a training step takes, as `data.batch` defines them (`image` or, with a
frozen-feature cache, `vision_features`; `valid`; the indices; `NAME_ids` / `NAME_mask` per
tokenizer spec NAME, and `NAME_targets` for one with a `target_field`), and the host-only ones:
- `text`: the caption, or the question for VQA; LAVIS-cleaned, prompt applied. With
  `prefix_lm` it is the caption's prefix, and `target` holds the suffix; captions also have
  `prompt` (config.data.prompt) and `caption` (the cleaned caption) apart;
- VQA also has `answer` (one of the answers, drawn by frequency) and `answers` (all of them, as
  an object array);
- instruction tuning (`templates`): `text` is the instruction, `answer` the response (caption or
  answer), `answers` the references, `question_id` ("" for captions) and `template` int32;
- `image_id` (and `question_id`) strings; evaluation batches also have `position` int32, the
  record's position in the split's data source (`builders.open_split(...)[position]`).
`batch.numeric(batch)` keeps the arrays a device can take.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Mapping, Optional, Sequence

import grain
import jax
import numpy as np
from absl import flags

from blip2_jax import processing
from blip2_jax.data import batch as batch_lib, builders, features, ops

log = logging.getLogger(__name__)

_SKIP = "__skipped__"
_LOAD_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset of a mixture: "blip2_captions/NAME" or "blip2_vqa/NAME", a split, a weight
    (None: √(the split's records), `balanced_weights`)."""
    name: str
    split: str = "train"
    weight: Optional[float] = None
    image_processor: Optional[str] = None   # default: the pipeline's


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """Tokenize `field` ("text", "answer", "prompt" ...) with a model tokenizer to a fixed length.

    kind: "qformer" (BERT `[CLS] t [SEP]`), "opt" (`</s> t`), "llama" (`<s> t`) or "t5"
    (`t </s>`); `tokenizer` is a checkpoint directory (see `processing.load_tokenizer`) or a
    tokenizer object. `suffix` is appended before tokenizing (LAVIS's OPT captions end with
    "\\n"). Text longer than `max_length` is cut on the right (the special tokens stay).
    target_field (decoder-only kinds): the row is `field` then `target_field` + `suffix` (+ EOS
    for LLaMA) in one sequence, `processing.tokenize_prompt_answer`, and `NAME_targets` marks
    the target_field's tokens, the only ones the loss predicts (VQA: prompt, then answer)."""
    name: str
    tokenizer: Any
    kind: str
    max_length: int
    field: str = "text"
    suffix: str = ""
    padding_side: str = "right"
    target_field: str = ""


# Instruction-template pools by task (config.data.templates): the dataset kind each one is for.
TASKS = {"caption": builders.CAPTIONS, "vqa": builders.VQA}


def balanced_weights(sizes: Sequence[int]) -> list[float]:
    """InstructBLIP's balanced sampling: the weight of a dataset of S records is √S, so it is
    drawn with probability √S_d / Σ √S_i: small datasets are not drowned by large ones, nor
    repeated as often as a uniform draw over datasets would. A weight given beside these is on
    the same scale (InstructBLIP's manual tweaks: 2 * √S raises a dataset)."""
    return [float(np.sqrt(n)) for n in sizes]


def check_templates(templates: Mapping[str, Sequence[str]]) -> dict[str, tuple]:
    """{kind: pool} of config.data.templates ({"caption": [...], "vqa": [...]}), validated: a
    VQA template holds exactly one `{}` for the question (`processing.fill_template`'s
    ValueError), a caption template none (there is nothing to fill in), no pool is empty."""
    pools = {}
    for task, pool in dict(templates).items():
        if task not in TASKS:
            raise ValueError(f"templates for unknown task {task!r} (known: {sorted(TASKS)})")
        pool = tuple(str(t) for t in pool)
        if not pool:
            raise ValueError(f"the {task} template pool is empty")
        for t in pool:
            if task == "vqa":
                processing.fill_template(t, "")
            elif "{" in t or "}" in t:
                raise ValueError(f"the caption template {t!r} has a {{}}: a caption instruction "
                                 "has no question to fill in")
        pools[TASKS[task]] = pool
    return pools


def draw_template(pool: Sequence[str], rng: np.random.Generator) -> int:
    """The index of an example's instruction template: uniform over its task's pool, from the
    example's rng, i.e. from (seed, the example's global position) only."""
    return int(rng.integers(len(pool)))


def _object(x) -> np.ndarray:
    a = np.empty((), object)
    a[()] = x
    return a


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _Process(grain.transforms.RandomMap):
    """record → example dict (or a skip marker): image ops, text choice and cleaning, tokens."""

    def __init__(self, kinds: Sequence[str], processors: Sequence[str], *, image_size: int,
                 flip: bool, max_words: int, prompt: str, question_template: str,
                 texts: Sequence[TextSpec], train: bool, prefix_lm: bool = False,
                 caches: Sequence[Optional[features.FeatureCache]] = (),
                 templates: Optional[Mapping[str, tuple]] = None):
        self.kinds = list(kinds)
        self.templates = dict(templates or {})     # dataset kind → pool (instruction tuning)
        self.caches = list(caches) or [None] * len(self.kinds)
        self.image_fns = [ops.image_processor(p, image_size, flip) for p in processors]
        self.max_words, self.prompt = max_words, prompt
        self.question_template = question_template
        self.texts = list(texts)
        self.train = train
        self.prefix_lm = prefix_lm
        self._tokenizers: dict[str, Any] = {}
        self.image_size = image_size

    def _tokenizer(self, spec: TextSpec):
        if spec.name not in self._tokenizers:
            # One loader at a time: grain's read threads would otherwise import transformers'
            # lazy tokenizer classes concurrently, which can fail (AttributeError) mid-import.
            with _LOAD_LOCK:
                if spec.name not in self._tokenizers:
                    tok = spec.tokenizer
                    if isinstance(tok, (str, os.PathLike)):
                        tok = processing.load_tokenizer(tok, "qformer" if spec.kind == "qformer"
                                                        else spec.kind)
                    self._tokenizers[spec.name] = tok
        return self._tokenizers[spec.name]

    def random_map(self, element, rng: np.random.Generator):
        dataset_index, record = element
        kind = self.kinds[dataset_index]
        cache = self.caches[dataset_index]
        try:
            if cache is not None:
                image = cache.decode(record[batch_lib.FEATURES])
            else:
                image = self.image_fns[dataset_index](ops.decode(record["image"]), rng)
            bad = None
        except ValueError as e:
            # Kept as an invalid row so evaluation stays in step; training drops it.
            image = (cache.zeros() if cache is not None
                     else np.zeros((self.image_size, self.image_size, 3), np.float32))
            bad = f"{_text(record['image_id'])} (index {int(record['index'])}): {e}"
        out = {batch_lib.FEATURES if cache is not None else batch_lib.IMAGE: image,
               **({"position": np.int32(record[_POSITION])} if _POSITION in record else {}),
               "image_index": np.int32(record["image_index"]),
               "dataset_index": np.int32(dataset_index),
               "index": np.int32(record["index"]),
               "image_id": _text(record["image_id"]), batch_lib.VALID: np.bool_(bad is None)}
        if kind == builders.CAPTIONS:
            captions = [_text(c) for c in record["captions"]]
            caption = captions[rng.integers(len(captions))] if self.train else captions[0]
            text = ops.pre_caption(caption, self.max_words)
            if self.templates:
                # Instruction tuning: the instruction, then the caption as the response.
                t = draw_template(self.templates[kind], rng)
                out.update(text=self.templates[kind][t], answer=text, answers=_object(captions),
                           question_id="", template=np.int32(t))
            else:
                if self.prefix_lm:
                    text, out["target"] = _split_prefix(text, rng if self.train else None)
                out["text"] = self.prompt + text
                # The prompt and the caption apart: a LLaMA caption row's prompt is no target.
                out["prompt"], out["caption"] = self.prompt.rstrip(), text
                out["captions"] = _object(captions)
        else:
            question = ops.pre_question(_text(record["question"]), self.max_words)
            out["text"] = processing.fill_template(self.question_template, question)
            answers = [_text(a) for a in record["answers"]]
            out["answer"] = draw_answer(answers, rng if self.train else None)
            out["answers"] = _object(answers)
            out["question_id"] = _text(record["question_id"])
            if self.templates:
                # Drawn after the answer: the answer draw is the VQA fine-tune's.
                t = draw_template(self.templates[kind], rng)
                out["text"] = processing.fill_template(self.templates[kind][t], question)
                out["template"] = np.int32(t)
            if not answers and bad is None:
                # Nothing to train on or to score against: a bad record like an unreadable
                # image (dropped and counted in training, an invalid row in evaluation).
                bad = f"question {out['question_id']} (index {int(record['index'])}): no answers"
                out[batch_lib.VALID] = np.bool_(False)
        for spec in self.texts:
            tok = self._tokenizer(spec)
            if spec.target_field:
                (out[batch_lib.ids(spec.name)], out[batch_lib.mask(spec.name)],
                 out[batch_lib.targets(spec.name)]) = processing.tokenize_prompt_answer(
                    tok, out[spec.field], out[spec.target_field], kind=spec.kind,
                    max_length=spec.max_length, suffix=spec.suffix)
                continue
            ids, mask = processing.tokenize_prompts(
                tok, out[spec.field] + spec.suffix, kind=spec.kind,
                max_length=spec.max_length, padding="max_length",
                padding_side=spec.padding_side)
            out[batch_lib.ids(spec.name)], out[batch_lib.mask(spec.name)] = ids[0], mask[0]
        if bad is not None:
            out[_SKIP] = bad
        return out


def draw_answer(answers: Sequence[str], rng: Optional[np.random.Generator]) -> str:
    """The answer a VQA question trains on: one of its (unique) answers drawn with probability
    count / total, LAVIS's answer weights (`COCOVQADataset`: `answer_weight[a] += 1 / n`). LAVIS
    trains on them in one of two ways: BLIP's VQA loss sums every unique answer's loss times its
    weight (`blip_vqa.py`: `(weight * loss).sum() / bsz`), InstructBLIP draws one answer by those
    weights (`VQADatasetInstructWrapper`: `random.choices(answers, weights)`). This is the draw:
    its expected loss is BLIP's weighted sum, at one LLM row per question instead of one per
    unique answer (up to 10 for VQAv2). `rng` comes from (seed, the example's global position),
    so the draw does not depend on workers, hosts or the mesh. Evaluation (rng None): the most
    frequent answer (ties: the first in sorted order). No answers: "" (the record is bad)."""
    if not answers:
        return ""
    values, counts = np.unique(list(answers), return_counts=True)
    if rng is None:
        return str(values[np.argmax(counts)])
    return str(values[rng.choice(len(values), p=counts / counts.sum())])


def _split_prefix(text: str, rng: Optional[np.random.Generator]) -> tuple[str, str]:
    """Prefix-LM split (BLIP-2 FlanT5; the paper gives no rule, this is ours): k words of the
    caption go to the encoder, the rest (at least one word) is the decoder's target, with k
    uniform in [0, n-1]. Evaluation (rng None) uses k = 0: the whole caption is the target."""
    words = text.split(" ")
    k = int(rng.integers(len(words))) if rng is not None else 0
    return " ".join(words[:k]), " ".join(words[k:])


class _DropSkipped(grain.IterDataset):
    """Counts and logs bad records; drops them (training) or keeps them as rows with
    valid=False (evaluation, so that every process runs the same number of batches)."""

    def __init__(self, parent, keep: bool):
        super().__init__(parent)
        self.keep = keep

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__(), self.keep)


class _DropSkippedIterator(grain.DatasetIterator):
    FIRST = 5

    def __init__(self, parent, keep: bool):
        super().__init__(parent)
        self.keep = keep
        self.skipped = 0
        self.first_skipped: list[str] = []

    def __next__(self):
        while True:
            element = next(self._parent)
            if _SKIP not in element:
                return element
            reason = element.pop(_SKIP)
            self.skipped += 1
            if len(self.first_skipped) < self.FIRST:
                self.first_skipped.append(reason)
            log.warning("skipped a bad record (%d so far): %s", self.skipped, reason)
            if self.keep:
                return element

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self.skipped,
                "first_skipped": list(self.first_skipped)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.skipped = int(state["skipped"])
        self.first_skipped = list(state["first_skipped"])


def _stack(examples: Sequence[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


_POSITION = "__position__"


class _WithPosition:
    """Evaluation: a record remembers its position in the data source (batch field
    `position`), so its original image can be read back (`source[position]`)."""

    def __call__(self, position, record):
        return {**record, _POSITION: position}


class _WithFeatures:
    """A split's records, each with its image's cached ViT tokens (bytes) instead of the
    image."""

    def __init__(self, records, cache: features.FeatureCache):
        self.records, self.cache = records, cache

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        record = dict(self.records[i])
        record.pop("image", None)
        record[batch_lib.FEATURES] = self.cache.raw(record["image_index"])
        return record


class _Tag:
    """record → (dataset index, record)."""

    def __init__(self, i: int):
        self.i = i

    def __call__(self, record):
        return self.i, record


class _PadTo:
    """Positions past the end of an evaluation split read its last element (marked invalid)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __call__(self, j):
        return self.ds[min(j, self.n - 1)]


class _ProcessRows:
    """Local position i → global position: row i % b of this process's block of step i // b."""

    def __init__(self, ds, global_batch: int, local_batch: int, process_index: int):
        self.ds, self.global_batch, self.local_batch = ds, global_batch, local_batch
        self.offset = process_index * local_batch

    def __call__(self, i):
        step, row = divmod(i, self.local_batch)
        return self.ds[step * self.global_batch + self.offset + row]


class _MarkPadding:
    def __init__(self, n: int):
        self.n = n

    def __call__(self, j, element):
        if j >= self.n:
            element[batch_lib.VALID] = np.bool_(False)
        return element


class Pipeline:
    """A deterministic, resumable iterator factory (see the module docstring)."""

    def __init__(self, sources: Sequence[Source], *, data_dir: str, batch_size: int,
                 seed: int = 0, train: bool = True, image_size: int = 224,
                 image_processor: Optional[str] = None, flip: bool = True,
                 max_words: int = 50, prompt: str = "",
                 question_template: str = "{}", texts: Sequence[TextSpec] = (),
                 templates: Optional[Mapping[str, Sequence[str]]] = None,
                 prefix_lm: bool = False, features_dir: Optional[str] = None,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                 num_threads: int = 8, prefetch: int = 64):
        if not sources:
            raise ValueError("the data config names no dataset")
        if batch_size % process_count:
            raise ValueError(f"global batch size {batch_size} is not divisible by the "
                             f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        kinds = [builders.kind_of(s.name) for s in sources]
        pools = check_templates(templates or {})
        if pools:
            missing = sorted({k for k in kinds if k not in pools})
            if missing:
                raise ValueError(f"instruction tuning: no template pool for the {missing} "
                                 f"sources (data.templates has {sorted(templates)}; tasks: "
                                 f"{ {v: k for k, v in TASKS.items()} })")
        elif len(set(kinds)) > 1:
            raise ValueError(f"a mixture must be of one dataset kind, unless it is instruction "
                             f"tuning (data.templates); got {[s.name for s in sources]}")
        if not train and len(sources) > 1:
            raise ValueError("evaluation reads one dataset at a time")
        given = [s.weight for s in sources if s.weight is not None]
        if any(float(w) <= 0 for w in given):
            raise ValueError(f"mixture weights must be positive, got {given}")
        processing.fill_template(question_template, "")      # one {} for the question
        default = image_processor or ("blip2_image_train" if train else "blip_image_eval")
        processors = [s.image_processor or default for s in sources]
        self.sources = list(sources)
        self.data_dir = data_dir
        self.batch_size, self.seed, self.train = batch_size, seed, train
        self.process_index, self.process_count = process_index, process_count
        self.num_workers, self.num_threads, self.prefetch = num_workers, num_threads, prefetch
        self.splits = [builders.open_split(data_dir, s.name, s.split) for s in sources]
        balanced = balanced_weights([len(split) for split in self.splits])
        weights = [float(s.weight) if s.weight is not None else b
                   for s, b in zip(sources, balanced)]
        # Frozen-feature cache (training): ViT tokens read instead of images (data/features.py).
        self.caches: list = []
        if features_dir and train:
            for s, split, processor in zip(sources, self.splits, processors):
                features.check_processor(processor, s.name)
                self.caches.append(features.open_cache(
                    features_dir, s.name, s.split, records=len(split),
                    image_processor=processor, image_size=image_size))
            self.splits = [_WithFeatures(split, c) for split, c in zip(self.splits, self.caches)]
        self._process = _Process(kinds, processors, image_size=image_size, flip=flip,
                                 max_words=max_words, prompt=prompt,
                                 question_template=question_template, texts=texts, train=train,
                                 prefix_lm=prefix_lm, caches=self.caches, templates=pools)
        self._weights = weights

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def __len__(self) -> int:
        """Evaluation: batches per process (every process runs the same number)."""
        if self.train:
            raise TypeError("a training pipeline is infinite")
        return -(-len(self.splits[0]) // self.batch_size)

    def dataset(self) -> grain.IterDataset:
        chains = []
        for i, src in enumerate(self.splits):
            ds = grain.MapDataset.source(src)
            if not self.train:
                ds = ds.map_with_index(_WithPosition())
            if self.train:
                ds = ds.shuffle(seed=self.seed * 1000 + i).repeat(None)
            chains.append(ds.map(_Tag(i)))
        ds = chains[0] if len(chains) == 1 else grain.MapDataset.mix(chains, self._weights)
        if not self.train:
            # Padded to whole global batches so that all processes run the same steps.
            n = len(ds)
            ds = grain.MapDataset.range(len(self) * self.batch_size).map(_PadTo(ds, n))
        ds = ds.random_map(self._process, seed=self.seed)
        if not self.train:
            ds = ds.map_with_index(_MarkPadding(n))
        ds = grain.MapDataset.range(len(ds) // self.process_count).map(
            _ProcessRows(ds, self.batch_size, self.local_batch_size, self.process_index))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                  prefetch_buffer_size=self.prefetch))
        if self.num_workers > 0:
            if not flags.FLAGS.is_parsed():
                # grain's workers read absl flags; outside an absl app use their defaults.
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        it = _DropSkipped(it, keep=not self.train)
        return it.batch(self.local_batch_size, drop_remainder=self.train, batch_fn=_stack)

    def __iter__(self):
        return iter(self.dataset())


def skipped(iterator) -> tuple[int, list[str]]:
    """(count, first few) of the bad records an iterator from `Pipeline` has dropped so far."""
    node = iterator
    while node is not None:
        if isinstance(node, _DropSkippedIterator):
            return node.skipped, list(node.first_skipped)
        node = node._parents[0] if getattr(node, "_parents", None) else None
    raise TypeError("not a Pipeline iterator")


def from_config(data, *, batch_size: int, seed: int = 0, train: bool = True,
                split_key: str = "train", process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> Pipeline:
    """A Pipeline from an ml_collections / dict data config:

        data.data_dir, data.train (one source dict or a list: name, split, weight,
        image_processor), data.image_size, data.image_processor, data.flip, data.max_words,
        data.prompt, data.question_template, data.templates (instruction tuning: {"caption":
        [...], "vqa": [...]} template pools), data.texts (list of TextSpec dicts),
        data.num_workers, data.num_threads, data.prefetch, data.features (a frozen-feature
        cache directory, data/features.py: training reads ViT tokens instead of images)

    `split_key` picks the sources (data.train, data.eval, ...); process index/count default to
    jax's."""
    data = dict(data)
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if split_key not in data:
        raise KeyError(f"data config has no {split_key!r} sources (keys: {sorted(data)})")
    raw = data[split_key]
    raw = [raw] if isinstance(raw, Mapping) or hasattr(raw, "to_dict") else list(raw)
    sources = [Source(**dict(s)) for s in raw]
    texts = [TextSpec(**dict(t)) for t in data.get("texts", ())]
    known = {"data_dir", "image_size", "image_processor", "flip", "max_words", "prompt",
             "question_template", "num_workers", "num_threads", "prefetch", "prefix_lm",
             "features", "templates"}
    extra = set(data) - known - {"texts", split_key, "train", "eval"}
    if extra:
        raise KeyError(f"unknown data config keys {sorted(extra)} (known: {sorted(known)})")
    kwargs = {k: data[k] for k in known if k in data}
    kwargs["features_dir"] = kwargs.pop("features", None)
    return Pipeline(sources, batch_size=batch_size, seed=seed, train=train, texts=texts,
                    process_index=process_index, process_count=process_count, **kwargs)
