//! Machine locks: one lock file per machine and toolchain, held with `flock`.
//!
//! A lock file may be removed (by an operator, or by a restart that cleans
//! stale files) while another process holds it, and then recreated: two
//! processes would each hold a lock "on the same path" through different
//! inodes. After taking the lock we therefore check that the path still
//! names the inode we locked, and start over when it does not.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// What went wrong taking a lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open lock file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot lock {path}: {source}")]
    Flock { path: PathBuf, source: io::Error },
}

/// A held machine lock; released when dropped. The file is removed on
/// release (so nothing is left behind), which the inode re-check makes safe.
#[derive(Debug)]
pub struct MachineLock {
    path: PathBuf,
    _file: File,
}

impl MachineLock {
    /// Takes the lock at `path` without waiting: `None` when someone else holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<MachineLock>, LockError> {
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .map_err(|source| LockError::Open {
                    path: path.to_owned(),
                    source,
                })?;
            // SAFETY: flock on a descriptor we own.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Ok(None);
                }
                return Err(LockError::Flock {
                    path: path.to_owned(),
                    source: e,
                });
            }
            let held = file.metadata().map_err(|source| LockError::Open {
                path: path.to_owned(),
                source,
            })?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Some(MachineLock {
                        path: path.to_owned(),
                        _file: file,
                    }));
                }
                // Removed or replaced since we opened it: that inode locks nothing.
                _ => continue,
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        // Only while the path still names our inode: nobody else can hold it,
        // so nobody else can have replaced it meanwhile.
        if let (Ok(held), Ok(now)) = (self._file.metadata(), std::fs::metadata(&self.path))
            && held.ino() == now.ino()
            && held.dev() == now.dev()
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_recreated_file_is_rechecked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.lock");
        let first = MachineLock::try_acquire(&path).unwrap().unwrap();
        assert!(MachineLock::try_acquire(&path).unwrap().is_none());
        // Removing the file lets a newcomer lock a new inode, never the old one twice.
        std::fs::remove_file(&path).unwrap();
        let second = MachineLock::try_acquire(&path).unwrap().unwrap();
        assert!(MachineLock::try_acquire(&path).unwrap().is_none());
        drop(first);
        assert!(MachineLock::try_acquire(&path).unwrap().is_none());
        drop(second);
        assert!(MachineLock::try_acquire(&path).unwrap().is_some());
    }
}
