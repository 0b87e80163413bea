//! Fuzz target for the NAR reader, listing and restorer (`kiln_formats::nar`):
//! any input must give a value or an error, never a panic, and never a file
//! outside the restore directory.
//!
//! Whatever parses must re-encode to the same bytes (a NAR has exactly one
//! encoding), and restoring it then dumping the result must give it back.
#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_formats::nar;
use libfuzzer_sys::fuzz_target;

static RUN: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let parsed = nar::read_node(data);
    let listed = nar::list(data);
    assert_eq!(
        parsed.is_ok(),
        listed.is_ok(),
        "the reader and the listing disagree"
    );
    if let Ok(node) = &parsed {
        assert_eq!(
            node.to_nar(),
            data,
            "an accepted NAR must re-encode to itself"
        );
    }

    let scratch = scratch_dir();
    let dest = scratch.join("out");
    let restored = nar::restore(data, &dest);
    assert_eq!(
        restored.is_ok(),
        parsed.is_ok(),
        "the restorer and the reader disagree"
    );
    if restored.is_ok() {
        let dumped = nar::dump_path(&dest, Vec::new()).expect("a restored tree can be dumped");
        assert_eq!(
            dumped, data,
            "restoring then dumping must give the NAR back"
        );
    }
    // Everything the restorer made is inside `scratch`.
    let entries: Vec<_> = fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        entries.is_empty() || entries == ["out"],
        "unexpected files: {entries:?}"
    );
    fs::remove_dir_all(&scratch).unwrap();
});

/// A fresh, empty directory of this process's own, in memory when possible:
/// every input is restored, and a disk would make that the bottleneck.
fn scratch_dir() -> PathBuf {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("kiln-fuzz-nar-{}-{n}", std::process::id()));
    fs::create_dir(&dir).unwrap();
    dir
}
