//! Security regression tests: each one runs a real attack inside a real sandbox
//! (the `kiln-sandbox-probe` builder) and checks that it was blocked. Most run
//! twice: with root as the caller (as the daemon and CI run) and with an ordinary
//! user (uid 65534) as the caller.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use kiln_sandbox::{Network, Sandbox};

const EPERM: &str = "err 1";
const ENOENT: &str = "err 2";
const ESRCH: &str = "err 3";
const EROFS: &str = "err 30";
const ENOTSUP: &str = "err 95";
const ECONNREFUSED: &str = "err 111";

fn both(scenario: fn(Caller) -> Result<(), String>) {
    for caller in [Caller::Root, Caller::Nobody] {
        if let Err(e) = as_caller(caller, || scenario(caller)) {
            panic!("as {caller:?}: {e}");
        }
    }
}

fn expect(out: &str, prefix: &str, want: &str) -> Result<(), String> {
    let l = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .ok_or_else(|| format!("no {prefix:?} line in output:\n{out}"))?;
    ensure!(
        l == format!("{prefix} {want}") || l.starts_with(&format!("{prefix} {want} ")),
        "{prefix}: expected {want:?}, got {l:?}\n{out}"
    );
    Ok(())
}

/// The n-th line starting with `prefix`.
fn nth<'a>(out: &'a str, prefix: &str, n: usize) -> &'a str {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .nth(n)
        .unwrap_or("")
}

// --- setuid / setgid bits -------------------------------------------------------

fn setuid_bits(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let mut build = Build::new(&tmp.path().join("builds"));
    let attacks = [
        "chmod",
        "fchmod",
        "fchmodat",
        "fchmodat2",
        "chmod-i386",
        "fchmod-i386",
        "fchmodat-i386",
        "fchmodat2-i386",
        "chmod-x32",
    ];
    let mut args = vec!["write", "/build/f", "mkdir", "/build/d"];
    for a in attacks {
        args.extend([
            a, "/build/f", "4755", a, "/build/f", "2755", a, "/build/d", "2755",
        ]);
    }
    args.extend(["chmod-plain", "/build/f", "0750", "getpid-i386"]);
    let (status, out) = run(build.spec(&args));
    ensure!(status.success(), "probe failed: {status:?}\n{out}");
    // The i386 ABI really works here, so its refusals below are the filter's.
    expect(&out, "getpid-i386", "ok")?;
    for a in attacks {
        for i in 0..3 {
            let l = nth(&out, &format!("{a} "), i);
            // x32 is compiled out of this kernel (ENOSYS); elsewhere the filter says EPERM.
            let refused =
                l == format!("{a} {EPERM}") || (a == "chmod-x32" && l == format!("{a} err 38"));
            ensure!(refused, "{a} #{i} was not refused: {l:?}\n{out}");
        }
    }
    expect(&out, "chmod-plain", "ok")?;
    for name in ["f", "d"] {
        let mode = std::fs::metadata(build.path().join(name)).unwrap().mode();
        ensure!(mode & 0o6000 == 0, "/build/{name} has mode {mode:o}");
    }
    ensure!(
        std::fs::metadata(build.path().join("f")).unwrap().mode() & 0o777 == 0o750,
        "plain chmod must still work"
    );
    Ok(())
}

#[test]
fn setuid_and_setgid_bits_are_refused_through_every_chmod_call_and_abi() {
    both(setuid_bits);
}

// --- extended attributes ----------------------------------------------------------

fn xattrs(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let mut build = Build::new(&tmp.path().join("builds"));
    let (status, out) = run(build.spec(&[
        "write",
        "/build/f",
        "setxattr",
        "/build/f",
        "setacl",
        "/build/f",
        "setcap",
        "/build/f",
        "setxattr-i386",
        "/build/f",
        "getxattr",
        "/build/f",
    ]));
    ensure!(status.success(), "{status:?}\n{out}");
    for a in ["setxattr", "setacl", "setcap", "setxattr-i386", "getxattr"] {
        expect(&out, a, ENOTSUP)?;
    }
    let f = std::ffi::CString::new(build.path().join("f").to_str().unwrap()).unwrap();
    let n = unsafe { libc::listxattr(f.as_ptr(), std::ptr::null_mut(), 0) };
    ensure!(
        n == 0,
        "the file carries extended attributes ({n} bytes of names)"
    );
    Ok(())
}

#[test]
fn extended_attributes_acls_and_file_capabilities_are_refused() {
    both(xattrs);
}

// --- writing outside the build ------------------------------------------------------

fn writes(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let input = tmp.path().join("input");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("file"), "original\n").unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(input.join("file"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut build = Build::new(&tmp.path().join("builds"));
    let spec = build
        .spec(&[
            "write",
            "/nix/store/aaaa-input/file",
            "write",
            "/nix/store/aaaa-input/new",
            "write",
            "/nix/store/new",
            "mkdir",
            "/nix/store/newdir",
            "write",
            "/probe",
            "write",
            "/usr/kiln",
            "write",
            "/etc/passwd",
            "write",
            "/newfile",
            "write",
            "/dev/newfile",
            "remount-rw",
            "/nix/store/aaaa-input",
            "write",
            "/build/ok",
        ])
        .bind_ro(&input, "/nix/store/aaaa-input");
    let (status, out) = run(spec);
    ensure!(status.success(), "{status:?}\n{out}");
    // Store paths and the store are read-only mounts; other host paths are either
    // absent, read-only or not ours (EACCES comes before EROFS for those).
    for i in 0..8 {
        let l = nth(&out, "write ", i);
        let ok = if i < 3 {
            l == format!("write {EROFS}")
        } else {
            l.starts_with("write err")
        };
        ensure!(ok, "write #{i} was not refused: {l:?}\n{out}");
    }
    expect(&out, "mkdir", EROFS)?;
    expect(&out, "remount-rw", EPERM)?;
    ensure!(
        nth(&out, "write ", 8) == "write ok 6",
        "the build dir must be writable\n{out}"
    );
    ensure!(
        std::fs::read_to_string(input.join("file")).unwrap() == "original\n"
            && !input.join("new").exists(),
        "the input was modified"
    );
    Ok(())
}

#[test]
fn inputs_the_store_and_host_paths_cannot_be_written() {
    both(writes);
}

// --- a writable store laid over its inputs' mount points ---------------------------

fn layered_store(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let input = tmp.path().join("input");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("file"), "original\n").unwrap();
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(input.join("file"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let file_input = tmp.path().join("file-input");
    std::fs::write(&file_input, "a file\n").unwrap();
    std::fs::set_permissions(&file_input, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut build = Build::new(&tmp.path().join("builds"));
    let (scratch, work) = (tmp.path().join("store"), tmp.path().join("store-work"));
    for dir in [&scratch, &work] {
        std::fs::create_dir(dir).unwrap();
        if let Some((uid, gid)) = build.owner {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
        }
    }
    let spec = build
        .spec(&[
            "ls",
            "/nix/store",
            "write",
            "/nix/store/aaaa-input/file",
            "write",
            "/nix/store/bbbb-file",
            "write",
            "/nix/store/out",
            "mkdir",
            "/nix/store/outdir",
            "write",
            "/nix/store/outdir/x",
            "remount-rw",
            "/nix/store/aaaa-input",
            "ls",
            "/nix/store",
            "cat",
            "/proc/self/mountinfo",
        ])
        .bind_rw_layered(&scratch, &work, "/nix/store")
        .bind_ro(&input, "/nix/store/aaaa-input")
        .bind_ro(&file_input, "/nix/store/bbbb-file");
    let (status, out) = run(spec);
    ensure!(status.success(), "{status:?}\n{out}");
    ensure!(
        nth(&out, "ls ", 0) == "ls ok aaaa-input bbbb-file",
        "the store must show exactly the inputs\n{out}"
    );
    for (i, want) in [EROFS, EROFS, "ok 6", "ok 6"].into_iter().enumerate() {
        ensure!(
            nth(&out, "write ", i) == format!("write {want}"),
            "write #{i}: expected {want:?}\n{out}"
        );
    }
    expect(&out, "mkdir", "ok")?;
    expect(&out, "remount-rw", EPERM)?;
    ensure!(
        nth(&out, "ls ", 1) == "ls ok aaaa-input bbbb-file out outdir",
        "the outputs must appear beside the inputs\n{out}"
    );
    // Volatile: ending the sandbox must not sync (and flush) the host's disk.
    let store_mount = out
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/nix/store"))
        .unwrap_or("");
    ensure!(
        store_mount.contains(" overlay ") && store_mount.contains("volatile"),
        "the store must be a volatile overlay: {store_mount:?}\n{out}"
    );
    let mut left: Vec<String> = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    ensure!(
        left == ["out", "outdir"],
        "the host directory must receive the outputs and no mount points (an overlay in a \
         user namespace needs Linux 5.11 or later), found {left:?}"
    );
    ensure!(
        std::fs::read_to_string(input.join("file")).unwrap() == "original\n"
            && std::fs::read_to_string(&file_input).unwrap() == "a file\n",
        "an input was modified"
    );
    // Without inputs there are no mount points to keep off the disk: the
    // store is then the host directory itself, bound, without an overlay.
    let spec = build
        .spec(&["write", "/nix/store/alone", "cat", "/proc/self/mountinfo"])
        .bind_rw_layered(&scratch, &work, "/nix/store");
    let (status, out) = run(spec);
    ensure!(status.success(), "{status:?}\n{out}");
    expect(&out, "write", "ok 6")?;
    let store_mount = out
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/nix/store"))
        .unwrap_or("");
    ensure!(
        !store_mount.is_empty() && !store_mount.contains(" overlay "),
        "a store without inputs needs no overlay: {store_mount:?}\n{out}"
    );
    ensure!(
        scratch.join("alone").exists(),
        "the output must land in the host directory"
    );
    Ok(())
}

#[test]
fn a_layered_store_receives_only_the_outputs_and_its_inputs_stay_read_only() {
    both(layered_store);
}

// --- reading the host --------------------------------------------------------------

fn host_files(_caller: Caller) -> Result<(), String> {
    let (status, out) = run(probe(&[
        "exists",
        "/etc/shadow",
        "exists",
        "/root",
        "exists",
        "/home",
        "exists",
        "/work",
        "read",
        "/proc/1/root/etc/shadow",
        "ls",
        "/",
        "ls",
        "/etc",
    ]));
    ensure!(status.success(), "{status:?}\n{out}");
    for i in 0..4 {
        ensure!(
            nth(&out, "exists ", i) == "exists false",
            "host path visible: {out}"
        );
    }
    ensure!(nth(&out, "read ", 0).starts_with("read err"), "{out}");
    ensure!(
        nth(&out, "ls ", 0) == "ls ok bin dev etc lib lib64 probe proc tmp usr",
        "{out}"
    );
    ensure!(nth(&out, "ls ", 1) == "ls ok group hosts passwd", "{out}");
    Ok(())
}

#[test]
fn host_files_outside_the_declared_paths_are_not_visible() {
    assert!(
        Path::new("/etc/shadow").exists(),
        "the host must have /etc/shadow for this test"
    );
    both(host_files);
}

// --- network -------------------------------------------------------------------------

fn network(caller: Caller) -> Result<(), String> {
    // Servers on the host's loopback: TCP and an abstract Unix socket.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let name = format!("kiln-sandbox-test-{}-{:?}", std::process::id(), caller);
    let unix = std::os::unix::net::UnixListener::bind_addr(
        &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    tcp.set_nonblocking(true).unwrap();
    unix.set_nonblocking(true).unwrap();
    let serve = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut served = 0;
        while served < 2 && std::time::Instant::now() < deadline {
            if let Ok((mut s, _)) = tcp.accept() {
                let _ = s.write_all(b"secret\n");
                served += 1;
            }
            if let Ok((mut s, _)) = unix.accept() {
                let _ = s.write_all(b"secret\n");
                served += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let args = ["tcp", &port.to_string(), "unix-abstract", &name];
    let (_, out) = run(probe(&args));
    expect(&out, "tcp", ECONNREFUSED)?;
    expect(&out, "unix-abstract", ECONNREFUSED)?;
    // The same probe with the host network (a fixed-output build) reaches both,
    // which shows the servers were there.
    let (_, out) = run(probe(&args).network(Network::Host));
    expect(&out, "tcp", "ok secret")?;
    expect(&out, "unix-abstract", "ok")?;
    serve.join().unwrap();
    Ok(())
}

#[test]
fn builds_without_network_cannot_reach_host_loopback_tcp_or_abstract_sockets() {
    both(network);
}

// --- CVE-2024-27297 ---------------------------------------------------------------

fn fd_smuggling(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let name = format!("kiln-27297-{}-{:?}", std::process::id(), caller);
    // Two cooperating fixed-output builds: A opens its output and hands a
    // writable descriptor to B over an abstract socket; B rewrites it later.
    let mut a = Build::new(&tmp.path().join("a"));
    let mut b = Build::new(&tmp.path().join("b"));
    let mut sender = Sandbox::spawn(
        a.spec(&[
            "fd-send",
            &name,
            "/build/out",
            "daemon",
            "/build/late",
            "300",
        ])
        .network(Network::Host),
    )
    .map_err(|e| e.to_string())?;
    let mut receiver = Sandbox::spawn(
        b.spec(&["fd-recv", &name, "/build/go"])
            .network(Network::Host),
    )
    .map_err(|e| e.to_string())?;
    let mut receiver_out = receiver.take_output().unwrap();
    // Wait until B holds the descriptor, so the attack is really under way.
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("waiting") {
        let n = receiver_out.read(&mut buf).map_err(|e| e.to_string())?;
        ensure!(n > 0, "receiver ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    ensure!(
        seen.contains("recvfd ok"),
        "the descriptor was not passed: {seen}"
    );
    let mut sender_log = String::new();
    sender
        .take_output()
        .unwrap()
        .read_to_string(&mut sender_log)
        .unwrap();
    ensure!(sender.wait().unwrap().success(), "{sender_log}");
    // A is over: every process of it is gone, so the caller copies the output now
    // (to a new inode, as registration does) and checks that copy.
    let registered = tmp.path().join("registered");
    std::fs::copy(a.path().join("out"), &registered).unwrap();
    ensure!(
        std::fs::read_to_string(&registered).unwrap() == "good\n",
        "copy"
    );
    // Only now may B strike (a sleep would race with a slow machine).
    std::fs::write(b.path().join("go"), "").unwrap();
    receiver_out.read_to_string(&mut seen).unwrap();
    ensure!(receiver.wait().unwrap().success(), "{seen}");
    ensure!(
        seen.contains("rewrite ok"),
        "B rewrote A's build output after A ended: {seen}"
    );
    // B scribbled over the file A left behind, never over what was registered.
    ensure!(
        std::fs::read_to_string(a.path().join("out"))
            .unwrap()
            .starts_with("evil"),
        "attack ran"
    );
    ensure!(
        std::fs::read_to_string(&registered).unwrap() == "good\n",
        "registered output changed"
    );
    // A's daemon was killed with A.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(!a.path().join("late").exists(), "A's daemon survived A");
    Ok(())
}

#[test]
fn cve_2024_27297_fd_passed_between_fixed_output_builds_cannot_change_the_registered_output() {
    both(fd_smuggling);
}

// --- build directories ------------------------------------------------------------

fn build_dir_access(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let top = tmp.path().join("builds");
    let mut build = Build::new(&top);
    let meta = std::fs::symlink_metadata(&top).unwrap();
    ensure!(meta.mode() & 0o7777 == 0o700, "top mode {:o}", meta.mode());
    ensure!(meta.uid() == unsafe { libc::geteuid() }, "top owner");
    let outer = build.path().parent().unwrap().to_owned();
    ensure!(
        std::fs::metadata(&outer).unwrap().mode() & 0o777 == 0o700,
        "outer mode"
    );
    // The builder opens everything up and fails.
    let (status, out) = run(build.spec(&[
        "mkdir",
        "/build/sub",
        "write",
        "/build/sub/f",
        "chmod-plain",
        "/build/sub/f",
        "0777",
        "chmod-plain",
        "/build/sub",
        "0777",
        "chmod-plain",
        "/build",
        "0777",
        "exit",
        "1",
    ]));
    ensure!(status.code() == Some(1), "{out}");
    let sub = build.path().join("sub");
    ensure!(
        std::fs::metadata(&sub).unwrap().mode() & 0o777 == 0o777,
        "setup of the attack: {out}"
    );
    // CVE-2025-52992: a failed build's directory is kept with permissions reset.
    let owner = Some((unsafe { libc::geteuid() }, unsafe { libc::getegid() }));
    let kept = build
        .dir
        .take()
        .unwrap()
        .keep(owner)
        .map_err(|e| e.to_string())?;
    for p in [kept.clone(), kept.join("sub")] {
        let m = std::fs::metadata(&p).unwrap();
        ensure!(
            m.mode() & 0o7777 == 0o700,
            "{} has mode {:o}",
            p.display(),
            m.mode()
        );
        ensure!(Some((m.uid(), m.gid())) == owner, "{} owner", p.display());
    }
    let m = std::fs::metadata(kept.join("sub/f")).unwrap().mode();
    ensure!(m & 0o022 == 0, "file mode {m:o}");
    Ok(())
}

#[test]
fn cve_2024_38531_2025_52991_52992_build_dirs_are_private_and_reset_after_failure() {
    both(build_dir_access);
    // Other users cannot reach a build directory even when the builder made it 0777.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut build = Build::new(&tmp.path().join("builds"));
    let (status, out) =
        run(build.spec(&["chmod-plain", "/build", "0777", "write", "/build/secret"]));
    assert!(status.success(), "{out}");
    let target = build.path().join("secret");
    as_caller(Caller::Nobody, || {
        let e = std::fs::read(&target).unwrap_err();
        ensure!(
            e.kind() == std::io::ErrorKind::PermissionDenied,
            "nobody reached the build dir: {e}"
        );
        Ok(())
    })
    .unwrap();
    // The parent must be ours: one planted by another user, or a symlink, is refused.
    let planted = tmp.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(NOBODY), Some(NOBODY)).unwrap();
    assert!(matches!(
        kiln_sandbox::BuildDirs::open(&planted),
        Err(kiln_sandbox::BuildDirError::TopOwner { .. })
    ));
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("builds"), &link).unwrap();
    assert!(
        kiln_sandbox::BuildDirs::open(&link).is_err(),
        "a symlinked parent must be refused"
    );
}

fn symlink_cleanup(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), "keep me\n").unwrap();
    std::fs::set_permissions(
        victim.join("precious"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let victim_owner = std::fs::metadata(victim.join("precious")).unwrap().uid();
    let mut build = Build::new(&tmp.path().join("builds"));
    let v = victim.to_str().unwrap();
    let vp = victim.join("precious");
    let vp = vp.to_str().unwrap();
    // The builder plants symlinks to the host victim (by its host path) where the
    // cleanup and chown will walk, including a directory swapped for a link.
    let (status, out) = run(build.spec(&[
        "symlink",
        v,
        "/build/dirlink",
        "symlink",
        vp,
        "/build/filelink",
        "mkdir",
        "/build/sub",
        "symlink",
        v,
        "/build/sub/deeper",
        "chmod-plain",
        "/build/sub",
        "0000",
        "exit",
        "1",
    ]));
    ensure!(status.code() == Some(1), "{out}");
    let dir = build.dir.take().unwrap();
    dir.reset_permissions(Some((0, 0)).filter(|_| caller == Caller::Root))
        .map_err(|e| e.to_string())?;
    let path = dir.path().to_owned();
    dir.remove().map_err(|e| e.to_string())?;
    ensure!(
        !path.exists() && !path.parent().unwrap().exists(),
        "build dir left behind"
    );
    let m =
        std::fs::metadata(victim.join("precious")).map_err(|e| format!("victim deleted: {e}"))?;
    ensure!(
        m.mode() & 0o7777 == 0o640,
        "victim chmod-ed: {:o}",
        m.mode()
    );
    ensure!(m.uid() == victim_owner, "victim chown-ed");
    ensure!(
        std::fs::read_to_string(victim.join("precious")).unwrap() == "keep me\n",
        "victim"
    );
    Ok(())
}

#[test]
fn cve_2025_46415_52993_symlinks_planted_in_the_build_dir_do_not_redirect_cleanup_or_chown() {
    both(symlink_cleanup);
}

/// A recycled build directory comes back empty, private and re-owned, with
/// its siblings emptied, and recycling follows none of the builder's symlinks.
fn recycle(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), "keep me\n").unwrap();
    let mut build = Build::new(&tmp.path().join("builds"));
    let scratch = build
        .dir
        .as_ref()
        .unwrap()
        .sibling("store", build.owner)
        .map_err(|e| e.to_string())?;
    let v = victim.to_str().unwrap();
    let (status, out) = run(build.spec(&[
        "symlink",
        v,
        "/build/dirlink",
        "mkdir",
        "/build/sub",
        "symlink",
        v,
        "/build/sub/deeper",
        "write",
        "/build/sub/file",
        "chmod-plain",
        "/build/sub",
        "0000",
        "chmod-plain",
        "/build",
        "0777",
    ]));
    ensure!(status.success(), "{out}");
    std::fs::write(scratch.join("leftover"), "x").unwrap();
    std::os::unix::fs::symlink(&victim, scratch.join("link")).unwrap();
    let dir = build.dir.take().unwrap();
    let first = dir.path().to_owned();
    // What a builder may leave on the directories themselves: attributes
    // the next build would see.
    for d in [&first, &scratch] {
        set_user_xattr(d)?;
    }
    dir.recycle().map_err(|e| e.to_string())?;
    ensure!(is_empty_dir(&first)?, "recycled build dir not empty");
    ensure!(is_empty_dir(&scratch)?, "recycled sibling not empty");
    ensure!(
        std::fs::read_to_string(victim.join("precious"))
            .ok()
            .as_deref()
            == Some("keep me\n"),
        "victim harmed"
    );
    // The next build gets the same directory, private again and owned by its
    // own user; another prefix never gets it.
    let other = build
        .dirs
        .create("other", build.owner)
        .map_err(|e| e.to_string())?;
    ensure!(
        other.path() != first,
        "a recycled directory crossed prefixes"
    );
    let again = build
        .dirs
        .create("test", Some((0, 0)).filter(|_| caller == Caller::Root))
        .map_err(|e| e.to_string())?;
    ensure!(
        again.path() == first,
        "not reused: {}",
        again.path().display()
    );
    let scratch_again = again.sibling("store", None).map_err(|e| e.to_string())?;
    for d in [&first, &scratch_again] {
        ensure!(
            xattr_names(d).is_empty(),
            "{} kept attributes: {:?}",
            d.display(),
            String::from_utf8_lossy(&xattr_names(d))
        );
    }
    let m = std::fs::metadata(&first).unwrap();
    ensure!(m.mode() & 0o7777 == 0o700, "mode {:o}", m.mode());
    if caller == Caller::Root {
        ensure!(
            (m.uid(), m.gid()) == (0, 0),
            "owner {}:{}",
            m.uid(),
            m.gid()
        );
    }
    // Idle directories go with the last handle on their parent.
    again.recycle().map_err(|e| e.to_string())?;
    drop(other);
    let top = tmp.path().join("builds");
    drop(build);
    let left: Vec<_> = std::fs::read_dir(&top)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    ensure!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

fn is_empty_dir(path: &Path) -> Result<bool, String> {
    Ok(std::fs::read_dir(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .next()
        .is_none())
}

fn set_user_xattr(path: &Path) -> Result<(), String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: C strings and a value buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            c"user.kiln-test".as_ptr(),
            b"x".as_ptr().cast(),
            1,
            0,
        )
    };
    ensure!(
        rc == 0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The attribute names a builder could have set (`security.*` labels are
/// the system's own).
fn xattr_names(path: &Path) -> Vec<u8> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: a C string and a buffer of the given length.
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.max(0) as usize);
    buf.split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user.") || n.starts_with(b"system."))
        .flat_map(|n| n.iter().copied().chain([b' ']))
        .collect()
}

#[test]
fn recycled_build_dirs_are_emptied_without_following_symlinks_and_reowned() {
    both(recycle);
}

const FS_NOATIME_FL: libc::c_long = 0x80;

fn inode_flags(path: &Path) -> libc::c_long {
    let f = std::fs::File::open(path).unwrap();
    let mut flags: libc::c_long = 0;
    // SAFETY: a valid fd and a long for the kernel to fill.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    assert_eq!(
        rc,
        0,
        "{}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    flags
}

fn set_inode_flags(path: &Path, flags: libc::c_long) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a valid fd and a long for the kernel to read.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    assert_eq!(
        rc,
        0,
        "{}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Inode flags a builder set on its directories (its own: `chattr +A`
/// needs no privilege) do not reach the next build: such a directory is
/// made afresh instead of reused.
fn recycle_flags(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let mut build = Build::new(&tmp.path().join("builds"));
    let dir = build.dir.take().unwrap();
    let scratch = dir
        .sibling("store", build.owner)
        .map_err(|e| e.to_string())?;
    let first = dir.path().to_owned();
    for d in [&first, &scratch] {
        set_inode_flags(d, inode_flags(d) | FS_NOATIME_FL);
    }
    dir.recycle().map_err(|e| e.to_string())?;
    let again = build
        .dirs
        .create("test", build.owner)
        .map_err(|e| e.to_string())?;
    ensure!(
        inode_flags(again.path()) & FS_NOATIME_FL == 0,
        "a build dir kept a builder's inode flags"
    );
    // The sibling of a reused directory is checked the same way.
    let third_scratch = again
        .sibling("store", build.owner)
        .map_err(|e| e.to_string())?;
    set_inode_flags(&third_scratch, inode_flags(&third_scratch) | FS_NOATIME_FL);
    let path = again.path().to_owned();
    again.recycle().map_err(|e| e.to_string())?;
    let fourth = build
        .dirs
        .create("test", build.owner)
        .map_err(|e| e.to_string())?;
    ensure!(fourth.path() == path, "a clean directory was not reused");
    let scratch = fourth
        .sibling("store", build.owner)
        .map_err(|e| e.to_string())?;
    ensure!(
        inode_flags(&scratch) & FS_NOATIME_FL == 0,
        "a scratch store kept a builder's inode flags"
    );
    Ok(())
}

#[test]
fn recycled_build_dirs_keep_no_inode_flags_a_builder_set() {
    both(recycle_flags);
}

// --- processes ---------------------------------------------------------------------

fn daemons(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let mut build = Build::new(&tmp.path().join("builds"));
    let (status, out) = run(build.spec(&["daemon", "/build/daemon-was-here", "300"]));
    ensure!(status.success() && out.contains("daemon started"), "{out}");
    std::thread::sleep(Duration::from_millis(700));
    ensure!(
        !build.path().join("daemon-was-here").exists(),
        "the daemon outlived the build"
    );
    // Killing a running build kills its daemons too.
    let mut child =
        Sandbox::spawn(build.spec(&["daemon", "/build/killed-daemon", "300", "sleep", "10000"]))
            .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    child.kill().map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "kill took {:?}",
        started.elapsed()
    );
    ensure!(
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
        "{status:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !build.path().join("killed-daemon").exists(),
        "the daemon outlived the kill"
    );
    Ok(())
}

#[test]
fn daemons_that_double_fork_and_setsid_die_with_the_build_and_with_kill() {
    both(daemons);
}

fn privileged_calls(caller: Caller) -> Result<(), String> {
    let tmp = tempdir_for(caller);
    let input = tmp.path().join("input");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("file"), "original\n").unwrap();
    std::fs::set_permissions(input.join("file"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut build = Build::new(&tmp.path().join("builds"));
    let host_pid = std::process::id().to_string();
    let before = nix::unistd::gethostname().unwrap();
    let spec = build
        .spec(&[
            "write",
            "/build/f",
            "mknod",
            "/build/dev",
            "mknod-fifo",
            "/build/fifo",
            "mount",
            "/tmp",
            "ptrace",
            &host_pid,
            "init_module",
            "sethostname",
            "pwned",
            "hostname",
            // A nested user namespace makes us "root" again (its own mounts are
            // allowed and private to it); it must not help against anything else.
            "unshare",
            "remount-rw",
            "/nix/store/aaaa-input",
            "write",
            "/nix/store/aaaa-input/file",
            "chmod",
            "/build/f",
            "4755",
            "init_module",
            "mknod",
            "/build/dev2",
        ])
        .bind_ro(&input, "/nix/store/aaaa-input");
    let (status, out) = run(spec);
    ensure!(status.success(), "{status:?}\n{out}");
    ensure!(nth(&out, "mknod ", 0) == format!("mknod {EPERM}"), "{out}");
    expect(&out, "mknod-fifo", "ok")?;
    ensure!(nth(&out, "mount ", 0) == format!("mount {EPERM}"), "{out}");
    expect(&out, "ptrace", ESRCH)?;
    expect(&out, "kill", ESRCH)?;
    // EPERM, or ENOSYS on kernels built without module support.
    ensure!(
        nth(&out, "init_module ", 0).starts_with("init_module err"),
        "{out}"
    );
    ensure!(
        nth(&out, "finit_module ", 0).starts_with("finit_module err"),
        "{out}"
    );
    expect(&out, "sethostname", EPERM)?;
    expect(&out, "hostname", "localhost")?;
    // After unshare (allowed or not), everything stays refused.
    ensure!(
        nth(&out, "remount-rw ", 0).starts_with("remount-rw err"),
        "{out}"
    );
    ensure!(nth(&out, "write ", 1) == format!("write {EROFS}"), "{out}");
    expect(&out, "chmod", EPERM)?;
    ensure!(
        nth(&out, "init_module ", 1).starts_with("init_module err"),
        "{out}"
    );
    ensure!(nth(&out, "mknod ", 1).starts_with("mknod err"), "{out}");
    ensure!(
        std::fs::read_to_string(input.join("file")).unwrap() == "original\n",
        "input"
    );
    ensure!(
        nix::unistd::gethostname().unwrap() == before,
        "host hostname changed"
    );
    Ok(())
}

#[test]
fn mknod_mount_ptrace_module_loading_hostname_and_unshare_are_refused_or_contained() {
    both(privileged_calls);
}

fn host_views(caller: Caller) -> Result<(), String> {
    // A SysV message queue on the host.
    let key = 0x4b69_6c6e + if caller == Caller::Root { 0 } else { 1 };
    let id = unsafe { libc::msgget(key, libc::IPC_CREAT | 0o666) };
    ensure!(id >= 0, "msgget on the host");
    let (status, out) = run(probe(&[
        "pids",
        "msgget",
        &key.to_string(),
        "hostname",
        "status",
    ]));
    unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    ensure!(status.success(), "{out}");
    expect(&out, "pids", "[1, 2]")?;
    expect(&out, "msgget", ENOENT)?;
    let host = nix::unistd::gethostname().unwrap();
    ensure!(
        host != "localhost",
        "the host must have another hostname for this test"
    );
    expect(&out, "hostname", "localhost")?;
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        expect(&out, &format!("{set}:"), "\t0000000000000000").or_else(|_| {
            let l = line(&out, set);
            ensure!(l.ends_with("0000000000000000"), "{l}");
            Ok::<(), String>(())
        })?;
    }
    ensure!(line(&out, "NoNewPrivs:").ends_with('1'), "{out}");
    ensure!(line(&out, "Seccomp:").ends_with('2'), "{out}");
    expect(&out, "core", "0 0")?;
    Ok(())
}

#[test]
fn host_processes_ipc_and_hostname_are_invisible_and_privileges_gone() {
    both(host_views);
}

/// Mount points kept in a recycled sibling: a sandbox binds onto them as
/// they are; the next build gets exactly the ones it asks for; whatever a
/// builder put in their place is removed (never followed), not reused.
fn mount_points(caller: Caller) -> Result<(), String> {
    use std::ffi::CString;
    let tmp = tempdir_for(caller);
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), "keep me\n").unwrap();
    let input_dir = tmp.path().join("input-dir");
    std::fs::create_dir(&input_dir).unwrap();
    std::fs::write(input_dir.join("f"), "from the input\n").unwrap();
    let input_file = tmp.path().join("input-file");
    std::fs::write(&input_file, "a file input\n").unwrap();
    let point = |name: &str, is_dir: bool| (CString::new(name).unwrap(), is_dir);
    let mut build = Build::new(&tmp.path().join("builds"));
    let owner = build.owner;
    let scratch = build
        .dir
        .as_mut()
        .unwrap()
        .sibling_with_mount_points(
            "store",
            owner,
            [point("a", true), point("b", false), point("c", true)],
        )
        .map_err(|e| e.to_string())?;
    let ino = |name: &str| std::fs::symlink_metadata(scratch.join(name)).map(|m| m.ino());
    let (a, b) = (
        ino("a").map_err(|e| e.to_string())?,
        ino("b").map_err(|e| e.to_string())?,
    );
    let spec = build
        .spec(&[
            "cat",
            "/nix/store/a/f",
            "cat",
            "/nix/store/b",
            "ls",
            "/nix/store",
        ])
        .bind_rw(&scratch, "/nix/store")
        .bind_ro(&input_dir, "/nix/store/a")
        .bind_ro(&input_file, "/nix/store/b");
    let (status, out) = run(spec);
    ensure!(status.success(), "{out}");
    ensure!(
        out.contains("from the input") && out.contains("a file input"),
        "inputs not bound: {out}"
    );
    ensure!(
        ino("a").ok() == Some(a) && ino("b").ok() == Some(b),
        "mount points remade"
    );
    // What a builder could do to the ones nothing covered: replace them.
    std::fs::remove_dir(scratch.join("c")).unwrap();
    std::os::unix::fs::symlink(&victim, scratch.join("c")).unwrap();
    std::fs::remove_file(scratch.join("b")).unwrap();
    std::fs::create_dir(scratch.join("b")).unwrap();
    std::fs::write(scratch.join("junk"), "x").unwrap();
    let dir = build.dir.take().unwrap();
    dir.recycle().map_err(|e| e.to_string())?;
    let mut again = build
        .dirs
        .create("test", owner)
        .map_err(|e| e.to_string())?;
    let scratch = again
        .sibling_with_mount_points(
            "store",
            owner,
            [
                point("a", true),
                point("b", false),
                point("c", true),
                point("d", false),
            ],
        )
        .map_err(|e| e.to_string())?;
    let mut names: Vec<_> = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    ensure!(names == ["a", "b", "c", "d"], "entries {names:?}");
    ensure!(
        ino("a").ok() == Some(a),
        "an untouched mount point was not reused"
    );
    for (name, dir) in [("a", true), ("b", false), ("c", true), ("d", false)] {
        let m = std::fs::symlink_metadata(scratch.join(name)).unwrap();
        ensure!(
            m.is_dir() == dir && (dir || m.is_file() && m.len() == 0),
            "{name} is not an empty {}",
            if dir { "directory" } else { "file" }
        );
    }
    ensure!(is_empty_dir(&scratch.join("c"))?, "c is not empty");
    ensure!(
        ino("b").map_err(|e| e.to_string())? == ino("d").map_err(|e| e.to_string())?,
        "file mount points are not links to one inode"
    );
    ensure!(
        std::fs::read_to_string(victim.join("precious"))
            .ok()
            .as_deref()
            == Some("keep me\n"),
        "victim harmed"
    );
    // Not wanted any more: removed.
    let scratch = again
        .sibling_with_mount_points("store", owner, [point("b", false)])
        .map_err(|e| e.to_string())?;
    let names: Vec<_> = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    ensure!(names == ["b"], "entries {names:?}");
    Ok(())
}

#[test]
fn recycled_mount_points_are_reused_and_never_trusted_blindly() {
    both(mount_points);
}
