//! Binary cache metadata: `<hash>.narinfo` files ([`NarInfo`]) and the
//! cache's `nix-cache-info` ([`CacheInfo`]), parsed and printed as Nix does.
//!
//! A narinfo is a list of `Key: value` lines. [`NarInfo::to_text`] writes the
//! fields in Nix's order (`StorePath`, `URL`, `Compression`, `FileHash`,
//! `FileSize`, `NarHash`, `NarSize`, `References`, `Deriver`, `System`, `Sig`…,
//! `CA`), so a narinfo Nix wrote prints back byte for byte. Parsing ignores
//! keys it does not know, as Nix does, but refuses malformed values, repeated
//! fields and missing mandatory fields, naming the line.
//!
//! ```
//! use kiln_formats::narinfo::NarInfo;
//! use kiln_formats::store_path::StoreDir;
//!
//! let text = "StorePath: /nix/store/z3n6ml62lc6l9glpaz6fq7fvi2rks9vq-a.txt
//! URL: nar/17gd6zzlkx90irc6qawagdkgh1d7qvlnq46yjf7xiqw9ycz7zq4a.nar.xz
//! Compression: xz
//! FileHash: sha256:17gd6zzlkx90irc6qawagdkgh1d7qvlnq46yjf7xiqw9ycz7zq4a
//! FileSize: 128
//! NarHash: sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw
//! NarSize: 120
//! References: \n";
//! let store = StoreDir::default();
//! let info = NarInfo::parse(&store, text)?;
//! assert_eq!(info.nar_size, 120);
//! assert_eq!(info.to_text(&store), text);
//! # Ok::<(), kiln_formats::narinfo::NarInfoError>(())
//! ```

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::content_address::ContentAddress;
use crate::hash::Hash;
use crate::signature::{self, SecretKey, Signature, SignatureError, TrustedKeys};
use crate::store_path::{StoreDir, StorePath, StorePathSet};

/// What a binary cache says about one store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache.
    pub url: String,
    /// `xz`, `bzip2`, `zstd`, `none`, …; Nix takes a missing one as `bzip2`.
    pub compression: String,
    /// Hash of the compressed file at [`NarInfo::url`].
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: StorePathSet,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    /// Kept in printed order, as Nix keeps them in a set of strings.
    pub signatures: BTreeSet<Signature>,
    pub ca: Option<ContentAddress>,
}

/// Why a narinfo or `nix-cache-info` cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    #[error("line {line}: expected 'Key: value', found {text:?}")]
    NotKeyValue { line: usize, text: String },
    #[error("line {line}: {field} appears a second time")]
    Repeated { line: usize, field: &'static str },
    #[error("line {line}: {field} {value:?} is invalid: {reason}")]
    BadValue {
        line: usize,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("the {0} field is missing")]
    Missing(&'static str),
    #[error("NarSize is 0 (a NAR is never empty)")]
    ZeroNarSize,
    #[error("the cache is for store '{found}', but this store is '{expected}'")]
    WrongStoreDir { found: String, expected: String },
}

/// Splits text into numbered `(key, value)` pairs; the last line may lack its
/// newline.
fn key_values(
    text: &str,
    skip_blank: bool,
) -> impl Iterator<Item = Result<(usize, &str, &str), NarInfoError>> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let lines = (!text.is_empty()).then(|| body.split('\n'));
    lines
        .into_iter()
        .flatten()
        .enumerate()
        .filter(move |(_, l)| !(skip_blank && l.trim().is_empty()))
        .map(|(i, l)| {
            let line = i + 1;
            let not_key_value = || NarInfoError::NotKeyValue {
                line,
                text: l.to_owned(),
            };
            let (key, rest) = l.split_once(':').ok_or_else(not_key_value)?;
            // Nix writes `Key: value`; `Key:` alone is an empty value.
            let value = if rest.is_empty() {
                rest
            } else {
                rest.strip_prefix(' ').ok_or_else(not_key_value)?
            };
            Ok((line, key, value))
        })
}

/// Remembers a single-valued field, refusing a second one.
fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    line: usize,
    field: &'static str,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::Repeated { line, field });
    }
    *slot = Some(value);
    Ok(())
}

fn bad_value(line: usize, field: &'static str, value: &str, reason: impl ToString) -> NarInfoError {
    NarInfoError::BadValue {
        line,
        field,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

/// A decimal number as Nix writes them: digits only.
fn parse_u64(line: usize, field: &'static str, value: &str) -> Result<u64, NarInfoError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad_value(line, field, value, "expected a decimal number"));
    }
    value
        .parse()
        .map_err(|_| bad_value(line, field, value, "number too large"))
}

impl NarInfo {
    /// Parses a narinfo whose paths are in `store`.
    pub fn parse(store: &StoreDir, text: &str) -> Result<NarInfo, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut signatures = BTreeSet::new();
        let mut ca = None;

        for item in key_values(text, false) {
            let (line, key, value) = item?;
            match key {
                "StorePath" => {
                    let path = store
                        .parse_path(value)
                        .map_err(|e| bad_value(line, "StorePath", value, e))?;
                    set_once(&mut store_path, path, line, "StorePath")?;
                }
                "URL" => set_once(&mut url, value.to_owned(), line, "URL")?,
                "Compression" => set_once(&mut compression, value.to_owned(), line, "Compression")?,
                "FileHash" => {
                    let hash = Hash::parse_prefixed(value, None)
                        .map_err(|e| bad_value(line, "FileHash", value, e))?;
                    set_once(&mut file_hash, hash, line, "FileHash")?;
                }
                "FileSize" => {
                    let size = parse_u64(line, "FileSize", value)?;
                    set_once(&mut file_size, size, line, "FileSize")?;
                }
                "NarHash" => {
                    let hash = Hash::parse_prefixed(value, None)
                        .map_err(|e| bad_value(line, "NarHash", value, e))?;
                    set_once(&mut nar_hash, hash, line, "NarHash")?;
                }
                "NarSize" => {
                    let size = parse_u64(line, "NarSize", value)?;
                    set_once(&mut nar_size, size, line, "NarSize")?;
                }
                "References" => {
                    // Base names separated by single spaces; Nix skips empty
                    // words, so an empty list is `References: `.
                    let refs = value
                        .split(' ')
                        .filter(|w| !w.is_empty())
                        .map(|w| {
                            StorePath::from_base_name(w)
                                .map_err(|e| bad_value(line, "References", w, e))
                        })
                        .collect::<Result<StorePathSet, _>>()?;
                    set_once(&mut references, refs, line, "References")?;
                }
                "Deriver" => {
                    // Old caches write this placeholder for "no deriver".
                    let path = if value == "unknown-deriver" {
                        None
                    } else {
                        Some(
                            StorePath::from_base_name(value)
                                .map_err(|e| bad_value(line, "Deriver", value, e))?,
                        )
                    };
                    set_once(&mut deriver, path, line, "Deriver")?;
                }
                "System" => set_once(&mut system, value.to_owned(), line, "System")?,
                "Sig" => {
                    let sig = value
                        .parse()
                        .map_err(|e: SignatureError| bad_value(line, "Sig", value, e))?;
                    signatures.insert(sig);
                }
                "CA" => {
                    let parsed = if value.is_empty() {
                        None
                    } else {
                        Some(value.parse().map_err(|e| bad_value(line, "CA", value, e))?)
                    };
                    set_once(&mut ca, parsed, line, "CA")?;
                }
                // Nix ignores keys it does not know; newer writers add some.
                _ => {}
            }
        }

        let nar_size = nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url
                .filter(|u| !u.is_empty())
                .ok_or(NarInfoError::Missing("URL"))?,
            compression: compression
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "bzip2".to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            system: system.filter(|s| !s.is_empty()),
            signatures,
            ca: ca.flatten(),
        })
    }

    /// The narinfo as Nix writes it, paths printed in `store`.
    pub fn to_text(&self, store: &StoreDir) -> String {
        let mut s = String::with_capacity(512);
        // Writing to a String cannot fail.
        let _ = writeln!(s, "StorePath: {}", store.display(&self.store_path));
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(hash) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {hash}");
        }
        if let Some(size) = self.file_size {
            let _ = writeln!(s, "FileSize: {size}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        s.push_str("References: ");
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(r.base_name());
        }
        s.push('\n');
        if let Some(deriver) = &self.deriver {
            let _ = writeln!(s, "Deriver: {deriver}");
        }
        if let Some(system) = &self.system {
            let _ = writeln!(s, "System: {system}");
        }
        for sig in &self.signatures {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// The string that signatures of this path sign.
    pub fn fingerprint(&self, store: &StoreDir) -> Result<String, SignatureError> {
        signature::path_fingerprint(
            store,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds `key`'s signature of this path.
    pub fn sign(&mut self, store: &StoreDir, key: &SecretKey) -> Result<(), SignatureError> {
        let fingerprint = self.fingerprint(store)?;
        self.signatures.insert(key.sign(fingerprint.as_bytes()));
        Ok(())
    }

    /// How many distinct trusted keys validly signed this path.
    pub fn count_valid_signatures(
        &self,
        store: &StoreDir,
        trusted: &TrustedKeys,
    ) -> Result<usize, SignatureError> {
        let fingerprint = self.fingerprint(store)?;
        Ok(trusted.count_valid(fingerprint.as_bytes(), &self.signatures))
    }
}

/// A binary cache's `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheInfo {
    /// The store directory the cache's paths belong to.
    pub store_dir: Option<StoreDir>,
    pub want_mass_query: Option<bool>,
    /// Lower is preferred; cache.nixos.org says 40.
    pub priority: Option<i32>,
}

impl CacheInfo {
    /// The info Nix writes when it creates a cache for `store`.
    pub fn for_store(store: &StoreDir) -> CacheInfo {
        CacheInfo {
            store_dir: Some(store.clone()),
            ..CacheInfo::default()
        }
    }

    /// Parses `nix-cache-info`. Values are trimmed and blank lines and
    /// unknown keys skipped, as Nix does; bad values are errors.
    pub fn parse(text: &str) -> Result<CacheInfo, NarInfoError> {
        let mut info = CacheInfo::default();
        for item in key_values(text, true) {
            let (line, key, value) = item?;
            let value = value.trim();
            match key {
                "StoreDir" => {
                    let dir =
                        StoreDir::new(value).map_err(|e| bad_value(line, "StoreDir", value, e))?;
                    set_once(&mut info.store_dir, dir, line, "StoreDir")?;
                }
                "WantMassQuery" => {
                    let want = match value {
                        "1" => true,
                        "0" => false,
                        _ => {
                            return Err(bad_value(line, "WantMassQuery", value, "expected 0 or 1"));
                        }
                    };
                    set_once(&mut info.want_mass_query, want, line, "WantMassQuery")?;
                }
                "Priority" => {
                    let priority = value
                        .parse()
                        .map_err(|_| bad_value(line, "Priority", value, "expected an integer"))?;
                    set_once(&mut info.priority, priority, line, "Priority")?;
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// Refuses a cache made for another store directory, as Nix does.
    pub fn check_store_dir(&self, store: &StoreDir) -> Result<(), NarInfoError> {
        match &self.store_dir {
            Some(dir) if dir != store => Err(NarInfoError::WrongStoreDir {
                found: dir.to_string(),
                expected: store.to_string(),
            }),
            _ => Ok(()),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if let Some(dir) = &self.store_dir {
            let _ = writeln!(s, "StoreDir: {dir}");
        }
        if let Some(want) = self.want_mass_query {
            let _ = writeln!(s, "WantMassQuery: {}", u8::from(want));
        }
        if let Some(priority) = self.priority {
            let _ = writeln!(s, "Priority: {priority}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;
    use crate::store_path::FileIngestionMethod;
    use proptest::prelude::*;

    // Written by Nix 2.8's `nix copy --to file://…` after `nix store sign`.
    const SIGNED: &str = "StorePath: /nix/store/2lljyfffqrjncb12d9y2h83yqz4pql2s-tree
URL: nar/1j6a5mybd5lz7knlbmvsllvjwj5ia85rdgvjd2kar9agwg81254x.nar.xz
Compression: xz
FileHash: sha256:1j6a5mybd5lz7knlbmvsllvjwj5ia85rdgvjd2kar9agwg81254x
FileSize: 188
NarHash: sha256:1ibw5ar3kblqahkw0m4ar4biw3lv2260l2xa9y4lym6l8j32wb6w
NarSize: 480
References: 
Sig: cache-1:zJwtDvNjmzQbD23o5n6UAyWqvbU/ClZreyhFaGmossEFC0JEciSS/icOI0Z+Wyz20wQsMLfI6WUyLu624g/rCg==
CA: fixed:r:sha256:1ibw5ar3kblqahkw0m4ar4biw3lv2260l2xa9y4lym6l8j32wb6w
";
    const SIGNED_BY: &str = "cache-1:ZzTVspuPiC/aREwG1q/ZnXzMro9hWkFE1Uyz06LBzNQ=";

    const WITH_REFS: &str = "StorePath: /nix/store/rz0wqpi9ny7w05biranbz7g2j64h71nb-uses
URL: nar/0fv17rh3n01i5pknrn7a5lh2l99yw5p16sy83jm51rmkknaxfkyz.nar.xz
Compression: xz
FileHash: sha256:0fv17rh3n01i5pknrn7a5lh2l99yw5p16sy83jm51rmkknaxfkyz
FileSize: 176
NarHash: sha256:0b0yr5nshcwfhq4j1cd2n0gylbf9shf4cy26xx00jybikkfhphml
NarSize: 168
References: abxcn50cldw72vl3shm3i34gsa7bnz7b-dep.txt
Deriver: aafi5rhafw1dhwvn5n148gizcc4lpy4c-uses.drv
";

    fn store() -> StoreDir {
        StoreDir::default()
    }

    #[test]
    fn nix_written_narinfos_print_back_identically() {
        for text in [SIGNED, WITH_REFS] {
            let info = NarInfo::parse(&store(), text).unwrap();
            assert_eq!(info.to_text(&store()), text);
        }
        let info = NarInfo::parse(&store(), WITH_REFS).unwrap();
        assert_eq!(info.references.len(), 1);
        assert_eq!(info.deriver.unwrap().name(), "uses.drv");
        assert_eq!(info.compression, "xz");
        assert_eq!(info.file_size, Some(176));
    }

    #[test]
    fn nix_signature_verifies() {
        let info = NarInfo::parse(&store(), SIGNED).unwrap();
        let trusted = TrustedKeys::parse(SIGNED_BY).unwrap();
        assert_eq!(info.count_valid_signatures(&store(), &trusted).unwrap(), 1);
        let mut changed = info.clone();
        changed.nar_size += 1;
        assert_eq!(
            changed.count_valid_signatures(&store(), &trusted).unwrap(),
            0
        );
    }

    #[test]
    fn defaults_and_tolerance() {
        let text = "StorePath: /nix/store/rz0wqpi9ny7w05biranbz7g2j64h71nb-uses\n\
                    URL: nar/x.nar\nNarHash: sha256-tMIL3ZxxeQlA70Z4RhzUyS3qH7CisSAJho4zqG3JHiw=\n\
                    NarSize: 168\nFuture: whatever\nReferences:\nDeriver: unknown-deriver\nSystem: ";
        let info = NarInfo::parse(&store(), text).unwrap();
        assert_eq!(info.compression, "bzip2");
        assert_eq!(info.deriver, None);
        assert_eq!(info.system, None);
        assert!(info.references.is_empty());
        assert_eq!(
            info.to_text(&store()),
            "StorePath: /nix/store/rz0wqpi9ny7w05biranbz7g2j64h71nb-uses\nURL: nar/x.nar\n\
             Compression: bzip2\nNarHash: sha256:0b0yr5nshcwfhq4j1cd2n0gylbf9shf4cy26xx00jybikkfhphml\n\
             NarSize: 168\nReferences: \n"
        );
    }

    #[test]
    fn errors_name_the_line() {
        let with = |line: &str| format!("{WITH_REFS}{line}\n");
        let err = |text: &str| NarInfo::parse(&store(), text).unwrap_err();
        assert_eq!(
            err(&with("garbage")),
            NarInfoError::NotKeyValue {
                line: 10,
                text: "garbage".into()
            }
        );
        assert_eq!(
            err(&with("NarSize: 5")),
            NarInfoError::Repeated {
                line: 10,
                field: "NarSize"
            }
        );
        assert!(matches!(
            err(&WITH_REFS.replace("NarSize: 168", "NarSize: -1")),
            NarInfoError::BadValue {
                line: 7,
                field: "NarSize",
                ..
            }
        ));
        assert!(matches!(
            err(&WITH_REFS.replace("sha256:0b0y", "sha256:0b0")),
            NarInfoError::BadValue {
                line: 6,
                field: "NarHash",
                ..
            }
        ));
        assert!(matches!(
            err(&WITH_REFS.replace("abxcn50cldw72vl3shm3i34gsa7bnz7b-dep.txt", "a/b")),
            NarInfoError::BadValue {
                line: 8,
                field: "References",
                ..
            }
        ));
        // Found by fuzzing: a multi-byte character inside a nixbase32 digest.
        assert!(matches!(
            err(&WITH_REFS.replace("sha256:0fv17rh3n01", "sha256:0fv17rh3nɊ")),
            NarInfoError::BadValue {
                line: 4,
                field: "FileHash",
                ..
            }
        ));
        assert!(matches!(
            err(&with("Sig: k:AAAA")),
            NarInfoError::BadValue {
                line: 10,
                field: "Sig",
                ..
            }
        ));
        assert!(matches!(
            err(&with("CA: fixed:md4:x")),
            NarInfoError::BadValue {
                line: 10,
                field: "CA",
                ..
            }
        ));
        assert!(matches!(
            NarInfo::parse(&StoreDir::new("/gnu/store").unwrap(), WITH_REFS).unwrap_err(),
            NarInfoError::BadValue {
                line: 1,
                field: "StorePath",
                ..
            }
        ));
        let without = |key: &str| -> String {
            WITH_REFS
                .lines()
                .filter(|l| !l.starts_with(key))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        for key in ["StorePath", "URL", "NarHash", "NarSize"] {
            assert_eq!(err(&without(key)), NarInfoError::Missing(key));
        }
        assert_eq!(
            err(&WITH_REFS.replace("NarSize: 168", "NarSize: 0")),
            NarInfoError::ZeroNarSize
        );
        assert!(
            err(&WITH_REFS.replace("URL: ", "URL:"))
                .to_string()
                .contains("line 2")
        );
    }

    #[test]
    fn cache_info() {
        let text = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
        let info = CacheInfo::parse(text).unwrap();
        assert_eq!(info.priority, Some(40));
        assert_eq!(info.want_mass_query, Some(true));
        assert_eq!(info.to_text(), text);
        info.check_store_dir(&store()).unwrap();
        assert!(
            info.check_store_dir(&StoreDir::new("/gnu/store").unwrap())
                .is_err()
        );
        assert_eq!(
            CacheInfo::for_store(&store()).to_text(),
            "StoreDir: /nix/store\n"
        );
        let loose = CacheInfo::parse("\nStoreDir:   /nix/store  \nOther: x\n").unwrap();
        assert_eq!(loose, CacheInfo::for_store(&store()));
        assert!(matches!(
            CacheInfo::parse("StoreDir: /nix/store\nPriority: high\n").unwrap_err(),
            NarInfoError::BadValue {
                line: 2,
                field: "Priority",
                ..
            }
        ));
        assert!(CacheInfo::parse("WantMassQuery: yes\n").is_err());
    }

    fn any_path() -> impl Strategy<Value = StorePath> {
        (
            any::<[u8; 20]>(),
            "[a-zA-Z0-9+._?=-][a-zA-Z0-9+._?=-]{0,20}",
        )
            .prop_filter_map("name must not be . or ..", |(h, n)| {
                StorePath::from_parts(&h, &n).ok()
            })
    }

    fn any_hash() -> impl Strategy<Value = Hash> {
        (0..4usize, any::<[u8; 64]>()).prop_map(|(i, bytes)| {
            let algo = HashAlgo::ALL[i];
            Hash::new(algo, &bytes[..algo.digest_len()]).unwrap()
        })
    }

    fn any_text() -> impl Strategy<Value = String> {
        "[^\n]*".prop_filter("non-empty", |s| !s.is_empty())
    }

    prop_compose! {
        fn any_narinfo()(
            store_path in any_path(),
            url in any_text(),
            compression in any_text(),
            file_hash in proptest::option::of(any_hash()),
            file_size in proptest::option::of(any::<u64>()),
            nar_hash in any_hash(),
            nar_size in 1..u64::MAX,
            references in proptest::collection::btree_set(any_path(), 0..5),
            deriver in proptest::option::of(any_path()),
            system in proptest::option::of(any_text()),
            seeds in proptest::collection::vec(any::<[u8; 32]>(), 0..3),
            ca in proptest::option::of((any::<bool>(), any_hash())),
        ) -> NarInfo {
            let mut info = NarInfo {
                store_path, url, compression, file_hash, file_size, nar_hash, nar_size,
                references, deriver, system, signatures: BTreeSet::new(),
                ca: ca.map(|(text, hash)| if text && hash.algo() == HashAlgo::Sha256 {
                    ContentAddress::Text(hash)
                } else {
                    ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash }
                }),
            };
            for (i, seed) in seeds.into_iter().enumerate() {
                let key = SecretKey::from_seed(&format!("key-{i}"), seed).unwrap();
                info.signatures.insert(key.sign(info.url.as_bytes()));
            }
            info
        }
    }

    proptest! {
        #[test]
        fn print_parse_round_trip(info in any_narinfo()) {
            let text = info.to_text(&store());
            let back = NarInfo::parse(&store(), &text).unwrap();
            prop_assert_eq!(&back, &info);
            prop_assert_eq!(back.to_text(&store()), text);
        }

        #[test]
        fn sign_then_verify(info in any_narinfo(), seed in any::<[u8; 32]>()) {
            let mut info = info;
            info.nar_hash = Hash::digest(HashAlgo::Sha256, info.url.as_bytes());
            let key = SecretKey::from_seed("test", seed).unwrap();
            info.sign(&store(), &key).unwrap();
            let trusted = TrustedKeys::parse(&key.to_public().to_string()).unwrap();
            let back = NarInfo::parse(&store(), &info.to_text(&store())).unwrap();
            prop_assert_eq!(back.count_valid_signatures(&store(), &trusted).unwrap(), 1);
        }

        #[test]
        fn cache_info_round_trip(want in proptest::option::of(any::<bool>()), priority in proptest::option::of(any::<i32>())) {
            let info = CacheInfo { store_dir: Some(store()), want_mass_query: want, priority };
            prop_assert_eq!(CacheInfo::parse(&info.to_text()).unwrap(), info);
        }

        #[test]
        fn parse_never_panics_and_reprints(text in "(([A-Za-z]{1,10}: [^\n]{0,20})?\n){0,12}") {
            if let Ok(info) = NarInfo::parse(&store(), &text) {
                let printed = info.to_text(&store());
                prop_assert_eq!(NarInfo::parse(&store(), &printed).unwrap(), info);
            }
        }
    }
}
