#!/usr/bin/env bash
# The whole GPU check, for a machine with one GPU, in under 10 minutes; run from the repository root:
#
#   bash bench/gpu_check.sh [REPORT] [STEP ...]
#
# REPORT defaults to $OUT/gpu-report.md when $OUT is set (the device tool's output folder), else
# runs/gpu-report.md; the logs go beside it as gpu-check-logs.tar.gz. STEPs, in this order by default:
#   setup       wheels from .whl/ (bench/gpu_wheels.sh) into /tmp/site, versions, nvidia-smi
#   tests       python -m pytest tests/gpu -x -q: NCCL collectives, flash AttnScale, 1-GPU pretrain runs
#   demo        tools/demo.py on one GPU: NCCL, bf16, ZeRO-2, per-epoch evaluation, export, eval
#   zero        bf16 ZeRO-2 and ZeRO-3 on the demo shards: 30 steps, a second process resumes to 50, export, eval
#   throughput  pretrain.py --throughput with MFU: attnscale_small_24 (micro batch 128, checkpointing on and
#               off) and attnscale_base_24 (64), bf16 ZeRO-2, torch's AdamW (FusedAdam's nvcc build skipped)
#   model_step  bench/model_step.py: plain ViT-S/24, AttnScale fused (flash) and explicit, FeatScale at 224/384 px
#   memory_depth  bench/memory_depth.py --offload: activation memory and step time at depth 12/24/48
# Each step has its own time limit, cut to what is left of GPU_CHECK_SECONDS (default 550) so the whole
# stays under the device tool's 10 minutes; a step that fails or times out is recorded with the tail of
# its log and the next one runs. The correctness steps come first, the longest benchmark last.
set -uo pipefail
cd "$(dirname "$0")/.."

REPORT=${1:-${OUT:+$OUT/gpu-report.md}}
REPORT=${REPORT:-runs/gpu-report.md}
shift $(( $# > 0 ? 1 : 0 ))
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(setup tests demo zero throughput model_step memory_depth)

export PY=${PYTHON:-python3}
export SITE=${GPU_CHECK_SITE:-/tmp/site}
export WORK=runs/gpu-check
export LOGS=$WORK/logs
export PYTHONUNBUFFERED=1
DEADLINE=$(( SECONDS + ${GPU_CHECK_SECONDS:-550} ))
mkdir -p "$LOGS" "$(dirname "$REPORT")"

# --- wheels: in this shell, so that PYTHONPATH reaches every step ---------------------------------------------

wheels_installed() {  # every .whl/ wheel's name-version.dist-info is already in $SITE
  local wheel
  for wheel in .whl/*.whl; do
    [ -d "$SITE/$(basename "$wheel" | cut -d- -f1-2).dist-info" ] || return 1
  done
}

if compgen -G ".whl/*.whl" > /dev/null; then
  if wheels_installed; then
    echo "wheels of .whl/ already in $SITE" > "$LOGS/install.log"
  else
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl > "$LOGS/install.log" 2>&1 || echo "pip install failed: exit $?" >> "$LOGS/install.log"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/: using the packages $PY already has" > "$LOGS/install.log"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- helpers the steps share ------------------------------------------------------------------------------------

ds_json() {  # ds_json BASE OUT PYTHON: BASE's DeepSpeed JSON, edited by PYTHON statements on `c`, written to OUT
  "$PY" -c "import json, sys
c = json.load(open(sys.argv[1]))
$3
json.dump(c, open(sys.argv[2], 'w'), indent=1)" "$1" "$2"
}

ensure_demo_shards() {  # the demo's digit shards, built as tools/demo.py builds them, unless the demo step did
  [ -f shards/demo/train.json ] && [ -f shards/demo/val.json ] && return 0
  "$PY" - <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tools")
import demo
from antismooth.data.shards import ShardOptions, build
counts = demo.write_digits_imagefolder(Path("shards/demo/imagefolder"))
build("shards/demo/imagefolder", "shards/demo", ShardOptions(max_count=500))
print(f"demo shards: {counts}")
EOF
}

# tools/demo.py's model and recipe, for the ZeRO runs on its shards.
DEMO_FLAGS="--model attnscale_tiny_24 --model-kwargs patch_size=4 embed_dim=64 num_heads=4 --input-size 16
  --crop-pct 1.0 --no-aug --mixup 0 --cutmix 0 --repeated-aug 1 --smoothing 0.1 --drop-path 0 --workers 4
  --data shards/demo --epochs 3 --warmup-epochs 1 --lr 8e-3 --log-every 10 --save-every 10 --keep 2"
export DEMO_FLAGS

# --- the steps: each runs in its own bash under `timeout`, its output in $LOGS/NAME.log -----------------------

step_setup() {
  cat "$LOGS/install.log"
  echo "PYTHONPATH=$PYTHONPATH"
  "$PY" - <<'EOF'
import importlib, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
for name in ("torch", "deepspeed", "timm", "webdataset", "torchvision", "pydantic", "safetensors", "tensorboard",
             "numpy", "pytest", "antismooth"):
    try:
        module = importlib.import_module(name)
        print(f"{name:12s} {getattr(module, '__version__', '?'):24s} {module.__file__}")
    except Exception as err:  # report every missing package, not just the first
        print(f"{name:12s} MISSING: {err}")
import torch
print(f"CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, NCCL {torch.cuda.nccl.version()}")
if torch.cuda.is_available():
    print(f"{torch.cuda.get_device_name()}: capability {torch.cuda.get_device_capability()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
          f"flash SDPA enabled {torch.backends.cuda.flash_sdp_enabled()}")
from deepspeed.accelerator import get_accelerator
print(f"DeepSpeed accelerator: {get_accelerator()._name}")
from antismooth.flops import peak_tflops
print(f"dense bf16 peak in antismooth.flops: {peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None} TFLOP/s")
EOF
  nvidia-smi
  command -v nvcc > /dev/null && nvcc --version | tail -n 2
}
excerpt_setup() { cat "$1"; }

step_tests() {
  "$PY" -m pytest tests/gpu -x -q -p no:cacheprovider
}
excerpt_tests() { tail -n 25 "$1"; }

step_demo() {
  "$PY" tools/demo.py --gpus 1 --deepspeed-config ds_configs/demo_bf16.json --eval-json "$WORK/demo-eval.json"
}
excerpt_demo() { grep -E "^digits:|pretrain: (attnscale|global)|nccl backend|eval epoch|done: step|^exported|top-1|demo finished" "$1"; }

# shellcheck disable=SC2086  # $DEMO_FLAGS is a list of flags, split on purpose
step_zero() {
  set -e
  ensure_demo_shards
  ds_json ds_configs/demo_bf16.json "$WORK/zero2.json" 'c["zero_optimization"] = {"stage": 2}'
  # ZeRO-3 re-gathering every parameter in every forward, as a model past DeepSpeed's reuse thresholds would.
  ds_json ds_configs/demo_bf16.json "$WORK/zero3.json" 'c["zero_optimization"] = {"stage": 3,
    "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0,
    "stage3_param_persistence_threshold": 0}'
  for stage in 2 3; do
    local run="$WORK/zero$stage"
    rm -rf "$run"
    echo "== ZeRO-$stage, bf16: to step 30 (epoch 1 ends at 22: checkpoint, evaluation), then a new process to 50"
    "$PY" pretrain.py --deepspeed_config "$WORK/zero$stage.json" --output "$run" $DEMO_FLAGS --max-steps 30
    "$PY" pretrain.py --deepspeed_config "$WORK/zero$stage.json" --output "$run" $DEMO_FLAGS --max-steps 50
    grep -q "Resumed from step00000030" "$run/log.txt" || { echo "ZeRO-$stage: the second process did not resume"; exit 1; }
    "$PY" tools/export.py "$run" --out "$WORK/zero$stage.safetensors" --overwrite
    "$PY" tools/eval.py --weights "$WORK/zero$stage.safetensors" --data shards/demo --workers 4 \
      --json "$WORK/zero$stage-eval.json"
  done
}
excerpt_zero() { grep -E "^== |pretrain: attnscale|Resumed from|saved checkpoint|eval epoch|done: step|^exported|top-1" "$1"; }

step_throughput() {
  set -e
  ensure_demo_shards
  # The repository's ZeRO-2 config with torch's AdamW: FusedAdam would first JIT-build with nvcc.
  ds_json ds_configs/zero2.json "$WORK/tp128.json" \
    'c["train_micro_batch_size_per_gpu"] = 128; c["optimizer"]["params"]["torch_adam"] = True'
  ds_json ds_configs/zero2.json "$WORK/tp128-noac.json" \
    'c["train_micro_batch_size_per_gpu"] = 128; c["optimizer"]["params"]["torch_adam"] = True
c["activation_checkpointing"]["blocks_per_checkpoint"] = 0'
  ds_json ds_configs/zero2.json "$WORK/tp64.json" \
    'c["train_micro_batch_size_per_gpu"] = 64; c["optimizer"]["params"]["torch_adam"] = True'
  for run in attnscale_small_24:tp128 attnscale_base_24:tp64 attnscale_small_24:tp128-noac; do
    local model=${run%%:*} config=${run##*:}
    rm -rf "$WORK/throughput-$config"
    "$PY" pretrain.py --deepspeed_config "$WORK/$config.json" --model "$model" --data shards/demo --workers 0 \
      --output "$WORK/throughput-$config" --throughput
  done
}
excerpt_throughput() { grep -E "pretrain: attnscale|^throughput:" "$1"; }

step_model_step() {
  "$PY" bench/model_step.py --device cuda --batch 64 --dtype bfloat16 --sdpa flash --rounds 1 --steps 10 \
    --json "$WORK/model_step.json"
}
excerpt_model_step() { grep -E "^\||px, batch|^fused AttnScale" "$1"; }

step_memory_depth() {
  "$PY" bench/memory_depth.py --device cuda --offload --rounds 1 --steps 5 --json "$WORK/memory_depth.json"
}
excerpt_memory_depth() { grep -v -E "^\[ *[0-9]+ s\]" "$1"; }

export -f ds_json ensure_demo_shards step_setup step_tests step_demo step_zero step_throughput step_model_step \
  step_memory_depth

# --- running them ---------------------------------------------------------------------------------------------

declare -A LIMIT=([setup]=60 [tests]=240 [demo]=150 [zero]=200 [throughput]=150 [model_step]=150 [memory_depth]=240)
declare -A TITLE=([setup]="a. setup: wheels, versions, nvidia-smi" [tests]="b. pytest tests/gpu -x -q"
  [demo]="c. demo on one GPU (NCCL, bf16, ZeRO-2)" [zero]="d. ZeRO-2 and ZeRO-3 bf16 with a resume, export, eval"
  [throughput]="g. pretrain.py --throughput with MFU" [model_step]="e. bench/model_step.py on cuda (flash SDPA)"
  [memory_depth]="f. bench/memory_depth.py --device cuda --offload")
SUMMARY=()

quiet() {  # a log without Python's warnings (a warning line and the source line under it): failures stay visible
  awk '/Warning: / { skip = 1; next } skip && /^  / { skip = 0; next } { skip = 0; print }' "$1"
}

run_step() {  # run_step NAME: step_NAME under its time limit; its status and log excerpt appended to the report
  local name=$1 log="$LOGS/$1.log" limit=${LIMIT[$1]} left=$(( DEADLINE - SECONDS - 5 )) start=$SECONDS rc=0 status
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    printf '\n## %s: SKIPPED, %d s of the budget left\n' "${TITLE[$name]}" "$left" >> "$REPORT"
    SUMMARY+=("| $name | SKIPPED | |")
    return
  fi
  echo "[gpu_check $(date +%T)] ${TITLE[$name]} (at most $limit s)"
  timeout --kill-after=10 "$limit" bash -c "step_$name" > "$log" 2>&1 || rc=$?
  if (( rc == 0 )); then status=PASS
  elif (( rc == 124 || rc == 137 )); then status="TIMEOUT (limit $limit s)"
  else status="FAIL (exit $rc)"; fi
  {
    printf '\n## %s: %s in %d s\n\n' "${TITLE[$name]}" "$status" $(( SECONDS - start ))
    (( rc == 0 )) || printf 'The end of %s, warnings left out (the whole log is in gpu-check-logs.tar.gz):\n\n' "$log"
    printf '```text\n'
    if (( rc == 0 )); then "excerpt_$name" "$log" | tail -n 120; else quiet "$log" | tail -n 60; fi
    printf '```\n'
  } >> "$REPORT"
  SUMMARY+=("| $name | $status | $(( SECONDS - start )) |")
  echo "[gpu_check $(date +%T)] $name: $status"
}

for step in "${STEPS[@]}"; do
  if [ -z "${LIMIT[$step]:-}" ]; then
    echo "unknown step $step: the steps are setup tests demo zero throughput model_step memory_depth" >&2
    exit 2
  fi
done
{
  echo "# antismooth GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);" \
       "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo "Steps: ${STEPS[*]}; budget ${GPU_CHECK_SECONDS:-550} s; logs in $LOGS (and gpu-check-logs.tar.gz beside this file)."
} > "$REPORT"

for step in "${STEPS[@]}"; do
  run_step "$step"
done

{
  printf '\n## Summary\n\n| step | status | seconds |\n|---|---|---:|\n'
  printf '%s\n' "${SUMMARY[@]}"
} >> "$REPORT"
tar czf "$(dirname "$REPORT")/gpu-check-logs.tar.gz" -C "$WORK" logs 2>/dev/null || true
cat "$REPORT"
! printf '%s\n' "${SUMMARY[@]}" | grep -q -v "| PASS |"  # exit 1 unless every step passed
