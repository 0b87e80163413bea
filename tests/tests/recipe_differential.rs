//! Kiln recipes against Nix 2.8: a recipe with fixed-output packages (flat
//! and recursive, SRI and `algo:` hashes, one with inputs), ordinary
//! packages depending on them and on a source, and one with two outputs,
//! written again in the Nix language. `nix-instantiate` into a throwaway
//! store and `kiln build --dry-run` of the recipe give the same `.drv` paths
//! (so the same files and the same output paths); Kiln then builds the
//! recipe, and its fixed outputs verify against their declared hashes.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use kiln_e2e::{NixStore, kiln_bin};
use kiln_formats::hash::{Hash, HashAlgo};

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `nix-hash --type sha256 --base32` of `file`: the NAR hash Nix expects in
/// a recursive fixed output, computed by the peer rather than by Kiln.
fn nar_hash(nix: &NixStore, file: &Path) -> String {
    let out = nix
        .run(
            "nix-hash",
            [
                "--type".as_ref(),
                "sha256".as_ref(),
                "--base32".as_ref(),
                file.as_os_str(),
            ],
        )
        .unwrap_or_else(|e| panic!("nix-hash {}: {e}", file.display()));
    format!("sha256:{}", out.trim())
}

#[test]
fn recipe_with_fixed_outputs_instantiates_as_nix_does() {
    let nix = NixStore::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("project");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/hello.c"), "int main() { return 0; }\n").unwrap();
    std::fs::write(tmp.path().join("tarball"), "tarball\n").unwrap();
    let recursive = nar_hash(&nix, &tmp.path().join("tarball"));
    let flat = Hash::digest(HashAlgo::Sha512, "patch\n").to_sri();

    let recipe = format!(
        r#"[sources]
src = "src"

[packages.tarball]
builder = "/bin/sh"
args = ["-c", "echo tarball > $out"]
hash = "{recursive}"

[packages.patch]
builder = "/bin/sh"
args = ["-c", "echo patch > $out"]
inputs = ["src"]
env = {{ X = "from ${{src}}" }}
hash = "{flat}"
hash-mode = "flat"

[packages.app]
builder = "/bin/sh"
args = ["-c", "read a < ${{tarball}}; read b < ${{patch}}; echo $a $b > $out"]
inputs = ["src", "tarball", "patch"]
env = {{ GREETING = "hi ${{patch}}" }}

[packages.multi]
builder = "/bin/sh"
args = ["-c", "read a < $app; echo $a > $out; echo dev > $dev"]
inputs = ["app"]
outputs = ["out", "dev"]
"#
    );
    let nix_expr = format!(
        r#"let
  system = builtins.currentSystem;
  src = builtins.path {{ path = ./src; name = "src"; }};
  tarball = derivation {{
    name = "tarball"; inherit system; builder = "/bin/sh";
    args = [ "-c" "echo tarball > $out" ];
    outputHash = "{recursive}"; outputHashAlgo = "sha256"; outputHashMode = "recursive";
  }};
  patch = derivation {{
    name = "patch"; inherit system; builder = "/bin/sh";
    args = [ "-c" "echo patch > $out" ];
    src = "${{src}}"; X = "from ${{src}}";
    outputHash = "{flat}"; outputHashAlgo = "sha512"; outputHashMode = "flat";
  }};
  app = derivation {{
    name = "app"; inherit system; builder = "/bin/sh";
    args = [ "-c" "read a < ${{tarball}}; read b < ${{patch}}; echo $a $b > $out" ];
    src = "${{src}}"; tarball = "${{tarball}}"; patch = "${{patch}}";
    GREETING = "hi ${{patch}}";
  }};
  multi = derivation {{
    name = "multi"; inherit system; builder = "/bin/sh";
    args = [ "-c" "read a < $app; echo $a > $out; echo dev > $dev" ];
    app = "${{app}}"; outputs = [ "out" "dev" ];
  }};
in {{ inherit tarball patch app multi; }}
"#
    );
    std::fs::write(dir.join("kiln.toml"), &recipe).unwrap();
    std::fs::write(dir.join("default.nix"), &nix_expr).unwrap();

    let from_nix: BTreeSet<String> = nix
        .instantiate(dir.join("default.nix"))
        .unwrap_or_else(|e| panic!("nix-instantiate: {e}"))
        .into_iter()
        .collect();
    assert_eq!(from_nix.len(), 4, "{from_nix:?}");

    let kiln_root = tmp.path().join("kiln");
    let kiln_url = format!("local?root={}", kiln_root.display());
    let dry = Command::new(kiln_bin())
        .args(["build", "--store", &kiln_url, "--dry-run", "--json"])
        .arg(dir.join("kiln.toml"))
        .output()
        .unwrap();
    assert!(
        dry.status.success(),
        "kiln build --dry-run: {}",
        describe(&dry)
    );
    let report: serde_json::Value = serde_json::from_slice(&dry.stdout)
        .unwrap_or_else(|e| panic!("kiln's --json is not JSON ({e}): {}", describe(&dry)));
    let from_kiln: BTreeSet<String> = report["willBuild"]
        .as_array()
        .expect("willBuild is a list")
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        from_kiln, from_nix,
        "the recipe and the same packages in Nix give different derivations"
    );
    for drv in &from_nix {
        let ours = std::fs::read(kiln_root.join(drv.trim_start_matches('/'))).unwrap();
        let theirs = std::fs::read(nix.physical(drv)).unwrap();
        assert_eq!(ours, theirs, "{drv}");
    }

    // Built by Kiln, the fixed outputs match the hashes the peer computed.
    let sandbox = std::fs::read_to_string(nix.conf_dir().join("nix.conf"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("sandbox-paths = ").map(str::to_owned))
        .expect("the test store's nix.conf sets sandbox-paths");
    let build = Command::new(kiln_bin())
        .args(["build", "--store", &kiln_url, "--no-out-link", "--json"])
        .args(["--option", "sandbox-paths", &sandbox])
        .arg(dir.join("kiln.toml"))
        .output()
        .unwrap();
    assert!(build.status.success(), "kiln build: {}", describe(&build));
    let built = String::from_utf8_lossy(&build.stdout);
    for drv in &from_nix {
        assert!(built.contains(drv.as_str()), "{drv} not built: {built}");
    }
}
