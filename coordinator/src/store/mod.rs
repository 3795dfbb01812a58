//! The coordinator's durable state in one SQLite database.
//!
//! Every write is one `BEGIN IMMEDIATE` transaction on a WAL journal with
//! `synchronous=FULL`, so a commit has reached the disk before the call returns: the
//! coordinator can be killed (SIGKILL, power loss) at any instant and, reopened, finds every
//! committed update and model and nothing half-written. The store keeps model and update
//! payloads as opaque blobs; callers encode them.
//!
//! The database is three files while open (`state.sqlite3` plus its `-wal` and `-shm`);
//! copy it with SQLite's backup API or `sqlite3 state.sqlite3 .backup`, not `cp`.

mod devices;
mod federation;
mod status;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

use crate::error::{InitError, OpenError};

pub use devices::DeviceRecord;
pub use federation::{
    AcceptedUpdate, CHECKPOINTS_KEPT, FailureRecord, ModelCheckpoint, RoundRecord,
};
pub use status::{RoundStatus, Status};

/// The schema version this build writes (`PRAGMA user_version`). It also opens version 1,
/// upgrading it in place (see [`MIGRATIONS`]).
pub const SCHEMA_VERSION: i64 = 2;

/// `MIGRATIONS[v - 1]` takes a database from version `v` to `v + 1`.
const MIGRATIONS: [&str; 1] = [
    // 2: each device's last accepted update, for the agent's error feedback (protocol 3).
    // Unknown for updates accepted before the upgrade.
    "ALTER TABLE devices ADD COLUMN last_accepted_round INTEGER;
     ALTER TABLE devices ADD COLUMN last_accepted_attempt INTEGER;",
];

/// How long a write waits for another process's write (an admin command beside a running
/// server) before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The current version. Devices are never deleted (revocation keeps the row for audit), so
/// `MAX(id) + 1` hands out ids in enrolment order from 0.
const SCHEMA: &str = "
CREATE TABLE devices (
    id               INTEGER PRIMARY KEY,  -- enrolment order from 0 = the simulator's index
    name             TEXT    NOT NULL UNIQUE,
    credential_salt  BLOB    NOT NULL,     -- 16 random bytes
    credential_hash  BLOB    NOT NULL,     -- SHA-256(salt || secret); the secret is not kept
    anchor_expert    INTEGER,              -- the expert this device anchors, if any
    enrolled_at_ms   INTEGER NOT NULL,     -- unix milliseconds
    revoked_at_ms    INTEGER,              -- set by revoke; a revoked device cannot log in
    last_seen_ms     INTEGER,
    updates_accepted INTEGER NOT NULL DEFAULT 0,  -- lifetime count; updates rows are pruned
    failures         INTEGER NOT NULL DEFAULT 0,  -- lifetime count; the log is pruned
    last_accepted_round   INTEGER,                -- the device's last accepted update
    last_accepted_attempt INTEGER
) STRICT;
-- At most one live anchor per expert; revoking an anchor frees its expert.
CREATE UNIQUE INDEX one_live_anchor_per_expert ON devices (anchor_expert)
    WHERE anchor_expert IS NOT NULL AND revoked_at_ms IS NULL;

-- Global model checkpoints; the newest few are kept.
CREATE TABLE models (
    rounds_completed INTEGER PRIMARY KEY,
    blob             BLOB    NOT NULL,
    committed_at_ms  INTEGER NOT NULL
) STRICT;

-- Round attempts begun and not yet folded into a model.
CREATE TABLE rounds (
    round       INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    begun_at_ms INTEGER NOT NULL,
    PRIMARY KEY (round, attempt)
) STRICT;
CREATE TABLE round_participants (
    round     INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    device_id INTEGER NOT NULL REFERENCES devices (id),
    PRIMARY KEY (round, attempt, device_id),
    FOREIGN KEY (round, attempt) REFERENCES rounds (round, attempt) ON DELETE CASCADE
) STRICT;

-- Accepted updates not yet folded into a model: one per device per round attempt (a
-- device re-selected when a failed attempt is retried uploads again).
CREATE TABLE updates (
    round          INTEGER NOT NULL,
    device_id      INTEGER NOT NULL REFERENCES devices (id),
    attempt        INTEGER NOT NULL,
    blob           BLOB    NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    PRIMARY KEY (round, attempt, device_id)
) STRICT;

-- Failures and other events: exact counts per kind, and the most recent entries.
CREATE TABLE failure_counts (
    kind  TEXT    PRIMARY KEY,
    count INTEGER NOT NULL
) STRICT;
CREATE TABLE failures (
    id        INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    device_id INTEGER REFERENCES devices (id),
    kind      TEXT    NOT NULL,
    detail    TEXT    NOT NULL
) STRICT;
";

/// The coordinator's state database. Reads take `&self`; every write takes `&mut self` and
/// is one transaction. Share it between tasks behind a `std::sync::Mutex`.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Creates a new database at `path` with the current schema. Fails if the file exists.
    pub fn create(path: &Path) -> Result<Self, InitError> {
        // create_new makes "already there" atomic; SQLite takes an empty file as an empty
        // database.
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::AlreadyExists => InitError::AlreadyExists {
                    path: path.to_path_buf(),
                },
                _ => InitError::Io {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let database = |source| InitError::Database {
            path: path.to_path_buf(),
            source,
        };
        let mut conn =
            Connection::open_with_flags(path, existing_file_flags()).map_err(database)?;
        configure(&conn).map_err(database)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(database)?;
        tx.execute_batch(SCHEMA).map_err(database)?;
        // user_version lives in the database header, so it commits with the schema.
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(database)?;
        tx.commit().map_err(database)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing database, checking that it is SQLite and has this build's schema.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => {
                return Err(OpenError::MissingFile {
                    path: path.to_path_buf(),
                });
            }
            Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(OpenError::MissingFile {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(OpenError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        let sqlite = |source: rusqlite::Error| {
            let path = path.to_path_buf();
            match source.sqlite_error_code() {
                Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                    OpenError::NotADatabase { path, source }
                }
                _ => OpenError::Database { path, source },
            }
        };
        // No SQLITE_OPEN_CREATE: a file removed since the check above is an error, not a
        // fresh empty database.
        let conn = Connection::open_with_flags(path, existing_file_flags()).map_err(sqlite)?;
        // The first statement that reads the header is where garbage is detected.
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sqlite)?;
        if !(1..=SCHEMA_VERSION).contains(&found) {
            return Err(OpenError::SchemaVersion {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        configure(&conn).map_err(sqlite)?;
        let mut conn = conn;
        if found < SCHEMA_VERSION {
            migrate(&mut conn, found).map_err(sqlite)?;
            tracing::info!(path = %path.display(), from = found, to = SCHEMA_VERSION, "upgraded the state database");
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a write transaction that holds the write lock from its first statement, so
    /// checks made inside it stay true until it commits.
    fn write(&mut self) -> rusqlite::Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
    }
}

/// Upgrades a database of version `found` to [`SCHEMA_VERSION`] in one transaction, so a
/// crash leaves it at `found` or upgraded, never between.
fn migrate(conn: &mut Connection, found: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    // Another process may have upgraded it since `found` was read.
    let now: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for version in now.max(found)..SCHEMA_VERSION {
        tx.execute_batch(MIGRATIONS[(version - 1) as usize])?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

fn existing_file_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

/// Per-connection settings (only `journal_mode` persists in the file).
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers (`status`) never block the writer, and a commit is one append.
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Still durable with FULL sync, just slower; some filesystems refuse WAL.
        tracing::warn!(journal_mode = %mode, "SQLite could not switch to WAL");
    }
    // FULL fsyncs the WAL at every commit. NORMAL would be crash-safe but could lose the
    // last commits on power loss, and an accepted update must never be lost.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

/// Wall-clock time as unix milliseconds, for audit timestamps.
fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            // SQLite integers are i64; no clock reaches that in milliseconds.
            u64::try_from(since.as_millis()).map_or(i64::MAX as u64, |ms| ms.min(i64::MAX as u64))
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ddome_protocol::message::UpdateId;

    /// A fresh store in a temporary directory that lives as long as the returned guard.
    pub(crate) fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("a temporary directory can be made");
        let store = Store::create(&dir.path().join("state.sqlite3"))
            .expect("a new store can be created in an empty directory");
        (dir, store)
    }

    /// A store with `n` enrolled devices, ids 0..n.
    pub(crate) fn store_with_devices(n: u64) -> (tempfile::TempDir, Store) {
        let (dir, mut store) = temp_store();
        for i in 0..n {
            store.enroll(&format!("device-{i}"), None).unwrap();
        }
        (dir, store)
    }

    fn pragma(store: &Store, name: &str) -> String {
        store
            .conn
            .pragma_query_value(None, name, |row| {
                Ok(match row.get_ref(0)? {
                    rusqlite::types::ValueRef::Text(text) => {
                        String::from_utf8_lossy(text).into_owned()
                    }
                    other => other.as_i64()?.to_string(),
                })
            })
            .unwrap()
    }

    #[test]
    fn created_and_reopened_stores_use_wal_full_sync_and_foreign_keys() {
        let (dir, store) = temp_store();
        let path = store.path().to_path_buf();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(pragma(&store, "journal_mode"), "wal");
        assert_eq!(pragma(&store, "synchronous"), "2"); // FULL
        assert_eq!(pragma(&store, "foreign_keys"), "1");
        assert_eq!(pragma(&store, "user_version"), SCHEMA_VERSION.to_string());
        assert_eq!(pragma(&store, "busy_timeout"), "10000");
        drop(dir);
    }

    #[test]
    fn committed_writes_survive_a_connection_that_is_never_closed() {
        let (dir, mut store) = temp_store();
        for name in ["a", "b", "c"] {
            store.enroll(name, None).unwrap();
        }
        store.commit_model(4, b"model 4").unwrap();
        store.begin_round(4, 0, &[0, 1, 2], 99).unwrap();
        for device_id in 0..3 {
            store
                .accept_update(4, 0, device_id, &[device_id as u8; 5000])
                .unwrap();
        }
        let path = store.path().to_path_buf();
        // No destructor: no checkpoint, no close, as after SIGKILL.
        std::mem::forget(store);

        // The files as they lie on disk now, without the shared-memory index, which SQLite
        // rebuilds: opening them must replay the WAL.
        let wal = std::fs::read(dir.path().join("state.sqlite3-wal")).unwrap();
        assert!(!wal.is_empty(), "the commits are still in the WAL");
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(&path, copy.path().join("state.sqlite3")).unwrap();
        std::fs::write(copy.path().join("state.sqlite3-wal"), wal).unwrap();

        for reopened in [
            Store::open(&copy.path().join("state.sqlite3")),
            Store::open(&path),
        ] {
            let store = reopened.unwrap();
            assert_eq!(store.global_model().unwrap().unwrap().blob, b"model 4");
            assert_eq!(store.current_round().unwrap().unwrap().selected, [0, 1, 2]);
            let updates = store.accepted_updates(4).unwrap();
            assert_eq!(updates.len(), 3);
            for update in updates {
                assert_eq!(update.blob, [update.device_id as u8; 5000]);
            }
        }
    }

    #[test]
    fn create_refuses_an_existing_file() {
        let (_dir, store) = temp_store();
        let path = store.path().to_path_buf();
        drop(store);
        let err = Store::create(&path).unwrap_err();
        assert!(
            matches!(&err, InitError::AlreadyExists { path: p } if *p == path),
            "{err}"
        );
        // The existing database is untouched.
        Store::open(&path).unwrap();
    }

    #[test]
    fn opening_a_missing_file_names_it_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite3");
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(&err, OpenError::MissingFile { path: p } if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("state.sqlite3"));
        assert!(!path.exists());
    }

    #[test]
    fn opening_garbage_is_a_not_a_database_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite3");
        let long_garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
        for garbage in [&b"this is not a database"[..], &long_garbage] {
            std::fs::write(&path, garbage).unwrap();
            let err = Store::open(&path).unwrap_err();
            assert!(
                matches!(&err, OpenError::NotADatabase { path: p, .. } if *p == path),
                "{err}"
            );
            assert!(err.to_string().contains(&*path.to_string_lossy()));
        }
    }

    #[test]
    fn a_version_1_database_is_upgraded_in_place_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite3");
        // Version 1's devices table, with a device that has one accepted update.
        let conn = Connection::open(&path).unwrap();
        let v1 = SCHEMA
            .replace(
                "failures         INTEGER NOT NULL DEFAULT 0,  -- lifetime count; the log is pruned\n    last_accepted_round   INTEGER,                -- the device's last accepted update\n    last_accepted_attempt INTEGER",
                "failures         INTEGER NOT NULL DEFAULT 0",
            );
        assert_ne!(
            v1, SCHEMA,
            "the version 1 schema is rebuilt from the current one"
        );
        conn.execute_batch(&v1).unwrap();
        conn.execute(
            "INSERT INTO devices (id, name, credential_salt, credential_hash, enrolled_at_ms, \
             updates_accepted) VALUES (0, 'pi-1', x'00', x'00', 5, 1)",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);

        let mut store = Store::open(&path).unwrap();
        assert_eq!(pragma(&store, "user_version"), SCHEMA_VERSION.to_string());
        let device = store.device("pi-1").unwrap().unwrap();
        assert_eq!(device.updates_accepted, 1);
        assert_eq!(device.last_accepted, None);
        store.begin_round(0, 0, &[0], 99).unwrap();
        store.accept_update(0, 0, 0, b"update").unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let device = store.device("pi-1").unwrap().unwrap();
        assert_eq!(
            device.last_accepted,
            Some(UpdateId {
                round: 0,
                attempt: 0
            })
        );
    }

    #[test]
    fn opening_another_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A valid SQLite file that is not ours (user_version 0), and one from the future.
        for found in [0, SCHEMA_VERSION + 1] {
            let path = dir.path().join(format!("v{found}.sqlite3"));
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE other (x INTEGER)")
                .unwrap();
            conn.pragma_update(None, "user_version", found).unwrap();
            drop(conn);
            let err = Store::open(&path).unwrap_err();
            match &err {
                OpenError::SchemaVersion {
                    path: p,
                    found: f,
                    supported,
                } => {
                    assert_eq!(p, &path);
                    assert_eq!(*f, found);
                    assert_eq!(*supported, SCHEMA_VERSION);
                }
                other => panic!("expected a schema version error, got {other}"),
            }
        }
    }
}
