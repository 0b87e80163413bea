//! The `nix-store --serve` protocol (versions 2.5 – 2.8): what `ssh://`
//! stores and remote builders speak over SSH's stdin/stdout. Server side
//! ([`serve`]) for `store-daemon --serve [--write]`.
//!
//! Unlike the daemon protocol there is no log framing: each command gets
//! its answer directly, and failures of builds travel inside the answer.

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Read, Write};

use kiln_formats::hash::HashFormat;
use kiln_formats::nar;
use kiln_formats::store_path::StorePath;
use kiln_scheduler::result::{BuildResult, BuildStatus};
use kiln_store::{AddOptions, Store, compute_closure};

use std::sync::Arc;

use kiln_scheduler::events::Quiet;
use kiln_scheduler::goals::{self, RunOptions, Wanted};
use kiln_scheduler::local::LocalBackend;

use crate::server::{Daemon, SentDerivation};
use crate::wire::{self, WireError};
use crate::worker::{self, DecodeError, DerivedPath};

pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// 2.8, the newest.
pub const SERVE_PROTOCOL_VERSION: u64 = (2 << 8) | 8;
const MIN_SERVE_VERSION: u64 = (2 << 8) | 5;

/// Why a serve session ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("malformed request: {0}")]
    Decode(#[from] DecodeError),
    #[error(
        "client sent magic {0:#x}, expected {SERVE_MAGIC_1:#x} (is it nix-store --serve's client?)"
    )]
    BadMagic(u64),
    #[error("client speaks serve protocol {}.{}, Kiln needs 2.5 to 2.8", .0 >> 8, .0 & 0xff)]
    BadVersion(u64),
    #[error("unknown serve command {0}")]
    UnknownCommand(u64),
    #[error("command {0} changes the store, which needs --write")]
    WriteNotAllowed(&'static str),
    #[error("store error: {0}")]
    Store(#[from] kiln_store::StoreError),
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
}

/// Serves one session on `input`/`output`. `write` allows commands that
/// add paths or build (`--write`).
pub fn serve<R: Read, W: Write>(
    daemon: &Daemon,
    write: bool,
    input: R,
    output: W,
) -> Result<(), ServeError> {
    // NARs pass through these: large buffers keep the syscalls per
    // megabyte few (the import pipeline and NAR dumps read and write in
    // 64 KiB pieces or more).
    let mut r = BufReader::with_capacity(256 << 10, input);
    let mut w = BufWriter::with_capacity(256 << 10, output);
    let store = daemon.store().as_ref();
    let sd = store.store_dir().clone();
    let magic = wire::read_u64(&mut r)?;
    if magic != SERVE_MAGIC_1 {
        return Err(ServeError::BadMagic(magic));
    }
    wire::write_u64(&mut w, SERVE_MAGIC_2)?;
    wire::write_u64(&mut w, SERVE_PROTOCOL_VERSION)?;
    w.flush()?;
    let client = wire::read_u64(&mut r)?;
    if client >> 8 != 2 || client < MIN_SERVE_VERSION {
        return Err(ServeError::BadVersion(client));
    }
    let version = client.min(SERVE_PROTOCOL_VERSION);
    let minor = version & 0xff;
    loop {
        let cmd = match wire::read_u64(&mut r) {
            Ok(c) => c,
            Err(e) if e.is_eof() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match cmd {
            1 => {
                let lock = wire::read_bool(&mut r)?;
                let _substitute = wire::read_bool(&mut r)?;
                let paths = worker::read_paths(&mut r, &sd)?;
                if lock && write {
                    // As `nix-store --serve`: the client is about to use
                    // these paths (as a build's inputs), so the collector
                    // must keep them while this session lasts.
                    let roots: Vec<&StorePath> = paths.iter().collect();
                    store.add_temp_roots(&roots)?;
                }
                let valid = store.query_valid_paths(&paths)?;
                worker::write_paths(&mut w, &sd, &valid)?;
            }
            2 => {
                let paths = worker::read_paths(&mut r, &sd)?;
                for p in &paths {
                    let Some(info) = store.query_path_info(p)? else {
                        continue;
                    };
                    worker::write_path(&mut w, &sd, &info.path)?;
                    worker::write_opt_path(&mut w, &sd, info.deriver.as_ref())?;
                    worker::write_paths(&mut w, &sd, &info.references)?;
                    wire::write_u64(&mut w, 0)?; // download size
                    wire::write_u64(&mut w, info.nar_size)?;
                    if minor >= 4 {
                        wire::write_bytes(
                            &mut w,
                            info.nar_hash
                                .to_typed_string(HashFormat::Nixbase32)
                                .as_bytes(),
                        )?;
                        let ca = info
                            .ca
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default();
                        wire::write_bytes(&mut w, ca.as_bytes())?;
                        wire::write_strings(&mut w, &info.sigs)?;
                    }
                }
                wire::write_bytes(&mut w, b"")?;
            }
            3 => {
                let path = worker::read_path(&mut r, &sd)?;
                store.path_info_or_error(&path)?;
                let real = store.real_path(&path);
                nar::dump_path(&real, &mut w)
                    .map_err(|e| io::Error::other(format!("dumping '{}': {e}", real.display())))?;
            }
            4 => {
                if !write {
                    return Err(ServeError::WriteNotAllowed("ImportPaths"));
                }
                store.import_paths(&mut r)?;
                wire::write_u64(&mut w, 1)?;
            }
            5 => {
                let _sign = wire::read_bool(&mut r)?;
                let paths = worker::read_paths(&mut r, &sd)?;
                kiln_store::export::export_paths(store, &paths, &mut w)?;
            }
            6 => {
                if !write {
                    return Err(ServeError::WriteNotAllowed("BuildPaths"));
                }
                let targets = worker::read_derived_paths(&mut r, &sd)?;
                let settings = read_build_options(&mut r, minor, daemon)?;
                let results = build(daemon, settings, &targets);
                let failed: Vec<&BuildResult> =
                    results.iter().filter(|r| !r.status.is_success()).collect();
                if failed.is_empty() {
                    wire::write_u64(&mut w, 0)?;
                } else {
                    let status = kiln_scheduler::result::exit_code(failed.iter().copied()) as u64;
                    wire::write_u64(&mut w, status.max(1))?;
                    let msg: Vec<&str> = failed.iter().map(|r| r.error.as_str()).collect();
                    wire::write_bytes(&mut w, msg.join("\n").as_bytes())?;
                }
            }
            7 => {
                let include_outputs = wire::read_bool(&mut r)?;
                let paths = worker::read_paths(&mut r, &sd)?;
                let closure = compute_closure(store, &paths, false, include_outputs, false)?;
                worker::write_paths(&mut w, &sd, &closure)?;
            }
            8 => {
                if !write {
                    return Err(ServeError::WriteNotAllowed("BuildDerivation"));
                }
                let drv_path = worker::read_path(&mut r, &sd)?;
                let basic = worker::read_basic_derivation(&mut r, &sd)?;
                let settings = read_build_options(&mut r, minor, daemon)?;
                let result = build_sent(daemon, settings, drv_path, &basic);
                wire::write_u64(&mut w, result.status as u64)?;
                wire::write_bytes(&mut w, result.error.as_bytes())?;
                if minor >= 3 {
                    wire::write_u64(&mut w, u64::from(result.status == BuildStatus::Built))?;
                    wire::write_bool(&mut w, false)?;
                    wire::write_u64(&mut w, result.start_time.max(0) as u64)?;
                    wire::write_u64(&mut w, result.stop_time.max(0) as u64)?;
                }
                if minor >= 6 {
                    wire::write_u64(&mut w, 0)?; // built outputs: no realisations
                }
            }
            9 => {
                if !write {
                    return Err(ServeError::WriteNotAllowed("AddToStoreNar"));
                }
                let path = worker::read_path(&mut r, &sd)?;
                let info =
                    worker::read_path_info_unkeyed(&mut r, &sd, path, worker::PROTOCOL_VERSION)?;
                let mut limited = BufReader::new((&mut r).take(info.nar_size));
                let added = store.add_nar(&info, &mut limited, AddOptions::default());
                io::copy(&mut limited, &mut io::sink())?;
                added?;
                wire::write_u64(&mut w, 1)?;
            }
            other => return Err(ServeError::UnknownCommand(other)),
        }
        w.flush()?;
    }
}

fn read_build_options<R: Read>(
    r: &mut R,
    minor: u64,
    daemon: &Daemon,
) -> Result<kiln_scheduler::settings::Settings, ServeError> {
    let mut settings = daemon.settings().clone();
    let secs = |n: u64| (n > 0).then(|| std::time::Duration::from_secs(n));
    settings.max_silent_time = secs(wire::read_u64(r)?);
    settings.timeout = secs(wire::read_u64(r)?);
    if minor >= 2 {
        let max_log = wire::read_u64(r)?;
        settings.max_build_log_size = (max_log > 0).then_some(max_log);
    }
    if minor >= 3 {
        wire::read_u64(r)?; // nrRepeats
        wire::read_bool(r)?; // enforceDeterminism
    }
    if minor >= 7 {
        settings.keep_failed = wire::read_bool(r)?;
    }
    Ok(settings)
}

/// Builds the derivation a client sent, as `nix-store --serve` does: its
/// `.drv` need not be here, only its inputs (the client copied them).
fn build_sent(
    daemon: &Daemon,
    settings: kiln_scheduler::settings::Settings,
    drv_path: StorePath,
    basic: &worker::BasicDerivation,
) -> BuildResult {
    let store = daemon.store();
    let drv = match basic.to_derivation(store.store_dir()) {
        Ok(d) => d,
        Err(e) => return BuildResult::failure(BuildStatus::MiscFailure, e.to_string()),
    };
    let options = RunOptions {
        max_jobs: settings.max_jobs,
        keep_going: settings.keep_going,
        dry_run: false,
    };
    let local = match LocalBackend::new(store.clone(), settings) {
        Ok(l) => l,
        Err(e) => {
            return BuildResult::failure(
                BuildStatus::MiscFailure,
                format!("cannot set up building: {e}"),
            );
        }
    };
    let backend = Arc::new(SentDerivation::new(local, drv_path.clone(), drv));
    let mut report = daemon.runtime().block_on(goals::run(
        backend,
        vec![(drv_path, Wanted::All)],
        options,
        Arc::new(Quiet),
    ));
    report
        .targets
        .pop()
        .map(|(_, r)| r)
        .unwrap_or_else(|| BuildResult::failure(BuildStatus::MiscFailure, "no result"))
}

fn build(
    daemon: &Daemon,
    settings: kiln_scheduler::settings::Settings,
    targets: &[DerivedPath],
) -> Vec<BuildResult> {
    let store = daemon.store().clone();
    let mut drvs = Vec::new();
    let mut results: Vec<Option<BuildResult>> = Vec::new();
    for t in targets {
        match t {
            DerivedPath::Opaque(p) => results.push(Some(match store.is_valid_path(p) {
                Ok(true) => BuildResult::success(BuildStatus::AlreadyValid, BTreeMap::new()),
                _ => BuildResult::failure(
                    BuildStatus::MiscFailure,
                    format!("path '{}' is not valid", store.store_dir().print_path(p)),
                ),
            })),
            DerivedPath::Built { drv, outputs } => {
                let wanted = if outputs.is_empty() {
                    kiln_scheduler::goals::Wanted::All
                } else {
                    kiln_scheduler::goals::Wanted::Names(outputs.iter().cloned().collect())
                };
                drvs.push((drv.clone(), wanted));
                results.push(None);
            }
        }
    }
    let report = daemon.runtime().block_on(kiln_scheduler::build(
        store,
        settings,
        drvs,
        std::sync::Arc::new(kiln_scheduler::events::Quiet),
    ));
    let mut by_drv: BTreeMap<StorePath, BuildResult> = match report {
        Ok(r) => r.targets.into_iter().collect(),
        Err(e) => {
            let failure = BuildResult::failure(BuildStatus::MiscFailure, e.to_string());
            return targets.iter().map(|_| failure.clone()).collect();
        }
    };
    targets
        .iter()
        .zip(results)
        .map(|(t, r)| match (t, r) {
            (_, Some(r)) => r,
            (DerivedPath::Built { drv, .. }, None) => by_drv
                .remove(drv)
                .unwrap_or_else(|| BuildResult::failure(BuildStatus::MiscFailure, "no result")),
            (DerivedPath::Opaque(_), None) => {
                BuildResult::failure(BuildStatus::MiscFailure, "no result")
            }
        })
        .collect()
}
