//! The rendezvous (introduction) server.
//!
//! # Map
//!
//! * [`proto::Server`] (not here) is the protocol: handshakes,
//!   logins, presence, introductions. It is sans-IO.
//! * [`run`] is the I/O shell: it owns the UDP socket, reads the clock,
//!   loads the server's key file and feeds datagrams and deadlines to the
//!   machine, sending whatever it queues. Start it with [`bind`] then
//!   [`Bound::run`], or [`serve`] in one call.
//! * [`tcp`] carries the same datagrams over TCP for clients whose
//!   networks drop UDP, on the same port.
//! * [`store`] owns the accounts: [`SqliteStore`], the durable
//!   [`proto::AccountStore`] in `<data-dir>/accounts.db`.
//!
//! The `rendezvous` binary only parses flags, sets up logging and signals,
//! and calls [`bind`]; tests start the same server in-process.
//!
//! # Data directory
//!
//! * `server.key`: the server's identity (mode 0600). Its Noise public key
//!   is what clients pin; losing the file makes every client see a key
//!   change.
//! * `accounts.db` (+ `-wal`, `-shm`): names bound to identities.

pub mod run;
pub mod store;
pub mod tcp;

pub use run::{bind, ensure_data_dir, load_server_key, serve, Bound, Config, SERVER_KEY};
pub use store::{DbError, SqliteStore, ACCOUNTS_DB};

#[cfg(test)]
pub(crate) mod testdir {
    use std::path::{Path, PathBuf};

    /// A directory under the system temp dir, removed on drop.
    pub struct TestDir(PathBuf);

    impl TestDir {
        pub fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir()
                .join(format!("rendezvous-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).expect("create test dir");
            Self(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
