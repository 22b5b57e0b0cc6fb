//! `kanali-crdgen`: writes the Kanali CRD manifests.
//!
//! Usage: `cargo run -p kanali-crds --bin kanali-crdgen [OUTPUT_DIR]`. The default output
//! directory is `manifests/crds` at the workspace root. Generated `*.yaml` files there that no
//! longer correspond to a CRD are removed.

use std::error::Error;
use std::fs;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn Error>> {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/crds")),
    };
    fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;

    let manifests = kanali_crds::manifests()?;
    for manifest in &manifests {
        let path = dir.join(&manifest.file_name);
        fs::write(&path, &manifest.contents)?;
        println!("wrote {}", path.display());
    }

    // Remove stale generated files (a renamed or dropped CRD), never hand-written ones.
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let generated = manifests.iter().any(|m| m.file_name == name);
        if generated || !name.ends_with(".yaml") {
            continue;
        }
        if fs::read_to_string(&path)?.starts_with(kanali_crds::GENERATED_HEADER) {
            fs::remove_file(&path)?;
            println!("removed stale {}", path.display());
        }
    }
    Ok(())
}
