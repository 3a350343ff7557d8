#!/usr/bin/env bash
# Fill .whl/ with what an offline GPU machine lacks for `bash bench/gpu_check.sh` (FIELD-NOTES.md, "A GPU
# machine without network access"): run here, where pip reaches an index, then carry .whl/ there.
#
#   bash bench/gpu_wheels.sh          (or: make gpu-wheels)
#
# - deepspeed, webdataset and timm at requirements.txt's pins: DeepSpeed publishes an sdist only, which pip
#   builds into a pure-Python wheel (no ops compiled: antismooth's configs use torch's AdamW);
# - what that machine's image lacks of their needs (device KINDS.md's package list): hjson, pydantic with
#   annotated-types, typing-inspection and the typing-extensions it asks for, braceexpand; pydantic-core, the
#   one compiled wheel, for CPython $TARGET_PYTHON on manylinux x86-64, the target's Python, not this one's.
# The test images travel with the repository itself (tests/data/images).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}
DEST=.whl
# The versions this project's environment runs (pip show in .venv); pydantic-core follows pydantic's own pin.
NEEDS=(hjson==3.1.0 pydantic==2.14.3 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
       braceexpand==0.1.7)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pin() {  # the requirements.txt line of one package
  grep -E "^$1==" requirements.txt || { echo "error: $1 is not pinned in requirements.txt" >&2; exit 1; }
}

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$(pin deepspeed)" "$(pin webdataset)" "$(pin timm)"
"$PYTHON" -m pip download -q --no-deps -d "$DEST" "${NEEDS[@]}"
core=$(unzip -p "$DEST"/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "pydantic-core==$core"

# Every wheel must at least unpack; the pure-Python ones must also install. The cp$TARGET_PYTHON one cannot
# install into this Python unless it is that version: pip refuses it, as it should.
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
for wheel in "$DEST"/*.whl; do
  unzip -tq "$wheel" >/dev/null || { echo "error: $wheel does not unpack" >&2; exit 1; }
done
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$check" "$DEST"/*-none-any.whl

ls -1 "$DEST"
wheels=("$DEST"/*.whl)
echo "${#wheels[@]} wheels; total $(du -sh "$DEST" | cut -f1) (the device tool carries at most 64 MiB with the" \
     "working tree, tests/data/images' $(du -sh tests/data/images | cut -f1) included)"
