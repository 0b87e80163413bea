//! Machines files in Nix's format (`/etc/nix/machines`, the `builders`
//! setting): one machine per line or per `;`-separated entry, fields
//! separated by white space, `-` for a field's default, `#` comments, and
//! `@FILE` to include another file.
//!
//! ```text
//! ssh://root@10.0.0.2  x86_64-linux,i686-linux  /root/.ssh/id_ed25519  4  2  big-parallel,kvm  -  c3NoLWVkMjU1MTkgQUFBQS4uLgo=
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// One build machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// The store URI as written (`ssh://user@host?remote-program=…`).
    pub uri: String,
    /// The systems it builds for.
    pub systems: Vec<String>,
    /// The SSH private key to log in with.
    pub ssh_key: Option<PathBuf>,
    /// Builds it runs at once.
    pub max_jobs: u32,
    /// How fast it is relative to others (higher is faster).
    pub speed_factor: f64,
    /// Features it offers (mandatory ones included).
    pub supported_features: BTreeSet<String>,
    /// Features a build must ask for to be sent there.
    pub mandatory_features: BTreeSet<String>,
    /// Its SSH host key as a known_hosts key (`ssh-ed25519 AAAA…`).
    pub host_key: Option<String>,
    /// Where it was defined, for messages (`/etc/nix/machines:3`).
    pub origin: String,
    /// Load average per core above which it takes no more builds
    /// (`?max-load=0.8` on the URI; else the hook's setting).
    pub max_load: Option<f64>,
    /// Free disk its store needs before it takes a build
    /// (`?min-free-mb=N` on the URI; else the hook's setting).
    pub min_free_mb: Option<u64>,
}

/// What was wrong with a machines file or `builders` setting.
#[derive(Debug, thiserror::Error)]
pub enum MachinesError {
    #[error("{origin}: field {field} ({name}) is '{given}', expected {expected}")]
    BadField {
        origin: String,
        field: usize,
        name: &'static str,
        given: String,
        expected: &'static str,
    },
    #[error(
        "{origin}: {count} fields, expected at most 8 (URI, systems, SSH key, max jobs, speed factor, supported features, mandatory features, host key)"
    )]
    TooManyFields { origin: String, count: usize },
    #[error("{origin}: cannot read included machines file '{}': {source}", path.display())]
    Include {
        origin: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: machines files include each other too deeply (more than 16 levels)")]
    TooDeep { origin: String },
}

impl Machine {
    /// Whether a build for `system` needing `features` may go here:
    /// every required feature offered, every mandatory one required.
    pub fn can_build(&self, system: &str, features: &BTreeSet<String>) -> bool {
        (system == "builtin" || self.systems.iter().any(|s| s == system))
            && features
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|f| features.contains(f))
    }

    /// A short, file-name-safe name for per-machine state (slots, marks).
    pub fn state_name(&self) -> String {
        let safe: String = self
            .uri
            .chars()
            .take(40)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(self.uri.as_bytes());
        format!(
            "{safe}-{:02x}{:02x}{:02x}{:02x}",
            digest[0], digest[1], digest[2], digest[3]
        )
    }
}

/// Parses the `builders` setting (entries separated by `;` or new lines,
/// `@FILE` includes). `this_system` is the default system list.
pub fn parse_builders(
    text: &str,
    origin: &str,
    this_system: &str,
) -> Result<Vec<Machine>, MachinesError> {
    let mut out = Vec::new();
    parse_into(text, origin, this_system, 0, &mut out)?;
    Ok(out)
}

/// Reads a machines file.
pub fn read_machines_file(path: &Path, this_system: &str) -> Result<Vec<Machine>, MachinesError> {
    parse_builders(&format!("@{}", path.display()), "machines", this_system)
}

fn parse_into(
    text: &str,
    origin: &str,
    this_system: &str,
    depth: usize,
    out: &mut Vec<Machine>,
) -> Result<(), MachinesError> {
    if depth > 16 {
        return Err(MachinesError::TooDeep {
            origin: origin.to_owned(),
        });
    }
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        for entry in line.split(';') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let here = format!("{origin}:{}", n + 1);
            if let Some(file) = entry.strip_prefix('@') {
                let path = PathBuf::from(file.trim());
                match std::fs::read_to_string(&path) {
                    Ok(t) => {
                        parse_into(&t, &path.display().to_string(), this_system, depth + 1, out)?
                    }
                    // Nix's default `@/etc/nix/machines` may well be absent.
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            && depth == 0
                            && path == Path::new("/etc/nix/machines") => {}
                    Err(source) => {
                        return Err(MachinesError::Include {
                            origin: here,
                            path,
                            source,
                        });
                    }
                }
                continue;
            }
            out.push(parse_entry(entry, here, this_system)?);
        }
    }
    Ok(())
}

fn parse_entry(entry: &str, origin: String, this_system: &str) -> Result<Machine, MachinesError> {
    let fields: Vec<&str> = entry.split_whitespace().collect();
    if fields.len() > 8 {
        return Err(MachinesError::TooManyFields {
            origin,
            count: fields.len(),
        });
    }
    let get = |i: usize| {
        fields
            .get(i)
            .copied()
            .filter(|f| *f != "-" && !f.is_empty())
    };
    let bad = |field: usize, name: &'static str, expected: &'static str| MachinesError::BadField {
        origin: origin.clone(),
        field: field + 1,
        name,
        given: fields[field].to_owned(),
        expected,
    };
    let uri = fields[0].to_owned();
    let known_scheme = ["ssh://", "ssh-ng://", "local", "auto", "daemon", "unix://"]
        .iter()
        .any(|s| uri.starts_with(s));
    let uri = if known_scheme {
        uri
    } else if uri.contains("://") {
        return Err(bad(
            0,
            "URI",
            "ssh://[USER@]HOST[:PORT] or ssh-ng://[USER@]HOST[:PORT]",
        ));
    } else {
        // Nix: a bare host name means ssh://.
        format!("ssh://{uri}")
    };
    let list = |s: Option<&str>| -> Vec<String> {
        s.map(|s| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
    };
    let systems = match get(1) {
        Some(s) => list(Some(s)),
        None => vec![this_system.to_owned()],
    };
    let max_jobs = match get(3) {
        Some(s) => s
            .parse::<u32>()
            .map_err(|_| bad(3, "max jobs", "a whole number"))?,
        None => 1,
    };
    let speed_factor = match get(4) {
        Some(s) => match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f.is_finite() => f,
            _ => return Err(bad(4, "speed factor", "a positive number")),
        },
        None => 1.0,
    };
    let mandatory: BTreeSet<String> = list(get(6)).into_iter().collect();
    let mut supported: BTreeSet<String> = list(get(5)).into_iter().collect();
    supported.extend(mandatory.iter().cloned());
    let host_key = match get(7) {
        Some(s) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|_| bad(7, "host key", "base64 of a public host key line"))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| bad(7, "host key", "base64 of a public host key line"))?;
            let text = text.trim().to_owned();
            if !text.starts_with("ssh-") && !text.starts_with("ecdsa-") && !text.starts_with("sk-")
            {
                return Err(bad(
                    7,
                    "host key",
                    "base64 of a public host key line ('ssh-ed25519 AAAA…')",
                ));
            }
            Some(text)
        }
        None => None,
    };
    // Kiln's choice limits ride on the URI, so a machines file shared with
    // Nix stays in Nix's eight-field format.
    let param = |key: &str| {
        uri.split_once('?').and_then(|(_, q)| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        })
    };
    let bad_param =
        |name: &'static str, given: &str, expected: &'static str| MachinesError::BadField {
            origin: origin.clone(),
            field: 1,
            name,
            given: given.to_owned(),
            expected,
        };
    let max_load = match param("max-load") {
        Some(v) => match v.parse::<f64>() {
            Ok(f) if f > 0.0 => Some(f),
            _ => {
                return Err(bad_param(
                    "URI parameter max-load",
                    v,
                    "a positive number (load average per core)",
                ));
            }
        },
        None => None,
    };
    let min_free_mb = match param("min-free-mb") {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| bad_param("URI parameter min-free-mb", v, "a whole number of MiB"))?,
        ),
        None => None,
    };
    Ok(Machine {
        max_load,
        min_free_mb,
        uri,
        systems,
        ssh_key: get(2).map(PathBuf::from),
        max_jobs,
        speed_factor,
        supported_features: supported,
        mandatory_features: mandatory,
        host_key,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_line_and_defaults() {
        let key =
            base64::engine::general_purpose::STANDARD.encode("ssh-ed25519 AAAAC3Nza root@x\n");
        let text = format!(
            "# farm\nssh://root@a x86_64-linux,i686-linux /k 4 2.5 big,kvm kvm {key}\nb - - - - - - -; ssh-ng://c\n"
        );
        let m = parse_builders(&text, "cfg", "x86_64-linux").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].systems, ["x86_64-linux", "i686-linux"]);
        assert_eq!(m[0].max_jobs, 4);
        assert_eq!(m[0].speed_factor, 2.5);
        assert_eq!(
            m[0].host_key.as_deref(),
            Some("ssh-ed25519 AAAAC3Nza root@x")
        );
        assert_eq!(m[1].uri, "ssh://b");
        assert_eq!(m[1].systems, ["x86_64-linux"]);
        assert_eq!(m[1].max_jobs, 1);
        assert_eq!(m[2].uri, "ssh-ng://c");
        assert_eq!(m[2].origin, "cfg:3");
    }

    #[test]
    fn features_and_mandatory() {
        let m =
            &parse_builders("ssh://a x86_64-linux - 1 1 big kvm", "c", "x86_64-linux").unwrap()[0];
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert!(m.can_build("x86_64-linux", &f(&["kvm"])));
        assert!(m.can_build("x86_64-linux", &f(&["kvm", "big"])));
        assert!(
            !m.can_build("x86_64-linux", &f(&["big"])),
            "kvm is mandatory"
        );
        assert!(!m.can_build("x86_64-linux", &f(&[])));
        assert!(!m.can_build("aarch64-linux", &f(&["kvm"])));
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = parse_builders("ssh://a\nssh://b x86_64-linux - many", "m", "x")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "m:2: field 4 (max jobs) is 'many', expected a whole number"
        );
        let e = parse_builders("ssh://b - - 1 0", "m", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("field 5 (speed factor) is '0'"), "{e}");
        let e = parse_builders("ssh://b - - 1 1 - - %%%", "m", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("field 8 (host key)"), "{e}");
        let e = parse_builders("@/nonexistent/machines", "m", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/machines"), "{e}");
    }

    #[test]
    fn includes() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("inner");
        std::fs::write(&inner, "ssh://x\nssh://y - - 2\n").unwrap();
        let outer = dir.path().join("outer");
        std::fs::write(&outer, format!("ssh://w\n@{}\n", inner.display())).unwrap();
        let m = read_machines_file(&outer, "s").unwrap();
        let uris: Vec<_> = m.iter().map(|m| m.uri.as_str()).collect();
        assert_eq!(uris, ["ssh://w", "ssh://x", "ssh://y"]);
        assert!(m[2].origin.ends_with("inner:2"));
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn choice_limits_ride_on_the_uri() {
        let m = parse_builders(
            "ssh://b?max-load=0.75&min-free-mb=512 x86_64-linux - 4 2\nssh://c x86_64-linux",
            "t",
            "x86_64-linux",
        )
        .unwrap();
        assert_eq!(m[0].max_load, Some(0.75));
        assert_eq!(m[0].min_free_mb, Some(512));
        assert_eq!(m[1].max_load, None);
        assert_eq!(m[1].min_free_mb, None);
    }

    #[test]
    fn a_bad_limit_names_the_line_and_parameter() {
        let e = parse_builders(
            "ssh://b?max-load=lots x86_64-linux",
            "machines",
            "x86_64-linux",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("machines:1"), "{e}");
        assert!(e.contains("max-load") && e.contains("'lots'"), "{e}");
    }
}
