//! What a daemon runs: one [`ServerLink`] and, per peer, a [`PeerSession`]
//! and the [`PeerFlow`] that carry chat and files over one flow, behind
//! one UDP socket.
//!
//! The node demultiplexes datagrams by receiver index (handshake responses
//! and data), by introduction id (punch probes) and by identity (handshake
//! initiations, whose payload names the sender). It turns the link's
//! introductions into sessions, feeds chat messages and files through each
//! peer's flow, pins each peer's identity at first contact, refuses
//! any other key for that name afterwards, and reconnects by itself to a
//! known peer while messages for it are waiting.
//!
//! The node follows the crate's drain contract (see the crate docs):
//! after any input, [`Node::poll_event`] and [`Node::poll_transmit`] until
//! neither gives anything, then [`Node::poll_timeout`]. `poll_transmit`
//! holds back while an event waits, so a [`NodeEvent::Delivered`] is
//! always seen before the datagram acknowledging it: a caller that stores
//! it while draining events acknowledges only what it stored. File data
//! is read through the [`FileIo`] the node was given, as `poll_transmit`
//! lets each packet go; what arrives is written through it.

use crate::client::{ClientConfig, LinkEvent, LinkState, RequestError, ServerLink};
use crate::codec::DecodeError;
use crate::identity::{Identity, PublicIdentity};
use crate::noise::{Handshake, Pattern};
use crate::peer::{Path, PeerConfig, PeerEvent, PeerSession, Prediction, PunchPlan, SessionPhase};
use crate::reliable::{ChatMessage, ReliableEvent};
use crate::transfer::{
    DiskWork, FileDesc, FileIo, Group, PeerFlow, TransferEvent, TransferId, TransferStatus,
};
use crate::transport::{Predictor, ServerTransport, TransportCommand, Via};
use crate::wire::{
    self, ClientToServer, FailReason, Packet, PeerToPeer, ResetToken, ServerToClient, UserEntry,
};
use crate::{canonical, Transmit};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub client: ClientConfig,
    pub peer: PeerConfig,
    /// Backoff between automatic reconnection attempts to a peer with
    /// messages waiting: doubles from `reconnect_min` to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl NodeConfig {
    pub fn new(server: SocketAddr) -> Self {
        Self {
            client: ClientConfig::new(server),
            peer: PeerConfig::default(),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    ServerConnected {
        server_key: [u8; 32],
        learned: bool,
    },
    ServerKeyMismatch {
        pinned: [u8; 32],
        offered: [u8; 32],
    },
    ServerDown {
        reason: String,
    },
    LoggedIn {
        name: String,
        observed: SocketAddr,
    },
    LoginFailed {
        reason: FailReason,
        detail: String,
    },
    /// Every active user, answering [`Node::list_users`] with the id it
    /// returned.
    Users {
        id: u32,
        result: Result<Vec<UserEntry>, RequestError>,
    },
    /// The answer to a request made with a returned `rid`.
    Response {
        rid: u32,
        result: Result<ServerToClient, RequestError>,
    },
    /// Someone wants to connect. `auto_accepted` when it is a known
    /// contact with the pinned key.
    ConnectRequest {
        name: String,
        identity: PublicIdentity,
        auto_accepted: bool,
    },
    ConnectFailed {
        name: String,
        reason: FailReason,
    },
    /// A peer presented another key than the one pinned for its name; the
    /// session was refused.
    KeyMismatch {
        name: String,
        pinned: PublicIdentity,
        offered: PublicIdentity,
    },
    PeerUp {
        name: String,
        endpoint: SocketAddr,
        identity: PublicIdentity,
    },
    PeerDown {
        name: String,
        reason: String,
    },
    PathChanged {
        name: String,
        endpoint: SocketAddr,
    },
    /// What to keep about the last path to `name` across restarts (give
    /// it back with [`Node::set_last_path`] at the next start): its
    /// address on the last direct path that worked (reached there without
    /// the server), and whether the last session went through the relay
    /// (the next one then starts on the relay at once). Said when either
    /// changes.
    LastPath {
        name: String,
        direct: Option<SocketAddr>,
        relayed: bool,
    },
    /// The server (`server`) or a peer at `from` speaks protocol version
    /// `theirs`, not ours ([`wire::VERSION`]): nothing it sends can be
    /// read. Said once per address and version.
    VersionMismatch {
        from: SocketAddr,
        server: bool,
        theirs: u8,
    },
    /// Something for the daemon's transports to do: open or close the
    /// TCP connection to the server, or extra sockets.
    Transport(TransportCommand),
    Delivered {
        peer: String,
        seq: u64,
        sent_ms: u64,
        body: Vec<u8>,
    },
    Acked {
        peer: String,
        seq: u64,
    },
    Pong {
        peer: String,
        nonce: u64,
        rtt: Duration,
    },
    /// Something happened to a file transfer with `peer`.
    Transfer {
        peer: String,
        event: TransferEvent,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("no pending connection request from {0}")]
    NoRequest(String),
    #[error("not connected to {0}")]
    NotConnected(String),
}

/// What `peers` shows of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub phase: SessionPhase,
    pub endpoint: Option<SocketAddr>,
    /// Direct, or through the rendezvous server's relay.
    pub path: Option<Path>,
    /// How the path was found ([`PeerSession::technique`]).
    pub technique: Option<&'static str>,
    pub rtt: Option<Duration>,
    pub fingerprint: Option<String>,
    pub queued: usize,
    /// Not up: since when, and why (the last session's end).
    pub down: Option<(Instant, String)>,
    /// Up, but what was sent has had no answer for this long (the path
    /// is in doubt; the relay is tried too).
    pub unanswered: Option<Duration>,
    /// The node is asking for a session by itself (something waits for
    /// the peer, or a session is being resumed).
    pub reconnecting: bool,
}

struct PeerEntry {
    pinned: Option<PublicIdentity>,
    /// Chat and file transfers with the peer, over one flow.
    transfers: PeerFlow,
    session: Option<PeerSession>,
    auto_connect: bool,
    connecting: bool,
    next_reconnect: Instant,
    backoff: Duration,
    /// Reconnect even with nothing queued: the session was up and ended
    /// for a reason of ours (the relay restarted).
    resume: bool,
    /// Since when, and why, no session is up (after one was).
    down: Option<(Instant, String)>,
    /// The relay channel of the last introduction, and the token that
    /// proves the server's "channel unknown" for it.
    channel_token: Option<(u64, ResetToken)>,
    /// The last session's path was the relay.
    was_relayed: bool,
    /// The peer's address on the last direct path that worked: where it
    /// is tried when the server cannot introduce us.
    last_direct: Option<SocketAddr>,
    /// The session being tried was started without the server
    /// ([`Node::connect_direct`]): its failure says nothing of whether
    /// the peer is there, and a login replaces it with an introduction.
    serverless: bool,
    /// The session's last unanswered probe for which the server was told
    /// our address ([`PeerSession::probed_at`]).
    poked: Option<Instant>,
}

impl PeerEntry {
    /// `seed` draws the transfers' flow epochs.
    fn new(now: Instant, recv_next: u64, backoff: Duration, seed: u64) -> Self {
        Self {
            pinned: None,
            transfers: PeerFlow::new(seed, recv_next),
            session: None,
            auto_connect: false,
            connecting: false,
            next_reconnect: now,
            backoff,
            resume: false,
            down: None,
            channel_token: None,
            was_relayed: false,
            last_direct: None,
            serverless: false,
            poked: None,
        }
    }

    fn identity(&self) -> Option<&PublicIdentity> {
        self.pinned
            .as_ref()
            .or_else(|| self.session.as_ref().map(|s| s.remote()))
    }

    fn is_up(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.is_up())
    }

    /// Something waits for this peer (a message, a file): reconnect by
    /// itself, at once if it was not already trying.
    fn want_session(&mut self, now: Instant) {
        if !self.auto_connect {
            self.auto_connect = true;
            self.next_reconnect = now;
        }
    }

    /// Closes the session politely (its `Close` goes into `out`) and stops
    /// automatic reconnection until the next `send` or `connect`.
    fn end_session(&mut self, now: Instant, out: &mut VecDeque<Transmit>) {
        if let Some(mut s) = self.session.take() {
            s.close(now);
            while let Some(t) = s.poll_transmit() {
                out.push_back(t);
            }
        }
        self.auto_connect = false;
    }
}

/// A session with peer `name` is up, or moved, at `endpoint` (the relay's
/// address when `relayed`): remember the path, and have the owner keep
/// what changed across restarts.
fn note_path(
    e: &mut PeerEntry,
    name: &str,
    endpoint: SocketAddr,
    relayed: bool,
    events: &mut VecDeque<NodeEvent>,
) {
    let direct = if relayed {
        e.last_direct
    } else {
        Some(endpoint)
    };
    if direct != e.last_direct || relayed != e.was_relayed {
        e.last_direct = direct;
        e.was_relayed = relayed;
        events.push_back(NodeEvent::LastPath {
            name: name.to_owned(),
            direct,
            relayed,
        });
    }
}

/// Finding out how our NAT maps: one probe to each of the server's ports,
/// from the same socket; different answers mean endpoint-dependent
/// mapping.
struct NatProbe {
    nonce: u64,
    /// The server's probe port.
    alt: SocketAddr,
    next: Instant,
    tries: u8,
    main: Option<SocketAddr>,
    other: Option<SocketAddr>,
}

/// A user listing in progress: the id it answers with, the users so far.
struct Listing {
    id: u32,
    users: Vec<UserEntry>,
}

/// Most users one listing gathers (the server's page count is not
/// trusted to end): within what the server gives one session at once
/// (`list_pages_per_sec`' burst: 1,000 pages of 12).
const MAX_LISTED: usize = 10_000;

/// NAT probes are resent this often, this many times (the answers are
/// small UDP datagrams that may be lost).
const NAT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
const NAT_PROBE_TRIES: u8 = 5;

/// While a peer path is in doubt, the server path is checked (three
/// pings, [`ServerLink::check_now`]) at most this often.
const LINK_POKE_EVERY: Duration = Duration::from_secs(2);

/// Network changes restart peers' reconnection backoffs at most this
/// often.
const NETWORK_RESET_EVERY: Duration = Duration::from_secs(10);

/// Peers of another version noted (and so reported) at most.
const MAX_VERSION_NOTES: usize = 64;

/// The server has not answered (we are not logged in) for this long:
/// sessions wanted with known peers are tried directly at their last
/// direct addresses instead of waiting for an introduction. Well above a
/// login's round trips, well inside the 2 s a restarted peer has.
const DIRECT_AFTER: Duration = Duration::from_secs(1);

/// Marks the introduction id two peers use for a session they start
/// without the server (see [`direct_id`]).
const DIRECT_TAG: u64 = 0x6469_7265_6374_2031; // "direct 1"

/// The introduction id of a serverless session between the holders of
/// two signing keys: the same on both sides, whoever computes it. Like
/// the server's ids it is in clear on the wire and only names the
/// attempt; nothing is trusted before the Noise handshake.
pub(crate) fn direct_id(a: &[u8; 32], b: &[u8; 32]) -> u64 {
    let word = |k: &[u8; 32]| u64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
    word(a) ^ word(b) ^ DIRECT_TAG
}

/// Most `SessionUnknown` answers sent per second.
const SESSION_UNKNOWN_INTERVAL: Duration = Duration::from_millis(100);

pub struct Node<F> {
    identity: Identity,
    /// Where file data is read from and written to.
    io: F,
    /// The latest time an input or poll gave: what the pacing deadline
    /// in [`Node::poll_timeout`] is computed from.
    now: Instant,
    config: NodeConfig,
    link: ServerLink,
    peers: BTreeMap<String, PeerEntry>,
    /// Connection requests waiting for `accept` or `decline`.
    incoming: BTreeMap<String, (u64, PublicIdentity)>,
    /// User listings in progress, by the rid of the page asked for last.
    listings: BTreeMap<u32, Listing>,
    /// Our `RequestConnect`s in flight: rid → (peer, made automatically).
    outgoing: BTreeMap<u32, (String, bool)>,
    locals: Vec<SocketAddr>,
    /// Our NAT maps each destination to a new port (learned with
    /// [`Packet::Probe`]): peers are told, and port prediction is tried.
    hard: bool,
    nat_probe: Option<NatProbe>,
    /// UDP or TCP to the server.
    transport: ServerTransport,
    /// Extra sockets of port prediction.
    predictor: Predictor,
    /// Datagrams whose way is decided already (probes); they go first.
    routed: VecDeque<Transmit>,
    events: VecDeque<NodeEvent>,
    transmits: VecDeque<Transmit>,
    last_unknown_reply: Option<Instant>,
    /// The server's protocol version, when it is not ours.
    server_version: Option<u8>,
    /// When a peer path in doubt last made us check the server path.
    link_poked: Option<Instant>,
    /// When a network change last restarted reconnection backoffs.
    network_changed_at: Option<Instant>,
    /// Since when we are not logged in to the server (None: logged in).
    server_away: Option<Instant>,
    /// The link is logging in again because the way to the server changed
    /// (not because the server lost us).
    way_moved: bool,
    /// Peers met with another version (address, version), bounded.
    peer_versions: BTreeMap<(SocketAddr, u8), ()>,
    /// Datagrams dropped because they did not parse.
    pub malformed: u64,
    rng: rand::rngs::StdRng,
}

impl<F: FileIo> Node<F> {
    /// A node for `identity`; `io` is the disk side of its file transfers,
    /// `seed` draws every random choice it makes (so a simulation
    /// replays).
    pub fn new(identity: Identity, config: NodeConfig, now: Instant, seed: u64, io: F) -> Self {
        let link = ServerLink::new(identity.clone(), config.client.clone(), now, seed);
        let transport = ServerTransport::new(config.client.server, now);
        Self {
            identity,
            io,
            now,
            config,
            link,
            peers: BTreeMap::new(),
            incoming: BTreeMap::new(),
            listings: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            locals: Vec::new(),
            hard: false,
            nat_probe: None,
            transport,
            predictor: Predictor::default(),
            routed: VecDeque::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            last_unknown_reply: None,
            server_version: None,
            link_poked: None,
            network_changed_at: None,
            server_away: Some(now),
            way_moved: false,
            peer_versions: BTreeMap::new(),
            malformed: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(1)),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The disk side the node was given.
    pub fn io(&self) -> &F {
        &self.io
    }

    pub fn io_mut(&mut self) -> &mut F {
        &mut self.io
    }

    pub fn link(&self) -> &ServerLink {
        &self.link
    }

    pub fn link_state(&self) -> LinkState {
        self.link.state()
    }

    /// Our own addresses, reported to peers as punching candidates.
    pub fn set_locals(&mut self, locals: Vec<SocketAddr>) {
        self.locals = locals;
    }

    /// A peer known from before: its pinned identity and where its
    /// message stream to us stands.
    pub fn add_contact(
        &mut self,
        now: Instant,
        name: &str,
        identity: PublicIdentity,
        recv_next: u64,
    ) {
        let backoff = self.config.reconnect_min;
        let seed = self.rng.gen();
        let e = self
            .peers
            .entry(name.to_owned())
            .or_insert_with(|| PeerEntry::new(now, recv_next, backoff, seed));
        e.pinned = Some(identity);
    }

    /// A session with `name` was up when this node's daemon last stopped
    /// (killed, or restarted): ask for it again as soon as we are logged
    /// in, so the peer, still sending to our old address, hears from us
    /// at once. Not retried if the peer is offline: it reconnects by
    /// itself when it has something to say.
    pub fn resume(&mut self, now: Instant, name: &str) {
        let e = self.entry(now, name);
        e.auto_connect = true;
        e.resume = true;
        e.next_reconnect = now;
    }

    /// What was kept of the last path to a known peer
    /// ([`NodeEvent::LastPath`]) before a restart.
    pub fn set_last_path(
        &mut self,
        now: Instant,
        name: &str,
        direct: Option<SocketAddr>,
        relayed: bool,
    ) {
        let e = self.entry(now, name);
        e.last_direct = direct.map(canonical);
        e.was_relayed = relayed;
    }

    /// How long we have not been logged in to the server (None while we
    /// are).
    pub fn server_away_for(&self, now: Instant) -> Option<Duration> {
        self.server_away.map(|t| now.saturating_duration_since(t))
    }

    fn entry(&mut self, now: Instant, name: &str) -> &mut PeerEntry {
        let backoff = self.config.reconnect_min;
        let seed = self.rng.gen();
        self.peers
            .entry(name.to_owned())
            .or_insert_with(|| PeerEntry::new(now, 0, backoff, seed))
    }

    pub fn register(&mut self, now: Instant, name: &str) -> u32 {
        self.register_invited(now, name, "")
    }

    /// Registers `name` with the operator's invite token, for a server
    /// that asks for one.
    pub fn register_invited(&mut self, now: Instant, name: &str, invite: &str) -> u32 {
        let (name, invite) = (name.to_owned(), invite.to_owned());
        let rid = self
            .link
            .request(now, |rid| ClientToServer::Register { rid, name, invite });
        self.pump(now);
        rid
    }

    pub fn relogin(&mut self, now: Instant) {
        self.link.reconnect(now);
        self.pump(now);
    }

    /// Asks the server for every active user, page after page; one
    /// [`NodeEvent::Users`] with the returned id answers.
    pub fn list_users(&mut self, now: Instant) -> u32 {
        let rid = self.request_page(now, String::new());
        self.listings.insert(
            rid,
            Listing {
                id: rid,
                users: Vec::new(),
            },
        );
        self.pump(now);
        rid
    }

    fn request_page(&mut self, now: Instant, after: String) -> u32 {
        self.link
            .request(now, |rid| ClientToServer::ListUsers { rid, after })
    }

    /// A page of a listing arrived: ask for the next one (the names after
    /// its last), or answer.
    fn on_page(&mut self, now: Instant, rid: u32, result: Result<ServerToClient, RequestError>) {
        let Some(mut listing) = self.listings.remove(&rid) else {
            return;
        };
        let result = match result {
            Ok(ServerToClient::UserList { users, .. }) => {
                let full = users.len() == wire::USERS_PER_PAGE;
                let last = users.last().map(|u| u.name.clone());
                listing.users.extend(users);
                // More pages (and the list still bounded): ask for the next.
                if let Some(last) = last.filter(|_| full && listing.users.len() < MAX_LISTED) {
                    let next_rid = self.request_page(now, last);
                    self.listings.insert(next_rid, listing);
                    return;
                }
                Ok(listing.users)
            }
            Ok(other) => Err(RequestError::Failed {
                reason: FailReason::ServerError,
                detail: format!("unexpected answer to a user list: {other:?}"),
            }),
            Err(e) => Err(e),
        };
        self.events.push_back(NodeEvent::Users {
            id: listing.id,
            result,
        });
    }

    pub fn ping_server(&mut self, now: Instant) -> u32 {
        let rid = self.link.request(now, |rid| ClientToServer::Ping { rid });
        self.pump(now);
        rid
    }

    /// Asks the server to introduce us to `name`.
    pub fn connect(&mut self, now: Instant, name: &str) -> u32 {
        let rid = self.request_connect(now, name, false);
        self.pump(now);
        rid
    }

    fn request_connect(&mut self, now: Instant, name: &str, auto: bool) -> u32 {
        let locals = self.locals.clone();
        let hard = self.hard;
        let n = name.to_owned();
        let rid = self
            .link
            .request(now, |rid| ClientToServer::RequestConnect {
                rid,
                name: n,
                locals,
                hard,
            });
        self.outgoing.insert(rid, (name.to_owned(), auto));
        let e = self.entry(now, name);
        e.auto_connect = true;
        e.connecting = true;
        rid
    }

    pub fn pending_requests(&self) -> Vec<(String, PublicIdentity)> {
        let mut v: Vec<_> = self
            .incoming
            .iter()
            .map(|(n, (_, id))| (n.clone(), id.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Agrees to (or declines) `name`'s pending request.
    pub fn answer(&mut self, now: Instant, name: &str, accept: bool) -> Result<u32, NodeError> {
        let (intro_id, identity) = self
            .incoming
            .remove(name)
            .ok_or_else(|| NodeError::NoRequest(name.to_owned()))?;
        if accept {
            // Pin the key we were shown; the punch must carry the same.
            let e = self.entry(now, name);
            e.pinned.get_or_insert(identity);
            e.auto_connect = true;
            e.connecting = true;
        }
        let locals = self.locals.clone();
        let hard = self.hard;
        let rid = self.link.request(now, |rid| ClientToServer::AgreeConnect {
            rid,
            intro_id,
            accept,
            locals,
            hard,
        });
        self.pump(now);
        Ok(rid)
    }

    /// Queues a chat message; it is sent when a session is up, connecting
    /// to a known peer by itself if needed.
    pub fn send_message(&mut self, now: Instant, name: &str, msg: ChatMessage) {
        self.queue_for(now, name, |t| t.send_chat(msg));
    }

    /// Gives `name`'s flow something to send, connecting to the peer by
    /// itself if needed.
    fn queue_for(&mut self, now: Instant, name: &str, f: impl FnOnce(&mut PeerFlow)) {
        let e = self.entry(now, name);
        f(&mut e.transfers);
        e.want_session(now);
        self.pump(now);
    }

    pub fn is_up(&self, name: &str) -> bool {
        self.peers.get(name).is_some_and(|e| e.is_up())
    }

    pub fn is_known(&self, name: &str) -> bool {
        self.peers.get(name).is_some_and(|e| e.identity().is_some())
    }

    /// Closes the session with `name`; no automatic reconnection follows
    /// until the next `send` or `connect`.
    pub fn close(&mut self, now: Instant, name: &str) -> Result<(), NodeError> {
        let e = self
            .peers
            .get_mut(name)
            .filter(|e| e.session.is_some() || e.resume)
            .ok_or_else(|| NodeError::NotConnected(name.to_owned()))?;
        // (Reconnecting by itself: the user says stop.)
        e.resume = false;
        e.end_session(now, &mut self.transmits);
        e.connecting = false;
        let reason = "closed by you".to_owned();
        e.down = Some((now, reason.clone()));
        self.events.push_back(NodeEvent::PeerDown {
            name: name.to_owned(),
            reason,
        });
        Ok(())
    }

    /// Says goodbye before the process exits: closes every session (the
    /// peers see `Close` at once instead of waiting for silence) and logs
    /// out at the server. Queued messages stay queued for the next start.
    pub fn shutdown(&mut self, now: Instant) {
        for e in self.peers.values_mut() {
            e.end_session(now, &mut self.transmits);
        }
        self.link.close();
        while let Some(t) = self.link.poll_transmit() {
            self.transmits.push_back(t);
        }
    }

    pub fn ping(&mut self, now: Instant, name: &str) -> Result<u64, NodeError> {
        let nonce = self
            .peers
            .get_mut(name)
            .and_then(|e| e.session.as_mut())
            .and_then(|s| s.ping(now))
            .ok_or_else(|| NodeError::NotConnected(name.to_owned()))?;
        self.pump(now);
        Ok(nonce)
    }

    /// Offers a file to `name` (the caller hashed it: whole and by piece).
    /// It goes out when a session is up, connecting by itself if needed.
    pub fn offer_file(
        &mut self,
        now: Instant,
        name: &str,
        file: FileDesc,
        piece_hashes: Vec<[u8; 32]>,
    ) {
        self.queue_for(now, name, |t| t.offer(file, piece_hashes));
    }

    /// Tells the peer a transfer we no longer hold is over (it ended while
    /// we were down); connects to it if needed.
    pub fn tell_ended(&mut self, now: Instant, name: &str, id: TransferId, reason: &str) {
        self.queue_for(now, name, |t| t.tell_ended(id, reason));
    }

    /// Tells the peer a file of a directory will not be offered.
    pub fn skip_file(
        &mut self,
        now: Instant,
        name: &str,
        id: TransferId,
        path: String,
        group: Group,
        reason: &str,
    ) {
        self.queue_for(now, name, |t| t.skip(id, path, group, reason));
    }

    fn transfers_of(&mut self, name: &str) -> Result<&mut PeerFlow, NodeError> {
        self.peers
            .get_mut(name)
            .map(|e| &mut e.transfers)
            .ok_or_else(|| NodeError::NotConnected(name.to_owned()))
    }

    /// Takes an offered file; `have` marks pieces already held (resuming).
    pub fn accept_file(&mut self, now: Instant, name: &str, id: TransferId, have: &[bool]) -> bool {
        let ok = self.transfers_of(name).is_ok_and(|t| t.accept(id, have));
        self.pump(now);
        ok
    }

    /// Takes up an incoming transfer after a restart (see
    /// [`PeerFlow::restore_incoming`]).
    pub fn restore_incoming(&mut self, now: Instant, name: &str, file: FileDesc, have: &[bool]) {
        self.queue_for(now, name, |t| t.restore_incoming(file, have));
    }

    /// An offer from `name` known from before a restart.
    pub fn restore_offer(&mut self, now: Instant, name: &str, file: FileDesc) {
        let e = self.entry(now, name);
        e.transfers.restore_offer(file);
    }

    /// `name` offers again a file we already have: tell it so.
    pub fn already_have(&mut self, now: Instant, name: &str, id: TransferId) {
        if let Ok(t) = self.transfers_of(name) {
            t.already_have(id);
        }
        self.pump(now);
    }

    pub fn cancel_file(&mut self, now: Instant, name: &str, id: TransferId, reason: &str) -> bool {
        let ok = self.transfers_of(name).is_ok_and(|t| t.cancel(id, reason));
        self.pump(now);
        ok
    }

    /// Pauses `name`'s incoming transfer `id` (its file cannot be written:
    /// a full disk); [`Node::resume_file`] takes it up again.
    pub fn pause_file(&mut self, now: Instant, name: &str, id: TransferId, reason: &str) -> bool {
        let ok = self.transfers_of(name).is_ok_and(|t| t.pause(id, reason));
        self.pump(now);
        ok
    }

    pub fn resume_file(&mut self, now: Instant, name: &str, id: TransferId) -> bool {
        let ok = self.transfers_of(name).is_ok_and(|t| t.resume(id));
        self.pump(now);
        ok
    }

    pub fn piece_checked(
        &mut self,
        now: Instant,
        name: &str,
        id: TransferId,
        piece: u32,
        ok: bool,
    ) {
        if let Ok(t) = self.transfers_of(name) {
            t.piece_checked(id, piece, ok);
        }
        self.pump(now);
    }

    pub fn file_checked(
        &mut self,
        now: Instant,
        name: &str,
        id: TransferId,
        result: Result<(), String>,
    ) {
        if let Ok(t) = self.transfers_of(name) {
            t.file_checked(id, result);
        }
        self.pump(now);
    }

    /// Every transfer with every peer.
    /// The status of `peer`'s transfer `id`, if the machine has it.
    pub fn transfer_of(&self, peer: &str, id: TransferId) -> Option<TransferStatus> {
        self.peers.get(peer)?.transfers.status_of(id)
    }

    pub fn transfer_status(&self) -> Vec<(String, TransferStatus)> {
        self.peers
            .iter()
            .flat_map(|(n, e)| e.transfers.status().into_iter().map(|s| (n.clone(), s)))
            .collect()
    }

    /// File packets that may leave now, read through the node's
    /// [`FileIo`]: [`Node::poll_transmit`] calls it when it has nothing
    /// else queued.
    fn pump_flows(&mut self, now: Instant) {
        for e in self.peers.values_mut() {
            let Some(s) = e.session.as_mut().filter(|s| s.is_up()) else {
                continue;
            };
            // A relay forwards only base-size packets; a direct path may
            // carry more, which path MTU discovery finds out.
            match s.path() {
                Some(Path::Direct(a)) => e.transfers.set_path(a, wire::MAX_DATAGRAM),
                Some(Path::Relay(a)) => e.transfers.set_path(a, wire::MAX_PACKET),
                None => {}
            }
            while let Some(p) = e.transfers.poll_packet(now, &mut self.io) {
                if !s.send(now, &p) {
                    break;
                }
            }
            while let Some(t) = s.poll_transmit() {
                self.transmits.push_back(t);
            }
        }
        let names: Vec<String> = self.peers.keys().cloned().collect();
        for name in names {
            self.pump_peer(now, &name);
        }
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .filter(|(_, e)| {
                e.session.is_some() || e.transfers.chat_pending() > 0 || e.pinned.is_some()
            })
            .map(|(name, e)| PeerStatus {
                name: name.clone(),
                phase: e
                    .session
                    .as_ref()
                    .map(|s| s.phase())
                    .unwrap_or(SessionPhase::Closed),
                endpoint: e.session.as_ref().and_then(|s| s.endpoint()),
                path: e.session.as_ref().and_then(|s| s.path()),
                technique: e
                    .session
                    .as_ref()
                    .and_then(|s| s.endpoint())
                    .filter(|a| self.predictor.is_predicted(*a))
                    .map(|_| "port-prediction")
                    .or_else(|| e.session.as_ref().and_then(|s| s.technique())),
                rtt: e
                    .session
                    .as_ref()
                    .and_then(|s| s.rtt())
                    .or(e.transfers.flow().smoothed_rtt()),
                fingerprint: e.identity().map(|i| i.fingerprint()),
                queued: e.transfers.chat_pending(),
                down: e.down.clone().filter(|_| !e.is_up()),
                unanswered: e
                    .session
                    .as_ref()
                    .filter(|s| s.is_up())
                    .and_then(|s| s.unanswered_for(self.now)),
                reconnecting: !e.is_up()
                    && e.auto_connect
                    && e.identity().is_some()
                    && (e.connecting || e.resume || e.transfers.wants_session()),
            })
            .collect()
    }

    /// Whether what is sent to `name` now can be expected to arrive soon:
    /// a session is up and its path is not in doubt.
    pub fn is_reachable(&self, name: &str) -> bool {
        self.peers.get(name).is_some_and(|e| {
            e.session
                .as_ref()
                .is_some_and(|s| s.is_up() && s.unanswered_for(self.now).is_none())
        })
    }

    /// The host's network changed (the daemon watches for addresses and
    /// links coming and going). What waited for the network is tried
    /// again now instead of at the end of its backoff: the server link,
    /// and reconnections to peers; live sessions send a keepalive at once
    /// so that a peer follows us to a new address (roaming) without
    /// waiting for our next packet.
    pub fn handle_network_change(&mut self, now: Instant) {
        self.now = self.now.max(now);
        tracing::info!("NETWORK(CHANGED)");
        self.link.network_changed(now);
        // Spurious notices (address lifetimes refreshed) must not turn into
        // a request per peer each time: backoffs restart at most this often.
        let recent = self
            .network_changed_at
            .is_some_and(|t| now.saturating_duration_since(t) < NETWORK_RESET_EVERY);
        if !recent {
            self.network_changed_at = Some(now);
        }
        let min = self.config.reconnect_min;
        for e in self.peers.values_mut() {
            if !recent {
                e.backoff = min;
                e.next_reconnect = now;
            }
            if let Some(s) = e.session.as_mut().filter(|s| s.is_up()) {
                s.send(now, &PeerToPeer::Keepalive);
            }
        }
        self.pump(now);
    }

    /// The TCP connection asked for with
    /// [`TransportCommand::ConnectTcp`] is up.
    pub fn handle_tcp_up(&mut self, now: Instant) {
        self.transport.on_tcp_up(now);
        self.pump(now);
    }

    /// The TCP connection to the server failed or closed.
    pub fn handle_tcp_down(&mut self, now: Instant, why: &str) {
        self.transport.on_tcp_down(now, why);
        self.pump(now);
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// The next datagram to send now. `None` while an event waits (drain
    /// events first: one may have to be stored before the datagram that
    /// acknowledges it leaves) and when nothing may leave now; file data
    /// is read through the [`FileIo`] as the flows let it go.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.now = self.now.max(now);
        if !self.events.is_empty() {
            return None;
        }
        if let Some(t) = self.routed.pop_front() {
            return Some(t);
        }
        if self.transmits.is_empty() {
            self.pump_flows(now);
            if !self.events.is_empty() {
                return None;
            }
        }
        let mut t = self.transmits.pop_front()?;
        t.via = self.route(t.dst);
        Some(t)
    }

    /// Which way a datagram to `dst` leaves: to the server over UDP or
    /// TCP, as the transport stands; to a peer through the socket port
    /// prediction adopted for it, or the main socket.
    fn route(&self, dst: SocketAddr) -> Via {
        if dst == self.link.server_addr() {
            self.transport.via()
        } else {
            self.predictor.route(dst).unwrap_or(Via::Udp)
        }
    }

    /// How a session reaches a peer at `endpoint`, in the control API's
    /// words: `direct`, or through the relay over UDP or TCP.
    pub fn path_name(&self, endpoint: SocketAddr) -> &'static str {
        if endpoint != self.link.server_addr() {
            "direct"
        } else if self.transport.on_tcp() {
            "relay-tcp"
        } else {
            "relay-udp"
        }
    }

    /// The earliest time [`Node::handle_timeout`] has work: timers of the
    /// server link, the NAT probe, every session, every flow (loss,
    /// acknowledgement, pacing) and reconnection.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let link = [
            self.link.poll_timeout(),
            self.nat_probe.as_ref().map(|p| p.next),
            self.transport.poll_timeout(),
            self.predictor.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let peers = self.peers.values().flat_map(|e| {
            let session = e.session.as_ref().and_then(|s| s.poll_timeout());
            // The flow's loss, probe, acknowledgement and pacing timers
            // (chat rides it).
            let flow = if e.is_up() {
                e.transfers.poll_timeout(self.now)
            } else {
                None
            };
            let reconnect = self.reconnect_at(e);
            [session, flow, reconnect]
        });
        let pokes = self.peers.values().filter_map(|e| {
            e.session
                .as_ref()
                .and_then(|s| s.probed_at())
                .filter(|t| e.poked != Some(*t))
        });
        std::iter::once(link)
            .chain(peers)
            .chain(pokes.map(Some))
            .chain(std::iter::once(self.server_check_at()))
            .flatten()
            .min()
    }

    /// When the node asks for a session with this peer by itself: through
    /// the server while logged in; while the server is away, directly at
    /// the peer's last direct address if it has one.
    fn reconnect_at(&self, e: &PeerEntry) -> Option<Instant> {
        let wanted = e.session.is_none()
            && e.auto_connect
            && !e.connecting
            && (e.resume || e.transfers.wants_session())
            && e.identity().is_some();
        if !wanted {
            return None;
        }
        match (self.link.state(), self.server_away) {
            (LinkState::LoggedIn, _) => Some(e.next_reconnect),
            (LinkState::KeyMismatch, _) => None,
            (_, Some(away)) if e.last_direct.is_some() => {
                Some(e.next_reconnect.max(away + DIRECT_AFTER))
            }
            _ => None,
        }
    }

    /// Starts a session with `name` without the server: punch probes to
    /// its last direct address under the pair's [`direct_id`], both sides
    /// initiating (a crossed handshake keeps one). The peer answers a
    /// probe without keeping state, and takes our handshake only for the
    /// key it pinned.
    fn connect_direct(&mut self, now: Instant, name: &str) {
        let local = self.identity.clone();
        let config = self.config.peer.clone();
        let seed = self.rng.gen();
        let Some(e) = self.peers.get_mut(name) else {
            return;
        };
        let (Some(remote), Some(at)) = (e.identity().cloned(), e.last_direct) else {
            return;
        };
        tracing::info!(peer = %name, %at, "RECONNECT(DIRECT_WITHOUT_SERVER)");
        let plan = PunchPlan {
            intro_id: direct_id(&local.sign_key(), &remote.sign_key),
            candidates: vec![at],
            initiator: true,
            relay: None,
            channel: 0,
            prediction: Prediction::None,
            relay_first: false,
            only_candidates: true,
        };
        e.session = Some(PeerSession::punch(now, local, remote, config, plan, seed));
        e.serverless = true;
    }

    /// When the server path is to be checked because a peer's is in
    /// doubt ([`PeerSession::server_check_at`]), at most every
    /// [`LINK_POKE_EVERY`]. Unanswered, our UDP is likely blocked and TCP
    /// is tried; on a lossy Wi-Fi three pings in a second all fail by
    /// chance rarely enough (0.7% at 10% loss) for that to be the guess.
    fn server_check_at(&self) -> Option<Instant> {
        let at = self
            .peers
            .values()
            .filter_map(|e| e.session.as_ref().filter(|s| s.is_up())?.server_check_at())
            .min()?;
        Some(match self.link_poked {
            Some(t) => at.max(t + LINK_POKE_EVERY),
            None => at,
        })
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = self.now.max(now);
        self.link.handle_timeout(now);
        let nonce = self.rng.gen();
        self.transport.handle_timeout(now, nonce);
        self.predictor.handle_timeout(now);
        for e in self.peers.values_mut() {
            if e.transfers.poll_timeout(now).is_some_and(|t| t <= now) {
                e.transfers.handle_timeout(now);
            }
        }
        self.probe_nat(now);
        for e in self.peers.values_mut() {
            if let Some(s) = e.session.as_mut() {
                s.handle_timeout(now);
            }
        }
        // A peer fell quiet mid-conversation, or our data has waited a
        // second: check the server path now (once per spell). If our NAT
        // rebound, the server learns where we are (its relay, which a
        // suspect path falls back to, then reaches us); if it is silent
        // too and the peer's path has turned suspect meanwhile, UDP is
        // blocked and TCP is tried (see `pump`).
        let quiet: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, e)| {
                e.session
                    .as_ref()
                    .and_then(|s| s.probed_at())
                    .is_some_and(|t| t <= now && e.poked != Some(t))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in quiet {
            let e = self.peers.get_mut(&name).expect("listed");
            e.poked = e.session.as_ref().and_then(|s| s.probed_at());
            let recent = self
                .link_poked
                .is_some_and(|t| now.saturating_duration_since(t) < LINK_POKE_EVERY);
            if !recent {
                tracing::debug!("LIVENESS(TELL_SERVER)");
                self.link_poked = Some(now);
                self.link.check_now(now);
            }
        }
        // A peer's path in doubt: check the server path too (the server
        // follows a new mapping; if it is silent as well, TCP is tried).
        let doubt = self.server_check_at().is_some_and(|t| t <= now);
        let recent = self
            .link_poked
            .is_some_and(|t| now.saturating_duration_since(t) < LINK_POKE_EVERY);
        if doubt && !recent {
            tracing::debug!("LIVENESS(CHECK_SERVER_PATH)");
            self.link_poked = Some(now);
            self.link.check_now(now);
        }
        let due: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, e)| self.reconnect_at(e).is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        let logged_in = self.link.state() == LinkState::LoggedIn;
        for name in due {
            let max = self.config.reconnect_max;
            let e = self.peers.get_mut(&name).expect("listed");
            let jitter = e.backoff.mul_f64(self.rng.gen_range(0.0..0.2));
            e.next_reconnect = now + e.backoff + jitter;
            e.backoff = (e.backoff * 2).min(max);
            if logged_in {
                tracing::debug!(peer = %name, "RECONNECT(REQUEST)");
                self.request_connect(now, &name, true);
            } else {
                self.connect_direct(now, &name);
            }
        }
        self.pump(now);
    }

    /// A datagram from `from` on the main UDP socket.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, buf: &[u8]) {
        self.handle_datagram_via(now, Via::Udp, from, buf)
    }

    /// A datagram that came in `via` a socket or the TCP connection to
    /// the server (whose frames are from the server, whatever `from`).
    pub fn handle_datagram_via(&mut self, now: Instant, via: Via, from: SocketAddr, buf: &[u8]) {
        self.now = self.now.max(now);
        let from = match via {
            Via::ServerTcp => self.link.server_addr(),
            _ => canonical(from),
        };
        let from_server = from == self.link.server_addr();
        let packet = match Packet::decode(buf) {
            Ok(p) => p,
            Err(DecodeError::Version(theirs)) if wire::other_version(buf).is_some() => {
                return self.other_version(now, from, from_server, theirs, buf)
            }
            Err(e) => {
                self.malformed += 1;
                tracing::debug!(%from, error = %e, "DROP(MALFORMED)");
                return;
            }
        };
        match via {
            Via::Udp if from_server => self.transport.on_udp_datagram(now, &packet),
            Via::Socket(id) if !self.predictor.on_datagram(now, id, from, &packet) => {
                tracing::trace!(%from, "PREDICT(DROP)");
                return;
            }
            _ => {}
        }
        if let Packet::ProbeReply { nonce, observed } = packet {
            return self.on_probe_reply(from, nonce, observed);
        }
        if let Packet::Relay { channel, payload } = packet {
            // A peer's packet through the relay, on one of our sessions'
            // channels: handled as if from the peer, at the relay's address.
            // The server relays only on channels of introductions we agreed
            // to; one we no longer know (we restarted) still carries a
            // peer's handshake, or earns it a `SessionUnknown`.
            match Packet::decode(payload) {
                Ok(inner) if from_server && !matches!(inner, Packet::Relay { .. }) => {
                    self.handle_peer_packet(now, from, inner, Some(channel))
                }
                _ => {
                    self.malformed += 1;
                    tracing::debug!(%from, "DROP(RELAY)");
                }
            }
            return self.pump(now);
        }
        match packet {
            Packet::HandshakeResponse { receiver, .. } | Packet::Data { receiver, .. }
                if from_server && self.link.owns_index(receiver) =>
            {
                self.link.handle_datagram(now, &packet)
            }
            Packet::CookieReply { receiver, .. }
                if from_server && self.link.owns_index(receiver) =>
            {
                self.link.handle_datagram(now, &packet)
            }
            Packet::SessionUnknown { .. } if from_server => self.link.handle_datagram(now, &packet),
            Packet::ChannelUnknown { channel, token } if from_server => {
                self.on_channel_unknown(now, channel, token)
            }
            p if !from_server => self.handle_peer_packet(now, from, p, None),
            _ => self.malformed += 1,
        }
        self.pump(now);
    }

    /// A packet from a peer, directly or (`channel`) through the relay.
    fn handle_peer_packet(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: Packet<'_>,
        channel: Option<u64>,
    ) {
        match packet {
            Packet::HandshakeInit {
                sender,
                pattern: Pattern::IK,
                noise,
                ..
            } => self.on_init(now, from, sender, noise, channel),
            Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            } => {
                if let Some(s) = self.session_by_index(receiver) {
                    s.handle_response(now, from, sender, receiver, noise);
                }
            }
            Packet::Data {
                receiver,
                counter,
                ciphertext,
            } => match self.session_by_index(receiver) {
                Some(s) => s.handle_data(now, from, receiver, counter, ciphertext),
                None => self.reply_unknown(now, from, receiver, channel),
            },
            Packet::Punch { intro_id, reply } => {
                let s = self
                    .peers
                    .values_mut()
                    .filter_map(|e| e.session.as_mut())
                    .find(|s| s.intro_id() == Some(intro_id));
                if let Some(s) = s {
                    s.handle_punch(now, from, reply);
                } else if !reply && channel.is_none() {
                    self.answer_direct_punch(from, intro_id);
                }
            }
            Packet::SessionUnknown { receiver, token } => {
                // Believed only with the token the peer gave for these
                // keys (it can make it again after a restart; nobody else
                // can make it), from wherever it comes.
                let s = self
                    .peers
                    .values_mut()
                    .filter_map(|e| e.session.as_mut())
                    .find(|s| s.proves_unknown(receiver, &token));
                match s {
                    Some(s) => s.handle_session_unknown(now, from, channel.is_some()),
                    None => tracing::debug!(%from, "PEER(SESSION_UNKNOWN_UNPROVEN)"),
                }
            }
            _ => {
                self.malformed += 1;
            }
        }
    }

    /// A punch probe under the serverless id of a peer we pinned, with no
    /// session of ours searching under it (we restarted, or our session
    /// is up and the peer's is not): answered once, the same size, and
    /// nothing kept, so the probe buys a stranger no more than it sent
    /// (and at most ten a second, with the other unprompted answers).
    /// The peer, initiating, then sends its handshake, which we take only
    /// for the key pinned.
    fn answer_direct_punch(&mut self, from: SocketAddr, intro_id: u64) {
        let ours = self.identity.sign_key();
        let known = self.peers.values().any(|e| {
            e.pinned
                .as_ref()
                .is_some_and(|p| direct_id(&ours, &p.sign_key) == intro_id)
        });
        let limited = self
            .last_unknown_reply
            .is_some_and(|t| self.now.saturating_duration_since(t) < SESSION_UNKNOWN_INTERVAL);
        if known && !limited {
            self.last_unknown_reply = Some(self.now);
            tracing::debug!(%from, "PUNCH(DIRECT_ANSWERED)");
            let reply = Packet::Punch {
                intro_id,
                reply: true,
            }
            .encode();
            self.transmits.push_back(Transmit::new(from, reply));
        }
    }

    /// A datagram of protocol version `theirs`: the server, or a peer, is
    /// older or newer than we are. Said once per address and version (an
    /// event the daemon shows), and answered with our version (rate
    /// limited like `SessionUnknown`) so the other side can say it too.
    fn other_version(
        &mut self,
        now: Instant,
        from: SocketAddr,
        server: bool,
        theirs: u8,
        buf: &[u8],
    ) {
        let new = if server {
            self.server_version.replace(theirs) != Some(theirs)
        } else {
            self.peer_versions.len() < MAX_VERSION_NOTES
                && self.peer_versions.insert((from, theirs), ()).is_none()
        };
        if new {
            tracing::warn!(%from, server, ours = wire::VERSION, theirs, "VERSION(MISMATCH)");
            self.events.push_back(NodeEvent::VersionMismatch {
                from,
                server,
                theirs,
            });
        }
        let limited = self
            .last_unknown_reply
            .is_some_and(|t| now.saturating_duration_since(t) < SESSION_UNKNOWN_INTERVAL);
        if wire::refusable(buf) && !limited {
            self.last_unknown_reply = Some(now);
            self.transmits
                .push_back(Transmit::new(from, wire::version_refusal().to_vec()));
        }
    }

    /// The server says it has no relay channel `channel`, with the token
    /// that proves it (it restarted, or the channel ended): log in again
    /// at once, which introduces relayed sessions anew (section 6.4 of
    /// the protocol), instead of waiting for them to fall silent. Acted on
    /// once per channel, and only while logged in.
    fn on_channel_unknown(&mut self, now: Instant, channel: u64, token: ResetToken) {
        let server = self.link.server_addr();
        let known = self
            .peers
            .iter_mut()
            .find(|(_, e)| e.channel_token == Some((channel, token)));
        let Some((name, e)) = known else {
            tracing::debug!("RELAY(CHANNEL_UNKNOWN_UNPROVEN)");
            return;
        };
        e.channel_token = None;
        // Only this peer's session loses its relay: a relayed one is
        // introduced again at once (if the server restarted, that request
        // meets a proven "session unknown" first, and the link logs in
        // again); a direct one just lost its way back.
        let relayed = e
            .session
            .as_ref()
            .is_some_and(|s| s.endpoint() == Some(server));
        if relayed {
            tracing::info!(peer = %name, "RELAY(CHANNEL_UNKNOWN_REINTRODUCE)");
            let why = "the relay lost our channel; reconnecting";
            e.session = None;
            e.auto_connect = true;
            e.resume = true;
            e.next_reconnect = now;
            e.connecting = false;
            e.down.get_or_insert((now, why.to_owned()));
            let name = name.clone();
            self.events.push_back(NodeEvent::PeerDown {
                name,
                reason: why.into(),
            });
        }
    }

    /// The protocol version the server speaks, when it is not ours.
    pub fn server_version_mismatch(&self) -> Option<u8> {
        self.server_version
    }

    /// Sends the NAT probes when due; gives up after a few tries.
    fn probe_nat(&mut self, now: Instant) {
        let server = self.link.server_addr();
        let Some(p) = self.nat_probe.as_mut().filter(|p| p.next <= now) else {
            return;
        };
        if p.tries >= NAT_PROBE_TRIES {
            tracing::info!("NAT(PROBE_UNANSWERED)");
            self.nat_probe = None;
            return;
        }
        p.tries += 1;
        p.next = now + NAT_PROBE_INTERVAL;
        let probe = Packet::Probe { nonce: p.nonce }.encode();
        for dst in [server, p.alt] {
            // By UDP whatever the way to the server: the probes measure
            // UDP mappings, which a TCP connection says nothing about.
            self.routed.push_back(Transmit::new(dst, probe.clone()));
        }
    }

    fn on_probe_reply(&mut self, from: SocketAddr, nonce: u64, observed: SocketAddr) {
        let server = self.link.server_addr();
        let Some(p) = self.nat_probe.as_mut().filter(|p| p.nonce == nonce) else {
            return;
        };
        if from == server {
            p.main = Some(observed);
        } else if from == p.alt {
            p.other = Some(observed);
        }
        if let (Some(main), Some(other)) = (p.main, p.other) {
            self.hard = main != other;
            let mapping = if self.hard {
                "endpoint-dependent"
            } else {
                "endpoint-independent"
            };
            tracing::info!(mapping, %main, %other, "NAT(MAPPING)");
            self.nat_probe = None;
        }
    }

    /// Whether our NAT was found to map each destination anew (false
    /// until the probes have answered).
    pub fn nat_hard(&self) -> bool {
        self.hard
    }

    fn session_by_index(&mut self, index: u32) -> Option<&mut PeerSession> {
        self.peers
            .values_mut()
            .filter_map(|e| e.session.as_mut())
            .find(|s| s.owns_index(index))
    }

    fn reply_unknown(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u32,
        channel: Option<u64>,
    ) {
        if self
            .last_unknown_reply
            .is_some_and(|t| now.saturating_duration_since(t) < SESSION_UNKNOWN_INTERVAL)
        {
            return;
        }
        self.last_unknown_reply = Some(now);
        // With the token we gave for that index before we restarted
        // (derived from our key, so we can make it again): the peer
        // believes it, a stranger could not have made it.
        let reply = Packet::SessionUnknown {
            receiver,
            token: crate::peer::reset_token(&self.identity, receiver),
        }
        .encode();
        let payload = match channel {
            Some(channel) => Packet::Relay {
                channel,
                payload: &reply,
            }
            .encode(),
            None => reply,
        };
        self.transmits.push_back(Transmit::new(from, payload));
    }

    fn on_init(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sender: u32,
        noise: &[u8],
        channel: Option<u64>,
    ) {
        let Ok(mut hs) = Handshake::responder(Pattern::IK, self.identity.noise_private()) else {
            return;
        };
        let Ok(payload) = hs.read(noise) else {
            tracing::debug!(%from, "HANDSHAKE(BAD_INIT)");
            return;
        };
        let Some((identity, token)) = crate::peer::read_peer_payload(&payload) else {
            tracing::debug!(%from, "HANDSHAKE(BAD_PAYLOAD)");
            return;
        };
        let Some(rs) = hs.remote_static() else { return };
        if identity.verify_for_noise_key(&rs).is_err() {
            tracing::warn!(%from, "HANDSHAKE(BAD_IDENTITY)");
            return;
        }
        // Only peers we were introduced to or know: find the entry whose
        // identity (pinned, or from the introduction) has this key.
        let name = self
            .peers
            .iter()
            .find(|(_, e)| {
                e.identity()
                    .is_some_and(|i| i.sign_key == identity.sign_key)
            })
            .map(|(n, _)| n.clone());
        let Some(name) = name else {
            tracing::info!(%from, fingerprint = %identity.fingerprint(), "HANDSHAKE(UNKNOWN_PEER)");
            return;
        };
        let seed = self.rng.gen();
        let peer_config = self.config.peer.clone();
        let local = self.identity.clone();
        let e = self.peers.get_mut(&name).expect("found");
        let s = e
            .session
            .get_or_insert_with(|| PeerSession::idle(local, identity.clone(), peer_config, seed));
        if let Some(channel) = channel {
            // Through the relay on a channel this session does not know
            // (we restarted): answer the same way.
            s.use_relay(from, channel);
        }
        s.handle_init(now, from, sender, hs, &identity, token);
    }

    /// Moves events and packets between the sub-machines.
    fn pump(&mut self, now: Instant) {
        self.now = self.now.max(now);
        // The server did not answer a check: if a peer still does not
        // answer either, both ways out are silent, and it is our network
        // (one silent party alone is only loss, or that party).
        if self.link.take_check_failed() {
            let peer_silent = self.peers.values().any(|e| {
                e.session
                    .as_ref()
                    .is_some_and(|s| s.is_up() && s.unanswered_for(now).is_some())
            });
            if peer_silent {
                self.transport.udp_suspect(now);
            } else {
                tracing::debug!("LIVENESS(CHECK_FAILED_PEER_ANSWERS)");
            }
        }
        if self.transport.take_relogin() {
            self.way_moved = true;
            self.link.way_changed(now);
        }
        match (self.link.state(), self.server_away) {
            (LinkState::LoggedIn, Some(_)) => self.server_away = None,
            (LinkState::LoggedIn, None) => {}
            (_, None) => self.server_away = Some(now),
            (_, Some(_)) => {}
        }
        match self.link.state() {
            LinkState::KeyMismatch => self.transport.halt(),
            state => self
                .transport
                .set_connecting(now, state == LinkState::Connecting),
        }
        while let Some(c) = self.transport.poll_command() {
            self.events.push_back(NodeEvent::Transport(c));
        }
        while let Some(c) = self.predictor.poll_command() {
            self.events.push_back(NodeEvent::Transport(c));
        }
        // Probes measure the UDP path: they leave as they are.
        while let Some(t) = self.transport.poll_transmit() {
            self.routed.push_back(t);
        }
        while let Some(t) = self.predictor.poll_transmit() {
            self.routed.push_back(t);
        }
        while let Some(ev) = self.link.poll_event() {
            self.on_link_event(now, ev);
        }
        while let Some(t) = self.link.poll_transmit() {
            self.transmits.push_back(t);
        }
        let names: Vec<String> = self.peers.keys().cloned().collect();
        for name in names {
            self.pump_peer(now, &name);
        }
    }

    fn pump_peer(&mut self, now: Instant, name: &str) {
        let Some(e) = self.peers.get_mut(name) else {
            return;
        };
        let mut down = None;
        let mut path_at = None;
        if let Some(s) = e.session.as_mut() {
            while let Some(ev) = s.poll_event() {
                match ev {
                    PeerEvent::Up { endpoint } => {
                        path_at = Some(endpoint);
                        e.serverless = false;
                        e.backoff = self.config.reconnect_min;
                        e.connecting = false;
                        e.resume = false;
                        e.down = None;
                        e.transfers.session_restarted();
                        let identity = s.remote().clone();
                        e.pinned = Some(identity.clone());
                        self.events.push_back(NodeEvent::PeerUp {
                            name: name.to_owned(),
                            endpoint,
                            identity,
                        });
                    }
                    PeerEvent::Down { reason, was_up } => down = Some((reason, was_up)),
                    PeerEvent::Interrupted { reason } => {
                        self.events.push_back(NodeEvent::PeerDown {
                            name: name.to_owned(),
                            reason,
                        })
                    }
                    PeerEvent::PathSuspect => e.transfers.path_changed(now),
                    PeerEvent::PathChanged { endpoint } => {
                        path_at = Some(endpoint);
                        e.transfers.path_changed(now);
                        self.events.push_back(NodeEvent::PathChanged {
                            name: name.to_owned(),
                            endpoint,
                        });
                    }
                    PeerEvent::PredictPorts { dst, intro_id } => {
                        tracing::info!(peer = %name, %dst, "PREDICT(HARD_SIDE)");
                        self.predictor.start(now, dst, intro_id);
                    }
                    PeerEvent::Pong { nonce, rtt } => self.events.push_back(NodeEvent::Pong {
                        peer: name.to_owned(),
                        nonce,
                        rtt,
                    }),
                    PeerEvent::Received(
                        m @ (PeerToPeer::Flow { .. }
                        | PeerToPeer::Frames { .. }
                        | PeerToPeer::FlowAck { .. }),
                    ) => e.transfers.handle(now, m),
                    PeerEvent::Received(_) => {}
                }
            }
        }
        if let Some(at) = path_at {
            let relayed = at == self.link.server_addr();
            note_path(e, name, at, relayed, &mut self.events);
        }
        while let Some(work) = e.transfers.poll_disk() {
            match work {
                DiskWork::Write { id, offset, data } => self.io.write(name, id, offset, data),
                DiskWork::VerifyPiece {
                    id,
                    piece,
                    offset,
                    len,
                    hash,
                } => self.io.verify_piece(name, id, piece, offset, len, hash),
                DiskWork::VerifyFile { id } => self.io.finish(name, id),
            }
        }
        while let Some(event) = e.transfers.poll_event() {
            match event {
                // The last word on a transfer: the owner keeps its record,
                // the machine forgets it.
                TransferEvent::Finished { id } | TransferEvent::Ended { id, .. } => {
                    e.transfers.forget(id)
                }
                _ => {}
            }
            self.events.push_back(NodeEvent::Transfer {
                peer: name.to_owned(),
                event,
            });
        }
        while let Some(ev) = e.transfers.poll_chat_event() {
            self.events.push_back(match ev {
                ReliableEvent::Delivered { seq, sent_ms, body } => NodeEvent::Delivered {
                    peer: name.to_owned(),
                    seq,
                    sent_ms,
                    body,
                },
                ReliableEvent::Acked { seq } => NodeEvent::Acked {
                    peer: name.to_owned(),
                    seq,
                },
            });
        }
        if let Some(s) = e.session.as_mut() {
            if s.is_up() {
                while let Some(p) = e.transfers.poll_control(now) {
                    if !s.send(now, &p) {
                        break;
                    }
                }
            }
            while let Some(t) = s.poll_transmit() {
                self.transmits.push_back(t);
            }
        }
        if let Some((reason, was_up)) = down {
            e.session = None;
            e.connecting = false;
            e.next_reconnect = now + e.backoff;
            if !was_up && !e.serverless {
                // An introduction that never came up (punching or the
                // handshake failed): the resume was tried; what waits keeps
                // asking. (A serverless attempt proves nothing: the resume
                // waits for the server or the next try.)
                e.resume = false;
            }
            e.serverless = false;
            if was_up {
                // A session that worked and ended by no choice of ours (the
                // peer fell silent, our process was stopped, the network
                // went away): ask for it again by ourselves, with backoff,
                // until the server says the peer is not there.
                e.auto_connect = true;
                e.resume = true;
            }
            e.down.get_or_insert((now, reason.clone()));
            self.events.push_back(NodeEvent::PeerDown {
                name: name.to_owned(),
                reason,
            });
        }
    }

    fn on_link_event(&mut self, now: Instant, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected {
                server_key,
                learned,
            } => self.events.push_back(NodeEvent::ServerConnected {
                server_key,
                learned,
            }),
            LinkEvent::ServerKeyMismatch { pinned, offered } => self
                .events
                .push_back(NodeEvent::ServerKeyMismatch { pinned, offered }),
            LinkEvent::Disconnected { reason } => {
                // The server lost us (or we it): the next login is a new
                // server session, whatever way it takes.
                self.way_moved = false;
                self.events.push_back(NodeEvent::ServerDown {
                    reason: reason.to_owned(),
                })
            }
            LinkEvent::LoggedIn {
                name,
                observed,
                probe_port,
            } => {
                self.server_version = None;
                if probe_port != 0 {
                    let alt = SocketAddr::new(self.link.server_addr().ip(), probe_port);
                    self.nat_probe = Some(NatProbe {
                        nonce: self.rng.gen(),
                        alt,
                        next: now,
                        tries: 0,
                        main: None,
                        other: None,
                    });
                    self.probe_nat(now);
                }
                // A new server session: relay channels died with the old
                // one (the server restarted). Relayed sessions end here and
                // are introduced again at once, instead of going quiet
                // until their dead timer. Not after a mere change of way
                // (UDP to TCP or back): the server keeps a user's channels
                // across its logins (and a proven "channel unknown" would
                // say otherwise).
                let moved = std::mem::take(&mut self.way_moved);
                let server = self.link.server_addr();
                let mut ended = Vec::new();
                for (peer, e) in self.peers.iter_mut() {
                    e.next_reconnect = now;
                    e.connecting = false;
                    if let Some(s) = e.session.as_mut() {
                        s.recheck(now);
                    }
                    // A serverless attempt still under way gives way to an
                    // introduction, which knows the peer's address now.
                    if e.serverless && !e.is_up() {
                        e.session = None;
                        e.serverless = false;
                    }
                    let relayed = e
                        .session
                        .as_ref()
                        .is_some_and(|s| s.endpoint() == Some(server));
                    if relayed && !moved {
                        e.session = None;
                        e.auto_connect = true;
                        e.resume = true;
                        let why = "the relay restarted; reconnecting";
                        e.down.get_or_insert((now, why.to_owned()));
                        ended.push(peer.clone());
                    }
                }
                for name in ended {
                    self.events.push_back(NodeEvent::PeerDown {
                        name,
                        reason: "the relay restarted; reconnecting".into(),
                    });
                }
                self.events
                    .push_back(NodeEvent::LoggedIn { name, observed })
            }
            LinkEvent::LoginFailed { reason, detail } => self
                .events
                .push_back(NodeEvent::LoginFailed { reason, detail }),
            LinkEvent::Response { rid, result } if self.listings.contains_key(&rid) => {
                self.on_page(now, rid, result)
            }
            LinkEvent::Response { rid, result } => {
                if let Some((name, auto)) = self.outgoing.remove(&rid) {
                    if let Err(err) = &result {
                        let reason = match err {
                            RequestError::Failed { reason, .. } => *reason,
                            RequestError::TimedOut => FailReason::TimedOut,
                        };
                        if let Some(e) = self.peers.get_mut(&name) {
                            e.connecting = false;
                            // Not there: nothing to resume (what waits for
                            // it keeps asking, with backoff).
                            if matches!(reason, FailReason::Offline | FailReason::UnknownUser) {
                                e.resume = false;
                            }
                        }
                        if auto {
                            tracing::debug!(peer = %name, reason = reason.as_str(), "RECONNECT(FAILED)");
                        } else {
                            self.events
                                .push_back(NodeEvent::ConnectFailed { name, reason });
                        }
                    }
                }
                self.events.push_back(NodeEvent::Response { rid, result });
            }
            LinkEvent::ConnectRequested {
                intro_id,
                name,
                identity,
            } => {
                if identity.verify().is_err() {
                    tracing::warn!(peer = %name, "INTRO(BAD_IDENTITY)");
                    return;
                }
                let pinned = self.peers.get(&name).and_then(|e| e.pinned.clone());
                match pinned {
                    Some(p) if p.sign_key == identity.sign_key => {
                        let locals = self.locals.clone();
                        let hard = self.hard;
                        self.link.request(now, |rid| ClientToServer::AgreeConnect {
                            rid,
                            intro_id,
                            accept: true,
                            locals,
                            hard,
                        });
                        let e = self.entry(now, &name);
                        e.connecting = true;
                        self.events.push_back(NodeEvent::ConnectRequest {
                            name,
                            identity,
                            auto_accepted: true,
                        });
                    }
                    Some(p) => {
                        let locals = Vec::new();
                        self.link.request(now, |rid| ClientToServer::AgreeConnect {
                            rid,
                            intro_id,
                            accept: false,
                            locals,
                            hard: false,
                        });
                        self.events.push_back(NodeEvent::KeyMismatch {
                            name,
                            pinned: p,
                            offered: identity,
                        });
                    }
                    None => {
                        self.incoming
                            .insert(name.clone(), (intro_id, identity.clone()));
                        self.events.push_back(NodeEvent::ConnectRequest {
                            name,
                            identity,
                            auto_accepted: false,
                        });
                    }
                }
            }
            LinkEvent::ConnectFailed {
                intro_id,
                name,
                reason,
            } => {
                if self
                    .incoming
                    .get(&name)
                    .is_some_and(|(i, _)| *i == intro_id)
                {
                    self.incoming.remove(&name);
                }
                if let Some(e) = self.peers.get_mut(&name) {
                    e.connecting = false;
                }
                self.events
                    .push_back(NodeEvent::ConnectFailed { name, reason });
            }
            LinkEvent::Punch(p) => {
                if p.identity.verify().is_err() {
                    tracing::warn!(peer = %p.name, "PUNCH(BAD_IDENTITY)");
                    return;
                }
                let pinned = self.peers.get(&p.name).and_then(|e| e.pinned.clone());
                if let Some(pinned) = pinned {
                    if pinned.sign_key != p.identity.sign_key {
                        self.events.push_back(NodeEvent::KeyMismatch {
                            name: p.name,
                            pinned,
                            offered: p.identity,
                        });
                        return;
                    }
                }
                // Addresses as the machines compare them (v4-mapped as
                // IPv4), and only ones a packet can be sent to.
                let usable = |a: &SocketAddr| {
                    let ip = a.ip();
                    a.port() != 0 && !ip.is_unspecified() && !ip.is_multicast() && {
                        !matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
                    }
                };
                let public = canonical(p.public);
                let mut candidates = vec![public];
                candidates.extend(
                    p.locals
                        .iter()
                        .map(|a| canonical(*a))
                        .filter(|a| *a != public && usable(a)),
                );
                candidates.retain(usable);
                let seed = self.rng.gen();
                let plan = PunchPlan {
                    intro_id: p.intro_id,
                    candidates,
                    initiator: p.initiator,
                    relay: p.relay.then(|| self.link.server_addr()),
                    channel: p.channel,
                    prediction: match (self.hard, p.peer_hard) {
                        (true, false) => Prediction::Hard,
                        (false, true) => Prediction::Easy(public.ip()),
                        _ => Prediction::None,
                    },
                    relay_first: self.peers.get(&p.name).is_some_and(|e| e.was_relayed),
                    only_candidates: false,
                };
                let local = self.identity.clone();
                let config = self.config.peer.clone();
                let e = self.entry(now, &p.name);
                e.channel_token = p.relay.then_some((p.channel, p.channel_token));
                e.serverless = false;
                match e.session.as_mut() {
                    // The peer reconnected while our session is up (its own
                    // ended first, or it restarted): same session, the new
                    // introduction's channel and candidates.
                    Some(s) if s.is_up() => s.reintroduce(now, plan),
                    _ => {
                        e.session = Some(PeerSession::punch(
                            now,
                            local,
                            p.identity.clone(),
                            config,
                            plan,
                            seed,
                        ))
                    }
                }
            }
        }
    }
}
