//! `kiln derivation add FILE.json` against Nix 2.8: derivations that
//! `nix-instantiate` wrote, shown as JSON by `nix show-derivation` with
//! their output paths blanked out, are added to a Kiln store whose inputs
//! came from Nix by export/import; Kiln must compute the same output paths
//! and `.drv` path, write the same bytes, and register the same references
//! (as Nix, reading Kiln's store, reports them).

use std::io::Write;
use std::process::{Command, Stdio};

use kiln_e2e::NixStore;

fn kiln(args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new(kiln_e2e::kiln_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Blanks every output path and the environment variable of the same name.
fn blank_outputs(drv: &mut serde_json::Value) {
    let outputs: Vec<String> = drv["outputs"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    for o in outputs {
        let out = &mut drv["outputs"][&o];
        if out.get("hash").is_none() {
            // Input-addressed: the path depends on everything else.
            out.as_object_mut().unwrap().remove("path");
            drv["env"][&o] = serde_json::Value::String(String::new());
        } else {
            out["path"] = serde_json::Value::String(String::new());
        }
    }
}

#[test]
fn derivation_add_computes_what_nix_instantiate_wrote() {
    let nix = NixStore::new();
    let corpus = kiln_e2e::corpus::corpus_dir();
    let mut drvs = Vec::new();
    for file in [
        "allowed-references.nix",
        "deps-deep-chain.nix",
        "builtins-path.nix",
        "args-many.nix",
    ] {
        drvs.extend(
            nix.instantiate(corpus.join(file))
                .unwrap_or_else(|e| panic!("instantiating {file}: {e:?}")),
        );
    }
    let kiln_store = NixStore::new();
    let url = kiln_store.url();
    for drv in &drvs {
        // The inputs, from Nix, by export/import.
        let inputs: Vec<String> = nix
            .nix_store(["-q", "--references", drv])
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        if !inputs.is_empty() {
            let mut args = vec!["-qR".to_owned()];
            args.extend(inputs.iter().cloned());
            let closure: Vec<String> = nix
                .nix_store(&args)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            let mut export = vec!["--export".to_owned()];
            export.extend(closure);
            let stream = nix.run_bytes("nix-store", &export, b"").unwrap();
            kiln(&["store", "--store", &url, "import"], &stream);
        }
        let shown: serde_json::Value =
            serde_json::from_str(&nix.nix(["show-derivation", drv]).unwrap()).unwrap();
        let mut one = shown[drv.as_str()].clone();
        blank_outputs(&mut one);
        let keyed = serde_json::json!({ drv.as_str(): one });
        let printed = kiln(
            &["derivation", "add", "--store", &url, "-"],
            keyed.to_string().as_bytes(),
        );
        assert_eq!(
            printed.trim(),
            drv,
            "kiln derivation add gave another .drv path"
        );
        assert_eq!(
            std::fs::read(kiln_store.physical(drv)).unwrap(),
            std::fs::read(nix.physical(drv)).unwrap(),
            "the .drv Kiln wrote differs from Nix's"
        );
        for q in ["--references", "--outputs", "--hash"] {
            assert_eq!(
                kiln_store.nix_store(["-q", q, drv]).unwrap(),
                nix.nix_store(["-q", q, drv]).unwrap(),
                "nix-store -q {q} {drv} on Kiln's store"
            );
        }
    }
}
