//! 200 clients at once on Kiln's `store-daemon`, each on its own
//! connection, doing a mix of queries, adds and NAR reads for 20 seconds:
//! no request may fail, and the daemon's memory must stay bounded (it may
//! not grow with the number of requests served).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_e2e::KilnDaemon;
use kiln_protocol::client::DaemonStore;
use kiln_store::Store;

const CLIENTS: usize = 200;
const RUN: Duration = Duration::from_secs(20);
/// Resident memory the daemon may use at most under this load.
const MAX_RSS_KIB: u64 = 512 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon is running");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn two_hundred_clients_mixed_operations_bounded_memory() {
    let daemon = KilnDaemon::start(&[]);
    let seed = DaemonStore::new(daemon.socket());
    let mut paths = Vec::new();
    for i in 0..100 {
        let info = seed
            .add_text(
                &format!("seed-{i}"),
                format!("seed {i}\n").as_bytes(),
                &Default::default(),
            )
            .expect("seeding the store");
        paths.push(info.path);
    }
    let paths = Arc::new(paths);
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (paths, stop, ops, socket) =
            (paths.clone(), stop.clone(), ops.clone(), daemon.socket());
        clients.push(std::thread::spawn(move || -> Result<(), String> {
            let store = DaemonStore::new(socket);
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let p = &paths[i % paths.len()];
                let result = match i % 5 {
                    0 | 1 => store.query_path_info(p).map(|info| assert!(info.is_some())),
                    2 => store
                        .query_valid_paths(&paths.iter().take(20).cloned().collect())
                        .map(|v| assert_eq!(v.len(), 20)),
                    3 => {
                        let mut nar = Vec::new();
                        store
                            .nar_from_path(p, &mut nar)
                            .map(|()| assert!(!nar.is_empty()))
                    }
                    _ => store
                        .add_text(
                            &format!("c{c}-{i}"),
                            format!("{c} {i}\n").as_bytes(),
                            &Default::default(),
                        )
                        .map(drop),
                };
                result.map_err(|e| format!("client {c}, request {i}: {e}"))?;
                ops.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok(())
        }));
    }
    let mut samples = Vec::new();
    while started.elapsed() < RUN {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(rss_kib(daemon.pid()));
    }
    stop.store(true, Ordering::Relaxed);
    for (c, t) in clients.into_iter().enumerate() {
        t.join()
            .unwrap_or_else(|_| panic!("client {c} panicked"))
            .unwrap();
    }
    let total = ops.load(Ordering::Relaxed);
    let max = *samples.iter().max().unwrap();
    eprintln!(
        "{total} requests from {CLIENTS} clients in {:?} ({:.0}/s); daemon RSS samples (KiB): {samples:?}",
        started.elapsed(),
        total as f64 / started.elapsed().as_secs_f64()
    );
    assert!(
        total > CLIENTS as u64 * 10,
        "only {total} requests were served"
    );
    assert!(
        max < MAX_RSS_KIB,
        "daemon RSS reached {max} KiB (limit {MAX_RSS_KIB})"
    );
    // Bounded, not growing with requests served: the second half of the run
    // stays within 25% (+16 MiB) of the first half's peak.
    let half = samples.len() / 2;
    let first = *samples[..half].iter().max().unwrap();
    let second = *samples[half..].iter().max().unwrap();
    assert!(
        second <= first + first / 4 + 16 * 1024,
        "daemon memory keeps growing: first half peak {first} KiB, second half {second} KiB"
    );
}
