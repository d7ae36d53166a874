"""Tests of the test-side LAVIS layout helper (`tests/lavis_layout.py`), layouts only.

The expected LAVIS key lists below are written from spec §7.1 (and, for the frozen LLMs, from the
transformers-4.26 OPT/T5 module structure), independently of both `lavis_layout` and our converter.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          OPTForCausalLM, T5ForConditionalGeneration)

import hf_ref
import lavis_layout as ll

WB = ("weight", "bias")


# ----------------------------------------------------------------------------------------------
# fixtures: tiny HF reference models
# ----------------------------------------------------------------------------------------------
def _info(model) -> dict:
    cfg = model.config
    info = dict(n_vit=cfg.vision_config.num_hidden_layers, n_q=cfg.qformer_config.num_hidden_layers,
                freq=cfg.qformer_config.cross_attention_frequency,
                d_vis=cfg.vision_config.hidden_size, hidden=cfg.qformer_config.hidden_size,
                n_pos=cfg.qformer_config.max_position_embeddings,
                vocab=cfg.qformer_config.vocab_size)
    text = getattr(cfg, "text_config", None)
    if text is not None and hasattr(text, "num_decoder_layers"):
        info.update(n_llm=text.num_layers, n_llm_dec=text.num_decoder_layers)
    elif text is not None:
        info.update(n_llm=text.num_hidden_layers)
    return info


@pytest.fixture(scope="module")
def models():
    with hf_ref.one_torch_thread():
        built = {
            "stage1": hf_ref.blip2_retrieval(),
            "opt": hf_ref.blip2_generation("opt"),
            "t5": hf_ref.blip2_generation("t5"),
            # vision width != Q-Former width, 3 Q-Former layers with cross-attention every 2nd
            "stage1_odd": hf_ref.blip2_retrieval(
                vision=dict(hidden_size=24, num_attention_heads=4),
                qformer=dict(encoder_hidden_size=24, num_hidden_layers=3,
                             cross_attention_frequency=2)),
        }
        # hf_ref.randomize draws the whole fused qkv bias; a LAVIS-born model has no key bias
        return {k: (ll.zero_key_bias(hf_ref.state_dict_numpy(m)), _info(m))
                for k, m in built.items()}


def kind_of(name: str) -> str:
    return "stage1" if name.startswith("stage1") else name


def lavis(models, name, **kw):
    sd, info = models[name]
    if kind_of(name) != "stage1":
        kw.setdefault("max_position_embeddings", info["n_pos"])
    return ll.hf_to_lavis(sd, kind_of(name), **kw)


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(set(a) - set(b)) == [] and sorted(set(b) - set(a)) == []
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


# ----------------------------------------------------------------------------------------------
# expected LAVIS key sets, written from §7.1
# ----------------------------------------------------------------------------------------------
def opt_426_keys(n_layers: int) -> set[str]:
    """transformers-4.26 `OPTForCausalLM.state_dict()` (lm_head listed although tied)."""
    p = "model.decoder."
    keys = {p + "embed_tokens.weight", p + "embed_positions.weight", "lm_head.weight"}
    keys |= {f"{p}final_layer_norm.{w}" for w in WB}
    for i in range(n_layers):
        l = f"{p}layers.{i}."
        mods = [f"self_attn.{x}_proj" for x in ("k", "v", "q", "out")]
        mods += ["self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"]
        keys |= {f"{l}{m}.{w}" for m in mods for w in WB}
    return keys


def t5_426_keys(n_enc: int, n_dec: int) -> set[str]:
    """transformers-4.26 gated (FlanT5) `T5ForConditionalGeneration.state_dict()`."""
    keys = {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "lm_head.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}
    ffn = [f"DenseReluDense.{x}.weight" for x in ("wi_0", "wi_1", "wo")]
    for stack, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            b = f"{stack}.block.{i}.layer."
            keys |= {f"{b}0.SelfAttention.{x}.weight" for x in "qkvo"} | {f"{b}0.layer_norm.weight"}
            if i == 0:
                keys.add(f"{b}0.SelfAttention.relative_attention_bias.weight")
            ff = 1
            if stack == "decoder":
                keys |= {f"{b}1.EncDecAttention.{x}.weight" for x in "qkvo"}
                keys.add(f"{b}1.layer_norm.weight")
                ff = 2
            keys |= {f"{b}{ff}.{x}" for x in ffn} | {f"{b}{ff}.layer_norm.weight"}
    return keys


def expected_lavis_keys(kind: str, info: dict) -> set[str]:
    keys = {"query_tokens", "visual_encoder.cls_token", "visual_encoder.pos_embed",
            "Qformer.bert.embeddings.position_ids"}
    keys |= {f"visual_encoder.patch_embed.proj.{w}" for w in WB}
    keys |= {f"ln_vision.{w}" for w in WB} | {f"Qformer.bert.embeddings.LayerNorm.{w}" for w in WB}
    for i in range(info["n_vit"]):
        b = f"visual_encoder.blocks.{i}."
        keys |= {b + "attn.qkv.weight", b + "attn.q_bias", b + "attn.v_bias"}  # no key bias
        keys |= {f"{b}{m}.{w}" for m in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                 for w in WB}
    for i in range(info["n_q"]):
        l = f"Qformer.bert.encoder.layer.{i}."
        att = [f"self.{x}" for x in ("query", "key", "value")] + ["output.dense",
                                                                  "output.LayerNorm"]
        mods = ["attention." + a for a in att]
        if i % info["freq"] == 0:
            mods += ["crossattention." + a for a in att]
        mods += ["intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
        if kind == "stage1":
            mods += ["intermediate.dense", "output.dense", "output.LayerNorm"]
        keys |= {f"{l}{m}.{w}" for m in mods for w in WB}
    if kind == "stage1":
        keys |= {"temp", "Qformer.bert.embeddings.word_embeddings.weight",
                 "Qformer.bert.embeddings.position_embeddings.weight"}
        c = "Qformer.cls.predictions."
        keys |= {c + "bias", c + "decoder.weight", c + "decoder.bias"}
        keys |= {f"{c}transform.{m}.{w}" for m in ("dense", "LayerNorm") for w in WB}
        keys |= {f"{h}.{w}" for h in ("vision_proj", "text_proj", "itm_head") for w in WB}
    elif kind == "opt":
        keys |= {f"opt_proj.{w}" for w in WB}
        keys |= {"opt_model." + k for k in opt_426_keys(info["n_llm"])}
    else:
        keys |= {f"t5_proj.{w}" for w in WB}
        keys |= {"t5_model." + k for k in t5_426_keys(info["n_llm"], info["n_llm_dec"])}
    return keys


# ----------------------------------------------------------------------------------------------
# round trip and key layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["stage1", "opt", "t5", "stage1_odd"])
def test_round_trip_bitwise(models, name):
    """lavis_to_hf(hf_to_lavis(sd)) == sd for every HF key. HF has no key LAVIS lacks; the LAVIS
    extras (position_ids; stage 1: temp, Qformer.cls.*) are exactly the ones convert drops."""
    sd, info = models[name]
    kind = kind_of(name)
    lv = lavis(models, name)
    assert_bitwise_equal(ll.lavis_to_hf(lv, kind), sd)
    # key counts: one fused qkv.bias per block becomes q_bias + v_bias; + position_ids;
    # stage 1: + temp + 7 Qformer.cls.predictions.* keys
    extra = 1 + (1 + 7 if kind == "stage1" else 0)
    assert len(lv) == len(sd) + info["n_vit"] + extra
    assert len([k for k in lv if k.startswith("Qformer.cls.")]) == (7 if kind == "stage1" else 0)


@pytest.mark.parametrize("name", ["stage1", "opt", "t5", "stage1_odd"])
def test_keys_match_spec(models, name):
    _, info = models[name]
    lv = lavis(models, name)
    assert set(lv) == expected_lavis_keys(kind_of(name), info)
    assert not any(k.endswith(("k_bias", "qkv.bias")) for k in lv if k.startswith("visual_"))


def test_shapes_and_buffers_stage1(models):
    _, info = models["stage1_odd"]
    lv = lavis(models, "stage1_odd")
    d, h, v, p = info["d_vis"], info["hidden"], info["vocab"], info["n_pos"]
    assert (d, h) == (24, 32)
    want = {
        "visual_encoder.cls_token": (1, 1, d), "visual_encoder.pos_embed": (1, 26, d),
        "visual_encoder.patch_embed.proj.weight": (d, 3, 6, 6),
        "visual_encoder.blocks.1.attn.qkv.weight": (3 * d, d),
        "visual_encoder.blocks.1.attn.q_bias": (d,), "visual_encoder.blocks.1.attn.v_bias": (d,),
        "ln_vision.weight": (d,),
        "Qformer.bert.embeddings.word_embeddings.weight": (v, h),
        "Qformer.bert.embeddings.position_embeddings.weight": (p, h),
        "Qformer.bert.encoder.layer.0.crossattention.self.query.weight": (h, h),
        "Qformer.bert.encoder.layer.2.crossattention.self.key.weight": (h, d),
        "Qformer.bert.encoder.layer.2.crossattention.self.value.weight": (h, d),
        "Qformer.cls.predictions.bias": (v,), "Qformer.cls.predictions.decoder.weight": (v, h),
        "Qformer.cls.predictions.transform.dense.weight": (h, h),
        "query_tokens": (1, 4, h), "vision_proj.weight": (16, h), "text_proj.weight": (16, h),
        "itm_head.weight": (2, h), "temp": (),
    }
    for k, shape in want.items():
        assert lv[k].shape == shape, k
    ids = lv["Qformer.bert.embeddings.position_ids"]
    assert ids.dtype == np.int64 and np.array_equal(ids, np.arange(p)[None])
    assert lv["temp"].dtype == np.float32 and lv["temp"] == np.float32(0.07)
    c = "Qformer.cls.predictions."
    assert np.array_equal(lv[c + "decoder.weight"],
                          lv["Qformer.bert.embeddings.word_embeddings.weight"])
    assert np.array_equal(lv[c + "decoder.bias"], lv[c + "bias"])
    # all float tensors keep the HF dtype
    assert {a.dtype for k, a in lv.items() if k != "Qformer.bert.embeddings.position_ids"} == \
        {np.dtype(np.float32)}


def test_qkv_bias_split(models):
    sd, info = models["stage1"]
    lv = lavis(models, "stage1")
    d = info["d_vis"]
    qkv = sd["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    assert np.array_equal(lv["visual_encoder.blocks.1.attn.q_bias"], qkv[:d])
    assert np.array_equal(lv["visual_encoder.blocks.1.attn.v_bias"], qkv[2 * d:])
    back = ll.lavis_to_hf(lv, "stage1")["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    assert np.all(back[d:2 * d] == 0)


def test_layer_and_name_mapping_spotchecks(models):
    sd, _ = models["stage1_odd"]
    lv = lavis(models, "stage1_odd")
    pairs = {
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.encoder.layers.1.layer_norm2.bias": "visual_encoder.blocks.1.norm2.bias",
        "vision_model.encoder.layers.0.self_attn.projection.weight":
            "visual_encoder.blocks.0.attn.proj.weight",
        "vision_model.post_layernorm.weight": "ln_vision.weight",
        "qformer.layernorm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
        "qformer.encoder.layer.2.attention.attention.key.weight":
            "Qformer.bert.encoder.layer.2.attention.self.key.weight",
        "qformer.encoder.layer.2.crossattention.attention.value.bias":
            "Qformer.bert.encoder.layer.2.crossattention.self.value.bias",
        "qformer.encoder.layer.1.output_query.LayerNorm.weight":
            "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight",
        "qformer.encoder.layer.1.intermediate.dense.weight":
            "Qformer.bert.encoder.layer.1.intermediate.dense.weight",
        "embeddings.word_embeddings.weight": "Qformer.bert.embeddings.word_embeddings.weight",
        "vision_projection.bias": "vision_proj.bias",
        "text_projection.weight": "text_proj.weight",
        "itm_head.weight": "itm_head.weight",
    }
    for h, l in pairs.items():
        assert np.array_equal(sd[h], lv[l]), (h, l)
    assert "Qformer.bert.encoder.layer.1.crossattention.self.query.weight" not in lv
    osd, _ = models["opt"]
    olv = lavis(models, "opt")
    assert np.array_equal(osd["language_projection.weight"], olv["opt_proj.weight"])
    assert np.array_equal(osd["language_model.model.decoder.layers.1.fc2.bias"],
                          olv["opt_model.model.decoder.layers.1.fc2.bias"])
    tsd, _ = models["t5"]
    tlv = lavis(models, "t5")
    assert np.array_equal(tsd["language_projection.bias"], tlv["t5_proj.bias"])
    assert np.array_equal(tsd["language_model.lm_head.weight"], tlv["t5_model.lm_head.weight"])


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_stage2_text_parts_removed(models, name):
    lv = lavis(models, name)
    assert "Qformer.bert.embeddings.position_ids" in lv
    assert lv["Qformer.bert.embeddings.position_ids"].shape == (1, models[name][1]["n_pos"])
    assert not any("word_embeddings" in k or "position_embeddings" in k for k in lv)
    assert not any(k.startswith("Qformer.cls") for k in lv)
    assert not any(k.startswith(("temp", "vision_proj", "text_proj", "itm_head")) for k in lv)
    ffn = [k for k in lv if k.startswith("Qformer.") and
           (".intermediate." in k or ".output.dense" in k or ".output.LayerNorm" in k)
           and "attention.output" not in k]
    assert ffn == []
    assert any(".intermediate_query." in k for k in lv) and any(".output_query." in k for k in lv)


def test_stage2_default_position_ids_is_bert_base(models):
    sd, _ = models["opt"]
    lv = ll.hf_to_lavis(sd, "opt")
    assert lv["Qformer.bert.embeddings.position_ids"].shape == (1, 512)


def test_stage1_position_table_mismatch_raises(models):
    sd, _ = models["stage1"]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ll.hf_to_lavis(sd, "stage1", max_position_embeddings=512)


def test_llm_key_sets_transformers5_equal_426(models):
    """transformers 5 `state_dict()` lists tied copies (lm_head; T5 embed_tokens) like 4.26 did."""
    _, info = models["opt"]
    with hf_ref.one_torch_thread():
        opt = OPTForCausalLM(hf_ref.opt_config())
        t5 = T5ForConditionalGeneration(hf_ref.t5_config())
    assert set(opt.state_dict()) == opt_426_keys(info["n_llm"])
    assert len(dict(opt.named_parameters())) == len(opt.state_dict()) - 1
    assert set(t5.state_dict()) == t5_426_keys(2, 2)
    assert len(dict(t5.named_parameters())) == len(t5.state_dict()) - 3
    assert {k[len("opt_model."):] for k in lavis(models, "opt") if k.startswith("opt_model.")} \
        == set(opt.state_dict())
    assert {k[len("t5_model."):] for k in lavis(models, "t5") if k.startswith("t5_model.")} \
        == set(t5.state_dict())


def test_t5_untied_lm_head_option(models):
    sd, _ = models["t5"]
    shared = sd["language_model.shared.weight"]
    assert np.array_equal(sd["language_model.lm_head.weight"], shared)  # transformers 5 ties it
    head = np.random.default_rng(3).normal(size=shared.shape).astype(np.float32)
    lv = lavis(models, "t5", lm_head=head)
    assert np.array_equal(lv["t5_model.lm_head.weight"], head)
    assert np.array_equal(lv["t5_model.shared.weight"], shared)
    back = ll.lavis_to_hf(lv, "t5")
    assert np.array_equal(back.pop("language_model.lm_head.weight"), head)
    assert_bitwise_equal(back, {k: v for k, v in sd.items()
                                if k != "language_model.lm_head.weight"})
    with pytest.raises(ValueError):
        lavis(models, "opt", lm_head=head)


# ----------------------------------------------------------------------------------------------
# cls head, temp, aliasing
# ----------------------------------------------------------------------------------------------
def test_cls_head_random_is_seeded(models):
    a, b = lavis(models, "stage1", seed=1), lavis(models, "stage1", seed=1)
    c = lavis(models, "stage1", seed=2)
    key = "Qformer.cls.predictions.transform.dense.weight"
    assert np.array_equal(a[key], b[key]) and not np.array_equal(a[key], c[key])
    ln = a["Qformer.cls.predictions.transform.LayerNorm.weight"]
    assert abs(float(ln.mean()) - 1.0) < 0.2


def test_cls_head_given_and_temp(models):
    _, info = models["stage1"]
    h, v = info["hidden"], info["vocab"]
    rng = np.random.default_rng(7)
    head = {"bias": rng.normal(size=v), "transform.dense.weight": rng.normal(size=(h, h)),
            "transform.dense.bias": rng.normal(size=h),
            "Qformer.cls.predictions.transform.LayerNorm.weight": rng.normal(size=h),
            "transform.LayerNorm.bias": rng.normal(size=h)}
    head = {k: x.astype(np.float32) for k, x in head.items()}
    lv = lavis(models, "stage1", cls_head=head, temp=0.05)
    c = "Qformer.cls.predictions."
    assert np.array_equal(lv[c + "bias"], head["bias"])
    assert np.array_equal(lv[c + "decoder.bias"], head["bias"])
    assert np.array_equal(lv[c + "transform.LayerNorm.weight"],
                          head["Qformer.cls.predictions.transform.LayerNorm.weight"])
    assert lv["temp"] == np.float32(0.05) and lv["temp"].shape == ()
    with pytest.raises(ValueError):
        lavis(models, "stage1", cls_head={"bias": head["bias"]})
    bad = dict(head, bias=np.zeros(v + 1, np.float32))
    with pytest.raises(ValueError):
        lavis(models, "stage1", cls_head=bad)


def test_outputs_do_not_alias_inputs(models):
    sd, _ = models["stage1"]
    before = sd["query_tokens"].copy()
    lv = ll.hf_to_lavis(sd, "stage1")
    lv["query_tokens"] += 1
    assert np.array_equal(sd["query_tokens"], before)
    hf = ll.lavis_to_hf(lv, "stage1")
    hf["query_tokens"] += 1
    assert np.array_equal(lv["query_tokens"], before + 1)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_zero_key_bias_and_raw_hf_ref_raises(models):
    with hf_ref.one_torch_thread():
        raw = hf_ref.state_dict_numpy(hf_ref.blip2_generation("opt"))
    with pytest.raises(ValueError, match="key bias"):
        ll.hf_to_lavis(raw, "opt")
    fixed = ll.zero_key_bias(raw)
    d = models["opt"][1]["d_vis"]
    k = "vision_model.encoder.layers.0.self_attn.qkv.bias"
    assert np.all(fixed[k][d:2 * d] == 0) and np.any(raw[k][d:2 * d] != 0)
    assert np.array_equal(fixed[k][:d], raw[k][:d])
    assert np.array_equal(fixed[k][2 * d:], raw[k][2 * d:])
    assert all(np.array_equal(fixed[x], raw[x]) for x in raw if not x.endswith("qkv.bias"))


def test_nonzero_key_bias_raises(models):
    sd, info = models["opt"]
    d = info["d_vis"]
    bad = dict(sd)
    qkv = sd["vision_model.encoder.layers.1.self_attn.qkv.bias"].copy()
    qkv[d + 3] = 1e-6
    bad["vision_model.encoder.layers.1.self_attn.qkv.bias"] = qkv
    with pytest.raises(ValueError, match="key bias"):
        ll.hf_to_lavis(bad, "opt")


def test_wrong_kind_or_leftovers_raise(models):
    sd, _ = models["stage1"]
    lv = lavis(models, "stage1")
    with pytest.raises((ValueError, KeyError)):
        ll.lavis_to_hf(lv, "opt")  # text parts would be unexpected in Blip2ForConditionalGeneration
    olv = lavis(models, "opt")
    extra = dict(olv)
    extra["Qformer.bert.embeddings.word_embeddings.weight"] = \
        lv["Qformer.bert.embeddings.word_embeddings.weight"]
    with pytest.raises(ValueError, match="would not accept"):
        ll.lavis_to_hf(extra, "opt")
    missing = dict(olv)
    del missing["ln_vision.weight"]
    with pytest.raises(KeyError):
        ll.lavis_to_hf(missing, "opt")
    with pytest.raises(ValueError):
        ll.hf_to_lavis(sd, "opt")  # a retrieval dict has no LLM and has a text FFN
    with pytest.raises(ValueError):
        ll.hf_to_lavis(sd, "vicuna")
    osd, _ = models["opt"]
    with pytest.raises(KeyError):
        ll.hf_to_lavis(osd, "stage1")  # no word embeddings / projections


# ----------------------------------------------------------------------------------------------
# trainable keys (LAVIS _save_checkpoint)
# ----------------------------------------------------------------------------------------------
def lavis_save_rule(module: nn.Module) -> set[str]:
    """LAVIS RunnerBase._save_checkpoint, verbatim logic."""
    param_grad_dic = {k: v.requires_grad for (k, v) in module.named_parameters()}
    state_dict = module.state_dict()
    for k in list(state_dict.keys()):
        if k in param_grad_dic.keys() and not param_grad_dic[k]:
            del state_dict[k]
    return set(state_dict)


@pytest.mark.parametrize("name", ["stage1", "opt", "t5"])
def test_trainable_keys(models, name):
    kind = kind_of(name)
    lv = lavis(models, name)
    keep = ll.trainable_keys(lv, kind)
    assert not any(k.startswith(("visual_encoder.", "opt_model.", "t5_model.")) for k in keep)
    for k in ("ln_vision.weight", "ln_vision.bias", "query_tokens",
              "Qformer.bert.embeddings.position_ids", "Qformer.bert.embeddings.LayerNorm.weight",
              "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"):
        assert k in keep
    if kind == "stage1":
        assert keep == {k for k in lv if not k.startswith("visual_encoder.")}
        assert {"temp", "Qformer.cls.predictions.decoder.weight", "vision_proj.weight",
                "itm_head.bias"} <= keep
    else:
        assert f"{kind}_proj.weight" in keep
        assert keep == {k for k in lv if not k.startswith(("visual_encoder.", f"{kind}_model."))}
    unfrozen = ll.trainable_keys(lv, kind, freeze_vit=False)
    assert unfrozen - keep == {k for k in lv if k.startswith("visual_encoder.")}


def test_tied_aliases_match_lavis_save_rule():
    """The frozen LLM names _save_checkpoint keeps because named_parameters() de-duplicates."""
    with hf_ref.one_torch_thread():
        holder = nn.Module()
        holder.opt_model = OPTForCausalLM(hf_ref.opt_config())
        holder.opt_proj = nn.Linear(32, 32)
        t5 = nn.Module()
        t5.t5_model = T5ForConditionalGeneration(hf_ref.t5_config())
        # FlanT5 under transformers 4.26 (tie_word_embeddings=False): lm_head is its own parameter
        t5.t5_model.lm_head.weight = nn.Parameter(t5.t5_model.lm_head.weight.detach().clone())
        t5.t5_proj = nn.Linear(32, 32)
    for kind, module in (("opt", holder), ("t5", t5)):
        llm = getattr(module, f"{kind}_model")
        for p in llm.parameters():
            p.requires_grad = False
        kept = lavis_save_rule(module)
        fake = {k: None for k in module.state_dict()}
        assert ll.trainable_keys(fake, kind, tied_aliases=True) == kept
        assert ll.trainable_keys(fake, kind) == {k for k in kept
                                                 if not k.startswith(f"{kind}_model.")}
    assert {k for k in lavis_save_rule(holder) if k.startswith("opt_model.")} == \
        {"opt_model.lm_head.weight"}


# ----------------------------------------------------------------------------------------------
# eva_vit_g.pth
# ----------------------------------------------------------------------------------------------
def test_eva_checkpoint(models):
    _, info = models["stage1"]
    lv = lavis(models, "stage1")
    ck = ll.eva_checkpoint(lv, extra_block_seed=5)
    n = info["n_vit"]
    model_keys = {k[len("visual_encoder."):] for k in lv if k.startswith("visual_encoder.")}
    assert model_keys <= set(ck)
    extra = set(ck) - model_keys
    assert extra == {k.replace(f"blocks.{n - 1}.", f"blocks.{n}.", 1)
                     for k in model_keys if k.startswith(f"blocks.{n - 1}.")}
    assert "blocks.0.attn.q_bias" in ck and "cls_token" in ck and "ln_vision.weight" not in ck
    assert not any(k.startswith(("visual_encoder.", "Qformer", "ln_vision")) for k in ck)
    for k in model_keys:  # what create_eva_vit_g's strict=False load takes
        assert np.array_equal(ck[k], lv["visual_encoder." + k])
    for k in extra:
        prev = k.replace(f"blocks.{n}.", f"blocks.{n - 1}.", 1)
        assert ck[k].shape == ck[prev].shape and ck[k].dtype == ck[prev].dtype
        assert not np.array_equal(ck[k], ck[prev])
    again = ll.eva_checkpoint(lv, extra_block_seed=5)
    assert all(np.array_equal(again[k], ck[k]) for k in extra)
    with pytest.raises(ValueError):
        ll.eva_checkpoint({"ln_vision.weight": np.ones(3)})


# ----------------------------------------------------------------------------------------------
# CLIP ViT (LAVIS clip_vit.py)
# ----------------------------------------------------------------------------------------------
CLIP_KW = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
               image_size=30, patch_size=6)


class _ResBlock(nn.Module):  # LAVIS clip_vit.ResidualAttentionBlock, names only
    def __init__(self, w, heads, mlp):
        super().__init__()
        self.attn = nn.MultiheadAttention(w, heads)
        self.ln_1 = nn.LayerNorm(w)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(w, mlp)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(mlp, w))]))
        self.ln_2 = nn.LayerNorm(w)


class _ClipVit(nn.Module):  # OpenAI CLIP VisionTransformer; checkpoint=False -> LAVIS's module
    def __init__(self, w, heads, mlp, layers, tokens, patch, proj_dim, checkpoint):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[_ResBlock(w, heads, mlp)
                                                     for _ in range(layers)])
        if checkpoint:
            self.ln_post = nn.LayerNorm(w)
            self.proj = nn.Parameter(torch.zeros(w, proj_dim))


@pytest.fixture(scope="module")
def clip_sd():
    with hf_ref.one_torch_thread():
        model = hf_ref.randomize(CLIPVisionModel(CLIPVisionConfig(**CLIP_KW)))
        return hf_ref.state_dict_numpy(model)


def test_hf_clip_key_names(clip_sd):
    """transformers 5.24 CLIPVisionModel keys carry no `vision_model.` prefix (4.x did)."""
    assert "embeddings.patch_embedding.weight" in clip_sd
    assert "pre_layrnorm.weight" in clip_sd and "post_layernorm.bias" in clip_sd
    assert "encoder.layers.2.self_attn.q_proj.bias" in clip_sd
    assert "embeddings.patch_embedding.bias" not in clip_sd
    assert not any(k.startswith("vision_model.") for k in clip_sd)


def test_clip_checkpoint_layout(clip_sd):
    out = ll.clip_lavis_from_hf_clip(clip_sd, proj_dim=16)
    ref = _ClipVit(32, 4, 37, 3, 26, 6, 16, checkpoint=True)
    assert list(out) == list(ref.state_dict())  # same keys, same torch order
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=True)
    s = "encoder.layers.1.self_attn."
    want_w = np.concatenate([clip_sd[s + f"{x}_proj.weight"] for x in "qkv"])
    want_b = np.concatenate([clip_sd[s + f"{x}_proj.bias"] for x in "qkv"])
    assert np.array_equal(out["transformer.resblocks.1.attn.in_proj_weight"], want_w)
    assert np.array_equal(out["transformer.resblocks.1.attn.in_proj_bias"], want_b)
    assert np.array_equal(out["transformer.resblocks.1.attn.out_proj.weight"],
                          clip_sd[s + "out_proj.weight"])
    assert np.array_equal(out["transformer.resblocks.2.mlp.c_fc.bias"],
                          clip_sd["encoder.layers.2.mlp.fc1.bias"])
    assert np.array_equal(out["transformer.resblocks.0.ln_2.weight"],
                          clip_sd["encoder.layers.0.layer_norm2.weight"])
    assert np.array_equal(out["conv1.weight"], clip_sd["embeddings.patch_embedding.weight"])
    assert np.array_equal(out["ln_pre.bias"], clip_sd["pre_layrnorm.bias"])
    assert np.array_equal(out["ln_post.weight"], clip_sd["post_layernorm.weight"])
    assert np.array_equal(out["positional_embedding"],
                          clip_sd["embeddings.position_embedding.weight"])
    assert out["class_embedding"].shape == (32,) and out["proj"].shape == (32, 16)
    # v4-style prefixed input gives the same dict
    v4 = ll.clip_lavis_from_hf_clip({"vision_model." + k: v for k, v in clip_sd.items()},
                                    proj_dim=16)
    assert_bitwise_equal(v4, out)


def test_clip_lavis_model_layout_and_prefix(clip_sd):
    out = ll.clip_lavis_from_hf_clip(clip_sd, as_lavis_model=True)
    ref = _ClipVit(32, 4, 37, 2, 26, 6, 0, checkpoint=False)  # last block dropped, no ln_post/proj
    assert list(out) == list(ref.state_dict())
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=True)
    pre = ll.clip_lavis_from_hf_clip(clip_sd, as_lavis_model=True, prefix="visual_encoder.")
    assert set(pre) == {"visual_encoder." + k for k in out}
    assert "visual_encoder.transformer.resblocks.1.attn.in_proj_weight" in pre  # §7.1 CLIP-L names


def test_clip_proj_from_clipmodel():
    with hf_ref.one_torch_thread():
        m = hf_ref.randomize(CLIPModel(CLIPConfig(
            vision_config=CLIP_KW, projection_dim=16,
            text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                             num_attention_heads=4, vocab_size=50))))
    sd = hf_ref.state_dict_numpy(m)
    out = ll.clip_lavis_from_hf_clip(sd)
    assert np.array_equal(out["proj"], sd["visual_projection.weight"].T)
    assert out["proj"].shape == (32, 16)
    vision_only = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    out2 = ll.clip_lavis_from_hf_clip(vision_only, visual_projection=sd["visual_projection.weight"])
    assert_bitwise_equal(out2, out)
