//! The CI's vocabulary: specifications, their inputs, evaluations, builds
//! and agents, as stored in the database and shown by the API. Pure types:
//! no I/O here. Time stamps are unix seconds (`i64`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Which revision of a git repository an input follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GitRef {
    /// The tip of a branch, fetched anew for each evaluation.
    Branch(String),
    /// A tag.
    Tag(String),
    /// A fixed commit (hex).
    Commit(String),
}

impl GitRef {
    /// What `git fetch` is asked for.
    pub fn refspec(&self) -> String {
        match self {
            GitRef::Branch(b) => format!("refs/heads/{b}"),
            GitRef::Tag(t) => format!("refs/tags/{t}"),
            GitRef::Commit(c) => c.clone(),
        }
    }
}

impl fmt::Display for GitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitRef::Branch(b) => write!(f, "branch {b}"),
            GitRef::Tag(t) => write!(f, "tag {t}"),
            GitRef::Commit(c) => write!(f, "commit {c}"),
        }
    }
}

/// One input of a specification: a git repository at a branch, tag or commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Input {
    /// Name of the input; the evaluator sees its checkout under this name.
    pub name: String,
    /// Repository URL (anything `git fetch` takes: path, file://, https://, ssh).
    pub url: String,
    #[serde(rename = "ref")]
    pub reference: GitRef,
}

/// Which jobs of an evaluation become builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
#[serde(rename_all = "lowercase", tag = "kind", content = "jobs")]
pub enum BuildTargets {
    #[default]
    All,
    /// Only the jobs with these attribute names.
    Jobs(Vec<String>),
}

impl BuildTargets {
    pub fn wants(&self, job: &str) -> bool {
        match self {
            BuildTargets::All => true,
            BuildTargets::Jobs(jobs) => jobs.iter().any(|j| j == job),
        }
    }
}

/// What to build and how: the inputs, the evaluator and what to do with its jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Specification {
    /// Unique name, also the key in URLs.
    pub name: String,
    pub inputs: Vec<Input>,
    /// The input whose checkout the evaluator runs in (its working directory).
    pub eval_input: String,
    /// The evaluator command and its arguments. It runs in the checkout of
    /// `eval_input` with `KILN_CI_INPUT_<NAME>` set to each input's checkout,
    /// and prints jobs as JSON lines in the format of nix-eval-jobs.
    pub evaluator: Vec<String>,
    /// Systems whose jobs are built; empty means all.
    #[serde(default)]
    pub systems: Vec<String>,
    /// 0 (lowest) to 9 (highest).
    #[serde(default)]
    pub priority: u8,
    /// Seconds between automatic evaluations; 0 for on demand only.
    #[serde(default)]
    pub period_secs: i64,
    #[serde(default)]
    pub build_targets: BuildTargets,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub updated_at: i64,
}

fn yes() -> bool {
    true
}

impl Specification {
    /// A specification with the defaults of `kiln-ci spec add`: evaluated in
    /// its first input, all systems and jobs, priority 0, on demand only,
    /// enabled. The time stamps are set by the database.
    pub fn new(name: impl Into<String>, inputs: Vec<Input>, evaluator: Vec<String>) -> Self {
        Specification {
            name: name.into(),
            eval_input: inputs.first().map(|i| i.name.clone()).unwrap_or_default(),
            inputs,
            evaluator,
            systems: Vec::new(),
            priority: 0,
            period_secs: 0,
            build_targets: BuildTargets::All,
            enabled: true,
            created_at: 0,
            updated_at: 0,
        }
    }
}

impl Input {
    /// Input `name`: the repository at `url`, on `branch`.
    pub fn branch(
        name: impl Into<String>,
        url: impl Into<String>,
        branch: impl Into<String>,
    ) -> Self {
        Input {
            name: name.into(),
            url: url.into(),
            reference: GitRef::Branch(branch.into()),
        }
    }
}

/// How far an evaluation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EvaluationStatus {
    /// Fetching inputs or running the evaluator.
    Started,
    /// Jobs registered as builds.
    Succeeded,
    /// Fetching or the evaluator failed; see the error and the log.
    Failed,
    /// Stopped by a restart of the coordinator or by people.
    Aborted,
}

/// The revision an input had in one evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Checkout {
    pub input: String,
    pub url: String,
    pub commit: String,
}

/// One run of a specification's evaluator over fetched inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Evaluation {
    pub id: i64,
    pub specification: String,
    pub status: EvaluationStatus,
    pub checkouts: Vec<Checkout>,
    pub created_at: i64,
    /// When the evaluator finished.
    pub evaluated_at: Option<i64>,
    /// When its last build ended.
    pub finished_at: Option<i64>,
    /// zstd-compressed log of fetching and the evaluator's stderr.
    pub log_path: Option<String>,
    pub error: Option<String>,
}

/// An attribute the evaluator could not evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvaluationError {
    pub evaluation_id: i64,
    pub attr: String,
    pub error: String,
}

/// Cuirass's build statuses, plus timed-out and log-limit.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum BuildStatus {
    /// Registered; waiting for its dependencies.
    Submitted,
    /// Ready to be dispatched (its dependencies succeeded).
    Scheduled,
    /// Handed to a builder.
    Started,
    Succeeded,
    Failed,
    /// A build it depends on did not succeed.
    FailedDependency,
    /// Could not be attempted: no machine for its system, a store error…
    FailedOther,
    Canceled,
    TimedOut,
    /// Its log outgrew the limit.
    LogLimit,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 10] = [
        BuildStatus::Submitted,
        BuildStatus::Scheduled,
        BuildStatus::Started,
        BuildStatus::Succeeded,
        BuildStatus::Failed,
        BuildStatus::FailedDependency,
        BuildStatus::FailedOther,
        BuildStatus::Canceled,
        BuildStatus::TimedOut,
        BuildStatus::LogLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Submitted => "submitted",
            BuildStatus::Scheduled => "scheduled",
            BuildStatus::Started => "started",
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::FailedDependency => "failed-dependency",
            BuildStatus::FailedOther => "failed-other",
            BuildStatus::Canceled => "canceled",
            BuildStatus::TimedOut => "timed-out",
            BuildStatus::LogLimit => "log-limit",
        }
    }

    /// Whether the build is over (nothing more will happen without a restart).
    pub fn is_finished(self) -> bool {
        !matches!(
            self,
            BuildStatus::Submitted | BuildStatus::Scheduled | BuildStatus::Started
        )
    }

    /// Whether the build ended in something other than success.
    pub fn is_failure(self) -> bool {
        self.is_finished() && self != BuildStatus::Succeeded
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a build status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a build status (expected one of submitted, scheduled, started, succeeded, failed, failed-dependency, failed-other, canceled, timed-out, log-limit)"
)]
pub struct UnknownStatus(pub String);

impl FromStr for BuildStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BuildStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

impl EvaluationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EvaluationStatus::Started => "started",
            EvaluationStatus::Succeeded => "succeeded",
            EvaluationStatus::Failed => "failed",
            EvaluationStatus::Aborted => "aborted",
        }
    }
}

impl FromStr for EvaluationStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            EvaluationStatus::Started,
            EvaluationStatus::Succeeded,
            EvaluationStatus::Failed,
            EvaluationStatus::Aborted,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
        .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// One job of one evaluation, to be realised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Build {
    pub id: i64,
    pub evaluation_id: i64,
    pub specification: String,
    /// The job's attribute name.
    pub job: String,
    pub drv_path: String,
    pub system: String,
    /// Output name → store path.
    pub outputs: BTreeMap<String, String>,
    pub status: BuildStatus,
    /// The specification's priority when the build was registered.
    pub priority: i64,
    /// `requiredSystemFeatures` of the derivation (e.g. `kvm`, `vm`).
    pub required_features: Vec<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub stopped_at: Option<i64>,
    /// Where it was built (`local`, a daemon socket, an agent's name).
    pub machine: Option<String>,
    /// Where its log is kept (a file path), if it has one.
    pub log_path: Option<String>,
    /// How many times it was attempted.
    pub attempts: i64,
    /// Not to be dispatched before this time (back-off after a transient failure).
    pub retry_after: Option<i64>,
    /// Why it failed, for people.
    pub error: Option<String>,
    /// A cached failure: the earlier build of the same derivation that
    /// failed permanently, which this one repeats without building.
    #[serde(default)]
    pub cached_failure_of: Option<i64>,
}

/// A job as a new evaluation registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewBuild {
    pub job: String,
    pub drv_path: String,
    pub system: String,
    pub outputs: BTreeMap<String, String>,
    pub required_features: Vec<String>,
}

/// A build agent the controller knows (and whose key it trusts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Agent {
    pub name: String,
    /// Nix-style public key `name:base64`.
    pub public_key: String,
    /// The machines it offered last (names), e.g. `x86_64-linux-vm`.
    #[serde(default)]
    pub machines: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub registered_at: i64,
    pub last_seen: Option<i64>,
}

/// A task handed to a build agent and not answered yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSession {
    /// The session id the agent's requests name.
    pub session: String,
    pub build_id: i64,
    /// The agent that took the task.
    pub agent: String,
    /// Its key (`name:base64`) when it took the task; the result must be signed with it.
    pub public_key: String,
    pub challenge: String,
    /// Where the task's inputs and the agent's uploads are kept.
    pub dir: String,
    /// Unix seconds.
    pub handed_out: i64,
}

/// Builds per status.
pub type StatusCounts = BTreeMap<BuildStatus, i64>;
