//! What a sandboxed build sees of the machine, beside Nix 2.8's sandbox on
//! the same derivation: the same device nodes under `/dev` (with
//! `/dev/kvm` when the machine offers the `kvm` feature), and a writable
//! `/dev/shm`.

use std::process::Command;

use kiln_e2e::{NixStore, host_sandbox_paths, kiln_bin};

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

#[test]
fn builds_see_the_devices_nix_gives_them() {
    let nix = NixStore::new();
    let file = nix.root().parent().unwrap().join("devices.nix");
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_string();
    std::fs::write(&file, DEVICES.replace("NONCE", &nonce)).unwrap();
    let drv = nix.instantiate(&file).unwrap().remove(0);

    let theirs = nix
        .nix_build([drv.as_str(), "--no-out-link"])
        .expect("Nix builds the derivation");
    let theirs = std::fs::read_to_string(nix.physical(theirs.trim())).unwrap();

    let root = tempfile::tempdir().unwrap();
    let out = Command::new(kiln_bin())
        .args(["build", "--no-out-link", "--store"])
        .arg(format!("local?root={}", root.path().display()))
        .args(["--option", "sandbox-paths", &host_sandbox_paths()])
        .arg(nix.physical(&drv))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let ours = std::fs::read_to_string(root.path().join(path.trim_start_matches('/'))).unwrap();

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
