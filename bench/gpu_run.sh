#!/usr/bin/env bash
# The GPU measurement of docs/scale-and-gpu.md ("Measured on one H200"), on a CUDA machine with no
# network whose python3 has torch (2.11, CUDA 13) but not fbgemm-gpu or torchrec. Pack first, here:
#   python3 scripts/gpu_pack.py            # .gpurun/: the tree at HEAD, wheels, fbgemm-gpu cut to fit
# then, on the machine, from the repo root with .gpurun beside it:
#   OUT=/some/dir bash .gpurun/tree/bench/gpu_run.sh
# It installs into /tmp/site, checks fbgemm's CUDA kernels against its CPU ones, then runs the training
# (configs/ml100k_sequence.yaml) and the training benchmarks with --device cuda, writing JSON to $OUT.
# A dry run of the same steps on a CPU machine: DEVICE=cpu SMALL=1 (tiny sizes; tbe_check then only
# imports and reports, having no GPU to compare). STEPS="train_run search_speed" runs some steps only.
set -uo pipefail
export PYTHONUNBUFFERED=1
TREE=$(cd "$(dirname "$0")/.." && pwd)
PACK=$(dirname "$TREE")
OUT=${OUT:-/tmp/plexrec-gpu-out}
SITE=${SITE:-/tmp/site}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-tbe_check train_run train_throughput train_sequence_throughput search_speed}
want() { [[ " $STEPS " == *" $1 "* ]]; }
if [ -n "${SMALL:-}" ]; then
  TRAIN=(--epochs 1 --profile-steps 2); THROUGHPUT=(--rows 100000 --steps 2 --warmup 1)
  SEQUENCE=(--lengths 200 --modes dare none --steps 2 --warmup 1 --users 50); SEARCH=(--lengths 200 --repeats 2)
else
  TRAIN=(); THROUGHPUT=(); SEQUENCE=(); SEARCH=()
fi
mkdir -p "$OUT"
step() { echo "== $(date -u +%T) $*"; }
quiet() { grep --line-buffered -v -E "_fbgemm_torch_compat_table has no entry|cannot determine compatibility with PyTorch|^\s*(.\[3[0-9]m|.\[0m)?\s*$|^WARNING:root:$"; }
{
step "setup ($(cat "$TREE/COMMIT" 2>/dev/null || echo '?'))"
if [ ! -f "$SITE/.plexrec-done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$PACK"/whl/*.whl || exit 1
  python3 -c "import tarfile, sys; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2])" "$PACK/fbgemm_gpu.tar.xz" "$SITE" || exit 1
  touch "$SITE/.plexrec-done"
fi
export PYTHONPATH="$SITE:$TREE"
cd "$TREE"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
python3 -c "import numpy, pandas, pyarrow, torch, torchmetrics, tensordict; print('numpy', numpy.__version__, 'pandas', pandas.__version__, 'pyarrow', pyarrow.__version__, 'torchmetrics', torchmetrics.__version__, 'tensordict', tensordict.__version__, 'cpus', __import__('os').cpu_count())"
if want tbe_check; then
  step tbe_check
  timeout 90 python3 bench/tbe_check.py --out "$OUT/tbe_check.json" || { echo "FAILED tbe_check: stopping"; exit 1; }
fi
if want train_run; then
  step train_run
  timeout 150 python3 bench/train_run.py --device "$DEVICE" --config configs/ml100k_sequence.yaml ${TRAIN[@]+"${TRAIN[@]}"} --out "$OUT/train_run_$DEVICE.json" || echo "FAILED train_run"
fi
if want train_throughput; then
  step train_throughput
  timeout 120 python3 bench/train_throughput.py --device "$DEVICE" ${THROUGHPUT[@]+"${THROUGHPUT[@]}"} --out "$OUT/train_throughput_$DEVICE.json" || echo "FAILED train_throughput"
fi
if want train_sequence_throughput; then
  step train_sequence_throughput
  timeout 140 python3 bench/train_sequence_throughput.py --device "$DEVICE" --codes after --rounds 1 ${SEQUENCE[@]+"${SEQUENCE[@]}"} --out "$OUT/train_sequence_throughput_$DEVICE.json" || echo "FAILED train_sequence_throughput"
fi
if want search_speed; then
  step search_speed
  timeout 50 python3 bench/search_speed.py --device "$DEVICE" ${SEARCH[@]+"${SEARCH[@]}"} --out "$OUT/search_speed_$DEVICE.json" || echo "FAILED search_speed"
fi
step done
} 2>&1 | quiet | tee "$OUT/log"
