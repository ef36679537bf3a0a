#!/usr/bin/env bash
# Aspen and etcd side by side on this machine: installs what is missing (etcd 3.4 from Debian's
# etcd-server package, protoc for the etcd client), builds aspen-node and aspen-compare in release
# mode, and runs aspen-compare, which starts a 3-member etcd, a 3-node Aspen and a 3-node 4-shard
# Aspen on 127.0.0.1 one after another, measures each with the same load generator, prints the
# table and writes benches/RESULTS.md. Arguments go to aspen-compare (e.g. --quick for a smoke
# run; --help lists them). Needs root (or sudo) only when something must be installed, and for
# CPU caps (`--cpu-per-node 0.45`, or `none,0.45` for the uncapped and the capped table in one
# run): each server process then runs in a cgroup of its own, which needs root, so when this
# script is not root it builds as the user and runs only aspen-compare under sudo.
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

# Does any --cpu-per-node value set a cap (a number, not `none`)?
capped=false
want_value=false
for arg in "$@"; do
  value=""
  if [ "$want_value" = true ]; then
    value="$arg"
    want_value=false
  elif [ "$arg" = "--cpu-per-node" ]; then
    want_value=true
  elif [[ "$arg" == --cpu-per-node=* ]]; then
    value="${arg#--cpu-per-node=}"
  fi
  if [[ "$value" =~ [0-9] ]]; then capped=true; fi
done

run=("$target/release/aspen-compare" --node-bin "$target/release/aspen-node" "$@")
if [ "$capped" = true ] && [ "$(id -u)" -ne 0 ]; then
  echo "compare-etcd: --cpu-per-node needs root for its cgroups: running aspen-compare with sudo" >&2
  exec sudo --preserve-env=ASPEN_COMPARE_COMMAND "${run[@]}"
fi
exec "${run[@]}"
