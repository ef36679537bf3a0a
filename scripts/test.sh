#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a machine that has only the Rust toolchain.
#
# Installs what is missing, then runs `cargo nextest run --workspace --all-targets --all-features`
# (extra arguments go to nextest, e.g. `scripts/test.sh -E 'binary(faults)'`):
# - cargo-nextest (`cargo install`), always;
# - protoc (the etcd comparison tool's client is built with it), nftables + iproute2 (the network
#   namespace tests; they skip without them), promtool (Debian's prometheus package: the /metrics
#   test checks its output with it) and gdb (stacks in their post-mortems), with apt-get
#   as root or through `sudo -n`; etcdctl (Debian's etcd-client), etcd (etcd-server) and openssl
#   for the etcd API's tests. Without a way to install protoc it stops and says what to do.
# Set ASPEN_TEST_NO_INSTALL=1 to install nothing (it then only checks); `--install-only` installs
# and stops (.ci/run does that before clippy, which builds the same crates).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "== scripts/test.sh: $*" >&2; }

apt_install() {
  local runner=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then runner=(sudo -n); else return 1; fi
  fi
  command -v apt-get >/dev/null 2>&1 || return 1
  say "apt-get install $*"
  "${runner[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >/dev/null ||
    { "${runner[@]}" apt-get update >/dev/null && "${runner[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >/dev/null; }
}

install=1
[ "${ASPEN_TEST_NO_INSTALL:-0}" = 1 ] && install=0

if ! cargo nextest --version >/dev/null 2>&1; then
  if [ "$install" = 1 ]; then
    say "installing cargo-nextest (cargo install cargo-nextest --locked; a few minutes, once)"
    cargo install cargo-nextest --locked
  else
    say "cargo-nextest is missing: cargo install cargo-nextest --locked"
    exit 1
  fi
fi

if ! command -v protoc >/dev/null 2>&1 && [ -z "${PROTOC:-}" ]; then
  if [ "$install" = 0 ] || ! apt_install protobuf-compiler; then
    say "protoc is missing (the etcd comparison tool's client needs it to build): install it (Debian/Ubuntu: apt-get install protobuf-compiler; macOS: brew install protobuf) or set PROTOC to its path, then run this again"
    exit 1
  fi
fi

if ! command -v nft >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  if [ "$install" = 0 ] || ! apt_install nftables iproute2; then
    say "nftables/iproute2 missing and not installable here: tests/netns.rs will skip"
  fi
fi
if ! command -v promtool >/dev/null 2>&1; then
  # Debian's prometheus package ships promtool; its service is not started here (no systemd).
  if [ "$install" = 0 ] || ! apt_install --no-install-recommends prometheus; then
    say "promtool missing: the /metrics test skips its format check"
  fi
fi
if ! command -v etcdctl >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
  # etcdctl (Debian's etcd-client, 3.4) drives the etcd API's tests; openssl makes their TLS
  # certificate; curl drives its JSON gateway.
  if [ "$install" = 0 ] || ! apt_install etcd-client openssl curl; then
    say "etcdctl, openssl or curl missing: the etcd API tests (tests/process/etcd.rs, etcd_json.rs) skip"
  fi
fi
if ! command -v etcd >/dev/null 2>&1; then
  # etcd itself (Debian's etcd-server, 3.4): the differential test runs the same operations on it
  # and on Aspen's etcd API (bench/compare/tests/etcd_client/differential.rs). Its service is not
  # started here (no systemd).
  if [ "$install" = 0 ] || ! apt_install etcd-server; then
    say "etcd missing: the differential test against etcd skips"
  fi
fi
if ! command -v gdb >/dev/null 2>&1; then
  if [ "$install" = 0 ] || ! apt_install gdb; then
    say "gdb missing: netns post-mortems will omit stacks"
  fi
fi

if [ "${1:-}" = --install-only ]; then
  say "everything the tests need is here"
  exit 0
fi

# aspen-protogen's test checks that the etcd API's generated code matches its .proto files.
say "cargo nextest run --workspace --all-targets --all-features $*"
exec cargo nextest run --workspace --all-targets --all-features "$@"
