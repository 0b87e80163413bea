//! The primitives every Nix protocol here is made of: little-endian `u64`s,
//! byte strings padded with zeros to a multiple of eight, lists of strings,
//! the framed streams of newer protocol versions (`u64` length, bytes; a
//! zero length ends the stream) and NARs embedded in a stream.
//!
//! Everything read from a peer is bounded: strings, lists and NAR nesting
//! have limits, so a malicious or broken peer cannot make us allocate
//! without end.

use std::io::{self, Read, Write};

/// Longest string or byte string accepted from a peer (a `.drv`, a build
/// log chunk, a realisation): generous, but bounded.
pub const MAX_STRING: u64 = 64 << 20;
/// Most entries accepted in one list or map.
pub const MAX_LIST: u64 = 1 << 22;
/// Deepest NAR directory nesting accepted (as the NAR reader's bound).
pub const MAX_NAR_DEPTH: usize = 64;

/// What went wrong reading or writing the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection error while {action}: {source}")]
    Io {
        action: &'static str,
        source: io::Error,
    },
    #[error("{what} of {len} bytes is longer than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} of {len} entries is longer than the limit of {max}")]
    TooMany {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("padding of a string is not zero")]
    BadPadding,
    #[error("embedded NAR is malformed: expected {expected}, got '{got}'")]
    BadNar { expected: &'static str, got: String },
    #[error("embedded NAR nests deeper than {MAX_NAR_DEPTH} directories")]
    NarTooDeep,
}

impl WireError {
    pub(crate) fn io(action: &'static str) -> impl FnOnce(io::Error) -> WireError {
        move |source| WireError::Io { action, source }
    }

    /// Whether the peer simply went away (end of stream).
    pub fn is_eof(&self) -> bool {
        matches!(self, WireError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof)
    }
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        match e {
            WireError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

pub fn read_u64<R: Read + ?Sized>(r: &mut R) -> Result<u64, WireError> {
    let mut buf = [0u8; 8];
    r.read_exact(&mut buf)
        .map_err(WireError::io("reading a number"))?;
    Ok(u64::from_le_bytes(buf))
}

pub fn read_bool<R: Read + ?Sized>(r: &mut R) -> Result<bool, WireError> {
    Ok(read_u64(r)? != 0)
}

/// A count of list entries, checked against [`MAX_LIST`].
pub fn read_count<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<usize, WireError> {
    let len = read_u64(r)?;
    if len > MAX_LIST {
        return Err(WireError::TooMany {
            what,
            len,
            max: MAX_LIST,
        });
    }
    Ok(len as usize)
}

fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

fn skip_padding<R: Read + ?Sized>(r: &mut R, len: u64) -> Result<(), WireError> {
    let pad = padding(len);
    if pad > 0 {
        let mut buf = [0u8; 8];
        r.read_exact(&mut buf[..pad])
            .map_err(WireError::io("reading padding"))?;
        if buf[..pad].iter().any(|b| *b != 0) {
            return Err(WireError::BadPadding);
        }
    }
    Ok(())
}

/// A byte string of at most `max` bytes.
pub fn read_bytes_max<R: Read + ?Sized>(
    r: &mut R,
    what: &'static str,
    max: u64,
) -> Result<Vec<u8>, WireError> {
    let len = read_u64(r)?;
    if len > max {
        return Err(WireError::TooLong { what, len, max });
    }
    let mut buf = Vec::new();
    // Grow with the data actually received, not with the claimed length.
    r.take(len)
        .read_to_end(&mut buf)
        .map_err(WireError::io("reading a string"))?;
    if (buf.len() as u64) < len {
        return Err(WireError::Io {
            action: "reading a string",
            source: io::ErrorKind::UnexpectedEof.into(),
        });
    }
    skip_padding(r, len)?;
    Ok(buf)
}

pub fn read_bytes<R: Read + ?Sized>(r: &mut R) -> Result<Vec<u8>, WireError> {
    read_bytes_max(r, "string", MAX_STRING)
}

pub fn read_string<R: Read + ?Sized>(r: &mut R) -> Result<String, WireError> {
    String::from_utf8(read_bytes(r)?).map_err(|_| WireError::NotUtf8 { what: "string" })
}

pub fn read_strings<R: Read + ?Sized>(r: &mut R) -> Result<Vec<String>, WireError> {
    let n = read_count(r, "string list")?;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        out.push(read_string(r)?);
    }
    Ok(out)
}

/// A map sent as a count and then key, value pairs.
pub fn read_string_pairs<R: Read + ?Sized>(r: &mut R) -> Result<Vec<(String, String)>, WireError> {
    let n = read_count(r, "string map")?;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let k = read_string(r)?;
        let v = read_string(r)?;
        out.push((k, v));
    }
    Ok(out)
}

pub fn write_u64<W: Write + ?Sized>(w: &mut W, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

pub fn write_bool<W: Write + ?Sized>(w: &mut W, b: bool) -> io::Result<()> {
    write_u64(w, b as u64)
}

pub fn write_bytes<W: Write + ?Sized>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    write_u64(w, bytes.len() as u64)?;
    w.write_all(bytes)?;
    w.write_all(&[0u8; 8][..padding(bytes.len() as u64)])
}

pub fn write_strings<W, I, S>(w: &mut W, items: I) -> io::Result<()>
where
    W: Write + ?Sized,
    I: IntoIterator<Item = S>,
    I::IntoIter: ExactSizeIterator,
    S: AsRef<[u8]>,
{
    let items = items.into_iter();
    write_u64(w, items.len() as u64)?;
    for item in items {
        write_bytes(w, item.as_ref())?;
    }
    Ok(())
}

/// Reads a framed stream (`u64` length, that many bytes, …, `0`) as one
/// stream of bytes. Frames carry no padding.
#[derive(Debug)]
pub struct FramedReader<R> {
    inner: R,
    left_in_frame: u64,
    done: bool,
}

impl<R: Read> FramedReader<R> {
    pub fn new(inner: R) -> Self {
        FramedReader {
            inner,
            left_in_frame: 0,
            done: false,
        }
    }

    /// Reads what is left of the stream, up to its end marker, so the
    /// connection is positioned after it even when a consumer stopped early.
    pub fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(drop)
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for FramedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.left_in_frame == 0 {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            let len = read_u64(&mut self.inner)?;
            if len == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left_in_frame = len;
        }
        let want = buf
            .len()
            .min(self.left_in_frame.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left_in_frame -= n as u64;
        Ok(n)
    }
}

/// Writes a framed stream: every buffered chunk becomes one frame;
/// [`finish`](FramedWriter::finish) writes the end marker.
#[derive(Debug)]
pub struct FramedWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

const FRAME_SIZE: usize = 64 << 10;

impl<W: Write> FramedWriter<W> {
    pub fn new(inner: W) -> Self {
        FramedWriter {
            inner,
            buf: Vec::with_capacity(FRAME_SIZE),
        }
    }

    fn flush_frame(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            write_u64(&mut self.inner, self.buf.len() as u64)?;
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the last frame and the end marker; gives the stream back.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_frame()?;
        write_u64(&mut self.inner, 0)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FramedWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > FRAME_SIZE {
            self.flush_frame()?;
        }
        if data.len() >= FRAME_SIZE {
            write_u64(&mut self.inner, data.len() as u64)?;
            self.inner.write_all(data)?;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_frame()?;
        self.inner.flush()
    }
}

/// Copies exactly one NAR from `r` to `w`: the NAR is not length-prefixed
/// in the protocols, so its grammar is what says where it ends. Returns the
/// number of bytes copied.
pub fn copy_nar<R: Read + ?Sized, W: Write + ?Sized>(
    r: &mut R,
    w: &mut W,
) -> Result<u64, WireError> {
    let mut copier = NarCopier { r, w, copied: 0 };
    copier.expect("nix-archive-1", "the NAR magic 'nix-archive-1'")?;
    copier.node(0)?;
    Ok(copier.copied)
}

struct NarCopier<'a, R: ?Sized, W: ?Sized> {
    r: &'a mut R,
    w: &'a mut W,
    copied: u64,
}

/// Tokens of the NAR grammar are short; names and symlink targets have
/// their own bounds in Nix (255, 4095).
const MAX_NAR_TOKEN: u64 = 4096;

impl<R: Read + ?Sized, W: Write + ?Sized> NarCopier<'_, R, W> {
    fn token(&mut self) -> Result<Vec<u8>, WireError> {
        let t = read_bytes_max(self.r, "NAR token", MAX_NAR_TOKEN)?;
        write_bytes(self.w, &t).map_err(WireError::io("copying a NAR"))?;
        self.copied += 8 + t.len() as u64 + padding(t.len() as u64) as u64;
        Ok(t)
    }

    fn expect(&mut self, want: &str, expected: &'static str) -> Result<(), WireError> {
        let got = self.token()?;
        if got != want.as_bytes() {
            return Err(WireError::BadNar {
                expected,
                got: String::from_utf8_lossy(&got).into_owned(),
            });
        }
        Ok(())
    }

    fn contents(&mut self) -> Result<(), WireError> {
        let len = read_u64(self.r)?;
        write_u64(self.w, len).map_err(WireError::io("copying a NAR"))?;
        let copied = io::copy(&mut (&mut *self.r).take(len), &mut *self.w)
            .map_err(WireError::io("copying a NAR"))?;
        if copied != len {
            return Err(WireError::Io {
                action: "copying a NAR",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        skip_padding(self.r, len)?;
        self.w
            .write_all(&[0u8; 8][..padding(len)])
            .map_err(WireError::io("copying a NAR"))?;
        self.copied += 8 + len + padding(len) as u64;
        Ok(())
    }

    fn node(&mut self, depth: usize) -> Result<(), WireError> {
        if depth > MAX_NAR_DEPTH {
            return Err(WireError::NarTooDeep);
        }
        self.expect("(", "'('")?;
        self.expect("type", "'type'")?;
        let kind = self.token()?;
        match &kind[..] {
            b"regular" => {
                let mut t = self.token()?;
                if t == b"executable" {
                    self.expect("", "an empty string after 'executable'")?;
                    t = self.token()?;
                }
                if t != b"contents" {
                    return Err(WireError::BadNar {
                        expected: "'contents'",
                        got: String::from_utf8_lossy(&t).into_owned(),
                    });
                }
                self.contents()?;
                self.expect(")", "')'")
            }
            b"symlink" => {
                self.expect("target", "'target'")?;
                self.token()?;
                self.expect(")", "')'")
            }
            b"directory" => loop {
                let t = self.token()?;
                match &t[..] {
                    b")" => return Ok(()),
                    b"entry" => {
                        self.expect("(", "'('")?;
                        self.expect("name", "'name'")?;
                        self.token()?;
                        self.expect("node", "'node'")?;
                        self.node(depth + 1)?;
                        self.expect(")", "')'")?;
                    }
                    _ => {
                        return Err(WireError::BadNar {
                            expected: "'entry' or ')'",
                            got: String::from_utf8_lossy(&t).into_owned(),
                        });
                    }
                }
            },
            _ => Err(WireError::BadNar {
                expected: "'regular', 'symlink' or 'directory'",
                got: String::from_utf8_lossy(&kind).into_owned(),
            }),
        }
    }
}

/// The pipe buffer [`widen_pipe`] asks for: the default 64 KiB makes a
/// NAR stream through SSH cost a context switch per 64 KiB on each side.
pub const PIPE_BUFFER: i32 = 1 << 20;

/// Grows the kernel buffer of the pipe `fd` is an end of to
/// [`PIPE_BUFFER`], so a writer runs ahead of its reader by a megabyte.
/// Best effort: not a pipe, or over the system's limit
/// (`/proc/sys/fs/pipe-max-size`), leaves it as it is.
pub fn widen_pipe(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BUFFER),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::nar::Node;

    #[test]
    fn strings_are_padded_and_round_trip() {
        let mut out = Vec::new();
        write_bytes(&mut out, b"hello").unwrap();
        assert_eq!(out.len(), 16);
        assert_eq!(&out[..8], &5u64.to_le_bytes());
        assert_eq!(read_string(&mut &out[..]).unwrap(), "hello");
        let mut bad = out.clone();
        bad[15] = 1;
        assert!(matches!(
            read_string(&mut &bad[..]),
            Err(WireError::BadPadding)
        ));
    }

    #[test]
    fn huge_claimed_lengths_are_refused_without_allocating() {
        let data = (MAX_STRING + 1).to_le_bytes();
        assert!(matches!(
            read_bytes(&mut &data[..]),
            Err(WireError::TooLong { .. })
        ));
        let data = u64::MAX.to_le_bytes();
        assert!(matches!(
            read_strings(&mut &data[..]),
            Err(WireError::TooMany { .. })
        ));
    }

    #[test]
    fn framed_stream_round_trips() {
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut w = FramedWriter::new(Vec::new());
        w.write_all(&payload[..10]).unwrap();
        w.write_all(&payload[10..]).unwrap();
        let mut bytes = w.finish().unwrap();
        bytes.extend_from_slice(b"after");
        let mut r = FramedReader::new(&bytes[..]);
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back, payload);
        assert_eq!(r.into_inner(), b"after");
    }

    #[test]
    fn copies_exactly_one_nar() {
        let node = Node::directory([
            ("a", Node::file(b"x".to_vec())),
            ("b", Node::executable(b"#!/bin/sh\n".to_vec())),
            ("c", Node::symlink(b"a".to_vec())),
            ("d", Node::directory([("e", Node::file(Vec::new()))])),
        ]);
        let nar = node.to_nar();
        let mut input = nar.clone();
        input.extend_from_slice(b"trailing");
        let mut r = &input[..];
        let mut out = Vec::new();
        assert_eq!(copy_nar(&mut r, &mut out).unwrap(), nar.len() as u64);
        assert_eq!(out, nar);
        assert_eq!(r, b"trailing");
        assert!(copy_nar(&mut &nar[..nar.len() - 8], &mut Vec::new()).is_err());
    }
}
