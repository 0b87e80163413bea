//! Finding Nix 2.8, and throwaway Nix stores to run it against.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;

use tempfile::TempDir;

/// The Nix version the differential tests are written against (Debian's `nix-bin`).
const EXPECTED_VERSION: &str = "2.8";

/// The programs a Nix installation must have for the tests.
const PROGRAMS: &[&str] = &[
    "nix-store",
    "nix-instantiate",
    "nix-hash",
    "nix-build",
    "nix",
];

/// An installation of Nix found on this machine.
#[derive(Debug)]
pub struct Nix {
    bin_dir: PathBuf,
    version: String,
}

impl Nix {
    /// The full path of one of Nix's programs, e.g. `program("nix-store")`.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// The directory holding Nix's programs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The version `nix-store --version` reports, e.g. `2.8.0`.
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// The machine's Nix 2.8. Panics, with what to do, when it is missing or another
/// version: tests that compare against Nix must fail then, never pass by skipping.
pub fn nix() -> &'static Nix {
    static NIX: OnceLock<Result<Nix, String>> = OnceLock::new();
    match NIX.get_or_init(find_nix) {
        Ok(nix) => nix,
        Err(message) => panic!("{message}"),
    }
}

fn find_nix() -> Result<Nix, String> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path_var)
        .chain(["/usr/bin", "/nix/var/nix/profiles/default/bin"].map(PathBuf::from));
    let bin_dir = candidates
        .into_iter()
        .find(|dir| {
            PROGRAMS
                .iter()
                .all(|program| is_executable(&dir.join(program)))
        })
        .ok_or_else(|| {
            format!(
                "Nix {EXPECTED_VERSION} not found (looked for {} on PATH and in /usr/bin): \
                 run `cargo xtask test`, which installs nix-bin, or `apt-get install nix-bin`",
                PROGRAMS.join(", ")
            )
        })?;

    let nix_store = bin_dir.join("nix-store");
    let output = Command::new(&nix_store)
        .arg("--version")
        // Even `--version` opens the default store, which an unprivileged user may
        // not reach; the dummy store needs nothing.
        .env("NIX_REMOTE", "dummy://")
        .output()
        .map_err(|error| format!("cannot run {}: {error}", nix_store.display()))?;
    // "nix-store (Nix) 2.8.0"
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .last()
        .filter(|_| output.status.success())
        .ok_or_else(|| {
            format!(
                "`{} --version` failed ({}): stdout {text:?}, stderr {:?}",
                nix_store.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?
        .to_owned();
    if version != EXPECTED_VERSION && !version.starts_with(&format!("{EXPECTED_VERSION}.")) {
        return Err(format!(
            "found Nix {version} in {}, but the differential tests compare against \
             Nix {EXPECTED_VERSION} (Debian's nix-bin): install it with `cargo xtask test`",
            bin_dir.display()
        ));
    }
    Ok(Nix { bin_dir, version })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// A Nix command that could not be run or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status})\n--- stderr ---\n{stderr}--- stdout ---\n{stdout}")]
    Failed {
        command: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

impl NixError {
    /// The exit code of a command that ran and failed (Nix uses 100, 101, 102, 104 for
    /// build failures), `None` when it could not start or was killed by a signal.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            NixError::Spawn { .. } => None,
            NixError::Failed { status, .. } => status.code(),
        }
    }

    /// What the command printed on stderr, empty when it could not start.
    pub fn stderr(&self) -> &str {
        match self {
            NixError::Spawn { .. } => "",
            NixError::Failed { stderr, .. } => stderr,
        }
    }
}

/// A throwaway Nix store: `local?root=DIR` in a temporary directory that is deleted
/// when this value is dropped. Logical store paths are `/nix/store/…`; their files
/// live under [`NixStore::root`].
///
/// Every command runs with a cleared environment: its own `HOME`, `TMPDIR`, XDG
/// directories and `NIX_CONF_DIR`, whose `nix.conf` selects this store, turns off
/// substituters and build users, and exposes the host's `/bin`, `/usr` and `/lib*`
/// to builds (Nix builds in a chroot whenever the physical store is not at its
/// logical place, and the corpus's builders need `/bin/sh`).
#[derive(Debug)]
pub struct NixStore {
    dir: TempDir,
    root: PathBuf,
}

impl Default for NixStore {
    fn default() -> Self {
        Self::new()
    }
}

impl NixStore {
    /// A new, empty store with the default test configuration.
    pub fn new() -> NixStore {
        Self::with_config("")
    }

    /// A new, empty store whose `nix.conf` has `extra` appended (later lines win),
    /// e.g. `"require-sigs = false\n"`.
    pub fn with_config(extra: &str) -> NixStore {
        // Fail here, with instructions, rather than at the first command.
        nix();
        let dir = tempfile::Builder::new()
            .prefix("kiln-nix-store-")
            .tempdir()
            .expect("cannot create a temporary directory for a Nix store");
        let root = dir.path().join("root");
        for sub in [
            "root", "etc", "home", "tmp", "cache", "config", "data", "state",
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap_or_else(|error| {
                panic!("cannot create {sub} in {}: {error}", dir.path().display())
            });
        }
        let mut conf = String::new();
        let _ = writeln!(conf, "store = local?root={}", root.display());
        conf.push_str(
            "sandbox = false\n\
             substituters =\n\
             build-users-group =\n\
             experimental-features = nix-command\n\
             fsync-metadata = false\n\
             show-trace = true\n",
        );
        let _ = writeln!(conf, "sandbox-paths = {}", host_sandbox_paths());
        conf.push_str(extra);
        let conf_path = dir.path().join("etc/nix.conf");
        std::fs::write(&conf_path, conf)
            .unwrap_or_else(|error| panic!("cannot write {}: {error}", conf_path.display()));
        NixStore { dir, root }
    }

    /// The physical root: the store's files are under `root/nix/store`, its database
    /// under `root/nix/var/nix/db`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store URL Nix and Kiln accept for this store, `local?root=…`.
    pub fn url(&self) -> String {
        format!("local?root={}", self.root.display())
    }

    /// The logical store directory, part of every store path's hash.
    pub fn store_dir(&self) -> &'static str {
        "/nix/store"
    }

    /// Where the store's paths physically are: `root/nix/store`.
    pub fn real_store_dir(&self) -> PathBuf {
        self.physical(self.store_dir())
    }

    /// The state directory (`root/nix/var/nix`), holding `db/db.sqlite`, `gcroots/` ….
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("nix/var/nix")
    }

    /// The physical location of a logical path such as `/nix/store/…-hello.drv`.
    pub fn physical(&self, logical: impl AsRef<Path>) -> PathBuf {
        let logical = logical.as_ref();
        self.root.join(logical.strip_prefix("/").unwrap_or(logical))
    }

    /// The `nix.conf` directory the commands use (`NIX_CONF_DIR`).
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// A command for one of Nix's programs (`"nix-store"`, `"nix"`, …) with the clean
    /// environment of this store; add arguments and run it as you like.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(nix().program(program));
        let base = self.dir.path();
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", base.join("home"))
            .env("TMPDIR", base.join("tmp"))
            .env("XDG_CACHE_HOME", base.join("cache"))
            .env("XDG_CONFIG_HOME", base.join("config"))
            .env("XDG_DATA_HOME", base.join("data"))
            .env("XDG_STATE_HOME", base.join("state"))
            .env("NIX_CONF_DIR", self.conf_dir())
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null());
        command
    }

    /// Runs one of Nix's programs with `args`; its stdout on success.
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<String, NixError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.command(program);
        command.args(args);
        run_command(&mut command, None).map(|stdout| String::from_utf8_lossy(&stdout).into_owned())
    }

    /// Runs one of Nix's programs with `args` and `stdin` as its input; its raw stdout
    /// on success (for `nix-store --import`, `--restore`, `--dump` …).
    pub fn run_bytes<I, S>(&self, program: &str, args: I, stdin: &[u8]) -> Result<Vec<u8>, NixError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.command(program);
        command.args(args);
        run_command(&mut command, Some(stdin))
    }

    /// `nix-store ARGS…` against this store.
    pub fn nix_store<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        &self,
        args: I,
    ) -> Result<String, NixError> {
        self.run("nix-store", args)
    }

    /// `nix-instantiate ARGS…` against this store.
    pub fn nix_instantiate<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        &self,
        args: I,
    ) -> Result<String, NixError> {
        self.run("nix-instantiate", args)
    }

    /// `nix-build ARGS…` against this store (add `--no-out-link` unless you want `result`).
    pub fn nix_build<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        &self,
        args: I,
    ) -> Result<String, NixError> {
        self.run("nix-build", args)
    }

    /// `nix ARGS…` (the new CLI, `nix-command` enabled) against this store.
    pub fn nix<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        &self,
        args: I,
    ) -> Result<String, NixError> {
        self.run("nix", args)
    }

    /// Instantiates a Nix file into this store: the `.drv` paths it evaluates to
    /// (one per derivation at the top level of an attribute set).
    pub fn instantiate(&self, file: impl AsRef<Path>) -> Result<Vec<String>, NixError> {
        let stdout = self.nix_instantiate([file.as_ref()])?;
        Ok(stdout
            .lines()
            // Nix appends `!output` when an expression selects one output.
            .map(|line| line.split('!').next().unwrap_or(line).to_owned())
            .filter(|line| !line.is_empty())
            .collect())
    }

    /// The `.drv` files in the closure of `drv_paths` (themselves and every input
    /// derivation, recursively), sorted.
    pub fn drv_closure<S: AsRef<OsStr>>(&self, drv_paths: &[S]) -> Result<Vec<String>, NixError> {
        if drv_paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<&OsStr> = vec![OsStr::new("--query"), OsStr::new("--requisites")];
        args.extend(drv_paths.iter().map(AsRef::as_ref));
        let stdout = self.nix_store(args)?;
        let mut drvs: Vec<String> = stdout
            .lines()
            .filter(|line| line.ends_with(".drv"))
            .map(str::to_owned)
            .collect();
        drvs.sort();
        drvs.dedup();
        Ok(drvs)
    }
}

impl Drop for NixStore {
    fn drop(&mut self) {
        // Store paths are read-only directories: an unprivileged user cannot delete
        // their entries until the write bits are back. (Root can, regardless.)
        make_writable(&self.root);
    }
}

fn make_writable(path: &Path) {
    let Ok(meta) = path.symlink_metadata() else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

fn run_command(command: &mut Command, stdin: Option<&[u8]>) -> Result<Vec<u8>, NixError> {
    let description = describe(command);
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| NixError::Spawn {
        command: description.clone(),
        source,
    })?;
    // Feed stdin from another thread so a command that writes a lot before reading
    // all its input cannot deadlock against us.
    let writer = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => {
            let bytes = bytes.to_vec();
            Some(std::thread::spawn(move || pipe.write_all(&bytes)))
        }
        _ => None,
    };
    let output = child.wait_with_output().map_err(|source| NixError::Spawn {
        command: description.clone(),
        source,
    })?;
    if let Some(writer) = writer {
        // A command that exits before reading everything breaks the pipe; its exit
        // status below says what went wrong.
        let _ = writer.join();
    }
    if !output.status.success() {
        return Err(NixError::Failed {
            command: description,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output.stdout)
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// The host directories a build needs to run `/bin/sh` and `/bin/bash`, as Nix's
/// `sandbox-paths`: symlinked ones (`/bin -> usr/bin` on merged-/usr systems) are
/// mounted from their target.
pub fn host_sandbox_paths() -> String {
    let mut paths = Vec::new();
    for dir in ["/bin", "/usr", "/lib", "/lib64", "/lib32", "/libx32"] {
        let path = Path::new(dir);
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::canonicalize(path) {
                paths.push(format!("{dir}={}", target.display()));
            }
        } else {
            paths.push(dir.to_owned());
        }
    }
    paths.join(" ")
}
