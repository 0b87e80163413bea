//! `cargo xtask bench store`: the local store against Nix 2.8's, same run.
//!
//! - 10,000 small paths (one file each): `kiln store add` vs
//!   `nix-store --add`, each given all files in one invocation;
//! - one ~1 GB tree: the same two commands, and the time to hash its NAR
//!   alone (the floor no add can beat);
//! - collecting the 10,000 then-dead paths: `kiln store gc` vs
//!   `nix-store --gc`.
//!
//! Durability is not handicapped in Kiln's favour: Kiln fsyncs every path's
//! files and directories (one `syncfs` per batch) and syncs its database WAL
//! on every commit, so a registered path survives a power cut; Nix 2.8 does
//! not fsync store files at all and commits with `synchronous = normal`.
//! Both tools' resulting paths are compared, so a fast wrong answer fails.
//!
//! Targets (issue 3): ≥ 2× on small paths, ≥ 3× on the large tree, ≥ 2× on GC.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const SMALL_PATHS: usize = 10_000;
const TREE_VERSION: &str = "store-tree-v1";
const TREE_BYTES: u64 = 1 << 30;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("bench-store: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command to completion; its stdout, and how long it took.
fn timed(mut command: Command) -> Result<(String, Duration), String> {
    let what = format!("{command:?}");
    let start = Instant::now();
    let out = command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let took = start.elapsed();
    if !out.status.success() {
        let mut shown = what;
        shown.truncate(300);
        return Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

/// `sync -f ROOT`: what it takes to make Nix's work as durable as Kiln's.
fn sync_fs(root: &Path) -> Result<Duration, String> {
    let mut c = Command::new("sync");
    c.arg("-f").arg(root);
    Ok(timed(c)?.1)
}

fn nix_store(root: &Path) -> Command {
    let mut c = Command::new("nix-store");
    c.arg("--store")
        .arg(format!("local?root={}", root.display()));
    c.args(["--option", "substituters", ""]);
    c
}

fn kiln_store(bin: &Path, root: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg("store")
        .arg("--store")
        .arg(format!("local?root={}", root.display()));
    c
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.is_empty()).collect()
}

/// Prints one comparison; `nix_sync` is Nix's time plus a `sync -f` of its
/// store (the same durability as Kiln's), against which the target counts.
fn report(
    what: &str,
    count: usize,
    kiln: Duration,
    nix: Duration,
    nix_sync: Duration,
    target: f64,
) -> bool {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / count as f64;
    let speedup = nix_sync.as_secs_f64() / kiln.as_secs_f64();
    let raw = nix.as_secs_f64() / kiln.as_secs_f64();
    let ok = speedup >= target;
    println!(
        "{what:<26} kiln {:>8.3} s ({:>8.1} µs/path) | nix {:>8.3} s ({:>8.1} µs/path), +sync {:>8.3} s | {speedup:>5.2}x durable-vs-durable, {raw:>5.2}x vs nix without sync (target ≥ {target}x: {})",
        kiln.as_secs_f64(),
        per(kiln),
        nix.as_secs_f64(),
        per(nix),
        nix_sync.as_secs_f64(),
        if ok { "met" } else { "MISSED" }
    );
    ok
}

/// The 1, 5 and 15 minute load averages: figures from a busy machine
/// read differently.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// A ~1 GB tree of files of mixed sizes, generated once.
fn big_tree(dir: &Path) -> Result<PathBuf, String> {
    let tree = dir.join(TREE_VERSION);
    let done = dir.join(format!("{TREE_VERSION}.complete"));
    if done.is_file() {
        return Ok(tree);
    }
    let _ = fs::remove_dir_all(&tree);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut written = 0u64;
    let mut i = 0u64;
    while written < TREE_BYTES {
        let sub = tree.join(format!("d{}/e{}", i % 16, (i / 16) % 8));
        fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
        // Mostly small files, some large ones, like a real package.
        let size = match next() % 100 {
            0..=79 => next() % 16_384,
            80..=97 => next() % 1_048_576,
            _ => 8 << 20 | next() % (24 << 20),
        } as usize;
        let mut data = Vec::with_capacity(size + 8);
        while data.len() < size {
            data.extend_from_slice(&next().to_le_bytes());
        }
        data.truncate(size);
        fs::write(sub.join(format!("f{i}")), &data).map_err(|e| e.to_string())?;
        written += size as u64;
        i += 1;
    }
    fs::write(&done, b"").map_err(|e| e.to_string())?;
    Ok(tree)
}

fn run() -> Result<ExitCode, String> {
    let kiln = kiln_benches::release_kiln_bin()?;
    let data = kiln_benches::workspace_target_dir().join("bench-data");
    fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let work = tempfile::Builder::new()
        .prefix("bench-store-")
        .tempdir_in(&data)
        .map_err(|e| e.to_string())?;
    let (nix_root, kiln_root) = (work.path().join("nix-root"), work.path().join("kiln-root"));
    // Create both stores first, so neither timing includes initialisation.
    timed({
        let mut c = nix_store(&nix_root);
        c.arg("--init");
        c
    })?;
    timed({
        let mut c = kiln_store(&kiln, &kiln_root);
        c.args(["path-info", "--all"]);
        c
    })?;
    println!("load average at start: {}", load_average());
    println!("kiln: fsync of every file and directory (syncfs per batch) + WAL synced per commit");
    println!(
        "nix 2.8: no fsync of store files, WAL synchronous=normal (as configured by default)\n"
    );

    let mut all_met = true;

    // 10,000 small paths.
    let small = work.path().join("small");
    fs::create_dir_all(&small).map_err(|e| e.to_string())?;
    let mut files = Vec::with_capacity(SMALL_PATHS);
    for i in 0..SMALL_PATHS {
        let f = small.join(format!("file-{i}"));
        let mut h = fs::File::create(&f).map_err(|e| e.to_string())?;
        writeln!(h, "small file number {i}\n{}", "x".repeat(i % 200)).map_err(|e| e.to_string())?;
        files.push(f);
    }
    let (nix_out, nix_t) = timed({
        let mut c = nix_store(&nix_root);
        c.arg("--add").args(&files);
        c
    })?;
    let nix_sync_t = nix_t + sync_fs(&nix_root)?;
    sync_fs(&kiln_root)?;
    let (kiln_out, kiln_t) = timed({
        let mut c = kiln_store(&kiln, &kiln_root);
        c.arg("add").args(&files);
        c
    })?;
    if lines(&nix_out) != lines(&kiln_out) {
        return Err("kiln and nix-store --add printed different paths for the small files".into());
    }
    all_met &= report(
        "add 10,000 small paths",
        SMALL_PATHS,
        kiln_t,
        nix_t,
        nix_sync_t,
        2.0,
    );

    // One ~1 GB tree.
    let tree = big_tree(&data)?;
    // Warm the page cache for both.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find {} -type f -exec cat {{}} + > /dev/null",
            tree.display()
        ))
        .status();
    let (nix_out, nix_t) = timed({
        let mut c = nix_store(&nix_root);
        c.arg("--add").arg(&tree);
        c
    })?;
    let nix_sync_t = nix_t + sync_fs(&nix_root)?;
    let (kiln_out, kiln_t) = timed({
        let mut c = kiln_store(&kiln, &kiln_root);
        c.arg("add").arg(&tree);
        c
    })?;
    if lines(&nix_out) != lines(&kiln_out) {
        return Err(format!(
            "different paths for the large tree: nix {nix_out:?}, kiln {kiln_out:?}"
        ));
    }
    all_met &= report("add a 1 GB tree", 1, kiln_t, nix_t, nix_sync_t, 3.0);
    // The floor: one thread reading and SHA-256-hashing the tree's NAR, no
    // writing at all. Adding cannot beat it, so it caps the speedup.
    let start = Instant::now();
    let (_, nar_size) = kiln_formats::nar::hash_path(&tree, kiln_formats::hash::HashAlgo::Sha256)
        .map_err(|e| e.to_string())?;
    let hash_t = start.elapsed();
    println!(
        "  floor: hashing the {:.2} GB NAR alone takes {:.3} s ({:.2} GB/s), so at best {:.2}x nix+sync, {:.2}x nix without sync",
        nar_size as f64 / 1e9,
        hash_t.as_secs_f64(),
        nar_size as f64 / 1e9 / hash_t.as_secs_f64(),
        nix_sync_t.as_secs_f64() / hash_t.as_secs_f64(),
        nix_t.as_secs_f64() / hash_t.as_secs_f64(),
    );

    // GC: everything is dead (no roots).
    let (nix_out, nix_t) = timed({
        let mut c = nix_store(&nix_root);
        c.arg("--gc");
        c
    })?;
    let nix_sync_t = nix_t + sync_fs(&nix_root)?;
    let (kiln_out, kiln_t) = timed({
        let mut c = kiln_store(&kiln, &kiln_root);
        c.arg("gc");
        c
    })?;
    println!("  nix: {}", nix_out.trim());
    println!("  kiln: {}", kiln_out.trim());
    all_met &= report(
        "collect 10,001 dead paths",
        SMALL_PATHS + 1,
        kiln_t,
        nix_t,
        nix_sync_t,
        2.0,
    );

    println!("load average at end: {}", load_average());
    Ok(if all_met {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
