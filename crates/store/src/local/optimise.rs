//! `optimise`: identical regular files in the store become hard links to
//! one copy under `.links/<nixbase32 sha256 of the file's NAR>`, as Nix
//! names them, so Nix and Kiln share the same `.links` directory.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_formats::hash::HashAlgo;

use super::LocalStore;
use super::fsutil;
use crate::{Store, StoreError};

/// What `optimise` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OptimiseStats {
    /// Files replaced by a hard link.
    pub files_linked: u64,
    /// Bytes no longer stored twice.
    pub bytes_saved: u64,
}

impl LocalStore {
    /// Hard-links identical files across all valid paths.
    pub fn optimise(&self) -> Result<OptimiseStats, StoreError> {
        let links = self.real_store.join(".links");
        fs::create_dir_all(&links).map_err(|e| StoreError::io("create directory", &links, e))?;
        let mut stats = OptimiseStats::default();
        for path in self.query_all_valid_paths()? {
            // Keep the path from being collected while we relink it.
            self.add_temp_root(&path)?;
            let real = self.real_path(&path);
            self.optimise_tree(&real, &links, &mut stats)?;
        }
        Ok(stats)
    }

    fn optimise_tree(
        &self,
        path: &Path,
        links: &Path,
        stats: &mut OptimiseStats,
    ) -> Result<(), StoreError> {
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => return Ok(()),
        };
        if meta.is_dir() {
            let entries = fs::read_dir(path).map_err(|e| StoreError::io("read", path, e))?;
            for entry in entries.flatten() {
                self.optimise_tree(&entry.path(), links, stats)?;
            }
            return Ok(());
        }
        if !meta.is_file() || meta.len() == 0 {
            return Ok(());
        }
        let (hash, _) = fsutil::nar_hash(path, HashAlgo::Sha256)?;
        let link = links.join(hash.to_nixbase32());
        match fs::symlink_metadata(&link) {
            Err(_) => {
                // First copy: it becomes the shared one.
                match fs::hard_link(path, &link) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(StoreError::io("link", &link, e)),
                }
                Ok(())
            }
            Ok(existing) if existing.ino() == meta.ino() => Ok(()),
            Ok(existing) => {
                if existing.len() != meta.len() {
                    return Ok(()); // a damaged link file; leave both alone
                }
                // Swap in a hard link atomically: link to a temporary
                // name in the same directory, then rename over the file.
                let parent = path.parent().expect("store files have a parent");
                let parent_meta =
                    fs::metadata(parent).map_err(|e| StoreError::io("stat", parent, e))?;
                let was_readonly = parent_meta.permissions().mode() & 0o200 == 0;
                if was_readonly {
                    fs::set_permissions(parent, fs::Permissions::from_mode(0o755))
                        .map_err(|e| StoreError::io("make writable", parent, e))?;
                }
                let tmp = parent.join(format!(".tmp-link-{}", std::process::id()));
                let _ = fs::remove_file(&tmp);
                let result = fs::hard_link(&link, &tmp).and_then(|()| fs::rename(&tmp, path));
                if was_readonly {
                    let _ = fs::set_permissions(parent, fs::Permissions::from_mode(0o555));
                    let _ = fsutil::set_canonical_times(parent);
                }
                match result {
                    Ok(()) => {
                        stats.files_linked += 1;
                        stats.bytes_saved += meta.blocks() * 512;
                        Ok(())
                    }
                    // Too many links on this inode: keep the copy.
                    Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                        let _ = fs::remove_file(&tmp);
                        Ok(())
                    }
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        Err(StoreError::io("replace with a hard link", path, e))
                    }
                }
            }
        }
    }
}
