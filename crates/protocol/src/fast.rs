//! Serving a socket connection with the hot read-only operations
//! (`QueryPathInfo`, `IsValidPath`) answered on the async reactor from a
//! cache of encoded answers, and everything else on a blocking thread.
//!
//! Why: a thread per connection costs two context switches per request
//! (client → daemon thread → client), and with dozens of clients on a few
//! cores those switches, not the lookups, are the daemon's work. On the
//! reactor, one worker thread answers every connection that is ready in
//! turn, without switching, and a cached answer is a hash lookup and a
//! copy. A cache miss, or any other operation, moves the connection to a
//! blocking thread ([`Daemon::serve_blocking`]) until it asks for a hot
//! operation again; the bytes either side has read ahead travel with it.
//!
//! The cache holds only what the store has confirmed: entries come from
//! the blocking side's lookups, every operation that may change a path's
//! metadata (deletions, signatures, repairs) clears it, and a hit is only
//! used while the path is still on disk, so a collector in another
//! process cannot make the daemon call a deleted path valid. "Still on
//! disk" is known from an inotify watch on the store directory: before a
//! hit is used, the deletions and renames reported since the last request
//! drop their answers (one non-blocking `read`, where a `stat` of the path
//! cost a lookup among all the store's names: a quarter of the daemon's
//! time per answer). Where no watch can be set, each hit is `stat`ed.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use kiln_formats::store_path::StorePath;
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server::{ConnState, Daemon, ServerError};
use crate::wire;
use crate::worker::{self, Op, Version, minor};

/// Bytes the async side buffers: also the most it hands to the blocking
/// side, whose reader takes them in its first fill.
const BUFFER: usize = 64 << 10;

/// Entries kept before the cache starts over.
const MAX_ENTRIES: usize = 200_000;

/// Longest path string answered here (longer ones take the checked path).
const MAX_PATH: usize = 1024;

/// Events after which the watch has missed removals or will report no
/// more (all but the overflow end it).
const WATCH_LOST: AddWatchFlags = AddWatchFlags::IN_Q_OVERFLOW
    .union(AddWatchFlags::IN_IGNORED)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_UNMOUNT);

/// Encoded `QueryPathInfo` answers by the path string clients send.
#[derive(Debug)]
pub(crate) struct AnswerCache {
    real_store: PathBuf,
    /// The store directory, opened once: a hit's existence check looks up
    /// one name in it instead of walking the whole physical path.
    store_fd: Option<OwnedFd>,
    /// Removals from the store directory, reported by the kernel.
    watch: Option<Mutex<Inotify>>,
    /// Whether `watch` still reports everything (it stops when the
    /// directory itself goes away or is moved; then hits are `stat`ed).
    watching: AtomicBool,
    /// The store directory as clients print it, with a trailing `/`: a
    /// removed name's cache key is this and the name.
    prefix: Vec<u8>,
    entries: RwLock<HashMap<Box<[u8]>, Arc<Answer>>>,
}

#[derive(Debug)]
struct Answer {
    /// The path info as sent after `true` (protocol 1.17 and later).
    unkeyed: Vec<u8>,
    /// Where the path is on disk.
    real: PathBuf,
    /// Its name in the store directory.
    base_name: CString,
}

impl AnswerCache {
    /// A cache for the store at `real_store` on disk, whose paths clients
    /// print under `store_dir`.
    pub(crate) fn new(real_store: &Path, store_dir: &str) -> AnswerCache {
        let store_fd = std::fs::File::open(real_store).ok().map(OwnedFd::from);
        let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .and_then(|w| {
                w.add_watch(
                    real_store,
                    AddWatchFlags::IN_DELETE
                        | AddWatchFlags::IN_MOVED_FROM
                        | AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF
                        | AddWatchFlags::IN_ONLYDIR,
                )
                .map(|_| w)
            })
            .map_err(
                |e| tracing::debug!(error = %e, "no inotify watch on the store: hits are stat'ed"),
            )
            .ok();
        AnswerCache {
            real_store: real_store.to_owned(),
            store_fd,
            watching: AtomicBool::new(watch.is_some()),
            watch: watch.map(Mutex::new),
            prefix: format!("{}/", store_dir.trim_end_matches('/')).into_bytes(),
            entries: RwLock::default(),
        }
    }

    pub(crate) fn remember(&self, printed: Vec<u8>, path: &StorePath, unkeyed: Vec<u8>) {
        let Ok(base_name) = CString::new(path.base_name()) else {
            return;
        };
        let answer = Arc::new(Answer {
            unkeyed,
            real: self.real_store.join(path.base_name()),
            base_name,
        });
        let key = printed.into_boxed_slice();
        {
            let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
            entries.insert(key.clone(), answer.clone());
        }
        // The path may have gone since the store answered, its removal
        // already reported (and applied to nothing): checked once now,
        // after which any removal is reported after the entry was made.
        if !self.on_disk(&answer) {
            self.forget(&key);
        }
    }

    fn forget(&self, key: &[u8]) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.remove(key);
    }

    pub(crate) fn forget_all(&self) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if !entries.is_empty() {
            entries.clear();
        }
    }

    fn get(&self, printed: &[u8]) -> Option<Arc<Answer>> {
        let checked = self.watching.load(Ordering::Acquire) && self.apply_removals();
        let answer = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(printed)
            .cloned()?;
        (checked || self.on_disk(&answer)).then_some(answer)
    }

    /// Drops the answers of the names removed from the store directory
    /// since the last call; false if the watch can no longer say (then
    /// every answer is dropped and hits are `stat`ed from now on).
    ///
    /// The watch is locked while its events are applied, so a request that
    /// finds the queue empty finds their answers gone too.
    fn apply_removals(&self) -> bool {
        let Some(watch) = &self.watch else {
            return false;
        };
        let watch = watch.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match watch.read_events() {
                Ok(events) => {
                    for e in events {
                        if e.mask.intersects(WATCH_LOST) {
                            self.forget_all();
                            if !e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                                self.watching.store(false, Ordering::Release);
                                return false;
                            }
                        } else if let Some(name) = e.name {
                            let mut key = self.prefix.clone();
                            key.extend_from_slice(name.as_bytes());
                            self.forget(&key);
                        }
                    }
                }
                Err(Errno::EAGAIN) => return true,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading the store's inotify watch: hits are stat'ed from now on");
                    self.forget_all();
                    self.watching.store(false, Ordering::Release);
                    return false;
                }
            }
        }
    }

    /// Whether the answer's path is still in the store directory (one
    /// `stat`, of the name only).
    fn on_disk(&self, answer: &Answer) -> bool {
        match &self.store_fd {
            Some(dir) => {
                // SAFETY: a valid directory fd, a NUL-terminated name and a
                // stat buffer fstatat may fill.
                let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
                unsafe {
                    libc::fstatat(
                        dir.as_raw_fd(),
                        answer.base_name.as_ptr(),
                        st.as_mut_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    ) == 0
                }
            }
            None => std::fs::symlink_metadata(&answer.real).is_ok(),
        }
    }
}

/// Whether the async side answers operation `code` for a client of
/// `version` (it knows only the 1.17+ form of `QueryPathInfo`).
pub(crate) fn answers_itself(code: u64, version: Version) -> bool {
    minor(version) >= 17 && (code == Op::QueryPathInfo as u64 || code == Op::IsValidPath as u64)
}

/// Whether `op` leaves every valid path's metadata as it was (so cached
/// answers stay true). Additions do not change paths that were valid.
pub(crate) fn keeps_answers(op: Op) -> bool {
    use Op::*;
    matches!(
        op,
        IsValidPath
            | HasSubstitutes
            | QueryReferrers
            | AddTextToStore
            | EnsurePath
            | AddTempRoot
            | AddIndirectRoot
            | SyncWithGC
            | FindRoots
            | QueryDeriver
            | SetOptions
            | QuerySubstitutablePathInfo
            | QueryDerivationOutputs
            | QueryAllValidPaths
            | QueryPathInfo
            | QueryDerivationOutputNames
            | QueryPathFromHashPart
            | QuerySubstitutablePathInfos
            | QueryValidPaths
            | QuerySubstitutablePaths
            | QueryValidDerivers
            | NarFromPath
            | QueryMissing
            | QueryDerivationOutputMap
            | QueryRealisation
            | AddBuildLog
    )
}

/// A hot request at the head of `buf`, if it is whole.
enum Parsed<'a> {
    /// Operation code, path string, bytes taken.
    Request(u64, &'a [u8], usize),
    /// More bytes are needed.
    Partial,
    /// Not for this side (other operations, odd lengths or padding).
    Elsewhere,
}

fn parse(buf: &[u8], version: Version) -> Parsed<'_> {
    let word = |at: usize| {
        buf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("eight bytes")))
    };
    let Some(code) = word(0) else {
        return Parsed::Partial;
    };
    if !answers_itself(code, version) {
        return Parsed::Elsewhere;
    }
    let Some(len) = word(8) else {
        return Parsed::Partial;
    };
    if len > MAX_PATH as u64 {
        return Parsed::Elsewhere;
    }
    let len = len as usize;
    let end = 16 + len.div_ceil(8) * 8;
    if buf.len() < end {
        return Parsed::Partial;
    }
    if buf[16 + len..end].iter().any(|&b| b != 0) {
        return Parsed::Elsewhere;
    }
    Parsed::Request(code, &buf[16..16 + len], end)
}

/// Read-ahead bytes in front of a stream, for the blocking side.
struct Carried<'a> {
    head: io::Cursor<Vec<u8>>,
    stream: &'a std::os::unix::net::UnixStream,
}

impl Read for Carried<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = Read::read(&mut self.head, buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        let mut stream = self.stream;
        Read::read(&mut stream, buf)
    }
}

impl Daemon {
    /// Serves a client connected on a Unix socket until it hangs up, as
    /// described in [`crate::fast`]. `trusted` as for
    /// [`Daemon::serve_connection`].
    pub async fn serve_unix(
        self: Arc<Self>,
        trusted: bool,
        stream: std::os::unix::net::UnixStream,
    ) -> Result<(), ServerError> {
        let mut state = ConnState::new(trusted, self.settings().clone());
        let mut stream = stream;
        let mut carried = Vec::new();
        loop {
            stream.set_nonblocking(false)?;
            let daemon = self.clone();
            let (back, returned_state, outcome) = tokio::task::spawn_blocking(move || {
                let mut reader = Carried {
                    head: io::Cursor::new(carried),
                    stream: &stream,
                };
                let outcome = daemon
                    .serve_blocking(
                        &mut state,
                        &mut reader,
                        &stream,
                        true,
                        Some(stream.as_raw_fd()),
                    )
                    .map(|handed| {
                        handed.map(|(code, mut buffered)| {
                            // What the blocking side's reader had not taken yet.
                            let at = reader.head.position() as usize;
                            buffered.extend_from_slice(&reader.head.get_ref()[at..]);
                            (code, buffered)
                        })
                    });
                (stream, state, outcome)
            })
            .await
            .map_err(|e| ServerError::Io(io::Error::other(format!("connection thread: {e}"))))?;
            stream = back;
            state = returned_state;
            let Some((code, rest)) = outcome? else {
                return Ok(());
            };
            let mut head = Vec::with_capacity(8 + rest.len());
            head.extend_from_slice(&code.to_le_bytes());
            head.extend_from_slice(&rest);
            stream.set_nonblocking(true)?;
            let async_stream = tokio::net::UnixStream::from_std(stream)?;
            match self.serve_hot(&state, async_stream, head).await? {
                None => return Ok(()),
                Some((async_stream, rest)) => {
                    stream = async_stream.into_std()?;
                    carried = rest;
                }
            }
        }
    }

    /// Answers hot requests from the cache until one it cannot answer:
    /// then gives back the stream and the unanswered bytes. `None` when
    /// the client hung up.
    async fn serve_hot(
        &self,
        state: &ConnState,
        mut stream: tokio::net::UnixStream,
        head: Vec<u8>,
    ) -> Result<Option<(tokio::net::UnixStream, Vec<u8>)>, ServerError> {
        let mut buf = vec![0u8; BUFFER.max(head.len())];
        buf[..head.len()].copy_from_slice(&head);
        let (mut start, mut end) = (0, head.len());
        let mut out = Vec::with_capacity(BUFFER);
        loop {
            match parse(&buf[start..end], state.version) {
                Parsed::Request(code, printed, taken) => {
                    let Some(answer) = self.answers.get(printed) else {
                        break;
                    };
                    wire::write_u64(&mut out, worker::STDERR_LAST)?;
                    wire::write_u64(&mut out, 1)?;
                    if code == Op::QueryPathInfo as u64 {
                        out.extend_from_slice(&answer.unkeyed);
                    }
                    start += taken;
                }
                Parsed::Elsewhere => break,
                Parsed::Partial => {
                    // Answers go out before waiting: the client waits for them.
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                    if start > 0 {
                        buf.copy_within(start..end, 0);
                        end -= start;
                        start = 0;
                    }
                    if end == buf.len() {
                        break;
                    }
                    let n = stream.read(&mut buf[end..]).await?;
                    if n == 0 {
                        return Ok(None);
                    }
                    end += n;
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
        Ok(Some((stream, buf[start..end].to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(n: u8) -> StorePath {
        StorePath::from_parts(&[n; kiln_formats::store_path::HASH_BYTES], "answer").unwrap()
    }

    /// A store directory with `paths` in it, and a cache remembering them.
    fn cache_over(dir: &Path, paths: &[StorePath]) -> AnswerCache {
        for p in paths {
            std::fs::write(dir.join(p.base_name()), b"contents").unwrap();
        }
        let cache = AnswerCache::new(dir, "/nix/store");
        for p in paths {
            cache.remember(printed(p), p, b"answer".to_vec());
        }
        cache
    }

    fn printed(p: &StorePath) -> Vec<u8> {
        format!("/nix/store/{}", p.base_name()).into_bytes()
    }

    fn hit(cache: &AnswerCache, p: &StorePath) -> bool {
        cache.get(&printed(p)).is_some()
    }

    #[test]
    fn a_path_removed_by_another_process_is_no_longer_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, deleted, moved) = (path(1), path(2), path(3));
        let cache = cache_over(dir.path(), &[kept.clone(), deleted.clone(), moved.clone()]);
        assert!(cache.watching.load(Ordering::Acquire), "no inotify watch");
        assert!(hit(&cache, &kept) && hit(&cache, &deleted) && hit(&cache, &moved));

        // A lock file's removal (as every add makes) leaves answers alone.
        let lock = dir.path().join(format!("{}.lock", kept.base_name()));
        std::fs::write(&lock, b"").unwrap();
        std::fs::remove_file(&lock).unwrap();
        assert!(hit(&cache, &kept));

        // Deleted, or moved aside as a collector may: gone at once.
        std::fs::remove_file(dir.path().join(deleted.base_name())).unwrap();
        std::fs::rename(dir.path().join(moved.base_name()), dir.path().join("trash")).unwrap();
        assert!(!hit(&cache, &deleted), "a deleted path was answered");
        assert!(!hit(&cache, &moved), "a moved path was answered");
        assert!(hit(&cache, &kept));

        // An answer the store gave just before its path went is not kept.
        cache.remember(printed(&deleted), &deleted, b"late".to_vec());
        assert!(!hit(&cache, &deleted), "a late answer for a deleted path");
    }

    #[test]
    fn without_a_watch_hits_are_checked_on_disk() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("store");
        std::fs::create_dir(&dir).unwrap();
        let (a, b) = (path(1), path(2));
        let cache = cache_over(&dir, &[a.clone(), b.clone()]);
        // Moving the store directory ends the watch: every answer is
        // dropped, and from then on each hit is checked with a stat.
        let moved = base.path().join("moved");
        std::fs::rename(&dir, &moved).unwrap();
        std::fs::rename(&moved, &dir).unwrap();
        assert!(!hit(&cache, &a), "answers survived the end of the watch");
        assert!(!cache.watching.load(Ordering::Acquire));
        cache.remember(printed(&a), &a, b"again".to_vec());
        cache.remember(printed(&b), &b, b"again".to_vec());
        assert!(hit(&cache, &a) && hit(&cache, &b));
        std::fs::remove_file(dir.join(b.base_name())).unwrap();
        assert!(hit(&cache, &a));
        assert!(
            !hit(&cache, &b),
            "a deleted path was answered without a watch"
        );
    }
}
