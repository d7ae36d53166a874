"""Train BLIP-2: `python train.py --config configs/NAME.py[:args] --workdir DIR [--config.key=value]`.

Re-running the same command resumes from the latest checkpoint in DIR. Multi-host: pass
`--coordinator-address HOST:PORT --num-processes N --process-id I` on every host (or set
`--distributed` to let `jax.distributed.initialize()` detect a TPU pod / SLURM / Kubernetes).
See blip2_jax/train/loop.py for what DIR holds. Flags: blip2_jax/cli.py (`--help`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from blip2_jax import cli


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                           config=True, lock_config=True, distributed=True)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="output directory (checkpoints, metrics); a re-run resumes from it")
    p.add_argument("--verbose", action="store_true",
                   help="show the traceback of an error in the input too (also: "
                        "BLIP2_JAX_TRACEBACK=1)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`argv` as sys.argv: the program name first."""
    argv = list(sys.argv if argv is None else argv)
    args = parser().parse_args(argv[1:])
    cli.setup(args)
    from blip2_jax.train import loop      # after jax.distributed.initialize (cli.setup)
    try:
        result = loop.run(args.config, args.workdir)
    except user_errors() as e:
        # A mistake in the config, the data or the work directory: its message names it and
        # the fix; a bug (any other exception) keeps its traceback.
        if args.verbose or os.environ.get("BLIP2_JAX_TRACEBACK"):
            raise
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=float))
    return 0


def user_errors() -> tuple:
    """The exceptions that report bad input (configs, checkpoints, datasets, work directories)."""
    from blip2_jax import checkpoint, config, run_config
    from blip2_jax.convert import mapping, stream
    from blip2_jax.data import builders, features, records
    from blip2_jax.eval import evaluators
    from blip2_jax.train import init, loop
    return (run_config.RunConfigError, config.ConfigError, loop.ResumeError, init.InitError,
            features.FeatureCacheError, records.AnnotationError, builders.DatasetError,
            FileNotFoundError, mapping.MappingError, stream.CheckpointError,
            checkpoint.CheckpointError, evaluators.EvalConfigError)


if __name__ == "__main__":
    sys.exit(main())
