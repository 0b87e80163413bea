//! Runs a command in an isolated root that the caller describes: the build
//! sandbox of Kiln, usable on its own (it knows nothing of derivations).
//!
//! A sandbox gets new user, mount, PID, IPC and UTS namespaces, and a network
//! namespace with only loopback unless host networking is asked for; a root on
//! tmpfs holding only the binds the caller lists plus a minimal `/dev`, a new
//! `/proc`, `/tmp` and generated `/etc/{passwd,group,hosts}`; `pivot_root` with the
//! old root detached; the build user (uid 1000, gid 100 by default) with every
//! capability dropped, `no_new_privs`, `RLIMIT_CORE=0` and a seccomp filter that
//! refuses setuid/setgid bits and extended attributes on all x86-64 ABIs. The
//! PID namespace's init is a small reaper of ours: when the program exits, or the
//! handle is killed, every process of the sandbox dies before `wait` returns.
//! It fails closed: if any of this cannot be set up, [`Sandbox::spawn`] says what
//! and how to fix it; only [`SandboxMode::Off`] runs without isolation.
//!
//! ```no_run
//! use kiln_sandbox::{BuildDirs, Sandbox, SandboxSpec};
//! use std::io::Read;
//!
//! let dirs = BuildDirs::open("/nix/var/kiln/builds".as_ref())?;
//! let build = dirs.create("kiln", None)?;
//! let spec = SandboxSpec::new("/nix/store/…-bash/bin/bash")
//!     .args(["-e", "/build/builder.sh"])
//!     .env("PATH", "/path-not-set")
//!     .bind_ro("/nix/store/…-bash", "/nix/store/…-bash")
//!     .bind_rw(build.path(), "/build")
//!     .cwd("/build");
//! let mut child = Sandbox::spawn(spec)?;
//! let mut log = String::new();
//! child.take_output().unwrap().read_to_string(&mut log)?;
//! let status = child.wait()?; // every process of the build is gone now
//! build.remove()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod builddir;
pub mod cgroup;
mod child;
mod netns;
mod plan;
mod raw;
pub mod seccomp;
pub mod spawn;
pub mod spec;
pub mod uid;

pub use builddir::{BuildDir, BuildDirError, BuildDirs};
pub use cgroup::CgroupStatus;
pub use plan::PlanError;
pub use spawn::{Child, Sandbox, SpawnError};
pub use spec::{Bind, CgroupLimits, Network, Output, SandboxMode, SandboxSpec};
pub use uid::{UidError, UidRange};
