"""Frozen-feature cache: the frozen image encoder's output for every image of a training set,
computed once and read by training in place of the images.

    python -m blip2_jax.data.features --config configs/demo.py:stage1,DIR [--config.k=v ...]
        [--batch_size 64] [--dtype bfloat16] [--overwrite]
        [--coordinator_address HOST:PORT --num_processes N --process_id P | --distributed]

For each training source of the config (`data.train`) it runs the config's ViT — the weights
`config.init` gives, in `frozen_dtype`, exactly as the train step runs it — on each distinct
image (`image_index`) and writes its output tokens (B, N, Dv), before `ln_vision` (which trains),
to `config.data.features`:

    FEATURES/KIND/NAME/SPLIT/features-PPPPP-of-NNNNN.array_record    record i = image i's tokens
    FEATURES/KIND/NAME/SPLIT/meta.json                               what they were computed from

Training with `config.data.features` set reads them (`data.pipeline`): no image decoding and no
ViT in the step (`batch["vision_features"]` replaces `batch["image"]`). One cache serves stage 1
and stage 2 of the same frozen ViT. It is only valid when nothing random touches the image, so
the cache is refused unless the image processor is deterministic (`blip_image_eval`); training
refuses it when the processor, image size, dataset or the ViT's weights (a content hash) differ
from those it was computed with, or when the ViT is trained.

Storage: the ViT's compute dtype by default (bf16 in the paper's configs: bit-identical to what
the step would compute), or `--dtype`. An image that does not decode is stored as an empty record
and dropped by training as a bad image would be. Several processes (`jax.distributed`) split the
images: process p computes the p-th contiguous range into its own shard, on its own devices. The
cache is written into a temporary folder and moved into place when complete; an existing cache
is kept when it matches, and replaced only with `--overwrite`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

FIELD = "vision_features"                   # the batch field that replaces "image"
DETERMINISTIC_PROCESSORS = ("blip_image_eval",)
FORMAT = 1
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_META = "meta.json"


class FeatureCacheError(ValueError):
    """A cache that is missing, incomplete, or does not match what reads it."""


def cache_dir(root: str, dataset: str, split: str) -> str:
    kind, _, name = dataset.partition(":")[0].partition("/")
    return os.path.join(root, kind, name, split)


def _shard_name(p: int, n: int) -> str:
    return f"features-{p:05d}-of-{n:05d}.array_record"


def _dtype(name: str) -> np.dtype:
    return BFLOAT16 if name in ("bfloat16", "bf16") else np.dtype(name)


def build_command(dataset: str) -> str:
    return (f"python -m blip2_jax.data.features --config <the training config> "
            f"(it computes {dataset}; train.py computes a missing cache itself)")


@dataclasses.dataclass
class FeatureCache:
    """Random access to one split's cached features: `cache[image_index]` → (N, Dv) array,
    raising ValueError for an image that did not decode."""
    directory: str
    meta: dict

    def __post_init__(self):
        import grain
        self.shape = tuple(self.meta["shape"])
        self.dtype = _dtype(self.meta["dtype"])
        self._source = grain.sources.ArrayRecordDataSource(
            [os.path.join(self.directory, s) for s in self.meta["shards"]])
        if len(self._source) != self.meta["images"]:
            raise FeatureCacheError(f"{self.directory}: {len(self._source)} records, meta.json "
                                    f"says {self.meta['images']} images")

    def __len__(self) -> int:
        return self.meta["images"]

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise ValueError("the image did not decode when the feature cache was built")
        return np.frombuffer(data, self.dtype).reshape(self.shape)

    def raw(self, image_index: int) -> bytes:
        return self._source[int(image_index)]

    def __getitem__(self, image_index: int) -> np.ndarray:
        return self.decode(self.raw(image_index))

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, self.dtype)


def open_cache(root: str, dataset: str, split: str, *, records: int, image_processor: str,
               image_size: int) -> FeatureCache:
    """The cache of one training source, checked against how the pipeline would process its
    images (`records`: the split's record count)."""
    d = cache_dir(root, dataset, split)
    path = os.path.join(d, _META)
    if not os.path.isfile(path):
        raise FeatureCacheError(f"no feature cache for {dataset} split {split!r} in {root!r} "
                                f"(looked for {path}); build it: {build_command(dataset)}")
    with open(path) as f:
        meta = json.load(f)
    problems = []
    if meta.get("format") != FORMAT:
        problems.append(f"format {meta.get('format')} (this code reads {FORMAT})")
    if meta.get("records") != records:
        problems.append(f"computed over {meta.get('records')} records, the split has {records} "
                        "(the dataset was rebuilt)")
    if meta.get("image_processor") != image_processor:
        problems.append(f"image processor {meta.get('image_processor')!r}, training uses "
                        f"{image_processor!r}")
    if meta.get("image_size") != image_size:
        problems.append(f"image size {meta.get('image_size')}, training uses {image_size}")
    if problems:
        raise FeatureCacheError(f"feature cache {d} does not match the training data: "
                                + "; ".join(problems) + f". Rebuild it with --overwrite: "
                                f"{build_command(dataset)}")
    return FeatureCache(d, meta)


def check_processor(name: str, dataset: str) -> None:
    if name not in DETERMINISTIC_PROCESSORS:
        raise FeatureCacheError(
            f"config.data.features: {dataset} is processed by {name!r}, which draws random crops "
            f"/ flips per step, so a ViT output computed once cannot stand for it; cache only "
            f"with a deterministic processor ({', '.join(DETERMINISTIC_PROCESSORS)}: set "
            f"data.image_processor, or the source's image_processor)")


def require_frozen_vision(vision_frozen: bool, frozen: Sequence[str]) -> None:
    """A trained ViT's outputs change every step: there is nothing to cache."""
    if not vision_frozen:
        raise FeatureCacheError(f"config.data.features: config.frozen {list(frozen)} does not "
                                "freeze the ViT ('vision/.*'), so its outputs cannot be cached")


def check_vision(caches: Sequence[FeatureCache], vision_sha256: Optional[str]) -> None:
    """Training: the caches must come from these frozen ViT weights."""
    for c in caches:
        if c.meta["vision_sha256"] != vision_sha256:
            raise FeatureCacheError(
                f"feature cache {c.directory} was computed by other ViT weights (sha256 "
                f"{c.meta['vision_sha256'][:12]}…, from {c.meta.get('vision_source')}) than "
                f"this run's ({(vision_sha256 or '?')[:12]}…); rebuild it with --overwrite: "
                f"{build_command(c.meta['dataset'])}")


def vision_is_frozen(cfg, frozen: Sequence[str]) -> bool:
    from blip2_jax import api
    from blip2_jax.convert.mapping import flatten
    from blip2_jax.train import state as state_lib
    paths = list(flatten(api.abstract_init(cfg)[1]))
    return "vision" not in state_lib.trained_towers(paths, state_lib.frozen_paths(paths, frozen))


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------
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
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from blip2_jax.models.vit import VisionTransformer
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
    import jax
    from blip2_jax import checkpoint as ckpt_lib
    from blip2_jax.train import init as init_lib, loop

    cfg = loop.model_config(config)
    frozen = tuple(config.get("frozen") or ())
    require_frozen_vision(vision_is_frozen(cfg, frozen), frozen)
    # The run's own ViT weights, as the trainer holds them.
    params, sources = init_lib.initial_params(cfg, loop._plain(config.init), int(config.seed))
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
    import jax
    from jax.sharding import Mesh
    from blip2_jax.data import builders, ops, pipeline
    from blip2_jax.train import loop
    from array_record.python.array_record_module import ArrayRecordWriter

    data = loop._plain(config.data)
    root = data.get("features")
    if not root:
        raise FeatureCacheError("config.data.features is not set: it names the cache directory")
    image_size = int(data.get("image_size") or cfg.vision.image_size)
    out_dtype = _dtype(dtype or cfg.vision.dtype)
    devices = jax.local_devices()
    if batch_size % len(devices):
        raise FeatureCacheError(f"--batch-size {batch_size} must be a multiple of the "
                                f"{len(devices)} local devices")
    mesh = Mesh(np.array(devices), ("data",))
    forward = _vision_fn(cfg, mesh)
    vision = jax.device_put(vision, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
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
        if os.path.isfile(os.path.join(final, _META)):
            with open(os.path.join(final, _META)) as f:
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

        writer = ArrayRecordWriter(os.path.join(partial, _shard_name(pid, nproc)),
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
                    "shards": [_shard_name(p, nproc) for p in range(nproc)],
                    "bad_images": len(bad), "first_bad": bad[:5],
                    "seconds": round(time.perf_counter() - t0, 2)}
            with open(os.path.join(partial, _META), "w") as f:
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
            with open(os.path.join(final, _META)) as f:
                metas.append(json.load(f))
    return metas


def _barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags
    from blip2_jax import cli

    argv = list(sys.argv if argv is None else argv)
    flags_ = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "the training config",
                                                  flag_values=flags_, sys_argv=argv)
    flags.DEFINE_integer("batch_size", 64, "images per ViT call (multiple of the local "
                         "devices)", flag_values=flags_)
    flags.DEFINE_string("dtype", None, "storage dtype (default: the ViT's compute dtype)",
                        flag_values=flags_)
    flags.DEFINE_bool("overwrite", False, "replace a cache that differs", flag_values=flags_)
    initialize_distributed = cli.define_distributed_flags(flags_)
    flags_(argv)
    initialize_distributed()
    try:
        build(config_flag.value, batch_size=flags_.batch_size, dtype=flags_.dtype,
              overwrite=flags_.overwrite)
    except (FeatureCacheError, FileNotFoundError, ValueError) as e:
        print(f"features: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
