//! `kiln build` substituting from real `file://` binary caches instead of
//! building: one written by Nix 2.8 (`nix copy --to file://…?secret-key=…`)
//! and one written by Kiln (`kiln store copy --to …`). A path comes from a
//! cache only with a signature by a trusted key; `allowSubstitutes = false`
//! builds even when the cache has the output; `--dry-run` says what would be
//! fetched and fetches nothing. Substituted outputs are checked against the
//! peer's own store (NAR hash and references).

use std::path::Path;
use std::process::{Command, Output};

use kiln_e2e::{NixStore, host_sandbox_paths, kiln_bin};

fn graph(seed: u64) -> String {
    format!(
        r#"let
  dep = derivation {{ name = "subst-dep"; builder = "/bin/sh";
    args = [ "-c" "echo dep {seed} > $out" ]; system = builtins.currentSystem; }};
in {{
  top = derivation {{ name = "subst-top"; builder = "/bin/sh";
    args = [ "-c" "echo top {seed} $dep > $out" ]; inherit dep; system = builtins.currentSystem; }};
  local = derivation {{ name = "subst-local"; builder = "/bin/sh";
    args = [ "-c" "echo local {seed} > $out" ]; allowSubstitutes = false;
    system = builtins.currentSystem; }};
}}
"#
    )
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A Nix store with the graph built and copied, signed, to a `file://`
/// cache: the store, the cache URL, the public key, the `.drv` paths of
/// `top` and `local`.
struct Fixture {
    nix: NixStore,
    cache: String,
    public_key: String,
    /// A key of the same name that signed nothing.
    other_key: String,
    top: String,
    local: String,
}

fn nix_fixture() -> Fixture {
    let nix = NixStore::new();
    let dir = nix.root().parent().unwrap().to_owned();
    let file = dir.join("graph.nix");
    std::fs::write(&file, graph(seed())).unwrap();
    let drvs = nix.instantiate(&file).unwrap();
    let find = |name: &str| drvs.iter().find(|d| d.ends_with(name)).unwrap().clone();
    let (local, top) = (find("-subst-local.drv"), find("-subst-top.drv"));
    let outs = nix
        .nix_build([top.as_str(), local.as_str(), "--no-out-link"])
        .unwrap();
    let key_pair = |name: &str| {
        let (sk, pk) = (
            dir.join(format!("{name}.sk")),
            dir.join(format!("{name}.pk")),
        );
        nix.nix_store([
            "--generate-binary-cache-key".as_ref(),
            "nix-test-cache-1".as_ref(),
            sk.as_os_str(),
            pk.as_os_str(),
        ])
        .unwrap();
        let public = std::fs::read_to_string(&pk).unwrap().trim().to_owned();
        (sk, public)
    };
    let (sk, public_key) = key_pair("signer");
    let (_, other_key) = key_pair("other");
    let cache = format!("file://{}", dir.join("cache").display());
    let mut copy = vec!["copy".to_owned(), "--to".to_owned()];
    copy.push(format!("{cache}?secret-key={}", sk.display()));
    copy.extend(outs.split_whitespace().map(str::to_owned));
    nix.nix(&copy).unwrap();
    Fixture {
        public_key,
        other_key,
        nix,
        cache,
        top,
        local,
    }
}

fn kiln_build(store: &str, fixture: &Fixture, trusted: &str, extra: &[&str], drv: &Path) -> Output {
    Command::new(kiln_bin())
        .args(["build", "--store", store, "--no-out-link", "--json"])
        .args(["--option", "substituters", &fixture.cache])
        .args(["--option", "trusted-public-keys", trusted])
        .args(["--option", "sandbox-paths", &host_sandbox_paths()])
        .args(extra)
        .arg(drv)
        .output()
        .unwrap()
}

/// The status `kiln build --json` gives the (one) target.
fn status(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kiln build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kiln build --json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    v["targets"][0]["status"].as_str().unwrap().to_owned()
}

/// `nix-store --query what path` in the store at `url`.
fn query(nix: &NixStore, url: &str, what: &str, path: &str) -> String {
    nix.nix_store(["--store", url, "--query", what, path])
        .unwrap()
        .trim()
        .to_owned()
}

fn output_of(nix: &NixStore, drv: &str) -> String {
    query(nix, &nix.url(), "--outputs", drv)
}

#[test]
fn substitutes_from_a_cache_written_by_nix() {
    let f = nix_fixture();
    let kiln_root = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", kiln_root.path().display());
    let top_file = f.nix.physical(&f.top);

    let dry = kiln_build(&store, &f, &f.public_key, &["--dry-run"], &top_file);
    let dry_json: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    let top_out = output_of(&f.nix, &f.top);
    let dep_out = query(&f.nix, &f.nix.url(), "--references", &top_out);
    let mut fetch: Vec<String> = dry_json["willSubstitute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    fetch.sort();
    let mut expected = vec![top_out.clone(), dep_out.clone()];
    expected.sort();
    assert_eq!(fetch, expected, "--dry-run: {dry_json}");
    assert_eq!(dry_json["willBuild"], serde_json::json!([]));
    let valid = |p: &str| {
        f.nix
            .nix_store(["--store", &store, "--check-validity", p])
            .is_ok()
    };
    assert!(!valid(&top_out), "--dry-run fetched '{top_out}'");

    let built = kiln_build(&store, &f, &f.public_key, &[], &top_file);
    assert_eq!(status(&built), "Substituted");
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(
        !stderr.contains("building '"),
        "a substituted target was built:\n{stderr}"
    );
    for path in [&top_out, &dep_out] {
        for what in ["--hash", "--references", "--size"] {
            assert_eq!(
                query(&f.nix, &store, what, path),
                query(&f.nix, &f.nix.url(), what, path),
                "{what} of '{path}' in Kiln's store and in Nix's"
            );
        }
    }
    // The substituted closure is whole and correct by Nix 2.8's own check.
    f.nix
        .nix_store(["--store", &store, "--verify", "--check-contents"])
        .unwrap();

    // allowSubstitutes = false: built, though the cache has the output.
    let local = kiln_build(&store, &f, &f.public_key, &[], &f.nix.physical(&f.local));
    assert_eq!(status(&local), "Built");
}

#[test]
fn untrusted_signatures_are_built_instead() {
    let f = nix_fixture();
    let kiln_root = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", kiln_root.path().display());
    let out = kiln_build(&store, &f, &f.other_key, &[], &f.nix.physical(&f.top));
    assert_eq!(status(&out), "Built");
    let top_out = output_of(&f.nix, &f.top);
    assert_eq!(
        query(&f.nix, &store, "--hash", &top_out),
        query(&f.nix, &f.nix.url(), "--hash", &top_out),
        "the local build of a deterministic derivation differs from Nix's"
    );
    // Nothing at all trusted: the same.
    let kiln_root = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", kiln_root.path().display());
    let out = kiln_build(&store, &f, "", &[], &f.nix.physical(&f.top));
    assert_eq!(status(&out), "Built");
}

#[test]
fn substitutes_from_a_cache_written_by_kiln() {
    let f = nix_fixture();
    let dir = tempfile::tempdir().unwrap();
    let first = format!("local?root={}", dir.path().join("first").display());
    // Built by Kiln, without substituters.
    let built = Command::new(kiln_bin())
        .args(["build", "--store", &first, "--no-out-link", "--json"])
        .args(["--option", "sandbox-paths", &host_sandbox_paths()])
        .arg(f.nix.physical(&f.top))
        .output()
        .unwrap();
    assert_eq!(status(&built), "Built");
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    let keygen = Command::new(kiln_bin())
        .args([
            "store",
            "--store",
            &first,
            "generate-key",
            "kiln-test-cache-1",
        ])
        .args([&sk, &pk])
        .output()
        .unwrap();
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stderr)
    );
    let cache_dir = dir.path().join("kiln-cache");
    let top_out = output_of(&f.nix, &f.top);
    let copy = Command::new(kiln_bin())
        .args(["store", "--store", &first, "copy", "--to"])
        .arg(format!(
            "file://{}?secret-key={}",
            cache_dir.display(),
            sk.display()
        ))
        .arg(&top_out)
        .output()
        .unwrap();
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );

    let kiln_cache = Fixture {
        cache: format!("file://{}", cache_dir.display()),
        public_key: std::fs::read_to_string(&pk).unwrap().trim().to_owned(),
        ..f
    };
    let second = format!("local?root={}", dir.path().join("second").display());
    let out = kiln_build(
        &second,
        &kiln_cache,
        &kiln_cache.public_key,
        &[],
        &kiln_cache.nix.physical(&kiln_cache.top),
    );
    assert_eq!(status(&out), "Substituted");
    assert_eq!(
        query(&kiln_cache.nix, &second, "--hash", &top_out),
        query(&kiln_cache.nix, &kiln_cache.nix.url(), "--hash", &top_out)
    );
    // Nix's key does not vouch for Kiln's cache.
    let third = format!("local?root={}", dir.path().join("third").display());
    let nix_key = Fixture {
        public_key: kiln_cache.other_key.clone(),
        ..kiln_cache
    };
    let out = kiln_build(
        &third,
        &nix_key,
        &nix_key.public_key,
        &[],
        &nix_key.nix.physical(&nix_key.top),
    );
    assert_eq!(status(&out), "Built");
}
