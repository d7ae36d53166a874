"""Training state: the trainable / frozen split of the parameter tree, the optimizer and its
schedule, and the state pytree the jitted step carries.

Freezing is chosen in the config by regexes over "/"-joined parameter paths
(`frozen=("vision/.*", "llm/.*")`). Frozen towers are cast to `frozen_dtype` (bf16 by default).
They get no optimizer state and no gradient, and are not written into training checkpoints.
Trainable parameters stay in float32.

Optimizer: LAVIS `runner_base.py` and `common/optims.py`.
- AdamW (b1, b2, eps 1e-8) with decoupled weight decay.
- 1-D parameters and biases are exempt from decay: per layer, so a stacked LayerNorm scale
  (layers, H) counts as 1-D. The 0-D `temp` and the 3-D `query_tokens` decay, as in LAVIS.
- Linear warm-up from `warmup_lr` to `lr`, then cosine to `min_lr` at `total_steps`. This is
  per step; LAVIS steps its cosine once per epoch.
- Optional global-norm clipping.
- Optional layer-wise LR decay for a trainable ViT: block i scaled by decay^(L - i), the
  patch / class / position embeddings by decay^(L + 1).
- Optional per-parameter LR multipliers (`lr_mult`: (regex, factor) pairs over the paths).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import flax.struct
import jax
import numpy as np
import optax

from blip2_jax import config as config_lib, run_config
from blip2_jax.convert.mapping import flatten, unflatten
from blip2_jax.models import blip2 as blip2_model


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any          # the trainable sub-tree (float32)
    opt_state: Any
    rng: jax.Array


# ------------------------------------------------------------------------------------------------
# Trainable / frozen
# ------------------------------------------------------------------------------------------------
def frozen_paths(paths: Sequence[str], patterns: Sequence[str]) -> set[str]:
    compiled = [re.compile(p) for p in patterns]
    return {p for p in paths if any(c.fullmatch(p) for c in compiled)}


def trained_towers(paths: Sequence[str], frozen: set[str]) -> set[str]:
    """The top-level sub-trees ("vision", "qformer", "llm", ...) with any parameter not frozen."""
    return {p.split("/")[0] for p in paths if p not in frozen}


def check_patterns(paths: Sequence[str], patterns: Sequence[str], what: str = "frozen") -> None:
    for pat in patterns:
        if not any(re.fullmatch(pat, p) for p in paths):
            raise run_config.RunConfigError(
                f"config.{what} pattern {pat!r} matches no parameter (top-level "
                             f"names: {sorted({p.split('/')[0] for p in paths})})")


def split(params: Mapping, frozen: set[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; `merge` puts them back together."""
    flat = flatten(params)
    return (unflatten({k: v for k, v in flat.items() if k not in frozen}),
            unflatten({k: v for k, v in flat.items() if k in frozen}))


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    out = dict(flatten(frozen))
    out.update(flatten(trainable))
    return unflatten(out)


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------
def schedule(lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0,
             min_lr: float = 0.0) -> optax.Schedule:
    if warmup_steps >= total_steps:
        raise run_config.RunConfigError(
            f"config.optimizer.warmup_steps ({warmup_steps}) must be < config.total_steps "
            f"({total_steps})")
    return optax.warmup_cosine_decay_schedule(init_value=warmup_lr, peak_value=lr,
                                              warmup_steps=warmup_steps,
                                              decay_steps=total_steps, end_value=min_lr)


def _per_layer_ndim(path: str, spec) -> int:
    # Stacked (scanned) layers carry a leading "layers" axis that is not part of the weight.
    names = tuple(spec) if spec is not None else ()
    return len(names) - sum(1 for n in names if n == "layers")


def decay_mask(trainable_specs: Mapping, trainable_shapes: Mapping) -> dict:
    """True where weight decay applies: not 1-D per layer, not a bias (LAVIS)."""
    specs, shapes = flatten(trainable_specs), flatten(trainable_shapes)
    out = {}
    for path, shape in shapes.items():
        spec = specs.get(path)
        ndim = _per_layer_ndim(path, spec) if spec is not None else len(shape.shape)
        out[path] = not (ndim == 1 or path.rsplit("/", 1)[-1] == "bias")
    return unflatten(out)


def layer_lr_scales(cfg: config_lib.Blip2Config, trainable_shapes: Mapping,
                    decay: Optional[float], lr_mult: Sequence = ()) -> Optional[dict]:
    """Per-leaf LR multipliers (None when every one is 1): layer-wise decay for a trainable ViT
    (`decay`), times `lr_mult`'s factor for the leaves whose "/"-joined path a regex of it
    fully matches ((regex, factor) pairs; the first match counts)."""
    flat = flatten(trainable_shapes)
    mult = [(re.compile(p), float(f)) for p, f in lr_mult]
    check_patterns(list(flat), [p for p, _ in lr_mult], "optimizer.lr_mult")
    has_vit = decay is not None and any(p.startswith("vision/") for p in flat)
    if not has_vit and not mult:
        return None
    n = cfg.vision.num_layers
    out = {}
    for path, shape in flat.items():
        scale = np.float32(1.0)
        if has_vit and path.startswith("vision/layers/"):
            scale = decay ** (n - np.arange(n, dtype=np.float64))      # block i → decay^(L-i)
            scale = scale.astype(np.float32).reshape((n,) + (1,) * (len(shape.shape) - 1))
        elif has_vit and path.startswith("vision/"):
            scale = np.float32(decay ** (n + 1))                      # embeddings: layer id 0
        factor = next((f for c, f in mult if c.fullmatch(path)), 1.0)
        out[path] = (scale * np.float32(factor)).astype(np.float32)
    return unflatten(out)


def optimizer(opt_cfg: Mapping, total_steps: int, mask, lr_scales=None
              ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = dict(opt_cfg)
    known = {"lr", "min_lr", "warmup_lr", "warmup_steps", "b1", "b2", "eps", "weight_decay",
             "clip_norm", "vit_layer_decay", "lr_mult"}
    unknown = set(o) - known
    if unknown:
        raise KeyError(f"unknown config.optimizer keys {sorted(unknown)} (known {sorted(known)})")
    sched = schedule(o.get("lr", 1e-4), total_steps, o.get("warmup_steps", 0),
                     o.get("warmup_lr", 0.0), o.get("min_lr", 0.0))
    parts = []
    if o.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(o["clip_norm"]))
    parts.append(optax.scale_by_adam(b1=o.get("b1", 0.9), b2=o.get("b2", 0.98),
                                     eps=o.get("eps", 1e-8)))
    if o.get("weight_decay", 0.0):
        parts.append(optax.add_decayed_weights(o["weight_decay"], mask=mask))
    if lr_scales is not None:
        parts.append(optax.stateless(
            lambda updates, params=None: jax.tree.map(lambda u, s: u * s, updates, lr_scales)))
    parts.append(optax.scale_by_learning_rate(sched))
    return optax.chain(*parts), sched


def trainable_abstract(cfg: config_lib.Blip2Config, frozen: set[str]):
    """(logical specs, shapes) of the trainable sub-tree."""
    specs, shapes = blip2_model.abstract_init(cfg)
    flat_specs = flatten(specs) if isinstance(specs, Mapping) else {}
    t_shapes, _ = split(shapes, frozen)
    t_specs = unflatten({k: flat_specs.get(k) for k in flatten(t_shapes)})
    return t_specs, t_shapes
