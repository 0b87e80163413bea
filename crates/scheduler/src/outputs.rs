//! After the builder: each output made canonical, hashed and scanned for
//! references in one pass over its NAR, fixed-output hashes and output
//! checks verified, then moved into the store; syncing and registering
//! them (all outputs in one transaction) is [`crate::commit`]'s.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kiln_derivation::options::OutputChecks;
use kiln_derivation::{BuildOptions, Derivation, DerivationOutput, HashMethod};
use kiln_formats::content_address::ContentAddress;
use kiln_formats::hash::{Hash, HashAlgo, Hasher};
use kiln_formats::nar;
use kiln_formats::store_path::{FileIngestionMethod, StoreDir, StorePath, StorePathSet};
use kiln_store::local::LocalStore;
use kiln_store::local::fsutil;
use kiln_store::refs::RefScanner;
use kiln_store::{PathInfo, Store, StoreError};

use crate::env::print_paths;
use crate::result::{BuildResult, BuildStatus};

/// One output as found after the build.
#[derive(Debug)]
struct Found {
    name: String,
    path: StorePath,
    /// Where the builder left it.
    source: PathBuf,
    info: PathInfo,
}

/// Where the outputs are and what to do with them.
#[derive(Debug)]
pub struct Registration<'a> {
    pub store: &'a LocalStore,
    /// The store as the build sees it (outputs of earlier builds that wait
    /// to be registered are valid).
    pub view: &'a dyn Store,
    pub drv_path: &'a StorePath,
    pub drv: &'a Derivation,
    pub options: &'a BuildOptions,
    pub outputs: &'a BTreeMap<String, StorePath>,
    /// The directory the builder wrote its outputs in (the scratch store,
    /// or the real store when unsandboxed).
    pub built_in: &'a Path,
    pub input_paths: &'a StorePathSet,
    /// `--check`: compare with the valid outputs instead of registering.
    pub check: bool,
    /// Register copies of the outputs in new files rather than what the
    /// builder wrote: a process outside the build may hold descriptors
    /// into those (a fixed-output build's, which has the host's network).
    pub copy: bool,
}

/// Copies of outputs made in the store directory, deleted on drop: those
/// still listed were not moved into place.
struct Copies(Vec<PathBuf>);

impl Drop for Copies {
    fn drop(&mut self) {
        for copy in &self.0 {
            if let Err(e) = fsutil::remove_tree(copy) {
                tracing::warn!(path = %copy.display(), error = %e, "cannot delete a copied output");
            }
        }
    }
}

fn rejected(error: String) -> BuildResult {
    BuildResult::failure(BuildStatus::OutputRejected, error)
}

fn misc(e: impl std::fmt::Display) -> BuildResult {
    BuildResult::failure(BuildStatus::MiscFailure, e.to_string())
}

struct Tee<'a> {
    hash: Hasher,
    extra: Option<&'a mut Hasher>,
    scanner: &'a mut RefScanner,
    len: u64,
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hash.update(buf);
        if let Some(h) = self.extra.as_deref_mut() {
            h.update(buf);
        }
        self.scanner.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Outputs checked and moved into place, to be registered.
#[derive(Debug, Default)]
pub struct Placed {
    /// Every output's path by name.
    pub outputs: BTreeMap<String, StorePath>,
    /// The outputs' infos, and the `.drv`'s when it is valid (registering
    /// it again records its outputs); empty for `--check`.
    pub infos: Vec<PathInfo>,
    pub drv_outputs: BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    /// The outputs' real locations.
    pub files: Vec<PathBuf>,
}

/// Checks the outputs and moves them into the store (or, with `check`,
/// compares them with the valid ones).
pub fn place_outputs(r: &Registration<'_>) -> Result<Placed, BuildResult> {
    let store_dir = r.store.store_dir();
    let drv_shown = store_dir.print_path(r.drv_path);
    let mut candidates: Vec<StorePath> = r.input_paths.iter().cloned().collect();
    candidates.extend(r.outputs.values().cloned());

    let mut found = Vec::new();
    // Fresh copies of fixed-output outputs, deleted unless registered.
    let mut copies = Copies(Vec::new());
    for (name, path) in r.outputs {
        let mut source = r.built_in.join(path.base_name());
        if std::fs::symlink_metadata(&source).is_err() {
            return Err(rejected(format!(
                "builder for '{drv_shown}' failed to produce output path for output '{name}' at '{}'",
                store_dir.display(path)
            )));
        }
        // What is hashed, checked and registered is a copy into new files,
        // made where the build never was, without following symlinks
        // (CVE-2024-27297, CVE-2025-46416, CVE-2026-39860).
        if r.copy && !r.check {
            let copy = r.store.temp_path();
            copies.0.push(copy.clone());
            fsutil::copy_tree_nofollow(&source, &copy).map_err(|e| {
                misc(format!(
                    "cannot copy output '{}' out of the build: {e}",
                    source.display()
                ))
            })?;
            source = copy;
        }
        fsutil::canonicalise_tree(&source).map_err(|e| {
            misc(format!(
                "cannot canonicalise output '{}': {e}",
                source.display()
            ))
        })?;
        let fixed = match &r.drv.outputs[name] {
            DerivationOutput::Fixed { hash, .. } => Some(*hash),
            _ => None,
        };
        let mut scanner = RefScanner::new(candidates.iter().cloned());
        let mut extra = fixed
            .filter(|f| f.method == HashMethod::Recursive && f.hash.algo() != HashAlgo::Sha256)
            .map(|f| Hasher::new(f.hash.algo()));
        let tee = Tee {
            hash: Hasher::new(HashAlgo::Sha256),
            extra: extra.as_mut(),
            scanner: &mut scanner,
            len: 0,
        };
        let tee = nar::dump_path(&source, tee).map_err(|e| {
            misc(format!(
                "cannot serialise output '{}': {e}",
                source.display()
            ))
        })?;
        let nar_hash = tee.hash.finish();
        let nar_size = tee.len;
        let references = scanner.finish();
        let mut info = PathInfo::new(path.clone(), nar_hash, nar_size);
        info.deriver = Some(r.drv_path.clone());
        info.ultimate = true;
        info.references = references;
        if let Some(wanted) = fixed {
            let got = match wanted.method {
                HashMethod::Recursive => match extra {
                    Some(h) => h.finish(),
                    None => nar_hash,
                },
                HashMethod::Flat | HashMethod::Text => {
                    let meta = std::fs::symlink_metadata(&source).map_err(misc)?;
                    use std::os::unix::fs::PermissionsExt;
                    if !meta.is_file() || meta.permissions().mode() & 0o100 != 0 {
                        return Err(rejected(format!(
                            "output path '{}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)",
                            store_dir.display(path)
                        )));
                    }
                    flat_file_hash(&source, wanted.hash.algo())
                        .map_err(|e| misc(format!("cannot hash '{}': {e}", source.display())))?
                }
            };
            if got != wanted.hash {
                let mut result = rejected(format!(
                    "hash mismatch in fixed-output derivation '{drv_shown}':\n  specified: {}\n     got:    {}",
                    wanted.hash.to_sri(),
                    got.to_sri()
                ));
                result.hash_mismatch = true;
                return Err(result);
            }
            if !info.references.is_empty() {
                return Err(rejected(format!(
                    "the fixed-output derivation '{drv_shown}' must not reference store paths: '{}' refers to{}",
                    store_dir.display(path),
                    print_paths(store_dir, &info.references)
                )));
            }
            info.ca = Some(match wanted.method {
                HashMethod::Text => ContentAddress::Text(got),
                HashMethod::Flat => ContentAddress::Fixed {
                    method: FileIngestionMethod::Flat,
                    hash: got,
                },
                HashMethod::Recursive => ContentAddress::Fixed {
                    method: FileIngestionMethod::Recursive,
                    hash: got,
                },
            });
        }
        found.push(Found {
            name: name.clone(),
            path: path.clone(),
            source,
            info,
        });
    }

    check_outputs(r, &found)?;

    if r.check {
        for f in &found {
            let valid = r
                .view
                .query_path_info(&f.path)
                .map_err(misc)?
                .ok_or_else(|| {
                    misc(format!(
                        "'{}' is not valid, so it cannot be checked",
                        store_dir.display(&f.path)
                    ))
                })?;
            if valid.nar_hash != f.info.nar_hash {
                let mut result = BuildResult::failure(
                    BuildStatus::NotDeterministic,
                    format!(
                        "derivation '{drv_shown}' may not be deterministic: output '{}' differs",
                        store_dir.display(&f.path)
                    ),
                );
                result.check_mismatch = true;
                return Err(result);
            }
        }
        return Ok(Placed {
            outputs: found.into_iter().map(|f| (f.name, f.path)).collect(),
            ..Placed::default()
        });
    }

    let mut files = Vec::with_capacity(found.len());
    for f in &found {
        let dest = r.store.real_path(&f.path);
        // Unsandboxed builds write in place; anything else is moved there.
        if f.source != dest {
            if std::fs::symlink_metadata(&dest).is_ok() {
                // An invalid leftover (we hold the lock) or a path being repaired.
                fsutil::remove_tree(&dest)
                    .map_err(|e| misc(format!("cannot delete '{}': {e}", dest.display())))?;
            }
            std::fs::rename(&f.source, &dest).map_err(|e| {
                misc(format!(
                    "cannot move output '{}' into the store at '{}': {e}",
                    f.source.display(),
                    dest.display()
                ))
            })?;
        }
        copies.0.retain(|c| *c != f.source);
        files.push(dest);
    }
    let mut infos: Vec<PathInfo> = found.iter().map(|f| f.info.clone()).collect();
    // Registering the .drv again (unchanged) records its outputs in
    // DerivationOutputs, whoever registered it first.
    let mut drv_outputs = BTreeMap::new();
    if let Some(drv_info) = r.view.query_path_info(r.drv_path).map_err(misc)? {
        infos.push(drv_info);
        drv_outputs.insert(r.drv_path.clone(), r.outputs.clone());
    }
    Ok(Placed {
        outputs: found.into_iter().map(|f| (f.name, f.path)).collect(),
        infos,
        drv_outputs,
        files,
    })
}

/// Resolves the entries of a reference list: output names of this
/// derivation or store paths.
fn resolve(
    store_dir: &StoreDir,
    outputs: &BTreeMap<String, StorePath>,
    drv_shown: &str,
    specs: &[String],
) -> Result<StorePathSet, BuildResult> {
    specs
        .iter()
        .map(|s| match outputs.get(s) {
            Some(p) => Ok(p.clone()),
            None => store_dir.parse_path(s).map_err(|_| {
                BuildResult::failure(
                    BuildStatus::OutputRejected,
                    format!(
                        "derivation '{drv_shown}' contains an illegal reference specifier '{s}'"
                    ),
                )
            }),
        })
        .collect()
}

fn closure_of(
    store: &dyn Store,
    found: &[Found],
    start: &StorePathSet,
) -> Result<StorePathSet, StoreError> {
    let own: BTreeMap<&StorePath, &PathInfo> = found.iter().map(|f| (&f.path, &f.info)).collect();
    let mut seen = StorePathSet::new();
    let mut stack: Vec<StorePath> = start.iter().cloned().collect();
    while let Some(p) = stack.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let refs = match own.get(&p) {
            Some(info) => info.references.clone(),
            None => store.query_references(&p)?,
        };
        stack.extend(refs.into_iter().filter(|r| !seen.contains(r)));
    }
    Ok(seen)
}

fn check_outputs(r: &Registration<'_>, found: &[Found]) -> Result<(), BuildResult> {
    let store_dir = r.store.store_dir();
    let drv_shown = store_dir.print_path(r.drv_path);
    for f in found {
        let Some(checks) = r.options.output_checks.for_output(&f.name) else {
            continue;
        };
        let checks: &OutputChecks = checks;
        let mut refs = f.info.references.clone();
        if checks.ignore_self_refs {
            refs.remove(&f.path);
        }
        if let Some(max) = checks.max_size {
            if f.info.nar_size > max {
                return Err(rejected(format!(
                    "path '{}' is too large at {} bytes; limit is {max} bytes",
                    store_dir.display(&f.path),
                    f.info.nar_size
                )));
            }
        }
        let needs_closure = checks.allowed_requisites.is_some()
            || checks.disallowed_requisites.is_some()
            || checks.max_closure_size.is_some();
        let requisites = if needs_closure {
            let mut c = closure_of(r.view, found, &[f.path.clone()].into()).map_err(misc)?;
            if checks.ignore_self_refs {
                c.remove(&f.path);
            }
            c
        } else {
            StorePathSet::new()
        };
        if let Some(max) = checks.max_closure_size {
            let mut size = f.info.nar_size;
            for p in &requisites {
                if *p == f.path {
                    continue;
                }
                size += match found.iter().find(|x| x.path == *p) {
                    Some(x) => x.info.nar_size,
                    None => r.view.path_info_or_error(p).map_err(misc)?.nar_size,
                };
            }
            if size > max {
                return Err(rejected(format!(
                    "closure of path '{}' is too large at {size} bytes; limit is {max} bytes",
                    store_dir.display(&f.path)
                )));
            }
        }
        let lists: [(&Option<Vec<String>>, &StorePathSet, bool); 4] = [
            (&checks.allowed_references, &refs, true),
            (&checks.allowed_requisites, &requisites, true),
            (&checks.disallowed_references, &refs, false),
            (&checks.disallowed_requisites, &requisites, false),
        ];
        for (spec, used, allowed) in lists {
            let Some(spec) = spec else { continue };
            let listed = resolve(store_dir, r.outputs, &drv_shown, spec)?;
            let bad: StorePathSet = used
                .iter()
                .filter(|p| listed.contains(p) != allowed)
                .cloned()
                .collect();
            if !bad.is_empty() {
                return Err(rejected(format!(
                    "output '{}' is not allowed to refer to the following paths:{}",
                    store_dir.display(&f.path),
                    print_paths(store_dir, &bad)
                )));
            }
        }
    }
    Ok(())
}

fn flat_file_hash(path: &Path, algo: HashAlgo) -> io::Result<Hash> {
    let mut hasher = Hasher::new(algo);
    io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hasher.finish())
}
