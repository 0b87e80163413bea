//! Small files made durable by the commit that registers them.
//!
//! A text added on its own (a `.drv` from `nix-instantiate`, each
//! `AddTextToStore`) would otherwise wait for three device flushes before
//! its answer: its file, the store directory, then the WAL. Up to
//! [`JOURNALED_MAX`] bytes, its contents go into the registering commit
//! instead (`KilnUnsyncedFiles`, see [`db`](super::db)), so that the one
//! WAL sync makes the path valid and its contents durable together.
//!
//! The files themselves are synced later, many at once: one `syncfs` per
//! [`SETTLE_AFTER`] journaled files, and when the store is dropped; then
//! their rows are deleted. After a power cut, the next process to open the
//! store writes back every journaled file of a valid path that is missing
//! or differs, syncs, and deletes the rows, before it answers anything.
//! Another process's rows are settled the same way when a store opens: the
//! file of a committed row is always complete, as it is renamed into place
//! before the commit.

use std::path::Path;
use std::sync::Mutex;

use super::fsutil;
use super::{Durability, LocalStore};
use crate::StoreError;

/// The largest text whose contents are journaled (larger ones are synced
/// before their commit, as any path).
pub(crate) const JOURNALED_MAX: usize = 64 << 10;

/// Journaled files per `syncfs`.
const SETTLE_AFTER: usize = 256;

/// The journal rows this process wrote whose files are not yet synced.
#[derive(Debug, Default)]
pub(crate) struct Unsynced(Mutex<Vec<i64>>);

impl LocalStore {
    /// Notes that the journal row `id` holds a file of ours not yet
    /// synced, and settles the journal once enough are.
    pub(crate) fn journaled(&self, id: i64) {
        let due = {
            let mut ids = self.unsynced.0.lock().unwrap_or_else(|p| p.into_inner());
            ids.push(id);
            ids.len() >= SETTLE_AFTER
        };
        if due {
            if let Err(e) = self.settle_journal() {
                // The rows stay; the next open settles them.
                tracing::warn!(error = %e, "syncing journaled store files");
            }
        }
    }

    /// Syncs the files this process journaled and deletes their rows.
    pub(crate) fn settle_journal(&self) -> Result<(), StoreError> {
        let ids = std::mem::take(&mut *self.unsynced.0.lock().unwrap_or_else(|p| p.into_inner()));
        if ids.is_empty() {
            return Ok(());
        }
        fsutil::syncfs(&self.real_store)
            .map_err(|e| StoreError::io("sync", &self.real_store, e))?;
        let mut db = self.db();
        let tx = db.write()?;
        tx.forget_journaled(&ids)?;
        tx.commit()
    }

    /// Settles every row in the journal, this process's or not: writes
    /// back the file of each valid path that is missing or differs (after
    /// a power cut), syncs, and deletes the rows.
    pub(crate) fn recover_journal(&self) -> Result<(), StoreError> {
        if !self.db().has_journaled_files()? {
            return Ok(());
        }
        let mut db = self.db();
        // The write lock keeps collectors from invalidating a path while
        // its file is checked.
        let tx = db.write()?;
        let mut ids = Vec::new();
        for row in tx.journaled_files()? {
            let file = match row {
                Ok(file) => file,
                Err(id) => {
                    ids.push(id);
                    continue;
                }
            };
            ids.push(file.id);
            if !tx.is_valid(&file.path)? {
                continue;
            }
            let dest = self.real_path(&file.path);
            if holds(&dest, &file.contents) {
                continue;
            }
            tracing::warn!(
                path = %self.config.store_dir.print_path(&file.path),
                "restoring a store file from the journal (lost in a crash)"
            );
            let temp = self.temp_path();
            super::add::write_canonical_file(&temp, false, &file.contents, Durability::Batch)?;
            self.move_into_place(&temp, &dest)?;
        }
        fsutil::syncfs(&self.real_store)
            .map_err(|e| StoreError::io("sync", &self.real_store, e))?;
        tx.forget_journaled(&ids)?;
        tx.commit()
    }
}

/// Whether `path` is a regular file holding exactly `contents`.
fn holds(path: &Path, contents: &[u8]) -> bool {
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_file() && m.len() == contents.len() as u64)
        && std::fs::read(path).is_ok_and(|c| c == contents)
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        if let Err(e) = self.settle_journal() {
            tracing::warn!(error = %e, "syncing journaled store files");
        }
    }
}
