//! The JSON API under `/api`. Each handler carries its OpenAPI description
//! (`#[utoipa::path]`) and is registered with [`utoipa_axum::routes!`], which
//! adds the route and its documentation in one step.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::diff::EvaluationDiff;
use super::{AppState, WebError, format, logs};
use crate::coordinator::Triggered;
use crate::db::BuildFilter;
use crate::model::{
    Agent, Build, BuildStatus, Evaluation, EvaluationError, Specification, StatusCounts, now,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln-ci",
        description = "Kiln's CI coordinator: specifications, evaluations, builds, logs, agents."
    ),
    tags(
        (name = "specifications", description = "What to evaluate and build"),
        (name = "evaluations", description = "Runs of a specification's evaluator"),
        (name = "builds", description = "Jobs of evaluations, their statuses and logs"),
        (name = "agents", description = "Build agents and the machines they offer"),
    ),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// Documents the API token: every writing operation names this scheme.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            super::auth::SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The token of kiln-ci's --api-token-file; needed by every request that is not GET, when kiln-ci has one",
                    ))
                    .build(),
            ),
        );
    }
}

/// The API's routes with their OpenAPI document.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_specifications, create_specification))
        .routes(routes!(
            get_specification,
            put_specification,
            delete_specification
        ))
        .routes(routes!(list_evaluations))
        .routes(routes!(evaluate_specification))
        .routes(routes!(get_evaluation))
        .routes(routes!(evaluation_log))
        .routes(routes!(list_builds))
        .routes(routes!(get_build))
        .routes(routes!(restart_build))
        .routes(routes!(build_log))
        .routes(routes!(build_log_tail))
        .routes(routes!(list_agents))
        .routes(routes!(list_machines))
}

/// An error as the API answers it: `{"error": "…"}` with a fitting status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// [`WebError`] answered as JSON.
#[derive(Debug)]
pub struct ApiError(WebError);

impl<E: Into<WebError>> From<E> for ApiError {
    fn from(error: E) -> ApiError {
        ApiError(error.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.0.status().is_server_error() {
            tracing::error!(error = %self.0, "API request failed");
        }
        let body = ErrorBody {
            error: self.0.to_string(),
        };
        (self.0.status(), Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ---- specifications ------------------------------------------------------

/// All specifications, by name.
#[utoipa::path(get, path = "/api/specs", tag = "specifications",
    responses((status = 200, body = Vec<Specification>)))]
async fn list_specifications(State(state): State<AppState>) -> ApiResult<Json<Vec<Specification>>> {
    Ok(Json(state.db.list_specifications().await?))
}

/// Adds a specification; fails if one of that name exists (as
/// `kiln-ci spec add` does).
#[utoipa::path(post, path = "/api/specs", tag = "specifications",
    request_body = Specification, security(("api_token" = [])),
    responses((status = 201, description = "The specification as stored", body = Specification),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_specification(
    State(state): State<AppState>,
    Json(spec): Json<Specification>,
) -> ApiResult<(StatusCode, Json<Specification>)> {
    check_specification(&spec.name, &spec)?;
    if state.db.specification(&spec.name).await?.is_some() {
        return Err(WebError::Conflict(format!(
            "a specification named '{}' exists already (PUT /api/specs/{} replaces it)",
            spec.name, spec.name
        ))
        .into());
    }
    Ok((
        StatusCode::CREATED,
        Json(state.db.put_specification(&spec).await?),
    ))
}

/// One specification.
#[utoipa::path(get, path = "/api/specs/{name}", tag = "specifications",
    params(("name" = String, Path, description = "Specification name")),
    responses((status = 200, body = Specification), (status = 404, body = ErrorBody)))]
async fn get_specification(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Specification>> {
    let spec = state.db.specification(&name).await?;
    Ok(Json(spec.ok_or_else(|| {
        WebError::not_found("specification", &name)
    })?))
}

/// Creates the specification or replaces the one of that name (as
/// `kiln-ci spec add` does). The name in the body, if given, must be the
/// name in the path.
#[utoipa::path(put, path = "/api/specs/{name}", tag = "specifications",
    params(("name" = String, Path, description = "Specification name")),
    request_body = Specification, security(("api_token" = [])),
    responses((status = 200, description = "The specification as stored", body = Specification),
        (status = 400, body = ErrorBody)))]
async fn put_specification(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(mut spec): Json<Specification>,
) -> ApiResult<Json<Specification>> {
    if spec.name.is_empty() {
        spec.name = name.clone();
    }
    check_specification(&name, &spec)?;
    Ok(Json(state.db.put_specification(&spec).await?))
}

/// What a specification must satisfy before it is stored.
fn check_specification(path_name: &str, spec: &Specification) -> Result<(), WebError> {
    let bad = |message: String| Err(WebError::BadRequest(message));
    if spec.name != path_name {
        return bad(format!(
            "the body names specification '{}' but the URL names '{path_name}'",
            spec.name
        ));
    }
    if spec.name.is_empty() || spec.name.contains(['/', '?', '#']) || spec.name.trim() != spec.name
    {
        return bad(format!(
            "specification name '{}' is not usable in URLs (expected a non-empty name without '/', '?', '#' or surrounding spaces)",
            spec.name
        ));
    }
    if spec.priority > 9 {
        return bad(format!(
            "priority {} is out of range (expected 0 to 9)",
            spec.priority
        ));
    }
    if spec.evaluator.is_empty() {
        return bad(
            "the evaluator command is empty (expected the program and its arguments)".into(),
        );
    }
    if !spec
        .inputs
        .iter()
        .any(|input| input.name == spec.eval_input)
    {
        let names: Vec<&str> = spec.inputs.iter().map(|i| i.name.as_str()).collect();
        return bad(format!(
            "eval_input '{}' is not one of the inputs (expected one of: {})",
            spec.eval_input,
            names.join(", ")
        ));
    }
    if spec.period_secs < 0 {
        return bad(format!(
            "period_secs {} is negative (expected seconds, or 0 for on demand)",
            spec.period_secs
        ));
    }
    Ok(())
}

/// Removes a specification with its evaluations and builds.
#[utoipa::path(delete, path = "/api/specs/{name}", tag = "specifications",
    params(("name" = String, Path, description = "Specification name")),
    security(("api_token" = [])),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)))]
async fn delete_specification(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if state.db.remove_specification(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(WebError::not_found("specification", name).into())
    }
}

// ---- evaluations ---------------------------------------------------------

/// An evaluation with how many of its builds are in each status.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvaluationSummary {
    #[serde(flatten)]
    pub evaluation: Evaluation,
    /// Builds per status (statuses without builds are left out).
    #[schema(value_type = BTreeMap<String, i64>)]
    pub counts: StatusCounts,
}

#[derive(Debug, Deserialize, IntoParams)]
struct ListEvaluationsQuery {
    /// At most this many, newest first (default 50, 0 for all).
    limit: Option<i64>,
}

/// The evaluations of a specification, newest first.
#[utoipa::path(get, path = "/api/specs/{name}/evaluations", tag = "evaluations",
    params(("name" = String, Path, description = "Specification name"), ListEvaluationsQuery),
    responses((status = 200, body = Vec<EvaluationSummary>), (status = 404, body = ErrorBody)))]
async fn list_evaluations(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<ListEvaluationsQuery>,
) -> ApiResult<Json<Vec<EvaluationSummary>>> {
    if state.db.specification(&name).await?.is_none() {
        return Err(WebError::not_found("specification", name).into());
    }
    let evaluations = state
        .db
        .list_evaluations(&name, query.limit.unwrap_or(50))
        .await?;
    Ok(Json(summarise(&state, evaluations).await?))
}

/// What a trigger did: started an evaluation, or queued one behind the
/// running evaluation.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvaluationTriggered {
    /// The started evaluation (follow it at `/api/evaluations/{id}`), or,
    /// when `queued`, the running one that the next follows.
    pub id: i64,
    pub specification: String,
    /// Whether an evaluation of it was running: another then starts when
    /// that one ends (many triggers meanwhile make one evaluation).
    pub queued: bool,
}

/// Evaluates the specification now (fetching its inputs and running its
/// evaluator in the background), as Cuirass's and Hydra's "evaluate"
/// buttons and a git push hook would. Answers the new evaluation's id at
/// once. While an evaluation of the specification runs, another is queued
/// to start when it ends, never run beside it.
#[utoipa::path(post, path = "/api/specs/{name}/evaluate", tag = "evaluations",
    params(("name" = String, Path, description = "Specification name")),
    security(("api_token" = [])),
    responses((status = 202, description = "Started, or queued behind the running evaluation", body = EvaluationTriggered),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, description = "This server runs no coordinator", body = ErrorBody)))]
async fn evaluate_specification(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<EvaluationTriggered>)> {
    let Some(coordinator) = &state.coordinator else {
        return Err(WebError::Unavailable(
            "this web server runs without a coordinator and cannot evaluate (use `kiln-ci serve`)"
                .into(),
        )
        .into());
    };
    let (id, queued) = match coordinator.trigger_evaluation(&name).await? {
        Triggered::Started(id) => (id, false),
        Triggered::Queued { behind } => (behind, true),
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(EvaluationTriggered {
            id,
            specification: name,
            queued,
        }),
    ))
}

/// Adds the status counts to evaluations.
pub(super) async fn summarise(
    state: &AppState,
    evaluations: Vec<Evaluation>,
) -> Result<Vec<EvaluationSummary>, WebError> {
    let mut out = Vec::with_capacity(evaluations.len());
    for evaluation in evaluations {
        let counts = state.db.status_counts(Some(evaluation.id)).await?;
        out.push(EvaluationSummary { evaluation, counts });
    }
    Ok(out)
}

/// An evaluation with its builds, the attributes that failed to evaluate,
/// and the diff to the previous evaluation of its specification.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvaluationDetail {
    #[serde(flatten)]
    pub summary: EvaluationSummary,
    pub builds: Vec<BuildView>,
    pub errors: Vec<EvaluationError>,
    pub diff: EvaluationDiff,
}

/// Everything about one evaluation, read together for the page and the API.
pub(super) async fn evaluation_detail(
    state: &AppState,
    id: i64,
) -> Result<EvaluationDetail, WebError> {
    let evaluation = state
        .db
        .evaluation(id)
        .await?
        .ok_or_else(|| WebError::not_found("evaluation", id))?;
    let builds = state.db.builds_of_evaluation(id).await?;
    let previous = match state.db.previous_evaluation(id).await? {
        Some(previous) => Some((previous.id, state.db.job_statuses(previous.id).await?)),
        None => None,
    };
    let diff = EvaluationDiff::between(
        &builds,
        previous
            .as_ref()
            .map(|(id, builds)| (*id, builds.as_slice())),
    );
    let mut counts = StatusCounts::new();
    for build in &builds {
        *counts.entry(build.status).or_default() += 1;
    }
    let errors = state.db.evaluation_errors(id).await?;
    let now = now();
    Ok(EvaluationDetail {
        summary: EvaluationSummary { evaluation, counts },
        builds: builds.into_iter().map(|b| BuildView::new(b, now)).collect(),
        errors,
        diff,
    })
}

/// One evaluation with its builds and its diff to the previous one.
#[utoipa::path(get, path = "/api/evaluations/{id}", tag = "evaluations",
    params(("id" = i64, Path, description = "Evaluation id")),
    responses((status = 200, body = EvaluationDetail), (status = 404, body = ErrorBody)))]
async fn get_evaluation(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<EvaluationDetail>> {
    Ok(Json(evaluation_detail(&state, id).await?))
}

/// The log of an evaluation (fetching its inputs and the evaluator's
/// stderr) as far as it goes.
pub(super) async fn evaluation_log_text(
    evaluation: &crate::model::Evaluation,
) -> Result<Vec<u8>, WebError> {
    match &evaluation.log_path {
        Some(path) => Ok(logs::read_stored(path).await?.unwrap_or_default()),
        None => Ok(Vec::new()),
    }
}

/// An evaluation's log, as plain text.
#[utoipa::path(get, path = "/api/evaluations/{id}/log", tag = "evaluations",
    params(("id" = i64, Path, description = "Evaluation id")),
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 404, body = ErrorBody)))]
async fn evaluation_log(State(state): State<AppState>, Path(id): Path<i64>) -> ApiResult<Response> {
    let evaluation = state
        .db
        .evaluation(id)
        .await?
        .ok_or_else(|| WebError::not_found("evaluation", id))?;
    let bytes = evaluation_log_text(&evaluation).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

// ---- builds --------------------------------------------------------------

/// A build as the API shows it: the stored build and how long it ran.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildView {
    #[serde(flatten)]
    pub build: Build,
    /// Seconds from start to stop (to now while it runs); absent before it starts.
    pub duration_secs: Option<i64>,
}

impl BuildView {
    pub fn new(build: Build, now: i64) -> BuildView {
        let duration_secs = format::build_duration(&build, now);
        BuildView {
            build,
            duration_secs,
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct BuildQuery {
    /// Only builds of this specification.
    pub specification: Option<String>,
    /// Only builds of this evaluation.
    pub evaluation: Option<i64>,
    /// Only builds in this status (`failed`, `scheduled`, …).
    pub status: Option<String>,
    /// Only builds of this job (attribute name).
    pub job: Option<String>,
    /// At most this many, newest first (default 100, at most 10000).
    pub limit: Option<i64>,
    /// Skip this many first.
    pub offset: Option<i64>,
}

impl BuildQuery {
    pub fn filter(&self) -> Result<BuildFilter, WebError> {
        let status = match &self.status {
            Some(s) if !s.is_empty() => Some(
                s.parse::<BuildStatus>()
                    .map_err(|e| WebError::BadRequest(e.to_string()))?,
            ),
            _ => None,
        };
        Ok(BuildFilter {
            specification: self.specification.clone().filter(|s| !s.is_empty()),
            evaluation_id: self.evaluation,
            status,
            job: self.job.clone().filter(|s| !s.is_empty()),
            limit: self.limit.unwrap_or(100).clamp(1, 10_000),
            offset: self.offset.unwrap_or(0).max(0),
        })
    }
}

/// Builds, newest first, filtered.
#[utoipa::path(get, path = "/api/builds", tag = "builds", params(BuildQuery),
    responses((status = 200, body = Vec<BuildView>), (status = 400, body = ErrorBody)))]
async fn list_builds(
    State(state): State<AppState>,
    Query(query): Query<BuildQuery>,
) -> ApiResult<Json<Vec<BuildView>>> {
    let builds = state.db.list_builds(&query.filter()?).await?;
    let now = now();
    Ok(Json(
        builds.into_iter().map(|b| BuildView::new(b, now)).collect(),
    ))
}

/// A build with the builds it depends on and those that depend on it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildDetail {
    #[serde(flatten)]
    pub view: BuildView,
    /// Ids of the builds this one needs.
    pub dependencies: Vec<i64>,
    /// Ids of the builds that need this one.
    pub dependents: Vec<i64>,
}

pub(super) async fn build_detail(state: &AppState, id: i64) -> Result<BuildDetail, WebError> {
    let build = state
        .db
        .build(id)
        .await?
        .ok_or_else(|| WebError::not_found("build", id))?;
    Ok(BuildDetail {
        view: BuildView::new(build, now()),
        dependencies: state.db.dependencies_of(id).await?,
        dependents: state.db.dependents_of(id).await?,
    })
}

/// One build.
#[utoipa::path(get, path = "/api/builds/{id}", tag = "builds",
    params(("id" = i64, Path, description = "Build id")),
    responses((status = 200, body = BuildDetail), (status = 404, body = ErrorBody)))]
async fn get_build(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<BuildDetail>> {
    Ok(Json(build_detail(&state, id).await?))
}

/// Builds the build again, with everything that failed because of it, in
/// dependency order. Answers the ids put back in the queue.
#[utoipa::path(post, path = "/api/builds/{id}/restart", tag = "builds",
    params(("id" = i64, Path, description = "Build id")),
    security(("api_token" = [])),
    responses((status = 200, body = Vec<i64>), (status = 404, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
async fn restart_build(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<Json<Vec<i64>>> {
    if state.db.build(id).await?.is_none() {
        return Err(WebError::not_found("build", id).into());
    }
    // The coordinator also roots the `.drv`s again and wakes its dispatcher.
    let restarted = match &state.coordinator {
        Some(coordinator) => coordinator.restart(&[id]).await?,
        None => state.db.restart_builds(&[id]).await?,
    };
    Ok(Json(restarted))
}

/// The log as far as it goes: the stored log of an ended build, the live
/// log of a running one, or nothing.
pub(super) async fn current_log(state: &AppState, build: &Build) -> Result<Vec<u8>, WebError> {
    if let Some((bytes, _)) = state.live.read_from(build.id, 0) {
        return Ok(bytes);
    }
    match &build.log_path {
        Some(path) => Ok(logs::read_stored(path).await?.unwrap_or_default()),
        None => Ok(Vec::new()),
    }
}

/// A build's whole log, as plain text.
#[utoipa::path(get, path = "/api/builds/{id}/log", tag = "builds",
    params(("id" = i64, Path, description = "Build id")),
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 404, body = ErrorBody)))]
async fn build_log(State(state): State<AppState>, Path(id): Path<i64>) -> ApiResult<Response> {
    let build = state
        .db
        .build(id)
        .await?
        .ok_or_else(|| WebError::not_found("build", id))?;
    let bytes = current_log(&state, &build).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TailQuery {
    /// Byte offset to read from (the previous chunk's `next_offset`).
    offset: Option<u64>,
    /// Seconds to wait for more when there is nothing new yet (at most 30).
    wait: Option<u64>,
}

/// A piece of a build's log, for following it.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogChunk {
    pub offset: u64,
    /// Where the next request starts.
    pub next_offset: u64,
    /// The log's bytes from `offset` to `next_offset` (invalid UTF-8 replaced).
    pub text: String,
    /// The build's status now.
    pub status: BuildStatus,
    /// True when the build has ended and this chunk reaches the end of its log.
    pub complete: bool,
}

const MAX_TAIL_WAIT: Duration = Duration::from_secs(30);
/// How often a waiting tail looks at the database for a build without a live log.
const TAIL_POLL: Duration = Duration::from_millis(500);

/// Follows a build's log: the bytes past `offset`, waiting up to `wait`
/// seconds for some while the build runs (long polling).
#[utoipa::path(get, path = "/api/builds/{id}/log/tail", tag = "builds",
    params(("id" = i64, Path, description = "Build id"), TailQuery),
    responses((status = 200, body = LogChunk), (status = 404, body = ErrorBody)))]
async fn build_log_tail(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(query): Query<TailQuery>,
) -> ApiResult<Json<LogChunk>> {
    let offset = query.offset.unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(query.wait.unwrap_or(0)).min(MAX_TAIL_WAIT);
    loop {
        let build = state
            .db
            .build(id)
            .await?
            .ok_or_else(|| WebError::not_found("build", id))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Some((bytes, _)) = state.live.read_from(id, offset) {
            let whole = logs::whole_chars_len(&bytes);
            if whole > 0 || remaining.is_zero() {
                return Ok(Json(chunk(offset, &bytes[..whole], build.status, false)));
            }
            state
                .live
                .wait_past(id, offset + bytes.len() as u64, remaining)
                .await;
            continue;
        }
        if build.status.is_finished() {
            let log = current_log(&state, &build).await?;
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
            return Ok(Json(chunk(offset, &log[start..], build.status, true)));
        }
        if remaining.is_zero() {
            return Ok(Json(chunk(offset, &[], build.status, false)));
        }
        tokio::time::sleep(remaining.min(TAIL_POLL)).await;
    }
}

fn chunk(offset: u64, bytes: &[u8], status: BuildStatus, complete: bool) -> LogChunk {
    LogChunk {
        offset,
        next_offset: offset + bytes.len() as u64,
        text: String::from_utf8_lossy(bytes).into_owned(),
        status,
        complete,
    }
}

// ---- agents and machines -------------------------------------------------

/// The build agents the controller knows.
#[utoipa::path(get, path = "/api/agents", tag = "agents",
    responses((status = 200, body = Vec<Agent>)))]
async fn list_agents(State(state): State<AppState>) -> ApiResult<Json<Vec<Agent>>> {
    Ok(Json(state.db.agents().await?))
}

/// A machine builds run on: one an agent offers, or one a build ran on.
#[derive(Debug, Serialize, ToSchema)]
pub struct Machine {
    pub name: String,
    /// The agents offering it (empty for builders that are not agents, e.g. `local`).
    pub agents: Vec<String>,
    /// When one of those agents last asked for work.
    pub last_seen: Option<i64>,
    /// Ids of the builds running on it now.
    pub running: Vec<i64>,
}

pub(super) async fn machines(state: &AppState) -> Result<Vec<Machine>, WebError> {
    let mut machines: BTreeMap<String, Machine> = BTreeMap::new();
    fn entry<'m>(machines: &'m mut BTreeMap<String, Machine>, name: &str) -> &'m mut Machine {
        machines.entry(name.to_owned()).or_insert_with(|| Machine {
            name: name.to_owned(),
            agents: Vec::new(),
            last_seen: None,
            running: Vec::new(),
        })
    }
    for agent in state.db.agents().await? {
        for name in &agent.machines {
            let machine = entry(&mut machines, name);
            machine.agents.push(agent.name.clone());
            machine.last_seen = machine.last_seen.max(agent.last_seen);
        }
    }
    let running = state
        .db
        .list_builds(&BuildFilter {
            status: Some(BuildStatus::Started),
            ..BuildFilter::default()
        })
        .await?;
    for build in running.iter().rev() {
        if let Some(machine) = &build.machine {
            entry(&mut machines, machine).running.push(build.id);
        }
    }
    Ok(machines.into_values().collect())
}

/// The machines: those agents offer and those builds run on now.
#[utoipa::path(get, path = "/api/machines", tag = "agents",
    responses((status = 200, body = Vec<Machine>)))]
async fn list_machines(State(state): State<AppState>) -> ApiResult<Json<Vec<Machine>>> {
    Ok(Json(machines(&state).await?))
}
