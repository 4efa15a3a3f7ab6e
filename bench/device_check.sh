#!/usr/bin/env bash
# On a CUDA machine (the device tool's machine, or any GPU box with torch installed): build for this
# GPU with all cores, run the `cuda` tests, run the GPU benchmarks, print a short table. Results
# JSON goes to bench/results/ and, when $OUT is set, to $OUT. Meant to fit 8 minutes on one H100
# (not yet run on one: no GPU was lent to the sessions so far).
#
#   bash bench/device_check.sh            (uses python3; set PYTHON to choose another)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
start=$SECONDS
MAPOPT_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) $PY setup.py -q build_ext --inplace
echo "== build for sm_${arch/./}: $((SECONDS - start)) s"
$PY -c "import json, torch, mapopt_native; print(json.dumps(mapopt_native.build_info()), torch.cuda.get_device_name())"

echo "== cuda tests"
$PY -m pytest -q -m cuda tests -p no:cacheprovider

echo "== GPU benchmarks"
$PY bench/bench_cells.py --device cuda --batch 32,256 --hidden 256,1024 --rounds 3 --min-run-time 0
$PY bench/bench_rnn.py --device cuda --batch 64 --hidden 512 --layers 1,2 --rounds 3 --min-run-time 0 --no-sru
$PY bench/bench_importance.py --device cuda --quick
$PY bench/bench_distill.py --device cuda --quick

if [ -n "${OUT:-}" ]; then
  cp bench/results/*cuda*.json "$OUT"/ 2>/dev/null || true
fi
echo "== device check done in $((SECONDS - start)) s"
