"""Counted model FLOPs: an analytic matmul count of every tower and of one training step, for
TFLOP/s and MFU (MaxText `calculate_tflops_training_per_device` style).

Why not XLA's `compiled.cost_analysis()`: it counts the compiled program, not the model. It
includes rematerialisation, padding and fused elementwise work, differs between backends, counts
a `while` body (every `nn.scan` layer stack) once instead of once per layer, and under SPMD it
reports one device's share. MFU is defined over the model's own matmul FLOPs, which this module
counts from the configs.

Conventions
-----------
* A matmul of (m, k) by (k, n) is 2·m·n·k FLOPs; the patch-embedding convolution is counted as
  its matmul. Elementwise work (norms, activations, softmax, masks, dropout, losses), embedding
  gathers and the batch-independent position-table interpolation are not counted.
* Attention counts the projections and both activation matmuls, QKᵀ and AV, over the full
  (T, S) score matrix the model computes; causal masking does not halve it (the code computes
  and masks the full matrix).
* Every count is for the GLOBAL batch. Divide by the number of devices for per-device numbers.
* Training multipliers (`MatmulFlops.cost`), per matmul of the forward pass:
    - "forward": ×1, forward only (a frozen ViT under stop_gradient).
    - "trainable": ×3 = forward + the gradient of the activation input + the gradient of the
      weight. The one exception is a matmul whose input is the data (the patch embedding of the
      pixels): ×2, no input gradient exists.
    - "frozen" (frozen weights that gradients flow through, the stage-2 LLM): weight matmuls ×2
      (forward + activation gradient, no weight gradient); attention QKᵀ and AV ×3, since both
      of their operands are activations and both gradients are activation gradients.
  These are what autodiff of `train/step.py` computes: tests/test_flops.py checks the count
  against the matmuls of the traced training step (exactly) and against XLA's forward counts.
* Stage 1 (`train/step.py` `stage1_losses`, a loss term is on when its weight is non-zero):
    vision ViT (forward, or trainable with `train_vision`);
    qformer_query: the query pass with cross-attention to the image tokens (its outputs feed ITC,
      its per-layer K/V the ITG cache);
    itc: the text-only pass, text_proj of [CLS], vision_proj of every query, and the two
      (B, B, Q) similarity einsums (×2 each: one side is under stop_gradient). ITC also runs
      forward-only when its weight is 0 but ITM is on (its similarities pick the negatives);
    itm: the [queries; text] pass with cross-attention over 3B pairs and the itm_head;
    itg: the causal text pass over the cached query K/V and the LM head (transform + vocab).
* Stage 2: vision; qformer_query (trainable; with a question-aware Q-Former the query pass
  also runs the question's text positions); llm_proj (trainable); the LLM ("frozen" unless
  `train_llm`): OPT or LLaMA over [queries; text] with the head on the last query and the text
  positions (T + 1, `logits_from = Q - 1`); T5 encoder over [queries; prefix] and decoder over
  the target length (cross-attention K/V of the encoder output in every decoder layer).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

from blip2_jax.config import (Blip2Config, LlamaConfig, OPTConfig, QFormerConfig, T5Config,
                              VisionConfig)
from blip2_jax.data.batch import FEATURES

ImageSize = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class MatmulFlops:
    """Forward matmul FLOPs by kind, which decides the training multiplier.

    dense: activation @ weight. attention: activation @ activation (QKᵀ, AV).
    data: weight matmuls applied to the data (the patch embedding): no input gradient."""
    dense: float = 0.0
    attention: float = 0.0
    data: float = 0.0

    @property
    def total(self) -> float:
        """Forward FLOPs."""
        return self.dense + self.attention + self.data

    def __float__(self) -> float:
        return self.total

    def __add__(self, other: "MatmulFlops") -> "MatmulFlops":
        return MatmulFlops(self.dense + other.dense, self.attention + other.attention,
                           self.data + other.data)

    def __mul__(self, k: float) -> "MatmulFlops":
        return MatmulFlops(self.dense * k, self.attention * k, self.data * k)

    __rmul__ = __mul__

    def cost(self, mode: str) -> float:
        """FLOPs of this forward work in a training step: mode "forward", "trainable" or
        "frozen" (see the module docstring)."""
        if mode == "forward":
            return self.total
        if mode == "trainable":
            return 3 * self.dense + 3 * self.attention + 2 * self.data
        if mode == "frozen":
            return 2 * self.dense + 3 * self.attention + self.data
        raise ValueError(f"unknown mode {mode!r} (forward, trainable or frozen)")


def _mm(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


def _attention_scores(t: float, s: float, inner: float) -> float:
    """QKᵀ (T, S) and AV for all heads: 2 · 2·T·S·(heads·head_dim)."""
    return 2 * _mm(t, inner, s)


def _hw(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


# ------------------------------------------------------------------------------------------------
# Towers (forward)
# ------------------------------------------------------------------------------------------------
def vision_tokens(cfg: VisionConfig, image_size: Optional[ImageSize] = None) -> int:
    """Tokens of the ViT output (1 + patches) for `image_size` (default: the config's)."""
    h, w = _hw(cfg.image_size if image_size is None else image_size)
    return 1 + (h // cfg.patch_size) * (w // cfg.patch_size)


def vit_flops(cfg: VisionConfig, batch: int, image_size: Optional[ImageSize] = None
              ) -> MatmulFlops:
    """`models/vit.py` VisionTransformer: patch conv, then per block fused QKV, QKᵀ, AV, out and
    the two MLP matmuls."""
    d, p = cfg.hidden_size, cfg.patch_size
    n = vision_tokens(cfg, image_size)
    inner = cfg.num_heads * cfg.head_dim
    patch = _mm(batch * (n - 1), p * p * 3, d)
    per_layer_dense = (_mm(n, d, 3 * inner) + _mm(n, inner, d)
                       + _mm(n, d, cfg.intermediate_size) + _mm(n, cfg.intermediate_size, d))
    per_layer_attn = _attention_scores(n, n, inner)
    return MatmulFlops(dense=batch * cfg.num_layers * per_layer_dense,
                       attention=batch * cfg.num_layers * per_layer_attn, data=patch)


def qformer_flops(cfg: QFormerConfig, batch: int, *, queries: int = 0, text: int = 0,
                  image_tokens: int = 0, prefix: int = 0) -> MatmulFlops:
    """`models/qformer.py` QFormer over `queries` query and `text` text positions.

    image_tokens: keys/values of the cross-attention (queries only, every
    `cross_attention_frequency`-th layer starting at 0). prefix: cached query K/V prepended to
    the self-attention keys (the ITG pass, mode e). Per layer: Q/K/V/out projections of all
    positions, QKᵀ and AV over prefix + positions, the query FFN on the queries and the text
    FFN on the text."""
    h, ff = cfg.hidden_size, cfg.intermediate_size
    inner = cfg.num_heads * cfg.head_dim
    n = queries + text
    cross_layers = sum(cfg.is_cross_attention_layer(i) for i in range(cfg.num_layers))
    if queries and cross_layers and not image_tokens:
        raise ValueError("queries attend to image tokens in the cross-attention layers: give "
                         "image_tokens")
    dense = cfg.num_layers * (_mm(n, h, 3 * inner) + _mm(n, inner, h)
                              + 2 * _mm(queries, h, ff) + 2 * _mm(text, h, ff))
    attn = cfg.num_layers * _attention_scores(n, prefix + n, inner)
    if queries:
        dense += cross_layers * (_mm(queries, h, inner) + _mm(queries, inner, h)
                                 + 2 * _mm(image_tokens, cfg.encoder_hidden_size, inner))
        attn += cross_layers * _attention_scores(queries, image_tokens, inner)
    return MatmulFlops(dense=batch * dense, attention=batch * attn)


def opt_flops(cfg: OPTConfig, batch: int, seq_len: int, logits_len: Optional[int] = None
              ) -> MatmulFlops:
    """`models/opt.py` OPT over `seq_len` positions with the LM head on the last `logits_len`
    (default all): project_in/out when word_embed_proj_dim != hidden_size, per layer Q/K/V/out,
    QKᵀ and AV (full causal square), fc1, fc2; the vocab projection (tied or not)."""
    d, e = cfg.hidden_size, cfg.word_embed_proj_dim
    inner = cfg.num_heads * cfg.head_dim
    n = seq_len
    m = seq_len if logits_len is None else logits_len
    dense = cfg.num_layers * (_mm(n, d, 4 * inner) + 2 * _mm(n, d, cfg.ffn_dim))
    if e != d:
        dense += _mm(n, e, d) + _mm(m, d, e)
    dense += _mm(m, e, cfg.vocab_size)
    attn = cfg.num_layers * _attention_scores(n, n, inner)
    return MatmulFlops(dense=batch * dense, attention=batch * attn)


def llama_flops(cfg: LlamaConfig, batch: int, seq_len: int, logits_len: Optional[int] = None
                ) -> MatmulFlops:
    """`models/llama.py` Llama over `seq_len` positions with the LM head on the last
    `logits_len` (default all): per layer Q and out (num_heads·head_dim wide), K and V
    (num_kv_heads·head_dim: grouped-query attention shrinks only these), QKᵀ and AV for every
    query head (full causal square), the SwiGLU MLP's three matmuls (gate, up, down); the vocab
    projection (tied or not)."""
    d, ff = cfg.hidden_size, cfg.intermediate_size
    inner = cfg.num_heads * cfg.head_dim
    kv_inner = cfg.num_kv_heads * cfg.head_dim
    n = seq_len
    m = seq_len if logits_len is None else logits_len
    dense = cfg.num_layers * (2 * _mm(n, d, inner) + 2 * _mm(n, d, kv_inner) + 3 * _mm(n, d, ff))
    dense += _mm(m, d, cfg.vocab_size)
    attn = cfg.num_layers * _attention_scores(n, n, inner)
    return MatmulFlops(dense=batch * dense, attention=batch * attn)


def t5_flops(cfg: T5Config, batch: int, enc_len: int, dec_len: int) -> MatmulFlops:
    """`models/t5.py` T5: encoder over `enc_len`, decoder over `dec_len` with cross-attention
    to the encoder output in every layer (its K/V projected per layer), FFN with 3 matmuls when
    gated (2 otherwise), the LM head over the decoder positions. Attention width is
    num_heads·d_kv."""
    d, ff = cfg.d_model, cfg.d_ff
    inner = cfg.num_heads * cfg.d_kv
    ffn = (3 if cfg.gated else 2) * _mm(1, d, ff)       # per position
    s, t = enc_len, dec_len
    enc_dense = cfg.num_layers * (_mm(s, d, 4 * inner) + s * ffn)
    enc_attn = cfg.num_layers * _attention_scores(s, s, inner)
    dec_dense = cfg.num_decoder_layers * (_mm(t, d, 4 * inner)                 # self
                                          + _mm(t, d, 2 * inner) + _mm(s, d, 2 * inner)  # cross
                                          + t * ffn)
    dec_attn = cfg.num_decoder_layers * (_attention_scores(t, t, inner)
                                         + _attention_scores(t, s, inner))
    head = _mm(t, d, cfg.vocab_size)
    return MatmulFlops(dense=batch * (enc_dense + dec_dense + head),
                       attention=batch * (enc_attn + dec_attn))


def forward_flops(tower, batch: int, **shape) -> float:
    """Forward matmul FLOPs of one tower config with the shape keywords of its `*_flops`:
    VisionConfig (image_size), QFormerConfig (queries, text, image_tokens, prefix), OPTConfig
    and LlamaConfig (seq_len, logits_len), T5Config (enc_len, dec_len)."""
    if isinstance(tower, VisionConfig):
        return vit_flops(tower, batch, **shape).total
    if isinstance(tower, QFormerConfig):
        return qformer_flops(tower, batch, **shape).total
    if isinstance(tower, OPTConfig):
        return opt_flops(tower, batch, **shape).total
    if isinstance(tower, LlamaConfig):
        return llama_flops(tower, batch, **shape).total
    if isinstance(tower, T5Config):
        return t5_flops(tower, batch, **shape).total
    raise TypeError(f"no FLOP count for {type(tower).__name__}")


# ------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------
def train_step_flops_breakdown(cfg: Blip2Config, loss_cfg, batch_size: int, text_len: int, *,
                               target_len: Optional[int] = None,
                               image_size: Optional[ImageSize] = None,
                               train_vision: Optional[bool] = None,
                               train_llm: bool = False,
                               cached_vision: bool = False,
                               qformer_text_len: int = 0) -> dict[str, float]:
    """Training FLOPs of one step over the global batch, by part (see the module docstring).

    loss_cfg: `train.step.LossConfig` (its weights switch stage-1 terms; `train_vision`).
    text_len: stage 1 the `qformer_ids` length; OPT / LLaMA the `llm_ids` length; T5 the prefix
    (`llm_ids`) length, with `target_len` the `target_ids` length. image_size: the batch's
    image side (default the config's). train_vision: default `loss_cfg.train_vision`.
    train_llm: the LLM is trained (not frozen). cached_vision: the batch brings the ViT's
    output (a frozen-feature cache), so the step runs no ViT. qformer_text_len: stage 2 with a
    question-aware Q-Former (`qformer_text_input`): the `qformer_ids` length, text positions
    its query pass runs beside the queries."""
    if train_vision is None:
        train_vision = bool(getattr(loss_cfg, "train_vision", False))
    b, t = int(batch_size), int(text_len)
    q = cfg.num_query_tokens
    h = cfg.qformer.hidden_size
    n_img = vision_tokens(cfg.vision, image_size)
    out = {"vision": 0.0 if cached_vision else vit_flops(cfg.vision, b, image_size).cost(
        "trainable" if train_vision else "forward")}
    query_pass = qformer_flops(cfg.qformer, b, queries=q, image_tokens=n_img,
                               text=int(qformer_text_len) if cfg.llm is not None else 0)

    if cfg.llm is None:
        itc_on, itm_on, itg_on = bool(loss_cfg.itc), bool(loss_cfg.itm), bool(loss_cfg.itg)
        out["qformer_query"] = query_pass.cost("trainable" if itc_on or itg_on else "forward")
        if itc_on or itm_on:
            e = cfg.embed_dim
            itc = (qformer_flops(cfg.qformer, b, text=t)
                   + MatmulFlops(dense=_mm(b, h, e) + _mm(b * q, h, e)))
            sims = 2 * _mm(b * b, e, q)        # i2t and t2i: (B, B, Q) each
            out["itc"] = (itc.cost("trainable") + 2 * sims) if itc_on else itc.total + sims
        if itm_on:
            itm = (qformer_flops(cfg.qformer, 3 * b, queries=q, text=t, image_tokens=n_img)
                   + MatmulFlops(dense=_mm(3 * b * q, h, 2)))
            out["itm"] = itm.cost("trainable")
        if itg_on:
            itg = (qformer_flops(cfg.qformer, b, text=t, prefix=q)
                   + MatmulFlops(dense=_mm(b * t, h, h) + _mm(b * t, h, cfg.qformer.vocab_size)))
            out["itg"] = itg.cost("trainable")
        return out

    llm = cfg.llm
    out["qformer_query"] = query_pass.cost("trainable")
    out["llm_proj"] = MatmulFlops(dense=_mm(b * q, h, llm.hidden_size)).cost("trainable")
    mode = "trainable" if train_llm else "frozen"
    if cfg.decoder_only:
        logits_len = t + 1 if q >= 1 else 1          # logits_from = Q - 1
        count = opt_flops if isinstance(llm, OPTConfig) else llama_flops
        out["llm"] = count(llm, b, q + t, logits_len).cost(mode)
    else:
        if target_len is None:
            raise ValueError("a T5 step needs target_len (the target_ids length)")
        out["llm"] = t5_flops(llm, b, q + t, int(target_len)).cost(mode)
    return out


def train_step_flops(cfg: Blip2Config, loss_cfg, batch_size: int, text_len: int, *,
                     target_len: Optional[int] = None, image_size: Optional[ImageSize] = None,
                     train_vision: Optional[bool] = None, train_llm: bool = False,
                     cached_vision: bool = False, qformer_text_len: int = 0) -> float:
    """Matmul FLOPs of one training step (forward + backward) over the global batch; the sum of
    `train_step_flops_breakdown`. Per device: divide by the device count."""
    return float(sum(train_step_flops_breakdown(
        cfg, loss_cfg, batch_size, text_len, target_len=target_len, image_size=image_size,
        train_vision=train_vision, train_llm=train_llm, cached_vision=cached_vision,
        qformer_text_len=qformer_text_len).values()))


def _batch_shapes(cfg: Blip2Config, batch: Mapping) -> dict:
    if FEATURES in batch:                               # (B, N, Dv) cached ViT tokens
        kw = dict(batch_size=batch[FEATURES].shape[0], cached_vision=True)
    else:
        image = batch["image"].shape                    # (B, H, W, 3)
        kw = dict(batch_size=image[0], image_size=(image[1], image[2]))
    if cfg.llm is None:
        kw["text_len"] = batch["qformer_ids"].shape[1]
    else:
        kw["text_len"] = batch["llm_ids"].shape[1]
        if cfg.llm_kind == "t5":
            kw["target_len"] = batch["target_ids"].shape[1]
        if cfg.qformer_text_input:
            kw["qformer_text_len"] = batch["qformer_ids"].shape[1]
    return kw


def train_step_flops_for_batch(cfg: Blip2Config, loss_cfg, batch: Mapping, *,
                               train_vision: Optional[bool] = None,
                               train_llm: bool = False) -> float:
    """`train_step_flops` with the sizes read from a batch dict (numpy or global jax arrays:
    pass the GLOBAL batch, e.g. after `Trainer.place`): `image` (B, H, W, 3) or
    `vision_features` (B, N, Dv), and
    `qformer_ids` (stage 1, and stage 2 with a question-aware Q-Former), `llm_ids` (stage 2),
    `target_ids` (T5)."""
    return train_step_flops(cfg, loss_cfg, **_batch_shapes(cfg, batch),
                            train_vision=train_vision, train_llm=train_llm)


__all__ = ["MatmulFlops", "vision_tokens", "vit_flops", "qformer_flops", "opt_flops", "llama_flops",
           "t5_flops", "forward_flops", "train_step_flops", "train_step_flops_breakdown",
           "train_step_flops_for_batch"]
