"""Model configuration: one frozen dataclass per tower, named presets, and HF `config.json` I/O.

Configs are hashable (frozen dataclasses of scalars and tuples), so a config can be a static argument
of a jitted function. Dtypes are per tower: `dtype` is the compute dtype, `param_dtype` the storage
dtype of that tower's parameters. `remat_policy` names a `jax.checkpoint_policies` member (or
"none" / "full") applied to each scanned layer.

HF field names are translated in `*_from_hf` / `*_to_hf`; values HF does not store (dtypes, remat,
which stage-1 heads exist) live only in our own saved config.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal, Optional, Union

TowerDtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration is inconsistent or cannot be read; the message names the field."""


@dataclasses.dataclass(frozen=True)
class _Tower:
    """What every tower has besides its architecture: dtypes and the remat policy."""
    dtype: TowerDtype = "float32"
    param_dtype: TowerDtype = "float32"
    remat_policy: str = "none"


@dataclasses.dataclass(frozen=True)
class VisionConfig(_Tower):
    """Image encoder. `variant="eva"`: HF `Blip2VisionModel` (EVA ViT-g); `"clip"`: LAVIS CLIP ViT-L."""
    variant: Literal["eva", "clip"] = "eva"
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_layers: int = 39
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6        # LayerNorms inside the blocks (and CLIP's ln_pre)
    post_layer_norm_eps: float = 1e-6   # the final LN (HF post_layernorm / LAVIS ln_vision)
    activation: str = "gelu"            # exact erf GELU (EVA); "quick_gelu" for CLIP

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class QFormerConfig(_Tower):
    """BERT-style Q-Former (LAVIS `Qformer.py`, HF `Blip2QFormerModel`)."""
    vocab_size: int = 30523
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    activation: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    # Text side: word/position embeddings and the text FFN (HF `use_qformer_text_input`).
    has_text_input: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_cross_attention_layer(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


@dataclasses.dataclass(frozen=True)
class OPTConfig(_Tower):
    """OPT decoder (HF `OPTForCausalLM`)."""
    vocab_size: int = 50272
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    ffn_dim: int = 10240
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 2560
    do_layer_norm_before: bool = True
    layer_norm_eps: float = 1e-5
    activation: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class T5Config(_Tower):
    """T5 v1.1 / FlanT5 encoder-decoder (HF `T5ForConditionalGeneration`)."""
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"        # BLIP-2's FlanT5 uses exact GELU (HF dense_act_fn "gelu")
    gated: bool = True
    tie_word_embeddings: bool = False
    # Scale the decoder output by d_model**-0.5 before the head; None = iff tied (transformers 4.x
    # rule). transformers 5 stores it as `scale_decoder_outputs` and always ties in its config,
    # untying when a checkpoint holds its own lm_head (our reader decides the tie the same way).
    scale_decoder_outputs: Optional[bool] = None
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: Optional[int] = None

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def scales_decoder_output(self) -> bool:
        if self.scale_decoder_outputs is None:
            return self.tie_word_embeddings
        return self.scale_decoder_outputs


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency scaling of a LLaMA config (HF `rope_parameters` beyond "default").

    "linear": every inverse frequency divided by `factor` (positions / factor).
    "llama3": frequencies with wavelength above original_max_position_embeddings /
    low_freq_factor divided by `factor`, below .../high_freq_factor kept, interpolated between.
    """
    rope_type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(f"rope_scaling rope_type {self.rope_type!r} is not supported "
                              "(linear or llama3)")
        if self.rope_type == "llama3":
            missing = [n for n in ("low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings") if getattr(self, n) is None]
            if missing:
                raise ConfigError(f"llama3 rope_scaling needs {missing}")
            if self.high_freq_factor == self.low_freq_factor:
                raise ConfigError("llama3 rope_scaling needs high_freq_factor != low_freq_factor "
                                  f"(both {self.low_freq_factor})")

    @classmethod
    def from_dict(cls, d: dict) -> "RopeScaling":
        """From our dict or an HF one (`rope_type` or the legacy `type`; `rope_theta` and other
        keys ignored)."""
        kind = d.get("rope_type", d.get("type"))
        if kind not in ("linear", "llama3"):
            raise ConfigError(f"rope_scaling rope_type {kind!r} is not supported (linear or "
                              "llama3)")
        if d.get("factor") is None:
            raise ConfigError(f"{kind} rope_scaling needs a factor")
        keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return cls(rope_type=kind, factor=d["factor"],
                   **({k: d.get(k) for k in keys} if kind == "llama3" else {}))


@dataclasses.dataclass(frozen=True)
class LlamaConfig(_Tower):
    """LLaMA-family decoder (HF `LlamaForCausalLM`; Vicuna, Llama 2/3). Defaults: HF
    `LlamaConfig`'s (Vicuna-7B). `num_kv_heads` None → num_heads; `head_dim` None →
    hidden_size // num_heads (both resolved on construction). `rope_scaling`: None, a
    `RopeScaling`, or its dict (HF keys accepted)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: int = 11008
    activation: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, tuple[int, ...], None] = 2

    def __post_init__(self):
        # Resolved here (not properties) so that every user reads the same concrete values.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not a multiple of "
                                  f"num_heads ({self.num_heads}); give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even (rotary embeddings pair "
                              "dimension i with i + head_dim/2)")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else self.eos_token_id


LLMConfig = Union[OPTConfig, T5Config, LlamaConfig]
_LLM_KINDS = {OPTConfig: "opt", T5Config: "t5", LlamaConfig: "llama"}


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    """A whole BLIP-2 model. `llm=None` gives the stage-1 (retrieval / ITC-ITM-ITG) model.

    `itc`/`itm`/`itg` say which stage-1 heads exist: ITC = vision_proj, text_proj, temp;
    ITM = itm_head; ITG = the Q-Former LM head (tied to its word embeddings).
    """
    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    llm: Optional[LLMConfig] = None
    num_query_tokens: int = 32
    embed_dim: int = 256            # ITC projection width (HF image_text_hidden_size)
    itc: bool = False
    itm: bool = False
    itg: bool = False
    image_token_index: Optional[int] = None   # kept only to write HF configs back faithfully
    # Instruction-aware Q-Former (InstructBLIP): the queries pass through the Q-Former together
    # with the instruction's BERT tokens (`qformer_input_ids`, after the queries, bidirectional);
    # only the query outputs go on to the LLM. HF `InstructBlipForConditionalGeneration`.
    qformer_text_input: bool = False

    def __post_init__(self):
        if self.qformer_text_input and not self.qformer.has_text_input:
            raise ConfigError("qformer_text_input (instruction-aware Q-Former) needs "
                              "qformer.has_text_input=True (word/position tables, text FFN)")
        if self.qformer_text_input and self.llm is None:
            raise ConfigError("qformer_text_input (instruction-aware Q-Former) needs an llm: "
                              "it is InstructBLIP's generation model, not a stage-1 model")
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ConfigError(
                f"qformer.encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal "
                f"vision.hidden_size ({self.vision.hidden_size})")
        if (self.itc or self.itm or self.itg) and not self.qformer.has_text_input:
            raise ConfigError("itc/itm/itg heads need qformer.has_text_input=True (text embeddings)")
        if isinstance(self.llm, OPTConfig) and self.llm.word_embed_proj_dim != self.llm.hidden_size:
            # BLIP-2 puts the queries, projected to the LLM's hidden size, before the token
            # embeddings, which such an OPT (OPT-350m) makes word_embed_proj_dim wide: HF's
            # Blip2ForConditionalGeneration and LAVIS's Blip2OPT fail on it too.
            raise ConfigError(
                f"an OPT with word_embed_proj_dim ({self.llm.word_embed_proj_dim}) != hidden_size "
                f"({self.llm.hidden_size}) cannot be BLIP-2's LLM: the projected queries "
                f"({self.llm.hidden_size} wide) and its token embeddings would not line up "
                f"(HF and LAVIS refuse it too); use an OPT whose two sizes are equal")

    @property
    def llm_kind(self) -> Optional[str]:
        if self.llm is None:
            return None
        return _LLM_KINDS[type(self.llm)]

    @property
    def decoder_only(self) -> bool:
        """The LLM is decoder-only (OPT, LLaMA): the queries prefix the text in one causal
        sequence. False for T5 (encoder-decoder) and stage 1."""
        return self.llm_kind in ("opt", "llama")

    def replace(self, **kw) -> "Blip2Config":
        return dataclasses.replace(self, **kw)

    def with_dtypes(self, dtype: str, param_dtype: Optional[str] = None) -> "Blip2Config":
        """The same model with every tower computing in `dtype` (and storing in `param_dtype`)."""
        pd = param_dtype or dtype
        tower = lambda c: dataclasses.replace(c, dtype=dtype, param_dtype=pd)
        return dataclasses.replace(self, vision=tower(self.vision), qformer=tower(self.qformer),
                                   llm=None if self.llm is None else tower(self.llm))

    # -- our own serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.llm is not None:
            d["llm"]["kind"] = self.llm_kind
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Blip2Config":
        d = dict(d)
        llm = d.pop("llm", None)
        if llm is not None:
            llm = dict(llm)
            kind = llm.pop("kind", None)
            llm = _build({"opt": OPTConfig, "llama": LlamaConfig}.get(kind, T5Config), llm,
                         f"llm ({kind})")
        return cls(vision=_build(VisionConfig, d.pop("vision", {}), "vision"),
                   qformer=_build(QFormerConfig, d.pop("qformer", {}), "qformer"),
                   llm=llm, **_checked(cls, d, "blip2"))


def _checked(cls, d: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {where} config field(s): {unknown}")
    return d


def _build(cls, d: dict, where: str):
    return cls(**_checked(cls, dict(d), where))


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json
# ----------------------------------------------------------------------------------------------
_HF_VISION = dict(hidden_size="hidden_size", intermediate_size="intermediate_size",
                  num_hidden_layers="num_layers", num_attention_heads="num_heads",
                  image_size="image_size", patch_size="patch_size", layer_norm_eps="layer_norm_eps",
                  hidden_act="activation")
_HF_QFORMER = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                   num_hidden_layers="num_layers", num_attention_heads="num_heads",
                   intermediate_size="intermediate_size", hidden_act="activation",
                   max_position_embeddings="max_position_embeddings",
                   layer_norm_eps="layer_norm_eps",
                   cross_attention_frequency="cross_attention_frequency",
                   encoder_hidden_size="encoder_hidden_size",
                   use_qformer_text_input="has_text_input", hidden_dropout_prob="hidden_dropout",
                   attention_probs_dropout_prob="attention_dropout", pad_token_id="pad_token_id")
_HF_OPT = dict(vocab_size="vocab_size", hidden_size="hidden_size", num_hidden_layers="num_layers",
               num_attention_heads="num_heads", ffn_dim="ffn_dim",
               max_position_embeddings="max_position_embeddings",
               word_embed_proj_dim="word_embed_proj_dim", do_layer_norm_before="do_layer_norm_before",
               activation_function="activation", enable_bias="enable_bias",
               layer_norm_elementwise_affine="layer_norm_elementwise_affine",
               tie_word_embeddings="tie_word_embeddings", pad_token_id="pad_token_id",
               bos_token_id="bos_token_id", eos_token_id="eos_token_id")
_HF_T5 = dict(vocab_size="vocab_size", d_model="d_model", d_kv="d_kv", d_ff="d_ff",
              num_layers="num_layers", num_decoder_layers="num_decoder_layers", num_heads="num_heads",
              relative_attention_num_buckets="relative_attention_num_buckets",
              relative_attention_max_distance="relative_attention_max_distance",
              layer_norm_epsilon="layer_norm_eps", tie_word_embeddings="tie_word_embeddings",
              scale_decoder_outputs="scale_decoder_outputs",
              decoder_start_token_id="decoder_start_token_id", pad_token_id="pad_token_id",
              eos_token_id="eos_token_id", bos_token_id="bos_token_id")

_HF_LLAMA = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                 num_hidden_layers="num_layers", num_attention_heads="num_heads",
                 num_key_value_heads="num_kv_heads", head_dim="head_dim",
                 intermediate_size="intermediate_size", hidden_act="activation",
                 rms_norm_eps="rms_norm_eps", max_position_embeddings="max_position_embeddings",
                 attention_bias="attention_bias", mlp_bias="mlp_bias",
                 tie_word_embeddings="tie_word_embeddings", pad_token_id="pad_token_id",
                 bos_token_id="bos_token_id", eos_token_id="eos_token_id")

# HF class defaults: a field absent from config.json takes these values (their __init__ defaults).
_HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                           num_attention_heads=16, image_size=224, patch_size=14,
                           layer_norm_eps=1e-6, hidden_act="gelu")
_HF_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                            num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                            max_position_embeddings=512, layer_norm_eps=1e-12,
                            cross_attention_frequency=2, encoder_hidden_size=1408,
                            use_qformer_text_input=False, hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1, pad_token_id=0)
_HF_OPT_DEFAULTS = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, ffn_dim=3072, max_position_embeddings=2048,
                        do_layer_norm_before=True, activation_function="relu", enable_bias=True,
                        layer_norm_elementwise_affine=True, tie_word_embeddings=True,
                        pad_token_id=1, bos_token_id=2, eos_token_id=2)
_HF_T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                       num_heads=8, relative_attention_num_buckets=32,
                       relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                       feed_forward_proj="relu", tie_word_embeddings=True,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, bos_token_id=None)

_HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                          num_attention_heads=32, intermediate_size=11008, hidden_act="silu",
                          rms_norm_eps=1e-6, max_position_embeddings=2048, attention_bias=False,
                          mlp_bias=False, tie_word_embeddings=False, bos_token_id=1,
                          eos_token_id=2)
_HF_LLAMA_ROPE_THETA = 10000.0


def _from_hf(d: dict, table: dict, defaults: dict) -> dict:
    out = {}
    for hf_name, ours in table.items():
        if hf_name in d and d[hf_name] is not None:
            out[ours] = d[hf_name]
        elif hf_name in defaults:
            out[ours] = defaults[hf_name]
    return out


def _to_hf(cfg, table: dict) -> dict:
    return {hf_name: getattr(cfg, ours) for hf_name, ours in table.items()}


def _t5_activation(d: dict) -> tuple[str, bool]:
    """HF T5Config's rule: 'gated-gelu' → gelu_new, unless `dense_act_fn` was stored explicitly."""
    proj = d.get("feed_forward_proj", _HF_T5_DEFAULTS["feed_forward_proj"])
    parts = proj.split("-")
    gated = parts[0] == "gated"
    act = parts[-1]
    if proj == "gated-gelu":
        act = "gelu_new"
    return d.get("dense_act_fn", act), gated


def llm_from_hf(td: dict) -> LLMConfig:
    """OPTConfig / T5Config / LlamaConfig from an HF OPT, T5 or LLaMA config dict
    (`text_config` or a bare LM)."""
    kind = td.get("model_type", "opt")
    if kind == "llama":
        return llama_from_hf(td)
    if kind == "opt":
        return OPTConfig(**_from_hf(td, _HF_OPT, _HF_OPT_DEFAULTS))
    if kind == "t5":
        fields = _from_hf(td, _HF_T5, _HF_T5_DEFAULTS)
        if fields.get("num_decoder_layers") is None:
            fields["num_decoder_layers"] = fields["num_layers"]
        act, gated = _t5_activation(td)
        if fields.get("scale_decoder_outputs") is None:
            fields["scale_decoder_outputs"] = fields["tie_word_embeddings"]
        return T5Config(**fields, activation=act, gated=gated)
    raise ConfigError(f"text_config.model_type {kind!r} is not supported (opt, t5 or llama)")


def llama_from_hf(d: dict) -> LlamaConfig:
    """LlamaConfig from an HF `LlamaConfig` dict (config.json, model_type "llama"): HF-v5's
    `rope_parameters` or the legacy `rope_theta` / `rope_scaling` keys (`type` or `rope_type`)."""
    if d.get("model_type", "llama") != "llama":
        raise ConfigError(f"model_type is {d.get('model_type')!r}, expected 'llama'")
    fields = _from_hf(d, _HF_LLAMA, _HF_LLAMA_DEFAULTS)
    rope = d.get("rope_parameters")
    if rope is None:                   # legacy layout (HF v4 and older config.json files)
        rope = dict(d.get("rope_scaling") or {})
    rope = dict(rope)
    theta = rope.get("rope_theta", d.get("rope_theta"))
    fields["rope_theta"] = _HF_LLAMA_ROPE_THETA if theta is None else theta
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields["rope_scaling"] = None if kind == "default" else RopeScaling.from_dict(rope)
    return LlamaConfig(**fields)


def llama_to_hf(cfg: LlamaConfig) -> dict:
    """An HF `LlamaConfig` dict: HF-v5's `rope_parameters` plus the legacy `rope_theta` /
    `rope_scaling` keys, so that transformers 4.x reads the same rotary embeddings."""
    out = dict(model_type="llama", architectures=["LlamaForCausalLM"], **_to_hf(cfg, _HF_LLAMA))
    if isinstance(out["eos_token_id"], tuple):
        out["eos_token_id"] = list(out["eos_token_id"])
    scaling = None
    if cfg.rope_scaling is not None:
        scaling = {k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items() if v is not None}
    out["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = scaling
    return out


def from_hf_dict(d: dict) -> Blip2Config:
    """Our config from an HF `Blip2Config` or `InstructBlipConfig` dict (`config.json`)."""
    if d.get("model_type") not in (None, "blip-2", "instructblip"):
        raise ConfigError(f"config.json model_type is {d.get('model_type')!r}, expected "
                          "'blip-2' or 'instructblip'")
    instruct = d.get("model_type") == "instructblip"
    vd = d.get("vision_config") or {}
    qd = dict(d.get("qformer_config") or {})
    vision = VisionConfig(**_from_hf(vd, _HF_VISION, _HF_VISION_DEFAULTS))
    vision = dataclasses.replace(vision, post_layer_norm_eps=vision.layer_norm_eps)
    qf = _from_hf(qd, _HF_QFORMER, _HF_QFORMER_DEFAULTS)
    qf["encoder_hidden_size"] = vision.hidden_size   # Blip2Config overwrites it the same way
    if instruct:      # InstructBlipQFormerModel always builds its text side (no flag in HF)
        qf["has_text_input"] = True
    qformer = QFormerConfig(**qf)
    arch = tuple(d.get("architectures") or ())
    td = d.get("text_config")
    retrieval = any("Retrieval" in a or "WithProjection" in a for a in arch)
    llm = llm_from_hf(td) if td is not None and not retrieval else None
    if instruct and llm is None:
        llm = OPTConfig(**_from_hf({}, _HF_OPT, _HF_OPT_DEFAULTS))   # HF's default text_config
    return Blip2Config(
        vision=vision, qformer=qformer, llm=llm,
        num_query_tokens=d.get("num_query_tokens", 32),
        embed_dim=d.get("image_text_hidden_size", 256),
        itc=retrieval, itm=retrieval, itg=False,
        image_token_index=d.get("image_token_index", d.get("image_token_id")),
        qformer_text_input=instruct)


def to_hf_dict(cfg: Blip2Config) -> dict:
    """An HF `Blip2Config` dict that `transformers` reads back to the same architecture."""
    if cfg.vision.variant != "eva":
        raise ConfigError("HF BLIP-2 has no CLIP ViT-L vision model; save with format='native'")
    if cfg.vision.post_layer_norm_eps != cfg.vision.layer_norm_eps:
        raise ConfigError("HF uses one vision layer_norm_eps for the blocks and post_layernorm; "
                          f"this model has {cfg.vision.layer_norm_eps} and "
                          f"{cfg.vision.post_layer_norm_eps}")
    vision = _to_hf(cfg.vision, _HF_VISION)
    qformer = _to_hf(cfg.qformer, _HF_QFORMER)
    if cfg.qformer_text_input:
        # InstructBlipConfig: no use_qformer_text_input (always built), no ITC width.
        del qformer["use_qformer_text_input"]
        out: dict[str, Any] = dict(model_type="instructblip", vision_config=vision,
                                   qformer_config=qformer, num_query_tokens=cfg.num_query_tokens,
                                   architectures=["InstructBlipForConditionalGeneration"])
    else:
        out = dict(model_type="blip-2", vision_config=vision, qformer_config=qformer,
                   num_query_tokens=cfg.num_query_tokens, image_text_hidden_size=cfg.embed_dim)
    if cfg.llm is None:
        out["architectures"] = ["Blip2ForImageTextRetrieval"]
    elif not cfg.qformer_text_input:
        out["architectures"] = ["Blip2ForConditionalGeneration"]
    if cfg.llm is not None:
        if isinstance(cfg.llm, OPTConfig):
            text = dict(model_type="opt", **_to_hf(cfg.llm, _HF_OPT))
        elif isinstance(cfg.llm, LlamaConfig):
            text = llama_to_hf(cfg.llm)
        else:
            text = dict(model_type="t5", **_to_hf(cfg.llm, _HF_T5),
                        feed_forward_proj=("gated-" if cfg.llm.gated else "")
                        + ("gelu" if "gelu" in cfg.llm.activation else cfg.llm.activation),
                        dense_act_fn=cfg.llm.activation, is_encoder_decoder=True)
            text["scale_decoder_outputs"] = cfg.llm.scales_decoder_output
        out["text_config"] = text
        out["use_decoder_only_language_model"] = cfg.decoder_only
    if cfg.image_token_index is not None:
        out["image_token_index"] = cfg.image_token_index
    return out


def read_hf_config(path: Union[str, os.PathLike]) -> Blip2Config:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            return from_hf_dict(json.load(f))
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {file}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------
# Presets: values of the released checkpoints (their HF config.json files) and tiny ones for tests.
# ----------------------------------------------------------------------------------------------
EVA_VIT_G = VisionConfig()
CLIP_VIT_L = VisionConfig(variant="clip", hidden_size=1024, intermediate_size=4096, num_layers=23,
                          num_heads=16, layer_norm_eps=1e-5, post_layer_norm_eps=1e-5,
                          activation="quick_gelu")
_QF_GEN = QFormerConfig(has_text_input=False)
_QF_RET = QFormerConfig(has_text_input=True)
OPT_2_7B = OPTConfig(vocab_size=50304, hidden_size=2560, num_layers=32, num_heads=32,
                     ffn_dim=10240, word_embed_proj_dim=2560, eos_token_id=50118)
OPT_6_7B = OPTConfig(vocab_size=50304, hidden_size=4096, num_layers=32, num_heads=32,
                     ffn_dim=16384, word_embed_proj_dim=4096, eos_token_id=50118)
FLAN_T5_XL = T5Config(d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32,
                      bos_token_id=1, scale_decoder_outputs=False)
FLAN_T5_XXL = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_decoder_layers=24,
                       num_heads=64, bos_token_id=1, scale_decoder_outputs=False)


def _gen(llm, image_size=224, vision=EVA_VIT_G, image_token_index=None):
    v = dataclasses.replace(vision, image_size=image_size)
    return Blip2Config(vision=v, qformer=dataclasses.replace(
        _QF_GEN, encoder_hidden_size=v.hidden_size), llm=llm, image_token_index=image_token_index)


def _retrieval(image_size=224, vision=EVA_VIT_G, itg=False):
    v = dataclasses.replace(vision, image_size=image_size)
    return Blip2Config(vision=v, qformer=dataclasses.replace(
        _QF_RET, encoder_hidden_size=v.hidden_size), itc=True, itm=True, itg=itg)


PRESETS: dict[str, Blip2Config] = {
    "blip2-opt-2.7b": _gen(OPT_2_7B, image_token_index=50265),
    "blip2-opt-6.7b": _gen(OPT_6_7B, image_token_index=50265),
    "blip2-opt-2.7b-coco": _gen(OPT_2_7B, 364, image_token_index=50265),
    "blip2-opt-6.7b-coco": _gen(OPT_6_7B, 364, image_token_index=50265),
    "blip2-flan-t5-xl": _gen(FLAN_T5_XL, image_token_index=32100),
    "blip2-flan-t5-xxl": _gen(FLAN_T5_XXL, image_token_index=32100),
    "blip2-flan-t5-xl-coco": _gen(FLAN_T5_XL, 364, image_token_index=32100),
    "blip2-itm-vit-g": _retrieval(),
    "blip2-itm-vit-g-coco": _retrieval(364),
    # LAVIS pre-training models (stage 1 with the ITG head; stage 2 from it).
    "blip2-pretrain-vit-g": _retrieval(itg=True),
    "blip2-pretrain-vit-l": _retrieval(vision=CLIP_VIT_L, itg=True),
    "blip2-pretrain-vit-l-opt-2.7b": _gen(OPT_2_7B, vision=CLIP_VIT_L),
    "blip2-pretrain-vit-l-flan-t5-xl": _gen(FLAN_T5_XL, vision=CLIP_VIT_L),
}

# Tiny presets: same code paths, seconds to run on a CPU.
TINY_VISION = VisionConfig(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=4,
                           image_size=30, patch_size=6)
TINY_CLIP = dataclasses.replace(CLIP_VIT_L, hidden_size=32, intermediate_size=37, num_layers=2,
                                num_heads=4, image_size=30, patch_size=6)
TINY_QFORMER = QFormerConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                             intermediate_size=37, max_position_embeddings=64,
                             cross_attention_frequency=1, encoder_hidden_size=32,
                             has_text_input=True)
TINY_OPT = OPTConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, ffn_dim=37,
                     max_position_embeddings=64, word_embed_proj_dim=32)
# LLaMA towers (hub config.json values).
VICUNA_7B = LlamaConfig(pad_token_id=0)
VICUNA_13B = LlamaConfig(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824,
                         pad_token_id=0)
LLAMA_2_7B = LlamaConfig(rms_norm_eps=1e-5, max_position_embeddings=4096)
LLAMA_3_8B = LlamaConfig(vocab_size=128256, num_kv_heads=8, intermediate_size=14336,
                         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                         bos_token_id=128000, eos_token_id=128001)
LLAMA_3_1_8B = dataclasses.replace(
    LLAMA_3_8B, max_position_embeddings=131072,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
TINY_LLAMA = LlamaConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=37, max_position_embeddings=64,
                         pad_token_id=0)
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "vicuna-7b-v1.1": VICUNA_7B,
    "vicuna-13b-v1.1": VICUNA_13B,
    "llama-2-7b": LLAMA_2_7B,
    "llama-3-8b": LLAMA_3_8B,
    "llama-3.1-8b": LLAMA_3_1_8B,
    "tiny-llama": TINY_LLAMA,
}

TINY_T5 = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                   num_heads=4, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, scale_decoder_outputs=False)

# BLIP-2 with a LLaMA-3 LLM (no released checkpoint: configs/stage2.py:llama3-8b trains one).
PRESETS["blip2-llama-3-8b"] = _gen(LLAMA_3_8B)

PRESETS.update({
    "tiny-stage1": Blip2Config(vision=TINY_VISION, qformer=TINY_QFORMER, num_query_tokens=4,
                               embed_dim=16, itc=True, itm=True, itg=True),
    "tiny-opt": Blip2Config(vision=TINY_VISION, qformer=dataclasses.replace(
        TINY_QFORMER, has_text_input=False), llm=TINY_OPT, num_query_tokens=4),
    "tiny-t5": Blip2Config(vision=TINY_VISION, qformer=dataclasses.replace(
        TINY_QFORMER, has_text_input=False), llm=TINY_T5, num_query_tokens=4),
    "tiny-llama": Blip2Config(vision=TINY_VISION, qformer=dataclasses.replace(
        TINY_QFORMER, has_text_input=False), llm=TINY_LLAMA, num_query_tokens=4),
    "tiny-clip-stage1": Blip2Config(vision=TINY_CLIP, qformer=TINY_QFORMER, num_query_tokens=4,
                                    embed_dim=16, itc=True, itm=True, itg=True),
})


# InstructBLIP (HF `Salesforce/instructblip-*` config.json): instruction-aware Q-Former (text
# tables and text FFN kept), LLaMA text configs with the decapoda-era special ids (bos 0, eos 1,
# pad 32000; LAVIS stops on "</s>" = 2: pass eos_token_id=2 for its behaviour). vicuna-7b's hub
# config has the 2024 vocabulary (32064 rows, image token 32001); vicuna-13b's still the old 32001
# rows and no image_token_index.
def _instruct(llm, image_token_index=None):
    return Blip2Config(vision=EVA_VIT_G, qformer=_QF_RET, llm=llm,
                       image_token_index=image_token_index, qformer_text_input=True)


_INSTRUCT_VICUNA_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=32000)
PRESETS.update({
    "instructblip-vicuna-7b": _instruct(dataclasses.replace(
        VICUNA_7B, vocab_size=32064, **_INSTRUCT_VICUNA_IDS), 32001),
    "instructblip-vicuna-13b": _instruct(dataclasses.replace(
        VICUNA_13B, vocab_size=32001, **_INSTRUCT_VICUNA_IDS)),
    "instructblip-flan-t5-xl": _instruct(FLAN_T5_XL, 32100),
    "instructblip-flan-t5-xxl": _instruct(FLAN_T5_XXL, 32100),
    "tiny-instructblip-llama": Blip2Config(vision=TINY_VISION, qformer=TINY_QFORMER,
                                           llm=TINY_LLAMA, num_query_tokens=4,
                                           qformer_text_input=True),
    "tiny-instructblip-t5": Blip2Config(vision=TINY_VISION, qformer=TINY_QFORMER, llm=TINY_T5,
                                        num_query_tokens=4, qformer_text_input=True),
})


def get_preset(name: str) -> Blip2Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
