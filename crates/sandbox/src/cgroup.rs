//! An optional cgroup v2 per sandbox: memory and pid limits, CPU accounting and
//! kill-all.
//!
//! Best effort by design: many machines have no writable cgroup2 hierarchy, or
//! one without the `memory`/`pids` controllers (a hybrid v1/v2 setup). The build
//! then runs without (or with only what is there) and
//! [`crate::Child::cgroup_status`] says what is missing. Isolation never depends on
//! it: the PID namespace alone guarantees that every process dies with the build.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::CgroupLimits;

/// What became of the cgroup a spec asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupStatus {
    /// The spec asked for none.
    NotRequested,
    /// Created, with every requested limit applied.
    Active,
    /// Created (kill-all and CPU accounting work) but some limits could not be
    /// applied; says which and why.
    Partial(String),
    /// No cgroup; says why.
    Unavailable(String),
}

/// One sandbox's cgroup directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    partial: Option<String>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The cgroup2 mount point and this process's cgroup below it.
fn own_cgroup() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let mount = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2").then(|| left.split(' ').nth(4))?
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process has no cgroup2 membership")?;
    Ok(Path::new(mount).join(rel.trim_start_matches('/')))
}

impl Cgroup {
    /// Creates a fresh cgroup beside nothing else (a child of ours) and applies the
    /// limits that the available controllers allow.
    pub(crate) fn create(limits: &CgroupLimits) -> Result<Cgroup, String> {
        let parent = own_cgroup()?;
        let name = format!(
            "kiln-sandbox-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = parent.join(name);
        std::fs::create_dir(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let mut missing = Vec::new();
        let available =
            std::fs::read_to_string(path.join("cgroup.controllers")).unwrap_or_default();
        for (controller, file, value) in [
            ("memory", "memory.max", limits.memory_max),
            ("pids", "pids.max", limits.pids_max),
        ] {
            let Some(value) = value else { continue };
            if !available.split_whitespace().any(|c| c == controller) {
                // Enabling it in our own cgroup is refused when we hold processes
                // there (the no-internal-process rule); try, then report.
                let _ = std::fs::write(
                    parent.join("cgroup.subtree_control"),
                    format!("+{controller}"),
                );
            }
            if let Err(e) = std::fs::write(path.join(file), value.to_string()) {
                missing.push(format!(
                    "{file}: {e} (the {controller} controller is not enabled for {})",
                    parent.display()
                ));
            }
        }
        Ok(Cgroup {
            path,
            partial: (!missing.is_empty()).then(|| missing.join("; ")),
        })
    }

    /// Why some limits are missing, if they are.
    pub fn partial(&self) -> Option<&str> {
        self.partial.as_deref()
    }

    /// Moves `pid` (and its future children) into the cgroup.
    pub(crate) fn add(&self, pid: i32) -> io::Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
    }

    /// Kills every process in the cgroup (Linux 5.14+; ignored before).
    pub(crate) fn kill(&self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
    }

    /// Total CPU time of the cgroup so far.
    pub fn cpu_usage_usec(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(self.path.join("cpu.stat")).ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Removes the (now empty) cgroup.
    pub(crate) fn finish(self) {
        self.kill();
        let _ = std::fs::remove_dir(&self.path);
    }
}
