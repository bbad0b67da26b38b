#!/usr/bin/env bash
# Recovery after faults, on loopback with release builds: how long after
# the faulted thing is back the first new message is delivered.
#
#   ./scripts/bench-recovery.sh [RUNS]         (default 10 per fault)
#   sudo ./scripts/bench-recovery.sh --lab [RUNS]
#
# With --lab it runs `bench-faults` instead: every fault of the recovery
# issue in the NAT lab (rebinding, server restart and loss, network down,
# SIGSTOP, UDP blocked), on a direct and a relayed path; see the top of
# tests/src/bin/bench-faults.rs for its settings (BENCH_DOWN_S,
# BENCH_STOP_S, BENCH_FAULTS, BENCH_PATHS).
#
# Faults (each run: alice has just sent to bob, then the fault, then
# alice sends one line; the clock runs from the moment the faulted process
# is started again to the moment that line is in bob's history):
#   peer-kill   bob's daemon SIGKILLed, started again (it binds a new port)
#   peer-term   bob's daemon stopped with SIGTERM, started again
#   peer-gone   as peer-kill, bob down 8 s while alice keeps sending
# Prints p50 / p95 / max seconds per fault, and checks that every line
# sent arrived exactly once, in order.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == --lab ]]; then
    cargo build --release --workspace --bins
    RUST_LOG=warn exec target/release/bench-faults "${2:-10}"
fi
RUNS="${1:-10}"
source scripts/bench-pair.sh

now() { date +%s.%N; }
# Each start on a port bob never had (a daemon takes its last port when
# free, which would make the peer's job easier than a new port).
PORT=46000
start_bob() {
    PORT=$((PORT + 1))
    "$BIN/p2pd" --server "$SERVER" --listen "127.0.0.1:$PORT" --data-dir "$DIR/b" --socket "$DIR/b.sock" \
        2>>"$DIR/b.log" &
    PIDS[2]=$!
}
# Lines alice sent, in order, and a counter for unique ones.
SENT=0
send_line() { a send bob "line $SENT" >/dev/null; SENT=$((SENT + 1)); }
# Waits until bob's history holds the newest line; prints the time.
wait_line() {
    local want="line $((SENT - 1))"
    for _ in $(seq 12000); do
        if b --json history alice -n 3 2>/dev/null | grep -q "\"text\":\"$want\""; then
            now
            return 0
        fi
        sleep 0.01
    done
    echo "never arrived: $want" >&2
    exit 1
}

RESULTS="$DIR/results"
: > "$RESULTS"
for fault in peer-kill peer-term peer-gone; do
    for run in $(seq "$RUNS"); do
        send_line
        wait_line >/dev/null
        case "$fault" in
            peer-kill) kill -9 "${PIDS[2]}"; wait "${PIDS[2]}" 2>/dev/null || true ;;
            peer-term) kill -TERM "${PIDS[2]}"; wait "${PIDS[2]}" 2>/dev/null || true ;;
            peer-gone)
                kill -9 "${PIDS[2]}"; wait "${PIDS[2]}" 2>/dev/null || true
                for _ in $(seq 8); do send_line; sleep 1; done
                ;;
        esac
        t0=$(now)
        start_bob
        send_line
        t1=$(wait_line)
        echo "$fault $(python3 -c "print($t1 - $t0)")" >> "$RESULTS"
        # Settle: bob's control socket answers before the next run.
        for _ in $(seq 200); do b whoami >/dev/null 2>&1 && break; sleep 0.05; done
    done
done

# Every line once, in order.
got=$(b --json history alice -n 100000 | python3 -c '
import json, sys
h = [m["text"] for m in json.load(sys.stdin) if m["direction"] == "in"]
print(len(h), int(h == [f"line {i}" for i in range(len(h))]))')
read -r count in_order <<<"$got"
echo "lines sent: $SENT, at bob: $count, each once and in order: $([[ $in_order == 1 && $count == "$SENT" ]] && echo yes || echo NO)"
python3 - "$RESULTS" <<'PY'
import sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    fault, secs = line.split()
    runs[fault].append(float(secs))
print(f"{'fault':<12} {'runs':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
for fault, v in runs.items():
    v.sort()
    pick = lambda q: v[min(len(v) - 1, int(round(q * (len(v) - 1))))]
    print(f"{fault:<12} {len(v):>4} {pick(0.5):>7.2f} {pick(0.95):>7.2f} {max(v):>7.2f}")
PY
