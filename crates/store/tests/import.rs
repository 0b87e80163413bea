//! `import_paths` on the local store: a stream of many paths (small ones
//! restored on worker threads, one past the in-memory limit restored from
//! the stream) arrives whole and in order; a truncated or corrupt stream is
//! refused with a clear error, registers no incomplete path and leaves no
//! temporary files behind.

use kiln_formats::hash::HashAlgo;
use kiln_formats::store_path::{FileIngestionMethod, StorePath, StorePathSet};
use kiln_store::local::LocalStore;
use kiln_store::{AddOptions, Store};

struct Source {
    _dir: tempfile::TempDir,
    store: LocalStore,
    paths: Vec<StorePath>,
    export: Vec<u8>,
}

/// 300 text paths, each referring to the one before, and a 6 MiB tree.
fn source() -> Source {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let mut paths = Vec::new();
    let mut previous = StorePathSet::new();
    for i in 0..300 {
        let info = store
            .add_text(
                &format!("t{i}"),
                format!("text {i}\n").as_bytes(),
                &previous,
            )
            .unwrap();
        previous = StorePathSet::from([info.path.clone()]);
        paths.push(info.path);
    }
    let tree = dir.path().join("big");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/blob"), vec![7u8; 6 << 20]).unwrap();
    std::fs::write(tree.join("small"), b"small").unwrap();
    let big = store
        .add_to_store(
            "big",
            &tree,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            AddOptions::default(),
        )
        .unwrap();
    paths.push(big.path);
    let mut export = Vec::new();
    kiln_store::export::export_paths(&store, &paths.iter().cloned().collect(), &mut export)
        .unwrap();
    Source {
        _dir: dir,
        store,
        paths,
        export,
    }
}

fn leftovers(store: &LocalStore) -> Vec<String> {
    std::fs::read_dir(store.real_store_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln-tmp"))
        .collect()
}

/// Every valid path of `store` is whole: same NAR hash and references as
/// in the source.
fn only_whole_paths(store: &LocalStore, source: &Source) -> usize {
    let valid = store.query_all_valid_paths().unwrap();
    for path in &valid {
        let here = store.query_path_info(path).unwrap().unwrap();
        let there = source.store.query_path_info(path).unwrap().unwrap();
        assert_eq!(here.nar_hash, there.nar_hash, "{path}");
        assert_eq!(here.references, there.references, "{path}");
    }
    assert!(
        store.verify(true, None).unwrap().is_clean(),
        "the store verifies"
    );
    valid.len()
}

#[test]
fn a_stream_of_many_paths_imports_whole_and_in_order() {
    let source = source();
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let imported = store.import_paths(&mut &source.export[..]).unwrap();
    let mut expected = source.paths.clone();
    expected.sort();
    let mut got = imported.clone();
    got.sort();
    assert_eq!(got, expected);
    assert_eq!(only_whole_paths(&store, &source), source.paths.len());
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    // Importing again changes nothing.
    assert_eq!(
        store.import_paths(&mut &source.export[..]).unwrap(),
        imported
    );
    assert_eq!(only_whole_paths(&store, &source), source.paths.len());
}

#[test]
fn truncated_and_corrupt_streams_are_refused_without_damage() {
    let source = source();
    for cut in [source.export.len() / 3, source.export.len() - 100] {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path().join("root")).unwrap();
        let err = store
            .import_paths(&mut &source.export[..cut])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("end") || err.contains("EOF") || err.contains("truncated"),
            "cut at {cut}: {err}"
        );
        let valid = only_whole_paths(&store, &source);
        assert!(valid < source.paths.len(), "cut at {cut}: {valid} valid");
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    }
    // A damaged NAR in the middle: the magic of the 150th path's NAR.
    let mut damaged = source.export.clone();
    let magic = b"nix-archive-1";
    let at = damaged
        .windows(magic.len())
        .enumerate()
        .filter(|(_, w)| w == magic)
        .nth(150)
        .unwrap()
        .0;
    damaged[at] = b'X';
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let err = store
        .import_paths(&mut &damaged[..])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nix-archive-1") || err.contains("magic"),
        "{err}"
    );
    only_whole_paths(&store, &source);
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
}
