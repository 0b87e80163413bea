//! Network namespaces kept from one sandbox for the next (as root): only a
//! namespace whose build used no network is handed out again.
//!
//! A test binary of its own, with one test: sandboxes started by other tests in
//! the same process would take kept namespaces in between.

mod common;

use std::io::Read;

use common::*;
use kiln_sandbox::Sandbox;

/// The namespace a probe ran in (`net:[inode]`), and its whole output.
fn netns_of(args: &[&str]) -> (String, String) {
    let mut all = vec!["netns"];
    all.extend_from_slice(args);
    let (status, out) = run(probe(&all));
    assert!(status.success() || !args.is_empty(), "{status:?}: {out}");
    let ns = line(&out, "netns ").trim_start_matches("netns ").to_owned();
    (ns, out)
}

fn thread_netns() -> std::path::PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

fn lo_counters(out: &str) -> String {
    let lo = out
        .lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .unwrap_or_else(|| panic!("no loopback in /proc/net/dev:\n{out}"));
    lo.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
}

#[test]
fn a_network_namespace_is_handed_on_only_while_no_build_has_used_it() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs as root (as CI does)"
    );
    let (first, out) = netns_of(&["cat", "/proc/net/dev"]);
    let zero = lo_counters(&out);
    assert!(
        zero.split(' ').all(|n| n == "0"),
        "a new loopback has counted nothing: {zero}"
    );

    // Unused (reading /proc/net is no use): the next sandbox gets it.
    let (again, _) = netns_of(&[]);
    assert_eq!(again, first, "an unused namespace is kept");

    // Traffic on the loopback: the next sandbox gets a new namespace, which
    // shows none of it.
    let (used, out) = netns_of(&["tcp", "1"]);
    assert_eq!(used, first);
    assert!(
        out.contains(&format!("tcp err {}", libc::ECONNREFUSED)),
        "{out}"
    );
    let (after_traffic, out) = netns_of(&["cat", "/proc/net/dev"]);
    assert_ne!(
        after_traffic, first,
        "a namespace with traffic is not reused"
    );
    assert_eq!(lo_counters(&out), zero);

    // No packet at all, but a failed attempt to reach the outside is counted
    // (OutNoRoutes): not reused either.
    let (used, out) = netns_of(&["tcp", "192.0.2.1:80"]);
    assert_eq!(used, after_traffic);
    assert!(
        out.contains(&format!("tcp err {}", libc::ENETUNREACH)),
        "{out}"
    );
    let (after_no_route, _) = netns_of(&[]);
    assert_ne!(after_no_route, after_traffic);
    let (used, out) = netns_of(&["tcp", "[2001:db8::1]:80"]);
    assert_eq!(used, after_no_route);
    assert!(out.contains("tcp err "), "{out}");
    let (after_no_route6, _) = netns_of(&[]);
    assert_ne!(after_no_route6, after_no_route);

    // The build cannot change the namespace's settings: it belongs to a user
    // namespace where the sandbox has no capability.
    let (used, out) = netns_of(&["write", "/proc/sys/net/ipv4/ping_group_range"]);
    assert_eq!(used, after_no_route6);
    assert!(out.contains("write err "), "{out}");
    let (still, _) = netns_of(&[]);
    assert_eq!(still, after_no_route6);

    // Sandboxes alive at the same time never share one.
    let mut a = Sandbox::spawn(probe(&["netns", "sleep", "300"])).expect("spawn");
    let mut b = Sandbox::spawn(probe(&["netns"])).expect("spawn");
    let read = |c: &mut kiln_sandbox::Child| {
        let mut out = String::new();
        c.take_output().unwrap().read_to_string(&mut out).unwrap();
        c.wait().unwrap();
        line(&out, "netns ").to_owned()
    };
    let (ns_b, ns_a) = (read(&mut b), read(&mut a));
    assert_ne!(ns_a, ns_b, "two live sandboxes share a network namespace");
    assert!(
        [&ns_a, &ns_b].contains(&&format!("netns {still}")),
        "the kept namespace serves one of them: {ns_a}, {ns_b}, {still}"
    );

    // The spawning thread ends in the namespace it started in, even one of
    // its own.
    let before = thread_netns();
    netns_of(&[]);
    assert_eq!(thread_netns(), before);
    std::thread::spawn(move || {
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let mine = thread_netns();
        assert_ne!(mine, before);
        netns_of(&[]);
        assert_eq!(
            thread_netns(),
            mine,
            "the thread was moved to another namespace"
        );
    })
    .join()
    .unwrap();
}
