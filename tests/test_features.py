"""The frozen-feature cache (blip2_jax/data/features.py): what it stores is the frozen ViT's output,
training from it equals training from the images, and every mismatch is refused."""
from __future__ import annotations

import io
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import blip2_jax
import runs
from blip2_jax.data import builders, features, ops, pipeline
from blip2_jax.train import init as init_lib
from blip2_jax.train import loop
from blip2_jax.data import batch as batch_lib
from blip2_jax.train import features as feature_builder
from blip2_jax import run_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return runs.synthetic_data(str(tmp_path_factory.mktemp("synthetic")), train=32, val=8,
                               test=8)


# 4 steps: the run from images is then the same program as test_eval's and test_resume's tiny
# stage-1 runs, which the suite's compilation cache holds once.
def _config(data_dir, feats, **overrides):
    return runs.config("tiny_stage1", data_dir, **{"total_steps": 4, "data.features": feats,
                                                   **overrides})


@pytest.fixture(scope="module")
def cache(data_dir, tmp_path_factory):
    feats = str(tmp_path_factory.mktemp("features"))
    (meta,) = feature_builder.build(_config(data_dir, feats), batch_size=16, log=lambda *_: None)
    return feats, meta


@pytest.fixture(scope="module")
def cached_run(data_dir, cache, tmp_path_factory):
    """The last metrics of the run trained from the cache: two tests compare with it."""
    feats, _ = cache
    return loop.run(_config(data_dir, feats), str(tmp_path_factory.mktemp("cached_run")))


def test_cache_holds_the_frozen_vit_output_of_each_image(data_dir, cache):
    feats, meta = cache
    c = _config(data_dir, feats)
    cfg = run_config.model_config(c)
    params, _ = init_lib.initial_params(cfg, run_config.plain(c.init), int(c.seed))
    # The run holds the frozen ViT in bf16 (config.frozen_dtype) and computes in fp32.
    params["vision"] = jax.tree.map(lambda x: np.asarray(x).astype("bfloat16")
                                    .astype(np.float32), params["vision"])
    model = blip2_jax.Blip2(cfg, params)
    src = builders.open_split(data_dir, "blip2_captions/synthetic", "train")
    opened = features.open_cache(feats, "blip2_captions/synthetic", "train", records=len(src),
                                 image_processor="blip_image_eval", image_size=meta["image_size"])
    assert len(opened) == meta["images"] == len({int(src[r]["image_index"])
                                                 for r in range(len(src))})
    assert meta["vision_sha256"] and meta["dtype"] == "float32" and meta["bad_images"] == 0
    rows = [0, 5, len(src) - 1]
    process = ops.image_processor("blip_image_eval", meta["image_size"])
    pixels = np.stack([process(ops.decode(src[r]["image"]), None) for r in rows])
    want = np.asarray(model.vision_embeds(pixels))            # after ln_vision
    got = np.stack([opened[int(src[r]["image_index"])] for r in rows])
    assert got.shape[1:] == tuple(meta["shape"])
    ln = np.asarray(model.module.apply({"params": model.params}, got,
                                       method=lambda m, h: m.ln_vision(h)))
    np.testing.assert_allclose(ln, want, rtol=1e-5, atol=1e-5)


def test_training_from_the_cache_equals_training_from_images(data_dir, cached_run, tmp_path):
    images = loop.run(_config(data_dir, ""), str(tmp_path / "images"))
    cached = cached_run
    for k in ("loss", "itc", "itm", "itg", "grad_norm", "param_norm"):
        np.testing.assert_allclose(cached[k], images[k], rtol=1e-6, err_msg=k)
    assert cached["step"] == images["step"] == 4


def test_pipeline_reads_features_instead_of_images(data_dir, cache):
    feats, meta = cache
    texts = [dict(name="qformer", tokenizer=f"{data_dir}/tokenizers/synthetic/qformer",
                  kind="qformer", max_length=16)]
    base = {**run_config.plain(_config(data_dir, "").data), "texts": texts, "image_size": 30}
    plain = next(iter(pipeline.from_config(base, batch_size=8, seed=3, process_index=0,
                                           process_count=1).dataset()))
    batch = next(iter(pipeline.from_config({**base, "features": feats}, batch_size=8, seed=3,
                                           process_index=0, process_count=1).dataset()))
    assert "image" not in batch and batch[batch_lib.FEATURES].shape == (8, *meta["shape"])
    assert set(batch_lib.numeric(batch)) == set(batch_lib.numeric(plain)) - {"image"} | {
        batch_lib.FEATURES}
    for k in ("qformer_ids", "qformer_mask", "image_index", "index"):
        np.testing.assert_array_equal(batch[k], plain[k])
    # Evaluation pipelines read images whatever data.features says.
    ev = pipeline.from_config({**base, "features": feats, "train": dict(
        name="blip2_captions/synthetic", split="test")}, batch_size=8, train=False,
        process_index=0, process_count=1)
    assert "image" in next(iter(ev.dataset()))


def test_bf16_storage_reaches_the_step(data_dir, tmp_path):
    feats = str(tmp_path / "f")
    (meta,) = feature_builder.build(_config(data_dir, feats), batch_size=16, dtype="bfloat16",
                             log=lambda *_: None)
    assert meta["dtype"] == "bfloat16"
    size = os.path.getsize(os.path.join(feats, "blip2_captions/synthetic/train",
                                        meta["shards"][0]))
    assert size >= meta["images"] * np.prod(meta["shape"]) * 2
    c = _config(data_dir, feats)
    spec = dict(name="qformer", tokenizer=f"{data_dir}/tokenizers/synthetic/qformer",
                kind="qformer", max_length=8)
    batch = batch_lib.numeric(next(iter(pipeline.from_config(
        {**run_config.plain(c.data), "texts": [spec], "image_size": 30}, batch_size=8,
        process_index=0, process_count=1).dataset())))
    assert batch[batch_lib.FEATURES].dtype == batch_lib.BFLOAT16
    out = loop.run(c, str(tmp_path / "run"))
    assert np.isfinite(out["loss"])


def test_refusals(data_dir, cache, tmp_path):
    feats, _ = cache
    # Augmentation: random crops cannot be cached.
    with pytest.raises(features.FeatureCacheError, match="blip2_image_train"):
        feature_builder.build(_config(data_dir, str(tmp_path / "a"),
                               **{"data.image_processor": "blip2_image_train"}))
    with pytest.raises(features.FeatureCacheError, match="blip2_image_train"):
        loop.run(_config(data_dir, feats, **{"data.image_processor": "blip2_image_train"}),
                 str(tmp_path / "r1"))
    # A trained ViT.
    with pytest.raises(features.FeatureCacheError, match="does not freeze the ViT"):
        feature_builder.build(_config(data_dir, str(tmp_path / "b"), frozen=()))
    with pytest.raises(features.FeatureCacheError, match="does not freeze the ViT"):
        loop.run(_config(data_dir, feats, frozen=()), str(tmp_path / "r2"))
    # A cache of other ViT weights (another seed draws another random ViT) or image size is
    # neither used nor replaced by train.py.
    with open(os.path.join(feats, "blip2_captions/synthetic/train/meta.json")) as f:
        before = f.read()
    with pytest.raises(features.FeatureCacheError, match="exists and differs.*vision_sha256"):
        loop.run(_config(data_dir, feats, seed=1), str(tmp_path / "r3"))
    with pytest.raises(features.FeatureCacheError, match="exists and differs.*image_size"):
        loop.run(_config(data_dir, feats, **{"data.image_size": 28}), str(tmp_path / "r5"))
    with open(os.path.join(feats, "blip2_captions/synthetic/train/meta.json")) as f:
        assert f.read() == before
    assert not os.path.exists(tmp_path / "r3" / "checkpoints")
    # A pipeline opened on a cache of other weights (not through train.py) is refused too.
    (cache_obj,) = pipeline.from_config(
        {**run_config.plain(_config(data_dir, feats).data), "image_size": 30}, batch_size=8,
        process_index=0, process_count=1).caches
    with pytest.raises(features.FeatureCacheError, match="other ViT weights"):
        features.check_vision([cache_obj], "0" * 64)
    # Without a cache (none in that directory) the pipeline says how to make one.
    with pytest.raises(features.FeatureCacheError, match="no feature cache.*blip2_jax.train.features"):
        pipeline.from_config({**run_config.plain(_config(data_dir, str(tmp_path / "none")).data),
                              "image_size": 30}, batch_size=8, process_index=0,
                             process_count=1)


def test_train_py_computes_a_missing_cache_and_reuses_it(data_dir, cache, tmp_path):
    feats, meta = cache
    fresh = str(tmp_path / "f")
    out = loop.run(_config(data_dir, fresh), str(tmp_path / "run1"))
    with open(os.path.join(fresh, "blip2_captions/synthetic/train/meta.json")) as f:
        made = json.load(f)
    assert made["vision_sha256"] == meta["vision_sha256"] and made["images"] == meta["images"]
    # The CLI's values (it ran other batch sizes, so equal to float rounding).
    a, b = (features.open_cache(d, "blip2_captions/synthetic", "train", records=made["records"],
                                image_processor="blip_image_eval", image_size=30)
            for d in (fresh, feats))
    for i in (0, len(a) - 1):
        np.testing.assert_allclose(a[i], b[i], rtol=1e-5, atol=1e-6)
    again = loop.run(_config(data_dir, fresh), str(tmp_path / "run2"))
    assert again["loss"] == out["loss"]


def test_two_processes_build_the_cache_one_process_builds(data_dir, cache, cached_run, tmp_path):
    """The CLI under jax.distributed (2 local processes x 2 CPU devices): each process writes
    its half of the images into its own shard; the cache reads as the one-process cache, and
    training from it gives the same losses."""
    feats, meta = cache
    two = str(tmp_path / "two")
    port = runs.free_port()
    procs = [runs.spawn([sys.executable, "-m", "blip2_jax.train.features",
                         f"--config={os.path.join(runs.ROOT, 'configs', 'tiny_stage1.py')}:"
                         f"{data_dir}", f"--config.data.features={two}", "--batch_size=4",
                         *runs.distributed_flags(port, i)], devices=2) for i in (0, 1)]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    with open(os.path.join(two, "blip2_captions/synthetic/train/meta.json")) as f:
        made = json.load(f)
    assert made["shards"] == ["features-00000-of-00002.array_record",
                              "features-00001-of-00002.array_record"]
    for k in ("images", "records", "shape", "vision_sha256", "dtype", "bad_images"):
        assert made[k] == meta[k], k
    a, b = (features.open_cache(d, "blip2_captions/synthetic", "train", records=meta["records"],
                                image_processor="blip_image_eval", image_size=meta["image_size"])
            for d in (two, feats))
    for i in range(len(b)):                  # other batch sizes: equal to float rounding
        np.testing.assert_allclose(a[i], b[i], rtol=1e-5, atol=1e-6, err_msg=str(i))
    sharded = loop.run(_config(data_dir, two), str(tmp_path / "run_two"))
    single = cached_run                       # the same run from the one-process cache
    for k in ("loss", "itc", "itm", "itg"):
        np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, err_msg=k)


def test_rebuild_keeps_a_matching_cache_and_replaces_only_with_overwrite(data_dir, tmp_path):
    feats = str(tmp_path / "f")
    logs = []
    (first,) = feature_builder.build(_config(data_dir, feats), batch_size=16, log=logs.append)
    (again,) = feature_builder.build(_config(data_dir, feats), batch_size=16, log=logs.append)
    assert again == first and "up to date" in logs[-1]
    with pytest.raises(features.FeatureCacheError, match="exists and differs.*--overwrite"):
        feature_builder.build(_config(data_dir, feats, seed=1), batch_size=16)
    with open(os.path.join(feats, "blip2_captions/synthetic/train/meta.json")) as f:
        assert json.load(f) == first                         # the failed attempt lost nothing
    (new,) = feature_builder.build(_config(data_dir, feats, seed=1), batch_size=16, overwrite=True,
                            log=logs.append)
    assert new["vision_sha256"] != first["vision_sha256"]
    assert not os.path.exists(os.path.join(feats, "blip2_captions/synthetic/train.partial"))


def test_cli_builds_and_reports_errors(data_dir, tmp_path, capsys):
    cfg = os.path.join(runs.ROOT, "configs", "tiny_stage1.py")
    feats = str(tmp_path / "f")
    assert feature_builder.main(["x", f"--config={cfg}:{data_dir}", f"--config.data.features={feats}",
                          "--batch_size=16"]) == 0
    assert "32 records" in capsys.readouterr().out
    assert feature_builder.main(["x", f"--config={cfg}:{data_dir}", f"--config.data.features={feats}",
                          "--config.data.image_processor=blip_image_train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m blip2_jax.train.features: error:")
    assert "blip_image_train" in err


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_an_image_that_does_not_decode_is_dropped_as_without_the_cache(tmp_path):
    good = _png(0)

    def examples():
        for i in range(16):
            yield {"image": good if i != 5 else good[:60], "image_id": f"im{i}",
                   "image_index": i, "captions": [f"caption {i}"], "index": i}
    d = str(tmp_path / "data")
    builders.build(builders.CAPTIONS, "faulty", d, {"train": examples})
    data = dict(data_dir=d, train=dict(name="blip2_captions/faulty", split="train"),
                image_processor="blip_image_eval", flip=False, num_workers=0, num_threads=2,
                image_size=30, features=str(tmp_path / "f"))
    c = _config(d, data["features"])
    c.data = data
    (meta,) = feature_builder.build(c, batch_size=8, log=lambda *_: None)
    assert meta["bad_images"] == 1 and meta["first_bad"][0]["image_index"] == 5
    assert "does not decode" in meta["first_bad"][0]["reason"]
    it = iter(pipeline.from_config(data, batch_size=5, process_index=0,
                                   process_count=1).dataset())
    seen = np.concatenate([next(it)["index"] for _ in range(3)])      # the whole epoch
    assert 5 not in seen and len(set(seen)) == 15
    count, first = pipeline.skipped(it)
    assert count == 1 and "im5" in first[0] and "did not decode" in first[0]
