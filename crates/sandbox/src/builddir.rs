//! Build directories: created, handed over and removed without trusting their
//! contents.
//!
//! Layout: `<top>/<prefix>-<pid>-<n>/build`, where `<top>` is owned by the caller
//! with mode 0700 (other users cannot reach anything below it, whatever modes the
//! builder gives its files: CVE-2024-38531), must not be a symlink and is never a
//! world-writable directory itself (CVE-2025-52991); the `<prefix>-…` directory is
//! 0700 and owned by the caller; `build` is the directory bound at `/build` and
//! owned by the build user.
//!
//! Everything below `<top>` is handled through directory file descriptors opened
//! with `O_NOFOLLOW`: a builder that replaces part of its directory with a symlink
//! to elsewhere (CVE-2025-46415, CVE-2025-52993) only ever gets the symlink itself
//! removed or re-owned. Permissions are reset before deletion and when a failed
//! build's directory is kept (CVE-2025-52992).
//!
//! A finished build's directory can be [recycled](BuildDir::recycle) instead of
//! removed: its contents go, but the `<prefix>-…` directory and its
//! subdirectories stay for the next build of this process. Each build then
//! frees and allocates no inodes of its own, which matters on file systems
//! where allocating an inode costs more the more were freed recently (ext4
//! without a journal scans past every inode freed in the last minute or more).

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What went wrong with a build directory, and where.
#[derive(Debug, thiserror::Error)]
pub enum BuildDirError {
    #[error("cannot create or open the build-directory parent {path}: {source}")]
    Top { path: PathBuf, source: io::Error },
    #[error(
        "the build-directory parent {path} is owned by uid {owner}, expected uid {expected}; remove it or pick another location"
    )]
    TopOwner {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("cannot create build directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot remove build directory {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot reset permissions in build directory {path}: {source}")]
    Reset { path: PathBuf, source: io::Error },
}

/// The root-owned (caller-owned) 0700 directory that holds all build directories.
#[derive(Debug, Clone)]
pub struct BuildDirs {
    inner: Arc<Top>,
}

#[derive(Debug)]
struct Top {
    path: PathBuf,
    fd: OwnedFd,
    /// Emptied build directories of this process, ready for the next build.
    idle: Mutex<Vec<Idle>>,
}

/// An emptied `<prefix>-<pid>-<n>` directory.
#[derive(Debug)]
struct Idle {
    prefix: String,
    name: CString,
    outer: OwnedFd,
    points: Option<MountPoints>,
}

/// The empty mount points kept in one sibling directory (see
/// [`BuildDir::sibling_with_mount_points`]): name → whether a directory.
#[derive(Debug)]
struct MountPoints {
    dir: CString,
    names: HashMap<CString, bool>,
}

/// How many emptied build directories a process keeps: more than the builds
/// that usually run at once, few enough that keeping them costs nothing.
const MAX_IDLE: usize = 32;

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Top {
    /// Removes `<top>/<name>`, whose descriptor is `outer`, and all below it.
    fn remove(&self, name: &CStr, outer: OwnedFd) -> io::Result<()> {
        clear(outer.as_raw_fd(), Keep::Nothing)?;
        drop(outer);
        // SAFETY: valid fd and C string.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// An emptied directory made with `prefix`, if one is idle.
    fn take_idle(&self, prefix: &str) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let i = idle.iter().rposition(|d| d.prefix == prefix)?;
        Some(idle.swap_remove(i))
    }
}

impl Drop for Top {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(|p| p.into_inner()));
        for d in idle {
            let _ = self.remove(&d.name, d.outer);
        }
    }
}

impl BuildDirs {
    /// Opens `top`, creating it (and missing parents) if needed. It must be owned by
    /// the calling user; its mode is forced to 0700.
    pub fn open(top: &Path) -> Result<BuildDirs, BuildDirError> {
        let err = |source| BuildDirError::Top {
            path: top.to_owned(),
            source,
        };
        if let Some(parent) = top.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let c = cstring(top.as_os_str());
        // SAFETY: valid C string.
        if unsafe { libc::mkdir(c.as_ptr(), 0o700) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(err(e));
            }
        }
        let fd = open_fd(
            libc::AT_FDCWD,
            &c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
        .map_err(err)?;
        let st = fstat(fd.as_raw_fd()).map_err(err)?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if st.st_uid != me {
            return Err(BuildDirError::TopOwner {
                path: top.to_owned(),
                owner: st.st_uid,
                expected: me,
            });
        }
        if st.st_mode & 0o7777 != 0o700 {
            // SAFETY: fd is open.
            if unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) } != 0 {
                return Err(err(io::Error::last_os_error()));
            }
        }
        Ok(BuildDirs {
            inner: Arc::new(Top {
                path: top.to_owned(),
                fd,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The parent directory's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Creates an empty build directory whose `build` subdirectory belongs to
    /// `owner` (host uid, gid), typically the build user's mapped ids. It is a
    /// recycled one when one is idle.
    pub fn create(
        &self,
        prefix: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<BuildDir, BuildDirError> {
        let top = &self.inner;
        while let Some(idle) = top.take_idle(prefix) {
            match reuse(&idle, owner) {
                Ok(()) => {
                    let path = top.path.join(OsStr::from_bytes(idle.name.as_bytes()));
                    return Ok(BuildDir {
                        top: top.clone(),
                        prefix: idle.prefix,
                        name: idle.name,
                        outer: Some(idle.outer),
                        path: path.join("build"),
                        points: idle.points,
                    });
                }
                // Changed under us: not reused, and removed if possible.
                Err(_) => drop(top.remove(&idle.name, idle.outer)),
            }
        }
        loop {
            let name = format!(
                "{prefix}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let path = top.path.join(&name);
            let err = |source| BuildDirError::Create {
                path: path.clone(),
                source,
            };
            let cname = cstring(OsStr::new(&name));
            // SAFETY: valid fd and C string.
            if unsafe { libc::mkdirat(top.fd.as_raw_fd(), cname.as_ptr(), 0o700) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EEXIST) {
                    continue; // a leftover of an earlier process with the same pid
                }
                return Err(err(e));
            }
            let outer = open_fd(
                top.fd.as_raw_fd(),
                &cname,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            )
            .map_err(err)?;
            // SAFETY: valid fd; mkdir's mode was filtered by the umask.
            unsafe { libc::fchmod(outer.as_raw_fd(), 0o700) };
            let build = c"build";
            // SAFETY: valid fd and C string.
            if unsafe { libc::mkdirat(outer.as_raw_fd(), build.as_ptr(), 0o700) } != 0 {
                return Err(err(io::Error::last_os_error()));
            }
            let inner = open_fd(
                outer.as_raw_fd(),
                build,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            )
            .map_err(err)?;
            // SAFETY: valid fd.
            unsafe { libc::fchmod(inner.as_raw_fd(), 0o700) };
            if let Some((uid, gid)) = owner {
                // SAFETY: valid fd.
                if unsafe { libc::fchown(inner.as_raw_fd(), uid, gid) } != 0 {
                    return Err(err(io::Error::last_os_error()));
                }
            }
            return Ok(BuildDir {
                top: self.inner.clone(),
                prefix: prefix.to_owned(),
                name: cname,
                outer: Some(outer),
                path: path.join("build"),
                points: None,
            });
        }
    }
}

/// One build's directory. Dropping it removes it (errors ignored); call
/// [`BuildDir::remove`] to see them, or [`BuildDir::keep`] to keep a failed build's
/// tree for inspection.
#[derive(Debug)]
pub struct BuildDir {
    top: Arc<Top>,
    prefix: String,
    name: CString,
    outer: Option<OwnedFd>,
    path: PathBuf,
    points: Option<MountPoints>,
}

impl BuildDir {
    /// The host path to bind at `/build`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A directory beside `build` (inside the private parent), created if it is
    /// missing, with mode 0755 and owned by `owner`: for what a build needs
    /// beside its `/build`, such as the scratch store its outputs are written
    /// to. It survives recycling, emptied.
    pub fn sibling(&self, name: &str, owner: Option<(u32, u32)>) -> Result<PathBuf, BuildDirError> {
        self.open_sibling(name, owner).map(|(path, _, _)| path)
    }

    /// [`BuildDir::sibling`], and the directory open, and whether it is new.
    fn open_sibling(
        &self,
        name: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<(PathBuf, OwnedFd, bool), BuildDirError> {
        let outer = self.outer.as_ref().expect("present until removed");
        let path = self.path.with_file_name(name);
        let err = |source| BuildDirError::Create {
            path: path.clone(),
            source,
        };
        let cname = cstring(OsStr::new(name));
        let open = || {
            open_fd(
                outer.as_raw_fd(),
                &cname,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            )
        };
        let mut fresh = true;
        // SAFETY: valid fd and C string.
        if unsafe { libc::mkdirat(outer.as_raw_fd(), cname.as_ptr(), 0o755) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(err(e));
            }
            fresh = false;
        }
        let mut dir = open().map_err(err)?;
        if !fresh && !flags_as_fresh(dir.as_raw_fd(), outer.as_raw_fd()).map_err(err)? {
            // Made again rather than trusted (it was emptied when recycled).
            drop(dir);
            // SAFETY: valid fd and C string.
            let removed =
                unsafe { libc::unlinkat(outer.as_raw_fd(), cname.as_ptr(), libc::AT_REMOVEDIR) };
            // SAFETY: valid fd and C string.
            if removed != 0
                || unsafe { libc::mkdirat(outer.as_raw_fd(), cname.as_ptr(), 0o755) } != 0
            {
                return Err(err(io::Error::last_os_error()));
            }
            dir = open().map_err(err)?;
            fresh = true;
        }
        set_owner_and_mode(dir.as_raw_fd(), owner, 0o755).map_err(err)?;
        Ok((path, dir, fresh))
    }

    /// A sibling directory (see [`BuildDir::sibling`]) holding, empty, the
    /// mount points named in `points` (`true` for a directory, `false` for a
    /// file), made by the caller's user, and nothing else: for binds below
    /// it in a sandbox (a build's input closure below its scratch store),
    /// which then uses them as they are.
    ///
    /// They survive recycling: the next build of this directory makes only
    /// the ones it lacks and removes only the ones it does not want, instead
    /// of creating and freeing an inode per input. When recycled, a mount
    /// point is kept only if it is still the empty directory (or file) made
    /// here, of the caller's user: a builder can only have removed or
    /// replaced it while nothing was bound over it, and its replacements go.
    pub fn sibling_with_mount_points(
        &mut self,
        name: &str,
        owner: Option<(u32, u32)>,
        points: impl IntoIterator<Item = (CString, bool)>,
    ) -> Result<PathBuf, BuildDirError> {
        let (path, dir, fresh) = self.open_sibling(name, owner)?;
        let cname = cstring(OsStr::new(name));
        let mut have = match self.points.take() {
            Some(p) if p.dir == cname && !fresh => p.names,
            _ => HashMap::new(),
        };
        let wanted: HashMap<CString, bool> = points.into_iter().collect();
        let result = (|| {
            for (point, is_dir) in &have {
                if wanted.get(point) != Some(is_dir) {
                    remove_entry(dir.as_raw_fd(), point)?;
                }
            }
            have.retain(|point, is_dir| wanted.get(point) == Some(is_dir));
            // File mount points are links to one empty file: a link costs no
            // inode (on ext4 without a journal, allocating one shortly after
            // others were freed scans past them).
            let mut model = have
                .iter()
                .find(|&(_, &is_dir)| !is_dir)
                .map(|(point, _)| point.clone());
            for (point, &is_dir) in &wanted {
                if have.contains_key(point) {
                    continue;
                }
                match &model {
                    Some(m) if !is_dir && link_mount_point(dir.as_raw_fd(), m, point).is_ok() => {}
                    _ => {
                        make_mount_point(dir.as_raw_fd(), point, is_dir)?;
                        if !is_dir {
                            model = Some(point.clone());
                        }
                    }
                }
                have.insert(point.clone(), is_dir);
            }
            Ok(())
        })();
        // What is recorded is what exists, even after a failure.
        self.points = Some(MountPoints {
            dir: cname,
            names: have,
        });
        result.map_err(|source| BuildDirError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Resets every entry below the directory: owner set to `owner` (without
    /// following symlinks), setuid/setgid/sticky bits and group/other write removed,
    /// directories 0700. The directory stays inside the 0700 parent.
    pub fn reset_permissions(&self, owner: Option<(u32, u32)>) -> Result<(), BuildDirError> {
        let outer = self.outer.as_ref().expect("present until removed");
        walk_reset(outer.as_raw_fd(), owner).map_err(|source| BuildDirError::Reset {
            path: self.path.clone(),
            source,
        })
    }

    /// Keeps the tree (for `--keep-failed`) with permissions reset and owned by
    /// `owner`; returns its path.
    pub fn keep(mut self, owner: Option<(u32, u32)>) -> Result<PathBuf, BuildDirError> {
        self.reset_permissions(owner)?;
        self.outer = None;
        Ok(self.path.clone())
    }

    /// Removes the tree, never following a symlink the builder planted.
    pub fn remove(mut self) -> Result<(), BuildDirError> {
        self.remove_inner()
    }

    /// Empties the tree, never following a symlink the builder planted, and
    /// keeps it for a later [`BuildDirs::create`] of this process; removes it
    /// when enough are idle already. Only for a directory that nothing else
    /// can still reach: a process that kept a descriptor of it (a
    /// fixed-output build's helper outside, over the host's network) would
    /// reach the next build in it. Such a directory is [removed](Self::remove).
    pub fn recycle(mut self) -> Result<(), BuildDirError> {
        let Some(outer) = self.outer.take() else {
            return Ok(());
        };
        let top = self.top.clone();
        let err = |source| BuildDirError::Remove {
            path: self.path.clone(),
            source,
        };
        let idle = || top.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle().len() >= MAX_IDLE {
            return top.remove(&self.name, outer).map_err(err);
        }
        let mut points = self.points.take();
        let cleared = match &mut points {
            Some(p) => prune(outer.as_raw_fd(), p),
            None => Ok(()),
        }
        .and_then(|()| {
            let skip = points.as_ref().map(|p| p.dir.as_c_str());
            clear(outer.as_raw_fd(), Keep::Subdirs { skip })
        });
        if let Err(e) = cleared {
            let _ = top.remove(&self.name, outer);
            return Err(err(e));
        }
        idle().push(Idle {
            prefix: std::mem::take(&mut self.prefix),
            name: self.name.clone(),
            outer,
            points,
        });
        Ok(())
    }

    fn remove_inner(&mut self) -> Result<(), BuildDirError> {
        let Some(outer) = self.outer.take() else {
            return Ok(());
        };
        self.top
            .remove(&self.name, outer)
            .map_err(|source| BuildDirError::Remove {
                path: self.path.clone(),
                source,
            })
    }
}

/// Readies an idle directory for its next build: `build` (checked to be the
/// directory it was) made 0700 and `owner`'s.
fn reuse(idle: &Idle, owner: Option<(u32, u32)>) -> io::Result<()> {
    let build = open_fd(
        idle.outer.as_raw_fd(),
        c"build",
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )?;
    if !flags_as_fresh(build.as_raw_fd(), idle.outer.as_raw_fd())? {
        return Err(io::Error::other(
            "a builder changed the directory's inode flags",
        ));
    }
    set_owner_and_mode(build.as_raw_fd(), owner, 0o700)
}

/// Inode flags that describe a directory's layout, not its behaviour: the
/// file system sets them as a directory grows.
const LAYOUT_FLAGS: libc::c_long = 0x1000 /* INDEX */ | 0x8_0000 /* EXTENTS */ | 0x1000_0000 /* INLINE_DATA */;

/// Whether the directory open as `dir` has the inode flags of a fresh
/// directory beside it, like `outer`'s own subdirectories get: its owner,
/// a builder, may have set others (synchronous writes, case folding, an
/// encryption policy, ...) that would change how the next build's files
/// behave, and some of them cannot be unset.
fn flags_as_fresh(dir: RawFd, outer: RawFd) -> io::Result<bool> {
    let get = |fd: RawFd| -> io::Result<libc::c_long> {
        let mut flags: libc::c_long = 0;
        // SAFETY: a valid fd and a long for the kernel to fill.
        if unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
            let e = io::Error::last_os_error();
            // File systems without inode flags (tmpfs before 6.0, ...).
            return match e.raw_os_error() {
                Some(libc::ENOTTY | libc::ENOTSUP | libc::EINVAL) => Ok(0),
                _ => Err(e),
            };
        }
        Ok(flags & !LAYOUT_FLAGS)
    };
    Ok(get(dir)? == get(outer)?)
}

/// Gives a reused directory the owner and mode a new one would have, and
/// none of the extended attributes (ACLs included) an earlier builder may
/// have set on it, which the next build would otherwise see.
fn set_owner_and_mode(fd: RawFd, owner: Option<(u32, u32)>, mode: libc::mode_t) -> io::Result<()> {
    clear_xattrs(fd)?;
    if let Some((uid, gid)) = owner {
        // SAFETY: valid fd.
        if unsafe { libc::fchown(fd, uid, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: valid fd.
    if unsafe { libc::fchmod(fd, mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the extended attributes of the file open as `fd` that a builder
/// can set: `user.*` and POSIX ACLs. (`security.*` and `trusted.*` need
/// privileges no builder has, and labels there belong to the system.)
fn clear_xattrs(fd: RawFd) -> io::Result<()> {
    let mut names = vec![0u8; 1024];
    let len = loop {
        // SAFETY: a valid fd and a buffer of the given length.
        let n = unsafe { libc::flistxattr(fd, names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(()),
            _ => return Err(e),
        }
    };
    let builders = |n: &&[u8]| n.starts_with(b"user.") || n.starts_with(b"system.posix_acl_");
    for name in names[..len].split(|&b| b == 0).filter(builders) {
        let name = CString::new(name).expect("split at NULs");
        // SAFETY: a valid fd and C string.
        if unsafe { libc::fremovexattr(fd, name.as_ptr()) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENODATA) {
                return Err(e);
            }
        }
    }
    Ok(())
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = self.remove_inner();
    }
}

fn cstring(s: &OsStr) -> CString {
    CString::new(s.as_bytes()).unwrap_or_else(|_| CString::new("\u{1}invalid").unwrap())
}

fn open_fd(dirfd: RawFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the returned fd is owned by the OwnedFd.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: st is written by the kernel.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn lstat_at(dirfd: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: st is written by the kernel.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

/// The names in a directory, read through a duplicate of `fd`.
fn entries(fd: RawFd) -> io::Result<Vec<CString>> {
    let dup = open_fd(fd, c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut dir = nix::dir::Dir::from_fd(std::os::fd::IntoRawFd::into_raw_fd(dup))
        .map_err(io::Error::from)?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Opens a subdirectory without following symlinks and makes it usable by us
/// (0700) first; `None` when the entry is not (or no longer) a directory.
fn open_subdir(dirfd: RawFd, name: &CStr) -> io::Result<Option<OwnedFd>> {
    let path_fd = match open_fd(
        dirfd,
        name,
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY,
    ) {
        Ok(fd) => fd,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTDIR | libc::ELOOP | libc::ENOENT)
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    // chmod through the O_PATH descriptor's /proc link reaches exactly the directory
    // we opened, never a symlink's target.
    let proc = CString::new(format!("/proc/self/fd/{}", path_fd.as_raw_fd())).unwrap();
    // SAFETY: valid C string.
    if unsafe { libc::chmod(proc.as_ptr(), 0o700) } != 0 {
        return Err(io::Error::last_os_error());
    }
    open_fd(
        path_fd.as_raw_fd(),
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY,
    )
    .map(Some)
}

/// What [`clear`] leaves of a directory's contents.
#[derive(Clone, Copy, PartialEq)]
enum Keep<'a> {
    Nothing,
    /// The directories directly below it, emptied (a build directory kept
    /// for reuse), but `skip`, left as it is (pruned already).
    Subdirs {
        skip: Option<&'a CStr>,
    },
}

/// Removes what is below `fd` (but `keep`), never following a symlink.
fn clear(fd: RawFd, keep: Keep) -> io::Result<()> {
    for name in entries(fd)? {
        if let Keep::Subdirs { skip } = keep {
            if skip == Some(name.as_c_str()) && is_dir_at(fd, &name)? {
                continue;
            }
            if let Some(sub) = open_subdir(fd, &name)? {
                clear(sub.as_raw_fd(), Keep::Nothing)?;
                continue;
            }
        }
        remove_entry(fd, &name)?;
    }
    Ok(())
}

fn is_dir_at(fd: RawFd, name: &CStr) -> io::Result<bool> {
    match lstat_at(fd, name) {
        Ok(st) => Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the entry `name` below `fd`, a whole tree if a directory, never
/// following a symlink; a missing one is not an error.
fn remove_entry(fd: RawFd, name: &CStr) -> io::Result<()> {
    let ignore_missing = |r: libc::c_int| {
        let e = io::Error::last_os_error();
        if r == 0 || e.raw_os_error() == Some(libc::ENOENT) {
            Ok(())
        } else {
            Err(e)
        }
    };
    if let Some(sub) = open_subdir(fd, name)? {
        clear(sub.as_raw_fd(), Keep::Nothing)?;
        drop(sub);
        // SAFETY: valid fd and C string.
        let r = unsafe { libc::unlinkat(fd, name.as_ptr(), libc::AT_REMOVEDIR) };
        // Replaced by a file since it was opened: unlinked below.
        if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOTDIR) {
            return ignore_missing(r);
        }
    }
    // SAFETY: valid fd and C string; unlinking a symlink removes only the link.
    ignore_missing(unsafe { libc::unlinkat(fd, name.as_ptr(), 0) })
}

/// Mode of a mount point made by [`make_mount_point`], directory or file.
const POINT_DIR_MODE: libc::mode_t = 0o755;
const POINT_FILE_MODE: libc::mode_t = 0o444;

/// Makes an empty directory or file `name` below `fd`, replacing whatever
/// was there.
fn make_mount_point(fd: RawFd, name: &CStr, is_dir: bool) -> io::Result<()> {
    let make = || -> io::Result<()> {
        if is_dir {
            // SAFETY: valid fd and C string.
            if unsafe { libc::mkdirat(fd, name.as_ptr(), POINT_DIR_MODE) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: valid fd and C string; mkdir's mode was filtered by the umask.
            if unsafe { libc::fchmodat(fd, name.as_ptr(), POINT_DIR_MODE, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid fd and C string.
        let file = unsafe { libc::openat(fd, name.as_ptr(), flags, POINT_FILE_MODE) };
        if file < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor, closed once.
        let file = unsafe { OwnedFd::from_raw_fd(file) };
        // SAFETY: valid fd.
        if unsafe { libc::fchmod(file.as_raw_fd(), POINT_FILE_MODE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    match make() {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            remove_entry(fd, name)?;
            make()
        }
        done => done,
    }
}

/// Makes the file mount point `name` below `fd` a hard link to `model`,
/// another one there, replacing whatever was there. Fails when the file
/// system refuses the link (too many of them, say): the caller then makes
/// one of its own.
fn link_mount_point(fd: RawFd, model: &CStr, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fd and C strings; linkat does not follow `model` (no
    // AT_SYMLINK_FOLLOW), which prune checked to be an empty regular file.
    let link = || unsafe { libc::linkat(fd, model.as_ptr(), fd, name.as_ptr(), 0) };
    if link() == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EEXIST) {
        return Err(e);
    }
    remove_entry(fd, name)?;
    if link() == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Empties the sibling directory holding `points`, below `outer`, but for
/// the mount points that are still as [`make_mount_point`] made them;
/// forgets the others.
fn prune(outer: RawFd, points: &mut MountPoints) -> io::Result<()> {
    let Some(dir) = open_subdir(outer, &points.dir)? else {
        points.names.clear();
        return Ok(());
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut seen = HashMap::with_capacity(points.names.len());
    for name in entries(dir.as_raw_fd())? {
        let st = match lstat_at(dir.as_raw_fd(), &name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let as_made = |is_dir: bool| {
            let (kind, mode) = if is_dir {
                (libc::S_IFDIR, POINT_DIR_MODE)
            } else {
                (libc::S_IFREG, POINT_FILE_MODE)
            };
            st.st_uid == me
                && st.st_mode & libc::S_IFMT == kind
                && st.st_mode & 0o7777 == mode
                && if is_dir {
                    st.st_nlink == 2
                } else {
                    st.st_size == 0
                }
        };
        match points.names.remove(&name) {
            Some(is_dir) if as_made(is_dir) => {
                seen.insert(name, is_dir);
            }
            _ => remove_entry(dir.as_raw_fd(), &name)?,
        }
    }
    points.names = seen;
    Ok(())
}

fn walk_reset(fd: RawFd, owner: Option<(u32, u32)>) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        // SAFETY: valid fd.
        if unsafe { libc::fchown(fd, uid, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: valid fd.
    if unsafe { libc::fchmod(fd, 0o700) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for name in entries(fd)? {
        let st = match lstat_at(fd, &name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if let Some(sub) = open_subdir(fd, &name)? {
                    walk_reset(sub.as_raw_fd(), owner)?;
                }
            }
            libc::S_IFLNK => {
                if let Some((uid, gid)) = owner {
                    // SAFETY: valid fd and C string; lchown semantics.
                    if unsafe {
                        libc::fchownat(fd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW)
                    } != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            _ => {
                // Open without following so a swapped-in symlink is never chmod-ed
                // through; O_PATH also works on fifos and sockets without blocking.
                let Ok(f) = open_fd(fd, &name, libc::O_PATH | libc::O_NOFOLLOW) else {
                    continue;
                };
                let st = fstat(f.as_raw_fd())?;
                if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                    continue;
                }
                let proc = CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
                if let Some((uid, gid)) = owner {
                    // SAFETY: valid C string.
                    if unsafe { libc::chown(proc.as_ptr(), uid, gid) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                let mode = st.st_mode & 0o755;
                // SAFETY: valid C string.
                if unsafe { libc::chmod(proc.as_ptr(), mode) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}
