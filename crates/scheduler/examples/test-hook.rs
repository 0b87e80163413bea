//! A build hook for the scheduler's tests, speaking Nix's hook protocol:
//! `test-hook MODE STORE_ROOT` answers every offer with MODE (`accept`,
//! `decline`, `decline-permanently`, `postpone`, `fail`), or with
//! `postpone-once` postpones the first offer made in the store and accepts
//! the next. Accepting, it
//! "builds" each missing output by adding a file saying so to the store
//! under STORE_ROOT, logging on fd 4; `fail` accepts and exits 100.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;

use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nar::Node;
use kiln_store::local::LocalStore;
use kiln_store::{AddOptions, PathInfo, Store};

fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    input.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(input: &mut impl Read) -> io::Result<String> {
    let len = read_u64(input)? as usize;
    let mut b = vec![0u8; len.div_ceil(8) * 8];
    input.read_exact(&mut b)?;
    b.truncate(len);
    Ok(String::from_utf8_lossy(&b).into_owned())
}

fn read_strings(input: &mut impl Read) -> io::Result<Vec<String>> {
    let n = read_u64(input)?;
    (0..n).map(|_| read_string(input)).collect()
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].clone();
    let root = args[2].clone();
    let mut stdin = io::stdin().lock();
    let mut stderr = io::stderr();
    // Settings: (1, name, value)… then 0.
    while read_u64(&mut stdin)? == 1 {
        read_string(&mut stdin)?;
        read_string(&mut stdin)?;
    }
    loop {
        let Ok(command) = read_string(&mut stdin) else {
            return Ok(());
        };
        assert_eq!(command, "try");
        let _am_willing = read_u64(&mut stdin)?;
        let _system = read_string(&mut stdin)?;
        let drv = read_string(&mut stdin)?;
        let _features = read_strings(&mut stdin)?;
        writeln!(stderr, "test hook offered {drv}")?;
        let marker = std::path::Path::new(&root).join("test-hook-postponed");
        let mode = match mode.as_str() {
            "postpone-once" if marker.exists() => "accept",
            "postpone-once" => {
                File::create(&marker)?;
                "postpone"
            }
            other => other,
        };
        match mode {
            "accept" | "fail" => {
                write!(stderr, "# accept\ntest-machine\n")?;
                stderr.flush()?;
                let _inputs = read_strings(&mut stdin)?;
                let outputs = read_strings(&mut stdin)?;
                // SAFETY: fd 4 is the log pipe the scheduler gave us.
                let mut log = unsafe { File::from_raw_fd(4) };
                if mode == "fail" {
                    writeln!(log, "test hook failing {drv}")?;
                    std::process::exit(100);
                }
                let store = LocalStore::open_root(&root).expect("open the store");
                // The scheduler holds the outputs' locks while we build (as
                // Nix's build-remote assumes): taking them would wait forever.
                store.assume_locks_held_by_parent(
                    outputs
                        .iter()
                        .map(|o| store.store_dir().parse_path(o).expect("a store path")),
                );
                for out in outputs {
                    writeln!(log, "test hook building {out}")?;
                    let path = store.store_dir().parse_path(&out).expect("a store path");
                    let nar = Node::file(b"built by the hook\n".to_vec()).to_nar();
                    let info =
                        PathInfo::new(path, Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64);
                    store
                        .add_nar(&info, &mut &nar[..], AddOptions::default())
                        .expect("add the output");
                }
                return Ok(());
            }
            "decline" => write!(stderr, "# decline\n")?,
            "decline-permanently" => write!(stderr, "# decline-permanently\n")?,
            "postpone" => write!(stderr, "# postpone\n")?,
            other => panic!("unknown mode {other}"),
        }
        stderr.flush()?;
    }
}
