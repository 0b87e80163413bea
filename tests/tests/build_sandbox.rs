//! What a sandboxed build sees of the machine, beside Nix 2.8's sandbox on
//! the same derivation: the same device nodes under `/dev` (with
//! `/dev/kvm` when the machine offers the `kvm` feature), and a writable
//! `/dev/shm`. And what a fixed-output build, which has the host's
//! network, can leave behind: nothing that reaches its registered output.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::{NixStore, host_sandbox_paths, kiln_bin, unique, workspace_bin};

/// The sha256 of `good\n`, what the smuggling build writes.
const GOOD_SHA256: &str = "106675dc1490d5cdd6d1f0410731316ce93fc964c6cf6726e2b0d53e19688feb";

/// The sha256 of an empty directory's NAR.
const EMPTY_DIR_SHA256: &str = "a50a5ab6d992f5598edd92105059fae9acfc192981e08bd88534c2167e92526a";

/// Lists `/dev` with shell builtins only: each entry's name and kind.
const DEVICES: &str = r#"derivation {
  name = "sandbox-devices";
  builder = "/bin/sh";
  args = [ "-c" ''
    for f in /dev/* /dev/pts/* /dev/shm/*; do
      kind=other
      if test -L "$f"; then kind=link
      elif test -c "$f"; then kind=char
      elif test -d "$f"; then kind=dir
      elif test -f "$f"; then kind=file
      fi
      echo "$f $kind"
    done > $out
    echo shm > /dev/shm/probe && echo "/dev/shm writable" >> $out
    echo "nonce NONCE" >> $out
  '' ];
  system = builtins.currentSystem;
}
"#;

/// `kiln build` of `drv` (a physical `.drv` file) into the store at `root`,
/// with `probe` at `/probe` in the sandbox; started, not waited for.
fn spawn_build(root: &Path, probe: Option<&Path>, drv: &Path, extra: &[&str]) -> Child {
    let mut sandbox_paths = host_sandbox_paths();
    if let Some(probe) = probe {
        sandbox_paths.push_str(&format!(" /probe={}", probe.display()));
    }
    Command::new(kiln_bin())
        .args(["build", "--no-out-link", "--store"])
        .arg(format!("local?root={}", root.display()))
        .args(["--option", "sandbox-paths", &sandbox_paths])
        .args(extra)
        .arg(drv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The outside process: the probe run with `args` on the host, started
/// again until it got the descriptor the build offers (the build may not
/// be listening yet). Returns it with what it printed so far.
fn take_descriptor(probe: &Path, args: &[&OsStr]) -> (Child, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut taker = Command::new(probe)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = taker.stdout.take().unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 256];
        while !seen.contains("waiting") {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        if seen.contains("recvfd ok") {
            taker.stdout = Some(out);
            return (taker, seen);
        }
        let _ = taker.wait();
        assert!(
            Instant::now() < deadline,
            "never got the descriptor: {seen}"
        );
    }
}

/// The contents of the output `kiln build` printed, once it succeeded.
fn built_output(build: Child, root: &Path) -> (PathBuf, String) {
    let built = build.wait_with_output().unwrap();
    assert!(
        built.status.success(),
        "kiln build failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out_path = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    let path = root.join(out_path.trim_start_matches('/'));
    let contents = std::fs::read_to_string(&path).unwrap();
    (path, contents)
}

#[test]
fn builds_see_the_devices_nix_gives_them() {
    let nix = NixStore::new();
    let file = nix.root().parent().unwrap().join("devices.nix");
    std::fs::write(&file, DEVICES.replace("NONCE", &unique())).unwrap();
    let drv = nix.instantiate(&file).unwrap().remove(0);

    let theirs = nix
        .nix_build([drv.as_str(), "--no-out-link"])
        .expect("Nix builds the derivation");
    let theirs = std::fs::read_to_string(nix.physical(theirs.trim())).unwrap();

    let root = tempfile::tempdir().unwrap();
    let build = spawn_build(root.path(), None, &nix.physical(&drv), &[]);
    let (_, ours) = built_output(build, root.path());

    assert!(ours.contains("/dev/null char"), "{ours}");
    assert!(ours.contains("/dev/shm writable"), "{ours}");
    // The machine's KVM device is there exactly when Nix offers it too (it
    // does when /dev/kvm can be opened for writing, and so does Kiln).
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert_eq!(
        ours.contains("/dev/kvm char"),
        kvm,
        "/dev/kvm in the sandbox: {ours}"
    );
    assert_eq!(ours, theirs, "the sandbox's /dev differs from Nix's");
}

/// CVE-2024-27297 and CVE-2025-46416, end to end: a fixed-output build
/// (which has the host's network) hands a writable descriptor of its output
/// to a process outside over an abstract socket. That process writes
/// through it once the build is over and the output registered; what the
/// store holds must not change.
#[test]
fn a_descriptor_smuggled_out_of_a_fixed_output_build_cannot_change_its_output() {
    let probe = workspace_bin("kiln-sandbox", "kiln-sandbox-probe");
    let nix = NixStore::new();
    let socket = format!("kiln-smuggle-{}", unique());
    let file = nix.root().parent().unwrap().join("smuggle.nix");
    std::fs::write(
        &file,
        format!(
            r#"derivation {{
  name = "smuggled-output";
  builder = "/probe";
  args = [ "fd-send" "{socket}" (builtins.placeholder "out") ];
  system = builtins.currentSystem;
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "{GOOD_SHA256}";
}}
"#
        ),
    )
    .unwrap();
    let drv = nix.instantiate(&file).unwrap().remove(0);
    let root = tempfile::tempdir().unwrap();
    let build = spawn_build(root.path(), Some(&probe), &nix.physical(&drv), &[]);
    // The outside process: takes the descriptor, then waits for `go`.
    let go = root.path().join("go");
    let (mut receiver, mut seen) =
        take_descriptor(&probe, &["fd-recv".as_ref(), socket.as_ref(), go.as_ref()]);
    let (registered, contents) = built_output(build, root.path());
    assert_eq!(contents, "good\n");

    // Now the outside process strikes.
    std::fs::write(&go, "").unwrap();
    receiver
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    receiver.wait().unwrap();
    assert!(
        seen.contains("rewrite ok"),
        "the attack did not run: {seen}"
    );
    assert_eq!(
        std::fs::read_to_string(&registered).unwrap(),
        "good\n",
        "a process outside rewrote a registered fixed-output path"
    );
}

/// CVE-2025-46416 across builds: a fixed-output build hands a descriptor of
/// its `/build` to a process outside, which keeps planting a file through
/// it. The next build must not find that file in its own `/build` (a
/// build directory a process outside can reach is never given to another
/// build).
#[test]
fn a_directory_smuggled_out_of_a_fixed_output_build_does_not_reach_the_next_build() {
    let probe = workspace_bin("kiln-sandbox", "kiln-sandbox-probe");
    let nix = NixStore::new();
    let socket = format!("kiln-plant-{}", unique());
    let file = nix.root().parent().unwrap().join("plant.nix");
    std::fs::write(
        &file,
        format!(
            r#"let
  smuggler = derivation {{
    name = "smuggled-build-dir";
    builder = "/probe";
    args = [ "mkdir" (builtins.placeholder "out") "dir-send" "{socket}" "/build" ];
    system = builtins.currentSystem;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = "{EMPTY_DIR_SHA256}";
  }};
in derivation {{
  name = "next-build";
  builder = "/bin/sh";
  args = [ "-c" ''
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
      if test -e /build/planted; then echo planted > $out; exit 0; fi
      /bin/sleep 0.1
    done
    echo clean ${{smuggler}} > $out
  '' ];
  system = builtins.currentSystem;
}}
"#
        ),
    )
    .unwrap();
    let drv = nix.instantiate(&file).unwrap().remove(0);
    let root = tempfile::tempdir().unwrap();
    let build = spawn_build(root.path(), Some(&probe), &nix.physical(&drv), &["-j1"]);
    let (mut planter, _) = take_descriptor(
        &probe,
        &["dir-plant".as_ref(), socket.as_ref(), "planted".as_ref()],
    );
    let (_, result) = built_output(build, root.path());
    let _ = planter.kill();
    let _ = planter.wait();
    assert!(
        result.starts_with("clean "),
        "a process outside planted a file in a later build's /build: {result}"
    );
}
