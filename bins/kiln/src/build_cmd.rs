//! `kiln build` and `kiln log`: realise derivations (`.drv` paths, JSON
//! derivations, Kiln recipes) in a local store, and show their build logs.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use kiln_derivation::{aterm, hash_modulo, json};
use kiln_formats::hash::Hash;
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_scheduler::events::{EventSink, InternalJson, PlainLines};
use kiln_scheduler::goals::{self, RunOptions, Wanted};
use kiln_scheduler::local::{LocalBackend, Rebuild};
use kiln_scheduler::logs::{log_dir_for_state_dir, read_log};
use kiln_scheduler::result::exit_code;
use kiln_scheduler::settings::Settings;

use crate::progress::Bar;
use kiln_store::local::LocalStore;
use kiln_store::{AddOptions, Store, StoreUrl, compute_closure, topo_sort};

/// Build derivations: `.drv` paths, JSON derivations or Kiln recipes.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The store to build in (`local?root=DIR`, a directory, or `local`).
    #[arg(long)]
    store: Option<String>,
    /// Concurrent local builds (`max-jobs`; a number or `auto`).
    #[arg(short = 'j', long = "max-jobs")]
    max_jobs: Option<String>,
    /// Build everything that can be built even when some builds fail.
    #[arg(short = 'k', long)]
    keep_going: bool,
    /// Where to make the symlink to the (first) output; default `result`.
    #[arg(short = 'o', long, conflicts_with = "no_out_link")]
    out_link: Option<PathBuf>,
    /// Make no `result` symlink.
    #[arg(long)]
    no_out_link: bool,
    /// Set a `nix.conf` setting, e.g. `--option sandbox-paths "/bin /usr"`.
    #[arg(long = "option", num_args = 2, value_names = ["NAME", "VALUE"])]
    option: Vec<String>,
    /// Read settings from this `nix.conf`-format file (after the system's).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Only say what would be built.
    #[arg(long)]
    dry_run: bool,
    /// Build valid outputs again and compare them (non-determinism check).
    #[arg(long, conflicts_with = "repair")]
    check: bool,
    /// Build valid outputs again and replace them.
    #[arg(long)]
    repair: bool,
    /// How to log: `bar` (a status line; the default on a terminal),
    /// `bar-with-logs` (the builds' logs above it), `raw` (plain lines;
    /// the default elsewhere) or `internal-json`. The bar needs stderr to be
    /// a terminal: elsewhere it gives plain lines.
    #[arg(long)]
    log_format: Option<String>,
    /// Do not show the builders' output.
    #[arg(short = 'Q', long)]
    no_build_output: bool,
    /// `.drv` paths (optionally `PATH!out,dev`), `.drv` files of another
    /// store's directory (imported with their closure), JSON derivation
    /// files (`*.json`), or recipes (`FILE.toml` or `FILE.toml#PACKAGE`).
    #[arg(required = true)]
    targets: Vec<String>,
}

/// Print the build log of a derivation or of an output path.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    #[arg(long)]
    store: Option<String>,
    /// A `.drv` path, or an output path whose deriver is known.
    path: String,
}

/// Opens the local store named by `url` (default: the machine's).
pub fn open_local_store(url: Option<&str>) -> Result<LocalStore> {
    let url = url
        .map(str::to_owned)
        .or_else(|| std::env::var("NIX_REMOTE").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "auto".into());
    let parsed: StoreUrl = url
        .parse()
        .with_context(|| format!("bad store URL '{url}'"))?;
    let config = parsed
        .local_config()
        .with_context(|| format!("bad store URL '{url}'"))?
        .with_context(|| {
            format!("'{url}' is not a local store: kiln build builds in local stores")
        })?;
    LocalStore::open(config).with_context(|| format!("cannot open store '{url}'"))
}

fn settings(args: &BuildArgs) -> Result<Settings> {
    let mut s = Settings::from_environment()?;
    if let Some(file) = &args.config {
        s.apply_file(file)?;
    }
    for pair in args.option.chunks(2) {
        s.set(&pair[0], &pair[1])?;
    }
    if let Some(j) = &args.max_jobs {
        s.set("max-jobs", j)?;
    }
    if args.keep_going {
        s.keep_going = true;
    }
    for name in &s.unknown {
        tracing::warn!("unknown setting '{name}'");
    }
    Ok(s)
}

/// Copies `paths` and their closure from `from` into `to` (what is missing),
/// in dependency order.
fn copy_closure(from: &dyn Store, to: &dyn Store, paths: &StorePathSet) -> Result<()> {
    let closure = compute_closure(from, paths, false, false, false)?;
    let missing: StorePathSet = closure
        .into_iter()
        .filter(|p| !to.is_valid_path(p).unwrap_or(false))
        .collect();
    for path in topo_sort(from, &missing)? {
        let info = from.path_info_or_error(&path)?;
        let mut nar = Vec::with_capacity(info.nar_size as usize);
        from.nar_from_path(&path, &mut nar)?;
        to.add_nar(&info, &mut &nar[..], AddOptions::default())
            .with_context(|| format!("cannot import '{}'", from.store_dir().display(&path)))?;
    }
    Ok(())
}

fn parse_wanted(spec: &str) -> (&str, Wanted) {
    match spec.split_once('!') {
        Some((path, outs)) if outs != "*" => (
            path,
            Wanted::Names(outs.split(',').map(str::to_owned).collect()),
        ),
        Some((path, _)) => (path, Wanted::All),
        None => (spec, Wanted::All),
    }
}

/// Derivations from a JSON file (as `nix derivation show` prints them)
/// written to the store, in input order so each one's inputs come first.
fn json_targets(store: &LocalStore, file: &Path) -> Result<Vec<StorePath>> {
    let store_dir = store.store_dir().clone();
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read '{}'", file.display()))?;
    let mut pending =
        json::parse(&store_dir, &text).with_context(|| format!("'{}'", file.display()))?;
    let mut written: Vec<StorePath> = Vec::new();
    let mut progress = true;
    while !pending.is_empty() && progress {
        progress = false;
        let mut rest = Vec::new();
        for jd in pending {
            let ready = jd
                .derivation
                .input_derivations
                .keys()
                .all(|d| store.is_valid_path(d).unwrap_or(false));
            if !ready {
                rest.push(jd);
                continue;
            }
            let name = jd
                .name
                .clone()
                .with_context(|| format!("'{}': a derivation has no name", file.display()))?;
            let mut drv = jd.derivation;
            let mut hashes =
                hash_modulo::DrvFileHashes::new(store_dir.clone(), store.real_store_dir());
            hash_modulo::fill_in_output_paths(&store_dir, &mut drv, &name, |p| {
                hashes.hash_modulo(p).map(|h: Hash| h)
            })
            .with_context(|| format!("'{}': derivation '{name}'", file.display()))?;
            let aterm_text = aterm::print(&store_dir, &drv);
            let info = store.add_text(&format!("{name}.drv"), &aterm_text, &drv.references())?;
            if let Some(key) = &jd.drv_path {
                if *key != info.path {
                    bail!(
                        "'{}': derivation keyed '{}' is really '{}' (its contents give that path)",
                        file.display(),
                        store_dir.display(key),
                        store_dir.display(&info.path)
                    );
                }
            }
            written.push(info.path);
            progress = true;
        }
        pending = rest;
    }
    if !pending.is_empty() {
        bail!(
            "'{}': {} derivations have input derivations that are neither in the store nor in the file",
            file.display(),
            pending.len()
        );
    }
    // Only the derivations nothing else in the file depends on are targets.
    let inputs: BTreeSet<StorePath> = written
        .iter()
        .flat_map(|p| {
            let text = std::fs::read(store.real_path(p)).unwrap_or_default();
            aterm::parse(&store_dir, &text)
                .map(|d| d.input_derivations.into_keys().collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    Ok(written
        .into_iter()
        .filter(|p| !inputs.contains(p))
        .collect())
}

fn resolve_targets(
    store: &LocalStore,
    settings: &Settings,
    specs: &[String],
) -> Result<Vec<(StorePath, Wanted)>> {
    let store_dir: StoreDir = store.store_dir().clone();
    let mut targets = Vec::new();
    for spec in specs {
        let (file_part, package) = match spec.split_once('#') {
            Some((f, p)) => (f, Some(p)),
            None => (spec.as_str(), None),
        };
        if file_part.ends_with(".toml") {
            let made = kiln_scheduler::recipe::instantiate(
                store,
                Path::new(file_part),
                &settings.system,
                package,
            )?;
            let chosen: Vec<StorePath> = match package {
                Some(p) => made
                    .into_iter()
                    .filter(|(n, _)| n == p)
                    .map(|(_, d)| d)
                    .collect(),
                None => made.into_iter().map(|(_, d)| d).collect(),
            };
            targets.extend(chosen.into_iter().map(|d| (d, Wanted::All)));
            continue;
        }
        if spec.ends_with(".json") {
            targets.extend(
                json_targets(store, Path::new(spec))?
                    .into_iter()
                    .map(|d| (d, Wanted::All)),
            );
            continue;
        }
        let (path_text, wanted) = parse_wanted(spec);
        if let Ok(path) = store_dir.parse_path(path_text) {
            if store.is_valid_path(&path)? {
                targets.push((path, wanted));
                continue;
            }
        }
        // A .drv file of another store's directory (`ROOT/nix/store/…drv`):
        // import it with its closure from that store.
        let file = Path::new(path_text);
        let file = std::fs::canonicalize(file).with_context(|| {
            format!(
                "'{path_text}' is neither a valid store path in '{}' nor a file",
                store.url()
            )
        })?;
        let base = file
            .file_name()
            .and_then(|n| n.to_str())
            .context("a .drv file name")?;
        let drv = StorePath::from_base_name(base)
            .with_context(|| format!("'{}' is not named like a store path", file.display()))?;
        let dir = file.parent().context("a .drv file has a directory")?;
        let root = dir
            .to_str()
            .and_then(|d| d.strip_suffix(store_dir.as_str()))
            .with_context(|| {
                format!(
                    "'{}' is not in a store directory '{}'",
                    file.display(),
                    store_dir.as_str()
                )
            })?;
        let root = if root.is_empty() { "/" } else { root };
        if Path::new(root)
            == store
                .real_store_dir()
                .parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("/"))
        {
            bail!(
                "'{}' is not valid in store '{}'",
                store_dir.display(&drv),
                store.url()
            );
        }
        let from = LocalStore::open_root(root)
            .with_context(|| format!("cannot open the store under '{root}'"))?;
        copy_closure(&from, store, &[drv.clone()].into())?;
        targets.push((drv, wanted));
    }
    Ok(targets)
}

/// The outputs `kiln build` shows and links for each successful target,
/// as nix-build does: `out` (or the first output) unless outputs were
/// named (`drv!dev,lib`).
fn shown_outputs<'a>(
    report: &'a goals::RunReport,
    wanted: &'a [Wanted],
) -> Vec<(usize, &'a Wanted, Vec<&'a StorePath>)> {
    report
        .targets
        .iter()
        .enumerate()
        .filter(|(_, (_, r))| r.status.is_success())
        .map(|(i, (_, r))| {
            let w = &wanted[i];
            let paths = match w {
                Wanted::Names(_) => r.outputs.values().collect(),
                Wanted::All => r
                    .outputs
                    .get("out")
                    .or_else(|| r.outputs.values().next())
                    .into_iter()
                    .collect(),
            };
            (i, w, paths)
        })
        .collect()
}

fn output_name(report: &goals::RunReport, target: usize, path: &StorePath) -> String {
    report.targets[target]
        .1
        .outputs
        .iter()
        .find(|(_, p)| *p == path)
        .map_or_else(|| "out".to_owned(), |(n, _)| n.clone())
}

fn out_link_name(base: &Path, index: usize, output: &str) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    if index > 0 {
        name.push(format!("-{}", index + 1));
    }
    if output != "out" {
        name.push(format!("-{output}"));
    }
    PathBuf::from(name)
}

pub fn run(args: BuildArgs) -> Result<ExitCode> {
    let settings = settings(&args)?;
    let store = Arc::new(open_local_store(args.store.as_deref())?);
    let store_dir = store.store_dir().clone();
    let targets = resolve_targets(&store, &settings, &args.targets)?;
    let wanted: Vec<Wanted> = targets.iter().map(|(_, w)| w.clone()).collect();
    let rebuild = if args.check {
        Rebuild::Check
    } else if args.repair {
        Rebuild::Repair
    } else {
        Rebuild::No
    };
    let options = RunOptions {
        max_jobs: settings.max_jobs,
        keep_going: settings.keep_going,
        dry_run: args.dry_run,
    };
    let backend = LocalBackend::new(store.clone(), settings)?
        .rebuild(rebuild, targets.iter().map(|(p, _)| p.clone()))
        .dry_run(args.dry_run);
    let terminal = std::io::stderr().is_terminal() && !args.dry_run;
    let bar = match args.log_format.as_deref() {
        None | Some("bar") if terminal => Some(Arc::new(Bar::new(false))),
        Some("bar-with-logs") if terminal => Some(Arc::new(Bar::new(!args.no_build_output))),
        _ => None,
    };
    let events: Arc<dyn EventSink> =
        match (args.log_format.as_deref(), &bar) {
            (_, Some(bar)) => bar.clone(),
            (Some("internal-json"), _) => {
                Arc::new(InternalJson::new(std::io::stderr(), store_dir.clone()))
            }
            (None | Some("plain" | "raw" | "bar" | "bar-with-logs"), _) => Arc::new(
                PlainLines::new(std::io::stderr(), store_dir.clone(), !args.no_build_output),
            ),
            (Some(other), _) => bail!(
                "unknown log format '{other}' (expected bar, bar-with-logs, raw or internal-json)"
            ),
        };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(goals::run(Arc::new(backend), targets, options, events));
    drop(runtime);
    if let Some(bar) = &bar {
        bar.finish();
    }

    if args.dry_run {
        if !report.would_build.is_empty() {
            eprintln!(
                "these {} derivations will be built:",
                report.would_build.len()
            );
            for p in &report.would_build {
                eprintln!("  {}", store_dir.display(p));
            }
        }
        if !report.would_substitute.is_empty() {
            eprintln!(
                "these {} paths will be fetched:",
                report.would_substitute.len()
            );
            for p in &report.would_substitute {
                eprintln!("  {}", store_dir.display(p));
            }
        }
        if args.json {
            let print = |paths: &[StorePath]| -> Vec<String> {
                paths.iter().map(|p| store_dir.print_path(p)).collect()
            };
            println!(
                "{}",
                serde_json::json!({ "willBuild": print(&report.would_build),
                    "willSubstitute": print(&report.would_substitute), "unknown": [] })
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut stdout = std::io::stdout().lock();
    if args.json {
        let list: Vec<serde_json::Value> = report
            .targets
            .iter()
            .map(|(drv, r)| {
                let outputs: serde_json::Map<String, serde_json::Value> = r
                    .outputs
                    .iter()
                    .map(|(n, p)| (n.clone(), store_dir.print_path(p).into()))
                    .collect();
                let mut v = serde_json::json!({ "drvPath": store_dir.print_path(drv), "outputs": outputs,
                    "status": r.status.name() });
                if !r.status.is_success() {
                    v["error"] = r.error.clone().into();
                }
                v
            })
            .collect();
        // Every goal's status, so callers can see what was built and what was not.
        let all: serde_json::Map<String, serde_json::Value> = report
            .results
            .iter()
            .map(|(d, r)| (store_dir.print_path(d), r.status.name().into()))
            .collect();
        writeln!(
            stdout,
            "{}",
            serde_json::json!({ "targets": list, "goals": all })
        )?;
    } else if report.targets.iter().all(|(_, r)| r.status.is_success()) {
        // As nix-build: the shown outputs, once everything succeeded.
        for (_, _, paths) in shown_outputs(&report, &wanted) {
            for p in paths {
                writeln!(stdout, "{}", store_dir.display(p))?;
            }
        }
    }
    if !args.no_out_link && !args.check {
        let base = args
            .out_link
            .clone()
            .unwrap_or_else(|| PathBuf::from("result"));
        for (i, _, outputs) in shown_outputs(&report, &wanted) {
            for (name, path) in outputs.iter().map(|p| (output_name(&report, i, p), p)) {
                let link = out_link_name(&base, i, &name);
                store
                    .add_perm_root(path, &link)
                    .with_context(|| format!("cannot create the out link '{}'", link.display()))?;
            }
        }
    }
    let code = exit_code(
        report
            .results
            .values()
            .chain(report.targets.iter().map(|(_, r)| r)),
    );
    // The bar's summary says it already.
    if code != 0 && std::io::stderr().is_terminal() && bar.is_none() {
        let failed = report
            .results
            .values()
            .filter(|r| !r.status.is_success())
            .count();
        eprintln!("{failed} of {} derivations failed", report.results.len());
    }
    Ok(ExitCode::from(code))
}

pub fn run_log(args: LogArgs) -> Result<ExitCode> {
    let store = open_local_store(args.store.as_deref())?;
    let store_dir = store.store_dir().clone();
    let path = store_dir
        .parse_path(args.path.split('!').next().unwrap_or(&args.path))
        .with_context(|| format!("'{}' is not a store path", args.path))?;
    let drv = if path.is_derivation() {
        path
    } else {
        let info = store.path_info_or_error(&path)?;
        match info.deriver {
            Some(d) => d,
            None => store
                .query_valid_derivers(&path)?
                .into_iter()
                .next()
                .with_context(|| format!("no derivation is known to have built '{}'", args.path))?,
        }
    };
    let log = read_log(&log_dir_for_state_dir(store.state_dir()), &drv)?;
    std::io::stdout().write_all(&log)?;
    Ok(ExitCode::SUCCESS)
}
