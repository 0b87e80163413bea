//! `kiln derivation …`: show `.drv` files as JSON and check that their paths
//! follow from their content.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use kiln_derivation::hash_modulo::{self, DrvFileHashes};
use kiln_derivation::{Derivation, aterm, drv_name, json};
use kiln_formats::store_path::{StoreDir, StorePath};

#[derive(Debug, clap::Args)]
pub struct DerivationArgs {
    #[command(subcommand)]
    command: DerivationCommand,
}

#[derive(Debug, Subcommand)]
enum DerivationCommand {
    /// Print derivations as JSON, exactly as Nix 2.8's `nix show-derivation` does.
    Show {
        #[command(flatten)]
        files: FilesArgs,
        /// Include every input derivation, recursively.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Re-derive each derivation's output paths and its own `.drv` path from its
    /// content (reading the input derivations it names from the same store) and
    /// say whether they agree with the file; exit 1 on any disagreement.
    Check(FilesArgs),
    /// Add derivations given as JSON (`nix show-derivation`'s form, output
    /// paths may be empty) to a store, computing their output paths; print
    /// each `.drv` path.
    Add(crate::store_cmd::DerivationAddArgs),
}

#[derive(Debug, clap::Args)]
struct FilesArgs {
    /// `.drv` files: paths on disk, or logical store paths (`/nix/store/…drv`)
    /// when the store lives elsewhere (`--store`). Input derivations are read
    /// from the directory of each file unless a store is given.
    #[arg(required = true, value_name = "FILE.drv")]
    files: Vec<PathBuf>,
    /// A store whose physical root is not `/`: `local?root=DIR` or just `DIR`
    /// (its files are then under `DIR/nix/store`).
    #[arg(long, value_name = "URL|DIR", conflicts_with = "store_root")]
    store: Option<String>,
    /// The physical root of the store, like `--store local?root=DIR`.
    #[arg(long, value_name = "DIR")]
    store_root: Option<PathBuf>,
    /// The logical store directory, part of every store path's hash.
    #[arg(
        long,
        value_name = "DIR",
        env = "NIX_STORE_DIR",
        default_value = "/nix/store"
    )]
    store_dir: String,
}

/// Where the files of the store are, and the logical store directory.
struct Location {
    store: StoreDir,
    /// The physical root (`local?root=`), if the store is not at `/`.
    root: Option<PathBuf>,
}

impl Location {
    fn new(args: &FilesArgs) -> anyhow::Result<Location> {
        let store = StoreDir::new(args.store_dir.clone())
            .with_context(|| format!("bad store directory '{}'", args.store_dir))?;
        let root = match (&args.store, &args.store_root) {
            (_, Some(root)) => Some(root.clone()),
            (Some(url), None) => Some(parse_store_url(url)?),
            (None, None) => None,
        };
        Ok(Location { store, root })
    }

    /// The `.drv` path a file stands for, where to read it, and the directory
    /// its input derivations are in.
    fn resolve(&self, file: &Path) -> anyhow::Result<(StorePath, PathBuf, PathBuf)> {
        let base = file
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("'{}' does not name a file", file.display()))?;
        let drv_path = StorePath::from_base_name(base).with_context(|| {
            format!(
                "'{}' is not named like a store derivation (<hash>-<name>.drv)",
                file.display()
            )
        })?;
        if !drv_path.is_derivation() {
            bail!("'{}' is not a derivation (.drv)", file.display());
        }
        let physical_store = |root: &Path| {
            root.join(
                self.store
                    .as_str()
                    .strip_prefix('/')
                    .unwrap_or(self.store.as_str()),
            )
        };
        Ok(match &self.root {
            Some(root) => {
                let dir = physical_store(root);
                // Both a logical path and a path to the file itself are fine.
                let physical = if file.starts_with(self.store.as_str()) {
                    dir.join(base)
                } else {
                    file.to_owned()
                };
                (drv_path, physical, dir)
            }
            None => {
                if file.starts_with(self.store.as_str()) && !file.exists() {
                    bail!(
                        "'{}' does not exist; if the store lives under another root, \
                         give it with --store local?root=DIR or --store-root DIR",
                        file.display()
                    );
                }
                let dir = match file.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                    _ => PathBuf::from("."),
                };
                (drv_path, file.to_owned(), dir)
            }
        })
    }
}

/// The physical root named by a store URL: `DIR`, `local?root=DIR`.
fn parse_store_url(url: &str) -> anyhow::Result<PathBuf> {
    if url.starts_with('/') {
        return Ok(PathBuf::from(url));
    }
    let query = url
        .strip_prefix("local?")
        .with_context(|| format!("unsupported store '{url}' (expected local?root=DIR or DIR)"))?;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("root="))
        .map(PathBuf::from)
        .with_context(|| format!("store '{url}' has no root=DIR"))
}

pub fn run(args: DerivationArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DerivationCommand::Show { files, recursive } => show(&files, recursive),
        DerivationCommand::Check(files) => check(&files),
        DerivationCommand::Add(args) => crate::store_cmd::derivation_add(args),
    }
}

fn read_derivation(
    store: &StoreDir,
    drv_path: &StorePath,
    file: &Path,
) -> anyhow::Result<(Vec<u8>, Derivation)> {
    let text = std::fs::read(file)
        .with_context(|| format!("cannot read derivation '{}'", file.display()))?;
    let drv = aterm::parse(store, &text).with_context(|| {
        format!(
            "cannot parse derivation '{}' ({})",
            store.display(drv_path),
            file.display()
        )
    })?;
    Ok((text, drv))
}

fn show(args: &FilesArgs, recursive: bool) -> anyhow::Result<ExitCode> {
    let location = Location::new(args)?;
    let mut drvs = BTreeMap::new();
    for file in &args.files {
        let (drv_path, physical, input_dir) = location.resolve(file)?;
        let (_, drv) = read_derivation(&location.store, &drv_path, &physical)?;
        let mut pending: Vec<StorePath> = if recursive {
            drv.input_derivations.keys().cloned().collect()
        } else {
            Vec::new()
        };
        drvs.insert(drv_path, drv);
        while let Some(input) = pending.pop() {
            if drvs.contains_key(&input) {
                continue;
            }
            let file = input_dir.join(input.base_name());
            let (_, drv) = read_derivation(&location.store, &input, &file)?;
            pending.extend(drv.input_derivations.keys().cloned());
            drvs.insert(input, drv);
        }
    }
    let mut out = json::print(&location.store, &drvs);
    out.push(b'\n');
    std::io::stdout()
        .lock()
        .write_all(&out)
        .context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

fn check(args: &FilesArgs) -> anyhow::Result<ExitCode> {
    let location = Location::new(args)?;
    let mut all_agree = true;
    // One memo per input directory, so files of one store share their work.
    let mut hashes: BTreeMap<PathBuf, DrvFileHashes> = BTreeMap::new();
    for file in &args.files {
        match check_one(&location, file, &mut hashes) {
            Ok(problems) if problems.is_empty() => {}
            Ok(problems) => {
                all_agree = false;
                for problem in problems {
                    println!("  {problem}");
                }
            }
            Err(err) => {
                all_agree = false;
                println!("{}: cannot check: {err:#}", file.display());
            }
        }
    }
    Ok(if all_agree {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Checks one file; prints its verdict line and returns what disagrees.
fn check_one(
    location: &Location,
    file: &Path,
    hashes: &mut BTreeMap<PathBuf, DrvFileHashes>,
) -> anyhow::Result<Vec<String>> {
    let store = &location.store;
    let (drv_path, physical, input_dir) = location.resolve(file)?;
    let (text, drv) = read_derivation(store, &drv_path, &physical)?;
    let name = drv_name(&drv_path).expect("resolve accepts only .drv paths");
    let mut problems = Vec::new();

    if aterm::print(store, &drv) != text {
        problems.push(
            "the file is not in the canonical form Nix writes (printing it back differs)"
                .to_owned(),
        );
    }
    let expected_drv_path = hash_modulo::drv_path_of(store, &drv, name, &text)
        .with_context(|| format!("cannot compute the .drv path of '{}'", file.display()))?;
    if expected_drv_path != drv_path {
        problems.push(format!(
            ".drv path: the file is named {}, its content gives {}",
            store.display(&drv_path),
            store.display(&expected_drv_path)
        ));
    }

    let files = hashes
        .entry(input_dir.clone())
        .or_insert_with(|| DrvFileHashes::new(store.clone(), &input_dir));
    files.check_input_outputs(&drv_path, &drv)?;
    let expected = hash_modulo::output_paths(store, &drv, name, |input: &StorePath| {
        files.hash_modulo(input)
    })
    .with_context(|| format!("cannot compute the output paths of '{}'", file.display()))?;
    for (output, expected_path) in &expected {
        let expected_text = store.print_path(expected_path);
        match drv.outputs[output].path() {
            Some(actual) if actual == expected_path => {}
            Some(actual) => problems.push(format!(
                "output '{output}': the file says {}, expected {expected_text}",
                store.display(actual)
            )),
            None => problems.push(format!(
                "output '{output}': the file has no path, expected {expected_text}"
            )),
        }
        if let Some(value) = drv.env.get(output.as_bytes()) {
            if *value != expected_text.as_bytes() {
                problems.push(format!(
                    "environment variable '{output}': the file says {value}, expected {expected_text}"
                ));
            }
        }
    }

    if problems.is_empty() {
        println!(
            "{}: ok (.drv path and {} output path{} agree)",
            store.display(&drv_path),
            expected.len(),
            if expected.len() == 1 { "" } else { "s" }
        );
    } else {
        println!("{}: DISAGREES", store.display(&drv_path));
    }
    Ok(problems)
}
