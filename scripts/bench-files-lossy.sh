#!/usr/bin/env bash
# File transfer through the NAT lab over an impaired path: ~50 ms round
# trip, LOSS% lost on each router's link in each direction (default 0.5,
# about 1% each way end to end). Needs root, iproute2, nftables and
# /dev/net/tun (the project's link emulator: no netem here).
#
#   sudo ./scripts/bench-files-lossy.sh [SIZE_MIB] [LOSS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
BIN="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
RUST_LOG=warn "$BIN/bench-lab" "${1:-256}" "${2:-0.5}"
