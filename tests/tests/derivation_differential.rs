//! Kiln's derivation handling against Nix 2.8, over every `.drv` in the closure
//! of the corpus (`tests/corpus/*.nix` instantiated into a throwaway store):
//!
//! - Kiln parses each file and prints it back byte for byte;
//! - it computes the same `.drv` path, and the same output paths by hash modulo
//!   with the input derivations read from the store, also when filling in the
//!   paths of a blanked copy as `nix-instantiate` does;
//! - `kiln derivation show` prints exactly what `nix show-derivation` prints, and
//!   the JSON reads back to the same derivation;
//! - `kiln derivation check` accepts every file, and rejects a tampered one with
//!   the expected and actual paths.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_derivation::hash_modulo::{self, DrvFileHashes};
use kiln_derivation::{BuildOptions, Derivation, DerivationOutput, aterm, drv_name, json};
use kiln_e2e::{NixStore, corpus};
use kiln_formats::store_path::{StoreDir, StorePath};

/// The `kiln` binary of this build, built first if need be.
fn kiln_bin() -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", "kiln", "--bin", "kiln"]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cannot run cargo to build kiln");
    assert!(status.success(), "building the kiln binary failed");
    profile_dir.join("kiln")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

struct Corpus {
    nix: NixStore,
    store: StoreDir,
    /// Every `.drv` of the corpus's closure: logical path, parsed, file bytes.
    drvs: Vec<(StorePath, Derivation, Vec<u8>)>,
}

impl Corpus {
    fn new() -> Corpus {
        let nix = NixStore::new();
        let store = StoreDir::new(nix.store_dir()).unwrap();
        let paths = corpus::corpus_drv_closure(&nix);
        assert!(
            paths.len() >= 50,
            "the corpus closure has only {} derivations",
            paths.len()
        );
        let drvs = paths
            .iter()
            .map(|logical| {
                let bytes = std::fs::read(nix.physical(logical))
                    .unwrap_or_else(|e| panic!("cannot read {logical}: {e}"));
                let path = store.parse_path(logical).unwrap();
                let drv = aterm::parse(&store, &bytes)
                    .unwrap_or_else(|e| panic!("Kiln cannot parse {logical}: {e}"));
                (path, drv, bytes)
            })
            .collect();
        Corpus { nix, store, drvs }
    }

    fn logical(&self, path: &StorePath) -> String {
        self.store.print_path(path)
    }
}

/// Runs every check over the corpus and reports all disagreements at once.
#[test]
fn derivations_agree_with_nix() {
    let corpus = Corpus::new();
    let store = &corpus.store;
    let mut files = DrvFileHashes::new(store.clone(), corpus.nix.real_store_dir());
    let mut failures = Vec::new();
    let mut fixed = 0;
    let mut structured = 0;
    let mut with_inputs = 0;

    for (path, drv, bytes) in &corpus.drvs {
        let logical = corpus.logical(path);
        let name = drv_name(path).unwrap();

        if aterm::print(store, drv) != *bytes {
            failures.push(format!("{logical}: printing it back differs from the file"));
        }
        match hash_modulo::drv_path(store, drv, name) {
            Ok(computed) if computed == *path => {}
            Ok(computed) => failures.push(format!(
                "{logical}: Kiln computes the .drv path {}",
                corpus.logical(&computed)
            )),
            Err(e) => failures.push(format!("{logical}: cannot compute the .drv path: {e}")),
        }

        let computed =
            hash_modulo::output_paths(store, drv, name, |p: &StorePath| files.hash_modulo(p));
        match computed {
            Ok(paths) => {
                let recorded: Vec<(&str, &StorePath)> = drv.output_paths().collect();
                let computed: Vec<(&str, &StorePath)> =
                    paths.iter().map(|(o, p)| (o.as_str(), p)).collect();
                if recorded != computed {
                    failures.push(format!(
                        "{logical}: output paths: Nix wrote {recorded:?}, Kiln computes {computed:?}"
                    ));
                }
            }
            Err(e) => failures.push(format!("{logical}: cannot compute output paths: {e}")),
        }

        // What nix-instantiate does: from empty output paths to the final file.
        let mut blank = drv.clone();
        for (output, o) in blank.outputs.iter_mut() {
            if let DerivationOutput::InputAddressed { .. } = o {
                *o = DerivationOutput::Deferred;
                blank.env.remove(output.as_bytes());
            }
        }
        let filled = hash_modulo::fill_in_output_paths(store, &mut blank, name, |p: &StorePath| {
            files.hash_modulo(p)
        });
        match filled {
            Ok(()) if aterm::print(store, &blank) == *bytes => {}
            Ok(()) => failures.push(format!(
                "{logical}: filling in the output paths gives a different file"
            )),
            Err(e) => failures.push(format!("{logical}: cannot fill in output paths: {e}")),
        }

        let json_text = String::from_utf8(json::print(store, [(path, drv)])).unwrap();
        match json::parse(store, &json_text) {
            Ok(parsed) if parsed.len() == 1 && parsed[0].derivation == *drv => {}
            Ok(_) => failures.push(format!("{logical}: its JSON reads back differently")),
            Err(e) => failures.push(format!("{logical}: its JSON does not read back: {e}")),
        }

        match BuildOptions::from_derivation(drv) {
            Ok(options) => {
                if options.has_structured_attrs() != drv.env.contains_key(&b"__json"[..]) {
                    failures.push(format!("{logical}: structured attrs not recognised"));
                }
                structured += usize::from(options.has_structured_attrs());
            }
            Err(e) => failures.push(format!("{logical}: build options: {e}")),
        }

        fixed += usize::from(drv.is_fixed_output());
        with_inputs += usize::from(!drv.input_derivations.is_empty());
    }

    assert!(
        failures.is_empty(),
        "{} of {} derivations disagree with Nix:\n{}",
        failures.len(),
        corpus.drvs.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} derivations agree with Nix ({fixed} fixed-output, {structured} structured attrs, \
         {with_inputs} with input derivations)",
        corpus.drvs.len()
    );
    // The corpus must exercise what it is for.
    assert!(fixed >= 20, "only {fixed} fixed-output derivations");
    assert!(
        structured >= 3,
        "only {structured} structured-attrs derivations"
    );
    assert!(
        with_inputs >= 10,
        "only {with_inputs} derivations with inputs"
    );
}

#[test]
fn show_prints_what_nix_show_derivation_prints() {
    let corpus = Corpus::new();
    let paths: Vec<String> = corpus
        .drvs
        .iter()
        .map(|(p, _, _)| corpus.logical(p))
        .collect();

    let mut nix_args = vec!["show-derivation".to_owned()];
    nix_args.extend(paths.iter().cloned());
    let theirs = corpus
        .nix
        .nix(&nix_args)
        .unwrap_or_else(|e| panic!("nix show-derivation failed: {e}"));

    let root = corpus.nix.root().to_str().unwrap().to_owned();
    let mut kiln_args = vec![
        "derivation".to_owned(),
        "show".to_owned(),
        "--store".to_owned(),
        format!("local?root={root}"),
    ];
    kiln_args.extend(paths.iter().cloned());
    let output = Command::new(kiln_bin()).args(&kiln_args).output().unwrap();
    assert!(
        output.status.success(),
        "kiln derivation show failed: {}",
        describe(&output)
    );
    let ours = String::from_utf8(output.stdout).expect("the corpus is valid UTF-8");

    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(parse(&ours), parse(&theirs), "same JSON values");
    assert!(
        ours == theirs,
        "same bytes: Kiln printed\n{ours}\nNix printed\n{theirs}"
    );

    // `--recursive` from the derivation with the deepest inputs: the whole closure.
    let (top, ..) = corpus
        .drvs
        .iter()
        .max_by_key(|(_, d, _)| d.input_derivations.len())
        .unwrap();
    let top = corpus.logical(top);
    let theirs_recursive = corpus
        .nix
        .nix(["show-derivation", "--recursive", top.as_str()])
        .unwrap_or_else(|e| panic!("nix show-derivation --recursive failed: {e}"));
    let output = Command::new(kiln_bin())
        .args(["derivation", "show", "--recursive", "--store-root"])
        .arg(corpus.nix.root())
        .arg(&top)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), theirs_recursive);
    assert!(parse(&theirs_recursive).as_object().unwrap().len() > 2);

    // And back: Nix's JSON reads to the derivations Kiln parsed from the files.
    let parsed = json::parse(&corpus.store, &theirs).unwrap();
    assert_eq!(parsed.len(), corpus.drvs.len());
    for (read, (path, drv, _)) in parsed.iter().zip(&corpus.drvs) {
        assert_eq!(read.drv_path.as_ref(), Some(path));
        assert_eq!(&read.derivation, drv, "{}", corpus.logical(path));
    }
}

#[test]
fn check_accepts_every_file_and_rejects_tampered_ones() {
    let corpus = Corpus::new();
    let kiln = kiln_bin();

    // Physical file paths: the input derivations are found beside each file.
    let files: Vec<PathBuf> = corpus
        .drvs
        .iter()
        .map(|(p, _, _)| corpus.nix.physical(corpus.logical(p)))
        .collect();
    let output = Command::new(&kiln)
        .args(["derivation", "check"])
        .args(&files)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": ok (")).count(),
        files.len(),
        "{stdout}"
    );

    // Logical paths with --store-root.
    let (first, ..) = &corpus.drvs[corpus.drvs.len() / 2];
    let output = Command::new(&kiln)
        .args(["derivation", "check", "--store-root"])
        .arg(corpus.nix.root())
        .arg(corpus.logical(first))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));

    // A derivation with inputs, copied with its inputs and then changed.
    let (path, drv, bytes) = corpus
        .drvs
        .iter()
        .find(|(_, d, _)| !d.input_derivations.is_empty() && !d.is_fixed_output())
        .expect("the corpus has a derivation with inputs");
    let dir = tempfile::tempdir().unwrap();
    for (p, _, b) in &corpus.drvs {
        std::fs::write(dir.path().join(p.base_name()), b).unwrap();
    }
    let tampered = dir.path().join(path.base_name());
    let mut changed = drv.clone();
    changed.builder.extend_from_slice(b"-changed");
    std::fs::write(&tampered, aterm::print(&corpus.store, &changed)).unwrap();
    assert_ne!(std::fs::read(&tampered).unwrap(), *bytes);
    let output = Command::new(&kiln)
        .args(["derivation", "check"])
        .arg(&tampered)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (_, out_path) = drv.output_paths().next().unwrap();
    assert!(stdout.contains("DISAGREES"), "{stdout}");
    assert!(
        stdout.contains(&corpus.logical(out_path)),
        "names the actual path: {stdout}"
    );
    assert!(
        stdout.contains("expected /nix/store/"),
        "names the expected path: {stdout}"
    );
}
