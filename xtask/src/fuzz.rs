//! Fuzzing with cargo-fuzz (libFuzzer) on the stable toolchain.
//!
//! cargo-fuzz needs nightly-only compiler flags (`-Zsanitizer`, sanitizer coverage
//! passes). The machines have only a stable toolchain, so every cargo-fuzz command
//! runs with `RUSTC_BOOTSTRAP=1`, which lets stable rustc accept them. That variable
//! is set on the cargo-fuzz child only, never on the main workspace's builds.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{self, Timer, format_duration};

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// The target (a file `fuzz/fuzz_targets/TARGET.rs`); every target in turn when omitted.
    target: Option<String>,
    /// How long each target runs, in seconds.
    #[arg(default_value_t = 60)]
    secs: u64,
    #[command(flatten)]
    options: FuzzOptions,
}

/// Build settings shared by `cargo xtask fuzz` and `cargo xtask test`.
#[derive(Debug, Clone, clap::Args)]
pub struct FuzzOptions {
    /// The sanitizer cargo-fuzz builds with: address, leak, memory, thread or none.
    #[arg(long, env = "KILN_FUZZ_SANITIZER", default_value = "address")]
    pub sanitizer: String,
}

/// The fuzz project's directory.
pub fn fuzz_dir(root: &Path) -> PathBuf {
    root.join("fuzz")
}

/// Installs cargo-fuzz unless `cargo fuzz` already works.
pub fn ensure_cargo_fuzz(ci: bool) -> Result<()> {
    if process::probe(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (needed to run the fuzz targets)");
    let installed = process::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]));
    match installed {
        Ok(()) => Ok(()),
        Err(error) if ci => Err(error.context("cargo-fuzz is needed in CI")),
        Err(error) => Err(error.context(
            "cannot install cargo-fuzz; run `cargo install cargo-fuzz --locked`, \
             or set KILN_FUZZ_SECS=0 to leave fuzzing out of `cargo xtask test`",
        )),
    }
}

/// The fuzz targets: the stems of `fuzz/fuzz_targets/*.rs`, each of which must
/// have a `[[bin]]` entry in `fuzz/Cargo.toml`.
pub fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir(root).join("fuzz_targets");
    let mut targets = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "rs") {
            if let Some(stem) = path.file_stem().and_then(|stem| stem.to_str()) {
                targets.push(stem.to_owned());
            }
        }
    }
    targets.sort();

    let manifest_path = fuzz_dir(root).join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let undeclared: Vec<&String> = targets
        .iter()
        .filter(|target| !manifest.contains(&format!("path = \"fuzz_targets/{target}.rs\"")))
        .collect();
    if !undeclared.is_empty() {
        bail!(
            "fuzz targets without a [[bin]] entry (name, path = \"fuzz_targets/NAME.rs\", \
             test = false, doc = false, bench = false) in {}: {}",
            manifest_path.display(),
            undeclared
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(targets)
}

fn cargo_fuzz(root: &Path, subcommand: &str, options: &FuzzOptions) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(fuzz_dir(root))
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", subcommand, "--sanitizer", &options.sanitizer])
        // Overflow and other debug assertions turn silent wrong answers into findings.
        .arg("--debug-assertions");
    command
}

/// Builds every target once, so that the timed runs after it do not include compiling.
pub fn build(root: &Path, options: &FuzzOptions) -> Result<()> {
    process::run(&mut cargo_fuzz(root, "build", options))
        .context("building the fuzz targets failed")
}

/// Runs one target for `secs` seconds. Returns whether it ran clean; a crash leaves its
/// input under `fuzz/artifacts/TARGET/`.
pub fn run_target(root: &Path, target: &str, secs: u64, options: &FuzzOptions) -> Result<bool> {
    let fuzz_dir = fuzz_dir(root);
    // New inputs go to the (ignored) working corpus; committed seeds, when a target has
    // them, are read as a second corpus directory and never written to.
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = fuzz_dir.join("seeds").join(target);

    let mut command = cargo_fuzz(root, "run", options);
    command.arg(target).arg(&corpus);
    if seeds.is_dir() {
        command.arg(&seeds);
    }
    command.args([
        "--".to_owned(),
        format!("-max_total_time={secs}"),
        // One slow input is a finding too, but not a machine-killer.
        "-timeout=10".to_owned(),
        "-rss_limit_mb=2048".to_owned(),
        "-print_final_stats=1".to_owned(),
    ]);
    let status = process::status(&mut command)?;
    if !status.success() {
        eprintln!(
            "xtask: fuzz target `{target}` failed ({status}); the crashing input is under {}",
            fuzz_dir.join("artifacts").join(target).display()
        );
    }
    Ok(status.success())
}

/// Outcome of fuzzing several targets.
#[derive(Debug, Default)]
pub struct FuzzReport {
    pub clean: Vec<String>,
    pub crashed: Vec<String>,
    pub elapsed: Duration,
}

/// Builds, then runs each of `targets` for `secs` seconds.
pub fn run_all(
    root: &Path,
    targets: &[String],
    secs: u64,
    options: &FuzzOptions,
) -> Result<FuzzReport> {
    let timer = Timer::start();
    let mut report = FuzzReport::default();
    if targets.is_empty() {
        eprintln!("xtask: no fuzz targets in fuzz/fuzz_targets");
        return Ok(report);
    }
    build(root, options)?;
    for target in targets {
        eprintln!("xtask: fuzzing `{target}` for {secs} s");
        if run_target(root, target, secs, options)? {
            report.clean.push(target.clone());
        } else {
            report.crashed.push(target.clone());
        }
    }
    report.elapsed = timer.elapsed();
    Ok(report)
}

/// `cargo xtask fuzz [TARGET] [SECS]`.
pub fn run(root: &Path, args: FuzzArgs) -> Result<ExitCode> {
    ensure_cargo_fuzz(crate::is_ci())?;
    let all = targets(root)?;
    let chosen = match args.target {
        Some(target) if all.contains(&target) => vec![target],
        Some(target) => bail!(
            "no fuzz target `{target}`; the targets are: {}",
            all.join(", ")
        ),
        None => all,
    };
    let report = run_all(root, &chosen, args.secs, &args.options)?;
    eprintln!(
        "xtask: fuzzed {} target(s) in {}: {} clean, {} crashed{}",
        chosen.len(),
        format_duration(report.elapsed),
        report.clean.len(),
        report.crashed.len(),
        if report.crashed.is_empty() {
            String::new()
        } else {
            format!(" ({})", report.crashed.join(", "))
        }
    );
    Ok(if report.crashed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
