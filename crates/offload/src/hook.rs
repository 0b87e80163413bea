//! The hook side of Nix's build-hook protocol: what `offload-hook` does
//! when a daemon (Kiln's scheduler, or Nix's `nix-daemon` through its
//! `build-hook` setting) starts it.
//!
//! Stdin (Nix's wire format): the daemon's settings as `1 name value`…
//! `0`, then per offer `"try" amWilling system drvPath features`. Stderr:
//! `# accept` + the machine's URI, `# decline`, `# decline-permanently` or
//! `# postpone`; other lines are messages. After `# accept`: the input
//! paths and the wanted outputs (names from Nix, paths from Kiln) on
//! stdin, the build log on fd 4, and the exit status says how it ended:
//! 0 built, 100 permanent failure, 101 timed out, anything else transient.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::fd::FromRawFd as _;
use std::path::PathBuf;
use std::time::Duration;

use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_protocol::wire;
use kiln_store::local::LocalStore;
use kiln_store::{Store, StoreUrl};

use crate::choice::{Choice, ChoiceSettings, Chooser};
use crate::machines::{self, Machine};
use crate::remote::{self, Failure, Job};
use crate::ssh::{LogSink, SshTarget};

/// Why the hook could not start or follow the protocol.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("reading from the daemon: {0}")]
    Wire(#[from] wire::WireError),
    #[error("{0}")]
    Machines(#[from] machines::MachinesError),
    #[error("store '{url}': {what}")]
    Store { url: String, what: String },
    #[error("{0}")]
    Choice(#[from] crate::choice::ChoiceError),
    #[error("the daemon sent a bad store path '{0}'")]
    BadPath(String),
    #[error("cannot read derivation '{path}': {what}")]
    Derivation { path: String, what: String },
}

/// Exit statuses, as the daemon reads them.
pub const EXIT_PERMANENT: i32 = 100;
pub const EXIT_TIMED_OUT: i32 = 101;
pub const EXIT_TRANSIENT: i32 = 1;

/// The daemon settings the hook uses.
#[derive(Debug, Clone, Default)]
pub struct HookSettings {
    pub raw: BTreeMap<String, String>,
}

impl HookSettings {
    fn get(&self, k: &str) -> Option<&str> {
        self.raw
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// This machine's system type.
    pub fn system(&self) -> String {
        self.get("system").map_or_else(this_system, str::to_owned)
    }

    /// The machines: the `builders` setting, else `/etc/nix/machines`.
    pub fn machines(&self) -> Result<Vec<Machine>, machines::MachinesError> {
        let builders = self.get("builders").unwrap_or("@/etc/nix/machines");
        machines::parse_builders(builders, "builders", &self.system())
    }

    fn secs(&self, k: &str) -> Option<Duration> {
        self.get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n > 0)
            .map(Duration::from_secs)
    }

    /// Opens the local store the daemon uses (`store` setting, else
    /// `KILN_STORE`, else the machine's).
    pub fn open_store(&self) -> Result<LocalStore, HookError> {
        let url = self
            .get("store")
            .map(str::to_owned)
            .or_else(|| std::env::var("KILN_STORE").ok())
            .unwrap_or_else(|| "auto".into());
        let bad = |what: String| HookError::Store {
            url: url.clone(),
            what,
        };
        let parsed: StoreUrl = url
            .parse()
            .map_err(|e: kiln_store::UrlError| bad(e.to_string()))?;
        let config = parsed
            .local_config()
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("the build hook needs a local store".into()))?;
        LocalStore::open(config).map_err(|e| bad(e.to_string()))
    }

    fn local_ok(&self, am_willing: bool, system: &str) -> bool {
        let max_jobs = self
            .get("max-jobs")
            .map_or(1, |v| v.parse::<u64>().unwrap_or(1));
        let extra: BTreeSet<&str> = self
            .get("extra-platforms")
            .unwrap_or("")
            .split_whitespace()
            .collect();
        am_willing && max_jobs > 0 && (system == self.system() || extra.contains(system))
    }
}

/// `x86_64-linux` and so on, for this machine.
pub fn this_system() -> String {
    let arch = std::env::consts::ARCH;
    format!("{arch}-{}", std::env::consts::OS)
}

/// Where hooks of a store keep shared state, and SSH its sockets, with
/// the choice settings from the environment.
pub fn chooser_for(store: &LocalStore) -> Result<Chooser, HookError> {
    chooser_with(store, ChoiceSettings::from_env())
}

/// [`chooser_for`] with the given choice settings.
pub fn chooser_with(store: &LocalStore, settings: ChoiceSettings) -> Result<Chooser, HookError> {
    let ssh_state = std::env::var_os("KILN_OFFLOAD_SSH_DIR")
        .map(PathBuf::from)
        // Control sockets need a short path (108 bytes).
        .unwrap_or_else(|| {
            PathBuf::from(format!("/tmp/kiln-offload-ssh-{}", unsafe {
                libc::geteuid()
            }))
        });
    let _ = std::fs::create_dir_all(&ssh_state);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&ssh_state, std::fs::Permissions::from_mode(0o700));
    }
    Ok(Chooser::new(
        store.state_dir().join("offload"),
        ssh_state,
        settings,
    )?)
}

fn say(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
    let _ = e.flush();
}

/// Reads the settings block the daemon sends first.
pub fn read_settings(r: &mut impl Read) -> Result<HookSettings, HookError> {
    let mut raw = BTreeMap::new();
    while wire::read_u64(r)? != 0 {
        let name = wire::read_string(r)?;
        let value = wire::read_string(r)?;
        raw.insert(name, value);
    }
    Ok(HookSettings { raw })
}

/// The build log: fd 4 when the daemon gave us one, else stderr.
fn log_sink() -> LogSink {
    // SAFETY: fcntl on a descriptor number only queries it.
    if unsafe { libc::fcntl(4, libc::F_GETFD) } >= 0 {
        // SAFETY: fd 4 is open (checked above) and ours alone from here on.
        LogSink::new(unsafe { std::fs::File::from_raw_fd(4) })
    } else {
        LogSink::new(std::io::stderr())
    }
}

/// Runs the protocol on `input` until the daemon stops offering or a
/// build was accepted and ended; returns the exit status.
pub fn run(input: &mut impl Read) -> Result<i32, HookError> {
    let settings = read_settings(input)?;
    let machines = settings.machines()?;
    if machines.is_empty() {
        say("# decline-permanently");
        return Ok(0);
    }
    let store = settings.open_store()?;
    let chooser = chooser_with(&store, ChoiceSettings::from_settings(&settings.raw)?)?;
    loop {
        let cmd = match wire::read_string(input) {
            Ok(s) => s,
            Err(e) if e.is_eof() => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        if cmd != "try" {
            return Ok(0);
        }
        let am_willing = wire::read_u64(input)? != 0;
        let system = wire::read_string(input)?;
        let drv_path = wire::read_string(input)?;
        let features: BTreeSet<String> = wire::read_strings(input)?.into_iter().collect();
        let local_ok = settings.local_ok(am_willing, &system);
        match chooser.choose(
            &machines,
            &drv_path,
            &system,
            &features,
            &BTreeSet::new(),
            local_ok,
        )? {
            Choice::Decline { .. } => say("# decline"),
            Choice::Postpone { .. } => say("# postpone"),
            Choice::Chosen { index, slot, .. } => {
                say("# accept");
                say(&machines[index].uri);
                let inputs = wire::read_strings(input)?;
                let wanted = wire::read_strings(input)?;
                let accepted = Accepted {
                    settings: &settings,
                    store: &store,
                    chooser: &chooser,
                    machines: &machines,
                    drv_path: &drv_path,
                    system: &system,
                    features: &features,
                };
                return accepted.build(index, slot, &inputs, &wanted);
            }
        }
    }
}

struct Accepted<'a> {
    settings: &'a HookSettings,
    store: &'a LocalStore,
    chooser: &'a Chooser,
    machines: &'a [Machine],
    drv_path: &'a str,
    system: &'a str,
    features: &'a BTreeSet<String>,
}

impl Accepted<'_> {
    fn build(
        &self,
        first: usize,
        first_slot: crate::choice::SlotLock,
        inputs: &[String],
        wanted: &[String],
    ) -> Result<i32, HookError> {
        let sd = self.store.store_dir().clone();
        let parse = |s: &str| {
            sd.parse_path(s)
                .map_err(|_| HookError::BadPath(s.to_owned()))
        };
        let drv_path = parse(self.drv_path)?;
        let drv_bad = |what: String| HookError::Derivation {
            path: self.drv_path.to_owned(),
            what,
        };
        let text =
            std::fs::read(self.store.real_path(&drv_path)).map_err(|e| drv_bad(e.to_string()))?;
        let drv = kiln_derivation::aterm::parse(&sd, &text).map_err(|e| drv_bad(e.to_string()))?;
        let mut input_set = StorePathSet::new();
        for i in inputs {
            input_set.insert(parse(i)?);
        }
        let input_set = kiln_store::compute_closure(self.store, &input_set, false, false, false)
            .map_err(|e| drv_bad(format!("input closure: {e}")))?;
        let outputs: BTreeMap<String, StorePath> = drv
            .output_paths()
            .map(|(n, p)| (n.to_owned(), p.clone()))
            .collect();
        let mut wanted_map = BTreeMap::new();
        for w in wanted {
            if w.starts_with('/') {
                let p = parse(w)?;
                if let Some((n, _)) = outputs.iter().find(|(_, o)| **o == p) {
                    wanted_map.insert(n.clone(), p);
                }
            } else if let Some(p) = outputs.get(w) {
                wanted_map.insert(w.clone(), p.clone());
            }
        }
        if wanted_map.is_empty() {
            wanted_map = outputs.clone();
        }
        // The daemon locked the outputs before offering the build (Nix
        // does); registering them must not wait for those locks.
        self.store
            .assume_locks_held_by_parent(outputs.values().cloned());
        let job = Job {
            store: self.store,
            drv_path: drv_path.clone(),
            drv: &drv,
            inputs: input_set,
            wanted: wanted_map,
            timeout: self.settings.secs("timeout"),
            max_silent: self.settings.secs("max-silent-time"),
            max_log_size: self
                .settings
                .get("max-build-log-size")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        };
        let log = log_sink();
        let max_tries: u32 = std::env::var("KILN_OFFLOAD_MAX_TRIES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
            .max(1);
        let mut exclude = BTreeSet::new();
        let mut current = Some((first, first_slot));
        let mut last_error = String::new();
        for attempt in 1..=max_tries {
            let (index, slot) = match current.take() {
                Some(c) => c,
                None => match self.next_machine(&mut exclude, attempt)? {
                    Some(c) => c,
                    None => break,
                },
            };
            let machine = &self.machines[index];
            let target = match SshTarget::new(machine, &self.chooser.ssh_state) {
                Ok(t) => t,
                Err(e) => {
                    last_error = e.to_string();
                    exclude.insert(machine.uri.clone());
                    continue;
                }
            };
            self.chooser.log(&format!(
                "building {} on {} (slot {}, attempt {attempt}/{max_tries})",
                self.drv_path, machine.uri, slot.slot
            ));
            match remote::build(&target, &job, log.clone()) {
                Ok(stats) => {
                    self.chooser.log(&format!(
                        "built {} on {}: sent {} paths ({} bytes, {} already there) in {:.2}s, built in {:.2}s, fetched {} bytes in {:.2}s",
                        self.drv_path,
                        machine.uri,
                        stats.sent_paths,
                        stats.sent_bytes,
                        stats.already_there,
                        stats.upload.as_secs_f64(),
                        stats.build.as_secs_f64(),
                        stats.fetched_bytes,
                        stats.download.as_secs_f64()
                    ));
                    return Ok(0);
                }
                Err(Failure::Permanent(msg)) => {
                    log.line(&msg);
                    say(&format!("error: {msg}"));
                    return Ok(EXIT_PERMANENT);
                }
                Err(Failure::TimedOut(msg)) => {
                    log.line(&msg);
                    say(&format!("error: {msg}"));
                    return Ok(EXIT_TIMED_OUT);
                }
                Err(Failure::Transient(msg)) => {
                    self.chooser.mark_down(machine, &msg);
                    self.chooser.log(&format!(
                        "build of {} on {} failed transiently, moving it: {msg}",
                        self.drv_path, machine.uri
                    ));
                    exclude.insert(machine.uri.clone());
                    last_error = msg;
                    drop(slot);
                }
            }
        }
        say(&format!(
            "error: could not build '{}' on any machine after {max_tries} tries; last error: {last_error}",
            self.drv_path
        ));
        Ok(EXIT_TRANSIENT)
    }

    /// Another machine for a retry: waits while all are busy; when every
    /// matching machine has failed, tries them again after a back-off.
    fn next_machine(
        &self,
        exclude: &mut BTreeSet<String>,
        attempt: u32,
    ) -> Result<Option<(usize, crate::choice::SlotLock)>, HookError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        let mut cleared = false;
        while std::time::Instant::now() < deadline {
            let features = self.features;
            match self.chooser.choose(
                self.machines,
                self.drv_path,
                self.system,
                features,
                exclude,
                false,
            )? {
                Choice::Chosen { index, slot, .. } => return Ok(Some((index, slot))),
                Choice::Decline { .. } if cleared => return Ok(None),
                Choice::Decline { .. } => {
                    // Every machine that could build it failed it: wait out
                    // a back-off and give them another chance.
                    std::thread::sleep(Duration::from_secs(u64::from(attempt)));
                    exclude.clear();
                    cleared = true;
                }
                Choice::Postpone { .. } => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        Ok(None)
    }
}
