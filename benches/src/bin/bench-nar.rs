//! `cargo xtask bench nar`: serialise and hash a ~1 GB tree as a NAR.
//!
//! Kiln's `nar::hash_path` (NAR serialisation + SHA-256) against
//! `nix-hash --type sha256` and `nix-store --dump | sha256sum` on the same
//! tree, in the same run, beside the machine's single-core SHA-256 throughput
//! (the ceiling for any NAR hasher). The tree is generated once and cached
//! under `target/bench-data/`; every timing is taken with the tree in the page
//! cache, as the best of five rounds.
//!
//! Targets: at least 3x faster than `nix-hash`, and within 25% of the
//! single-core SHA-256 throughput.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use kiln_formats::hash::{Hash, HashAlgo, Hasher};
use kiln_formats::nar;

/// Bump when the generator changes so that an old cached tree is replaced.
const TREE_VERSION: &str = "nar-tree-v1";
const TARGET_BYTES: u64 = 1 << 30;
const RUNS: usize = 5;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("bench-nar: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let kiln_bin = kiln_benches::release_kiln_bin()?;
    let tree = bench_tree()?;
    for tool in ["nix-hash", "nix-store", "sha256sum"] {
        which(tool).ok_or_else(|| format!("'{tool}' is not installed: run `cargo xtask setup`"))?;
    }
    println!(
        "CPU: {}; SHA extensions (sha-ni): {}",
        cpu_model(),
        if std::is_x86_feature_detected!("sha") {
            "yes"
        } else {
            "NO"
        }
    );

    // Warm the page cache so that every contender reads from memory.
    let (expected, nar_size) =
        nar::hash_path(&tree, HashAlgo::Sha256).map_err(|e| e.to_string())?;
    let gb = nar_size as f64 / 1e9;
    println!("tree: {} ({:.2} GB of NAR)\n", tree.display(), gb);

    // As many bytes as the NAR, really in memory (not one small buffer
    // hashed over and over, which would sit in the CPU's cache).
    let in_memory: Vec<u8> = (0..nar_size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let hex = expected.to_base16();
    let mut contenders: Vec<(&str, Contender)> = vec![
        (
            "SHA-256 of as many bytes, in memory, 1 core",
            Box::new(|| {
                std::hint::black_box(sha256_in_memory(&in_memory));
            }),
        ),
        (
            "kiln: nar::hash_path (serialise + sha256)",
            Box::new(|| {
                let (hash, _) = nar::hash_path(&tree, HashAlgo::Sha256).expect("hashing the tree");
                assert_eq!(hash, expected);
            }),
        ),
        (
            "kiln: serialise only (no hashing)",
            Box::new(|| {
                nar::dump_path(&tree, std::io::sink()).expect("serialising the tree");
            }),
        ),
        (
            "kiln nar dump | sha256sum",
            Box::new(|| {
                let script = r#""$1" nar dump "$2" | sha256sum"#;
                let out = output(
                    Command::new("sh")
                        .args(["-c", script, "sh"])
                        .arg(&kiln_bin)
                        .arg(&tree),
                );
                assert!(out.starts_with(&hex), "kiln nar dump | sha256sum: {out}");
            }),
        ),
        (
            "nix-hash --type sha256",
            Box::new(|| {
                let out = output(
                    Command::new("nix-hash")
                        .args(["--type", "sha256"])
                        .arg(&tree),
                );
                assert_eq!(out.trim(), hex, "nix-hash disagrees with Kiln");
            }),
        ),
        (
            "nix-store --dump | sha256sum",
            Box::new(|| {
                let script = r#"nix-store --dump "$1" | sha256sum"#;
                let out = output(Command::new("sh").args(["-c", script, "sh"]).arg(&tree));
                assert!(out.starts_with(&hex), "nix-store --dump | sha256sum: {out}");
            }),
        ),
    ];
    // Rounds rather than one contender after another, so that a busy
    // moment on the machine does not fall on one contender only.
    let mut best = vec![Duration::MAX; contenders.len()];
    for _ in 0..RUNS {
        for ((_, run), best) in contenders.iter_mut().zip(&mut best) {
            let start = Instant::now();
            run();
            *best = (*best).min(start.elapsed());
        }
    }
    let names: Vec<&str> = contenders.iter().map(|(name, _)| *name).collect();
    drop(contenders);
    // In the order of `contenders`.
    let (sha, kiln, nix_hash) = (best[0], best[1], best[4]);

    println!(
        "{:<44} {:>9} {:>9} {:>13}",
        "", "seconds", "GB/s", "vs nix-hash"
    );
    for (name, time) in names.iter().zip(&best) {
        let secs = time.as_secs_f64();
        let ratio = nix_hash.as_secs_f64() / secs;
        println!("{name:<44} {secs:>9.3} {:>9.2} {ratio:>12.2}x", gb / secs);
    }

    let speedup = nix_hash.as_secs_f64() / kiln.as_secs_f64();
    let of_sha = sha.as_secs_f64() / kiln.as_secs_f64();
    println!();
    println!(
        "kiln vs nix-hash: {speedup:.2}x faster (target >= 3x): {}",
        verdict(speedup >= 3.0)
    );
    println!(
        "kiln vs single-core SHA-256: {:.0}% of its throughput (target >= 75%): {}",
        of_sha * 100.0,
        verdict(of_sha >= 0.75)
    );
    Ok(ExitCode::SUCCESS)
}

/// One way of hashing the tree, run once per round.
type Contender<'a> = Box<dyn FnMut() + 'a>;

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Hashes `bytes` with 1 MiB updates, as the NAR writer does.
fn sha256_in_memory(bytes: &[u8]) -> Hash {
    let mut hasher = Hasher::new(HashAlgo::Sha256);
    for chunk in bytes.chunks(1 << 20) {
        hasher.update(chunk);
    }
    hasher.finish()
}

fn output(command: &mut Command) -> String {
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(out.status.success(), "{command:?} failed: {}", out.status);
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The cached benchmark tree, generated on first use.
fn bench_tree() -> Result<PathBuf, String> {
    let dir = kiln_benches::workspace_target_dir().join("bench-data");
    let tree = dir.join(TREE_VERSION);
    let done = dir.join(format!("{TREE_VERSION}.complete"));
    if done.is_file() {
        return Ok(tree);
    }
    if tree.exists() {
        fs::remove_dir_all(&tree)
            .map_err(|e| format!("cannot remove a partial {}: {e}", tree.display()))?;
    }
    eprintln!("generating a ~1 GB tree at {} (once)…", tree.display());
    let start = Instant::now();
    let mut generator = Generator {
        rng: 0x243f_6a88_85a3_08d3,
        written: 0,
        files: 0,
    };
    generator
        .generate(&tree)
        .map_err(|e| format!("cannot generate {}: {e}", tree.display()))?;
    fs::write(&done, b"").map_err(|e| e.to_string())?;
    eprintln!(
        "generated {} files, {} MB in {:.1}s",
        generator.files,
        generator.written / 1_000_000,
        start.elapsed().as_secs_f64()
    );
    Ok(tree)
}

/// Writes directories of files of mixed sizes until about [`TARGET_BYTES`].
struct Generator {
    rng: u64,
    written: u64,
    files: u64,
}

impl Generator {
    fn next(&mut self) -> u64 {
        // xorshift64*: fast enough to fill a gigabyte in a moment.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn generate(&mut self, root: &Path) -> std::io::Result<()> {
        fs::create_dir_all(root)?;
        let mut buf = Vec::new();
        let mut d = 0;
        while self.written < TARGET_BYTES {
            let dir = root
                .join(format!("dir-{:03}", d / 16))
                .join(format!("sub-{:02}", d % 16));
            fs::create_dir_all(&dir)?;
            for f in 0..64 {
                let size = self.size();
                buf.resize(size as usize, 0);
                for chunk in buf.chunks_mut(8) {
                    let bytes = self.next().to_le_bytes();
                    chunk.copy_from_slice(&bytes[..chunk.len()]);
                }
                let path = dir.join(format!("file-{f:02}"));
                fs::File::create(&path)?.write_all(&buf)?;
                if self.next() % 8 == 0 {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                }
                if self.next() % 16 == 0 {
                    std::os::unix::fs::symlink(
                        format!("file-{f:02}"),
                        dir.join(format!("link-{f:02}")),
                    )?;
                }
                self.written += size;
                self.files += 1;
            }
            d += 1;
        }
        Ok(())
    }

    /// Mostly small files, as in real outputs, with most bytes in large ones.
    fn size(&mut self) -> u64 {
        let roll = self.next() % 100;
        let r = self.next();
        match roll {
            0..=49 => r % 4096,
            50..=79 => 4096 + r % 60_000,
            80..=96 => 65_536 + r % 1_000_000,
            _ => (1 << 20) + r % (7 << 20),
        }
    }
}
