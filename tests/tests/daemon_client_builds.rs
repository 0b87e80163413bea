//! Kiln's daemon client asking for builds (`BuildPathsWithResults`, op 46,
//! and `BuildPaths`, op 9) of Kiln's `store-daemon` and of Nix 2.8's own
//! `nix-daemon`: one result per target with Nix's statuses, built outputs
//! and times, and each build's start, log lines and end seen as events
//! while the request runs.

use std::path::Path;

use kiln_e2e::{KilnDaemon, NixDaemon, NixStore, host_sandbox_paths, unique};
use kiln_formats::store_path::{StoreDir, StorePath};
use kiln_protocol::client::{BuildEvent, BuildOptions, DaemonStore};
use kiln_protocol::worker::{BuildMode, DerivedPath};
use kiln_scheduler::result::BuildStatus;
use kiln_store::Store as _;

/// Three derivations: `good` logs a marker and succeeds, `bad` logs one
/// and exits 1, `after` needs `bad`.
fn expression(marker: &str) -> String {
    format!(
        r#"let
  mk = name: script: derivation {{
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }};
  bad = mk "client-bad" "echo {marker}-bad; exit 1";
in {{
  good = mk "client-good" "echo {marker}-good; echo {marker}-stderr >&2; echo ok > $out";
  inherit bad;
  after = mk "client-after" "cat ${{bad}} > $out";
}}
"#
    )
}

/// Instantiates `attr` of `file` through the store at `url`.
fn instantiate(nix: &NixStore, url: &str, file: &Path, attr: &str) -> StorePath {
    let out = nix
        .command("nix-instantiate")
        .arg("--store")
        .arg(url)
        .arg(file)
        .args(["-A", attr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-instantiate -A {attr} through {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    StoreDir::default().parse_path(&text).unwrap()
}

/// Everything one request reported.
#[derive(Default)]
struct Seen {
    started: Vec<StorePath>,
    stopped: Vec<StorePath>,
    lines: Vec<(StorePath, String)>,
}

fn record(seen: &mut Seen) -> impl FnMut(BuildEvent) + '_ {
    let mut activities = std::collections::HashMap::new();
    move |event| match event {
        BuildEvent::Started { activity, drv, .. } => {
            activities.insert(activity, drv.clone());
            seen.started.push(drv);
        }
        BuildEvent::LogLine { activity, line } => {
            let drv = activities
                .get(&activity)
                .cloned()
                .unwrap_or_else(|| panic!("log line of an unknown activity {activity}: {line}"));
            seen.lines.push((drv, line));
        }
        BuildEvent::Stopped { drv, .. } => seen.stopped.push(drv),
        BuildEvent::Message(_) => {}
    }
}

/// The whole conversation with one daemon at `socket`, whose store `url`
/// the Nix client instantiates into.
fn builds_with_results_and_events(socket: &Path, url: &str, nix_version_expected: Option<&str>) {
    let nix_client = NixStore::with_config("require-sigs = false\n");
    let work = tempfile::tempdir().unwrap();
    let marker = unique();
    let file = work.path().join("client.nix");
    std::fs::write(&file, expression(&marker)).unwrap();
    let good = instantiate(&nix_client, url, &file, "good");
    let bad = instantiate(&nix_client, url, &file, "bad");
    let after = instantiate(&nix_client, url, &file, "after");

    let store = DaemonStore::new(socket);
    let version = store.ping().unwrap().unwrap_or_default();
    if let Some(expected) = nix_version_expected {
        assert!(
            version.contains(expected),
            "the daemon says it is '{version}'"
        );
    }
    let built = |drv: &StorePath| DerivedPath::Built {
        drv: drv.clone(),
        outputs: Vec::new(),
    };
    let targets = [built(&good), built(&bad), built(&after)];
    let options = BuildOptions {
        keep_going: true,
        max_build_jobs: 2,
        ..BuildOptions::default()
    };
    let mut seen = Seen::default();
    let results = store
        .build_paths_with_results(
            &targets,
            BuildMode::Normal,
            &options,
            &mut record(&mut seen),
        )
        .unwrap();
    assert_eq!(
        results.iter().map(|r| r.target.clone()).collect::<Vec<_>>(),
        targets,
        "one result per target, in order"
    );
    let good_result = &results[0].result;
    assert_eq!(
        good_result.result.status,
        BuildStatus::Built,
        "{good_result:?}"
    );
    assert_eq!(good_result.times_built, 1, "{good_result:?}");
    assert!(!good_result.is_non_deterministic);
    assert!(
        good_result.result.start_time > 0
            && good_result.result.start_time <= good_result.result.stop_time,
        "{good_result:?}"
    );
    let out = good_result
        .result
        .outputs
        .get("out")
        .unwrap_or_else(|| panic!("the built output is named: {good_result:?}"));
    assert!(store.is_valid_path(out).unwrap(), "{out:?} is valid");
    assert_eq!(
        store.query_derivation_outputs(&good).unwrap()["out"],
        *out,
        "the output the result names is the derivation's"
    );

    let bad_result = &results[1].result.result;
    assert_eq!(
        bad_result.status,
        BuildStatus::PermanentFailure,
        "{bad_result:?}"
    );
    assert!(
        bad_result.error.contains("exit code 1"),
        "the failure says why: {}",
        bad_result.error
    );
    assert!(bad_result.outputs.is_empty());
    let after_result = &results[2].result.result;
    assert_eq!(
        after_result.status,
        BuildStatus::DependencyFailed,
        "{after_result:?}"
    );

    // Events: the two builds that ran started and stopped, with their logs.
    let mut started = seen.started.clone();
    started.sort();
    let mut expected = vec![good.clone(), bad.clone()];
    expected.sort();
    assert_eq!(started, expected, "builds started");
    let mut stopped = seen.stopped.clone();
    stopped.sort();
    assert_eq!(stopped, expected, "builds stopped");
    for (drv, line) in [
        (&good, format!("{marker}-good")),
        (&good, format!("{marker}-stderr")),
        (&bad, format!("{marker}-bad")),
    ] {
        assert!(
            seen.lines.iter().any(|(d, l)| d == drv && *l == line),
            "the log line '{line}' of {drv:?} came as an event: {:?}",
            seen.lines
        );
    }

    // Again: nothing is built, the success is told without a build.
    let mut again = Seen::default();
    let results = store
        .build_paths_with_results(
            &[built(&good)],
            BuildMode::Normal,
            &options,
            &mut record(&mut again),
        )
        .unwrap();
    assert!(
        results[0].result.result.status.is_success(),
        "{:?}",
        results[0]
    );
    assert_eq!(results[0].result.times_built, 0);
    assert!(again.started.is_empty(), "built again: {:?}", again.started);

    // BuildPaths (op 9): success is a plain answer, a failure the daemon's
    // message naming the derivation.
    store
        .build_paths(&[built(&good)], BuildMode::Normal, &options, &mut |_| {})
        .unwrap();
    let failure = store
        .build_paths(&[built(&bad)], BuildMode::Normal, &options, &mut |_| {})
        .unwrap_err();
    let text = kiln_formats::report::chain(&failure);
    assert!(
        text.contains("client-bad"),
        "BuildPaths's error names the failed derivation: {text}"
    );
    assert!(
        !kiln_protocol::client::is_connection_error(&failure),
        "a build failure is the daemon's answer, not a broken connection: {failure:?}"
    );
}

#[test]
fn kiln_store_daemon_builds_with_results_and_events() {
    let daemon = KilnDaemon::start(&[("sandbox-paths", &host_sandbox_paths())]);
    builds_with_results_and_events(&daemon.socket(), &daemon.url(), Some("Kiln"));
}

#[test]
fn nix_daemon_builds_with_results_and_events() {
    let daemon = NixDaemon::start();
    builds_with_results_and_events(&daemon.socket(), &daemon.url(), Some("2.8"));
}

#[test]
fn an_absent_daemon_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = DaemonStore::new(dir.path().join("no-socket"));
    let error = store
        .build_paths_with_results(
            &[],
            BuildMode::Normal,
            &BuildOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        kiln_protocol::client::is_connection_error(&error),
        "{error:?}"
    );
}
