#!/usr/bin/env bash
# GPU host check: what the CPU machines of this project cannot run.
#
#   bash bench/gpu_check.sh [WORKDIR]
#
# From the repository root of a Linux host with NVIDIA GPUs and the package index reachable.
# Under 10 minutes on one GPU (most of it the first install). Checks, one summary line each:
#   cuda         torch sees the GPUs (CUDA build of the pinned torch), bf16 support
#   nccl         adcore.training.dist collectives over NCCL on every local GPU (torchrun; world size 1 too)
#   ddp-train    jobs/train.py --use-gpu --num-workers <GPUs>: DDP with NCCL, two short epochs, on cuda
#   bank-train   PatchCore through the same job: features on every GPU, the bank gathered over NCCL
#   score-cuda   the scorer loads on CUDA (engine auto -> torch) with a faiss-gpu index
#   onnx-cuda    the exported ONNX graph on onnxruntime's CUDA provider matches torch on CUDA
#   replica-rate images/s per GPU of the network alone and of the whole replica (pinned copy, network,
#                FAISS head: bench/replica_rate.py), fp32 and bf16 autocast, each with its image AUROC
# Exit status: the number of failed checks. Environment: GPU_CHECK_VENV (default .venv-gpu),
# PYTHON (default python3.11), GPU_CHECK_NO_INSTALL=1 to use the venv as it is.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 99
WORK=${1:-$(mktemp -d /tmp/gpucheck.XXXXXX)}
mkdir -p "$WORK"
VENV=${GPU_CHECK_VENV:-.venv-gpu}
PY="$VENV/bin/python"
FAILED=0
SUMMARY=()
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 RAY_TMPDIR="$WORK/ray"
mkdir -p "$RAY_TMPDIR"

record() { # name status detail
  SUMMARY+=("CHECK $1: $2 $3")
  echo "CHECK $1: $2 $3"
  [ "$2" = PASS ] || FAILED=$((FAILED + 1))
}

run_check() { # name timeout_s command... ; the command's last output line is the detail
  local name=$1 limit=$2
  shift 2
  local log="$WORK/$name.log"
  if timeout "$limit" "$@" >"$log" 2>&1; then
    record "$name" PASS "$(tail -n 1 "$log")"
  else
    record "$name" FAIL "(rc $?, see $log) $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)"
  fi
}

if [ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ]; then
  echo "== installing into $VENV (PyPI's Linux torch wheel is the CUDA build)"
  if ! { [ -x "$PY" ] || "${PYTHON:-python3.11}" -m venv "$VENV"; } \
    || ! "$PY" -m pip install -q --upgrade pip \
    || ! "$PY" -m pip install -q -e ".[gpu,demo,dev]" \
    || ! "$PY" -m pip uninstall -q -y onnxruntime \
    || ! "$PY" -m pip install -q onnxruntime-gpu; then
    record install FAIL "pip install into $VENV failed"
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
  fi
fi

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
run_check cuda 120 "$PY" -c "
import torch
assert torch.cuda.is_available(), f'torch {torch.__version__} sees no CUDA device (CPU build?)'
names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
print(f'{torch.cuda.device_count()} GPU(s) {names}, torch {torch.__version__}, CUDA {torch.version.cuda}, '
      f'bf16 {torch.cuda.is_bf16_supported()}')
"
if [ "$NGPU" -lt 1 ]; then
  printf '%s\n' "== summary" "${SUMMARY[@]}"
  exit "$((FAILED + 5))"
fi

cat >"$WORK/nccl_check.py" <<'EOF'
import os

import numpy as np
import torch
import torch.distributed as td

from adcore.training import dist

td.init_process_group("nccl")
rank, world = td.get_rank(), td.get_world_size()
device = dist.resolve_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
assert dist.collective_device().type == "cuda"
assert dist.agree_stop(rank == world - 1, world) is True, "one rank's stop is every rank's"
assert dist.agree_stop(False, world) is False
assert dist.min_int(10 + rank, world) == 10
assert dist.mean(float(rank), world) == sum(range(world)) / world
rows = dist.gather_arrays(np.full((rank + 1, 4), rank, np.float32), world)
assert rows.shape == (world * (world + 1) // 2, 4) and rows[-1, 0] == world - 1
assert len(dist.gather_objects(dist.rng_state(), world)) == world
td.barrier()
if rank == 0:
    print(f"world size {world}: agree_stop, min_int, mean, gather_arrays, gather_objects on {device} over NCCL")
td.destroy_process_group()
EOF
run_check nccl 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$WORK/nccl_check.py"

echo "== demo data"
"$PY" -m adcore.data.demo --output "$WORK/demo" --n-train 64 --n-valid 16 --n-test 8 >"$WORK/demo.log" 2>&1 \
  || record demo FAIL "(see $WORK/demo.log)"

train_job() { # preset output [flags of the preset's schedule...]
  "$PY" jobs/train.py --data "$WORK/demo" --preset "$1" --tiny --batch-size 8 \
    --num-workers "$NGPU" --use-gpu --output "$WORK/$2" --storage "$WORK/$2-ckpt" "${@:3}"
}
ddp_train() {
  train_job fusion-small fs --epochs 2 || return 1
  grep -q "trains on cuda" "$WORK/ddp-train.log" || { echo "no rank reported a CUDA device"; return 1; }
  grep -q "\[train\] fusion epoch 2/2" "$WORK/ddp-train.log" || { echo "no second epoch"; return 1; }
  echo "$NGPU worker(s) on cuda, $(grep -o 'autocast [^ ]* on cuda[^ ]*' "$WORK/ddp-train.log" | head -n 1 \
    || true), $(grep '\[train\] fusion epoch 2/2' "$WORK/ddp-train.log" | tail -n 1 | sed 's/.*\[train\] //')"
}
bank_train() {
  train_job patchcore pc || return 1
  grep -o "memory bank: .*" "$WORK/bank-train.log" | tail -n 1
}
export -f train_job ddp_train bank_train
export PY WORK NGPU
run_check ddp-train 300 bash -c ddp_train
run_check bank-train 240 bash -c bank_train

cat >"$WORK/score_check.py" <<'EOF'
import sys

import numpy as np
import torch

from adcore.data import bmad
from adcore.engine import choose_engine, load_scorer

artifact, data = sys.argv[1], sys.argv[2]
assert choose_engine("auto") == "torch", "engine auto should pick torch on a CUDA host"
scorer = load_scorer(artifact)
device = next(scorer.model.parameters()).device
assert device.type == "cuda", f"network on {device}"
index = scorer.head.index
assert index.device == "cuda", "FAISS index on the CPU (faiss-cpu installed, or faiss sees no GPU)"
images = [bmad.load_sample(s)[0] for s in bmad.list_split(data, "test")]
results = scorer.score_images(images, 8)
assert all(np.isfinite(r.score) for r in results)
print(f"{len(results)} images scored: network on {device}, FAISS index on {index.device}, engine torch")
EOF
run_check score-cuda 180 "$PY" "$WORK/score_check.py" "$WORK/pc" "$WORK/demo"

cat >"$WORK/onnx_check.py" <<'EOF'
import sys

import numpy as np

from adcore.data import bmad
from adcore.engine import load_scorer
from adcore.export import OnnxNetwork, export_onnx
from adcore.scorer import OUTPUT_NAMES, TorchNetwork, as_float, as_uint8, prepare

artifact, data, out = sys.argv[1:4]
cpu = load_scorer(artifact, use_gpu=False)
path = export_onnx(cpu, f"{out}/model.onnx")
onnx = OnnxNetwork(path, providers=["CUDAExecutionProvider"])
assert onnx.providers[0] == "CUDAExecutionProvider", f"onnxruntime providers {onnx.providers}"
gpu = load_scorer(artifact, use_gpu=True)
images = [bmad.load_sample(s)[0] for s in bmad.list_split(data, "test")]
pixels = as_uint8(np.stack([prepare(im, gpu.input_size) for im in images]))
got, want = onnx(pixels), TorchNetwork(gpu.model)(as_float(pixels))
diffs = {k: float(np.abs(got[k] - want[k]).max()) for k in OUTPUT_NAMES}
assert diffs["score"] < 1e-3 and diffs["anomaly_map"] < 1e-3, f"max abs differences {diffs}"
print("onnxruntime CUDA vs torch CUDA, max abs diff " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
EOF
run_check onnx-cuda 240 "$PY" "$WORK/onnx_check.py" "$WORK/fs" "$WORK/demo" "$WORK"

run_check replica-rate 300 "$PY" bench/replica_rate.py "$WORK/pc" "$WORK/demo"

echo "== summary (logs in $WORK)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
