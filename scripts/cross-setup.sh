#!/usr/bin/env bash
# Installs what cross-compiling the agent needs without docker, on Debian with rustup:
# Debian's cross gcc (linker, and C compiler for ring) and qemu-user to run the result.
# .cargo/config.toml names the linkers and runners. Idempotent.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    echo "cross-setup: installing ${need[*]}"
    as_root apt-get update -qq
    as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi
installed=$(rustup target list --installed)
for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    grep -qx "$target" <<<"$installed" || rustup target add "$target"
done
