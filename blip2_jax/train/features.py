"""Frozen-feature cache, the building side: runs a training config's frozen ViT once over its
training images and writes the tokens `data/features.py` reads.

    python -m blip2_jax.train.features --config configs/demo.py:stage1,DIR [--config.k=v ...]
        [--batch_size 64] [--dtype bfloat16] [--overwrite]
        [--coordinator_address HOST:PORT --num_processes N --process_id P | --distributed]

For each training source of the config (`data.train`) it runs the config's ViT — the weights
`config.init` gives, in `frozen_dtype`, exactly as the train step runs it — on each distinct
image (`image_index`) and writes its output tokens to `config.data.features` (layout and checks:
`data/features.py`). train.py builds a cache it lacks itself, with the run's own ViT.

Storage: the ViT's compute dtype by default (bf16 in the paper's configs: bit-identical to what
the step would compute), or `--dtype`. Several processes (`jax.distributed`) split the images:
process p computes the p-th contiguous range into its own shard, on its own devices. The cache is
written into a temporary folder and moved into place when complete; an existing cache is kept
when it matches, and replaced only with `--overwrite`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from blip2_jax import checkpoint as ckpt_lib, cli, run_config
from blip2_jax.convert.mapping import flatten
from blip2_jax.data import batch as batch_lib, builders, ops, pipeline
from blip2_jax.data.features import (FORMAT, META, FeatureCacheError, build_command, cache_dir,
                                     check_processor, require_frozen_vision, shard_name)
from blip2_jax.models.blip2 import abstract_init
from blip2_jax.models.vit import VisionTransformer
from blip2_jax.train import errors, init as init_lib, state as state_lib


def vision_is_frozen(cfg, frozen: Sequence[str]) -> bool:
    paths = list(flatten(abstract_init(cfg)[1]))
    return "vision" not in state_lib.trained_towers(paths, state_lib.frozen_paths(paths, frozen))




def _first_records(src) -> np.ndarray:
    """first[i] = the position of the first record of image i (image_index is dense)."""
    first: dict[int, int] = {}
    for r in range(len(src)):
        first.setdefault(int(src[r]["image_index"]), r)
    n = len(first)
    if set(first) != set(range(n)):
        raise FeatureCacheError(f"image_index is not dense 0..{n - 1} (max "
                                f"{max(first)}); rebuild the dataset with blip2_jax.data.build")
    return np.array([first[i] for i in range(n)], np.int64)


def _vision_fn(cfg, mesh):
    """jitted (vision params, pixels) → ViT tokens, the batch split over the mesh's devices."""
    module = VisionTransformer(cfg.vision)         # Blip2Module's `vision`
    rows = NamedSharding(mesh, P("data"))
    apply = jax.jit(lambda vision, pixels: module.apply({"params": vision}, pixels),
                    in_shardings=(NamedSharding(mesh, P()), rows), out_shardings=rows)
    # Placed explicitly: under jax.distributed, jit refuses numpy inputs with a non-trivial
    # sharding even when the mesh holds only this process's devices.
    return lambda vision, pixels: apply(vision, jax.device_put(pixels, rows))


def build(config, *, batch_size: int = 64, dtype: Optional[str] = None, overwrite: bool = False,
          workers: int = 8, log=print) -> list[dict]:
    """Compute the caches of `config`'s training sources; returns their meta dicts."""
    cfg = run_config.model_config(config)
    frozen = tuple(config.get("frozen") or ())
    require_frozen_vision(vision_is_frozen(cfg, frozen), frozen)
    # The run's own ViT weights, as the trainer holds them.
    params, sources = init_lib.initial_params(cfg, run_config.section(config, "init"), int(config.seed))
    vision = params["vision"]
    del params
    frozen_dtype = config.get("frozen_dtype") or None
    if frozen_dtype:
        vision = jax.tree.map(lambda x: np.asarray(x).astype(frozen_dtype), vision)
    # The hash the run's checkpoints record of its frozen ViT (loop._frozen_towers).
    return build_with(config, cfg, vision, ckpt_lib.tree_hash(vision), sources.get("vision"),
                      batch_size=batch_size, dtype=dtype, overwrite=overwrite, workers=workers,
                      log=log)


def build_with(config, cfg, vision, vision_sha: str, vision_source: Optional[str], *,
               batch_size: int = 64, dtype: Optional[str] = None, overwrite: bool = False,
               workers: int = 8, log=print) -> list[dict]:
    """`build` with the frozen ViT given: params as the run holds them (frozen_dtype), their
    content hash and where they came from (train.py passes its own)."""
    data = run_config.section(config, "data")
    root = data.get("features")
    if not root:
        raise FeatureCacheError("config.data.features is not set: it names the cache directory")
    image_size = int(data.get("image_size") or cfg.vision.image_size)
    out_dtype = batch_lib.dtype(dtype or cfg.vision.dtype)
    devices = jax.local_devices()
    if batch_size % len(devices):
        raise FeatureCacheError(f"--batch-size {batch_size} must be a multiple of the "
                                f"{len(devices)} local devices")
    mesh = Mesh(np.array(devices), ("data",))
    forward = _vision_fn(cfg, mesh)
    vision = jax.device_put(vision, NamedSharding(mesh, P()))
    pid, nproc = jax.process_index(), jax.process_count()

    raw = data["train"]
    raw = [raw] if isinstance(raw, Mapping) else list(raw)
    metas = []
    for s in raw:
        source = pipeline.Source(**dict(s))
        processor = source.image_processor or data.get("image_processor") or "blip2_image_train"
        check_processor(processor, source.name)
        src = builders.open_split(data["data_dir"], source.name, source.split)
        final = cache_dir(root, source.name, source.split)
        want = {"format": FORMAT, "dataset": source.name, "split": source.split,
                "records": len(src), "image_processor": processor, "image_size": image_size,
                "dtype": out_dtype.name, "vision_sha256": vision_sha}
        if os.path.isfile(os.path.join(final, META)):
            with open(os.path.join(final, META)) as f:
                have = json.load(f)
            # Without an explicit --dtype, a cache stored in any dtype serves.
            check = {k: v for k, v in want.items() if k != "dtype" or dtype}
            if all(have.get(k) == v for k, v in check.items()):
                log(f"{final}: up to date ({have['images']} images)")
                metas.append(have)
                continue
            if not overwrite:
                diff = {k: (have.get(k), v) for k, v in check.items() if have.get(k) != v}
                raise FeatureCacheError(f"{final} exists and differs (cached, wanted): {diff}; "
                                        f"replace it with --overwrite: "
                                        f"{build_command(source.name)}")
        t0 = time.perf_counter()
        first = _first_records(src)
        n = len(first)
        if pid == 0:
            log(f"building the frozen-feature cache {final}: the frozen ViT's outputs for {n} "
                f"images (once; later runs with this ViT reuse it)")
        lo, hi = pid * n // nproc, (pid + 1) * n // nproc
        partial = final + ".partial"
        if pid == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        _barrier("features-partial")
        process = ops.image_processor(processor, image_size, flip=False)

        def pixels_of(i):
            try:
                return process(ops.decode(src[int(first[i])]["image"]), None), None
            except ValueError as e:
                return np.zeros((image_size, image_size, 3), np.float32), str(e)

        writer = ArrayRecordWriter(os.path.join(partial, shard_name(pid, nproc)),
                                   "group_size:1")
        bad = []
        shape = None
        chunk = list(range(lo, hi))
        images = builders._parallel(pixels_of, chunk, workers, chunk=batch_size)
        for start in range(0, len(chunk), batch_size):
            got = [next(images) for _ in chunk[start:start + batch_size]]
            x = np.stack([g[0] for g in got])
            pad = batch_size - len(x)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
            feats = np.asarray(forward(vision, x)).astype(out_dtype)[:len(got)]
            shape = feats.shape[1:]
            for k, (f, (_, err)) in enumerate(zip(feats, got)):
                if err is None:
                    writer.write(np.ascontiguousarray(f).tobytes())
                else:
                    writer.write(b"")
                    bad.append({"image_index": chunk[start + k], "reason": err})
        writer.close()
        part = {"images": hi - lo, "bad": bad, "shape": list(shape) if shape else None}
        with open(os.path.join(partial, f"part-{pid:05d}.json"), "w") as f:
            json.dump(part, f)
        _barrier("features-written")
        if pid == 0:
            parts = []
            for p in range(nproc):
                with open(os.path.join(partial, f"part-{p:05d}.json")) as f:
                    parts.append(json.load(f))
                os.remove(os.path.join(partial, f"part-{p:05d}.json"))
            shape = next(p["shape"] for p in parts if p["shape"])
            bad = [b for p in parts for b in p["bad"]]
            meta = {**want, "images": n, "shape": shape, "vision_source": vision_source,
                    "shards": [shard_name(p, nproc) for p in range(nproc)],
                    "bad_images": len(bad), "first_bad": bad[:5],
                    "seconds": round(time.perf_counter() - t0, 2)}
            with open(os.path.join(partial, META), "w") as f:
                json.dump(meta, f, indent=2)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.rename(partial, final)
            gb = n * int(np.prod(shape)) * out_dtype.itemsize / 1e9
            log(f"{final}: {n} images ({len(src)} records) → {shape} {out_dtype.name}, "
                f"{gb:.2f} GB, {len(bad)} bad, {meta['seconds']:.1f} s")
            metas.append(meta)
        _barrier("features-done")
        if pid != 0:
            with open(os.path.join(final, META)) as f:
                metas.append(json.load(f))
    return metas


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`argv` as sys.argv: the program name first. Flags: blip2_jax/cli.py's convention."""
    argv = list(sys.argv if argv is None else argv)
    p = cli.ArgumentParser(prog="python -m blip2_jax.train.features",
                           description=__doc__.split("\n\n")[0], config=True, distributed=True)
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="images per ViT call (multiple of the local devices; default 64)")
    p.add_argument("--dtype", help="storage dtype (default: the ViT's compute dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache that differs")
    cli.add_verbose_argument(p)
    args = p.parse_args(argv[1:])
    cli.initialize_distributed(args)
    return cli.report_errors(p.prog, lambda: build(args.config, batch_size=args.batch_size,
                                                   dtype=args.dtype, overwrite=args.overwrite),
                             errors.USER_ERRORS, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
