#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): the CUDA correctness suite (bf16
# included), the full benchmark matrix and its report, and the static model's
# calibration (bench/calibrate.py), everything written under $OUT.
#
#   here, once:  pip download --no-deps -d .wheels kornia kornia_rs   # the device has no network
#   device run:  bash bench/gpu_session.sh      (carry: [".wheels"])
#
# The device image has torch, triton and pytest-benchmark; kornia (for the trainer's
# augmentation) and xformers (optional backend) come from carried wheels when present.
set -uo pipefail
OUT=${OUT:-/tmp/adclr-out}
mkdir -p "$OUT"
if [ -d .wheels ]; then python -m pip install --no-index --no-deps -q .wheels/*.whl; fi
export PYTHONPATH=$PWD

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

# Correctness first: the whole suite natively on CUDA (conftest skips the interpreter).
python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tests.txt"

device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
mkdir -p "$OUT/$device"
python -m pytest bench/ -q -p no:cacheprovider --benchmark-json="$OUT/$device/results.json" \
  2>&1 | tail -40 | tee "$OUT/bench.txt"
python -m bench.report "$OUT/$device/results.json"
# Each kernel's measured time against bench.static's estimate (the committed table).
python -m bench.calibrate --out "$OUT/$device" 2>&1 | tail -20 | tee "$OUT/calibration.txt"
