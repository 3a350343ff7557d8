#!/usr/bin/env bash
# The GPU check, for a machine with one GPU, in 6 minutes (the device budget is 15 minutes with the machine's start:
# room for a second call); run from the repository root:
#
#   bash bench/gpu_check.sh [REPORT] [STEP ...]
#
# REPORT defaults to $OUT/gpu-report.md when $OUT is set (the device tool's output folder), else
# runs/gpu-report.md; beside it go gpu-results.json (every figure as data) and gpu-check-logs.tar.gz. Without a
# CUDA GPU it stops at once, before any step, with one sentence (exit 2); GPU_CHECK_CPU=1 is the CPU dry run of
# `make device-env` instead: only setup and tests (collected, not run), to prove the GPU machine's software here.
# The first call's STEPs, by value, in this order by default (docs/gpu-check.md has the second call's):
#   setup       wheels from .whl/ (bench/gpu_wheels.sh) into /tmp/site, every version, the GPU, nvidia-smi; a
#               missing package or no CUDA fails it, and a failed setup ends the check
#   tests       python -m pytest tests/gpu -x -q: NCCL collectives, flash AttnScale, 1-GPU pretrain runs (they fail,
#               not skip, without a GPU: ANTISMOOTH_REQUIRE_GPU=1)
#   recipe      ds_configs/zero2.json as shipped (bf16, torch's fused AdamW) with DeiT's default recipe and the real
#               loader (RandAugment, random erasing, Mixup/CutMix on CUDA tensors): attnscale_small_24 on the demo
#               shards, 20 steps; its planned peak against torch.cuda.max_memory_allocated
#   decode      --decode gpu: bench/decode_throughput.py (images/s into a step's input, CPU path vs GPU path with 4
#               workers; the device path's parts; RandAugment grouped vs per sample), and attnscale_base_24's
#               --throughput on the real input path (--decode gpu, 4 workers) against random data
#   throughput  pretrain.py --throughput with MFU, eager and --compile: attnscale_small_24 (micro batch 128), bf16
#               ZeRO-2 as shipped
# and, for the second call (not run by default):
#   throughput_base  the same for attnscale_base_24 (micro batch 64)
#   model_step  bench/model_step.py: plain ViT-S/24, AttnScale fused (flash) and explicit, FeatScale at 224/384 px
#   fusedadam   --throughput of attnscale_small_24 with ds_configs/zero2_fusedadam.json (DeepSpeed's FusedAdam, built
#               with nvcc on first use) against the shipped torch fused AdamW
#   demo        tools/demo.py on one GPU: NCCL, bf16, ZeRO-2, per-epoch evaluation, export, eval
#   zero        bf16 ZeRO-2 and ZeRO-3 on the demo shards: 30 steps, a second process resumes to 50, export, eval
#   host_syncs  bench/host_syncs.py: the loss read back every step against at log steps
#   memory_depth  bench/memory_depth.py --offload: activation memory and step time at depth 12/24/48
# Each step has its own time limit, cut to what is left of GPU_CHECK_SECONDS (default 360); a step that fails or
# times out is recorded with the tail of its log, every process it left (tests start theirs in sessions of their
# own, which `timeout` does not reach) is killed, and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."

REPORT=${1:-${OUT:+$OUT/gpu-report.md}}
REPORT=${REPORT:-runs/gpu-report.md}
shift $(( $# > 0 ? 1 : 0 ))
STEPS=("$@")
# By value: what proves the GPU path works first, then the figures it exists for; 6 minutes (docs/gpu-check.md).
FIRST_CALL=(setup tests recipe throughput decode)
[ ${#STEPS[@]} -gt 0 ] || STEPS=("${FIRST_CALL[@]}")

export PY=${PYTHON:-python3}
export SITE=${GPU_CHECK_SITE:-/tmp/site}
export WORK=${GPU_CHECK_WORK:-runs/gpu-check}
export LOGS=$WORK/logs
export PYTHONUNBUFFERED=1
export GPU_CHECK_CPU=${GPU_CHECK_CPU:-0}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
CPU_STEPS=" setup tests "   # what GPU_CHECK_CPU=1 runs: every other step needs the GPU
DEADLINE=$(( SECONDS + ${GPU_CHECK_SECONDS:-360} ))

# --- before anything runs: the step names, and a GPU ------------------------------------------------------------

stop() {  # stop SENTENCE: the whole check ends here, in one sentence on stderr and in the report (exit 2)
  mkdir -p "$(dirname "$REPORT")"
  printf '# antismooth GPU check\n\nStopped before any step: %s\n' "$1" > "$REPORT"
  echo "gpu_check: $1" >&2
  exit 2
}

declare -A LIMIT=([setup]=45 [tests]=100 [recipe]=60 [throughput]=100 [decode]=70 [throughput_base]=110
  [model_step]=40 [fusedadam]=90 [demo]=120 [zero]=180 [host_syncs]=60 [memory_depth]=200)
for step in "${STEPS[@]}"; do
  [ -n "${LIMIT[$step]:-}" ] || stop "unknown step $step: the steps are ${!LIMIT[*]}."
  if [ "$GPU_CHECK_CPU" = 1 ] && [[ $CPU_STEPS != *" $step "* ]]; then
    stop "GPU_CHECK_CPU=1 runs only the steps setup and tests; $step needs a GPU: leave it out of the dry run."
  fi
done

cuda_problem() {  # one sentence when $PY's torch sees no CUDA GPU; nothing when it does
  "$PY" - 2>/dev/null <<'PROBE' || echo "$PY cannot import torch"
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA GPU")
PROBE
}

if [ "$GPU_CHECK_CPU" != 1 ]; then
  problem=$(cuda_problem)
  [ -z "$problem" ] || stop "$problem here, so no step can measure anything: run the check on the GPU machine, or set GPU_CHECK_CPU=1 for a CPU dry run of setup and tests."
fi
rm -rf "$WORK/status"
mkdir -p "$LOGS" "$(dirname "$REPORT")"

# --- wheels: in this shell, so that PYTHONPATH reaches every step ---------------------------------------------

wheels_installed() {  # every $WHEELS wheel's name-version.dist-info is already in $SITE
  local wheel
  for wheel in "$WHEELS"/*.whl; do
    [ -d "$SITE/$(basename "$wheel" | cut -d- -f1-2).dist-info" ] || return 1
  done
}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  if wheels_installed; then
    echo "wheels of $WHEELS already in $SITE" > "$LOGS/install.log"
  else
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl > "$LOGS/install.log" 2>&1 || echo "pip install failed: exit $?" >> "$LOGS/install.log"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: using the packages $PY already has" > "$LOGS/install.log"
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

ensure_photo_shards() {  # shards of the repository's 103 photographs x 20 (real JPEGs of varied sizes), for the loader
  [ -f shards/photos/train.json ] && return 0
  "$PY" - <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from loader import IMAGES, replicate_imagefolder
from antismooth.data.shards import ShardOptions, build
n = replicate_imagefolder(IMAGES / "train", Path("shards/photos/imagefolder/train"), 20)
build("shards/photos/imagefolder", "shards/photos", ShardOptions(max_count=500), splits=("train",))
print(f"photo shards: {n} images")
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
  "$PY" - "$WORK/versions.json" <<'EOF' || return 1
import importlib, json, os, platform, sys
versions = {"python": platform.python_version()}
print(f"python {versions['python']} at {sys.executable}")
REQUIRED = ("torch", "torchvision", "numpy", "PIL", "timm", "deepspeed", "webdataset", "safetensors", "pydantic",
            "hjson", "braceexpand", "pytest", "antismooth")
missing = []
for name in (*REQUIRED, "torchcodec", "tensorboard"):   # the last two optional: the check runs without them
    try:
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", "?")
        print(f"{name:12s} {versions[name]:24s} {module.__file__}")
    except Exception as err:  # report every missing package, not just the first
        print(f"{name:12s} MISSING: {err}")
        missing += [name] if name in REQUIRED else []
import torch
cuda = torch.cuda.is_available()
versions.update(cuda=torch.version.cuda, cuda_available=cuda)
print(f"CUDA {torch.version.cuda}, available {cuda}, NCCL {torch.cuda.nccl.version() if torch.version.cuda else None}")
if cuda:
    versions["gpu"] = torch.cuda.get_device_name()
    print(f"{versions['gpu']}: capability {torch.cuda.get_device_capability()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
          f"flash SDPA enabled {torch.backends.cuda.flash_sdp_enabled()}")
if "deepspeed" not in missing:
    from deepspeed.accelerator import get_accelerator
    print(f"DeepSpeed accelerator: {get_accelerator()._name}")
if "antismooth" not in missing:
    from antismooth.flops import peak_tflops
    print(f"dense bf16 peak in antismooth.flops: {peak_tflops(torch.cuda.get_device_name()) if cuda else None} TFLOP/s")
json.dump(versions, open(sys.argv[1], "w"), indent=1)
if missing:
    sys.exit(f"setup: {', '.join(missing)} cannot be imported: no step can run without them (see the lines above).")
if not cuda and os.environ.get("GPU_CHECK_CPU") != "1":
    sys.exit("setup: torch sees no CUDA GPU.")
EOF
  # Probes, not requirements: neither can fail the step (GPU_CHECK_CPU=1 runs where there is no GPU at all).
  if command -v nvidia-smi > /dev/null; then nvidia-smi || echo "nvidia-smi failed (exit $?)"; else echo "nvidia-smi: not found"; fi
  if command -v nvcc > /dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found (the fusedadam step needs it)"; fi
  return 0
}
excerpt_setup() { cat "$1"; }

step_tests() {
  if [ "$GPU_CHECK_CPU" = 1 ]; then
    echo "CPU dry run: tests/gpu collected (imported under this software), not run"
    "$PY" -m pytest tests/gpu --collect-only -q -p no:cacheprovider
  else   # without a GPU they fail rather than skip: a check of 12 skips must not read as a pass
    ANTISMOOTH_REQUIRE_GPU=1 "$PY" -m pytest tests/gpu -x -q -p no:cacheprovider
  fi
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

step_recipe() {
  set -e
  ensure_demo_shards
  rm -rf "$WORK/recipe"
  # DeiT's defaults (RandAugment, random erasing, Mixup/CutMix, repeated augmentation, drop path 0.1) at 224 px.
  "$PY" pretrain.py --deepspeed_config ds_configs/zero2.json --model attnscale_small_24 --data shards/demo \
    --workers 8 --output "$WORK/recipe" --epochs 2 --max-steps 20 --log-every 5 --save-every 1000
}
excerpt_recipe() { grep -E "pretrain: (attnscale|global|optimizer)|planned peak|peak GPU memory|step [0-9]+/|eval epoch|done: step" "$1"; }

throughput_run() {  # throughput_run MODEL MICRO [CONFIG] [FLAGS...]: one --throughput line
  local model=$1 micro=$2 config=${3:-ds_configs/zero2.json}
  shift $(( $# > 3 ? 3 : $# ))
  local name
  name="$model-$micro-$(basename "$config" .json)${1:+-compiled}"
  ds_json "$config" "$WORK/$name.json" "c['train_micro_batch_size_per_gpu'] = $micro"
  rm -rf "$WORK/throughput-$name"
  echo "== $name"
  "$PY" pretrain.py --deepspeed_config "$WORK/$name.json" --model "$model" --data shards/demo --workers 0 \
    --output "$WORK/throughput-$name" --throughput "$@"
}

step_throughput() {
  set -e
  ensure_demo_shards
  throughput_run attnscale_small_24 128 ds_configs/zero2.json
  throughput_run attnscale_small_24 128 ds_configs/zero2.json --compile
}
excerpt_throughput() { grep -E "^== |pretrain: (attnscale|optimizer)|^throughput:|peak GPU memory" "$1"; }

step_throughput_base() {
  set -e
  ensure_demo_shards
  throughput_run attnscale_base_24 64 ds_configs/zero2.json
  throughput_run attnscale_base_24 64 ds_configs/zero2.json --compile
}
excerpt_throughput_base() { excerpt_throughput "$1"; }

step_decode() {
  set -e
  "$PY" bench/decode_throughput.py --device cuda --workers 4 --batch 256 --batches 10 --copies 40 \
    --json "$WORK/decode.json"
  ensure_photo_shards
  ds_json ds_configs/zero2.json "$WORK/base24-loader.json" "c['train_micro_batch_size_per_gpu'] = 64"
  for source in random loader; do
    rm -rf "$WORK/throughput-base24-$source"
    echo "== attnscale_base_24-64-zero2-$source"
    "$PY" pretrain.py --deepspeed_config "$WORK/base24-loader.json" --model attnscale_base_24 --data shards/photos \
      --workers 4 --decode gpu --output "$WORK/throughput-base24-$source" --throughput "$source"
  done
}
excerpt_decode() { grep -E "^\||^GPU path|^device path|^RandAugment|images \(|^== |^throughput:|decoding on|TorchCodec" "$1"; }

step_fusedadam() {
  set -e
  ensure_demo_shards
  throughput_run attnscale_small_24 128 ds_configs/zero2_fusedadam.json
}
excerpt_fusedadam() { excerpt_throughput "$1"; }

step_host_syncs() {
  "$PY" bench/host_syncs.py --device cuda --model attnscale_small_24 --img-size 224 --batch 64 --steps 20 --rounds 3 \
    --json "$WORK/host_syncs.json"
}
excerpt_host_syncs() { grep -E "^\||px, batch" "$1"; }

step_model_step() {
  "$PY" bench/model_step.py --device cuda --batch 64 --dtype bfloat16 --sdpa flash --rounds 1 --steps 10 \
    --json "$WORK/model_step.json"
}
excerpt_model_step() { grep -E "^\||px, batch|^fused AttnScale" "$1"; }

step_memory_depth() {
  "$PY" bench/memory_depth.py --device cuda --offload --rounds 1 --steps 5 --json "$WORK/memory_depth.json"
}
excerpt_memory_depth() { grep -v -E "^\[ *[0-9]+ s\]" "$1"; }

export -f ds_json ensure_demo_shards ensure_photo_shards throughput_run excerpt_throughput step_setup step_tests step_recipe step_decode \
  step_throughput step_throughput_base step_model_step step_fusedadam step_demo step_zero step_host_syncs step_memory_depth

# --- running them ---------------------------------------------------------------------------------------------

declare -A TITLE=([setup]="a. setup: wheels, versions, nvidia-smi" [tests]="b. pytest tests/gpu -x -q"
  [recipe]="c. ds_configs/zero2.json, DeiT's recipe, the real loader; planned vs allocated peak"
  [decode]="c2. --decode gpu: input path images/s, and base_24 on it vs random data"
  [throughput]="d. pretrain.py --throughput with MFU, eager and --compile: attnscale_small_24"
  [throughput_base]="d2. the same for attnscale_base_24"
  [model_step]="e. bench/model_step.py on cuda (flash SDPA)" [fusedadam]="f. DeepSpeed's FusedAdam vs torch's fused AdamW"
  [demo]="g. demo on one GPU (NCCL, bf16, ZeRO-2)" [zero]="h. ZeRO-2 and ZeRO-3 bf16 with a resume, export, eval"
  [host_syncs]="i. bench/host_syncs.py on cuda" [memory_depth]="j. bench/memory_depth.py --device cuda --offload")
SUMMARY=()

quiet() {  # a log without Python's warnings (a warning line and the source line under it): failures stay visible
  awk '/Warning: / { skip = 1; next } skip && /^  / { skip = 0; next } { skip = 0; print }' "$1"
}

python_pids() { pgrep -f 'python|deepspeed|torchrun' | sort; }

reap_strays() {  # reap_strays BEFORE: kill the Python processes in this repository that were not running before the
  # step (a test's launch lives in a session of its own, which `timeout` does not reach)
  local pid
  for pid in $(comm -13 "$1" <(python_pids)); do
    [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == "$PWD"* ]] || continue
    echo "killed a process the step left: $pid $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-150)"
    kill -9 "$pid" 2>/dev/null
  done
  return 0
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
  python_pids > "$WORK/pids-before"
  timeout --kill-after=10 "$limit" bash -c "step_$name" > "$log" 2>&1 || rc=$?
  reap_strays "$WORK/pids-before" >> "$log"
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
  mkdir -p "$WORK/status" && echo "$status|$(( SECONDS - start ))" > "$WORK/status/$name"
  echo "[gpu_check $(date +%T)] $name: $status"
}

{
  echo "# antismooth GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);" \
       "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo "Steps: ${STEPS[*]}; budget ${GPU_CHECK_SECONDS:-360} s; logs in $LOGS (and gpu-check-logs.tar.gz beside this file)."
  if [ "$GPU_CHECK_CPU" = 1 ]; then echo "CPU dry run (GPU_CHECK_CPU=1): the GPU machine's software on a CPU, no GPU figure."; fi
} > "$REPORT"

for step in "${STEPS[@]}"; do
  run_step "$step"
  if [ "$step" = setup ] && [ "$(cut -d'|' -f1 "$WORK/status/setup" 2>/dev/null)" != PASS ]; then
    printf '\nThe setup failed: the check stops here (no later step can work without it).\n' | tee -a "$REPORT"
    break
  fi
done

{
  printf '\n## Summary\n\n| step | status | seconds |\n|---|---|---:|\n'
  printf '%s\n' "${SUMMARY[@]}"
} >> "$REPORT"
tar czf "$(dirname "$REPORT")/gpu-check-logs.tar.gz" -C "$WORK" logs 2>/dev/null || true
"$PY" bench/gpu_results.py "$WORK" "$(dirname "$REPORT")/gpu-results.json" >> "$REPORT" 2>&1 || true
cat "$REPORT"
! printf '%s\n' "${SUMMARY[@]}" | grep -q -v "| PASS |"  # exit 1 unless every step passed
