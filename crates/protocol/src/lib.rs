//! Nix's wire protocols, both ends: the daemon (worker) protocol that
//! `nix-daemon` speaks on its socket (versions 1.21 – 1.38), and the
//! `nix-store --serve` protocol (2.5 – 2.8) used over SSH.
//!
//! - [`wire`]: numbers, padded strings, framed streams, embedded NARs;
//! - [`worker`]: the daemon protocol's operations, log framing and
//!   per-version serialisation of path infos, derived paths and results;
//! - [`server`]: serving a local store to daemon clients;
//! - [`fast`]: socket connections, with hot reads answered on the reactor;
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
pub mod fast;
pub mod serve;
pub mod serve_client;
pub mod server;
pub mod trust;
pub mod wire;
pub mod worker;

use kiln_store::{Store, StoreError};

/// Opens the store a URL names, as [`kiln_store::open_store`] does, and
/// also daemon stores (`daemon`, `unix://PATH`), which `kiln-store` cannot
/// open itself (the protocol sits above it). `daemon` means the machine's
/// socket, or `$NIX_DAEMON_SOCKET_PATH` when set, as in Nix; `auto` (or
/// nothing) means `$NIX_REMOTE` when that is set, as Nix's default store.
pub fn open_store(url: &str) -> Result<Box<dyn Store>, StoreError> {
    if url.is_empty() || url == "auto" {
        if let Some(remote) = std::env::var("NIX_REMOTE")
            .ok()
            .filter(|r| !r.is_empty() && r != "auto")
        {
            return open_store(&remote);
        }
    }
    // Validates the URL and its parameters the one way the project has.
    let _: kiln_store::StoreUrl = url.parse()?;
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    let socket = if base == "daemon" {
        Some(
            std::env::var_os("NIX_DAEMON_SOCKET_PATH")
                .map(Into::into)
                .unwrap_or_else(|| std::path::PathBuf::from(client::DEFAULT_SOCKET)),
        )
    } else {
        base.strip_prefix("unix://").map(std::path::PathBuf::from)
    };
    match socket {
        Some(socket) => Ok(Box::new(client::DaemonStore::new(socket))),
        None => kiln_store::open_store(url),
    }
}
