//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` and
//! `pg_ctl` from Debian's package, listening only on a unix socket in a
//! temporary directory. PostgreSQL refuses to run as root, so when we are
//! root the server runs as the `postgres` user (`runuser`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's PostgreSQL 15 keeps its programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// What went wrong starting the cluster.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error(
        "PostgreSQL is not installed: {0} is missing (install Debian's postgresql package, e.g. `cargo xtask setup`)"
    )]
    Missing(PathBuf),
    #[error("cannot prepare the cluster directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
}

/// A running cluster; stopped (immediately) and removed on drop.
#[derive(Debug)]
pub struct TempPostgres {
    dir: tempfile::TempDir,
    as_postgres: bool,
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl TempPostgres {
    /// Creates and starts a cluster with trust authentication for the
    /// `postgres` user.
    pub fn start() -> Result<TempPostgres, PostgresError> {
        let initdb = Path::new(PG_BIN).join("initdb");
        if !initdb.exists() {
            return Err(PostgresError::Missing(initdb));
        }
        let dir = tempfile::Builder::new().prefix("kiln-ci-pg").tempdir()?;
        let as_postgres = running_as_root();
        if as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()))?;
        }
        let cluster = TempPostgres { dir, as_postgres };
        let data = cluster.data_dir();
        cluster.run_pg(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        let options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c fsync=off -c max_connections=50",
            cluster.dir.path().display()
        );
        cluster.run_pg(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &cluster.dir.path().join("log").to_string_lossy(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The connection URL of the `postgres` database (or another one made
    /// with [`TempPostgres::create_database`]).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres:///{database}?host={}&user=postgres",
            self.dir.path().display()
        )
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, PostgresError> {
        let createdb = Path::new(PG_BIN).join("createdb");
        let dir = self.dir.path().to_string_lossy().into_owned();
        run(Command::new(createdb).args(["-h", &dir, "-U", "postgres", name]))?;
        Ok(self.url(name))
    }

    fn run_pg(&self, program: &str, args: &[&str]) -> Result<(), PostgresError> {
        let program = Path::new(PG_BIN).join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args).current_dir(self.dir.path());
        run(&mut command)
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run_pg(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn run(command: &mut Command) -> Result<(), PostgresError> {
    let output = command.output().map_err(|e| PostgresError::Command {
        command: format!("{command:?}"),
        output: e.to_string(),
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(PostgresError::Command {
        command: format!("{command:?}"),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}
