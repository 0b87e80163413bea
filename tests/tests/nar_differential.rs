//! Kiln's NAR against Nix 2.8's, on generated file trees.
//!
//! For each of a few hundred seeded random trees (odd names, sizes around
//! every boundary the writer has, executables, dangling symlinks, empty and
//! deeply nested directories):
//! - Kiln's NAR equals `nix-store --dump`'s byte for byte;
//! - its sha256 equals what `nix-hash --type sha256 --base32` prints;
//! - `kiln nar restore` of Nix's dump rebuilds a tree that Nix hashes the
//!   same;
//! - for some, `kiln nar ls` (JSON and text) prints what `nix nar ls` does.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_formats::hash::HashAlgo;
use kiln_formats::nar;

const TREES: u64 = 240;

#[test]
fn nar_matches_nix_store_dump_on_generated_trees() {
    let nix = kiln_e2e::nix();
    let (nix_store, nix_hash, nix) = (
        nix.program("nix-store"),
        nix.program("nix-hash"),
        nix.program("nix"),
    );
    let kiln = kiln_e2e::kiln_bin();
    let scratch = tempfile::tempdir().unwrap();

    // (tree, restored copy, Kiln's NAR hash of the tree)
    let mut checked = Vec::new();
    let mut total_bytes = 0u64;
    for seed in 0..TREES {
        let tree = scratch.path().join(format!("tree-{seed}"));
        let mut generator = TreeGenerator {
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed),
            depth_budget: 0,
        };
        generator.root(seed, &tree);
        let context = format!("tree {seed} (seed {seed})");

        let ours = nar::dump_path(&tree, Vec::new()).unwrap_or_else(|e| panic!("{context}: {e}"));
        let theirs = run(
            Command::new(&nix_store).arg("--dump").arg(&tree),
            &[],
            &context,
        );
        assert_same_nar(&ours, &theirs, &context);
        total_bytes += ours.len() as u64;

        let (hash, size) = nar::hash_path(&tree, HashAlgo::Sha256).unwrap();
        assert_eq!(size, theirs.len() as u64, "{context}: NAR size");

        let restored = scratch.path().join(format!("restored-{seed}"));
        run(
            Command::new(&kiln).args(["nar", "restore"]).arg(&restored),
            &theirs,
            &context,
        );

        if seed % 8 == 0 {
            let nar_file = scratch.path().join(format!("tree-{seed}.nar"));
            fs::write(&nar_file, &theirs).unwrap();
            // JSON, and the recursive text listings of the root and of a
            // subdirectory. Nix 2.8's text listings fail on names and symlink
            // targets with a '%' (it prints them as a format string), so
            // only trees without one get those.
            let sub = first_subdirectory(&tree);
            let mut listings = vec![(&["--json", "-R"][..], "/")];
            if !has_percent(&tree) {
                listings.extend([(&["-lR"][..], "/"), (&["-R"], sub.as_str())]);
            }
            for (options, inside) in listings {
                let nix_ls = run(
                    Command::new(&nix)
                        .args(["--extra-experimental-features", "nix-command", "nar", "ls"])
                        .args(options)
                        .arg(&nar_file)
                        .arg(inside),
                    &[],
                    &context,
                );
                let kiln_ls = run(
                    Command::new(&kiln)
                        .args(["nar", "ls"])
                        .args(options)
                        .arg(&nar_file)
                        .arg(inside),
                    &[],
                    &context,
                );
                assert!(
                    kiln_ls == nix_ls,
                    "{context}: nar ls {options:?} {inside} differs:\n kiln: {}\n  nix: {}",
                    kiln_ls.escape_ascii(),
                    nix_ls.escape_ascii()
                );
            }
        }
        checked.push((tree, restored, hash.to_nixbase32()));
    }
    eprintln!("compared {TREES} trees, {} MiB of NAR", total_bytes >> 20);
    // The generator must actually produce substantial trees.
    assert!(
        total_bytes > 20 << 20,
        "only {total_bytes} bytes of NAR were compared"
    );

    // One nix-hash for all trees and their restored copies: Nix starts slowly.
    let mut command = Command::new(&nix_hash);
    command.args(["--type", "sha256", "--base32"]);
    for (tree, restored, _) in &checked {
        command.arg(tree).arg(restored);
    }
    let output = String::from_utf8(run(&mut command, &[], "nix-hash of every tree")).unwrap();
    let nix_hashes: Vec<&str> = output.lines().collect();
    assert_eq!(
        nix_hashes.len(),
        2 * checked.len(),
        "nix-hash printed {output}"
    );
    for (seed, ((_, _, ours), theirs)) in checked.iter().zip(nix_hashes.chunks(2)).enumerate() {
        assert_eq!(
            ours, theirs[0],
            "tree {seed}: NAR hash differs from nix-hash's"
        );
        assert_eq!(
            ours, theirs[1],
            "tree {seed}: the tree kiln restored from nix-store --dump's NAR differs from the original"
        );
    }
    for (tree, _, _) in &checked {
        // Read-only directories would stop the temporary directory's removal.
        make_writable(tree);
    }
}

/// Runs `command` with `stdin` as its input and returns its output; panics
/// with its stderr if it fails.
fn run(command: &mut Command, stdin: &[u8], context: &str) -> Vec<u8> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{context}: cannot run {command:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        // A failing command may stop reading; its exit status says why.
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(
        output.status.success(),
        "{context}: {command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn assert_same_nar(ours: &[u8], theirs: &[u8], context: &str) {
    if ours == theirs {
        return;
    }
    let at = ours
        .iter()
        .zip(theirs)
        .position(|(a, b)| a != b)
        .unwrap_or(ours.len().min(theirs.len()));
    let window = |b: &[u8]| {
        b[at.saturating_sub(32)..(at + 32).min(b.len())]
            .escape_ascii()
            .to_string()
    };
    panic!(
        "{context}: NARs differ at byte {at} (lengths {} and {})\n kiln: {}\n  nix: {}",
        ours.len(),
        theirs.len(),
        window(ours),
        window(theirs)
    );
}

/// `/NAME` for the first subdirectory of `tree` with a UTF-8 name, or `/`.
fn first_subdirectory(tree: &Path) -> String {
    // A root that is a symlink has no subdirectories, whatever it points at.
    let is_dir = fs::symlink_metadata(tree).is_ok_and(|m| m.is_dir());
    let mut names: Vec<_> = fs::read_dir(tree)
        .into_iter()
        .filter(|_| is_dir)
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    format!("/{}", names.first().map_or("", String::as_str))
}

/// Whether a name or symlink target in the tree at `path` contains a '%'.
fn has_percent(path: &Path) -> bool {
    let percent = |bytes: &[u8]| bytes.contains(&b'%');
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    // Never follow symlinks: some point at "." or "..".
    percent(path.file_name().unwrap_or_default().as_bytes())
        || meta.is_symlink()
            && percent(
                fs::read_link(path)
                    .unwrap_or_default()
                    .as_os_str()
                    .as_bytes(),
            )
        || meta.is_dir()
            && fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| has_percent(&e.path()))
}

/// Restores write permission everywhere so that a tree with read-only
/// directories can be removed.
fn make_writable(path: &Path) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).ok();
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            make_writable(&entry.path());
        }
    }
}

/// SplitMix64: small, and the same sequence on every machine and version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

struct TreeGenerator {
    rng: Rng,
    /// Directories that may still be made below the current one.
    depth_budget: u32,
}

impl TreeGenerator {
    fn root(&mut self, seed: u64, path: &Path) {
        match seed % 40 {
            // A few roots that are not directories.
            1 => self.file(path),
            2 => self.symlink(path),
            // A few deep, narrow trees (the reader accepts up to 64 levels).
            3 | 4 => {
                self.depth_budget = 40 + self.rng.below(20) as u32;
                self.directory(path, true);
            }
            _ => {
                self.depth_budget = 1 + self.rng.below(5) as u32;
                self.directory(path, false);
            }
        }
    }

    fn directory(&mut self, path: &Path, narrow: bool) {
        fs::create_dir(path).unwrap();
        let count = if narrow {
            1 + self.rng.below(2)
        } else {
            self.rng.below(9)
        };
        let mut names = Vec::new();
        for _ in 0..count {
            let name = self.name();
            if names.contains(&name) {
                continue;
            }
            names.push(name.clone());
            let child = path.join(OsStr::from_bytes(&name));
            let roll = self.rng.below(100);
            if self.depth_budget > 0 && (roll < 30 || narrow && roll < 70) {
                self.depth_budget -= 1;
                self.directory(&child, narrow);
                self.depth_budget += 1;
            } else if roll < 80 {
                self.file(&child);
            } else {
                self.symlink(&child);
            }
        }
        if self.rng.chance(5) {
            // Read-only directories are archived like any other.
            fs::set_permissions(path, fs::Permissions::from_mode(0o555)).unwrap();
        }
    }

    fn name(&mut self) -> Vec<u8> {
        let mut name = match self.rng.below(12) {
            0 => "é-ü-ß-日本語-🦀".as_bytes().to_vec(),
            1 => vec![b'n'; 255],
            2 => b"-starts-with-dash".to_vec(),
            3 => b" spaces and\ttabs\nnewline ".to_vec(),
            4 => vec![0xff, 0xfe, b'x', 0x80],
            5 => b".hidden".to_vec(),
            6 => b"...".to_vec(),
            7 => b"UPPER".to_vec(),
            _ => Vec::new(),
        };
        // A random suffix keeps names mostly unique while mixing byte ranges.
        let len = 1 + self.rng.below(12);
        for _ in 0..len {
            let byte = match self.rng.below(10) {
                0 => 0x80 + self.rng.below(0x80) as u8,
                1 => *self.rng.pick(b" !\"#$%&'()*+,-.:;<=>?@[\\]^_`{|}~"),
                _ => *self
                    .rng
                    .pick(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
            };
            name.push(byte);
        }
        name.truncate(255);
        if name == b"." || name == b".." {
            name.push(b'x');
        }
        name
    }

    fn file(&mut self, path: &Path) {
        let size = match self.rng.below(20) {
            0 => 0,
            1 => 8 * self.rng.below(64),
            2 => *self.rng.pick(&[
                4095,
                4096,
                4097,
                65535,
                65536,
                65537,
                1 << 20,
                (1 << 20) + 1,
            ]),
            3 => 8 * self.rng.below(1 << 15),
            4 if self.rng.chance(50) => self.rng.below(1 << 20),
            4..=9 => self.rng.below(65536),
            _ => self.rng.below(300),
        } as usize;
        let mut contents = vec![0u8; size];
        if self.rng.chance(80) {
            self.rng.fill(&mut contents);
        }
        fs::write(path, &contents).unwrap();
        let mode = *self.rng.pick(&[
            0o644, 0o644, 0o755, 0o755, 0o700, 0o500, 0o611, 0o444, 0o555, 0o4755,
        ]);
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn symlink(&mut self, path: &Path) {
        let target: Vec<u8> = match self.rng.below(6) {
            0 => b"dangling/nowhere".to_vec(),
            1 => b"/nix/store/00000000000000000000000000000000-absent".to_vec(),
            2 => b".".to_vec(),
            3 => "../é 🦀".as_bytes().to_vec(),
            4 => vec![b'x'; 1 + self.rng.below(4000) as usize],
            _ => self.name(),
        };
        symlink(OsStr::from_bytes(&target), path).unwrap();
    }
}
