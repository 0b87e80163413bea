//! `cargo xtask bench agent`: time from task to result for a trivial
//! derivation built by `build-agent` in a fresh VM overlay, split into boot,
//! task fetch, build, upload and shutdown; under TCG, and under KVM where a
//! probe VM boots with it. Beside it, the peer: Nix 2.8's `nix-build` of the
//! same derivation on the host (no VM).
//!
//! The task comes from a `--fake-request` file (inputs as a `file://` export
//! stream) and the result is printed with `--dump-result`, so the figures
//! are the agent's own and no controller is involved.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_agent::protocol::{ResultRequest, ResultStatus, Task, TaskResponse};
use kiln_e2e::NixStore;

const RUNS: usize = 5;
const PHASES: &[&str] = &[
    "boot",
    "guest-fetch",
    "guest-build",
    "guest-upload",
    "shutdown",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run_agent(
    bin: &Path,
    machines: &Path,
    state: &Path,
    accel: &str,
    extra: &[&str],
) -> (Duration, String, String) {
    let started = Instant::now();
    let out = Command::new(bin)
        .arg("--machines")
        .arg(machines)
        .arg("--state")
        .arg(state)
        .args(["--accel", accel, "--verbose", "2"])
        .args(extra)
        .output()
        .expect("cannot run build-agent");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "build-agent failed:\n{stderr}");
    (
        started.elapsed(),
        String::from_utf8(out.stdout).unwrap(),
        stderr,
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let nix = NixStore::new();
    let file = nix.root().join("trivial.nix");
    std::fs::write(
        &file,
        r#"derivation { name = "trivial"; builder = "/bin/sh"; args = [ "-c" "echo hi > $out" ]; system = builtins.currentSystem; }"#,
    )
    .unwrap();
    let drv = nix
        .nix_instantiate([file.to_str().unwrap()])
        .unwrap()
        .trim()
        .to_owned();
    let closure = nix.nix_store(["--query", "--requisites", &drv]).unwrap();
    let mut args = vec!["--export".to_owned()];
    args.extend(closure.lines().map(str::to_owned));
    let export = dir.path().join("inputs.export");
    std::fs::write(&export, nix.run_bytes("nix-store", &args, b"").unwrap()).unwrap();

    let bin = kiln_benches::profile_bin("build-agent", "build-agent");
    let machines = dir.path().join("machines");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["run", "--quiet", "-p", "xtask", "--", "vm-image", "--out"])
        .arg(&machines)
        .arg("--agent-bin")
        .arg(&bin)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "cargo xtask vm-image failed");

    let response = TaskResponse {
        session: "bench".into(),
        challenge: kiln_agent::protocol::new_challenge(),
        result_url: "http://127.0.0.1:1/unused".into(),
        task: Some(Task {
            machine: "kiln-test".into(),
            repository: "https://example.org/bench.git".into(),
            derivations: vec![drv.clone()],
            inputs_url: format!("file://{}", export.display()),
            settings: BTreeMap::from([("sandbox-paths".into(), "/bin/sh=/bin/busybox".into())]),
        }),
    };
    let request = dir.path().join("request.json");
    std::fs::write(&request, serde_json::to_string(&response).unwrap()).unwrap();
    let state = dir.path().join("state");

    // Bootstrap (and the KVM probe) once, outside the timings.
    let (bootstrap, _, log) = run_agent(&bin, &machines, &state, "auto", &["--dump-machines"]);
    let kvm = log.contains("KVM works");
    println!(
        "bootstrap (once per machine and toolchain, incl. KVM probe): {:.2} s",
        bootstrap.as_secs_f64()
    );

    // Each accelerator resumes a saved guest state by default; the first
    // task of one saves it (untimed here), `--cold-boot` boots every time.
    let mut modes = vec![("tcg", false), ("tcg", true)];
    if kvm {
        modes.push(("kvm", false));
    } else {
        println!("KVM: a probe VM did not boot with it on this host (nested KVM); TCG only");
    }
    let task_args = [
        "--fake-request",
        request.to_str().unwrap(),
        "--dump-result",
        "--startup-timeout",
        "60",
    ];
    for (accel, cold) in modes {
        let mut args = task_args.to_vec();
        if cold {
            args.push("--cold-boot");
        } else {
            let (saved, _, _) = run_agent(&bin, &machines, &state, accel, &args);
            println!(
                "saving the booted guest's state ({accel}, once, with its first task): {:.2} s",
                saved.as_secs_f64()
            );
        }
        let mut phases: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut totals = Vec::new();
        for _ in 0..RUNS {
            let (wall, stdout, stderr) = run_agent(&bin, &machines, &state, accel, &args);
            let result: ResultRequest = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("no result printed ({e}):\n{stdout}\n{stderr}"));
            assert_eq!(
                result.result.status,
                ResultStatus::Success,
                "{:?}\n{stderr}",
                result.result
            );
            assert_eq!(
                result.result.timings.contains_key("warm-start"),
                !cold,
                "resumed a saved state: {:?}\n{stderr}",
                result.result.timings
            );
            for phase in PHASES {
                phases
                    .entry(phase)
                    .or_default()
                    .push(result.result.timings[*phase]);
            }
            totals.push(wall.as_secs_f64());
        }
        println!(
            "build-agent, {}, {} ({RUNS} runs, medians):",
            accel.to_uppercase(),
            if cold {
                "booting each VM (--cold-boot)"
            } else {
                "resuming the saved guest"
            }
        );
        for phase in PHASES {
            println!("  {phase:<14} {:>6.2} s", median(phases[phase].clone()));
        }
        println!(
            "  {:<14} {:>6.2} s  (task request → result, agent start and exit included)",
            "total",
            median(totals)
        );
    }

    // The peer: the same derivation built by Nix on the host, no VM.
    let mut nix_times = Vec::new();
    for _ in 0..RUNS {
        let out = nix.nix_store(["--query", "--outputs", &drv]).unwrap();
        let _ = nix.nix_store(["--delete", out.trim()]);
        let started = Instant::now();
        nix.nix_build(["--no-out-link", &drv]).unwrap();
        nix_times.push(started.elapsed().as_secs_f64());
    }
    println!(
        "nix-build 2.8 on the host (no VM): {:.2} s",
        median(nix_times)
    );
}
