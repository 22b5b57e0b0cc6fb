//! Compiles the snapshot `.proto` with `protox` (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kanali/snapshot/v1/snapshot.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Holds a private key: its Debug (in lib.rs) redacts it, so no `{:?}` of a snapshot
        // can put a key in a log.
        .skip_debug(["kanali.snapshot.v1.TlsMaterial"])
        // The crates that dial build their own channel; without `connect` this crate needs
        // no tonic transport feature of its own.
        .build_transport(false)
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
