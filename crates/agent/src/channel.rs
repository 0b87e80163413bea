//! The host side of the agent ↔ guest channel: a small HTTP server on the
//! host's loopback that qemu's `guestfwd` relays the guest to.
//!
//! Routes (all the guest ever sees):
//! - `GET /task` — the [`GuestTask`]; the first fetch satisfies the startup watchdog;
//! - `GET /inputs` — the export stream of the task's inputs;
//! - `PUT /nar/<base name>`, `PUT /log/<drv base name>` — uploads, kept in the upload directory;
//! - `POST /result` — the guest's [`ResultManifest`]; the build is over.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::protocol::ResultManifest;

/// What went wrong with the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot serve the guest channel on 127.0.0.1: {0}")]
    Bind(String),
    #[error("relay to {addr}: {source}")]
    Relay {
        addr: String,
        source: std::io::Error,
    },
}

/// What the guest is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum GuestTask {
    /// Prepare the machine's disk (store, database) and power off.
    Bootstrap,
    /// Import the inputs, build these derivations, upload the results.
    Build {
        derivations: Vec<String>,
        settings: BTreeMap<String, String>,
    },
    /// Nothing yet: ask again shortly. Served while the agent saves a
    /// booted guest's state, so that a restored copy of it is already
    /// polling and picks up its real task within one poll interval.
    Wait,
}

/// What the channel has seen so far.
#[derive(Debug, Default)]
pub struct ChannelState {
    pub task_fetched: Option<Instant>,
    /// Every `GET /task`, with the last one's time (for [`GuestTask::Wait`]).
    pub task_requests: u32,
    pub last_task_request: Option<Instant>,
    pub result: Option<(Instant, ResultManifest)>,
    pub uploads: Vec<PathBuf>,
}

/// A running channel server; stops when dropped.
pub struct Channel {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ChannelState>>,
}

impl Channel {
    /// Serves `task` (and `inputs`, an export stream file) to one guest;
    /// uploads land in `upload_dir`.
    pub fn serve(
        task: GuestTask,
        inputs: Option<PathBuf>,
        upload_dir: &Path,
    ) -> Result<Channel, ChannelError> {
        let server = Arc::new(
            tiny_http::Server::http("127.0.0.1:0")
                .map_err(|e| ChannelError::Bind(e.to_string()))?,
        );
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| ChannelError::Bind("not an IP address".into()))?;
        let state = Arc::new(Mutex::new(ChannelState::default()));
        let thread = {
            let server = Arc::clone(&server);
            let state = Arc::clone(&state);
            let upload_dir = upload_dir.to_owned();
            let task = serde_json::to_vec(&task).expect("tasks serialise");
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    handle(request, &task, inputs.as_deref(), &upload_dir, &state);
                }
            })
        };
        Ok(Channel {
            server,
            thread: Some(thread),
            addr,
            state,
        })
    }

    pub fn task_fetched(&self) -> Option<Instant> {
        self.state.lock().unwrap().task_fetched
    }

    /// How many times the guest asked for its task, and when it last did.
    pub fn task_requests(&self) -> (u32, Option<Instant>) {
        let state = self.state.lock().unwrap();
        (state.task_requests, state.last_task_request)
    }

    pub fn result(&self) -> Option<(Instant, ResultManifest)> {
        self.state.lock().unwrap().result.clone()
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("addr", &self.addr).finish()
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts only plain file names, so an upload cannot escape its directory.
fn safe_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(c));
    ok.then_some(name)
}

fn handle(
    mut request: tiny_http::Request,
    task: &[u8],
    inputs: Option<&Path>,
    upload_dir: &Path,
    state: &Mutex<ChannelState>,
) {
    let url = request.url().to_owned();
    let method = request.method().clone();
    tracing::debug!(%method, %url, "guest request");
    let respond = |request: tiny_http::Request, code: u16, body: Vec<u8>| {
        let _ = request.respond(tiny_http::Response::from_data(body).with_status_code(code));
    };
    match (&method, url.as_str()) {
        (tiny_http::Method::Get, "/task") => {
            // Answer first: the time recorded is when the guest has it.
            respond(request, 200, task.to_vec());
            let mut state = state.lock().unwrap();
            let now = Instant::now();
            state.task_fetched.get_or_insert(now);
            state.task_requests += 1;
            state.last_task_request = Some(now);
        }
        (tiny_http::Method::Get, "/inputs") => match inputs.map(std::fs::File::open) {
            Some(Ok(file)) => {
                let _ = request.respond(tiny_http::Response::from_file(file));
            }
            _ => respond(request, 404, b"no inputs".to_vec()),
        },
        (tiny_http::Method::Put, path) => {
            let (kind, name) = match path.strip_prefix("/nar/") {
                Some(n) => ("nar", n),
                None => match path.strip_prefix("/log/") {
                    Some(n) => ("log", n),
                    None => return respond(request, 404, Vec::new()),
                },
            };
            let Some(name) = safe_name(name) else {
                return respond(request, 400, b"bad name".to_vec());
            };
            let dir = upload_dir.join(kind);
            let target = dir.join(name);
            let stored = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::File::create(&target))
                .and_then(|mut f| std::io::copy(request.as_reader(), &mut f));
            match stored {
                Ok(_) => {
                    state.lock().unwrap().uploads.push(target);
                    respond(request, 200, Vec::new());
                }
                Err(e) => respond(request, 500, e.to_string().into_bytes()),
            }
        }
        (tiny_http::Method::Post, "/result") => {
            let mut body = Vec::new();
            let _ = request.as_reader().read_to_end(&mut body);
            match serde_json::from_slice::<ResultManifest>(&body) {
                Ok(result) => {
                    state.lock().unwrap().result = Some((Instant::now(), result));
                    respond(request, 200, Vec::new());
                }
                Err(e) => respond(request, 400, e.to_string().into_bytes()),
            }
        }
        _ => respond(request, 404, Vec::new()),
    }
}

/// `build-agent relay ADDR`: what qemu runs for each guest connection — joins
/// stdin/stdout to a TCP connection to the channel at `addr`.
pub fn relay(addr: &str) -> Result<(), ChannelError> {
    let e = |source| ChannelError::Relay {
        addr: addr.to_owned(),
        source,
    };
    let stream = TcpStream::connect(addr).map_err(e)?;
    let mut upstream = stream.try_clone().map_err(e)?;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut downstream = stream;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 65536];
    loop {
        match downstream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    drop(up);
    Ok(())
}
