//! kiln-ci: the CI coordinator's command line — argument parsing,
//! configuration (flags over a TOML file) and wiring of the `kiln_ci` crate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use kiln_ci::coordinator::{Config, Coordinator, CoordinatorError};
use kiln_ci::db::{BuildFilter, Db, DbError};
use kiln_ci::model::{BuildStatus, BuildTargets, GitRef, Input, Specification};
use kiln_ci::web::ApiToken;
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(name = "kiln-ci", about = "Kiln's CI coordinator: from git to builds")]
struct Cli {
    /// TOML configuration file (keys as the long flags, with `_`).
    #[arg(long, env = "KILN_CI_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Database: a SQLite file (default STATE_DIR/ci.sqlite) or postgres://…
    #[arg(long, env = "KILN_CI_DB", global = true)]
    db: Option<String>,
    /// Where inputs, logs and GC root links are kept.
    #[arg(long, env = "KILN_CI_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Root of the local store to build in (a chroot store); default /.
    #[arg(long, env = "KILN_CI_STORE", global = true)]
    store: Option<PathBuf>,
    /// Build through this store daemon's socket (a path or unix://PATH;
    /// Kiln's store-daemon or nix-daemon) instead of the embedded scheduler.
    #[arg(long, env = "KILN_CI_STORE_DAEMON", global = true)]
    store_daemon: Option<String>,
    /// File whose first line is the API's bearer token: `serve` requires
    /// it of writing requests, `evaluate` sends it.
    #[arg(long, env = "KILN_CI_API_TOKEN_FILE", global = true)]
    api_token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator and the web interface.
    Serve(ServeArgs),
    /// Manage specifications.
    #[command(subcommand)]
    Spec(SpecCommand),
    /// Evaluate a specification in this process, now (and with --build,
    /// build until idle).
    Eval {
        spec: String,
        #[arg(long)]
        build: bool,
    },
    /// Ask a running `kiln-ci serve` to evaluate a specification now
    /// (through its API); prints the evaluation's id, or, while one runs,
    /// that another is queued behind it.
    Evaluate {
        spec: String,
        /// The server (default: http:// and the configured listen address).
        #[arg(long)]
        url: Option<String>,
        /// Wait until the evaluation has registered its builds (or failed).
        #[arg(long)]
        wait: bool,
    },
    /// List builds.
    Builds {
        #[arg(long)]
        evaluation: Option<i64>,
        #[arg(long)]
        spec: Option<String>,
        #[arg(long)]
        status: Option<BuildStatus>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Restart builds (and their failed dependents), in dependency order.
    Restart { ids: Vec<i64> },
    /// Resume after a crash (builds left started are dispatched again) and
    /// build until nothing waits.
    Resume,
    /// Kiln's evaluator: print a recipe file's packages as nix-eval-jobs lines.
    EvalRecipe {
        file: PathBuf,
        #[arg(long)]
        system: Option<String>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address of the web interface.
    #[arg(long)]
    listen: Option<String>,
    /// Builds running at once.
    #[arg(long)]
    max_jobs: Option<usize>,
    /// Seconds agent builds wait for a build agent (none holding a task,
    /// none seen) before they fail (default 600).
    #[arg(long, value_name = "SECS")]
    agent_wait: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum SpecCommand {
    /// Add a specification (fails if it exists).
    Add(SpecArgs),
    /// Create or replace a specification.
    Set(SpecArgs),
    /// List specifications.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a specification with its evaluations and builds.
    Remove { name: String },
}

#[derive(Debug, Args)]
struct SpecArgs {
    name: String,
    /// An input: NAME=URL@branch:B, NAME=URL@tag:T or NAME=URL@commit:C.
    #[arg(long = "input", required = true)]
    inputs: Vec<String>,
    /// The input the evaluator runs in (default: the first).
    #[arg(long)]
    eval_input: Option<String>,
    /// Systems to build (default all).
    #[arg(long = "system")]
    systems: Vec<String>,
    /// Jobs to build (default all).
    #[arg(long = "job")]
    jobs: Vec<String>,
    #[arg(long, default_value_t = 0)]
    priority: u8,
    /// Seconds between automatic evaluations (0: on demand).
    #[arg(long, default_value_t = 0)]
    period: i64,
    /// The evaluator command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    evaluator: Vec<String>,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    db: Option<String>,
    state_dir: Option<PathBuf>,
    store: Option<PathBuf>,
    store_daemon: Option<String>,
    listen: Option<String>,
    max_jobs: Option<usize>,
    batch_size: Option<usize>,
    systems: Option<Vec<String>>,
    output_root_ttl_days: Option<u64>,
    max_attempts: Option<i64>,
    retry_backoff_secs: Option<u64>,
    cancel_older_than_days: Option<u64>,
    #[serde(default)]
    webhooks: Vec<String>,
    /// nix.conf settings for the embedded scheduler.
    #[serde(default)]
    settings: BTreeMap<String, String>,
    /// Builds requiring one of these system features go to build agents.
    #[serde(default)]
    agent_features: Vec<String>,
    /// Public keys (`name:base64`) of the trusted build agents.
    #[serde(default)]
    agent_keys: Vec<String>,
    /// nix.conf settings sent with agent tasks (e.g. `sandbox-paths`).
    #[serde(default)]
    agent_task_settings: BTreeMap<String, String>,
    /// Seconds before an unanswered agent task is taken back (default 3 hours).
    agent_session_timeout_secs: Option<u64>,
    /// Seconds agent builds wait for an agent before they fail (default 600).
    agent_wait_secs: Option<u64>,
    /// File whose first line is the API's bearer token.
    api_token_file: Option<PathBuf>,
}

fn parse_input(text: &str) -> Result<Input> {
    let (name, rest) = text.split_once('=').with_context(|| {
        format!("input '{text}': expected NAME=URL@branch:B (or tag:T, commit:C)")
    })?;
    let (url, reference) = rest.rsplit_once('@').with_context(|| {
        format!("input '{text}': expected URL@branch:B, URL@tag:T or URL@commit:C")
    })?;
    let reference = match reference.split_once(':') {
        Some(("branch", b)) => GitRef::Branch(b.into()),
        Some(("tag", t)) => GitRef::Tag(t.into()),
        Some(("commit", c)) => GitRef::Commit(c.into()),
        _ => {
            bail!("input '{text}': the reference '{reference}' is not branch:B, tag:T or commit:C")
        }
    };
    Ok(Input {
        name: name.into(),
        url: url.into(),
        reference,
    })
}

fn specification(args: SpecArgs) -> Result<Specification> {
    let inputs = args
        .inputs
        .iter()
        .map(|i| parse_input(i))
        .collect::<Result<Vec<_>>>()?;
    let eval_input = args.eval_input.unwrap_or_else(|| inputs[0].name.clone());
    if !inputs.iter().any(|i| i.name == eval_input) {
        bail!("--eval-input '{eval_input}' is not one of the inputs");
    }
    if args.priority > 9 {
        bail!("--priority {} is out of range (0 to 9)", args.priority);
    }
    Ok(Specification {
        name: args.name,
        inputs,
        eval_input,
        evaluator: args.evaluator,
        systems: args.systems,
        priority: args.priority,
        period_secs: args.period,
        build_targets: if args.jobs.is_empty() {
            BuildTargets::All
        } else {
            BuildTargets::Jobs(args.jobs)
        },
        enabled: true,
        created_at: 0,
        updated_at: 0,
    })
}

struct Setup {
    file: FileConfig,
    state_dir: PathBuf,
    db_url: String,
    store: Option<PathBuf>,
    store_daemon: Option<PathBuf>,
}

fn setup(cli: &Cli) -> Result<Setup> {
    let file: FileConfig = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the configuration '{}'", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("configuration '{}' is not valid", path.display()))?
        }
        None => FileConfig::default(),
    };
    let state_dir = cli
        .state_dir
        .clone()
        .or(file.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln-ci"));
    let db_url = cli
        .db
        .clone()
        .or(file.db.clone())
        .unwrap_or_else(|| state_dir.join("ci.sqlite").to_string_lossy().into_owned());
    let store = cli.store.clone().or(file.store.clone());
    let store_daemon = cli
        .store_daemon
        .clone()
        .or(file.store_daemon.clone())
        .map(|s| kiln_ci::daemon_dispatch::socket_path(&s));
    Ok(Setup {
        file,
        state_dir,
        db_url,
        store,
        store_daemon,
    })
}

fn coordinator_config(setup: &Setup, max_jobs: Option<usize>) -> Config {
    let file = &setup.file;
    let mut config = Config::new(&setup.state_dir);
    config.store_root = setup.store.clone();
    config.store_daemon = setup.store_daemon.clone();
    config.settings = file.settings.clone();
    if let Some(n) = max_jobs.or(file.max_jobs) {
        config.max_jobs = n.max(1);
    }
    if let Some(n) = file.batch_size {
        config.batch_size = n.max(1);
    }
    if let Some(systems) = &file.systems {
        config.systems = systems.clone();
    }
    if let Some(days) = file.output_root_ttl_days {
        config.output_root_ttl = Duration::from_secs(days * 24 * 3600);
    }
    if let Some(n) = file.max_attempts {
        config.max_attempts = n;
    }
    if let Some(secs) = file.retry_backoff_secs {
        config.retry_backoff = Duration::from_secs(secs);
    }
    config.cancel_older_than = file
        .cancel_older_than_days
        .map(|days| Duration::from_secs(days * 24 * 3600));
    config.webhooks = file.webhooks.clone();
    config.agent_features = file.agent_features.iter().cloned().collect();
    if let Some(secs) = file.agent_wait_secs {
        config.agent_wait = Duration::from_secs(secs);
    }
    config
}

/// The API token, if one is configured (flag or environment over the file).
fn api_token(cli_file: Option<&PathBuf>, setup: &Setup) -> Result<Option<ApiToken>> {
    match cli_file.or(setup.file.api_token_file.as_ref()) {
        Some(path) => Ok(Some(ApiToken::from_file(path)?)),
        None => Ok(None),
    }
}

/// What `kiln-ci evaluate` learnt: the evaluation, whether it was queued
/// behind a running one, and with `--wait` how it ended.
#[derive(Debug)]
struct Requested {
    id: i64,
    queued: bool,
    status: Option<String>,
}

/// `kiln-ci evaluate`: a POST to the server's trigger, then (with `wait`)
/// polls the evaluation (or, when queued, the one after) until its
/// evaluator is done.
fn request_evaluation(
    base: &str,
    spec: &str,
    token: Option<&str>,
    wait: bool,
) -> Result<Requested> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let base = base.trim_end_matches('/');
    let url = format!("{base}/api/specs/{spec}/evaluate");
    let mut request = agent.post(&url);
    if let Some(token) = token {
        request = request.header("authorization", &format!("Bearer {token}"));
    }
    let mut response = request
        .send_empty()
        .with_context(|| format!("cannot reach kiln-ci at {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .body_mut()
        .read_to_string()
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .with_context(|| format!("{url} answered {status} without JSON"))?;
    if !status.is_success() {
        bail!(
            "{url} answered {status}: {}",
            body["error"].as_str().unwrap_or("(no error message)")
        );
    }
    let id = body["id"]
        .as_i64()
        .with_context(|| format!("{url} answered without an evaluation id: {body}"))?;
    let queued = body["queued"].as_bool().unwrap_or(false);
    if !wait {
        return Ok(Requested {
            id,
            queued,
            status: None,
        });
    }
    let get = |url: &str| -> Result<serde_json::Value> {
        agent
            .get(url)
            .call()
            .with_context(|| format!("cannot reach kiln-ci at {url}"))?
            .body_mut()
            .read_to_string()
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .with_context(|| format!("{url} answered without JSON"))
    };
    // Queued: the evaluation to follow is the first one after `id`.
    let id = if queued {
        let url = format!("{base}/api/specs/{spec}/evaluations?limit=1");
        loop {
            let newest = get(&url)?[0]["id"].as_i64();
            match newest {
                Some(newest) if newest > id => break newest,
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    } else {
        id
    };
    let url = format!("{base}/api/evaluations/{id}");
    loop {
        let evaluation = get(&url)?;
        match evaluation["status"].as_str() {
            Some("started") => std::thread::sleep(Duration::from_millis(500)),
            Some(status) => {
                return Ok(Requested {
                    id,
                    queued: false,
                    status: Some(status.to_owned()),
                });
            }
            None => bail!("{url} answered an evaluation without status: {evaluation}"),
        }
    }
}

/// Makes the configured agent keys the trusted set's rows (a row's
/// `last_seen` survives the restart).
async fn register_agent_keys(db: &Db, keys: &[String]) -> Result<()> {
    let known = db.agents().await?;
    for text in keys {
        let key: kiln_formats::signature::PublicKey = text
            .parse()
            .with_context(|| format!("agent key '{text}': expected NAME:BASE64"))?;
        let name = key.name().to_owned();
        let existing = known.iter().find(|a| a.name == name);
        db.put_agent(&kiln_ci::model::Agent {
            name: name.clone(),
            public_key: text.clone(),
            machines: existing.map(|a| a.machines.clone()).unwrap_or_default(),
            enabled: true,
            registered_at: existing.map_or(0, |a| a.registered_at),
            last_seen: existing.and_then(|a| a.last_seen),
        })
        .await?;
    }
    Ok(())
}

async fn open_db(setup: &Setup) -> Result<Db> {
    if !setup.db_url.contains("://") {
        std::fs::create_dir_all(&setup.state_dir).with_context(|| {
            format!(
                "cannot create the state directory '{}'",
                setup.state_dir.display()
            )
        })?;
    }
    Ok(Db::open(&setup.db_url).await?)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let setup = setup(&cli)?;
    match cli.command {
        Command::EvalRecipe { file, system } => {
            let root = setup.store.clone().unwrap_or_else(|| PathBuf::from("/"));
            let store = kiln_store::local::LocalStore::open_root(&root)
                .with_context(|| format!("cannot open the store at '{}'", root.display()))?;
            let system =
                system.unwrap_or_else(|| kiln_scheduler::settings::Settings::default().system);
            let path = file.clone();
            let jobs = tokio::task::spawn_blocking(move || {
                kiln_ci::recipe_jobs::recipe_jobs(&store, &path, &system)
            })
            .await??;
            for job in jobs {
                println!("{}", serde_json::to_string(&job)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Spec(command) => {
            let db = open_db(&setup).await?;
            match command {
                SpecCommand::Add(args) => {
                    let spec = specification(args)?;
                    if db.specification(&spec.name).await?.is_some() {
                        bail!(
                            "specification '{}' exists already (use `spec set` to change it)",
                            spec.name
                        );
                    }
                    db.put_specification(&spec).await?;
                }
                SpecCommand::Set(args) => {
                    db.put_specification(&specification(args)?).await?;
                }
                SpecCommand::List { json } => {
                    for spec in db.list_specifications().await? {
                        if json {
                            println!("{}", serde_json::to_string(&spec)?);
                        } else {
                            println!(
                                "{}\tpriority {}\t{}",
                                spec.name,
                                spec.priority,
                                spec.evaluator.join(" ")
                            );
                        }
                    }
                }
                SpecCommand::Remove { name } => {
                    if !db.remove_specification(&name).await? {
                        bail!("no specification named '{name}'");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { spec, build } => {
            let db = open_db(&setup).await?;
            let coordinator = Coordinator::new(db.clone(), coordinator_config(&setup, None))?;
            let id = coordinator.evaluate(&spec).await?;
            let evaluation = db
                .evaluation(id)
                .await?
                .context("the evaluation vanished")?;
            println!("evaluation {id}: {}", evaluation.status.as_str());
            if let Some(error) = &evaluation.error {
                eprintln!("{error}");
                return Ok(ExitCode::FAILURE);
            }
            if build {
                coordinator.recover().await?;
                coordinator.run_until_idle().await?;
                for (status, count) in db.status_counts(Some(id)).await? {
                    println!("{status}\t{count}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Evaluate { spec, url, wait } => {
            let base = match url {
                Some(url) => url,
                None => format!(
                    "http://{}",
                    setup.file.listen.as_deref().unwrap_or("127.0.0.1:8080")
                ),
            };
            let token = cli
                .api_token_file
                .as_ref()
                .or(setup.file.api_token_file.as_ref())
                .map(|path| kiln_ci::web::auth::read_token_file(path))
                .transpose()?;
            let requested = tokio::task::spawn_blocking(move || {
                request_evaluation(&base, &spec, token.as_deref(), wait)
            })
            .await??;
            let id = requested.id;
            match &requested.status {
                None if requested.queued => println!("queued behind evaluation {id}"),
                None => println!("evaluation {id}"),
                Some(status) => println!("evaluation {id}: {status}"),
            }
            Ok(
                if matches!(requested.status.as_deref(), Some("failed" | "aborted")) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
        Command::Builds {
            evaluation,
            spec,
            status,
            limit,
            json,
        } => {
            let db = open_db(&setup).await?;
            let builds = db
                .list_builds(&BuildFilter {
                    specification: spec,
                    evaluation_id: evaluation,
                    status,
                    job: None,
                    limit,
                    offset: 0,
                })
                .await?;
            for build in builds {
                if json {
                    println!("{}", serde_json::to_string(&build)?);
                } else {
                    println!(
                        "{}\t{}\t{}\t{}",
                        build.id, build.status, build.job, build.drv_path
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume => {
            let db = open_db(&setup).await?;
            let coordinator = Coordinator::new(db.clone(), coordinator_config(&setup, None))?;
            coordinator.recover().await?;
            coordinator.run_until_idle().await?;
            for (status, count) in db.status_counts(None).await? {
                println!("{status}\t{count}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart { ids } => {
            let db = open_db(&setup).await?;
            let coordinator = Coordinator::new(db, coordinator_config(&setup, None))?;
            let restarted = coordinator.restart(&ids).await?;
            println!(
                "restarted {}",
                restarted
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let db = open_db(&setup).await?;
            let mut config = coordinator_config(&setup, args.max_jobs);
            if let Some(secs) = args.agent_wait {
                config.agent_wait = Duration::from_secs(secs);
            }
            let token = api_token(cli.api_token_file.as_ref(), &setup)?;
            let coordinator = Coordinator::new(db.clone(), config)?;
            coordinator.recover().await?;
            let listen = args
                .listen
                .or(setup.file.listen.clone())
                .unwrap_or_else(|| "127.0.0.1:8080".into());
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            kiln_ci::web::auth::check_listen(listener.local_addr()?, token.as_ref())?;
            eprintln!("kiln-ci: listening on http://{}", listener.local_addr()?);
            register_agent_keys(&db, &setup.file.agent_keys).await?;
            let mut state = kiln_ci::web::AppState::for_coordinator(&coordinator);
            if let Some(token) = token {
                state = state.with_api_token(token);
            }
            let app = kiln_ci::web::router(state).merge(kiln_ci::agents::router(
                coordinator.clone(),
                kiln_ci::agents::AgentsConfig {
                    task_settings: setup.file.agent_task_settings.clone(),
                    session_timeout: setup
                        .file
                        .agent_session_timeout_secs
                        .map(Duration::from_secs)
                        .unwrap_or(kiln_ci::agents::AgentsConfig::default().session_timeout),
                },
            ));
            let web = tokio::spawn(async move { axum::serve(listener, app).await });
            let periodic = tokio::spawn(periodic_evaluations(coordinator.clone()));
            let stop = Arc::new(tokio::sync::Notify::new());
            let signal_stop = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                signal_stop.notify_one();
            });
            coordinator.run(stop).await?;
            web.abort();
            periodic.abort();
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Evaluates each enabled specification with a period when it is due.
async fn periodic_evaluations(coordinator: Coordinator) {
    loop {
        if let Err(e) = coordinator.start_pending_triggers().await {
            tracing::error!(error = %e, "cannot start queued evaluations");
        }
        if let Ok(specs) = coordinator.db().list_specifications().await {
            for spec in specs.iter().filter(|s| s.enabled && s.period_secs > 0) {
                let last = coordinator
                    .db()
                    .list_evaluations(&spec.name, 1)
                    .await
                    .ok()
                    .and_then(|e| e.first().map(|e| e.created_at))
                    .unwrap_or(0);
                if kiln_ci::model::now() - last >= spec.period_secs {
                    match coordinator.evaluate(&spec.name).await {
                        Ok(_) => {}
                        // Started through the API meanwhile: that one counts.
                        Err(CoordinatorError::Db(DbError::EvaluationRunning { .. })) => {}
                        Err(e) => {
                            tracing::error!(spec = %spec.name, error = %e, "evaluation failed")
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_CI_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kiln-ci: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln-ci: {}", kiln_formats::report::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
