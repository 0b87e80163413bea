//! Build machines for offloading tests: each an OpenSSH `sshd` on a free
//! loopback port (throwaway host key, its own authorized_keys) whose remote
//! program serves its own store, Kiln's (`store-daemon`) or Nix 2.8's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{kiln_bin, nix, workspace_bin};

pub fn sshd() -> PathBuf {
    for p in ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "sshd is not installed: these tests need OpenSSH's server (run `cargo xtask setup`, or apt-get install openssh-server)"
    );
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Which store the machine serves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Kiln,
    Nix,
}

/// One build machine: an sshd and a store.
#[derive(Debug)]
pub struct Machine {
    pub dir: PathBuf,
    pub kind: Kind,
    pub port: u16,
    sshd: Option<Child>,
    /// The machine's line in a machines file.
    pub line: String,
}

impl Machine {
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn uri(&self) -> &str {
        self.line.split_whitespace().next().unwrap()
    }

    /// Kills the sshd and every session it forked, as a machine that
    /// drops off the network.
    pub fn kill(&mut self) {
        let Some(mut child) = self.sshd.take() else {
            return;
        };
        let mut pids = vec![child.id() as i32];
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                    continue;
                };
                let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
                let ppid: i32 = after
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                if ppid == parent && !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
            i += 1;
        }
        for p in &pids {
            // SAFETY: signalling processes of the tree this test started.
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        let _ = child.wait();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The machines of one test and the client key that reaches them.
#[derive(Debug)]
pub struct Farm {
    pub dir: tempfile::TempDir,
    pub machines: Vec<Machine>,
    /// Short (ssh control sockets' paths are limited), and dropped after
    /// the machines whose ssh masters use it.
    control: tempfile::TempDir,
}

impl Farm {
    pub fn new() -> Farm {
        sshd();
        std::fs::create_dir_all("/run/sshd").expect("cannot create /run/sshd (sshd's privilege separation directory): run the tests as root");
        let dir = tempfile::Builder::new()
            .prefix("kiln-offload-")
            .tempdir()
            .unwrap();
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.path().join("client_key")),
        );
        let control = tempfile::Builder::new()
            .prefix("kos")
            .tempdir_in("/tmp")
            .unwrap();
        Farm {
            dir,
            machines: Vec::new(),
            control,
        }
    }

    /// Starts a machine; `max_jobs` and `speed` go into its machines line.
    pub fn add(&mut self, kind: Kind, max_jobs: u32, speed: u32) -> usize {
        self.add_with(kind, max_jobs, speed, "ssh", "")
    }

    /// [`Farm::add`] with the URI scheme (`ssh` for the serve protocol,
    /// `ssh-ng` for the daemon protocol over stdio) and further URI
    /// parameters (`&name=value…`).
    pub fn add_with(
        &mut self,
        kind: Kind,
        max_jobs: u32,
        speed: u32,
        scheme: &str,
        params: &str,
    ) -> usize {
        let n = self.machines.len();
        let dir = self.dir.path().join(format!("m{n}"));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("root")).unwrap();
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join("host_key")),
        );
        std::fs::copy(
            self.dir.path().join("client_key.pub"),
            dir.join("authorized_keys"),
        )
        .unwrap();
        let program = match kind {
            Kind::Kiln => {
                let daemon = workspace_bin("store-daemon", "store-daemon");
                let script = dir.join("bin/store-daemon");
                std::fs::write(
                    &script,
                    format!(
                        "#!/bin/sh\nexec {} --store 'local?root={}' --option sandbox-paths '/bin /usr /lib /lib64?' \"$@\"\n",
                        daemon.display(),
                        dir.join("root").display()
                    ),
                )
                .unwrap();
                script
            }
            Kind::Nix => {
                std::fs::create_dir_all(dir.join("etc")).unwrap();
                std::fs::write(
                    dir.join("etc/nix.conf"),
                    format!(
                        "store = local?root={}\nsandbox = false\nsandbox-paths = /bin /usr /lib /lib64\nsubstituters =\nbuild-users-group =\nfsync-metadata = false\n",
                        dir.join("root").display()
                    ),
                )
                .unwrap();
                let program = if scheme == "ssh-ng" {
                    "nix-daemon"
                } else {
                    "nix-store"
                };
                let script = dir.join("bin").join(program);
                std::fs::write(
                    &script,
                    format!(
                        "#!/bin/sh\nexport NIX_CONF_DIR={}\nexec {} \"$@\"\n",
                        dir.join("etc").display(),
                        nix().program(program).display()
                    ),
                )
                .unwrap();
                script
            }
        };
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let port = free_port();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n\
                 UsePAM no\nPermitRootLogin yes\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let child = Command::new(sshd())
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start sshd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd on port {port} did not start: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        let host_key = host_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let line = format!(
            "{scheme}://root@127.0.0.1:{port}?remote-program={}{params} x86_64-linux {} {max_jobs} {speed} - - {}",
            program.display(),
            self.dir.path().join("client_key").display(),
            base64(&host_key)
        );
        self.machines.push(Machine {
            dir,
            kind,
            port,
            sshd: Some(child),
            line,
        });
        n
    }

    pub fn machines_file(&self) -> PathBuf {
        let path = self.dir.path().join("machines");
        let text: Vec<&str> = self.machines.iter().map(|m| m.line.as_str()).collect();
        std::fs::write(&path, text.join("\n") + "\n").unwrap();
        path
    }

    pub fn local_root(&self) -> PathBuf {
        self.dir.path().join("local")
    }

    /// offload-hook's directory for ssh control sockets
    /// (`KILN_OFFLOAD_SSH_DIR`), removed with the farm.
    pub fn ssh_dir(&self) -> PathBuf {
        self.control.path().to_owned()
    }

    pub fn choices(&self) -> String {
        std::fs::read_to_string(self.local_root().join("nix/var/nix/offload/choices.log"))
            .unwrap_or_default()
    }

    /// `kiln build -j 0` of `targets` through offload-hook.
    pub fn kiln_build(&self, targets: &[String]) -> Output {
        let store = format!("local?root={}", self.local_root().display());
        Command::new(kiln_bin())
            .args(["build", "--store", &store, "--no-out-link", "-j", "0"])
            .args(["--option", "store", &store])
            .args(["--option", "build-hook"])
            .arg(workspace_bin("offload-hook", "offload-hook"))
            .args(["--option", "builders"])
            .arg(format!("@{}", self.machines_file().display()))
            .args(targets)
            .env("KILN_OFFLOAD_SSH_DIR", self.ssh_dir())
            .env("KILN_OFFLOAD_BACKOFF", "2")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Every machine's store and the local one check clean.
    pub fn verify_everywhere(&self) {
        let kiln_verify = |root: &Path| {
            run_ok(
                Command::new(kiln_bin())
                    .args(["store", "--store"])
                    .arg(format!("local?root={}", root.display()))
                    .args(["verify", "--check-contents"]),
            );
        };
        kiln_verify(&self.local_root());
        for m in &self.machines {
            match m.kind {
                Kind::Kiln => kiln_verify(&m.root()),
                Kind::Nix => {
                    let out = run_ok(
                        Command::new(nix().program("nix-store"))
                            .env("NIX_CONF_DIR", m.dir.join("etc"))
                            .args(["--verify", "--check-contents"]),
                    );
                    let err = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        !err.contains("was modified") && !err.contains("disappeared"),
                        "{err}"
                    );
                }
            }
        }
    }
}

pub fn base64(text: &str) -> String {
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("base64 (coreutils)");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}
