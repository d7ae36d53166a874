"""Captions per second with beam search: blip2-jax `generate` vs HF transformers `generate`.

Same weights (HF save_pretrained → blip2_jax.load), same images and settings (beam 5, exactly 30 new
tokens: min_new_tokens = max_new_tokens so neither stops early), same CPU, fp32 (defaults; see
--device and --dtype). Also prints the compile time of our decode program (the first call minus a
warm call).

    python bench/generate_throughput.py [--llm opt|t5] [--batch 4] [--beams 5] [--iters 3]
                                        [--device cpu|cuda] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from forward_throughput import add_model_args, build_pair, setup_device, sync
    add_model_args(ap, batch=4, width=256)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()

    import jax
    import torch

    device = setup_device(args)
    hf_model, ours = build_pair(args)
    b, n = args.batch, args.new_tokens
    pix = np.random.default_rng(0).normal(size=(b, args.image_size, args.image_size, 3)
                                          ).astype(np.float32)
    gen = dict(max_new_tokens=n, min_new_tokens=n, num_beams=args.beams, do_sample=False)

    pix_hf = torch.from_numpy(pix.transpose(0, 3, 1, 2).copy()).to(device,
                                                                     getattr(torch, args.dtype))

    def run_hf():
        with torch.inference_mode():
            out = hf_model.generate(pixel_values=pix_hf, **gen)
        sync(device)
        return out

    def run_ours():
        return ours.generate(pix, **gen)

    t0 = time.perf_counter()
    run_ours()
    first = time.perf_counter() - t0
    times = {"hf": [], "ours": []}
    run_hf()
    for _ in range(args.iters):
        for name, fn in (("hf", run_hf), ("ours", run_ours)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in times.items()}
    print(f"device: jax {jax.devices()[0].device_kind}, torch {device}; torch threads "
          f"{torch.get_num_threads()}; model {args.llm}, width {args.width}, {args.layers} "
          f"layers/tower, batch {b}, beam {args.beams}, {n} new tokens, {args.dtype}")
    print(f"HF transformers generate: {t['hf']:7.2f} s/batch  {b / t['hf']:7.2f} captions/s")
    print(f"blip2-jax generate:       {t['ours']:7.2f} s/batch  {b / t['ours']:7.2f} captions/s")
    print(f"compile time of the decode program: {first - t['ours']:.1f} s")
    print(f"ratio ours/HF captions per second: {t['hf'] / t['ours']:.2f}")


if __name__ == "__main__":
    main()
