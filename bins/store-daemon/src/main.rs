//! `store-daemon`: serves a local Kiln store to Nix clients over the
//! daemon protocol on a Unix socket (or one connection on stdin/stdout),
//! or speaks the `nix-store --serve` protocol for `ssh://` builders.
//!
//! Thin by design: arguments, configuration, the accept loop and signals;
//! the protocols live in `kiln-protocol`.

use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use kiln_protocol::server::Daemon;
use kiln_protocol::trust::{Access, Admission, UserInfo, peer_cred};
use kiln_scheduler::settings::Settings;
use kiln_store::StoreUrl;
use kiln_store::local::LocalStore;

#[derive(Debug, Parser)]
#[command(
    name = "store-daemon",
    version,
    about = "Serve a Kiln store to Nix clients"
)]
struct Args {
    /// The local store to serve (`local`, `local?root=DIR`, a path).
    #[arg(long, default_value = "local")]
    store: String,
    /// The socket to listen on (default: the store's
    /// `nix/var/nix/daemon-socket/socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Sets a `nix.conf` setting (`trusted-users`, `max-jobs`, …).
    #[arg(long = "option", num_args = 2, value_names = ["NAME", "VALUE"])]
    options: Vec<String>,
    /// Serve one connection on stdin/stdout (for `ssh-ng://`).
    #[arg(long, conflicts_with = "serve")]
    stdio: bool,
    /// Speak the `nix-store --serve` protocol on stdin/stdout (for `ssh://`).
    #[arg(long)]
    serve: bool,
    /// With `--serve`: allow the client to add paths and build.
    #[arg(long, requires = "serve")]
    write: bool,
    /// With `--serve`: a zstd stream each way, flushed per message (Kiln's
    /// offload client asks for it; Nix's clients do not).
    #[arg(long, requires = "serve")]
    zstd: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "store-daemon: error: {}",
                kiln_formats::report::chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let url: StoreUrl = args.store.parse()?;
    let config = url.local_config()?.with_context(|| {
        format!(
            "store '{}' is not a local store; the daemon serves local stores only",
            args.store
        )
    })?;
    let root = config.root.clone();
    let mut settings = Settings::from_environment()?;
    let mut access = Access::default();
    for (name, value) in [
        ("trusted-users", settings.raw.get("trusted-users").cloned()),
        ("allowed-users", settings.raw.get("allowed-users").cloned()),
    ] {
        if let Some(v) = value {
            access.set(name, &v);
        }
    }
    for pair in args.options.chunks(2) {
        let (name, value) = (&pair[0], &pair[1]);
        if !access.set(name, value) {
            settings
                .set(name, value)
                .with_context(|| format!("--option {name} {value}"))?;
        }
    }
    let store = Arc::new(LocalStore::open(config).context("opening the store")?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(1024)
        .build()?;
    let daemon = Arc::new(Daemon::new(
        store.clone(),
        settings,
        runtime.handle().clone(),
    ));

    if args.serve {
        let (stdin, stdout) = raw_stdio()?;
        if args.zstd {
            let r = zstd::stream::read::Decoder::new(stdin)?;
            let w = zstd::stream::write::Encoder::new(stdout, 1)?;
            kiln_protocol::serve::serve(&daemon, args.write, r, w)?;
        } else {
            kiln_protocol::serve::serve(&daemon, args.write, stdin, stdout)?;
        }
        return Ok(());
    }
    if args.stdio {
        let me = UserInfo::lookup(unsafe_uid(), unsafe_gid());
        let trusted = access.admit(&me) == Admission::Trusted;
        let (stdin, stdout) = raw_stdio()?;
        daemon.serve_connection(trusted, stdin, stdout)?;
        return Ok(());
    }
    let socket = args.socket.unwrap_or_else(|| {
        root.as_deref()
            .unwrap_or(Path::new("/"))
            .join("nix/var/nix/daemon-socket/socket")
    });
    runtime.block_on(serve_socket(daemon, access, socket))
}

fn unsafe_uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

fn unsafe_gid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}

/// The socket systemd passed (`LISTEN_FDS`, `LISTEN_PID`), if any.
fn activated_listener() -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if !pid_matches || fds == 0 {
        return Ok(None);
    }
    if fds != 1 {
        bail!("systemd passed {fds} sockets; store-daemon listens on exactly one");
    }
    // SAFETY: systemd hands over fd 3 (SD_LISTEN_FDS_START) as ours.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(3) };
    // SAFETY: fd 3 is ours now; FD_CLOEXEC keeps it from builders.
    unsafe { libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(Some(listener))
}

fn bind(socket: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by a daemon that died: replace it.
    if std::fs::symlink_metadata(socket).is_ok() {
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    // Everyone may connect; the daemon itself decides who is allowed.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

async fn serve_socket(daemon: Arc<Daemon>, access: Access, socket: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (std_listener, owned) = match activated_listener()? {
        Some(l) => (l, None),
        None => (bind(&socket)?, Some(socket.clone())),
    };
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(std_listener)?;
    tracing::info!(socket = %socket.display(), store = %kiln_store::Store::url(daemon.store().as_ref()), "listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let active = Arc::new(AtomicUsize::new(0));
    let access = Arc::new(access);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let daemon = daemon.clone();
                let access = access.clone();
                let active = active.clone();
                active.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    serve_one(daemon, access, stream).await;
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Graceful: no new connections; the ones in flight (and their builds,
    // which register outputs atomically) get time to finish.
    drop(listener);
    if let Some(path) = owned {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!(connections = active.load(Ordering::SeqCst), "shutting down");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while active.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn serve_one(daemon: Arc<Daemon>, access: Arc<Access>, stream: tokio::net::UnixStream) {
    use tracing::Instrument;
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over a connection");
            return;
        }
    };
    // Looking up the user may read files or ask NSS: a blocking thread's job.
    let admitted =
        tokio::task::spawn_blocking(move || admit(&access, &stream).map(|a| (a, stream)))
            .await
            .ok()
            .flatten();
    let Some(((trusted, who), stream)) = admitted else {
        return;
    };
    let span = tracing::info_span!("connection", user = %who, trusted);
    if let Err(e) = daemon.serve_unix(trusted, stream).instrument(span).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Whether the peer may connect, and then whether it is trusted and who it is.
fn admit(access: &Access, stream: &std::os::unix::net::UnixStream) -> Option<(bool, String)> {
    match peer_cred(stream) {
        Ok(cred) => {
            let user = UserInfo::lookup(cred.uid, cred.gid);
            let who = user.name.clone().unwrap_or_else(|| cred.uid.to_string());
            match access.admit(&user) {
                Admission::Trusted => Some((true, who)),
                Admission::Untrusted => Some((false, who)),
                Admission::Refused => {
                    tracing::warn!(user = %who, "refused: not in allowed-users");
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; refusing");
            None
        }
    }
}

/// Stdin and stdout as plain files, for `--serve` and `--stdio`: the
/// protocol code buffers them itself, and `Stdout`'s line buffering would
/// split every NAR at its newlines. Pipes from sshd are widened (see
/// `wire::widen_pipe`).
fn raw_stdio() -> anyhow::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
    kiln_protocol::wire::widen_pipe(stdin.as_fd());
    kiln_protocol::wire::widen_pipe(stdout.as_fd());
    Ok((stdin.into(), stdout.into()))
}
