//! Build settings with `nix.conf`'s names, syntax and defaults: read from a
//! configuration file (`name = value`, `#` comments, `include` /
//! `!include`, `extra-NAME` appending to a list) and overridden one by one
//! (`--option NAME VALUE`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What was wrong with a setting or a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read configuration file '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: expected 'name = value', found '{text}'", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("setting '{name}': '{value}' is not {expected}")]
    BadValue {
        name: String,
        value: String,
        expected: &'static str,
    },
}

/// Nix's `sandbox` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxSetting {
    /// Every build sandboxed (`true`).
    Enabled,
    /// No build sandboxed (`false`): only possible when the store is at its
    /// logical location.
    Disabled,
    /// Sandboxed except derivations with `__noChroot` (`relaxed`).
    Relaxed,
}

/// The settings that matter to building.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Concurrent local builds; 0 means only through the build hook.
    pub max_jobs: usize,
    /// `NIX_BUILD_CORES` given to builders; 0 means all cores.
    pub cores: usize,
    pub keep_going: bool,
    pub keep_failed: bool,
    /// Wall-clock limit of a build (`timeout`), none when 0.
    pub timeout: Option<Duration>,
    /// Limit on a build's silence (`max-silent-time`), none when 0.
    pub max_silent_time: Option<Duration>,
    /// Largest build log in bytes (`max-build-log-size`), none when 0.
    pub max_build_log_size: Option<u64>,
    pub sandbox: SandboxSetting,
    /// `sandbox-paths` plus `extra-sandbox-paths`, in Nix's `inside=host?` form.
    pub sandbox_paths: Vec<String>,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    /// Use substituters at all (`substitute`).
    pub substitute: bool,
    /// Only substitute paths signed by a trusted key (`require-sigs`).
    pub require_sigs: bool,
    /// The build hook program and its arguments (`build-hook`), none when empty.
    pub build_hook: Vec<String>,
    /// `builders`, passed on to the hook.
    pub builders: String,
    pub system: String,
    pub extra_platforms: BTreeSet<String>,
    pub system_features: BTreeSet<String>,
    /// Lines of a failed build's log shown in its error (`log-lines`).
    pub log_lines: usize,
    /// Store build logs at all (`keep-build-log`).
    pub keep_build_log: bool,
    /// Every setting as given, for the build hook.
    pub raw: BTreeMap<String, String>,
    /// Names that are not settings Kiln knows (Nix warns about them).
    pub unknown: BTreeSet<String>,
}

/// The CPUs this process may use, read once: the standard library reads the
/// cgroup's CPU quota files on every call, and every build asks.
fn nproc() -> usize {
    static NPROC: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *NPROC.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn default_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        other => other,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

impl Default for Settings {
    fn default() -> Self {
        let mut system_features: BTreeSet<String> = ["nixos-test", "benchmark", "big-parallel"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            system_features.insert("kvm".into());
        }
        Settings {
            max_jobs: 1,
            cores: 0,
            keep_going: false,
            keep_failed: false,
            timeout: None,
            max_silent_time: None,
            max_build_log_size: None,
            sandbox: SandboxSetting::Enabled,
            sandbox_paths: Vec::new(),
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            substitute: true,
            require_sigs: true,
            build_hook: Vec::new(),
            builders: String::new(),
            system: default_system(),
            extra_platforms: BTreeSet::new(),
            system_features,
            log_lines: 10,
            keep_build_log: true,
            raw: BTreeMap::new(),
            unknown: BTreeSet::new(),
        }
    }
}

fn words(value: &str) -> Vec<String> {
    value.split_whitespace().map(str::to_owned).collect()
}

fn bool_value(name: &str, value: &str) -> Result<bool, SettingsError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(name, value, "a Boolean (true or false)")),
    }
}

fn bad(name: &str, value: &str, expected: &'static str) -> SettingsError {
    SettingsError::BadValue {
        name: name.to_owned(),
        value: value.to_owned(),
        expected,
    }
}

fn number(name: &str, value: &str) -> Result<u64, SettingsError> {
    value
        .parse()
        .map_err(|_| bad(name, value, "a non-negative integer"))
}

fn seconds(name: &str, value: &str) -> Result<Option<Duration>, SettingsError> {
    Ok(match number(name, value)? {
        0 => None,
        n => Some(Duration::from_secs(n)),
    })
}

impl Settings {
    /// The defaults, then `/etc/nix/nix.conf` (or `$NIX_CONF_DIR/nix.conf`)
    /// if it exists, then `$NIX_CONFIG` lines, as Nix reads them.
    pub fn from_environment() -> Result<Settings, SettingsError> {
        let mut settings = Settings::default();
        let dir = std::env::var_os("NIX_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/nix"));
        let file = dir.join("nix.conf");
        if file.exists() {
            settings.apply_file(&file)?;
        }
        if let Ok(text) = std::env::var("NIX_CONFIG") {
            settings.apply_text(&text, Path::new("NIX_CONFIG"))?;
        }
        Ok(settings)
    }

    /// Applies a `nix.conf`-format file.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_owned(),
            source,
        })?;
        self.apply_text(&text, path)
    }

    /// Applies `nix.conf`-format text; `origin` names it in errors and
    /// anchors relative includes.
    pub fn apply_text(&mut self, text: &str, origin: &Path) -> Result<(), SettingsError> {
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut tokens = line.split_whitespace();
            let first = tokens.next().unwrap_or("");
            if first == "include" || first == "!include" {
                let file = tokens.next().unwrap_or("");
                let file = origin
                    .parent()
                    .map_or_else(|| PathBuf::from(file), |d| d.join(file));
                if first == "include" || file.exists() {
                    self.apply_file(&file)?;
                }
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                return Err(SettingsError::Syntax {
                    path: origin.to_owned(),
                    line: n + 1,
                    text: line.to_owned(),
                });
            };
            self.set(name.trim(), value.trim())?;
        }
        Ok(())
    }

    /// Sets one setting by its `nix.conf` name (`--option NAME VALUE`);
    /// `extra-NAME` appends to a list setting.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), SettingsError> {
        if let Some(base) = name.strip_prefix("extra-") {
            let current = self.raw.get(base).cloned().unwrap_or_default();
            let joined = if current.is_empty() {
                value.to_owned()
            } else {
                format!("{current} {value}")
            };
            return self.set(base, &joined);
        }
        match name {
            "max-jobs" | "build-max-jobs" => {
                self.max_jobs = if value == "auto" {
                    nproc()
                } else {
                    number(name, value)? as usize
                }
            }
            "cores" | "build-cores" => self.cores = number(name, value)? as usize,
            "keep-going" => self.keep_going = bool_value(name, value)?,
            "keep-failed" => self.keep_failed = bool_value(name, value)?,
            "timeout" | "build-timeout" => self.timeout = seconds(name, value)?,
            "max-silent-time" | "build-max-silent-time" => {
                self.max_silent_time = seconds(name, value)?
            }
            "max-build-log-size" | "build-max-log-size" => {
                self.max_build_log_size = match number(name, value)? {
                    0 => None,
                    n => Some(n),
                }
            }
            "sandbox" | "build-use-sandbox" | "build-use-chroot" => {
                self.sandbox = match value {
                    "true" => SandboxSetting::Enabled,
                    "false" => SandboxSetting::Disabled,
                    "relaxed" => SandboxSetting::Relaxed,
                    _ => return Err(bad(name, value, "true, false or relaxed")),
                }
            }
            "sandbox-paths" | "build-sandbox-paths" | "build-chroot-dirs" => {
                self.sandbox_paths = words(value)
            }
            "substituters" | "binary-caches" => self.substituters = words(value),
            "trusted-public-keys" | "binary-cache-public-keys" => {
                self.trusted_public_keys = words(value)
            }
            "substitute" | "build-use-substitutes" => self.substitute = bool_value(name, value)?,
            "require-sigs" => self.require_sigs = bool_value(name, value)?,
            "build-hook" => self.build_hook = words(value),
            "builders" => self.builders = value.to_owned(),
            "system" => self.system = value.to_owned(),
            "extra-platforms" => self.extra_platforms = words(value).into_iter().collect(),
            "system-features" => self.system_features = words(value).into_iter().collect(),
            "log-lines" => self.log_lines = number(name, value)? as usize,
            "keep-build-log" | "build-keep-log" => self.keep_build_log = bool_value(name, value)?,
            // Accepted for compatibility: they do not change how Kiln builds.
            "build-users-group"
            | "experimental-features"
            | "fsync-metadata"
            | "show-trace"
            | "store"
            | "auto-optimise-store"
            | "compress-build-log"
            | "fallback"
            | "trusted-users"
            | "allowed-users"
            | "warn-dirty"
            | "connect-timeout"
            | "narinfo-cache-negative-ttl"
            | "trusted-substituters"
            | "keep-outputs"
            | "keep-derivations"
            | "log-format"
            | "pure-eval"
            | "restrict-eval"
            | "sandbox-fallback"
            | "filter-syscalls"
            | "post-build-hook"
            | "secret-key-files"
            | "extra-sandbox-paths"
            | "impersonate-linux-26"
            | "build-dir"
            | "auto-allocate-uids"
            | "nar-buffer-size" => {}
            _ => {
                self.unknown.insert(name.to_owned());
            }
        }
        self.raw.insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    /// The platforms this machine builds for.
    pub fn can_build_for(&self, system: &str) -> bool {
        system == self.system || system == "builtin" || self.extra_platforms.contains(system)
    }

    /// The `NIX_BUILD_CORES` value.
    pub fn build_cores(&self) -> usize {
        if self.cores == 0 { nproc() } else { self.cores }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nix_conf() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("more.conf"), "max-jobs = 7\n").unwrap();
        let main = dir.path().join("nix.conf");
        std::fs::write(
            &main,
            "# comment\nsandbox = relaxed\ntimeout = 3 # trailing\n\
             sandbox-paths = /bin /usr=/usr\nextra-sandbox-paths = /lib?\n\
             include more.conf\n!include missing.conf\nbogus-setting = 1\n",
        )
        .unwrap();
        let mut s = Settings::default();
        s.apply_file(&main).unwrap();
        assert_eq!(s.sandbox, SandboxSetting::Relaxed);
        assert_eq!(s.timeout, Some(Duration::from_secs(3)));
        assert_eq!(s.sandbox_paths, ["/bin", "/usr=/usr", "/lib?"]);
        assert_eq!(s.max_jobs, 7);
        assert!(s.unknown.contains("bogus-setting"));
        s.set("max-silent-time", "0").unwrap();
        assert_eq!(s.max_silent_time, None);
        let err = s.set("sandbox", "maybe").unwrap_err().to_string();
        assert!(err.contains("true, false or relaxed"), "{err}");
        let err = Settings::default()
            .apply_text("just words", Path::new("x.conf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.conf:1"), "{err}");
    }
}
