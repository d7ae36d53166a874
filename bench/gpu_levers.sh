#!/usr/bin/env bash
# Speed levers of issue 8, each measured against the baseline on the same GPU in one run:
# bench/gpu_suite.py's stage-1 part (blip2-pretrain-vit-g, B=128, bf16) under
#   base          as train.py runs it
#   rbg           JAX_DEFAULT_PRNG_IMPL=unsafe_rbg: dropout bits from the hardware-friendly RNG
#                 instead of threefry (the Q-Former's hidden and attention-probability dropout)
#   no-dropout    QFORMER_DROPOUT=0: what dropout costs at all (not a lever: LAVIS trains with it)
# ~75 s per variant on an H200. Results: $OUT/gpu_results.jsonl (one line per variant, "variant").
#   run(kind="nvidia-h200", timeout_s=420, command="bash bench/gpu_levers.sh")
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${JAX_MEM_FRACTION:-0.90} PYTHONUNBUFFERED=1
RESULTS=${OUT:-bench}/gpu_results.jsonl
for v in ${VARIANTS:-base rbg no-dropout}; do
  echo "=== $v (${SECONDS}s) ==="
  case $v in
    base) env=() ;;
    rbg) env=(JAX_DEFAULT_PRNG_IMPL=unsafe_rbg) ;;
    no-dropout) env=(QFORMER_DROPOUT=0) ;;
    *) echo "unknown variant $v"; continue ;;
  esac
  env "${env[@]}" timeout -k 5 ${LIMIT:-150} "$PY" bench/gpu_suite.py stage1 --results "$RESULTS.$v" \
    2>&1 | grep -v -e "^\s*$" | tail -3
  sed "s/^{/{\"variant\": \"$v\", /" "$RESULTS.$v" >> "$RESULTS" && rm -f "$RESULTS.$v"
done
"$PY" - "$RESULTS" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = next((r for r in rows if r.get("variant") == "base" and "step" in r), None)
print("| variant | step ms | images/s | vs base |")
print("|---|---|---|---|")
for r in rows:
    if "step" not in r:
        print(f"| {r.get('variant')} | error: {r.get('error')} | | |"); continue
    ms = 1e3 * r["step"]["median_s"]
    rel = f"{1e3 * base['step']['median_s'] / ms:.2f}x" if base else "-"
    print(f"| {r.get('variant')} | {ms:.0f} | {r['images_per_s']:.0f} | {rel} |")
PYEOF
