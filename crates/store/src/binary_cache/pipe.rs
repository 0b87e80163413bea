//! An in-process pipe of byte chunks, for handing a NAR that one thread
//! writes (`nar_from_path`) to another that reads it (`add_nar`, an HTTP
//! response) without holding it whole in memory.

use std::io::{self, BufRead, Read, Write};
use std::sync::mpsc;

const CHUNK: usize = 256 << 10;

/// A writer and the reader that receives what it writes. The reader sees
/// end of file once the writer is dropped; the writer gets `BrokenPipe`
/// once the reader is.
pub(crate) fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = mpsc::sync_channel(4);
    (
        PipeWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        },
        PipeReader {
            rx,
            current: Vec::new(),
            pos: 0,
        },
    )
}

#[derive(Debug)]
pub(crate) struct PipeWriter {
    tx: mpsc::SyncSender<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx.send(Ok(chunk)).map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "the reading side stopped")
            })?;
        }
        Ok(())
    }
}

impl PipeWriter {
    /// Ends the stream with an error instead of end of file, so the
    /// reader cannot take a cut stream for a complete one.
    pub(crate) fn fail(mut self, message: String) {
        self.buf.clear();
        let _ = self.tx.send(Err(message));
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[derive(Debug)]
pub(crate) struct PipeReader {
    rx: mpsc::Receiver<Result<Vec<u8>, String>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        kiln_formats::bufread::read_via_buffer(self, buf)
    }
}

impl BufRead for PipeReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(Err(message)) => return Err(io::Error::other(message)),
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.current[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos += n;
    }
}
