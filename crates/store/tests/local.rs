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

/// Large files are written around the page cache (`O_DIRECT`) by a
/// writer thread: whatever their size against its blocks and alignment,
/// they arrive whole, canonical and hashed as before, and (on a file
/// system that takes `O_DIRECT`) most of their pages were never cached.
#[test]
fn large_files_arrive_whole_without_filling_the_page_cache() {
    use kiln_formats::content_address::ContentAddress;
    use kiln_formats::hash::Hash;
    use std::os::unix::fs::PermissionsExt;

    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut data = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    // Below, at and past the threshold; unaligned tails; more blocks than
    // one writer holds, so blocks are reused.
    const THRESHOLD: usize = 64 << 10;
    let sizes = [
        ("below", THRESHOLD - 1),
        ("exact", THRESHOLD),
        ("one-more", THRESHOLD + 1),
        ("sub/aligned", 3 * MIB + 4096),
        ("sub/unaligned", 3 * MIB + 4095),
        ("many-blocks", 9 * MIB + 123),
    ];
    let mut contents = std::collections::BTreeMap::new();
    for (name, len) in sizes {
        let bytes = data(len);
        std::fs::write(src.join(name), &bytes).unwrap();
        contents.insert(name, bytes);
    }
    std::fs::set_permissions(src.join("exact"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let info = store
        .add_to_store(
            "large",
            &src,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            AddOptions::default(),
        )
        .unwrap();
    let (nar_hash, nar_size) = kiln_formats::nar::hash_path(&src, HashAlgo::Sha256).unwrap();
    assert_eq!((info.nar_hash, info.nar_size), (nar_hash, nar_size));
    let real = store.real_path(&info.path);

    // Before anything reads them: the large files' pages were not cached.
    let biggest = real.join("many-blocks");
    if !on_tmpfs(&biggest) {
        let (resident, pages) = resident_pages(&biggest);
        assert!(
            resident * 4 < pages,
            "{resident} of {pages} pages of a file written with O_DIRECT are cached"
        );
    }
    for (name, bytes) in &contents {
        let m = std::fs::symlink_metadata(real.join(name)).unwrap();
        let mode = if *name == "exact" { 0o555 } else { 0o444 };
        assert_eq!(m.mode() & 0o7777, mode, "mode of {name}");
        assert_eq!(m.mtime(), 1, "mtime of {name}");
        assert!(
            std::fs::read(real.join(name)).unwrap() == *bytes,
            "contents of {name}"
        );
    }

    // A single large file added flat: its flat hash is computed on the way.
    let big = src.join("many-blocks");
    let flat = store
        .add_to_store(
            "flat",
            &big,
            FileIngestionMethod::Flat,
            HashAlgo::Sha256,
            AddOptions::default(),
        )
        .unwrap();
    let expected = Hash::digest(HashAlgo::Sha256, &contents["many-blocks"]);
    assert!(
        matches!(&flat.ca, Some(ContentAddress::Fixed { hash, .. }) if *hash == expected),
        "flat content address {:?}, expected {expected}",
        flat.ca
    );
    assert!(std::fs::read(store.real_path(&flat.path)).unwrap() == contents["many-blocks"]);
    assert!(store.verify(true, None).unwrap().problems.is_empty());

    // A NAR cut off inside a large file: refused, and nothing is left.
    let nar = kiln_formats::nar::dump_path(&src, Vec::new()).unwrap();
    let other = LocalStore::open_root(dir.path().join("other")).unwrap();
    let e = other.add_nar(&info, &mut &nar[..nar.len() / 2], AddOptions::default());
    assert!(
        matches!(e, Err(kiln_store::StoreError::BadNar { .. })),
        "a NAR truncated inside a large file must be refused as malformed, got {e:?}"
    );
    assert!(!other.is_valid_path(&info.path).unwrap());
    let left: Vec<_> = std::fs::read_dir(other.real_store_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| {
            !n.to_string_lossy().starts_with('.') || n.to_string_lossy().starts_with(".kiln-tmp")
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The store goes on working, here through the batch path (one
    // `syncfs` for the batch instead of an fsync per file).
    let source = |_: &kiln_store::PathInfo, out: &mut dyn std::io::Write| {
        out.write_all(&nar)
            .map_err(|source| kiln_store::StoreError::Stream {
                action: "write a test NAR",
                source,
            })
    };
    other
        .add_nars(
            std::slice::from_ref(&info),
            &source,
            AddOptions::default(),
            0,
        )
        .unwrap();
    assert!(other.verify(true, None).unwrap().problems.is_empty());
}

fn on_tmpfs(path: &std::path::Path) -> bool {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a zeroed statfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    st.f_type == libc::TMPFS_MAGIC
}

/// How many of the file's pages are in the page cache, of how many.
fn resident_pages(path: &std::path::Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096;
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of a file we hold open, unmapped
    // below; mincore fills one byte per page.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        (vec.iter().filter(|b| **b & 1 != 0).count(), pages)
    }
}

mod gc_verify_optimise {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;

    use kiln_formats::store_path::StorePathSet;
    use kiln_store::local::LocalStore;
    use kiln_store::local::gc::{GcAction, GcOptions};
    use kiln_store::local::verify::Problem;
    use kiln_store::{Store, StoreError};

    fn set(paths: &[&kiln_formats::store_path::StorePath]) -> StorePathSet {
        paths.iter().map(|p| (*p).clone()).collect()
    }

    #[test]
    fn roots_liveness_and_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path().join("root")).unwrap();
        let dep = store
            .add_text("dep", b"dep", &StorePathSet::new())
            .unwrap()
            .path;
        let top = store.add_text("top", b"top", &set(&[&dep])).unwrap().path;
        let loose = store
            .add_text("loose", b"loose", &StorePathSet::new())
            .unwrap()
            .path;
        let indirect = store
            .add_text("indirect", b"indirect", &StorePathSet::new())
            .unwrap()
            .path;
        // A direct root, and an indirect one through a `result`-style link.
        std::os::unix::fs::symlink(
            store.store_dir().print_path(&top),
            store.state_dir().join("gcroots/top"),
        )
        .unwrap();
        let result = dir.path().join("result");
        store.add_perm_root(&indirect, &result).unwrap();
        // A dangling indirect root is removed by the collector.
        store.add_indirect_root(&dir.path().join("gone")).unwrap();
        // This process's own temporary roots would keep everything alive.
        store.clear_temp_roots().unwrap();

        let roots = store.find_roots().unwrap();
        assert!(roots.contains_key(&top) && roots.contains_key(&indirect));
        assert!(roots[&indirect].contains(&result));

        let dead = |store: &LocalStore| {
            store
                .collect_garbage(&GcOptions {
                    action: GcAction::ReturnDead,
                    ..Default::default()
                })
                .unwrap()
                .paths
        };
        assert_eq!(dead(&store), vec![loose.clone()]);
        let live = store
            .collect_garbage(&GcOptions {
                action: GcAction::ReturnLive,
                ..Default::default()
            })
            .unwrap()
            .paths;
        assert_eq!(live.len(), 3);

        // Deleting a live path, or one a live path refers to, is refused.
        for alive in [&top, &dep] {
            let e = store.collect_garbage(&GcOptions {
                action: GcAction::DeleteSpecific(set(&[alive])),
                ..Default::default()
            });
            assert!(matches!(e, Err(StoreError::PathAlive { .. })), "{e:?}");
            assert!(store.is_valid_path(alive).unwrap());
        }
        let r = store
            .collect_garbage(&GcOptions {
                action: GcAction::DeleteSpecific(set(&[&loose])),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.paths, vec![loose.clone()]);
        assert!(!store.is_valid_path(&loose).unwrap());
        assert!(!store.real_path(&loose).exists());

        // Dropping the roots makes the rest garbage; max-freed stops early.
        std::fs::remove_file(store.state_dir().join("gcroots/top")).unwrap();
        std::fs::remove_file(&result).unwrap();
        let some = store
            .collect_garbage(&GcOptions {
                max_freed: 1,
                ..Default::default()
            })
            .unwrap();
        assert!(
            !some.paths.is_empty() && some.paths.len() < 3,
            "max-freed should stop early: {:?}",
            some.paths
        );
        store.collect_garbage(&GcOptions::default()).unwrap();
        assert!(store.query_all_valid_paths().unwrap().is_empty());
        let auto: Vec<_> = std::fs::read_dir(store.state_dir().join("gcroots/auto"))
            .unwrap()
            .collect();
        assert!(
            auto.is_empty(),
            "dangling indirect roots must be removed: {auto:?}"
        );
    }

    #[test]
    fn verify_finds_damage_and_repairs_from_another_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path().join("root")).unwrap();
        let good = LocalStore::open_root(dir.path().join("good")).unwrap();
        let a = store
            .add_text("a", b"original", &StorePathSet::new())
            .unwrap()
            .path;
        let b = store
            .add_text("b", b"other", &StorePathSet::new())
            .unwrap()
            .path;
        good.add_text("a", b"original", &StorePathSet::new())
            .unwrap();
        assert!(store.verify(true, None).unwrap().problems.is_empty());

        let file = store.real_path(&a);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&file, b"tampered").unwrap();
        let removed = store.real_path(&b);
        std::fs::remove_file(&removed).unwrap();

        assert!(store.verify(false, None).unwrap().problems == vec![Problem::Missing(b.clone())]);
        let report = store.verify(true, None).unwrap();
        assert_eq!(report.problems.len(), 2);
        assert!(
            report
                .problems
                .iter()
                .any(|p| matches!(p, Problem::Modified { path, .. } if *path == a))
        );

        let repaired = store.verify(true, Some(&good)).unwrap();
        assert_eq!(repaired.repaired, vec![a.clone()]);
        assert_eq!(repaired.unrepaired.len(), 1, "b is in no repair source");
        assert_eq!(std::fs::read(&file).unwrap(), b"original");
        let again = store.verify(true, None).unwrap();
        assert_eq!(again.problems, vec![Problem::Missing(b)]);
    }

    #[test]
    fn optimise_hard_links_identical_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_root(dir.path().join("root")).unwrap();
        let src = dir.path().join("src");
        for (i, extra) in ["one", "two"].iter().enumerate() {
            let tree = src.join(extra);
            std::fs::create_dir_all(&tree).unwrap();
            std::fs::write(tree.join("shared"), vec![b's'; 100_000]).unwrap();
            std::fs::write(tree.join("own"), format!("own {i}")).unwrap();
        }
        let one = store
            .add_to_store(
                "one",
                &src.join("one"),
                kiln_formats::store_path::FileIngestionMethod::Recursive,
                kiln_formats::hash::HashAlgo::Sha256,
                Default::default(),
            )
            .unwrap()
            .path;
        let two = store
            .add_to_store(
                "two",
                &src.join("two"),
                kiln_formats::store_path::FileIngestionMethod::Recursive,
                kiln_formats::hash::HashAlgo::Sha256,
                Default::default(),
            )
            .unwrap()
            .path;
        let stats = store.optimise().unwrap();
        assert_eq!(stats.files_linked, 1);
        let m1 = std::fs::metadata(store.real_path(&one).join("shared")).unwrap();
        let m2 = std::fs::metadata(store.real_path(&two).join("shared")).unwrap();
        assert_eq!(m1.ino(), m2.ino());
        assert_eq!(m1.nlink(), 3, "two store files and the .links entry");
        assert!(store.verify(true, None).unwrap().problems.is_empty());
        // Directories stay canonical after relinking.
        let d = std::fs::metadata(store.real_path(&two)).unwrap();
        assert_eq!((d.mode() & 0o7777, d.mtime()), (0o555, 1));
        // Again: nothing more to do.
        assert_eq!(store.optimise().unwrap().files_linked, 0);
    }
}

/// Paths put in place by someone else (a build) become valid through
/// `register_valid_paths`, with everything Nix records about them.
#[test]
fn register_valid_paths_records_everything() {
    use kiln_formats::hash::Hash;
    use kiln_formats::nar::Node;
    use kiln_store::PathInfo;
    use std::collections::BTreeMap;

    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let sd = store.store_dir().clone();
    let lib_nar = Node::file(b"lib".to_vec()).to_nar();
    let lib_hash = Hash::digest(HashAlgo::Sha256, &lib_nar);
    let lib = sd.make_path("output:out", &lib_hash, "lib").unwrap();
    let drv = sd
        .make_text_path(
            "app.drv",
            &Hash::digest(HashAlgo::Sha256, b"drv"),
            &StorePathSet::new(),
        )
        .unwrap();
    let app_contents = format!("uses {}", sd.print_path(&lib));
    let app_nar = Node::file(app_contents.clone().into_bytes()).to_nar();
    let app_hash = Hash::digest(HashAlgo::Sha256, &app_nar);
    let app = sd.make_path("output:out", &app_hash, "app").unwrap();
    std::fs::write(store.real_path(&lib), b"lib").unwrap();
    std::fs::write(store.real_path(&app), &app_contents).unwrap();

    let lib_info = PathInfo::new(lib.clone(), lib_hash, lib_nar.len() as u64);
    let mut app_info = PathInfo::new(app.clone(), app_hash, app_nar.len() as u64);
    app_info.references.insert(lib.clone());
    app_info.deriver = Some(drv.clone());
    app_info.ultimate = true;
    app_info
        .sigs
        .insert("cache.example.org-1:".to_owned() + &"A".repeat(86) + "==");
    // The app before the lib it refers to: one transaction takes both.
    store
        .register_valid_paths(&[app_info.clone(), lib_info], &BTreeMap::new())
        .expect("registering paths in place");
    let got = store.query_path_info(&app).unwrap().expect("app is valid");
    assert_eq!(got.references, app_info.references);
    assert_eq!(got.deriver, Some(drv.clone()));
    assert!(got.ultimate);
    assert_eq!(got.sigs, app_info.sigs);
    assert!(got.registration_time > 0, "a time of 0 becomes now");
    assert_eq!(
        store.query_referrers(&lib).unwrap(),
        [app.clone()].into_iter().collect()
    );
    let mut out = Vec::new();
    store.nar_from_path(&app, &mut out).unwrap();
    assert_eq!(out, app_nar);

    // A derivation registered with its outputs.
    let drv_contents = b"drv";
    std::fs::write(store.real_path(&drv), drv_contents).unwrap();
    let drv_nar = Node::file(drv_contents.to_vec()).to_nar();
    let drv_info = PathInfo::new(
        drv.clone(),
        Hash::digest(HashAlgo::Sha256, &drv_nar),
        drv_nar.len() as u64,
    );
    let outputs: BTreeMap<_, _> = [(
        drv.clone(),
        [("out".to_owned(), app.clone())].into_iter().collect(),
    )]
    .into_iter()
    .collect();
    store.register_valid_paths(&[drv_info], &outputs).unwrap();
    assert_eq!(store.query_derivation_outputs(&drv).unwrap(), outputs[&drv]);
    assert_eq!(
        store.query_valid_derivers(&app).unwrap(),
        [drv.clone()].into_iter().collect()
    );

    // A reference neither valid nor in the batch is refused, naming both.
    let orphan_hash = Hash::digest(HashAlgo::Sha256, b"orphan");
    let orphan = sd.make_path("output:out", &orphan_hash, "orphan").unwrap();
    let mut bad = PathInfo::new(orphan.clone(), orphan_hash, 8);
    bad.references.insert(
        sd.make_path(
            "output:out",
            &Hash::digest(HashAlgo::Sha256, b"x"),
            "missing",
        )
        .unwrap(),
    );
    let e = store.register_valid_paths(&[bad], &BTreeMap::new());
    assert!(
        matches!(e, Err(kiln_store::StoreError::MissingReference { .. })),
        "got {e:?}"
    );
    assert!(
        !store.is_valid_path(&orphan).unwrap(),
        "nothing half-registered"
    );
}

#[test]
fn add_signatures_keeps_old_ones_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let info = store
        .add_text("signed", b"signed", &StorePathSet::new())
        .unwrap();
    let a = "a-1:".to_owned() + &"A".repeat(86) + "==";
    let b = "b-1:".to_owned() + &"Q".repeat(85) + "A==";
    store
        .add_signatures(&info.path, std::slice::from_ref(&a))
        .unwrap();
    store
        .add_signatures(&info.path, &[b.clone(), a.clone()])
        .unwrap();
    let sigs = store.query_path_info(&info.path).unwrap().unwrap().sigs;
    assert_eq!(sigs, [a.clone(), b.clone()].into_iter().collect());
    let e = store.add_signatures(&info.path, &["no colon".to_owned()]);
    assert!(
        matches!(e, Err(kiln_store::StoreError::BadSignature { .. })),
        "got {e:?}"
    );
    let other = store
        .store_dir()
        .parse_path("/nix/store/00000000000000000000000000000000-gone")
        .unwrap();
    let e = store.add_signatures(&other, &[a]);
    assert!(
        matches!(e, Err(kiln_store::StoreError::InvalidPath { .. })),
        "got {e:?}"
    );
}

/// Paths that running processes use are runtime roots: an open file, a
/// path in the environment. Once the process is gone, they are garbage.
#[test]
fn gc_keeps_paths_running_processes_use() {
    use kiln_store::local::gc::{GcAction, GcOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let opened = store
        .add_text("opened", b"opened", &StorePathSet::new())
        .unwrap();
    let in_env = store
        .add_text("in-env", b"in env", &StorePathSet::new())
        .unwrap();
    let unused = store
        .add_text("unused", b"unused", &StorePathSet::new())
        .unwrap();
    // Our own temporary roots would keep them all.
    store.clear_temp_roots().unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("120")
        .stdin(std::fs::File::open(store.real_path(&opened.path)).unwrap())
        .env(
            "SOME_PATH",
            format!("{}/bin", store.store_dir().print_path(&in_env.path)),
        )
        .spawn()
        .expect("cannot run sleep");
    // Until `sleep` is exec'd, /proc shows the forked test's environment.
    let environ = format!("/proc/{}/environ", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read(&environ).is_ok_and(|env| env.windows(10).any(|w| w == b"SOME_PATH=")) {
        assert!(std::time::Instant::now() < deadline, "sleep never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let roots = store.find_roots().unwrap();
    let dead = store
        .collect_garbage(&GcOptions {
            action: GcAction::ReturnDead,
            ..Default::default()
        })
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let fd = format!("/proc/{}/fd/0", child.id());
    assert!(
        roots
            .get(&opened.path)
            .is_some_and(|s| s.iter().any(|p| p.to_string_lossy() == fd)),
        "the open file is a root through {fd}: {roots:?}"
    );
    assert!(roots.contains_key(&in_env.path), "{roots:?}");
    assert_eq!(dead.paths, vec![unused.path.clone()]);
    let after = store.collect_garbage(&GcOptions::default()).unwrap();
    let mut deleted = after.paths.clone();
    deleted.sort();
    let mut expected = vec![opened.path, in_env.path, unused.path];
    expected.sort();
    assert_eq!(deleted, expected, "without the process they are garbage");
}

/// A daemon keeps one temp-roots session per connection: what the client
/// added is protected while it is connected, and no longer once it goes,
/// although the daemon's process lives on.
#[test]
fn temp_roots_sessions_end_with_the_connection() {
    use kiln_store::local::gc::{GcAction, GcOptions};
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open_root(dir.path().join("root")).unwrap();
    let dead = |store: &LocalStore| {
        store
            .collect_garbage(&GcOptions {
                action: GcAction::ReturnDead,
                ..Default::default()
            })
            .unwrap()
            .paths
    };
    let session = store.temp_roots_session().unwrap();
    let added = {
        let _entered = session.enter();
        store
            .add_text("by-client", b"client", &StorePathSet::new())
            .unwrap()
    };
    let other = store
        .add_text("outside", b"outside", &StorePathSet::new())
        .unwrap();
    store.clear_temp_roots().unwrap();
    assert!(
        session.file().is_file(),
        "the session has its own temp-roots file"
    );
    assert_eq!(
        dead(&store),
        vec![other.path.clone()],
        "the session's path is protected, the process's roots were cleared"
    );
    let file = session.file().to_path_buf();
    drop(session);
    assert!(!file.exists(), "the session's file goes with it");
    let mut now_dead = dead(&store);
    now_dead.sort();
    let mut expected = vec![added.path, other.path];
    expected.sort();
    assert_eq!(now_dead, expected);
}
