"""Input pipeline throughput and host memory: decode + augment + tokenize at 224 px.

Builds (once, into --data-dir) a caption dataset of COCO-sized JPEGs made from scikit-image's
bundled photos (random 640x480-ish crops, quality 90), then reads it through the training
pipeline (RandomResizedCrop + flip + normalise at 224 px, LAVIS caption cleaning, Q-Former BERT
and OPT BPE tokenization to fixed lengths) with 0, 1 and 2 worker processes, and prints images
per second (and per core used) for each. `--memory-seconds` then runs the pipeline for that long
and prints the resident memory (this process + workers) sampled over time.

    python bench/input_throughput.py [--images 600] [--seconds 20] [--memory-seconds 120]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from blip2_jax.data import builders, pipeline  # noqa: E402


def _photos():
    import skimage.data as d
    return [d.astronaut(), d.chelsea(), d.coffee(), d.rocket(), d.hubble_deep_field(),
            d.immunohistochemistry(), d.retina()]


def build_dataset(data_dir: str, n: int) -> str:
    name = f"bench_{n}"
    try:
        builders.dataset_path(data_dir, f"blip2_captions/{name}")
        return name
    except FileNotFoundError:
        pass
    from PIL import Image
    photos = _photos()
    words = "a man riding a wave on top of a surfboard near the shore while people watch".split()

    def examples():
        rng = np.random.default_rng(0)
        for i in range(n):
            p = photos[i % len(photos)]
            im = Image.fromarray(p).resize((640, 480) if i % 3 else (480, 640))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            caption = " ".join(rng.choice(words, rng.integers(8, 16))).capitalize() + "."
            yield {"image": buf.getvalue(), "image_id": str(i), "image_index": i,
                   "captions": [caption], "index": i}
    builders.build(builders.CAPTIONS, name, data_dir, {"train": examples})
    return name


def tokenizer_dirs(tmp: str) -> tuple[str, str]:
    from assets import bert_vocab, gpt2_bpe
    bert = os.path.join(tmp, "bert")
    os.makedirs(bert, exist_ok=True)
    with open(bert_vocab(), "rb") as src, open(os.path.join(bert, "vocab.txt"), "wb") as dst:
        dst.write(src.read())
    opt = os.path.join(tmp, "opt")
    os.makedirs(opt, exist_ok=True)
    encoder, merges = gpt2_bpe()
    with open(encoder) as f:
        vocab = json.load(f)
    with open(os.path.join(opt, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(merges) as src, open(os.path.join(opt, "merges.txt"), "w") as dst:
        dst.write(src.read())
    return bert, opt


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    return out


def make(data_dir, name, bert, opt, workers, threads, batch):
    texts = [pipeline.TextSpec("qformer", bert, "qformer", 32),
             pipeline.TextSpec("llm", opt, "opt", 32, suffix="\n")]
    return pipeline.Pipeline([pipeline.Source(f"blip2_captions/{name}")], data_dir=data_dir,
                             batch_size=batch, seed=0, image_size=224, texts=texts,
                             num_workers=workers, num_threads=threads, prefetch=64)


def measure(pipe, seconds: float, batch: int) -> float:
    it = iter(pipe)
    for _ in range(3):                       # start-up: workers, first reads, tokenizer loads
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += batch
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/tmp/blip2_bench_data")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--memory-seconds", type=float, default=0)
    ap.add_argument("--memory-workers", type=int, default=2)
    args = ap.parse_args()

    name = build_dataset(args.data_dir, args.images)
    bert, opt = tokenizer_dirs(os.path.join(args.data_dir, "tokenizers"))
    cores = os.cpu_count()
    print(f"{cores} cores; {args.images} JPEGs 640x480 -> crop/flip/normalise 224 px + "
          f"BERT/OPT tokens, batch {args.batch}")
    print("| workers | read threads | images/s | images/s per core used |")
    print("|---|---|---|---|")
    for workers, threads in [(0, 1), (0, cores), (1, 1), (2, 1)]:
        rate = measure(make(args.data_dir, name, bert, opt, workers, threads, args.batch),
                       args.seconds, args.batch)
        used = min(cores, max(workers, threads if workers == 0 else workers))
        print(f"| {workers} | {threads} | {rate:.0f} | {rate / used:.0f} |", flush=True)

    if args.memory_seconds:
        pipe = make(args.data_dir, name, bert, opt, args.memory_workers, 1, args.batch)
        it = iter(pipe)
        next(it)
        t0 = time.perf_counter()
        samples, images, next_sample = [], 0, 0.0
        while (elapsed := time.perf_counter() - t0) < args.memory_seconds:
            next(it)
            images += args.batch
            if elapsed >= next_sample:
                pids = [os.getpid()] + children(os.getpid())
                samples.append((elapsed, images, rss_mb(pids)))
                next_sample += args.memory_seconds / 10
        print(f"\nresident memory, this process + {args.memory_workers} workers "
              f"({images} images, {images / args.images:.1f} epochs):")
        for t, n, mb in samples:
            print(f"  t={t:6.1f}s  images={n:6d}  RSS={mb:7.1f} MiB")
        first, last = samples[1][2] if len(samples) > 1 else samples[0][2], samples[-1][2]
        print(f"  growth after warm-up: {last - first:+.1f} MiB")


if __name__ == "__main__":
    main()
