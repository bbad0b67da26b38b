#!/usr/bin/env bash
# Chat throughput on loopback with release builds: how fast `p2pctl send`
# stores piped lines, and how fast they arrive (stored at the receiver).
#
#   ./scripts/bench-chat.sh [MESSAGES]     (default 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10000}"
source scripts/bench-pair.sh

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
