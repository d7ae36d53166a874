"""The trainer: a mesh, the shardings of the state / frozen towers / batch, and the one jitted,
donated step.

    trainer = Trainer(model_cfg, loss_cfg, opt_cfg, total_steps=..., mesh=mesh,
                      frozen=("vision/.*",), frozen_dtype="bfloat16")
    state, frozen = trainer.init(params, seed=0)   # params: a full tree (host or device arrays)
    state, metrics = trainer.step(state, frozen, trainer.place(batch))

Shardings come from the parameters' logical axis names and `sharding.DEFAULT_RULES` (or the
rules given). The optimizer state follows its parameters' shardings (`optax.tree_map_params`),
or with `zero1=True` is split over the batch axes as well (ZeRO-1: each device updates a slice).
The batch is sharded over the data axes.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from blip2_jax import sharding as sharding_lib
from blip2_jax.config import Blip2Config
from blip2_jax.convert.mapping import flatten, unflatten
from blip2_jax.losses import LossConfig
from blip2_jax.models.blip2 import abstract_init
from blip2_jax.train import flops as flops_lib, state as state_lib
from blip2_jax.train.step import make_step


class Trainer:
    def __init__(self, cfg: Blip2Config, loss_cfg: LossConfig, opt_cfg: Mapping, *,
                 total_steps: int, mesh: Mesh, frozen: Sequence[str] = ("vision/.*",),
                 frozen_dtype: Optional[str] = "bfloat16",
                 rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
                 overrides: Sequence[tuple[str, sharding_lib.Rules]] = (),
                 skip_nonfinite: bool = False, microbatches: int = 1, zero1: bool = False):
        specs, shapes = abstract_init(cfg)
        paths = list(flatten(shapes))
        state_lib.check_patterns(paths, frozen)
        self.frozen_paths = state_lib.frozen_paths(paths, frozen)
        trained = state_lib.trained_towers(paths, self.frozen_paths)
        loss_cfg = dataclasses.replace(loss_cfg, train_vision="vision" in trained)
        self.train_llm = "llm" in trained
        self.cfg, self.loss_cfg, self.mesh, self.rules = cfg, loss_cfg, mesh, rules
        self.frozen_dtype = frozen_dtype
        shardings = sharding_lib.shardings_from_logical(specs, shapes, mesh, rules, overrides)
        self.trainable_shardings, self.frozen_shardings = state_lib.split(shardings,
                                                                         self.frozen_paths)
        t_specs, t_shapes = state_lib.trainable_abstract(cfg, self.frozen_paths)
        self.trainable_shapes = t_shapes
        mask = state_lib.decay_mask(t_specs, t_shapes)
        opt = dict(opt_cfg)
        scales = state_lib.layer_lr_scales(cfg, t_shapes, opt.get("vit_layer_decay"),
                                           tuple(opt.get("lr_mult", ())))
        self.tx, self.schedule = state_lib.optimizer(opt_cfg, total_steps, mask, scales)

        replicated = NamedSharding(mesh, P())
        opt_shapes = jax.eval_shape(self.tx.init, t_shapes)
        # ZeRO-1: the optimizer state split over the batch axes, each device updating its slice.
        moment_shardings = (jax.tree.map(
            lambda sh, shape: sharding_lib.split_over_batch_axes(sh, shape.shape, rules),
            self.trainable_shardings, t_shapes) if zero1 else self.trainable_shardings)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_shapes, moment_shardings,
            transform_non_params=lambda _: replicated)
        self.state_shardings = state_lib.TrainState(
            step=replicated, params=self.trainable_shardings, opt_state=opt_shardings,
            rng=replicated)
        self._opt_init = jax.jit(self.tx.init, out_shardings=opt_shardings)
        _, self.frozen_shapes = state_lib.split(shapes, self.frozen_paths)
        raw_step = make_step(cfg, loss_cfg, self.tx, self.schedule,
                             skip_nonfinite=skip_nonfinite, microbatches=microbatches,
                             update_shardings=((self.trainable_shardings, moment_shardings)
                                               if zero1 else None))

        def step(state, frozen, batch):
            with sharding_lib.activation_sharding(mesh, rules):
                return raw_step(state, frozen, batch)
        self._step = jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                 None),
                             out_shardings=(self.state_shardings, replicated),
                             donate_argnums=(0,))

    # -- state -----------------------------------------------------------------------------------
    def split(self, params: Mapping) -> tuple[dict, dict]:
        """Full tree → (trainable float32, frozen in frozen_dtype), placed on the mesh."""
        trainable, frozen = state_lib.split(params, self.frozen_paths)
        flat_t = flatten(trainable)
        missing = sorted(set(flatten(self.trainable_shapes)) - set(flat_t))
        if missing:
            raise KeyError(f"params lack trainable leaves {missing[:10]}")
        # Copies: the step donates the state, which must not alias the caller's arrays.
        trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
        if self.frozen_dtype:
            frozen = jax.tree.map(lambda x: jnp.asarray(x, self.frozen_dtype), frozen)
        return (jax.device_put(trainable, self.trainable_shardings),
                jax.device_put(frozen, self.frozen_shardings))

    def init(self, params: Mapping, seed: int = 0):
        """(TrainState at step 0, frozen tree) from a full parameter tree."""
        trainable, frozen = self.split(params)
        state = state_lib.TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step),
            params=trainable, opt_state=self._opt_init(trainable),
            rng=jax.device_put(jax.random.PRNGKey(seed), self.state_shardings.rng))
        return state, frozen

    def abstract_state(self):
        """ShapeDtypeStructs (with shardings) of the TrainState, for restoring a checkpoint."""
        shapes = state_lib.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=self.trainable_shapes,
            opt_state=jax.eval_shape(self.tx.init, self.trainable_shapes),
            rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def abstract_frozen(self):
        """ShapeDtypeStructs (frozen_dtype, with shardings) of the frozen towers."""
        dtype = lambda s: self.frozen_dtype or s.dtype                         # noqa: E731
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype(s), sharding=sh),
                            self.frozen_shapes, self.frozen_shardings)

    # -- steps -----------------------------------------------------------------------------------
    def place(self, batch: Mapping[str, np.ndarray]) -> dict:
        """A host batch (this process's rows, numbers only) → global arrays on the data axes."""
        return sharding_lib.shard_batch(dict(batch), self.mesh, self.rules)

    def step(self, state, frozen, batch):
        return self._step(state, frozen, batch)

    def compile(self, state, frozen, batch) -> "CompiledStep":
        """The step compiled ahead of time for these shapes, with XLA's FLOP count."""
        return CompiledStep(self._step.lower(state, frozen, batch).compile())

    def model_flops(self, batch) -> float:
        """Counted model FLOPs (matmuls, forward + backward) of one step over the global
        `batch` (train/flops.py): the basis of the logged TFLOP/s and MFU."""
        return flops_lib.train_step_flops_for_batch(self.cfg, self.loss_cfg, batch,
                                                    train_llm=self.train_llm)

    def lower(self, state, frozen, batch):
        return self._step.lower(state, frozen, batch)


class CompiledStep:
    """A compiled step. `flops_per_step` is XLA's cost analysis: one device's share, with loop
    (scanned layer) bodies counted once — for comparing programs, not for MFU
    (`Trainer.model_flops` is)."""

    def __init__(self, compiled):
        self.compiled = compiled
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
        self.flops_per_step = float(cost.get("flops", 0.0)) if isinstance(cost, dict) else None

    def __call__(self, state, frozen, batch):
        return self.compiled(state, frozen, batch)


def full_params(trainable: Mapping, frozen: Mapping) -> dict:
    return state_lib.merge(trainable, frozen)


__all__ = ["Trainer", "full_params", "unflatten"]
