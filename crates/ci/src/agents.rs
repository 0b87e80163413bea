//! kiln-ci as the controller of `build-agent`s: the agent protocol
//! ([`kiln_agent::protocol`]) served on the web listener under `/agent`.
//!
//! Which builds go to agents: those whose derivation requires one of the
//! system features in [`Config::agent_features`] (e.g. `vm`, through
//! `requiredSystemFeatures`). It is the way Nix already routes builds to
//! machines, it needs no new field in specifications, and it is stored with
//! every build (`required_features`). The embedded scheduler leaves such
//! builds alone; they wait until an agent asks for work.
//!
//! The exchange, for one build per task:
//! - `POST /agent/task`: the agent's [`TaskRequest`]. Its key fingerprint
//!   must be that of an enabled agent row of the database (the trusted set),
//!   or the answer is 403. The row's `last_seen` and machines are updated;
//!   the answer is the next agent build (priority, fair share, age) as a
//!   [`Task`] for the first machine the agent offered, with a fresh
//!   challenge, or an empty [`TaskResponse`] when there is nothing to do.
//!   The build becomes started, with the agent as its machine.
//! - `GET /agent/inputs/{session}`: the export stream of the derivation's
//!   closure, with the outputs of its input derivations that are valid here.
//! - `PUT /agent/result/{session}/nar/{name}` and `.../log/{drv name}`: the
//!   outputs' NARs and the build log, spooled to the state directory.
//! - `POST /agent/result/{session}`: the [`ResultRequest`]. Its challenge
//!   signature must verify with the key of the agent that took the task;
//!   if not, 403 and the build goes back to scheduled for another attempt.
//!   Otherwise each output's NAR is checked against the manifest (hash and
//!   size) and the path the derivation names, imported into the CI store,
//!   and the build ends succeeded or failed like a local one.
//!
//! Sessions are rows of the database (`agent_sessions`), so that a
//! restart of kiln-ci does not lose the work of agents building meanwhile:
//! [`Coordinator::recover`] leaves their builds started, and the results
//! are accepted as before. A session not answered within the timeout is
//! taken back (its build is scheduled again).
//!
//! Agent builds do not wait forever for an agent: while no agent holds a
//! task and none has asked for work within [`Config::agent_wait`] (counted
//! from kiln-ci's start at the earliest), waiting agent builds fail
//! (failed-other), saying which feature no agent came for and since when
//! ([`fail_builds_without_agents`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use kiln_agent::protocol::{
    ResultRequest, ResultStatus, Task, TaskRequest, TaskResponse, key_fingerprint, new_challenge,
    verify_challenge,
};
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::signature::{PublicKey, TrustedKeys};
use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_store::{AddOptions, PathInfo, Store as _};
use sha2::Digest as _;

use crate::coordinator::{CACHEABLE_FAILURES, Config, Coordinator, CoordinatorError, fair_share};
use crate::db::{DbError, FeatureFilter, StatusChange};
use crate::model::{AgentSession, Build, BuildStatus, now};

/// Whether `build` is for agents rather than the embedded scheduler.
pub fn is_agent_build(config: &Config, build: &Build) -> bool {
    build
        .required_features
        .iter()
        .any(|f| config.agent_features.contains(f))
}

/// What went wrong while serving an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the request body is not a {what}: {source}")]
    BadRequest {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error(
        "no enabled agent has the key with fingerprint {fingerprint} (agent '{agent}'); add its public key to the trusted agents"
    )]
    UntrustedKey { agent: String, fingerprint: String },
    #[error("agent '{agent}' offered no machine")]
    NoMachine { agent: String },
    #[error("no open session '{0}' (finished, rejected, or from before a restart)")]
    UnknownSession(String),
    #[error("result for session '{given}' posted to session '{session}'")]
    WrongSession { given: String, session: String },
    #[error("challenge signature rejected for session '{session}': {reason}")]
    BadSignature { session: String, reason: String },
    #[error("'{0}' is not a file name")]
    BadName(String),
    #[error("the result of build {build} is unusable: {reason}")]
    BadResult { build: i64, reason: String },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("build {build}: '{drv}' is not a derivation's store path: {reason}")]
    BadDerivation {
        build: i64,
        drv: String,
        reason: String,
    },
    #[error("store: {0}")]
    Store(Box<kiln_store::StoreError>),
    #[error("{what} '{}': {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("background task failed: {0}")]
    Join(String),
}

impl From<kiln_store::StoreError> for AgentError {
    fn from(e: kiln_store::StoreError) -> AgentError {
        AgentError::Store(Box::new(e))
    }
}

impl AgentError {
    fn status(&self) -> StatusCode {
        match self {
            AgentError::BadRequest { .. } | AgentError::BadName(_) => StatusCode::BAD_REQUEST,
            AgentError::UntrustedKey { .. }
            | AgentError::BadSignature { .. }
            | AgentError::WrongSession { .. } => StatusCode::FORBIDDEN,
            AgentError::NoMachine { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::UnknownSession(_) => StatusCode::NOT_FOUND,
            AgentError::BadResult { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AgentError::Db(_)
            | AgentError::BadDerivation { .. }
            | AgentError::Store(_)
            | AgentError::Io { .. }
            | AgentError::Join(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "agent request failed");
        } else {
            tracing::warn!(error = %self, "agent request refused");
        }
        (status, format!("{self}\n")).into_response()
    }
}

type Result<T, E = AgentError> = std::result::Result<T, E>;

/// How tasks are made.
#[derive(Debug, Clone)]
pub struct AgentsConfig {
    /// `nix.conf` settings for the guest's build (e.g. `sandbox-paths`);
    /// `system-features` gets the build's required features added.
    pub task_settings: BTreeMap<String, String>,
    /// A task not answered within this time is taken back (its build is
    /// scheduled again), so that a vanished agent does not hold it forever.
    pub session_timeout: Duration,
}

impl Default for AgentsConfig {
    fn default() -> AgentsConfig {
        AgentsConfig {
            task_settings: BTreeMap::new(),
            session_timeout: Duration::from_secs(3 * 3600),
        }
    }
}

/// A task handed out and not yet answered, with its build as it was then.
#[derive(Debug, Clone)]
struct Session {
    build: Build,
    agent: String,
    key: PublicKey,
    challenge: String,
    dir: PathBuf,
}

#[derive(Debug)]
struct Controller {
    coordinator: Coordinator,
    config: AgentsConfig,
    /// Handing out is one at a time, so that two agents never get one build.
    handout: tokio::sync::Mutex<()>,
}

/// The agent endpoints, to merge into the web router.
pub fn router(coordinator: Coordinator, config: AgentsConfig) -> Router {
    let state = Arc::new(Controller {
        coordinator,
        config,
        handout: tokio::sync::Mutex::new(()),
    });
    Router::new()
        .route("/agent/task", post(task))
        .route("/agent/inputs/{session}", get(inputs))
        .route("/agent/result/{session}", post(result))
        .route("/agent/result/{session}/{kind}/{name}", put(upload))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + use<> {
    let path = path.to_owned();
    move |source| AgentError::Io { what, path, source }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?
}

fn sessions_dir(c: &Controller) -> PathBuf {
    c.coordinator.config().state_dir.join("agent-sessions")
}

async fn task(
    State(c): State<Arc<Controller>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<TaskResponse>> {
    let request: TaskRequest =
        serde_json::from_slice(&body).map_err(|source| AgentError::BadRequest {
            what: "task request",
            source,
        })?;
    let db = c.coordinator.db();
    let known = db
        .agents()
        .await?
        .into_iter()
        .filter(|a| a.enabled)
        .find_map(|a| {
            let key: PublicKey = a.public_key.parse().ok()?;
            (key_fingerprint(&key) == request.fingerprint).then_some((a, key))
        });
    let Some((agent, key)) = known else {
        return Err(AgentError::UntrustedKey {
            agent: request.agent,
            fingerprint: request.fingerprint,
        });
    };
    let machines: Vec<String> = request.machines.iter().map(|m| m.name.clone()).collect();
    db.touch_agent(&agent.name, &machines).await?;
    let Some(machine) = machines.first().cloned() else {
        return Err(AgentError::NoMachine { agent: agent.name });
    };

    let _one_at_a_time = c.handout.lock().await;
    take_back_expired(&c).await?;
    let config = c.coordinator.config();
    let candidates: Vec<Build> = db
        .dispatchable_builds(256, FeatureFilter::With(&config.agent_features))
        .await?;
    let Some(build) = fair_share(candidates, 1).pop() else {
        return Ok(axum::Json(TaskResponse::default()));
    };

    let challenge = new_challenge();
    let session: String = sha2::Sha256::digest(format!("{}:{challenge}", build.id))
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = sessions_dir(&c).join(&session);
    let store = c.coordinator.store().clone();
    let drv = build.drv_path.clone();
    let inputs_file = dir.join("inputs");
    let id = build.id;
    blocking(move || write_inputs(&store, id, &drv, &inputs_file)).await?;

    db.set_build_status(
        build.id,
        BuildStatus::Started,
        &StatusChange {
            machine: Some(agent.name.clone()),
            ..StatusChange::default()
        },
    )
    .await?;
    let base = format!(
        "http://{}",
        headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
    );
    let mut settings = c.config.task_settings.clone();
    let mut features: BTreeSet<String> = settings
        .get("system-features")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    features.extend(build.required_features.iter().cloned());
    settings.insert(
        "system-features".into(),
        features.into_iter().collect::<Vec<_>>().join(" "),
    );
    let task = Task {
        machine,
        repository: format!("{base}/api/evaluations/{}", build.evaluation_id),
        derivations: vec![build.drv_path.clone()],
        inputs_url: format!("{base}/agent/inputs/{session}"),
        settings,
    };
    tracing::info!(build = build.id, agent = %agent.name, session, "build handed to an agent");
    db.put_agent_session(&AgentSession {
        session: session.clone(),
        build_id: build.id,
        agent: agent.name,
        public_key: key.to_string(),
        challenge: challenge.clone(),
        dir: dir.to_string_lossy().into_owned(),
        handed_out: now(),
    })
    .await?;
    Ok(axum::Json(TaskResponse {
        result_url: format!("{base}/agent/result/{session}"),
        session,
        challenge,
        task: Some(task),
    }))
}

/// Schedules again the builds of sessions older than the timeout.
async fn take_back_expired(c: &Controller) -> Result<()> {
    let db = c.coordinator.db();
    let timeout = c.config.session_timeout.as_secs() as i64;
    for s in db.agent_sessions().await? {
        // Removing first: of two requests taking the same session back, one does.
        if now() - s.handed_out < timeout || !db.remove_agent_session(&s.session).await? {
            continue;
        }
        tracing::warn!(build = s.build_id, agent = %s.agent, "agent did not answer in time; build scheduled again");
        db.set_build_status(
            s.build_id,
            BuildStatus::Scheduled,
            &StatusChange {
                error: Some(format!(
                    "agent '{}' did not answer within {} s",
                    s.agent,
                    c.config.session_timeout.as_secs()
                )),
                ..StatusChange::default()
            },
        )
        .await?;
        let _ = tokio::fs::remove_dir_all(&s.dir).await;
    }
    Ok(())
}

/// The derivation's closure plus the valid outputs of the derivations in
/// it (so that the guest builds only what is missing), as an export stream.
fn write_inputs(
    store: &kiln_store::local::LocalStore,
    build: i64,
    drv: &str,
    file: &Path,
) -> Result<()> {
    let dir = store.store_dir();
    let drv = dir.parse_path(drv).map_err(|e| AgentError::BadDerivation {
        build,
        drv: drv.to_owned(),
        reason: e.to_string(),
    })?;
    let start = StorePathSet::from([drv.clone()]);
    let mut paths = kiln_store::compute_closure(store, &start, false, false, false)?;
    let mut built = StorePathSet::new();
    for path in paths.iter().filter(|p| p.is_derivation() && **p != drv) {
        for (_, out) in store.query_derivation_outputs(path)? {
            if store.is_valid_path(&out)? {
                built.insert(out);
            }
        }
    }
    paths.extend(kiln_store::compute_closure(
        store, &built, false, false, false,
    )?);
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(io("create session directory", parent))?;
    }
    let out = std::fs::File::create(file).map_err(io("create", file))?;
    let mut out = std::io::BufWriter::new(out);
    kiln_store::export::export_paths(store, &paths, &mut out)?;
    out.flush().map_err(io("write", file))
}

/// The open session `id` with its build (gone with its specification, the
/// session is as good as closed).
async fn session(c: &Controller, id: &str) -> Result<Session> {
    let db = c.coordinator.db();
    let unknown = || AgentError::UnknownSession(id.to_owned());
    let stored = db.agent_session(id).await?.ok_or_else(unknown)?;
    let build = db.build(stored.build_id).await?.ok_or_else(unknown)?;
    let key = stored
        .public_key
        .parse()
        .map_err(
            |e: kiln_formats::signature::SignatureError| DbError::Corrupt {
                what: "agent session key",
                value: stored.public_key.clone(),
                problem: e.to_string(),
            },
        )?;
    Ok(Session {
        build,
        agent: stored.agent,
        key,
        challenge: stored.challenge,
        dir: PathBuf::from(stored.dir),
    })
}

async fn inputs(State(c): State<Arc<Controller>>, UrlPath(id): UrlPath<String>) -> Result<Vec<u8>> {
    let s = session(&c, &id).await?;
    let file = s.dir.join("inputs");
    tokio::fs::read(&file)
        .await
        .map_err(|e| io("read", &file)(e))
}

/// Plain file names only: they become files of the session directory.
fn file_name(name: &str) -> Result<&str> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') {
        return Err(AgentError::BadName(name.to_owned()));
    }
    Ok(name)
}

async fn upload(
    State(c): State<Arc<Controller>>,
    UrlPath((id, kind, name)): UrlPath<(String, String, String)>,
    body: Bytes,
) -> Result<StatusCode> {
    let s = session(&c, &id).await?;
    if kind != "nar" && kind != "log" {
        return Err(AgentError::BadName(kind));
    }
    let dir = s.dir.join(&kind);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io("create", &dir)(e))?;
    let file = dir.join(file_name(&name)?);
    tokio::fs::write(&file, &body)
        .await
        .map_err(|e| io("write", &file)(e))?;
    Ok(StatusCode::OK)
}

async fn result(
    State(c): State<Arc<Controller>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<StatusCode> {
    let s = session(&c, &id).await?;
    let request: ResultRequest =
        serde_json::from_slice(&body).map_err(|source| AgentError::BadRequest {
            what: "result request",
            source,
        })?;
    let mut keys = TrustedKeys::new();
    keys.insert(s.key.clone());
    let verdict = if request.session != id {
        Err(AgentError::WrongSession {
            given: request.session.clone(),
            session: id.clone(),
        })
    } else {
        verify_challenge(&keys, &id, &s.challenge, &request.challenge_signature).map_err(|e| {
            AgentError::BadSignature {
                session: id.clone(),
                reason: e.to_string(),
            }
        })
    };
    // Whatever happens now, this session is over; if another request ended
    // it meanwhile (a take-back), this result is too late.
    let db = c.coordinator.db();
    if !db.remove_agent_session(&id).await? {
        return Err(AgentError::UnknownSession(id));
    }
    if let Err(rejected) = verdict {
        db.set_build_status(
            s.build.id,
            BuildStatus::Scheduled,
            &StatusChange {
                error: Some(rejected.to_string()),
                ..StatusChange::default()
            },
        )
        .await?;
        c.coordinator.wake();
        let dir = s.dir.clone();
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(rejected);
    }

    let outcome = request
        .result
        .builds
        .iter()
        .find(|b| b.drv == s.build.drv_path)
        .cloned();
    let built = matches!(
        request.result.status,
        ResultStatus::Success | ResultStatus::Warning
    ) && outcome.as_ref().is_some_and(|o| {
        matches!(
            o.status.as_str(),
            "Built" | "Substituted" | "AlreadyValid" | "ResolvesToAlreadyValid"
        )
    });
    // The agent names the scheduler's status as Nix does.
    let cacheable = outcome
        .as_ref()
        .is_some_and(|o| CACHEABLE_FAILURES.iter().any(|s| s.name() == o.status));
    let log_path = keep_log(&c, &s).await;
    let (status, error) = if built {
        let outcome = outcome.expect("checked above");
        let store = c.coordinator.store().clone();
        let (build, dir) = (s.build.clone(), s.dir.clone());
        match blocking(move || import_outputs(&store, &build, &outcome, &dir)).await {
            Ok(()) => (BuildStatus::Succeeded, None),
            Err(e @ AgentError::BadResult { .. }) => {
                finish(
                    &c,
                    &s,
                    BuildStatus::FailedOther,
                    log_path,
                    Some(e.to_string()),
                )
                .await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    } else {
        let why = match &outcome {
            Some(o) if !o.error.is_empty() => o.error.clone(),
            Some(o) => format!("{} on agent '{}'", o.status, s.agent),
            None => format!(
                "{} on agent '{}': {}",
                request.result.status.as_str(),
                s.agent,
                request.result.message
            ),
        };
        let status = match request.result.status {
            ResultStatus::Success | ResultStatus::Warning | ResultStatus::Error => {
                BuildStatus::Failed
            }
            _ => BuildStatus::FailedOther,
        };
        (status, Some(why))
    };
    finish(&c, &s, status, log_path, error).await?;
    if status == BuildStatus::Failed && cacheable {
        db.remember_failures(&[s.build.id]).await?;
    }
    Ok(StatusCode::OK)
}

/// Fails the waiting agent builds when no build agent is connected: none
/// holds a task and none has asked for work within [`Config::agent_wait`]
/// (counted from the coordinator's start at the earliest, since agents
/// could not connect while it was down).
pub async fn fail_builds_without_agents(coordinator: &Coordinator) -> Result<(), CoordinatorError> {
    let config = coordinator.config();
    let db = coordinator.db();
    if !db.agent_sessions().await?.is_empty() {
        return Ok(());
    }
    let last_seen = db
        .agents()
        .await?
        .iter()
        .filter(|a| a.enabled)
        .filter_map(|a| a.last_seen)
        .max();
    let since = last_seen.unwrap_or(0).max(coordinator.started_at());
    if now() - since < config.agent_wait.as_secs() as i64 {
        return Ok(());
    }
    let waiting = db
        .dispatchable_builds(i64::MAX, FeatureFilter::With(&config.agent_features))
        .await?;
    let mut by_reason: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for build in waiting {
        let features: Vec<&str> = build
            .required_features
            .iter()
            .filter(|f| config.agent_features.contains(*f))
            .map(String::as_str)
            .collect();
        let when = match last_seen {
            Some(seen) if seen >= coordinator.started_at() => {
                format!("{} UTC", crate::web::format::time(seen))
            }
            _ => format!(
                "kiln-ci started at {} UTC",
                crate::web::format::time(coordinator.started_at())
            ),
        };
        let reason = format!(
            "no build-agent with feature '{}' has connected since {when} (agent builds wait {} s for one: agent-wait)",
            features.join("', '"),
            config.agent_wait.as_secs()
        );
        by_reason.entry(reason).or_default().push(build.id);
    }
    for (reason, ids) in by_reason {
        tracing::warn!(count = ids.len(), %reason, "agent builds failed");
        coordinator
            .finish_builds(
                &ids,
                BuildStatus::FailedOther,
                StatusChange {
                    error: Some(reason),
                    ..StatusChange::default()
                },
            )
            .await?;
    }
    Ok(())
}

async fn finish(
    c: &Controller,
    s: &Session,
    status: BuildStatus,
    log_path: Option<String>,
    error: Option<String>,
) -> Result<()> {
    c.coordinator
        .finish_builds(
            &[s.build.id],
            status,
            StatusChange {
                machine: Some(s.agent.clone()),
                log_path,
                error,
            },
        )
        .await
        .map_err(|e| match e {
            crate::coordinator::CoordinatorError::Db(e) => AgentError::Db(e),
            other => AgentError::Join(other.to_string()),
        })?;
    let _ = tokio::fs::remove_dir_all(&s.dir).await;
    c.coordinator.wake();
    Ok(())
}

/// Moves the uploaded log (if any) next to the coordinator's logs.
async fn keep_log(c: &Controller, s: &Session) -> Option<String> {
    let name = s.build.drv_path.rsplit('/').next()?.to_owned();
    let uploaded = s.dir.join("log").join(&name);
    if !tokio::fs::try_exists(&uploaded).await.unwrap_or(false) {
        return None;
    }
    let dir = c.coordinator.config().state_dir.join("logs").join("agents");
    tokio::fs::create_dir_all(&dir).await.ok()?;
    let kept = dir.join(format!("{}.log", s.build.id));
    tokio::fs::rename(&uploaded, &kept).await.ok()?;
    Some(kept.to_string_lossy().into_owned())
}

/// Checks each output against the manifest and the derivation and adds it
/// to the store, references first.
fn import_outputs(
    store: &kiln_store::local::LocalStore,
    build: &Build,
    outcome: &kiln_agent::protocol::BuildOutcome,
    dir: &Path,
) -> Result<()> {
    let bad = |reason: String| AgentError::BadResult {
        build: build.id,
        reason,
    };
    let store_dir = store.store_dir();
    let deriver = store_dir.parse_path(&build.drv_path).ok();
    let mut pending: Vec<(PathInfo, PathBuf)> = Vec::new();
    for (name, expected) in &build.outputs {
        let Some(out) = outcome.outputs.get(name) else {
            return Err(bad(format!(
                "output '{name}' ({expected}) did not come back"
            )));
        };
        if &out.path != expected {
            return Err(bad(format!(
                "output '{name}' came back as {}, the derivation says {expected}",
                out.path
            )));
        }
        let path: StorePath = store_dir
            .parse_path(&out.path)
            .map_err(|e| bad(format!("'{}': {e}", out.path)))?;
        let base = out.path.rsplit('/').next().unwrap_or_default();
        let file = dir.join("nar").join(base);
        let nar = std::fs::read(&file)
            .map_err(|e| bad(format!("no NAR uploaded for {} ({e})", out.path)))?;
        let claimed: Hash = out
            .nar_hash
            .parse()
            .map_err(|e| bad(format!("NAR hash '{}' of {}: {e}", out.nar_hash, out.path)))?;
        let actual = Hash::digest(HashAlgo::Sha256, &nar);
        if actual != claimed || nar.len() as u64 != out.nar_size {
            return Err(bad(format!(
                "the NAR uploaded for {} is {actual} ({} bytes), the manifest says {} ({} bytes)",
                out.path,
                nar.len(),
                out.nar_hash,
                out.nar_size
            )));
        }
        let mut info = PathInfo::new(path, actual, out.nar_size);
        for r in &out.references {
            info.references.insert(
                store_dir
                    .parse_path(r)
                    .map_err(|e| bad(format!("reference '{r}' of {}: {e}", out.path)))?,
            );
        }
        info.deriver = deriver.clone();
        pending.push((info, file));
    }
    // Outputs may refer to each other (e.g. `doc` to `out`): add each once
    // the outputs it refers to are in.
    let mut added: BTreeSet<StorePath> = BTreeSet::new();
    let ours: BTreeSet<StorePath> = pending.iter().map(|(i, _)| i.path.clone()).collect();
    while !pending.is_empty() {
        let ready = pending.iter().position(|(info, _)| {
            info.references
                .iter()
                .all(|r| *r == info.path || !ours.contains(r) || added.contains(r))
        });
        let Some(index) = ready else {
            return Err(bad("the outputs refer to each other in a cycle".into()));
        };
        let (info, file) = pending.remove(index);
        let nar = std::fs::read(&file).map_err(io("read", &file))?;
        store.add_nar(&info, &mut &nar[..], AddOptions::default())?;
        added.insert(info.path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Agent;
    use axum::body::Body;
    use axum::http::Request;
    use kiln_agent::protocol::{
        BuildOutcome, InteractiveMode, MachineHeader, OutputInfo, ResultManifest, sign_challenge,
    };
    use kiln_formats::signature::SecretKey;
    use tower::ServiceExt as _;

    async fn call(app: &Router, method: &str, uri: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let response = app
            .clone()
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("host", "ci.example")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, body.to_vec())
    }

    fn request(key: &SecretKey) -> Vec<u8> {
        serde_json::to_vec(&TaskRequest {
            agent: key.name().into(),
            toolchain_name: "kiln".into(),
            toolchain_version: "0".into(),
            instance: 1,
            interactive: InteractiveMode::False,
            fingerprint: key_fingerprint(&key.to_public()),
            machines: vec![MachineHeader {
                id: "m1".into(),
                name: "vm-machine".into(),
                summary: String::new(),
            }],
        })
        .unwrap()
    }

    /// Without a VM: trust, hand-out, take-back after the timeout, forged
    /// signatures, and a well-signed result whose NAR does not match.
    #[tokio::test(flavor = "multi_thread")]
    async fn sessions_signatures_and_nar_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let recipe = tmp.path().join("ci.toml");
        std::fs::write(
            &recipe,
            "[packages.on-vm]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo x > $out\"]\n\
             env = { requiredSystemFeatures = \"vm\" }\n",
        )
        .unwrap();
        let mut config = Config::new(tmp.path().join("state"));
        config.store_root = Some(tmp.path().join("store"));
        config.agent_features = BTreeSet::from(["vm".to_owned()]);
        let db = crate::db::Db::open(&tmp.path().join("ci.sqlite").to_string_lossy())
            .await
            .unwrap();
        let coordinator = Coordinator::new(db.clone(), config).unwrap();
        let key = SecretKey::generate("vm-agent").unwrap();
        db.put_agent(&Agent {
            name: "vm-agent".into(),
            public_key: key.to_public().to_string(),
            machines: vec![],
            enabled: true,
            registered_at: 0,
            last_seen: None,
        })
        .await
        .unwrap();
        let jobs = crate::recipe_jobs::recipe_jobs(coordinator.store(), &recipe, "x86_64-linux")
            .unwrap()
            .into_iter()
            .map(|l| crate::eval::Job {
                attr: l.attr,
                drv_path: l.drv_path,
                outputs: l.outputs,
                system: l.system,
                error: None,
            })
            .collect();
        let spec = crate::model::Specification {
            eval_input: "src".into(),
            ..crate::model::Specification::new("s", vec![], vec!["true".into()])
        };
        db.put_specification(&spec).await.unwrap();
        let eval = db.create_evaluation("s").await.unwrap();
        coordinator.register(eval, "s", 0, jobs).await.unwrap();
        let id = db.builds_of_evaluation(eval).await.unwrap()[0].id;
        // The embedded scheduler leaves it to agents.
        assert_eq!(coordinator.dispatch_once().await.unwrap(), 0);

        let app = router(
            coordinator.clone(),
            AgentsConfig {
                session_timeout: Duration::ZERO,
                ..AgentsConfig::default()
            },
        );
        let stranger = SecretKey::generate("vm-agent").unwrap();
        let (status, _) = call(&app, "POST", "/agent/task", request(&stranger)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        let take = || async {
            let (status, body) = call(&app, "POST", "/agent/task", request(&key)).await;
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            serde_json::from_slice::<TaskResponse>(&body).unwrap()
        };
        let first = take().await;
        assert!(first.has_task());
        assert!(
            first
                .result_url
                .starts_with("http://ci.example/agent/result/")
        );
        assert_eq!(
            db.build(id).await.unwrap().unwrap().status,
            BuildStatus::Started
        );
        // With a zero timeout the next request takes the task back and hands it out anew.
        let second = take().await;
        assert!(second.has_task());
        assert_ne!(first.session, second.session);
        // Sessions outlive kiln-ci: after a restart the build is still the
        // agent's, and its session still answers.
        let restarted = Coordinator::new(db.clone(), coordinator.config().clone()).unwrap();
        restarted.recover().await.unwrap();
        assert_eq!(
            db.build(id).await.unwrap().unwrap().status,
            BuildStatus::Started
        );
        let after_restart = router(restarted, AgentsConfig::default());
        let (status, inputs) = call(
            &after_restart,
            "GET",
            &format!("/agent/inputs/{}", second.session),
            vec![],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(!inputs.is_empty());
        let path = |s: &TaskResponse| format!("/agent/result/{}", s.session);
        assert_eq!(
            call(&app, "POST", &path(&first), b"{}".to_vec()).await.0,
            StatusCode::NOT_FOUND
        );

        let drv = second.task.as_ref().unwrap().derivations[0].clone();
        let out = db.build(id).await.unwrap().unwrap().outputs["out"].clone();
        let result = |signer: &SecretKey| {
            serde_json::to_vec(&ResultRequest {
                session: second.session.clone(),
                challenge_signature: sign_challenge(signer, &second.session, &second.challenge),
                agent: "vm-agent".into(),
                result: ResultManifest {
                    status: ResultStatus::Success,
                    message: String::new(),
                    builds: vec![BuildOutcome {
                        drv: drv.clone(),
                        status: "Built".into(),
                        error: String::new(),
                        outputs: BTreeMap::from([(
                            "out".to_owned(),
                            OutputInfo {
                                path: out.clone(),
                                nar_hash: Hash::digest(HashAlgo::Sha256, b"other").to_string(),
                                nar_size: 4,
                                references: vec![],
                            },
                        )]),
                    }],
                    timings: BTreeMap::new(),
                },
            })
            .unwrap()
        };
        let (status, _) = call(&app, "POST", &path(&second), result(&stranger)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            db.build(id).await.unwrap().unwrap().status,
            BuildStatus::Scheduled
        );

        // Well signed, but the uploaded NAR is not what the manifest claims.
        let third = take().await;
        let name = out.rsplit('/').next().unwrap();
        let (status, _) = call(
            &app,
            "PUT",
            &format!("/agent/result/{}/nar/{name}", third.session),
            b"nope".to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let body = String::from_utf8(result(&key))
            .unwrap()
            .replace(&second.session, &third.session);
        let mut parsed: ResultRequest = serde_json::from_str(&body).unwrap();
        parsed.challenge_signature = sign_challenge(&key, &third.session, &third.challenge);
        let (status, body) = call(
            &app,
            "POST",
            &path(&third),
            serde_json::to_vec(&parsed).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(String::from_utf8_lossy(&body).contains("the manifest says"));
        let build = db.build(id).await.unwrap().unwrap();
        assert_eq!(build.status, BuildStatus::FailedOther);
        assert_eq!(build.machine.as_deref(), Some("vm-agent"));
        let agents = db.agents().await.unwrap();
        assert_eq!(agents[0].machines, ["vm-machine"]);
        assert!(agents[0].last_seen.is_some());
    }

    /// Agent builds fill the front of the queue (higher priority) yet the
    /// local dispatcher finds the local build behind them; with no agent
    /// around for the wait, they fail saying so, unless an agent holds a task.
    #[tokio::test(flavor = "multi_thread")]
    async fn agent_builds_neither_starve_local_ones_nor_wait_forever() {
        let tmp = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&tmp.path().join("ci.sqlite").to_string_lossy())
            .await
            .unwrap();
        let mut config = Config::new(tmp.path().join("state"));
        config.store_root = Some(tmp.path().join("store"));
        config.agent_features = BTreeSet::from(["vm".to_owned()]);
        config.max_jobs = 1;
        let spec = crate::model::Specification::new(
            "s",
            vec![crate::model::Input::branch("src", "/nowhere", "main")],
            vec!["true".into()],
        );
        db.put_specification(&spec).await.unwrap();
        let eval = db.create_evaluation("s").await.unwrap();
        let system = kiln_scheduler::settings::Settings::from_environment()
            .unwrap()
            .system;
        let new = |i: usize, features: &[&str]| crate::model::NewBuild {
            job: format!("job-{i}"),
            drv_path: format!("/nix/store/{i:0>32}-job-{i}.drv"),
            system: system.clone(),
            outputs: BTreeMap::from([("out".into(), format!("/nix/store/{i:0>32}-job-{i}"))]),
            required_features: features.iter().map(|f| f.to_string()).collect(),
        };
        let mut builds: Vec<_> = (0..70).map(|i| new(i, &["vm"])).collect();
        builds.push(new(70, &[]));
        let ids = db.insert_builds(eval, "s", 5, &builds, &[]).await.unwrap();
        db.promote_ready_builds().await.unwrap();

        let patient = Coordinator::new(db.clone(), config.clone()).unwrap();
        assert_eq!(patient.dispatch_once().await.unwrap(), 1);
        let local = db.build(ids[70]).await.unwrap().unwrap();
        assert_ne!(local.status, BuildStatus::Scheduled);
        assert_eq!(
            db.status_counts(Some(eval)).await.unwrap()[&BuildStatus::Scheduled],
            70
        );

        // No wait at all: only an agent holding a task keeps them waiting.
        config.agent_wait = Duration::ZERO;
        let impatient = Coordinator::new(db.clone(), config).unwrap();
        db.put_agent_session(&AgentSession {
            session: "held".into(),
            build_id: ids[0],
            agent: "a".into(),
            public_key: "a:AAAA".into(),
            challenge: "c".into(),
            dir: tmp.path().join("held").to_string_lossy().into_owned(),
            handed_out: now(),
        })
        .await
        .unwrap();
        impatient.dispatch_once().await.unwrap();
        assert_eq!(
            db.build(ids[1]).await.unwrap().unwrap().status,
            BuildStatus::Scheduled
        );
        db.remove_agent_session("held").await.unwrap();
        impatient.dispatch_once().await.unwrap();
        for &id in &ids[..70] {
            let build = db.build(id).await.unwrap().unwrap();
            assert_eq!(build.status, BuildStatus::FailedOther, "{build:?}");
            let error = build.error.unwrap_or_default();
            assert!(
                error.contains(
                    "no build-agent with feature 'vm' has connected since kiln-ci started at"
                ),
                "{error}"
            );
        }
    }
}
