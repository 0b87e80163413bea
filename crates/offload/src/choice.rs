//! Machine choice: which machine gets a build, shared by every hook and
//! daemon on this host through files under one state directory.
//!
//! - `slots/<machine>-<n>`: one file per job slot, held with `flock` for
//!   as long as a build runs there (re-checked against the inode after
//!   locking, so a file removed and recreated meanwhile is not trusted);
//! - `main-lock`: held while choosing, so two hooks never take the same
//!   last slot;
//! - `load/<machine>`: the machine's load average, cores and free disk as
//!   last read over SSH, reused for a few seconds;
//! - `down/<machine>`: a machine that failed to connect, with the time
//!   until which it is skipped (doubling with each failure);
//! - `choices.log`: every choice and its reason, one line each.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_store::local::lock::{LockKind, flock};

use crate::machines::Machine;
use crate::ssh::{LoadInfo, SshTarget};

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error("offload state '{}': cannot {action}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting '{name}' is '{given}', expected a non-negative number")]
    Setting { name: &'static str, given: String },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ChoiceError {
    let path = path.to_owned();
    move |source| ChoiceError::Io {
        action,
        path,
        source,
    }
}

/// Tunables of the choice.
#[derive(Debug, Clone)]
pub struct ChoiceSettings {
    /// Load average per core above which a machine takes no more builds
    /// (infinite by default: on a machine shared with other work the load
    /// says little about what a build will get; farms set it, e.g. 0.8 as
    /// `guix offload` does).
    pub overload_per_core: f64,
    /// Free disk a machine must have for its store.
    pub min_free_bytes: u64,
    /// How long a load reading is reused.
    pub load_ttl: Duration,
    /// First back-off after a failed connection (doubles, up to `backoff_max`).
    pub backoff: Duration,
    pub backoff_max: Duration,
}

impl Default for ChoiceSettings {
    fn default() -> Self {
        ChoiceSettings {
            overload_per_core: f64::INFINITY,
            min_free_bytes: 64 << 20,
            load_ttl: Duration::from_secs(5),
            backoff: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
        }
    }
}

impl ChoiceSettings {
    /// [`from_env`](Self::from_env), then the daemon's settings
    /// `offload-max-load` (load average per core), `offload-min-free-mb`,
    /// `offload-load-ttl` and `offload-backoff` (seconds) — in `nix.conf`
    /// or `--option` for Kiln's scheduler, which passes its settings to the
    /// hook. (Nix's daemon passes only settings it knows; with it, use the
    /// machine's `?max-load=`/`?min-free-mb=` URI parameters or the
    /// environment.) A value that is not a number is an error naming it.
    pub fn from_settings(
        raw: &std::collections::BTreeMap<String, String>,
    ) -> Result<ChoiceSettings, ChoiceError> {
        let mut s = ChoiceSettings::from_env();
        let num = |k: &'static str| -> Result<Option<f64>, ChoiceError> {
            match raw.get(k).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => match v.parse::<f64>() {
                    Ok(f) if f >= 0.0 => Ok(Some(f)),
                    _ => Err(ChoiceError::Setting {
                        name: k,
                        given: v.to_owned(),
                    }),
                },
            }
        };
        if let Some(v) = num("offload-max-load")? {
            s.overload_per_core = v;
        }
        if let Some(v) = num("offload-min-free-mb")? {
            s.min_free_bytes = (v * 1048576.0) as u64;
        }
        if let Some(v) = num("offload-load-ttl")? {
            s.load_ttl = Duration::from_secs_f64(v);
        }
        if let Some(v) = num("offload-backoff")? {
            s.backoff = Duration::from_secs_f64(v);
        }
        Ok(s)
    }

    /// The defaults, overridden by `KILN_OFFLOAD_OVERLOAD`,
    /// `KILN_OFFLOAD_MIN_FREE_MB`, `KILN_OFFLOAD_LOAD_TTL`,
    /// `KILN_OFFLOAD_BACKOFF` (seconds).
    pub fn from_env() -> ChoiceSettings {
        let mut s = ChoiceSettings::default();
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = num("KILN_OFFLOAD_OVERLOAD") {
            s.overload_per_core = v;
        }
        if let Some(v) = num("KILN_OFFLOAD_MIN_FREE_MB") {
            s.min_free_bytes = (v * 1048576.0) as u64;
        }
        if let Some(v) = num("KILN_OFFLOAD_LOAD_TTL") {
            s.load_ttl = Duration::from_secs_f64(v);
        }
        if let Some(v) = num("KILN_OFFLOAD_BACKOFF") {
            s.backoff = Duration::from_secs_f64(v);
        }
        s
    }
}

/// A held job slot on a machine; released on drop.
#[derive(Debug)]
pub struct SlotLock {
    _file: File,
    pub slot: u32,
}

/// The outcome of a choice.
#[derive(Debug)]
pub enum Choice {
    /// Build on `machines[index]`, holding `slot`.
    Chosen {
        index: usize,
        slot: SlotLock,
        reason: String,
    },
    /// Every machine that could build it is busy (or down) now.
    Postpone { reason: String },
    /// No machine can ever build it (or a local slot should take it).
    Decline { reason: String },
}

/// One machine's state as `status` shows it.
#[derive(Debug, Clone)]
pub struct MachineState {
    pub slots_in_use: u32,
    pub down_for: Option<Duration>,
    pub failures: u32,
    pub load: Option<LoadInfo>,
}

/// The shared state directory and the SSH state beside it.
#[derive(Debug, Clone)]
pub struct Chooser {
    pub dir: PathBuf,
    pub ssh_state: PathBuf,
    pub settings: ChoiceSettings,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Chooser {
    /// State under `dir` (made if missing).
    pub fn new(
        dir: PathBuf,
        ssh_state: PathBuf,
        settings: ChoiceSettings,
    ) -> Result<Chooser, ChoiceError> {
        for sub in ["slots", "load", "down"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        Ok(Chooser {
            dir,
            ssh_state,
            settings,
        })
    }

    fn open_lock(path: &Path) -> Result<File, ChoiceError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open", path))
    }

    /// Tries to take slot `n` of `m` without waiting.
    fn try_slot(&self, m: &Machine, n: u32) -> Result<Option<SlotLock>, ChoiceError> {
        let path = self
            .dir
            .join("slots")
            .join(format!("{}-{n}", m.state_name()));
        loop {
            let file = Self::open_lock(&path)?;
            if !flock(&file, LockKind::Exclusive, false).map_err(io("lock", &path))? {
                return Ok(None);
            }
            let ours = file.metadata().map_err(io("stat", &path))?;
            match std::fs::metadata(&path) {
                Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => {
                    return Ok(Some(SlotLock {
                        _file: file,
                        slot: n,
                    }));
                }
                // Replaced while we locked it: the lock guards nothing.
                _ => continue,
            }
        }
    }

    /// Slots of `m` in use now.
    pub fn slots_in_use(&self, m: &Machine) -> Result<u32, ChoiceError> {
        let mut used = 0;
        for n in 0..m.max_jobs {
            if self.try_slot(m, n)?.is_none() {
                used += 1;
            }
        }
        Ok(used)
    }

    /// Until when (and after how many failures) `m` is marked down.
    pub fn down(&self, m: &Machine) -> Option<(Duration, u32)> {
        let text = std::fs::read_to_string(self.dir.join("down").join(m.state_name())).ok()?;
        let mut f = text.split_whitespace();
        let until: f64 = f.next()?.parse().ok()?;
        let failures: u32 = f.next()?.parse().ok()?;
        let left = until - now();
        Some((Duration::from_secs_f64(left.max(0.0)), failures))
    }

    /// Marks `m` down for a back-off that doubles with each failure.
    pub fn mark_down(&self, m: &Machine, why: &str) {
        let failures = self.down(m).map_or(0, |(_, f)| f) + 1;
        let secs = (self.settings.backoff.as_secs_f64() * 2f64.powi(failures as i32 - 1))
            .min(self.settings.backoff_max.as_secs_f64());
        let path = self.dir.join("down").join(m.state_name());
        let _ = std::fs::write(&path, format!("{} {failures}\n", now() + secs));
        self.log(&format!(
            "{} marked down for {secs:.0}s after {failures} failure(s): {why}",
            m.uri
        ));
    }

    /// Clears the down mark after a successful connection.
    pub fn mark_up(&self, m: &Machine) {
        let _ = std::fs::remove_file(self.dir.join("down").join(m.state_name()));
    }

    /// The load of `m`, from the cache if fresh, else read over SSH.
    pub fn load(&self, m: &Machine) -> Result<LoadInfo, crate::ssh::SshError> {
        let path = self.dir.join("load").join(m.state_name());
        if let Some(l) = self.cached_load(m, true) {
            return Ok(l);
        }
        let target = SshTarget::new(m, &self.ssh_state)?;
        let l = target.probe_load()?;
        let _ = std::fs::write(
            &path,
            format!("{} {} {} {}\n", now(), l.load1, l.cores, l.free_bytes),
        );
        Ok(l)
    }

    /// Why `m`, which could build, is not even considered: it already
    /// failed this build, or it is marked down.
    fn passed_over(&self, m: &Machine, exclude: &BTreeSet<String>) -> Option<String> {
        if exclude.contains(&m.uri) {
            return Some(format!("{}: already failed this build", m.uri));
        }
        let (left, n) = self.down(m).filter(|(d, _)| !d.is_zero())?;
        Some(format!(
            "{}: down for {:.0}s more ({n} failures)",
            m.uri,
            left.as_secs_f64()
        ))
    }

    /// Reads the load of every machine that could take a build of
    /// `system` with `features` and has no fresh reading, all at once:
    /// each may need a new SSH connection (a key exchange), and one after
    /// the other the first build waited for every machine in turn.
    /// Answers by index into `machines`.
    fn probe_loads(
        &self,
        machines: &[Machine],
        system: &str,
        features: &BTreeSet<String>,
        exclude: &BTreeSet<String>,
    ) -> HashMap<usize, Result<LoadInfo, crate::ssh::SshError>> {
        let stale = machines.iter().enumerate().filter(|(_, m)| {
            m.can_build(system, features)
                && self.passed_over(m, exclude).is_none()
                && self.cached_load(m, true).is_none()
        });
        std::thread::scope(|scope| {
            let probes: Vec<_> = stale
                .map(|(i, m)| (i, scope.spawn(move || self.load(m))))
                .collect();
            probes
                .into_iter()
                .map(|(i, probe)| (i, probe.join().expect("a load probe panicked")))
                .collect()
        })
    }

    /// The last load reading of `m`; only a fresh one if `fresh`.
    pub fn cached_load(&self, m: &Machine, fresh: bool) -> Option<LoadInfo> {
        let text = std::fs::read_to_string(self.dir.join("load").join(m.state_name())).ok()?;
        let f: Vec<&str> = text.split_whitespace().collect();
        let at: f64 = f.first()?.parse().ok()?;
        if fresh && now() - at > self.settings.load_ttl.as_secs_f64() {
            return None;
        }
        Some(LoadInfo {
            load1: f.get(1)?.parse().ok()?,
            cores: f.get(2)?.parse().ok()?,
            free_bytes: f.get(3)?.parse().ok()?,
        })
    }

    /// Appends a line to `choices.log` and says it on stderr. The log comes
    /// first and stderr's errors are ignored: stderr is the hook protocol's
    /// channel, which the scheduler may have closed once the build is done,
    /// and `eprintln!` would panic there and lose the line.
    pub fn log(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("choices.log"))
        {
            // One write: hooks append at once, and `writeln!` on a file
            // writes each piece of the format separately, so lines from
            // two processes could interleave.
            let _ = f.write_all(format!("{:.3} {line}\n", now()).as_bytes());
        }
        let _ = writeln!(std::io::stderr(), "offload: {line}");
    }

    /// The state of `m` for `status`.
    pub fn state(&self, m: &Machine) -> Result<MachineState, ChoiceError> {
        let down = self.down(m);
        Ok(MachineState {
            slots_in_use: self.slots_in_use(m)?,
            down_for: down.and_then(|(d, _)| (!d.is_zero()).then_some(d)),
            failures: down.map_or(0, |(_, f)| f),
            load: self.cached_load(m, false),
        })
    }

    /// Chooses a machine for a build of `system` needing `features`,
    /// skipping the URIs in `exclude` (machines that failed this build).
    /// `local_ok`: a local slot could take the build, so decline rather
    /// than postpone when every machine is busy.
    pub fn choose(
        &self,
        machines: &[Machine],
        what: &str,
        system: &str,
        features: &BTreeSet<String>,
        exclude: &BTreeSet<String>,
        local_ok: bool,
    ) -> Result<Choice, ChoiceError> {
        let main = self.dir.join("main-lock");
        let lock = Self::open_lock(&main)?;
        flock(&lock, LockKind::Exclusive, true).map_err(io("lock", &main))?;
        let mut probed = self.probe_loads(machines, system, features, exclude);
        let mut notes = Vec::new();
        let mut any_match = false;
        let mut best: Option<(f64, usize, SlotLock, String)> = None;
        for (i, m) in machines.iter().enumerate() {
            if !m.can_build(system, features) {
                notes.push(format!(
                    "{}: cannot build {system} with features {{{}}}",
                    m.uri,
                    join(features)
                ));
                continue;
            }
            any_match = true;
            if let Some(why) = self.passed_over(m, exclude) {
                notes.push(why);
                continue;
            }
            let mut free = None;
            let mut used = 0;
            for n in 0..m.max_jobs {
                match self.try_slot(m, n)? {
                    Some(s) if free.is_none() => free = Some(s),
                    Some(_) => {}
                    None => used += 1,
                }
            }
            let Some(slot) = free else {
                notes.push(format!("{}: busy ({used}/{} slots)", m.uri, m.max_jobs));
                continue;
            };
            let load = match probed.remove(&i).unwrap_or_else(|| self.load(m)) {
                Ok(l) => {
                    self.mark_up(m);
                    l
                }
                Err(e) => {
                    self.mark_down(m, &e.to_string());
                    notes.push(format!("{}: unreachable ({e})", m.uri));
                    continue;
                }
            };
            let max_load = m.max_load.unwrap_or(self.settings.overload_per_core);
            if load.per_core() > max_load {
                notes.push(format!(
                    "{}: overloaded (load {:.2} on {} cores > {max_load:.2}/core)",
                    m.uri, load.load1, load.cores
                ));
                continue;
            }
            let min_free = m
                .min_free_mb
                .map_or(self.settings.min_free_bytes, |mb| mb << 20);
            if load.free_bytes < min_free {
                notes.push(format!(
                    "{}: low on disk ({} MiB free < {} MiB)",
                    m.uri,
                    load.free_bytes >> 20,
                    min_free >> 20
                ));
                continue;
            }
            // Busy slots count fully, the machine's own load by core; a
            // faster machine divides both.
            let score =
                (f64::from(used) / f64::from(m.max_jobs.max(1)) + load.per_core()) / m.speed_factor;
            let note = format!(
                "{}: slots {used}/{}, load {:.2}/{} cores, speed {}, score {score:.3}",
                m.uri, m.max_jobs, load.load1, load.cores, m.speed_factor
            );
            notes.push(note.clone());
            let better = match &best {
                None => true,
                Some((s, bi, _, _)) => {
                    score < *s - 1e-9
                        || ((score - *s).abs() < 1e-9
                            && m.speed_factor > machines[*bi].speed_factor)
                }
            };
            if better {
                best = Some((score, i, slot, note));
            }
        }
        let considered = notes.join("; ");
        let choice = match best {
            Some((_, index, slot, _)) => {
                let path = self.dir.join("slots").join(format!(
                    "{}-{}",
                    machines[index].state_name(),
                    slot.slot
                ));
                // Touch the slot so `status` can tell when it was last taken.
                let _ = File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                let reason = format!(
                    "{what} → {} slot {} (lowest load per speed); considered: {considered}",
                    machines[index].uri, slot.slot
                );
                Choice::Chosen {
                    index,
                    slot,
                    reason,
                }
            }
            None if !any_match => Choice::Decline {
                reason: format!(
                    "{what}: no machine can build {system} with features {{{}}}; considered: {considered}",
                    join(features)
                ),
            },
            None if local_ok => Choice::Decline {
                reason: format!(
                    "{what}: every matching machine is busy and a local slot is free; considered: {considered}"
                ),
            },
            None => Choice::Postpone {
                reason: format!("{what}: every matching machine is busy; considered: {considered}"),
            },
        };
        drop(lock);
        match &choice {
            Choice::Chosen { reason, .. } => self.log(&format!("chose {reason}")),
            Choice::Postpone { reason } => self.log(&format!("postpone {reason}")),
            Choice::Decline { reason } => self.log(&format!("decline {reason}")),
        }
        Ok(choice)
    }
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chooser() -> (tempfile::TempDir, Chooser) {
        let d = tempfile::tempdir().unwrap();
        let c = Chooser::new(
            d.path().join("s"),
            d.path().join("ssh"),
            ChoiceSettings::default(),
        )
        .unwrap();
        (d, c)
    }

    /// `c.choose` for a build of x86_64-linux with no features or exclusions.
    fn choose(c: &Chooser, ms: &[Machine], local_ok: bool) -> Choice {
        c.choose(
            ms,
            "d",
            "x86_64-linux",
            &BTreeSet::new(),
            &BTreeSet::new(),
            local_ok,
        )
        .unwrap()
    }

    /// `c.slots_in_use(m)`, once it is `want`. A process that other tests
    /// start in the meantime holds copies of this one's descriptors from
    /// its fork to its exec, slot locks included, so a released slot can
    /// look taken for that moment.
    fn settled_slots_in_use(c: &Chooser, m: &Machine, want: u32) -> u32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let n = c.slots_in_use(m).unwrap();
            if n == want || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn slots_are_exclusive_across_openers() {
        let (_d, c) = chooser();
        let m = &crate::machines::parse_builders("ssh://a - - 2", "t", "x").unwrap()[0];
        let a = c.try_slot(m, 0).unwrap().expect("free");
        assert!(c.try_slot(m, 0).unwrap().is_none());
        assert_eq!(settled_slots_in_use(&c, m, 1), 1);
        drop(a);
        assert_eq!(settled_slots_in_use(&c, m, 0), 0);
    }

    #[test]
    fn decline_when_nothing_matches_and_down_is_skipped() {
        let (_d, c) = chooser();
        let ms =
            crate::machines::parse_builders("ssh://a aarch64-linux", "t", "x86_64-linux").unwrap();
        let ch = choose(&c, &ms, false);
        assert!(matches!(ch, Choice::Decline { .. }), "{ch:?}");
        let ms =
            crate::machines::parse_builders("ssh://a x86_64-linux", "t", "x86_64-linux").unwrap();
        c.mark_down(&ms[0], "test");
        assert!(c.down(&ms[0]).unwrap().0 > Duration::from_secs(5));
        let ch = choose(&c, &ms, false);
        assert!(matches!(ch, Choice::Postpone { .. }), "{ch:?}");
        let ch = choose(&c, &ms, true);
        assert!(matches!(ch, Choice::Decline { .. }), "{ch:?}");
        c.mark_down(&ms[0], "again");
        assert_eq!(c.down(&ms[0]).unwrap().1, 2);
    }

    /// The machines' loads are read at once: each probe (a stand-in for
    /// ssh) answers only once all three have started, and gives up after
    /// 10 s. One after the other, the first would give up and its machine
    /// be marked down.
    #[test]
    fn loads_are_probed_at_once() {
        use std::os::unix::fs::PermissionsExt as _;
        let (d, c) = chooser();
        let started = d.path().join("started");
        std::fs::create_dir(&started).unwrap();
        let ssh = d.path().join("fake-ssh");
        std::fs::write(
            &ssh,
            format!(
                "#!/bin/sh\nmktemp -p {s} >/dev/null\nfor i in $(seq 100); do\n  \
                 [ $(ls {s} | wc -l) -ge 3 ] && {{ printf '0.50 0.4 0.3 1/99 9\\n4\\nFS blocks used available capacity on\\n/dev/x 9 1 99999999 1pc /\\n'; exit 0; }}\n  \
                 sleep 0.1\ndone\nexit 1\n",
                s = started.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: no other test of this crate runs ssh or reads KILN_SSH.
        unsafe { std::env::set_var("KILN_SSH", &ssh) };
        let ms = crate::machines::parse_builders(
            "ssh://a x86_64-linux\nssh://b x86_64-linux\nssh://c x86_64-linux",
            "t",
            "x86_64-linux",
        )
        .unwrap();
        let ch = choose(&c, &ms, false);
        let Choice::Chosen { reason, .. } = ch else {
            panic!("{ch:?}");
        };
        assert!(!reason.contains("unreachable"), "{reason}");
        for m in &ms {
            assert!(c.down(m).is_none(), "{} marked down: {reason}", m.uri);
            assert_eq!(
                c.cached_load(m, true).map(|l| l.cores),
                Some(4),
                "{}",
                m.uri
            );
        }
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn daemon_settings_set_the_thresholds() {
        let raw = [
            ("offload-max-load".to_owned(), "0.8".to_owned()),
            ("offload-min-free-mb".to_owned(), "100".to_owned()),
        ]
        .into();
        let s = ChoiceSettings::from_settings(&raw).unwrap();
        assert_eq!(s.overload_per_core, 0.8);
        assert_eq!(s.min_free_bytes, 100 << 20);
        let bad = [("offload-max-load".to_owned(), "high".to_owned())].into();
        let e = ChoiceSettings::from_settings(&bad).unwrap_err().to_string();
        assert!(
            e.contains("offload-max-load") && e.contains("'high'"),
            "{e}"
        );
    }
}
