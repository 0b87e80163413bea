//! Nix 2.8's `ssh://` store client against `store-daemon --serve --write`
//! (the `nix-store --serve` protocol). Nix runs `ssh://localhost` stores
//! without ssh (its "fake SSH": the remote program is started directly),
//! so this exercises the protocol itself; the transport is plain pipes.

use kiln_e2e::{NixStore, workspace_bin};

fn serve_url(root: &std::path::Path) -> String {
    let program = workspace_bin("store-daemon", "store-daemon");
    format!(
        "ssh://localhost?remote-program={}%20--store%20local?root={}",
        program.display(),
        root.display()
    )
}

#[test]
fn nix_copies_to_and_from_store_daemon_serve() {
    let nix = NixStore::with_config("require-sigs = false\n");
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("served.txt");
    std::fs::write(&file, "served\n").unwrap();
    let path = nix.nix_store(["--add", file.to_str().unwrap()]).unwrap();
    let path = path.trim();
    let kiln_root = work.path().join("kiln");
    let url = serve_url(&kiln_root);
    nix.nix(["copy", "--no-check-sigs", "--to", &url, path])
        .unwrap_or_else(|e| panic!("nix copy --to {url}: {e}"));
    let physical = kiln_root.join(path.trim_start_matches('/'));
    assert_eq!(std::fs::read(&physical).unwrap(), b"served\n");

    // Queries over the serve protocol.
    let info = nix
        .nix(["path-info", "--json", "--store", &url, path])
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let local: serde_json::Value =
        serde_json::from_str(&nix.nix(["path-info", "--json", path]).unwrap()).unwrap();
    assert_eq!(info[0]["narHash"], local[0]["narHash"], "{info}");
    assert_eq!(info[0]["narSize"], local[0]["narSize"], "{info}");

    // And back into an empty Nix store (DumpStorePath).
    let other = NixStore::with_config("require-sigs = false\n");
    other
        .nix(["copy", "--no-check-sigs", "--from", &url, path])
        .unwrap_or_else(|e| panic!("nix copy --from {url}: {e}"));
    assert_eq!(std::fs::read(other.physical(path)).unwrap(), b"served\n");
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&kiln_root)
        .status();
}
