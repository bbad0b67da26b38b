#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder (libFuzzer through
# libfuzzer-sys), on the stable toolchain: the instrumentation cargo-fuzz
# would add, without its nightly-only sanitizer flags.
#
#   scripts/fuzz.sh                      every target, 60 s each
#   scripts/fuzz.sh packet -runs=10000000
#   scripts/fuzz.sh all -max_total_time=20   (what CI runs)
#
# Each target starts from its committed corpus (fuzz/corpus/TARGET) and
# adds what it finds there; a crash is written to fuzz/artifacts/TARGET/
# and fails the script. At the end, one line per target: executions,
# seconds, corpus size, crashes.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

all=(packet server_msg client_msg peer_msg identity control server)
target="${1:-all}"
shift || true
if [[ "$target" == all ]]; then
    targets=("${all[@]}")
else
    targets=("$target")
fi
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(-max_total_time=60)

host=$(rustc -vV | sed -n 's/^host: //p')
# cargo-fuzz's flags for `--sanitizer none`; --target keeps them off build
# scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
cargo build --release --locked --target "$host" --bins -q 2>/dev/null \
    || cargo build --release --target "$host" --bins -q

summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    echo "== fuzz $t ${args[*]}"
    if ! "./target/$host/release/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
        -print_final_stats=1 "${args[@]}" >"$log" 2>&1; then
        failed=1
        tail -n 40 "$log"
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    crashes=$(find "artifacts/$t" -type f | wc -l)
    files=$(find "corpus/$t" -type f | wc -l)
    summary+=("$(printf '%-11s %12s execs  %8s execs/s  corpus %5s  crashes %s' \
        "$t" "${runs:-?}" "${secs:-?}" "$files" "$crashes")")
    [[ "$crashes" == 0 ]] || failed=1
    rm -f "$log"
done
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
