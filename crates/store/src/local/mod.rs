//! The local store: store paths as files under a store directory, their
//! validity in Nix's SQLite database, so that Nix 2.8 and Kiln can share a
//! store.
//!
//! Layout under the physical root (`/`, or `DIR` for `local?root=DIR`):
//! the store directory (logically `/nix/store`), and the state directory
//! `nix/var/nix` with `db/` (database, `schema`, `big-lock`), `gcroots/`,
//! `temproots/`, `profiles/` and `gc.lock`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kiln_formats::hash::HashAlgo;
use kiln_formats::nar;
use kiln_formats::store_path::{FileIngestionMethod, StoreDir, StorePath, StorePathSet};

use crate::{AddOptions, PathInfo, Store, StoreError};

mod add;
pub mod db;
mod drv;
pub mod fsutil;
pub mod gc;
pub mod journal;
pub mod lock;
pub mod optimise;
pub(crate) mod par;
pub mod runtime_roots;
pub mod verify;

pub use add::{BatchItem, Durability};
use db::Db;
pub use lock::{EnteredSession, TempRootsSession};
use lock::{FileLock, LockKind, TempRoots};

/// Where a local store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStoreConfig {
    /// Physical root (`local?root=DIR`); `None` for the real `/`.
    pub root: Option<PathBuf>,
    /// Logical store directory.
    pub store_dir: StoreDir,
    /// The URL it was named by, for messages.
    pub url: String,
}

impl LocalStoreConfig {
    /// A store under `root` with the default logical store directory.
    pub fn with_root(root: impl Into<PathBuf>) -> LocalStoreConfig {
        let root = root.into();
        LocalStoreConfig {
            url: format!("local?root={}", root.display()),
            root: Some(root),
            store_dir: StoreDir::default(),
        }
    }
}

/// The local store. Cheap to share between threads: the database
/// connection sits behind a mutex, everything else is per call.
#[derive(Debug)]
pub struct LocalStore {
    config: LocalStoreConfig,
    real_store: PathBuf,
    state_dir: PathBuf,
    /// The one connection that writes.
    db: Mutex<Db>,
    /// Connections for queries.
    readers: db::ReadPool,
    temp_roots: OnceLock<Arc<TempRoots>>,
    tmp_counter: AtomicU64,
    /// Paths whose locks our parent holds (Nix's `locksHeld`).
    locks_held_by_parent: Mutex<std::collections::BTreeSet<StorePath>>,
    /// Journal rows of ours whose files are not synced yet.
    unsynced: journal::Unsynced,
    _big_lock: FileLock,
}

/// The store paths in `NIX_HELD_LOCKS` (whitespace-separated, as Nix
/// reads it): a build hook that registers outputs through a child process
/// (`kiln store import`) tells it this way that their locks are held by
/// the scheduler above. Anything that is not a store path is ignored.
fn held_locks_from_environment(store_dir: &StoreDir) -> std::collections::BTreeSet<StorePath> {
    std::env::var("NIX_HELD_LOCKS")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| store_dir.parse_path(p).ok())
        .collect()
}

impl LocalStore {
    /// Opens (creating on first use) the store `config` describes.
    pub fn open(config: LocalStoreConfig) -> Result<LocalStore, StoreError> {
        let root = config.root.clone().unwrap_or_else(|| PathBuf::from("/"));
        let real_store = root.join(config.store_dir.as_str().trim_start_matches('/'));
        let state_dir = root.join("nix/var/nix");
        for dir in [
            real_store.clone(),
            state_dir.join("db"),
            state_dir.join("gcroots"),
            state_dir.join("temproots"),
            state_dir.join("profiles"),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| StoreError::io("create directory", &dir, e))?;
        }
        let profiles_root = state_dir.join("gcroots/profiles");
        if std::fs::symlink_metadata(&profiles_root).is_err() {
            // As Nix does: profiles are roots through this link.
            let _ = std::os::unix::fs::symlink(state_dir.join("profiles"), &profiles_root);
        }
        let db_dir = state_dir.join("db");
        // Shared while in use; Nix takes it exclusively only to migrate the schema.
        let big_lock = FileLock::acquire(&db_dir.join("big-lock"), LockKind::Shared, true)?
            .expect("waiting lock acquisition always succeeds");
        let db = Db::open(&db_dir, &config.store_dir)?;
        let readers = db::ReadPool::new(&db_dir, &config.store_dir);
        let held_locks = held_locks_from_environment(&config.store_dir);
        let store = LocalStore {
            config,
            real_store,
            state_dir,
            db: Mutex::new(db),
            readers,
            temp_roots: OnceLock::new(),
            tmp_counter: AtomicU64::new(0),
            locks_held_by_parent: Mutex::new(held_locks),
            unsynced: Default::default(),
            _big_lock: big_lock,
        };
        // Rows that cannot be settled now (a read-only database, a full
        // disk) stay for the next open.
        if let Err(e) = store.recover_journal() {
            tracing::warn!(error = %e, "settling the journal of unsynced store paths");
        }
        Ok(store)
    }

    /// Declares that our parent process holds the locks of `paths`: a
    /// build hook copying back outputs that its daemon locked before
    /// handing over the build. Adding them then takes no lock (taking it
    /// would wait for the parent, which waits for us).
    pub fn assume_locks_held_by_parent(&self, paths: impl IntoIterator<Item = StorePath>) {
        self.locks_held_by_parent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(paths);
    }

    /// Opens the store under `root` (`local?root=ROOT`).
    pub fn open_root(root: impl Into<PathBuf>) -> Result<LocalStore, StoreError> {
        LocalStore::open(LocalStoreConfig::with_root(root))
    }

    /// The physical directory holding the store paths.
    pub fn real_store_dir(&self) -> &Path {
        &self.real_store
    }

    /// The state directory (`…/nix/var/nix`).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Where `path` lives on disk.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.real_store.join(path.base_name())
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Db> {
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A connection for queries (not the writer's: queries run in
    /// parallel and never wait for a commit).
    pub(crate) fn reader(&self) -> Result<db::Reader<'_>, StoreError> {
        self.readers.get()
    }

    fn temp_roots(&self) -> Result<&Arc<TempRoots>, StoreError> {
        if let Some(t) = self.temp_roots.get() {
            return Ok(t);
        }
        let t = lock::temp_roots_for(&self.state_dir)?;
        Ok(self.temp_roots.get_or_init(|| t))
    }

    /// Records several temporary roots at once (in the session this
    /// thread has entered, if any; see [`TempRootsSession`]).
    pub fn add_temp_roots(&self, paths: &[&StorePath]) -> Result<(), StoreError> {
        if let Some(session) = lock::entered_session(&self.state_dir) {
            return session.add(&self.config.store_dir, paths);
        }
        self.temp_roots()?.add(&self.config.store_dir, paths)
    }

    /// Temporary roots for one client connection, released when it is
    /// dropped; see [`TempRootsSession`].
    pub fn temp_roots_session(&self) -> Result<TempRootsSession, StoreError> {
        TempRootsSession::create(&self.state_dir, &self.config.store_dir)
    }

    /// The session this thread has entered (see
    /// [`TempRootsSession::enter`]), if any: work done for it on other
    /// threads (a build a client asked for) enters it there too, so that
    /// what it roots goes when the client does.
    pub fn entered_temp_roots_session(&self) -> Option<TempRootsSession> {
        TempRootsSession::entered(&self.state_dir, &self.config.store_dir)
    }

    /// Drops this process's temporary roots: what it added or used is no
    /// longer protected from the collector unless rooted otherwise. For
    /// long-lived processes (and tests); short ones just exit.
    pub fn clear_temp_roots(&self) -> Result<(), StoreError> {
        self.temp_roots()?.clear()
    }

    /// Registers paths whose contents are in place, complete and durable
    /// (the caller made them so, as a build does with its outputs) as
    /// valid, in one transaction: their rows (NAR hash and size, deriver,
    /// content address, signatures, `ultimate`), their references (valid
    /// already or among `infos`) and, for the derivations among them, the
    /// outputs in `drv_outputs`. Rows of paths valid already are replaced;
    /// a registration time of 0 becomes now.
    ///
    /// This is the way for other crates to make paths valid: nothing
    /// outside the store writes its database.
    pub fn register_valid_paths(
        &self,
        infos: &[PathInfo],
        drv_outputs: &BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    ) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let stamped: Vec<PathInfo>;
        let infos = if infos.iter().any(|i| i.registration_time == 0) {
            stamped = infos
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if i.registration_time == 0 {
                        i.registration_time = now;
                    }
                    i
                })
                .collect();
            &stamped[..]
        } else {
            infos
        };
        self.register_valid_paths_journaled(infos, drv_outputs, &[])
    }

    /// Adds signatures (`name:base64`) to the valid path `path`, keeping
    /// the ones it has; what `nix store sign` and the daemon's
    /// `AddSignatures` do.
    pub fn add_signatures(&self, path: &StorePath, sigs: &[String]) -> Result<(), StoreError> {
        for sig in sigs {
            sig.parse::<kiln_formats::signature::Signature>()
                .map_err(|source| StoreError::BadSignature {
                    path: self.config.store_dir.print_path(path),
                    signature: sig.clone(),
                    source,
                })?;
        }
        let mut db = self.db();
        let tx = db.write()?;
        if !tx.add_signatures(path, sigs)? {
            return Err(StoreError::InvalidPath {
                path: self.config.store_dir.print_path(path),
                store: self.config.url.clone(),
            });
        }
        tx.commit()
    }

    /// The derivations in the store that list `path` as an output.
    pub fn query_valid_derivers(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        self.reader()?.query_valid_derivers(path)
    }
}

impl Store for LocalStore {
    fn store_dir(&self) -> &StoreDir {
        &self.config.store_dir
    }

    fn url(&self) -> String {
        self.config.url.clone()
    }

    fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        self.reader()?.query_path_info(path)
    }

    fn is_valid_path(&self, path: &StorePath) -> Result<bool, StoreError> {
        self.reader()?.is_valid(path)
    }

    fn query_valid_paths(&self, paths: &StorePathSet) -> Result<StorePathSet, StoreError> {
        let db = self.reader()?;
        let mut valid = StorePathSet::new();
        for p in paths {
            if db.is_valid(p)? {
                valid.insert(p.clone());
            }
        }
        Ok(valid)
    }

    fn query_all_valid_paths(&self) -> Result<StorePathSet, StoreError> {
        self.reader()?.query_all_valid_paths()
    }

    fn query_referrers(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        self.reader()?.query_referrers(path)
    }

    fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, StoreError> {
        self.reader()?.query_path_from_hash_part(hash_part)
    }

    fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        self.reader()?.query_derivation_outputs(drv)
    }

    fn add_nar(
        &self,
        info: &PathInfo,
        nar: &mut dyn BufRead,
        options: AddOptions,
    ) -> Result<(), StoreError> {
        self.add_nar_impl(info, nar, options)
    }

    fn add_nars(
        &self,
        infos: &[PathInfo],
        nars: &crate::NarSource<'_>,
        options: AddOptions,
        jobs: usize,
    ) -> Result<Vec<StorePath>, StoreError> {
        self.add_nars_impl(infos, nars, options, jobs)
    }

    fn add_to_store(
        &self,
        name: &str,
        source: &Path,
        method: FileIngestionMethod,
        algo: HashAlgo,
        options: AddOptions,
    ) -> Result<PathInfo, StoreError> {
        let mut infos = self.add_paths(
            &[BatchItem {
                name: name.to_owned(),
                source: source.to_path_buf(),
                method,
                algo,
            }],
            options,
            Durability::FsyncEach,
        )?;
        Ok(infos.pop().expect("one item in, one info out"))
    }

    fn add_text(
        &self,
        name: &str,
        contents: &[u8],
        references: &StorePathSet,
    ) -> Result<PathInfo, StoreError> {
        self.add_text_impl(name, contents, references)
    }

    fn nar_from_path(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), StoreError> {
        if !self.is_valid_path(path)? {
            return Err(self.path_info_or_error(path).unwrap_err());
        }
        nar::dump_path(&self.real_path(path), out)?;
        Ok(())
    }

    fn add_temp_root(&self, path: &StorePath) -> Result<(), StoreError> {
        LocalStore::add_temp_roots(self, &[path])
    }

    fn add_temp_roots(&self, paths: &[&StorePath]) -> Result<(), StoreError> {
        LocalStore::add_temp_roots(self, paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queries go through the read pool: they answer while the writer's
    /// connection is held (by a long commit, say) instead of queueing.
    #[test]
    fn queries_do_not_wait_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path()).unwrap();
        let info = store.add_text("q", b"q", &StorePathSet::new()).unwrap();
        let writer = store.db();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let answer = (0..100)
                    .map(|_| store.query_path_info(&info.path))
                    .last()
                    .unwrap();
                let _ = tx.send(answer.map(|i| i.is_some()));
            });
            let answer = rx.recv_timeout(std::time::Duration::from_secs(20));
            drop(writer);
            assert!(
                matches!(answer, Ok(Ok(true))),
                "a query waited for the writer's connection: {answer:?}"
            );
        });
    }
}
