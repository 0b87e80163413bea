//! `cargo xtask bench daemon`: Kiln's `store-daemon` beside Nix 2.8's
//! `nix-daemon`, in the same run, on stores with the same contents.
//!
//! - QueryPathInfo requests per second from 32 concurrent clients (one
//!   connection each, Kiln's daemon client for both daemons) over a store
//!   of 10,000 paths;
//! - `nix-build` (Nix 2.8's client) of the wide graph — 1,000 trivial
//!   derivations plus one that depends on them all, `-j2` — through each
//!   daemon, instantiation included, each on an empty store.
//!
//! `cargo xtask bench daemon -- query` (or `-- wide`) runs one part only.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_e2e::NixStore;
use kiln_formats::hash::HashAlgo;
use kiln_formats::store_path::{FileIngestionMethod, StorePath};
use kiln_protocol::client::DaemonStore;
use kiln_store::Store;
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

/// QueryPathInfo from `CLIENTS` threads for `QUERY_TIME`: requests/s.
fn query_rate(socket: &Path, paths: &Arc<Vec<StorePath>>) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for c in 0..CLIENTS {
        let (stop, count, paths, socket) = (
            stop.clone(),
            count.clone(),
            paths.clone(),
            socket.to_path_buf(),
        );
        threads.push(std::thread::spawn(move || {
            let store = DaemonStore::new(socket);
            let mut i = c * 7919;
            while !stop.load(Ordering::Relaxed) {
                let info = store
                    .query_path_info(&paths[i % paths.len()])
                    .expect("QueryPathInfo");
                assert!(info.is_some());
                count.fetch_add(1, Ordering::Relaxed);
                i += 104_729;
            }
        }));
    }
    // Warm up the connections, then measure.
    std::thread::sleep(Duration::from_millis(500));
    let start_count = count.load(Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(QUERY_TIME);
    let done = count.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    done as f64 / elapsed.as_secs_f64()
}

/// `nix-build -j2` of the wide graph through the daemon at `url`.
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
    if wanted("query") {
        bench_query(work.path());
    }
    if wanted("wide") {
        bench_wide(work.path());
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

    let kiln_socket = work.join("kiln.sock");
    let nix_socket = work.join("nix.sock");
    let kiln_rate = {
        let _d = start_kiln(&kiln_root, &kiln_socket, &nix_store);
        query_rate(&kiln_socket, &paths)
    };
    let nix_rate = {
        let _d = start_nix(&nix_store, &nix_socket);
        query_rate(&nix_socket, &paths)
    };
    println!("QueryPathInfo, {CLIENTS} clients, {PATHS} paths:");
    println!("  kiln store-daemon  {kiln_rate:>10.0} req/s");
    println!("  nix-daemon 2.8     {nix_rate:>10.0} req/s");
    println!("  ratio              {:>10.2}x", kiln_rate / nix_rate);
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
