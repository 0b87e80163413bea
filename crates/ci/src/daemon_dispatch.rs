//! Dispatch to a store daemon over its socket (`kiln-ci --store-daemon`),
//! Kiln's `store-daemon` or Nix's `nix-daemon`, instead of the embedded
//! scheduler.
//!
//! Each batch goes to the daemon as one `BuildPathsWithResults` request
//! with keep-going, and what the daemon tells while it runs updates the
//! database at once: a build's log lines feed the live log, and when a
//! build's activity stops with all its outputs valid the build is recorded
//! succeeded then. A failure's kind (failed, timed out, log limit, failed
//! dependency, transient) is only in the request's results, so failures are
//! recorded when those arrive. A daemon that cannot be reached, or whose
//! connection breaks, puts the batch's unfinished builds back for a retry
//! after the back-off, however often that happens: they are never lost.
//!
//! Logs: when the daemon serves the coordinator's own store its log files
//! are the builds' logs, as with the embedded scheduler; otherwise the log
//! lines received are kept in the same layout under `STATE_DIR/logs/daemon`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_protocol::client::{
    BuildEvent, BuildOptions, DaemonBuildResult, DaemonStore, is_connection_error,
};
use kiln_protocol::worker::{BuildMode, DerivedPath};
use kiln_scheduler::result::{BuildResult, BuildStatus as SchedulerStatus};
use kiln_store::{Store as _, StoreError};
use tokio::sync::mpsc;

use crate::coordinator::Coordinator;
use crate::model::{Build, now};

/// Lines of a build's log kept in the error of a failure that does not
/// carry its own tail.
const TAIL_LINES: usize = 10;

/// Bytes of a build's log kept in memory (for a daemon that does not share
/// the coordinator's store); the rest is dropped, saying so.
const MAX_CAPTURED_LOG: usize = 16 << 20;

/// `unix://PATH` or a plain path: the daemon's socket.
pub fn socket_path(text: &str) -> PathBuf {
    PathBuf::from(text.strip_prefix("unix://").unwrap_or(text))
}

/// How the `machine` column names a daemon.
pub fn machine_name(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// What the blocking request thread tells the recording side.
enum Update {
    Event(BuildEvent),
    /// A target's build activity stopped; `built` when all its outputs are
    /// valid in the daemon's store.
    Ended {
        drv: StorePath,
        built: bool,
    },
    Done(Result<Vec<DaemonBuildResult>, StoreError>),
}

/// A build's log as received.
#[derive(Default)]
struct CapturedLog {
    bytes: Vec<u8>,
    truncated: bool,
}

impl CapturedLog {
    fn push(&mut self, line: &str) {
        if self.bytes.len() + line.len() + 1 > MAX_CAPTURED_LOG {
            self.truncated = true;
            return;
        }
        self.bytes.extend_from_slice(line.as_bytes());
        self.bytes.push(b'\n');
    }

    fn tail(&self) -> Vec<&str> {
        let text = std::str::from_utf8(&self.bytes).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec()
    }
}

/// Runs one batch on the daemon at `socket`: `by_drv` maps each `.drv`
/// path to the builds (of any evaluation) that realise it; the builds are
/// already marked started and counted as running. Returns when every build
/// of the batch is recorded or put back for a retry.
pub(crate) async fn run_batch(
    coordinator: Coordinator,
    socket: PathBuf,
    by_drv: HashMap<String, Vec<Build>>,
) {
    let store_dir = coordinator.store().store_dir().clone();
    let log_dir = kiln_scheduler::logs::log_dir_for_state_dir(coordinator.store().state_dir());
    let mut targets = Vec::with_capacity(by_drv.len());
    let mut outputs_of: HashMap<StorePath, StorePathSet> = HashMap::new();
    for (drv, builds) in &by_drv {
        let Ok(path) = store_dir.parse_path(drv) else {
            continue;
        };
        let outputs: StorePathSet = builds
            .iter()
            .flat_map(|b| b.outputs.values())
            .filter_map(|p| store_dir.parse_path(p).ok())
            .collect();
        outputs_of.insert(path.clone(), outputs);
        targets.push(DerivedPath::Built {
            drv: path,
            outputs: Vec::new(),
        });
    }
    let options = BuildOptions {
        keep_going: true,
        max_build_jobs: targets.len().max(1) as u64,
        overrides: coordinator.config().settings.clone(),
        ..BuildOptions::default()
    };
    let (sender, receiver) = mpsc::unbounded_channel();
    let request_socket = socket.clone();
    let request = tokio::task::spawn_blocking(move || {
        let store = DaemonStore::new(request_socket);
        let events = sender.clone();
        let mut on_event = |event: BuildEvent| {
            let stopped = match &event {
                BuildEvent::Stopped { drv, .. } => Some(drv.clone()),
                _ => None,
            };
            let _ = events.send(Update::Event(event));
            // The outputs' validity tells a success at once; asked on a
            // second connection while this one waits for the next build.
            if let Some(drv) = stopped {
                if let Some(outputs) = outputs_of.get(&drv) {
                    let built = !outputs.is_empty()
                        && store
                            .query_valid_paths(outputs)
                            .is_ok_and(|valid| valid.len() == outputs.len());
                    let _ = events.send(Update::Ended { drv, built });
                }
            }
        };
        let outcome =
            store.build_paths_with_results(&targets, BuildMode::Normal, &options, &mut on_event);
        let _ = sender.send(Update::Done(outcome));
    });
    let mut batch = Batch {
        coordinator: coordinator.clone(),
        store_dir,
        log_dir,
        socket,
        pending: by_drv,
        activities: HashMap::new(),
        captured: HashMap::new(),
    };
    batch.follow(receiver).await;
    if let Err(e) = request.await {
        tracing::error!(error = %e, "the daemon request thread failed");
    }
    batch
        .put_back_unfinished("the daemon request ended without a result")
        .await;
    coordinator.wake();
}

/// The recording side of a batch.
struct Batch {
    coordinator: Coordinator,
    store_dir: StoreDir,
    /// The coordinator's store's build logs.
    log_dir: PathBuf,
    socket: PathBuf,
    /// `.drv` path → its builds not recorded yet.
    pending: HashMap<String, Vec<Build>>,
    /// The daemon's build activities of pending `.drv`s.
    activities: HashMap<u64, String>,
    captured: HashMap<String, CapturedLog>,
}

impl Batch {
    async fn follow(&mut self, mut receiver: mpsc::UnboundedReceiver<Update>) {
        while let Some(update) = receiver.recv().await {
            match update {
                Update::Event(event) => self.event(event).await,
                Update::Ended { drv, built: true } => {
                    let drv = self.store_dir.print_path(&drv);
                    let result = BuildResult::success(SchedulerStatus::Built, BTreeMap::new());
                    self.record(&drv, &result).await;
                }
                // Its results say how it failed.
                Update::Ended { built: false, .. } => {}
                Update::Done(Ok(results)) => {
                    for DaemonBuildResult { target, result } in results {
                        if let DerivedPath::Built { drv, .. } = target {
                            let drv = self.store_dir.print_path(&drv);
                            self.record(&drv, &result.result).await;
                        }
                    }
                    let missing: Vec<String> = self.pending.keys().cloned().collect();
                    for drv in missing {
                        let result = BuildResult::failure(
                            SchedulerStatus::MiscFailure,
                            format!(
                                "the daemon at '{}' sent no result for '{drv}'",
                                self.socket.display()
                            ),
                        );
                        self.record(&drv, &result).await;
                    }
                }
                Update::Done(Err(error)) => {
                    let message = format!(
                        "store daemon '{}': {}",
                        self.socket.display(),
                        kiln_formats::report::chain(&error)
                    );
                    if is_connection_error(&error) {
                        tracing::warn!(%message, "daemon unreachable; the batch's builds will be retried");
                        self.put_back_unfinished(&message).await;
                    } else {
                        // The daemon refused the request as a whole: a
                        // transient failure, retried up to the limit.
                        let result =
                            BuildResult::failure(SchedulerStatus::TransientFailure, message);
                        let drvs: Vec<String> = self.pending.keys().cloned().collect();
                        for drv in drvs {
                            self.record(&drv, &result).await;
                        }
                    }
                }
            }
        }
    }

    async fn event(&mut self, event: BuildEvent) {
        match event {
            BuildEvent::Started { activity, drv, .. } => {
                let drv = self.store_dir.print_path(&drv);
                let Some(builds) = self.pending.get(&drv) else {
                    return;
                };
                let ids: Vec<i64> = builds.iter().map(|b| b.id).collect();
                if let Err(e) = self.coordinator.db().set_started_at(&ids, now()).await {
                    tracing::warn!(error = %e, %drv, "cannot record the build's start");
                }
                self.activities.insert(activity, drv);
            }
            BuildEvent::LogLine { activity, line } => {
                let Some(drv) = self.activities.get(&activity) else {
                    return;
                };
                let live = self.coordinator.live_logs();
                let with_newline = format!("{line}\n");
                for build in self.pending.get(drv).into_iter().flatten() {
                    live.append(build.id, with_newline.as_bytes());
                }
                self.captured.entry(drv.clone()).or_default().push(&line);
            }
            BuildEvent::Stopped { activity, .. } => {
                self.activities.remove(&activity);
            }
            BuildEvent::Message(text) => tracing::info!(target: "daemon", "{text}"),
        }
    }

    /// Records the end of `drv`'s builds (if still pending): the status as
    /// the embedded scheduler's results map it, the log where the log
    /// pages read it, and the log's tail in a failure's error.
    async fn record(&mut self, drv: &str, result: &BuildResult) {
        let Some(builds) = self.pending.remove(drv) else {
            return;
        };
        let captured = self.captured.remove(drv).unwrap_or_default();
        let mut result = result.clone();
        // Nix colours its messages for terminals; the database keeps text.
        result.error = strip_terminal_escapes(&result.error);
        if !result.status.is_success()
            && !result.error.contains("log lines")
            && !captured.bytes.is_empty()
        {
            result
                .error
                .push_str(&kiln_scheduler::logs::tail_text(&captured.tail()));
        }
        // The daemon's own log file when it shares our store, else the
        // lines received, kept in the same layout under the state dir.
        let mut log_dir = self.log_dir.clone();
        if let Ok(path) = self.store_dir.parse_path(drv) {
            let own_log = kiln_scheduler::logs::log_path(&log_dir, &path).exists();
            if !own_log && !captured.bytes.is_empty() {
                let kept_dir = self.coordinator.config().state_dir.join("logs/daemon");
                if keep_log(&kept_dir, &path, captured).await {
                    log_dir = kept_dir;
                }
            }
        }
        self.coordinator
            .record_result(&builds, &result, &log_dir)
            .await;
        for build in &builds {
            self.coordinator.live_logs().finish(build.id);
        }
    }

    /// Puts every build not recorded yet back for a retry.
    async fn put_back_unfinished(&mut self, why: &str) {
        let builds: Vec<Build> = self.pending.drain().flat_map(|(_, b)| b).collect();
        if builds.is_empty() {
            return;
        }
        for build in &builds {
            self.coordinator.live_logs().finish(build.id);
        }
        self.captured.clear();
        self.coordinator.retry_later(&builds, why).await;
    }
}

/// `text` without ANSI escape sequences (`ESC [ … final-byte`).
fn strip_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes a received log where [`kiln_scheduler::logs::log_path`] puts it
/// under `log_dir` (bzip2, as Nix keeps logs); whether it was written.
async fn keep_log(log_dir: &Path, drv: &StorePath, captured: CapturedLog) -> bool {
    let path = kiln_scheduler::logs::log_path(log_dir, drv);
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write as _;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::File::create(&path)?;
        let mut encoder = bzip2::write::BzEncoder::new(file, bzip2::Compression::default());
        encoder.write_all(&captured.bytes)?;
        if captured.truncated {
            encoder.write_all(b"[kiln-ci: the rest of the log was dropped]\n")?;
        }
        encoder.finish()?;
        Ok(())
    })
    .await;
    match written {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot keep a build's log");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot keep a build's log");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_paths_or_unix_urls() {
        assert_eq!(
            socket_path("unix:///run/kiln/socket"),
            PathBuf::from("/run/kiln/socket")
        );
        assert_eq!(socket_path("/tmp/s"), PathBuf::from("/tmp/s"));
        assert_eq!(machine_name(Path::new("/tmp/s")), "unix:///tmp/s");
    }

    #[test]
    fn terminal_escapes_are_stripped() {
        assert_eq!(
            strip_terminal_escapes(
                "\u{1b}[0mbuilder for '\u{1b}[35;1m/nix/store/x.drv\u{1b}[0m' failed"
            ),
            "builder for '/nix/store/x.drv' failed"
        );
        assert_eq!(strip_terminal_escapes("plain [text]"), "plain [text]");
    }

    #[test]
    fn captured_logs_keep_a_tail_and_a_bound() {
        let mut log = CapturedLog::default();
        for i in 0..25 {
            log.push(&format!("line {i}"));
        }
        assert_eq!(log.tail().len(), TAIL_LINES);
        assert_eq!(log.tail()[0], "line 15");
        assert_eq!(*log.tail().last().unwrap(), "line 24");
        let big = "x".repeat(MAX_CAPTURED_LOG);
        log.push(&big);
        assert!(log.truncated);
        assert!(log.bytes.len() < MAX_CAPTURED_LOG);
    }
}
