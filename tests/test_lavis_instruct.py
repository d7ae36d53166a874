"""LAVIS InstructBLIP `.pth` (`blip2_vicuna_instruct`, `blip2_t5_instruct`) <-> ours <-> HF.

The LAVIS state dicts are built by `lavis_layout.instruct_hf_to_lavis` (test-side, from LAVIS's
model code and HF's InstructBLIP conversion script) from tiny random HF InstructBLIP models; the
converter must write exactly them, read them back, and HF's own conversion script
(`instruct_lavis_to_hf`) must turn what we write into the HF model's tensors.
"""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

import blip2_jax
import hf_ref
import lavis_layout
from blip2_jax import config as config_lib
from blip2_jax.convert import lavis, pth, sources, stream
from blip2_jax.convert.mapping import MappingError, flatten
from blip2_jax.models import blip2 as blip2_model
from test_convert import assert_same, convert_cli, hf_dir_state, lavis_like, read_pth

NAMES = {"llama": "blip2_vicuna_instruct", "t5": "blip2_t5_instruct"}
# 3 Q-Former layers, cross-attention every 2nd (a tail layer); LAVIS's LLaMA has no
# grouped-query attention: as many KV heads as heads.
QFORMER = dict(cross_attention_frequency=2, num_hidden_layers=3)
TEXT = {"llama": dict(num_key_value_heads=4), "t5": {}}


@pytest.fixture(scope="module", params=sorted(NAMES))
def instruct(request, tmp_path_factory):
    """(llm, HF dir, HF state dict, the LAVIS full state dict, its .pth (no config of ours in
    it), the HF LLM alone as a plain HF directory (pytorch_model.bin))."""
    llm = request.param
    tmp = tmp_path_factory.mktemp(f"instruct_{llm}")
    with hf_ref.one_torch_thread():
        model = lavis_like(hf_ref.instructblip_generation(llm, seed=5, qformer=QFORMER,
                                                          text=TEXT[llm]))
        model.save_pretrained(tmp / "hf")
        hf_sd = hf_ref.state_dict_numpy(model)
        (tmp / "llm").mkdir()
        model.language_model.config.save_pretrained(tmp / "llm")
        torch.save(model.language_model.state_dict(), tmp / "llm" / "pytorch_model.bin")
    head_dim = model.config.text_config.head_dim if llm == "llama" else None
    sd = lavis_layout.instruct_hf_to_lavis(hf_sd, llm, head_dim=head_dim)
    pth.save(tmp / "lavis.pth", sd)
    return llm, tmp / "hf", hf_sd, sd, tmp / "lavis.pth", tmp / "llm"


def frozen(llm):
    return ("visual_encoder.", lavis_layout.INSTRUCT_KINDS[llm][0])


def flat(model):
    return {k: v.value() for k, v in stream.leaves_from_tree(model.params).items()}


def test_round_trip_hf_ours_lavis_ours_hf(instruct, tmp_path):
    """HF -> ours -> LAVIS -> ours -> HF, bit-exact; the LAVIS file is LAVIS's full state dict
    (strict=True key set, buffers and tied copies included), HF's conversion script turns it into
    the HF model's tensors, and a trainable export keeps what LAVIS's own files hold."""
    llm, hf_dir, hf_sd, sd, _, _ = instruct
    sources.convert(hf_dir, tmp_path / "n1", "native")
    report = sources.convert(tmp_path / "n1", tmp_path / "l.pth", "lavis")
    assert report["lavis_model"] == NAMES[llm]
    written = read_pth(tmp_path / "l.pth")
    assert_same(written, sd)
    assert_same(lavis_layout.instruct_lavis_to_hf(written), hf_sd)
    report = sources.convert(tmp_path / "l.pth", tmp_path / "n2", "native")
    assert (report["from"], report["lavis_model"]) == ("lavis", NAMES[llm])
    sources.convert(tmp_path / "n2", tmp_path / "hf2", "hf")
    assert_same(hf_dir_state(tmp_path / "hf2"), hf_dir_state(hf_dir))
    assert json.load(open(tmp_path / "hf2" / "config.json"))["model_type"] == "instructblip"

    sources.convert(tmp_path / "n1", tmp_path / "t.pth", "lavis", parts="trainable")
    assert set(read_pth(tmp_path / "t.pth")) == {k for k in sd if not k.startswith(frozen(llm))}


def test_lavis_files_read_as_the_hf_model(instruct, tmp_path):
    """LAVIS's own full file (no config of ours in it; the tiny model is given as the config)
    holds the HF model's parameters; so does a trainable-only file with the image encoder from
    `eva_vit_g.pth` and the LLM from a plain HF directory."""
    llm, hf_dir, _, sd, path, llm_dir = instruct
    want = flat(blip2_jax.load(hf_dir, dtype=None))
    got = blip2_jax.load(path, dtype=None, config=hf_dir)
    assert got.config.qformer_text_input and got.config.vision.post_layer_norm_eps == 1e-5
    assert_same(flat(got), want)
    pth.save(tmp_path / "released.pth", {k: v for k, v in sd.items()
                                         if not k.startswith(frozen(llm))})
    pth.save(tmp_path / "eva.pth", lavis_layout.eva_checkpoint(sd), wrap=None)
    with pytest.raises(MappingError, match="--llm"):
        blip2_jax.load(tmp_path / "released.pth", config=hf_dir, vision=tmp_path / "eva.pth")
    got = blip2_jax.load(tmp_path / "released.pth", dtype=None, config=hf_dir,
                         vision=tmp_path / "eva.pth", llm=llm_dir)
    assert_same(flat(got), want)


@pytest.mark.parametrize("instruct", ["llama"], indirect=True)
def test_vicuna_directory_gets_lavis_pad_row(instruct):
    """blip2_vicuna_instruct's LLM is the Vicuna directory plus LAVIS's "[PAD]" (one more row in
    the embeddings and the head, id = the directory's vocabulary size; "</s>" as BOS and EOS)."""
    _, hf_dir, _, _, _, llm_dir = instruct
    cfg = blip2_jax.load(hf_dir, dtype=None).config
    lavis_llm = sources.llm_config(llm_dir, "llama")
    assert (lavis_llm.vocab_size, lavis_llm.pad_token_id) == (cfg.llm.vocab_size + 1,
                                                             cfg.llm.vocab_size)
    assert lavis_llm.bos_token_id == lavis_llm.eos_token_id == cfg.llm.eos_token_id
    leaves = sources.open_part(llm_dir, cfg.replace(llm=lavis_llm), "llm")
    embed = leaves["llm/embed_tokens/embedding"].value()
    head = leaves["llm/lm_head/kernel"].value()
    assert embed.shape[0] == head.shape[1] == cfg.llm.vocab_size + 1
    assert not embed[-1].any() and not head[:, -1].any()
    plain = sources.open_part(llm_dir, cfg, "llm")["llm/embed_tokens/embedding"].value()
    np.testing.assert_array_equal(embed[:-1], plain)


def test_cli_detects_the_lavis_model(instruct, tmp_path):
    llm, hf_dir, _, _, path, _ = instruct
    proc = convert_cli(path, tmp_path / "n", "--to", "native", "--config", hf_dir)
    report = json.loads(proc.stdout)
    assert (report["from"], report["lavis_model"]) == ("lavis", NAMES[llm])
    assert report["model"]["llm"] == llm


def test_missing_qformer_text_weights_named(instruct, tmp_path):
    """An InstructBLIP LAVIS file without some of the Q-Former text weights fails naming each
    missing key."""
    llm, hf_dir, _, sd, _, _ = instruct
    dropped = ["Qformer.bert.embeddings.word_embeddings.weight",
               "Qformer.bert.encoder.layer.1.output.dense.weight",
               "Qformer.bert.encoder.layer.2.intermediate.dense.bias"]
    pth.save(tmp_path / "x.pth", {k: v for k, v in sd.items() if k not in dropped})
    with pytest.raises(MappingError) as e:
        blip2_jax.load(tmp_path / "x.pth", config=hf_dir)
    for k in dropped:
        assert k in str(e.value)
    assert "text weights" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Released shapes (no tensors): what is inferred, what is refused
# ----------------------------------------------------------------------------------------------
def released(preset: str):
    """(the config LAVIS's released file of `preset` describes, a KeySource of its trainable
    keys' shapes)."""
    want = config_lib.get_preset(preset).replace(image_token_index=None)
    if want.llm_kind == "llama":
        want = want.replace(llm=dataclasses.replace(want.llm, **lavis.LAVIS_VICUNA_IDS))
    want = lavis.lavis_numerics(want)
    abstract = {k: stream.Leaf(tuple(v.shape), np.dtype(v.dtype), None)
                for k, v in flatten(blip2_model.abstract_params(want)).items()}
    shapes = {e.name: e.shape for e in lavis.entries(want, abstract, "trainable")[0] if e.name}
    return want, Shapes(preset, shapes)


class Shapes(stream.KeySource):
    def __init__(self, name, shapes):
        self.name, self.shapes = name, dict(shapes)

    def keys(self):
        return set(self.shapes)

    def shape(self, key):
        return self.shapes[key]

    def dtype(self, key):
        return np.dtype(np.int64 if key == lavis.POSITION_IDS else np.float32)


@pytest.mark.parametrize("preset", ["instructblip-vicuna-7b", "instructblip-vicuna-13b",
                                    "instructblip-flan-t5-xl", "instructblip-flan-t5-xxl"])
def test_released_instruct_files_inferred(preset):
    want, source = released(preset)
    assert lavis.detect_model(source) == NAMES[want.llm_kind]
    got = lavis.infer_config(source)
    assert got == want
    assert got.qformer.vocab_size == 30523 and got.qformer_text_input
    if want.llm_kind == "llama":
        assert (got.llm.vocab_size, got.llm.bos_token_id, got.llm.eos_token_id,
                got.llm.pad_token_id) == (32001, 2, 2, 32000)
    # the same file without some text weights: still InstructBLIP, the keys named
    gone = ["Qformer.bert.embeddings.position_embeddings.weight",
            "Qformer.bert.encoder.layer.11.output.LayerNorm.bias"]
    for k in gone:
        del source.shapes[k]
    cfg = lavis.infer_config(source)
    assert cfg.qformer_text_input
    with pytest.raises(MappingError) as e:
        lavis.leaves(source, cfg)
    assert all(k in str(e.value) for k in gone) and "text weights" in str(e.value)


def test_unknown_instruct_variants_named():
    """Files that are no LAVIS BLIP-2 / InstructBLIP model fail naming the keys (or the
    shape) at fault."""
    _, vicuna = released("instructblip-vicuna-7b")
    base = vicuna.shapes

    def variant(edit):
        shapes = dict(base)
        edit(shapes)
        return Shapes("x.pth", shapes)

    cases = {
        # two language models
        "t5_proj.weight": lambda s: s.update({"t5_proj.weight": (2048, 768)}),
        # an llm_model that is not a LLaMA
        "llm_model.model.decoder.layers.0.fc1.weight": lambda s: s.update(
            {"llm_model.model.decoder.layers.0.fc1.weight": (16384, 4096)}),
        # stage-1 heads beside an LLM
        "itm_head.weight": lambda s: s.update({"itm_head.weight": (2, 768)}),
        # X-InstructBLIP: a Q-Former per modality
        "audio_Qformer.bert.embeddings.LayerNorm.weight": lambda s: s.update(
            {"audio_Qformer.bert.embeddings.LayerNorm.weight": (768,)}),
    }
    for key, edit in cases.items():
        with pytest.raises(lavis.LavisVariantError, match=re.escape(key)):
            lavis.infer_config(variant(edit))

    def opt(s):               # an instruction-aware OPT: LAVIS has none
        s["opt_proj.weight"], s["opt_proj.bias"] = s.pop("llm_proj.weight"), s.pop("llm_proj.bias")
    with pytest.raises(lavis.LavisVariantError,
                       match=r"OPT.*Qformer\.bert\.embeddings\.position_embeddings\.weight"):
        lavis.detect_model(variant(opt))

    def narrow(s):            # a projection width no released Vicuna has
        s["llm_proj.weight"], s["llm_proj.bias"] = (2560, 768), (2560,)
    with pytest.raises(lavis.LavisVariantError, match=r"llm_proj\.weight is \(2560, 768\)"):
        lavis.infer_config(variant(narrow))


def test_export_refuses_what_lavis_cannot_build():
    """LAVIS's LLaMA is transformers 4.28's (no grouped-query attention, ...); LAVIS has no
    instruction-aware OPT; the refusals name the values at fault."""
    gqa = config_lib.get_preset("tiny-instructblip-llama")
    with pytest.raises(config_lib.ConfigError, match=r"num_kv_heads 2 != num_heads 4"):
        lavis.check_writable(gqa)
    mha = gqa.replace(llm=dataclasses.replace(gqa.llm, num_kv_heads=4))
    lavis.check_writable(mha)
    assert lavis.model_name(mha) == "blip2_vicuna_instruct"
    opt = gqa.replace(llm=config_lib.TINY_OPT)
    with pytest.raises(config_lib.ConfigError, match="instruction-aware Q-Former with opt"):
        lavis.check_writable(opt)
