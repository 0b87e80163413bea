//! Ed25519 signatures on store paths, in Nix's `name:base64` form.
//!
//! Three kinds of string, each `name:base64(bytes)`:
//! - a secret key ([`SecretKey`]): 64 bytes, the 32-byte seed then the 32-byte
//!   public key (libsodium's layout, which `nix-store --generate-binary-cache-key`
//!   and `nix key generate-secret` write);
//! - a public key ([`PublicKey`]): 32 bytes, as in the `trusted-public-keys`
//!   setting ([`TrustedKeys`]);
//! - a signature ([`Signature`]): 64 bytes, named after the key that made it,
//!   as in a narinfo's `Sig:` lines.
//!
//! What is signed is a store path's fingerprint ([`path_fingerprint`]):
//! `1;<path>;<sha256 NAR hash in nixbase32>;<NAR size>;<references, comma-separated>`.
//!
//! ```
//! use kiln_formats::signature::{SecretKey, TrustedKeys};
//!
//! let key = SecretKey::generate("cache.example.org-1")?;
//! let trusted = TrustedKeys::parse(&key.to_public().to_string())?;
//! let sig = key.sign(b"some fingerprint");
//! trusted.verify(b"some fingerprint", &sig)?;
//! assert!(trusted.verify(b"another fingerprint", &sig).is_err());
//! # Ok::<(), kiln_formats::signature::SignatureError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;

use crate::hash::{Hash, HashAlgo, HashFormat};
use crate::store_path::{StoreDir, StorePath, StorePathSet};

/// Bytes of a secret key in Nix's layout: seed, then public key.
pub const SECRET_KEY_LEN: usize = 64;
/// Bytes of a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of a signature.
pub const SIGNATURE_LEN: usize = 64;

/// What went wrong with a key, a signature or a fingerprint.
///
/// Errors about secret keys never include the key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("{what} '{given}' is not of the form 'name:base64'")]
    MissingColon { what: &'static str, given: String },
    #[error("{what} has an empty name (expected 'name:base64')")]
    EmptyName { what: &'static str },
    #[error(
        "key name '{0}' is not allowed: it must be non-empty and have no ':', whitespace or control characters"
    )]
    BadKeyName(String),
    #[error("{what} '{name}' is not valid base64: {reason}")]
    BadBase64 {
        what: &'static str,
        name: String,
        reason: String,
    },
    #[error("{what} '{name}' is {found} bytes long, expected {expected}")]
    WrongLength {
        what: &'static str,
        name: String,
        expected: usize,
        found: usize,
    },
    #[error("secret key '{0}' is corrupt: its public half does not belong to its seed")]
    MismatchedSecretKey(String),
    #[error("public key '{0}' is not a valid ed25519 point")]
    BadPublicKey(String),
    #[error("signature is by key '{name}', which is not trusted (trusted keys: {known})")]
    UnknownKey { name: String, known: String },
    #[error("signature by key '{0}' does not match what was signed")]
    BadSignature(String),
    #[error("cannot fingerprint '{path}': its NAR hash is {algo}, expected sha256")]
    FingerprintNotSha256 { path: String, algo: HashAlgo },
    #[error("cannot fingerprint '{0}': its NAR size is not known (0)")]
    FingerprintNoSize(String),
}

/// Checks a key name: it is written before the first `:` and listed among
/// whitespace-separated keys, so neither may appear in it.
fn check_key_name(name: &str) -> Result<(), SignatureError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(SignatureError::BadKeyName(name.to_owned()));
    }
    Ok(())
}

/// Splits `name:base64` and decodes the bytes, which must be `N` long.
fn parse_named<const N: usize>(
    what: &'static str,
    s: &str,
    show_given: bool,
) -> Result<(String, [u8; N]), SignatureError> {
    // Key files are often written with a trailing newline; Nix tolerates it too.
    let s = s.trim();
    let Some((name, data)) = s.split_once(':') else {
        return Err(SignatureError::MissingColon {
            what,
            given: if show_given {
                s.to_owned()
            } else {
                "<hidden>".to_owned()
            },
        });
    };
    if name.is_empty() {
        return Err(SignatureError::EmptyName { what });
    }
    check_key_name(name)?;
    let bytes = BASE64.decode(data).map_err(|e| SignatureError::BadBase64 {
        what,
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let bytes: [u8; N] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| SignatureError::WrongLength {
            what,
            name: name.to_owned(),
            expected: N,
            found: bytes.len(),
        })?;
    Ok((name.to_owned(), bytes))
}

/// A named ed25519 signing key.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    /// A fresh key from the operating system's random source, as
    /// `nix-store --generate-binary-cache-key NAME …` makes.
    pub fn generate(name: &str) -> Result<SecretKey, SignatureError> {
        Self::generate_with(name, &mut rand::rngs::OsRng)
    }

    /// A fresh key from the given random source.
    pub fn generate_with(
        name: &str,
        rng: &mut (impl rand::RngCore + rand::CryptoRng),
    ) -> Result<SecretKey, SignatureError> {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self::from_seed(name, seed)
    }

    /// The key whose 32-byte seed is `seed`.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<SecretKey, SignatureError> {
        check_key_name(name)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key that verifies this key's signatures (what
    /// `nix key convert-secret-to-public` prints).
    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `message` (usually a [`path_fingerprint`]).
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }
}

impl FromStr for SecretKey {
    type Err = SignatureError;
    /// Parses the contents of a secret key file.
    fn from_str(s: &str) -> Result<SecretKey, SignatureError> {
        let (name, bytes) = parse_named::<SECRET_KEY_LEN>("secret key", s, false)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SignatureError::MismatchedSecretKey(name.clone()))?;
        Ok(SecretKey { name, key })
    }
}

impl fmt::Display for SecretKey {
    /// The contents of a secret key file (Nix writes no trailing newline).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.key.to_bytes() == other.key.to_bytes()
    }
}

impl Eq for SecretKey {}

/// A named ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        self.key.as_bytes()
    }

    /// Checks that `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        if signature.key_name != self.name {
            return Err(SignatureError::UnknownKey {
                name: signature.key_name.clone(),
                known: self.name.clone(),
            });
        }
        let sig = ed25519_dalek::Signature::from_bytes(&signature.bytes);
        // Strict verification refuses the malleable and small-order forms
        // that libsodium (which Nix uses) refuses as well.
        self.key
            .verify_strict(message, &sig)
            .map_err(|_| SignatureError::BadSignature(self.name.clone()))
    }
}

impl FromStr for PublicKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<PublicKey, SignatureError> {
        let (name, bytes) = parse_named::<PUBLIC_KEY_LEN>("public key", s, true)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SignatureError::BadPublicKey(name.clone()))?;
        Ok(PublicKey { name, key })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A signature and the name of the key that made it.
///
/// Ordered by its printed form, as Nix keeps a path's signatures in a set of
/// strings (and so prints a narinfo's `Sig:` lines in that order).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_name: String,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    /// A signature from its parts (the key name is checked).
    pub fn new(key_name: &str, bytes: [u8; SIGNATURE_LEN]) -> Result<Signature, SignatureError> {
        check_key_name(key_name)?;
        Ok(Signature {
            key_name: key_name.to_owned(),
            bytes,
        })
    }

    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.bytes
    }
}

impl Ord for Signature {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Printed form: name, ':', base64. The base64 alphabet does not keep
        // byte order, so compare the text itself.
        self.to_string().cmp(&other.to_string())
    }
}

impl PartialOrd for Signature {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for Signature {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Signature, SignatureError> {
        let (key_name, bytes) = parse_named::<SIGNATURE_LEN>("signature", s, true)?;
        Ok(Signature { key_name, bytes })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// The public keys whose signatures are accepted, by name (Nix's
/// `trusted-public-keys` setting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl TrustedKeys {
    pub fn new() -> TrustedKeys {
        TrustedKeys::default()
    }

    /// Parses a whitespace-separated list of public keys, as the value of
    /// `trusted-public-keys`. A later key with the same name replaces an
    /// earlier one, as in Nix.
    pub fn parse(list: &str) -> Result<TrustedKeys, SignatureError> {
        let mut keys = TrustedKeys::new();
        for word in list.split_whitespace() {
            keys.insert(word.parse()?);
        }
        Ok(keys)
    }

    pub fn insert(&mut self, key: PublicKey) {
        self.keys.insert(key.name.clone(), key);
    }

    pub fn get(&self, name: &str) -> Option<&PublicKey> {
        self.keys.get(name)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    /// Checks `signature` on `message` with the trusted key of its name.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        match self.keys.get(&signature.key_name) {
            Some(key) => key.verify(message, signature),
            None => Err(SignatureError::UnknownKey {
                name: signature.key_name.clone(),
                known: if self.keys.is_empty() {
                    "none".to_owned()
                } else {
                    self.keys.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            }),
        }
    }

    /// How many of `signatures` are valid signatures of `message` by
    /// distinct trusted keys (Nix's count for `--sigs-needed`).
    pub fn count_valid<'a>(
        &self,
        message: &[u8],
        signatures: impl IntoIterator<Item = &'a Signature>,
    ) -> usize {
        let mut seen = std::collections::BTreeSet::new();
        for sig in signatures {
            if self.verify(message, sig).is_ok() {
                seen.insert(sig.key_name.as_str());
            }
        }
        seen.len()
    }
}

impl FromStr for TrustedKeys {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<TrustedKeys, SignatureError> {
        TrustedKeys::parse(s)
    }
}

impl fmt::Display for TrustedKeys {
    /// Space-separated, as the setting is written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, key) in self.keys.values().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{key}")?;
        }
        Ok(())
    }
}

/// The string Nix signs for a store path:
/// `1;<path>;<sha256:nixbase32 NAR hash>;<NAR size>;<reference paths, comma-separated>`.
pub fn path_fingerprint(
    store: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: &StorePathSet,
) -> Result<String, SignatureError> {
    if nar_hash.algo() != HashAlgo::Sha256 {
        return Err(SignatureError::FingerprintNotSha256 {
            path: store.print_path(path),
            algo: nar_hash.algo(),
        });
    }
    if nar_size == 0 {
        return Err(SignatureError::FingerprintNoSize(store.print_path(path)));
    }
    let mut s = format!(
        "1;{};{};{nar_size};",
        store.display(path),
        nar_hash.to_typed_string(HashFormat::Nixbase32)
    );
    for (i, r) in references.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&store.print_path(r));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Made by `nix-store --generate-binary-cache-key test1 sk pk` (Nix 2.8).
    const NIX_SECRET: &str = "test1:yFwqrQIHyq9qff9nRV1kdj8Xdk6mKJbKDPEHfl+BtLsTIJCnoKtMHNY0+DWw35oCaSkJbulQyXpywXWTpzJLxg==";
    const NIX_PUBLIC: &str = "test1:EyCQp6CrTBzWNPg1sN+aAmkpCW7pUMl6csF1k6cyS8Y=";

    #[test]
    fn nix_key_pair_agrees() {
        let sk: SecretKey = NIX_SECRET.parse().unwrap();
        assert_eq!(sk.to_string(), NIX_SECRET);
        assert_eq!(sk.to_public().to_string(), NIX_PUBLIC);
        let pk: PublicKey = NIX_PUBLIC.parse().unwrap();
        assert_eq!(pk, sk.to_public());
        // A key file written with `echo` has a newline; still the same key.
        assert_eq!(format!("{NIX_SECRET}\n").parse::<SecretKey>().unwrap(), sk);
    }

    #[test]
    fn fingerprint_is_nix_form() {
        let store = StoreDir::default();
        let path =
            StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1").unwrap();
        let refs: StorePathSet = [
            "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1",
            "0h7qgvs4kgzsn8a6rb273saxyqh4jxlz-glibc",
        ]
        .into_iter()
        .map(|b| StorePath::from_base_name(b).unwrap())
        .collect();
        let hash = Hash::digest(HashAlgo::Sha256, b"");
        let fp = path_fingerprint(&store, &path, &hash, 120, &refs).unwrap();
        assert_eq!(
            fp,
            "1;/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1;\
             sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;120;\
             /nix/store/0h7qgvs4kgzsn8a6rb273saxyqh4jxlz-glibc,\
             /nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1"
        );
        let empty = path_fingerprint(&store, &path, &hash, 1, &StorePathSet::new()).unwrap();
        assert!(empty.ends_with(";1;"), "{empty}");
        assert!(matches!(
            path_fingerprint(&store, &path, &Hash::digest(HashAlgo::Sha1, b""), 1, &refs),
            Err(SignatureError::FingerprintNotSha256 { .. })
        ));
        assert!(matches!(
            path_fingerprint(&store, &path, &hash, 0, &refs),
            Err(SignatureError::FingerprintNoSize(_))
        ));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<Signature>().unwrap_err();
        assert!(matches!(
            err("nocolon"),
            SignatureError::MissingColon { .. }
        ));
        assert!(matches!(err(":AAAA"), SignatureError::EmptyName { .. }));
        assert!(matches!(err("k:!!!!"), SignatureError::BadBase64 { .. }));
        assert_eq!(
            err("k:AAAA"),
            SignatureError::WrongLength {
                what: "signature",
                name: "k".into(),
                expected: 64,
                found: 3
            }
        );
        // The public half of a secret key must belong to its seed.
        let mut bytes = SecretKey::from_seed("k", [7; 32])
            .unwrap()
            .key
            .to_keypair_bytes();
        bytes[40] ^= 1;
        let bad = format!("k:{}", BASE64.encode(bytes));
        assert_eq!(
            bad.parse::<SecretKey>().unwrap_err(),
            SignatureError::MismatchedSecretKey("k".into())
        );
        // Secret material is never echoed back.
        let msg = "secretstuff".parse::<SecretKey>().unwrap_err().to_string();
        assert!(!msg.contains("secretstuff"), "{msg}");
        assert!(SecretKey::generate("a b").is_err());
        assert!(SecretKey::generate("a:b").is_err());
    }

    #[test]
    fn trusted_keys_verify() {
        let a = SecretKey::from_seed("a", [1; 32]).unwrap();
        let b = SecretKey::from_seed("b", [2; 32]).unwrap();
        let trusted =
            TrustedKeys::parse(&format!("  {}\n\t{} ", a.to_public(), b.to_public())).unwrap();
        assert_eq!(trusted.len(), 2);
        assert_eq!(trusted.to_string().parse::<TrustedKeys>().unwrap(), trusted);
        let sig = a.sign(b"msg");
        trusted.verify(b"msg", &sig).unwrap();
        assert_eq!(
            trusted.verify(b"other", &sig),
            Err(SignatureError::BadSignature("a".into()))
        );
        let c = SecretKey::from_seed("c", [3; 32]).unwrap();
        assert_eq!(
            trusted.verify(b"msg", &c.sign(b"msg")),
            Err(SignatureError::UnknownKey {
                name: "c".into(),
                known: "a, b".into()
            })
        );
        // A key named like a trusted one but different is a bad signature.
        let impostor = SecretKey::from_seed("a", [4; 32]).unwrap();
        assert!(matches!(
            trusted.verify(b"msg", &impostor.sign(b"msg")),
            Err(SignatureError::BadSignature(_))
        ));
        let sigs = [
            sig.clone(),
            sig,
            b.sign(b"msg"),
            c.sign(b"msg"),
            impostor.sign(b"msg"),
        ];
        assert_eq!(trusted.count_valid(b"msg", &sigs), 2);
        assert!(TrustedKeys::parse("a:AAAA").is_err());
    }

    #[test]
    fn signatures_sort_as_text() {
        // "a.b:" sorts before "a:" as text ('.' < ':') though "a" < "a.b".
        let s1 = Signature::new("a", [0; 64]).unwrap();
        let s2 = Signature::new("a.b", [0; 64]).unwrap();
        assert!(s2 < s1);
    }

    proptest! {
        #[test]
        fn sign_verify_round_trip(seed in any::<[u8; 32]>(), name in "[a-zA-Z0-9._-]{1,30}", msg in any::<Vec<u8>>(), flip in any::<(usize, u8)>()) {
            let key = SecretKey::from_seed(&name, seed).unwrap();
            let trusted = TrustedKeys::parse(&key.to_public().to_string()).unwrap();
            let sig = key.sign(&msg);
            let reparsed: Signature = sig.to_string().parse().unwrap();
            prop_assert_eq!(&reparsed, &sig);
            prop_assert!(trusted.verify(&msg, &reparsed).is_ok());
            let mut bytes = *sig.as_bytes();
            let bit = flip.1 | 1;
            bytes[flip.0 % SIGNATURE_LEN] ^= bit;
            let tampered = Signature::new(&name, bytes).unwrap();
            prop_assert_eq!(trusted.verify(&msg, &tampered), Err(SignatureError::BadSignature(name.clone())));
        }

        #[test]
        fn key_files_round_trip(seed in any::<[u8; 32]>(), name in "[a-zA-Z0-9._-]{1,30}") {
            let key = SecretKey::from_seed(&name, seed).unwrap();
            let text = key.to_string();
            let back: SecretKey = text.parse().unwrap();
            prop_assert_eq!(&back, &key);
            prop_assert_eq!(back.to_string(), text);
            let public = key.to_public();
            let back: PublicKey = public.to_string().parse().unwrap();
            prop_assert_eq!(back, public);
        }

        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = s.parse::<SecretKey>();
            let _ = s.parse::<PublicKey>();
            let _ = s.parse::<Signature>();
            let _ = s.parse::<TrustedKeys>();
        }
    }
}
