//! Generates the Rust code of etcd v3's gRPC API: compiles crates/aspen/proto with protox (a
//! protobuf compiler written in Rust, so no system `protoc` is needed) and writes the prost
//! messages and the tonic servers and clients into crates/aspen/src/etcd/proto. The generated
//! files are checked in; run this (`scripts/gen-etcd-proto.sh`) after changing a .proto file.

use std::path::{Path, PathBuf};

/// The .proto files, relative to the include root crates/aspen/proto.
const PROTOS: &[&str] = &["etcd/mvccpb/kv.proto", "etcd/authpb/auth.proto", "etcd/etcdserverpb/rpc.proto"];

fn main() {
    if let Err(e) = run() {
        eprintln!("aspen-protogen: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let aspen = Path::new(env!("CARGO_MANIFEST_DIR")).join("../aspen").canonicalize()?;
    let include = aspen.join("proto");
    let out_dir = aspen.join("src/etcd/proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| include.join(p)).collect();

    let fds = protox::compile(&files, [&include])?;
    std::fs::create_dir_all(&out_dir)?;
    tonic_prost_build::configure().build_server(true).build_client(true).out_dir(&out_dir).compile_fds(fds)?;

    for package in ["etcdserverpb", "mvccpb", "authpb"] {
        let file = out_dir.join(format!("{package}.rs"));
        if !file.is_file() {
            return Err(format!("expected {} to be generated", file.display()).into());
        }
        println!("aspen-protogen: wrote {}", file.display());
    }
    Ok(())
}
