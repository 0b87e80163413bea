//! kiln-ci as the controller of a real `build-agent` (test VM image, qemu
//! under TCG): jobs whose derivations require the `vm` feature are handed
//! to the agent, their outputs come back into the CI store with the NAR
//! hashes of a local `kiln build`, the agent is recorded as their machine
//! and shown on the agents page; an unknown key gets no task, and a result
//! whose challenge signature is wrong is rejected (403) and its build goes
//! back to the queue.

#[path = "agent_common/mod.rs"]
mod agent_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::{Derivations, agent_key, machines_dir, require_qemu, start_agent};
use kiln_agent::protocol::{
    InteractiveMode, MachineHeader, ResultManifest, ResultRequest, ResultStatus, TaskRequest,
    TaskResponse, key_fingerprint, sign_challenge,
};
use kiln_ci::agents::AgentsConfig;
use kiln_ci::coordinator::{Config, Coordinator};
use kiln_ci::db::Db;
use kiln_ci::eval::Job;
use kiln_ci::model::{Agent, BuildStatus, Input, Specification};
use kiln_formats::signature::SecretKey;
use kiln_store::Store as _;

/// Two jobs for the VM (one depending on the other, so that the second
/// task's inputs carry the first one's output) and one for the host.
const EXPRESSION: &str = r#"
let
  mk = name: script: extra: derivation ({
    inherit name;
    builder = "/bin/sh";
    args = [ "-c" script ];
    system = builtins.currentSystem;
  } // extra);
  vm = { requiredSystemFeatures = [ "vm" ]; };
  a = mk "ci-vm-a" "echo hello from the vm > $out" vm;
in {
  inherit a;
  b = mk "ci-vm-b" "read x < ${a}; echo \"b got: $x\" > $out" vm;
  host = mk "ci-host" "echo built on the host > $out" { };
}
"#;

const VM_JOBS: [&str; 2] = ["a", "b"];

fn instantiate() -> Derivations {
    let nix = kiln_e2e::NixStore::new();
    let file = nix.root().join("ci-agents.nix");
    std::fs::write(&file, EXPRESSION).unwrap();
    let mut drvs = BTreeMap::new();
    for attr in ["a", "b", "host"] {
        let out = nix
            .nix_instantiate([file.to_str().unwrap(), "-A", attr])
            .unwrap();
        drvs.insert(attr.to_owned(), out.trim().to_owned());
    }
    Derivations { nix, drvs }
}

fn spec() -> Specification {
    Specification {
        priority: 1,
        ..Specification::new(
            "vm",
            vec![Input::branch("src", "/nowhere", "main")],
            vec!["true".into()],
        )
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// POSTs JSON; the status and the body.
/// Serialises a protocol message.
macro_rules! to_json {
    ($value:expr) => {
        serde_json::to_vec($value).unwrap()
    };
}

fn post(url: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut response = http()
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_vec().unwrap())
}

fn task_request(key: &SecretKey) -> TaskRequest {
    TaskRequest {
        agent: key.name().to_owned(),
        toolchain_name: "kiln".into(),
        toolchain_version: "test".into(),
        instance: 1,
        interactive: InteractiveMode::False,
        fingerprint: key_fingerprint(&key.to_public()),
        machines: vec![MachineHeader {
            id: "fake".into(),
            name: "kiln-test".into(),
            summary: "not a machine: the test posing as an agent".into(),
        }],
    }
}

#[test]
fn vm_jobs_run_on_the_agent_and_forged_results_are_rejected() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let machines = machines_dir(dir.path());
    let derivations = instantiate();
    // The local build is granted the `vm` feature the agent's jobs require.
    let expected =
        derivations.local_kiln_build_with(&VM_JOBS, &["--option", "system-features", "vm"]);
    let (key, key_path) = agent_key(dir.path(), "ci-agent");

    // The CI store gets the .drv closures, as an evaluation would leave them.
    let store_root = dir.path().join("ci-store");
    let store = kiln_store::local::LocalStore::open_root(&store_root).unwrap();
    for drv in derivations.drvs.values() {
        let export = derivations.export(drv);
        store.import_paths(&mut &export[..]).unwrap();
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let state = dir.path().join("state");
    let mut config = Config::new(&state);
    config.store_root = Some(store_root.clone());
    config.settings = BTreeMap::from([
        ("sandbox".to_owned(), "true".to_owned()),
        (
            "sandbox-paths".to_owned(),
            "/bin /usr /lib /lib64?".to_owned(),
        ),
    ]);
    config.agent_features = BTreeSet::from(["vm".to_owned()]);
    let (db, coordinator, ids, url) = runtime.block_on(async {
        let db = Db::open(&dir.path().join("ci.sqlite").to_string_lossy())
            .await
            .unwrap();
        db.put_specification(&spec()).await.unwrap();
        db.put_agent(&Agent {
            name: "ci-agent".into(),
            public_key: key.to_public().to_string(),
            machines: vec![],
            enabled: true,
            registered_at: 0,
            last_seen: None,
        })
        .await
        .unwrap();
        let coordinator = Coordinator::new(db.clone(), config).unwrap();
        let eval = db.create_evaluation("vm").await.unwrap();
        let jobs: Vec<Job> = derivations
            .drvs
            .iter()
            .map(|(attr, drv)| Job {
                attr: attr.clone(),
                drv_path: drv.clone(),
                outputs: BTreeMap::new(),
                system: String::new(),
                error: None,
            })
            .collect();
        coordinator.register(eval, "vm", 1, jobs).await.unwrap();
        let ids: BTreeMap<String, i64> = db
            .builds_of_evaluation(eval)
            .await
            .unwrap()
            .into_iter()
            .map(|b| (b.job, b.id))
            .collect();
        let app = kiln_ci::web::router(kiln_ci::web::AppState::for_coordinator(&coordinator))
            .merge(kiln_ci::agents::router(
                coordinator.clone(),
                AgentsConfig {
                    task_settings: BTreeMap::from([(
                        "sandbox-paths".to_owned(),
                        "/bin/sh=/bin/busybox".to_owned(),
                    )]),
                    ..AgentsConfig::default()
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (db, coordinator, ids, url)
    });
    let stop = Arc::new(tokio::sync::Notify::new());
    let dispatch = {
        let (coordinator, stop) = (coordinator.clone(), stop.clone());
        runtime.spawn(async move { coordinator.run(stop).await })
    };
    let build = |job: &str| runtime.block_on(db.build(ids[job])).unwrap().unwrap();

    // A key outside the trusted set gets no task.
    let stranger = SecretKey::generate("stranger").unwrap();
    let (status, body) = post(
        &format!("{url}/agent/task"),
        to_json!(&task_request(&stranger)),
    );
    assert_eq!(
        status,
        403,
        "an untrusted key was answered: {}",
        String::from_utf8_lossy(&body)
    );

    // Posing as the trusted agent (the fingerprint is public), the test takes
    // a task, then answers it with a signature by another key.
    let (status, body) = post(&format!("{url}/agent/task"), to_json!(&task_request(&key)));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let response: TaskResponse = serde_json::from_slice(&body).unwrap();
    assert!(response.has_task(), "no task for a trusted agent");
    let task = response.task.clone().unwrap();
    assert_eq!(task.derivations, [derivations.drvs["a"].clone()]);
    assert_eq!(task.machine, "kiln-test");
    assert!(!task.repository_is_local(), "{}", task.repository);
    assert_eq!(
        task.settings.get("system-features").map(String::as_str),
        Some("vm")
    );
    let a = build("a");
    assert_eq!(a.status, BuildStatus::Started);
    assert_eq!(a.machine.as_deref(), Some("ci-agent"));
    let mut inputs = http().get(&task.inputs_url).call().unwrap();
    assert_eq!(inputs.status().as_u16(), 200);
    let inputs = inputs.body_mut().read_to_vec().unwrap();
    let imported = tempfile::tempdir().unwrap();
    let check = kiln_store::local::LocalStore::open_root(imported.path()).unwrap();
    let paths = check.import_paths(&mut &inputs[..]).unwrap();
    assert!(
        paths
            .iter()
            .any(|p| check.store_dir().print_path(p) == derivations.drvs["a"]),
        "the inputs lack the derivation"
    );
    let forger = SecretKey::generate("ci-agent").unwrap();
    let forged = ResultRequest {
        session: response.session.clone(),
        challenge_signature: sign_challenge(&forger, &response.session, &response.challenge),
        agent: "ci-agent".into(),
        result: ResultManifest::failed(ResultStatus::Success, "forged"),
    };
    let (status, body) = post(&response.result_url, to_json!(&forged));
    assert_eq!(
        status,
        403,
        "a forged result was answered: {}",
        String::from_utf8_lossy(&body)
    );
    let a = build("a");
    assert_eq!(a.status, BuildStatus::Scheduled, "the build left the queue");
    // The session is over: not even a good signature is taken now.
    let late = ResultRequest {
        challenge_signature: sign_challenge(&key, &response.session, &response.challenge),
        ..forged
    };
    assert_eq!(post(&response.result_url, to_json!(&late)).0, 404);

    // The real agent builds both VM jobs; the host job is built locally.
    let started = Instant::now();
    let mut agent = start_agent(
        dir.path(),
        &key_path,
        &machines,
        &["--startup-timeout", "60", &format!("{url}/agent/task")],
    );
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let counts = runtime.block_on(db.status_counts(None)).unwrap();
        let finished: i64 = counts
            .iter()
            .filter(|(s, _)| s.is_finished())
            .map(|(_, n)| n)
            .sum();
        if finished == ids.len() as i64 {
            break;
        }
        if let Some(status) = agent.child.try_wait().unwrap() {
            panic!("the agent exited ({status}); its log:\n{}", agent.log());
        }
        assert!(
            Instant::now() < deadline,
            "builds not finished within 900 s: {counts:?}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = started.elapsed();
    agent.terminate(Duration::from_secs(60));
    stop.notify_one();
    runtime.block_on(dispatch).unwrap().unwrap();
    eprintln!("two VM jobs through kiln-ci and build-agent in {elapsed:.1?}");

    for job in VM_JOBS {
        let b = build(job);
        assert_eq!(
            b.status,
            BuildStatus::Succeeded,
            "{job}: {:?}; agent log:\n{}",
            b.error,
            agent.log()
        );
        assert_eq!(b.machine.as_deref(), Some("ci-agent"), "{job}");
        assert!(b.log_path.as_deref().is_some_and(|p| Path::new(p).exists()));
        for out in b.outputs.values() {
            let path = store.store_dir().parse_path(out).unwrap();
            let info = store
                .query_path_info(&path)
                .unwrap()
                .unwrap_or_else(|| panic!("{out} is not valid in the CI store"));
            assert_eq!(
                info.nar_hash.to_string(),
                expected[out],
                "{out}: NAR hash differs from a local kiln build"
            );
        }
    }
    let host = build("host");
    assert_eq!(host.status, BuildStatus::Succeeded, "{:?}", host.error);
    assert_eq!(host.machine.as_deref(), Some("local"));

    // The agent's row: seen, with its machine; and on the agents page.
    let agents = runtime.block_on(db.agents()).unwrap();
    assert!(agents[0].last_seen.is_some());
    assert_eq!(agents[0].machines, ["kiln-test"]);
    let mut page = http().get(&format!("{url}/agents")).call().unwrap();
    let page = page.body_mut().read_to_string().unwrap();
    assert!(page.contains("ci-agent") && page.contains("kiln-test"));
}
