#!/usr/bin/env bash
# One GPU check, sized for a single short device run (at most ~7 min on an H100/H200):
#   1. the fused attention path (jax.nn.dot_product_attention, taken off CPU) against the explicit
#      one, on the GPU, fp32 and bf16, with padding/causal/fully-masked rows and a bias;
#   2. the model parity tests (blip2-jax on the GPU vs HF torch on the CPU);
#   3. bench/forward_throughput.py and bench/generate_throughput.py, JAX on the GPU vs HF torch on
#      CUDA, fp32 (TF32 off on both sides, or on with a ":--tf32" item) and bf16.
# Seen on an H200 (JAX 0.11.2, transformers 5.17 there): strict fp32 (JAX 'highest') benchmarks did
# not finish within 55-65 s, hence the TF32 items by default; the whole test list needs more than
# 140 s even on 12 workers. The tests need transformers >= 5.24 (requirements-test.txt): carry its
# wheel in .whl/ (see the device README) and it is installed first.
# Every stage has its own time limit, so a hung stage costs only its share. Everything is logged to
# $OUT/log.txt (or ./gpu_check.log without $OUT). Knobs (environment): STAGES ("env attn tests
# bench"), TESTS / TESTS2 (pytest selections), BENCHES (see below), *_LIMIT (seconds per stage).
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   GPU_CHECK_SMALL=1 JAX_PLATFORMS=cpu BENCH_DEVICE=cpu bash bench/gpu_check.sh  # dry run on CPU
set -u -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:+$OUT/log.txt}
LOG=${LOG:-gpu_check.log}
PLATFORM=${JAX_PLATFORMS:-cuda}          # JAX backend for every stage
BENCH_DEVICE=${BENCH_DEVICE:-cuda}       # torch device of the HF side of the benchmarks
SMALL=${GPU_CHECK_SMALL:-0}              # 1: tiny sizes (a CPU dry run of this script)
STAGES=" ${STAGES:-env attn tests bench} "

stage() { echo; echo "=== $* ($(date +%T), ${SECONDS}s) ==="; }

run_tests() {  # run_tests "pytest args" limit_s workers
  local n=""
  [ "$xdist" = 1 ] && [ "$3" -gt 1 ] && n="-n $3"
  JAX_PLATFORMS=$PLATFORM XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 5 "$2" \
    "$PY" -m pytest -v $1 $n --maxfail=20 --timeout 120 --tb=short -rfE -p no:cacheprovider \
    --durations=10 2>&1
  echo "pytest exit: $? (${SECONDS}s)"
}

main() {
  if ls .whl/*.whl >/dev/null 2>&1; then   # carried wheels (a newer transformers, say)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [[ $STAGES == *" env "* ]]; then
  stage "environment"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import jax, flax, torch, transformers, numpy
print("python", __import__("sys").version.split()[0], "| jax", jax.__version__, "| flax",
      flax.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| numpy", numpy.__version__)
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available())
EOF

  fi

  if [[ $STAGES == *" attn "* ]]; then
  stage "1. fused vs explicit attention on $PLATFORM"
  JAX_PLATFORMS=$PLATFORM timeout -k 5 40 "$PY" - <<'EOF'
import jax, jax.numpy as jnp, numpy as np
from blip2_jax import nn as bnn

print("backend:", jax.default_backend())
rng = np.random.default_rng(0)
B, T, S, N, H = 2, 5, 7, 4, 8
q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((B, T, N, H), (B, S, N, H), (B, S, N, H)))
bias = rng.normal(size=(1, N, T, S)).astype(np.float32)
key_mask = np.ones((B, S), np.int32); key_mask[1, 4:] = 0
full = bnn.attention_mask(jnp.asarray(key_mask), causal=True, query_len=T, key_len=S, query_offset=2)
dead = np.ones((B, 1, T, S), bool); dead[0, :, 1] = False          # a fully masked query row
worst = 0.0
for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    for name, mask, b in (("none", None, None), ("padding+causal", full, None),
                          ("bias+padding+causal", full, bias), ("fully masked row", dead, bias)):
        args = [jnp.asarray(x, dtype) for x in (q, k, v)]
        fused = jax.jit(lambda q, k, v: bnn.dot_product_attention(q, k, v, mask=mask, bias=b,
                                                                  scale=H ** -0.5))(*args)
        shape = (B, N, T, S)
        ref = jax.jit(lambda q, k, v: bnn._explicit_attention(
            q, k, v, mask=None if mask is None else jnp.broadcast_to(mask, shape),
            bias=None if b is None else jnp.broadcast_to(b, shape).astype(jnp.float32),
            scale=H ** -0.5, dropout_rate=0.0, dropout_rng=None))(*args)
        err = float(jnp.max(jnp.abs(fused.astype(jnp.float32) - ref.astype(jnp.float32))))
        worst = max(worst, err / tol)
        print(f"{jnp.dtype(dtype).name:8s} {name:22s} max|fused-explicit| {err:.2e} "
              f"(tol {tol:g}) {'ok' if err <= tol else 'FAIL'}")
raise SystemExit(0 if worst <= 1 else 1)
EOF
  echo "attention check exit: $?"
  fi

  if [[ $STAGES == *" tests "* ]]; then
  stage "2. model parity tests on $PLATFORM"
  # conftest uses os.environ.setdefault, so JAX_PLATFORMS set here wins; torch (the reference)
  # stays on CPU. xdist workers share the GPU, hence no preallocation. TESTS (and TESTS2, a second
  # pytest run) override the selection.
  local xdist=0
  "$PY" -c "import xdist" 2>/dev/null && xdist=1
  run_tests "${TESTS:-tests/test_vit.py tests/test_qformer.py tests/test_opt.py tests/test_t5.py
             tests/test_blip2.py tests/test_generate.py}" ${PYTEST_LIMIT:-140} ${PYTEST_WORKERS:-12}
  [ -n "${TESTS2:-}" ] && run_tests "$TESTS2" ${PYTEST2_LIMIT:-140} ${PYTEST2_WORKERS:-12}
  fi

  [[ $STAGES == *" bench "* ]] || { stage "done"; return; }

  stage "3. benchmarks: jax on $PLATFORM vs HF torch on $BENCH_DEVICE"
  # Half the GPU for JAX, the rest for torch in the same process.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
  # BENCHES: "forward|generate:dtype[:extra flag]" items, run in order.
  local item kind dtype flag size
  for item in ${BENCHES:-forward:float32:--tf32 forward:bfloat16 generate:float32:--tf32 generate:bfloat16}; do
    IFS=: read -r kind dtype flag <<<"$item"
    if [ "$kind" = forward ]; then
      size="--batch 32 --width 768 --layers 6 --heads 12 --image-size 224 --queries 32 --iters 10"
      [ "$SMALL" = 1 ] && size="--batch 2 --width 64 --layers 2 --heads 4 --image-size 56
                                --queries 8 --iters 2"
    else
      size="--batch 8 --width 512 --layers 4 --heads 8 --image-size 224 --queries 32
            --new-tokens 30 --beams 5 --iters 2"
      [ "$SMALL" = 1 ] && size="--batch 2 --width 64 --layers 2 --heads 4 --image-size 56
                                --queries 8 --new-tokens 5 --beams 5 --iters 1"
    fi
    echo "--- $kind, opt, $dtype $flag (start ${SECONDS}s)"
    JAX_PLATFORMS=$PLATFORM timeout -k 5 ${BENCH_LIMIT:-60} "$PY" bench/${kind}_throughput.py \
      $size --llm opt --device "$BENCH_DEVICE" --dtype $dtype $flag 2>&1 \
      | grep -v -e "Writing model shards" -e "^\s*$"
    echo "exit: ${PIPESTATUS[0]} (end ${SECONDS}s)"
  done
  stage "done"
}

main 2>&1 | tee "$LOG"
