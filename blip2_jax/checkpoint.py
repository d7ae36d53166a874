"""Training checkpoints: an orbax `CheckpointManager` holding, per saved step,

    state/     the TrainState: trainable params (float32), optimizer state, step, RNG (sharded)
    data/      the grain iterator state, one JSON file per process
    meta/      JSON: the run's config, and each frozen tower's source path and content hash

Frozen towers are not written. A resumed run reloads them from their sources, and `check_frozen`
refuses to continue if their content no longer matches the recorded hash. Saves are asynchronous
(the step loop continues while the arrays are written); keep-N and the save interval come from
the config.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from blip2_jax.convert.mapping import flatten


class CheckpointError(RuntimeError):
    pass


def tree_hash(tree: Mapping) -> str:
    """sha256 over the sorted leaf paths, dtypes, shapes and bytes: a content fingerprint."""
    h = hashlib.sha256()
    for path, leaf in sorted(flatten(tree).items()):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{path}|{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
                 save_interval_steps: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                               save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `save` at `step` writes a checkpoint (the interval says so)."""
        return self.manager.should_save(step)

    def save(self, step: int, state, data_iterator, meta: Mapping[str, Any], *,
             force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it did."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(dict(meta))), force=force)

    def meta(self, step: Optional[int] = None) -> dict:
        """The JSON meta of `step` (default: the latest) alone: no arrays are read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, abstract_state, data_iterator=None, step: Optional[int] = None):
        """(state, meta) of `step` (default: the latest); the iterator, when given, is restored
        in place (evaluation passes None and reads the state alone)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def check_frozen(recorded: Mapping[str, Mapping], current: Mapping[str, Mapping]) -> None:
    """Fail when a frozen tower's source or content differs from what the checkpoint recorded."""
    problems = []
    for tower, rec in recorded.items():
        cur = current.get(tower)
        if cur is None:
            problems.append(f"{tower}: recorded (source {rec.get('source')!r}) but not loaded now")
        elif rec.get("sha256") != cur.get("sha256"):
            problems.append(f"{tower}: content hash {cur.get('sha256', '')[:12]}… from "
                            f"{cur.get('source')!r} differs from the checkpoint's "
                            f"{rec.get('sha256', '')[:12]}… (source {rec.get('source')!r})")
    for tower in set(current) - set(recorded):
        problems.append(f"{tower}: frozen now but not recorded in the checkpoint")
    if problems:
        raise CheckpointError("the frozen towers differ from the ones this run was trained "
                              "with:\n  " + "\n  ".join(problems))
