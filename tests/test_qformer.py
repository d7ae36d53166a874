"""Q-Former parity with Hugging Face (`Blip2QFormerModel` + `Blip2TextEmbeddings`, torch fp32 eager).

Modes (see blip2_jax/models/qformer.py): (a) queries + image, (b) text only, (c) bidirectional
queries + text (ITM), (d) UniLM causal — HF has no causal mode, but its Q-Former returns a 4-D
attention mask as-is (`create_bidirectional_mask`), so it is fed the explicit additive UniLM mask
(a 3-D mask is not supported there: it crashes in mask expansion) — and (e) causal text over the
query K/V cache, which must equal the text part of (d). Also: the query cache against HF's own
key/value projections, dropout, remat, the HF key table both ways, the scan-group layout error.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_ref
from blip2_jax.config import TINY_QFORMER, QFormerConfig
from blip2_jax.convert import hf_qformer, mapping
from blip2_jax.models.qformer import QFormer
from blip2_jax.nn import init_params

TOL = 1e-5
HF_OTHER = [r"vision_model\..*", r"query_tokens", r"vision_projection\..*",
            r"text_projection\..*", r"itm_head\..*", r"language_projection\..*",
            r"language_model\..*"]

# (cross_attention_frequency, num_layers, num_queries, text_len, pad_side)
CASES = [(1, 2, 3, 6, "right"), (2, 4, 8, 7, "right"), (2, 2, 3, 5, "left"),
         # Depths the frequency does not divide (HF: cross-attention where layer % F == 0): a
         # scanned group then a tail layer; a tail alone.
         (2, 3, 4, 5, "left"), (3, 2, 3, 6, "right")]
IDS = [f"freq{f}-L{n}-Q{q}" for f, n, q, _, _ in CASES]


def our_config(freq, layers, **kw) -> QFormerConfig:
    return dataclasses.replace(TINY_QFORMER, cross_attention_frequency=freq, num_layers=layers, **kw)


def load_params(cfg, model):
    sd = hf_ref.state_dict_numpy(model)
    tree = mapping.load(hf_qformer.rules(cfg), sd.keys(), sd.__getitem__, ignore=HF_OTHER,
                        source="HF state_dict")
    return jax.tree.map(jnp.asarray, tree["qformer"])


@functools.lru_cache(maxsize=None)
def _jitted(cfg, static):
    return jax.jit(lambda p, q, i, m, img, c: QFormer(cfg).apply(
        {"params": p}, q, i, m, img, query_cache=c, **dict(static)))


def apply(cfg, params, query=None, ids=None, mask=None, image=None, cache=None, **static):
    """Our Q-Former, jitted per (config, static flags); `cache` is the query K/V cache."""
    if cache is not None:
        static["causal"] = True
    return _jitted(cfg, tuple(sorted(static.items())))(params, query, ids, mask, image, cache)


class Case:
    def __init__(self, freq, layers, nq, t, pad_side):
        self.cfg = our_config(freq, layers)
        self.hf = hf_ref.blip2_retrieval(
            num_query_tokens=nq, seed=freq * 10 + layers,
            qformer=dict(cross_attention_frequency=freq, num_hidden_layers=layers))
        self.params = load_params(self.cfg, self.hf)
        self.nq, self.batch = nq, 3
        ids, mask = hf_ref.text_batch(self.batch, t, seed=layers, pad_side=pad_side)
        self.ids, self.mask = ids, mask
        rng = np.random.default_rng(freq + layers)
        self.image = rng.normal(size=(self.batch, 7, 32)).astype(np.float32)
        self.query = np.broadcast_to(self.hf.query_tokens.detach().numpy(),
                                     (self.batch, nq, 32)).copy()

    # torch views
    @property
    def t_query(self):
        return torch.from_numpy(self.query)

    @property
    def t_image(self):
        return torch.from_numpy(self.image)

    def t_image_mask(self):
        return torch.ones(self.image.shape[:2], dtype=torch.long)

    def t_full_mask(self):
        return torch.cat([torch.ones(self.batch, self.nq, dtype=torch.long),
                          torch.from_numpy(self.mask)], 1)


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request):
    torch.manual_seed(0)
    return Case(*request.param)


@pytest.fixture(scope="module")
def case0():
    """The first case alone, for the (compile-heavy) dropout and remat tests."""
    torch.manual_seed(0)
    return Case(*CASES[0])


def check(ours, ref, tol=TOL, what=""):
    err = hf_ref.rel_err(ours, ref)
    print(f"{what}: rel err {err:.2e}")
    assert np.asarray(ours).shape == tuple(ref.shape), (np.asarray(ours).shape, ref.shape)
    assert err <= tol, f"{what}: rel err {err:.3e} > {tol}"
    return err


# ----------------------------------------------------------------------------------------------
# Parity with HF
# ----------------------------------------------------------------------------------------------
def test_params_tree_matches_init(case):
    """The HF-loaded tree has exactly the structure/shapes our own init creates (queries-only init)."""
    shapes = jax.eval_shape(lambda: init_params(QFormer(case.cfg), jax.random.PRNGKey(0),
                                                jnp.zeros((1, 2, 32)),
                                                image_embeds=jnp.zeros((1, 3, 32))))
    got = jax.tree.map(lambda a: a.shape, case.params)
    assert jax.tree.map(lambda a: a.shape, shapes) == got


def test_queries_vs_hf(case):
    """(a) queries + image cross-attention == HF qformer(query_tokens, encoder_hidden_states)."""
    with torch.no_grad():
        ref = case.hf.qformer(query_embeds=case.t_query, encoder_hidden_states=case.t_image,
                              encoder_attention_mask=case.t_image_mask()).last_hidden_state
    ours, _ = apply(case.cfg, case.params, case.query, image=case.image, return_query_cache=True)
    check(ours, ref.numpy(), what="(a) queries")


def test_query_cache_vs_hf_projections(case):
    """return_query_cache: per-layer self-attention K/V of the queries == HF's key/value outputs."""
    got = {}
    hooks = []
    for i, layer in enumerate(case.hf.qformer.encoder.layer):
        for n in ("key", "value"):
            mod = getattr(layer.attention.attention, n)
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, i=i, n=n: got.__setitem__((i, n), out.detach().numpy())))
    try:
        with torch.no_grad():
            case.hf.qformer(query_embeds=case.t_query, encoder_hidden_states=case.t_image,
                            encoder_attention_mask=case.t_image_mask())
    finally:
        for h in hooks:
            h.remove()
    cfg = case.cfg
    _, cache = apply(cfg, case.params, case.query, image=case.image, return_query_cache=True)
    shape = (cfg.num_layers, case.batch, case.nq, cfg.num_heads, cfg.head_dim)
    for n, short in (("key", "k"), ("value", "v")):
        assert cache[short].shape == shape
        ref = np.stack([got[(i, n)] for i in range(cfg.num_layers)]).reshape(shape)
        check(cache[short], ref, what=f"query cache {short}")


def test_text_only_vs_hf(case):
    """(b) text only (ITC text pass) == HF qformer(embeddings(ids), query_length=0, mask)."""
    ids, mask = torch.from_numpy(case.ids), torch.from_numpy(case.mask)
    with torch.no_grad():
        ref = case.hf.qformer(query_embeds=case.hf.embeddings(input_ids=ids), query_length=0,
                              attention_mask=mask).last_hidden_state
    ours, _ = apply(case.cfg, case.params, None, case.ids, case.mask)
    check(ours, ref.numpy(), what="(b) text only")


def test_bidirectional_vs_hf(case):
    """(c) ITM pass == HF embeddings(ids, query_embeds) → qformer(query_length=Q, image)."""
    ids = torch.from_numpy(case.ids)
    with torch.no_grad():
        emb = case.hf.embeddings(input_ids=ids, query_embeds=case.t_query)
        ref = case.hf.qformer(query_embeds=emb, query_length=case.nq,
                              attention_mask=case.t_full_mask(),
                              encoder_hidden_states=case.t_image,
                              encoder_attention_mask=case.t_image_mask()).last_hidden_state
    ours, _ = apply(case.cfg, case.params, case.query, case.ids, case.mask, case.image)
    check(ours, ref.numpy(), what="(c) bidirectional")


def hf_causal(case):
    ids = torch.from_numpy(case.ids)
    with torch.no_grad():
        emb = case.hf.embeddings(input_ids=ids, query_embeds=case.t_query)
        return case.hf.qformer(query_embeds=emb, query_length=case.nq,
                               attention_mask=hf_ref.unilm_additive_mask(case.nq, case.mask),
                               encoder_hidden_states=case.t_image,
                               encoder_attention_mask=case.t_image_mask()).last_hidden_state


def test_causal_vs_hf_explicit_mask(case):
    """(d) UniLM causal == HF fed the explicit 4-D additive UniLM mask."""
    ref = hf_causal(case).numpy()
    # HF really honoured the 4-D mask: its query rows equal the queries-only pass (they never
    # see the text), which a bidirectional run would not give.
    with torch.no_grad():
        ref_a = case.hf.qformer(query_embeds=case.t_query, encoder_hidden_states=case.t_image,
                                encoder_attention_mask=case.t_image_mask()).last_hidden_state
    assert hf_ref.rel_err(ref[:, :case.nq], ref_a.numpy()) <= 1e-6
    ours, _ = apply(case.cfg, case.params, case.query, case.ids, case.mask, case.image,
                    causal=True)
    check(ours, ref, what="(d) UniLM causal")
    bidir, _ = apply(case.cfg, case.params, case.query, case.ids, case.mask, case.image)
    assert hf_ref.rel_err(bidir, ref) > 1e-3      # the mask matters in this test


def test_causal_from_query_cache_equals_one_call(case):
    """(e) text over the cached query K/V == the text part of (d) (and so HF's), to 1e-6."""
    cfg = case.cfg
    one_call, _ = apply(cfg, case.params, case.query, case.ids, case.mask, case.image, causal=True)
    _, cache = apply(cfg, case.params, case.query, image=case.image, return_query_cache=True)
    ours = apply(cfg, case.params, ids=case.ids, mask=case.mask, cache=cache)[0]
    assert ours.shape == (case.batch, case.ids.shape[1], cfg.hidden_size)
    check(ours, np.asarray(one_call[:, case.nq:]), tol=1e-6, what="(e) cache vs one call")
    check(ours, hf_causal(case).numpy()[:, case.nq:], what="(e) vs HF explicit mask")


def test_image_kv_reuse_and_per_row_images_equal_projecting_again(case):
    """The images' cross-attention K/V returned by a query pass, given to a later pass, and the
    per-row image gather (`image_index`) give what projecting the rows' images again gives, for
    every layer layout (scanned groups, a tail)."""
    first, kv = apply(case.cfg, case.params, case.query, image=case.image, return_image_kv=True)
    crosses = sum(case.cfg.is_cross_attention_layer(i) for i in range(case.cfg.num_layers))
    assert kv["image_k"].shape[:2] == (crosses, case.batch)
    again = apply(case.cfg, case.params, case.query, case.ids, case.mask, case.image)[0]
    got = QFormer(case.cfg).apply({"params": case.params}, case.query, case.ids, case.mask,
                                  image_kv={"k": kv["image_k"], "v": kv["image_v"]})[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(again), rtol=1e-6, atol=1e-6)
    order = np.array([2, 0, 1])          # row b's image is image[order[b]]
    rows = QFormer(case.cfg).apply({"params": case.params}, case.query, case.ids, case.mask,
                                   case.image, image_index=jnp.asarray(order))[0]
    want = apply(case.cfg, case.params, case.query, case.ids, case.mask, case.image[order])[0]
    np.testing.assert_allclose(np.asarray(rows), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(first), np.asarray(
        apply(case.cfg, case.params, case.query, image=case.image)[0]), rtol=0, atol=0)
    # Fewer images than rows, no image_index: consecutive rows share an image, as if repeated.
    one = {n: kv[f"image_{n}"][:, :1] for n in ("k", "v")}
    shared = QFormer(case.cfg).apply({"params": case.params}, case.query, case.ids, case.mask,
                                     image_kv=one)[0]
    want = apply(case.cfg, case.params, case.query, case.ids, case.mask,
                 jnp.repeat(case.image[:1], case.batch, axis=0))[0]
    np.testing.assert_allclose(np.asarray(shared), np.asarray(want), rtol=1e-6, atol=1e-6)
    projected = QFormer(case.cfg).apply({"params": case.params}, case.query, case.ids,
                                        case.mask, case.image[:1])[0]
    np.testing.assert_allclose(np.asarray(projected), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2 images for 3 rows"):
        QFormer(case.cfg).apply({"params": case.params}, case.query, case.ids, case.mask,
                                case.image[:2])


def test_generation_qformer_without_text_input():
    """has_text_input=False (stage-2 Q-Former): no text params, HF keys line up, (a) matches."""
    model = hf_ref.blip2_generation(num_query_tokens=4, seed=3,
                                    qformer=dict(cross_attention_frequency=2, num_hidden_layers=4))
    cfg = our_config(2, 4, has_text_input=False)
    params = load_params(cfg, model)
    assert "word" not in params["embeddings"] and "position" not in params["embeddings"]
    assert "text_ffn" not in params["layers"]["layer_0"]
    assert "cross_attn" not in params["layers"]["layer_1"]
    q = np.broadcast_to(model.query_tokens.detach().numpy(), (2, 4, 32)).copy()
    img = np.random.default_rng(5).normal(size=(2, 9, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model.qformer(query_embeds=torch.from_numpy(q),
                            encoder_hidden_states=torch.from_numpy(img)).last_hidden_state
    ours, cache = apply(cfg, params, q, image=img)
    assert cache is None
    check(ours, ref.numpy(), what="(a) no text input")
    with pytest.raises(ValueError, match="no text input"):
        QFormer(cfg).apply({"params": params}, q, np.ones((2, 3), np.int32), image_embeds=img)


# ----------------------------------------------------------------------------------------------
# Weights, dropout, remat, layout
# ----------------------------------------------------------------------------------------------
def test_save_round_trip_exact(case):
    sd = hf_ref.state_dict_numpy(case.hf)
    ours = {k: v for k, v in sd.items() if k.startswith(("qformer.", "embeddings."))}
    saved = mapping.save(hf_qformer.rules(case.cfg), {"qformer": case.params})
    assert sorted(saved) == sorted(ours)
    for k, v in ours.items():
        assert saved[k].dtype == v.dtype and saved[k].shape == v.shape, k
        assert np.array_equal(saved[k], v), k


def dropout_key(seed):
    return jax.random.key(seed, impl="rbg")     # compiles far faster than threefry on CPU


def test_dropout(case0):
    """Dropout off ⇒ deterministic (rngs ignored); on ⇒ same rng same output, new rng differs."""
    case = case0
    cfg = case.cfg
    assert cfg.hidden_dropout > 0 and cfg.attention_dropout > 0
    args = (case.query, case.ids, case.mask, case.image)

    def runner(c, det, text_only=False):
        a = (None, case.ids, case.mask, None) if text_only else args
        return jax.jit(lambda p, rng: QFormer(c).apply({"params": p}, *a, deterministic=det,
                                                       rngs={"dropout": rng})[0])

    off = runner(cfg, True)
    det0, det1 = off(case.params, dropout_key(0)), off(case.params, dropout_key(1))
    np.testing.assert_array_equal(det0, det1)
    np.testing.assert_array_equal(det0, apply(cfg, case.params, *args)[0])
    on = runner(cfg, False)
    r0, r0b, r1 = (on(case.params, dropout_key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(r0, r0b)
    assert hf_ref.rel_err(r0, r1) > 1e-2
    assert hf_ref.rel_err(r0, det0) > 1e-2
    # attention-probability dropout alone acts too (text-only pass: cheapest graph)
    att = runner(dataclasses.replace(cfg, hidden_dropout=0.0), False, text_only=True)
    a0, a1 = att(case.params, dropout_key(0)), att(case.params, dropout_key(1))
    assert hf_ref.rel_err(a0, a1) > 1e-3


def test_remat_full_equal(case0):
    """remat_policy="full": same loss and gradients as no remat."""
    case = case0
    cfg_r = dataclasses.replace(case.cfg, remat_policy="full")
    args = (case.query, case.ids, case.mask, case.image)

    def loss(cfg):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(jnp.square(QFormer(cfg).apply({"params": p}, *args)[0]))))

    v0, g0 = loss(case.cfg)(case.params)
    v1, g1 = loss(cfg_r)(case.params)
    assert float(v0) == pytest.approx(float(v1), rel=1e-6)
    # the whole gradient agrees; per leaf up to float noise (key biases have ~0 gradient)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])   # noqa: E731
    assert hf_ref.rel_err(flat(g1), flat(g0)) <= 1e-6
    scale = float(np.abs(flat(g0)).max())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale),
                 g1, g0)


def test_layout_and_argument_errors():
    q, img = jnp.zeros((1, 2, 32)), jnp.zeros((1, 3, 32))
    with pytest.raises(ValueError, match="cross_attention_frequency must be >= 1"):
        jax.eval_shape(lambda: init_params(QFormer(our_config(0, 3)), jax.random.PRNGKey(0), q,
                                           image_embeds=img))
    m = QFormer(TINY_QFORMER)
    params = jax.eval_shape(lambda: init_params(m, jax.random.PRNGKey(0), q, image_embeds=img))
    ids = jnp.ones((1, 4), jnp.int32)
    cache = {"k": jnp.zeros((2, 1, 2, 4, 8)), "v": jnp.zeros((2, 1, 2, 4, 8))}
    with pytest.raises(ValueError, match="causal=True"):
        jax.eval_shape(lambda p: m.apply({"params": p}, None, ids, query_cache=cache), params)
    with pytest.raises(ValueError, match="image_embeds"):
        jax.eval_shape(lambda p: m.apply({"params": p}, q), params)
    with pytest.raises(ValueError, match="needs input_ids"):
        jax.eval_shape(lambda p: m.apply({"params": p}, q, None, jnp.ones((1, 2)), img), params)


def test_word_embedding_accessor(case):
    """`word_embedding()` (for the tied ITG head) gives the table, also inside a parent's init."""
    table = QFormer(case.cfg).apply({"params": case.params}, method=lambda m: m.word_embedding())
    np.testing.assert_array_equal(table, case.params["embeddings"]["word"]["embedding"])

    class Parent(nn.Module):
        cfg: QFormerConfig

        @nn.compact
        def __call__(self, ids):
            qf = QFormer(self.cfg, name="qformer")
            h, _ = qf(input_ids=ids)
            return h @ qf.word_embedding().T

    parent = Parent(case.cfg)
    shapes = jax.eval_shape(lambda: init_params(parent, jax.random.PRNGKey(0), case.ids))
    assert shapes["qformer"]["embeddings"]["word"]["embedding"].shape == (TINY_QFORMER.vocab_size,
                                                                          32)
