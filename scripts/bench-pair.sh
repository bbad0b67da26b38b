# Sourced by the bench scripts: release builds, a rendezvous and two
# daemons (alice, bob) on loopback in a temporary directory, registered and
# connected. Defines BIN, DIR, PIDS (rendezvous, alice, bob), a() and b().
cargo build --release --workspace --bins
BIN="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
DIR="$(mktemp -d /tmp/p2p-bench.XXXXXX)"
PIDS=()
# BENCH_KEEP=1 keeps the directory (daemon logs) for a look afterwards.
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; [[ -n "${BENCH_KEEP:-}" ]] && echo "kept $DIR" || rm -rf "$DIR"' EXIT
wait_for_line() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; cat "$1" >&2; exit 1; }
export RUST_LOG="${RUST_LOG:-warn}"
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
