#!/usr/bin/env bash
# The hostile-internet attacks, rerun against release builds on loopback:
# one table row per attack with the bound it meets now (amplification
# factor, registrations let through, logins under a handshake flood with
# the server's CPU and peak RSS, TCP slots held, a daemon's answer time
# with 100,000 records, a peer's floods of offers, a low open-file limit,
# a right-to-left override), then the user-list cost with 20,000 users
# online (the user_list example). See the top of tests/src/bin/attack.rs.
#
#   ./scripts/bench-attacks.sh [ATTACK ...]     (default: all, about 2 min)
#   ATTACK_RATE=100000 ./scripts/bench-attacks.sh flood
#
# The flood sends from 127.1.0.0/16, the TCP attack from 127.2.0.0/16:
# Linux answers on all of 127.0.0.0/8 without configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins -q
echo "machine: $(nproc) cores, $(uname -sr); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
RUST_LOG=warn target/release/attack "$@"
if [[ $# -eq 0 ]]; then
    # D5, in the simulated world (20,000 users online here; the figure
    # in docs/security.md is for 100,000: `... user_list -- 100000 8`).
    echo
    echo "D5 user-list pages with 20,000 users online (cargo run --release -p proto --example user_list -- 20000 8):"
    cargo run --release -q -p proto --example user_list -- 20000 8 | tail -2
fi
