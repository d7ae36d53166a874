#!/usr/bin/env bash
# The GPU suite (issue 8): one table of how fast blip2-jax trains and captions at the paper's
# sizes on one GPU, against HF transformers (PyTorch) on the same GPU. Sized for one NVIDIA H200
# (139 GiB; untried on an H100: a CPU compile put stage 1 near 65 GB) with no network; under
# 7 minutes in all (a total budget, GPU_SUITE_TOTAL_S, caps the parts' time limits). Parts, each
# its own process with its own `timeout` (bench/gpu_suite.py says exactly what each measures):
#   matmul        jax bf16 8192³ matmul: the measured peak that MFU is computed against
#   stage1        our train step (train.trainer.Trainer, as train.py) on blip2-pretrain-vit-g:
#                 EVA ViT-g frozen bf16 + BERT-base Q-Former, ITC+ITM+ITG, B=128, text 32, bf16
#                 compute; steps/s, images/s, MFU (train/flops.py model FLOPs / measured peak)
#   stage2-jax    our step on blip2-opt-2.7b (ViT-g + OPT-2.7B frozen bf16), B=64, text 32
#   stage2-torch  HF Blip2ForConditionalGeneration training step, same config/batch: bf16
#                 frozen towers, SDPA, Q-Former/projection/query tokens fp32 under autocast bf16
#   beam-jax      Blip2.generate(num_beams=5, max_new_tokens=30, min_new_tokens=30), B=16, bf16
#   beam-torch    HF generate(num_beams=5, max_new_tokens=30, min_new_tokens=30), same model
#   table         the markdown table (targets: stage-1 MFU >= 50 %, stage 2 >= 1.5x HF, beam-5
#                 >= 3x HF), printed and written to gpu_table.md
# Random weights and inputs, created on the GPU. Each part appends a JSON line to
# $OUT/gpu_results.jsonl (bench/gpu_results.jsonl without $OUT; emptied at the start); all output
# is logged to $OUT/gpu_log.txt (bench/gpu_log.txt).
#
# With the device tool (the H200; the suite wants ~7 min of device time):
#   run(kind="nvidia-h200", timeout_s=480, command="COMMIT=<sha> bash bench/gpu.sh")
# Dry run on a CPU (tiny presets, batch 2; torch on the CPU too), a few minutes:
#   GPU_SUITE_SMALL=1 JAX_PLATFORMS=cpu PYTHON=.venv/bin/python bash bench/gpu.sh
#
# Knobs (environment): PYTHON (python3); OUT; COMMIT (else `git rev-parse --short HEAD`);
# GPU_SUITE_SMALL=1; PARTS (default "matmul stage1 stage2-jax stage2-torch beam-jax
# beam-torch"); GPU_SUITE_TOTAL_S (410: total budget, seconds); per-part caps MATMUL_LIMIT (60),
# STAGE1_LIMIT (170), STAGE2_JAX_LIMIT (140), STAGE2_TORCH_LIMIT (90), BEAM_JAX_LIMIT (120),
# BEAM_TORCH_LIMIT (90); sizes S1_BATCH (128), S2_BATCH (64), BEAM_BATCH (16), TEXT_LEN (32),
# NEW_TOKENS (30), BEAMS (5), ITERS (10), BEAM_ITERS (3), MATMUL_N (8192); JAX_MEM_FRACTION
# (0.90 of the GPU for each JAX process); TORCH_DEVICE (cuda); JAX_PLATFORMS, XLA_FLAGS pass on.
set -u -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}       # CPU dry runs on a shared machine
# One framework per process, each alone on the GPU: JAX may take most of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${JAX_MEM_FRACTION:-0.90}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${OUT:-bench}
mkdir -p "$DIR"
RES=$DIR/gpu_results.jsonl
LOG=$DIR/gpu_log.txt
TOTAL=${GPU_SUITE_TOTAL_S:-410}
RESERVE=20                        # seconds kept for the kill grace and the table
PARTS=" ${PARTS:-matmul stage1 stage2-jax stage2-torch beam-jax beam-torch} "

stage() { echo; echo "=== $* ($(date -u +%T), ${SECONDS}s) ==="; }

run_part() {  # run_part NAME CAP_SECONDS
  local name=$1 cap=$2 left lim t0 rc
  [[ $PARTS == *" $name "* ]] || return 0
  left=$((TOTAL - SECONDS - RESERVE))
  lim=$((cap < left ? cap : left))
  if [ "$lim" -lt 15 ]; then
    stage "$name: skipped, ${left}s of the ${TOTAL}s budget left"
    echo "{\"run\": \"$name\", \"skipped\": \"out of the ${TOTAL} s budget\"," \
         "\"wall_s\": 0}" >>"$RES"
    return 0
  fi
  stage "$name (limit ${lim}s)"
  t0=$SECONDS
  timeout -k 5 "$lim" "$PY" bench/gpu_suite.py "$name" --results "$RES" 2>&1 \
    | grep -v -e "^\s*$" -e "Writing model shards"
  rc=${PIPESTATUS[0]}
  echo "$name: exit $rc after $((SECONDS - t0))s"
  echo "{\"run\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0))," \
       "\"limit_s\": $lim}" >>"$RES"
}

main() {
  : >"$RES"
  stage "environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    2>/dev/null || echo "no nvidia-smi"
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  echo "mode: $([ "${GPU_SUITE_SMALL:-0}" = 1 ] && echo SMALL dry run || echo full size)," \
       "JAX_PLATFORMS=${JAX_PLATFORMS:-<default>}, budget ${TOTAL}s, parts:${PARTS}"
  run_part matmul "${MATMUL_LIMIT:-60}"
  run_part stage1 "${STAGE1_LIMIT:-170}"
  run_part stage2-jax "${STAGE2_JAX_LIMIT:-140}"
  run_part stage2-torch "${STAGE2_TORCH_LIMIT:-90}"
  run_part beam-jax "${BEAM_JAX_LIMIT:-120}"
  run_part beam-torch "${BEAM_TORCH_LIMIT:-90}"
  stage "table (total ${SECONDS}s)"
  timeout -k 5 60 "$PY" bench/gpu_suite.py table --results "$RES" | tee "$DIR/gpu_table.md"
}

main 2>&1 | tee "$LOG"
