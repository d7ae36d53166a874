"""A/B of a train-step lever on this machine: the stage-1 step (ITC + ITM + ITG) built twice, the
lever off and on, checked equal, then timed in alternating rounds (a busy machine slows both).

    python bench/step_levers.py                      # itm_image_kv_once, bench/train_step.py's shape
    python bench/step_levers.py --width 128 --layers 2 --rounds 5      # smoke

Lever `itm_image_kv_once` (train/step.py): the ITM pairs that show the row's own image reuse
its cross-attention keys/values from the query pass; only the B hard-negative images are
projected again (instead of 3B).

Shape (bench/train_step.py's): width 256 (head dim 64), 4 layers in the ViT and the Q-Former
(cross-attention every 2nd layer), 224-px images in 14-px patches (257 tokens), 32 queries, text
32, vocab 4096, batch 8, fp32, dropout --dropout (default 0: the check's program; with dropout the
two variants draw different masks, so only the timing is compared).
Printed: the loss terms, gradient and parameter norms of one step each (equal to float
rounding), the median step time of each over --rounds rounds and the speed-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from blip2_jax.models import blip2 as blip2_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lever", default="itm_image_kv_once", choices=["itm_image_kv_once"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import jax
    from jax.sharding import Mesh
    from blip2_jax import config as config_lib
    from blip2_jax.train import defaults
    from blip2_jax.losses import LossConfig
    from blip2_jax.train.trainer import Trainer

    w = a.width
    cfg = config_lib.get_preset("tiny-stage1")
    cfg = cfg.replace(
        vision=dataclasses.replace(cfg.vision, hidden_size=w, intermediate_size=4 * w,
                                   num_layers=a.layers, num_heads=w // 64, image_size=224,
                                   patch_size=14),
        qformer=dataclasses.replace(cfg.qformer, hidden_size=w, intermediate_size=4 * w,
                                    num_layers=a.layers, num_heads=w // 64,
                                    encoder_hidden_size=w, cross_attention_frequency=2,
                                    max_position_embeddings=64, vocab_size=4096,
                                    hidden_dropout=a.dropout, attention_dropout=a.dropout),
        num_query_tokens=32)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    params = blip2_model.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    b = a.batch
    batch = {"image": rng.normal(size=(b, 224, 224, 3)).astype(np.float32),
             "qformer_ids": rng.integers(1, 4000, (b, 32)).astype(np.int32),
             "qformer_mask": np.ones((b, 32), np.int32)}
    opt = dict(defaults.base_config().optimizer.to_dict(), lr=1e-4)
    runs, first = {}, {}
    for on in (False, True):
        lc = LossConfig(dec_token_id=4095, **{a.lever: on})
        tr = Trainer(cfg, lc, opt, total_steps=10, mesh=mesh, frozen=("vision/.*",),
                     frozen_dtype="float32")
        state, frozen = tr.init(params)
        placed = tr.place(batch)
        compiled = tr.compile(state, frozen, placed)
        state, m = compiled(state, frozen, placed)
        first[on] = {k: float(v) for k, v in m.items()
                     if k in ("loss", "itc", "itm", "itg", "grad_norm", "param_norm")}
        runs[on] = [compiled, state, frozen, placed]
    times = {False: [], True: []}
    for _ in range(a.rounds):
        for on in (False, True):
            compiled, state, frozen, placed = runs[on]
            t0 = time.perf_counter()
            state, m = compiled(state, frozen, placed)
            jax.block_until_ready(m)
            times[on].append(time.perf_counter() - t0)
            runs[on][1] = state
    off_ms, on_ms = (1000 * statistics.median(times[k]) for k in (False, True))
    print(f"lever {a.lever}, width {w}, {a.layers} layers, batch {b}, dropout {a.dropout}, "
          f"{jax.devices()[0].device_kind}, load {os.getloadavg()[0]:.1f}")
    print("| | " + " | ".join(first[False]) + " | median ms/step |")
    print("|---" * (len(first[False]) + 2) + "|")
    for on, ms in ((False, off_ms), (True, on_ms)):
        print(f"| {'on' if on else 'off'} | " + " | ".join(f"{v:.6f}" for v in first[on].values())
              + f" | {ms:.0f} |")
    print(f"speed-up {off_ms / on_ms:.3f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"lever": a.lever, "off_ms": off_ms, "on_ms": on_ms, "first": first,
                       "speedup": off_ms / on_ms}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
