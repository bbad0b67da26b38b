//! Accounts on disk: [`SqliteStore`], the durable [`AccountStore`] behind
//! the rendezvous server.
//!
//! One SQLite file, `<data-dir>/accounts.db`, owns the binding of names to
//! identities. The sans-IO [`proto::Server`] asks this store and
//! never touches the file itself. Each open connection is independent, so
//! two processes sharing the file (an operator's mistake, or a restart
//! overlapping the old process) still agree: the database, not this
//! process, decides who owns a name.
//!
//! Durability: WAL journal with `synchronous=FULL`, so a returned
//! [`RegisterOutcome::Created`] has been fsynced and survives a crash or a
//! power cut. The schema version lives in `PRAGMA user_version`.

use proto::{Account, AccountStore, RegisterOutcome, StoreError};
use proto::{PublicIdentity, PUBLIC_IDENTITY_LEN};
use proto::{Reader, Writer};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// File name of the account database inside the data directory.
pub const ACCOUNTS_DB: &str = "accounts.db";

/// The schema this binary writes. Version 0 is SQLite's "never set" value,
/// i.e. a fresh file.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a writer waits for another connection's lock before failing.
/// Registrations are single-row transactions held for one fsync, so five
/// seconds is far beyond any honest wait.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA_V1: &str = "
CREATE TABLE accounts (
    name       TEXT    PRIMARY KEY,
    sign_key   BLOB    NOT NULL UNIQUE,
    identity   BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
";

/// Why the account database could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open account database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot set up account database {path}: {source}")]
    Setup {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "account database {path} has schema version {found}; this binary knows up to \
         {supported} (was it written by a newer rendezvous?)"
    )]
    TooNew {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("account database {path} has the invalid schema version {found}")]
    BadVersion { path: String, found: i64 },
    #[error(
        "account database {path} stays in journal mode {mode:?}: WAL could not be enabled \
         (is it on a filesystem without shared-memory support?)"
    )]
    NoWal { path: String, mode: String },
    #[error("account database query failed: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("account database holds a damaged record for {name:?}: {detail}")]
    Damaged { name: String, detail: String },
    #[error("account database rejected the registration of {name:?} but holds no conflicting row")]
    Inconsistent { name: String },
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        StoreError(e.to_string())
    }
}

/// [`AccountStore`] on one SQLite connection.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema to [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let shown = path.display().to_string();
        let conn = Connection::open(path).map_err(|source| DbError::Open {
            path: shown.clone(),
            source,
        })?;
        let mut store = Self {
            conn,
            path: path.to_owned(),
        };
        store.setup().map_err(|e| match e {
            DbError::Query(source) => DbError::Setup {
                path: shown,
                source,
            },
            other => other,
        })?;
        Ok(store)
    }

    /// Opens `<data_dir>/accounts.db`.
    pub fn open_in(data_dir: &Path) -> Result<Self, DbError> {
        Self::open(&data_dir.join(ACCOUNTS_DB))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn setup(&mut self) -> Result<(), DbError> {
        // The busy timeout goes first: switching to WAL and migrating both
        // take locks another process may hold at this moment.
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        // `journal_mode` answers with the mode in force; anything but WAL
        // (e.g. a filesystem without shared memory) would quietly weaken
        // the concurrency this store relies on, so refuse it.
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::NoWal {
                path: self.path.display().to_string(),
                mode,
            });
        }
        // FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on
        // power loss, and an acknowledged registration must not vanish.
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.migrate()
    }

    /// Brings the schema to [`SCHEMA_VERSION`] inside one write transaction,
    /// so two processes opening a fresh file at once do not both create it.
    fn migrate(&mut self) -> Result<(), DbError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match found {
            SCHEMA_VERSION => return Ok(()),
            0 => {
                tx.execute_batch(SCHEMA_V1)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            }
            // Future migrations go here as `1 => ..`, each one step.
            found if found > SCHEMA_VERSION => {
                return Err(DbError::TooNew {
                    path: self.path.display().to_string(),
                    found,
                    supported: SCHEMA_VERSION,
                })
            }
            found => {
                return Err(DbError::BadVersion {
                    path: self.path.display().to_string(),
                    found,
                })
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// What a registration of `name` by `sign_key` would do given the rows
    /// visible to `conn`, or `None` when nothing stands in its way.
    fn conflict(
        conn: &Connection,
        name: &str,
        sign_key: &[u8; 32],
    ) -> Result<Option<RegisterOutcome>, DbError> {
        let owner: Option<Vec<u8>> = conn
            .prepare_cached("SELECT sign_key FROM accounts WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?;
        if let Some(owner) = owner {
            return Ok(Some(if owner.as_slice() == sign_key.as_slice() {
                RegisterOutcome::AlreadyYours
            } else {
                RegisterOutcome::NameTaken
            }));
        }
        let other: Option<String> = conn
            .prepare_cached("SELECT name FROM accounts WHERE sign_key = ?1")?
            .query_row([sign_key.as_slice()], |r| r.get(0))
            .optional()?;
        Ok(other.map(RegisterOutcome::KeyHasName))
    }

    fn register_inner(
        &mut self,
        name: &str,
        identity: &PublicIdentity,
    ) -> Result<RegisterOutcome, DbError> {
        let mut w = Writer::new();
        identity.encode(&mut w);
        let encoded = w.into_inner();
        let created_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);

        // IMMEDIATE takes the write lock before the first read, so the check
        // and the insert below see the same database: no other connection
        // can slip a row in between them.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(outcome) = Self::conflict(&tx, name, &identity.sign_key)? {
            return Ok(outcome);
        }
        let inserted = tx
            .prepare_cached(
                "INSERT INTO accounts (name, sign_key, identity, created_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(rusqlite::params![
                name,
                identity.sign_key.as_slice(),
                encoded,
                created_at
            ]);
        match inserted {
            Ok(_) => {
                tx.commit()?;
                Ok(RegisterOutcome::Created)
            }
            // The constraints are the final arbiter. The lock above makes
            // this unreachable in practice, but if the check ever misses a
            // row, the answer still comes from what the database holds.
            Err(e) if is_constraint(&e) => {
                drop(tx);
                Self::conflict(&self.conn, name, &identity.sign_key)?.ok_or_else(|| {
                    DbError::Inconsistent {
                        name: name.to_owned(),
                    }
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn account(
        &mut self,
        sql: &str,
        key: &dyn rusqlite::ToSql,
    ) -> Result<Option<Account>, DbError> {
        let row: Option<(String, Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached(sql)?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((name, sign_key, blob)) = row else {
            return Ok(None);
        };
        let identity = decode_identity(&name, &blob)?;
        // The key column is what lookups and uniqueness use; a blob that
        // disagrees with it means the file was edited or damaged.
        if identity.sign_key.as_slice() != sign_key.as_slice() {
            return Err(DbError::Damaged {
                name,
                detail: "identity does not match its sign_key column".into(),
            });
        }
        Ok(Some(Account { name, identity }))
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::ConstraintViolation))
}

fn decode_identity(name: &str, blob: &[u8]) -> Result<PublicIdentity, DbError> {
    let damaged = |detail: String| DbError::Damaged {
        name: name.to_owned(),
        detail,
    };
    if blob.len() != PUBLIC_IDENTITY_LEN {
        return Err(damaged(format!(
            "identity is {} bytes, expected {PUBLIC_IDENTITY_LEN}",
            blob.len()
        )));
    }
    let mut r = Reader::new(blob);
    let id = PublicIdentity::decode(&mut r).map_err(|e| damaged(e.to_string()))?;
    r.finish().map_err(|e| damaged(e.to_string()))?;
    Ok(id)
}

impl AccountStore for SqliteStore {
    fn register(
        &mut self,
        name: &str,
        identity: &PublicIdentity,
    ) -> Result<RegisterOutcome, StoreError> {
        Ok(self.register_inner(name, identity)?)
    }

    fn by_key(&mut self, sign_key: &[u8; 32]) -> Result<Option<Account>, StoreError> {
        let key: &[u8] = sign_key;
        Ok(self.account(
            "SELECT name, sign_key, identity FROM accounts WHERE sign_key = ?1",
            &key,
        )?)
    }

    fn by_name(&mut self, name: &str) -> Result<Option<Account>, StoreError> {
        Ok(self.account(
            "SELECT name, sign_key, identity FROM accounts WHERE name = ?1",
            &name,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::TestDir;
    use proto::Identity;
    use std::sync::{Arc, Barrier};

    fn id() -> PublicIdentity {
        Identity::generate().public()
    }

    #[test]
    fn register_outcomes_match_memory_store() {
        let dir = TestDir::new("outcomes");
        let mut s = SqliteStore::open_in(dir.path()).unwrap();
        let (a, b) = (id(), id());
        assert_eq!(s.register("alice", &a).unwrap(), RegisterOutcome::Created);
        assert_eq!(
            s.register("alice", &a).unwrap(),
            RegisterOutcome::AlreadyYours
        );
        assert_eq!(s.register("alice", &b).unwrap(), RegisterOutcome::NameTaken);
        assert_eq!(
            s.register("alice2", &a).unwrap(),
            RegisterOutcome::KeyHasName("alice".into())
        );
        assert_eq!(s.register("bob", &b).unwrap(), RegisterOutcome::Created);

        let got = s.by_name("alice").unwrap().unwrap();
        assert_eq!(got.identity, a);
        assert_eq!(s.by_key(&b.sign_key).unwrap().unwrap().name, "bob");
        assert_eq!(s.by_name("carol").unwrap(), None);
        assert_eq!(s.by_key(&[9; 32]).unwrap(), None);
    }

    #[test]
    fn accounts_survive_reopen() {
        let dir = TestDir::new("reopen");
        let a = id();
        {
            let mut s = SqliteStore::open_in(dir.path()).unwrap();
            assert_eq!(s.register("alice", &a).unwrap(), RegisterOutcome::Created);
        }
        let mut s = SqliteStore::open_in(dir.path()).unwrap();
        assert_eq!(
            s.by_name("alice").unwrap(),
            Some(Account {
                name: "alice".into(),
                identity: a.clone(),
            })
        );
        assert_eq!(
            s.register("alice", &a).unwrap(),
            RegisterOutcome::AlreadyYours
        );
        let version: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = TestDir::new("newer");
        drop(SqliteStore::open_in(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(ACCOUNTS_DB)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(
            SqliteStore::open_in(dir.path()),
            Err(DbError::TooNew { found, .. }) if found == SCHEMA_VERSION + 1
        ));
    }

    #[test]
    fn a_damaged_identity_is_an_error_not_a_panic() {
        let dir = TestDir::new("damaged");
        let mut s = SqliteStore::open_in(dir.path()).unwrap();
        s.conn
            .execute(
                "INSERT INTO accounts VALUES ('eve', ?1, x'0102', 0)",
                [[7u8; 32].as_slice()],
            )
            .unwrap();
        assert!(s.by_name("eve").is_err());
        assert!(s.by_key(&[7; 32]).is_err());
    }

    /// Two processes (here: two threads, two connections to one file)
    /// racing for one name with different keys: exactly one wins.
    #[test]
    fn racing_registrations_have_one_winner() {
        let dir = TestDir::new("race");
        // Each round uses a fresh name so the race is repeated many times.
        const ROUNDS: usize = 20;
        let stores: Vec<SqliteStore> = (0..2)
            .map(|_| SqliteStore::open_in(dir.path()).unwrap())
            .collect();
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = stores
            .into_iter()
            .map(|mut s| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    (0..ROUNDS)
                        .map(|round| {
                            let me = id();
                            barrier.wait();
                            s.register(&format!("name{round}"), &me).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<RegisterOutcome>> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results[0].len(), ROUNDS);
        for (round, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
            let mut outcomes = [a.clone(), b.clone()];
            outcomes.sort_by_key(|o| matches!(o, RegisterOutcome::NameTaken));
            assert_eq!(
                outcomes,
                [RegisterOutcome::Created, RegisterOutcome::NameTaken],
                "round {round}"
            );
        }
    }
}
