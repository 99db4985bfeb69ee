#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no network there): run from the repository root as
#
#     bash bench/gpu_check.sh            # results under $OUT (default /tmp/gpu_check_out)
#
# Steps, in order, each under its own timeout and all under BUDGET_S (default 420 s): a step
# that would not fit in what is left is skipped and says so; a step that hangs is killed with
# its whole process group (vLLM's engine processes too), and the next one runs.
#   1. nvidia-smi and probes (torch / CUDA / vLLM / unsloth / bitsandbytes, versions)
#   2. models: the tiny offline model, a Qwen2.5-0.5B-shaped random model, a LoRA, data
#   3. pytest -m requires_gpu (GPU fine-tunes: bf16, 4-bit, unsloth; vLLM inference with and
#      without LoRA; a vLLM deployment); what is not installed skips with its reason
#   4. fine-tuning tokens/s + peak GPU memory: transformers, transformers 4-bit, unsloth,
#      unsloth 4-bit (bench/bench_gpu.py train)
#   5. vLLM tokens/s without and with LoRA (bench/bench_gpu.py vllm)
# Everything lands in $OUT: one JSON per step, its log, steps.jsonl, and gpu_check.json (all).
# WHEELHOUSE=dir: `pip install --no-index` the wheels in it first (carried in; no network).
# STEPS="probe models pytest train vllm": run only some (train and vllm need models; WORK=dir
# (default /tmp/gpu_check_work) keeps the models between calls on a warm machine).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/gpu_check_out}
BUDGET_S=${BUDGET_S:-420}
STEPS=${STEPS:-probe models pytest train vllm}
PY=${PYTHON:-$(command -v python || command -v python3)}
DEADLINE=$(($(date +%s) + BUDGET_S))
WORK=${WORK:-/tmp/gpu_check_work}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
: >"$OUT/steps.jsonl"

want() { [[ " $STEPS " == *" $1 "* ]]; }
record() { printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "reason": "%s"}\n' \
  "$1" "$2" "$3" "$4" "${5:-}" | tee -a "$OUT/steps.jsonl"; }

# run NAME CAP_S CMD...: CMD in its own process group, killed (group-wide) after min(CAP_S, left)
run() {
  local name=$1 cap=$2 left t pid wd rc start
  shift 2
  left=$((DEADLINE - $(date +%s) - 5))
  t=$((cap < left ? cap : left))
  if ((t < 15)); then
    record "$name" skipped null 0 "budget: ${left}s left"
    return 0
  fi
  echo "=== $name (timeout ${t}s, ${left}s of budget left)"
  start=$(date +%s)
  if ! command -v setsid >/dev/null; then # no process groups to kill: plain timeout
    timeout -k 5 "$t" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL_LINES:-25}" "$OUT/$name.log"
    record "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc-$rc")" "$rc" $(($(date +%s) - start))
    return 0
  fi
  # non-interactive bash: the job is no group leader, so setsid execs in place and $! is the
  # new group's id
  setsid "$@" >"$OUT/$name.log" 2>&1 &
  pid=$!
  setsid bash -c "sleep $t; kill -TERM -- -$pid 2>/dev/null; sleep 5; kill -KILL -- -$pid 2>/dev/null" &
  wd=$!
  wait "$pid"
  rc=$?
  kill -- -"$wd" 2>/dev/null
  wait "$wd" 2>/dev/null
  kill -KILL -- -"$pid" 2>/dev/null # leftovers of a finished step (engine workers) hold GPU memory
  tail -n "${TAIL_LINES:-25}" "$OUT/$name.log"
  if ((rc == 143 || rc == 137)) && (($(date +%s) - start >= t)); then
    record "$name" timeout "$rc" $(($(date +%s) - start)) "killed after ${t}s"
  else
    record "$name" "$([ "$rc" = 0 ] && echo ok || echo failed)" "$rc" $(($(date +%s) - start))
  fi
}

echo "=== machine: $(hostname) $(date -u +%FT%TZ), budget ${BUDGET_S}s, out $OUT, work $WORK"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
else
  echo "nvidia-smi: not found" | tee "$OUT/nvidia-smi.txt"
fi
if [ -n "${WHEELHOUSE:-}" ] && [ -d "$WHEELHOUSE" ]; then
  run wheelhouse 120 $PY -m pip install --no-index --find-links "$WHEELHOUSE" "$WHEELHOUSE"/*.whl
fi

want probe && run probe 60 $PY bench/bench_gpu.py probe "$OUT/probe.json"
if ! $PY -c "import torch, transformers, trl, peft, datasets, accelerate, openweights" 2>"$OUT/imports.err"; then
  why=$(tail -n 1 "$OUT/imports.err" | tr -d '"')
  echo "SKIP the model steps: $why (carry wheels with WHEELHOUSE=dir)"
  record models skipped null 0 "$why"
  STEPS=""
fi
want models && run models 150 $PY bench/bench_gpu.py models "$WORK"
if want pytest; then
  if $PY -c "import pytest" 2>/dev/null; then
    run pytest 240 $PY -m pytest -q -rs -m requires_gpu -p no:cacheprovider \
      --continue-on-collection-errors --junitxml="$OUT/pytest.xml" \
      tests/test_fine_tuning.py tests/test_inference.py tests/test_gpu_serving.py
  else
    record pytest skipped null 0 "pytest is not installed"
  fi
fi
if want train; then
  run train-transformers 90 $PY bench/bench_gpu.py train "$WORK" "$OUT/train-transformers.json"
  run train-transformers-4bit 90 $PY bench/bench_gpu.py train "$WORK" "$OUT/train-transformers-4bit.json" --4bit
  run train-unsloth 120 $PY bench/bench_gpu.py train "$WORK" "$OUT/train-unsloth.json" --engine unsloth
  run train-unsloth-4bit 120 $PY bench/bench_gpu.py train "$WORK" "$OUT/train-unsloth-4bit.json" --engine unsloth --4bit
fi
if want vllm; then
  run vllm-base 150 $PY bench/bench_gpu.py vllm "$WORK" "$OUT/vllm-base.json"
  run vllm-lora 150 $PY bench/bench_gpu.py vllm "$WORK" "$OUT/vllm-lora.json" --lora
fi
$PY bench/bench_gpu.py summary "$OUT" || true
echo "=== done in $(($(date +%s) - DEADLINE + BUDGET_S))s; results in $OUT"
