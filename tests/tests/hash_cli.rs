//! `kiln hash path/file/convert/to-*` against Nix 2.8's `nix hash …`.
//!
//! Over a few trees (nested directories, empty ones, executables, symlinks,
//! files around block sizes) and files, for every algorithm and every output
//! flag, Kiln prints exactly what Nix prints; conversions between all
//! encodings agree with `nix hash to-base16/to-base32/to-base64/to-sri`,
//! including which inputs both refuse.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::{NixStore, kiln_bin};

const ALGOS: [&str; 4] = ["md5", "sha1", "sha256", "sha512"];
const FORMAT_FLAGS: [&[&str]; 6] = [
    &[],
    &["--base16"],
    &["--base32"],
    &["--base64"],
    &["--sri"],
    // Nix lets the last flag win.
    &["--base64", "--base16"],
];

/// Bytes that are the same on every run but not trivially regular.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_file(path: &Path, len: usize, seed: u64, executable: bool) {
    fs::write(path, pseudo_random(len, seed)).unwrap();
    if executable {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Trees and files to hash: returns (paths for `hash path`, files for `hash file`).
fn make_inputs(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("sub/deeper/deepest")).unwrap();
    fs::create_dir_all(tree.join("empty")).unwrap();
    for (i, len) in [0usize, 1, 7, 8, 9, 4095, 4096, 65_537, (1 << 20) + 3]
        .into_iter()
        .enumerate()
    {
        write_file(&tree.join(format!("file-{len}")), len, i as u64, false);
        write_file(
            &tree.join(format!("sub/exe-{len}")),
            len,
            100 + i as u64,
            true,
        );
    }
    write_file(&tree.join("sub/deeper/deepest/leaf"), 300, 7, false);
    symlink("../file-8", tree.join("sub/link")).unwrap();
    symlink("/nonexistent/dangling", tree.join("dangling")).unwrap();
    fs::write(tree.join("name with spaces and ünïcode"), "x").unwrap();

    let empty_dir = dir.join("empty-dir");
    fs::create_dir(&empty_dir).unwrap();
    let lone_exe = dir.join("lone-exe");
    write_file(&lone_exe, 1000, 42, true);
    let top_link = dir.join("top-link");
    symlink("tree/file-8", &top_link).unwrap();

    let files = vec![
        tree.join("file-0"),
        tree.join("file-1"),
        tree.join("file-65537"),
        tree.join(format!("file-{}", (1 << 20) + 3)),
        lone_exe.clone(),
        // `hash file` follows a symlink to its target.
        top_link.clone(),
    ];
    let paths = vec![tree, empty_dir, lone_exe, top_link, files[3].clone()];
    (paths, files)
}

struct Peers {
    kiln: PathBuf,
    nix: NixStore,
}

impl Peers {
    fn new() -> Peers {
        Peers {
            nix: NixStore::new(),
            kiln: kiln_bin(),
        }
    }

    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(&self.kiln).args(args).output().unwrap()
    }

    fn nix(&self, args: &[&str]) -> Output {
        self.nix.command("nix").args(args).output().unwrap()
    }

    /// Runs both; both must succeed with the same output, which is returned.
    fn same(&self, kiln_args: &[&str], nix_args: &[&str]) -> String {
        let (ours, theirs) = (self.kiln(kiln_args), self.nix(nix_args));
        let describe = |o: &Output| {
            format!(
                "{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        assert!(
            theirs.status.success(),
            "nix {nix_args:?} failed: {}",
            describe(&theirs)
        );
        assert!(
            ours.status.success(),
            "kiln {kiln_args:?} failed: {}",
            describe(&ours)
        );
        let text = String::from_utf8(theirs.stdout).unwrap();
        assert_eq!(
            String::from_utf8(ours.stdout).unwrap(),
            text,
            "kiln {kiln_args:?} vs nix {nix_args:?}"
        );
        text
    }
}

fn strs(paths: &[PathBuf]) -> Vec<&str> {
    paths.iter().map(|p| p.to_str().unwrap()).collect()
}

#[test]
fn hash_path_and_file_print_what_nix_prints() {
    let peers = Peers::new();
    let scratch = tempfile::tempdir().unwrap();
    let (paths, files) = make_inputs(scratch.path());

    for command in ["path", "file"] {
        let inputs = strs(if command == "path" { &paths } else { &files });
        for flags in FORMAT_FLAGS {
            for algo in ALGOS {
                let mut args = vec!["hash", command, "--type", algo];
                args.extend(flags);
                args.extend(&inputs);
                let printed = peers.same(&args, &args);
                assert_eq!(printed.lines().count(), inputs.len(), "{printed}");
            }
            // Without --type: sha256.
            let mut args = vec!["hash", command];
            args.extend(flags);
            args.extend(&inputs);
            peers.same(&args, &args);
        }
    }
}

#[test]
fn hash_errors_where_nix_errors() {
    let peers = Peers::new();
    let scratch = tempfile::tempdir().unwrap();
    let (paths, _) = make_inputs(scratch.path());
    let tree = paths[0].to_str().unwrap();
    let missing = scratch.path().join("missing");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["hash", "file", tree],
        vec!["hash", "path", missing],
        vec!["hash", "file", missing],
        vec!["hash", "path", "--type", "sha3", tree],
    ] {
        let (ours, theirs) = (peers.kiln(&args), peers.nix(&args));
        assert!(!theirs.status.success(), "nix {args:?} succeeded");
        assert!(!ours.status.success(), "kiln {args:?} succeeded");
        assert!(!ours.stderr.is_empty(), "kiln {args:?} said nothing");
    }
}

#[test]
fn hash_conversions_agree_with_nix_to_commands() {
    let peers = Peers::new();
    let scratch = tempfile::tempdir().unwrap();
    let (_, files) = make_inputs(scratch.path());
    let files = strs(&files);

    let targets = [
        ("to-base16", "base16"),
        ("to-base32", "nix32"),
        ("to-base64", "base64"),
        ("to-sri", "sri"),
    ];
    for algo in ALGOS {
        // Every encoding of every file's hash, each with and without its algorithm.
        let mut typed = Vec::new();
        let mut bare = Vec::new();
        for (flag, prefix) in [
            ("--base16", true),
            ("--base32", true),
            ("--base64", true),
            ("--sri", false),
        ] {
            let mut args = vec!["hash", "file", "--type", algo, flag];
            args.extend(&files);
            let printed = peers.same(&args, &args);
            for digest in printed.lines() {
                if prefix {
                    typed.push(format!("{algo}:{digest}"));
                    bare.push(digest.to_owned());
                } else {
                    typed.push(digest.to_owned());
                }
            }
        }
        let typed: Vec<&str> = typed.iter().map(String::as_str).collect();
        let bare: Vec<&str> = bare.iter().map(String::as_str).collect();

        for (nix_command, format) in targets {
            let mut nix_args = vec!["hash", nix_command];
            nix_args.extend(&typed);
            let mut kiln_args = vec!["hash", "convert", "--to", format];
            kiln_args.extend(&typed);
            let expected = peers.same(&kiln_args, &nix_args);
            // The conversion is the same hash whichever encoding it came from.
            let distinct: std::collections::BTreeSet<&str> = expected.lines().collect();
            assert_eq!(distinct.len(), files.len(), "{expected}");
            peers.same(&nix_args, &nix_args);

            let mut nix_args = vec!["hash", nix_command, "--type", algo];
            nix_args.extend(&bare);
            let mut kiln_args = vec!["hash", "convert", "--to", format, "--type", algo];
            kiln_args.extend(&bare);
            peers.same(&kiln_args, &nix_args);
            peers.same(&nix_args, &nix_args);
        }
    }
}

#[test]
fn conversions_refuse_what_nix_refuses() {
    let peers = Peers::new();
    let sha256 = "sha256-KKIFswzF6QvQIdpE3wYrjM42+o16ZFmVfecHTLIIzP0=";
    let base16 = "28a205b30cc5e90bd021da44df062b8cce36fa8d7a6459957de7074cb208ccfd";
    let cases: [&[&str]; 6] = [
        // A bare digest without --type.
        &[base16],
        // An algorithm other than the one --type names.
        &["--type", "sha1", sha256],
        &["sha256:zzzz"],
        &["sha256:28a205b30cc5e90bd021da44df062b8cce36fa8d7a6459957de7074cb208ccf"],
        &["sha3:28a205b30cc5e90bd021da44df062b8cce36fa8d7a6459957de7074cb208ccfd"],
        &["sha256-!!!!"],
    ];
    for case in cases {
        let mut nix_args = vec!["hash", "to-base32"];
        nix_args.extend(case);
        let mut kiln_args = vec!["hash", "convert", "--to", "nix32"];
        kiln_args.extend(case);
        assert!(!peers.nix(&nix_args).status.success(), "nix {nix_args:?}");
        let ours = peers.kiln(&kiln_args);
        assert!(!ours.status.success(), "kiln {kiln_args:?}");
        let stderr = String::from_utf8_lossy(&ours.stderr);
        assert!(stderr.contains("hash"), "kiln {kiln_args:?}: {stderr}");
        assert!(!peers.kiln(&nix_args).status.success(), "kiln {nix_args:?}");
    }
    // --from must name the encoding the hash is in.
    peers.same(
        &["hash", "convert", "--from", "sri", "--to", "nix32", sha256],
        &["hash", "to-base32", sha256],
    );
    assert!(
        !peers
            .kiln(&[
                "hash", "convert", "--from", "base16", "--to", "nix32", sha256
            ])
            .status
            .success()
    );
}

#[test]
fn every_hash_command_has_help() {
    let peers = Peers::new();
    for command in [
        "path",
        "file",
        "convert",
        "to-base16",
        "to-base32",
        "to-base64",
        "to-sri",
    ] {
        let output = peers.kiln(&["hash", command, "--help"]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "kiln hash {command} --help failed");
        assert!(text.contains("Usage: kiln hash"), "{command}: {text}");
    }
    assert!(peers.kiln(&["hash", "--help"]).status.success());
}
