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
//!   each scrape so that it survives restarts of the coordinator;
//! - [`auth`]: reads are open, writes need the API token when one is set.
//!
//! ```no_run
//! use kiln_ci::db::Db;
//! use kiln_ci::web::{AppState, LiveLogs, router};
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let db = Db::open("/var/lib/kiln-ci/ci.sqlite").await?;
//! let app = router(AppState::new(db, LiveLogs::default()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod auth;
mod diff;
pub(crate) mod format;
pub mod live;
mod logs;
pub mod metrics;
pub mod pages;

#[cfg(test)]
mod tests;

use axum::Router;
use axum::http::StatusCode;

use std::sync::Arc;

use crate::coordinator::{Coordinator, CoordinatorError};
use crate::db::{Db, DbError};

pub use auth::ApiToken;
pub use diff::{EvaluationDiff, JobChange};
pub use live::{LiveLogSink, LiveLogs};

/// What the handlers share: the database, the logs of running builds,
/// the coordinator (for what reading the database cannot do: evaluations,
/// restarts with GC roots) and the API token.
#[derive(Debug, Clone)]
pub struct AppState {
    pub db: Db,
    /// Fed by the coordinator while builds run ([`LiveLogs::append`],
    /// [`LiveLogs::finish`]); read by the log tail.
    pub live: LiveLogs,
    /// Without one, triggering an evaluation answers 503 and restarts
    /// only change the database (the coordinator's loop picks them up).
    pub coordinator: Option<Coordinator>,
    /// When set, writing requests must present it ([`auth`]).
    pub api_token: Option<Arc<ApiToken>>,
}

impl AppState {
    /// Pages and API over a database, without coordinator or token.
    pub fn new(db: Db, live: LiveLogs) -> AppState {
        AppState {
            db,
            live,
            coordinator: None,
            api_token: None,
        }
    }

    /// The web face of a running coordinator: its database and live logs.
    pub fn for_coordinator(coordinator: &Coordinator) -> AppState {
        AppState {
            coordinator: Some(coordinator.clone()),
            ..AppState::new(coordinator.db().clone(), coordinator.live_logs().clone())
        }
    }

    /// Writing requests must present `token`.
    pub fn with_api_token(self, token: ApiToken) -> AppState {
        AppState {
            api_token: Some(Arc::new(token)),
            ..self
        }
    }
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
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
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Coordinator(CoordinatorError),
}

impl From<CoordinatorError> for WebError {
    fn from(error: CoordinatorError) -> WebError {
        match error {
            CoordinatorError::Db(DbError::EvaluationRunning { .. }) => {
                WebError::Conflict(error.to_string())
            }
            CoordinatorError::NoSuchSpecification(name) => WebError::NotFound {
                what: "specification",
                key: name,
            },
            CoordinatorError::Db(db) => WebError::Db(db),
            other => WebError::Coordinator(other),
        }
    }
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
            WebError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Db(_) | WebError::Log(_) | WebError::Coordinator(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}
