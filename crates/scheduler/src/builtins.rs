//! Nix's builtin builders, which the scheduler runs itself instead of
//! starting a program: `builtin:buildenv`, the user environment that
//! `nix-env` makes for a profile, `builtin:fetchurl`, the download behind
//! `<nix/fetchurl.nix>` (nixpkgs fetches its bootstrap tools with it), and
//! `builtin:unpack-channel`, the channel tree of `nix-channel --update`.
//!
//! A builtin sees the store as a sandboxed builder would: only its input
//! closure. Paths are resolved component by component, through symlinks,
//! and anything that leads out of the closure (another store path, a host
//! file) is treated as missing, so a package's symlink cannot make the
//! scheduler read what its builder could not.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

use bstr::{BString, ByteSlice};
use kiln_formats::store_path::{StoreDir, StorePathSet};
use kiln_store::binary_cache::Compression;

/// A builtin builder Kiln provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `builtin:buildenv`.
    Buildenv,
    /// `builtin:fetchurl`.
    Fetchurl,
    /// `builtin:unpack-channel`.
    UnpackChannel,
}

impl Builtin {
    /// The builtin named by a derivation's `builder`: `None` for a program,
    /// an error for a `builtin:` that Kiln does not provide.
    pub fn from_builder(builder: &[u8]) -> Option<Result<Builtin, String>> {
        let name = builder.strip_prefix(b"builtin:")?;
        Some(match name {
            b"buildenv" => Ok(Builtin::Buildenv),
            b"fetchurl" => Ok(Builtin::Fetchurl),
            b"unpack-channel" => Ok(Builtin::UnpackChannel),
            _ => Err(format!(
                "the builtin builder 'builtin:{}' is not provided by Kiln (it provides 'builtin:buildenv', 'builtin:fetchurl' and 'builtin:unpack-channel')",
                name.to_str_lossy()
            )),
        })
    }
}

/// What a builtin gets to work with.
#[derive(Debug)]
pub struct BuiltinBuild<'a> {
    /// The derivation's environment.
    pub env: &'a BTreeMap<BString, BString>,
    pub store_dir: &'a StoreDir,
    /// Where the store's paths are on disk.
    pub real_store_dir: &'a Path,
    /// Where the outputs are to be made, by base name.
    pub out_dir: &'a Path,
    /// The input closure: all the builtin may read.
    pub inputs: &'a StorePathSet,
    /// Whether the derivation is fixed-output (its result checked by hash).
    pub fixed_output: bool,
}

/// Runs `builtin`; warnings go to `log`, one line each. The error says
/// what was wrong, for the build's failure.
pub fn run(
    builtin: Builtin,
    build: &BuiltinBuild,
    log: &mut dyn FnMut(&str),
) -> Result<(), String> {
    match builtin {
        Builtin::Buildenv => buildenv(build, log),
        Builtin::Fetchurl => fetchurl(build, log),
        Builtin::UnpackChannel => unpack_channel(build),
    }
}

/// Unpacks the tarball `src` (an input; compressed with gzip, xz, bzip2 or
/// zstd, or not at all) into the output, and names its one top-level
/// entry `channelName`. Entries that would land outside the output (`..`,
/// absolute names, through a symlink of the archive) are an error, and
/// neither owners nor permission bits beyond the user's are taken from
/// the archive; the output is canonicalised afterwards anyway.
fn unpack_channel(build: &BuiltinBuild) -> Result<(), String> {
    let out = output_dir(build, attr(build, "out")?)?;
    let channel = attr(build, "channelName")?;
    if channel.is_empty() || channel.contains('/') || channel == "." || channel == ".." {
        return Err(format!("'{channel}' is not a valid channel name"));
    }
    let src = attr(build, "src")?;
    let Some((_, physical)) = ClosureView::new(build)
        .resolve(src)
        .map_err(|e| format!("{src}: {e}"))?
    else {
        return Err(format!(
            "channel tarball '{src}' is not among the derivation's inputs"
        ));
    };
    let file = std::fs::File::open(&physical).map_err(|e| format!("opening '{src}': {e}"))?;
    let tarball =
        decompressed(io::BufReader::new(file)).map_err(|e| format!("reading '{src}': {e}"))?;
    std::fs::create_dir(&out).map_err(|e| format!("creating '{}': {e}", out.display()))?;
    let mut archive = tar::Archive::new(tarball);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    archive
        .unpack(&out)
        .map_err(|e| format!("unpacking channel tarball '{src}': {e}"))?;
    let entries: Vec<_> = std::fs::read_dir(&out)
        .and_then(|d| d.collect::<Result<_, _>>())
        .map_err(|e| format!("reading '{}': {e}", out.display()))?;
    let [entry] = entries.as_slice() else {
        return Err(format!(
            "channel tarball '{src}' contains {} top-level entries, not one",
            entries.len()
        ));
    };
    std::fs::rename(entry.path(), out.join(channel))
        .map_err(|e| format!("renaming the channel directory: {e}"))
}

/// `input`, decompressed by what its first bytes say it is.
fn decompressed<'a>(
    mut input: impl io::BufRead + Send + 'a,
) -> io::Result<Box<dyn io::Read + Send + 'a>> {
    let head = input.fill_buf()?;
    let compression = if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Box::new(flate2::bufread::MultiGzDecoder::new(input)));
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    };
    compression.decoder(Box::new(input))
}

/// Where output `out` (a logical path) is made.
fn output_dir(build: &BuiltinBuild, out: &str) -> Result<PathBuf, String> {
    let path = build
        .store_dir
        .parse_path(out)
        .map_err(|e| format!("output '{out}': {e}"))?;
    Ok(build.out_dir.join(path.base_name()))
}

/// Downloads `url` to the output, as a file (executable when
/// `executable = "1"`) or, with `unpack = "1"`, as the tree of the NAR it
/// holds (xz-compressed when the URL ends in `.xz`). Only fixed-output
/// derivations may: the hash is what makes a download trustworthy (so TLS
/// certificates are not checked either, as in Nix).
fn fetchurl(build: &BuiltinBuild, log: &mut dyn FnMut(&str)) -> Result<(), String> {
    if !build.fixed_output {
        return Err("'builtin:fetchurl' only builds fixed-output derivations".into());
    }
    let out = output_dir(build, attr(build, "out")?)?;
    let url = attr(build, "url")?;
    let flag = |name: &str| build.env.get(name.as_bytes()).is_some_and(|v| v == "1");
    log(&format!("downloading '{url}'..."));
    let body = open_url(&ClosureView::new(build), url)?;
    let failed = |e: &dyn std::fmt::Display| format!("unable to download '{url}': {e}");
    if flag("unpack") {
        let body = if url.ends_with(".xz") {
            Compression::Xz.decoder(body).map_err(|e| failed(&e))?
        } else {
            body
        };
        kiln_formats::nar::restore(body, &out).map_err(|e| format!("unpacking '{url}': {e}"))?;
    } else {
        let mut body = body;
        let mut file = std::fs::File::create_new(&out)
            .map_err(|e| format!("creating '{}': {e}", out.display()))?;
        io::copy(&mut body, &mut file).map_err(|e| failed(&e))?;
    }
    if flag("executable") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("making '{}' executable: {e}", out.display()))?;
    }
    Ok(())
}

/// The body at `url`: `http(s)://`, or `file://` of a path in the input
/// closure (what a sandboxed download could read).
fn open_url(view: &ClosureView, url: &str) -> Result<Box<dyn io::Read + Send>, String> {
    let failed = |e: &dyn std::fmt::Display| format!("unable to download '{url}': {e}");
    if let Some(path) = url.strip_prefix("file://") {
        let path = percent_decode(path).ok_or_else(|| failed(&"malformed %-escape"))?;
        let Some((_, physical)) = view.resolve(&path).map_err(|e| failed(&e))? else {
            return Err(failed(
                &"no such file among the derivation's inputs (a download sees only them, as in a sandbox)",
            ));
        };
        let file = std::fs::File::open(&physical).map_err(|e| failed(&e))?;
        return Ok(Box::new(file));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(failed(
            &"Kiln downloads only http://, https:// and file:// URLs",
        ));
    }
    let agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .disable_verification(true)
                .build(),
        )
        .timeout_connect(Some(std::time::Duration::from_secs(30)))
        .timeout_per_read(Some(std::time::Duration::from_secs(300)))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent();
    let response = agent.get(url).call().map_err(|e| failed(&e))?;
    // Errors when the connection ends before Content-Length bytes: a cut
    // download is never a short file.
    Ok(Box::new(response.into_body().into_reader()))
}

/// `%XX` escapes of a URL's path decoded; `None` when one is malformed.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn attr<'a>(build: &'a BuiltinBuild, name: &str) -> Result<&'a str, String> {
    let value = build
        .env
        .get(name.as_bytes())
        .ok_or_else(|| format!("attribute '{name}' missing"))?;
    std::str::from_utf8(value).map_err(|_| format!("attribute '{name}' is not UTF-8"))
}

/// One package of a user environment.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Package {
    priority: i64,
    path: String,
    active: bool,
}

/// Parses `derivations`: for each package, whether it is active, its
/// priority, how many output paths follow, and those paths.
fn packages(derivations: &str) -> Result<Vec<Package>, String> {
    let mut words = derivations.split_ascii_whitespace();
    let mut packages = Vec::new();
    while let Some(active) = words.next() {
        let malformed = || format!("malformed 'derivations' attribute near '{active}'");
        let priority: i64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(malformed)?;
        let count: usize = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(malformed)?;
        for _ in 0..count {
            let path = words.next().ok_or_else(malformed)?;
            packages.push(Package {
                priority,
                path: path.to_owned(),
                active: active != "false",
            });
        }
    }
    Ok(packages)
}

fn buildenv(build: &BuiltinBuild, log: &mut dyn FnMut(&str)) -> Result<(), String> {
    let out = attr(build, "out")?;
    let manifest = attr(build, "manifest")?;
    let mut packages = packages(attr(build, "derivations")?)?;
    let out_dir = output_dir(build, out)?;
    let view = ClosureView::new(build);
    let io = |what: &str, path: &Path, e: io::Error| format!("{what} '{}': {e}", path.display());
    std::fs::create_dir(&out_dir).map_err(|e| io("creating", &out_dir, e))?;
    let mut env = UserEnv {
        view: &view,
        log,
        out_dir: &out_dir,
        priorities: HashMap::new(),
        done: HashSet::new(),
        postponed: BTreeSet::new(),
    };
    // Explicitly installed packages in priority order (lower wins), so
    // fewer links are made and then replaced.
    packages.sort();
    for p in packages.iter().filter(|p| p.active) {
        env.add(&p.path, p.priority)?;
    }
    // Then what they propagate, behind them on collisions.
    let mut priority = 1000;
    while !env.postponed.is_empty() {
        for path in std::mem::take(&mut env.postponed) {
            env.add(&path, priority)?;
            priority += 1;
        }
    }
    let link = out_dir.join("manifest.nix");
    std::os::unix::fs::symlink(manifest, &link).map_err(|e| io("creating", &link, e))
}

/// The store as the derivation's builder would see it.
struct ClosureView<'a> {
    store_components: Vec<&'a str>,
    real_store_dir: &'a Path,
    inputs: HashSet<String>,
}

/// Symlinks followed in one resolution before giving up, as the kernel does.
const MAX_LINKS: usize = 40;

impl<'a> ClosureView<'a> {
    fn new(build: &'a BuiltinBuild) -> Self {
        ClosureView {
            store_components: build
                .store_dir
                .as_str()
                .split('/')
                .filter(|c| !c.is_empty())
                .collect(),
            real_store_dir: build.real_store_dir,
            inputs: build
                .inputs
                .iter()
                .map(|p| p.base_name().to_owned())
                .collect(),
        }
    }

    /// Where the logical path made of `components` is on disk, if it is
    /// at or below an input; `Some(None)` for the store directory and its
    /// parents, which are only walked through.
    fn physical(&self, components: &[String]) -> Option<Option<PathBuf>> {
        let n = self.store_components.len();
        let shared = components.len().min(n);
        if components[..shared] != self.store_components[..shared] {
            return None;
        }
        if components.len() <= n {
            return Some(None);
        }
        if !self.inputs.contains(&components[n]) {
            return None;
        }
        let mut physical = self.real_store_dir.to_path_buf();
        physical.extend(&components[n..]);
        Some(Some(physical))
    }

    /// Follows `logical` through symlinks: its resolved logical path and
    /// where that is on disk, or `None` when it does not exist in the
    /// closure.
    fn resolve(&self, logical: &str) -> io::Result<Option<(String, PathBuf)>> {
        let mut todo: VecDeque<String> = logical
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let mut at: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            match c.as_str() {
                "." => continue,
                ".." => {
                    at.pop();
                    continue;
                }
                _ => at.push(c),
            }
            let physical = match self.physical(&at) {
                None => return Ok(None),
                Some(None) => continue,
                Some(Some(p)) => p,
            };
            let meta = match std::fs::symlink_metadata(&physical) {
                Ok(m) => m,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if meta.file_type().is_symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return Ok(None);
                }
                let target = std::fs::read_link(&physical)?;
                let target = target.to_string_lossy();
                at.pop();
                if target.starts_with('/') {
                    at.clear();
                }
                for c in target.split('/').filter(|c| !c.is_empty()).rev() {
                    todo.push_front(c.to_owned());
                }
            } else if !todo.is_empty() && !meta.is_dir() {
                return Ok(None);
            }
        }
        match self.physical(&at) {
            Some(Some(physical)) => Ok(Some((format!("/{}", at.join("/")), physical))),
            _ => Ok(None),
        }
    }
}

/// A user environment being linked together.
struct UserEnv<'a, 'l> {
    view: &'a ClosureView<'a>,
    log: &'l mut dyn FnMut(&str),
    out_dir: &'a Path,
    /// The priority of the package each link made so far came from.
    priorities: HashMap<PathBuf, i64>,
    /// Packages linked in already.
    done: HashSet<String>,
    /// Packages that linked ones propagate, to link in next.
    postponed: BTreeSet<String>,
}

/// Files no profile shows: useless there, or a collision between nearly
/// every pair of packages.
const LEFT_OUT: &[&str] = &[
    "/propagated-build-inputs",
    "/nix-support",
    "/perllocal.pod",
    "/info/dir",
    "/log",
    "/manifest.nix",
    "/manifest.json",
];

impl UserEnv<'_, '_> {
    /// Links in the package at `path` (once), and notes the packages it
    /// propagates (`nix-support/propagated-user-env-packages`).
    fn add(&mut self, path: &str, priority: i64) -> Result<(), String> {
        if !self.done.insert(path.to_owned()) {
            return Ok(());
        }
        self.link(path, self.out_dir, priority)?;
        let propagated = format!("{path}/nix-support/propagated-user-env-packages");
        if let Some((_, physical)) = self.view.resolve(&propagated).map_err(|e| e.to_string())? {
            if let Ok(text) = std::fs::read_to_string(&physical) {
                for p in text.split_ascii_whitespace() {
                    if !self.done.contains(p) {
                        self.postponed.insert(p.to_owned());
                    }
                }
            }
        }
        Ok(())
    }

    /// Links the entries of the directory `src` (a logical path) into
    /// `dst`, merging directories that several packages have.
    fn link(&mut self, src: &str, dst: &Path, priority: i64) -> Result<(), String> {
        let io =
            |what: &str, path: &Path, e: io::Error| format!("{what} '{}': {e}", path.display());
        let Some((_, physical)) = self.view.resolve(src).map_err(|e| format!("{src}: {e}"))? else {
            (self.log)(&format!("warning: skipping dangling symlink '{src}'"));
            return Ok(());
        };
        let entries = match std::fs::read_dir(&physical) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                (self.log)(&format!(
                    "warning: not including '{src}' in the user environment because it's not a directory"
                ));
                return Ok(());
            }
            Err(e) => return Err(io("reading", &physical, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry.map_err(|e| io("reading", &physical, e))?.file_name();
            let name = name
                .into_string()
                .map_err(|n| format!("'{src}' holds a name that is not UTF-8: {n:?}"))?;
            if !name.starts_with('.') {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let src_file = format!("{src}/{name}");
            let dst_file = dst.join(&name);
            let Some((_, src_physical)) = self
                .view
                .resolve(&src_file)
                .map_err(|e| format!("{src_file}: {e}"))?
            else {
                (self.log)(&format!(
                    "warning: skipping dangling symlink '{}'",
                    dst_file.display()
                ));
                continue;
            };
            if LEFT_OUT.iter().any(|s| src_file.ends_with(s)) {
                continue;
            }
            let src_is_dir = std::fs::metadata(&src_physical)
                .map_err(|e| io("reading", &src_physical, e))?
                .is_dir();
            let existing = match std::fs::symlink_metadata(&dst_file) {
                Ok(m) => Some(m.file_type()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io("reading", &dst_file, e)),
            };
            match existing {
                Some(t) if src_is_dir && t.is_dir() => {
                    self.link(&src_file, &dst_file, priority)?;
                    continue;
                }
                Some(t) if src_is_dir && t.is_symlink() => {
                    // Another package's directory: merge the two.
                    let target =
                        std::fs::read_link(&dst_file).map_err(|e| io("reading", &dst_file, e))?;
                    let target = target.to_string_lossy().into_owned();
                    let resolved = self
                        .view
                        .resolve(&target)
                        .map_err(|e| format!("{target}: {e}"))?;
                    let other = match resolved {
                        Some((logical, physical)) if physical.is_dir() => logical,
                        _ => {
                            return Err(format!(
                                "collision between '{src_file}' and non-directory '{target}'"
                            ));
                        }
                    };
                    std::fs::remove_file(&dst_file).map_err(|e| io("removing", &dst_file, e))?;
                    std::fs::create_dir(&dst_file).map_err(|e| io("creating", &dst_file, e))?;
                    let theirs = self.priorities.get(&dst_file).copied().unwrap_or(priority);
                    self.link(&other, &dst_file, theirs)?;
                    self.link(&src_file, &dst_file, priority)?;
                    continue;
                }
                Some(t) if t.is_symlink() => {
                    let theirs = self.priorities.get(&dst_file).copied().unwrap_or(priority);
                    if theirs == priority {
                        let target = std::fs::read_link(&dst_file).unwrap_or_default();
                        return Err(format!(
                            "collision between '{}' and '{src_file}': both are in packages of priority {priority}; \
                             use 'nix-env --set-flag priority NUMBER' to give one of them a lower priority",
                            target.display()
                        ));
                    }
                    if theirs < priority {
                        continue;
                    }
                    std::fs::remove_file(&dst_file).map_err(|e| io("removing", &dst_file, e))?;
                }
                Some(t) if t.is_dir() => {
                    return Err(format!(
                        "collision between non-directory '{src_file}' and directory '{}'",
                        dst_file.display()
                    ));
                }
                _ => {}
            }
            std::os::unix::fs::symlink(&src_file, &dst_file)
                .map_err(|e| io("creating", &dst_file, e))?;
            self.priorities.insert(dst_file, priority);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::store_path::StorePath;

    const STORE: &str = "/nix/store";

    fn path(name: &str) -> StorePath {
        StoreDir::default()
            .parse_path(&format!("{STORE}/{}-{name}", "a".repeat(32)))
            .unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        inputs: StorePathSet,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("store")).unwrap();
            std::fs::create_dir_all(dir.path().join("out")).unwrap();
            Fixture {
                dir,
                inputs: StorePathSet::new(),
            }
        }

        fn real(&self, logical: &str) -> PathBuf {
            self.dir
                .path()
                .join("store")
                .join(logical.strip_prefix(&format!("{STORE}/")).unwrap())
        }

        /// A package: `files` are (relative path, contents); a contents
        /// starting with `->` makes a symlink.
        fn package(&mut self, name: &str, files: &[(&str, &str)]) -> String {
            let p = path(name);
            let logical = format!("{STORE}/{}", p.base_name());
            let root = self.real(&logical);
            std::fs::create_dir_all(&root).unwrap();
            for (rel, contents) in files {
                let f = root.join(rel);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                match contents.strip_prefix("->") {
                    Some(target) => std::os::unix::fs::symlink(target, &f).unwrap(),
                    None => std::fs::write(&f, contents).unwrap(),
                }
            }
            self.inputs.insert(p);
            logical
        }

        fn build(&self, derivations: &str) -> (Result<(), String>, Vec<String>) {
            let mut lines = Vec::new();
            let env = [
                ("manifest", "/nix/store/manifest"),
                ("derivations", derivations),
            ];
            let result = self.run(
                Builtin::Buildenv,
                "user-environment",
                &env,
                false,
                &mut |l| lines.push(l.to_owned()),
            );
            (result.map(|_| ()), lines)
        }

        /// Asserts that `rel` in the user environment links to `target`.
        fn assert_link(&self, rel: &str, target: &str) {
            assert_eq!(
                std::fs::read_link(self.out(rel)).unwrap(),
                Path::new(target),
                "{rel}"
            );
        }

        /// Runs `builtin` with `env` (and `out`, a path named `out_name`)
        /// over this fixture's packages; the output's path.
        fn run(
            &self,
            builtin: Builtin,
            out_name: &str,
            env: &[(&str, &str)],
            fixed_output: bool,
            log: &mut dyn FnMut(&str),
        ) -> Result<PathBuf, String> {
            let out = path(out_name);
            let mut vars = BTreeMap::new();
            vars.insert(
                BString::from("out"),
                BString::from(format!("{STORE}/{}", out.base_name())),
            );
            for (k, v) in env {
                vars.insert(BString::from(*k), BString::from(*v));
            }
            let real = self.dir.path().join("store");
            let out_dir = self.dir.path().join("out");
            let build = BuiltinBuild {
                env: &vars,
                store_dir: &StoreDir::default(),
                real_store_dir: &real,
                out_dir: &out_dir,
                inputs: &self.inputs,
                fixed_output,
            };
            run(builtin, &build, log)?;
            Ok(out_dir.join(out.base_name()))
        }

        fn out(&self, rel: &str) -> PathBuf {
            self.dir
                .path()
                .join("out")
                .join(path("user-environment").base_name())
                .join(rel)
        }
    }

    #[test]
    fn packages_are_merged_by_links_and_priority_settles_collisions() {
        let mut f = Fixture::new();
        let a = f.package(
            "a",
            &[
                ("bin/tool", "a"),
                ("share/a/doc", "a"),
                ("nix-support/x", ""),
            ],
        );
        let b = f.package(
            "b",
            &[("bin/tool", "b"), ("bin/other", "b"), ("share/b", "b")],
        );
        let (result, _) = f.build(&format!("true 5 1 {a} true 4 1 {b}"));
        result.unwrap();
        // b has the lower number, so the higher priority.
        f.assert_link("bin/tool", &format!("{b}/bin/tool"));
        f.assert_link("bin/other", &format!("{b}/bin/other"));
        // `share` is in both: a directory of links; `share/a` only in a: a link.
        assert!(std::fs::symlink_metadata(f.out("share")).unwrap().is_dir());
        f.assert_link("share/a", &format!("{a}/share/a"));
        assert!(!f.out("nix-support").exists());
        assert_eq!(
            std::fs::read_link(f.out("manifest.nix")).unwrap(),
            Path::new("/nix/store/manifest")
        );
    }

    #[test]
    fn equal_priorities_collide_and_inactive_packages_are_left_out() {
        let mut f = Fixture::new();
        let a = f.package("a", &[("bin/tool", "a")]);
        let b = f.package("b", &[("bin/tool", "b")]);
        let (result, _) = f.build(&format!("true 5 1 {a} true 5 1 {b}"));
        let e = result.unwrap_err();
        assert!(
            e.contains("collision between") && e.contains("bin/tool"),
            "{e}"
        );

        let mut f = Fixture::new();
        let a = f.package("a", &[("bin/tool", "a")]);
        let b = f.package("b", &[("bin/tool", "b")]);
        let (result, _) = f.build(&format!("true 5 1 {a} false 5 1 {b}"));
        result.unwrap();
        // Only a's `bin`: a link to it, not a directory.
        f.assert_link("bin", &format!("{a}/bin"));
    }

    #[test]
    fn propagated_packages_follow_and_links_outside_the_closure_do_not_resolve() {
        let mut f = Fixture::new();
        let dep = f.package("dep", &[("bin/dep", "d"), ("bin/tool", "d")]);
        let a = f.package(
            "a",
            &[
                ("bin/tool", "a"),
                (
                    "nix-support/propagated-user-env-packages",
                    &format!("{dep}\n"),
                ),
                ("etc", "->/etc"),
                ("lib", &format!("->{STORE}/{}-elsewhere", "b".repeat(32))),
            ],
        );
        let (result, lines) = f.build(&format!("true 5 1 {a}"));
        result.unwrap();
        f.assert_link("bin/tool", &format!("{a}/bin/tool"));
        f.assert_link("bin/dep", &format!("{dep}/bin/dep"));
        // The host's /etc and a store path outside the closure are not there.
        assert!(std::fs::symlink_metadata(f.out("etc")).is_err());
        assert!(std::fs::symlink_metadata(f.out("lib")).is_err());
        assert_eq!(
            lines.iter().filter(|l| l.contains("dangling")).count(),
            2,
            "{lines:?}"
        );
    }

    #[test]
    fn malformed_derivations_are_an_error() {
        let f = Fixture::new();
        let (result, _) = f.build("true five 1 /nix/store/x");
        assert!(result.unwrap_err().contains("malformed 'derivations'"));
        let (result, _) = f.build("true 5 2 /nix/store/x");
        assert!(result.unwrap_err().contains("malformed 'derivations'"));
    }

    fn fetch(
        f: &Fixture,
        url: &str,
        flags: &[&str],
        fixed_output: bool,
    ) -> Result<PathBuf, String> {
        let mut env = vec![("url", url)];
        env.extend(flags.iter().map(|flag| (*flag, "1")));
        f.run(
            Builtin::Fetchurl,
            "fetched",
            &env,
            fixed_output,
            &mut |_| {},
        )
    }

    #[test]
    fn fetchurl_reads_files_of_the_closure_only_and_unpacks_nars() {
        use std::os::unix::fs::PermissionsExt;
        let mut f = Fixture::new();
        let src = f.package("src", &[("a file", "payload")]);
        let got = fetch(&f, &format!("file://{src}/a%20file"), &["executable"], true).unwrap();
        assert_eq!(std::fs::read(&got).unwrap(), b"payload");
        assert_eq!(
            std::fs::metadata(&got).unwrap().permissions().mode() & 0o777,
            0o755
        );

        // A host file is not there for it; only fixed-output derivations
        // fetch; other schemes are refused by name.
        let e = fetch(&f, "file:///etc/passwd", &[], true).unwrap_err();
        assert!(e.contains("among the derivation's inputs"), "{e}");
        let e = fetch(&f, &format!("file://{src}/a%20file"), &[], false).unwrap_err();
        assert!(e.contains("fixed-output"), "{e}");
        let e = fetch(&f, "ftp://example.org/x", &[], true).unwrap_err();
        assert!(e.contains("only http://"), "{e}");

        let mut f = Fixture::new();
        let nar = kiln_formats::nar::Node::directory([(
            "bin",
            kiln_formats::nar::Node::executable("#!x"),
        )])
        .to_nar();
        let mut xz = Vec::new();
        {
            use std::io::Write;
            let mut enc = Compression::Xz.encoder(&mut xz, None).unwrap();
            enc.write_all(&nar).unwrap();
            enc.finish().unwrap();
        }
        let src = f.package("tools", &[]);
        std::fs::write(f.real(&src).join("t.nar.xz"), &xz).unwrap();
        let got = fetch(&f, &format!("file://{src}/t.nar.xz"), &["unpack"], true).unwrap();
        assert_eq!(std::fs::read(got.join("bin")).unwrap(), b"#!x");
    }

    fn tarball(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, contents) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            // `->target` makes a symlink.
            let contents = match contents.strip_prefix("->") {
                Some(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_link_name(target).unwrap();
                    ""
                }
                None => {
                    header.set_entry_type(tar::EntryType::Regular);
                    contents
                }
            };
            header.set_size(contents.len() as u64);
            // `append_data` refuses `..`; write the raw name as an attacker would.
            header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            builder.append(&header, contents.as_bytes()).unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        gz.finish().unwrap()
    }

    fn unpack(f: &Fixture, src: &str, channel: &str) -> Result<PathBuf, String> {
        let env = [("src", src), ("channelName", channel)];
        f.run(Builtin::UnpackChannel, "channel", &env, false, &mut |_| {})
    }

    #[test]
    fn unpack_channel_names_the_tree_and_keeps_it_inside() {
        let mut f = Fixture::new();
        let src = f.package("src", &[]);
        let good = tarball(&[
            ("nixpkgs-abc/default.nix", "{}"),
            ("nixpkgs-abc/lib/x", "x"),
        ]);
        std::fs::write(f.real(&src).join("nixexprs.tar.gz"), good).unwrap();
        let tarball_path = format!("{src}/nixexprs.tar.gz");
        let out = unpack(&f, &tarball_path, "nixpkgs").unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("nixpkgs/default.nix")).unwrap(),
            "{}"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("nixpkgs/lib/x")).unwrap(),
            "x"
        );

        for (entries, why) in [
            (vec![("a/x", "1"), ("b/y", "2")], "top-level entries"),
            // Skipped, leaving nothing.
            (vec![("a/../../escaped", "1")], "0 top-level entries"),
            (vec![("a", "->.."), ("a/escaped", "1")], "unpacking"),
        ] {
            let mut f = Fixture::new();
            let src = f.package("src", &[]);
            std::fs::write(f.real(&src).join("t.tar.gz"), tarball(&entries)).unwrap();
            let e = unpack(&f, &format!("{src}/t.tar.gz"), "nixpkgs").unwrap_err();
            assert!(e.contains(why), "{e}");
            assert!(!f.dir.path().join("escaped").exists());
            assert!(!f.dir.path().join("out/escaped").exists());
        }
        let e = unpack(&f, &tarball_path, "../x").unwrap_err();
        assert!(e.contains("not a valid channel name"), "{e}");
    }

    #[test]
    fn only_buildenv_fetchurl_and_unpack_channel_are_provided() {
        assert_eq!(Builtin::from_builder(b"/bin/sh"), None);
        assert_eq!(
            Builtin::from_builder(b"builtin:buildenv"),
            Some(Ok(Builtin::Buildenv))
        );
        assert_eq!(
            Builtin::from_builder(b"builtin:fetchurl"),
            Some(Ok(Builtin::Fetchurl))
        );
        assert_eq!(
            Builtin::from_builder(b"builtin:unpack-channel"),
            Some(Ok(Builtin::UnpackChannel))
        );
        let e = Builtin::from_builder(b"builtin:nope").unwrap().unwrap_err();
        assert!(e.contains("builtin:nope"), "{e}");
    }
}
