//! What the caller asks for: the program to run and the isolated root to run it in.
//!
//! A [`SandboxSpec`] is plain data built with chained setters; nothing touches the
//! system until [`crate::Sandbox::spawn`] is called with it.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::uid::UidRange;

/// How strictly the command is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// Every namespace, the seccomp filter, no capabilities; spawning fails when any
    /// of it cannot be set up.
    #[default]
    Enforced,
    /// Isolated exactly like `Enforced`, but binds whose source is missing are left
    /// out even without the `?` suffix. (Nix's `sandbox = relaxed` additionally runs
    /// derivations marked `__noChroot` unsandboxed: callers map those to `Off`.)
    Relaxed,
    /// No isolation at all: the program runs on the host as the caller, with the given
    /// arguments, environment and working directory (Nix's `sandbox = false`). Only
    /// for callers that were explicitly told so.
    Off,
}

/// Network access of the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// A network namespace of its own with only the loopback interface, brought up.
    #[default]
    None,
    /// The host's network (fixed-output builds). `/etc/resolv.conf`, `/etc/services`
    /// and an `/etc/nsswitch.conf` are provided so that name lookups work.
    Host,
}

/// Where the program's standard output and standard error go.
#[derive(Debug, Default)]
pub enum Output {
    /// A pipe; read it through [`crate::Child::take_output`].
    #[default]
    Pipe,
    /// A pseudo-terminal in raw mode; the program gets it as its controlling
    /// terminal, and the master side is read through [`crate::Child::take_output`].
    Pty,
    /// Discarded (`/dev/null`).
    Null,
    /// An open file or pipe the caller supplies.
    Fd(OwnedFd),
}

/// One bind mount from the host into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Path on the host (a directory or a file).
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    /// Whether the builder may write through it.
    pub writable: bool,
    /// Whether a missing source is silently left out.
    pub optional: bool,
    /// Whether the source is a directory, when the caller knows it (a store
    /// path never changes): the plan then does not `stat` it. A missing source
    /// is still reported, when the sandbox opens it.
    pub is_dir: Option<bool>,
}

/// A resource limit applied with `setrlimit` before the program starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// The `RLIMIT_*` resource (e.g. `libc::RLIMIT_NOFILE`).
    pub resource: i32,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Limits enforced through a cgroup v2 per sandbox, where the machine has a writable
/// cgroup2 hierarchy with the needed controllers (see [`crate::cgroup`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// Everything needed to run one command in a sandbox.
#[derive(Debug)]
pub struct SandboxSpec {
    pub(crate) program: PathBuf,
    /// `argv[0]`; the program path when `None`.
    pub(crate) arg0: Option<OsString>,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: PathBuf,
    pub(crate) binds: Vec<Bind>,
    /// Writable binds (by target) whose nested binds get their mount points on
    /// a tmpfs below an overlay, with the overlay's work directory.
    pub(crate) layered: Vec<(PathBuf, PathBuf)>,
    pub(crate) symlinks: Vec<(PathBuf, PathBuf)>,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) user_name: String,
    pub(crate) group_name: String,
    pub(crate) home: PathBuf,
    pub(crate) network: Network,
    pub(crate) hostname: String,
    pub(crate) rlimits: Vec<Rlimit>,
    pub(crate) cgroup: Option<CgroupLimits>,
    pub(crate) output: Output,
    pub(crate) mode: SandboxMode,
    pub(crate) uid_range: Option<UidRange>,
    pub(crate) staging_dir: Option<PathBuf>,
}

impl SandboxSpec {
    /// A spec that runs `program` (an absolute path inside the sandbox; no `PATH`
    /// search, no shell) with no arguments, an empty environment, in `/`, as
    /// `nixbld` (uid 1000, gid 100), without network.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        SandboxSpec {
            program: program.into(),
            arg0: None,
            args: Vec::new(),
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            binds: Vec::new(),
            layered: Vec::new(),
            symlinks: Vec::new(),
            uid: 1000,
            gid: 100,
            user_name: "nixbld".into(),
            group_name: "nixbld".into(),
            home: PathBuf::from("/build"),
            network: Network::None,
            hostname: "localhost".into(),
            rlimits: Vec::new(),
            cgroup: None,
            output: Output::Pipe,
            mode: SandboxMode::Enforced,
            uid_range: None,
            staging_dir: None,
        }
    }

    /// Sets `argv[0]`, the name the program is called by (the program path
    /// unless set; Nix passes a builder's base name).
    pub fn arg0(mut self, arg0: impl Into<OsString>) -> Self {
        self.arg0 = Some(arg0.into());
        self
    }

    /// Appends one argument (`argv[1..]`; `argv[0]` is set by
    /// [`SandboxSpec::arg0`]).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends several arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable (the environment starts empty).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// The working directory inside the sandbox.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = dir.into();
        self
    }

    /// Binds a host path read-only at `target` inside (e.g. a physical store path at
    /// its logical `/nix/store/…` path).
    pub fn bind_ro(mut self, source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            source: source.into(),
            target: target.into(),
            writable: false,
            optional: false,
            is_dir: None,
        });
        self
    }

    /// Like [`SandboxSpec::bind_ro`], for a source the caller knows to be a
    /// directory or not (a build's inputs, in a large closure, each cost a
    /// `stat` otherwise).
    pub fn bind_ro_known(
        mut self,
        source: impl Into<PathBuf>,
        target: impl Into<PathBuf>,
        is_dir: bool,
    ) -> Self {
        self.binds.push(Bind {
            source: source.into(),
            target: target.into(),
            writable: false,
            optional: false,
            is_dir: Some(is_dir),
        });
        self
    }

    /// Binds a host path writable at `target` inside (the build directory at
    /// `/build`, output locations).
    pub fn bind_rw(mut self, source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            source: source.into(),
            target: target.into(),
            writable: true,
            optional: false,
            is_dir: None,
        });
        self
    }

    /// Binds a host directory writable at `target`, like [`SandboxSpec::bind_rw`],
    /// but with the mount points of the binds nested below `target` kept out of
    /// `source`: they are made on a tmpfs that an overlay lays under `source`, so
    /// `source` receives only what the program writes, and creating and deleting a
    /// mount point per nested bind on the host's disk is saved (a build's input
    /// closure under a writable store directory). `work` is an empty host
    /// directory on the same file system as `source`, for the overlay's own use;
    /// empty it before it serves another sandbox (the overlay leaves a marker
    /// there that makes a second mount on it fail).
    ///
    /// The overlay is volatile: nothing written to `source` through it is
    /// synced when the sandbox ends, so a caller that keeps files from it syncs
    /// them itself (as a store does before registering a build's outputs). The
    /// sync it skips would write back and flush the whole file system.
    ///
    /// With no binds below `target`, there is nothing to keep out of `source`:
    /// this is then a plain writable bind.
    ///
    /// Where an overlay cannot be mounted in a user namespace (before Linux 5.11,
    /// or a file system under `source` that overlayfs does not accept), this is a
    /// plain writable bind and the mount points are made in `source`.
    pub fn bind_rw_layered(
        mut self,
        source: impl Into<PathBuf>,
        work: impl Into<PathBuf>,
        target: impl Into<PathBuf>,
    ) -> Self {
        let target = target.into();
        self.layered.retain(|(t, _)| *t != target);
        self.layered.push((target.clone(), work.into()));
        self.bind_rw(source, target)
    }

    /// Adds one entry in Nix's `sandbox-paths` syntax: `path`, `inside=host`, with an
    /// optional trailing `?` meaning "leave out if the host path is missing". Bound
    /// read-only.
    pub fn sandbox_path(mut self, entry: &str) -> Self {
        let (entry, optional) = match entry.strip_suffix('?') {
            Some(rest) => (rest, true),
            None => (entry, false),
        };
        let (target, source) = match entry.split_once('=') {
            Some((inside, host)) => (inside, host),
            None => (entry, entry),
        };
        self.binds.push(Bind {
            source: source.into(),
            target: target.into(),
            writable: false,
            optional,
            is_dir: None,
        });
        self
    }

    /// Creates a symlink at `link` inside the sandbox pointing to `target` (e.g.
    /// `/lib` → `usr/lib` on merged-usr hosts). Created after all binds, so it
    /// cannot redirect where they land.
    pub fn symlink(mut self, link: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        self.symlinks.push((link.into(), target.into()));
        self
    }

    /// Adds a prepared [`Bind`].
    pub fn bind(mut self, bind: Bind) -> Self {
        self.binds.push(bind);
        self
    }

    /// The uid and gid of the program inside the sandbox (default 1000 and 100).
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// The names written to the generated `/etc/passwd` and `/etc/group` for the
    /// build user and group (default `nixbld`), and the home directory listed there
    /// (default `/build`, as Nix writes it; `$HOME` is whatever the caller sets).
    pub fn user_names(
        mut self,
        user: impl Into<String>,
        group: impl Into<String>,
        home: impl Into<PathBuf>,
    ) -> Self {
        self.user_name = user.into();
        self.group_name = group.into();
        self.home = home.into();
        self
    }

    /// Network access (default: loopback only).
    pub fn network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    /// The hostname inside (default `localhost`).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = name.into();
        self
    }

    /// Adds a resource limit. `RLIMIT_CORE` is always 0 whatever is given here.
    pub fn rlimit(mut self, resource: i32, soft: u64, hard: u64) -> Self {
        self.rlimits.push(Rlimit {
            resource,
            soft,
            hard,
        });
        self
    }

    /// Asks for a cgroup v2 of its own with these limits. This is best effort: when
    /// the machine has no writable cgroup2 hierarchy with the controllers, the build
    /// runs without and [`crate::Child::cgroup_status`] says why.
    pub fn cgroup(mut self, limits: CgroupLimits) -> Self {
        self.cgroup = Some(limits);
        self
    }

    /// Where standard output and standard error go (default: a pipe).
    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// How strictly to isolate (default: enforced).
    pub fn mode(mut self, mode: SandboxMode) -> Self {
        self.mode = mode;
        self
    }

    /// Uses this host uid range for the user namespace (root only). Without it a
    /// range is allocated for the lifetime of the child when running as root.
    pub fn uid_range(mut self, range: UidRange) -> Self {
        self.uid_range = Some(range);
        self
    }

    /// An empty host directory on which the sandbox's root tmpfs is mounted (in the
    /// sandbox's own mount namespace only, so the host never sees it). Host paths
    /// below it cannot be bound. Default: `/run/kiln-sandbox` as root, else
    /// `$XDG_RUNTIME_DIR/kiln-sandbox` or `/tmp/kiln-sandbox-<uid>`.
    pub fn staging_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.staging_dir = Some(dir.into());
        self
    }

    /// The program path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The binds asked for so far.
    pub fn binds(&self) -> &[Bind] {
        &self.binds
    }
}
