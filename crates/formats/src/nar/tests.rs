//! Unit and property tests of the NAR writer, reader, restorer and listing.

use std::fs;
use std::io::{BufReader, Cursor, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::hash::HashAlgo;

/// Encodes tokens the way a NAR does, so that tests can build broken archives.
fn s(token: &[u8]) -> Vec<u8> {
    let mut out = (token.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(token);
    out.extend_from_slice(padding(token.len() as u64));
    out
}

fn nar(parts: &[&[u8]]) -> Vec<u8> {
    parts.iter().flat_map(|p| s(p)).collect()
}

fn u64le(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

fn problem_of(bytes: &[u8]) -> ReadError {
    read_node(bytes).expect_err("the archive should be rejected")
}

/// A directory NAR with one entry per name, each an empty regular file.
fn dir_with(names: &[&[u8]]) -> Vec<u8> {
    let mut out = nar(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for name in names {
        out.extend(nar(&[b"entry", b"(", b"name", name, b"node"]));
        out.extend(nar(&[b"(", b"type", b"regular", b"contents"]));
        out.extend(u64le(0));
        out.extend(nar(&[b")", b")"]));
    }
    out.extend(s(b")"));
    out
}

fn symlink_nar(target: &[u8]) -> Vec<u8> {
    nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        target,
        b")",
    ])
}

fn sample_tree() -> Node {
    Node::directory([
        (
            "d",
            Node::directory([
                ("f", Node::executable(b"hello\n".to_vec())),
                ("l", Node::symlink("f")),
            ]),
        ),
        ("e8", Node::file(b"12345678".to_vec())),
    ])
}

#[test]
fn encodes_exactly_as_nix_does() {
    // `nix-store --dump` of this tree made on disk by Nix 2.8 has this hash
    // and length.
    let bytes = sample_tree().to_nar();
    assert_eq!(bytes.len(), 872);
    assert_eq!(
        crate::hash::Hash::digest(HashAlgo::Sha256, &bytes).to_nixbase32(),
        "05pzxbhxghljhp27xqvjchfkqs2ig83v0kg6v473s35f1rjq4pgq"
    );
    let file = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    let mut expected = file.clone();
    expected.extend(u64le(3));
    expected.extend(b"abc\0\0\0\0\0");
    expected.extend(s(b")"));
    assert_eq!(Node::file(b"abc".to_vec()).to_nar(), expected);
}

#[test]
fn dumps_a_tree_on_disk_like_its_description() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    materialise(&sample_tree(), &root);
    let dumped = dump_path(&root, Vec::new()).unwrap();
    assert_eq!(dumped, sample_tree().to_nar());
    let (hash, size) = hash_path(&root, HashAlgo::Sha256).unwrap();
    assert_eq!(size, dumped.len() as u64);
    assert_eq!(
        hash.to_nixbase32(),
        "05pzxbhxghljhp27xqvjchfkqs2ig83v0kg6v473s35f1rjq4pgq"
    );
}

/// `dump_path_read` hands over the same bytes as `dump_path`, in reads of
/// any size, with the hash and size computed on the helper thread.
#[test]
fn dump_path_read_gives_the_nar_and_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    let big: Vec<u8> = (0..(5 << 20) + 3).map(|i| (i * 13 % 251) as u8).collect();
    let tree = Node::directory([("big", Node::file(big)), ("tree", sample_tree())]);
    materialise(&tree, &root);
    let expected = tree.to_nar();
    for step in [1, 4096, 1 << 20, usize::MAX] {
        let (read, hashed) = dump_path_read(&root, HashAlgo::Sha256, |nar| {
            let mut out = Vec::new();
            loop {
                let buf = nar.fill_buf().unwrap();
                if buf.is_empty() {
                    break out;
                }
                let n = buf.len().min(step);
                out.extend_from_slice(&buf[..n]);
                nar.consume(n);
            }
        });
        assert!(read == expected, "reads of {step} bytes");
        let (hash, size) = hashed.unwrap();
        assert_eq!((hash, size), hash_path(&root, HashAlgo::Sha256).unwrap());
        assert_eq!(size, expected.len() as u64);
    }

    // A reader that stops early stops the helper, which says so.
    let (first, hashed) =
        dump_path_read(&root, HashAlgo::Sha256, |nar| nar.fill_buf().unwrap().len());
    assert!(first > 0);
    assert!(matches!(hashed, Err(WriteError::Output(_))), "{hashed:?}");

    // A tree that cannot be read ends the NAR early, and the error names it.
    let (read, hashed) = dump_path_read(
        Path::new("/nonexistent/kiln-test"),
        HashAlgo::Sha256,
        |nar| {
            let mut out = Vec::new();
            nar.read_to_end(&mut out).unwrap();
            out
        },
    );
    assert!(read.len() < 16, "{} bytes", read.len());
    assert!(
        hashed
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/kiln-test")
    );
}

#[test]
fn dumps_a_symlink_itself_not_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("l");
    symlink("/nonexistent/target", &link).unwrap();
    assert_eq!(
        dump_path(&link, Vec::new()).unwrap(),
        Node::symlink("/nonexistent/target").to_nar()
    );
}

#[test]
fn only_the_owners_execute_bit_makes_a_file_executable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, b"x").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o655)).unwrap();
    assert_eq!(
        dump_path(&file, Vec::new()).unwrap(),
        Node::file(b"x".to_vec()).to_nar()
    );
    fs::set_permissions(&file, fs::Permissions::from_mode(0o500)).unwrap();
    assert_eq!(
        dump_path(&file, Vec::new()).unwrap(),
        Node::executable(b"x".to_vec()).to_nar()
    );
}

#[test]
fn refuses_fifos_and_sockets_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("a-fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let err = dump_path(dir.path(), Vec::new()).unwrap_err();
    assert!(
        matches!(&err, WriteError::UnsupportedFileType { path, kind: "FIFO" } if *path == fifo),
        "{err}"
    );
    assert!(err.to_string().contains("a-fifo"), "{err}");
    fs::remove_file(&fifo).unwrap();

    let socket = dir.path().join("sub/a-socket");
    fs::create_dir(dir.path().join("sub")).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let err = dump_path(dir.path(), Vec::new()).unwrap_err();
    assert!(
        matches!(&err, WriteError::UnsupportedFileType { path, kind: "socket" } if *path == socket),
        "{err}"
    );
}

#[test]
fn a_missing_path_is_named() {
    let err = dump_path(Path::new("/nonexistent/kiln-test"), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kiln-test"), "{err}");
}

#[test]
fn large_files_stream_through() {
    let dir = tempfile::tempdir().unwrap();
    let contents: Vec<u8> = (0..3 * 1024 * 1024 + 5)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let tree = Node::directory([
        ("big", Node::file(contents.clone())),
        ("small", Node::file(b"s".to_vec())),
    ]);
    materialise(&tree, &dir.path().join("t"));
    let bytes = dump_path(&dir.path().join("t"), Vec::new()).unwrap();
    assert_eq!(bytes, tree.to_nar());

    // Read it back through a reader that yields a few bytes at a time.
    let mut reader = NarReader::new(Trickle(Cursor::new(&bytes)));
    let mut seen = Vec::new();
    while let Some(event) = reader.next().unwrap() {
        if let Event::Regular {
            path, mut contents, ..
        } = event
        {
            let name = path.to_vec();
            let mut data = Vec::new();
            contents.read_to_end(&mut data).unwrap();
            seen.push((name, data));
        }
    }
    assert_eq!(
        seen,
        vec![
            (b"big".to_vec(), contents),
            (b"small".to_vec(), b"s".to_vec())
        ]
    );
}

/// A reader that returns at most 3 bytes per call.
struct Trickle<R>(R);

impl<R: Read> Read for Trickle<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(3);
        self.0.read(&mut buf[..n])
    }
}

#[test]
fn unread_contents_are_skipped() {
    let tree = Node::directory([("a", Node::file(vec![1; 100])), ("b", Node::symlink("a"))]);
    let bytes = tree.to_nar();
    let mut reader = NarReader::new(&bytes[..]);
    let mut paths = Vec::new();
    while let Some(event) = reader.next().unwrap() {
        if let Event::Regular { mut contents, .. } = event {
            let mut first = [0u8; 10];
            contents.read_exact(&mut first).unwrap();
            assert_eq!(contents.remaining(), 90);
        } else {
            paths.push(String::from_utf8(event.path().to_vec()).unwrap());
        }
    }
    assert_eq!(paths, ["", "b", ""]);
}

#[test]
fn embedded_archives_leave_the_rest_of_the_stream() {
    let mut bytes = sample_tree().to_nar();
    let len = bytes.len();
    bytes.extend(b"rest of the stream");
    let mut reader = NarReader::embedded(BufReader::new(&bytes[..]));
    while reader.next().unwrap().is_some() {}
    assert_eq!(reader.offset(), len as u64);
    let mut rest = String::new();
    reader.into_inner().read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "rest of the stream");
}

#[test]
fn rejects_bad_magic() {
    let err = problem_of(&nar(&[
        b"nix-archive-2",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"x",
        b")",
    ]));
    assert!(
        matches!(err.problem(), Problem::BadMagic { found } if found == "'nix-archive-2'"),
        "{err}"
    );
    assert_eq!(err.offset(), 0);
    let mut absurd = u64le(u64::MAX);
    absurd.extend(b"whatever");
    let err = problem_of(&absurd);
    assert!(matches!(err.problem(), Problem::BadMagic { .. }), "{err}");
    assert!(matches!(problem_of(b"").problem(), Problem::Truncated));
}

#[test]
fn rejects_unknown_tokens() {
    let err = problem_of(&nar(&[b"nix-archive-1", b"(", b"type", b"fifo", b")"]));
    assert!(
        matches!(err.problem(), Problem::UnexpectedToken { found, .. } if found == "'fifo'"),
        "{err}"
    );
    assert_eq!(err.offset(), 24 + 16 + 16);
    assert!(err.to_string().contains("at byte 56"), "{err}");

    let err = problem_of(&nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"regular",
        b"executable",
        b"x",
    ]));
    assert!(
        matches!(err.problem(), Problem::UnexpectedToken { .. }),
        "{err}"
    );
    let err = problem_of(&nar(&[b"nix-archive-1", b"[", b"type"]));
    assert!(
        matches!(err.problem(), Problem::UnexpectedToken { .. }),
        "{err}"
    );
    let mut bytes = nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"a",
    ]);
    bytes.extend(u64le(1 << 40));
    let err = problem_of(&bytes);
    assert!(
        matches!(err.problem(), Problem::UnexpectedToken { found, .. } if found.contains("1099511627776 bytes")),
        "{err}"
    );
}

#[test]
fn rejects_unsorted_and_duplicate_entries() {
    read_node(&dir_with(&[b"A", b"B", b"a", b"b\xff"])[..]).unwrap();
    let err = problem_of(&dir_with(&[b"b", b"a"]));
    assert!(
        matches!(err.problem(), Problem::UnsortedEntry { previous, name } if previous == "b" && name == "a"),
        "{err}"
    );
    let err = problem_of(&dir_with(&[b"a", b"b", b"b"]));
    assert!(
        matches!(err.problem(), Problem::DuplicateEntry(name) if name == "b"),
        "{err}"
    );
    // Byte order, not locale order: "B" (0x42) sorts before "a" (0x61).
    let err = problem_of(&dir_with(&[b"a", b"B"]));
    assert!(
        matches!(err.problem(), Problem::UnsortedEntry { .. }),
        "{err}"
    );
}

#[test]
fn rejects_bad_names() {
    type Check = fn(&Problem) -> bool;
    let cases: [(&[u8], Check); 6] = [
        (b"", |p| matches!(p, Problem::EmptyName)),
        (b".", |p| matches!(p, Problem::ReservedName("."))),
        (b"..", |p| matches!(p, Problem::ReservedName(".."))),
        (b"a/b", |p| matches!(p, Problem::NameWithSlash(_))),
        (b"a\0b", |p| matches!(p, Problem::NameWithNul(_))),
        (&[b'n'; 256], |p| {
            matches!(p, Problem::NameTooLong { len: 256 })
        }),
    ];
    for (name, is_expected) in cases {
        let err = problem_of(&dir_with(&[b"0", name]));
        assert!(is_expected(err.problem()), "{name:?}: {err}");
        // The error points at the name's length field (after the first
        // entry, `entry`, `(` and `name`), in the directory.
        let first_entry_end = dir_with(&[b"0"]).len() - 16;
        assert_eq!(err.offset(), (first_entry_end + 3 * 16) as u64, "{err}");
        assert_eq!(err.path(), "");
    }
    read_node(&dir_with(&[&[b'n'; 255]])[..]).unwrap();
    let mut absurd = nar(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
    ]);
    absurd.extend(u64le(u64::MAX));
    assert!(matches!(
        problem_of(&absurd).problem(),
        Problem::NameTooLong { len: u64::MAX }
    ));
}

#[test]
fn rejects_nesting_deeper_than_64() {
    fn nested(depth: usize) -> Node {
        (0..depth).fold(Node::file(Vec::new()), |inner, _| {
            Node::directory([("d", inner)])
        })
    }
    // 64 directories below the root's entries: the file is the 64th component.
    read_node(&nested(64).to_nar()[..]).unwrap();
    let err = problem_of(&nested(65).to_nar());
    assert!(matches!(err.problem(), Problem::TooDeep), "{err}");
    assert_eq!(err.path(), vec!["d"; 64].join("/"));
}

#[test]
fn rejects_bad_symlink_targets() {
    read_node(&symlink_nar(&[b'x'; 4095])[..]).unwrap();
    let err = problem_of(&symlink_nar(&[b'x'; 4096]));
    assert!(
        matches!(err.problem(), Problem::TargetTooLong { len: 4096 }),
        "{err}"
    );
    assert!(matches!(
        problem_of(&symlink_nar(b"a\0b")).problem(),
        Problem::TargetWithNul(_)
    ));
    assert!(matches!(
        problem_of(&symlink_nar(b"")).problem(),
        Problem::EmptyTarget
    ));
    let mut absurd = nar(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target"]);
    absurd.extend(u64le(u64::MAX - 3));
    assert!(matches!(
        problem_of(&absurd).problem(),
        Problem::TargetTooLong { .. }
    ));
}

#[test]
fn rejects_non_zero_padding() {
    // In a token.
    let mut bytes = symlink_nar(b"abc");
    let target_at = bytes.len() - 16 - 8;
    bytes[target_at + 5] = 1;
    let err = problem_of(&bytes);
    assert!(matches!(err.problem(), Problem::NonZeroPadding), "{err}");
    assert_eq!(err.offset(), target_at as u64 + 3);
    // After file contents.
    let mut bytes = Node::file(b"abc".to_vec()).to_nar();
    let at = bytes.len() - 16 - 1;
    bytes[at] = 0xff;
    assert!(matches!(
        problem_of(&bytes).problem(),
        Problem::NonZeroPadding
    ));
}

#[test]
fn rejects_every_truncation() {
    let bytes = sample_tree().to_nar();
    for len in 0..bytes.len() {
        let err = problem_of(&bytes[..len]);
        assert!(
            matches!(err.problem(), Problem::Truncated),
            "at {len}: {err}"
        );
    }
    let mut huge = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
    huge.extend(u64le(u64::MAX));
    huge.extend(b"a few bytes");
    assert!(matches!(problem_of(&huge).problem(), Problem::Truncated));
}

#[test]
fn rejects_trailing_data() {
    let mut bytes = sample_tree().to_nar();
    let len = bytes.len();
    bytes.push(0);
    let err = problem_of(&bytes);
    assert!(matches!(err.problem(), Problem::TrailingData), "{err}");
    assert_eq!(err.offset(), len as u64);
    let err = list(&bytes[..]).unwrap_err();
    assert!(matches!(err.problem(), Problem::TrailingData), "{err}");
}

#[test]
fn truncated_contents_fail_the_copy() {
    let bytes = Node::file(vec![7; 100]).to_nar();
    let dir = tempfile::tempdir().unwrap();
    let err = restore(&bytes[..bytes.len() - 60], &dir.path().join("out")).unwrap_err();
    assert!(
        matches!(&err, RestoreError::Read(e) if matches!(e.problem(), Problem::Truncated)),
        "{err}"
    );
}

#[test]
fn restores_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    restore(&sample_tree().to_nar()[..], &out).unwrap();
    assert_eq!(fs::read(out.join("d/f")).unwrap(), b"hello\n");
    assert_ne!(
        fs::metadata(out.join("d/f")).unwrap().permissions().mode() & 0o100,
        0
    );
    assert_eq!(
        fs::metadata(out.join("e8")).unwrap().permissions().mode() & 0o111,
        0
    );
    assert_eq!(fs::read_link(out.join("d/l")).unwrap(), Path::new("f"));
    assert_eq!(dump_path(&out, Vec::new()).unwrap(), sample_tree().to_nar());
}

#[test]
fn restore_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let err = restore(&sample_tree().to_nar()[..], dir.path()).unwrap_err();
    assert!(
        matches!(&err, RestoreError::Exists(p) if p == dir.path()),
        "{err}"
    );
    let dangling = dir.path().join("dangling");
    symlink("nowhere", &dangling).unwrap();
    assert!(matches!(
        restore(&sample_tree().to_nar()[..], &dangling),
        Err(RestoreError::Exists(_))
    ));
}

#[test]
fn lists_a_tree_with_offsets_of_contents() {
    let bytes = sample_tree().to_nar();
    let listing = list(&bytes[..]).unwrap();
    let Some(ListNode::Regular {
        size: 6,
        executable: true,
        nar_offset,
    }) = listing.get(b"/d/f")
    else {
        panic!("unexpected listing {listing:?}");
    };
    let at = *nar_offset as usize;
    assert_eq!(&bytes[at..at + 6], b"hello\n");
    assert_eq!(
        listing.get(b"d/l"),
        Some(&ListNode::Symlink {
            target: b"f".to_vec()
        })
    );
    assert!(
        matches!(listing.get(b""), Some(ListNode::Directory { entries }) if entries.len() == 2)
    );
    assert_eq!(listing.get(b"d/f/x"), None);
    assert_eq!(listing.get(b"nope"), None);
}

/// Writes `node` to disk at `path` (which must not exist).
fn materialise(node: &Node, path: &Path) {
    match node {
        Node::Regular {
            executable,
            contents,
        } => {
            fs::write(path, contents).unwrap();
            let mode = if *executable { 0o755 } else { 0o644 };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        }
        Node::Symlink { target } => symlink(std::ffi::OsStr::from_bytes(target), path).unwrap(),
        Node::Directory { entries } => {
            fs::create_dir(path).unwrap();
            for (name, child) in entries {
                materialise(child, &path.join(std::ffi::OsStr::from_bytes(name)));
            }
        }
    }
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    // Odd bytes on purpose: spaces, newlines, high bytes that are not UTF-8,
    // multi-byte UTF-8, and characters that sort between ASCII letters.
    let byte = prop_oneof![
        4 => prop::sample::select(b"abAB09._-~ \n\t\\'\"".to_vec()),
        1 => 1u8..=255u8,
    ]
    .prop_filter("no '/' or NUL in names", |b| *b != b'/' && *b != 0);
    prop_oneof![
        8 => prop::collection::vec(byte, 1..12),
        1 => "[é☃😀a]{1,4}".prop_map(String::into_bytes),
        1 => prop::collection::vec(Just(b'x'), 255..=255),
    ]
    .prop_filter("not '.' or '..'", |n| n != b"." && n != b"..")
}

fn contents() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        (0usize..4).prop_map(|n| vec![b'8'; n * 8]),
        prop::collection::vec(any::<u8>(), 65530..65545),
    ]
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, 1..64)
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (any::<bool>(), contents()).prop_map(|(executable, contents)| Node::Regular {
            executable,
            contents
        }),
        target().prop_map(|target| Node::Symlink { target }),
        Just(Node::Directory {
            entries: Default::default()
        }),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop::collection::btree_map(name(), inner, 0..6)
            .prop_map(|entries| Node::Directory { entries })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn description_round_trips(tree in node()) {
        let bytes = tree.to_nar();
        prop_assert_eq!(read_node(&bytes[..]).unwrap(), tree);
        prop_assert!(list(&bytes[..]).is_ok());
    }

    #[test]
    fn disk_tree_round_trips(tree in node()) {
        let dir = tempfile::tempdir().unwrap();
        let original = dir.path().join("original");
        materialise(&tree, &original);
        let dumped = dump_path(&original, Vec::new()).unwrap();
        prop_assert_eq!(&dumped, &tree.to_nar());
        let restored = dir.path().join("restored");
        restore(&dumped[..], &restored).unwrap();
        prop_assert_eq!(dump_path(&restored, Vec::new()).unwrap(), dumped);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_node(&bytes[..]);
        let mut prefixed = b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0".to_vec();
        prefixed.extend(&bytes);
        let _ = read_node(&prefixed[..]);
    }

    #[test]
    fn corrupted_archives_never_panic(tree in node(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = tree.to_nar();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(read) = read_node(&bytes[..]) {
            // Whatever still parses must re-encode to the same bytes: a NAR
            // has exactly one encoding.
            prop_assert_eq!(read.to_nar(), bytes);
        }
    }
}
