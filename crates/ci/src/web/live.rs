//! The logs of builds while they run, kept in memory as the coordinator
//! receives them, so that a page can follow a build that has no stored log
//! yet. Readers wait for more with [`LiveLogs::wait_past`] instead of
//! polling the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

    #[tokio::test]
    async fn waiting_without_news_times_out() {
        let live = LiveLogs::default();
        live.append(2, b"x");
        let started = std::time::Instant::now();
        live.wait_past(2, 1, Duration::from_millis(100)).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
