#!/usr/bin/env bash
# The CUDA correctness suite, the benchmarks and their reports, the static model's
# calibration and the tile-config sweep in one call, each stage under its own time
# limit so that one slow or failing stage costs only itself.
#
#   your own GPU:  bash bench/gpu_session.sh [STAGE ...]
#                  (LIMIT_SCALE=3 on a GPU slower than the H200 the limits were set on,
#                   an A100 say: every stage's limit times 3)
#   a lent one:    here, once: pip download --no-deps -d .wheels kornia kornia_rs xformers
#                  (no network there), plus torchvision for --decode gpu: the release that
#                  matches the device's torch (0.26 for torch 2.11), from the PyTorch index
#                  of its CUDA (e.g. .../whl/cu130); then on the device, with carry [".wheels"]:
#                  BUDGET=570 bash bench/gpu_session.sh [STAGE ...]
#
# First run (H200, 2026-11-26; bench/NOTES.md): tests ~150 s (most of it compiling),
# ops 30 s, train 40 s, calibrate 30 s, opsflex 40 s, tune 100 s, head 25 s, plus about
# 35 s to start the machine. The stages added since have not run, and their limits are
# generous: together the limits pass a lent machine's lease (15 minutes, at most 10 a
# call). So a call may have a budget, BUDGET seconds (570 there: a device call's 600 less
# the archive; unset or 0, none), and a stage runs under the smaller of its limit and
# what is left of it; a stage with under MIN_STAGE seconds left (30 unless set) is
# skipped and said so. Name the stages in order of value.
#
# Stages (default: all, in this order): tests ops train calibrate opsflex trainflex tune
# head input profile wholestep traincompiled. Not in the default list, run on its own:
# compare (`adclr compare` at a budget a CPU cannot afford, sized for about five minutes;
# its table lands in compare/). A name not listed stops the call before any stage runs.
# The reports are made afterwards, anywhere: python -m
# bench.report ops.json opsflex.json (the split files merge, ratios over the union).
# input runs nvJPEG's crops and adclr train on generated JPEGs per --decode;
# train times the step eagerly (train.json); traincompiled compiled three ways (--compile
# on, step, graph: traincompiled.json; inductor compiles each first);
# profile splits one ViT-S/16 step eager and as a CUDA graph (bench.profile);
# wholestep checks the whole-step graph on the GPU (compiles once per freeze state,
# no CUDA graph skipped, losses within bf16 of eager). The limits of input, profile
# and wholestep are estimates until they have run once (bench/NOTES.md).
# Everything lands under $COLLECT (default /tmp/adclr-results) as bench/results/<device>/...
# (copy it into a checkout to commit it), also packed in $OUT/results.tgz (default
# /tmp/adclr-out), with a one-line-per-stage $OUT/summary.txt; the archive is rewritten
# after each stage, so a call cut short still returns what finished.
set -uo pipefail
STAGES="tests ops train calibrate opsflex trainflex tune head input profile wholestep traincompiled"
asked="$*"  # "tests ops" as one argument too
[ -n "${asked// }" ] || asked=$STAGES
set -f  # the names are words, never file patterns (once checked, they hold none)
for one in $asked; do
  case " $STAGES compare " in
    *" $one "*) ;;
    *) echo "unknown stage '$one' (stages: $STAGES compare): nothing run" >&2; exit 2 ;;
  esac
done
set +f
BUDGET=${BUDGET:-0}
LIMIT_SCALE=${LIMIT_SCALE:-1}
MIN_STAGE=${MIN_STAGE:-30}
whole() {  # whole VALUE LEAST: VALUE is a whole number, LEAST or more
  case $1 in '' | *[!0-9]* | 0?*) return 1 ;; esac
  [ "$1" -ge "$2" ]
}
if ! whole "$BUDGET" 0 || ! whole "$LIMIT_SCALE" 1 || ! whole "$MIN_STAGE" 1; then
  echo "BUDGET takes a whole number of seconds (0: none), LIMIT_SCALE and MIN_STAGE whole numbers" \
       "of at least 1 (BUDGET='$BUDGET', LIMIT_SCALE='$LIMIT_SCALE', MIN_STAGE='$MIN_STAGE'): nothing run" >&2
  exit 2
fi
OUT=${OUT:-/tmp/adclr-out}
mkdir -p "$OUT" && touch "$OUT/summary.txt"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d .wheels ]; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi

device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
COLLECT=${COLLECT:-/tmp/adclr-results}  # the archive's root
RES=$COLLECT/bench/results/$device
mkdir -p "$RES"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
  python -c "import kornia; print('kornia', kornia.__version__)" 2>&1 | tail -1
  python -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1 | tail -1
  echo "cpus $(nproc)"; df -h /dev/shm | tail -1   # loader workers hand batches over in /dev/shm
} 2>&1 | tee "$RES/versions.txt"

stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$MIN_STAGE" ]; then
      echo "$name: skipped, ${left} s of the call's ${BUDGET} s budget left" | tee -a "$OUT/summary.txt"
      return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  local start=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  # SIGINT, not timeout's SIGTERM: pytest then ends its session, and pytest-benchmark
  # writes the JSON of the benchmarks that finished (on SIGTERM, none).
  timeout -s INT -k 10 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 6 "$RES/$name.log"
  tar -C "$COLLECT" -czf "$OUT/results.tgz" bench
}

# A benchmark that hangs ends at its per-test limit where pytest-timeout is installed (the
# GPU image has it; the dev extra does not need it); the stage's own limit bounds it anyway.
per_test() { python -c "import pytest_timeout" 2>/dev/null && echo "--timeout $1"; }
PYTEST="python -m pytest -q -p no:cacheprovider"
BENCH="$PYTEST $(per_test 150)"
FLEX_SHAPES="(vit_s16 or vit_b16)"  # compiled flex costs ~10-30 s per shape and pass
run_stage() {
  case $1 in
    tests)  # the kernels' suite natively on CUDA, bf16 included (compile checks ran on CPU)
      # -v --tb=line: every outcome is printed as it happens, so a cut-short run still
      # names its failures.
      stage tests 200 python -m pytest tests/adclr_kernels tests/adclr/test_fused_head_loss.py \
        -v --tb=line -rf -p no:cacheprovider -n 16 --deselect tests/adclr_kernels/test_attention_triton.py::test_launched_kernels_compile_and_fit ;;
    ops)  # every op backend but flex, every workload
      stage ops 120 $BENCH bench/test_attention.py -k "not flex" --benchmark-json="$RES/ops.json" ;;
    opsflex)  # forward+backward only: the comparison the targets are about
      stage opsflex 110 $BENCH bench/test_attention.py -k "flex and backward and $FLEX_SHAPES" \
        --benchmark-json="$RES/opsflex.json" ;;
    train)
      stage train 100 $BENCH bench/test_train_step.py -k "not flex and not compile" \
        --benchmark-json="$RES/train.json" ;;
    traincompiled)  # inductor compiles each mode first
      stage traincompiled 480 $PYTEST $(per_test 300) bench/test_train_step.py -k compile \
        --benchmark-json="$RES/traincompiled.json" ;;
    trainflex)
      stage trainflex 120 $BENCH bench/test_train_step.py -k flex --benchmark-json="$RES/trainflex.json" ;;
    calibrate)
      # Joined with the committed table (Triton 3.9 here): Triton 3.6's line tables name
      # no inlined call sites, so bench.static cannot find the loops in its code.
      stage calibrate 50 python -m bench.calibrate --out "$RES" ;;
    tune)
      stage tune 150 python -m bench.tune --out "$RES" ;;  # beside bench/results/static/tune_predicted.json
    head)
      stage head 50 $BENCH bench/test_head_loss.py --benchmark-json="$RES/head.json" ;;
    compare)  # ADCLR against DINO and random init: one seed, vit_mini at 96 px (12 x 12 patches), 3000 steps of 64,
      # on the ten-shape scenes (not compare's CPU default) at the settings of the CPU runs there.
      # The runs stay in /tmp; their tables, scores and metrics (no checkpoints) come back, also when cut short.
      stage compare 420 python -m adclr.cli compare --out /tmp/adclr-compare --device cuda --seeds 0 \
        --data builtin:shape-scenes --arch vit_mini --image-size 96 --local-size 48 --num-queries 8 \
        --batch-size 64 --max-steps 3000 --base-lr 0.001 --teacher-temp 0.04 --momentum-teacher 0.996 --compile off \
        --eval-images 1000
      mkdir -p "$RES/compare"
      tar -C /tmp/adclr-compare --exclude='*.pt' --exclude=tensorboard -cf - . | tar -C "$RES/compare" -xf -
      tar -C "$COLLECT" -czf "$OUT/results.tgz" bench ;;
    input)  # nvJPEG's crops and a --decode gpu run, then adclr train on generated JPEGs per --decode
      stage input 330 bash -c "python -m pytest -q -p no:cacheprovider tests/adclr/test_data_decode.py \
        tests/adclr/test_train_input.py -k 'nvjpeg or on_cuda' -rs; \
        $BENCH bench/test_input.py -k end_to_end -rs --benchmark-json=$RES/input.json" ;;
    profile)  # ViT-S/16, 128 images: where the step's device time goes, eager and as a CUDA graph
      stage profile 120 python -m bench.profile --compile off --json "$RES/profile.json"
      stage profilegraph 300 python -m bench.profile --compile graph --json "$RES/profilegraph.json" ;;
    wholestep)
      stage wholestep 300 python -m pytest tests/adclr/test_train.py -k whole_step_on_cuda -v --tb=short -rf -p no:cacheprovider ;;
  esac
}

for one in $asked; do run_stage "$one"; done
tar -C "$COLLECT" -czf "$OUT/results.tgz" bench
cat "$OUT/summary.txt"
