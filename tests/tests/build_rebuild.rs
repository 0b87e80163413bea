//! `kiln build --check` (a non-deterministic builder is reported with
//! Nix's exit code 104, a deterministic one passes), `--repair` (a
//! corrupted output is built again and passes Nix 2.8's own content check),
//! and a JSON derivation as printed by Nix 2.8's `nix show-derivation`
//! built to the output path Nix gives it.

use std::process::{Command, Output};

use kiln_e2e::{NixStore, host_sandbox_paths, kiln_bin};

fn kiln(store: &str, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .args(["build", "--store", store, "--no-out-link"])
        .args(["--option", "sandbox-paths", &host_sandbox_paths()])
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const GRAPH: &str = r#"{
  same = derivation { name = "check-same"; builder = "/bin/sh";
    args = [ "-c" "echo same > $out" ]; system = builtins.currentSystem; };
  differs = derivation { name = "check-differs"; builder = "/bin/sh";
    args = [ "-c" "read -r n < /proc/sys/kernel/random/uuid; echo $n > $out" ];
    system = builtins.currentSystem; };
}
"#;

#[test]
fn check_reports_non_determinism_and_repair_rebuilds() {
    let nix = NixStore::new();
    let file = nix.root().parent().unwrap().join("graph.nix");
    std::fs::write(&file, GRAPH).unwrap();
    let drvs = nix.instantiate(&file).unwrap();
    let find = |name: &str| drvs.iter().find(|d| d.ends_with(name)).unwrap().clone();
    let (same, differs) = (find("-check-same.drv"), find("-check-differs.drv"));
    let root = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", root.path().display());
    let (same_file, differs_file) = (nix.physical(&same), nix.physical(&differs));
    let first = kiln(
        &store,
        &[same_file.to_str().unwrap(), differs_file.to_str().unwrap()],
    );
    assert!(first.status.success(), "{}", text(&first));

    let ok = kiln(&store, &["--check", &same]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "--check of a deterministic build: {}",
        text(&ok)
    );
    let bad = kiln(&store, &["--check", "--json", &differs]);
    assert_eq!(
        bad.status.code(),
        Some(104),
        "--check of a random output: {}",
        text(&bad)
    );
    assert!(text(&bad).contains("NotDeterministic"), "{}", text(&bad));

    // Corrupt the output behind the store's back, then repair it.
    let out = String::from_utf8(first.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with("-check-same"))
        .unwrap()
        .to_owned();
    let real = root.path().join(out.trim_start_matches('/'));
    let mut perms = std::fs::metadata(&real).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&real, perms).unwrap();
    std::fs::write(&real, "corrupt\n").unwrap();
    assert!(
        nix.nix_store(["--store", &store, "--verify", "--check-contents"])
            .is_err(),
        "Nix 2.8 did not notice the corruption"
    );
    let repaired = kiln(&store, &["--repair", &same]);
    assert!(repaired.status.success(), "{}", text(&repaired));
    assert_eq!(std::fs::read_to_string(&real).unwrap(), "same\n");
    nix.nix_store(["--store", &store, "--verify", "--check-contents"])
        .unwrap();
}

#[test]
fn json_derivation_builds_to_nixs_output_path() {
    let nix = NixStore::new();
    let file = nix.root().parent().unwrap().join("graph.nix");
    std::fs::write(&file, GRAPH).unwrap();
    let drvs = nix.instantiate(&file).unwrap();
    let same = drvs
        .iter()
        .find(|d| d.ends_with("-check-same.drv"))
        .unwrap();
    let json = nix.nix(["show-derivation", same.as_str()]).unwrap();
    let json_file = nix.root().parent().unwrap().join("same.json");
    std::fs::write(&json_file, json).unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = format!("local?root={}", root.path().display());
    let built = kiln(&store, &[json_file.to_str().unwrap()]);
    assert!(built.status.success(), "{}", text(&built));
    let expected = nix
        .nix_store(["--query", "--outputs", same.as_str()])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&built.stdout).trim(),
        expected.trim(),
        "kiln build of Nix's JSON form"
    );
}
