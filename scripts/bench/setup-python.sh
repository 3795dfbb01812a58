#!/usr/bin/env bash
# Creates .cache/pyvenv with the pinned benchmark stack (requirements.txt beside this file)
# unless it is already there. Only `ddome bench embed` and `ddome bench train` use it.
#
# PyPI's torch wheel for Linux x86_64 carries CUDA libraries the CPU benchmark never loads;
# set DDOME_TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch the CPU-only build
# of the same version instead.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$root/.cache/pyvenv"
requirements="$root/scripts/bench/requirements.txt"
python=${PYTHON:-python3}

if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$requirements" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    # A local build tag (torch's "+cpu") is the same release.
    if have.split("+")[0] != want:
        sys.exit(1)
PY
then
    echo "setup-python: $venv already has the pinned packages"
    exit 0
fi

mkdir -p "$root/.cache"
if [ ! -x "$venv/bin/python" ]; then
    echo "setup-python: creating $venv"
    "$python" -m venv "$venv"
fi
extra=()
if [ -n "${DDOME_TORCH_INDEX:-}" ]; then
    extra=(--extra-index-url "$DDOME_TORCH_INDEX")
fi
"$venv/bin/python" -m pip install --quiet "${extra[@]}" -r "$requirements"
echo "setup-python: done ($("$venv/bin/python" -c 'import numpy, onnxruntime, torch; print("numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__, "torch", torch.__version__)'))"
