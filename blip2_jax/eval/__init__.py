"""Evaluation procedures (retrieval: `blip2_jax.eval.retrieval`)."""
