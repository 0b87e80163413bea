//! `kiln build` against Nix 2.8's `nix-build` on the whole corpus.
//!
//! Every corpus file is instantiated by Nix into a throwaway store and built
//! there by `nix-build`; Kiln imports the same `.drv` files (with their
//! closure) from that store into a store of its own and builds them. Per
//! file, both must exit with the same code (100, 101, 102, 1 … for the
//! `fail-*` files), and per output path, both must agree on whether it was
//! built, its NAR hash and its references. Kiln's store is read back with
//! Nix's own `nix-store`, so the database and the logs are checked too.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use kiln_e2e::{NixStore, corpus, host_sandbox_paths, kiln_bin};

/// The limits the corpus's `fail-*` files are written against (see
/// `tests/corpus/README.md`).
const LIMITS: &[&str] = &[
    "--option",
    "timeout",
    "3",
    "--option",
    "max-silent-time",
    "2",
    "--option",
    "max-build-log-size",
    "100000",
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What a store says about one output path: `None` when it is not valid.
fn path_facts(nix: &NixStore, store_url: &str, path: &str) -> Option<(String, String)> {
    let query = |what: &str| {
        let out = nix
            .command("nix-store")
            .args(["--store", store_url, "--query", what, path])
            .output()
            .unwrap();
        out.status.success().then(|| text(&out.stdout))
    };
    Some((query("--hash")?, query("--references")?))
}

#[test]
fn corpus_builds_as_with_nix() {
    let nix = NixStore::new();
    let kiln = kiln_bin();
    let kiln_root = tempfile::tempdir().unwrap();
    let kiln_url = format!("local?root={}", kiln_root.path().display());
    let sandbox = host_sandbox_paths();

    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, drv) in corpus::instantiate_corpus(&nix) {
        by_file.entry(name).or_default().push(drv);
    }
    assert!(
        by_file.len() >= 80,
        "the corpus shrank to {} files",
        by_file.len()
    );

    let mut problems = Vec::new();
    let mut failing_files = 0;
    for (name, drvs) in &by_file {
        let nix_run: Output = nix
            .command("nix-build")
            .args(["--no-out-link", "--keep-going"])
            .args(LIMITS)
            .args(drvs)
            .output()
            .unwrap();
        let kiln_run: Output = Command::new(&kiln)
            .args([
                "build",
                "--store",
                &kiln_url,
                "--no-out-link",
                "--keep-going",
            ])
            .args(["--option", "sandbox-paths", &sandbox])
            .args(LIMITS)
            .args(drvs.iter().map(|d| nix.physical(d)))
            .output()
            .unwrap();
        let (nix_code, kiln_code) = (nix_run.status.code(), kiln_run.status.code());
        if corpus::is_expected_failure(name) {
            failing_files += 1;
            if nix_code == Some(0) {
                problems.push(format!("{name}: Nix built a fail-* file"));
            }
        }
        if nix_code != kiln_code {
            problems.push(format!(
                "{name}: exit code {kiln_code:?} from kiln, {nix_code:?} from nix-build\n--- kiln ---\n{}--- nix ---\n{}",
                text(&kiln_run.stderr),
                text(&nix_run.stderr)
            ));
            continue;
        }
        // Kiln prints the output paths of what it built, one per line, as nix-build does.
        let mut kiln_printed: Vec<String> =
            text(&kiln_run.stdout).lines().map(str::to_owned).collect();
        let mut nix_printed: Vec<String> =
            text(&nix_run.stdout).lines().map(str::to_owned).collect();
        kiln_printed.sort();
        nix_printed.sort();
        if kiln_printed != nix_printed {
            problems.push(format!(
                "{name}: kiln printed {kiln_printed:?}, nix-build printed {nix_printed:?}"
            ));
        }
        let closure = nix.drv_closure(drvs).unwrap();
        for drv in closure {
            let outputs = nix.nix_store(["--query", "--outputs", &drv]).unwrap();
            for out in outputs.lines() {
                let theirs = path_facts(&nix, &nix.url(), out);
                let ours = path_facts(&nix, &kiln_url, out);
                if theirs != ours {
                    problems.push(format!(
                        "{name}: output {out}: kiln has {ours:?}, Nix has {theirs:?}"
                    ));
                }
            }
        }
    }
    assert!(failing_files >= 8, "only {failing_files} fail-* files");
    // Nix's own tools read Kiln's store: its database and the logs.
    let verify = nix
        .command("nix-store")
        .args(["--store", &kiln_url, "--verify", "--check-contents"])
        .output()
        .unwrap();
    if !verify.status.success()
        || !verify.stderr.is_empty() && text(&verify.stderr).contains("error")
    {
        problems.push(format!(
            "nix-store --verify on Kiln's store: {}",
            text(&verify.stderr)
        ));
    }
    let simple = &by_file["simple"][0];
    let log = nix
        .command("nix-store")
        .args(["--store", &kiln_url, "--read-log", simple])
        .output()
        .unwrap();
    if !log.status.success() {
        problems.push(format!(
            "nix-store -l cannot read Kiln's log of {simple}: {}",
            text(&log.stderr)
        ));
    }
    assert!(
        problems.is_empty(),
        "{} differences between kiln build and nix-build:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}
