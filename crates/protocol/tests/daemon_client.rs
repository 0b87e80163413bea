//! The daemon client against Kiln's own daemon, in process: the shared
//! store behaviour tests pass through the wire exactly as on the local
//! store, and malformed input leaves the daemon serving.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use kiln_protocol::client::DaemonStore;
use kiln_protocol::server::Daemon;
use kiln_protocol::wire;
use kiln_protocol::worker;
use kiln_store::Store;
use kiln_store::local::LocalStore;

struct Served {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    _runtime: tokio::runtime::Runtime,
}

fn serve() -> Served {
    serve_as(true)
}

/// A daemon whose clients are `trusted` or not.
fn serve_as(trusted: bool) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open_root(dir.path().join("root")).unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = Arc::new(Daemon::new(
        store,
        Default::default(),
        runtime.handle().clone(),
    ));
    let socket = dir.path().join("socket");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let daemon = daemon.clone();
            std::thread::spawn(move || {
                let input = stream.try_clone().unwrap();
                let _ = daemon.serve_connection(trusted, input, &stream);
            });
        }
    });
    Served {
        _dir: dir,
        socket,
        _runtime: runtime,
    }
}

#[test]
fn shared_store_behaviour_through_the_daemon() {
    let served = serve();
    let store = DaemonStore::new(&served.socket);
    let version = store.ping().unwrap().unwrap();
    assert!(version.contains("Kiln"), "{version}");
    let scratch = tempfile::tempdir().unwrap();
    kiln_store::testing::run_behaviour_tests(&store, scratch.path());
}

#[test]
fn pipelined_path_info_queries_answer_as_single_ones() {
    let served = serve();
    let store = DaemonStore::new(&served.socket);
    let none = kiln_formats::store_path::StorePathSet::new();
    // More paths than the window holds, valid and missing ones interleaved,
    // each with references so the answers differ in length.
    let mut paths = Vec::new();
    let mut last = none.clone();
    for i in 0..(3 * kiln_protocol::client::QUERY_WINDOW + 7) {
        let info = store
            .add_text(&format!("p{i}"), format!("path {i}\n").as_bytes(), &last)
            .unwrap();
        let missing = kiln_formats::store_path::StorePath::from_base_name(&format!(
            "{}-gone-{i}",
            &info.path.base_name()[..32].replace(|c: char| c != '0', "1")
        ))
        .unwrap();
        last = [info.path.clone()].into_iter().collect();
        paths.push(info.path);
        paths.push(missing);
    }
    let batch = store.query_path_infos(&paths).unwrap();
    let single: Vec<_> = paths
        .iter()
        .filter_map(|p| store.query_path_info(p).unwrap())
        .collect();
    assert_eq!(batch.len(), paths.len() / 2);
    assert_eq!(batch, single);
    // The connection is in step afterwards.
    assert!(store.is_valid_path(&paths[0]).unwrap());
    assert!(store.query_path_infos(&[]).unwrap().is_empty());
}

fn handshake(stream: &mut UnixStream) {
    wire::write_u64(stream, worker::WORKER_MAGIC_1).unwrap();
    wire::write_u64(stream, (1 << 8) | 34).unwrap();
    wire::write_u64(stream, 0).unwrap();
    wire::write_u64(stream, 0).unwrap();
    assert_eq!(wire::read_u64(stream).unwrap(), worker::WORKER_MAGIC_2);
    wire::read_u64(stream).unwrap();
    wire::read_string(stream).unwrap();
    assert_eq!(wire::read_u64(stream).unwrap(), worker::STDERR_LAST);
}

#[test]
fn unknown_and_malformed_requests_get_errors_and_the_daemon_goes_on() {
    let served = serve();
    // An unknown operation: an error, then the connection closes.
    let mut s = UnixStream::connect(&served.socket).unwrap();
    handshake(&mut s);
    wire::write_u64(&mut s, 999).unwrap();
    match worker::read_log_message(&mut s, (1 << 8) | 34).unwrap() {
        worker::LogMessage::Error { message, .. } => assert!(message.contains("999"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // A request that cannot be decoded (not a store path): an error, and
    // the connection closes, since its arguments may be out of step.
    let mut s = UnixStream::connect(&served.socket).unwrap();
    handshake(&mut s);
    wire::write_u64(&mut s, 1).unwrap();
    wire::write_bytes(&mut s, b"/tmp/not-a-store-path").unwrap();
    s.flush().unwrap();
    assert!(matches!(
        worker::read_log_message(&mut s, (1 << 8) | 34).unwrap(),
        worker::LogMessage::Error { .. }
    ));
    // An operation that fails (the NAR of an invalid path): an error, and
    // the connection goes on.
    let store = DaemonStore::new(&served.socket);
    let missing = store
        .store_dir()
        .parse_path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-missing")
        .unwrap();
    assert!(store.query_path_info(&missing).unwrap().is_none());
    assert!(store.nar_from_path(&missing, &mut Vec::new()).is_err());
    // The same pooled connection still answers after the error.
    assert!(!store.is_valid_path(&missing).unwrap());
    // A garbage client: the daemon survives it.
    let mut s = UnixStream::connect(&served.socket).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(s);
    assert!(!store.is_valid_path(&missing).unwrap());
}

/// An untrusted client's unsigned paths are refused as a batch
/// (AddMultipleToStore) with Nix's words, none becomes valid, and the
/// daemon goes on serving the client.
#[test]
fn untrusted_batches_need_signatures() {
    use kiln_formats::hash::{Hash, HashAlgo};
    use kiln_formats::nar::Node;
    use kiln_store::{AddOptions, PathInfo, StoreError};

    let served = serve_as(false);
    let store = DaemonStore::new(&served.socket);
    let mut infos = Vec::new();
    let mut nars = std::collections::HashMap::new();
    for i in 0..3 {
        let nar = Node::file(format!("unsigned {i}").into_bytes()).to_nar();
        let path = store
            .store_dir()
            .make_path(
                "output:out",
                &Hash::digest(HashAlgo::Sha256, &nar),
                &format!("unsigned-{i}"),
            )
            .unwrap();
        let info = PathInfo::new(path, Hash::digest(HashAlgo::Sha256, &nar), nar.len() as u64);
        nars.insert(info.path.clone(), nar);
        infos.push(info);
    }
    let source = |info: &PathInfo, out: &mut dyn Write| {
        out.write_all(&nars[&info.path])
            .map_err(|source| StoreError::Stream {
                action: "write a test NAR",
                source,
            })
    };
    let err = store
        .add_nars(&infos, &source, AddOptions::default(), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lacks a signature by a trusted key"), "{err}");
    for info in &infos {
        assert!(!store.is_valid_path(&info.path).unwrap(), "{}", info.path);
    }
}
