//! Where a binary cache's files live: a directory (`file://DIR`) or an HTTP
//! server (`http(s)://…`). Files are named relative to the cache root
//! (`nix-cache-info`, `<hash>.narinfo`, `nar/<filehash>.nar.xz`, `log/…`).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::path::PathBuf;
use std::time::Duration;

use tempfile::NamedTempFile;

use super::BinaryCacheError;

/// A file being downloaded.
pub(crate) type Download = Box<dyn Read + Send>;

/// Reading and writing the files of one cache.
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// The cache's URL, for messages.
    fn url(&self) -> &str;
    /// The file's contents as a stream, or `None` if it does not exist.
    fn get(&self, file: &str) -> Result<Option<Download>, BinaryCacheError>;
    /// Whether the file exists.
    fn exists(&self, file: &str) -> Result<bool, BinaryCacheError>;
    /// A temporary file to write a new cache file into before
    /// [`put_spooled`](Backend::put_spooled) publishes it.
    fn spool(&self) -> Result<NamedTempFile, BinaryCacheError>;
    /// Publishes a spooled file under `file`, atomically: readers see the
    /// old state or the whole file, never a part.
    fn put_spooled(
        &self,
        file: &str,
        spool: NamedTempFile,
        content_type: &str,
    ) -> Result<(), BinaryCacheError>;
    /// Publishes small contents under `file`, atomically.
    fn put(&self, file: &str, contents: &[u8], content_type: &str) -> Result<(), BinaryCacheError> {
        let mut spool = self.spool()?;
        io::Write::write_all(&mut spool, contents).map_err(|e| self.write_error(file, e))?;
        self.put_spooled(file, spool, content_type)
    }
    /// The names of the `.narinfo` files, when the backend can list them.
    fn list_narinfos(&self) -> Result<Option<Vec<String>>, BinaryCacheError> {
        Ok(None)
    }

    fn read_error(&self, file: &str, source: io::Error) -> BinaryCacheError {
        BinaryCacheError::Read {
            cache: self.url().to_owned(),
            file: file.to_owned(),
            source,
        }
    }
    fn write_error(&self, file: &str, source: io::Error) -> BinaryCacheError {
        BinaryCacheError::Write {
            cache: self.url().to_owned(),
            file: file.to_owned(),
            source,
        }
    }
}

/// A cache in a directory.
#[derive(Debug)]
pub(crate) struct FileBackend {
    url: String,
    dir: PathBuf,
}

impl FileBackend {
    /// Creates the directory and its `nar/` and `log/` on first use, as Nix
    /// does.
    pub(crate) fn open(url: String, dir: PathBuf) -> Result<FileBackend, BinaryCacheError> {
        let backend = FileBackend { url, dir };
        for sub in ["", "nar", "log"] {
            let d = backend.dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| backend.write_error(sub, e))?;
        }
        Ok(backend)
    }
}

impl Backend for FileBackend {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, file: &str) -> Result<Option<Download>, BinaryCacheError> {
        match File::open(self.dir.join(file)) {
            Ok(f) => Ok(Some(Box::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.read_error(file, e)),
        }
    }

    fn exists(&self, file: &str) -> Result<bool, BinaryCacheError> {
        match fs::symlink_metadata(self.dir.join(file)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.read_error(file, e)),
        }
    }

    fn spool(&self) -> Result<NamedTempFile, BinaryCacheError> {
        // In the cache itself, so publishing is a rename.
        tempfile::Builder::new()
            .prefix(".kiln-upload-")
            .tempfile_in(&self.dir)
            .map_err(|e| self.write_error(".kiln-upload-*", e))
    }

    fn put_spooled(
        &self,
        file: &str,
        spool: NamedTempFile,
        _content_type: &str,
    ) -> Result<(), BinaryCacheError> {
        use std::os::unix::fs::PermissionsExt;
        // Temporary files are 0600; cache files are for everyone to read.
        spool
            .as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(|e| self.write_error(file, e))?;
        spool
            .persist(self.dir.join(file))
            .map_err(|e| self.write_error(file, e.error))?;
        Ok(())
    }

    fn list_narinfos(&self) -> Result<Option<Vec<String>>, BinaryCacheError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| self.read_error(".", e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.read_error(".", e))?;
            if let Some(name) = entry.file_name().to_str() {
                if name.ends_with(".narinfo") {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(Some(names))
    }
}

/// A cache served over HTTP(S). Uploads are `PUT`s, as Nix makes them.
#[derive(Debug)]
pub(crate) struct HttpBackend {
    url: String,
    agent: ureq::Agent,
}

impl HttpBackend {
    pub(crate) fn new(url: String) -> HttpBackend {
        let agent = ureq::Agent::config_builder()
            // 404 is an answer ("not in this cache"), not a failure.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(300)))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        HttpBackend { url, agent }
    }

    fn file_url(&self, file: &str) -> String {
        format!("{}/{file}", self.url.trim_end_matches('/'))
    }

    fn transport(&self, file: &str, e: ureq::Error) -> BinaryCacheError {
        BinaryCacheError::Transport {
            cache: self.url.clone(),
            url: self.file_url(file),
            message: e.to_string(),
        }
    }

    fn status(&self, file: &str, status: u16) -> BinaryCacheError {
        BinaryCacheError::HttpStatus {
            cache: self.url.clone(),
            url: self.file_url(file),
            status,
        }
    }
}

/// Statuses that mean "no such file" (some servers answer 403 for that).
fn is_missing(status: u16) -> bool {
    matches!(status, 403 | 404 | 410)
}

impl Backend for HttpBackend {
    fn url(&self) -> &str {
        &self.url
    }

    fn get(&self, file: &str) -> Result<Option<Download>, BinaryCacheError> {
        let response = self
            .agent
            .get(&self.file_url(file))
            .call()
            .map_err(|e| self.transport(file, e))?;
        let status = response.status().as_u16();
        if is_missing(status) {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(self.status(file, status));
        }
        // `into_reader` errors when the connection ends before
        // Content-Length bytes: a cut download is never a short file.
        Ok(Some(Box::new(response.into_body().into_reader())))
    }

    fn exists(&self, file: &str) -> Result<bool, BinaryCacheError> {
        let response = self
            .agent
            .head(&self.file_url(file))
            .call()
            .map_err(|e| self.transport(file, e))?;
        let status = response.status().as_u16();
        match status {
            200..=299 => Ok(true),
            s if is_missing(s) => Ok(false),
            s => Err(self.status(file, s)),
        }
    }

    fn spool(&self) -> Result<NamedTempFile, BinaryCacheError> {
        tempfile::NamedTempFile::new().map_err(|e| self.write_error("a temporary file", e))
    }

    fn put_spooled(
        &self,
        file: &str,
        spool: NamedTempFile,
        content_type: &str,
    ) -> Result<(), BinaryCacheError> {
        let mut f = spool.into_file();
        f.rewind().map_err(|e| self.write_error(file, e))?;
        let response = self
            .agent
            .put(&self.file_url(file))
            .header("Content-Type", content_type)
            .send(f)
            .map_err(|e| self.transport(file, e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(self.status(file, status));
        }
        Ok(())
    }
}
