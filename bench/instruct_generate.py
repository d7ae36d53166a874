"""InstructBLIP-Vicuna answering with beam search: blip2-jax `generate` vs HF transformers
`InstructBlipForConditionalGeneration.generate`.

The model is InstructBLIP-Vicuna in shape (EVA-style ViT, instruction-aware Q-Former, a LLaMA
LLM with full multi-head attention, SwiGLU and RMSNorm), scaled down to run on a CPU. Same
weights (HF save_pretrained -> blip2_jax.load), same inputs: a batch of images, each with its own
instruction (mixed lengths: the Q-Former's text right-padded, the LLM's prompt left-padded as
HF's processor does), beam 5, exactly `--new-tokens` new tokens (min = max, so neither side stops
early), fp32, same CPU. The tokens are checked identical before timing.

    python bench/instruct_generate.py [--batch 4] [--beams 5] [--new-tokens 20] [--iters 3]
                                      [--width 256] [--layers 4] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]


def build_hf(width: int, layers: int, heads: int, image_size: int, vocab: int, queries: int):
    """A random InstructBLIP-Vicuna-shaped HF model (LLaMA text tower, MHA, untied head)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig
    import hf_ref
    from forward_throughput import hf_towers

    vision, qformer = hf_towers(width, layers, heads, image_size, vocab, max_positions=128)
    text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(2.6875 * width),
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=256, rms_norm_eps=1e-6,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer,
                             text_config=text.to_dict(), num_query_tokens=queries,
                             image_token_index=vocab - 1)
    cfg._attn_implementation = "eager"
    return hf_ref.randomize(InstructBlipForConditionalGeneration(cfg), std=0.02).eval()


def inputs(b: int, vocab: int, rng):
    """Per-row instructions of mixed lengths: Q-Former ids ([CLS] .. [SEP], right padded) and the
    LLM prompt (BOS first, left padded)."""
    q_len, l_len = 12, 10
    q_ids = np.zeros((b, q_len), np.int64)
    q_mask = np.zeros((b, q_len), np.int64)
    l_ids = np.zeros((b, l_len), np.int64)
    l_mask = np.zeros((b, l_len), np.int64)
    for r in range(b):
        n = q_len - 2 * (r % 4)
        q_ids[r, :n] = rng.integers(3, vocab - 2, n)
        q_mask[r, :n] = 1
        m = l_len - 2 * (r % 4)
        l_ids[r, l_len - m:] = np.concatenate([[1], rng.integers(3, vocab - 2, m - 1)])
        l_mask[r, l_len - m:] = 1
    return q_ids, q_mask, l_ids, l_mask


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--width", type=int, default=256, help="hidden size of every tower")
    ap.add_argument("--layers", type=int, default=4, help="layers of every tower")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--device", default="cpu", help="torch device of the HF model")
    args = ap.parse_args()

    import jax
    import torch

    import blip2_jax
    from forward_throughput import sync, timeit_interleaved

    device = torch.device(args.device)
    hf_model = build_hf(args.width, args.layers, args.heads, args.image_size, args.vocab,
                        args.queries)
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        ours = blip2_jax.load(d)
    hf_model = hf_model.to(device)

    b, n, nq = args.batch, args.new_tokens, args.queries
    rng = np.random.default_rng(0)
    pix = rng.normal(size=(b, args.image_size, args.image_size, 3)).astype(np.float32)
    q_ids, q_mask, l_ids, l_mask = inputs(b, args.vocab, rng)
    image_token = hf_model.config.image_token_index
    hf_in = dict(
        pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2).copy()),
        qformer_input_ids=torch.from_numpy(q_ids), qformer_attention_mask=torch.from_numpy(q_mask),
        input_ids=torch.from_numpy(np.concatenate([np.full((b, nq), image_token), l_ids], 1)),
        attention_mask=torch.from_numpy(np.concatenate([np.ones((b, nq), np.int64), l_mask], 1)))
    hf_in = {k: v.to(device) for k, v in hf_in.items()}
    gen = dict(max_new_tokens=n, min_new_tokens=n, num_beams=args.beams)

    def run_hf():
        with torch.inference_mode():
            out = hf_model.generate(**hf_in, do_sample=False, **gen)
        sync(device)
        return out.cpu().numpy()[:, -n:]

    def run_ours():
        return np.asarray(ours.generate(pix, l_ids, l_mask, qformer_input_ids=q_ids,
                                        qformer_attention_mask=q_mask, **gen))

    same = np.array_equal(run_hf(), run_ours()[:, :n])
    t = timeit_interleaved({"hf": run_hf, "ours": run_ours}, args.iters)
    print(f"device: jax {jax.devices()[0].device_kind}, torch {device}; torch threads "
          f"{torch.get_num_threads()}; InstructBLIP-Vicuna shape: width {args.width}, "
          f"{args.layers} layers/tower, {args.heads} heads, vocab {args.vocab}, {nq} queries; "
          f"batch {b}, beam {args.beams}, {n} new tokens, fp32")
    print(f"tokens identical to HF: {same}")
    print(f"HF transformers generate: {t['hf']:7.2f} s/batch  {b / t['hf']:7.2f} answers/s")
    print(f"blip2-jax generate:       {t['ours']:7.2f} s/batch  {b / t['ours']:7.2f} answers/s")
    print(f"ratio ours/HF answers per second: {t['hf'] / t['ours']:.2f}")


if __name__ == "__main__":
    main()
