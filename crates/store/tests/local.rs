//! The local store against the shared behaviour tests, plus what only a
//! local store promises (canonical metadata on disk, locks, database).

use std::os::unix::fs::MetadataExt;

use kiln_formats::hash::HashAlgo;
use kiln_formats::store_path::{FileIngestionMethod, StorePathSet};
use kiln_store::local::LocalStore;
use kiln_store::{AddOptions, Store};

#[test]
fn behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    kiln_store::testing::run_behaviour_tests(&store, &scratch);
}

#[test]
fn contents_are_canonical() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"data").unwrap();
    std::fs::write(src.join("x"), b"#!").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("x"), std::fs::Permissions::from_mode(0o4775)).unwrap();
    let info = store
        .add_to_store(
            "src",
            &src,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            AddOptions::default(),
        )
        .unwrap();
    let real = store.real_path(&info.path);
    for (rel, mode) in [("", 0o555), ("d", 0o555), ("d/f", 0o444), ("x", 0o555)] {
        let m = std::fs::symlink_metadata(real.join(rel)).unwrap();
        assert_eq!(m.mode() & 0o7777, mode, "mode of '{rel}'");
        assert_eq!(m.mtime(), 1, "mtime of '{rel}'");
    }
    // No temporary leftovers.
    let names: Vec<String> = std::fs::read_dir(store.real_store_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with(".kiln-tmp") && !n.ends_with(".lock")),
        "leftovers: {names:?}"
    );
    // Another handle on the same store sees it.
    let again = LocalStore::open_root(dir.path().join("root")).unwrap();
    assert!(again.is_valid_path(&info.path).unwrap());
    assert_eq!(
        again.query_all_valid_paths().unwrap(),
        [info.path].into_iter().collect::<StorePathSet>()
    );
}
