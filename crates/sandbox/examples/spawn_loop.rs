//! Profiling aid: spawns `/bin/true` in a sandbox with N bound paths, R times.
//! `cargo run --release -p kiln-sandbox --example spawn_loop -- N R`
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use kiln_sandbox::{Network, Sandbox, SandboxSpec};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(50, |a| a.parse().unwrap());
    let rounds: usize = args.next().map_or(200, |a| a.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let closure: Vec<_> = (0..n)
        .map(|i| {
            let p = dir.path().join(format!("{i:032}-p"));
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("f"), "x").unwrap();
            p
        })
        .collect();
    let started = Instant::now();
    for _ in 0..rounds {
        let mut spec = SandboxSpec::new("/bin/true")
            .bind_ro("/usr", "/usr")
            .symlink("/bin", "usr/bin")
            .symlink("/lib", "usr/lib")
            .symlink("/lib64", "usr/lib64")
            .network(Network::None);
        for p in &closure {
            spec = spec.bind_ro(p, Path::new("/nix/store").join(p.file_name().unwrap()));
        }
        let mut child = Sandbox::spawn(spec).unwrap();
        let mut out = Vec::new();
        child.take_output().unwrap().read_to_end(&mut out).unwrap();
        assert!(child.wait().unwrap().success());
    }
    let per = started.elapsed() / rounds as u32;
    println!("{n} paths: {per:?} per sandbox");
}
