//! What a sandboxed program sees: its user, root, /dev, /proc, /etc, hostname,
//! environment, output and exit status.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn runs_program_and_reports_exit_status_and_output() {
    let (status, out) = run(probe(&["echo", "hello", "id", "exit", "3"]));
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(out.contains("hello\n"), "{out}");
    assert!(
        out.contains("err:hello\n"),
        "stderr goes to the same pipe: {out}"
    );
    assert_eq!(line(&out, "id "), "id 1000 100 1000 100");
}

#[test]
fn signals_and_umask_of_the_caller_do_not_leak_into_the_build() {
    // The test harness ignores SIGPIPE (as every Rust program does); block one more.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // Read by a C program: the probe, being Rust, ignores SIGPIPE itself.
    let spec = SandboxSpec::new("/usr/bin/grep").args(["-E", "^(Sig|Umask)", "/proc/self/status"]);
    let (_, out) = run(with_host_usr(spec));
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    assert_eq!(line(&out, "SigBlk:"), "SigBlk:\t0000000000000000");
    assert_eq!(line(&out, "SigIgn:"), "SigIgn:\t0000000000000000");
    assert_eq!(line(&out, "Umask:"), "Umask:\t0022");
}

#[test]
fn generated_etc_files_match_nix() {
    let (_, out) = run(probe(&[
        "cat",
        "/etc/passwd",
        "cat",
        "/etc/group",
        "cat",
        "/etc/hosts",
    ]));
    assert_eq!(
        out,
        "root:x:0:0:Nix build user:/build:/noshell\n\
         nixbld:x:1000:100:Nix build user:/build:/noshell\n\
         nobody:x:65534:65534:Nobody:/:/noshell\n\
         root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n\
         127.0.0.1 localhost\n::1 localhost\n"
    );
}

#[test]
fn pidfd_becomes_readable_when_the_sandbox_ends() {
    use std::os::fd::AsRawFd;
    let mut child = Sandbox::spawn(probe(&["sleep", "100"])).unwrap();
    let fd = child.pidfd().unwrap();
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "still running");
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "ended");
    assert!(child.wait().unwrap().success());
}

use std::io::Read;
use std::os::unix::fs::MetadataExt;

use kiln_sandbox::{
    CgroupLimits, CgroupStatus, Output, Sandbox, SandboxMode, SandboxSpec, SpawnError,
};

#[test]
fn environment_cwd_and_arguments_are_exactly_those_given() {
    let tmp = tempfile::tempdir().unwrap();
    let mut build = Build::new(&tmp.path().join("b"));
    let spec = build
        .spec(&["env", "echo", "two words"])
        .env("PATH", "/path-not-set")
        .env("NIX_BUILD_TOP", "/build");
    let (status, out) = run(spec);
    assert!(status.success(), "{out}");
    let env: Vec<&str> = out.lines().filter(|l| l.starts_with("env ")).collect();
    assert_eq!(env, ["env PATH=/path-not-set", "env NIX_BUILD_TOP=/build"]);
    assert_eq!(line(&out, "cwd "), "cwd /build");
    assert!(out.contains("\ntwo words\n"), "{out}");
}

#[test]
fn files_the_builder_creates_belong_to_the_mapped_build_user() {
    let tmp = tempfile::tempdir().unwrap();
    let mut build = Build::new(&tmp.path().join("b"));
    let owner = build.owner.expect("runs as root");
    let (status, out) = run(build.spec(&["write", "/build/f"]));
    assert!(status.success(), "{out}");
    let m = std::fs::metadata(build.path().join("f")).unwrap();
    assert_eq!((m.uid(), m.gid()), owner);
    assert!(owner.0 >= kiln_sandbox::uid::FIRST_UID);
}

#[test]
fn concurrent_sandboxes_get_distinct_uid_ranges() {
    let a = Sandbox::spawn(probe(&["sleep", "300"])).unwrap();
    let b = Sandbox::spawn(probe(&["sleep", "300"])).unwrap();
    let (ra, rb) = (a.uid_range().unwrap(), b.uid_range().unwrap());
    assert_ne!(ra.slot(), rb.slot());
    assert_ne!(a.host_ids(), b.host_ids());
}

#[test]
fn a_pty_is_the_controlling_terminal_when_asked_for() {
    let mut child = Sandbox::spawn(probe(&["tty"]).output(Output::Pty)).unwrap();
    let mut master = child.take_output().unwrap();
    let mut out = Vec::new();
    // Reading the master ends with EIO once the last slave holder is gone.
    let _ = master.read_to_end(&mut out);
    assert!(child.wait().unwrap().success());
    assert_eq!(String::from_utf8_lossy(&out).trim(), "tty 1");
    let (_, out) = run(probe(&["tty"]));
    assert_eq!(out.trim(), "tty 0", "a pipe is not a terminal");
}

#[test]
fn spawn_errors_name_what_failed() {
    match Sandbox::spawn(probe(&[]).cwd("/build")) {
        Err(SpawnError::Setup { what, .. }) => assert!(what.contains("Chdir"), "{what}"),
        other => panic!("expected a setup error, got {other:?}"),
    }
    match Sandbox::spawn(SandboxSpec::new("/no/such/program")) {
        Err(SpawnError::Exec { program, source }) => {
            assert_eq!(program, std::path::Path::new("/no/such/program"));
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected an exec error, got {other:?}"),
    }
    let missing = "/no/such/host/path";
    let e = Sandbox::spawn(probe(&["true"]).sandbox_path(missing)).unwrap_err();
    assert!(e.to_string().contains(missing), "{e}");
    // Optional paths (`?`) and relaxed mode leave missing paths out.
    let (status, _) = run(probe(&["true"]).sandbox_path(&format!("{missing}?")));
    assert!(status.success());
    let (status, _) = run(probe(&["true"])
        .sandbox_path(missing)
        .mode(SandboxMode::Relaxed));
    assert!(status.success());
    let (status, out) = run(probe(&["exists", "/etc/sh", "exists", "/inside/usr-bin"])
        .sandbox_path("/etc/sh=/bin/sh")
        .sandbox_path("/inside/usr-bin=/usr/bin"));
    assert!(status.success());
    assert_eq!(out, "exists true\nexists true\n");
    assert!(matches!(
        Sandbox::spawn(probe(&[]).bind_ro("/usr", "relative")),
        Err(SpawnError::Plan(_))
    ));
    // A source whose kind the caller gave is not looked at before the
    // sandbox opens it: a missing one is still named then.
    let store = tempfile::tempdir().unwrap();
    std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let in_store = |spec: SandboxSpec| spec.bind_rw(store.path(), "/nix/store");
    let e = Sandbox::spawn(in_store(probe(&["true"])).bind_ro_known(
        "/no/such/input",
        "/nix/store/input",
        true,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("/no/such/input"), "{e}");
    // A bind below the store directory names its whole target, though init
    // reaches it by its name alone (here a file said to be a directory).
    let file = store.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    match Sandbox::spawn(in_store(probe(&["true"])).bind_ro_known(&file, "/nix/store/input", true))
    {
        Err(SpawnError::Setup { what, .. }) => assert!(
            what.starts_with("bind-mounting") && what.ends_with("/nix/store/input"),
            "{what}"
        ),
        other => panic!("expected a setup error, got {other:?}"),
    }
}

#[test]
fn sandbox_off_runs_on_the_host_only_when_asked() {
    let (status, out) = run(SandboxSpec::new(PROBE)
        .args(["id", "exists", "/work"])
        .cwd("/")
        .mode(SandboxMode::Off));
    assert!(status.success(), "{out}");
    assert!(line(&out, "id ").starts_with("id 0 0"), "{out}");
    assert_eq!(line(&out, "exists"), "exists true");
}

#[test]
fn spawning_fails_closed_when_user_namespaces_are_unavailable() {
    // Simulate a machine without user namespaces: a forked child whose seccomp
    // filter refuses them.
    let verdict = as_caller(Caller::Nobody, || {
        // clone with CLONE_NEWUSER fails with EPERM, as with a disabled sysctl.
        let new_user = libc::CLONE_NEWUSER as u64;
        let cond = seccompiler::SeccompCondition::new(
            0,
            seccompiler::SeccompCmpArgLen::Qword,
            seccompiler::SeccompCmpOp::MaskedEq(new_user),
            new_user,
        )
        .unwrap();
        let mut rules = std::collections::BTreeMap::new();
        rules.insert(
            libc::SYS_clone,
            vec![seccompiler::SeccompRule::new(vec![cond]).unwrap()],
        );
        rules.insert(libc::SYS_unshare, vec![]);
        let filter = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(libc::EPERM as u32),
            seccompiler::TargetArch::x86_64,
        )
        .unwrap();
        let prog: seccompiler::BpfProgram = filter.try_into().unwrap();
        seccompiler::apply_filter(&prog).unwrap();
        match Sandbox::spawn(probe(&["true"])) {
            Err(e @ SpawnError::Setup { .. }) => {
                let msg = e.to_string();
                ensure!(
                    msg.contains("creating the namespaces") && msg.contains("max_user_namespaces"),
                    "{msg}"
                );
                Ok(())
            }
            Err(e) => Err(format!("wrong error: {e}")),
            Ok(_) => Err("the sandbox started without namespaces".into()),
        }
    });
    verdict.unwrap();
}

#[test]
fn cgroup_is_best_effort_and_says_what_is_missing() {
    let limits = CgroupLimits {
        memory_max: Some(256 << 20),
        pids_max: Some(64),
    };
    let mut child = Sandbox::spawn(probe(&["sleep", "50"]).cgroup(limits)).unwrap();
    let status = child.cgroup_status().clone();
    child.wait().unwrap();
    match status {
        CgroupStatus::Active => assert!(child.cpu_usage_usec().is_some()),
        CgroupStatus::Partial(why) => {
            assert!(why.contains("controller"), "{why}");
            assert!(
                child.cpu_usage_usec().is_some(),
                "accounting works without controllers"
            );
        }
        CgroupStatus::Unavailable(why) => assert!(!why.is_empty()),
        CgroupStatus::NotRequested => panic!("a cgroup was requested"),
    }
    let child = Sandbox::spawn(probe(&["true"])).unwrap();
    assert_eq!(child.cgroup_status(), &CgroupStatus::NotRequested);
}

#[test]
fn the_exit_status_arrives_after_the_spawning_thread_is_gone() {
    // Init shares the caller's memory and, with it, the spawning thread's
    // thread pointer. A 64 MiB stack is more than glibc caches, so it is
    // unmapped when the thread is joined: an init that still used that
    // thread's block (glibc's errno or cancellation state) would crash here
    // rather than pass the builder's status on.
    let mut child = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| Sandbox::spawn(probe(&["sleep", "300", "exit", "5"])).unwrap())
        .unwrap()
        .join()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5), "{status:?}");
}
