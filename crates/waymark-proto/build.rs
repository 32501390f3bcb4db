//! Compiles `proto/waymark/v1/*.proto` without `protoc`.
//!
//! `protox` parses the files (and the `google/protobuf` well-known types it
//! ships) into a `FileDescriptorSet`; `tonic-prost-build` generates the
//! messages, clients and servers from it. The encoded set, imports and
//! comments included, is written to `OUT_DIR/waymark_descriptor.bin` for
//! server reflection.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto").canonicalize()?;
    let package_dir = proto_root.join("waymark/v1");
    println!("cargo:rerun-if-changed={}", package_dir.display());

    let protos = proto_files(&package_dir)?;
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(&protos)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("waymark_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    // The imports stay in the set: prost-build needs them to know whether a
    // message can derive `Eq`/`Hash`. Their code is not generated, since the
    // well-known types map to `prost_types`.
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        // Decode failures are the client's mistake: INVALID_ARGUMENT.
        .codec_path("crate::codec::WaymarkCodec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// Every `.proto` file directly in `dir`, sorted so the output is stable.
fn proto_files(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
