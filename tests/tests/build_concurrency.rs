//! Two `kiln build` processes on one store, asked for the same derivations
//! in opposite orders, with several jobs each: every derivation is built
//! exactly once (the other process waits on its output locks and finds the
//! outputs valid), both succeed, and neither deadlocks.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::kiln_bin;

const PACKAGES: usize = 12;

fn recipe() -> String {
    let mut text = String::new();
    for i in 0..PACKAGES {
        // Slow enough that the two processes overlap on every package.
        text.push_str(&format!(
            "[packages.p{i}]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"sleep 0.4; echo p{i} > $out\"]\n\
             env = {{ PATH = \"/usr/bin:/bin\" }}\n\n"
        ));
    }
    let all: Vec<String> = (0..PACKAGES).map(|i| format!("\"p{i}\"")).collect();
    text.push_str(&format!(
        "[packages.top]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo top > $out\"]\ninputs = [{}]\n",
        all.join(", ")
    ));
    text
}

#[test]
fn overlapping_builds_build_each_derivation_once() {
    let kiln = kiln_bin();
    let dir = tempfile::tempdir().unwrap();
    let recipe_path = dir.path().join("kiln.toml");
    std::fs::write(&recipe_path, recipe()).unwrap();
    let store = format!("local?root={}", dir.path().join("root").display());
    let recipe_arg = recipe_path.to_str().unwrap().to_owned();

    let mut forward: Vec<String> = (0..PACKAGES)
        .map(|i| format!("{recipe_arg}#p{i}"))
        .collect();
    forward.push(format!("{recipe_arg}#top"));
    let mut backward = forward.clone();
    backward.reverse();

    let started = Instant::now();
    // Output goes to files, not pipes: a process stuck in a sandbox must make
    // this test fail with a message, never hang it.
    let spawn = |targets: &[String], name: &str| {
        let out = std::fs::File::create(dir.path().join(format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(dir.path().join(format!("{name}.err"))).unwrap();
        Command::new(&kiln)
            .args([
                "build",
                "--store",
                &store,
                "--no-out-link",
                "--json",
                "-j",
                "4",
                "-Q",
            ])
            .args(["--option", "sandbox-paths", "/bin /usr /lib /lib64?"])
            .args(targets)
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap()
    };
    let mut children = [spawn(&forward, "first"), spawn(&backward, "second")];
    let deadline = started + Duration::from_secs(120);
    let mut statuses = [None, None];
    while statuses.iter().any(Option::is_none) {
        for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = child.try_wait().unwrap();
            }
        }
        if Instant::now() > deadline {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!(
                "the two kiln build processes did not finish within 120 s (deadlock?): {statuses:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = started.elapsed();
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let outputs = [
        ("first", read("first.out"), read("first.err")),
        ("second", read("second.out"), read("second.err")),
    ];
    for ((name, _, err), status) in outputs.iter().zip(statuses.iter()) {
        let status = status.unwrap();
        assert!(
            status.success(),
            "the {name} process failed ({status}):\n{}",
            String::from_utf8_lossy(err)
        );
    }
    let mut built: BTreeMap<String, usize> = BTreeMap::new();
    for (_, stdout, _) in &outputs {
        let json: serde_json::Value = serde_json::from_slice(stdout).unwrap();
        let goals = json["goals"].as_object().expect("a goals object");
        assert_eq!(goals.len(), PACKAGES + 1, "{json}");
        for (drv, status) in goals {
            let status = status.as_str().unwrap();
            assert!(
                status == "Built" || status == "AlreadyValid",
                "{drv}: {status}"
            );
            *built.entry(drv.clone()).or_default() += usize::from(status == "Built");
        }
    }
    for (drv, times) in &built {
        assert_eq!(
            *times, 1,
            "{drv} was built {times} times across the two processes"
        );
    }
    // 12 × 0.4 s over 8 job slots in two processes: the work overlaps, and
    // waiting for a lock is woken by its release, not by a polling sleep.
    assert!(
        elapsed < Duration::from_secs(30),
        "the two builds took {elapsed:?}"
    );
}
