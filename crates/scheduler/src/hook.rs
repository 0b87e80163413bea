//! The client side of Nix's build-hook protocol: the scheduler offers each
//! build to the `build-hook` program, which accepts (and builds it
//! elsewhere), declines, declines for good, or asks to be asked later.
//!
//! The hook's stdin takes Nix's wire format (u64 little-endian numbers,
//! strings as length + bytes padded to 8): first the settings as
//! `1 name value`… `0`, then per candidate `"try" amWilling system drvPath
//! requiredFeatures`. It answers on stderr with `# accept` (then the
//! machine on the next line), `# decline`, `# decline-permanently` or
//! `# postpone`; other stderr lines are its log. After accepting it is sent
//! the input paths and the missing outputs, writes the build log on fd 4,
//! and exits: 0 built, 100 permanent failure, else transient.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};

use crate::goals::HookReply;
use crate::settings::Settings;

/// Why talking to the hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start build hook '{program}': {source}")]
    Spawn { program: String, source: io::Error },
    #[error("build hook I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the build hook exited without answering")]
    Vanished,
}

fn write_u64(out: &mut impl Write, n: u64) -> io::Result<()> {
    out.write_all(&n.to_le_bytes())
}

fn write_str(out: &mut impl Write, s: &[u8]) -> io::Result<()> {
    write_u64(out, s.len() as u64)?;
    out.write_all(s)?;
    let pad = (8 - s.len() % 8) % 8;
    out.write_all(&[0u8; 8][..pad])
}

fn write_strings(out: &mut impl Write, items: &[String]) -> io::Result<()> {
    write_u64(out, items.len() as u64)?;
    for i in items {
        write_str(out, i.as_bytes())?;
    }
    Ok(())
}

struct Instance {
    child: Child,
    stdin: ChildStdin,
    /// Taken by the build that drains it.
    stderr: Option<BufReader<ChildStderr>>,
    builder_out: File,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hook of a run: one process at a time answers offers; an accepting
/// one is handed over to its build.
#[derive(Debug)]
pub struct Hook {
    argv: Vec<String>,
    settings: Vec<(String, String)>,
    idle: Option<Instance>,
}

/// A build the hook accepted.
#[derive(Debug)]
pub struct HookBuild {
    /// The machine (store URI) the hook named.
    pub machine: String,
    instance: Instance,
}

impl Hook {
    /// A hook running `settings.build_hook` and told `settings`, with
    /// `store` as the store it copies outputs back into: the one we build
    /// into, whatever `settings` say (a daemon opened with `--store` has
    /// no `store` setting, and a client's cannot move it).
    pub fn new(settings: &Settings, store: &str) -> Hook {
        let mut all: Vec<(String, String)> = settings
            .raw
            .iter()
            .filter(|(k, _)| k.as_str() != "store")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.push(("store".into(), store.to_owned()));
        if !settings.raw.contains_key("builders") {
            all.push(("builders".into(), settings.builders.clone()));
        }
        Hook {
            argv: settings.build_hook.clone(),
            settings: all,
            idle: None,
        }
    }

    fn spawn(&self) -> Result<Instance, HookError> {
        let program = self.argv[0].clone();
        let (log_r, log_w) = nix_pipe()?;
        let mut cmd = Command::new(&program);
        cmd.args(&self.argv[1..])
            .arg("0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let fd = log_w.as_raw_fd();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 4) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
            program: program.clone(),
            source,
        })?;
        drop(log_w);
        let mut stdin = child.stdin.take().expect("piped");
        let stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut buf = Vec::new();
        for (k, v) in &self.settings {
            write_u64(&mut buf, 1)?;
            write_str(&mut buf, k.as_bytes())?;
            write_str(&mut buf, v.as_bytes())?;
        }
        write_u64(&mut buf, 0)?;
        stdin.write_all(&buf)?;
        stdin.flush()?;
        Ok(Instance {
            child,
            stdin,
            stderr: Some(stderr),
            builder_out: File::from(log_r),
        })
    }

    /// Offers a build: `slot_free` says whether it could also be built
    /// here now.
    pub fn offer(
        &mut self,
        slot_free: bool,
        system: &str,
        drv_path: &str,
        features: &[String],
    ) -> Result<HookReply<HookBuild>, HookError> {
        let mut instance = match self.idle.take() {
            Some(i) => i,
            None => self.spawn()?,
        };
        let mut buf = Vec::new();
        write_str(&mut buf, b"try")?;
        write_u64(&mut buf, u64::from(slot_free))?;
        write_str(&mut buf, system.as_bytes())?;
        write_str(&mut buf, drv_path.as_bytes())?;
        write_strings(&mut buf, features)?;
        instance.stdin.write_all(&buf)?;
        instance.stdin.flush()?;
        let Some(stderr) = instance.stderr.as_mut() else {
            return Err(HookError::Vanished);
        };
        loop {
            let mut line = String::new();
            if stderr.read_line(&mut line)? == 0 {
                return Err(HookError::Vanished);
            }
            let line = line.trim_end_matches('\n');
            match line {
                "# accept" => {
                    let mut machine = String::new();
                    stderr.read_line(&mut machine)?;
                    return Ok(HookReply::Accept(HookBuild {
                        machine: machine.trim_end().to_owned(),
                        instance,
                    }));
                }
                "# decline" => {
                    self.idle = Some(instance);
                    return Ok(HookReply::Decline);
                }
                "# postpone" => {
                    self.idle = Some(instance);
                    return Ok(HookReply::Postpone);
                }
                "# decline-permanently" => return Ok(HookReply::DeclinePermanently),
                other => tracing::info!(target: "build_hook", "{other}"),
            }
        }
    }
}

fn nix_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is written by the kernel.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl HookBuild {
    /// Sends the inputs and missing outputs, follows the build log, and
    /// returns the hook's exit code.
    pub fn run(
        mut self,
        inputs: &[String],
        missing: &[String],
        on_line: &mut dyn FnMut(&[u8]),
    ) -> Result<i32, HookError> {
        let mut buf = Vec::new();
        write_strings(&mut buf, inputs)?;
        write_strings(&mut buf, missing)?;
        self.instance.stdin.write_all(&buf)?;
        self.instance.stdin.flush()?;
        // The hook's own stderr is drained beside the log so it cannot block.
        let stderr = self.instance.stderr.take();
        let drain = std::thread::spawn(move || {
            let mut rest = Vec::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_end(&mut rest);
            }
            rest
        });
        let mut log = BufReader::new(&self.instance.builder_out);
        let mut line = Vec::new();
        loop {
            line.clear();
            if log.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            on_line(&line);
        }
        let status = self.instance.child.wait()?;
        for l in drain.join().unwrap_or_default().split(|&b| b == b'\n') {
            if !l.is_empty() {
                on_line(l);
            }
        }
        Ok(status.code().unwrap_or(1))
    }
}
