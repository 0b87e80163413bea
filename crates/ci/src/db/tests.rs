//! One test body run against SQLite and PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::testing::TempPostgres;

fn spec(name: &str) -> Specification {
    Specification {
        systems: vec!["x86_64-linux".into()],
        priority: 5,
        period_secs: 60,
        ..Specification::new(
            name,
            vec![Input::branch("src", "/srv/git/src", "main")],
            vec!["kiln-ci".into(), "eval-recipe".into(), "ci.toml".into()],
        )
    }
}

fn new_build(job: &str) -> NewBuild {
    NewBuild {
        job: job.into(),
        drv_path: format!("/nix/store/00000000000000000000000000000000-{job}.drv"),
        system: "x86_64-linux".into(),
        outputs: BTreeMap::from([(
            "out".to_owned(),
            format!("/nix/store/11111111111111111111111111111111-{job}"),
        )]),
        required_features: vec!["kvm".into()],
    }
}

async fn exercise(db: Db) {
    // Specifications: create, change, list, remove.
    let stored = db.put_specification(&spec("main")).await.unwrap();
    assert!(stored.created_at > 0);
    let mut changed = spec("main");
    changed.priority = 12; // clamped
    changed.build_targets = BuildTargets::Jobs(vec!["a".into()]);
    let changed = db.put_specification(&changed).await.unwrap();
    assert_eq!(changed.priority, 9);
    assert_eq!(changed.created_at, stored.created_at);
    db.put_specification(&spec("other")).await.unwrap();
    let all = db.list_specifications().await.unwrap();
    assert_eq!(
        all.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["main", "other"]
    );
    assert_eq!(all[0], changed);
    assert!(db.specification("nope").await.unwrap().is_none());
    assert!(matches!(
        db.create_evaluation("nope").await,
        Err(DbError::NoSuchSpecification(_))
    ));

    // An evaluation with builds c -> b -> a (c depends on b, b on a), and d alone.
    let eval = db.create_evaluation("main").await.unwrap();
    let checkouts = vec![Checkout {
        input: "src".into(),
        url: "/srv/git/src".into(),
        commit: "abc".into(),
    }];
    db.set_evaluation_checkouts(eval, &checkouts, Some("/logs/1.zst"))
        .await
        .unwrap();
    db.add_evaluation_errors(eval, &[("broken".into(), "syntax error".into())])
        .await
        .unwrap();
    let builds: Vec<NewBuild> = ["a", "b", "c", "d"].map(new_build).into();
    let ids = db
        .insert_builds(eval, "main", 9, &builds, &[(1, 0), (2, 1)])
        .await
        .unwrap();
    // One evaluation of a specification at a time.
    match db.create_evaluation("main").await {
        Err(DbError::EvaluationRunning { spec, running }) => {
            assert_eq!((spec.as_str(), running), ("main", eval))
        }
        other => panic!("a second evaluation of 'main' while {eval} runs: {other:?}"),
    }
    db.finish_evaluation(eval, EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    let e = db.evaluation(eval).await.unwrap().unwrap();
    assert_eq!(e.status, EvaluationStatus::Succeeded);
    assert_eq!(e.checkouts, checkouts);
    assert_eq!(e.log_path.as_deref(), Some("/logs/1.zst"));
    assert!(e.evaluated_at.is_some() && e.finished_at.is_none());
    assert_eq!(db.list_evaluations("main", 0).await.unwrap(), vec![e]);
    assert_eq!(db.evaluation_errors(eval).await.unwrap()[0].attr, "broken");

    let b = db.build(ids[1]).await.unwrap().unwrap();
    assert_eq!(b.job, "b");
    assert_eq!(b.status, BuildStatus::Submitted);
    assert_eq!(b.required_features, ["kvm"]);
    assert_eq!(b.outputs, builds[1].outputs);
    assert_eq!(db.dependencies_of(ids[2]).await.unwrap(), [ids[1]]);
    assert_eq!(db.dependents_of(ids[0]).await.unwrap(), [ids[1]]);

    // Only builds without waiting dependencies become scheduled.
    assert_eq!(db.promote_ready_builds().await.unwrap(), 2);
    let ready: Vec<i64> = db
        .dispatchable_builds(10, FeatureFilter::Any)
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(ready, [ids[0], ids[3]]);
    // Features filter in the query: "kvm" is not "vm".
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    let with = |names| {
        let db = db.clone();
        async move {
            db.dispatchable_builds(10, FeatureFilter::With(&names))
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(with(set(&["kvm"])).await, 2);
    assert_eq!(with(set(&["vm", "big_parallel"])).await, 0);
    assert_eq!(with(set(&["vm", "kvm"])).await, 2);
    assert_eq!(with(set(&[])).await, 0);
    let without = |names| {
        let db = db.clone();
        async move {
            db.dispatchable_builds(10, FeatureFilter::Without(&names))
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(without(set(&["kvm"])).await, 0);
    assert_eq!(without(set(&["vm", "k%"])).await, 2);

    // a starts, fails: b and c fail with it, transitively.
    db.set_build_status(
        ids[0],
        BuildStatus::Started,
        &StatusChange {
            machine: Some("local".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let a = db.build(ids[0]).await.unwrap().unwrap();
    assert_eq!((a.status, a.attempts), (BuildStatus::Started, 1));
    assert!(a.started_at.is_some() && a.stopped_at.is_none());
    db.set_build_status(
        ids[0],
        BuildStatus::Failed,
        &StatusChange {
            error: Some("exit 1".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut failed = db.propagate_failures().await.unwrap();
    failed.sort();
    assert_eq!(failed, [ids[1], ids[2]]);
    let a = db.build(ids[0]).await.unwrap().unwrap();
    assert_eq!(a.machine.as_deref(), Some("local"));
    assert!(a.stopped_at.is_some());
    assert_eq!(a.error.as_deref(), Some("exit 1"));

    // d succeeds; the evaluation is not finished until a's dependents end.
    db.set_build_status(ids[3], BuildStatus::Succeeded, &StatusChange::default())
        .await
        .unwrap();
    let counts = db.status_counts(Some(eval)).await.unwrap();
    assert_eq!(counts[&BuildStatus::Failed], 1);
    assert_eq!(counts[&BuildStatus::FailedDependency], 2);
    assert_eq!(counts[&BuildStatus::Succeeded], 1);
    assert_eq!(db.close_finished_evaluations().await.unwrap(), 1);

    // Restarting a brings back its failed dependents, in dependency order.
    let restarted = db.restart_builds(&[ids[0]]).await.unwrap();
    assert_eq!(restarted, [ids[0], ids[1], ids[2]]);
    assert!(
        db.evaluation(eval)
            .await
            .unwrap()
            .unwrap()
            .finished_at
            .is_none()
    );
    assert_eq!(db.promote_ready_builds().await.unwrap(), 1);
    assert_eq!(
        db.build(ids[1]).await.unwrap().unwrap().status,
        BuildStatus::Submitted
    );

    // Retry with back-off: not dispatchable before its time.
    db.schedule_retry(ids[0], now() + 3600, "machine went away")
        .await
        .unwrap();
    assert!(
        db.dispatchable_builds(10, FeatureFilter::Any)
            .await
            .unwrap()
            .is_empty()
    );

    // Started builds are requeued after a crash; old ones canceled.
    db.set_build_status(ids[0], BuildStatus::Started, &StatusChange::default())
        .await
        .unwrap();
    assert_eq!(db.requeue_started_builds().await.unwrap(), [ids[0]]);
    assert_eq!(db.cancel_builds_older_than(now() + 10).await.unwrap(), 3);

    // Filters.
    let filtered = db
        .list_builds(&BuildFilter {
            specification: Some("main".into()),
            status: Some(BuildStatus::Canceled),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        filtered.iter().map(|b| b.id).collect::<Vec<_>>(),
        [ids[2], ids[1]]
    );
    assert_eq!(db.builds_of_evaluation(eval).await.unwrap().len(), 4);
    assert_eq!(
        db.latest_build_of_drv(&builds[3].drv_path)
            .await
            .unwrap()
            .unwrap()
            .id,
        ids[3]
    );

    // Agents and output roots.
    let agent = Agent {
        name: "agent-1".into(),
        public_key: "agent-1:AAAA".into(),
        machines: vec![],
        enabled: true,
        registered_at: 0,
        last_seen: None,
    };
    db.put_agent(&agent).await.unwrap();
    db.touch_agent("agent-1", &["x86_64-linux-vm".into()])
        .await
        .unwrap();
    let agents = db.agents().await.unwrap();
    assert_eq!(agents[0].machines, ["x86_64-linux-vm"]);
    assert!(agents[0].last_seen.is_some());
    assert!(db.remove_agent("agent-1").await.unwrap());
    db.put_output_root("/roots/x", ids[3], 100).await.unwrap();
    db.put_output_root("/roots/y", ids[3], now() + 1000)
        .await
        .unwrap();
    assert_eq!(db.expired_output_roots(now()).await.unwrap(), ["/roots/x"]);
    db.remove_output_root("/roots/x").await.unwrap();
    assert!(db.expired_output_roots(now()).await.unwrap().is_empty());

    cached_failures_and_sessions(&db).await;
    one_build_per_derivation(&db).await;

    // Removing a specification removes its evaluations and builds.
    assert!(db.remove_specification("main").await.unwrap());
    assert!(!db.remove_specification("main").await.unwrap());
    assert!(db.build(ids[0]).await.unwrap().is_none());
    assert!(db.evaluation(eval).await.unwrap().is_none());
}

#[tokio::test]
async fn sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ci.sqlite");
    let db = Db::open(path.to_str().unwrap()).await.unwrap();
    assert_eq!(db.dialect(), Dialect::Sqlite);
    exercise(db.clone()).await;
    db.close().await;
    // Reopening runs no migration twice.
    let again = Db::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert!(again.list_specifications().await.unwrap()[0].name == "other");
}

#[tokio::test]
async fn postgres() {
    let cluster = TempPostgres::start().expect("a throwaway PostgreSQL cluster");
    let url = cluster.create_database("kiln_ci_test").unwrap();
    let db = Db::open(&url).await.unwrap();
    assert_eq!(db.dialect(), Dialect::Postgres);
    exercise(db.clone()).await;
    db.close().await;
    let again = Db::open(&url).await.unwrap();
    assert!(again.list_specifications().await.unwrap()[0].name == "other");
    again.close().await;
}

#[tokio::test]
async fn bad_urls_say_what_was_expected() {
    let err = Db::open("mysql://x").await.unwrap_err();
    assert!(err.to_string().contains("postgres://"), "{err}");
}

/// Cached failures from one evaluation to the next, concurrent evaluation
/// starts, and agent sessions (on the specification "other").
async fn cached_failures_and_sessions(db: &Db) {
    // Of many evaluations started at once, one starts.
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.create_evaluation("other").await })
        })
        .collect();
    let mut started = Vec::new();
    for start in starts {
        match start.await.unwrap() {
            Ok(id) => started.push(id),
            Err(DbError::EvaluationRunning { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(started.len(), 1, "{started:?}");
    let first_eval = started[0];
    db.finish_evaluation(first_eval, EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    let first = db
        .insert_builds(first_eval, "other", 0, &[new_build("x")], &[])
        .await
        .unwrap();
    db.set_build_status(
        first[0],
        BuildStatus::Failed,
        &StatusChange {
            log_path: Some("/logs/x.bz2".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let drv = new_build("x").drv_path;
    assert_eq!(db.cached_failure(&drv).await.unwrap(), None);
    db.remember_failures(&first).await.unwrap();
    assert_eq!(db.cached_failure(&drv).await.unwrap(), Some(first[0]));

    // The next evaluation's build of x fails at once, pointing to the first.
    let second_eval = db.create_evaluation("other").await.unwrap();
    let second = db
        .insert_builds(
            second_eval,
            "other",
            0,
            &[new_build("x"), new_build("needs-x")],
            &[(1, 0)],
        )
        .await
        .unwrap();
    assert_eq!(
        db.fail_cached_failures(second_eval).await.unwrap(),
        [second[0]]
    );
    let x = db.build(second[0]).await.unwrap().unwrap();
    assert_eq!(x.status, BuildStatus::Failed);
    assert_eq!(x.cached_failure_of, Some(first[0]));
    assert_eq!(x.log_path.as_deref(), Some("/logs/x.bz2"));
    assert_eq!((x.attempts, x.started_at), (0, None));
    assert!(
        x.error
            .as_deref()
            .unwrap()
            .contains(&format!("build {} of this derivation failed", first[0])),
        "{x:?}"
    );
    assert_eq!(db.propagate_failures().await.unwrap(), [second[1]]);
    // A restart builds it again: the failure is forgotten.
    assert_eq!(
        db.restart_builds(&[second[0]]).await.unwrap(),
        [second[0], second[1]]
    );
    assert_eq!(db.cached_failure(&drv).await.unwrap(), None);
    assert_eq!(
        db.build(second[0])
            .await
            .unwrap()
            .unwrap()
            .cached_failure_of,
        None
    );
    assert!(
        db.fail_cached_failures(second_eval)
            .await
            .unwrap()
            .is_empty()
    );

    // Agent sessions: a build held by one stays started across a restart.
    db.set_build_status(second[0], BuildStatus::Started, &StatusChange::default())
        .await
        .unwrap();
    let session = AgentSession {
        session: "s1".into(),
        build_id: second[0],
        agent: "agent-1".into(),
        public_key: "agent-1:AAAA".into(),
        challenge: "c".into(),
        dir: "/state/agent-sessions/s1".into(),
        handed_out: 1000,
    };
    db.put_agent_session(&session).await.unwrap();
    assert_eq!(db.agent_session("s1").await.unwrap(), Some(session.clone()));
    assert_eq!(db.agent_sessions().await.unwrap(), [session]);
    assert!(db.requeue_started_builds().await.unwrap().is_empty());
    assert!(db.remove_agent_session("s1").await.unwrap());
    assert!(!db.remove_agent_session("s1").await.unwrap());
    assert_eq!(db.agent_session("s1").await.unwrap(), None);
    assert_eq!(db.requeue_started_builds().await.unwrap(), [second[0]]);
}

/// The same derivation wanted by two evaluations is handed out once at a
/// time, and its permanent failure fails the other at once.
async fn one_build_per_derivation(db: &Db) {
    db.put_specification(&spec("twins")).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let eval = db.create_evaluation("twins").await.unwrap();
        ids.push(
            db.insert_builds(eval, "twins", 0, &[new_build("twin")], &[])
                .await
                .unwrap()[0],
        );
        db.finish_evaluation(eval, EvaluationStatus::Succeeded, None)
            .await
            .unwrap();
    }
    db.promote_ready_builds().await.unwrap();
    let twins = || async {
        db.dispatchable_builds(100, FeatureFilter::Any)
            .await
            .unwrap()
            .into_iter()
            .filter(|b| b.job == "twin")
            .map(|b| b.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(twins().await, [ids[0]], "the older one only");
    db.set_build_status(ids[0], BuildStatus::Started, &StatusChange::default())
        .await
        .unwrap();
    assert!(twins().await.is_empty(), "not while the first is started");
    db.set_build_status(ids[0], BuildStatus::Failed, &StatusChange::default())
        .await
        .unwrap();
    db.remember_failures(&ids[..1]).await.unwrap();
    assert_eq!(twins().await, [ids[1]]);
    assert_eq!(db.fail_scheduled_cached_failures().await.unwrap(), [ids[1]]);
    let second = db.build(ids[1]).await.unwrap().unwrap();
    assert_eq!(
        (second.status, second.cached_failure_of),
        (BuildStatus::Failed, Some(ids[0]))
    );
    assert!(twins().await.is_empty());
    assert!(db.remove_specification("twins").await.unwrap());
}
