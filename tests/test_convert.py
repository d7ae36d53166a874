"""Weight porting: LAVIS `.pth` <-> ours <-> HF, tower files, the converter CLI, streaming I/O.

LAVIS state dicts are built by `lavis_layout` (an independent, test-side inversion of HF's
conversion rules), from tiny random HF models; LAVIS numerics are checked against
the HF torch modules with LAVIS's ln_vision eps (1e-5).
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import blip2_jax
import hf_ref
import lavis_layout
from blip2_jax import config as config_lib
from blip2_jax.convert import lavis, pth, sources, stream
from blip2_jax.convert.mapping import MappingError
from hf_ref import nchw, pixels, rel_err, text_batch
from blip2_jax.models import blip2 as blip2_model

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "blip2_jax.convert", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if check and proc.returncode != 0:
        raise AssertionError(f"convert failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def hf_dir_state(path) -> dict:
    """Every tensor of an HF / native safetensors directory (through the safetensors library)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def read_pth(path) -> dict:
    return {k: v.numpy() for k, v in pth.state_dict(path).items()}


def lavis_like(model):
    """LAVIS's EVA attention has no key bias: zero that third of HF's fused qkv bias."""
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            d = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[d:2 * d] = 0.0
    return model


def lavis_eps(model):
    """The HF torch model computing as LAVIS does: ln_vision (post_layernorm) eps 1e-5."""
    model.vision_model.post_layernorm.eps = lavis.LAVIS_LN_VISION_EPS
    return model


# ----------------------------------------------------------------------------------------------
# Stage 1: LAVIS Blip2Qformer
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """(HF retrieval model, its dir, our tiny config with the ITG head, LAVIS dict, LAVIS .pth)."""
    tmp = tmp_path_factory.mktemp("stage1")
    hf_model = lavis_like(hf_ref.blip2_retrieval(num_query_tokens=4, seed=3, qformer=dict(
        cross_attention_frequency=2, num_hidden_layers=2)))
    hf_model.save_pretrained(tmp / "hf")
    cfg = config_lib.read_hf_config(tmp / "hf").replace(itg=True)
    sd = lavis_layout.hf_to_lavis(hf_ref.state_dict_numpy(hf_model), "stage1", temp=0.05, seed=4)
    pth.save(tmp / "lavis.pth", sd)
    return hf_model, tmp / "hf", cfg, sd, tmp / "lavis.pth"


def test_lavis_stage1_round_trip_bit_exact(stage1, tmp_path):
    _, _, cfg, sd, path = stage1
    model = blip2_jax.load(path, dtype=None, config=cfg)
    assert model.config.vision.post_layer_norm_eps == 1e-5       # LAVIS numerics by default
    assert model.config.itg and float(model.params["temp"]) == np.float32(0.05)
    model.save(tmp_path / "back.pth", format="lavis")
    assert_same(read_pth(tmp_path / "back.pth"), sd)             # every key, buffers, tied copies
    # the .pth we write carries our config: it reloads with none given
    again = blip2_jax.load(tmp_path / "back.pth", dtype=None)
    assert again.config == model.config


def test_lavis_stage1_outputs_match_torch_with_lavis_eps(stage1):
    hf_model, _, cfg, _, path = stage1
    model = blip2_jax.load(path, config=cfg)
    ref = lavis_eps(lavis_like(hf_ref.blip2_retrieval(num_query_tokens=4, seed=3, qformer=dict(
        cross_attention_frequency=2, num_hidden_layers=2))))
    pix = pixels(2, seed=5)
    ids, mask = text_batch(2, 6, seed=6)
    with torch.no_grad():
        image = ref.vision_model(pixel_values=nchw(pix)).last_hidden_state.numpy()
        itm = ref(pixel_values=nchw(pix), input_ids=torch.from_numpy(ids),
                  attention_mask=torch.from_numpy(mask),
                  use_image_text_matching_head=True).logits_per_image.numpy()
        itc = ref(pixel_values=nchw(pix), input_ids=torch.from_numpy(ids),
                  attention_mask=torch.from_numpy(mask)).logits_per_image.numpy()
        hf_image = hf_model.vision_model(pixel_values=nchw(pix)).last_hidden_state.numpy()
    assert rel_err(model.vision_embeds(pix), image) <= TOL
    assert rel_err(model.itm(pix, ids, mask), itm) <= TOL
    assert rel_err(model.itc(pix, ids, mask), itc) <= TOL
    # the eps matters: HF's 1e-6 gives other image features than LAVIS's 1e-5
    assert rel_err(hf_image, image) > 10 * rel_err(model.vision_embeds(pix), image)


def test_lavis_itg_head_is_bert_mlm_head(stage1):
    _, _, cfg, sd, path = stage1
    head = blip2_jax.load(path, dtype=None, config=cfg).params["lm_head"]
    np.testing.assert_array_equal(head["transform"]["kernel"],
                                  sd["Qformer.cls.predictions.transform.dense.weight"].T)
    np.testing.assert_array_equal(head["bias"], sd["Qformer.cls.predictions.bias"])


def test_hf_retrieval_to_lavis_matches_layout_and_notes(stage1, tmp_path):
    hf_model, hf_dir, _, _, _ = stage1
    proc = convert_cli(hf_dir, tmp_path / "x.pth", "--to", "lavis")
    assert "ITG head" in proc.stderr        # HF has no Qformer.cls: LAVIS keeps a fresh one
    ours = read_pth(tmp_path / "x.pth")
    want = lavis_layout.hf_to_lavis(hf_ref.state_dict_numpy(hf_model), "stage1")
    want = {k: v for k, v in want.items() if not k.startswith("Qformer.cls.")}
    assert_same(ours, want)                 # temp: LAVIS's initial 0.07 (HF stores none)


def test_hf_lavis_hf_round_trip_through_cli(stage1, tmp_path):
    """HF -> ours -> LAVIS -> ours -> HF, bit-exact tensors (our .pth keeps our config)."""
    _, hf_dir, _, _, _ = stage1
    convert_cli(hf_dir, tmp_path / "n1", "--to", "native")
    convert_cli(tmp_path / "n1", tmp_path / "l.pth", "--to", "lavis")
    convert_cli(tmp_path / "l.pth", tmp_path / "n2", "--to", "native")
    convert_cli(tmp_path / "n2", tmp_path / "hf2", "--to", "hf")
    assert_same(hf_dir_state(tmp_path / "hf2"), hf_dir_state(hf_dir))


def test_lavis_to_hf_as_hf_conversion_does(stage1, tmp_path):
    """A LAVIS file -> HF: the ITG head and temp are dropped and ln_vision's eps becomes HF's, as
    HF's own conversion script does; the tensors are the HF model's, bit for bit."""
    _, hf_dir, cfg, _, path = stage1
    report = sources.convert(path, tmp_path / "hf", "hf", config=cfg)
    notes = " ".join(report["notes"])
    assert "ITG head" in notes and "post_layernorm eps" in notes and "temp" in notes
    assert_same(hf_dir_state(tmp_path / "hf"), hf_dir_state(hf_dir))


# ----------------------------------------------------------------------------------------------
# Stage 2: LAVIS Blip2OPT / Blip2T5, trainable-only files and tower sources
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["opt", "t5"])
def stage2(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    hf_model = lavis_like(hf_ref.blip2_generation(kind, num_query_tokens=4, seed=7,
                                                  qformer=dict(cross_attention_frequency=1)))
    hf_model.save_pretrained(tmp / "hf")
    cfg = config_lib.read_hf_config(tmp / "hf")
    sd = lavis_layout.hf_to_lavis(hf_ref.state_dict_numpy(hf_model), kind,
                                  max_position_embeddings=cfg.qformer.max_position_embeddings)
    pth.save(tmp / "full.pth", sd)
    return kind, hf_model, tmp, cfg, sd


def test_lavis_stage2_round_trip_and_layout(stage2, tmp_path):
    kind, hf_model, tmp, cfg, sd = stage2
    convert_cli(tmp / "hf", tmp_path / "full.pth", "--to", "lavis")
    assert_same(read_pth(tmp_path / "full.pth"), sd)       # strict=True key set, bit-exact
    model = blip2_jax.load(tmp / "full.pth", dtype=None, config=cfg)
    model.save(tmp_path / "again.pth", format="lavis")
    assert_same(read_pth(tmp_path / "again.pth"), sd)
    model.save(tmp_path / "train.pth", format="lavis", lavis_parts="trainable")
    keys = set(read_pth(tmp_path / "train.pth"))
    assert keys == lavis_layout.trainable_keys(sd, kind)


def test_lavis_stage2_outputs_match_torch_with_lavis_eps(stage2):
    kind, hf_model, tmp, cfg, _ = stage2
    model = blip2_jax.load(tmp / "full.pth", config=cfg)
    ref = lavis_eps(hf_model)
    pix = pixels(2, seed=9)
    try:
        with torch.no_grad():
            image = ref.vision_model(pixel_values=nchw(pix)).last_hidden_state.numpy()
    finally:
        ref.vision_model.post_layernorm.eps = 1e-6
    assert rel_err(model.vision_embeds(pix), image) <= TOL


def test_trainable_only_import_names_missing_towers(stage2, tmp_path):
    kind, hf_model, tmp, cfg, sd = stage2
    keep = lavis_layout.trainable_keys(sd, kind)
    pth.save(tmp_path / "released.pth", {k: sd[k] for k in keep})
    with pytest.raises(MappingError) as e:
        blip2_jax.load(tmp_path / "released.pth", config=cfg)
    msg = str(e.value)
    assert "vision/" in msg and "--vision" in msg and "llm/" in msg and "--llm" in msg
    with pytest.raises(MappingError, match="llm/"):
        blip2_jax.load(tmp_path / "released.pth", config=cfg, vision=tmp / "hf")

    # the towers from their own files: EVA (one block more than used), a plain HF LLM directory
    # written as pytorch_model.bin (read by the safe reader)
    pth.save(tmp_path / "eva.pth", lavis_layout.eva_checkpoint(sd), wrap=None)
    (tmp_path / "llm").mkdir()
    hf_model.language_model.config.save_pretrained(tmp_path / "llm")
    torch.save(hf_model.language_model.state_dict(), tmp_path / "llm" / "pytorch_model.bin")
    model = blip2_jax.load(tmp_path / "released.pth", dtype=None, config=cfg,
                           vision=tmp_path / "eva.pth", llm=tmp_path / "llm")
    full = blip2_jax.load(tmp / "full.pth", dtype=None, config=cfg)
    flat = lambda m: {k: v.value() for k, v in stream.leaves_from_tree(m.params).items()}  # noqa
    assert_same(flat(model), flat(full))


def test_lavis_config_inferred_for_released_shapes():
    """Released LAVIS models are recognised from their shapes (no tensors read)."""
    for preset, kind in (("blip2-pretrain-vit-g", "stage1"), ("blip2-pretrain-vit-l", "stage1"),
                         ("blip2-pretrain-vit-l-opt-2.7b", "opt"),
                         ("blip2-flan-t5-xl", "t5")):
        want = config_lib.get_preset(preset)
        if kind == "opt":
            want = want.replace(llm=dataclasses.replace(want.llm, vocab_size=50272))
        want = lavis.lavis_numerics(want.replace(image_token_index=None))
        abstract = {k: stream.Leaf(tuple(v.shape), np.dtype(v.dtype), None)
                    for k, v in _abstract(want).items()}
        shapes = {e.name: e.shape for e in lavis.entries(want, abstract, "trainable")[0]
                  if e.name}

        class Shapes(stream.KeySource):
            name = preset
            keys = lambda self: set(shapes)                      # noqa: E731
            shape = lambda self, k: shapes[k]                    # noqa: E731
        got = lavis.infer_config(Shapes())
        assert got == want, preset


def _abstract(cfg):
    from blip2_jax.convert.mapping import flatten
    return flatten(blip2_model.abstract_params(cfg))


# ----------------------------------------------------------------------------------------------
# CLIP ViT-L tower file
# ----------------------------------------------------------------------------------------------
def test_clip_tower_file_matches_hf_clip(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    hf_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                              num_attention_heads=4, image_size=30, patch_size=6,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf_cfg._attn_implementation = "eager"
    clip = hf_ref.randomize(CLIPVisionModel(hf_cfg), seed=11)
    sd = lavis_layout.clip_lavis_from_hf_clip(hf_ref.state_dict_numpy(clip), proj_dim=16,
                                              prefix="visual.")
    pth.save(tmp_path / "clip.pth", dict(sd, **{"logit_scale": np.ones((), np.float32)}),
             wrap=None)
    cfg = dataclasses.replace(config_lib.TINY_CLIP, num_layers=2)    # LAVIS drops the last block
    leaves = lavis.tower_leaves(stream.LazySource(pth.state_dict(tmp_path / "clip.pth"),
                                                  "clip.pth"), cfg)
    params = stream.read_tree(leaves)["vision"]
    from blip2_jax.models.vit import VisionTransformer
    pix = pixels(2, seed=12)
    ours = VisionTransformer(cfg).apply({"params": params}, pix)
    with torch.no_grad():
        ref = clip(pixel_values=nchw(pix), output_hidden_states=True).hidden_states[2].numpy()
    assert rel_err(ours, ref) <= TOL


# ----------------------------------------------------------------------------------------------
# Safety, errors, streaming I/O
# ----------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"query_tokens": torch.zeros(1, 4, 32)}, "x": _Evil(marker)},
               tmp_path / "evil.pth")
    proc = convert_cli(tmp_path / "evil.pth", tmp_path / "out", "--to", "native", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("python -m blip2_jax.convert: error:")
    assert "system" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_cli_bad_input_one_line(tmp_path, stage1):
    _, hf_dir, _, _, _ = stage1
    cases = [(tmp_path / "nope", "--to", "hf"),
             (hf_dir, tmp_path / "o", "--to", "hf", "--config", "no-such-preset"),
             (hf_dir, tmp_path / "o", "--to", "native", "--from", "lavis")]
    for args in cases:
        if len(args) == 3:
            args = (args[0], tmp_path / "o") + args[1:]
        proc = convert_cli(*args, check=False)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("python -m blip2_jax.convert: error:"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_shape_mismatch_names_every_key(stage1, tmp_path):
    _, _, cfg, sd, _ = stage1
    bad = dict(sd)
    bad["itm_head.weight"] = np.zeros((3, 32), np.float32)
    bad["visual_encoder.blocks.1.mlp.fc1.bias"] = np.zeros(5, np.float32)
    bad["unknown.weight"] = np.zeros(2, np.float32)
    pth.save(tmp_path / "bad.pth", bad)
    with pytest.raises(MappingError) as e:
        blip2_jax.load(tmp_path / "bad.pth", config=cfg)
    msg = str(e.value)
    assert "unknown.weight" in msg
    with pytest.raises(MappingError) as e:
        del bad["unknown.weight"]
        pth.save(tmp_path / "bad.pth", bad)
        blip2_jax.load(tmp_path / "bad.pth", config=cfg)
    msg = str(e.value)
    assert "itm_head/kernel" in msg and "vision/layers/mlp/fc1/bias" in msg


def test_streamed_files_read_by_safetensors_and_sharded(stage2, tmp_path):
    """Our streamed writer's files are what the safetensors library reads; sharding splits them
    with an index; a native stacked leaf reads one layer at a time; --dtype casts floats."""
    _, _, tmp, cfg, _ = stage2
    report = sources.convert(tmp / "hf", tmp_path / "n", "native", max_shard_bytes=20_000)
    assert len(report["files"]) > 1
    index = json.load(open(tmp_path / "n" / "params.safetensors.index.json"))
    tensors = hf_dir_state(tmp_path / "n")
    assert set(index["weight_map"]) == set(tensors)
    model = blip2_jax.load(tmp / "hf", dtype=None)
    flat = {k: v.value() for k, v in stream.leaves_from_tree(model.params).items()}
    assert_same(tensors, flat)
    reader = stream.SafetensorsReader(tmp_path / "n", "params")
    key = "vision/layers/mlp/fc1/kernel"
    np.testing.assert_array_equal(reader.get(key, 1), flat[key][1])
    sources.convert(tmp_path / "n", tmp_path / "h", "hf", dtype="bf16")
    back = hf_dir_state(tmp_path / "h")
    assert {str(v.dtype) for v in back.values()} == {"bfloat16"}
    orig = hf_dir_state(tmp / "hf")
    assert sorted(back) == sorted(orig)
    k = next(iter(sorted(orig)))
    np.testing.assert_array_equal(back[k], orig[k].astype(back[k].dtype))


def test_split_fused_refuses_key_bias(stage1, tmp_path):
    """LAVIS has no key bias: a model whose fused qkv bias has a non-zero key part cannot be
    written as LAVIS, and the error names the tensor."""
    _, hf_dir, _, _, _ = stage1
    model = blip2_jax.load(hf_dir, dtype=None)
    d = model.config.vision.hidden_size
    model.params["vision"]["layers"]["attn"]["qkv"]["bias"] = np.asarray(
        model.params["vision"]["layers"]["attn"]["qkv"]["bias"]).copy()
    model.params["vision"]["layers"]["attn"]["qkv"]["bias"][1, d] = 1.0
    with pytest.raises(MappingError, match=r"visual_encoder\.blocks\.1\.attn\.qkv\.bias"):
        model.save(tmp_path / "k.pth", format="lavis")
    assert not (tmp_path / "k.pth").exists()


def test_training_init_from_tower_files(stage2, tmp_path):
    """config.init takes the towers from their own files: EVA (.pth, one block more than used)
    and an HF LLM directory with pytorch_model.bin; ln_vision must be named random (LAVIS makes
    it fresh), and the loaded towers equal the full model's."""
    from blip2_jax.train import init as init_lib
    kind, hf_model, tmp, cfg, sd = stage2
    pth.save(tmp_path / "eva.pth", lavis_layout.eva_checkpoint(sd), wrap=None)
    (tmp_path / "llm").mkdir()
    hf_model.language_model.config.save_pretrained(tmp_path / "llm")
    torch.save(hf_model.language_model.state_dict(), tmp_path / "llm" / "pytorch_model.bin")
    init = {"vision": str(tmp_path / "eva.pth"), "llm": str(tmp_path / "llm")}
    with pytest.raises(init_lib.InitError, match="ln_vision"):
        init_lib.initial_params(cfg, dict(init, random=["qformer", "query_tokens", "llm_proj"]))
    params, where = init_lib.initial_params(
        cfg, dict(init, random=["ln_vision", "qformer", "query_tokens", "llm_proj"]))
    full = blip2_jax.load(tmp / "full.pth", dtype=None, config=cfg).params
    for tower in ("vision", "llm"):
        jax_tree_equal(params[tower], full[tower])
    assert "eva.pth" in where["vision"] and "llm" in where["llm"]


def jax_tree_equal(a, b):
    fa = {k: v.value() for k, v in stream.leaves_from_tree(a).items()}
    fb = {k: v.value() for k, v in stream.leaves_from_tree(b).items()}
    assert_same(fa, {k: v.astype(fa[k].dtype) for k, v in fb.items()})
