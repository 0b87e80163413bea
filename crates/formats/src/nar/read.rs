//! A streaming, validating NAR parser.
//!
//! [`NarReader`] is pulled for one [`Event`] at a time. File contents are
//! never buffered: an [`Event::Regular`] hands out a [`Contents`] reader over
//! the input, and whatever the caller leaves unread is skipped. Every length
//! in the input is checked against a bound before anything is allocated for
//! it, and every structural rule Nix follows when writing is enforced when
//! reading, so that a NAR that parses is exactly the NAR Nix would write for
//! the same tree.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};

use super::{MAGIC, MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN, Node, padding_len, show};

/// Longest keyword (`nix-archive-1`, `directory`, …) we bother to read in full;
/// anything longer is reported by its length.
const MAX_KEYWORD_LEN: u64 = 32;
/// Input buffer: large enough that file contents move in few reads.
const INPUT_BUFFER: usize = 256 * 1024;

/// A NAR that could not be read: what was wrong, at which byte of the input,
/// and in which entry of the archive.
#[derive(Debug)]
pub struct ReadError {
    offset: u64,
    path: String,
    problem: Problem,
}

impl ReadError {
    /// Byte offset in the input where the offending token starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Path, inside the archive, of the entry being read (`""` for the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What was wrong.
    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid NAR at byte {}", self.offset)?;
        if !self.path.is_empty() {
            write!(f, " (in '{}')", self.path)?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            Problem::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// The ways a NAR can be wrong.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The input does not start with `nix-archive-1`.
    #[error("expected the magic string 'nix-archive-1', found {found}")]
    BadMagic {
        /// What was there instead.
        found: String,
    },
    /// A token other than the one the grammar allows here.
    #[error("expected {expected}, found {found}")]
    UnexpectedToken {
        /// What the grammar allows.
        expected: &'static str,
        /// What was there.
        found: String,
    },
    /// An entry name that is empty.
    #[error("empty entry name")]
    EmptyName,
    /// An entry named `.` or `..`.
    #[error("entry name '{0}' is not allowed")]
    ReservedName(&'static str),
    /// An entry name containing `/`.
    #[error("entry name '{0}' contains '/'")]
    NameWithSlash(String),
    /// An entry name containing a NUL byte.
    #[error("entry name '{0}' contains a NUL byte")]
    NameWithNul(String),
    /// An entry name longer than [`MAX_NAME_LEN`].
    #[error("entry name of {len} bytes, longer than the {MAX_NAME_LEN} allowed")]
    NameTooLong {
        /// Its length.
        len: u64,
    },
    /// Entries not in strictly increasing byte order of their names.
    #[error("entry '{name}' comes after '{previous}', but entries must be sorted by name")]
    UnsortedEntry {
        /// The entry before.
        previous: String,
        /// The entry out of order.
        name: String,
    },
    /// Two entries of one directory with the same name.
    #[error("duplicate entry '{0}'")]
    DuplicateEntry(String),
    /// Directories nested deeper than [`MAX_DEPTH`].
    #[error("directories nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A symlink target longer than [`MAX_TARGET_LEN`].
    #[error("symlink target of {len} bytes, longer than the {MAX_TARGET_LEN} allowed")]
    TargetTooLong {
        /// Its length.
        len: u64,
    },
    /// An empty symlink target.
    #[error("empty symlink target")]
    EmptyTarget,
    /// A symlink target containing a NUL byte.
    #[error("symlink target '{0}' contains a NUL byte")]
    TargetWithNul(String),
    /// Padding after a string or file contents that is not all zero.
    #[error("non-zero padding bytes")]
    NonZeroPadding,
    /// The input ended inside the archive.
    #[error("the input ends before the archive does")]
    Truncated,
    /// The input goes on after the archive ended.
    #[error("unexpected data after the end of the archive")]
    TrailingData,
    /// The input could not be read.
    #[error("cannot read the input: {0}")]
    Io(io::Error),
}

/// One step of a NAR, in archive order.
///
/// Paths are relative to the archive's root, components joined by `/`; the
/// root itself is the empty path.
#[derive(Debug)]
pub enum Event<'r, R> {
    /// A directory starts; its entries follow, then [`Event::EndDirectory`].
    Directory {
        /// Its path.
        path: &'r [u8],
    },
    /// A directory's last entry has been read.
    EndDirectory {
        /// Its path.
        path: &'r [u8],
    },
    /// A regular file; its contents can be read from `contents` now, and are
    /// skipped if they are not.
    Regular {
        /// Its path.
        path: &'r [u8],
        /// Whether it is executable.
        executable: bool,
        /// Its size in bytes.
        size: u64,
        /// Its contents.
        contents: Contents<'r, R>,
    },
    /// A symlink.
    Symlink {
        /// Its path.
        path: &'r [u8],
        /// Its target.
        target: &'r [u8],
    },
}

impl<R> Event<'_, R> {
    /// The path of the node this event is about.
    pub fn path(&self) -> &[u8] {
        match self {
            Event::Directory { path }
            | Event::EndDirectory { path }
            | Event::Regular { path, .. }
            | Event::Symlink { path, .. } => path,
        }
    }
}

/// A pull parser over a NAR; see the [module documentation](self).
#[derive(Debug)]
pub struct NarReader<R> {
    input: Input<R>,
    /// Whether the archive must be the whole input.
    whole_input: bool,
    state: State,
    /// Path of the node being read.
    path: Vec<u8>,
    /// Open directories, innermost last.
    frames: Vec<Frame>,
    /// Unread bytes of the current file's contents.
    remaining: u64,
    /// Scratch space for keywords and names.
    token: Vec<u8>,
    /// The current symlink's target.
    target: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Start,
    /// Inside a file's contents; its padding and `)` are still to come.
    InFile {
        size: u64,
    },
    /// A node has ended; next is the `)` of its entry, or the end of input.
    AfterNode,
    /// Next is `entry` or the `)` that closes the directory.
    InDirectory,
    Done,
}

#[derive(Debug)]
struct Frame {
    /// Length of `path` for the directory itself.
    path_len: usize,
    /// Whether `path[path_len..]` still holds the previous entry's name.
    has_previous: bool,
}

impl<R: Read> NarReader<BufReader<R>> {
    /// A reader for an input that holds one NAR and nothing after it.
    pub fn new(input: R) -> Self {
        Self::with_input(BufReader::with_capacity(INPUT_BUFFER, input), true)
    }
}

impl<R: BufRead> NarReader<R> {
    /// A reader for a NAR embedded in a longer stream (as in the daemon
    /// protocol): reading stops at the end of the archive, and
    /// [`into_inner`](Self::into_inner) gives back the stream positioned
    /// just after it.
    pub fn embedded(input: R) -> Self {
        Self::with_input(input, false)
    }

    fn with_input(input: R, whole_input: bool) -> Self {
        NarReader {
            input: Input {
                inner: input,
                offset: 0,
            },
            whole_input,
            state: State::Start,
            path: Vec::new(),
            frames: Vec::new(),
            remaining: 0,
            token: Vec::new(),
            target: Vec::new(),
        }
    }

    /// The underlying stream.
    pub fn into_inner(self) -> R {
        self.input.inner
    }

    /// How many bytes of input have been consumed.
    pub fn offset(&self) -> u64 {
        self.input.offset
    }

    /// The next event, or `None` once the archive has ended (and, for
    /// [`new`](NarReader::new), the input with it).
    #[allow(clippy::should_implement_trait)] // events borrow the reader: not an Iterator
    pub fn next(&mut self) -> Result<Option<Event<'_, R>>, ReadError> {
        loop {
            match self.state {
                State::Start => {
                    let start = self.input.offset;
                    let magic = self.read_keyword()?;
                    if magic != MAGIC {
                        let found = describe(magic);
                        return Err(self.error_at(start, Problem::BadMagic { found }));
                    }
                    return self.node().map(Some);
                }
                State::InFile { size } => {
                    let remaining = self.remaining;
                    self.input.skip(remaining).map_err(|e| self.io_error(e))?;
                    self.remaining = 0;
                    self.read_padding(size)?;
                    self.expect(b")", "')' after the file's contents")?;
                    self.state = State::AfterNode;
                }
                State::AfterNode => {
                    let Some(frame) = self.frames.last_mut() else {
                        self.state = State::Done;
                        if self.whole_input && !self.input.at_end().map_err(|e| self.io_error(e))? {
                            return Err(self.error(Problem::TrailingData));
                        }
                        return Ok(None);
                    };
                    frame.has_previous = true;
                    self.expect(b")", "')' closing the directory entry")?;
                    self.state = State::InDirectory;
                }
                State::InDirectory => {
                    let start = self.input.offset;
                    let token = self.read_keyword()?;
                    if token == b"entry" {
                        self.entry_header()?;
                        return self.node().map(Some);
                    } else if token == b")" {
                        let frame = self
                            .frames
                            .pop()
                            .expect("InDirectory has an open directory");
                        self.path.truncate(frame.path_len);
                        self.state = State::AfterNode;
                        return Ok(Some(Event::EndDirectory { path: &self.path }));
                    } else {
                        let found = describe(token);
                        let expected = "'entry' or ')' closing the directory";
                        return Err(
                            self.error_at(start, Problem::UnexpectedToken { expected, found })
                        );
                    }
                }
                State::Done => return Ok(None),
            }
        }
    }

    /// Reads `( type …` up to the point where the node's event can be
    /// returned.
    fn node(&mut self) -> Result<Event<'_, R>, ReadError> {
        self.expect(b"(", "'(' opening a node")?;
        self.expect(b"type", "'type'")?;
        let start = self.input.offset;
        let kind = self.read_keyword()?;
        if kind == b"regular" {
            let start = self.input.offset;
            let mut token = self.read_keyword()?;
            let executable = token == b"executable";
            if executable {
                self.expect(b"", "'' after 'executable'")?;
                token = self.read_keyword()?;
            }
            if token != b"contents" {
                let found = describe(token);
                let expected = if executable {
                    "'contents'"
                } else {
                    "'executable' or 'contents'"
                };
                return Err(self.error_at(start, Problem::UnexpectedToken { expected, found }));
            }
            let size = self.read_u64()?;
            self.remaining = size;
            self.state = State::InFile { size };
            let contents = Contents {
                input: &mut self.input,
                remaining: &mut self.remaining,
                path: &self.path,
            };
            Ok(Event::Regular {
                path: &self.path,
                executable,
                size,
                contents,
            })
        } else if kind == b"symlink" {
            self.expect(b"target", "'target'")?;
            self.read_target()?;
            self.expect(b")", "')' after the symlink's target")?;
            self.state = State::AfterNode;
            Ok(Event::Symlink {
                path: &self.path,
                target: &self.target,
            })
        } else if kind == b"directory" {
            self.frames.push(Frame {
                path_len: self.path.len(),
                has_previous: false,
            });
            self.state = State::InDirectory;
            Ok(Event::Directory { path: &self.path })
        } else {
            let found = describe(kind);
            let expected = "'regular', 'symlink' or 'directory'";
            Err(self.error_at(start, Problem::UnexpectedToken { expected, found }))
        }
    }

    /// Reads `( name NAME node` after `entry`, checks the name and appends it
    /// to the path.
    fn entry_header(&mut self) -> Result<(), ReadError> {
        self.expect(b"(", "'(' after 'entry'")?;
        self.expect(b"name", "'name'")?;
        let start = self.input.offset;
        let frame = self
            .frames
            .last()
            .expect("entries are read inside a directory");
        let (path_len, has_previous) = (frame.path_len, frame.has_previous);
        if self.frames.len() > MAX_DEPTH {
            self.path.truncate(path_len);
            return Err(self.error_at(start, Problem::TooDeep));
        }
        let len = self.read_u64()?;
        if len > MAX_NAME_LEN as u64 {
            self.path.truncate(path_len);
            return Err(self.error_at(start, Problem::NameTooLong { len }));
        }
        self.read_body(len)?;
        // The previous entry's name is still at the end of `path`.
        let name_start = if path_len == 0 { 0 } else { path_len + 1 };
        let name = &self.token[..];
        let previous = &self.path[name_start.min(self.path.len())..];
        let problem = if name.is_empty() {
            Some(Problem::EmptyName)
        } else if name == b"." || name == b".." {
            Some(Problem::ReservedName(if name == b"." { "." } else { ".." }))
        } else if name.contains(&b'/') {
            Some(Problem::NameWithSlash(show(name)))
        } else if name.contains(&0) {
            Some(Problem::NameWithNul(show(name)))
        } else if has_previous && name <= previous {
            Some(if name == previous {
                Problem::DuplicateEntry(show(name))
            } else {
                Problem::UnsortedEntry {
                    previous: show(previous),
                    name: show(name),
                }
            })
        } else {
            None
        };
        self.path.truncate(path_len);
        if let Some(problem) = problem {
            return Err(self.error_at(start, problem));
        }
        if path_len != 0 {
            self.path.push(b'/');
        }
        self.path.extend_from_slice(&self.token);
        self.expect(b"node", "'node'")
    }

    fn read_target(&mut self) -> Result<(), ReadError> {
        let start = self.input.offset;
        let len = self.read_u64()?;
        if len > MAX_TARGET_LEN as u64 {
            return Err(self.error_at(start, Problem::TargetTooLong { len }));
        }
        self.read_body(len)?;
        std::mem::swap(&mut self.token, &mut self.target);
        let problem = if self.target.is_empty() {
            Problem::EmptyTarget
        } else if self.target.contains(&0) {
            Problem::TargetWithNul(show(&self.target))
        } else {
            return Ok(());
        };
        Err(self.error_at(start, problem))
    }

    fn expect(&mut self, wanted: &[u8], expected: &'static str) -> Result<(), ReadError> {
        let start = self.input.offset;
        let token = self.read_keyword()?;
        if token == wanted {
            return Ok(());
        }
        let found = describe(token);
        Err(self.error_at(start, Problem::UnexpectedToken { expected, found }))
    }

    /// Reads a string of at most [`MAX_KEYWORD_LEN`] bytes; a longer one is
    /// returned as a sentinel that matches no keyword, without reading it.
    fn read_keyword(&mut self) -> Result<Keyword<'_>, ReadError> {
        let len = self.read_u64()?;
        if len > MAX_KEYWORD_LEN {
            return Ok(Keyword::TooLong(len));
        }
        self.read_body(len)?;
        Ok(Keyword::Bytes(&self.token))
    }

    /// Reads `len` bytes (already bounded by the caller) and their padding into `token`.
    fn read_body(&mut self, len: u64) -> Result<(), ReadError> {
        self.token.resize(len as usize, 0);
        let read = self.input.read_exact(&mut self.token);
        read.map_err(|e| self.io_error(e))?;
        self.read_padding(len)
    }

    fn read_padding(&mut self, len: u64) -> Result<(), ReadError> {
        let mut pad = [0u8; 8];
        let pad = &mut pad[..padding_len(len)];
        let start = self.input.offset;
        self.input.read_exact(pad).map_err(|e| self.io_error(e))?;
        if pad.iter().any(|&b| b != 0) {
            return Err(self.error_at(start, Problem::NonZeroPadding));
        }
        Ok(())
    }

    fn read_u64(&mut self) -> Result<u64, ReadError> {
        let mut bytes = [0u8; 8];
        self.input
            .read_exact(&mut bytes)
            .map_err(|e| self.io_error(e))?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn error(&self, problem: Problem) -> ReadError {
        self.error_at(self.input.offset, problem)
    }

    fn error_at(&self, offset: u64, problem: Problem) -> ReadError {
        ReadError {
            offset,
            path: show(&self.path),
            problem,
        }
    }

    fn io_error(&self, error: io::Error) -> ReadError {
        self.error(io_problem(error))
    }
}

fn io_problem(error: io::Error) -> Problem {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        Problem::Truncated
    } else {
        Problem::Io(error)
    }
}

/// A keyword as read from the input.
#[derive(Clone, Copy)]
enum Keyword<'a> {
    Bytes(&'a [u8]),
    TooLong(u64),
}

impl PartialEq<&[u8]> for Keyword<'_> {
    fn eq(&self, other: &&[u8]) -> bool {
        matches!(self, Keyword::Bytes(b) if b == other)
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Keyword<'_> {
    fn eq(&self, other: &&[u8; N]) -> bool {
        matches!(self, Keyword::Bytes(b) if b == other)
    }
}

fn describe(keyword: Keyword<'_>) -> String {
    match keyword {
        Keyword::Bytes(b) => format!("'{}'", show(b)),
        Keyword::TooLong(len) => format!("a string of {len} bytes"),
    }
}

/// The input, with a count of the bytes consumed.
#[derive(Debug)]
struct Input<R> {
    inner: R,
    offset: u64,
}

impl<R: BufRead> Input<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        // Most tokens are in the buffer already: copy them without the
        // generic read machinery.
        let available = self.inner.fill_buf()?;
        if available.len() >= buf.len() {
            buf.copy_from_slice(&available[..buf.len()]);
            self.inner.consume(buf.len());
        } else {
            self.inner.read_exact(buf)?;
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, mut len: u64) -> io::Result<()> {
        while len > 0 {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = available
                .len()
                .min(usize::try_from(len).unwrap_or(usize::MAX));
            self.inner.consume(n);
            self.offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    fn at_end(&mut self) -> io::Result<bool> {
        Ok(self.inner.fill_buf()?.is_empty())
    }
}

/// The contents of a regular file, read straight from the NAR.
///
/// Reading stops at the end of the file. Errors are [`io::Error`]s; those
/// caused by a bad archive carry a [`ReadError`] (see [`ReadError::from_io`]).
pub struct Contents<'r, R> {
    input: &'r mut Input<R>,
    remaining: &'r mut u64,
    path: &'r [u8],
}

impl<R> fmt::Debug for Contents<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Contents")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl<R: BufRead> Contents<'_, R> {
    /// Bytes not read yet.
    pub fn remaining(&self) -> u64 {
        *self.remaining
    }

    /// Offset in the NAR of the next byte of contents.
    pub fn offset(&self) -> u64 {
        self.input.offset
    }

    /// Copies the rest of the contents to `out` without an intermediate
    /// buffer; returns how many bytes were copied.
    pub fn copy_to<W: Write + ?Sized>(&mut self, out: &mut W) -> io::Result<u64> {
        let mut copied = 0;
        while *self.remaining > 0 {
            let chunk = self.chunk()?;
            let n = chunk.len();
            out.write_all(chunk)?;
            self.advance(n);
            copied += n as u64;
        }
        Ok(copied)
    }

    fn chunk(&mut self) -> io::Result<&[u8]> {
        let remaining = *self.remaining;
        let offset = self.input.offset;
        let available = match self.input.inner.fill_buf() {
            Ok(available) => available.len(),
            Err(e) => return Err(self.wrap(offset, io_problem(e))),
        };
        if available == 0 {
            return Err(self.wrap(offset, Problem::Truncated));
        }
        let n = available.min(usize::try_from(remaining).unwrap_or(usize::MAX));
        // Already buffered: this second call does not read.
        Ok(&self.input.inner.fill_buf()?[..n])
    }

    fn advance(&mut self, n: usize) {
        self.input.inner.consume(n);
        self.input.offset += n as u64;
        *self.remaining -= n as u64;
    }

    fn wrap(&self, offset: u64, problem: Problem) -> io::Error {
        let kind = match &problem {
            Problem::Truncated => io::ErrorKind::UnexpectedEof,
            Problem::Io(e) => e.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(
            kind,
            ReadError {
                offset,
                path: show(self.path),
                problem,
            },
        )
    }
}

impl<R: BufRead> Read for Contents<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if *self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let chunk = self.chunk()?;
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        self.advance(n);
        Ok(n)
    }
}

impl ReadError {
    /// The [`ReadError`] inside an error from [`Contents`], if it was the
    /// archive (rather than, say, the destination of a copy) that failed.
    pub fn from_io(error: io::Error) -> Result<ReadError, io::Error> {
        if error.get_ref().is_some_and(|inner| inner.is::<ReadError>()) {
            let inner = error.into_inner().expect("checked above");
            Ok(*inner.downcast::<ReadError>().expect("checked above"))
        } else {
            Err(error)
        }
    }
}

/// Builds a tree from the events of `reader`: `leaf` turns a file or
/// symlink event into a value, `directory` a directory's entries.
pub(crate) fn fold<R: BufRead, T>(
    reader: &mut NarReader<R>,
    mut leaf: impl FnMut(Event<'_, R>) -> Result<T, ReadError>,
    directory: impl Fn(BTreeMap<Vec<u8>, T>) -> T,
) -> Result<T, ReadError> {
    // Directories being read: name and entries so far.
    let mut open: Vec<(Vec<u8>, Entries<T>)> = Vec::new();
    loop {
        let event = reader
            .next()?
            .expect("the archive ends only after its root node");
        let (name, value) = match event {
            Event::Directory { path } => {
                open.push((base_name(path).to_vec(), BTreeMap::new()));
                continue;
            }
            Event::EndDirectory { .. } => {
                let (name, entries) = open.pop().expect("directories are balanced");
                (name, directory(entries))
            }
            event => (base_name(event.path()).to_vec(), leaf(event)?),
        };
        match open.last_mut() {
            Some((_, entries)) => {
                entries.insert(name, value);
            }
            None => {
                // Check that nothing follows the root.
                let end = reader.next()?;
                debug_assert!(end.is_none());
                return Ok(value);
            }
        }
    }
}

type Entries<T> = BTreeMap<Vec<u8>, T>;

fn base_name(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

/// Reads a whole NAR into memory. Meant for small archives (tests, `.drv`
/// sources): file contents are held in memory.
pub fn read_node(input: impl Read) -> Result<Node, ReadError> {
    let mut reader = NarReader::new(input);
    fold(
        &mut reader,
        |event| match event {
            Event::Regular {
                executable,
                mut contents,
                ..
            } => {
                let mut bytes = Vec::new();
                contents
                    .read_to_end(&mut bytes)
                    .map_err(|e| ReadError::from_io(e).unwrap_or_else(io_read_error))?;
                Ok(Node::Regular {
                    executable,
                    contents: bytes,
                })
            }
            Event::Symlink { target, .. } => Ok(Node::Symlink {
                target: target.to_vec(),
            }),
            Event::Directory { .. } | Event::EndDirectory { .. } => {
                unreachable!("fold passes leaves only")
            }
        },
        |entries| Node::Directory { entries },
    )
}

fn io_read_error(error: io::Error) -> ReadError {
    ReadError {
        offset: 0,
        path: String::new(),
        problem: Problem::Io(error),
    }
}
