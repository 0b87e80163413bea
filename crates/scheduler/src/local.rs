//! Building derivations on this machine: the [`Backend`] over a
//! [`LocalStore`] and the sandbox.
//!
//! A build: take the output locks (or report contention), re-check
//! validity ("someone beat us to it"), make a build directory whose
//! `build/` is bound at `/build` and whose `store/` is bound writable at
//! the logical store directory with the input closure bound read-only on
//! top, start the builder, pump its log (compressed to disk, limits and
//! timeouts enforced), then check the outputs and move them into place
//! ([`crate::outputs`]); they are synced and registered in groups
//! ([`crate::commit`]), and build directories removed, off the path of
//! the next build.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bstr::ByteSlice;
use kiln_derivation::{BuildOptions, Derivation, aterm, drv_name};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_sandbox::{BuildDirs, Network, Sandbox, SandboxMode, SandboxSpec, UidRange};
use kiln_store::local::lock::{EnteredSession, PathLock};
use kiln_store::local::{LocalStore, TempRootsSession};

use crate::builtins::{self, Builtin, BuiltinBuild};
use crate::commit::{GroupCommit, Overlay, Pending};
use kiln_formats::signature::TrustedKeys;
use kiln_store::binary_cache::{BinaryCacheConfig, BinaryCacheStore};
use kiln_store::substitute::Substituter;
use kiln_store::{Store, StoreError, compute_closure};

use crate::env::{BUILD_TOP, EnvInputs, prepare};
use crate::events::{Event, EventSink};
use crate::goals::{
    Attempt, Backend, Cancel, HookReply, Job, Loaded, Placement, Substitution, Wanted,
};
use crate::hook::{Hook, HookBuild};
use crate::logs::{LogSink, log_dir_for_state_dir, tail_text};
use crate::outputs::{Registration, place_outputs};
use crate::result::{BuildResult, BuildStatus};
use crate::settings::{SandboxSetting, Settings};

/// Why the local backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    BuildDir(#[from] kiln_sandbox::BuildDirError),
    #[error("cannot start the build hook: {0}")]
    Hook(String),
    #[error("cannot start a helper thread: {0}")]
    Thread(String),
    #[error("setting 'trusted-public-keys': {0}")]
    TrustedKeys(#[from] kiln_formats::signature::SignatureError),
}

/// The caches of `substituters` (none when `substitute` is false). A cache
/// that cannot be opened is left out with a warning, as Nix disables it.
fn open_substituter(settings: &Settings) -> Result<Option<Substituter>, LocalError> {
    if !settings.substitute || settings.substituters.is_empty() {
        return Ok(None);
    }
    let trusted = TrustedKeys::parse(&settings.trusted_public_keys.join(" "))?;
    let mut caches = Vec::new();
    for url in &settings.substituters {
        match BinaryCacheStore::open(url, BinaryCacheConfig::default()) {
            Ok(c) => caches.push(c),
            Err(e) => tracing::warn!(cache = %url, error = %e, "substituter disabled"),
        }
    }
    if caches.is_empty() {
        return Ok(None);
    }
    Ok(Some(Substituter::from_caches(
        caches,
        settings.require_sigs.then_some(trusted),
    )))
}

/// Whether valid outputs are built again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rebuild {
    #[default]
    No,
    /// `--check`: build again and compare.
    Check,
    /// `--repair`: build again and replace.
    Repair,
}

/// A derivation read from the store.
#[derive(Debug)]
pub struct LocalDrv {
    pub drv: Derivation,
    pub options: Result<BuildOptions, String>,
    pub outputs: BTreeMap<String, StorePath>,
}

/// Held output locks, released on drop.
#[derive(Debug)]
pub struct OutputLocks(#[allow(dead_code)] Vec<PathLock>);

/// Builds with a local store and the sandbox.
#[derive(Debug)]
pub struct LocalBackend {
    store: Arc<LocalStore>,
    commit: GroupCommit,
    /// Build directories to remove: deleting waits on the disk (a discard
    /// per directory block on some file systems), so a thread does it.
    reaper: Mutex<Option<std::sync::mpsc::Sender<kiln_sandbox::BuildDir>>>,
    reaper_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    settings: Settings,
    build_dirs: BuildDirs,
    log_dir: Option<PathBuf>,
    rebuild: Rebuild,
    /// The targets that `rebuild` applies to.
    rebuild_targets: HashSet<StorePath>,
    hook: Option<Mutex<Hook>>,
    /// The binary caches of `substituters`, when substituting.
    substituter: Option<Substituter>,
    /// Only find out what would be substituted.
    dry_run: bool,
    /// The references of valid paths met so far (fixed while a path is
    /// valid): input closures are walked here rather than with a database
    /// query per path, which along a deep graph repeated the same hundreds
    /// of queries for every build.
    references: Mutex<HashMap<StorePath, Arc<[StorePath]>>>,
    /// Whether each input met so far is a directory (fixed while it is
    /// valid), for its mount point: one `stat` per input, not per build.
    input_is_dir: Mutex<HashMap<StorePath, bool>>,
    /// The temporary-roots session of the client this backend builds for
    /// (a daemon connection), entered by every call that roots paths; the
    /// process's own roots otherwise, which in a daemon would protect the
    /// paths until it exits.
    client_roots: Option<TempRootsSession>,
}

fn print_set(store_dir: &StoreDir, paths: &StorePathSet) -> String {
    paths
        .iter()
        .map(|p| format!("'{}'", store_dir.display(p)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn misc(e: impl std::fmt::Display) -> BuildResult {
    BuildResult::failure(BuildStatus::MiscFailure, e.to_string())
}

/// The KVM device, for builds on a machine with the `kvm` feature.
const KVM: &str = "/dev/kvm";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl LocalBackend {
    /// A backend building into `store` with `settings`.
    pub fn new(store: Arc<LocalStore>, settings: Settings) -> Result<LocalBackend, LocalError> {
        let build_dirs = BuildDirs::open(&store.state_dir().join("builds"))?;
        let log_dir = settings
            .keep_build_log
            .then(|| log_dir_for_state_dir(store.state_dir()));
        let hook = if settings.build_hook.is_empty() {
            None
        } else {
            Some(Mutex::new(Hook::new(&settings, &store.url())))
        };
        let (reaper, dirs) = std::sync::mpsc::channel::<kiln_sandbox::BuildDir>();
        let reaper_thread = std::thread::Builder::new()
            .name("build-dir-reaper".into())
            .spawn(move || {
                for dir in dirs {
                    if let Err(e) = dir.recycle() {
                        tracing::warn!(error = %e, "cannot empty a build directory for reuse");
                    }
                }
            })
            .map_err(|e| LocalError::Thread(e.to_string()))?;
        let substituter = open_substituter(&settings)?;
        Ok(LocalBackend {
            substituter,
            dry_run: false,
            commit: GroupCommit::new(store.clone()),
            reaper: Mutex::new(Some(reaper)),
            reaper_thread: Mutex::new(Some(reaper_thread)),
            settings,
            build_dirs,
            log_dir,
            rebuild: Rebuild::No,
            rebuild_targets: HashSet::new(),
            hook,
            references: Mutex::new(HashMap::new()),
            input_is_dir: Mutex::new(HashMap::new()),
            client_roots: store.entered_temp_roots_session(),
            store,
        })
    }

    /// Until the guard drops, temporary roots taken on this thread go to
    /// the client's session, if this backend builds for one.
    fn for_client(&self) -> Option<EnteredSession> {
        self.client_roots.as_ref().map(TempRootsSession::enter)
    }

    /// Only finds out what would be substituted, fetching nothing.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Fetches `paths` (and their closures) from the substituters when
    /// every one of them is there with a trusted signature; what was
    /// fetched, or `None` (then the caller builds). A cache that has a
    /// path but fails to deliver it is a warning, not an error: building
    /// is the fallback.
    fn substitute(&self, paths: &StorePathSet) -> Option<Substitution> {
        let subst = self.substituter.as_ref()?;
        let view = self.view();
        let mut missing = StorePathSet::new();
        for p in paths {
            if !view.is_valid_path(p).ok()? {
                missing.insert(p.clone());
            }
        }
        for p in &missing {
            match subst.query_substitutable(p) {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(e) => {
                    // Untrusted or unreadable: Nix warns and builds.
                    tracing::warn!("{e}");
                    return None;
                }
            }
        }
        let closure = compute_closure(subst, &missing, false, false, false).ok()?;
        let mut fetched = Vec::new();
        for p in closure {
            if view.is_valid_path(&p).unwrap_or(false) {
                continue;
            }
            let (from, nar_size) = match subst.query_substitutable(&p) {
                Ok(Some((cache, info))) => (cache.url(), info.nar_size),
                _ => return None,
            };
            fetched.push((p, from, nar_size));
        }
        if self.dry_run {
            return Some(Substitution {
                fetched,
                dry_run: true,
            });
        }
        match subst.substitute_paths(&*self.store, &missing) {
            Ok(_) => Some(Substitution {
                fetched,
                dry_run: false,
            }),
            Err(e) => {
                tracing::warn!(
                    "substituting {} failed, building instead: {e}",
                    print_set(self.store.store_dir(), &missing)
                );
                None
            }
        }
    }

    /// Builds `targets` again even when valid (`--check`, `--repair`).
    pub fn rebuild(mut self, mode: Rebuild, targets: impl IntoIterator<Item = StorePath>) -> Self {
        self.rebuild = mode;
        self.rebuild_targets = targets.into_iter().collect();
        self
    }

    pub fn store(&self) -> &Arc<LocalStore> {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The store with the outputs that wait to be registered.
    fn view(&self) -> Overlay<'_> {
        Overlay {
            store: &self.store,
            commit: &self.commit,
        }
    }

    /// Empties a build directory in the background, for a later build to
    /// reuse.
    fn remove_build_dir(&self, dir: kiln_sandbox::BuildDir) {
        let reaper = self.reaper.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Err(std::sync::mpsc::SendError(dir))) = reaper.as_ref().map(|r| r.send(dir)) {
            drop(dir);
        }
    }

    /// Waits for the background work of this backend: outputs registered,
    /// build directories removed. Returns the derivations whose outputs
    /// could not be registered, with why.
    pub fn finish_background(&self) -> Vec<(StorePath, String)> {
        let failed = self.commit.flush();
        drop(self.reaper.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self
            .reaper_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
        failed
    }

    fn shown(&self, path: &StorePath) -> String {
        self.store.store_dir().print_path(path)
    }

    fn rebuilding(&self, drv: &StorePath) -> bool {
        self.rebuild_of(drv) != Rebuild::No
    }

    /// How `drv` is rebuilt: only targets are checked or repaired.
    fn rebuild_of(&self, drv: &StorePath) -> Rebuild {
        if self.rebuild_targets.contains(drv) {
            self.rebuild
        } else {
            Rebuild::No
        }
    }

    fn wanted_outputs(
        &self,
        job_outputs: &BTreeMap<String, StorePath>,
        wanted: &Wanted,
    ) -> Result<Option<BTreeMap<String, StorePath>>, StoreError> {
        let mut out = BTreeMap::new();
        for (name, path) in job_outputs {
            if !wanted.contains(name) {
                continue;
            }
            if !self.view().is_valid_path(path)? {
                return Ok(None);
            }
            out.insert(name.clone(), path.clone());
        }
        Ok(Some(out))
    }

    /// The mount point each input needs below the scratch store, in the
    /// order of `inputs`: its name, and whether it is a directory.
    fn mount_points(&self, inputs: &StorePathSet) -> Vec<(std::ffi::CString, bool)> {
        let mut known = self.input_is_dir.lock().unwrap_or_else(|p| p.into_inner());
        inputs
            .iter()
            .map(|p| {
                let is_dir = match known.get(p) {
                    Some(&is_dir) => is_dir,
                    None => match std::fs::metadata(self.store.real_path(p)) {
                        Ok(m) => *known.entry(p.clone()).or_insert(m.is_dir()),
                        // The sandbox reports it missing.
                        Err(_) => false,
                    },
                };
                let name = std::ffi::CString::new(p.base_name().as_bytes())
                    .expect("store path names have no NUL");
                (name, is_dir)
            })
            .collect()
    }

    fn lock_paths(&self, drv: &LocalDrv) -> Vec<PathBuf> {
        let mut paths: Vec<&StorePath> = drv.outputs.values().collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| PathLock::lock_path_for(self.store.real_store_dir(), p))
            .collect()
    }

    /// The outputs' locks, if free. The outputs are temporary roots since
    /// their derivation was loaded.
    fn try_lock(&self, drv: &LocalDrv) -> Result<Option<OutputLocks>, StoreError> {
        let mut held = Vec::new();
        for path in self.lock_paths(drv) {
            match PathLock::acquire(&path, false)? {
                Some(l) => held.push(l),
                None => return Ok(None),
            }
        }
        Ok(Some(OutputLocks(held)))
    }

    /// The input closure: input sources and the needed outputs of input
    /// derivations, with everything they refer to.
    fn input_closure(&self, drv: &Derivation) -> Result<StorePathSet, BuildResult> {
        let mut start = drv.input_sources.clone();
        for (input, outputs) in &drv.input_derivations {
            let mut known = self.view().query_derivation_outputs(input).map_err(misc)?;
            if outputs.iter().any(|o| !known.contains_key(o)) {
                let parsed = self.read_drv(input)?;
                known = parsed
                    .output_paths()
                    .map(|(n, p)| (n.to_owned(), p.clone()))
                    .collect();
            }
            for o in outputs {
                let path = known.get(o).ok_or_else(|| {
                    misc(format!(
                        "derivation '{}' has no output '{o}'",
                        self.shown(input)
                    ))
                })?;
                start.insert(path.clone());
            }
        }
        let missing_sources: StorePathSet = drv
            .input_sources
            .iter()
            .filter(|p| !self.view().is_valid_path(p).unwrap_or(false))
            .cloned()
            .collect();
        if !missing_sources.is_empty() {
            let _ = self.substitute(&missing_sources);
        }
        for p in &start {
            if !self.view().is_valid_path(p).map_err(misc)? {
                return Err(BuildResult::failure(
                    BuildStatus::DependencyFailed,
                    format!("input '{}' is not valid", self.shown(p)),
                ));
            }
        }
        self.closure(start).map_err(misc)
    }

    /// The closure of `start` under references (all of it must be valid).
    fn closure(&self, start: StorePathSet) -> Result<StorePathSet, StoreError> {
        let mut closure = StorePathSet::new();
        let mut pending: Vec<StorePath> = start.into_iter().collect();
        while let Some(path) = pending.pop() {
            if closure.contains(&path) {
                continue;
            }
            let references = self.references_of(&path)?;
            pending.extend(references.iter().filter(|r| !closure.contains(*r)).cloned());
            closure.insert(path);
        }
        Ok(closure)
    }

    fn references_of(&self, path: &StorePath) -> Result<Arc<[StorePath]>, StoreError> {
        let cache = || self.references.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = cache().get(path) {
            return Ok(known.clone());
        }
        let info = self.view().path_info_or_error(path)?;
        let references: Arc<[StorePath]> = info.references.into_iter().collect();
        cache().insert(path.clone(), references.clone());
        Ok(references)
    }

    fn read_drv(&self, drv_path: &StorePath) -> Result<Derivation, BuildResult> {
        let file = self.store.real_path(drv_path);
        let text = std::fs::read(&file).map_err(|e| {
            misc(format!(
                "cannot read derivation '{}': {e}",
                self.shown(drv_path)
            ))
        })?;
        aterm::parse(self.store.store_dir(), &text).map_err(|e| {
            misc(format!(
                "cannot parse derivation '{}': {e}",
                self.shown(drv_path)
            ))
        })
    }

    fn build_locked(
        &self,
        job: &Job<LocalDrv>,
        locks: OutputLocks,
        cancel: &Cancel,
        events: &dyn EventSink,
    ) -> BuildResult {
        let local = &*job.drv;
        let drv = &local.drv;
        let drv_shown = self.shown(&job.drv_path);
        let options = match &local.options {
            Ok(o) => o,
            Err(e) => {
                return BuildResult::failure(
                    BuildStatus::InputRejected,
                    format!("derivation '{drv_shown}': {e}"),
                );
            }
        };
        let system = drv.system.to_str_lossy();
        let missing_features: BTreeSet<&String> = options
            .required_system_features
            .iter()
            .filter(|f| !self.settings.system_features.contains(*f))
            .collect();
        if !self.settings.can_build_for(&system) || !missing_features.is_empty() {
            let list = |s: &mut dyn Iterator<Item = &String>| {
                s.map(|x| x.as_str()).collect::<Vec<_>>().join(", ")
            };
            return BuildResult::failure(
                BuildStatus::InputRejected,
                format!(
                    "a '{system}' with features {{{}}} is required to build '{drv_shown}', but I am a '{}' with features {{{}}}",
                    list(&mut options.required_system_features.iter()),
                    self.settings.system,
                    list(&mut self.settings.system_features.iter()),
                ),
            );
        }
        if let Some(Err(e)) = Builtin::from_builder(&drv.builder) {
            return BuildResult::failure(
                BuildStatus::InputRejected,
                format!("cannot build '{drv_shown}': {e}"),
            );
        }
        let input_paths = match self.input_closure(drv) {
            Ok(p) => p,
            Err(e) => return e,
        };
        events.event(Event::BuildStarted {
            id: job.id,
            drv: &job.drv_path,
            machine: None,
            rebuild: self.rebuild_of(&job.drv_path),
        });
        let start = now();
        let mut result = self.run_builder(job, locks, options, &input_paths, cancel, events);
        result.start_time = start;
        result.stop_time = now();
        result
    }

    fn run_builder(
        &self,
        job: &Job<LocalDrv>,
        locks: OutputLocks,
        options: &BuildOptions,
        input_paths: &StorePathSet,
        cancel: &Cancel,
        events: &dyn EventSink,
    ) -> BuildResult {
        let local = &*job.drv;
        let drv = &local.drv;
        let store_dir = self.store.store_dir();
        let drv_shown = self.shown(&job.drv_path);
        // A store whose files are not at its logical location can only be
        // built into through a sandbox that puts them there: as Nix does,
        // such builds are sandboxed whatever `sandbox` says.
        let diverted = self.store.real_store_dir() != Path::new(store_dir.as_str());
        let sandboxed = diverted
            || match self.settings.sandbox {
                SandboxSetting::Enabled => true,
                SandboxSetting::Relaxed => !options.no_chroot,
                SandboxSetting::Disabled => false,
            };
        // As root, the build user's uids come from a range of our own.
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let builtin = Builtin::from_builder(&drv.builder).and_then(Result::ok);
        let uid_range = if sandboxed && as_root && builtin.is_none() {
            match UidRange::allocate(
                Path::new(kiln_sandbox::spawn::DEFAULT_UID_LOCK_DIR),
                kiln_sandbox::spawn::DEFAULT_UID_SLOTS,
            ) {
                Ok(r) => Some(r),
                Err(e) => return misc(format!("cannot allocate build uids: {e}")),
            }
        } else {
            None
        };
        // SAFETY: trivial getters.
        let owner = match &uid_range {
            Some(r) => (r.host_id(1000), r.host_id(100)),
            None => unsafe { (libc::geteuid(), libc::getegid()) },
        };
        let mut build_dir = match self.build_dirs.create("kiln", Some(owner)) {
            Ok(d) => d,
            Err(e) => return misc(e),
        };
        // The scratch store the builder writes its outputs in, with the
        // mount points of its inputs, which stay there for the next build
        // in this directory (a chain of builds shares most of its inputs).
        let mut inputs_are_dirs = Vec::new();
        // A builtin always writes into a scratch store, sandbox or not: its
        // outputs are then moved into place past any invalid leftover.
        let built_in = if builtin.is_some() {
            match build_dir.sibling_with_mount_points("store", Some(owner), []) {
                Ok(d) => d,
                Err(e) => return misc(e),
            }
        } else if sandboxed {
            let points = self.mount_points(input_paths);
            inputs_are_dirs = points.iter().map(|&(_, is_dir)| is_dir).collect();
            match build_dir.sibling_with_mount_points("store", Some(owner), points) {
                Ok(d) => d,
                Err(e) => return misc(e),
            }
        } else {
            self.store.real_store_dir().to_path_buf()
        };
        if let Some(builtin) = builtin {
            let built = BuiltOutputs {
                build_dir,
                built_in,
                tail: Vec::new(),
                // Builtins run in this process: nothing else was there.
                reachable: false,
            };
            return self.run_builtin(job, locks, options, input_paths, builtin, built, events);
        }
        let build_top = if sandboxed {
            BUILD_TOP.to_owned()
        } else {
            build_dir.path().to_string_lossy().into_owned()
        };
        let view = self.view();
        let prepared = match prepare(&EnvInputs {
            store: &view,
            drv,
            options,
            outputs: &local.outputs,
            input_paths,
            cores: self.settings.build_cores(),
            build_top: &build_top,
            home: "/homeless-shelter",
        }) {
            Ok(p) => p,
            Err(e) => return BuildResult::failure(BuildStatus::InputRejected, e.to_string()),
        };
        for (name, contents) in &prepared.files {
            let path = build_dir.path().join(name);
            let written = std::fs::write(&path, contents)
                .and_then(|()| std::os::unix::fs::chown(&path, Some(owner.0), Some(owner.1)));
            if let Err(e) = written {
                return misc(format!("cannot write '{}': {e}", path.display()));
            }
        }
        let os = |b: &[u8]| OsStr::from_bytes(b).to_owned();
        let builder = os(&prepared.builder);
        // As Nix, the builder is called by its base name.
        let arg0 = Path::new(&builder)
            .file_name()
            .unwrap_or(&builder)
            .to_owned();
        let mut spec = SandboxSpec::new(Path::new(&builder))
            .arg0(arg0)
            .args(prepared.args.iter().map(|a| os(a)))
            .cwd(&build_top);
        for (k, v) in &prepared.env {
            spec = spec.env(os(k), os(v));
        }
        if sandboxed {
            spec = spec
                .bind_rw(build_dir.path(), BUILD_TOP)
                .bind_rw(&built_in, store_dir.as_str());
            for (p, &is_dir) in input_paths.iter().zip(&inputs_are_dirs) {
                spec = spec.bind_ro_known(self.store.real_path(p), store_dir.print_path(p), is_dir);
            }
            for entry in &self.settings.sandbox_paths {
                spec = spec.sandbox_path(entry);
            }
            // As Nix: a machine that offers `kvm` lets every sandboxed build
            // use it (NixOS tests, `vmTools`).
            if self.settings.system_features.contains("kvm") && Path::new(KVM).exists() {
                spec = spec.bind_rw(KVM, KVM);
            }
            if drv.is_fixed_output() {
                spec = spec.network(Network::Host);
            }
            if self.settings.sandbox == SandboxSetting::Relaxed {
                spec = spec.mode(SandboxMode::Relaxed);
            }
            if let Some(r) = uid_range {
                spec = spec.uid_range(r);
            }
        } else {
            spec = spec.mode(SandboxMode::Off);
        }
        let mut log = match self.open_log(job) {
            Ok(l) => l,
            Err(e) => return e,
        };
        // Spawns run concurrently: the sandbox's processes share this one's
        // memory rather than copy it, so no lock can be copied in a held state
        // (the hang once seen here was glibc's set*id wrappers, since replaced).
        let mut child = match Sandbox::spawn(spec) {
            Ok(c) => c,
            Err(e) => {
                return misc(format!("cannot start the builder of '{drv_shown}': {e}"));
            }
        };
        let ended = pump(&mut child, &mut log, &self.settings, cancel, events, job.id);
        let status = child.wait();
        let tail = log.tail();
        if let Err(e) = log.finish() {
            tracing::warn!(error = %e, "cannot store the build log");
        }
        let failure = |status: BuildStatus, what: String| {
            let mut msg = what;
            if !tail.is_empty() {
                msg.push_str(&tail_text(&tail));
                msg.push_str(&format!("\nFor full logs, run 'nix log {drv_shown}'."));
            }
            BuildResult::failure(status, msg)
        };
        match ended {
            Ended::Eof => {}
            Ended::TimedOut(what) => {
                self.keep_build_dir(build_dir, events);
                return BuildResult::failure(
                    BuildStatus::TimedOut,
                    format!("building '{drv_shown}' {what}"),
                );
            }
            Ended::LogLimit(limit) => {
                self.keep_build_dir(build_dir, events);
                return BuildResult::failure(
                    BuildStatus::LogLimitExceeded,
                    format!(
                        "builder for '{drv_shown}' killed after writing more than {limit} bytes of log output"
                    ),
                );
            }
            Ended::Cancelled => {
                return BuildResult::failure(
                    BuildStatus::MiscFailure,
                    format!("build of '{drv_shown}' cancelled: another build failed"),
                );
            }
            Ended::Error(e) => return misc(format!("reading the log of '{drv_shown}': {e}")),
        }
        use std::os::unix::process::ExitStatusExt;
        match status {
            Err(e) => return misc(format!("waiting for the builder of '{drv_shown}': {e}")),
            Ok(s) if !s.success() => {
                self.keep_build_dir(build_dir, events);
                let what = match (s.code(), s.signal()) {
                    (Some(code), _) => {
                        format!("builder for '{drv_shown}' failed with exit code {code}")
                    }
                    (None, Some(sig)) => {
                        format!("builder for '{drv_shown}' failed due to signal {sig}")
                    }
                    _ => format!("builder for '{drv_shown}' failed"),
                };
                // Fixed-output builds fail transiently (the network), as in Nix.
                let status = if drv.is_fixed_output() {
                    BuildStatus::TransientFailure
                } else {
                    BuildStatus::PermanentFailure
                };
                return failure(status, what);
            }
            Ok(_) => {}
        }
        let built = BuiltOutputs {
            build_dir,
            built_in,
            tail,
            reachable: !sandboxed || drv.is_fixed_output(),
        };
        self.register_outputs(job, locks, options, input_paths, built, events)
    }

    /// Runs a builtin builder in this process, with a log like a
    /// program's, and registers what it made.
    fn run_builtin(
        &self,
        job: &Job<LocalDrv>,
        locks: OutputLocks,
        options: &BuildOptions,
        input_paths: &StorePathSet,
        builtin: Builtin,
        built: BuiltOutputs,
        events: &dyn EventSink,
    ) -> BuildResult {
        let drv_shown = self.shown(&job.drv_path);
        let mut log = match self.open_log(job) {
            Ok(l) => l,
            Err(e) => return e,
        };
        let mut log_error = None;
        let ran = builtins::run(
            builtin,
            &BuiltinBuild {
                env: &job.drv.drv.env,
                store_dir: self.store.store_dir(),
                real_store_dir: self.store.real_store_dir(),
                out_dir: &built.built_in,
                inputs: input_paths,
                fixed_output: job.drv.drv.is_fixed_output(),
            },
            &mut |line| {
                let mut data = line.as_bytes().to_vec();
                data.push(b'\n');
                if let Err(e) = log.write(&data) {
                    log_error.get_or_insert(e);
                }
            },
        );
        let tail = log.tail();
        if let Some(e) = log_error.take() {
            tracing::warn!(error = %e, "cannot store the build log");
        }
        if let Err(e) = log.finish() {
            tracing::warn!(error = %e, "cannot store the build log");
        }
        if let Err(e) = ran {
            self.keep_build_dir(built.build_dir, events);
            return BuildResult::failure(
                BuildStatus::PermanentFailure,
                format!("builder for '{drv_shown}' failed: {e}"),
            );
        }
        self.register_outputs(
            job,
            locks,
            options,
            input_paths,
            BuiltOutputs { tail, ..built },
            events,
        )
    }

    /// The build log of `job`.
    fn open_log(&self, job: &Job<LocalDrv>) -> Result<LogSink, BuildResult> {
        LogSink::create(
            self.log_dir.as_deref(),
            &job.drv_path,
            self.settings.log_lines,
        )
        .map_err(misc)
    }

    /// Keeps a failed build's directory when `keep-failed` says so.
    fn keep_build_dir(&self, dir: kiln_sandbox::BuildDir, events: &dyn EventSink) {
        if self.settings.keep_failed {
            match dir.keep(None) {
                // As Nix says it, to the user who asked for it.
                Ok(p) => events.event(Event::Message {
                    text: &format!("note: keeping build directory '{}'", p.display()),
                }),
                Err(e) => tracing::warn!(error = %e, "cannot keep a build directory"),
            }
        }
    }

    /// Checks, moves into place and registers the outputs a builder made.
    fn register_outputs(
        &self,
        job: &Job<LocalDrv>,
        locks: OutputLocks,
        options: &BuildOptions,
        input_paths: &StorePathSet,
        built: BuiltOutputs,
        events: &dyn EventSink,
    ) -> BuildResult {
        let BuiltOutputs {
            build_dir,
            built_in,
            tail,
            reachable,
        } = built;
        let local = &*job.drv;
        let drv = &local.drv;
        let view = self.view();
        let registered = place_outputs(&Registration {
            store: &self.store,
            view: &view,
            drv_path: &job.drv_path,
            drv,
            options,
            outputs: &local.outputs,
            built_in: &built_in,
            input_paths,
            check: self.rebuild_of(&job.drv_path) == Rebuild::Check,
            copy: reachable && drv.is_fixed_output(),
        });
        match registered {
            Ok(placed) => {
                if !reachable {
                    self.remove_build_dir(build_dir);
                } else if let Err(e) = build_dir.remove() {
                    tracing::warn!(error = %e, "cannot remove a build directory");
                }
                if !placed.infos.is_empty() {
                    let mut cache = self.references.lock().unwrap_or_else(|p| p.into_inner());
                    for info in &placed.infos {
                        cache.insert(info.path.clone(), info.references.iter().cloned().collect());
                    }
                    drop(cache);
                    self.commit.submit(Pending {
                        drv_path: job.drv_path.clone(),
                        infos: placed.infos,
                        drv_outputs: placed.drv_outputs,
                        files: placed.files,
                        locks: Some(locks),
                    });
                }
                let wanted = placed
                    .outputs
                    .into_iter()
                    .filter(|(n, _)| job.wanted.contains(n))
                    .collect();
                BuildResult::success(BuildStatus::Built, wanted)
            }
            Err(mut e) => {
                self.keep_build_dir(build_dir, events);
                if !tail.is_empty() && e.status == BuildStatus::OutputRejected {
                    e.error.push_str(&tail_text(&tail));
                }
                e
            }
        }
    }
}

/// What a finished builder left: its directories, and its log's last lines.
struct BuiltOutputs {
    build_dir: kiln_sandbox::BuildDir,
    built_in: PathBuf,
    tail: Vec<String>,
    /// Whether a process other than ours may still hold a descriptor into
    /// the build's directory and outputs. A fixed-output build has the
    /// host's network, so it can hand descriptors to a process outside;
    /// an unsandboxed one may have left processes behind. Such a
    /// directory would let them reach the next build in it, so it is
    /// removed, not recycled; and fixed-output outputs are copied.
    reachable: bool,
}

enum Ended {
    Eof,
    TimedOut(String),
    LogLimit(u64),
    Cancelled,
    Error(std::io::Error),
}

/// Reads the builder's output until it ends, enforcing the time and log
/// limits; kills the build when one is passed or the run is cancelled.
fn pump(
    child: &mut kiln_sandbox::Child,
    log: &mut LogSink,
    settings: &Settings,
    cancel: &Cancel,
    events: &dyn EventSink,
    id: u64,
) -> Ended {
    let Some(mut out) = child.take_output() else {
        return Ended::Eof;
    };
    let started = Instant::now();
    let mut last_output = started;
    let mut buf = vec![0u8; 64 * 1024];
    let mut line = Vec::new();
    // Cancellation is a flag: checked at least this often while waiting.
    const CANCEL_CHECK: Duration = Duration::from_millis(200);
    let ended = loop {
        if cancel.is_cancelled() {
            break Ended::Cancelled;
        }
        let now = Instant::now();
        let mut wait = CANCEL_CHECK;
        if let Some(t) = settings.timeout {
            let left = (started + t).saturating_duration_since(now);
            if left.is_zero() {
                break Ended::TimedOut(format!("timed out after {} seconds", t.as_secs()));
            }
            wait = wait.min(left);
        }
        if let Some(t) = settings.max_silent_time {
            let left = (last_output + t).saturating_duration_since(now);
            if left.is_zero() {
                break Ended::TimedOut(format!(
                    "timed out after {} seconds of silence",
                    t.as_secs()
                ));
            }
            wait = wait.min(left);
        }
        let mut pfd = libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().max(1) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break Ended::Error(e);
        }
        if n == 0 {
            continue;
        }
        match out.read(&mut buf) {
            Ok(0) => break Ended::Eof,
            Ok(k) => {
                last_output = Instant::now();
                if let Err(e) = log.write(&buf[..k]) {
                    tracing::warn!(error = %e, "cannot write the build log");
                }
                for &b in &buf[..k] {
                    if b == b'\n' {
                        events.event(Event::LogLine { id, line: &line });
                        line.clear();
                    } else if b != b'\r' {
                        line.push(b);
                    }
                }
                if let Some(max) = settings.max_build_log_size {
                    if log.len() > max {
                        break Ended::LogLimit(max);
                    }
                }
            }
            // A pty reports the end of its last writer as EIO.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break Ended::Eof,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Ended::Error(e),
        }
    };
    if !line.is_empty() {
        events.event(Event::LogLine { id, line: &line });
    }
    if !matches!(ended, Ended::Eof) {
        let _ = child.kill();
    }
    ended
}

impl Backend for LocalBackend {
    type Drv = LocalDrv;
    type Lock = OutputLocks;
    type Remote = HookBuild;

    fn store_dir(&self) -> &StoreDir {
        self.store.store_dir()
    }

    fn load(&self, drv_path: &StorePath, wanted: &Wanted) -> Result<Loaded<LocalDrv>, BuildResult> {
        let _client = self.for_client();
        if drv_name(drv_path).is_none() {
            return Err(misc(format!(
                "'{}' is not a derivation",
                self.shown(drv_path)
            )));
        }
        if !self.store.is_valid_path(drv_path).map_err(misc)? {
            return Err(misc(format!(
                "derivation '{}' is not valid in store '{}'",
                self.shown(drv_path),
                self.store.url()
            )));
        }
        let drv = self.read_drv(drv_path)?;
        let mut outputs = BTreeMap::new();
        for (name, out) in &drv.outputs {
            match out.path() {
                Some(p) => {
                    outputs.insert(name.clone(), p.clone());
                }
                None => {
                    return Err(BuildResult::failure(
                        BuildStatus::InputRejected,
                        format!(
                            "derivation '{}' has an output '{name}' whose path is not known in advance (content-addressed derivations are not supported yet)",
                            self.shown(drv_path)
                        ),
                    ));
                }
            }
        }
        // As Nix does: the derivation and its outputs, valid already or
        // built here, stay while the one who asked for them is there (a
        // daemon's client) rather than only while a build runs.
        let roots: Vec<&StorePath> = std::iter::once(drv_path).chain(outputs.values()).collect();
        self.store.add_temp_roots(&roots).map_err(misc)?;
        if let Wanted::Names(names) = wanted {
            if let Some(missing) = names.iter().find(|n| !outputs.contains_key(*n)) {
                return Err(misc(format!(
                    "derivation '{}' does not have an output named '{missing}'",
                    self.shown(drv_path)
                )));
            }
        }
        let options = BuildOptions::from_derivation(&drv).map_err(|e| e.to_string());
        let mut substituted = None;
        let mut valid = if self.rebuilding(drv_path) {
            if self.rebuild == Rebuild::Check
                && self
                    .wanted_outputs(&outputs, wanted)
                    .map_err(misc)?
                    .is_none()
            {
                return Err(misc(format!(
                    "some outputs of '{}' are not valid, so checking is not possible",
                    self.shown(drv_path)
                )));
            }
            None
        } else {
            self.wanted_outputs(&outputs, wanted).map_err(misc)?
        };
        let allowed = options.as_ref().map_or(true, |o| o.allow_substitutes);
        if valid.is_none() && allowed && !self.rebuilding(drv_path) {
            let wanted_paths: StorePathSet = outputs
                .iter()
                .filter(|(n, _)| wanted.contains(n))
                .map(|(_, p)| p.clone())
                .collect();
            if let Some(s) = self.substitute(&wanted_paths) {
                valid = Some(
                    outputs
                        .iter()
                        .filter(|(n, _)| wanted.contains(n))
                        .map(|(n, p)| (n.clone(), p.clone()))
                        .collect(),
                );
                substituted = Some(s);
            }
        }
        let inputs = drv
            .input_derivations
            .iter()
            .map(|(p, o)| (p.clone(), o.clone()))
            .collect();
        Ok(Loaded {
            inputs,
            valid,
            substituted,
            drv: LocalDrv {
                drv,
                options,
                outputs,
            },
        })
    }

    fn build(
        &self,
        job: &Job<LocalDrv>,
        lock: Option<OutputLocks>,
        cancel: &Cancel,
        events: &dyn EventSink,
    ) -> Attempt<OutputLocks> {
        let _client = self.for_client();
        // Given locks were taken with validity checked under them.
        let locks = match lock {
            Some(l) => l,
            None => match self.lock_outputs(job) {
                Attempt::Locked(l) => l,
                other => return other,
            },
        };
        Attempt::Done(self.build_locked(job, locks, cancel, events))
    }

    fn lock_outputs(&self, job: &Job<LocalDrv>) -> Attempt<OutputLocks> {
        let _client = self.for_client();
        let locks = match self.try_lock(&job.drv) {
            Ok(Some(l)) => l,
            Ok(None) => return Attempt::Contended,
            Err(e) => return Attempt::Done(misc(e)),
        };
        // Someone may have beaten us to it.
        if !self.rebuilding(&job.drv_path) {
            match self.wanted_outputs(&job.drv.outputs, &job.wanted) {
                Ok(Some(outputs)) => {
                    return Attempt::Done(BuildResult::success(BuildStatus::AlreadyValid, outputs));
                }
                Ok(None) => {}
                Err(e) => return Attempt::Done(misc(e)),
            }
        }
        Attempt::Locked(locks)
    }

    fn wait_for_locks(&self, job: &Job<LocalDrv>) -> Attempt<OutputLocks> {
        let _client = self.for_client();
        let mut held = Vec::new();
        for path in self.lock_paths(&job.drv) {
            // A blocking flock: the kernel wakes us when the holder is done.
            match PathLock::acquire(&path, true) {
                Ok(Some(l)) => held.push(l),
                Ok(None) => unreachable!("a waiting acquisition always gets the lock"),
                Err(e) => return Attempt::Done(misc(e)),
            }
        }
        if !self.rebuilding(&job.drv_path) {
            if let Ok(Some(outputs)) = self.wanted_outputs(&job.drv.outputs, &job.wanted) {
                return Attempt::Done(BuildResult::success(BuildStatus::AlreadyValid, outputs));
            }
        }
        Attempt::Locked(OutputLocks(held))
    }

    fn finish(&self) -> Vec<(StorePath, BuildResult)> {
        self.finish_background()
            .into_iter()
            .map(|(drv, why)| {
                let error = format!(
                    "cannot register the outputs of '{}': {why}",
                    self.shown(&drv)
                );
                (drv, BuildResult::failure(BuildStatus::MiscFailure, error))
            })
            .collect()
    }

    fn has_hook(&self) -> bool {
        self.hook.is_some()
    }

    /// Nix's rule: builtins are built here, and so is a `preferLocalBuild`
    /// derivation this machine can build (its system, its features, and a
    /// `max-jobs` above 0).
    fn placement(&self, job: &Job<LocalDrv>) -> Placement {
        let drv = &job.drv.drv;
        if Builtin::from_builder(&drv.builder).is_some() {
            return Placement::HereWithoutSlot;
        }
        let Ok(options) = &job.drv.options else {
            return Placement::Anywhere;
        };
        let can_build_here = self.settings.max_jobs > 0
            && self.settings.can_build_for(&drv.system.to_str_lossy())
            && options
                .required_system_features
                .iter()
                .all(|f| self.settings.system_features.contains(f));
        if options.prefer_local_build && can_build_here {
            Placement::Here
        } else {
            Placement::Anywhere
        }
    }

    fn offer_to_hook(&self, job: &Job<LocalDrv>, slot_free: bool) -> HookReply<HookBuild> {
        let Some(hook) = &self.hook else {
            return HookReply::DeclinePermanently;
        };
        let mut hook = hook.lock().unwrap_or_else(|p| p.into_inner());
        let features: Vec<String> = job
            .drv
            .options
            .as_ref()
            .map(|o| o.required_system_features.iter().cloned().collect())
            .unwrap_or_default();
        let reply = hook.offer(
            slot_free,
            &job.drv.drv.system.to_str_lossy(),
            &self.shown(&job.drv_path),
            &features,
        );
        match reply {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the build hook failed; building locally");
                HookReply::DeclinePermanently
            }
        }
    }

    fn build_remote(
        &self,
        job: &Job<LocalDrv>,
        remote: HookBuild,
        events: &dyn EventSink,
    ) -> BuildResult {
        let _client = self.for_client();
        let drv_shown = self.shown(&job.drv_path);
        let input_paths = match self.input_closure(&job.drv.drv) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let missing: Vec<String> = job
            .drv
            .outputs
            .values()
            .filter(|p| !self.view().is_valid_path(p).unwrap_or(false))
            .map(|p| self.shown(p))
            .collect();
        events.event(Event::BuildStarted {
            id: job.id,
            drv: &job.drv_path,
            machine: Some(&remote.machine),
            rebuild: self.rebuild_of(&job.drv_path),
        });
        let mut log = match self.open_log(job) {
            Ok(l) => l,
            Err(e) => return e,
        };
        let inputs: Vec<String> = input_paths.iter().map(|p| self.shown(p)).collect();
        let start = now();
        let machine = remote.machine.clone();
        let outcome = remote.run(&inputs, &missing, &mut |line| {
            let _ = log.write(line);
            let _ = log.write(b"\n");
            events.event(Event::LogLine { id: job.id, line });
        });
        let _ = log.finish();
        let mut result = match outcome {
            Ok(0) => match self.wanted_outputs(&job.drv.outputs, &job.wanted) {
                Ok(Some(outputs)) => BuildResult::success(BuildStatus::Built, outputs),
                Ok(None) => BuildResult::failure(
                    BuildStatus::MiscFailure,
                    format!(
                        "the build hook built '{drv_shown}' but its outputs are not valid in the store"
                    ),
                ),
                Err(e) => misc(e),
            },
            Ok(100) => BuildResult::failure(
                BuildStatus::PermanentFailure,
                format!("remote build of '{drv_shown}' on '{machine}' failed"),
            ),
            Ok(code) => BuildResult::failure(
                BuildStatus::TransientFailure,
                format!(
                    "remote build of '{drv_shown}' on '{machine}' failed (the hook exited with {code})"
                ),
            ),
            Err(e) => BuildResult::failure(BuildStatus::TransientFailure, e.to_string()),
        };
        result.start_time = start;
        result.stop_time = now();
        result
    }
}
