//! NAR ("Nix ARchive"): the canonical, deterministic serialisation of a file
//! tree that Nix hashes, signs and ships.
//!
//! A NAR holds one node: a regular file (with or without the executable bit),
//! a symlink, or a directory whose entries are sorted by the bytes of their
//! names. Nothing else is recorded: no owners, no timestamps, no other mode
//! bits. Every token is a string: a little-endian `u64` length, the bytes,
//! and zero padding up to a multiple of 8.
//!
//! - [`dump_path`] / [`hash_path`] serialise a tree on disk (the hot path
//!   for hashing large outputs: contents are streamed through one large buffer),
//!   [`write_node`] serialises an in-memory [`Node`].
//! - [`NarReader`] is a pull parser that yields one [`Event`] per node and
//!   streams file contents without buffering them; it rejects anything Nix
//!   would not write, and anything that could be used to escape a restore
//!   directory or exhaust memory, with the byte offset and path of the fault.
//! - [`restore`] rebuilds a tree from a NAR, [`list`] describes its contents
//!   (what `nix nar ls -R --json` shows), [`read_node`] loads a small NAR
//!   into a [`Node`].
//!
//! ```
//! use kiln_formats::nar::{self, Node};
//!
//! let tree = Node::directory([
//!     ("hello", Node::executable(b"#!/bin/sh\necho hello\n".to_vec())),
//!     ("link", Node::symlink("hello")),
//! ]);
//! let bytes = tree.to_nar();
//! assert_eq!(nar::read_node(&bytes[..])?, tree);
//! # Ok::<(), nar::ReadError>(())
//! ```

use std::collections::BTreeMap;

mod list;
mod read;
mod restore;
mod write;

#[cfg(test)]
mod tests;

pub use list::{ListNode, list};
pub use read::{Contents, Event, NarReader, Problem, ReadError, read_node};
pub use restore::{RestoreError, restore};
pub use write::{WriteError, dump_path, dump_path_read, hash_path, write_node};

/// Deepest nesting the reader accepts: no entry may have more path components.
pub const MAX_DEPTH: usize = 64;
/// Longest entry name the reader accepts, in bytes (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target the reader accepts, in bytes (Linux's `PATH_MAX` less the NUL).
pub const MAX_TARGET_LEN: usize = 4095;

/// The magic string every NAR starts with.
const MAGIC: &[u8] = b"nix-archive-1";

/// A file tree held in memory, as a NAR describes it.
///
/// Directory entries live in a [`BTreeMap`] keyed by the raw bytes of their
/// names, so they are always in NAR order and unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file.
    Regular {
        /// Whether any of the owner's execute bit was set.
        executable: bool,
        /// The file's bytes.
        contents: Vec<u8>,
    },
    /// A symbolic link; the target is not interpreted.
    Symlink {
        /// The raw bytes of the link's target.
        target: Vec<u8>,
    },
    /// A directory.
    Directory {
        /// Entries by name.
        entries: BTreeMap<Vec<u8>, Node>,
    },
}

impl Node {
    /// A regular, non-executable file.
    pub fn file(contents: impl Into<Vec<u8>>) -> Self {
        Node::Regular {
            executable: false,
            contents: contents.into(),
        }
    }

    /// A regular, executable file.
    pub fn executable(contents: impl Into<Vec<u8>>) -> Self {
        Node::Regular {
            executable: true,
            contents: contents.into(),
        }
    }

    /// A symlink pointing at `target`.
    pub fn symlink(target: impl Into<Vec<u8>>) -> Self {
        Node::Symlink {
            target: target.into(),
        }
    }

    /// A directory with the given entries (later duplicates replace earlier ones).
    pub fn directory<N: Into<Vec<u8>>>(entries: impl IntoIterator<Item = (N, Node)>) -> Self {
        Node::Directory {
            entries: entries
                .into_iter()
                .map(|(n, node)| (n.into(), node))
                .collect(),
        }
    }

    /// This tree serialised as a NAR.
    pub fn to_nar(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_node(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }
}

/// The zero bytes that follow `len` bytes of string or contents.
fn padding(len: u64) -> &'static [u8] {
    &[0u8; 8][..padding_len(len)]
}

fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Renders raw name or target bytes for messages: printable UTF-8 as is,
/// anything else escaped.
fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
        _ => bytes.escape_ascii().to_string(),
    }
}
