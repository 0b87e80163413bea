//! Content addresses (`ca` in the database and in narinfo files):
//! `text:sha256:…` and `fixed:[r:]algo:…`, with the hash in nixbase32 as Nix
//! prints them.

use std::fmt;
use std::str::FromStr;

use crate::hash::{Hash, HashAlgo, HashError};
use crate::store_path::{FileIngestionMethod, StoreDir, StorePath, StorePathError, StorePathSet};

/// How a content-addressed path's hash was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// A text file (sha256 of its bytes), e.g. a `.drv` or `builtins.toFile`.
    Text(Hash),
    /// A fixed-output path: flat file hash or NAR hash.
    Fixed {
        method: FileIngestionMethod,
        hash: Hash,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentAddressError {
    #[error("content address '{0}' does not start with 'text:' or 'fixed:'")]
    UnknownKind(String),
    #[error("content address '{ca}' has a bad hash: {source}")]
    BadHash { ca: String, source: HashError },
    #[error("content address '{0}' is text but not sha256")]
    TextNotSha256(String),
}

impl ContentAddress {
    pub fn hash(&self) -> &Hash {
        match self {
            ContentAddress::Text(h) | ContentAddress::Fixed { hash: h, .. } => h,
        }
    }

    /// The store path this content address gives for `name` and `references`.
    pub fn store_path(
        &self,
        store: &StoreDir,
        name: &str,
        references: &StorePathSet,
        has_self_reference: bool,
    ) -> Result<StorePath, StorePathError> {
        match self {
            ContentAddress::Text(hash) => store.make_text_path(name, hash, references),
            ContentAddress::Fixed { method, hash } => {
                store.make_fixed_output_path(name, *method, hash, references, has_self_reference)
            }
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(hash) => write!(f, "text:{hash}"),
            ContentAddress::Fixed { method, hash } => write!(f, "fixed:{}{hash}", method.prefix()),
        }
    }
}

impl FromStr for ContentAddress {
    type Err = ContentAddressError;
    fn from_str(s: &str) -> Result<Self, ContentAddressError> {
        let bad_hash = |source| ContentAddressError::BadHash {
            ca: s.to_owned(),
            source,
        };
        if let Some(rest) = s.strip_prefix("text:") {
            let hash = Hash::parse_prefixed(rest, None).map_err(bad_hash)?;
            if hash.algo() != HashAlgo::Sha256 {
                return Err(ContentAddressError::TextNotSha256(s.to_owned()));
            }
            Ok(ContentAddress::Text(hash))
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            let (method, rest) = match rest.strip_prefix("r:") {
                Some(rest) => (FileIngestionMethod::Recursive, rest),
                None => (FileIngestionMethod::Flat, rest),
            };
            let hash = Hash::parse_prefixed(rest, None).map_err(bad_hash)?;
            Ok(ContentAddress::Fixed { method, hash })
        } else {
            Err(ContentAddressError::UnknownKind(s.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "text:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "fixed:sha1:1ph5fq0aq1ysb86j0ld7i2bnpxxq2lbi",
        ] {
            let ca: ContentAddress = s.parse().unwrap();
            assert_eq!(ca.to_string(), s);
        }
        assert!("fixed:sha256:zz".parse::<ContentAddress>().is_err());
        assert!("source:sha256:x".parse::<ContentAddress>().is_err());
    }
}
