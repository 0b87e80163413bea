//! The client side of the `nix-store --serve` protocol (what an `ssh://`
//! store and a remote builder speak to `nix-store --serve --write` or
//! `store-daemon --serve --write` over SSH's stdin/stdout).
//!
//! The client offers version 2.6 (Nix 2.8's): build options up to
//! `enforceDeterminism`, build results with times and built outputs.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};

use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_store::{PathInfo, Store};

use crate::serve::{SERVE_MAGIC_1, SERVE_MAGIC_2};
use crate::wire::{self, WireError};
use crate::worker::{self, BasicDerivation, DecodeError};

/// The version this client asks for.
pub const CLIENT_VERSION: u64 = (2 << 8) | 6;

/// Why a serve session failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeClientError {
    #[error(
        "remote sent magic {0:#x}, expected {SERVE_MAGIC_2:#x}: is the remote program 'nix-store --serve' or 'store-daemon --serve'?"
    )]
    BadMagic(u64),
    #[error("remote speaks serve protocol {}.{}, expected 2.x", .0 >> 8, .0 & 0xff)]
    BadVersion(u64),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("malformed answer: {0}")]
    Decode(#[from] DecodeError),
    #[error("remote refused the import (answered {0}, expected 1)")]
    ImportRefused(u64),
    #[error("local store: {0}")]
    Store(#[from] kiln_store::StoreError),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
}

/// Build options sent with `BuildDerivation`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    pub max_silent_time: u64,
    pub build_timeout: u64,
    pub max_log_size: u64,
}

/// The answer to `BuildDerivation`.
#[derive(Debug, Clone)]
pub struct RemoteBuildResult {
    /// Nix's `BuildResult::Status` number (0 built, 3 permanent failure, …).
    pub status: u64,
    pub error: String,
    pub start_time: u64,
    pub stop_time: u64,
}

impl RemoteBuildResult {
    /// Built, substituted or already valid.
    pub fn success(&self) -> bool {
        self.status <= 2
    }
}

/// One serve session on a pair of streams.
#[derive(Debug)]
pub struct ServeClient<R: Read, W: Write> {
    r: BufReader<R>,
    w: BufWriter<W>,
    store_dir: StoreDir,
    version: u64,
}

impl<R: Read, W: Write> ServeClient<R, W> {
    /// Greets the remote and agrees on a version.
    pub fn handshake(input: R, output: W, store_dir: StoreDir) -> Result<Self, ServeClientError> {
        let mut r = BufReader::with_capacity(256 * 1024, input);
        let mut w = BufWriter::with_capacity(256 * 1024, output);
        wire::write_u64(&mut w, SERVE_MAGIC_1)?;
        wire::write_u64(&mut w, CLIENT_VERSION)?;
        w.flush()?;
        let magic = wire::read_u64(&mut r)?;
        if magic != SERVE_MAGIC_2 {
            return Err(ServeClientError::BadMagic(magic));
        }
        let server = wire::read_u64(&mut r)?;
        if server >> 8 != 2 {
            return Err(ServeClientError::BadVersion(server));
        }
        Ok(ServeClient {
            r,
            w,
            store_dir,
            version: server.min(CLIENT_VERSION),
        })
    }

    /// The agreed version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Which of `paths` are valid remotely, in one round trip. `lock`
    /// asks the remote to hold them as temporary roots for the session.
    pub fn query_valid_paths(
        &mut self,
        paths: &StorePathSet,
        lock: bool,
    ) -> Result<StorePathSet, ServeClientError> {
        wire::write_u64(&mut self.w, 1)?;
        wire::write_bool(&mut self.w, lock)?;
        wire::write_bool(&mut self.w, false)?;
        worker::write_paths(&mut self.w, &self.store_dir, paths)?;
        self.w.flush()?;
        Ok(worker::read_paths(&mut self.r, &self.store_dir)?)
    }

    /// The metadata of those of `paths` that are valid remotely.
    pub fn query_path_infos(
        &mut self,
        paths: &StorePathSet,
    ) -> Result<Vec<PathInfo>, ServeClientError> {
        wire::write_u64(&mut self.w, 2)?;
        worker::write_paths(&mut self.w, &self.store_dir, paths)?;
        self.w.flush()?;
        let mut out = Vec::new();
        loop {
            let path = wire::read_string(&mut self.r)?;
            if path.is_empty() {
                break;
            }
            let path = worker::parse_path(&self.store_dir, &path)?;
            let deriver = worker::read_opt_path(&mut self.r, &self.store_dir)?;
            let references = worker::read_paths(&mut self.r, &self.store_dir)?;
            let _download_size = wire::read_u64(&mut self.r)?;
            let nar_size = wire::read_u64(&mut self.r)?;
            let hash = wire::read_string(&mut self.r)?;
            let ca = wire::read_string(&mut self.r)?;
            let sigs = wire::read_strings(&mut self.r)?;
            let mut info = PathInfo::new(path, worker::parse_nar_hash(&hash)?, nar_size);
            info.deriver = deriver;
            info.references = references;
            info.ca = worker::parse_opt_ca(&ca)?;
            info.sigs = sigs.into_iter().collect();
            out.push(info);
        }
        Ok(out)
    }

    /// Sends `paths` (closed under references on the remote, together
    /// with what it has) from `store` as one export stream, dependencies
    /// first: one command however many paths.
    pub fn import_paths(
        &mut self,
        store: &dyn Store,
        paths: &StorePathSet,
    ) -> Result<(), ServeClientError> {
        wire::write_u64(&mut self.w, 4)?;
        kiln_store::export::export_paths(store, paths, &mut self.w)?;
        self.w.flush()?;
        match wire::read_u64(&mut self.r)? {
            1 => Ok(()),
            n => Err(ServeClientError::ImportRefused(n)),
        }
    }

    /// Streams the NAR of a remote path into `out`.
    pub fn dump_store_path(
        &mut self,
        path: &StorePath,
        out: &mut dyn Write,
    ) -> Result<u64, ServeClientError> {
        wire::write_u64(&mut self.w, 3)?;
        worker::write_path(&mut self.w, &self.store_dir, path)?;
        self.w.flush()?;
        Ok(wire::copy_nar(&mut self.r, out)?)
    }

    /// A pipeline of `DumpStorePath` requests on this session, for
    /// fetching many NARs from several threads: each request goes out as
    /// soon as a thread asks, before the answers to earlier ones are read,
    /// so the remote streams NARs back to back instead of waiting one
    /// round trip per path.
    pub fn dump_pipeline(&mut self) -> DumpPipeline<'_, R, W> {
        DumpPipeline {
            send: std::sync::Mutex::new(Sender {
                w: &mut self.w,
                next: 0,
            }),
            recv: std::sync::Mutex::new(Receiver {
                r: &mut self.r,
                next: 0,
                broken: false,
            }),
            turn: std::sync::Condvar::new(),
            store_dir: &self.store_dir,
        }
    }

    /// The reader positioned at a NAR after [`Self::request_dump`], for
    /// callers that parse it themselves (a store's `add_nar`).
    pub fn request_dump(&mut self, path: &StorePath) -> Result<&mut dyn BufRead, ServeClientError> {
        wire::write_u64(&mut self.w, 3)?;
        worker::write_path(&mut self.w, &self.store_dir, path)?;
        self.w.flush()?;
        Ok(&mut self.r)
    }

    /// Builds `drv` remotely from its basic form (no `.drv` needed there).
    pub fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        options: BuildOptions,
    ) -> Result<RemoteBuildResult, ServeClientError> {
        let minor = self.version & 0xff;
        wire::write_u64(&mut self.w, 8)?;
        worker::write_path(&mut self.w, &self.store_dir, drv_path)?;
        worker::write_basic_derivation(&mut self.w, &self.store_dir, drv)?;
        wire::write_u64(&mut self.w, options.max_silent_time)?;
        wire::write_u64(&mut self.w, options.build_timeout)?;
        if minor >= 2 {
            wire::write_u64(&mut self.w, options.max_log_size)?;
        }
        if minor >= 3 {
            // Extra rounds, not rounds: 1 would build twice and compare.
            wire::write_u64(&mut self.w, 0)?; // nrRepeats
            wire::write_bool(&mut self.w, false)?; // enforceDeterminism
        }
        self.w.flush()?;
        let status = wire::read_u64(&mut self.r)?;
        let error = wire::read_string(&mut self.r)?;
        let mut result = RemoteBuildResult {
            status,
            error,
            start_time: 0,
            stop_time: 0,
        };
        if minor >= 3 {
            let _times_built = wire::read_u64(&mut self.r)?;
            let _non_deterministic = wire::read_bool(&mut self.r)?;
            result.start_time = wire::read_u64(&mut self.r)?;
            result.stop_time = wire::read_u64(&mut self.r)?;
        }
        if minor >= 6 {
            let n = wire::read_count(&mut self.r, "built outputs")?;
            for _ in 0..n {
                wire::read_string(&mut self.r)?;
                wire::read_string(&mut self.r)?;
            }
        }
        Ok(result)
    }
}

/// `DumpStorePath` requests sent ahead of their answers (see
/// [`ServeClient::dump_pipeline`]). Answers come back in request order, so
/// each request takes a ticket and its thread reads the stream when its
/// ticket is next. A NAR that could not be read whole leaves the stream
/// out of step: every later fetch then fails rather than read garbage.
pub struct DumpPipeline<'c, R: Read, W: Write> {
    send: std::sync::Mutex<Sender<'c, W>>,
    recv: std::sync::Mutex<Receiver<'c, R>>,
    turn: std::sync::Condvar,
    store_dir: &'c StoreDir,
}

impl<R: Read, W: Write> std::fmt::Debug for DumpPipeline<'_, R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DumpPipeline")
    }
}

struct Sender<'c, W: Write> {
    w: &'c mut BufWriter<W>,
    next: u64,
}

struct Receiver<'c, R: Read> {
    r: &'c mut BufReader<R>,
    next: u64,
    broken: bool,
}

impl<R: Read, W: Write> DumpPipeline<'_, R, W> {
    /// Asks for the NAR of `path` and, once the answers before it are
    /// read, streams it into `out`. Returns its size.
    pub fn fetch(&self, path: &StorePath, out: &mut dyn Write) -> Result<u64, ServeClientError> {
        let ticket = {
            let mut s = self.send.lock().unwrap_or_else(|p| p.into_inner());
            let sent = wire::write_u64(&mut *s.w, 3)
                .map_err(ServeClientError::from)
                .and_then(|()| Ok(worker::write_path(&mut *s.w, self.store_dir, path)?))
                .and_then(|()| Ok(s.w.flush()?));
            if let Err(e) = sent {
                // Our turn never comes: nobody may wait for it.
                let mut r = self.recv.lock().unwrap_or_else(|p| p.into_inner());
                r.broken = true;
                self.turn.notify_all();
                return Err(e);
            }
            s.next += 1;
            s.next - 1
        };
        let mut r = self.recv.lock().unwrap_or_else(|p| p.into_inner());
        while r.next != ticket && !r.broken {
            r = self.turn.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        if r.broken {
            return Err(ServeClientError::Io(io::Error::other(
                "an earlier NAR on this session was not read whole",
            )));
        }
        let copied = wire::copy_nar(&mut *r.r, out);
        match copied {
            Ok(_) => r.next += 1,
            Err(_) => r.broken = true,
        }
        self.turn.notify_all();
        Ok(copied?)
    }
}
