//! Wire formats and sans-IO protocol state machines for p2p chat.
//!
//! # Map
//!
//! Modules in layers, each using only those above it (no cycles):
//!
//! ```text
//!  codec                     length-checked reading and writing
//!  identity                  long-term keys (ed25519 + X25519) and their binding
//!  wire                      the bytes: Packet; client, server, peer message families
//!  noise, flow, reliable     handshakes and data transport; loss recovery, BBR,
//!                            pacing, path MTU; chat ordering and dedup
//!  client, server, peer,     the rendezvous link, the server machine, one peer
//!  transfer                  session; a peer's flow (chat and files)
//!  transport                 which way datagrams leave: UDP or TCP to the server,
//!                            prediction sockets
//!  node                      what a daemon runs: link + peers + transports
//!  control, keyfile          the daemon's JSON API; the identity on disk
//! ```
//!
//! The public API is what the binaries use, re-exported here (machines,
//! their configs, events and ids); [`wire`] (the protocol's bytes) and
//! [`control`] (the JSON API shared by `p2pd` and `p2pctl`) are public
//! whole. The rest stays inside the crate.
//!
//! # Contract
//!
//! Nothing here opens a socket, reads a clock or sleeps. Time is an
//! argument (`now: Instant`). Every machine has the same shape:
//!
//! * inputs are `handle_*(now, ..)` (a datagram, a timeout) and commands
//!   (`connect`, `send_message`, `accept_file`, ...);
//! * after any input the caller drains: `poll_event()` and
//!   `poll_transmit(..)` until neither gives anything (events first: a
//!   machine's `poll_transmit` gives nothing while an event waits), then
//!   asks `poll_timeout()` once for the one deadline that covers all its
//!   timers (retransmission, pacing, keepalive, expiry, reconnection) and
//!   calls `handle_timeout(now)` when it passes.
//!
//! ```text
//!  datagram / command / deadline
//!          │
//!          ▼
//!   handle_*(now, ..) ──▶ loop { poll_event()* ; poll_transmit(now) } ──▶ poll_timeout()
//! ```
//!
//! Events before transmits lets a daemon make a received message durable
//! before the acknowledgement for it leaves. File data does not pass
//! through events: the [`node::Node`] reads and writes it through the
//! [`transfer::FileIo`] it is given, and the owner reports the outcome of
//! slow disk work (piece checks, the final rename) back as inputs.
//!
//! Every machine draws its randomness from a seed it is given and keeps
//! its state in ordered containers, so one seed gives one trace: the
//! simulator (`tests/sim.rs`) runs a seed twice and compares.

mod client;
mod codec;
pub mod control;
mod flow;
mod identity;
mod keyfile;
mod node;
mod noise;
mod peer;
mod reliable;
mod server;
mod transfer;
mod transport;
pub mod wire;

pub use client::{ClientConfig, LinkState, RequestError};
pub use codec::{DecodeError, Reader, Writer};
pub use identity::{
    fingerprint, key_from_hex, to_hex, Identity, IdentityError, PublicIdentity, PUBLIC_IDENTITY_LEN,
};
pub use keyfile::{load_or_create_identity, KeyFileError};
pub use node::{Node, NodeConfig, NodeError, NodeEvent, PeerStatus};
pub use noise::Handshake;
pub use peer::{Path, PeerConfig, SessionPhase};
pub use reliable::ChatMessage;
pub use server::{
    answer_probe, source_key, Account, AccountStore, Gauges, MemoryStore, RegisterOutcome,
    RelayConfig, Server, ServerConfig, ServerStats, StoreError,
};
pub use transfer::{
    file_hash, piece_hash, piece_size_for, FileDesc, FileIo, FileSource, Group, GroupId, NoFiles,
    Phase, TransferEvent, TransferId, TransferStatus, MAX_PENDING_OFFERS, MAX_PIECES,
    MIN_PIECE_SIZE, PIECE_SIZE,
};
pub use transport::{TransportCommand, Via};

use std::net::SocketAddr;

/// An address as the machines compare them: IPv4 in its own form, never
/// v4-mapped IPv6 (`::ffff:a.b.c.d`), however it arrived.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(std::net::IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// A datagram to send, and which way it leaves.
#[derive(Clone, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
    /// The socket or connection it leaves through: the machine decides,
    /// the daemon never looks into the payload to choose.
    pub via: transport::Via,
}

impl Transmit {
    /// A datagram for the main UDP socket (the node routes it further:
    /// over TCP to the server, through a prediction socket to a peer).
    pub fn new(dst: SocketAddr, payload: Vec<u8>) -> Self {
        Self {
            dst,
            payload,
            via: transport::Via::Udp,
        }
    }
}

impl std::fmt::Debug for Transmit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payloads are ciphertext or handshake bytes: print only their size.
        f.debug_struct("Transmit")
            .field("dst", &self.dst)
            .field("via", &self.via)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// Wraps a secret or private value so that `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(pub T);

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}
