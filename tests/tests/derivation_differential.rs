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

use std::path::PathBuf;
use std::process::{Command, Output};

use kiln_derivation::hash_modulo::{self, DrvFileHashes};
use kiln_derivation::{BuildOptions, Derivation, DerivationOutput, aterm, drv_name, json};
use kiln_e2e::{NixStore, corpus, kiln_bin};
use kiln_formats::store_path::{StoreDir, StorePath};

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

/// The attributes Nix's evaluator gave each corpus derivation (`drvAttrs`),
/// against the build options Kiln reads back from the `.drv` file.
#[test]
fn build_options_match_the_attributes_nix_evaluated() {
    let nix = NixStore::new();
    let store = StoreDir::new(nix.store_dir()).unwrap();
    // Evaluating attributes that refer to a `.drv` needs it in the store.
    corpus::instantiate_corpus(&nix);
    let files: Vec<String> = corpus::corpus_files()
        .iter()
        .map(|f| format!("{}", f.display()))
        .collect();
    let list = files
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(" ");
    // Every derivation at the top of each file, with the attributes that set
    // build options (derivations and paths in them become store paths).
    let expr = format!(
        r#"
        let
          names = [ "requiredSystemFeatures" "preferLocalBuild" "allowSubstitutes"
                    "__noChroot" "impureEnvVars" "passAsFile" "allowedReferences"
                    "allowedRequisites" "disallowedReferences" "disallowedRequisites"
                    "exportReferencesGraph" "outputChecks" "outputHash"
                    "outputHashAlgo" "outputHashMode" "__structuredAttrs" ];
          pick = d: {{ drvPath = d.drvPath; attrs = builtins.intersectAttrs
            (builtins.listToAttrs (map (n: {{ name = n; value = null; }}) names)) d.drvAttrs; }};
          top = v: if v.type or null == "derivation" then [ (pick v) ]
            else map (n: pick v.${{n}}) (builtins.filter
              (n: (v.${{n}}.type or null) == "derivation") (builtins.attrNames v));
        in builtins.concatMap (f: top (import f)) [ {list} ]
        "#
    );
    let evaluated = nix
        .nix_instantiate(["--eval", "--strict", "--json", "--expr", expr.as_str()])
        .unwrap_or_else(|e| panic!("nix-instantiate --eval failed: {e}"));
    let evaluated: serde_json::Value = serde_json::from_str(&evaluated).unwrap();
    let evaluated = evaluated.as_array().unwrap();
    assert!(evaluated.len() >= 50, "{} derivations", evaluated.len());

    use serde_json::Value;
    // A list attribute as the builder sees it: in the environment Nix joins
    // a list with spaces, and Kiln splits it again.
    let strings = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().unwrap().to_owned())
                .collect(),
            Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
            other => panic!("unexpected list attribute {other}"),
        }
    };
    let mut failures = Vec::new();
    let mut compared = 0;
    for entry in evaluated {
        let drv_path = entry["drvPath"].as_str().unwrap();
        let attrs = entry["attrs"].as_object().unwrap();
        let bytes = std::fs::read(nix.physical(drv_path)).unwrap();
        let drv = aterm::parse(&store, &bytes).unwrap();
        let options = match BuildOptions::from_derivation(&drv) {
            Ok(options) => options,
            Err(e) => {
                failures.push(format!("{drv_path}: {e}"));
                continue;
            }
        };
        let structured = attrs.get("__structuredAttrs") == Some(&Value::Bool(true));
        let mut check = |what: &str, ok: bool, detail: String| {
            compared += 1;
            if !ok {
                failures.push(format!("{drv_path}: {what}: {detail}"));
            }
        };
        check(
            "structured attrs",
            options.has_structured_attrs() == structured,
            String::new(),
        );
        let features: std::collections::BTreeSet<String> = attrs
            .get("requiredSystemFeatures")
            .map(&strings)
            .unwrap_or_default()
            .into_iter()
            .collect();
        check(
            "requiredSystemFeatures",
            options.required_system_features == features,
            format!("{:?} vs {features:?}", options.required_system_features),
        );
        let flag = |name: &str, default: bool| attrs.get(name).map_or(default, |v| v == true);
        check(
            "preferLocalBuild",
            options.prefer_local_build == flag("preferLocalBuild", false),
            String::new(),
        );
        check(
            "allowSubstitutes",
            options.allow_substitutes == flag("allowSubstitutes", true),
            String::new(),
        );
        check(
            "__noChroot",
            options.no_chroot == flag("__noChroot", false),
            String::new(),
        );
        let impure = attrs.get("impureEnvVars").map(&strings).unwrap_or_default();
        check(
            "impureEnvVars",
            options.impure_env_vars == impure,
            format!("{:?} vs {impure:?}", options.impure_env_vars),
        );
        let string = |name: &str| attrs.get(name).map(|v| v.as_str().unwrap().to_owned());
        for (name, ours) in [
            ("outputHash", &options.output_hash),
            ("outputHashAlgo", &options.output_hash_algo),
            ("outputHashMode", &options.output_hash_mode),
        ] {
            check(name, *ours == string(name), format!("{ours:?}"));
        }
        if structured {
            let checks = attrs
                .get("outputChecks")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            for (output, expected) in &checks {
                let ours = options.output_checks.for_output(output);
                let list = |key: &str| expected.get(key).map(&strings);
                let ok = ours.is_some_and(|c| {
                    c.allowed_references == list("allowedReferences")
                        && c.allowed_requisites == list("allowedRequisites")
                        && c.disallowed_references == list("disallowedReferences")
                        && c.disallowed_requisites == list("disallowedRequisites")
                        && c.max_size == expected.get("maxSize").and_then(Value::as_u64)
                        && c.max_closure_size
                            == expected.get("maxClosureSize").and_then(Value::as_u64)
                });
                check(
                    "outputChecks",
                    ok,
                    format!("{output}: {ours:?} vs {expected}"),
                );
            }
            if let Some(Value::Object(graph)) = attrs.get("exportReferencesGraph") {
                for (name, paths) in graph {
                    let ours = options.export_references_graph.get(name);
                    check(
                        "exportReferencesGraph",
                        ours == Some(&strings(paths)),
                        format!("{name}: {ours:?} vs {paths}"),
                    );
                }
            }
        } else {
            let all = options.output_checks.for_output("out").unwrap();
            for (name, ours) in [
                ("allowedReferences", &all.allowed_references),
                ("allowedRequisites", &all.allowed_requisites),
                ("disallowedReferences", &all.disallowed_references),
                ("disallowedRequisites", &all.disallowed_requisites),
            ] {
                let expected = attrs.get(name).map(&strings);
                check(name, *ours == expected, format!("{ours:?} vs {expected:?}"));
            }
            let pass: std::collections::BTreeSet<String> = attrs
                .get("passAsFile")
                .map(&strings)
                .unwrap_or_default()
                .into_iter()
                .collect();
            check(
                "passAsFile",
                options.pass_as_file == pass,
                format!("{:?}", options.pass_as_file),
            );
            let graph = attrs
                .get("exportReferencesGraph")
                .map(&strings)
                .unwrap_or_default();
            let ours: Vec<String> = options
                .export_references_graph
                .iter()
                .flat_map(|(k, v)| v.iter().flat_map(move |p| [k.clone(), p.clone()]))
                .collect();
            let mut graph_pairs: Vec<[String; 2]> = graph
                .chunks(2)
                .map(|c| [c[0].clone(), c[1].clone()])
                .collect();
            graph_pairs.sort();
            let ours_pairs: Vec<[String; 2]> = ours
                .chunks(2)
                .map(|c| [c[0].clone(), c[1].clone()])
                .collect();
            check(
                "exportReferencesGraph",
                ours_pairs == graph_pairs,
                format!("{ours_pairs:?} vs {graph_pairs:?}"),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "build options disagree with Nix's attributes:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "{} build options of {} derivations agree with Nix's attributes",
        compared,
        evaluated.len()
    );
}
