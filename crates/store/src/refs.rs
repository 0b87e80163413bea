//! Reference scanning: which of a set of candidate store paths a stream of
//! bytes (a path's NAR) mentions, found by the 32-character hash parts.
//!
//! One pass over the data with one multi-pattern automaton (Aho–Corasick)
//! over all candidates, fed in chunks of any size: a hash part split across
//! two chunks is found through a small window of the bytes either side of
//! the boundary.
//!
//! ```
//! use kiln_store::refs::RefScanner;
//! use kiln_formats::store_path::StorePath;
//!
//! let dep: StorePath = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello".parse()?;
//! let mut scanner = RefScanner::new([dep.clone()]);
//! scanner.update(b"#!/nix/store/7h7qgvs4kgzsn8a6");
//! scanner.update(b"rb273saxyqh4jxlz-hello/bin/sh");
//! assert!(scanner.finish().contains(&dep));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use kiln_formats::store_path::{HASH_PART_LEN, StorePath, StorePathSet};

/// Finds candidate paths' hash parts in data fed to it in chunks.
#[derive(Debug)]
pub struct RefScanner {
    automaton: Option<AhoCorasick>,
    candidates: Vec<StorePath>,
    found: Vec<bool>,
    /// The last `HASH_PART_LEN - 1` bytes seen, for matches across chunks.
    tail: Vec<u8>,
    window: Vec<u8>,
}

impl RefScanner {
    /// A scanner for `candidates` (duplicates are harmless).
    pub fn new(candidates: impl IntoIterator<Item = StorePath>) -> RefScanner {
        let mut candidates: Vec<StorePath> = candidates.into_iter().collect();
        candidates.sort();
        candidates.dedup();
        let automaton = (!candidates.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .kind(Some(if candidates.len() <= 5000 {
                    AhoCorasickKind::DFA
                } else {
                    AhoCorasickKind::ContiguousNFA
                }))
                .build(candidates.iter().map(|c| c.hash_part().as_bytes()))
                .expect("hash parts are short fixed-length patterns")
        });
        RefScanner {
            found: vec![false; candidates.len()],
            automaton,
            candidates,
            tail: Vec::with_capacity(HASH_PART_LEN),
            window: Vec::with_capacity(2 * HASH_PART_LEN),
        }
    }

    /// Scans the next chunk of data.
    pub fn update(&mut self, data: &[u8]) {
        let Some(ac) = &self.automaton else { return };
        if data.is_empty() {
            return;
        }
        // Matches straddling the boundary start in `tail` and end in the
        // first HASH_PART_LEN - 1 bytes of `data`.
        if !self.tail.is_empty() {
            self.window.clear();
            self.window.extend_from_slice(&self.tail);
            self.window
                .extend_from_slice(&data[..data.len().min(HASH_PART_LEN - 1)]);
            for m in ac.find_overlapping_iter(&self.window[..]) {
                self.found[m.pattern().as_usize()] = true;
            }
        }
        for m in ac.find_overlapping_iter(data) {
            self.found[m.pattern().as_usize()] = true;
        }
        let keep = HASH_PART_LEN - 1;
        if data.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
    }

    /// The candidates found so far.
    pub fn found(&self) -> StorePathSet {
        self.candidates
            .iter()
            .zip(&self.found)
            .filter(|(_, f)| **f)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// The candidates found in all the data.
    pub fn finish(self) -> StorePathSet {
        self.found()
    }
}

impl io::Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path(i: usize) -> StorePath {
        let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
        let hash: String = (0..32)
            .map(|k| alphabet[(i * 7 + k * 13) % 32] as char)
            .collect();
        format!("{hash}-p{i}").parse().unwrap()
    }

    proptest! {
        #[test]
        fn finds_references_whatever_the_chunking(
            present in proptest::collection::btree_set(0usize..20, 0..6),
            cuts in proptest::collection::vec(1usize..50, 0..40),
            filler in "[a-z /]{0,40}",
        ) {
            let candidates: Vec<StorePath> = (0..20).map(path).collect();
            let mut data = Vec::new();
            for i in &present {
                data.extend_from_slice(filler.as_bytes());
                data.extend_from_slice(format!("/nix/store/{}", candidates[*i]).as_bytes());
            }
            data.extend_from_slice(filler.as_bytes());
            let mut scanner = RefScanner::new(candidates.clone());
            let mut rest = &data[..];
            for cut in cuts {
                let n = cut.min(rest.len());
                scanner.update(&rest[..n]);
                rest = &rest[n..];
            }
            scanner.update(rest);
            let expected: StorePathSet = present.iter().map(|i| candidates[*i].clone()).collect();
            prop_assert_eq!(scanner.finish(), expected);
        }
    }

    #[test]
    fn byte_at_a_time() {
        let p = path(3);
        let text = format!("xx{}yy", p.hash_part());
        let mut s = RefScanner::new([p.clone(), path(4)]);
        for b in text.as_bytes() {
            s.update(std::slice::from_ref(b));
        }
        assert_eq!(s.finish(), [p].into_iter().collect());
    }
}
