//! The build agent when things go wrong, with real qemu: a guest that never
//! fetches its task in time is retried, then suspended for inspection and
//! reported; a guest that dies mid-build gives an `abnormal` result; an agent
//! killed mid-task leaves nothing behind once it has restarted.

mod agent_common;

use std::path::Path;
use std::time::{Duration, Instant};

use agent_common::*;
use kiln_agent::protocol::ResultStatus;
use kiln_formats::signature::TrustedKeys;

fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_pid(state: &Path) -> Option<i32> {
    std::fs::read_to_string(state.join("instance-1/run/qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn serial_says(state: &Path, what: &str) -> bool {
    std::fs::read_to_string(state.join("instance-1/run/serial.log")).is_ok_and(|s| s.contains(what))
}

#[test]
fn guest_that_never_fetches_is_retried_then_suspended() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let machines = machines_dir(dir.path());
    let derivations = Derivations::instantiate();
    let (key, key_path) = agent_key(dir.path(), "agent-one");
    let controller =
        TestController::start(TrustedKeys::parse(&key.to_public().to_string()).unwrap());
    controller.queue(derivations.task(&controller, "a", "kiln-test"));
    // A booting guest needs seconds: one second is never enough to fetch the
    // task (a resumed one may be quicker, hence --cold-boot).
    let mut agent = start_agent(
        dir.path(),
        &key_path,
        &machines,
        &[
            "--cold-boot",
            "--startup-timeout",
            "1",
            "--startup-retries",
            "2",
            &controller.url,
        ],
    );
    let results = controller.wait_results(1, Duration::from_secs(300), &mut agent);
    let log = agent.log();
    let result = &results[0].request.result;
    assert!(results[0].accepted, "{}", results[0].reason);
    assert_eq!(result.status, ResultStatus::Abnormal, "{result:?}");
    assert!(
        result.message.contains("3 attempts") && result.message.contains("suspended"),
        "{}",
        result.message
    );
    assert_eq!(log.matches("retrying").count(), 2, "log:\n{log}");

    // Kept for inspection: marker, files, and a paused qemu answering QMP.
    let marker = machines.join("default/kiln-test/kiln-test-kiln.suspended");
    let report = std::fs::read_to_string(&marker).expect("no suspended-machine report");
    let pid: i32 = report
        .lines()
        .find_map(|l| l.strip_prefix("pid = "))
        .unwrap()
        .parse()
        .unwrap();
    let qmp = report
        .lines()
        .find_map(|l| l.strip_prefix("qmp = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    assert!(alive(pid), "the suspended qemu is gone");
    let status = kiln_agent::qemu::qmp_command(Path::new(&qmp), "query-status").unwrap();
    assert!(status.contains("\"paused\""), "{status}");
    let overlay = report
        .lines()
        .find_map(|l| l.strip_prefix("overlay = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    assert!(Path::new(&overlay).exists(), "the overlay was not kept");

    // A suspended machine is not offered again until the operator clears it.
    let requests_before = controller.requests().len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        controller.requests().len(),
        requests_before,
        "requests went on without free machines"
    );
    agent.terminate(Duration::from_secs(30));
    let _ = kiln_agent::qemu::qmp_command(Path::new(&qmp), "quit");
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

#[test]
fn guest_dying_mid_build_is_abnormal() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let machines = machines_dir(dir.path());
    let state = dir.path().join("state");
    let derivations = Derivations::instantiate();
    let (key, key_path) = agent_key(dir.path(), "agent-one");
    let controller =
        TestController::start(TrustedKeys::parse(&key.to_public().to_string()).unwrap());
    controller.queue(derivations.task(&controller, "slow", "kiln-test"));
    let mut agent = start_agent(
        dir.path(),
        &key_path,
        &machines,
        &["--startup-timeout", "60", &controller.url],
    );
    let log = || std::fs::read_to_string(dir.path().join("agent-0.log")).unwrap_or_default();
    wait_for(
        "the guest starting its build",
        Duration::from_secs(300),
        || serial_says(&state, "building 1 derivation"),
        log,
    );
    let pid = qemu_pid(&state).expect("no qemu pid file");
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let results = controller.wait_results(1, Duration::from_secs(60), &mut agent);
    let result = &results[0].request.result;
    assert_eq!(result.status, ResultStatus::Abnormal, "{result:?}");
    assert!(
        result.message.contains("without a result"),
        "{}",
        result.message
    );
    assert!(
        !machines
            .join("default/kiln-test/kiln-test-kiln.suspended")
            .exists()
    );
    agent.terminate(Duration::from_secs(30));
}

#[test]
fn agent_killed_mid_task_leaves_nothing_after_restart() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let machines = machines_dir(dir.path());
    let state = dir.path().join("state");
    let derivations = Derivations::instantiate();
    let (key, key_path) = agent_key(dir.path(), "agent-one");
    let controller =
        TestController::start(TrustedKeys::parse(&key.to_public().to_string()).unwrap());
    controller.queue(derivations.task(&controller, "slow", "kiln-test"));
    let agent = start_agent(
        dir.path(),
        &key_path,
        &machines,
        &["--startup-timeout", "60", &controller.url],
    );
    let log = || std::fs::read_to_string(dir.path().join("agent-0.log")).unwrap_or_default();
    wait_for(
        "the guest starting its build",
        Duration::from_secs(300),
        || serial_says(&state, "building 1 derivation"),
        log,
    );
    let pid = qemu_pid(&state).expect("no qemu pid file");
    agent.signal(libc::SIGKILL);
    drop(agent);
    assert!(
        state.join("instance-1/run/overlay.qcow2").exists(),
        "no overlay while the task ran"
    );

    let mut restarted = start_agent(dir.path(), &key_path, &machines, &["--dump-machines"]);
    let status = restarted.child.wait().unwrap();
    assert!(status.success(), "{}", restarted.log());
    assert!(
        !alive(pid),
        "the killed agent's VM still runs after the restart"
    );
    let left = files_under(&state);
    assert!(
        left.iter().all(|f| f.ends_with("instance-1")),
        "left behind after the restart: {left:?}"
    );
    let locks: Vec<String> = files_under(&machines)
        .into_iter()
        .filter(|f| f.ends_with(".lock"))
        .collect();
    assert!(locks.is_empty(), "stale locks: {locks:?}");
    assert!(controller.results().is_empty());
}
