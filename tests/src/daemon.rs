//! A Kiln `store-daemon` on a throwaway store, for tests that point Nix
//! clients at it, and Nix's own `nix-daemon` to compare it with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::bins::workspace_bin;

/// A running `store-daemon` serving `local?root=<tmp>/root` on
/// `<tmp>/socket`; killed (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct KilnDaemon {
    dir: TempDir,
    child: Child,
    options: Vec<(String, String)>,
}

impl KilnDaemon {
    /// Starts the daemon with `--option NAME VALUE` pairs and waits until
    /// its socket accepts connections.
    pub fn start(options: &[(&str, &str)]) -> KilnDaemon {
        let dir = tempfile::Builder::new()
            .prefix("kiln-daemon-")
            .tempdir()
            .expect("cannot create a temporary directory for the daemon");
        let options: Vec<(String, String)> = options
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let child = spawn(dir.path(), &options);
        KilnDaemon {
            dir,
            child,
            options,
        }
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same store,
    /// as an operator restarting the service would.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "store-daemon exited with {status} on SIGTERM"
        );
        self.child = spawn(self.dir.path(), &self.options);
    }

    /// The store's physical root (`local?root=`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// The store URL a Nix client uses: `unix://<socket>?root=<root>`. Nix
    /// 2.8's daemon client reads store files (NARs, `.drv`s, logs) straight
    /// from the file system, so it is told where the store physically is,
    /// exactly as with Nix's own daemon on a chroot store.
    pub fn url(&self) -> String {
        daemon_url(self.dir.path())
    }

    /// Where a logical store path is on disk.
    pub fn physical(&self, logical: impl AsRef<Path>) -> PathBuf {
        let logical = logical.as_ref();
        self.root()
            .join(logical.strip_prefix("/").unwrap_or(logical))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the daemon to exit; its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        self.child.wait().expect("waiting for store-daemon")
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for KilnDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc_kill(self.child.id() as i32, 15) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        make_writable(&self.root());
    }
}

/// Store paths are read-only; make them removable before the temporary
/// directory goes.
fn make_writable(dir: &Path) {
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(dir).status();
}

fn spawn(dir: &Path, options: &[(String, String)]) -> Child {
    let root = dir.join("root");
    let socket = dir.join("socket");
    let mut cmd = Command::new(workspace_bin("store-daemon", "store-daemon"));
    cmd.arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("--socket")
        .arg(&socket)
        .env("NIX_CONF_DIR", dir)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null());
    for (name, value) in options {
        cmd.args(["--option", name, value]);
    }
    let mut child = cmd.spawn().expect("cannot start store-daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("store-daemon exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "store-daemon did not listen on {} within 30 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Nix 2.8's `nix-daemon` serving a chroot store; killed on drop.
#[derive(Debug)]
pub struct NixDaemon {
    dir: tempfile::TempDir,
    child: Child,
}

impl NixDaemon {
    /// Starts it (unsandboxed, no substituters, with `sandbox-paths` as
    /// the test stores set them) and waits until it listens.
    pub fn start() -> NixDaemon {
        let dir = tempfile::Builder::new()
            .prefix("kiln-nix-daemon-")
            .tempdir()
            .unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("nix.conf"),
            format!(
                "store = local?root={}\nsandbox = false\nsubstituters =\nbuild-users-group =\n\
                 fsync-metadata = false\nrequire-sigs = false\nsandbox-paths = {}\n",
                dir.path().join("root").display(),
                crate::host_sandbox_paths()
            ),
        )
        .unwrap();
        let socket = dir.path().join("socket");
        let child = Command::new(crate::nix().program("nix-daemon"))
            .env("NIX_CONF_DIR", &etc)
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap())
            .spawn()
            .expect("cannot start Nix 2.8's nix-daemon (Debian's nix-bin)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "nix-daemon did not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NixDaemon { dir, child }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// `unix://SOCKET?root=ROOT`, for `--store`.
    pub fn url(&self) -> String {
        daemon_url(self.dir.path())
    }
}

impl Drop for NixDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.dir.path())
            .status();
    }
}

/// The URL of a daemon whose socket and store root are `socket` and `root`
/// in `dir`.
fn daemon_url(dir: &Path) -> String {
    format!(
        "unix://{}?root={}",
        dir.join("socket").display(),
        dir.join("root").display()
    )
}
