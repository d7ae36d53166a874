"""Vision tower parity: EVA vs HF `Blip2VisionModel`, CLIP vs a LAVIS-structured torch reference.

Also: torch's bicubic kernel, position interpolation (HF `interpolate_pos_encoding=True`), legacy
q_bias/v_bias checkpoints, bf16, remat and the conversion round trip.
"""
from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import hf_ref
from blip2_jax import nn as bnn
from blip2_jax.config import TINY_CLIP, TINY_VISION, VisionConfig
from blip2_jax.convert import mapping
from blip2_jax.convert import stream
from blip2_jax.convert.hf_vision import rules, split_qkv_bias
from blip2_jax.convert.lavis_vision import lavis_clip_rules
from blip2_jax.models.vit import VisionTransformer, bicubic_matrix, interpolate_pos_embed

TOL = 1e-5
POST = r"vision_model\.post_layernorm\..*"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def our_config(hf: dict, **kw) -> VisionConfig:
    eps = hf.get("layer_norm_eps", 1e-6)
    return VisionConfig(variant="eva", hidden_size=hf["hidden_size"],
                        intermediate_size=hf["intermediate_size"],
                        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                        image_size=hf["image_size"], patch_size=hf["patch_size"],
                        layer_norm_eps=eps, post_layer_norm_eps=eps, **kw)


def hf_vision(seed: int = 0, **kw):
    hf = hf_ref.vision_config(**kw)
    cfg = transformers.Blip2VisionConfig(**hf)
    cfg._attn_implementation = "eager"
    model = hf_ref.randomize(transformers.Blip2VisionModel(cfg), seed)
    sd = {f"vision_model.{k}": v for k, v in hf_ref.state_dict_numpy(model).items()}
    return model, hf, sd


def hf_forward(model, x: np.ndarray, interpolate: bool = False) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=hf_ref.nchw(x), interpolate_pos_encoding=interpolate)
    return out.last_hidden_state.numpy()


def load_hf(cfg: VisionConfig, sd: dict, keys=None, get=None):
    """(our vision params, post_layernorm params) from an HF `vision_model.*` state dict."""
    keys = set(sd) if keys is None else keys
    tree = mapping.load(rules(cfg), keys, sd.__getitem__ if get is None else get, ignore=[POST])
    post = {"scale": sd["vision_model.post_layernorm.weight"],
            "bias": sd["vision_model.post_layernorm.bias"]}
    return tree["vision"], post


@functools.lru_cache(maxsize=None)
def _jitted(cfg: VisionConfig):
    model = VisionTransformer(cfg)
    ln = bnn.LayerNorm(cfg.post_layer_norm_eps)

    @jax.jit
    def run(params, post, x):
        y = model.apply({"params": params}, x)
        return y if post is None else ln.apply({"params": post}, y)
    return run


def forward(cfg: VisionConfig, params, x, post=None) -> np.ndarray:
    """Our tower (+ a final LayerNorm with `post`, like HF post_layernorm)."""
    return np.asarray(_jitted(cfg)(params, post, jnp.asarray(x)))


def shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def init_shapes(cfg: VisionConfig, size: int):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return shapes(jax.eval_shape(
        lambda: bnn.init_params(VisionTransformer(cfg), jax.random.PRNGKey(0), x)))


# ----------------------------------------------------------------------------------------------
# EVA vs HF Blip2VisionModel
# ----------------------------------------------------------------------------------------------
EVA_CASES = [
    dict(),                                                                   # TINY_VISION
    dict(num_hidden_layers=3, num_attention_heads=2, layer_norm_eps=1e-5),
    dict(hidden_size=48, num_attention_heads=6, intermediate_size=64, num_hidden_layers=1,
         image_size=20, patch_size=4),
]


@pytest.mark.parametrize("case", range(len(EVA_CASES)))
def test_eva_matches_hf(case):
    model, hf, sd = hf_vision(seed=case, **EVA_CASES[case])
    cfg = our_config(hf)
    params, post = load_hf(cfg, sd)
    assert shapes(params) == init_shapes(cfg, hf["image_size"])
    x = hf_ref.pixels(2, hf["image_size"], seed=case)
    ref = hf_forward(model, x)
    ours = forward(cfg, params, x, post)
    assert ours.shape == ref.shape == (2, cfg.num_patches + 1, cfg.hidden_size)
    err = hf_ref.rel_err(ours, ref)
    print(f"eva case {case}: rel err {err:.2e}")
    assert err <= TOL


def test_tiny_vision_preset_matches_hf_defaults():
    _, hf, _ = hf_vision()
    assert our_config(hf) == TINY_VISION


def test_rules_reject_other_variant():
    with pytest.raises(ValueError):
        rules(TINY_CLIP)
    with pytest.raises(ValueError):
        lavis_clip_rules(TINY_VISION)


# ----------------------------------------------------------------------------------------------
# position interpolation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("align_corners", [False, True])
def test_bicubic_matches_torch(align_corners):
    """Our resize weights and results equal torch's CPU bicubic up to float32 rounding."""
    rng = np.random.default_rng(0)
    for g, (h, w) in [(5, (7, 7)), (5, (5, 8)), (5, (4, 4)), (5, (3, 6)), (16, (26, 26)),
                      (4, (1, 9)), (1, (3, 2))]:
        for n_in, n_out in ((g, h), (g, w)):     # the weight matrix, probed with one-hot rows
            eye = torch.eye(n_in).reshape(n_in, 1, 1, n_in)
            ref_m = F.interpolate(eye, size=(1, n_out), mode="bicubic",
                                  align_corners=align_corners).reshape(n_in, n_out).numpy().T
            np.testing.assert_allclose(bicubic_matrix(n_in, n_out, align_corners), ref_m,
                                       rtol=0, atol=1e-6)
        pos = rng.normal(size=(1 + g * g, 8)).astype(np.float32)
        grid = torch.from_numpy(pos[1:].reshape(1, g, g, 8)).permute(0, 3, 1, 2)
        ref = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=align_corners)
        ref = np.concatenate([pos[:1], ref.permute(0, 2, 3, 1).reshape(h * w, 8).numpy()])
        ours = np.asarray(interpolate_pos_embed(jnp.asarray(pos), (h, w), align_corners))
        assert ours.shape == ref.shape
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err <= 2e-6, (g, h, w, err)
        assert hf_ref.rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("hw", [(42, 42), (30, 48), (24, 24), (36, 30)])
def test_interpolated_positions_match_hf(hw):
    model, hf, sd = hf_vision(seed=3)
    cfg = our_config(hf)
    params, post = load_hf(cfg, sd)
    x = np.random.default_rng(1).normal(size=(2, *hw, 3)).astype(np.float32)
    ref = hf_forward(model, x, interpolate=True)
    ours = forward(cfg, params, x, post)
    assert ours.shape == ref.shape == (2, 1 + (hw[0] // 6) * (hw[1] // 6), 32)
    err = hf_ref.rel_err(ours, ref)
    print(f"interpolated {hw}: rel err {err:.2e}")
    assert err <= TOL


# ----------------------------------------------------------------------------------------------
# legacy HF checkpoints with separate q_bias / v_bias
# ----------------------------------------------------------------------------------------------
def test_legacy_qkv_bias_checkpoint():
    model, hf, _ = hf_vision(seed=5)
    dim = hf["hidden_size"]
    with torch.no_grad():                       # legacy models have no key bias
        for layer in model.encoder.layers:
            layer.self_attn.qkv.bias[dim:2 * dim] = 0.0
    sd = {f"vision_model.{k}": v for k, v in hf_ref.state_dict_numpy(model).items()}
    legacy = {}
    for k, v in sd.items():
        if k.endswith(".self_attn.qkv.bias"):
            base = k[:-len("qkv.bias")]
            legacy[base + "q_bias"], legacy[base + "v_bias"] = v[:dim].copy(), v[2 * dim:].copy()
        else:
            legacy[k] = v
    calls = []

    class Counting(stream.DictSource):
        def get(self, key, index=None):
            calls.append(key)
            return super().get(key, index)

    source = stream.fuse_present(Counting(legacy), split_qkv_bias(legacy.keys(), dim))
    assert not calls                             # lazy
    assert source.keys() == set(sd)
    cfg = our_config(hf)
    params, post = load_hf(cfg, sd)
    params_legacy, _ = load_hf(cfg, sd, source.keys(), source.get)
    jax.tree.map(np.testing.assert_array_equal, params_legacy, params)
    x = hf_ref.pixels(2, 30, seed=5)
    err = hf_ref.rel_err(forward(cfg, params_legacy, x, post), hf_forward(model, x))
    print(f"legacy q/v bias: rel err {err:.2e}")
    assert err <= TOL

    # a current-layout source passes through unchanged; a half legacy one, or one with both
    # layouts in a layer, is refused naming the layer
    current = stream.DictSource(sd)
    assert stream.fuse_present(current, split_qkv_bias(sd.keys(), dim)) is current
    half = {k: v for k, v in legacy.items() if k != "vision_model.encoder.layers.0.self_attn.v_bias"}
    with pytest.raises(mapping.MappingError, match=r"layers\.0\.self_attn\.qkv\.bias"):
        stream.fuse_present(stream.DictSource(half), split_qkv_bias(half.keys(), dim))
    both = dict(legacy, **{"vision_model.encoder.layers.1.self_attn.qkv.bias":
                           sd["vision_model.encoder.layers.1.self_attn.qkv.bias"]})
    with pytest.raises(mapping.MappingError, match="both whole and in parts"):
        stream.fuse_present(stream.DictSource(both), split_qkv_bias(both.keys(), dim))


# ----------------------------------------------------------------------------------------------
# CLIP vs a torch reference with the structure of LAVIS lavis/models/clip_vit.py
# ----------------------------------------------------------------------------------------------
class _LayerNorm(torch.nn.LayerNorm):          # LAVIS: computes in fp32, casts back
    def forward(self, x):
        return super().forward(x.type(torch.float32)).type(x.dtype)


class _QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(torch.nn.Module):
    def __init__(self, d_model, n_head, mlp_width):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = _LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(OrderedDict([
            ("c_fc", torch.nn.Linear(d_model, mlp_width)), ("gelu", _QuickGELU()),
            ("c_proj", torch.nn.Linear(mlp_width, d_model))]))
        self.ln_2 = _LayerNorm(d_model)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=None)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(torch.nn.Module):
    def __init__(self, width, layers, heads, mlp_width):
        super().__init__()
        self.resblocks = torch.nn.Sequential(
            *[_ResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class _ClipVisionTransformer(torch.nn.Module):
    """LAVIS clip_vit.VisionTransformer with `layers` blocks and an explicit MLP width."""

    def __init__(self, input_resolution, patch_size, width, layers, heads, mlp_width):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size,
                                     bias=False)
        scale = width ** -0.5
        n = (input_resolution // patch_size) ** 2
        self.class_embedding = torch.nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = torch.nn.Parameter(scale * torch.randn(n + 1, width))
        self.ln_pre = _LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads, mlp_width)

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.to(x.dtype)
                       + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)
        x = self.transformer(x)
        return x.permute(1, 0, 2)


class _Wrapper(torch.nn.Module):
    def __init__(self, visual_encoder):
        super().__init__()
        self.visual_encoder = visual_encoder


def clip_reference(cfg: VisionConfig, seed: int):
    vit = _ClipVisionTransformer(cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_layers,
                                 cfg.num_heads, cfg.intermediate_size)
    model = hf_ref.randomize(_Wrapper(vit), seed)
    return model.visual_encoder, hf_ref.state_dict_numpy(model)


CLIP_CASES = [TINY_CLIP, dataclasses.replace(TINY_CLIP, num_layers=3, num_heads=2)]


@pytest.mark.parametrize("case", range(len(CLIP_CASES)))
def test_clip_matches_lavis_structure(case):
    cfg = CLIP_CASES[case]
    ref_model, sd = clip_reference(cfg, seed=10 + case)
    params = mapping.load(lavis_clip_rules(cfg), sd.keys(), sd.__getitem__)["vision"]
    assert shapes(params) == init_shapes(cfg, cfg.image_size)
    x = hf_ref.pixels(2, cfg.image_size, seed=case)
    with torch.no_grad():
        ref = ref_model(hf_ref.nchw(x)).numpy()
    err = hf_ref.rel_err(forward(cfg, params, x), ref)
    print(f"clip case {case}: rel err {err:.2e}")
    assert err <= TOL


def test_clip_interpolated_positions():
    """At 42x42 our positions equal the reference table bicubic-resized (align_corners=False)."""
    cfg = TINY_CLIP
    ref_model, sd = clip_reference(cfg, seed=12)
    params = mapping.load(lavis_clip_rules(cfg), sd.keys(), sd.__getitem__)["vision"]
    with torch.no_grad():
        pos = ref_model.positional_embedding
        grid = pos[1:].reshape(1, 5, 5, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False)
        ref_model.positional_embedding = torch.nn.Parameter(
            torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(49, -1)]))
        x = hf_ref.pixels(2, 42, seed=4)
        ref = ref_model(hf_ref.nchw(x)).numpy()
    err = hf_ref.rel_err(forward(cfg, params, x), ref)
    print(f"clip interpolated: rel err {err:.2e}")
    assert err <= TOL


# ----------------------------------------------------------------------------------------------
# dtypes, remat, round trip
# ----------------------------------------------------------------------------------------------
def test_bf16_close_to_fp32():
    _, hf, sd = hf_vision(seed=7)
    cfg = our_config(hf)
    params, _ = load_hf(cfg, sd)
    x = hf_ref.pixels(2, 30, seed=7)
    ref = forward(cfg, params, x)
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    out = _jitted(bf)(params, None, jnp.asarray(x))
    assert out.dtype == jnp.bfloat16
    err = hf_ref.rel_err(np.asarray(out, np.float32), ref)
    print(f"bf16 compute: rel err {err:.2e}")
    assert err < 3e-2
    bf_params = dataclasses.replace(bf, param_dtype="bfloat16")
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    assert shapes(p16) == init_shapes(bf_params, 30)
    err16 = hf_ref.rel_err(np.asarray(_jitted(bf_params)(p16, None, jnp.asarray(x)), np.float32),
                           ref)
    print(f"bf16 params+compute: rel err {err16:.2e}")
    assert err16 < 5e-2


def test_remat_full_identical():
    """remat_policy="full": identical fp32 forward (eva and clip) and the same gradients (eva)."""
    _, hf, sd = hf_vision(seed=8)
    cfg = our_config(hf)
    params, _ = load_hf(cfg, sd)
    _, clip_sd = clip_reference(TINY_CLIP, seed=8)
    clip_params = mapping.load(lavis_clip_rules(TINY_CLIP), clip_sd.keys(),
                               clip_sd.__getitem__)["vision"]
    x = jnp.asarray(hf_ref.pixels(2, 30, seed=8))
    for base, p in ((cfg, params), (TINY_CLIP, clip_params)):
        remat = dataclasses.replace(base, remat_policy="full")
        np.testing.assert_array_equal(forward(remat, p, x), forward(base, p, x))

    def grads(c):
        loss = lambda p: jnp.sum(VisionTransformer(c).apply({"params": p}, x) ** 2)
        return jax.jit(jax.grad(loss))(params)
    g0, g1 = grads(cfg), grads(dataclasses.replace(cfg, remat_policy="full"))
    errs = jax.tree.map(hf_ref.rel_err, g1, g0)     # fusion may differ: rounding-level only
    worst = max(jax.tree.leaves(errs))
    print(f"remat full grads: worst rel err {worst:.2e}")
    assert worst <= 1e-6


def test_save_round_trip_hf():
    _, hf, sd = hf_vision(seed=9, num_hidden_layers=3)
    cfg = our_config(hf)
    params, _ = load_hf(cfg, sd)
    back = mapping.save(rules(cfg), {"vision": params})
    expected = {k: v for k, v in sd.items() if not k.startswith("vision_model.post_layernorm")}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # an initialised tree is fully covered by the table too
    init = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(
        lambda: bnn.init_params(VisionTransformer(cfg), jax.random.PRNGKey(1),
                                jnp.zeros((1, 30, 30, 3)))))
    assert set(mapping.save(rules(cfg), {"vision": init})) == set(expected)


def test_save_round_trip_lavis_clip():
    cfg = CLIP_CASES[1]
    _, sd = clip_reference(cfg, seed=11)
    params = mapping.load(lavis_clip_rules(cfg), sd.keys(), sd.__getitem__)["vision"]
    back = mapping.save(lavis_clip_rules(cfg), {"vision": params})
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
