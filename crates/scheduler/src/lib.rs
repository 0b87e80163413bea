//! The goal scheduler: realises derivations — builds them locally in the
//! sandbox or hands them to a build hook — with Nix's semantics, statuses,
//! logs and exit codes.
//!
//! - [`goals`]: the goal graph and the worker loop (tokio; blocking work on
//!   blocking threads), generic over a [`goals::Backend`];
//! - [`local`]: the backend over a local store and the sandbox;
//!   [`commit`]: its outputs synced and registered in groups;
//! - [`builtins`]: the builtin builders the scheduler runs itself;
//! - [`env`] and [`outputs`]: what a builder sees, and what happens to its
//!   outputs; [`logs`]: build logs where Nix keeps them; [`hook`]: the
//!   build-hook client; [`events`]: progress for people and Nix's
//!   `internal-json`; [`settings`]: `nix.conf`; [`recipe`]: Kiln's TOML
//!   recipes; [`result`]: `BuildResult` and exit codes.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kiln_scheduler::{build, goals::Wanted, settings::Settings, events::Quiet};
//! use kiln_store::local::LocalStore;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(LocalStore::open_root("/tmp/kiln-root")?);
//! let drv = "/nix/store/…-hello.drv";
//! let drv = kiln_store::Store::store_dir(&*store).parse_path(drv)?;
//! let report = build(store, Settings::default(), vec![(drv, Wanted::All)], Arc::new(Quiet)).await?;
//! std::process::exit(kiln_scheduler::result::exit_code(report.results.values()) as i32);
//! # }
//! ```

pub mod builtins;
pub mod commit;
pub mod env;
pub mod events;
pub mod goals;
pub mod hook;
pub mod local;
pub mod logs;
pub mod outputs;
pub mod recipe;
pub mod result;
pub mod settings;
pub mod synthetic;

use std::sync::Arc;

use kiln_formats::store_path::StorePath;
use kiln_store::local::LocalStore;

use crate::events::EventSink;
use crate::goals::{RunOptions, RunReport, Wanted};
use crate::local::{LocalBackend, LocalError};
use crate::settings::Settings;

/// Realises `targets` in `store` with `settings`, building locally.
pub async fn build(
    store: Arc<LocalStore>,
    settings: Settings,
    targets: Vec<(StorePath, Wanted)>,
    events: Arc<dyn EventSink>,
) -> Result<RunReport, LocalError> {
    let options = RunOptions {
        max_jobs: settings.max_jobs,
        keep_going: settings.keep_going,
        dry_run: false,
    };
    let backend = Arc::new(LocalBackend::new(store, settings)?);
    Ok(goals::run(backend, targets, options, events).await)
}
