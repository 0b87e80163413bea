//! Stores of Nix store paths: the [`Store`] trait that every store speaks, the
//! local store ([`local::LocalStore`]: files under a store directory plus
//! Nix's SQLite validity database), and what is built on the trait alone
//! (closures, topological order, export/import, the shared behaviour tests).
//!
//! ```no_run
//! use kiln_store::{Store, open_store};
//!
//! let store = open_store("local?root=/tmp/kiln-root")?;
//! let info = store.add_text("hello.txt", b"hello\n", &Default::default())?;
//! assert!(store.is_valid_path(&info.path)?);
//! # Ok::<(), kiln_store::StoreError>(())
//! ```
//!
//! Invariants: a path is valid (registered in the database) only once its
//! contents are complete, canonical and durable on disk; nothing outside this
//! crate writes the database.

pub mod binary_cache;
mod closure;
pub mod derivation;
mod error;
pub mod export;
pub mod local;
pub mod nix_conf;
mod path_info;
pub mod refs;
mod store;
pub mod substitute;
pub mod testing;
mod url;

pub use closure::{compute_closure, dependency_order, topo_sort};
pub use error::StoreError;
pub use path_info::{PathInfo, PathInfoJson};
pub use store::{AddOptions, NarSource, Store};
pub use url::{StoreUrl, UrlError, open_store};
