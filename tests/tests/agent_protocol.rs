//! The agent ↔ controller protocol without VMs (`--fake-build`,
//! `--fake-machine`, `--fake-request`): a result whose challenge signature is
//! wrong is rejected by the controller; tasks for machines the agent did not
//! offer, or for local repositories, are refused; an unreachable controller
//! is skipped; the operator's dump modes print what they say.

mod agent_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agent_common::*;
use kiln_agent::protocol::{ResultRequest, ResultStatus, Task, TaskResponse, verify_challenge};
use kiln_formats::signature::TrustedKeys;

const FAKE_MACHINE: &str = r#"
id = "fake-1.0-x"
name = "fake-linux"
summary = "a machine that exists only in this file"
type = "qemu-linux"
kernel = "vmlinuz"
initrd = "initrd"
disk = "disk.qcow2"
"#;

fn task(machine: &str, repository: &str) -> Task {
    Task {
        machine: machine.into(),
        repository: repository.into(),
        derivations: vec!["/nix/store/00000000000000000000000000000000-x.drv".into()],
        inputs_url: "http://127.0.0.1:1/none".into(),
        settings: BTreeMap::new(),
    }
}

fn fake_agent(dir: &std::path::Path, key: &std::path::Path, controllers: &[&str]) -> AgentProcess {
    let machine = dir.join("fake-machine.toml");
    std::fs::write(&machine, FAKE_MACHINE).unwrap();
    let mut args = vec!["--fake-build", "--fake-machine", machine.to_str().unwrap()];
    args.extend_from_slice(controllers);
    let machines = dir.join("no-machines");
    std::fs::create_dir_all(&machines).unwrap();
    start_agent(dir, key, &machines, &args)
}

#[test]
fn wrong_challenge_signature_is_rejected_right_one_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (known, _) = agent_key(dir.path(), "agent-one");
    // Same key name, another key: the signature must not verify.
    let (_, impostor_key) = agent_key(dir.path(), "agent-one-impostor");
    let (good, good_key) = {
        let (k, p) = agent_key(dir.path(), "agent-two");
        (k, p)
    };
    let mut trusted = TrustedKeys::parse(&known.to_public().to_string()).unwrap();
    trusted.insert(good.to_public());
    let controller = TestController::start(trusted);

    controller.queue(task("fake-linux", "https://example.org/r.git"));
    let mut impostor = fake_agent(dir.path(), &impostor_key, &[&controller.url]);
    let results = controller.wait_results(1, Duration::from_secs(60), &mut impostor);
    assert!(
        !results[0].accepted,
        "a result signed by an unknown key was accepted"
    );
    assert!(
        results[0].reason.contains("not trusted") || results[0].reason.contains("does not"),
        "{}",
        results[0].reason
    );
    impostor.terminate(Duration::from_secs(20));

    controller.queue(task("fake-linux", "https://example.org/r.git"));
    let mut agent = fake_agent(dir.path(), &good_key, &[&controller.url]);
    let results = controller.wait_results(2, Duration::from_secs(60), &mut agent);
    assert!(results[1].accepted, "{}", results[1].reason);
    assert_eq!(
        results[1].request.result.status,
        ResultStatus::Abort,
        "--fake-build answers abort"
    );
    agent.terminate(Duration::from_secs(20));
}

#[test]
fn tasks_for_unoffered_machines_or_local_repositories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key, key_path) = agent_key(dir.path(), "agent-one");
    let controller =
        TestController::start(TrustedKeys::parse(&key.to_public().to_string()).unwrap());
    controller.queue(task("no-such-machine", "https://example.org/r.git"));
    controller.queue(task("fake-linux", "/srv/local/repo"));
    controller.queue(task("fake-linux", "https://example.org/r.git"));
    // The first controller is unreachable: logged and skipped.
    let mut agent = fake_agent(
        dir.path(),
        &key_path,
        &["http://127.0.0.1:1/task", &controller.url],
    );
    let results = controller.wait_results(1, Duration::from_secs(60), &mut agent);
    // Give a refused task a chance to come back as a result (it must not).
    std::thread::sleep(Duration::from_secs(1));
    let results_now = controller.results();
    assert_eq!(
        results_now.len(),
        1,
        "refused tasks produced results: {results_now:?}"
    );
    assert_eq!(results[0].request.session, "s3");
    assert_eq!(controller.handed_out(), ["s1", "s2", "s3"]);
    let log = agent.log();
    assert!(log.contains("which this agent did not offer"), "{log}");
    assert!(log.contains("local repository"), "{log}");
    assert!(log.contains("unreachable"), "{log}");
    let request = &controller.requests()[0];
    assert_eq!(request.machines.len(), 1);
    assert_eq!(request.machines[0].name, "fake-linux");
    agent.terminate(Duration::from_secs(20));
}

#[test]
fn dump_modes_print_machines_tasks_and_signed_results() {
    let dir = tempfile::tempdir().unwrap();
    let (key, key_path) = agent_key(dir.path(), "agent-one");
    let response = TaskResponse {
        session: "sess-42".into(),
        challenge: kiln_agent::protocol::new_challenge(),
        result_url: "http://127.0.0.1:1/result".into(),
        task: Some(task("fake-linux", "https://example.org/r.git")),
    };
    let request_file = dir.path().join("request.json");
    std::fs::write(&request_file, serde_json::to_string(&response).unwrap()).unwrap();
    let machine = dir.path().join("fake-machine.toml");
    std::fs::write(&machine, FAKE_MACHINE).unwrap();
    let bin = kiln_e2e::workspace_bin("build-agent", "build-agent");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(["--state", dir.path().join("state").to_str().unwrap()])
            .args(["--key", key_path.to_str().unwrap()])
            .args(["--fake-machine", machine.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let machines = run(&["--dump-machines"]);
    assert!(machines.contains("\"fake-linux\""), "{machines}");
    let dumped: TaskResponse = serde_json::from_str(&run(&[
        "--fake-request",
        request_file.to_str().unwrap(),
        "--dump-task",
    ]))
    .unwrap();
    assert_eq!(dumped, response);
    let result: ResultRequest = serde_json::from_str(&run(&[
        "--fake-request",
        request_file.to_str().unwrap(),
        "--fake-build",
        "--dump-result",
    ]))
    .unwrap();
    assert_eq!(result.session, "sess-42");
    let trusted = TrustedKeys::parse(&key.to_public().to_string()).unwrap();
    verify_challenge(
        &trusted,
        "sess-42",
        &response.challenge,
        &result.challenge_signature,
    )
    .unwrap();

    // --systemd-daemon: journal priorities and a startup summary.
    let started = Instant::now();
    let out = std::process::Command::new(&bin)
        .args([
            "--systemd-daemon",
            "--dump-machines",
            "--fake-machine",
            machine.to_str().unwrap(),
        ])
        .args(["--state", dir.path().join("state").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("<6>") && l.contains("CPUs") && l.contains("RAM")),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}
