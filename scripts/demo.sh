#!/usr/bin/env bash
# The main job from a fresh clone: venv + requirements, then the whole BLIP-2 recipe at toy scale
# on the built-in synthetic dataset (python -m blip2_jax.demo): data → unimodal towers (a ViT and
# an LM that reads text only) → stage 1 → stage 2 → held-out retrieval, captions and zero-shot
# VQA beside its baselines. Re-running continues where it stopped (finished steps are kept under
# the work directory). Arguments go to the demo (--work DIR, --captions N, --ablation).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error   # no "PyTorch was not found" notice
.venv/bin/python -m blip2_jax.demo "$@"
