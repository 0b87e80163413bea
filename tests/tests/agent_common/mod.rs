//! Shared pieces of the build-agent tests: a small controller speaking the
//! agent protocol (until the CI crate provides the real one), the test
//! machine, the test derivations, and running the agent.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent::protocol::{
    ResultRequest, Task, TaskRequest, TaskResponse, new_challenge, verify_challenge,
};
use kiln_e2e::NixStore;
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::signature::{SecretKey, TrustedKeys};

/// What the controller decided about one posted result.
#[derive(Debug, Clone)]
pub struct Received {
    pub request: ResultRequest,
    pub accepted: bool,
    pub reason: String,
    /// Uploaded NARs by base name.
    pub nars: BTreeMap<String, Vec<u8>>,
    pub logs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Task>,
    sessions: BTreeMap<String, (String, Task)>,
    requests: Vec<TaskRequest>,
    handed_out: Vec<String>,
    uploads: BTreeMap<String, (BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>)>,
    results: Vec<Received>,
    inputs: BTreeMap<String, Vec<u8>>,
}

/// A controller on 127.0.0.1 that hands out queued tasks, checks challenge
/// signatures against the agent keys it knows and NARs against their hashes.
pub struct TestController {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    state: Arc<Mutex<State>>,
    pub url: String,
}

impl TestController {
    pub fn start(known_agents: TrustedKeys) -> TestController {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let thread = {
            let (server, state, base) = (Arc::clone(&server), Arc::clone(&state), url.clone());
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    handle(request, &state, &known_agents, &base);
                }
            })
        };
        TestController {
            server,
            thread: Some(thread),
            state,
            url: format!("{url}/task"),
        }
    }

    /// Serves `export` (an export stream) and returns its URL.
    pub fn add_inputs(&self, name: &str, export: Vec<u8>) -> String {
        self.state
            .lock()
            .unwrap()
            .inputs
            .insert(name.to_owned(), export);
        format!("{}/inputs/{name}", self.url.trim_end_matches("/task"))
    }

    pub fn queue(&self, task: Task) {
        self.state.lock().unwrap().queue.push_back(task);
    }

    pub fn results(&self) -> Vec<Received> {
        self.state.lock().unwrap().results.clone()
    }

    pub fn requests(&self) -> Vec<TaskRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn handed_out(&self) -> Vec<String> {
        self.state.lock().unwrap().handed_out.clone()
    }

    /// Waits until `n` results arrived (panics after `timeout`).
    pub fn wait_results(
        &self,
        n: usize,
        timeout: Duration,
        agent: &mut AgentProcess,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let results = self.results();
            if results.len() >= n {
                return results;
            }
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!(
                    "the agent exited ({status}) after {} of {n} results; its log:\n{}",
                    results.len(),
                    agent.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} results within {timeout:?}; agent log:\n{}",
                results.len(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestController {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(mut request: tiny_http::Request, state: &Mutex<State>, known: &TrustedKeys, base: &str) {
    let url = request.url().to_owned();
    let mut body = Vec::new();
    let _ = request.as_reader().read_to_end(&mut body);
    let reply = |request: tiny_http::Request, code: u16, body: Vec<u8>| {
        let _ = request.respond(tiny_http::Response::from_data(body).with_status_code(code));
    };
    let mut st = state.lock().unwrap();
    if url == "/task" {
        let Ok(task_request) = serde_json::from_slice::<TaskRequest>(&body) else {
            return reply(request, 400, b"not a task request".to_vec());
        };
        st.requests.push(task_request);
        let response = match st.queue.pop_front() {
            None => TaskResponse::default(),
            Some(task) => {
                let session = format!("s{}", st.handed_out.len() + 1);
                let challenge = new_challenge();
                st.sessions
                    .insert(session.clone(), (challenge.clone(), task.clone()));
                st.handed_out.push(session.clone());
                TaskResponse {
                    result_url: format!("{base}/result/{session}"),
                    session,
                    challenge,
                    task: Some(task),
                }
            }
        };
        return reply(request, 200, serde_json::to_vec(&response).unwrap());
    }
    if let Some(name) = url.strip_prefix("/inputs/") {
        return match st.inputs.get(name) {
            Some(data) => reply(request, 200, data.clone()),
            None => reply(request, 404, Vec::new()),
        };
    }
    let Some(rest) = url.strip_prefix("/result/") else {
        return reply(request, 404, Vec::new());
    };
    let mut parts = rest.splitn(3, '/');
    let session = parts.next().unwrap_or_default().to_owned();
    match (parts.next(), parts.next()) {
        (Some(kind @ ("nar" | "log")), Some(name)) => {
            let entry = st.uploads.entry(session).or_default();
            let map = if kind == "nar" {
                &mut entry.0
            } else {
                &mut entry.1
            };
            map.insert(name.to_owned(), body);
            reply(request, 200, Vec::new())
        }
        (None, None) => {
            let Ok(result) = serde_json::from_slice::<ResultRequest>(&body) else {
                return reply(request, 400, b"not a result request".to_vec());
            };
            let Some((challenge, _task)) = st.sessions.get(&session).cloned() else {
                return reply(request, 404, b"unknown session".to_vec());
            };
            let (nars, logs) = st.uploads.remove(&session).unwrap_or_default();
            let mut verdict = verify_challenge(
                known,
                &result.session,
                &challenge,
                &result.challenge_signature,
            )
            .map_err(|e| e.to_string());
            if verdict.is_ok() && result.session != session {
                verdict = Err(format!("result for {} posted to {session}", result.session));
            }
            if verdict.is_ok() {
                // Every output must have come, with the NAR hash the manifest claims.
                'check: for build in &result.result.builds {
                    for out in build.outputs.values() {
                        let base = out.path.rsplit('/').next().unwrap();
                        let Some(nar) = nars.get(base) else {
                            verdict = Err(format!("no NAR uploaded for {}", out.path));
                            break 'check;
                        };
                        let hash = Hash::digest(HashAlgo::Sha256, nar).to_string();
                        if hash != out.nar_hash || nar.len() as u64 != out.nar_size {
                            verdict = Err(format!(
                                "NAR of {} is {hash}, manifest says {}",
                                out.path, out.nar_hash
                            ));
                            break 'check;
                        }
                    }
                }
            }
            let accepted = verdict.is_ok();
            st.results.push(Received {
                request: result,
                accepted,
                reason: verdict.err().unwrap_or_default(),
                nars,
                logs,
            });
            drop(st);
            if accepted {
                reply(request, 200, Vec::new())
            } else {
                reply(request, 403, b"challenge signature rejected".to_vec())
            }
        }
        _ => reply(request, 404, Vec::new()),
    }
}

/// The test machine, built by `cargo xtask vm-image` from Debian packages
/// into a fresh machines directory, with this build's build-agent inside.
pub fn machines_dir(dir: &Path) -> PathBuf {
    let agent = kiln_e2e::workspace_bin("build-agent", "build-agent");
    let out = dir.join("machines");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["run", "--quiet", "-p", "xtask", "--", "vm-image", "--out"])
        .arg(&out)
        .arg("--agent-bin")
        .arg(&agent)
        .output()
        .expect("cannot run cargo xtask vm-image");
    assert!(
        output.status.success(),
        "cargo xtask vm-image failed (needs qemu-img, apt-get and dpkg-deb; `cargo xtask setup` installs the peers):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Fails with a clear message when qemu is missing: the agent tests need it.
pub fn require_qemu() {
    for program in ["qemu-system-x86_64", "qemu-img"] {
        let found = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{program} is not installed: the build-agent tests run real VMs \
             (`cargo xtask setup` installs qemu-system-x86 and qemu-utils)"
        );
    }
}

/// The test derivations, instantiated by Nix 2.8 into a throwaway store.
pub struct Derivations {
    pub nix: NixStore,
    /// Attribute name → `.drv` path.
    pub drvs: BTreeMap<String, String>,
}

pub const EXPRESSION: &str = r#"
let
  mk = name: script: derivation {
    inherit name;
    builder = "/bin/sh";
    args = [ "-c" script ];
    system = builtins.currentSystem;
  };
  a = mk "agent-a" "echo hello from a > $out";
in {
  inherit a;
  b = mk "agent-b" "read x < ${a}; echo \"b got: $x\" > $out";
  c = derivation {
    name = "agent-c";
    builder = "/bin/sh";
    args = [ "-c" "echo main > $out; echo docs for $out > $doc" ];
    outputs = [ "out" "doc" ];
    system = builtins.currentSystem;
  };
  slow = mk "agent-slow" "i=0; while [ $i -lt 100000000 ]; do i=$((i+1)); done; echo done > $out";
}
"#;

impl Derivations {
    pub fn instantiate() -> Derivations {
        let nix = NixStore::new();
        let file = nix.root().join("agent-tests.nix");
        std::fs::write(&file, EXPRESSION).unwrap();
        let mut drvs = BTreeMap::new();
        for attr in ["a", "b", "c", "slow"] {
            let out = nix
                .nix_instantiate([file.to_str().unwrap(), "-A", attr])
                .unwrap();
            drvs.insert(attr.to_owned(), out.trim().to_owned());
        }
        Derivations { nix, drvs }
    }

    /// The export stream of `drv`'s closure (what the guest imports).
    pub fn export(&self, drv: &str) -> Vec<u8> {
        let closure = self
            .nix
            .nix_store(["--query", "--requisites", drv])
            .unwrap();
        let mut args = vec!["--export".to_owned()];
        args.extend(closure.lines().map(str::to_owned));
        self.nix.run_bytes("nix-store", &args, b"").unwrap()
    }

    /// A task building `attr`, with its inputs served by `controller`.
    pub fn task(&self, controller: &TestController, attr: &str, machine: &str) -> Task {
        let drv = &self.drvs[attr];
        let inputs_url = controller.add_inputs(attr, self.export(drv));
        Task {
            machine: machine.to_owned(),
            repository: "https://example.org/kiln-agent-tests.git".into(),
            derivations: vec![drv.clone()],
            inputs_url,
            settings: BTreeMap::from([(
                "sandbox-paths".to_owned(),
                "/bin/sh=/bin/busybox".to_owned(),
            )]),
        }
    }

    /// Output path → NAR hash from a local `kiln build` of `attrs`.
    pub fn local_kiln_build(&self, attrs: &[&str]) -> BTreeMap<String, String> {
        self.local_kiln_build_with(attrs, &[])
    }

    /// As [`Self::local_kiln_build`], with `extra` arguments to `kiln build`.
    pub fn local_kiln_build_with(
        &self,
        attrs: &[&str],
        extra: &[&str],
    ) -> BTreeMap<String, String> {
        let kiln = kiln_e2e::kiln_bin();
        let root = tempfile::tempdir().unwrap();
        let url = format!("local?root={}", root.path().display());
        let conf = std::fs::read_to_string(self.nix.conf_dir().join("nix.conf")).unwrap();
        let sandbox = conf
            .lines()
            .find_map(|l| l.strip_prefix("sandbox-paths = "))
            .unwrap()
            .to_owned();
        let drvs: Vec<PathBuf> = attrs
            .iter()
            .map(|a| self.nix.physical(&self.drvs[*a]))
            .collect();
        let run = Command::new(kiln)
            .args([
                "build",
                "--store",
                &url,
                "--no-out-link",
                "--option",
                "sandbox-paths",
                &sandbox,
            ])
            .args(extra)
            .args(&drvs)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "local kiln build failed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let mut hashes = BTreeMap::new();
        for attr in attrs {
            let outs = self
                .nix
                .nix_store(["--query", "--outputs", &self.drvs[*attr]])
                .unwrap();
            for out in outs.lines() {
                let hash = self
                    .nix
                    .nix_store(["--store", &url, "--query", "--hash", out])
                    .unwrap();
                hashes.insert(out.to_owned(), hash.trim().to_owned());
            }
        }
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("u+w")
            .arg(root.path())
            .status();
        hashes
    }
}

/// A running `build-agent`, its stderr going to a log file.
pub struct AgentProcess {
    pub child: Child,
    pub log_path: PathBuf,
}

impl AgentProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then wait (panics if it does not stop within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop on SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh agent key, written to `dir/agent.key`.
pub fn agent_key(dir: &Path, name: &str) -> (SecretKey, PathBuf) {
    let key = SecretKey::generate(name).unwrap();
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, format!("{key}\n")).unwrap();
    (key, path)
}

/// Starts the agent with the test's usual settings plus `extra`.
pub fn start_agent(dir: &Path, key: &Path, machines: &Path, extra: &[&str]) -> AgentProcess {
    let bin = kiln_e2e::workspace_bin("build-agent", "build-agent");
    let log_path = dir.join(format!("agent-{}.log", rand_suffix()));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(bin)
        .arg("--machines")
        .arg(machines)
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--key")
        .arg(key)
        .args(["--idle-sleep", "0.2..0.4", "--verbose", "3"])
        .args([
            "--bootstrap-timeout",
            "120",
            "--build-timeout",
            "300",
            "--shutdown-timeout",
            "30",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    AgentProcess { child, log_path }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Whether a process is alive.
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Files under `dir`, recursively (relative paths), for "nothing left behind" checks.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            found.push(p.display().to_string());
            if p.is_dir() {
                found.extend(files_under(&p));
            }
        }
    }
    found
}
