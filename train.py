"""Train BLIP-2: `python train.py --config configs/NAME.py[:args] --workdir DIR [--config.key=value]`.

Re-running the same command resumes from the latest checkpoint in DIR. Multi-host: pass
`--coordinator_address HOST:PORT --num_processes N --process_id I` on every host (or set
`--distributed` to let `jax.distributed.initialize()` detect a TPU pod / SLURM / Kubernetes).
See blip2_jax/train/loop.py for what DIR holds.
"""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from blip2_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.setup()
    from blip2_jax.train import loop
    result = loop.run(_CONFIG.value, _WORKDIR.value)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    app.run(main)
