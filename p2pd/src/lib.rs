//! `p2pd`: the per-user chat daemon.
//!
//! # Map
//!
//! * [`daemon`]: the one task that owns the protocol [`proto::Node`],
//!   the UDP socket and the database; it runs the node from its deadlines
//!   and turns control requests into node calls and node events into
//!   stored messages, answers and watch events. Split by job: `control`
//!   (requests and the answers that wait), `events` (node events: stored,
//!   answered, broadcast), `transfers` (file commands), `records`
//!   (transfer events and disk results into the database).
//! * [`files`]: the node's disk side (`proto::FileIo`): reading,
//!   writing, hashing, verifying, naming.
//! * [`ctl`]: the control socket: accepts same-user connections and moves
//!   JSON lines between them and the daemon task.
//! * [`store`]: the SQLite database (contacts, history, outbox,
//!   transfers).
//! * [`addrs`]: our candidate addresses, and dual-stack address forms.
//! * [`netwatch`]: the host's links and addresses coming and going
//!   (rtnetlink), which the node hears as a network change.
//! * [`sockets`]: the extra sockets of port prediction, opened and closed
//!   as the node asks.
//! * [`tcp`]: the TCP connection to the server, opened and closed as the
//!   node asks (for networks that drop UDP).
//!
//! Data flows one way per direction: datagram → node → events (stored
//! first) → transmits (each naming its socket); request line → daemon →
//! node → response line. Every protocol decision (timers, fallbacks,
//! which way a datagram leaves) is the node's; the daemon owns the
//! sockets, the files and the database.
//!
//! ```text
//!  p2pctl ──JSON──▶ ctl ──▶ daemon::control ──▶ Node (proto) ──▶ Transmit{via} ──▶ UDP / TCP / sockets
//!                              ▲                 │  ▲
//!                 daemon::events ◀── NodeEvent ──┘  └── FileIo ◀──▶ files (disk thread)
//!                      │
//!                    store (SQLite)
//! ```

pub mod addrs;
pub mod ctl;
pub mod daemon;
pub mod files;
pub mod netwatch;
pub mod sockets;
pub mod store;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the daemon needs to start, resolved (no defaults left).
#[derive(Debug, Clone)]
pub struct Config {
    /// The rendezvous server.
    pub server: SocketAddr,
    /// The server's Noise key, if given on the command line. Otherwise the
    /// key pinned in the database is used, or the first one seen is
    /// pinned (trust on first use).
    pub server_key: Option<[u8; 32]>,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    /// Local UDP address to bind (port 0 picks one).
    pub listen: SocketAddr,
    /// Heartbeat interval to the server.
    pub heartbeat: Duration,
    /// Keepalive interval on idle peer sessions.
    pub keepalive: Duration,
    /// Where accepted files go when `accept-file` names no directory.
    pub downloads: PathBuf,
    /// How long records of finished and ended transfers are kept (None:
    /// forever).
    pub keep_transfers: Option<Duration>,
}

pub use daemon::run;
