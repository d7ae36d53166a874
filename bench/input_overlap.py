"""Does train.py overlap input work with the device step? The same `train.loop.run` (stage 1,
tiny preset, synthetic data, checkpoints and evaluation off) three ways:

    step only   no added input cost: Y, the time per step of the step itself (and the
                pipeline as it is)
    input only  X ms of host work added to every batch the loop draws, measured alone
    both        the run with the added input cost

A loop that waits on the device each step takes X + Y per step; one that reads the next batch
while the step runs takes max(X, Y). Printed: the three per-step times, X + Y, max(X, Y), and
`both / max(X, Y)` (≈ 1: overlapped; ≈ (X + Y) / max(X, Y): serial).

    python bench/input_overlap.py                      # X chosen ≈ Y
    python bench/input_overlap.py --input-ms 80 --steps 40 --batch 32

The added input cost is host time spent in the loop's thread when it draws a batch (a sleep in
the iterator's `__next__`, standing for decoding, augmentation and tokenization that did not fit
grain's read threads, or a slow reader), so it competes for no core with the step itself.
Per-step time: the steady-state `steps_per_s` train.py logs over the run's last window (the
first step and compilation excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]


def _slow_iterator(inner, seconds: float):
    import grain

    class SlowIterator(grain.DatasetIterator):
        """A pipeline iterator whose `__next__` costs `seconds` more host time."""

        def __next__(self):
            time.sleep(seconds)
            return next(inner)

        def get_state(self):
            return inner.get_state()

        def set_state(self, state):
            inner.set_state(state)
    return SlowIterator(inner)       # its parent: pipeline.skipped() walks to the pipeline


class _SlowDataset:
    def __init__(self, inner, seconds: float):
        self._inner, self._seconds = inner, seconds

    def __iter__(self):
        return _slow_iterator(iter(self._inner), self._seconds)


def _seconds_per_step(args, data_dir: str, input_s: float) -> float:
    import runs
    from blip2_jax.data import pipeline
    from blip2_jax.train import loop

    c = runs.config("tiny_stage1", data_dir, total_steps=args.steps,
                    checkpoint_every_steps=10 ** 6, log_every_steps=args.steps)
    c.batch_size = args.batch
    c.eval.evaluators = {}
    original = pipeline.Pipeline.dataset
    pipeline.Pipeline.dataset = lambda self: _SlowDataset(original(self), input_s)
    try:
        with tempfile.TemporaryDirectory() as work:
            loop.run(c, work)
            with open(os.path.join(work, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
    finally:
        pipeline.Pipeline.dataset = original
    return 1.0 / rows[-1]["steps_per_s"]       # the window after step 1: steady state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-ms", type=float, default=None,
                   help="added host cost per batch (default: the measured step time)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import runs
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = runs.synthetic_data(os.path.join(tmp, "data"), train=128, test=8)
        step = _seconds_per_step(args, data_dir, 0.0)
        x = (args.input_ms / 1e3) if args.input_ms is not None else step
        both = _seconds_per_step(args, data_dir, x)
    serial, overlapped = x + step, max(x, step)
    out = {"step_ms": 1e3 * step, "input_ms": 1e3 * x, "both_ms": 1e3 * both,
           "serial_ms": 1e3 * serial, "overlapped_ms": 1e3 * overlapped,
           "ratio_to_max": both / overlapped, "ratio_serial_to_max": serial / overlapped}
    print(f"step alone Y {out['step_ms']:.1f} ms, input X {out['input_ms']:.1f} ms, "
          f"run with both {out['both_ms']:.1f} ms per step")
    print(f"X + Y = {out['serial_ms']:.1f} ms, max(X, Y) = {out['overlapped_ms']:.1f} ms: "
          f"both / max(X, Y) = {out['ratio_to_max']:.2f} (serial would be "
          f"{out['ratio_serial_to_max']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
