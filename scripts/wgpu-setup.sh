#!/usr/bin/env bash
# Installs Mesa's lavapipe, a Vulkan device that runs on the CPU, so that the `wgpu` feature
# is built and tested on machines without a GPU. Devices with a GPU need only its driver.
set -euo pipefail
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
    echo "wgpu-setup: installing Debian's mesa-vulkan-drivers (lavapipe)"
    as_root apt-get update -qq
    as_root apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi
