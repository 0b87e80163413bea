//! Rebuilding a file tree from a NAR.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};

use super::read::{Event, NarReader, ReadError};

/// Why a tree could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The archive is invalid or could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The destination exists already; restoring never overwrites.
    #[error("cannot restore into '{}': it already exists", .0.display())]
    Exists(PathBuf),
    /// A file, directory or symlink could not be created or written.
    #[error("cannot create '{}': {source}", path.display())]
    Create {
        /// What could not be created.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Rebuilds the tree held by the NAR on `input` at `dest`, which must not
/// exist yet (its parent must).
///
/// Files are created with mode 0666 or, if executable, 0777, less the umask.
/// The archive is validated as it is read (see [`NarReader`]), so no entry
/// can land outside `dest`. On error, what was restored so far is left in
/// place for inspection.
pub fn restore(input: impl Read, dest: &Path) -> Result<(), RestoreError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(RestoreError::Exists(dest.to_path_buf()));
    }
    let mut reader = NarReader::new(input);
    while let Some(event) = reader.next()? {
        let target = match event.path() {
            b"" => dest.to_path_buf(),
            path => dest.join(OsStr::from_bytes(path)),
        };
        let created = match event {
            Event::Directory { .. } => fs::create_dir(&target),
            Event::EndDirectory { .. } => Ok(()),
            Event::Symlink { target: link, .. } => symlink(OsStr::from_bytes(link), &target),
            Event::Regular {
                executable,
                mut contents,
                ..
            } => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(if executable { 0o777 } else { 0o666 })
                    .open(&target);
                match file {
                    Ok(mut file) => match contents.copy_to(&mut file) {
                        Ok(_) => Ok(()),
                        Err(e) => {
                            return Err(ReadError::from_io(e)
                                .map_or_else(|e| create_error(&target, e), RestoreError::Read));
                        }
                    },
                    Err(e) => Err(e),
                }
            }
        };
        created.map_err(|e| create_error(&target, e))?;
    }
    Ok(())
}

fn create_error(path: &Path, source: io::Error) -> RestoreError {
    RestoreError::Create {
        path: path.to_path_buf(),
        source,
    }
}
