//! Nix's configuration files, read for the settings the store acts on:
//! `trusted-public-keys` (which signatures a substituted path needs),
//! `keep-outputs` and `keep-derivations` (what the collector keeps).
//!
//! The files are those Nix 2.8 reads, in its order, later ones overriding
//! earlier ones: `$NIX_CONF_DIR/nix.conf` (default `/etc/nix/nix.conf`),
//! then `$NIX_USER_CONF_FILES` (colon-separated) or else `nix/nix.conf`
//! under `$XDG_CONFIG_DIRS` and `$XDG_CONFIG_HOME` (`~/.config`), then the
//! text of `$NIX_CONFIG`. Each line is `name = value` (`#` starts a
//! comment); `extra-name = value` appends to `name`; `include FILE` and
//! `!include FILE` (no error when missing) read another file, relative to
//! the including one.
//!
//! ```
//! use kiln_store::nix_conf::NixConf;
//!
//! let conf = NixConf::parse_str("keep-outputs = true\nextra-trusted-public-keys = \n", None)?;
//! assert!(conf.keep_outputs()?);
//! assert!(conf.keep_derivations()?);
//! # Ok::<(), kiln_store::nix_conf::NixConfError>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_formats::signature::{SignatureError, TrustedKeys};

/// What was wrong with a configuration file or a setting in it.
#[derive(Debug, thiserror::Error)]
pub enum NixConfError {
    #[error("cannot read Nix configuration '{}': {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}, line {line}: expected 'name = value' or 'include FILE', got '{text}'")]
    Syntax {
        origin: String,
        line: usize,
        text: String,
    },
    #[error("Nix configuration: '{name}' must be 'true' or 'false', got '{value}'")]
    NotABoolean { name: String, value: String },
    #[error("Nix configuration: trusted-public-keys: {0}")]
    BadKey(#[from] SignatureError),
    #[error("{origin}: includes nested deeper than {MAX_DEPTH} (an include loop?)")]
    TooDeep { origin: String },
}

const MAX_DEPTH: usize = 16;

/// Settings read from Nix's configuration (names as Nix spells them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixConf {
    settings: BTreeMap<String, String>,
}

/// Old names Nix still accepts for the settings read here.
fn canonical_name(name: &str) -> &str {
    match name {
        "binary-cache-public-keys" => "trusted-public-keys",
        "gc-keep-outputs" => "keep-outputs",
        "gc-keep-derivations" => "keep-derivations",
        other => other,
    }
}

impl NixConf {
    /// Reads the files Nix 2.8 reads, from the process's environment.
    pub fn load() -> Result<NixConf, NixConfError> {
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let mut conf = NixConf::default();
        let conf_dir = env("NIX_CONF_DIR").map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from);
        conf.read_file(&conf_dir.join("nix.conf"), true, 0)?;
        match env("NIX_USER_CONF_FILES") {
            Some(files) => {
                for f in std::env::split_paths(&files) {
                    conf.read_file(&f, true, 0)?;
                }
            }
            None => {
                // Least important first, so later ones override.
                let mut dirs: Vec<PathBuf> = env("XDG_CONFIG_DIRS")
                    .map(|d| std::env::split_paths(&d).collect())
                    .unwrap_or_else(|| vec![PathBuf::from("/etc/xdg")]);
                dirs.reverse();
                let home = env("XDG_CONFIG_HOME")
                    .map(PathBuf::from)
                    .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".config")));
                dirs.extend(home);
                for d in dirs {
                    conf.read_file(&d.join("nix/nix.conf"), true, 0)?;
                }
            }
        }
        if let Some(text) = env("NIX_CONFIG") {
            conf.apply(&text.to_string_lossy(), None, "NIX_CONFIG", 0)?;
        }
        Ok(conf)
    }

    /// Settings from `text`; includes are resolved against `dir`.
    pub fn parse_str(text: &str, dir: Option<&Path>) -> Result<NixConf, NixConfError> {
        let mut conf = NixConf::default();
        conf.apply(text, dir, "configuration text", 0)?;
        Ok(conf)
    }

    /// The raw value of a setting, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.settings.get(canonical_name(name)).map(String::as_str)
    }

    /// Sets a setting (as `--option NAME VALUE` does over the files).
    pub fn set(&mut self, name: &str, value: &str) {
        self.settings
            .insert(canonical_name(name).to_owned(), normalise(value));
    }

    /// A boolean setting, `default` when unset.
    pub fn bool(&self, name: &str, default: bool) -> Result<bool, NixConfError> {
        match self.get(name) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(NixConfError::NotABoolean {
                name: name.to_owned(),
                value: other.to_owned(),
            }),
        }
    }

    /// `keep-outputs` (default false).
    pub fn keep_outputs(&self) -> Result<bool, NixConfError> {
        self.bool("keep-outputs", false)
    }

    /// `keep-derivations` (default true).
    pub fn keep_derivations(&self) -> Result<bool, NixConfError> {
        self.bool("keep-derivations", true)
    }

    /// `trusted-public-keys` (Nix's default: the key of cache.nixos.org).
    pub fn trusted_public_keys(&self) -> Result<TrustedKeys, NixConfError> {
        let list = self
            .get("trusted-public-keys")
            .unwrap_or("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=");
        Ok(TrustedKeys::parse(list)?)
    }

    fn read_file(&mut self, file: &Path, optional: bool, depth: usize) -> Result<(), NixConfError> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(NixConfError::Read {
                    file: file.to_path_buf(),
                    source,
                });
            }
        };
        let origin = file.display().to_string();
        self.apply(&text, file.parent(), &origin, depth)
    }

    fn apply(
        &mut self,
        text: &str,
        dir: Option<&Path>,
        origin: &str,
        depth: usize,
    ) -> Result<(), NixConfError> {
        if depth > MAX_DEPTH {
            return Err(NixConfError::TooDeep {
                origin: origin.to_owned(),
            });
        }
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [kw @ ("include" | "!include"), file] = words[..] {
                let path = match dir {
                    Some(d) => d.join(file),
                    None => PathBuf::from(file),
                };
                self.read_file(&path, kw == "!include", depth + 1)?;
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                return Err(NixConfError::Syntax {
                    origin: origin.to_owned(),
                    line: i + 1,
                    text: raw.to_owned(),
                });
            };
            let name = name.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(NixConfError::Syntax {
                    origin: origin.to_owned(),
                    line: i + 1,
                    text: raw.to_owned(),
                });
            }
            match name.strip_prefix("extra-") {
                Some(base) => {
                    let entry = self
                        .settings
                        .entry(canonical_name(base).to_owned())
                        .or_default();
                    let added = normalise(value);
                    if !added.is_empty() {
                        if !entry.is_empty() {
                            entry.push(' ');
                        }
                        entry.push_str(&added);
                    }
                }
                None => self.set(name, value),
            }
        }
        Ok(())
    }
}

/// Values are whitespace-separated words; Nix keeps them one space apart.
fn normalise(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "a-1:rO1xOaBqyvcmSgYoK4T/HmCfjt3/JM6hnX4dFDN4NFE=";

    #[test]
    fn files_includes_extra_and_old_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("more.conf"),
            "gc-keep-derivations = false # old name\n",
        )
        .unwrap();
        let conf = NixConf::parse_str(
            &format!(
                "# comment\nkeep-outputs = true\ninclude more.conf\n!include missing.conf\n\
                 trusted-public-keys = {KEY_A}\nextra-trusted-public-keys =   \n"
            ),
            Some(dir.path()),
        )
        .unwrap();
        assert!(conf.keep_outputs().unwrap());
        assert!(!conf.keep_derivations().unwrap());
        assert_eq!(conf.trusted_public_keys().unwrap().len(), 1);
        assert!(conf.trusted_public_keys().unwrap().get("a-1").is_some());
    }

    #[test]
    fn defaults_and_errors() {
        let conf = NixConf::default();
        assert!(!conf.keep_outputs().unwrap());
        assert!(conf.keep_derivations().unwrap());
        assert!(
            conf.trusted_public_keys()
                .unwrap()
                .get("cache.nixos.org-1")
                .is_some()
        );
        let bad = NixConf::parse_str("keep-outputs = yes\n", None).unwrap();
        assert!(matches!(
            bad.keep_outputs(),
            Err(NixConfError::NotABoolean { .. })
        ));
        let e = NixConf::parse_str("just words here\n", None).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = NixConf::parse_str("include /nonexistent/nix.conf\n", None).unwrap_err();
        assert!(matches!(e, NixConfError::Read { .. }), "{e}");
    }
}
