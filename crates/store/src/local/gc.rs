//! Garbage collection: roots, temporary roots, liveness, deletion.
//!
//! Roots are the symlinks under `gcroots/` (followed one more hop when
//! they point outside the store — indirect roots, e.g. `gcroots/auto/*` →
//! `~/result` → store path; dangling `auto/` links are removed), the
//! profiles under `profiles/`, the temporary roots of live processes, and
//! the runtime roots: paths running processes use, read from `/proc`.
//!
//! The collector holds the GC lock for the whole run and a shared lock on
//! every live process's temp-roots file, so no process can add a new
//! temporary root (which needs an exclusive lock on its own file) until it
//! is done: a path that a process adds or starts using is either seen as a
//! root or not touched until after collection. Paths are removed from the
//! database first, then from disk, so a crash leaves at worst invalid
//! leftovers, never a valid path without contents.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nixbase32;
use kiln_formats::store_path::{StorePath, StorePathSet};

use super::LocalStore;
use super::lock::{self, FileLock, LockKind, PathLock};
use super::{fsutil, par, runtime_roots};
use crate::{Store, StoreError};

/// What a collection does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcAction {
    /// List the live paths (`--print-live`).
    ReturnLive,
    /// List the dead paths (`--print-dead`).
    ReturnDead,
    /// Delete the dead paths.
    DeleteDead,
    /// Delete exactly these paths, refusing any that is alive.
    DeleteSpecific(StorePathSet),
}

/// Options of a collection, with Nix's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOptions {
    pub action: GcAction,
    /// Keep the outputs of live derivations (`keep-outputs`, default off).
    pub keep_outputs: bool,
    /// Keep the derivers of live paths (`keep-derivations`, default on).
    pub keep_derivations: bool,
    /// Stop once this many bytes are freed.
    pub max_freed: u64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            action: GcAction::DeleteDead,
            keep_outputs: false,
            keep_derivations: true,
            max_freed: u64::MAX,
        }
    }
}

impl GcOptions {
    /// Deleting dead paths, keeping what `keep-outputs` and
    /// `keep-derivations` in Nix's configuration ask to keep.
    pub fn from_nix_conf(
        conf: &crate::nix_conf::NixConf,
    ) -> Result<GcOptions, crate::nix_conf::NixConfError> {
        Ok(GcOptions {
            keep_outputs: conf.keep_outputs()?,
            keep_derivations: conf.keep_derivations()?,
            ..GcOptions::default()
        })
    }
}

/// What a collection found or did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcResults {
    /// Paths listed or deleted, in the order handled.
    pub paths: Vec<StorePath>,
    /// Bytes freed on disk.
    pub bytes_freed: u64,
}

impl LocalStore {
    /// The roots: each store path with the links that keep it alive.
    pub fn find_roots(&self) -> Result<BTreeMap<StorePath, BTreeSet<PathBuf>>, StoreError> {
        let mut roots = BTreeMap::new();
        let gcroots = self.state_dir.join("gcroots");
        self.scan_roots(&gcroots, &gcroots.join("auto"), &mut roots)?;
        self.scan_roots(
            &self.state_dir.join("profiles"),
            &gcroots.join("auto"),
            &mut roots,
        )?;
        for (path, sources) in self.find_runtime_roots()? {
            roots.entry(path).or_default().extend(sources);
        }
        Ok(roots)
    }

    /// The valid paths that running processes use (see
    /// [`runtime_roots`](super::runtime_roots)), with the `/proc` entries
    /// that show them.
    pub fn find_runtime_roots(&self) -> Result<BTreeMap<StorePath, BTreeSet<PathBuf>>, StoreError> {
        let prefixes = runtime_roots::StorePrefixes::new([
            Path::new(self.config.store_dir.as_str()),
            self.real_store.as_path(),
        ]);
        let found = runtime_roots::find_runtime_roots(Path::new("/proc"), &prefixes);
        let mut roots = BTreeMap::new();
        let db = self.reader()?;
        for (hash_part, sources) in found {
            if let Some(path) = db.query_path_from_hash_part(&hash_part)? {
                roots.insert(path, sources);
            }
        }
        Ok(roots)
    }

    /// A store path named by `target` (a logical path, possibly inside a store path).
    fn store_path_of(&self, target: &Path) -> Option<StorePath> {
        let s = target.to_str()?;
        self.config.store_dir.split_path(s).ok().map(|(p, _)| p)
    }

    fn scan_roots(
        &self,
        dir: &Path,
        auto: &Path,
        roots: &mut BTreeMap<StorePath, BTreeSet<PathBuf>>,
    ) -> Result<(), StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io("read roots directory", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("read roots directory", dir, e))?;
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                self.scan_roots(&path, auto, roots)?;
            } else if ft.is_symlink() {
                let Ok(target) = fs::read_link(&path) else {
                    continue;
                };
                if let Some(sp) = self.store_path_of(&target) {
                    roots.entry(sp).or_default().insert(path);
                    continue;
                }
                // Indirect: the link names a link elsewhere (e.g. a `result`
                // symlink), which must itself point into the store.
                let target = path.parent().map_or(target.clone(), |p| p.join(&target));
                match fs::symlink_metadata(&target) {
                    Err(_) => {
                        if path.starts_with(auto) {
                            let _ = fs::remove_file(&path);
                        }
                    }
                    Ok(m) if m.file_type().is_symlink() => {
                        if let Ok(t2) = fs::read_link(&target) {
                            if let Some(sp) = self.store_path_of(&t2) {
                                roots.entry(sp).or_default().insert(target);
                            }
                        }
                    }
                    Ok(_) => {}
                }
            } else if ft.is_file() {
                // A file named after a store path roots it.
                if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                    if let Ok(sp) = name.parse::<StorePath>() {
                        roots.entry(sp).or_default().insert(path);
                    }
                }
            }
        }
        Ok(())
    }

    /// Registers `link` (outside the store, pointing at a store path) as
    /// an indirect root: `gcroots/auto/<hash>` → `link`.
    pub fn add_indirect_root(&self, link: &Path) -> Result<(), StoreError> {
        let hash = Hash::digest(HashAlgo::Sha1, link.as_os_str().as_encoded_bytes());
        let auto = self.state_dir.join("gcroots/auto");
        fs::create_dir_all(&auto).map_err(|e| StoreError::io("create directory", &auto, e))?;
        let name = auto.join(nixbase32::encode(hash.as_bytes()));
        let tmp = auto.join(format!(".tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(link, &tmp)
            .map_err(|e| StoreError::io("create root", &tmp, e))?;
        fs::rename(&tmp, &name).map_err(|e| StoreError::io("create root", &name, e))
    }

    /// Makes `link` a symlink to `path` and an indirect root (`--add-root`).
    pub fn add_perm_root(&self, path: &StorePath, link: &Path) -> Result<(), StoreError> {
        let target = self.config.store_dir.print_path(path);
        let tmp = link.with_extension(format!("tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)
            .map_err(|e| StoreError::io("create root", &tmp, e))?;
        fs::rename(&tmp, link).map_err(|e| StoreError::io("create root", link, e))?;
        let abs = if link.is_absolute() {
            link.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(link))
                .unwrap_or(link.to_path_buf())
        };
        self.add_indirect_root(&abs)
    }

    /// Runs a collection.
    pub fn collect_garbage(&self, options: &GcOptions) -> Result<GcResults, StoreError> {
        let _gc_lock =
            FileLock::acquire(&self.state_dir.join("gc.lock"), LockKind::Exclusive, true)?;

        let mut root_paths: StorePathSet = self.find_roots()?.into_keys().collect();
        // Temp roots of live processes; their files stay share-locked (in
        // `_held`) until we are done.
        let mut _held = Vec::new();
        let mut live_pids = BTreeSet::new();
        let temproots = self.state_dir.join("temproots");
        if let Ok(entries) = fs::read_dir(&temproots) {
            for entry in entries.flatten() {
                let path = entry.path();
                if let Some((file, roots)) = lock::read_temp_roots(&path)? {
                    _held.push(file);
                    if let Some(pid) = entry.file_name().to_str().and_then(lock::temp_roots_owner) {
                        live_pids.insert(pid);
                    }
                    for r in roots {
                        if let Some(sp) = self.store_path_of(Path::new(&r)) {
                            root_paths.insert(sp);
                        }
                    }
                }
            }
        }
        live_pids.insert(std::process::id());

        let graph = self.db().load_graph()?;
        let n = graph.paths.len();
        // Liveness: everything reachable from the roots.
        let mut live = vec![false; n];
        let mut stack: Vec<usize> = root_paths
            .iter()
            .filter_map(|p| graph.index.get(p).copied())
            .collect();
        while let Some(i) = stack.pop() {
            if live[i] {
                continue;
            }
            live[i] = true;
            stack.extend(graph.references[i].iter().copied().filter(|j| !live[*j]));
            if options.keep_derivations {
                if let Some(d) = graph.deriver[i].as_ref().and_then(|d| graph.index.get(d)) {
                    stack.push(*d);
                }
            }
            if options.keep_outputs {
                for o in &graph.outputs[i] {
                    if let Some(j) = graph.index.get(o) {
                        stack.push(*j);
                    }
                }
            }
        }
        if options.keep_outputs {
            // Outputs keep their derivation's other outputs through the
            // derivation only when it is live; done above. Nothing more.
        }

        let mut results = GcResults::default();
        let candidates: Vec<usize> = match &options.action {
            GcAction::ReturnLive => {
                results.paths = (0..n)
                    .filter(|i| live[*i])
                    .map(|i| graph.paths[i].clone())
                    .collect();
                return Ok(results);
            }
            GcAction::ReturnDead => {
                results.paths = (0..n)
                    .filter(|i| !live[*i])
                    .map(|i| graph.paths[i].clone())
                    .collect();
                return Ok(results);
            }
            GcAction::DeleteDead => (0..n).filter(|i| !live[*i]).collect(),
            GcAction::DeleteSpecific(paths) => {
                let mut chosen = Vec::new();
                let wanted: BTreeSet<usize> = paths
                    .iter()
                    .filter_map(|p| graph.index.get(p).copied())
                    .collect();
                for p in paths {
                    let Some(&i) = graph.index.get(p) else {
                        continue;
                    };
                    let print = || self.config.store_dir.print_path(p);
                    if live[i] {
                        return Err(StoreError::PathAlive {
                            path: print(),
                            why: "it is reachable from a GC root or a running process".into(),
                        });
                    }
                    if let Some(r) = graph.referrers[i]
                        .iter()
                        .find(|r| **r != i && !wanted.contains(r))
                    {
                        return Err(StoreError::PathAlive {
                            path: print(),
                            why: format!(
                                "'{}' refers to it",
                                self.config.store_dir.print_path(&graph.paths[*r])
                            ),
                        });
                    }
                    chosen.push(i);
                }
                chosen
            }
        };

        // Referrers before their references, so the database's
        // foreign keys allow each deletion.
        let order = referrers_first(&graph, &candidates);
        // With a limit, stop as soon as it is reached, as Nix does: one
        // path at a time.
        let chunk = if options.max_freed == u64::MAX {
            1024
        } else {
            1
        };
        for batch in order.chunks(chunk) {
            if results.bytes_freed >= options.max_freed {
                break;
            }
            {
                let mut db = self.db();
                let tx = db.write()?;
                for &i in batch {
                    tx.invalidate(&graph.paths[i])?;
                }
                tx.commit()?;
            }
            // Deleting waits on the journal for every file: several at once.
            let freed = par::map(batch.to_vec(), |i| {
                let real = self.real_path(&graph.paths[i]);
                tracing::debug!(path = %real.display(), "deleting");
                fsutil::remove_tree(&real).map_err(|e| StoreError::io("delete", &real, e))
            });
            for (&i, f) in batch.iter().zip(freed) {
                results.bytes_freed += f?;
                results.paths.push(graph.paths[i].clone());
            }
        }

        if options.action == GcAction::DeleteDead && results.bytes_freed < options.max_freed {
            results.bytes_freed +=
                self.delete_invalid_leftovers(&graph, &root_paths, &live_pids)?;
            results.bytes_freed += self.prune_links()?;
        }
        Ok(results)
    }

    /// Deletes what is in the store directory but not valid: leftovers of
    /// interrupted adds, except those of live processes.
    fn delete_invalid_leftovers(
        &self,
        graph: &super::db::Graph,
        temp_roots: &StorePathSet,
        live_pids: &BTreeSet<u32>,
    ) -> Result<u64, StoreError> {
        let mut freed = 0;
        let entries = fs::read_dir(&self.real_store)
            .map_err(|e| StoreError::io("read", &self.real_store, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == ".links" || name == lock::spares::DIR {
                continue;
            }
            if let Some(rest) = name.strip_prefix(".kiln-tmp-") {
                let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|pid| {
                    live_pids.contains(&pid) || lock::process_holds_temp_roots(&self.state_dir, pid)
                }) {
                    continue;
                }
            } else if name.ends_with(".lock") {
                // A lock file: leave it to its holder if it is held, else
                // release it as its holder would have (marked stale for
                // anyone waiting on it, and taken away).
                drop(PathLock::acquire(&entry.path(), false)?);
                continue;
            } else if let Ok(sp) = name.parse::<StorePath>() {
                if graph.index.contains_key(&sp)
                    || temp_roots.contains(&sp)
                    || self.is_valid_path(&sp)?
                {
                    continue;
                }
            }
            freed += fsutil::remove_tree(&entry.path())
                .map_err(|e| StoreError::io("delete", entry.path(), e))?;
        }
        Ok(freed)
    }

    /// Removes `.links/` entries no store file shares any more.
    fn prune_links(&self) -> Result<u64, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let links = self.real_store.join(".links");
        let Ok(entries) = fs::read_dir(&links) else {
            return Ok(0);
        };
        let mut freed = 0;
        for entry in entries.flatten() {
            if let Ok(m) = entry.metadata() {
                if m.nlink() == 1 {
                    if fs::remove_file(entry.path()).is_ok() {
                        freed += m.blocks() * 512;
                    }
                }
            }
        }
        Ok(freed)
    }
}

/// `chosen` ordered so that every path comes before the chosen paths it
/// refers to.
fn referrers_first(graph: &super::db::Graph, chosen: &[usize]) -> Vec<usize> {
    let set: BTreeSet<usize> = chosen.iter().copied().collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::with_capacity(chosen.len());
    // Post-order over references gives references first; reversed at the end.
    for &start in chosen {
        if done.contains(&start) {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        done.insert(start);
        while let Some((node, next)) = stack.last_mut() {
            let refs = &graph.references[*node];
            if *next < refs.len() {
                let r = refs[*next];
                *next += 1;
                if set.contains(&r) && !done.contains(&r) {
                    done.insert(r);
                    stack.push((r, 0));
                }
            } else {
                out.push(*node);
                stack.pop();
            }
        }
    }
    out.reverse();
    out
}
