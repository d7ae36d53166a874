"""Image-text retrieval evaluation: LAVIS `compute_sim_matrix` + `_report_metrics`, batched.

    metrics, score_i2t, score_t2i = evaluate(model, image_batches, texts, text_to_image,
                                             image_to_texts, k=128, mesh=None)

What LAVIS does (`lavis/models/blip2_models/blip2.py::compute_sim_matrix`):
  1. text features: every caption tokenized to max_length 35 (padding="max_length"),
     `normalize(text_proj(CLS))` (N_t, E);
  2. image features: `normalize(vision_proj(query outputs))` (N_i, Q, E), and the ViT features
     (ln_vision output, (N_i, N, Dv)) kept for ITM;
  3. ITC score s[i, t] = max_q <img[i, q], txt[t]> (cosine, not divided by the temperature);
  4. i2t: for every image its top-k texts by s, rescored as ITM logit + s, where the ITM logit is
     the class-1 logit of `itm_head` averaged over the query outputs of the fused
     [queries; text] pass; every other entry is -100. t2i: the same with the top-k images of
     every text. LAVIS runs step 4 one query at a time (a Python loop over N_i + N_t queries,
     each an ITM batch of k pairs).
  5. metrics: `tasks/retrieval.py::_report_metrics` (`recall_metrics` here).

What is different here (same numbers, ≤ float rounding):
  * features are streamed: images come from an iterator of batches (only one batch of pixels is
    alive at a time; the ViT features are brought back to the host batch by batch, as LAVIS keeps
    `vit_feats` on the CPU); texts in fixed-size batches. Every batch is padded to a fixed size,
    so each program compiles once;
  * ITC is one jitted program per chunk of images (the (chunk, N_t, Q) product stays bounded);
  * top-k is `lax.top_k`, jitted, chunked over rows;
  * reranking: the (image, text) pairs of both directions are pooled and deduplicated (a pair in
    image i's top-k texts *and* in text t's top-k images is scored once: ITM of a pair does not
    depend on which direction asked), sorted by image and cut into fixed-size batches (the last
    one padded). Each batch ships only its distinct images' ViT features (every image owns at
    least min(k, N_t) consecutive pairs, so a batch of B pairs spans at most B // k + 2 images)
    plus one index per pair; the jitted ITM program projects each distinct image's Q-Former
    cross-attention keys/values once and gathers them per pair (LAVIS projects them once per
    pair, i.e. >= k times per image). No Python loop per query, only per batch;
  * sharding: given a `jax.sharding.Mesh`, the params are placed by `model.shard(mesh, rules)`
    and the batch dimension of every program (image batches, text batches, ITM pair batches) is
    sharded over the mesh's batch axes (`blip2_jax.sharding`: ("data", "fsdp") by default);
    batch sizes are rounded up to a multiple of those axes. Single process only (the host holds
    all the features and both score matrices, as LAVIS's rank 0 does after its all_reduce).

Ties in the metrics: LAVIS ranks with `np.argsort(score)[::-1]` and `np.where(inds == i)[0][0]`;
`recall_metrics` calls the same numpy argsort (default kind, on the same float32 values, row by
row along the last axis), so ties are broken exactly as LAVIS breaks them on the same numpy.
numpy's default argsort is not guaranteed stable; on small rows and the numpy builds we tested it
orders equal values by ascending index, so after the reversal the *highest* index among equal
scores ranks first (e.g. a gt caption tied with a later text wins the tie, one tied with an
earlier text loses it). Entries outside the top-k are all -100, so a gt outside the top-k gets
a rank ≥ k whichever way that tie falls.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from blip2_jax import api, processing, sharding
from blip2_jax.data import builders, pipeline
from blip2_jax.models.blip2 import Blip2Module

K_TEST = 128            # LAVIS retrieval configs' k_test
TEXT_MAX_LENGTH = 35    # LAVIS compute_sim_matrix tokenization (padding="max_length")
K_TEST_POOL = 1000      # the test images K_TEST was chosen for (Flickr30k's; 5000 captions)
NEG = -100.0            # LAVIS's score outside the top-k
_ITC_ELEMENTS = 1 << 25  # bound on chunk × N_t × Q of one ITC program
_TOPK_ELEMENTS = 1 << 24  # bound on rows × columns of one top-k program
ITM_BATCH = 256         # default pairs per ITM call on GPU/TPU
ITM_BATCH_CPU = 64      # on XLA:CPU: smaller batches keep the activations in cache (at the bench
                        # shapes ~1.4x less time per pair than 128 or 256)


def k_for_images(images: int) -> int:
    """LAVIS's k_test scaled to a test split of `images` images: K_TEST is a short list of
    Flickr30k's 1000 (and COCO's 5000); on a pool of 100 it would re-rank every image, so that ITM
    alone ranked them instead of re-ranking ITC's best (13 of 100 images)."""
    return max(1, -(-K_TEST * images // K_TEST_POOL))


@dataclasses.dataclass
class ImageFeatures:
    """Per image (in the order of the truth: dataset `index` order when batches carry it):
    itc (N_i, Q, E) normalised ITC projections of the query outputs; vit (N_i, N, Dv) the image
    encoder's tokens after ln_vision (the ITM input); index (N_i,) the batches' `index` column
    when they had one."""
    itc: np.ndarray
    vit: np.ndarray
    index: Optional[np.ndarray] = None

    def __len__(self):
        return self.itc.shape[0]


@dataclasses.dataclass
class TextFeatures:
    """Per text: itc (N_t, E) normalised text_proj of the [CLS] output; ids, mask (N_t, T) the
    tokens (also the ITM input, as in LAVIS)."""
    itc: np.ndarray
    ids: np.ndarray
    mask: np.ndarray

    def __len__(self):
        return self.itc.shape[0]


# ----------------------------------------------------------------------------------------------
# Programs and placement
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _programs(cfg) -> dict:
    """The jitted programs of one config, each a function of (params, inputs)."""
    module = Blip2Module(cfg)

    def image(params, pixels):
        def f(m, x):
            emb = m.image_embeds(x)
            return m.image_features(m.query_output(emb)[0]), emb
        return module.apply({"params": params}, pixels, method=f)

    def text(params, ids, mask):
        return module.apply({"params": params}, ids, mask, method="text_features")

    def itm(params, vit_u, local, ids, mask):
        # vit_u (U, N, Dv): the batch's distinct images; pair b uses vit_u[local[b]]
        logits = module.apply({"params": params}, vit_u, ids, mask, image_index=local,
                              method="itm_logits")
        return logits[:, 1].astype(jnp.float32)               # mean over queries of class 1

    return {"image": jax.jit(image), "text": jax.jit(text), "itm": jax.jit(itm)}


@jax.jit
def _itc_chunk(img, txt):
    """(C, T): max over queries of img (C, Q, E) · txt (T, E) — `Blip2Module.itc`'s formula."""
    s = jnp.einsum("iqe,te->itq", img.astype(jnp.float32), txt.astype(jnp.float32))
    return jnp.max(s, axis=-1)


@functools.partial(jax.jit, static_argnums=1)
def _topk(x, k):
    return jax.lax.top_k(x, k)


class _Placement:
    """Where program inputs go: the default device, or batch-sharded / replicated on a mesh."""

    def __init__(self, mesh=None, rules=None):
        self.mesh = mesh
        self.rules = sharding.DEFAULT_RULES if rules is None else tuple(rules)
        self.n = sharding.batch_shards(mesh, self.rules)

    def round(self, b: int) -> int:
        """`b` rounded up to a multiple of the batch axes' size (so the batch is sharded)."""
        return -(-max(int(b), 1) // self.n) * self.n

    def batch(self, x):
        if self.mesh is None:
            return jax.device_put(x)
        return sharding.shard_batch(x, self.mesh, self.rules)

    def replicated(self, x):
        if self.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))


def _setup(model: api.Blip2, mesh=None, rules=None, *, itm: bool = False):
    """(model with params on `mesh` when one is given, its placement)."""
    model._need(model.config.itc, "retrieval evaluation", "ITC projections (vision_proj/text_proj)")
    if itm:
        model._need(model.config.itm, "retrieval reranking", "ITM head (itm_head)")
    if mesh is None:
        if isinstance(model, api.ShardedBlip2):
            return model, _Placement(model.mesh, model.rules)
        return model, _Placement()
    mesh = sharding.auto_mesh(mesh)
    rules = sharding.DEFAULT_RULES if rules is None else tuple(rules)
    if not (isinstance(model, api.ShardedBlip2) and model.mesh == mesh
            and tuple(model.rules) == rules):
        model = model.shard(mesh, rules)
    return model, _Placement(mesh, rules)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    """`x` with its first axis padded to n rows by repeating its last row."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)], axis=0)


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
def _image_batches(pixels_iter: Iterable):
    """(pixels, valid, index or None) from arrays (B, H, W, 3) or pipeline batches (dicts with
    "image" and optionally "valid" and "index")."""
    for b in pixels_iter:
        if isinstance(b, Mapping):
            pix = b["image"]
            valid = (np.asarray(b["valid"], bool).reshape(-1) if "valid" in b
                     else np.ones(len(pix), bool))
            index = np.asarray(b["index"]) if "index" in b else None
        else:
            pix, valid, index = b, np.ones(len(b), bool), None
        pix = np.asarray(pix)
        if pix.ndim != 4 or pix.shape[-1] != 3:
            raise ValueError(f"image batches must be (B, H, W, 3) channels-last floats; got "
                             f"{pix.shape}")
        yield pix.astype(np.float32, copy=False), valid, index


def image_features(model: api.Blip2, pixels_iter: Iterable, *, batch_size: Optional[int] = None,
                   mesh=None, rules=None) -> ImageFeatures:
    """ITC features and ViT features of every image, streamed batch by batch.

    pixels_iter: an iterable of (B, H, W, 3) float arrays, or of pipeline batches (dicts with
    "image", and optionally "valid" (rows False are dropped) and "index" (rows are returned in
    ascending index order, i.e. `builders.retrieval_truth`'s image order)). It is consumed once;
    only the current batch of pixels is held (plus one batch in flight). batch_size: the program's
    batch (default: the first batch's size, rounded up to the mesh's batch axes); larger batches
    are split, smaller ones padded.
    """
    model, place = _setup(model, mesh, rules)
    fn = _programs(model.config)["image"]
    itc, vit, index = [], [], []
    with_index = None
    pending = None

    def collect(p):
        out, n, keep = p
        itc.append(_host(out[0])[:n][keep])
        vit.append(_host(out[1])[:n][keep])

    bs = None
    for pix, valid, idx in _image_batches(pixels_iter):
        if with_index is None:
            with_index = idx is not None
        elif with_index != (idx is not None):
            raise ValueError("some image batches have an 'index' column and some do not")
        if bs is None:
            bs = place.round(batch_size or len(pix))
        for s in range(0, len(pix), bs):
            chunk = pix[s:s + bs]
            keep = valid[s:s + bs]
            out = fn(model.params, place.batch(_pad_rows(chunk, bs)))
            if pending is not None:
                collect(pending)          # the previous batch, while this one runs
            pending = (out, len(chunk), keep)
            if with_index:
                index.append(idx[s:s + bs][keep])
    if pending is not None:
        collect(pending)
    if not itc:
        raise ValueError("the image iterator yielded no images")
    feats = ImageFeatures(np.concatenate(itc), np.concatenate(vit),
                          np.concatenate(index) if with_index else None)
    if with_index:
        order = np.argsort(feats.index, kind="stable")
        feats = ImageFeatures(feats.itc[order], feats.vit[order], feats.index[order])
        if len(np.unique(feats.index)) != len(feats.index):
            raise ValueError("image batches repeat an index (a valid row seen twice)")
    return feats


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int = TEXT_MAX_LENGTH,
                   clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """LAVIS's retrieval text side: `pre_caption` (when clean), then the Q-Former tokenizer's
    `[CLS] text [SEP]` truncated and padded to max_length (int32 ids, mask)."""
    texts = [processing.pre_caption(t) if clean else t for t in texts]
    return processing.tokenize_prompts(tokenizer, texts, kind="qformer", max_length=max_length,
                                       padding="max_length")


def text_features(model: api.Blip2, ids, mask=None, *, batch_size: int = 256, mesh=None,
                  rules=None) -> TextFeatures:
    """Normalised ITC text features (N_t, E) of token rows `ids`/`mask` (N_t, T), in fixed-size
    batches (the last padded)."""
    model, place = _setup(model, mesh, rules)
    ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"ids must be (N, T) with a matching mask; got {ids.shape}, {mask.shape}")
    if len(ids) == 0:
        raise ValueError("no texts")
    fn = _programs(model.config)["text"]
    bs = place.round(min(batch_size, len(ids)))
    outs = []
    for s in range(0, len(ids), bs):
        n = min(bs, len(ids) - s)
        out = fn(model.params, place.batch(_pad_rows(ids[s:s + bs], bs)),
                 place.batch(_pad_rows(mask[s:s + bs], bs)))
        outs.append((out, n))
    feats = np.concatenate([_host(o)[:n] for o, n in outs])
    return TextFeatures(feats, ids, mask)


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------
def itc_scores(img_feats, txt_feats, *, chunk: Optional[int] = None) -> np.ndarray:
    """s (N_i, N_t) float32: max over queries of the cosine of image i's query features
    (N_i, Q, E) with text t's feature (N_t, E). One jitted program per chunk of images (chunk
    default: the most images whose (chunk, N_t, Q) product stays under 2**25 elements)."""
    img = img_feats.itc if isinstance(img_feats, ImageFeatures) else np.asarray(img_feats)
    txt = txt_feats.itc if isinstance(txt_feats, TextFeatures) else np.asarray(txt_feats)
    n_i, q, _ = img.shape
    if chunk is None:
        chunk = max(1, _ITC_ELEMENTS // max(1, txt.shape[0] * q))
    chunk = min(chunk, n_i)
    txt_d = jax.device_put(txt)
    outs = [(_itc_chunk(_pad_rows(img[s:s + chunk], chunk), txt_d), min(chunk, n_i - s))
            for s in range(0, n_i, chunk)]
    return np.concatenate([_host(o)[:n] for o, n in outs]).astype(np.float32, copy=False)


def topk_rows(x: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) int indices of the k largest entries of every row, best first (`lax.top_k`,
    jitted, in fixed-size chunks of rows)."""
    n, m = x.shape
    k = min(k, m)
    rows = max(1, min(n, _TOPK_ELEMENTS // max(m, 1)))
    outs = [(_topk(_pad_rows(x[s:s + rows], rows), k)[1], min(rows, n - s))
            for s in range(0, n, rows)]
    return np.concatenate([_host(o)[:r] for o, r in outs]).astype(np.int64)


def candidate_pairs(sims: np.ndarray, k: int):
    """The rerank work list. Returns (top_t (N_i, k_i2t), top_i (N_t, k_t2i), pair_img, pair_txt,
    inv): the top-k texts of every image and images of every text (k capped at the counts), the
    distinct (image, text) pairs of both lists sorted by image then text, and for every entry of
    top_t.ravel() followed by top_i.ravel() its pair's position."""
    n_i, n_t = sims.shape
    top_t = topk_rows(sims, min(k, n_t))
    top_i = topk_rows(np.ascontiguousarray(sims.T), min(k, n_i))
    keys = np.concatenate([(np.arange(n_i)[:, None] * n_t + top_t).ravel(),
                           (top_i * n_t + np.arange(n_t)[:, None]).ravel()])
    union, inv = np.unique(keys, return_inverse=True)
    return top_t, top_i, union // n_t, union % n_t, inv.reshape(-1)


def itm_scores(model: api.Blip2, vit: np.ndarray, ids: np.ndarray, mask: np.ndarray,
               pair_img: np.ndarray, pair_txt: np.ndarray, *, batch_size: Optional[int] = None,
               mesh=None, rules=None, max_in_flight: int = 2) -> np.ndarray:
    """ITM logit (class 1, mean over queries; LAVIS `compute_itm`) of every pair
    (vit[pair_img[p]], ids/mask[pair_txt[p]]), in batched jitted calls of `batch_size` pairs
    (default `ITM_BATCH`, `ITM_BATCH_CPU` on the CPU backend; rounded up to the mesh's batch
    axes; the last batch padded). Pairs should be sorted by image (as `candidate_pairs` gives
    them): each batch ships its distinct images' features once (U slots, the most any batch
    needs), the Q-Former projects their cross-attention keys/values once and gathers them per
    pair (`Blip2Module.itm_logits` with `image_index`)."""
    model, place = _setup(model, mesh, rules, itm=True)
    if batch_size is None:
        batch_size = ITM_BATCH_CPU if jax.default_backend() == "cpu" else ITM_BATCH
    fn = _programs(model.config)["itm"]
    pair_img, pair_txt = np.asarray(pair_img), np.asarray(pair_txt)
    p = len(pair_img)
    if p == 0:
        return np.zeros((0,), np.float32)
    bs = place.round(min(batch_size, p))
    starts = range(0, p, bs)
    groups = [np.unique(pair_img[s:s + bs], return_inverse=True) for s in starts]
    slots = max(len(u) for u, _ in groups)
    outs = []
    for j, (s, (u, local)) in enumerate(zip(starts, groups)):
        txt = pair_txt[s:s + bs]
        vit_u = vit[_pad_rows(u, slots)]                        # (U, N, Dv), host gather
        out = fn(model.params, place.replicated(vit_u),
                 place.batch(_pad_rows(local.reshape(-1).astype(np.int32), bs)),
                 place.batch(_pad_rows(ids[txt], bs)), place.batch(_pad_rows(mask[txt], bs)))
        outs.append((out, len(txt)))
        if j >= max_in_flight:                                 # bound the queued inputs
            outs[j - max_in_flight][0].block_until_ready()
    return np.concatenate([_host(o)[:n] for o, n in outs])


def rerank(model: api.Blip2, img: ImageFeatures, txt: TextFeatures, sims: np.ndarray,
           k: int = K_TEST, *, batch_size: Optional[int] = None, mesh=None,
           rules=None) -> tuple[np.ndarray, np.ndarray]:
    """LAVIS's final score matrices: score_i2t (N_i, N_t) = ITM logit + s on each image's top-k
    texts by s, score_t2i (N_t, N_i) = ITM logit + s on each text's top-k images, -100 elsewhere
    (float32). k is capped at the number of texts / images."""
    sims = np.asarray(sims, np.float32)
    n_i, n_t = sims.shape
    if (len(img), len(txt)) != (n_i, n_t):
        raise ValueError(f"{len(img)} images and {len(txt)} texts for a {sims.shape} score matrix")
    top_t, top_i, pair_img, pair_txt, inv = candidate_pairs(sims, k)
    itm = itm_scores(model, img.vit, txt.ids, txt.mask, pair_img, pair_txt,
                     batch_size=batch_size, mesh=mesh, rules=rules)
    n1 = top_t.size
    rows_i = np.arange(n_i)[:, None]
    rows_t = np.arange(n_t)[:, None]
    score_i2t = np.full((n_i, n_t), NEG, np.float32)
    score_i2t[rows_i, top_t] = itm[inv[:n1]].reshape(top_t.shape) + sims[rows_i, top_t]
    score_t2i = np.full((n_t, n_i), NEG, np.float32)
    score_t2i[rows_t, top_i] = itm[inv[n1:]].reshape(top_i.shape) + sims[top_i, rows_t]
    return score_i2t, score_t2i


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def ranked(scores: np.ndarray) -> np.ndarray:
    """Every row's columns best first, as LAVIS orders them (`np.argsort(row)[::-1]`, the same
    default-kind argsort, so ties fall as they do in LAVIS)."""
    return np.argsort(scores, axis=-1)[:, ::-1]


def _positions(scores: np.ndarray) -> np.ndarray:
    """pos[r, c] = the rank of column c in row r under `ranked`."""
    inds = ranked(scores)
    pos = np.empty(inds.shape, np.int64)
    pos[np.arange(inds.shape[0])[:, None], inds] = np.arange(inds.shape[1])[None, :]
    return pos


def ranks(score_i2t, score_t2i, text_to_image, image_to_texts) -> tuple[np.ndarray, np.ndarray]:
    """LAVIS's ranks: (ranks_i2t (N_i,) float, the best rank among each image's gt captions, 1e20
    when it has none; ranks_t2i (N_t,) int, the rank of each text's gt image)."""
    score_i2t, score_t2i = np.asarray(score_i2t), np.asarray(score_t2i)
    text_to_image = np.asarray(text_to_image)
    n_i = score_i2t.shape[0]
    if len(image_to_texts) != n_i or len(text_to_image) != score_t2i.shape[0]:
        raise ValueError(f"ground truth for {len(image_to_texts)} images / {len(text_to_image)} "
                         f"texts, scores {score_i2t.shape} / {score_t2i.shape}")
    pos = _positions(score_i2t)
    owner = np.repeat(np.arange(n_i), [len(t) for t in image_to_texts])
    gt = np.concatenate([np.asarray(t, np.int64).reshape(-1) for t in image_to_texts]
                        ) if len(owner) else np.zeros(0, np.int64)
    ranks_i2t = np.full(n_i, 1e20)
    np.minimum.at(ranks_i2t, owner, pos[owner, gt].astype(np.float64))
    ranks_t2i = _positions(score_t2i)[np.arange(len(text_to_image)), text_to_image]
    return ranks_i2t, ranks_t2i


def recall_metrics(score_i2t, score_t2i, text_to_image, image_to_texts) -> dict:
    """LAVIS `RetrievalTask._report_metrics` on `ranks` (ties: see the module docstring).
    Percentages (×100): txt_r1/5/10 (i2t), img_r1/5/10 (t2i), txt_r_mean, img_r_mean, r_mean,
    agg_metrics (= txt_r_mean, as LAVIS)."""
    ranks_i2t, ranks_t2i = ranks(score_i2t, score_t2i, text_to_image, image_to_texts)

    def r(ranks, n):
        return 100.0 * len(np.where(ranks < n)[0]) / len(ranks)

    tr1, tr5, tr10 = (r(ranks_i2t, n) for n in (1, 5, 10))
    ir1, ir5, ir10 = (r(ranks_t2i, n) for n in (1, 5, 10))
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
            "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
            "r_mean": (tr_mean + ir_mean) / 2, "agg_metrics": tr_mean}


# ----------------------------------------------------------------------------------------------
# The whole procedure
# ----------------------------------------------------------------------------------------------
def evaluate(model: api.Blip2, images_iter: Iterable, texts, text_to_image, image_to_texts,
             k: int = K_TEST, batch_size: Optional[int] = None, mesh=None, *,
             image_batch_size: Optional[int] = None, text_batch_size: int = 256, rules=None,
             tokenizer=None, max_length: int = TEXT_MAX_LENGTH, clean_text: bool = True,
             ) -> tuple[dict, np.ndarray, np.ndarray]:
    """LAVIS retrieval evaluation → (metrics, score_i2t (N_i, N_t), score_t2i (N_t, N_i)).

    images_iter: image batches in the truth's image order (see `image_features`); texts: strings
    (cleaned with `pre_caption`, tokenized with `tokenizer` or the model's Q-Former tokenizer to
    max_length 35) or an (ids, mask) pair already tokenized; text_to_image (N_t,),
    image_to_texts (N_i lists): the ground truth (`builders.retrieval_truth`). k: LAVIS k_test;
    batch_size: pairs per ITM call (default: see `itm_scores`); mesh: shard every batch over its
    batch axes.
    """
    model, _ = _setup(model, mesh, rules, itm=True)     # place the params once
    if isinstance(texts, tuple) and len(texts) == 2 and not isinstance(texts[0], str):
        ids, mask = texts
    else:
        tok = tokenizer if tokenizer is not None else model.qformer_tokenizer
        ids, mask = tokenize_texts(tok, list(texts), max_length, clean_text)
    txt = text_features(model, ids, mask, batch_size=text_batch_size)
    img = image_features(model, images_iter, batch_size=image_batch_size)
    if len(img) != len(image_to_texts):
        raise ValueError(f"the image iterator gave {len(img)} valid images; the ground truth "
                         f"has {len(image_to_texts)}")
    sims = itc_scores(img, txt)
    score_i2t, score_t2i = rerank(model, img, txt, sims, k, batch_size=batch_size)
    return recall_metrics(score_i2t, score_t2i, text_to_image, image_to_texts), score_i2t, \
        score_t2i


def evaluate_split(model: api.Blip2, data_dir: str, name: str, split: str = "test", *,
                   image_batch_size: int = 64, image_size: Optional[int] = None,
                   image_processor: str = "blip_image_eval", **kwargs):
    """`evaluate` on a stored captions split (`builders.retrieval_truth` + an evaluation
    `pipeline.Pipeline`): (metrics, score_i2t, score_t2i). kwargs go to `evaluate`."""
    truth = builders.retrieval_truth(data_dir, name, split)
    ev = pipeline.Pipeline([pipeline.Source(name, split)], data_dir=data_dir,
                           batch_size=image_batch_size, train=False,
                           image_size=image_size or model.config.vision.image_size,
                           image_processor=image_processor)
    batches = ({"image": b["image"], "valid": b["valid"], "index": b["index"]} for b in ev)
    return evaluate(model, batches, truth.texts, truth.text_to_image, truth.image_to_texts,
                    **dict(kwargs, image_batch_size=image_batch_size))
