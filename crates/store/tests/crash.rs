//! Crash consistency and concurrency of the local store, with real
//! processes: a helper adds, imports or collects and is SIGKILLed at random
//! points; after each kill `verify --check-contents` must find no valid path
//! with wrong or missing contents, no path that was valid (or reported
//! added) may be lost except by collection of unrooted paths, rooted
//! closures always survive, and the store keeps working.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_store::local::LocalStore;
use kiln_store::{Store, compute_closure};

const HELPER: &str = env!("CARGO_BIN_EXE_kiln-store-crash-helper");
const KILLS: usize = 200;

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn helper(args: &[&str]) -> Child {
    Command::new(HELPER)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the crash helper")
}

fn reported(child: &mut Child) -> BTreeSet<StorePath> {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out.lines().filter_map(|l| l.parse().ok()).collect()
}

fn check_verify(store: &LocalStore, context: &str) {
    let report = store.verify(true, None).expect("verify runs");
    assert!(
        report.problems.is_empty(),
        "{context}: verify --check-contents found {:?}",
        report.problems
    );
}

/// An export stream of a small chain of paths, made in a store of its own.
fn export_file(dir: &Path) -> PathBuf {
    let source = LocalStore::open_root(dir.join("export-source")).unwrap();
    let mut refs = StorePathSet::new();
    let mut all = StorePathSet::new();
    for i in 0..25 {
        let info = source
            .add_text(
                &format!("exported-{i}"),
                format!("payload {i} {}", "x".repeat(i * 500)).as_bytes(),
                &refs,
            )
            .unwrap();
        refs = [info.path.clone()].into_iter().collect();
        all.insert(info.path);
    }
    let file = dir.join("export.nar-stream");
    let mut out = std::fs::File::create(&file).unwrap();
    kiln_store::export::export_paths(&source, &all, &mut out).unwrap();
    file
}

#[test]
fn sigkill_at_random_points_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let root_s = root.to_str().unwrap().to_owned();
    let export = export_file(dir.path());
    let store = LocalStore::open_root(&root).unwrap();
    let seed = std::env::var("KILN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    eprintln!("seed {seed} (set KILN_CRASH_SEED to replay)");
    let mut rng = Rng(seed | 1);
    let gcroots = store.state_dir().join("gcroots");
    let mut rooted = StorePathSet::new();
    let (mut kills, mut iterations) = (0, 0);
    let started = Instant::now();
    while kills < KILLS {
        iterations += 1;
        assert!(
            iterations < 4 * KILLS,
            "only {kills} of {iterations} runs could be killed before finishing"
        );
        let before = store.query_all_valid_paths().unwrap();
        let op = rng.below(10);
        let child_seed = rng.below(1 << 40).to_string();
        let (kind, mut child) = match op {
            0..=5 => ("add", helper(&["add", &root_s, &child_seed, "25"])),
            6..=7 => (
                "import",
                helper(&["import", &root_s, export.to_str().unwrap()]),
            ),
            _ => ("gc", helper(&["gc", &root_s])),
        };
        std::thread::sleep(Duration::from_micros(
            2_000 + rng.below(if kind == "add" { 100_000 } else { 30_000 }),
        ));
        let _ = child.kill();
        let reported = reported(&mut child);
        let status = child.wait().unwrap();
        if status.signal() == Some(9) {
            kills += 1;
        } else if !status.success() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("{kind} helper failed on its own: {status}: {err}");
        }
        let context = format!("after {kind} #{iterations} ({status})");
        check_verify(&store, &context);
        let after = store.query_all_valid_paths().unwrap();
        if kind != "gc" {
            let lost: Vec<_> = before.difference(&after).collect();
            assert!(lost.is_empty(), "{context}: valid paths lost: {lost:?}");
            let missing: Vec<_> = reported.difference(&after).collect();
            assert!(
                missing.is_empty(),
                "{context}: reported as added but not valid: {missing:?}"
            );
        }
        let closure = compute_closure(&store, &rooted, false, false, false)
            .unwrap_or_else(|e| panic!("{context}: a rooted closure is broken: {e}"));
        assert!(
            closure.is_subset(&after),
            "{context}: a rooted path was lost"
        );
        // Root a few of the paths just added, so collections have something to keep.
        if kind == "add" {
            for p in reported.iter().take(2) {
                if after.contains(p) {
                    let link = gcroots.join(format!("root-{}", p.hash_part()));
                    let _ = std::os::unix::fs::symlink(store.store_dir().print_path(p), &link);
                    rooted.insert(p.clone());
                }
            }
        }
        if iterations % 25 == 0 {
            // The store keeps working for a fresh writer.
            let t = store
                .add_text(
                    &format!("alive-{iterations}"),
                    b"still works",
                    &StorePathSet::new(),
                )
                .unwrap();
            assert!(store.is_valid_path(&t.path).unwrap());
        }
    }
    // After all that, a complete collection still leaves the roots intact.
    let mut gc = helper(&["gc", &root_s]);
    assert!(gc.wait().unwrap().success());
    check_verify(&store, "after the final collection");
    let after = store.query_all_valid_paths().unwrap();
    assert!(
        compute_closure(&store, &rooted, false, false, false)
            .unwrap()
            .is_subset(&after)
    );
    eprintln!(
        "{kills} kills in {iterations} runs, {:.1?}",
        started.elapsed()
    );
}

#[test]
fn a_live_process_keeps_what_it_added() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let root_s = root.to_str().unwrap();
    let store = LocalStore::open_root(&root).unwrap();
    let mut holder = helper(&["hold", root_s, "77"]);
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let held: StorePath = line.trim().parse().expect("the holder reports its path");
    assert!(helper(&["gc", root_s]).wait().unwrap().success());
    assert!(
        store.is_valid_path(&held).unwrap(),
        "collected a path a live process had just added"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(helper(&["gc", root_s]).wait().unwrap().success());
    assert!(
        !store.is_valid_path(&held).unwrap(),
        "the path should be garbage once its process is gone"
    );
    // Dead processes' temp-roots files are cleaned up.
    let left: Vec<_> = std::fs::read_dir(store.state_dir().join("temproots"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "stale temp-roots files: {left:?}");
}

#[test]
fn concurrent_adders_of_the_same_paths_agree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let root_s = root.to_str().unwrap();
    let store = LocalStore::open_root(&root).unwrap();
    let children: Vec<Child> = (0..4)
        .map(|_| helper(&["add", root_s, "4242", "30"]))
        .collect();
    let mut outputs = Vec::new();
    for mut c in children {
        let r = reported(&mut c);
        let status = c.wait().unwrap();
        let mut err = String::new();
        c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(status.success(), "a concurrent adder failed: {err}");
        outputs.push(r);
    }
    assert!(
        outputs.windows(2).all(|w| w[0] == w[1]),
        "concurrent adders of the same content got different paths"
    );
    for p in &outputs[0] {
        assert!(store.is_valid_path(p).unwrap());
    }
    check_verify(&store, "after concurrent adds");
    let leftovers: Vec<String> = std::fs::read_dir(store.real_store_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln-tmp") || n.ends_with(".lock"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "leftovers after concurrent adds: {leftovers:?}"
    );
}
