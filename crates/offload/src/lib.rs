//! Offloading builds to other machines over SSH, as Nix's `build-remote`
//! and `guix offload` do: the machines file, the choice of a machine, the
//! transport, and the hook side of the build-hook protocol that
//! `offload-hook` speaks to a daemon.
//!
//! - [`machines`]: Nix's machines-file format, with `@file` includes;
//! - [`choice`]: slots (file locks shared by every hook on the host), real
//!   load read over SSH, back-off for machines that fail, and the reason
//!   for every choice;
//! - [`ssh`]: the system's OpenSSH client with one master per machine and
//!   host keys from the machines file;
//! - [`remote`]: one build on one machine — over the serve protocol
//!   (`ssh://`: missing inputs in one stream, NARs back through a request
//!   pipeline, zstd to Kiln remotes) or the daemon protocol (`ssh-ng://`),
//!   the build, outputs back, checked before registration;
//! - [`hook`]: the build-hook protocol, hook side, with retries elsewhere.
//!
//! ```no_run
//! use std::collections::BTreeSet;
//! use kiln_offload::{choice::{Chooser, ChoiceSettings, Choice}, machines};
//!
//! let ms = machines::parse_builders("ssh://root@builder x86_64-linux - 4 2", "builders", "x86_64-linux")?;
//! let chooser = Chooser::new("/tmp/state".into(), "/tmp/ssh".into(), ChoiceSettings::default())?;
//! match chooser.choose(&ms, "hello.drv", "x86_64-linux", &BTreeSet::new(), &BTreeSet::new(), false)? {
//!     Choice::Chosen { index, reason, .. } => println!("{} because {reason}", ms[index].uri),
//!     other => println!("{other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Invariant: a path built remotely is registered here only after its NAR
//! matched the hash the remote announced and its references stayed within
//! the build's inputs and outputs; a failed transfer leaves nothing valid.

pub mod choice;
pub mod hook;
pub mod machines;
pub mod remote;
pub mod ssh;
