//! `offload-hook`: Kiln's build hook. Started by a daemon (Kiln's
//! scheduler, or Nix's `nix-daemon` with `build-hook = …/offload-hook`) it
//! speaks the build-hook protocol on stdin/stderr; `offload-hook test` and
//! `offload-hook status` check the machines of a machines file by hand.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_offload::choice::Chooser;
use kiln_offload::hook::{self, HookSettings};
use kiln_offload::machines::{self, Machine};
use kiln_offload::remote;
use kiln_offload::ssh::{LogSink, SshTarget};
use kiln_store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "offload-hook",
    version,
    about = "Kiln's build hook: builds on other machines over SSH"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check every machine: connect, run the remote program, send and
    /// fetch a small path, build a trivial derivation.
    Test(Common),
    /// Show each machine's load, slots in use, and whether it is down.
    Status(Common),
}

#[derive(Debug, clap::Args)]
struct Common {
    /// The machines file (default: the `builders` setting, else
    /// /etc/nix/machines).
    #[arg(long)]
    machines: Option<PathBuf>,
    /// The local store whose offload state (slots, marks) to use.
    #[arg(long, env = "KILN_STORE", default_value = "auto")]
    store: String,
}

fn main() -> ExitCode {
    // Diagnostics go to stderr, which is also the hook protocol's channel:
    // the scheduler shows lines not starting with `# ` as the hook's log.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    let first = std::env::args().nth(1).unwrap_or_default();
    let is_cli = matches!(
        first.as_str(),
        "test" | "status" | "help" | "--help" | "-h" | "--version" | "-V"
    );
    if !is_cli {
        // Started by a daemon (which passes its verbosity as the argument).
        return match hook::run(&mut std::io::stdin().lock()) {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                eprintln!("offload-hook: error: {e}");
                ExitCode::from(hook::EXIT_TRANSIENT as u8)
            }
        };
    }
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Test(c) => test(c),
        Cmd::Status(c) => status(c),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "offload-hook: error: {}",
                kiln_formats::report::chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn load_machines(c: &Common) -> Result<(HookSettings, Vec<Machine>)> {
    let mut settings = HookSettings::default();
    settings.raw.insert("store".into(), c.store.clone());
    let system = settings.system();
    let ms = match &c.machines {
        Some(f) => machines::read_machines_file(f, &system)?,
        None => {
            let builders = std::env::var("NIX_CONFIG")
                .ok()
                .and_then(|t| {
                    t.lines().find_map(|l| {
                        l.trim()
                            .strip_prefix("builders")
                            .map(|v| v.trim_start_matches([' ', '=']).to_owned())
                    })
                })
                .unwrap_or_else(|| "@/etc/nix/machines".into());
            machines::parse_builders(&builders, "builders", &system)?
        }
    };
    anyhow::ensure!(!ms.is_empty(), "no machines are listed");
    Ok((settings, ms))
}

fn table(rows: &[Vec<String>]) {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}

fn status(c: Common) -> Result<ExitCode> {
    let (settings, ms) = load_machines(&c)?;
    let store = settings.open_store()?;
    let chooser = hook::chooser_for(&store)?;
    let mut rows = vec![vec![
        "MACHINE".into(),
        "SYSTEMS".into(),
        "SLOTS".into(),
        "SPEED".into(),
        "LOAD".into(),
        "CORES".into(),
        "FREE".into(),
        "STATE".into(),
    ]];
    for m in &ms {
        let st = chooser.state(m)?;
        let load = if st.down_for.is_some() {
            st.load.map(Ok)
        } else {
            Some(chooser.load(m))
        };
        let (l, cores, free, note) = match load {
            Some(Ok(l)) => (
                format!("{:.2}", l.load1),
                l.cores.to_string(),
                format!("{} MiB", l.free_bytes >> 20),
                None,
            ),
            Some(Err(e)) => (
                "-".into(),
                "-".into(),
                "-".into(),
                Some(format!("unreachable: {e}")),
            ),
            None => ("-".into(), "-".into(), "-".into(), None),
        };
        let state = match (st.down_for, note) {
            (Some(d), _) => format!("down for {}s ({} failures)", d.as_secs(), st.failures),
            (None, Some(n)) => n,
            (None, None) => "up".into(),
        };
        rows.push(vec![
            m.uri.clone(),
            m.systems.join(","),
            format!("{}/{}", st.slots_in_use, m.max_jobs),
            format!("{}", m.speed_factor),
            l,
            cores,
            free,
            state,
        ]);
    }
    table(&rows);
    Ok(ExitCode::SUCCESS)
}

/// A trivial derivation to build on each machine: writes a line naming
/// the time, so it is new each run.
fn trivial_drv(
    store: &kiln_store::local::LocalStore,
) -> Result<kiln_formats::store_path::StorePath> {
    let sd = store.store_dir().clone();
    let stamp = format!("{:?}", std::time::SystemTime::now());
    let name = "offload-test";
    let text = format!(
        r#"Derive([("out","","","")],[],[],"{sys}","/bin/sh",["-c","echo ok {stamp} > $out"],[("builder","/bin/sh"),("name","{name}"),("out",""),("system","{sys}")])"#,
        sys = hook::this_system()
    );
    let drv = kiln_derivation::aterm::parse(&sd, text.as_bytes())?;
    let path = kiln_store::derivation::add_derivation(store, drv, name)?;
    Ok(path)
}

fn test(c: Common) -> Result<ExitCode> {
    let (_, ms) = load_machines(&c)?;
    // A throwaway store: the test must not leave anything in the real one.
    let dir = tempfile::tempdir()?;
    let store = kiln_store::local::LocalStore::open_root(dir.path().join("root"))?;
    let chooser = hook::chooser_for(&store)?;
    let mut rows = vec![vec![
        "MACHINE".into(),
        "CONNECT".into(),
        "PROGRAM".into(),
        "SEND".into(),
        "FETCH".into(),
        "BUILD".into(),
        "RESULT".into(),
    ]];
    let mut all_ok = true;
    for m in &ms {
        let mut row = vec![m.uri.clone()];
        let r = test_one(m, &store, &chooser, &mut row);
        while row.len() < 6 {
            row.push("-".into());
        }
        match r {
            Ok(()) => row.push("ok".into()),
            Err(e) => {
                all_ok = false;
                row.push(format!("FAILED: {}", format!("{e:#}").replace('\n', " ")));
            }
        }
        rows.push(row);
    }
    table(&rows);
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn test_one(
    m: &Machine,
    store: &kiln_store::local::LocalStore,
    chooser: &Chooser,
    row: &mut Vec<String>,
) -> Result<()> {
    let target = SshTarget::new(m, &chooser.ssh_state)?;
    let t = Instant::now();
    let load = target.probe_load().context("connecting")?;
    row.push(format!("{} (load {:.2})", ms(t.elapsed()), load.load1));
    let t = Instant::now();
    let quiet = LogSink::new(std::io::sink());
    let stamp = format!("offload test {:?}\n", std::time::SystemTime::now());
    let info = store.add_text("offload-test-path", stamp.as_bytes(), &Default::default())?;
    let paths: BTreeSet<_> = [info.path.clone()].into();
    // Sending runs the remote program and its handshake.
    let sent =
        remote::copy_to(&target, store, &paths, quiet.clone()).map_err(anyhow::Error::from)?;
    row.push(target.remote_program());
    row.push(format!("{} ({} path)", ms(t.elapsed()), sent.sent_paths));
    // Fetch it back into a second throwaway store.
    let dir2 = tempfile::tempdir()?;
    let store2 = kiln_store::local::LocalStore::open_root(dir2.path().join("root"))?;
    let t = Instant::now();
    remote::copy_from(&target, &store2, &paths, quiet.clone()).map_err(anyhow::Error::from)?;
    anyhow::ensure!(
        store2.is_valid_path(&info.path)?,
        "the fetched path is not valid"
    );
    row.push(ms(t.elapsed()));
    let drv_path = trivial_drv(store)?;
    let text = std::fs::read(store.real_path(&drv_path))?;
    let drv = kiln_derivation::aterm::parse(store.store_dir(), &text)?;
    let wanted = drv
        .output_paths()
        .map(|(n, p)| (n.to_owned(), p.clone()))
        .collect();
    let job = remote::Job {
        store,
        drv_path: drv_path.clone(),
        drv: &drv,
        inputs: Default::default(),
        wanted,
        timeout: Some(Duration::from_secs(120)),
        max_silent: None,
        max_log_size: 0,
    };
    let t = Instant::now();
    let log = LogSink::new(std::io::stderr());
    remote::build(&target, &job, log).map_err(anyhow::Error::from)?;
    row.push(ms(t.elapsed()));
    Ok(())
}
