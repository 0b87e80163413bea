//! The coordinator: runs evaluations, registers their jobs as builds (with
//! the dependencies between them from the `.drv` graph and GC roots on the
//! `.drv` closures), and dispatches ready builds to the embedded scheduler
//! (or a store daemon, [`crate::daemon_dispatch`]) in batches with
//! keep-going, recording what happens as it happens.
//!
//! Order of dispatch: priority, then fair share between specifications
//! (round robin), then age. Transient failures are retried with back-off
//! up to a limit; builds for a system no machine has fail at once, saying so.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_formats::store_path::StorePath;
use kiln_scheduler::events::{Event, EventSink};
use kiln_scheduler::goals::Wanted;
use kiln_scheduler::result::{BuildResult, BuildStatus as SchedulerStatus};
use kiln_scheduler::settings::Settings;
use kiln_store::Store as _;
use kiln_store::local::LocalStore;
use tokio::sync::{Notify, mpsc};

use crate::db::{Db, DbError, FeatureFilter, StatusChange};
use crate::eval::{self, EvalError, EvalLog, Job};
use crate::model::{Build, BuildStatus, EvaluationStatus, NewBuild, Specification, now};
use crate::web::{LiveLogSink, LiveLogs};

/// What went wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("no specification named '{0}'")]
    NoSuchSpecification(String),
    #[error("store: {0}")]
    Store(#[from] kiln_store::StoreError),
    #[error("job '{job}': '{drv}' is not a valid derivation in the store: {problem}")]
    BadDerivation {
        job: String,
        drv: String,
        problem: String,
    },
    #[error("settings: {0}")]
    Settings(String),
    #[error("{what} '{}': {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("background task failed: {0}")]
    Join(String),
}

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// How the coordinator works.
#[derive(Debug, Clone)]
pub struct Config {
    /// Cache of git inputs, evaluation logs and GC root links live here.
    pub state_dir: PathBuf,
    /// Root of the local store builds go to (a chroot store); `None` is `/`.
    pub store_root: Option<PathBuf>,
    /// `nix.conf` settings for the embedded scheduler (e.g. `sandbox`).
    pub settings: BTreeMap<String, String>,
    /// Builds running at once.
    pub max_jobs: usize,
    /// Builds handed to the scheduler in one batch at most.
    pub batch_size: usize,
    /// Systems this coordinator can build (empty: the scheduler's system
    /// and extra platforms).
    pub systems: Vec<String>,
    /// Lifetime of the GC roots of successful outputs.
    pub output_root_ttl: Duration,
    /// Attempts of a build that fails transiently before it counts as failed.
    pub max_attempts: i64,
    /// Back-off after the first transient failure; doubles each time.
    pub retry_backoff: Duration,
    /// On start, waiting builds older than this are canceled.
    pub cancel_older_than: Option<Duration>,
    /// URLs that get a `POST` of JSON on every build status change.
    pub webhooks: Vec<String>,
    /// Builds requiring one of these system features (e.g. `vm`) are left
    /// to build agents ([`crate::agents`]) instead of the embedded scheduler.
    pub agent_features: BTreeSet<String>,
    /// Socket of a store daemon (Kiln's `store-daemon` or `nix-daemon`)
    /// that builds the batches instead of the embedded scheduler
    /// ([`crate::daemon_dispatch`]).
    pub store_daemon: Option<PathBuf>,
    /// How long agent builds wait with no build agent connected (none
    /// holding a task, none seen) before they fail, saying so.
    pub agent_wait: Duration,
}

impl Config {
    pub fn new(state_dir: impl Into<PathBuf>) -> Config {
        Config {
            state_dir: state_dir.into(),
            store_root: None,
            settings: BTreeMap::new(),
            max_jobs: 4,
            batch_size: 64,
            systems: Vec::new(),
            output_root_ttl: Duration::from_secs(30 * 24 * 3600),
            max_attempts: 3,
            retry_backoff: Duration::from_secs(10),
            cancel_older_than: None,
            webhooks: Vec::new(),
            agent_features: BTreeSet::new(),
            store_daemon: None,
            agent_wait: Duration::from_secs(600),
        }
    }
}

/// The CI's engine; cheap to clone.
#[derive(Debug, Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Db,
    store: Arc<LocalStore>,
    config: Config,
    settings: Settings,
    systems: BTreeSet<String>,
    wake: Notify,
    running: AtomicUsize,
    /// Logs of running builds, for the web interface's live tail.
    live: LiveLogs,
    /// Unix seconds when this coordinator was made: agents cannot have
    /// connected while it was not running.
    started_at: i64,
    /// Specifications triggered while one of their evaluations ran: each is
    /// evaluated once more when it ends, however many triggers came (as
    /// Hydra's trigger time). Kept in memory: a restart aborts the running
    /// evaluation, and the timer evaluates again.
    pending_triggers: Mutex<BTreeSet<String>>,
}

/// What a trigger did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggered {
    /// This evaluation started.
    Started(i64),
    /// Another evaluation follows this running one.
    Queued { behind: i64 },
}

/// One status change, as sent to webhooks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusEvent {
    pub build: i64,
    pub evaluation: i64,
    pub specification: String,
    pub job: String,
    pub drv_path: String,
    pub status: BuildStatus,
    pub timestamp: i64,
}

impl Coordinator {
    /// Opens the store and prepares the coordinator over `db`.
    pub fn new(db: Db, config: Config) -> Result<Coordinator> {
        let store = match &config.store_root {
            Some(root) => LocalStore::open_root(root)?,
            None => LocalStore::open_root("/")?,
        };
        let mut settings =
            Settings::from_environment().map_err(|e| CoordinatorError::Settings(e.to_string()))?;
        for (name, value) in &config.settings {
            settings
                .set(name, value)
                .map_err(|e| CoordinatorError::Settings(e.to_string()))?;
        }
        settings.keep_going = true;
        let systems: BTreeSet<String> = if config.systems.is_empty() {
            std::iter::once(settings.system.clone())
                .chain(settings.extra_platforms.iter().cloned())
                .collect()
        } else {
            config.systems.iter().cloned().collect()
        };
        Ok(Coordinator {
            inner: Arc::new(Inner {
                db,
                store: Arc::new(store),
                settings,
                systems,
                config,
                wake: Notify::new(),
                running: AtomicUsize::new(0),
                live: LiveLogs::default(),
                started_at: now(),
                pending_triggers: Mutex::default(),
            }),
        })
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn store(&self) -> &Arc<LocalStore> {
        &self.inner.store
    }

    /// The logs of running builds as they come (give them to the web state).
    pub fn live_logs(&self) -> &LiveLogs {
        &self.inner.live
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Wakes the dispatch loop (after new builds or a restart).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Builds running now.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Relaxed)
    }

    fn log_dir(&self) -> PathBuf {
        self.inner.config.state_dir.join("logs")
    }

    fn roots_dir(&self, kind: &str) -> PathBuf {
        self.inner.config.state_dir.join("roots").join(kind)
    }

    /// Recovers from a crash: evaluations left started are aborted, builds
    /// left started are scheduled again (outputs that were finished meanwhile
    /// are then found valid and not built twice), old builds are canceled.
    pub async fn recover(&self) -> Result<()> {
        let db = &self.inner.db;
        db.abort_started_evaluations().await?;
        let requeued = db.requeue_started_builds().await?;
        if !requeued.is_empty() {
            tracing::info!(count = requeued.len(), "resuming builds left started");
        }
        if let Some(age) = self.inner.config.cancel_older_than {
            let canceled = db
                .cancel_builds_older_than(now() - age.as_secs() as i64)
                .await?;
            if canceled > 0 {
                tracing::info!(canceled, "canceled builds older than the configured age");
            }
        }
        Ok(())
    }

    /// When this coordinator was made (unix seconds).
    pub fn started_at(&self) -> i64 {
        self.inner.started_at
    }

    /// Runs an evaluation of `spec` to the registration of its builds.
    /// Returns the evaluation's id (also when it failed: the failure is
    /// recorded in it, with its log). While another evaluation of `spec`
    /// runs, fails with [`DbError::EvaluationRunning`].
    pub async fn evaluate(&self, spec_name: &str) -> Result<i64> {
        let (id, spec) = self.begin_evaluation(spec_name).await?;
        let result = self.run_evaluation(id, spec).await;
        self.start_pending_trigger(spec_name);
        result.map(|()| id)
    }

    /// Starts an evaluation of `spec` in the background (as the API's
    /// trigger does). While one runs, queues another for when it ends.
    pub async fn trigger_evaluation(&self, spec_name: &str) -> Result<Triggered> {
        let (id, spec) = match self.begin_evaluation(spec_name).await {
            Ok(started) => started,
            Err(CoordinatorError::Db(DbError::EvaluationRunning { running, .. })) => {
                self.lock_pending().insert(spec_name.to_owned());
                // It may have ended between the refusal and the insert.
                if self.inner.db.running_evaluation(spec_name).await?.is_none() {
                    self.start_pending_trigger(spec_name);
                }
                return Ok(Triggered::Queued { behind: running });
            }
            Err(e) => return Err(e),
        };
        let this = self.clone();
        let name = spec_name.to_owned();
        tokio::spawn(async move {
            if let Err(e) = this.run_evaluation(id, spec).await {
                tracing::error!(evaluation = id, error = %e, "evaluation failed");
                let _ = this
                    .inner
                    .db
                    .finish_evaluation(id, EvaluationStatus::Failed, Some(&e.to_string()))
                    .await;
            }
            this.start_pending_trigger(&name);
        });
        Ok(Triggered::Started(id))
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.inner
            .pending_triggers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the queued evaluations whose specification no longer
    /// evaluates: the running one may have been another process's (the
    /// `kiln-ci eval` command), whose end this one does not see.
    pub async fn start_pending_triggers(&self) -> Result<()> {
        let pending: Vec<String> = self.lock_pending().iter().cloned().collect();
        for name in pending {
            if self.inner.db.running_evaluation(&name).await?.is_none() {
                self.start_pending_trigger(&name);
            }
        }
        Ok(())
    }

    /// Starts the evaluation a trigger queued for `spec`, if one did.
    fn start_pending_trigger(&self, spec_name: &str) {
        if !self.lock_pending().remove(spec_name) {
            return;
        }
        let this = self.clone();
        let name = spec_name.to_owned();
        // Boxed: the trigger's task may end by starting another trigger.
        let next: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            match this.trigger_evaluation(&name).await {
                Ok(triggered) => tracing::info!(spec = %name, ?triggered, "queued evaluation"),
                Err(e) => tracing::error!(spec = %name, error = %e, "queued evaluation failed"),
            }
        });
        tokio::spawn(next);
    }

    async fn begin_evaluation(&self, spec_name: &str) -> Result<(i64, Specification)> {
        let spec = self
            .inner
            .db
            .specification(spec_name)
            .await?
            .ok_or_else(|| CoordinatorError::NoSuchSpecification(spec_name.to_owned()))?;
        let id = self.inner.db.create_evaluation(spec_name).await?;
        Ok((id, spec))
    }

    async fn run_evaluation(&self, id: i64, spec: Specification) -> Result<()> {
        let db = &self.inner.db;
        let log_path = self
            .log_dir()
            .join("evaluations")
            .join(format!("{id}.log.zst"));
        let log = EvalLog::create(&log_path)?;
        db.set_evaluation_checkouts(id, &[], Some(&log_path.to_string_lossy()))
            .await?;
        let cache = self.inner.config.state_dir.join("inputs");
        let store_root = self
            .inner
            .config
            .store_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/"));
        let extra_env = vec![(
            "KILN_CI_STORE".to_owned(),
            store_root.to_string_lossy().into_owned(),
        )];
        let spec_for_eval = spec.clone();
        let eval_log = log.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let checkouts = eval::fetch_inputs(&cache, &spec_for_eval.inputs, &eval_log)?;
            let output = eval::run_evaluator(&spec_for_eval, &checkouts, &extra_env, &eval_log)?;
            Ok::<_, EvalError>((checkouts, output))
        })
        .await
        .map_err(|e| CoordinatorError::Join(e.to_string()))?;
        let (checkouts, output) = match outcome {
            Ok(done) => done,
            Err(error) => {
                log.line(&format!("evaluation failed: {error}"));
                log.finish()?;
                db.finish_evaluation(id, EvaluationStatus::Failed, Some(&error.to_string()))
                    .await?;
                return Ok(());
            }
        };
        let checkouts: Vec<_> = checkouts.into_iter().map(|(c, _)| c).collect();
        db.set_evaluation_checkouts(id, &checkouts, Some(&log_path.to_string_lossy()))
            .await?;
        db.add_evaluation_errors(id, &output.errors).await?;
        let jobs: Vec<Job> = output
            .jobs
            .into_iter()
            .filter(|job| spec.build_targets.wants(&job.attr))
            .filter(|job| spec.systems.is_empty() || spec.systems.contains(&job.system))
            .collect();
        match self
            .register(id, &spec.name, i64::from(spec.priority), jobs)
            .await
        {
            Ok(count) => {
                log.line(&format!("registered {count} builds"));
                log.finish()?;
                db.finish_evaluation(id, EvaluationStatus::Succeeded, None)
                    .await?;
            }
            Err(error) => {
                log.line(&format!("registering the jobs failed: {error}"));
                log.finish()?;
                db.finish_evaluation(id, EvaluationStatus::Failed, Some(&error.to_string()))
                    .await?;
            }
        }
        self.wake();
        Ok(())
    }

    /// Registers jobs as builds of evaluation `id`: dependencies from the
    /// `.drv` graph, GC roots on each `.drv` (and so its closure), builds
    /// whose outputs are all valid already marked succeeded.
    pub async fn register(
        &self,
        evaluation_id: i64,
        spec: &str,
        priority: i64,
        jobs: Vec<Job>,
    ) -> Result<usize> {
        let store = self.inner.store.clone();
        let roots = self.roots_dir("drvs");
        let planned = tokio::task::spawn_blocking(move || plan_builds(&store, &roots, jobs))
            .await
            .map_err(|e| CoordinatorError::Join(e.to_string()))??;
        let ids = self
            .inner
            .db
            .insert_builds(
                evaluation_id,
                spec,
                priority,
                &planned.builds,
                &planned.dependencies,
            )
            .await?;
        // Roots were made under temporary names (ids were unknown); name
        // them after the builds so that their end can remove them.
        let roots = self.roots_dir("drvs");
        let valid: Vec<i64> = planned.already_valid.iter().map(|&i| ids[i]).collect();
        let renames: Vec<(PathBuf, PathBuf)> = planned
            .root_links
            .iter()
            .zip(&ids)
            .map(|(link, id)| (link.clone(), roots.join(id.to_string())))
            .collect();
        tokio::task::spawn_blocking(move || {
            for (from, to) in renames {
                let _ = std::fs::rename(&from, &to);
            }
        })
        .await
        .map_err(|e| CoordinatorError::Join(e.to_string()))?;
        // Before anything promotes the new builds to scheduled.
        let cached = self.inner.db.fail_cached_failures(evaluation_id).await?;
        if !cached.is_empty() {
            tracing::info!(
                count = cached.len(),
                "builds failed earlier: not built again"
            );
            self.builds_ended(&cached, BuildStatus::Failed).await?;
        }
        if !valid.is_empty() {
            self.finish_builds(
                &valid,
                BuildStatus::Succeeded,
                StatusChange {
                    error: Some("already valid".into()),
                    ..StatusChange::default()
                },
            )
            .await?;
        }
        self.inner.db.promote_ready_builds().await?;
        Ok(ids.len())
    }

    /// Restarts builds (and their failed dependents) in dependency order.
    pub async fn restart(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let restarted = self.inner.db.restart_builds(ids).await?;
        for &id in &restarted {
            if let Some(build) = self.inner.db.build(id).await? {
                self.add_drv_root(&build).await?;
            }
        }
        self.inner.db.promote_ready_builds().await?;
        self.wake();
        Ok(restarted)
    }

    async fn add_drv_root(&self, build: &Build) -> Result<()> {
        let store = self.inner.store.clone();
        let link = self.roots_dir("drvs").join(build.id.to_string());
        let drv = build.drv_path.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let path = store.store_dir().parse_path(&drv).map_err(|e| {
                CoordinatorError::BadDerivation {
                    job: String::new(),
                    drv: drv.clone(),
                    problem: e.to_string(),
                }
            })?;
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent).map_err(|source| CoordinatorError::Io {
                    what: "create roots directory",
                    path: parent.to_owned(),
                    source,
                })?;
            }
            store.add_perm_root(&path, &link)?;
            Ok(())
        })
        .await
        .map_err(|e| CoordinatorError::Join(e.to_string()))?
    }

    /// Ends builds with `status`: time stamps, failure propagation, GC
    /// roots (the `.drv` root goes; successful outputs get a root with a TTL),
    /// webhooks.
    pub(crate) async fn finish_builds(
        &self,
        ids: &[i64],
        status: BuildStatus,
        change: StatusChange,
    ) -> Result<()> {
        self.inner
            .db
            .set_build_statuses(ids, status, &change)
            .await?;
        self.builds_ended(ids, status).await
    }

    /// What follows the end of builds whose status is set already.
    async fn builds_ended(&self, ids: &[i64], status: BuildStatus) -> Result<()> {
        let db = &self.inner.db;
        let mut ended: Vec<i64> = ids.to_vec();
        if status.is_failure() {
            ended.extend(db.propagate_failures().await?);
        } else {
            db.promote_ready_builds().await?;
        }
        // Webhooks hear of the builds that failed with these, too.
        let notified = ended.clone();
        let mut output_roots = Vec::new();
        if status == BuildStatus::Succeeded {
            let expires = now() + self.inner.config.output_root_ttl.as_secs() as i64;
            for &id in ids {
                if let Some(build) = db.build(id).await? {
                    for (name, path) in &build.outputs {
                        let link = self.roots_dir("outputs").join(format!("{id}-{name}"));
                        db.put_output_root(&link.to_string_lossy(), id, expires)
                            .await?;
                        output_roots.push((path.clone(), link));
                    }
                }
            }
        }
        let store = self.inner.store.clone();
        let drv_roots = self.roots_dir("drvs");
        tokio::task::spawn_blocking(move || {
            for id in ended {
                let _ = std::fs::remove_file(drv_roots.join(id.to_string()));
            }
            for (path, link) in output_roots {
                if let Ok(path) = store.store_dir().parse_path(&path) {
                    if let Some(parent) = link.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    if let Err(e) = store.add_perm_root(&path, &link) {
                        tracing::warn!(error = %e, "cannot add an output root");
                    }
                }
            }
        })
        .await
        .map_err(|e| CoordinatorError::Join(e.to_string()))?;
        db.close_finished_evaluations().await?;
        if !self.inner.config.webhooks.is_empty() {
            self.notify(&notified).await;
        }
        Ok(())
    }

    async fn notify(&self, ids: &[i64]) {
        let mut events = Vec::new();
        for &id in ids {
            if let Ok(Some(build)) = self.inner.db.build(id).await {
                events.push(StatusEvent {
                    build: build.id,
                    evaluation: build.evaluation_id,
                    specification: build.specification,
                    job: build.job,
                    drv_path: build.drv_path,
                    status: build.status,
                    timestamp: now(),
                });
            }
        }
        let hooks = self.inner.config.webhooks.clone();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            for event in &events {
                for hook in &hooks {
                    if let Err(e) = agent
                        .post(hook)
                        .header("content-type", "application/json")
                        .send(serde_json::to_vec(event).unwrap_or_default())
                    {
                        tracing::warn!(hook, error = %e, "webhook failed");
                    }
                }
            }
        });
    }

    /// Removes output roots whose time is up. Returns how many.
    pub async fn prune_output_roots(&self) -> Result<usize> {
        let expired = self.inner.db.expired_output_roots(now()).await?;
        for link in &expired {
            let _ = std::fs::remove_file(link);
            self.inner.db.remove_output_root(link).await?;
        }
        Ok(expired.len())
    }

    /// Dispatches builds until `stop` is notified: whenever slots are free,
    /// the next ready builds go to the scheduler in a batch.
    pub async fn run(&self, stop: Arc<Notify>) -> Result<()> {
        let mut last_prune = 0;
        loop {
            self.dispatch_once().await?;
            if now() - last_prune > 3600 {
                self.prune_output_roots().await?;
                last_prune = now();
            }
            tokio::select! {
                _ = stop.notified() => return Ok(()),
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Runs until no build of the database is waiting or running (for
    /// tests and one-shot use).
    pub async fn run_until_idle(&self) -> Result<()> {
        loop {
            self.dispatch_once().await?;
            let counts = self.inner.db.status_counts(None).await?;
            let waiting: i64 = [BuildStatus::Submitted, BuildStatus::Scheduled]
                .iter()
                .filter_map(|s| counts.get(s))
                .sum();
            if self.running() == 0 && waiting == 0 {
                return Ok(());
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Starts as many ready builds as there are free slots. Returns how many
    /// were started.
    pub async fn dispatch_once(&self) -> Result<usize> {
        let db = &self.inner.db;
        db.promote_ready_builds().await?;
        // A derivation two evaluations wanted may have failed for the other.
        let cached = db.fail_scheduled_cached_failures().await?;
        if !cached.is_empty() {
            self.builds_ended(&cached, BuildStatus::Failed).await?;
        }
        let free = self.inner.config.max_jobs.saturating_sub(self.running());
        if free == 0 {
            return Ok(0);
        }
        let agent_features = &self.inner.config.agent_features;
        if !agent_features.is_empty() {
            crate::agents::fail_builds_without_agents(self).await?;
        }
        let candidates = db
            .dispatchable_builds(
                (free * 4).max(64) as i64,
                FeatureFilter::Without(agent_features),
            )
            .await?;
        let mut buildable = Vec::with_capacity(candidates.len());
        for build in candidates {
            match self.unbuildable_reason(&build) {
                None => buildable.push(build),
                Some(reason) => {
                    self.finish_builds(
                        &[build.id],
                        BuildStatus::FailedOther,
                        StatusChange {
                            error: Some(reason),
                            ..StatusChange::default()
                        },
                    )
                    .await?
                }
            }
        }
        let chosen = fair_share(buildable, free);
        if chosen.is_empty() {
            return Ok(0);
        }
        let started = chosen.len();
        for batch in chosen.chunks(self.inner.config.batch_size.max(1)) {
            self.start_batch(batch.to_vec()).await?;
        }
        Ok(started)
    }

    /// Why no machine can take `build`, if none can: its system, or a
    /// required feature (`kvm`, `big-parallel`, …) no machine has.
    fn unbuildable_reason(&self, build: &Build) -> Option<String> {
        let list = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(", ");
        if !self.inner.systems.contains(&build.system) {
            return Some(format!(
                "no machine can build system '{}' (this coordinator builds: {})",
                build.system,
                list(&self.inner.systems)
            ));
        }
        let features = &self.inner.settings.system_features;
        let missing: Vec<&String> = build
            .required_features
            .iter()
            .filter(|f| !features.contains(*f))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "no machine has the required system features {missing:?} for system '{}' (this coordinator has: {})",
                build.system,
                list(features)
            )
        })
    }

    async fn start_batch(&self, batch: Vec<Build>) -> Result<()> {
        let ids: Vec<i64> = batch.iter().map(|b| b.id).collect();
        let log_dir = kiln_scheduler::logs::log_dir_for_state_dir(self.inner.store.state_dir());
        let daemon = self.inner.config.store_daemon.clone();
        let machine = match &daemon {
            Some(socket) => crate::daemon_dispatch::machine_name(socket),
            None => "local".into(),
        };
        self.inner
            .db
            .set_build_statuses(
                &ids,
                BuildStatus::Started,
                &StatusChange {
                    machine: Some(machine),
                    ..StatusChange::default()
                },
            )
            .await?;
        self.inner.running.fetch_add(batch.len(), Ordering::SeqCst);
        let mut targets = Vec::new();
        let mut by_drv: HashMap<String, Vec<Build>> = HashMap::new();
        for build in batch {
            match self.inner.store.store_dir().parse_path(&build.drv_path) {
                Ok(path) => {
                    if !by_drv.contains_key(&build.drv_path) {
                        targets.push((path, Wanted::All));
                    }
                    by_drv
                        .entry(build.drv_path.clone())
                        .or_default()
                        .push(build);
                }
                Err(e) => {
                    self.inner.running.fetch_sub(1, Ordering::SeqCst);
                    self.finish_builds(
                        &[build.id],
                        BuildStatus::FailedOther,
                        StatusChange {
                            error: Some(format!("not a store path: {e}")),
                            ..StatusChange::default()
                        },
                    )
                    .await?;
                }
            }
        }
        if let Some(socket) = daemon {
            tokio::spawn(crate::daemon_dispatch::run_batch(
                self.clone(),
                socket,
                by_drv,
            ));
            return Ok(());
        }
        let (sender, mut receiver) = mpsc::unbounded_channel::<(String, BuildResult)>();
        let live = LiveLogSink::new(
            self.inner.live.clone(),
            self.inner.store.store_dir().clone(),
            by_drv
                .iter()
                .flat_map(|(drv, builds)| builds.iter().map(|b| (drv.clone(), b.id))),
        );
        let sink = Arc::new(FinishedSink {
            sender,
            store_dir: self.inner.store.store_dir().clone(),
            wanted: by_drv.keys().cloned().collect(),
            live,
        });
        let this = self.clone();
        let store = self.inner.store.clone();
        let mut settings = self.inner.settings.clone();
        settings.max_jobs = targets.len().max(1);
        tokio::spawn(async move {
            let run = tokio::spawn(kiln_scheduler::build(store, settings, targets, sink));
            let mut by_drv = by_drv;
            while let Some((drv, result)) = receiver.recv().await {
                if let Some(builds) = by_drv.remove(&drv) {
                    this.record_result(&builds, &result, &log_dir).await;
                }
            }
            let report = run.await;
            // Whatever the events did not cover (an error of the whole run).
            for (drv, builds) in by_drv {
                let result = match &report {
                    Ok(Ok(report)) => report
                        .results
                        .iter()
                        .find(|(path, _)| this.inner.store.store_dir().print_path(path) == drv)
                        .map(|(_, r)| r.clone()),
                    _ => None,
                };
                let result = result.unwrap_or_else(|| {
                    BuildResult::failure(
                        SchedulerStatus::MiscFailure,
                        match &report {
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                            Ok(Ok(_)) => "the scheduler reported nothing for it".into(),
                        },
                    )
                });
                this.record_result(&builds, &result, &log_dir).await;
            }
            this.wake();
        });
        Ok(())
    }

    /// Puts builds back for another attempt after the back-off, whatever
    /// their attempts so far: their builder (a store daemon) could not be
    /// reached or its connection broke, which says nothing of the builds.
    pub(crate) async fn retry_later(&self, builds: &[Build], why: &str) {
        let _slots = ReleaseSlots(&self.inner.running, builds.len());
        let at = now() + self.inner.config.retry_backoff.as_secs() as i64;
        for build in builds {
            if let Err(e) = self.inner.db.schedule_retry(build.id, at, why).await {
                tracing::error!(build = build.id, error = %e, "cannot schedule a retry");
            }
        }
    }

    /// Records a batch's result for the builds of one derivation: the
    /// status it maps to, a retry for a transient failure, the log found
    /// under `log_dir` (the layout of the store's build logs).
    pub(crate) async fn record_result(
        &self,
        builds: &[Build],
        result: &BuildResult,
        log_dir: &Path,
    ) {
        let _slots = ReleaseSlots(&self.inner.running, builds.len());
        let status = match result.status {
            SchedulerStatus::Built
            | SchedulerStatus::Substituted
            | SchedulerStatus::AlreadyValid
            | SchedulerStatus::ResolvesToAlreadyValid => BuildStatus::Succeeded,
            SchedulerStatus::TimedOut => BuildStatus::TimedOut,
            SchedulerStatus::LogLimitExceeded => BuildStatus::LogLimit,
            SchedulerStatus::DependencyFailed => BuildStatus::FailedDependency,
            SchedulerStatus::MiscFailure | SchedulerStatus::NoSubstituters => {
                BuildStatus::FailedOther
            }
            SchedulerStatus::TransientFailure => BuildStatus::Failed,
            _ => BuildStatus::Failed,
        };
        let mut to_finish = Vec::new();
        for build in builds {
            if result.status == SchedulerStatus::TransientFailure
                && build.attempts + 1 < self.inner.config.max_attempts
            {
                let backoff = self.inner.config.retry_backoff.as_secs() as i64
                    * (1 << build.attempts.clamp(0, 16));
                if let Err(e) = self
                    .inner
                    .db
                    .schedule_retry(build.id, now() + backoff, &result.error)
                    .await
                {
                    tracing::error!(error = %e, "cannot schedule a retry");
                }
                continue;
            }
            to_finish.push(build.id);
        }
        if to_finish.is_empty() {
            return;
        }
        let log_path = builds.first().and_then(|b| {
            let drv = self.inner.store.store_dir().parse_path(&b.drv_path).ok()?;
            let path = kiln_scheduler::logs::log_path(log_dir, &drv);
            path.exists().then(|| path.to_string_lossy().into_owned())
        });
        let change = StatusChange {
            machine: None,
            log_path,
            error: (!result.error.is_empty()).then(|| result.error.clone()),
        };
        // Remembered before the status is set, so that whoever sees the
        // failure also finds it cached.
        if is_cacheable_failure(result.status)
            && let Err(e) = self.inner.db.remember_failures(&to_finish).await
        {
            tracing::error!(error = %e, "cannot remember failed derivations");
        }
        if let Err(e) = self.finish_builds(&to_finish, status, change).await {
            tracing::error!(error = %e, "cannot record build results");
        }
    }
}

/// Whether a failure is the derivation's own, so that building it again
/// would fail again (Hydra's "cached failure"): the builder failed, or its
/// inputs or outputs were rejected, or it is not deterministic. Timeouts,
/// log limits, transient failures (a fixed-output fetch, a lost remote
/// machine) and failures of other kinds depend on the machine, the limits
/// or the network, and are built again in later evaluations, as in Hydra.
pub fn is_cacheable_failure(status: SchedulerStatus) -> bool {
    CACHEABLE_FAILURES.contains(&status)
}

/// The scheduler's statuses [`is_cacheable_failure`] accepts.
pub const CACHEABLE_FAILURES: [SchedulerStatus; 4] = [
    SchedulerStatus::PermanentFailure,
    SchedulerStatus::InputRejected,
    SchedulerStatus::OutputRejected,
    SchedulerStatus::NotDeterministic,
];

/// Gives back build slots when dropped: only once a build's outcome is in
/// the database, so that no one sees a build neither running nor waiting
/// (`run_until_idle` would stop early).
struct ReleaseSlots<'a>(&'a AtomicUsize, usize);

impl Drop for ReleaseSlots<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

/// Forwards the scheduler's `Finished` events of the batch's targets, and
/// its log lines to the live logs.
struct FinishedSink {
    sender: mpsc::UnboundedSender<(String, BuildResult)>,
    store_dir: kiln_formats::store_path::StoreDir,
    wanted: BTreeSet<String>,
    live: LiveLogSink,
}

impl EventSink for FinishedSink {
    fn event(&self, event: Event<'_>) {
        self.live.event(event.clone());
        if let Event::Finished { drv, result, .. } = event {
            let drv = self.store_dir.print_path(drv);
            if self.wanted.contains(&drv) {
                let _ = self.sender.send((drv, result.clone()));
            }
        }
    }
}

/// Picks at most `slots` builds: by priority, then round robin between
/// specifications (oldest first within each).
pub fn fair_share(candidates: Vec<Build>, slots: usize) -> Vec<Build> {
    let mut by_priority: BTreeMap<std::cmp::Reverse<i64>, BTreeMap<String, Vec<Build>>> =
        BTreeMap::new();
    for build in candidates {
        by_priority
            .entry(std::cmp::Reverse(build.priority))
            .or_default()
            .entry(build.specification.clone())
            .or_default()
            .push(build);
    }
    let mut chosen = Vec::new();
    for (_, mut specs) in by_priority {
        for builds in specs.values_mut() {
            builds.sort_by_key(|b| std::cmp::Reverse(b.id));
        }
        while chosen.len() < slots && specs.values().any(|b| !b.is_empty()) {
            for builds in specs.values_mut() {
                if chosen.len() == slots {
                    break;
                }
                if let Some(build) = builds.pop() {
                    chosen.push(build);
                }
            }
        }
    }
    chosen
}

/// Jobs turned into builds to insert.
struct Planned {
    builds: Vec<NewBuild>,
    /// `(dependent, dependency)` indexes into `builds`.
    dependencies: Vec<(usize, usize)>,
    /// Builds whose outputs are all valid already.
    already_valid: Vec<usize>,
    /// The GC root made for each build's `.drv`, by index.
    root_links: Vec<PathBuf>,
}

/// Reads each job's `.drv` (rooting it first, so that a collection cannot
/// take it before its build), and finds the dependencies between jobs
/// through the `.drv` graph, also through derivations that are not jobs.
fn plan_builds(store: &LocalStore, roots: &Path, jobs: Vec<Job>) -> Result<Planned> {
    std::fs::create_dir_all(roots).map_err(|source| CoordinatorError::Io {
        what: "create roots directory",
        path: roots.to_owned(),
        source,
    })?;
    let store_dir = store.store_dir().clone();
    let bad = |job: &Job, problem: String| CoordinatorError::BadDerivation {
        job: job.attr.clone(),
        drv: job.drv_path.clone(),
        problem,
    };
    let mut planned = Planned {
        builds: Vec::new(),
        dependencies: Vec::new(),
        already_valid: Vec::new(),
        root_links: Vec::new(),
    };
    let mut job_of_drv: HashMap<StorePath, Vec<usize>> = HashMap::new();
    let mut drv_paths = Vec::new();
    let nonce = format!("{}-{}", std::process::id(), now());
    for (index, job) in jobs.iter().enumerate() {
        let path = store_dir
            .parse_path(&job.drv_path)
            .map_err(|e| bad(job, e.to_string()))?;
        let link = roots.join(format!(".new-{nonce}-{index}"));
        store.add_perm_root(&path, &link)?;
        planned.root_links.push(link);
        let text = std::fs::read(store.real_path(&path)).map_err(|e| bad(job, e.to_string()))?;
        let drv = kiln_derivation::aterm::parse(&store_dir, &text)
            .map_err(|e| bad(job, e.to_string()))?;
        let features: Vec<String> = drv
            .env
            .get(&b"requiredSystemFeatures"[..])
            .map(|v| {
                String::from_utf8_lossy(v)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let mut outputs: BTreeMap<String, String> = drv
            .output_paths()
            .map(|(name, p)| (name.to_owned(), store_dir.print_path(p)))
            .collect();
        if outputs.is_empty() {
            outputs = job.outputs.clone();
        }
        let all_valid = !outputs.is_empty()
            && outputs.values().all(|p| {
                store_dir
                    .parse_path(p)
                    .ok()
                    .is_some_and(|p| store.is_valid_path(&p).unwrap_or(false))
            });
        if all_valid {
            planned.already_valid.push(index);
        }
        planned.builds.push(NewBuild {
            job: job.attr.clone(),
            drv_path: job.drv_path.clone(),
            system: if job.system.is_empty() {
                String::from_utf8_lossy(&drv.system).into_owned()
            } else {
                job.system.clone()
            },
            outputs,
            required_features: features,
        });
        job_of_drv.entry(path.clone()).or_default().push(index);
        drv_paths.push(path);
    }
    // For each derivation, the jobs it reaches first through its inputs.
    let mut reach: HashMap<StorePath, BTreeSet<usize>> = HashMap::new();
    fn reached(
        store: &LocalStore,
        drv: &StorePath,
        job_of_drv: &HashMap<StorePath, Vec<usize>>,
        memo: &mut HashMap<StorePath, BTreeSet<usize>>,
    ) -> BTreeSet<usize> {
        if let Some(known) = memo.get(drv) {
            return known.clone();
        }
        let mut found = BTreeSet::new();
        let inputs = std::fs::read(store.real_path(drv))
            .ok()
            .and_then(|text| kiln_derivation::aterm::parse(store.store_dir(), &text).ok())
            .map(|d| d.input_derivations.into_keys().collect::<Vec<_>>())
            .unwrap_or_default();
        for input in inputs {
            match job_of_drv.get(&input) {
                Some(jobs) => found.extend(jobs.iter().copied()),
                None => found.extend(reached(store, &input, job_of_drv, memo)),
            }
        }
        memo.insert(drv.clone(), found.clone());
        found
    }
    for (index, drv) in drv_paths.iter().enumerate() {
        for dependency in reached(store, drv, &job_of_drv, &mut reach) {
            if dependency != index {
                planned.dependencies.push((index, dependency));
            }
        }
    }
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(id: i64, spec: &str, priority: i64) -> Build {
        Build {
            id,
            evaluation_id: 1,
            specification: spec.into(),
            job: format!("j{id}"),
            drv_path: String::new(),
            system: "x86_64-linux".into(),
            outputs: BTreeMap::new(),
            status: BuildStatus::Scheduled,
            priority,
            required_features: vec![],
            created_at: 0,
            started_at: None,
            stopped_at: None,
            machine: None,
            log_path: None,
            attempts: 0,
            retry_after: None,
            error: None,
            cached_failure_of: None,
        }
    }

    #[test]
    fn priority_then_fair_share_then_age() {
        let candidates = vec![
            build(1, "big", 1),
            build(2, "big", 1),
            build(3, "big", 1),
            build(4, "small", 1),
            build(5, "urgent", 9),
        ];
        let ids: Vec<i64> = fair_share(candidates, 4).iter().map(|b| b.id).collect();
        assert_eq!(ids, [5, 1, 4, 2]);
    }
}
