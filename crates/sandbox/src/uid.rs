//! Host uid ranges for builds run by root, allocated like Nix's `auto-allocate-uids`.
//!
//! Slot `n` owns host uids and gids `0x34000000 + 65536·n` … `+ 65535`, mapped to
//! 0 … 65535 inside the build's user namespace. A slot is held by an exclusive
//! `flock` on `<lock_dir>/<n>` for as long as the [`UidRange`] lives, so two
//! concurrent builds (in one process or several) never share a uid. Lock files are
//! never deleted by us; if something else deletes or replaces one while we lock it,
//! the inode re-check after locking notices and the slot is tried again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// First host uid of slot 0 (Nix's default `start-id`).
pub const FIRST_UID: u32 = 0x3400_0000;
/// Uids per slot (Nix's `id-count` per build).
pub const UIDS_PER_SLOT: u32 = 65536;

/// Why no range could be allocated.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("cannot create the uid lock directory {path}: {source}")]
    LockDir { path: PathBuf, source: io::Error },
    #[error("cannot open or lock uid lock file {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "all {slots} uid slots under {dir} are in use; allow more slots or wait for builds to finish"
    )]
    Exhausted { dir: PathBuf, slots: u32 },
}

/// A locked host uid/gid range. Clones share the lock; the slot is released when
/// the last clone is dropped (so a scheduler can keep one for chowning the build
/// directory and give another to the sandbox).
#[derive(Debug, Clone)]
pub struct UidRange {
    slot: u32,
    _lock: Arc<File>,
}

impl UidRange {
    /// Locks the first free slot among `max_slots` under `lock_dir` (created 0700
    /// if missing).
    pub fn allocate(lock_dir: &Path, max_slots: u32) -> Result<UidRange, UidError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(lock_dir)
            .map_err(|source| UidError::LockDir {
                path: lock_dir.to_owned(),
                source,
            })?;
        for slot in 0..max_slots {
            if let Some(range) = Self::try_slot(lock_dir, slot)? {
                return Ok(range);
            }
        }
        Err(UidError::Exhausted {
            dir: lock_dir.to_owned(),
            slots: max_slots,
        })
    }

    fn try_slot(lock_dir: &Path, slot: u32) -> Result<Option<UidRange>, UidError> {
        let path = lock_dir.join(slot.to_string());
        let lock_err = |source| UidError::Lock {
            path: path.clone(),
            source,
        };
        loop {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(lock_err)?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Ok(None);
                }
                return Err(lock_err(err));
            }
            // The file may have been unlinked (and another created) between open and
            // flock; then our lock protects nothing and we start over.
            let held = file.metadata().map_err(lock_err)?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Some(UidRange {
                        slot,
                        _lock: Arc::new(file),
                    }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(lock_err(e)),
            }
        }
    }

    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The host uid that uid 0 inside maps to.
    pub fn first_host_id(&self) -> u32 {
        FIRST_UID + UIDS_PER_SLOT * self.slot
    }

    /// The host uid (and gid) that id `inside` maps to, e.g. to chown the build
    /// directory to the build user before the build starts.
    pub fn host_id(&self, inside: u32) -> u32 {
        debug_assert!(inside < UIDS_PER_SLOT);
        self.first_host_id() + inside
    }

    /// Number of ids in the range.
    pub fn count(&self) -> u32 {
        UIDS_PER_SLOT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_allocations_get_distinct_slots_and_freed_slots_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = UidRange::allocate(dir.path(), 4).unwrap();
        let b = UidRange::allocate(dir.path(), 4).unwrap();
        assert_ne!(a.slot(), b.slot());
        assert_eq!(a.host_id(1000), FIRST_UID + 65536 * a.slot() + 1000);
        let a_slot = a.slot();
        drop(a);
        let c = UidRange::allocate(dir.path(), 4).unwrap();
        assert_eq!(c.slot(), a_slot);
        // A clone keeps the slot locked after the original is gone.
        let c2 = c.clone();
        drop(c);
        assert_ne!(UidRange::allocate(dir.path(), 4).unwrap().slot(), a_slot);
        assert_eq!(c2.slot(), a_slot);
        let _d = UidRange::allocate(dir.path(), 4).unwrap();
        let _e = UidRange::allocate(dir.path(), 4).unwrap();
        assert!(matches!(
            UidRange::allocate(dir.path(), 4),
            Err(UidError::Exhausted { .. })
        ));
    }
}
