//! The CI's database: SQLite (one file, the default) or PostgreSQL (a
//! connection URL), through one code path (sqlx's `Any` driver) and the same
//! migrations. Every query the coordinator and the web pages need is a typed
//! method of [`Db`]; no SQL leaves this module.
//!
//! Queries use `$1`-style parameters, which both SQLite and PostgreSQL accept,
//! and only portable SQL. The one dialect difference, the auto-increment key,
//! is substituted into the migration text ([`Dialect::id_column`]).

use std::collections::{BTreeMap, BTreeSet};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row as _};

use crate::model::{
    Agent, AgentSession, Build, BuildStatus, BuildTargets, Checkout, Evaluation, EvaluationError,
    EvaluationStatus, Input, NewBuild, Specification, StatusCounts, now,
};

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the database '{url}': {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error(
        "database URL '{0}' is neither a SQLite file (a path or sqlite://PATH) nor postgres://…"
    )]
    UnsupportedUrl(String),
    #[error("migration {version} ({name}) failed: {source}")]
    Migrate {
        version: i64,
        name: &'static str,
        source: sqlx::Error,
    },
    #[error("database query '{what}' failed: {source}")]
    Query {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error("the database holds a {what} that cannot be read: '{value}' ({problem})")]
    Corrupt {
        what: &'static str,
        value: String,
        problem: String,
    },
    #[error("no specification named '{0}'")]
    NoSuchSpecification(String),
    #[error(
        "specification '{spec}' is being evaluated already (evaluation {running}); try again when it has ended"
    )]
    EvaluationRunning { spec: String, running: i64 },
}

type Result<T, E = DbError> = std::result::Result<T, E>;

fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError::Query { what, source }
}

/// The two database engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The auto-increment primary key column type.
    fn id_column(self) -> &'static str {
        match self {
            Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Dialect::Postgres => "BIGSERIAL PRIMARY KEY",
        }
    }
}

/// The migrations, in order. Never edit one that has shipped: add another.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (
        2,
        "auth, cached failures, agent sessions",
        include_str!("migrations/0002_auth_cache_agents.sql"),
    ),
];

/// Filters for [`Db::list_builds`].
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub specification: Option<String>,
    pub evaluation_id: Option<i64>,
    pub status: Option<BuildStatus>,
    pub job: Option<String>,
    /// At most this many (newest first); 0 means no limit.
    pub limit: i64,
    pub offset: i64,
}

/// Which builds [`Db::dispatchable_builds`] returns, by the system
/// features they require (space-separated in `required_features`).
#[derive(Debug, Clone, Copy)]
pub enum FeatureFilter<'a> {
    /// All builds.
    Any,
    /// Builds requiring none of these (the local dispatcher's, without agents' builds).
    Without(&'a BTreeSet<String>),
    /// Builds requiring at least one of these (the agents' builds).
    With(&'a BTreeSet<String>),
}

/// What else changes with a build's status.
#[derive(Debug, Clone, Default)]
pub struct StatusChange {
    pub machine: Option<String>,
    pub log_path: Option<String>,
    pub error: Option<String>,
}

/// A connection pool to the CI database.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    dialect: Dialect,
}

const BUILD_COLUMNS: &str = "id, evaluation_id, specification, job, drv_path, system, outputs, \
     status, priority, required_features, created_at, started_at, stopped_at, machine, \
     log_path, attempts, retry_after, error, cached_failure_of";

/// One build at a time per derivation, however many evaluations want it:
/// not while another is started, and of the scheduled ones the oldest.
/// The others wait, then find its outputs valid (or its failure cached).
const ONE_BUILD_PER_DERIVATION: &str = "AND NOT EXISTS (SELECT 1 FROM builds s \
     WHERE s.drv_path = builds.drv_path AND s.status = 'started') \
     AND id = (SELECT MIN(t.id) FROM builds t \
     WHERE t.drv_path = builds.drv_path AND t.status = 'scheduled')";

const EVALUATION_COLUMNS: &str =
    "id, specification, status, checkouts, created_at, evaluated_at, finished_at, log_path, error";

impl Db {
    /// Opens (creating if needed) and migrates the database at `url`: a file
    /// path or `sqlite://PATH` for SQLite, `postgres://…` for PostgreSQL
    /// (`postgres:///DB?host=/run/dir` for a unix socket).
    pub async fn open(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let (dialect, connect_url) =
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                (Dialect::Postgres, url.to_owned())
            } else if url == "sqlite::memory:" {
                (Dialect::Sqlite, url.to_owned())
            } else if let Some(path) = url
                .strip_prefix("sqlite://")
                .or(url.strip_prefix("sqlite:"))
            {
                (Dialect::Sqlite, sqlite_url(path))
            } else if !url.contains("://") {
                (Dialect::Sqlite, sqlite_url(url))
            } else {
                return Err(DbError::UnsupportedUrl(url.to_owned()));
            };
        let options = AnyPoolOptions::new();
        let options = match dialect {
            // SQLite serialises writers anyway; one connection avoids
            // SQLITE_BUSY from transactions that upgrade to writing, and keeps
            // an in-memory database one database.
            Dialect::Sqlite => options.max_connections(1).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            }),
            Dialect::Postgres => options.max_connections(8),
        };
        let pool = options
            .connect(&connect_url)
            .await
            .map_err(|source| DbError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let db = Db { pool, dialect };
        db.migrate().await?;
        Ok(db)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the pool (waits for connections in use to come back).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS kiln_ci_schema (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .map_err(query_error("create the schema table"))?;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM kiln_ci_schema")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("read the schema version"))?
            .iter()
            .map(|row| row.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()
            .map_err(query_error("read the schema version"))?;
        for &(version, name, text) in MIGRATIONS {
            if applied.contains(&version) {
                continue;
            }
            let fail = |source| DbError::Migrate {
                version,
                name,
                source,
            };
            let text = text.replace("{{id}}", self.dialect.id_column());
            let mut tx = self.pool.begin().await.map_err(fail)?;
            for statement in split_statements(&text) {
                sqlx::query(&statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(fail)?;
            }
            sqlx::query(
                "INSERT INTO kiln_ci_schema (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(version)
            .bind(name)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
            tx.commit().await.map_err(fail)?;
        }
        Ok(())
    }

    // ---- specifications -------------------------------------------------

    /// Creates the specification, or replaces the one of the same name
    /// (keeping its creation time). Returns it as stored.
    pub async fn put_specification(&self, spec: &Specification) -> Result<Specification> {
        let now = now();
        let existing = self.specification(&spec.name).await?;
        let created_at = existing.as_ref().map_or(now, |s| s.created_at);
        let sql = if existing.is_some() {
            "UPDATE specifications SET inputs = $2, eval_input = $3, evaluator = $4, systems = $5, \
             priority = $6, period_secs = $7, build_targets = $8, enabled = $9, created_at = $10, \
             updated_at = $11 WHERE name = $1"
        } else {
            "INSERT INTO specifications (name, inputs, eval_input, evaluator, systems, priority, \
             period_secs, build_targets, enabled, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        };
        sqlx::query(sql)
            .bind(&spec.name)
            .bind(spec.inputs.to_json())
            .bind(&spec.eval_input)
            .bind(spec.evaluator.to_json())
            .bind(spec.systems.to_json())
            .bind(i64::from(spec.priority.min(9)))
            .bind(spec.period_secs)
            .bind(spec.build_targets.to_json())
            .bind(i64::from(spec.enabled))
            .bind(created_at)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(query_error("store a specification"))?;
        Ok(Specification {
            priority: spec.priority.min(9),
            created_at,
            updated_at: now,
            ..spec.clone()
        })
    }

    /// The specification named `name`, if there is one.
    pub async fn specification(&self, name: &str) -> Result<Option<Specification>> {
        sqlx::query("SELECT * FROM specifications WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("read a specification"))?
            .map(|row| specification_from_row(&row))
            .transpose()
    }

    /// All specifications, by name.
    pub async fn list_specifications(&self) -> Result<Vec<Specification>> {
        sqlx::query("SELECT * FROM specifications ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list specifications"))?
            .iter()
            .map(specification_from_row)
            .collect()
    }

    /// Removes a specification with its evaluations and builds; false if
    /// there was none.
    pub async fn remove_specification(&self, name: &str) -> Result<bool> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("remove a specification"))?;
        // Explicit deletes rather than relying on cascades, which SQLite
        // applies only with foreign_keys on.
        for sql in [
            "DELETE FROM build_dependencies WHERE build_id IN (SELECT id FROM builds WHERE specification = $1)",
            "DELETE FROM build_dependencies WHERE depends_on IN (SELECT id FROM builds WHERE specification = $1)",
            "DELETE FROM builds WHERE specification = $1",
            "DELETE FROM evaluation_errors WHERE evaluation_id IN (SELECT id FROM evaluations WHERE specification = $1)",
            "DELETE FROM evaluations WHERE specification = $1",
        ] {
            sqlx::query(sql)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(query_error("remove a specification"))?;
        }
        let done = sqlx::query("DELETE FROM specifications WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(query_error("remove a specification"))?;
        tx.commit()
            .await
            .map_err(query_error("remove a specification"))?;
        Ok(done.rows_affected() > 0)
    }

    // ---- evaluations ----------------------------------------------------

    /// Records a new evaluation of `spec` as started. Fails with
    /// [`DbError::EvaluationRunning`] while another evaluation of `spec` is
    /// started: a unique index allows one, so two kiln-ci processes (or an
    /// API call and the timer) cannot both start one.
    pub async fn create_evaluation(&self, spec: &str) -> Result<i64> {
        if self.specification(spec).await?.is_none() {
            return Err(DbError::NoSuchSpecification(spec.to_owned()));
        }
        let inserted = sqlx::query(
            "INSERT INTO evaluations (specification, status, checkouts, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(spec)
        .bind(EvaluationStatus::Started.as_str())
        .bind("[]")
        .bind(now())
        .fetch_one(&self.pool)
        .await;
        match inserted {
            Ok(row) => row
                .try_get::<i64, _>(0)
                .map_err(query_error("create an evaluation")),
            // The index's refusal reads differently in each engine; the
            // running evaluation is what tells.
            Err(source) => match self.running_evaluation(spec).await? {
                Some(running) => Err(DbError::EvaluationRunning {
                    spec: spec.to_owned(),
                    running,
                }),
                None => Err(DbError::Query {
                    what: "create an evaluation",
                    source,
                }),
            },
        }
    }

    /// The id of the evaluation of `spec` that is started, if one is.
    pub async fn running_evaluation(&self, spec: &str) -> Result<Option<i64>> {
        sqlx::query("SELECT id FROM evaluations WHERE specification = $1 AND status = 'started'")
            .bind(spec)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("find a running evaluation"))?
            .map(|row| row.try_get::<i64, _>(0))
            .transpose()
            .map_err(query_error("find a running evaluation"))
    }

    /// Records the revisions the inputs had and where the log is.
    pub async fn set_evaluation_checkouts(
        &self,
        id: i64,
        checkouts: &[Checkout],
        log_path: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE evaluations SET checkouts = $2, log_path = $3 WHERE id = $1")
            .bind(id)
            .bind(checkouts.to_json())
            .bind(log_path)
            .execute(&self.pool)
            .await
            .map_err(query_error("record an evaluation's checkouts"))?;
        Ok(())
    }

    /// Ends the evaluator's part of an evaluation: succeeded (its jobs are
    /// registered), failed (with `error`) or aborted.
    pub async fn finish_evaluation(
        &self,
        id: i64,
        status: EvaluationStatus,
        error: Option<&str>,
    ) -> Result<()> {
        let now = now();
        let finished = (status != EvaluationStatus::Succeeded).then_some(now);
        sqlx::query(
            "UPDATE evaluations SET status = $2, error = $3, evaluated_at = $4, finished_at = COALESCE(finished_at, $5) WHERE id = $1",
        )
        .bind(id)
        .bind(status.as_str())
        .bind(error)
        .bind(now)
        .bind(finished)
        .execute(&self.pool)
        .await
        .map_err(query_error("finish an evaluation"))?;
        Ok(())
    }

    /// Marks succeeded evaluations whose builds have all ended as finished.
    pub async fn close_finished_evaluations(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE evaluations SET finished_at = $1 WHERE finished_at IS NULL AND status = 'succeeded' \
             AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.evaluation_id = evaluations.id \
             AND b.status IN ('submitted', 'scheduled', 'started'))",
        )
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(query_error("close finished evaluations"))?;
        Ok(done.rows_affected())
    }

    /// Evaluations left "started" (by a crash) become aborted.
    pub async fn abort_started_evaluations(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE evaluations SET status = 'aborted', error = 'kiln-ci stopped during the evaluation', finished_at = $1 WHERE status = 'started'",
        )
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(query_error("abort evaluations left started"))?;
        Ok(done.rows_affected())
    }

    pub async fn evaluation(&self, id: i64) -> Result<Option<Evaluation>> {
        sqlx::query(&format!(
            "SELECT {EVALUATION_COLUMNS} FROM evaluations WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("read an evaluation"))?
        .map(|row| evaluation_from_row(&row))
        .transpose()
    }

    /// The evaluations of `spec`, newest first, at most `limit` (0: all).
    pub async fn list_evaluations(&self, spec: &str, limit: i64) -> Result<Vec<Evaluation>> {
        let limit = if limit <= 0 { i64::MAX } else { limit };
        sqlx::query(&format!(
            "SELECT {EVALUATION_COLUMNS} FROM evaluations WHERE specification = $1 ORDER BY id DESC LIMIT $2"
        ))
        .bind(spec)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("list evaluations"))?
        .iter()
        .map(evaluation_from_row)
        .collect()
    }

    /// The newest evaluations of all specifications, at most `limit`.
    pub async fn recent_evaluations(&self, limit: i64) -> Result<Vec<Evaluation>> {
        let limit = if limit <= 0 { i64::MAX } else { limit };
        sqlx::query(&format!(
            "SELECT {EVALUATION_COLUMNS} FROM evaluations ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("list evaluations"))?
        .iter()
        .map(evaluation_from_row)
        .collect()
    }

    /// The evaluation of the same specification just before `id` (for diffs).
    pub async fn previous_evaluation(&self, id: i64) -> Result<Option<Evaluation>> {
        sqlx::query(&format!(
            "SELECT {EVALUATION_COLUMNS} FROM evaluations WHERE specification = \
             (SELECT specification FROM evaluations WHERE id = $1) AND id < $1 \
             AND status = 'succeeded' ORDER BY id DESC LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("read the previous evaluation"))?
        .map(|row| evaluation_from_row(&row))
        .transpose()
    }

    pub async fn add_evaluation_errors(&self, id: i64, errors: &[(String, String)]) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("record evaluation errors"))?;
        for (attr, error) in errors {
            sqlx::query(
                "INSERT INTO evaluation_errors (evaluation_id, attr, error) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(attr)
            .bind(error)
            .execute(&mut *tx)
            .await
            .map_err(query_error("record evaluation errors"))?;
        }
        tx.commit()
            .await
            .map_err(query_error("record evaluation errors"))
    }

    /// The attributes an evaluation could not evaluate.
    pub async fn evaluation_errors(&self, id: i64) -> Result<Vec<EvaluationError>> {
        let rows = sqlx::query(
            "SELECT evaluation_id, attr, error FROM evaluation_errors WHERE evaluation_id = $1 ORDER BY attr",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("read evaluation errors"))?;
        rows.iter()
            .map(|row| {
                Ok(EvaluationError {
                    evaluation_id: get(row, "evaluation_id")?,
                    attr: get(row, "attr")?,
                    error: get(row, "error")?,
                })
            })
            .collect()
    }

    // ---- builds ---------------------------------------------------------

    /// Registers an evaluation's jobs as builds (status submitted), with
    /// the dependencies between them given as index pairs into `builds`
    /// (`(dependent, dependency)`), in one transaction. Returns the new ids
    /// in the order of `builds`.
    pub async fn insert_builds(
        &self,
        evaluation_id: i64,
        spec: &str,
        priority: i64,
        builds: &[NewBuild],
        dependencies: &[(usize, usize)],
    ) -> Result<Vec<i64>> {
        let what = "register builds";
        let now = now();
        let mut tx = self.pool.begin().await.map_err(query_error(what))?;
        let mut ids = Vec::with_capacity(builds.len());
        for build in builds {
            let row = sqlx::query(
                "INSERT INTO builds (evaluation_id, specification, job, drv_path, system, outputs, \
                 status, priority, required_features, created_at, attempts) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0) RETURNING id",
            )
            .bind(evaluation_id)
            .bind(spec)
            .bind(&build.job)
            .bind(&build.drv_path)
            .bind(&build.system)
            .bind(build.outputs.to_json())
            .bind(BuildStatus::Submitted.as_str())
            .bind(priority)
            .bind(build.required_features.join(" "))
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(query_error(what))?;
            ids.push(row.try_get::<i64, _>(0).map_err(query_error(what))?);
        }
        for &(dependent, dependency) in dependencies {
            sqlx::query("INSERT INTO build_dependencies (build_id, depends_on) VALUES ($1, $2)")
                .bind(ids[dependent])
                .bind(ids[dependency])
                .execute(&mut *tx)
                .await
                .map_err(query_error(what))?;
        }
        tx.commit().await.map_err(query_error(what))?;
        Ok(ids)
    }

    pub async fn build(&self, id: i64) -> Result<Option<Build>> {
        sqlx::query(&format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("read a build"))?
            .map(|row| build_from_row(&row))
            .transpose()
    }

    /// The builds of an evaluation, by id.
    pub async fn builds_of_evaluation(&self, evaluation_id: i64) -> Result<Vec<Build>> {
        self.list_builds(&BuildFilter {
            evaluation_id: Some(evaluation_id),
            ..BuildFilter::default()
        })
        .await
        .map(|mut builds| {
            builds.reverse();
            builds
        })
    }

    /// Builds matching `filter`, newest first.
    pub async fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        let mut sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE 1 = 1");
        let mut n = 0;
        let mut param = |sql: &mut String, clause: &str| {
            n += 1;
            sql.push_str(&clause.replace('?', &format!("${n}")));
        };
        if filter.specification.is_some() {
            param(&mut sql, " AND specification = ?");
        }
        if filter.evaluation_id.is_some() {
            param(&mut sql, " AND evaluation_id = ?");
        }
        if filter.status.is_some() {
            param(&mut sql, " AND status = ?");
        }
        if filter.job.is_some() {
            param(&mut sql, " AND job = ?");
        }
        sql.push_str(" ORDER BY id DESC");
        param(&mut sql, " LIMIT ?");
        param(&mut sql, " OFFSET ?");
        let mut query = sqlx::query(&sql);
        if let Some(spec) = &filter.specification {
            query = query.bind(spec);
        }
        if let Some(id) = filter.evaluation_id {
            query = query.bind(id);
        }
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(job) = &filter.job {
            query = query.bind(job);
        }
        let limit = if filter.limit <= 0 {
            i64::MAX
        } else {
            filter.limit
        };
        query
            .bind(limit)
            .bind(filter.offset.max(0))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list builds"))?
            .iter()
            .map(build_from_row)
            .collect()
    }

    /// Builds per status, over one evaluation or all builds.
    pub async fn status_counts(&self, evaluation_id: Option<i64>) -> Result<StatusCounts> {
        let rows = match evaluation_id {
            Some(id) => sqlx::query(
                "SELECT status, COUNT(*) AS n FROM builds WHERE evaluation_id = $1 GROUP BY status",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await,
            None => {
                sqlx::query("SELECT status, COUNT(*) AS n FROM builds GROUP BY status")
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(query_error("count builds"))?;
        let mut counts = StatusCounts::new();
        for row in rows {
            let status: String = get(&row, "status")?;
            counts.insert(parse_status(&status)?, get(&row, "n")?);
        }
        Ok(counts)
    }

    /// Sets a build's status with its time stamps: `started_at` when it
    /// starts (and `attempts` counts up), `stopped_at` when it ends.
    pub async fn set_build_status(
        &self,
        id: i64,
        status: BuildStatus,
        change: &StatusChange,
    ) -> Result<()> {
        self.set_build_statuses(&[id], status, change).await
    }

    /// [`Db::set_build_status`] for many builds in one transaction.
    pub async fn set_build_statuses(
        &self,
        ids: &[i64],
        status: BuildStatus,
        change: &StatusChange,
    ) -> Result<()> {
        let what = "set build statuses";
        let now = now();
        let sql = match status {
            BuildStatus::Started => {
                "UPDATE builds SET status = $2, started_at = $3, stopped_at = NULL, attempts = attempts + 1, \
                 machine = COALESCE($4, machine), log_path = COALESCE($5, log_path), error = $6 WHERE id = $1"
            }
            BuildStatus::Submitted | BuildStatus::Scheduled => {
                "UPDATE builds SET status = $2, stopped_at = NULL, \
                 retry_after = CASE WHEN retry_after > $3 THEN retry_after ELSE NULL END, \
                 machine = COALESCE($4, machine), log_path = COALESCE($5, log_path), error = $6 WHERE id = $1"
            }
            _ => {
                "UPDATE builds SET status = $2, stopped_at = $3, \
                 machine = COALESCE($4, machine), log_path = COALESCE($5, log_path), error = $6 WHERE id = $1"
            }
        };
        let mut tx = self.pool.begin().await.map_err(query_error(what))?;
        for &id in ids {
            sqlx::query(sql)
                .bind(id)
                .bind(status.as_str())
                .bind(now)
                .bind(change.machine.as_deref())
                .bind(change.log_path.as_deref())
                .bind(change.error.as_deref())
                .execute(&mut *tx)
                .await
                .map_err(query_error(what))?;
        }
        tx.commit().await.map_err(query_error(what))
    }

    /// Moves the start of started builds to `at`: when their builder began,
    /// which a daemon reports later than the batch was sent.
    pub async fn set_started_at(&self, ids: &[i64], at: i64) -> Result<()> {
        let what = "record a build's start";
        let mut tx = self.pool.begin().await.map_err(query_error(what))?;
        for &id in ids {
            sqlx::query("UPDATE builds SET started_at = $2 WHERE id = $1 AND status = 'started'")
                .bind(id)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(query_error(what))?;
        }
        tx.commit().await.map_err(query_error(what))
    }

    /// Puts a build back to scheduled after a transient failure, not to be
    /// dispatched before `retry_after`.
    pub async fn schedule_retry(&self, id: i64, retry_after: i64, error: &str) -> Result<()> {
        sqlx::query(
            "UPDATE builds SET status = 'scheduled', retry_after = $2, error = $3, stopped_at = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(retry_after)
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(query_error("schedule a retry"))?;
        Ok(())
    }

    /// Submitted builds whose dependencies have all succeeded become
    /// scheduled. Returns how many did.
    pub async fn promote_ready_builds(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE builds SET status = 'scheduled' WHERE status = 'submitted' AND NOT EXISTS \
             (SELECT 1 FROM build_dependencies d JOIN builds b ON b.id = d.depends_on \
             WHERE d.build_id = builds.id AND b.status <> 'succeeded')",
        )
        .execute(&self.pool)
        .await
        .map_err(query_error("schedule ready builds"))?;
        Ok(done.rows_affected())
    }

    /// Waiting builds with a dependency that failed become failed-dependency,
    /// transitively. Returns the ids that changed.
    pub async fn propagate_failures(&self) -> Result<Vec<i64>> {
        let mut changed = Vec::new();
        loop {
            let rows = sqlx::query(
                "SELECT DISTINCT d.build_id FROM build_dependencies d \
                 JOIN builds b ON b.id = d.depends_on JOIN builds w ON w.id = d.build_id \
                 WHERE w.status IN ('submitted', 'scheduled') AND b.status IN \
                 ('failed', 'failed-dependency', 'failed-other', 'canceled', 'timed-out', 'log-limit')",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("find builds with failed dependencies"))?;
            let ids: Vec<i64> = rows
                .iter()
                .map(|row| row.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()
                .map_err(query_error("find builds with failed dependencies"))?;
            if ids.is_empty() {
                return Ok(changed);
            }
            self.set_build_statuses(
                &ids,
                BuildStatus::FailedDependency,
                &StatusChange {
                    error: Some("a build it depends on failed".into()),
                    ..StatusChange::default()
                },
            )
            .await?;
            changed.extend(ids);
        }
    }

    /// Scheduled builds that may be dispatched now (their back-off is over)
    /// and pass `features`, highest priority first, then oldest; at most
    /// `limit`. The features are filtered in the query, so that a window of
    /// builds one dispatcher cannot take never hides those it can.
    pub async fn dispatchable_builds(
        &self,
        limit: i64,
        features: FeatureFilter<'_>,
    ) -> Result<Vec<Build>> {
        let (set, join) = match features {
            FeatureFilter::Any => (None, ""),
            FeatureFilter::Without(set) => (Some(set), " AND "),
            FeatureFilter::With(set) if set.is_empty() => return Ok(Vec::new()),
            FeatureFilter::With(set) => (Some(set), " OR "),
        };
        let mut sql = format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE status = 'scheduled' \
             AND (retry_after IS NULL OR retry_after <= $1) {ONE_BUILD_PER_DERIVATION}"
        );
        let patterns: Vec<String> = set
            .into_iter()
            .flatten()
            .map(|feature| {
                let escaped = feature
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_");
                format!("% {escaped} %")
            })
            .collect();
        if !patterns.is_empty() {
            let negate = if matches!(features, FeatureFilter::Without(_)) {
                "NOT "
            } else {
                ""
            };
            let tests: Vec<String> = (0..patterns.len())
                .map(|i| {
                    format!(
                        "(' ' || required_features || ' ') {negate}LIKE ${} ESCAPE '\\'",
                        i + 3
                    )
                })
                .collect();
            sql.push_str(&format!(" AND ({})", tests.join(join)));
        }
        sql.push_str(" ORDER BY priority DESC, id LIMIT $2");
        let mut query = sqlx::query(&sql).bind(now()).bind(limit.max(1));
        for pattern in &patterns {
            query = query.bind(pattern);
        }
        query
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("find builds to dispatch"))?
            .iter()
            .map(build_from_row)
            .collect()
    }

    /// Ids of the builds `id` depends on.
    pub async fn dependencies_of(&self, id: i64) -> Result<Vec<i64>> {
        self.ids(
            "SELECT depends_on FROM build_dependencies WHERE build_id = $1 ORDER BY depends_on",
            id,
            "read build dependencies",
        )
        .await
    }

    /// Ids of the builds that depend on `id`.
    pub async fn dependents_of(&self, id: i64) -> Result<Vec<i64>> {
        self.ids(
            "SELECT build_id FROM build_dependencies WHERE depends_on = $1 ORDER BY build_id",
            id,
            "read build dependents",
        )
        .await
    }

    async fn ids(&self, sql: &str, id: i64, what: &'static str) -> Result<Vec<i64>> {
        sqlx::query(sql)
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error(what))?
            .iter()
            .map(|row| row.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()
            .map_err(query_error(what))
    }

    /// A finished (succeeded or not) build of `drv_path` from any
    /// evaluation, the newest.
    pub async fn latest_build_of_drv(&self, drv_path: &str) -> Result<Option<Build>> {
        sqlx::query(&format!(
            "SELECT {BUILD_COLUMNS} FROM builds WHERE drv_path = $1 ORDER BY id DESC LIMIT 1"
        ))
        .bind(drv_path)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("find builds of a derivation"))?
        .map(|row| build_from_row(&row))
        .transpose()
    }

    /// Puts builds (and everything that failed because of them) back to
    /// submitted, so that they are built again in dependency order. Returns
    /// the ids restarted.
    pub async fn restart_builds(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let mut all: Vec<i64> = Vec::new();
        let mut queue: Vec<i64> = ids.to_vec();
        while let Some(id) = queue.pop() {
            if all.contains(&id) {
                continue;
            }
            all.push(id);
            for dependent in self.dependents_of(id).await? {
                if let Some(build) = self.build(dependent).await?
                    && build.status == BuildStatus::FailedDependency
                {
                    queue.push(dependent);
                }
            }
        }
        let what = "restart builds";
        let mut tx = self.pool.begin().await.map_err(query_error(what))?;
        for &id in &all {
            // A restart is the way to build a cached failure again.
            sqlx::query(
                "DELETE FROM failed_derivations WHERE drv_path = (SELECT drv_path FROM builds WHERE id = $1)",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
            sqlx::query(
                "UPDATE builds SET status = 'submitted', started_at = NULL, stopped_at = NULL, \
                 error = NULL, retry_after = NULL, attempts = 0, cached_failure_of = NULL WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
            sqlx::query(
                "UPDATE evaluations SET finished_at = NULL WHERE id = (SELECT evaluation_id FROM builds WHERE id = $1)",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
        }
        tx.commit().await.map_err(query_error(what))?;
        all.sort_unstable();
        Ok(all)
    }

    /// Cancels waiting builds created before `before`. Returns how many.
    pub async fn cancel_builds_older_than(&self, before: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE builds SET status = 'canceled', stopped_at = $2, error = 'too old when kiln-ci started' \
             WHERE status IN ('submitted', 'scheduled', 'started') AND created_at < $1",
        )
        .bind(before)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(query_error("cancel old builds"))?;
        Ok(done.rows_affected())
    }

    /// Builds left started (by a crash) go back to scheduled, except those
    /// a build agent holds in an open session (its result is still
    /// welcome; the session's timeout takes them back otherwise). Returns
    /// the ids requeued.
    pub async fn requeue_started_builds(&self) -> Result<Vec<i64>> {
        const LEFT: &str = "status = 'started' AND id NOT IN (SELECT build_id FROM agent_sessions)";
        let ids = sqlx::query(&format!("SELECT id FROM builds WHERE {LEFT} ORDER BY id"))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("find builds left started"))?
            .iter()
            .map(|row| row.try_get::<i64, _>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(query_error("find builds left started"))?;
        sqlx::query(&format!(
            "UPDATE builds SET status = 'scheduled' WHERE {LEFT}"
        ))
        .execute(&self.pool)
        .await
        .map_err(query_error("requeue builds left started"))?;
        Ok(ids)
    }

    // ---- cached failures ------------------------------------------------

    /// Remembers that the derivations of these ended builds failed
    /// permanently, so that later evaluations do not build them again.
    pub async fn remember_failures(&self, ids: &[i64]) -> Result<()> {
        let what = "remember failed derivations";
        let mut tx = self.pool.begin().await.map_err(query_error(what))?;
        for &id in ids {
            sqlx::query(
                "DELETE FROM failed_derivations WHERE drv_path = (SELECT drv_path FROM builds WHERE id = $1)",
            )
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
            sqlx::query(
                "INSERT INTO failed_derivations (drv_path, build_id, failed_at) \
                 SELECT drv_path, id, $2 FROM builds WHERE id = $1",
            )
            .bind(id)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
        }
        tx.commit().await.map_err(query_error(what))
    }

    /// The build that failed permanently for `drv_path`, if one is remembered.
    pub async fn cached_failure(&self, drv_path: &str) -> Result<Option<i64>> {
        sqlx::query("SELECT build_id FROM failed_derivations WHERE drv_path = $1")
            .bind(drv_path)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("look up a cached failure"))?
            .map(|row| row.try_get::<i64, _>(0))
            .transpose()
            .map_err(query_error("look up a cached failure"))
    }

    /// The submitted builds of an evaluation whose derivation failed
    /// permanently before end failed at once: they point to the earlier
    /// build and show its log. Returns their ids.
    pub async fn fail_cached_failures(&self, evaluation_id: i64) -> Result<Vec<i64>> {
        self.fail_cached(Some(evaluation_id)).await
    }

    /// Scheduled builds whose derivation failed permanently since they were
    /// submitted (the same derivation built for another evaluation) fail as
    /// [`Db::fail_cached_failures`] does. Returns their ids.
    pub async fn fail_scheduled_cached_failures(&self) -> Result<Vec<i64>> {
        self.fail_cached(None).await
    }

    /// Fails the builds whose derivation has a cached failure: the
    /// submitted ones of `evaluation_id`, or every scheduled one.
    async fn fail_cached(&self, evaluation_id: Option<i64>) -> Result<Vec<i64>> {
        let what = "mark cached failures";
        let filter = match evaluation_id {
            Some(_) => "b.evaluation_id = $1 AND b.status = 'submitted'",
            None => "b.status = 'scheduled'",
        };
        let sql = format!(
            "SELECT b.id, f.build_id, e.log_path FROM builds b \
             JOIN failed_derivations f ON f.drv_path = b.drv_path \
             LEFT JOIN builds e ON e.id = f.build_id \
             WHERE {filter} ORDER BY b.id"
        );
        let mut query = sqlx::query(&sql);
        if let Some(id) = evaluation_id {
            query = query.bind(id);
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(query_error(what))?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let now = now();
        let mut ids = Vec::with_capacity(rows.len());
        let mut tx = self.pool.begin().await.map_err(query_error(what))?;
        for row in &rows {
            let id: i64 = row.try_get(0).map_err(query_error(what))?;
            let earlier: i64 = row.try_get(1).map_err(query_error(what))?;
            let log_path: Option<String> = row.try_get(2).map_err(query_error(what))?;
            sqlx::query(
                "UPDATE builds SET status = 'failed', stopped_at = $2, cached_failure_of = $3, \
                 log_path = $4, error = $5 WHERE id = $1",
            )
            .bind(id)
            .bind(now)
            .bind(earlier)
            .bind(log_path)
            .bind(format!(
                "cached failure: build {earlier} of this derivation failed permanently; restart this build to build it again"
            ))
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
            ids.push(id);
        }
        tx.commit().await.map_err(query_error(what))?;
        Ok(ids)
    }

    // ---- agent sessions -------------------------------------------------

    /// Records a task handed to an agent.
    pub async fn put_agent_session(&self, session: &AgentSession) -> Result<()> {
        sqlx::query(
            "INSERT INTO agent_sessions (session, build_id, agent, public_key, challenge, dir, handed_out) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&session.session)
        .bind(session.build_id)
        .bind(&session.agent)
        .bind(&session.public_key)
        .bind(&session.challenge)
        .bind(&session.dir)
        .bind(session.handed_out)
        .execute(&self.pool)
        .await
        .map_err(query_error("record an agent session"))?;
        Ok(())
    }

    pub async fn agent_session(&self, session: &str) -> Result<Option<AgentSession>> {
        sqlx::query("SELECT * FROM agent_sessions WHERE session = $1")
            .bind(session)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("read an agent session"))?
            .map(|row| agent_session_from_row(&row))
            .transpose()
    }

    /// Ends a session; false if it was not open (so that of two requests
    /// ending it, one wins).
    pub async fn remove_agent_session(&self, session: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM agent_sessions WHERE session = $1")
            .bind(session)
            .execute(&self.pool)
            .await
            .map_err(query_error("end an agent session"))?;
        Ok(done.rows_affected() > 0)
    }

    /// Open sessions, oldest first.
    pub async fn agent_sessions(&self) -> Result<Vec<AgentSession>> {
        sqlx::query("SELECT * FROM agent_sessions ORDER BY handed_out, session")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list agent sessions"))?
            .iter()
            .map(agent_session_from_row)
            .collect()
    }

    // ---- agents ---------------------------------------------------------

    /// Adds an agent (or replaces its key and state).
    pub async fn put_agent(&self, agent: &Agent) -> Result<()> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("store an agent"))?;
        sqlx::query("DELETE FROM agents WHERE name = $1")
            .bind(&agent.name)
            .execute(&mut *tx)
            .await
            .map_err(query_error("store an agent"))?;
        sqlx::query(
            "INSERT INTO agents (name, public_key, machines, enabled, registered_at, last_seen) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&agent.name)
        .bind(&agent.public_key)
        .bind(agent.machines.to_json())
        .bind(i64::from(agent.enabled))
        .bind(if agent.registered_at == 0 { now() } else { agent.registered_at })
        .bind(agent.last_seen)
        .execute(&mut *tx)
        .await
        .map_err(query_error("store an agent"))?;
        tx.commit().await.map_err(query_error("store an agent"))
    }

    /// Notes that an agent asked for work, offering `machines`.
    pub async fn touch_agent(&self, name: &str, machines: &[String]) -> Result<()> {
        sqlx::query("UPDATE agents SET last_seen = $2, machines = $3 WHERE name = $1")
            .bind(name)
            .bind(now())
            .bind(machines.to_json())
            .execute(&self.pool)
            .await
            .map_err(query_error("update an agent"))?;
        Ok(())
    }

    pub async fn agents(&self) -> Result<Vec<Agent>> {
        sqlx::query("SELECT * FROM agents ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list agents"))?
            .iter()
            .map(|row| {
                Ok(Agent {
                    name: get(row, "name")?,
                    public_key: get(row, "public_key")?,
                    machines: from_json("agent machines", &get::<String>(row, "machines")?)?,
                    enabled: get::<i64>(row, "enabled")? != 0,
                    registered_at: get(row, "registered_at")?,
                    last_seen: get(row, "last_seen")?,
                })
            })
            .collect()
    }

    pub async fn remove_agent(&self, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM agents WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(query_error("remove an agent"))?;
        Ok(done.rows_affected() > 0)
    }

    // ---- output roots ---------------------------------------------------

    /// Records (or extends) the GC root of a build's output.
    pub async fn put_output_root(&self, path: &str, build_id: i64, expires_at: i64) -> Result<()> {
        let what = "record an output root";
        let mut tx = self.pool.begin().await.map_err(query_error(what))?;
        sqlx::query("DELETE FROM output_roots WHERE path = $1")
            .bind(path)
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
        sqlx::query("INSERT INTO output_roots (path, build_id, expires_at) VALUES ($1, $2, $3)")
            .bind(path)
            .bind(build_id)
            .bind(expires_at)
            .execute(&mut *tx)
            .await
            .map_err(query_error(what))?;
        tx.commit().await.map_err(query_error(what))
    }

    /// Output roots whose time is up at `at`.
    pub async fn expired_output_roots(&self, at: i64) -> Result<Vec<String>> {
        sqlx::query("SELECT path FROM output_roots WHERE expires_at <= $1 ORDER BY path")
            .bind(at)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("find expired output roots"))?
            .iter()
            .map(|row| get(row, "path"))
            .collect()
    }

    pub async fn remove_output_root(&self, path: &str) -> Result<()> {
        sqlx::query("DELETE FROM output_roots WHERE path = $1")
            .bind(path)
            .execute(&self.pool)
            .await
            .map_err(query_error("remove an output root"))?;
        Ok(())
    }
}

fn sqlite_url(path: &str) -> String {
    format!("sqlite://{path}?mode=rwc")
}

/// Splits a migration into statements at `;` ending a line, skipping
/// comment lines.
fn split_statements(text: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            statements.push(std::mem::take(&mut current));
        }
    }
    if !current.trim().is_empty() {
        statements.push(current);
    }
    statements
}

mod erased {
    /// Serialises the model's lists and maps for their TEXT columns.
    pub trait Json {
        fn to_json(&self) -> String;
    }

    impl<T: serde::Serialize + ?Sized> Json for T {
        fn to_json(&self) -> String {
            // Serialising plain model types to a string cannot fail.
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
use erased::Json as _;

fn get<'r, T>(row: &'r AnyRow, column: &'static str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(column).map_err(|source| DbError::Query {
        what: column,
        source,
    })
}

fn from_json<T: serde::de::DeserializeOwned>(what: &'static str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt {
        what,
        value: text.to_owned(),
        problem: e.to_string(),
    })
}

fn parse_status(text: &str) -> Result<BuildStatus> {
    text.parse()
        .map_err(|e: crate::model::UnknownStatus| DbError::Corrupt {
            what: "build status",
            value: text.to_owned(),
            problem: e.to_string(),
        })
}

fn specification_from_row(row: &AnyRow) -> Result<Specification> {
    let inputs: Vec<Input> = from_json("specification inputs", &get::<String>(row, "inputs")?)?;
    let build_targets: BuildTargets = from_json(
        "specification build targets",
        &get::<String>(row, "build_targets")?,
    )?;
    Ok(Specification {
        name: get(row, "name")?,
        inputs,
        eval_input: get(row, "eval_input")?,
        evaluator: from_json("evaluator", &get::<String>(row, "evaluator")?)?,
        systems: from_json("systems", &get::<String>(row, "systems")?)?,
        priority: get::<i64>(row, "priority")?.clamp(0, 9) as u8,
        period_secs: get(row, "period_secs")?,
        build_targets,
        enabled: get::<i64>(row, "enabled")? != 0,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}

fn evaluation_from_row(row: &AnyRow) -> Result<Evaluation> {
    let status: String = get(row, "status")?;
    Ok(Evaluation {
        id: get(row, "id")?,
        specification: get(row, "specification")?,
        status: status
            .parse()
            .map_err(|e: crate::model::UnknownStatus| DbError::Corrupt {
                what: "evaluation status",
                value: status.clone(),
                problem: e.to_string(),
            })?,
        checkouts: from_json("checkouts", &get::<String>(row, "checkouts")?)?,
        created_at: get(row, "created_at")?,
        evaluated_at: get(row, "evaluated_at")?,
        finished_at: get(row, "finished_at")?,
        log_path: get(row, "log_path")?,
        error: get(row, "error")?,
    })
}

fn agent_session_from_row(row: &AnyRow) -> Result<AgentSession> {
    Ok(AgentSession {
        session: get(row, "session")?,
        build_id: get(row, "build_id")?,
        agent: get(row, "agent")?,
        public_key: get(row, "public_key")?,
        challenge: get(row, "challenge")?,
        dir: get(row, "dir")?,
        handed_out: get(row, "handed_out")?,
    })
}

fn build_from_row(row: &AnyRow) -> Result<Build> {
    let features: String = get(row, "required_features")?;
    let outputs: BTreeMap<String, String> =
        from_json("build outputs", &get::<String>(row, "outputs")?)?;
    Ok(Build {
        id: get(row, "id")?,
        evaluation_id: get(row, "evaluation_id")?,
        specification: get(row, "specification")?,
        job: get(row, "job")?,
        drv_path: get(row, "drv_path")?,
        system: get(row, "system")?,
        outputs,
        status: parse_status(&get::<String>(row, "status")?)?,
        priority: get(row, "priority")?,
        required_features: features.split_whitespace().map(str::to_owned).collect(),
        created_at: get(row, "created_at")?,
        started_at: get(row, "started_at")?,
        stopped_at: get(row, "stopped_at")?,
        machine: get(row, "machine")?,
        log_path: get(row, "log_path")?,
        attempts: get(row, "attempts")?,
        retry_after: get(row, "retry_after")?,
        error: get(row, "error")?,
        cached_failure_of: get(row, "cached_failure_of")?,
    })
}

#[cfg(test)]
mod tests;

mod web_queries;
pub use web_queries::{DurationHistogram, JobStatus};
