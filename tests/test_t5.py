"""T5 / FlanT5 parity with HF `T5ForConditionalGeneration` (torch fp32, eager attention).

HF v5 always builds T5 with `lm_head` tied to `shared`; `tie_word_embeddings=False` only turns off
the d_model**-0.5 decoder-output scaling (`scale_decoder_outputs`). A real FlanT5 checkpoint stores
a different lm_head, which `from_pretrained` then unties; `hf_t5` reproduces that by giving the
untied models their own random lm_head.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

import hf_ref
from blip2_jax.config import TINY_T5, T5Config, llm_from_hf
from blip2_jax.convert import hf_t5 as conv
from blip2_jax.convert import mapping
from blip2_jax.models.t5 import T5, relative_position_bucket
from blip2_jax.nn import init_params

TOL = 1e-5

CONFIGS = {
    # BLIP-2 FlanT5: gated exact-erf GELU, untied head, no output scaling.
    "flan_gelu": dict(),
    # stock FlanT5 (gated-gelu -> gelu_new), more encoder than decoder layers, fewer buckets.
    "gelu_new": dict(dense_act_fn="gelu_new", num_layers=3, num_decoder_layers=1,
                     relative_attention_num_buckets=6, relative_attention_max_distance=10),
    # original T5: non-gated ReLU, tied head (decoder output scaled by d_model**-0.5).
    "relu_tied": dict(feed_forward_proj="relu", dense_act_fn="relu", tie_word_embeddings=True,
                      num_layers=2, num_decoder_layers=3),
    # BLIP-2 FlanT5 with unequal depths both ways (untied head).
    "flan_deep_decoder": dict(num_layers=1, num_decoder_layers=4),
    "flan_deep_encoder": dict(num_layers=4, num_decoder_layers=2),
}


def hf_t5(seed: int = 0, **kw) -> T5ForConditionalGeneration:
    cfg = hf_ref.t5_config(**kw)
    cfg._attn_implementation = "eager"
    model = T5ForConditionalGeneration(cfg)
    if not cfg.scale_decoder_outputs:     # untied checkpoint (FlanT5): own lm_head
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
        assert model.lm_head.weight is not model.shared.weight
    return hf_ref.randomize(model, seed)


def ours_config(hf_cfg) -> T5Config:
    """Our config via the library's reader; HF 5 ties every T5 in memory unless a checkpoint
    brings its own head, which `hf_t5` gives exactly the models with unscaled outputs."""
    cfg = llm_from_hf(hf_cfg.to_dict())
    return dataclasses.replace(cfg, tie_word_embeddings=bool(hf_cfg.scale_decoder_outputs))


def load_params(cfg: T5Config, model) -> dict:
    sd = hf_ref.state_dict_numpy(model)
    return mapping.load(conv.rules(cfg, ours="", theirs=""), sd.keys(), sd.__getitem__,
                        ignore=conv.tied_keys(cfg, theirs=""), source="HF T5")


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    model = hf_t5(seed=1, **CONFIGS[request.param])
    cfg = ours_config(model.config)
    return request.param, model, cfg, load_params(cfg, model)


@pytest.fixture(scope="module")
def flan():
    model = hf_t5(seed=2)
    cfg = ours_config(model.config)
    return model, cfg, load_params(cfg, model)


def encoder_batch(pad_side="right", seed=0):
    return hf_ref.text_batch(batch=3, length=9, seed=seed, pad_side=pad_side)


def _init_args():
    return jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 2), jnp.int32)


def _t(x):
    return torch.from_numpy(np.asarray(x))


@functools.lru_cache(maxsize=None)
def fns(cfg: T5Config):
    """Jitted entry points for one config (compiled once per config and shape)."""
    m = T5(cfg)

    @jax.jit
    def forward(params, ids, mask, dec, dec_mask):
        enc = m.apply({"params": params}, m.apply({"params": params}, ids, method=T5.embed), mask,
                      method=T5.encode)
        logits, cache = m.apply({"params": params}, dec, enc, mask,
                                decoder_attention_mask=dec_mask, method=T5.decode)
        assert cache is None
        return enc, logits

    @functools.partial(jax.jit, static_argnums=2)
    def init_cache(params, enc, t_max):
        return m.apply({"params": params}, enc, t_max, method=T5.init_cache)

    @jax.jit
    def step(params, cache, tokens, index, mask, dec_mask):
        return m.apply({"params": params}, tokens, None, mask, cache=cache, cache_index=index,
                       decoder_attention_mask=dec_mask, method=T5.decode)

    return forward, init_cache, step


def _forward(cfg, params, ids, mask, dec, dec_mask=None):
    if dec_mask is None:
        dec_mask = np.ones(dec.shape, np.int32)
    return fns(cfg)[0](params, ids, mask, dec, dec_mask)


# ----------------------------------------------------------------------------------------------
def test_relative_position_bucket_matches_hf():
    rel = torch.arange(-300, 300)
    for nb, md in ((32, 128), (8, 20), (6, 10), (64, 256)):
        for bi in (True, False):
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bi, num_buckets=nb,
                                                        max_distance=md).numpy()
            got = relative_position_bucket(rel.numpy(), bidirectional=bi, num_buckets=nb,
                                           max_distance=md)
            np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"{nb} {md} {bi}")


def test_encoder_and_decoder_parity(case):
    name, model, cfg, params = case
    pad_side = "left" if name == "gelu_new" else "right"
    ids, mask = encoder_batch(pad_side)
    dec, dec_mask = hf_ref.text_batch(batch=3, length=8, seed=3, low=2)
    dec[:, 0] = cfg.decoder_start_token_id
    assert mask.min() == 0 and dec_mask.min() == 0       # both sides really padded
    with torch.no_grad():
        ref = model(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec),
                    decoder_attention_mask=_t(dec_mask))
    enc, logits = _forward(cfg, params, ids, mask, dec, dec_mask)
    e_enc = hf_ref.rel_err(enc, ref.encoder_last_hidden_state.numpy())
    e_dec = hf_ref.rel_err(logits, ref.logits.numpy())
    print(f"{name}: encoder {e_enc:.2e} logits {e_dec:.2e}")
    assert logits.dtype == jnp.float32 and logits.shape == (3, 8, cfg.vocab_size)
    assert e_enc <= TOL and e_dec <= TOL
    if name == "flan_gelu":   # the whole-model __call__ (used by init) agrees with encode + decode
        full = jax.jit(T5(cfg).apply)({"params": params}, ids, mask, dec, dec_mask)
        assert hf_ref.rel_err(full, logits) <= 1e-6


def test_param_tree_and_roundtrip(case):
    name, model, cfg, params = case
    rules = conv.rules(cfg, ours="", theirs="")
    loaded = {k: v.shape for k, v in mapping.flatten(params).items()}
    init = jax.eval_shape(lambda: init_params(T5(cfg), jax.random.PRNGKey(0), *_init_args()))
    assert {k: v.shape for k, v in mapping.flatten(init).items()} == loaded
    assert set(loaded) == {r.ours for r in rules}
    assert ("lm_head/kernel" in loaded) == (not cfg.tie_word_embeddings)
    assert ("mlp/gate/kernel" in "".join(loaded)) == cfg.gated
    sd = hf_ref.state_dict_numpy(model)
    out = mapping.save(rules, params)
    assert set(out) == set(sd) - set(conv.tied_keys(cfg, theirs=""))
    for k, v in out.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
    # prefixed keys (inside Blip2ForConditionalGeneration)
    pref = conv.rules(cfg)
    assert all(r.ours.startswith("llm/") and r.theirs.startswith("language_model.") for r in pref)


def test_init_shapes_tiny():
    cfg = TINY_T5
    params = jax.eval_shape(lambda: init_params(T5(cfg), jax.random.PRNGKey(0), *_init_args()))
    flat = {k: v.shape for k, v in mapping.flatten(params).items()}
    assert flat["shared/embedding"] == (100, 32)
    assert flat["encoder/rel_bias/embedding"] == (8, 4)
    assert flat["decoder/layers/cross_attn/key/kernel"] == (2, 32, 32)
    assert flat["decoder/layers/mlp/gate/kernel"] == (2, 32, 37)
    assert flat["lm_head/kernel"] == (32, 100)
    assert set(flat) == {r.ours for r in conv.rules(cfg, ours="")}
    # initialising through init_cache alone creates every decoder-side parameter
    via_cache = jax.eval_shape(lambda: init_params(T5(cfg), jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 3, 32)), 4,
                                                   method=T5.init_cache))
    assert set(mapping.flatten(via_cache)) == {k for k in flat if not k.startswith("encoder")}


T_MAX = 9
DEC_LEN = 7


def test_incremental_decoding(flan):
    model, cfg, params = flan
    _, init_cache, step = fns(cfg)
    ids, mask = encoder_batch()
    dec = np.random.default_rng(5).integers(2, 90, size=(3, DEC_LEN))
    dec[:, 0] = 0
    ones = np.ones((3, T_MAX), np.int32)
    enc, full = _forward(cfg, params, ids, mask, dec)

    cache = init_cache(params, enc, T_MAX)
    assert cache["self"]["k"].shape == (cfg.num_decoder_layers, 3, T_MAX, cfg.num_heads, cfg.d_kv)
    assert cache["cross"]["k"].shape == (cfg.num_decoder_layers, 3, 9, cfg.num_heads, cfg.d_kv)
    chunks, pieces = [(0, 3)] + [(i, i + 1) for i in range(3, DEC_LEN)], []
    for a, b in chunks:
        logits, cache = step(params, cache, dec[:, a:b], jnp.int32(a), mask, ones)
        pieces.append(logits)
    inc = jnp.concatenate(pieces, 1)

    # HF with its cache, same chunks
    hf_pieces = []
    with torch.no_grad():
        enc_out = model.get_encoder()(input_ids=_t(ids), attention_mask=_t(mask))
        past = None
        for a, b in chunks:
            out = model(encoder_outputs=enc_out, attention_mask=_t(mask),
                        decoder_input_ids=_t(dec[:, a:b]), cache=past, use_cache=True)
            past = out.cache
            hf_pieces.append(out.logits.numpy())
    hf_inc = np.concatenate(hf_pieces, 1)
    e_full, e_hf = hf_ref.rel_err(inc, full), hf_ref.rel_err(inc, hf_inc)
    print(f"incremental vs full {e_full:.2e}, vs HF cached {e_hf:.2e}")
    assert e_full <= TOL and e_hf <= TOL
    # a decoder padding mask over the cache positions is honoured (= full decode with that mask)
    dmask = ones.copy()
    dmask[1, 1] = 0
    cache = init_cache(params, enc, T_MAX)
    got = []
    for i in range(DEC_LEN):
        logits, cache = step(params, cache, dec[:, i:i + 1], jnp.int32(i), mask, dmask)
        got.append(logits)
    _, ref = _forward(cfg, params, ids, mask, dec, dmask[:, :DEC_LEN])
    e_mask = hf_ref.rel_err(jnp.concatenate(got, 1), ref)
    print(f"incremental with decoder padding vs full {e_mask:.2e}")
    assert e_mask <= TOL and hf_ref.rel_err(ref, full) > 1e-3


def greedy(cfg, params, ids, mask, steps):
    """Greedy decoding with the cache, HF `generate` semantics (finished rows emit pad)."""
    forward, init_cache, step = fns(cfg)
    b = ids.shape[0]
    dummy = np.zeros((b, DEC_LEN), np.int32)      # same shapes as test_incremental_decoding
    enc, _ = forward(params, ids, mask, dummy, np.ones_like(dummy))
    cache = init_cache(params, enc, T_MAX)
    assert steps <= T_MAX
    tok = np.full((b, 1), cfg.decoder_start_token_id, np.int32)
    done = np.zeros(b, bool)
    out = [tok[:, 0]]
    for i in range(steps):
        logits, cache = step(params, cache, tok, jnp.int32(i), mask, None)  # no decoder mask
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1)).astype(np.int32)
        nxt = np.where(done, cfg.pad_token_id, nxt)
        done |= nxt == cfg.eos_token_id
        out.append(nxt)
        tok = nxt[:, None]
        if done.all():
            break
    return np.stack(out, 1)


def test_greedy_matches_hf_generate(flan):
    model, cfg, params = flan
    ids, mask = encoder_batch(seed=7)
    with torch.no_grad():
        ref = model.generate(input_ids=_t(ids), attention_mask=_t(mask), do_sample=False,
                             num_beams=1, max_new_tokens=6).numpy()
    got = greedy(cfg, params, ids, mask, 6)
    print("HF", ref.tolist(), "ours", got.tolist())
    np.testing.assert_array_equal(got, ref)
    assert len(set(ref[:, 1:].ravel().tolist())) > 2        # not a degenerate constant output


def test_remat_full_identical(flan):
    _, cfg, params = flan
    ids, mask = encoder_batch()
    dec = np.random.default_rng(5).integers(2, 90, size=(3, 5))

    def loss_and_grad(c):
        def loss(p):
            return jnp.sum(T5(c).apply({"params": p}, ids, mask, dec) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    remat = dataclasses.replace(cfg, remat_policy="full")
    for c, expect in ((cfg, False), (remat, True)):   # the policy really reaches the layer scans
        jaxpr = str(jax.make_jaxpr(lambda p: T5(c).apply({"params": p}, ids, mask, dec))(params))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == expect
    (l0, g0), (l1, g1) = loss_and_grad(cfg), loss_and_grad(remat)
    # Same math; the two programs may fuse (and so round) differently: 1 ulp apart is fine.
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert hf_ref.rel_err(b, a) <= 1e-6


def test_bfloat16_runs(flan):
    model, cfg, params = flan
    ids, mask = encoder_batch()
    dec = np.random.default_rng(5).integers(2, 90, size=(3, 5))
    c16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    enc, full = _forward(c16, p16, ids, mask, dec)
    assert enc.dtype == jnp.bfloat16 and full.dtype == jnp.bfloat16
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    with torch.no_grad():
        ref = model(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec)).logits
    err = hf_ref.rel_err(np.asarray(full, np.float32), ref.numpy())
    print(f"bf16 logits vs HF fp32: {err:.2e}")
    assert np.isfinite(np.asarray(full, np.float32)).all() and err < 5e-2
    # cached bf16 decoding runs too, cache in bf16
    _, init_cache, step = fns(c16)
    cache = init_cache(p16, enc, 4)
    assert cache["self"]["k"].dtype == cache["cross"]["v"].dtype == jnp.bfloat16
    logits, cache = step(p16, cache, dec[:, :1], jnp.int32(0), mask, np.ones((3, 4), np.int32))
    assert logits.dtype == jnp.bfloat16 and cache["self"]["k"].dtype == jnp.bfloat16
    assert hf_ref.rel_err(np.asarray(logits[:, 0], np.float32),
                          np.asarray(full[:, 0], np.float32)) < 2e-2
