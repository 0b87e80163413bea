//! File locks: per-path locks (`<path>.lock` next to the path, as Nix
//! names them), the GC lock, and the per-process temporary-roots file.
//!
//! All are `flock(2)` locks, which Nix uses too, so Kiln and Nix processes
//! exclude each other. A lock file may be deleted by its holder while
//! another process waits on it; the waiter then holds a lock on a file no
//! one else will ever open. So after locking we check that the path still
//! names the inode we locked (and, for Nix's convention, that the holder did
//! not mark it stale by writing into it), and start over if not.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_formats::store_path::{StoreDir, StorePath};

use crate::StoreError;

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// `flock`s `file`; `Ok(false)` when `wait` is off and someone else holds it.
pub fn flock(file: &File, kind: LockKind, wait: bool) -> io::Result<bool> {
    let mut op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(err),
        }
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// An exclusive lock on `<store path>.lock`, released (and the lock file
/// deleted) on drop.
#[derive(Debug)]
pub struct PathLock {
    /// `None` when the caller's parent holds the lock (see
    /// [`PathLock::held_by_parent`]).
    file: Option<File>,
    path: PathBuf,
}

impl PathLock {
    /// Locks `lock_path`, waiting for other holders if `wait`; `None` if it
    /// is held and `wait` is off.
    pub fn acquire(lock_path: &Path, wait: bool) -> Result<Option<PathLock>, StoreError> {
        loop {
            let file = open_lock_file(lock_path)
                .map_err(|e| StoreError::io("open lock file", lock_path, e))?;
            if !flock(&file, LockKind::Exclusive, wait)
                .map_err(|e| StoreError::io("lock", lock_path, e))?
            {
                return Ok(None);
            }
            let ours = file
                .metadata()
                .map_err(|e| StoreError::io("stat", lock_path, e))?;
            match std::fs::symlink_metadata(lock_path) {
                // Still the file at that name, and not marked stale.
                Ok(now)
                    if now.ino() == ours.ino() && now.dev() == ours.dev() && ours.len() == 0 =>
                {
                    return Ok(Some(PathLock {
                        file: Some(file),
                        path: lock_path.to_path_buf(),
                    }));
                }
                // Deleted or replaced under us by the previous holder: retry.
                _ => continue,
            }
        }
    }

    /// A lock that the parent process holds for us (a daemon that locked a
    /// build's outputs before handing the build to its hook): nothing to
    /// take, nothing to release.
    pub fn held_by_parent(lock_path: &Path) -> PathLock {
        PathLock {
            file: None,
            path: lock_path.to_path_buf(),
        }
    }

    /// Creates the lock file if it is missing, without locking it (so a
    /// batch can create many in parallel before locking them in order).
    pub fn precreate(lock_path: &Path) {
        let _ = open_lock_file(lock_path);
    }

    /// The lock file of a store path in the physical store directory.
    pub fn lock_path_for(real_store_dir: &Path, path: &StorePath) -> PathBuf {
        real_store_dir.join(format!("{}.lock", path.base_name()))
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        let Some(file) = &mut self.file else { return };
        // Mark stale for Nix's waiters (they check the size), then delete
        // while still holding the lock so no one locks a file we then remove.
        let _ = file.write_all(b"d");
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A lock held on a file that stays (the GC lock, `big-lock`).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(
        path: &Path,
        kind: LockKind,
        wait: bool,
    ) -> Result<Option<FileLock>, StoreError> {
        let file = open_lock_file(path).map_err(|e| StoreError::io("open lock file", path, e))?;
        if flock(&file, kind, wait).map_err(|e| StoreError::io("lock", path, e))? {
            Ok(Some(FileLock { _file: file }))
        } else {
            Ok(None)
        }
    }
}

/// This process's `temproots/<pid>` file: paths this process is using or
/// adding, NUL-terminated, which the collector must keep. Held under a
/// shared lock while the process lives; upgraded to exclusive while a root
/// is appended, so a running collector (which holds a shared lock on every
/// live temp-roots file) holds back new roots until it has finished.
#[derive(Debug)]
pub struct TempRoots {
    file: Mutex<File>,
}

/// One temp-roots file per state directory per process: two `LocalStore`
/// values on the same store share it (a second `flock` from the same
/// process would block on the first).
pub fn temp_roots_for(state_dir: &Path) -> Result<Arc<TempRoots>, StoreError> {
    static FILES: OnceLock<Mutex<HashMap<PathBuf, Arc<TempRoots>>>> = OnceLock::new();
    let mut files = FILES
        .get_or_init(Default::default)
        .lock()
        .expect("temp roots registry");
    if let Some(t) = files.get(state_dir) {
        return Ok(t.clone());
    }
    let roots = Arc::new(TempRoots::create(state_dir)?);
    files.insert(state_dir.to_path_buf(), roots.clone());
    Ok(roots)
}

impl TempRoots {
    fn create(state_dir: &Path) -> Result<TempRoots, StoreError> {
        let dir = state_dir.join("temproots");
        let path = dir.join(std::process::id().to_string());
        let gc_lock_path = state_dir.join("gc.lock");
        loop {
            // The collector deletes files of dead processes under the GC
            // lock; create ours under a shared GC lock so it cannot be
            // deleted between creation and locking.
            let gc = FileLock::acquire(&gc_lock_path, LockKind::Shared, true)?;
            // A file with our pid must be a stale one of a dead process.
            let _ = std::fs::remove_file(&path);
            let file = open_lock_file(&path).map_err(|e| StoreError::io("create", &path, e))?;
            flock(&file, LockKind::Shared, true).map_err(|e| StoreError::io("lock", &path, e))?;
            drop(gc);
            let len = file
                .metadata()
                .map_err(|e| StoreError::io("stat", &path, e))?
                .len();
            if len == 0 {
                return Ok(TempRoots {
                    file: Mutex::new(file),
                });
            }
            // The collector removed and someone recreated it: retry.
        }
    }

    /// Records `paths` as roots of this process.
    pub fn add(&self, store_dir: &StoreDir, paths: &[&StorePath]) -> Result<(), StoreError> {
        if paths.is_empty() {
            return Ok(());
        }
        let mut record = Vec::new();
        for p in paths {
            record.extend_from_slice(store_dir.print_path(p).as_bytes());
            record.push(0);
        }
        let mut file = self.file.lock().expect("temp roots file");
        let err = |e| StoreError::io("add temporary root to", "temproots", e);
        flock(&file, LockKind::Exclusive, true).map_err(err)?;
        let written = file
            .seek(SeekFrom::End(0))
            .and_then(|_| file.write_all(&record));
        flock(&file, LockKind::Shared, true).map_err(err)?;
        written.map_err(err)
    }
}

impl TempRoots {
    /// Forgets every root recorded so far (for long-lived processes, once
    /// the paths they protected are registered or rooted otherwise).
    pub fn clear(&self) -> Result<(), StoreError> {
        let file = self.file.lock().expect("temp roots file");
        let err = |e| StoreError::io("clear temporary roots in", "temproots", e);
        flock(&file, LockKind::Exclusive, true).map_err(err)?;
        let cleared = file.set_len(0);
        flock(&file, LockKind::Shared, true).map_err(err)?;
        cleared.map_err(err)
    }
}

/// The roots in one temp-roots file of a live process, read under a shared
/// lock that the returned guard keeps until collection ends; `None` if the
/// process is dead (its file is then deleted).
pub fn read_temp_roots(path: &Path) -> Result<Option<(File, Vec<String>)>, StoreError> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", path, e)),
    };
    if flock(&file, LockKind::Exclusive, false).map_err(|e| StoreError::io("lock", path, e))? {
        // Nobody holds it: its process is gone.
        let _ = std::fs::remove_file(path);
        return Ok(None);
    }
    flock(&file, LockKind::Shared, true).map_err(|e| StoreError::io("lock", path, e))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| StoreError::io("read", path, e))?;
    let roots = data
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    Ok(Some((file, roots)))
}

/// Whether process `pid` holds its temp-roots file (is alive as a store user).
pub fn process_holds_temp_roots(state_dir: &Path, pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let path = state_dir.join("temproots").join(pid.to_string());
    let Ok(file) = OpenOptions::new().read(true).open(&path) else {
        return false;
    };
    matches!(flock(&file, LockKind::Exclusive, false), Ok(false))
}
