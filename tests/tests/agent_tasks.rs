//! The build agent end to end, with real qemu (KVM when it works, else TCG):
//! a test controller hands out three tasks, the agent bootstraps the test
//! machine once, builds each task in its own overlay, and the outputs that
//! come back are identical (NAR hash) to a local `kiln build` of the same
//! derivations. SIGTERM then stops the agent cleanly.

mod agent_common;

use std::collections::BTreeMap;
use std::time::Duration;

use agent_common::*;
use kiln_agent::protocol::ResultStatus;
use kiln_formats::signature::TrustedKeys;

#[test]
fn three_tasks_in_overlays_match_a_local_build() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let machines = machines_dir(dir.path());
    let derivations = Derivations::instantiate();
    let (key, key_path) = agent_key(dir.path(), "agent-one");
    let controller =
        TestController::start(TrustedKeys::parse(&key.to_public().to_string()).unwrap());
    for attr in ["a", "b", "c"] {
        controller.queue(derivations.task(&controller, attr, "kiln-test"));
    }
    let mut agent = start_agent(
        dir.path(),
        &key_path,
        &machines,
        &["--startup-timeout", "60", &controller.url],
    );
    let results = controller.wait_results(3, Duration::from_secs(600), &mut agent);
    let status = agent.terminate(Duration::from_secs(30));
    let log = agent.log();
    assert!(
        status.success(),
        "agent exit {status} on SIGTERM; log:\n{log}"
    );

    let mut from_agent = BTreeMap::new();
    for received in &results {
        assert!(
            received.accepted,
            "result rejected: {}; log:\n{log}",
            received.reason
        );
        let result = &received.request.result;
        assert_eq!(
            result.status,
            ResultStatus::Success,
            "{result:?}\nlog:\n{log}"
        );
        assert_eq!(result.builds.len(), 1);
        assert!(
            !received.logs.is_empty() || result.builds[0].status != "Built",
            "no build log uploaded"
        );
        for out in result.builds[0].outputs.values() {
            from_agent.insert(out.path.clone(), out.nar_hash.clone());
        }
        for phase in [
            "boot",
            "guest-fetch",
            "guest-build",
            "guest-upload",
            "shutdown",
        ] {
            assert!(
                result.timings.contains_key(phase),
                "no {phase} timing: {:?}",
                result.timings
            );
        }
    }
    let local = derivations.local_kiln_build(&["a", "b", "c"]);
    assert_eq!(
        from_agent.len(),
        4,
        "a, b and c's two outputs: {from_agent:?}"
    );
    assert_eq!(
        from_agent, local,
        "the agent's outputs differ from a local kiln build"
    );

    // Bootstrapped once, then one overlay per task, all thrown away.
    assert_eq!(log.matches("bootstrapping").count(), 1, "log:\n{log}");
    assert_eq!(log.matches("task overlay").count(), 3, "log:\n{log}");
    let bootstrapped = machines.join("default/kiln-test/kiln-test-kiln");
    let manifest = std::fs::read_to_string(bootstrapped.join("bootstrapped.toml")).unwrap();
    assert!(
        manifest.contains("machine_id") && manifest.contains("agent_version"),
        "{manifest}"
    );
    let left: Vec<String> = files_under(&dir.path().join("state"))
        .into_iter()
        .filter(|f| f.ends_with(".qcow2") || f.contains("/run"))
        .collect();
    assert!(left.is_empty(), "left behind after SIGTERM: {left:?}");

    // The task requests carried what bbot's do.
    let request = &controller.requests()[0];
    assert_eq!(request.machines.len(), 1);
    assert_eq!(request.machines[0].name, "kiln-test");
    assert_eq!(request.instance, 1);
    assert_eq!(
        request.fingerprint,
        kiln_agent::protocol::key_fingerprint(&key.to_public())
    );

    // A restart reuses the bootstrap (same machine, toolchain and agent).
    let mut again = start_agent(dir.path(), &key_path, &machines, &["--dump-machines"]);
    let status = again.child.wait().unwrap();
    assert!(status.success());
    assert!(!again.log().contains("bootstrapping"), "{}", again.log());
}
