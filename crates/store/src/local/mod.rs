//! The local store: store paths as files under a store directory, validity
//! in Nix's SQLite database. (Being written.)

use std::path::PathBuf;

use kiln_formats::store_path::StoreDir;

use crate::StoreError;

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

/// The local store.
#[derive(Debug)]
pub struct LocalStore {
    config: LocalStoreConfig,
}

impl LocalStore {
    /// Opens (creating on first use) the store `config` describes.
    pub fn open(config: LocalStoreConfig) -> Result<LocalStore, StoreError> {
        Err(StoreError::Unsupported {
            store: config.url,
            operation: "opening (not written yet)",
        })
    }
}

impl crate::Store for LocalStore {
    fn store_dir(&self) -> &StoreDir {
        &self.config.store_dir
    }
    fn url(&self) -> String {
        self.config.url.clone()
    }
    fn query_path_info(
        &self,
        _path: &kiln_formats::store_path::StorePath,
    ) -> Result<Option<crate::PathInfo>, StoreError> {
        Err(crate::Store::unsupported(self, "queries (not written yet)"))
    }
    fn query_path_from_hash_part(
        &self,
        _hash_part: &str,
    ) -> Result<Option<kiln_formats::store_path::StorePath>, StoreError> {
        Err(crate::Store::unsupported(self, "queries (not written yet)"))
    }
    fn add_nar(
        &self,
        _info: &crate::PathInfo,
        _nar: &mut dyn std::io::Read,
        _options: crate::AddOptions,
    ) -> Result<(), StoreError> {
        Err(crate::Store::unsupported(self, "adding (not written yet)"))
    }
    fn nar_from_path(
        &self,
        _path: &kiln_formats::store_path::StorePath,
        _out: &mut dyn std::io::Write,
    ) -> Result<(), StoreError> {
        Err(crate::Store::unsupported(self, "NARs (not written yet)"))
    }
}
