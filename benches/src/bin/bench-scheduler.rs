//! `cargo xtask bench scheduler`: the goal scheduler's own cost on a graph
//! of 100,000 derivations, with a builder that does nothing (two jobs, two
//! worker threads): discovery, ordering, dispatch to blocking threads and
//! completion, per derivation, and the peak memory of the run. Targets:
//! under 50 µs per derivation and 1 GiB (Nix's goal scheduler is known to
//! crawl at 50,000 derivations, so it is not run beside this one).
//!
//! `crates/scheduler/tests/scale.rs` checks the same run's results (every
//! derivation built once, after its inputs) without timing it.

use std::sync::Arc;
use std::time::Instant;

use kiln_scheduler::result::BuildStatus;
use kiln_scheduler::synthetic::SyntheticGraph;

const N: usize = 100_000;
const ROUNDS: usize = 3;

fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status")
        >> 10
}

fn main() {
    println!("scheduler: {N} derivations, a builder that does nothing, -j2, {ROUNDS} rounds");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut per_drv = Vec::new();
    for round in 1..=ROUNDS {
        let graph = Arc::new(SyntheticGraph::new(N));
        let started = Instant::now();
        let report = runtime.block_on(graph.build_all(2));
        let elapsed = started.elapsed();
        assert!(
            report.results.len() == N
                && report
                    .results
                    .values()
                    .all(|r| r.status == BuildStatus::Built),
            "not every derivation was built"
        );
        let us = elapsed.as_secs_f64() * 1e6 / N as f64;
        println!("  round {round}: {elapsed:.2?}, {us:.1} µs per derivation");
        per_drv.push(us);
    }
    per_drv.sort_by(f64::total_cmp);
    let median = per_drv[ROUNDS / 2];
    let peak = peak_rss_mib();
    println!(
        "  median {median:.1} µs per derivation (target < 50), peak RSS {peak} MiB (target < 1024)"
    );
    let met = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "targets: time {}, memory {}",
        met(median < 50.0),
        met(peak < 1024)
    );
}
