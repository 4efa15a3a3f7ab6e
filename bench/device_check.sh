#!/usr/bin/env bash
# On a CUDA machine (the device tool's machine, or any GPU box with torch installed): build for this
# GPU with all cores, run the `cuda` tests, run the GPU benchmarks. Every stage has its own time
# limit and a failing stage does not stop the next one, so one call always reports everything it
# could. Logs and results JSON go to bench/results/ and, when $OUT is set, to $OUT. On an H200
# (2026-11-28) build + tests took 85 s and the benchmark stages about 4 minutes.
#
#   bash bench/device_check.sh [stages]   stages: comma-separated, any of build, tests, rnn,
#                                          distill, importance, cells (default: all).
#                                          PYTHON chooses the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for the bench scripts
STAGES=",${1:-build,tests,rnn,distill,importance,cells},"
LOGS=${OUT:-bench/results}
start=$SECONDS
stage() { [[ $STAGES == *",$1,"* ]]; }
mark() { echo "== $1 (t=$((SECONDS - start)) s)"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if stage build; then
  mark build
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  if ! MAPOPT_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) \
       $PY setup.py -q build_ext --inplace >"$LOGS/build.log" 2>&1; then
    grep -B2 -A12 -m8 "error" "$LOGS/build.log" | head -150
    echo "BUILD FAILED after $((SECONDS - start)) s"
    exit 1
  fi
  mark "built for sm_${arch/./}"
fi
$PY -c "import json, torch, mapopt_native; print(json.dumps(mapopt_native.build_info()), torch.cuda.get_device_name())" || exit 1

if stage tests; then
  mark "cuda tests"
  per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
  timeout 200 $PY -m pytest -q -m cuda tests -p no:cacheprovider $per_test -rfE --tb=short \
    2>&1 | tee "$LOGS/cuda_tests.log" | tail -80
fi

bench() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  if stage "$name"; then
    mark "bench $name"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOGS/bench.log" | tail -40
    [ -n "${OUT:-}" ] && cp bench/results/*_cuda.json "$OUT"/ 2>/dev/null
  fi
}
bench rnn 150 $PY bench/bench_rnn.py --device cuda --batch 64 --hidden 512 --layers 1,2 \
  --rounds 5 --min-run-time 0.3 --no-sru
bench distill 100 $PY bench/bench_distill.py --device cuda
bench importance 45 $PY bench/bench_importance.py --device cuda --quick
bench cells 90 $PY bench/bench_cells.py --device cuda --batch 32,256 --hidden 1024 --rounds 5 \
  --min-run-time 0.2
mark "device check done"
