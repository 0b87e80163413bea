//! What a store knows about a valid path: [`PathInfo`], and its JSON form as
//! `nix path-info --json` prints it.

use std::collections::BTreeSet;

use kiln_formats::content_address::ContentAddress;
use kiln_formats::hash::{Hash, HashFormat};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use serde::Serialize;

/// The metadata of a valid store path, as Nix's `ValidPathInfo` (one row of
/// `ValidPaths` plus its references).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path itself.
    pub path: StorePath,
    /// The derivation that produced it, if known.
    pub deriver: Option<StorePath>,
    /// Hash of the path's NAR serialisation (sha256 in every Nix store).
    pub nar_hash: Hash,
    /// Size of that NAR in bytes.
    pub nar_size: u64,
    /// The store paths it refers to (possibly itself).
    pub references: StorePathSet,
    /// When it became valid, in seconds since the epoch (0 if unknown).
    pub registration_time: i64,
    /// Whether it was built here rather than copied or substituted.
    pub ultimate: bool,
    /// Signatures in Nix's `keyname:base64` form.
    pub sigs: BTreeSet<String>,
    /// Its content address, if it is content-addressed.
    pub ca: Option<ContentAddress>,
}

impl PathInfo {
    /// Whether a NAR read for this path is the one announced: its sha256
    /// first, then its size when one was given (0 is "unknown").
    pub fn check_nar(
        &self,
        store_dir: &StoreDir,
        nar_hash: Hash,
        nar_size: u64,
    ) -> Result<(), crate::StoreError> {
        if nar_hash != self.nar_hash {
            return Err(crate::StoreError::NarHashMismatch {
                path: store_dir.print_path(&self.path),
                expected: self.nar_hash,
                actual: nar_hash,
            });
        }
        if self.nar_size != 0 && nar_size != self.nar_size {
            return Err(crate::StoreError::NarSizeMismatch {
                path: store_dir.print_path(&self.path),
                expected: self.nar_size,
                actual: nar_size,
            });
        }
        Ok(())
    }

    /// A path with just the mandatory facts; everything else empty.
    pub fn new(path: StorePath, nar_hash: Hash, nar_size: u64) -> PathInfo {
        PathInfo {
            path,
            deriver: None,
            nar_hash,
            nar_size,
            references: StorePathSet::new(),
            registration_time: 0,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    /// The string Nix signs: `1;<path>;<narHash nixbase32>;<narSize>;<refs>`.
    pub fn fingerprint(&self, store: &StoreDir) -> String {
        let refs: Vec<String> = self
            .references
            .iter()
            .map(|r| store.print_path(r))
            .collect();
        format!(
            "1;{};{};{};{}",
            store.print_path(&self.path),
            self.nar_hash.to_typed_string(HashFormat::Nixbase32),
            self.nar_size,
            refs.join(",")
        )
    }

    /// References other than the path itself.
    pub fn references_without_self(&self) -> impl Iterator<Item = &StorePath> {
        self.references.iter().filter(move |r| **r != self.path)
    }

    /// The JSON object `nix path-info --json` prints for this path;
    /// `closure_size` is included when `-S` was given.
    pub fn to_json(&self, store: &StoreDir, closure_size: Option<u64>) -> PathInfoJson {
        PathInfoJson {
            path: store.print_path(&self.path),
            nar_hash: self.nar_hash.to_sri(),
            nar_size: self.nar_size,
            references: self
                .references
                .iter()
                .map(|r| store.print_path(r))
                .collect(),
            ca: self.ca.as_ref().map(ToString::to_string),
            closure_size,
            deriver: self.deriver.as_ref().map(|d| store.print_path(d)),
            registration_time: (self.registration_time != 0).then_some(self.registration_time),
            ultimate: self.ultimate.then_some(true),
            signatures: (!self.sigs.is_empty()).then(|| self.sigs.iter().cloned().collect()),
        }
    }
}

/// One object of `nix path-info --json` (Nix 2.8), fields in Nix's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathInfoJson {
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closure_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deriver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ultimate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signatures: Option<Vec<String>>,
}
