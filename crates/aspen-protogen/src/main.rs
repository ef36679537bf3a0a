//! Generates the Rust code of etcd v3's gRPC API (and gRPC's health service): compiles crates/aspen/proto with protox (a
//! protobuf compiler written in Rust, so no system `protoc` is needed) and writes the prost
//! messages and the tonic servers and clients into crates/aspen/src/etcd/proto, with serde
//! implementations of etcd's messages in proto3's JSON mapping (pbjson: `PACKAGE.serde.rs`, for
//! the JSON gateway, field names as in the .proto files, as etcd's gateway writes them). The generated
//! files are checked in; run this (`scripts/gen-etcd-proto.sh`) after changing a .proto file.
//! Its test (run by the suite) generates them afresh and fails if the checked-in files differ.

use std::path::{Path, PathBuf};

/// The .proto files, relative to the include root crates/aspen/proto.
const PROTOS: &[&str] = &[
    "etcd/mvccpb/kv.proto",
    "etcd/authpb/auth.proto",
    "etcd/etcdserverpb/rpc.proto",
    "etcd/v3lockpb/v3lock.proto",
    "etcd/v3electionpb/v3election.proto",
    "grpc/health/v1/health.proto",
];
/// The generated files, one per protobuf package.
const PACKAGES: &[&str] = &["etcdserverpb", "mvccpb", "authpb", "v3lockpb", "v3electionpb", "grpc.health.v1"];
/// The packages that also get serde implementations (`PACKAGE.serde.rs`): everything the JSON
/// gateway speaks (not gRPC's health service, which it does not serve).
const JSON_PACKAGES: &[&str] = &["etcdserverpb", "mvccpb", "authpb", "v3lockpb", "v3electionpb"];

fn main() {
    if let Err(e) = run() {
        eprintln!("aspen-protogen: {e}");
        std::process::exit(1);
    }
}

/// The aspen crate's directory.
fn aspen_dir() -> std::io::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../aspen").canonicalize()
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = aspen_dir()?.join("src/etcd/proto");
    for file in generate(&out_dir)? {
        println!("aspen-protogen: wrote {}", file.display());
    }
    Ok(())
}

/// Compiles the protos and writes one file per package into `out_dir`; returns their paths.
fn generate(out_dir: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let include = aspen_dir()?.join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| include.join(p)).collect();
    let fds = protox::compile(&files, [&include])?;
    let descriptors = prost::Message::encode_to_vec(&fds);
    std::fs::create_dir_all(out_dir)?;
    tonic_prost_build::configure().build_server(true).build_client(true).out_dir(out_dir).compile_fds(fds)?;
    // Unknown fields are ignored on input, as etcd's gateway (grpc-gateway 1) does.
    let prefixes: Vec<String> = JSON_PACKAGES.iter().map(|p| format!(".{p}")).collect();
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .out_dir(out_dir)
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&prefixes)?;
    let mut written = Vec::new();
    let names = PACKAGES.iter().map(|p| format!("{p}.rs")).chain(JSON_PACKAGES.iter().map(|p| format!("{p}.serde.rs")));
    for name in names {
        let file = out_dir.join(name);
        if !file.is_file() {
            return Err(format!("expected {} to be generated", file.display()).into());
        }
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in code is what the protos generate (no hand edits, no stale files).
    #[test]
    fn the_checked_in_code_matches_the_protos() {
        let out = std::env::temp_dir().join(format!("aspen-protogen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let fresh = generate(&out).expect("generate");
        let checked_in = aspen_dir().unwrap().join("src/etcd/proto");
        for file in fresh {
            let name = file.file_name().unwrap();
            let want = std::fs::read(&file).unwrap();
            let have = std::fs::read(checked_in.join(name)).unwrap_or_default();
            assert!(
                want == have,
                "crates/aspen/src/etcd/proto/{} differs from what the protos generate: run scripts/gen-etcd-proto.sh",
                name.to_string_lossy()
            );
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}
