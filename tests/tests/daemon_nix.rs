//! Nix 2.8's own clients against Kiln's `store-daemon`: every command goes
//! through `unix://<socket>` and must behave as it does against Nix's own
//! store — the same paths, contents, metadata and failures.

use std::path::Path;

use kiln_e2e::{KilnDaemon, NixStore, corpus, host_sandbox_paths};

/// A Nix client configuration that talks to `daemon`, and a second,
/// local Nix store to compare with.
fn client() -> NixStore {
    NixStore::with_config("require-sigs = false\n")
}

fn start_daemon() -> KilnDaemon {
    KilnDaemon::start(&[("sandbox-paths", &host_sandbox_paths())])
}

/// Runs a Nix program against the daemon; its stdout, or a panic that
/// shows what Nix said.
fn via(nix: &NixStore, daemon: &KilnDaemon, program: &str, args: &[&str]) -> String {
    let mut cmd = nix.command(program);
    cmd.arg("--store").arg(daemon.url()).args(args);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} through Kiln's daemon failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

#[test]
fn store_ping_reports_the_daemon() {
    let nix = client();
    let daemon = start_daemon();
    let mut cmd = nix.command("nix");
    cmd.args(["store", "ping", "--store"]).arg(daemon.url());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Kiln"),
        "nix store ping did not show the daemon's version: {text}"
    );
}

#[test]
fn add_query_and_path_info_match_a_local_nix_store() {
    let nix = client();
    let daemon = start_daemon();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("hello.txt");
    std::fs::write(&file, "hello daemon\n").unwrap();
    let dir = work.path().join("tree");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/a"), "a").unwrap();
    std::os::unix::fs::symlink("sub/a", dir.join("link")).unwrap();
    let f = file.to_str().unwrap();
    let d = dir.to_str().unwrap();

    let added = via(&nix, &daemon, "nix-store", &["--add", f, d]);
    let expected = nix.nix_store(["--add", f, d]).unwrap();
    assert_eq!(
        added, expected,
        "nix-store --add gave other paths through Kiln"
    );
    for p in added.lines() {
        assert!(daemon.physical(p).exists(), "{p} is not in Kiln's store");
    }
    let fixed = via(&nix, &daemon, "nix-store", &["--add-fixed", "sha256", f]);
    assert_eq!(fixed, nix.nix_store(["--add-fixed", "sha256", f]).unwrap());
    let fixed_flat = via(
        &nix,
        &daemon,
        "nix-store",
        &["--add-fixed", "--recursive", "sha1", d],
    );
    assert_eq!(
        fixed_flat,
        nix.nix_store(["--add-fixed", "--recursive", "sha1", d])
            .unwrap()
    );

    // A text path with references, made by evaluation (AddTextToStore / AddToStore).
    let expr = format!(
        "builtins.toFile \"refs.txt\" \"see ${{builtins.storePath \"{}\"}}\"",
        added.lines().next().unwrap()
    );
    let text_path = via(
        &nix,
        &daemon,
        "nix-instantiate",
        &["--eval", "--read-write-mode", "-E", &expr],
    );
    let text_path = text_path.trim().trim_matches('"').to_owned();
    assert!(
        daemon.physical(&text_path).exists(),
        "{text_path} is not in Kiln's store"
    );

    let refs = via(
        &nix,
        &daemon,
        "nix-store",
        &["-q", "--references", &text_path],
    );
    assert_eq!(lines(&refs), vec![added.lines().next().unwrap().to_owned()]);
    let referrers = via(
        &nix,
        &daemon,
        "nix-store",
        &["-q", "--referrers", added.lines().next().unwrap()],
    );
    assert_eq!(lines(&referrers), vec![text_path.clone()]);
    let tree = via(&nix, &daemon, "nix-store", &["-q", "--tree", &text_path]);
    assert!(tree.contains(added.lines().next().unwrap()), "{tree}");
    let deriver = via(&nix, &daemon, "nix-store", &["-q", "--deriver", &text_path]);
    assert_eq!(deriver.trim(), "unknown-deriver");

    let json = via(
        &nix,
        &daemon,
        "nix",
        &["path-info", "--json", "-r", &text_path],
    );
    let infos: serde_json::Value = serde_json::from_str(&json).unwrap();
    let infos = infos.as_array().unwrap();
    assert_eq!(infos.len(), 2, "{json}");
    for info in infos {
        let path = info["path"].as_str().unwrap();
        assert!(daemon.physical(path).exists(), "{path}");
        assert!(
            info["narHash"].as_str().unwrap().starts_with("sha256-"),
            "{json}"
        );
        assert!(info["narSize"].as_u64().unwrap() > 0, "{json}");
    }
    // The NAR hash Nix computes from the contents it reads through the daemon.
    let verify = via(&nix, &daemon, "nix-store", &["--verify-path", &text_path]);
    assert_eq!(verify, "");
}

#[test]
fn nix_build_of_corpus_files_matches_nix() {
    let nix = client();
    let daemon = start_daemon();
    for name in [
        "deps-diamond.nix",
        "deps-three-levels.nix",
        "multi-output.nix",
        "env-many.nix",
    ] {
        let file = corpus::corpus_dir().join(name);
        if !file.exists() {
            panic!("corpus file {} is missing", file.display());
        }
        let f = file.to_str().unwrap();
        let ours = via(&nix, &daemon, "nix-build", &["--no-out-link", f]);
        let theirs = nix.nix_build(["--no-out-link", f]).unwrap();
        assert_eq!(
            ours, theirs,
            "{name}: nix-build through Kiln gave other output paths"
        );
        for out in ours.lines() {
            let a = nar_of(&daemon.physical(out));
            let b = nar_of(&nix.physical(out));
            assert_eq!(a, b, "{name}: {out} differs between Kiln's daemon and Nix");
        }
        // Built again: everything is valid, nothing is rebuilt.
        assert_eq!(via(&nix, &daemon, "nix-build", &["--no-out-link", f]), ours);
        // nix-store -r of the .drv realises the same paths.
        let drv = via(&nix, &daemon, "nix-instantiate", &[f]);
        let realised = via(&nix, &daemon, "nix-store", &["-r", drv.trim()]);
        let expected = nix.nix_store(["-r", drv.trim()]).unwrap();
        assert_eq!(lines(&realised), lines(&expected));
    }
}

fn nar_of(path: &Path) -> Vec<u8> {
    let out = std::process::Command::new(kiln_e2e::nix().program("nix-store"))
        .args(["--dump"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-store --dump {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn build_failure_reaches_the_client_with_log_and_status() {
    let nix = client();
    let daemon = start_daemon();
    let file = corpus::corpus_dir().join("fail-exit.nix");
    let mut cmd = nix.command("nix-build");
    cmd.arg("--store")
        .arg(daemon.url())
        .arg("--no-out-link")
        .arg(&file);
    let ours = cmd.output().unwrap();
    let theirs = nix
        .command("nix-build")
        .arg("--no-out-link")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&ours.stderr);
    assert!(
        !ours.status.success(),
        "a failing build succeeded through Kiln"
    );
    assert!(
        err.contains("about to fail"),
        "the build log did not reach the client:\n{err}"
    );
    assert!(
        err.contains("exit code 1") || err.contains("exit status 1"),
        "the builder's exit status is not in the error:\n{err}"
    );
    assert!(!theirs.status.success());
    // The failed build's log is kept where `nix log` finds it.
    let drv = via(&nix, &daemon, "nix-instantiate", &[file.to_str().unwrap()]);
    let log = via(&nix, &daemon, "nix", &["log", drv.trim()]);
    assert!(
        log.contains("about to fail"),
        "nix log through Kiln's daemon: {log}"
    );
}

#[test]
fn export_import_gc_delete_verify_optimise() {
    let nix = client();
    let daemon = start_daemon();
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a.txt");
    std::fs::write(&a, "exported\n").unwrap();
    // Made in Nix's own store, exported there, imported through Kiln.
    let path = nix.nix_store(["--add", a.to_str().unwrap()]).unwrap();
    let path = path.trim();
    let export = nix.run_bytes("nix-store", ["--export", path], b"").unwrap();
    let mut cmd = nix.command("nix-store");
    cmd.arg("--store")
        .arg(daemon.url())
        .arg("--import")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&export).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "--import through Kiln: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), path);
    assert!(daemon.physical(path).exists());

    // Exported back through Kiln: Nix imports it into a fresh store.
    let mut cmd = nix.command("nix-store");
    cmd.arg("--store")
        .arg(daemon.url())
        .args(["--export", path]);
    let exported = cmd.output().unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let other = NixStore::new();
    let imported = other
        .run_bytes("nix-store", ["--import"], &exported.stdout)
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&imported).trim(), path);

    // The connection that imported it is gone, and its roots with it.
    let dead = via(&nix, &daemon, "nix-store", &["--gc", "--print-dead"]);
    assert!(
        dead.lines().any(|l| l == path),
        "{path} is not dead:\n{dead}"
    );
    // As from Nix's daemon, the client hears what is being deleted.
    let mut cmd = nix.command("nix-store");
    cmd.arg("--store")
        .arg(daemon.url())
        .args(["--delete", path]);
    let deleted = cmd.output().unwrap();
    assert!(deleted.status.success());
    let said = String::from_utf8_lossy(&deleted.stderr);
    assert!(
        said.contains("finding garbage collector roots...")
            && said.contains(&format!("deleting '{path}'")),
        "nix-store --delete said:\n{said}"
    );
    assert!(!daemon.physical(path).exists(), "{path} was not deleted");
    let mut cmd = nix.command("nix-store");
    cmd.arg("--store")
        .arg(daemon.url())
        .args(["--check-validity", path]);
    assert!(
        !cmd.output().unwrap().status.success(),
        "{path} is still valid after --delete"
    );
    via(
        &nix,
        &daemon,
        "nix-store",
        &["--verify", "--check-contents"],
    );
    via(&nix, &daemon, "nix-store", &["--optimise"]);
}

/// What a client built through the daemon is a temporary root of that
/// client's connection, as in Nix's process per connection: safe from a
/// collection while the client runs, and collectable once it is gone,
/// without restarting the daemon.
#[test]
fn built_outputs_are_roots_of_the_connection_only() {
    let nix = client();
    let daemon = start_daemon();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("two.nix");
    std::fs::write(
        &file,
        r#"let dep = derivation { name = "dep"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo dep > $out" ]; };
in derivation { name = "top"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${dep} > $out" ]; }
"#,
    )
    .unwrap();
    let built = via(
        &nix,
        &daemon,
        "nix-build",
        &["--no-out-link", file.to_str().unwrap()],
    );
    let top = built.trim();
    let dep = std::fs::read_to_string(daemon.physical(top)).unwrap();
    let dep = dep.trim();
    let dead = via(&nix, &daemon, "nix-store", &["--gc", "--print-dead"]);
    for path in [top, dep] {
        assert!(
            dead.lines().any(|l| l == path),
            "{path}, built by a client that has exited, is still alive:\n{dead}"
        );
    }

    // While a client's connection is open, what it built stays; once it
    // has hung up, it goes.
    let drv = via(&nix, &daemon, "nix-instantiate", &[file.to_str().unwrap()]);
    let sd = kiln_formats::store_path::StoreDir::default();
    let drv = sd.parse_path(drv.trim()).unwrap();
    let client = kiln_protocol::client::DaemonStore::new(daemon.socket());
    client
        .build_paths(
            &[kiln_protocol::worker::DerivedPath::Built {
                drv,
                outputs: Vec::new(),
            }],
            kiln_protocol::worker::BuildMode::Normal,
            &kiln_protocol::client::BuildOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    via(&nix, &daemon, "nix-store", &["--gc"]);
    assert!(
        daemon.physical(top).exists(),
        "{top} was collected while the client that built it was connected"
    );
    drop(client);
    // The daemon notices the hang-up on its own time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while daemon.physical(top).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{top} outlived its client's connection"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        via(&nix, &daemon, "nix-store", &["--gc"]);
    }
}

#[test]
fn nix_copy_to_and_from_a_file_cache() {
    let nix = client();
    let daemon = start_daemon();
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("c.txt");
    std::fs::write(&f, "copied\n").unwrap();
    let path = via(&nix, &daemon, "nix-store", &["--add", f.to_str().unwrap()]);
    let path = path.trim();
    let cache = format!("file://{}", work.path().join("cache").display());
    via(&nix, &daemon, "nix", &["copy", "--to", &cache, path]);
    assert!(
        work.path()
            .join("cache")
            .join(format!("{}.narinfo", &path[11..43]))
            .exists()
    );
    // Into a second daemon, from the cache.
    let other = start_daemon();
    let mut cmd = nix.command("nix");
    cmd.args(["copy", "--no-check-sigs", "--from", &cache, "--to"])
        .arg(other.url())
        .arg(path);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "nix copy --from: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(other.physical(path)).unwrap(), b"copied\n");
}

/// `nix-env -i` through the daemon builds the profile's user environment
/// (`builtin:buildenv`) as Nix's own daemon does: the same store path
/// with the same contents, shared directories merged, `nix-support` left
/// out, and the package of higher priority winning a collision.
#[test]
fn nix_env_builds_user_environments_as_nix_does() {
    let nix = client();
    let daemon = start_daemon();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("pkgs.nix");
    std::fs::write(
        &file,
        r#"let mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
in {
  hello = mk "hello-1.0" "/bin/mkdir -p $out/bin $out/share/hello; echo hi > $out/bin/hello; echo hello > $out/bin/common; echo doc > $out/share/hello/README";
  tools = (mk "tools-2.0" "/bin/mkdir -p $out/bin $out/share/doc $out/nix-support; echo t > $out/bin/tool; echo tools > $out/bin/common; echo d > $out/share/doc/tools; echo hook > $out/nix-support/setup-hook") // { meta.priority = 4; };
}
"#,
    )
    .unwrap();
    let install = |mut cmd: std::process::Command, profile: &Path| -> String {
        let out = cmd
            .arg("-p")
            .arg(profile)
            .arg("-f")
            .arg(&file)
            .args(["-iA", "hello", "tools"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nix-env -i: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_link(profile)
            .and_then(|generation| std::fs::read_link(work.path().join(generation)))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let mut ours = nix.command("nix-env");
    ours.arg("--store").arg(daemon.url());
    let ours = install(ours, &work.path().join("kiln-profile"));
    let theirs = install(nix.command("nix-env"), &work.path().join("nix-profile"));
    assert_eq!(ours, theirs, "the user environments' store paths differ");
    assert_eq!(
        via(&nix, &daemon, "nix-store", &["-q", "--hash", &ours]),
        nix.nix_store(["-q", "--hash", &theirs]).unwrap(),
        "the user environments' contents differ"
    );
    let env = daemon.physical(&ours);
    let common = std::fs::read_link(env.join("bin/common")).unwrap();
    assert!(
        common.to_string_lossy().ends_with("tools-2.0/bin/common"),
        "bin/common is {common:?}, not the one of higher priority"
    );
    assert!(env.join("share").is_dir() && !env.join("nix-support").exists());
}

/// `<nix/fetchurl.nix>` (`builtin:fetchurl`) through the daemon: a file
/// and an executable downloaded over HTTP into the same store paths, with
/// the same hashes, as by Nix's own daemon.
#[test]
fn builtin_fetchurl_downloads_as_nix_does() {
    let nix = client();
    let daemon = start_daemon();
    let work = tempfile::tempdir().unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("data.txt", b"fetched by a builtin\n".to_vec()),
        ("tool", b"#!/bin/sh\necho tool\n".to_vec()),
    ];
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let base = format!("http://{}", server.server_addr().to_ip().unwrap());
    let served = files.clone();
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let name = request.url().trim_start_matches('/').to_owned();
            let response = match served.iter().find(|(n, _)| *n == name) {
                Some((_, data)) => tiny_http::Response::from_data(data.clone()),
                None => tiny_http::Response::from_data(Vec::new()).with_status_code(404),
            };
            let _ = request.respond(response);
        }
    });
    // The expected hashes, by Nix: flat for the file, of the executable's
    // NAR for the tool.
    let hash = |name: &str, data: &[u8], executable: bool| {
        use std::os::unix::fs::PermissionsExt;
        let f = work.path().join(name);
        std::fs::write(&f, data).unwrap();
        let mode = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut args = vec!["--type", "sha256", "--base32"];
        if !executable {
            args.push("--flat");
        }
        args.push(f.to_str().unwrap());
        nix.run("nix-hash", args).unwrap().trim().to_owned()
    };
    let expr = format!(
        r#"{{
  flat = import <nix/fetchurl.nix> {{ url = "{base}/data.txt"; sha256 = "{}"; }};
  exe = import <nix/fetchurl.nix> {{ url = "{base}/tool"; sha256 = "{}"; executable = true; }};
}}
"#,
        hash("data.txt", &files[0].1, false),
        hash("tool", &files[1].1, true),
    );
    let file = work.path().join("fetch.nix");
    std::fs::write(&file, expr).unwrap();
    let args = [
        "--no-out-link",
        "-A",
        "flat",
        "-A",
        "exe",
        file.to_str().unwrap(),
    ];
    let ours = via(&nix, &daemon, "nix-build", &args);
    let theirs = nix.run("nix-build", args).unwrap();
    assert_eq!(lines(&ours), lines(&theirs));
    let ours = lines(&ours);
    assert_eq!(ours.len(), 2);
    for path in &ours {
        assert_eq!(
            via(&nix, &daemon, "nix-store", &["-q", "--hash", path]),
            nix.nix_store(["-q", "--hash", path]).unwrap()
        );
    }
    let tool = daemon.physical(&ours[1]);
    assert_eq!(std::fs::read(&tool).unwrap(), files[1].1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&tool).unwrap().permissions().mode() & 0o111,
        0o111
    );
}

/// `nix-channel --update` through the daemon: the channel tarball unpacked
/// by `builtin:unpack-channel` and linked into the channels profile by
/// `builtin:buildenv`. (Nix 2.8's own `nix-channel` cannot update against
/// a store under another root, so there is no reference run here.)
#[test]
fn nix_channel_update_unpacks_channels_as_nix_does() {
    let nix = client();
    let daemon = start_daemon();
    let work = tempfile::tempdir().unwrap();
    let channel = work.path().join("channel");
    let tree = work.path().join("tree/nixpkgs-23.11pre1");
    std::fs::create_dir_all(tree.join("lib")).unwrap();
    std::fs::write(tree.join("default.nix"), "{ }: { hello = 1; }\n").unwrap();
    std::fs::write(tree.join("lib/x.nix"), "1\n").unwrap();
    std::fs::create_dir_all(&channel).unwrap();
    let tar = std::process::Command::new("tar")
        .arg("-C")
        .arg(work.path().join("tree"))
        .arg("-cJf")
        .arg(channel.join("nixexprs.tar.xz"))
        .arg("nixpkgs-23.11pre1")
        .status()
        .unwrap();
    assert!(tar.success());
    let update = |store: String, state: &str| -> String {
        let state = work.path().join(state);
        let profiles = state.join("profiles/per-user/root");
        std::fs::create_dir_all(&profiles).unwrap();
        let run = |args: &[&str]| {
            let mut cmd = nix.command("nix-channel");
            cmd.env("NIX_STATE_DIR", &state).env("USER", "root");
            // nix-channel runs nix-env, which takes the store from here.
            cmd.env("NIX_CONFIG", format!("store = {store}"));
            let out = cmd.args(args).output().unwrap();
            assert!(
                out.status.success(),
                "nix-channel {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["--add", &format!("file://{}", channel.display()), "mine"]);
        run(&["--update"]);
        std::fs::read_link(profiles.join("channels"))
            .and_then(|generation| std::fs::read_link(profiles.join(generation)))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    // Without `?root=`: nix-channel hands the tarball's path to the
    // evaluator, which wants it logical.
    let socket = format!("unix://{}", daemon.socket().display());
    let ours = update(socket, "kiln-state");
    let unpacked = daemon.physical(&ours).join("mine");
    let target = std::fs::read_link(&unpacked).unwrap();
    let default = daemon.physical(&target).join("default.nix");
    assert_eq!(
        std::fs::read_to_string(default).unwrap(),
        "{ }: { hello = 1; }\n"
    );
}
