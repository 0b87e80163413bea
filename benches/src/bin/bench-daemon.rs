//! `cargo xtask bench daemon`: Kiln's `store-daemon` beside Nix 2.8's
//! `nix-daemon`, in the same run, on stores with the same contents.
//!
//! - QueryPathInfo requests per second from 32 concurrent clients (one
//!   connection each, the same minimal raw-socket client for both
//!   daemons) over a store of 10,000 paths, with each daemon's CPU time
//!   per request (from /proc, its threads and forked children): on a
//!   small machine the clients share the cores, so CPU per request is
//!   the fair figure of the server's cost;
//! - `nix-build` (Nix 2.8's client) of the wide graph — 1,000 trivial
//!   derivations plus one that depends on them all, `-j2` — through each
//!   daemon, instantiation included, each on an empty store.
//!
//! `cargo xtask bench daemon -- query` (or `-- wide`) runs one part only;
//! `BENCH_KILN_ONLY=1` builds the wide graph through Kiln's daemon only.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_e2e::NixStore;
use kiln_formats::hash::HashAlgo;
use kiln_formats::store_path::{FileIngestionMethod, StorePath};
use kiln_store::local::{BatchItem, Durability, LocalStore};

const PATHS: usize = 10_000;
const CLIENTS: usize = 32;
const QUERY_TIME: Duration = Duration::from_secs(5);
const WIDE: usize = 1_000;

fn sandbox_paths(nix: &NixStore) -> String {
    let conf = std::fs::read_to_string(nix.conf_dir().join("nix.conf")).unwrap();
    conf.lines()
        .find_map(|l| l.strip_prefix("sandbox-paths = "))
        .expect("the test store's nix.conf sets sandbox-paths")
        .to_owned()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(socket: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "daemon exited before listening on {}: {status}",
                socket.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no daemon on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_kiln(root: &Path, socket: &Path, nix: &NixStore) -> Running {
    let mut child = Command::new(kiln_benches::profile_bin("store-daemon", "store-daemon"))
        .arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("--socket")
        .arg(socket)
        .args(["--option", "sandbox-paths", &sandbox_paths(nix)])
        .args(["--option", "max-jobs", "2"])
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting store-daemon");
    wait_for(socket, &mut child);
    Running(child)
}

fn start_nix(nix: &NixStore, socket: &Path) -> Running {
    let mut child = nix
        .command("nix-daemon")
        .env("NIX_DAEMON_SOCKET_PATH", socket)
        .spawn()
        .expect("starting nix-daemon");
    wait_for(socket, &mut child);
    Running(child)
}

/// The protocol version the bench client speaks: Nix 2.8's, which both
/// daemons serve.
const CLIENT_VERSION: u64 = (1 << 8) | 34;
const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const STDERR_NEXT: u64 = 0x6f6c_6d67;
const STDERR_LAST: u64 = 0x616c_7473;
const OP_QUERY_PATH_INFO: u64 = 26;

/// The cheapest client there is, so that the figure is the server's: a
/// raw socket, requests encoded once before the run, answers parsed in
/// place in one buffer, one read per answer when it arrives whole.
struct RawClient {
    stream: std::os::unix::net::UnixStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RawClient {
    fn connect(socket: &Path) -> RawClient {
        use std::io::Write;
        let stream = std::os::unix::net::UnixStream::connect(socket).expect("connecting");
        let mut c = RawClient {
            stream,
            buf: vec![0; 64 << 10].into_boxed_slice(),
            start: 0,
            end: 0,
        };
        let mut hello = Vec::new();
        for n in [WORKER_MAGIC_1] {
            hello.extend_from_slice(&n.to_le_bytes());
        }
        c.stream.write_all(&hello).unwrap();
        let _magic2 = c.u64();
        let _server_version = c.u64();
        let mut rest = Vec::new();
        // Client version, no CPU affinity, reserveSpace.
        for n in [CLIENT_VERSION, 0, 0] {
            rest.extend_from_slice(&n.to_le_bytes());
        }
        c.stream.write_all(&rest).unwrap();
        c.skip_string(); // the daemon's version (1.33+)
        c.log_until_last();
        c
    }

    fn need(&mut self, n: usize) {
        use std::io::Read;
        if self.end - self.start >= n {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end < n {
            let got = self
                .stream
                .read(&mut self.buf[self.end..])
                .expect("reading");
            assert!(got > 0, "the daemon hung up");
            self.end += got;
        }
    }

    fn u64(&mut self) -> u64 {
        self.need(8);
        let v = u64::from_le_bytes(self.buf[self.start..self.start + 8].try_into().unwrap());
        self.start += 8;
        v
    }

    fn skip_string(&mut self) {
        let len = self.u64() as usize;
        let padded = len.div_ceil(8) * 8;
        self.need(padded);
        self.start += padded;
    }

    /// Log messages up to `STDERR_LAST` (only `NEXT` lines are expected).
    fn log_until_last(&mut self) {
        loop {
            match self.u64() {
                STDERR_LAST => return,
                STDERR_NEXT => self.skip_string(),
                other => panic!("unexpected log message {other:#x}"),
            }
        }
    }

    /// One `QueryPathInfo`, sent pre-encoded; whether the path was valid.
    fn query(&mut self, request: &[u8]) -> bool {
        use std::io::Write;
        self.stream.write_all(request).unwrap();
        loop {
            if let Some((len, valid)) = parse_answer(&self.buf[self.start..self.end]) {
                self.start += len;
                return valid;
            }
            self.need(self.end - self.start + 1);
        }
    }
}

/// A [`RawClient`]'s connection driven by an event loop.
struct AsyncClient {
    stream: tokio::net::UnixStream,
    buf: Box<[u8]>,
}

impl RawClient {
    fn into_async(self) -> AsyncClient {
        assert_eq!(self.start, self.end, "bytes left after the handshake");
        self.stream.set_nonblocking(true).unwrap();
        AsyncClient {
            stream: tokio::net::UnixStream::from_std(self.stream).unwrap(),
            buf: self.buf,
        }
    }
}

impl AsyncClient {
    /// One `QueryPathInfo`, as [`RawClient::query`].
    async fn query(&mut self, request: &[u8]) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(request).await.unwrap();
        let mut end = 0;
        loop {
            let got = self.stream.read(&mut self.buf[end..]).await.unwrap();
            assert!(got > 0, "the daemon hung up");
            end += got;
            if let Some((len, valid)) = parse_answer(&self.buf[..end]) {
                assert_eq!(len, end, "bytes after the answer");
                return valid;
            }
        }
    }
}

/// The length of the `QueryPathInfo` answer at the head of `buf` and
/// whether the path was valid; `None` while it is incomplete.
fn parse_answer(buf: &[u8]) -> Option<(usize, bool)> {
    fn word(buf: &[u8], at: &mut usize) -> Option<u64> {
        let v = u64::from_le_bytes(buf.get(*at..*at + 8)?.try_into().unwrap());
        *at += 8;
        Some(v)
    }
    fn string(buf: &[u8], at: &mut usize) -> Option<()> {
        let len = word(buf, at)? as usize;
        *at += len.div_ceil(8) * 8;
        (*at <= buf.len()).then_some(())
    }
    fn strings(buf: &[u8], at: &mut usize) -> Option<()> {
        for _ in 0..word(buf, at)? {
            string(buf, at)?;
        }
        Some(())
    }
    let mut at = 0;
    loop {
        match word(buf, &mut at)? {
            STDERR_LAST => break,
            STDERR_NEXT => string(buf, &mut at)?,
            other => panic!("unexpected log message {other:#x}"),
        }
    }
    if word(buf, &mut at)? == 0 {
        return Some((at, false));
    }
    string(buf, &mut at)?; // deriver
    string(buf, &mut at)?; // narHash
    strings(buf, &mut at)?; // references
    for _ in 0..3 {
        word(buf, &mut at)?; // registration time, narSize, ultimate
    }
    strings(buf, &mut at)?; // sigs
    string(buf, &mut at)?; // ca
    Some((at, true))
}

fn encode_query(path: &StorePath) -> Vec<u8> {
    let printed = kiln_formats::store_path::StoreDir::default().print_path(path);
    let mut r = Vec::with_capacity(16 + printed.len() + 8);
    r.extend_from_slice(&OP_QUERY_PATH_INFO.to_le_bytes());
    r.extend_from_slice(&(printed.len() as u64).to_le_bytes());
    r.extend_from_slice(printed.as_bytes());
    r.resize(16 + printed.len().div_ceil(8) * 8, 0);
    r
}

/// CPU time (user + system) of process `pid`, and with `children` of the
/// processes it started too (Nix's daemon forks one per connection), in
/// clock ticks.
fn cpu_ticks(pid: u32, children: bool) -> u64 {
    let fields = |stat: &str| -> Option<(u32, u64)> {
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // After the name: state(0) ppid(1) … utime(11) stime(12).
        Some((
            f.get(1)?.parse().ok()?,
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    };
    let mut total = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some((ppid, ticks)) = fields(&stat) {
            if p == pid || (children && ppid == pid) {
                total += ticks;
            }
        }
    }
    total
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc_sysconf(2) }) as f64 // _SC_CLK_TCK
}

unsafe extern "C" {
    #[link_name = "sysconf"]
    fn libc_sysconf(name: i32) -> i64;
}

/// What one daemon did under the query load.
struct QueryFigures {
    rate: f64,
    /// Daemon CPU (all its threads and processes) per request.
    server_cpu: Duration,
    /// The bench's own CPU per request (its clients).
    client_cpu: Duration,
}

/// How the bench's clients wait for their answers.
#[derive(Clone, Copy, PartialEq)]
enum Clients {
    /// A thread per connection, blocked in `read` (two context switches
    /// per request on each side).
    Threads,
    /// One thread polling every connection (epoll, through tokio's
    /// current-thread runtime): it writes each connection's next request
    /// as its answer arrives, so the daemon's cost is not hidden behind
    /// the clients' own switching.
    EventLoop,
}

/// QueryPathInfo over `CLIENTS` connections for `QUERY_TIME`, each with
/// one request in flight as Nix's clients have, driven as `clients` says.
fn query_rate(
    socket: &Path,
    daemon_pid: u32,
    requests: &Arc<Vec<Vec<u8>>>,
    clients: Clients,
) -> QueryFigures {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let connection = |c: usize| {
        let (stop, count, requests) = (stop.clone(), count.clone(), requests.clone());
        let client = RawClient::connect(socket);
        (c, client, stop, count, requests)
    };
    let mut threads = Vec::new();
    match clients {
        Clients::Threads => {
            for c in 0..CLIENTS {
                let (c, mut client, stop, count, requests) = connection(c);
                threads.push(std::thread::spawn(move || {
                    let mut i = c * 7919;
                    let mut done = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        assert!(
                            client.query(&requests[i % requests.len()]),
                            "path not valid"
                        );
                        done += 1;
                        if done % 64 == 0 {
                            count.fetch_add(64, Ordering::Relaxed);
                        }
                        i += 104_729;
                    }
                }));
            }
        }
        Clients::EventLoop => {
            let connections: Vec<_> = (0..CLIENTS).map(connection).collect();
            threads.push(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for (c, client, stop, count, requests) in connections {
                        tasks.spawn(async move {
                            let mut i = c * 7919;
                            let mut done = 0u64;
                            let mut client = client.into_async();
                            while !stop.load(Ordering::Relaxed) {
                                assert!(
                                    client.query(&requests[i % requests.len()]).await,
                                    "path not valid"
                                );
                                done += 1;
                                if done % 64 == 0 {
                                    count.fetch_add(64, Ordering::Relaxed);
                                }
                                i += 104_729;
                            }
                        });
                    }
                    while let Some(t) = tasks.join_next().await {
                        t.unwrap();
                    }
                });
            }));
        }
    }
    // Warm up the connections, then measure.
    std::thread::sleep(Duration::from_millis(500));
    let own = std::process::id();
    let (start_count, start_server, start_client) = (
        count.load(Ordering::Relaxed),
        cpu_ticks(daemon_pid, true),
        cpu_ticks(own, false),
    );
    let started = Instant::now();
    std::thread::sleep(QUERY_TIME);
    let done = count.load(Ordering::Relaxed) - start_count;
    let (server, client) = (
        cpu_ticks(daemon_pid, true) - start_server,
        // Only the bench itself: the daemons are its children.
        cpu_ticks(own, false) - start_client,
    );
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let per_request = |ticks: u64| {
        Duration::from_secs_f64(ticks as f64 / ticks_per_second() / done.max(1) as f64)
    };
    QueryFigures {
        rate: done as f64 / elapsed.as_secs_f64(),
        server_cpu: per_request(server),
        client_cpu: per_request(client),
    }
}

fn wide_build(client: &NixStore, url: &str, file: &Path) -> Duration {
    let started = Instant::now();
    let out = client
        .command("nix-build")
        .args(["--no-out-link", "-j2", "--store", url])
        .arg(file)
        .output()
        .expect("running nix-build");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "nix-build through {url} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn main() {
    let parts: Vec<String> = std::env::args().skip(1).collect();
    for p in &parts {
        assert!(
            p == "query" || p == "wide",
            "unknown part '{p}': expected 'query', 'wide' or nothing (both)"
        );
    }
    let wanted = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
    let work = tempfile::tempdir().unwrap();
    // The builds first: the query part's setup adds 10,000 paths to each
    // store, and Nix frees a lock file per path; on ext4 without a journal
    // every inode allocation in the next minutes would pay for those.
    if wanted("wide") {
        bench_wide(work.path());
    }
    if wanted("query") {
        bench_query(work.path());
    }
    let _ = std::process::Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(work.path())
        .status();
}

fn bench_query(work: &Path) {
    // One store's worth of paths, made by Kiln and imported by Nix, so both
    // daemons serve the same 10,000 paths.
    let nix_store = NixStore::new();
    let kiln_root = work.join("kiln-root");
    let started = Instant::now();
    let paths = {
        let store = LocalStore::open_root(&kiln_root).unwrap();
        let src = work.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let mut items = Vec::new();
        for i in 0..PATHS {
            let f = src.join(format!("f{i}"));
            std::fs::write(&f, format!("bench path {i}\n")).unwrap();
            items.push(BatchItem {
                name: format!("bench-{i}"),
                source: f,
                method: FileIngestionMethod::Recursive,
                algo: HashAlgo::Sha256,
            });
        }
        let infos = store
            .add_paths(&items, Default::default(), Durability::Batch)
            .unwrap();
        let paths: Vec<StorePath> = infos.into_iter().map(|i| i.path).collect();
        let mut export = Vec::new();
        kiln_store::export::export_paths(&store, &paths.iter().cloned().collect(), &mut export)
            .unwrap();
        nix_store
            .run_bytes("nix-store", ["--import"], &export)
            .expect("nix-store --import");
        paths
    };
    eprintln!(
        "set up {PATHS} paths in both stores in {:.1?}",
        started.elapsed()
    );
    let paths = Arc::new(paths);

    let requests: Arc<Vec<Vec<u8>>> = Arc::new(paths.iter().map(encode_query).collect());
    let kiln_socket = work.join("kiln.sock");
    let nix_socket = work.join("nix.sock");
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for (clients, how) in [
        (Clients::EventLoop, "one event-loop thread"),
        (Clients::Threads, "a thread each"),
    ] {
        let kiln = {
            let d = start_kiln(&kiln_root, &kiln_socket, &nix_store);
            query_rate(&kiln_socket, d.0.id(), &requests, clients)
        };
        let nix = {
            let d = start_nix(&nix_store, &nix_socket);
            query_rate(&nix_socket, d.0.id(), &requests, clients)
        };
        println!(
            "QueryPathInfo, {CLIENTS} connections (raw sockets, one request in flight each, {how}), {PATHS} paths:"
        );
        println!("                     req/s    daemon CPU/req   bench clients CPU/req");
        for (name, f) in [("kiln store-daemon", &kiln), ("nix-daemon 2.8   ", &nix)] {
            println!(
                "  {name}  {:>10.0}    {:>8.2} µs       {:>8.2} µs",
                f.rate,
                us(f.server_cpu),
                us(f.client_cpu)
            );
        }
        println!(
            "  ratio              {:>10.2}x   {:>8.2}x (nix-daemon CPU / Kiln CPU per request)",
            kiln.rate / nix.rate,
            us(nix.server_cpu) / us(kiln.server_cpu)
        );
    }
}

fn bench_wide(work: &Path) {
    // The wide graph, each daemon on a fresh, empty store.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let file = work.join("wide.nix");
    std::fs::write(&file, kiln_benches::wide_nix(seed, WIDE)).unwrap();
    let client = NixStore::new();
    let kiln_wide_root = work.join("kiln-wide");
    let kiln_wide_socket = work.join("kiln-wide.sock");
    let kiln_time = {
        let _d = start_kiln(&kiln_wide_root, &kiln_wide_socket, &client);
        let url = format!(
            "unix://{}?root={}",
            kiln_wide_socket.display(),
            kiln_wide_root.display()
        );
        wide_build(&client, &url, &file)
    };
    if std::env::var_os("BENCH_KILN_ONLY").is_some() {
        println!(
            "nix-build of the wide graph through kiln store-daemon: {:.2} s (BENCH_KILN_ONLY)",
            kiln_time.as_secs_f64()
        );
        return;
    }
    let nix_wide = NixStore::new();
    let nix_wide_socket = work.join("nix-wide.sock");
    let nix_time = {
        let _d = start_nix(&nix_wide, &nix_wide_socket);
        let url = format!(
            "unix://{}?root={}",
            nix_wide_socket.display(),
            nix_wide.root().display()
        );
        wide_build(&client, &url, &file)
    };
    println!("nix-build of the wide graph ({WIDE} + 1 derivations, -j2), through each daemon:");
    println!("  kiln store-daemon  {:>10.2} s", kiln_time.as_secs_f64());
    println!("  nix-daemon 2.8     {:>10.2} s", nix_time.as_secs_f64());
    println!(
        "  ratio              {:>10.2}x",
        nix_time.as_secs_f64() / kiln_time.as_secs_f64()
    );
}
