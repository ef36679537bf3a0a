//! Writes the seed corpus of every fuzz target to `fuzz/corpus/<target>/seed-N`. From `fuzz/`,
//! either `cargo run --example seeds` (a normal build) or, reusing the fuzz build's artifacts,
//! with the RUSTFLAGS that `cargo fuzz build` prints and `--target x86_64-unknown-linux-gnu
//! --release`.

// Instrumented builds reference libFuzzer's coverage callbacks from every crate: link libFuzzer,
// and give it the (unused) test entry point that `fuzz_target!` would otherwise define.
extern crate libfuzzer_sys;

#[no_mangle]
#[allow(improper_ctypes_definitions)] // libFuzzer's own declaration; never called across FFI
pub extern "C" fn rust_fuzzer_test_input(_bytes: &[u8]) -> i32 {
    0
}

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in aspen_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}
