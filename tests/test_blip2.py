"""Parity of every public surface of `blip2_jax.load(...)` with HF BLIP-2 (torch fp32, eager)."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

import blip2_jax
from blip2_jax.convert import mapping
import hf_ref
from hf_ref import IMAGE_TOKEN, nchw, pixels, rel_err, text_batch

TOL = 1e-5

GEN_CASES = {
    "opt-freq1-q4": dict(llm="opt", num_query_tokens=4, qformer=dict(cross_attention_frequency=1)),
    "opt-freq2-q3": dict(llm="opt", num_query_tokens=3,
                         qformer=dict(cross_attention_frequency=2, num_hidden_layers=4)),
    "t5-freq1-q4": dict(llm="t5", num_query_tokens=4, qformer=dict(cross_attention_frequency=1)),
    "t5-freq2-q6": dict(llm="t5", num_query_tokens=6,
                        qformer=dict(cross_attention_frequency=2, num_hidden_layers=2)),
    # Shapes nobody tuned to: a Q-Former depth the frequency does not divide, a post-LN OPT,
    # a T5 with more encoder than decoder layers.
    "opt-odd": dict(llm="opt", num_query_tokens=5,
                    qformer=dict(cross_attention_frequency=2, num_hidden_layers=3),
                    text=dict(do_layer_norm_before=False, num_hidden_layers=3)),
    "t5-odd": dict(llm="t5", num_query_tokens=3,
                   qformer=dict(cross_attention_frequency=3, num_hidden_layers=4),
                   text=dict(num_layers=3, num_decoder_layers=1)),
    # LLaMA: grouped-query attention (2 KV heads), untied head, rotary positions. HF's forward
    # positions it with arange even when left-padded (test_lm_logits' left case checks that).
    "llama-freq1-q4": dict(llm="llama", num_query_tokens=4,
                           qformer=dict(cross_attention_frequency=1)),
}


@pytest.fixture(scope="module", params=sorted(GEN_CASES))
def generation_pair(request, tmp_path_factory):
    """(HF model, our model loaded from its save_pretrained directory)."""
    hf_model = hf_ref.blip2_generation(seed=1, **GEN_CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    return request.param, hf_model, blip2_jax.load(path)


@pytest.fixture(scope="module", params=["freq1-q4", "freq2-q5"])
def retrieval_pair(request, tmp_path_factory):
    freq, nq = (1, 4) if request.param == "freq1-q4" else (2, 5)
    hf_model = hf_ref.blip2_retrieval(num_query_tokens=nq, seed=2,
                                      qformer=dict(cross_attention_frequency=freq))
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    return hf_model, blip2_jax.load(path)


def _hf_query_output(hf_model, pix):
    with torch.no_grad():
        image_embeds = hf_model.vision_model(pixel_values=nchw(pix)).last_hidden_state
        queries = hf_model.query_tokens.expand(pix.shape[0], -1, -1)
        out = hf_model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=torch.ones(image_embeds.shape[:2],
                                                                 dtype=torch.long))
    return image_embeds.numpy(), out.last_hidden_state.numpy()


def test_vision_and_query_embeds(generation_pair):
    _, hf_model, model = generation_pair
    pix = pixels(3, seed=3)
    hf_image, hf_query = _hf_query_output(hf_model, pix)
    assert rel_err(model.vision_embeds(pix), hf_image) <= TOL
    assert rel_err(model.query_embeds(pix), hf_query) <= TOL


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_lm_logits(generation_pair, pad_side):
    name, hf_model, model = generation_pair
    nq = model.config.num_query_tokens
    pix = pixels(3, seed=4)
    ids, mask = text_batch(3, 7, seed=5, pad_side=pad_side, pad_id=1 if "opt" in name else 0)
    full_ids = torch.from_numpy(np.concatenate([np.full((3, nq), IMAGE_TOKEN), ids], 1))
    full_mask = torch.from_numpy(np.concatenate([np.ones((3, nq), np.int64), mask], 1))
    kwargs = dict(pixel_values=nchw(pix), input_ids=full_ids, attention_mask=full_mask)
    if "t5" in name:
        dec_ids, dec_mask = text_batch(3, 5, seed=6, pad_id=0)
        kwargs.update(decoder_input_ids=torch.from_numpy(dec_ids),
                      decoder_attention_mask=torch.from_numpy(dec_mask))
        with torch.no_grad():
            ref = hf_model(**kwargs).logits.numpy()
        ours = model.logits(pix, ids, mask, decoder_input_ids=dec_ids,
                            decoder_attention_mask=dec_mask)
    else:
        with torch.no_grad():
            ref = hf_model(**kwargs).logits.numpy()[:, nq:]
        ours = model.logits(pix, ids, mask)
    assert ours.shape == ref.shape
    valid = mask.astype(bool) if "opt" in name else np.ones(ref.shape[:2], bool)
    assert rel_err(np.asarray(ours)[valid], ref[valid]) <= TOL


def test_retrieval_itc_itm(retrieval_pair):
    hf_model, model = retrieval_pair
    pix = pixels(2, seed=7)
    ids, mask = text_batch(3, 6, seed=8)
    with torch.no_grad():
        itc = hf_model(pixel_values=nchw(pix), input_ids=torch.from_numpy(ids),
                       attention_mask=torch.from_numpy(mask),
                       use_image_text_matching_head=False).logits_per_image.numpy()
        itm = hf_model(pixel_values=nchw(pix), input_ids=torch.from_numpy(ids[:2]),
                       attention_mask=torch.from_numpy(mask[:2]),
                       use_image_text_matching_head=True).logits_per_image.numpy()
    assert model.itc(pix, ids, mask).shape == (2, 3)
    assert rel_err(model.itc(pix, ids, mask), itc) <= TOL
    assert rel_err(model.itm(pix, ids[:2], mask[:2]), itm) <= TOL
    _, hf_query = _hf_query_output(hf_model, pix)
    assert rel_err(model.query_embeds(pix), hf_query) <= TOL


def test_missing_surfaces_raise(generation_pair, retrieval_pair):
    _, _, gen = generation_pair
    _, ret = retrieval_pair
    pix = pixels(1)
    ids, mask = text_batch(1, 4)
    with pytest.raises(blip2_jax.SurfaceError, match="ITM head"):
        gen.itm(pix, ids, mask)
    with pytest.raises(blip2_jax.SurfaceError, match="ITC"):
        gen.itc(pix, ids, mask)
    with pytest.raises(blip2_jax.SurfaceError, match="language model"):
        ret.logits(pix, ids, mask)
    with pytest.raises(ValueError, match="channels-last"):
        gen.vision_embeds(pix.transpose(0, 3, 1, 2))


# -- saving ----------------------------------------------------------------------------------------
def _hf_tensors(path):
    from safetensors.numpy import load_file
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def test_hf_roundtrip_equal_tensors_and_loadable(generation_pair, tmp_path):
    name, hf_model, model = generation_pair
    model.save(tmp_path / "ours", format="hf")
    hf_model.save_pretrained(tmp_path / "theirs")
    ours, theirs = _hf_tensors(tmp_path / "ours"), _hf_tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    reloaded, info = Blip2ForConditionalGeneration.from_pretrained(
        tmp_path / "ours", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reloaded.eval()
    pix = pixels(2, seed=9)
    nq = model.config.num_query_tokens
    ids, mask = text_batch(2, 5, seed=10, pad_id=1 if "opt" in name else 0)
    kwargs = dict(pixel_values=nchw(pix),
                  input_ids=torch.from_numpy(np.concatenate([np.full((2, nq), IMAGE_TOKEN), ids],
                                                            1)),
                  attention_mask=torch.from_numpy(np.concatenate([np.ones((2, nq), np.int64),
                                                                  mask], 1)))
    if "t5" in name:
        kwargs["decoder_input_ids"] = torch.zeros((2, 1), dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(**kwargs).logits.numpy(),
                                      hf_model(**kwargs).logits.numpy())


def test_retrieval_hf_roundtrip(retrieval_pair, tmp_path):
    hf_model, model = retrieval_pair
    model.save(tmp_path / "ours", format="hf")
    reloaded, info = Blip2ForImageTextRetrieval.from_pretrained(
        tmp_path / "ours", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    for k, v in reloaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), theirs[k], err_msg=k)


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_save_load_save_bit_exact(generation_pair, tmp_path, fmt):
    _, _, model = generation_pair
    model.save(tmp_path / "a", format=fmt, max_shard_bytes=20_000)   # forces several shards
    again = blip2_jax.load(tmp_path / "a")
    again.save(tmp_path / "b", format=fmt, max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "a"))
    assert any("index.json" in f for f in files)
    assert files == sorted(os.listdir(tmp_path / "b"))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    if fmt == "hf":   # transformers reads our sharded layout too
        _, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "a",
                                                                output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_bfloat16_load(generation_pair, tmp_path):
    name, hf_model, model = generation_pair
    path = tmp_path / "bf16"
    hf_model.save_pretrained(path)
    pix = pixels(2, seed=17)
    ids, mask = text_batch(2, 5, seed=18, pad_id=1 if "opt" in name else 0)
    bf16 = blip2_jax.load(path, dtype="bfloat16")
    assert {str(x.dtype) for x in __import__("jax").tree.leaves(bf16.params)} == {"bfloat16"}
    out = np.asarray(bf16.logits(pix, ids, mask), np.float32)
    ref = np.asarray(model.logits(pix, ids, mask))
    assert rel_err(out, ref) < 5e-2


def test_native_keeps_dtype_and_stage1_heads(tmp_path):
    model = blip2_jax.Blip2.random("tiny-stage1", seed=3)
    model.save(tmp_path / "n", format="native")
    again = blip2_jax.load(tmp_path / "n", dtype=None)
    flat_a = mapping.flatten(model.params)
    flat_b = mapping.flatten(again.params)
    assert sorted(flat_a) == sorted(flat_b) and "temp" in flat_b and "lm_head/bias" in flat_b
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]))
    with pytest.raises(Exception, match="ITG"):
        model.save(tmp_path / "h", format="hf")


# -- bad checkpoints --------------------------------------------------------------------------------
def _edit_checkpoint(src, dst, drop=(), add=None):
    from safetensors.numpy import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_bad_checkpoints_fail_loudly(tmp_path):
    hf_model = hf_ref.blip2_generation("opt", seed=4)
    hf_model.save_pretrained(tmp_path / "ok")
    _edit_checkpoint(tmp_path / "ok", tmp_path / "missing",
                     drop=["qformer.encoder.layer.1.output_query.dense.weight"])
    with pytest.raises(Exception, match="missing keys.*layer.1.output_query.dense.weight"):
        blip2_jax.load(tmp_path / "missing")
    _edit_checkpoint(tmp_path / "ok", tmp_path / "extra",
                     add={"qformer.encoder.layer.9.surprise.weight": np.zeros(3, np.float32)})
    with pytest.raises(Exception, match="unexpected keys.*surprise"):
        blip2_jax.load(tmp_path / "extra")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(Exception, match="neither"):
        blip2_jax.load(tmp_path / "empty")
    with open(tmp_path / "ok" / "config.json") as f:
        json.dump(json.load(f), open(tmp_path / "empty" / "config.json", "w"))
    with pytest.raises(Exception, match="no model.safetensors"):
        blip2_jax.load(tmp_path / "empty")


def test_legacy_q_v_bias_checkpoint(tmp_path):
    hf_model = hf_ref.blip2_generation("opt", seed=5)
    hf_model.save_pretrained(tmp_path / "new")
    from safetensors.numpy import load_file
    tensors = load_file(tmp_path / "new" / "model.safetensors")
    legacy = {}
    for k in [k for k in tensors if k.endswith("self_attn.qkv.bias")]:
        b = tensors[k]
        d = b.shape[0] // 3
        b[d:2 * d] = 0.0     # the legacy layout has no key bias
        tensors[k] = b
        legacy[k.replace("qkv.bias", "q_bias")] = b[:d]
        legacy[k.replace("qkv.bias", "v_bias")] = b[2 * d:]
    _edit_checkpoint(tmp_path / "new", tmp_path / "zero_k", add=tensors)
    _edit_checkpoint(tmp_path / "new", tmp_path / "legacy", add=legacy,
                     drop=[k for k in tensors if k.endswith("self_attn.qkv.bias")])
    pix = pixels(2, seed=11)
    a = blip2_jax.load(tmp_path / "zero_k").vision_embeds(pix)
    b = blip2_jax.load(tmp_path / "legacy").vision_embeds(pix)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- stage 1: the ITG surface (HF has no LM head; reference = HF Q-Former with LAVIS's UniLM mask
#    + the BERT LM head formula of LAVIS Qformer.cls, in torch) ---------------------------------------
def test_stage1_itg_logits_vs_lavis_formula(retrieval_pair):
    hf_model, retrieval = retrieval_pair
    cfg = retrieval.config.replace(itg=True)
    rng = np.random.default_rng(12)
    h = cfg.qformer.hidden_size
    params = dict(retrieval.params, lm_head={
        "transform": {"kernel": rng.normal(0, 0.2, (h, h)).astype(np.float32),
                      "bias": rng.normal(0, 0.2, h).astype(np.float32)},
        "ln": {"scale": (1 + rng.normal(0, 0.1, h)).astype(np.float32),
               "bias": rng.normal(0, 0.1, h).astype(np.float32)},
        "bias": rng.normal(0, 0.2, cfg.qformer.vocab_size).astype(np.float32)})
    model = blip2_jax.Blip2(cfg, params)
    nq = cfg.num_query_tokens
    pix = pixels(3, seed=13)
    ids, mask = text_batch(3, 7, seed=14)
    with torch.no_grad():
        image = hf_model.vision_model(pixel_values=nchw(pix)).last_hidden_state
        queries = hf_model.query_tokens.expand(3, -1, -1)
        emb = hf_model.embeddings(input_ids=torch.from_numpy(ids), query_embeds=queries)
        hidden = hf_model.qformer(query_embeds=emb, query_length=nq,
                                  attention_mask=hf_ref.unilm_additive_mask(nq, mask),
                                  encoder_hidden_states=image).last_hidden_state[:, nq:]
        head = params["lm_head"]
        t = torch.from_numpy
        x = torch.nn.functional.gelu(hidden @ t(head["transform"]["kernel"])
                                     + t(head["transform"]["bias"]))
        x = torch.nn.functional.layer_norm(x, (h,), t(head["ln"]["scale"]), t(head["ln"]["bias"]),
                                           eps=cfg.qformer.layer_norm_eps)
        ref = (x @ hf_model.embeddings.word_embeddings.weight.T + t(head["bias"])).numpy()
    ours = np.asarray(model.logits(pix, ids, mask))
    assert ours.shape == (3, 7, cfg.qformer.vocab_size)
    valid = mask.astype(bool)
    assert rel_err(ours[valid], ref[valid]) <= TOL


def test_blip2model_checkpoint_loads(tmp_path):
    from transformers import Blip2Model
    hf_gen = hf_ref.blip2_generation("opt", seed=6)
    Blip2Model(hf_gen.config).save_pretrained(tmp_path / "m")   # same weight names, no head
    hf_gen.save_pretrained(tmp_path / "g")
    from safetensors.numpy import load_file, save_file
    # give the Blip2Model directory the generation model's weights, so outputs are comparable
    save_file(load_file(tmp_path / "g" / "model.safetensors"),
              str(tmp_path / "m" / "model.safetensors"))
    model = blip2_jax.load(tmp_path / "m")
    pix = pixels(2, seed=15)
    ids, mask = text_batch(2, 5, seed=16, pad_id=1)
    np.testing.assert_array_equal(np.asarray(model.logits(pix, ids, mask)),
                                  np.asarray(blip2_jax.load(tmp_path / "g").logits(pix, ids, mask)))


@pytest.mark.parametrize("preset", ["tiny-clip-stage1", "tiny-stage1", "tiny-opt", "tiny-t5",
                                    "tiny-llama"])
def test_random_presets_run_every_surface(preset, tmp_path):
    model = blip2_jax.Blip2.random(preset, seed=1)
    cfg = model.config
    pix = pixels(2, size=cfg.vision.image_size)
    ids, mask = text_batch(2, 5)
    n = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    assert model.vision_embeds(pix).shape == (2, n, cfg.vision.hidden_size)
    assert model.query_embeds(pix).shape == (2, cfg.num_query_tokens, cfg.qformer.hidden_size)
    if cfg.itc:
        assert model.itc(pix, ids, mask).shape == (2, 2)
        assert model.itm(pix, ids, mask).shape == (2, 2)
    vocab = cfg.llm.vocab_size if cfg.llm is not None else cfg.qformer.vocab_size
    assert model.logits(pix, ids, mask).shape[-1] == vocab
    model.save(tmp_path / "n", format="native")
    again = blip2_jax.load(tmp_path / "n", dtype=None)
    np.testing.assert_array_equal(np.asarray(again.query_embeds(pix)),
                                  np.asarray(model.query_embeds(pix)))
