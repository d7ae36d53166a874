"""Evaluate BLIP-2: the evaluators a config names (captioning, VQA, retrieval) on a trained model.

    python eval.py --config configs/NAME.py[:args] (--workdir DIR | --checkpoint PATH) \\
        [--output OUT] [--config.key=value ...]

--workdir: a train.py run directory (its final/ export, or its latest checkpoint when the run
  has not finished); OUT defaults to DIR/eval/step_N (where train.py's in-training
  evaluation of step N also goes), and the report plots DIR/metrics.jsonl.
--checkpoint: a model directory (ours, native, or a Hugging Face BLIP-2 save_pretrained dir);
  OUT defaults to ./eval_<checkpoint name>.
Writes OUT/results.json, OUT/predictions.jsonl and OUT/report.html (blip2_jax/eval/runner.py).
The evaluators live in config.eval (blip2_jax/eval/evaluators.py lists their settings); their
datasets in config.data.data_dir unless an evaluator names its own; tokenizers come from
config.text (llm_tokenizer / qformer_tokenizer), else from the checkpoint directory.
Multi-host: the same flags as train.py (--coordinator_address ... or --distributed).
"""
from __future__ import annotations

import datetime
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from blip2_jax import cli
from blip2_jax import run_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "a train.py run directory to evaluate")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a model directory (native or HF)")
_OUTPUT = flags.DEFINE_string("output", None, "where results, predictions and report go")
_NO_REPORT = flags.DEFINE_bool("no_report", False, "skip report.html")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    cli.setup()
    from blip2_jax.checkpoint import CheckpointError
    from blip2_jax.config import ConfigError
    from blip2_jax.convert.mapping import MappingError
    from blip2_jax.eval.evaluators import EvalConfigError
    try:
        evaluate()
    except (FileNotFoundError, ConfigError, EvalConfigError, MappingError, CheckpointError,
            KeyError) as e:
        # Bad input (paths, configs, evaluator settings): the message, not a traceback.
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def evaluate():
    import blip2_jax
    from blip2_jax.eval import runner
    from blip2_jax.train import loop

    config = _CONFIG.value
    evs, tokenizers = run_config.evaluators(config)
    if not evs:
        raise app.UsageError("the config names no evaluators (config.eval.evaluators)")
    if _WORKDIR.value:
        model, source = loop.load_trained(config, _WORKDIR.value)
        out = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval", f"step_{source['step']}")
        curves = os.path.join(_WORKDIR.value, "metrics.jsonl")
    else:
        path = _CHECKPOINT.value
        model = blip2_jax.load(path, dtype=(config.get("eval") or {}).get("dtype") or None)
        source = {"source": os.path.abspath(path), "step": None}
        out = _OUTPUT.value or f"eval_{os.path.basename(os.path.normpath(path))}"
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
            "config": config_flags.get_config_filename(flags.FLAGS["config"]),
            "devices": f"{len(mesh.devices.flat)} × {mesh.devices.flat[0].platform}",
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    results = runner.run(model, evs, mesh=mesh, tokenizers=tokenizers, out_dir=out, info=info,
                         metrics_jsonl=curves, report=not _NO_REPORT.value)
    print(json.dumps({r.name: r.metrics for r in results}, default=str, indent=1))
    print(f"wrote {out}/results.json, predictions.jsonl"
          + ("" if _NO_REPORT.value else ", report.html"))


if __name__ == "__main__":
    app.run(main)
