//! Kiln's signing keys, path signatures and narinfo files against Nix 2.8's.
//!
//! - Keys made by either tool work in the other: Nix signs with a key Kiln
//!   generated, Kiln signs with keys `nix-store --generate-binary-cache-key`
//!   and `nix key generate-secret` made, and both derive the same public key.
//!   Ed25519 is deterministic, so Kiln's signature of a path must equal the
//!   one `nix store sign` adds with the same key, byte for byte.
//! - Narinfos that `nix copy --to file://…` writes (with references, a
//!   deriver, a content address, signatures) parse and print back
//!   identically, agree with `nix path-info --json`, and their signatures
//!   verify in Kiln; narinfos Kiln signs are accepted by `nix store verify`
//!   with Kiln's public key, and refused without it.

use std::fs;
use std::path::Path;

use kiln_e2e::NixStore;
use kiln_formats::hash::Hash;
use kiln_formats::narinfo::{CacheInfo, NarInfo};
use kiln_formats::signature::{PublicKey, SecretKey, Signature, TrustedKeys, path_fingerprint};
use kiln_formats::store_path::{StoreDir, StorePathSet};
use serde_json::Value;

/// A derivation whose output refers to two text files and to itself, so its
/// fingerprint and narinfo have several references and a deriver.
const EXPRESSION: &str = r#"
let
  a = builtins.toFile "kiln-sig-a.txt" "first";
  b = builtins.toFile "kiln-sig-b.txt" "second";
in derivation {
  name = "kiln-sig-output";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${a} ${b} $out > $out" ];
}
"#;

/// A store holding the built output above (and its references).
struct Fixture {
    store: NixStore,
    scratch: tempfile::TempDir,
    /// The output and its two references, as Nix prints them.
    paths: Vec<String>,
    output: String,
}

fn fixture() -> Fixture {
    let store = NixStore::new();
    let scratch = tempfile::tempdir().unwrap();
    let expr = scratch.path().join("sig.nix");
    fs::write(&expr, EXPRESSION).unwrap();
    let output = store
        .nix_build([std::ffi::OsStr::new("--no-out-link"), expr.as_os_str()])
        .unwrap_or_else(|e| panic!("nix-build of the signing fixture failed: {e}"))
        .trim()
        .to_owned();
    let paths: Vec<String> = store
        .nix_store(["--query", "--requisites", &output])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        paths.len(),
        3,
        "expected the output and two text files: {paths:?}"
    );
    Fixture {
        store,
        scratch,
        paths,
        output,
    }
}

impl Fixture {
    /// `nix path-info --json` of one path.
    fn path_info(&self, path: &str) -> Value {
        let json = self.store.nix(["path-info", "--json", path]).unwrap();
        let mut infos: Vec<Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(infos.len(), 1, "{json}");
        infos.remove(0)
    }

    /// The fingerprint Kiln computes from what Nix says about `path`.
    fn fingerprint(&self, path: &str) -> String {
        let info = self.path_info(path);
        let store = StoreDir::default();
        let references: StorePathSet = info["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| store.parse_path(r.as_str().unwrap()).unwrap())
            .collect();
        path_fingerprint(
            &store,
            &store.parse_path(path).unwrap(),
            &info["narHash"].as_str().unwrap().parse::<Hash>().unwrap(),
            info["narSize"].as_u64().unwrap(),
            &references,
        )
        .unwrap()
    }

    /// The signatures Nix has recorded for `path`.
    fn nix_signatures(&self, path: &str) -> Vec<Signature> {
        self.path_info(path)["signatures"]
            .as_array()
            .map(|sigs| {
                sigs.iter()
                    .map(|s| s.as_str().unwrap().parse().unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn nix_sign(&self, key_file: &Path, paths: &[String]) {
        let mut args = vec![
            "store".to_owned(),
            "sign".to_owned(),
            "--key-file".to_owned(),
        ];
        args.push(key_file.to_str().unwrap().to_owned());
        args.extend(paths.iter().cloned());
        self.store
            .nix(&args)
            .unwrap_or_else(|e| panic!("nix store sign failed: {e}"));
    }

    fn write(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let path = self.scratch.path().join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

#[test]
fn nix_signs_with_kiln_generated_key_and_kiln_verifies() {
    let fx = fixture();
    let key = SecretKey::generate("kiln-made-1").unwrap();
    let key_file = fx.write("kiln.sk", &key.to_string());

    // Nix derives the same public key from Kiln's secret key file.
    let public = fx
        .store
        .run_bytes(
            "nix",
            ["key", "convert-secret-to-public"],
            key.to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8(public).unwrap().trim(),
        key.to_public().to_string()
    );

    fx.nix_sign(&key_file, &fx.paths);
    let trusted = TrustedKeys::parse(&key.to_public().to_string()).unwrap();
    for path in &fx.paths {
        let fingerprint = fx.fingerprint(path);
        let sigs = fx.nix_signatures(path);
        assert_eq!(sigs.len(), 1, "{path}: {sigs:?}");
        trusted
            .verify(fingerprint.as_bytes(), &sigs[0])
            .unwrap_or_else(|e| panic!("{path}: Nix's signature with Kiln's key: {e}"));
        assert_eq!(
            key.sign(fingerprint.as_bytes()),
            sigs[0],
            "{path}: signatures differ"
        );
    }
}

#[test]
fn kiln_signs_with_nix_generated_keys_identically() {
    let fx = fixture();
    let dir = fx.scratch.path();
    let (sk, pk) = (dir.join("nix.sk"), dir.join("nix.pk"));
    fx.store
        .nix_store([
            "--generate-binary-cache-key".as_ref(),
            "nix-made-1".as_ref(),
            sk.as_os_str(),
            pk.as_os_str(),
        ])
        .unwrap();
    let generated = fx
        .store
        .nix(["key", "generate-secret", "--key-name", "nix-made-2"])
        .unwrap();
    let sk2 = fx.write("nix2.sk", &generated);

    for (key_file, public_file) in [(sk, Some(pk)), (sk2, None)] {
        let text = fs::read_to_string(&key_file).unwrap();
        let key: SecretKey = text.parse().unwrap();
        assert_eq!(
            key.to_string(),
            text.trim(),
            "secret key prints back as Nix wrote it"
        );
        if let Some(public_file) = public_file {
            let nix_public = fs::read_to_string(public_file).unwrap();
            let parsed: PublicKey = nix_public.parse().unwrap();
            assert_eq!(parsed, key.to_public());
            assert_eq!(key.to_public().to_string(), nix_public.trim());
        }

        fx.nix_sign(&key_file, &fx.paths);
        for path in &fx.paths {
            let fingerprint = fx.fingerprint(path);
            let ours = key.sign(fingerprint.as_bytes());
            let theirs = fx.nix_signatures(path);
            assert!(
                theirs.contains(&ours),
                "{path}: Kiln's signature {ours} is not among Nix's {theirs:?}\nfingerprint: {fingerprint}"
            );
        }
    }
}

#[test]
fn narinfos_round_trip_and_signatures_interoperate() {
    let fx = fixture();
    let nix_key = SecretKey::generate("nix-side-1").unwrap();
    let nix_key_file = fx.write("nix-side.sk", &nix_key.to_string());
    // Sign only the two text files, so the output reaches the cache unsigned.
    let texts: Vec<String> = fx
        .paths
        .iter()
        .filter(|p| **p != fx.output)
        .cloned()
        .collect();
    fx.nix_sign(&nix_key_file, &texts);

    let cache = fx.scratch.path().join("cache");
    let cache_url = format!("file://{}", cache.display());
    let mut args = vec!["copy".to_owned(), "--to".to_owned(), cache_url.clone()];
    args.extend(fx.paths.iter().cloned());
    fx.store.nix(&args).unwrap();

    let store = StoreDir::default();
    let cache_info_text = fs::read_to_string(cache.join("nix-cache-info")).unwrap();
    let cache_info = CacheInfo::parse(&cache_info_text).unwrap();
    assert_eq!(cache_info.to_text(), cache_info_text);
    cache_info.check_store_dir(&store).unwrap();

    let nix_trusted = TrustedKeys::parse(&nix_key.to_public().to_string()).unwrap();
    let mut output_info = None;
    for path in &fx.paths {
        let parsed = store.parse_path(path).unwrap();
        let file = cache.join(format!("{}.narinfo", parsed.hash_part()));
        let text = fs::read_to_string(&file).unwrap();
        let info = NarInfo::parse(&store, &text)
            .unwrap_or_else(|e| panic!("{}: {e}\n{text}", file.display()));
        assert_eq!(
            info.to_text(&store),
            text,
            "{path}: narinfo does not print back"
        );

        let json = fx.path_info(path);
        assert_eq!(
            info.nar_hash.to_sri(),
            json["narHash"].as_str().unwrap(),
            "{path}"
        );
        assert_eq!(info.nar_size, json["narSize"].as_u64().unwrap(), "{path}");
        let refs: Vec<String> = info
            .references
            .iter()
            .map(|r| store.print_path(r))
            .collect();
        assert_eq!(
            serde_json::to_value(&refs).unwrap(),
            json["references"],
            "{path}"
        );
        assert_eq!(
            info.deriver.as_ref().map(|d| store.print_path(d)),
            json["deriver"].as_str().map(str::to_owned),
            "{path}"
        );
        assert_eq!(
            info.ca.as_ref().map(ToString::to_string),
            json["ca"].as_str().map(str::to_owned),
            "{path}"
        );
        assert_eq!(info.fingerprint(&store).unwrap(), fx.fingerprint(path));

        if *path == fx.output {
            assert!(info.signatures.is_empty(), "{path}: {text}");
            assert_eq!(info.references.len(), 3, "two files and itself: {text}");
            assert!(info.deriver.is_some(), "{text}");
            output_info = Some((file, info));
        } else {
            assert_eq!(
                info.count_valid_signatures(&store, &nix_trusted).unwrap(),
                1,
                "{text}"
            );
            assert!(
                info.ca.is_some(),
                "text files are content-addressed: {text}"
            );
        }
    }

    // The output is input-addressed and unsigned: Nix does not trust it.
    let (file, mut info) = output_info.unwrap();
    let kiln_key = SecretKey::generate("kiln-cache-1").unwrap();
    let verify = |trusted: &str| {
        fx.store.nix([
            "store",
            "verify",
            "--store",
            &cache_url,
            "--no-contents",
            "--trusted-public-keys",
            trusted,
            &fx.output,
        ])
    };
    let untrusted = verify(&kiln_key.to_public().to_string());
    assert!(
        untrusted.is_err(),
        "Nix trusted an unsigned path: {untrusted:?}"
    );

    // Signed by Kiln, it is trusted with Kiln's public key and no other.
    info.sign(&store, &kiln_key).unwrap();
    fs::write(&file, info.to_text(&store)).unwrap();
    verify(&kiln_key.to_public().to_string()).unwrap_or_else(|e| {
        panic!(
            "Nix refused Kiln's signature: {e}\n{}",
            info.to_text(&store)
        )
    });
    let other = SecretKey::generate("kiln-cache-1").unwrap();
    assert!(
        verify(&other.to_public().to_string()).is_err(),
        "Nix accepted Kiln's signature with the wrong public key"
    );
}
