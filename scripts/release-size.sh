#!/usr/bin/env bash
# On demand (a cold release build takes ~10–20 min here, so not in every CI run): builds the
# shipped binaries with `cargo build --release` and checks each is at most 30 MB (issue 20:
# shippable). Prints the sizes; exits 1 if one is larger.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=$((30 * 1000 * 1000))
cargo build --release --bin aspen-node --bin aspen-cli
status=0
for bin in aspen-node aspen-cli; do
  size=$(stat -c %s "target/release/$bin")
  awk -v b="$bin" -v s="$size" 'BEGIN { printf "%-10s %6.1f MB\n", b, s / 1e6 }'
  if [ "$size" -gt "$limit" ]; then
    echo "$bin is larger than 30 MB" >&2
    status=1
  fi
done
exit $status
