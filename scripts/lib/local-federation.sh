# Sourced by the scripts that run a real coordinator and agents on this machine
# (arm-smoke.sh, bench/agent-rss.sh), from the repository root.

# Where cargo put the binaries.
target_dir=${CARGO_TARGET_DIR:-target}

# Sets `qemu` to the qemu-user command that runs TARGET's binaries (empty for the host).
qemu_for() { # target
    case "$1" in
        host) qemu=() ;;
        aarch64-*) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
        armv7-*) qemu=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
        *) echo "$(basename "$0"): unknown target $1" >&2; exit 2 ;;
    esac
}

# Starts `COORDINATOR serve STATE --config CONFIG` on a free loopback port, in the background,
# with its output in OUT.out and OUT.err; sets `server_pid`, and `addr` once it listens.
serve_in_background() { # coordinator, state, config, out, extra serve arguments...
    local coordinator=$1 state=$2 config=$3 out=$4; shift 4
    "$coordinator" serve "$state" --config "$config" --listen 127.0.0.1:0 "$@" \
        > "$out.out" 2> "$out.err" &
    server_pid=$!
    for _ in $(seq 100); do grep -q '^listening' "$out.out" && break; sleep 0.1; done
    addr=$(awk '/^listening/ {print $2}' "$out.out")
    [ -n "$addr" ] || { cat "$out.err" >&2; exit 1; }
}
