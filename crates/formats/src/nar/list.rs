//! Describing what a NAR holds without restoring it (`kiln nar ls`).

use std::collections::BTreeMap;
use std::io::Read;

use super::read::{Event, NarReader, ReadError, fold};

/// One node of a NAR's listing: what `nix nar ls --json -R` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListNode {
    /// A regular file.
    Regular {
        /// Size in bytes.
        size: u64,
        /// Whether it is executable.
        executable: bool,
        /// Offset of its contents in the NAR.
        nar_offset: u64,
    },
    /// A symlink.
    Symlink {
        /// Its target.
        target: Vec<u8>,
    },
    /// A directory.
    Directory {
        /// Entries by name, in NAR order.
        entries: BTreeMap<Vec<u8>, ListNode>,
    },
}

impl ListNode {
    /// The node at `path` (components separated by `/`; empty, `/` or `.`
    /// components are ignored), if there is one.
    pub fn get(&self, path: &[u8]) -> Option<&ListNode> {
        path.split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .try_fold(self, |node, component| match node {
                ListNode::Directory { entries } => entries.get(component),
                _ => None,
            })
    }
}

/// Reads the whole NAR on `input` (validating it, skipping file contents)
/// and describes its tree.
pub fn list(input: impl Read) -> Result<ListNode, ReadError> {
    let mut reader = NarReader::new(input);
    fold(
        &mut reader,
        |event| {
            Ok(match event {
                Event::Regular {
                    size,
                    executable,
                    contents,
                    ..
                } => ListNode::Regular {
                    size,
                    executable,
                    nar_offset: contents.offset(),
                },
                Event::Symlink { target, .. } => ListNode::Symlink {
                    target: target.to_vec(),
                },
                Event::Directory { .. } | Event::EndDirectory { .. } => {
                    unreachable!("fold passes only files and symlinks")
                }
            })
        },
        |entries| ListNode::Directory { entries },
    )
}
