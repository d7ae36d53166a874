"""Checkpoint conversion at full size: HF -> native -> HF against copying the files.

Generates a randomly filled `blip2-opt-2.7b`-shaped HF checkpoint (3.8 B parameters, fp16,
~7.7 GB, sharded like the hub's: 5 GB shards + index; nothing is committed), then times, each in
its own process with its peak resident memory (`wait4` rusage):
  copy      `cp -r` of the HF directory (the reference: the least any conversion must do)
  hf->ours  `python -m blip2_jax.convert HF NATIVE --to native`
  ours->hf  `python -m blip2_jax.convert NATIVE HF2 --to hf`
each followed by `sync` (timed apart, so page-cache effects are visible), then checks that HF2
holds the original tensors bit for bit. Targets (issue 7): conversion time / copy time <= 2, peak
RSS <= 1.5 GB + the largest tensor.

    python bench/convert.py [--dir /tmp/convert_bench] [--keep] [--preset blip2-opt-2.7b]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The parent only spawns and measures: it imports nothing heavy, since a child's peak RSS counts
# the parent's pages it was forked with.


def generate(path: str, preset: str) -> tuple[int, int, int]:
    """Write the random HF checkpoint; (parameters, bytes, largest tensor bytes)."""
    import numpy as np
    from blip2_jax.config import get_preset
    from blip2_jax.convert import hf, stream
    cfg = get_preset(preset)
    shapes = stream.model_shapes(cfg)
    pool = np.random.default_rng(0).standard_normal(1 << 24).astype(np.float16) * 0.02

    def filler(shape, salt):
        def read(j):
            s = shape if j is None else shape[1:]
            n = int(np.prod(s))
            start = (salt * 7919 + (j or 0) * 104729) % (pool.size - 1)
            reps = -(-(start + n) // pool.size) + 1
            return np.tile(pool, reps)[start:start + n].reshape(s) if n > pool.size - start \
                else pool[start:start + n].reshape(s).copy()
        return read
    leaves = {k: stream.Leaf(s, np.dtype(np.float16), filler(s, i), stacked=True)
              for i, (k, s) in enumerate(sorted(shapes.items()))}
    leaves.pop("temp", None)
    hf.write(path, cfg, leaves)
    entries = hf.entries(cfg, leaves)
    n = sum(int(np.prod(s)) for s in shapes.values())
    return n, sum(e.nbytes for e in entries), max(e.nbytes for e in entries)


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, seconds of the sync after it, peak RSS GB) of one command in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    start = time.perf_counter()
    os.sync()
    return seconds, time.perf_counter() - start, usage.ru_maxrss / 1024**2


def same_tensors(a: str, b: str) -> int:
    import numpy as np
    from blip2_jax.convert import stream
    ra, rb = stream.SafetensorsReader(a), stream.SafetensorsReader(b)
    if ra.keys() != rb.keys():
        raise SystemExit(f"key sets differ: {sorted(ra.keys() ^ rb.keys())[:10]}")
    for k in sorted(ra.keys()):
        if not np.array_equal(ra.get(k).view(np.uint8), rb.get(k).view(np.uint8)):
            raise SystemExit(f"{k} differs after HF -> native -> HF")
    return len(ra.keys())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/convert_bench")
    ap.add_argument("--preset", default="blip2-opt-2.7b")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--step", choices=("generate", "check"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step == "generate":
        print(json.dumps(generate(os.path.join(args.dir, "hf"), args.preset)))
        return
    if args.step == "check":
        print(same_tensors(os.path.join(args.dir, "hf"), os.path.join(args.dir, "hf2")))
        return
    src, copy, nat, back = (os.path.join(args.dir, n) for n in ("hf", "copy", "native", "hf2"))
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    t = time.perf_counter()
    me = [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--preset", args.preset]
    n, nbytes, largest = json.loads(subprocess.run(me + ["--step", "generate"], check=True,
                                                   capture_output=True, text=True).stdout)
    os.sync()
    print(f"generated {args.preset}: {n / 1e9:.2f} B params, {nbytes / 1e9:.2f} GB fp16, largest "
          f"tensor {largest / 1e6:.0f} MB, in {time.perf_counter() - t:.0f} s", flush=True)
    py = [sys.executable, "-m", "blip2_jax.convert"]
    rows = {}
    rows["copy"] = run(["cp", "-r", src, copy])
    shutil.rmtree(copy)
    rows["hf->ours"] = run(py + [src, nat, "--to", "native"])
    rows["ours->hf"] = run(py + [nat, back, "--to", "hf"])
    checked = int(subprocess.run(me + ["--step", "check"], check=True, capture_output=True,
                                 text=True).stdout)
    budget = 1.5 + largest / 1024**3
    copy_s = rows["copy"][0] + rows["copy"][1]
    print("\n| step | seconds | + sync | peak RSS GB | time / copy (with sync) |")
    print("|---|---|---|---|---|")
    for name, (s, sync, rss) in rows.items():
        print(f"| {name} | {s:.1f} | {sync:.1f} | {rss:.2f} | {s / rows['copy'][0]:.2f} "
              f"({(s + sync) / copy_s:.2f}) |")
    worst_rss = max(r[2] for k, r in rows.items() if k != "copy")
    worst_ratio = max((r[0] + r[1]) / copy_s for k, r in rows.items() if k != "copy")
    print(f"\nHF -> native -> HF bit-exact: {checked} tensors. Peak RSS {worst_rss:.2f} GB "
          f"(target <= {budget:.2f} GB); worst time ratio {worst_ratio:.2f} (target <= 2).")
    print(json.dumps({"params": n, "bytes": nbytes, "largest": largest, "rows": rows}))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
