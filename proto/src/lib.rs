//! Wire formats and sans-IO protocol state machines for p2p chat.
//!
//! # Map
//!
//! * [`identity`]: a user's long-term keys (ed25519 identity, X25519 Noise
//!   static key) and the signature that binds the two.
//! * [`codec`]: length-checked byte reading and writing; every decoder in
//!   this crate reads through it and never panics on hostile input.
//! * [`wire`]: the outer packet (version, type, indices, counters) and the
//!   inner, encrypted messages of each direction: [`wire::ClientToServer`],
//!   [`wire::ServerToClient`], [`wire::PeerToPeer`].
//! * [`noise`]: the Noise handshakes (from `snow`) and the data-packet
//!   transport with explicit counters and a replay window.
//! * [`client`]: the rendezvous client ([`client::ServerLink`]): handshake,
//!   login, heartbeats, requests.
//! * [`server`]: the rendezvous server machine ([`server::Server`]).
//! * [`reliable`]: acknowledged, ordered, deduplicated delivery of chat
//!   messages over one peer session.
//! * [`flow`]: packet-level loss recovery (RFC 9002) and model-based
//!   congestion control (BBR) with pacing, for bulk data such as files.
//! * [`transfer`]: file transfers with one peer over a [`flow::Flow`]:
//!   offers, resumption, piece hashes, verification.
//! * [`peer`]: one peer session ([`peer::PeerSession`]): punching,
//!   handshake, keepalive, rekey, built by polling the smaller machines.
//! * [`node`]: what a daemon runs ([`node::Node`]): a server link plus its
//!   peer sessions, with the demultiplexing of one UDP socket.
//! * [`keyfile`]: an identity kept on disk (mode 0600); the one module
//!   that touches the filesystem.
//! * [`control`]: the JSON request/response/event types of the daemon's
//!   control socket, shared by `p2pd` and `p2pctl`.
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

pub mod client;
pub mod codec;
pub mod control;
pub mod flow;
pub mod identity;
pub mod keyfile;
pub mod node;
pub mod noise;
pub mod peer;
pub mod reliable;
pub mod server;
pub mod transfer;
pub mod transport;
pub mod wire;

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
