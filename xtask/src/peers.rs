//! The real programs Kiln's tests talk to, and their installation from Debian's packages.
//!
//! To give the tests a new peer, add a row to [`PEERS`]: the package, and the commands
//! whose presence shows it is installed. `cargo xtask test` (and `cargo xtask setup`)
//! installs every package with a missing command, running `apt-get update` first, once.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::process;

/// A Debian package that some tests need.
#[derive(Debug)]
pub struct Peer {
    /// The package name for `apt-get install`.
    pub package: &'static str,
    /// Commands (names looked up on `PATH` and the sbin directories, or absolute
    /// paths) that are all present once the package is installed.
    pub commands: &'static [&'static str],
    /// Which tests need it, for the messages.
    pub used_for: &'static str,
}

/// Every peer the test suite needs. Later issues add rows here, for example
/// `openssh-server` (`sshd`, `ssh`), `qemu-system-x86` (`qemu-system-x86_64`),
/// `postgresql` (`pg_ctlcluster`), `chromium` (`chromium`).
pub const PEERS: &[Peer] = &[
    Peer {
        package: "nix-bin",
        commands: &[
            "nix",
            "nix-store",
            "nix-instantiate",
            "nix-hash",
            "nix-build",
        ],
        used_for: "Nix 2.8, the reference every differential test compares against",
    },
    Peer {
        package: "qemu-system-x86",
        commands: &["qemu-system-x86_64"],
        used_for: "the build agent's VMs (tests/tests/agent_*.rs)",
    },
    Peer {
        package: "qemu-utils",
        commands: &["qemu-img"],
        used_for: "the build agent's overlays (tests/tests/agent_*.rs)",
    },
    Peer {
        package: "openssh-server",
        commands: &["sshd"],
        used_for: "the offload machines of tests/tests/offload_ssh.rs and bench-offload",
    },
    Peer {
        package: "openssh-client",
        commands: &["ssh", "ssh-keygen"],
        used_for: "offload-hook's transport (ssh with ControlMaster) and the offload tests' keys",
    },
    Peer {
        package: "chromium",
        commands: &["chromium"],
        used_for: "the CI web pages rendered headless (tests/tests/ci_web.rs)",
    },
    Peer {
        package: "postgresql",
        commands: &[
            "/usr/lib/postgresql/15/bin/initdb",
            "/usr/lib/postgresql/15/bin/pg_ctl",
        ],
        used_for: "kiln-ci's PostgreSQL database in tests/tests/ci_*.rs and bench-ci",
    },
    Peer {
        package: "git",
        commands: &["git"],
        used_for: "kiln-ci's git inputs (tests/tests/ci_*.rs)",
    },
];

/// Directories searched besides `PATH`: daemons such as `sshd` live in sbin, which an
/// ordinary user's `PATH` often lacks.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Where `command` is, if it is installed.
pub fn find_command(command: &str) -> Option<PathBuf> {
    if command.contains('/') {
        let path = PathBuf::from(command);
        return is_executable(&path).then_some(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(command))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.mode() & 0o111 != 0)
}

fn missing_commands(peer: &Peer) -> Vec<&'static str> {
    peer.commands
        .iter()
        .copied()
        .filter(|command| find_command(command).is_none())
        .collect()
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the process's effective uid; std has no geteuid.
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// Installs every peer that is missing a command. In CI a peer that is still
/// missing afterwards is an error; elsewhere it is a warning, and the tests that
/// need it fail with their own message.
pub fn ensure(ci: bool) -> Result<()> {
    let missing: Vec<&Peer> = PEERS
        .iter()
        .filter(|peer| !missing_commands(peer).is_empty())
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = PEERS.iter().map(|peer| peer.package).collect();
        eprintln!("xtask: peers present: {}", names.join(", "));
        return Ok(());
    }
    for peer in &missing {
        eprintln!(
            "xtask: installing {} ({}), missing: {}",
            peer.package,
            peer.used_for,
            missing_commands(peer).join(", ")
        );
    }

    if let Err(error) = apt_install(&missing) {
        if ci {
            return Err(error);
        }
        eprintln!("xtask: warning: {error:#}");
    }

    let still_missing: Vec<String> = PEERS
        .iter()
        .filter_map(|peer| {
            let commands = missing_commands(peer);
            (!commands.is_empty()).then(|| format!("{} (no {})", peer.package, commands.join(", ")))
        })
        .collect();
    if still_missing.is_empty() {
        return Ok(());
    }
    let message = format!(
        "peers still missing after installation: {}; install them with \
         `apt-get install {}`",
        still_missing.join("; "),
        missing
            .iter()
            .map(|peer| peer.package)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if ci {
        bail!("{message}");
    }
    eprintln!("xtask: warning: {message}; the tests that need them will fail");
    Ok(())
}

fn apt_install(peers: &[&Peer]) -> Result<()> {
    let root = running_as_root();
    if !root && find_command("sudo").is_none() {
        bail!("not root and no sudo: cannot run apt-get");
    }
    let apt_get = || {
        if root {
            let mut command = Command::new("apt-get");
            command.env("DEBIAN_FRONTEND", "noninteractive");
            command
        } else {
            // Non-interactive sudo fails at once instead of hanging on a password prompt.
            let mut command = Command::new("sudo");
            command.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
            command
        }
    };
    process::run(apt_get().args(["update", "-q"]))?;
    process::run(
        apt_get()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(peers.iter().map(|peer| peer.package)),
    )
}
