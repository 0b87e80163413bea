//! Shared pieces of the sandbox tests: a spec that runs the probe builder with the
//! host's /usr bound read-only (for its shared libraries), and a runner.

#![allow(dead_code)]

use std::io::Read;
use std::process::ExitStatus;

use kiln_sandbox::{Sandbox, SandboxSpec};

pub const PROBE: &str = env!("CARGO_BIN_EXE_kiln-sandbox-probe");

/// The probe at a path every user can reach (the work tree may sit in a private
/// directory, but the tests also run sandboxes as uid 65534): a hard link, or a
/// copy, in a per-process directory under the temp dir. Leftovers of dead test
/// processes are removed first.
pub fn probe_path() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let tmp = std::env::temp_dir();
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("kiln-sandbox-probe-"))
                else {
                    continue;
                };
                if !std::path::Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("kiln-sandbox-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("probe");
        if std::fs::hard_link(PROBE, &path).is_err() {
            std::fs::copy(PROBE, &path).unwrap();
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    })
}

/// A sandbox that runs `/probe ARGS…`.
pub fn probe(args: &[&str]) -> SandboxSpec {
    with_host_usr(SandboxSpec::new("/probe").args(args.iter().copied()))
}

/// `spec` with the probe at `/probe` and the host's /usr (and merged-usr links).
pub fn with_host_usr(spec: SandboxSpec) -> SandboxSpec {
    spec.bind_ro(probe_path(), "/probe")
        .bind_ro("/usr", "/usr")
        .symlink("/lib", "usr/lib")
        .symlink("/lib64", "usr/lib64")
        .symlink("/bin", "usr/bin")
}

/// Runs the spec to the end; returns its status and its output.
pub fn run(spec: SandboxSpec) -> (ExitStatus, String) {
    let mut child = Sandbox::spawn(spec).expect("sandbox starts");
    let mut out = String::new();
    child
        .take_output()
        .expect("output pipe")
        .read_to_string(&mut out)
        .expect("read output");
    let status = child.wait().expect("wait");
    (status, out)
}

/// The line of `out` that starts with `prefix`.
pub fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in output:\n{out}"))
}

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use kiln_sandbox::{BuildDir, BuildDirs, UidRange};

/// Who runs the sandbox in a test: root (what CI is) or an ordinary user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Root,
    Nobody,
}

pub const NOBODY: u32 = 65534;

/// A build directory for one test build, owned by the build user, plus the uid
/// range the sandbox must use for that ownership to be right.
pub struct Build {
    pub dirs: BuildDirs,
    pub dir: Option<BuildDir>,
    pub range: Option<UidRange>,
    pub owner: Option<(u32, u32)>,
}

impl Build {
    pub fn new(top: &Path) -> Build {
        let dirs = BuildDirs::open(top).expect("build dirs");
        let (range, owner) = if unsafe { libc::geteuid() } == 0 {
            let r = UidRange::allocate(Path::new(kiln_sandbox::spawn::DEFAULT_UID_LOCK_DIR), 128)
                .expect("uid range");
            let owner = (r.host_id(1000), r.host_id(100));
            (Some(r), Some(owner))
        } else {
            (None, None)
        };
        let dir = dirs.create("test", owner).expect("build dir");
        Build {
            dirs,
            dir: Some(dir),
            range,
            owner,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// The probe spec with this build directory at /build (and cwd there).
    pub fn spec(&mut self, args: &[&str]) -> SandboxSpec {
        let mut spec = probe(args).bind_rw(self.path(), "/build").cwd("/build");
        if let Some(r) = &self.range {
            spec = spec.uid_range(r.clone());
        }
        spec
    }
}

/// Runs `f` in a forked child as `caller` and returns its verdict. The child
/// switches to uid/gid 65534 for `Caller::Nobody`.
pub fn as_caller(caller: Caller, f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    if caller == Caller::Root {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests run as root (as CI does)"
        );
        return f();
    }
    // Prepared while still root: the forked child could not reach the original.
    probe_path();
    // A forked child would wait forever on a OnceLock that another test thread was
    // initialising at the moment of the fork.
    kiln_sandbox::seccomp::filter();
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let verdict = (|| {
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                    || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0
                {
                    return Err("cannot become nobody".to_string());
                }
            }
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                Ok(v) => v,
                Err(e) => Err(e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into())),
            }
        })();
        let msg = match verdict {
            Ok(()) => "OK".to_string(),
            Err(e) => format!("ERR {e}"),
        };
        unsafe {
            libc::write(w.as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(0);
        }
    }
    drop(w);
    let mut msg = String::new();
    std::fs::File::from(r).read_to_string(&mut msg).unwrap();
    let mut st = 0;
    unsafe { libc::waitpid(pid, &mut st, 0) };
    match msg.strip_prefix("ERR ") {
        _ if msg == "OK" => Ok(()),
        Some(e) => Err(e.to_string()),
        None => Err(format!(
            "child as nobody died without a verdict (status {st:#x})"
        )),
    }
}

/// A temporary directory that `caller` may write.
pub fn tempdir_for(caller: Caller) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    if caller == Caller::Nobody {
        std::os::unix::fs::chown(d.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    d
}

/// Fails with `msg` unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}
