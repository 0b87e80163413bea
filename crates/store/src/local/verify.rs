//! `verify`: the database against the disk (every valid path present), with
//! `check_contents` every path's NAR rehashed, and with a repair source
//! (a substituter, i.e. any other [`Store`]) damaged or missing paths
//! fetched again and swapped in atomically.

use std::io::{self, Seek};

use kiln_formats::hash::Hash;
use kiln_formats::store_path::StorePath;

use super::LocalStore;
use crate::{AddOptions, Store, StoreError};

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Valid in the database, absent on disk.
    Missing(StorePath),
    /// Contents do not hash to the registered NAR hash (or size).
    Modified {
        path: StorePath,
        expected: Hash,
        actual: Hash,
        expected_size: u64,
        actual_size: u64,
    },
}

/// What `verify` found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Paths checked.
    pub checked: usize,
    /// Problems found (repaired or not).
    pub problems: Vec<Problem>,
    /// Paths repaired from the repair source.
    pub repaired: Vec<StorePath>,
    /// Paths that could not be repaired, with why.
    pub unrepaired: Vec<(StorePath, String)>,
}

impl VerifyReport {
    /// True when no problem is left.
    pub fn is_clean(&self) -> bool {
        self.problems.len() == self.repaired.len()
    }
}

impl LocalStore {
    /// Checks every valid path; see the [module documentation](self).
    /// `repair_from` is where damaged paths are fetched from (`--repair`).
    pub fn verify(
        &self,
        check_contents: bool,
        repair_from: Option<&dyn Store>,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let paths = self.query_all_valid_paths()?;
        for path in paths {
            report.checked += 1;
            let real = self.real_path(&path);
            let problem = if std::fs::symlink_metadata(&real).is_err() {
                Some(Problem::Missing(path.clone()))
            } else if check_contents {
                let Some(info) = self.query_path_info(&path)? else {
                    continue;
                };
                let (actual, size) = super::fsutil::nar_hash(&real, info.nar_hash.algo())?;
                (actual != info.nar_hash || (info.nar_size != 0 && size != info.nar_size)).then(
                    || Problem::Modified {
                        path: path.clone(),
                        expected: info.nar_hash,
                        actual,
                        expected_size: info.nar_size,
                        actual_size: size,
                    },
                )
            } else {
                None
            };
            let Some(problem) = problem else { continue };
            report.problems.push(problem);
            if let Some(source) = repair_from {
                match self.repair_path(&path, source) {
                    Ok(()) => report.repaired.push(path),
                    Err(e) => report.unrepaired.push((path, e.to_string())),
                }
            }
        }
        Ok(report)
    }

    /// Replaces the contents of valid `path` with its NAR from `source`,
    /// which must hash to what the database says.
    pub fn repair_path(&self, path: &StorePath, source: &dyn Store) -> Result<(), StoreError> {
        let info = self.path_info_or_error(path)?;
        let mut spool = tempfile::tempfile()
            .map_err(|e| StoreError::io("create a temporary file in", std::env::temp_dir(), e))?;
        source.nar_from_path(path, &mut spool)?;
        spool.rewind().map_err(|e| StoreError::Stream {
            action: "rewind the spooled NAR",
            source: e,
        })?;
        self.add_nar(
            &info,
            &mut io::BufReader::new(spool),
            AddOptions {
                repair: true,
                check_sigs: false,
            },
        )
    }
}
