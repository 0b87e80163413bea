//! `kiln`: the command-line front end. Thin by design: argument parsing and
//! wiring of the library crates; every command lives in its own module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod build_cmd;
mod cache_cmd;
mod derivation_cmd;
mod hash_cmd;
mod nar_cmd;
mod progress;
mod store_cmd;

/// Kiln: a Nix-compatible, sandboxed, reproducible build engine.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write, read and list NAR archives.
    Nar(nar_cmd::NarArgs),
    /// Compute and convert hashes as Nix prints them.
    Hash(hash_cmd::HashArgs),
    /// Inspect and check derivations (`.drv` files).
    Derivation(derivation_cmd::DerivationArgs),
    /// Build derivations (.drv paths, JSON derivations, Kiln recipes).
    Build(build_cmd::BuildArgs),
    /// Print the build log of a derivation or output path.
    Log(build_cmd::LogArgs),
    /// Work with a store: add, query, collect garbage, verify, export, import.
    Store(store_cmd::StoreArgs),
}

fn main() -> ExitCode {
    // Quiet unless something is wrong; `KILN_LOG=debug` (an env filter) for more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(progress::StderrThroughBar)
        .event_format(progress::NixStyle)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Nar(args) => nar_cmd::run(args),
        Command::Hash(args) => hash_cmd::run(args),
        Command::Derivation(args) => derivation_cmd::run(args),
        Command::Build(args) => build_cmd::run(args),
        Command::Log(args) => build_cmd::run_log(args),
        Command::Store(args) => store_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: {}", kiln_formats::report::chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}
