//! kiln-ci's web pages in a real browser: Debian's Chromium, headless, loads
//! an evaluation's page and a failed build's page and hands back the DOM
//! after its scripts ran, and follows a running build's log as the
//! coordinator appends to it.
//!
//! The server is kiln-ci's router over a SQLite database filled through the
//! Db API, served on a loopback port for the duration of the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_ci::db::{Db, StatusChange};
use kiln_ci::model::{BuildStatus, Checkout, EvaluationStatus, Input, NewBuild, Specification};
use kiln_ci::web::{AppState, LiveLogs, router};

/// Debian's Chromium; a test that needs it fails without it.
fn chromium() -> PathBuf {
    let candidates = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];
    if let Some(found) = candidates.iter().map(PathBuf::from).find(|p| p.exists()) {
        return found;
    }
    panic!(
        "Chromium is not installed (looked for {}): the CI web tests render the pages in it. \
         Install it with `cargo xtask setup` or `apt-get install chromium`.",
        candidates.join(", ")
    );
}

/// The page at `url` as Chromium's DOM after its scripts ran. Virtual time
/// (which stands still while a request is pending) runs for `budget_ms`, so
/// timers fire at once and long polls are waited for.
fn dump_dom(url: &str, budget_ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
    // Read both pipes on threads so a chatty stderr cannot block it.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish loading {url} within 90 s; its stderr:\n{}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = out.join().unwrap().unwrap();
    let stderr = err.join().unwrap();
    assert!(
        status.success(),
        "chromium failed on {url} ({status}):\n{stderr}"
    );
    assert!(
        dom.contains("</html>"),
        "chromium printed no page for {url}:\n{stderr}"
    );
    dom
}

/// The value of attribute `name` in the first tag (after `from`) that has it.
fn attribute<'a>(html: &'a str, from: usize, name: &str) -> Option<(&'a str, usize)> {
    let key = format!("{name}=\"");
    let start = html[from..].find(&key)? + from + key.len();
    let end = html[start..].find('"')? + start;
    Some((&html[start..end], end))
}

/// Build id → (job, status) as the rows of an evaluation page show them.
fn build_rows(dom: &str) -> BTreeMap<i64, (String, String)> {
    let mut rows = BTreeMap::new();
    let mut at = 0;
    while let Some(row) = dom[at..].find("<tr class=\"build\"").map(|i| i + at) {
        let (id, after) = attribute(dom, row, "data-build").expect("a build row has an id");
        let (job, _) = attribute(dom, row, "data-job").expect("a build row has a job");
        let (status, after_status) =
            attribute(dom, after, "data-status").expect("a build row shows a status");
        rows.insert(id.parse().unwrap(), (job.to_owned(), status.to_owned()));
        at = after_status;
    }
    rows
}

fn spec() -> Specification {
    Specification {
        priority: 3,
        ..Specification::new(
            "web",
            vec![Input::branch("src", "/srv/git/web", "main")],
            vec!["kiln-ci".into(), "eval-recipe".into()],
        )
    }
}

const FAILED_LOG: &str = "configuring broken\nmake: *** [Makefile:3: all] Error 2\n\
                          error: builder for 'broken' failed with exit code 2\n";

/// The evaluation's builds: job, status it ends in (for this test), log.
const JOBS: &[(&str, BuildStatus, &str)] = &[
    ("hello", BuildStatus::Succeeded, "hello built\n"),
    ("broken", BuildStatus::Failed, FAILED_LOG),
    ("needs-broken", BuildStatus::FailedDependency, ""),
    ("slow", BuildStatus::Started, ""),
    ("queued", BuildStatus::Scheduled, ""),
];

/// Registers the evaluation and brings its builds to their statuses; logs
/// are plain files in `dir`. Returns the evaluation and the build ids.
async fn fill(db: &Db, dir: &Path) -> (i64, Vec<i64>) {
    db.put_specification(&spec()).await.unwrap();
    let eval = db.create_evaluation("web").await.unwrap();
    let checkout = Checkout {
        input: "src".into(),
        url: "/srv/git/web".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
    };
    db.set_evaluation_checkouts(eval, &[checkout], None)
        .await
        .unwrap();
    let builds: Vec<NewBuild> = JOBS
        .iter()
        .enumerate()
        .map(|(i, (job, _, _))| NewBuild {
            job: (*job).into(),
            drv_path: format!("/nix/store/{i:0>32}-{job}.drv"),
            system: "x86_64-linux".into(),
            outputs: BTreeMap::from([("out".into(), format!("/nix/store/{i:1>32}-{job}"))]),
            required_features: vec![],
        })
        .collect();
    let ids = db
        .insert_builds(eval, "web", 3, &builds, &[(2, 1)])
        .await
        .unwrap();
    db.finish_evaluation(eval, EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    for (&id, &(job, status, log)) in ids.iter().zip(JOBS) {
        let local = || StatusChange {
            machine: Some("local".into()),
            ..StatusChange::default()
        };
        match status {
            BuildStatus::Scheduled | BuildStatus::FailedDependency => {
                db.set_build_status(id, status, &StatusChange::default())
                    .await
                    .unwrap();
            }
            BuildStatus::Started => db.set_build_status(id, status, &local()).await.unwrap(),
            _ => {
                db.set_build_status(id, BuildStatus::Started, &local())
                    .await
                    .unwrap();
                let path = dir.join(format!("{job}.log"));
                std::fs::write(&path, log).unwrap();
                let change = StatusChange {
                    log_path: Some(path.to_str().unwrap().into()),
                    ..local()
                };
                db.set_build_status(id, status, &change).await.unwrap();
            }
        }
    }
    (eval, ids)
}

struct Site {
    runtime: tokio::runtime::Runtime,
    base: String,
    state: AppState,
    /// Wakes when the first log tail request arrives.
    tail_requested: Arc<tokio::sync::Notify>,
    dir: tempfile::TempDir,
    evaluation: i64,
    builds: Vec<i64>,
}

fn serve() -> Site {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tail_requested = Arc::new(tokio::sync::Notify::new());
    let (state, evaluation, builds, base) = runtime.block_on(async {
        let db = Db::open(dir.path().join("ci.sqlite").to_str().unwrap())
            .await
            .unwrap();
        let (evaluation, builds) = fill(&db, dir.path()).await;
        let state = AppState::new(db, LiveLogs::default());
        let notify = tail_requested.clone();
        let app = router(state.clone()).layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                if request.uri().path().ends_with("/log/tail") {
                    notify.notify_one();
                }
                next.run(request)
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (state, evaluation, builds, base)
    });
    Site {
        runtime,
        base,
        state,
        tail_requested,
        dir,
        evaluation,
        builds,
    }
}

#[test]
fn evaluation_page_lists_builds_and_a_failed_build_shows_its_log() {
    let site = serve();
    let dom = dump_dom(&format!("{}/evals/{}", site.base, site.evaluation), 2000);
    assert!(
        dom.contains(&format!("Evaluation {}", site.evaluation)),
        "{dom}"
    );
    let rows = build_rows(&dom);
    let expected: BTreeMap<i64, (String, String)> = site
        .builds
        .iter()
        .zip(JOBS)
        .map(|(&id, (job, status, _))| (id, ((*job).to_owned(), status.as_str().to_owned())))
        .collect();
    assert_eq!(
        rows, expected,
        "the page's builds differ from the database's"
    );
    // The database and the API agree with what the page shows.
    let stored = site
        .runtime
        .block_on(site.state.db.builds_of_evaluation(site.evaluation))
        .unwrap();
    assert_eq!(stored.len(), rows.len());
    for build in stored {
        assert_eq!(
            rows[&build.id].1,
            build.status.as_str(),
            "build {}",
            build.id
        );
    }
    let api: serde_json::Value = serde_json::from_str(
        &ureq::get(format!("{}/api/evaluations/{}", site.base, site.evaluation))
            .call()
            .expect("the API answers")
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    let api_rows: BTreeMap<i64, (String, String)> = api["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let field = |name: &str| b[name].as_str().unwrap().to_owned();
            (b["id"].as_i64().unwrap(), (field("job"), field("status")))
        })
        .collect();
    assert_eq!(api_rows, rows, "the API's builds differ from the page's");

    let failed = site.builds[1];
    let dom = dump_dom(&format!("{}/builds/{failed}", site.base), 2000);
    assert!(dom.contains("id=\"build-status\""), "{dom}");
    assert!(dom.contains("data-status=\"failed\""), "{dom}");
    for line in FAILED_LOG.lines() {
        assert!(
            dom.contains(line),
            "the failed build's page lacks its log line {line:?}:\n{dom}"
        );
    }
    assert!(dom.contains("builder for 'broken' failed with exit code 2"));
}

#[test]
fn running_build_page_follows_the_log_until_the_build_ends() {
    let site = serve();
    let running = site.builds[3];
    site.state.live.append(running, b"first line\n");

    // What the coordinator does while the page is open: more output, then
    // the build ends and its stored log takes over.
    let state = site.state.clone();
    let notified = site.tail_requested.clone();
    let log_path = site.dir.path().join("slow.log");
    let coordinator = site.runtime.spawn(async move {
        tokio::time::timeout(Duration::from_secs(60), notified.notified())
            .await
            .expect("the page never asked for the log's tail");
        tokio::time::sleep(Duration::from_millis(300)).await;
        state.live.append(running, b"second line <from the tail>\n");
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(
            &log_path,
            "first line\nsecond line <from the tail>\nbuild done\n",
        )
        .unwrap();
        let change = StatusChange {
            machine: Some("local".into()),
            log_path: Some(log_path.to_str().unwrap().into()),
            error: None,
        };
        state
            .db
            .set_build_status(running, BuildStatus::Succeeded, &change)
            .await
            .unwrap();
        state.live.finish(running);
    });

    let started = Instant::now();
    let dom = dump_dom(&format!("{}/builds/{running}", site.base), 20_000);
    site.runtime
        .block_on(coordinator)
        .expect("the coordinator's side of the test failed");
    assert!(dom.contains("first line"), "{dom}");
    assert!(
        dom.contains("second line &lt;from the tail&gt;"),
        "the page did not follow the live log:\n{dom}"
    );
    assert!(
        dom.contains("build done"),
        "the stored log's end is missing:\n{dom}"
    );
    assert!(
        dom.contains("data-complete=\"true\""),
        "the tail did not see the build end:\n{dom}"
    );
    let status_tag = dom
        .find("id=\"build-status\"")
        .map(|at| &dom[dom[..at].rfind('<').unwrap()..at + 120])
        .unwrap();
    assert!(
        status_tag.contains("data-status=\"succeeded\""),
        "{status_tag}"
    );
    eprintln!(
        "live tail page followed the build in {:?}",
        started.elapsed()
    );
}
