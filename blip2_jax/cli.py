"""What `train.py` and `eval.py` share: the jax.distributed flags and logging set-up."""
from __future__ import annotations

import logging

from absl import flags

COORDINATOR = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "jax.distributed process count")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "jax.distributed process index")
DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                "jax.distributed.initialize() with the platform's detection")


def setup() -> None:
    """Quiet library logging, ours at INFO; then `jax.distributed.initialize` when asked
    (explicit coordinator / process flags, or --distributed for TPU pods / SLURM / k8s)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)     # orbax / tfds chatter
    logging.getLogger("blip2_jax").setLevel(logging.INFO)
    import jax
    if COORDINATOR.value or NUM_PROCESSES.value:
        jax.distributed.initialize(coordinator_address=COORDINATOR.value,
                                   num_processes=NUM_PROCESSES.value,
                                   process_id=PROCESS_ID.value)
    elif DISTRIBUTED.value:
        jax.distributed.initialize()
