//! `kiln build`'s progress display: on a terminal (a pseudo-terminal made
//! by util-linux's `script`) a status line redrawn in place, errors above
//! it, and a summary at the end; elsewhere plain lines without a single
//! escape code.

use std::path::Path;
use std::process::Command;

use kiln_e2e::kiln_bin;

/// Two slow packages that talk, one that fails, and one on top of the
/// good two.
const RECIPE: &str = r#"
[packages.slow-a]
builder = "/bin/sh"
args = ["-c", "for i in 1 2 3 4 5 6; do echo step $i of a; sleep 0.15; done; echo a > $out"]
env = { PATH = "/usr/bin:/bin" }

[packages.slow-b]
builder = "/bin/sh"
args = ["-c", "for i in 1 2 3 4 5 6; do echo step $i of b; sleep 0.15; done; echo b > $out"]
env = { PATH = "/usr/bin:/bin" }

[packages.broken]
builder = "/bin/sh"
args = ["-c", "echo about to fail; exit 1"]

[packages.top]
builder = "/bin/sh"
args = ["-c", "echo top > $out"]
inputs = ["slow-a", "slow-b"]
"#;

fn build_args(dir: &Path) -> Vec<String> {
    let recipe = dir.join("kiln.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let recipe = recipe.to_str().unwrap();
    [
        "build",
        "--store",
        &format!("local?root={}", dir.join("root").display()),
        "--no-out-link",
        "--keep-going",
        "-j",
        "3",
        "--option",
        "sandbox-paths",
        "/bin /usr /lib /lib64?",
        &format!("{recipe}#top"),
        &format!("{recipe}#broken"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn a_terminal_gets_a_status_line_and_a_summary() {
    let script = Path::new("/usr/bin/script");
    assert!(
        script.exists(),
        "this test runs kiln under a pseudo-terminal with util-linux's `script`: install util-linux"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut command = format!(
        "stty cols 160 rows 40; {}",
        shell_quote(kiln_bin().to_str().unwrap())
    );
    for arg in build_args(dir.path()) {
        command.push(' ');
        command.push_str(&shell_quote(&arg));
    }
    // -e: kiln's exit code; the terminal's output (stdout and stderr
    // together) comes on script's stdout.
    let out = Command::new(script)
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(100),
        "a failed build exits with 100:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Redrawn in place: cursor and erase sequences, the counts, and the
    // running build with a line of its log.
    assert!(
        text.contains('\x1b'),
        "no escape codes on a terminal:\n{text}"
    );
    assert!(
        text.contains("/4 built]"),
        "no status line with the counts ([done/running/expected built]):\n{text}"
    );
    assert!(
        text.contains("building slow-a: step") || text.contains("building slow-b: step"),
        "the status line does not show a running build and its last log line:\n{text}"
    );
    // The failure above the bar, with its log's tail.
    assert!(text.contains("error: builder for"), "{text}");
    assert!(text.contains("about to fail"), "{text}");
    // The bar leaves a summary as the last line.
    let last = text
        .rsplit(['\n', '\r'])
        // What is left once the bar erased its line.
        .map(|l| l.trim().trim_start_matches("\x1b[2K"))
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    assert!(
        last.starts_with("3 built, 1 failed in ") && last.ends_with(" s"),
        "the last line is not the summary: {last:?}\n{text}"
    );
    // Without -L the builds' logs stay off the screen, as with `nix build`.
    assert!(
        !text.contains("step 6 of a\r\n") && !text.contains("step 6 of a\n"),
        "log lines printed as lines on the terminal:\n{text}"
    );
}

#[test]
fn elsewhere_plain_lines_without_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kiln_bin())
        .args(build_args(dir.path()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(100), "{err}");
    assert!(
        !err.contains('\x1b'),
        "escape codes in plain output:\n{err:?}"
    );
    assert!(err.contains("building '/nix/store/"), "{err}");
    assert!(
        err.contains("step 6 of a"),
        "build logs are shown as lines:\n{err}"
    );
    assert!(err.contains("error: builder for"), "{err}");
    // `--log-format bar` asks for the bar, which needs a terminal.
    let out = Command::new(kiln_bin())
        .args(build_args(dir.path()))
        .args(["--log-format", "bar"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\x1b'),
        "escape codes in plain output:\n{err:?}"
    );
}
