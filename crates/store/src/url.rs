//! Store URLs as Nix writes them (`local`, a path, `local?root=DIR`,
//! `file:///DIR`, `https://…`, `daemon`, `unix://PATH`, `ssh://HOST`,
//! `ssh-ng://HOST`), and [`open_store`] for the kinds Kiln can open.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kiln_formats::store_path::StoreDir;

use crate::local::{LocalStore, LocalStoreConfig};
use crate::{Store, StoreError};

/// A parsed store URL: its kind and its `?name=value&…` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    pub kind: StoreKind,
    pub params: BTreeMap<String, String>,
}

/// What kind of store a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// `auto` / empty: the machine's store, or a per-user one when `/nix`
    /// is not writable.
    Auto,
    /// `local`, a path, or `local?root=DIR`: a store on this file system.
    Local,
    /// `file:///DIR`: a binary cache in a directory.
    File(PathBuf),
    /// `http://…` or `https://…`: a binary cache over HTTP.
    Http(String),
    /// `daemon`, `unix://PATH`: a store daemon's socket.
    Daemon(Option<PathBuf>),
    /// `ssh://HOST` (serve protocol).
    Ssh(String),
    /// `ssh-ng://HOST` (daemon protocol over SSH).
    SshNg(String),
}

/// Why a store URL could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("store URL '{url}' has a bad parameter '{param}' (expected name=value)")]
    BadParam { url: String, param: String },
    #[error(
        "store URL '{0}' has an unknown scheme (expected local, a path, file://, http(s)://, daemon, unix://, ssh://, ssh-ng://)"
    )]
    UnknownScheme(String),
    #[error("store URL '{url}': {what}")]
    Bad { url: String, what: String },
}

impl FromStr for StoreUrl {
    type Err = UrlError;
    fn from_str(url: &str) -> Result<StoreUrl, UrlError> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (url, None),
        };
        let mut params = BTreeMap::new();
        for param in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = param.split_once('=').ok_or_else(|| UrlError::BadParam {
                url: url.to_owned(),
                param: param.to_owned(),
            })?;
            params.insert(k.to_owned(), percent_decode(v));
        }
        let kind = if base.is_empty() || base == "auto" {
            StoreKind::Auto
        } else if base == "local" {
            StoreKind::Local
        } else if base.starts_with('/') || base.starts_with("./") || base.starts_with("../") {
            // Nix: a bare path means a store rooted there.
            params.insert("root".into(), base.to_owned());
            StoreKind::Local
        } else if let Some(rest) = base.strip_prefix("file://") {
            StoreKind::File(PathBuf::from(rest))
        } else if base.starts_with("http://") || base.starts_with("https://") {
            StoreKind::Http(base.trim_end_matches('/').to_owned())
        } else if base == "daemon" {
            StoreKind::Daemon(None)
        } else if let Some(rest) = base.strip_prefix("unix://") {
            StoreKind::Daemon(Some(PathBuf::from(rest)))
        } else if let Some(rest) = base.strip_prefix("ssh://") {
            StoreKind::Ssh(rest.to_owned())
        } else if let Some(rest) = base.strip_prefix("ssh-ng://") {
            StoreKind::SshNg(rest.to_owned())
        } else {
            return Err(UrlError::UnknownScheme(url.to_owned()));
        };
        Ok(StoreUrl { kind, params })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            StoreKind::Auto => f.write_str("auto")?,
            StoreKind::Local => f.write_str("local")?,
            StoreKind::File(p) => write!(f, "file://{}", p.display())?,
            StoreKind::Http(u) => f.write_str(u)?,
            StoreKind::Daemon(None) => f.write_str("daemon")?,
            StoreKind::Daemon(Some(p)) => write!(f, "unix://{}", p.display())?,
            StoreKind::Ssh(h) => write!(f, "ssh://{h}")?,
            StoreKind::SshNg(h) => write!(f, "ssh-ng://{h}")?,
        }
        let mut sep = '?';
        for (k, v) in &self.params {
            write!(f, "{sep}{k}={v}")?;
            sep = '&';
        }
        Ok(())
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl StoreUrl {
    /// The configuration of a local store named by this URL (`Auto` or
    /// `Local`), or `None` for other kinds.
    pub fn local_config(&self) -> Result<Option<LocalStoreConfig>, UrlError> {
        let store_dir = match self.params.get("store") {
            Some(dir) => StoreDir::new(dir.clone()).map_err(|e| UrlError::Bad {
                url: self.to_string(),
                what: e.to_string(),
            })?,
            None => StoreDir::default(),
        };
        let root = match (&self.kind, self.params.get("root")) {
            (StoreKind::Auto | StoreKind::Local, Some(root)) => Some(absolute(Path::new(root))),
            (StoreKind::Auto | StoreKind::Local, None) => default_root(&store_dir),
            _ => return Ok(None),
        };
        Ok(Some(LocalStoreConfig {
            root,
            store_dir,
            url: self.to_string(),
        }))
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// `None` (the real `/nix`) when its store and state directories are
/// writable (or can be made: a fresh machine has no `/nix/store` yet),
/// else the per-user root `$XDG_DATA_HOME/kiln/root`
/// (`~/.local/share/kiln/root`).
fn default_root(store_dir: &StoreDir) -> Option<PathBuf> {
    let real = Path::new(store_dir.as_str());
    let state = Path::new("/nix/var/nix");
    if can_write(real) && can_write(state) {
        return None;
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    Some(data.join("kiln/root"))
}

/// Whether `dir` is writable, or, when it does not exist, the nearest
/// directory above it that does (where it would be created).
fn can_write(dir: &Path) -> bool {
    dir.ancestors().find(|d| d.exists()).is_some_and(writable)
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// Opens the store a URL names. Local stores are created on first use.
pub fn open_store(url: &str) -> Result<Box<dyn Store>, StoreError> {
    let parsed: StoreUrl = url.parse()?;
    if let Some(config) = parsed.local_config()? {
        return Ok(Box::new(LocalStore::open(config)?));
    }
    if matches!(parsed.kind, StoreKind::File(_) | StoreKind::Http(_)) {
        return Ok(Box::new(
            crate::binary_cache::BinaryCacheStore::open_parsed(&parsed, Default::default())?,
        ));
    }
    Err(StoreError::Unsupported {
        store: url.to_owned(),
        operation: "opening this kind of store (yet)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store directory that does not exist yet is writable when it can
    /// be made (a fresh machine's `/nix/store`, as root).
    #[test]
    fn a_missing_directory_is_writable_where_it_can_be_made() {
        let dir = tempfile::tempdir().unwrap();
        assert!(can_write(&dir.path().join("nix/store")));
        assert!(!writable(&dir.path().join("nix/store")));
    }

    #[test]
    fn parses_nix_urls() {
        let u: StoreUrl = "local?root=/tmp/x".parse().unwrap();
        assert_eq!(u.kind, StoreKind::Local);
        assert_eq!(u.params["root"], "/tmp/x");
        let u: StoreUrl = "/tmp/y".parse().unwrap();
        assert_eq!(u.params["root"], "/tmp/y");
        assert_eq!(u.to_string(), "local?root=/tmp/y");
        let u: StoreUrl = "file:///tmp/cache?compression=xz".parse().unwrap();
        assert_eq!(u.kind, StoreKind::File("/tmp/cache".into()));
        assert_eq!(u.params["compression"], "xz");
        assert_eq!(
            "https://cache.nixos.org/".parse::<StoreUrl>().unwrap().kind,
            StoreKind::Http("https://cache.nixos.org".into())
        );
        assert!("gopher://x".parse::<StoreUrl>().is_err());
        assert!("local?root".parse::<StoreUrl>().is_err());
        let cfg = "local?root=/tmp/z&store=/gnu/store"
            .parse::<StoreUrl>()
            .unwrap()
            .local_config()
            .unwrap()
            .unwrap();
        assert_eq!(cfg.store_dir.as_str(), "/gnu/store");
        assert_eq!(cfg.root.as_deref(), Some(Path::new("/tmp/z")));
    }
}
