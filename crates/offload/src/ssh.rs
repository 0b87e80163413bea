//! The system's OpenSSH client, one shared master connection per machine
//! (`ControlMaster`), host keys checked against the machines file.
//!
//! Every command to a machine (the load probe, serve sessions of several
//! builds at once) goes through that master, so only the first pays for
//! the key exchange.
//!
//! Compression ([`Compression`]): a Kiln remote (`store-daemon`) is asked
//! for a zstd stream in both directions (`--zstd`), which carries a
//! typical closure in about a third of the bytes at a few hundred MB/s per
//! core; Nix's `nix-store --serve` knows no such thing and gets the plain
//! stream. The URI parameter `compress` chooses: `zstd`, `none`, or
//! `true` (SSH's own zlib `-C`, slow: ~20 MB/s). Unset, zstd is used for
//! Kiln remotes except on loopback addresses, where there is no link to
//! save and compressing only costs CPU (measured: 500 MB of store paths
//! over loopback take 0.9 s plain, 1.8 s through zstd level 1).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::machines::Machine;

/// What went wrong reaching a machine.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("machine '{uri}': {what}")]
    BadUri { uri: String, what: String },
    #[error("cannot run ssh for '{uri}': {source}")]
    Spawn { uri: String, source: std::io::Error },
    #[error("'{uri}': {command} failed: {stderr}")]
    Failed {
        uri: String,
        command: String,
        stderr: String,
    },
    #[error("cannot write SSH state under '{}': {source}", dir.display())]
    State {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("'{uri}': unexpected answer from the load probe: {output:?}")]
    Probe { uri: String, output: String },
}

/// OpenSSH's default ciphers with AES-GCM first: on a CPU with AES
/// instructions AES-GCM moves a NAR stream over SSH ~1.4× as fast as
/// OpenSSH's first choice, ChaCha20-Poly1305 (500 MB over loopback: 1.2–1.5 s
/// against 1.8–2.0 s). The list is the default set reordered, so every
/// server that accepts the default accepts it.
const AES_FIRST: &str = "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
                         chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// The `-o` option ordering ciphers, when this CPU has AES instructions
/// and the user's `NIX_SSHOPTS` does not choose ciphers itself.
fn preferred_ciphers(cpu_has_aes: bool, sshopts: Option<&str>) -> Option<&'static str> {
    let chosen = sshopts.is_some_and(|o| {
        o.split_whitespace().any(|w| w.starts_with("-c"))
            || o.to_ascii_lowercase().contains("ciphers")
    });
    (cpu_has_aes && !chosen).then_some(AES_FIRST)
}

/// Whether this CPU has AES instructions (x86's `aes` flag, ARM's `aes`
/// feature), read once.
fn cpu_has_aes() -> bool {
    static AES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AES.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
            info.lines()
                .find(|l| l.starts_with("flags") || l.starts_with("Features"))
                .is_some_and(|l| l.split_whitespace().any(|f| f == "aes"))
        })
    })
}

/// Which protocol the remote program speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `ssh://`: `nix-store --serve --write` / `store-daemon --serve --write`.
    Serve,
    /// `ssh-ng://`: `nix-daemon --stdio` / `store-daemon --stdio`.
    Daemon,
}

/// How the protocol stream to a machine is compressed (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// The stream as the protocol defines it (SSH's `-C` may still apply).
    None,
    /// A zstd stream each way, flushed at every message; only Kiln's
    /// `store-daemon --serve --zstd` speaks it.
    Zstd,
}

/// The zstd level of the stream: level 1 compresses store paths ~2.7× at
/// ~300 MB/s on one core; higher levels gain little and cost much more.
const ZSTD_LEVEL: i32 = 1;

/// How to reach one machine.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub uri: String,
    pub protocol: Protocol,
    /// `user@host` or `host`.
    pub destination: String,
    pub port: Option<u16>,
    pub params: BTreeMap<String, String>,
    pub key: Option<PathBuf>,
    pub host_key: Option<String>,
    /// Directory of control sockets and known_hosts files.
    pub state: PathBuf,
}

impl SshTarget {
    /// The target of `machine`, keeping its SSH state under `state`.
    pub fn new(machine: &Machine, state: &Path) -> Result<SshTarget, SshError> {
        let bad = |what: &str| SshError::BadUri {
            uri: machine.uri.clone(),
            what: what.to_owned(),
        };
        let (protocol, rest) = if let Some(r) = machine.uri.strip_prefix("ssh://") {
            (Protocol::Serve, r)
        } else if let Some(r) = machine.uri.strip_prefix("ssh-ng://") {
            (Protocol::Daemon, r)
        } else {
            return Err(bad(
                "only ssh:// and ssh-ng:// machines can be offloaded to",
            ));
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut params = BTreeMap::new();
        for p in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| bad("parameters must be name=value"))?;
            params.insert(k.to_owned(), percent_decode(v));
        }
        if authority.is_empty() {
            return Err(bad("no host"));
        }
        let (destination, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?;
                (h.to_owned(), Some(port))
            }
            _ => (authority.to_owned(), None),
        };
        let key = machine
            .ssh_key
            .clone()
            .or_else(|| params.get("ssh-key").map(PathBuf::from));
        Ok(SshTarget {
            uri: machine.uri.clone(),
            protocol,
            destination,
            port,
            params,
            key,
            host_key: machine.host_key.clone().or_else(|| {
                use base64::Engine as _;
                let b = params_get_b64(machine)?;
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .ok()
                    .and_then(|v| String::from_utf8(v).ok())
            }),
            state: state.to_owned(),
        })
    }

    fn known_hosts(&self) -> Result<Option<PathBuf>, SshError> {
        let Some(key) = &self.host_key else {
            return Ok(None);
        };
        let dir = self.state.join("known-hosts");
        std::fs::create_dir_all(&dir).map_err(|source| SshError::State {
            dir: dir.clone(),
            source,
        })?;
        let file = dir.join(short_hash(&self.uri));
        // Keyed by an alias, so one line fits any host name and port form.
        let line = format!("kiln-offload-{} {}\n", short_hash(&self.uri), key.trim());
        if std::fs::read_to_string(&file).ok().as_deref() != Some(line.as_str()) {
            let tmp = file.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &line)
                .and_then(|()| std::fs::rename(&tmp, &file))
                .map_err(|source| SshError::State {
                    dir: dir.clone(),
                    source,
                })?;
        }
        Ok(Some(file))
    }

    /// The options every invocation shares.
    fn base_args(&self) -> Result<Vec<OsString>, SshError> {
        let control = self.state.join("ctl");
        std::fs::create_dir_all(&control).map_err(|source| SshError::State {
            dir: control.clone(),
            source,
        })?;
        let mut a: Vec<OsString> = Vec::new();
        let mut o = |s: String| {
            a.push("-o".into());
            a.push(s.into());
        };
        o("BatchMode=yes".into());
        o("ControlMaster=auto".into());
        o(format!("ControlPath={}/%C", control.display()));
        o("ControlPersist=120".into());
        o("ConnectTimeout=10".into());
        // A dead peer is noticed within ~15 s even while a build is silent.
        o("ServerAliveInterval=5".into());
        o("ServerAliveCountMax=3".into());
        o("LogLevel=ERROR".into());
        if let Some(known) = self.known_hosts()? {
            o(format!("UserKnownHostsFile={}", known.display()));
            o("GlobalKnownHostsFile=/dev/null".into());
            o("StrictHostKeyChecking=yes".into());
            o(format!(
                "HostKeyAlias=kiln-offload-{}",
                short_hash(&self.uri)
            ));
        }
        let sshopts = std::env::var("NIX_SSHOPTS").ok();
        if let Some(ciphers) = preferred_ciphers(cpu_has_aes(), sshopts.as_deref()) {
            o(ciphers.to_owned());
        }
        if self.params.get("compress").is_some_and(|v| v == "true") {
            a.push("-C".into());
        }
        if let Some(k) = &self.key {
            a.push("-i".into());
            a.push(k.into());
        }
        if let Some(p) = self.port {
            a.push("-p".into());
            a.push(p.to_string().into());
        }
        // Options for every machine, as Nix reads them.
        if let Some(extra) = sshopts {
            a.extend(extra.split_whitespace().map(OsString::from));
        }
        Ok(a)
    }

    /// `ssh … DEST -- remote_command`, nothing wired yet.
    pub fn command(&self, remote_command: &str) -> Result<Command, SshError> {
        let mut cmd = Command::new(std::env::var_os("KILN_SSH").unwrap_or_else(|| "ssh".into()));
        cmd.args(self.base_args()?)
            .arg("-x")
            .arg("-a")
            .arg("-T")
            .arg(&self.destination)
            .arg("--")
            .arg(remote_command);
        Ok(cmd)
    }

    /// Whether the remote program is Kiln's `store-daemon` (by its name).
    fn remote_is_kiln(&self) -> bool {
        self.params.get("remote-program").is_some_and(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("store-daemon"))
        })
    }

    /// Whether the host is this machine (a loopback address).
    fn is_loopback(&self) -> bool {
        let host = self
            .destination
            .rsplit_once('@')
            .map_or(self.destination.as_str(), |(_, h)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// How this machine's protocol stream is compressed.
    pub fn compression(&self) -> Compression {
        match self.params.get("compress").map(String::as_str) {
            Some("zstd") => Compression::Zstd,
            Some(_) => Compression::None,
            None if self.protocol == Protocol::Serve
                && self.remote_is_kiln()
                && !self.is_loopback() =>
            {
                Compression::Zstd
            }
            None => Compression::None,
        }
    }

    /// The remote program and its arguments for this machine's protocol.
    pub fn remote_program(&self) -> String {
        let (default, args) = match (self.protocol, self.compression()) {
            (Protocol::Serve, Compression::None) => ("nix-store", "--serve --write"),
            (Protocol::Serve, Compression::Zstd) => ("nix-store", "--serve --write --zstd"),
            (Protocol::Daemon, _) => ("nix-daemon", "--stdio"),
        };
        let program = self
            .params
            .get("remote-program")
            .map_or(default, String::as_str);
        let mut s = format!("{program} {args}");
        if let Some(store) = self.params.get("remote-store") {
            s = format!("{program} --store {} {args}", shell_quote(store));
        }
        s
    }

    /// Runs `remote_command` to completion and returns its stdout.
    pub fn run(&self, remote_command: &str, timeout: Duration) -> Result<String, SshError> {
        let mut child = self
            .command(remote_command)?
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SshError::Spawn {
                uri: self.uri.clone(),
                source,
            })?;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let pid = child.id();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(timeout).is_err() {
                // SAFETY: signalling our own child, which has not been reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
        let mut stdout = String::new();
        let _ = out.read_to_string(&mut stdout);
        let status = child.wait();
        let _ = done_tx.send(());
        let _ = watchdog.join();
        let stderr = err_thread.join().unwrap_or_default();
        match status {
            Ok(s) if s.success() => Ok(stdout),
            _ => Err(SshError::Failed {
                uri: self.uri.clone(),
                command: remote_command.to_owned(),
                stderr: if stderr.trim().is_empty() {
                    format!("no answer within {}s or ssh failed", timeout.as_secs())
                } else {
                    stderr.trim().to_owned()
                },
            }),
        }
    }

    /// Where `df` should look on the remote: the remote store's root if
    /// the URI names one, else the store directory.
    fn remote_disk_dir(&self) -> String {
        match self.params.get("remote-store") {
            Some(s) => match s.split_once("root=") {
                Some((_, root)) => root.split('&').next().unwrap_or("/").to_owned(),
                None if s.starts_with('/') => s.clone(),
                None => "/nix/store".into(),
            },
            None => "/nix/store".into(),
        }
    }

    /// Reads the remote's load average, cores and free disk.
    pub fn probe_load(&self) -> Result<LoadInfo, SshError> {
        let dir = shell_quote(&self.remote_disk_dir());
        let cmd = format!("cat /proc/loadavg; nproc; df -Pk {dir} 2>/dev/null || df -Pk /");
        let out = self.run(&cmd, Duration::from_secs(20))?;
        let bad = || SshError::Probe {
            uri: self.uri.clone(),
            output: out.clone(),
        };
        let mut lines = out.lines();
        let load1 = lines
            .next()
            .and_then(|l| l.split_whitespace().next())
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(bad)?;
        let cores = lines
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
            .ok_or_else(bad)?;
        let free_kb = lines
            .last()
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(bad)?;
        Ok(LoadInfo {
            load1,
            cores: cores.max(1),
            free_bytes: free_kb * 1024,
        })
    }

    /// Starts the remote program with its stdin/stdout piped to us; its
    /// stderr (the remote build log) goes line by line to `log`.
    pub fn open_session(&self, log: LogSink) -> Result<Session, SshError> {
        self.spawn_session(log, None)
    }

    /// Starts the remote program (`ssh-ng://`: the daemon on stdio) with
    /// one end of a socket pair as its stdin and stdout, and returns the
    /// other end: the daemon client speaks on a Unix stream, and ssh reads
    /// and writes the socket itself, with no thread copying between them.
    pub fn open_socket_session(
        &self,
        log: LogSink,
    ) -> Result<(Session, std::os::unix::net::UnixStream), SshError> {
        let spawn_err = |source| SshError::Spawn {
            uri: self.uri.clone(),
            source,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_err)?;
        let session = self.spawn_session(log, Some(theirs))?;
        Ok((session, ours))
    }

    fn spawn_session(
        &self,
        log: LogSink,
        socket: Option<std::os::unix::net::UnixStream>,
    ) -> Result<Session, SshError> {
        let spawn_err = |source| SshError::Spawn {
            uri: self.uri.clone(),
            source,
        };
        let mut cmd = self.command(&self.remote_program())?;
        match socket {
            Some(s) => {
                let fd = std::os::fd::OwnedFd::from(s);
                let fd2 = fd.try_clone().map_err(spawn_err)?;
                cmd.stdin(Stdio::from(fd)).stdout(Stdio::from(fd2));
            }
            None => {
                cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
            }
        }
        let mut child = cmd.stderr(Stdio::piped()).spawn().map_err(spawn_err)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        if let (Some(i), Some(o)) = (&stdin, &stdout) {
            use std::os::fd::AsFd;
            kiln_protocol::wire::widen_pipe(i.as_fd());
            kiln_protocol::wire::widen_pipe(o.as_fd());
        }
        let stderr = child.stderr.take().expect("piped");
        let tail = Arc::new(Mutex::new(Vec::<String>::new()));
        let activity = Arc::new(Mutex::new(std::time::Instant::now()));
        let (t, a) = (tail.clone(), activity.clone());
        let reader = std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                *a.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
                log.write(&line);
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                t.push(String::from_utf8_lossy(&line).trim_end().to_owned());
                if t.len() > 25 {
                    t.remove(0);
                }
            }
        });
        Ok(Session {
            child,
            compression: if self.protocol == Protocol::Serve {
                self.compression()
            } else {
                Compression::None
            },
            stdin,
            stdout,
            tail,
            activity,
            reader: Some(reader),
        })
    }

    /// Stops the master connection (used by `status` after a machine was
    /// found dead, and by tests).
    pub fn exit_master(&self) {
        if let Ok(args) = self.base_args() {
            let _ = Command::new(std::env::var_os("KILN_SSH").unwrap_or_else(|| "ssh".into()))
                .args(args)
                .arg("-O")
                .arg("exit")
                .arg(&self.destination)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn params_get_b64(machine: &Machine) -> Option<String> {
    let q = machine.uri.split_once('?')?.1;
    q.split('&').find_map(|p| {
        p.strip_prefix("base64-ssh-public-host-key=")
            .map(str::to_owned)
    })
}

/// Load, cores and free disk of a machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadInfo {
    pub load1: f64,
    pub cores: u32,
    pub free_bytes: u64,
}

impl LoadInfo {
    /// Load per core: 1.0 is every core busy.
    pub fn per_core(&self) -> f64 {
        self.load1 / f64::from(self.cores)
    }
}

/// Where remote log lines go (fd 4 under a daemon, stderr otherwise).
#[derive(Clone)]
pub struct LogSink(Arc<Mutex<Box<dyn Write + Send>>>);

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

impl LogSink {
    pub fn new(w: impl Write + Send + 'static) -> LogSink {
        LogSink(Arc::new(Mutex::new(Box::new(w))))
    }

    pub fn write(&self, bytes: &[u8]) {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.write_all(bytes);
        let _ = w.flush();
    }

    pub fn line(&self, s: &str) {
        self.write(format!("{s}\n").as_bytes());
    }
}

/// A running remote program.
#[derive(Debug)]
pub struct Session {
    child: Child,
    compression: Compression,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    tail: Arc<Mutex<Vec<String>>>,
    activity: Arc<Mutex<std::time::Instant>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Session {
    /// The streams to speak the protocol on.
    pub fn take_streams(&mut self) -> (ChildStdout, ChildStdin) {
        (
            self.stdout.take().expect("streams taken once"),
            self.stdin.take().expect("streams taken once"),
        )
    }

    /// The streams to speak the protocol on, through zstd when the
    /// session is compressed: each flush of the writer ends a zstd block,
    /// so a message is complete at the other end when it is flushed.
    pub fn take_channel(&mut self) -> (Box<dyn Read + Send>, Box<dyn Write + Send>) {
        let (r, w) = self.take_streams();
        match self.compression {
            Compression::None => (Box::new(r), Box::new(w)),
            Compression::Zstd => {
                // Neither fails but on allocation: the streams are ours.
                let r = zstd::stream::read::Decoder::new(r).expect("a zstd decoder");
                let w = zstd::stream::write::Encoder::new(w, ZSTD_LEVEL).expect("a zstd encoder");
                (Box::new(r), Box::new(w))
            }
        }
    }

    /// The last lines the remote wrote on stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When the remote last wrote to stderr.
    pub fn last_activity(&self) -> std::time::Instant {
        *self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared last-activity time, for a watchdog thread.
    pub fn activity_handle(&self) -> Arc<Mutex<std::time::Instant>> {
        self.activity.clone()
    }

    /// The ssh process, to kill it when a deadline passes.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the session and waits for ssh (and the log reader).
    pub fn finish(mut self) -> Option<i32> {
        drop(self.stdin.take());
        drop(self.stdout.take());
        let status = self.child.wait().ok().and_then(|s| s.code());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        status
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn short_hash(s: &str) -> String {
    let d = <sha2::Sha256 as sha2::Digest>::digest(s.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Quotes `s` for the remote shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:@,+%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            // Bytes, not a slice of the string: the two after '%' need not
            // be on character boundaries.
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_forms() {
        let m = crate::machines::parse_builders(
            "ssh://root@127.0.0.2:2222?remote-program=store-daemon&remote-store=local%3Froot%3D/tmp/r x86_64-linux",
            "t",
            "x86_64-linux",
        )
        .unwrap();
        let t = SshTarget::new(&m[0], Path::new("/tmp/s")).unwrap();
        assert_eq!(t.destination, "root@127.0.0.2");
        assert_eq!(t.port, Some(2222));
        assert_eq!(
            t.remote_program(),
            "store-daemon --store 'local?root=/tmp/r' --serve --write"
        );
        assert_eq!(t.remote_disk_dir(), "/tmp/r");
        assert_eq!(percent_decode("a%3Db%é%2"), "a=b%é%2");
    }

    #[test]
    fn aes_gcm_first_unless_the_cpu_lacks_aes_or_the_user_chose() {
        let list = preferred_ciphers(true, None).expect("AES-GCM first");
        assert!(
            list.starts_with("Ciphers=aes128-gcm@openssh.com,"),
            "{list}"
        );
        // Every cipher of OpenSSH's default set is still offered.
        for c in [
            "chacha20-poly1305@openssh.com",
            "aes256-ctr",
            "aes256-gcm@openssh.com",
        ] {
            assert!(list.contains(c), "{c} missing from {list}");
        }
        assert!(!list.contains(char::is_whitespace), "{list}");
        assert_eq!(preferred_ciphers(false, None), None);
        assert_eq!(preferred_ciphers(true, Some("-c aes256-ctr")), None);
        assert_eq!(
            preferred_ciphers(true, Some("-o Ciphers=aes256-ctr -p 22")),
            None
        );
        assert_eq!(preferred_ciphers(true, Some("-caes256-ctr")), None);
        assert!(preferred_ciphers(true, Some("-o Compression=yes -p 2222")).is_some());
    }

    #[test]
    fn zstd_only_for_kiln_remotes_off_loopback_unless_asked() {
        let target = |uri: &str| {
            let m =
                crate::machines::parse_builders(&format!("{uri} x86_64-linux"), "t", "x").unwrap();
            SshTarget::new(&m[0], Path::new("/tmp/s")).unwrap()
        };
        let kiln = target("ssh://root@builder?remote-program=/opt/bin/store-daemon");
        assert_eq!(kiln.compression(), Compression::Zstd);
        assert_eq!(
            kiln.remote_program(),
            "/opt/bin/store-daemon --serve --write --zstd"
        );
        let nix = target("ssh://root@builder");
        assert_eq!(nix.compression(), Compression::None);
        assert_eq!(nix.remote_program(), "nix-store --serve --write");
        for local in [
            "ssh://root@127.0.0.5:22?remote-program=store-daemon",
            "ssh://localhost?remote-program=store-daemon",
            "ssh://[::1]:2222?remote-program=store-daemon",
        ] {
            assert_eq!(target(local).compression(), Compression::None, "{local}");
        }
        let forced = target("ssh://127.0.0.1?remote-program=store-daemon&compress=zstd");
        assert_eq!(forced.compression(), Compression::Zstd);
        let off = target("ssh://builder?remote-program=store-daemon&compress=none");
        assert_eq!(off.compression(), Compression::None);
        let ng = target("ssh-ng://builder?remote-program=store-daemon");
        assert_eq!(ng.compression(), Compression::None);
        assert_eq!(ng.remote_program(), "store-daemon --stdio");
    }
}
