//! The [`Derivation`] value: what a `.drv` file says, independent of how it is
//! written (ATerm in [`crate::aterm`], JSON in [`crate::json`]).
//!
//! Free-form strings (system, builder, arguments, environment) are byte
//! strings: Nix copies whatever bytes the evaluator produced, valid UTF-8 or
//! not, and a `.drv` must survive a round trip unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use bstr::BString;
use kiln_formats::hash::{Hash, HashAlgo, HashError};
use kiln_formats::store_path::{
    FileIngestionMethod, StoreDir, StorePath, StorePathError, StorePathSet,
};

/// A derivation: a recipe for building store paths.
///
/// Maps are ordered as Nix orders them when it writes a `.drv`, so printing
/// needs no sorting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Output name (`out`, `dev`, …) → how its store path is determined.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Derivations whose outputs this one needs: `.drv` path → output names.
    pub input_derivations: BTreeMap<StorePath, BTreeSet<String>>,
    /// Store paths needed as they are (sources, `builtins.toFile` texts).
    pub input_sources: StorePathSet,
    /// The platform the builder runs on, e.g. `x86_64-linux`.
    pub system: BString,
    /// The program that builds it.
    pub builder: BString,
    /// The builder's arguments.
    pub args: Vec<BString>,
    /// The builder's environment.
    pub env: BTreeMap<BString, BString>,
}

/// How one output's store path is determined.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DerivationOutput {
    /// The path follows from the derivation's hash modulo (the usual case).
    InputAddressed { path: StorePath },
    /// A fixed-output derivation: the content's hash is known in advance and
    /// the path follows from it.
    Fixed { hash: OutputHash, path: StorePath },
    /// Content-addressed with the hash known only after the build
    /// (`__contentAddressed = true`, experimental in Nix 2.8).
    Floating { method: HashMethod, algo: HashAlgo },
    /// Input-addressed but not yet computable (it depends on floating
    /// outputs), or not computed yet: the path is empty.
    Deferred,
    /// An impure derivation (`__impure = true`, experimental).
    Impure { method: HashMethod, algo: HashAlgo },
}

impl DerivationOutput {
    /// The store path, when the output has one already.
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            DerivationOutput::InputAddressed { path } | DerivationOutput::Fixed { path, .. } => {
                Some(path)
            }
            _ => None,
        }
    }
}

/// How an output's content is hashed: Nix's `ContentAddressMethod`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashMethod {
    /// The file's bytes (`outputHashMode = "flat"`).
    Flat,
    /// The NAR serialisation (`outputHashMode = "recursive"`).
    Recursive,
    /// Text with references, as `builtins.toFile` (`outputHashMode = "text"`).
    Text,
}

impl HashMethod {
    /// The prefix Nix puts before the algorithm name: `""`, `"r:"`, `"text:"`.
    pub const fn prefix(self) -> &'static str {
        match self {
            HashMethod::Flat => "",
            HashMethod::Recursive => "r:",
            HashMethod::Text => "text:",
        }
    }

    /// The name used by `outputHashMode` and by newer JSON (`method`).
    pub const fn mode_name(self) -> &'static str {
        match self {
            HashMethod::Flat => "flat",
            HashMethod::Recursive => "recursive",
            HashMethod::Text => "text",
        }
    }

    /// Parses `"r:sha256"`, `"sha1"`, `"text:sha256"`: the `hashAlgo` field.
    pub fn parse_with_algo(s: &str) -> Result<(HashMethod, HashAlgo), HashError> {
        let (method, algo) = if let Some(algo) = s.strip_prefix("r:") {
            (HashMethod::Recursive, algo)
        } else if let Some(algo) = s.strip_prefix("text:") {
            (HashMethod::Text, algo)
        } else {
            (HashMethod::Flat, s)
        };
        Ok((method, algo.parse()?))
    }

    /// Prints the `hashAlgo` field: `"r:sha256"` and so on.
    pub fn with_algo(self, algo: HashAlgo) -> String {
        format!("{}{}", self.prefix(), algo.name())
    }
}

impl From<FileIngestionMethod> for HashMethod {
    fn from(method: FileIngestionMethod) -> Self {
        match method {
            FileIngestionMethod::Flat => HashMethod::Flat,
            FileIngestionMethod::Recursive => HashMethod::Recursive,
        }
    }
}

impl FromStr for HashMethod {
    type Err = String;
    /// Parses an `outputHashMode` value.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flat" => Ok(HashMethod::Flat),
            "recursive" | "nar" => Ok(HashMethod::Recursive),
            "text" => Ok(HashMethod::Text),
            _ => Err(format!(
                "unknown output hash mode '{s}' (expected flat, recursive or text)"
            )),
        }
    }
}

impl fmt::Display for HashMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mode_name())
    }
}

/// The declared hash of a fixed output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutputHash {
    pub method: HashMethod,
    pub hash: Hash,
}

impl OutputHash {
    /// The `hashAlgo` field: `"r:sha256"` and so on.
    pub fn method_algo(&self) -> String {
        self.method.with_algo(self.hash.algo())
    }

    /// The store path Nix gives the output `output_name` of a derivation
    /// named `drv_name` with this fixed hash.
    pub fn store_path(
        &self,
        store: &StoreDir,
        drv_name: &str,
        output_name: &str,
    ) -> Result<StorePath, StorePathError> {
        let name = kiln_formats::store_path::output_path_name(drv_name, output_name);
        match self.method {
            HashMethod::Text => store.make_text_path(&name, &self.hash, &StorePathSet::new()),
            HashMethod::Flat => store.make_fixed_output_path(
                &name,
                FileIngestionMethod::Flat,
                &self.hash,
                &StorePathSet::new(),
                false,
            ),
            HashMethod::Recursive => store.make_fixed_output_path(
                &name,
                FileIngestionMethod::Recursive,
                &self.hash,
                &StorePathSet::new(),
                false,
            ),
        }
    }
}

/// The derivation name a `.drv` store path stands for: its name without
/// `.drv`, or `None` when the path is not a derivation.
pub fn drv_name(drv_path: &StorePath) -> Option<&str> {
    drv_path.name().strip_suffix(".drv")
}

impl Derivation {
    /// True when every output is fixed: the derivation may use the network
    /// and its hash modulo is the fixed hash, not its inputs.
    pub fn is_fixed_output(&self) -> bool {
        !self.outputs.is_empty()
            && self
                .outputs
                .values()
                .all(|o| matches!(o, DerivationOutput::Fixed { .. }))
    }

    /// Every output path already known, by output name.
    pub fn output_paths(&self) -> impl Iterator<Item = (&str, &StorePath)> {
        self.outputs
            .iter()
            .filter_map(|(name, o)| Some((name.as_str(), o.path()?)))
    }

    /// The store paths this derivation's `.drv` file refers to: its input
    /// sources and input derivations.
    pub fn references(&self) -> StorePathSet {
        self.input_sources
            .iter()
            .chain(self.input_derivations.keys())
            .cloned()
            .collect()
    }

    /// An environment variable as UTF-8, if present and valid.
    pub fn env_str(&self, key: &str) -> Option<&str> {
        self.env
            .get(key.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}
