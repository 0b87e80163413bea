//! Small texts made durable by the commit that registers them: their
//! contents wait in `KilnUnsyncedFiles` until their files are synced, and
//! a store opened after a power cut writes back what the cut lost.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_store::Store;
use kiln_store::local::LocalStore;
use kiln_store::local::db::JOURNAL_TABLE;
use kiln_store::local::gc::{GcAction, GcOptions};

/// The journal's rows as (path, contents), read past the store's API.
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
            "select path, contents from {JOURNAL_TABLE} order by id"
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
                (printed.clone(), b"survives\n".to_vec()),
                (
                    store.store_dir().print_path(&collected),
                    b"deleted before the cut\n".to_vec()
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
