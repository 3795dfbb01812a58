#!/usr/bin/env bash
# Proves the agent built for an ARM target runs: a native coordinator serves one DDOME round
# to two agents (an anchor and a normal device) cross-compiled for TARGET and run under
# qemu-user. Each embeds real CIFAR-10 images with the real common expert (tract), ranks the
# experts, trains, and uploads int8 deltas over QUIC. Then one of them fetches its
# personalised bundle and predicts offline, still under qemu.
#
#   scripts/arm-smoke.sh [aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf]
#
# Needs scripts/setup.sh (data, model) and scripts/cross-setup.sh (cross gcc, qemu-user).
set -euo pipefail
target=${1:-aarch64-unknown-linux-gnu}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
source scripts/lib/local-federation.sh

# Under qemu the smoke trains `head` experts on a dozen images: burn's crates build
# unoptimised for the target (scripts/lib/unoptimised-burn.sh); tract keeps opt-level 3.
source scripts/lib/unoptimised-burn.sh
cargo build --locked -q "${unoptimised_burn[@]}" -p ddome-agent --target "$target"
cargo build --locked -q -p ddome-coordinator
agent="$target_dir/$target/debug/ddome-agent"
coordinator="$target_dir/debug/ddome-coordinator"
qemu_for "$target"
[[ $(readelf -h "$agent") =~ Machine:\ +(AArch64|ARM) ]] || { echo "arm-smoke: $agent is not an ARM binary" >&2; exit 1; }

work=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# Two devices of IMAGES real images each (default 12: under qemu every image costs seconds,
# and the smoke proves the path, not accuracy): the anchor holds expert 0's two labels, the
# normal device four labels.
images=${ARM_SMOKE_IMAGES:-12}
pick() { # device, labels...
    local device=$1; shift
    for label in "$@"; do
        mkdir -p "$work/$device/$label"
        mapfile -t files < <(find "data/cifar10-jpeg/train/$label" -name '*.jpg' | sort)
        cp "${files[@]:0:$((images / $#))}" "$work/$device/$label/"
    done
}
pick anchor airplane automobile
pick normal airplane bird cat deer
pick newcomer automobile cat  # unlabelled: personalize reads the images, not the folders

cat > "$work/federation.toml" <<TOML
rounds = 1
method = "ddome"
experts = 2
k = 1
anchors_per_round = 1
normals_per_round = 1
min_updates = 2
round_deadline_secs = 600
codec = "int8"
downlink = "int8"
[model]
classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOML

fingerprint=$("$coordinator" init "$work/state" | grep -Eo '[0-9a-f]{64}')
"$coordinator" enroll "$work/state" anchor --anchor 0 > "$work/anchor.cred"
"$coordinator" enroll "$work/state" normal > "$work/normal.cred"
"$coordinator" enroll "$work/state" newcomer > "$work/newcomer.cred"
serve_in_background "$coordinator" "$work/state" "$work/federation.toml" "$work/serve" --keep-serving

pids=()
for device in anchor normal; do
    "${qemu[@]}" "$agent" run --coordinator "$addr" --fingerprint "$fingerprint" \
        --device "$device" --credential-file "$work/$device.cred" --data "$work/$device" \
        --cache-dir "$work/cache-$device" > "$work/$device.out" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { cat "$work"/*.out >&2; exit 1; }; done
for device in anchor normal; do
    grep -q "this device: 1 updates accepted" "$work/$device.out" ||
        { echo "arm-smoke: $device had no update accepted" >&2; cat "$work/$device.out" >&2; exit 1; }
done
echo "arm-smoke: $target agents embedded, trained and uploaded one DDOME round"

# A new device personalises from its unlabelled images, then predicts offline.
"${qemu[@]}" "$agent" personalize --coordinator "$addr" --fingerprint "$fingerprint" \
    --device newcomer --credential-file "$work/newcomer.cred" --data "$work/newcomer" \
    --cache-dir "$work/cache-newcomer" --out "$work/newcomer.ddome" > "$work/newcomer.out" 2>&1 ||
    { cat "$work/newcomer.out" >&2; exit 1; }
kill -TERM "$server_pid"; wait "$server_pid"; server_pid=
grep -q "federation finished: 1 rounds" "$work/serve.err" || { cat "$work/serve.err" >&2; exit 1; }
"${qemu[@]}" "$agent" predict --bundle "$work/newcomer.ddome" --json "$work/newcomer" \
    > "$work/predictions.json" 2> "$work/predict.err" || { cat "$work/predict.err" >&2; exit 1; }
predicted=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))))' "$work/predictions.json")
expected=$(find "$work/newcomer" -name '*.jpg' | wc -l)
[ "$predicted" = "$expected" ] ||
    { echo "arm-smoke: predicted $predicted of $expected images" >&2; exit 1; }
echo "arm-smoke: $target agent personalised without labels and predicted $expected images offline"
