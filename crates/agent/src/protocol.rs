//! The agent ↔ controller protocol, shared by both ends (the CI crate serves
//! it; the agent and the tests' controller speak it).
//!
//! One exchange, modelled on build2's bbot:
//! 1. the agent `POST`s a [`TaskRequest`] (JSON) to a controller URL;
//! 2. the controller answers a [`TaskResponse`]: empty (`session` is empty,
//!    no work) or a [`Task`] with a session id, a random challenge and a
//!    result URL;
//! 3. the agent uploads each output NAR with `PUT <result_url>/nar/<base name>`
//!    and each build log with `PUT <result_url>/log/<drv base name>`, then
//!    `POST`s a [`ResultRequest`] to the result URL whose
//!    `challenge_signature` is the challenge signed by the agent's ed25519
//!    key ([`sign_challenge`]); the controller checks it against the keys it
//!    knows ([`verify_challenge`]) before believing anything in the result.

use std::collections::BTreeMap;

use base64::Engine as _;
use kiln_formats::signature::{PublicKey, SecretKey, Signature, SignatureError, TrustedKeys};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The protocol version; a machine's `<name>-<protocol>` link names the image
/// revision for it.
pub const PROTOCOL_VERSION: u32 = 1;

/// What went wrong with a message of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("challenge signature '{given}' is malformed: {source}")]
    MalformedSignature {
        given: String,
        source: SignatureError,
    },
    #[error("challenge signature does not verify: {0}")]
    BadSignature(SignatureError),
}

/// A machine as an agent offers it: its id (which changes with every image
/// revision), its name (what tasks ask for) and a line for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineHeader {
    pub id: String,
    pub name: String,
    pub summary: String,
}

/// Interactive mode of a task request, as bbot has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InteractiveMode {
    #[default]
    False,
    True,
    Both,
}

/// "Do you have work for me?" — sent by the agent to each controller in turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRequest {
    pub agent: String,
    pub toolchain_name: String,
    pub toolchain_version: String,
    pub instance: u32,
    pub interactive: InteractiveMode,
    /// SHA-256 (hex) of the agent's ed25519 public key ([`key_fingerprint`]).
    pub fingerprint: String,
    /// The machines this agent has free right now.
    pub machines: Vec<MachineHeader>,
}

/// The controller's answer: no work when `session` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TaskResponse {
    #[serde(default)]
    pub session: String,
    /// Random bytes, base64, to be signed back with the result.
    #[serde(default)]
    pub challenge: String,
    #[serde(default)]
    pub result_url: String,
    #[serde(default)]
    pub task: Option<Task>,
}

impl TaskResponse {
    /// Whether the controller handed out work.
    pub fn has_task(&self) -> bool {
        !self.session.is_empty() && self.task.is_some()
    }
}

/// One unit of work: derivations to build on one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The name of the machine to build on (one the agent offered).
    pub machine: String,
    /// Where the derivations come from (a remote repository URL); a task for a
    /// local repository (`file:` or a path) is refused, as bbot does.
    pub repository: String,
    /// `.drv` store paths to build.
    pub derivations: Vec<String>,
    /// URL of an export stream (`nix-store --export` format) holding the
    /// closure of the derivations: what the guest imports before building.
    pub inputs_url: String,
    /// `nix.conf` settings for the guest's build (e.g. `sandbox-paths`).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

impl Task {
    /// Whether the repository is local to some machine (and so meaningless here).
    pub fn repository_is_local(&self) -> bool {
        let r = self.repository.trim();
        r.is_empty() || r.starts_with('/') || r.starts_with("file:") || r.starts_with('.')
    }
}

/// Overall outcome of a task, bbot's result statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Success,
    Warning,
    Error,
    Abort,
    Abnormal,
    Interrupt,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Success => "success",
            ResultStatus::Warning => "warning",
            ResultStatus::Error => "error",
            ResultStatus::Abort => "abort",
            ResultStatus::Abnormal => "abnormal",
            ResultStatus::Interrupt => "interrupt",
        }
    }
}

/// One output that came back: its store path and what a narinfo would say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputInfo {
    pub path: String,
    /// `sha256:<nixbase32>`.
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
}

/// What happened to one derivation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildOutcome {
    pub drv: String,
    /// The scheduler's status name (`Built`, `PermanentFailure`, …).
    pub status: String,
    #[serde(default)]
    pub error: String,
    /// Output name → output.
    #[serde(default)]
    pub outputs: BTreeMap<String, OutputInfo>,
}

/// The result manifest: written by the guest, completed by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultManifest {
    pub status: ResultStatus,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub builds: Vec<BuildOutcome>,
    /// Where the time went, seconds per phase (boot, fetch, build, upload, shutdown).
    #[serde(default)]
    pub timings: BTreeMap<String, f64>,
}

impl ResultManifest {
    /// A result with no builds, e.g. for a machine that misbehaved.
    pub fn failed(status: ResultStatus, message: impl Into<String>) -> ResultManifest {
        ResultManifest {
            status,
            message: message.into(),
            builds: Vec::new(),
            timings: BTreeMap::new(),
        }
    }
}

/// "Here is what became of session S", signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRequest {
    pub session: String,
    /// [`sign_challenge`]'s signature in Nix's `name:base64` form.
    pub challenge_signature: String,
    pub agent: String,
    pub result: ResultManifest,
}

/// The fingerprint a task request carries: SHA-256 (hex) of the public key's 32 bytes.
pub fn key_fingerprint(key: &PublicKey) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What is signed: the session as well as the challenge, so that a signature
/// cannot be replayed for another session that drew the same challenge.
fn challenge_message(session: &str, challenge: &str) -> Vec<u8> {
    format!("kiln-agent-challenge-1;{session};{challenge}").into_bytes()
}

/// Signs a session's challenge with the agent's key.
pub fn sign_challenge(key: &SecretKey, session: &str, challenge: &str) -> String {
    key.sign(&challenge_message(session, challenge)).to_string()
}

/// Checks a result's challenge signature against the agent keys the controller knows.
pub fn verify_challenge(
    known_agents: &TrustedKeys,
    session: &str,
    challenge: &str,
    signature: &str,
) -> Result<(), ProtocolError> {
    let parsed: Signature =
        signature
            .parse()
            .map_err(|source| ProtocolError::MalformedSignature {
                given: signature.to_owned(),
                source,
            })?;
    known_agents
        .verify(&challenge_message(session, challenge), &parsed)
        .map_err(ProtocolError::BadSignature)
}

/// A fresh random challenge (32 bytes, base64), for controllers.
pub fn new_challenge() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_round_trip_and_tamper() {
        let key = SecretKey::generate("agent-1").unwrap();
        let known = TrustedKeys::parse(&key.to_public().to_string()).unwrap();
        let challenge = new_challenge();
        let sig = sign_challenge(&key, "s1", &challenge);
        verify_challenge(&known, "s1", &challenge, &sig).unwrap();
        assert!(verify_challenge(&known, "s2", &challenge, &sig).is_err());
        assert!(verify_challenge(&known, "s1", &new_challenge(), &sig).is_err());
        let other = SecretKey::generate("agent-1").unwrap();
        let forged = sign_challenge(&other, "s1", &challenge);
        assert!(verify_challenge(&known, "s1", &challenge, &forged).is_err());
        assert!(verify_challenge(&known, "s1", &challenge, "garbage").is_err());
    }

    #[test]
    fn local_repositories_are_recognised() {
        let mut task = Task {
            machine: "m".into(),
            repository: "https://example.org/r.git".into(),
            derivations: vec![],
            inputs_url: String::new(),
            settings: BTreeMap::new(),
        };
        assert!(!task.repository_is_local());
        for local in ["/srv/repo", "file:///srv/repo", "./repo", ""] {
            task.repository = local.into();
            assert!(task.repository_is_local(), "{local}");
        }
    }
}
