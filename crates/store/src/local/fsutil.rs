//! File-system helpers of the local store: canonical metadata, durable
//! renames, deleting read-only trees.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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
    let (ca, cb) = (cpath(a)?, cpath(b)?);
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
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
