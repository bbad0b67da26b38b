#!/usr/bin/env bash
# File transfer throughput on loopback with release builds: one file of
# SIZE MiB (default 1024) from alice's daemon to bob's, through
# `p2pctl send-file` / `accept-file`; prints MB/s, each daemon's CPU time
# and peak memory (VmHWM), and, with BENCH_ALLOCS=1 as root with perf, the
# heap allocations each daemon made during the transfer. Linux: it reads
# /proc.
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
# Heap allocations during the transfer, with BENCH_ALLOCS=1 where perf can
# count them (root, uprobes on libc's malloc/calloc/realloc): a perf stat
# per daemon. Counting slows the daemons: such a run's speed is not the
# figure.
ALLOCS=()
if [[ -n "${BENCH_ALLOCS:-}" && $EUID -eq 0 ]] && command -v perf >/dev/null; then
    LIBC="$(ldd "$BIN/p2pd" | awk '/libc.so/ {print $3}')"
    for f in malloc calloc realloc; do perf probe -q -x "$LIBC" "$f" 2>/dev/null || true; done
    for i in 1 2; do
        perf stat -x, -e probe_libc:malloc,probe_libc:calloc,probe_libc:realloc \
            -p "${PIDS[$i]}" -o "$DIR/allocs.$i" 2>/dev/null & ALLOCS+=($!)
    done
    sleep 0.2
fi
b accept-file "$ID" --to "$DIR/inbox" >/dev/null
t2=$(now)
for p in "${ALLOCS[@]}"; do kill -INT "$p"; wait "$p" 2>/dev/null || true; done
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
print(f"end to end:      {t2-t0:.2f} s  ({mb/(t2-t0):.1f} MB/s, send-file to verified: hashing, offer, accept, transfer)")
PY
echo "daemon CPU (s):  alice $(cpu "${PIDS[1]}"), bob $(cpu "${PIDS[2]}")"
echo "peak memory:     alice $(hwm "${PIDS[1]}"), bob $(hwm "${PIDS[2]}")"
allocs() { awk -F, '$1 ~ /^[0-9]+$/ {n += $1} END {print n + 0}' "$DIR/allocs.$1" 2>/dev/null; }
if [[ ${#ALLOCS[@]} -gt 0 ]]; then
    python3 - "$SIZE" "$(allocs 1)" "$(allocs 2)" <<'PY'
import sys
size, a, b = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mb = size * 1024 * 1024 / 1e6
print(f"allocations:     alice {a} ({a/mb:.1f} per MB), bob {b} ({b/mb:.1f} per MB) during the transfer (malloc, calloc, realloc)")
PY
else
    echo "allocations:     not counted (BENCH_ALLOCS=1, as root, with perf)"
fi

# Side by side with scp, where an sshd can be started here (root, Debian's
# openssh-server): this project (send-file to the verified, synced file),
# then scp (aes128-gcm, then a sync of the copy), then the project again,
# ... (BENCH_RUNS pairs, default 3, each on new random bytes; BENCH_SCP=0
# skips it).
if [[ "${BENCH_SCP:-1}" != 0 && $EUID -eq 0 && -x /usr/sbin/sshd ]] && command -v scp >/dev/null; then
    S="$DIR/ssh"
    mkdir -p "$S" /run/sshd
    ssh-keygen -q -t ed25519 -N '' -f "$S/host"
    ssh-keygen -q -t ed25519 -N '' -f "$S/user"
    cp "$S/user.pub" "$S/authorized_keys"
    PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    /usr/sbin/sshd -D -f /dev/null -p "$PORT" -h "$S/host" -o ListenAddress=127.0.0.1 \
        -o AuthorizedKeysFile="$S/authorized_keys" -o StrictModes=no -o UsePAM=no \
        -o PermitRootLogin=prohibit-password -o PidFile=none \
        -o "Subsystem=sftp internal-sftp" 2>"$S/sshd.log" & PIDS+=($!)
    sleep 0.5
    SCP=(scp -q -c aes128-gcm@openssh.com -i "$S/user" -o StrictHostKeyChecking=no
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -P "$PORT")
    since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
    project() {
        local t0 id=""
        t0=$(now)
        a send-file bob "$DIR/file.bin" --no-wait >/dev/null
        for _ in $(seq 600); do
            id="$(b transfers | awk '/offered/ {print $1; exit}')"
            [[ -n "$id" ]] && break
            sleep 0.02
        done
        b accept-file "$id" --to "$DIR/inbox.$1" >/dev/null
        local took
        took="$(since "$t0")"
        cmp "$DIR/file.bin" "$DIR/inbox.$1/file.bin" || return 1
        rm -rf "$DIR/inbox.$1"
        echo "$took"
    }
    viascp() {
        local t0
        t0=$(now)
        "${SCP[@]}" "$DIR/file.bin" "root@127.0.0.1:$DIR/scp.bin" || return 1
        sync "$DIR/scp.bin"
        local took
        took="$(since "$t0")"
        cmp "$DIR/file.bin" "$DIR/scp.bin" || return 1
        rm -f "$DIR/scp.bin"
        echo "$took"
    }
    echo "side by side with scp (aes128-gcm, loopback), end to end, interleaved:"
    for i in $(seq "${BENCH_RUNS:-3}"); do
        # New bytes each pair (a file the receiver already has would not
        # be sent again).
        head -c "$((SIZE * 1024 * 1024))" /dev/urandom > "$DIR/file.bin"
        sync "$DIR/file.bin"
        A="$(project "$i")"
        B="$(viascp)"
        python3 - "$SIZE" "$i" "$A" "$B" <<'PY'
import sys
size, i, a, b = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
mb = size * 1024 * 1024 / 1e6
print(f"  pair {i}: this project {a:.2f} s ({mb/a:.0f} MB/s), scp {b:.2f} s ({mb/b:.0f} MB/s): {b/a:.2f}x scp's speed")
PY
    done
fi
