//! `cargo xtask test`: set up the peers, run `cargo test --workspace`, then fuzz briefly.

use std::io::{BufRead as _, BufReader, IsTerminal as _, Write as _};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result};

use crate::fuzz::{self, FuzzOptions};
use crate::process::{self, Timer, format_duration};
use crate::{is_ci, peers};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Seconds each fuzz target runs after the tests; 0 leaves fuzzing out.
    #[arg(long, env = "KILN_FUZZ_SECS", default_value_t = 20)]
    fuzz_secs: u64,
    /// Test only these packages instead of the whole workspace.
    #[arg(short, long = "package", value_name = "PACKAGE")]
    packages: Vec<String>,
    #[command(flatten)]
    fuzz_options: FuzzOptions,
    /// Passed to the test binaries, e.g. a test name filter.
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// Test counts summed over the `test result:` lines of every test binary.
#[derive(Debug, Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    binaries: u64,
}

impl Counts {
    /// Adds the counts of one `test result: ok. 3 passed; 0 failed; 1 ignored; …` line.
    fn add_result_line(&mut self, line: &str) {
        let Some(rest) = line.trim_start().strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(word), Some(number)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match word {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                "ignored" => self.ignored += number,
                _ => {}
            }
        }
    }
}

pub fn run(root: &Path, args: TestArgs) -> Result<ExitCode> {
    let ci = is_ci();
    let total = Timer::start();

    let setup = Timer::start();
    peers::ensure(ci)?;
    let fuzz_targets = if args.fuzz_secs > 0 {
        fuzz::ensure_cargo_fuzz(ci)?;
        fuzz::targets(root)?
    } else {
        Vec::new()
    };
    let setup_time = setup.elapsed();

    let tests = Timer::start();
    let (counts, tests_ok) = cargo_test(&args, ci)?;
    let test_time = tests.elapsed();

    let fuzz_report = if args.fuzz_secs > 0 {
        Some(fuzz::run_all(
            root,
            &fuzz_targets,
            args.fuzz_secs,
            &args.fuzz_options,
        )?)
    } else {
        None
    };

    // A test binary that failed to build or aborted reports no "failed" line of its own.
    let failed = counts.failed
        + u64::from(!tests_ok && counts.failed == 0)
        + fuzz_report
            .as_ref()
            .map_or(0, |report| report.crashed.len() as u64);
    let passed = counts.passed
        + fuzz_report
            .as_ref()
            .map_or(0, |report| report.clean.len() as u64);

    eprintln!();
    eprintln!("xtask: summary");
    eprintln!("  setup        {}", format_duration(setup_time));
    eprintln!(
        "  cargo test   {} passed, {} failed, {} ignored in {} test binaries, {}{}",
        counts.passed,
        counts.failed,
        counts.ignored,
        counts.binaries,
        format_duration(test_time),
        if tests_ok { "" } else { " — FAILED" }
    );
    match &fuzz_report {
        Some(report) => eprintln!(
            "  fuzz         {} target(s) × {} s: {} clean, {} crashed{}, {}",
            fuzz_targets.len(),
            args.fuzz_secs,
            report.clean.len(),
            report.crashed.len(),
            if report.crashed.is_empty() {
                String::new()
            } else {
                format!(" ({})", report.crashed.join(", "))
            },
            format_duration(report.elapsed)
        ),
        None => eprintln!("  fuzz         left out (KILN_FUZZ_SECS=0)"),
    }
    eprintln!("  total time   {}", format_duration(total.elapsed()));
    // The plain closing line that CI reads: tests and fuzz targets together.
    println!("total: {passed} passed, {failed} failed");

    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `cargo test`, echoing its output as it comes while counting the results.
fn cargo_test(args: &TestArgs, ci: bool) -> Result<(Counts, bool)> {
    let mut command = Command::new("cargo");
    command.arg("test").arg("--no-fail-fast");
    if ci {
        // A clean clone builds once: incremental state would only fill the disk.
        command.env("CARGO_INCREMENTAL", "0");
    }
    if args.packages.is_empty() {
        command.arg("--workspace");
    } else {
        for package in &args.packages {
            command.args(["-p", package]);
        }
    }
    command.arg("--");
    // The harness only colours a terminal; ours is one even though its stdout is a pipe.
    if std::io::stdout().is_terminal() {
        command.arg("--color=always");
    }
    command.args(&args.test_args);
    command.stdout(Stdio::piped());

    eprintln!("xtask: $ {}", process::describe(&command));
    let mut child = command.spawn().context("cannot start `cargo test`")?;
    let mut counts = Counts::default();
    let stdout = child
        .stdout
        .take()
        .context("cargo test's stdout was not captured")?;
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut out = std::io::stdout().lock();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        out.write_all(&line)?;
        out.flush()?;
        counts.add_result_line(&strip_ansi(&String::from_utf8_lossy(&line)));
    }
    drop(out);
    let status = child.wait()?;
    Ok((counts, status.success()))
}

/// Drops terminal colour sequences (`ESC [ … m`) so that result lines parse when coloured.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_result_lines() {
        let mut counts = Counts::default();
        counts.add_result_line(
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished in 0.20s",
        );
        counts.add_result_line(
            "test result: FAILED. 4 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
        );
        counts.add_result_line("running 6 tests");
        assert_eq!(
            (
                counts.passed,
                counts.failed,
                counts.ignored,
                counts.binaries
            ),
            (16, 2, 1, 2)
        );
    }

    #[test]
    fn colour_is_stripped() {
        assert_eq!(
            strip_ansi("test result: \u{1b}[32mok\u{1b}[0m. 1 passed"),
            "test result: ok. 1 passed"
        );
    }
}
