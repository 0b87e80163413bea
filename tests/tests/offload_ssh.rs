//! Offloading over real OpenSSH servers: each test starts `sshd`s on
//! loopback ports (throwaway host keys, its own authorized_keys), each
//! machine with its own store behind `store-daemon --serve --write` (or
//! Nix 2.8's `nix-store --serve --write`), and builds through
//! `offload-hook` from Kiln's scheduler and from Nix 2.8's daemon.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::farm::{Farm, Kind, run_ok};
use kiln_e2e::{kiln_bin, nix, workspace_bin};

fn recipe(dir: &Path, leaves: usize, leaf_cmd: &str) -> PathBuf {
    let mut t = String::new();
    for i in 0..leaves {
        t.push_str(&format!(
            "[packages.p{i}]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"{}\"]\nenv = {{ PATH = \"/usr/bin:/bin\" }}\n\n",
            leaf_cmd.replace("{i}", &i.to_string())
        ));
    }
    let inputs: Vec<String> = (0..leaves).map(|i| format!("\"p{i}\"")).collect();
    let cats: Vec<String> = (0..leaves).map(|i| format!("$p{i}")).collect();
    t.push_str(&format!(
        "[packages.top]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"cat {} > $out\"]\ninputs = [{}]\nenv = {{ PATH = \"/usr/bin:/bin\" }}\n",
        cats.join(" "),
        inputs.join(", ")
    ));
    let path = dir.join("kiln.toml");
    std::fs::write(&path, t).unwrap();
    path
}

fn built_on(choices: &str) -> BTreeSet<String> {
    choices
        .lines()
        .filter_map(|l| {
            l.split_once(" built ")?
                .1
                .split(" on ")
                .nth(1)?
                .split(": sent")
                .next()
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn kiln_builds_a_wide_graph_on_kiln_and_nix_machines() {
    let mut farm = Farm::new();
    farm.add(Kind::Kiln, 3, 2);
    farm.add(Kind::Kiln, 2, 1);
    farm.add(Kind::Kiln, 2, 1);
    farm.add(Kind::Nix, 2, 1);
    let leaves = 120;
    let recipe = recipe(farm.dir.path(), leaves, "echo leaf {i} > $out");
    let out = farm.kiln_build(&[format!("{}#top", recipe.display())]);
    let choices = farm.choices();
    assert!(
        out.status.success(),
        "kiln build failed:\n{}\n{choices}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let content =
        std::fs::read_to_string(farm.local_root().join(top.trim_start_matches('/'))).unwrap();
    let expected: String = (0..leaves).map(|i| format!("leaf {i}\n")).collect();
    assert_eq!(content, expected);
    let machines = built_on(&choices);
    for m in &farm.machines {
        assert!(
            machines.contains(m.uri()),
            "nothing was built on {} (built on {machines:?})",
            m.uri()
        );
    }
    let builds = choices.lines().filter(|l| l.contains(" built ")).count();
    assert_eq!(
        builds,
        leaves + 1,
        "every derivation was built remotely, once:\n{choices}"
    );
    assert!(
        choices.contains("considered:"),
        "choices carry their reasons"
    );
    farm.verify_everywhere();
}

#[test]
fn nix_daemon_offloads_through_offload_hook() {
    let mut farm = Farm::new();
    farm.add(Kind::Kiln, 2, 1);
    farm.add(Kind::Kiln, 2, 1);
    let nixd = farm.dir.path().join("nixd");
    for d in ["etc", "cetc", "home", "root"] {
        std::fs::create_dir_all(nixd.join(d)).unwrap();
    }
    std::fs::write(
        nixd.join("etc/nix.conf"),
        format!(
            "store = local?root={}\nsandbox = false\nsandbox-paths = /bin /usr /lib /lib64\nsubstituters =\nbuild-users-group =\nmax-jobs = 0\nbuild-hook = {}\nbuilders = @{}\nfsync-metadata = false\n",
            nixd.join("root").display(),
            workspace_bin("offload-hook", "offload-hook").display(),
            farm.machines_file().display()
        ),
    )
    .unwrap();
    std::fs::write(nixd.join("cetc/nix.conf"), "substituters =\n").unwrap();
    let socket = nixd.join("socket");
    let mut daemon = Command::new(nix().program("nix-daemon"))
        .env("NIX_CONF_DIR", nixd.join("etc"))
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        .env("KILN_OFFLOAD_SSH_DIR", farm.ssh_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(nixd.join("daemon.log")).unwrap())
        .spawn()
        .expect("cannot start nix-daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "nix-daemon did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let expr = nixd.join("x.nix");
    std::fs::write(
        &expr,
        r#"let mk = i: derivation { name = "nx${toString i}"; system = "x86_64-linux"; builder = "/bin/sh"; args = ["-c" "echo nix ${toString i} > $out"]; };
in derivation { name = "nxtop"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = ["-c" "cat ${mk 1} ${mk 2} ${mk 3} ${mk 4} > $out"]; }"#,
    )
    .unwrap();
    let out = Command::new(nix().program("nix-build"))
        .arg("--no-out-link")
        .arg(&expr)
        .env("HOME", nixd.join("home"))
        .env("NIX_CONF_DIR", nixd.join("cetc"))
        .env("NIX_REMOTE", format!("unix://{}", socket.display()))
        .output()
        .unwrap();
    let log = std::fs::read_to_string(nixd.join("daemon.log")).unwrap_or_default();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        out.status.success(),
        "nix-build through the daemon failed:\n{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("on 'ssh://root@127.0.0.1"),
        "Nix says where it built:\n{err}"
    );
    let top = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let content =
        std::fs::read_to_string(nixd.join("root").join(top.trim_start_matches('/'))).unwrap();
    assert_eq!(content, "nix 1\nnix 2\nnix 3\nnix 4\n");
    // Nix itself finds the outputs valid and intact.
    let verify = Command::new(nix().program("nix-store"))
        .env("NIX_CONF_DIR", nixd.join("etc"))
        .args(["--verify-path", &top])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    farm.verify_everywhere();
}

#[test]
fn a_machine_killed_mid_build_moves_the_build() {
    let mut farm = Farm::new();
    farm.add(Kind::Kiln, 1, 1);
    farm.add(Kind::Kiln, 1, 1);
    killed_mid_build_moves_the_build(farm);
}

/// The same over `ssh-ng://`, with a Kiln and a Nix daemon: the broken
/// daemon connection is transient as the broken serve session is.
#[test]
fn an_ssh_ng_machine_killed_mid_build_moves_the_build() {
    let mut farm = Farm::new();
    farm.add_with(Kind::Kiln, 1, 1, "ssh-ng", "");
    farm.add_with(Kind::Nix, 1, 1, "ssh-ng", "");
    killed_mid_build_moves_the_build(farm);
}

/// Starts a slow build on a farm of two machines, kills the sshd of the
/// one it runs on, and expects it built on the other.
fn killed_mid_build_moves_the_build(mut farm: Farm) {
    let recipe = recipe(farm.dir.path(), 1, "sleep 4; echo slow {i} > $out");
    let target = format!("{}#p0", recipe.display());
    let handle = {
        let store = format!("local?root={}", farm.local_root().display());
        let mut cmd = Command::new(kiln_bin());
        cmd.args(["build", "--store", &store, "--no-out-link", "-j", "0"])
            .args(["--option", "store", &store])
            .args(["--option", "build-hook"])
            .arg(workspace_bin("offload-hook", "offload-hook"))
            .args(["--option", "builders"])
            .arg(format!("@{}", farm.machines_file().display()))
            .arg(&target)
            .env("KILN_OFFLOAD_SSH_DIR", farm.ssh_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    // Wait until the build runs somewhere, then take that machine away.
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let choices = farm.choices();
        if let Some(i) = farm.machines.iter().position(|m| {
            choices
                .lines()
                .any(|l| l.contains("building") && l.contains(m.uri()))
        }) {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "the build never started remotely:\n{choices}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(1500));
    farm.machines[victim].kill();
    let out = handle.wait_with_output().unwrap();
    let choices = farm.choices();
    assert!(
        out.status.success(),
        "the build did not survive the loss of a machine:\n{}\n{choices}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = farm.machines[1 - victim].uri().to_owned();
    assert!(choices.contains("moving it"), "{choices}");
    assert!(
        built_on(&choices).contains(&other),
        "not rebuilt on the other machine:\n{choices}"
    );
    let top = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let content =
        std::fs::read_to_string(farm.local_root().join(top.trim_start_matches('/'))).unwrap();
    assert_eq!(content, "slow 0\n");
    farm.machines.remove(victim);
    farm.verify_everywhere();
}

#[test]
fn a_permanent_remote_failure_is_a_build_failure_with_the_remote_log() {
    let mut farm = Farm::new();
    farm.add(Kind::Kiln, 1, 1);
    farm.add(Kind::Nix, 1, 1);
    let recipe = recipe(farm.dir.path(), 2, "echo remote-says-boom-{i} >&2; exit 3");
    let out = farm.kiln_build(&[
        format!("{}#p0", recipe.display()),
        format!("{}#p1", recipe.display()),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a failing builder must fail the build:\n{err}"
    );
    for i in 0..2 {
        assert!(
            err.contains(&format!("remote-says-boom-{i}")),
            "the remote log of p{i} must reach the user:\n{err}"
        );
    }
    let choices = farm.choices();
    assert!(
        !choices.contains("moving it"),
        "a permanent failure is not retried elsewhere:\n{choices}"
    );
}

#[test]
fn test_and_status_print_tables() {
    let mut farm = Farm::new();
    farm.add(Kind::Kiln, 2, 1);
    farm.add(Kind::Nix, 1, 1);
    let hook = workspace_bin("offload-hook", "offload-hook");
    let store = format!("local?root={}", farm.local_root().display());
    let out = run_ok(
        Command::new(&hook)
            .args(["test", "--machines"])
            .arg(farm.machines_file())
            .env("KILN_OFFLOAD_SSH_DIR", farm.ssh_dir()),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("MACHINE"), "{table}");
    for m in &farm.machines {
        let row = table
            .lines()
            .find(|l| l.starts_with(m.uri()))
            .unwrap_or_else(|| panic!("no row for {}:\n{table}", m.uri()));
        assert!(row.trim_end().ends_with("ok"), "{row}");
    }
    let out = run_ok(
        Command::new(&hook)
            .args(["status", "--machines"])
            .arg(farm.machines_file())
            .args(["--store", &store])
            .env("KILN_OFFLOAD_SSH_DIR", farm.ssh_dir()),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let kiln_row = table
        .lines()
        .find(|l| l.starts_with(farm.machines[0].uri()))
        .unwrap();
    assert!(
        kiln_row.contains("0/2") && kiln_row.ends_with("up"),
        "{table}"
    );
    // A dead machine: test fails for it, status shows it unreachable.
    farm.machines[1].kill();
    let out = Command::new(&hook)
        .args(["test", "--machines"])
        .arg(farm.machines_file())
        .env("KILN_OFFLOAD_SSH_DIR", farm.ssh_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let dead = table
        .lines()
        .find(|l| l.starts_with(farm.machines[1].uri()))
        .unwrap();
    assert!(dead.contains("FAILED"), "{table}");
}

/// `ssh-ng://` machines (the daemon protocol over `ssh HOST nix-daemon
/// --stdio` and `store-daemon --stdio`) and a Kiln `ssh://` machine with a
/// zstd-compressed stream: `offload-hook test` copies a path each way and
/// builds on each, then a graph is spread over all three, and every store
/// checks clean.
#[test]
fn ssh_ng_machines_and_a_zstd_stream_build_and_copy() {
    let mut farm = Farm::new();
    farm.add_with(Kind::Kiln, 2, 1, "ssh-ng", "");
    farm.add_with(Kind::Nix, 2, 1, "ssh-ng", "");
    farm.add_with(Kind::Kiln, 2, 1, "ssh", "&compress=zstd");
    let hook = workspace_bin("offload-hook", "offload-hook");
    let out = Command::new(&hook)
        .args(["test", "--machines"])
        .arg(farm.machines_file())
        .env("KILN_OFFLOAD_SSH_DIR", farm.ssh_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "offload-hook test failed:\n{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for m in &farm.machines {
        let row = table
            .lines()
            .find(|l| l.starts_with(m.uri()))
            .unwrap_or_else(|| panic!("no row for {}:\n{table}", m.uri()));
        assert!(row.trim_end().ends_with("ok"), "{row}");
    }
    let leaves = 30;
    let recipe = recipe(
        farm.dir.path(),
        leaves,
        "echo ng {i} > $out; echo log line of {i}",
    );
    let out = farm.kiln_build(&[format!("{}#top", recipe.display())]);
    let choices = farm.choices();
    assert!(
        out.status.success(),
        "kiln build failed:\n{}\n{choices}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let content =
        std::fs::read_to_string(farm.local_root().join(top.trim_start_matches('/'))).unwrap();
    let expected: String = (0..leaves).map(|i| format!("ng {i}\n")).collect();
    assert_eq!(content, expected);
    let machines = built_on(&choices);
    for m in &farm.machines {
        assert!(
            machines.contains(m.uri()),
            "nothing was built on {} (built on {machines:?}):\n{choices}",
            m.uri()
        );
    }
    farm.verify_everywhere();
}

/// A builder that fails on an `ssh-ng://` Nix machine is a build failure
/// carrying the remote log (sent as daemon log messages), not a transport
/// error, and is not retried elsewhere.
#[test]
fn a_permanent_failure_over_ssh_ng_reaches_the_user_with_the_log() {
    let mut farm = Farm::new();
    farm.add_with(Kind::Nix, 1, 1, "ssh-ng", "");
    farm.add_with(Kind::Kiln, 1, 1, "ssh-ng", "");
    let recipe = recipe(farm.dir.path(), 1, "echo remote says goodbye-{i}; exit 3");
    let out = farm.kiln_build(&[format!("{}#p0", recipe.display())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let choices = farm.choices();
    assert!(!out.status.success(), "the build must fail:\n{stderr}");
    assert!(
        stderr.contains("remote says goodbye-0"),
        "the remote log reaches the user:\n{stderr}\n{choices}"
    );
    assert!(
        !choices.contains("moving it"),
        "a permanent failure is not retried elsewhere:\n{choices}"
    );
}

#[test]
fn a_bad_machines_file_names_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("machines");
    std::fs::write(
        &file,
        "ssh://a x86_64-linux - 2\nssh://b x86_64-linux - two\n",
    )
    .unwrap();
    let out = Command::new(workspace_bin("offload-hook", "offload-hook"))
        .args(["status", "--machines"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("machines:2: field 4 (max jobs) is 'two'"),
        "{err}"
    );
}

/// A closure of 60 paths (one past the 4 MiB that are copied through
/// memory) goes to each kind of machine and comes back whole, through
/// the functions offload-hook copies a build's inputs and outputs with:
/// over ssh:// (serve protocol) and ssh-ng:// (daemon protocol, where
/// the NARs back come over one connection taken in turns by several
/// writers) to Kiln's and Nix's programs.
#[test]
fn closures_go_to_every_kind_of_machine_and_come_back_whole() {
    use kiln_offload::machines::parse_builders;
    use kiln_offload::remote::{copy_from, copy_to};
    use kiln_offload::ssh::{LogSink, SshTarget};
    use kiln_store::Store;
    use kiln_store::local::LocalStore;

    let mut farm = Farm::new();
    for (kind, scheme) in [
        (Kind::Kiln, "ssh"),
        (Kind::Kiln, "ssh-ng"),
        (Kind::Nix, "ssh"),
        (Kind::Nix, "ssh-ng"),
    ] {
        farm.add_with(kind, 1, 1, scheme, "");
    }
    let src = LocalStore::open_root(farm.dir.path().join("src")).unwrap();
    let mut prev: Option<kiln_formats::store_path::StorePath> = None;
    for i in 0..60usize {
        let size = if i == 30 { 5 << 20 } else { 1000 + i * 997 };
        let mut data = Vec::with_capacity(size + 100);
        let refs: BTreeSet<_> = prev.iter().cloned().collect();
        if let Some(p) = &prev {
            data.extend_from_slice(src.store_dir().print_path(p).as_bytes());
        }
        data.extend((0..size).map(|j| (j * 31 + i) as u8));
        prev = Some(src.add_text(&format!("c{i}"), &data, &refs).unwrap().path);
    }
    let top: BTreeSet<_> = prev.into_iter().collect();
    let closure = src.query_all_valid_paths().unwrap();

    for (n, machine) in farm.machines.iter().enumerate() {
        let line = &machine.line;
        let m = &parse_builders(line, "test", "x86_64-linux").unwrap()[0];
        let target = SshTarget::new(m, &farm.ssh_dir()).unwrap();
        let log = LogSink::new(std::io::sink());
        let sent = copy_to(&target, &src, &top, log.clone())
            .unwrap_or_else(|f| panic!("copy to {line}: {f:?}"));
        assert_eq!(sent.sent_paths, closure.len(), "{line}");
        let back = LocalStore::open_root(farm.dir.path().join(format!("back{n}"))).unwrap();
        copy_from(&target, &back, &top, log)
            .unwrap_or_else(|f| panic!("copy back from {line}: {f:?}"));
        assert_eq!(back.query_all_valid_paths().unwrap(), closure, "{line}");
        for p in &closure {
            let (a, b) = (
                src.query_path_info(p).unwrap(),
                back.query_path_info(p).unwrap(),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!(
                (a.nar_hash, a.references),
                (b.nar_hash, b.references),
                "{line}"
            );
        }
        let report = back.verify(true, None).unwrap();
        assert!(report.is_clean(), "{line}: {report:?}");
        target.exit_master();
    }
}
