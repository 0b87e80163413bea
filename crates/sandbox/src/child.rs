//! The code that runs after `fork`: it only makes system calls on data the parent
//! prepared ([`crate::plan::Plan`]), reports failures as fixed-size messages on a
//! pipe and never returns.
//!
//! Two processes take part, both made with `clone` (no `fork` wrapper, whose
//! atfork handlers could block on locks that another thread of the caller held
//! at the moment of cloning; nothing here allocates). Both share the caller's
//! memory (`CLONE_VM`) on stacks of their own rather than copy it: copying a
//! large caller's page tables, and the copy-on-write faults the caller then
//! took for as long as a build ran, cost more than the rest of the sandbox.
//! So they only read what the caller prepared, and the caller keeps it until
//! the program runs; after that, init touches nothing but its own stack:
//! 1. *init*, cloned by the caller straight into new user, mount, PID, IPC, UTS
//!    (and network) namespaces, so it is pid 1 there and the caller's own child.
//!    It opens the bind sources while it still has the caller's credentials, gets
//!    its uid/gid maps (written by a root caller, or by itself otherwise), builds
//!    the root, `pivot_root`s into it, clones the builder and reaps everything until
//!    the builder exits; then it passes the builder's wait status up and exits,
//!    which makes the kernel kill every other process of the namespace before the
//!    caller's `waitpid` returns;
//! 2. the *builder*: drops to the build user, loses every capability, installs the
//!    seccomp filter and `execve`s the program.

use std::ffi::{CStr, c_char};
use std::ptr;

use crate::plan::{Plan, Source, Step};
use crate::raw;

/// The only message on the report pipe; its end-of-file means success.
pub(crate) const MSG_FAILED: u32 = 3;

/// The stages that can fail, reported as `Failed { stage, index, errno }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Stage {
    Unshare = 1,
    SelfMap,
    RaiseNofile,
    OpenSource,
    WaitForMaps,
    BecomeRoot,
    Step,
    PivotRoot,
    Hostname,
    Loopback,
    ForkBuilder,
    Stdio,
    Chdir,
    Rlimit,
    DropCapabilities,
    SetUser,
    Seccomp,
    Exec,
}

impl Stage {
    pub(crate) fn from_u32(v: u32) -> Option<Stage> {
        use Stage::*;
        [
            Unshare,
            SelfMap,
            RaiseNofile,
            OpenSource,
            WaitForMaps,
            BecomeRoot,
            Step,
            PivotRoot,
            Hostname,
            Loopback,
            ForkBuilder,
            Stdio,
            Chdir,
            Rlimit,
            DropCapabilities,
            SetUser,
            Seccomp,
            Exec,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

/// Everything the forked processes need, all prepared before `fork`.
#[derive(Debug)]
pub(crate) struct ChildArgs<'a> {
    pub plan: &'a Plan,
    pub become_root: bool,
    /// Bring up the loopback of a network namespace made for this sandbox.
    pub loopback_up: bool,
    /// Wait on `go_r` for the caller (maps written, cgroup joined) before going on.
    pub wait_for_go: bool,
    /// `(setgroups, uid_map, gid_map)` contents when init maps itself.
    pub self_maps: Option<(&'a CStr, &'a CStr, &'a CStr)>,
    pub set_groups: bool,
    pub report_w: i32,
    pub go_r: i32,
    pub status_w: i32,
    /// Standard output/error of the builder, or -1 for `/dev/null`.
    pub out_fd: i32,
    pub pty: bool,
    pub keep_fds: &'a [i32],
    pub source_fds: &'a mut [i32],
    pub nofile_needed: Option<libc::rlimit>,
    pub nofile_orig: libc::rlimit,
    pub rlimits: &'a [(i32, libc::rlimit)],
    pub cap_last: u32,
    pub filter: &'static [libc::sock_filter],
    pub argv: &'a [*const c_char],
    pub envp: &'a [*const c_char],
    /// Top of the stack the builder starts on (see [`crate::spawn`]).
    pub builder_stack: usize,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn send(fd: i32, kind: u32, stage: u32, index: u32, value: i32) {
    let mut buf = [0u8; 16];
    buf[0..4].copy_from_slice(&kind.to_ne_bytes());
    buf[4..8].copy_from_slice(&stage.to_ne_bytes());
    buf[8..12].copy_from_slice(&index.to_ne_bytes());
    buf[12..16].copy_from_slice(&value.to_ne_bytes());
    // SAFETY: writing a stack buffer; 16 bytes are written atomically to a pipe.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
}

fn fail(a: &ChildArgs, stage: Stage, index: usize, err: i32) -> ! {
    send(a.report_w, MSG_FAILED, stage as u32, index as u32, err);
    // SAFETY: leaving the forked process without running the caller's destructors.
    unsafe { libc::_exit(127) }
}

macro_rules! check {
    ($a:expr, $stage:expr, $idx:expr, $e:expr) => {
        if $e < 0 {
            fail($a, $stage, $idx, errno());
        }
    };
}

/// Closes every descriptor that is not in `keep` (sorted ascending), so a
/// concurrent spawn's pipes never leak into this sandbox.
fn close_all_but(keep: &[i32]) {
    let mut next: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            raw::close_range(next, fd - 1);
        }
        next = next.max(fd + 1);
    }
    raw::close_range(next, u32::MAX);
}

// glibc's set*id wrappers stop every thread it knows of to change their ids too;
// in a raw clone of a multi-threaded caller those threads do not exist, and the
// wrapper would wait for them forever. The system calls act on this process only,
// which is all there is.
fn raw_setresuid(r: u32, e: u32, s: u32) -> i32 {
    // SAFETY: plain system call.
    unsafe { libc::syscall(libc::SYS_setresuid, r, e, s) as i32 }
}

fn raw_setresgid(r: u32, e: u32, s: u32) -> i32 {
    // SAFETY: plain system call.
    unsafe { libc::syscall(libc::SYS_setresgid, r, e, s) as i32 }
}

fn raw_setgroups(n: usize, groups: *const libc::gid_t) -> i32 {
    // SAFETY: `groups` points to `n` gids (or is null with n == 0).
    unsafe { libc::syscall(libc::SYS_setgroups, n, groups) as i32 }
}

fn write_proc(path: &CStr, contents: &CStr) -> i32 {
    // SAFETY: plain system calls on C strings.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return -1;
        }
        let bytes = contents.to_bytes();
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        libc::close(fd);
        if n == bytes.len() as isize { 0 } else { -1 }
    }
}

/// Entry of init, right after the caller's `clone` returned 0 in it.
pub(crate) fn init_entry(a: &mut ChildArgs) -> ! {
    close_all_but(a.keep_fds);
    // SAFETY: plain system calls on prepared data throughout.
    unsafe {
        libc::umask(0);
        if let Some(lim) = a.nofile_needed {
            check!(
                a,
                Stage::RaiseNofile,
                0,
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim)
            );
        }
        // Still the caller's host credentials: open what the build user may not reach.
        for (i, (dir, name)) in a.plan.source_opens.iter().enumerate() {
            if let Some(dir) = dir {
                check!(a, Stage::OpenSource, i, libc::chdir(dir.as_ptr()));
            }
            let fd = if a.plan.source_trees[i] {
                libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    name.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as u32 | libc::AT_RECURSIVE as u32,
                ) as i32
            } else {
                libc::open(name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC)
            };
            check!(a, Stage::OpenSource, i, fd);
            a.source_fds[i] = fd;
        }
        if let Some((setgroups, uid_map, gid_map)) = a.self_maps {
            // A caller that changed its uid is not dumpable, which makes our /proc
            // files root's, even to ourselves; lift that just for the maps.
            let dumpable = libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0);
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
            check!(
                a,
                Stage::SelfMap,
                0,
                write_proc(c"/proc/self/setgroups", setgroups)
            );
            check!(
                a,
                Stage::SelfMap,
                1,
                write_proc(c"/proc/self/uid_map", uid_map)
            );
            check!(
                a,
                Stage::SelfMap,
                2,
                write_proc(c"/proc/self/gid_map", gid_map)
            );
            libc::prctl(libc::PR_SET_DUMPABLE, dumpable.max(0), 0, 0, 0);
        }
        if a.wait_for_go {
            let mut go = 0u8;
            if libc::read(a.go_r, (&mut go as *mut u8).cast(), 1) != 1 {
                fail(a, Stage::WaitForMaps, 0, libc::ECANCELED);
            }
        }
        if a.become_root {
            // Host root is not mapped inside; become the namespace's root (the
            // first uid of our range) so files we create have a mapped owner.
            check!(a, Stage::BecomeRoot, 0, raw_setresgid(0, 0, 0));
            check!(a, Stage::BecomeRoot, 0, raw_setgroups(0, ptr::null()));
            check!(a, Stage::BecomeRoot, 0, raw_setresuid(0, 0, 0));
        }
    }
    init(a)
}

const OPEN_TREE_CLONE: u32 = 1;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn set_attrs(path: &CStr, attrs: u64, clear: u64, recursive: bool) -> i32 {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: valid C string and struct for the duration of the call.
    unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) as i32
    }
}

/// Formats `/proc/self/fd/<fd>` into `buf` without allocating.
fn proc_fd_path(fd: i32, buf: &mut [u8; 32]) -> &CStr {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    CStr::from_bytes_with_nul(&buf[..prefix.len() + len + 1]).expect("one NUL at the end")
}

fn run_step(a: &ChildArgs, step: &Step) -> i32 {
    // SAFETY: system calls on C strings prepared by the parent.
    unsafe {
        match step {
            Step::MakePrivate => libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                ptr::null(),
            ),
            // init runs with umask 0, so the mode is exact.
            Step::Mkdir { path, mode } => libc::mkdir(path.as_ptr(), *mode),
            Step::Touch { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    return -1;
                }
                libc::close(fd)
            }
            Step::Mount {
                fstype,
                path,
                flags,
                data,
            } => libc::mount(
                fstype.as_ptr(),
                path.as_ptr(),
                fstype.as_ptr(),
                *flags,
                data.as_ptr().cast(),
            ),
            Step::Bind {
                source,
                path,
                attrs,
            } => {
                let attached = match source {
                    Source::Opened(i) => libc::syscall(
                        libc::SYS_move_mount,
                        a.source_fds[*i],
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH,
                    ) as i32,
                    Source::Path(p) => libc::mount(
                        p.as_ptr(),
                        path.as_ptr(),
                        ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        ptr::null(),
                    ),
                };
                if attached < 0 {
                    return -1;
                }
                // (The source descriptors are closed all at once after setup.)
                if *attrs == 0 {
                    return 0;
                }
                set_attrs(path, *attrs, 0, true)
            }
            Step::SetAttrs {
                path,
                attrs,
                clear,
                recursive,
            } => set_attrs(path, *attrs, *clear, *recursive),
            Step::Overlay {
                options,
                upper,
                work,
                path,
                flags,
            } => {
                // The options page, completed here because only now are the
                // layers' descriptors known.
                let mut data = [0u8; 4096];
                let mut len = 0;
                let mut put = |bytes: &[u8]| {
                    data[len..len + bytes.len()].copy_from_slice(bytes);
                    len += bytes.len();
                };
                let mut fd_path = [0u8; 32];
                put(options.to_bytes());
                put(b",upperdir=");
                put(proc_fd_path(a.source_fds[*upper], &mut fd_path).to_bytes());
                put(b",workdir=");
                put(proc_fd_path(a.source_fds[*work], &mut fd_path).to_bytes());
                libc::mount(
                    c"overlay".as_ptr(),
                    path.as_ptr(),
                    c"overlay".as_ptr(),
                    *flags,
                    data.as_ptr().cast(),
                )
            }
            Step::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()),
            Step::Chdir { path } => libc::chdir(path.as_ptr()),
            Step::WriteFile { path, contents } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    return -1;
                }
                let mut done = 0;
                while done < contents.len() {
                    let n =
                        libc::write(fd, contents[done..].as_ptr().cast(), contents.len() - done);
                    if n < 0 {
                        libc::close(fd);
                        return -1;
                    }
                    done += n as usize;
                }
                libc::close(fd)
            }
        }
    }
}

#[repr(C)]
struct Ifreq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

pub(crate) fn loopback_up() -> i32 {
    // SAFETY: socket/ioctl on a stack struct laid out like `struct ifreq`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return -1;
        }
        let mut ifr = Ifreq {
            name: [0; 16],
            flags: (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16,
            _pad: [0; 22],
        };
        ifr.name[..2].copy_from_slice(b"lo");
        let rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr as *const Ifreq);
        libc::close(fd);
        rc
    }
}

fn init(a: &ChildArgs) -> ! {
    let plan = a.plan;
    for (i, step) in plan.steps.iter().enumerate() {
        if run_step(a, step) < 0 {
            fail(a, Stage::Step, i, errno());
        }
    }
    // SAFETY: plain system calls on prepared data.
    unsafe {
        check!(a, Stage::PivotRoot, 0, libc::chdir(plan.staging.as_ptr()));
        check!(
            a,
            Stage::PivotRoot,
            0,
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32
        );
        // The old root is stacked under the new one at "."; detach it entirely.
        check!(
            a,
            Stage::PivotRoot,
            0,
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
        );
        check!(a, Stage::PivotRoot, 0, libc::chdir(c"/".as_ptr()));
        let host = plan.hostname.as_bytes();
        check!(
            a,
            Stage::Hostname,
            0,
            libc::sethostname(host.as_ptr().cast(), host.len())
        );
        check!(
            a,
            Stage::Hostname,
            0,
            libc::setdomainname(c"(none)".as_ptr(), 6)
        );
        if a.loopback_up {
            check!(a, Stage::Loopback, 0, loopback_up());
        }
        // Like vfork: the builder borrows this memory on a stack of its own,
        // and we go on once it has executed the program (or failed to).
        let builder_pid = libc::clone(
            builder_entry,
            a.builder_stack as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (a as *const ChildArgs).cast_mut().cast(),
        );
        check!(a, Stage::ForkBuilder, 0, builder_pid);
        // From the report pipe's end of file on (when the next line has closed
        // it), the caller may free `a`: only copies on our own stack are used.
        let status_w = a.status_w;
        close_all_but(&[status_w]);
        // From here on the spawning thread may be gone: only raw system calls
        // (see `raw`), which leave its thread block alone.
        loop {
            let mut status = 0;
            let pid = raw::wait_any(&mut status);
            if pid == builder_pid as isize {
                raw::write(status_w, &status.to_ne_bytes());
                // Exiting makes the kernel kill and reap every other process in
                // the namespace before our parent sees us exit.
                raw::exit(0);
            }
            if pid < 0 && pid != -(libc::EINTR as isize) {
                raw::exit(126);
            }
        }
    }
}

/// `struct sigaction` as the kernel takes it on x86-64.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: u64,
    restorer: usize,
    mask: u64,
}

extern "C" fn builder_entry(a: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `init` passes its `ChildArgs`, alive while it waits for us.
    builder(unsafe { &*(a as *const ChildArgs) })
}

fn builder(a: &ChildArgs) -> ! {
    let plan = a.plan;
    // SAFETY: plain system calls on prepared data.
    unsafe {
        // The caller's signal mask, ignored signals (Rust ignores SIGPIPE) and
        // umask would otherwise leak into the build.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
        // The raw system call: glibc's wrappers refuse its reserved signals 32 and
        // 33, which a caller may have inherited as ignored too.
        let dfl = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl,
                    ptr::null_mut::<KernelSigaction>(),
                    8,
                );
            }
        }
        libc::umask(0o022);
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        check!(a, Stage::Stdio, 0, null);
        let out = if a.out_fd >= 0 { a.out_fd } else { null };
        check!(a, Stage::Stdio, 0, libc::dup2(null, 0));
        check!(a, Stage::Stdio, 1, libc::dup2(out, 1));
        check!(a, Stage::Stdio, 2, libc::dup2(out, 2));
        if a.pty {
            check!(a, Stage::Stdio, 3, libc::ioctl(1, libc::TIOCSCTTY, 0));
        }
        // Everything else is closed by execve, including the report pipe, whose
        // end-of-file tells the caller that execve succeeded.
        check!(
            a,
            Stage::Stdio,
            4,
            libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32)
        );
        check!(a, Stage::Chdir, 0, libc::chdir(plan.cwd.as_ptr()));

        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check!(
            a,
            Stage::Rlimit,
            0,
            libc::setrlimit(libc::RLIMIT_CORE, &core)
        );
        check!(
            a,
            Stage::Rlimit,
            0,
            libc::setrlimit(libc::RLIMIT_NOFILE, &a.nofile_orig)
        );
        for (i, (res, lim)) in a.rlimits.iter().enumerate() {
            if *res as u32 == libc::RLIMIT_CORE {
                continue;
            }
            check!(a, Stage::Rlimit, i + 1, libc::setrlimit(*res as u32, lim));
        }

        // The bounding set needs CAP_SETPCAP, so it goes before the uid change.
        for cap in 0..=a.cap_last {
            check!(
                a,
                Stage::DropCapabilities,
                cap as usize,
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0)
            );
        }
        check!(
            a,
            Stage::DropCapabilities,
            64,
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0
            )
        );
        if a.set_groups {
            let gid = plan.gid;
            check!(a, Stage::SetUser, 0, raw_setgroups(1, &gid));
        }
        check!(
            a,
            Stage::SetUser,
            1,
            raw_setresgid(plan.gid, plan.gid, plan.gid)
        );
        check!(
            a,
            Stage::SetUser,
            2,
            raw_setresuid(plan.uid, plan.uid, plan.uid)
        );
        for set in [
            caps::CapSet::Effective,
            caps::CapSet::Permitted,
            caps::CapSet::Inheritable,
        ] {
            if caps::clear(None, set).is_err() {
                fail(a, Stage::DropCapabilities, 65, errno());
            }
        }
        if let Err(e) = crate::seccomp::install(a.filter) {
            fail(a, Stage::Seccomp, 0, e);
        }
        libc::execve(plan.program.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
        fail(a, Stage::Exec, 0, errno())
    }
}
