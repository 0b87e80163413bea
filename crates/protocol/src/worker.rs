//! The daemon (worker) protocol's vocabulary: versions, operation codes,
//! the log framing (`STDERR_*`), and how path infos, derived paths and
//! build results look on the wire in each protocol version.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use kiln_derivation::{Derivation, DerivationOutput, HashMethod, OutputHash};
use kiln_formats::content_address::ContentAddress;
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_scheduler::result::{BuildResult, BuildStatus};
use kiln_store::PathInfo;

use crate::wire::{self, WireError};

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// A protocol version, `major << 8 | minor`.
pub type Version = u64;

/// The newest version Kiln speaks (1.38, with the feature exchange).
pub const PROTOCOL_VERSION: Version = (1 << 8) | 38;
/// The oldest version Kiln accepts (1.21, Nix 2.3).
pub const MIN_PROTOCOL_VERSION: Version = (1 << 8) | 21;

/// The minor part of a version, which is what every field depends on.
pub fn minor(v: Version) -> u64 {
    v & 0xff
}

/// The version string sent to clients from 1.33 on. Nix clients print it
/// (`nix store ping`); Kiln says what it is and which Nix it matches.
pub const DAEMON_VERSION_STRING: &str = concat!("2.8.0 (Kiln ", env!("CARGO_PKG_VERSION"), ")");

/// Features Kiln offers in 1.38's exchange: none yet, which is a valid
/// answer (the intersection is then empty).
pub const FEATURES: &[&str] = &[];

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// The operations, with Nix's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Op {
    IsValidPath = 1,
    HasSubstitutes = 3,
    QueryReferrers = 6,
    AddToStore = 7,
    AddTextToStore = 8,
    BuildPaths = 9,
    EnsurePath = 10,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    SyncWithGC = 13,
    FindRoots = 14,
    QueryDeriver = 18,
    SetOptions = 19,
    CollectGarbage = 20,
    QuerySubstitutablePathInfo = 21,
    QueryDerivationOutputs = 22,
    QueryAllValidPaths = 23,
    QueryPathInfo = 26,
    QueryDerivationOutputNames = 28,
    QueryPathFromHashPart = 29,
    QuerySubstitutablePathInfos = 30,
    QueryValidPaths = 31,
    QuerySubstitutablePaths = 32,
    QueryValidDerivers = 33,
    OptimiseStore = 34,
    VerifyStore = 35,
    BuildDerivation = 36,
    AddSignatures = 37,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    AddBuildLog = 45,
    BuildPathsWithResults = 46,
    AddPermRoot = 47,
}

impl Op {
    pub fn from_code(code: u64) -> Option<Op> {
        use Op::*;
        Some(match code {
            1 => IsValidPath,
            3 => HasSubstitutes,
            6 => QueryReferrers,
            7 => AddToStore,
            8 => AddTextToStore,
            9 => BuildPaths,
            10 => EnsurePath,
            11 => AddTempRoot,
            12 => AddIndirectRoot,
            13 => SyncWithGC,
            14 => FindRoots,
            18 => QueryDeriver,
            19 => SetOptions,
            20 => CollectGarbage,
            21 => QuerySubstitutablePathInfo,
            22 => QueryDerivationOutputs,
            23 => QueryAllValidPaths,
            26 => QueryPathInfo,
            28 => QueryDerivationOutputNames,
            29 => QueryPathFromHashPart,
            30 => QuerySubstitutablePathInfos,
            31 => QueryValidPaths,
            32 => QuerySubstitutablePaths,
            33 => QueryValidDerivers,
            34 => OptimiseStore,
            35 => VerifyStore,
            36 => BuildDerivation,
            37 => AddSignatures,
            38 => NarFromPath,
            39 => AddToStoreNar,
            40 => QueryMissing,
            41 => QueryDerivationOutputMap,
            42 => RegisterDrvOutput,
            43 => QueryRealisation,
            44 => AddMultipleToStore,
            45 => AddBuildLog,
            46 => BuildPathsWithResults,
            47 => AddPermRoot,
            _ => return None,
        })
    }
}

/// Why a value from the peer does not mean anything.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("'{given}' is not a store path in {store_dir}: {reason}")]
    BadPath {
        given: String,
        store_dir: String,
        reason: String,
    },
    #[error("'{given}' is not a {what}: {reason}")]
    BadValue {
        given: String,
        what: &'static str,
        reason: String,
    },
}

pub fn read_path<R: Read + ?Sized>(r: &mut R, store: &StoreDir) -> Result<StorePath, DecodeError> {
    let s = wire::read_string(r)?;
    parse_path(store, &s)
}

pub fn parse_path(store: &StoreDir, s: &str) -> Result<StorePath, DecodeError> {
    store.parse_path(s).map_err(|e| DecodeError::BadPath {
        given: s.to_owned(),
        store_dir: store.as_str().to_owned(),
        reason: e.to_string(),
    })
}

/// A path or the empty string for none (derivers, optional paths).
pub fn read_opt_path<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
) -> Result<Option<StorePath>, DecodeError> {
    let s = wire::read_string(r)?;
    if s.is_empty() {
        Ok(None)
    } else {
        parse_path(store, &s).map(Some)
    }
}

pub fn read_paths<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
) -> Result<StorePathSet, DecodeError> {
    wire::read_strings(r)?
        .iter()
        .map(|s| parse_path(store, s))
        .collect()
}

pub fn write_path<W: Write + ?Sized>(w: &mut W, store: &StoreDir, p: &StorePath) -> io::Result<()> {
    wire::write_bytes(w, store.print_path(p).as_bytes())
}

pub fn write_opt_path<W: Write + ?Sized>(
    w: &mut W,
    store: &StoreDir,
    p: Option<&StorePath>,
) -> io::Result<()> {
    match p {
        Some(p) => write_path(w, store, p),
        None => wire::write_bytes(w, b""),
    }
}

pub fn write_paths<'a, W: Write + ?Sized>(
    w: &mut W,
    store: &StoreDir,
    paths: impl IntoIterator<Item = &'a StorePath, IntoIter: ExactSizeIterator>,
) -> io::Result<()> {
    wire::write_strings(w, paths.into_iter().map(|p| store.print_path(p)))
}

/// Writes a path's metadata without the path itself ("unkeyed"), as the
/// answer to `QueryPathInfo` and after the path in `ValidPathInfo`.
pub fn write_path_info_unkeyed<W: Write + ?Sized>(
    w: &mut W,
    store: &StoreDir,
    info: &PathInfo,
    version: Version,
) -> io::Result<()> {
    write_opt_path(w, store, info.deriver.as_ref())?;
    wire::write_bytes(w, info.nar_hash.to_base16().as_bytes())?;
    write_paths(w, store, &info.references)?;
    wire::write_u64(w, info.registration_time.max(0) as u64)?;
    wire::write_u64(w, info.nar_size)?;
    if minor(version) >= 16 {
        wire::write_bool(w, info.ultimate)?;
        wire::write_strings(w, &info.sigs)?;
        let ca = info
            .ca
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        wire::write_bytes(w, ca.as_bytes())?;
    }
    Ok(())
}

/// Writes a path and its metadata (`ValidPathInfo`).
pub fn write_path_info<W: Write + ?Sized>(
    w: &mut W,
    store: &StoreDir,
    info: &PathInfo,
    version: Version,
) -> io::Result<()> {
    write_path(w, store, &info.path)?;
    write_path_info_unkeyed(w, store, info, version)
}

pub fn read_path_info_unkeyed<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
    path: StorePath,
    version: Version,
) -> Result<PathInfo, DecodeError> {
    let deriver = read_opt_path(r, store)?;
    let hash = wire::read_string(r)?;
    let nar_hash = parse_nar_hash(&hash)?;
    let references = read_paths(r, store)?;
    let registration_time = wire::read_u64(r)? as i64;
    let nar_size = wire::read_u64(r)?;
    let mut info = PathInfo::new(path, nar_hash, nar_size);
    info.deriver = deriver;
    info.references = references;
    info.registration_time = registration_time;
    if minor(version) >= 16 {
        info.ultimate = wire::read_bool(r)?;
        info.sigs = wire::read_strings(r)?.into_iter().collect();
        info.ca = parse_opt_ca(&wire::read_string(r)?)?;
    }
    Ok(info)
}

pub fn read_path_info<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
    version: Version,
) -> Result<PathInfo, DecodeError> {
    let path = read_path(r, store)?;
    read_path_info_unkeyed(r, store, path, version)
}

/// A NAR hash as the protocol sends it: bare base16 sha256, though any
/// form Nix accepts is taken.
pub fn parse_nar_hash(s: &str) -> Result<Hash, DecodeError> {
    Hash::parse_any(s, Some(HashAlgo::Sha256)).map_err(|e| DecodeError::BadValue {
        given: s.to_owned(),
        what: "NAR hash",
        reason: e.to_string(),
    })
}

pub fn parse_opt_ca(s: &str) -> Result<Option<ContentAddress>, DecodeError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(
            |e: kiln_formats::content_address::ContentAddressError| DecodeError::BadValue {
                given: s.to_owned(),
                what: "content address",
                reason: e.to_string(),
            },
        )
}

/// What a client asks to have built or present: a plain path, or outputs
/// of a derivation (`drv!out,dev`, `drv!*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivedPath {
    Opaque(StorePath),
    Built {
        drv: StorePath,
        /// Empty means all outputs (`*`).
        outputs: Vec<String>,
    },
}

impl DerivedPath {
    pub fn parse(store: &StoreDir, s: &str) -> Result<DerivedPath, DecodeError> {
        match s.split_once('!') {
            None => parse_path(store, s).map(DerivedPath::Opaque),
            Some((drv, outs)) => {
                let drv = parse_path(store, drv)?;
                let outputs = if outs == "*" {
                    Vec::new()
                } else {
                    outs.split(',')
                        .filter(|o| !o.is_empty())
                        .map(str::to_owned)
                        .collect()
                };
                Ok(DerivedPath::Built { drv, outputs })
            }
        }
    }

    pub fn to_string(&self, store: &StoreDir) -> String {
        match self {
            DerivedPath::Opaque(p) => store.print_path(p),
            DerivedPath::Built { drv, outputs } if outputs.is_empty() => {
                format!("{}!*", store.print_path(drv))
            }
            DerivedPath::Built { drv, outputs } => {
                format!("{}!{}", store.print_path(drv), outputs.join(","))
            }
        }
    }
}

pub fn read_derived_paths<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
) -> Result<Vec<DerivedPath>, DecodeError> {
    wire::read_strings(r)?
        .iter()
        .map(|s| DerivedPath::parse(store, s))
        .collect()
}

/// Nix's `BuildMode`: normal, repair, check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    Normal,
    Repair,
    Check,
}

impl BuildMode {
    pub fn from_code(code: u64) -> Result<BuildMode, DecodeError> {
        match code {
            0 => Ok(BuildMode::Normal),
            1 => Ok(BuildMode::Repair),
            2 => Ok(BuildMode::Check),
            _ => Err(DecodeError::BadValue {
                given: code.to_string(),
                what: "build mode (0 normal, 1 repair, 2 check)",
                reason: "unknown mode".into(),
            }),
        }
    }
}

/// A build result on the wire. `drv_output_hash` is the derivation's hash
/// modulo (for the `DrvOutput` ids of built outputs, from 1.28).
pub fn write_build_result<W: Write + ?Sized>(
    w: &mut W,
    _store: &StoreDir,
    result: &BuildResult,
    drv_output_hash: Option<&Hash>,
    version: Version,
) -> io::Result<()> {
    wire::write_u64(w, result.status as u64)?;
    wire::write_bytes(w, result.error.as_bytes())?;
    if minor(version) >= 29 {
        wire::write_u64(w, u64::from(result.status == BuildStatus::Built))?;
        wire::write_bool(w, result.status == BuildStatus::NotDeterministic)?;
        wire::write_u64(w, result.start_time.max(0) as u64)?;
        wire::write_u64(w, result.stop_time.max(0) as u64)?;
    }
    if minor(version) >= 37 {
        // cpuUser and cpuSystem: not measured.
        wire::write_u64(w, 0)?;
        wire::write_u64(w, 0)?;
    }
    if minor(version) >= 28 {
        let outputs: Vec<(String, String)> = match drv_output_hash {
            Some(hash) => result
                .outputs
                .iter()
                .map(|(name, path)| {
                    let id = format!(
                        "{}!{name}",
                        hash.to_typed_string(kiln_formats::hash::HashFormat::Base16)
                    );
                    let json = serde_json::json!({
                        "id": id,
                        "outPath": path.base_name(),
                        "signatures": [],
                        "dependentRealisations": {},
                    });
                    (id, json.to_string())
                })
                .collect(),
            None => Vec::new(),
        };
        wire::write_u64(w, outputs.len() as u64)?;
        for (id, json) in outputs {
            wire::write_bytes(w, id.as_bytes())?;
            wire::write_bytes(w, json.as_bytes())?;
        }
    }
    Ok(())
}

/// Reads a build result written by [`write_build_result`] (or Nix).
pub fn read_build_result<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
    version: Version,
) -> Result<BuildResult, DecodeError> {
    read_wire_build_result(r, store, version).map(|w| w.result)
}

/// A build result with the fields of Nix's `BuildResult` that Kiln's own
/// [`BuildResult`] does not keep. Fields the negotiated version does not
/// send are zero / `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireBuildResult {
    pub result: BuildResult,
    /// How many times the derivation was built (from 1.29).
    pub times_built: u64,
    /// `--check` or repeated builds found different outputs (from 1.29).
    pub is_non_deterministic: bool,
    /// CPU time of the builder, in microseconds (from 1.37, when measured).
    pub cpu_user_micros: Option<u64>,
    pub cpu_system_micros: Option<u64>,
}

/// Reads a build result with every field the version sends.
pub fn read_wire_build_result<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
    version: Version,
) -> Result<WireBuildResult, DecodeError> {
    let code = wire::read_u64(r)?;
    let status = status_from_code(code)?;
    let error = wire::read_string(r)?;
    let mut result = BuildResult::failure(status, error);
    let (mut times_built, mut is_non_deterministic) = (0, false);
    let (mut cpu_user_micros, mut cpu_system_micros) = (None, None);
    if minor(version) >= 29 {
        times_built = wire::read_u64(r)?;
        is_non_deterministic = wire::read_bool(r)?;
        result.start_time = wire::read_u64(r)? as i64;
        result.stop_time = wire::read_u64(r)? as i64;
    }
    if minor(version) >= 37 {
        for cpu in [&mut cpu_user_micros, &mut cpu_system_micros] {
            if wire::read_bool(r)? {
                *cpu = Some(wire::read_u64(r)?);
            }
        }
    }
    if minor(version) >= 28 {
        for (id, json) in wire::read_string_pairs(r)? {
            let name = id
                .rsplit_once('!')
                .map(|(_, n)| n.to_owned())
                .unwrap_or_default();
            let value: serde_json::Value =
                serde_json::from_str(&json).map_err(|e| DecodeError::BadValue {
                    given: json.clone(),
                    what: "realisation",
                    reason: e.to_string(),
                })?;
            if let Some(out) = value.get("outPath").and_then(|v| v.as_str()) {
                let path = if out.starts_with('/') {
                    parse_path(store, out)?
                } else {
                    StorePath::from_base_name(out).map_err(|e| DecodeError::BadValue {
                        given: out.to_owned(),
                        what: "output path",
                        reason: e.to_string(),
                    })?
                };
                result.outputs.insert(name, path);
            }
        }
    }
    Ok(WireBuildResult {
        result,
        times_built,
        is_non_deterministic,
        cpu_user_micros,
        cpu_system_micros,
    })
}

pub fn status_from_code(code: u64) -> Result<BuildStatus, DecodeError> {
    use BuildStatus::*;
    Ok(match code {
        0 => Built,
        1 => Substituted,
        2 => AlreadyValid,
        3 => PermanentFailure,
        4 => InputRejected,
        5 => OutputRejected,
        6 => TransientFailure,
        7 => CachedFailure,
        8 => TimedOut,
        9 => MiscFailure,
        10 => DependencyFailed,
        11 => LogLimitExceeded,
        12 => NotDeterministic,
        13 => ResolvesToAlreadyValid,
        14 => NoSubstituters,
        _ => {
            return Err(DecodeError::BadValue {
                given: code.to_string(),
                what: "build status",
                reason: "unknown status".into(),
            });
        }
    })
}

/// A derivation as `BuildDerivation` sends it (Nix's `BasicDerivation`:
/// no input derivations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicDerivation {
    /// name → (path, hash algo with method prefix, hash)
    pub outputs: BTreeMap<String, (String, String, String)>,
    pub input_srcs: StorePathSet,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

impl BasicDerivation {
    /// The derivation to build: what was sent, with no input derivations
    /// (their outputs arrive among `input_srcs`). Output paths must be
    /// known: a sent derivation cannot be hashed modulo its inputs here.
    pub fn to_derivation(&self, store: &StoreDir) -> Result<Derivation, DecodeError> {
        let bad = |given: &str, reason: String| DecodeError::BadValue {
            given: given.to_owned(),
            what: "derivation output",
            reason,
        };
        let mut outputs = BTreeMap::new();
        for (name, (path, algo, hash)) in &self.outputs {
            if path.is_empty() {
                return Err(bad(
                    name,
                    "its path is not known in advance (content-addressed derivations are not supported)"
                        .into(),
                ));
            }
            let path = parse_path(store, path)?;
            let output = if algo.is_empty() {
                DerivationOutput::InputAddressed { path }
            } else {
                let (method, hash_algo) = HashMethod::parse_with_algo(algo)
                    .map_err(|e| bad(algo, format!("hash algorithm of output '{name}': {e}")))?;
                let hash = Hash::parse_bare(hash, hash_algo)
                    .map_err(|e| bad(hash, format!("hash of output '{name}': {e}")))?;
                DerivationOutput::Fixed {
                    hash: OutputHash { method, hash },
                    path,
                }
            };
            outputs.insert(name.clone(), output);
        }
        Ok(Derivation {
            outputs,
            input_derivations: BTreeMap::new(),
            input_sources: self.input_srcs.clone(),
            system: self.platform.clone().into(),
            builder: self.builder.clone().into(),
            args: self.args.iter().map(|a| a.clone().into()).collect(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone().into(), v.clone().into()))
                .collect(),
        })
    }
}

pub fn read_basic_derivation<R: Read + ?Sized>(
    r: &mut R,
    store: &StoreDir,
) -> Result<BasicDerivation, DecodeError> {
    let n = wire::read_count(r, "derivation outputs")?;
    let mut outputs = BTreeMap::new();
    for _ in 0..n {
        let name = wire::read_string(r)?;
        let path = wire::read_string(r)?;
        let algo = wire::read_string(r)?;
        let hash = wire::read_string(r)?;
        outputs.insert(name, (path, algo, hash));
    }
    let input_srcs = read_paths(r, store)?;
    let platform = wire::read_string(r)?;
    let builder = wire::read_string(r)?;
    let args = wire::read_strings(r)?;
    let env = wire::read_string_pairs(r)?.into_iter().collect();
    Ok(BasicDerivation {
        outputs,
        input_srcs,
        platform,
        builder,
        args,
        env,
    })
}

pub fn write_basic_derivation<W: Write + ?Sized>(
    w: &mut W,
    store: &StoreDir,
    drv: &BasicDerivation,
) -> io::Result<()> {
    wire::write_u64(w, drv.outputs.len() as u64)?;
    for (name, (path, algo, hash)) in &drv.outputs {
        wire::write_bytes(w, name.as_bytes())?;
        wire::write_bytes(w, path.as_bytes())?;
        wire::write_bytes(w, algo.as_bytes())?;
        wire::write_bytes(w, hash.as_bytes())?;
    }
    write_paths(w, store, &drv.input_srcs)?;
    wire::write_bytes(w, drv.platform.as_bytes())?;
    wire::write_bytes(w, drv.builder.as_bytes())?;
    wire::write_strings(w, &drv.args)?;
    wire::write_u64(w, drv.env.len() as u64)?;
    for (k, v) in &drv.env {
        wire::write_bytes(w, k.as_bytes())?;
        wire::write_bytes(w, v.as_bytes())?;
    }
    Ok(())
}

/// Writes an error in the form the client's version reads: a message and
/// status before 1.26, a structured error from then on.
pub fn write_error<W: Write + ?Sized>(
    w: &mut W,
    version: Version,
    msg: &str,
    status: u64,
) -> io::Result<()> {
    wire::write_u64(w, STDERR_ERROR)?;
    if minor(version) >= 26 {
        wire::write_bytes(w, b"Error")?;
        wire::write_u64(w, 0)?; // level: error
        wire::write_bytes(w, b"Error")?;
        wire::write_bytes(w, msg.as_bytes())?;
        wire::write_u64(w, 0)?; // no position
        wire::write_u64(w, 0)?; // no traces
    } else {
        wire::write_bytes(w, msg.as_bytes())?;
        wire::write_u64(w, status)?;
    }
    Ok(())
}

pub fn write_next<W: Write + ?Sized>(w: &mut W, msg: &str) -> io::Result<()> {
    wire::write_u64(w, STDERR_NEXT)?;
    wire::write_bytes(w, msg.as_bytes())
}

/// A field of an activity or result: a number or a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    Str(String),
}

fn write_fields<W: Write + ?Sized>(w: &mut W, fields: &[Field]) -> io::Result<()> {
    wire::write_u64(w, fields.len() as u64)?;
    for f in fields {
        match f {
            Field::Int(n) => {
                wire::write_u64(w, 0)?;
                wire::write_u64(w, *n)?;
            }
            Field::Str(s) => {
                wire::write_u64(w, 1)?;
                wire::write_bytes(w, s.as_bytes())?;
            }
        }
    }
    Ok(())
}

fn read_fields<R: Read + ?Sized>(r: &mut R) -> Result<Vec<Field>, WireError> {
    let n = wire::read_count(r, "log fields")?;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        match wire::read_u64(r)? {
            0 => out.push(Field::Int(wire::read_u64(r)?)),
            _ => out.push(Field::Str(wire::read_string(r)?)),
        }
    }
    Ok(out)
}

/// Nix's activity type for a build (`actBuild`) and its log-line result
/// (`resBuildLogLine`).
pub const ACT_BUILD: u64 = 105;
pub const RES_BUILD_LOG_LINE: u64 = 101;

pub fn write_start_activity<W: Write + ?Sized>(
    w: &mut W,
    id: u64,
    level: u64,
    kind: u64,
    text: &str,
    fields: &[Field],
    parent: u64,
) -> io::Result<()> {
    wire::write_u64(w, STDERR_START_ACTIVITY)?;
    wire::write_u64(w, id)?;
    wire::write_u64(w, level)?;
    wire::write_u64(w, kind)?;
    wire::write_bytes(w, text.as_bytes())?;
    write_fields(w, fields)?;
    wire::write_u64(w, parent)
}

pub fn write_stop_activity<W: Write + ?Sized>(w: &mut W, id: u64) -> io::Result<()> {
    wire::write_u64(w, STDERR_STOP_ACTIVITY)?;
    wire::write_u64(w, id)
}

pub fn write_result<W: Write + ?Sized>(
    w: &mut W,
    id: u64,
    kind: u64,
    fields: &[Field],
) -> io::Result<()> {
    wire::write_u64(w, STDERR_RESULT)?;
    wire::write_u64(w, id)?;
    wire::write_u64(w, kind)?;
    write_fields(w, fields)
}

/// One message of the log stream, as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogMessage {
    Next(String),
    /// The server wants up to this many bytes of the client's data.
    Read(u64),
    Write(Vec<u8>),
    Last,
    Error {
        message: String,
        status: u64,
    },
    StartActivity {
        id: u64,
        level: u64,
        kind: u64,
        text: String,
        fields: Vec<Field>,
        parent: u64,
    },
    StopActivity {
        id: u64,
    },
    Result {
        id: u64,
        kind: u64,
        fields: Vec<Field>,
    },
}

/// Reads one log message (client side).
pub fn read_log_message<R: Read + ?Sized>(
    r: &mut R,
    version: Version,
) -> Result<LogMessage, DecodeError> {
    let code = wire::read_u64(r)?;
    Ok(match code {
        STDERR_NEXT => {
            LogMessage::Next(String::from_utf8_lossy(&wire::read_bytes(r)?).into_owned())
        }
        STDERR_READ => LogMessage::Read(wire::read_u64(r)?),
        STDERR_WRITE => LogMessage::Write(wire::read_bytes(r)?),
        STDERR_LAST => LogMessage::Last,
        STDERR_ERROR if minor(version) >= 26 => {
            let _kind = wire::read_string(r)?;
            let _level = wire::read_u64(r)?;
            let _name = wire::read_string(r)?;
            let message = String::from_utf8_lossy(&wire::read_bytes(r)?).into_owned();
            if wire::read_u64(r)? != 0 {
                // A position: file, line, column.
                wire::read_string(r)?;
                wire::read_u64(r)?;
                wire::read_u64(r)?;
            }
            let traces = wire::read_count(r, "error traces")?;
            for _ in 0..traces {
                if wire::read_u64(r)? != 0 {
                    wire::read_string(r)?;
                    wire::read_u64(r)?;
                    wire::read_u64(r)?;
                }
                wire::read_string(r)?;
            }
            LogMessage::Error { message, status: 1 }
        }
        STDERR_ERROR => {
            let message = String::from_utf8_lossy(&wire::read_bytes(r)?).into_owned();
            let status = wire::read_u64(r)?;
            LogMessage::Error { message, status }
        }
        STDERR_START_ACTIVITY => LogMessage::StartActivity {
            id: wire::read_u64(r)?,
            level: wire::read_u64(r)?,
            kind: wire::read_u64(r)?,
            text: wire::read_string(r)?,
            fields: read_fields(r)?,
            parent: wire::read_u64(r)?,
        },
        STDERR_STOP_ACTIVITY => LogMessage::StopActivity {
            id: wire::read_u64(r)?,
        },
        STDERR_RESULT => LogMessage::Result {
            id: wire::read_u64(r)?,
            kind: wire::read_u64(r)?,
            fields: read_fields(r)?,
        },
        other => {
            return Err(DecodeError::BadValue {
                given: format!("{other:#x}"),
                what: "log message code",
                reason: "unknown code".into(),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(store: &StoreDir) -> PathInfo {
        let path = store
            .parse_path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-konsole-18.12.3")
            .unwrap();
        let mut info = PathInfo::new(path.clone(), Hash::digest(HashAlgo::Sha256, b"x"), 1234);
        info.references.insert(path);
        info.registration_time = 1_700_000_000;
        info.sigs.insert("cache:abc".into());
        info.ultimate = true;
        info
    }

    #[test]
    fn path_info_round_trips_in_old_and_new_versions() {
        let store = StoreDir::default();
        for v in [(1 << 8) | 15, (1 << 8) | 21, PROTOCOL_VERSION] {
            let info = sample(&store);
            let mut buf = Vec::new();
            write_path_info(&mut buf, &store, &info, v).unwrap();
            let back = read_path_info(&mut &buf[..], &store, v).unwrap();
            if minor(v) >= 16 {
                assert_eq!(back, info);
            } else {
                assert_eq!(back.references, info.references);
                assert!(back.sigs.is_empty());
            }
        }
    }

    #[test]
    fn derived_paths_parse_and_print() {
        let store = StoreDir::default();
        let s = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv!out,dev";
        let d = DerivedPath::parse(&store, s).unwrap();
        assert_eq!(d.to_string(&store), s);
        let all = DerivedPath::parse(
            &store,
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv!*",
        )
        .unwrap();
        assert!(matches!(&all, DerivedPath::Built { outputs, .. } if outputs.is_empty()));
        assert!(DerivedPath::parse(&store, "/tmp/x").is_err());
    }

    #[test]
    fn errors_are_framed_for_each_version() {
        for v in [(1 << 8) | 21, PROTOCOL_VERSION] {
            let mut buf = Vec::new();
            write_error(&mut buf, v, "boom", 1).unwrap();
            match read_log_message(&mut &buf[..], v).unwrap() {
                LogMessage::Error { message, .. } => assert_eq!(message, "boom"),
                other => panic!("{other:?}"),
            }
        }
    }
}
