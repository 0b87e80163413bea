//! kiln-ci from git to builds, through its command line, against SQLite and
//! PostgreSQL: a recipe set of 53 jobs (some failing, some depending on
//! failures, three fixed-output ones of which one has the wrong hash) in a
//! local git repository, registered as a specification;
//! one evaluation builds them all and the database and the API agree on
//! every status; a commit changing three jobs builds only those and their
//! dependents (earlier failures are cached); kiln-ci killed in the middle of its builds resumes them and
//! builds nothing twice.
//!
//! What really ran is told by the build logs the scheduler writes (one file
//! per derivation, written anew by each build): a job ran when its log
//! appeared or changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_ci::db::{BuildFilter, Db};
use kiln_ci::model::BuildStatus;
use kiln_ci::testing::TempPostgres;
use kiln_e2e::ci::{self, http_get, sh};
use kiln_e2e::workspace_bin;
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar::Node;

/// The recipe set: name → (inputs, fails, sleep seconds, variant); the
/// fixed-output jobs' recipe lines (`hash`, `hash-mode`) apart.
struct Jobs {
    jobs: BTreeMap<String, (Vec<String>, bool, u32, u32)>,
    fixed: BTreeMap<String, String>,
}

/// The hash `badfod` declares, which is not that of what it makes.
fn wrong_fod_hash() -> Hash {
    Hash::digest(HashAlgo::Sha256, "not what badfod makes\n")
}

/// What the fixed-output jobs write to `$out`.
fn fixed_content(name: &str) -> String {
    format!("{name}\n")
}

impl Jobs {
    fn new() -> Jobs {
        let mut jobs = BTreeMap::new();
        jobs.insert("base".to_owned(), (vec![], false, 0, 0));
        // 35 in chains of five hanging off base.
        for i in 0..35 {
            let input = if i % 5 == 0 {
                "base".to_owned()
            } else {
                format!("ok{:02}", i - 1)
            };
            jobs.insert(format!("ok{i:02}"), (vec![input], false, 0, 0));
        }
        for i in 0..5 {
            jobs.insert(format!("bad{i}"), (vec!["base".into()], true, 0, 0));
            jobs.insert(
                format!("needsbad{i}"),
                (vec![format!("bad{i}")], false, 0, 0),
            );
        }
        for i in 0..4 {
            jobs.insert(format!("leaf{i}"), (vec![], false, 0, 0));
        }
        // Fixed outputs: a flat one with an SRI hash, a recursive one with
        // a nixbase32 hash, and one whose hash is not that of what it makes
        // (named bad… so that it is tried again like the other failures).
        let mut fixed = BTreeMap::new();
        let flat = Hash::digest(HashAlgo::Sha256, fixed_content("fodflat"));
        fixed.insert(
            "fodflat".to_owned(),
            format!("hash = \"{}\"\nhash-mode = \"flat\"\n", flat.to_sri()),
        );
        let nar = Node::file(fixed_content("fodnar")).to_nar();
        let nar = Hash::digest(HashAlgo::Sha256, nar);
        fixed.insert(
            "fodnar".to_owned(),
            format!("hash = \"sha256:{}\"\n", nar.to_nixbase32()),
        );
        fixed.insert(
            "badfod".to_owned(),
            format!(
                "hash = \"{}\"\nhash-mode = \"flat\"\n",
                wrong_fod_hash().to_sri()
            ),
        );
        for name in fixed.keys() {
            jobs.insert(name.clone(), (vec![], name == "badfod", 0, 0));
        }
        assert_eq!(jobs.len(), 53);
        Jobs { jobs, fixed }
    }

    fn recipe(&self) -> String {
        let mut text = String::new();
        for (name, (inputs, fails, sleep, variant)) in &self.jobs {
            let fixed = self.fixed.get(name);
            let end = if fixed.is_some() {
                format!("echo {name} > $out")
            } else if *fails {
                "exit 1".to_owned()
            } else {
                format!("echo {name} {variant} > $out")
            };
            text.push_str(&format!(
                "[packages.{name}]\nbuilder = \"/bin/sh\"\n\
                 args = [\"-c\", \"echo building {name}; /bin/sleep {sleep}; {end}\"]\n\
                 inputs = {inputs:?}\n{}\n",
                fixed.map_or("", String::as_str)
            ));
        }
        text
    }

    /// The jobs that (transitively) depend on any of `names`, and `names`.
    fn with_dependents(&self, names: &[&str]) -> BTreeSet<String> {
        let mut set: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        loop {
            let before = set.len();
            for (name, (inputs, ..)) in &self.jobs {
                if inputs.iter().any(|i| set.contains(i)) {
                    set.insert(name.clone());
                }
            }
            if set.len() == before {
                return set;
            }
        }
    }

    fn expected_status(&self, name: &str) -> BuildStatus {
        if self.jobs[name].1 {
            BuildStatus::Failed
        } else if self
            .with_dependents(&["bad0", "bad1", "bad2", "bad3", "bad4"])
            .contains(name)
        {
            BuildStatus::FailedDependency
        } else {
            BuildStatus::Succeeded
        }
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    repo: PathBuf,
    config: PathBuf,
    db_url: String,
}

fn setup(db_url: Option<String>) -> Setup {
    ci::require_git();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    sh(&dir, "chmod 755 .");
    sh(
        &repo,
        "git init -q -b main . && git config user.email ci@test && git config user.name ci",
    );
    let db_url = db_url.unwrap_or_else(|| dir.join("ci.sqlite").to_string_lossy().into_owned());
    let config = dir.join("ci.conf");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{state}\"\nstore = \"{store}\"\ndb = \"{db_url}\"\nmax_jobs = 4\n\
             [settings]\nsandbox = \"true\"\nsandbox-paths = \"/bin /usr /lib /lib64?\"\n",
            state = dir.join("state").display(),
            store = dir.join("store").display(),
        ),
    )
    .unwrap();
    Setup {
        _tmp: tmp,
        dir,
        repo,
        config,
        db_url,
    }
}

impl Setup {
    fn kiln_ci(&self) -> Command {
        ci::kiln_ci(&self.config, &self.dir)
    }

    fn run(&self, args: &[&str]) -> String {
        ci::run(self.kiln_ci(), args)
    }

    fn commit(&self, jobs: &Jobs, message: &str) {
        std::fs::write(self.repo.join("ci.toml"), jobs.recipe()).unwrap();
        sh(
            &self.repo,
            &format!("git add ci.toml && git commit -qm '{message}'"),
        );
    }

    /// The build logs of the store: file name → modification time.
    fn logs(&self) -> BTreeMap<String, std::time::SystemTime> {
        let mut logs = BTreeMap::new();
        let root = self.dir.join("store/nix/var/log/nix/drvs");
        for entry in walk(&root) {
            let name = entry.file_name().unwrap().to_string_lossy().into_owned();
            let prefix = entry
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let modified = std::fs::metadata(&entry).unwrap().modified().unwrap();
            logs.insert(
                format!("{prefix}{}", name.trim_end_matches(".bz2")),
                modified,
            );
        }
        logs
    }

    async fn db(&self) -> Db {
        Db::open(&self.db_url).await.unwrap()
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The jobs of `evaluation` whose log is new or changed between two
/// snapshots of [`Setup::logs`].
async fn ran(
    db: &Db,
    evaluation: i64,
    before: &BTreeMap<String, std::time::SystemTime>,
    after: &BTreeMap<String, std::time::SystemTime>,
) -> BTreeSet<String> {
    let changed: BTreeSet<&String> = after
        .iter()
        .filter(|(name, time)| before.get(*name) != Some(time))
        .map(|(name, _)| name)
        .collect();
    db.builds_of_evaluation(evaluation)
        .await
        .unwrap()
        .into_iter()
        .filter(|b| {
            let base = b.drv_path.rsplit('/').next().unwrap().to_owned();
            changed.contains(&base)
        })
        .map(|b| b.job)
        .collect()
}

/// Checks the API of a running `kiln-ci serve` against the database.
async fn api_agrees_with_db(setup: &Setup, db: &Db, evaluation: i64) {
    let mut serve = setup
        .kiln_ci()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(serve.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "kiln-ci serve ended before listening");
        if let Some(rest) = line.trim().strip_prefix("kiln-ci: listening on http://") {
            break rest.to_owned();
        }
    };
    let body = http_get(
        &addr,
        &format!("/api/builds?evaluation={evaluation}&limit=1000"),
    );
    let _ = serve.kill();
    let _ = serve.wait();
    let api: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let from_api: BTreeMap<i64, String> = api
        .iter()
        .map(|b| {
            (
                b["id"].as_i64().unwrap(),
                b["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let from_db: BTreeMap<i64, String> = db
        .builds_of_evaluation(evaluation)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.id, b.status.as_str().to_owned()))
        .collect();
    assert_eq!(from_api, from_db, "the API and the database disagree");
}

async fn statuses(db: &Db, evaluation: i64) -> BTreeMap<String, BuildStatus> {
    db.list_builds(&BuildFilter {
        evaluation_id: Some(evaluation),
        ..BuildFilter::default()
    })
    .await
    .unwrap()
    .into_iter()
    .map(|b| (b.job, b.status))
    .collect()
}

/// The fixed-output job with the wrong hash failed, and what it says has
/// the hash it declared and the hash of what it made.
async fn fixed_output_mismatch_is_told(db: &Db) {
    let build = db
        .builds_of_evaluation(1)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.job == "badfod")
        .expect("badfod is a job");
    assert_eq!(build.status, BuildStatus::Failed);
    let told = build.error.clone().unwrap_or_default();
    let specified = wrong_fod_hash().to_sri();
    let got = Hash::digest(HashAlgo::Sha256, fixed_content("badfod")).to_sri();
    assert!(
        told.contains(&specified) && told.contains(&got),
        "badfod's failure does not give both hashes ({specified}, {got}): {build:?}"
    );
}

async fn acceptance(setup: Setup) {
    let mut jobs = Jobs::new();
    setup.commit(&jobs, "fifty jobs");
    let evaluator = workspace_bin("kiln-ci-bin", "kiln-ci");
    setup.run(&[
        "spec",
        "add",
        "main",
        "--input",
        &format!("src={}@branch:main", setup.repo.display()),
        "--",
        &evaluator.to_string_lossy(),
        "eval-recipe",
        "ci.toml",
    ]);
    assert!(setup.run(&["spec", "list"]).starts_with("main"));

    // One evaluation builds everything.
    let out = setup.run(&["eval", "main", "--build"]);
    assert!(out.contains("evaluation 1: succeeded"), "{out}");
    let db = setup.db().await;
    let first = statuses(&db, 1).await;
    assert_eq!(first.len(), 53);
    for (job, status) in &first {
        assert_eq!(*status, jobs.expected_status(job), "job {job}");
    }
    let logs1 = setup.logs();
    let ran1 = ran(&db, 1, &BTreeMap::new(), &logs1).await;
    assert_eq!(
        ran1.len(),
        48,
        "every job but the five after failures ran: {ran1:?}"
    );
    api_agrees_with_db(&setup, &db, 1).await;
    fixed_output_mismatch_is_told(&db).await;

    // Three jobs change: only they and their dependents are built. The
    // failed jobs are not tried again (Hydra's cached failures): their
    // builds fail at once, pointing to those of the first evaluation.
    for name in ["ok07", "ok21", "leaf2"] {
        jobs.jobs.get_mut(name).unwrap().3 = 1;
    }
    setup.commit(&jobs, "change three jobs");
    let out = setup.run(&["eval", "main", "--build"]);
    assert!(out.contains("evaluation 2: succeeded"), "{out}");
    let second = statuses(&db, 2).await;
    for (job, status) in &second {
        assert_eq!(*status, jobs.expected_status(job), "job {job}");
    }
    let expected: BTreeSet<String> = jobs.with_dependents(&["ok07", "ok21", "leaf2"]);
    let logs2 = setup.logs();
    let ran2: BTreeSet<String> = ran(&db, 2, &logs1, &logs2).await;
    assert_eq!(
        ran2, expected,
        "only the changed jobs and their dependents ran"
    );
    let first_ids: BTreeMap<String, i64> = db
        .builds_of_evaluation(1)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.job, b.id))
        .collect();
    for build in db.builds_of_evaluation(2).await.unwrap() {
        if build.status == BuildStatus::Failed {
            assert_eq!(
                build.cached_failure_of,
                Some(first_ids[&build.job]),
                "{build:?}"
            );
        }
    }
    // ok07 with ok08-09, ok21 with ok22-24, leaf2.
    assert_eq!(expected.len(), 8, "{expected:?}");
    api_agrees_with_db(&setup, &db, 2).await;

    // Killed in the middle of a chain of slow builds, kiln-ci resumes them
    // after a restart and builds nothing twice.
    for i in 10..15 {
        let job = jobs.jobs.get_mut(&format!("ok{i}")).unwrap();
        job.2 = 1;
        job.3 = 2;
    }
    setup.commit(&jobs, "slow chain");
    let mut child = setup
        .kiln_ci()
        .args(["eval", "main", "--build"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Killed with ok12 building, after ok11 finished.
        let now = statuses(&db, 3).await;
        if now.get("ok11") == Some(&BuildStatus::Succeeded)
            && now.get("ok12") == Some(&BuildStatus::Started)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the slow chain never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let started_builds = db
        .list_builds(&BuildFilter {
            evaluation_id: Some(3),
            status: Some(BuildStatus::Started),
            ..BuildFilter::default()
        })
        .await
        .unwrap();
    assert!(
        !started_builds.is_empty(),
        "kiln-ci was killed with builds started"
    );
    // A builder of the killed process may still be finishing.
    std::thread::sleep(Duration::from_secs(2));
    let at_kill = setup.logs();
    let done_at_kill: BTreeSet<String> = statuses(&db, 3)
        .await
        .into_iter()
        .filter(|(_, status)| *status == BuildStatus::Succeeded)
        .map(|(job, _)| job)
        .collect();
    setup.run(&["resume"]);
    let third = statuses(&db, 3).await;
    for (job, status) in &third {
        assert_eq!(*status, jobs.expected_status(job), "job {job}");
    }
    // What had finished before the kill did not run again; what was
    // interrupted or waiting ran after the restart.
    let after = setup.logs();
    let ran3 = ran(&db, 3, &at_kill, &after).await;
    let again: Vec<&String> = ran3.intersection(&done_at_kill).collect();
    assert!(again.is_empty(), "built twice: {again:?}");
    for i in 10..15 {
        let job = format!("ok{i}");
        assert!(
            done_at_kill.contains(&job) || ran3.contains(&job),
            "{job} was never built (ran after the restart: {ran3:?})"
        );
    }
    assert!(
        ran3.len() >= 2,
        "the restart built the rest of the chain: {ran3:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ci_acceptance_sqlite() {
    acceptance(setup(None)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ci_acceptance_postgres() {
    let cluster = TempPostgres::start().expect(
        "a throwaway PostgreSQL cluster (Debian's postgresql package, /usr/lib/postgresql/15/bin)",
    );
    let url = cluster.create_database("kiln_ci_acceptance").unwrap();
    acceptance(setup(Some(url))).await;
    drop(cluster);
}
