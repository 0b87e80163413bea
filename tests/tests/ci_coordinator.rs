//! kiln-ci's coordinator through its library, on a throwaway store: GC
//! roots on `.drv`s from registration to the end of their builds, output
//! roots with a time to live, builds for a system nobody builds failing at
//! once with a reason, restarts in dependency order, and webhooks; cached
//! failures on SQLite and PostgreSQL.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_ci::coordinator::{Config, Coordinator};
use kiln_ci::db::Db;
use kiln_ci::eval::Job;
use kiln_ci::model::{BuildStatus, Input, Specification};

const RECIPE: &str = r#"
[packages.good]
builder = "/bin/sh"
args = ["-c", "echo good > $out"]

[packages.flaky]
builder = "/bin/sh"
args = ["-c", "exit 1"]

[packages.after-flaky]
builder = "/bin/sh"
args = ["-c", "echo after > $out"]
inputs = ["flaky"]

[packages.needs-feature]
builder = "/bin/sh"
args = ["-c", "echo never > $out"]
env = { requiredSystemFeatures = "kiln-ci-test-feature" }

[packages.elsewhere]
builder = "/bin/sh"
args = ["-c", "echo never > $out"]
system = "riscv64-plan9"
"#;

fn spec() -> Specification {
    Specification {
        priority: 3,
        ..Specification::new(
            "lib",
            vec![Input::branch("src", "/nowhere", "main")],
            vec!["true".into()],
        )
    }
}

/// A webhook receiver: the JSON bodies it got.
fn webhook_server() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.server_addr().to_ip().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            let _ = request.as_reader().read_to_string(&mut body);
            if let Ok(value) = serde_json::from_str(&body) {
                sink.lock().unwrap().push(value);
            }
            let _ = request.respond(tiny_http::Response::empty(204));
        }
    });
    (url, got)
}

fn links(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn roots_unbuildable_systems_restarts_and_webhooks() {
    let tmp = tempfile::tempdir().unwrap();
    let store_root = tmp.path().join("store");
    let recipe = tmp.path().join("ci.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let state = tmp.path().join("state");
    let (hook, received) = webhook_server();
    let mut config = Config::new(&state);
    config.store_root = Some(store_root.clone());
    config.settings = BTreeMap::from([
        ("sandbox".to_owned(), "true".to_owned()),
        (
            "sandbox-paths".to_owned(),
            "/bin /usr /lib /lib64?".to_owned(),
        ),
    ]);
    config.webhooks = vec![hook];
    config.output_root_ttl = Duration::from_secs(3600);
    let db = Db::open(&tmp.path().join("ci.sqlite").to_string_lossy())
        .await
        .unwrap();
    let coordinator = Coordinator::new(db.clone(), config).unwrap();
    db.put_specification(&spec()).await.unwrap();

    let store = kiln_store::local::LocalStore::open_root(&store_root).unwrap();
    let jobs: Vec<Job> = kiln_ci::recipe_jobs::recipe_jobs(&store, &recipe, "x86_64-linux")
        .unwrap()
        .into_iter()
        .map(|l| Job {
            attr: l.attr,
            drv_path: l.drv_path,
            outputs: l.outputs,
            system: l.system,
            error: None,
        })
        .collect();
    let eval = db.create_evaluation("lib").await.unwrap();
    assert_eq!(coordinator.register(eval, "lib", 3, jobs).await.unwrap(), 5);
    db.finish_evaluation(eval, kiln_ci::model::EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    let builds = db.builds_of_evaluation(eval).await.unwrap();
    let id_of = |job: &str| builds.iter().find(|b| b.job == job).unwrap().id;

    // Every .drv is rooted from registration on.
    let drv_roots = state.join("roots/drvs");
    let mut expected: Vec<String> = builds.iter().map(|b| b.id.to_string()).collect();
    expected.sort();
    assert_eq!(links(&drv_roots), expected);
    let dependencies = db.dependencies_of(id_of("after-flaky")).await.unwrap();
    assert_eq!(dependencies, [id_of("flaky")]);

    coordinator.run_until_idle().await.unwrap();
    let status = |job: &str| {
        let db = db.clone();
        let id = id_of(job);
        async move { db.build(id).await.unwrap().unwrap() }
    };
    assert_eq!(status("good").await.status, BuildStatus::Succeeded);
    assert_eq!(status("flaky").await.status, BuildStatus::Failed);
    assert!(
        status("flaky").await.log_path.is_some(),
        "a failed build keeps its log"
    );
    assert_eq!(
        status("after-flaky").await.status,
        BuildStatus::FailedDependency
    );
    let elsewhere = status("elsewhere").await;
    assert_eq!(elsewhere.status, BuildStatus::FailedOther);
    assert!(
        elsewhere
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("no machine can build system 'riscv64-plan9'"),
        "{elsewhere:?}"
    );
    let needs_feature = status("needs-feature").await;
    assert_eq!(needs_feature.status, BuildStatus::FailedOther);
    assert!(
        needs_feature
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("kiln-ci-test-feature"),
        "{needs_feature:?}"
    );
    // Ended builds drop their .drv roots; the success has an output root.
    assert!(links(&drv_roots).is_empty(), "{:?}", links(&drv_roots));
    let good = status("good").await;
    assert_eq!(
        links(&state.join("roots/outputs")),
        [format!("{}-out", good.id)]
    );
    let target = std::fs::read_link(state.join(format!("roots/outputs/{}-out", good.id))).unwrap();
    assert_eq!(target.to_string_lossy(), good.outputs["out"]);
    assert_eq!(coordinator.prune_output_roots().await.unwrap(), 0);

    // A restart of the failure brings its dependent back, in order.
    let restarted = coordinator.restart(&[id_of("flaky")]).await.unwrap();
    assert_eq!(restarted, [id_of("flaky"), id_of("after-flaky")]);
    assert_eq!(status("flaky").await.status, BuildStatus::Scheduled);
    assert_eq!(status("after-flaky").await.status, BuildStatus::Submitted);
    coordinator.run_until_idle().await.unwrap();
    assert_eq!(
        status("after-flaky").await.status,
        BuildStatus::FailedDependency
    );
    assert_eq!(status("flaky").await.attempts, 1);

    // An evaluation whose input is unreachable fails, saying so, with its log.
    let failed = coordinator.evaluate("lib").await.unwrap();
    let failed = db.evaluation(failed).await.unwrap().unwrap();
    assert_eq!(failed.status, kiln_ci::model::EvaluationStatus::Failed);
    let error = failed.error.clone().unwrap_or_default();
    assert!(error.contains("'/nowhere' is unreachable"), "{error}");
    let log = kiln_ci::eval::read_log(Path::new(failed.log_path.as_deref().unwrap())).unwrap();
    assert!(log.contains("evaluation failed"), "{log}");

    // Webhooks heard of every end.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = received.lock().unwrap().clone();
        let ended: Vec<(i64, String)> = got
            .iter()
            .map(|v| {
                (
                    v["build"].as_i64().unwrap(),
                    v["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        if ended.contains(&(id_of("good"), "succeeded".into()))
            && ended.contains(&(id_of("elsewhere"), "failed-other".into()))
            && ended
                .iter()
                .filter(|(id, s)| *id == id_of("flaky") && s == "failed")
                .count()
                == 2
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "webhooks missing: {ended:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const FAILING: &str = r#"
[packages.good]
builder = "/bin/sh"
args = ["-c", "echo good > $out"]

[packages.broken]
builder = "/bin/sh"
args = ["-c", "echo broken-ran >&2; exit 1"]

[packages.after-broken]
builder = "/bin/sh"
args = ["-c", "echo after > $out"]
inputs = ["broken"]

[packages.fetch-fails]
builder = "/bin/sh"
args = ["-c", "exit 1"]
hash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
hash-mode = "flat"
"#;

/// Registers the recipe's jobs as a new evaluation of "lib" and builds
/// until idle. Returns the builds by job.
async fn evaluate_and_build(
    coordinator: &Coordinator,
    db: &Db,
    recipe: &Path,
) -> BTreeMap<String, kiln_ci::model::Build> {
    let store = coordinator.store().clone();
    let recipe = recipe.to_owned();
    let jobs: Vec<Job> = tokio::task::spawn_blocking(move || {
        kiln_ci::recipe_jobs::recipe_jobs(&store, &recipe, "x86_64-linux").unwrap()
    })
    .await
    .unwrap()
    .into_iter()
    .map(|l| Job {
        attr: l.attr,
        drv_path: l.drv_path,
        outputs: l.outputs,
        system: l.system,
        error: None,
    })
    .collect();
    let eval = db.create_evaluation("lib").await.unwrap();
    coordinator.register(eval, "lib", 3, jobs).await.unwrap();
    db.finish_evaluation(eval, kiln_ci::model::EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    coordinator.run_until_idle().await.unwrap();
    db.builds_of_evaluation(eval)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.job.clone(), b))
        .collect()
}

/// A derivation that failed permanently is not built in the next
/// evaluation (its build fails at once, pointing to the failure, with its
/// log); a transient failure is built again; a restart builds it again.
async fn cached_failures(db: Db) {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("ci.toml");
    std::fs::write(&recipe, FAILING).unwrap();
    let mut config = Config::new(tmp.path().join("state"));
    config.store_root = Some(tmp.path().join("store"));
    config.settings = BTreeMap::from([
        ("sandbox".to_owned(), "true".to_owned()),
        (
            "sandbox-paths".to_owned(),
            "/bin /usr /lib /lib64?".to_owned(),
        ),
    ]);
    // The fixed-output failure is transient: counted as failed at once.
    config.max_attempts = 1;
    let coordinator = Coordinator::new(db.clone(), config).unwrap();
    db.put_specification(&spec()).await.unwrap();

    let first = evaluate_and_build(&coordinator, &db, &recipe).await;
    let status = |builds: &BTreeMap<String, kiln_ci::model::Build>, job: &str| builds[job].status;
    assert_eq!(status(&first, "good"), BuildStatus::Succeeded);
    assert_eq!(status(&first, "broken"), BuildStatus::Failed);
    assert_eq!(status(&first, "fetch-fails"), BuildStatus::Failed);
    assert_eq!(
        status(&first, "after-broken"),
        BuildStatus::FailedDependency
    );
    assert_eq!(first["broken"].attempts, 1);
    assert_eq!(first["fetch-fails"].attempts, 1);
    assert_eq!(first["broken"].cached_failure_of, None);

    let second = evaluate_and_build(&coordinator, &db, &recipe).await;
    let broken = &second["broken"];
    assert_eq!(broken.status, BuildStatus::Failed);
    assert_eq!(broken.cached_failure_of, Some(first["broken"].id));
    assert_eq!(
        (broken.attempts, broken.started_at),
        (0, None),
        "{broken:?}"
    );
    assert!(
        broken
            .error
            .as_deref()
            .unwrap_or_default()
            .contains(&format!(
                "build {} of this derivation failed",
                first["broken"].id
            )),
        "{broken:?}"
    );
    assert_eq!(broken.log_path, first["broken"].log_path);
    assert_eq!(
        status(&second, "after-broken"),
        BuildStatus::FailedDependency
    );
    // Transient: tried again.
    assert_eq!(second["fetch-fails"].attempts, 1);
    assert_eq!(second["fetch-fails"].cached_failure_of, None);
    assert_eq!(status(&second, "good"), BuildStatus::Succeeded);

    // An explicit restart builds it.
    let restarted = coordinator.restart(&[broken.id]).await.unwrap();
    assert_eq!(restarted, [broken.id, second["after-broken"].id]);
    coordinator.run_until_idle().await.unwrap();
    let rebuilt = db.build(broken.id).await.unwrap().unwrap();
    assert_eq!(rebuilt.status, BuildStatus::Failed);
    assert_eq!(rebuilt.attempts, 1);
    assert_eq!(rebuilt.cached_failure_of, None);
    assert!(rebuilt.started_at.is_some());
    // …and that failure is the one the next evaluation points to.
    let third = evaluate_and_build(&coordinator, &db, &recipe).await;
    assert_eq!(third["broken"].cached_failure_of, Some(broken.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_failures_on_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    cached_failures(
        Db::open(&tmp.path().join("ci.sqlite").to_string_lossy())
            .await
            .unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_failures_on_postgres() {
    let cluster = kiln_ci::testing::TempPostgres::start().expect("a throwaway PostgreSQL cluster");
    let url = cluster.create_database("kiln_ci_cached").unwrap();
    let db = Db::open(&url).await.unwrap();
    cached_failures(db.clone()).await;
    db.close().await;
}
