//! `cargo xtask`: the project's own setup and test driver.
//!
//! One command takes a fresh machine to a full test run: `cargo xtask test`
//! installs the peers the tests compare against (Debian packages such as
//! `nix-bin`, listed in [`peers::PEERS`]) and `cargo-fuzz`, runs
//! `cargo test --workspace`, then runs every fuzz target for a short while.
//! `.ci/run` calls exactly that. `cargo xtask bench NAME` and
//! `cargo xtask fuzz [TARGET] [SECS]` run benchmarks and longer fuzzing sessions.
//!
//! Only std, anyhow and clap are used so that this compiles in seconds.

mod bench;
mod fuzz;
mod peers;
mod process;
mod test;
mod vm_image;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Kiln's setup, test, fuzz and benchmark driver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the tests need, then run the whole suite: `cargo test --workspace`
    /// and a short run of every fuzz target.
    Test(test::TestArgs),
    /// Install the system packages and tools the tests need, and nothing else.
    Setup,
    /// Run one fuzz target (or all of them in turn) for a while.
    Fuzz(fuzz::FuzzArgs),
    /// Run a benchmark (`benches/src/bin/bench-NAME.rs`), or all of them when no name is given.
    Bench(bench::BenchArgs),
    /// Build the build agent's test machine from Debian packages.
    VmImage(vm_image::VmImageArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = (|| -> Result<ExitCode> {
        let root = repo_root()?;
        match cli.command {
            Command::Test(args) => test::run(&root, args),
            Command::Setup => {
                let ci = is_ci();
                peers::ensure(ci)?;
                fuzz::ensure_cargo_fuzz(ci)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Fuzz(args) => fuzz::run(&root, args),
            Command::Bench(args) => bench::run(&root, args),
            Command::VmImage(args) => vm_image::run(&root, args).map(|()| ExitCode::SUCCESS),
        }
    })();
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask's manifest directory is `<root>/xtask`.
fn repo_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .context("xtask's manifest directory has no parent")?
        .to_path_buf();
    std::env::set_current_dir(&root)
        .with_context(|| format!("cannot change directory to {}", root.display()))?;
    Ok(root)
}

/// CI systems set `CI=true`; there a missing peer or tool is an error, never a warning.
fn is_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true" | "1" | "yes")
    )
}
