#!/usr/bin/env bash
# Regenerates the Rust code of etcd v3's gRPC API: crates/aspen/src/etcd/proto/{etcdserverpb,
# mvccpb,authpb}.rs from the .proto files under crates/aspen/proto. Run it after changing a .proto
# file and commit the .proto and the generated files together. It runs crates/aspen-protogen,
# which compiles the files with protox (a protobuf compiler in Rust) and tonic-prost-build, so it
# needs only the Rust toolchain: no protoc. The generated files are kept as written (mod.rs marks
# them rustfmt::skip), so there is nothing to format afterwards. Arguments go to cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo run -p aspen-protogen "$@"
