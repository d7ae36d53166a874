"""The batch a training step takes: its field names, shapes and dtypes, defined once.

The input pipeline produces these fields (`data.pipeline`, which adds host-only ones: strings,
objects), the step reads them (`train/step.py`), and AOT compilation builds its abstract batch
from them (`aot.abstract_batch`):

- `image` float32 (B, S, S, 3), normalised; or, from a frozen-feature cache, `vision_features`
  (B, N, Dv) in the ViT's compute dtype: its output tokens before `ln_vision` (`data/features.py`);
- `valid` bool (B,): False on padding rows (evaluation's last batch, `config.pad_batch`);
- `image_index`, `dataset_index`, `index` int32 (B,): the image within its dataset, the dataset
  within the mixture, the record (image-id-aware ITC uses the first two);
- per tokenized text NAME (`TextSpec.name`: `qformer`, `llm`, `target`): `NAME_ids` and
  `NAME_mask` int32 (B, L);
- VQA fine-tuning of a decoder-only LLM: `llm_targets` int32 (B, L), 1 on the `llm_ids`
  positions the loss predicts (each row's answer and its end, after a prompt of its own
  length). With a question-aware Q-Former (`Blip2Config.qformer_text_input`) a stage-2 batch
  also has `qformer_ids` / `qformer_mask`: the same question, BERT-tokenized.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

IMAGE = "image"
FEATURES = "vision_features"          # replaces IMAGE when training from a feature cache
VALID = "valid"
INDICES = ("image_index", "dataset_index", "index")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch field: its per-example shape and dtype (the batch dimension leads)."""
    shape: tuple
    dtype: np.dtype


def ids(name: str) -> str:
    return f"{name}_ids"


def mask(name: str) -> str:
    return f"{name}_mask"


def targets(name: str) -> str:
    return f"{name}_targets"


def dtype(name: str) -> np.dtype:
    return BFLOAT16 if name in ("bfloat16", "bf16") else np.dtype(name)


def step_fields(texts: Sequence[str], max_length: int, *, image_size: int,
                features: Optional[tuple[tuple, str]] = None,
                with_targets: Sequence[str] = ()) -> dict[str, Field]:
    """The fields of a training batch: `texts` the tokenized text names, `features`
    ((N, Dv), dtype name) when the ViT's tokens come from a cache instead of images,
    `with_targets` the text names that also carry a per-row target mask (`NAME_targets`)."""
    if features is None:
        out = {IMAGE: Field((image_size, image_size, 3), np.dtype(np.float32))}
    else:
        shape, dt = features
        out = {FEATURES: Field(tuple(shape), dtype(dt))}
    out[VALID] = Field((), np.dtype(np.bool_))
    for k in INDICES:
        out[k] = Field((), np.dtype(np.int32))
    for name in texts:
        out[ids(name)] = Field((max_length,), np.dtype(np.int32))
        out[mask(name)] = Field((max_length,), np.dtype(np.int32))
        if name in with_targets:
            out[targets(name)] = Field((max_length,), np.dtype(np.int32))
    return out


def select(batch: Mapping[str, np.ndarray], fields: Mapping[str, Field]) -> dict:
    """The step's fields of a host batch from the pipeline (which carries host-only ones too)."""
    missing = sorted(set(fields) - set(batch))
    if missing:
        raise KeyError(f"the input batch lacks the fields {missing} the step takes (it has "
                       f"{sorted(batch)})")
    return {k: batch[k] for k in fields}


def numeric(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields of a host batch that a device step can take (numbers and bools, bfloat16
    included; no strings or objects)."""
    return {k: v for k, v in batch.items() if v.dtype.kind in "biuf" or v.dtype == BFLOAT16}
