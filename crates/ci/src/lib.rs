//! kiln-ci: a CI coordinator from git to builds, after Guix's Cuirass and
//! Hydra. Specifications name git inputs and an evaluator; each evaluation
//! fetches the inputs, runs the evaluator (JSON lines in nix-eval-jobs'
//! format) and registers one build per job, with the dependencies between
//! builds taken from the `.drv` graph; the coordinator dispatches ready
//! builds to a builder and records what becomes of them.
//!
//! - [`model`]: specifications, evaluations, builds, agents (pure types);
//! - [`db`]: the database (SQLite or PostgreSQL, same migrations);
//! - [`eval`]: git inputs, the evaluator and its log;
//! - [`recipe_jobs`]: Kiln's evaluator for its recipe files;
//! - [`agents`]: the build-agent protocol's endpoints (kiln-ci as controller);
//! - [`coordinator`]: registration of jobs as builds, dispatch, recovery;
//! - [`daemon_dispatch`]: batches built by a store daemon over its socket;
//! - [`testing`]: a throwaway PostgreSQL cluster for tests and benchmarks.
//! - [`web`]: the JSON API, HTML pages and Prometheus metrics.
//!
//! ```no_run
//! use kiln_ci::db::Db;
//! # async fn f() -> Result<(), kiln_ci::db::DbError> {
//! let db = Db::open("/var/lib/kiln-ci/ci.sqlite").await?;
//! for spec in db.list_specifications().await? {
//!     println!("{}: {:?}", spec.name, db.status_counts(None).await?);
//! }
//! # Ok(()) }
//! ```

pub mod agents;
pub mod coordinator;
pub mod daemon_dispatch;
pub mod db;
pub mod eval;
pub mod model;
pub mod recipe_jobs;
pub mod testing;
pub mod web;
