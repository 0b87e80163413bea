//! Kiln's local store and Nix 2.8 share stores in both directions.
//!
//! - Nix reads a store Kiln made (`--store local?root=DIR`): the same paths,
//!   references, referrers, derivers and NAR hashes as Kiln reports (and as
//!   the Nix store the paths came from), `nix path-info --json` equal to
//!   `kiln store path-info --json`, `nix-store --verify --check-contents`
//!   clean, the database schema identical to the one Nix creates, and Nix
//!   can keep adding to it.
//! - Kiln reads a store Nix made: the same JSON, references and referrers,
//!   a clean `kiln store verify --check-contents`, and an export that Nix
//!   imports into a third store.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_e2e::NixStore;

/// Runs `kiln store --store URL ARGS…` with `stdin`; its stdout.
fn kiln(url: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new(kiln_e2e::kiln_bin())
        .arg("store")
        .arg("--store")
        .arg(url)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run kiln");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "kiln store {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn kiln_text(url: &str, args: &[&str]) -> String {
    String::from_utf8(kiln(url, args, b"")).unwrap()
}

fn lines(s: &str) -> BTreeSet<String> {
    s.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// A Nix store with added files, instantiated corpus derivations and some
/// built outputs that refer to each other.
fn populated_nix_store() -> (NixStore, Vec<String>) {
    let nix = NixStore::new();
    let src = nix.root().parent().unwrap().join("src");
    std::fs::create_dir_all(src.join("tree/sub")).unwrap();
    std::fs::write(src.join("tree/sub/file"), b"contents\n").unwrap();
    std::fs::write(src.join("single"), b"single file\n").unwrap();
    let mut paths = Vec::new();
    let added = nix
        .nix_store([
            "--add".as_ref(),
            src.join("tree").as_os_str(),
            src.join("single").as_os_str(),
        ])
        .unwrap();
    paths.extend(added.lines().map(str::to_owned));
    let corpus = kiln_e2e::corpus::corpus_dir();
    let built = nix
        .nix_build([
            "--no-out-link".as_ref(),
            corpus.join("allowed-references.nix").as_os_str(),
        ])
        .expect("nix-build of a corpus file");
    paths.extend(built.lines().map(str::to_owned));
    // A few corpus files give derivations with input derivations and sources.
    for file in [
        "allowed-references.nix",
        "deps-deep-chain.nix",
        "builtins-path.nix",
        "args-many.nix",
    ] {
        let drvs = nix
            .instantiate(corpus.join(file))
            .unwrap_or_else(|e| panic!("instantiating {file}: {e:?}"));
        paths.extend(drvs);
    }
    (nix, paths)
}

fn closure(nix: &NixStore, paths: &[String]) -> Vec<String> {
    let mut args = vec!["-qR".to_owned()];
    args.extend(paths.iter().cloned());
    nix.nix_store(&args)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every seventh path, and the first and last: enough variety for the
/// per-path queries without one process per path and query.
fn sample(all: &[String]) -> Vec<&String> {
    all.iter()
        .enumerate()
        .filter(|(i, _)| i % 7 == 0 || *i + 1 == all.len())
        .map(|(_, p)| p)
        .collect()
}

fn schema(db: &Path) -> BTreeSet<String> {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("select sql from sqlite_master where sql is not null")
        .output()
        .expect(
            "the sqlite3 command-line shell is needed to compare schemas (apt-get install sqlite3)",
        );
    assert!(out.status.success());
    lines(
        &String::from_utf8_lossy(&out.stdout)
            .replace("\n    ", " ")
            .replace("\n  ", " "),
    )
}

#[test]
fn nix_reads_a_store_kiln_made() {
    let (source, paths) = populated_nix_store();
    let all = closure(&source, &paths);
    let mut export_args = vec!["--export".to_owned()];
    export_args.extend(all.iter().cloned());
    let export = source.run_bytes("nix-store", &export_args, b"").unwrap();

    // Kiln's store: created by Kiln on first use, filled by import and add.
    let kiln_store = NixStore::new();
    let url = kiln_store.url();
    let imported = lines(&String::from_utf8(kiln(&url, &["import"], &export)).unwrap());
    assert_eq!(
        imported,
        all.iter().cloned().collect::<BTreeSet<_>>(),
        "kiln import lists what was exported"
    );
    let scratch = tempfile::tempdir().unwrap();
    std::fs::create_dir(scratch.path().join("dir")).unwrap();
    std::fs::write(scratch.path().join("dir/x"), b"x").unwrap();
    std::fs::write(scratch.path().join("flat"), b"flat").unwrap();
    let added = kiln_text(&url, &["add", scratch.path().join("dir").to_str().unwrap()]);
    let flat = kiln_text(
        &url,
        &[
            "add",
            "--flat",
            "--hash-algo",
            "sha1",
            scratch.path().join("flat").to_str().unwrap(),
        ],
    );
    // The same path Nix computes for the same content.
    let nix_flat = kiln_store
        .nix_store([
            "--add-fixed",
            "sha1",
            scratch.path().join("flat").to_str().unwrap(),
        ])
        .unwrap();
    assert_eq!(
        flat.trim(),
        nix_flat.trim(),
        "flat sha1 path agrees with nix-store --add-fixed"
    );
    let nix_dir = kiln_store
        .nix_store(["--add", scratch.path().join("dir").to_str().unwrap()])
        .unwrap();
    assert_eq!(
        added.trim(),
        nix_dir.trim(),
        "recursive path agrees with nix-store --add"
    );

    // Schema: identical to a store Nix created.
    let kiln_db = kiln_store.state_dir().join("db/db.sqlite");
    let nix_db = source.state_dir().join("db/db.sqlite");
    let theirs = schema(&nix_db);
    let ours = schema(&kiln_db);
    assert!(
        theirs.is_subset(&ours),
        "Kiln's schema lacks Nix's: {:?}",
        theirs.difference(&ours).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read_to_string(kiln_store.state_dir().join("db/schema"))
            .unwrap()
            .trim(),
        "10"
    );

    // nix path-info --json (Nix reading Kiln's store) == kiln store path-info --json.
    let nix_json = json(&kiln_store.nix(["path-info", "--json", "--all"]).unwrap());
    let kiln_json = json(&kiln_text(&url, &["path-info", "--json", "--all"]));
    assert_eq!(
        nix_json, kiln_json,
        "path-info --json differs between Nix and Kiln on Kiln's store"
    );
    let with_sizes = json(
        &kiln_store
            .nix(["path-info", "--json", "-S", "-r", &all[all.len() - 1]])
            .unwrap(),
    );
    assert_eq!(
        with_sizes,
        json(&kiln_text(
            &url,
            &["path-info", "--json", "-S", "-r", &all[all.len() - 1]]
        ))
    );

    // References, derivers, hashes and sizes as in the store they came from
    // (`--dump-db` prints all of them for every path at once).
    let mut dump = vec!["--dump-db".to_owned()];
    dump.extend(all.iter().cloned());
    assert_eq!(
        source.nix_store(&dump).unwrap(),
        kiln_store.nix_store(&dump).unwrap(),
        "nix-store --dump-db differs between the source store and Kiln's"
    );
    for p in sample(&all) {
        for q in ["--referrers", "--deriver"] {
            let there = source.nix_store(["-q", q, p]).unwrap();
            let here = kiln_store.nix_store(["-q", q, p]).unwrap();
            assert_eq!(lines(&there), lines(&here), "nix-store -q {q} {p}");
        }
        assert_eq!(
            lines(&kiln_text(&url, &["references", p])),
            lines(&kiln_store.nix_store(["-q", "--references", p]).unwrap()),
            "kiln references {p}"
        );
        assert_eq!(
            lines(&kiln_text(&url, &["referrers", p])),
            lines(&kiln_store.nix_store(["-q", "--referrers", p]).unwrap()),
            "kiln referrers {p}"
        );
    }
    let kiln_req = kiln_text(&url, &["requisites", &paths[paths.len() - 1]]);
    assert_eq!(
        lines(&kiln_req),
        lines(
            &kiln_store
                .nix_store(["-qR", &paths[paths.len() - 1]])
                .unwrap()
        )
    );

    // Nix finds nothing wrong with Kiln's store.
    let mut verify = kiln_store.command("nix-store");
    verify.args(["--verify", "--check-contents"]);
    let out = verify.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nix-store --verify --check-contents on Kiln's store failed: {stderr}"
    );
    assert!(
        !stderr.contains("modified") && !stderr.contains("error"),
        "nix-store --verify complained: {stderr}"
    );
    // And Kiln agrees with itself.
    kiln(&url, &["verify", "--check-contents"], b"");
}

#[test]
fn kiln_reads_a_store_nix_made() {
    let (nix, paths) = populated_nix_store();
    let url = nix.url();
    let nix_json = json(&nix.nix(["path-info", "--json", "--all"]).unwrap());
    let kiln_json = json(&kiln_text(&url, &["path-info", "--json", "--all"]));
    assert_eq!(
        nix_json, kiln_json,
        "path-info --json differs between Nix and Kiln on Nix's store"
    );
    let all = closure(&nix, &paths);
    for p in sample(&all) {
        assert_eq!(
            lines(&kiln_text(&url, &["references", p])),
            lines(&nix.nix_store(["-q", "--references", p]).unwrap()),
            "references of {p}"
        );
        assert_eq!(
            lines(&kiln_text(&url, &["referrers", p])),
            lines(&nix.nix_store(["-q", "--referrers", p]).unwrap()),
            "referrers of {p}"
        );
    }
    kiln(&url, &["verify", "--check-contents"], b"");

    // Kiln's export of Nix's paths imports into a third store, with Nix.
    let mut args = vec!["export", "-r"];
    args.extend(paths.iter().map(String::as_str));
    let export = kiln(&url, &args, b"");
    let third = NixStore::new();
    let imported = third
        .run_bytes("nix-store", ["--import"], &export)
        .expect("nix-store --import of kiln's export");
    assert_eq!(
        lines(&String::from_utf8(imported).unwrap()),
        all.iter().cloned().collect::<BTreeSet<_>>()
    );
    let mut dump = vec!["--dump-db".to_owned()];
    dump.extend(all.iter().cloned());
    assert_eq!(
        nix.nix_store(&dump).unwrap(),
        third.nix_store(&dump).unwrap(),
        "metadata after the round trip through Kiln's export"
    );
    let mut verify = third.command("nix-store");
    verify.args(["--verify", "--check-contents"]);
    assert!(verify.status().unwrap().success());
}
