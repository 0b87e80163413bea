//! Copying closures between stores ([`copy_paths`], what `kiln store copy`
//! and `nix copy` do) and substitution ([`Substituter`]: fetching paths
//! from a list of binary caches into a store, checking their signatures
//! against trusted keys — what the scheduler calls before building).
//!
//! A copy takes the closure of the requested paths in the source, skips
//! what the destination has, and adds the rest references first, several
//! at a time. Each NAR streams from the source into the destination's
//! `add_nar`, which checks its hash and size before the path becomes
//! valid: a truncated or corrupt download registers nothing.
//!
//! ```no_run
//! use kiln_store::substitute::Substituter;
//! use kiln_store::{open_store, Store};
//! use kiln_formats::signature::TrustedKeys;
//!
//! let local = open_store("local?root=/tmp/kiln-root")?;
//! let trusted = TrustedKeys::parse("cache.example.org-1:…").unwrap_or_default();
//! let subst = Substituter::open(&["file:///tmp/cache"], trusted, true)?;
//! let path = "/nix/store/…".parse().map(|p| [p].into_iter().collect()).unwrap_or_default();
//! let report = subst.substitute_paths(&*local, &path)?;
//! println!("fetched {} paths", report.copied.len());
//! # Ok::<(), kiln_store::StoreError>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::{Condvar, Mutex};

use kiln_formats::signature::TrustedKeys;
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};

use crate::binary_cache::{BinaryCacheConfig, BinaryCacheStore, check_signatures, pipe};
use crate::{AddOptions, NarSource, PathInfo, Store, StoreError, compute_closure};

/// How [`copy_paths`] copies.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Refuse paths not signed by one of these keys (content-addressed
    /// paths excepted); `None` copies without checking.
    pub trusted_keys: Option<TrustedKeys>,
    /// Paths copied at once; 0 picks one per CPU (at least 8 when either
    /// store is remote).
    pub jobs: usize,
    /// Copy only the paths given, not their closure (their references
    /// must then be valid in the destination already).
    pub no_closure: bool,
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Paths added to the destination, references first.
    pub copied: Vec<StorePath>,
    /// Paths of the closure the destination had already.
    pub already_valid: usize,
}

/// NARs up to this size are copied through memory; larger ones through
/// a pipe between two threads.
const IN_MEMORY: u64 = 4 << 20;

/// Copies `paths` and their closure from `src` to `dst`; see the [module
/// documentation](self).
pub fn copy_paths(
    src: &dyn Store,
    dst: &dyn Store,
    paths: &StorePathSet,
    options: &CopyOptions,
) -> Result<CopyReport, StoreError> {
    let closure = if options.no_closure {
        paths.clone()
    } else {
        compute_closure(src, paths, false, false, false)?
    };
    let valid = dst.query_valid_paths(&closure)?;
    let missing: StorePathSet = closure.difference(&valid).cloned().collect();
    let mut infos: HashMap<StorePath, PathInfo> = HashMap::with_capacity(missing.len());
    for path in &missing {
        let info = src.path_info_or_error(path)?;
        if let Some(trusted) = &options.trusted_keys {
            check_signatures(src.store_dir(), &info, trusted, &src.url())?;
        }
        infos.insert(path.clone(), info);
    }
    // Dependency order, so a destination that registers in batches sees
    // every path after its references.
    let order = crate::closure::topo_sort_by(&missing, |p| {
        infos[p].references_without_self().cloned().collect()
    });
    let ordered: Vec<PathInfo> = order
        .into_iter()
        .map(|p| infos.remove(&p).expect("sorted from these paths"))
        .collect();
    // A local source must not collect the paths while they are read.
    let roots: Vec<&StorePath> = ordered.iter().map(|i| &i.path).collect();
    src.add_temp_roots(&roots)?;
    let jobs = match options.jobs {
        0 => {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            // Round trips to a server are waiting, not computing.
            if is_remote(&src.url()) || is_remote(&dst.url()) {
                cpus.max(8)
            } else {
                0
            }
        }
        n => n,
    };
    let nars = |info: &PathInfo, out: &mut dyn Write| {
        let _span = tracing::debug_span!("copy", path = %info.path).entered();
        src.nar_from_path(&info.path, out)
    };
    let copied = dst.add_nars(&ordered, &nars, AddOptions::default(), jobs)?;
    Ok(CopyReport {
        copied,
        already_valid: valid.len(),
    })
}

fn is_remote(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// The default [`Store::add_nars`]: one [`Store::add_nar`] per path, up to
/// `jobs` at once, each once its references among `infos` are in.
pub fn add_nars_in_dependency_order<S: Store + ?Sized>(
    dst: &S,
    infos: &[PathInfo],
    nars: &NarSource<'_>,
    options: AddOptions,
    jobs: usize,
) -> Result<Vec<StorePath>, StoreError> {
    let jobs = match jobs {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let by_path: HashMap<StorePath, PathInfo> =
        infos.iter().map(|i| (i.path.clone(), i.clone())).collect();
    run_in_dependency_order(&by_path, jobs, |info| {
        with_nar(info, nars, |reader| dst.add_nar(info, reader, options))
    })
}

/// Hands the NAR that `nars` writes for `info` to `consume` as a reader:
/// through memory when it is small, through a pipe between two threads
/// when it is large (or of unknown size).
pub(crate) fn with_nar<T>(
    info: &PathInfo,
    nars: &NarSource<'_>,
    consume: impl FnOnce(&mut dyn io::BufRead) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if info.nar_size != 0 && info.nar_size <= IN_MEMORY {
        let mut nar = Vec::with_capacity(info.nar_size as usize);
        nars(info, &mut nar)?;
        return consume(&mut &nar[..]);
    }
    let (mut writer, mut reader) = pipe::pipe();
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || {
            nars(info, &mut writer)?;
            writer.flush().map_err(|source| StoreError::Stream {
                action: "pass the NAR on",
                source,
            })
        });
        let consumed = consume(&mut reader);
        drop(reader);
        let produced = producer.join().expect("NAR producer thread panicked");
        match (produced, consumed) {
            (Ok(()), consumed) => consumed,
            // The source's error says best why the stream ended early.
            (Err(e), Err(_)) => Err(e),
            // The consumer read a whole, checked NAR: that is what counts.
            (Err(_), Ok(t)) => Ok(t),
        }
    })
}

/// Runs `work` on every path of `infos` with up to `jobs` threads, each
/// only once all its references among `infos` are done. Stops at the
/// first error. Returns the paths in the order they finished.
fn run_in_dependency_order(
    infos: &HashMap<StorePath, PathInfo>,
    jobs: usize,
    work: impl Fn(&PathInfo) -> Result<(), StoreError> + Sync,
) -> Result<Vec<StorePath>, StoreError> {
    struct State<'a> {
        waiting_on: HashMap<&'a StorePath, usize>,
        ready: VecDeque<&'a StorePath>,
        left: usize,
        done: Vec<StorePath>,
        error: Option<StoreError>,
    }
    let mut dependents: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    let mut waiting_on = HashMap::new();
    let mut ready = VecDeque::new();
    for (path, info) in infos {
        let deps: Vec<&StorePath> = info
            .references_without_self()
            .filter_map(|r| infos.get_key_value(r).map(|(k, _)| k))
            .collect();
        for d in &deps {
            dependents.entry(*d).or_default().push(path);
        }
        if deps.is_empty() {
            ready.push_back(path);
        } else {
            waiting_on.insert(path, deps.len());
        }
    }
    let state = Mutex::new(State {
        waiting_on,
        ready,
        left: infos.len(),
        done: Vec::with_capacity(infos.len()),
        error: None,
    });
    let wake = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, infos.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let path = {
                        let mut s = lock();
                        loop {
                            if s.error.is_some() || s.left == 0 {
                                return;
                            }
                            if let Some(p) = s.ready.pop_front() {
                                break p;
                            }
                            s = wake.wait(s).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    let result = work(&infos[path]);
                    let mut s = lock();
                    match result {
                        Ok(()) => {
                            s.left -= 1;
                            s.done.push(path.clone());
                            for next in dependents.get(path).into_iter().flatten() {
                                let n = s.waiting_on.get_mut(next).expect("counted above");
                                *n -= 1;
                                if *n == 0 {
                                    s.ready.push_back(next);
                                }
                            }
                        }
                        Err(e) => {
                            s.error.get_or_insert(e);
                        }
                    }
                    wake.notify_all();
                }
            });
        }
    });
    let state = state.into_inner().unwrap_or_else(|p| p.into_inner());
    match state.error {
        Some(e) => Err(e),
        None => Ok(state.done),
    }
}

/// Binary caches to substitute from, in order of preference, with the
/// keys their paths must be signed by. Also a [`Store`] (read-only): the
/// first cache that has a path, trusted, answers for it — which is what
/// `verify --repair` and [`copy_paths`] need of a source.
#[derive(Debug)]
pub struct Substituter {
    caches: Vec<BinaryCacheStore>,
    /// `None` when signatures are not required.
    trusted: Option<TrustedKeys>,
    store_dir: StoreDir,
}

impl Substituter {
    /// Opens the caches at `urls`; `require_sigs` refuses paths that no key
    /// in `trusted` signed (Nix's `require-sigs`). Caches are tried in
    /// order of their `Priority` (lower first), then of `urls`.
    pub fn open(
        urls: &[&str],
        trusted: TrustedKeys,
        require_sigs: bool,
    ) -> Result<Substituter, StoreError> {
        let caches = urls
            .iter()
            .map(|u| BinaryCacheStore::open(u, BinaryCacheConfig::default()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Substituter::from_caches(
            caches,
            require_sigs.then_some(trusted),
        ))
    }

    /// A substituter over caches opened already.
    pub fn from_caches(
        mut caches: Vec<BinaryCacheStore>,
        trusted: Option<TrustedKeys>,
    ) -> Substituter {
        // Stable: equal priorities keep the order given.
        caches.sort_by_key(|c| c.cache_info().priority.unwrap_or(50));
        let store_dir = caches
            .first()
            .map_or_else(StoreDir::default, |c| c.store_dir().clone());
        Substituter {
            caches,
            trusted,
            store_dir,
        }
    }

    /// The caches, in the order they are tried.
    pub fn caches(&self) -> &[BinaryCacheStore] {
        &self.caches
    }

    /// The first cache that has `path` with a trusted signature, and the
    /// path's metadata there. A path that caches have only without a
    /// trusted signature is an
    /// [`Untrusted`](crate::binary_cache::BinaryCacheError::Untrusted) error.
    pub fn query_substitutable(
        &self,
        path: &StorePath,
    ) -> Result<Option<(&BinaryCacheStore, PathInfo)>, StoreError> {
        let mut untrusted = None;
        for cache in &self.caches {
            let Some(info) = cache.query_path_info(path)? else {
                continue;
            };
            match &self.trusted {
                Some(keys) => match check_signatures(&self.store_dir, &info, keys, &cache.url()) {
                    Ok(()) => return Ok(Some((cache, info))),
                    Err(e) => {
                        untrusted.get_or_insert(e);
                    }
                },
                None => return Ok(Some((cache, info))),
            }
        }
        match untrusted {
            Some(e) => Err(e.into()),
            None => Ok(None),
        }
    }

    /// Fetches `paths` and their closures into `dest` (references first),
    /// skipping what `dest` has. Every path must be substitutable.
    pub fn substitute_paths(
        &self,
        dest: &dyn Store,
        paths: &StorePathSet,
    ) -> Result<CopyReport, StoreError> {
        let _span = tracing::info_span!("substitute", paths = paths.len()).entered();
        copy_paths(self, dest, paths, &CopyOptions::default())
    }

    /// Which of `paths` some cache has (trusted); untrusted or missing
    /// ones are left out.
    pub fn query_substitutable_paths(
        &self,
        paths: &StorePathSet,
    ) -> Result<StorePathSet, StoreError> {
        let mut found = StorePathSet::new();
        for p in paths {
            match self.query_substitutable(p) {
                Ok(Some(_)) => {
                    found.insert(p.clone());
                }
                Ok(None) | Err(StoreError::BinaryCache(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(found)
    }
}

impl Store for Substituter {
    fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn url(&self) -> String {
        let urls: Vec<String> = self.caches.iter().map(|c| c.url()).collect();
        format!("substituters {}", urls.join(" "))
    }

    fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        Ok(self.query_substitutable(path)?.map(|(_, info)| info))
    }

    fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, StoreError> {
        for cache in &self.caches {
            if let Some(p) = cache.query_path_from_hash_part(hash_part)? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    fn add_nar(
        &self,
        _info: &PathInfo,
        _nar: &mut dyn io::BufRead,
        _options: AddOptions,
    ) -> Result<(), StoreError> {
        Err(self.unsupported("adding paths (substituters are read-only)"))
    }

    fn nar_from_path(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), StoreError> {
        match self.query_substitutable(path)? {
            Some((cache, _)) => cache.nar_from_path(path, out),
            None => Err(self.path_info_or_error(path).unwrap_err()),
        }
    }
}
