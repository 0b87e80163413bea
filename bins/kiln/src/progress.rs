//! How `kiln build` shows a run on a terminal: one status line at the
//! bottom of stderr, like `nix build`'s — builds done / running / expected,
//! failures, paths copied from binary caches and their size, and what is
//! building now with the last line of its log — redrawn in place a few
//! times a second (indicatif limits the rate, whatever the event rate).
//! Errors, messages and (with `bar-with-logs`) build logs are printed
//! above it; when the run ends the line is replaced by a summary.
//!
//! Diagnostics from `tracing` go through [`StderrThroughBar`], which
//! lifts the bar while a line is written so the two never interleave, in
//! Nix's style ([`NixStyle`]: `warning: …`).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_formats::store_path::StorePath;
use kiln_scheduler::events::{Event, EventSink};

/// Redraws per second at most.
const REDRAW_HZ: u8 = 8;

/// The bar that tracing output must lift while it writes, if one is shown.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A build that runs now.
#[derive(Debug)]
struct Running {
    name: String,
    machine: Option<String>,
    last_line: String,
}

#[derive(Debug, Default)]
struct Counts {
    expected: usize,
    done: usize,
    running: usize,
    failed: usize,
    copied: usize,
    copied_bytes: u64,
    /// Running builds by activity id.
    builds: BTreeMap<u64, Running>,
    /// The build shown: the one heard from last.
    shown: Option<u64>,
}

/// The progress display; an [`EventSink`].
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
    counts: Mutex<Counts>,
    show_logs: bool,
    started: Instant,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The derivation's name, as Nix's bar shows it (`hello-2.12`).
fn drv_name(drv: &StorePath) -> String {
    let name = drv.name();
    name.strip_suffix(".drv").unwrap_or(name).to_owned()
}

impl Counts {
    fn line(&self) -> String {
        let mut line = format!(
            "[{}/{}/{} built",
            self.done - self.failed.min(self.done),
            self.running,
            self.expected
        );
        if self.failed > 0 {
            line.push_str(&format!(", {} failed", self.failed));
        }
        if self.copied > 0 {
            line.push_str(&format!(
                ", {} copied ({})",
                self.copied,
                mib(self.copied_bytes)
            ));
        }
        line.push(']');
        if let Some(b) = self.shown.and_then(|id| self.builds.get(&id)) {
            line.push_str(" building ");
            line.push_str(&b.name);
            if let Some(m) = &b.machine {
                line.push_str(&format!(" on {m}"));
            }
            if !b.last_line.is_empty() {
                line.push_str(": ");
                line.push_str(&b.last_line);
            }
        }
        line
    }
}

impl Bar {
    /// A bar on stderr (which the caller has found to be a terminal);
    /// `show_logs` prints every build's log above it.
    pub fn new(show_logs: bool) -> Bar {
        let bar =
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(REDRAW_HZ));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        // The spinner shows the run is alive while a build is silent.
        bar.enable_steady_tick(Duration::from_millis(1000 / u64::from(REDRAW_HZ)));
        *ACTIVE.lock().unwrap_or_else(PoisonError::into_inner) = Some(bar.clone());
        Bar {
            bar,
            counts: Mutex::new(Counts::default()),
            show_logs,
            started: Instant::now(),
        }
    }

    /// Takes the bar away and prints what the run came to in its place.
    pub fn finish(&self) {
        ACTIVE.lock().unwrap_or_else(PoisonError::into_inner).take();
        self.bar.finish_and_clear();
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mut summary = format!("{} built", c.done - c.failed.min(c.done));
        if c.failed > 0 {
            summary.push_str(&format!(", {} failed", c.failed));
        }
        if c.copied > 0 {
            summary.push_str(&format!(", {} copied ({})", c.copied, mib(c.copied_bytes)));
        }
        summary.push_str(&format!(
            " in {:.1} s",
            self.started.elapsed().as_secs_f64()
        ));
        eprintln!("{summary}");
    }

    fn redraw(&self, counts: &Counts) {
        self.bar.set_message(counts.line());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // A run that ended early (an error) leaves no bar behind.
        if !self.bar.is_finished() {
            ACTIVE.lock().unwrap_or_else(PoisonError::into_inner).take();
            self.bar.finish_and_clear();
        }
    }
}

impl EventSink for Bar {
    fn event(&self, event: Event<'_>) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            Event::Planned { to_build } => c.expected = to_build,
            Event::BuildStarted {
                id, drv, machine, ..
            } => {
                c.builds.insert(
                    id,
                    Running {
                        name: drv_name(drv),
                        machine: machine.map(str::to_owned),
                        last_line: String::new(),
                    },
                );
                c.running = c.builds.len();
                c.shown = Some(id);
            }
            Event::LogLine { id, line } => {
                if self.show_logs {
                    self.bar.println(String::from_utf8_lossy(line));
                }
                let text = String::from_utf8_lossy(line);
                let text = text.trim();
                if text.is_empty() {
                    return;
                }
                if let Some(b) = c.builds.get_mut(&id) {
                    b.last_line.clear();
                    b.last_line.push_str(text);
                    c.shown = Some(id);
                } else {
                    return;
                }
            }
            Event::Finished { id, result, .. } => {
                c.builds.remove(&id);
                c.running = c.builds.len();
                if c.shown == Some(id) {
                    c.shown = c.builds.keys().next_back().copied();
                }
                if !result.status.is_success() {
                    self.bar
                        .println(kiln_scheduler::events::error_text(&result.error));
                }
            }
            Event::Progress {
                done,
                expected,
                failed,
                ..
            } => {
                c.done = done;
                c.expected = c.expected.max(expected);
                c.failed = failed;
            }
            Event::Copied { nar_size, .. } => {
                c.copied += 1;
                c.copied_bytes += nar_size;
            }
            Event::Message { text } => self.bar.println(text),
        }
        self.redraw(&c);
    }
}

/// A `tracing` writer to stderr that lifts the progress bar, when one is
/// shown, while a line is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrThroughBar;

impl Write for StderrThroughBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrThroughBar {
    type Writer = StderrThroughBar;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Formats `tracing` events as Nix prints diagnostics: `warning: …`,
/// `error: …`, then the event's fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct NixStyle;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for NixStyle
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        write!(writer, "{level}: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
