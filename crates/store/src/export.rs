//! The stream format of `nix-store --export` / `--import`.
//!
//! For each path: the number 1, the path's NAR, the magic `0x4558494e`
//! ("NIXE"), the path, its references (a count, then each), its deriver (or
//! an empty string), and 0 (no signature follows; 1 would be followed by
//! one, which older Nix wrote). The stream ends with 0. Numbers are
//! little-endian u64; strings are a length, the bytes and zero padding to a
//! multiple of 8, as in NARs. Paths go in dependency order so a reader can
//! register each one as it arrives.

use std::io::{self, BufRead, Read, Write};

use kiln_formats::hash::{HashAlgo, HashingWriter};
use kiln_formats::nar::NarReader;
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};

use crate::{AddOptions, PathInfo, Store, StoreError, topo_sort};

/// The magic between a path's NAR and its metadata.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// A path's metadata as an export stream carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedMeta {
    pub path: StorePath,
    pub references: StorePathSet,
    pub deriver: Option<StorePath>,
}

fn bad(what: impl Into<String>) -> StoreError {
    StoreError::BadExport(what.into())
}

fn stream_err(source: io::Error) -> StoreError {
    if source.kind() == io::ErrorKind::UnexpectedEof {
        bad("the stream ends in the middle of a path")
    } else {
        StoreError::Stream {
            action: "read the export stream",
            source,
        }
    }
}

pub(crate) fn read_u64(input: &mut dyn BufRead) -> Result<u64, StoreError> {
    let mut b = [0u8; 8];
    input.read_exact(&mut b).map_err(stream_err)?;
    Ok(u64::from_le_bytes(b))
}

pub(crate) fn read_string(input: &mut dyn BufRead, max: usize) -> Result<String, StoreError> {
    let len = read_u64(input)?;
    if len > max as u64 {
        return Err(bad(format!(
            "a string of {len} bytes where at most {max} are expected"
        )));
    }
    let padded = (len as usize).div_ceil(8) * 8;
    let mut buf = vec![0u8; padded];
    input.read_exact(&mut buf).map_err(stream_err)?;
    if buf[len as usize..].iter().any(|b| *b != 0) {
        return Err(bad("non-zero padding after a string"));
    }
    buf.truncate(len as usize);
    String::from_utf8(buf).map_err(|_| bad("a string that is not UTF-8"))
}

fn write_u64(out: &mut dyn Write, n: u64) -> io::Result<()> {
    out.write_all(&n.to_le_bytes())
}

fn write_string(out: &mut dyn Write, s: &str) -> io::Result<()> {
    write_u64(out, s.len() as u64)?;
    out.write_all(s.as_bytes())?;
    out.write_all(&[0u8; 8][..(8 - s.len() % 8) % 8])
}

/// Reads the metadata that follows a path's NAR (after the magic).
pub(crate) fn read_meta(
    store_dir: &StoreDir,
    input: &mut dyn BufRead,
) -> Result<ExportedMeta, StoreError> {
    let magic = read_u64(input)?;
    if magic != EXPORT_MAGIC {
        return Err(bad(format!(
            "expected the magic {EXPORT_MAGIC:#x} after a NAR, found {magic:#x}"
        )));
    }
    let parse = |s: &str| {
        store_dir
            .parse_path(s)
            .map_err(|e| bad(format!("bad store path '{s}': {e}")))
    };
    let path = parse(&read_string(input, 4096)?)?;
    let count = read_u64(input)?;
    if count > 1 << 20 {
        return Err(bad(format!("{count} references is not plausible")));
    }
    let mut references = StorePathSet::new();
    for _ in 0..count {
        references.insert(parse(&read_string(input, 4096)?)?);
    }
    let deriver = read_string(input, 4096)?;
    let deriver = if deriver.is_empty() {
        None
    } else {
        Some(parse(&deriver)?)
    };
    match read_u64(input)? {
        0 => {}
        1 => {
            // A signature of a format no Nix since 2.0 writes; skip it.
            read_string(input, 1 << 16)?;
        }
        n => return Err(bad(format!("expected 0 or 1 after the deriver, found {n}"))),
    }
    Ok(ExportedMeta {
        path,
        references,
        deriver,
    })
}

/// Whether another path follows (1) or the stream has ended (0).
pub(crate) fn read_more(input: &mut dyn BufRead) -> Result<bool, StoreError> {
    match read_u64(input)? {
        0 => Ok(false),
        1 => Ok(true),
        n => Err(bad(format!(
            "expected 1 (a path follows) or 0 (end), found {n}: this does not look like the output of 'nix-store --export'"
        ))),
    }
}

/// Writes the closure-ordered export of `paths` (which should be closed
/// under references for the import to succeed elsewhere). Each NAR is
/// checked against its registered hash on the way out.
pub fn export_paths(
    store: &dyn Store,
    paths: &StorePathSet,
    out: &mut dyn Write,
) -> Result<(), StoreError> {
    let w = |e| StoreError::Stream {
        action: "write the export stream",
        source: e,
    };
    for path in topo_sort(store, paths)? {
        let info = store.path_info_or_error(&path)?;
        write_u64(out, 1).map_err(w)?;
        let mut hashing = HashingWriter::new(HashAlgo::Sha256, &mut *out);
        store.nar_from_path(&path, &mut hashing)?;
        let (_, hash, size) = hashing.finish();
        if hash != info.nar_hash {
            return Err(StoreError::NarHashMismatch {
                path: store.store_dir().print_path(&path),
                expected: info.nar_hash,
                actual: hash,
            });
        }
        if info.nar_size != 0 && size != info.nar_size {
            return Err(StoreError::NarSizeMismatch {
                path: store.store_dir().print_path(&path),
                expected: info.nar_size,
                actual: size,
            });
        }
        write_u64(out, EXPORT_MAGIC).map_err(w)?;
        let dir = store.store_dir();
        write_string(out, &dir.print_path(&path)).map_err(w)?;
        write_u64(out, info.references.len() as u64).map_err(w)?;
        for r in &info.references {
            write_string(out, &dir.print_path(r)).map_err(w)?;
        }
        write_string(
            out,
            &info
                .deriver
                .as_ref()
                .map(|d| dir.print_path(d))
                .unwrap_or_default(),
        )
        .map_err(w)?;
        write_u64(out, 0).map_err(w)?;
    }
    write_u64(out, 0).map_err(w)?;
    out.flush().map_err(w)
}

/// Copies what is consumed from `inner` into `copy`; refuses to read on
/// once `limit` bytes are copied.
pub(crate) struct CopyConsumed<'a> {
    pub inner: &'a mut dyn BufRead,
    pub copy: &'a mut dyn Write,
    pub error: Option<io::Error>,
    pub limit: u64,
    pub copied: u64,
}

impl<'a> CopyConsumed<'a> {
    pub fn new(inner: &'a mut dyn BufRead, copy: &'a mut dyn Write) -> Self {
        CopyConsumed {
            inner,
            copy,
            error: None,
            limit: u64::MAX,
            copied: 0,
        }
    }
}

impl Read for CopyConsumed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        kiln_formats::bufread::read_via_buffer(self, buf)
    }
}

impl BufRead for CopyConsumed<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.copied >= self.limit {
            return Err(io::Error::other("past the limit of what is copied"));
        }
        self.inner.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        if n > 0 && self.error.is_none() {
            // The bytes fill_buf just gave: asking again reads nothing.
            if let Ok(buf) = self.inner.fill_buf() {
                let consumed = &buf[..n.min(buf.len())];
                self.copied += consumed.len() as u64;
                if let Err(e) = self.copy.write_all(consumed) {
                    self.error = Some(e);
                }
            }
        }
        self.inner.consume(n);
    }
}

/// Reads past one NAR, checking its grammar; `label` names it in errors.
pub(crate) fn skip_nar(input: &mut dyn BufRead, label: &str) -> Result<(), StoreError> {
    let mut reader = NarReader::embedded(input);
    while reader
        .next()
        .map_err(|source| StoreError::BadNar {
            path: label.into(),
            source,
        })?
        .is_some()
    {}
    Ok(())
}

/// Imports an export stream into any store, spooling each NAR to a
/// temporary file until its metadata arrives. Returns the paths in stream
/// order. (The local store has a faster, batched
/// [`import_paths`](crate::local::LocalStore::import_paths).)
pub fn import_paths(
    store: &dyn Store,
    input: &mut dyn BufRead,
) -> Result<Vec<StorePath>, StoreError> {
    let mut imported = Vec::new();
    while read_more(input)? {
        let spool = tempfile::tempfile()
            .map_err(|e| StoreError::io("create a temporary file in", std::env::temp_dir(), e))?;
        let mut hashing = HashingWriter::new(HashAlgo::Sha256, io::BufWriter::new(spool));
        {
            let mut tee = CopyConsumed::new(&mut *input, &mut hashing);
            skip_nar(&mut tee, "(export stream)")?;
            if let Some(e) = tee.error {
                return Err(StoreError::Stream {
                    action: "spool a NAR",
                    source: e,
                });
            }
        }
        let (buffered, nar_hash, nar_size) = hashing.finish();
        let mut spool = buffered.into_inner().map_err(|e| StoreError::Stream {
            action: "spool a NAR",
            source: e.into_error(),
        })?;
        let meta = read_meta(store.store_dir(), input)?;
        let mut info = PathInfo::new(meta.path.clone(), nar_hash, nar_size);
        info.references = meta.references;
        info.deriver = meta.deriver;
        use std::io::Seek;
        spool.rewind().map_err(|e| StoreError::Stream {
            action: "rewind a spooled NAR",
            source: e,
        })?;
        store.add_nar(&info, &mut io::BufReader::new(spool), AddOptions::default())?;
        imported.push(meta.path);
    }
    Ok(imported)
}
