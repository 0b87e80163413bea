//! `cargo xtask bench cache`: copying a 2,000-path closure to and from a
//! `file://` binary cache, Kiln beside Nix 2.8's `nix copy`, in one run.
//!
//! The closure (2,000 input-addressed paths, each a directory with a 2–40 KB
//! text file and the list of its references; every path refers to the one
//! before it and to the one at half its index, so the last path's closure is
//! all of them) is made once in a Kiln store, which Nix reads as its own.
//! Then, for xz (Nix's default) and zstd:
//!
//! - to: the closure into an empty cache, NARs compressed and narinfos
//!   signed (`kiln store copy --to` vs `nix copy --to file://…?secret-key=…`);
//! - from: the closure out of that cache into an empty store, signatures
//!   checked against the trusted key (`kiln store copy --from` vs
//!   `nix copy --from`).
//!
//! Kiln runs through the library here (the CLI adds one process start).
//! Both tools write each store path durably in their own way: Kiln fsyncs
//! every path before registering it, Nix 2.8 syncs only its database.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar::Node;
use kiln_formats::signature::{SecretKey, TrustedKeys};
use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_store::binary_cache::{BinaryCacheConfig, BinaryCacheStore, Compression};
use kiln_store::local::LocalStore;
use kiln_store::substitute::{CopyOptions, copy_paths};
use kiln_store::{AddOptions, PathInfo, Store};

const PATHS: usize = 2000;

/// Text that compresses about as well as real files do.
fn contents(i: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "store",
        "path",
        "hash",
        "build",
        "output",
        "derivation",
        "closure",
        "cache",
        "nar",
        "signature",
        "reference",
        "kiln",
        "nix",
        "compress",
        "stream",
        "register",
    ];
    let len = 2_000 + (i * 7919) % 38_000;
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % 16) as usize].as_bytes());
        out.push(if x % 11 == 0 { b'\n' } else { b' ' });
        if x % 5 == 0 {
            out.extend_from_slice(format!("{}", x % 100_000).as_bytes());
        }
    }
    out
}

fn make_closure(store: &LocalStore) -> StorePath {
    let mut paths: Vec<StorePath> = Vec::with_capacity(PATHS);
    let mut infos = Vec::with_capacity(PATHS);
    let mut nars = std::collections::HashMap::with_capacity(PATHS);
    for i in 0..PATHS {
        let refs: StorePathSet = if i == 0 {
            StorePathSet::new()
        } else {
            [paths[i - 1].clone(), paths[i / 2].clone()]
                .into_iter()
                .collect()
        };
        let listing: String = refs
            .iter()
            .map(|r| format!("{}\n", store.store_dir().print_path(r)))
            .collect();
        let nar = Node::directory([
            ("data", Node::file(contents(i))),
            ("refs", Node::file(listing.into_bytes())),
        ])
        .to_nar();
        let hash = Hash::digest(HashAlgo::Sha256, &nar);
        let path = store
            .store_dir()
            .make_path("output:out", &hash, &format!("bench-{i}"))
            .unwrap();
        let mut info = PathInfo::new(path.clone(), hash, nar.len() as u64);
        info.references = refs;
        infos.push(info);
        nars.insert(path.clone(), nar);
        paths.push(path);
    }
    let source = |info: &PathInfo, out: &mut dyn std::io::Write| {
        out.write_all(&nars[&info.path])
            .map_err(|source| kiln_store::StoreError::Stream {
                action: "write a NAR",
                source,
            })
    };
    store
        .add_nars(&infos, &source, AddOptions::default(), 0)
        .unwrap();
    paths.pop().unwrap()
}

fn nix_conf(dir: &Path, trusted: &str) -> PathBuf {
    let conf = dir.join("nix-conf");
    fs::create_dir_all(&conf).unwrap();
    fs::write(
        conf.join("nix.conf"),
        format!(
            "substituters =\nbuild-users-group =\nsandbox = false\n\
             experimental-features = nix-command\ntrusted-public-keys = {trusted}\n"
        ),
    )
    .unwrap();
    conf
}

fn nix_copy(conf: &Path, home: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new("nix")
        .args(["copy"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("NIX_CONF_DIR", conf)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .output()
        .expect("cannot run nix (install Nix 2.8: cargo xtask test installs it)");
    let elapsed = t.elapsed();
    assert!(
        out.status.success(),
        "nix copy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            dir_size(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn row(what: &str, kiln: Duration, nix: Duration) {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / PATHS as f64;
    println!(
        "  {what:<34} kiln {:7.2} s ({:6.0} µs/path)   nix copy {:7.2} s ({:6.0} µs/path)   {:.2}x",
        kiln.as_secs_f64(),
        per(kiln),
        nix.as_secs_f64(),
        per(nix),
        nix.as_secs_f64() / kiln.as_secs_f64()
    );
}

fn main() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let home = w.join("home");
    fs::create_dir_all(&home).unwrap();
    let key = SecretKey::generate("bench-cache-1").unwrap();
    let sk_file = w.join("key.sk");
    fs::write(&sk_file, key.to_string()).unwrap();
    let pk = key.to_public().to_string();
    let conf = nix_conf(w, &pk);

    let src_root = w.join("src");
    let src = LocalStore::open_root(&src_root).unwrap();
    let t = Instant::now();
    let top = make_closure(&src);
    let top_s = src.store_dir().print_path(&top);
    let nar_bytes: u64 = kiln_store::compute_closure(
        &src,
        &[top.clone()].into_iter().collect(),
        false,
        false,
        false,
    )
    .unwrap()
    .iter()
    .map(|p| src.query_path_info(p).unwrap().unwrap().nar_size)
    .sum();
    println!(
        "closure: {PATHS} paths, {:.1} MB of NAR (made in {:.1} s); {} CPUs",
        nar_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let src_url = format!("local?root={}", src_root.display());
    let trusted = TrustedKeys::parse(&pk).unwrap();

    // `cargo xtask bench cache -- zstd` runs one compression only.
    let only: Vec<String> = std::env::args().skip(1).collect();
    for compression in [Compression::Xz, Compression::Zstd] {
        if !only.is_empty() && !only.contains(&compression.to_string()) {
            continue;
        }
        println!("{compression}:");
        // To a cache.
        let kiln_cache = w.join(format!("kiln-cache-{compression}"));
        let t = Instant::now();
        let cache = BinaryCacheStore::open(
            &format!("file://{}", kiln_cache.display()),
            BinaryCacheConfig {
                compression: Some(compression),
                secret_key: Some(key.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let paths: StorePathSet = [top.clone()].into_iter().collect();
        let report = copy_paths(&src, &cache, &paths, &CopyOptions::default()).unwrap();
        let kiln_to = t.elapsed();
        assert_eq!(report.copied.len(), PATHS);
        let nix_cache = w.join(format!("nix-cache-{compression}"));
        let nix_to = nix_copy(
            &conf,
            &home,
            &[
                "--store",
                &src_url,
                "--to",
                &format!(
                    "file://{}?compression={compression}&secret-key={}",
                    nix_cache.display(),
                    sk_file.display()
                ),
                &top_s,
            ],
        );
        row("to file:// (compress, sign)", kiln_to, nix_to);
        println!(
            "  {:<34} kiln {:.1} MB, nix {:.1} MB",
            "cache size",
            dir_size(&kiln_cache) as f64 / 1e6,
            dir_size(&nix_cache) as f64 / 1e6
        );

        // From a cache (each tool from its own cache, into an empty store).
        let kiln_dst = w.join(format!("kiln-dst-{compression}"));
        let t = Instant::now();
        let cache = BinaryCacheStore::open(
            &format!("file://{}", kiln_cache.display()),
            BinaryCacheConfig::default(),
        )
        .unwrap();
        let dst = LocalStore::open_root(&kiln_dst).unwrap();
        let options = CopyOptions {
            trusted_keys: Some(trusted.clone()),
            ..Default::default()
        };
        let report = copy_paths(&cache, &dst, &paths, &options).unwrap();
        let kiln_from = t.elapsed();
        assert_eq!(report.copied.len(), PATHS);
        drop(dst);
        let nix_dst = w.join(format!("nix-dst-{compression}"));
        let nix_from = nix_copy(
            &conf,
            &home,
            &[
                "--store",
                &format!("local?root={}", nix_dst.display()),
                "--from",
                &format!("file://{}", nix_cache.display()),
                &top_s,
            ],
        );
        row("from file:// (check sigs, add)", kiln_from, nix_from);
        // Both ends hold the same closure.
        let a: BTreeSet<_> = fs::read_dir(kiln_dst.join("nix/store"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        let b: BTreeSet<_> = fs::read_dir(nix_dst.join("nix/store"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        assert_eq!(a.len(), PATHS);
        assert_eq!(a, b, "the two copies differ");
    }
}
