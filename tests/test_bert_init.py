"""Stage-1 Q-Former initialised from BERT (blip2_jax/convert/bert_qformer.py) against HF BERT.

A tiny random HF `BertForMaskedLM` (4 layers, cross_attention_frequency 2, so the scanned groups
and the layers without cross-attention are both exercised) is saved with safetensors; our Q-Former
is initialised from it. Proven: the text-only Q-Former pass is BERT's last_hidden_state, our ITG
head reproduces BERT's MLM logits, the query FFN is a copy of the text FFN, the [DEC] row is added
and fresh while every other embedding row is BERT's, the fresh leaves carry BERT's init, a
`BertModel` checkpoint (no prefix, no MLM head) reports a fresh lm_head, legacy
`LayerNorm.gamma/beta` names load, and unknown / missing keys, config fields and tensor shapes
that do not fit fail naming what is wrong.

LAVIS's Q-Former embeddings have no token types (BertEmbeddings without token_type_embeddings), so
the reference BERT runs with its token-type table zeroed after the checkpoint is saved: the
checkpoint holds a random one, which must be (and is reported as) ignored.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

import hf_ref
from blip2_jax.config import PRESETS, TINY_QFORMER, ConfigError
from blip2_jax.convert import mapping
from blip2_jax.convert.bert_qformer import init_qformer_from_bert
from blip2_jax.convert.mapping import MappingError
from blip2_jax.models.blip2 import Blip2Module, QFormerLMHead
from blip2_jax.models import blip2 as blip2_model

TOL = 1e-5
BERT_VOCAB = 99            # ours: 100 = BERT + [DEC]
LAYERS, FREQ = 4, 2
CFG = PRESETS["tiny-stage1"].replace(qformer=dataclasses.replace(
    TINY_QFORMER, vocab_size=BERT_VOCAB + 1, num_layers=LAYERS, cross_attention_frequency=FREQ))
GROUP_LEAVES = ("fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias")


def bert_config(**kw) -> BertConfig:
    c = BertConfig(**dict(dict(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                               num_attention_heads=4, intermediate_size=37,
                               max_position_embeddings=64), **kw))
    c._attn_implementation = "eager"
    return c


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    """(directory of a saved random BertForMaskedLM, the model with token types zeroed)."""
    path = str(tmp_path_factory.mktemp("bert_mlm"))
    with hf_ref.one_torch_thread():
        model = hf_ref.randomize(BertForMaskedLM(bert_config()), seed=0)
    model.save_pretrained(path, safe_serialization=True)
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.zero_()
    return path, model


@pytest.fixture(scope="module")
def given():
    """A full param tree of 7s: what `params=` must keep outside the Q-Former."""
    return jax.tree.map(lambda a: np.full(a.shape, 7, a.dtype), blip2_model.abstract_params(CFG))


@pytest.fixture(scope="module")
def loaded(mlm, given):
    """(params, report) with `given` for everything outside the Q-Former (no model init)."""
    return init_qformer_from_bert(CFG, mlm[0], jax.random.PRNGKey(0), params=given)


def bert_sd(model) -> dict:
    return hf_ref.state_dict_numpy(model)


def edited(src: str, dst: str, edit) -> str:
    """A copy of checkpoint directory `src` at `dst` with `edit(tensors)` applied."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


@jax.jit
def text_hidden(params, ids, mask):
    return Blip2Module(CFG).apply({"params": params}, ids, mask, method="text_embeds")[0]


def test_text_path_is_bert(mlm, loaded):
    path, model = mlm
    params, report = loaded
    ids, mask = hf_ref.text_batch(3, 7, seed=1)
    ours = text_hidden(params, ids, mask)
    with torch.no_grad(), hf_ref.one_torch_thread():
        ref = model.bert(input_ids=torch.from_numpy(ids),
                         attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert hf_ref.rel_err(ours, ref) < TOL
    assert report.ignored == ("bert.embeddings.token_type_embeddings.weight",)
    assert report.loaded == 4 + 16 * LAYERS + 5


def test_mlm_head_logits_are_bert(mlm, loaded):
    path, model = mlm
    params, _ = loaded
    ids, mask = hf_ref.text_batch(3, 7, seed=2)
    word = params["qformer"]["embeddings"]["word"]["embedding"]
    ours = np.asarray(QFormerLMHead(CFG.qformer).apply(
        {"params": params["lm_head"]}, text_hidden(params, ids, mask), word))
    with torch.no_grad(), hf_ref.one_torch_thread():
        ref = model(input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert ours.shape == ref.shape[:2] + (BERT_VOCAB + 1,)
    assert hf_ref.rel_err(ours[..., :BERT_VOCAB], ref) < TOL
    bias = np.asarray(params["lm_head"]["bias"])
    np.testing.assert_array_equal(bias[:BERT_VOCAB], bert_sd(model)["cls.predictions.bias"])
    assert bias[BERT_VOCAB] == 0


def test_query_ffn_is_a_copy_of_the_text_ffn(mlm, loaded):
    params, report = loaded
    flat = mapping.flatten(params)
    want = []
    for j in range(FREQ):
        p = f"qformer/layers/layer_{j}"
        for leaf in GROUP_LEAVES:
            np.testing.assert_array_equal(flat[f"{p}/query_ffn/{leaf}"],
                                          flat[f"{p}/text_ffn/{leaf}"])
            want.append(f"{p}/query_ffn/{leaf}")
        for leaf in ("scale", "bias"):
            np.testing.assert_array_equal(flat[f"{p}/query_ffn_ln/{leaf}"],
                                          flat[f"{p}/text_ffn_ln/{leaf}"])
            want.append(f"{p}/query_ffn_ln/{leaf}")
    assert report.copied == tuple(sorted(want))
    # scan layout: group g, layer j is BERT layer g * FREQ + j
    sd = bert_sd(mlm[1])
    np.testing.assert_array_equal(flat["qformer/layers/layer_1/query_ffn/fc1/kernel"][1],
                                  sd["bert.encoder.layer.3.intermediate.dense.weight"].T)


def test_dec_row_added_and_bert_rows_kept(mlm, loaded):
    params, report = loaded
    emb = np.asarray(params["qformer"]["embeddings"]["word"]["embedding"])
    assert emb.shape == (BERT_VOCAB + 1, 32)
    np.testing.assert_array_equal(emb[:BERT_VOCAB],
                                  bert_sd(mlm[1])["bert.embeddings.word_embeddings.weight"])
    assert 0.005 < emb[BERT_VOCAB].std() < 0.05          # normal(0, 0.02), not BERT's 0.1
    assert f"qformer/embeddings/word/embedding[{BERT_VOCAB}]" in report.fresh
    assert f"lm_head/bias[{BERT_VOCAB}]" in report.fresh


def test_fresh_leaves_have_bert_init(loaded):
    params, report = loaded
    flat = mapping.flatten(params)
    cross = sorted(k for k in flat if "/cross_" in k)
    assert set(report.fresh) == set(cross) | {
        "query_tokens", f"qformer/embeddings/word/embedding[{BERT_VOCAB}]",
        f"lm_head/bias[{BERT_VOCAB}]"}
    for k in cross:
        a = np.asarray(flat[k])
        if k.endswith("kernel"):
            assert 0.017 < a.std() < 0.023 and abs(a.mean()) < 0.003, k
        elif k.endswith("scale"):
            np.testing.assert_array_equal(a, 1)
        else:
            np.testing.assert_array_equal(a, 0)
    assert 0.01 < np.asarray(flat["query_tokens"]).std() < 0.03


def test_given_params_keep_everything_else(loaded, given):
    for k, v in mapping.flatten(loaded[0]).items():
        if not (k.startswith(("qformer/", "lm_head/")) or k == "query_tokens"):
            np.testing.assert_array_equal(v, 7, err_msg=k)
    assert all(np.all(np.asarray(v) == 7) for v in jax.tree.leaves(given))   # not modified


def test_without_params_the_rest_is_initialised(mlm, loaded):
    """params=None: the same Q-Former (same rng), everything else from the model's own init."""
    params, report = init_qformer_from_bert(CFG, mlm[0], jax.random.PRNGKey(0))
    mapping.check_params(CFG, params)
    assert report == loaded[1]
    ref = mapping.flatten(loaded[0])
    for k, v in mapping.flatten(params).items():
        if k.startswith(("qformer/", "lm_head/")) or k == "query_tokens":
            np.testing.assert_array_equal(v, ref[k], err_msg=k)
    assert float(params["temp"]) == pytest.approx(0.07)
    assert np.asarray(params["itm_head"]["kernel"]).std() > 0


def test_bert_model_checkpoint_reports_fresh_lm_head(tmp_path, mlm, given):
    with hf_ref.one_torch_thread():
        model = hf_ref.randomize(BertModel(bert_config()), seed=3)       # keys without "bert."
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    params, report = init_qformer_from_bert(CFG, str(tmp_path), 0, params=given)
    head = ("lm_head/bias", "lm_head/ln/bias", "lm_head/ln/scale", "lm_head/transform/bias",
            "lm_head/transform/kernel")
    assert set(head) <= set(report.fresh)
    assert not any(f.startswith("lm_head/bias[") for f in report.fresh)
    assert report.ignored == ("embeddings.token_type_embeddings.weight", "pooler.dense.bias",
                              "pooler.dense.weight")
    assert report.loaded == 4 + 16 * LAYERS
    np.testing.assert_array_equal(params["lm_head"]["bias"], 0)
    np.testing.assert_array_equal(params["qformer"]["embeddings"]["word"]["embedding"][:BERT_VOCAB],
                                  bert_sd(model)["embeddings.word_embeddings.weight"])


def test_legacy_layernorm_names_and_tied_decoder(tmp_path, mlm, loaded, given):
    """The hub's bert-base-uncased file: `LayerNorm.gamma/beta` names, a tied decoder copy."""
    def edit(t):
        for k in [k for k in t if "LayerNorm." in k]:
            t[k.replace(".weight", ".gamma").replace(".bias", ".beta")] = t.pop(k)
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].copy()
        t["bert.embeddings.position_ids"] = np.arange(64)[None]
    path = edited(mlm[0], str(tmp_path / "legacy"), edit)
    params, report = init_qformer_from_bert(CFG, path, 0, params=given)
    assert report.ignored == ("bert.embeddings.position_ids",
                              "bert.embeddings.token_type_embeddings.weight",
                              "cls.predictions.decoder.weight")
    for k, v in mapping.flatten(loaded[0]).items():
        if k.startswith(("qformer/", "lm_head/")):
            np.testing.assert_array_equal(mapping.flatten(params)[k], v, err_msg=k)


def test_unknown_and_missing_keys_fail_naming_them(tmp_path, mlm):
    def extra(t):
        t["bert.encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
        t["cls.mystery"] = np.zeros(3, np.float32)

    def missing(t):
        del t["bert.encoder.layer.3.output.dense.bias"]
        del t["cls.predictions.transform.dense.bias"]     # head present but incomplete

    with pytest.raises(MappingError) as e:
        init_qformer_from_bert(CFG, edited(mlm[0], str(tmp_path / "extra"), extra), 0)
    assert "unexpected keys (2)" in str(e.value)
    assert "bert.encoder.layer.0.attention.self.rotary.weight" in str(e.value)
    assert "cls.mystery" in str(e.value)
    with pytest.raises(MappingError) as e:
        init_qformer_from_bert(CFG, edited(mlm[0], str(tmp_path / "missing"), missing), 0)
    assert "missing keys (2)" in str(e.value)
    assert "bert.encoder.layer.3.output.dense.bias" in str(e.value)
    assert "cls.predictions.transform.dense.bias" in str(e.value)


def test_config_mismatch_names_each_field(tmp_path, mlm):
    bert_config(hidden_size=48, vocab_size=BERT_VOCAB + 1).to_json_file(
        str(tmp_path / "config.json"))
    with pytest.raises(ConfigError) as e:
        init_qformer_from_bert(CFG, str(tmp_path), 0)
    msg = str(e.value)
    assert "hidden_size: BERT 48, Q-Former hidden_size 32" in msg
    assert "vocab_size: BERT 100 + 1 ([DEC]) = 101, Q-Former vocab_size 100" in msg
    assert "num_hidden_layers" not in msg


def test_shape_mismatch_names_key_and_shapes(tmp_path, mlm):
    """config.json agrees, a tensor does not (the config cannot be trusted to catch it)."""
    def edit(t):
        t["bert.encoder.layer.2.attention.self.query.weight"] = np.zeros((48, 32), np.float32)
        t["bert.embeddings.word_embeddings.weight"] = np.zeros((BERT_VOCAB + 1, 32), np.float32)
    with pytest.raises(MappingError) as e:
        init_qformer_from_bert(CFG, edited(mlm[0], str(tmp_path / "shape"), edit), 0)
    msg = str(e.value)
    assert "bert.encoder.layer.2.attention.self.query.weight: checkpoint (48, 32), model needs " \
           "(32, 32)" in msg
    assert "bert.embeddings.word_embeddings.weight: checkpoint (100, 32), model needs (99, 32)" \
           in msg


def test_pytorch_bin_checkpoint_loads_the_same(tmp_path, mlm, loaded, given):
    """A `pytorch_model.bin` BERT (read by the safe torch-free reader) gives the same Q-Former."""
    os.makedirs(tmp_path / "bin")
    shutil.copy(os.path.join(mlm[0], "config.json"), tmp_path / "bin")
    tensors = load_file(os.path.join(mlm[0], "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
               tmp_path / "bin" / "pytorch_model.bin")
    params, report = init_qformer_from_bert(CFG, str(tmp_path / "bin"), jax.random.PRNGKey(0),
                                            params=given)
    jax.tree.map(np.testing.assert_array_equal, params, loaded[0])
    assert report.loaded == loaded[1].loaded
