//! kiln-ci dispatching to a store daemon over its socket
//! (`--store-daemon`): a real `store-daemon` serving the coordinator's
//! store builds a small git specification — jobs that succeed, fail, time
//! out, outgrow the log limit, and one that depends on a failure — and the
//! database gets every status (with the daemon as machine and the log's
//! tail in failures), the log pages read the logs; the daemon killed in
//! the middle of a batch, the batch's builds are put back and built once
//! it is back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_ci::db::{BuildFilter, Db};
use kiln_ci::model::{Build, BuildStatus};
use kiln_e2e::ci::{self, http_get, sh};
use kiln_e2e::farm::{Farm, Kind};
use kiln_e2e::workspace_bin;

/// A `store-daemon` on `root`, listening on `socket`; started again on the
/// same store after a kill, as a service manager would.
struct Daemon {
    root: PathBuf,
    socket: PathBuf,
    conf: PathBuf,
    /// Further `--option NAME VALUE`s and environment.
    options: Vec<(String, String)>,
    env: Vec<(String, PathBuf)>,
    child: Option<Child>,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, dir.join("store"), Vec::new(), Vec::new())
    }

    fn start_with(
        dir: &Path,
        root: PathBuf,
        options: Vec<(String, String)>,
        env: Vec<(String, PathBuf)>,
    ) -> Daemon {
        let conf = dir.join("daemon-conf");
        std::fs::create_dir_all(&conf).unwrap();
        let mut daemon = Daemon {
            root,
            socket: dir.join("daemon.socket"),
            conf,
            options,
            env,
            child: None,
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let mut child = Command::new(workspace_bin("store-daemon", "store-daemon"))
            .arg("--store")
            .arg(format!("local?root={}", self.root.display()))
            .arg("--socket")
            .arg(&self.socket)
            .args(["--option", "sandbox", "true"])
            .args(["--option", "sandbox-paths", "/bin /usr /lib /lib64?"])
            .args(
                self.options
                    .iter()
                    .flat_map(|(name, value)| ["--option", name, value]),
            )
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .env("NIX_CONF_DIR", &self.conf)
            .env("KILN_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start store-daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("store-daemon exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "store-daemon did not listen on {} within 30 s",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// SIGKILL: the daemon dies with its connections, as in a crash.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&self.root)
            .status();
    }
}

/// The recipe: name → (builder script, inputs).
fn recipe(jobs: &BTreeMap<&str, (String, Vec<&str>)>) -> String {
    let mut text = String::new();
    for (name, (script, inputs)) in jobs {
        text.push_str(&format!(
            "[packages.{name}]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", {script:?}]\ninputs = {inputs:?}\n\n"
        ));
    }
    text
}

fn first_jobs() -> BTreeMap<&'static str, (String, Vec<&'static str>)> {
    BTreeMap::from([
        (
            "good",
            ("echo good-marker; echo good > $out".to_owned(), vec![]),
        ),
        (
            "after-good",
            ("/bin/cat ${good} > $out; echo after >> $out".to_owned(), vec!["good"]),
        ),
        (
            "bad",
            (
                "echo bad-marker-one; echo bad-marker-two >&2; exit 1".to_owned(),
                vec![],
            ),
        ),
        (
            "needs-bad",
            ("echo never > $out".to_owned(), vec!["bad"]),
        ),
        (
            "hangs",
            ("echo hanging; /bin/sleep 60; echo late > $out".to_owned(), vec![]),
        ),
        (
            "chatty",
            (
                "i=0; while [ $i -lt 400 ]; do echo chatty-line-$i-padding-padding-padding; i=$((i+1)); done; echo x > $out"
                    .to_owned(),
                vec![],
            ),
        ),
    ])
}

/// Fields drop in order: the daemon (which makes its store removable)
/// before the temporary directory.
struct Setup {
    daemon: Daemon,
    dir: PathBuf,
    repo: PathBuf,
    config: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(tmp.path());
        Setup::with_daemon(tmp, daemon)
    }

    fn with_daemon(tmp: tempfile::TempDir, daemon: Daemon) -> Setup {
        ci::require_git();
        let dir = tmp.path().to_owned();
        sh(&dir, "chmod 755 .");
        let repo = dir.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        sh(
            &repo,
            "git init -q -b main . && git config user.email ci@test && git config user.name ci",
        );
        let setup = Setup {
            config: dir.join("ci.conf"),
            dir,
            repo,
            _tmp: tmp,
            daemon,
        };
        setup.configure("timeout = \"4\"\nmax-build-log-size = \"4000\"\n");
        setup
    }

    /// Writes kiln-ci's configuration: the daemon's socket, and `settings`
    /// (sent to the daemon with each batch).
    fn configure(&self, settings: &str) {
        std::fs::write(
            &self.config,
            format!(
                "state_dir = \"{state}\"\nstore = \"{store}\"\ndb = \"{db}\"\n\
                 store_daemon = \"unix://{socket}\"\nmax_jobs = 4\nretry_backoff_secs = 1\n\
                 [settings]\n{settings}",
                state = self.dir.join("state").display(),
                store = self.daemon.root.display(),
                db = self.db_path().display(),
                socket = self.daemon.socket.display(),
            ),
        )
        .unwrap();
    }

    fn db_path(&self) -> PathBuf {
        self.dir.join("ci.sqlite")
    }

    fn kiln_ci(&self) -> Command {
        ci::kiln_ci(&self.config, &self.dir)
    }

    fn run(&self, args: &[&str]) -> String {
        ci::run(self.kiln_ci(), args)
    }

    fn commit(&self, jobs: &BTreeMap<&str, (String, Vec<&str>)>, message: &str) {
        std::fs::write(self.repo.join("ci.toml"), recipe(jobs)).unwrap();
        sh(
            &self.repo,
            &format!("git add ci.toml && git commit -qm '{message}'"),
        );
    }

    /// The specification `main`: the repository's `ci.toml`, evaluated by
    /// kiln-ci's recipe evaluator.
    fn add_spec(&self) {
        let evaluator = workspace_bin("kiln-ci-bin", "kiln-ci");
        self.run(&[
            "spec",
            "add",
            "main",
            "--input",
            &format!("src={}@branch:main", self.repo.display()),
            "--",
            &evaluator.to_string_lossy(),
            "eval-recipe",
            "ci.toml",
        ]);
    }

    async fn db(&self) -> Db {
        Db::open(&self.db_path().to_string_lossy()).await.unwrap()
    }
}

async fn builds(db: &Db, evaluation: i64) -> BTreeMap<String, Build> {
    db.list_builds(&BuildFilter {
        evaluation_id: Some(evaluation),
        ..BuildFilter::default()
    })
    .await
    .unwrap()
    .into_iter()
    .map(|b| (b.job.clone(), b))
    .collect()
}

/// The logs of `ids` as `kiln-ci serve`'s API gives them.
fn logs_through_the_api(setup: &Setup, ids: &[i64]) -> Vec<String> {
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
    let logs = ids
        .iter()
        .map(|id| http_get(&addr, &format!("/api/builds/{id}/log")))
        .collect();
    let _ = serve.kill();
    let _ = serve.wait();
    logs
}

#[tokio::test(flavor = "multi_thread")]
async fn ci_builds_through_a_store_daemon_and_survives_its_crash() {
    let mut setup = Setup::new();
    setup.commit(&first_jobs(), "six jobs");
    setup.add_spec();

    // One evaluation, built by the daemon.
    let out = setup.run(&["eval", "main", "--build"]);
    assert!(out.contains("evaluation 1: succeeded"), "{out}");
    let db = setup.db().await;
    let first = builds(&db, 1).await;
    let status = |job: &str| first[job].status;
    assert_eq!(status("good"), BuildStatus::Succeeded);
    assert_eq!(status("after-good"), BuildStatus::Succeeded);
    assert_eq!(status("bad"), BuildStatus::Failed);
    assert_eq!(status("needs-bad"), BuildStatus::FailedDependency);
    assert_eq!(
        status("hangs"),
        BuildStatus::TimedOut,
        "{:?}",
        first["hangs"]
    );
    assert_eq!(
        status("chatty"),
        BuildStatus::LogLimit,
        "{:?}",
        first["chatty"]
    );
    let machine = format!("unix://{}", setup.daemon.socket.display());
    for job in ["good", "bad", "hangs"] {
        assert_eq!(
            first[job].machine.as_deref(),
            Some(machine.as_str()),
            "{job} names the daemon as its machine"
        );
    }
    // The outputs are the daemon's, in the store kiln-ci shares with it.
    let good_out = &first["good"].outputs["out"];
    let content =
        std::fs::read_to_string(setup.daemon.root.join(good_out.trim_start_matches('/'))).unwrap();
    assert_eq!(content, "good\n");
    let bad = &first["bad"];
    let error = bad.error.clone().unwrap_or_default();
    assert!(
        error.contains("exit code 1") && error.contains("bad-marker-two"),
        "a failure says why, with its log's tail: {error}"
    );
    assert!(bad.log_path.is_some(), "the failure keeps its log: {bad:?}");

    // The log pages read the daemon's logs.
    let logs = logs_through_the_api(&setup, &[first["good"].id, bad.id]);
    assert!(logs[0].contains("good-marker"), "good's log: {}", logs[0]);
    assert!(
        logs[1].contains("bad-marker-one") && logs[1].contains("bad-marker-two"),
        "bad's log: {}",
        logs[1]
    );

    // The daemon killed mid-batch: the batch's builds go back, and are
    // built once the daemon is back.
    setup.configure("");
    let mut jobs = first_jobs();
    jobs.insert(
        "slow-a",
        (
            "echo slow-a; /bin/sleep 3; echo a > $out".to_owned(),
            vec![],
        ),
    );
    jobs.insert(
        "slow-b",
        (
            "echo slow-b; /bin/sleep 3; echo b > $out".to_owned(),
            vec![],
        ),
    );
    jobs.remove("hangs");
    jobs.remove("chatty");
    setup.commit(&jobs, "two slow jobs");
    let child_log = setup.dir.join("kiln-ci.stderr");
    let mut child = setup
        .kiln_ci()
        .args(["eval", "main", "--build"])
        .stderr(std::fs::File::create(&child_log).unwrap())
        .spawn()
        .unwrap();
    let said = || std::fs::read_to_string(&child_log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = builds(&db, 2).await;
        if ["slow-a", "slow-b"].iter().all(|j| {
            now.get(*j)
                .is_some_and(|b| b.status == BuildStatus::Started)
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow builds never started: {now:?}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "kiln-ci ended before the slow builds started:\n{}",
            said()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the builders run a while, then kill the daemon under them.
    std::thread::sleep(Duration::from_millis(1500));
    setup.daemon.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    let put_back = loop {
        let now = builds(&db, 2).await;
        let back: Vec<&Build> = ["slow-a", "slow-b"]
            .iter()
            .map(|j| &now[*j])
            .filter(|b| b.status == BuildStatus::Scheduled)
            .collect();
        if back.len() == 2 {
            break back.into_iter().cloned().collect::<Vec<_>>();
        }
        assert!(
            Instant::now() < deadline,
            "the slow builds were not put back after the daemon died: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for build in &put_back {
        let error = build.error.clone().unwrap_or_default();
        assert!(
            error.contains(&setup.daemon.socket.display().to_string()),
            "the retry says the daemon was lost: {error}"
        );
    }
    // kiln-ci waits for the daemon instead of failing the builds.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "kiln-ci gave up while the daemon was away: {:?}\n{}",
        builds(&db, 2).await,
        said()
    );
    let waiting = builds(&db, 2).await;
    for job in ["slow-a", "slow-b"] {
        assert!(
            !waiting[job].status.is_failure(),
            "{job} failed while the daemon was away: {:?}",
            waiting[job]
        );
    }
    setup.daemon.spawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kiln-ci did not finish after the daemon came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "kiln-ci eval --build: {exit}\n{}", said());
    let second = builds(&db, 2).await;
    for job in ["slow-a", "slow-b", "good", "after-good"] {
        assert_eq!(
            second[job].status,
            BuildStatus::Succeeded,
            "{:?}",
            second[job]
        );
    }
    for job in ["slow-a", "slow-b"] {
        assert!(
            second[job].attempts >= 2,
            "{job} was built again after the crash: {:?}",
            second[job]
        );
        let out = &second[job].outputs["out"];
        let content =
            std::fs::read_to_string(setup.daemon.root.join(out.trim_start_matches('/'))).unwrap();
        assert_eq!(content, format!("{}\n", &job[5..]));
    }
    assert_eq!(second["needs-bad"].status, BuildStatus::FailedDependency);
}

/// The whole chain a build farm runs: kiln-ci dispatches to the daemon,
/// whose scheduler offers every build to `offload-hook`, which builds it
/// on a machine over real ssh and copies the outputs back. With
/// `max-jobs = 0` nothing may be built on the daemon's own machine.
#[tokio::test(flavor = "multi_thread")]
async fn ci_builds_through_the_daemons_offload_hook_on_a_remote_machine() {
    let mut farm = Farm::new();
    // One slot: the machine builds one at a time.
    farm.add(Kind::Kiln, 1, 1);
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(
        tmp.path(),
        farm.local_root(),
        vec![
            (
                "build-hook".into(),
                workspace_bin("offload-hook", "offload-hook")
                    .display()
                    .to_string(),
            ),
            (
                "builders".into(),
                format!("@{}", farm.machines_file().display()),
            ),
        ],
        vec![("KILN_OFFLOAD_SSH_DIR".into(), farm.ssh_dir())],
    );
    let setup = Setup::with_daemon(tmp, daemon);
    setup.configure("max-jobs = \"0\"\n");
    let mut jobs = first_jobs();
    jobs.remove("hangs");
    jobs.remove("chatty");
    for name in ["slow-a", "slow-b"] {
        jobs.insert(name, (format!("/bin/sleep 2; echo {name} > $out"), vec![]));
    }
    setup.commit(&jobs, "six jobs, two slow");
    setup.add_spec();

    let out = setup.run(&["eval", "main", "--build"]);
    assert!(out.contains("evaluation 1: succeeded"), "{out}");
    let db = setup.db().await;
    let built = builds(&db, 1).await;
    let status = |job: &str| built[job].status;
    assert_eq!(
        status("good"),
        BuildStatus::Succeeded,
        "{:?}",
        built["good"]
    );
    assert_eq!(status("after-good"), BuildStatus::Succeeded);
    assert_eq!(status("bad"), BuildStatus::Failed);
    assert_eq!(status("needs-bad"), BuildStatus::FailedDependency);

    // Each build started when the machine began it, not when kiln-ci sent
    // the batch: the slow ones, sent together, ran one after the other.
    let (a, b) = (&built["slow-a"], &built["slow-b"]);
    assert_eq!(
        (a.status, b.status),
        (BuildStatus::Succeeded, BuildStatus::Succeeded)
    );
    let span = |b: &Build| (b.started_at.unwrap(), b.stopped_at.unwrap());
    let ((a_start, a_stop), (b_start, b_stop)) = (span(a), span(b));
    assert!(
        a_stop <= b_start || b_stop <= a_start,
        "one machine slot, yet the slow builds overlap: {a:?} {b:?}"
    );
    // Built on the machine, not here: the hook's choices say so, and the
    // outputs are in both stores.
    let choices = farm.choices();
    let machine = farm.machines[0].uri().to_owned();
    for job in ["good", "after-good", "bad", "slow-a"] {
        let drv = &built[job].drv_path;
        assert!(
            choices
                .lines()
                .any(|l| l.contains(drv.as_str()) && l.contains(&machine)),
            "{job} ({drv}) was not sent to {machine}:\n{choices}"
        );
    }
    for job in ["good", "after-good"] {
        let out = built[job].outputs["out"].trim_start_matches('/');
        let here = std::fs::read_to_string(setup.daemon.root.join(out)).unwrap();
        let there = std::fs::read_to_string(farm.machines[0].root().join(out)).unwrap();
        assert_eq!(here, there, "{job}");
    }
    assert_eq!(
        std::fs::read_to_string(
            setup
                .daemon
                .root
                .join(built["after-good"].outputs["out"].trim_start_matches('/'))
        )
        .unwrap(),
        "good\nafter\n"
    );
    // The remote failure reaches kiln-ci with its log.
    let error = built["bad"].error.clone().unwrap_or_default();
    assert!(
        error.contains("bad-marker-two"),
        "the remote failure keeps its log's tail: {error}"
    );
    let logs = logs_through_the_api(&setup, &[built["bad"].id]);
    assert!(logs[0].contains("bad-marker-one"), "bad's log: {}", logs[0]);
    drop(setup);
    farm.verify_everywhere();
}
