"""OPT decoder parity against HF `OPTForCausalLM` (torch fp32, eager attention).

Covers: full forward from inputs_embeds and from ids, right- and left-padded, over several configs
(pre/post-LN, project_in/out, untied head, no bias / no LN affine); cached incremental decoding ==
full forward == HF with its cache; greedy decoding == HF generate; remat; bf16; save/load.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import OPTForCausalLM

import hf_ref
from blip2_jax import nn as bnn
from blip2_jax.config import TINY_OPT, OPTConfig, llm_from_hf
from blip2_jax.convert import hf_opt, mapping
from blip2_jax.models.opt import OPT, init_cache

TOL = 1e-5

# HF OPTConfig overrides of hf_ref.opt_config for each tested architecture.
CONFIGS = {
    "base": {},
    "proj_3layers_2heads": dict(word_embed_proj_dim=16, num_hidden_layers=3,
                                num_attention_heads=2),
    "postln_untied": dict(do_layer_norm_before=False, tie_word_embeddings=False),
    "nobias_noaffine_proj": dict(enable_bias=False, layer_norm_elementwise_affine=False,
                                 word_embed_proj_dim=24, num_attention_heads=8),
}


@functools.lru_cache(maxsize=None)
def models(name: str):
    """(HF model, our config, our params loaded from the HF state dict)."""
    hcfg = hf_ref.opt_config(**CONFIGS[name])
    hcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = hf_ref.randomize(OPTForCausalLM(hcfg), seed=len(name))
    cfg = llm_from_hf(hcfg.to_dict())
    sd = hf_ref.state_dict_numpy(hf)
    ignore = [re.escape(k) for k in hf_opt.tied_keys(cfg, theirs="")]
    params = mapping.load(hf_opt.rules(cfg, ours="", theirs=""), sd.keys(), sd.__getitem__,
                          ignore=ignore)
    return hf, cfg, jax.tree_util.tree_map(jnp.asarray, params)


@functools.partial(jax.jit, static_argnums=0)
def forward_embeds(cfg, params, embeds, mask):
    return OPT(cfg).apply({"params": params}, embeds, mask)[0]


@functools.partial(jax.jit, static_argnums=0)
def forward_ids(cfg, params, ids, mask):
    m = OPT(cfg)
    return m.apply({"params": params}, m.apply({"params": params}, ids, method=OPT.embed),
                   mask)[0]


@functools.partial(jax.jit, static_argnums=0)
def cached_step(cfg, params, ids, mask, cache, index):
    m = OPT(cfg)
    emb = m.apply({"params": params}, ids, method=OPT.embed)
    return m.apply({"params": params}, emb, mask, cache=cache, cache_index=index)


def hf_logits(hf, **kw) -> np.ndarray:
    with torch.no_grad():
        return hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in kw.items()}).logits.numpy()


def valid(x, mask):
    """Positions with mask 1 (padded queries attend to nothing and are undefined)."""
    return np.asarray(x)[np.asarray(mask) == 1]


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_parity(name, pad_side):
    hf, cfg, params = models(name)
    ids, mask = hf_ref.text_batch(batch=3, length=7, seed=1, pad_side=pad_side,
                                  pad_id=cfg.pad_token_id)
    assert (mask == 0).any()
    embeds = np.random.default_rng(2).normal(
        size=(*ids.shape, cfg.word_embed_proj_dim)).astype(np.float32)
    ref = hf_logits(hf, inputs_embeds=embeds, attention_mask=mask)
    ours = forward_embeds(cfg, params, jnp.asarray(embeds), jnp.asarray(mask))
    assert ours.shape == (3, 7, cfg.vocab_size) and ours.dtype == jnp.float32
    err = hf_ref.rel_err(valid(ours, mask), valid(ref, mask))
    print(f"{name}/{pad_side} embeds: {err:.2e}")
    assert err <= TOL

    ref = hf_logits(hf, input_ids=ids, attention_mask=mask)
    ours = forward_ids(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
    err = hf_ref.rel_err(valid(ours, mask), valid(ref, mask))
    print(f"{name}/{pad_side} ids: {err:.2e}")
    assert err <= TOL
    # Padded positions too: both sides make a fully masked query row uniform over all keys.
    err = hf_ref.rel_err(ours, ref)
    print(f"{name}/{pad_side} ids, all positions: {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("name", ["base", "postln_untied"])
def test_incremental_decoding(name):
    hf, cfg, params = models(name)
    prompt, pmask = hf_ref.text_batch(batch=3, length=6, seed=3, pad_side="left",
                                      pad_id=cfg.pad_token_id)
    new = np.random.default_rng(4).integers(3, 90, size=(3, 4))
    ids = np.concatenate([prompt, new], 1)
    mask = np.concatenate([pmask, np.ones_like(new)], 1)
    full = np.asarray(forward_ids(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    full_ref = hf_logits(hf, input_ids=ids, attention_mask=mask)
    assert hf_ref.rel_err(valid(full, mask), valid(full_ref, mask)) <= TOL

    s_max = ids.shape[1] + 2
    # Key mask over the whole cache; unwritten slots hold garbage (causality must hide them).
    cmask = np.concatenate([mask, [[1, 0], [0, 1], [1, 1]]], 1).astype(np.int32)
    cache = init_cache(cfg, 3, s_max, jnp.float32)
    logits, cache = cached_step(cfg, params, jnp.asarray(prompt), jnp.asarray(cmask), cache,
                                jnp.int32(0))
    assert cache["k"].shape == (cfg.num_layers, 3, s_max, cfg.num_heads, cfg.head_dim)
    steps = [np.asarray(logits)]
    for j in range(new.shape[1]):
        logits, cache = cached_step(cfg, params, jnp.asarray(new[:, j:j + 1]),
                                    jnp.asarray(cmask), cache, jnp.int32(prompt.shape[1] + j))
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, 1)
    err_full = hf_ref.rel_err(valid(inc, mask), valid(full, mask))

    # HF with its own cache, fed the same way.
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(prompt), attention_mask=torch.from_numpy(pmask),
                 use_cache=True)
        past, hf_steps = out.cache, [out.logits.numpy()]
        for j in range(new.shape[1]):
            out = hf(input_ids=torch.from_numpy(new[:, j:j + 1]),
                     attention_mask=torch.from_numpy(mask[:, :prompt.shape[1] + j + 1]),
                     cache=past, use_cache=True)
            past = out.cache
            hf_steps.append(out.logits.numpy())
    hf_inc = np.concatenate(hf_steps, 1)
    err_hf = hf_ref.rel_err(valid(inc, mask), valid(hf_inc, mask))
    print(f"{name}: cached vs full {err_full:.2e}, cached vs HF cached {err_hf:.2e}")
    assert err_full <= TOL and err_hf <= TOL


def test_greedy_matches_hf_generate():
    hf, cfg, params = models("base")
    prompt, pmask = hf_ref.text_batch(batch=3, length=6, seed=5, pad_side="left",
                                      pad_id=cfg.pad_token_id)
    n_new = 5
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(prompt),
                          attention_mask=torch.from_numpy(pmask), do_sample=False,
                          max_new_tokens=n_new, min_new_tokens=n_new,
                          pad_token_id=cfg.pad_token_id).numpy()[:, prompt.shape[1]:]

    b, t = prompt.shape
    s_max = t + 6        # same shapes as test_incremental_decoding: reuses its compilations
    mask = np.concatenate([pmask, np.ones((b, s_max - t), np.int64)], 1).astype(np.int32)
    cache = init_cache(cfg, b, s_max, jnp.float32)
    logits, cache = cached_step(cfg, params, jnp.asarray(prompt), jnp.asarray(mask), cache,
                                jnp.int32(0))
    out = []
    for j in range(n_new):
        tok = jnp.argmax(logits[:, -1], -1)
        out.append(np.asarray(tok))
        if j + 1 < n_new:
            logits, cache = cached_step(cfg, params, tok[:, None], jnp.asarray(mask), cache,
                                        jnp.int32(t + j))
    ours = np.stack(out, 1)
    print("ours", ours.tolist(), "hf", ref.tolist())
    np.testing.assert_array_equal(ours, ref)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grad(cfg, params, ids, mask):
    return jax.value_and_grad(lambda p: jnp.sum(forward_ids(cfg, p, ids, mask) ** 2))(params)


def test_remat_full_identical():
    _, cfg, params = models("base")
    ids, mask = (jnp.asarray(a) for a in hf_ref.text_batch(batch=2, length=6, seed=6,
                                                             pad_side="left"))
    cfg_r = OPTConfig(**{**cfg.__dict__, "remat_policy": "full"})
    a, ga = loss_and_grad(cfg, params, ids, mask)
    b, gb = loss_and_grad(cfg_r, params, ids, mask)
    assert float(a) == float(b)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])  # noqa
    err = hf_ref.rel_err(flat(gb), flat(ga))     # recomputation may re-associate sums
    print(f"remat grads rel err {err:.2e}")
    assert err <= 1e-6


def test_bf16_runs():
    param_dtype = "bfloat16"
    _, cfg, params = models("base")
    ids, mask = hf_ref.text_batch(batch=2, length=6, seed=7, pad_side="left")
    ref = np.asarray(forward_ids(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    cfg16 = OPTConfig(**{**cfg.__dict__, "dtype": "bfloat16", "param_dtype": param_dtype})
    p16 = jax.tree_util.tree_map(lambda a: a.astype(bnn.dtype_of(param_dtype)), params)
    out = forward_ids(cfg16, p16, jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    err = hf_ref.rel_err(valid(out, mask), valid(ref, mask))
    print(f"bf16 (params {param_dtype}) vs fp32: {err:.2e}")
    assert err < 5e-2
    cache = init_cache(cfg16, 2, 8)
    assert cache["k"].dtype == jnp.bfloat16
    logits, cache = cached_step(cfg16, p16, jnp.asarray(ids), jnp.ones((2, 8), jnp.int32),
                                cache, jnp.int32(0))
    assert logits.dtype == jnp.bfloat16 and cache["k"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["base", "postln_untied", "nobias_noaffine_proj"])
def test_save_round_trip(name):
    hf, cfg, params = models(name)
    sd = hf_ref.state_dict_numpy(hf)
    r = hf_opt.rules(cfg)        # default prefixes: llm/ <-> language_model.
    saved = mapping.save(r, {"llm": jax.tree_util.tree_map(np.asarray, params)})
    tied = set(hf_opt.tied_keys(cfg))
    expected = {f"language_model.{k}" for k in sd} - tied
    assert set(saved) == expected
    for k, v in saved.items():
        np.testing.assert_array_equal(v, sd[k[len("language_model."):]])
    back = mapping.load(r, saved.keys(), saved.__getitem__)["llm"]
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    # A tied checkpoint that also stores lm_head.weight still loads when told to ignore it.
    if tied:
        with_dup = dict(saved, **{k: saved["language_model.model.decoder.embed_tokens.weight"]
                                  for k in tied})
        with pytest.raises(mapping.MappingError):
            mapping.load(r, with_dup.keys(), with_dup.__getitem__)
        mapping.load(r, with_dup.keys(), with_dup.__getitem__,
                     ignore=[re.escape(k) for k in tied])


def test_param_tree_and_init():
    x = jnp.zeros((1, 3, TINY_OPT.word_embed_proj_dim))
    params = jax.eval_shape(lambda: bnn.init_params(OPT(TINY_OPT), jax.random.PRNGKey(0), x,
                                                    jnp.ones((1, 3))))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    leaves = {k: v.shape for k, v in mapping.flatten(params).items()}
    assert leaves["embed_tokens/embedding"] == (100, 32)
    assert leaves["embed_positions/embedding"] == (66, 32)
    assert leaves["layers/attn/query/kernel"] == (2, 32, 32)
    assert leaves["layers/mlp/fc1/kernel"] == (2, 32, 37)
    assert "final_ln/scale" in leaves and "lm_head/kernel" not in leaves
    assert set(leaves) == {r.ours for r in hf_opt.rules(TINY_OPT, ours="")}
    # An untied, projected, post-LN config: every leaf is covered by the table and vice versa.
    cfg = OPTConfig(**{**TINY_OPT.__dict__, "tie_word_embeddings": False,
                       "word_embed_proj_dim": 16, "do_layer_norm_before": False})
    params = jax.eval_shape(lambda: bnn.init_params(OPT(cfg), jax.random.PRNGKey(0),
                                                    jnp.zeros((1, 3, 16)), jnp.ones((1, 3))))
    leaves = mapping.flatten(params)
    assert set(leaves) == {r.ours for r in hf_opt.rules(cfg, ours="")}
    assert leaves["lm_head/kernel"].shape == (16, 100)
    assert leaves["project_in/kernel"].shape == (16, 32)
