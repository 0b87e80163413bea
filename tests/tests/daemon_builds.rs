//! Builds through Kiln's daemon as Nix 2.8's `nix-build` sees them: the
//! build's activity and its log lines reach the client as they do from
//! `nix-daemon`, and a client that hangs up mid-build gets its build
//! killed with nothing registered. A failure reaches the client with
//! its exit code and log tail, as from `nix-daemon`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_e2e::{KilnDaemon, NixDaemon, NixStore, host_sandbox_paths, unique};

fn write_nix(dir: &Path, script: &str) -> std::path::PathBuf {
    let file = dir.join("build.nix");
    std::fs::write(
        &file,
        format!(
            r#"derivation {{
  name = "daemon-build";
  builder = "/bin/sh";
  args = [ "-c" "{script}" ];
  system = builtins.currentSystem;
}}
"#
        ),
    )
    .unwrap();
    file
}

/// The lines of a `nix-build` run's stderr that show the build: the
/// "building" line and the build's own output, with store paths blanked.
fn build_lines(stderr: &str, marker: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("building '") || l.contains(marker))
        .map(|l| {
            l.split('\'')
                .enumerate()
                .map(|(i, part)| if i % 2 == 1 { "PATH" } else { part })
                .collect::<Vec<_>>()
                .join("'")
        })
        .collect()
}

#[test]
fn nix_build_shows_the_build_and_its_log_as_with_nix_daemon() {
    let nix = NixStore::with_config("require-sigs = false\n");
    let daemon = KilnDaemon::start(&[("sandbox-paths", &host_sandbox_paths())]);
    let work = tempfile::tempdir().unwrap();
    let marker = format!("log-line-{}", unique());
    let file = write_nix(
        work.path(),
        &format!("echo {marker}-one; echo {marker}-two >&2; echo done > $out"),
    );
    let run = |store: Option<String>, extra: &[&str]| {
        let mut cmd = nix.command("nix-build");
        if let Some(url) = store {
            cmd.arg("--store").arg(url);
        }
        let out = cmd
            .arg("--no-out-link")
            .args(extra)
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "nix-build failed:\n{stderr}");
        stderr
    };
    let ours = run(Some(daemon.url()), &[]);
    // Nix's own local store builds the same derivation the same way.
    let theirs = run(None, &[]);
    let ours_lines = build_lines(&ours, &marker);
    assert!(
        ours_lines
            .iter()
            .any(|l| l.contains(&format!("{marker}-two"))),
        "the build's log did not reach nix-build through Kiln's daemon:\n{ours}"
    );
    assert_eq!(
        ours_lines,
        build_lines(&theirs, &marker),
        "nix-build shows the build differently through Kiln's daemon:\n--- kiln\n{ours}\n--- nix\n{theirs}"
    );
    // A check says so, in Nix's words.
    let checking = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.starts_with("checking outputs of '") && l.ends_with(".drv'..."))
            .count()
    };
    let ours = run(Some(daemon.url()), &["--check"]);
    let theirs = run(None, &["--check"]);
    assert_eq!(
        (checking(&ours), checking(&theirs)),
        (1, 1),
        "--check is shown differently through Kiln's daemon:\n--- kiln\n{ours}\n--- nix\n{theirs}"
    );
}

fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

#[test]
fn a_client_that_hangs_up_gets_its_build_killed_and_nothing_registered() {
    let nix = NixStore::with_config("require-sigs = false\n");
    let daemon = KilnDaemon::start(&[("sandbox-paths", &host_sandbox_paths())]);
    let work = tempfile::tempdir().unwrap();
    // A sleep no other process has: its seconds carry a unique fraction.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let seconds = format!("30.{nanos:09}{}", std::process::id());
    // The builder has no PATH; /proc shows arguments NUL-separated.
    let needle = seconds.clone();
    let file = write_nix(
        work.path(),
        &format!("echo started; /bin/sleep {seconds}; echo done > $out"),
    );
    let mut client = nix
        .command("nix-build")
        .arg("--store")
        .arg(daemon.url())
        .arg("--no-out-link")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while processes_with(&needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the build through Kiln's daemon never started its builder"
        );
        assert!(
            client.try_wait().unwrap().is_none(),
            "nix-build ended before its build started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let killed_by = Instant::now() + Duration::from_secs(10);
    while !processes_with(&needle).is_empty() {
        assert!(
            Instant::now() < killed_by,
            "the builder still runs 10 s after its client hung up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing registered, and the daemon still serves: the output is not valid.
    let drv = nix
        .command("nix-instantiate")
        .arg("--store")
        .arg(daemon.url())
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        drv.status.success(),
        "{}",
        String::from_utf8_lossy(&drv.stderr)
    );
    let drv = String::from_utf8_lossy(&drv.stdout).trim().to_owned();
    let out = nix
        .command("nix-store")
        .args(["--store", &daemon.url(), "-q", "--outputs", &drv])
        .output()
        .unwrap();
    let out_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success() && !out_path.is_empty());
    let valid = nix
        .command("nix-store")
        .args(["--store", &daemon.url(), "--check-validity", &out_path])
        .output()
        .unwrap();
    assert!(
        !valid.status.success(),
        "the cancelled build's output {out_path} is valid"
    );
    assert!(
        !daemon.physical(&out_path).exists(),
        "the cancelled build left {out_path} in the store"
    );
}

/// The lines of a failed `nix-build`'s stderr from its first error on,
/// with store paths blanked.
fn error_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .skip_while(|l| !l.starts_with("error:"))
        .map(|l| {
            l.split("/nix/store/")
                .enumerate()
                .map(|(i, part)| match i {
                    0 => part.to_owned(),
                    _ => format!("PATH{}", part.get(32..).unwrap_or("")),
                })
                .collect()
        })
        .collect()
}

/// A dependency's failure reaches the client as it happens, with its exit
/// code and the last lines of its log, worded and laid out as Nix's daemon
/// does it, and where its build directory was kept (`--keep-failed`); the
/// builder is called by its base name, as Nix calls it.
#[test]
fn a_dependency_failure_reaches_nix_build_as_with_nix_daemon() {
    let nix = NixStore::with_config("require-sigs = false\n");
    let daemon = KilnDaemon::start(&[("sandbox-paths", &host_sandbox_paths())]);
    let work = tempfile::tempdir().unwrap();
    let marker = format!("failing-{}", unique());
    let file = work.path().join("failing.nix");
    std::fs::write(
        &file,
        format!(
            r#"let
  dep = derivation {{
    name = "failing-dep";
    builder = "/bin/sh";
    args = [ "-c" "echo {marker} called as $0; no-such-command; exit 2" ];
    system = builtins.currentSystem;
  }};
in derivation {{
  name = "failing-top";
  builder = "/bin/sh";
  args = [ "-c" "echo ${{dep}} > $out" ];
  system = builtins.currentSystem;
}}
"#
        ),
    )
    .unwrap();
    let run = |url: String| {
        let out = nix
            .command("nix-build")
            .args(["--no-out-link", "--keep-failed", "--store", &url])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "nix-build succeeded:\n{stderr}");
        // The failed build's directory is kept, and the client told where.
        let kept: Vec<&str> = stderr
            .lines()
            .filter_map(|l| {
                l.strip_prefix("note: keeping build directory '")?
                    .strip_suffix('\'')
            })
            .collect();
        assert_eq!(
            kept.len(),
            1,
            "no note of the kept build directory:\n{stderr}"
        );
        assert!(Path::new(kept[0]).is_dir(), "{stderr}");
        let _ = std::process::Command::new("chmod")
            .args(["-R", "u+w", kept[0]])
            .status();
        let _ = std::fs::remove_dir_all(kept[0]);
        stderr
    };
    let ours = run(daemon.url());
    let theirs = run(NixDaemon::start().url());
    let (ours_lines, theirs_lines) = (error_lines(&ours), error_lines(&theirs));
    assert!(
        ours.contains(&format!("{marker} called as sh")),
        "the builder was not called by its base name:\n{ours}"
    );
    assert!(
        ours_lines.len() > 4
            && ours_lines[0]
                == "error: builder for 'PATH-failing-dep.drv' failed with exit code 2;",
        "the dependency's failure did not reach the client:\n{ours}"
    );
    // Everything but the last line, whose wording Kiln extends with the
    // failed dependencies' names.
    let last = ours_lines.len() - 1;
    assert_eq!(
        ours_lines[..last],
        theirs_lines[..theirs_lines.len().saturating_sub(1)],
        "nix-build shows the failure differently through Kiln's daemon:\n--- kiln\n{ours}\n--- nix\n{theirs}"
    );
    assert!(
        ours_lines[last].starts_with(
            "error: 1 dependencies of derivation 'PATH-failing-top.drv' failed to build"
        ),
        "{ours}"
    );
}
