#!/usr/bin/env bash
# One recorded fuzzing run of one target (see RELIABILITY.md), then the committed corpus
# minimised with what it found.
#   fuzz/run.sh TARGET SECONDS MAX_LEN
# Builds the instrumented targets if needed (cargo fuzz, stable toolchain, no sanitizer:
# `cargo install cargo-fuzz`), fuzzes with fuzz/corpus/TARGET as seeds into a scratch
# corpus under fuzz/target/work/, at low priority, then replaces fuzz/corpus/TARGET by
# libFuzzer's set-cover merge (-set_cover_merge=1) of the two: a small set with the
# same coverage edges (hit counts ignored: with them the zip corpus alone was 1.8 MB).
# Crashes, timeouts and OOMs land in fuzz/artifacts/TARGET/. The run's log is
# fuzz/target/logs/TARGET-<UTC time>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1 seconds=$2 max_len=$3
# FUZZ_NO_BUILD=1 runs the binary already built (the build takes minutes on 2 cores).
if [ -z "${FUZZ_NO_BUILD:-}" ]; then
  nice -n 10 cargo fuzz build -s none "$target"
fi
bin=fuzz/target/x86_64-unknown-linux-gnu/release/$target
work=fuzz/target/work/$target
mkdir -p "$work" "fuzz/artifacts/$target" fuzz/target/logs
log=fuzz/target/logs/$target-$(date -u +%Y%m%dT%H%M%SZ).log
flags=(-max_len="$max_len" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
       -artifact_prefix="fuzz/artifacts/$target/")
# FUZZ_EXTRA: more libFuzzer flags, e.g. "-fork=1 -ignore_crashes=1" to go on past a known
# finding (each crash still written to fuzz/artifacts/TARGET/).
read -r -a extra <<<"${FUZZ_EXTRA:-}"
flags+=("${extra[@]}")
echo "# $(date -u +%FT%TZ) on $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- server || echo ' + uncommitted changes under server/'), $(nproc) cores" | tee "$log"
echo "+ nice -n 10 $bin $work fuzz/corpus/$target ${flags[*]} -max_total_time=$seconds" | tee -a "$log"
status=0
nice -n 10 "$bin" "$work" "fuzz/corpus/$target" "${flags[@]}" -max_total_time="$seconds" \
  >>"$log" 2>&1 || status=$?
grep -E '^#[0-9]+.*(DONE|pulse)' "$log" | tail -2 || true
grep -E '^stat::' "$log" || true
if [ "$status" -ne 0 ]; then
  grep -E 'ERROR|panicked|Test unit written' "$log" | head -5
  echo "fuzzer exited with $status: see $log"
  exit "$status"
fi
merged=fuzz/target/merged/$target
rm -rf "$merged" && mkdir -p "$merged"
"$bin" -set_cover_merge=1 -use_counters=0 "$merged" "fuzz/corpus/$target" "$work" -max_len="$max_len" \
  -rss_limit_mb=2048 -timeout=10 >>"$log" 2>&1
# Regression inputs (findings, kept by name) add no coverage of their own: keep them.
cp fuzz/corpus/"$target"/regression-* "$merged"/ 2>/dev/null || true
rm -rf "fuzz/corpus/$target" && mv "$merged" "fuzz/corpus/$target"
echo "corpus: $(ls "fuzz/corpus/$target" | wc -l) files, $(du -sk "fuzz/corpus/$target" | cut -f1) KiB"
