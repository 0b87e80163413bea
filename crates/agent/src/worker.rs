//! The guest side: `build-agent worker`, run by the VM's init.
//!
//! It fetches its [`GuestTask`] from the agent's channel, and either prepares
//! the machine's store (bootstrap) or imports the inputs, builds the
//! derivations with Kiln's scheduler in the sandbox, and uploads each output
//! as a NAR, each build log, and the result manifest. The store is the one
//! under `root` (the VM's disk, mounted at `/nix`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Seek as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_scheduler::goals::Wanted;
use kiln_scheduler::settings::Settings;
use kiln_store::Store as _;
use kiln_store::local::LocalStore;

use crate::channel::GuestTask;
use crate::protocol::{BuildOutcome, OutputInfo, ResultManifest, ResultStatus};

/// What went wrong in the guest.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot reach the agent at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("the agent answered {status} to {url}")]
    Status { url: String, status: u16 },
    #[error("the agent's task is not valid JSON: {0}")]
    BadTask(serde_json::Error),
    #[error("store under {root}: {source}")]
    Store {
        root: PathBuf,
        source: kiln_store::StoreError,
    },
    #[error("temporary file: {0}")]
    Temp(std::io::Error),
}

/// Where the guest finds the agent: `kiln.agent=URL` on the kernel command line,
/// else qemu's guestfwd address.
pub fn agent_url_from_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline")
        .ok()
        .and_then(|line| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("kiln.agent=").map(str::to_owned))
        })
        .unwrap_or_else(|| format!("http://{}", crate::qemu::GUEST_AGENT_ADDR))
}

struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(base: &str) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn check(
        &self,
        path: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>, WorkerError> {
        let response = r.map_err(|e| WorkerError::Transport {
            url: self.url(path),
            message: e.to_string(),
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(WorkerError::Status {
                url: self.url(path),
                status,
            });
        }
        Ok(response)
    }

    fn get(&self, path: &str) -> Result<ureq::http::Response<ureq::Body>, WorkerError> {
        self.check(path, self.agent.get(&self.url(path)).call())
    }

    /// A GET that gives up within seconds (polling: a dead connection is
    /// retried rather than waited on).
    fn get_quick(&self, path: &str) -> Result<ureq::http::Response<ureq::Body>, WorkerError> {
        let request = self
            .agent
            .get(&self.url(path))
            .config()
            .timeout_global(Some(Duration::from_secs(3)))
            .build();
        self.check(path, request.call())
    }

    fn put_file(&self, path: &str, file: std::fs::File) -> Result<(), WorkerError> {
        self.check(path, self.agent.put(&self.url(path)).send(file))
            .map(drop)
    }

    fn put_bytes(&self, path: &str, body: &[u8]) -> Result<(), WorkerError> {
        self.check(path, self.agent.put(&self.url(path)).send(body))
            .map(drop)
    }

    fn post_json<T: serde::Serialize>(&self, path: &str, value: &T) -> Result<(), WorkerError> {
        let body = serde_json::to_vec(value).expect("serialises");
        self.check(
            path,
            self.agent
                .post(&self.url(path))
                .header("Content-Type", "application/json")
                .send(&body[..]),
        )
        .map(drop)
    }
}

/// How often a waiting guest asks for its task again.
const POLL: Duration = Duration::from_millis(50);

/// Asks for the task until it is not [`GuestTask::Wait`]. Once the agent
/// has answered at all, failures are retried too: a guest restored from a
/// saved state finds the connection it had open gone.
fn fetch_task(client: &Client) -> Result<(GuestTask, Instant), WorkerError> {
    let mut answered = false;
    let mut failures = 0u32;
    loop {
        let start = Instant::now();
        let body = client.get_quick("/task").and_then(|r| {
            r.into_body()
                .read_to_vec()
                .map_err(|e| WorkerError::Transport {
                    url: client.url("/task"),
                    message: e.to_string(),
                })
        });
        match body {
            Ok(body) => {
                answered = true;
                failures = 0;
                match serde_json::from_slice(&body).map_err(WorkerError::BadTask)? {
                    GuestTask::Wait => std::thread::sleep(POLL),
                    task => return Ok((task, start)),
                }
            }
            Err(e) if answered && failures < 100 => {
                failures += 1;
                tracing::debug!("asking for the task again after: {e}");
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the worker against the agent at `agent_url` with the store under `root`.
pub fn run(agent_url: &str, root: &Path) -> Result<ResultStatus, WorkerError> {
    let client = Client::new(agent_url);
    let store_err = |source| WorkerError::Store {
        root: root.to_owned(),
        source,
    };
    // Opened before the task is asked for, so a guest state saved while it
    // waits (see `GuestTask::Wait`) has the store open already.
    let store = Arc::new(LocalStore::open_root(root).map_err(store_err)?);
    let (task, start) = fetch_task(&client)?;
    let (derivations, settings) = match task {
        GuestTask::Bootstrap => {
            // Opening the store made its directories and database; that is the preparation.
            let result = ResultManifest::failed(ResultStatus::Success, "bootstrapped");
            client.post_json("/result", &result)?;
            return Ok(ResultStatus::Success);
        }
        GuestTask::Build {
            derivations,
            settings,
        } => (derivations, settings),
        GuestTask::Wait => unreachable!("fetch_task waits these out"),
    };
    let mut timings = BTreeMap::new();
    let inputs = client.get("/inputs")?;
    let mut reader = BufReader::new(inputs.into_body().into_reader());
    store.import_paths(&mut reader).map_err(store_err)?;
    let fetched = Instant::now();
    timings.insert("guest-fetch".to_owned(), (fetched - start).as_secs_f64());

    // On the serial console: the operator (and the tests) see how far the guest got.
    tracing::info!("kiln-worker: building {} derivation(s)", derivations.len());
    let result = build(&store, &derivations, &settings);
    let built = Instant::now();
    timings.insert("guest-build".to_owned(), (built - fetched).as_secs_f64());
    let mut manifest = match result {
        Ok(builds) => {
            let status = if builds
                .iter()
                .all(|b| !b.outputs.is_empty() || b.status == "AlreadyValid")
            {
                ResultStatus::Success
            } else {
                ResultStatus::Error
            };
            ResultManifest {
                status,
                message: String::new(),
                builds,
                timings: BTreeMap::new(),
            }
        }
        Err(message) => ResultManifest::failed(ResultStatus::Error, message),
    };
    upload(&client, &store, &manifest)?;
    timings.insert("guest-upload".to_owned(), built.elapsed().as_secs_f64());
    manifest.timings = timings;
    client.post_json("/result", &manifest)?;
    Ok(manifest.status)
}

fn build(
    store: &Arc<LocalStore>,
    derivations: &[String],
    overrides: &BTreeMap<String, String>,
) -> Result<Vec<BuildOutcome>, String> {
    let mut settings = Settings::default();
    for (name, value) in overrides {
        settings
            .set(name, value)
            .map_err(|e| format!("setting {name}: {e}"))?;
    }
    let store_dir = store.store_dir().clone();
    let mut targets = Vec::new();
    for drv in derivations {
        let path = store_dir
            .parse_path(drv)
            .map_err(|e| format!("derivation '{drv}': {e}"))?;
        targets.push((path, Wanted::All));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let report = runtime
        .block_on(kiln_scheduler::build(
            Arc::clone(store),
            settings,
            targets,
            Arc::new(kiln_scheduler::events::Quiet),
        ))
        .map_err(|e| e.to_string())?;
    let mut outcomes = Vec::new();
    for (drv, result) in &report.targets {
        let mut outputs = BTreeMap::new();
        if result.status.is_success() {
            for (name, path) in &result.outputs {
                let info = store.path_info_or_error(path).map_err(|e| e.to_string())?;
                outputs.insert(
                    name.clone(),
                    OutputInfo {
                        path: store_dir.print_path(path),
                        nar_hash: info.nar_hash.to_string(),
                        nar_size: info.nar_size,
                        references: info
                            .references
                            .iter()
                            .map(|r| store_dir.print_path(r))
                            .collect(),
                    },
                );
            }
        }
        outcomes.push(BuildOutcome {
            drv: store_dir.print_path(drv),
            status: result.status.name().to_owned(),
            error: result.error.clone(),
            outputs,
        });
    }
    Ok(outcomes)
}

fn upload(
    client: &Client,
    store: &LocalStore,
    manifest: &ResultManifest,
) -> Result<(), WorkerError> {
    let store_dir = store.store_dir().clone();
    let log_dir = kiln_scheduler::logs::log_dir_for_state_dir(store.state_dir());
    let mut sent = BTreeSet::new();
    for build in &manifest.builds {
        if let Ok(drv) = store_dir.parse_path(&build.drv)
            && let Ok(log) = kiln_scheduler::logs::read_log(&log_dir, &drv)
        {
            client.put_bytes(&format!("/log/{}", drv.base_name()), &log)?;
        }
        for output in build.outputs.values() {
            let Ok(path) = store_dir.parse_path(&output.path) else {
                continue;
            };
            if !sent.insert(path.clone()) {
                continue;
            }
            let mut spool = tempfile_in_tmp().map_err(WorkerError::Temp)?;
            store
                .nar_from_path(&path, &mut spool)
                .map_err(|source| WorkerError::Store {
                    root: PathBuf::from("/"),
                    source,
                })?;
            spool.rewind().map_err(WorkerError::Temp)?;
            client.put_file(&format!("/nar/{}", path.base_name()), spool)?;
        }
    }
    Ok(())
}

fn tempfile_in_tmp() -> std::io::Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!(
        "kiln-worker-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}
