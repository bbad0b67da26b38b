#!/usr/bin/env bash
# Chat throughput on loopback with release builds: how fast `p2pctl send`
# stores piped lines, and how fast they arrive (stored at the receiver).
#
#   ./scripts/bench-chat.sh [MESSAGES]     (default 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
cargo build --release --workspace --bins
BIN="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
DIR="$(mktemp -d /tmp/p2p-bench.XXXXXX)"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$DIR"' EXIT
wait_for_line() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; cat "$1" >&2; exit 1; }
export RUST_LOG=warn
"$BIN/rendezvous" --listen 127.0.0.1:0 --data-dir "$DIR/rv" 2>"$DIR/rv.log" & PIDS+=($!)
wait_for_line "$DIR/rv.log" "listening on"
SERVER="$(sed -n 's/.*listening on \([^,]*\),.*/\1/p' "$DIR/rv.log" | head -1)"
for n in a b; do
    "$BIN/p2pd" --server "$SERVER" --listen 127.0.0.1:0 --data-dir "$DIR/$n" --socket "$DIR/$n.sock" 2>"$DIR/$n.log" & PIDS+=($!)
    wait_for_line "$DIR/$n.log" "control socket"
done
a() { "$BIN/p2pctl" --socket "$DIR/a.sock" "$@"; }
b() { "$BIN/p2pctl" --socket "$DIR/b.sock" "$@"; }
a register alice >/dev/null; b register bob >/dev/null
a connect bob >/dev/null & C=$!
for _ in $(seq 100); do b peers | grep -q "wants to connect" && break; sleep 0.05; done
b accept alice >/dev/null; wait "$C"

now() { date +%s.%N; }
t0=$(now)
seq 1 "$N" | sed 's/^/message number /' | a send bob >/dev/null
t1=$(now)
for _ in $(seq 6000); do
    got=$(b --json history alice -n "$N" | grep -o '"direction":"in"' | wc -l)
    [[ "$got" -ge "$N" ]] && break
    sleep 0.05
done
t2=$(now)
cpu() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }
python3 - "$N" "$t0" "$t1" "$t2" "$got" <<'PY'
import sys
n, t0, t1, t2, got = int(sys.argv[1]), *map(float, sys.argv[2:5]), int(sys.argv[5])
print(f"messages:        {n} (received {got})")
print(f"send accepted:   {t1-t0:.2f} s  ({n/(t1-t0):.0f} msg/s, each fsynced before its answer)")
print(f"all delivered:   {t2-t0:.2f} s  ({n/(t2-t0):.0f} msg/s end to end, stored at the receiver)")
PY
echo "daemon CPU (s):  alice $(cpu "${PIDS[1]}"), bob $(cpu "${PIDS[2]}")"
