//! The agent's side of talking to controllers: polling for a task, refusing
//! the tasks it must not take, and posting results.

use std::path::Path;
use std::time::Duration;

use crate::protocol::{ResultRequest, TaskRequest, TaskResponse};

/// What went wrong talking to a controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("controller {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("controller {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("controller {url} sent a response that is not a task response: {source}")]
    BadResponse {
        url: String,
        source: serde_json::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Why a task was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("task for machine '{0}', which this agent did not offer")]
    MachineNotOffered(String),
    #[error("task for a local repository '{0}'")]
    LocalRepository(String),
}

/// An HTTP client for controllers.
#[derive(Debug, Clone)]
pub struct ControllerClient {
    agent: ureq::Agent,
}

impl Default for ControllerClient {
    fn default() -> Self {
        ControllerClient::new()
    }
}

impl ControllerClient {
    pub fn new() -> ControllerClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(600)))
            .user_agent(concat!("kiln-build-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        ControllerClient { agent }
    }

    fn checked(
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Vec<u8>, ControllerError> {
        let mut response = r.map_err(|e| ControllerError::Unreachable {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_vec()
            .map_err(|e| ControllerError::Unreachable {
                url: url.to_owned(),
                message: e.to_string(),
            })?;
        if !(200..300).contains(&status) {
            return Err(ControllerError::Status {
                url: url.to_owned(),
                status,
                body: String::from_utf8_lossy(&body).chars().take(500).collect(),
            });
        }
        Ok(body)
    }

    /// Asks one controller for a task.
    pub fn request_task(
        &self,
        url: &str,
        request: &TaskRequest,
    ) -> Result<TaskResponse, ControllerError> {
        let body = serde_json::to_vec(request).expect("serialises");
        let reply = Self::checked(
            url,
            self.agent
                .post(url)
                .header("Content-Type", "application/json")
                .send(&body[..]),
        )?;
        if reply.iter().all(u8::is_ascii_whitespace) {
            return Ok(TaskResponse::default());
        }
        serde_json::from_slice(&reply).map_err(|source| ControllerError::BadResponse {
            url: url.to_owned(),
            source,
        })
    }

    /// Downloads `url` into `dest`; `file://` URLs (for `--fake-request`
    /// tasks an operator writes by hand) are copied.
    pub fn download(&self, url: &str, dest: &Path) -> Result<(), ControllerError> {
        if let Some(path) = url.strip_prefix("file://") {
            return std::fs::copy(path, dest)
                .map(drop)
                .map_err(|source| ControllerError::Read {
                    path: path.into(),
                    source,
                });
        }
        let response = self.agent.get(url).call();
        let mut response = response.map_err(|e| ControllerError::Unreachable {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(ControllerError::Status {
                url: url.to_owned(),
                status,
                body: String::new(),
            });
        }
        let mut file = std::fs::File::create(dest).map_err(|source| ControllerError::Read {
            path: dest.to_owned(),
            source,
        })?;
        std::io::copy(&mut response.body_mut().as_reader(), &mut file).map_err(|e| {
            ControllerError::Unreachable {
                url: url.to_owned(),
                message: e.to_string(),
            }
        })?;
        Ok(())
    }

    /// `PUT`s a file next to the result URL (`<result_url>/<kind>/<name>`).
    pub fn upload(
        &self,
        result_url: &str,
        kind: &str,
        name: &str,
        file: &Path,
    ) -> Result<(), ControllerError> {
        let url = format!("{}/{kind}/{name}", result_url.trim_end_matches('/'));
        let f = std::fs::File::open(file).map_err(|source| ControllerError::Read {
            path: file.to_owned(),
            source,
        })?;
        Self::checked(&url, self.agent.put(&url).send(f)).map(drop)
    }

    /// Posts the signed result.
    pub fn post_result(
        &self,
        result_url: &str,
        request: &ResultRequest,
    ) -> Result<(), ControllerError> {
        let body = serde_json::to_vec(request).expect("serialises");
        Self::checked(
            result_url,
            self.agent
                .post(result_url)
                .header("Content-Type", "application/json")
                .send(&body[..]),
        )
        .map(drop)
    }
}

/// Checks a task against what was offered: the machine must be one of
/// `offered`, and the repository must not be local.
pub fn check_task(response: &TaskResponse, offered: &[String]) -> Result<(), Refusal> {
    let Some(task) = &response.task else {
        return Ok(());
    };
    if !offered.iter().any(|m| *m == task.machine) {
        return Err(Refusal::MachineNotOffered(task.machine.clone()));
    }
    if task.repository_is_local() {
        return Err(Refusal::LocalRepository(task.repository.clone()));
    }
    Ok(())
}
