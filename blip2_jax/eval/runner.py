"""Run evaluators on a model and write what they found:

    OUT/results.json       {"info": {...}, "metrics": {evaluator: {metric: value}}, "seconds": {...}}
    OUT/predictions.jsonl  one JSON object per sample, each with its "evaluator"
    OUT/report.html        the page a person reads (report_files/ beside it: thumbnails, curves)

Only process 0 writes; every process runs the evaluators (they shard over the mesh).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np

from blip2_jax.eval import report as report_lib
from blip2_jax.eval.evaluators import EvalResult, Evaluator, Tokenizers

log = logging.getLogger(__name__)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    return str(x)


def run(model, evaluators: Sequence[Evaluator], *, mesh=None,
        tokenizers: Tokenizers = Tokenizers(), out_dir: Optional[str] = None,
        info: Optional[dict] = None, metrics_jsonl: Union[str, Mapping[str, str], None] = None, report: bool = True,
        progress: bool = True) -> list[EvalResult]:
    """Every evaluator in turn; with `out_dir`, results.json, predictions.jsonl and (`report`)
    report.html (with training curves from `metrics_jsonl` when given: a path, or {label: path}
    to compare runs in the same plots)."""
    results, seconds = [], {}
    for ev in evaluators:
        t0 = time.perf_counter()
        result = ev.run(model, mesh=mesh, tokenizers=tokenizers, progress=progress)
        seconds[ev.name] = time.perf_counter() - t0
        log.info("eval %s (%.1f s): %s", ev.name, seconds[ev.name],
                 ", ".join(f"{k} {v:.4g}" for k, v in result.numeric_metrics().items()))
        results.append(result)
    if out_dir and jax.process_index() == 0:
        write(out_dir, results, info=info, seconds=seconds, metrics_jsonl=metrics_jsonl,
              report=report)
    return results


def write(out_dir: str, results: Sequence[EvalResult], *, info: Optional[dict] = None,
          seconds: Optional[dict] = None, metrics_jsonl: Union[str, Mapping[str, str], None] = None,
          report: bool = True) -> None:
    os.makedirs(out_dir, exist_ok=True)
    summary = {"info": info or {}, "metrics": {r.name: r.metrics for r in results},
               "kinds": {r.name: r.kind for r in results}, "seconds": seconds or {}}
    _atomic_write(os.path.join(out_dir, "results.json"),
                  json.dumps(summary, indent=2, default=_jsonable))
    lines = [json.dumps(p, default=_jsonable) for r in results for p in r.predictions]
    _atomic_write(os.path.join(out_dir, "predictions.jsonl"), "\n".join(lines) + "\n")
    if report:
        report_lib.write_report(
            out_dir, [{"name": r.name, "kind": r.kind, "metrics": r.metrics,
                       "examples": r.examples} for r in results],
            metrics_jsonl=metrics_jsonl, info=info)


def _atomic_write(path: str, text: str) -> None:
    """Written beside and renamed, so an interrupted run never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
