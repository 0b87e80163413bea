//! `cargo xtask bench offload`: offloading against Nix 2.8, same run,
//! same machines (sshd's on loopback addresses, port 22).
//!
//! 1. A closure of ~1,000 paths / ~500 MB copied to a fresh remote and
//!    back: Kiln's serve client (one batched query, one export stream up,
//!    pipelined NAR requests down; plain and through a zstd stream) vs
//!    `nix copy --to ssh://…` / `--from ssh://…`. Kiln's stores make what
//!    they add durable (one syncfs per batch); Nix's run with
//!    `fsync-metadata = false`. `BENCH_DATA=system` fills the closure with
//!    real files instead of incompressible noise; `BENCH_KILN_ONLY=1`
//!    stops after Kiln's two copies (for profiling them), and
//!    `BENCH_CASE=copy` after all the copies.
//!    The same over `ssh-ng://` (the daemon protocol): Kiln's client and
//!    `store-daemon --stdio` vs `nix copy` and `nix-daemon --stdio`.
//! 2. A wide graph (1,000 independent derivations) with `max-jobs = 0` on three
//!    remotes: Kiln's scheduler with `offload-hook` vs Nix 2.8's daemon
//!    with its own `build-remote`, same machines file (the remotes run
//!    Nix's `nix-store --serve`, which both clients can drive).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::nix;
use kiln_offload::machines::parse_builders;
use kiln_offload::ssh::{LogSink, SshTarget};
use kiln_store::Store;
use kiln_store::local::LocalStore;

fn sh(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Remote {
    dir: PathBuf,
    addr: String,
    sshd: Child,
    host_key: String,
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

/// `daemon` is Kiln's `store-daemon`, run by a `kiln` remote.
fn start_remote(base: &Path, n: usize, kind: &str, client_pub: &Path, daemon: &Path) -> Remote {
    let dir = base.join(format!("r{n}"));
    std::fs::create_dir_all(dir.join("root")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(dir.join("host_key")));
    std::fs::copy(client_pub, dir.join("authorized_keys")).unwrap();
    std::fs::write(
        dir.join("etc/nix.conf"),
        format!(
            "store = local?root={}\nsandbox = false\nsandbox-paths = /bin /usr /lib /lib64\nsubstituters =\nbuild-users-group =\nfsync-metadata = false\nmax-jobs = 4\n",
            dir.join("root").display()
        ),
    )
    .unwrap();
    let wrap = |name: &str, script: String| {
        let prog = dir.join("bin").join(name);
        std::fs::write(&prog, script).unwrap();
        sh(Command::new("chmod").arg("755").arg(&prog));
    };
    if kind == "kiln" {
        wrap(
            "store-daemon",
            format!(
                "#!/bin/sh\nexec {} --store 'local?root={}' --option sandbox-paths '/bin /usr /lib /lib64?' \"$@\"\n",
                daemon.display(),
                dir.join("root").display()
            ),
        );
    } else {
        // nix-store for ssh://, nix-daemon for ssh-ng://, on the same store.
        for program in ["nix-store", "nix-daemon"] {
            wrap(
                program,
                format!(
                    "#!/bin/sh\nexport NIX_CONF_DIR={}\nexec {} \"$@\"\n",
                    dir.join("etc").display(),
                    nix().program(program).display()
                ),
            );
        }
    }
    let addr = format!("127.0.0.{}", 50 + n);
    std::fs::write(
        dir.join("sshd_config"),
        format!(
            "Port 22\nListenAddress {addr}\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nPermitRootLogin yes\nStrictModes no\nPasswordAuthentication no\nMaxSessions 100\nMaxStartups 100\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("sshd (openssh-server) is needed");
    let t = Instant::now();
    while std::net::TcpStream::connect((addr.as_str(), 22)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "sshd on {addr}:22 did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let host_key = std::fs::read_to_string(dir.join("host_key.pub"))
        .unwrap()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Remote {
        dir,
        addr,
        sshd,
        host_key,
    }
}

fn b64(s: &str) -> String {
    use std::io::Write as _;
    let mut c = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
}

fn line(r: &Remote, key: &Path, program: &str, jobs: u32) -> String {
    line_with(r, key, program, jobs, "")
}

/// A machines line with further URI parameters (`&name=value`).
fn line_with(r: &Remote, key: &Path, program: &str, jobs: u32, params: &str) -> String {
    format!(
        "ssh://root@{}?remote-program={}{params} x86_64-linux {} {jobs} 1 - - {}",
        r.addr,
        r.dir.join(program).display(),
        key.display(),
        b64(&r.host_key)
    )
}

fn target_for(line: &str, ssh_dir: &Path) -> SshTarget {
    let m = &parse_builders(line, "bench", "x86_64-linux").unwrap()[0];
    SshTarget::new(m, ssh_dir).unwrap()
}

/// Kiln's copy of the closure of `paths` to `target`, then back into a
/// fresh store at `back`: the two times and what the first sent. Nothing
/// is deleted until every copy is done (each needs ~2× the closure on
/// disk): on ext4 without a journal, allocating inodes soon after
/// thousands were freed is slow (`recently_deleted`), which would slow
/// whichever copy came next.
fn kiln_round_trip(
    target: &SshTarget,
    src: &LocalStore,
    paths: &BTreeSet<kiln_formats::store_path::StorePath>,
    back: &Path,
) -> (Duration, Duration, kiln_offload::remote::Stats) {
    let quiet = LogSink::new(std::io::sink());
    let t = Instant::now();
    let stats = kiln_offload::remote::copy_to(target, src, paths, quiet.clone()).unwrap();
    let to = t.elapsed();
    let back = LocalStore::open_root(back).unwrap();
    let t = Instant::now();
    kiln_offload::remote::copy_from(target, &back, paths, quiet).unwrap();
    let from = t.elapsed();
    assert_eq!(
        back.query_all_valid_paths().unwrap(),
        src.query_all_valid_paths().unwrap()
    );
    (to, from, stats)
}

/// The files under `dir` (sorted, depth first), for content like a real
/// closure's: libraries, executables, documentation.
fn system_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => system_files(&p, out),
            Ok(m) if m.is_file() => out.push(p),
            _ => {}
        }
    }
}

/// ~`count` paths of ~`size` bytes each referring to the one before it (a
/// chain, so the closure of the last is all). The bytes are incompressible
/// noise, or with `BENCH_DATA=system` the contents of the files under
/// /usr/lib, /usr/bin and /usr/share in turn (what a closure of real
/// packages holds, about 2.7× compressible with zstd level 1).
fn make_closure(
    store: &LocalStore,
    count: usize,
    size: usize,
) -> kiln_formats::store_path::StorePath {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut system = Vec::new();
    if std::env::var("BENCH_DATA").is_ok_and(|v| v == "system") {
        for d in ["/usr/lib", "/usr/bin", "/usr/share"] {
            system_files(Path::new(d), &mut system);
        }
    }
    let mut system = system
        .into_iter()
        .filter_map(|p| std::fs::read(p).ok())
        .flatten();
    let mut prev: Option<kiln_formats::store_path::StorePath> = None;
    for i in 0..count {
        let mut data = Vec::with_capacity(size + 100);
        if let Some(p) = &prev {
            data.extend_from_slice(store.store_dir().print_path(p).as_bytes());
            data.push(b'\n');
        }
        data.extend(system.by_ref().take(size.saturating_sub(data.len())));
        while data.len() < size {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(&state.to_le_bytes());
        }
        let refs: BTreeSet<_> = prev.iter().cloned().collect();
        let info = store.add_text(&format!("blob-{i}"), &data, &refs).unwrap();
        prev = Some(info.path);
    }
    prev.unwrap()
}

fn main() {
    // Built (or found up to date) before anything is timed.
    let kiln = kiln_benches::profile_bin("kiln", "kiln");
    let hook = kiln_benches::profile_bin("offload-hook", "offload-hook");
    let daemon = kiln_benches::profile_bin("store-daemon", "store-daemon");
    let base = tempfile::Builder::new()
        .prefix("kiln-bench-offload-")
        .tempdir()
        .unwrap();
    let base = base.path();
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(base.join("key")));
    let key = base.join("key");
    let key_pub = base.join("key.pub");
    let ssh_dir = PathBuf::from(format!("/tmp/kbo-{}", std::process::id()));
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let count: usize = std::env::var("BENCH_PATHS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let leaves: usize = std::env::var("BENCH_LEAVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);

    // 1. Closure copy.
    let src_root = base.join("src");
    let src = LocalStore::open_root(&src_root).unwrap();
    let t = Instant::now();
    let top = make_closure(&src, count, 500 * 1024);
    println!(
        "closure: {count} paths, {} MB, made in {:.1}s",
        count * 500 / 1024,
        t.elapsed().as_secs_f64()
    );
    drop(src);
    let r_kiln = start_remote(base, 0, "kiln", &key_pub, &daemon);
    let r_nix = start_remote(base, 1, "nix", &key_pub, &daemon);
    let src = LocalStore::open_root(&src_root).unwrap();
    let target = target_for(&line(&r_kiln, &key, "bin/store-daemon", 1), &ssh_dir);
    let paths: BTreeSet<_> = [top.clone()].into();
    let (kiln_to, kiln_from, stats) =
        kiln_round_trip(&target, &src, &paths, &base.join("back-kiln"));
    if std::env::var_os("BENCH_KILN_ONLY").is_some() {
        println!(
            "kiln: to {:.2}s, back {:.2}s (BENCH_KILN_ONLY: nothing else measured)",
            kiln_to.as_secs_f64(),
            kiln_from.as_secs_f64()
        );
        target.exit_master();
        return;
    }
    target.exit_master();
    drop(r_kiln);

    // The same through a zstd stream (what Kiln remotes off loopback get).
    let r_zstd = start_remote(base, 5, "kiln", &key_pub, &daemon);
    let target_z = target_for(
        &line_with(&r_zstd, &key, "bin/store-daemon", 1, "&compress=zstd"),
        &ssh_dir,
    );
    let (zstd_to, zstd_from, _) = kiln_round_trip(&target_z, &src, &paths, &base.join("back-zstd"));
    target_z.exit_master();
    drop(r_zstd);

    // The same over ssh-ng:// (the daemon protocol to `store-daemon --stdio`).
    let r_ng = start_remote(base, 6, "kiln", &key_pub, &daemon);
    let target_ng = target_for(
        &line(&r_ng, &key, "bin/store-daemon", 1).replacen("ssh://", "ssh-ng://", 1),
        &ssh_dir,
    );
    let (ng_to, ng_from, _) = kiln_round_trip(&target_ng, &src, &paths, &base.join("back-ng"));
    target_ng.exit_master();
    drop(r_ng);
    drop(src);
    let r_nix_ng = start_remote(base, 7, "nix", &key_pub, &daemon);

    let nix_uri = format!(
        "ssh://root@{}?remote-program={}",
        r_nix.addr,
        r_nix.dir.join("bin/nix-store").display()
    );
    let known = base.join("known_hosts");
    std::fs::write(
        &known,
        format!(
            "{} {}\n{} {}\n",
            r_nix.addr, r_nix.host_key, r_nix_ng.addr, r_nix_ng.host_key
        ),
    )
    .unwrap();
    let sshopts = format!(
        "-i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
        key.display(),
        known.display()
    );
    let nix_cmd = |args: &[&str]| {
        let mut c = Command::new(nix().program("nix"));
        c.args(["--extra-experimental-features", "nix-command"])
            .args(args)
            .env("NIX_SSHOPTS", &sshopts)
            .env("NIX_CONF_DIR", base.join("nixconf"));
        c
    };
    std::fs::create_dir_all(base.join("nixconf")).unwrap();
    std::fs::write(
        base.join("nixconf/nix.conf"),
        "substituters =\nbuild-users-group =\nsandbox = false\nfsync-metadata = false\n",
    )
    .unwrap();
    let top_s = format!("/nix/store/{}", top.base_name());
    // `nix copy` of the closure to `uri` from the source store, then back
    // into a fresh store: the two times.
    let nix_round_trip = |uri: &str, back: &str| {
        let copy = |store: &Path, direction: &str| {
            let t = Instant::now();
            sh(&mut nix_cmd(&[
                "copy",
                "--no-check-sigs",
                "--store",
                &format!("local?root={}", store.display()),
                direction,
                uri,
                &top_s,
            ]));
            t.elapsed()
        };
        (copy(&src_root, "--to"), copy(&base.join(back), "--from"))
    };
    let (nix_to, nix_from) = nix_round_trip(&nix_uri, "back-nix");
    let nix_ng_uri = format!(
        "ssh-ng://root@{}?remote-program={}",
        r_nix_ng.addr,
        r_nix_ng.dir.join("bin/nix-daemon").display()
    );
    let (nix_ng_to, nix_ng_from) = nix_round_trip(&nix_ng_uri, "back-nix-ng");
    println!(
        "copy to a fresh remote:   kiln {:>6.2}s   nix copy --to   {:>6.2}s   ({:.1}x)  [kiln sent {} paths, {} MB]",
        kiln_to.as_secs_f64(),
        nix_to.as_secs_f64(),
        nix_to.as_secs_f64() / kiln_to.as_secs_f64(),
        stats.sent_paths,
        stats.sent_bytes >> 20
    );
    println!(
        "copy back from it:        kiln {:>6.2}s   nix copy --from {:>6.2}s   ({:.1}x)",
        kiln_from.as_secs_f64(),
        nix_from.as_secs_f64(),
        nix_from.as_secs_f64() / kiln_from.as_secs_f64()
    );
    println!(
        "  with a zstd stream:     to {:>6.2}s   back {:>6.2}s   ({:.1}x, {:.1}x of nix copy)",
        zstd_to.as_secs_f64(),
        zstd_from.as_secs_f64(),
        nix_to.as_secs_f64() / zstd_to.as_secs_f64(),
        nix_from.as_secs_f64() / zstd_from.as_secs_f64()
    );
    println!(
        "ssh-ng:// (daemon protocol): to kiln {:>6.2}s nix {:>6.2}s ({:.1}x)   back kiln {:>6.2}s nix {:>6.2}s ({:.1}x)",
        ng_to.as_secs_f64(),
        nix_ng_to.as_secs_f64(),
        nix_ng_to.as_secs_f64() / ng_to.as_secs_f64(),
        ng_from.as_secs_f64(),
        nix_ng_from.as_secs_f64(),
        nix_ng_from.as_secs_f64() / ng_from.as_secs_f64()
    );
    println!(
        "  (Kiln's remote and local store fsync what they add (one syncfs per batch); Nix's run with fsync-metadata = false)"
    );
    drop(r_nix);
    drop(r_nix_ng);
    for dir in [
        "r0",
        "back-kiln",
        "r5",
        "back-zstd",
        "r6",
        "back-ng",
        "r1",
        "back-nix",
        "r7",
        "back-nix-ng",
    ] {
        let _ = std::fs::remove_dir_all(base.join(dir));
    }
    let _ = std::fs::remove_dir_all(&src_root);
    if std::env::var("BENCH_CASE").is_ok_and(|c| c == "copy") {
        return;
    }

    // 2. Wide graph on three remotes running nix-store --serve.
    let remotes: Vec<Remote> = (2..5)
        .map(|n| start_remote(base, n, "nix", &key_pub, &daemon))
        .collect();
    let machines = base.join("machines");
    let text: Vec<String> = remotes
        .iter()
        .map(|r| line(r, &key, "bin/nix-store", 4))
        .collect();
    std::fs::write(&machines, text.join("\n") + "\n").unwrap();
    let expr = base.join("wide.nix");
    std::fs::write(
        &expr,
        format!(
            r#"let salt = builtins.readFile {salt}; mk = i: derivation {{ name = "w${{toString i}}"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo ${{salt}} ${{toString i}} > $out"]; }};
in map mk (builtins.genList (x: x) {leaves})"#,
            salt = base.join("salt").display()
        ),
    )
    .unwrap();
    let run_nix_side = |salt: &str| -> Duration {
        std::fs::write(base.join("salt"), salt).unwrap();
        let d = base.join(format!("nixd-{salt}"));
        for s in ["etc", "cetc", "home", "root"] {
            std::fs::create_dir_all(d.join(s)).unwrap();
        }
        std::fs::write(
            d.join("etc/nix.conf"),
            format!(
                "store = local?root={}\nsandbox = false\nsandbox-paths = /bin /usr /lib /lib64\nsubstituters =\nbuild-users-group =\nmax-jobs = 0\nbuilders = @{}\nfsync-metadata = false\n",
                d.join("root").display(),
                machines.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("cetc/nix.conf"), "substituters =\n").unwrap();
        let socket = d.join("socket");
        let mut daemon = Command::new(nix().program("nix-daemon"))
            .env("NIX_CONF_DIR", d.join("etc"))
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .env("HOME", d.join("home"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let env = |c: &mut Command| {
            c.env("HOME", d.join("home"))
                .env("NIX_CONF_DIR", d.join("cetc"))
                // `root`: the client reads the chroot store's .drv files
                // itself (they are not under the real /nix/store).
                .env(
                    "NIX_REMOTE",
                    format!(
                        "unix://{}?root={}",
                        socket.display(),
                        d.join("root").display()
                    ),
                );
        };
        let mut inst = Command::new(nix().program("nix-instantiate"));
        inst.arg(&expr);
        env(&mut inst);
        let drvs: Vec<String> = String::from_utf8(sh(&mut inst).stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let t = Instant::now();
        let mut real = Command::new(nix().program("nix-store"));
        real.arg("--realise").args(&drvs);
        env(&mut real);
        sh(&mut real);
        let e = t.elapsed();
        let _ = daemon.kill();
        let _ = daemon.wait();
        e
    };
    let run_kiln_side = |salt: &str| -> Duration {
        std::fs::write(base.join("salt"), salt).unwrap();
        let store = base.join(format!("kiln-{salt}"));
        // The same .drv files, made by Nix into the store Kiln builds in.
        let nixconf = base.join(format!("kconf-{salt}"));
        std::fs::create_dir_all(&nixconf).unwrap();
        std::fs::write(
            nixconf.join("nix.conf"),
            format!(
                "store = local?root={}\nsubstituters =\nbuild-users-group =\n",
                store.display()
            ),
        )
        .unwrap();
        let drvs: Vec<String> = String::from_utf8(
            sh(Command::new(nix().program("nix-instantiate"))
                .arg(&expr)
                .env("NIX_CONF_DIR", &nixconf))
            .stdout,
        )
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
        let url = format!("local?root={}", store.display());
        let t = Instant::now();
        sh(Command::new(&kiln)
            .args([
                "build",
                "--store",
                &url,
                "--no-out-link",
                "-j",
                "0",
                "--option",
                "store",
                &url,
                "--option",
                "build-hook",
            ])
            .arg(&hook)
            .args(["--option", "builders"])
            .arg(format!("@{}", machines.display()))
            .args(&drvs)
            .env("KILN_OFFLOAD_SSH_DIR", &ssh_dir));
        t.elapsed()
    };
    let kiln_wide = run_kiln_side("kiln-run");
    println!("wide graph, kiln: {:.2}s", kiln_wide.as_secs_f64());
    let nix_wide = run_nix_side("nix-run");
    println!(
        "wide graph, {leaves} derivations, max-jobs 0, 3 remotes × 4 slots:   kiln {:>6.2}s   nix 2.8 build-remote {:>6.2}s   ({:.1}x)",
        kiln_wide.as_secs_f64(),
        nix_wide.as_secs_f64(),
        nix_wide.as_secs_f64() / kiln_wide.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&ssh_dir);
}
