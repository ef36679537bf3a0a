#!/usr/bin/env bash
# Builds every cargo-fuzz target under fuzz/ and runs each for SECONDS (default 30).
# Exits non-zero, naming the target and its crashing input, if any target finds a crash.
#
#   scripts/fuzz.sh [SECONDS]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Works on the stable toolchain:
# RUSTC_BOOTSTRAP=1 lets it accept the unstable flags cargo-fuzz passes. Targets are built
# without a sanitizer (the decoders are safe Rust; a sanitizer build costs minutes and slows
# every run) but with debug assertions, so integer overflows count as crashes.
# FUZZ_TARGET_DIR overrides the build directory (default fuzz/target).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-30}"
export RUSTC_BOOTSTRAP=1
flags=(--sanitizer none --debug-assertions --target-dir "${FUZZ_TARGET_DIR:-$PWD/target}")

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 1
fi

echo "== cargo fuzz build"
start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "built in $((SECONDS - start)) s"

# New inputs go to a scratch corpus; the committed seeds in corpus/<target>/ are only read.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for target in $(cargo fuzz list); do
  mkdir -p "$work/$target"
  corpora=("$work/$target")
  [[ -d "corpus/$target" ]] && corpora+=("corpus/$target")
  echo "== fuzz $target for ${secs} s"
  if cargo fuzz run "${flags[@]}" "$target" "${corpora[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$work/$target.log" 2>&1; then
    grep -E '^stat::number_of_executed_runs|^Done' "$work/$target.log" || true
  else
    tail -n 60 "$work/$target.log"
    echo "!! $target FAILED (crashing input under fuzz/artifacts/$target/)" >&2
    failed+=("$target")
  fi
done

if ((${#failed[@]})); then
  echo "== fuzzing found crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "== every fuzz target ran ${secs} s without a crash"
