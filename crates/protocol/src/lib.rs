//! Nix's wire protocols, both ends: the daemon (worker) protocol that
//! `nix-daemon` speaks on its socket (versions 1.21 – 1.38), and the
//! `nix-store --serve` protocol (2.5 – 2.8) used over SSH.
//!
//! - [`wire`]: numbers, padded strings, framed streams, embedded NARs;
//! - [`worker`]: the daemon protocol's operations, log framing and
//!   per-version serialisation of path infos, derived paths and results;
//! - [`server`]: serving a local store to daemon clients;
//! - [`client`]: a [`kiln_store::Store`] that talks to a daemon;
//! - [`serve`]: the serve protocol, server and client;
//! - [`trust`]: peer credentials, `allowed-users` and `trusted-users`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kiln_protocol::server::Daemon;
//! use kiln_store::local::LocalStore;
//!
//! let store = Arc::new(LocalStore::open_root("/tmp/kiln-root")?);
//! let runtime = tokio::runtime::Runtime::new()?;
//! let daemon = Daemon::new(store, Default::default(), runtime.handle().clone());
//! // One connection on stdin/stdout, as `store-daemon --stdio`:
//! daemon.serve_connection(true, std::io::stdin(), std::io::stdout())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Invariant: nothing a peer sends can make the daemon panic or allocate
//! without bound; every length from the wire is checked first.

pub mod client;
pub mod serve;
pub mod serve_client;
pub mod server;
pub mod trust;
pub mod wire;
pub mod worker;
