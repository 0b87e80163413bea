//! Store directories and store paths: validation, and the computation of
//! input-addressed, fixed-output and text paths exactly as Nix does it.
//!
//! The store directory is always a parameter ([`StoreDir`]); a [`StorePath`]
//! is only its base name (`<hash>-<name>`), so the same path value can be
//! printed for any store.
//!
//! ```
//! use kiln_formats::hash::{Hash, HashAlgo};
//! use kiln_formats::store_path::{StoreDir, StorePathSet};
//!
//! let store = StoreDir::default();
//! let text = store.make_text_path("hello.txt", &Hash::digest(HashAlgo::Sha256, "hi"), &StorePathSet::new())?;
//! assert!(store.display(&text).to_string().ends_with("-hello.txt"));
//! # Ok::<(), kiln_formats::store_path::StorePathError>(())
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::hash::{Hash, HashAlgo, compress};
use crate::nixbase32;

/// Length of the hash part of a store path's base name.
pub const HASH_PART_LEN: usize = 32;
/// Bytes behind the hash part.
pub const HASH_BYTES: usize = 20;
/// The longest name Nix allows after the hash part.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path, or a path cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    #[error("store directory '{0}' is not an absolute path without a trailing slash")]
    BadStoreDir(String),
    #[error("path '{path}' is not in the store '{store}'")]
    NotInStore { path: String, store: String },
    #[error("store path '{0}' is too short to have a hash part and a name")]
    TooShort(String),
    #[error(
        "store path '{0}' has an invalid hash part (expected 32 nixbase32 characters then '-')"
    )]
    BadHashPart(String),
    #[error("store path '{0}' has an empty name")]
    EmptyName(String),
    #[error("store path '{path}' has a name longer than {MAX_NAME_LEN} characters ({len})")]
    NameTooLong { path: String, len: usize },
    #[error("store path '{path}' contains illegal character {ch:?} in its name")]
    BadNameChar { path: String, ch: char },
    #[error("store path '{0}' has a name that is '.' or '..'")]
    DotName(String),
    #[error("store path name '{0}' is invalid: {1}")]
    BadName(String, String),
    #[error(
        "fixed-output path '{name}' hashed with {algo} and flat ingestion cannot have references"
    )]
    FixedOutputWithReferences { name: String, algo: HashAlgo },
    #[error("text path '{name}' must be hashed with sha256, not {algo}")]
    TextNotSha256 { name: String, algo: HashAlgo },
}

/// The logical directory of a store, e.g. `/nix/store`. Part of every path's
/// hash, so it is always passed explicitly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StoreDir {
    /// A store directory: absolute, no trailing slash, no `.`/`..` or empty
    /// components.
    pub fn new(dir: impl Into<String>) -> Result<StoreDir, StorePathError> {
        let dir = dir.into();
        let ok = dir.len() > 1
            && dir.starts_with('/')
            && !dir.ends_with('/')
            && dir[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if ok {
            Ok(StoreDir(dir))
        } else {
            Err(StorePathError::BadStoreDir(dir))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an absolute store path (`/nix/store/<hash>-<name>`); anything
    /// below it (`…/bin/sh`) is refused — see [`StoreDir::split_path`].
    pub fn parse_path(&self, path: &str) -> Result<StorePath, StorePathError> {
        let base = self.strip_store_dir(path)?;
        if base.contains('/') {
            return Err(StorePathError::NotInStore {
                path: path.to_owned(),
                store: self.0.clone(),
            });
        }
        StorePath::from_base_name(base)
    }

    /// Splits a path inside the store into its store path and the rest
    /// (`/nix/store/…-bash/bin/sh` → (`…-bash`, `/bin/sh`)).
    pub fn split_path<'a>(&self, path: &'a str) -> Result<(StorePath, &'a str), StorePathError> {
        let base = self.strip_store_dir(path)?;
        let (first, rest) = match base.find('/') {
            Some(i) => (&base[..i], &base[i..]),
            None => (base, ""),
        };
        Ok((StorePath::from_base_name(first)?, rest))
    }

    fn strip_store_dir<'a>(&self, path: &'a str) -> Result<&'a str, StorePathError> {
        path.strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store: self.0.clone(),
            })
    }

    /// The absolute path of `path` in this store.
    pub fn print_path(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path.base_name())
    }

    /// A `Display` of `path` in this store.
    pub fn display<'a>(&'a self, path: &'a StorePath) -> DisplayPath<'a> {
        DisplayPath { dir: self, path }
    }

    /// Nix's `makeStorePath`: the path whose hash part is the compressed
    /// sha256 of `type:algo:base16:storedir:name`.
    pub fn make_path(
        &self,
        path_type: &str,
        inner: &Hash,
        name: &str,
    ) -> Result<StorePath, StorePathError> {
        check_name(name).map_err(|e| StorePathError::BadName(name.to_owned(), e))?;
        let fingerprint = format!(
            "{path_type}:{}:{}:{name}",
            inner.to_typed_string(crate::hash::HashFormat::Base16),
            self.0
        );
        let digest = Hash::digest(HashAlgo::Sha256, fingerprint.as_bytes());
        let hash_part = nixbase32::encode(&compress(digest.as_bytes(), HASH_BYTES));
        Ok(StorePath {
            base: format!("{hash_part}-{name}"),
        })
    }

    /// The path type with its references (`text:/nix/store/…:…[:self]`).
    fn type_with_references(
        &self,
        kind: &str,
        references: &StorePathSet,
        has_self_reference: bool,
    ) -> String {
        let mut s = kind.to_owned();
        for r in references {
            s.push(':');
            s.push_str(&self.print_path(r));
        }
        if has_self_reference {
            s.push_str(":self");
        }
        s
    }

    /// The path of a text file (`builtins.toFile`, a `.drv`), from the
    /// sha256 of its contents and its references.
    pub fn make_text_path(
        &self,
        name: &str,
        hash: &Hash,
        references: &StorePathSet,
    ) -> Result<StorePath, StorePathError> {
        if hash.algo() != HashAlgo::Sha256 {
            return Err(StorePathError::TextNotSha256 {
                name: name.to_owned(),
                algo: hash.algo(),
            });
        }
        self.make_path(
            &self.type_with_references("text", references, false),
            hash,
            name,
        )
    }

    /// The path of fixed-output content: `source` paths for recursive sha256
    /// (which may have references), `output:out` paths otherwise.
    pub fn make_fixed_output_path(
        &self,
        name: &str,
        method: FileIngestionMethod,
        hash: &Hash,
        references: &StorePathSet,
        has_self_reference: bool,
    ) -> Result<StorePath, StorePathError> {
        if method == FileIngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 {
            return self.make_path(
                &self.type_with_references("source", references, has_self_reference),
                hash,
                name,
            );
        }
        if !references.is_empty() || has_self_reference {
            return Err(StorePathError::FixedOutputWithReferences {
                name: name.to_owned(),
                algo: hash.algo(),
            });
        }
        let inner = format!(
            "fixed:out:{}{}:",
            method.prefix(),
            hash.to_typed_string(crate::hash::HashFormat::Base16)
        );
        self.make_path("output:out", &Hash::digest(HashAlgo::Sha256, inner), name)
    }

    /// The path of output `output` of an input-addressed derivation named
    /// `drv_name`, from the derivation's hash modulo.
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, StorePathError> {
        let name = output_path_name(drv_name, output);
        self.make_path(&format!("output:{output}"), drv_hash, &name)
    }
}

/// The name of a derivation's output path: the derivation's name, with
/// `-<output>` appended for every output but `out`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// Prints a store path inside its store.
#[derive(Debug, Clone, Copy)]
pub struct DisplayPath<'a> {
    dir: &'a StoreDir,
    path: &'a StorePath,
}

impl fmt::Display for DisplayPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.dir.0, self.path.base)
    }
}

/// How file-system content was hashed for a fixed-output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileIngestionMethod {
    /// The bytes of a single regular file.
    Flat,
    /// The NAR serialisation of a tree.
    Recursive,
}

impl FileIngestionMethod {
    /// `r:` for recursive, nothing for flat, as in `fixed:out:r:sha256:…`.
    pub fn prefix(self) -> &'static str {
        match self {
            FileIngestionMethod::Flat => "",
            FileIngestionMethod::Recursive => "r:",
        }
    }
}

/// A store path without its store directory: the base name `<hash>-<name>`.
/// Ordered as Nix orders paths (by base name).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

/// A sorted set of store paths, as Nix's `StorePathSet`.
pub type StorePathSet = BTreeSet<StorePath>;

impl StorePath {
    /// Parses `<hash>-<name>` with Nix's rules.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        if base.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(base.to_owned()));
        }
        let bytes = base.as_bytes();
        if !bytes[..HASH_PART_LEN]
            .iter()
            .all(|&c| nixbase32::is_valid_char(c))
            || bytes[HASH_PART_LEN] != b'-'
        {
            return Err(StorePathError::BadHashPart(base.to_owned()));
        }
        let name = &base[HASH_PART_LEN + 1..];
        check_name(name).map_err(|_| name_error(base, name))?;
        Ok(StorePath {
            base: base.to_owned(),
        })
    }

    /// Makes a store path from its 20-byte hash and its name.
    pub fn from_parts(hash: &[u8; HASH_BYTES], name: &str) -> Result<StorePath, StorePathError> {
        let base = format!("{}-{name}", nixbase32::encode(hash));
        check_name(name).map_err(|_| name_error(&base, name))?;
        Ok(StorePath { base })
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// The 32 characters of the hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    /// The 20 bytes behind the hash part.
    pub fn hash_bytes(&self) -> [u8; HASH_BYTES] {
        let bytes = nixbase32::decode(self.hash_part()).expect("validated at construction");
        bytes
            .try_into()
            .expect("32 nixbase32 characters are 20 bytes")
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    /// Whether this is a derivation (`….drv`).
    pub fn is_derivation(&self) -> bool {
        self.base.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    /// The base name; use [`StoreDir::display`] for the absolute path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        StorePath::from_base_name(s)
    }
}

fn name_error(path: &str, name: &str) -> StorePathError {
    let path = path.to_owned();
    if name.is_empty() {
        StorePathError::EmptyName(path)
    } else if name.len() > MAX_NAME_LEN {
        StorePathError::NameTooLong {
            path,
            len: name.len(),
        }
    } else if name == "." || name == ".." {
        StorePathError::DotName(path)
    } else {
        let ch = name.chars().find(|&c| !is_name_char(c)).unwrap_or('?');
        StorePathError::BadNameChar { path, ch }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_' | '?' | '=')
}

/// Checks a store path name with Nix's rules, saying what is wrong.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("the name is longer than {MAX_NAME_LEN} characters"));
    }
    if name == "." || name == ".." {
        return Err("the name is '.' or '..'".to_owned());
    }
    if let Some(c) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(format!("the name contains the illegal character {c:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashFormat;
    use proptest::prelude::*;

    fn sha256(s: &str) -> Hash {
        Hash::digest(HashAlgo::Sha256, s)
    }

    #[test]
    fn parses_and_prints() {
        let store = StoreDir::default();
        let p = store
            .parse_path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1")
            .unwrap();
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(
            store.print_path(&p),
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1"
        );
        assert_eq!(StorePath::from_parts(&p.hash_bytes(), p.name()).unwrap(), p);
        let (q, rest) = store
            .split_path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1/bin/hello")
            .unwrap();
        assert_eq!((q, rest), (p, "/bin/hello"));
    }

    #[test]
    fn rejects_bad_paths() {
        let store = StoreDir::default();
        let bad = [
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-", "empty name"),
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x", "bad hash"),
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a b", "space"),
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-..", "dotdot"),
            ("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x/y", "subpath"),
            ("/nix/stor/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x", "other dir"),
            ("/nix/store/short", "short"),
        ];
        for (path, why) in bad {
            assert!(store.parse_path(path).is_err(), "{why}: {path}");
        }
        let long = format!(
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{}",
            "a".repeat(212)
        );
        assert!(matches!(
            store.parse_path(&long),
            Err(StorePathError::NameTooLong { len: 212, .. })
        ));
        assert!(StoreDir::new("/nix/store/").is_err());
        assert!(StoreDir::new("relative").is_err());
        assert!(StoreDir::new("/a/../b").is_err());
    }

    // The expected paths below were computed by Nix 2.8 (`builtins.toFile`,
    // `builtins.path`, fixed-output derivations); the e2e tests check many more.
    #[test]
    fn text_paths_match_nix() {
        let store = StoreDir::default();
        let hello = store
            .make_text_path("hello", &sha256("hello world"), &StorePathSet::new())
            .unwrap();
        assert_eq!(
            store.print_path(&hello),
            "/nix/store/ivlnvab4q9c7wbsvbfsvgaa15j9p6206-hello"
        );
        let text = format!("x {}", store.print_path(&hello));
        let b = store
            .make_text_path("b", &sha256(&text), &[hello.clone()].into())
            .unwrap();
        assert_eq!(
            store.print_path(&b),
            "/nix/store/5jzzp7vkisn2br9kjv4iacjz7hndcv45-b"
        );
        // The store directory is part of the hash.
        let gnu = StoreDir::new("/gnu/store").unwrap();
        assert_ne!(
            gnu.make_text_path("hello", &sha256("hello world"), &StorePathSet::new())
                .unwrap(),
            hello
        );
    }

    #[test]
    fn fixed_output_paths_match_nix() {
        let store = StoreDir::default();
        let h1 = Hash::parse_any("sha1:11f6ad8ec52a2984abaafd7c3b516503785c2072", None).unwrap();
        let flat = store
            .make_fixed_output_path(
                "f",
                FileIngestionMethod::Flat,
                &h1,
                &StorePathSet::new(),
                false,
            )
            .unwrap();
        assert_eq!(
            store.print_path(&flat),
            "/nix/store/inj0yhj55afnfa34s72zwi99vj8ynax1-f"
        );
        let refs: StorePathSet = [store
            .parse_path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-dep")
            .unwrap()]
        .into();
        assert!(matches!(
            store.make_fixed_output_path("x", FileIngestionMethod::Flat, &h1, &refs, false),
            Err(StorePathError::FixedOutputWithReferences { .. })
        ));
        let with_refs = store
            .make_fixed_output_path(
                "x",
                FileIngestionMethod::Recursive,
                &sha256("x"),
                &refs,
                false,
            )
            .unwrap();
        let without = store
            .make_fixed_output_path(
                "x",
                FileIngestionMethod::Recursive,
                &sha256("x"),
                &StorePathSet::new(),
                false,
            )
            .unwrap();
        assert_ne!(with_refs, without);
        assert_eq!(
            h1.to_typed_string(HashFormat::Base16),
            "sha1:11f6ad8ec52a2984abaafd7c3b516503785c2072"
        );
    }

    #[test]
    fn output_names() {
        assert_eq!(output_path_name("foo", "out"), "foo");
        assert_eq!(output_path_name("foo", "dev"), "foo-dev");
    }

    proptest! {
        #[test]
        fn base_names_round_trip(hash in prop::array::uniform20(any::<u8>()), name in "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,60}") {
            let p = StorePath::from_parts(&hash, &name).unwrap();
            prop_assert_eq!(StorePath::from_base_name(p.base_name()).unwrap(), p.clone());
            prop_assert_eq!(p.hash_bytes(), hash);
        }
    }
}
