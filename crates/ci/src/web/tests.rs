//! The handlers against a SQLite database filled through the Db API: two
//! evaluations of one specification whose builds changed between them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt as _;

use super::{AppState, LiveLogs, router};
use crate::db::{Db, StatusChange};
use crate::model::{
    Agent, BuildStatus, Checkout, EvaluationStatus, Input, NewBuild, Specification,
};

/// The database and what the tests look up in it.
struct Fixture {
    state: AppState,
    _dir: tempfile::TempDir,
    first: i64,
    second: i64,
    /// Build ids of the second evaluation, by job.
    builds: BTreeMap<String, i64>,
}

fn spec(name: &str) -> Specification {
    Specification {
        priority: 5,
        ..Specification::new(
            name,
            vec![Input::branch("src", "/srv/git/src", "main")],
            vec!["kiln-ci".into(), "eval-recipe".into()],
        )
    }
}

fn job(name: &str, eval: i64) -> NewBuild {
    NewBuild {
        job: name.into(),
        drv_path: format!("/nix/store/{eval:0>32}-{}.drv", name.len()),
        system: "x86_64-linux".into(),
        outputs: BTreeMap::from([("out".into(), format!("/nix/store/{eval:1>32}-out"))]),
        required_features: vec![],
    }
}

const XSS_JOB: &str = "<script>alert(1)</script>";

/// Registers an evaluation of `jobs` (name, final status, log text) with
/// `deps` as (dependent, dependency) indexes, and runs its builds to their
/// statuses, logs written as `.bz2` files in `dir`.
async fn evaluation(
    db: &Db,
    dir: &std::path::Path,
    jobs: &[(&str, BuildStatus, &str)],
    deps: &[(usize, usize)],
) -> (i64, Vec<i64>) {
    let eval = db.create_evaluation("main").await.unwrap();
    let checkouts = [Checkout {
        input: "src".into(),
        url: "/srv/git/src".into(),
        commit: format!("{eval:0>40}"),
    }];
    db.set_evaluation_checkouts(eval, &checkouts, None)
        .await
        .unwrap();
    let new: Vec<NewBuild> = jobs.iter().map(|(name, _, _)| job(name, eval)).collect();
    let ids = db.insert_builds(eval, "main", 5, &new, deps).await.unwrap();
    db.finish_evaluation(eval, EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    for (&id, &(_, status, log)) in ids.iter().zip(jobs) {
        if status == BuildStatus::Submitted {
            continue;
        }
        let machine = Some("local".to_owned());
        if status == BuildStatus::FailedDependency {
            db.set_build_status(id, status, &StatusChange::default())
                .await
                .unwrap();
            continue;
        }
        db.set_build_status(
            id,
            BuildStatus::Started,
            &StatusChange {
                machine: machine.clone(),
                ..StatusChange::default()
            },
        )
        .await
        .unwrap();
        if status == BuildStatus::Started {
            continue;
        }
        let log_path = dir.join(format!("{id}.bz2"));
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        std::io::Write::write_all(&mut enc, log.as_bytes()).unwrap();
        std::fs::write(&log_path, enc.finish().unwrap()).unwrap();
        db.set_build_status(
            id,
            status,
            &StatusChange {
                machine,
                log_path: Some(log_path.to_str().unwrap().to_owned()),
                error: status
                    .is_failure()
                    .then(|| "builder failed with exit code 1".to_owned()),
            },
        )
        .await
        .unwrap();
    }
    (eval, ids)
}

async fn fixture() -> Fixture {
    use BuildStatus::*;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("ci.sqlite").to_str().unwrap())
        .await
        .unwrap();
    db.put_specification(&spec("main")).await.unwrap();
    let (first, _) = evaluation(
        &db,
        dir.path(),
        &[
            ("a", Succeeded, "a ok\n"),
            ("b", Failed, "b broke\n"),
            ("c", Failed, "c broke\n"),
            ("d", Succeeded, "d ok\n"),
        ],
        &[],
    )
    .await;
    let jobs = [
        ("a", Failed, "building a\nerror: a <b>broke</b> now\n"),
        ("b", Succeeded, "b fixed\n"),
        ("c", Failed, "c still broken\n"),
        ("d", Succeeded, "d ok\n"),
        ("e", FailedDependency, ""),
        ("f", Started, ""),
        (XSS_JOB, Submitted, ""),
    ];
    let (second, ids) = evaluation(&db, dir.path(), &jobs, &[(4, 2)]).await;
    let builds = jobs
        .iter()
        .zip(&ids)
        .map(|((name, _, _), id)| (name.to_string(), *id))
        .collect();
    db.put_agent(&Agent {
        name: "vm-agent".into(),
        public_key: "vm-agent:AAAA".into(),
        machines: vec!["x86_64-linux-vm".into()],
        enabled: true,
        registered_at: 0,
        last_seen: None,
    })
    .await
    .unwrap();
    db.touch_agent("vm-agent", &["x86_64-linux-vm".into()])
        .await
        .unwrap();
    let state = AppState::new(db, LiveLogs::default());
    Fixture {
        state,
        _dir: dir,
        first,
        second,
        builds,
    }
}

/// Status, content type and body of one request.
async fn call(
    state: &AppState,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, String, String) {
    let mut request = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(json) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(json.to_string())
        }
        None => Body::empty(),
    };
    let response = router(state.clone())
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        content_type,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

async fn get_json(state: &AppState, uri: &str) -> Value {
    let (status, content_type, body) = call(state, Method::GET, uri, None).await;
    assert_eq!(status, StatusCode::OK, "GET {uri}: {body}");
    assert!(
        content_type.starts_with("application/json"),
        "GET {uri}: {content_type}"
    );
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn specifications_are_listed_created_checked_and_removed() {
    let f = fixture().await;
    let list = get_json(&f.state, "/api/specs").await;
    assert_eq!(list[0]["name"], "main");
    assert_eq!(list[0]["inputs"][0]["ref"]["branch"], "main");

    let mut new = serde_json::to_value(spec("")).unwrap();
    new["priority"] = 7.into();
    let (status, _, body) = call(
        &f.state,
        Method::PUT,
        "/api/specs/nightly",
        Some(new.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stored["name"], "nightly");
    assert_eq!(stored["priority"], 7);
    assert_eq!(get_json(&f.state, "/api/specs/nightly").await, stored);

    let mut bad = new.clone();
    bad["eval_input"] = "nope".into();
    let (status, content_type, body) =
        call(&f.state, Method::PUT, "/api/specs/nightly", Some(bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(content_type.starts_with("application/json"));
    assert!(
        body.contains("eval_input 'nope' is not one of the inputs (expected one of: src)"),
        "{body}"
    );
    let mut renamed = new.clone();
    renamed["name"] = "other".into();
    let (status, _, body) = call(&f.state, Method::PUT, "/api/specs/nightly", Some(renamed)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.contains("names specification 'other' but the URL names 'nightly'"),
        "{body}"
    );
    let mut high = new;
    high["priority"] = 10.into();
    let (status, _, _) = call(&f.state, Method::PUT, "/api/specs/nightly", Some(high)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let mut added = serde_json::to_value(spec("added")).unwrap();
    let (status, _, body) = call(&f.state, Method::POST, "/api/specs", Some(added.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    added["priority"] = 1.into();
    let (status, _, body) = call(&f.state, Method::POST, "/api/specs", Some(added)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body.contains("a specification named 'added' exists already"),
        "{body}"
    );
    assert_eq!(get_json(&f.state, "/api/specs/added").await["priority"], 5);

    let (status, _, _) = call(&f.state, Method::DELETE, "/api/specs/nightly", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, body) = call(&f.state, Method::GET, "/api/specs/nightly", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, r#"{"error":"no specification 'nightly'"}"#);
    let (status, _, _) = call(&f.state, Method::DELETE, "/api/specs/nightly", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_evaluation_has_its_builds_and_the_diff_to_the_previous_one() {
    let f = fixture().await;
    let evals = get_json(&f.state, "/api/specs/main/evaluations").await;
    let ids: Vec<i64> = evals
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [f.second, f.first]);
    assert_eq!(
        evals[1]["counts"],
        serde_json::json!({"succeeded": 2, "failed": 2})
    );

    let eval = get_json(&f.state, &format!("/api/evaluations/{}", f.second)).await;
    assert_eq!(eval["status"], "succeeded");
    let statuses: BTreeMap<String, String> = eval["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["job"].as_str().unwrap().to_owned(),
                b["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = [
        ("a", "failed"),
        ("b", "succeeded"),
        ("c", "failed"),
        ("d", "succeeded"),
        ("e", "failed-dependency"),
        ("f", "started"),
        (XSS_JOB, "submitted"),
    ]
    .into_iter()
    .map(|(j, s)| (j.to_owned(), s.to_owned()))
    .collect();
    assert_eq!(statuses, expected);
    let diff = &eval["diff"];
    assert_eq!(diff["previous_evaluation"], f.first);
    let jobs = |key: &str| -> Vec<String> {
        diff[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["job"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(jobs("new_failures"), ["a", "e"]);
    assert_eq!(jobs("fixed"), ["b"]);
    assert_eq!(jobs("still_failing"), ["c"]);

    let (status, _, _) = call(&f.state, Method::GET, "/api/evaluations/999", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(&f.state, Method::GET, "/api/specs/none/evaluations", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn builds_are_filtered_and_carry_machine_times_and_dependencies() {
    let f = fixture().await;
    let failed = get_json(&f.state, "/api/builds?status=failed").await;
    assert_eq!(failed.as_array().unwrap().len(), 4);
    let of_second = get_json(
        &f.state,
        &format!("/api/builds?status=failed&evaluation={}", f.second),
    )
    .await;
    assert_eq!(of_second.as_array().unwrap().len(), 2);
    let (status, _, body) = call(&f.state, Method::GET, "/api/builds?status=broken", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("'broken' is not a build status"), "{body}");

    let a = get_json(&f.state, &format!("/api/builds/{}", f.builds["a"])).await;
    assert_eq!(a["machine"], "local");
    assert!(a["started_at"].as_i64().unwrap() > 0);
    assert!(a["stopped_at"].as_i64().unwrap() >= a["started_at"].as_i64().unwrap());
    assert!(a["duration_secs"].as_i64().unwrap() >= 0);
    let e = get_json(&f.state, &format!("/api/builds/{}", f.builds["e"])).await;
    assert_eq!(e["dependencies"], serde_json::json!([f.builds["c"]]));
    let c = get_json(&f.state, &format!("/api/builds/{}", f.builds["c"])).await;
    assert_eq!(c["dependents"], serde_json::json!([f.builds["e"]]));
    let waiting = get_json(&f.state, &format!("/api/builds/{}", f.builds[XSS_JOB])).await;
    assert_eq!(waiting["duration_secs"], Value::Null);

    // Restarting c brings e (failed because of it) back too.
    let (status, _, body) = call(
        &f.state,
        Method::POST,
        &format!("/api/builds/{}/restart", f.builds["c"]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let restarted: Vec<i64> = serde_json::from_str(&body).unwrap();
    assert!(
        restarted.contains(&f.builds["c"]) && restarted.contains(&f.builds["e"]),
        "{restarted:?}"
    );
    let c = get_json(&f.state, &format!("/api/builds/{}", f.builds["c"])).await;
    assert_eq!(c["status"], "submitted");
}

#[tokio::test]
async fn logs_are_served_whole_and_followed_while_the_build_runs() {
    let f = fixture().await;
    let a = f.builds["a"];
    let (status, content_type, body) =
        call(&f.state, Method::GET, &format!("/api/builds/{a}/log"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/plain"));
    assert_eq!(body, "building a\nerror: a <b>broke</b> now\n");
    let chunk = get_json(&f.state, &format!("/api/builds/{a}/log/tail?offset=11")).await;
    assert_eq!(chunk["text"], "error: a <b>broke</b> now\n");
    assert_eq!(chunk["next_offset"], body.len());
    assert_eq!(chunk["complete"], true);
    assert_eq!(chunk["status"], "failed");

    // A running build: the tail waits for output the coordinator passes on.
    let running = f.builds["f"];
    f.state.live.append(running, "step 1 ✓\n".as_bytes());
    let chunk = get_json(
        &f.state,
        &format!("/api/builds/{running}/log/tail?offset=0"),
    )
    .await;
    assert_eq!(chunk["text"], "step 1 ✓\n");
    assert_eq!(chunk["complete"], false);
    let offset = chunk["next_offset"].as_u64().unwrap();
    let live = f.state.live.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Half a character first: the tail must not split it.
        let check = "✓".as_bytes();
        live.append(running, b"step 2 ");
        live.append(running, &check[..1]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        live.append(running, &check[1..]);
        live.append(running, b"\n");
    });
    let started = Instant::now();
    let mut text = String::new();
    let mut next = offset;
    while !text.ends_with('\n') {
        let chunk = get_json(
            &f.state,
            &format!("/api/builds/{running}/log/tail?offset={next}&wait=10"),
        )
        .await;
        text.push_str(chunk["text"].as_str().unwrap());
        next = chunk["next_offset"].as_u64().unwrap();
    }
    assert_eq!(text, "step 2 ✓\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the tail waited {:?}",
        started.elapsed()
    );
    writer.await.unwrap();

    // With nothing new, the wait ends at its limit with an empty chunk.
    let started = Instant::now();
    let chunk = get_json(
        &f.state,
        &format!("/api/builds/{running}/log/tail?offset={next}&wait=1"),
    )
    .await;
    assert_eq!(chunk["text"], "");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let (status, _, _) = call(&f.state, Method::GET, "/api/builds/999/log/tail", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn agents_and_machines() {
    let f = fixture().await;
    let agents = get_json(&f.state, "/api/agents").await;
    assert_eq!(agents[0]["name"], "vm-agent");
    assert!(agents[0]["last_seen"].as_i64().is_some());
    let machines = get_json(&f.state, "/api/machines").await;
    let by_name: BTreeMap<&str, &Value> = machines
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m))
        .collect();
    assert_eq!(
        by_name["x86_64-linux-vm"]["agents"],
        serde_json::json!(["vm-agent"])
    );
    assert_eq!(
        by_name["local"]["running"],
        serde_json::json!([f.builds["f"]])
    );
}

#[tokio::test]
async fn pages_show_statuses_diffs_and_logs_escaped() {
    let f = fixture().await;
    let get_page = |uri: String| {
        let state = f.state.clone();
        async move {
            let (status, content_type, body) = call(&state, Method::GET, &uri, None).await;
            assert_eq!(status, StatusCode::OK, "GET {uri}: {body}");
            assert!(
                content_type.starts_with("text/html"),
                "GET {uri}: {content_type}"
            );
            body
        }
    };
    let index = get_page("/".into()).await;
    assert!(
        index.contains(r#"<a href="/specs/main">main</a>"#),
        "{index}"
    );
    let spec = get_page("/specs/main".into()).await;
    assert!(spec.contains(&format!(r#"<a href="/evals/{}">"#, f.first)));

    let eval = get_page(format!("/evals/{}", f.second)).await;
    for (job, id) in &f.builds {
        assert!(
            eval.contains(&format!(r#"data-build="{id}""#)),
            "build {job} missing"
        );
    }
    assert!(eval.contains(r#"data-status="failed-dependency""#));
    assert!(
        eval.contains("2 new failures, 1 fixed, 1 still failing"),
        "{eval}"
    );
    assert!(
        !eval.contains(XSS_JOB),
        "a job name went into the page unescaped"
    );
    assert!(eval.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let only_failed = get_page(format!("/evals/{}?status=failed", f.second)).await;
    assert_eq!(only_failed.matches(r#"<tr class="build""#).count(), 2);

    let build = get_page(format!("/builds/{}", f.builds["a"])).await;
    assert!(
        build.contains("error: a &lt;b&gt;broke&lt;/b&gt; now"),
        "{build}"
    );
    assert!(build.contains("builder failed with exit code 1"));
    assert!(
        !build.contains("<script>"),
        "a finished build needs no tail script"
    );
    let running = get_page(format!("/builds/{}", f.builds["f"])).await;
    assert!(running.contains("<script>") && running.contains("/log/tail"));

    for page in ["/builds?status=failed", "/agents"] {
        get_page(page.into()).await;
    }
    let agents = get_page("/agents".into()).await;
    assert!(agents.contains("vm-agent") && agents.contains("x86_64-linux-vm"));

    let (status, content_type, body) = call(&f.state, Method::GET, "/evals/999", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(content_type.starts_with("text/html") && body.contains("no evaluation '999'"));
    let (status, _, _) = call(&f.state, Method::GET, "/no/such/page", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Every operation of the OpenAPI document answers on the router (a path
/// the router lacks would fall through to the HTML "no such page").
#[tokio::test]
async fn the_openapi_document_describes_the_routes() {
    let f = fixture().await;
    let doc = get_json(&f.state, "/api/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            assert!(
                ["200", "201", "202", "204"]
                    .iter()
                    .any(|code| op["responses"][code].is_object()),
                "{method} {path} documents no success response"
            );
            // Writing operations say that they need the token; reads do not.
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r["api_token"].is_array()));
            assert_eq!(
                secured,
                method != "get",
                "{method} {path}: security {}",
                op["security"]
            );
            let uri = path
                .replace("{name}", "main")
                .replace("{id}", &f.builds["d"].to_string());
            let method: Method = method.to_uppercase().parse().unwrap();
            let body = (method == Method::PUT || method == Method::POST)
                .then(|| serde_json::to_value(spec("main")).unwrap());
            let (status, content_type, body) = call(&f.state, method.clone(), &uri, body).await;
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED && !content_type.starts_with("text/html"),
                "{method} {uri} is documented but not routed: {status} {body}"
            );
        }
    }
    let scheme = &doc["components"]["securitySchemes"]["api_token"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer")),
        "{scheme}"
    );
    assert!(paths["/api/specs/{name}/evaluate"]["post"].is_object());
    assert_eq!(
        operations,
        16,
        "{}",
        serde_json::to_string_pretty(paths).unwrap()
    );
    for schema in [
        "Build",
        "BuildStatus",
        "Specification",
        "EvaluationDetail",
        "LogChunk",
        "Agent",
        "Machine",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} missing"
        );
    }
}

#[tokio::test]
async fn metrics_agree_with_the_database() {
    let f = fixture().await;
    let (status, content_type, text) = call(&f.state, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    let samples: BTreeMap<&str, f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name, value.parse().unwrap())
        })
        .collect();
    let counts = f.state.db.status_counts(None).await.unwrap();
    for status in BuildStatus::ALL {
        let key = format!("kiln_ci_builds{{status=\"{status}\"}}");
        assert_eq!(
            samples[key.as_str()],
            counts.get(&status).copied().unwrap_or(0) as f64,
            "{key}"
        );
    }
    assert_eq!(samples["kiln_ci_queue_length"], 1.0);
    assert_eq!(samples["kiln_ci_builds_running"], 1.0);
    assert_eq!(samples["kiln_ci_evaluations{status=\"succeeded\"}"], 2.0);
    // Ended builds that ran: 4 of the first evaluation, 4 of the second
    // (e failed because of c without running).
    assert_eq!(samples["kiln_ci_build_duration_seconds_count"], 8.0);
    assert_eq!(
        samples["kiln_ci_build_duration_seconds_bucket{le=\"+Inf\"}"],
        8.0
    );
    assert_eq!(samples["kiln_ci_agents{state=\"online\"}"], 1.0);
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let kind = line.rsplit(' ').next().unwrap();
        assert!(["gauge", "histogram", "counter"].contains(&kind), "{line}");
    }
}

#[tokio::test]
async fn a_large_evaluation_is_shown_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("ci.sqlite").to_str().unwrap())
        .await
        .unwrap();
    db.put_specification(&spec("main")).await.unwrap();
    let eval = db.create_evaluation("main").await.unwrap();
    let jobs: Vec<NewBuild> = (0..1500).map(|i| job(&format!("job-{i}"), eval)).collect();
    let ids = db.insert_builds(eval, "main", 5, &jobs, &[]).await.unwrap();
    db.finish_evaluation(eval, EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    db.set_build_statuses(&ids[..300], BuildStatus::Failed, &StatusChange::default())
        .await
        .unwrap();
    let state = AppState::new(db, LiveLogs::default());
    let page = |uri: String| {
        let state = state.clone();
        async move {
            let (status, _, body) = call(&state, Method::GET, &uri, None).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            body
        }
    };
    let first = page(format!("/evals/{eval}")).await;
    assert_eq!(first.matches(r#"<tr class="build""#).count(), 1000);
    assert!(first.contains("Builds 1–1000 of 1500."), "{first}");
    assert!(first.contains(&format!(r#"href="/evals/{eval}?from=1000">next"#)));
    let second = page(format!("/evals/{eval}?from=1000")).await;
    assert_eq!(second.matches(r#"<tr class="build""#).count(), 500);
    assert!(second.contains(&format!(r#"data-build="{}""#, ids[1499])));
    // The diff lists the first 200 of 300 new failures.
    assert!(first.contains("New failures (300)") && first.contains("… and 100 more."));
    let failed = page(format!("/evals/{eval}?status=failed")).await;
    assert_eq!(failed.matches(r#"<tr class="build""#).count(), 300);
    assert!(!failed.contains(r#"rel="next""#));
}

#[tokio::test]
async fn a_failed_evaluation_shows_its_log() {
    let f = fixture().await;
    let db = &f.state.db;
    let eval = db.create_evaluation("main").await.unwrap();
    let log_path = f._dir.path().join(format!("{eval}.log.zst"));
    let text = "fetching src\nerror: attribute 'hello' missing <at> ci.nix:3\n";
    std::fs::write(&log_path, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
    db.set_evaluation_checkouts(eval, &[], Some(log_path.to_str().unwrap()))
        .await
        .unwrap();
    db.finish_evaluation(
        eval,
        EvaluationStatus::Failed,
        Some("the evaluator exited with 1"),
    )
    .await
    .unwrap();
    let (status, content_type, body) = call(
        &f.state,
        Method::GET,
        &format!("/api/evaluations/{eval}/log"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/plain"));
    assert_eq!(body, text);
    let (status, _, page) = call(&f.state, Method::GET, &format!("/evals/{eval}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("the evaluator exited with 1"), "{page}");
    assert!(
        page.contains("error: attribute 'hello' missing &lt;at&gt; ci.nix:3"),
        "{page}"
    );
    // A failed evaluation is not the previous one a later diff compares with.
    let diff = get_json(&f.state, &format!("/api/evaluations/{}", f.second)).await;
    assert_eq!(diff["diff"]["previous_evaluation"], f.first);
}

/// With a token, every writing request needs it, in the Authorization
/// header; reads stay open; without a coordinator, evaluating answers 503.
#[tokio::test]
async fn writes_need_the_token_and_reads_do_not() {
    let f = fixture().await;
    let state = f
        .state
        .clone()
        .with_api_token(super::ApiToken::new("s3cret").unwrap());
    let send = |method: Method, uri: String, authorization: Option<&'static str>| {
        let state = state.clone();
        async move {
            let mut request = Request::builder().method(method).uri(uri);
            if let Some(value) = authorization {
                request = request.header(header::AUTHORIZATION, value);
            }
            let response = router(state)
                .oneshot(request.body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = response.status();
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .map(|v| v.to_str().unwrap().to_owned());
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body = String::from_utf8(body.to_vec()).unwrap();
            (status, challenge, body)
        }
    };
    let restart = format!("/api/builds/{}/restart", f.builds["c"]);
    let before = f.state.db.build(f.builds["c"]).await.unwrap().unwrap();
    for (authorization, problem) in [
        (None, "needs 'Authorization: Bearer <token>'"),
        (Some("Bearer wrong"), "the bearer token is wrong"),
        (
            Some("Basic czNjcmV0"),
            "needs 'Authorization: Bearer <token>'",
        ),
        (Some("Bearer s3cret2"), "the bearer token is wrong"),
    ] {
        let (status, challenge, body) = send(Method::POST, restart.clone(), authorization).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(
            challenge.as_deref(),
            Some("Bearer realm=\"kiln-ci\""),
            "{body}"
        );
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(error["error"].as_str().unwrap().contains(problem), "{body}");
    }
    for (method, uri) in [
        (Method::DELETE, "/api/specs/main".to_owned()),
        (Method::PUT, "/api/specs/main".to_owned()),
        (Method::POST, "/api/specs".to_owned()),
        (Method::POST, "/api/specs/main/evaluate".to_owned()),
    ] {
        let (status, _, body) = send(method.clone(), uri.clone(), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}: {body}");
    }
    // Nothing changed.
    assert_eq!(
        f.state.db.build(f.builds["c"]).await.unwrap().unwrap(),
        before
    );
    assert!(f.state.db.specification("main").await.unwrap().is_some());

    // With the token the restart happens; reads never need it.
    let (status, _, body) = send(Method::POST, restart, Some("Bearer s3cret")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let restarted: Vec<i64> = serde_json::from_str(&body).unwrap();
    assert!(restarted.contains(&f.builds["c"]), "{body}");
    for uri in ["/api/specs", "/", "/metrics", "/api/openapi.json"] {
        let (status, _, body) = call(&state, Method::GET, uri, None).await;
        assert_eq!(status, StatusCode::OK, "GET {uri}: {body}");
    }
    // This router has no coordinator to evaluate with.
    let (status, _, body) = call(&f.state, Method::POST, "/api/specs/main/evaluate", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("without a coordinator"), "{body}");
}
