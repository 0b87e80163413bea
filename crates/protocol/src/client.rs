//! A [`Store`] that talks to a daemon over its Unix socket (`daemon`,
//! `unix://PATH`): Kiln's `store-daemon` or Nix's `nix-daemon`.
//!
//! Connections are pooled: each call takes an idle connection (or opens
//! one), so the store can be shared between threads and calls from many
//! threads run concurrently, one connection each. A store over one
//! connection made elsewhere (`ssh-ng://`) lends it to one call at a time.
//!
//! Besides the [`Store`] operations, [`DaemonStore::build_paths_with_results`]
//! asks the daemon to build (Nix's `BuildPathsWithResults`, or `BuildPaths`
//! on daemons older than 1.34) and reports each build's start, log lines and
//! end as [`BuildEvent`]s while the request runs.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use kiln_formats::hash::{HashAlgo, HashingWriter};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_scheduler::result::{BuildResult, BuildStatus};
use kiln_store::{AddOptions, PathInfo, Store, StoreError};

use crate::wire::{self, FramedWriter};
use crate::worker::{
    self, BuildMode, DecodeError, DerivedPath, LogMessage, Op, Version, WireBuildResult, minor,
};

/// The socket of the machine's daemon.
pub const DEFAULT_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// A store served by a daemon.
#[derive(Debug)]
pub struct DaemonStore {
    socket: PathBuf,
    store_dir: StoreDir,
    pool: Mutex<Pool>,
    /// A connection was put back (or dropped), for callers waiting on a
    /// store that cannot open more ([`DaemonStore::over_connection`]).
    returned: Condvar,
    /// Whether more connections can be opened to `socket`.
    can_connect: bool,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<Connection>,
    /// Connections taken and not yet put back or dropped.
    lent: usize,
}

/// One handshaken connection.
#[derive(Debug)]
pub struct Connection {
    r: BufReader<UnixStream>,
    w: BufWriter<UnixStream>,
    version: Version,
    /// The daemon's version string (from 1.33).
    pub daemon_version: Option<String>,
    /// Whether the daemon trusts us (from 1.35).
    pub trusted: Option<bool>,
}

fn stream_err(action: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Stream { action, source }
}

fn decode_err(e: DecodeError) -> StoreError {
    StoreError::Stream {
        action: "read the daemon's answer",
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

/// The action of errors the daemon reported (as opposed to a broken
/// connection).
const REMOTE_ACTION: &str = "complete the operation in the daemon";

/// The daemon reported a failure.
fn remote_err(message: String) -> StoreError {
    StoreError::Stream {
        action: REMOTE_ACTION,
        source: io::Error::other(message),
    }
}

/// Whether `error` means the daemon could not be reached or the connection
/// broke (worth trying again once the daemon is back), rather than an
/// answer of the daemon's.
pub fn is_connection_error(error: &StoreError) -> bool {
    match error {
        StoreError::Io { action, .. } => *action == "connect to the daemon socket",
        StoreError::Stream { action, .. } => *action != REMOTE_ACTION,
        _ => false,
    }
}

/// Settings a client sends (`SetOptions`) before asking for builds, as
/// Nix's `ClientSettings`. The daemon applies `max_build_jobs`,
/// `build_cores` and restricted `overrides` only for trusted clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Build what can be built when some builds fail.
    pub keep_going: bool,
    pub keep_failed: bool,
    /// Builds at once.
    pub max_build_jobs: u64,
    /// Seconds without log output before a build is killed (0: no limit).
    pub max_silent_time: u64,
    /// `NIX_BUILD_CORES` of the builds (0: all).
    pub build_cores: u64,
    pub use_substitutes: bool,
    /// Further `nix.conf` settings (`timeout`, `max-build-log-size`, …).
    pub overrides: BTreeMap<String, String>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            keep_going: false,
            keep_failed: false,
            max_build_jobs: 1,
            max_silent_time: 0,
            build_cores: 0,
            use_substitutes: true,
            overrides: BTreeMap::new(),
        }
    }
}

/// Nix's verbosity levels sent in `SetOptions`.
const LVL_ERROR: u64 = 0;
const LVL_INFO: u64 = 3;

/// What a build request reports while it runs, from the daemon's log
/// frames (`STDERR_START_ACTIVITY`, `_RESULT`, `_STOP_ACTIVITY`, `_NEXT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// A build of `drv` started as `activity`; `machine` names the remote
    /// machine when the daemon offloaded it.
    Started {
        activity: u64,
        drv: StorePath,
        machine: Option<String>,
    },
    /// A line of a build's log (without its newline).
    LogLine { activity: u64, line: String },
    /// The build `activity` of `drv` ended; how it ended comes with the
    /// request's results (or the outputs' validity tells).
    Stopped { activity: u64, drv: StorePath },
    /// A message for people (warnings, errors of dependencies).
    Message(String),
}

/// A build's result as the daemon sends it: Nix's `BuildResult` with the
/// target it answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonBuildResult {
    pub target: DerivedPath,
    /// Status, error message, start and stop time, built outputs (as the
    /// negotiated version sends them), times built, non-determinism.
    pub result: WireBuildResult,
}

/// Follows a request's build activities to turn log frames into events.
struct EventStream<'a> {
    store_dir: &'a StoreDir,
    builds: HashMap<u64, StorePath>,
    sink: &'a mut dyn FnMut(BuildEvent),
}

impl EventStream<'_> {
    /// Passes on what `message` tells about builds; false for messages
    /// that are not about builds.
    fn take(&mut self, message: &LogMessage) -> bool {
        match message {
            LogMessage::StartActivity {
                id, kind, fields, ..
            } if *kind == worker::ACT_BUILD => {
                let text = |i: usize| match fields.get(i) {
                    Some(worker::Field::Str(s)) => Some(s.as_str()),
                    _ => None,
                };
                let Some(drv) = text(0).and_then(|p| self.store_dir.parse_path(p).ok()) else {
                    return false;
                };
                let machine = text(1).filter(|m| !m.is_empty()).map(str::to_owned);
                self.builds.insert(*id, drv.clone());
                (self.sink)(BuildEvent::Started {
                    activity: *id,
                    drv,
                    machine,
                });
                true
            }
            LogMessage::Result { id, kind, fields } if *kind == worker::RES_BUILD_LOG_LINE => {
                if let Some(worker::Field::Str(line)) = fields.first() {
                    (self.sink)(BuildEvent::LogLine {
                        activity: *id,
                        line: line.trim_end_matches('\n').to_owned(),
                    });
                }
                true
            }
            LogMessage::StopActivity { id } => match self.builds.remove(id) {
                Some(drv) => {
                    (self.sink)(BuildEvent::Stopped { activity: *id, drv });
                    true
                }
                None => false,
            },
            LogMessage::Next(text) => {
                (self.sink)(BuildEvent::Message(text.trim_end_matches('\n').to_owned()));
                true
            }
            _ => false,
        }
    }
}

impl Connection {
    /// Connects to `socket` and does the handshake.
    pub fn open(socket: &Path) -> Result<Connection, StoreError> {
        let stream = UnixStream::connect(socket).map_err(|source| StoreError::Io {
            action: "connect to the daemon socket",
            path: socket.to_path_buf(),
            source,
        })?;
        Connection::over(stream)
    }

    /// Does the handshake on `stream`, a daemon's end of which is
    /// somewhere else: `nix-daemon --stdio` or `store-daemon --stdio` run
    /// over SSH with it as stdin and stdout (`ssh-ng://`).
    pub fn over(stream: UnixStream) -> Result<Connection, StoreError> {
        let w = BufWriter::new(
            stream
                .try_clone()
                .map_err(stream_err("clone the connection"))?,
        );
        let mut conn = Connection {
            r: BufReader::new(stream),
            w,
            version: worker::PROTOCOL_VERSION,
            daemon_version: None,
            trusted: None,
        };
        conn.handshake()?;
        Ok(conn)
    }

    fn handshake(&mut self) -> Result<(), StoreError> {
        let e = stream_err("do the daemon handshake");
        wire::write_u64(&mut self.w, worker::WORKER_MAGIC_1)
            .map_err(stream_err("do the daemon handshake"))?;
        self.w
            .flush()
            .map_err(stream_err("do the daemon handshake"))?;
        let magic = wire::read_u64(&mut self.r).map_err(|e| decode_err(e.into()))?;
        if magic != worker::WORKER_MAGIC_2 {
            return Err(e(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the socket answered magic {magic:#x}, not a Nix daemon's"),
            )));
        }
        let server = wire::read_u64(&mut self.r).map_err(|e| decode_err(e.into()))?;
        if server >> 8 != 1 || server < worker::MIN_PROTOCOL_VERSION {
            return Err(e(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the daemon speaks protocol {}.{}, Kiln needs 1.21 or newer",
                    server >> 8,
                    server & 0xff
                ),
            )));
        }
        self.version = server.min(worker::PROTOCOL_VERSION);
        let w = &mut self.w;
        let io_res = (|| -> io::Result<()> {
            wire::write_u64(w, worker::PROTOCOL_VERSION)?;
            Ok(())
        })();
        io_res.map_err(stream_err("do the daemon handshake"))?;
        if minor(self.version) >= 38 {
            wire::write_strings(&mut self.w, worker::FEATURES)
                .map_err(stream_err("do the daemon handshake"))?;
            self.w
                .flush()
                .map_err(stream_err("do the daemon handshake"))?;
            wire::read_strings(&mut self.r).map_err(|e| decode_err(e.into()))?;
        }
        wire::write_u64(&mut self.w, 0).map_err(stream_err("do the daemon handshake"))?; // no CPU affinity
        wire::write_u64(&mut self.w, 0).map_err(stream_err("do the daemon handshake"))?; // reserveSpace
        self.w
            .flush()
            .map_err(stream_err("do the daemon handshake"))?;
        if minor(self.version) >= 33 {
            self.daemon_version =
                Some(wire::read_string(&mut self.r).map_err(|e| decode_err(e.into()))?);
        }
        if minor(self.version) >= 35 {
            self.trusted = match wire::read_u64(&mut self.r).map_err(|e| decode_err(e.into()))? {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            };
        }
        self.process_log(None)
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Reads log messages until `STDERR_LAST`; log lines go to tracing,
    /// a daemon error becomes the result. `source` answers `STDERR_READ`.
    fn process_log(&mut self, source: Option<&mut dyn Read>) -> Result<(), StoreError> {
        self.process_log_with(source, None)
    }

    /// [`Connection::process_log`], with what is about builds passed to
    /// `events` instead of tracing.
    fn process_log_with(
        &mut self,
        mut source: Option<&mut dyn Read>,
        mut events: Option<&mut EventStream<'_>>,
    ) -> Result<(), StoreError> {
        loop {
            let message =
                worker::read_log_message(&mut self.r, self.version).map_err(decode_err)?;
            if let Some(events) = events.as_deref_mut() {
                if events.take(&message) {
                    continue;
                }
            }
            match message {
                LogMessage::Last => return Ok(()),
                LogMessage::Error { message, .. } => return Err(remote_err(message)),
                LogMessage::Next(line) => tracing::info!(target: "daemon", "{line}"),
                LogMessage::Read(n) => {
                    let mut buf = vec![0u8; n.min(1 << 20) as usize];
                    let got = match source.as_deref_mut() {
                        Some(s) => s
                            .read(&mut buf)
                            .map_err(stream_err("read data the daemon asked for"))?,
                        None => 0,
                    };
                    wire::write_bytes(&mut self.w, &buf[..got])
                        .map_err(stream_err("send data to the daemon"))?;
                    self.w
                        .flush()
                        .map_err(stream_err("send data to the daemon"))?;
                }
                LogMessage::Write(data) => {
                    tracing::debug!(target: "daemon", bytes = data.len(), "daemon wrote data")
                }
                LogMessage::StartActivity { text, .. } if !text.is_empty() => {
                    tracing::info!(target: "daemon", "{text}")
                }
                LogMessage::Result { fields, .. } => {
                    for f in fields {
                        if let worker::Field::Str(s) = f {
                            tracing::info!(target: "daemon", "{s}");
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn send_op(
        &mut self,
        op: Op,
        args: impl FnOnce(&mut BufWriter<UnixStream>) -> io::Result<()>,
    ) -> Result<(), StoreError> {
        wire::write_u64(&mut self.w, op as u64)
            .map_err(stream_err("send a request to the daemon"))?;
        args(&mut self.w).map_err(stream_err("send a request to the daemon"))?;
        self.w
            .flush()
            .map_err(stream_err("send a request to the daemon"))?;
        Ok(())
    }

    /// Sends `op`, processes the log, and reads the answer with `answer`.
    fn call<T>(
        &mut self,
        op: Op,
        args: impl FnOnce(&mut BufWriter<UnixStream>) -> io::Result<()>,
        answer: impl FnOnce(&mut BufReader<UnixStream>, Version) -> Result<T, DecodeError>,
    ) -> Result<T, StoreError> {
        self.send_op(op, args)?;
        self.process_log(None)?;
        answer(&mut self.r, self.version).map_err(decode_err)
    }

    /// Sends the client settings (`SetOptions`); they hold for the later
    /// operations of this connection.
    pub fn set_options(&mut self, options: &BuildOptions) -> Result<(), StoreError> {
        let version = self.version;
        self.send_op(Op::SetOptions, |w| {
            wire::write_bool(w, options.keep_failed)?;
            wire::write_bool(w, options.keep_going)?;
            wire::write_bool(w, false)?; // tryFallback
            wire::write_u64(w, LVL_INFO)?;
            wire::write_u64(w, options.max_build_jobs)?;
            wire::write_u64(w, options.max_silent_time)?;
            wire::write_u64(w, 1)?; // useBuildHook: obsolete
            wire::write_u64(w, LVL_ERROR)?; // build output at error level: always shown
            wire::write_u64(w, 0)?; // logType: obsolete
            wire::write_u64(w, 0)?; // printBuildTrace: obsolete
            wire::write_u64(w, options.build_cores)?;
            wire::write_bool(w, options.use_substitutes)?;
            if minor(version) >= 12 {
                wire::write_u64(w, options.overrides.len() as u64)?;
                for (name, value) in &options.overrides {
                    wire::write_bytes(w, name.as_bytes())?;
                    wire::write_bytes(w, value.as_bytes())?;
                }
            }
            Ok(())
        })?;
        self.process_log(None)
    }

    fn write_targets(
        &mut self,
        op: Op,
        store_dir: &StoreDir,
        targets: &[DerivedPath],
        mode: BuildMode,
    ) -> Result<(), StoreError> {
        let version = self.version;
        self.send_op(op, |w| {
            // Before 1.30 a derivation's path alone asks for all its outputs.
            let texts: Vec<String> = targets
                .iter()
                .map(|t| match t {
                    DerivedPath::Built { drv, .. } if minor(version) < 30 => {
                        store_dir.print_path(drv)
                    }
                    t => t.to_string(store_dir),
                })
                .collect();
            wire::write_strings(w, &texts)?;
            if minor(version) >= 15 {
                wire::write_u64(w, build_mode_code(mode))?;
            }
            Ok(())
        })
    }

    /// `BuildPathsWithResults` (from 1.34): builds `targets` and returns
    /// one result per target, in the order of `targets`; `events` hears of
    /// each build as it goes.
    pub fn build_paths_with_results(
        &mut self,
        store_dir: &StoreDir,
        targets: &[DerivedPath],
        mode: BuildMode,
        events: &mut dyn FnMut(BuildEvent),
    ) -> Result<Vec<DaemonBuildResult>, StoreError> {
        self.write_targets(Op::BuildPathsWithResults, store_dir, targets, mode)?;
        let mut stream = EventStream {
            store_dir,
            builds: HashMap::new(),
            sink: events,
        };
        self.process_log_with(None, Some(&mut stream))?;
        let read = |r: &mut BufReader<UnixStream>, version| {
            let count = wire::read_count(r, "build results")?;
            let mut results = Vec::with_capacity(count.min(targets.len()));
            for _ in 0..count {
                let target = DerivedPath::parse(store_dir, &wire::read_string(r)?)?;
                let result = worker::read_wire_build_result(r, store_dir, version)?;
                results.push(DaemonBuildResult { target, result });
            }
            Ok::<_, DecodeError>(results)
        };
        let mut results = read(&mut self.r, self.version).map_err(decode_err)?;
        // Nix 2.8 answers in its goals' order, not the request's.
        let mut ordered = Vec::with_capacity(results.len());
        for target in targets {
            if let Some(i) = results.iter().position(|r| r.target == *target) {
                ordered.push(results.remove(i));
            }
        }
        ordered.append(&mut results);
        Ok(ordered)
    }

    /// `BuildPaths`: builds `targets`; fails with the daemon's message when
    /// any of them could not be built.
    pub fn build_paths(
        &mut self,
        store_dir: &StoreDir,
        targets: &[DerivedPath],
        mode: BuildMode,
        events: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), StoreError> {
        self.write_targets(Op::BuildPaths, store_dir, targets, mode)?;
        let mut stream = EventStream {
            store_dir,
            builds: HashMap::new(),
            sink: events,
        };
        self.process_log_with(None, Some(&mut stream))?;
        wire::read_u64(&mut self.r).map_err(|e| decode_err(e.into()))?;
        Ok(())
    }
}

impl Connection {
    /// `BuildDerivation`: builds `drv` from its basic form (the daemon
    /// needs its inputs, not its `.drv`); `events` hears of the build's
    /// log lines. The daemon must trust us unless `drv` is
    /// content-addressed.
    pub fn build_derivation(
        &mut self,
        store_dir: &StoreDir,
        drv_path: &StorePath,
        drv: &worker::BasicDerivation,
        mode: BuildMode,
        events: &mut dyn FnMut(BuildEvent),
    ) -> Result<WireBuildResult, StoreError> {
        self.send_op(Op::BuildDerivation, |w| {
            worker::write_path(w, store_dir, drv_path)?;
            worker::write_basic_derivation(w, store_dir, drv)?;
            wire::write_u64(w, build_mode_code(mode))
        })?;
        let mut stream = EventStream {
            store_dir,
            builds: HashMap::new(),
            sink: events,
        };
        self.process_log_with(None, Some(&mut stream))?;
        worker::read_wire_build_result(&mut self.r, store_dir, self.version).map_err(decode_err)
    }
}

fn build_mode_code(mode: BuildMode) -> u64 {
    match mode {
        BuildMode::Normal => 0,
        BuildMode::Repair => 1,
        BuildMode::Check => 2,
    }
}

/// The protocol version that brought `BuildPathsWithResults`.
const BUILD_PATHS_WITH_RESULTS: u64 = 34;

/// Requests [`DaemonStore::query_path_infos`] keeps on the connection at
/// once: their answers (a few hundred bytes each) stay far below any
/// transport's buffers.
pub const QUERY_WINDOW: usize = 64;

impl DaemonStore {
    /// A store served on `socket` (nothing is connected until first use).
    pub fn new(socket: impl Into<PathBuf>) -> DaemonStore {
        DaemonStore {
            socket: socket.into(),
            store_dir: StoreDir::default(),
            pool: Mutex::default(),
            returned: Condvar::new(),
            can_connect: true,
        }
    }

    /// A store on one connection made elsewhere (`ssh-ng://`: a daemon
    /// over SSH); `name` stands for the socket in messages. Nothing can
    /// reconnect: once that connection broke, calls fail. Calls from
    /// several threads take turns on it.
    pub fn over_connection(conn: Connection, name: impl Into<PathBuf>) -> DaemonStore {
        DaemonStore {
            socket: name.into(),
            store_dir: StoreDir::default(),
            pool: Mutex::new(Pool {
                idle: vec![conn],
                lent: 0,
            }),
            returned: Condvar::new(),
            can_connect: false,
        }
    }

    /// The infos of those of `paths` the daemon holds (in the order of
    /// `paths`). The requests are pipelined: up to [`QUERY_WINDOW`] are on
    /// the connection at once, so that many paths cost a few round trips
    /// rather than one each (over `ssh-ng://`, a round trip is most of a
    /// query's cost). The window keeps the unread answers well below what
    /// the transport buffers, so neither side ever waits on the other.
    pub fn query_path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            let mut infos = Vec::with_capacity(paths.len());
            let mut sent = 0;
            for (answered, path) in paths.iter().enumerate() {
                // Topped up when half the window is answered.
                let ahead = paths.len().min(answered + QUERY_WINDOW);
                if sent < ahead && sent - answered <= QUERY_WINDOW / 2 {
                    for p in &paths[sent..ahead] {
                        wire::write_u64(&mut c.w, Op::QueryPathInfo as u64)
                            .and_then(|()| worker::write_path(&mut c.w, &sd, p))
                            .map_err(stream_err("send a request to the daemon"))?;
                    }
                    c.w.flush()
                        .map_err(stream_err("send a request to the daemon"))?;
                    sent = ahead;
                }
                c.process_log(None)?;
                let v = c.version;
                let valid =
                    minor(v) < 17 || wire::read_bool(&mut c.r).map_err(|e| decode_err(e.into()))?;
                if valid {
                    infos.push(
                        worker::read_path_info_unkeyed(&mut c.r, &sd, path.clone(), v)
                            .map_err(decode_err)?,
                    );
                }
            }
            Ok(infos)
        })
    }

    /// [`Connection::build_derivation`] after sending `options`.
    pub fn build_derivation(
        &self,
        drv_path: &StorePath,
        drv: &worker::BasicDerivation,
        options: &BuildOptions,
        events: &mut dyn FnMut(BuildEvent),
    ) -> Result<WireBuildResult, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.set_options(options)?;
            c.build_derivation(&sd, drv_path, drv, BuildMode::Normal, events)
        })
    }

    /// Opens a connection now, to check the daemon is there; it is kept
    /// for later calls. Returns the daemon's version string, if it sent one.
    pub fn ping(&self) -> Result<Option<String>, StoreError> {
        if !self.can_connect {
            return Ok(self.with(|c| Ok(c.daemon_version.clone()))?);
        }
        let conn = Connection::open(&self.socket)?;
        let version = conn.daemon_version.clone();
        self.pool().idle.push(conn);
        Ok(version)
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection, or a new one; on a store of one connection,
    /// waits for it to be put back.
    fn take(&self) -> Result<Connection, StoreError> {
        let mut pool = self.pool();
        loop {
            if let Some(c) = pool.idle.pop() {
                pool.lent += 1;
                return Ok(c);
            }
            if self.can_connect {
                drop(pool);
                let conn = Connection::open(&self.socket)?;
                self.pool().lent += 1;
                return Ok(conn);
            }
            if pool.lent == 0 {
                return Err(StoreError::Stream {
                    action: "reach the daemon",
                    source: io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!(
                            "the connection to '{}' broke earlier",
                            self.socket.display()
                        ),
                    ),
                });
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ends the loan of a connection from [`take`](Self::take): back to
    /// the pool when it can be used again, dropped otherwise.
    fn give_back(&self, conn: Option<Connection>) {
        let mut pool = self.pool();
        pool.lent -= 1;
        pool.idle.extend(conn);
        drop(pool);
        self.returned.notify_all();
    }

    /// Runs `f` on a connection; a connection that failed at the transport
    /// level is dropped, one that only got an error answer is reused.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        let result = f(&mut conn);
        let reusable = match &result {
            Ok(_) => true,
            Err(StoreError::Stream { action, .. }) => {
                *action == "complete the operation in the daemon"
            }
            Err(_) => false,
        };
        self.give_back(reusable.then_some(conn));
        result
    }

    /// Builds `targets` with `options` (send `keep_going` to have every
    /// target tried) and returns one result per target (in their order), as Nix's
    /// `BuildPathsWithResults`; `events` hears of each build's start, log
    /// lines and end while the request runs.
    ///
    /// A daemon older than 1.34 gets `BuildPaths` instead, and the results
    /// are made from the outputs' validity afterwards (a failure then
    /// carries the daemon's message for the whole request).
    pub fn build_paths_with_results(
        &self,
        targets: &[DerivedPath],
        mode: BuildMode,
        options: &BuildOptions,
        events: &mut dyn FnMut(BuildEvent),
    ) -> Result<Vec<DaemonBuildResult>, StoreError> {
        let sd = self.store_dir.clone();
        let old = self.with(|c| {
            c.set_options(options)?;
            if minor(c.version) >= BUILD_PATHS_WITH_RESULTS {
                return c
                    .build_paths_with_results(&sd, targets, mode, events)
                    .map(Ok);
            }
            match c.build_paths(&sd, targets, mode, events) {
                Err(e) if is_connection_error(&e) => Err(e),
                outcome => Ok(Err(outcome)),
            }
        })?;
        match old {
            Ok(results) => Ok(results),
            Err(outcome) => self.results_from_validity(targets, outcome),
        }
    }

    /// `BuildPaths` as [`DaemonStore::build_paths_with_results`] sends it
    /// to old daemons: an error when any target failed.
    pub fn build_paths(
        &self,
        targets: &[DerivedPath],
        mode: BuildMode,
        options: &BuildOptions,
        events: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.set_options(options)?;
            c.build_paths(&sd, targets, mode, events)
        })
    }

    /// Results of a `BuildPaths` request: a target whose outputs are valid
    /// was built, the others failed with the request's error.
    fn results_from_validity(
        &self,
        targets: &[DerivedPath],
        outcome: Result<(), StoreError>,
    ) -> Result<Vec<DaemonBuildResult>, StoreError> {
        let error = match outcome {
            Ok(()) => String::new(),
            Err(e) => kiln_formats::report::chain(&e),
        };
        let mut results = Vec::with_capacity(targets.len());
        for target in targets {
            let (outputs, wanted) = match target {
                DerivedPath::Opaque(p) => (BTreeMap::new(), vec![p.clone()]),
                DerivedPath::Built { drv, outputs } => {
                    let all = self.query_derivation_outputs(drv)?;
                    let chosen: BTreeMap<String, StorePath> = all
                        .into_iter()
                        .filter(|(name, _)| outputs.is_empty() || outputs.contains(name))
                        .collect();
                    let paths = chosen.values().cloned().collect();
                    (chosen, paths)
                }
            };
            let asked: StorePathSet = wanted.iter().cloned().collect();
            let valid = !asked.is_empty() && self.query_valid_paths(&asked)?.len() == asked.len();
            let result = if valid {
                BuildResult::success(BuildStatus::Built, outputs)
            } else {
                BuildResult::failure(
                    BuildStatus::MiscFailure,
                    if error.is_empty() {
                        "the daemon reported success, but the outputs are not valid".into()
                    } else {
                        error.clone()
                    },
                )
            };
            results.push(DaemonBuildResult {
                target: target.clone(),
                result: WireBuildResult {
                    result,
                    times_built: 0,
                    is_non_deterministic: false,
                    cpu_user_micros: None,
                    cpu_system_micros: None,
                },
            });
        }
        Ok(results)
    }
}

impl Store for DaemonStore {
    fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::QueryPathInfo,
                |w| worker::write_path(w, &sd, path),
                |r, v| {
                    if minor(v) >= 17 && !wire::read_bool(r)? {
                        return Ok(None);
                    }
                    worker::read_path_info_unkeyed(r, &sd, path.clone(), v).map(Some)
                },
            )
        })
    }

    fn is_valid_path(&self, path: &StorePath) -> Result<bool, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::IsValidPath,
                |w| worker::write_path(w, &sd, path),
                |r, _| Ok(wire::read_bool(r)?),
            )
        })
    }

    fn query_valid_paths(&self, paths: &StorePathSet) -> Result<StorePathSet, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::QueryValidPaths,
                |w| {
                    worker::write_paths(w, &sd, paths)?;
                    wire::write_bool(w, false)
                },
                |r, _| worker::read_paths(r, &sd),
            )
        })
    }

    fn query_all_valid_paths(&self) -> Result<StorePathSet, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::QueryAllValidPaths,
                |_| Ok(()),
                |r, _| worker::read_paths(r, &sd),
            )
        })
    }

    fn query_referrers(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::QueryReferrers,
                |w| worker::write_path(w, &sd, path),
                |r, _| worker::read_paths(r, &sd),
            )
        })
    }

    fn query_path_from_hash_part(&self, hash_part: &str) -> Result<Option<StorePath>, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::QueryPathFromHashPart,
                |w| wire::write_bytes(w, hash_part.as_bytes()),
                |r, _| worker::read_opt_path(r, &sd),
            )
        })
    }

    fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::QueryDerivationOutputMap,
                |w| worker::write_path(w, &sd, drv),
                |r, _| {
                    let mut out = BTreeMap::new();
                    for (name, path) in wire::read_string_pairs(r)? {
                        if !path.is_empty() {
                            out.insert(name, worker::parse_path(&sd, &path)?);
                        }
                    }
                    Ok(out)
                },
            )
        })
    }

    fn add_nar(
        &self,
        info: &PathInfo,
        nar: &mut dyn BufRead,
        options: AddOptions,
    ) -> Result<(), StoreError> {
        let sd = self.store_dir.clone();
        let printed = sd.print_path(&info.path);
        // Spool and check the NAR first: the daemon's refusal would come back
        // as text, while the caller deserves the precise error.
        let spool = tempfile::tempfile().map_err(|source| StoreError::Io {
            action: "create a temporary file in",
            path: std::env::temp_dir(),
            source,
        })?;
        let mut hashing = HashingWriter::new(HashAlgo::Sha256, BufWriter::new(spool));
        let mut partial = Vec::new();
        let copied = {
            let mut tee = TeeFirst {
                inner: &mut hashing,
                head: &mut partial,
                limit: 1 << 20,
            };
            wire::copy_nar(nar, &mut tee)
        };
        if let Err(e) = copied {
            // Let the NAR reader say precisely what is wrong with it.
            let source = match kiln_formats::nar::list(&partial[..]) {
                Err(read_error) => read_error,
                Ok(_) => {
                    return Err(StoreError::Stream {
                        action: "read the NAR to add",
                        source: e.into(),
                    });
                }
            };
            return Err(StoreError::BadNar {
                path: printed,
                source,
            });
        }
        let (buffered, hash, size) = hashing.finish();
        if size != info.nar_size {
            return Err(StoreError::NarSizeMismatch {
                path: printed,
                expected: info.nar_size,
                actual: size,
            });
        }
        if hash != info.nar_hash {
            return Err(StoreError::NarHashMismatch {
                path: printed,
                expected: info.nar_hash,
                actual: hash,
            });
        }
        let mut spool = buffered.into_inner().map_err(|e| StoreError::Stream {
            action: "spool the NAR",
            source: e.into_error(),
        })?;
        spool
            .rewind()
            .map_err(stream_err("rewind the spooled NAR"))?;
        self.with(|c| {
            let version = c.version;
            c.send_op(Op::AddToStoreNar, |w| {
                worker::write_path_info(w, &sd, info, version)?;
                wire::write_bool(w, options.repair)?;
                wire::write_bool(w, !options.check_sigs)
            })?;
            if minor(version) >= 23 {
                let mut framed = FramedWriter::new(&mut c.w);
                io::copy(&mut spool, &mut framed)
                    .map_err(stream_err("send a NAR to the daemon"))?;
                framed
                    .finish()
                    .map_err(stream_err("send a NAR to the daemon"))?;
                c.w.flush()
                    .map_err(stream_err("send a NAR to the daemon"))?;
                c.process_log(None)
            } else {
                c.process_log(Some(&mut spool))
            }
        })
    }

    /// Skips paths the daemon has, then sends the others in one
    /// `AddMultipleToStore` (protocol 1.32 and later), references first:
    /// the daemon restores and registers them in batches rather than one
    /// round trip and one commit per path, and checks each NAR against its
    /// announced hash. Older daemons get one `AddToStoreNar` per path.
    fn add_nars(
        &self,
        infos: &[PathInfo],
        nars: &kiln_store::NarSource<'_>,
        options: AddOptions,
        jobs: usize,
    ) -> Result<Vec<StorePath>, StoreError> {
        let asked: StorePathSet = infos.iter().map(|i| i.path.clone()).collect();
        let valid = if options.repair {
            StorePathSet::new()
        } else {
            self.query_valid_paths(&asked)?
        };
        let todo: Vec<PathInfo> = infos
            .iter()
            .filter(|i| !valid.contains(&i.path))
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(Vec::new());
        }
        let version = self.with(|c| Ok(c.version))?;
        if minor(version) < 32 {
            return kiln_store::substitute::add_nars_in_dependency_order(
                self, &todo, nars, options, jobs,
            );
        }
        let ordered = kiln_store::dependency_order(todo);
        let sd = self.store_dir.clone();
        let send =
            |action: &'static str| move |e: io::Error| StoreError::Stream { action, source: e };
        self.with(|c| {
            c.send_op(Op::AddMultipleToStore, |w| {
                wire::write_bool(w, options.repair)?;
                wire::write_bool(w, !options.check_sigs)
            })?;
            let mut framed = FramedWriter::new(&mut c.w);
            wire::write_u64(&mut framed, ordered.len() as u64)
                .map_err(send("send paths to the daemon"))?;
            // The daemon refuses a NAR that is not the one announced, but
            // only in words: check here too, to say precisely what was
            // wrong, and end the stream there (the daemon, finding it
            // short, adds nothing more).
            let mut mismatch = None;
            for info in &ordered {
                worker::write_path_info(&mut framed, &sd, info, version)
                    .map_err(send("send paths to the daemon"))?;
                let mut hashing = HashingWriter::new(HashAlgo::Sha256, &mut framed);
                // A NAR that cannot be read here breaks the frame stream:
                // the connection is not reused (see `with`).
                nars(info, &mut hashing)?;
                let (_, hash, size) = hashing.finish();
                if let Err(e) = info.check_nar(&sd, hash, size) {
                    mismatch = Some(e);
                    break;
                }
            }
            framed.finish().map_err(send("send paths to the daemon"))?;
            c.w.flush().map_err(send("send paths to the daemon"))?;
            let answer = c.process_log(None);
            match mismatch {
                Some(e) => Err(e),
                None => answer,
            }
        })?;
        Ok(ordered.into_iter().map(|i| i.path).collect())
    }

    fn add_text(
        &self,
        name: &str,
        contents: &[u8],
        references: &StorePathSet,
    ) -> Result<PathInfo, StoreError> {
        let sd = self.store_dir.clone();
        let path = self.with(|c| {
            c.call(
                Op::AddTextToStore,
                |w| {
                    wire::write_bytes(w, name.as_bytes())?;
                    wire::write_bytes(w, contents)?;
                    worker::write_paths(w, &sd, references)
                },
                |r, _| worker::read_path(r, &sd),
            )
        })?;
        self.path_info_or_error(&path)
    }

    fn nar_from_path(&self, path: &StorePath, out: &mut dyn Write) -> Result<(), StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.send_op(Op::NarFromPath, |w| worker::write_path(w, &sd, path))?;
            c.process_log(None)?;
            wire::copy_nar(&mut c.r, out).map_err(|e| StoreError::Stream {
                action: "receive a NAR from the daemon",
                source: e.into(),
            })?;
            Ok(())
        })
    }

    fn add_temp_root(&self, path: &StorePath) -> Result<(), StoreError> {
        let sd = self.store_dir.clone();
        self.with(|c| {
            c.call(
                Op::AddTempRoot,
                |w| worker::write_path(w, &sd, path),
                |r, _| Ok(wire::read_u64(r)?),
            )
        })
        .map(drop)
    }
}

/// A writer that also keeps the first `limit` bytes (to diagnose a
/// malformed NAR).
struct TeeFirst<'a, W> {
    inner: &'a mut W,
    head: &'a mut Vec<u8>,
    limit: usize,
}

impl<W: Write> Write for TeeFirst<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let room = self.limit.saturating_sub(self.head.len());
        self.head.extend_from_slice(&buf[..n.min(room)]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
