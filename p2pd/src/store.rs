//! The daemon's database: contacts with their pinned keys, message
//! history and outbox, and where each peer's message streams stand.
//!
//! SQLite in WAL mode with `synchronous=FULL`: a message `send` accepted is
//! on disk before the answer, and a received message is on disk before
//! its acknowledgement leaves (the daemon writes events before it sends
//! packets). Each batch of events is one transaction.

use proto::control::{Direction, HistoryEntry, MessageState, TransferState};
use proto::PublicIdentity;
use proto::{FileDesc, Group, GroupId, TransferId};
use proto::{Reader, Writer};
use rusqlite::{params, Connection, OptionalExtension};
use std::net::SocketAddr;
use std::path::Path;

const SCHEMA_VERSION: i64 = 6;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database was written by a newer p2pd (schema {0}, we know {SCHEMA_VERSION})")]
    TooNew(i64),
}

/// A known peer as stored.
#[derive(Debug, Clone)]
pub struct Contact {
    pub name: String,
    pub identity: Option<PublicIdentity>,
    pub recv_next: u64,
    /// A session with it was up when last heard of (it did not end by the
    /// user's `close` or the peer's going away): resume it at start.
    pub resume: bool,
    /// Its address on the last direct path that worked: where it is
    /// tried when the server is away.
    pub endpoint: Option<SocketAddr>,
    /// The last session with it went through the relay: the next one
    /// starts there at once.
    pub relayed: bool,
}

/// An outgoing message not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Queued {
    pub peer: String,
    pub seq: u64,
    pub sent_ms: u64,
    pub body: String,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        static CONFIG: std::sync::Once = std::sync::Once::new();
        CONFIG.call_once(|| {
            // No allocation statistics: they take a global mutex at every
            // allocation (the daemon's hottest lock). Only possible before
            // SQLite initializes; if it already has, nothing changes.
            // SAFETY: a documented configuration call, made once, before
            // this process opens any database.
            unsafe {
                rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0);
            }
        });
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // One process owns the database (the daemon holds `p2pd.lock`):
        // its locks are taken once, not around every transaction, and
        // the WAL index lives in its memory.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew(version));
        }
        if version < 1 {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS settings (
                     key TEXT PRIMARY KEY,
                     value TEXT NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS contacts (
                     name TEXT PRIMARY KEY,
                     identity BLOB,
                     send_next INTEGER NOT NULL DEFAULT 0,
                     recv_next INTEGER NOT NULL DEFAULT 0
                 );
                 CREATE TABLE IF NOT EXISTS messages (
                     id INTEGER PRIMARY KEY,
                     peer TEXT NOT NULL REFERENCES contacts(name),
                     direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
                     seq INTEGER NOT NULL,
                     sent_ms INTEGER NOT NULL,
                     state TEXT NOT NULL CHECK (state IN ('queued', 'delivered', 'received')),
                     body TEXT NOT NULL,
                     UNIQUE (peer, direction, seq)
                 );
                 CREATE INDEX IF NOT EXISTS messages_outbox ON messages(state) WHERE state = 'queued';
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        if version < 2 {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS transfers (
                     id INTEGER PRIMARY KEY,
                     peer TEXT NOT NULL,
                     direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
                     name TEXT NOT NULL,
                     path TEXT,
                     part TEXT,
                     size INTEGER NOT NULL,
                     piece_size INTEGER NOT NULL,
                     hash BLOB NOT NULL,
                     piece_hashes BLOB,
                     verified BLOB,
                     mtime_ns INTEGER,
                     state TEXT NOT NULL,
                     reason TEXT,
                     created_ms INTEGER NOT NULL,
                     grp INTEGER NOT NULL DEFAULT 0,
                     grp_files INTEGER NOT NULL DEFAULT 0
                 );
                 PRAGMA user_version = 2;
                 COMMIT;",
            )?;
        }
        if version < 3 {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE contacts ADD COLUMN session INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 3;
                 COMMIT;",
            )?;
        }
        if version < 4 {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE contacts ADD COLUMN endpoint TEXT;
                 ALTER TABLE contacts ADD COLUMN relayed INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 4;
                 COMMIT;",
            )?;
        }
        if version < 5 {
            // Delivery is cumulative (the peer acknowledges everything
            // below a number): one number per peer, not a write to every
            // message delivered. An outgoing message's `state` column
            // stays as written ('queued'); `send_acked` says what it is.
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE contacts ADD COLUMN send_acked INTEGER NOT NULL DEFAULT 0;
                 UPDATE contacts SET send_acked = COALESCE(
                     (SELECT MIN(seq) FROM messages
                      WHERE peer = contacts.name AND direction = 'out' AND state = 'queued'),
                     send_next);
                 DROP INDEX IF EXISTS messages_outbox;
                 PRAGMA user_version = 5;
                 COMMIT;",
            )?;
        }
        let has_transfers = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'transfers'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if version < 6 {
            // Pieces are checked with BLAKE3 from wire version 7 on: a
            // transfer under way holds SHA-256 piece hashes that no peer
            // of this version matches. It ends, saying so.
            let ended = match has_transfers {
                true => {
                    "UPDATE transfers SET state = 'ended',
                         reason = 'p2pd was upgraded (pieces are checked with BLAKE3 now): send the file again'
                     WHERE state NOT IN ('done', 'ended');"
                }
                false => "",
            };
            conn.execute_batch(&format!("BEGIN; {ended} PRAGMA user_version = 6; COMMIT;"))?;
        }
        // Indexes that keep every transfer query a lookup, not a scan, with
        // 100k records (`transfers` pages, id and directory prefixes,
        // counts of offers waiting); made on every open, once.
        if has_transfers {
            conn.execute_batch(
                "CREATE INDEX IF NOT EXISTS transfers_created ON transfers (created_ms DESC, id);
                 CREATE INDEX IF NOT EXISTS transfers_grp ON transfers (grp);
                 CREATE INDEX IF NOT EXISTS transfers_state ON transfers (state, direction);",
            )?;
        }
        Ok(Self { conn })
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, identity, recv_next, session, endpoint, relayed FROM contacts
             ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            let blob: Option<Vec<u8>> = r.get(1)?;
            Ok(Contact {
                name: r.get(0)?,
                identity: blob.and_then(|b| decode_identity(&b)),
                recv_next: r.get::<_, i64>(2)? as u64,
                resume: r.get::<_, i64>(3)? != 0,
                // A value that does not parse (edited by hand) is no
                // address: the server introduces as before.
                endpoint: r.get::<_, Option<String>>(4)?.and_then(|s| s.parse().ok()),
                relayed: r.get::<_, i64>(5)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn contact_identity(&self, name: &str) -> Result<Option<PublicIdentity>, StoreError> {
        let blob: Option<Option<Vec<u8>>> = self
            .conn
            .query_row(
                "SELECT identity FROM contacts WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(blob.flatten().and_then(|b| decode_identity(&b)))
    }

    /// Pins `identity` for `name` (the node already refused a different
    /// key, so this only ever sets or confirms it).
    pub fn pin(&self, name: &str, identity: &PublicIdentity) -> Result<(), StoreError> {
        let mut w = Writer::new();
        identity.encode(&mut w);
        self.conn.execute(
            "INSERT INTO contacts (name, identity) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET identity = excluded.identity",
            params![name, w.into_inner()],
        )?;
        Ok(())
    }

    /// Whether a session with `name` is up (a crash or restart of ours
    /// then resumes it at the next start).
    pub fn set_session(&self, name: &str, up: bool) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE contacts SET session = ?2 WHERE name = ?1",
            params![name, up as i64],
        )?;
        Ok(())
    }

    /// Where a direct path to `name` last worked, and whether the last
    /// session went through the relay.
    pub fn set_last_path(
        &self,
        name: &str,
        direct: Option<SocketAddr>,
        relayed: bool,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE contacts SET endpoint = ?2, relayed = ?3 WHERE name = ?1",
            params![name, direct.map(|a| a.to_string()), relayed as i64],
        )?;
        Ok(())
    }

    /// Stores an outgoing message in the outbox and gives it the peer's
    /// next sequence number.
    /// Queues one message to `peer` (its own transaction; see
    /// [`Batch::enqueue`] for many in one).
    pub fn enqueue(&mut self, peer: &str, sent_ms: u64, body: &str) -> Result<u64, StoreError> {
        let batch = self.batch()?;
        let seq = batch.enqueue(peer, sent_ms, body)?;
        batch.commit()?;
        Ok(seq)
    }

    pub fn outbox(&self) -> Result<Vec<Queued>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT m.peer, m.seq, m.sent_ms, m.body FROM contacts c
             JOIN messages m ON m.peer = c.name AND m.direction = 'out' AND m.seq >= c.send_acked
             ORDER BY m.peer, m.seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Queued {
                peer: r.get(0)?,
                seq: r.get::<_, i64>(1)? as u64,
                sent_ms: r.get::<_, i64>(2)? as u64,
                body: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Starts a batch: everything until [`Batch::commit`] is one
    /// transaction.
    pub fn batch(&mut self) -> Result<Batch<'_>, StoreError> {
        Ok(Batch {
            tx: self.conn.transaction()?,
        })
    }

    pub fn history(&self, peer: &str, limit: u32) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT direction, seq, sent_ms,
                 CASE WHEN direction = 'in' THEN 'received'
                      WHEN seq < (SELECT send_acked FROM contacts WHERE name = ?1) THEN 'delivered'
                      ELSE 'queued' END,
                 body
             FROM messages WHERE peer = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![peer, limit], |r| {
            let dir: String = r.get(0)?;
            let state: String = r.get(3)?;
            Ok(HistoryEntry {
                peer: peer.to_owned(),
                direction: if dir == "in" {
                    Direction::In
                } else {
                    Direction::Out
                },
                seq: r.get::<_, i64>(1)? as u64,
                sent_ms: r.get::<_, i64>(2)? as u64,
                state: match state.as_str() {
                    "queued" => MessageState::Queued,
                    "delivered" => MessageState::Delivered,
                    _ => MessageState::Received,
                },
                text: r.get(4)?,
            })
        })?;
        let mut v: Vec<HistoryEntry> = rows.collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }
}

pub struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
}

impl Batch<'_> {
    /// A message to `peer`, queued under the peer's next `seq` (returned).
    pub fn enqueue(&self, peer: &str, sent_ms: u64, body: &str) -> Result<u64, StoreError> {
        self.enqueue_many(peer, &[(sent_ms, body)])
    }

    /// Messages to `peer`, queued in order under its next `seq`s; returns
    /// the first. (The peer's row is written once for all of them.)
    pub fn enqueue_many(&self, peer: &str, msgs: &[(u64, &str)]) -> Result<u64, StoreError> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO contacts (name) VALUES (?1)")?
            .execute([peer])?;
        let n = msgs.len() as i64;
        let first: i64 = self
            .tx
            .prepare_cached(
                "UPDATE contacts SET send_next = send_next + ?2 WHERE name = ?1
                 RETURNING send_next - ?2",
            )?
            .query_row(params![peer, n], |r| r.get(0))?;
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO messages (peer, direction, seq, sent_ms, state, body)
             VALUES (?1, 'out', ?2, ?3, 'queued', ?4)",
        )?;
        for (i, (sent_ms, body)) in msgs.iter().enumerate() {
            insert.execute(params![peer, first + i as i64, *sent_ms as i64, body])?;
        }
        Ok(first as u64)
    }

    /// A message arrived in order: keep it and move the peer's receive
    /// position past it, together.
    pub fn received(
        &self,
        peer: &str,
        seq: u64,
        sent_ms: u64,
        body: &str,
    ) -> Result<(), StoreError> {
        self.received_many(peer, &[(seq, sent_ms, body)])
    }

    /// Messages that arrived in order from `peer`: kept, and the peer's
    /// receive position moved past the last, together.
    pub fn received_many(&self, peer: &str, msgs: &[(u64, u64, &str)]) -> Result<(), StoreError> {
        let Some(last) = msgs.iter().map(|m| m.0).max() else {
            return Ok(());
        };
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO contacts (name) VALUES (?1)")?
            .execute([peer])?;
        let mut insert = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO messages (peer, direction, seq, sent_ms, state, body)
             VALUES (?1, 'in', ?2, ?3, 'received', ?4)",
        )?;
        for (seq, sent_ms, body) in msgs {
            insert.execute(params![peer, *seq as i64, *sent_ms as i64, body])?;
        }
        self.tx
            .prepare_cached("UPDATE contacts SET recv_next = MAX(recv_next, ?2) WHERE name = ?1")?
            .execute(params![peer, (last + 1) as i64])?;
        Ok(())
    }

    pub fn delivered(&self, peer: &str, seq: u64) -> Result<(), StoreError> {
        self.delivered_range(peer, seq, seq + 1)
    }

    /// Our messages to `peer` numbered `from..to` were delivered (and,
    /// delivery being cumulative, every one before them).
    pub fn delivered_range(&self, peer: &str, from: u64, to: u64) -> Result<(), StoreError> {
        debug_assert!(from < to);
        self.tx
            .prepare_cached("UPDATE contacts SET send_acked = MAX(send_acked, ?2) WHERE name = ?1")?
            .execute(params![peer, to as i64])?;
        Ok(())
    }

    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit()?)
    }
}

/// A file transfer as stored: enough to show it, and to take it up again
/// after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub id: u64,
    pub peer: String,
    pub outgoing: bool,
    pub name: String,
    /// Out: the source file; in: the final path, once accepted.
    pub path: Option<String>,
    /// In: the partial file, once accepted.
    pub part: Option<String>,
    pub size: u64,
    pub piece_size: u32,
    pub hash: [u8; 32],
    /// Out: the pieces' hashes, concatenated.
    pub piece_hashes: Vec<u8>,
    /// In: one byte per piece, 1 when verified and synced.
    pub verified: Vec<u8>,
    /// Out: the source's modification time when hashed.
    pub mtime_ns: Option<i64>,
    /// Stored as its word (`offered`, `active`, `done` or `ended`).
    pub state: TransferState,
    pub reason: Option<String>,
    pub created_ms: u64,
    /// The directory sent with it (0: none), and its file count.
    pub group: u64,
    pub group_files: u32,
}

impl TransferRow {
    pub fn tid(&self) -> TransferId {
        TransferId(self.id)
    }

    /// The file as its offer describes it.
    pub fn desc(&self) -> FileDesc {
        FileDesc {
            id: self.tid(),
            path: self.name.clone(),
            size: self.size,
            piece_size: self.piece_size,
            hash: self.hash,
            group: (self.group != 0).then_some(Group {
                id: GroupId(self.group),
                files: self.group_files,
            }),
        }
    }
}

impl Store {
    pub fn insert_transfer(&self, t: &TransferRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO transfers (id, peer, direction, name, path, part, size, \
             piece_size, hash, piece_hashes, verified, mtime_ns, state, reason, created_ms, grp, grp_files) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                t.id as i64,
                t.peer,
                if t.outgoing { "out" } else { "in" },
                t.name,
                t.path,
                t.part,
                t.size as i64,
                t.piece_size,
                &t.hash[..],
                t.piece_hashes,
                t.verified,
                t.mtime_ns,
                t.state.as_str(),
                t.reason,
                t.created_ms as i64,
                t.group as i64,
                t.group_files,
            ],
        )?;
        Ok(())
    }

    /// An incoming file accepted: where it goes, what is held already.
    pub fn accept_transfer(
        &self,
        id: u64,
        path: &str,
        part: &str,
        verified: &[u8],
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE transfers SET path = ?2, part = ?3, verified = ?4, state = 'active' WHERE id = ?1",
            params![id as i64, path, part, verified],
        )?;
        Ok(())
    }

    pub fn transfer_state(
        &self,
        id: u64,
        state: TransferState,
        path: Option<&str>,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE transfers SET state = ?2, path = COALESCE(?3, path), reason = ?4 WHERE id = ?1",
            params![id as i64, state.as_str(), path, reason],
        )?;
        Ok(())
    }

    /// Transfers, newest first.
    pub fn transfers(&self) -> Result<Vec<TransferRow>, StoreError> {
        self.transfers_where("1", [])
    }

    /// A page of transfers, newest first: `limit` from `offset`, and how
    /// many there are in all.
    pub fn transfers_page(
        &self,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<TransferRow>, u64), StoreError> {
        let rows = self.transfers_query(
            "ORDER BY created_ms DESC, id LIMIT ?1 OFFSET ?2",
            params![limit, offset],
        )?;
        let total: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM transfers", [], |r| r.get(0))?;
        Ok((rows, total as u64))
    }

    /// At most two transfers whose ids lie in `lo..=hi` (an id prefix).
    pub fn transfers_in(&self, (lo, hi): (u64, u64)) -> Result<Vec<TransferRow>, StoreError> {
        self.transfers_query(
            "WHERE id BETWEEN ?1 AND ?2 ORDER BY id LIMIT 2",
            params![lo as i64, hi as i64],
        )
    }

    /// At most two directories whose ids lie in `lo..=hi`; `incoming`:
    /// received ones only.
    pub fn groups_in(&self, (lo, hi): (u64, u64), incoming: bool) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT DISTINCT grp FROM transfers WHERE grp BETWEEN ?1 AND ?2 AND grp != 0              AND (?3 = 0 OR direction = 'in') LIMIT 2",
        )?;
        let rows = stmt.query_map(params![lo as i64, hi as i64, incoming], |r| {
            r.get::<_, i64>(0).map(|g| g as u64)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Incoming transfers paused (a full disk).
    pub fn paused_incoming(&self) -> Result<Vec<TransferRow>, StoreError> {
        self.transfers_where("state = 'paused' AND direction = 'in'", [])
    }

    /// Incoming offers waiting for an answer, from everyone.
    pub fn offers_waiting(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM transfers WHERE state = 'offered' AND direction = 'in'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Directory `group` as offered so far: its files known, and how many
    /// its first file said it has (0 with none known).
    pub fn group_count(&self, group: u64) -> Result<(u64, u32), StoreError> {
        let (n, files): (i64, Option<u32>) = self.conn.query_row(
            "SELECT COUNT(*), MIN(grp_files) FROM transfers WHERE grp = ?1",
            [group as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((n as u64, files.unwrap_or(0)))
    }

    /// Forgets finished and ended transfers made before `before_ms`
    /// (their records only: files stay). Returns how many went.
    pub fn prune_transfers(&self, before_ms: u64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM transfers WHERE state IN ('done', 'ended') AND created_ms < ?1              AND (part IS NULL OR state = 'done')",
            [before_ms as i64],
        )?)
    }

    /// Incoming transfers of this content from `peer` that ended keeping
    /// their partial file (a full disk), to resume into; newest first.
    pub fn kept_parts(
        &self,
        peer: &str,
        hash: &[u8; 32],
        size: u64,
        piece_size: u32,
    ) -> Result<Vec<TransferRow>, StoreError> {
        self.transfers_where(
            "direction = 'in' AND state = 'ended' AND part IS NOT NULL \
             AND peer = ?1 AND hash = ?2 AND size = ?3 AND piece_size = ?4",
            params![peer, hash.as_slice(), size as i64, piece_size],
        )
    }

    /// The transfer's partial file is no longer its own (taken over by a
    /// new transfer of the same content).
    pub fn forget_part(&self, id: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE transfers SET part = NULL WHERE id = ?1",
            [id as i64],
        )?;
        Ok(())
    }

    pub fn transfer(&self, id: u64) -> Result<Option<TransferRow>, StoreError> {
        Ok(self
            .transfers_where("id = ?1", [id as i64])?
            .into_iter()
            .next())
    }

    /// The files of directory `group`.
    pub fn group_members(&self, group: u64) -> Result<Vec<TransferRow>, StoreError> {
        self.transfers_where("grp = ?1", [group as i64])
    }

    /// Whether `id` names a transfer or a directory already.
    pub fn id_taken(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM transfers WHERE id = ?1 OR grp = ?1 LIMIT 1",
                [id as i64],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Where incoming files under way will get their names.
    pub fn active_incoming_paths(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT path FROM transfers WHERE direction = 'in' AND state = 'active' \
             AND path IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Piece `piece` of incoming transfer `id` is verified and synced.
    pub fn piece_verified(&self, id: u64, piece: u32) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let blob: Option<Vec<u8>> = tx
            .query_row(
                "SELECT verified FROM transfers WHERE id = ?1",
                [id as i64],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let mut verified = blob.unwrap_or_default();
        if let Some(v) = verified.get_mut(piece as usize) {
            *v = 1;
            tx.execute(
                "UPDATE transfers SET verified = ?2 WHERE id = ?1",
                params![id as i64, verified],
            )?;
        }
        Ok(tx.commit()?)
    }

    fn transfers_where<P: rusqlite::Params>(
        &self,
        condition: &str,
        params: P,
    ) -> Result<Vec<TransferRow>, StoreError> {
        self.transfers_query(
            &format!("WHERE {condition} ORDER BY created_ms DESC, id"),
            params,
        )
    }

    /// Transfers selected by `tail` (what follows `FROM transfers`).
    fn transfers_query<P: rusqlite::Params>(
        &self,
        tail: &str,
        params: P,
    ) -> Result<Vec<TransferRow>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, peer, direction, name, path, part, size, piece_size, hash, \
             piece_hashes, verified, mtime_ns, state, reason, created_ms, grp, grp_files \
             FROM transfers {tail}"
        ))?;
        let rows = stmt.query_map(params, |r| {
            let hash: Vec<u8> = r.get(8)?;
            Ok(TransferRow {
                id: r.get::<_, i64>(0)? as u64,
                peer: r.get(1)?,
                outgoing: r.get::<_, String>(2)? == "out",
                name: r.get(3)?,
                path: r.get(4)?,
                part: r.get(5)?,
                size: r.get::<_, i64>(6)? as u64,
                piece_size: r.get(7)?,
                hash: hash.try_into().unwrap_or([0; 32]),
                piece_hashes: r.get::<_, Option<Vec<u8>>>(9)?.unwrap_or_default(),
                verified: r.get::<_, Option<Vec<u8>>>(10)?.unwrap_or_default(),
                mtime_ns: r.get(11)?,
                state: {
                    let word: String = r.get(12)?;
                    TransferState::parse(&word).ok_or_else(|| {
                        rusqlite::Error::FromSqlConversionFailure(
                            12,
                            rusqlite::types::Type::Text,
                            format!("unknown transfer state {word:?}").into(),
                        )
                    })?
                },
                reason: r.get(13)?,
                created_ms: r.get::<_, i64>(14)? as u64,
                group: r.get::<_, i64>(15)? as u64,
                group_files: r.get(16)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn decode_identity(bytes: &[u8]) -> Option<PublicIdentity> {
    let mut r = Reader::new(bytes);
    let id = PublicIdentity::decode(&mut r).ok()?;
    r.finish().ok()?;
    id.verify().ok()?;
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Identity;

    fn temp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("p2pd-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("p2pd.db")
    }

    #[test]
    fn outbox_history_and_positions_survive_reopening() {
        let path = temp("reopen");
        let bob = Identity::generate().public();
        {
            let mut s = Store::open(&path).unwrap();
            assert_eq!(s.enqueue("bob", 1, "one").unwrap(), 0);
            assert_eq!(s.enqueue("bob", 2, "two").unwrap(), 1);
            s.pin("bob", &bob).unwrap();
            let b = s.batch().unwrap();
            b.delivered("bob", 0).unwrap();
            b.received("bob", 0, 5, "hello").unwrap();
            b.received("bob", 0, 5, "hello").unwrap();
            b.commit().unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        let out = s.outbox().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].seq, out[0].body.as_str()), (1, "two"));
        let c = s.contacts().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].recv_next, 1);
        assert_eq!(c[0].identity.as_ref(), Some(&bob));
        assert_eq!(s.enqueue("bob", 3, "three").unwrap(), 2);
        let h = s.history("bob", 10).unwrap();
        let texts: Vec<_> = h.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "hello", "three"]);
        assert_eq!(h[0].state, MessageState::Delivered);
        assert_eq!(h[2].direction, Direction::In);
        assert_eq!(s.history("bob", 1).unwrap()[0].text, "three");
    }

    #[test]
    fn a_session_up_at_a_stop_is_remembered_for_the_next_start() {
        let path = temp("session");
        {
            let s = Store::open(&path).unwrap();
            s.pin("bob", &Identity::generate().public()).unwrap();
            s.pin("carol", &Identity::generate().public()).unwrap();
            assert!(s.contacts().unwrap().iter().all(|c| !c.resume));
            s.set_session("bob", true).unwrap();
            s.set_session("carol", true).unwrap();
            s.set_session("carol", false).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let c = s.contacts().unwrap();
        assert_eq!(
            c.iter()
                .map(|c| (c.name.as_str(), c.resume))
                .collect::<Vec<_>>(),
            [("bob", true), ("carol", false)]
        );
    }

    #[test]
    fn a_version_2_database_gains_its_new_columns() {
        // Version 2's tables, with one message delivered and two queued:
        // the later versions' columns appear, and the per-peer delivery
        // mark (version 5) is where the first queued message is.
        let path = temp("v2");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE contacts (name TEXT PRIMARY KEY, identity BLOB,
                     send_next INTEGER NOT NULL DEFAULT 0, recv_next INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO contacts (name, send_next) VALUES ('bob', 3);
                 CREATE TABLE messages (id INTEGER PRIMARY KEY, peer TEXT NOT NULL,
                     direction TEXT NOT NULL, seq INTEGER NOT NULL, sent_ms INTEGER NOT NULL,
                     state TEXT NOT NULL, body TEXT NOT NULL, UNIQUE (peer, direction, seq));
                 CREATE INDEX messages_outbox ON messages(state) WHERE state = 'queued';
                 INSERT INTO messages (peer, direction, seq, sent_ms, state, body) VALUES
                     ('bob', 'out', 0, 1, 'delivered', 'zero'),
                     ('bob', 'out', 1, 2, 'queued', 'one'),
                     ('bob', 'out', 2, 3, 'queued', 'two');
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let c = s.contacts().unwrap();
        assert_eq!((c[0].name.as_str(), c[0].resume), ("bob", false));
        assert_eq!(c[0].endpoint, None);
        let out: Vec<u64> = s.outbox().unwrap().iter().map(|q| q.seq).collect();
        assert_eq!(out, [1, 2]);
        let states: Vec<MessageState> = s
            .history("bob", 10)
            .unwrap()
            .iter()
            .map(|h| h.state)
            .collect();
        assert_eq!(
            states,
            [
                MessageState::Delivered,
                MessageState::Queued,
                MessageState::Queued
            ]
        );
    }

    #[test]
    fn a_peers_last_path_is_kept_and_bad_addresses_read_as_none() {
        let path = temp("endpoint");
        {
            let s = Store::open(&path).unwrap();
            s.pin("bob", &Identity::generate().public()).unwrap();
            s.pin("carol", &Identity::generate().public()).unwrap();
            s.set_last_path("bob", Some("203.0.113.7:4000".parse().unwrap()), true)
                .unwrap();
            s.conn
                .execute(
                    "UPDATE contacts SET endpoint = 'nonsense' WHERE name = 'carol'",
                    [],
                )
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let c = s.contacts().unwrap();
        assert_eq!(c[0].endpoint, Some("203.0.113.7:4000".parse().unwrap()));
        assert!(c[0].relayed);
        assert_eq!((c[1].endpoint, c[1].relayed), (None, false));
    }

    #[test]
    fn a_damaged_identity_blob_reads_as_unknown() {
        let path = temp("blob");
        let s = Store::open(&path).unwrap();
        s.conn
            .execute(
                "INSERT INTO contacts (name, identity) VALUES ('eve', x'0102')",
                [],
            )
            .unwrap();
        assert!(s.contact_identity("eve").unwrap().is_none());
    }
}

#[cfg(test)]
mod transfer_index_tests {
    use super::*;

    fn row(id: u64, group: u64, state: TransferState, created_ms: u64) -> TransferRow {
        TransferRow {
            id,
            peer: "bob".into(),
            outgoing: false,
            name: format!("f{id}"),
            path: None,
            part: None,
            size: 10,
            piece_size: 10,
            hash: [0; 32],
            piece_hashes: Vec::new(),
            verified: Vec::new(),
            mtime_ns: None,
            state,
            reason: None,
            created_ms,
            group,
            group_files: 3,
        }
    }

    fn store(tag: &str) -> Store {
        let d = std::env::temp_dir().join(format!("p2pd-idx-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Store::open(&d.join("p2pd.db")).unwrap()
    }

    #[test]
    fn transfers_under_way_end_when_pieces_change_hash() {
        // A version-5 database with one transfer done and one under way:
        // after the upgrade the one under way has ended, saying why.
        let path = store("v5-dir")
            .conn
            .path()
            .map(std::path::PathBuf::from)
            .unwrap();
        {
            let s = Store::open(&path).unwrap();
            s.insert_transfer(&row(1, 0, TransferState::Done, 1))
                .unwrap();
            s.insert_transfer(&row(2, 0, TransferState::Active, 2))
                .unwrap();
            s.conn.pragma_update(None, "user_version", 5).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let t = |id| s.transfer(id).unwrap().unwrap();
        assert_eq!(t(1).state, TransferState::Done);
        assert_eq!(t(2).state, TransferState::Ended);
        assert!(t(2).reason.unwrap().contains("BLAKE3"));
    }

    #[test]
    fn every_transfer_query_is_an_index_lookup_not_a_scan() {
        // D3: `transfers` pages, id and directory prefixes and the count of
        // offers waiting never read every record (the plan names an index,
        // never a bare scan of the table), so 100k records cost a page.
        let s = store("plan");
        for (sql, why) in [
            (
                "SELECT id FROM transfers ORDER BY created_ms DESC, id LIMIT 100 OFFSET 0",
                "page",
            ),
            (
                "SELECT id FROM transfers WHERE id BETWEEN 1 AND 2 ORDER BY id LIMIT 2",
                "id prefix",
            ),
            (
                "SELECT DISTINCT grp FROM transfers WHERE grp BETWEEN 1 AND 2 AND grp != 0 LIMIT 2",
                "directory prefix",
            ),
            (
                "SELECT COUNT(*) FROM transfers WHERE state = 'offered' AND direction = 'in'",
                "offers waiting",
            ),
            (
                "SELECT COUNT(*), MIN(grp_files) FROM transfers WHERE grp = 1",
                "directory count",
            ),
        ] {
            let plan: Vec<String> = {
                let mut stmt = s
                    .conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .unwrap();
                stmt.query_map([], |r| r.get::<_, String>(3))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            };
            let text = plan.join("; ");
            assert!(!plan.iter().any(|p| p == "SCAN transfers"), "{why}: {text}");
            assert!(
                text.contains("INDEX")
                    || text.contains("PRIMARY KEY")
                    || text.contains("INTEGER PRIMARY"),
                "{why}: {text}"
            );
        }
    }

    #[test]
    fn pages_prefixes_counts_and_pruning() {
        let s = store("page");
        for i in 0..250u64 {
            let st = if i < 100 {
                TransferState::Done
            } else {
                TransferState::Offered
            };
            s.insert_transfer(&row(
                0xabcd_0000_0000_0000 + i,
                (i % 5 == 0) as u64 * 7,
                st,
                i,
            ))
            .unwrap();
        }
        let (page, total) = s.transfers_page(100, 0).unwrap();
        assert_eq!((page.len(), total), (100, 250));
        assert_eq!(page[0].created_ms, 249, "newest first");
        let (page, _) = s.transfers_page(100, 200).unwrap();
        assert_eq!(page.len(), 50);
        assert_eq!(
            s.transfers_in((0xabcd_0000_0000_0005, 0xabcd_0000_0000_0005))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            s.transfers_in((0xabcd_0000_0000_0000, 0xabcd_ffff_ffff_ffff))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(s.offers_waiting().unwrap(), 150);
        assert_eq!(s.group_count(7).unwrap(), (50, 3));
        assert_eq!(s.groups_in((0, 10), true).unwrap(), [7]);
        // Done records made before 50 go; offers and newer stay.
        assert_eq!(s.prune_transfers(50).unwrap(), 50);
        assert_eq!(s.transfers_page(1000, 0).unwrap().1, 200);
    }
}
