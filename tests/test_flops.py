"""Counted model FLOPs (`blip2_jax.train.flops`).

Three independent references:
- XLA's `cost_analysis()` of each tower's compiled forward pass, with matmul-dominated shapes
  (hidden 256, ReLU so XLA's expansion of erf-GELU into elementwise flops does not blur the
  comparison) and one scanned layer group (XLA counts a `while` body once, not per layer);
  XLA also counts elementwise work, so it must come out slightly above the matmul count.
- The matmuls of the traced program (`_jaxpr_matmul_flops`: every dot_general and convolution
  of the jaxpr, scan bodies times their length). For the training step's `value_and_grad`
  this is what autodiff emits: forward, activation gradients and only the weight gradients of
  trainable parameters. The analytic step count must equal it exactly.
- Parameter counts: a weight matmul costs 2 FLOPs per weight per token.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from blip2_jax import config
from blip2_jax import nn as bnn
from blip2_jax.convert.mapping import flatten
from blip2_jax.models.opt import OPT
from blip2_jax.models.qformer import QFormer
from blip2_jax.models.t5 import T5
from blip2_jax.models.vit import VisionTransformer
from blip2_jax.train import flops
from blip2_jax.train import state as state_lib
from blip2_jax.losses import LossConfig
from blip2_jax.train.step import loss_fn
from blip2_jax.models import blip2 as blip2_model

S = jax.ShapeDtypeStruct
F32, I32 = jnp.float32, jnp.int32


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------
def _sub_jaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def _jaxpr_matmul_flops(jaxpr) -> float:
    """2·m·n·k of every dot_general / convolution in a jaxpr (scan bodies × length, the larger
    branch of a cond, e.g. `platform_dependent` attention)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_out = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[rhs_out]
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_matmul_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_jaxpr_matmul_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            assert not any(_jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params)), \
                "matmuls inside a while loop: unknown trip count"
        else:
            total += sum(_jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _abstract_params(module, method, args):
    return jax.eval_shape(
        lambda *a: bnn.init_params(module, jax.random.PRNGKey(0), *a, method=method), *args)


def _forward_counts(module, args, method=None) -> tuple[float, float]:
    """(XLA's flops, the traced matmul flops) of one forward pass, from one trace."""
    params = _abstract_params(module, method, args)
    traced = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method)).trace(
        params, *args)
    cost = traced.lower().compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), _jaxpr_matmul_flops(traced.jaxpr.jaxpr)


def _step_parts(cfg, frozen_patterns):
    shapes = blip2_model.abstract_params(cfg)
    frozen = state_lib.frozen_paths(list(flatten(shapes)), frozen_patterns)
    return state_lib.split(shapes, frozen)


def _traced_step_flops(cfg, lc, batch, frozen_patterns) -> float:
    trainable, frozen = _step_parts(cfg, frozen_patterns)
    grad = jax.value_and_grad(loss_fn(cfg, lc), has_aux=True)
    jaxpr = jax.make_jaxpr(grad)(trainable, frozen, batch, jax.random.PRNGKey(0))
    return _jaxpr_matmul_flops(jaxpr.jaxpr)


def test_jaxpr_reference_counts_matmuls():
    """The reference itself: a scanned matmul stack and a convolution, counted by hand."""
    def f(x, w, k):
        y = jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
        img = jax.lax.conv_general_dilated(jnp.ones((2, 8, 8, 3)), k, (4, 4), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.sum() + img.sum()
    jaxpr = jax.make_jaxpr(f)(S((6, 16), F32), S((3, 16, 16), F32), S((4, 4, 3, 5), F32))
    assert _jaxpr_matmul_flops(jaxpr.jaxpr) == 3 * 2 * 6 * 16 * 16 + 2 * (2 * 2 * 2) * 5 * 48


# ------------------------------------------------------------------------------------------------
# Towers: analytic forward vs XLA
# ------------------------------------------------------------------------------------------------
B, Q, T, TGT = 2, 32, 24, 16
VIT = config.VisionConfig(hidden_size=256, intermediate_size=1024, num_layers=1, num_heads=4,
                          image_size=64, patch_size=8, activation="relu")
N_IMG = 1 + (64 // 8) ** 2
# Two layers in one scanned group: the cross-attention layer and the one without.
QF = config.QFormerConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4,
                          intermediate_size=1024, max_position_embeddings=64,
                          cross_attention_frequency=2, encoder_hidden_size=384,
                          has_text_input=True, activation="relu")
OPT_CFG = config.OPTConfig(vocab_size=512, hidden_size=256, num_layers=1, num_heads=4,
                           ffn_dim=1024, max_position_embeddings=128, word_embed_proj_dim=128,
                           tie_word_embeddings=False)
T5_CFG = config.T5Config(vocab_size=512, d_model=256, d_kv=48, d_ff=768, num_layers=1,
                         num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                         relative_attention_max_distance=20, activation="relu")
XLA_REL_TOL = 0.015     # XLA's elementwise flops (softmax, norms, masks) on top of the matmuls


def _itg_call(m, ids, mask, cache):
    return m(input_ids=ids, attention_mask=mask, causal=True, query_cache=cache)[0]


def _opt_call(m, embeds, mask):
    return m(embeds, mask, logits_from=Q - 1)[0]


def _t5_call(m, embeds, mask, dec, dec_mask):
    return m.decode(dec, m.encode(embeds, mask), mask, decoder_attention_mask=dec_mask)[0]


_cache = {n: S((QF.num_layers, B, Q, QF.num_heads, QF.head_dim), F32) for n in ("k", "v")}
TOWER_CASES = {
    "vit": (VisionTransformer(VIT), None, (S((B, 64, 64, 3), F32),),
            lambda: flops.forward_flops(VIT, B)),
    "qformer_query": (QFormer(QF), None, (S((B, Q, 256), F32), None, None, S((B, N_IMG, 384), F32)),
                      lambda: flops.forward_flops(QF, B, queries=Q, image_tokens=N_IMG)),
    "qformer_itm": (QFormer(QF), None, (S((B, Q, 256), F32), S((B, T), I32), S((B, T), I32),
                                        S((B, N_IMG, 384), F32)),
                    lambda: flops.forward_flops(QF, B, queries=Q, text=T, image_tokens=N_IMG)),
    "qformer_itg": (QFormer(QF), _itg_call, (S((B, T), I32), S((B, T), I32), _cache),
                    lambda: flops.forward_flops(QF, B, text=T, prefix=Q)),
    "opt": (OPT(OPT_CFG), _opt_call, (S((B, Q + T, 128), F32), S((B, Q + T), I32)),
            lambda: flops.forward_flops(OPT_CFG, B, seq_len=Q + T, logits_len=T + 1)),
    "t5": (T5(T5_CFG), _t5_call, (S((B, Q + T, 256), F32), S((B, Q + T), I32), S((B, TGT), I32),
                                  S((B, TGT), I32)),
           lambda: flops.forward_flops(T5_CFG, B, enc_len=Q + T, dec_len=TGT)),
}


@pytest.mark.parametrize("case", sorted(TOWER_CASES))
def test_tower_forward_matches_xla_and_traced_matmuls(case):
    module, method, args, analytic = TOWER_CASES[case]
    xla, traced = _forward_counts(module, args, method)
    ours = analytic()
    assert traced == pytest.approx(ours, rel=1e-12), (case, traced, ours)
    assert 0.999 <= xla / ours <= 1 + XLA_REL_TOL, (case, xla, ours)


@pytest.mark.parametrize("name", ["blip2-opt-2.7b", "blip2-flan-t5-xl"])
def test_weight_matmuls_are_two_flops_per_weight_per_token(name):
    """Released sizes, no compile: with every position through every weight, the dense forward
    is 2 × (kernel weights) × tokens."""
    cfg = config.get_preset(name)
    kernels = {k: math.prod(v.shape) for k, v in flatten(blip2_model.abstract_params(cfg)).items()
               if k.endswith("/kernel")}
    per = lambda prefix: sum(v for k, v in kernels.items() if k.startswith(prefix))  # noqa: E731
    v = cfg.vision
    n = flops.vision_tokens(v)
    vit = flops.vit_flops(v, 1)
    assert vit.data == 2 * (n - 1) * per("vision/patch_embed/")
    assert vit.dense == 2 * n * per("vision/layers/")
    if cfg.llm is None:
        return
    s = 40
    if cfg.llm_kind == "opt":
        head = math.prod(blip2_model.abstract_params(cfg)["llm"]["embed_tokens"]["embedding"].shape)
        assert flops.opt_flops(cfg.llm, 1, s).dense == 2 * s * (per("llm/") + head)
    else:
        # encoder and decoder over s positions each: every kernel sees s tokens
        assert flops.t5_flops(cfg.llm, 1, s, s).dense == 2 * s * per("llm/")


# ------------------------------------------------------------------------------------------------
# The training step: analytic vs the traced value_and_grad
# ------------------------------------------------------------------------------------------------
def _stage1_batch(b=4, t=7, image=30):
    return {"image": S((b, image, image, 3), F32), "qformer_ids": S((b, t), I32),
            "qformer_mask": S((b, t), I32)}


def _stage2_batch(kind, b=4, t=7, tgt=5, image=30):
    batch = {"image": S((b, image, image, 3), F32), "llm_ids": S((b, t), I32),
             "llm_mask": S((b, t), I32)}
    if kind == "t5":
        batch.update(target_ids=S((b, tgt), I32), target_mask=S((b, tgt), I32))
    return batch


def _preset(name, **llm):
    cfg = config.get_preset(name)
    return cfg.replace(llm=dataclasses.replace(cfg.llm, **llm)) if llm else cfg


def _question_aware(name):
    cfg = config.get_preset(name)
    return cfg.replace(qformer=dataclasses.replace(cfg.qformer, has_text_input=True),
                       qformer_text_input=True)


STEP_CASES = {
    # name: (config, frozen patterns, LossConfig, train_llm)
    "stage1": (_preset("tiny-stage1"), ("vision/.*",), LossConfig(), False),
    "stage1_no_itm": (_preset("tiny-stage1"), ("vision/.*",), LossConfig(itm=0.0), False),
    "stage1_no_itg": (_preset("tiny-stage1"), ("vision/.*",), LossConfig(itg=0.0), False),
    # ITC's weight 0 with ITM on: ITC still runs forward (it picks the ITM negatives).
    "stage1_no_itc": (_preset("tiny-stage1"), ("vision/.*",), LossConfig(itc=0.0), False),
    "stage1_train_vision": (_preset("tiny-stage1"), (), LossConfig(train_vision=True), False),
    "opt": (_preset("tiny-opt"), ("vision/.*", "llm/.*"), LossConfig(), False),
    "opt_untied_train_llm": (_preset("tiny-opt", tie_word_embeddings=False), ("vision/.*",),
                             LossConfig(), True),
    "t5": (_preset("tiny-t5"), ("vision/.*", "llm/.*"), LossConfig(), False),
    # LLaMA: grouped-query K/V (2 of 4 heads), SwiGLU; then one KV head, head_dim 12 != hidden /
    # heads, a tied head and the LLM trained.
    "llama": (_preset("tiny-llama"), ("vision/.*", "llm/.*"), LossConfig(), False),
    "llama_headdim12_tied_train_llm": (_preset("tiny-llama", head_dim=12, num_kv_heads=1,
                                               tie_word_embeddings=True), ("vision/.*",),
                                       LossConfig(), True),
    "t5_ungated_train_all": (_preset("tiny-t5", gated=False, activation="relu",
                                     num_decoder_layers=3), (), LossConfig(train_vision=True),
                             True),
    # VQA fine-tuning: the question-aware Q-Former's query pass runs the question beside the
    # queries; OPT's per-row answer targets change no matmul.
    "opt_vqa_question_aware": (_question_aware("tiny-opt"), ("vision/.*", "llm/.*"),
                               LossConfig(), False),
    "t5_vqa_question_aware_train_vision": (_question_aware("tiny-t5"), ("llm/.*",),
                                           LossConfig(train_vision=True), False),
}


def _batch_for(cfg):
    if cfg.llm is None:
        return _stage1_batch()
    batch = _stage2_batch(cfg.llm_kind)
    if cfg.qformer_text_input:
        batch.update(qformer_ids=S((4, 6), I32), qformer_mask=S((4, 6), I32))
        if cfg.decoder_only:
            batch["llm_targets"] = S((4, 7), I32)
    return batch


@functools.lru_cache(maxsize=None)
def _traced_case(case: str) -> float:
    cfg, frozen, lc, _ = STEP_CASES[case]
    return _traced_step_flops(cfg, lc, _batch_for(cfg), frozen)


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_step_matches_traced_value_and_grad(case):
    cfg, frozen, lc, train_llm = STEP_CASES[case]
    batch = _batch_for(cfg)
    traced = _traced_case(case)
    ours = flops.train_step_flops_for_batch(cfg, lc, batch, train_llm=train_llm)
    assert ours == pytest.approx(traced, rel=1e-12), (case, ours, traced)


# ------------------------------------------------------------------------------------------------
# The training step against XLA (one layer per tower, matmul-dominated)
# ------------------------------------------------------------------------------------------------
def test_stage2_step_matches_xla():
    """The frozen-LLM convention (weights ×2, attention ×3) and the trainable ×3 against the
    compiled value_and_grad (a T5 variant agrees to 0.7%: with one decoder layer XLA also
    drops the backward of the first decoder self-attention, whose input needs no gradient;
    a scanned stack of several layers cannot)."""
    qf = dataclasses.replace(QF, has_text_input=False, encoder_hidden_size=VIT.hidden_size,
                             num_layers=1, cross_attention_frequency=1, hidden_dropout=0.0,
                             attention_dropout=0.0)
    llm = dataclasses.replace(OPT_CFG, word_embed_proj_dim=256, tie_word_embeddings=True)
    cfg = config.Blip2Config(vision=VIT, qformer=qf, llm=llm, num_query_tokens=Q)
    batch = _stage2_batch("opt", b=B, t=T, image=64)
    trainable, frozen = _step_parts(cfg, ("vision/.*", "llm/.*"))
    grad = jax.value_and_grad(loss_fn(cfg, LossConfig()), has_aux=True)
    xla = _xla_flops(grad, trainable, frozen, batch, jax.random.PRNGKey(0))
    ours = flops.train_step_flops_for_batch(cfg, LossConfig(), batch)
    assert 0.999 <= xla / ours <= 1 + XLA_REL_TOL, (xla, ours)


# ------------------------------------------------------------------------------------------------
# Composition rules
# ------------------------------------------------------------------------------------------------
def _by_hand_vit(v: config.VisionConfig, b: int):
    """(patch conv, transformer blocks) forward FLOPs of a ViT, written out."""
    n, d, f = flops.vision_tokens(v), v.hidden_size, v.intermediate_size
    patch = 2 * b * (n - 1) * v.patch_size ** 2 * 3 * d
    blocks = v.num_layers * b * (2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
                                 + 2 * 2 * n * d * f)
    return patch, blocks


def test_vision_multipliers():
    cfg = config.get_preset("blip2-pretrain-vit-g")
    patch, blocks = _by_hand_vit(cfg.vision, 8)
    frozen = flops.train_step_flops_breakdown(cfg, LossConfig(), 8, 32)
    trained = flops.train_step_flops_breakdown(cfg, LossConfig(train_vision=True), 8, 32)
    assert frozen["vision"] == pytest.approx(patch + blocks, rel=1e-12)            # ×1
    assert trained["vision"] == pytest.approx(2 * patch + 3 * blocks, rel=1e-12)   # ×3, pixels ×2
    assert {k: v for k, v in trained.items() if k != "vision"} == \
        {k: v for k, v in frozen.items() if k != "vision"}


def test_frozen_llm_counts_activation_gradients_only():
    cfg = config.get_preset("blip2-opt-2.7b")
    b, t = 4, 30
    fwd = flops.opt_flops(cfg.llm, b, 32 + t, t + 1)
    frozen = flops.train_step_flops_breakdown(cfg, LossConfig(), b, t)["llm"]
    trained = flops.train_step_flops_breakdown(cfg, LossConfig(), b, t, train_llm=True)["llm"]
    assert frozen == pytest.approx(2 * fwd.dense + 3 * fwd.attention, rel=1e-12)
    assert trained == pytest.approx(3 * fwd.total, rel=1e-12)
    assert trained - frozen == pytest.approx(fwd.dense, rel=1e-12)    # the weight gradients


@pytest.mark.parametrize("term", ["itm", "itg"])
def test_switching_a_stage1_term_off_removes_exactly_its_share(term):
    cfg = config.get_preset("blip2-pretrain-vit-g")
    on = flops.train_step_flops_breakdown(cfg, LossConfig(), 16, 32)
    off = flops.train_step_flops_breakdown(cfg, LossConfig(**{term: 0.0}), 16, 32)
    assert term in on and term not in off
    assert sum(on.values()) - sum(off.values()) == pytest.approx(on[term], rel=1e-12)
    # the traced tiny step agrees on the size of the share
    tiny = config.get_preset("tiny-stage1")
    share = flops.train_step_flops_breakdown(tiny, LossConfig(), 4, 7, image_size=30)[term]
    assert _traced_case("stage1") - _traced_case(f"stage1_no_{term}") == \
        pytest.approx(share, rel=1e-12)


def test_itm_runs_three_batches_of_pairs():
    cfg = config.get_preset("blip2-pretrain-vit-g")
    q, h = cfg.num_query_tokens, cfg.qformer.hidden_size
    n_img = flops.vision_tokens(cfg.vision)
    itm = flops.train_step_flops_breakdown(cfg, LossConfig(), 8, 32)["itm"]
    fwd = flops.qformer_flops(cfg.qformer, 24, queries=q, text=32, image_tokens=n_img)
    assert itm == pytest.approx(3 * (fwd.total + 2 * 24 * q * h * 2), rel=1e-12)


@pytest.mark.parametrize("name", ["blip2-opt-2.7b", "blip2-flan-t5-xl"])
def test_stage2_is_linear_in_the_batch(name):
    cfg = config.get_preset(name)
    one = flops.train_step_flops(cfg, LossConfig(), 8, 24, target_len=12)
    assert flops.train_step_flops(cfg, LossConfig(), 24, 24, target_len=12) == \
        pytest.approx(3 * one, rel=1e-12)


def test_stage1_is_linear_in_the_batch_but_for_the_itc_similarities():
    """ITC compares every image with every text of the global batch: 2 einsums of
    2·B·B·Q·E, each ×2 (one side under stop_gradient)."""
    cfg = config.get_preset("blip2-pretrain-vit-g")
    q, e = cfg.num_query_tokens, cfg.embed_dim
    sims = lambda b: 2 * 2 * (2 * b * b * q * e)           # noqa: E731
    f = lambda b: flops.train_step_flops(cfg, LossConfig(), b, 32)   # noqa: E731
    assert f(16) - sims(16) == pytest.approx(2 * (f(8) - sims(8)), rel=1e-12)


def test_t5_counts_the_gated_ffn_as_three_matmuls():
    base = config.get_preset("blip2-flan-t5-xl").llm
    gated = flops.t5_flops(base, 2, 40, 10)
    plain = flops.t5_flops(dataclasses.replace(base, gated=False), 2, 40, 10)
    layers_tokens = base.num_layers * 40 + base.num_decoder_layers * 10
    assert gated.dense - plain.dense == 2 * 2 * layers_tokens * base.d_model * base.d_ff
    assert gated.attention == plain.attention


def test_for_batch_reads_the_shapes():
    cfg = config.get_preset("tiny-t5")
    batch = {"image": np.zeros((6, 30, 30, 3), np.float32), "valid": np.ones((6,), bool),
             "llm_ids": np.zeros((6, 9), np.int32), "llm_mask": np.ones((6, 9), np.int32),
             "target_ids": np.zeros((6, 4), np.int32), "target_mask": np.ones((6, 4), np.int32)}
    assert flops.train_step_flops_for_batch(cfg, LossConfig(), batch) == \
        flops.train_step_flops(cfg, LossConfig(), 6, 9, target_len=4, image_size=30)
    with pytest.raises(ValueError, match="target_len"):
        flops.train_step_flops(cfg, LossConfig(), 6, 9)


def test_image_size_sets_the_vision_tokens():
    v = config.get_preset("blip2-opt-2.7b-coco").vision
    assert flops.vision_tokens(v) == 1 + (364 // 14) ** 2
    assert flops.vision_tokens(v, 224) == 257
    assert flops.vision_tokens(v, (224, 364)) == 1 + 16 * 26
