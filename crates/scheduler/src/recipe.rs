//! Kiln's own recipe format, for people who do not use the Nix language: a
//! TOML file of named packages (builder, arguments, environment, inputs by
//! name) and local source directories, turned into ordinary derivations.
//!
//! ```toml
//! [sources]
//! hello-src = "src"            # relative to the recipe; added to the store
//!
//! [packages.hello]
//! builder = "/bin/sh"
//! args = ["-c", "cc -o $out/bin/hello $hello_src/hello.c"]
//! inputs = ["hello-src"]       # sources or other packages
//! env = { CFLAGS = "-O2" }
//!
//! [packages.tarball]             # a fixed-output package (a download)
//! builder = "/bin/sh"
//! args = ["-c", "fetch … > $out"]
//! hash = "sha256-…"              # SRI, or sha256:… in base16/nixbase32/base64
//! hash-mode = "flat"             # or "recursive" (the default): a NAR hash
//! ```
//!
//! Each input is passed to the builder as a variable named after it (`-`
//! becomes `_`) holding its store path, and `${name}` in arguments and
//! environment values is replaced by that path too. A package's outputs are
//! `["out"]` unless `outputs` says otherwise; `system` defaults to this
//! machine's. A package with a `hash` is a fixed-output derivation with the
//! one output `out`, given `outputHash`, `outputHashAlgo` and
//! `outputHashMode` as a Nix user would write them, so that the same package
//! in Nix is the same `.drv`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bstr::BString;
use kiln_derivation::{Derivation, DerivationOutput, HashMethod, OutputHash, aterm, hash_modulo};
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::store_path::{FileIngestionMethod, StorePath, StorePathSet};
use kiln_store::{AddOptions, Store, StoreError};
use serde::Deserialize;

/// What was wrong with a recipe.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("recipe '{}' is not valid: {source}", path.display())]
    Syntax {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("recipe '{}': package '{package}' has input '{input}', which is neither a source nor a package", path.display())]
    UnknownInput {
        path: PathBuf,
        package: String,
        input: String,
    },
    #[error("recipe '{}': packages depend on each other in a cycle through '{package}'", path.display())]
    Cycle { package: String, path: PathBuf },
    #[error("recipe '{}': no package named '{name}' (it has: {known})", path.display())]
    NoSuchPackage {
        path: PathBuf,
        name: String,
        known: String,
    },
    #[error("recipe '{}': {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A recipe file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub sources: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub packages: BTreeMap<String, Package>,
}

/// One package of a recipe.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub builder: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub inputs: Vec<String>,
    pub outputs: Option<Vec<String>>,
    pub system: Option<String>,
    /// The hash of the output, known in advance, which makes the package a
    /// fixed-output derivation (a download, say): SRI `sha256-…` or
    /// `sha256:…` (base16, nixbase32 or base64).
    pub hash: Option<String>,
    /// What [`Package::hash`] is a hash of: the NAR of the output
    /// (`recursive`, the default) or the bytes of a single file (`flat`).
    #[serde(rename = "hash-mode")]
    pub hash_mode: Option<HashMode>,
}

/// How a fixed output is hashed (Nix's `outputHashMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashMode {
    Flat,
    Recursive,
}

impl Package {
    /// The fixed hash of the package's output, when it has one; what is
    /// wrong otherwise.
    fn fixed_output(&self) -> Result<Option<OutputHash>, String> {
        let Some(text) = &self.hash else {
            return match self.hash_mode {
                Some(_) => Err("'hash-mode' is set but 'hash' is not; a fixed-output \
                                package needs both (or only 'hash')"
                    .into()),
                None => Ok(None),
            };
        };
        if let Some(outputs) = &self.outputs {
            if outputs.len() != 1 || outputs[0] != "out" {
                return Err(format!(
                    "it has a fixed hash, so it must have the one output 'out' (it has: {})",
                    outputs.join(", ")
                ));
            }
        }
        let hash = Hash::parse_prefixed(text, None).map_err(|e| {
            format!(
                "hash '{text}' is not valid ({e}); expected an SRI hash such as 'sha256-…' \
                 or 'sha256:' followed by base16, nixbase32 or base64"
            )
        })?;
        let method = match self.hash_mode.unwrap_or(HashMode::Recursive) {
            HashMode::Flat => HashMethod::Flat,
            HashMode::Recursive => HashMethod::Recursive,
        };
        Ok(Some(OutputHash { method, hash }))
    }
}

impl Recipe {
    /// Reads and parses a recipe file.
    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| RecipeError::Syntax {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}

fn var_name(input: &str) -> String {
    input.replace('-', "_")
}

/// The packages to instantiate (`only` and what it needs, or all of them),
/// each after its inputs; cycles and unknown inputs refused. An explicit
/// stack rather than recursion, so that a long chain of packages cannot
/// overflow the thread's stack.
fn dependency_order<'a>(
    recipe: &'a Recipe,
    path: &Path,
    only: Option<&'a str>,
) -> Result<Vec<&'a str>, RecipeError> {
    #[derive(PartialEq)]
    enum State {
        Visiting,
        Done,
    }
    let roots: Vec<&str> = match only {
        Some(n) => vec![n],
        None => recipe.packages.keys().map(String::as_str).collect(),
    };
    let mut order: Vec<&str> = Vec::with_capacity(recipe.packages.len());
    let mut state: HashMap<&str, State> = HashMap::with_capacity(recipe.packages.len());
    // (package, how many of its inputs have been looked at)
    let mut stack: Vec<(&str, usize)> = Vec::new();
    for root in roots {
        if state.contains_key(root) {
            continue;
        }
        state.insert(root, State::Visiting);
        stack.push((root, 0));
        while let Some((name, next)) = stack.last_mut() {
            let name: &str = name;
            let inputs = &recipe.packages[name].inputs;
            let Some(input) = inputs.get(*next) else {
                state.insert(name, State::Done);
                order.push(name);
                stack.pop();
                continue;
            };
            *next += 1;
            let input = input.as_str();
            if let Some((key, _)) = recipe.packages.get_key_value(input) {
                match state.get(input) {
                    Some(State::Done) => {}
                    Some(State::Visiting) => {
                        return Err(RecipeError::Cycle {
                            package: input.to_owned(),
                            path: path.to_owned(),
                        });
                    }
                    None => {
                        state.insert(key, State::Visiting);
                        stack.push((key, 0));
                    }
                }
            } else if !recipe.sources.contains_key(input) {
                return Err(RecipeError::UnknownInput {
                    path: path.to_owned(),
                    package: name.to_owned(),
                    input: input.to_owned(),
                });
            }
        }
    }
    Ok(order)
}

/// Adds the recipe's sources to `store` and writes a `.drv` for each
/// package (all of them, or `only`): `(package name, .drv path)`, in
/// dependency order.
pub fn instantiate(
    store: &dyn Store,
    recipe_path: &Path,
    system: &str,
    only: Option<&str>,
) -> Result<Vec<(String, StorePath)>, RecipeError> {
    let recipe = Recipe::load(recipe_path)?;
    let base = recipe_path.parent().unwrap_or(Path::new("."));
    let invalid = |what: String| RecipeError::Invalid {
        path: recipe_path.to_owned(),
        what,
    };
    if let Some(name) = only {
        if !recipe.packages.contains_key(name) {
            return Err(RecipeError::NoSuchPackage {
                path: recipe_path.to_owned(),
                name: name.to_owned(),
                known: recipe
                    .packages
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let store_dir = store.store_dir().clone();

    let mut sources: BTreeMap<&str, StorePath> = BTreeMap::new();
    for (name, dir) in &recipe.sources {
        let dir = base.join(dir);
        let info = store.add_to_store(
            name,
            &dir,
            FileIngestionMethod::Recursive,
            HashAlgo::Sha256,
            AddOptions::default(),
        )?;
        sources.insert(name, info.path);
    }

    let order = dependency_order(&recipe, recipe_path, only)?;

    // Every package's hash modulo is computed once, when it is written, and
    // looked up by the packages after it: the work grows with the size of
    // the recipe, not with its square.
    let mut hashes: HashMap<StorePath, Hash> = HashMap::with_capacity(order.len());
    let mut made: HashMap<&str, (StorePath, StorePath)> = HashMap::with_capacity(order.len()); // drv, out
    let mut result = Vec::with_capacity(order.len());
    for name in order {
        let package = &recipe.packages[name];
        let fixed = package
            .fixed_output()
            .map_err(|what| invalid(format!("package '{name}': {what}")))?;
        let outputs = package
            .outputs
            .clone()
            .unwrap_or_else(|| vec!["out".into()]);
        if outputs.is_empty() {
            return Err(invalid(format!("package '{name}' has no outputs")));
        }
        let mut paths: BTreeMap<String, String> = BTreeMap::new();
        let mut drv = Derivation {
            system: package
                .system
                .clone()
                .unwrap_or_else(|| system.to_owned())
                .into(),
            builder: package.builder.clone().into(),
            ..Derivation::default()
        };
        for input in &package.inputs {
            let path = match sources.get(input.as_str()) {
                Some(p) => {
                    drv.input_sources.insert(p.clone());
                    p.clone()
                }
                None => {
                    let (drv_path, out) = &made[input.as_str()];
                    drv.input_derivations
                        .entry(drv_path.clone())
                        .or_default()
                        .insert("out".into());
                    out.clone()
                }
            };
            paths.insert(input.clone(), store_dir.print_path(&path));
        }
        let interpolate = |s: &str| {
            let mut s = s.to_owned();
            for (k, v) in &paths {
                s = s.replace(&format!("${{{k}}}"), v);
            }
            s
        };
        drv.args = package.args.iter().map(|a| interpolate(a).into()).collect();
        let mut env: BTreeMap<BString, BString> = BTreeMap::new();
        for (k, v) in &paths {
            env.insert(var_name(k).into(), v.clone().into());
        }
        for (k, v) in &package.env {
            env.insert(k.clone().into(), interpolate(v).into());
        }
        env.insert("name".into(), name.into());
        env.insert("builder".into(), drv.builder.clone());
        env.insert("system".into(), drv.system.clone());
        if package.outputs.is_some() {
            env.insert("outputs".into(), outputs.join(" ").into());
        }
        match &fixed {
            Some(hash) => {
                // The same attributes a Nix user writes, so that the same
                // package in Nix is the same derivation.
                env.insert(
                    "outputHash".into(),
                    package.hash.clone().unwrap_or_default().into(),
                );
                env.insert("outputHashAlgo".into(), hash.hash.algo().to_string().into());
                env.insert("outputHashMode".into(), hash.method.mode_name().into());
                let path = hash
                    .store_path(&store_dir, name, "out")
                    .map_err(|e| invalid(format!("package '{name}': {e}")))?;
                drv.outputs
                    .insert("out".into(), DerivationOutput::Fixed { hash: *hash, path });
            }
            None => {
                for o in &outputs {
                    drv.outputs.insert(o.clone(), DerivationOutput::Deferred);
                }
            }
        }
        drv.env = env;
        let lookup = |p: &StorePath| {
            hashes
                .get(p)
                .copied()
                .ok_or_else(|| std::io::Error::other("unknown input derivation"))
        };
        hash_modulo::fill_in_output_paths(&store_dir, &mut drv, name, lookup)
            .map_err(|e| invalid(format!("package '{name}': {e}")))?;
        let hash = hash_modulo::hash_modulo(&store_dir, &drv, name, false, lookup)
            .map_err(|e| invalid(format!("package '{name}': {e}")))?;
        let text = aterm::print(&store_dir, &drv);
        let refs: StorePathSet = drv.references();
        let info = store.add_text(&format!("{name}.drv"), &text, &refs)?;
        let out = drv
            .outputs
            .get("out")
            .or_else(|| drv.outputs.values().next())
            .and_then(|o| o.path().cloned())
            .expect("output paths were just filled in");
        hashes.insert(info.path.clone(), hash);
        made.insert(name, (info.path.clone(), out));
        result.push((name.to_owned(), info.path));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_derivation::hash_modulo::{DrvFileHashes, drv_path_of, output_paths};
    use kiln_formats::store_path::StoreDir;
    use kiln_store::local::{LocalStore, LocalStoreConfig};
    use std::collections::BTreeSet;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        recipe: PathBuf,
        store: LocalStore,
    }

    fn fixture(recipe: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let dir = tmp.path().join("recipe");
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/hello.c"), "int main() { return 0; }\n").unwrap();
        std::fs::write(dir.join("kiln.toml"), recipe).unwrap();
        let store = LocalStore::open(LocalStoreConfig::with_root(&root)).unwrap();
        Fixture {
            recipe: dir.join("kiln.toml"),
            _tmp: tmp,
            root,
            store,
        }
    }

    fn error_of(recipe: &str) -> String {
        let f = fixture(recipe);
        instantiate(&f.store, &f.recipe, "x86_64-linux", None)
            .unwrap_err()
            .to_string()
    }

    /// A recipe of `n` packages: a long chain, each package also taking
    /// one from halfway down, a source, and every 50th a fixed output.
    fn big_recipe(n: usize) -> String {
        let mut text = String::from("[sources]\nsrc = \"src\"\n\n");
        for i in 0..n {
            let mut inputs = vec!["src".to_owned()];
            if i > 0 {
                inputs.push(format!("p{}", i - 1));
                inputs.push(format!("p{}", i / 2));
            }
            text.push_str(&format!(
                "[packages.p{i}]\nbuilder = \"/bin/sh\"\n\
                 args = [\"-c\", \"echo {i} > $out\"]\ninputs = {inputs:?}\n"
            ));
            if i % 50 == 7 {
                let digest = Hash::digest(HashAlgo::Sha256, i.to_string());
                text.push_str(&format!("hash = \"{}\"\n", digest.to_sri()));
                if i % 100 == 7 {
                    text.push_str("hash-mode = \"flat\"\n");
                }
            }
            text.push('\n');
        }
        text
    }

    /// Thousands of packages come out as the derivations that reading
    /// their `.drv` files back and hashing them from scratch gives: the
    /// same `.drv` paths, output paths and inputs.
    #[test]
    fn many_packages_match_their_drv_files() {
        let n = 3000;
        let f = fixture(&big_recipe(n));
        let store_dir = StoreDir::default();
        let made = instantiate(&f.store, &f.recipe, "x86_64-linux", None).unwrap();
        assert_eq!(made.len(), n);
        let by_name: HashMap<&str, &StorePath> =
            made.iter().map(|(n, p)| (n.as_str(), p)).collect();
        let mut files = DrvFileHashes::new(store_dir.clone(), f.root.join("nix/store"));
        let mut fixed = 0;
        for (name, drv_path) in &made {
            let text = std::fs::read(files.file_of(drv_path)).unwrap();
            let drv = aterm::parse(&store_dir, &text).unwrap();
            assert_eq!(
                drv_path_of(&store_dir, &drv, name, &text).unwrap(),
                *drv_path,
                "{name}"
            );
            let want = output_paths(&store_dir, &drv, name, |p| files.hash_modulo(p)).unwrap();
            let got: BTreeMap<String, StorePath> = drv
                .outputs
                .iter()
                .map(|(o, d)| (o.clone(), d.path().unwrap().clone()))
                .collect();
            assert_eq!(got, want, "{name}");
            let i: usize = name[1..].parse().unwrap();
            let inputs: BTreeSet<&StorePath> = if i == 0 {
                BTreeSet::new()
            } else {
                [
                    by_name[&*format!("p{}", i - 1)],
                    by_name[&*format!("p{}", i / 2)],
                ]
                .into_iter()
                .collect()
            };
            assert_eq!(
                drv.input_derivations.keys().collect::<BTreeSet<_>>(),
                inputs,
                "{name}"
            );
            if drv.is_fixed_output() {
                fixed += 1;
            }
        }
        assert_eq!(fixed, n / 50);
    }

    #[test]
    fn fixed_output_package_is_a_fixed_output_derivation() {
        let digest = Hash::digest(HashAlgo::Sha256, "hello\n");
        let f = fixture(&format!(
            "[packages.greeting]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo hello > $out\"]\n\
             hash = \"sha256:{}\"\nhash-mode = \"flat\"\n",
            digest.to_nixbase32()
        ));
        let made = instantiate(&f.store, &f.recipe, "x86_64-linux", None).unwrap();
        let text = std::fs::read(f.root.join("nix/store").join(made[0].1.base_name())).unwrap();
        let drv = aterm::parse(&StoreDir::default(), &text).unwrap();
        let Some(DerivationOutput::Fixed { hash, path }) = drv.outputs.get("out") else {
            panic!("not a fixed output: {:?}", drv.outputs);
        };
        assert_eq!(hash.method, HashMethod::Flat);
        assert_eq!(hash.hash, digest);
        assert_eq!(
            *path,
            StoreDir::default()
                .make_fixed_output_path(
                    "greeting",
                    FileIngestionMethod::Flat,
                    &digest,
                    &StorePathSet::new(),
                    false
                )
                .unwrap()
        );
        assert_eq!(drv.env[&BString::from("outputHashMode")], "flat");
        assert_eq!(drv.env[&BString::from("outputHashAlgo")], "sha256");
    }

    #[test]
    fn fixed_output_errors_say_what_was_wrong() {
        let base = "[packages.a]\nbuilder = \"/bin/sh\"\n";
        let sri = Hash::digest(HashAlgo::Sha256, "").to_sri();
        let e = error_of(&format!(
            "{base}hash = \"{sri}\"\noutputs = [\"out\", \"dev\"]\n"
        ));
        assert!(
            e.contains("must have the one output 'out' (it has: out, dev)"),
            "{e}"
        );
        let e = error_of(&format!("{base}hash = \"0123\"\n"));
        assert!(
            e.contains("hash '0123' is not valid") && e.contains("sha256-"),
            "{e}"
        );
        let e = error_of(&format!("{base}hash-mode = \"flat\"\n"));
        assert!(e.contains("'hash-mode' is set but 'hash' is not"), "{e}");
        let e = error_of(&format!("{base}hash = \"{sri}\"\nhash-mode = \"text\"\n"));
        assert!(e.contains("unknown variant `text`"), "{e}");
    }

    #[test]
    fn cycles_and_unknown_inputs_are_refused() {
        let e = error_of(
            "[packages.a]\nbuilder = \"/bin/sh\"\ninputs = [\"b\"]\n\
             [packages.b]\nbuilder = \"/bin/sh\"\ninputs = [\"a\"]\n",
        );
        assert!(e.contains("in a cycle through 'a'"), "{e}");
        let e = error_of("[packages.a]\nbuilder = \"/bin/sh\"\ninputs = [\"nope\"]\n");
        assert!(e.contains("input 'nope', which is neither"), "{e}");
    }
}
