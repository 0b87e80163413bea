//! One build on one machine: send what is missing, build there, bring the
//! outputs back, check them, register them here.
//!
//! Failures are sorted by what the caller should do: [`Failure::Transient`]
//! (connection, transfer, remote disk: try elsewhere), [`Failure::Permanent`]
//! (the builder failed: report it), [`Failure::TimedOut`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_derivation::Derivation;
use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_protocol::serve_client::{BuildOptions, ServeClient, ServeClientError};
use kiln_protocol::worker::BasicDerivation;
use kiln_store::local::LocalStore;
use kiln_store::{AddOptions, Store, compute_closure};

use crate::ssh::{LogSink, Protocol, SshTarget};

/// How a remote build ended when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Worth trying on another machine.
    #[error("{0}")]
    Transient(String),
    /// The build itself failed; its log went to the log sink.
    #[error("{0}")]
    Permanent(String),
    /// A timeout or max-silent-time passed (remote or here).
    #[error("{0}")]
    TimedOut(String),
}

/// What to build and what to bring back.
#[derive(Debug)]
pub struct Job<'a> {
    pub store: &'a LocalStore,
    pub drv_path: StorePath,
    pub drv: &'a Derivation,
    /// Paths the build needs (closed under references here).
    pub inputs: StorePathSet,
    /// Outputs to copy back (name → path).
    pub wanted: BTreeMap<String, StorePath>,
    pub timeout: Option<Duration>,
    pub max_silent: Option<Duration>,
    pub max_log_size: u64,
}

/// Figures of one remote build, for the log and the benchmark.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub sent_paths: usize,
    pub already_there: usize,
    pub sent_bytes: u64,
    pub fetched_bytes: u64,
    pub upload: Duration,
    pub build: Duration,
    pub download: Duration,
}

fn transient(
    target: &SshTarget,
    stage: &str,
    e: impl std::fmt::Display,
    tail: &[String],
) -> Failure {
    let tail = tail.join("\n");
    Failure::Transient(if tail.trim().is_empty() {
        format!("'{}': {stage}: {e}", target.uri)
    } else {
        format!("'{}': {stage}: {e}\n{tail}", target.uri)
    })
}

/// Ends `session`; an error of `res` becomes a transient failure at
/// `stage`, with the remote's last lines of stderr.
fn end_session<T, E: std::fmt::Display>(
    session: crate::ssh::Session,
    target: &SshTarget,
    stage: &str,
    res: Result<T, E>,
) -> Result<T, Failure> {
    let tail = session.stderr_tail();
    session.finish();
    res.map_err(|e| transient(target, stage, e, &tail))
}

/// The basic derivation the serve protocol sends: inputs flattened to
/// the input closure, as the remote gets no `.drv` files to follow.
pub fn basic_derivation(
    store: &LocalStore,
    drv: &Derivation,
    inputs: &StorePathSet,
) -> BasicDerivation {
    let sd = store.store_dir();
    let outputs = drv
        .outputs
        .iter()
        .map(|(name, o)| {
            let path = o.path().map(|p| sd.print_path(p)).unwrap_or_default();
            let (algo, hash) = match o {
                kiln_derivation::DerivationOutput::Fixed { hash, .. } => {
                    (hash.method_algo(), hash.hash.to_base16())
                }
                _ => (String::new(), String::new()),
            };
            (name.clone(), (path, algo, hash))
        })
        .collect();
    BasicDerivation {
        outputs,
        input_srcs: inputs.clone(),
        platform: drv.system.to_string(),
        builder: drv.builder.to_string(),
        args: drv.args.iter().map(|a| a.to_string()).collect(),
        env: drv
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Sends `paths` (and what they need) to the remote on an open session:
/// one query for what is there, one stream for the rest.
fn upload<R: std::io::Read, W: std::io::Write>(
    client: &mut ServeClient<R, W>,
    store: &LocalStore,
    paths: &StorePathSet,
    stats: &mut Stats,
) -> Result<(), ServeClientError> {
    // `lock`: the remote holds them (and what we add) as temporary roots
    // for as long as this session lives, i.e. until the build is done.
    let present = client.query_valid_paths(paths, true)?;
    let missing: StorePathSet = paths.difference(&present).cloned().collect();
    stats.already_there = present.len();
    stats.sent_paths = missing.len();
    for p in &missing {
        stats.sent_bytes += store.path_info_or_error(p)?.nar_size;
    }
    if !missing.is_empty() {
        client.import_paths(store, &missing)?;
    }
    Ok(())
}

/// Copies `paths` from this store to the machine (for `test` and the
/// benchmark: the same path a build's inputs take).
pub fn copy_to(
    target: &SshTarget,
    store: &LocalStore,
    paths: &StorePathSet,
    log: LogSink,
) -> Result<Stats, Failure> {
    let closure = compute_closure(store, paths, false, false, false)
        .map_err(|e| Failure::Transient(e.to_string()))?;
    if target.protocol == Protocol::Daemon {
        let (session, remote) = open_daemon(target, log)?;
        let mut stats = Stats::default();
        let t = Instant::now();
        let res = upload_to_daemon(&remote, store, &closure, &mut stats)
            .map_err(|e| kiln_formats::report::chain(&e));
        stats.upload = t.elapsed();
        drop(remote);
        end_session(session, target, "copying paths", res)?;
        return Ok(stats);
    }
    let mut session = target
        .open_session(log)
        .map_err(|e| Failure::Transient(e.to_string()))?;
    let (r, w) = session.take_channel();
    let mut stats = Stats::default();
    let t = Instant::now();
    let res = ServeClient::handshake(r, w, store.store_dir().clone())
        .and_then(|mut c| upload(&mut c, store, &closure, &mut stats));
    stats.upload = t.elapsed();
    end_session(session, target, "copying paths", res)?;
    Ok(stats)
}

/// Copies `paths` (with their closure) from the machine into this store.
pub fn copy_from(
    target: &SshTarget,
    store: &LocalStore,
    paths: &StorePathSet,
    log: LogSink,
) -> Result<Stats, Failure> {
    if target.protocol == Protocol::Daemon {
        let (session, remote) = open_daemon(target, log)?;
        let mut stats = Stats::default();
        let t = Instant::now();
        let res = missing_closure(store, paths, |ask| {
            remote.query_path_infos(&ask.iter().cloned().collect::<Vec<_>>())
        })
        .and_then(|infos| fetch_from_daemon(&remote, store, infos, &mut stats))
        .map_err(|e| kiln_formats::report::chain(&e));
        stats.download = t.elapsed();
        drop(remote);
        end_session(session, target, "copying paths back", res)?;
        return Ok(stats);
    }
    let mut session = target
        .open_session(log)
        .map_err(|e| Failure::Transient(e.to_string()))?;
    let (r, w) = session.take_channel();
    let mut stats = Stats::default();
    let t = Instant::now();
    let res = (|| {
        let mut c = ServeClient::handshake(r, w, store.store_dir().clone())?;
        let infos = missing_closure(store, paths, |ask| c.query_path_infos(ask))?;
        fetch_infos(&mut c, store, infos, &mut stats)
    })();
    stats.download = t.elapsed();
    end_session(session, target, "copying paths back", res)?;
    Ok(stats)
}

/// The remote metadata of `paths` and what they refer to, followed on
/// the remote until closed, leaving out what is valid here already.
/// `query` answers for the valid ones among a set, one batch a round.
fn missing_closure<E: From<kiln_store::StoreError>>(
    store: &LocalStore,
    paths: &StorePathSet,
    mut query: impl FnMut(&StorePathSet) -> Result<Vec<kiln_store::PathInfo>, E>,
) -> Result<BTreeMap<StorePath, kiln_store::PathInfo>, E> {
    let mut infos: BTreeMap<StorePath, kiln_store::PathInfo> = BTreeMap::new();
    let mut frontier: StorePathSet = paths.clone();
    while !frontier.is_empty() {
        let local = store.query_valid_paths(&frontier)?;
        let ask: StorePathSet = frontier.difference(&local).cloned().collect();
        frontier.clear();
        for info in query(&ask)? {
            for r in &info.references {
                if !infos.contains_key(r) && !ask.contains(r) {
                    frontier.insert(r.clone());
                }
            }
            infos.insert(info.path.clone(), info);
        }
    }
    Ok(infos)
}

/// Fetches the NARs of `infos` into `store` as one batch (the local
/// store restores them on several threads and makes them durable with one
/// barrier and one transaction, instead of an fsync and a commit per
/// path). Each NAR is checked against the hash and size the remote
/// announced before anything of it is registered.
fn fetch_infos<R: std::io::Read + Send, W: std::io::Write + Send>(
    c: &mut ServeClient<R, W>,
    store: &LocalStore,
    infos: BTreeMap<StorePath, kiln_store::PathInfo>,
    stats: &mut Stats,
) -> Result<(), ServeClientError> {
    let ordered = kiln_store::dependency_order(infos.into_values());
    stats.fetched_bytes += ordered.iter().map(|i| i.nar_size).sum::<u64>();
    // Each of the store's workers sends its request as soon as it starts
    // on a path, so the remote always has the next ones queued and the
    // NARs come back to back; restoring overlaps with the transfer.
    let pipeline = c.dump_pipeline();
    let source = |info: &kiln_store::PathInfo, out: &mut dyn std::io::Write| {
        pipeline
            .fetch(&info.path, out)
            .map(drop)
            .map_err(|e| kiln_store::StoreError::Stream {
                action: "fetch a NAR from the remote",
                source: std::io::Error::other(e.to_string()),
            })
    };
    store.add_nars(&ordered, &source, AddOptions::default(), 0)?;
    Ok(())
}

/// Builds `job` on `target`, logging the remote's output to `log`:
/// over the serve protocol (`ssh://`) or the daemon protocol
/// (`ssh-ng://`), with the same checks and the same classification of
/// failures.
pub fn build(target: &SshTarget, job: &Job<'_>, log: LogSink) -> Result<Stats, Failure> {
    let store = job.store;
    let sd = store.store_dir().clone();
    let mut stats = Stats::default();
    // The .drv closure goes along so that a remote that builds by path
    // (rather than from the basic derivation) finds what it needs.
    let mut send = job.inputs.clone();
    send.insert(job.drv_path.clone());
    let send = compute_closure(store, &send, false, false, false)
        .map_err(|e| Failure::Transient(e.to_string()))?;

    let (mut session, socket) = match target.protocol {
        Protocol::Serve => target.open_session(log.clone()).map(|s| (s, None)),
        Protocol::Daemon => target
            .open_socket_session(log.clone())
            .map(|(s, socket)| (s, Some(socket))),
    }
    .map_err(|e| Failure::Transient(e.to_string()))?;
    let watchdog = Watchdog::start(&session, job);
    let outcome = match socket {
        None => {
            let (r, w) = session.take_channel();
            build_on_serve(target, job, &send, r, w, &mut stats).map_err(|e| e.to_string())
        }
        Some(socket) => {
            let activity = session.activity_handle();
            build_on_daemon(target, job, &send, socket, &log, activity, &mut stats)
                .map_err(|e| kiln_formats::report::chain(&e))
        }
    };
    let timed_out = watchdog.stop();
    let tail = session.stderr_tail();
    session.finish();
    if timed_out {
        return Err(Failure::TimedOut(format!(
            "build of '{}' on '{}' passed its timeout or max-silent-time; stopped from here",
            sd.print_path(&job.drv_path),
            target.uri
        )));
    }
    match outcome {
        Ok(Ok(())) => Ok(stats),
        Ok(Err(f)) => Err(f),
        Err(e) => Err(transient(target, "remote session", e, &tail)),
    }
}

/// The local side of timeout and max-silent-time: if the remote does not
/// stop the build itself, killing ssh (which drops the connection) does.
struct Watchdog {
    timed_out: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    fn start(session: &crate::ssh::Session, job: &Job<'_>) -> Watchdog {
        let timed_out = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (t, d) = (timed_out.clone(), done.clone());
        let (timeout, max_silent) = (job.timeout, job.max_silent);
        let last_activity = session_activity(session);
        let pid = session.pid();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let grace = Duration::from_secs(10);
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let silent = last_activity().elapsed();
                let over = timeout.is_some_and(|t| start.elapsed() > t + grace)
                    || max_silent.is_some_and(|t| silent > t + grace);
                if over {
                    t.store(true, Ordering::Relaxed);
                    // SAFETY: our own ssh child, not yet reaped (the
                    // session waits for it only after `stop`).
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    break;
                }
            }
        });
        Watchdog {
            timed_out,
            done,
            thread,
        }
    }

    /// Stops watching; whether the deadline had passed.
    fn stop(self) -> bool {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.timed_out.load(Ordering::Relaxed)
    }
}

/// How a remote build's status (Nix's `BuildResult::Status` numbers)
/// is to be handled here.
fn classify(status: u64, msg: String) -> Failure {
    match status {
        8 => Failure::TimedOut(msg),
        3 | 4 | 5 | 7 | 11 | 12 => Failure::Permanent(msg),
        _ => Failure::Transient(msg),
    }
}

/// The metadata of the outputs to bring back, checked: the remote must
/// have them all, and their references must stay inside what the build
/// could see (its inputs and its own outputs). The deriver becomes the
/// local `.drv`.
fn checked_outputs(
    target: &SshTarget,
    job: &Job<'_>,
    send: &StorePathSet,
    missing: &StorePathSet,
    infos: Vec<kiln_store::PathInfo>,
) -> Result<BTreeMap<StorePath, kiln_store::PathInfo>, Failure> {
    let sd = job.store.store_dir();
    let got: BTreeSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
    if let Some(p) = missing.iter().find(|p| !got.contains(p)) {
        return Err(Failure::Transient(format!(
            "'{}' reported a successful build but does not have '{}'",
            target.uri,
            sd.print_path(p)
        )));
    }
    let all_outputs: StorePathSet = job.drv.output_paths().map(|(_, p)| p.clone()).collect();
    let mut map = BTreeMap::new();
    for mut info in infos {
        if let Some(bad) = info
            .references
            .iter()
            .find(|r| !send.contains(*r) && !all_outputs.contains(*r))
        {
            return Err(Failure::Permanent(format!(
                "output '{}' built on '{}' refers to '{}', which is not among the build's inputs",
                sd.print_path(&info.path),
                target.uri,
                sd.print_path(bad)
            )));
        }
        info.deriver = Some(job.drv_path.clone());
        map.insert(info.path.clone(), info);
    }
    Ok(map)
}

/// The wanted outputs not valid here yet.
fn missing_outputs(job: &Job<'_>) -> Result<StorePathSet, kiln_store::StoreError> {
    let wanted: StorePathSet = job.wanted.values().cloned().collect();
    let local = job.store.query_valid_paths(&wanted)?;
    Ok(wanted.difference(&local).cloned().collect())
}

/// `ssh://`: the serve protocol on the session's streams.
fn build_on_serve<R: std::io::Read + Send, W: std::io::Write + Send>(
    target: &SshTarget,
    job: &Job<'_>,
    send: &StorePathSet,
    r: R,
    w: W,
    stats: &mut Stats,
) -> Result<Result<(), Failure>, ServeClientError> {
    let store = job.store;
    let sd = store.store_dir().clone();
    let mut c = ServeClient::handshake(r, w, sd.clone())?;
    let t = Instant::now();
    upload(&mut c, store, send, stats)?;
    stats.upload = t.elapsed();
    let basic = basic_derivation(store, job.drv, &job.inputs);
    let options = BuildOptions {
        max_silent_time: job.max_silent.map_or(0, |d| d.as_secs()),
        build_timeout: job.timeout.map_or(0, |d| d.as_secs()),
        max_log_size: job.max_log_size,
    };
    let t = Instant::now();
    let result = c.build_derivation(&job.drv_path, &basic, options)?;
    stats.build = t.elapsed();
    if !result.success() {
        let msg = format!(
            "build of '{}' on '{}' failed: {}",
            sd.print_path(&job.drv_path),
            target.uri,
            result.error.trim_end()
        );
        return Ok(Err(classify(result.status, msg)));
    }
    let t = Instant::now();
    let missing = missing_outputs(job)?;
    let infos = c.query_path_infos(&missing)?;
    let map = match checked_outputs(target, job, send, &missing, infos) {
        Ok(m) => m,
        Err(f) => return Ok(Err(f)),
    };
    fetch_infos(&mut c, store, map, stats)?;
    stats.download = t.elapsed();
    Ok(Ok(()))
}

/// `ssh-ng://`: the daemon protocol (`nix-daemon --stdio`,
/// `store-daemon --stdio`) on `socket`. Inputs go in one
/// `AddMultipleToStore` after one `QueryValidPaths`, the ones already there are held as
/// temporary roots for the session, the build is `BuildDerivation`, and
/// its log lines arrive as the daemon's log messages.
fn build_on_daemon(
    target: &SshTarget,
    job: &Job<'_>,
    send: &StorePathSet,
    socket: std::os::unix::net::UnixStream,
    log: &LogSink,
    activity: Arc<std::sync::Mutex<Instant>>,
    stats: &mut Stats,
) -> Result<Result<(), Failure>, kiln_store::StoreError> {
    use kiln_protocol::client::{BuildEvent, BuildOptions, Connection, DaemonStore};
    let store = job.store;
    let sd = store.store_dir().clone();
    let remote = DaemonStore::over_connection(Connection::over(socket)?, &target.uri);

    let t = Instant::now();
    upload_to_daemon(&remote, store, send, stats)?;
    stats.upload = t.elapsed();

    let mut options = BuildOptions {
        max_silent_time: job.max_silent.map_or(0, |d| d.as_secs()),
        use_substitutes: false,
        ..BuildOptions::default()
    };
    if let Some(timeout) = job.timeout {
        options
            .overrides
            .insert("timeout".into(), timeout.as_secs().to_string());
    }
    if job.max_log_size > 0 {
        options
            .overrides
            .insert("max-build-log-size".into(), job.max_log_size.to_string());
    }
    let basic = basic_derivation(store, job.drv, &job.inputs);
    let t = Instant::now();
    let mut events = |event: BuildEvent| {
        let line = match event {
            BuildEvent::LogLine { line, .. } | BuildEvent::Message(line) => line,
            _ => return,
        };
        *activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        log.line(&line);
    };
    let result = remote.build_derivation(&job.drv_path, &basic, &options, &mut events)?;
    stats.build = t.elapsed();
    let result = result.result;
    if !result.status.is_success() {
        let msg = format!(
            "build of '{}' on '{}' failed: {}",
            sd.print_path(&job.drv_path),
            target.uri,
            result.error.trim_end()
        );
        return Ok(Err(classify(result.status as u64, msg)));
    }

    let t = Instant::now();
    let missing = missing_outputs(job)?;
    let infos = remote.query_path_infos(&missing.iter().cloned().collect::<Vec<_>>())?;
    let map = match checked_outputs(target, job, send, &missing, infos) {
        Ok(m) => m,
        Err(f) => return Ok(Err(f)),
    };
    fetch_from_daemon(&remote, store, map, stats)?;
    stats.download = t.elapsed();
    Ok(Ok(()))
}

/// Sends what of `paths` the daemon lacks (one query, then one
/// `AddMultipleToStore`, references first); holds the ones it has as
/// temporary roots for the session.
fn upload_to_daemon(
    remote: &kiln_protocol::client::DaemonStore,
    store: &LocalStore,
    paths: &StorePathSet,
    stats: &mut Stats,
) -> Result<(), kiln_store::StoreError> {
    let present = remote.query_valid_paths(paths)?;
    for p in &present {
        remote.add_temp_root(p)?;
    }
    let mut infos = BTreeMap::new();
    for p in paths.difference(&present) {
        let info = store.path_info_or_error(p)?;
        stats.sent_bytes += info.nar_size;
        infos.insert(p.clone(), info);
    }
    stats.already_there = present.len();
    stats.sent_paths = infos.len();
    let ordered = kiln_store::dependency_order(infos.into_values());
    let from_here = |info: &kiln_store::PathInfo, out: &mut dyn std::io::Write| {
        store.nar_from_path(&info.path, out)
    };
    remote.add_nars(&ordered, &from_here, AddOptions::default(), 1)?;
    Ok(())
}

/// Fetches the NARs of `infos` from the daemon (`NarFromPath`) into
/// `store`, each checked against what the daemon announced.
fn fetch_from_daemon(
    remote: &kiln_protocol::client::DaemonStore,
    store: &LocalStore,
    infos: BTreeMap<StorePath, kiln_store::PathInfo>,
    stats: &mut Stats,
) -> Result<(), kiln_store::StoreError> {
    let ordered = kiln_store::dependency_order(infos.into_values());
    stats.fetched_bytes += ordered.iter().map(|i| i.nar_size).sum::<u64>();
    let from_remote = |info: &kiln_store::PathInfo, out: &mut dyn std::io::Write| {
        remote.nar_from_path(&info.path, out)
    };
    // The connection carries one NAR at a time, but with several workers
    // the next NAR comes over it while the last one is written to disk.
    store.add_nars(&ordered, &from_remote, AddOptions::default(), 0)?;
    Ok(())
}

/// A daemon-protocol session to an `ssh-ng://` machine.
fn open_daemon(
    target: &SshTarget,
    log: LogSink,
) -> Result<(crate::ssh::Session, kiln_protocol::client::DaemonStore), Failure> {
    use kiln_protocol::client::{Connection, DaemonStore};
    let (session, socket) = target
        .open_socket_session(log)
        .map_err(|e| Failure::Transient(e.to_string()))?;
    match Connection::over(socket) {
        Ok(c) => Ok((session, DaemonStore::over_connection(c, &target.uri))),
        Err(e) => end_session(
            session,
            target,
            "connecting to the daemon",
            Err(kiln_formats::report::chain(&e)),
        ),
    }
}

fn session_activity(session: &crate::ssh::Session) -> impl Fn() -> Instant + Send + 'static {
    let a = session.activity_handle();
    move || *a.lock().unwrap_or_else(|p| p.into_inner())
}
