//! Adding a stream of paths with their NARs — a `nix-store --export`
//! stream (what `nix copy` and the serve protocol's ImportPaths send) or
//! the daemon protocol's AddMultipleToStore — as a pipeline: the calling
//! thread reads the stream, small NARs are restored on [`par::IO_WORKERS`]
//! threads at once (file creation waits on the file system, and waits
//! overlap), and a committer thread registers the paths in stream order, a
//! batch at a time, while the next ones are restored. A NAR is only known
//! to end by parsing it, so each is skimmed into memory first; one larger
//! than [`SKIM_LIMIT`] is restored on the calling thread from the skimmed
//! part and the rest of the stream, so memory stays bounded.

use std::io::{BufRead, Cursor, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use kiln_formats::nar::NarReader;
use kiln_formats::store_path::StorePath;

use super::{BATCH, CaHashing, Durability, Ready, Staged};
use crate::export::{CopyConsumed, ExportedMeta, read_meta, read_more, skip_nar};
use crate::local::{LocalStore, fsutil, par};
use crate::{PathInfo, Store as _, StoreError};

/// NARs up to this size are restored on the worker threads.
const SKIM_LIMIT: u64 = 4 << 20;

/// What the stream says of a path.
enum Header {
    /// An export stream's metadata: the NAR is trusted to be the path's.
    Exported(ExportedMeta),
    /// Announced with its NAR hash and size (and maybe a content address),
    /// which the restored NAR is checked against.
    Announced(PathInfo),
}

impl Header {
    fn path(&self) -> &StorePath {
        match self {
            Header::Exported(meta) => &meta.path,
            Header::Announced(info) => &info.path,
        }
    }
}

/// A NAR waiting for a worker, and where its result goes.
struct Job {
    nar: Vec<u8>,
    ca: CaHashing,
    done: SyncSender<Result<Staged, StoreError>>,
}

/// A path of the stream on its way to the committer.
struct Entry {
    header: Header,
    staged: Pending,
}

/// A NAR restored, or being restored on a worker.
struct Pending(PendingInner);

enum PendingInner {
    Staged(Result<Staged, StoreError>),
    OnWorker(Receiver<Result<Staged, StoreError>>),
}

impl Pending {
    fn wait(self) -> Result<Staged, StoreError> {
        match self.0 {
            PendingInner::Staged(result) => result,
            PendingInner::OnWorker(done) => done.recv().unwrap_or_else(|_| {
                Err(StoreError::BadExport(
                    "a NAR restoring thread ended without an answer".into(),
                ))
            }),
        }
    }

    /// Removes what was restored, for a path that will not be added.
    fn discard(self) {
        if let Ok(staged) = self.wait() {
            let _ = fsutil::remove_tree(&staged.temp);
        }
    }
}

/// The reading end of the pipeline, given to the function that parses the
/// stream.
struct Feeder<'a> {
    store: &'a LocalStore,
    jobs: SyncSender<Job>,
    entries: SyncSender<Entry>,
    failed: &'a AtomicBool,
}

impl Feeder<'_> {
    /// Reads the next NAR off `input` and starts restoring it.
    fn nar(&self, input: &mut dyn BufRead, ca: CaHashing) -> Result<Pending, StoreError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(StoreError::BadExport("the import stopped".into()));
        }
        Ok(Pending(match skim(input) {
            Skimmed::Whole(nar) => {
                let (done, result) = mpsc::sync_channel(1);
                if self.jobs.send(Job { nar, ca, done }).is_err() {
                    return Err(StoreError::BadExport(
                        "the NAR restoring threads ended".into(),
                    ));
                }
                PendingInner::OnWorker(result)
            }
            Skimmed::Part(part) => {
                let mut rest = Cursor::new(part).chain(&mut *input);
                PendingInner::Staged(self.store.stage_streamed(&mut rest, ca))
            }
        }))
    }

    /// Hands a path and its NAR to the committer, in stream order.
    fn add(&self, header: Header, staged: Pending) -> Result<(), StoreError> {
        if let Err(mpsc::SendError(entry)) = self.entries.send(Entry { header, staged }) {
            // The committer has stopped on an error, which it reports.
            entry.staged.discard();
            return Err(StoreError::BadExport("the import stopped".into()));
        }
        Ok(())
    }
}

impl LocalStore {
    /// Imports a `nix-store --export` stream: NARs are restored as they
    /// arrive, several at once, and paths are registered in stream order,
    /// in batches with one `syncfs` and one transaction each. Returns the
    /// paths in stream order. On an error, the batches registered so far
    /// stay (each path complete and valid); nothing else is.
    pub fn import_paths(&self, input: &mut dyn BufRead) -> Result<Vec<StorePath>, StoreError> {
        self.add_streamed(|feeder| {
            let mut imported = Vec::new();
            while read_more(input)? {
                let staged = feeder.nar(input, CaHashing::None)?;
                let meta = match read_meta(&self.config.store_dir, input) {
                    Ok(meta) => meta,
                    Err(e) => {
                        staged.discard();
                        return Err(e);
                    }
                };
                imported.push(meta.path.clone());
                feeder.add(Header::Exported(meta), staged)?;
            }
            Ok(imported)
        })
    }

    /// Adds `count` paths, each announced by `next_info` and followed by its
    /// NAR in `input` (the daemon protocol's AddMultipleToStore), in order,
    /// as [`import_paths`](Self::import_paths) does; each NAR is checked
    /// against its announced hash, size and content address. `next_info`
    /// may refuse a path, which ends the stream with its error. Paths valid
    /// already are skipped. Returns the paths added or found valid.
    pub fn add_nar_stream(
        &self,
        count: u64,
        input: &mut dyn BufRead,
        next_info: &mut dyn FnMut(&mut dyn BufRead) -> Result<PathInfo, StoreError>,
    ) -> Result<Vec<StorePath>, StoreError> {
        self.add_streamed(|feeder| {
            let mut paths = Vec::new();
            for _ in 0..count {
                let info = next_info(input)?;
                paths.push(info.path.clone());
                if self.is_valid_path(&info.path)? {
                    skip_nar(input, &self.config.store_dir.print_path(&info.path))?;
                    continue;
                }
                let ca = info.ca.as_ref().map_or(CaHashing::None, CaHashing::for_ca);
                let staged = feeder.nar(input, ca)?;
                feeder.add(Header::Announced(info), staged)?;
            }
            Ok(paths)
        })
    }

    /// Runs `read` (which parses the stream and feeds the pipeline) beside
    /// the restoring workers and the committer.
    fn add_streamed(
        &self,
        read: impl FnOnce(&Feeder<'_>) -> Result<Vec<StorePath>, StoreError>,
    ) -> Result<Vec<StorePath>, StoreError> {
        let failed = AtomicBool::new(false);
        let (jobs, jobs_rx) = mpsc::sync_channel::<Job>(par::IO_WORKERS);
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let (entries, entries_rx) = mpsc::sync_channel::<Entry>(BATCH);
        std::thread::scope(|scope| {
            for _ in 0..par::IO_WORKERS {
                let jobs = jobs_rx.clone();
                scope.spawn(move || {
                    loop {
                        let job = jobs.lock().map(|rx| rx.recv());
                        let Ok(Ok(Job { nar, ca, done })) = job else {
                            return;
                        };
                        let staged = self.stage_streamed(&mut Cursor::new(nar), ca);
                        if let Err(mpsc::SendError(Ok(staged))) = done.send(staged) {
                            // Nobody waits any more: an error elsewhere.
                            let _ = fsutil::remove_tree(&staged.temp);
                        }
                    }
                });
            }
            let committer = scope.spawn(|| self.commit_streamed(entries_rx, &failed));
            let feeder = Feeder {
                store: self,
                jobs,
                entries,
                failed: &failed,
            };
            let read = read(&feeder);
            if read.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            // Closing the channels ends the workers and the committer.
            drop(feeder);
            let committed = committer.join().unwrap_or_else(|_| {
                Err(StoreError::BadExport(
                    "the import committer panicked".into(),
                ))
            });
            // The committer's error is the cause when the reader only
            // stopped because of it.
            match (read, committed) {
                (Ok(paths), Ok(())) => Ok(paths),
                (_, Err(e)) | (Err(e), _) => Err(e),
            }
        })
    }

    fn stage_streamed(&self, nar: &mut dyn BufRead, ca: CaHashing) -> Result<Staged, StoreError> {
        self.stage_nar(nar, "(NAR stream)", ca, Durability::Batch)
    }

    /// Locks and registers the paths in stream order, a batch at a time.
    /// Once anything failed, removes what is left instead.
    fn commit_streamed(
        &self,
        entries: Receiver<Entry>,
        failed: &AtomicBool,
    ) -> Result<(), StoreError> {
        let mut ready: Vec<Ready> = Vec::new();
        let mut result = Ok(());
        for Entry { header, staged } in entries.iter() {
            if result.is_err() || failed.load(Ordering::Relaxed) {
                staged.discard();
                continue;
            }
            result = staged
                .wait()
                .and_then(|staged| self.ready_streamed(header, staged, &mut ready));
            if result.is_ok() && ready.len() >= BATCH {
                result = self
                    .commit(std::mem::take(&mut ready), Durability::Batch)
                    .map(drop);
            }
            if result.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
        }
        if result.is_ok() && !failed.load(Ordering::Relaxed) {
            return self.commit(ready, Durability::Batch).map(drop);
        }
        par::map(ready, |r| fsutil::remove_tree(&r.temp));
        result
    }

    /// Adds a restored path to `ready` under its lock, unless it is valid
    /// already; an announced one only if its NAR is the one announced.
    fn ready_streamed(
        &self,
        header: Header,
        staged: Staged,
        ready: &mut Vec<Ready>,
    ) -> Result<(), StoreError> {
        let outcome = (|| {
            self.add_temp_root(header.path())?;
            let info = match header {
                Header::Exported(meta) => {
                    let mut info = PathInfo::new(meta.path, staged.nar_hash, staged.nar_size);
                    info.references = meta.references;
                    info.deriver = meta.deriver;
                    info
                }
                Header::Announced(info) => {
                    self.check_staged(&info, &staged)?;
                    info
                }
            };
            let mut committed = Default::default();
            let lock =
                self.lock_without_deadlock(&info.path, ready, Durability::Batch, &mut committed)?;
            if self.is_valid_path(&info.path)? {
                return Ok(None);
            }
            Ok(Some((info, lock)))
        })();
        match outcome {
            Ok(Some((info, lock))) => {
                ready.push(Ready {
                    info,
                    temp: staged.temp,
                    _lock: lock,
                });
                Ok(())
            }
            Ok(None) => {
                let _ = fsutil::remove_tree(&staged.temp);
                Ok(())
            }
            Err(e) => {
                let _ = fsutil::remove_tree(&staged.temp);
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
