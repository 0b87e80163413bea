//! The validity database: Nix's SQLite schema (version 10, as Nix 2.4 –
//! 2.8 create it, plus the `ca-derivations` tables), Nix's pragmas, and the
//! queries the local store makes, all through cached prepared statements.
//! Kiln adds one table of its own, the journal of small files not yet
//! synced (`KilnUnsyncedPaths`, made on first use); Nix ignores it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_formats::hash::Hash;
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::{PathInfo, StoreError};

/// The schema version Nix 2.4 – 2.8 write into `db/schema`.
pub const SCHEMA_VERSION: u32 = 10;
/// The version of the `ca-derivations` tables written into `db/ca-schema`.
pub const CA_SCHEMA_VERSION: u32 = 3;

/// Nix's tables, byte for byte as Nix creates them, so `.schema` of a Kiln
/// database and of a Nix database are the same.
const SCHEMA: &str = "\
CREATE TABLE ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies \"false\"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);
CREATE TABLE Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
CREATE INDEX IndexReferrer on Refs(referrer);
CREATE INDEX IndexReference on Refs(reference);
CREATE TRIGGER DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
CREATE TABLE DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually \"out\"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
CREATE INDEX IndexDerivationOutputs on DerivationOutputs(path);
";

const CA_SCHEMA: &str = "\
CREATE TABLE Realisations (
    id integer primary key autoincrement not null,
    drvPath text not null,
    outputName text not null, -- symbolic output id, usually \"out\"
    outputPath integer not null,
    signatures text, -- space-separated list
    foreign key (outputPath) references ValidPaths(id) on delete cascade
);
CREATE INDEX IndexRealisations on Realisations(drvPath, outputName);
CREATE TABLE RealisationsRefs (
    referrer integer not null,
    realisationReference integer,
    foreign key (referrer) references Realisations(id) on delete cascade,
    foreign key (realisationReference) references Realisations(id) on delete restrict
);
CREATE INDEX IndexRealisationsRefs on RealisationsRefs(referrer);
CREATE INDEX IndexRealisationsRefsOnOutputPath on Realisations(outputPath);
";

/// Kiln's one table of its own, beside Nix's (Nix ignores tables it does
/// not know): the NARs of small paths registered before their files were
/// synced, made durable by the commit that registers them. Rows go once
/// the files are synced (see `local::journal`).
const JOURNAL_SCHEMA: &str = "\
CREATE TABLE IF NOT EXISTS KilnUnsyncedPaths (
    id   integer primary key not null,
    path text not null,
    nar  blob not null
);";

/// The name of [`JOURNAL_SCHEMA`]'s table, for callers that compare a
/// Kiln database's schema with Nix's.
pub const JOURNAL_TABLE: &str = "KilnUnsyncedPaths";

/// A path whose NAR a commit holds until its files are synced.
#[derive(Debug)]
pub struct JournaledPath {
    pub id: i64,
    pub path: StorePath,
    pub nar: Vec<u8>,
}

/// An open validity database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    file: PathBuf,
    store_dir: StoreDir,
}

impl Db {
    /// Opens `db_dir/db.sqlite`, creating the schema when the store is new
    /// (no `schema` file yet).
    pub fn open(db_dir: &Path, store_dir: &StoreDir) -> Result<Db, StoreError> {
        let file = db_dir.join("db.sqlite");
        let schema_file = db_dir.join("schema");
        let schema = match std::fs::read_to_string(&schema_file) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io("read", &schema_file, e)),
        };
        // A new database is switched to WAL and given its schema under
        // `schema.lock` (not `big-lock`: every open store holds that one
        // shared for its lifetime, as Nix does): two processes opening
        // a new store at once would otherwise race for the exclusive lock the
        // journal-mode switch needs, and SQLite fails that race at once
        // instead of waiting for it.
        let _creating = match schema {
            Some(_) => None,
            None => Some(Self::lock_for_creation(db_dir)?),
        };
        let schema = match schema {
            Some(s) => Some(s),
            None => match std::fs::read_to_string(&schema_file) {
                Ok(s) => Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(StoreError::io("read", &schema_file, e)),
            },
        };
        if let Some(found) = &schema {
            if found.trim() != SCHEMA_VERSION.to_string() {
                return Err(StoreError::SchemaVersion {
                    db: file,
                    found: found.trim().to_owned(),
                    expected: SCHEMA_VERSION,
                });
            }
        }
        let conn = Connection::open(&file).map_err(|source| StoreError::Database {
            db: file.clone(),
            source,
        })?;
        let db = Db {
            conn,
            file,
            store_dir: store_dir.clone(),
        };
        db.configure()?;
        if schema.is_none() {
            db.create_schema(db_dir)?;
        }
        Ok(db)
    }

    /// Opens another connection to the database of an open store, for
    /// queries only (`query_only`): in WAL mode readers do not wait for
    /// the writer or for each other.
    pub fn open_reader(db_dir: &Path, store_dir: &StoreDir) -> Result<Db, StoreError> {
        let file = db_dir.join("db.sqlite");
        let conn = Connection::open_with_flags(
            &file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
                | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|source| StoreError::Database {
            db: file.clone(),
            source,
        })?;
        let db = Db {
            conn,
            file,
            store_dir: store_dir.clone(),
        };
        db.conn
            .busy_timeout(Duration::from_secs(3600))
            .and_then(|()| db.conn.execute_batch("pragma query_only = 1;"))
            .map_err(|e| db.err(e))?;
        db.conn.set_prepared_statement_cache_capacity(64);
        Ok(db)
    }

    /// Holds `db_dir/schema.lock` exclusively until the returned file drops.
    fn lock_for_creation(db_dir: &Path) -> Result<std::fs::File, StoreError> {
        let path = db_dir.join("schema.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        super::lock::flock(&file, super::lock::LockKind::Exclusive, true)
            .map_err(|e| StoreError::io("lock", &path, e))?;
        Ok(file)
    }

    fn configure(&self) -> Result<(), StoreError> {
        // Nix waits up to an hour for a locked database; so do we.
        self.conn
            .busy_timeout(Duration::from_secs(3600))
            .map_err(|e| self.err(e))?;
        self.conn
            .execute_batch(
                // Nix's pragmas, except `synchronous`: Nix uses `normal`,
                // which in WAL mode may lose the last commits on a power cut.
                // Kiln promises that a registered path survives one, so each
                // commit syncs the WAL (`full`); adds are batched so that
                // costs one fsync per batch, not per path.
                "pragma foreign_keys = 1;
                 pragma synchronous = full;
                 pragma main.journal_mode = wal;
                 pragma wal_autocheckpoint = 40000;",
            )
            .map_err(|e| self.err(e))?;
        self.conn.set_prepared_statement_cache_capacity(64);
        Ok(())
    }

    fn create_schema(&self, db_dir: &Path) -> Result<(), StoreError> {
        self.conn
            .execute_batch(&format!("begin immediate; {SCHEMA} {CA_SCHEMA} commit;"))
            .or_else(|e| {
                // Another process may have created it between our check of
                // the schema file and now.
                let exists: bool = self
                    .conn
                    .query_row(
                        "select count(*) from sqlite_master where name = 'ValidPaths'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                    .map(|n| n > 0)
                    .unwrap_or(false);
                let _ = self.conn.execute_batch("rollback");
                if exists { Ok(()) } else { Err(self.err(e)) }
            })?;
        write_durably(&db_dir.join("ca-schema"), CA_SCHEMA_VERSION)?;
        write_durably(&db_dir.join("schema"), SCHEMA_VERSION)?;
        Ok(())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Database {
            db: self.file.clone(),
            source,
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::CorruptDatabase {
            db: self.file.clone(),
            what,
        }
    }

    fn print(&self, path: &StorePath) -> String {
        self.store_dir.print_path(path)
    }

    fn parse(&self, text: &str) -> Result<StorePath, StoreError> {
        self.store_dir
            .parse_path(text)
            .map_err(|e| self.corrupt(format!("bad path '{text}': {e}")))
    }

    /// The metadata of `path`, if valid.
    pub fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "select id, hash, registrationTime, deriver, narSize, ultimate, sigs, ca \
                 from ValidPaths where path = ?1",
            )
            .map_err(|e| self.err(e))?;
        type Row = (
            i64,
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = stmt
            .query_row([self.print(path)], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((id, hash, time, deriver, nar_size, ultimate, sigs, ca)) = row else {
            return Ok(None);
        };
        let nar_hash = Hash::parse_any(&hash, None).map_err(|e| {
            self.corrupt(format!(
                "path '{}' has bad hash '{hash}': {e}",
                self.print(path)
            ))
        })?;
        let mut info = PathInfo::new(path.clone(), nar_hash, nar_size.unwrap_or(0) as u64);
        info.registration_time = time;
        info.deriver = match deriver.as_deref() {
            Some(d) if !d.is_empty() => Some(self.parse(d)?),
            _ => None,
        };
        info.ultimate = ultimate.unwrap_or(0) != 0;
        info.sigs = sigs
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        info.ca = match ca.as_deref() {
            Some(c) if !c.is_empty() => Some(c.parse().map_err(|e| {
                self.corrupt(format!("path '{}' has bad ca '{c}': {e}", self.print(path)))
            })?),
            _ => None,
        };
        let mut refs = self
            .conn
            .prepare_cached(
                "select path from Refs join ValidPaths on reference = id where referrer = ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = refs
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        for r in rows {
            let r = r.map_err(|e| self.err(e))?;
            info.references.insert(self.parse(&r)?);
        }
        Ok(Some(info))
    }

    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("select 1 from ValidPaths where path = ?1 limit 1")
            .map_err(|e| self.err(e))?;
        stmt.exists([self.print(path)]).map_err(|e| self.err(e))
    }

    fn path_list(
        &self,
        sql: &str,
        param: impl rusqlite::Params,
    ) -> Result<StorePathSet, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(param, |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = StorePathSet::new();
        for r in rows {
            out.insert(self.parse(&r.map_err(|e| self.err(e))?)?);
        }
        Ok(out)
    }

    pub fn query_all_valid_paths(&self) -> Result<StorePathSet, StoreError> {
        self.path_list("select path from ValidPaths", [])
    }

    pub fn query_referrers(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        self.path_list(
            "select path from ValidPaths join Refs on referrer = id \
             where reference = (select id from ValidPaths where path = ?1)",
            [self.print(path)],
        )
    }

    /// Valid derivations that name `path` as one of their outputs.
    pub fn query_valid_derivers(&self, path: &StorePath) -> Result<StorePathSet, StoreError> {
        self.path_list(
            "select v.path from DerivationOutputs d join ValidPaths v on d.drv = v.id \
             where d.path = ?1",
            [self.print(path)],
        )
    }

    pub fn query_path_from_hash_part(
        &self,
        hash_part: &str,
    ) -> Result<Option<StorePath>, StoreError> {
        let prefix = format!("{}/{hash_part}", self.store_dir);
        let mut stmt = self
            .conn
            .prepare_cached("select path from ValidPaths where path >= ?1 limit 1")
            .map_err(|e| self.err(e))?;
        let found: Option<String> = stmt
            .query_row([&prefix], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        match found {
            Some(p) if p.starts_with(&prefix) => Ok(Some(self.parse(&p)?)),
            _ => Ok(None),
        }
    }

    pub fn query_derivation_outputs(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "select id, path from DerivationOutputs \
                 where drv = (select id from ValidPaths where path = ?1)",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([self.print(drv)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let (name, path) = r.map_err(|e| self.err(e))?;
            out.insert(name, self.parse(&path)?);
        }
        Ok(out)
    }

    /// Whether any path waits in the journal for its files' sync (a
    /// database without the table has none).
    pub fn has_journaled_paths(&self) -> Result<bool, StoreError> {
        let exists = self
            .conn
            .prepare_cached("select exists (select 1 from KilnUnsyncedPaths)")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, bool>(0)));
        match exists {
            Ok(any) => Ok(any),
            Err(rusqlite::Error::SqliteFailure(_, Some(message)))
                if message.starts_with("no such table") =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Starts a write transaction (`begin immediate`, so writers queue on
    /// the busy timeout instead of failing on upgrade).
    pub fn write(&mut self) -> Result<WriteTx<'_>, StoreError> {
        let file = self.file.clone();
        let store_dir = self.store_dir.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|source| StoreError::Database {
                db: file.clone(),
                source,
            })?;
        Ok(WriteTx {
            tx,
            file,
            store_dir,
        })
    }
}

/// Connections for queries, so that readers (the daemon's many clients)
/// neither queue behind one mutex nor wait for a writer's commit. Each
/// keeps its prepared statements across uses.
#[derive(Debug)]
pub struct ReadPool {
    idle: std::sync::Mutex<Vec<Db>>,
    db_dir: PathBuf,
    store_dir: StoreDir,
}

/// Idle connections kept; more are opened while many threads query at
/// once and closed afterwards.
const IDLE_READERS: usize = 32;

impl ReadPool {
    pub fn new(db_dir: &Path, store_dir: &StoreDir) -> ReadPool {
        ReadPool {
            idle: Default::default(),
            db_dir: db_dir.to_path_buf(),
            store_dir: store_dir.clone(),
        }
    }

    /// A connection for queries, returned to the pool when dropped.
    pub fn get(&self) -> Result<Reader<'_>, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let db = match idle {
            Some(db) => db,
            None => Db::open_reader(&self.db_dir, &self.store_dir)?,
        };
        Ok(Reader {
            pool: self,
            db: Some(db),
        })
    }
}

/// A pooled query connection (derefs to [`Db`]).
#[derive(Debug)]
pub struct Reader<'p> {
    pool: &'p ReadPool,
    db: Option<Db>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db.as_ref().expect("present until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.extend(self.db.take());
        }
    }
}

/// One write transaction on the database.
#[derive(Debug)]
pub struct WriteTx<'c> {
    tx: Transaction<'c>,
    file: PathBuf,
    store_dir: StoreDir,
}

impl WriteTx<'_> {
    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Database {
            db: self.file.clone(),
            source,
        }
    }

    /// Registers `infos` as valid (replacing the rows of paths that are
    /// valid already), then their references, which must be valid or among
    /// `infos`. `outputs` gives the outputs of the derivations among them.
    pub fn register(
        &self,
        infos: &[PathInfo],
        outputs: &BTreeMap<StorePath, BTreeMap<String, StorePath>>,
    ) -> Result<(), StoreError> {
        let mut ids = BTreeMap::new();
        {
            let mut insert = self
                .tx
                .prepare_cached(
                    "insert into ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca) \
                     values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(|e| self.err(e))?;
            let mut update = self
                .tx
                .prepare_cached(
                    "update ValidPaths set hash = ?2, registrationTime = ?3, deriver = ?4, narSize = ?5, \
                     ultimate = ?6, sigs = ?7, ca = ?8 where path = ?1",
                )
                .map_err(|e| self.err(e))?;
            let mut find = self
                .tx
                .prepare_cached("select id from ValidPaths where path = ?1")
                .map_err(|e| self.err(e))?;
            for info in infos {
                let path = self.store_dir.print_path(&info.path);
                let sigs = info.sigs.iter().cloned().collect::<Vec<_>>().join(" ");
                let values = params![
                    path,
                    info.nar_hash
                        .to_typed_string(kiln_formats::hash::HashFormat::Base16),
                    info.registration_time,
                    info.deriver.as_ref().map(|d| self.store_dir.print_path(d)),
                    (info.nar_size != 0).then_some(info.nar_size as i64),
                    info.ultimate.then_some(1i64),
                    (!sigs.is_empty()).then_some(sigs),
                    info.ca.as_ref().map(ToString::to_string),
                ];
                let existing: Option<i64> = find
                    .query_row([&path], |r| r.get(0))
                    .optional()
                    .map_err(|e| self.err(e))?;
                let id = match existing {
                    Some(id) => {
                        update.execute(values).map_err(|e| self.err(e))?;
                        id
                    }
                    None => {
                        insert.execute(values).map_err(|e| self.err(e))?;
                        self.tx.last_insert_rowid()
                    }
                };
                ids.insert(info.path.clone(), id);
            }
        }
        let mut find = self
            .tx
            .prepare_cached("select id from ValidPaths where path = ?1")
            .map_err(|e| self.err(e))?;
        let mut add_ref = self
            .tx
            .prepare_cached("insert or replace into Refs (referrer, reference) values (?1, ?2)")
            .map_err(|e| self.err(e))?;
        for info in infos {
            let referrer = ids[&info.path];
            for reference in &info.references {
                let id = match ids.get(reference) {
                    Some(id) => *id,
                    None => find
                        .query_row([self.store_dir.print_path(reference)], |r| r.get(0))
                        .optional()
                        .map_err(|e| self.err(e))?
                        .ok_or_else(|| StoreError::MissingReference {
                            path: self.store_dir.print_path(&info.path),
                            reference: self.store_dir.print_path(reference),
                        })?,
                };
                add_ref.execute([referrer, id]).map_err(|e| self.err(e))?;
            }
        }
        let mut add_output = self
            .tx
            .prepare_cached(
                "insert or replace into DerivationOutputs (drv, id, path) values (?1, ?2, ?3)",
            )
            .map_err(|e| self.err(e))?;
        for (drv, outs) in outputs {
            let Some(id) = ids.get(drv) else { continue };
            for (name, path) in outs {
                add_output
                    .execute(params![id, name, self.store_dir.print_path(path)])
                    .map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Removes `path` from the valid paths; fails if a valid path other
    /// than itself still refers to it.
    pub fn invalidate(&self, path: &StorePath) -> Result<(), StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("delete from ValidPaths where path = ?1")
            .map_err(|e| self.err(e))?;
        stmt.execute([self.store_dir.print_path(path)])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Adds `sigs` to the signatures of the valid path `path` (each kept
    /// once); false if the path is not valid.
    pub fn add_signatures(&self, path: &StorePath, sigs: &[String]) -> Result<bool, StoreError> {
        let printed = self.store_dir.print_path(path);
        let existing: Option<Option<String>> = self
            .tx
            .prepare_cached("select sigs from ValidPaths where path = ?1")
            .and_then(|mut s| s.query_row([&printed], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        let Some(existing) = existing else {
            return Ok(false);
        };
        let mut all: Vec<String> = existing
            .unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for sig in sigs {
            if !all.contains(sig) {
                all.push(sig.clone());
            }
        }
        self.tx
            .prepare_cached("update ValidPaths set sigs = ?2 where path = ?1")
            .and_then(|mut s| s.execute(params![printed, all.join(" ")]))
            .map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Replaces the NAR hash and size of a valid path (after a repair).
    pub fn update_hash(&self, path: &StorePath, hash: &Hash, size: u64) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("update ValidPaths set hash = ?2, narSize = ?3 where path = ?1")
            .and_then(|mut s| {
                s.execute(params![
                    self.store_dir.print_path(path),
                    hash.to_typed_string(kiln_formats::hash::HashFormat::Base16),
                    size as i64
                ])
            })
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The NAR hash `path` is registered with, as this transaction sees
    /// it (`None` when it is not valid, or its hash does not parse).
    pub fn registered_hash(&self, path: &StorePath) -> Result<Option<Hash>, StoreError> {
        let hash: Option<String> = self
            .tx
            .prepare_cached("select hash from ValidPaths where path = ?1")
            .and_then(|mut s| {
                s.query_row([self.store_dir.print_path(path)], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        Ok(hash.and_then(|h| Hash::parse_any(&h, None).ok()))
    }

    /// Keeps `nar` as the contents of `path` in this commit, until
    /// [`WriteTx::forget_journaled`] is given the returned id.
    pub fn journal_path(&self, path: &StorePath, nar: &[u8]) -> Result<i64, StoreError> {
        self.tx
            .execute_batch(JOURNAL_SCHEMA)
            .map_err(|e| self.err(e))?;
        self.tx
            .prepare_cached("insert into KilnUnsyncedPaths (path, nar) values (?1, ?2)")
            .and_then(|mut s| s.execute(params![self.store_dir.print_path(path), nar]))
            .map_err(|e| self.err(e))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Every journaled path (none when the table does not exist). Rows
    /// naming something that is not a store path come back as their ids.
    pub fn journaled_paths(&self) -> Result<Vec<Result<JournaledPath, i64>>, StoreError> {
        let exists: bool = self
            .tx
            .query_row(
                "select count(*) > 0 from sqlite_master where type = 'table' and name = ?1",
                [JOURNAL_TABLE],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        if !exists {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .tx
            .prepare("select id, path, nar from KilnUnsyncedPaths order by id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, path, nar) = row.map_err(|e| self.err(e))?;
            out.push(match self.store_dir.parse_path(&path) {
                Ok(path) => Ok(JournaledPath { id, path, nar }),
                Err(_) => Err(id),
            });
        }
        Ok(out)
    }

    /// Deletes the journal rows `ids` (their paths' files are synced).
    pub fn forget_journaled(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut stmt = self
            .tx
            .prepare_cached("delete from KilnUnsyncedPaths where id = ?1")
            .map_err(|e| self.err(e))?;
        for id in ids {
            stmt.execute([id]).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    pub fn commit(self) -> Result<(), StoreError> {
        let file = self.file.clone();
        self.tx
            .commit()
            .map_err(|source| StoreError::Database { db: file, source })
    }
}

/// Writes a small decimal file through a temporary name, fsync'd, so it is
/// never seen half-written.
fn write_durably(path: &Path, value: u32) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
    f.write_all(value.to_string().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| StoreError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io("rename into place", path, e))?;
    Ok(())
}

/// Every valid path with its references, deriver and recorded outputs, for
/// the collector (one scan of each table instead of a query per path).
#[derive(Debug, Default)]
pub struct Graph {
    pub paths: Vec<StorePath>,
    pub index: std::collections::HashMap<StorePath, usize>,
    pub references: Vec<Vec<usize>>,
    pub referrers: Vec<Vec<usize>>,
    pub deriver: Vec<Option<StorePath>>,
    /// Output paths of each derivation (by path, valid or not).
    pub outputs: Vec<Vec<StorePath>>,
    pub nar_size: Vec<u64>,
}

impl Db {
    pub fn load_graph(&self) -> Result<Graph, StoreError> {
        let mut g = Graph::default();
        let mut by_id = std::collections::HashMap::new();
        {
            let mut stmt = self
                .conn
                .prepare_cached("select id, path, deriver, narSize from ValidPaths")
                .map_err(|e| self.err(e))?;
            let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
            while let Some(r) = rows.next().map_err(|e| self.err(e))? {
                let id: i64 = r.get(0).map_err(|e| self.err(e))?;
                let path: String = r.get(1).map_err(|e| self.err(e))?;
                let deriver: Option<String> = r.get(2).map_err(|e| self.err(e))?;
                let size: Option<i64> = r.get(3).map_err(|e| self.err(e))?;
                let path = self.parse(&path)?;
                let i = g.paths.len();
                by_id.insert(id, i);
                g.index.insert(path.clone(), i);
                g.paths.push(path);
                g.deriver.push(
                    deriver
                        .filter(|d| !d.is_empty())
                        .and_then(|d| self.store_dir.parse_path(&d).ok()),
                );
                g.nar_size.push(size.unwrap_or(0) as u64);
            }
        }
        let n = g.paths.len();
        g.references = vec![Vec::new(); n];
        g.referrers = vec![Vec::new(); n];
        g.outputs = vec![Vec::new(); n];
        let mut stmt = self
            .conn
            .prepare_cached("select referrer, reference from Refs")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let (a, b): (i64, i64) = (
                r.get(0).map_err(|e| self.err(e))?,
                r.get(1).map_err(|e| self.err(e))?,
            );
            if let (Some(&a), Some(&b)) = (by_id.get(&a), by_id.get(&b)) {
                g.references[a].push(b);
                g.referrers[b].push(a);
            }
        }
        let mut stmt = self
            .conn
            .prepare_cached("select drv, path from DerivationOutputs")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let drv: i64 = r.get(0).map_err(|e| self.err(e))?;
            let path: String = r.get(1).map_err(|e| self.err(e))?;
            if let (Some(&d), Ok(p)) = (by_id.get(&drv), self.store_dir.parse_path(&path)) {
                g.outputs[d].push(p);
            }
        }
        Ok(g)
    }
}
