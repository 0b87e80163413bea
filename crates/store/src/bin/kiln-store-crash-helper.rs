//! Test helper for the crash-consistency tests (`tests/crash.rs`): one
//! store operation per run, reporting each path it has finished on stdout,
//! so the test can SIGKILL it at any point and then check the store.
//!
//! Usage: `kiln-store-crash-helper add ROOT SEED COUNT`,
//! `… import ROOT FILE`, `… gc ROOT`, `… hold ROOT SEED` (add one path,
//! print it, then sleep: its temporary root must protect it).

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar::Node;
use kiln_formats::store_path::{FileIngestionMethod, StorePath, StorePathSet};
use kiln_store::local::gc::GcOptions;
use kiln_store::local::{BatchItem, Durability, LocalStore};
use kiln_store::{AddOptions, PathInfo, Store};

/// xorshift64*: deterministic content from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Up to `max` random letters (at least `min`).
    fn bytes_between(&mut self, min: usize, max: usize) -> Vec<u8> {
        let n = min + self.below((max - min + 1) as u64) as usize;
        self.bytes(n)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| b'a' + (self.next() % 26) as u8).collect()
    }
}

fn report(path: &StorePath) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{path}");
    let _ = out.flush();
}

fn add(
    store: &LocalStore,
    seed: u64,
    count: u64,
    scratch: &Path,
) -> Result<(), kiln_store::StoreError> {
    let mut rng = Rng(seed | 1);
    let existing: Vec<StorePath> = store.query_all_valid_paths()?.into_iter().collect();
    std::fs::create_dir_all(scratch).expect("scratch directory");
    for i in 0..count {
        match rng.below(4) {
            0 => {
                let mut refs = StorePathSet::new();
                for _ in 0..rng.below(3) {
                    if !existing.is_empty() {
                        let r = &existing[rng.below(existing.len() as u64) as usize];
                        if store.is_valid_path(r)? {
                            store.add_temp_root(r)?;
                            if store.is_valid_path(r)? {
                                refs.insert(r.clone());
                            }
                        }
                    }
                }
                let contents = rng.bytes_between(10, 3010);
                let info = store.add_text(&format!("text-{seed}-{i}"), &contents, &refs)?;
                report(&info.path);
            }
            1 => {
                let tree = scratch.join(format!("tree-{seed}-{i}"));
                let _ = std::fs::remove_dir_all(&tree);
                std::fs::create_dir_all(tree.join("sub")).expect("tree");
                for f in 0..rng.below(6) {
                    let size = rng.below(200_000) as usize;
                    std::fs::write(tree.join(format!("sub/f{f}")), rng.bytes(size))
                        .expect("tree file");
                }
                let info = store.add_to_store(
                    "tree",
                    &tree,
                    FileIngestionMethod::Recursive,
                    HashAlgo::Sha256,
                    AddOptions::default(),
                )?;
                report(&info.path);
            }
            2 => {
                let mut items = Vec::new();
                for f in 0..5 + rng.below(10) {
                    let file = scratch.join(format!("batch-{seed}-{i}-{f}"));
                    std::fs::write(&file, rng.bytes_between(1, 5000)).expect("batch file");
                    items.push(BatchItem {
                        name: format!("batch-{f}"),
                        source: file,
                        method: FileIngestionMethod::Flat,
                        algo: HashAlgo::Sha256,
                    });
                }
                for info in store.add_paths(&items, AddOptions::default(), Durability::Batch)? {
                    report(&info.path);
                }
            }
            _ => {
                let node = Node::directory([
                    ("a", Node::file(rng.bytes_between(0, 100_000))),
                    ("b", Node::executable(rng.bytes(50))),
                    ("c", Node::symlink("a")),
                ]);
                let nar = node.to_nar();
                let hash = Hash::digest(HashAlgo::Sha256, &nar);
                let path = store
                    .store_dir()
                    .make_path("output:out", &hash, &format!("nar-{seed}-{i}"))
                    .expect("path");
                let info = PathInfo::new(path, hash, nar.len() as u64);
                store.add_nar(&info, &mut &nar[..], AddOptions::default())?;
                report(&info.path);
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let usage = || {
        eprintln!(
            "usage: kiln-store-crash-helper add ROOT SEED COUNT | import ROOT FILE | gc ROOT | hold ROOT SEED"
        );
        ExitCode::from(2)
    };
    if args.len() < 3 {
        return usage();
    }
    let root = PathBuf::from(&args[2]);
    let store = match LocalStore::open_root(&root) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("opening {}: {e}", root.display());
            return ExitCode::FAILURE;
        }
    };
    let scratch = root.with_file_name(format!("scratch-{}", std::process::id()));
    let result = match (args[1].as_str(), args.len()) {
        ("add", 5) => add(
            &store,
            args[3].parse().unwrap_or(1),
            args[4].parse().unwrap_or(10),
            &scratch,
        ),
        ("import", 4) => std::fs::File::open(&args[3])
            .map_err(|e| kiln_store::StoreError::Stream {
                action: "open the export file",
                source: e,
            })
            .and_then(|f| store.import_paths(&mut BufReader::new(f)))
            .map(|paths| paths.iter().for_each(report)),
        ("gc", 3) => store
            .collect_garbage(&GcOptions::default())
            .map(|r| r.paths.iter().for_each(report)),
        ("hold", 4) => add(&store, args[3].parse().unwrap_or(1), 1, &scratch).map(|()| {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }),
        _ => return usage(),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-store-crash-helper: {e}");
            ExitCode::FAILURE
        }
    }
}
