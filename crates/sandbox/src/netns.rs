//! Network namespaces kept from one sandbox for the next.
//!
//! Making a network namespace and tearing it down again costs a couple of
//! milliseconds of CPU (the loopback device, its sysctl tables, an RCU grace
//! period when it goes), more than the rest of a trivial build's sandbox. A
//! process that may make namespaces (root) therefore keeps them: a sandbox's
//! namespace is made by the spawning thread (`unshare`), entered by the sandbox's
//! init at `clone`, and put back here once the sandbox has been reaped.
//!
//! A kept namespace is only handed out again when it looks exactly as it did
//! when new: no socket left in it (`sockstat`), and the same interface counters
//! (`dev`) and IPv4 and IPv6 statistics (`snmp`, `snmp6`), so the build used no
//! network at all. (A socket is needed to change anything else, and the
//! sandbox's user cannot change the namespace's settings: it belongs to the
//! user namespace of the process that made it, where the sandbox has no
//! capability.) Any other namespace is dropped and a new one made.
//!
//! Where namespaces cannot be made outside a sandbox (an ordinary user), each
//! sandbox makes its own with `CLONE_NEWNET`, and the kernel tears it down.
//!
//! The check reads four files (about 0.15 ms); making a namespace takes 1.2 to
//! 1.4 ms here, and tearing it down (in a kernel worker) about two thirds of that.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The most namespaces kept at once (one per concurrent sandbox is enough).
const MAX_KEPT: usize = 256;

/// What a namespace shows of its use, read from inside it.
const STATE_FILES: [&str; 4] = [
    "/proc/thread-self/net/sockstat",
    "/proc/thread-self/net/dev",
    "/proc/thread-self/net/snmp",
    "/proc/thread-self/net/snmp6",
];

/// A network namespace with its loopback up, and what it showed when new.
#[derive(Debug)]
pub(crate) struct NetNs {
    fd: OwnedFd,
    fresh: Vec<u8>,
}

static KEPT: Mutex<Vec<NetNs>> = Mutex::new(Vec::new());
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

fn open_ns() -> io::Result<OwnedFd> {
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}

fn setns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns on a namespace descriptor we own; it changes this thread only.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread, inside a sandbox's network namespace until dropped
/// (which moves it back to the namespace it was in, `home`).
pub(crate) struct Inside {
    home: OwnedFd,
    ns: Option<NetNs>,
}

impl Inside {
    /// Moves the thread back home; the namespace is the cloned sandbox's now.
    pub(crate) fn leave(mut self) -> NetNs {
        self.ns.take().expect("namespace present until left")
    }

    fn is_as_new(&self) -> bool {
        let fresh = self.ns.as_ref().map(|ns| &ns.fresh);
        state().is_ok_and(|now| Some(&now) == fresh)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home) {
            // A thread left in a sandbox's namespace would do everything it does
            // later without the network: stopping is the only safe way out.
            eprintln!("kiln-sandbox: cannot return a thread to its network namespace: {e}");
            std::process::abort();
        }
        if let Some(ns) = self.ns.take() {
            // Not left for a sandbox (the clone failed): still as new.
            give_back(ns);
        }
    }
}

/// Puts the calling thread into a network namespace for a sandbox about to be
/// cloned: a kept one that is still as new, or a new one. `None` when the
/// process cannot make namespaces outside a sandbox; then the sandbox must
/// make its own.
pub(crate) fn enter() -> Option<Inside> {
    if UNAVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    // From here on, dropping `inside` moves the thread back.
    let mut inside = Inside {
        home: open_ns().ok()?,
        ns: None,
    };
    while let Some(ns) = take_kept() {
        if setns(&ns.fd).is_err() {
            continue;
        }
        inside.ns = Some(ns);
        if inside.is_as_new() {
            return Some(inside);
        }
        // Used: dropping it lets the kernel tear it down.
        inside.ns = None;
    }
    // SAFETY: unsharing the network namespace affects this thread only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        UNAVAILABLE.store(true, Ordering::Relaxed);
        return None;
    }
    let made = (|| -> io::Result<NetNs> {
        if crate::child::loopback_up() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NetNs {
            fd: open_ns()?,
            fresh: state()?,
        })
    })();
    match made {
        Ok(ns) => {
            inside.ns = Some(ns);
            Some(inside)
        }
        Err(_) => {
            UNAVAILABLE.store(true, Ordering::Relaxed);
            None
        }
    }
}

fn take_kept() -> Option<NetNs> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner()).pop()
}

/// Returns a namespace whose sandbox has been reaped (every process of it is
/// gone), to be checked and handed out again.
pub(crate) fn give_back(ns: NetNs) {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    if kept.len() < MAX_KEPT {
        kept.push(ns);
    }
}

/// The calling thread's namespace's state files, concatenated.
fn state() -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(8192);
    for path in STATE_FILES {
        File::open(path)?.read_to_end(&mut out)?;
    }
    Ok(out)
}
