//! The [`Store`] trait: what every store (local, binary cache, daemon
//! client) offers.
//!
//! The trait is synchronous, deliberately. Everything a store does is
//! blocking work — SQLite queries, walking and fsyncing file trees, hashing —
//! and an async trait would only push that onto a reactor or hide a
//! `spawn_blocking` inside every method. Callers on tokio (the daemon, the CI
//! coordinator) wrap a call, or a whole batch of calls, in
//! `tokio::task::spawn_blocking`. A sync trait also stays object-safe
//! (`&dyn Store`, `Box<dyn Store>`), takes plain `Read`/`Write` streams, and
//! makes the local store a cheap `Send + Sync` value.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, Seek, Write};
use std::path::Path;

use kiln_formats::content_address::ContentAddress;
use kiln_formats::hash::{Hash, HashAlgo, Hasher, HashingWriter};
use kiln_formats::nar::{self, Node};
use kiln_formats::store_path::{FileIngestionMethod, StoreDir, StorePath, StorePathSet};

use crate::{PathInfo, StoreError};

/// How a path is added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddOptions {
    /// Replace the contents even if the path is valid already (repair).
    pub repair: bool,
    /// Refuse the path unless it carries a signature by a trusted key
    /// (stores that have no notion of trust ignore this).
    pub check_sigs: bool,
}

/// Writes the NAR of the path `info` describes to the writer: how
/// [`Store::add_nars`] gets the contents of each path it adds. Called from
/// several threads at once.
pub type NarSource<'a> = dyn Fn(&PathInfo, &mut dyn Write) -> Result<(), StoreError> + Sync + 'a;

/// A store of Nix store paths. See the [module documentation](self) for why
/// it is synchronous.
///
/// Methods that a kind of store cannot offer return
/// [`StoreError::Unsupported`]; the behaviour every implementation shares is
/// tested by [`crate::testing::run_behaviour_tests`].
pub trait Store: Send + Sync + fmt::Debug {
    /// The logical store directory its paths live in (`/nix/store`).
    fn store_dir(&self) -> &StoreDir;

    /// The URL this store was opened with, for messages.
    fn url(&self) -> String;

    /// The metadata of `path`, or `None` if it is not valid.
    fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError>;

    /// Whether `path` is valid.
    fn is_valid_path(&self, path: &StorePath) -> Result<bool, StoreError> {
        Ok(self.query_path_info(path)?.is_some())
    }

    /// Which of `paths` are valid (one batch, so stores can answer it in
    /// one query or one round trip).
    fn query_valid_paths(&self, paths: &StorePathSet) -> Result<StorePathSet, StoreError> {
        let mut valid = StorePathSet::new();
        for path in paths {
            if self.is_valid_path(path)? {
                valid.insert(path.clone());
            }
        }
        Ok(valid)
    }

    /// Every valid path.
    fn query_all_valid_paths(&self) -> Result<StorePathSet, StoreError> {
        Err(self.unsupported("listing all valid paths"))
    }

    /// The references of a valid path.
    fn query_references(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        Ok(self.path_info_or_error(path)?.references)
    }

    /// The valid paths that refer to `path`.
    fn query_referrers(&self, _path: &StorePath) -> Result<StorePathSet, StoreError> {
        Err(self.unsupported("querying referrers"))
    }

    /// The valid path whose hash part is `hash_part`, if any.
    fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, StoreError>;

    /// The outputs recorded for a valid derivation (`name → path`).
    fn query_derivation_outputs(
        &self,
        _drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        Err(self.unsupported("querying derivation outputs"))
    }

    /// Adds the path described by `info` from its NAR on `nar`. The NAR's
    /// hash and size must match `info`, or nothing becomes valid. Exactly
    /// the NAR is consumed from `nar` (it may be embedded in a longer
    /// stream), also when the path is valid already.
    fn add_nar(
        &self,
        info: &PathInfo,
        nar: &mut dyn BufRead,
        options: AddOptions,
    ) -> Result<(), StoreError>;

    /// Adds many paths from their NARs, as [`add_nar`](Store::add_nar)
    /// does one: `infos` come in dependency order (every path after the
    /// paths of the batch it refers to), `nars` writes each one's NAR, and
    /// up to `jobs` paths are handled at once (0: the store's choice).
    /// Paths valid already are skipped (unless `options.repair`). Returns
    /// the paths added, references first.
    ///
    /// The default adds them one by one, each once its references are in;
    /// stores that can do better (the local store: one durability barrier
    /// and one transaction per batch) override it.
    fn add_nars(
        &self,
        infos: &[PathInfo],
        nars: &NarSource<'_>,
        options: AddOptions,
        jobs: usize,
    ) -> Result<Vec<StorePath>, StoreError> {
        crate::substitute::add_nars_in_dependency_order(self, infos, nars, options, jobs)
    }

    /// Adds the file or tree at `source` as a fixed-output path named
    /// `name`: `Recursive` hashes its NAR, `Flat` the bytes of a regular
    /// file, with `algo`. Returns the new path's metadata.
    fn add_to_store(
        &self,
        name: &str,
        source: &Path,
        method: FileIngestionMethod,
        algo: HashAlgo,
        options: AddOptions,
    ) -> Result<PathInfo, StoreError> {
        add_to_store_via_nar(self, name, source, method, algo, options)
    }

    /// Adds a text file (a `.drv`, `builtins.toFile`) with the given
    /// references.
    fn add_text(
        &self,
        name: &str,
        contents: &[u8],
        references: &StorePathSet,
    ) -> Result<PathInfo, StoreError> {
        let info = text_path_info(self.store_dir(), name, contents, references)?;
        if !self.is_valid_path(&info.path)? {
            let nar = Node::file(contents.to_vec()).to_nar();
            self.add_nar(&info, &mut &nar[..], AddOptions::default())?;
        }
        self.path_info_or_error(&info.path)
    }

    /// Writes the NAR of a valid path to `out`.
    fn nar_from_path(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), StoreError>;

    /// Protects `path` from the garbage collector for as long as this
    /// store value (or its process) lives. A no-op for stores without GC.
    fn add_temp_root(&self, _path: &StorePath) -> Result<(), StoreError> {
        Ok(())
    }

    /// [`add_temp_root`](Store::add_temp_root) for several paths (one
    /// write for the local store).
    fn add_temp_roots(&self, paths: &[&StorePath]) -> Result<(), StoreError> {
        for path in paths {
            self.add_temp_root(path)?;
        }
        Ok(())
    }

    /// [`query_path_info`](Store::query_path_info), with an invalid path as
    /// an error that names it.
    fn path_info_or_error(&self, path: &StorePath) -> Result<PathInfo, StoreError> {
        self.query_path_info(path)?
            .ok_or_else(|| StoreError::InvalidPath {
                path: self.store_dir().print_path(path),
                store: self.url(),
            })
    }

    /// The error for an operation this store does not offer.
    fn unsupported(&self, operation: &'static str) -> StoreError {
        StoreError::Unsupported {
            store: self.url(),
            operation,
        }
    }
}

/// The metadata of the text path `name` with `contents` and `references`
/// (not yet registered anywhere).
pub fn text_path_info(
    store_dir: &StoreDir,
    name: &str,
    contents: &[u8],
    references: &StorePathSet,
) -> Result<PathInfo, StoreError> {
    let hash = Hash::digest(HashAlgo::Sha256, contents);
    let path = store_dir.make_text_path(name, &hash, references)?;
    let nar = Node::file(contents.to_vec()).to_nar();
    let mut info = PathInfo::new(path, Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64);
    info.references = references.clone();
    info.ca = Some(ContentAddress::Text(hash));
    Ok(info)
}

/// Adds a file tree to any store by serialising it to a temporary NAR first:
/// the generic way for stores that only take NARs (binary caches, remotes).
pub fn add_to_store_via_nar<S: Store + ?Sized>(
    store: &S,
    name: &str,
    source: &Path,
    method: FileIngestionMethod,
    algo: HashAlgo,
    options: AddOptions,
) -> Result<PathInfo, StoreError> {
    let spool = tempfile::tempfile()
        .map_err(|e| StoreError::io("create a temporary file in", std::env::temp_dir(), e))?;
    let writer = HashingWriter::new(HashAlgo::Sha256, io::BufWriter::new(spool));
    let mut ca_hasher = (method == FileIngestionMethod::Recursive && algo != HashAlgo::Sha256)
        .then(|| Hasher::new(algo));
    let writer = nar::dump_path(
        source,
        Tee {
            inner: writer,
            also: ca_hasher.as_mut(),
        },
    )?;
    let (buffered, nar_hash, nar_size) = writer.inner.finish();
    let mut spool = buffered.into_inner().map_err(|e| StoreError::Stream {
        action: "spool the NAR",
        source: e.into_error(),
    })?;
    let ca_hash = match method {
        FileIngestionMethod::Recursive => match ca_hasher {
            Some(h) => h.finish(),
            None => nar_hash,
        },
        FileIngestionMethod::Flat => flat_file_hash(source, algo)?,
    };
    let ca = ContentAddress::Fixed {
        method,
        hash: ca_hash,
    };
    let path = ca.store_path(store.store_dir(), name, &StorePathSet::new(), false)?;
    let mut info = PathInfo::new(path, nar_hash, nar_size);
    info.ca = Some(ca);
    if !options.repair && store.is_valid_path(&info.path)? {
        return store.path_info_or_error(&info.path);
    }
    spool.rewind().map_err(|e| StoreError::Stream {
        action: "rewind the spooled NAR",
        source: e,
    })?;
    store.add_nar(&info, &mut io::BufReader::new(spool), options)?;
    store.path_info_or_error(&info.path)
}

/// The hash of the bytes of the regular file at `source`, for flat
/// ingestion.
pub fn flat_file_hash(source: &Path, algo: HashAlgo) -> Result<Hash, StoreError> {
    let meta = std::fs::symlink_metadata(source).map_err(|e| StoreError::io("stat", source, e))?;
    if !meta.is_file() {
        return Err(StoreError::BadSource {
            path: source.to_path_buf(),
            what: "flat hashing needs a regular file".into(),
        });
    }
    let mut file = std::fs::File::open(source).map_err(|e| StoreError::io("open", source, e))?;
    let mut hasher = Hasher::new(algo);
    io::copy(&mut file, &mut hasher).map_err(|e| StoreError::io("read", source, e))?;
    Ok(hasher.finish())
}

/// A writer that also feeds an optional second hasher.
struct Tee<'a, W> {
    inner: W,
    also: Option<&'a mut Hasher>,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(h) = self.also.as_deref_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
