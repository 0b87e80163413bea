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
//! ```
//!
//! Each input is passed to the builder as a variable named after it (`-`
//! becomes `_`) holding its store path, and `${name}` in arguments and
//! environment values is replaced by that path too. A package's outputs are
//! `["out"]` unless `outputs` says otherwise; `system` defaults to this
//! machine's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bstr::BString;
use kiln_derivation::{Derivation, DerivationOutput, aterm, hash_modulo};
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

    // Packages in dependency order (depth-first, cycles refused).
    let mut order: Vec<&str> = Vec::new();
    let mut state: BTreeMap<&str, bool> = BTreeMap::new(); // false: visiting, true: done
    fn visit<'a>(
        name: &'a str,
        recipe: &'a Recipe,
        path: &Path,
        state: &mut BTreeMap<&'a str, bool>,
        order: &mut Vec<&'a str>,
    ) -> Result<(), RecipeError> {
        match state.get(name) {
            Some(true) => return Ok(()),
            Some(false) => {
                return Err(RecipeError::Cycle {
                    package: name.to_owned(),
                    path: path.to_owned(),
                });
            }
            None => {}
        }
        state.insert(name, false);
        let package = &recipe.packages[name];
        for input in &package.inputs {
            if recipe.packages.contains_key(input.as_str()) {
                visit(input, recipe, path, state, order)?;
            } else if !recipe.sources.contains_key(input.as_str()) {
                return Err(RecipeError::UnknownInput {
                    path: path.to_owned(),
                    package: name.to_owned(),
                    input: input.clone(),
                });
            }
        }
        state.insert(name, true);
        order.push(name);
        Ok(())
    }
    let roots: Vec<&str> = match only {
        Some(n) => vec![n],
        None => recipe.packages.keys().map(String::as_str).collect(),
    };
    for r in roots {
        visit(r, &recipe, recipe_path, &mut state, &mut order)?;
    }

    let mut made: BTreeMap<&str, (StorePath, Hash, StorePath)> = BTreeMap::new(); // drv, hash modulo, out
    let mut result = Vec::new();
    for name in order {
        let package = &recipe.packages[name];
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
                    let (drv_path, _, out) = &made[input.as_str()];
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
        drv.env = env;
        for o in &outputs {
            drv.outputs.insert(o.clone(), DerivationOutput::Deferred);
        }
        let hashes: BTreeMap<StorePath, Hash> =
            made.values().map(|(d, h, _)| (d.clone(), *h)).collect();
        let lookup = |p: &StorePath| {
            hashes
                .get(p)
                .copied()
                .ok_or_else(|| std::io::Error::other("unknown input derivation"))
        };
        hash_modulo::fill_in_output_paths(&store_dir, &mut drv, name, lookup)
            .map_err(|e| invalid(format!("package '{name}': {e}")))?;
        let text = aterm::print(&store_dir, &drv);
        let refs: StorePathSet = drv.references();
        let info = store.add_text(&format!("{name}.drv"), &text, &refs)?;
        let hash = hash_modulo::hash_modulo(&store_dir, &drv, name, false, lookup)
            .map_err(|e| invalid(format!("package '{name}': {e}")))?;
        let out = drv
            .outputs
            .values()
            .next()
            .and_then(|o| o.path().cloned())
            .expect("output paths were just filled in");
        let out = drv
            .outputs
            .get("out")
            .and_then(|o| o.path().cloned())
            .unwrap_or(out);
        made.insert(name, (info.path.clone(), hash, out));
        result.push((name.to_owned(), info.path));
    }
    Ok(result)
}
