//! `cargo xtask bench sandbox`: how long one sandboxed program takes from spawn to
//! exit, beside the tools it replaces, measured in the same run.
//!
//! - Kiln: `/bin/true` in a full sandbox (all namespaces, tmpfs root, pivot_root,
//!   seccomp, dropped capabilities) with a 50-path read-only closure bound in (plus
//!   `/usr` for the host's `/bin/true` and its libc), output through a pipe;
//! - `unshare -U -m -p -n -i -u --fork true` (namespaces only, no root, no filter);
//! - plain fork+exec of `/bin/true` (no isolation);
//! - Nix 2.8: per-derivation time of trivial sandboxed builds in a throwaway
//!   chroot store: (time for 21 derivations − time for 1) / 20, with a builder that
//!   fails if it can see the host's `/home`, so an unsandboxed Nix cannot pass for
//!   a sandboxed one.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_sandbox::{Network, Sandbox, SandboxSpec};

const RUNS: usize = 300;
const WARMUP: usize = 20;

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(v[v.len() / 2]),
        ms(v[v.len() / 10]),
        ms(v[v.len() * 9 / 10]),
    )
}

fn print(name: &str, (median, p10, p90): (f64, f64, f64)) {
    println!("  {name:<52} median {median:7.3} ms   p10 {p10:7.3}   p90 {p90:7.3}");
}

fn kiln_spec(closure: &[std::path::PathBuf], network: Network) -> SandboxSpec {
    let mut spec = SandboxSpec::new("/bin/true")
        .bind_ro("/usr", "/usr")
        .symlink("/bin", "usr/bin")
        .symlink("/lib", "usr/lib")
        .symlink("/lib64", "usr/lib64")
        .network(network);
    for p in closure {
        let name = p.file_name().unwrap();
        spec = spec.bind_ro(p, Path::new("/nix/store").join(name));
    }
    spec
}

fn run_kiln(closure: &[std::path::PathBuf], network: Network) {
    let mut child = Sandbox::spawn(kiln_spec(closure, network)).expect("sandbox starts");
    let mut out = Vec::new();
    child.take_output().unwrap().read_to_end(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "/bin/true failed in the sandbox: {status:?}"
    );
}

fn run_cmd(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("spawn");
    assert!(status.success(), "{program} {args:?} failed: {status:?}");
}

fn nix_per_derivation(work: &Path) -> Result<(f64, f64), String> {
    let expr = work.join("trivial.nix");
    std::fs::write(
        &expr,
        r#"{ n, salt }:
builtins.genList (i: derivation {
  name = "kiln-bench-${salt}-${toString i}";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "if test -e /home; then echo not sandboxed; exit 1; fi; echo > $out" ];
}) n
"#,
    )
    .unwrap();
    let store = work.join("nix-root");
    let salt = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let build = |n: u32, tag: &str| -> Result<f64, String> {
        let t = Instant::now();
        let out = Command::new("nix-build")
            .arg("--store")
            .arg(&store)
            .args(["--option", "substituters", ""])
            .args(["--option", "sandbox", "true"])
            .args(["--option", "sandbox-fallback", "false"])
            .args([
                "--option",
                "sandbox-paths",
                "/bin/sh=/bin/sh /usr=/usr /lib=/lib /lib64=/lib64",
            ])
            .args(["--max-jobs", "1", "--no-out-link"])
            .arg(&expr)
            .args([
                "--arg",
                "n",
                &n.to_string(),
                "--argstr",
                "salt",
                &format!("{salt}-{tag}"),
            ])
            .output()
            .map_err(|e| format!("cannot run nix-build: {e}"))?;
        let elapsed = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            return Err(format!(
                "nix-build with sandbox = true failed (Nix's sandbox may not work here): {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
        }
        Ok(elapsed)
    };
    build(1, "warm")?;
    let mut one = Vec::new();
    let mut many = Vec::new();
    for i in 0..3 {
        one.push(build(1, &format!("one{i}"))?);
        many.push(build(21, &format!("many{i}"))?);
    }
    one.sort_by(f64::total_cmp);
    many.sort_by(f64::total_cmp);
    Ok(((many[1] - one[1]) / 20.0, one[1]))
}

fn main() {
    let work = tempfile::tempdir().expect("temp dir");
    let closure: Vec<_> = (0..50)
        .map(|i| {
            let p = work.path().join(format!("{:032}-input-{i}", i));
            std::fs::create_dir_all(p.join("lib")).unwrap();
            std::fs::write(p.join("lib/data"), "x").unwrap();
            p
        })
        .collect();

    println!(
        "sandbox: spawn → exit of /bin/true, {RUNS} rounds after {WARMUP} warm-up rounds; the \
         variants take turns within each round, so load from other processes hits them alike"
    );
    let closure_ref = &closure;
    let mut variants: Vec<(&str, Box<dyn FnMut() + '_>)> = vec![
        (
            "kiln sandbox (all namespaces, 50-path closure + /usr)",
            Box::new(move || run_kiln(closure_ref, Network::None)),
        ),
        (
            "kiln sandbox without the 50-path closure (only /usr)",
            Box::new(|| run_kiln(&[], Network::None)),
        ),
        (
            "kiln sandbox, host network (fixed-output builds)",
            Box::new(move || run_kiln(closure_ref, Network::Host)),
        ),
        (
            "unshare -U -m -p -n -i -u --fork true",
            Box::new(|| {
                run_cmd(
                    "unshare",
                    &["-U", "-m", "-p", "-n", "-i", "-u", "--fork", "true"],
                )
            }),
        ),
        (
            "fork+exec /bin/true (no isolation)",
            Box::new(|| run_cmd("/bin/true", &[])),
        ),
    ];
    let mut times = vec![Vec::with_capacity(RUNS); variants.len()];
    let mut setup = Vec::with_capacity(RUNS);
    for round in 0..WARMUP + RUNS {
        for (i, (_, f)) in variants.iter_mut().enumerate() {
            let t = Instant::now();
            f();
            if round >= WARMUP {
                times[i].push(t.elapsed());
            }
        }
        // Where the time goes: setup up to a successful execve; the rest is the
        // program plus the kernel tearing the namespaces down.
        let t = Instant::now();
        let mut child = Sandbox::spawn(kiln_spec(&closure, Network::None)).unwrap();
        if round >= WARMUP {
            setup.push(t.elapsed());
        }
        child.wait().unwrap();
    }
    let mut kiln = (0.0, 0.0, 0.0);
    let mut unshare = (0.0, 0.0, 0.0);
    for (i, (name, _)) in variants.iter().enumerate() {
        let s = stats(std::mem::take(&mut times[i]));
        print(name, s);
        if i == 0 {
            kiln = s;
            print(
                "  of which Sandbox::spawn (until execve)",
                stats(std::mem::take(&mut setup)),
            );
        }
        if name.starts_with("unshare") {
            unshare = s;
        }
    }
    println!(
        "  kiln full sandbox / bare unshare (medians): {:.2}",
        kiln.0 / unshare.0
    );

    match nix_per_derivation(work.path()) {
        Ok((per, one)) => println!(
            "  {:<52} {per:7.1} ms per derivation (a one-derivation nix-build takes {one:.1} ms)",
            "nix 2.8, trivial sandboxed derivation"
        ),
        Err(e) => println!("  nix 2.8: not measured: {e}"),
    }
    let target = 5.0;
    println!(
        "target: kiln median under {target} ms: {}",
        if kiln.0 < target { "met" } else { "NOT met" }
    );
}
