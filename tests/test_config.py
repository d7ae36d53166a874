"""Config types, presets and HF config.json translation."""
import dataclasses

import pytest
from transformers import Blip2Config as HFBlip2Config
from transformers import OPTConfig as HFOPTConfig
from transformers import T5Config as HFT5Config

from blip2_jax import config as C


def _hf_blip2(text=None, **kw):
    return HFBlip2Config(text_config=None if text is None else text.to_dict(), **kw).to_dict()


def test_hf_defaults_are_the_released_vit_g_and_qformer():
    cfg = C.from_hf_dict(_hf_blip2())
    assert cfg.vision == C.EVA_VIT_G
    assert cfg.qformer == dataclasses.replace(C.QFormerConfig(), vocab_size=30522,
                                              has_text_input=False)
    assert cfg.num_query_tokens == 32 and cfg.embed_dim == 256


def test_opt_2_7b_hub_config_matches_preset():
    # Values of Salesforce/blip2-opt-2.7b's config.json .
    opt = HFOPTConfig(vocab_size=50304, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                      num_attention_heads=32, word_embed_proj_dim=2560, eos_token_id=50118)
    cfg = C.from_hf_dict(_hf_blip2(opt, image_token_index=50265))
    preset = C.get_preset("blip2-opt-2.7b")
    assert cfg.llm == preset.llm
    assert cfg.vision == preset.vision and cfg.image_token_index == 50265


def test_flan_t5_xl_activation_rule():
    # BLIP-2's FlanT5 stores dense_act_fn "gelu" explicitly: exact GELU, not gelu_new.
    t5 = HFT5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, bos_token_id=1)
    d = _hf_blip2(t5, image_token_index=32100)
    # transformers 5 rewrites the tie flag (the checkpoint decides, see convert/hf.py); the hub
    # config.json (written by 4.x) says tie_word_embeddings=false and has no scale field.
    assert d["text_config"]["scale_decoder_outputs"] is False
    del d["text_config"]["scale_decoder_outputs"]
    d["text_config"]["tie_word_embeddings"] = False
    d["text_config"]["dense_act_fn"] = "gelu"
    cfg = C.from_hf_dict(d)
    assert cfg.llm == C.get_preset("blip2-flan-t5-xl").llm
    d["text_config"].pop("dense_act_fn")
    assert C.from_hf_dict(d).llm.activation == "gelu_new"   # stock FlanT5 rule


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-t5", "blip2-opt-6.7b", "blip2-flan-t5-xxl",
                                  "blip2-itm-vit-g-coco"])
def test_hf_dict_round_trip(name):
    cfg = C.get_preset(name)
    back = C.from_hf_dict(C.to_hf_dict(cfg))
    assert back == cfg
    # transformers accepts what we write
    hf = HFBlip2Config(**{k: v for k, v in C.to_hf_dict(cfg).items() if k != "model_type"})
    assert hf.num_query_tokens == cfg.num_query_tokens


def test_native_dict_round_trip_keeps_dtypes():
    cfg = C.get_preset("tiny-stage1").with_dtypes("bfloat16", "float32")
    assert C.Blip2Config.from_dict(cfg.to_dict()) == cfg
    assert C.Blip2Config.from_dict(C.get_preset("tiny-t5").to_dict()) == C.get_preset("tiny-t5")


def test_bad_configs_name_the_field():
    with pytest.raises(C.ConfigError, match="encoder_hidden_size"):
        C.Blip2Config(vision=C.TINY_VISION, qformer=C.QFormerConfig())
    with pytest.raises(C.ConfigError, match="unknown vision config field.*hiden_size"):
        C.Blip2Config.from_dict({"vision": {"hiden_size": 3}})
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.get_preset("blip2-opt-99b")
    with pytest.raises(C.ConfigError, match="model_type"):
        C.from_hf_dict({"model_type": "llava"})
    with pytest.raises(C.ConfigError, match="CLIP"):
        C.to_hf_dict(C.get_preset("blip2-pretrain-vit-l"))


def test_param_counts_match_the_paper():
    # The paper §3.1: stage-2 trainable (Q-Former w/o text parts + projection + ln_vision) 107.1M for
    # OPT-2.7B; stage-1 Q-Former 186.7M. Counted from abstract shapes (nothing allocated).
    import numpy as np
    from blip2_jax.models.blip2 import abstract_params

    def count(tree, keys):
        return sum(int(np.prod(x.shape)) for k in keys if k in tree
                   for x in __import__("jax").tree.leaves(tree[k]))
    p = abstract_params(C.get_preset("blip2-opt-2.7b"))
    trainable = count(p, ["qformer", "query_tokens", "llm_proj", "ln_vision"])
    assert abs(trainable / 1e6 - 107.1) < 0.1, trainable
    s1 = abstract_params(C.get_preset("blip2-pretrain-vit-g"))
    qformer = count(s1, ["qformer", "query_tokens", "vision_proj", "text_proj", "itm_head", "temp",
                         "lm_head"])
    assert abs(qformer / 1e6 - 186.7) < 0.1, qformer
    vit = count(s1, ["vision"])
    assert abs(vit / 1e6 - 985.9) < 0.2, vit
