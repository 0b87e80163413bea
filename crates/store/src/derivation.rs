//! Writing derivations into a store: `kiln derivation add FILE.json`.
//!
//! A derivation in JSON form may leave its output paths (and the matching
//! environment variables) empty or out; they are computed from its hash
//! modulo, reading its input derivations from the store, exactly as
//! `nix-instantiate` and `nix derivation add` do. The ATerm is then added
//! as a text path whose references are its input sources and input
//! derivations, and the outputs are recorded in `DerivationOutputs`.

use kiln_derivation::Derivation;
use kiln_derivation::aterm;
use kiln_derivation::hash_modulo::{DrvFileHashes, fill_in_output_paths};
use kiln_formats::store_path::StorePath;

use crate::local::LocalStore;
use crate::{Store, StoreError};

/// Computes the output paths of `drv` (named `name`), writes its `.drv`
/// into `store` and returns the `.drv`'s path. Its inputs must be valid.
pub fn add_derivation(
    store: &LocalStore,
    mut drv: Derivation,
    name: &str,
) -> Result<StorePath, StoreError> {
    let dir = store.store_dir().clone();
    for input in drv.input_derivations.keys().chain(drv.input_sources.iter()) {
        if !store.is_valid_path(input)? {
            return Err(StoreError::BadDerivation {
                name: name.to_owned(),
                what: format!(
                    "its input '{}' is not valid in the store",
                    dir.print_path(input)
                ),
            });
        }
    }
    let mut hashes = DrvFileHashes::new(dir.clone(), store.real_store_dir());
    fill_in_output_paths(&dir, &mut drv, name, |p| hashes.hash_modulo(p)).map_err(|e| {
        StoreError::BadDerivation {
            name: name.to_owned(),
            what: e.to_string(),
        }
    })?;
    let text = aterm::print(&dir, &drv);
    let info = store.add_text(&format!("{name}.drv"), &text, &drv.references())?;
    Ok(info.path)
}

/// Reads derivations from JSON (`nix show-derivation`'s form or a single
/// derivation object) and adds each; returns their `.drv` paths.
pub fn add_derivations_json(store: &LocalStore, json: &str) -> Result<Vec<StorePath>, StoreError> {
    let drvs = kiln_derivation::json::parse(store.store_dir(), json).map_err(|e| {
        StoreError::BadDerivation {
            name: "(JSON)".into(),
            what: e.to_string(),
        }
    })?;
    let mut paths = Vec::new();
    for d in drvs {
        let name = d.name.clone().ok_or_else(|| StoreError::BadDerivation {
            name: "(JSON)".into(),
            what: "it has no name: give a \"name\" key, an env.name, or key it by its .drv path"
                .into(),
        })?;
        paths.push(add_derivation(store, d.derivation, &name)?);
    }
    Ok(paths)
}
