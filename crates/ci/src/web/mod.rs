//! The coordinator's web face: a JSON API (documented by the OpenAPI 3
//! document at `/api/openapi.json`), server-rendered HTML pages, and
//! Prometheus metrics at `/metrics`, all read from the [`Db`].
//!
//! - [`api`]: the JSON API; its routes and their documentation are
//!   registered together (utoipa), so the document cannot name a route the
//!   router lacks or miss one it has;
//! - [`pages`]: HTML (maud, escaped by construction; a few lines of script
//!   follow a running build's log);
//! - [`live`]: the logs of running builds as the coordinator receives them,
//!   which the log tail reads and waits on;
//! - [`metrics`]: the Prometheus text format, computed from the database at
//!   each scrape so that it survives restarts of the coordinator.
//!
//! ```no_run
//! use kiln_ci::db::Db;
//! use kiln_ci::web::{AppState, LiveLogs, router};
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let db = Db::open("/var/lib/kiln-ci/ci.sqlite").await?;
//! let app = router(AppState { db, live: LiveLogs::default() });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

pub mod api;
mod diff;
mod format;
pub mod live;
mod logs;
pub mod metrics;
pub mod pages;

#[cfg(test)]
mod tests;

use axum::Router;
use axum::http::StatusCode;

use crate::db::{Db, DbError};

pub use diff::{EvaluationDiff, JobChange};
pub use live::{LiveLogSink, LiveLogs};

/// What the handlers share: the database, and the logs of running builds.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: Db,
    /// Fed by the coordinator while builds run ([`LiveLogs::append`],
    /// [`LiveLogs::finish`]); read by the log tail.
    pub live: LiveLogs,
}

/// The whole site: pages at `/`, the API under `/api`, metrics at `/metrics`.
pub fn router(state: AppState) -> Router {
    let (api, openapi) = api::router().split_for_parts();
    let openapi_json = serde_json::to_string_pretty(&openapi)
        .expect("an OpenAPI document always serialises to JSON");
    Router::new()
        .merge(pages::router())
        .merge(api)
        .route(
            "/api/openapi.json",
            axum::routing::get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    openapi_json,
                )
            }),
        )
        .route("/metrics", axum::routing::get(metrics::handler))
        .fallback(pages::not_found)
        .with_state(state)
}

/// Why a request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("no {what} '{key}'")]
    NotFound { what: &'static str, key: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Log(#[from] logs::LogReadError),
}

impl WebError {
    fn not_found(what: &'static str, key: impl ToString) -> WebError {
        WebError::NotFound {
            what,
            key: key.to_string(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            WebError::NotFound { .. } => StatusCode::NOT_FOUND,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::Conflict(_) => StatusCode::CONFLICT,
            WebError::Db(_) | WebError::Log(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
