//! Benchmarks, run by `cargo xtask bench NAME`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn workspace_target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return dir.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ is in the workspace")
        .join("target")
}

/// The release `kiln` binary, built (or brought up to date) first, unless
/// `KILN_BIN` names one.
pub fn release_kiln_bin() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("KILN_BIN") {
        return Ok(bin.into());
    }
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "kiln",
            "--bin",
            "kiln",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo to build kiln: {e}"))?;
    if !status.success() {
        return Err("building kiln failed".to_owned());
    }
    Ok(workspace_target_dir().join("release/kiln"))
}
