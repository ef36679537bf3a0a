#!/usr/bin/env bash
# Aspen and etcd side by side on this machine: installs what is missing (etcd 3.4 from Debian's
# etcd-server package, protoc for the etcd client), builds aspen-node and aspen-compare in release
# mode, and runs aspen-compare, which starts a 3-member etcd, a 3-node Aspen and a 3-node 4-shard
# Aspen on 127.0.0.1 one after another, measures each with the same load generator, prints the
# table and writes benches/RESULTS.md. Arguments go to aspen-compare (e.g. --quick for a smoke
# run; --help lists them). Needs root (or sudo) only when something must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "compare-etcd: installing ${missing[*]}" >&2
  sudo_if_needed apt-get update
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

target="${CARGO_TARGET_DIR:-target}"
# One invocation for both packages: cargo unifies the dependencies' features per invocation, so
# building them separately would compile the shared dependency tree twice.
cargo build --release -p aspen-bin -p aspen-compare --bins

export ASPEN_COMPARE_COMMAND="scripts/compare-etcd.sh${*:+ $*}"
exec "$target/release/aspen-compare" --node-bin "$target/release/aspen-node" "$@"
