//! The scheduler on a 100,000-derivation graph with a builder that does
//! nothing: every derivation is built exactly once, after all of its
//! inputs, within 1 GiB of peak memory. Its time per derivation (target
//! under 50 µs) is measured by `cargo xtask bench scheduler`, not here: a
//! test's timing depends on what else the machine runs.

use std::sync::Arc;
use std::time::Instant;

use kiln_scheduler::result::BuildStatus;
use kiln_scheduler::synthetic::SyntheticGraph;

const N: usize = 100_000;

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    kb * 1024
}

#[test]
fn hundred_thousand_derivations() {
    let graph = Arc::new(SyntheticGraph::new(N));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let report = runtime.block_on(graph.clone().build_all(2));
    let elapsed = started.elapsed();
    let per_drv = elapsed / N as u32;
    let peak = peak_rss_bytes();
    eprintln!(
        "{N} derivations in {elapsed:?}: {per_drv:?} per derivation, peak RSS {} MiB",
        peak >> 20
    );
    assert_eq!(report.results.len(), N);
    assert!(
        report
            .results
            .values()
            .all(|r| r.status == BuildStatus::Built)
    );
    for (i, n) in graph.build_counts().into_iter().enumerate() {
        assert_eq!(n, 1, "node {i} built {n} times");
    }
    assert_eq!(graph.order_violations(), 0);
    assert!(
        peak < 1 << 30,
        "peak memory {} MiB (limit 1 GiB)",
        peak >> 20
    );
}
