#!/usr/bin/env bash
# Full-size SmolVLA training speed on a GPU machine with no network:
#   ./scripts/gpu_bench.sh WHEELS_DIR [OUT_DIR]
# WHEELS_DIR holds every wheel zk0 needs, made where the network is, e.g.
#   pip download -d wheels './app[sim]' hatchling editables
# (Linux torch from PyPI is a CUDA build; its nvidia-* wheels come along.) The script makes a
# venv from those wheels only, then times one local zk0 round (bf16 autocast, FedProx term,
# 512x512 two cameras, random weights) at batch 16 and 64: step time, samples/s, peak GPU memory; then
# full-size SmolVLA driving the simulated SO-101 arm (zk0 eval --sim, frames rendered with EGL): seconds per episode.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:?usage: $0 WHEELS_DIR [OUT_DIR]}
OUT=${2:-outputs/gpu-bench}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3.12}
[ -d "$WHEELS" ] || { echo "gpu_bench: no wheel directory $WHEELS" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-index: nothing but the wheels; the build backend (hatchling) must be among them too.
"$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" -e './app[sim]'
"$VENV/bin/python" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", ok); sys.exit(0 if ok else 3)'
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# A quick check that everything runs (small model, seconds), then the real figures.
"$VENV/bin/python" -m zk0.bench.perf gpu --smoke --json "$OUT/gpu-smoke.json"
"$VENV/bin/python" -m zk0.bench.perf gpu --batch-sizes 16 64 --steps "${STEPS:-20}" --json "$OUT/gpu.json"
# Closed loop at full size: random weights score nothing; the figure is the cost per simulated episode.
"$VENV/bin/python" -c 'import sys; from pathlib import Path; from zk0.bench.models import save_base_policy; save_base_policy(Path(sys.argv[1]), full=True)' "$OUT/full"
MUJOCO_GL=${MUJOCO_GL:-egl} "$VENV/bin/zk0" eval --sim lift-top,place-laptop --checkpoint "$OUT/full/base-policy" \
    --episodes "${SIM_EPISODES:-2}" --device cuda --json "$OUT/sim-eval.json"
echo "gpu_bench: figures in $OUT/gpu.json and $OUT/sim-eval.json"
