"""Frozen-feature cache, the reading side: the frozen image encoder's output for every image of
a training set, computed once (`blip2_jax.train.features` builds it) and read by training in
place of the images.

    FEATURES/KIND/NAME/SPLIT/features-PPPPP-of-NNNNN.array_record    record i = image i's tokens
    FEATURES/KIND/NAME/SPLIT/meta.json                               what they were computed from

Each record holds the ViT's output tokens (N, Dv) for one distinct image (`image_index`), before
`ln_vision` (which trains), in the storage dtype meta.json names; an image that did not decode is
an empty record, dropped by training as a bad image would be. Training with
`config.data.features` set reads them (`data.pipeline`): no image decoding and no ViT in the
step (`batch["vision_features"]` replaces `batch["image"]`). A cache is only valid when nothing
random touches the image, so it is refused unless the image processor is deterministic
(`blip_image_eval`), and when the processor, image size, dataset or the ViT's weights (a content
hash) differ from those it was computed with, or when the ViT is trained.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import grain
import numpy as np

from blip2_jax.data import batch as batch_lib

DETERMINISTIC_PROCESSORS = ("blip_image_eval",)
FORMAT = 1
META = "meta.json"


class FeatureCacheError(ValueError):
    """A cache that is missing, incomplete, or does not match what reads it."""


def cache_dir(root: str, dataset: str, split: str) -> str:
    kind, _, name = dataset.partition(":")[0].partition("/")
    return os.path.join(root, kind, name, split)


def shard_name(p: int, n: int) -> str:
    return f"features-{p:05d}-of-{n:05d}.array_record"


def build_command(dataset: str) -> str:
    return (f"python -m blip2_jax.train.features --config <the training config> "
            f"(it computes {dataset}; train.py computes a missing cache itself)")


@dataclasses.dataclass
class FeatureCache:
    """Random access to one split's cached features: `cache[image_index]` → (N, Dv) array,
    raising ValueError for an image that did not decode."""
    directory: str
    meta: dict

    def __post_init__(self):
        self.shape = tuple(self.meta["shape"])
        self.dtype = batch_lib.dtype(self.meta["dtype"])
        self._source = grain.sources.ArrayRecordDataSource(
            [os.path.join(self.directory, s) for s in self.meta["shards"]])
        if len(self._source) != self.meta["images"]:
            raise FeatureCacheError(f"{self.directory}: {len(self._source)} records, meta.json "
                                    f"says {self.meta['images']} images")

    def __len__(self) -> int:
        return self.meta["images"]

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise ValueError("the image did not decode when the feature cache was built")
        return np.frombuffer(data, self.dtype).reshape(self.shape)

    def raw(self, image_index: int) -> bytes:
        return self._source[int(image_index)]

    def __getitem__(self, image_index: int) -> np.ndarray:
        return self.decode(self.raw(image_index))

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, self.dtype)


def open_cache(root: str, dataset: str, split: str, *, records: int, image_processor: str,
               image_size: int) -> FeatureCache:
    """The cache of one training source, checked against how the pipeline would process its
    images (`records`: the split's record count)."""
    d = cache_dir(root, dataset, split)
    path = os.path.join(d, META)
    if not os.path.isfile(path):
        raise FeatureCacheError(f"no feature cache for {dataset} split {split!r} in {root!r} "
                                f"(looked for {path}); build it: {build_command(dataset)}")
    with open(path) as f:
        meta = json.load(f)
    problems = []
    if meta.get("format") != FORMAT:
        problems.append(f"format {meta.get('format')} (this code reads {FORMAT})")
    if meta.get("records") != records:
        problems.append(f"computed over {meta.get('records')} records, the split has {records} "
                        "(the dataset was rebuilt)")
    if meta.get("image_processor") != image_processor:
        problems.append(f"image processor {meta.get('image_processor')!r}, training uses "
                        f"{image_processor!r}")
    if meta.get("image_size") != image_size:
        problems.append(f"image size {meta.get('image_size')}, training uses {image_size}")
    if problems:
        raise FeatureCacheError(f"feature cache {d} does not match the training data: "
                                + "; ".join(problems) + f". Rebuild it with --overwrite: "
                                f"{build_command(dataset)}")
    return FeatureCache(d, meta)


def check_processor(name: str, dataset: str) -> None:
    if name not in DETERMINISTIC_PROCESSORS:
        raise FeatureCacheError(
            f"config.data.features: {dataset} is processed by {name!r}, which draws random crops "
            f"/ flips per step, so a ViT output computed once cannot stand for it; cache only "
            f"with a deterministic processor ({', '.join(DETERMINISTIC_PROCESSORS)}: set "
            f"data.image_processor, or the source's image_processor)")


def require_frozen_vision(vision_frozen: bool, frozen: Sequence[str]) -> None:
    """A trained ViT's outputs change every step: there is nothing to cache."""
    if not vision_frozen:
        raise FeatureCacheError(f"config.data.features: config.frozen {list(frozen)} does not "
                                "freeze the ViT ('vision/.*'), so its outputs cannot be cached")


def check_vision(caches: Sequence[FeatureCache], vision_sha256: Optional[str]) -> None:
    """Training: the caches must come from these frozen ViT weights."""
    for c in caches:
        if c.meta["vision_sha256"] != vision_sha256:
            raise FeatureCacheError(
                f"feature cache {c.directory} was computed by other ViT weights (sha256 "
                f"{c.meta['vision_sha256'][:12]}…, from {c.meta.get('vision_source')}) than "
                f"this run's ({(vision_sha256 or '?')[:12]}…); rebuild it with --overwrite: "
                f"{build_command(c.meta['dataset'])}")
