//! `kiln store …`: work with a store (local by default) as `nix-store` and
//! `nix path-info` / `nix store …` do: add paths, query metadata and
//! references, collect garbage, verify, optimise, export and import.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use kiln_formats::hash::HashAlgo;
use kiln_formats::store_path::{FileIngestionMethod, StorePath, StorePathSet};
use kiln_protocol::open_store;
use kiln_store::local::gc::{GcAction, GcOptions};
use kiln_store::local::{BatchItem, Durability, LocalStore};
use kiln_store::{AddOptions, Store, StoreUrl, compute_closure, topo_sort};

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// The store to use: `local`, a directory (a store rooted there),
    /// `local?root=DIR`, a daemon (`daemon`, `unix://SOCKET`), … Local
    /// stores are created on first use; `auto` follows `$NIX_REMOTE` when set.
    #[arg(long, global = true, env = "KILN_STORE", default_value = "auto")]
    store: String,
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Add files or trees to the store and print their paths (like `nix-store --add`).
    Add {
        /// Hash the file's bytes instead of its NAR (like `nix-store --add-fixed` without -r).
        #[arg(long)]
        flat: bool,
        /// Hash algorithm for the content address (md5, sha1, sha256, sha512).
        #[arg(long, default_value = "sha256")]
        hash_algo: HashAlgo,
        /// Name of the store path (default: the file's name); only with one path.
        #[arg(long)]
        name: Option<String>,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show metadata of store paths (like `nix path-info`).
    PathInfo {
        /// Print the JSON that `nix path-info --json` prints.
        #[arg(long)]
        json: bool,
        /// Include the closure of the paths.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Show the closure size of each path.
        #[arg(short = 'S', long)]
        closure_size: bool,
        /// Every valid path in the store.
        #[arg(long)]
        all: bool,
        #[arg(required_unless_present = "all")]
        paths: Vec<String>,
    },
    /// Print the references of a path.
    References { path: String },
    /// Print the valid paths referring to a path.
    Referrers { path: String },
    /// Print the closure of paths, dependencies first.
    Requisites {
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Print the references of a path as a tree (like `nix-store -q --tree`).
    Tree { path: String },
    /// Collect garbage, or show roots, live or dead paths (like `nix-store --gc`).
    Gc {
        /// Print the roots and the links holding them.
        #[arg(long, conflicts_with_all = ["print_live", "print_dead", "delete"])]
        print_roots: bool,
        /// Print the live paths instead of deleting anything.
        #[arg(long, conflicts_with_all = ["print_dead", "delete"])]
        print_live: bool,
        /// Print the dead paths instead of deleting them.
        #[arg(long, conflicts_with = "delete")]
        print_dead: bool,
        /// Delete just these paths, refusing any that is still alive.
        #[arg(long, num_args = 1..)]
        delete: Vec<String>,
        /// Stop after freeing this many bytes.
        #[arg(long)]
        max_freed: Option<u64>,
        /// Keep outputs of live derivations (as `keep-outputs = true` in
        /// nix.conf, which is read too).
        #[arg(long)]
        keep_outputs: bool,
        /// Do not keep the derivers of live paths (as `keep-derivations =
        /// false` in nix.conf, which is read too).
        #[arg(long)]
        no_keep_derivations: bool,
    },
    /// Check the store: database against disk, and with --check-contents every hash.
    Verify {
        #[arg(long)]
        check_contents: bool,
        /// Fetch damaged paths again from the store given by --repair-from.
        #[arg(long, requires = "repair_from")]
        repair: bool,
        /// Store (substituter) to repair from.
        #[arg(long)]
        repair_from: Option<String>,
    },
    /// Hard-link identical files in the store (like `nix-store --optimise`).
    Optimise,
    /// Write paths in `nix-store --export` format to standard output.
    Export {
        /// Export the closure of the paths.
        #[arg(short = 'r', long)]
        recursive: bool,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Read a `nix-store --export` stream from standard input and add its paths.
    Import,
    #[command(flatten)]
    Cache(crate::cache_cmd::CacheCommand),
    /// Make a signing key pair (like `nix-store --generate-binary-cache-key`).
    GenerateKey {
        /// Key name, e.g. `cache.example.org-1`.
        name: String,
        /// File for the secret key.
        secret_key_file: PathBuf,
        /// File for the public key.
        public_key_file: PathBuf,
    },
}

pub fn run(args: StoreArgs) -> anyhow::Result<ExitCode> {
    let url = args.store.as_str();
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    match args.command {
        StoreCommand::Add {
            flat,
            hash_algo,
            name,
            paths,
        } => {
            if name.is_some() && paths.len() != 1 {
                bail!("--name applies to one path, but {} were given", paths.len());
            }
            let store = open_local(url)?;
            let method = if flat {
                FileIngestionMethod::Flat
            } else {
                FileIngestionMethod::Recursive
            };
            let items = paths
                .iter()
                .map(|p| {
                    let name = match &name {
                        Some(n) => n.clone(),
                        None => base_name(p)?,
                    };
                    Ok(BatchItem {
                        name,
                        source: p.clone(),
                        method,
                        algo: hash_algo,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let durability = if items.len() > 1 {
                Durability::Batch
            } else {
                Durability::FsyncEach
            };
            let infos = store.add_paths(&items, AddOptions::default(), durability)?;
            for info in infos {
                writeln!(out, "{}", store.store_dir().print_path(&info.path))?;
            }
        }
        StoreCommand::PathInfo {
            json,
            recursive,
            closure_size,
            all,
            paths,
        } => {
            let store = open_store(url)?;
            let mut set = if all {
                store.query_all_valid_paths()?
            } else {
                StorePathSet::new()
            };
            for p in &paths {
                set.insert(parse_path(&*store, p)?);
            }
            if recursive {
                set = compute_closure(&*store, &set, false, false, false)?;
            }
            let size_of = |p: &StorePath| -> anyhow::Result<u64> {
                let closure = compute_closure(
                    &*store,
                    &[p.clone()].into_iter().collect(),
                    false,
                    false,
                    false,
                )?;
                let mut total = 0;
                for q in closure {
                    total += store.path_info_or_error(&q)?.nar_size;
                }
                Ok(total)
            };
            if json {
                // Typed (not `serde_json::Value`) so the keys keep Nix's order.
                #[derive(serde::Serialize)]
                #[serde(untagged)]
                enum Item {
                    Valid(kiln_store::PathInfoJson),
                    Invalid { path: String, valid: bool },
                }
                let mut items = Vec::new();
                for p in &set {
                    match store.query_path_info(p)? {
                        Some(info) => {
                            let size = if closure_size {
                                Some(size_of(p)?)
                            } else {
                                None
                            };
                            items.push(Item::Valid(info.to_json(store.store_dir(), size)));
                        }
                        None => items.push(Item::Invalid {
                            path: store.store_dir().print_path(p),
                            valid: false,
                        }),
                    }
                }
                serde_json::to_writer(&mut out, &items)?;
            } else {
                for p in &set {
                    let info = store.path_info_or_error(p)?;
                    if closure_size {
                        writeln!(
                            out,
                            "{}\t{}",
                            store.store_dir().print_path(p),
                            size_of(&info.path)?
                        )?;
                    } else {
                        writeln!(out, "{}", store.store_dir().print_path(p))?;
                    }
                }
            }
        }
        StoreCommand::References { path } => {
            let store = open_store(url)?;
            let p = parse_path(&*store, &path)?;
            for r in store.query_references(&p)? {
                writeln!(out, "{}", store.store_dir().print_path(&r))?;
            }
        }
        StoreCommand::Referrers { path } => {
            let store = open_store(url)?;
            let p = parse_path(&*store, &path)?;
            store.path_info_or_error(&p)?;
            for r in store.query_referrers(&p)? {
                writeln!(out, "{}", store.store_dir().print_path(&r))?;
            }
        }
        StoreCommand::Requisites { paths } => {
            let store = open_store(url)?;
            let mut set = StorePathSet::new();
            for p in &paths {
                set.insert(parse_path(&*store, p)?);
            }
            let closure = compute_closure(&*store, &set, false, false, false)?;
            for p in topo_sort(&*store, &closure)? {
                writeln!(out, "{}", store.store_dir().print_path(&p))?;
            }
        }
        StoreCommand::Tree { path } => {
            let store = open_store(url)?;
            let p = parse_path(&*store, &path)?;
            let mut done = BTreeSet::new();
            writeln!(out, "{}", store.store_dir().print_path(&p))?;
            print_tree(&*store, &p, "", &mut done, &mut out)?;
        }
        StoreCommand::Gc {
            print_roots,
            print_live,
            print_dead,
            delete,
            max_freed,
            keep_outputs,
            no_keep_derivations,
        } => {
            let store = open_local(url)?;
            if print_roots {
                for (path, links) in store.find_roots()? {
                    for link in links {
                        writeln!(
                            out,
                            "{} -> {}",
                            link.display(),
                            store.store_dir().print_path(&path)
                        )?;
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let action = if print_live {
                GcAction::ReturnLive
            } else if print_dead {
                GcAction::ReturnDead
            } else if !delete.is_empty() {
                let mut set = StorePathSet::new();
                for p in &delete {
                    set.insert(parse_path(&store, p)?);
                }
                GcAction::DeleteSpecific(set)
            } else {
                GcAction::DeleteDead
            };
            let deleting = matches!(action, GcAction::DeleteDead | GcAction::DeleteSpecific(_));
            // nix.conf's keep-outputs / keep-derivations, as Nix reads
            // them; the flags override.
            let conf = kiln_store::nix_conf::NixConf::load()?;
            let mut options = GcOptions::from_nix_conf(&conf)?;
            options.action = action;
            options.keep_outputs |= keep_outputs;
            options.keep_derivations &= !no_keep_derivations;
            options.max_freed = max_freed.unwrap_or(u64::MAX);
            let results = store.collect_garbage(&options)?;
            if deleting {
                let mut err = io::BufWriter::new(io::stderr().lock());
                for p in &results.paths {
                    writeln!(err, "deleting '{}'", store.store_dir().print_path(p))?;
                }
                err.flush()?;
                writeln!(
                    out,
                    "{} store paths deleted, {:.2} MiB freed",
                    results.paths.len(),
                    results.bytes_freed as f64 / (1024.0 * 1024.0)
                )?;
            } else {
                for p in &results.paths {
                    writeln!(out, "{}", store.store_dir().print_path(p))?;
                }
            }
        }
        StoreCommand::Verify {
            check_contents,
            repair,
            repair_from,
        } => {
            let store = open_local(url)?;
            let source = match (&repair_from, repair) {
                (Some(from), true) => Some(
                    open_store(from).with_context(|| format!("opening repair source '{from}'"))?,
                ),
                _ => None,
            };
            eprintln!(
                "checking path existence{}...",
                if check_contents { " and contents" } else { "" }
            );
            let report = store.verify(check_contents, source.as_deref())?;
            for problem in &report.problems {
                match problem {
                    kiln_store::local::verify::Problem::Missing(p) => {
                        eprintln!(
                            "path '{}' is valid but missing on disk",
                            store.store_dir().print_path(p)
                        )
                    }
                    kiln_store::local::verify::Problem::Modified {
                        path,
                        expected,
                        actual,
                        ..
                    } => eprintln!(
                        "path '{}' was modified! expected hash '{}', got '{}'",
                        store.store_dir().print_path(path),
                        expected.to_typed_string(kiln_formats::hash::HashFormat::Nixbase32),
                        actual.to_typed_string(kiln_formats::hash::HashFormat::Nixbase32)
                    ),
                }
            }
            for p in &report.repaired {
                eprintln!("repaired '{}'", store.store_dir().print_path(p));
            }
            for (p, why) in &report.unrepaired {
                eprintln!(
                    "could not repair '{}': {why}",
                    store.store_dir().print_path(p)
                );
            }
            if !report.is_clean() {
                return Ok(ExitCode::FAILURE);
            }
        }
        StoreCommand::Optimise => {
            let store = open_local(url)?;
            let stats = store.optimise()?;
            writeln!(
                out,
                "{:.2} MiB freed by hard-linking {} files",
                stats.bytes_saved as f64 / (1024.0 * 1024.0),
                stats.files_linked
            )?;
        }
        StoreCommand::Export { recursive, paths } => {
            let store = open_store(url)?;
            let mut set = StorePathSet::new();
            for p in &paths {
                set.insert(parse_path(&*store, p)?);
            }
            if recursive {
                set = compute_closure(&*store, &set, false, false, false)?;
            }
            drop(out);
            // Straight to the descriptor, in large writes.
            let mut raw = BufWriter::with_capacity(
                1 << 20,
                File::from(io::stdout().as_fd().try_clone_to_owned()?),
            );
            kiln_store::export::export_paths(&*store, &set, &mut raw)?;
            raw.flush()?;
            return Ok(ExitCode::SUCCESS);
        }
        StoreCommand::Import => {
            let store = open_local(url)?;
            let stdin = io::stdin();
            let mut input = io::BufReader::with_capacity(1 << 20, stdin.lock());
            let imported = store.import_paths(&mut input as &mut dyn BufRead)?;
            for p in imported {
                writeln!(out, "{}", store.store_dir().print_path(&p))?;
            }
        }
        StoreCommand::Cache(command) => return crate::cache_cmd::run(url, command),
        StoreCommand::GenerateKey {
            name,
            secret_key_file,
            public_key_file,
        } => {
            let key = kiln_formats::signature::SecretKey::generate(&name)
                .with_context(|| format!("generating a key named '{name}'"))?;
            write_private(&secret_key_file, key.to_string().as_bytes())?;
            std::fs::write(&public_key_file, key.to_public().to_string())
                .with_context(|| format!("writing '{}'", public_key_file.display()))?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating '{}'", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing '{}'", path.display()))
}

/// The local store named by `url`; other kinds are refused with a message.
fn open_local(url: &str) -> anyhow::Result<LocalStore> {
    let parsed: StoreUrl = url.parse()?;
    let Some(config) = parsed.local_config()? else {
        bail!(
            "this command needs a local store, but '{url}' is not one (expected local, a directory or local?root=DIR)"
        );
    };
    Ok(LocalStore::open(config).with_context(|| format!("opening store '{url}'"))?)
}

fn base_name(path: &Path) -> anyhow::Result<String> {
    let abs =
        std::path::absolute(path).with_context(|| format!("resolving '{}'", path.display()))?;
    abs.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "'{}' has no file name to name its store path after; use --name",
                path.display()
            )
        })
}

/// A store path given as `/nix/store/…` (or a path inside one), a bare
/// `<hash>-<name>`, or a symlink (such as `./result`) leading to one.
fn parse_path(store: &dyn Store, arg: &str) -> anyhow::Result<StorePath> {
    let dir = store.store_dir();
    if let Ok((p, _)) = dir.split_path(arg) {
        return Ok(p);
    }
    if !arg.contains('/') {
        if let Ok(p) = arg.parse::<StorePath>() {
            return Ok(p);
        }
    }
    let mut current = PathBuf::from(arg);
    for _ in 0..40 {
        match std::fs::read_link(&current) {
            Ok(target) => {
                let target = current.parent().map_or(target.clone(), |p| p.join(&target));
                if let Some(s) = target.to_str() {
                    if let Ok((p, _)) = dir.split_path(s) {
                        return Ok(p);
                    }
                }
                current = target;
            }
            Err(_) => break,
        }
    }
    bail!("'{arg}' is not a store path of '{dir}' (nor a symlink to one)")
}

fn print_tree(
    store: &dyn Store,
    path: &StorePath,
    prefix: &str,
    done: &mut BTreeSet<StorePath>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if !done.insert(path.clone()) {
        return Ok(());
    }
    let refs: StorePathSet = store
        .query_references(path)?
        .into_iter()
        .filter(|r| r != path)
        .collect();
    let children = topo_sort(store, &refs)?;
    for (i, child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        let seen = done.contains(child);
        writeln!(
            out,
            "{prefix}{}{}{}",
            "+---",
            store.store_dir().print_path(child),
            if seen { " [...]" } else { "" }
        )?;
        if !seen {
            let next = format!("{prefix}{}", if last { "    " } else { "|   " });
            print_tree(store, child, &next, done, out)?;
        }
    }
    Ok(())
}

/// `kiln derivation add FILE.json`.
#[derive(Debug, clap::Args)]
pub struct DerivationAddArgs {
    /// The JSON file (`-` for standard input).
    file: PathBuf,
    /// The store to add to: `local`, a directory, `local?root=DIR`.
    #[arg(long, env = "KILN_STORE", default_value = "auto")]
    store: String,
}

pub fn derivation_add(args: DerivationAddArgs) -> anyhow::Result<ExitCode> {
    let json = if args.file.as_os_str() == "-" {
        io::read_to_string(io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading '{}'", args.file.display()))?
    };
    let store = open_local(&args.store)?;
    let paths = kiln_store::derivation::add_derivations_json(&store, &json)
        .with_context(|| format!("adding the derivations of '{}'", args.file.display()))?;
    let mut out = io::stdout().lock();
    for p in paths {
        writeln!(out, "{}", store.store_dir().print_path(&p))?;
    }
    Ok(ExitCode::SUCCESS)
}
