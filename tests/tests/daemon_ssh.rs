//! Nix 2.8 against Kiln's `store-daemon` behind a real OpenSSH `sshd` on
//! loopback (a throwaway server: its own port, host key and
//! authorized_keys): `nix copy` to and from `ssh://` (`store-daemon
//! --serve --write`) and `ssh-ng://` (`store-daemon --stdio`), and
//! `nix-build --builders ssh://…`, whose `build-remote` sends the
//! derivation itself (serve `BuildDerivation`), not its `.drv`. Both
//! stores are checked afterwards: same closures, contents intact.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::{NixStore, kiln_bin, workspace_bin};

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Kiln store reachable over SSH: `sshd` on a free loopback port, whose
/// only authorized key is a client key made for the test, running
/// `store-daemon` on `local?root=<dir>/root` as the remote program.
struct Remote {
    dir: tempfile::TempDir,
    port: u16,
    sshd: Child,
}

impl Remote {
    fn start() -> Remote {
        let sshd = kiln_e2e::farm::sshd();
        std::fs::create_dir_all("/run/sshd").expect(
            "cannot create /run/sshd (sshd's privilege separation directory): run the tests as root",
        );
        let dir = tempfile::Builder::new()
            .prefix("kiln-daemon-ssh-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("root")).unwrap();
        for key in ["host_key", "client_key"] {
            ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(d.join(key))
                    .output()
                    .expect("cannot run ssh-keygen"),
                "ssh-keygen",
            );
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        // The remote program gets the serving flags (`--serve --write`,
        // `--stdio`) from Nix; the script adds which store.
        let script = d.join("store-daemon");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec {} --store 'local?root={}' --option sandbox-paths '/bin /usr /lib /lib64?' \"$@\"\n",
                workspace_bin("store-daemon", "store-daemon").display(),
                d.join("root").display()
            ),
        )
        .unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nPermitRootLogin yes\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
                d = d.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let sshd = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start sshd");
        let remote = Remote { dir, port, sshd };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd on port {port} did not start: {}",
                remote.sshd_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        remote
    }

    fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn physical(&self, logical: &str) -> PathBuf {
        self.root().join(logical.trim_start_matches('/'))
    }

    /// A store URL for Nix: `ssh://` or `ssh-ng://` to this server.
    fn url(&self, scheme: &str) -> String {
        format!(
            "{scheme}://root@127.0.0.1?remote-program={}&ssh-key={}",
            self.dir.path().join("store-daemon").display(),
            self.dir.path().join("client_key").display()
        )
    }

    /// Nix 2.8 takes no port in its SSH store URLs; `NIX_SSHOPTS` gives it,
    /// and a host key nobody has seen is accepted (it was made just now).
    fn sshopts(&self) -> String {
        format!(
            "-p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            self.port
        )
    }

    /// A Nix command of `store` that reaches this server.
    fn nix(&self, store: &NixStore, program: &str) -> Command {
        let mut c = store.command(program);
        c.env("NIX_SSHOPTS", self.sshopts());
        c
    }

    /// Kiln's own check of the remote store, contents included.
    fn verify(&self) {
        ok(
            Command::new(kiln_bin())
                .args(["store", "--store"])
                .arg(format!("local?root={}", self.root().display()))
                .args(["verify", "--check-contents"])
                .output()
                .unwrap(),
            "kiln store verify --check-contents on the remote",
        );
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.root())
            .status();
    }
}

/// A built closure of two paths in a fresh Nix store: `top` refers to
/// `dep`. `seed` keeps runs from meeting each other's paths.
fn built_closure(nix: &NixStore, seed: &str) -> String {
    let file = nix.root().parent().unwrap().join("closure.nix");
    std::fs::write(
        &file,
        format!(
            r#"let dep = derivation {{ name = "dep-{seed}"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo dep > $out"]; }};
in derivation {{ name = "top-{seed}"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo ${{dep}} > $out"]; }}"#
        ),
    )
    .unwrap();
    let out = nix
        .nix_build(["--no-out-link", file.to_str().unwrap()])
        .expect("nix-build of the test closure");
    out.trim().to_owned()
}

/// The closure of `path` as the store at `url` reports it.
fn closure(remote: &Remote, nix: &NixStore, url: &str, path: &str) -> BTreeSet<String> {
    let out = ok(
        remote
            .nix(nix, "nix")
            .args(["path-info", "-r", "--store", url, path])
            .output()
            .unwrap(),
        &format!("nix path-info -r --store {url}"),
    );
    out.lines().map(str::to_owned).collect()
}

/// `nix-store --verify --check-contents` of a Nix store finds nothing wrong.
fn nix_verify(nix: &NixStore) {
    let out = nix
        .command("nix-store")
        .args(["--verify", "--check-contents"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("was modified") && !err.contains("disappeared"),
        "nix-store --verify --check-contents: {err}"
    );
}

fn seed() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}", nanos ^ u128::from(std::process::id()))
}

#[test]
fn nix_copy_over_ssh_to_store_daemon_serve_and_back() {
    let remote = Remote::start();
    let local = NixStore::with_config("require-sigs = false\n");
    let top = built_closure(&local, &seed());
    let url = remote.url("ssh");
    ok(
        remote
            .nix(&local, "nix")
            .args(["copy", "--to", &url, &top])
            .output()
            .unwrap(),
        &format!("nix copy --to {url}\nsshd log:\n{}", remote.sshd_log()),
    );
    let mine = closure(&remote, &local, &local.url(), &top);
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert_eq!(closure(&remote, &local, &url, &top), mine);
    for p in &mine {
        assert_eq!(
            std::fs::read(remote.physical(p)).unwrap(),
            std::fs::read(local.physical(p)).unwrap(),
            "{p} on the remote"
        );
    }
    remote.verify();
    copy_back_into_an_empty_nix_store(&remote, &url, &top, &mine);
}

/// `nix copy --from URL TOP` into an empty Nix store: it gets the closure
/// `mine` and verifies.
fn copy_back_into_an_empty_nix_store(
    remote: &Remote,
    url: &str,
    top: &str,
    mine: &BTreeSet<String>,
) {
    let other = NixStore::with_config("require-sigs = false\n");
    ok(
        remote
            .nix(&other, "nix")
            .args(["copy", "--from", url, top])
            .output()
            .unwrap(),
        &format!("nix copy --from {url}"),
    );
    assert_eq!(&closure(remote, &other, &other.url(), top), mine);
    nix_verify(&other);
}

#[test]
fn nix_copy_over_ssh_ng_to_store_daemon_stdio_and_back() {
    let remote = Remote::start();
    let local = NixStore::with_config("require-sigs = false\n");
    let url = remote.url("ssh-ng");
    let out = remote
        .nix(&local, "nix")
        .args(["store", "ping", "--store", &url])
        .output()
        .unwrap();
    // Nix 2.8 prints what it found on stderr.
    let ping = String::from_utf8_lossy(&out.stderr).into_owned();
    let ping = ok(
        out,
        &format!(
            "nix store ping --store {url}\nsshd log:\n{}",
            remote.sshd_log()
        ),
    ) + &ping;
    assert!(ping.contains("Kiln"), "store ping names the daemon: {ping}");

    let top = built_closure(&local, &seed());
    ok(
        remote
            .nix(&local, "nix")
            // As with Nix's own daemon, a trusted client's unsigned paths are
            // taken only when it says not to check signatures.
            .args(["copy", "--no-check-sigs", "--to", &url, &top])
            .output()
            .unwrap(),
        &format!("nix copy --to {url}"),
    );
    let mine = closure(&remote, &local, &local.url(), &top);
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert_eq!(closure(&remote, &local, &url, &top), mine);
    remote.verify();
    copy_back_into_an_empty_nix_store(&remote, &url, &top, &mine);
}

#[test]
fn nix_build_offloads_to_store_daemon_serve_which_builds_the_sent_derivation() {
    let remote = Remote::start();
    let local = NixStore::new();
    let seed = seed();
    let file = local.root().parent().unwrap().join("remote.nix");
    std::fs::write(
        &file,
        format!(
            r#"let dep = derivation {{ name = "rdep-{seed}"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo remote dep > $out"]; }};
in derivation {{ name = "rtop-{seed}"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = ["-c" "cat ${{dep}} > $out; echo ${{dep}} >> $out"]; }}"#
        ),
    )
    .unwrap();
    let drv = local
        .nix_instantiate([file.to_str().unwrap()])
        .expect("nix-instantiate")
        .trim()
        .to_owned();
    // `build-remote` keeps its slot locks under the state directory: the
    // test's own, not the machine's.
    let state = local.root().parent().unwrap().join("hook-state");
    std::fs::create_dir_all(&state).unwrap();
    let builders = format!("{} x86_64-linux - 1 1", remote.url("ssh"));
    let out = remote
        .nix(&local, "nix-build")
        .args(["--no-out-link", "-j0", "--builders", &builders])
        .arg(&drv)
        .env("NIX_STATE_DIR", &state)
        .output()
        .unwrap();
    let top = ok(out, &format!("nix-build -j0 --builders '{builders}'"))
        .trim()
        .to_owned();

    let dep_line = std::fs::read_to_string(local.physical(&top)).unwrap();
    assert!(
        dep_line.starts_with("remote dep\n/nix/store/"),
        "{dep_line}"
    );
    // Built on the remote, from what was sent: the outputs are there, the
    // `.drv` never was.
    assert_eq!(
        std::fs::read(remote.physical(&top)).unwrap(),
        dep_line.as_bytes()
    );
    assert!(
        !remote.physical(&drv).exists(),
        "{drv} was copied to the remote; build-remote sends only the derivation"
    );
    remote.verify();
    nix_verify(&local);
}
