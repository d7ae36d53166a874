"""Retrieval evaluation time: blip2-jax `eval.retrieval.evaluate` vs LAVIS's `compute_sim_matrix`
loop in PyTorch on HF modules (`Blip2ForImageTextRetrieval`), same weights, same CPU.

    python bench/retrieval_eval.py [--images 1000] [--texts 5000] [--k 128] [--small]
                                   [--width 256] [--layers 2] [--queries 32] [--image-size 224]
                                   [--lavis-rows N] [--batch B] [--no-warm]

The HF model is randomly initialised (std 0.02, so ITM logits are not ~0), saved with
save_pretrained and loaded with `blip2_jax.load`. The LAVIS side is `compute_sim_matrix`
transcribed onto HF's modules: text features in batches of 256 (max_length 35), image features
per data-loader batch, the ITC matrix image by image, then a Python loop over every image (ITM of
its top-k texts, one batch of k pairs) and over every text (ITM of its top-k images), under
torch.inference_mode with HF's default (SDPA) attention. Ours: `evaluate` (streamed features,
jitted ITC/top-k, deduplicated pairs reranked in fixed-size jitted batches that project each
distinct image's cross-attention keys/values once), timed cold (with compilation) and warm.

--lavis-rows N runs LAVIS's two rerank loops on the first N images and first N texts only and
extrapolates their time linearly to all rows (the full loop at the default size takes hours on a
2-core CPU); the agreement check then covers those rows.

Prints both times, the ratio LAVIS / ours (> 1 means we are faster), the largest difference of
the two score matrices and both metric dicts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests"),   # the package and tests/hf_ref.py,
                os.path.join(_ROOT, "bench")]           # and the shared benchmark shapes

MAX_LEN = 35
VOCAB = 1000


def build_hf(width: int, layers: int, heads: int, queries: int, image_size: int,
             embed_dim: int = 128, seed: int = 0):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    import hf_ref

    from forward_throughput import hf_towers
    vision, qformer = hf_towers(width, layers, heads, image_size, VOCAB, max_positions=64,
                                use_qformer_text_input=True)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=queries,
                      image_text_hidden_size=embed_dim)
    return hf_ref.randomize(Blip2ForImageTextRetrieval(cfg), seed=seed, std=0.02).eval()


def make_data(n_images: int, n_texts: int, image_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(n_images, image_size, image_size, 3)).astype(np.float32)
    lengths = rng.integers(6, MAX_LEN + 1, n_texts)
    mask = (np.arange(MAX_LEN)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(3, VOCAB, size=(n_texts, MAX_LEN))
    ids[:, 0] = 1                                                  # [CLS]-like
    ids[np.arange(n_texts), lengths - 1] = 2                       # [SEP]-like
    ids = ids * mask
    text_to_image = np.arange(n_texts) % n_images                  # ~5 captions per image
    image_to_texts = [list(range(i, n_texts, n_images)) for i in range(n_images)]
    return pixels, ids, mask, text_to_image, image_to_texts


# ----------------------------------------------------------------------------------------------
# LAVIS `compute_sim_matrix` on HF modules
# ----------------------------------------------------------------------------------------------
def lavis_compute_sim_matrix(model, pixels, ids, mask, k_test, image_batch=64, rows=None):
    """LAVIS's loops; returns (score_i2t, score_t2i, seconds, seconds of the rerank loops,
    number of i2t rows, number of t2i rows run)."""
    import torch
    import torch.nn.functional as F

    nq = model.config.num_query_tokens

    def forward_text(text_ids, text_atts):
        emb = model.embeddings(input_ids=text_ids)
        h = model.qformer(query_embeds=emb, query_length=0, attention_mask=text_atts)[0]
        return h[:, 0, :]

    def forward_image(image):
        vit = model.vision_model(pixel_values=image)[0]
        q = model.query_tokens.expand(vit.shape[0], -1, -1)
        h = model.qformer(query_embeds=q, encoder_hidden_states=vit,
                          encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long))[0]
        return h, vit

    def compute_itm(image_inputs, text_ids, text_atts):
        image_atts = torch.ones(image_inputs.size()[:-1], dtype=torch.long)
        query_tokens = model.query_tokens.expand(image_inputs.shape[0], -1, -1)
        query_atts = torch.ones(query_tokens.size()[:-1], dtype=torch.long)
        attention_mask = torch.cat([query_atts, text_atts], dim=1)
        emb = model.embeddings(input_ids=text_ids, query_embeds=query_tokens)
        h = model.qformer(query_embeds=emb, query_length=nq, attention_mask=attention_mask,
                          encoder_hidden_states=image_inputs,
                          encoder_attention_mask=image_atts)[0]
        itm_logit = model.itm_head(h[:, :nq, :])
        return itm_logit[:, :, 1].mean(dim=1)

    t0 = time.perf_counter()
    with torch.inference_mode():
        text_ids_all = torch.from_numpy(ids)
        text_atts_all = torch.from_numpy(mask)
        num_text = len(ids)
        text_embeds, text_ids, text_atts = [], [], []
        for i in range(0, num_text, 256):
            t_ids, t_atts = text_ids_all[i:i + 256], text_atts_all[i:i + 256]
            text_embeds.append(F.normalize(model.text_projection(forward_text(t_ids, t_atts))))
            text_ids.append(t_ids)
            text_atts.append(t_atts)
        text_embeds = torch.cat(text_embeds)
        text_ids = torch.cat(text_ids)
        text_atts = torch.cat(text_atts)

        vit_feats, image_embeds = [], []
        for s in range(0, len(pixels), image_batch):
            image = torch.from_numpy(np.ascontiguousarray(
                pixels[s:s + image_batch].transpose(0, 3, 1, 2)))
            image_feat, vit_feat = forward_image(image)
            image_embeds.append(F.normalize(model.vision_projection(image_feat), dim=-1))
            vit_feats.append(vit_feat.cpu())
        vit_feats = torch.cat(vit_feats)
        image_embeds = torch.cat(image_embeds)

        sims_matrix = []
        for image_embed in image_embeds:
            sim_q2t = image_embed @ text_embeds.t()
            sim_i2t, _ = sim_q2t.max(0)
            sims_matrix.append(sim_i2t)
        sims_matrix = torch.stack(sims_matrix, dim=0)

        t_loops = time.perf_counter()
        n_i2t = len(pixels) if rows is None else min(rows, len(pixels))
        score_matrix_i2t = torch.full((len(pixels), num_text), -100.0)
        for i, sims in enumerate(sims_matrix[:n_i2t]):
            topk_sim, topk_idx = sims.topk(k=k_test, dim=0)
            image_inputs = vit_feats[i].repeat(k_test, 1, 1)
            score = compute_itm(image_inputs=image_inputs, text_ids=text_ids[topk_idx],
                                text_atts=text_atts[topk_idx]).float()
            score_matrix_i2t[i, topk_idx] = score + topk_sim

        sims_matrix = sims_matrix.t()
        n_t2i = num_text if rows is None else min(rows, num_text)
        score_matrix_t2i = torch.full((num_text, len(pixels)), -100.0)
        for i, sims in enumerate(sims_matrix[:n_t2i]):
            topk_sim, topk_idx = sims.topk(k=k_test, dim=0)
            image_inputs = vit_feats[topk_idx.cpu()]
            score = compute_itm(image_inputs=image_inputs,
                                text_ids=text_ids[i].repeat(k_test, 1),
                                text_atts=text_atts[i].repeat(k_test, 1)).float()
            score_matrix_t2i[i, topk_idx] = score + topk_sim
        t_end = time.perf_counter()
    return (score_matrix_i2t.numpy(), score_matrix_t2i.numpy(), t_end - t0, t_end - t_loops,
            n_i2t, n_t2i)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--texts", type=int, default=5000)
    ap.add_argument("--k", type=int, default=128, help="LAVIS k_test")
    ap.add_argument("--small", action="store_true",
                    help="quick mode: 100 images, 500 texts, k 16, width 128, 112 px")
    ap.add_argument("--width", type=int, default=256, help="hidden size of the ViT and Q-Former")
    ap.add_argument("--layers", type=int, default=2, help="layers of the ViT and Q-Former")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--image-batch", type=int, default=64, help="images per data-loader batch")
    ap.add_argument("--batch", type=int, default=None,
                    help="pairs per ITM call (ours; default: retrieval.itm_scores's, 64 on CPU)")
    ap.add_argument("--no-warm", action="store_true",
                    help="time ours once (cold, compilation included) instead of cold + warm")
    ap.add_argument("--lavis-rows", type=int, default=0,
                    help="run LAVIS's rerank loops on this many rows per direction and "
                         "extrapolate (0: all rows)")
    args = ap.parse_args()
    if args.small:
        args.images, args.texts, args.k = 100, 500, 16
        args.width, args.image_size = 128, 112

    import jax
    import torch
    import blip2_jax
    from blip2_jax.eval import retrieval

    k = min(args.k, args.images, args.texts)
    hf_model = build_hf(args.width, args.layers, args.heads, args.queries, args.image_size)
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        ours = blip2_jax.load(d)
    pixels, ids, mask, t2i_gt, i2t_gt = make_data(args.images, args.texts, args.image_size)
    print(f"device: jax {jax.devices()[0].device_kind} x{len(jax.devices())}, torch cpu "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs (shared); "
          f"{args.images} images x {args.texts} texts, k {k}; ViT/Q-Former width {args.width}, "
          f"{args.layers} layers, {args.queries} queries, {args.image_size} px", flush=True)

    def run_ours():
        batches = (pixels[s:s + args.image_batch]
                   for s in range(0, len(pixels), args.image_batch))
        t0 = time.perf_counter()
        out = retrieval.evaluate(ours, batches, (ids, mask), t2i_gt, i2t_gt, k=k,
                                 batch_size=args.batch, image_batch_size=args.image_batch)
        return out, time.perf_counter() - t0

    (m_ours, s_i2t, s_t2i), t_cold = run_ours()
    print(f"ours (cold, incl. compilation): {t_cold:8.1f} s", flush=True)
    t_warm = t_cold
    if not args.no_warm:
        (m_ours, s_i2t, s_t2i), t_warm = run_ours()
        print(f"ours (warm):                    {t_warm:8.1f} s", flush=True)

    rows = args.lavis_rows or None
    l_i2t, l_t2i, t_lavis, t_loops, n_i2t, n_t2i = lavis_compute_sim_matrix(
        hf_model, pixels, ids, mask, k, args.image_batch, rows)
    t_features = t_lavis - t_loops
    if rows is not None:
        per_row = t_loops / (n_i2t + n_t2i)    # i2t and t2i rows cost alike (k pairs each)
        t_lavis_full = t_features + per_row * (args.images + args.texts)
        print(f"LAVIS loop: features+ITC {t_features:.1f} s, rerank {t_loops:.1f} s for "
              f"{n_i2t}+{n_t2i} rows -> extrapolated total {t_lavis_full:8.1f} s")
    else:
        t_lavis_full = t_lavis
        print(f"LAVIS loop (torch, HF modules): {t_lavis:8.1f} s (features+ITC "
              f"{t_features:.1f} s, rerank loops {t_loops:.1f} s)")
    print(f"ratio LAVIS / ours: {t_lavis_full / t_warm:.2f}x warm, "
          f"{t_lavis_full / t_cold:.2f}x cold")

    a, b = s_i2t[:n_i2t], l_i2t[:n_i2t]
    c, d = s_t2i[:n_t2i], l_t2i[:n_t2i]
    same = [(a == -100.0) == (b == -100.0), (c == -100.0) == (d == -100.0)]
    both = [(a != -100.0) & (b != -100.0), (c != -100.0) & (d != -100.0)]
    diff = max(float(np.abs(a - b)[both[0]].max()), float(np.abs(c - d)[both[1]].max()))
    print(f"agreement on {n_i2t} i2t / {n_t2i} t2i rows: top-k sets identical in "
          f"{100 * same[0].all(1).mean():.1f}% / {100 * same[1].all(1).mean():.1f}% of rows; "
          f"max |ours - LAVIS| on common entries {diff:.2e}")
    if rows is None:
        m_lavis = retrieval.recall_metrics(l_i2t, l_t2i, t2i_gt, i2t_gt)
        print("metrics ours :", {k_: round(v, 3) for k_, v in m_ours.items()})
        print("metrics LAVIS:", {k_: round(v, 3) for k_, v in m_lavis.items()})


if __name__ == "__main__":
    main()
