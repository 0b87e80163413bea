//! Shared helpers for Kiln's end-to-end tests against real peers.
//!
//! - [`nix()`] finds Nix 2.8 and panics with instructions when it is missing: a test
//!   that needs a peer fails, it never skips.
//! - [`NixStore`] is a throwaway Nix store in a temporary directory (Nix's
//!   `local?root=DIR`: logical paths stay `/nix/store/…`), with a clean environment
//!   and configuration, on which tests run `nix-instantiate`, `nix-store`,
//!   `nix-build` and `nix`.
//! - [`kiln_bin`] / [`workspace_bin`] build the project's binaries once per test
//!   process and return their paths.
//! - [`corpus`] is the collection of Nix expressions in `tests/corpus/` and the
//!   `.drv` files they instantiate to.
//!
//! ```no_run
//! use kiln_e2e::{NixStore, corpus};
//!
//! let store = NixStore::new();
//! for (file, drv_path) in corpus::instantiate_corpus(&store) {
//!     let bytes = std::fs::read(store.physical(&drv_path)).unwrap();
//!     assert!(bytes.starts_with(b"Derive("), "{file}: {drv_path}");
//! }
//! ```

mod bins;
pub mod ci;
pub mod corpus;
pub mod daemon;
pub mod farm;
mod nix;

pub use bins::{kiln_bin, workspace_bin};
pub use daemon::{KilnDaemon, NixDaemon};
pub use nix::{Nix, NixError, NixStore, host_sandbox_paths, nix};

/// A string that no other test, in this process or another, gets: for log
/// markers, socket names and seeds that make each build a new one.
pub fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}
