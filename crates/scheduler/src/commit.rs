//! Registering built outputs in groups, off the builds' critical path.
//!
//! Making a build's outputs durable and valid costs disk barriers: an
//! fsync per file and directory, one for the store directory, one for the
//! database commit (outputs whose NAR is small go into the commit instead,
//! see `kiln_store::local::journal`). Paid per build, they dominated trivial builds (a chain
//! of 100 spent ~10 ms per build waiting on flushes). Here a build hands
//! its moved-into-place outputs to [`GroupCommit`] and is done; one
//! committer thread takes everything handed in since its last round,
//! fsyncs all of it (in parallel, so the device's flushes merge), fsyncs
//! the store directory once and registers the whole group in one
//! transaction. Builds that finish while a round commits form the next
//! group, so the rounds grow with the load and no timer is involved.
//!
//! Until their round commits, the outputs stay locked (another process
//! wanting them waits on the lock, then finds them valid) and are valid to
//! this process only, through [`Overlay`] — so a dependent build can start
//! at once. A registered path is still always complete on disk: nothing
//! reaches the database before its files are synced.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_store::local::LocalStore;
use kiln_store::local::{fsutil, journal};
use kiln_store::{AddOptions, PathInfo, Store, StoreError};

use crate::local::OutputLocks;

/// One build's outputs, in place in the store and waiting to be registered.
#[derive(Debug)]
pub struct Pending {
    /// The derivation built, named in errors.
    pub drv_path: StorePath,
    /// The outputs (and the `.drv` again, to record its outputs).
    pub infos: Vec<PathInfo>,
    pub drv_outputs: BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    /// The outputs' real locations, to sync.
    pub files: Vec<PathBuf>,
    /// Released once the outputs are registered (or failed to be).
    pub locks: Option<OutputLocks>,
}

#[derive(Debug, Default)]
struct State {
    queue: Vec<Pending>,
    /// Infos of every output handed in and not yet registered.
    pending: HashMap<StorePath, PathInfo>,
    pending_drv_outputs: HashMap<StorePath, BTreeMap<String, StorePath>>,
    /// A round is being committed.
    busy: bool,
    shutdown: bool,
    /// Derivations whose outputs could not be registered, with why.
    failed: Vec<(StorePath, String)>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Work arrived, or shutdown.
    work: Condvar,
    /// A round ended.
    idle: Condvar,
    store: Arc<LocalStore>,
}

/// The committer: see the [module documentation](self).
#[derive(Debug)]
pub struct GroupCommit {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl GroupCommit {
    /// A committer registering into `store`.
    pub fn new(store: Arc<LocalStore>) -> GroupCommit {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            store,
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || commit_loop(&worker))
            .expect("cannot start the group-commit thread");
        GroupCommit {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Hands in one build's outputs; they are valid to [`Overlay`] from now.
    pub fn submit(&self, pending: Pending) {
        let mut state = self.shared.lock();
        for info in &pending.infos {
            state.pending.insert(info.path.clone(), info.clone());
        }
        for (drv, outputs) in &pending.drv_outputs {
            state
                .pending_drv_outputs
                .insert(drv.clone(), outputs.clone());
        }
        state.queue.push(pending);
        self.shared.work.notify_one();
    }

    /// The info of `path` if it waits to be registered.
    pub fn pending_info(&self, path: &StorePath) -> Option<PathInfo> {
        self.shared.lock().pending.get(path).cloned()
    }

    fn pending_drv_outputs(&self, drv: &StorePath) -> Option<BTreeMap<String, StorePath>> {
        self.shared.lock().pending_drv_outputs.get(drv).cloned()
    }

    /// Waits until everything handed in is registered; returns the
    /// derivations whose outputs could not be, with why (each once).
    pub fn flush(&self) -> Vec<(StorePath, String)> {
        let mut state = self.shared.lock();
        while !state.queue.is_empty() || state.busy {
            state = self
                .shared
                .idle
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        std::mem::take(&mut state.failed)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn commit_loop(shared: &Shared) {
    loop {
        let round = {
            let mut state = shared.lock();
            while state.queue.is_empty() && !state.shutdown {
                state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.queue.is_empty() {
                return;
            }
            state.busy = true;
            std::mem::take(&mut state.queue)
        };
        let outcome = commit_round(shared, &round);
        let mut state = shared.lock();
        for p in &round {
            for info in &p.infos {
                state.pending.remove(&info.path);
            }
            for drv in p.drv_outputs.keys() {
                state.pending_drv_outputs.remove(drv);
            }
        }
        if let Err(e) = outcome {
            tracing::error!(error = %e, "cannot register built outputs");
            for p in &round {
                state.failed.push((p.drv_path.clone(), e.to_string()));
            }
        }
        state.busy = false;
        drop(state);
        // The locks go only now: another process waiting for them must
        // find the outputs valid.
        drop(round);
        shared.idle.notify_all();
    }
}

/// Files synced at once: each fsync mostly waits on the device, and
/// concurrent ones share its cache flushes.
const SYNC_THREADS: usize = 8;

fn commit_round(shared: &Shared, round: &[Pending]) -> Result<(), StoreError> {
    let sync_error = |path: PathBuf, source: io::Error| StoreError::Io {
        action: "sync",
        path,
        source,
    };
    // Small outputs go into the commit instead of being synced first.
    let mut journaled = Vec::new();
    let mut files = Vec::new();
    for file in round.iter().flat_map(|p| &p.files) {
        let small = file
            .file_name()
            .and_then(|name| StorePath::from_base_name(name.to_str()?).ok())
            .and_then(|path| Some((path, journal::small_nar(file)?)));
        match small {
            Some(small) => journaled.push(small),
            None => files.push(file),
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error: Mutex<Option<(PathBuf, io::Error)>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..SYNC_THREADS.min(files.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(file) = files.get(i) else { break };
                    if let Err(e) = fsutil::fsync_tree(file) {
                        first_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(((*file).clone(), e));
                    }
                }
            });
        }
    });
    if let Some((path, e)) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(sync_error(path, e));
    }
    if !files.is_empty() {
        let store_dir = shared.store.real_store_dir();
        fsutil::fsync_dir(store_dir).map_err(|e| sync_error(store_dir.to_owned(), e))?;
    }

    let mut infos = Vec::new();
    let mut drv_outputs = BTreeMap::new();
    for p in round {
        infos.extend(p.infos.iter().cloned());
        drv_outputs.extend(p.drv_outputs.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    shared
        .store
        .register_valid_paths_journaled(&infos, &drv_outputs, &journaled)
}

/// The local store as this process sees it: paths waiting in a
/// [`GroupCommit`] are valid, with their infos.
#[derive(Debug, Clone, Copy)]
pub struct Overlay<'a> {
    pub store: &'a LocalStore,
    pub commit: &'a GroupCommit,
}

impl Store for Overlay<'_> {
    fn store_dir(&self) -> &StoreDir {
        self.store.store_dir()
    }

    fn url(&self) -> String {
        self.store.url()
    }

    fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        match self.commit.pending_info(path) {
            Some(info) => Ok(Some(info)),
            None => self.store.query_path_info(path),
        }
    }

    fn is_valid_path(&self, path: &StorePath) -> Result<bool, StoreError> {
        if self.commit.pending_info(path).is_some() {
            return Ok(true);
        }
        self.store.is_valid_path(path)
    }

    fn query_valid_paths(&self, paths: &StorePathSet) -> Result<StorePathSet, StoreError> {
        let mut valid = StorePathSet::new();
        for p in paths {
            if self.is_valid_path(p)? {
                valid.insert(p.clone());
            }
        }
        Ok(valid)
    }

    fn query_references(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        match self.commit.pending_info(path) {
            Some(info) => Ok(info.references),
            None => self.store.query_references(path),
        }
    }

    fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, StoreError> {
        self.store.query_path_from_hash_part(hash_part)
    }

    fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        match self.commit.pending_drv_outputs(drv) {
            Some(outputs) => Ok(outputs),
            None => self.store.query_derivation_outputs(drv),
        }
    }

    fn add_nar(
        &self,
        info: &PathInfo,
        nar: &mut dyn BufRead,
        options: AddOptions,
    ) -> Result<(), StoreError> {
        self.store.add_nar(info, nar, options)
    }

    fn nar_from_path(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), StoreError> {
        self.store.nar_from_path(path, out)
    }
}
