#!/usr/bin/env bash
# Chat throughput and latency on loopback with release builds: MESSAGES
# lines piped into `p2pctl send bob` (100 B each, then 1 KiB: half as
# many, then 64 KiB: a fiftieth), counted as they arrive stored in bob's event stream; one message
# at a time from a connected client (latency); a p2pctl process's start.
# See tests/src/bin/bench-chat.rs.
#
#   ./scripts/bench-chat.sh [MESSAGES]     (default 100000)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-100000}"
source scripts/bench-pair.sh
echo "machine: $(nproc) cores, $(uname -sr); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$BIN/bench-chat" "$DIR/a.sock" "$DIR/b.sock" "${PIDS[1]}" "${PIDS[2]}" "$BIN/p2pctl" "$N"
