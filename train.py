"""Train BLIP-2: `python train.py --config configs/NAME.py[:args] --workdir DIR [--config.key=value]`.

Re-running the same command resumes from the latest checkpoint in DIR. Multi-host: pass
`--coordinator_address HOST:PORT --num_processes N --process_id I` on every host (or set
`--distributed` to let `jax.distributed.initialize()` detect a TPU pod / SLURM / Kubernetes).
See blip2_jax/train/loop.py for what DIR holds.
"""
from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "jax.distributed process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "jax.distributed process index")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "jax.distributed.initialize() with the platform's detection")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
    import jax
    if _COORDINATOR.value or _NUM_PROCESSES.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)     # orbax / tfds chatter
    logging.getLogger("blip2_jax").setLevel(logging.INFO)
    init_distributed()
    from blip2_jax.train import loop
    result = loop.run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    app.run(main)
