//! Running one VM with qemu: accelerator choice, overlays, the QMP control
//! socket and the serial log.
//!
//! The guest gets one user-mode network card with `restrict=on`, so it can
//! reach nothing at all except the single `guestfwd` address that leads to
//! the agent's channel ([`GUEST_AGENT_ADDR`]): each connection the guest
//! opens there runs the relay command, which joins it to the agent's HTTP
//! server on the host's loopback.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::machine::Machine;

/// Where the guest finds the agent (qemu's guestfwd address).
pub const GUEST_AGENT_ADDR: &str = "10.0.2.100:80";

/// What went wrong running qemu.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("QMP socket {path}: {message}")]
    Qmp { path: PathBuf, message: String },
}

/// How to accelerate guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The qemu program to run.
pub fn qemu_program() -> String {
    std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// Whether KVM really runs a guest here: `/dev/kvm` may exist where nested
/// virtualisation does not work (the VM then hangs), so we boot `kernel` with
/// KVM and wait for its first console line.
pub fn probe_kvm(kernel: &Path, timeout: Duration) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(mut child) = Command::new(qemu_program())
        .args(["-accel", "kvm", "-M", "pc", "-m", "128", "-display", "none"])
        .args(["-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Linux version") {
                let _ = tx.send(());
                return;
            }
        }
    });
    let ok = rx.recv_timeout(timeout).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    ok
}

/// `qemu-img create -f qcow2 -b BACKING -F qcow2 OVERLAY`: a copy-on-write overlay.
pub fn create_overlay(backing: &Path, overlay: &Path) -> Result<(), QemuError> {
    let backing = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_owned());
    let output = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&backing)
        .arg(overlay)
        .output()
        .map_err(|source| QemuError::Spawn {
            program: "qemu-img".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(QemuError::Failed {
            program: "qemu-img create".into(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub accel: Accel,
    pub disk: PathBuf,
    /// Where the run's files go: the QMP socket, the serial log, the pid file.
    pub run_dir: PathBuf,
    /// Command qemu runs per guest connection to the agent address; it must
    /// join stdin/stdout to the agent's channel.
    pub relay: Vec<String>,
    /// Extra kernel command line (e.g. `kiln.mode=bootstrap`).
    pub append: String,
    pub cache_unsafe: bool,
    /// Resume from this saved state (see [`Vm::save_state`]) instead of
    /// booting; `disk` must then be an overlay of the disk the state was
    /// saved with, unchanged since.
    pub incoming: Option<PathBuf>,
}

/// The MAC address guests get when the manifest names none: a saved state
/// and the VM it is restored into must agree on it (and each guest has a
/// user-mode network of its own, so they never meet).
pub const DEFAULT_MAC: &str = "52:54:00:6b:69:6c";

/// A running (or ended) qemu.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    pub qmp_path: PathBuf,
    pub serial_log: PathBuf,
    pub pid_file: PathBuf,
    pub started: Instant,
}

fn escape_commas(s: &str) -> String {
    s.replace(',', ",,")
}

impl Vm {
    /// Starts `machine` as `spec` says.
    pub fn start(machine: &Machine, spec: &VmSpec) -> Result<Vm, QemuError> {
        let m = &machine.manifest;
        let qmp_path = spec.run_dir.join("qmp.sock");
        let serial_log = spec.run_dir.join("serial.log");
        let pid_file = spec.run_dir.join("qemu.pid");
        let _ = std::fs::remove_file(&qmp_path);
        let relay = spec.relay.join(" ");
        let mac = m.mac.clone().unwrap_or_else(|| DEFAULT_MAC.to_owned());
        let mut command = Command::new(qemu_program());
        command
            .args(["-accel", spec.accel.as_str(), "-M", "pc", "-m", "512"])
            .args(["-display", "none", "-nodefaults", "-no-reboot"])
            .arg("-kernel")
            .arg(machine.revision_path(&m.kernel))
            .arg("-initrd")
            .arg(machine.revision_path(&m.initrd))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 {} {}",
                m.append, spec.append
            ))
            .arg("-serial")
            .arg(format!("file:{}", serial_log.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-pidfile")
            .arg(&pid_file)
            .arg("-netdev")
            .arg(format!(
                "user,id=net0,restrict=on,guestfwd=tcp:{GUEST_AGENT_ADDR}-cmd:{}",
                escape_commas(&relay)
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=net0,mac={mac}"))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache={}",
                escape_commas(&spec.disk.display().to_string()),
                if spec.cache_unsafe {
                    "unsafe"
                } else {
                    "writeback"
                }
            ))
            .args(&m.options);
        if let Some(state) = &spec.incoming {
            // qemu 7 has no `file:` migration; `exec:` reads it through cat.
            command
                .arg("-incoming")
                .arg(format!("exec:cat {}", shell_quote_path(state)));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(spec.run_dir.join("qemu.stderr")).map_err(|source| {
                    QemuError::Spawn {
                        program: "qemu (stderr log)".into(),
                        source,
                    }
                })?,
            ));
        // qemu outlives a killed agent on purpose (a suspended machine must);
        // the next start of the instance kills it through its pid file.
        command.process_group(0);
        let child = command.spawn().map_err(|source| QemuError::Spawn {
            program: qemu_program(),
            source,
        })?;
        tracing::debug!(
            pid = child.id(),
            accel = spec.accel.as_str(),
            "qemu started"
        );
        Ok(Vm {
            child,
            qmp_path,
            serial_log,
            pid_file,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether qemu has ended (and reaps it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for qemu to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exited().is_some()
    }

    /// Runs one QMP command, returning the reply line.
    pub fn qmp(&self, command: &str) -> Result<String, QemuError> {
        qmp_command(&self.qmp_path, command)
    }

    /// Pauses the guest's CPUs (suspend for inspection).
    pub fn suspend(&self) -> Result<(), QemuError> {
        self.qmp("stop").map(drop)
    }

    pub fn resume(&self) -> Result<(), QemuError> {
        self.qmp("cont").map(drop)
    }

    /// Asks the guest to power down (ACPI).
    pub fn powerdown(&self) -> Result<(), QemuError> {
        self.qmp("system_powerdown").map(drop)
    }

    /// Forces the VM down: QMP `quit`, then SIGKILL if qemu does not go.
    pub fn force_down(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.qmp("quit");
        if !self.wait_exit(Duration::from_secs(3)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Kills qemu at once: for a task VM whose result is in, whose overlay
    /// is thrown away anyway, there is nothing to shut down cleanly.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Pauses the guest and saves its whole state (RAM and devices) to
    /// `path`, for [`VmSpec::incoming`]; qemu is left paused.
    pub fn save_state(&self, path: &Path, timeout: Duration) -> Result<(), QemuError> {
        self.qmp("stop")?;
        let uri = format!("exec:cat > {}", shell_quote_path(path));
        let command = serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}});
        self.qmp(&command.to_string())?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.qmp("query-migrate")?;
            if status.contains("\"completed\"") {
                return Ok(());
            }
            if status.contains("\"failed\"") || status.contains("\"cancelled\"") {
                return Err(QemuError::Qmp {
                    path: self.qmp_path.clone(),
                    message: format!("saving the guest state failed: {}", status.trim()),
                });
            }
            if Instant::now() > deadline {
                return Err(QemuError::Qmp {
                    path: self.qmp_path.clone(),
                    message: format!("saving the guest state took over {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a start from [`VmSpec::incoming`]: waits for the state to be
    /// loaded and lets the guest run (a state saved paused stays paused).
    pub fn resume_incoming(&mut self, timeout: Duration) -> Result<(), QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(QemuError::Failed {
                    program: qemu_program(),
                    status: status.to_string(),
                    stderr: "qemu ended while loading the saved guest state".into(),
                });
            }
            let reply = self.qmp("query-status")?;
            let status = serde_json::from_str::<serde_json::Value>(&reply)
                .ok()
                .and_then(|v| v["return"]["status"].as_str().map(str::to_owned))
                .unwrap_or_default();
            match status.as_str() {
                "running" => return Ok(()),
                "inmigrate" => {}
                _ => return self.resume(),
            }
            if Instant::now() > deadline {
                return Err(QemuError::Qmp {
                    path: self.qmp_path.clone(),
                    message: format!("loading the saved guest state took over {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Leaves the (suspended) qemu running after this value is gone.
    pub fn detach(self) -> u32 {
        let pid = self.child.id();
        std::mem::forget(self.child);
        pid
    }
}

/// Connects to a QMP socket, negotiates, runs `command` and returns its reply.
pub fn qmp_command(path: &Path, command: &str) -> Result<String, QemuError> {
    let err = |message: String| QemuError::Qmp {
        path: path.to_owned(),
        message,
    };
    let mut stream = None;
    // The socket appears a moment after qemu starts.
    for _ in 0..100 {
        match UnixStream::connect(path) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let stream = stream.ok_or_else(|| err("cannot connect".into()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| err(e.to_string()))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| err(e.to_string()))?);
    let mut writer = stream;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| err(format!("no greeting: {e}")))?;
    let mut send = |cmd: &str| -> Result<String, QemuError> {
        // A bare name, or a whole command object (one with arguments).
        if cmd.starts_with('{') {
            writeln!(writer, "{cmd}").map_err(|e| err(e.to_string()))?;
        } else {
            writeln!(writer, "{{\"execute\":\"{cmd}\"}}").map_err(|e| err(e.to_string()))?;
        }
        loop {
            let mut reply = String::new();
            let n = reader
                .read_line(&mut reply)
                .map_err(|e| err(format!("no reply to {cmd}: {e}")))?;
            if n == 0 {
                // `quit` closes the socket instead of answering, sometimes.
                return Ok(String::new());
            }
            // Asynchronous events interleave with replies.
            if reply.contains("\"return\"") || reply.contains("\"error\"") {
                if reply.contains("\"error\"") {
                    return Err(err(format!("{cmd}: {}", reply.trim())));
                }
                return Ok(reply);
            }
        }
    };
    send("qmp_capabilities")?;
    send(command)
}

/// Quotes a path for the shell qemu runs `exec:` migrations with.
fn shell_quote_path(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}
