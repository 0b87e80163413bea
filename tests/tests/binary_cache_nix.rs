//! Binary caches between Kiln and Nix 2.8, both directions, every compression.
//!
//! - Kiln copies (substitutes) a closure from a `file://` cache that Nix's
//!   `nix copy --to` wrote with xz (the default), zstd, bzip2 and none,
//!   checking the signatures: with the cache's key trusted it succeeds and
//!   the paths equal Nix's; with another key it fails and registers nothing.
//! - Nix's `nix copy --from file://…` reads caches Kiln wrote, with Kiln's
//!   signatures checked by Nix.
//! - Nix's `nix copy --from http://127.0.0.1:PORT` fetches a closure from
//!   `kiln store serve-cache`, accepting it with the server's key trusted
//!   and refusing it with another key.
//! - A malformed narinfo or a truncated NAR gives Kiln a clear error and
//!   leaves nothing registered.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use kiln_e2e::{NixStore, kiln_bin};
use serde_json::Value;

/// A closure of input-addressed paths (so only signatures vouch for them):
/// `top` refers to `mid` and a text file, `mid` to `dep`, which holds a
/// few megabytes so NARs stream in many chunks.
const EXPRESSION: &str = r#"
let
  sh = "/bin/sh";
  note = builtins.toFile "kiln-cache-note.txt" "a note";
  dep = derivation {
    name = "kiln-cache-dep";
    system = builtins.currentSystem;
    builder = sh;
    PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir $out; head -c 3000000 /dev/urandom > $out/blob; echo hi > $out/small; ln -s small $out/link" ];
  };
  mid = derivation {
    name = "kiln-cache-mid";
    system = builtins.currentSystem;
    builder = sh;
    PATH = "/usr/bin:/bin";
    args = [ "-c" "echo ${dep} > $out" ];
  };
in derivation {
  name = "kiln-cache-top";
  system = builtins.currentSystem;
  builder = sh;
  PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir -p $out/bin; echo '#!/bin/sh' > $out/bin/run; echo ${mid} ${note} >> $out/bin/run; chmod +x $out/bin/run" ];
}
"#;

const COMPRESSIONS: [&str; 4] = ["xz", "zstd", "bzip2", "none"];

/// `kiln store --store URL ARGS…`.
fn kiln(store: &str, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .args(["store", "--store", store])
        .args(args)
        .env_remove("KILN_TRUSTED_PUBLIC_KEYS")
        .stdin(Stdio::null())
        .output()
        .expect("cannot run kiln")
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stderr ---\n{}--- stdout ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(what: &str, out: Output) -> String {
    assert!(
        !out.status.success(),
        "{what} should have failed but succeeded\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Fixture {
    /// Nix's store holding the built closure.
    nix: NixStore,
    scratch: tempfile::TempDir,
    top: String,
    /// The closure of `top`, as Nix lists it.
    closure: Vec<String>,
    secret_key: PathBuf,
    public_key: String,
    other_public_key: String,
}

fn fixture() -> Fixture {
    let nix = NixStore::new();
    let scratch = tempfile::tempdir().unwrap();
    let expr = scratch.path().join("closure.nix");
    fs::write(&expr, EXPRESSION).unwrap();
    let top = nix
        .nix_build([std::ffi::OsStr::new("--no-out-link"), expr.as_os_str()])
        .unwrap_or_else(|e| panic!("nix-build of the cache fixture failed: {e}"))
        .trim()
        .to_owned();
    let closure: Vec<String> = nix
        .nix_store(["--query", "--requisites", &top])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(closure.len(), 4, "dep, mid, note and top: {closure:?}");
    let keys = |name: &str| -> (PathBuf, String) {
        let sk = scratch.path().join(format!("{name}.sk"));
        let pk = scratch.path().join(format!("{name}.pk"));
        nix.nix_store([
            "--generate-binary-cache-key".as_ref(),
            name.as_ref(),
            sk.as_os_str(),
            pk.as_os_str(),
        ])
        .unwrap();
        (sk, fs::read_to_string(pk).unwrap().trim().to_owned())
    };
    let (secret_key, public_key) = keys("kiln-test-cache-1");
    let (_, other_public_key) = keys("kiln-test-cache-1-other");
    Fixture {
        nix,
        scratch,
        top,
        closure,
        secret_key,
        public_key,
        other_public_key,
    }
}

/// `nix path-info --json -r` of `top` in the store at `url`, as
/// path → (narHash, narSize, references, ca): what a copy must keep.
fn closure_facts(
    nix: &NixStore,
    url: &str,
    top: &str,
) -> Vec<(String, Value, Value, Value, Value)> {
    let json = nix
        .nix(["path-info", "--store", url, "--json", "-r", top])
        .unwrap_or_else(|e| panic!("nix path-info in {url}: {e}"));
    let infos: Vec<Value> = serde_json::from_str(&json).unwrap();
    let mut facts: Vec<_> = infos
        .into_iter()
        .map(|i| {
            (
                i["path"].as_str().unwrap().to_owned(),
                i["narHash"].clone(),
                i["narSize"].clone(),
                i["references"].clone(),
                i.get("ca").cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    facts.sort_by(|a, b| a.0.cmp(&b.0));
    facts
}

impl Fixture {
    fn dir(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// A Kiln store URL rooted in the scratch directory.
    fn kiln_store(&self, name: &str) -> String {
        format!("local?root={}", self.dir(name).display())
    }

    fn check_contents(&self, url: &str) {
        self.nix
            .nix_store(["--store", url, "--verify", "--check-contents"])
            .unwrap_or_else(|e| panic!("nix-store --verify --check-contents of {url}: {e}"));
    }

    fn assert_same_closure(&self, url: &str) {
        assert_eq!(
            closure_facts(&self.nix, url, &self.top),
            closure_facts(&self.nix, &self.nix.url(), &self.top),
            "the closure in {url} differs from Nix's original"
        );
        self.check_contents(url);
    }

    /// Valid paths of a Kiln store, through Kiln.
    fn kiln_valid_paths(&self, url: &str) -> Vec<String> {
        ok(
            "kiln store path-info --all",
            kiln(url, &["path-info", "--all"]),
        )
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// Nix writes the closure to a `file://` cache with `compression`.
    fn nix_writes_cache(&self, name: &str, compression: &str) -> PathBuf {
        let dir = self.dir(name);
        let mut url = format!(
            "file://{}?secret-key={}",
            dir.display(),
            self.secret_key.display()
        );
        if compression != "xz" {
            // xz is Nix's default: leave it implicit.
            url.push_str(&format!("&compression={compression}"));
        }
        self.nix
            .nix(["copy", "--to", &url, &self.top])
            .unwrap_or_else(|e| panic!("nix copy --to {url}: {e}"));
        dir
    }
}

#[test]
fn kiln_substitutes_from_caches_nix_wrote() {
    let f = fixture();
    for compression in COMPRESSIONS {
        let cache = f.nix_writes_cache(&format!("nix-cache-{compression}"), compression);
        let narinfo_of_top = fs::read_to_string(cache.join(format!(
            "{}.narinfo",
            &Path::new(&f.top).file_name().unwrap().to_str().unwrap()[..32]
        )))
        .unwrap();
        assert!(
            narinfo_of_top.contains(&format!("Compression: {compression}\n")),
            "Nix wrote another compression than {compression}:\n{narinfo_of_top}"
        );
        let from = format!("file://{}", cache.display());

        // Another key trusted: refused, nothing registered.
        let refused = f.kiln_store(&format!("kiln-refused-{compression}"));
        let stderr = failed(
            "kiln copy with the wrong key trusted",
            kiln(
                &refused,
                &[
                    "copy",
                    "--from",
                    &from,
                    "--trusted-public-keys",
                    &f.other_public_key,
                    &f.top,
                ],
            ),
        );
        assert!(
            stderr.contains("not signed by any trusted key")
                && stderr.contains("kiln-test-cache-1"),
            "{compression}: unclear refusal: {stderr}"
        );
        assert!(
            f.kiln_valid_paths(&refused).is_empty(),
            "{compression}: refused copy registered paths"
        );

        // The cache's key trusted: the whole closure arrives intact.
        let store = f.kiln_store(&format!("kiln-{compression}"));
        ok(
            "kiln copy --from a Nix cache",
            kiln(
                &store,
                &[
                    "copy",
                    "--from",
                    &from,
                    "--trusted-public-keys",
                    &f.public_key,
                    &f.top,
                ],
            ),
        );
        let mut valid = f.kiln_valid_paths(&store);
        valid.sort();
        let mut expected = f.closure.clone();
        expected.sort();
        assert_eq!(valid, expected, "{compression}");
        f.assert_same_closure(&store);
    }

    // Without --trusted-public-keys, the keys come from nix.conf, as
    // Nix's own do: refused with Nix's default key only, accepted once
    // nix.conf trusts the cache's key.
    let from = format!("file://{}", f.dir("nix-cache-xz").display());
    let conf_dir = f.dir("nix-conf-trusting");
    fs::create_dir_all(&conf_dir).unwrap();
    fs::write(
        conf_dir.join("nix.conf"),
        format!("extra-trusted-public-keys = {}\n", f.public_key),
    )
    .unwrap();
    let empty_conf = f.dir("nix-conf-empty");
    fs::create_dir_all(&empty_conf).unwrap();
    for (conf, trusted) in [(&empty_conf, false), (&conf_dir, true)] {
        let store = f.kiln_store(&format!("kiln-nix-conf-{trusted}"));
        let out = Command::new(kiln_bin())
            .args(["store", "--store", &store, "copy", "--from", &from, &f.top])
            .env_remove("KILN_TRUSTED_PUBLIC_KEYS")
            .env_remove("NIX_CONFIG")
            .env("NIX_CONF_DIR", conf)
            .env("NIX_USER_CONF_FILES", conf.join("none.conf"))
            .stdin(Stdio::null())
            .output()
            .expect("cannot run kiln");
        if trusted {
            ok("kiln copy trusting nix.conf's keys", out);
            assert_eq!(f.kiln_valid_paths(&store).len(), f.closure.len());
        } else {
            failed("kiln copy with nix.conf trusting no key of the cache", out);
            assert!(f.kiln_valid_paths(&store).is_empty());
        }
    }
}

#[test]
fn nix_reads_caches_kiln_wrote() {
    let f = fixture();
    for compression in COMPRESSIONS {
        let dir = f.dir(&format!("kiln-cache-{compression}"));
        let to = format!(
            "file://{}?compression={compression}&secret-key={}",
            dir.display(),
            f.secret_key.display()
        );
        // Kiln reads Nix's own store and writes the cache.
        ok(
            "kiln copy --to file://",
            kiln(&f.nix.url(), &["copy", "--to", &to, &f.top]),
        );
        let from = format!("file://{}", dir.display());
        let wrong = f.dir(&format!("nix-refused-{compression}"));
        let wrong_url = format!("local?root={}", wrong.display());
        let err = f
            .nix
            .nix([
                "copy",
                "--store",
                &wrong_url,
                "--option",
                "trusted-public-keys",
                &f.other_public_key,
                "--from",
                &from,
                &f.top,
            ])
            .expect_err("Nix must refuse paths signed by an untrusted key");
        assert!(
            err.stderr().contains("signature"),
            "{compression}: Nix refused for another reason: {}",
            err.stderr()
        );
        let nix_store = f.dir(&format!("nix-from-kiln-{compression}"));
        let url = format!("local?root={}", nix_store.display());
        f.nix
            .nix([
                "copy",
                "--store",
                &url,
                "--option",
                "trusted-public-keys",
                &f.public_key,
                "--from",
                &from,
                &f.top,
            ])
            .unwrap_or_else(|e| panic!("nix copy --from a Kiln cache ({compression}): {e}"));
        f.assert_same_closure(&url);
    }
}

/// `kiln store serve-cache` on a free port; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(store: &str, key: &Path) -> Server {
        let mut child = Command::new(kiln_bin())
            .args([
                "store",
                "--store",
                store,
                "serve-cache",
                "--listen",
                "127.0.0.1:0",
                "--key",
            ])
            .arg(key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run kiln store serve-cache");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_owned();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "serve-cache printed {line:?}"
        );
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nix_copies_from_kiln_serve_cache() {
    let f = fixture();
    // Serve a Kiln store that got the closure from a Nix cache, so the
    // served metadata is Kiln's own.
    let cache = f.nix_writes_cache("nix-cache", "zstd");
    let store = f.kiln_store("kiln-served");
    ok(
        "kiln copy --from",
        kiln(
            &store,
            &[
                "copy",
                "--from",
                &format!("file://{}", cache.display()),
                "--trusted-public-keys",
                &f.public_key,
                &f.top,
            ],
        ),
    );
    let server = Server::start(&store, &f.secret_key);

    let wrong = format!("local?root={}", f.dir("nix-refused").display());
    let err = f
        .nix
        .nix([
            "copy",
            "--store",
            &wrong,
            "--option",
            "trusted-public-keys",
            &f.other_public_key,
            "--from",
            &server.url,
            &f.top,
        ])
        .expect_err("Nix must refuse a served path signed by an untrusted key");
    assert!(err.stderr().contains("signature"), "{}", err.stderr());

    let url = format!("local?root={}", f.dir("nix-from-server").display());
    f.nix
        .nix([
            "copy",
            "--store",
            &url,
            "--option",
            "trusted-public-keys",
            &f.public_key,
            "--from",
            &server.url,
            &f.top,
        ])
        .unwrap_or_else(|e| panic!("nix copy --from kiln serve-cache: {e}"));
    f.assert_same_closure(&url);

    // Kiln substitutes from its own server too, over HTTP.
    let back = f.kiln_store("kiln-from-server");
    ok(
        "kiln copy --from http://",
        kiln(
            &back,
            &[
                "copy",
                "--from",
                &server.url,
                "--trusted-public-keys",
                &f.public_key,
                &f.top,
            ],
        ),
    );
    f.assert_same_closure(&back);
}

#[test]
fn malformed_narinfo_and_truncated_nar_register_nothing() {
    let f = fixture();
    let mid = f
        .closure
        .iter()
        .find(|p| p.ends_with("-kiln-cache-mid"))
        .unwrap()
        .clone();
    let dep = f
        .closure
        .iter()
        .find(|p| p.ends_with("-kiln-cache-dep"))
        .unwrap()
        .clone();
    let hash_part = |p: &str| Path::new(p).file_name().unwrap().to_str().unwrap()[..32].to_owned();

    // A narinfo with a broken NarHash line.
    let cache = f.nix_writes_cache("bad-narinfo", "xz");
    let narinfo = cache.join(format!("{}.narinfo", hash_part(&mid)));
    let text = fs::read_to_string(&narinfo).unwrap();
    fs::write(
        &narinfo,
        text.replace("NarHash: sha256:", "NarHash: sha256:zz"),
    )
    .unwrap();
    let store = f.kiln_store("after-bad-narinfo");
    let stderr = failed(
        "kiln copy with a malformed narinfo",
        kiln(
            &store,
            &[
                "copy",
                "--from",
                &format!("file://{}", cache.display()),
                "--trusted-public-keys",
                &f.public_key,
                &f.top,
            ],
        ),
    );
    assert!(
        stderr.contains("malformed narinfo")
            && stderr.contains(&format!("{}.narinfo", hash_part(&mid)))
            && stderr.contains("NarHash"),
        "unclear error for a malformed narinfo: {stderr}"
    );
    assert!(f.kiln_valid_paths(&store).is_empty());

    // The big NAR cut short, for every compression.
    for compression in COMPRESSIONS {
        let cache = f.nix_writes_cache(&format!("cut-{compression}"), compression);
        let text = fs::read_to_string(cache.join(format!("{}.narinfo", hash_part(&dep)))).unwrap();
        let nar_url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        let nar = cache.join(nar_url);
        let len = fs::metadata(&nar).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&nar)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let store = f.kiln_store(&format!("after-cut-{compression}"));
        let stderr = failed(
            "kiln copy with a truncated NAR",
            kiln(
                &store,
                &[
                    "copy",
                    "--from",
                    &format!("file://{}", cache.display()),
                    "--trusted-public-keys",
                    &f.public_key,
                    &dep,
                ],
            ),
        );
        assert!(
            stderr.contains(&dep) && (stderr.contains(nar_url) || stderr.contains("truncated")),
            "{compression}: unclear error for a truncated NAR: {stderr}"
        );
        assert!(
            f.kiln_valid_paths(&store).is_empty(),
            "{compression}: a truncated download registered something"
        );
        let leftovers: Vec<_> =
            fs::read_dir(f.dir(&format!("after-cut-{compression}")).join("nix/store"))
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n != ".links" && n != kiln_store::local::lock::spares::DIR)
                .collect();
        assert!(
            leftovers.is_empty(),
            "{compression}: left behind {leftovers:?}"
        );
    }
}
