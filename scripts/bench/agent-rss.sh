#!/usr/bin/env bash
# Peak resident memory of `ddome-agent run` on one device holding IMAGES real CIFAR-10
# images (ImageFolder, 10 classes), with the real common expert: it embeds them with tract,
# then trains `head` experts for one DDOME round against a native coordinator and uploads.
# Measured twice: a cold cache (embedding included) and a warm one (training only).
#
#   scripts/bench/agent-rss.sh [TARGET] [IMAGES] [PROFILE]
#
# TARGET is the host (default) or an ARM triple run under qemu-user; PROFILE is dev
# (default), release or edge. The binaries must be built already (see BENCHMARKS.md).
# With AGENT_RSS_EMBED_ON_HOST=1 an ARM run skips its cold run: the host's dev agent fills
# the embedding cache (embedding thousands of images under qemu takes hours), and the ARM
# agent then trains from it (the warm run).
# Peak RSS comes from GNU time's "Maximum resident set size"; under qemu it includes the
# emulator's own memory.
set -euo pipefail
target=${1:-host}
images=${2:-2000}
profile=${3:-dev}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
source scripts/lib/local-federation.sh

dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
coordinator="$target_dir/$dir/ddome-coordinator"
[ -x "$coordinator" ] || coordinator="$target_dir/debug/ddome-coordinator"
qemu_for "$target"
if [ "$target" = host ]; then agent="$target_dir/$dir/ddome-agent"; else agent="$target_dir/$target/$dir/ddome-agent"; fi
for binary in "$agent" "$coordinator"; do
    [ -x "$binary" ] || { echo "agent-rss: build $binary first" >&2; exit 1; }
done

work=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

per_class=$((images / 10))
for label_dir in data/cifar10-jpeg/train/*/; do
    label=$(basename "$label_dir")
    mkdir -p "$work/device/$label"
    mapfile -t files < <(find "$label_dir" -name '*.jpg' | sort | head -n "$per_class")
    cp "${files[@]}" "$work/device/$label/"
done

fingerprint=$("$coordinator" init "$work/state" | grep -Eo '[0-9a-f]{64}')
"$coordinator" enroll "$work/state" device --anchor 0 > "$work/device.cred"

# One round per run: the device is the only anchor and the only participant.
run_once() { # name [command that runs the agent, default: the target's under its runner]
    local name=$1; shift
    local runner=("$@")
    [ ${#runner[@]} -gt 0 ] || runner=("${qemu[@]}" "$agent")
    rm -rf "$work/state-run" && cp -r "$work/state" "$work/state-run"
    cat > "$work/federation.toml" <<TOML
rounds = 1
method = "ddome"
experts = 2
k = 1
anchors_per_round = 1
normals_per_round = 0
min_updates = 1
# A cold ARM run embeds under qemu for an hour or more before it joins.
round_deadline_secs = 21600
[model]
classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOML
    serve_in_background "$coordinator" "$work/state-run" "$work/federation.toml" "$work/serve"
    /usr/bin/time -v "${runner[@]}" run --coordinator "$addr" --fingerprint "$fingerprint" \
        --device device --credential-file "$work/device.cred" --data "$work/device" \
        --cache-dir "$work/cache" > "$work/$name.out" 2> "$work/$name.err" &
    local time_pid=$! agent_pid=
    for _ in $(seq 100); do agent_pid=$(pgrep -P "$time_pid" || true); [ -n "$agent_pid" ] && break; sleep 0.01; done
    # What the peak is made of: anonymous memory (heap, stacks) against file-backed pages
    # (the binary's code and data), sampled every 20 ms at the largest RSS seen.
    local peak_rss=0 peak_anon=0 peak_file=0
    while [ -n "$agent_pid" ] && [ -r "/proc/$agent_pid/smaps_rollup" ]; do
        read -r rss anon file < <(awk '/^Rss:/ {r=$2} /^Anonymous:/ {a=$2} END {print r+0, a+0, r-a}' \
            "/proc/$agent_pid/smaps_rollup" 2>/dev/null || echo "0 0 0")
        if [ "${rss:-0}" -gt "$peak_rss" ]; then peak_rss=$rss peak_anon=$anon peak_file=$file; fi
        sleep 0.02
    done
    wait "$time_pid" || { cat "$work/$name.err" >&2; exit 1; }
    wait "$server_pid"; server_pid=
    grep -q "this device: 1 updates accepted" "$work/$name.out" ||
        { echo "agent-rss: no update accepted" >&2; cat "$work/$name.err" >&2; exit 1; }
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/$name.err")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/$name.err")
    echo "agent-rss: $target $profile, $images images, $name: peak RSS $((rss / 1024)) MiB ($rss KiB), wall $wall;" \
        "at the sampled peak $((peak_rss / 1024)) MiB: anonymous $((peak_anon / 1024)) MiB, file-backed $((peak_file / 1024)) MiB"
}
if [ "${AGENT_RSS_EMBED_ON_HOST:-0}" = 1 ] && [ "$target" != host ]; then
    host_agent="$target_dir/debug/ddome-agent"
    [ -x "$host_agent" ] || { echo "agent-rss: build $host_agent first" >&2; exit 1; }
    run_once host-embeds "$host_agent" >/dev/null   # fills the cache; its numbers are the host's
else
    run_once cold   # embeds the images (tract), then trains
fi
run_once warm   # embeddings cached: trains only
