"""Forward throughput of the full BLIP-2 model: blip2-jax (jitted) vs HF transformers (torch).

Same weights (HF save_pretrained → blip2_jax.load), same inputs, same CPU, fp32. HF runs with its
default attention (SDPA) under torch.inference_mode — its fastest stock setting.

    python bench/forward_throughput.py [--llm opt|t5] [--batch 8] [--iters 20]

Prints images/s for both and the ratio ours / HF (> 1 means we are faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build_hf(llm: str, image_size: int, num_query_tokens: int):
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config
    import hf_ref

    width, layers, heads, vocab = 256, 4, 8, 2048
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=14)
    qformer = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                   num_attention_heads=heads, intermediate_size=4 * width,
                   cross_attention_frequency=2, encoder_hidden_size=width,
                   max_position_embeddings=128)
    if llm == "opt":
        text = OPTConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                         ffn_dim=4 * width, num_attention_heads=heads,
                         max_position_embeddings=256, word_embed_proj_dim=width)
    else:
        text = T5Config(vocab_size=vocab, d_model=width, d_kv=width // heads, d_ff=4 * width,
                        num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                        feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                        tie_word_embeddings=False, decoder_start_token_id=0)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                      num_query_tokens=num_query_tokens, image_token_index=vocab - 1)
    model = hf_ref.randomize(Blip2ForConditionalGeneration(cfg), std=0.02)
    return model.eval()


def timeit(fn, iters: int) -> float:
    fn()  # warm-up / compile
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", choices=["opt", "t5"], default="opt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import jax
    import torch
    import blip2_jax

    hf_model = build_hf(args.llm, args.image_size, args.queries)
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        ours = blip2_jax.load(d)

    rng = np.random.default_rng(0)
    b, t, q = args.batch, args.text_len, args.queries
    pix = rng.normal(size=(b, args.image_size, args.image_size, 3)).astype(np.float32)
    ids = rng.integers(3, 1000, size=(b, t))
    mask = np.ones((b, t), np.int64)
    img_tok = hf_model.config.image_token_index
    hf_inputs = dict(pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2).copy()),
                     input_ids=torch.from_numpy(np.concatenate([np.full((b, q), img_tok), ids], 1)),
                     attention_mask=torch.ones((b, q + t), dtype=torch.long))
    dec = np.zeros((b, t), np.int64)
    if args.llm == "t5":
        hf_inputs["decoder_input_ids"] = torch.from_numpy(dec)

    def run_hf():
        with torch.inference_mode():
            return hf_model(**hf_inputs).logits

    pix_j, ids_j, mask_j = jax.device_put(pix), jax.device_put(ids), jax.device_put(mask)
    dec_j = jax.device_put(dec) if args.llm == "t5" else None

    def run_ours():
        out = (ours.logits(pix_j, ids_j, mask_j, decoder_input_ids=dec_j) if dec_j is not None
               else ours.logits(pix_j, ids_j, mask_j))
        return out.block_until_ready()

    t_hf = timeit(run_hf, args.iters)
    t_ours = timeit(run_ours, args.iters)
    print(f"device: {jax.devices()[0].device_kind}; torch threads {torch.get_num_threads()}; "
          f"model {args.llm}, batch {b}, image {args.image_size}px, {q} queries, text {t}")
    print(f"HF transformers (torch, SDPA): {t_hf * 1e3:8.1f} ms/batch  {b / t_hf:8.1f} images/s")
    print(f"blip2-jax (jax.jit):           {t_ours * 1e3:8.1f} ms/batch  {b / t_ours:8.1f} images/s")
    print(f"ratio ours/HF throughput: {t_hf / t_ours:.2f}")


if __name__ == "__main__":
    main()
