//! What changed between an evaluation and the previous one of the same
//! specification, job by job: new failures, fixed jobs, jobs still failing.

use std::collections::HashMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::db::JobStatus;
use crate::model::{Build, BuildStatus};

/// One job whose verdict is part of the diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct JobChange {
    pub job: String,
    /// The build in this evaluation.
    pub build: i64,
    pub status: BuildStatus,
    /// The same job's build in the previous evaluation, if it had the job.
    pub previous_build: Option<i64>,
    pub previous_status: Option<BuildStatus>,
}

/// The diff of an evaluation to the one before it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct EvaluationDiff {
    /// The previous (succeeded) evaluation of the specification, if any.
    pub previous_evaluation: Option<i64>,
    /// Failed now; succeeded before, or the job is new.
    pub new_failures: Vec<JobChange>,
    /// Succeeded now, failed before.
    pub fixed: Vec<JobChange>,
    /// Failed now and before.
    pub still_failing: Vec<JobChange>,
}

/// Whether a build passed, failed, or has no verdict yet (still waiting or
/// running, or canceled by people — which says nothing about the job).
fn verdict(status: BuildStatus) -> Option<bool> {
    match status {
        BuildStatus::Succeeded => Some(true),
        BuildStatus::Canceled => None,
        status if status.is_failure() => Some(false),
        _ => None,
    }
}

impl EvaluationDiff {
    /// Compares `current`'s builds with `previous`'s (evaluation id and
    /// its builds' statuses), matching builds by job name. Builds without a
    /// verdict on either side are left out.
    pub fn between(current: &[Build], previous: Option<(i64, &[JobStatus])>) -> EvaluationDiff {
        let mut diff = EvaluationDiff {
            previous_evaluation: previous.map(|(id, _)| id),
            ..EvaluationDiff::default()
        };
        let before: HashMap<&str, &JobStatus> = previous
            .map(|(_, builds)| builds.iter().map(|b| (b.job.as_str(), b)).collect())
            .unwrap_or_default();
        for build in current {
            let Some(passed) = verdict(build.status) else {
                continue;
            };
            let old = before.get(build.job.as_str()).copied();
            let change = JobChange {
                job: build.job.clone(),
                build: build.id,
                status: build.status,
                previous_build: old.map(|b| b.id),
                previous_status: old.map(|b| b.status),
            };
            match (passed, old.and_then(|b| verdict(b.status))) {
                (false, Some(false)) => diff.still_failing.push(change),
                (false, _) => diff.new_failures.push(change),
                (true, Some(false)) => diff.fixed.push(change),
                (true, _) => {}
            }
        }
        for list in [
            &mut diff.new_failures,
            &mut diff.fixed,
            &mut diff.still_failing,
        ] {
            list.sort_by(|a, b| a.job.cmp(&b.job));
        }
        diff
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn build(id: i64, job: &str, status: BuildStatus) -> Build {
        Build {
            id,
            evaluation_id: 0,
            specification: "s".into(),
            job: job.into(),
            drv_path: format!("/nix/store/{id}-{job}.drv"),
            system: "x86_64-linux".into(),
            outputs: BTreeMap::new(),
            status,
            priority: 0,
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
    fn sorts_jobs_into_new_fixed_and_still_failing() {
        use BuildStatus::*;
        let before = [
            (1, "a", Succeeded),
            (2, "b", Failed),
            (3, "c", Failed),
            (4, "d", FailedDependency),
            (5, "e", Started),
        ]
        .map(|(id, job, status)| JobStatus {
            id,
            job: job.into(),
            status,
        });
        let now = [
            build(11, "a", Failed),
            build(12, "b", Succeeded),
            build(13, "c", TimedOut),
            build(14, "d", Scheduled),
            build(15, "e", Failed),
            build(16, "new", FailedOther),
            build(17, "ok", Succeeded),
            build(18, "gone", Canceled),
        ];
        let diff = EvaluationDiff::between(&now, Some((7, &before)));
        let jobs = |list: &[JobChange]| list.iter().map(|c| c.job.clone()).collect::<Vec<_>>();
        assert_eq!(diff.previous_evaluation, Some(7));
        assert_eq!(jobs(&diff.new_failures), ["a", "e", "new"]);
        assert_eq!(jobs(&diff.fixed), ["b"]);
        assert_eq!(jobs(&diff.still_failing), ["c"]);
        assert_eq!(diff.fixed[0].previous_build, Some(2));
        assert_eq!(diff.new_failures[2].previous_status, None);
    }

    #[test]
    fn first_evaluation_has_only_new_failures() {
        let now = [
            build(1, "a", BuildStatus::Failed),
            build(2, "b", BuildStatus::Succeeded),
        ];
        let diff = EvaluationDiff::between(&now, None);
        assert_eq!(diff.previous_evaluation, None);
        assert_eq!(diff.new_failures.len(), 1);
        assert!(diff.fixed.is_empty() && diff.still_failing.is_empty());
    }
}
