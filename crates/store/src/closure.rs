//! Closures and topological order over any [`Store`].

use std::collections::{BTreeMap, BTreeSet};

use kiln_formats::store_path::{StorePath, StorePathSet};

use crate::{PathInfo, Store, StoreError};

/// The closure of `start` (Nix's `computeFSClosure`): everything reachable
/// through references, or through referrers when `flip` is set;
/// `include_outputs` adds the outputs of derivations met on the way,
/// `include_derivers` their derivers.
pub fn compute_closure(
    store: &dyn Store,
    start: &StorePathSet,
    flip: bool,
    include_outputs: bool,
    include_derivers: bool,
) -> Result<StorePathSet, StoreError> {
    let mut closure = StorePathSet::new();
    let mut pending: Vec<StorePath> = start.iter().cloned().collect();
    while let Some(path) = pending.pop() {
        if !closure.insert(path.clone()) {
            continue;
        }
        let mut next = StorePathSet::new();
        if flip {
            next.extend(store.query_referrers(&path)?);
            if include_outputs && path.is_derivation() {
                next.extend(store.query_derivation_outputs(&path)?.into_values());
            }
            if include_derivers {
                // Derivations whose outputs include this path.
                let info = store.path_info_or_error(&path)?;
                if let Some(d) = info.deriver {
                    if store.is_valid_path(&d)? {
                        next.insert(d);
                    }
                }
            }
        } else {
            let info = store.path_info_or_error(&path)?;
            next.extend(info.references.iter().cloned());
            if include_outputs && path.is_derivation() {
                for out in store.query_derivation_outputs(&path)?.into_values() {
                    if store.is_valid_path(&out)? {
                        next.insert(out);
                    }
                }
            }
            if include_derivers {
                if let Some(d) = info.deriver {
                    if store.is_valid_path(&d)? {
                        next.insert(d);
                    }
                }
            }
        }
        pending.extend(next.into_iter().filter(|p| !closure.contains(p)));
    }
    Ok(closure)
}

/// `paths` ordered so that every path comes after the paths of the set it
/// refers to (dependencies first: the order of `nix-store -qR` and of an
/// export). Ties are broken by name, so the order is deterministic.
pub fn topo_sort(store: &dyn Store, paths: &StorePathSet) -> Result<Vec<StorePath>, StoreError> {
    let mut refs = BTreeMap::new();
    for path in paths {
        let info = store.path_info_or_error(path)?;
        let inside: BTreeSet<StorePath> = info
            .references
            .into_iter()
            .filter(|r| r != path && paths.contains(r))
            .collect();
        refs.insert(path.clone(), inside);
    }
    Ok(topo_sort_by(paths, |p| {
        refs.get(p).cloned().unwrap_or_default()
    }))
}

/// `infos` reordered so that every path comes after the paths of the set
/// it refers to, as [`Store::add_nars`] and export streams want them.
pub fn dependency_order(infos: impl IntoIterator<Item = PathInfo>) -> Vec<PathInfo> {
    let mut by_path: BTreeMap<StorePath, PathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let paths: StorePathSet = by_path.keys().cloned().collect();
    topo_sort_by(&paths, |p| by_path[p].references.clone())
        .into_iter()
        .map(|p| by_path.remove(&p).expect("sorted from the map's keys"))
        .collect()
}

/// Topological sort of `paths` given each one's references (dependencies
/// first). Cycles (impossible among valid paths) are broken arbitrarily.
pub(crate) fn topo_sort_by(
    paths: &StorePathSet,
    mut references: impl FnMut(&StorePath) -> StorePathSet,
) -> Vec<StorePath> {
    let mut sorted = Vec::with_capacity(paths.len());
    let mut done = StorePathSet::new();
    let mut visiting = StorePathSet::new();
    for root in paths {
        if done.contains(root) {
            continue;
        }
        // Iterative DFS: (path, its references still to visit).
        let mut stack: Vec<(StorePath, Vec<StorePath>)> = Vec::new();
        visiting.insert(root.clone());
        let r = references(root).into_iter().rev().collect();
        stack.push((root.clone(), r));
        while let Some((path, todo)) = stack.last_mut() {
            match todo.pop() {
                Some(dep) => {
                    if dep == *path
                        || done.contains(&dep)
                        || visiting.contains(&dep)
                        || !paths.contains(&dep)
                    {
                        continue;
                    }
                    visiting.insert(dep.clone());
                    let r = references(&dep).into_iter().rev().collect();
                    stack.push((dep, r));
                }
                None => {
                    let path = path.clone();
                    stack.pop();
                    visiting.remove(&path);
                    done.insert(path.clone());
                    sorted.push(path);
                }
            }
        }
    }
    sorted
}
