//! Serialising a tree on disk, or a [`Node`] in memory, as a NAR.
//!
//! This is the hot path for hashing build outputs, so small tokens and small
//! files are gathered in one pending buffer and handed to the output in large
//! writes, and large files stream through a single reused 1 MiB buffer.

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{MAGIC, Node, padding, put_str};
use crate::hash::{Hash, HashAlgo, HashingWriter};

/// Files up to this size are read straight into the pending buffer.
const SMALL_FILE: u64 = 64 * 1024;
/// The pending buffer is handed to the output once it holds this much.
const FLUSH_AT: usize = 256 * 1024;
/// Buffer through which larger files stream.
const BIG_BUFFER: usize = 1024 * 1024;

/// Why a tree could not be serialised.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The tree holds something a NAR cannot represent.
    #[error(
        "cannot archive '{}': it is a {kind}, but a NAR holds only regular files, symlinks and directories",
        path.display()
    )]
    UnsupportedFileType {
        /// The offending file.
        path: PathBuf,
        /// What it is: "socket", "FIFO", "block device", ….
        kind: &'static str,
    },
    /// A file or directory of the tree could not be read.
    #[error("cannot read '{}' to archive it: {source}", path.display())]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file was modified while it was being archived.
    #[error(
        "'{}' changed while being archived: it had {expected} bytes when opened but only {actual} could be read",
        path.display()
    )]
    FileShrank {
        /// The file.
        path: PathBuf,
        /// Its size when it was opened.
        expected: u64,
        /// How many bytes it held.
        actual: u64,
    },
    /// The NAR could not be written to its destination.
    #[error("cannot write the NAR: {0}")]
    Output(#[source] io::Error),
}

/// Serialises the tree at `path` (not following a symlink at `path` itself)
/// as a NAR into `out`, and gives `out` back.
///
/// `out` receives large writes; wrap it in a [`std::io::BufWriter`] only if
/// small writes to it are costly.
pub fn dump_path<W: Write>(path: &Path, out: W) -> Result<W, WriteError> {
    let mut dumper = Dumper {
        enc: Encoder::new(out),
        buf: Vec::new(),
        path: path.to_path_buf(),
    };
    let file_type = fs::symlink_metadata(path)
        .map_err(|source| dumper.read_error(source))?
        .file_type();
    dumper.dump(file_type)?;
    dumper.enc.finish().map_err(WriteError::Output)
}

/// The NAR hash of the tree at `path` (what `nix-hash --type ALGO` and
/// `nix hash path` print) and the NAR's size in bytes.
pub fn hash_path(path: &Path, algo: HashAlgo) -> Result<(Hash, u64), WriteError> {
    let writer = dump_path(path, HashingWriter::new(algo, io::sink()))?;
    let (_, hash, size) = writer.finish();
    Ok((hash, size))
}

/// Serialises `node` as a NAR into `out`, and gives `out` back.
pub fn write_node<W: Write>(node: &Node, out: W) -> io::Result<W> {
    let mut enc = Encoder::new(out);
    write_node_into(&mut enc, node)?;
    enc.finish()
}

fn write_node_into<W: Write>(enc: &mut Encoder<W>, node: &Node) -> io::Result<()> {
    match node {
        Node::Regular {
            executable,
            contents,
        } => {
            let size = contents.len() as u64;
            enc.regular_header(*executable, size);
            if size <= SMALL_FILE {
                enc.pending.extend_from_slice(contents);
            } else {
                enc.flush()?;
                enc.out.write_all(contents)?;
            }
            enc.regular_footer(size);
        }
        Node::Symlink { target } => enc.symlink(target),
        Node::Directory { entries } => {
            enc.directory_start();
            for (name, child) in entries {
                enc.entry_start(name);
                write_node_into(enc, child)?;
                enc.entry_end();
            }
            enc.directory_end();
        }
    }
    enc.flush_if_full()
}

/// Emits NAR tokens into a pending buffer that is passed on in large writes.
struct Encoder<W> {
    out: W,
    pending: Vec<u8>,
}

impl<W: Write> Encoder<W> {
    fn new(out: W) -> Self {
        let mut pending = Vec::with_capacity(FLUSH_AT + SMALL_FILE as usize + 4096);
        put_str(&mut pending, MAGIC);
        Encoder { out, pending }
    }

    fn regular_header(&mut self, executable: bool, size: u64) {
        for token in [&b"("[..], b"type", b"regular"] {
            put_str(&mut self.pending, token);
        }
        if executable {
            put_str(&mut self.pending, b"executable");
            put_str(&mut self.pending, b"");
        }
        put_str(&mut self.pending, b"contents");
        self.pending.extend_from_slice(&size.to_le_bytes());
    }

    fn regular_footer(&mut self, size: u64) {
        self.pending.extend_from_slice(padding(size));
        put_str(&mut self.pending, b")");
    }

    fn symlink(&mut self, target: &[u8]) {
        for token in [&b"("[..], b"type", b"symlink", b"target", target, b")"] {
            put_str(&mut self.pending, token);
        }
    }

    fn directory_start(&mut self) {
        for token in [&b"("[..], b"type", b"directory"] {
            put_str(&mut self.pending, token);
        }
    }

    fn entry_start(&mut self, name: &[u8]) {
        for token in [&b"entry"[..], b"(", b"name", name, b"node"] {
            put_str(&mut self.pending, token);
        }
    }

    fn entry_end(&mut self) {
        put_str(&mut self.pending, b")");
    }

    fn directory_end(&mut self) {
        put_str(&mut self.pending, b")");
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.pending.len() >= FLUSH_AT {
            self.flush()
        } else {
            Ok(())
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.out.write_all(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        self.flush()?;
        Ok(self.out)
    }
}

/// Walks a tree on disk; `path` is the file being archived.
struct Dumper<W> {
    enc: Encoder<W>,
    buf: Vec<u8>,
    path: PathBuf,
}

impl<W: Write> Dumper<W> {
    fn dump(&mut self, file_type: FileType) -> Result<(), WriteError> {
        if file_type.is_file() {
            self.regular()?;
        } else if file_type.is_dir() {
            self.directory()?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&self.path).map_err(|e| self.read_error(e))?;
            self.enc.symlink(target.as_os_str().as_bytes());
        } else {
            return Err(self.unsupported(file_type));
        }
        self.enc.flush_if_full().map_err(WriteError::Output)
    }

    fn directory(&mut self) -> Result<(), WriteError> {
        let mut entries = fs::read_dir(&self.path)
            .and_then(|dir| {
                dir.map(|entry| {
                    let entry = entry?;
                    Ok((entry.file_name(), entry.file_type()?))
                })
                .collect::<io::Result<Vec<_>>>()
            })
            .map_err(|e| self.read_error(e))?;
        entries.sort_unstable_by(|(a, _), (b, _)| a.as_bytes().cmp(b.as_bytes()));
        self.enc.directory_start();
        for (name, file_type) in entries {
            self.enc.entry_start(name.as_bytes());
            self.path.push(&name);
            let result = self.dump(file_type);
            self.path.pop();
            result?;
            self.enc.entry_end();
        }
        self.enc.directory_end();
        Ok(())
    }

    fn regular(&mut self) -> Result<(), WriteError> {
        // O_NOFOLLOW: if the file was swapped for a symlink since the directory
        // was read, fail rather than archive whatever the link points at.
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(|e| self.read_error(e))?;
        let meta = file.metadata().map_err(|e| self.read_error(e))?;
        if !meta.is_file() {
            return Err(self.unsupported(meta.file_type()));
        }
        let size = meta.len();
        // Nix looks at the owner's execute bit only.
        let executable = meta.permissions().mode() & 0o100 != 0;
        self.enc.regular_header(executable, size);
        if size <= SMALL_FILE {
            let start = self.enc.pending.len();
            self.enc.pending.resize(start + size as usize, 0);
            let read = read_full(&mut file, &mut self.enc.pending[start..])
                .map_err(|e| self.read_error(e))?;
            if read < size as usize {
                return Err(self.shrank(size, read as u64));
            }
        } else {
            self.enc.flush().map_err(WriteError::Output)?;
            if self.buf.is_empty() {
                self.buf = vec![0; BIG_BUFFER];
            }
            let mut remaining = size;
            while remaining > 0 {
                let want = remaining.min(self.buf.len() as u64) as usize;
                let read =
                    read_full(&mut file, &mut self.buf[..want]).map_err(|e| self.read_error(e))?;
                self.enc
                    .out
                    .write_all(&self.buf[..read])
                    .map_err(WriteError::Output)?;
                remaining -= read as u64;
                if read < want {
                    return Err(self.shrank(size, size - remaining));
                }
            }
        }
        self.enc.regular_footer(size);
        Ok(())
    }

    fn read_error(&self, source: io::Error) -> WriteError {
        WriteError::Read {
            path: self.path.clone(),
            source,
        }
    }

    fn shrank(&self, expected: u64, actual: u64) -> WriteError {
        WriteError::FileShrank {
            path: self.path.clone(),
            expected,
            actual,
        }
    }

    fn unsupported(&self, file_type: FileType) -> WriteError {
        let kind = if file_type.is_socket() {
            "socket"
        } else if file_type.is_fifo() {
            "FIFO"
        } else if file_type.is_block_device() {
            "block device"
        } else if file_type.is_char_device() {
            "character device"
        } else {
            "file of unknown type"
        };
        WriteError::UnsupportedFileType {
            path: self.path.clone(),
            kind,
        }
    }
}

/// Reads until `buf` is full or the file ends; returns how much was read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
