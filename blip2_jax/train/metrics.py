"""Metric writing: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard
event files under `WORKDIR/tb/` (tensorboardX, no TensorFlow). Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)      # JSON has no NaN/inf
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tb.close()
            self._jsonl = self._tb = None


def drop_rows_after(workdir: str, step: int) -> int:
    """Removes the rows of WORKDIR/metrics.jsonl past `step` (a run resumed from a checkpoint at
    `step` logs them again); returns how many."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return len(lines) - len(keep)
