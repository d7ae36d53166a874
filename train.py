"""Train BLIP-2: `python train.py --config configs/NAME.py[:args] --workdir DIR [--config.key=value]`.

Re-running the same command resumes from the latest checkpoint in DIR. Multi-host: pass
`--coordinator-address HOST:PORT --num-processes N --process-id I` on every host (or set
`--distributed` to let `jax.distributed.initialize()` detect a TPU pod / SLURM / Kubernetes).
See blip2_jax/train/loop.py for what DIR holds. Flags: blip2_jax/cli.py (`--help`).
"""
from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from blip2_jax import cli


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                           config=True, lock_config=True, distributed=True)
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="output directory (checkpoints, metrics); a re-run resumes from it")
    cli.add_verbose_argument(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`argv` as sys.argv: the program name first."""
    argv = list(sys.argv if argv is None else argv)
    args = parser().parse_args(argv[1:])
    cli.setup(args)
    from blip2_jax.train import loop      # after jax.distributed.initialize (cli.setup)
    result = {}
    code = cli.report_errors("train.py",
                             lambda: result.update(loop.run(args.config, args.workdir)),
                             loop.USER_ERRORS, args.verbose)
    if code == 0:
        print(json.dumps(result, default=float))
    return code


if __name__ == "__main__":
    sys.exit(main())
