//! Adding paths: a NAR (or a tree, serialised on the fly) is restored under
//! a temporary name in the store directory with canonical metadata
//! (0444/0555, mtime 1) while its hashes are computed in the same pass, then
//! checked, made durable, renamed into place and registered in one
//! transaction per batch.
//!
//! Durability costs fsyncs; [`Durability::Batch`] restores many paths, then
//! flushes the file system once (`syncfs`) and commits once, which is what
//! makes bulk adds (imports, `kiln store add` of many paths) cheap without
//! giving up "a registered path survives a power cut".

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use kiln_formats::content_address::ContentAddress;
use kiln_formats::hash::{Hash, HashAlgo, Hasher};
use kiln_formats::nar::{self, Event, NarReader, Node};
use kiln_formats::store_path::{FileIngestionMethod, StorePath, StorePathSet};

use super::fsutil::{self, set_canonical_times};
use super::lock::PathLock;
use super::{LocalStore, drv, journal, par};
use crate::store::text_path_info;
use crate::{AddOptions, NarSource, PathInfo, Store, StoreError};

mod direct;
mod import;

use direct::{DIRECT_MIN, DirectWriter};

/// How new paths are made durable before they are registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync every file and directory as it is written (one path at a time).
    FsyncEach,
    /// One `syncfs` of the store's file system per batch (many paths).
    Batch,
}

/// How a commit's files are durable before it registers them.
#[derive(Debug, Clone, Copy)]
enum Settle<'c> {
    /// Synced before the commit.
    Synced(Durability),
    /// One path, whose NAR the commit itself holds (see `journal`).
    Journaled(&'c [u8]),
}

/// A file or tree to add with [`LocalStore::add_paths`].
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub name: String,
    pub source: PathBuf,
    pub method: FileIngestionMethod,
    pub algo: HashAlgo,
}

/// Paths registered per transaction (bounded so the lock files held at
/// once stay well under the file-descriptor limit).
const BATCH: usize = 256;
/// Regular files up to this size are serialised in memory; larger sources
/// stream through a second thread.
const IN_MEMORY: u64 = 4 << 20;

/// Which content-address hash to compute besides the NAR's sha256.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CaHashing {
    /// None needed (recursive sha256 is the NAR hash).
    None,
    /// The contents of the root regular file (flat and text paths).
    FlatFile(HashAlgo),
    /// The NAR, with another algorithm than sha256.
    Nar(HashAlgo),
}

impl CaHashing {
    fn for_ca(ca: &ContentAddress) -> CaHashing {
        match ca {
            ContentAddress::Text(h) => CaHashing::FlatFile(h.algo()),
            ContentAddress::Fixed {
                method: FileIngestionMethod::Flat,
                hash,
            } => CaHashing::FlatFile(hash.algo()),
            ContentAddress::Fixed { hash, .. } if hash.algo() == HashAlgo::Sha256 => {
                CaHashing::None
            }
            ContentAddress::Fixed { hash, .. } => CaHashing::Nar(hash.algo()),
        }
    }
}

/// A NAR restored under a temporary name, with what was computed on the way.
#[derive(Debug)]
pub(crate) struct Staged {
    pub temp: PathBuf,
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// The extra hash asked for by [`CaHashing`].
    pub ca_hash: Option<Hash>,
}

/// Who computes a restored NAR's sha256.
#[derive(Debug, Clone, Copy)]
enum NarHashing {
    /// The restoring thread, as it reads the NAR.
    Here,
    /// The thread producing the NAR (a local tree being serialised), which
    /// leaves the restoring thread to parse and write.
    ByProducer,
}

/// A restored NAR before its sha256 is attached.
#[derive(Debug)]
struct Restored {
    temp: PathBuf,
    nar_size: u64,
    ca_hash: Option<Hash>,
}

impl Restored {
    fn staged(self, nar_hash: Hash) -> Staged {
        Staged {
            temp: self.temp,
            nar_hash,
            nar_size: self.nar_size,
            ca_hash: self.ca_hash,
        }
    }
}

/// A staged path, checked and locked, ready to be renamed and registered.
#[derive(Debug)]
pub(crate) struct Ready {
    pub info: PathInfo,
    pub temp: PathBuf,
    /// Held until the path is registered.
    pub _lock: PathLock,
}

/// Everything consumed from the NAR stream is hashed and counted here, so
/// the hash covers exactly the archive even when it is embedded in a
/// longer stream.
struct Meter<'a> {
    inner: &'a mut dyn BufRead,
    sha256: Option<Hasher>,
    extra: Option<Hasher>,
    len: u64,
}

impl Read for Meter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        kiln_formats::bufread::read_via_buffer(self, buf)
    }
}

impl BufRead for Meter<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        if n > 0 {
            // The bytes are buffered already; this does not read.
            if let Ok(buf) = self.inner.fill_buf() {
                let data = &buf[..n.min(buf.len())];
                for h in [&mut self.sha256, &mut self.extra].into_iter().flatten() {
                    h.update(data);
                }
            }
            self.len += n as u64;
        }
        self.inner.consume(n);
    }
}

/// A file being restored, optionally hashed for flat ingestion.
struct FileSink<'a> {
    file: &'a mut File,
    hasher: Option<&'a mut Hasher>,
}

impl Write for FileSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        if let Some(h) = self.hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl LocalStore {
    /// A fresh temporary name in the store directory. The collector leaves
    /// `.kiln-tmp-<pid>-…` alone while process `<pid>` is alive.
    pub fn temp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.real_store
            .join(format!(".kiln-tmp-{}-{n}", std::process::id()))
    }

    /// Restores the NAR on `nar` under a temporary name; removes what was
    /// written if anything fails.
    pub(crate) fn stage_nar(
        &self,
        nar: &mut dyn BufRead,
        label: &str,
        ca: CaHashing,
        durability: Durability,
    ) -> Result<Staged, StoreError> {
        let (restored, nar_hash) =
            self.restore_nar(nar, label, ca, durability, NarHashing::Here)?;
        Ok(restored.staged(nar_hash.expect("hashed here")))
    }

    /// [`LocalStore::stage_nar`], with the NAR's sha256 computed here or
    /// by whoever produces the NAR.
    fn restore_nar(
        &self,
        nar: &mut dyn BufRead,
        label: &str,
        ca: CaHashing,
        durability: Durability,
        hashing: NarHashing,
    ) -> Result<(Restored, Option<Hash>), StoreError> {
        let temp = self.temp_path();
        let mut meter = Meter {
            inner: nar,
            sha256: match hashing {
                NarHashing::Here => Some(Hasher::new(HashAlgo::Sha256)),
                NarHashing::ByProducer => None,
            },
            extra: match ca {
                CaHashing::Nar(algo) => Some(Hasher::new(algo)),
                _ => None,
            },
            len: 0,
        };
        let mut flat = match ca {
            CaHashing::FlatFile(algo) => Some(Hasher::new(algo)),
            _ => None,
        };
        let result = restore_canonical(
            &mut meter,
            &temp,
            label,
            flat.as_mut(),
            durability == Durability::FsyncEach,
        );
        if let Err(e) = result {
            let _ = fsutil::remove_tree(&temp);
            return Err(e);
        }
        let ca_hash = match (ca, flat, meter.extra.take()) {
            (CaHashing::FlatFile(_), Some(h), _) => Some(h.finish()),
            (CaHashing::FlatFile(algo), None, _) => {
                let _ = fsutil::remove_tree(&temp);
                return Err(StoreError::BadSource {
                    path: PathBuf::from(label),
                    what: format!(
                        "flat {algo} hashing needs a single regular file, but the NAR holds a tree"
                    ),
                });
            }
            (_, _, Some(h)) => Some(h.finish()),
            _ => None,
        };
        let restored = Restored {
            temp,
            nar_size: meter.len,
            ca_hash,
        };
        Ok((restored, meter.sha256.map(Hasher::finish)))
    }

    /// Renames staged paths into place, makes them durable and registers
    /// them in one transaction.
    pub(crate) fn commit(
        &self,
        ready: Vec<Ready>,
        durability: Durability,
    ) -> Result<Vec<PathInfo>, StoreError> {
        self.commit_settled(ready, Settle::Synced(durability))
    }

    fn commit_settled(
        &self,
        ready: Vec<Ready>,
        settle: Settle<'_>,
    ) -> Result<Vec<PathInfo>, StoreError> {
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        let mut outputs = BTreeMap::new();
        for r in &ready {
            if r.info.path.is_derivation() {
                if let Ok(contents) = fs::read(&r.temp) {
                    outputs.insert(
                        r.info.path.clone(),
                        drv::derivation_outputs(&self.config.store_dir, &r.info.path, &contents),
                    );
                }
            }
        }
        for r in &ready {
            self.move_into_place(&r.temp, &self.real_path(&r.info.path))?;
        }
        match settle {
            Settle::Synced(Durability::FsyncEach) => fsutil::fsync_dir(&self.real_store),
            Settle::Synced(Durability::Batch) => fsutil::syncfs(&self.real_store),
            Settle::Journaled(_) => Ok(()),
        }
        .map_err(|e| StoreError::io("sync", &self.real_store, e))?;
        let time = now();
        let infos: Vec<PathInfo> = ready
            .iter()
            .map(|r| {
                let mut info = r.info.clone();
                info.registration_time = time;
                info
            })
            .collect();
        let journaled: Vec<(&StorePath, &[u8])> = match settle {
            Settle::Journaled(nar) => {
                let [info] = &infos[..] else {
                    unreachable!("one journaled path per commit");
                };
                vec![(&info.path, nar)]
            }
            Settle::Synced(_) => Vec::new(),
        };
        let rows = self.register_journaling(&infos, &outputs, &journaled)?;
        // Release the path locks only now (deleting each lock file also
        // waits on the journal, so in parallel).
        par::map(ready, drop);
        self.journaled(rows);
        Ok(infos)
    }

    /// Renames a staged path to `dest`; an invalid leftover there, or the
    /// old contents of a path being repaired, are swapped out atomically
    /// (so a valid path is never missing) and then deleted.
    pub(crate) fn move_into_place(&self, temp: &Path, dest: &Path) -> Result<(), StoreError> {
        match fs::rename(temp, dest) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EEXIST)
                        | Some(libc::ENOTEMPTY)
                        | Some(libc::EISDIR)
                        | Some(libc::ENOTDIR)
                ) =>
            {
                fsutil::exchange(temp, dest)
                    .map_err(|e| StoreError::io("move into place", dest, e))?;
                fsutil::remove_tree(temp).map_err(|e| StoreError::io("delete", temp, e))?;
                Ok(())
            }
            Err(e) => Err(StoreError::io("move into place", dest, e)),
        }
    }

    /// Takes the lock of `path` after making it a temporary root.
    pub(crate) fn lock_path(&self, path: &StorePath) -> Result<PathLock, StoreError> {
        self.add_temp_root(path)?;
        self.lock_rooted_path(path)
    }

    /// The lock of `path` when our parent holds it for us (see
    /// [`LocalStore::assume_locks_held_by_parent`]): taking it ourselves
    /// would wait for the parent, which waits for us.
    fn lock_held_by_parent(&self, path: &StorePath) -> Option<PathLock> {
        self.locks_held_by_parent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(path)
            .then(|| PathLock::held_by_parent(&PathLock::lock_path_for(&self.real_store, path)))
    }

    /// Takes the lock of `path`, a temporary root already, waiting for it.
    fn lock_rooted_path(&self, path: &StorePath) -> Result<PathLock, StoreError> {
        if let Some(held) = self.lock_held_by_parent(path) {
            return Ok(held);
        }
        Ok(
            PathLock::acquire(&PathLock::lock_path_for(&self.real_store, path), true)?
                .expect("waiting lock acquisition always succeeds"),
        )
    }

    pub(crate) fn add_nar_impl(
        &self,
        info: &PathInfo,
        nar: &mut dyn BufRead,
        options: AddOptions,
    ) -> Result<(), StoreError> {
        let label = self.config.store_dir.print_path(&info.path);
        let skip = |nar: &mut dyn BufRead| crate::export::skip_nar(nar, &label);
        self.add_temp_root(&info.path)?;
        if !options.repair && self.is_valid_path(&info.path)? {
            return skip(nar);
        }
        let lock = self.lock_path(&info.path)?;
        if !options.repair && self.is_valid_path(&info.path)? {
            return skip(nar);
        }
        let ca = info.ca.as_ref().map_or(CaHashing::None, CaHashing::for_ca);
        let staged = self.stage_nar(nar, &label, ca, Durability::FsyncEach)?;
        if let Err(e) = self.check_staged(info, &staged) {
            let _ = fsutil::remove_tree(&staged.temp);
            return Err(e);
        }
        self.commit(
            vec![Ready {
                info: info.clone(),
                temp: staged.temp,
                _lock: lock,
            }],
            Durability::FsyncEach,
        )?;
        Ok(())
    }

    /// Adds many paths from their NARs ([`Store::add_nars`]): per batch,
    /// the NARs are restored on several threads without an fsync each,
    /// then one `syncfs` makes them all durable before one transaction
    /// registers them — a path is still valid only once its contents are
    /// on disk, for a fraction of the cost of an fsync per file.
    pub(crate) fn add_nars_impl(
        &self,
        infos: &[PathInfo],
        nars: &NarSource<'_>,
        options: AddOptions,
        jobs: usize,
    ) -> Result<Vec<StorePath>, StoreError> {
        let roots: Vec<&StorePath> = infos.iter().map(|i| &i.path).collect();
        self.add_temp_roots(&roots)?;
        let workers = if jobs == 0 { par::IO_WORKERS } else { jobs };
        let mut seen = std::collections::HashSet::new();
        let mut added = Vec::with_capacity(infos.len());
        // Batches follow the given (dependency) order, so each batch's
        // references are valid or in the batch when it is registered.
        for chunk in infos.chunks(BATCH) {
            let todo: Vec<&PathInfo> = chunk
                .iter()
                .filter(|i| seen.insert(i.path.clone()))
                .collect();
            let todo = self.still_to_add(todo, options)?;
            if todo.is_empty() {
                continue;
            }
            let mut by_name: Vec<&PathInfo> = todo.clone();
            by_name.sort_by(|a, b| a.path.cmp(&b.path));
            let real_store = &self.real_store;
            par::map(by_name.iter().map(|i| &i.path).collect(), |p| {
                PathLock::precreate(&PathLock::lock_path_for(real_store, p))
            });
            // Waiting while holding others is safe in one global order
            // (sorted, as Nix and the scheduler lock); whoever holds a
            // lock we wait for never waits for ours.
            let mut locks = std::collections::HashMap::with_capacity(by_name.len());
            for info in by_name {
                locks.insert(info.path.clone(), self.lock_rooted_path(&info.path)?);
            }
            // Another process may have added some while we waited.
            let todo = self.still_to_add(todo, options)?;
            let staged = par::map_on(workers, todo, |info| {
                let label = self.config.store_dir.print_path(&info.path);
                let ca = info.ca.as_ref().map_or(CaHashing::None, CaHashing::for_ca);
                let staged = crate::substitute::with_nar(info, nars, |nar| {
                    self.stage_nar(nar, &label, ca, Durability::Batch)
                })?;
                match self.check_staged(info, &staged) {
                    Ok(()) => Ok((info, staged.temp)),
                    Err(e) => {
                        let _ = fsutil::remove_tree(&staged.temp);
                        Err(e)
                    }
                }
            });
            let mut ready = Vec::with_capacity(staged.len());
            let mut failure = None;
            for result in staged {
                match result {
                    Ok((info, temp)) => ready.push(Ready {
                        info: info.clone(),
                        temp,
                        _lock: locks
                            .remove(&info.path)
                            .expect("every path to add was locked"),
                    }),
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failure {
                par::map(ready, |r| fsutil::remove_tree(&r.temp));
                return Err(e);
            }
            added.extend(
                self.commit(ready, Durability::Batch)?
                    .into_iter()
                    .map(|i| i.path),
            );
        }
        Ok(added)
    }

    /// The paths of `infos` that are not valid (all of them when
    /// repairing), asked under one hold of the database.
    fn still_to_add<'i>(
        &self,
        infos: Vec<&'i PathInfo>,
        options: AddOptions,
    ) -> Result<Vec<&'i PathInfo>, StoreError> {
        if options.repair {
            return Ok(infos);
        }
        let db = self.reader()?;
        let mut todo = Vec::with_capacity(infos.len());
        for info in infos {
            if !db.is_valid(&info.path)? {
                todo.push(info);
            }
        }
        Ok(todo)
    }

    /// Checks a staged NAR against the hash, size and content address it
    /// was announced with.
    pub(crate) fn check_staged(&self, info: &PathInfo, staged: &Staged) -> Result<(), StoreError> {
        let label = || self.config.store_dir.print_path(&info.path);
        info.check_nar(&self.config.store_dir, staged.nar_hash, staged.nar_size)?;
        if let Some(ca) = &info.ca {
            let actual = staged.ca_hash.unwrap_or(staged.nar_hash);
            let computed_ca = match ca {
                ContentAddress::Text(_) => ContentAddress::Text(actual),
                ContentAddress::Fixed { method, .. } => ContentAddress::Fixed {
                    method: *method,
                    hash: actual,
                },
            };
            let has_self = info.references.contains(&info.path);
            let others: StorePathSet = info.references_without_self().cloned().collect();
            let computed =
                computed_ca.store_path(&self.config.store_dir, info.path.name(), &others, has_self);
            if computed.as_ref() != Ok(&info.path) || computed_ca != *ca {
                return Err(StoreError::ContentAddressMismatch {
                    path: label(),
                    ca: ca.to_string(),
                    computed: match computed {
                        Ok(p) => {
                            format!("{} ({computed_ca})", self.config.store_dir.print_path(&p))
                        }
                        Err(e) => e.to_string(),
                    },
                });
            }
        }
        Ok(())
    }

    pub(crate) fn add_text_impl(
        &self,
        name: &str,
        contents: &[u8],
        references: &StorePathSet,
    ) -> Result<PathInfo, StoreError> {
        let info = text_path_info(&self.config.store_dir, name, contents, references)?;
        self.add_temp_root(&info.path)?;
        if let Some(existing) = self.query_path_info(&info.path)? {
            return Ok(existing);
        }
        let lock = self.lock_path(&info.path)?;
        if let Some(existing) = self.query_path_info(&info.path)? {
            return Ok(existing);
        }
        let nar = Node::file(contents.to_vec()).to_nar();
        let label = self.config.store_dir.print_path(&info.path);
        // Small texts are made durable by their commit (see `journal`).
        let journaled = nar.len() <= journal::JOURNALED_MAX;
        let staged = self.stage_nar(
            &mut &nar[..],
            &label,
            CaHashing::None,
            if journaled {
                Durability::Batch
            } else {
                Durability::FsyncEach
            },
        )?;
        let ready = vec![Ready {
            info,
            temp: staged.temp,
            _lock: lock,
        }];
        let mut infos = if journaled {
            self.commit_settled(ready, Settle::Journaled(&nar))?
        } else {
            self.commit(ready, Durability::FsyncEach)?
        };
        Ok(infos.pop().expect("one in, one out"))
    }

    /// Adds files or trees as fixed-output paths (what `nix-store --add`
    /// and `nix store add-path/add-file` do), in batches.
    pub fn add_paths(
        &self,
        items: &[BatchItem],
        options: AddOptions,
        durability: Durability,
    ) -> Result<Vec<PathInfo>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            let mut ready = Vec::new();
            // Restoring and locking many small paths waits on the journal
            // for every file created: do it on several threads at once.
            let results = par::map(chunk.iter().collect(), |item| {
                self.stage_item(item, durability)
            });
            let mut staged = Vec::with_capacity(chunk.len());
            let mut failure = None;
            for r in results {
                match r {
                    Ok(s) => staged.push(s),
                    Err(e) => failure = failure.or(Some(e)),
                }
            }
            if let Some(e) = failure {
                par::map(staged, |(_, temp)| fsutil::remove_tree(&temp));
                return Err(e);
            }
            // One write to the temp-roots file for the whole chunk.
            let roots: Vec<&StorePath> = staged.iter().map(|(info, _)| &info.path).collect();
            self.add_temp_roots(&roots)?;
            // Duplicates in one batch are added once (locking a path twice
            // would wait on ourselves).
            let order_paths: Vec<StorePath> = staged.iter().map(|(i, _)| i.path.clone()).collect();
            let mut unique: Vec<(PathInfo, PathBuf)> = Vec::with_capacity(staged.len());
            for (info, temp) in staged {
                if unique.iter().any(|(u, _)| u.path == info.path) {
                    let _ = fsutil::remove_tree(&temp);
                } else {
                    unique.push((info, temp));
                }
            }
            // One order for everyone, as Nix sorts the paths it locks.
            unique.sort_by(|a, b| a.0.path.cmp(&b.0.path));
            // Lock files cost a journal wait each to create: make them in
            // parallel, then lock them one by one.
            let real_store = &self.real_store;
            par::map(unique.iter().map(|(i, _)| &i.path).collect(), |p| {
                PathLock::precreate(&PathLock::lock_path_for(real_store, p))
            });
            let mut infos: std::collections::HashMap<StorePath, PathInfo> = Default::default();
            let mut failure = None;
            for (info, temp) in unique {
                if failure.is_some() {
                    let _ = fsutil::remove_tree(&temp);
                    continue;
                }
                let lock = match self
                    .lock_without_deadlock(&info.path, &mut ready, durability, &mut infos)
                {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = fsutil::remove_tree(&temp);
                        failure = Some(e);
                        continue;
                    }
                };
                if !options.repair {
                    match self.query_path_info(&info.path) {
                        Ok(Some(existing)) => {
                            let _ = fsutil::remove_tree(&temp);
                            infos.insert(existing.path.clone(), existing);
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let _ = fsutil::remove_tree(&temp);
                            failure = Some(e);
                            continue;
                        }
                    }
                }
                ready.push(Ready {
                    info,
                    temp,
                    _lock: lock,
                });
            }
            if let Some(e) = failure {
                par::map(ready, |r| fsutil::remove_tree(&r.temp));
                return Err(e);
            }
            for info in self.commit(ready, durability)? {
                infos.insert(info.path.clone(), info);
            }
            for path in order_paths {
                out.push(
                    infos
                        .get(&path)
                        .cloned()
                        .expect("every staged path was committed or found valid"),
                );
            }
        }
        Ok(out)
    }

    /// Locks `path` for a batch that already holds the locks in `ready`:
    /// tries first, and if another process holds it, commits the batch so
    /// far (releasing our locks) before waiting, so two processes never
    /// wait on each other's locks.
    fn lock_without_deadlock(
        &self,
        path: &StorePath,
        ready: &mut Vec<Ready>,
        durability: Durability,
        infos: &mut std::collections::HashMap<StorePath, PathInfo>,
    ) -> Result<PathLock, StoreError> {
        if let Some(held) = self.lock_held_by_parent(path) {
            return Ok(held);
        }
        let lock_path = PathLock::lock_path_for(&self.real_store, path);
        if let Some(lock) = PathLock::acquire(&lock_path, false)? {
            return Ok(lock);
        }
        for info in self.commit(std::mem::take(ready), durability)? {
            infos.insert(info.path.clone(), info);
        }
        Ok(PathLock::acquire(&lock_path, true)?.expect("waiting lock acquisition always succeeds"))
    }

    /// Stages a regular file small enough to hold: one read, the hashes
    /// computed from the contents and the NAR framing (no NAR is built or
    /// parsed), one write under a temporary name.
    fn stage_small_file(
        &self,
        source: &Path,
        executable: bool,
        ca: CaHashing,
        durability: Durability,
    ) -> Result<Staged, StoreError> {
        let contents = fs::read(source).map_err(|e| StoreError::io("read", source, e))?;
        let (nar_hash, nar_size) =
            fsutil::single_file_nar_hash(HashAlgo::Sha256, executable, &contents);
        let ca_hash = match ca {
            CaHashing::None => None,
            CaHashing::FlatFile(algo) => Some(Hash::digest(algo, &contents)),
            CaHashing::Nar(algo) => {
                Some(fsutil::single_file_nar_hash(algo, executable, &contents).0)
            }
        };
        let temp = self.temp_path();
        if let Err(e) = write_canonical_file(&temp, executable, &contents, durability) {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        Ok(Staged {
            temp,
            nar_hash,
            nar_size,
            ca_hash,
        })
    }

    /// Restores one source under a temporary name; returns its metadata
    /// and that name.
    fn stage_item(
        &self,
        item: &BatchItem,
        durability: Durability,
    ) -> Result<(PathInfo, PathBuf), StoreError> {
        let source = &item.source;
        let meta = fs::symlink_metadata(source).map_err(|e| StoreError::io("read", source, e))?;
        if item.method == FileIngestionMethod::Flat && !meta.is_file() {
            return Err(StoreError::BadSource {
                path: source.clone(),
                what: "flat hashing needs a regular file".into(),
            });
        }
        let ca_hashing = match (item.method, item.algo) {
            (FileIngestionMethod::Flat, algo) => CaHashing::FlatFile(algo),
            (FileIngestionMethod::Recursive, HashAlgo::Sha256) => CaHashing::None,
            (FileIngestionMethod::Recursive, algo) => CaHashing::Nar(algo),
        };
        let label = source.display().to_string();
        let staged = if meta.is_file() && meta.len() <= IN_MEMORY {
            let executable = meta.permissions().mode() & 0o100 != 0;
            self.stage_small_file(source, executable, ca_hashing, durability)?
        } else {
            let (restored, dumped) = nar::dump_path_read(source, HashAlgo::Sha256, |nar| {
                self.restore_nar(nar, &label, ca_hashing, durability, NarHashing::ByProducer)
            });
            match (restored, dumped) {
                (Ok((r, _)), Ok((nar_hash, nar_size))) if nar_size == r.nar_size => {
                    r.staged(nar_hash)
                }
                (Ok((r, _)), Ok((_, nar_size))) => {
                    let _ = fsutil::remove_tree(&r.temp);
                    return Err(StoreError::BadSource {
                        path: source.clone(),
                        what: format!(
                            "its NAR was {nar_size} bytes, but {} were restored",
                            r.nar_size
                        ),
                    });
                }
                (Ok((r, _)), Err(e)) => {
                    let _ = fsutil::remove_tree(&r.temp);
                    return Err(e.into());
                }
                // Reading the tree failed: that explains a truncated NAR best.
                (Err(_), Err(e)) => return Err(e.into()),
                (Err(e), Ok(_)) => return Err(e),
            }
        };
        let ca = ContentAddress::Fixed {
            method: item.method,
            hash: staged.ca_hash.unwrap_or(staged.nar_hash),
        };
        let path = match ca.store_path(
            &self.config.store_dir,
            &item.name,
            &StorePathSet::new(),
            false,
        ) {
            Ok(p) => p,
            Err(e) => {
                let _ = fsutil::remove_tree(&staged.temp);
                return Err(e.into());
            }
        };
        let mut info = PathInfo::new(path, staged.nar_hash, staged.nar_size);
        info.ca = Some(ca);
        Ok((info, staged.temp))
    }
}

/// Writes `contents` as a new file at `dest` with canonical metadata
/// (0444 or 0555, mtime 1); fsyncs it when each path is to be durable on
/// its own.
fn write_canonical_file(
    dest: &Path,
    executable: bool,
    contents: &[u8],
    durability: Durability,
) -> Result<(), StoreError> {
    let mode = if executable { 0o555 } else { 0o444 };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_CLOEXEC)
        .open(dest)
        .map_err(|e| StoreError::io("create", dest, e))?;
    file.write_all(contents)
        .map_err(|e| StoreError::io("write", dest, e))?;
    fsutil::finish_canonical_file(&file, mode).map_err(|e| StoreError::io("finish", dest, e))?;
    if durability == Durability::FsyncEach {
        file.sync_all()
            .map_err(|e| StoreError::io("fsync", dest, e))?;
    }
    Ok(())
}

/// Restores a NAR at `dest` with canonical metadata. `flat` hashes the
/// contents of a root regular file.
pub(crate) fn restore_canonical(
    input: &mut dyn BufRead,
    dest: &Path,
    label: &str,
    mut flat: Option<&mut Hasher>,
    fsync_each: bool,
) -> Result<(), StoreError> {
    let mut reader = NarReader::embedded(input);
    let bad = |source| StoreError::BadNar {
        path: label.to_owned(),
        source,
    };
    // Files are fsync'd in groups once written (see `Syncer`), or not at
    // all when the caller makes the whole batch durable.
    let mut syncer = Syncer::new(fsync_each);
    // Made at the first large file.
    let mut direct: Option<DirectWriter> = None;
    while let Some(event) = reader.next().map_err(bad)? {
        let target = match event.path() {
            b"" => dest.to_path_buf(),
            p => dest.join(OsStr::from_bytes(p)),
        };
        match event {
            Event::Directory { .. } => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&target)
                    .map_err(|e| StoreError::io("create directory", &target, e))?;
            }
            Event::EndDirectory { .. } => {
                fs::set_permissions(&target, fs::Permissions::from_mode(0o555))
                    .and_then(|()| set_canonical_times(&target))
                    .map_err(|e| StoreError::io("finish directory", &target, e))?;
                if syncer.per_file {
                    // After the files in it, which are submitted earlier.
                    let dir = File::open(&target)
                        .map_err(|e| StoreError::io("open directory", &target, e))?;
                    syncer.submit(dir, target);
                }
            }
            Event::Symlink { target: link, .. } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(link), &target)
                    .and_then(|()| set_canonical_times(&target))
                    .map_err(|e| StoreError::io("create symlink", &target, e))?;
            }
            Event::Regular {
                executable,
                mut contents,
                path,
                ..
            } => {
                let mode = if executable { 0o555 } else { 0o444 };
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&target)
                    .map_err(|e| StoreError::io("create", &target, e))?;
                let hasher = if path.is_empty() {
                    flat.as_deref_mut()
                } else {
                    None
                };
                // Large files go around the page cache where the file
                // system allows it.
                let direct_file = if contents.remaining() >= DIRECT_MIN {
                    DirectWriter::try_direct(file)
                } else {
                    Err(file)
                };
                match direct_file {
                    Ok(file) => {
                        let writer = match &mut direct {
                            Some(writer) => writer,
                            None => direct.insert(
                                DirectWriter::spawn()
                                    .map_err(|e| StoreError::io("write", &target, e))?,
                            ),
                        };
                        let mut sink = writer.open(file, &target, mode, hasher)?;
                        contents
                            .copy_to(&mut sink)
                            .and_then(|_| sink.finish())
                            .map_err(|e| write_error(e, label, &target))?;
                        // Finished files are collected as they come, so
                        // that few stay open.
                        syncer.submit_all(writer.finished()?);
                    }
                    Err(mut file) => {
                        let mut sink = FileSink {
                            file: &mut file,
                            hasher,
                        };
                        contents
                            .copy_to(&mut sink)
                            .map_err(|e| write_error(e, label, &target))?;
                        fsutil::finish_canonical_file(&file, mode)
                            .map_err(|e| StoreError::io("finish", &target, e))?;
                        syncer.submit_written(file, target);
                    }
                }
            }
        }
    }
    if let Some(writer) = direct {
        syncer.submit_all(writer.close()?);
    }
    syncer.finish()
}

/// A failed copy of a file's contents: the NAR's fault, or the disk's.
fn write_error(e: io::Error, label: &str, target: &Path) -> StoreError {
    match nar::ReadError::from_io(e) {
        Ok(source) => StoreError::BadNar {
            path: label.to_owned(),
            source,
        },
        Err(e) => StoreError::io("write", target, e),
    }
}

/// fsyncs the files and directories handed to it, in groups: writeback of
/// each file starts as soon as it is written (`sync_file_range`), and the
/// fsyncs of a group are issued together on several threads, so the file
/// system folds them into a few journal commits instead of one per file.
/// A group is synced in the background while the next one is written; open
/// handles are bounded by two groups. Without `per_file`, what is handed
/// in is let go at once: the caller syncs the whole batch.
#[derive(Debug)]
struct Syncer {
    per_file: bool,
    pending: Vec<(File, PathBuf)>,
    /// The group being synced, if any.
    syncing: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
    result: Option<StoreError>,
}

/// fsyncs in flight at once, and files held open in a group.
const SYNC_WORKERS: usize = 16;
const SYNC_GROUP: usize = 256;

impl Syncer {
    fn new(per_file: bool) -> Syncer {
        Syncer {
            per_file,
            pending: Vec::new(),
            syncing: None,
            result: None,
        }
    }

    fn submit(&mut self, file: File, path: PathBuf) {
        if !self.per_file {
            return;
        }
        self.pending.push((file, path));
        if self.pending.len() >= SYNC_GROUP {
            self.wait();
            let group = std::mem::take(&mut self.pending);
            let syncing = std::thread::Builder::new()
                .name("kiln-fsync".into())
                .spawn(move || sync_group(group));
            match syncing {
                Ok(handle) => self.syncing = Some(handle),
                Err(e) => self.fail(StoreError::io("fsync", PathBuf::from("(a group)"), e)),
            }
        }
    }

    /// [`Syncer::submit`] for a file just written through the page cache:
    /// its writeback starts now.
    fn submit_written(&mut self, file: File, path: PathBuf) {
        if self.per_file {
            // SAFETY: an fd we own; the flag only starts writeback.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        self.submit(file, path);
    }

    fn submit_all(&mut self, files: Vec<(File, PathBuf)>) {
        for (file, path) in files {
            self.submit(file, path);
        }
    }

    /// Waits for the group being synced.
    fn wait(&mut self) {
        if let Some(handle) = self.syncing.take() {
            let result = handle.join().unwrap_or_else(|_| {
                Err(StoreError::io(
                    "fsync",
                    PathBuf::from("(a group)"),
                    io::Error::other("the fsync thread panicked"),
                ))
            });
            if let Err(e) = result {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, e: StoreError) {
        self.result.get_or_insert(e);
    }

    /// Waits for every fsync; the first failure, if any.
    fn finish(mut self) -> Result<(), StoreError> {
        let last = std::mem::take(&mut self.pending);
        let synced = sync_group(last);
        self.wait();
        if let Err(e) = synced {
            self.fail(e);
        }
        match self.result.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Syncer {
    /// A restore that failed still waits for its group, so no fsync runs
    /// on files after they are removed.
    fn drop(&mut self) {
        self.wait();
    }
}

/// fsyncs `group` on several threads; the first failure, if any.
fn sync_group(group: Vec<(File, PathBuf)>) -> Result<(), StoreError> {
    par::map_on(SYNC_WORKERS, group, |(file, path)| {
        file.sync_all()
            .map_err(|e| StoreError::io("fsync", &path, e))
    })
    .into_iter()
    .collect()
}
