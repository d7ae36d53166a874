"""Forward throughput of the full BLIP-2 model: blip2-jax (jitted) vs HF transformers (torch).

Same weights (HF save_pretrained → blip2_jax.load), same inputs, same CPU, fp32 (defaults; see
--device and --dtype). HF runs under torch.inference_mode with its default attention (SDPA, its
fastest stock setting) and with eager attention (the parity reference); the three are timed in
alternating rounds.

    python bench/forward_throughput.py [--llm opt|t5] [--batch 8] [--iters 20]
                                       [--device cpu|cuda] [--dtype float32|bfloat16]

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

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]   # the package and tests/hf_ref.py


def hf_towers(width: int, layers: int, heads: int, image_size: int, vocab: int,
              max_positions: int, **qformer_extra) -> tuple[dict, dict]:
    """HF vision and Q-Former config dicts of the benchmark shape (patch 14, MLP 4x width,
    cross-attention every 2 layers), shared by the benchmarks."""
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=14)
    qformer = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                   num_attention_heads=heads, intermediate_size=4 * width,
                   cross_attention_frequency=2, encoder_hidden_size=width,
                   max_position_embeddings=max_positions, **qformer_extra)
    return vision, qformer


def build_hf(llm: str, image_size: int, num_query_tokens: int, width: int = 512, layers: int = 4,
             heads: int = 8, vocab: int = 4096):
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config
    import hf_ref

    vision, qformer = hf_towers(width, layers, heads, image_size, vocab, max_positions=128)
    if llm == "opt":
        text = OPTConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                         ffn_dim=4 * width, num_attention_heads=heads,
                         max_position_embeddings=256, word_embed_proj_dim=width)
    else:
        text = T5Config(vocab_size=vocab, d_model=width, d_kv=width // heads, d_ff=4 * width,
                        num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                        feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                        tie_word_embeddings=False, decoder_start_token_id=0, bos_token_id=1)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                      num_query_tokens=num_query_tokens, image_token_index=vocab - 1)
    model = hf_ref.randomize(Blip2ForConditionalGeneration(cfg), std=0.02)
    return model.eval()


def add_model_args(ap: argparse.ArgumentParser, *, batch: int, width: int):
    """The benchmark model's shape, shared by the benchmarks."""
    ap.add_argument("--llm", choices=["opt", "t5"], default="opt")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--width", type=int, default=width, help="hidden size of every tower")
    ap.add_argument("--layers", type=int, default=4, help="layers of every tower")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="torch device of the HF model (cpu, cuda); "
                    "blip2-jax runs on JAX's default device")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="parameter and compute dtype of both models")
    ap.add_argument("--tf32", action="store_true",
                    help="float32 on CUDA: TF32 matmuls on both sides instead of true fp32")


def setup_device(args):
    """The HF model's torch device. On CUDA, float32 means true fp32 on both sides (TF32 off for
    torch's matmuls and cuDNN, JAX matmul precision 'highest'), or TF32 on both with --tf32."""
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and args.dtype == "float32":
        import jax
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        jax.config.update("jax_default_matmul_precision",
                          "tensorfloat32" if args.tf32 else "highest")
        print(f"float32 matmuls on CUDA: {'TF32' if args.tf32 else 'true fp32'} on both sides")
    return device


def sync(device):
    """Wait for the torch device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


def build_pair(args):
    """(HF model, blip2-jax model with the same weights) for parsed `add_model_args`."""
    import blip2_jax
    hf_model = build_hf(args.llm, args.image_size, args.queries, args.width, args.layers,
                        args.heads)
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        ours = blip2_jax.load(d, dtype=args.dtype)
    import torch
    return hf_model.to(args.device, getattr(torch, args.dtype)), ours


def timeit_interleaved(fns: dict, iters: int) -> dict:
    """Median seconds per call of each fn, measured in alternating rounds (a noisy shared machine
    then slows every contender alike)."""
    for fn in fns.values():   # warm-up / compile
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, batch=8, width=512)
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import jax
    import torch

    device = setup_device(args)
    hf_model, ours = build_pair(args)

    rng = np.random.default_rng(0)
    b, t, q = args.batch, args.text_len, args.queries
    pix = rng.normal(size=(b, args.image_size, args.image_size, 3)).astype(np.float32)
    ids = rng.integers(3, 1000, size=(b, t))
    mask = np.ones((b, t), np.int64)
    img_tok = hf_model.config.image_token_index
    hf_inputs = dict(pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2).copy()
                                                   ).to(getattr(torch, args.dtype)),
                     input_ids=torch.from_numpy(np.concatenate([np.full((b, q), img_tok), ids], 1)),
                     attention_mask=torch.ones((b, q + t), dtype=torch.long))
    dec = np.zeros((b, t), np.int64)
    if args.llm == "t5":
        hf_inputs["decoder_input_ids"] = torch.from_numpy(dec)
    hf_inputs = {k: v.to(device) for k, v in hf_inputs.items()}

    def run_hf(impl):
        hf_model.set_attn_implementation(impl)
        with torch.inference_mode():
            out = hf_model(**hf_inputs).logits
        sync(device)
        return out

    pix_j, ids_j, mask_j = jax.device_put(pix), jax.device_put(ids), jax.device_put(mask)
    dec_j = jax.device_put(dec) if args.llm == "t5" else None

    def run_ours():
        out = (ours.logits(pix_j, ids_j, mask_j, decoder_input_ids=dec_j) if dec_j is not None
               else ours.logits(pix_j, ids_j, mask_j))
        return out.block_until_ready()

    t = timeit_interleaved({"sdpa": lambda: run_hf("sdpa"), "eager": lambda: run_hf("eager"),
                            "ours": run_ours}, args.iters)
    print(f"device: jax {jax.devices()[0].device_kind}, torch {device}; torch threads "
          f"{torch.get_num_threads()}; model {args.llm}, width {args.width}, {args.layers} "
          f"layers/tower, {args.heads} heads, batch {b}, image {args.image_size}px, {q} queries, "
          f"text {args.text_len}, {args.dtype}")
    for name, label in (("sdpa", "HF transformers, SDPA attention"),
                        ("eager", "HF transformers, eager attention"), ("ours", "blip2-jax, jax.jit")):
        print(f"{label:34s} {t[name] * 1e3:8.1f} ms/batch  {b / t[name]:8.1f} images/s")
    print(f"ratio ours/HF throughput: {t['sdpa'] / t['ours']:.2f} (vs SDPA), "
          f"{t['eager'] / t['ours']:.2f} (vs eager)")


if __name__ == "__main__":
    main()
