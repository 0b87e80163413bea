//! The outputs of a `.drv` being registered, for `DerivationOutputs`.

use std::collections::BTreeMap;

use kiln_formats::store_path::{StoreDir, StorePath};

/// The known output paths of the derivation in `contents`; empty (with a
/// warning) when it does not parse, so a file that merely ends in `.drv`
/// can still be added.
pub fn derivation_outputs(
    store_dir: &StoreDir,
    path: &StorePath,
    contents: &[u8],
) -> BTreeMap<String, StorePath> {
    match kiln_derivation::aterm::parse(store_dir, contents) {
        Ok(drv) => drv
            .output_paths()
            .map(|(name, p)| (name.to_owned(), p.clone()))
            .collect(),
        Err(e) => {
            tracing::warn!(path = %store_dir.display(path), error = %e, "registering a .drv that does not parse as a derivation");
            BTreeMap::new()
        }
    }
}
