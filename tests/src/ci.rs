//! Running `kiln-ci` from tests: shell steps that set up a git input, and
//! the binary with a configuration file.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::Command;

use crate::workspace_bin;

/// Runs `script` with `sh -e` in `dir`; panics if it fails.
pub fn sh(dir: &Path, script: &str) {
    let status = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .status()
        .expect("sh runs");
    assert!(status.success(), "failed: {script}");
}

/// Fails the test, saying what to install, when git is missing.
pub fn require_git() {
    assert!(
        Command::new("git").arg("--version").output().is_ok(),
        "git is missing: kiln-ci's inputs need it (install Debian's git package)"
    );
}

/// `kiln-ci` reading `config`, run in `dir`, logging warnings only.
pub fn kiln_ci(config: &Path, dir: &Path) -> Command {
    let mut command = Command::new(workspace_bin("kiln-ci-bin", "kiln-ci"));
    command
        .env("KILN_CI_CONFIG", config)
        .env("KILN_CI_LOG", "warn")
        .current_dir(dir);
    command
}

/// Runs `command` with `args` and returns what it printed; panics with its
/// output if it fails.
pub fn run(mut command: Command, args: &[&str]) -> String {
    let output = command.args(args).output().unwrap();
    assert!(
        output.status.success(),
        "kiln-ci {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// GET over plain HTTP/1.1 from `kiln-ci serve` at `addr` (its answers
/// carry a Content-Length); the body, after checking for 200.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}
