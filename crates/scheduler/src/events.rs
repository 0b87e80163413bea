//! What happens during a run, for whoever follows it: plain lines for
//! people and logs, or Nix's `internal-json` format (`@nix {…}` lines, as
//! `nix build --log-format internal-json` writes) for programs.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_formats::store_path::{StoreDir, StorePath};
use serde_json::json;

use crate::local::Rebuild;
use crate::result::BuildResult;

/// One thing that happened.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// The run knows how many derivations it will build.
    Planned { to_build: usize },
    /// A build started (locally, or through the hook on `machine`), to
    /// check or repair valid outputs when `rebuild` says so.
    BuildStarted {
        id: u64,
        drv: &'a StorePath,
        machine: Option<&'a str>,
        rebuild: Rebuild,
    },
    /// A line of a build's log.
    LogLine { id: u64, line: &'a [u8] },
    /// A build (or a goal that needed no build) ended.
    Finished {
        id: u64,
        drv: &'a StorePath,
        result: &'a BuildResult,
    },
    /// Counts: done, expected, running, failed.
    Progress {
        done: usize,
        expected: usize,
        running: usize,
        failed: usize,
    },
    /// A path was fetched from the binary cache `from`; `nar_size` bytes
    /// unpacked. (A `Message` says so to people.)
    Copied {
        path: &'a StorePath,
        from: &'a str,
        nar_size: u64,
    },
    /// A message for people.
    Message { text: &'a str },
}

/// What a build's activity says, as Nix words it: `building '…drv'`,
/// `checking outputs of '…drv'` or `repairing outputs of '…drv'`, and
/// the machine it went to.
pub fn build_text(
    store_dir: &StoreDir,
    drv: &StorePath,
    machine: Option<&str>,
    rebuild: Rebuild,
) -> String {
    let path = store_dir.print_path(drv);
    let what = match rebuild {
        Rebuild::No => format!("building '{path}'"),
        Rebuild::Check => format!("checking outputs of '{path}'"),
        Rebuild::Repair => format!("repairing outputs of '{path}'"),
    };
    match machine {
        Some(m) => format!("{what} on '{m}'"),
        None => what,
    }
}

/// An error message as Nix shows it: `error: ` before the first line,
/// and every further line indented to line up under it. (Messages
/// themselves, like [`BuildResult::error`], are not indented.)
pub fn error_text(message: &str) -> String {
    const PREFIX: &str = "error: ";
    let mut text = String::with_capacity(message.len() + PREFIX.len());
    for (i, line) in message.split('\n').enumerate() {
        if i > 0 {
            text.push('\n');
        }
        text.push_str(if i == 0 { PREFIX } else { "       " });
        text.push_str(line);
    }
    text
}

/// Receives events; called from many threads.
pub trait EventSink: Send + Sync {
    fn event(&self, event: Event<'_>);
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh activity id (unique in the process, as Nix's are).
pub fn next_activity_id() -> u64 {
    // The process id in the high bits keeps ids of concurrent processes
    // apart when their streams are merged.
    ((std::process::id() as u64) << 32) | NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Discards everything.
#[derive(Debug, Default)]
pub struct Quiet;

impl EventSink for Quiet {
    fn event(&self, _: Event<'_>) {}
}

/// Plain lines on a writer (stderr), as `nix-build` prints them:
/// `building '…drv'...`, the build's log lines, and errors.
#[derive(Debug)]
pub struct PlainLines<W: Write + Send> {
    out: Mutex<W>,
    store_dir: StoreDir,
    show_logs: bool,
}

impl<W: Write + Send> PlainLines<W> {
    pub fn new(out: W, store_dir: StoreDir, show_logs: bool) -> Self {
        PlainLines {
            out: Mutex::new(out),
            store_dir,
            show_logs,
        }
    }
}

impl<W: Write + Send> EventSink for PlainLines<W> {
    fn event(&self, event: Event<'_>) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = match event {
            Event::BuildStarted {
                drv,
                machine,
                rebuild,
                ..
            } => writeln!(
                out,
                "{}...",
                build_text(&self.store_dir, drv, machine, rebuild)
            ),
            Event::LogLine { line, .. } if self.show_logs => {
                out.write_all(line).and_then(|()| out.write_all(b"\n"))
            }
            Event::Message { text } => writeln!(out, "{text}"),
            Event::Finished { result, .. } if !result.status.is_success() => {
                writeln!(out, "{}", error_text(&result.error))
            }
            _ => Ok(()),
        };
    }
}

/// Nix's `internal-json` log format on a writer.
#[derive(Debug)]
pub struct InternalJson<W: Write + Send> {
    out: Mutex<W>,
    store_dir: StoreDir,
    builds_activity: u64,
}

const ACT_BUILDS: u64 = 104;
const ACT_BUILD: u64 = 105;
const RES_BUILD_LOG_LINE: u64 = 101;
const RES_PROGRESS: u64 = 105;
const RES_SET_EXPECTED: u64 = 106;

impl<W: Write + Send> InternalJson<W> {
    pub fn new(out: W, store_dir: StoreDir) -> Self {
        let sink = InternalJson {
            out: Mutex::new(out),
            store_dir,
            builds_activity: next_activity_id(),
        };
        sink.emit(
            json!({"action": "start", "id": sink.builds_activity, "level": 0,
            "parent": 0, "text": "", "type": ACT_BUILDS, "fields": []}),
        );
        sink
    }

    fn emit(&self, value: serde_json::Value) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "@nix {value}");
    }
}

impl<W: Write + Send> Drop for InternalJson<W> {
    fn drop(&mut self) {
        self.emit(json!({"action": "stop", "id": self.builds_activity}));
    }
}

impl<W: Write + Send> EventSink for InternalJson<W> {
    fn event(&self, event: Event<'_>) {
        match event {
            Event::Planned { to_build } => self.emit(json!({"action": "result",
                "id": self.builds_activity, "type": RES_SET_EXPECTED,
                "fields": [ACT_BUILD, to_build]})),
            Event::BuildStarted {
                id,
                drv,
                machine,
                rebuild,
            } => {
                let path = self.store_dir.print_path(drv);
                let text = build_text(&self.store_dir, drv, machine, rebuild);
                self.emit(json!({"action": "start", "id": id, "level": 3,
                    "parent": self.builds_activity, "text": text, "type": ACT_BUILD,
                    "fields": [path, machine.unwrap_or(""), 1, 1]}));
            }
            Event::LogLine { id, line } => self.emit(json!({"action": "result", "id": id,
                "type": RES_BUILD_LOG_LINE, "fields": [String::from_utf8_lossy(line)]})),
            Event::Finished { id, result, .. } => {
                if !result.status.is_success() {
                    self.emit(json!({"action": "msg", "level": 0,
                        "msg": error_text(&result.error)}));
                }
                self.emit(json!({"action": "stop", "id": id}));
            }
            Event::Progress {
                done,
                expected,
                running,
                failed,
            } => self.emit(json!({"action": "result", "id": self.builds_activity,
                "type": RES_PROGRESS, "fields": [done, expected, running, failed]})),
            Event::Message { text } => self.emit(json!({"action": "msg", "level": 1, "msg": text})),
            // Said by the `Message` that comes with it.
            Event::Copied { .. } => {}
        }
    }
}
