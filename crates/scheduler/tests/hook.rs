//! The build-hook client against a test hook (`examples/test-hook.rs`):
//! accepted builds are the hook's, declined and postponed ones are built
//! here, a hook failure is the build's failure, and with `max-jobs = 0` a
//! declined build cannot run at all while a postponed one is offered again.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_scheduler::events::Quiet;
use kiln_scheduler::goals::Wanted;
use kiln_scheduler::result::BuildStatus;
use kiln_scheduler::settings::Settings;
use kiln_store::Store;
use kiln_store::local::LocalStore;

fn test_hook() -> PathBuf {
    // Integration tests run from target/<profile>/deps; examples are built
    // beside them by `cargo test`.
    let exe = std::env::current_exe().unwrap();
    let hook = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/test-hook");
    assert!(
        hook.is_file(),
        "{} is missing: run through cargo test",
        hook.display()
    );
    hook
}

fn run(mode: &str, max_jobs: usize) -> (BuildStatus, String, Option<String>, Vec<u8>) {
    run_with(mode, max_jobs, "")
}

/// [`run`] of a package with `extra` lines in its recipe table.
fn run_with(
    mode: &str,
    max_jobs: usize,
    extra: &str,
) -> (BuildStatus, String, Option<String>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let store = Arc::new(LocalStore::open_root(&root).unwrap());
    let recipe = dir.path().join("kiln.toml");
    std::fs::write(
        &recipe,
        format!(
            "[packages.thing]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo built here > $out\"]\n{extra}"
        ),
    )
    .unwrap();
    let drvs = kiln_scheduler::recipe::instantiate(&*store, &recipe, "x86_64-linux", None).unwrap();
    let drv = drvs[0].1.clone();
    let mut settings = Settings::default();
    settings.system = "x86_64-linux".into();
    settings.max_jobs = max_jobs;
    settings.sandbox_paths = ["/bin", "/usr", "/lib", "/lib64?"]
        .map(String::from)
        .to_vec();
    settings.build_hook = vec![
        test_hook().display().to_string(),
        mode.to_owned(),
        root.display().to_string(),
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A hook or scheduler that hangs fails this test instead of the run.
    let report = runtime
        .block_on(async {
            let build = kiln_scheduler::build(
                store.clone(),
                settings,
                vec![(drv.clone(), Wanted::All)],
                Arc::new(Quiet),
            );
            tokio::time::timeout(std::time::Duration::from_secs(120), build).await
        })
        .unwrap_or_else(|_| panic!("the build with a hook in mode {mode} hung for 2 minutes"))
        .unwrap();
    let result = &report.targets[0].1;
    let contents = result
        .outputs
        .get("out")
        .map(|p| std::fs::read_to_string(store.real_path(p)).unwrap());
    let log = kiln_scheduler::logs::read_log(
        &kiln_scheduler::logs::log_dir_for_state_dir(store.state_dir()),
        &drv,
    )
    .unwrap_or_default();
    let _ = store.store_dir();
    (result.status, result.error.clone(), contents, log)
}

#[test]
fn hook_decisions() {
    let (status, _, contents, log) = run("accept", 1);
    assert_eq!(status, BuildStatus::Built);
    assert_eq!(contents.as_deref(), Some("built by the hook\n"));
    assert!(
        String::from_utf8_lossy(&log).contains("test hook building"),
        "{log:?}"
    );

    for mode in ["decline", "decline-permanently", "postpone"] {
        let (status, error, contents, _) = run(mode, 1);
        assert_eq!(status, BuildStatus::Built, "{mode}: {error}");
        assert_eq!(contents.as_deref(), Some("built here\n"), "{mode}");
    }

    let (status, error, _, _) = run("fail", 1);
    assert_eq!(status, BuildStatus::PermanentFailure, "{error}");

    let (status, error, _, _) = run("decline", 0);
    assert_eq!(status, BuildStatus::MiscFailure);
    assert!(error.contains("unable to start any build"), "{error}");

    // With no local slot, a postponed build waits for the machines (busy,
    // maybe, with other processes' builds) and is offered again.
    let (status, error, contents, _) = run("postpone-once", 0);
    assert_eq!(status, BuildStatus::Built, "{error}");
    assert_eq!(contents.as_deref(), Some("built by the hook\n"));

    // `preferLocalBuild` keeps a build here, without asking the hook,
    // unless this machine cannot build it (no slots at all).
    let prefer_local = "env = { preferLocalBuild = \"1\" }\n";
    let (status, error, contents, _) = run_with("accept", 1, prefer_local);
    assert_eq!(status, BuildStatus::Built, "{error}");
    assert_eq!(contents.as_deref(), Some("built here\n"));
    let (status, error, contents, _) = run_with("accept", 0, prefer_local);
    assert_eq!(status, BuildStatus::Built, "{error}");
    assert_eq!(contents.as_deref(), Some("built by the hook\n"));
}
