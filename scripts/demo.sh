#!/usr/bin/env bash
# A complete local demo: one rendezvous server and two daemons (alice and
# bob) on loopback, driven only through p2pctl, printing what happens.
# Everything lives in a temporary directory that is removed at the end.
#
#   ./scripts/demo.sh            # build (if needed) and run
#   KEEP=1 ./scripts/demo.sh     # keep the directory and logs
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "demo: cargo not found; install Rust from https://rustup.rs first" >&2
    exit 1
fi
echo "== building (cargo build --workspace --bins)"
cargo build --workspace --bins
BIN="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/debug"

DIR="$(mktemp -d /tmp/p2p-demo.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ "${KEEP:-}" == 1 ]]; then echo "== kept $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
alice() { "$BIN/p2pctl" --socket "$DIR/alice.sock" "$@"; }
bob() { "$BIN/p2pctl" --socket "$DIR/bob.sock" "$@"; }

wait_for_line() { # file pattern
    for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "demo: timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

step "starting the rendezvous server"
"$BIN/rendezvous" --listen 127.0.0.1:0 --data-dir "$DIR/rendezvous" 2>"$DIR/rendezvous.log" &
PIDS+=($!)
wait_for_line "$DIR/rendezvous.log" "listening on"
SERVER="$(sed -n 's/.*listening on \([^,]*\),.*/\1/p' "$DIR/rendezvous.log" | head -1)"
KEY="$("$BIN/rendezvous" --print-key --data-dir "$DIR/rendezvous")"
echo "rendezvous on $SERVER, key ${KEY:0:16}..."

start_daemon() { # name
    "$BIN/p2pd" --server "$SERVER" --server-key "$KEY" --listen 127.0.0.1:0 \
        --data-dir "$DIR/$1" --socket "$DIR/$1.sock" 2>>"$DIR/$1.log" &
    PIDS+=($!)
    wait_for_line "$DIR/$1.log" "control socket"
    echo "p2pd for $1 started (pid $!)"
}

step "starting two daemons"
start_daemon alice
start_daemon bob

step "registering names"
run alice register alice
run bob register bob
echo "(a name bound to another key is refused:)"
bob register alice || echo "exit code $?"

step "who is online"
run alice users

step "bob watches his events (shown prefixed with 'bob|')"
bob watch | sed -u 's/^/bob| /' &
PIDS+=($!)
sleep 0.3

step "alice asks to connect; bob accepts"
alice connect bob &
CONNECT=$!
for _ in $(seq 100); do bob peers | grep -q "wants to connect" && break; sleep 0.1; done
run bob accept alice
wait "$CONNECT"

step "chatting"
run alice send bob "hello bob, this is end-to-end encrypted"
echo "hi alice!" | bob send alice
printf 'line one\nline two\nline three\n' | alice send bob
run alice ping bob
sleep 0.5

step "history at alice"
run alice history bob

step "alice sends bob a file; bob takes it"
head -c 3000000 /dev/urandom > "$DIR/holiday.jpg"
run alice send-file bob "$DIR/holiday.jpg" --no-wait
ID=""
for _ in $(seq 100); do
    ID="$(bob transfers | awk '/offered/ {print $1; exit}')"
    [[ -n "$ID" ]] && break
    sleep 0.1
done
run bob transfers
run bob accept-file "$ID" --to "$DIR/bob-downloads"
cmp "$DIR/holiday.jpg" "$DIR/bob-downloads/holiday.jpg" && echo "(the received file is byte-identical)"
run alice transfers

step "bob's daemon stops; alice's messages wait in her outbox"
kill "${PIDS[2]}"
sleep 0.5
run alice send bob "are you there?"
run alice peers

step "bob's daemon comes back and receives them"
start_daemon bob
for _ in $(seq 100); do bob history alice | grep -q "are you there" && break; sleep 0.1; done
run bob history alice -n 3

step "done"
echo "logs: $DIR/*.log (KEEP=1 to keep them)"
