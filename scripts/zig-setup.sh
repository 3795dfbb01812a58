#!/usr/bin/env bash
# Installs what building the agent against an older glibc needs: cargo-zigbuild (crates.io)
# and zig from the PyPI package ziglang, in .cache/zigvenv. Idempotent. Then, for example,
#
#   PATH="$PWD/.cache/zigvenv/bin:$PATH" cargo zigbuild -p ddome-agent --profile edge \
#       --target aarch64-unknown-linux-gnu.2.31
#
# links against glibc 2.31 (Raspberry Pi OS Bullseye; Jetson L4T 32 has 2.27, L4T 35 has
# 2.31). The glibc version is what the binary's symbol versions require; check it with
# `objdump -T target/.../ddome-agent | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.cache/zigvenv"

if ! "$venv/bin/python" -m ziglang version >/dev/null 2>&1; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "ziglang==0.15.1"
fi
# cargo-zigbuild looks for `zig` on PATH, then for `python3 -m ziglang`.
cat > "$venv/bin/zig" <<SH
#!/bin/sh
exec "$venv/bin/python" -m ziglang "\$@"
SH
chmod +x "$venv/bin/zig"
"$venv/bin/zig" version
command -v cargo-zigbuild >/dev/null || cargo install --locked cargo-zigbuild@0.24.1
cargo-zigbuild --version
