"""Retrieval evaluation (`blip2_jax.eval.retrieval`): LAVIS `compute_sim_matrix` + metrics.

* `recall_metrics` against hand-computed R@k and against a literal port of LAVIS
  `RetrievalTask._report_metrics` on tie-heavy matrices;
* `evaluate`'s score matrices against a brute-force LAVIS loop (one ITM call per query, built on
  the model's own `itc` / `itm` surfaces), with k below the counts so the -100 fill is exercised;
* the same on a mesh of the 8 fake CPU devices (tests/conftest.py) equals 1 device;
* the image iterator is consumed once, lazily, batch by batch (bounded pixel memory).
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import blip2_jax
from blip2_jax import sharding
from blip2_jax.eval import retrieval

N_IMAGES, N_TEXTS, K = 12, 30, 5
IMAGE_BATCH = 5          # 12 images → batches of 5, 5, 2 (the last padded)


def lavis_report_metrics(scores_i2t, scores_t2i, txt2img, img2txt):
    """LAVIS `lavis/tasks/retrieval.py::RetrievalTask._report_metrics`, verbatim."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2
    agg_metrics = (tr1 + tr5 + tr10) / 3
    return {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
            "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
            "r_mean": r_mean, "agg_metrics": agg_metrics}


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def test_recall_metrics_hand_computed():
    # 12 images × 2 captions each (text 2i, 2i+1); 24 texts. Scores: distinct values, so the
    # ranks are unambiguous. i2t: image i's best gt caption is put at rank r_i.
    n_i, n_t = 12, 24
    img2txt = [[2 * i, 2 * i + 1] for i in range(n_i)]
    txt2img = np.repeat(np.arange(n_i), 2)
    i2t_best = [0, 0, 0, 1, 3, 4, 5, 7, 9, 10, 15, 23]
    s_i2t = np.zeros((n_i, n_t), np.float32)
    for i, r in enumerate(i2t_best):
        others = [t for t in range(n_t) if t not in img2txt[i]]
        order = others[:r] + [img2txt[i][1]] + others[r:] + [img2txt[i][0]]   # best first
        s_i2t[i, order] = np.arange(n_t, 0, -1)     # the second caption at rank r, first last
    # t2i: text t's gt image at rank t % 12 (ranks 0..11 twice over)
    s_t2i = np.zeros((n_t, n_i), np.float32)
    for t in range(n_t):
        r = t % n_i
        others = [i for i in range(n_i) if i != txt2img[t]]
        order = others[:r] + [txt2img[t]] + others[r:]
        s_t2i[t, order] = np.arange(n_i, 0, -1)
    m = retrieval.recall_metrics(s_i2t, s_t2i, txt2img, img2txt)
    # i2t ranks 0,0,0,1,3,4,5,7,9,10,15,23: <1: 3, <5: 6, <10: 9 of 12
    assert m["txt_r1"] == pytest.approx(100 * 3 / 12)
    assert m["txt_r5"] == pytest.approx(100 * 6 / 12)
    assert m["txt_r10"] == pytest.approx(100 * 9 / 12)
    # t2i ranks 0..11 twice: <1: 2, <5: 10, <10: 20 of 24
    assert m["img_r1"] == pytest.approx(100 * 2 / 24)
    assert m["img_r5"] == pytest.approx(100 * 10 / 24)
    assert m["img_r10"] == pytest.approx(100 * 20 / 24)
    tr, ir = (25 + 50 + 75) / 3, 100 * (2 + 10 + 20) / 24 / 3
    assert m["txt_r_mean"] == pytest.approx(tr) and m["img_r_mean"] == pytest.approx(ir)
    assert m["r_mean"] == pytest.approx((tr + ir) / 2) and m["agg_metrics"] == m["txt_r_mean"]
    assert m == lavis_report_metrics(s_i2t, s_t2i, txt2img, img2txt)


@pytest.mark.parametrize("n_i,caps,levels", [(6, 2, 2), (9, 3, 3), (40, 5, 4), (30, 1, 50)])
def test_recall_metrics_ties_equal_lavis(n_i, caps, levels):
    """Tie-heavy integer scores (plus LAVIS's -100 fill): identical to LAVIS's loop, float32."""
    rng = np.random.default_rng(n_i)
    n_t = n_i * caps
    img2txt = [list(range(caps * i, caps * i + caps)) for i in range(n_i)]
    txt2img = np.repeat(np.arange(n_i), caps)
    s_i2t = rng.integers(0, levels, (n_i, n_t)).astype(np.float32)
    s_t2i = rng.integers(0, levels, (n_t, n_i)).astype(np.float32)
    s_i2t[rng.random(s_i2t.shape) < 0.3] = -100.0
    s_t2i[rng.random(s_t2i.shape) < 0.3] = -100.0
    assert retrieval.recall_metrics(s_i2t, s_t2i, txt2img, img2txt) == \
        lavis_report_metrics(s_i2t, s_t2i, txt2img, img2txt)


def test_recall_metrics_tie_rule():
    """The documented tie behaviour (numpy's argsort orders small all-equal rows by index;
    reversed, the highest index among equal scores ranks first)."""
    if not np.array_equal(np.argsort(np.zeros(8, np.float32)), np.arange(8)):
        pytest.skip("this numpy's argsort orders equal values differently (the equality with "
                    "LAVIS's loop above still holds)")
    s = np.zeros((2, 8), np.float32)               # every text tied
    s_t2i = np.zeros((8, 2), np.float32)
    m = retrieval.recall_metrics(s, s_t2i, [0] * 4 + [1] * 4, [[0, 1, 2, 3], [4, 5, 6, 7]])
    # image 0's best gt (text 3) is at rank 4; image 1's text 7 at rank 0
    assert m["txt_r1"] == 50.0 and m["txt_r5"] == 100.0
    # t2i: image 1 ranks first on every text → texts of image 1 hit R@1, those of image 0 R@5
    assert m["img_r1"] == 50.0 and m["img_r5"] == 100.0


# ----------------------------------------------------------------------------------------------
# Reranking: brute-force LAVIS loop
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    model = blip2_jax.Blip2.random("tiny-stage1", seed=1)
    assert model.config.itc and model.config.itm
    rng = np.random.default_rng(0)
    size = model.config.vision.image_size
    pixels = rng.normal(size=(N_IMAGES, size, size, 3)).astype(np.float32)
    ids = rng.integers(3, 90, size=(N_TEXTS, 12)).astype(np.int32)
    ids[:, 0] = 1                                         # a [CLS]-like first token
    lengths = rng.integers(3, 13, N_TEXTS)
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * mask
    # 12 images: the first six own 3 captions, the rest 2 (30 texts)
    counts = [3] * 6 + [2] * 6
    txt2img = np.repeat(np.arange(N_IMAGES), counts)
    img2txt = [list(np.flatnonzero(txt2img == i)) for i in range(N_IMAGES)]
    return model, pixels, ids, mask, txt2img, img2txt


def lavis_sim_matrix(model, pixels, ids, mask, k):
    """LAVIS `compute_sim_matrix`'s loops on the model's own surfaces: ITC via `model.itc`,
    then per image one ITM call on its top-k texts, then per text one on its top-k images."""
    s = np.asarray(model.itc(pixels, ids, mask))
    n_i, n_t = s.shape
    i2t = np.full((n_i, n_t), -100.0, np.float32)
    for i in range(n_i):
        top = np.argsort(-s[i], kind="stable")[:k]
        itm = np.asarray(model.itm(np.repeat(pixels[i:i + 1], k, 0), ids[top], mask[top]))[:, 1]
        i2t[i, top] = itm + s[i, top]
    t2i = np.full((n_t, n_i), -100.0, np.float32)
    for t in range(n_t):
        top = np.argsort(-s[:, t], kind="stable")[:k]
        itm = np.asarray(model.itm(pixels[top], np.repeat(ids[t:t + 1], k, 0),
                                   np.repeat(mask[t:t + 1], k, 0)))[:, 1]
        t2i[t, top] = itm + s[top, t]
    return i2t, t2i


def _batches(pixels, n=IMAGE_BATCH):
    return (pixels[s:s + n] for s in range(0, len(pixels), n))


@pytest.fixture(scope="module")
def one_device(setup):
    model, pixels, ids, mask, txt2img, img2txt = setup
    return retrieval.evaluate(model, _batches(pixels), (ids, mask), txt2img, img2txt, k=K,
                              batch_size=16)


def test_rerank_equals_brute_force_lavis_loop(setup, one_device):
    model, pixels, ids, mask, txt2img, img2txt = setup
    metrics, i2t, t2i = one_device
    ref_i2t, ref_t2i = lavis_sim_matrix(model, pixels, ids, mask, K)
    assert i2t.shape == (N_IMAGES, N_TEXTS) and t2i.shape == (N_TEXTS, N_IMAGES)
    assert i2t.dtype == np.float32 and t2i.dtype == np.float32
    # exactly k entries per row are reranked, the rest is LAVIS's -100 fill
    assert ((i2t != -100.0).sum(1) == K).all() and ((t2i != -100.0).sum(1) == K).all()
    np.testing.assert_array_equal(i2t == -100.0, ref_i2t == -100.0)
    np.testing.assert_array_equal(t2i == -100.0, ref_t2i == -100.0)
    np.testing.assert_allclose(i2t, ref_i2t, atol=1e-5, rtol=0)
    np.testing.assert_allclose(t2i, ref_t2i, atol=1e-5, rtol=0)
    # the ITM part is not negligible (the test would be vacuous if itm_head gave ~0)
    s = np.asarray(model.itc(pixels, ids, mask))
    on = i2t != -100.0
    assert np.abs(i2t[on] - s[on]).max() > 1e-3
    assert metrics == lavis_report_metrics(ref_i2t, ref_t2i, txt2img, img2txt)


def test_k_is_capped_and_features_match_surfaces(setup):
    model, pixels, ids, mask, txt2img, img2txt = setup
    img = retrieval.image_features(model, _batches(pixels))
    txt = retrieval.text_features(model, ids, mask, batch_size=8)
    sims = retrieval.itc_scores(img, txt, chunk=5)
    np.testing.assert_allclose(sims, np.asarray(model.itc(pixels, ids, mask)), atol=1e-6)
    np.testing.assert_allclose(img.vit, np.asarray(model.vision_embeds(pixels)), atol=1e-6)
    # k above both counts: every entry reranked (no -100), t2i of a pair = i2t of that pair
    i2t, t2i = retrieval.rerank(model, img, txt, sims, k=1000, batch_size=32)
    assert (i2t != -100.0).all() and (t2i != -100.0).all()
    np.testing.assert_allclose(i2t, t2i.T, atol=1e-6)


def test_itm_image_index_equals_per_pair_images(setup):
    """`itm_logits` with image_index (each distinct image's cross-attention K/V projected once,
    then gathered per pair: the rerank program) == the plain call on per-pair image features."""
    model, pixels, ids, mask, _, _ = setup
    vit = np.asarray(model.vision_embeds(pixels[:3]))               # U = 3 distinct images
    index = np.array([2, 0, 0, 1, 2, 2, 1], np.int32)               # unsorted, repeated
    n = len(index)

    def itm(*args, **kw):
        return np.asarray(model.module.apply({"params": model.params}, *args,
                                             method="itm_logits", **kw))
    ref = itm(vit[index], ids[:n], mask[:n])
    np.testing.assert_allclose(itm(vit, ids[:n], mask[:n], image_index=index), ref,
                               atol=1e-5, rtol=0)
    assert np.abs(ref - ref[:1]).max() > 1e-4          # the pairs really differ


def test_sharded_equals_one_device(setup, one_device):
    model, pixels, ids, mask, txt2img, img2txt = setup
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})   # the 8 fake CPU devices
    assert mesh.devices.size == 8
    metrics, i2t, t2i = retrieval.evaluate(model, _batches(pixels), (ids, mask), txt2img,
                                           img2txt, k=K, batch_size=16, mesh=mesh)
    np.testing.assert_allclose(i2t, one_device[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(t2i, one_device[2], atol=1e-5, rtol=0)
    assert metrics == one_device[0]


def test_image_iterator_consumed_once_in_batches(setup, one_device):
    """Pipeline-style batches (dicts with valid/index, out of index order, a padding row): the
    iterator is consumed once and lazily — when a batch is requested, at most the previous one
    is still alive — and rows come back in index order."""
    model, pixels, ids, mask, txt2img, img2txt = setup
    order = [2, 0, 1]                                   # batches out of index order
    alive: list = []
    pulled = []

    def batches():
        for j in order:
            gc.collect()
            assert sum(r() is not None for r in alive) <= 1, "earlier pixel batches kept alive"
            rows = np.arange(j * IMAGE_BATCH, min((j + 1) * IMAGE_BATCH, N_IMAGES))
            n = len(rows)
            image = np.zeros((IMAGE_BATCH,) + pixels.shape[1:], np.float32)
            image[:n] = pixels[rows]
            index = np.concatenate([rows, np.full(IMAGE_BATCH - n, rows[-1])])
            valid = np.arange(IMAGE_BATCH) < n                # padding rows invalid
            alive.append(weakref.ref(image))
            pulled.append(j)
            yield {"image": image, "valid": valid, "index": index}
            del image

    it = batches()
    metrics, i2t, t2i = retrieval.evaluate(model, it, (ids, mask), txt2img, img2txt, k=K,
                                           batch_size=16)
    assert pulled == order
    with pytest.raises(StopIteration):
        next(it)
    np.testing.assert_allclose(i2t, one_device[1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(t2i, one_device[2], atol=1e-6, rtol=0)


def test_wrong_image_count_is_an_error(setup):
    model, pixels, ids, mask, txt2img, img2txt = setup
    with pytest.raises(ValueError, match="valid images"):
        retrieval.evaluate(model, _batches(pixels[:10]), (ids, mask), txt2img, img2txt, k=K)


def test_programs_are_built_once_per_config(setup):
    """Each evaluation reuses the config's jitted programs (a rebuilt dict would re-trace and
    recompile image, text and ITM programs every call)."""
    model = setup[0]
    assert retrieval._programs(model.config) is retrieval._programs(model.config)
