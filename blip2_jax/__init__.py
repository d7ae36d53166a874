"""blip2-jax: BLIP-2 (frozen image encoder → Q-Former → frozen LLM) in JAX/Flax.

    import blip2_jax
    model = blip2_jax.load("path/to/checkpoint")      # HF save_pretrained dir or native dir
    model = blip2_jax.Blip2.random("tiny-opt")         # random weights for a preset or config
"""
from blip2_jax.api import Blip2, SurfaceError, load
from blip2_jax.config import (Blip2Config, LlamaConfig, OPTConfig, PRESETS, QFormerConfig,
                              T5Config, VisionConfig, get_preset)

__version__ = "0.1.0"
__all__ = ["Blip2", "Blip2Config", "LlamaConfig", "OPTConfig", "PRESETS", "QFormerConfig",
           "SurfaceError", "T5Config", "VisionConfig", "get_preset", "load", "__version__"]
