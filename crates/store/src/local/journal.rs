//! Small paths made durable by the commit that registers them.
//!
//! A path registered on its own waits for several device flushes before
//! it is valid: its files, the store directory, then the WAL. A text added
//! alone (a `.drv` from `nix-instantiate`, each `AddTextToStore`) waited
//! for three, and so did each round of built outputs. For a path whose NAR
//! is at most [`JOURNALED_MAX`] bytes, the registering commit holds the NAR
//! instead (`KilnUnsyncedPaths`, see [`db`](super::db)), so that its one
//! WAL sync makes the path valid and its contents durable together.
//!
//! The files themselves are synced later, many at once: every
//! [`SETTLE_AFTER`] journaled paths, and when the store is dropped; then
//! their rows are deleted. After a power cut, the next process to open the
//! store restores every journaled path that is still valid with the
//! journaled contents and whose files are missing or differ, syncs, and deletes the rows, before it answers
//! anything. Another process's rows are settled the same way when a store
//! opens: the files of a committed row are always complete, as they are in
//! place before the commit.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use kiln_formats::hash::Hash;
use kiln_formats::nar::Node;
use kiln_formats::store_path::StorePath;

use super::{LocalStore, fsutil, par};
use crate::{PathInfo, StoreError};

/// The largest NAR a commit holds (larger paths are synced before their
/// commit).
pub const JOURNALED_MAX: usize = 64 << 10;

/// Journaled paths synced at once.
const SETTLE_AFTER: usize = 256;

/// The journal rows this process wrote whose paths' files are not yet
/// synced.
#[derive(Debug, Default)]
pub(crate) struct Unsynced(Mutex<Vec<(i64, StorePath)>>);

impl LocalStore {
    /// Registers `infos` as [`LocalStore::register_valid_paths`] does, in
    /// one commit that also holds the NARs of `journaled` (paths among
    /// `infos` whose files are in place but not synced; see the [module
    /// documentation](self)).
    pub fn register_valid_paths_journaled(
        &self,
        infos: &[PathInfo],
        drv_outputs: &BTreeMap<StorePath, BTreeMap<String, StorePath>>,
        journaled: &[(StorePath, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let journaled: Vec<(&StorePath, &[u8])> =
            journaled.iter().map(|(p, nar)| (p, &nar[..])).collect();
        let rows = self.register_journaling(infos, drv_outputs, &journaled)?;
        self.journaled(rows);
        Ok(())
    }

    /// Registers `infos` and journals `journaled` in one commit; returns
    /// the rows, for [`LocalStore::journaled`] once the caller is done.
    pub(crate) fn register_journaling(
        &self,
        infos: &[PathInfo],
        drv_outputs: &BTreeMap<StorePath, BTreeMap<String, StorePath>>,
        journaled: &[(&StorePath, &[u8])],
    ) -> Result<Vec<(i64, StorePath)>, StoreError> {
        let mut db = self.db();
        let tx = db.write()?;
        tx.register(infos, drv_outputs)?;
        let mut rows = Vec::with_capacity(journaled.len());
        for &(path, nar) in journaled {
            rows.push((tx.journal_path(path, nar)?, path.clone()));
        }
        tx.commit()?;
        Ok(rows)
    }

    /// Notes journal rows of ours whose paths' files are not synced yet,
    /// and settles them once there are enough.
    pub(crate) fn journaled(&self, rows: Vec<(i64, StorePath)>) {
        if rows.is_empty() {
            return;
        }
        let due = {
            let mut unsynced = self.unsynced.0.lock().unwrap_or_else(|p| p.into_inner());
            unsynced.extend(rows);
            unsynced.len() >= SETTLE_AFTER
        };
        if due {
            if let Err(e) = self.settle_journal() {
                // The rows stay; the next open settles them.
                tracing::warn!(error = %e, "syncing journaled store paths");
            }
        }
    }

    /// Syncs the paths this process journaled and deletes their rows.
    /// Each path is synced on its own (in parallel, so that the device's
    /// flushes merge), not with a `syncfs` that would also wait for
    /// everything else being written, such as a large build's output.
    pub(crate) fn settle_journal(&self) -> Result<(), StoreError> {
        let rows = std::mem::take(&mut *self.unsynced.0.lock().unwrap_or_else(|p| p.into_inner()));
        if rows.is_empty() {
            return Ok(());
        }
        let synced = par::map(rows.iter().collect(), |(_, path)| {
            let real = self.real_path(path);
            match fsutil::fsync_tree(&real) {
                // Deleted since: nothing left to make durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other.map_err(|e| StoreError::io("sync", &real, e)),
            }
        });
        if let Some(e) = synced.into_iter().find_map(Result::err) {
            self.unsynced
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(rows);
            return Err(e);
        }
        fsutil::fsync_dir(&self.real_store)
            .map_err(|e| StoreError::io("sync", &self.real_store, e))?;
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let mut db = self.db();
        let tx = db.write()?;
        tx.forget_journaled(&ids)?;
        tx.commit()
    }

    /// Settles every row in the journal, this process's or not: restores
    /// each valid path whose files are missing or differ (after a power
    /// cut), syncs, and deletes the rows.
    pub(crate) fn recover_journal(&self) -> Result<(), StoreError> {
        if !self.db().has_journaled_paths()? {
            return Ok(());
        }
        let mut db = self.db();
        // The write lock keeps collectors from invalidating a path while
        // its file is checked.
        let tx = db.write()?;
        let mut ids = Vec::new();
        for row in tx.journaled_paths()? {
            let journaled = match row {
                Ok(journaled) => journaled,
                Err(id) => {
                    ids.push(id);
                    continue;
                }
            };
            ids.push(journaled.id);
            // Only while the path is valid with these very contents: it may
            // have been deleted since, and registered again with others (a
            // build that is not reproducible, by another process).
            let registered = tx.registered_hash(&journaled.path)?;
            if registered.is_none_or(|hash| hash != Hash::digest(hash.algo(), &journaled.nar)) {
                continue;
            }
            let dest = self.real_path(&journaled.path);
            if small_nar(&dest).is_some_and(|nar| nar == journaled.nar) {
                continue;
            }
            let label = self.config.store_dir.print_path(&journaled.path);
            tracing::warn!(path = %label, "restoring a store path from the journal (lost in a crash)");
            let temp = self.temp_path();
            if let Err(e) =
                super::add::restore_canonical(&mut &journaled.nar[..], &temp, &label, None, false)
            {
                let _ = fsutil::remove_tree(&temp);
                return Err(e);
            }
            self.move_into_place(&temp, &dest)?;
        }
        fsutil::syncfs(&self.real_store)
            .map_err(|e| StoreError::io("sync", &self.real_store, e))?;
        tx.forget_journaled(&ids)?;
        tx.commit()
    }
}

/// The NAR of the tree at `path`, if it is at most [`JOURNALED_MAX`]
/// bytes (`None` when larger, or unreadable).
pub fn small_nar(path: &Path) -> Option<Vec<u8>> {
    let mut budget = JOURNALED_MAX;
    let nar = small_node(path, &mut budget)?.to_nar();
    (nar.len() <= JOURNALED_MAX).then_some(nar)
}

/// Reads `path` into a [`Node`], spending its size (and a little per
/// entry) from `budget`; `None` once that runs out.
fn small_node(path: &Path, budget: &mut usize) -> Option<Node> {
    /// What a NAR spends on an entry besides its name and contents.
    const OVERHEAD: usize = 128;
    let meta = std::fs::symlink_metadata(path).ok()?;
    *budget = budget.checked_sub(OVERHEAD)?;
    let kind = meta.file_type();
    if kind.is_file() {
        *budget = budget.checked_sub(usize::try_from(meta.len()).ok()?)?;
        let contents = std::fs::read(path).ok()?;
        Some(Node::Regular {
            executable: meta.permissions().mode() & 0o100 != 0,
            contents,
        })
    } else if kind.is_symlink() {
        let target = std::fs::read_link(path).ok()?;
        *budget = budget.checked_sub(target.as_os_str().len())?;
        Some(Node::symlink(target.as_os_str().as_bytes()))
    } else if kind.is_dir() {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(path).ok()? {
            let entry = entry.ok()?;
            let name = entry.file_name();
            *budget = budget.checked_sub(name.len())?;
            let node = small_node(&entry.path(), budget)?;
            entries.push((name.as_bytes().to_vec(), node));
        }
        Some(Node::directory(entries))
    } else {
        None
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        if let Err(e) = self.settle_journal() {
            tracing::warn!(error = %e, "syncing journaled store files");
        }
    }
}
