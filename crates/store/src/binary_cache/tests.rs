//! The shared store behaviour over `file://` caches of every compression,
//! and what a cache must refuse: malformed narinfos, cut or corrupt NARs,
//! unsigned or wrongly signed paths — with nothing registered.

use std::fs;

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar::Node;
use kiln_formats::signature::{SecretKey, TrustedKeys};
use kiln_formats::store_path::StorePathSet;

use super::*;
use crate::local::LocalStore;
use crate::substitute::{CopyOptions, Substituter, copy_paths};
use crate::testing::run_behaviour_tests;

fn cache_url(dir: &Path, compression: &str) -> String {
    format!("file://{}?compression={compression}", dir.display())
}

#[test]
fn behaviour_over_every_compression() {
    for compression in ["none", "xz", "zstd", "bzip2"] {
        let dir = tempfile::tempdir().unwrap();
        let cache = BinaryCacheStore::open(
            &cache_url(&dir.path().join("cache"), compression),
            BinaryCacheConfig::default(),
        )
        .unwrap();
        let scratch = dir.path().join("scratch");
        fs::create_dir(&scratch).unwrap();
        run_behaviour_tests(&cache, &scratch);
        assert_eq!(
            fs::read_to_string(dir.path().join("cache/nix-cache-info")).unwrap(),
            "StoreDir: /nix/store\n"
        );
        // A fresh handle (no narinfos in memory) reads what was written.
        let again = BinaryCacheStore::open(
            &format!("file://{}", dir.path().join("cache").display()),
            BinaryCacheConfig::default(),
        )
        .unwrap();
        let all = again.query_all_valid_paths().unwrap();
        assert!(all.len() >= 10, "{compression}: {} paths", all.len());
        for p in &all {
            let info = again.query_path_info(p).unwrap().unwrap();
            let mut nar = Vec::new();
            again.nar_from_path(p, &mut nar).unwrap();
            assert_eq!(Hash::digest(HashAlgo::Sha256, &nar), info.nar_hash);
            let narinfo = again.query_narinfo(p).unwrap().unwrap();
            assert_eq!(narinfo.compression, compression);
            assert!(narinfo.url.ends_with(&format!(
                ".nar{}",
                compression.parse::<Compression>().unwrap().extension()
            )));
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    cache_dir: PathBuf,
    cache: BinaryCacheStore,
    key: SecretKey,
    /// dep ← top
    dep: PathInfo,
    top: PathInfo,
    local_root: PathBuf,
}

use std::path::PathBuf;

fn fixture(compression: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let key = SecretKey::generate("test-cache-1").unwrap();
    let cache = BinaryCacheStore::open(
        &cache_url(&cache_dir, compression),
        BinaryCacheConfig {
            secret_key: Some(key.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    // Input-addressed (no CA), so only a signature can vouch for them.
    let dep = add_built(&cache, "dep", Node::file(big), &StorePathSet::new());
    let top = add_built(
        &cache,
        "top",
        Node::file(format!("see {}", cache.store_dir().print_path(&dep.path)).into_bytes()),
        &[dep.path.clone()].into_iter().collect(),
    );
    let local_root = dir.path().join("local");
    Fixture {
        cache_dir,
        cache,
        key,
        dep,
        top,
        local_root,
        _dir: dir,
    }
}

/// Adds `node` as if a derivation had built it.
fn add_built(store: &dyn Store, name: &str, node: Node, refs: &StorePathSet) -> PathInfo {
    let nar = node.to_nar();
    let hash = Hash::digest(HashAlgo::Sha256, &nar);
    let mut info = PathInfo::new(
        store
            .store_dir()
            .make_path("output:out", &hash, name)
            .unwrap(),
        hash,
        nar.len() as u64,
    );
    info.references = refs.clone();
    store
        .add_nar(&info, &mut &nar[..], AddOptions::default())
        .unwrap();
    store.path_info_or_error(&info.path).unwrap()
}

fn trusted(key: &SecretKey) -> TrustedKeys {
    TrustedKeys::parse(&key.to_public().to_string()).unwrap()
}

fn narinfo_path(f: &Fixture, info: &PathInfo) -> PathBuf {
    f.cache_dir
        .join(format!("{}.narinfo", info.path.hash_part()))
}

#[test]
fn substitutes_closure_with_signatures() {
    let f = fixture("zstd");
    let local = LocalStore::open_root(&f.local_root).unwrap();
    let subst = Substituter::open(
        &[&format!("file://{}", f.cache_dir.display())],
        trusted(&f.key),
        true,
    )
    .unwrap();
    let report = subst
        .substitute_paths(&local, &[f.top.path.clone()].into_iter().collect())
        .unwrap();
    assert_eq!(report.copied, vec![f.dep.path.clone(), f.top.path.clone()]);
    let info = local.query_path_info(&f.top.path).unwrap().unwrap();
    assert_eq!(info.nar_hash, f.top.nar_hash);
    assert_eq!(info.references, f.top.references);
    assert!(info.sigs.iter().any(|s| s.starts_with("test-cache-1:")));
    // Nothing left to do the second time.
    let again = subst
        .substitute_paths(&local, &[f.top.path.clone()].into_iter().collect())
        .unwrap();
    assert!(again.copied.is_empty());
    assert_eq!(again.already_valid, 2);
}

#[test]
fn unsigned_or_wrongly_signed_paths_are_refused() {
    let f = fixture("xz");
    let local = LocalStore::open_root(&f.local_root).unwrap();
    let url = format!("file://{}", f.cache_dir.display());
    let other = SecretKey::generate("other-1").unwrap();
    let paths: StorePathSet = [f.top.path.clone()].into_iter().collect();
    for keys in [TrustedKeys::new(), trusted(&other)] {
        let subst = Substituter::open(&[&url], keys, true).unwrap();
        let e = subst.substitute_paths(&local, &paths).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("not signed by any trusted key") && msg.contains("test-cache-1"),
            "{msg}"
        );
        assert!(!local.is_valid_path(&f.dep.path).unwrap());
        assert!(!local.is_valid_path(&f.top.path).unwrap());
    }
    // A key of the right name but other bytes does not pass either.
    let impostor = SecretKey::generate("test-cache-1").unwrap();
    let subst = Substituter::open(&[&url], trusted(&impostor), true).unwrap();
    let msg = subst
        .substitute_paths(&local, &paths)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("test-cache-1 (invalid)"), "{msg}");
    // Without checking, it goes through.
    let subst = Substituter::open(&[&url], TrustedKeys::new(), false).unwrap();
    subst.substitute_paths(&local, &paths).unwrap();
    assert!(local.is_valid_path(&f.top.path).unwrap());
}

#[test]
fn malformed_narinfo_is_a_clear_error() {
    let f = fixture("none");
    let file = narinfo_path(&f, &f.top);
    let text = fs::read_to_string(&file).unwrap();
    fs::write(&file, text.replace("NarSize: ", "NarSize: x")).unwrap();
    let cache = BinaryCacheStore::open(
        &format!("file://{}", f.cache_dir.display()),
        BinaryCacheConfig::default(),
    )
    .unwrap();
    let msg = cache.query_path_info(&f.top.path).unwrap_err().to_string();
    assert!(
        msg.contains("malformed narinfo")
            && msg.contains(&format!("{}.narinfo", f.top.path.hash_part()))
            && msg.contains("NarSize"),
        "{msg}"
    );
    let local = LocalStore::open_root(&f.local_root).unwrap();
    let e = copy_paths(
        &cache,
        &local,
        &[f.top.path.clone()].into_iter().collect(),
        &CopyOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("malformed narinfo"), "{e}");
    assert!(local.query_all_valid_paths().unwrap().is_empty());
}

#[test]
fn truncated_or_corrupt_nars_register_nothing() {
    for compression in ["none", "xz", "zstd", "bzip2"] {
        for damage in ["truncate", "flip"] {
            let f = fixture(compression);
            let narinfo = f.cache.query_narinfo(&f.dep.path).unwrap().unwrap();
            let nar_file = f.cache_dir.join(&narinfo.url);
            let mut bytes = fs::read(&nar_file).unwrap();
            match damage {
                "truncate" => bytes.truncate(bytes.len() * 2 / 3),
                _ => {
                    // In the middle of the file contents (uncompressed) or
                    // of the compressed stream.
                    let i = bytes.len() / 2;
                    bytes[i] ^= 0x55;
                }
            }
            fs::write(&nar_file, &bytes).unwrap();
            let local = LocalStore::open_root(&f.local_root).unwrap();
            let subst = Substituter::open(
                &[&format!("file://{}", f.cache_dir.display())],
                trusted(&f.key),
                true,
            )
            .unwrap();
            let e = subst
                .substitute_paths(&local, &[f.top.path.clone()].into_iter().collect())
                .unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&f.cache.store_dir().print_path(&f.dep.path))
                    || msg.contains(&narinfo.url),
                "{compression}/{damage}: error names neither path nor file: {msg}"
            );
            assert!(
                local.query_all_valid_paths().unwrap().is_empty(),
                "{compression}/{damage}: something was registered"
            );
            let leftovers: Vec<_> = fs::read_dir(local.real_store_dir())
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n != ".links" && n != crate::local::lock::spares::DIR)
                .collect();
            assert!(
                leftovers.is_empty(),
                "{compression}/{damage}: left behind {leftovers:?}"
            );
        }
    }
}

#[test]
fn copies_to_a_cache_and_back_and_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::open_root(dir.path().join("a")).unwrap();
    let base = local
        .add_text("base", b"base", &StorePathSet::new())
        .unwrap();
    let tree = Node::directory([("bin", Node::executable(b"#!/bin/sh\n".to_vec()))]);
    let app = add_built(
        &local,
        "app",
        tree.clone(),
        &[base.path.clone()].into_iter().collect(),
    );
    let tree = tree.to_nar();

    let key = SecretKey::generate("k-1").unwrap();
    let cache = BinaryCacheStore::open(
        &cache_url(&dir.path().join("cache"), "xz"),
        BinaryCacheConfig {
            secret_key: Some(key.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let paths: StorePathSet = [app.path.clone()].into_iter().collect();
    let report = copy_paths(&local, &cache, &paths, &CopyOptions::default()).unwrap();
    assert_eq!(report.copied, vec![base.path.clone(), app.path.clone()]);
    let narinfo = cache.query_narinfo(&app.path).unwrap().unwrap();
    assert_eq!(
        narinfo
            .count_valid_signatures(cache.store_dir(), &trusted(&key))
            .unwrap(),
        1
    );

    let back = LocalStore::open_root(dir.path().join("b")).unwrap();
    let options = CopyOptions {
        trusted_keys: Some(trusted(&key)),
        ..Default::default()
    };
    let report = copy_paths(&cache, &back, &paths, &options).unwrap();
    assert_eq!(report.copied.len(), 2);
    let mut nar = Vec::new();
    back.nar_from_path(&app.path, &mut nar).unwrap();
    assert_eq!(nar, tree);

    // Repair: damage a file of the copy, verify from the substituter.
    let file = back.real_path(&app.path).join("bin");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(&file, b"damaged").unwrap();
    let subst = Substituter::open(
        &[&format!("file://{}", dir.path().join("cache").display())],
        trusted(&key),
        true,
    )
    .unwrap();
    let report = back.verify(true, Some(&subst)).unwrap();
    assert_eq!(report.repaired, vec![app.path.clone()], "{report:?}");
    let mut nar = Vec::new();
    back.nar_from_path(&app.path, &mut nar).unwrap();
    assert_eq!(nar, tree);
}

#[test]
fn nix_written_narinfo_reads() {
    // A narinfo as Nix 2.8 writes it for `nix copy --to file://` (xz).
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("c");
    fs::create_dir_all(&cache_dir).unwrap();
    fs::write(cache_dir.join("nix-cache-info"), "StoreDir: /gnu/store\n").unwrap();
    let e = BinaryCacheStore::open(
        &format!("file://{}", cache_dir.display()),
        BinaryCacheConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("/gnu/store"), "{e}");
    let e = BinaryCacheStore::open(
        &format!("file://{}?compression=br", cache_dir.display()),
        BinaryCacheConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("'br'"), "{e}");
}

#[test]
fn serves_a_store_over_http_and_copies_from_it() {
    use std::sync::Arc;

    use super::serve::{CacheServer, ServeOptions};

    let dir = tempfile::tempdir().unwrap();
    let served = LocalStore::open_root(dir.path().join("served")).unwrap();
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let dep = add_built(&served, "dep", Node::file(big), &StorePathSet::new());
    let top = add_built(
        &served,
        "top",
        Node::directory([("x", Node::symlink(b"y".to_vec()))]),
        &[dep.path.clone()].into_iter().collect(),
    );
    let key = SecretKey::generate("served-1").unwrap();
    let server = CacheServer::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", server.local_addr());
    let stopper = server.stopper();
    let store: Arc<dyn Store> = Arc::new(served);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            server.serve(
                store,
                &ServeOptions {
                    secret_key: Some(key.clone()),
                    ..ServeOptions::default()
                },
            )
        });
        let cache = BinaryCacheStore::open(&url, BinaryCacheConfig::default()).unwrap();
        assert_eq!(cache.cache_info().priority, Some(30));
        let ghost: StorePath = "00000000000000000000000000000000-ghost".parse().unwrap();
        assert!(!cache.is_valid_path(&ghost).unwrap());
        assert!(cache.query_path_info(&ghost).unwrap().is_none());
        assert!(cache.is_valid_path(&top.path).unwrap());

        let local = LocalStore::open_root(dir.path().join("client")).unwrap();
        let paths: StorePathSet = [top.path.clone()].into_iter().collect();
        let wrong = CopyOptions {
            trusted_keys: Some(trusted(&SecretKey::generate("served-1").unwrap())),
            ..Default::default()
        };
        assert!(copy_paths(&cache, &local, &paths, &wrong).is_err());
        assert!(local.query_all_valid_paths().unwrap().is_empty());
        let right = CopyOptions {
            trusted_keys: Some(trusted(&key)),
            ..Default::default()
        };
        let report = copy_paths(&cache, &local, &paths, &right).unwrap();
        assert_eq!(report.copied, vec![dep.path.clone(), top.path.clone()]);
        assert_eq!(
            local.query_path_info(&dep.path).unwrap().unwrap().nar_hash,
            dep.nar_hash
        );
        // A URL that is not a cache at all.
        let e = BinaryCacheStore::open(&format!("{url}/nowhere"), BinaryCacheConfig::default())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("does not appear to be a binary cache"),
            "{e}"
        );
        stopper.stop();
    });
}
