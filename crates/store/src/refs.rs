//! Reference scanning: which of a set of candidate store paths a stream of
//! bytes (a path's NAR) mentions, found by the 32-character hash parts.
//!
//! One pass over the data that skips ahead past any byte outside the
//! nixbase32 alphabet (a hash part cannot contain one), so most bytes of
//! binary data are never looked at; only runs of 32 or more alphabet
//! characters are looked up among the candidates. Setting up costs a sort of
//! the candidates — nothing that grows with their number the way an
//! automaton over them would, which matters when every build of a deep graph
//! scans against a closure of hundreds of paths. Data may come in chunks of
//! any size: a hash part split across two chunks is found through a small
//! window of the bytes either side of the boundary.
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

use kiln_formats::store_path::{HASH_PART_LEN, StorePath, StorePathSet};

/// The nixbase32 alphabet as a byte class: its characters' 5-bit values,
/// 0xff for every other byte.
const DIGIT: [u8; 256] = {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < alphabet.len() {
        t[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    t
};

fn is_digit(b: u8) -> bool {
    DIGIT[b as usize] != 0xff
}

/// Finds candidate paths' hash parts in data fed to it in chunks.
#[derive(Debug)]
pub struct RefScanner {
    candidates: Vec<StorePath>,
    /// Hash parts, sorted, each with its candidate's index.
    hashes: Vec<([u8; HASH_PART_LEN], usize)>,
    /// Which pairs of first two characters some candidate starts with: a
    /// cheap test before the search, as almost no run of alphabet
    /// characters in the data is a hash part.
    first_two: [u64; 16],
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
        let mut first_two = [0u64; 16];
        let mut hashes: Vec<([u8; HASH_PART_LEN], usize)> = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let hash: [u8; HASH_PART_LEN] = c
                    .hash_part()
                    .as_bytes()
                    .try_into()
                    .expect("hash parts are 32 bytes");
                let pair = pair_index(hash[0], hash[1]);
                first_two[pair / 64] |= 1 << (pair % 64);
                (hash, i)
            })
            .collect();
        hashes.sort_unstable();
        RefScanner {
            found: vec![false; candidates.len()],
            candidates,
            hashes,
            first_two,
            tail: Vec::with_capacity(HASH_PART_LEN),
            window: Vec::with_capacity(2 * HASH_PART_LEN),
        }
    }

    /// Scans the next chunk of data.
    pub fn update(&mut self, data: &[u8]) {
        if self.candidates.is_empty() || data.is_empty() {
            return;
        }
        // Matches straddling the boundary start in `tail` and end in the
        // first HASH_PART_LEN - 1 bytes of `data`.
        if !self.tail.is_empty() {
            let mut window = std::mem::take(&mut self.window);
            window.clear();
            window.extend_from_slice(&self.tail);
            window.extend_from_slice(&data[..data.len().min(HASH_PART_LEN - 1)]);
            self.scan(&window);
            self.window = window;
        }
        self.scan(data);
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

    /// Looks up every 32-byte window of `data` made of alphabet characters.
    fn scan(&mut self, data: &[u8]) {
        const N: usize = HASH_PART_LEN;
        let mut start = 0;
        while start + N <= data.len() {
            // The last byte outside the alphabet in the window, looked for
            // from its end: no window containing it can match.
            if let Some(bad) = data[start..start + N].iter().rposition(|&b| !is_digit(b)) {
                start += bad + 1;
                continue;
            }
            // A run of alphabet characters: every window in it is a candidate.
            let mut end = start + N;
            loop {
                self.check(&data[end - N..end]);
                if end == data.len() || !is_digit(data[end]) {
                    break;
                }
                end += 1;
            }
            start = end + 1;
        }
    }

    fn check(&mut self, window: &[u8]) {
        let pair = pair_index(window[0], window[1]);
        if self.first_two[pair / 64] & (1 << (pair % 64)) == 0 {
            return;
        }
        if let Ok(i) = self
            .hashes
            .binary_search_by(|(hash, _)| hash.as_slice().cmp(window))
        {
            self.found[self.hashes[i].1] = true;
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

/// Index of a pair of alphabet characters in [`RefScanner::first_two`].
fn pair_index(a: u8, b: u8) -> usize {
    (DIGIT[a as usize] as usize) << 5 | DIGIT[b as usize] as usize
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

    proptest! {
        /// Against the plain definition: a candidate is found exactly when
        /// its hash part occurs in the data, whatever surrounds it (runs of
        /// alphabet characters longer than 32 included).
        #[test]
        fn agrees_with_a_naive_search(
            picks in proptest::collection::vec((0usize..12, "[0-9a-z./-]{0,40}"), 0..8),
            cut in 0usize..400,
        ) {
            let candidates: Vec<StorePath> = (0..12).map(path).collect();
            let mut data = Vec::new();
            for (i, glue) in &picks {
                data.extend_from_slice(glue.as_bytes());
                // Half of them glued into longer runs of alphabet characters.
                data.extend_from_slice(candidates[*i].hash_part().as_bytes());
            }
            let expected: StorePathSet = candidates
                .iter()
                .filter(|c| data.windows(32).any(|w| w == c.hash_part().as_bytes()))
                .cloned()
                .collect();
            let mut scanner = RefScanner::new(candidates.clone());
            let cut = cut.min(data.len());
            scanner.update(&data[..cut]);
            scanner.update(&data[cut..]);
            prop_assert_eq!(scanner.finish(), expected);
        }
    }

    #[test]
    fn hash_parts_inside_longer_runs_are_found() {
        let p = path(5);
        let text = format!("0123456789{}abcdfgh", p.hash_part());
        let mut s = RefScanner::new([p.clone(), path(6)]);
        s.update(text.as_bytes());
        assert_eq!(s.finish(), [p].into_iter().collect());
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
