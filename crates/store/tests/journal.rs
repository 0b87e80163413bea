//! Small paths made durable by the commit that registers them: their NARs
//! wait in `KilnUnsyncedPaths` until their files are synced, and a store
//! opened after a power cut restores what the cut lost.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar::Node;
use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_store::local::LocalStore;
use kiln_store::local::db::JOURNAL_TABLE;
use kiln_store::local::gc::{GcAction, GcOptions};
use kiln_store::{PathInfo, Store};

/// The journal's rows as (path, NAR), read past the store's API.
fn journal(root: &Path) -> Vec<(String, Vec<u8>)> {
    let db = rusqlite::Connection::open(root.join("nix/var/nix/db/db.sqlite")).unwrap();
    let exists: bool = db
        .query_row(
            "select count(*) > 0 from sqlite_master where name = ?1",
            [JOURNAL_TABLE],
            |r| r.get(0),
        )
        .unwrap();
    if !exists {
        return Vec::new();
    }
    let mut stmt = db
        .prepare(&format!(
            "select path, nar from {JOURNAL_TABLE} order by id"
        ))
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn add_text(store: &LocalStore, name: &str, contents: &[u8]) -> StorePath {
    store
        .add_text(name, contents, &StorePathSet::new())
        .unwrap()
        .path
}

/// Registers `path`, in place with the contents `nar` but not synced, with
/// its NAR in the journal (as the scheduler registers a small output).
fn register_journaled(store: &LocalStore, path: &StorePath, nar: &[u8]) {
    let info = PathInfo::new(
        path.clone(),
        Hash::digest(HashAlgo::Sha256, nar),
        nar.len() as u64,
    );
    store
        .register_valid_paths_journaled(
            &[info],
            &Default::default(),
            &[(path.clone(), nar.to_vec())],
        )
        .unwrap();
}

/// What a power cut can leave of a file renamed into place but never
/// synced: nothing, or an empty file under its name.
fn lose(real: &Path, how: &str) {
    match how {
        "missing" => std::fs::remove_file(real).unwrap(),
        "empty" => {
            std::fs::remove_file(real).unwrap();
            std::fs::write(real, b"").unwrap();
        }
        other => unreachable!("{other}"),
    }
}

#[test]
fn a_text_whose_file_a_power_cut_lost_is_written_back_on_open() {
    for how in ["missing", "empty"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let store = LocalStore::open_root(&root).unwrap();
        let kept = add_text(&store, "kept", b"survives\n");
        let collected = add_text(&store, "collected", b"deleted before the cut\n");
        let printed = store.store_dir().print_path(&kept);
        assert_eq!(
            journal(&root),
            vec![
                (printed.clone(), Node::file(*b"survives\n").to_nar()),
                (
                    store.store_dir().print_path(&collected),
                    Node::file(*b"deleted before the cut\n").to_nar()
                ),
            ],
            "{how}: both texts wait in the journal"
        );
        store.clear_temp_roots().unwrap();
        store
            .collect_garbage(&GcOptions {
                action: GcAction::DeleteSpecific([collected.clone()].into()),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{how}: deleting an unreferenced text: {e}"));
        // The process dies before it syncs (no drop), and the cut takes the
        // file's data with it.
        std::mem::forget(store);
        lose(&root.join("nix/store").join(kept.base_name()), how);

        let store = LocalStore::open_root(&root).unwrap();
        let real = store.real_path(&kept);
        assert_eq!(std::fs::read(&real).unwrap(), b"survives\n", "{how}");
        let meta = std::fs::symlink_metadata(&real).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o444, "{how}: canonical mode");
        assert_eq!(meta.mtime(), 1, "{how}: canonical mtime");
        assert!(
            !store.real_path(&collected).exists(),
            "{how}: a path no longer valid is not written back"
        );
        assert!(journal(&root).is_empty(), "{how}: the journal is settled");
        let report = store.verify(true, None).unwrap();
        assert!(report.problems.is_empty(), "{how}: {:?}", report.problems);
    }
}

#[test]
fn journaled_files_are_synced_in_groups_and_when_the_store_closes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let store = LocalStore::open_root(&root).unwrap();
    for i in 0..300 {
        add_text(&store, &format!("t{i}"), format!("text {i}\n").as_bytes());
    }
    let waiting = journal(&root).len();
    assert!(
        waiting > 0 && waiting < 256,
        "a group of 256 was settled, the rest waits: {waiting} rows"
    );
    drop(store);
    assert!(journal(&root).is_empty(), "dropping the store settles it");
}

#[test]
fn large_texts_and_other_processes_rows_are_synced_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let first = LocalStore::open_root(&root).unwrap();
    let big = vec![b'x'; 64 * 1024 + 1];
    add_text(&first, "big", &big);
    assert!(
        journal(&root).is_empty(),
        "a text over 64 KiB is synced before its commit"
    );
    let small = add_text(&first, "small", b"small\n");
    assert_eq!(journal(&root).len(), 1);
    // Another process opening the store settles the first one's row (its
    // file is complete: it was in place before the commit).
    let second = LocalStore::open_root(&root).unwrap();
    assert!(journal(&root).is_empty());
    assert_eq!(std::fs::read(second.real_path(&small)).unwrap(), b"small\n");
    // The first process's own settling then finds its row gone.
    drop(first);
    assert!(second.is_valid_path(&small).unwrap());
}

#[test]
fn a_registered_tree_whose_files_were_never_synced_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let store = LocalStore::open_root(&root).unwrap();
    // What a build leaves in place: a small tree, canonical, not synced.
    let tree = Node::directory([
        (
            "bin",
            Node::directory([("run", Node::executable(*b"#!/bin/sh\n"))]),
        ),
        ("link", Node::symlink(*b"bin/run")),
        ("share", Node::file(*b"data\n")),
    ]);
    let nar = tree.to_nar();
    let path = StorePath::from_base_name("0123456789abcdfghijklmnpqrsvwxyz-output").unwrap();
    let real = store.real_path(&path);
    kiln_formats::nar::restore(&nar[..], &real).unwrap();
    assert_eq!(
        kiln_store::local::journal::small_nar(&real).as_deref(),
        Some(&nar[..]),
        "the tree read back is its NAR"
    );
    register_journaled(&store, &path, &nar);
    assert_eq!(journal(&root).len(), 1);
    std::mem::forget(store);
    // The cut kept the directory but lost a file and the link.
    std::fs::remove_file(real.join("bin/run")).unwrap();
    std::fs::remove_file(real.join("link")).unwrap();

    let store = LocalStore::open_root(&root).unwrap();
    assert_eq!(
        kiln_store::local::journal::small_nar(&store.real_path(&path)).as_deref(),
        Some(&nar[..]),
        "restored from the journal"
    );
    assert!(journal(&root).is_empty());
    let report = store.verify(true, None).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn a_journaled_path_registered_again_with_other_contents_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let store = LocalStore::open_root(&root).unwrap();
    let path = StorePath::from_base_name("0123456789abcdfghijklmnpqrsvwxyz-unstable").unwrap();
    let real = store.real_path(&path);
    let first = Node::file(*b"first build\n").to_nar();
    kiln_formats::nar::restore(&first[..], &real).unwrap();
    register_journaled(&store, &path, &first);
    std::mem::forget(store);
    // Meanwhile another process deleted it and built it again, differently.
    let second = Node::file(*b"second build\n").to_nar();
    std::fs::remove_file(&real).unwrap();
    kiln_formats::nar::restore(&second[..], &real).unwrap();
    let db = rusqlite::Connection::open(root.join("nix/var/nix/db/db.sqlite")).unwrap();
    db.execute(
        "update ValidPaths set hash = ?1, narSize = ?2",
        rusqlite::params![
            Hash::digest(HashAlgo::Sha256, &second)
                .to_typed_string(kiln_formats::hash::HashFormat::Base16),
            second.len() as i64
        ],
    )
    .unwrap();
    drop(db);

    let store = LocalStore::open_root(&root).unwrap();
    assert_eq!(std::fs::read(&real).unwrap(), b"second build\n");
    assert!(journal(&root).is_empty());
    let report = store.verify(true, None).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
