"""LLaMA decoder parity against HF `LlamaForCausalLM` (torch fp32, eager attention).

Covers: full forward from inputs_embeds and from ids, right- and left-padded, over configs that
span GQA with one, some and all KV heads, rope scaling none / linear / llama3, tied and untied
heads, attention and MLP biases, head_dim != hidden/heads; the rotary inverse frequencies and
RMSNorm against HF's modules; cached incremental decoding == full forward == HF with its cache;
greedy and beam search (3 beams) through `blip2_jax.generate` token-identical to HF `generate`,
sampling seeded and reproducible (top_k=1 sampling == HF greedy); HF config.json I/O; the key
table both ways; a KV-head count that does not divide the heads is a named error.

Positions: our default is HF `generate`'s (`cumsum(mask) - 1`, pads 0). HF `forward` without
position_ids uses `arange` whatever the padding, so the forward parity tests pass HF those
`generate` positions explicitly (`hf_positions`); `test_arange_positions_match_hf_forward` checks
the other convention through our `positions=` argument.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

import hf_ref
from blip2_jax import generate as gen
from blip2_jax import nn as bnn
from blip2_jax import sharding
from blip2_jax.config import (LLAMA_PRESETS, TINY_LLAMA, ConfigError, LlamaConfig, RopeScaling,
                              llama_from_hf, llama_to_hf)
from blip2_jax.convert import hf_llama, mapping
from blip2_jax.models.llama import Llama, init_cache, rope_inv_freq

TOL = 1e-5
PAD, EOS = 0, 94   # EOS: a token the decoding tests' model emits (one row stops early)
STD = 0.5      # weights re-drawn at this scale: well separated next-token logits for decoding

BASE = dict(vocab_size=hf_ref.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
            eos_token_id=EOS)
# HF LlamaConfig overrides of BASE for each tested architecture. llama3: with head_dim 8 the
# wavelengths are 6.3, 63, 628, 6283 and original_max_position_embeddings 64 puts them in the
# kept (< 16), interpolated (16..64) and divided (> 64) bands.
CONFIGS = {
    "gqa2_linear_untied": dict(num_key_value_heads=2,
                               rope_parameters=dict(rope_type="linear", factor=2.0,
                                                    rope_theta=10000.0)),
    "mqa_llama3_tied": dict(num_key_value_heads=1, tie_word_embeddings=True,
                            max_position_embeddings=128,
                            rope_parameters=dict(rope_type="llama3", factor=4.0,
                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=64,
                                                 rope_theta=10000.0)),
    "mha_bias_headdim12": dict(num_key_value_heads=4, head_dim=12, attention_bias=True,
                               mlp_bias=True, rope_parameters=dict(rope_type="default",
                                                                   rope_theta=500.0)),
}


def hf_config(name: str) -> transformers.LlamaConfig:
    hcfg = transformers.LlamaConfig(**dict(BASE, **CONFIGS[name]))
    hcfg._attn_implementation = "eager"
    return hcfg


@functools.lru_cache(maxsize=None)
def models(name: str):
    """(HF model, our config, our params loaded from the HF state dict through the key table)."""
    hcfg = hf_config(name)
    torch.manual_seed(0)
    hf = hf_ref.randomize(LlamaForCausalLM(hcfg), seed=len(name), std=STD)
    cfg = llama_from_hf(hcfg.to_dict())
    sd = hf_ref.state_dict_numpy(hf)
    params = mapping.load(hf_llama.rules(cfg, ours="", theirs=""), sd.keys(), sd.__getitem__,
                          ignore=hf_llama.ignorable(cfg, theirs=""))
    return hf, cfg, jax.tree_util.tree_map(jnp.asarray, params)


@functools.partial(jax.jit, static_argnums=0)
def forward_embeds(cfg, params, embeds, mask, positions=None):
    return Llama(cfg).apply({"params": params}, embeds, mask, positions=positions)[0]


@functools.partial(jax.jit, static_argnums=0)
def forward_ids(cfg, params, ids, mask):
    m = Llama(cfg)
    return m.apply({"params": params}, m.apply({"params": params}, ids, method=Llama.embed),
                   mask)[0]


@functools.partial(jax.jit, static_argnums=0)
def cached_step(cfg, params, ids, mask, cache, index):
    m = Llama(cfg)
    emb = m.apply({"params": params}, ids, method=Llama.embed)
    return m.apply({"params": params}, emb, mask, cache=cache, cache_index=index)


def hf_positions(mask) -> np.ndarray:
    """HF `generate`'s position_ids (and our default): cumsum(mask) - 1, pads 0."""
    mask = np.asarray(mask, np.int64)
    return (np.cumsum(mask, 1) - 1) * mask


def hf_logits(hf, **kw) -> np.ndarray:
    with torch.no_grad(), hf_ref.one_torch_thread():
        return hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in kw.items()}).logits.numpy()


def valid(x, mask):
    """Positions with mask 1 (padded queries are undefined)."""
    return np.asarray(x)[np.asarray(mask) == 1]


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_parity(name, pad_side):
    hf, cfg, params = models(name)
    ids, mask = hf_ref.text_batch(batch=3, length=7, seed=1, pad_side=pad_side, pad_id=PAD)
    assert (mask == 0).any()
    pos = hf_positions(mask)
    embeds = np.random.default_rng(2).normal(size=(*ids.shape, cfg.hidden_size)).astype(
        np.float32)
    ref = hf_logits(hf, inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
    ours = forward_embeds(cfg, params, jnp.asarray(embeds), jnp.asarray(mask))
    assert ours.shape == (3, 7, cfg.vocab_size) and ours.dtype == jnp.float32
    err = hf_ref.rel_err(valid(ours, mask), valid(ref, mask))
    print(f"{name}/{pad_side} embeds: {err:.2e}")
    assert err <= TOL

    ref = hf_logits(hf, input_ids=ids, attention_mask=mask, position_ids=pos)
    ours = forward_ids(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
    err = hf_ref.rel_err(valid(ours, mask), valid(ref, mask))
    print(f"{name}/{pad_side} ids: {err:.2e}")
    assert err <= TOL
    # Padded positions too: a fully masked (left-pad) query row is uniform over all keys on both
    # sides; a right-pad query sees the valid keys before it.
    err = hf_ref.rel_err(ours, ref)
    print(f"{name}/{pad_side} ids, all positions: {err:.2e}")
    assert err <= TOL


def test_positions_conventions():
    """RoPE sees only position differences, so a left-padded row's uniform shift changes
    nothing; a hole in the row does (InstructBLIP's [queries][pads][prompt]). There the default
    (generate's `cumsum(mask) - 1`) matches HF given those position_ids, `positions=arange`
    matches HF `forward` without them, and the two differ."""
    hf, cfg, params = models("gqa2_linear_untied")
    mask = np.array([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 1]])
    embeds = np.random.default_rng(2).normal(size=(3, 7, cfg.hidden_size)).astype(np.float32)
    ref_arange = hf_logits(hf, inputs_embeds=embeds, attention_mask=mask)
    ref_cumsum = hf_logits(hf, inputs_embeds=embeds, attention_mask=mask,
                           position_ids=hf_positions(mask))
    arange = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (3, 7))
    ours = forward_embeds(cfg, params, jnp.asarray(embeds), jnp.asarray(mask), arange)
    default = forward_embeds(cfg, params, jnp.asarray(embeds), jnp.asarray(mask))
    errs = (hf_ref.rel_err(valid(ours, mask), valid(ref_arange, mask)),
            hf_ref.rel_err(valid(default, mask), valid(ref_cumsum, mask)))
    print(f"arange positions vs HF forward: {errs[0]:.2e}, default vs HF cumsum: {errs[1]:.2e}")
    assert max(errs) <= TOL
    assert hf_ref.rel_err(valid(default, mask), valid(ours, mask)) > 1e-3


def test_rope_inv_freq_matches_hf():
    """Bit-identical to HF's `inv_freq` buffer for the test configs and the released models
    (linear and llama3 scaling included)."""
    cfgs = {n: models(n)[1] for n in CONFIGS}
    cfgs.update(LLAMA_PRESETS)
    for name, cfg in cfgs.items():
        ref = LlamaRotaryEmbedding(transformers.LlamaConfig(**llama_to_hf(cfg))).inv_freq.numpy()
        ours = rope_inv_freq(cfg)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref, err_msg=name)


def test_rms_norm_matches_hf_in_bf16():
    """HF casts the normalised value back before the weight multiply (`cast_before_scale`);
    in bf16 that rounding is visible. fp32 statistics on both sides."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 32)).astype(np.float32) * 3
    w = (1 + rng.normal(size=(32,)) * 0.5).astype(np.float32)
    hf = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.from_numpy(w))
        ref = hf.to(torch.bfloat16)(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    norm = bnn.LayerNorm(epsilon=1e-5, rms=True, use_bias=False, cast_before_scale=True,
                         dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = {"scale": jnp.asarray(w, jnp.bfloat16)}
    ours = np.asarray(norm.apply({"params": params}, jnp.asarray(x, jnp.bfloat16)), np.float32)
    # The fp32 rsqrt may differ in its last bit, which can flip a bf16 rounding; nothing more.
    assert np.mean(ours == ref) > 0.97
    np.testing.assert_allclose(ours, ref, rtol=2 ** -7)


@pytest.mark.parametrize("kv", [1, 2, 6])
def test_grouped_attention_forms(kv):
    """Every attention form with kv < heads K/V heads equals plain multi-head attention over K/V
    repeated per group (HF `repeat_kv`: query head j uses KV head j // G): the CPU form, the TPU
    form (exercised nowhere else on CPU) and `jax.nn.dot_product_attention` (the GPU path)."""
    rng = np.random.default_rng(kv)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 7, kv, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3)
    shaped = jnp.broadcast_to(mask, (2, 6, 5, 7))
    rep = lambda x: jnp.repeat(x, 6 // kv, axis=2)    # noqa: E731
    want = bnn._explicit_attention(q, rep(k), rep(v), mask=shaped, bias=None, scale=0.3,
                                   dropout_rate=0.0, dropout_rng=None)
    forms = {"explicit": bnn._explicit_attention(q, k, v, mask=shaped, bias=None, scale=0.3,
                                                 dropout_rate=0.0, dropout_rng=None),
             "tpu": bnn._tpu_attention(q, k, v, mask=shaped, bias=None, scale=0.3),
             "jax.nn": jax.nn.dot_product_attention(q, k, v, mask=shaped, scale=0.3),
             "dispatch": bnn.dot_product_attention(q, k, v, mask=mask, scale=0.3)}
    for name, got in forms.items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["gqa2_linear_untied", "mqa_llama3_tied"])
def test_incremental_decoding(name):
    hf, cfg, params = models(name)
    prompt, pmask = hf_ref.text_batch(batch=3, length=6, seed=3, pad_side="left", pad_id=PAD)
    new = np.random.default_rng(4).integers(3, 90, size=(3, 4))
    ids = np.concatenate([prompt, new], 1)
    mask = np.concatenate([pmask, np.ones_like(new)], 1)
    full = np.asarray(forward_ids(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    full_ref = hf_logits(hf, input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask))
    assert hf_ref.rel_err(valid(full, mask), valid(full_ref, mask)) <= TOL

    s_max = ids.shape[1] + 2
    # Key mask over the whole cache; unwritten slots hold garbage (causality must hide them).
    cmask = np.concatenate([mask, [[1, 0], [0, 1], [1, 1]]], 1).astype(np.int32)
    cache = init_cache(cfg, 3, s_max, jnp.float32)
    assert cache["k"].shape == (cfg.num_layers, 3, s_max, cfg.num_kv_heads, cfg.head_dim)
    logits, cache = cached_step(cfg, params, jnp.asarray(prompt), jnp.asarray(cmask), cache,
                                jnp.int32(0))
    steps = [np.asarray(logits)]
    for j in range(new.shape[1]):
        logits, cache = cached_step(cfg, params, jnp.asarray(new[:, j:j + 1]),
                                    jnp.asarray(cmask), cache, jnp.int32(prompt.shape[1] + j))
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, 1)
    err_full = hf_ref.rel_err(valid(inc, mask), valid(full, mask))

    # HF with its own cache, fed the same way (generate's positions passed explicitly).
    pos = hf_positions(mask)
    t = prompt.shape[1]
    with torch.no_grad(), hf_ref.one_torch_thread():
        out = hf(input_ids=torch.from_numpy(prompt), attention_mask=torch.from_numpy(pmask),
                 position_ids=torch.from_numpy(pos[:, :t]), use_cache=True)
        past, hf_steps = out.cache, [out.logits.numpy()]
        for j in range(new.shape[1]):
            out = hf(input_ids=torch.from_numpy(new[:, j:j + 1]),
                     attention_mask=torch.from_numpy(mask[:, :t + j + 1]),
                     position_ids=torch.from_numpy(pos[:, t + j:t + j + 1]), cache=past,
                     use_cache=True)
            past = out.cache
            hf_steps.append(out.logits.numpy())
    hf_inc = np.concatenate(hf_steps, 1)
    err_hf = hf_ref.rel_err(valid(inc, mask), valid(hf_inc, mask))
    print(f"{name}: cached vs full {err_full:.2e}, cached vs HF cached {err_hf:.2e}")
    assert err_full <= TOL and err_hf <= TOL


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grad(cfg, params, ids, mask):
    return jax.value_and_grad(lambda p: jnp.sum(forward_ids(cfg, p, ids, mask) ** 2))(params)


def test_remat_full_identical():
    _, cfg, params = models("mqa_llama3_tied")
    ids, mask = (jnp.asarray(a) for a in hf_ref.text_batch(batch=2, length=6, seed=6,
                                                             pad_side="left", pad_id=PAD))
    a, ga = loss_and_grad(cfg, params, ids, mask)
    b, gb = loss_and_grad(dataclasses.replace(cfg, remat_policy="full"), params, ids, mask)
    assert float(a) == float(b)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])  # noqa
    err = hf_ref.rel_err(flat(gb), flat(ga))     # recomputation may re-associate sums
    print(f"remat grads rel err {err:.2e}")
    assert err <= 1e-6


def test_bf16_against_hf_bf16():
    """bf16 compute and storage: close to fp32 and to HF's model cast to bf16; the cache is
    bf16."""
    hf, cfg, params = models("gqa2_linear_untied")
    ids, mask = hf_ref.text_batch(batch=3, length=7, seed=1, pad_side="left", pad_id=PAD)
    ref = np.asarray(forward_ids(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    out = forward_ids(cfg16, p16, jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad(), hf_ref.one_torch_thread():
        ref16 = hf16(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(hf_positions(mask))).logits.float().numpy()
    err32 = hf_ref.rel_err(valid(out, mask), valid(ref, mask))
    err16 = hf_ref.rel_err(valid(out, mask), valid(ref16, mask))
    print(f"bf16 vs our fp32 {err32:.2e}, vs HF bf16 {err16:.2e}, HF bf16 vs fp32 "
          f"{hf_ref.rel_err(valid(ref16, mask), valid(ref, mask)):.2e}")
    assert np.isfinite(out).all() and err32 < 5e-2 and err16 < 5e-2
    assert init_cache(cfg16, 2, 8)["k"].dtype == jnp.bfloat16


# -- decoding through blip2_jax.generate ---------------------------------------------------------
N_NEW = 8


def prompts():
    """Left-padded prompts BOS + text (HF's decoder-only convention), lengths 6, 4, 5."""
    ids, mask = hf_ref.text_batch(batch=3, length=6, seed=5, pad_side="left", lengths=[6, 4, 5],
                                  pad_id=PAD)
    first = mask.argmax(1)
    ids[np.arange(3), first] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnums=(0, 4))
def lm_generate(cfg, params, ids, mask, opts: gen.DecodeOptions, knobs: gen.Knobs):
    """Prefill the left-padded prompt, then `gen.decode` over cached single-token steps."""
    m = Llama(cfg)
    b, t = ids.shape
    s_max = t + opts.max_new_tokens
    full = jnp.concatenate([mask, jnp.ones((b, opts.max_new_tokens), mask.dtype)], 1)
    emb = m.apply({"params": params}, ids, method=Llama.embed)
    logits, cache = m.apply({"params": params}, emb, full, cache=init_cache(cfg, b, s_max),
                            cache_index=0, logits_from=t - 1)
    step_mask = gen.repeat_batch(full, opts.num_beams)

    def step(cache, tokens, i):
        e = m.apply({"params": params}, tokens[:, None], method=Llama.embed)
        out, cache = m.apply({"params": params}, e, step_mask, cache=cache, cache_index=t + i)
        return out[:, -1], cache

    return gen.decode(step, cache, logits[:, -1], opts, knobs)


def normalise(tokens, eos=EOS, pad=PAD, n=N_NEW):
    """HF's new tokens padded to n, everything after the first EOS set to pad."""
    out = np.full((tokens.shape[0], n), pad, np.int64)
    for r, row in enumerate(tokens):
        for j, tok in enumerate(row[:n]):
            out[r, j] = tok
            if tok == eos:
                break
    return out


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad(), hf_ref.one_torch_thread():
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=N_NEW, eos_token_id=EOS, pad_token_id=PAD,
                          **kw).numpy()
    return normalise(out[:, ids.shape[1]:])


def ours_generate(cfg, params, ids, mask, *, seed=0, **opts):
    o = gen.DecodeOptions(max_new_tokens=N_NEW, eos_token_ids=(EOS,), pad_token_id=PAD, **opts)
    return np.asarray(lm_generate(cfg, params, jnp.asarray(ids), jnp.asarray(mask), o,
                                  gen.make_knobs(o, seed=seed)))


@pytest.fixture(scope="module")
def decoding():
    hf, cfg, params = models("gqa2_linear_untied")
    ids, mask = prompts()
    refs = {"greedy": hf_generate(hf, ids, mask, do_sample=False),
            "beam3": hf_generate(hf, ids, mask, do_sample=False, num_beams=3)}
    return cfg, params, ids, mask, refs


def test_greedy_and_beam_match_hf_generate(decoding):
    cfg, params, ids, mask, refs = decoding
    # The references are informative: text varies, some rows stop at EOS and others run on,
    # beam search differs from greedy.
    assert max(len(set(row)) for row in refs["greedy"]) >= 4, refs
    stops = (refs["greedy"] == EOS).any(1)
    assert stops.any() and not stops.all(), refs
    assert not np.array_equal(refs["greedy"], refs["beam3"]), refs
    for name, opts in (("greedy", {}), ("beam3", dict(num_beams=3))):
        ours = ours_generate(cfg, params, ids, mask, **opts)
        print(name, "ours", ours.tolist(), "hf", refs[name].tolist())
        np.testing.assert_array_equal(ours, refs[name], err_msg=name)


def test_sampling_seeded_and_top_k_1_is_greedy(decoding):
    """As tests/test_generate.py for OPT: jax.random draws are not torch's, so sampled tokens
    are compared with themselves (same seed → same tokens, other seeds → others) and top_k=1
    sampling with HF greedy."""
    cfg, params, ids, mask, refs = decoding
    kw = dict(do_sample=True, top_k=1, use_top_p=False)
    for seed in (0, 3):
        np.testing.assert_array_equal(ours_generate(cfg, params, ids, mask, seed=seed, **kw),
                                      refs["greedy"])
    a = ours_generate(cfg, params, ids, mask, seed=0, do_sample=True)
    np.testing.assert_array_equal(a, ours_generate(cfg, params, ids, mask, seed=0,
                                                   do_sample=True))
    others = [ours_generate(cfg, params, ids, mask, seed=s, do_sample=True) for s in (1, 2)]
    assert any(not np.array_equal(a, o) for o in others)
    assert not np.array_equal(a, refs["greedy"])
    np.testing.assert_array_equal(a, normalise(a))


# -- config, key table, errors -------------------------------------------------------------------
def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        LlamaConfig(hidden_size=48, num_heads=6, num_kv_heads=4)
    with pytest.raises(ConfigError, match=r"num_heads \(4\).*num_kv_heads \(3\)"):
        llama_from_hf(dict(BASE, num_key_value_heads=3))
    attn = bnn.Attention(num_heads=4, head_dim=8, num_kv_heads=3, out_features=32)
    with pytest.raises(ValueError, match=r"num_heads \(4\).*num_kv_heads \(3\)"):
        attn.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 32)))


def test_hf_config_io():
    for name in CONFIGS:
        hcfg = hf_config(name)
        cfg = llama_from_hf(hcfg.to_dict())
        assert cfg.num_kv_heads == hcfg.num_key_value_heads and cfg.head_dim == hcfg.head_dim
        back = transformers.LlamaConfig(**llama_to_hf(cfg))
        for key in ("rope_parameters", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                    "attention_bias", "mlp_bias", "intermediate_size", "eos_token_id"):
            assert getattr(back, key) == getattr(hcfg, key), (name, key)
        assert llama_from_hf(llama_to_hf(cfg)) == cfg
    # Legacy keys (transformers 4.x / hub config.json files): rope_theta + rope_scaling "type".
    legacy = dict(BASE, model_type="llama", rope_theta=1e6,
                  rope_scaling=dict(type="linear", factor=4.0))
    cfg = llama_from_hf(legacy)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == RopeScaling("linear", 4.0)
    # Llama-3.1-8B's hub config.json (legacy keys, llama3 scaling) is the preset.
    hub = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192, rope_type="llama3"),
               bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
               tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
               pretraining_tp=1)
    assert llama_from_hf(hub) == LLAMA_PRESETS["llama-3.1-8b"]
    assert llama_from_hf(dict(BASE)).rope_theta == 10000.0 and \
        llama_from_hf(dict(BASE)).rope_scaling is None
    assert llama_from_hf(dict(BASE, eos_token_id=[2, 7])).eos_token_ids == (2, 7)
    with pytest.raises(ConfigError, match="dynamic"):
        llama_from_hf(dict(BASE, rope_scaling=dict(type="dynamic", factor=2.0)))
    with pytest.raises(ConfigError, match="llama"):
        llama_from_hf(dict(BASE, model_type="opt"))
    # Our own serialisation: a dataclass dict (rope_scaling as a dict) builds the same config.
    c = LLAMA_PRESETS["llama-3.1-8b"]
    assert LlamaConfig(**dataclasses.asdict(c)) == c and hash(c) == hash(LlamaConfig(
        **dataclasses.asdict(c)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_round_trip(name):
    hf, cfg, params = models(name)
    sd = hf_ref.state_dict_numpy(hf)
    r = hf_llama.rules(cfg)        # default prefixes: llm/ <-> language_model.
    saved = mapping.save(r, {"llm": jax.tree_util.tree_map(np.asarray, params)})
    tied = set(hf_llama.tied_keys(cfg))
    assert set(saved) == {f"language_model.{k}" for k in sd} - tied
    for k, v in saved.items():
        np.testing.assert_array_equal(v, sd[k[len("language_model."):]])
    back = mapping.load(r, saved.keys(), saved.__getitem__)["llm"]
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    # Old checkpoints' rotary buffers and a tied duplicate load when ignored, not otherwise.
    extra = dict(saved, **{"language_model.model.layers.0.self_attn.rotary_emb.inv_freq":
                           rope_inv_freq(cfg)})
    extra.update({k: saved["language_model.model.embed_tokens.weight"] for k in tied})
    with pytest.raises(mapping.MappingError, match="inv_freq"):
        mapping.load(r, extra.keys(), extra.__getitem__)
    mapping.load(r, extra.keys(), extra.__getitem__, ignore=hf_llama.ignorable(cfg))


def test_param_tree_axes_and_init():
    x = jnp.zeros((1, 3, TINY_LLAMA.hidden_size))
    boxed = jax.eval_shape(lambda: Llama(TINY_LLAMA).init(jax.random.PRNGKey(0), x,
                                                           jnp.ones((1, 3)))["params"])
    leaves = {k: v.shape for k, v in mapping.flatten(nn.unbox(boxed)).items()}
    assert leaves["embed_tokens/embedding"] == (100, 32)
    assert leaves["layers/attn/query/kernel"] == (2, 32, 32)
    assert leaves["layers/attn/key/kernel"] == (2, 32, 16)       # 2 KV heads x 8
    assert leaves["layers/mlp/gate/kernel"] == (2, 32, 37)
    assert leaves["layers/attn_ln/scale"] == (2, 32) and "layers/attn_ln/bias" not in leaves
    assert leaves["lm_head/kernel"] == (32, 100)
    assert set(leaves) == {r.ours for r in hf_llama.rules(TINY_LLAMA, ours="")}
    specs = jax.tree_util.tree_leaves(nn.get_partition_spec(boxed),
                                      is_leaf=lambda s: isinstance(s, PartitionSpec))
    used = {n for spec in specs for n in spec if n is not None}
    assert used == {"kv_heads", "heads", "embed", "mlp", "vocab", "layers", "norm"}
    assert used <= {n for n, _ in sharding.DEFAULT_RULES}
