//! File-system helpers of the local store: canonical metadata, durable
//! renames, deleting read-only trees.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mtime Nix gives every file in the store.
pub const CANONICAL_MTIME: i64 = 1;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Sets atime and mtime of `path` (not following symlinks) to 1.
pub fn set_canonical_times(path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    let t = libc::timespec {
        tv_sec: CANONICAL_MTIME as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: valid C string and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets atime and mtime of an open file to 1.
pub fn set_canonical_times_fd(file: &File) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: CANONICAL_MTIME as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: an fd we own and a two-element timespec array.
    let r = unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives a regular file just created with `mode` (0444 or 0555) and
/// written its canonical metadata: that mode, if the umask changed it, and
/// mtime 1. Last, as a write would change the mtime again.
pub fn finish_canonical_file(file: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !umask_keeps_canonical_modes() {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    set_canonical_times_fd(file)
}

/// Whether the process's umask leaves 0555 alone, so files created with
/// their canonical mode need no `fchmod` afterwards. Read from
/// `/proc/self/status`: calling `umask(2)` to read it would change it for
/// other threads meanwhile.
fn umask_keeps_canonical_modes() -> bool {
    static KEEPS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEPS.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
            })
            .is_some_and(|mask| mask & 0o555 == 0)
    })
}

/// Opens a directory for fsync.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes everything written to the file system holding `path` (one
/// `syncfs(2)` instead of an fsync per file, for batches).
pub fn syncfs(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: an fd we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Atomically swaps two existing paths (`renameat2(RENAME_EXCHANGE)`).
pub fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}

/// Moves `from` to `to`, failing with `AlreadyExists` if `to` exists
/// (`renameat2(RENAME_NOREPLACE)`).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    renameat2(from, to, libc::RENAME_NOREPLACE)
}

fn renameat2(a: &Path, b: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (ca, cb) = (cpath(a)?, cpath(b)?);
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Deletes a tree whose directories may be read-only (0555, as in the
/// store). Returns the bytes freed (allocated blocks). A missing tree is
/// not an error.
pub fn remove_tree(path: &Path) -> io::Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut freed = 0;
    if meta.is_dir() {
        if meta.permissions().mode() & 0o700 != 0o700 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        }
        for entry in fs::read_dir(path)? {
            freed += remove_tree(&entry?.path())?;
        }
        fs::remove_dir(path)?;
    } else {
        // Other hard links (optimise's .links) keep the data alive.
        if meta.nlink() <= 1 {
            freed = meta.blocks() * 512;
        }
        fs::remove_file(path)?;
    }
    Ok(freed)
}

/// Makes an existing tree canonical in place: no write, setuid, setgid or
/// sticky bits, files 0444 or 0555, directories 0555, mtime 1, and owned by
/// root when we run as root. Used for build outputs and repairs.
pub fn canonicalise_tree(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && (meta.uid() != 0 || meta.gid() != 0) {
        let c = cpath(path)?;
        // SAFETY: valid C string.
        if unsafe { libc::lchown(c.as_ptr(), 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let ft = meta.file_type();
    if ft.is_dir() {
        if meta.permissions().mode() & 0o700 != 0o700 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        }
        for entry in fs::read_dir(path)? {
            canonicalise_tree(&entry?.path())?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o555))?;
    } else if ft.is_file() {
        let mode = if meta.permissions().mode() & 0o100 != 0 {
            0o555
        } else {
            0o444
        };
        if meta.permissions().mode() & 0o7777 != mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
    } else if !ft.is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "'{}' is neither a regular file, a directory nor a symlink",
                path.display()
            ),
        ));
    }
    set_canonical_times(path)
}

/// Copies the tree at `src` to `dest` (which must not exist) as new files,
/// never following a symlink. Every entry is opened relative to its
/// directory's descriptor with `O_NOFOLLOW` and checked once open, so a
/// process that changes the source meanwhile (one that kept a descriptor
/// into a fixed-output build's output: CVE-2024-27297, CVE-2025-46416) can
/// make the copy fail but can neither write into it nor point it at
/// another file (CVE-2026-39860). Files keep only their executable bit;
/// regular files, directories and symlinks are all a store path may hold.
pub fn copy_tree_nofollow(src: &Path, dest: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (src.parent(), src.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot copy '{}'", src.display()),
        ));
    };
    let parent = open_at(None, &cpath(parent)?, libc::O_DIRECTORY)?;
    copy_entry(&parent, &cpath(Path::new(name))?, src, dest)
}

/// `openat(dir, name, O_RDONLY | O_CLOEXEC | flags)`, relative to the
/// working directory without `dir`.
fn open_at(dir: Option<&OwnedFd>, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let dir = dir.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    // SAFETY: a valid C string; the descriptor returned is ours.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in `dir` for reading (with `O_NOFOLLOW` and `flags`). One
/// the builder made unreadable to us (mode 000, as a non-root caller) is
/// given its owner's read and search bits first, through a descriptor of
/// that very inode, so the change cannot land anywhere else.
fn open_readable(dir: &OwnedFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    match open_at(Some(dir), name, libc::O_NOFOLLOW | flags) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            let node = open_at(Some(dir), name, libc::O_PATH | libc::O_NOFOLLOW)?;
            let meta = File::from(node.try_clone()?).metadata()?;
            if !(meta.is_dir() || meta.is_file()) {
                return Err(e);
            }
            let mode = meta.permissions().mode() & 0o7777 | 0o500;
            let magic = Path::new("/proc/self/fd").join(node.as_raw_fd().to_string());
            fs::set_permissions(&magic, fs::Permissions::from_mode(mode))?;
            open_at(Some(dir), name, libc::O_NOFOLLOW | flags)
        }
        other => other,
    }
}

/// Copies `name` in `dir` (shown as `src`) to `dest`.
fn copy_entry(dir: &OwnedFd, name: &CStr, src: &Path, dest: &Path) -> io::Result<()> {
    // SAFETY: zeroed is a valid `stat`; valid descriptor and C string.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let shown = || src.display();
    match st.st_mode & libc::S_IFMT {
        libc::S_IFLNK => {
            let mut buf = vec![0u8; 4096];
            // SAFETY: the buffer is as long as said.
            let n = unsafe {
                libc::readlinkat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            buf.truncate(n as usize);
            std::os::unix::fs::symlink(OsStr::from_bytes(&buf), dest)
        }
        libc::S_IFREG => {
            let from = File::from(open_readable(dir, name, 0)?);
            let meta = from.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::other(format!(
                    "'{}' changed while copied",
                    shown()
                )));
            }
            let mode = if meta.permissions().mode() & 0o100 != 0 {
                0o755
            } else {
                0o644
            };
            let mut to = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(dest)?;
            io::copy(&mut &from, &mut to)?;
            Ok(())
        }
        libc::S_IFDIR => {
            let sub = open_readable(dir, name, libc::O_DIRECTORY)?;
            fs::DirBuilder::new().mode(0o755).create(dest)?;
            // The open directory itself, whatever its path now leads to.
            let listed = Path::new("/proc/self/fd").join(sub.as_raw_fd().to_string());
            for entry in fs::read_dir(listed)? {
                let entry = entry?.file_name();
                copy_entry(
                    &sub,
                    &cpath(Path::new(&entry))?,
                    &src.join(&entry),
                    &dest.join(&entry),
                )?;
            }
            Ok(())
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "'{}' is neither a regular file, a directory nor a symlink",
                shown()
            ),
        )),
    }
}

/// Fsyncs every file and directory of a tree, directories after their
/// entries.
pub fn fsync_tree(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            fsync_tree(&entry?.path())?;
        }
        fsync_dir(path)
    } else if meta.is_file() {
        File::open(path)?.sync_all()
    } else {
        Ok(())
    }
}

/// The NAR of a single regular file up to its contents: everything before
/// the file's bytes, ending with their length.
pub fn single_file_nar_head(executable: bool, len: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(128);
    let mut put = |bytes: &[u8]| {
        head.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        head.extend_from_slice(bytes);
        head.extend_from_slice(&[0u8; 8][..(8 - bytes.len() % 8) % 8]);
    };
    for token in [&b"nix-archive-1"[..], b"(", b"type", b"regular"] {
        put(token);
    }
    if executable {
        put(b"executable");
        put(b"");
    }
    put(b"contents");
    head.extend_from_slice(&len.to_le_bytes());
    head
}

/// What follows `len` bytes of contents in a single file's NAR.
pub fn single_file_nar_tail(len: u64) -> Vec<u8> {
    let mut tail = vec![0u8; ((8 - len % 8) % 8) as usize];
    tail.extend_from_slice(&1u64.to_le_bytes());
    tail.extend_from_slice(b")\0\0\0\0\0\0\0");
    tail
}

/// The hash and size of the NAR of one regular file held in memory,
/// without building the NAR.
pub fn single_file_nar_hash(
    algo: kiln_formats::hash::HashAlgo,
    executable: bool,
    contents: &[u8],
) -> (kiln_formats::hash::Hash, u64) {
    let head = single_file_nar_head(executable, contents.len() as u64);
    let tail = single_file_nar_tail(contents.len() as u64);
    let mut hasher = kiln_formats::hash::Hasher::new(algo);
    hasher.update(&head);
    hasher.update(contents);
    hasher.update(&tail);
    let size = (head.len() + contents.len() + tail.len()) as u64;
    (hasher.finish(), size)
}

/// The NAR hash and size of the tree at `path`. A single regular file —
/// most files `optimise` looks at, many store paths — is hashed here with
/// its NAR framing, without the general serialiser's reader thread.
pub fn nar_hash(
    path: &Path,
    algo: kiln_formats::hash::HashAlgo,
) -> Result<(kiln_formats::hash::Hash, u64), crate::StoreError> {
    use std::io::Read;
    let meta = fs::symlink_metadata(path).map_err(|e| crate::StoreError::io("stat", path, e))?;
    if !meta.is_file() {
        return Ok(kiln_formats::nar::hash_path(path, algo)?);
    }
    let executable = meta.permissions().mode() & 0o100 != 0;
    let head = single_file_nar_head(executable, meta.len());
    let mut hasher = kiln_formats::hash::Hasher::new(algo);
    hasher.update(&head);
    let mut file = File::open(path).map_err(|e| crate::StoreError::io("open", path, e))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| crate::StoreError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    if len != meta.len() {
        // Changed under us: let the general serialiser report it properly.
        return Ok(kiln_formats::nar::hash_path(path, algo)?);
    }
    let tail = single_file_nar_tail(len);
    hasher.update(&tail);
    let size = head.len() as u64 + len + tail.len() as u64;
    Ok((hasher.finish(), size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::hash::HashAlgo;
    use std::io::{Seek, Write};

    /// New inodes with the same contents; symlinks copied as links (never
    /// read through); a descriptor kept on a source file writes to the
    /// source only.
    #[test]
    fn copy_tree_nofollow_makes_new_files_and_never_follows_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("file"), "good\n").unwrap();
        fs::write(src.join("sub/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("sub/tool"), fs::Permissions::from_mode(0o700)).unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, "host secret\n").unwrap();
        std::os::unix::fs::symlink(&secret, src.join("link")).unwrap();
        let mut kept = fs::OpenOptions::new()
            .write(true)
            .open(src.join("file"))
            .unwrap();

        let dest = dir.path().join("dest");
        copy_tree_nofollow(&src, &dest).unwrap();
        kept.seek(io::SeekFrom::Start(0)).unwrap();
        kept.write_all(b"evil\n").unwrap();

        assert_eq!(fs::read_to_string(dest.join("file")).unwrap(), "good\n");
        assert_ne!(
            fs::metadata(src.join("file")).unwrap().ino(),
            fs::metadata(dest.join("file")).unwrap().ino()
        );
        let tool = fs::metadata(dest.join("sub/tool")).unwrap();
        assert_eq!(tool.permissions().mode() & 0o777, 0o755);
        assert_eq!(fs::read_link(dest.join("link")).unwrap(), secret);
        assert!(
            fs::symlink_metadata(dest.join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );

        // A symlink at the root is copied as a symlink too.
        let root_link = dir.path().join("root-link");
        std::os::unix::fs::symlink(&secret, &root_link).unwrap();
        let dest_link = dir.path().join("dest-link");
        copy_tree_nofollow(&root_link, &dest_link).unwrap();
        assert_eq!(fs::read_link(&dest_link).unwrap(), secret);

        // Anything but files, directories and symlinks is refused.
        let fifo = src.join("fifo");
        let c = cpath(&fifo).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = copy_tree_nofollow(&src, &dir.path().join("dest2")).unwrap_err();
        assert!(err.to_string().contains("fifo"), "{err}");
    }

    /// A tree the builder made unreadable (mode 000) is still copied by a
    /// caller without the right to override file modes: as root, the test
    /// drops that right from its own thread first.
    #[test]
    fn copy_tree_nofollow_reads_what_was_made_unreadable() {
        std::thread::spawn(|| {
            for cap in [
                caps::Capability::CAP_DAC_OVERRIDE,
                caps::Capability::CAP_DAC_READ_SEARCH,
            ] {
                // Only this thread's effective set; not held by non-root.
                let _ = caps::drop(None, caps::CapSet::Effective, cap);
            }
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src");
            fs::create_dir_all(src.join("locked")).unwrap();
            fs::write(src.join("locked/secret"), "data\n").unwrap();
            fs::write(src.join("closed"), "closed\n").unwrap();
            for (path, mode) in [
                ("locked/secret", 0o000),
                ("locked", 0o000),
                ("closed", 0o000),
            ] {
                fs::set_permissions(src.join(path), fs::Permissions::from_mode(mode)).unwrap();
            }
            assert!(
                fs::read_dir(src.join("locked")).is_err(),
                "the test cannot take away its right to read mode-000 directories"
            );
            let dest = dir.path().join("dest");
            copy_tree_nofollow(&src, &dest).unwrap();
            assert_eq!(
                fs::read_to_string(dest.join("locked/secret")).unwrap(),
                "data\n"
            );
            assert_eq!(fs::read_to_string(dest.join("closed")).unwrap(), "closed\n");
            // Let the temporary directory be deleted.
            fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn single_file_nar_hash_matches_the_serialiser() {
        let dir = tempfile::tempdir().unwrap();
        for (i, len) in [0usize, 1, 7, 8, 9, 300_000].into_iter().enumerate() {
            let f = dir.path().join(format!("f{i}"));
            fs::write(&f, vec![b'x'; len]).unwrap();
            if i % 2 == 1 {
                fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
            }
            let expected = kiln_formats::nar::hash_path(&f, HashAlgo::Sha256).unwrap();
            assert_eq!(
                nar_hash(&f, HashAlgo::Sha256).unwrap(),
                expected,
                "length {len}"
            );
            let contents = fs::read(&f).unwrap();
            assert_eq!(
                single_file_nar_hash(HashAlgo::Sha256, i % 2 == 1, &contents),
                expected,
                "in memory, length {len}"
            );
        }
    }
}
