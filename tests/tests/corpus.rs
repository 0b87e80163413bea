//! The corpus instantiates with Nix 2.8 and is as broad as the differential tests need.

use std::collections::BTreeSet;

use kiln_e2e::{NixStore, corpus};

#[test]
fn every_corpus_file_instantiates_and_there_are_enough() {
    let store = NixStore::new();
    let drvs = corpus::instantiate_corpus(&store);

    let files: BTreeSet<&str> = drvs.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        files.len(),
        corpus::corpus_files().len(),
        "every corpus file yields at least one derivation"
    );
    assert!(
        files.len() >= 50,
        "the corpus has {} files; the issue asks for at least 50",
        files.len()
    );

    for (name, drv_path) in &drvs {
        assert!(
            drv_path.starts_with("/nix/store/") && drv_path.ends_with(".drv"),
            "{name}: {drv_path}"
        );
        let physical = store.physical(drv_path);
        let contents = std::fs::read(&physical)
            .unwrap_or_else(|error| panic!("{name}: cannot read {}: {error}", physical.display()));
        assert!(
            contents.starts_with(b"Derive(["),
            "{name}: {drv_path} is not an ATerm derivation"
        );
    }

    let closure = corpus::corpus_drv_closure(&store);
    let top: BTreeSet<&str> = drvs.iter().map(|(_, path)| path.as_str()).collect();
    assert!(
        top.iter()
            .all(|path| closure.binary_search(&path.to_string()).is_ok())
    );
    assert!(
        closure.len() > top.len(),
        "the closure ({}) adds the input derivations to the top-level ones ({})",
        closure.len(),
        top.len()
    );
}

#[test]
fn corpus_covers_the_features_the_issue_names() {
    let store = NixStore::new();
    let closure = corpus::corpus_drv_closure(&store);
    let texts: Vec<String> = closure
        .iter()
        .map(|path| {
            String::from_utf8_lossy(&std::fs::read(store.physical(path)).unwrap()).into_owned()
        })
        .collect();
    let count = |needle: &str| texts.iter().filter(|text| text.contains(needle)).count();

    for (feature, needle, at_least) in [
        ("structured attrs", "(\"__json\",", 5),
        ("flat fixed outputs", "\",\"sha256\",\"", 3),
        ("recursive fixed outputs", "\"r:sha256\"", 3),
        ("sha1 fixed outputs", "\"sha1\"", 3),
        ("sha512 fixed outputs", "\"sha512\"", 3),
        ("md5 fixed outputs", "\"md5\"", 1),
        ("passAsFile", "(\"passAsFile\",", 1),
        ("exportReferencesGraph", "(\"exportReferencesGraph\",", 1),
        ("allowedReferences", "(\"allowedReferences\",", 2),
        ("disallowedReferences", "(\"disallowedReferences\",", 2),
        ("allowedRequisites", "(\"allowedRequisites\",", 1),
        ("disallowedRequisites", "(\"disallowedRequisites\",", 1),
        ("requiredSystemFeatures", "(\"requiredSystemFeatures\",", 2),
        ("preferLocalBuild", "(\"preferLocalBuild\",\"1\")", 2),
        ("allowSubstitutes", "(\"allowSubstitutes\",\"\")", 1),
        ("impureEnvVars", "(\"impureEnvVars\",", 1),
        ("__noChroot", "(\"__noChroot\",\"1\")", 1),
        ("escaped newline", "\\n", 3),
        ("escaped tab", "\\t", 1),
        ("escaped carriage return", "\\r", 1),
        ("escaped quote", "\\\"", 2),
        ("escaped backslash", "\\\\", 2),
        ("empty strings", ",\"\")", 5),
        ("non-ASCII text", "🦀", 2),
        ("multiple outputs", "(\"dev\",", 4),
    ] {
        let found = count(needle);
        assert!(
            found >= at_least.max(1),
            "{feature}: {found} .drv files contain {needle:?}, expected at least {at_least}"
        );
    }
    assert!(
        texts.iter().any(|text| text.len() > 200_000),
        "a .drv with very long strings"
    );
}

/// The corpus is meant to be built too (by Nix and by Kiln, and compared): every
/// file not named `fail-*` must build with Nix 2.8.
#[test]
fn corpus_files_not_marked_fail_build_with_nix() {
    let store = NixStore::new();
    let files: Vec<_> = corpus::corpus_files()
        .into_iter()
        .filter(|file| !corpus::is_expected_failure(&corpus::corpus_name(file)))
        .collect();
    let mut args = vec!["--no-out-link".into(), "--max-jobs".into(), "2".into()];
    args.extend(files.iter().map(|file| file.clone().into_os_string()));
    let stdout = store
        .nix_build(&args)
        .unwrap_or_else(|error| panic!("building the corpus with Nix failed: {error}"));
    let outputs: Vec<&str> = stdout.lines().collect();
    assert!(
        outputs.len() >= files.len(),
        "{} outputs for {} files",
        outputs.len(),
        files.len()
    );
    for output in outputs {
        assert!(
            store.physical(output).exists(),
            "{output} was reported built but is not in the store"
        );
    }
}
