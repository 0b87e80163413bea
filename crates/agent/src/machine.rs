//! Machines on disk, as bbot keeps them, and when to bootstrap them.
//!
//! ```text
//! <machines>/<volume>/<name>/
//!   <name>-<P>.<R>/        read-only image revision R for protocol P:
//!     machine.toml         id, name, summary, type, mac, kernel, initrd, disk, qemu options
//!     disk.qcow2 …
//!   <name>-<P> -> <name>-<P>.<R>     the current revision
//!   <name>-<toolchain>/    the bootstrapped machine for a toolchain:
//!     bootstrapped.toml    machine id, toolchain id, agent version
//!     disk.qcow2           overlay of the revision's disk, prepared by the guest
//!   <name>-<toolchain>.lock
//! ```
//!
//! A bootstrapped machine is reused while its machine id, toolchain id and
//! agent version all match; it is redone when one of them changes, and left
//! alone (the machine is not used) while a newer agent's bootstrap is there.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::{MachineHeader, PROTOCOL_VERSION};

/// What went wrong reading the machines directory.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid manifest: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("machine manifest {path} names machine '{found}', but lives in directory '{expected}'")]
    NameMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

/// `machine.toml`: one image revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineManifest {
    /// Unique per revision (bootstraps are redone when it changes).
    pub id: String,
    pub name: String,
    pub summary: String,
    /// Kind of machine; only `qemu-linux` is run today.
    #[serde(rename = "type")]
    pub machine_type: String,
    /// The guest network card's MAC (a random local one when absent).
    #[serde(default)]
    pub mac: Option<String>,
    /// Kernel and initramfs, relative to the revision directory.
    pub kernel: String,
    pub initrd: String,
    /// The qcow2 disk, relative to the revision directory.
    pub disk: String,
    /// Extra kernel command line.
    #[serde(default)]
    pub append: String,
    /// Extra qemu options (memory, CPUs, devices).
    #[serde(default)]
    pub options: Vec<String>,
}

impl MachineManifest {
    pub fn header(&self) -> MachineHeader {
        MachineHeader {
            id: self.id.clone(),
            name: self.name.clone(),
            summary: self.summary.clone(),
        }
    }

    pub fn load(path: &Path) -> Result<MachineManifest, MachineError> {
        read_toml(path)
    }
}

/// `bootstrapped.toml`: what a bootstrapped machine was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrappedManifest {
    pub machine_id: String,
    pub toolchain_id: String,
    pub agent_version: String,
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, MachineError> {
    let text = std::fs::read_to_string(path).map_err(|source| MachineError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| MachineError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Writes `value` as TOML to `path` atomically (temporary file, rename).
pub fn write_toml<T: Serialize>(path: &Path, value: &T) -> Result<(), MachineError> {
    let text = toml::to_string(value).expect("manifests always serialise");
    let tmp = path.with_extension("toml.tmp");
    let w = |source| MachineError::Write {
        path: path.to_owned(),
        source,
    };
    std::fs::write(&tmp, text).map_err(w)?;
    std::fs::rename(&tmp, path).map_err(w)
}

/// One machine found in the tree: its current revision.
#[derive(Debug, Clone)]
pub struct Machine {
    pub volume: String,
    /// `<machines>/<volume>/<name>`.
    pub dir: PathBuf,
    /// The current revision directory.
    pub revision_dir: PathBuf,
    pub manifest: MachineManifest,
}

impl Machine {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn revision_path(&self, relative: &str) -> PathBuf {
        self.revision_dir.join(relative)
    }

    /// `<name>-<toolchain>/`, the bootstrapped machine.
    pub fn bootstrapped_dir(&self, toolchain: &str) -> PathBuf {
        self.dir.join(format!("{}-{toolchain}", self.name()))
    }

    /// `<name>-<toolchain>.lock`.
    pub fn lock_path(&self, toolchain: &str) -> PathBuf {
        self.dir.join(format!("{}-{toolchain}.lock", self.name()))
    }

    /// Where a suspended machine's report goes; the machine is not used while it exists.
    pub fn suspended_path(&self, toolchain: &str) -> PathBuf {
        self.dir
            .join(format!("{}-{toolchain}.suspended", self.name()))
    }
}

/// Every machine under `machines` with a revision for this protocol, sorted
/// by volume and name. Directories without the protocol link are not machines
/// for this agent and are passed over quietly; broken manifests are errors.
pub fn enumerate(machines: &Path) -> Result<Vec<Machine>, MachineError> {
    let mut found = Vec::new();
    for volume in sorted_dirs(machines)? {
        let volume_name = file_name(&volume);
        for dir in sorted_dirs(&volume)? {
            let name = file_name(&dir);
            let link = dir.join(format!("{name}-{PROTOCOL_VERSION}"));
            let Ok(revision_dir) = std::fs::canonicalize(&link) else {
                continue;
            };
            let manifest_path = revision_dir.join("machine.toml");
            let manifest = MachineManifest::load(&manifest_path)?;
            if manifest.name != name {
                return Err(MachineError::NameMismatch {
                    path: manifest_path,
                    expected: name,
                    found: manifest.name,
                });
            }
            found.push(Machine {
                volume: volume_name.clone(),
                dir,
                revision_dir,
                manifest,
            });
        }
    }
    Ok(found)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>, MachineError> {
    let entries = std::fs::read_dir(dir).map_err(|source| MachineError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !file_name(p).starts_with('.'))
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// What to do with a machine's bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootstrapState {
    /// Present and current: use it.
    Current,
    /// Missing, or made from another machine, toolchain or (older) agent: redo it.
    Needed(String),
    /// Made by a newer agent: leave the machine to that agent.
    NewerAgent(String),
}

/// Decides whether `machine` needs bootstrapping for `toolchain_id` by this agent.
pub fn bootstrap_state(
    machine: &Machine,
    toolchain: &str,
    toolchain_id: &str,
    agent_version: &str,
) -> BootstrapState {
    let manifest_path = machine
        .bootstrapped_dir(toolchain)
        .join("bootstrapped.toml");
    let existing: BootstrappedManifest = match read_toml(&manifest_path) {
        Ok(m) => m,
        Err(_) => return BootstrapState::Needed("not bootstrapped yet".into()),
    };
    if compare_versions(&existing.agent_version, agent_version).is_gt() {
        return BootstrapState::NewerAgent(existing.agent_version);
    }
    if existing.machine_id != machine.manifest.id {
        return BootstrapState::Needed(format!(
            "machine changed ({} → {})",
            existing.machine_id, machine.manifest.id
        ));
    }
    if existing.toolchain_id != toolchain_id {
        return BootstrapState::Needed(format!(
            "toolchain changed ({} → {toolchain_id})",
            existing.toolchain_id
        ));
    }
    if existing.agent_version != agent_version {
        return BootstrapState::Needed(format!(
            "agent changed ({} → {agent_version})",
            existing.agent_version
        ));
    }
    BootstrapState::Current
}

/// Compares dotted versions numerically where both parts are numbers.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let mut x = a.split(['.', '-']);
    let mut y = b.split(['.', '-']);
    loop {
        match (x.next(), y.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(p), Some(q)) => {
                let ord = match (p.parse::<u64>(), q.parse::<u64>()) {
                    (Ok(m), Ok(n)) => m.cmp(&n),
                    _ => p.cmp(q),
                };
                if ord.is_ne() {
                    return ord;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine_tree(root: &Path, id: &str) {
        let dir = root.join("vol1/linux");
        let rev = dir.join("linux-1.2");
        std::fs::create_dir_all(&rev).unwrap();
        let manifest = MachineManifest {
            id: id.into(),
            name: "linux".into(),
            summary: "test".into(),
            machine_type: "qemu-linux".into(),
            mac: None,
            kernel: "vmlinuz".into(),
            initrd: "initrd".into(),
            disk: "disk.qcow2".into(),
            append: String::new(),
            options: vec![],
        };
        write_toml(&rev.join("machine.toml"), &manifest).unwrap();
        let _ = std::fs::remove_file(dir.join("linux-1"));
        std::os::unix::fs::symlink("linux-1.2", dir.join("linux-1")).unwrap();
    }

    #[test]
    fn enumerate_and_bootstrap_rules() {
        let root = tempfile::tempdir().unwrap();
        machine_tree(root.path(), "linux-1.2-a");
        std::fs::create_dir_all(root.path().join("vol1/no-link-here")).unwrap();
        let machines = enumerate(root.path()).unwrap();
        assert_eq!(machines.len(), 1);
        let m = &machines[0];
        assert_eq!(m.name(), "linux");
        assert!(matches!(
            bootstrap_state(m, "kiln", "kiln-1", "0.1.0"),
            BootstrapState::Needed(_)
        ));
        let bdir = m.bootstrapped_dir("kiln");
        std::fs::create_dir_all(&bdir).unwrap();
        let record = |machine: &str, tc: &str, agent: &str| {
            write_toml(
                &bdir.join("bootstrapped.toml"),
                &BootstrappedManifest {
                    machine_id: machine.into(),
                    toolchain_id: tc.into(),
                    agent_version: agent.into(),
                },
            )
            .unwrap()
        };
        record("linux-1.2-a", "kiln-1", "0.1.0");
        assert_eq!(
            bootstrap_state(m, "kiln", "kiln-1", "0.1.0"),
            BootstrapState::Current
        );
        assert!(matches!(
            bootstrap_state(m, "kiln", "kiln-2", "0.1.0"),
            BootstrapState::Needed(_)
        ));
        assert!(matches!(
            bootstrap_state(m, "kiln", "kiln-1", "0.2.0"),
            BootstrapState::Needed(_)
        ));
        record("linux-1.2-a", "kiln-1", "0.10.0");
        assert!(matches!(
            bootstrap_state(m, "kiln", "kiln-1", "0.9.0"),
            BootstrapState::NewerAgent(_)
        ));
        record("linux-1.1-a", "kiln-1", "0.1.0");
        assert!(matches!(
            bootstrap_state(m, "kiln", "kiln-1", "0.1.0"),
            BootstrapState::Needed(_)
        ));
    }
}
