//! `cargo xtask bench [NAME]`: the benchmarks in `benches/src/bin/bench-NAME.rs`.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use crate::process;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The benchmark to run (`nar` runs `bench-nar`); all of them in turn when omitted.
    name: Option<String>,
    /// List the benchmarks instead of running them.
    #[arg(long)]
    list: bool,
    /// Passed to the benchmark program.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Names of the benchmarks, without the `bench-` prefix, sorted.
fn benchmarks(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("benches/src/bin");
    let mut names = Vec::new();
    if !dir.is_dir() {
        return Ok(names);
    }
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let path = entry?.path();
        let stem = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or_default();
        // A benchmark is either `bench-NAME.rs` or a directory `bench-NAME/main.rs`.
        let is_bin =
            path.extension().is_some_and(|ext| ext == "rs") || path.join("main.rs").is_file();
        if let (true, Some(name)) = (is_bin, stem.strip_prefix("bench-")) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

pub fn run(root: &Path, args: BenchArgs) -> Result<ExitCode> {
    let all = benchmarks(root)?;
    if args.list {
        for name in &all {
            println!("{name}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let chosen = match args.name {
        Some(name) if all.contains(&name) => vec![name],
        Some(name) => bail!(
            "no benchmark `{name}` (benches/src/bin/bench-{name}.rs); the benchmarks are: {}",
            if all.is_empty() {
                "none yet".to_owned()
            } else {
                all.join(", ")
            }
        ),
        None => {
            eprintln!(
                "xtask: benchmarks: {}",
                if all.is_empty() {
                    "none yet".to_owned()
                } else {
                    all.join(", ")
                }
            );
            all
        }
    };
    for name in chosen {
        process::run(
            Command::new("cargo")
                .args(["run", "--release", "-p", "kiln-benches", "--bin"])
                .arg(format!("bench-{name}"))
                .arg("--")
                .args(&args.args),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
