#!/usr/bin/env bash
# The GPU machine's software on this CPU machine, before any GPU minute is spent on it (docs/gpu-check.md,
# "The device environment"): run it before a GPU session and after any change to the GPU path. Not in CI: it
# downloads torch 2.11 with its CUDA libraries once (about 4.7 GB in .device-env/, pip's cache keeps them).
#
#   bash bench/device_env.sh          (or: make device-env)
#
# - a venv in .device-env/ from Python 3.12 (DEVICE_PYTHON; pyenv's 3.12.1 here, 3.12.3 there) with what the GPU
#   machine's image holds (device KINDS.md, read 2026-11): torch 2.11.0, torchvision 0.26.0, numpy 2.5.2,
#   safetensors 0.8.0, an older timm, tensorboard, pytest, and DeepSpeed's and timm's other needs;
# - the wheels of `make gpu-wheels` (.whl/, built when missing) installed by bench/gpu_check.sh itself, with
#   `pip install --target .device-env/site`, on PYTHONPATH before the venv's own packages, as on the device;
# - for each Pillow in DEVICE_ENV_PILLOWS (default 12.3.0 and 13.0.0; the device's is unknown until its setup
#   step prints it): `bash bench/gpu_check.sh setup tests` must stop in one sentence (no CUDA here), its CPU dry
#   run (GPU_CHECK_CPU=1) must pass, and so must the suite's not-slow tests, less the cluster-in-a-box files
#   (they need root's Debian packages and share one cluster: tests/test_cluster.py, test_reliability.py,
#   test_interrupt.py, test_nodes.py) and test_fresh_clone.py/test_packaging.py's slow parts (-m "not slow").
# Logs and a summary in runs/device-env/; exit 1 unless every part passed for every Pillow.
set -uo pipefail
cd "$(dirname "$0")/.."

BASE=${DEVICE_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}
ENV=.device-env
PY=$ENV/bin/python
SITE=$PWD/$ENV/site
OUT=runs/device-env
PILLOWS=(${DEVICE_ENV_PILLOWS:-12.3.0 13.0.0})
# The image's versions where the project's code depends on them; the rest as pip resolves them.
IMAGE=(torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 safetensors==0.8.0 timm==1.0.19 tensorboard pytest pytest-timeout
       tqdm psutil py-cpuinfo ninja msgpack einops packaging pyyaml huggingface_hub matplotlib scikit-learn)
NOT_HERE=(tests/test_cluster.py tests/test_reliability.py tests/test_interrupt.py tests/test_nodes.py)

[ -x "$BASE" ] || BASE=$(command -v python3.12) || {
  echo "device_env: no Python 3.12 (the GPU machine's): set DEVICE_PYTHON to one." >&2; exit 2; }
mkdir -p "$OUT"
if [ ! -x "$PY" ]; then "$BASE" -m venv "$ENV" || exit 1; fi
"$PY" -m pip install -q --disable-pip-version-check "${IMAGE[@]}" > "$OUT/install.log" 2>&1 || {
  echo "device_env: pip install of the image's packages failed (see $OUT/install.log)." >&2; exit 1; }
if ! compgen -G ".whl/*.whl" > /dev/null; then
  PYTHON=${WHEEL_PYTHON:-$PY} bash bench/gpu_wheels.sh > "$OUT/wheels.log" 2>&1 || {
    echo "device_env: make gpu-wheels failed (see $OUT/wheels.log)." >&2; exit 1; }
fi

export PYTHON=$PY GPU_CHECK_SITE=$SITE
ignores=()
for path in "${NOT_HERE[@]}"; do ignores+=(--ignore "$path"); done
summary=()
failed=0
for pillow in "${PILLOWS[@]}"; do
  log=$OUT/pillow-$pillow
  "$PY" -m pip install -q --disable-pip-version-check "pillow==$pillow" >> "$OUT/install.log" 2>&1 || {
    echo "device_env: pip install pillow==$pillow failed (see $OUT/install.log)." >&2; exit 1; }
  # 1. Without CUDA the check must stop before any step, in one sentence (exit 2).
  bash bench/gpu_check.sh "$log-check/report.md" setup tests > "$log-stop.log" 2>&1
  rc=$?
  if (( rc == 2 )) && grep -q "sees no CUDA GPU" "$log-stop.log"; then stop="stops in one sentence"; else
    stop="did not stop as it should (exit $rc)"; failed=1; fi
  # 2. Its CPU dry run: the carried wheels installed with --target, every version, tests/gpu collected.
  GPU_CHECK_CPU=1 bash bench/gpu_check.sh "$log-check/report.md" setup tests > "$log-dry.log" 2>&1
  rc=$?
  if (( rc == 0 )); then dry="dry run PASS"; else dry="dry run FAIL (exit $rc)"; failed=1; fi
  # 3. The suite's not-slow tests with the packages where the device has them.
  start=$SECONDS
  PYTHONPATH="$SITE:$PWD" "$PY" -m pytest tests -m "not slow" -q -p no:cacheprovider "${ignores[@]}" \
    > "$log-tests.log" 2>&1
  rc=$?
  tests=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed|error)" "$log-tests.log" | tail -n 1 | tr -d '=')
  (( rc == 0 )) || failed=1
  summary+=("Pillow $pillow: gpu_check.sh $stop; $dry; not-slow tests (exit $rc): ${tests:-no summary line} in $(( SECONDS - start )) s")
done
{
  echo "device-env $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  PYTHONPATH="$SITE:$PWD" "$PY" - 2>/dev/null <<'EOF'
import importlib, platform
names = ("torch", "torchvision", "numpy", "PIL", "timm", "deepspeed", "webdataset", "safetensors", "pydantic")
found = []
for name in names:
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001
        found.append(f"{name} MISSING ({err})")
print(f"python {platform.python_version()}; " + ", ".join(found))
EOF
  printf '%s\n' "${summary[@]}"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$failed"
