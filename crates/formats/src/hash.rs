//! Cryptographic hashes as Nix names, parses and prints them.
//!
//! A [`Hash`] is an algorithm and its digest. Nix prints digests in four
//! encodings ([`HashFormat`]) and parses them by rules this module follows
//! exactly: `algo:digest` with the encoding told apart by length, SRI
//! `algo-base64`, or a bare digest when the algorithm is known from context.
//!
//! ```
//! use kiln_formats::hash::{Hash, HashAlgo, HashFormat};
//! let h = Hash::digest(HashAlgo::Sha256, b"");
//! let sri = h.to_sri();
//! assert_eq!(Hash::parse_any(&sri, None).unwrap(), h);
//! assert_eq!(h.encode(HashFormat::Nixbase32), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::Digest as _;

use crate::nixbase32;

/// The hash algorithms Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    pub const ALL: [HashAlgo; 4] = [
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ];

    /// The name Nix uses (`md5`, `sha1`, `sha256`, `sha512`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Length of the digest in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    fn base16_len(self) -> usize {
        self.digest_len() * 2
    }

    fn nixbase32_len(self) -> usize {
        nixbase32::encoded_len(self.digest_len())
    }

    fn base64_len(self) -> usize {
        self.digest_len().div_ceil(3) * 4
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        HashAlgo::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| HashError::UnknownAlgo(s.to_owned()))
    }
}

/// The encodings Nix prints digests in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashFormat {
    Base16,
    Nixbase32,
    Base64,
    /// `algo-base64`, as in Subresource Integrity; carries the algorithm.
    Sri,
}

impl FromStr for HashFormat {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        Ok(match s {
            "base16" | "hex" => HashFormat::Base16,
            "base32" | "nix32" | "nixbase32" => HashFormat::Nixbase32,
            "base64" => HashFormat::Base64,
            "sri" => HashFormat::Sri,
            _ => return Err(HashError::UnknownFormat(s.to_owned())),
        })
    }
}

/// Why a string is not a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("unknown hash algorithm '{0}' (expected md5, sha1, sha256 or sha512)")]
    UnknownAlgo(String),
    #[error("unknown hash format '{0}' (expected base16, base32, base64 or sri)")]
    UnknownFormat(String),
    #[error("hash '{0}' does not say its algorithm (expected 'algo:…' or 'algo-…')")]
    MissingAlgo(String),
    #[error(
        "hash '{hash}' has the wrong length for {algo} (expected {base16} base16, {base32} base32 or {base64} base64 characters)"
    )]
    WrongLength {
        hash: String,
        algo: HashAlgo,
        base16: usize,
        base32: usize,
        base64: usize,
    },
    #[error("hash '{hash}' is not valid {format}: {reason}")]
    BadEncoding {
        hash: String,
        format: &'static str,
        reason: String,
    },
    #[error("hash '{hash}' is {found}, expected {expected}")]
    AlgoMismatch {
        hash: String,
        found: HashAlgo,
        expected: HashAlgo,
    },
    #[error("{len} bytes is not a {algo} digest (expected {})", algo.digest_len())]
    WrongDigestLength { algo: HashAlgo, len: usize },
}

/// A digest together with its algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: [u8; 64],
}

impl Hash {
    /// Wraps a digest, checking its length against the algorithm.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.digest_len() {
            return Err(HashError::WrongDigestLength {
                algo,
                len: digest.len(),
            });
        }
        let mut bytes = [0; 64];
        bytes[..digest.len()].copy_from_slice(digest);
        Ok(Hash { algo, bytes })
    }

    /// Hashes `data` in one go.
    pub fn digest(algo: HashAlgo, data: impl AsRef<[u8]>) -> Hash {
        let mut hasher = Hasher::new(algo);
        hasher.update(data.as_ref());
        hasher.finish()
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algo.digest_len()]
    }

    /// The digest alone in the given encoding; [`HashFormat::Sri`] includes
    /// the algorithm as SRI does.
    pub fn encode(&self, format: HashFormat) -> String {
        match format {
            HashFormat::Base16 => base16(self.as_bytes()),
            HashFormat::Nixbase32 => nixbase32::encode(self.as_bytes()),
            HashFormat::Base64 => BASE64.encode(self.as_bytes()),
            HashFormat::Sri => self.to_sri(),
        }
    }

    /// `algo:digest` in the given encoding (SRI is always `algo-base64`).
    pub fn to_typed_string(&self, format: HashFormat) -> String {
        match format {
            HashFormat::Sri => self.to_sri(),
            _ => format!("{}:{}", self.algo, self.encode(format)),
        }
    }

    pub fn to_base16(&self) -> String {
        self.encode(HashFormat::Base16)
    }

    pub fn to_nixbase32(&self) -> String {
        self.encode(HashFormat::Nixbase32)
    }

    pub fn to_base64(&self) -> String {
        self.encode(HashFormat::Base64)
    }

    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// Parses a hash that names its algorithm: `algo:digest` (base16,
    /// nixbase32 or base64, told apart by length) or SRI `algo-base64`.
    /// When `expected` is given, the algorithm must match it.
    pub fn parse_prefixed(s: &str, expected: Option<HashAlgo>) -> Result<Hash, HashError> {
        if !has_algo_prefix(s) {
            return Err(HashError::MissingAlgo(s.to_owned()));
        }
        Self::parse_any(s, expected)
    }

    /// Parses any form Nix accepts: `algo:digest`, SRI, or a bare digest
    /// when `algo` says which algorithm it is.
    pub fn parse_any(s: &str, algo: Option<HashAlgo>) -> Result<Hash, HashError> {
        let check = |found: HashAlgo| match algo {
            Some(expected) if expected != found => Err(HashError::AlgoMismatch {
                hash: s.to_owned(),
                found,
                expected,
            }),
            _ => Ok(found),
        };
        if let Some((name, rest)) = s.split_once(':') {
            let found = check(name.parse()?)?;
            return Self::parse_bare(rest, found).map_err(|e| rename(e, s));
        }
        if let Some((name, rest)) = s.split_once('-') {
            if let Ok(found) = name.parse::<HashAlgo>() {
                let found = check(found)?;
                return Self::parse_base64(rest, found).map_err(|e| rename(e, s));
            }
        }
        match algo {
            Some(algo) => Self::parse_bare(s, algo),
            None => Err(HashError::MissingAlgo(s.to_owned())),
        }
    }

    /// Parses an SRI hash (`sha256-…`).
    pub fn parse_sri(s: &str) -> Result<Hash, HashError> {
        let (name, rest) = s
            .split_once('-')
            .ok_or_else(|| HashError::MissingAlgo(s.to_owned()))?;
        Self::parse_base64(rest, name.parse()?).map_err(|e| rename(e, s))
    }

    /// Parses a digest without algorithm, its encoding told apart by length
    /// as Nix does.
    pub fn parse_bare(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        let len = s.len();
        if len == algo.base16_len() {
            let bytes = parse_base16(s).ok_or_else(|| {
                bad_encoding(s, "base16", "expected only the characters 0-9 and a-f")
            })?;
            Hash::new(algo, &bytes)
        } else if len == algo.nixbase32_len() {
            let bytes =
                nixbase32::decode(s).map_err(|e| bad_encoding(s, "nixbase32", &e.to_string()))?;
            Hash::new(algo, &bytes)
        } else if len == algo.base64_len() {
            Self::parse_base64(s, algo)
        } else {
            Err(HashError::WrongLength {
                hash: s.to_owned(),
                algo,
                base16: algo.base16_len(),
                base32: algo.nixbase32_len(),
                base64: algo.base64_len(),
            })
        }
    }

    fn parse_base64(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        let bytes = BASE64
            .decode(s)
            .map_err(|e| bad_encoding(s, "base64", &e.to_string()))?;
        if bytes.len() != algo.digest_len() {
            return Err(HashError::WrongLength {
                hash: s.to_owned(),
                algo,
                base16: algo.base16_len(),
                base32: algo.nixbase32_len(),
                base64: algo.base64_len(),
            });
        }
        Hash::new(algo, &bytes)
    }
}

fn has_algo_prefix(s: &str) -> bool {
    s.split_once(':').is_some()
        || s.split_once('-')
            .is_some_and(|(name, _)| name.parse::<HashAlgo>().is_ok())
}

/// Errors about the digest part name the whole string the user gave.
fn rename(err: HashError, whole: &str) -> HashError {
    match err {
        HashError::WrongLength {
            algo,
            base16,
            base32,
            base64,
            ..
        } => HashError::WrongLength {
            hash: whole.to_owned(),
            algo,
            base16,
            base32,
            base64,
        },
        HashError::BadEncoding { format, reason, .. } => HashError::BadEncoding {
            hash: whole.to_owned(),
            format,
            reason,
        },
        other => other,
    }
}

fn bad_encoding(s: &str, format: &'static str, reason: &str) -> HashError {
    HashError::BadEncoding {
        hash: s.to_owned(),
        format,
        reason: reason.to_owned(),
    }
}

/// Lower-case hexadecimal, as Nix prints base16.
pub fn base16(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Parses hexadecimal (either case), or `None` when it is not hex.
pub fn parse_base16(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

impl fmt::Display for Hash {
    /// `algo:nixbase32`, the form Nix uses in most of its output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_typed_string(HashFormat::Nixbase32))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_sri())
    }
}

impl FromStr for Hash {
    type Err = HashError;
    /// Parses a hash that names its algorithm (`algo:…` or SRI).
    fn from_str(s: &str) -> Result<Hash, HashError> {
        Hash::parse_any(s, None)
    }
}

/// Folds a digest into `len` bytes by XOR, as Nix does to make the
/// 20-byte hash part of a store path.
pub fn compress(digest: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, b) in digest.iter().enumerate() {
        out[i % len] ^= b;
    }
    out
}

/// An incremental hasher for any [`HashAlgo`].
#[derive(Clone)]
pub struct Hasher(HasherState);

#[derive(Clone)]
enum HasherState {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Hasher").field(&self.algo()).finish()
    }
}

impl Hasher {
    pub fn new(algo: HashAlgo) -> Hasher {
        Hasher(match algo {
            HashAlgo::Md5 => HasherState::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => HasherState::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => HasherState::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => HasherState::Sha512(sha2::Sha512::new()),
        })
    }

    pub fn algo(&self) -> HashAlgo {
        match self.0 {
            HasherState::Md5(_) => HashAlgo::Md5,
            HasherState::Sha1(_) => HashAlgo::Sha1,
            HasherState::Sha256(_) => HashAlgo::Sha256,
            HasherState::Sha512(_) => HashAlgo::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            HasherState::Md5(h) => h.update(data),
            HasherState::Sha1(h) => h.update(data),
            HasherState::Sha256(h) => h.update(data),
            HasherState::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Hash {
        let algo = self.algo();
        let digest: Vec<u8> = match self.0 {
            HasherState::Md5(h) => h.finalize().to_vec(),
            HasherState::Sha1(h) => h.finalize().to_vec(),
            HasherState::Sha256(h) => h.finalize().to_vec(),
            HasherState::Sha512(h) => h.finalize().to_vec(),
        };
        Hash::new(algo, &digest).expect("digest length matches its algorithm")
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer that hashes and counts everything written through it.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(algo: HashAlgo, inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Hasher::new(algo),
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The inner writer, the hash of everything written, and its length.
    pub fn finish(self) -> (W, Hash, u64) {
        (self.inner, self.hasher.finish(), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts everything read through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(algo: HashAlgo, inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(algo),
            len: 0,
        }
    }

    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The inner reader, the hash of everything read, and its length.
    pub fn finish(self) -> (R, Hash, u64) {
        (self.inner, self.hasher.finish(), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY_SHA256_HEX: &str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_every_form_nix_prints() {
        let h = Hash::digest(HashAlgo::Sha256, b"");
        for s in [
            format!("sha256:{EMPTY_SHA256_HEX}"),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73".to_owned(),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
        ] {
            assert_eq!(Hash::parse_any(&s, None).unwrap(), h, "{s}");
            assert_eq!(
                Hash::parse_prefixed(&s, Some(HashAlgo::Sha256)).unwrap(),
                h,
                "{s}"
            );
        }
        assert_eq!(
            Hash::parse_any(EMPTY_SHA256_HEX, Some(HashAlgo::Sha256)).unwrap(),
            h
        );
        assert_eq!(
            Hash::parse_any(&EMPTY_SHA256_HEX.to_uppercase(), Some(HashAlgo::Sha256)).unwrap(),
            h
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            h.to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn known_digests() {
        assert_eq!(
            Hash::digest(HashAlgo::Md5, b"").to_base16(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(
            Hash::digest(HashAlgo::Sha1, b"abc").to_base16(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert!(
            Hash::digest(HashAlgo::Sha512, b"")
                .to_base16()
                .starts_with("cf83e1357eefb8bd")
        );
    }

    #[test]
    fn clear_errors() {
        assert!(matches!(
            Hash::parse_any("sha256:abc", None),
            Err(HashError::WrongLength { .. })
        ));
        assert!(matches!(
            Hash::parse_any("whirlpool:abc", None),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_any(EMPTY_SHA256_HEX, None),
            Err(HashError::MissingAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_any(&format!("sha256:{EMPTY_SHA256_HEX}"), Some(HashAlgo::Sha1)),
            Err(HashError::AlgoMismatch { .. })
        ));
        assert!(matches!(
            Hash::parse_prefixed(EMPTY_SHA256_HEX, Some(HashAlgo::Sha256)),
            Err(HashError::MissingAlgo(_))
        ));
        let bad_hex = format!("sha256:{}g", &EMPTY_SHA256_HEX[1..]);
        let err = Hash::parse_any(&bad_hex, None).unwrap_err();
        assert!(err.to_string().contains(&bad_hex), "{err}");
    }

    #[test]
    fn streaming_matches_one_shot() {
        let data = vec![7u8; 100_000];
        let mut w = HashingWriter::new(HashAlgo::Sha256, Vec::new());
        for chunk in data.chunks(333) {
            w.write_all(chunk).unwrap();
        }
        let (out, hash, len) = w.finish();
        assert_eq!((out.len() as u64, len), (100_000, 100_000));
        assert_eq!(hash, Hash::digest(HashAlgo::Sha256, &data));
        let mut r = HashingReader::new(HashAlgo::Sha1, &data[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(r.finish().1, Hash::digest(HashAlgo::Sha1, &data));
    }

    fn any_hash() -> impl Strategy<Value = Hash> {
        (
            prop::sample::select(HashAlgo::ALL.to_vec()),
            prop::collection::vec(any::<u8>(), 64),
        )
            .prop_map(|(algo, bytes)| Hash::new(algo, &bytes[..algo.digest_len()]).unwrap())
    }

    proptest! {
        #[test]
        fn every_format_round_trips(h in any_hash()) {
            for format in [HashFormat::Base16, HashFormat::Nixbase32, HashFormat::Base64, HashFormat::Sri] {
                let typed = h.to_typed_string(format);
                prop_assert_eq!(Hash::parse_any(&typed, None).unwrap(), h);
                prop_assert_eq!(Hash::parse_any(&h.encode(format), Some(h.algo())).unwrap(), h);
            }
        }

        #[test]
        fn base16_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(parse_base16(&base16(&bytes)).unwrap(), bytes);
        }
    }
}
