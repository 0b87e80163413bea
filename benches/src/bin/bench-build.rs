//! `cargo xtask bench build`: trivial sandboxed builds, Kiln beside
//! `nix-build` of Nix 2.8 on the same derivations, in the same run.
//!
//! - wide: 1,000 independent derivations plus one that depends on all of
//!   them, with two jobs (`-j2`);
//! - deep: a chain of 300 derivations, each depending on the previous one.
//!
//! Nix instantiates the graphs into a throwaway chroot store (where Nix 2.8
//! always builds in its sandbox); Kiln imports the same `.drv` files into a
//! store of its own first (untimed, with `--dry-run`), so both time only
//! the builds. A seed in every derivation makes each run build afresh.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::NixStore;

fn deep_nix(seed: u64, n: usize) -> String {
    format!(
        r#"let
  step = prev: i: derivation {{
    name = "deep-${{toString i}}";
    builder = "/bin/sh";
    args = [ "-c" "echo {seed} $prev > $out" ];
    prev = prev;
    system = builtins.currentSystem;
  }};
in builtins.foldl' step "" (builtins.genList (i: i) {n})
"#
    )
}

fn sandbox_paths(nix: &NixStore) -> String {
    let conf = std::fs::read_to_string(nix.conf_dir().join("nix.conf")).unwrap();
    conf.lines()
        .find_map(|l| l.strip_prefix("sandbox-paths = "))
        .expect("the test store's nix.conf sets sandbox-paths")
        .to_owned()
}

struct Case {
    name: &'static str,
    count: usize,
    expr: String,
}

fn time_nix(nix: &NixStore, drv: &str) -> Duration {
    let started = Instant::now();
    let out = nix
        .command("nix-build")
        .args(["--no-out-link", "-j2", "--quiet", drv])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "nix-build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn time_kiln(kiln: &Path, store: &str, sandbox: &str, drv_file: &Path) -> Duration {
    let run = |extra: &[&str]| {
        let started = Instant::now();
        let out = Command::new(kiln)
            .args(["build", "--store", store, "--no-out-link", "-j2", "-Q"])
            .args(["--option", "sandbox-paths", sandbox])
            .args(extra)
            .arg(drv_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kiln build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    };
    run(&["--dry-run"]); // imports the .drv closure, builds nothing
    run(&[])
}

fn main() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let kiln = kiln_benches::profile_bin("kiln", "kiln");
    let cases = [
        Case {
            name: "wide (1,000 + 1, -j2)",
            count: 1001,
            expr: kiln_benches::wide_nix(seed, 1000),
        },
        Case {
            name: "deep (chain of 300)",
            count: 300,
            expr: deep_nix(seed, 300),
        },
    ];
    println!("build: trivial sandboxed derivations, Kiln vs nix-build (Nix 2.8), same run");
    for case in cases {
        let nix = NixStore::new();
        let sandbox = sandbox_paths(&nix);
        let file = nix.root().parent().unwrap().join("graph.nix");
        std::fs::write(&file, &case.expr).unwrap();
        let drv = nix.instantiate(&file).unwrap().remove(0);
        let kiln_root = tempfile::tempdir().unwrap();
        let store = format!("local?root={}", kiln_root.path().display());
        let kiln_time = time_kiln(&kiln, &store, &sandbox, &nix.physical(&drv));
        let nix_time = time_nix(&nix, &drv);
        let per = |d: Duration| d.as_secs_f64() * 1e3 / case.count as f64;
        println!(
            "  {:<24} kiln {:8.2} s ({:6.2} ms/drv)   nix-build {:8.2} s ({:6.2} ms/drv)   kiln is {:.1}x faster",
            case.name,
            kiln_time.as_secs_f64(),
            per(kiln_time),
            nix_time.as_secs_f64(),
            per(nix_time),
            nix_time.as_secs_f64() / kiln_time.as_secs_f64()
        );
    }
}
