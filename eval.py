"""Evaluate BLIP-2: the evaluators a config names (captioning, VQA, retrieval) on a trained model.

    python eval.py --workdir DIR [--config configs/NAME.py[:args]] [--output OUT] [--no-report] \\
        [--config.key=value ...]
    python eval.py --config configs/NAME.py[:args] --checkpoint PATH [...]

--workdir: a train.py run directory (its final/ export, or its latest checkpoint when the run
  has not finished), evaluated with the run's own config (DIR/config.json) unless --config
  names another; --config.key=value overrides apply on top of either. OUT defaults to
  DIR/eval/step_N (where train.py's in-training evaluation of step N also goes), and the
  report plots DIR/metrics.jsonl.
--checkpoint: a model directory (ours, native, or a Hugging Face BLIP-2 save_pretrained dir),
  with --config; OUT defaults to ./eval_<checkpoint name>.
Writes OUT/results.json, OUT/predictions.jsonl and OUT/report.html (blip2_jax/eval/runner.py).
The evaluators live in config.eval (blip2_jax/eval/evaluators.py lists their settings); their
datasets in config.data.data_dir unless an evaluator names its own; tokenizers come from
config.text (llm_tokenizer / qformer_tokenizer), else from the checkpoint directory.
Multi-host: the same flags as train.py (--coordinator-address ... or --distributed). Flags:
blip2_jax/cli.py (`--help`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Optional, Sequence

from blip2_jax import cli
from blip2_jax import run_config


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0],
                           config="optional", lock_config=True, distributed=True)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", metavar="DIR", help="a train.py run directory to evaluate")
    model.add_argument("--checkpoint", metavar="PATH", help="a model directory (native or HF)")
    p.add_argument("--output", metavar="OUT", help="where results, predictions and report go")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUT/report.html")
    cli.add_verbose_argument(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`argv` as sys.argv: the program name first."""
    argv = list(sys.argv if argv is None else argv)
    p = parser()
    args = p.parse_args(argv[1:])
    resolve_config(args, p)
    cli.setup(args)
    from blip2_jax.train import loop      # after jax.distributed.initialize (cli.setup)
    return cli.report_errors("eval.py", lambda: evaluate(args), loop.USER_ERRORS, args.verbose)


def resolve_config(args: argparse.Namespace, p: cli.ArgumentParser) -> None:
    """Without --config, `args.config` becomes the --workdir run's own config (its config.json)
    with the --config.KEY=VALUE overrides applied; a usage error when there is none."""
    if args.config is not None:
        return
    if not args.workdir:
        p.error("--checkpoint needs --config (a model directory holds no run config; a train.py "
                "--workdir is evaluated with its own)")
    try:
        config = run_config.load_stored(args.workdir)
        args.config = cli.apply_overrides(config, args.config_overrides, prog=p.prog,
                                          what=f"the run's config ({args.workdir}/config.json)")
    except (FileNotFoundError, cli.ConfigArgumentError) as e:
        p.error(f"--workdir: {e}" if isinstance(e, FileNotFoundError) else str(e))
    args.config_file = os.path.join(args.workdir, run_config.STORED_CONFIG)


def evaluate(args: argparse.Namespace):
    import blip2_jax
    from blip2_jax.config import ConfigError
    from blip2_jax.eval import runner
    from blip2_jax.train import loop

    config = args.config
    evs, tokenizers = run_config.evaluators(config)
    if not evs:
        raise ConfigError("the config names no evaluators (config.eval.evaluators)")
    if args.workdir:
        model, source = loop.load_trained(config, args.workdir)
        out = args.output or os.path.join(args.workdir, "eval", f"step_{source['step']}")
        curves = os.path.join(args.workdir, "metrics.jsonl")
    else:
        path = args.checkpoint
        model = blip2_jax.load(path, dtype=(config.get("eval") or {}).get("dtype") or None)
        source = {"source": os.path.abspath(path), "step": None}
        out = args.output or f"eval_{os.path.basename(os.path.normpath(path))}"
        curves = None
    # A tokenizer the evaluators need and the config does not name: the checkpoint's own
    # (a model without the tower is refused by the evaluator, naming it).
    needed = {ev.needs()[1] for ev in evs}
    if "llm" in needed and tokenizers.llm is None and model.config.llm is not None:
        tokenizers.llm = model.tokenizer
    if ("qformer" in needed and tokenizers.qformer is None
            and model.config.qformer.has_text_input):
        tokenizers.qformer = model.qformer_tokenizer
    mesh = run_config.make_mesh(config)
    info = {"model": source["source"], "step": source["step"],
            "config": args.config_file,
            "devices": f"{len(mesh.devices.flat)} × {mesh.devices.flat[0].platform}",
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    results = runner.run(model, evs, mesh=mesh, tokenizers=tokenizers, out_dir=out, info=info,
                         metrics_jsonl=curves, report=args.report)
    print(json.dumps({r.name: r.metrics for r in results}, default=str, indent=1))
    print(f"wrote {out}/results.json, predictions.jsonl"
          + (", report.html" if args.report else ""))


if __name__ == "__main__":
    sys.exit(main())
