"""What `train.py`, `eval.py` and the feature-cache builder share: the jax.distributed flags and
logging set-up."""
from __future__ import annotations

import logging
from typing import Callable

import jax
from absl import flags, logging as absl_logging


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Callable[[], None]:
    """Define --coordinator_address / --num_processes / --process_id / --distributed on
    `flag_values`; returns the function that initialises jax.distributed as they say (explicit
    coordinator and process flags, or --distributed for the platform's own detection on TPU
    pods / SLURM / k8s; nothing without them)."""
    coordinator = flags.DEFINE_string("coordinator_address", None,
                                      "jax.distributed coordinator", flag_values=flag_values)
    num_processes = flags.DEFINE_integer("num_processes", None, "jax.distributed process count",
                                         flag_values=flag_values)
    process_id = flags.DEFINE_integer("process_id", None, "jax.distributed process index",
                                      flag_values=flag_values)
    detect = flags.DEFINE_bool("distributed", False,
                               "jax.distributed.initialize() with the platform's detection",
                               flag_values=flag_values)

    def initialize() -> None:
        if coordinator.value or num_processes.value:
            jax.distributed.initialize(coordinator_address=coordinator.value,
                                       num_processes=num_processes.value,
                                       process_id=process_id.value)
        elif detect.value:
            jax.distributed.initialize()
    return initialize


_initialize_distributed = define_distributed_flags()


def setup() -> None:
    """Quiet library logging, ours at INFO; then `jax.distributed.initialize` when the flags
    ask for it."""
    absl_logging.set_verbosity(absl_logging.WARNING)     # orbax / tfds chatter
    logging.getLogger("blip2_jax").setLevel(logging.INFO)
    _initialize_distributed()
