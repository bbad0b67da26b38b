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
source scripts/bench-pair.sh

head -c "$((SIZE * 1024 * 1024))" /dev/urandom > "$DIR/file.bin"
sync "$DIR/file.bin"  # its write-back would compete with the transfer
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
