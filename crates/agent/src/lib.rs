//! Kiln's build agent, after build2's bbot: untrusted or foreign builds run
//! in a fresh virtual machine per task, on hosts that pull their work from
//! controllers.
//!
//! - [`machine`]: the machines directory (image revisions, bootstraps);
//! - [`lock`]: per-machine flock locks shared by agent instances;
//! - [`qemu`]: running a VM (KVM or TCG), overlays, QMP, serial log;
//! - [`channel`]: the host side of the guest's HTTP channel;
//! - [`worker`]: the guest side (`build-agent worker`);
//! - [`protocol`]: agent ↔ controller messages and challenge signatures,
//!   shared with the CI crate's controller;
//! - [`controller`]: polling controllers and posting results;
//! - [`agent`]: the loop that ties them together under watchdogs.
//!
//! ```no_run
//! use kiln_agent::protocol::{sign_challenge, verify_challenge, new_challenge};
//! use kiln_formats::signature::{SecretKey, TrustedKeys};
//!
//! let key = SecretKey::generate("agent-1")?;
//! let known = TrustedKeys::parse(&key.to_public().to_string())?;
//! let challenge = new_challenge();
//! let signature = sign_challenge(&key, "session-1", &challenge);
//! assert!(verify_challenge(&known, "session-1", &challenge, &signature).is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod agent;
pub mod channel;
pub mod controller;
pub mod lock;
pub mod machine;
pub mod protocol;
pub mod qemu;
pub mod worker;
