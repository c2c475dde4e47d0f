#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 5), from the committed
# seeds (fuzz/seeds/<target>, crash regressions included) and a working
# corpus in fuzz/target/corpus, and prints one line a target: runs,
# coverage, corpus size, crashes. `.ci/run` runs it for a few seconds; the
# campaign in RELIABILITY.md ran it for longer.
#
# The targets are `cargo fuzz` targets (`cargo +nightly fuzz run certs`
# works as usual); this script builds them with the same instrumentation
# through plain cargo, so that CI needs no cargo-fuzz install. On stable,
# RUSTC_BOOTSTRAP=1 lets this crate alone use what the instrumentation
# needs; the rest of the workspace stays on stable.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-5}"
targets=(certs wire control enroll transport socks_http dns job_frames archive configs oidc small_parsers mesh_datagrams)

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# With an explicit --target, RUSTFLAGS reach the targets but not build
# scripts and proc macros (which must not be instrumented), as cargo fuzz does.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo "${toolchain[@]}" build --release --locked --bins --target "$host" --target-dir target/smoke --quiet

failed=0
printf '%-16s %12s %8s %8s %s\n' TARGET RUNS COV CORPUS RESULT
for t in "${targets[@]}"; do
  corpus="target/corpus/$t"
  artifacts="target/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  log="target/corpus/$t.log"
  if "target/smoke/$host/release/$t" -max_total_time="$seconds" \
      -artifact_prefix="$artifacts" -print_final_stats=1 "$corpus" "seeds/$t" >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see $log and $artifacts)"
    failed=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
  size=$(find "$corpus" -type f | wc -l)
  printf '%-16s %12s %8s %8s %s\n' "$t" "${runs:-?}" "${cov:-?}" "$size" "$result"
done
if [ "$failed" -ne 0 ]; then
  tail -n 40 target/corpus/*.log | grep -B2 -A20 'panicked\|ERROR: libFuzzer' | head -n 80 >&2 || true
  exit 1
fi
