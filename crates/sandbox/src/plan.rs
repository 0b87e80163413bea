//! Turning a [`SandboxSpec`] into a flat list of steps the child executes.
//!
//! Everything that allocates, formats or looks at the host happens here, in the
//! parent, before `fork`: the child side ([`crate::child`]) only walks this list
//! and makes system calls, so it stays correct even when the caller is
//! multi-threaded.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::spec::{Network, SandboxMode, SandboxSpec};

pub(crate) const ATTR_RDONLY: u64 = 0x1;
pub(crate) const ATTR_NOSUID: u64 = 0x2;
pub(crate) const ATTR_NODEV: u64 = 0x4;
pub(crate) const ATTR_NOEXEC: u64 = 0x8;

/// Where a bind mount's source comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// Index into [`Plan::sources`]: cloned as a detached mount tree (`open_tree`)
    /// right after the namespaces are made (while still holding the caller's host
    /// credentials) and attached with `move_mount`, so the sandbox's mapped uid
    /// needs no access to the path, and no path is looked up twice.
    Opened(usize),
    /// A host device node under `/dev`, bound by path.
    Path(CString),
}

#[derive(Debug)]
pub(crate) enum Step {
    MakePrivate,
    Mkdir {
        path: CString,
        mode: u32,
    },
    Touch {
        path: CString,
    },
    Mount {
        fstype: &'static std::ffi::CStr,
        path: CString,
        flags: u64,
        data: CString,
    },
    Bind {
        source: Source,
        path: CString,
        attrs: u64,
    },
    SetAttrs {
        path: CString,
        attrs: u64,
        /// Attributes cleared (only ever on the mount at `path` itself).
        clear: u64,
        recursive: bool,
    },
    /// An overlay on `path` whose lower layer is the directory `path` itself
    /// (on the root tmpfs, holding nested binds' mount points) and whose upper
    /// and work directories are the sources at these indexes. `options` ends in
    /// `lowerdir=…`; the child appends the other two as `/proc/self/fd/N`.
    Overlay {
        options: CString,
        upper: usize,
        work: usize,
        path: CString,
        flags: u64,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    WriteFile {
        path: CString,
        contents: Vec<u8>,
    },
    /// Changes init's working directory, which the relative paths of the
    /// steps after it start from (the binds of a closure's paths, below the
    /// store directory, each look up one name rather than a whole path).
    Chdir {
        path: CString,
    },
}

/// Why a spec cannot be turned into a plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{what} {value:?} contains a NUL byte")]
    Nul { what: &'static str, value: String },
    #[error("{what} {path} must be an absolute, normalised path (no `..`)")]
    NotAbsolute { what: &'static str, path: PathBuf },
    #[error(
        "sandbox path {path} does not exist on the host ({source}); add `?` to make it optional"
    )]
    MissingSource {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub(crate) struct Plan {
    pub staging: CString,
    pub steps: Vec<Step>,
    pub sources: Vec<CString>,
    /// How init opens each source: after changing to the directory given (if
    /// any), by the name given; sources in one directory (a closure's store
    /// paths) each look up one name.
    pub source_opens: Vec<(Option<CString>, CString)>,
    /// Per source: cloned as a mount tree (a bind's), or opened `O_PATH` (an
    /// overlay's directories, named through `/proc/self/fd/N`).
    pub source_trees: Vec<bool>,
    pub hostname: CString,
    pub loopback: bool,
    pub program: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
}

fn cstr(what: &'static str, s: &OsStr) -> Result<CString, PlanError> {
    CString::new(s.as_bytes()).map_err(|_| PlanError::Nul {
        what,
        value: s.to_string_lossy().into_owned(),
    })
}

/// `inside` must be absolute and free of `..`; returns it relative to `/`.
fn relative(what: &'static str, inside: &Path) -> Result<PathBuf, PlanError> {
    let bad = || PlanError::NotAbsolute {
        what,
        path: inside.to_owned(),
    };
    let mut comps = inside.components();
    if comps.next() != Some(Component::RootDir) {
        return Err(bad());
    }
    let mut out = PathBuf::new();
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// A bind made after the root is read-only: writable ones and those below them.
struct Late<'a> {
    bind: &'a crate::spec::Bind,
    rel: PathBuf,
    is_dir: bool,
    /// Below a writable bind (or /dev, /tmp, /proc).
    nested: bool,
    /// Index into the overlays of the one whose lower layer holds the mount point.
    layer: Option<usize>,
    /// Where the mount point is on the host, when it is inside the source of
    /// the writable bind directly enclosing it: the caller may have made it.
    host_point: Option<PathBuf>,
}

struct Builder<'a> {
    staging: &'a Path,
    steps: Vec<Step>,
    made: HashSet<PathBuf>,
}

impl Builder<'_> {
    fn host(&self, rel: &Path) -> Result<CString, PlanError> {
        cstr("path", self.staging.join(rel).as_os_str())
    }

    /// `mkdir -p` inside the new root, each directory once.
    fn mkdirs(&mut self, rel: &Path, mode: u32) -> Result<(), PlanError> {
        if rel.as_os_str().is_empty() || self.made.contains(rel) {
            return Ok(());
        }
        if let Some(parent) = rel.parent() {
            self.mkdirs(parent, 0o755)?;
        }
        let path = self.host(rel)?;
        self.steps.push(Step::Mkdir { path, mode });
        self.made.insert(rel.to_owned());
        Ok(())
    }

    /// Where a bind lands: a directory, or an empty file for a file source.
    fn mount_point(&mut self, rel: &Path, is_dir: bool) -> Result<(), PlanError> {
        if is_dir {
            return self.mkdirs(rel, 0o755);
        }
        if let Some(parent) = rel.parent() {
            self.mkdirs(parent, 0o755)?;
        }
        let path = self.host(rel)?;
        self.steps.push(Step::Touch { path });
        Ok(())
    }

    /// Mounts a file system on an existing directory.
    fn mount_here(
        &mut self,
        rel: &str,
        fstype: &'static std::ffi::CStr,
        flags: u64,
        data: &str,
    ) -> Result<(), PlanError> {
        let path = self.host(Path::new(rel))?;
        self.steps.push(Step::Mount {
            fstype,
            path,
            flags,
            data: CString::new(data).expect("static mount options"),
        });
        Ok(())
    }

    fn write(&mut self, rel: &str, contents: Vec<u8>) -> Result<(), PlanError> {
        let path = self.host(Path::new(rel))?;
        self.steps.push(Step::WriteFile { path, contents });
        Ok(())
    }

    fn symlink(&mut self, target: &str, rel: &str) -> Result<(), PlanError> {
        let link = self.host(Path::new(rel))?;
        self.steps.push(Step::Symlink {
            target: CString::new(target).expect("static target"),
            link,
        });
        Ok(())
    }
}

const MS_NOSUID: u64 = libc::MS_NOSUID;
const MS_NODEV: u64 = libc::MS_NODEV;
const MS_NOEXEC: u64 = libc::MS_NOEXEC;

/// Room left in a mount's option page for what the child appends to an
/// overlay's options (`,upperdir=/proc/self/fd/N,workdir=/proc/self/fd/N`).
pub(crate) const OVERLAY_SUFFIX_MAX: usize = 80;
const MOUNT_DATA_MAX: usize = 4096;

/// An overlay's options up to its `lowerdir=`, with the separators it knows
/// escaped. `volatile`: unmounting it does not sync the upper layer's file
/// system, which would otherwise write back and flush the whole disk at the
/// end of every sandbox (see [`SandboxSpec::bind_rw_layered`]).
fn overlay_options(lower: &CStr) -> Option<CString> {
    let mut opts = b"userxattr,volatile,lowerdir=".to_vec();
    for &c in lower.to_bytes() {
        if matches!(c, b',' | b':' | b'\\') {
            opts.push(b'\\');
        }
        opts.push(c);
    }
    (opts.len() + OVERLAY_SUFFIX_MAX < MOUNT_DATA_MAX).then(|| CString::new(opts).expect("no NUL"))
}

/// `overlay`: lay the binds of [`SandboxSpec::bind_rw_layered`] over a tmpfs
/// (false where overlays turned out not to work: they become plain binds).
pub(crate) fn make_plan(
    spec: &SandboxSpec,
    staging: &Path,
    overlay: bool,
) -> Result<Plan, PlanError> {
    let mut b = Builder {
        staging,
        steps: vec![Step::MakePrivate],
        made: HashSet::new(),
    };
    let root = cstr("staging directory", staging.as_os_str())?;
    b.steps.push(Step::Mount {
        fstype: c"tmpfs",
        path: root.clone(),
        flags: MS_NOSUID | MS_NODEV,
        data: CString::new("mode=0755").unwrap(),
    });

    // The order keeps the number of mount operations low (they dominate the cost
    // of a sandbox): first every directory and file on the root tmpfs, then the
    // read-only binds, then one recursive `mount_setattr` that makes the root and
    // all of those read-only at once, then the writable mounts.

    // Binds below a writable mount (or /dev, /tmp, /proc) are made after it.
    let mut binds: Vec<_> = spec.binds.iter().collect();
    binds.sort_by(|x, y| x.target.components().cmp(y.target.components()));
    let mut late_roots: Vec<PathBuf> = ["dev", "tmp", "proc"].map(PathBuf::from).to_vec();
    let mut early = Vec::new();
    let mut late = Vec::new();
    for bind in binds {
        let rel = relative("bind target", &bind.target)?;
        let is_dir = match bind.is_dir {
            Some(is_dir) => is_dir,
            None => match std::fs::metadata(&bind.source) {
                Ok(m) => m.is_dir(),
                Err(_) if bind.optional || spec.mode == SandboxMode::Relaxed => continue,
                Err(source) => {
                    return Err(PlanError::MissingSource {
                        path: bind.source.clone(),
                        source,
                    });
                }
            },
        };
        let nested = late_roots.iter().any(|r| rel.starts_with(r));
        if bind.writable || nested {
            if !nested {
                late_roots.push(rel.clone());
            }
            late.push(Late {
                bind,
                rel,
                is_dir,
                nested,
                layer: None,
                host_point: None,
            });
        } else {
            early.push((bind, rel, is_dir));
        }
    }
    // A writable bind asked to be layered gets an overlay when it is a
    // directory on the root with binds below it; those directly below it
    // (not below another bind under it) have their mount points on the root
    // tmpfs, its lower layer. With nothing below it there are no mount
    // points to keep off the disk, and a plain bind saves the overlay.
    let mut layers: Vec<(PathBuf, CString, PathBuf)> = Vec::new();
    if overlay {
        for l in &late {
            let Some((_, work)) = spec.layered.iter().find(|(t, _)| *t == l.bind.target) else {
                continue;
            };
            if !l.bind.writable || l.nested || !l.is_dir {
                continue;
            }
            if !late
                .iter()
                .any(|m| m.nested && m.rel != l.rel && m.rel.starts_with(&l.rel))
            {
                continue;
            }
            if let Some(options) = overlay_options(&b.host(&l.rel)?) {
                if std::fs::metadata(work).is_err() {
                    return Err(PlanError::MissingSource {
                        path: work.clone(),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    });
                }
                layers.push((l.rel.clone(), options, work.clone()));
            }
        }
    }
    // One pass in sorted order, with the chain of binds enclosing the current
    // one, finds where each nested bind lands and which writable binds have
    // only read-only binds below them: those (a store directory with its input
    // closure) get everything below made read-only in one recursive pass, then
    // themselves writable again, instead of one pass per nested bind.
    let mut enclosing: Vec<usize> = Vec::new();
    let mut batchable: Vec<bool> = late.iter().map(|l| !l.rel.starts_with("dev")).collect();
    for i in 0..late.len() {
        while let Some(&top) = enclosing.last() {
            if late[i].rel.starts_with(&late[top].rel) {
                break;
            }
            enclosing.pop();
        }
        if late[i].nested {
            // Directly on the innermost enclosing bind (or on /dev, /tmp, /proc).
            if let Some(&parent) = enclosing.last() {
                late[i].layer = layers.iter().position(|(w, _, _)| *w == late[parent].rel);
                if late[parent].bind.writable {
                    let below = late[i]
                        .rel
                        .strip_prefix(&late[parent].rel)
                        .unwrap_or(&late[i].rel);
                    late[i].host_point = Some(late[parent].bind.source.join(below));
                }
            }
            if late[i].bind.writable {
                if let Some(&root) = enclosing.first() {
                    batchable[root] = false;
                }
            }
        }
        enclosing.push(i);
    }
    let batched: Vec<PathBuf> = late
        .iter()
        .zip(&batchable)
        .filter(|(w, ok)| **ok && w.bind.writable && !w.nested)
        .map(|(w, _)| w.rel.clone())
        .collect();

    b.mkdirs(Path::new("proc"), 0o555)?;
    b.mkdirs(Path::new("dev"), 0o755)?;
    b.mkdirs(Path::new("tmp"), 0o755)?;
    b.mkdirs(Path::new("etc"), 0o755)?;
    let home = spec.home.to_string_lossy();
    b.write(
        "etc/passwd",
        format!(
            "root:x:0:0:Nix build user:{home}:/noshell\n\
             {user}:x:{uid}:{gid}:Nix build user:{home}:/noshell\n\
             nobody:x:65534:65534:Nobody:/:/noshell\n",
            user = spec.user_name,
            uid = spec.uid,
            gid = spec.gid,
        )
        .into_bytes(),
    )?;
    b.write(
        "etc/group",
        format!(
            "root:x:0:\n{group}:!:{gid}:\nnogroup:x:65534:\n",
            group = spec.group_name,
            gid = spec.gid
        )
        .into_bytes(),
    )?;
    b.write(
        "etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
    )?;
    if spec.network == Network::Host {
        for file in ["resolv.conf", "services"] {
            // Copied rather than bound: the host's may be a symlink into /run.
            if let Ok(contents) = std::fs::read(Path::new("/etc").join(file)) {
                b.write(&format!("etc/{file}"), contents)?;
            }
        }
        b.write(
            "etc/nsswitch.conf",
            b"hosts: files dns\nservices: files\n".to_vec(),
        )?;
    }
    // Mount points on the root for everything not nested in a later mount.
    for (_, rel, is_dir) in &early {
        b.mount_point(rel, *is_dir)?;
    }
    for l in &late {
        if !l.nested || l.layer.is_some() {
            b.mount_point(&l.rel, l.is_dir)?;
        }
    }
    // Symlinks last on the root: every directory a bind needs exists by now, so
    // a symlink can never redirect where a bind lands.
    for (link, target) in &spec.symlinks {
        let rel = relative("symlink", link)?;
        if let Some(parent) = rel.parent() {
            b.mkdirs(parent, 0o755)?;
        }
        let link = b.host(&rel)?;
        b.steps.push(Step::Symlink {
            target: cstr("symlink target", target.as_os_str())?,
            link,
        });
    }

    let mut sources = Vec::new();
    let mut overlay_dirs = Vec::new();
    // `path`: where the bind lands, whole or relative to init's directory.
    let bind_step = |b: &mut Builder,
                     sources: &mut Vec<CString>,
                     bind: &crate::spec::Bind,
                     path: CString,
                     attrs: u64| {
        sources.push(cstr("bind source", bind.source.as_os_str())?);
        b.steps.push(Step::Bind {
            source: Source::Opened(sources.len() - 1),
            path,
            attrs,
        });
        Ok::<(), PlanError>(())
    };
    for (bind, rel, _) in &early {
        let path = b.host(rel)?;
        bind_step(&mut b, &mut sources, bind, path, 0)?;
    }
    b.steps.push(Step::SetAttrs {
        path: root.clone(),
        attrs: ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV,
        clear: 0,
        recursive: true,
    });

    b.mount_here("proc", c"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "")?;
    b.mount_here("dev", c"tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let path = b.host(&Path::new("dev").join(node))?;
        b.steps.push(Step::Touch { path: path.clone() });
        b.steps.push(Step::Bind {
            source: Source::Path(CString::new(format!("/dev/{node}")).unwrap()),
            path,
            attrs: ATTR_NOSUID | ATTR_NOEXEC,
        });
    }
    b.mkdirs(Path::new("dev/shm"), 0o755)?;
    b.mount_here(
        "dev/shm",
        c"tmpfs",
        MS_NOSUID | MS_NODEV,
        "mode=1777,size=50%",
    )?;
    b.mkdirs(Path::new("dev/pts"), 0o755)?;
    b.mount_here(
        "dev/pts",
        c"devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    b.symlink("pts/ptmx", "dev/ptmx")?;
    b.symlink("/proc/self/fd", "dev/fd")?;
    b.symlink("/proc/self/fd/0", "dev/stdin")?;
    b.symlink("/proc/self/fd/1", "dev/stdout")?;
    b.symlink("/proc/self/fd/2", "dev/stderr")?;
    b.mount_here("tmp", c"tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")?;

    // A mount point already in a writable bind's source (a recycled build
    // directory's, see `BuildDir::sibling_with_mount_points`) is used as it
    // is: nothing to create, nothing to free afterwards. Each such directory
    // is read once, rather than a `stat` per mount point.
    let mut listed: HashMap<&Path, HashMap<std::ffi::OsString, std::fs::FileType>> = HashMap::new();
    let mut cwd: Option<PathBuf> = None;
    for l in &late {
        let made = l.host_point.as_ref().is_some_and(|p| {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                return false;
            };
            let entries = listed.entry(dir).or_insert_with(|| {
                std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| Some((e.file_name(), e.file_type().ok()?)))
                    .collect()
            });
            entries
                .get(name)
                .is_some_and(|t| if l.is_dir { t.is_dir() } else { t.is_file() })
        });
        if l.nested && l.layer.is_none() && !made {
            b.mount_point(&l.rel, l.is_dir)?;
        }
        if let Some((_, options, work)) = layers.iter().find(|(w, _, _)| *w == l.rel) {
            sources.push(cstr("bind source", l.bind.source.as_os_str())?);
            sources.push(cstr("overlay work directory", work.as_os_str())?);
            overlay_dirs.extend([sources.len() - 2, sources.len() - 1]);
            let path = b.host(&l.rel)?;
            b.steps.push(Step::Overlay {
                options: options.clone(),
                upper: sources.len() - 2,
                work: sources.len() - 1,
                path,
                flags: MS_NOSUID | MS_NODEV,
            });
            continue;
        }
        // Device nodes asked for under /dev (e.g. /dev/kvm) must stay usable.
        let mut attrs = if l.rel.starts_with("dev") {
            ATTR_NOSUID
        } else {
            ATTR_NOSUID | ATTR_NODEV
        };
        if !l.bind.writable {
            attrs |= ATTR_RDONLY;
        }
        if l.nested && batched.iter().any(|w| l.rel.starts_with(w)) {
            attrs = 0;
        }
        let host = staging.join(&l.rel);
        let path = match (l.nested, host.parent(), host.file_name()) {
            (true, Some(dir), Some(name)) => {
                if cwd.as_deref() != Some(dir) {
                    b.steps.push(Step::Chdir {
                        path: cstr("path", dir.as_os_str())?,
                    });
                    cwd = Some(dir.to_owned());
                }
                cstr("path", name)?
            }
            _ => b.host(&l.rel)?,
        };
        bind_step(&mut b, &mut sources, l.bind, path, attrs)?;
    }
    for w in &batched {
        let path = b.host(w)?;
        b.steps.push(Step::SetAttrs {
            path: path.clone(),
            attrs: ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV,
            clear: 0,
            recursive: true,
        });
        b.steps.push(Step::SetAttrs {
            path,
            attrs: 0,
            clear: ATTR_RDONLY,
            recursive: false,
        });
    }

    // Nothing may be created in /dev by the builder.
    let dev = b.host(Path::new("dev"))?;
    b.steps.push(Step::SetAttrs {
        path: dev,
        attrs: ATTR_RDONLY,
        clear: 0,
        recursive: false,
    });

    let program = cstr("program", spec.program.as_os_str())?;
    let arg0 = match &spec.arg0 {
        Some(arg0) => cstr("argv[0]", arg0)?,
        None => program.clone(),
    };
    let mut argv = vec![arg0];
    for a in &spec.args {
        argv.push(cstr("argument", a)?);
    }
    let mut envp = Vec::new();
    for (k, v) in &spec.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(CString::new(kv).map_err(|_| PlanError::Nul {
            what: "environment variable",
            value: k.to_string_lossy().into_owned(),
        })?);
    }
    relative("working directory", &spec.cwd)?;
    Ok(Plan {
        staging: root,
        steps: b.steps,
        source_opens: source_opens(&sources),
        source_trees: (0..sources.len())
            .map(|i| !overlay_dirs.contains(&i))
            .collect(),
        sources,
        hostname: cstr("hostname", OsStr::new(&spec.hostname))?,
        loopback: spec.network == Network::None,
        program,
        argv,
        envp,
        cwd: cstr("working directory", spec.cwd.as_os_str())?,
        uid: spec.uid,
        gid: spec.gid,
    })
}

/// `(directory to change to first, name)` for each path; the directory only
/// where it differs from the previous path's.
fn source_opens(paths: &[CString]) -> Vec<(Option<CString>, CString)> {
    let mut cwd: Option<&[u8]> = None;
    paths
        .iter()
        .map(|p| {
            let bytes = p.to_bytes();
            match bytes.iter().rposition(|&c| c == b'/') {
                Some(i) if i + 1 < bytes.len() => {
                    let (dir, name) = (&bytes[..i.max(1)], &bytes[i + 1..]);
                    let chdir = (cwd != Some(dir)).then(|| CString::new(dir).expect("no NUL"));
                    cwd = Some(dir);
                    (chdir, CString::new(name).expect("no NUL"))
                }
                _ => (None, p.clone()),
            }
        })
        .collect()
}

impl Plan {
    /// What step `index` does, for error messages, with the paths of steps
    /// that follow a [`Step::Chdir`] made whole.
    pub(crate) fn describe(&self, index: usize) -> String {
        let cwd = self.steps[..index].iter().rev().find_map(|s| match s {
            Step::Chdir { path } => Some(Path::new(OsStr::from_bytes(path.to_bytes()))),
            _ => None,
        });
        self.steps[index].describe(self, cwd)
    }
}

impl Step {
    /// What this step does, for error messages; relative paths are below `cwd`.
    fn describe(&self, plan: &Plan, cwd: Option<&Path>) -> String {
        let s = |c: &CString| {
            let p = Path::new(OsStr::from_bytes(c.to_bytes()));
            match cwd {
                Some(dir) if p.is_relative() => dir.join(p).to_string_lossy().into_owned(),
                _ => p.to_string_lossy().into_owned(),
            }
        };
        match self {
            Step::MakePrivate => "making the mount tree private".into(),
            Step::Mkdir { path, .. } => format!("creating directory {}", s(path)),
            Step::Touch { path } => format!("creating mount point {}", s(path)),
            Step::Mount { fstype, path, .. } => {
                format!("mounting {} on {}", fstype.to_string_lossy(), s(path))
            }
            Step::Bind { source, path, .. } => {
                let src = match source {
                    Source::Opened(i) => s(&plan.sources[*i]),
                    Source::Path(p) => s(p),
                };
                format!("bind-mounting {src} on {}", s(path))
            }
            Step::SetAttrs { path, .. } => format!("setting mount attributes of {}", s(path)),
            Step::Overlay { path, upper, .. } => format!(
                "mounting an overlay of {} on {}",
                s(&plan.sources[*upper]),
                s(path)
            ),
            Step::Symlink { link, .. } => format!("creating symlink {}", s(link)),
            Step::WriteFile { path, .. } => format!("writing {}", s(path)),
            Step::Chdir { path } => format!("entering directory {}", s(path)),
        }
    }
}
