//! `cargo xtask bench build`: trivial sandboxed builds, Kiln beside
//! `nix-build` of Nix 2.8 on the same derivations, in the same run.
//!
//! - wide: 1,000 independent derivations plus one that depends on all of
//!   them, with two jobs (`-j2`);
//! - deep: a chain of 300 derivations, each depending on the previous one.
//!
//! Nix instantiates the graphs into a throwaway chroot store (where Nix 2.8
//! always builds in its sandbox); Kiln imports the same `.drv` files into a
//! store of its own first (untimed, with `--dry-run`), so both time only
//! the builds. A seed in every derivation makes each run build afresh.
//! `BENCH_KILN_ONLY=1` runs only Kiln's builds (for profiling them), and
//! `BENCH_CASE=wide` or `BENCH_CASE=deep` only one of the graphs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::NixStore;

fn deep_nix(seed: u64, n: usize) -> String {
    format!(
        r#"let
  step = prev: i: derivation {{
    name = "deep-${{toString i}}";
    builder = "/bin/sh";
    args = [ "-c" "echo {seed} $prev > $out" ];
    prev = prev;
    system = builtins.currentSystem;
  }};
in builtins.foldl' step "" (builtins.genList (i: i) {n})
"#
    )
}

fn sandbox_paths(nix: &NixStore) -> String {
    let conf = std::fs::read_to_string(nix.conf_dir().join("nix.conf")).unwrap();
    conf.lines()
        .find_map(|l| l.strip_prefix("sandbox-paths = "))
        .expect("the test store's nix.conf sets sandbox-paths")
        .to_owned()
}

struct Case {
    name: &'static str,
    count: usize,
    expr: String,
}

/// CPU time (user + system) of all reaped descendants so far: builds run
/// as descendants of both tools, so the difference around one run is that
/// run's CPU, a figure less at the mercy of other load than the wall clock.
fn children_cpu() -> Duration {
    // `cutime` and `cstime`, the 14th and 15th fields after the command
    // name, in clock ticks (USER_HZ, 100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_name = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 = fields[13].parse::<u64>().unwrap() + fields[14].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Wall-clock and CPU time of one run.
struct Timing {
    wall: Duration,
    cpu: Duration,
}

fn time_nix(nix: &NixStore, drv: &str) -> Timing {
    let cpu_before = children_cpu();
    let started = Instant::now();
    let out = nix
        .command("nix-build")
        .args(["--no-out-link", "-j2", "--quiet", drv])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "nix-build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Timing {
        wall: elapsed,
        cpu: children_cpu() - cpu_before,
    }
}

fn time_kiln(kiln: &Path, store: &str, sandbox: &str, drv_file: &Path) -> Timing {
    let run = |extra: &[&str]| {
        let cpu_before = children_cpu();
        let started = Instant::now();
        let out = Command::new(kiln)
            .args(["build", "--store", store, "--no-out-link", "-j2", "-Q"])
            .args(["--option", "sandbox-paths", sandbox])
            .args(extra)
            .arg(drv_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kiln build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Timing {
            wall: started.elapsed(),
            cpu: children_cpu() - cpu_before,
        }
    };
    run(&["--dry-run"]); // imports the .drv closure, builds nothing
    run(&[])
}

fn main() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let kiln = kiln_benches::profile_bin("kiln", "kiln");
    let cases = [
        Case {
            name: "wide (1,000 + 1, -j2)",
            count: 1001,
            expr: kiln_benches::wide_nix(seed, 1000),
        },
        Case {
            name: "deep (chain of 300)",
            count: 300,
            expr: deep_nix(seed, 300),
        },
    ];
    println!("build: trivial sandboxed derivations, Kiln vs nix-build (Nix 2.8), same run");
    let only = std::env::var("BENCH_CASE").ok();
    // Stores are deleted only once every case ran: on ext4 without a
    // journal, inodes freed in the last half minute slow every allocation,
    // which would charge one case's cleanup to the next case's first tool.
    let mut keep = Vec::new();
    for case in cases {
        if only.as_deref().is_some_and(|o| !case.name.starts_with(o)) {
            continue;
        }
        let nix = NixStore::new();
        let sandbox = sandbox_paths(&nix);
        let file = nix.root().parent().unwrap().join("graph.nix");
        std::fs::write(&file, &case.expr).unwrap();
        let drv = nix.instantiate(&file).unwrap().remove(0);
        let kiln_root = tempfile::tempdir().unwrap();
        let store = format!("local?root={}", kiln_root.path().display());
        let kiln_time = time_kiln(&kiln, &store, &sandbox, &nix.physical(&drv));
        let nix_time = if std::env::var_os("BENCH_KILN_ONLY").is_some() {
            None
        } else {
            Some(time_nix(&nix, &drv))
        };
        keep.push((nix, kiln_root));
        let Some(nix_time) = nix_time else {
            println!(
                "  {:<24} kiln {:8.2} s, cpu {:.2} s",
                case.name,
                kiln_time.wall.as_secs_f64(),
                kiln_time.cpu.as_secs_f64()
            );
            continue;
        };
        let per = |d: Duration| d.as_secs_f64() * 1e3 / case.count as f64;
        println!(
            "  {:<24} kiln {:8.2} s ({:6.2} ms/drv)   nix-build {:8.2} s ({:6.2} ms/drv)   kiln is {:.1}x faster",
            case.name,
            kiln_time.wall.as_secs_f64(),
            per(kiln_time.wall),
            nix_time.wall.as_secs_f64(),
            per(nix_time.wall),
            nix_time.wall.as_secs_f64() / kiln_time.wall.as_secs_f64()
        );
        println!(
            "  {:<24} cpu  {:8.2} s ({:6.2} ms/drv)   nix-build {:8.2} s ({:6.2} ms/drv)   kiln uses {:.1}x less",
            "",
            kiln_time.cpu.as_secs_f64(),
            per(kiln_time.cpu),
            nix_time.cpu.as_secs_f64(),
            per(nix_time.cpu),
            nix_time.cpu.as_secs_f64() / kiln_time.cpu.as_secs_f64()
        );
    }
}
