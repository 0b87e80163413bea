//! Fuzz target for the daemon's connection handler
//! (`kiln_protocol::server::Daemon::serve_connection`): whatever a client
//! sends after a well-formed handshake — malformed frames, unknown
//! operations, absurd lengths, truncated NARs — must end in an answer or an
//! error, never a panic, a hang or an unbounded allocation.
//!
//! The first byte picks the client's protocol minor version (21–38), so
//! every version's field layout is exercised; the rest is the request
//! stream. The store is a throwaway local store shared by all runs.
#![no_main]

use std::sync::{Arc, OnceLock};

use kiln_protocol::server::Daemon;
use kiln_protocol::worker;
use kiln_store::local::LocalStore;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    daemon: Daemon,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory for the store");
        let store = LocalStore::open_root(dir.path().join("root")).expect("a throwaway store");
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let daemon = Daemon::new(Arc::new(store), Default::default(), runtime.handle().clone());
        Fixture {
            daemon,
            _dir: dir,
            _runtime: runtime,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&v, rest)) = data.split_first() else {
        return;
    };
    let minor = 21 + u64::from(v) % 18;
    let mut input = Vec::with_capacity(rest.len() + 40);
    input.extend_from_slice(&worker::WORKER_MAGIC_1.to_le_bytes());
    input.extend_from_slice(&((1u64 << 8) | minor).to_le_bytes());
    if minor >= 38 {
        input.extend_from_slice(&0u64.to_le_bytes()); // no features
    }
    input.extend_from_slice(&0u64.to_le_bytes()); // CPU affinity
    input.extend_from_slice(&0u64.to_le_bytes()); // reserveSpace
    input.extend_from_slice(rest);
    // Untrusted: the fuzzer must not be able to collect garbage or build.
    let _ = fixture()
        .daemon
        .serve_connection(false, &input[..], std::io::sink());
});
