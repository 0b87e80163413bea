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

/// `package`'s binary `bin` in the profile this benchmark was built with
/// (the directory it runs from), built or brought up to date first so a
/// stale one is never measured. `KILN_BENCH_PREBUILT=1` skips the build, for
/// re-runs while others hold cargo's build lock.
pub fn profile_bin(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the benchmark has a path");
    let dir = exe.parent().expect("target/<profile>").to_owned();
    if std::env::var_os("KILN_BENCH_PREBUILT").is_some() {
        return dir.join(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet", "-p", package, "--bin", bin]);
    if dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {bin}: {e}"));
    assert!(status.success(), "building {bin} failed");
    dir.join(bin)
}

/// A Nix expression for the wide graph: `n` independent trivial
/// derivations and one that depends on all of them. `seed` makes every run
/// build afresh.
pub fn wide_nix(seed: u64, n: usize) -> String {
    format!(
        r#"let
  mk = i: derivation {{
    name = "wide-${{toString i}}";
    builder = "/bin/sh";
    args = [ "-c" "echo {seed}-${{toString i}} > $out" ];
    system = builtins.currentSystem;
  }};
  leaves = builtins.genList mk {n};
in derivation {{
  name = "wide-top";
  builder = "/bin/sh";
  args = [ "-c" "echo $leaves > $out" ];
  leaves = leaves;
  system = builtins.currentSystem;
}}
"#
    )
}
