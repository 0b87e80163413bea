//! The daemon's side of the worker protocol: the handshake, then one
//! operation after another, each answered through the log framing.
//!
//! A connection is served by blocking code on a stream: every operation is
//! store work (SQLite, file trees, hashing), so the whole connection runs
//! on one blocking thread (the binary puts it on `spawn_blocking`), and the
//! async scheduler is entered only for builds, through the runtime handle.
//!
//! Errors come in two kinds. An operation that fails (an invalid path, a
//! failed build, a refused request) is reported to the client with
//! `STDERR_ERROR` and the connection goes on. A request that cannot be
//! read (malformed, unknown operation, a peer that went away) leaves the
//! stream out of step: the client gets an error if it can still hear one,
//! and the connection closes. Neither ever takes the daemon down.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar;
use kiln_formats::signature::{Signature, TrustedKeys};
use kiln_formats::store_path::{FileIngestionMethod, StoreDir, StorePath, StorePathSet};
use kiln_scheduler::events::{Event, EventSink};
use kiln_scheduler::goals::{
    self, Attempt, Backend, Cancel, Job, Loaded, RunOptions, RunReport, Wanted,
};
use kiln_scheduler::hook::HookBuild;
use kiln_scheduler::local::{LocalBackend, LocalDrv, OutputLocks, Rebuild};
use kiln_scheduler::result::{BuildResult, BuildStatus};
use kiln_scheduler::settings::Settings;
use kiln_store::local::gc::{GcAction, GcOptions};
use kiln_store::local::{LocalStore, TempRootsSession};
use kiln_store::{AddOptions, PathInfo, Store, StoreError};

use crate::wire::{self, FramedReader, WireError};
use crate::worker::{self, BuildMode, DecodeError, DerivedPath, Op, Version, minor};

/// Why a connection ended in error (the daemon itself goes on).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("malformed request: {0}")]
    Decode(#[from] DecodeError),
    #[error(
        "client sent magic {got:#x}, expected {:#x} (is it a Nix daemon client?)",
        worker::WORKER_MAGIC_1
    )]
    BadMagic { got: u64 },
    #[error("client speaks protocol {}.{}, Kiln needs at least 1.21 (Nix 2.3)", .0 >> 8, .0 & 0xff)]
    TooOld(u64),
    #[error("client sent unknown operation {0}")]
    UnknownOp(u64),
    #[error("cannot keep the connection's temporary roots: {0}")]
    TempRoots(#[from] StoreError),
    #[error("connection error while writing a reply: {0}")]
    Io(#[from] io::Error),
}

/// Why one operation failed.
enum OpError {
    /// Told to the client; the connection goes on.
    Failed { message: String, status: u64 },
    /// The stream is out of step or gone: the connection ends.
    Fatal(ServerError),
}

impl OpError {
    fn failed(message: impl Into<String>) -> OpError {
        OpError::Failed {
            message: message.into(),
            status: 1,
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        OpError::failed(e.to_string())
    }
}

impl From<DecodeError> for OpError {
    fn from(e: DecodeError) -> OpError {
        OpError::Fatal(e.into())
    }
}

impl From<WireError> for OpError {
    fn from(e: WireError) -> OpError {
        OpError::Fatal(e.into())
    }
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> OpError {
        OpError::Fatal(e.into())
    }
}

type OpResult = Result<(), OpError>;

/// What a daemon serves: one local store, its build settings, and the
/// runtime its builds run on.
#[derive(Debug)]
pub struct Daemon {
    store: Arc<LocalStore>,
    settings: Settings,
    runtime: tokio::runtime::Handle,
    pub(crate) answers: crate::fast::AnswerCache,
}

impl Daemon {
    pub fn new(
        store: Arc<LocalStore>,
        settings: Settings,
        runtime: tokio::runtime::Handle,
    ) -> Daemon {
        let answers =
            crate::fast::AnswerCache::new(store.real_store_dir(), store.store_dir().as_str());
        Daemon {
            store,
            settings,
            runtime,
            answers,
        }
    }

    pub fn store(&self) -> &Arc<LocalStore> {
        &self.store
    }

    /// The build settings clients start from.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Serves one client until it hangs up. `trusted` says whether it is a
    /// trusted user (see [`crate::trust`]). Blocking.
    pub fn serve_connection<R: Read, W: Write>(
        &self,
        trusted: bool,
        input: R,
        output: W,
    ) -> Result<(), ServerError> {
        let mut state = ConnState::new(trusted, self.settings.clone());
        self.serve_blocking(&mut state, input, output, false, None)
            .map(drop)
    }

    /// Serves operations on the calling (blocking) thread, beginning with
    /// the handshake if `state` has not had it. With `hand_back`, returns
    /// the code of the first operation the async side answers itself
    /// (see [`crate::fast`]) together with the bytes read after it;
    /// `None` when the client hung up.
    pub(crate) fn serve_blocking<R: Read, W: Write>(
        &self,
        state: &mut ConnState,
        input: R,
        output: W,
        hand_back: bool,
        hangup_fd: Option<std::os::fd::RawFd>,
    ) -> Result<Option<(u64, Vec<u8>)>, ServerError> {
        if state.temp_roots.is_none() {
            state.temp_roots = Some(self.store.temp_roots_session()?);
        }
        let temp_roots = state.temp_roots.clone().expect("made above");
        // What the store roots while serving this client (paths it adds or
        // copies) is the connection's, as in Nix's process per client.
        let _entered = temp_roots.enter();
        let mut conn = Connection {
            daemon: self,
            store_dir: self.store.store_dir().clone(),
            r: BufReader::with_capacity(64 << 10, input),
            w: BufWriter::with_capacity(64 << 10, output),
            version: state.version,
            trusted: state.trusted,
            settings: std::mem::take(&mut state.settings),
            hand_back,
            hangup_fd,
            temp_roots,
            verbosity: state.verbosity,
        };
        let result = (|| {
            if !state.handshake_done {
                conn.handshake()?;
                state.handshake_done = true;
            }
            conn.serve()
        })();
        state.version = conn.version;
        state.verbosity = conn.verbosity;
        state.settings = std::mem::take(&mut conn.settings);
        let code = result?;
        conn.w.flush()?;
        Ok(code.map(|code| (code, conn.r.buffer().to_vec())))
    }
}

/// What a connection carries from one operation to the next.
#[derive(Debug)]
pub(crate) struct ConnState {
    pub(crate) version: Version,
    pub(crate) trusted: bool,
    pub(crate) settings: Settings,
    pub(crate) handshake_done: bool,
    /// The connection's temporary roots, released when it ends (made on
    /// its first operation).
    pub(crate) temp_roots: Option<TempRootsSession>,
    /// How much the client wants to hear (`SetOptions`), on Nix's scale.
    pub(crate) verbosity: u64,
}

impl ConnState {
    pub(crate) fn new(trusted: bool, settings: Settings) -> ConnState {
        ConnState {
            version: worker::PROTOCOL_VERSION,
            trusted,
            settings,
            handshake_done: false,
            temp_roots: None,
            verbosity: LVL_INFO,
        }
    }
}

struct Connection<'d, R: Read, W: Write> {
    daemon: &'d Daemon,
    store_dir: StoreDir,
    r: BufReader<R>,
    w: BufWriter<W>,
    version: Version,
    trusted: bool,
    settings: Settings,
    /// Return to the caller at operations the async side answers.
    hand_back: bool,
    /// The client's socket, watched for a hang-up while builds run.
    hangup_fd: Option<std::os::fd::RawFd>,
    temp_roots: TempRootsSession,
    verbosity: u64,
}

/// Nix's verbosity of its progress messages ("finding garbage collector
/// roots...", "deleting '…'"): shown unless the client asked for quiet.
const LVL_INFO: u64 = 3;

/// Settings an untrusted client may still set, as in Nix: they only limit
/// the client's own builds.
const UNTRUSTED_SETTINGS: &[&str] = &[
    "max-silent-time",
    "build-max-silent-time",
    "timeout",
    "build-timeout",
    "max-build-log-size",
    "connect-timeout",
    "keep-going",
    "keep-failed",
    "narinfo-cache-negative-ttl",
    "narinfo-cache-positive-ttl",
];

impl<R: Read, W: Write> Connection<'_, R, W> {
    fn handshake(&mut self) -> Result<(), ServerError> {
        let magic = wire::read_u64(&mut self.r)?;
        if magic != worker::WORKER_MAGIC_1 {
            return Err(ServerError::BadMagic { got: magic });
        }
        wire::write_u64(&mut self.w, worker::WORKER_MAGIC_2)?;
        wire::write_u64(&mut self.w, worker::PROTOCOL_VERSION)?;
        self.w.flush()?;
        let client = wire::read_u64(&mut self.r)?;
        if client >> 8 != 1 || client < worker::MIN_PROTOCOL_VERSION {
            return Err(ServerError::TooOld(client));
        }
        self.version = client.min(worker::PROTOCOL_VERSION);
        if minor(self.version) >= 38 {
            let _client_features = wire::read_strings(&mut self.r)?;
            wire::write_strings(&mut self.w, worker::FEATURES)?;
            self.w.flush()?;
        }
        if minor(self.version) >= 14 && wire::read_bool(&mut self.r)? {
            wire::read_u64(&mut self.r)?; // CPU affinity: obsolete
        }
        if minor(self.version) >= 11 {
            wire::read_u64(&mut self.r)?; // reserveSpace: obsolete
        }
        if minor(self.version) >= 33 {
            wire::write_bytes(&mut self.w, worker::DAEMON_VERSION_STRING.as_bytes())?;
        }
        if minor(self.version) >= 35 {
            wire::write_u64(&mut self.w, if self.trusted { 1 } else { 2 })?;
        }
        wire::write_u64(&mut self.w, worker::STDERR_LAST)?;
        self.w.flush()?;
        Ok(())
    }

    fn serve(&mut self) -> Result<Option<u64>, ServerError> {
        // The first operation is this side's in any case: the async side
        // sends here what it could not answer.
        let mut first = true;
        loop {
            let code = match wire::read_u64(&mut self.r) {
                Ok(code) => code,
                Err(e) if e.is_eof() => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if self.hand_back && !first && crate::fast::answers_itself(code, self.version) {
                return Ok(Some(code));
            }
            first = false;
            let Some(op) = Op::from_code(code) else {
                // Its arguments are unknown, so the stream cannot be resynchronised.
                let _ = self.send_error(&format!("invalid worker operation {code}"), 1);
                return Err(ServerError::UnknownOp(code));
            };
            let span = tracing::debug_span!("op", ?op);
            let _guard = span.enter();
            let outcome = self.op(op);
            if !crate::fast::keeps_answers(op) {
                // Whatever this changed (signatures, deletions, repairs)
                // must not be answered from before.
                self.daemon.answers.forget_all();
            }
            match outcome {
                Ok(()) => {}
                Err(OpError::Failed { message, status }) => {
                    tracing::debug!(%message, "operation failed");
                    self.send_error(&message, status)?;
                }
                Err(OpError::Fatal(e)) => {
                    let _ = self.send_error(&e.to_string(), 1);
                    return Err(e);
                }
            }
            self.w.flush()?;
        }
    }

    fn send_error(&mut self, message: &str, status: u64) -> io::Result<()> {
        worker::write_error(&mut self.w, self.version, message, status)?;
        self.w.flush()
    }

    /// Ends the log stream of a successful operation; its answer follows.
    fn last(&mut self) -> io::Result<&mut BufWriter<W>> {
        wire::write_u64(&mut self.w, worker::STDERR_LAST)?;
        Ok(&mut self.w)
    }

    fn store(&self) -> &LocalStore {
        &self.daemon.store
    }

    fn read_path(&mut self) -> Result<StorePath, DecodeError> {
        worker::read_path(&mut self.r, &self.store_dir)
    }

    fn require_trusted(&self, what: &str) -> OpResult {
        if self.trusted {
            Ok(())
        } else {
            Err(OpError::failed(format!(
                "you are not privileged to {what} (only trusted-users are)"
            )))
        }
    }

    fn op(&mut self, op: Op) -> OpResult {
        let sd = self.store_dir.clone();
        match op {
            Op::IsValidPath => {
                let path = self.read_path()?;
                // The path info, not just validity: it fills the cache the
                // async side answers from.
                let info = self.store().query_path_info(&path)?;
                if let Some(info) = &info {
                    self.remember(info);
                }
                wire::write_bool(self.last()?, info.is_some())?;
            }
            Op::QueryValidPaths => {
                let paths = worker::read_paths(&mut self.r, &sd)?;
                let substitute = minor(self.version) >= 27 && wire::read_bool(&mut self.r)?;
                let mut valid = self.store().query_valid_paths(&paths)?;
                if substitute && !self.settings.substituters.is_empty() {
                    let missing: StorePathSet = paths.difference(&valid).cloned().collect();
                    self.substitute(&missing)?;
                    valid = self.store().query_valid_paths(&paths)?;
                }
                worker::write_paths(self.last()?, &sd, &valid)?;
            }
            Op::QueryPathInfo => {
                let path = self.read_path()?;
                let info = self.store().query_path_info(&path)?;
                let version = self.version;
                if minor(version) < 17 && info.is_none() {
                    // Before 1.17 an invalid path is an error.
                    return Err(OpError::failed(format!(
                        "path '{}' is not valid",
                        sd.print_path(&path)
                    )));
                }
                if let Some(info) = &info {
                    self.remember(info);
                }
                let w = self.last()?;
                if minor(version) >= 17 {
                    wire::write_bool(w, info.is_some())?;
                    if let Some(info) = info {
                        worker::write_path_info_unkeyed(w, &sd, &info, version)?;
                    }
                } else if let Some(info) = info {
                    worker::write_path_info_unkeyed(w, &sd, &info, version)?;
                }
            }
            Op::QueryReferrers => {
                let path = self.read_path()?;
                let referrers = self.store().query_referrers(&path)?;
                worker::write_paths(self.last()?, &sd, &referrers)?;
            }
            Op::QueryPathFromHashPart => {
                let hash_part = wire::read_string(&mut self.r)?;
                let path = self.store().query_path_from_hash_part(&hash_part)?;
                worker::write_opt_path(self.last()?, &sd, path.as_ref())?;
            }
            Op::QueryAllValidPaths => {
                let all = self.store().query_all_valid_paths()?;
                worker::write_paths(self.last()?, &sd, &all)?;
            }
            Op::QueryValidDerivers => {
                let path = self.read_path()?;
                let derivers = self.store().query_valid_derivers(&path)?;
                worker::write_paths(self.last()?, &sd, &derivers)?;
            }
            Op::QueryDeriver => {
                let path = self.read_path()?;
                let info = self.store().path_info_or_error(&path)?;
                worker::write_opt_path(self.last()?, &sd, info.deriver.as_ref())?;
            }
            Op::QueryDerivationOutputs => {
                let drv = self.read_path()?;
                let outputs = self.store().query_derivation_outputs(&drv)?;
                worker::write_paths(self.last()?, &sd, outputs.values())?;
            }
            Op::QueryDerivationOutputNames => {
                let drv = self.read_path()?;
                let outputs = self.store().query_derivation_outputs(&drv)?;
                wire::write_strings(self.last()?, outputs.keys())?;
            }
            Op::QueryDerivationOutputMap => {
                let drv = self.read_path()?;
                let outputs = self.derivation_output_map(&drv)?;
                let w = self.last()?;
                wire::write_u64(w, outputs.len() as u64)?;
                for (name, path) in &outputs {
                    wire::write_bytes(w, name.as_bytes())?;
                    worker::write_path(w, &sd, path)?;
                }
            }
            Op::QueryMissing => {
                let targets = worker::read_derived_paths(&mut self.r, &sd)?;
                let (will_build, will_substitute, unknown) = self.query_missing(&targets)?;
                let w = self.last()?;
                worker::write_paths(w, &sd, &will_build)?;
                worker::write_paths(w, &sd, &will_substitute)?;
                worker::write_paths(w, &sd, &unknown)?;
                wire::write_u64(w, 0)?; // download size
                wire::write_u64(w, 0)?; // NAR size
            }
            Op::HasSubstitutes => {
                let path = self.read_path()?;
                let found = self.substitutable(&[path].into_iter().collect())?;
                wire::write_bool(self.last()?, !found.is_empty())?;
            }
            Op::QuerySubstitutablePaths => {
                let paths = worker::read_paths(&mut self.r, &sd)?;
                let found = self.substitutable(&paths)?;
                worker::write_paths(self.last()?, &sd, &found)?;
            }
            Op::QuerySubstitutablePathInfo => {
                let path = self.read_path()?;
                let info = self.substitutable_info(&path)?;
                let w = self.last()?;
                wire::write_bool(w, info.is_some())?;
                if let Some(info) = info {
                    write_substitutable(w, &sd, &info)?;
                }
            }
            Op::QuerySubstitutablePathInfos => {
                let paths: Vec<StorePath> = if minor(self.version) < 22 {
                    worker::read_paths(&mut self.r, &sd)?.into_iter().collect()
                } else {
                    let mut out = Vec::new();
                    for (path, _ca) in wire::read_string_pairs(&mut self.r)? {
                        out.push(worker::parse_path(&sd, &path)?);
                    }
                    out
                };
                let mut infos = Vec::new();
                for p in &paths {
                    if let Some(info) = self.substitutable_info(p)? {
                        infos.push(info);
                    }
                }
                let w = self.last()?;
                wire::write_u64(w, infos.len() as u64)?;
                for info in &infos {
                    worker::write_path(w, &sd, &info.path)?;
                    write_substitutable(w, &sd, info)?;
                }
            }
            Op::AddToStore => {
                if minor(self.version) >= 25 {
                    self.add_to_store_ca()?;
                } else {
                    self.add_to_store_old()?;
                }
            }
            Op::AddTextToStore => {
                let name = wire::read_string(&mut self.r)?;
                let text = wire::read_bytes(&mut self.r)?;
                let refs = worker::read_paths(&mut self.r, &sd)?;
                let info = self.store().add_text(&name, &text, &refs)?;
                worker::write_path(self.last()?, &sd, &info.path)?;
            }
            Op::AddToStoreNar => self.add_to_store_nar()?,
            Op::AddMultipleToStore => self.add_multiple_to_store()?,
            Op::AddSignatures => {
                let path = self.read_path()?;
                let sigs = wire::read_strings(&mut self.r)?;
                self.require_trusted("add signatures to paths")?;
                self.add_signatures(&path, sigs)?;
                wire::write_u64(self.last()?, 1)?;
            }
            Op::AddBuildLog => {
                let drv = self.read_path()?;
                let mut framed = FramedReader::new(&mut self.r);
                let mut log = Vec::new();
                framed
                    .by_ref()
                    .take(wire::MAX_STRING)
                    .read_to_end(&mut log)
                    .map_err(WireError::io("reading a build log"))?;
                framed
                    .drain()
                    .map_err(WireError::io("reading a build log"))?;
                self.require_trusted("add build logs")?;
                self.add_build_log(&drv, &log)?;
                wire::write_u64(self.last()?, 1)?;
            }
            Op::NarFromPath => {
                let path = self.read_path()?;
                let info = self.store().path_info_or_error(&path)?;
                self.last()?;
                // The NAR follows the end of the log stream, unframed.
                let real = self.store().real_path(&info.path);
                nar::dump_path(&real, &mut self.w).map_err(|e| {
                    OpError::Fatal(ServerError::Io(io::Error::other(format!(
                        "dumping '{}': {e}",
                        real.display()
                    ))))
                })?;
            }
            Op::BuildPaths => {
                let targets = worker::read_derived_paths(&mut self.r, &sd)?;
                let mode = if minor(self.version) >= 15 {
                    BuildMode::from_code(wire::read_u64(&mut self.r)?)?
                } else {
                    BuildMode::Normal
                };
                if mode == BuildMode::Repair {
                    self.require_trusted("repair paths")?;
                }
                let results = self.build(&targets, mode)?;
                let failed: Vec<&(DerivedPath, BuildResult)> = results
                    .iter()
                    .filter(|(_, r)| !r.status.is_success())
                    .collect();
                if !failed.is_empty() {
                    return Err(self.build_failure(&failed));
                }
                wire::write_u64(self.last()?, 1)?;
            }
            Op::BuildPathsWithResults => {
                let targets = worker::read_derived_paths(&mut self.r, &sd)?;
                let mode = BuildMode::from_code(wire::read_u64(&mut self.r)?)?;
                if mode == BuildMode::Repair {
                    self.require_trusted("repair paths")?;
                }
                let results = self.build(&targets, mode)?;
                let mut hashes = Vec::with_capacity(results.len());
                for (target, _) in &results {
                    hashes.push(match target {
                        DerivedPath::Built { drv, .. } => self.drv_hash(drv),
                        DerivedPath::Opaque(_) => None,
                    });
                }
                let version = self.version;
                let w = self.last()?;
                wire::write_u64(w, results.len() as u64)?;
                for ((target, result), hash) in results.iter().zip(&hashes) {
                    wire::write_bytes(w, target.to_string(&sd).as_bytes())?;
                    worker::write_build_result(w, &sd, result, hash.as_ref(), version)?;
                }
            }
            Op::BuildDerivation => {
                let drv_path = self.read_path()?;
                let basic = worker::read_basic_derivation(&mut self.r, &sd)?;
                let mode = BuildMode::from_code(wire::read_u64(&mut self.r)?)?;
                let result = self.build_derivation(&drv_path, &basic, mode)?;
                let hash = self.drv_hash(&drv_path);
                let version = self.version;
                let w = self.last()?;
                worker::write_build_result(w, &sd, &result, hash.as_ref(), version)?;
            }
            Op::EnsurePath => {
                let path = self.read_path()?;
                if !self.store().is_valid_path(&path)? {
                    self.substitute(&[path.clone()].into_iter().collect())?;
                }
                self.store().path_info_or_error(&path)?;
                wire::write_u64(self.last()?, 1)?;
            }
            Op::AddTempRoot => {
                let path = self.read_path()?;
                self.temp_roots.add(&[&path])?;
                wire::write_u64(self.last()?, 1)?;
            }
            Op::AddIndirectRoot => {
                let link = wire::read_string(&mut self.r)?;
                self.store().add_indirect_root(Path::new(&link))?;
                wire::write_u64(self.last()?, 1)?;
            }
            Op::AddPermRoot => {
                let path = self.read_path()?;
                let link = wire::read_string(&mut self.r)?;
                // Nix lets any user make a root through the daemon, but only
                // inside the gcroots tree for untrusted ones would be safe;
                // a root elsewhere is a symlink the daemon (root) writes.
                self.require_trusted("create permanent GC roots through the daemon")?;
                self.store().add_perm_root(&path, Path::new(&link))?;
                wire::write_bytes(self.last()?, link.as_bytes())?;
            }
            Op::SyncWithGC => {
                wire::write_u64(self.last()?, 1)?;
            }
            Op::FindRoots => {
                let roots = self.store().find_roots()?;
                let mut pairs: Vec<(String, String)> = Vec::new();
                for (path, links) in &roots {
                    for link in links {
                        pairs.push((link.display().to_string(), sd.print_path(path)));
                    }
                }
                let w = self.last()?;
                wire::write_u64(w, pairs.len() as u64)?;
                for (link, path) in &pairs {
                    wire::write_bytes(w, link.as_bytes())?;
                    wire::write_bytes(w, path.as_bytes())?;
                }
            }
            Op::CollectGarbage => {
                let action = wire::read_u64(&mut self.r)?;
                let paths = worker::read_paths(&mut self.r, &sd)?;
                let ignore_liveness = wire::read_bool(&mut self.r)?;
                let max_freed = wire::read_u64(&mut self.r)?;
                for _ in 0..3 {
                    wire::read_u64(&mut self.r)?; // obsolete fields
                }
                if ignore_liveness {
                    return Err(OpError::failed(
                        "you are not allowed to ignore liveness (Kiln never deletes live paths)",
                    ));
                }
                let action = match action {
                    0 => GcAction::ReturnLive,
                    1 => GcAction::ReturnDead,
                    2 => GcAction::DeleteDead,
                    3 => GcAction::DeleteSpecific(paths),
                    other => {
                        return Err(OpError::failed(format!(
                            "unknown garbage collector action {other} (expected 0 to 3)"
                        )));
                    }
                };
                let deleting = matches!(action, GcAction::DeleteDead | GcAction::DeleteSpecific(_));
                if deleting {
                    self.require_trusted("delete store paths")?;
                }
                let options = GcOptions {
                    action,
                    keep_outputs: self.bool_setting("keep-outputs", false),
                    keep_derivations: self.bool_setting("keep-derivations", true),
                    max_freed: if max_freed == 0 { u64::MAX } else { max_freed },
                };
                self.info("finding garbage collector roots...")?;
                let results = self.store().collect_garbage(&options)?;
                if deleting {
                    self.info("deleting garbage...")?;
                    for path in &results.paths {
                        self.info(&format!("deleting '{}'", sd.print_path(path)))?;
                    }
                }
                let w = self.last()?;
                worker::write_paths(w, &sd, &results.paths)?;
                wire::write_u64(w, results.bytes_freed)?;
                wire::write_u64(w, 0)?; // obsolete
            }
            Op::OptimiseStore => {
                self.require_trusted("optimise the store")?;
                self.store().optimise()?;
                wire::write_u64(self.last()?, 1)?;
            }
            Op::VerifyStore => {
                let check_contents = wire::read_bool(&mut self.r)?;
                let repair = wire::read_bool(&mut self.r)?;
                if repair {
                    self.require_trusted("repair the store")?;
                }
                let substituter = if repair { self.substituter()? } else { None };
                self.info("reading the Nix store...")?;
                self.info("checking path existence...")?;
                if check_contents {
                    self.info("checking store hashes...")?;
                }
                let report = self.store().verify(
                    check_contents,
                    substituter.as_ref().map(|s| s as &dyn Store),
                )?;
                for problem in &report.problems {
                    let text = match problem {
                        kiln_store::local::verify::Problem::Missing(p) => {
                            format!(
                                "path '{}' disappeared, but it still has valid referrers!",
                                sd.print_path(p)
                            )
                        }
                        kiln_store::local::verify::Problem::Modified {
                            path,
                            expected,
                            actual,
                            ..
                        } => format!(
                            "path '{}' was modified! expected hash '{}', got '{}'",
                            sd.print_path(path),
                            expected.to_typed_string(kiln_formats::hash::HashFormat::Base16),
                            actual.to_typed_string(kiln_formats::hash::HashFormat::Base16),
                        ),
                    };
                    worker::write_next(&mut self.w, &text)?;
                }
                let errors = !report.is_clean();
                wire::write_bool(self.last()?, errors)?;
            }
            Op::RegisterDrvOutput => {
                if minor(self.version) < 31 {
                    wire::read_string(&mut self.r)?;
                    self.read_path()?;
                } else {
                    wire::read_string(&mut self.r)?;
                }
                // Kiln has no content-addressed derivations (as Nix 2.8
                // without the experimental feature).
                return Err(OpError::failed(
                    "realisations are not supported (content-addressed derivations are experimental)",
                ));
            }
            Op::QueryRealisation => {
                wire::read_string(&mut self.r)?;
                wire::write_u64(self.last()?, 0)?;
            }
            Op::SetOptions => self.set_options()?,
        }
        Ok(())
    }

    /// Keeps `info`'s answer for the async side (clients from 1.17 on).
    fn remember(&self, info: &PathInfo) {
        if minor(self.version) >= 17 {
            let mut unkeyed = Vec::with_capacity(256);
            if worker::write_path_info_unkeyed(&mut unkeyed, &self.store_dir, info, self.version)
                .is_ok()
            {
                self.daemon.answers.remember(
                    self.store_dir.print_path(&info.path).into_bytes(),
                    &info.path,
                    unkeyed,
                );
            }
        }
    }

    /// A progress message at Nix's info level, if the client wants those.
    fn info(&mut self, message: &str) -> Result<(), io::Error> {
        if self.verbosity >= LVL_INFO {
            worker::write_next(&mut self.w, message)?;
        }
        Ok(())
    }

    /// The error of a `BuildPaths` with failures, as Nix's daemon gives
    /// it: one failed target's own error; with several, each is logged
    /// and the error names them all.
    fn build_failure(&mut self, failed: &[&(DerivedPath, BuildResult)]) -> OpError {
        let status = kiln_scheduler::result::exit_code(failed.iter().map(|(_, r)| r)) as u64;
        let message = match failed {
            [(_, only)] => only.error.clone(),
            _ => {
                for (_, result) in failed {
                    let error = kiln_scheduler::events::error_text(&result.error);
                    if let Err(e) = worker::write_next(&mut self.w, &error) {
                        return OpError::Fatal(ServerError::Io(e));
                    }
                }
                let names: Vec<String> = failed
                    .iter()
                    .map(|(target, _)| {
                        let path = match target {
                            DerivedPath::Built { drv, .. } => drv,
                            DerivedPath::Opaque(path) => path,
                        };
                        format!("'{}'", self.store_dir.print_path(path))
                    })
                    .collect();
                format!("build of {} failed", names.join(", "))
            }
        };
        OpError::Failed {
            message,
            status: status.max(1),
        }
    }

    fn bool_setting(&self, name: &str, default: bool) -> bool {
        match self.settings.raw.get(name).map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            _ => default,
        }
    }

    fn set_options(&mut self) -> OpResult {
        let r = &mut self.r;
        let keep_failed = wire::read_bool(r)?;
        let keep_going = wire::read_bool(r)?;
        let _try_fallback = wire::read_bool(r)?;
        let verbosity = wire::read_u64(r)?;
        let max_build_jobs = wire::read_u64(r)?;
        let max_silent_time = wire::read_u64(r)?;
        wire::read_u64(r)?; // useBuildHook: obsolete
        let _verbose_build = wire::read_u64(r)?;
        wire::read_u64(r)?; // logType: obsolete
        wire::read_u64(r)?; // printBuildTrace: obsolete
        let build_cores = wire::read_u64(r)?;
        let use_substitutes = wire::read_bool(r)?;
        let overrides = if minor(self.version) >= 12 {
            wire::read_string_pairs(r)?
        } else {
            Vec::new()
        };
        self.verbosity = verbosity;
        self.settings.keep_failed = keep_failed;
        self.settings.keep_going = keep_going;
        self.settings.max_silent_time =
            (max_silent_time > 0).then(|| Duration::from_secs(max_silent_time));
        if self.trusted {
            self.settings.max_jobs = max_build_jobs as usize;
            self.settings.cores = build_cores as usize;
        }
        if !use_substitutes {
            self.settings.substituters.clear();
        }
        for (name, value) in overrides {
            let allowed = self.trusted || UNTRUSTED_SETTINGS.contains(&name.as_str());
            if !allowed {
                worker::write_next(
                    &mut self.w,
                    &format!(
                        "warning: ignoring the client-specified setting '{name}', because it is a restricted setting and you are not a trusted user"
                    ),
                )?;
                continue;
            }
            if let Err(e) = self.settings.set(&name, &value) {
                worker::write_next(&mut self.w, &format!("warning: {e}"))?;
            }
        }
        self.last()?;
        Ok(())
    }

    fn derivation_output_map(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, OpError> {
        let recorded = self.store().query_derivation_outputs(drv)?;
        if !recorded.is_empty() {
            return Ok(recorded);
        }
        // Not registered as a valid derivation (yet): read its outputs from the file.
        let parsed = self.read_drv(drv)?;
        Ok(parsed
            .output_paths()
            .map(|(n, p)| (n.to_owned(), p.clone()))
            .collect())
    }

    fn read_drv(&self, drv: &StorePath) -> Result<kiln_derivation::Derivation, OpError> {
        let file = self.store().real_path(drv);
        let bytes = std::fs::read(&file).map_err(|e| {
            OpError::failed(format!(
                "cannot read derivation '{}': {e}",
                self.store_dir.print_path(drv)
            ))
        })?;
        kiln_derivation::aterm::parse(&self.store_dir, &bytes).map_err(|e| {
            OpError::failed(format!(
                "derivation '{}' is malformed: {e}",
                self.store_dir.print_path(drv)
            ))
        })
    }

    /// The hash modulo of a derivation in the store, for `DrvOutput` ids.
    fn drv_hash(&self, drv: &StorePath) -> Option<Hash> {
        let mut hashes = kiln_derivation::hash_modulo::DrvFileHashes::new(
            self.store_dir.clone(),
            self.store().real_store_dir(),
        );
        hashes.hash_modulo(drv).ok()
    }

    fn substituter(&self) -> Result<Option<kiln_store::substitute::Substituter>, OpError> {
        if self.settings.substituters.is_empty() {
            return Ok(None);
        }
        let urls: Vec<&str> = self
            .settings
            .substituters
            .iter()
            .map(String::as_str)
            .collect();
        let keys = TrustedKeys::parse(&self.settings.trusted_public_keys.join(" "))
            .map_err(|e| OpError::failed(format!("trusted-public-keys: {e}")))?;
        let require = self.bool_setting("require-sigs", true);
        Ok(Some(kiln_store::substitute::Substituter::open(
            &urls, keys, require,
        )?))
    }

    fn substitutable(&self, paths: &StorePathSet) -> Result<StorePathSet, OpError> {
        match self.substituter()? {
            Some(s) => Ok(s.query_substitutable_paths(paths)?),
            None => Ok(StorePathSet::new()),
        }
    }

    fn substitutable_info(&self, path: &StorePath) -> Result<Option<PathInfo>, OpError> {
        match self.substituter()? {
            Some(s) => match s.query_substitutable(path) {
                Ok(found) => Ok(found.map(|(_, info)| info)),
                Err(StoreError::BinaryCache(_)) => Ok(None),
                Err(e) => Err(e.into()),
            },
            None => Ok(None),
        }
    }

    fn substitute(&mut self, paths: &StorePathSet) -> OpResult {
        if paths.is_empty() {
            return Ok(());
        }
        let Some(s) = self.substituter()? else {
            return Ok(());
        };
        let found = s.query_substitutable_paths(paths)?;
        if !found.is_empty() {
            for p in &found {
                worker::write_next(
                    &mut self.w,
                    &format!(
                        "copying path '{}' from a substituter...",
                        self.store_dir.print_path(p)
                    ),
                )?;
            }
            self.w.flush()?;
            s.substitute_paths(self.store(), &found)?;
        }
        Ok(())
    }

    fn query_missing(
        &mut self,
        targets: &[DerivedPath],
    ) -> Result<(StorePathSet, StorePathSet, StorePathSet), OpError> {
        let mut unknown = StorePathSet::new();
        let mut will_substitute = StorePathSet::new();
        let mut drvs = Vec::new();
        let mut opaque = StorePathSet::new();
        for t in targets {
            match t {
                DerivedPath::Opaque(p) => {
                    if !self.store().is_valid_path(p)? {
                        opaque.insert(p.clone());
                    }
                }
                DerivedPath::Built { drv, outputs } => drvs.push((drv.clone(), wanted(outputs))),
            }
        }
        let substitutable = self.substitutable(&opaque)?;
        for p in opaque {
            if substitutable.contains(&p) {
                will_substitute.insert(p);
            } else {
                unknown.insert(p);
            }
        }
        let mut will_build = StorePathSet::new();
        if !drvs.is_empty() {
            let backend = self.backend(Rebuild::No, [])?;
            let options = RunOptions {
                max_jobs: self.settings.max_jobs,
                keep_going: true,
                dry_run: true,
            };
            let events: Arc<dyn EventSink> = Arc::new(kiln_scheduler::events::Quiet);
            let report = self
                .daemon
                .runtime
                .block_on(goals::run(backend, drvs, options, events));
            will_build.extend(report.would_build);
        }
        Ok((will_build, will_substitute, unknown))
    }

    fn backend(
        &self,
        mode: Rebuild,
        targets: impl IntoIterator<Item = StorePath>,
    ) -> Result<Arc<LocalBackend>, OpError> {
        let backend = LocalBackend::new(self.daemon.store.clone(), self.settings.clone())
            .map_err(|e| OpError::failed(format!("cannot set up building: {e}")))?;
        Ok(Arc::new(backend.rebuild(mode, targets)))
    }

    /// Realises `targets`: substitutes or checks plain paths, builds
    /// derivation outputs through the scheduler while its events reach the
    /// client as log lines. One result per target, in order.
    fn build(
        &mut self,
        targets: &[DerivedPath],
        mode: BuildMode,
    ) -> Result<Vec<(DerivedPath, BuildResult)>, OpError> {
        let mut opaque = StorePathSet::new();
        let mut drvs = Vec::new();
        for t in targets {
            match t {
                DerivedPath::Opaque(p) => {
                    if !self.store().is_valid_path(p)? {
                        opaque.insert(p.clone());
                    }
                }
                DerivedPath::Built { drv, outputs } => drvs.push((drv.clone(), wanted(outputs))),
            }
        }
        self.substitute(&opaque)?;
        let report = if drvs.is_empty() {
            RunReport::default()
        } else {
            let rebuild = match mode {
                BuildMode::Normal => Rebuild::No,
                BuildMode::Check => Rebuild::Check,
                BuildMode::Repair => Rebuild::Repair,
            };
            let backend = self.backend(rebuild, drvs.iter().map(|(d, _)| d.clone()))?;
            self.run_with_events(backend, drvs)?
        };
        let mut by_drv: BTreeMap<StorePath, BuildResult> = report.targets.into_iter().collect();
        let mut results = Vec::with_capacity(targets.len());
        for t in targets {
            let result = match t {
                DerivedPath::Opaque(p) => {
                    if self.store().is_valid_path(p)? {
                        BuildResult::success(BuildStatus::AlreadyValid, BTreeMap::new())
                    } else {
                        BuildResult::failure(
                            BuildStatus::MiscFailure,
                            format!(
                                "path '{}' is not valid and no substituter has it",
                                self.store_dir.print_path(p)
                            ),
                        )
                    }
                }
                DerivedPath::Built { drv, .. } => by_drv.remove(drv).unwrap_or_else(|| {
                    BuildResult::failure(BuildStatus::MiscFailure, "the scheduler gave no result")
                }),
            };
            results.push((t.clone(), result));
        }
        Ok(results)
    }

    fn run_with_events<B: Backend>(
        &mut self,
        backend: Arc<B>,
        targets: Vec<(StorePath, Wanted)>,
    ) -> Result<RunReport, OpError> {
        let (tx, rx) = mpsc::channel::<ToSend>();
        let events: Arc<dyn EventSink> = Arc::new(ToClient {
            tx,
            store_dir: self.store_dir.clone(),
            targets: targets.iter().map(|(drv, _)| drv.clone()).collect(),
            started: Default::default(),
        });
        let options = RunOptions {
            max_jobs: self.settings.max_jobs,
            keep_going: self.settings.keep_going,
            dry_run: false,
        };
        let cancel = Arc::new(goals::Cancel::default());
        let run = self.daemon.runtime.spawn(goals::run_cancellable(
            backend,
            targets,
            options,
            events,
            cancel.clone(),
        ));
        // Forward the run's log while it goes on. A client that hangs up
        // cancels it: its builds are killed and register nothing.
        let mut client_gone = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(message) => {
                    if client_gone.is_none() {
                        let sent = message.write(&mut self.w).and_then(|()| self.w.flush());
                        if let Err(e) = sent {
                            cancel.cancel();
                            client_gone = Some(e);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if client_gone.is_none() && self.peer_hung_up() {
                        tracing::info!("client hung up during a build; cancelling it");
                        cancel.cancel();
                        client_gone = Some(io::ErrorKind::BrokenPipe.into());
                    }
                    if run.is_finished() {
                        while let Ok(message) = rx.try_recv() {
                            if client_gone.is_none() {
                                let _ = message.write(&mut self.w);
                            }
                        }
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let report = self
            .daemon
            .runtime
            .block_on(run)
            .map_err(|e| OpError::failed(format!("the build run panicked: {e}")))?;
        if let Some(e) = client_gone {
            return Err(OpError::Fatal(ServerError::Io(e)));
        }
        Ok(report)
    }

    /// Whether the client closed its end (checked without reading, so a
    /// request it sent early stays unread).
    fn peer_hung_up(&self) -> bool {
        let Some(fd) = self.hangup_fd else {
            return false;
        };
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        basic: &worker::BasicDerivation,
        mode: BuildMode,
    ) -> Result<BuildResult, OpError> {
        let rebuild = match mode {
            BuildMode::Normal => Rebuild::No,
            BuildMode::Check => Rebuild::Check,
            BuildMode::Repair => Rebuild::Repair,
        };
        if self.trusted {
            // As Nix: a trusted client's derivation is built as sent; its
            // `.drv` need not be here (remote builders over `ssh-ng://`
            // are sent the derivation, not the file).
            let sent = basic
                .to_derivation(&self.store_dir)
                .map_err(|e| OpError::failed(e.to_string()))?;
            let local = LocalBackend::new(self.daemon.store.clone(), self.settings.clone())
                .map_err(|e| OpError::failed(format!("cannot set up building: {e}")))?
                .rebuild(rebuild, [drv_path.clone()]);
            let backend = Arc::new(SentDerivation::new(local, drv_path.clone(), sent));
            let mut report =
                self.run_with_events(backend, vec![(drv_path.clone(), Wanted::All)])?;
            return Ok(report.targets.pop().map(|(_, r)| r).unwrap_or_else(|| {
                BuildResult::failure(BuildStatus::MiscFailure, "the scheduler gave no result")
            }));
        }
        // An untrusted client may not have anything built into an
        // input-addressed output path. The `.drv` it names must be here
        // and agree with what it sent; then it is built from the store,
        // which is no more than a build of a path it could ask for anyway.
        // (Nix lets untrusted clients build only content-addressed
        // derivations from the wire.)
        let drv = self.read_drv(drv_path)?;
        let same_outputs = drv.output_paths().count() == basic.outputs.len()
            && drv.output_paths().all(|(name, path)| {
                basic
                    .outputs
                    .get(name)
                    .is_some_and(|(p, _, _)| p.is_empty() || *p == self.store_dir.print_path(path))
            });
        if !same_outputs
            || drv.builder != basic.builder
            || drv.args != basic.args
            || drv.system != basic.platform
        {
            return Err(OpError::failed(format!(
                "the derivation sent for '{}' differs from the one in the store",
                self.store_dir.print_path(drv_path)
            )));
        }
        let target = DerivedPath::Built {
            drv: drv_path.clone(),
            outputs: Vec::new(),
        };
        let mut results = self.build(&[target], mode)?;
        Ok(results
            .pop()
            .map(|(_, r)| r)
            .expect("one target, one result"))
    }

    /// `AddToStore` from 1.25: a content-address method, references, and
    /// the data framed.
    fn add_to_store_ca(&mut self) -> OpResult {
        let sd = self.store_dir.clone();
        let name = wire::read_string(&mut self.r)?;
        let method = wire::read_string(&mut self.r)?;
        let refs = worker::read_paths(&mut self.r, &sd)?;
        let repair = wire::read_bool(&mut self.r)?;
        let mut framed = FramedReader::new(&mut self.r);
        let result = add_framed(
            self.daemon.store.as_ref(),
            &name,
            &method,
            &refs,
            repair && self.trusted,
            &mut framed,
        );
        framed
            .drain()
            .map_err(WireError::io("reading added data"))?;
        let info = result?;
        let version = self.version;
        worker::write_path_info(self.last()?, &sd, &info, version)?;
        Ok(())
    }

    /// `AddToStore` before 1.25: the path's NAR, unframed.
    fn add_to_store_old(&mut self) -> OpResult {
        let name = wire::read_string(&mut self.r)?;
        let fixed = wire::read_bool(&mut self.r)?;
        let recursive = wire::read_u64(&mut self.r)? != 0;
        let algo_name = wire::read_string(&mut self.r)?;
        // The NAR must be read whatever happens, to stay in step.
        let mut spool =
            tempfile::tempfile().map_err(|e| OpError::failed(format!("cannot spool: {e}")))?;
        wire::copy_nar(&mut self.r, &mut BufWriter::new(&mut spool))?;
        let algo: HashAlgo = algo_name
            .parse()
            .map_err(|_| OpError::failed(format!("unknown hash algorithm '{algo_name}'")))?;
        let method = if fixed && !recursive {
            FileIngestionMethod::Flat
        } else {
            FileIngestionMethod::Recursive
        };
        let dir =
            tempfile::tempdir().map_err(|e| OpError::failed(format!("cannot unpack: {e}")))?;
        let unpacked = dir.path().join("x");
        use std::io::Seek;
        spool.rewind().map_err(|e| OpError::failed(e.to_string()))?;
        nar::restore(BufReader::new(spool), &unpacked)
            .map_err(|e| OpError::failed(format!("cannot unpack the NAR sent: {e}")))?;
        let info =
            self.store()
                .add_to_store(&name, &unpacked, method, algo, AddOptions::default())?;
        let sd = self.store_dir.clone();
        worker::write_path(self.last()?, &sd, &info.path)?;
        Ok(())
    }

    fn add_to_store_nar(&mut self) -> OpResult {
        let sd = self.store_dir.clone();
        let path = self.read_path()?;
        let mut info = worker::read_path_info_unkeyed(&mut self.r, &sd, path, self.version)?;
        let repair = wire::read_bool(&mut self.r)?;
        let dont_check_sigs = wire::read_bool(&mut self.r)?;
        let check = self.check_addable(&info, dont_check_sigs);
        if !self.trusted {
            info.ultimate = false;
        }
        let options = AddOptions {
            repair: repair && self.trusted,
            check_sigs: !dont_check_sigs || !self.trusted,
        };
        let result = if minor(self.version) >= 23 {
            let mut framed = FramedReader::new(&mut self.r);
            let res = match &check {
                Ok(()) => self
                    .daemon
                    .store
                    .add_nar(&info, &mut BufReader::new(&mut framed), options)
                    .map_err(OpError::from),
                Err(e) => Err(OpError::failed(e.clone())),
            };
            framed.drain().map_err(WireError::io("reading a NAR"))?;
            res
        } else {
            // Before 1.23 the daemon pulls the NAR with STDERR_READ.
            let mut tunnel = Tunnel {
                r: &mut self.r,
                w: &mut self.w,
            };
            let mut spool = tempfile::tempfile().map_err(|e| OpError::failed(e.to_string()))?;
            wire::copy_nar(&mut tunnel, &mut spool)?;
            use std::io::Seek;
            spool.rewind().map_err(|e| OpError::failed(e.to_string()))?;
            match &check {
                Ok(()) => self
                    .daemon
                    .store
                    .add_nar(&info, &mut BufReader::new(spool), options)
                    .map_err(OpError::from),
                Err(e) => Err(OpError::failed(e.clone())),
            }
        };
        result?;
        self.last()?;
        Ok(())
    }

    fn add_multiple_to_store(&mut self) -> OpResult {
        let sd = self.store_dir.clone();
        let repair = wire::read_bool(&mut self.r)?;
        let dont_check_sigs = wire::read_bool(&mut self.r)?;
        let version = self.version;
        let trusted = self.trusted;
        let mut framed = BufReader::new(FramedReader::new(&mut self.r));
        let mut outcome: OpResult = Ok(());
        let count = wire::read_count(&mut framed, "paths to add")?;
        if !repair {
            // The usual case (`nix copy --to`, offloading): restored several
            // at once and registered in batches, as an import stream is.
            let settings = &self.settings;
            let added = self.daemon.store.add_nar_stream(
                count as u64,
                &mut framed,
                &mut |input: &mut dyn BufRead| {
                    let mut info = worker::read_path_info(input, &sd, version).map_err(|e| {
                        StoreError::StreamRefused(format!("malformed paths to add: {e}"))
                    })?;
                    if !(trusted && dont_check_sigs) {
                        check_signed_or_ca(settings, &sd, &info)
                            .map_err(StoreError::StreamRefused)?;
                    }
                    if !trusted {
                        info.ultimate = false;
                    }
                    Ok(info)
                },
            );
            framed
                .into_inner()
                .drain()
                .map_err(WireError::io("reading paths to add"))?;
            added?;
            self.last()?;
            return Ok(());
        }
        for _ in 0..count {
            let mut info = worker::read_path_info(&mut framed, &sd, version)?;
            let check = if trusted && dont_check_sigs {
                Ok(())
            } else {
                check_signed_or_ca(&self.settings, &sd, &info)
            };
            if !trusted {
                info.ultimate = false;
            }
            let result = match check {
                Ok(()) if outcome.is_ok() => self
                    .daemon
                    .store
                    .add_nar(
                        &info,
                        &mut framed,
                        AddOptions {
                            repair: repair && trusted,
                            check_sigs: !(trusted && dont_check_sigs),
                        },
                    )
                    .map_err(OpError::from),
                Ok(()) => wire::copy_nar(&mut framed, &mut io::sink())
                    .map(drop)
                    .map_err(OpError::from),
                Err(e) => {
                    wire::copy_nar(&mut framed, &mut io::sink())?;
                    Err(OpError::failed(e))
                }
            };
            if outcome.is_ok() {
                outcome = result;
            }
        }
        framed
            .into_inner()
            .drain()
            .map_err(WireError::io("reading paths to add"))?;
        outcome?;
        self.last()?;
        Ok(())
    }

    /// Whether this client may register `info` as given: trusted clients
    /// may (unless they asked for signature checks), untrusted ones only
    /// with a valid signature by a trusted key or a content address that
    /// proves the path (which the store checks while adding).
    fn check_addable(&self, info: &PathInfo, dont_check_sigs: bool) -> Result<(), String> {
        if self.trusted && dont_check_sigs {
            return Ok(());
        }
        check_signed_or_ca(&self.settings, &self.store_dir, info)
    }

    fn add_signatures(&self, path: &StorePath, sigs: Vec<String>) -> OpResult {
        self.store().add_signatures(path, &sigs)?;
        Ok(())
    }

    fn add_build_log(&self, drv: &StorePath, log: &[u8]) -> OpResult {
        let dir = kiln_scheduler::logs::log_dir_for_state_dir(self.store().state_dir());
        let mut sink = kiln_scheduler::logs::LogSink::create(Some(&dir), drv, 0)
            .map_err(|e| OpError::failed(e.to_string()))?;
        sink.write(log)
            .map_err(|e| OpError::failed(e.to_string()))?;
        sink.finish().map_err(|e| OpError::failed(e.to_string()))?;
        Ok(())
    }
}

fn wanted(outputs: &[String]) -> Wanted {
    if outputs.is_empty() {
        Wanted::All
    } else {
        Wanted::Names(outputs.iter().cloned().collect())
    }
}

fn write_substitutable<W: Write + ?Sized>(
    w: &mut W,
    sd: &StoreDir,
    info: &PathInfo,
) -> io::Result<()> {
    worker::write_opt_path(w, sd, info.deriver.as_ref())?;
    worker::write_paths(w, sd, &info.references)?;
    wire::write_u64(w, info.nar_size)?; // download size: not known without the narinfo
    wire::write_u64(w, info.nar_size)
}

/// Untrusted additions: content-addressed paths prove themselves (the
/// store checks the content address while adding); others need a
/// signature by one of `trusted-public-keys`.
fn check_signed_or_ca(settings: &Settings, sd: &StoreDir, info: &PathInfo) -> Result<(), String> {
    if let Some(ca) = &info.ca {
        let others: StorePathSet = info.references_without_self().cloned().collect();
        let has_self = info.references.contains(&info.path);
        if ca
            .store_path(sd, info.path.name(), &others, has_self)
            .as_ref()
            == Ok(&info.path)
        {
            return Ok(());
        }
    }
    let keys = TrustedKeys::parse(&settings.trusted_public_keys.join(" ")).unwrap_or_default();
    let fingerprint = info.fingerprint(sd);
    let valid = info.sigs.iter().any(|s| {
        s.parse::<Signature>()
            .ok()
            .is_some_and(|sig| keys.verify(fingerprint.as_bytes(), &sig).is_ok())
    });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "cannot add path '{}' because it lacks a signature by a trusted key",
            sd.print_path(&info.path)
        ))
    }
}

/// Adds data sent with the 1.25+ `AddToStore`: `method` is
/// `text:sha256`, `fixed:r:<algo>`, `fixed:<algo>` (or `fixed:git:…`,
/// which Kiln does not know).
fn add_framed(
    store: &LocalStore,
    name: &str,
    method: &str,
    refs: &StorePathSet,
    repair: bool,
    data: &mut dyn Read,
) -> Result<PathInfo, OpError> {
    let bad = || {
        OpError::failed(format!(
            "unknown content-address method '{method}' (expected text:sha256, fixed:r:ALGO or fixed:ALGO)"
        ))
    };
    if let Some(algo) = method.strip_prefix("text:") {
        if algo != "sha256" {
            return Err(bad());
        }
        let mut text = Vec::new();
        data.take(wire::MAX_STRING)
            .read_to_end(&mut text)
            .map_err(|e| OpError::failed(format!("reading text: {e}")))?;
        return Ok(store.add_text(name, &text, refs)?);
    }
    let rest = method.strip_prefix("fixed:").ok_or_else(bad)?;
    let (ingestion, algo) = match rest.strip_prefix("r:") {
        Some(algo) => (FileIngestionMethod::Recursive, algo),
        None => (FileIngestionMethod::Flat, rest),
    };
    let algo: HashAlgo = algo.parse().map_err(|_| bad())?;
    if !refs.is_empty() {
        return Err(OpError::failed(
            "fixed-output paths with references cannot be added this way",
        ));
    }
    // Unpack what was sent, then add it as any fixed-output source.
    let dir = tempfile::tempdir().map_err(|e| OpError::failed(format!("cannot unpack: {e}")))?;
    let target: PathBuf = dir.path().join("x");
    match ingestion {
        FileIngestionMethod::Recursive => {
            nar::restore(BufReader::new(data), &target)
                .map_err(|e| OpError::failed(format!("cannot unpack the NAR sent: {e}")))?;
        }
        FileIngestionMethod::Flat => {
            let mut f =
                std::fs::File::create(&target).map_err(|e| OpError::failed(e.to_string()))?;
            io::copy(data, &mut f).map_err(|e| OpError::failed(format!("reading data: {e}")))?;
        }
    }
    let options = AddOptions {
        repair,
        check_sigs: false,
    };
    let info = store.add_to_store(name, &target, ingestion, algo, options)?;
    Ok(info)
}

/// Reads data the client sends on request (`STDERR_READ`), as protocols
/// before 1.23 transfer NARs.
struct Tunnel<'a, R, W: Write> {
    r: &'a mut R,
    w: &'a mut BufWriter<W>,
}

impl<R: BufRead, W: Write> Read for Tunnel<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        wire::write_u64(self.w, worker::STDERR_READ)?;
        wire::write_u64(self.w, buf.len() as u64)?;
        self.w.flush()?;
        let data = wire::read_bytes_max(self.r, "tunnelled data", buf.len() as u64)?;
        if data.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }
}

/// What a run's events become on the wire: Nix's activities (a build
/// is an `actBuild` activity whose log lines are `resBuildLogLine`
/// results), as `nix-daemon` sends them, and plain messages.
enum ToSend {
    Next(String),
    Start {
        id: u64,
        text: String,
        fields: Vec<worker::Field>,
    },
    LogLine {
        id: u64,
        line: String,
    },
    Stop {
        id: u64,
    },
}

impl ToSend {
    fn write<W: Write>(&self, w: &mut W) -> io::Result<()> {
        match self {
            ToSend::Next(text) => worker::write_next(w, text),
            ToSend::Start { id, text, fields } => {
                // Level 3 is Nix's lvlInfo, which builds are logged at.
                worker::write_start_activity(w, *id, 3, worker::ACT_BUILD, text, fields, 0)
            }
            ToSend::LogLine { id, line } => worker::write_result(
                w,
                *id,
                worker::RES_BUILD_LOG_LINE,
                &[worker::Field::Str(line.clone())],
            ),
            ToSend::Stop { id } => worker::write_stop_activity(w, *id),
        }
    }
}

/// Sends a run's events to the connection's thread.
struct ToClient {
    tx: mpsc::Sender<ToSend>,
    store_dir: StoreDir,
    /// The derivations asked for: their failures are the operation's
    /// error; any other's is logged as it happens, as Nix's daemon does.
    targets: std::collections::HashSet<StorePath>,
    /// Activities started, so that only those are stopped.
    started: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl EventSink for ToClient {
    fn event(&self, event: Event<'_>) {
        let message = match event {
            Event::BuildStarted {
                id,
                drv,
                machine,
                rebuild,
            } => {
                let path = self.store_dir.print_path(drv);
                let text =
                    kiln_scheduler::events::build_text(&self.store_dir, drv, machine, rebuild);
                self.started
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                ToSend::Start {
                    id,
                    text,
                    fields: vec![
                        worker::Field::Str(path),
                        worker::Field::Str(machine.unwrap_or("").to_owned()),
                        worker::Field::Int(1),
                        worker::Field::Int(1),
                    ],
                }
            }
            Event::LogLine { id, line } => ToSend::LogLine {
                id,
                line: String::from_utf8_lossy(line)
                    .trim_end_matches('\n')
                    .to_owned(),
            },
            Event::Finished { id, drv, result } => {
                if !result.status.is_success() && !self.targets.contains(drv) {
                    let error = kiln_scheduler::events::error_text(&result.error);
                    let _ = self.tx.send(ToSend::Next(error));
                }
                let was_started = self
                    .started
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if !was_started {
                    return;
                }
                ToSend::Stop { id }
            }
            Event::Message { text } => ToSend::Next(text.to_owned()),
            _ => return,
        };
        let _ = self.tx.send(message);
    }
}

/// One derivation a client sent whole (`BuildDerivation`, in the daemon
/// and the serve protocol), built although its `.drv` need not be in this
/// store: remote builders are sent the derivation, not the file. Its
/// input derivations' outputs come as plain inputs, so it is the only
/// goal; everything but loading it is the local backend's.
#[derive(Debug)]
pub(crate) struct SentDerivation {
    local: LocalBackend,
    drv_path: StorePath,
    drv: kiln_derivation::Derivation,
}

impl SentDerivation {
    /// `drv` comes from [`worker::BasicDerivation::to_derivation`], so
    /// every output has its path.
    pub(crate) fn new(
        local: LocalBackend,
        drv_path: StorePath,
        drv: kiln_derivation::Derivation,
    ) -> SentDerivation {
        SentDerivation {
            local,
            drv_path,
            drv,
        }
    }
}

impl Backend for SentDerivation {
    type Drv = LocalDrv;
    type Lock = OutputLocks;
    type Remote = HookBuild;

    fn store_dir(&self) -> &StoreDir {
        self.local.store_dir()
    }

    fn load(&self, drv_path: &StorePath, wanted: &Wanted) -> Result<Loaded<LocalDrv>, BuildResult> {
        if *drv_path != self.drv_path {
            return self.local.load(drv_path, wanted);
        }
        let outputs = self
            .drv
            .output_paths()
            .map(|(name, path)| (name.to_owned(), path.clone()))
            .collect();
        let options =
            kiln_derivation::BuildOptions::from_derivation(&self.drv).map_err(|e| e.to_string());
        // Valid outputs are found by the local backend's build, under the
        // output locks (and kept from `--check`/`--repair` there).
        Ok(Loaded {
            inputs: Vec::new(),
            valid: None,
            substituted: None,
            drv: LocalDrv {
                drv: self.drv.clone(),
                options,
                outputs,
            },
        })
    }

    fn build(
        &self,
        job: &Job<LocalDrv>,
        lock: Option<OutputLocks>,
        cancel: &Cancel,
        events: &dyn EventSink,
    ) -> Attempt<OutputLocks> {
        self.local.build(job, lock, cancel, events)
    }

    fn wait_for_locks(&self, job: &Job<LocalDrv>) -> Attempt<OutputLocks> {
        self.local.wait_for_locks(job)
    }

    fn finish(&self) -> Vec<(StorePath, BuildResult)> {
        self.local.finish()
    }
    // No build hook: it would be offered a `.drv` this machine may not have.
}
