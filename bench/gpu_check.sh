#!/usr/bin/env bash
# The GPU checks of issue 9 in one run, offline, on one H100/H200-class GPU, in under 8 minutes:
#   1. numerics: the eyas engine's CUDA fp32/bf16 logits vs transformers (random ~1B Llama)
#   2. decode: per-round costs of eyas plain vs eyas EAGLE-3 with a random head (not acceptance)
#   3. the pytest tests marked `gpu` (tests/unit and tests/integration)
# and prints one table (bench/gpu_check.py). Exits 1 when a check, a test or a step failed.
#
#   bash bench/gpu_check.sh [OUT_DIR]                 # default /tmp/eyas_gpu_check
#   DEVICE=cpu SIZE=tiny TOKENS=16 CONCURRENCY="1 2" GPU_TESTS=tests/unit/test_features_capture.py \
#     bash bench/gpu_check.sh /tmp/g                  # the CPU dry run (the gpu tests skip)
# PYTHON picks the interpreter (default .venv/bin/python, else python3). Time boxes, in seconds:
# BENCH_TIMEOUT_S (240) and TESTS_TIMEOUT_S (210); a timed-out step keeps the rows it wrote, and
# pytest stopped by SIGINT still writes the results of the tests it ran.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-/tmp/eyas_gpu_check}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"  # eyas without an install
mkdir -p "$out"
rm -f "$out/rows.jsonl" "$out/gpu_tests.xml"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# shellcheck disable=SC2086  # CONCURRENCY is a list of numbers
timeout -s INT -k 20 "${BENCH_TIMEOUT_S:-240}" "$py" bench/gpu_check.py run \
  --device "${DEVICE:-cuda}" --size "${SIZE:-1b}" --tokens "${TOKENS:-128}" \
  --concurrency ${CONCURRENCY:-1 16} --work "$out/work" --rows "$out/rows.jsonl" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # GPU_TESTS is a list of paths
timeout -s INT -k 20 "${TESTS_TIMEOUT_S:-210}" "$py" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml "$out/gpu_tests.xml" ${GPU_TESTS:-tests/unit tests/integration} 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}

"$py" bench/gpu_check.py table --rows "$out/rows.jsonl" --junit "$out/gpu_tests.xml" \
  --step "bench=$bench_rc" --step "gpu tests=$tests_rc"
