//! One end-to-end encrypted session with a peer.
//!
//! ```text
//!  Punching ──punch answered──▶ Handshaking ──response──▶ Established
//!     │ (responder waits for the peer's handshake)            │
//!     └──────────────────── timeout ─────────────▶ Closed ◀───┘ dead / closed
//! ```
//!
//! Punching: after a punch instruction both sides send [`Packet::Punch`]
//! probes to every candidate endpoint of the other (its public address as
//! the server saw it, and its local addresses) until one answers; that
//! opens both NATs. The initiator then runs a Noise IK handshake toward the
//! endpoint that answered, with the responder's key from the introduction.
//! Each side's handshake payload carries its identity binding, checked
//! against the identity the server introduced (and any key pinned before)
//! before anything else is accepted. As in WireGuard the responder sends
//! data only after the initiator's first data packet confirmed the keys.
//!
//! Established: keepalives every `keepalive` when nothing else was sent,
//! a new handshake when the keys get old (`REKEY_AFTER_TIME`) or when the
//! peer reports it lost the session, and death after `dead_after` of
//! silence.

use crate::codec::Reader;
use crate::identity::{identity_payload, Identity, PublicIdentity};
use crate::noise::{Handshake, Pattern, Transport, REJECT_AFTER_TIME, REKEY_AFTER_TIME};
use crate::wire::{self, Packet, PeerToPeer};
use crate::Transmit;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The token a node gives its peer, in the handshake, for the session it
/// holds under `index`: HMAC-SHA256 keyed by a key derived from the
/// node's long-term Noise private key, so the node can make it again
/// after a restart, knowing nothing of the session, and nobody else can
/// make it at all. The peer believes a [`Packet::SessionUnknown`] for that
/// session only with this token (QUIC's stateless reset, RFC 9000
/// §10.3): a restarted peer is heard at once, from any address; a
/// stranger cannot end a session.
pub(crate) fn reset_token(local: &Identity, index: u32) -> wire::ResetToken {
    let root = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, local.noise_private());
    let derived = ring::hmac::sign(&root, b"p2p-chat peer reset tokens v1");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref());
    let tag = ring::hmac::sign(&key, &index.to_be_bytes());
    let mut t = [0u8; 16];
    t.copy_from_slice(&tag.as_ref()[..16]);
    t
}

/// A peer handshake's payload: the sender's identity binding, then its
/// reset token for the session it opens ([`reset_token`]).
fn peer_payload(local: &Identity, index: u32) -> Vec<u8> {
    let mut p = identity_payload(&local.public());
    p.extend_from_slice(&reset_token(local, index));
    p
}

/// Reads a peer handshake's payload ([`peer_payload`]).
pub(crate) fn read_peer_payload(payload: &[u8]) -> Option<(PublicIdentity, wire::ResetToken)> {
    let mut r = Reader::new(payload);
    let id = PublicIdentity::decode(&mut r).ok()?;
    let token: [u8; 16] = r.bytes(16).ok()?.try_into().ok()?;
    r.finish().ok()?;
    Some((id, token))
}

#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Send a keepalive when nothing was sent for this long: 25 s, the
    /// WireGuard persistent-keepalive figure, under the ~30 s after which
    /// many NATs forget an idle UDP mapping.
    pub keepalive: Duration,
    /// The session is dead after this long without a packet from the peer.
    pub dead_after: Duration,
    /// Interval between punch probes to each candidate.
    pub punch_interval: Duration,
    /// Give up punching and handshaking after this long.
    pub connect_timeout: Duration,
    /// Interval between handshake initiations while waiting for a response
    /// (WireGuard's REKEY_TIMEOUT is 5 s; a chat wants to be quicker on
    /// loopback and LANs, with jitter so both sides don't collide).
    pub handshake_retry: Duration,
    /// The initiator handshakes through the relay when no punch probe was
    /// answered this long after the instruction. Punching between two
    /// home routers succeeds within one round trip of the probes, so 1 s
    /// leaves room for lossy links and still meets "relayed within 3 s".
    pub relay_after: Duration,
    /// While relayed, look for a direct path again this often (a probe
    /// window of `PROBE_WINDOW`).
    pub upgrade_interval: Duration,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(25),
            dead_after: Duration::from_secs(80),
            punch_interval: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(10),
            handshake_retry: Duration::from_secs(1),
            relay_after: Duration::from_secs(1),
            upgrade_interval: Duration::from_secs(30),
        }
    }
}

impl PeerConfig {
    /// A keepalive interval other than the default, and the liveness rule
    /// that goes with it: dead after about three keepalives went
    /// unanswered (3.2 intervals), and never sooner than the default 80 s.
    pub fn with_keepalive(mut self, keepalive: Duration) -> Self {
        self.keepalive = keepalive;
        self.dead_after = Self::default()
            .dead_after
            .max(keepalive * 3 + keepalive / 5);
        self
    }
}

/// Most addresses sent a path probe per search.
const MAX_PROBED: usize = 16;
/// How long each direct-path search sends probes.
const PROBE_WINDOW: Duration = Duration::from_secs(3);
/// A direct path that carried an authenticated packet this recently is
/// not given up for the relay when a relayed packet arrives (relayed
/// packets still in flight after an upgrade must not pull us back).
const DIRECT_STALE: Duration = Duration::from_secs(5);
/// A direct path that has not answered anything sent this long ago is
/// suspect: what we send goes through the relay as well until the peer
/// is heard again (a NAT that rebound, a firewall that forgot us). Above
/// the retransmission timeout of a healthy path; with the quiet end's
/// probe after [`ACTIVE_PROBE`] (1 s), short enough that a rebinding on
/// either side is followed within the 2 s a user would not call a stall.
const PATH_SUSPECT: Duration = Duration::from_millis(1800);

/// A relayed packet arrives while what we sent on the direct path waits
/// for an answer, and we have been on that path this long: the session
/// follows the peer to the relay. Above the relay's own delay (relayed
/// packets still in flight after a move to a direct path must not pull
/// us back).
const RELAY_FOLLOW_AFTER: Duration = Duration::from_secs(1);

/// A session that has sent something wanting an answer (flow data, a
/// ping) and heard nothing at all for this long is given up: the peer
/// died, restarted elsewhere, or its NAT forgot us, and waiting for
/// `dead_after` (80 s) would hold messages back as "sent" that nobody
/// receives. Well past [`PATH_SUSPECT`] (by which the relay was tried
/// too, and the server path checked), well above a healthy path's
/// retransmission timeouts. An idle
/// session wants no answers and keeps the keepalive rule alone: this
/// costs no wakeups when nothing happens.
const ACTIVE_DEAD_AFTER: Duration = Duration::from_secs(6);

/// For this long after chat or file traffic went either way, a session
/// that hears nothing from the peer for [`ACTIVE_PROBE`] pings it: a
/// conversation notices a dead or moved path in seconds, from either end
/// (the quiet end's ping also leaves through a rebound NAT's new mapping,
/// so the talking end follows it). Idle sessions stop probing after it,
/// and cost nothing beyond their keepalive.
const ACTIVE_WINDOW: Duration = Duration::from_secs(10);
/// Silence that makes an active session ping: well under [`PATH_SUSPECT`], so
/// the quiet end of a conversation whose NAT rebound has told the server
/// its new address (the node pings the server with the probe) before the
/// talking end's path turns suspect and copies to the relay. At most ten
/// small pings per pause in a conversation; none when idle.
const ACTIVE_PROBE: Duration = Duration::from_secs(1);

/// A responder that has not seen the initiator start a new handshake this
/// long after `REKEY_AFTER_TIME` starts one itself.
const RESPONDER_REKEY_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The session is up (first time, or again after a new handshake).
    Up { endpoint: SocketAddr },
    /// The session ended; `reason` says why, for the user. `was_up`: it
    /// had carried data (not a punch or handshake that failed).
    Down { reason: String, was_up: bool },
    /// The session stopped carrying data but this machine is already
    /// handshaking again (the peer restarted): down for the user, not
    /// over. `Up` or `Down` follows.
    Interrupted { reason: String },
    /// The peer's packets now come from another address (or through the
    /// relay: `endpoint` is then the relay's address).
    PathChanged { endpoint: SocketAddr },
    /// What was sent has had no answer for [`PATH_SUSPECT`]: from now on
    /// copies go through the relay too, so what waits should be sent
    /// again now rather than at its next retransmission (after a backoff
    /// that may be seconds long by then).
    PathSuspect,
    /// We are the hard side of port prediction: open
    /// [`PREDICTION_PORTS`] sockets and send punch probes for `intro_id`
    /// from each to `dst`, for a few seconds.
    PredictPorts { dst: SocketAddr, intro_id: u64 },
    /// An answer to [`PeerSession::ping`].
    Pong { nonce: u64, rtt: Duration },
    /// A message for the layers above (chat, acknowledgements).
    Received(PeerToPeer),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPhase {
    Punching,
    Handshaking,
    Established,
    Closed,
}

impl SessionPhase {
    /// The name the control API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionPhase::Punching => "punching",
            SessionPhase::Handshaking => "handshaking",
            SessionPhase::Established => "established",
            SessionPhase::Closed => "closed",
        }
    }
}

struct Hs {
    hs: Handshake,
    local_index: u32,
    dst: SocketAddr,
    started: Instant,
    retry_at: Instant,
    deadline: Instant,
}

struct Est {
    current: Transport,
    /// The peer's reset tokens for its side of `current` and `previous`
    /// (its handshake payloads).
    current_token: wire::ResetToken,
    previous: Option<Transport>,
    previous_token: wire::ResetToken,
    dst: SocketAddr,
    /// The peer has shown it holds `current` (we initiated it, or data
    /// arrived under it). Until then we keep sending under `previous`.
    confirmed: bool,
    previous_confirmed: bool,
    last_rx: Instant,
    last_tx: Instant,
    /// Since when `dst` is what it is.
    dst_since: Instant,
    /// The first packet sent since the peer was last heard that wants an
    /// answer (a flow packet, a ping): the measure of [`PATH_SUSPECT`].
    unanswered_since: Option<Instant>,
    /// When chat or file traffic last went either way: within
    /// [`ACTIVE_WINDOW`] of it the path is probed ([`ACTIVE_PROBE`]).
    last_data: Option<Instant>,
    /// The path turned suspect and the layers above were told
    /// ([`PeerEvent::PathSuspect`]); cleared when the peer is heard.
    suspected: bool,
    /// When the active probe went, unanswered: the peer fell quiet in a
    /// conversation, and our own mapping may be what changed.
    probed_at: Option<Instant>,
    rekey: Option<Hs>,
}

impl Est {
    /// When an active session should ping: it has carried traffic within
    /// [`ACTIVE_WINDOW`], waits for no answer already, and has heard
    /// nothing for [`ACTIVE_PROBE`].
    fn active_probe_at(&self) -> Option<Instant> {
        let data = self.last_data?;
        if self.unanswered_since.is_some() {
            return None;
        }
        let at = self.last_rx + ACTIVE_PROBE;
        (at <= data + ACTIVE_WINDOW).then_some(at)
    }

    /// Whether the session can carry data: under confirmed keys, current
    /// or (during a rekey we answered) previous.
    fn usable(&self) -> bool {
        self.confirmed || (self.previous_confirmed && self.previous.is_some())
    }
}

enum State {
    Punching {
        deadline: Instant,
        initiator: bool,
        /// When the initiator turns to the relay (None: no relay).
        relay_at: Option<Instant>,
    },
    Handshaking(Box<Hs>),
    Established(Box<Est>),
    Closed,
}

/// To an address the peer moved to but that has not shown it receives
/// (answered a ping sent there), at most this many times the bytes that
/// came from it are sent (QUIC's anti-amplification limit).
pub const AMPLIFICATION_FACTOR: usize = 3;
/// Validated addresses remembered per session.
const VALIDATED_KEPT: usize = 4;

struct PathCheck {
    addr: SocketAddr,
    nonce: u64,
    received: usize,
    sent: usize,
    /// When the ping last went: it goes again ([`PATH_PING_AGAIN`]) while
    /// packets keep coming from the address unvalidated (it or its answer
    /// may have been lost).
    pinged: Option<Instant>,
}

/// A path check's ping is sent again after this long without its answer.
const PATH_PING_AGAIN: Duration = Duration::from_millis(250);

/// What a punch instruction says to do: which introduction, which
/// endpoints to probe, and whether we start the handshake.
#[derive(Clone, Debug)]
pub struct PunchPlan {
    pub intro_id: u64,
    pub candidates: Vec<SocketAddr>,
    pub initiator: bool,
    /// The relay's address, if the server relays this introduction:
    /// packets for it go out wrapped in [`Packet::Relay`] on `channel`,
    /// our own id of the introduction's relay channel.
    pub relay: Option<SocketAddr>,
    pub channel: u64,
    pub prediction: Prediction,
    /// The last session with this peer was relayed (no direct path was
    /// found): the initiator handshakes through the relay at once instead
    /// of after `relay_after`, punching beside it; a direct path found
    /// later is still taken (upgrades).
    pub relay_first: bool,
    /// Take punch probes and answers only from `candidates` (a session
    /// started without the server: its id is computable by anyone, so a
    /// probe from elsewhere must not steer our handshake there).
    pub only_candidates: bool,
}

/// Port prediction (the birthday technique), for a NAT pair where one
/// side maps each destination to a new port and the other does not. The
/// hard side opens [`PREDICTION_PORTS`] extra sockets toward the easy
/// side's public address (the daemon does that, on
/// [`PeerEvent::PredictPorts`]); the easy side probes random ports of the
/// hard side's address. About 2,000 probes against 256 open mappings
/// find one with probability 1 - (1 - 256/64512)^2048, above 99.9%.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    None,
    /// We are the easy side: probe random ports at this address.
    Easy(std::net::IpAddr),
    /// We are the hard side: ask for extra sockets toward the peer.
    Hard,
}

/// Extra sockets the hard side opens (Tailscale's figure).
pub const PREDICTION_PORTS: usize = 256;
/// The easy side starts probing this long after the instruction, so the
/// hard side's mappings exist by then…
const SPRAY_DELAY: Duration = Duration::from_millis(500);
/// …then sends this many probes per tick…
const SPRAY_BATCH: u32 = 8;
const SPRAY_TICK: Duration = Duration::from_millis(15);
/// …up to this many in all (about 4 s at ~530 a second).
const SPRAY_MAX: u32 = 2048;

#[derive(Clone, Copy, Debug)]
struct Spray {
    ip: std::net::IpAddr,
    next: Instant,
    sent: u32,
}

/// The path a session's packets take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Direct(SocketAddr),
    /// Through the rendezvous server's relay at this address.
    Relay(SocketAddr),
}

/// The direct-path search: punch probes to every candidate.
#[derive(Debug, Clone, Copy)]
struct Discovery {
    next_probe: Instant,
    until: Instant,
}

pub struct PeerSession {
    local: Identity,
    remote: PublicIdentity,
    config: PeerConfig,
    state: State,
    /// The sender index of the last initiation we answered, and our
    /// answer: a duplicate of it gets the same answer, not new keys.
    answered: Option<(u32, Vec<u8>)>,
    up: bool,
    /// The introduction this session came from: punch probes carry it.
    intro_id: Option<u64>,
    /// Our id of its relay channel: relayed packets carry it.
    channel: Option<u64>,
    candidates: Vec<SocketAddr>,
    relay: Option<SocketAddr>,
    discovery: Option<Discovery>,
    /// Addresses sent an authenticated path probe in this search.
    probed: Vec<SocketAddr>,
    /// Where the punch answer that started our handshake came from.
    punched: Option<SocketAddr>,
    /// Punches count only from `candidates` ([`PunchPlan::only_candidates`]).
    only_candidates: bool,
    prediction: Prediction,
    spray: Option<Spray>,
    /// When a relayed session looks for a direct path again.
    upgrade_at: Option<Instant>,
    last_direct_rx: Option<Instant>,
    rtt: Option<Duration>,
    /// Pings in flight: when sent, and whether the user asked (a probe's
    /// answer only updates the round trip).
    pings: BTreeMap<u64, (Instant, bool)>,
    /// The address the session moved to (authenticated packets came from
    /// it) that has not yet answered our ping from there; until it does,
    /// it gets at most [`AMPLIFICATION_FACTOR`] times what came from it:
    /// a peer that writes a victim's address on its packets cannot make
    /// us send the victim a file.
    path_check: Option<PathCheck>,
    /// Addresses that answered (the last few), and the ones the session
    /// started on: moving back to one needs no check.
    validated: VecDeque<SocketAddr>,
    /// Packets not sent to an unvalidated address for want of budget.
    pub amplification_refused: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PeerEvent>,
    rng: rand::rngs::StdRng,
}

impl PeerSession {
    fn new(
        local: Identity,
        remote: PublicIdentity,
        config: PeerConfig,
        state: State,
        seed: u64,
    ) -> Self {
        Self {
            local,
            remote,
            config,
            state,
            answered: None,
            up: false,
            intro_id: None,
            channel: None,
            candidates: Vec::new(),
            relay: None,
            discovery: None,
            probed: Vec::new(),
            punched: None,
            only_candidates: false,
            prediction: Prediction::None,
            spray: None,
            upgrade_at: None,
            last_direct_rx: None,
            path_check: None,
            validated: VecDeque::new(),
            amplification_refused: 0,
            rtt: None,
            pings: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Starts punching after a punch instruction.
    pub fn punch(
        now: Instant,
        local: Identity,
        remote: PublicIdentity,
        config: PeerConfig,
        plan: PunchPlan,
        seed: u64,
    ) -> Self {
        let PunchPlan {
            intro_id,
            mut candidates,
            initiator,
            relay,
            channel,
            prediction,
            relay_first,
            only_candidates,
        } = plan;
        candidates.dedup();
        // Never probe the relay itself as if it were the peer.
        candidates.retain(|c| Some(*c) != relay);
        let deadline = now + config.connect_timeout;
        let relay_at = relay.filter(|_| initiator).map(|_| {
            if relay_first {
                now
            } else {
                now + config.relay_after
            }
        });
        let mut s = Self::new(
            local,
            remote,
            config,
            State::Punching {
                deadline,
                initiator,
                relay_at,
            },
            seed,
        );
        s.only_candidates = only_candidates;
        s.intro_id = Some(intro_id);
        s.channel = relay.map(|_| channel);
        s.candidates = candidates;
        s.relay = relay;
        s.discovery = Some(Discovery {
            next_probe: now,
            until: deadline,
        });
        s.prediction = prediction;
        match prediction {
            Prediction::Easy(ip) => {
                s.spray = Some(Spray {
                    ip,
                    next: now + SPRAY_DELAY,
                    sent: 0,
                })
            }
            Prediction::Hard => {
                if let Some(dst) = s.candidates.first().copied() {
                    s.events
                        .push_back(PeerEvent::PredictPorts { dst, intro_id });
                }
            }
            Prediction::None => {}
        }
        s.handle_timeout(now);
        s
    }

    /// A session with nothing under way, for a peer whose handshake
    /// initiation the caller is about to pass to [`Self::handle_init`].
    pub fn idle(local: Identity, remote: PublicIdentity, config: PeerConfig, seed: u64) -> Self {
        Self::new(local, remote, config, State::Closed, seed)
    }

    /// Relays through `relay` on `channel`, for a session that was not
    /// made from an introduction (the peer reached us through the relay
    /// after we restarted). Keeps what an introduction gave.
    pub fn use_relay(&mut self, relay: SocketAddr, channel: u64) {
        // The peer's handshake came on this channel: it is the one the
        // server relays now (a newer introduction replaces older ones).
        self.channel = Some(channel);
        self.relay = Some(relay);
    }

    /// A new introduction to the peer of a session that is up (the peer
    /// reconnected, e.g. after its session timed out first): its channel,
    /// candidates and relay replace the old ones, and a direct-path search
    /// starts, as for a fresh introduction.
    pub fn reintroduce(&mut self, now: Instant, plan: PunchPlan) {
        let mut candidates = plan.candidates;
        candidates.dedup();
        candidates.retain(|c| Some(*c) != plan.relay);
        self.intro_id = Some(plan.intro_id);
        self.channel = plan.relay.map(|_| plan.channel);
        self.candidates = candidates;
        self.relay = plan.relay;
        self.probed.clear();
        self.discovery = Some(Discovery {
            next_probe: now,
            until: now + self.config.connect_timeout,
        });
        self.handle_timeout(now);
    }

    pub fn remote(&self) -> &PublicIdentity {
        &self.remote
    }

    pub fn phase(&self) -> SessionPhase {
        match &self.state {
            State::Punching { .. } => SessionPhase::Punching,
            State::Handshaking(_) => SessionPhase::Handshaking,
            State::Established(e) if e.usable() => SessionPhase::Established,
            State::Established(_) => SessionPhase::Handshaking,
            State::Closed => SessionPhase::Closed,
        }
    }

    pub fn is_up(&self) -> bool {
        self.phase() == SessionPhase::Established
    }

    /// The introduction this session came from (punch probes and relay
    /// packets name it), if it came from one.
    pub fn intro_id(&self) -> Option<u64> {
        self.intro_id
    }

    /// The path in use, once there is one.
    pub fn path(&self) -> Option<Path> {
        let dst = self.endpoint()?;
        Some(if Some(dst) == self.relay {
            Path::Relay(dst)
        } else {
            Path::Direct(dst)
        })
    }

    /// How the path in use was found: `punch` (a candidate answered),
    /// `port-prediction` (a port we guessed), `roaming` (the peer moved),
    /// or `relay`. The hard side of a prediction sees the peer at one of
    /// its candidates: the caller, which knows which socket answered,
    /// tells that case apart.
    pub fn technique(&self) -> Option<&'static str> {
        Some(match self.path()? {
            Path::Relay(_) => "relay",
            Path::Direct(a) if self.candidates.contains(&a) => "punch",
            Path::Direct(_) if matches!(self.prediction, Prediction::Easy(_)) => "port-prediction",
            Path::Direct(_) => "roaming",
        })
    }

    fn on_relay(&self) -> bool {
        self.relay.is_some() && self.endpoint() == self.relay
    }

    /// Queues a packet for `dst`, wrapped for the relay if `dst` is the
    /// relay.
    fn emit(&mut self, dst: SocketAddr, payload: Vec<u8>) {
        let payload = match (self.relay, self.channel) {
            (Some(relay), Some(channel)) if relay == dst => Packet::Relay {
                channel,
                payload: &payload,
            }
            .encode(),
            _ => payload,
        };
        if let Some(c) = self.path_check.as_mut().filter(|c| c.addr == dst) {
            if c.sent + payload.len() > AMPLIFICATION_FACTOR * c.received {
                self.amplification_refused += 1;
                tracing::debug!(%dst, "DROP(AMPLIFICATION)");
                return;
            }
            c.sent += payload.len();
        }
        self.transmits.push_back(Transmit::new(dst, payload));
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        match &self.state {
            State::Established(e) => Some(e.dst),
            State::Handshaking(h) => Some(h.dst),
            _ => None,
        }
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// How long what this session sent has waited for any answer, if it
    /// waits ([`PATH_SUSPECT`] and more: the path is in doubt).
    pub fn unanswered_for(&self, now: Instant) -> Option<Duration> {
        match &self.state {
            State::Established(e) => e
                .unanswered_since
                .map(|t| now.saturating_duration_since(t.max(e.last_rx)))
                .filter(|d| *d >= PATH_SUSPECT),
            _ => None,
        }
    }

    /// When this session wants the way to the server checked: when what
    /// we sent became suspect (if the server is silent too, it is our
    /// network).
    pub fn server_check_at(&self) -> Option<Instant> {
        match &self.state {
            State::Established(e) => e.unanswered_since.map(|t| t + PATH_SUSPECT),
            _ => None,
        }
    }

    /// When the server should hear from us because of this session: the
    /// peer fell quiet mid-conversation and our probe went, or what we
    /// sent has waited [`ACTIVE_PROBE`] for an answer. Our NAT may have
    /// rebound: the server then learns our new address (its relay, which
    /// a suspect path falls back to, reaches us there, and takes our
    /// copies from there) before the path turns suspect.
    pub fn probed_at(&self) -> Option<Instant> {
        match &self.state {
            State::Established(e) => e.probed_at.or(e.unanswered_since.map(|t| t + ACTIVE_PROBE)),
            _ => None,
        }
    }

    /// Local indices this session answers to.
    pub fn owns_index(&self, index: u32) -> bool {
        match &self.state {
            State::Handshaking(h) => h.local_index == index,
            State::Established(e) => {
                e.current.local_index == index
                    || e.previous.as_ref().is_some_and(|p| p.local_index == index)
                    || e.rekey.as_ref().is_some_and(|h| h.local_index == index)
            }
            _ => false,
        }
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let discovery = self.discovery.map(|d| d.next_probe.min(d.until));
        let spray = self.spray.map(|s| s.next);
        [discovery, spray, self.upgrade_at, self.state_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    fn state_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Punching {
                deadline, relay_at, ..
            } => Some(relay_at.map_or(*deadline, |r| r.min(*deadline))),
            State::Handshaking(h) => Some(h.retry_at.min(h.deadline)),
            // Mirrors `handle_timeout` rule by rule: a deadline that the
            // handler would not act on must not be asked for.
            State::Established(e) => {
                let dead = e.last_rx + self.config.dead_after;
                // Adaptive liveness: data waiting for an answer, and an
                // active conversation that has not heard the peer lately.
                let stalled = e
                    .unanswered_since
                    .map(|t| (t + ACTIVE_DEAD_AFTER).max(e.last_rx + ACTIVE_DEAD_AFTER));
                let probe = e.active_probe_at();
                let suspect = e
                    .unanswered_since
                    .filter(|_| !e.suspected)
                    .map(|t| t + PATH_SUSPECT);
                let keepalive = e.usable().then(|| e.last_tx + self.config.keepalive);
                let (rekey, expiry, age) = match &e.rekey {
                    Some(h) => (Some(h.retry_at.min(h.deadline)), None, None),
                    None => {
                        let grace = if e.current.initiator {
                            Duration::ZERO
                        } else {
                            RESPONDER_REKEY_GRACE
                        };
                        let age = e
                            .confirmed
                            .then(|| e.current.created + REKEY_AFTER_TIME + grace);
                        (None, Some(e.current.created + REJECT_AFTER_TIME), age)
                    }
                };
                [
                    Some(dead),
                    stalled,
                    probe,
                    suspect,
                    keepalive,
                    rekey,
                    expiry,
                    age,
                ]
                .into_iter()
                .flatten()
                .min()
            }
            State::Closed => None,
        }
    }

    fn start_handshake(&mut self, now: Instant, dst: SocketAddr, deadline: Instant) -> Option<Hs> {
        let mut hs = Handshake::initiator(
            Pattern::IK,
            self.local.noise_private(),
            Some(&self.remote.noise_key),
        )
        .ok()?;
        let local_index = self.rng.gen::<u32>().max(1);
        let noise = hs.write(&peer_payload(&self.local, local_index)).ok()?;
        let init = Packet::HandshakeInit {
            sender: local_index,
            pattern: Pattern::IK,
            noise: &noise,
            cookie: [0; 16],
        }
        .encode();
        self.emit(dst, init);
        let jitter = self
            .config
            .handshake_retry
            .mul_f64(self.rng.gen_range(0.0..0.3));
        tracing::debug!(%dst, "HANDSHAKE(INIT)");
        Some(Hs {
            hs,
            local_index,
            dst,
            started: now,
            retry_at: now + self.config.handshake_retry + jitter,
            deadline,
        })
    }

    fn go_down(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::info!(%reason, "SESSION(DOWN)");
        self.state = State::Closed;
        let was_up = std::mem::take(&mut self.up);
        self.events.push_back(PeerEvent::Down { reason, was_up });
    }

    /// Sends a message on the session; false if it cannot carry data now.
    pub fn send(&mut self, now: Instant, msg: &PeerToPeer) -> bool {
        let dst = match &self.state {
            State::Established(e) => e.dst,
            _ => return false,
        };
        self.send_to(now, msg, dst)
    }

    /// Sends a message on the session to `dst`, which need not be the
    /// path in use (a probe of a new path).
    fn send_to(&mut self, now: Instant, msg: &PeerToPeer, dst: SocketAddr) -> bool {
        let relay = self.relay;
        let State::Established(e) = &mut self.state else {
            return false;
        };
        let keys = if e.confirmed {
            &mut e.current
        } else {
            match e.previous.as_mut().filter(|_| e.previous_confirmed) {
                Some(p) => p,
                None => return false,
            }
        };
        if keys.expired(now) {
            return false;
        }
        let Ok(payload) = keys.seal(&msg.encode()) else {
            return false;
        };
        e.last_tx = now;
        if matches!(
            msg,
            PeerToPeer::Flow { .. } | PeerToPeer::Frames { .. } | PeerToPeer::FlowAck { .. }
        ) {
            e.last_data = Some(now);
        }
        let wants_answer = matches!(
            msg,
            PeerToPeer::Flow { .. } | PeerToPeer::Frames { .. } | PeerToPeer::Ping { .. }
        );
        if wants_answer && dst == e.dst {
            e.unanswered_since.get_or_insert(now);
        }
        let suspect = e
            .unanswered_since
            .is_some_and(|t| now.saturating_duration_since(t) >= PATH_SUSPECT);
        // (Not a packet larger than the relay carries: it would be dropped.)
        let fits = payload.len() <= wire::MAX_PACKET;
        let also_relay = relay.filter(|r| suspect && fits && dst == e.dst && *r != dst);
        if let Some(r) = also_relay {
            tracing::debug!("PATH(SUSPECT_ALSO_RELAY)");
            self.emit(r, payload.clone());
        }
        self.emit(dst, payload);
        true
    }

    /// Sends a ping; the answer comes as [`PeerEvent::Pong`].
    pub fn ping(&mut self, now: Instant) -> Option<u64> {
        self.send_ping(now, true)
    }

    fn send_ping(&mut self, now: Instant, asked: bool) -> Option<u64> {
        let nonce = self.rng.gen();
        if self.send(now, &PeerToPeer::Ping { nonce }) {
            // Bounded: unanswered probes do not pile up.
            if self.pings.len() >= 16 {
                self.pings.pop_first();
            }
            self.pings.insert(nonce, (now, asked));
            Some(nonce)
        } else {
            None
        }
    }

    /// Our way out changed (the server link moved to TCP, or came back):
    /// a session whose path is in doubt pings at once, which, the path
    /// being suspect, goes through the relay too; the peer hears it there
    /// and follows, instead of both sides waiting for their next packet.
    pub fn recheck(&mut self, now: Instant) {
        let State::Established(e) = &mut self.state else {
            return;
        };
        let Some(since) = e.unanswered_since else {
            return;
        };
        // Suspect from now on, if it was not yet: the ping (and what
        // follows until the peer is heard) goes through the relay too.
        e.unanswered_since = Some(
            now.checked_sub(PATH_SUSPECT)
                .map_or(since, |t| t.min(since)),
        );
        tracing::debug!("PATH(RECHECK)");
        self.send_ping(now, false);
    }

    /// Closes politely.
    pub fn close(&mut self, now: Instant) {
        self.send(now, &PeerToPeer::Close);
        self.state = State::Closed;
        self.up = false;
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.discover(now);
        match &mut self.state {
            State::Punching {
                deadline, relay_at, ..
            } => {
                if now >= *deadline {
                    return self.go_down("no path to the peer: hole punching timed out");
                }
                if relay_at.is_some_and(|t| now >= t) {
                    let (deadline, relay) = (*deadline, self.relay.expect("relay_at needs it"));
                    tracing::debug!("PUNCH(NO_ANSWER_USE_RELAY)");
                    if let Some(hs) = self.start_handshake(now, relay, deadline) {
                        self.state = State::Handshaking(Box::new(hs));
                    }
                }
            }
            State::Handshaking(h) => {
                if now >= h.deadline {
                    return self.go_down("the peer did not answer the handshake");
                }
                if now >= h.retry_at {
                    // A direct path that does not carry the handshake (a
                    // forged or dying punch answer): retry through the
                    // relay, which the peer answers on as well.
                    let dst = match (self.relay, self.punched) {
                        (Some(relay), _) if h.dst != relay && self.channel.is_some() => relay,
                        (Some(relay), Some(direct)) if h.dst == relay => direct,
                        _ => h.dst,
                    };
                    let deadline = h.deadline;
                    if let Some(hs) = self.start_handshake(now, dst, deadline) {
                        self.state = State::Handshaking(Box::new(hs));
                    }
                }
            }
            State::Established(e) => {
                if now >= e.last_rx + self.config.dead_after {
                    let secs = self.config.dead_after.as_secs();
                    return self.go_down(format!("no packet from the peer for {secs} s"));
                }
                let stalled = e.unanswered_since.is_some_and(|t| {
                    now >= t + ACTIVE_DEAD_AFTER && now >= e.last_rx + ACTIVE_DEAD_AFTER
                });
                if stalled {
                    let secs = ACTIVE_DEAD_AFTER.as_secs();
                    tracing::info!("LIVENESS(ACTIVE_DEAD)");
                    return self.go_down(format!(
                        "the peer stopped answering ({secs} s of silence while data waited); reconnecting"
                    ));
                }
                if !e.suspected && e.unanswered_since.is_some_and(|t| now >= t + PATH_SUSPECT) {
                    e.suspected = true;
                    tracing::debug!("PATH(SUSPECT)");
                    self.events.push_back(PeerEvent::PathSuspect);
                }
                let State::Established(e) = &mut self.state else {
                    return;
                };
                if e.active_probe_at().is_some_and(|t| now >= t) {
                    e.probed_at = Some(now);
                    tracing::debug!("LIVENESS(ACTIVE_PROBE)");
                    if self.send_ping(now, false).is_none() {
                        // Cannot seal (keys expiring): the rules above
                        // decide; don't ask again at once.
                        if let State::Established(e) = &mut self.state {
                            e.last_data = None;
                        }
                    }
                    return;
                }
                let State::Established(e) = &mut self.state else {
                    return;
                };
                if e.current.expired(now) && e.rekey.is_none() {
                    return self.go_down("session keys expired without a new handshake");
                }
                if let Some(h) = &e.rekey {
                    if now >= h.deadline {
                        e.rekey = None;
                    } else if now >= h.retry_at {
                        let (dst, deadline) = (h.dst, h.deadline);
                        let hs = self.start_handshake(now, dst, deadline);
                        if let State::Established(e) = &mut self.state {
                            e.rekey = hs;
                        }
                        return;
                    }
                }
                let State::Established(e) = &mut self.state else {
                    return;
                };
                let age = now.saturating_duration_since(e.current.created);
                let wants =
                    e.current.wants_rekey(now) || age >= REKEY_AFTER_TIME + RESPONDER_REKEY_GRACE;
                if wants && e.rekey.is_none() && e.confirmed {
                    tracing::debug!("SESSION(REKEY)");
                    let (dst, deadline) = (e.dst, now + self.config.connect_timeout);
                    let hs = self.start_handshake(now, dst, deadline);
                    if let State::Established(e) = &mut self.state {
                        e.rekey = hs;
                    }
                    return;
                }
                if e.usable()
                    && now >= e.last_tx + self.config.keepalive
                    && !self.send(now, &PeerToPeer::Keepalive)
                {
                    // The keys it would use expired (a rekey we answered
                    // was never confirmed): don't ask again at once; the
                    // session's death or expiry follows.
                    if let State::Established(e) = &mut self.state {
                        e.last_tx = now;
                    }
                }
            }
            State::Closed => {}
        }
    }

    /// Sends punch probes while a direct-path search is on, and starts a
    /// search when a relayed session is due for one.
    fn discover(&mut self, now: Instant) {
        self.spray(now);
        if self.upgrade_at.is_some_and(|t| now >= t) {
            self.upgrade_at = None;
            if self.on_relay() {
                tracing::debug!("PATH(SEARCH_DIRECT)");
                self.probed.clear();
                self.discovery = Some(Discovery {
                    next_probe: now,
                    until: now + PROBE_WINDOW,
                });
            }
        }
        let Some(d) = &mut self.discovery else {
            return;
        };
        if now >= d.until {
            self.discovery = None;
            if self.on_relay() {
                self.upgrade_at = Some(now + self.config.upgrade_interval);
            }
            return;
        }
        if now < d.next_probe {
            return;
        }
        d.next_probe = now + self.config.punch_interval;
        let Some(intro_id) = self.intro_id else {
            return;
        };
        let probe = Packet::Punch {
            intro_id,
            reply: false,
        }
        .encode();
        for c in &self.candidates {
            self.transmits.push_back(Transmit::new(*c, probe.clone()));
        }
    }

    /// The easy side of port prediction: punch probes to random ports of
    /// the hard side's address, a batch per tick.
    fn spray(&mut self, now: Instant) {
        let (Some(sp), Some(intro_id)) = (&mut self.spray, self.intro_id) else {
            return;
        };
        if now < sp.next {
            return;
        }
        let probe = Packet::Punch {
            intro_id,
            reply: false,
        }
        .encode();
        for _ in 0..SPRAY_BATCH {
            let port = self.rng.gen_range(1024..=u16::MAX);
            self.transmits
                .push_back(Transmit::new(SocketAddr::new(sp.ip, port), probe.clone()));
        }
        sp.sent += SPRAY_BATCH;
        sp.next = now + SPRAY_TICK;
        if sp.sent >= SPRAY_MAX {
            tracing::debug!("PREDICT(SPRAY_DONE)");
            self.spray = None;
        }
    }

    /// A punch probe or reply for our introduction arrived from `from`:
    /// a direct path to the peer is open.
    pub fn handle_punch(&mut self, now: Instant, from: SocketAddr, reply: bool) {
        let Some(intro_id) = self.intro_id else {
            return;
        };
        if Some(from) == self.relay || matches!(self.state, State::Closed) {
            return;
        }
        if self.only_candidates && !self.candidates.contains(&from) {
            tracing::debug!(%from, "PUNCH(NOT_A_CANDIDATE)");
            return;
        }
        // Outside a search, probes go unanswered: the introduction id is in
        // clear on the wire and must not buy anyone a stream of replies.
        let searching = matches!(self.state, State::Punching { .. }) || self.discovery.is_some();
        if !searching {
            if !self.on_relay() {
                return;
            }
            // Relayed, and the peer is searching for a direct path: search
            // too, so two schedules that drifted apart still meet.
            tracing::debug!(%from, "PATH(SEARCH_WITH_PEER)");
            self.probed.clear();
            self.upgrade_at = None;
            self.discovery = Some(Discovery {
                next_probe: now,
                until: now + PROBE_WINDOW,
            });
        }
        if !reply {
            let payload = Packet::Punch {
                intro_id,
                reply: true,
            }
            .encode();
            self.transmits.push_back(Transmit::new(from, payload));
        }
        match &self.state {
            State::Punching {
                initiator: true,
                deadline,
                ..
            } => {
                let deadline = *deadline;
                self.punched = Some(from);
                tracing::debug!(%from, "PUNCH(PATH_FOUND)");
                if let Some(hs) = self.start_handshake(now, from, deadline) {
                    self.state = State::Handshaking(Box::new(hs));
                }
            }
            // Handshaking through the relay: go direct instead.
            State::Handshaking(h) if Some(h.dst) == self.relay => {
                let deadline = h.deadline;
                self.punched = Some(from);
                tracing::debug!(%from, "PUNCH(PATH_FOUND_DURING_RELAY_HANDSHAKE)");
                if let Some(hs) = self.start_handshake(now, from, deadline) {
                    self.state = State::Handshaking(Box::new(hs));
                }
            }
            // Relayed: prove the direct path with an authenticated packet;
            // the peer moves to it on receipt, and its answer moves us.
            State::Established(e)
                if Some(e.dst) == self.relay
                    && e.usable()
                    && self.probed.len() < MAX_PROBED
                    && !self.probed.contains(&from) =>
            {
                tracing::debug!(%from, "PATH(PROBE_DIRECT)");
                self.probed.push(from);
                self.send_to(now, &PeerToPeer::Keepalive, from);
            }
            _ => {}
        }
    }

    /// The peer's handshake initiation, already read into `hs` by the
    /// caller, with the payload decoded as `identity`. Returns false if it
    /// was refused.
    pub fn handle_init(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sender: u32,
        mut hs: Handshake,
        identity: &PublicIdentity,
        token: wire::ResetToken,
    ) -> bool {
        if identity.sign_key != self.remote.sign_key {
            return false;
        }
        if let Some(rs) = hs.remote_static() {
            if identity.verify_for_noise_key(&rs).is_err() {
                return false;
            }
        } else {
            return false;
        }
        if let Some((_, response)) = self.answered.as_ref().filter(|a| a.0 == sender) {
            tracing::debug!("HANDSHAKE(DUPLICATE_INIT)");
            let response = response.clone();
            self.emit(from, response);
            return true;
        }
        // Both sides initiating at once: the larger key yields.
        let initiating = matches!(self.state, State::Handshaking(_))
            || matches!(&self.state, State::Established(e) if e.rekey.is_some());
        if initiating && self.local.sign_key() < self.remote.sign_key {
            tracing::debug!("HANDSHAKE(CROSSED_KEEP_OURS)");
            return false;
        }
        let local_index = self.rng.gen::<u32>().max(1);
        let Ok(noise) = hs.write(&peer_payload(&self.local, local_index)) else {
            return false;
        };
        let Ok(transport) = hs.into_transport(local_index, sender, now) else {
            return false;
        };
        let response = Packet::HandshakeResponse {
            sender: local_index,
            receiver: sender,
            noise: &noise,
        }
        .encode();
        self.answered = Some((sender, response.clone()));
        self.emit(from, response);
        tracing::debug!(%from, "HANDSHAKE(RESPONDED)");
        self.install(now, transport, from, false, token);
        true
    }

    /// A response to our handshake initiation.
    pub fn handle_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sender: u32,
        receiver: u32,
        noise: &[u8],
    ) {
        let slot = match &mut self.state {
            State::Handshaking(h) if h.local_index == receiver => Some(&mut **h),
            State::Established(e) => e.rekey.as_mut().filter(|h| h.local_index == receiver),
            _ => None,
        };
        let Some(h) = slot else {
            return;
        };
        let Ok(payload) = h.hs.read(noise) else {
            tracing::debug!("HANDSHAKE(BAD_RESPONSE)");
            return;
        };
        let read = read_peer_payload(&payload);
        let ok = read.as_ref().is_some_and(|(id, _)| {
            id.sign_key == self.remote.sign_key
                && id.verify_for_noise_key(&self.remote.noise_key).is_ok()
        });
        let (true, Some((_, token))) = (ok, read) else {
            tracing::warn!("HANDSHAKE(BAD_IDENTITY)");
            return;
        };
        let started = h.started;
        let local_index = h.local_index;
        let hs = match &mut self.state {
            State::Handshaking(_) => match std::mem::replace(&mut self.state, State::Closed) {
                State::Handshaking(h) => h.hs,
                _ => unreachable!(),
            },
            State::Established(e) => e.rekey.take().expect("matched above").hs,
            _ => unreachable!(),
        };
        let Ok(transport) = hs.into_transport(local_index, sender, now) else {
            return;
        };
        self.rtt = Some(now.saturating_duration_since(started));
        self.install(now, transport, from, true, token);
        // Confirm the keys to the responder at once.
        self.send(now, &PeerToPeer::Keepalive);
    }

    fn install(
        &mut self,
        now: Instant,
        transport: Transport,
        from: SocketAddr,
        confirmed: bool,
        token: wire::ResetToken,
    ) {
        let keep_direct = Some(from) == self.relay
            && self
                .last_direct_rx
                .is_some_and(|t| now.saturating_duration_since(t) < DIRECT_STALE);
        self.heard(now, from);
        match &mut self.state {
            State::Established(e) => {
                let old = std::mem::replace(&mut e.current, transport);
                e.previous = Some(old);
                e.previous_token = std::mem::replace(&mut e.current_token, token);
                e.previous_confirmed = e.confirmed;
                if !keep_direct && e.dst != from {
                    e.dst = from;
                    e.dst_since = now;
                }
                e.confirmed = confirmed;
                // New keys are in: a rekey of ours still under way (we
                // yielded in a crossed handshake) would only replace them.
                e.rekey = None;
                e.last_rx = now;
            }
            _ => {
                self.state = State::Established(Box::new(Est {
                    current: transport,
                    current_token: token,
                    previous: None,
                    previous_token: [0; 16],
                    dst: from,
                    confirmed,
                    previous_confirmed: false,
                    last_rx: now,
                    last_tx: now,
                    dst_since: now,
                    unanswered_since: None,
                    last_data: None,
                    suspected: false,
                    probed_at: None,
                    rekey: None,
                }));
            }
        }
        let dst = self.endpoint().unwrap_or(from);
        self.announce_up(dst);
    }

    /// Bookkeeping for an authenticated packet from `from`.
    fn heard(&mut self, now: Instant, from: SocketAddr) {
        if Some(from) != self.relay {
            self.last_direct_rx = Some(now);
            // A direct path works: the search is over.
            self.discovery = None;
            self.spray = None;
            self.upgrade_at = None;
        } else if self.discovery.is_none() && self.upgrade_at.is_none() {
            self.upgrade_at = Some(now + self.config.upgrade_interval);
        }
        if let State::Established(e) = &mut self.state {
            e.unanswered_since = None;
            e.suspected = false;
            e.probed_at = None;
        }
    }

    fn announce_up(&mut self, endpoint: SocketAddr) {
        if !self.up && self.is_up() {
            self.up = true;
            tracing::info!(%endpoint, "SESSION(UP)");
            self.events.push_back(PeerEvent::Up { endpoint });
        }
    }

    /// Whether `token` proves a "session unknown" for the peer's side of
    /// our current keys, index `receiver` (the peer restarted).
    ///
    /// The previous keys count too: between answering the peer's rekey and
    /// its confirmation we still send under them.
    pub fn proves_unknown(&self, receiver: u32, token: &wire::ResetToken) -> bool {
        use subtle::ConstantTimeEq;
        let same = |t: &wire::ResetToken| bool::from(t.ct_eq(token));
        match &self.state {
            State::Established(e) => {
                (e.current.remote_index == receiver && same(&e.current_token))
                    || e.previous
                        .as_ref()
                        .is_some_and(|p| p.remote_index == receiver && same(&e.previous_token))
            }
            _ => false,
        }
    }

    /// The peer said, with the token it gave for these keys
    /// ([`Self::proves_unknown`]), that it has no session for them: it
    /// restarted. Start a new handshake at once, to where it said so from
    /// (a restarted peer may have a new port) or through the relay if it
    /// came that way.
    pub fn handle_session_unknown(&mut self, now: Instant, from: SocketAddr, relayed: bool) {
        let State::Established(e) = &self.state else {
            return;
        };
        if e.rekey.is_some() {
            return;
        }
        // Through a relay this session has no channel on: where it was.
        let dst = if relayed && self.relay.is_none() {
            e.dst
        } else {
            from
        };
        tracing::info!("SESSION(PEER_LOST_STATE)");
        let deadline = now + self.config.connect_timeout;
        if let Some(hs) = self.start_handshake(now, dst, deadline) {
            self.state = State::Handshaking(Box::new(hs));
            if self.up {
                self.up = false;
                self.events.push_back(PeerEvent::Interrupted {
                    reason: "the peer restarted; reconnecting".into(),
                });
            }
        }
    }

    pub fn handle_data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u32,
        counter: u64,
        ciphertext: &[u8],
    ) {
        let State::Established(e) = &mut self.state else {
            return;
        };
        let is_current = e.current.local_index == receiver;
        let t = if is_current {
            &mut e.current
        } else {
            match e.previous.as_mut().filter(|p| p.local_index == receiver) {
                Some(p) => p,
                None => return,
            }
        };
        if t.expired(now) {
            return;
        }
        let Ok(plain) = t.open(counter, ciphertext) else {
            tracing::debug!("DROP(AUTH)");
            return;
        };
        // (Before this packet answers it: was what we sent waiting in
        // vain? The peer sends through the relay only when its own direct
        // packets go unanswered, so a relayed packet while ours wait too
        // says our direct path is broken, even if it is not yet suspect
        // by our own clock; but not in the first moments on a direct path,
        // when relayed packets sent before the move are still arriving.)
        let settled = now.saturating_duration_since(e.dst_since) >= RELAY_FOLLOW_AFTER;
        let in_doubt = e
            .unanswered_since
            .is_some_and(|t| settled || now.saturating_duration_since(t) >= PATH_SUSPECT);
        e.last_rx = now;
        e.unanswered_since = None;
        if is_current && !e.confirmed {
            e.confirmed = true;
            // The initiator switched to these keys; the old ones go.
            e.previous = None;
        } else if !is_current && !e.previous_confirmed {
            // A replayed or duplicated initiation made newer keys after the
            // ones the initiator actually took: keep the ones in use.
            tracing::debug!("SESSION(KEEP_CONFIRMED_KEYS)");
            if let Some(p) = e.previous.take() {
                e.current = p;
                e.current_token = e.previous_token;
                e.confirmed = true;
            }
        }
        // Authenticated packets from a new address: the peer's NAT rebound,
        // it roamed, or a direct path opened beside the relay. Follow it,
        // but don't leave a direct path that works for the relay.
        let from_relay = Some(from) == self.relay;
        // A direct path "works" if it carried something lately and what we
        // sent on it is not waiting in vain (a rebound NAT on the other
        // side swallows our packets while its old ones are still fresh).
        let direct_fresh = !in_doubt
            && self
                .last_direct_rx
                .is_some_and(|t| now.saturating_duration_since(t) < DIRECT_STALE);
        let moved = e.dst != from && is_current && !(from_relay && direct_fresh);
        let mut challenge = false;
        if moved {
            let old = std::mem::replace(&mut e.dst, from);
            e.dst_since = now;
            // The address we leave was in use: it worked, unless it was
            // itself still being checked.
            if self.path_check.as_ref().is_none_or(|c| c.addr != old) {
                remember(&mut self.validated, old);
            }
            self.path_check = None;
            if !from_relay && !self.validated.contains(&from) {
                let nonce = self.rng.gen();
                self.path_check = Some(PathCheck {
                    addr: from,
                    nonce,
                    received: 0,
                    sent: 0,
                    pinged: None,
                });
            }
        }
        if let Some(c) = self.path_check.as_mut().filter(|c| c.addr == from) {
            c.received += wire::DATA_HEADER_LEN + ciphertext.len();
            if c.pinged
                .is_none_or(|t| now.saturating_duration_since(t) >= PATH_PING_AGAIN)
            {
                c.pinged = Some(now);
                challenge = true;
            }
        }
        if let Some(nonce) = self
            .path_check
            .as_ref()
            .filter(|_| challenge)
            .map(|c| c.nonce)
        {
            tracing::debug!(%from, "PATH(CHALLENGE)");
            self.send(now, &PeerToPeer::Ping { nonce });
        }
        self.heard(now, from);
        self.announce_up(from);
        if moved && self.up {
            tracing::info!(endpoint = %from, relay = from_relay, "PATH(CHANGED)");
            self.events
                .push_back(PeerEvent::PathChanged { endpoint: from });
            // Let the peer see the new path at once, so it moves too.
            self.send(now, &PeerToPeer::Keepalive);
        }
        let msg = match PeerToPeer::decode(&plain) {
            Ok(m) => m,
            Err(err) => {
                tracing::debug!(error = %err, "DROP(MALFORMED_INNER)");
                return;
            }
        };
        match msg {
            PeerToPeer::Keepalive => {}
            PeerToPeer::Ping { nonce } => {
                self.send(now, &PeerToPeer::Pong { nonce });
            }
            PeerToPeer::Pong { nonce } => {
                if let Some(c) = self.path_check.take_if(|c| c.nonce == nonce) {
                    tracing::debug!(addr = %c.addr, "PATH(VALIDATED)");
                    remember(&mut self.validated, c.addr);
                }
                if let Some((sent, asked)) = self.pings.remove(&nonce) {
                    let rtt = now.saturating_duration_since(sent);
                    self.rtt = Some(rtt);
                    if asked {
                        self.events.push_back(PeerEvent::Pong { nonce, rtt });
                    }
                }
            }
            PeerToPeer::Close => {
                // Its user closed it, or its daemon is stopping (and will
                // resume by itself): not ours to ask for again.
                self.up = false;
                self.go_down("the peer closed the session")
            }
            m @ (PeerToPeer::Flow { .. }
            | PeerToPeer::Frames { .. }
            | PeerToPeer::FlowAck { .. }) => {
                if let State::Established(e) = &mut self.state {
                    e.last_data = Some(now);
                }
                self.events.push_back(PeerEvent::Received(m))
            }
        }
    }
}

/// Adds `addr` to the validated addresses, the oldest going past
/// [`VALIDATED_KEPT`].
fn remember(validated: &mut VecDeque<SocketAddr>, addr: SocketAddr) {
    if !validated.contains(&addr) {
        if validated.len() >= VALIDATED_KEPT {
            validated.pop_front();
        }
        validated.push_back(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handshake initiations `s` sent, by destination.
    fn inits_to(s: &mut PeerSession) -> Vec<SocketAddr> {
        std::iter::from_fn(|| s.poll_transmit())
            .filter(|t| matches!(Packet::decode(&t.payload), Ok(Packet::HandshakeInit { .. })))
            .map(|t| t.dst)
            .collect()
    }

    #[test]
    fn a_serverless_attempt_takes_punches_only_from_its_candidates() {
        let now = Instant::now();
        let (local, remote) = (Identity::generate(), Identity::generate().public());
        let peer: SocketAddr = "192.0.2.10:4000".parse().unwrap();
        let stranger: SocketAddr = "198.18.0.66:4444".parse().unwrap();
        let plan = |only_candidates| PunchPlan {
            intro_id: 7,
            candidates: vec![peer],
            initiator: true,
            relay: None,
            channel: 0,
            prediction: Prediction::None,
            relay_first: false,
            only_candidates,
        };
        let config = PeerConfig::default();
        let mut s = PeerSession::punch(
            now,
            local.clone(),
            remote.clone(),
            config.clone(),
            plan(true),
            1,
        );
        // A stranger's answer under the (computable) id steers nothing.
        s.handle_punch(now, stranger, true);
        assert!(inits_to(&mut s).is_empty());
        assert_eq!(s.phase(), SessionPhase::Punching);
        // The peer's does.
        s.handle_punch(now, peer, true);
        assert_eq!(inits_to(&mut s), [peer]);
        // An introduced session still takes a probe from anywhere (a NAT
        // may map the peer to another port than the server saw).
        let mut s = PeerSession::punch(now, local, remote, config, plan(false), 2);
        s.handle_punch(now, stranger, true);
        assert_eq!(inits_to(&mut s), [stranger]);
    }

    #[test]
    fn dead_after_follows_a_long_keepalive() {
        let c = PeerConfig::default().with_keepalive(Duration::from_secs(5));
        assert_eq!(c.dead_after, Duration::from_secs(80));
        let c = PeerConfig::default().with_keepalive(Duration::from_secs(50));
        assert_eq!(c.dead_after, Duration::from_secs(160));
        assert_eq!(c.keepalive, Duration::from_secs(50));
    }
}
