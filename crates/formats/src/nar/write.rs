//! Serialising a tree on disk, or a [`Node`] in memory, as a NAR.
//!
//! This is the hot path for hashing build outputs. The NAR is assembled in
//! 1 MiB chunks: tokens are copied in, file contents are read straight into
//! them, and nothing else copies the bytes. For a tree on disk, one thread
//! walks the tree and fills chunks while the caller's thread writes (hashes)
//! the previous ones, so that reading files overlaps with hashing and the
//! whole costs little more than the hash alone.

use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::{MAGIC, Node, padding};
use crate::hash::{Hash, HashAlgo, Hasher, HashingWriter};

/// Size of the chunks the NAR is assembled in.
const CHUNK: usize = 1 << 20;
/// Chunks filled ahead of the writer; bounds the memory used to
/// `(CHUNKS_IN_FLIGHT + 2) * CHUNK`.
const CHUNKS_IN_FLIGHT: usize = 3;

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
/// `out` receives writes of up to 1 MiB, from the calling thread; the tree is
/// read on a helper thread meanwhile.
pub fn dump_path<W: Write>(path: &Path, mut out: W) -> Result<W, WriteError> {
    let (written, read) = with_dumper(path, None, |chunks| {
        for (chunk, len) in chunks.full.iter() {
            out.write_all(&chunk[..len])?;
            // The reader may have finished and gone: then the chunk is dropped.
            let _ = chunks.empty.send(chunk);
        }
        Ok(())
    });
    match (written, read) {
        (Err(e), _) => Err(WriteError::Output(e)),
        (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(_)) => Ok(out),
    }
}

/// Serialises the tree at `path` as a NAR on a helper thread, and lets
/// `read` consume it on the calling thread, chunk by chunk, without a copy
/// in between. The helper also hashes the NAR with `algo` as it goes, which
/// leaves the calling thread free for whatever it does with the bytes.
///
/// Returns what `read` returned, and then the NAR's hash and size, or why
/// the tree could not be read: then `read` saw the NAR end early, and this
/// error explains it best. If `read` returns before the end, the helper
/// stops; its result is then an [`WriteError::Output`].
pub fn dump_path_read<T>(
    path: &Path,
    algo: HashAlgo,
    read: impl FnOnce(&mut dyn BufRead) -> T,
) -> (T, Result<(Hash, u64), WriteError>) {
    let (value, dumped) = with_dumper(path, Some(Hasher::new(algo)), |chunks| {
        read(&mut ChunkReader {
            chunks,
            current: None,
            len: 0,
            pos: 0,
        })
    });
    let hashed = dumped.map(|h| h.expect("a hasher was given"));
    (value, hashed)
}

/// The two ends of the helper thread's chunk channels, on the calling side.
struct Chunks {
    full: Receiver<(Vec<u8>, usize)>,
    empty: SyncSender<Vec<u8>>,
}

/// Runs a helper thread that reads the tree at `path` into NAR chunks (and
/// hashes them, given a hasher) while `consume` takes them on the calling
/// thread. Returns what `consume` returned and how the helper ended.
fn with_dumper<T>(
    path: &Path,
    hasher: Option<Hasher>,
    consume: impl FnOnce(&Chunks) -> T,
) -> (T, Result<Option<(Hash, u64)>, WriteError>) {
    let (full_sender, full) = sync_channel::<(Vec<u8>, usize)>(CHUNKS_IN_FLIGHT);
    let (empty_sender, empty) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 1);
    for _ in 0..CHUNKS_IN_FLIGHT {
        // Empty: chunks grow as they are filled (see `Encoder::space`).
        empty_sender.send(Vec::new()).expect("the channel has room");
    }
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("nar-dump".to_owned())
            .spawn_scoped(scope, move || {
                let sink = Pipe {
                    full: full_sender,
                    empty,
                    hasher,
                    size: 0,
                };
                let mut dumper = Dumper {
                    enc: Encoder::new(sink).map_err(WriteError::Output)?,
                    path: path.to_path_buf(),
                };
                let file_type = fs::symlink_metadata(path)
                    .map_err(|source| dumper.read_error(source))?
                    .file_type();
                dumper.dump(file_type)?;
                let pipe = dumper.enc.finish().map_err(WriteError::Output)?;
                Ok(pipe.hasher.map(|h| (h.finish(), pipe.size)))
            });
        let reader = match reader {
            Ok(reader) => reader,
            Err(e) => {
                let chunks = Chunks {
                    full: sync_channel(0).1,
                    empty: sync_channel(0).0,
                };
                let failed = format!("cannot start a thread: {e}");
                return (
                    consume(&chunks),
                    Err(WriteError::Output(io::Error::other(failed))),
                );
            }
        };
        let chunks = Chunks {
            full,
            empty: empty_sender,
        };
        let value = consume(&chunks);
        // Hang up so that a reader still running notices and stops.
        drop(chunks);
        let read = match reader.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (value, read)
    })
}

/// The NAR coming from the helper thread, as a `BufRead` over its chunks;
/// consumed chunks go back to the helper.
struct ChunkReader<'c> {
    chunks: &'c Chunks,
    current: Option<Vec<u8>>,
    len: usize,
    pos: usize,
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::bufread::read_via_buffer(self, buf)
    }
}

impl BufRead for ChunkReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.len {
            let Ok((chunk, len)) = self.chunks.full.recv() else {
                // The end, or the helper failed: it reports why.
                return Ok(&[]);
            };
            if let Some(used) = self.current.replace(chunk) {
                // The helper may have finished and gone: then it is dropped.
                let _ = self.chunks.empty.send(used);
            }
            (self.len, self.pos) = (len, 0);
        }
        let current = self.current.as_deref().unwrap_or_default();
        Ok(&current[self.pos..self.len])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.len);
    }
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
    let mut enc = Encoder::new(Direct(out))?;
    write_node_into(&mut enc, node)?;
    Ok(enc.finish()?.0)
}

fn write_node_into<S: Ship>(enc: &mut Encoder<S>, node: &Node) -> io::Result<()> {
    match node {
        Node::Regular {
            executable,
            contents,
        } => {
            let size = contents.len() as u64;
            enc.regular_header(*executable, size)?;
            enc.put(contents)?;
            enc.regular_footer(size)
        }
        Node::Symlink { target } => enc.symlink(target),
        Node::Directory { entries } => {
            enc.directory_start()?;
            for (name, child) in entries {
                enc.entry_start(name)?;
                write_node_into(enc, child)?;
                enc.entry_end()?;
            }
            enc.directory_end()
        }
    }
}

/// Where full chunks go.
trait Ship {
    /// Takes the first `len` bytes of `chunk`; may replace `chunk` with
    /// another buffer (of at most [`CHUNK`] bytes, grown by the encoder).
    fn ship(&mut self, chunk: &mut Vec<u8>, len: usize) -> io::Result<()>;
}

/// Writes chunks to a writer on the spot.
struct Direct<W>(W);

impl<W: Write> Ship for Direct<W> {
    fn ship(&mut self, chunk: &mut Vec<u8>, len: usize) -> io::Result<()> {
        self.0.write_all(&chunk[..len])
    }
}

/// Hands chunks to the writing thread and takes back emptied ones; hashes
/// them on the way, given a hasher.
struct Pipe {
    full: SyncSender<(Vec<u8>, usize)>,
    empty: Receiver<Vec<u8>>,
    hasher: Option<Hasher>,
    size: u64,
}

impl Ship for Pipe {
    fn ship(&mut self, chunk: &mut Vec<u8>, len: usize) -> io::Result<()> {
        if let Some(h) = &mut self.hasher {
            h.update(&chunk[..len]);
        }
        self.size += len as u64;
        // Only fails when the writing side has stopped, whose own error is
        // the one reported.
        let stopped = |_| io::Error::other("the NAR's writer stopped");
        let fresh = self.empty.recv().map_err(stopped)?;
        let full = std::mem::replace(chunk, fresh);
        self.full
            .send((full, len))
            .map_err(|_| io::Error::other("the NAR's writer stopped"))
    }
}

/// Emits NAR tokens into the current chunk.
struct Encoder<S> {
    sink: S,
    chunk: Vec<u8>,
    /// Bytes of `chunk` filled so far.
    len: usize,
}

impl<S: Ship> Encoder<S> {
    fn new(sink: S) -> io::Result<Self> {
        let mut enc = Encoder {
            sink,
            chunk: Vec::new(),
            len: 0,
        };
        enc.put_str(MAGIC)?;
        Ok(enc)
    }

    /// The free part of the chunk, shipping the chunk first if it is full.
    fn space(&mut self) -> io::Result<&mut [u8]> {
        if self.len == CHUNK {
            self.sink.ship(&mut self.chunk, self.len)?;
            self.len = 0;
        }
        if self.len == self.chunk.len() {
            // Zeroed as needed, doubling: a small NAR (most store paths) must
            // not pay for zeroing and faulting in whole chunks.
            let grown = (self.chunk.len() * 2).clamp(4096, CHUNK);
            self.chunk.resize(grown, 0);
        }
        Ok(&mut self.chunk[self.len..])
    }

    fn put(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let space = self.space()?;
            let n = space.len().min(bytes.len());
            space[..n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn put_str(&mut self, s: &[u8]) -> io::Result<()> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.put(padding(s.len() as u64))
    }

    fn put_strs(&mut self, tokens: &[&[u8]]) -> io::Result<()> {
        tokens.iter().try_for_each(|token| self.put_str(token))
    }

    fn regular_header(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.put_strs(&[b"(", b"type", b"regular"])?;
        if executable {
            self.put_strs(&[b"executable", b""])?;
        }
        self.put_str(b"contents")?;
        self.put(&size.to_le_bytes())
    }

    fn regular_footer(&mut self, size: u64) -> io::Result<()> {
        self.put(padding(size))?;
        self.put_str(b")")
    }

    fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.put_strs(&[b"(", b"type", b"symlink", b"target", target, b")"])
    }

    fn directory_start(&mut self) -> io::Result<()> {
        self.put_strs(&[b"(", b"type", b"directory"])
    }

    fn entry_start(&mut self, name: &[u8]) -> io::Result<()> {
        self.put_strs(&[b"entry", b"(", b"name", name, b"node"])
    }

    fn entry_end(&mut self) -> io::Result<()> {
        self.put_str(b")")
    }

    fn directory_end(&mut self) -> io::Result<()> {
        self.put_str(b")")
    }

    fn finish(mut self) -> io::Result<S> {
        if self.len > 0 {
            self.sink.ship(&mut self.chunk, self.len)?;
        }
        Ok(self.sink)
    }
}

/// Walks a tree on disk; `path` is the file being archived.
struct Dumper<S> {
    enc: Encoder<S>,
    path: PathBuf,
}

impl<S: Ship> Dumper<S> {
    fn dump(&mut self, file_type: FileType) -> Result<(), WriteError> {
        if file_type.is_file() {
            self.regular()
        } else if file_type.is_dir() {
            self.directory()
        } else if file_type.is_symlink() {
            let target = fs::read_link(&self.path).map_err(|e| self.read_error(e))?;
            self.enc
                .symlink(target.as_os_str().as_bytes())
                .map_err(WriteError::Output)
        } else {
            Err(self.unsupported(file_type))
        }
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
        self.enc.directory_start().map_err(WriteError::Output)?;
        for (name, file_type) in entries {
            self.enc
                .entry_start(name.as_bytes())
                .map_err(WriteError::Output)?;
            self.path.push(&name);
            let result = self.dump(file_type);
            self.path.pop();
            result?;
            self.enc.entry_end().map_err(WriteError::Output)?;
        }
        self.enc.directory_end().map_err(WriteError::Output)
    }

    fn regular(&mut self) -> Result<(), WriteError> {
        // If the file was swapped since the directory was read: O_NOFOLLOW
        // fails on a symlink rather than archive what it points at, and
        // O_NONBLOCK keeps a FIFO from hanging the open (fstat then rejects
        // it). Neither changes how a regular file reads.
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)
            .map_err(|e| self.read_error(e))?;
        let meta = file.metadata().map_err(|e| self.read_error(e))?;
        if !meta.is_file() {
            return Err(self.unsupported(meta.file_type()));
        }
        let size = meta.len();
        // Nix looks at the owner's execute bit only.
        let executable = meta.permissions().mode() & 0o100 != 0;
        self.enc
            .regular_header(executable, size)
            .map_err(WriteError::Output)?;
        let mut remaining = size;
        while remaining > 0 {
            let space = self.enc.space().map_err(WriteError::Output)?;
            let want = space
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let read = read_full(&mut file, &mut space[..want]);
            let read = read.map_err(|e| self.read_error(e))?;
            self.enc.len += read;
            remaining -= read as u64;
            if read < want {
                return Err(self.shrank(size, size - remaining));
            }
        }
        self.enc.regular_footer(size).map_err(WriteError::Output)
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
