//! Binary caches as stores: [`BinaryCacheStore`] reads and writes a cache
//! in a directory (`file://DIR`) or on an HTTP server (`http(s)://…`) in
//! Nix's layout:
//!
//! - `nix-cache-info`: `StoreDir`, `WantMassQuery`, `Priority`;
//! - `<hash part>.narinfo`: a path's metadata and signatures ([`NarInfo`]);
//! - `nar/<file hash>.nar[.xz|.zst|.bz2]`: its NAR, compressed;
//! - `log/<drv base name>`: build logs.
//!
//! Writing does what `nix copy --to file://…` does: the NAR is checked
//! (hash, size, well-formed) while it is compressed to a temporary file,
//! published under its file hash, and only then is the narinfo written,
//! signed when a secret key is configured — so a reader never sees a
//! narinfo whose NAR is missing.
//!
//! Reading hands out the paths' signatures; whether they are good enough
//! is the copier's decision ([`check_signatures`], used by
//! [`crate::substitute`]), because the same cache may be trusted by one
//! store and not by another.
//!
//! ```no_run
//! use kiln_store::binary_cache::{BinaryCacheConfig, BinaryCacheStore};
//! use kiln_store::Store;
//!
//! let cache = BinaryCacheStore::open("file:///tmp/cache?compression=zstd", BinaryCacheConfig::default())?;
//! let info = cache.add_text("hello.txt", b"hello\n", &Default::default())?;
//! assert!(cache.is_valid_path(&info.path)?);
//! # Ok::<(), kiln_store::StoreError>(())
//! ```

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::path::Path;
use std::sync::Mutex;

use kiln_formats::hash::{HashAlgo, HashFormat, Hasher, HashingWriter};
use kiln_formats::nar::{Event, NarReader};
use kiln_formats::narinfo::{CacheInfo, NarInfo, NarInfoError};
use kiln_formats::signature::{SecretKey, Signature, SignatureError, TrustedKeys};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};

use crate::url::{StoreKind, StoreUrl};
use crate::{AddOptions, PathInfo, Store, StoreError};

mod backend;
pub mod compression;
pub(crate) mod pipe;
pub mod serve;

use backend::{Backend, FileBackend, HttpBackend};
pub use compression::Compression;

/// What went wrong with a binary cache; every variant names the cache and
/// the file or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum BinaryCacheError {
    #[error("binary cache '{cache}': cannot read '{file}': {source}")]
    Read {
        cache: String,
        file: String,
        source: io::Error,
    },
    #[error("binary cache '{cache}': cannot write '{file}': {source}")]
    Write {
        cache: String,
        file: String,
        source: io::Error,
    },
    #[error("binary cache '{cache}': cannot fetch '{url}': {message}")]
    Transport {
        cache: String,
        url: String,
        message: String,
    },
    #[error("binary cache '{cache}': '{url}' answered HTTP {status}")]
    HttpStatus {
        cache: String,
        url: String,
        status: u16,
    },
    #[error("'{0}' does not appear to be a binary cache (it has no nix-cache-info)")]
    NotACache(String),
    #[error("binary cache '{cache}': bad nix-cache-info: {source}")]
    BadCacheInfo { cache: String, source: NarInfoError },
    #[error("binary cache '{cache}': malformed narinfo '{file}': {source}")]
    BadNarInfo {
        cache: String,
        file: String,
        source: NarInfoError,
    },
    #[error("binary cache '{cache}': narinfo '{file}' describes '{found}' instead")]
    WrongNarInfo {
        cache: String,
        file: String,
        found: String,
    },
    #[error(
        "binary cache '{cache}': the NAR of '{path}' ('{file}') is missing although its narinfo exists"
    )]
    MissingNar {
        cache: String,
        path: String,
        file: String,
    },
    #[error("binary cache '{cache}': cannot download '{file}' (the NAR of '{path}'): {message}")]
    Download {
        cache: String,
        path: String,
        file: String,
        message: String,
    },
    #[error(
        "binary cache '{cache}': '{path}' has compression '{compression}', which Kiln cannot read (it reads none, xz, zstd and bzip2)"
    )]
    UnreadableCompression {
        cache: String,
        path: String,
        compression: String,
    },
    #[error("binary cache '{cache}': {source}")]
    BadParam {
        cache: String,
        source: compression::UnknownCompression,
    },
    #[error("cannot read secret key file '{file}': {source}")]
    KeyFile { file: String, source: io::Error },
    #[error("secret key file '{file}': {source}")]
    BadKey {
        file: String,
        source: SignatureError,
    },
    #[error("binary cache '{cache}': cannot sign '{path}': {source}")]
    Sign {
        cache: String,
        path: String,
        source: SignatureError,
    },
    #[error(
        "path '{path}' from '{cache}' is not signed by any trusted key (its signatures: {signers}; trusted keys: {trusted}); \
         add the cache's public key to the trusted public keys, or turn signature checking off"
    )]
    Untrusted {
        path: String,
        cache: String,
        signers: String,
        trusted: String,
    },
    #[error("'{0}' is not a binary cache URL (expected file://DIR or http(s)://…)")]
    NotCacheUrl(String),
}

/// How a cache is written to.
#[derive(Debug, Clone, Default)]
pub struct BinaryCacheConfig {
    /// Compression of new NARs; `None` takes the URL's `compression=`
    /// parameter, else xz (Nix's default).
    pub compression: Option<Compression>,
    /// Compression level; `None` takes `compression-level=`, else the
    /// compression's default.
    pub compression_level: Option<u32>,
    /// Signs new narinfos; `None` takes the key file named by `secret-key=`.
    pub secret_key: Option<SecretKey>,
}

/// A binary cache as a [`Store`]; see the [module documentation](self).
#[derive(Debug)]
pub struct BinaryCacheStore {
    url: String,
    store_dir: StoreDir,
    backend: Box<dyn Backend>,
    compression: Compression,
    compression_level: Option<u32>,
    secret_key: Option<SecretKey>,
    cache_info: CacheInfo,
    /// Narinfos looked up so far (`None`: not in the cache), by hash part:
    /// closures and copies ask for the same paths many times.
    narinfos: Mutex<HashMap<String, Option<NarInfo>>>,
}

impl From<BinaryCacheError> for StoreError {
    fn from(e: BinaryCacheError) -> StoreError {
        StoreError::BinaryCache(Box::new(e))
    }
}

/// Reads a secret key file as `nix-store --generate-binary-cache-key` writes
/// it.
pub fn read_secret_key(file: &Path) -> Result<SecretKey, BinaryCacheError> {
    let text = std::fs::read_to_string(file).map_err(|source| BinaryCacheError::KeyFile {
        file: file.display().to_string(),
        source,
    })?;
    text.trim()
        .parse()
        .map_err(|source| BinaryCacheError::BadKey {
            file: file.display().to_string(),
            source,
        })
}

impl BinaryCacheStore {
    /// Opens the cache at `url` (`file://DIR` or `http(s)://…`, with Nix's
    /// `compression=`, `compression-level=` and `secret-key=` parameters).
    /// A `file://` cache is created on first use; an HTTP one must exist.
    pub fn open(url: &str, config: BinaryCacheConfig) -> Result<BinaryCacheStore, StoreError> {
        let parsed: StoreUrl = url.parse()?;
        Self::open_parsed(&parsed, config)
    }

    /// [`open`](Self::open) with a parsed URL.
    pub fn open_parsed(
        parsed: &StoreUrl,
        config: BinaryCacheConfig,
    ) -> Result<BinaryCacheStore, StoreError> {
        let url = parsed.to_string();
        let store_dir = match parsed.params.get("store") {
            Some(dir) => StoreDir::new(dir.clone())?,
            None => StoreDir::default(),
        };
        let backend: Box<dyn Backend> = match &parsed.kind {
            StoreKind::File(dir) => Box::new(FileBackend::open(
                format!("file://{}", dir.display()),
                dir.clone(),
            )?),
            StoreKind::Http(base) => Box::new(HttpBackend::new(base.clone())),
            _ => return Err(BinaryCacheError::NotCacheUrl(url).into()),
        };
        let bad_param = |source| BinaryCacheError::BadParam {
            cache: url.clone(),
            source,
        };
        let compression = match (config.compression, parsed.params.get("compression")) {
            (Some(c), _) => c,
            (None, Some(name)) => name.parse().map_err(bad_param)?,
            (None, None) => Compression::default(),
        };
        let compression_level = config.compression_level.or_else(|| {
            parsed
                .params
                .get("compression-level")
                .and_then(|l| l.parse().ok())
        });
        let secret_key = match (config.secret_key, parsed.params.get("secret-key")) {
            (Some(k), _) => Some(k),
            (None, Some(file)) if !file.is_empty() => Some(read_secret_key(Path::new(file))?),
            _ => None,
        };
        let cache_info = match read_all(&*backend, "nix-cache-info")? {
            Some(text) => {
                let text = String::from_utf8_lossy(&text);
                let info =
                    CacheInfo::parse(&text).map_err(|source| BinaryCacheError::BadCacheInfo {
                        cache: url.clone(),
                        source,
                    })?;
                info.check_store_dir(&store_dir).map_err(|source| {
                    BinaryCacheError::BadCacheInfo {
                        cache: url.clone(),
                        source,
                    }
                })?;
                info
            }
            None if matches!(parsed.kind, StoreKind::File(_)) => {
                // As Nix does on first use of a directory.
                let info = CacheInfo::for_store(&store_dir);
                backend.put(
                    "nix-cache-info",
                    info.to_text().as_bytes(),
                    "text/x-nix-cache-info",
                )?;
                info
            }
            None => return Err(BinaryCacheError::NotACache(url).into()),
        };
        Ok(BinaryCacheStore {
            url,
            store_dir,
            backend,
            compression,
            compression_level,
            secret_key,
            cache_info,
            narinfos: Mutex::new(HashMap::new()),
        })
    }

    /// The cache's `nix-cache-info`.
    pub fn cache_info(&self) -> &CacheInfo {
        &self.cache_info
    }

    /// The compression new NARs get.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    fn narinfo_file(hash_part: &str) -> String {
        format!("{hash_part}.narinfo")
    }

    /// The narinfo of the path with this hash part, if the cache has it.
    pub fn query_narinfo_by_hash(&self, hash_part: &str) -> Result<Option<NarInfo>, StoreError> {
        if let Some(cached) = self.cache().get(hash_part) {
            return Ok(cached.clone());
        }
        let file = Self::narinfo_file(hash_part);
        let narinfo = match read_all(&*self.backend, &file)? {
            None => None,
            Some(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let info = NarInfo::parse(&self.store_dir, &text).map_err(|source| {
                    BinaryCacheError::BadNarInfo {
                        cache: self.url.clone(),
                        file: file.clone(),
                        source,
                    }
                })?;
                if info.store_path.hash_part() != hash_part {
                    return Err(BinaryCacheError::WrongNarInfo {
                        cache: self.url.clone(),
                        file,
                        found: self.store_dir.print_path(&info.store_path),
                    }
                    .into());
                }
                Some(info)
            }
        };
        self.cache().insert(hash_part.to_owned(), narinfo.clone());
        Ok(narinfo)
    }

    /// The narinfo of `path`, if the cache has it.
    pub fn query_narinfo(&self, path: &StorePath) -> Result<Option<NarInfo>, StoreError> {
        Ok(self
            .query_narinfo_by_hash(path.hash_part())?
            .filter(|n| n.store_path == *path))
    }

    fn narinfo_or_error(&self, path: &StorePath) -> Result<NarInfo, StoreError> {
        self.query_narinfo(path)?
            .ok_or_else(|| StoreError::InvalidPath {
                path: self.store_dir.print_path(path),
                store: self.url.clone(),
            })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<NarInfo>>> {
        self.narinfos
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The uncompressed NAR `narinfo` describes, as a stream. Errors
    /// (including a download cut short) name the cache and the file; the
    /// NAR's hash is for the reader to check.
    pub fn open_nar(&self, narinfo: &NarInfo) -> Result<Box<dyn BufRead + Send>, StoreError> {
        let decoded = self.open_nar_unlabelled(narinfo)?;
        let labelled = Labelled {
            inner: decoded,
            label: format!("{} in binary cache '{}'", narinfo.url, self.url),
        };
        Ok(Box::new(io::BufReader::with_capacity(256 << 10, labelled)))
    }

    fn open_nar_unlabelled(&self, narinfo: &NarInfo) -> Result<Box<dyn Read + Send>, StoreError> {
        let path = self.store_dir.print_path(&narinfo.store_path);
        let compression: Compression =
            narinfo
                .compression
                .parse()
                .map_err(|_| BinaryCacheError::UnreadableCompression {
                    cache: self.url.clone(),
                    path: path.clone(),
                    compression: narinfo.compression.clone(),
                })?;
        let raw = self
            .backend
            .get(&narinfo.url)?
            .ok_or_else(|| BinaryCacheError::MissingNar {
                cache: self.url.clone(),
                path,
                file: narinfo.url.clone(),
            })?;
        Ok(compression
            .decoder(raw)
            .map_err(|e| self.backend.read_error(&narinfo.url, e))?)
    }

    /// A build log stored under `log/<drv base name>`.
    pub fn get_build_log(&self, drv: &StorePath) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(read_all(
            &*self.backend,
            &format!("log/{}", drv.base_name()),
        )?)
    }

    /// Stores a build log under `log/<drv base name>`.
    pub fn add_build_log(&self, drv: &StorePath, log: &[u8]) -> Result<(), StoreError> {
        Ok(self.backend.put(
            &format!("log/{}", drv.base_name()),
            log,
            "text/plain; charset=utf-8",
        )?)
    }

    /// Checks, compresses and publishes the NAR of `info` read from `nar`;
    /// the narinfo to publish once the paths it refers to are in.
    fn upload_nar(&self, info: &PathInfo, nar: &mut dyn BufRead) -> Result<NarInfo, StoreError> {
        let label = self.store_dir.print_path(&info.path);
        let spool = self.backend.spool()?;
        let file = io::BufWriter::with_capacity(256 << 10, spool);
        let hashing = HashingWriter::new(HashAlgo::Sha256, file);
        let mut encoder = self
            .compression
            .encoder_for_size(
                hashing,
                self.compression_level,
                (info.nar_size != 0).then_some(info.nar_size),
            )
            .map_err(|e| self.backend.write_error("a NAR spool", e))?;
        let (nar_hash, nar_size) = self.pump_nar(&label, nar, &mut encoder)?;
        info.check_nar(&self.store_dir, nar_hash, nar_size)?;
        let hashing = encoder
            .finish()
            .map_err(|e| self.backend.write_error("a NAR spool", e))?;
        let (file, file_hash, file_size) = hashing.finish();
        let spool = file
            .into_inner()
            .map_err(|e| self.backend.write_error("a NAR spool", e.into_error()))?;
        let nar_file = format!(
            "nar/{}.nar{}",
            file_hash.to_nixbase32(),
            self.compression.extension()
        );
        // Named by its hash: an existing file has these very bytes.
        if !self.backend.exists(&nar_file)? {
            self.backend
                .put_spooled(&nar_file, spool, "application/x-nix-nar")?;
        }

        let mut narinfo = NarInfo {
            store_path: info.path.clone(),
            url: nar_file,
            compression: self.compression.to_string(),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash: info.nar_hash,
            nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            signatures: info.sigs.iter().filter_map(|s| s.parse().ok()).collect(),
            ca: info.ca.clone(),
        };
        if let Some(key) = &self.secret_key {
            narinfo
                .sign(&self.store_dir, key)
                .map_err(|source| BinaryCacheError::Sign {
                    cache: self.url.clone(),
                    path: label.clone(),
                    source,
                })?;
        }
        Ok(narinfo)
    }

    /// Writes a narinfo (the NAR it names is in already): the path
    /// becomes visible.
    fn publish_narinfo(&self, narinfo: NarInfo) -> Result<(), StoreError> {
        let hash_part = narinfo.store_path.hash_part().to_owned();
        self.backend.put(
            &Self::narinfo_file(&hash_part),
            narinfo.to_text(&self.store_dir).as_bytes(),
            "text/x-nix-narinfo",
        )?;
        self.cache().insert(hash_part, Some(narinfo));
        Ok(())
    }

    /// Consumes exactly one NAR from `input`, checking that it is
    /// well-formed, while every byte consumed goes to `sink`; the NAR's
    /// sha256 and size.
    fn pump_nar(
        &self,
        label: &str,
        input: &mut dyn BufRead,
        sink: &mut dyn Write,
    ) -> Result<(kiln_formats::hash::Hash, u64), StoreError> {
        let mut tee = TeeReader {
            inner: input,
            sink,
            hasher: Hasher::new(HashAlgo::Sha256),
            len: 0,
            error: None,
        };
        let result = drain_nar(&mut tee, label);
        if let Some(e) = tee.error.take() {
            return Err(self.backend.write_error("a NAR spool", e).into());
        }
        result?;
        Ok((tee.hasher.finish(), tee.len))
    }
}

/// Reads a whole (small) file, or `None` if it does not exist.
fn read_all(backend: &dyn Backend, file: &str) -> Result<Option<Vec<u8>>, BinaryCacheError> {
    match backend.get(file)? {
        None => Ok(None),
        Some(mut r) => {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf)
                .map_err(|e| backend.read_error(file, e))?;
            Ok(Some(buf))
        }
    }
}

/// Reads a NAR to its end, checking its structure.
fn drain_nar(input: &mut dyn BufRead, label: &str) -> Result<(), StoreError> {
    let bad = |source| StoreError::BadNar {
        path: label.to_owned(),
        source,
    };
    let mut reader = NarReader::embedded(input);
    while let Some(event) = reader.next().map_err(bad)? {
        if let Event::Regular { mut contents, .. } = event {
            contents.copy_to(&mut io::sink()).map_err(|e| {
                match kiln_formats::nar::ReadError::from_io(e) {
                    Ok(source) => bad(source),
                    Err(e) => StoreError::Stream {
                        action: "read the NAR",
                        source: e,
                    },
                }
            })?;
        }
    }
    Ok(())
}

/// A reader that adds which file of which cache failed to its errors.
struct Labelled<R> {
    inner: R,
    label: String,
}

impl<R: Read> Read for Labelled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            let kind = match e.kind() {
                // Decoders report a cut stream in several ways; it is
                // the same to the reader: the file ended early.
                io::ErrorKind::UnexpectedEof => io::ErrorKind::UnexpectedEof,
                k => k,
            };
            io::Error::new(kind, format!("{}: {e}", self.label))
        })
    }
}

/// Everything consumed from `inner` is hashed, counted and copied to
/// `sink`, so the copy is exactly the NAR even when it is embedded in a
/// longer stream.
struct TeeReader<'a> {
    inner: &'a mut dyn BufRead,
    sink: &'a mut dyn Write,
    hasher: Hasher,
    len: u64,
    /// The sink's first error; reading stops once there is one.
    error: Option<io::Error>,
}

impl Read for TeeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        kiln_formats::bufread::read_via_buffer(self, buf)
    }
}

impl BufRead for TeeReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.error.is_some() {
            return Err(io::Error::other("the NAR could not be spooled"));
        }
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        // Buffered already: this does not read.
        if let Ok(buf) = self.inner.fill_buf() {
            let data = &buf[..n.min(buf.len())];
            self.hasher.update(data);
            if self.error.is_none() {
                if let Err(e) = self.sink.write_all(data) {
                    self.error = Some(e);
                }
            }
        }
        self.len += n as u64;
        self.inner.consume(n);
    }
}

/// The metadata of a narinfo, as a store sees it.
pub fn narinfo_to_path_info(narinfo: &NarInfo) -> PathInfo {
    let mut info = PathInfo::new(
        narinfo.store_path.clone(),
        narinfo.nar_hash,
        narinfo.nar_size,
    );
    info.references = narinfo.references.clone();
    info.deriver = narinfo.deriver.clone();
    info.sigs = narinfo.signatures.iter().map(ToString::to_string).collect();
    info.ca = narinfo.ca.clone();
    info
}

/// Checks that `info` (from `cache`) may be trusted: signed by one of
/// `trusted`, or content-addressed (its contents give its name, which the
/// store checks when it adds the path), as Nix accepts.
pub fn check_signatures(
    store_dir: &StoreDir,
    info: &PathInfo,
    trusted: &TrustedKeys,
    cache: &str,
) -> Result<(), BinaryCacheError> {
    if let Some(ca) = &info.ca {
        let has_self = info.references.contains(&info.path);
        let others: StorePathSet = info.references_without_self().cloned().collect();
        if ca
            .store_path(store_dir, info.path.name(), &others, has_self)
            .as_ref()
            == Ok(&info.path)
        {
            return Ok(());
        }
    }
    let fingerprint = info.fingerprint(store_dir);
    let sigs: Vec<Signature> = info.sigs.iter().filter_map(|s| s.parse().ok()).collect();
    if trusted.count_valid(fingerprint.as_bytes(), &sigs) > 0 {
        return Ok(());
    }
    Err(BinaryCacheError::Untrusted {
        path: store_dir.print_path(&info.path),
        cache: cache.to_owned(),
        signers: if info.sigs.is_empty() {
            "none".to_owned()
        } else {
            info.sigs
                .iter()
                .map(|s| {
                    let name = s.split(':').next().unwrap_or(s);
                    match s.parse::<Signature>() {
                        Ok(sig) if trusted.get(name).is_some() => {
                            if trusted.verify(fingerprint.as_bytes(), &sig).is_ok() {
                                name.to_owned()
                            } else {
                                format!("{name} (invalid)")
                            }
                        }
                        _ => name.to_owned(),
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
        trusted: if trusted.is_empty() {
            "none".to_owned()
        } else {
            trusted
                .iter()
                .map(|k| k.name().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

impl Store for BinaryCacheStore {
    fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        Ok(self.query_narinfo(path)?.as_ref().map(narinfo_to_path_info))
    }

    fn is_valid_path(&self, path: &StorePath) -> Result<bool, StoreError> {
        if let Some(cached) = self.cache().get(path.hash_part()) {
            return Ok(cached.as_ref().is_some_and(|n| n.store_path == *path));
        }
        // Existence is enough and cheaper than fetching (a HEAD over HTTP).
        Ok(self.backend.exists(&Self::narinfo_file(path.hash_part()))?)
    }

    fn query_valid_paths(&self, paths: &StorePathSet) -> Result<StorePathSet, StoreError> {
        if !self.url.starts_with("http") {
            let mut valid = StorePathSet::new();
            for p in paths {
                if self.is_valid_path(p)? {
                    valid.insert(p.clone());
                }
            }
            return Ok(valid);
        }
        let paths: Vec<&StorePath> = paths.iter().collect();
        // Over HTTP each answer is a round trip: ask several at once.
        let workers = 16;
        let chunk = paths.len().div_ceil(workers).max(1);
        let results: Vec<Result<Vec<StorePath>, StoreError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = paths
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        let mut valid = Vec::new();
                        for p in part {
                            if self.is_valid_path(p)? {
                                valid.push((*p).clone());
                            }
                        }
                        Ok(valid)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("validity query thread panicked"))
                .collect()
        });
        let mut valid = StorePathSet::new();
        for r in results {
            valid.extend(r?);
        }
        Ok(valid)
    }

    fn query_all_valid_paths(&self) -> Result<StorePathSet, StoreError> {
        let Some(files) = self.backend.list_narinfos()? else {
            return Err(self.unsupported("listing all valid paths"));
        };
        let mut all = StorePathSet::new();
        for file in files {
            let hash = file.trim_end_matches(".narinfo");
            if let Some(info) = self.query_narinfo_by_hash(hash)? {
                all.insert(info.store_path);
            }
        }
        Ok(all)
    }

    fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, StoreError> {
        Ok(self.query_narinfo_by_hash(hash_part)?.map(|n| n.store_path))
    }

    fn add_nar(
        &self,
        info: &PathInfo,
        nar: &mut dyn BufRead,
        options: AddOptions,
    ) -> Result<(), StoreError> {
        let label = self.store_dir.print_path(&info.path);
        if !options.repair && self.is_valid_path(&info.path)? {
            drain_nar(nar, &label)?;
            return Ok(());
        }
        let others: StorePathSet = info.references_without_self().cloned().collect();
        let present = self.query_valid_paths(&others)?;
        if let Some(missing) = others.difference(&present).next() {
            // Nix does not check this, but a cache with dangling references
            // cannot be substituted from.
            return Err(StoreError::MissingReference {
                path: label,
                reference: self.store_dir.print_path(missing),
            });
        }
        let narinfo = self.upload_nar(info, nar)?;
        self.publish_narinfo(narinfo)
    }

    /// NARs are compressed and uploaded on several threads at once; the
    /// narinfos, which make the paths visible, follow in dependency order
    /// once all NARs are in, so no reader sees a path before the paths it
    /// refers to.
    fn add_nars(
        &self,
        infos: &[PathInfo],
        nars: &crate::NarSource<'_>,
        options: AddOptions,
        jobs: usize,
    ) -> Result<Vec<StorePath>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut todo = Vec::with_capacity(infos.len());
        for info in infos {
            if seen.insert(&info.path) && (options.repair || !self.is_valid_path(&info.path)?) {
                todo.push(info);
            }
        }
        let batch: std::collections::HashSet<&StorePath> = todo.iter().map(|i| &i.path).collect();
        for info in &todo {
            let others: StorePathSet = info
                .references_without_self()
                .filter(|r| !batch.contains(r))
                .cloned()
                .collect();
            let present = self.query_valid_paths(&others)?;
            if let Some(missing) = others.difference(&present).next() {
                return Err(StoreError::MissingReference {
                    path: self.store_dir.print_path(&info.path),
                    reference: self.store_dir.print_path(missing),
                });
            }
        }
        // Compressing is computing, but publishing files waits on the file
        // system: more workers than cores.
        let workers = match jobs {
            0 => crate::local::par::IO_WORKERS,
            n => n,
        };
        let uploaded = crate::local::par::map_on(workers, todo, |info| {
            crate::substitute::with_nar(info, nars, |nar| self.upload_nar(info, nar))
        });
        let mut narinfos = Vec::with_capacity(uploaded.len());
        for u in uploaded {
            narinfos.push(u?);
        }
        let mut added = Vec::with_capacity(narinfos.len());
        for narinfo in narinfos {
            added.push(narinfo.store_path.clone());
            self.publish_narinfo(narinfo)?;
        }
        Ok(added)
    }

    fn nar_from_path(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), StoreError> {
        let narinfo = self.narinfo_or_error(path)?;
        let mut nar = self.open_nar_unlabelled(&narinfo)?;
        let mut hashing = HashingWriter::new(HashAlgo::Sha256, out);
        let label = self.store_dir.print_path(path);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match nar.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(BinaryCacheError::Download {
                        cache: self.url.clone(),
                        path: label,
                        file: narinfo.url.clone(),
                        message: e.to_string(),
                    }
                    .into());
                }
            };
            hashing
                .write_all(&buf[..n])
                .map_err(|source| StoreError::Stream {
                    action: "pass on the NAR read from the binary cache",
                    source,
                })?;
        }
        let (_, hash, size) = hashing.finish();
        if size < narinfo.nar_size {
            // A cut file (an uncompressed one ends without complaint).
            return Err(BinaryCacheError::Download {
                cache: self.url.clone(),
                path: label,
                file: narinfo.url.clone(),
                message: format!(
                    "truncated: it holds {size} of the {} bytes of the NAR",
                    narinfo.nar_size
                ),
            }
            .into());
        }
        if size != narinfo.nar_size {
            return Err(StoreError::NarSizeMismatch {
                path: label,
                expected: narinfo.nar_size,
                actual: size,
            });
        }
        if hash != narinfo.nar_hash {
            return Err(StoreError::NarHashMismatch {
                path: label,
                expected: narinfo.nar_hash,
                actual: hash,
            });
        }
        Ok(())
    }
}

/// The narinfo URL of a NAR served uncompressed, named after its hash
/// (used by the server).
pub(crate) fn plain_nar_file(info: &PathInfo) -> String {
    format!(
        "nar/{}-{}.nar",
        info.path.hash_part(),
        info.nar_hash.encode(HashFormat::Nixbase32)
    )
}

#[cfg(test)]
mod tests;
