"""What the run-config entry points (train.py, eval.py, `python -m` train.features and aot)
report as bad input: one line `PROG: error: ...`, exit status 2 (`cli.report_errors`). The
classes live in the modules that raise them; any other exception is a bug and keeps its
traceback. train.py and eval.py add the training loop's own (`loop.USER_ERRORS`)."""
from __future__ import annotations

from blip2_jax import checkpoint as ckpt_lib, config as config_lib, processing, run_config
from blip2_jax.convert import sources
from blip2_jax.data import builders, features, records
from blip2_jax.eval import evaluators
from blip2_jax.train import init as init_lib

# Configs (a bad value, an unknown preset), checkpoints (missing, of another model, an orbax
# checkpoint that does not restore), datasets and feature caches, tokenizer files.
USER_ERRORS = (run_config.RunConfigError, config_lib.ConfigError, init_lib.InitError,
               *sources.CHECKPOINT_ERRORS, ckpt_lib.CheckpointError, processing.TokenizerError,
               records.AnnotationError, builders.DatasetError, features.FeatureCacheError,
               evaluators.EvalConfigError)
