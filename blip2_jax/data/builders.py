"""tensorflow-datasets builders (array_record, no TensorFlow needed) for our two record schemas.

    blip2_captions/NAME   image, image_id, image_index, captions [str], index
                          caption pairs (COCO, VG, CC, SBU, LAION, webdataset shards, your own),
                          retrieval sets (one record per image with all its captions) and the
                          synthetic set.
    blip2_vqa/NAME        image, image_id, image_index, question_id, question, answers [str], index

`NAME` is a tfds builder config, so a dataset lives in `DATA_DIR/blip2_captions/NAME/1.0.0/` and is
read back with `open_split(DATA_DIR, "blip2_captions/NAME", "train")` (random access, numpy,
images as encoded bytes). `image` holds the original JPEG/PNG bytes (see `records.image_bytes`);
`image_index` numbers the distinct images of a dataset densely (equal for captions of the same
image: image-id-aware ITC uses it); `index` is the entry's position in its source, since tfds
stores records in hash order. Each split's build report (examples, skipped records with the first
keys and reasons) is kept in the dataset's `metadata.json`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import os
import shutil
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np

from blip2_jax.data import records
from blip2_jax.data.records import Skipped

# tfds is imported lazily: its import costs ~0.5 s and only builders / readers need it.
CAPTIONS = "blip2_captions"
VQA = "blip2_vqa"
KINDS = (CAPTIONS, VQA)
VERSION = "1.0.0"
SKIPPED_SHOWN = 5


def _features(kind: str):
    # start-up time: tfds takes seconds to import; only building or reading a dataset needs it
    import tensorflow_datasets as tfds
    common = {"image": tfds.features.Image(), "image_id": tfds.features.Text(),
              "image_index": np.int64, "index": np.int64}
    if kind == CAPTIONS:
        specific = {"captions": tfds.features.Sequence(tfds.features.Text())}
    elif kind == VQA:
        specific = {"question_id": tfds.features.Text(), "question": tfds.features.Text(),
                    "answers": tfds.features.Sequence(tfds.features.Text())}
    else:
        raise ValueError(f"dataset kind must be one of {KINDS}, got {kind!r}")
    return tfds.features.FeaturesDict({**common, **specific})


class DatasetError(ValueError):
    """A dataset that is not as the config or command expects (a split it lacks)."""


class EmptySplitError(ValueError):
    """A split of which no record could be used: the whole build is refused."""

    def __init__(self, split: str, report: "SplitReport"):
        reasons = "; ".join(f"{s['key']}: {s['reason']}" for s in report.first_skipped)
        super().__init__(f"split {split!r} has no usable example ({report.skipped} skipped"
                         + (f"; first: {reasons}" if reasons else "") + "): nothing was "
                         "written; fix its records or leave the split out")
        self.split, self.report = split, report


@dataclasses.dataclass
class SplitReport:
    examples: int = 0
    skipped: int = 0
    first_skipped: list = dataclasses.field(default_factory=list)

    def add_skip(self, s: Skipped):
        self.skipped += 1
        if len(self.first_skipped) < SKIPPED_SHOWN:
            self.first_skipped.append({"key": s.key, "reason": s.reason})


def _builder_class(kind: str):
    # start-up time: tfds takes seconds to import; only building or reading a dataset needs it
    import tensorflow_datasets as tfds

    class _Builder(tfds.core.GeneratorBasedBuilder):
        name = kind
        VERSION = tfds.core.Version(VERSION)
        url_infos = None  # nothing is downloaded (tfds would look for a checksums file)

        def __init__(self, *, splits, description, reports, **kwargs):
            self._split_fns = splits
            self._description = description
            self._reports = reports
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=self._description,
                                         features=_features(kind),
                                         metadata=tfds.core.MetadataDict())

        def _split_generators(self, dl_manager):
            return {split: self._generate(split, fn) for split, fn in self._split_fns.items()}

        def _generate(self, split, fn):
            report = self._reports[split] = SplitReport()
            for item in fn():
                if isinstance(item, Skipped):
                    report.add_skip(item)
                    continue
                report.examples += 1
                yield item["index"], item
            if report.examples == 0:
                raise EmptySplitError(split, report)
            self.info.metadata[split] = dataclasses.asdict(report)

        def _generate_examples(self):  # splits come from _split_generators
            raise NotImplementedError

    return _Builder


_BUILDERS: dict = {}


def _prepare(builder) -> None:
    # tfds prints "Downloading and preparing dataset Unknown size..." to stdout; the caller
    # reports what was written instead.
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare()


def build(kind: str, name: str, data_dir: str,
          splits: Mapping[str, Callable[[], Iterable[Union[dict, Skipped]]]], *,
          description: str = "", overwrite: bool = False) -> dict[str, SplitReport]:
    """Write `DATA_DIR/KIND/NAME/1.0.0/` from per-split example iterables; returns the reports.

    Each iterable yields example dicts (the schema's fields) or `Skipped` records, which are
    counted, not written. An existing dataset is an error unless `overwrite` (then it is
    replaced only after the new one is complete: tfds writes into a temporary folder first)."""
    # start-up time: tfds takes seconds to import; only building or reading a dataset needs it
    import tensorflow_datasets as tfds
    if not name or "/" in name or not name.replace("_", "").replace("-", "").isalnum():
        raise DatasetError(f"dataset name {name!r}: use letters, digits, '_' and '-'")
    if kind not in _BUILDERS:
        _BUILDERS[kind] = _builder_class(kind)
    target = os.path.join(data_dir, kind, name, VERSION)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to rebuild it")
    reports: dict[str, SplitReport] = {}
    builder = _BUILDERS[kind](
        splits=splits, description=description, reports=reports, data_dir=data_dir,
        config=tfds.core.BuilderConfig(name=name, description=description),
        file_format="array_record")
    # A failed build leaves what was there before: no new folder, the previous dataset back.
    created = [d for d in (data_dir, os.path.join(data_dir, kind),
                           os.path.join(data_dir, kind, name), os.path.join(data_dir, "downloads"))
               if not os.path.exists(d)]
    backup = None
    if os.path.exists(target):
        # tfds would reuse it; move it aside so a failed rebuild loses nothing.
        backup = target + ".previous"
        shutil.rmtree(backup, ignore_errors=True)
        os.rename(target, backup)
    try:
        _prepare(builder)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        for leftover in _incomplete(os.path.dirname(target)):
            shutil.rmtree(leftover, ignore_errors=True)
        if backup is not None:
            os.rename(backup, target)
        for d in sorted(created, key=len, reverse=True):      # the deepest first
            if os.path.isdir(d) and not any(files for _, _, files in os.walk(d)):
                shutil.rmtree(d)                                # folders holding no file
        raise
    if backup is not None:
        shutil.rmtree(backup)
    return reports


def _incomplete(folder: str) -> list[str]:
    """tfds's temporary folders of an unfinished build in `folder`."""
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in os.listdir(folder)
            if f.startswith(VERSION) and f != VERSION and "incomplete" in f]


# ------------------------------------------------------------------------------------------------
# Example streams for each source
# ------------------------------------------------------------------------------------------------
def _parallel(fn: Callable, items: Iterable, workers: int, chunk: int = 256) -> Iterator:
    """`map(fn, items)` in order on a thread pool (PIL decoding releases the GIL), holding at
    most one chunk of results."""
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        while batch := list(itertools.islice(items, chunk)):
            yield from pool.map(fn, batch)


def _dense_ids(keys: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out.setdefault(k, len(out))
    return out


def entry_examples(entries: list[Union[records.CaptionEntry, records.VqaEntry]],
                   image_root: str, *, max_size: Optional[int] = None,
                   workers: int = 8) -> Iterator:
    """Examples (or `Skipped`) of annotation entries, images read on a thread pool: captions for
    `CaptionEntry`s, questions and answers for `VqaEntry`s."""
    image_index = _dense_ids(e.image for e in entries)

    def load(args):
        i, e = args
        vqa = isinstance(e, records.VqaEntry)
        image = records.read_image(image_root, e.image, max_size)
        if isinstance(image, Skipped):
            what = f"question {e.question_id}, {e.image}" if vqa else e.image
            return Skipped(f"entry {i} ({what})", image.reason)
        out = {"image": image, "image_id": e.image_id, "image_index": image_index[e.image],
               "index": i}
        if vqa:
            return {**out, "question_id": e.question_id, "question": e.question,
                    "answers": list(e.answers)}
        return {**out, "captions": list(e.captions)}
    return _parallel(load, enumerate(entries), workers)


def webdataset_examples(shards: list[str], *, max_size: Optional[int] = None,
                        workers: int = 8) -> Iterator:
    def verify(sample):
        if isinstance(sample, Skipped):
            return sample
        key, data, caption = sample
        try:
            return key, records.image_bytes(data, max_size), caption
        except ValueError as e:
            return Skipped(key, str(e))

    i = 0
    for item in _parallel(verify, records.webdataset_samples(shards), workers):
        if isinstance(item, Skipped):
            yield item
            continue
        key, image, caption = item
        yield {"image": image, "image_id": key, "image_index": i, "captions": [caption],
               "index": i}
        i += 1


def synthetic_examples(kind: str, generated: Iterable[dict]) -> Iterator[dict]:
    """Records of one schema from `synthetic.generate(...)` output (shared by both schemas)."""
    n = 0
    for i, ex in enumerate(generated):
        common = {"image": ex["image"], "image_id": ex["image_id"], "image_index": i}
        if kind == CAPTIONS:
            yield {**common, "captions": ex["captions"], "index": i}
            continue
        for question, answer in ex["qa"]:
            # VQAv2's form: ten annotator answers (here they all agree).
            yield {**common, "question_id": f"{ex['image_id']}_q{n}", "question": question,
                   "answers": [answer] * 10, "index": n}
            n += 1


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def dataset_path(data_dir: str, name: str) -> str:
    """`DATA_DIR/KIND/NAME/VERSION` for a dataset named "KIND/NAME" (or "KIND/NAME:VERSION")."""
    full, _, version = name.partition(":")
    parts = full.split("/")
    if len(parts) != 2 or parts[0] not in KINDS:
        raise DatasetError(f"dataset name {name!r} must look like 'blip2_captions/NAME' or "
                           f"'blip2_vqa/NAME'")
    base = os.path.join(data_dir, *parts)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"dataset {name!r} not found in {data_dir!r} (have: "
                                f"{available(data_dir) or 'none'}); build it with "
                                "`python -m blip2_jax.data.build`")
    versions = sorted((d for d in os.listdir(base) if d[:1].isdigit()
                       and os.path.isfile(os.path.join(base, d, "dataset_info.json"))),
                      key=lambda v: tuple(int(x) for x in v.split(".")))
    if version:
        if version not in versions:
            raise FileNotFoundError(f"dataset {full!r} has no version {version} (have {versions})")
        return os.path.join(base, version)
    if not versions:
        raise FileNotFoundError(f"{base} holds no complete dataset version")
    return os.path.join(base, versions[-1])


def available(data_dir: str) -> list[str]:
    out = []
    for kind in KINDS:
        d = os.path.join(data_dir, kind)
        if os.path.isdir(d):
            out += [f"{kind}/{n}" for n in sorted(os.listdir(d))]
    return out


def open_split(data_dir: str, name: str, split: str):
    """A `tfds` ArrayRecord data source (random access, `len`) of one split, images undecoded."""
    # start-up time: tfds takes seconds to import; only building or reading a dataset needs it
    import tensorflow_datasets as tfds
    path = dataset_path(data_dir, name)
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise DatasetError(f"dataset {name!r} has no split {split!r} (have "
                         f"{sorted(builder.info.splits)})")
    return builder.as_data_source(split=split,
                                  decoders={"image": tfds.decode.SkipDecoding()})


@dataclasses.dataclass(frozen=True)
class RetrievalTruth:
    """A retrieval split's ground truth, images in `index` order (the annotation file's order).

    image_ids[i] and records[i] (the data-source position of image i); texts flattened image by
    image; text_to_image[t] = i; image_to_texts[i] = the text indices of image i."""
    image_ids: list
    records: np.ndarray
    texts: list
    text_to_image: np.ndarray
    image_to_texts: list


def retrieval_truth(data_dir: str, name: str, split: str = "test") -> RetrievalTruth:
    src = open_split(data_dir, name, split)
    if kind_of(name) != CAPTIONS:
        raise DatasetError(f"retrieval needs a blip2_captions dataset, got {name!r}")
    rows = sorted(((int(src[r]["index"]), r) for r in range(len(src))))
    image_ids, texts, text_to_image, image_to_texts = [], [], [], []
    for i, (_, r) in enumerate(rows):
        rec = src[r]
        image_ids.append(rec["image_id"].decode())
        caps = [c.decode() for c in rec["captions"]]
        image_to_texts.append(list(range(len(texts), len(texts) + len(caps))))
        texts += caps
        text_to_image += [i] * len(caps)
    return RetrievalTruth(image_ids, np.array([r for _, r in rows]), texts,
                          np.array(text_to_image), image_to_texts)


def image_texts(data_dir: str, name: str, split: str = "train") -> dict[str, dict]:
    """The text of a dataset's split by image: {image_id: {"captions": [str], "qa": [(question,
    [answers])]}} from blip2_captions/NAME and blip2_vqa/NAME, those that exist (in stored
    order; a DatasetError when neither does)."""
    have = available(data_dir)
    if f"{CAPTIONS}/{name}" not in have and f"{VQA}/{name}" not in have:
        raise DatasetError(f"no dataset named {name!r} in {data_dir} (have {have}): build it "
                           "first")
    out: dict[str, dict] = {}
    for kind in KINDS:
        if f"{kind}/{name}" not in have:
            continue
        src = open_split(data_dir, f"{kind}/{name}", split)
        for r in range(len(src)):
            rec = src[r]
            entry = out.setdefault(rec["image_id"].decode(), {"captions": [], "qa": []})
            if kind == CAPTIONS:
                entry["captions"] += [c.decode() for c in rec["captions"]]
            else:
                entry["qa"].append((rec["question"].decode(),
                                    [a.decode() for a in rec["answers"]]))
    return out


def kind_of(name: str) -> str:
    return name.split("/", 1)[0]
