//! Build logs on disk, where Nix keeps them so that `nix log` and
//! `nix-store -l` read Kiln's and the other way round:
//! `<log dir>/drvs/<first 2 characters of the .drv base name>/<rest>.bz2`.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bzip2::Compression;
use bzip2::write::BzEncoder;
use kiln_formats::store_path::StorePath;

/// Why a log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot {action} build log '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no build log of '{0}' is stored")]
    NotFound(String),
}

/// The logs directory of a local store whose state directory is
/// `state_dir` (`…/nix/var/nix` → `…/nix/var/log/nix`).
/// The last lines of a failed build's log, as Nix appends them to its
/// error: `;`, then `last N log lines:` and each line after `> `.
pub fn tail_text<S: AsRef<str>>(tail: &[S]) -> String {
    let mut text = format!(";\nlast {} log lines:", tail.len());
    for line in tail {
        text.push_str("\n> ");
        text.push_str(line.as_ref());
    }
    text
}

pub fn log_dir_for_state_dir(state_dir: &Path) -> PathBuf {
    state_dir
        .parent()
        .map_or_else(|| state_dir.join("log"), |var| var.join("log/nix"))
}

/// Where the compressed log of `drv` lives under `log_dir`.
pub fn log_path(log_dir: &Path, drv: &StorePath) -> PathBuf {
    let base = drv.base_name();
    log_dir
        .join("drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]))
}

/// Reads the log of `drv`: the `.bz2` file, or an uncompressed one as Nix
/// writes with `compress-build-log = false`.
pub fn read_log(log_dir: &Path, drv: &StorePath) -> Result<Vec<u8>, LogError> {
    let compressed = log_path(log_dir, drv);
    let plain = compressed.with_extension("");
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| LogError::Io {
            action: "read",
            path,
            source,
        }
    };
    let mut out = Vec::new();
    match File::open(&compressed) {
        Ok(f) => {
            bzip2::read::MultiBzDecoder::new(f)
                .read_to_end(&mut out)
                .map_err(err(&compressed))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::read(&plain) {
            Ok(bytes) => out = bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LogError::NotFound(drv.base_name().to_owned()));
            }
            Err(e) => return Err(err(&plain)(e)),
        },
        Err(e) => return Err(err(&compressed)(e)),
    }
    Ok(out)
}

/// A build log being written: compressed to its file, counted, and with
/// its last lines kept for error messages.
pub struct LogSink {
    file: Option<LogFile>,
    bytes: u64,
    tail: Vec<Vec<u8>>,
    partial: Vec<u8>,
    keep_lines: usize,
}

/// A log file under its temporary name, and where it goes when finished.
struct LogFile {
    out: Compressor,
    tmp: PathBuf,
    path: PathBuf,
    /// The file every empty log is a link to (see [`place_empty_log`]).
    shared_empty: PathBuf,
}

/// A bzip2 compressor takes a fifth of a millisecond to set up (and a
/// megabyte to zero), more than a trivial build's whole log; a file costs
/// an inode. Both are only made once the builder writes something.
enum Compressor {
    Unopened,
    Running(BzEncoder<BufWriter<File>>),
    Gone,
}

impl LogFile {
    /// The compressor, and the file under it, made now if they were not yet.
    fn running(&mut self) -> io::Result<Option<&mut BzEncoder<BufWriter<File>>>> {
        if let Compressor::Unopened = self.out {
            let f = File::create(&self.tmp)?;
            self.out = Compressor::Running(BzEncoder::new(BufWriter::new(f), Compression::fast()));
        }
        Ok(match &mut self.out {
            Compressor::Running(enc) => Some(enc),
            _ => None,
        })
    }
}

/// The compressed form of an empty log, made once.
fn empty_log() -> &'static [u8] {
    static EMPTY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| {
        BzEncoder::new(Vec::new(), Compression::fast())
            .finish()
            .expect("compressing into memory")
    })
}

/// Puts an empty log at `path` as a hard link to `shared` (made when
/// missing, and made anew when it has as many links as the file system
/// allows): a build that printed nothing then costs no inode of its own.
/// On ext4 without a journal every inode allocated shortly after others
/// were freed is slow, and many derivations print nothing.
fn place_empty_log(shared: &Path, tmp: &Path, path: &Path) -> io::Result<()> {
    for _ in 0..3 {
        match std::fs::hard_link(shared, tmp) {
            Ok(()) => return std::fs::rename(tmp, path),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::EMLINK) =>
            {
                // A name of this call's own: builds of this process finish
                // concurrently, and two writing one name lose one rename.
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let fresh = shared.with_extension(format!("tmp-{}-{n}", std::process::id()));
                std::fs::write(&fresh, empty_log())?;
                std::fs::rename(&fresh, shared)?;
            }
            // A leftover of a process that had our pid: never written
            // through, as it may be a link to the shared log.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => std::fs::remove_file(tmp)?,
            Err(_) => break,
        }
    }
    // A file of its own, then (a file system without hard links).
    let _ = std::fs::remove_file(tmp);
    std::fs::write(tmp, empty_log())?;
    std::fs::rename(tmp, path)
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink")
            .field("file", &self.file.as_ref().map(|f| &f.path))
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl LogSink {
    /// A log for `drv` under `log_dir`, or only counted and tailed when
    /// `log_dir` is `None` (`keep-build-log = false`).
    pub fn create(
        log_dir: Option<&Path>,
        drv: &StorePath,
        keep_lines: usize,
    ) -> Result<LogSink, LogError> {
        let file = match log_dir {
            None => None,
            Some(dir) => {
                let path = log_path(dir, drv);
                let parent = path.parent().expect("log paths have a parent");
                let err = |action, p: &Path| {
                    let path = p.to_owned();
                    move |source| LogError::Io {
                        action,
                        path,
                        source,
                    }
                };
                std::fs::create_dir_all(parent).map_err(err("create directory for", parent))?;
                // Written under a temporary name so a reader never sees half
                // a stream, and two processes never interleave in one file.
                let tmp = parent.join(format!(".tmp-{}-{}", drv.hash_part(), std::process::id()));
                Some(LogFile {
                    out: Compressor::Unopened,
                    tmp,
                    path,
                    shared_empty: dir.join("drvs/.kiln-empty-log.bz2"),
                })
            }
        };
        Ok(LogSink {
            file,
            bytes: 0,
            tail: Vec::new(),
            partial: Vec::new(),
            keep_lines,
        })
    }

    /// Appends output of the builder.
    pub fn write(&mut self, data: &[u8]) -> Result<(), LogError> {
        if data.is_empty() {
            return Ok(());
        }
        self.bytes += data.len() as u64;
        if let Some(log) = &mut self.file {
            let written = match log.running() {
                Ok(Some(enc)) => enc.write_all(data),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            written.map_err(|source| LogError::Io {
                action: "write",
                path: log.tmp.clone(),
                source,
            })?;
        }
        for &b in data {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.push_line(line);
            } else if b != b'\r' {
                self.partial.push(b);
            }
        }
        Ok(())
    }

    fn push_line(&mut self, line: Vec<u8>) {
        if self.keep_lines == 0 {
            return;
        }
        if self.tail.len() == self.keep_lines {
            self.tail.remove(0);
        }
        self.tail.push(line);
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The last lines (an unfinished last line included).
    pub fn tail(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .tail
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        if !self.partial.is_empty() {
            if lines.len() == self.keep_lines && !lines.is_empty() {
                lines.remove(0);
            }
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        lines
    }

    /// Finishes the compressed stream and moves it into place.
    pub fn finish(mut self) -> Result<(), LogError> {
        if let Some(mut log) = self.file.take() {
            let io = |action, p: &Path| {
                let path = p.to_owned();
                move |source| LogError::Io {
                    action,
                    path,
                    source,
                }
            };
            match std::mem::replace(&mut log.out, Compressor::Gone) {
                Compressor::Unopened => {
                    return place_empty_log(&log.shared_empty, &log.tmp, &log.path)
                        .map_err(io("move into place", &log.path));
                }
                Compressor::Running(enc) => {
                    let writer = enc.finish().map_err(io("finish", &log.tmp))?;
                    writer
                        .into_inner()
                        .map_err(|e| e.into_error())
                        .map_err(io("flush", &log.tmp))?;
                }
                Compressor::Gone => {}
            }
            std::fs::rename(&log.tmp, &log.path).map_err(io("move into place", &log.path))?;
        }
        Ok(())
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        if let Some(log) = self.file.take() {
            if let Compressor::Running(_) = log.out {
                let _ = std::fs::remove_file(log.tmp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_reads_and_tails() {
        let dir = tempfile::tempdir().unwrap();
        let drv: StorePath = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv"
            .parse()
            .unwrap();
        let mut sink = LogSink::create(Some(dir.path()), &drv, 2).unwrap();
        sink.write(b"one\ntwo\nthr").unwrap();
        sink.write(b"ee\nfour").unwrap();
        assert_eq!(sink.tail(), ["three", "four"]);
        assert_eq!(sink.len(), 18);
        sink.finish().unwrap();
        assert!(
            dir.path()
                .join("drvs/7h/7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv.bz2")
                .is_file()
        );
        assert_eq!(
            read_log(dir.path(), &drv).unwrap(),
            b"one\ntwo\nthree\nfour"
        );
    }

    /// Builds that finish at once, in a store whose shared empty log is not
    /// made yet, all get their logs.
    #[test]
    fn concurrent_empty_logs_all_land() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Barrier::new(8);
            std::thread::scope(|scope| {
                for i in 0..8 {
                    let (dir, start) = (dir.path(), &start);
                    scope.spawn(move || {
                        let drv: StorePath =
                            format!("{i}h7qgvs4kgzsn8a6rb273saxyqh4jxlz-quiet.drv")
                                .parse()
                                .unwrap();
                        let sink = LogSink::create(Some(dir), &drv, 2).unwrap();
                        start.wait();
                        sink.finish().unwrap();
                        assert_eq!(read_log(dir, &drv).unwrap(), b"");
                    });
                }
            });
        }
    }

    #[test]
    fn a_build_that_printed_nothing_has_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let drv: StorePath = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-quiet.drv"
            .parse()
            .unwrap();
        let mut sink = LogSink::create(Some(dir.path()), &drv, 2).unwrap();
        sink.write(b"").unwrap();
        sink.finish().unwrap();
        let file = dir
            .path()
            .join("drvs/7h/7qgvs4kgzsn8a6rb273saxyqh4jxlz-quiet.drv.bz2");
        // A whole bzip2 stream, as Nix's readers expect, holding nothing.
        let bytes = std::fs::read(&file).unwrap();
        // It is a link to the one empty log, not an inode of its own.
        use std::os::unix::fs::MetadataExt;
        let other: StorePath = "8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-quiet.drv"
            .parse()
            .unwrap();
        LogSink::create(Some(dir.path()), &other, 2)
            .unwrap()
            .finish()
            .unwrap();
        let other_file = log_path(dir.path(), &other);
        assert_eq!(
            std::fs::metadata(&file).unwrap().ino(),
            std::fs::metadata(&other_file).unwrap().ino()
        );
        assert_eq!(read_log(dir.path(), &other).unwrap(), b"");
        assert!(bytes.starts_with(b"BZh"), "{bytes:?}");
        assert_eq!(read_log(dir.path(), &drv).unwrap(), b"");
        let mut plain = Vec::new();
        bzip2::read::BzDecoder::new(&bytes[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert!(plain.is_empty());
    }
}
