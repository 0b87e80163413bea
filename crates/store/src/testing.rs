//! Behaviour tests shared by every [`Store`] implementation: each store's
//! own tests call [`run_behaviour_tests`] on a fresh, empty store, so the
//! local store, binary caches and the daemon client are held to the same
//! behaviour.
//!
//! Panics (with a message naming the check) on the first failure.

use std::path::Path;

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar::{self, Node};
use kiln_formats::store_path::{FileIngestionMethod, StorePath, StorePathSet};

use crate::{AddOptions, PathInfo, Store, StoreError, compute_closure, topo_sort};

/// Runs every shared check against `store`, which must be empty and use the
/// store directory `/nix/store`; `scratch` is an empty directory for
/// source files.
pub fn run_behaviour_tests(store: &dyn Store, scratch: &Path) {
    add_file_matches_nix(store, scratch);
    add_tree_round_trips(store, scratch);
    add_flat_with_other_algorithms(store, scratch);
    text_paths_and_references(store);
    add_nar_checks_hash_and_size(store);
    malformed_nar_is_refused(store);
    add_nars_in_batches(store);
    closure_and_order(store);
    hash_part_lookup(store);
}

fn write(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The values Nix 2.8 prints for `echo hi > f; nix-store --add f`.
fn add_file_matches_nix(store: &dyn Store, scratch: &Path) {
    let f = scratch.join("f");
    write(&f, b"hi\n");
    let info = store
        .add_to_store(
            "f",
            &f,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            AddOptions::default(),
        )
        .expect("adding a file");
    assert_eq!(info.path.to_string(), "ab3li50xq0nl4q5lxdyinb8w8y13my9s-f");
    assert_eq!(
        info.nar_hash.to_sri(),
        "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY="
    );
    assert_eq!(info.nar_size, 120);
    assert_eq!(
        info.ca.as_ref().map(ToString::to_string).as_deref(),
        Some("fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h")
    );
    assert!(store.is_valid_path(&info.path).unwrap());
    let queried = store
        .query_path_info(&info.path)
        .unwrap()
        .expect("added path is valid");
    assert_eq!(queried.nar_hash, info.nar_hash);
    assert_eq!(queried.ca, info.ca);
    // Adding again gives the same path and keeps it valid.
    let again = store
        .add_to_store(
            "f",
            &f,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            AddOptions::default(),
        )
        .unwrap();
    assert_eq!(again.path, info.path);
}

fn add_tree_round_trips(store: &dyn Store, scratch: &Path) {
    let tree = scratch.join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    write(&tree.join("sub/deeper/data"), &vec![7u8; 300_000]);
    write(&tree.join("script"), b"#!/bin/sh\necho hi\n");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("script"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("script", tree.join("link")).unwrap();
    std::fs::create_dir(tree.join("empty")).unwrap();
    let expected_nar = nar::dump_path(&tree, Vec::new()).unwrap();
    let info = store
        .add_to_store(
            "tree",
            &tree,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            AddOptions::default(),
        )
        .expect("adding a tree");
    assert_eq!(info.nar_hash, Hash::digest(HashAlgo::Sha256, &expected_nar));
    assert_eq!(info.nar_size, expected_nar.len() as u64);
    let mut out = Vec::new();
    store
        .nar_from_path(&info.path, &mut out)
        .expect("reading the NAR back");
    assert!(
        out == expected_nar,
        "NAR read back differs from the NAR of the source"
    );
    // Recursive sha512 gives another path with the same NAR.
    let other = store
        .add_to_store(
            "tree",
            &tree,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha512,
            AddOptions::default(),
        )
        .unwrap();
    assert_ne!(other.path, info.path);
    assert_eq!(other.nar_hash, info.nar_hash);
    let expected_path = store
        .store_dir()
        .make_fixed_output_path(
            "tree",
            FileIngestionMethod::Recursive,
            &Hash::digest(HashAlgo::Sha512, &expected_nar),
            &StorePathSet::new(),
            false,
        )
        .unwrap();
    assert_eq!(other.path, expected_path);
}

fn add_flat_with_other_algorithms(store: &dyn Store, scratch: &Path) {
    let f = scratch.join("flat.txt");
    write(&f, b"flat contents\n");
    for algo in [
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ] {
        let info = store
            .add_to_store(
                "flat.txt",
                &f,
                FileIngestionMethod::Flat,
                algo,
                AddOptions::default(),
            )
            .unwrap_or_else(|e| panic!("adding flat {algo}: {e}"));
        let expected = store
            .store_dir()
            .make_fixed_output_path(
                "flat.txt",
                FileIngestionMethod::Flat,
                &Hash::digest(algo, b"flat contents\n"),
                &StorePathSet::new(),
                false,
            )
            .unwrap();
        assert_eq!(info.path, expected, "flat {algo}");
    }
    let dir = scratch.join("a-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let refused = store.add_to_store(
        "a-dir",
        &dir,
        FileIngestionMethod::Flat,
        HashAlgo::Sha256,
        AddOptions::default(),
    );
    assert!(
        matches!(refused, Err(StoreError::BadSource { .. })),
        "flat add of a directory must be refused, got {refused:?}"
    );
}

fn text_paths_and_references(store: &dyn Store) {
    let a = store
        .add_text("a.txt", b"first", &StorePathSet::new())
        .expect("add text");
    let refs: StorePathSet = [a.path.clone()].into_iter().collect();
    let b = store
        .add_text(
            "b.txt",
            format!("uses {}", store.store_dir().print_path(&a.path)).as_bytes(),
            &refs,
        )
        .expect("add text with a reference");
    let info = store.query_path_info(&b.path).unwrap().unwrap();
    assert_eq!(info.references, refs);
    assert_eq!(
        info.path,
        store
            .store_dir()
            .make_text_path(
                "b.txt",
                &Hash::digest(
                    HashAlgo::Sha256,
                    format!("uses {}", store.store_dir().print_path(&a.path))
                ),
                &refs
            )
            .unwrap()
    );
    match store.query_referrers(&a.path) {
        Ok(referrers) => assert!(referrers.contains(&b.path), "referrers of a must include b"),
        Err(StoreError::Unsupported { .. }) => {}
        Err(e) => panic!("query_referrers: {e}"),
    }
    // A reference that is not valid is refused.
    let ghost: StorePath = "00000000000000000000000000000000-ghost".parse().unwrap();
    let bad = store.add_text("c.txt", b"x", &[ghost].into_iter().collect());
    assert!(
        bad.is_err(),
        "a path with an invalid reference must be refused"
    );
}

fn nar_info(store: &dyn Store, name: &str, nar: &[u8]) -> PathInfo {
    let hash = Hash::digest(HashAlgo::Sha256, nar);
    let path = store
        .store_dir()
        .make_path("output:out", &hash, name)
        .unwrap();
    PathInfo::new(path, hash, nar.len() as u64)
}

fn add_nar_checks_hash_and_size(store: &dyn Store) {
    let nar = Node::directory([("x", Node::file(b"x".to_vec()))]).to_nar();
    let info = nar_info(store, "checked", &nar);
    let mut wrong_hash = info.clone();
    wrong_hash.nar_hash = Hash::digest(HashAlgo::Sha256, b"something else");
    let e = store.add_nar(&wrong_hash, &mut &nar[..], AddOptions::default());
    assert!(
        matches!(e, Err(StoreError::NarHashMismatch { .. })),
        "wrong hash must be refused, got {e:?}"
    );
    assert!(
        !store.is_valid_path(&info.path).unwrap(),
        "a refused NAR must not become valid"
    );
    let mut wrong_size = info.clone();
    wrong_size.nar_size += 8;
    let e = store.add_nar(&wrong_size, &mut &nar[..], AddOptions::default());
    assert!(
        matches!(e, Err(StoreError::NarSizeMismatch { .. })),
        "wrong size must be refused, got {e:?}"
    );
    assert!(!store.is_valid_path(&info.path).unwrap());
    store
        .add_nar(&info, &mut &nar[..], AddOptions::default())
        .expect("a correct NAR is accepted");
    assert!(store.is_valid_path(&info.path).unwrap());
    let mut out = Vec::new();
    store.nar_from_path(&info.path, &mut out).unwrap();
    assert_eq!(out, nar);
    // Embedded in a longer stream: exactly the NAR is consumed.
    let mut stream = nar.clone();
    stream.extend_from_slice(b"TRAILER");
    let mut input = &stream[..];
    store
        .add_nar(&info, &mut input, AddOptions::default())
        .unwrap();
    assert_eq!(input, b"TRAILER");
}

/// A chain of paths longer than a local batch, each referring to the one
/// before, added in one call; then a batch with one bad NAR.
fn add_nars_in_batches(store: &dyn Store) {
    const N: usize = 300;
    let mut infos: Vec<PathInfo> = Vec::with_capacity(N);
    let mut nars = std::collections::HashMap::new();
    for i in 0..N {
        let nar = Node::directory([("i", Node::file(format!("batch {i}").into_bytes()))]).to_nar();
        let mut info = nar_info(store, &format!("batch-{i}"), &nar);
        if let Some(prev) = infos.last() {
            info.references.insert(prev.path.clone());
        }
        nars.insert(info.path.clone(), nar);
        infos.push(info);
    }
    let source = |info: &PathInfo, out: &mut dyn std::io::Write| {
        out.write_all(&nars[&info.path])
            .map_err(|source| StoreError::Stream {
                action: "write a test NAR",
                source,
            })
    };
    let added = store
        .add_nars(&infos, &source, AddOptions::default(), 0)
        .expect("adding a batch of NARs");
    assert_eq!(added.len(), N, "every path of the batch is added");
    let position: std::collections::HashMap<&StorePath, usize> =
        added.iter().enumerate().map(|(i, p)| (p, i)).collect();
    for info in &infos {
        let got = store
            .query_path_info(&info.path)
            .unwrap()
            .unwrap_or_else(|| panic!("{} of the batch is valid", info.path));
        assert_eq!(got.nar_hash, info.nar_hash);
        assert_eq!(
            got.references, info.references,
            "references of {}",
            info.path
        );
        for r in &info.references {
            assert!(position[r] < position[&info.path], "references come first");
        }
    }
    let again = store
        .add_nars(&infos, &source, AddOptions::default(), 0)
        .unwrap();
    assert!(again.is_empty(), "valid paths are skipped, got {again:?}");

    // One path of a new batch has a wrong hash: it, and whatever refers
    // to it, must not become valid.
    let mut bad_batch = Vec::new();
    let mut bad_nars = std::collections::HashMap::new();
    for i in 0..20 {
        let nar =
            Node::directory([("j", Node::file(format!("bad batch {i}").into_bytes()))]).to_nar();
        let mut info = nar_info(store, &format!("bad-batch-{i}"), &nar);
        if let Some(prev) = bad_batch.last() {
            let prev: &PathInfo = prev;
            info.references.insert(prev.path.clone());
        }
        bad_nars.insert(info.path.clone(), nar);
        bad_batch.push(info);
    }
    let victim = bad_batch[10].path.clone();
    bad_batch[10].nar_hash = Hash::digest(HashAlgo::Sha256, b"not this NAR");
    let source = |info: &PathInfo, out: &mut dyn std::io::Write| {
        out.write_all(&bad_nars[&info.path])
            .map_err(|source| StoreError::Stream {
                action: "write a test NAR",
                source,
            })
    };
    let e = store.add_nars(&bad_batch, &source, AddOptions::default(), 0);
    assert!(
        matches!(e, Err(StoreError::NarHashMismatch { ref path, .. }) if path.ends_with(victim.name())),
        "a wrong hash in a batch is refused naming the path, got {e:?}"
    );
    for info in &bad_batch[10..] {
        assert!(
            !store.is_valid_path(&info.path).unwrap(),
            "{} depends on a refused NAR and must not be valid",
            info.path
        );
    }
}

fn malformed_nar_is_refused(store: &dyn Store) {
    let nar = Node::directory([("y", Node::file(b"y".to_vec()))]).to_nar();
    let info = nar_info(store, "truncated", &nar);
    let e = store.add_nar(&info, &mut &nar[..nar.len() - 9], AddOptions::default());
    assert!(
        matches!(e, Err(StoreError::BadNar { .. })),
        "a truncated NAR must be refused as malformed, got {e:?}"
    );
    assert!(!store.is_valid_path(&info.path).unwrap());
}

fn closure_and_order(store: &dyn Store) {
    let base = store
        .add_text("base", b"base", &StorePathSet::new())
        .unwrap();
    let mid = store
        .add_text("mid", b"mid", &[base.path.clone()].into_iter().collect())
        .unwrap();
    let top = store
        .add_text(
            "top",
            b"top",
            &[mid.path.clone(), base.path.clone()].into_iter().collect(),
        )
        .unwrap();
    let start: StorePathSet = [top.path.clone()].into_iter().collect();
    let closure = compute_closure(store, &start, false, false, false).unwrap();
    let expected: StorePathSet = [top.path.clone(), mid.path.clone(), base.path.clone()]
        .into_iter()
        .collect();
    assert_eq!(closure, expected);
    let order = topo_sort(store, &closure).unwrap();
    assert_eq!(
        order,
        vec![base.path.clone(), mid.path.clone(), top.path.clone()],
        "dependencies come first"
    );
    if let Ok(up) = compute_closure(
        store,
        &[base.path.clone()].into_iter().collect(),
        true,
        false,
        false,
    ) {
        assert!(up.contains(&top.path) && up.contains(&mid.path));
    }
}

fn hash_part_lookup(store: &dyn Store) {
    let t = store
        .add_text("lookup", b"lookup", &StorePathSet::new())
        .unwrap();
    assert_eq!(
        store.query_path_from_hash_part(t.path.hash_part()).unwrap(),
        Some(t.path.clone())
    );
    assert_eq!(
        store
            .query_path_from_hash_part("00000000000000000000000000000000")
            .unwrap(),
        None
    );
}
