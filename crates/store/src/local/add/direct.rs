//! Large files written around the page cache.
//!
//! Restored through the page cache, a large NAR leaves the kernel
//! gigabytes of dirty pages to write back before the fsyncs return. On
//! these machines, 1 GiB written that way and fsync'd took 1.2–3.7 s;
//! written with `O_DIRECT`, 0.6–0.75 s. Files of at least [`DIRECT_MIN`]
//! bytes are therefore written with `O_DIRECT`, from aligned blocks, by a
//! writer thread: parsing and hashing the stream overlap the device's
//! writes. Such files also stay out of the page cache, as a large
//! download should, instead of evicting the working set.
//!
//! A file system that refuses `O_DIRECT` (when it is set, or at the first
//! write) gets the same bytes through the page cache. The durability
//! rules do not change: the caller fsyncs the finished files (or the whole
//! file system) before it registers anything.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use kiln_formats::hash::Hasher;

use super::super::fsutil::finish_canonical_file;
use crate::StoreError;

/// Regular files at least this large are written with `O_DIRECT`.
pub(super) const DIRECT_MIN: u64 = 64 << 10;
/// Alignment of buffers, offsets and lengths for `O_DIRECT`: the largest
/// logical block size in common use.
const ALIGN: usize = 4096;
/// One write. 1 MiB writes were as fast as 4 MiB ones here (`dd
/// oflag=direct`).
const BLOCK: usize = 1 << 20;
/// Blocks per writer: the memory one restore may hold (8 MiB).
const BLOCKS: usize = 8;
/// Blocks kept for later writers once one is done (16 MiB), so that
/// restoring many NARs one after another does not allocate and fault in
/// fresh blocks for each.
const POOLED: usize = 16;

static POOL: std::sync::Mutex<Vec<Block>> = std::sync::Mutex::new(Vec::new());

/// A [`BLOCK`]-sized buffer aligned to [`ALIGN`].
struct Block {
    buf: Vec<u8>,
    start: usize,
}

impl Block {
    fn new() -> Block {
        let buf = vec![0u8; BLOCK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Block { buf, start }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + BLOCK]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + BLOCK]
    }
}

enum Job {
    /// The following writes go to this new, empty file.
    Open {
        file: File,
        path: PathBuf,
        mode: u32,
    },
    /// The first `len` bytes of `block`, appended to the open file.
    Write { block: Block, len: usize },
    /// The open file is complete: give it its canonical metadata.
    Finish,
}

/// A finished file, or the first failure.
type Done = Result<(File, PathBuf), StoreError>;

/// Writes large files on a thread of its own; see the module's docs.
pub(super) struct DirectWriter {
    jobs: Option<mpsc::Sender<Job>>,
    spare: mpsc::Receiver<Block>,
    done: mpsc::Receiver<Done>,
    allocated: usize,
    cancelled: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DirectWriter {
    pub(super) fn spawn() -> io::Result<DirectWriter> {
        let (jobs, jobs_rx) = mpsc::channel();
        let (spare_tx, spare) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancelled);
        let thread = std::thread::Builder::new()
            .name("kiln-direct-writer".into())
            .spawn(move || run(jobs_rx, spare_tx, done_tx, flag))?;
        Ok(DirectWriter {
            jobs: Some(jobs),
            spare,
            done,
            allocated: 0,
            cancelled,
            thread: Some(thread),
        })
    }

    /// Switches `file`, just created empty, to `O_DIRECT`; gives it back
    /// when its file system refuses.
    pub(super) fn try_direct(file: File) -> Result<File, File> {
        match set_direct(&file, true) {
            Ok(()) => Ok(file),
            Err(_) => Err(file),
        }
    }

    /// Starts writing `file` (made by [`DirectWriter::try_direct`]): what
    /// is written to the returned sink is appended to it; `hasher`, if
    /// any, sees the same bytes.
    pub(super) fn open<'w>(
        &'w mut self,
        file: File,
        path: &Path,
        mode: u32,
        hasher: Option<&'w mut Hasher>,
    ) -> Result<DirectSink<'w>, StoreError> {
        self.send(Job::Open {
            file,
            path: path.to_path_buf(),
            mode,
        })
        .map_err(|e| StoreError::io("write", path, e))?;
        Ok(DirectSink {
            writer: self,
            block: None,
            filled: 0,
            hasher,
        })
    }

    /// The files finished so far, without waiting; the writer's failure,
    /// if it had one.
    pub(super) fn finished(&mut self) -> Result<Vec<(File, PathBuf)>, StoreError> {
        self.done.try_iter().collect()
    }

    /// Waits for every write; the files finished since the last
    /// [`DirectWriter::finished`], or the writer's failure.
    pub(super) fn close(mut self) -> Result<Vec<(File, PathBuf)>, StoreError> {
        drop(self.jobs.take());
        let panicked = self
            .thread
            .take()
            .map(JoinHandle::join)
            .is_some_and(|r| r.is_err());
        if panicked {
            return Err(StoreError::io(
                "write",
                PathBuf::from("(large files)"),
                io::Error::other("the direct writer thread panicked"),
            ));
        }
        self.done.try_iter().collect()
    }

    fn send(&self, job: Job) -> io::Result<()> {
        self.jobs
            .as_ref()
            .expect("open until closed")
            .send(job)
            .map_err(|_| stopped())
    }

    fn take_block(&mut self) -> io::Result<Block> {
        if let Ok(block) = self.spare.try_recv() {
            return Ok(block);
        }
        if self.allocated < BLOCKS {
            self.allocated += 1;
            let pooled = POOL.lock().ok().and_then(|mut pool| pool.pop());
            return Ok(pooled.unwrap_or_else(Block::new));
        }
        self.spare.recv().map_err(|_| stopped())
    }
}

impl Drop for DirectWriter {
    /// Abandons what is still queued and waits for the thread, so nothing
    /// writes into a temporary tree after the caller has removed it.
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The writer has handed every block back.
        if let Ok(mut pool) = POOL.lock() {
            let room = POOLED.saturating_sub(pool.len());
            pool.extend(self.spare.try_iter().take(room));
        }
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the direct writer stopped")
}

/// The contents of one file, on their way to the writer.
pub(super) struct DirectSink<'w> {
    writer: &'w mut DirectWriter,
    block: Option<Block>,
    filled: usize,
    hasher: Option<&'w mut Hasher>,
}

impl DirectSink<'_> {
    /// Sends what is buffered; the writer then finishes the file.
    pub(super) fn finish(mut self) -> io::Result<()> {
        self.send_block()?;
        self.writer.send(Job::Finish)
    }

    fn send_block(&mut self) -> io::Result<()> {
        match self.block.take() {
            Some(block) if self.filled > 0 => {
                let len = std::mem::take(&mut self.filled);
                self.writer.send(Job::Write { block, len })
            }
            Some(block) => {
                self.block = Some(block);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Write for DirectSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let block = match &mut self.block {
                Some(block) => block,
                None => self.block.insert(self.writer.take_block()?),
            };
            let n = (BLOCK - self.filled).min(rest.len());
            block.bytes_mut()[self.filled..self.filled + n].copy_from_slice(&rest[..n]);
            self.filled += n;
            rest = &rest[n..];
            if self.filled == BLOCK {
                self.send_block()?;
            }
        }
        if let Some(h) = self.hasher.as_deref_mut() {
            h.update(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The file being written by the thread.
struct Current {
    file: File,
    path: PathBuf,
    mode: u32,
    offset: u64,
    direct: bool,
}

impl Current {
    /// Appends `data`: aligned lengths directly, an unaligned tail (or
    /// everything, once the file system has refused a direct write)
    /// through the page cache.
    fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let direct_len = data.len() - data.len() % ALIGN;
            let written = if self.direct && direct_len > 0 {
                match self.file.write_at(&data[..direct_len], self.offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.leave_direct()?;
                        continue;
                    }
                    r => r,
                }
            } else {
                if self.direct {
                    self.leave_direct()?;
                }
                self.file.write_at(data, self.offset)
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn leave_direct(&mut self) -> io::Result<()> {
        self.direct = false;
        set_direct(&self.file, false)
    }

    fn finish(self) -> Result<(File, PathBuf), StoreError> {
        finish_canonical_file(&self.file, self.mode)
            .map_err(|e| StoreError::io("finish", &self.path, e))?;
        Ok((self.file, self.path))
    }
}

/// The writer thread: runs the jobs in order until the sender is dropped.
/// After a failure it only hands the blocks back, so the restoring side
/// never waits for a block that will not come.
fn run(
    jobs: mpsc::Receiver<Job>,
    spare: mpsc::Sender<Block>,
    done: mpsc::Sender<Done>,
    cancelled: Arc<AtomicBool>,
) {
    let mut current: Option<Current> = None;
    let mut failed = false;
    for job in jobs {
        let skip = failed || cancelled.load(Ordering::Relaxed);
        match job {
            Job::Open { file, path, mode } => {
                current = Some(Current {
                    file,
                    path,
                    mode,
                    offset: 0,
                    direct: true,
                });
            }
            Job::Write { block, len } => {
                if !skip && let Some(cur) = &mut current {
                    if let Err(e) = cur.append(&block.bytes()[..len]) {
                        failed = true;
                        let _ = done.send(Err(StoreError::io("write", &cur.path, e)));
                    }
                }
                let _ = spare.send(block);
            }
            Job::Finish => {
                if let Some(cur) = current.take()
                    && !skip
                {
                    let result = cur.finish();
                    failed = result.is_err();
                    let _ = done.send(result);
                }
            }
        }
    }
}

/// Sets or clears `O_DIRECT` on an open file.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own; F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above; F_SETFL takes an int.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
