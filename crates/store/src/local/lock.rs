//! File locks: per-path locks (`<path>.lock` next to the path, as Nix
//! names them), the GC lock, and the per-process temporary-roots file.
//!
//! All are `flock(2)` locks, which Nix uses too, so Kiln and Nix processes
//! exclude each other. A lock file may be deleted by its holder while
//! another process waits on it; the waiter then holds a lock on a file no
//! one else will ever open. So after locking we check that the path still
//! names the inode we locked (and, for Nix's convention, that the holder did
//! not mark it stale by giving it a size), and start over if not.
//!
//! Released path lock files are recycled rather than deleted (see
//! [`spares`]): on ext4 without a journal every inode freed in the last
//! minute slows each later allocation in its group, and a lock file freed
//! per added path made adding paths one by one quadratic.

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
            if let Some(file) = spares::take(lock_path) {
                return Ok(Some(PathLock {
                    file: Some(file),
                    path: lock_path.to_path_buf(),
                }));
            }
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
                // Still the file at that name.
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    // Marked stale yet still named: its holder died between
                    // marking and removing it. No one else holds it: it is
                    // ours once cleared (Nix would retry it forever).
                    if ours.len() != 0 {
                        file.set_len(0)
                            .map_err(|e| StoreError::io("reset lock file", lock_path, e))?;
                    }
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
        // Mark stale for Nix's waiters (they check the size; a size without
        // data costs no page), then take the name away while still holding
        // the lock, so no one locks a file we then move or remove.
        let _ = file.set_len(1);
        if !spares::keep(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Released lock files kept for reuse, in a directory of the store
/// directory (`.kiln-spare-locks`, so on the same file system).
///
/// A released lock file is marked stale and renamed into the directory
/// instead of being deleted; the next lock taken in that store directory
/// (one at a time: batches create theirs before locking them in order)
/// locks a spare, clears its mark and renames it to its name, never over
/// an existing file. A waiter still blocked on it from its last name gets
/// it only while it is marked, so it starts over, as it would have with a
/// deleted file.
///
/// Spares are bounded per process; ones left by processes that have
/// ended are adopted by the next process to lock in that store. Nix's
/// collector deletes the directory with the rest of what is not a store
/// path, which only costs the spares.
pub mod spares {
    use std::collections::HashMap;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, OnceLock};

    use crate::local::fsutil::rename_noreplace;

    /// The directory's name in the store directory.
    pub const DIR: &str = ".kiln-spare-locks";

    /// Spares one process keeps per store directory before it deletes
    /// (a batch of 10,000 paths keeps all its lock files).
    const MAX: usize = 16_384;

    /// Spares adopted from the directory at a time.
    const CHUNK: usize = 64;

    #[derive(Default)]
    struct Pool {
        /// Spares this process knows of (some may since have been taken
        /// by another process).
        names: Vec<PathBuf>,
        /// Whether the directory was found to hold no more spares than
        /// this process knows of (left by others, adopted a chunk at a
        /// time when this process has none).
        read_out: bool,
        /// Numbers for this process's spare names.
        next: u64,
        /// Set when spares cannot be kept here (the directory cannot be
        /// made, renames fail): then lock files are simply deleted.
        off: bool,
    }

    impl Pool {
        /// The next spare to try: one this process knows of, else a chunk
        /// of those others left in the directory.
        fn next_spare(&mut self, store: &Path) -> Option<PathBuf> {
            if self.names.is_empty() && !self.read_out {
                if let Ok(entries) = std::fs::read_dir(store.join(DIR)) {
                    self.names
                        .extend(entries.flatten().take(CHUNK).map(|e| e.path()));
                }
                self.read_out = self.names.len() < CHUNK;
            }
            self.names.pop()
        }
    }

    /// Runs `f` on this process's pool for the store directory `store`.
    fn with_pool<T>(store: &Path, f: impl FnOnce(&mut Pool) -> T) -> T {
        static POOLS: OnceLock<Mutex<HashMap<PathBuf, Pool>>> = OnceLock::new();
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(pools.entry(store.to_path_buf()).or_default())
    }

    /// A spare renamed to `lock_path`, locked and cleared, if there is a
    /// spare and nothing is at `lock_path` yet; otherwise the caller
    /// creates the file as usual.
    ///
    /// The spare is locked before its mark is cleared and before it gets
    /// its new name: a waiter from its old name either has it first (then
    /// the spare is passed over) or gets it only after this holder has
    /// marked it stale again. Were the process to die right after the
    /// rename, what is left is an unmarked, unlocked lock file, as a fresh
    /// one would be.
    pub(super) fn take(lock_path: &Path) -> Option<std::fs::File> {
        let store = lock_path.parent()?;
        // Spares a waiter holds, for a later call.
        let mut busy = Vec::new();
        let taken = take_from(store, lock_path, &mut busy);
        if !busy.is_empty() {
            with_pool(store, |pool| pool.names.extend(busy));
        }
        taken
    }

    fn take_from(store: &Path, lock_path: &Path, busy: &mut Vec<PathBuf>) -> Option<std::fs::File> {
        loop {
            let spare = with_pool(store, |pool| {
                if pool.off {
                    None
                } else {
                    pool.next_spare(store)
                }
            })?;
            // Taken by another process or collected: try the next.
            let Ok(file) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&spare)
            else {
                continue;
            };
            // Held by a waiter from its old name, about to see it stale.
            if !super::flock(&file, super::LockKind::Exclusive, false).unwrap_or(false) {
                busy.push(spare);
                continue;
            }
            if file.set_len(0).is_err() {
                continue;
            }
            match rename_noreplace(&spare, lock_path) {
                Ok(()) => return Some(file),
                // Collected meanwhile: try the next.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Someone holds (or left) a lock file there: marked again
                // and kept.
                Err(_) => {
                    let _ = file.set_len(1);
                    busy.push(spare);
                    return None;
                }
            }
        }
    }

    /// Moves the released lock file at `lock_path` (held and marked stale
    /// by the caller) into the spares; false when the caller must delete
    /// it instead.
    pub(super) fn keep(lock_path: &Path) -> bool {
        let Some(store) = lock_path.parent() else {
            return false;
        };
        let dir = store.join(DIR);
        let spare = with_pool(store, |pool| {
            (!pool.off && pool.names.len() < MAX).then(|| {
                pool.next += 1;
                dir.join(format!("{}-{}", std::process::id(), pool.next))
            })
        });
        let Some(spare) = spare else {
            return false;
        };
        let moved = rename_noreplace(lock_path, &spare).or_else(|e| {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e);
            }
            // The directory is made on first use (and again if a
            // collector removed it).
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            rename_noreplace(lock_path, &spare)
        });
        match moved {
            Ok(()) => {
                with_pool(store, |pool| pool.names.push(spare));
                true
            }
            // The lock file's name was already gone: nothing to keep.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::debug!(error = %e, dir = %dir.display(), "lock files are deleted, not kept");
                with_pool(store, |pool| pool.off = true);
                false
            }
        }
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
    path: PathBuf,
    state_dir: PathBuf,
    /// A session's file goes when the session does; the process's stays
    /// until the collector finds it unlocked.
    remove_on_drop: bool,
}

impl Drop for TempRoots {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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
    let roots = Arc::new(TempRoots::create(
        state_dir,
        &std::process::id().to_string(),
        false,
    )?);
    files.insert(state_dir.to_path_buf(), roots.clone());
    Ok(roots)
}

impl TempRoots {
    /// The temp-roots file `temproots/<name>`, made and share-locked.
    /// Names start with the owner's pid (`<pid>` or `<pid>-<session>`).
    pub(crate) fn create(
        state_dir: &Path,
        name: &str,
        remove_on_drop: bool,
    ) -> Result<TempRoots, StoreError> {
        let dir = state_dir.join("temproots");
        let path = dir.join(name);
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
                    path,
                    state_dir: state_dir.to_path_buf(),
                    remove_on_drop,
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
    /// The state directory of the store these roots are for.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

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

/// The pid a temp-roots file name (`<pid>` or `<pid>-<session>`) belongs to.
pub fn temp_roots_owner(name: &str) -> Option<u32> {
    name.split('-').next()?.parse().ok()
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

/// The temporary roots of one client connection of a long-lived process
/// (the daemon serves many from one process, where Nix forks one process
/// per connection): `temproots/<pid>-<n>`, dropped with the session, so
/// what a client added or used stops being protected when it disconnects
/// rather than when the daemon exits.
///
/// Roots go in with [`add`](TempRootsSession::add), and, while a thread
/// has [`enter`](TempRootsSession::enter)ed the session, every temporary
/// root the store records on that thread (adding paths, copying them)
/// goes into the session instead of the process's file.
#[derive(Debug, Clone)]
pub struct TempRootsSession {
    roots: Arc<TempRoots>,
    store_dir: StoreDir,
}

thread_local! {
    /// Sessions entered on this thread, innermost last.
    static ENTERED: std::cell::RefCell<Vec<Arc<TempRoots>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl TempRootsSession {
    pub(crate) fn create(state_dir: &Path, store_dir: &StoreDir) -> Result<Self, StoreError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{n}", std::process::id());
        Ok(TempRootsSession {
            roots: Arc::new(TempRoots::create(state_dir, &name, true)?),
            store_dir: store_dir.clone(),
        })
    }

    /// Records `paths` as roots of this session.
    pub fn add(&self, paths: &[&StorePath]) -> Result<(), StoreError> {
        self.roots.add(&self.store_dir, paths)
    }

    /// Until the guard drops, temporary roots recorded on this thread go
    /// into this session.
    pub fn enter(&self) -> EnteredSession {
        ENTERED.with(|e| e.borrow_mut().push(self.roots.clone()));
        EnteredSession {
            _not_send: std::marker::PhantomData,
        }
    }

    /// The file holding the roots.
    pub fn file(&self) -> &Path {
        &self.roots.path
    }

    /// The session entered on this thread for the store at `state_dir`.
    pub(crate) fn entered(state_dir: &Path, store_dir: &StoreDir) -> Option<Self> {
        entered_session(state_dir).map(|roots| TempRootsSession {
            roots,
            store_dir: store_dir.clone(),
        })
    }
}

/// While alive, this thread's temporary roots go to a session; see
/// [`TempRootsSession::enter`].
#[derive(Debug)]
pub struct EnteredSession {
    /// Tied to the thread it was entered on.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for EnteredSession {
    fn drop(&mut self) {
        ENTERED.with(|e| {
            e.borrow_mut().pop();
        });
    }
}

/// The innermost session entered on this thread for the store at
/// `state_dir`, if any.
pub(crate) fn entered_session(state_dir: &Path) -> Option<Arc<TempRoots>> {
    ENTERED.with(|e| {
        e.borrow()
            .iter()
            .rev()
            .find(|r| r.state_dir == state_dir)
            .cloned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spares_in(store: &Path) -> Vec<u64> {
        let mut inodes: Vec<u64> = std::fs::read_dir(store.join(spares::DIR))
            .map(|d| d.flatten().map(|e| e.metadata().unwrap().ino()).collect())
            .unwrap_or_default();
        inodes.sort();
        inodes
    }

    #[test]
    fn released_lock_files_are_reused_not_freed() {
        let store = tempfile::tempdir().unwrap();
        let first = store.path().join("a.lock");
        let lock = PathLock::acquire(&first, true).unwrap().unwrap();
        let inode = std::fs::metadata(&first).unwrap().ino();
        drop(lock);
        assert!(!first.exists(), "a released lock file kept its name");
        assert_eq!(spares_in(store.path()), [inode]);
        // Locks taken one after another all use that one file.
        for n in 0..50 {
            let path = store.path().join(format!("p{n}.lock"));
            let lock = PathLock::acquire(&path, true).unwrap().unwrap();
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(m.ino(), inode, "lock {n} made a new file");
            assert_eq!(m.len(), 0, "a held lock file looks stale");
            drop(lock);
        }
        assert_eq!(spares_in(store.path()), [inode]);
        let names: Vec<_> = std::fs::read_dir(store.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [spares::DIR], "leftovers in the store directory");
    }

    /// A waiter that opened a lock file under its old name (as Nix's
    /// `PathLocks` does) finds it stale when it gets the lock, also when
    /// the file has become another path's lock meanwhile.
    #[test]
    fn a_waiter_on_a_recycled_lock_file_sees_it_stale() {
        let store = tempfile::tempdir().unwrap();
        let old = store.path().join("old.lock");
        let held = PathLock::acquire(&old, true).unwrap().unwrap();
        let waiter = open_lock_file(&old).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = std::thread::spawn(move || {
            flock(&waiter, LockKind::Exclusive, true).unwrap();
            // Nix's test: a lock file with a size is stale.
            tx.send(waiter.metadata().unwrap().len()).unwrap();
            // Hold it a while, as a slow waiter might.
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(waiter);
        });
        drop(held);
        assert_eq!(rx.recv().unwrap(), 1, "the old waiter did not see it stale");
        let recycled = spares_in(store.path());
        assert_eq!(recycled.len(), 1);
        // While the old waiter holds it, the file is passed over.
        let new = store.path().join("new.lock");
        let lock = PathLock::acquire(&new, true).unwrap().unwrap();
        let m = std::fs::metadata(&new).unwrap();
        assert_ne!(m.ino(), recycled[0], "a spare held by a waiter was taken");
        assert_eq!(m.len(), 0);
        // Not held twice: a second taker must wait.
        assert!(PathLock::acquire(&new, false).unwrap().is_none());
        waiting.join().unwrap();
        // Let go by the waiter, it is the next lock's.
        let third = store.path().join("third.lock");
        let lock3 = PathLock::acquire(&third, true).unwrap().unwrap();
        let m = std::fs::metadata(&third).unwrap();
        assert_eq!(m.ino(), recycled[0], "the spare was not used once free");
        assert_eq!(m.len(), 0, "a held lock file looks stale");
        drop(lock);
        drop(lock3);
        assert!(PathLock::acquire(&new, false).unwrap().is_some());
    }

    #[test]
    fn spares_left_by_other_processes_are_adopted() {
        let store = tempfile::tempdir().unwrap();
        let dir = store.path().join(spares::DIR);
        std::fs::create_dir(&dir).unwrap();
        for n in 0..100 {
            std::fs::write(dir.join(format!("1-{n}")), b"d").unwrap();
        }
        let left = spares_in(store.path());
        // Held all at once, so none comes back before the next is taken.
        let held: Vec<(PathLock, u64)> = (0..101)
            .map(|n| {
                let path = store.path().join(format!("p{n}.lock"));
                let lock = PathLock::acquire(&path, true).unwrap().unwrap();
                (lock, std::fs::metadata(&path).unwrap().ino())
            })
            .collect();
        let mut used: Vec<u64> = held[..100].iter().map(|(_, ino)| *ino).collect();
        used.sort();
        assert_eq!(used, left, "not every spare was used");
        assert!(!left.contains(&held[100].1), "a spare was used twice");
        assert!(spares_in(store.path()).is_empty());
        drop(held);
        assert_eq!(spares_in(store.path()).len(), 101);
    }

    #[test]
    fn a_lock_file_left_stale_by_a_dead_holder_is_taken() {
        let store = tempfile::tempdir().unwrap();
        let path = store.path().join("p.lock");
        // Marked stale, never removed (its holder died in between).
        std::fs::write(&path, b"d").unwrap();
        let lock = PathLock::acquire(&path, false).unwrap().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        drop(lock);
    }
}
