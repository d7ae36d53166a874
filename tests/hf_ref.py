"""Tiny random Hugging Face reference models (torch, fp32, eager attention) for parity tests.

Every weight is re-drawn at a visible scale (HF's vision init is ~1e-10, which would hide errors),
LayerNorm scales around 1.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import transformers
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                          LlamaConfig, OPTConfig, T5Config)

VOCAB = 100
IMAGE_TOKEN = 99


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if p.ndim == 1 and ("norm" in name.lower() or "ln" in name.lower()) and \
                    name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def vision_config(**kw) -> dict:
    return dict(dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, image_size=30, patch_size=6), **kw)


def qformer_config(**kw) -> dict:
    return dict(dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, cross_attention_frequency=1, encoder_hidden_size=32,
                     max_position_embeddings=64), **kw)


def opt_config(**kw) -> OPTConfig:
    return OPTConfig(**dict(dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                                 num_attention_heads=4, max_position_embeddings=64,
                                 word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2,
                                 pad_token_id=1), **kw))


def t5_config(**kw) -> T5Config:
    return T5Config(**dict(dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                                tie_word_embeddings=False, relative_attention_num_buckets=8,
                                relative_attention_max_distance=20), **kw))


def llama_config(**kw) -> LlamaConfig:
    """Grouped-query attention (2 KV heads for 4 query heads), untied head; LLaMA's specials
    <unk> 0 (also the pad), <s> 1, </s> 2."""
    return LlamaConfig(**dict(dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=37, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2), **kw))


LLM_CONFIGS = {"opt": opt_config, "t5": t5_config, "llama": llama_config}


def blip2_generation(llm: str = "opt", num_query_tokens: int = 4, seed: int = 0,
                     vision: dict | None = None, qformer: dict | None = None,
                     text: dict | None = None) -> Blip2ForConditionalGeneration:
    text_cfg = LLM_CONFIGS[llm](**(text or {}))
    cfg = Blip2Config(vision_config=vision_config(**(vision or {})),
                      qformer_config=qformer_config(**(qformer or {})),
                      text_config=text_cfg.to_dict(), num_query_tokens=num_query_tokens,
                      image_token_index=IMAGE_TOKEN)
    cfg._attn_implementation = "eager"
    return randomize(Blip2ForConditionalGeneration(cfg), seed)


def instructblip_generation(llm: str = "llama", num_query_tokens: int = 4, seed: int = 0,
                           vision: dict | None = None, qformer: dict | None = None,
                           text: dict | None = None):
    """A tiny random `InstructBlipForConditionalGeneration` (its Q-Former keeps the text side)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration
    text_cfg = LLM_CONFIGS[llm](**(text or {}))
    cfg = InstructBlipConfig(vision_config=vision_config(**(vision or {})),
                             qformer_config=qformer_config(**(qformer or {})),
                             text_config=text_cfg.to_dict(), num_query_tokens=num_query_tokens,
                             image_token_index=IMAGE_TOKEN)
    cfg._attn_implementation = "eager"
    return randomize(InstructBlipForConditionalGeneration(cfg), seed)


def blip2_retrieval(num_query_tokens: int = 4, seed: int = 0, vision: dict | None = None,
                    qformer: dict | None = None) -> Blip2ForImageTextRetrieval:
    cfg = Blip2Config(vision_config=vision_config(**(vision or {})),
                      qformer_config=qformer_config(**dict(qformer or {},
                                                           use_qformer_text_input=True)),
                      image_text_hidden_size=16, num_query_tokens=num_query_tokens)
    cfg._attn_implementation = "eager"
    return randomize(Blip2ForImageTextRetrieval(cfg), seed)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def pixels(batch: int = 2, size: int = 30, seed: int = 0) -> np.ndarray:
    """Normalised pixel values, channels last (B, H, W, 3)."""
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def text_batch(batch: int = 2, length: int = 6, seed: int = 0, low: int = 3,
               pad_side: str = "right", lengths=None, pad_id: int = 0):
    """Random ids (B, L) in [low, 90) and a mask with varied lengths (padding on `pad_side`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, 90, size=(batch, length)).astype(np.int64)
    if lengths is None:
        lengths = [length - (b % 3) for b in range(batch)]
    mask = np.zeros((batch, length), np.int64)
    for b, n in enumerate(lengths):
        if pad_side == "right":
            mask[b, :n] = 1
        else:
            mask[b, length - n:] = 1
    ids = np.where(mask == 1, ids, pad_id)
    return ids, mask


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def unilm_additive_mask(nq: int, text_mask: np.ndarray) -> torch.Tensor:
    """(B, 1, Q+T, Q+T) additive mask: queries see queries; text t sees queries + valid text <= t.

    HF's Q-Former has no causal mode but passes a 4-D additive mask through, so this reproduces
    LAVIS's ITG attention pattern on the HF reference.
    """
    b, t = text_mask.shape
    s = nq + t
    qp, kp = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = (kp <= qp) | (kp < nq)
    allowed &= ~((qp < nq) & (kp >= nq))
    key = np.concatenate([np.ones((b, nq), bool), text_mask.astype(bool)], 1)
    allowed = allowed[None] & key[:, None, :]
    add = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
    return torch.from_numpy(add[:, None])


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models: one torch thread is as fast, and immune to a busy machine (two OpenMP
    threads on two shared cores can run ~30x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
