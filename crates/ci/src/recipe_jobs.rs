//! Kiln's own evaluator: a recipe file's packages, instantiated into the
//! store as `.drv`s, as nix-eval-jobs lines (`kiln-ci eval-recipe FILE`).

use std::collections::BTreeMap;
use std::path::Path;

use kiln_scheduler::recipe::{self, RecipeError};
use kiln_store::Store as _;
use kiln_store::local::LocalStore;
use serde::Serialize;

/// One job line, as nix-eval-jobs prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobLine {
    pub attr: String,
    #[serde(rename = "drvPath")]
    pub drv_path: String,
    pub outputs: BTreeMap<String, String>,
    pub system: String,
}

/// Instantiates every package of the recipe at `path` into `store` and
/// returns its jobs, in dependency order.
pub fn recipe_jobs(
    store: &LocalStore,
    path: &Path,
    system: &str,
) -> Result<Vec<JobLine>, RecipeError> {
    let store_dir = store.store_dir().clone();
    let made = recipe::instantiate(store, path, system, None)?;
    let mut jobs = Vec::with_capacity(made.len());
    for (name, drv_path) in made {
        let real = store.real_path(&drv_path);
        let contents = std::fs::read(&real).map_err(|source| RecipeError::Read {
            path: real.clone(),
            source,
        })?;
        let (outputs, drv_system) = match kiln_derivation::aterm::parse(&store_dir, &contents) {
            Ok(drv) => (
                drv.output_paths()
                    .map(|(n, p)| (n.to_owned(), store_dir.print_path(p)))
                    .collect(),
                String::from_utf8_lossy(&drv.system).into_owned(),
            ),
            Err(_) => (BTreeMap::new(), system.to_owned()),
        };
        jobs.push(JobLine {
            attr: name,
            drv_path: store_dir.print_path(&drv_path),
            outputs,
            system: drv_system,
        });
    }
    Ok(jobs)
}
