#!/usr/bin/env bash
# File transfer throughput on loopback with release builds: one file of
# SIZE MiB (default 1024) from alice's daemon to bob's, through
# `p2pctl send-file` / `accept-file`; prints MB/s, each daemon's CPU time
# and peak memory (VmHWM). Linux: it reads /proc.
#
#   ./scripts/bench-files.sh [SIZE_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${1:-1024}"
cargo build --release --workspace --bins
BIN="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
DIR="$(mktemp -d /tmp/p2p-benchf.XXXXXX)"
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

head -c "$((SIZE * 1024 * 1024))" /dev/urandom > "$DIR/file.bin"
now() { date +%s.%N; }
a send-file bob "$DIR/file.bin" --no-wait >/dev/null
t0=$(now)
ID=""
for _ in $(seq 600); do
    ID="$(b transfers | awk '/offered/ {print $1; exit}')"
    [[ -n "$ID" ]] && break
    sleep 0.05
done
t1=$(now)
b accept-file "$ID" --to "$DIR/inbox" >/dev/null
t2=$(now)
cmp "$DIR/file.bin" "$DIR/inbox/file.bin"
cpu() { awk '{print ($14+$15)/100}' "/proc/$1/stat"; }
hwm() { awk '/VmHWM/ {print $2/1024 " MiB"}' "/proc/$1/status"; }
python3 - "$SIZE" "$t0" "$t1" "$t2" <<'PY'
import sys
size, t0, t1, t2 = int(sys.argv[1]), *map(float, sys.argv[2:5])
mb = size * 1024 * 1024 / 1e6
print(f"file:            {size} MiB, byte-identical at the receiver")
print(f"hash and offer:  {t1-t0:.2f} s")
print(f"transfer:        {t2-t1:.2f} s  ({mb/(t2-t1):.1f} MB/s, accept to verified and named)")
PY
echo "daemon CPU (s):  alice $(cpu "${PIDS[1]}"), bob $(cpu "${PIDS[2]}")"
echo "peak memory:     alice $(hwm "${PIDS[1]}"), bob $(hwm "${PIDS[2]}")"
