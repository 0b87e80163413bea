//! Runtime roots: store paths that running processes use without any GC
//! root naming them — a program started from the store (`exe`), a shell
//! whose working directory is in it (`cwd`), open files (`fd/*`), mapped
//! libraries (`maps`) and paths in the environment (`environ`). Nix
//! collects the same from `/proc`, so a path in use survives a collection
//! even when its profile generation was deleted.
//!
//! Only the hash parts are taken from what `/proc` shows; the collector
//! maps them to valid paths. A process we may not inspect (another user's,
//! without privileges) or one that exits meanwhile is skipped: `/proc` is
//! a snapshot that changes as we read it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_formats::store_path::HASH_PART_LEN;

/// Where store paths are looked for: the logical store directory and,
/// for a store under another root, the physical one.
#[derive(Debug, Clone)]
pub struct StorePrefixes {
    prefixes: Vec<Vec<u8>>,
}

impl StorePrefixes {
    /// Prefixes `dir/` for each directory given (duplicates dropped).
    pub fn new<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> StorePrefixes {
        let mut prefixes: Vec<Vec<u8>> = Vec::new();
        for d in dirs {
            let mut p = d.as_os_str().as_bytes().to_vec();
            while p.last() == Some(&b'/') && p.len() > 1 {
                p.pop();
            }
            p.push(b'/');
            if !prefixes.contains(&p) {
                prefixes.push(p);
            }
        }
        StorePrefixes { prefixes }
    }

    /// Every hash part that follows one of the prefixes in `text`.
    pub fn hash_parts_in(&self, text: &[u8], found: &mut impl FnMut(String)) {
        for prefix in &self.prefixes {
            let mut rest = text;
            while let Some(at) = find(rest, prefix) {
                let after = &rest[at + prefix.len()..];
                if after.len() >= HASH_PART_LEN
                    && after[..HASH_PART_LEN].iter().all(|b| is_nixbase32(*b))
                    && after.get(HASH_PART_LEN).is_none_or(|b| *b == b'-')
                {
                    found(String::from_utf8_lossy(&after[..HASH_PART_LEN]).into_owned());
                }
                rest = &rest[at + 1..];
            }
        }
    }
}

fn is_nixbase32(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'd' | b'f'..=b'n' | b'p'..=b's' | b'v'..=b'z')
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Scans `proc` (normally `/proc`) for store paths in use: each hash part
/// found, with the `/proc` entries that showed it (what `--print-roots`
/// prints for runtime roots).
pub fn find_runtime_roots(
    proc: &Path,
    prefixes: &StorePrefixes,
) -> BTreeMap<String, BTreeSet<PathBuf>> {
    let mut roots: BTreeMap<String, BTreeSet<PathBuf>> = BTreeMap::new();
    let Ok(entries) = fs::read_dir(proc) else {
        return roots;
    };
    let mut add = |hash: String, source: &Path| {
        roots.entry(hash).or_default().insert(source.to_path_buf());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let dir = entry.path();
        let mut links: Vec<PathBuf> = vec![dir.join("exe"), dir.join("cwd")];
        if let Ok(fds) = fs::read_dir(dir.join("fd")) {
            links.extend(fds.flatten().map(|fd| fd.path()));
        }
        for link in links {
            if let Ok(target) = fs::read_link(&link) {
                prefixes.hash_parts_in(target.as_os_str().as_bytes(), &mut |h| add(h, &link));
            }
        }
        for file in ["maps", "environ"] {
            let source = dir.join(file);
            if let Ok(text) = fs::read(&source) {
                prefixes.hash_parts_in(&text, &mut |h| add(h, &source));
            }
        }
    }
    // Paths the kernel itself may run (Nix looks at these too).
    for file in [
        "sys/kernel/modprobe",
        "sys/kernel/fbsplash",
        "sys/kernel/poweroff_cmd",
    ] {
        let source = proc.join(file);
        if let Ok(text) = fs::read(&source) {
            prefixes.hash_parts_in(&text, &mut |h| add(h, &source));
        }
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_parts_after_either_prefix() {
        let p = StorePrefixes::new([Path::new("/nix/store"), Path::new("/tmp/r/nix/store/")]);
        let h1 = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
        let h2 = "00000000000000000000000000000000";
        let text = format!(
            "PATH=/nix/store/{h1}-hello/bin:/usr/bin\0X=/tmp/r/nix/store/{h2}-x\0\
             Y=/nix/store/short-x\0Z=/nix/store/{}-bad-chars",
            "e".repeat(32)
        );
        let mut found = Vec::new();
        p.hash_parts_in(text.as_bytes(), &mut |h| found.push(h));
        found.sort();
        found.dedup();
        assert_eq!(found, vec![h2.to_owned(), h1.to_owned()]);
    }

    #[test]
    fn finds_our_own_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        fs::create_dir(&store).unwrap();
        let hash = "1b9p07z77phvv2hf6gm9f28syip6hr9s";
        let file = store.join(format!("{hash}-open"));
        fs::write(&file, b"x").unwrap();
        let _open = fs::File::open(&file).unwrap();
        let roots = find_runtime_roots(Path::new("/proc"), &StorePrefixes::new([&*store]));
        let sources = roots.get(hash).expect("the open file is a runtime root");
        let me = format!("/proc/{}/fd/", std::process::id());
        assert!(
            sources.iter().any(|s| s.to_string_lossy().starts_with(&me)),
            "found through our fd: {sources:?}"
        );
    }
}
