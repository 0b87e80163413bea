//! What became of each derivation: Nix's `BuildResult` statuses, and the
//! process exit code Nix derives from a whole run's failures.

use std::collections::BTreeMap;
use std::fmt;

use kiln_formats::store_path::StorePath;
use serde::Serialize;

/// Nix's `BuildResult::Status`, with Nix's numbering (it crosses the daemon
/// protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    /// True for the statuses that mean the outputs are there.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }

    /// Nix's name for the status, as `nix build --json` and logs print it.
    pub fn name(self) -> &'static str {
        match self {
            BuildStatus::Built => "Built",
            BuildStatus::Substituted => "Substituted",
            BuildStatus::AlreadyValid => "AlreadyValid",
            BuildStatus::PermanentFailure => "PermanentFailure",
            BuildStatus::InputRejected => "InputRejected",
            BuildStatus::OutputRejected => "OutputRejected",
            BuildStatus::TransientFailure => "TransientFailure",
            BuildStatus::CachedFailure => "CachedFailure",
            BuildStatus::TimedOut => "TimedOut",
            BuildStatus::MiscFailure => "MiscFailure",
            BuildStatus::DependencyFailed => "DependencyFailed",
            BuildStatus::LogLimitExceeded => "LogLimitExceeded",
            BuildStatus::NotDeterministic => "NotDeterministic",
            BuildStatus::ResolvesToAlreadyValid => "ResolvesToAlreadyValid",
            BuildStatus::NoSubstituters => "NoSubstituters",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of one derivation goal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    /// What went wrong, for people (empty on success).
    pub error: String,
    /// The wanted outputs and their paths (on success).
    pub outputs: BTreeMap<String, StorePath>,
    /// The fixed-output hash did not match (Nix's exit-code bit 0x02).
    pub hash_mismatch: bool,
    /// `--check` found different output (bit 0x08).
    pub check_mismatch: bool,
    /// Start and stop of the build, seconds since the epoch (0 when nothing ran).
    pub start_time: i64,
    pub stop_time: i64,
}

impl BuildResult {
    /// A result with `status` and an explanation.
    pub fn failure(status: BuildStatus, error: impl Into<String>) -> BuildResult {
        BuildResult {
            status,
            error: error.into(),
            outputs: BTreeMap::new(),
            hash_mismatch: false,
            check_mismatch: false,
            start_time: 0,
            stop_time: 0,
        }
    }

    /// A success with the given outputs.
    pub fn success(status: BuildStatus, outputs: BTreeMap<String, StorePath>) -> BuildResult {
        BuildResult {
            status,
            outputs,
            ..BuildResult::failure(status, "")
        }
    }
}

/// The exit code Nix gives a run whose results are `results`: 0 when all
/// succeeded, else `0x60` with bits for a build failure (`0x04`), a timeout
/// (`0x01`), a fixed-output hash mismatch (`0x02`) and a `--check` mismatch
/// (`0x08`), or 1 when no bit applies — 100, 101, 102, 104 and their
/// combinations.
pub fn exit_code<'a>(results: impl IntoIterator<Item = &'a BuildResult>) -> u8 {
    let (mut failed, mut permanent, mut timed_out, mut hash, mut check) =
        (false, false, false, false, false);
    for r in results {
        if r.status.is_success() {
            continue;
        }
        failed = true;
        permanent |= r.status == BuildStatus::PermanentFailure;
        timed_out |= r.status == BuildStatus::TimedOut;
        hash |= r.hash_mismatch;
        check |= r.check_mismatch || r.status == BuildStatus::NotDeterministic;
    }
    if !failed {
        return 0;
    }
    let mut mask = 0u8;
    if permanent || timed_out || hash {
        mask |= 0x04;
    }
    if timed_out {
        mask |= 0x01;
    }
    if hash {
        mask |= 0x02;
    }
    if check {
        mask |= 0x08;
    }
    if mask != 0 { mask | 0x60 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(status: BuildStatus) -> BuildResult {
        BuildResult::failure(status, "x")
    }

    #[test]
    fn exit_codes_as_nix() {
        assert_eq!(exit_code(&[r(BuildStatus::Built)]), 0);
        assert_eq!(exit_code(&[r(BuildStatus::PermanentFailure)]), 100);
        assert_eq!(exit_code(&[r(BuildStatus::TimedOut)]), 101);
        let mut hash = r(BuildStatus::OutputRejected);
        hash.hash_mismatch = true;
        assert_eq!(exit_code(std::slice::from_ref(&hash)), 102);
        assert_eq!(exit_code(&[r(BuildStatus::NotDeterministic)]), 104);
        assert_eq!(exit_code(&[r(BuildStatus::OutputRejected)]), 1);
        assert_eq!(exit_code(&[r(BuildStatus::LogLimitExceeded)]), 1);
        assert_eq!(
            exit_code(&[
                r(BuildStatus::PermanentFailure),
                r(BuildStatus::TimedOut),
                hash
            ]),
            103
        );
    }
}
