//! The logs of builds while they run, kept in memory as the coordinator
//! receives them, so that a page can follow a build that has no stored log
//! yet. Readers wait for more with [`LiveLogs::wait_past`] instead of
//! polling the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_formats::store_path::StoreDir;
use kiln_scheduler::events::{Event, EventSink};
use tokio::sync::watch;

/// The running builds' logs, by build id. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct LiveLogs {
    logs: Arc<Mutex<HashMap<i64, Arc<LiveLog>>>>,
}

#[derive(Debug)]
struct LiveLog {
    bytes: Mutex<Vec<u8>>,
    /// Bumped on every append and at the end, to wake the readers.
    version: watch::Sender<u64>,
}

impl LiveLogs {
    fn get(&self, build: i64) -> Option<Arc<LiveLog>> {
        self.logs
            .lock()
            .expect("live log map poisoned")
            .get(&build)
            .cloned()
    }

    /// Appends output of a running build.
    pub fn append(&self, build: i64, data: &[u8]) {
        let log = self
            .logs
            .lock()
            .expect("live log map poisoned")
            .entry(build)
            .or_insert_with(|| {
                Arc::new(LiveLog {
                    bytes: Mutex::new(Vec::new()),
                    version: watch::Sender::new(0),
                })
            })
            .clone();
        log.bytes
            .lock()
            .expect("live log poisoned")
            .extend_from_slice(data);
        log.version.send_modify(|v| *v += 1);
    }

    /// Forgets a build's log once it has ended (its stored log takes over),
    /// waking whoever waits on it.
    pub fn finish(&self, build: i64) {
        let removed = self
            .logs
            .lock()
            .expect("live log map poisoned")
            .remove(&build);
        if let Some(log) = removed {
            log.version.send_modify(|v| *v += 1);
        }
    }

    /// The bytes from `offset` on, and the log's length; `None` when the
    /// build has no live log (not running, or ended).
    pub fn read_from(&self, build: i64, offset: u64) -> Option<(Vec<u8>, u64)> {
        let log = self.get(build)?;
        let bytes = log.bytes.lock().expect("live log poisoned");
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        Some((bytes[start..].to_vec(), bytes.len() as u64))
    }

    /// Waits until the build's live log grows past `offset` or ends, or
    /// `timeout` passes. Returns at once when it has no live log.
    pub async fn wait_past(&self, build: i64, offset: u64, timeout: Duration) {
        let Some(log) = self.get(build) else {
            return;
        };
        let mut changes = log.version.subscribe();
        let grown =
            |log: &LiveLog| log.bytes.lock().expect("live log poisoned").len() as u64 > offset;
        if grown(&log) {
            return;
        }
        let wait = async {
            loop {
                if changes.changed().await.is_err() || grown(&log) || self.get(build).is_none() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }
}

/// Passes the scheduler's log lines of a batch's builds into [`LiveLogs`]:
/// a coordinator adds it to the event sinks of each batch it starts.
/// Several builds (of different evaluations) may share one derivation.
#[derive(Debug)]
pub struct LiveLogSink {
    live: LiveLogs,
    store_dir: StoreDir,
    /// `.drv` path → the builds it realises.
    builds: HashMap<String, Vec<i64>>,
    /// The scheduler's build activity → the builds it realises.
    activities: Mutex<HashMap<u64, Vec<i64>>>,
}

impl LiveLogSink {
    /// A sink for builds given as (`.drv` path, build id).
    pub fn new(
        live: LiveLogs,
        store_dir: StoreDir,
        builds: impl IntoIterator<Item = (String, i64)>,
    ) -> LiveLogSink {
        let mut by_drv: HashMap<String, Vec<i64>> = HashMap::new();
        for (drv, id) in builds {
            by_drv.entry(drv).or_default().push(id);
        }
        LiveLogSink {
            live,
            store_dir,
            builds: by_drv,
            activities: Mutex::new(HashMap::new()),
        }
    }
}

impl EventSink for LiveLogSink {
    fn event(&self, event: Event<'_>) {
        let mut activities = self.activities.lock().expect("activity map poisoned");
        match event {
            Event::BuildStarted { id, drv, .. } => {
                if let Some(builds) = self.builds.get(&self.store_dir.print_path(drv)) {
                    activities.insert(id, builds.clone());
                }
            }
            Event::LogLine { id, line } => {
                if let Some(builds) = activities.get(&id) {
                    let mut with_newline = Vec::with_capacity(line.len() + 1);
                    with_newline.extend_from_slice(line);
                    with_newline.push(b'\n');
                    for &build in builds {
                        self.live.append(build, &with_newline);
                    }
                }
            }
            Event::Finished { id, drv, .. } => {
                activities.remove(&id);
                // The stored log takes over once the build's status is
                // recorded; the tail waits on the database until then.
                if let Some(builds) = self.builds.get(&self.store_dir.print_path(drv)) {
                    for &build in builds {
                        self.live.finish(build);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_wake_on_append_and_on_finish() {
        let live = LiveLogs::default();
        assert!(live.read_from(1, 0).is_none());
        live.append(1, b"one\n");
        assert_eq!(live.read_from(1, 0), Some((b"one\n".to_vec(), 4)));
        assert_eq!(live.read_from(1, 99), Some((Vec::new(), 4)));

        let writer = live.clone();
        let append = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.append(1, b"two\n");
        });
        let started = std::time::Instant::now();
        live.wait_past(1, 4, Duration::from_secs(10)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(live.read_from(1, 4), Some((b"two\n".to_vec(), 8)));
        append.await.unwrap();

        let finisher = live.clone();
        let finish = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            finisher.finish(1);
        });
        live.wait_past(1, 8, Duration::from_secs(10)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(live.read_from(1, 0).is_none());
        finish.await.unwrap();
    }

    #[test]
    fn the_scheduler_sink_routes_lines_to_the_builds_of_a_derivation() {
        let store_dir = StoreDir::default();
        let drv = store_dir
            .parse_path("/nix/store/00000000000000000000000000000000-a.drv")
            .unwrap();
        let live = LiveLogs::default();
        let sink = LiveLogSink::new(
            live.clone(),
            store_dir.clone(),
            [
                (store_dir.print_path(&drv), 7),
                (store_dir.print_path(&drv), 9),
            ],
        );
        sink.event(Event::LogLine {
            id: 1,
            line: b"before",
        });
        assert!(live.read_from(7, 0).is_none());
        sink.event(Event::BuildStarted {
            id: 1,
            drv: &drv,
            machine: None,
            rebuild: Default::default(),
        });
        sink.event(Event::LogLine {
            id: 1,
            line: b"compiling",
        });
        sink.event(Event::LogLine {
            id: 2,
            line: b"another build",
        });
        assert_eq!(live.read_from(7, 0).unwrap().0, b"compiling\n");
        assert_eq!(live.read_from(9, 0).unwrap().0, b"compiling\n");
        let result = kiln_scheduler::result::BuildResult::failure(
            kiln_scheduler::result::BuildStatus::PermanentFailure,
            "failed",
        );
        sink.event(Event::Finished {
            id: 1,
            drv: &drv,
            result: &result,
        });
        assert!(live.read_from(7, 0).is_none() && live.read_from(9, 0).is_none());
    }

    #[tokio::test]
    async fn waiting_without_news_times_out() {
        let live = LiveLogs::default();
        live.append(2, b"x");
        let started = std::time::Instant::now();
        live.wait_past(2, 1, Duration::from_millis(100)).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
