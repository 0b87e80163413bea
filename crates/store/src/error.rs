//! The one error type of the [`Store`](crate::Store) trait: every store
//! implementation maps its failures onto these variants, so callers can match
//! on what went wrong whichever store they talk to.

use std::io;
use std::path::PathBuf;

use kiln_formats::content_address::ContentAddressError;
use kiln_formats::hash::{Hash, HashError};
use kiln_formats::nar;
use kiln_formats::store_path::StorePathError;

/// What went wrong in a store operation; each variant names the path or file
/// concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The path is not valid (not registered) in this store.
    #[error("path '{path}' is not valid in store '{store}'")]
    InvalidPath { path: String, store: String },
    /// A string was not a store path of this store.
    #[error(transparent)]
    BadPath(#[from] StorePathError),
    /// A file-system operation on a path failed.
    #[error("cannot {action} '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Reading an input stream (NAR, export) or writing an output failed.
    #[error("cannot {action}: {source}")]
    Stream {
        action: &'static str,
        source: io::Error,
    },
    /// The validity database could not be read or written.
    #[error("database '{}': {source}", db.display())]
    Database {
        db: PathBuf,
        source: rusqlite::Error,
    },
    /// The database holds something that is not what Nix would write.
    #[error("database '{}' is corrupt: {what}", db.display())]
    CorruptDatabase { db: PathBuf, what: String },
    /// The database was made by a Nix whose schema Kiln does not know.
    #[error("database '{}' has schema version {found}, but Kiln reads version {expected} (Nix 2.4 – 2.x)", db.display())]
    SchemaVersion {
        db: PathBuf,
        found: String,
        expected: u32,
    },
    /// A NAR was malformed.
    #[error("malformed NAR for '{path}': {source}")]
    BadNar {
        path: String,
        #[source]
        source: nar::ReadError,
    },
    /// A tree could not be serialised as a NAR.
    #[error(transparent)]
    NarWrite(#[from] nar::WriteError),
    /// The NAR's hash is not the one it was announced with.
    #[error("NAR hash mismatch for '{path}': expected {}, got {}", expected.to_sri(), actual.to_sri())]
    NarHashMismatch {
        path: String,
        expected: Hash,
        actual: Hash,
    },
    /// The NAR's size is not the one it was announced with.
    #[error("NAR size mismatch for '{path}': expected {expected} bytes, got {actual}")]
    NarSizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    /// A content-addressed path's contents do not give its name.
    #[error("path '{path}' claims content address '{ca}', which gives '{computed}' instead")]
    ContentAddressMismatch {
        path: String,
        ca: String,
        computed: String,
    },
    /// A path's references are not all valid in the store.
    #[error("cannot add '{path}': its reference '{reference}' is not valid in the store")]
    MissingReference { path: String, reference: String },
    /// A hash string could not be parsed.
    #[error("bad hash '{text}': {source}")]
    BadHash { text: String, source: HashError },
    /// A content address could not be parsed.
    #[error(transparent)]
    BadContentAddress(#[from] ContentAddressError),
    /// A path to add is not what the ingestion method needs.
    #[error("cannot add '{}': {what}", path.display())]
    BadSource { path: PathBuf, what: String },
    /// The garbage collector refused to delete a path that is still alive.
    #[error("cannot delete path '{path}' since it is still alive ({why})")]
    PathAlive { path: String, why: String },
    /// An export/import stream was malformed.
    #[error("malformed export stream: {0}")]
    BadExport(String),
    /// A stream of paths to add (the daemon's AddMultipleToStore) was
    /// malformed, or one of its paths was refused; the message says which.
    #[error("{0}")]
    StreamRefused(String),
    /// A derivation could not be written into the store.
    #[error("cannot add derivation '{name}': {what}")]
    BadDerivation { name: String, what: String },
    /// A store URL could not be understood.
    #[error(transparent)]
    BadUrl(#[from] crate::url::UrlError),
    /// A binary cache failed (boxed: its variants are large).
    #[error(transparent)]
    BinaryCache(Box<crate::binary_cache::BinaryCacheError>),
    /// A signature to record is not of the form `name:base64`.
    #[error("cannot add signature '{signature}' to '{path}': {source}")]
    BadSignature {
        path: String,
        signature: String,
        source: kiln_formats::signature::SignatureError,
    },
    /// The store cannot do this operation at all.
    #[error("store '{store}' does not support {operation}")]
    Unsupported {
        store: String,
        operation: &'static str,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
