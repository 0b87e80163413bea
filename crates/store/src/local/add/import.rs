//! Importing a `nix-store --export` stream (what `nix copy` and the serve
//! protocol's ImportPaths send) as a pipeline: this thread reads the
//! stream, small NARs are restored on [`par::IO_WORKERS`] threads at once
//! (file creation waits on the file system, and waits overlap), and a
//! committer thread registers the paths in stream order, a batch at a time,
//! while the next ones are restored. A NAR is only known to end by parsing
//! it, so each is skimmed into memory first; one larger than
//! [`SKIM_LIMIT`] is restored here from the skimmed part and the rest of
//! the stream, as before, so memory stays bounded.

use std::io::{BufRead, Cursor, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use kiln_formats::nar::NarReader;
use kiln_formats::store_path::StorePath;

use super::{BATCH, CaHashing, Durability, Ready, Staged};
use crate::export::{CopyConsumed, ExportedMeta, read_meta, read_more};
use crate::local::{LocalStore, fsutil, par};
use crate::{PathInfo, Store as _, StoreError};

/// NARs up to this size are restored on the worker threads.
const SKIM_LIMIT: u64 = 4 << 20;

/// A NAR waiting for a worker, and where its result goes.
struct Job {
    nar: Vec<u8>,
    done: SyncSender<Result<Staged, StoreError>>,
}

/// A path of the stream on its way to the committer.
struct Entry {
    meta: ExportedMeta,
    staged: Pending,
}

enum Pending {
    Staged(Result<Staged, StoreError>),
    OnWorker(Receiver<Result<Staged, StoreError>>),
}

impl Pending {
    fn wait(self) -> Result<Staged, StoreError> {
        match self {
            Pending::Staged(result) => result,
            Pending::OnWorker(done) => done.recv().unwrap_or_else(|_| {
                Err(StoreError::BadExport(
                    "a NAR restoring thread ended without an answer".into(),
                ))
            }),
        }
    }
}

impl LocalStore {
    /// Imports a `nix-store --export` stream: NARs are restored as they
    /// arrive, several at once, and paths are registered in stream order,
    /// in batches with one `syncfs` and one transaction each. Returns the
    /// paths in stream order. On an error, the batches registered so far
    /// stay (each path complete and valid); nothing else is.
    pub fn import_paths(&self, input: &mut dyn BufRead) -> Result<Vec<StorePath>, StoreError> {
        let failed = AtomicBool::new(false);
        let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(par::IO_WORKERS);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (entries_tx, entries_rx) = mpsc::sync_channel::<Entry>(BATCH);
        std::thread::scope(|scope| {
            for _ in 0..par::IO_WORKERS {
                let jobs = jobs_rx.clone();
                scope.spawn(move || {
                    loop {
                        let job = jobs.lock().map(|rx| rx.recv());
                        let Ok(Ok(Job { nar, done })) = job else {
                            return;
                        };
                        let staged = self.stage_export_nar(&mut Cursor::new(nar));
                        if let Err(mpsc::SendError(Ok(staged))) = done.send(staged) {
                            // Nobody waits any more: an error elsewhere.
                            let _ = fsutil::remove_tree(&staged.temp);
                        }
                    }
                });
            }
            let committer = scope.spawn(|| self.commit_imports(entries_rx, &failed));
            let read = self.read_imports(input, &jobs_tx, &entries_tx, &failed);
            if read.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            drop(jobs_tx);
            drop(entries_tx);
            let committed = committer.join().unwrap_or_else(|_| {
                Err(StoreError::BadExport(
                    "the import committer panicked".into(),
                ))
            });
            // The committer's error is the cause when the reader only
            // stopped because of it.
            match (read, committed) {
                (Ok(imported), Ok(())) => Ok(imported),
                (_, Err(e)) | (Err(e), _) => Err(e),
            }
        })
    }

    /// Reads the stream, handing each path to the committer with its NAR
    /// restored here or on a worker.
    fn read_imports(
        &self,
        input: &mut dyn BufRead,
        jobs: &SyncSender<Job>,
        entries: &SyncSender<Entry>,
        failed: &AtomicBool,
    ) -> Result<Vec<StorePath>, StoreError> {
        let mut imported = Vec::new();
        while read_more(input)? {
            if failed.load(Ordering::Relaxed) {
                return Err(StoreError::BadExport("the import stopped".into()));
            }
            let staged = match skim(input) {
                Skimmed::Whole(nar) => {
                    let (done, result) = mpsc::sync_channel(1);
                    if jobs.send(Job { nar, done }).is_err() {
                        return Err(StoreError::BadExport(
                            "the NAR restoring threads ended".into(),
                        ));
                    }
                    Pending::OnWorker(result)
                }
                Skimmed::Part(part) => {
                    let mut rest = Cursor::new(part).chain(&mut *input);
                    Pending::Staged(self.stage_export_nar(&mut rest))
                }
            };
            let meta = match read_meta(&self.config.store_dir, input) {
                Ok(meta) => meta,
                Err(e) => {
                    if let Ok(staged) = staged.wait() {
                        let _ = fsutil::remove_tree(&staged.temp);
                    }
                    return Err(e);
                }
            };
            imported.push(meta.path.clone());
            if let Err(mpsc::SendError(entry)) = entries.send(Entry { meta, staged }) {
                // The committer has stopped on an error, which it reports.
                if let Ok(staged) = entry.staged.wait() {
                    let _ = fsutil::remove_tree(&staged.temp);
                }
                return Err(StoreError::BadExport("the import stopped".into()));
            }
        }
        Ok(imported)
    }

    fn stage_export_nar(&self, nar: &mut dyn BufRead) -> Result<Staged, StoreError> {
        self.stage_nar(nar, "(export stream)", CaHashing::None, Durability::Batch)
    }

    /// Locks and registers the paths in stream order, a batch at a time.
    /// Once anything failed, removes what is left instead.
    fn commit_imports(
        &self,
        entries: Receiver<Entry>,
        failed: &AtomicBool,
    ) -> Result<(), StoreError> {
        let mut ready: Vec<Ready> = Vec::new();
        let mut result = Ok(());
        for Entry { meta, staged } in entries.iter() {
            let staged = staged.wait();
            if result.is_ok() && !failed.load(Ordering::Relaxed) {
                result = staged.and_then(|staged| self.ready_import(meta, staged, &mut ready));
                if result.is_ok() && ready.len() >= BATCH {
                    result = self
                        .commit(std::mem::take(&mut ready), Durability::Batch)
                        .map(drop);
                }
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
            } else if let Ok(staged) = staged {
                let _ = fsutil::remove_tree(&staged.temp);
            }
        }
        if result.is_ok() && !failed.load(Ordering::Relaxed) {
            return self.commit(ready, Durability::Batch).map(drop);
        }
        par::map(ready, |r| fsutil::remove_tree(&r.temp));
        result
    }

    /// Adds a restored path to `ready` under its lock, unless it is valid
    /// already.
    fn ready_import(
        &self,
        meta: ExportedMeta,
        staged: Staged,
        ready: &mut Vec<Ready>,
    ) -> Result<(), StoreError> {
        let temp: PathBuf = staged.temp.clone();
        let outcome = (|| {
            let mut info = PathInfo::new(meta.path, staged.nar_hash, staged.nar_size);
            info.references = meta.references;
            info.deriver = meta.deriver;
            self.add_temp_root(&info.path)?;
            let mut committed = Default::default();
            let lock =
                self.lock_without_deadlock(&info.path, ready, Durability::Batch, &mut committed)?;
            if self.is_valid_path(&info.path)? {
                return Ok(None);
            }
            Ok(Some(Ready {
                info,
                temp: temp.clone(),
                _lock: lock,
            }))
        })();
        match outcome {
            Ok(Some(r)) => {
                ready.push(r);
                Ok(())
            }
            Ok(None) => {
                let _ = fsutil::remove_tree(&temp);
                Ok(())
            }
            Err(e) => {
                let _ = fsutil::remove_tree(&temp);
                Err(e)
            }
        }
    }
}

/// One NAR read off the stream: whole, or (past [`SKIM_LIMIT`]) its first
/// part, the rest still in the stream.
enum Skimmed {
    Whole(Vec<u8>),
    Part(Vec<u8>),
}

/// Reads one NAR off `input` into memory, checking its grammar to find its
/// end, and stops early once it outgrows [`SKIM_LIMIT`].
fn skim(input: &mut dyn BufRead) -> Skimmed {
    let mut captured = Vec::new();
    let mut tee = CopyConsumed::new(input, &mut captured);
    tee.limit = SKIM_LIMIT;
    let mut reader = NarReader::embedded(&mut tee);
    let ended = loop {
        match reader.next() {
            Ok(Some(_)) => {}
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    drop(reader);
    if ended {
        Skimmed::Whole(captured)
    } else {
        // Too large, or a bad NAR or stream: restoring it from here says
        // what is wrong, and where.
        Skimmed::Part(captured)
    }
}
