//! Aggregates the web pages and `/metrics` read on every request, computed
//! by the database instead of by loading every build: a scrape or a page of
//! a 10,000-job evaluation must not decode 10,000 rows it only counts.

use std::collections::HashMap;

use super::{Db, DbError, Result, get, parse_status, query_error};
use crate::model::{BuildStatus, EvaluationStatus};

/// Durations of ended builds that ran, bucketed for a Prometheus histogram.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DurationHistogram {
    /// For each upper bound (seconds), how many builds took at most that long.
    pub cumulative: Vec<(i64, i64)>,
    /// Total seconds of all of them.
    pub sum: i64,
    pub count: i64,
}

/// A build's id, job and status: what comparing two evaluations needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub id: i64,
    pub job: String,
    pub status: BuildStatus,
}

impl Db {
    /// Evaluations per status.
    pub async fn evaluation_counts(&self) -> Result<HashMap<EvaluationStatus, i64>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM evaluations GROUP BY status")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("count evaluations"))?;
        let mut counts = HashMap::new();
        for row in rows {
            let status: String = get(&row, "status")?;
            let parsed =
                status
                    .parse()
                    .map_err(|e: crate::model::UnknownStatus| DbError::Corrupt {
                        what: "evaluation status",
                        value: status.clone(),
                        problem: e.to_string(),
                    })?;
            counts.insert(parsed, get(&row, "n")?);
        }
        Ok(counts)
    }

    /// How long the ended builds that ran took, counted into buckets with
    /// the upper bounds `bounds` (seconds, ascending).
    pub async fn build_duration_histogram(&self, bounds: &[i64]) -> Result<DurationHistogram> {
        // SUM of BIGINT is NUMERIC in PostgreSQL: cast back for one decoder.
        let mut sql =
            String::from("SELECT COUNT(*) AS n, CAST(COALESCE(SUM(d), 0) AS BIGINT) AS total");
        for i in 0..bounds.len() {
            sql.push_str(&format!(
                ", CAST(COALESCE(SUM(CASE WHEN d <= ${} THEN 1 ELSE 0 END), 0) AS BIGINT) AS b{i}",
                i + 1
            ));
        }
        sql.push_str(
            " FROM (SELECT stopped_at - started_at AS d FROM builds \
             WHERE started_at IS NOT NULL AND stopped_at IS NOT NULL \
             AND status NOT IN ('submitted', 'scheduled', 'started')) AS ran",
        );
        let mut query = sqlx::query(&sql);
        for &bound in bounds {
            query = query.bind(bound);
        }
        let row = query
            .fetch_one(&self.pool)
            .await
            .map_err(query_error("bucket build durations"))?;
        let mut cumulative = Vec::with_capacity(bounds.len());
        for (i, &bound) in bounds.iter().enumerate() {
            let n: i64 =
                sqlx::Row::try_get(&row, i + 2).map_err(query_error("bucket build durations"))?;
            cumulative.push((bound, n));
        }
        Ok(DurationHistogram {
            cumulative,
            sum: get(&row, "total")?,
            count: get(&row, "n")?,
        })
    }

    /// The id, job and status of each build of an evaluation, by id.
    pub async fn job_statuses(&self, evaluation_id: i64) -> Result<Vec<JobStatus>> {
        sqlx::query("SELECT id, job, status FROM builds WHERE evaluation_id = $1 ORDER BY id")
            .bind(evaluation_id)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("read an evaluation's job statuses"))?
            .iter()
            .map(|row| {
                Ok(JobStatus {
                    id: get(row, "id")?,
                    job: get(row, "job")?,
                    status: parse_status(&get::<String>(row, "status")?)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::db::StatusChange;
    use crate::model::{Input, NewBuild, Specification};
    use crate::testing::TempPostgres;

    async fn exercise(db: Db) {
        db.put_specification(&Specification::new(
            "s",
            vec![Input::branch("src", "/srv/src", "main")],
            vec!["eval".into()],
        ))
        .await
        .unwrap();
        let empty = db.build_duration_histogram(&[1, 10]).await.unwrap();
        assert_eq!(
            empty,
            DurationHistogram {
                cumulative: vec![(1, 0), (10, 0)],
                sum: 0,
                count: 0
            }
        );

        let eval = db.create_evaluation("s").await.unwrap();
        db.finish_evaluation(eval, EvaluationStatus::Succeeded, None)
            .await
            .unwrap();
        let failed_eval = db.create_evaluation("s").await.unwrap();
        db.finish_evaluation(failed_eval, EvaluationStatus::Failed, Some("no"))
            .await
            .unwrap();
        let builds: Vec<NewBuild> = ["a", "b", "c"]
            .map(|job| NewBuild {
                job: job.into(),
                drv_path: format!("/nix/store/00000000000000000000000000000000-{job}.drv"),
                system: "x86_64-linux".into(),
                outputs: BTreeMap::new(),
                required_features: vec![],
            })
            .into();
        let ids = db.insert_builds(eval, "s", 0, &builds, &[]).await.unwrap();
        db.set_build_statuses(&ids[..2], BuildStatus::Started, &StatusChange::default())
            .await
            .unwrap();
        db.set_build_status(ids[0], BuildStatus::Failed, &StatusChange::default())
            .await
            .unwrap();

        let counts = db.evaluation_counts().await.unwrap();
        assert_eq!(counts[&EvaluationStatus::Succeeded], 1);
        assert_eq!(counts[&EvaluationStatus::Failed], 1);
        // One build ended after running (within the second); one still runs.
        let histogram = db.build_duration_histogram(&[1, 10]).await.unwrap();
        assert_eq!(histogram.count, 1);
        assert_eq!(histogram.cumulative, [(1, 1), (10, 1)]);
        assert!(histogram.sum <= 1);
        let statuses = db.job_statuses(eval).await.unwrap();
        let got: Vec<(&str, BuildStatus)> = statuses
            .iter()
            .map(|s| (s.job.as_str(), s.status))
            .collect();
        assert_eq!(
            got,
            [
                ("a", BuildStatus::Failed),
                ("b", BuildStatus::Started),
                ("c", BuildStatus::Submitted)
            ]
        );
        assert_eq!(statuses[0].id, ids[0]);
    }

    #[tokio::test]
    async fn web_queries_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("ci.sqlite").to_str().unwrap())
            .await
            .unwrap();
        exercise(db).await;
    }

    #[tokio::test]
    async fn web_queries_on_postgres() {
        let cluster = TempPostgres::start().expect("a throwaway PostgreSQL cluster");
        let url = cluster.create_database("kiln_ci_web").unwrap();
        let db = Db::open(&url).await.unwrap();
        exercise(db.clone()).await;
        db.close().await;
    }
}
