//! kiln-ci's coordinator overhead: an evaluation of 10,000 trivial jobs
//! (instantiated from a recipe into a throwaway store, not timed) is
//! registered — `.drv`s read, GC roots made, builds and dependencies
//! inserted — and dispatched the way the coordinator's dispatch loop does it
//! (ready builds promoted, picked by priority and fair share, marked
//! started) with every slot free, then finished. Timed for SQLite and
//! PostgreSQL: evaluation done → all builds started, and database time per
//! build. Target: under 5 ms per build.
//!
//! `cargo xtask bench ci` (`JOBS=N` to change the count).

use std::time::{Duration, Instant};

use kiln_ci::coordinator::{Config, Coordinator, fair_share};
use kiln_ci::db::{Db, FeatureFilter, StatusChange};
use kiln_ci::eval::Job;
use kiln_ci::model::{BuildStatus, EvaluationStatus, Input, Specification};
use kiln_ci::testing::TempPostgres;

fn recipe(jobs: usize) -> String {
    let mut text = String::new();
    for i in 0..jobs {
        // Chains of ten, so that there are dependencies to record.
        let inputs = if i % 10 == 0 {
            String::new()
        } else {
            format!("\"j{}\"", i - 1)
        };
        text.push_str(&format!(
            "[packages.j{i}]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo {i} > $out\"]\ninputs = [{inputs}]\n"
        ));
    }
    text
}

struct Figures {
    register: Duration,
    to_all_started: Duration,
    finish: Duration,
}

async fn run(
    db: Db,
    state: &std::path::Path,
    store_root: &std::path::Path,
    jobs: &[Job],
) -> Figures {
    let mut config = Config::new(state);
    config.store_root = Some(store_root.to_owned());
    let coordinator = Coordinator::new(db.clone(), config).expect("coordinator");
    db.put_specification(&Specification {
        priority: 5,
        ..Specification::new(
            "bench",
            vec![Input::branch("src", "/dev/null", "main")],
            vec!["true".into()],
        )
    })
    .await
    .unwrap();
    let eval = db.create_evaluation("bench").await.unwrap();

    // Evaluation done: register.
    let start = Instant::now();
    let count = coordinator
        .register(eval, "bench", 5, jobs.to_vec())
        .await
        .expect("register");
    db.finish_evaluation(eval, EvaluationStatus::Succeeded, None)
        .await
        .unwrap();
    let register = start.elapsed();
    assert_eq!(count, jobs.len());

    // Dispatch with all slots free, as dispatch_once does; chains advance
    // as their heads finish, so finishing is part of the loop.
    let mut started = 0;
    let mut finish = Duration::ZERO;
    let mut all_started = None;
    let mut running: Vec<i64> = Vec::new();
    while started < jobs.len() {
        db.promote_ready_builds().await.unwrap();
        let ready = db
            .dispatchable_builds(4096, FeatureFilter::Any)
            .await
            .unwrap();
        let chosen = fair_share(ready, 4096);
        for batch in chosen.chunks(64) {
            let ids: Vec<i64> = batch.iter().map(|b| b.id).collect();
            db.set_build_statuses(&ids, BuildStatus::Started, &StatusChange::default())
                .await
                .unwrap();
            started += ids.len();
            running.extend(ids);
        }
        if started == jobs.len() {
            all_started = Some(start.elapsed());
        }
        // The builds end (instantly): what the coordinator records then.
        let t = Instant::now();
        for batch in running.chunks(64) {
            db.set_build_statuses(batch, BuildStatus::Succeeded, &StatusChange::default())
                .await
                .unwrap();
        }
        running.clear();
        db.close_finished_evaluations().await.unwrap();
        finish += t.elapsed();
    }
    let counts = db.status_counts(Some(eval)).await.unwrap();
    assert_eq!(
        counts.get(&BuildStatus::Succeeded).copied(),
        Some(jobs.len() as i64)
    );
    Figures {
        register,
        to_all_started: all_started.unwrap() - finish,
        finish,
    }
}

fn report(name: &str, jobs: usize, f: &Figures) {
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / jobs as f64;
    println!(
        "{name:<10} register {:>7.2} s ({:.3} ms/build)  eval done → all started {:>7.2} s ({:.3} ms/build, finishing excluded)  finish {:>6.2} s ({:.3} ms/build)  total coordinator {:.3} ms/build",
        f.register.as_secs_f64(),
        per(f.register),
        f.to_all_started.as_secs_f64(),
        per(f.to_all_started),
        f.finish.as_secs_f64(),
        per(f.finish),
        per(f.to_all_started + f.finish),
    );
}

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::var("JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let tmp = tempfile::tempdir().unwrap();
    let store_root = tmp.path().join("store");
    let recipe_path = tmp.path().join("ci.toml");
    std::fs::write(&recipe_path, recipe(jobs)).unwrap();
    let store = kiln_store::local::LocalStore::open_root(&store_root).unwrap();
    let t = Instant::now();
    let lines = kiln_ci::recipe_jobs::recipe_jobs(&store, &recipe_path, "x86_64-linux")
        .expect("instantiate the recipe");
    eprintln!(
        "instantiated {jobs} jobs in {:.1} s (not timed below)",
        t.elapsed().as_secs_f64()
    );
    let jobs_list: Vec<Job> = lines
        .into_iter()
        .map(|l| Job {
            attr: l.attr,
            drv_path: l.drv_path,
            outputs: l.outputs,
            system: l.system,
            error: None,
        })
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("bench-ci: {jobs} jobs, load average {}", load.trim());

    let sqlite = Db::open(&tmp.path().join("ci.sqlite").to_string_lossy())
        .await
        .unwrap();
    let figures = run(
        sqlite,
        &tmp.path().join("state-sqlite"),
        &store_root,
        &jobs_list,
    )
    .await;
    report("SQLite", jobs, &figures);

    match TempPostgres::start() {
        Ok(cluster) => {
            let url = cluster.create_database("bench").unwrap();
            let pg = Db::open(&url).await.unwrap();
            let figures = run(
                pg.clone(),
                &tmp.path().join("state-pg"),
                &store_root,
                &jobs_list,
            )
            .await;
            pg.close().await;
            report("PostgreSQL", jobs, &figures);
        }
        Err(e) => {
            eprintln!("bench-ci: PostgreSQL figures missing: {e}");
            std::process::exit(1);
        }
    }
    println!("target: < 5 ms of coordinator overhead per build");
}
