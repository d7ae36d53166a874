"""The frozen-feature cache's speed-up: the same train.py run (`train.loop.run`: pipeline, sharded
jitted step, checkpoints off) from images and from the cache (blip2_jax/data/features.py), on the
built-in synthetic dataset, same config, same steps.

    python bench/feature_cache.py                       # stage 1 at ViT-g's FLOP proportions
    python bench/feature_cache.py --stage 2 --json /tmp/fc.json
    python bench/feature_cache.py --vit-layers 2 --qformer-layers 2 --steps 5 --images 32  # smoke

The shape keeps the real sequence lengths (224-px images in 14-px patches: 257 image tokens, 32
queries, 32 text tokens) and cuts width and depth so a step takes about a second on 2 CPU cores.
The depths (ViT 32 layers in stage 1; ViT 12 and OPT 24 in stage 2; Q-Former 4) put the ViT's
share of the step's counted FLOPs (train/flops.py) near the paper config's (ViT-g stage 1 68 %,
OPT-2.7B stage 2 43 %; printed side by side): the share the cache removes.

Printed: the cache build (seconds, images, bytes), steady-state training throughput both ways
(samples/s over the steps after the first two logged ones: compile and warm-up excluded) and the
speed-up; and the losses of the last step both ways (they agree: the same computation).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]
from blip2_jax.train import features as feature_builder
from blip2_jax import run_config


def _config(a, data_dir: str, feats: str):
    import runs
    stage = "tiny_stage1" if a.stage == 1 else "tiny_stage2"
    arg = data_dir if a.stage == 1 else f"opt,{data_dir}"
    c = runs.config(stage, arg, total_steps=a.steps, checkpoint_every_steps=10 ** 6,
                    **{"data.features": feats, "data.num_threads": 2})
    c.batch_size = a.batch
    w = a.width
    c.model_overrides = dict(
        vision=dict(hidden_size=w, intermediate_size=4 * w, num_layers=a.vit_layers,
                    num_heads=w // 64, image_size=224, patch_size=14),
        qformer=dict(hidden_size=w, intermediate_size=4 * w, num_layers=a.qformer_layers,
                     num_heads=w // 64, encoder_hidden_size=w, cross_attention_frequency=2,
                     max_position_embeddings=64),
        num_query_tokens=32)
    if a.stage == 2:
        c.model_overrides["llm"] = dict(hidden_size=w, ffn_dim=4 * w, num_layers=a.llm_layers,
                                        num_heads=w // 64, word_embed_proj_dim=w,
                                        max_position_embeddings=128, vocab_size=384)
    c.text.max_length = 32
    c.eval.evaluators = {}
    return c


def _flop_shares(a, c) -> tuple[float, float]:
    """(ViT share of this shape's step FLOPs, of the paper config's)."""
    import importlib.util
    from blip2_jax.train import flops

    def share(config):
        cfg = run_config.model_config(config)
        br = flops.train_step_flops_breakdown(cfg, run_config.text_setup(config, cfg, tokenizers=False).loss,
                                              config.batch_size, 32, target_len=32)
        return br["vision"] / sum(br.values())
    name, arg = ("stage1", "vit_g") if a.stage == 1 else ("stage2", "opt-2.7b")
    spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, "configs",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return share(c), share(module.get_config(arg))


def _throughput(workdir: str, skip: int = 2) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][skip:]
    return statistics.median(rates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), default=1)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vit-layers", type=int, default=None,
                   help="default: 32 (stage 1), 12 (stage 2): the paper configs' ViT share")
    p.add_argument("--qformer-layers", type=int, default=4)
    p.add_argument("--llm-layers", type=int, default=24)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=128, help="training images in the dataset")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.vit_layers is None:
        a.vit_layers = 32 if a.stage == 1 else 12

    import jax
    import runs
    from blip2_jax.train import loop

    work = tempfile.mkdtemp(prefix="feature_cache_")
    data_dir = runs.synthetic_data(os.path.join(work, "data"), train=a.images, test=8, val=8)
    feats = os.path.join(work, "features")
    config = _config(a, data_dir, feats)
    share, paper_share = _flop_shares(a, config)

    t0 = time.perf_counter()
    (meta,) = feature_builder.build(config, batch_size=a.batch, log=lambda *_: None)
    build_s = time.perf_counter() - t0
    cache_bytes = sum(os.path.getsize(os.path.join(feats, "blip2_captions/synthetic/train", s))
                      for s in meta["shards"])

    results = {}
    for name, directory in (("images", ""), ("cache", feats)):
        c = _config(a, data_dir, directory)
        out = loop.run(c, os.path.join(work, name))
        results[name] = {"samples_per_s": _throughput(os.path.join(work, name)),
                         "loss": out["loss"]}
    speedup = results["cache"]["samples_per_s"] / results["images"]["samples_per_s"]
    report = {
        "date": time.strftime("%Y-%m-%d"), "devices": f"{jax.device_count()} x "
        f"{jax.devices()[0].device_kind}", "stage": a.stage, "batch": a.batch, "steps": a.steps,
        "vit_flop_share": share, "paper_vit_flop_share": paper_share,
        "cache": {"seconds": build_s, "images": meta["images"], "bytes": cache_bytes,
                  "shape": meta["shape"], "dtype": meta["dtype"]},
        **{f"{k}_samples_per_s": v["samples_per_s"] for k, v in results.items()},
        **{f"{k}_loss": v["loss"] for k, v in results.items()},
        "speedup": speedup,
    }
    print(f"stage {a.stage}: ViT share of the step's FLOPs {share:.0%} (paper config "
          f"{paper_share:.0%}; ideal speed-up {1 / (1 - share):.2f}x)")
    print(f"cache: {meta['images']} images -> {meta['shape']} {meta['dtype']}, "
          f"{cache_bytes / 1e6:.1f} MB, built in {build_s:.1f} s")
    print("| input | samples/s | last loss |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v['samples_per_s']:.2f} | {v['loss']:.4f} |")
    print(f"speed-up {speedup:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
