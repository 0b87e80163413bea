//! The corpus: Nix expressions in `tests/corpus/*.nix` covering every derivation
//! feature Kiln must agree with Nix on (see `tests/corpus/README.md`).
//!
//! Each file evaluates to a derivation or an attribute set of derivations and needs
//! no nixpkgs. Files named `fail-*.nix` instantiate fine but fail to build, on
//! purpose; the comment at the top of each says how.

use std::path::{Path, PathBuf};

use crate::NixStore;

/// The directory holding the corpus files.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// Every corpus file (`tests/corpus/*.nix`, not the helpers under `lib/`), sorted.
pub fn corpus_files() -> Vec<PathBuf> {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
                .path()
        })
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext == "nix"))
        .collect();
    files.sort();
    files
}

/// The corpus name of a file: its file name without `.nix`.
pub fn corpus_name(file: &Path) -> String {
    file.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a corpus file's derivations are meant to fail to build (`fail-*.nix`).
pub fn is_expected_failure(name: &str) -> bool {
    name.starts_with("fail-")
}

/// Instantiates every corpus file into `store`: `(corpus name, .drv path)` for each
/// derivation a file evaluates to, in file order. Panics, naming the file and quoting
/// Nix's error, when a file does not instantiate.
pub fn instantiate_corpus(store: &NixStore) -> Vec<(String, String)> {
    let mut drvs = Vec::new();
    for file in corpus_files() {
        let name = corpus_name(&file);
        let paths = store.instantiate(&file).unwrap_or_else(|error| {
            panic!(
                "corpus file {} does not instantiate: {error}",
                file.display()
            )
        });
        assert!(
            !paths.is_empty(),
            "corpus file {} evaluated to no derivation",
            file.display()
        );
        drvs.extend(paths.into_iter().map(|path| (name.clone(), path)));
    }
    drvs
}

/// Every `.drv` in the closure of the corpus: the top-level derivations and all
/// their input derivations, sorted and without repeats. Instantiates the corpus
/// into `store` first.
pub fn corpus_drv_closure(store: &NixStore) -> Vec<String> {
    let top: Vec<String> = instantiate_corpus(store)
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    store
        .drv_closure(&top)
        .unwrap_or_else(|error| panic!("cannot list the corpus's .drv closure: {error}"))
}
