//! Compiles `proto/dmpay/v1/*.proto` with the vendored protoc, so a fresh machine needs
//! nothing installed, and writes the file descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of intent: build scripts run single-threaded before compilation; setting
    // PROTOC here is the documented way to point prost-build at a protoc binary.
    std::env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut protos: Vec<PathBuf> = std::fs::read_dir("proto/dmpay/v1")?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    protos.sort();

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("dmpay_descriptor.bin"))
        // Messages that carry card data get no derived Debug: the api layer implements
        // a masking one, so a PAN or CVC can never be printed by accident.
        .skip_debug(["dmpay.v1.TokenizeCardRequest"])
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
