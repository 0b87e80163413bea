//! `build-agent`: polls controllers for tasks and builds each in a fresh VM
//! snapshot (`kiln_agent`); `build-agent worker` is the same binary's guest
//! side, and `build-agent relay` joins a guest connection to the agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use kiln_agent::agent::{AGENT_VERSION, AccelChoice, Agent, AgentConfig};
use kiln_agent::machine::MachineManifest;
use kiln_agent::protocol::{InteractiveMode, TaskResponse};
use kiln_formats::signature::SecretKey;

#[derive(Debug, Parser)]
#[command(
    name = "build-agent",
    version,
    about = "Kiln's build agent: builds tasks from controllers in throwaway VMs"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// The guest side: fetch the task from the agent, build, upload the results.
    Worker {
        /// The agent's channel (default: `kiln.agent=` on the kernel command line, else qemu's guestfwd address).
        #[arg(long)]
        agent: Option<String>,
        /// Root of the store to build in (the store is `ROOT/nix/store`).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Join stdin/stdout to a TCP address (what qemu runs for each guest connection).
    Relay { addr: String },
    /// Write a new ed25519 agent key (Nix's secret-key form) to FILE and print its public key.
    Keygen { name: String, file: PathBuf },
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Controller URLs, asked in this order.
    controllers: Vec<String>,
    /// The agent's name, sent with task requests.
    #[arg(long, default_value = "kiln-agent")]
    name: String,
    /// The machines directory (`<volume>/<name>/<name>-<P>.<R>/machine.toml`).
    #[arg(long, default_value = "/var/lib/kiln-agent/machines")]
    machines: PathBuf,
    /// Where run directories, overlays and suspended machines go.
    #[arg(long, default_value = "/var/lib/kiln-agent/state")]
    state: PathBuf,
    /// Instance number (1–99) when several agents share a host and its machines.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    instance: u32,
    #[arg(long, default_value = "kiln")]
    toolchain_name: String,
    #[arg(long, default_value = AGENT_VERSION)]
    toolchain_version: String,
    /// The agent's ed25519 secret key (`build-agent keygen` writes one).
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long, value_parser = ["false", "true", "both"], default_value = "false")]
    interactive: String,
    /// Accelerator: `auto` probes KVM and falls back to TCG.
    #[arg(long, value_parser = ["auto", "kvm", "tcg"], default_value = "auto")]
    accel: String,
    /// Idle sleep between polls when no controller has work, seconds: MIN..MAX.
    #[arg(long, default_value = "50..60")]
    idle_sleep: String,
    #[arg(long, default_value_t = 600.0)]
    bootstrap_timeout: f64,
    /// Seconds the guest has to fetch its task after qemu starts.
    #[arg(long, default_value_t = 60.0)]
    startup_timeout: f64,
    /// How many times a guest that does not fetch its task is booted again.
    #[arg(long, default_value_t = 2)]
    startup_retries: u32,
    #[arg(long, default_value_t = 3600.0)]
    build_timeout: f64,
    #[arg(long, default_value_t = 60.0)]
    shutdown_timeout: f64,
    /// Destroy misbehaving VMs instead of suspending them for inspection.
    #[arg(long)]
    no_suspend: bool,
    /// Boot every task VM instead of resuming a guest state saved once
    /// after boot (kept beside the bootstrapped disk, per accelerator).
    #[arg(long)]
    cold_boot: bool,
    /// Print the machines (headers as JSON lines) and exit.
    #[arg(long)]
    dump_machines: bool,
    /// Print the first task received and exit.
    #[arg(long)]
    dump_task: bool,
    /// Build the first task, print its signed result instead of posting it, and exit.
    #[arg(long)]
    dump_result: bool,
    /// Record bootstraps without booting the machines.
    #[arg(long)]
    fake_bootstrap: bool,
    /// Do not boot for tasks: answer each with an `abort` result.
    #[arg(long)]
    fake_build: bool,
    /// Offer the machine described by this machine.toml instead of the machines directory.
    #[arg(long, value_name = "FILE")]
    fake_machine: Option<PathBuf>,
    /// Take the task response from this JSON file instead of asking controllers, once.
    #[arg(long, value_name = "FILE")]
    fake_request: Option<PathBuf>,
    /// 0 errors only, 1 warnings, 2 progress (default), 3 debug, 4+ trace.
    #[arg(long, default_value_t = 2)]
    verbose: u8,
    /// Run under systemd: journal priorities on each line, a startup summary.
    #[arg(long)]
    systemd_daemon: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn parse_range(s: &str) -> Result<(Duration, Duration)> {
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let secs = |x: &str| -> Result<Duration> {
        Ok(Duration::from_secs_f64(x.trim().parse().with_context(
            || format!("--idle-sleep '{s}': expected SECONDS or MIN..MAX"),
        )?))
    };
    let (min, max) = (secs(a)?, secs(b)?);
    if max < min {
        bail!("--idle-sleep '{s}': the maximum is below the minimum");
    }
    Ok((min, max))
}

fn init_logging(verbose: u8, systemd: bool) {
    use tracing::Level;
    let level = match verbose {
        0 => Level::ERROR,
        1 => Level::WARN,
        2 => Level::INFO,
        3 => Level::DEBUG,
        _ => Level::TRACE,
    };
    // `KILN_LOG` (an env filter) overrides the level `-v` gives.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(level.as_str().to_ascii_lowercase())
    });
    if systemd {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .event_format(journal::JournalFormat)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .init();
    }
}

mod journal {
    //! Lines for the journal: `<priority>message key=value…`, no time stamps
    //! (the journal adds its own).
    use std::fmt;
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    #[derive(Debug)]
    pub struct JournalFormat;

    impl<S, N> FormatEvent<S, N> for JournalFormat
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                _ => 7,
            };
            write!(writer, "<{priority}>")?;
            ctx.field_format().format_fields(writer.by_ref(), event)?;
            writeln!(writer)
        }
    }
}

fn load_key(args: &AgentArgs) -> Result<SecretKey> {
    match &args.key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the agent key {}", path.display()))?;
            text.trim().parse().with_context(|| {
                format!(
                    "{} is not an ed25519 secret key in Nix's form",
                    path.display()
                )
            })
        }
        None if args.fake_request.is_some()
            || args.dump_machines
            || args.controllers.is_empty() =>
        {
            Ok(SecretKey::generate(&args.name)?)
        }
        None => bail!(
            "--key FILE is required to answer controllers' challenges (make one with `build-agent keygen NAME FILE`)"
        ),
    }
}

fn startup_summary(config: &AgentConfig) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ram_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    tracing::info!(
        "build-agent {AGENT_VERSION} starting: name {}, instance {}, toolchain {}, {cpus} CPUs, {ram_mib} MiB RAM, machines {}, controllers [{}]",
        config.name,
        config.instance,
        config.toolchain_id(),
        config.machines.display(),
        config.controllers.join(", ")
    );
}

fn run_agent(args: AgentArgs) -> Result<ExitCode> {
    init_logging(args.verbose, args.systemd_daemon);
    let key = load_key(&args)?;
    let fake_machine = match &args.fake_machine {
        Some(path) => Some(MachineManifest::load(path)?),
        None => None,
    };
    let fake_request: Option<TaskResponse> = match &args.fake_request {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a task response (JSON)", path.display()))?,
            )
        }
        None => None,
    };
    let config = AgentConfig {
        name: args.name,
        machines: args.machines,
        state: args.state,
        instance: args.instance,
        toolchain_name: args.toolchain_name,
        toolchain_version: args.toolchain_version,
        controllers: args.controllers,
        key,
        interactive: match args.interactive.as_str() {
            "true" => InteractiveMode::True,
            "both" => InteractiveMode::Both,
            _ => InteractiveMode::False,
        },
        accel: match args.accel.as_str() {
            "kvm" => AccelChoice::Kvm,
            "tcg" => AccelChoice::Tcg,
            _ => AccelChoice::Auto,
        },
        relay: vec![
            std::env::current_exe()
                .context("cannot find this program's path (for qemu's relay command)")?
                .display()
                .to_string(),
            "relay".into(),
        ],
        idle_sleep: parse_range(&args.idle_sleep)?,
        bootstrap_timeout: Duration::from_secs_f64(args.bootstrap_timeout),
        startup_timeout: Duration::from_secs_f64(args.startup_timeout),
        startup_retries: args.startup_retries,
        build_timeout: Duration::from_secs_f64(args.build_timeout),
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout),
        suspend_on_failure: !args.no_suspend,
        warm_start: !args.cold_boot,
        fake_bootstrap: args.fake_bootstrap,
        fake_build: args.fake_build,
        fake_machine,
        fake_request,
        dump_machines: args.dump_machines,
        dump_task: args.dump_task,
        dump_result: args.dump_result,
    };
    if config.controllers.is_empty() && config.fake_request.is_none() && !config.dump_machines {
        bail!("no controller URLs given (and no --fake-request FILE or --dump-machines)");
    }
    if args.systemd_daemon || args.verbose >= 2 {
        startup_summary(&config);
    }
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    let mut agent = Agent::new(config, &STOP);
    agent.run()?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Sub::Worker { agent, root }) => (|| {
            init_logging(2, false);
            let url = agent.unwrap_or_else(kiln_agent::worker::agent_url_from_cmdline);
            let status = kiln_agent::worker::run(&url, &root)?;
            eprintln!("build-agent worker: {}", status.as_str());
            Ok(ExitCode::SUCCESS)
        })(),
        Some(Sub::Relay { addr }) => kiln_agent::channel::relay(&addr)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
        Some(Sub::Keygen { name, file }) => (|| {
            let key = SecretKey::generate(&name)?;
            std::fs::write(&file, format!("{key}\n"))
                .with_context(|| format!("cannot write {}", file.display()))?;
            println!("{}", key.to_public());
            Ok(ExitCode::SUCCESS)
        })(),
        None => run_agent(cli.agent),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "build-agent: error: {}",
                kiln_formats::report::chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
