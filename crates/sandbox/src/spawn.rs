//! Starting a sandbox and the handle to the running build.

use std::ffi::{CStr, CString, c_char};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cgroup::{self, Cgroup, CgroupStatus};
use crate::child::{self, ChildArgs, MSG_FAILED, Stage};
use crate::netns::{self, NetNs};
use crate::plan::{self, Plan, PlanError};
use crate::seccomp;
use crate::spec::{Output, SandboxMode, SandboxSpec};
use crate::uid::{UidError, UidRange};

/// Why a sandbox could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("invalid sandbox spec: {0}")]
    Plan(#[from] PlanError),
    #[error("allocating a build uid range: {0}")]
    Uid(#[from] UidError),
    #[error("sandbox staging directory {path}: {source}")]
    Staging { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("sandbox setup failed while {what}: {source}{hint}")]
    Setup {
        what: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot run {program}: {source}")]
    Exec { program: PathBuf, source: io::Error },
    #[error("the sandbox setup process ended without saying why")]
    Vanished,
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SpawnError {
    move |source| SpawnError::Io { what, source }
}

/// Starts sandboxes.
#[derive(Debug)]
pub struct Sandbox;

impl Sandbox {
    /// Starts `spec.program` in a new sandbox and returns once it has been
    /// `execve`d (or failed to be). Blocking: call it off async reactors.
    pub fn spawn(spec: SandboxSpec) -> Result<Child, SpawnError> {
        match spec.mode {
            SandboxMode::Off => spawn_unsandboxed(spec),
            SandboxMode::Enforced | SandboxMode::Relaxed => spawn_sandboxed(spec),
        }
    }

    /// Whether this process can start enforced sandboxes: tries a minimal one and
    /// returns the error that says what is missing.
    pub fn check() -> Result<(), SpawnError> {
        let spec = SandboxSpec::new("/nonexistent-kiln-sandbox-probe").output(Output::Null);
        match Sandbox::spawn(spec) {
            Err(SpawnError::Exec { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(mut child) => {
                let _ = child.kill();
                Ok(())
            }
        }
    }
}

/// A running (or finished) sandbox. Dropping it kills whatever still runs in it.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    status_r: Option<File>,
    output: Option<File>,
    exit: Option<ExitStatus>,
    cgroup: Option<Cgroup>,
    cgroup_status: CgroupStatus,
    uid_range: Option<UidRange>,
    host_ids: Option<(u32, u32)>,
    cpu_usage_usec: Option<u64>,
    /// The stacks init and the builder started on; init runs on its until
    /// it is reaped.
    stacks: Option<Stacks>,
    /// The network namespace made or kept for the sandbox, kept again once
    /// init is reaped.
    netns: Option<NetNs>,
}

/// Room for the stacks of a sandbox's init and of its builder until `execve`.
const STACK_SIZE: usize = 1 << 20;

/// Two stacks in one anonymous mapping, each above a guard page.
#[derive(Debug)]
struct Stacks {
    base: usize,
}

impl Stacks {
    fn new() -> io::Result<Stacks> {
        // SAFETY: a fresh private anonymous mapping, ours alone.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stacks = Stacks {
            base: base as usize,
        };
        for i in 0..2 {
            // SAFETY: the lowest page of each half of our mapping.
            let guard = unsafe {
                libc::mprotect(
                    (stacks.base + i * STACK_SIZE) as *mut libc::c_void,
                    4096,
                    libc::PROT_NONE,
                )
            };
            if guard != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(stacks)
    }

    /// The (16-byte aligned) top of stack `i`.
    fn top(&self, i: usize) -> usize {
        self.base + (i + 1) * STACK_SIZE
    }
}

impl Drop for Stacks {
    fn drop(&mut self) {
        // SAFETY: our mapping, which no process runs on any more.
        unsafe { libc::munmap(self.base as *mut libc::c_void, 2 * STACK_SIZE) };
    }
}

extern "C" fn init_entry(args: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `attempt` passes its `ChildArgs`, alive until the program runs.
    child::init_entry(unsafe { &mut *args.cast::<ChildArgs>() })
}

impl Child {
    /// Host pid of the sandbox's init (or of the program, for `SandboxMode::Off`).
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// A pidfd for the sandbox's init, for waiting from an event loop (it becomes
    /// readable when the sandbox has ended; then call [`Child::wait`]).
    pub fn pidfd(&self) -> io::Result<OwnedFd> {
        // SAFETY: pid is our unreaped child, so it names the sandbox's init.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// The read side of the program's output (pipe or pty master), once.
    pub fn take_output(&mut self) -> Option<File> {
        self.output.take()
    }

    /// The host uid and gid the program runs as (its files on writable binds
    /// belong to them).
    pub fn host_ids(&self) -> Option<(u32, u32)> {
        self.host_ids
    }

    /// The uid range the sandbox uses, when running as root.
    pub fn uid_range(&self) -> Option<&UidRange> {
        self.uid_range.as_ref()
    }

    /// Whether a cgroup was set up, and if not, why.
    pub fn cgroup_status(&self) -> &CgroupStatus {
        &self.cgroup_status
    }

    /// Kills every process of the sandbox.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        // SAFETY: pid is our unreaped child, so it cannot have been reused.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the program to exit. When this returns, every process that ran
    /// in the sandbox is gone, so its outputs can no longer change through any
    /// descriptor the build held (the caller copies or registers them now).
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.wait_flags(0).map(|s| s.expect("blocking wait"))
    }

    /// Like [`Child::wait`] without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_flags(libc::WNOHANG)
    }

    /// CPU time used by the sandbox in microseconds, when it has a cgroup.
    pub fn cpu_usage_usec(&self) -> Option<u64> {
        self.cgroup
            .as_ref()
            .and_then(|c| c.cpu_usage_usec())
            .or(self.cpu_usage_usec)
    }

    /// Once init is reaped, every process of the sandbox is gone: its network
    /// namespace may serve another (if it is still as new, which is checked then).
    fn keep_netns(&mut self) {
        if let Some(ns) = self.netns.take() {
            netns::give_back(ns);
        }
    }

    fn wait_flags(&mut self, flags: i32) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.exit {
            return Ok(Some(s));
        }
        let mut raw = 0;
        loop {
            // SAFETY: waiting for our own child.
            let rc = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
            if rc == 0 {
                return Ok(None);
            }
            if rc > 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        self.stacks = None;
        self.keep_netns();
        let mut status = ExitStatus::from_raw(raw);
        if let Some(mut r) = self.status_r.take() {
            let mut buf = [0u8; 4];
            if r.read_exact(&mut buf).is_ok() {
                status = ExitStatus::from_raw(i32::from_ne_bytes(buf));
            }
        }
        if let Some(cg) = self.cgroup.take() {
            self.cpu_usage_usec = cg.cpu_usage_usec();
            cg.finish();
        }
        self.exit = Some(status);
        Ok(Some(status))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.kill();
            let _ = self.wait();
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is written by the kernel.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pty pair in raw mode: (master, slave).
fn pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let pair = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    for fd in [&pair.master, &pair.slave] {
        // SAFETY: fcntl on an open fd.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let mut t = nix::sys::termios::tcgetattr(&pair.slave).map_err(io::Error::from)?;
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&pair.slave, nix::sys::termios::SetArg::TCSANOW, &t)
        .map_err(io::Error::from)?;
    Ok((pair.master, pair.slave))
}

fn default_staging() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/kiln-sandbox-root");
    }
    use std::os::unix::fs::MetadataExt;
    // Only a runtime directory of our own: a process that changed uid may still
    // carry its former user's XDG_RUNTIME_DIR.
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if std::fs::metadata(&d).is_ok_and(|m| m.uid() == uid) => {
            PathBuf::from(d).join("kiln-sandbox-root")
        }
        _ => std::env::temp_dir().join(format!("kiln-sandbox-root-{uid}")),
    }
}

fn ensure_staging(path: &Path) -> Result<(), SpawnError> {
    let err = |source| SpawnError::Staging {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(err(io::Error::other("exists and is not a directory"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(err(e)),
            }
        }
        Err(e) => Err(err(e)),
    }
}

/// Default place of the uid lock files when running as root.
pub const DEFAULT_UID_LOCK_DIR: &str = "/run/kiln-sandbox-uids";
/// Slots tried when allocating a range automatically.
pub const DEFAULT_UID_SLOTS: u32 = 128;

fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn write_file(path: &str, contents: &str) -> io::Result<()> {
    File::options()
        .write(true)
        .open(path)?
        .write_all(contents.as_bytes())
}

fn read_msg(r: &mut File) -> io::Result<Option<[u32; 4]>> {
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 16 {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let w = |i: usize| u32::from_ne_bytes(buf[i * 4..i * 4 + 4].try_into().unwrap());
    Ok(Some([w(0), w(1), w(2), w(3)]))
}

fn hint(stage: Stage, errno: i32) -> &'static str {
    match (stage, errno) {
        (Stage::Unshare, libc::EPERM | libc::ENOSPC | libc::EINVAL | libc::EUSERS) => {
            "; user namespaces are not available: check that `sysctl user.max_user_namespaces` is above 0 \
             (and kernel.unprivileged_userns_clone=1 or kernel.apparmor_restrict_unprivileged_userns=0 where those exist), \
             or build with the sandbox explicitly turned off"
        }
        (Stage::Seccomp, _) => {
            "; the kernel refused the seccomp filter: it needs CONFIG_SECCOMP_FILTER, or build with the sandbox explicitly turned off"
        }
        (Stage::Step, libc::EPERM) => {
            "; mounting inside a user namespace was refused: /proc or /sys may be partly covered on the host (as in some containers)"
        }
        (Stage::Step, libc::ENOSYS) => "; mount_setattr needs Linux 5.12 or later",
        _ => "",
    }
}

/// Set once an overlay could not be mounted: from then on this process makes
/// layered binds plain ones (see [`SandboxSpec::bind_rw_layered`]).
static OVERLAY_UNUSABLE: AtomicBool = AtomicBool::new(false);

fn spawn_sandboxed(mut spec: SandboxSpec) -> Result<Child, SpawnError> {
    let filter = seccomp::filter();
    // SAFETY: trivial getters.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let as_root = euid == 0;
    let staging = spec.staging_dir.clone().unwrap_or_else(default_staging);
    ensure_staging(&staging)?;
    let mut overlay = !spec.layered.is_empty() && !OVERLAY_UNUSABLE.load(Ordering::Relaxed);
    let mut plan = plan::make_plan(&spec, &staging, overlay)?;

    let uid_range = if as_root {
        Some(match spec.uid_range.take() {
            Some(r) => r,
            None => UidRange::allocate(Path::new(DEFAULT_UID_LOCK_DIR), DEFAULT_UID_SLOTS)?,
        })
    } else {
        None
    };
    let host_ids = match &uid_range {
        Some(r) => (r.host_id(spec.uid), r.host_id(spec.gid)),
        None => (euid, egid),
    };

    let (output_parent, output_child, is_pty) = match std::mem::take(&mut spec.output) {
        Output::Pipe => {
            let (r, w) = pipe().map_err(io_err("creating the output pipe"))?;
            (Some(r), Some(w), false)
        }
        Output::Pty => {
            let (m, s) = pty().map_err(io_err("creating the output pty"))?;
            (Some(m), Some(s), true)
        }
        Output::Null => (None, None, false),
        Output::Fd(fd) => (None, Some(fd), false),
    };

    let cgroup = spec.cgroup.as_ref().map(cgroup::Cgroup::create);
    let (cgroup, cgroup_status) = match cgroup {
        None => (None, CgroupStatus::NotRequested),
        Some(Ok(cg)) => {
            let status = match cg.partial() {
                Some(why) => CgroupStatus::Partial(why.to_owned()),
                None => CgroupStatus::Active,
            };
            (Some(cg), status)
        }
        Some(Err(why)) => (None, CgroupStatus::Unavailable(why)),
    };

    // An ordinary user maps itself from inside, without a round trip to us; root
    // maps a whole range, which only a process outside the namespace may do.
    let self_maps = (!as_root).then(|| {
        (
            CString::from(c"deny"),
            CString::new(format!("{} {euid} 1\n", spec.uid)).unwrap(),
            CString::new(format!("{} {egid} 1\n", spec.gid)).unwrap(),
        )
    });
    let common = Common {
        as_root,
        self_maps: self_maps
            .as_ref()
            .map(|(s, u, g)| (s.as_c_str(), u.as_c_str(), g.as_c_str())),
        out_fd: output_child.as_ref().map_or(-1, |f| f.as_raw_fd()),
        is_pty,
        filter,
    };
    // Nothing runs until an attempt has cloned init: dropping this kills nothing.
    let mut child = Child {
        pid: -1,
        status_r: None,
        output: output_parent.map(File::from),
        exit: Some(ExitStatus::from_raw(0)),
        cgroup,
        cgroup_status,
        uid_range,
        host_ids: Some(host_ids),
        cpu_usage_usec: None,
        stacks: None,
        netns: None,
    };
    loop {
        let outcome = attempt(&spec, &plan, &common, &mut child).inspect_err(|_| {
            if let Some(cg) = child.cgroup.take() {
                cg.finish();
            }
        });
        match outcome? {
            None => {
                drop(output_child);
                return Ok(child);
            }
            Some((Stage::Step, index, _))
                if overlay && matches!(plan.steps[index as usize], plan::Step::Overlay { .. }) =>
            {
                OVERLAY_UNUSABLE.store(true, Ordering::Relaxed);
                overlay = false;
                plan = plan::make_plan(&spec, &staging, false)?;
            }
            Some((stage, index, errno)) => {
                if let Some(cg) = child.cgroup.take() {
                    cg.finish();
                }
                return Err(setup_error(&spec, &plan, stage, index, errno));
            }
        }
    }
}

/// What every attempt at starting a sandbox shares.
struct Common<'a> {
    as_root: bool,
    /// `(setgroups, uid_map, gid_map)` when init maps itself.
    self_maps: Option<(&'a CStr, &'a CStr, &'a CStr)>,
    out_fd: RawFd,
    is_pty: bool,
    filter: &'static [libc::sock_filter],
}

/// What a failure the sandbox's init reported means.
fn setup_error(
    spec: &SandboxSpec,
    plan: &Plan,
    stage: Stage,
    index: u32,
    errno: i32,
) -> SpawnError {
    let source = io::Error::from_raw_os_error(errno);
    if stage == Stage::Exec {
        return SpawnError::Exec {
            program: spec.program.clone(),
            source,
        };
    }
    let what = match stage {
        Stage::Step => plan.describe(index as usize),
        Stage::OpenSource => format!(
            "opening bind source {}",
            plan.sources[index as usize].to_string_lossy()
        ),
        other => format!("{other:?}"),
    };
    SpawnError::Setup {
        hint: hint(stage, errno),
        what,
        source,
    }
}

/// Clones init for `plan` and waits until the program runs: `None`, with
/// `child` running; or the stage that failed, with init reaped.
fn attempt(
    spec: &SandboxSpec,
    plan: &Plan,
    common: &Common,
    child: &mut Child,
) -> Result<Option<(Stage, u32, i32)>, SpawnError> {
    let (report_r, report_w) = pipe().map_err(io_err("creating a pipe"))?;
    let (go_r, go_w) = pipe().map_err(io_err("creating a pipe"))?;
    let (status_r, status_w) = pipe().map_err(io_err("creating a pipe"))?;
    let out_fd = common.out_fd;

    let mut keep: Vec<RawFd> = vec![report_w.as_raw_fd(), go_r.as_raw_fd(), status_w.as_raw_fd()];
    if out_fd >= 0 {
        keep.push(out_fd);
    }
    keep.sort_unstable();

    let mut nofile_orig = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile_orig) };
    let needed = plan.sources.len() as u64 + 64;
    let nofile_needed = (needed > nofile_orig.rlim_cur).then(|| libc::rlimit {
        rlim_cur: needed,
        rlim_max: nofile_orig.rlim_max.max(needed),
    });
    let rlimits: Vec<(i32, libc::rlimit)> = spec
        .rlimits
        .iter()
        .map(|r| {
            (
                r.resource,
                libc::rlimit {
                    rlim_cur: r.soft,
                    rlim_max: r.hard,
                },
            )
        })
        .collect();

    let mut argv: Vec<*const c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const c_char> = plan.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut source_fds = vec![-1; plan.sources.len()];

    // Init enters the network namespace this thread is in at the clone: for
    // root, a kept or new one; otherwise one made by the clone itself.
    let inside = (plan.loopback && common.as_root)
        .then(netns::enter)
        .flatten();
    let own_netns = plan.loopback && inside.is_none();
    let mut namespaces = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    if own_netns {
        namespaces |= libc::CLONE_NEWNET;
    }
    let wait_for_go = common.as_root || child.cgroup.is_some();

    let mut args = ChildArgs {
        plan,
        become_root: common.as_root,
        loopback_up: own_netns,
        wait_for_go,
        self_maps: common.self_maps,
        set_groups: common.as_root,
        report_w: report_w.as_raw_fd(),
        go_r: go_r.as_raw_fd(),
        status_w: status_w.as_raw_fd(),
        out_fd,
        pty: common.is_pty,
        keep_fds: &keep,
        source_fds: &mut source_fds,
        nofile_needed,
        nofile_orig,
        rlimits: &rlimits,
        cap_last: cap_last_cap(),
        filter: common.filter,
        argv: &argv,
        envp: &envp,
        builder_stack: 0,
    };

    let stacks = Stacks::new().map_err(io_err("allocating the sandbox's stacks"))?;
    args.builder_stack = stacks.top(1);
    let init_stack = stacks.top(0);
    // SAFETY: the child shares our memory and runs `child::init_entry` on a
    // stack of its own (system calls, no allocation, never returns). It reads
    // `args` and the plan, which stay as they are until the report pipe's end
    // of file, after which it only uses its stack, which `child` keeps mapped
    // until it is reaped.
    let init = unsafe {
        libc::clone(
            init_entry,
            init_stack as *mut libc::c_void,
            namespaces | libc::CLONE_VM | libc::SIGCHLD,
            (&raw mut args).cast(),
        )
    };
    if init < 0 {
        let source = io::Error::last_os_error();
        // Back home; the namespace, which no sandbox entered, is kept.
        drop(inside);
        let errno = source.raw_os_error().unwrap_or(0);
        return Err(SpawnError::Setup {
            what: "creating the namespaces (clone)".into(),
            source,
            hint: hint(Stage::Unshare, errno),
        });
    }
    child.netns = inside.map(netns::Inside::leave);
    drop((report_w, go_r, status_w));
    child.stacks = Some(stacks);
    let mut report = File::from(report_r);
    child.pid = init;
    child.exit = None;
    child.status_r = Some(File::from(status_r));

    if wait_for_go {
        let prepared = (|| -> io::Result<()> {
            if let Some(r) = &child.uid_range {
                let line = format!("0 {} {}\n", r.first_host_id(), r.count());
                write_file(&format!("/proc/{init}/uid_map"), &line)?;
                write_file(&format!("/proc/{init}/gid_map"), &line)?;
            }
            if let Some(cg) = &child.cgroup {
                cg.add(init)?;
            }
            Ok(())
        })();
        if let Err(source) = prepared {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SpawnError::Setup {
                what: "writing the user namespace's uid/gid maps".into(),
                source,
                hint: "",
            });
        }
        File::from(go_w)
            .write_all(&[1])
            .map_err(io_err("signalling the sandbox"))?;
    } else {
        drop(go_w);
    }

    // End of file means the program was executed.
    let msg = read_msg(&mut report).map_err(io_err("reading the sandbox setup pipe"))?;
    let failed = match msg {
        None => return Ok(None),
        Some([MSG_FAILED, stage, index, errno]) => {
            Stage::from_u32(stage).map(|s| (s, index, errno as i32))
        }
        Some(_) => None,
    };
    // init exits right after reporting; reap it without finishing the cgroup,
    // which a further attempt may still use.
    let mut raw = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(init, &mut raw, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    child.exit = Some(ExitStatus::from_raw(raw));
    child.status_r = None;
    child.stacks = None;
    child.keep_netns();
    failed.map(Some).ok_or(SpawnError::Vanished)
}

fn spawn_unsandboxed(mut spec: SandboxSpec) -> Result<Child, SpawnError> {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(&spec.program);
    if let Some(arg0) = &spec.arg0 {
        std::os::unix::process::CommandExt::arg0(&mut cmd, arg0);
    }
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null());
    let output = match std::mem::take(&mut spec.output) {
        Output::Pipe => {
            let (r, w) = pipe().map_err(io_err("creating the output pipe"))?;
            let w2 = w
                .try_clone()
                .map_err(io_err("duplicating the output pipe"))?;
            cmd.stdout(Stdio::from(w)).stderr(Stdio::from(w2));
            Some(File::from(r))
        }
        Output::Pty => {
            let (m, s) = pty().map_err(io_err("creating the output pty"))?;
            let s2 = s.try_clone().map_err(io_err("duplicating the pty"))?;
            cmd.stdout(Stdio::from(s)).stderr(Stdio::from(s2));
            Some(File::from(m))
        }
        Output::Null => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            None
        }
        Output::Fd(fd) => {
            let fd2 = fd
                .try_clone()
                .map_err(io_err("duplicating the output fd"))?;
            cmd.stdout(Stdio::from(fd)).stderr(Stdio::from(fd2));
            None
        }
    };
    let core = spec.rlimits.clone();
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            for r in &core {
                let l = libc::rlimit {
                    rlim_cur: r.soft,
                    rlim_max: r.hard,
                };
                libc::setrlimit(r.resource as _, &l);
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| SpawnError::Exec {
        program: spec.program.clone(),
        source,
    })?;
    drop(cmd);
    let pid = child.id() as i32;
    // The std handle is forgotten on purpose: we reap by pid ourselves.
    std::mem::forget(child);
    Ok(Child {
        pid,
        status_r: None,
        output,
        exit: None,
        cgroup: None,
        cgroup_status: CgroupStatus::NotRequested,
        uid_range: None,
        host_ids: None,
        cpu_usage_usec: None,
        stacks: None,
        netns: None,
    })
}
