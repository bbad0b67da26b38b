//! The rendezvous server as a sans-IO machine.
//!
//! It answers Noise handshakes from clients (IK when the client pinned the
//! server's key, XX on first contact), checks each client's identity
//! binding, logs users in with a fresh challenge, tracks presence from
//! heartbeats, and introduces users to each other: a `RequestConnect` from
//! A is forwarded to B as `ConnectRequested`; B's `AgreeConnect` sends both
//! a `Punch` instruction with the other's observed and local endpoints and
//! identity.
//!
//! Accounts live behind [`AccountStore`]; the binary backs it with SQLite.
//!
//! No reply to an address that has not proven it receives there is larger
//! than the packet that caused it (handshakes), or than three times what
//! came from it (a session's new address, until it answers a
//! [`ServerToClient::PathChallenge`]), so the server cannot be used to
//! amplify traffic toward a spoofed address. A flood of initiations costs
//! a cookie reply each once the server is busy ([`guard`]), and the
//! sessions nobody logged in on are capped.

mod guard;
pub use guard::source_key;

use crate::codec::DecodeError;
use crate::identity::{Identity, PublicIdentity};
use crate::noise::{Handshake, Pattern, Transport};
use crate::wire::{
    self, validate_name, ClientToServer, FailReason, Packet, PunchInstruction, ResetToken,
    ServerToClient, UserEntry, USERS_PER_PAGE,
};
use crate::Transmit;
use guard::{Cookies, SourceBuckets};
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutcome {
    Created,
    /// The name was already bound to this same key.
    AlreadyYours,
    NameTaken,
    /// This key already has another name.
    KeyHasName(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub identity: PublicIdentity,
}

#[derive(Debug, thiserror::Error)]
#[error("account store: {0}")]
pub struct StoreError(pub String);

/// Durable accounts. `register` must be atomic: of two registrations racing
/// for one name exactly one wins, and an `Ok` means it survives a crash.
pub trait AccountStore {
    fn register(
        &mut self,
        name: &str,
        identity: &PublicIdentity,
    ) -> Result<RegisterOutcome, StoreError>;
    fn by_key(&mut self, sign_key: &[u8; 32]) -> Result<Option<Account>, StoreError>;
    fn by_name(&mut self, name: &str) -> Result<Option<Account>, StoreError>;
}

/// Accounts in memory, for tests.
#[derive(Default)]
pub struct MemoryStore {
    accounts: BTreeMap<String, PublicIdentity>,
    /// Names by signing key: a lookup, not a walk of every account.
    names: BTreeMap<[u8; 32], String>,
}

impl AccountStore for MemoryStore {
    fn register(
        &mut self,
        name: &str,
        identity: &PublicIdentity,
    ) -> Result<RegisterOutcome, StoreError> {
        if let Some(existing) = self.accounts.get(name) {
            return Ok(if existing.sign_key == identity.sign_key {
                RegisterOutcome::AlreadyYours
            } else {
                RegisterOutcome::NameTaken
            });
        }
        if let Some(n) = self.names.get(&identity.sign_key) {
            return Ok(RegisterOutcome::KeyHasName(n.clone()));
        }
        self.accounts.insert(name.to_owned(), identity.clone());
        self.names.insert(identity.sign_key, name.to_owned());
        Ok(RegisterOutcome::Created)
    }

    fn by_key(&mut self, sign_key: &[u8; 32]) -> Result<Option<Account>, StoreError> {
        Ok(self.names.get(sign_key).and_then(|n| {
            self.accounts.get(n).map(|i| Account {
                name: n.clone(),
                identity: i.clone(),
            })
        }))
    }

    fn by_name(&mut self, name: &str) -> Result<Option<Account>, StoreError> {
        Ok(self.accounts.get(name).map(|i| Account {
            name: name.to_owned(),
            identity: i.clone(),
        }))
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A user with no packet for this long is dropped from the active list:
    /// three missed heartbeats at the default 25 s, plus slack.
    pub presence_timeout: Duration,
    /// An introduction not answered in this long fails with `TimedOut`.
    pub intro_timeout: Duration,
    /// An unfinished XX handshake is forgotten after this long.
    pub handshake_timeout: Duration,
    /// Most sessions (finished or not) held at once.
    pub max_sessions: usize,
    /// Most sessions not logged in (handshakes under way, sessions
    /// awaiting their first packet, sessions that have not logged in)
    /// held at once: the oldest goes to make room.
    pub max_anonymous: usize,
    /// Handshake initiations processed per second without a cookie (a
    /// burst of one second's worth); past it (or with the anonymous table
    /// half full) an initiation gets a [`Packet::CookieReply`] instead, at
    /// no cost but a MAC. Answering an initiation costs two or three
    /// Diffie-Hellman operations (about 150 µs): 1,000 a second is at most
    /// 15 % of a core.
    pub handshakes_per_sec: u32,
    /// Handshake initiations one source (IPv4 address, IPv6 /64) may make
    /// per second, with a burst of twice that: without a cookie (past it,
    /// a cookie reply), and with one (past it, dropped).
    pub handshakes_per_source: u32,
    /// User-list pages one source (an IPv4 address, an IPv6 /64; all its
    /// sessions together) may ask for per second, after a burst
    /// of ten times that (a listing of 12,000 names at once); past it,
    /// `RateLimited`. 0: no limit.
    pub list_pages_per_sec: u32,
    pub relay: RelayConfig,
    /// The second UDP port the server answers probes on (0: none), told
    /// to clients at login.
    pub probe_port: u16,
    /// Registrations one network (an IPv4 address, an IPv6 /48) may make
    /// per hour, after a burst of [`REGISTER_BURST`]; 0: no limit.
    pub registrations_per_hour: u32,
    /// If any: a registration must carry one of these invite tokens (an
    /// operator's closed community); the rate limit applies first, so
    /// tokens cannot be guessed at speed.
    pub invite_tokens: Vec<String>,
}

/// Registrations an address may make at once before the hourly rate
/// applies.
pub const REGISTER_BURST: f64 = 5.0;
/// Addresses whose registration allowance is tracked at most; when full
/// one is forgotten to make room.
const MAX_REGISTER_BUCKETS: usize = 100_000;

/// The relay role: limits an operator sets.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub enabled: bool,
    /// Most relay channels (agreed introductions) held at once; when full,
    /// the least recently used goes.
    pub max_channels: usize,
    /// Most channels one user takes part in; beyond it, that user's least
    /// recently used goes (so a few accounts cannot fill the table).
    pub max_channels_per_user: usize,
    /// Bytes per second each user may send through the relay; a burst of
    /// one second's worth is allowed. 0 means no limit.
    pub rate_per_user: u64,
    /// A channel nobody sent on for this long is forgotten. A session that
    /// went direct keeps its channel as a way back (`PATH_SUSPECT`), so
    /// this is long: channels also end when either user goes offline or
    /// agrees a new connection with the same peer.
    pub idle_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_channels: 10_000,
            max_channels_per_user: 64,
            rate_per_user: 2_000_000,
            idle_timeout: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            presence_timeout: Duration::from_secs(80),
            intro_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 100_000,
            max_anonymous: 20_000,
            handshakes_per_sec: 1_000,
            handshakes_per_source: 20,
            list_pages_per_sec: 100,
            relay: RelayConfig::default(),
            probe_port: 0,
            registrations_per_hour: 20,
            invite_tokens: Vec::new(),
        }
    }
}

/// Counters for the operator's logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerStats {
    pub malformed: u64,
    pub auth_failed: u64,
    pub unknown_session: u64,
    pub handshakes: u64,
    pub logins: u64,
    pub registrations: u64,
    /// Registrations refused: the address had made too many lately.
    pub registrations_limited: u64,
    pub introductions: u64,
    pub amplification_refused: u64,
    pub store_errors: u64,
    pub relay_channels: u64,
    pub relayed_packets: u64,
    pub relayed_bytes: u64,
    /// Relay packets dropped because the sender was over its rate.
    pub relay_over_rate: u64,
    /// Relay packets dropped for want of a channel, a party at the other
    /// end, or because the sender is not a party at its proven address.
    pub relay_refused: u64,
    /// Datagrams of another protocol version (each logged at most once a
    /// second, answered at most 100 times a second).
    pub other_version: u64,
    /// Initiations answered with a cookie reply instead of processed.
    pub cookies_sent: u64,
    /// Initiations dropped: over their source's rate with a valid cookie.
    pub handshakes_limited: u64,
    /// IK initiations refused because their timestamp was not newer than
    /// one seen from that key (replays).
    pub replays: u64,
    /// Sessions not logged in that went to make room for newer ones.
    pub anonymous_evicted: u64,
    /// New addresses challenged, and moved to once they answered.
    pub paths_challenged: u64,
    pub paths_validated: u64,
    /// Initiations dropped because the session table was full.
    pub table_full: u64,
    /// User-list pages refused: the session asked too often.
    pub lists_limited: u64,
    /// User-list pages served.
    pub list_pages: u64,
    /// Registrations refused for want of an invite token.
    pub invites_refused: u64,
    /// Connection requests refused: the user had too many waiting.
    pub intros_limited: u64,
}

/// The sizes of the server's tables at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gauges {
    /// Sessions, logged in or not.
    pub sessions: usize,
    /// XX handshakes waiting for their third message.
    pub handshakes: usize,
    /// Sessions and handshakes not logged in (at most `max_anonymous`).
    pub not_logged_in: usize,
    pub online: usize,
    pub relay_channels: usize,
    pub intros: usize,
}

/// `ChannelUnknown` answers: at most this many at once, refilled at this
/// rate (26 bytes each, never more than the packet they answer).
const UNKNOWN_BURST: f64 = 256.0;
const UNKNOWN_PER_SEC: f64 = 2_000.0;

/// What a reset token is for: a session index, a relay channel.
const TOKEN_SESSION: u8 = 1;
const TOKEN_CHANNEL: u8 = 2;

/// The key reset tokens are made with: HMAC-SHA256 keyed by the server's
/// long-term private key, over a label (a key of its own, not the Noise
/// key reused).
fn reset_key(private: &[u8; 32]) -> ring::hmac::Key {
    let root = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, private);
    let derived = ring::hmac::sign(&root, b"p2p-chat reset tokens v1");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())
}

/// Datagrams of another version are answered at most this often (two
/// bytes each: a trickle, whatever arrives).
const REFUSAL_INTERVAL: Duration = Duration::from_millis(10);

/// Pushes are resent this often until acknowledged…
const PUSH_RESEND: Duration = Duration::from_millis(500);
/// …this many times at most.
const PUSH_TRIES: u8 = 20;
/// Answers remembered per session, so a retransmitted request gets the
/// same answer instead of running twice.
const RECENT_ANSWERS: usize = 32;

struct Pending {
    msg: ServerToClient,
    next: Instant,
    tries: u8,
}

struct Session {
    pushes: BTreeMap<u32, Pending>,
    next_push: u32,
    recent: VecDeque<(u32, Vec<ServerToClient>)>,
    addr: SocketAddr,
    transport: Transport,
    identity: PublicIdentity,
    challenge: [u8; 16],
    user: Option<String>,
    last_seen: Instant,
    /// Relay token bucket: bytes this session may still send, as of
    /// `relay_at`.
    relay_tokens: f64,
    relay_at: Instant,
    /// An IK session is confirmed by the client's first data packet (a
    /// replayed initiation never gets one); until then it is forgotten
    /// after the handshake timeout.
    confirmed: bool,
    created: Instant,
    /// A new address the client sent from, being validated.
    path: Option<PathCheck>,
}

/// A session's candidate address: authenticated packets came from it,
/// but it has not shown it receives there.
struct PathCheck {
    addr: SocketAddr,
    data: [u8; 8],
    /// Bytes from and to it so far: at most 3× `received` go there.
    received: usize,
    sent: usize,
    challenged: Option<Instant>,
}

/// Connection requests one user may have waiting for an answer.
pub const MAX_INTROS_PER_USER: usize = 32;
/// A new address is challenged again after this long without an answer
/// (while packets keep coming from it).
const CHALLENGE_RESEND: Duration = Duration::from_millis(250);
/// To an address not yet validated the server sends at most this many
/// times the bytes it received from it (QUIC's anti-amplification limit).
pub const AMPLIFICATION_FACTOR: usize = 3;
/// Source buckets tracked at most (per kind).
const MAX_SOURCE_BUCKETS: usize = 100_000;
/// IK timestamps remembered at most (keys seen); a full map forgets one.
const MAX_STAMPS: usize = 200_000;

struct PendingXx {
    hs: Handshake,
    remote_index: u32,
    addr: SocketAddr,
    challenge: [u8; 16],
    started: Instant,
}

/// The cheap checks an initiation passed, and what it may cost.
enum Admission {
    Process,
    CookieReply,
    Drop,
}

struct Intro {
    from: String,
    to: String,
    from_locals: Vec<SocketAddr>,
    from_hard: bool,
    created: Instant,
}

/// A relay channel: the two users of an agreed introduction, each with
/// its own secret id (a packet on `ids[i]` is from `users[i]`, and goes
/// out to the other under `ids[1 - i]`).
struct Channel {
    users: [String; 2],
    ids: [u64; 2],
    last_used: Instant,
}

/// How often expiry is checked while anything can expire.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

pub struct Server {
    identity: Identity,
    config: ServerConfig,
    sessions: BTreeMap<u32, Session>,
    pending: BTreeMap<u32, PendingXx>,
    by_name: BTreeMap<String, u32>,
    intros: BTreeMap<u64, Intro>,
    /// Introductions by (from, to): one per pair, and a count per
    /// requester without a walk.
    intro_pairs: BTreeMap<(String, String), u64>,
    /// Relay channels by introduction, and each party's id to its
    /// channel and side.
    channels: BTreeMap<u64, Channel>,
    channel_ids: BTreeMap<u64, (u64, usize)>,
    /// Registration allowance by source.
    register_buckets: SourceBuckets,
    /// Initiations without a cookie, all sources: past this the server
    /// is under load and asks for cookies.
    unproven_budget: guard::Bucket,
    unproven_buckets: SourceBuckets,
    proven_buckets: SourceBuckets,
    /// User-list pages by source (not by session: a new login does not
    /// buy a new burst).
    list_buckets: SourceBuckets,
    cookies: Cookies,
    /// The newest IK timestamp seen per key (WireGuard's replay guard).
    stamps: BTreeMap<[u8; 32], u64>,
    /// Sessions and handshakes not logged in, oldest first.
    anonymous: BTreeSet<(Instant, u32)>,
    /// Logged-in sessions by their (validated) address.
    by_addr: BTreeMap<SocketAddr, u32>,
    transmits: VecDeque<Transmit>,
    next_sweep: Option<Instant>,
    stats: ServerStats,
    /// While a request is handled: the address it came from, where its
    /// answers go.
    answer_to: Option<(u32, SocketAddr)>,
    /// When a datagram of another version was last answered, and logged.
    last_refusal: Option<Instant>,
    last_refusal_log: Option<Instant>,
    /// Reset tokens are derived with this key, itself derived from the
    /// server's long-term key: the same after a restart.
    reset_key: ring::hmac::Key,
    /// `ChannelUnknown` answers allowed now (a bucket of
    /// [`UNKNOWN_BURST`], refilled at [`UNKNOWN_PER_SEC`]), and when it
    /// was last refilled: every client of a restarted server may ask at
    /// once.
    unknown_budget: (f64, Option<Instant>),
    rng: rand::rngs::StdRng,
}

impl Server {
    /// `seed` makes index, challenge and introduction ids reproducible in
    /// tests; pass fresh randomness in production.
    pub fn new(identity: Identity, config: ServerConfig, seed: u64) -> Self {
        let reset_key = reset_key(identity.noise_private());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let per_source = config.handshakes_per_source as f64;
        Self {
            cookies: Cookies::new(&mut rng),
            unproven_budget: guard::Bucket::full(config.handshakes_per_sec as f64),
            unproven_buckets: SourceBuckets::new(per_source, 2.0 * per_source, MAX_SOURCE_BUCKETS),
            proven_buckets: SourceBuckets::new(per_source, 2.0 * per_source, MAX_SOURCE_BUCKETS),
            list_buckets: SourceBuckets::new(
                config.list_pages_per_sec as f64,
                10.0 * config.list_pages_per_sec as f64,
                MAX_SOURCE_BUCKETS,
            ),
            register_buckets: SourceBuckets::new(
                config.registrations_per_hour as f64 / 3600.0,
                REGISTER_BURST,
                MAX_REGISTER_BUCKETS,
            )
            .by_site(),
            stamps: BTreeMap::new(),
            anonymous: BTreeSet::new(),
            by_addr: BTreeMap::new(),
            channel_ids: BTreeMap::new(),
            reset_key,
            unknown_budget: (UNKNOWN_BURST, None),
            identity,
            config,
            sessions: BTreeMap::new(),
            pending: BTreeMap::new(),
            by_name: BTreeMap::new(),
            intros: BTreeMap::new(),
            intro_pairs: BTreeMap::new(),
            channels: BTreeMap::new(),
            transmits: VecDeque::new(),
            next_sweep: None,
            stats: ServerStats::default(),
            last_refusal: None,
            last_refusal_log: None,
            answer_to: None,
            rng,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.identity.noise_public()
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Whether a logged-in session has `addr` as its address: what keeps a
    /// TCP connection from that address open past its grace period.
    pub fn logged_in_at(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// What the server holds now: the bounded tables, for the operator's
    /// logs and for tests that assert the bounds.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            sessions: self.sessions.len(),
            handshakes: self.pending.len(),
            not_logged_in: self.anonymous.len(),
            online: self.by_name.len(),
            relay_channels: self.channels.len(),
            intros: self.intros.len(),
        }
    }

    /// Names of the users logged in now.
    pub fn active_users(&self) -> Vec<String> {
        let mut v: Vec<_> = self.by_name.keys().cloned().collect();
        v.sort();
        v
    }

    /// A datagram of protocol version `theirs`: said in the log (at most
    /// once a second) and answered with our version (at most every
    /// [`REFUSAL_INTERVAL`]), so a client that is older or newer can say
    /// why it cannot log in.
    fn other_version(&mut self, now: Instant, from: SocketAddr, theirs: u8, buf: &[u8]) {
        self.stats.other_version += 1;
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        if since(self.last_refusal_log).is_none_or(|d| d >= Duration::from_secs(1)) {
            self.last_refusal_log = Some(now);
            tracing::warn!(%from, ours = wire::VERSION, theirs, "VERSION(MISMATCH)");
        }
        if !wire::refusable(buf) || since(self.last_refusal).is_some_and(|d| d < REFUSAL_INTERVAL) {
            return;
        }
        self.last_refusal = Some(now);
        self.transmits
            .push_back(Transmit::new(from, wire::version_refusal().to_vec()));
    }

    /// The reset token of a session index or channel (`kind`).
    fn reset_token(&self, kind: u8, id: u64) -> ResetToken {
        let mut msg = [0u8; 9];
        msg[0] = kind;
        msg[1..].copy_from_slice(&id.to_be_bytes());
        let tag = ring::hmac::sign(&self.reset_key, &msg);
        let mut t = [0u8; 16];
        t.copy_from_slice(&tag.as_ref()[..16]);
        t
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_sweep
    }

    fn fresh_index(&mut self) -> u32 {
        loop {
            let i = self.rng.gen();
            if i != 0 && !self.sessions.contains_key(&i) && !self.pending.contains_key(&i) {
                return i;
            }
        }
    }

    fn arm_sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
    }

    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &[u8],
        store: &mut dyn AccountStore,
    ) {
        let packet = match Packet::decode(buf) {
            Ok(p) => p,
            Err(DecodeError::Version(theirs)) if wire::other_version(buf).is_some() => {
                return self.other_version(now, from, theirs, buf)
            }
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(%from, error = %e, "DROP(MALFORMED)");
                return;
            }
        };
        match packet {
            Packet::HandshakeInit {
                sender,
                pattern,
                noise,
                cookie,
            } => match self.admit(now, from, &cookie) {
                Admission::Process => self.on_init(now, from, buf.len(), sender, pattern, noise),
                Admission::CookieReply => {
                    self.stats.cookies_sent += 1;
                    let cookie = self.cookies.make(now, from, &mut self.rng);
                    let reply = Packet::CookieReply {
                        receiver: sender,
                        cookie,
                    }
                    .encode();
                    self.reply_unproven(from, buf.len(), reply);
                }
                Admission::Drop => {
                    self.stats.handshakes_limited += 1;
                    tracing::debug!(%from, "HANDSHAKE(SOURCE_OVER_RATE)");
                }
            },
            Packet::HandshakeFinish { receiver, noise } => {
                self.on_finish(now, from, receiver, noise)
            }
            Packet::Data {
                receiver,
                counter,
                ciphertext,
            } => self.on_data(now, from, buf.len(), receiver, counter, ciphertext, store),
            Packet::Relay { channel, .. } => self.on_relay(now, from, channel, buf),
            Packet::Probe { .. } => {
                if let Some(reply) = answer_probe(from, buf) {
                    self.transmits.push_back(Transmit::new(from, reply));
                }
            }
            Packet::HandshakeResponse { .. }
            | Packet::Punch { .. }
            | Packet::ProbeReply { .. }
            | Packet::CookieReply { .. }
            | Packet::SessionUnknown { .. }
            | Packet::ChannelUnknown { .. } => {
                self.stats.malformed += 1;
                tracing::debug!(%from, "DROP(UNEXPECTED)");
            }
        }
    }

    /// Sends `payload` to an address not yet proven, unless it is larger
    /// than the request that caused it.
    fn reply_unproven(&mut self, dst: SocketAddr, request_len: usize, payload: Vec<u8>) {
        if payload.len() > request_len {
            self.stats.amplification_refused += 1;
            tracing::warn!(%dst, "DROP(AMPLIFICATION)");
            return;
        }
        self.transmits.push_back(Transmit::new(dst, payload));
    }

    /// Whether an initiation from `from` is processed, answered with a
    /// cookie reply, or dropped: a valid cookie proves the address, and
    /// such initiations are limited per source; without one, an
    /// initiation is processed only while the server is not under load
    /// (all sources within `handshakes_per_sec`, this source within its
    /// own rate, the anonymous table under half full).
    fn admit(&mut self, now: Instant, from: SocketAddr, cookie: &wire::Cookie) -> Admission {
        if self.cookies.check(now, from, cookie, &mut self.rng) {
            return match self.proven_buckets.take(now, from) {
                true => Admission::Process,
                false => Admission::Drop,
            };
        }
        let rate = self.config.handshakes_per_sec as f64;
        let busy = self.anonymous.len() * 2 >= self.config.max_anonymous
            || !self.unproven_budget.take(now, rate, rate)
            || !self.unproven_buckets.take(now, from);
        match busy {
            true => Admission::CookieReply,
            false => Admission::Process,
        }
    }

    /// Makes room for one more session not logged in: the oldest such
    /// goes if the table of them is full.
    fn make_anonymous_room(&mut self) {
        while self.anonymous.len() >= self.config.max_anonymous.max(1) {
            let Some((_, index)) = self.anonymous.pop_first() else {
                break;
            };
            self.stats.anonymous_evicted += 1;
            self.pending.remove(&index);
            // (A logged-in session is never in `anonymous`; remove_session
            // would clean up after one all the same.)
            self.remove_session(index, "made room for a newer session not logged in");
        }
    }

    fn on_init(
        &mut self,
        now: Instant,
        from: SocketAddr,
        request_len: usize,
        sender: u32,
        pattern: Pattern,
        noise: &[u8],
    ) {
        if self.sessions.len() + self.pending.len() >= self.config.max_sessions {
            self.stats.table_full += 1;
            tracing::warn!(%from, "DROP(FULL)");
            return;
        }
        let mut hs = match Handshake::responder(pattern, self.identity.noise_private()) {
            Ok(hs) => hs,
            Err(e) => {
                tracing::error!(error = %e, "cannot build responder");
                return;
            }
        };
        let payload = match hs.read(noise) {
            Ok(p) => p,
            Err(_) => {
                self.stats.auth_failed += 1;
                tracing::debug!(%from, "HANDSHAKE(BAD_INIT)");
                return;
            }
        };
        let identity = match pattern {
            Pattern::IK => match self.read_ik_payload(&hs, &payload) {
                Some(id) => Some(id),
                None => return,
            },
            Pattern::XX => None,
        };
        let mut challenge = [0u8; 16];
        self.rng.fill(&mut challenge);
        let local_index = self.fresh_index();
        let msg2 = match hs.write(&challenge) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "HANDSHAKE(WRITE_FAILED)");
                return;
            }
        };
        let reply = Packet::HandshakeResponse {
            sender: local_index,
            receiver: sender,
            noise: &msg2,
        }
        .encode();
        self.stats.handshakes += 1;
        self.make_anonymous_room();
        self.anonymous.insert((now, local_index));
        match identity {
            Some(identity) => {
                let transport = match hs.into_transport(local_index, sender, now) {
                    Ok(t) => t,
                    Err(_) => return,
                };
                let s = self.new_session(now, from, transport, identity, challenge, false);
                self.sessions.insert(local_index, s);
            }
            None => {
                self.pending.insert(
                    local_index,
                    PendingXx {
                        hs,
                        remote_index: sender,
                        addr: from,
                        challenge,
                        started: now,
                    },
                );
            }
        }
        self.arm_sweep(now);
        self.reply_unproven(from, request_len, reply);
    }

    fn new_session(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        transport: Transport,
        identity: PublicIdentity,
        challenge: [u8; 16],
        confirmed: bool,
    ) -> Session {
        Session {
            pushes: BTreeMap::new(),
            // Random, so a client's memory of handled notices never
            // matches a new session's ids by accident.
            next_push: self.rng.gen::<u32>().max(1),
            recent: VecDeque::new(),
            addr,
            transport,
            identity,
            challenge,
            user: None,
            last_seen: now,
            relay_tokens: self.config.relay.rate_per_user as f64,
            relay_at: now,
            confirmed,
            created: now,
            path: None,
        }
    }

    /// An IK initiation's payload: the client's identity, then a
    /// timestamp that must be newer than any seen from its key, so a
    /// captured initiation cannot be replayed (WireGuard's TAI64N).
    fn read_ik_payload(&mut self, hs: &Handshake, payload: &[u8]) -> Option<PublicIdentity> {
        let Some((id_bytes, stamp)) = payload.split_last_chunk::<8>() else {
            self.stats.malformed += 1;
            return None;
        };
        let id = self.read_identity(hs, id_bytes)?;
        let stamp = u64::from_be_bytes(*stamp);
        match self.stamps.get(&id.sign_key) {
            Some(&seen) if stamp <= seen => {
                self.stats.replays += 1;
                tracing::debug!(fingerprint = %id.fingerprint(), "HANDSHAKE(REPLAYED)");
                return None;
            }
            Some(_) => {}
            None if self.stamps.len() >= MAX_STAMPS => {
                self.stamps.pop_first();
            }
            None => {}
        }
        self.stamps.insert(id.sign_key, stamp);
        Some(id)
    }

    fn read_identity(&mut self, hs: &Handshake, payload: &[u8]) -> Option<PublicIdentity> {
        let mut r = crate::codec::Reader::new(payload);
        let id = PublicIdentity::decode(&mut r)
            .ok()
            .filter(|_| r.finish().is_ok());
        let Some(id) = id else {
            self.stats.malformed += 1;
            return None;
        };
        let rs = hs.remote_static()?;
        if let Err(e) = id.verify_for_noise_key(&rs) {
            self.stats.auth_failed += 1;
            tracing::info!(error = %e, "HANDSHAKE(BAD_IDENTITY)");
            return None;
        }
        Some(id)
    }

    fn on_finish(&mut self, now: Instant, from: SocketAddr, receiver: u32, noise: &[u8]) {
        let Some(mut p) = self.pending.remove(&receiver) else {
            self.stats.unknown_session += 1;
            return;
        };
        let payload = match p.hs.read(noise) {
            Ok(pl) => pl,
            Err(_) => {
                self.stats.auth_failed += 1;
                // Keep waiting for a genuine third message.
                self.pending.insert(receiver, p);
                return;
            }
        };
        let Some(identity) = self.read_identity(&p.hs, &payload) else {
            self.anonymous.remove(&(p.started, receiver));
            return;
        };
        let Ok(transport) = p.hs.into_transport(receiver, p.remote_index, now) else {
            self.anonymous.remove(&(p.started, receiver));
            return;
        };
        let _ = from;
        // The third message proves the initiator holds its ephemeral key
        // and received our reply: confirmed. Its place in `anonymous`
        // (from the initiation) stays until it logs in.
        let mut s = self.new_session(now, p.addr, transport, identity, p.challenge, true);
        // Its place in `anonymous` is under the initiation's time: the
        // login must find it there.
        s.created = p.started;
        self.sessions.insert(receiver, s);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_data(
        &mut self,
        now: Instant,
        from: SocketAddr,
        request_len: usize,
        receiver: u32,
        counter: u64,
        ciphertext: &[u8],
        store: &mut dyn AccountStore,
    ) {
        let Some(s) = self.sessions.get_mut(&receiver) else {
            self.stats.unknown_session += 1;
            let token = self.reset_token(TOKEN_SESSION, receiver as u64);
            let reply = Packet::SessionUnknown { receiver, token }.encode();
            self.reply_unproven(from, request_len, reply);
            return;
        };
        let plain = match s.transport.open(counter, ciphertext) {
            Ok(p) => p,
            Err(e) => {
                self.stats.auth_failed += 1;
                tracing::debug!(%from, error = %e, "DROP(AUTH)");
                return;
            }
        };
        s.last_seen = now;
        s.confirmed = true;
        let msg = match ClientToServer::decode(&plain) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(%from, error = %e, "DROP(MALFORMED_INNER)");
                return;
            }
        };
        if from != s.addr {
            // Authenticated, but from a new address: the client's NAT
            // rebound, or the client claims someone else's address. Its
            // requests are answered there within three times what came
            // from there, and the session moves only once the client
            // answers a challenge sent there (QUIC's path validation).
            self.challenge_path(now, receiver, from, request_len);
        }
        self.answer_to = Some((receiver, from));
        self.on_message(now, receiver, msg, store);
        self.answer_to = None;
    }

    /// Session `index` heard from `from`, not its address (`len` bytes):
    /// challenge that address (again, every [`CHALLENGE_RESEND`]), within
    /// three times what came from it.
    fn challenge_path(&mut self, now: Instant, index: u32, from: SocketAddr, len: usize) {
        let Some(s) = self.sessions.get_mut(&index) else {
            return;
        };
        let fresh = match &s.path {
            Some(p) if p.addr == from => None,
            _ => Some(self.rng.gen::<[u8; 8]>()),
        };
        if let Some(data) = fresh {
            s.path = Some(PathCheck {
                addr: from,
                data,
                received: 0,
                sent: 0,
                challenged: None,
            });
        }
        let check = s.path.as_mut().expect("set above");
        check.received += len;
        let due = check
            .challenged
            .is_none_or(|t| now.saturating_duration_since(t) >= CHALLENGE_RESEND);
        if due {
            check.challenged = Some(now);
            let data = check.data;
            self.stats.paths_challenged += 1;
            tracing::debug!(%from, "PATH(CHALLENGE)");
            self.transmit_to(index, from, &ServerToClient::PathChallenge { data });
        }
    }

    /// A client's answer to a path challenge: the address it reached is
    /// the session's from now on (any packet carrying the data proves
    /// the client received it there).
    fn on_path_response(&mut self, now: Instant, index: u32, data: [u8; 8]) {
        let Some(s) = self.sessions.get_mut(&index) else {
            return;
        };
        let Some(check) = s.path.take_if(|p| p.data == data) else {
            return;
        };
        tracing::info!(from = %s.addr, to = %check.addr, "PATH(VALIDATED)");
        if s.user.is_some() {
            if self.by_addr.get(&s.addr) == Some(&index) {
                self.by_addr.remove(&s.addr);
            }
            self.by_addr.insert(check.addr, index);
        }
        s.addr = check.addr;
        self.stats.paths_validated += 1;
        // What waited for the old address goes to the new one now (this
        // session's notices only: no pass over every session).
        let waiting: Vec<ServerToClient> = s
            .pushes
            .values_mut()
            .map(|p| {
                p.next = now + PUSH_RESEND;
                p.msg.clone()
            })
            .collect();
        for msg in waiting {
            self.transmit(index, &msg);
        }
    }

    /// Sends an answer and remembers it under its request's `rid`.
    fn send(&mut self, index: u32, msg: &ServerToClient) {
        let rid = match msg {
            ServerToClient::RegisterOk { rid, .. }
            | ServerToClient::LoginOk { rid, .. }
            | ServerToClient::Failed { rid, .. }
            | ServerToClient::UserList { rid, .. }
            | ServerToClient::ConnectPending { rid, .. }
            | ServerToClient::Ok { rid } => Some(*rid),
            // A ping is harmless to run twice: heartbeats must not push
            // the answers that matter out of the cache.
            _ => None,
        };
        if let (Some(rid), Some(s)) = (rid, self.sessions.get_mut(&index)) {
            match s.recent.iter_mut().find(|(r, _)| *r == rid) {
                Some((_, answers)) => answers.push(msg.clone()),
                None => {
                    if s.recent.len() >= RECENT_ANSWERS {
                        s.recent.pop_front();
                    }
                    s.recent.push_back((rid, vec![msg.clone()]));
                }
            }
        }
        self.transmit(index, msg);
    }

    /// Sends a notice reliably: resent until the client acknowledges it.
    fn push(&mut self, now: Instant, index: u32, msg: ServerToClient) {
        let Some(s) = self.sessions.get_mut(&index) else {
            return;
        };
        let push_id = s.next_push;
        s.next_push = s.next_push.wrapping_add(1).max(1);
        let wrapped = ServerToClient::Push {
            push_id,
            msg: Box::new(msg),
        };
        s.pushes.insert(
            push_id,
            Pending {
                msg: wrapped.clone(),
                next: now + PUSH_RESEND,
                tries: 1,
            },
        );
        self.arm_sweep(now);
        self.transmit(index, &wrapped);
    }

    /// Sends `msg` in session `index`: an answer to the address its
    /// request came from, anything else to the session's address.
    fn transmit(&mut self, index: u32, msg: &ServerToClient) {
        let Some(s) = self.sessions.get(&index) else {
            return;
        };
        let dst = match self.answer_to {
            Some((i, a)) if i == index && !matches!(msg, ServerToClient::Push { .. }) => a,
            _ => s.addr,
        };
        self.transmit_to(index, dst, msg);
    }

    /// Sends `msg` in session `index` to `dst`: to an address other than
    /// the session's, only within [`AMPLIFICATION_FACTOR`] times what came
    /// from it.
    fn transmit_to(&mut self, index: u32, dst: SocketAddr, msg: &ServerToClient) {
        let Some(s) = self.sessions.get_mut(&index) else {
            return;
        };
        let payload = match s.transport.seal(&msg.encode()) {
            Ok(p) => p,
            Err(e) => return tracing::warn!(error = %e, "cannot seal"),
        };
        if dst != s.addr {
            let check = s.path.as_mut().filter(|p| p.addr == dst);
            let Some(check) =
                check.filter(|c| c.sent + payload.len() <= AMPLIFICATION_FACTOR * c.received)
            else {
                self.stats.amplification_refused += 1;
                tracing::debug!(%dst, "DROP(AMPLIFICATION)");
                return;
            };
            check.sent += payload.len();
        }
        self.transmits.push_back(Transmit::new(dst, payload));
    }

    fn fail(&mut self, index: u32, rid: u32, reason: FailReason, detail: impl Into<String>) {
        self.send(
            index,
            &ServerToClient::Failed {
                rid,
                reason,
                detail: detail.into(),
            },
        );
    }

    /// A relayed peer packet: forwarded, bytes the server cannot read,
    /// from one user of an agreed introduction to the other under the
    /// other's channel id, if the sender is at its validated address and
    /// within its rate. The channel id is the sender's own secret (told to
    /// it alone), so the packet is charged to the account it belongs to,
    /// not to whatever address a stranger writes on a packet.
    fn on_relay(&mut self, now: Instant, from: SocketAddr, channel: u64, datagram: &[u8]) {
        let found = self
            .channel_ids
            .get(&channel)
            .and_then(|&(key, side)| Some((self.channels.get_mut(&key)?, side)));
        let Some((ch, side)) = found else {
            self.stats.relay_refused += 1;
            tracing::debug!(%from, "RELAY(NO_CHANNEL)");
            // Say so, provably (we may have restarted): the parties
            // introduce themselves again at once instead of waiting for
            // silence. Never larger than what it answers, and rate limited.
            let reply = Packet::ChannelUnknown {
                channel,
                token: self.reset_token(TOKEN_CHANNEL, channel),
            }
            .encode();
            let (tokens, at) = self.unknown_budget;
            let elapsed = at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
            let tokens = (tokens + elapsed * UNKNOWN_PER_SEC).min(UNKNOWN_BURST);
            self.unknown_budget = (tokens, Some(now));
            if reply.len() <= datagram.len() && tokens >= 1.0 {
                self.unknown_budget.0 -= 1.0;
                self.transmits.push_back(Transmit::new(from, reply));
            }
            return;
        };
        let out_channel = ch.ids[1 - side];
        let (src, dst) = (&ch.users[side], &ch.users[1 - side]);
        let (Some(&src), Some(&dst)) = (self.by_name.get(src), self.by_name.get(dst)) else {
            self.stats.relay_refused += 1;
            tracing::debug!(%from, "RELAY(PEER_GONE)");
            return;
        };
        if self.sessions.get(&src).is_none_or(|s| s.addr != from) {
            self.stats.relay_refused += 1;
            tracing::debug!(%from, "RELAY(NOT_THE_PARTY)");
            // On the owner's secret channel id from another address: its
            // NAT rebound, most likely (the id is told to it alone).
            // Challenge that address so its relayed traffic goes on once
            // it answers, instead of at its next packet to us.
            self.challenge_path(now, src, from, datagram.len());
            return;
        }
        ch.last_used = now;
        let rate = self.config.relay.rate_per_user as f64;
        let s = self.sessions.get_mut(&src).expect("looked up");
        if rate > 0.0 {
            let elapsed = now.saturating_duration_since(s.relay_at).as_secs_f64();
            s.relay_tokens = (s.relay_tokens + elapsed * rate).min(rate);
            s.relay_at = now;
            let len = datagram.len() as f64;
            if s.relay_tokens < len {
                self.stats.relay_over_rate += 1;
                return;
            }
            s.relay_tokens -= len;
        }
        let Some(dst) = self.sessions.get(&dst).map(|s| s.addr) else {
            self.stats.relay_refused += 1;
            return;
        };
        self.stats.relayed_packets += 1;
        self.stats.relayed_bytes += datagram.len() as u64;
        let mut out = datagram.to_vec();
        out[2..wire::RELAY_HEADER_LEN].copy_from_slice(&out_channel.to_be_bytes());
        self.transmits.push_back(Transmit::new(dst, out));
    }

    /// Opens a relay channel for an agreed introduction, replacing any
    /// older one between the same two users: each user's channel id, or
    /// None without a relay.
    fn open_channel(&mut self, now: Instant, intro_id: u64, a: &str, b: &str) -> Option<[u64; 2]> {
        if !self.config.relay.enabled || self.config.relay.max_channels == 0 {
            return None;
        }
        self.retain_channels(|c| {
            !(c.users.iter().any(|u| u == a) && c.users.iter().any(|u| u == b))
        });
        let per_user = self.config.relay.max_channels_per_user.max(1);
        for user in [a, b] {
            while self
                .channels
                .values()
                .filter(|c| c.users.iter().any(|u| u == user))
                .count()
                >= per_user
            {
                self.evict_lru(|c| c.users.iter().any(|u| u == user));
            }
        }
        while self.channels.len() >= self.config.relay.max_channels {
            tracing::warn!(channels = self.channels.len(), "RELAY(FULL_EVICT_OLDEST)");
            self.evict_lru(|_| true);
        }
        let mut ids = [0u64; 2];
        for (side, id) in ids.iter_mut().enumerate() {
            *id = loop {
                let id: u64 = self.rng.gen();
                if id != 0 && !self.channel_ids.contains_key(&id) {
                    break id;
                }
            };
            self.channel_ids.insert(*id, (intro_id, side));
        }
        self.channels.insert(
            intro_id,
            Channel {
                users: [a.to_owned(), b.to_owned()],
                ids,
                last_used: now,
            },
        );
        self.stats.relay_channels += 1;
        Some(ids)
    }

    /// Drops the least recently used channel among those `which` picks.
    fn evict_lru(&mut self, which: impl Fn(&Channel) -> bool) {
        let oldest = self
            .channels
            .iter()
            .filter(|(_, c)| which(c))
            .min_by_key(|(_, c)| c.last_used)
            .map(|(id, _)| *id);
        if let Some(c) = oldest.and_then(|id| self.channels.remove(&id)) {
            self.channel_ids.remove(&c.ids[0]);
            self.channel_ids.remove(&c.ids[1]);
        }
    }

    fn user_of(&self, index: u32) -> Option<String> {
        self.sessions.get(&index).and_then(|s| s.user.clone())
    }

    fn on_message(
        &mut self,
        now: Instant,
        index: u32,
        msg: ClientToServer,
        store: &mut dyn AccountStore,
    ) {
        let rid = match &msg {
            ClientToServer::Register { rid, .. }
            | ClientToServer::Login { rid, .. }
            | ClientToServer::ListUsers { rid, .. }
            | ClientToServer::RequestConnect { rid, .. }
            | ClientToServer::AgreeConnect { rid, .. } => Some(*rid),
            _ => None,
        };
        if let Some(rid) = rid {
            let s = &self.sessions[&index];
            if let Some((_, answers)) = s.recent.iter().find(|(r, _)| *r == rid) {
                // A retransmitted request: answer again, do not run it twice.
                for a in answers.clone() {
                    self.transmit(index, &a);
                }
                return;
            }
        }
        match msg {
            ClientToServer::PushAck { push_id } => {
                if let Some(s) = self.sessions.get_mut(&index) {
                    s.pushes.remove(&push_id);
                }
            }
            ClientToServer::Register { rid, name, invite } => {
                self.on_register(now, index, rid, name, &invite, store)
            }
            ClientToServer::Login { rid, signature } => self.on_login(index, rid, signature, store),
            ClientToServer::Ping { rid } => {
                // Where the ping came from, validated or not: the client
                // learns its NAT's mapping now.
                let observed = self
                    .answer_to
                    .map_or(self.sessions[&index].addr, |(_, a)| a);
                self.send(index, &ServerToClient::Pong { rid, observed });
            }
            ClientToServer::PathResponse { data } => self.on_path_response(now, index, data),
            ClientToServer::Logout => self.remove_session(index, "logout"),
            ClientToServer::ListUsers { rid, after } => {
                if self.user_of(index).is_none() {
                    return self.fail(index, rid, FailReason::NotLoggedIn, "log in first");
                }
                let per_sec = self.config.list_pages_per_sec;
                if !self.list_buckets.take(now, self.sessions[&index].addr) {
                    self.stats.lists_limited += 1;
                    return self.fail(
                        index,
                        rid,
                        FailReason::RateLimited,
                        format!("too many user-list pages (at most {per_sec} a second); try again in a second"),
                    );
                }
                // `by_name` is ordered by name: a page is the range after
                // the cursor, O(log n + page), with no sort, no copy and
                // no walk past earlier pages (sorting every online user
                // for each page was 7.6 s of CPU for a listing of 15k).
                let total = self.by_name.len().min(u32::MAX as usize) as u32;
                let start = match after.is_empty() {
                    true => std::ops::Bound::Unbounded,
                    false => std::ops::Bound::Excluded(after),
                };
                let page: Vec<UserEntry> = self
                    .by_name
                    .range((start, std::ops::Bound::Unbounded))
                    .filter_map(|(n, i)| {
                        self.sessions.get(i).map(|s| UserEntry {
                            name: n.clone(),
                            sign_key: s.identity.sign_key,
                        })
                    })
                    .take(USERS_PER_PAGE)
                    .collect();
                self.stats.list_pages += 1;
                self.send(
                    index,
                    &ServerToClient::UserList {
                        rid,
                        total,
                        users: page,
                    },
                );
            }
            ClientToServer::RequestConnect {
                rid,
                name,
                locals,
                hard,
            } => self.on_request_connect(now, index, rid, name, (locals, hard), store),
            ClientToServer::AgreeConnect {
                rid,
                intro_id,
                accept,
                locals,
                hard,
            } => self.on_agree(now, index, rid, intro_id, accept, (locals, hard)),
        }
    }

    fn on_register(
        &mut self,
        now: Instant,
        index: u32,
        rid: u32,
        name: String,
        invite: &str,
        store: &mut dyn AccountStore,
    ) {
        if let Err(why) = validate_name(&name) {
            return self.fail(index, rid, FailReason::NameInvalid, why);
        }
        let addr = self.sessions[&index].addr;
        if !self.register_buckets.take(now, addr) {
            self.stats.registrations_limited += 1;
            tracing::info!(%addr, "REGISTER(RATE_LIMITED)");
            let per_hour = self.config.registrations_per_hour;
            let wait = self.register_buckets.wait(addr).as_secs() + 1;
            return self.fail(
                index,
                rid,
                FailReason::RateLimited,
                format!("too many registrations from your network (at most {per_hour} an hour); try again in {wait} s"),
            );
        }
        let invited = self.config.invite_tokens.is_empty()
            || self.config.invite_tokens.iter().fold(false, |ok, t| {
                ok | bool::from(t.as_bytes().ct_eq(invite.as_bytes()))
            });
        if !invited {
            self.stats.invites_refused += 1;
            tracing::info!(%name, "REGISTER(NOT_INVITED)");
            return self.fail(
                index,
                rid,
                FailReason::InviteRequired,
                "this server registers only with an invite token: register NAME --invite TOKEN (ask its operator)",
            );
        }
        let identity = self.sessions[&index].identity.clone();
        match store.register(&name, &identity) {
            Ok(RegisterOutcome::Created) | Ok(RegisterOutcome::AlreadyYours) => {
                self.stats.registrations += 1;
                tracing::info!(%name, fingerprint = %identity.fingerprint(), "REGISTER(OK)");
                self.send(index, &ServerToClient::RegisterOk { rid, name });
            }
            Ok(RegisterOutcome::NameTaken) => self.fail(
                index,
                rid,
                FailReason::NameTaken,
                format!("the name {name} belongs to another key"),
            ),
            Ok(RegisterOutcome::KeyHasName(other)) => self.fail(
                index,
                rid,
                FailReason::KeyAlreadyRegistered,
                format!("this key is already registered as {other}"),
            ),
            Err(e) => {
                self.stats.store_errors += 1;
                tracing::error!(error = %e, "REGISTER(STORE_ERROR)");
                self.fail(index, rid, FailReason::ServerError, "storage error");
            }
        }
    }

    fn on_login(
        &mut self,
        index: u32,
        rid: u32,
        signature: [u8; 64],
        store: &mut dyn AccountStore,
    ) {
        let server_key = self.identity.noise_public();
        let s = &self.sessions[&index];
        if !s
            .identity
            .verify_login(&s.challenge, &server_key, &signature)
        {
            self.stats.auth_failed += 1;
            return self.fail(index, rid, FailReason::NotLoggedIn, "bad login signature");
        }
        let sign_key = s.identity.sign_key;
        let account = match store.by_key(&sign_key) {
            Ok(Some(a)) => a,
            Ok(None) => {
                return self.fail(
                    index,
                    rid,
                    FailReason::NotRegistered,
                    "no account for this key; register a name first",
                )
            }
            Err(e) => {
                self.stats.store_errors += 1;
                tracing::error!(error = %e, "LOGIN(STORE_ERROR)");
                return self.fail(index, rid, FailReason::ServerError, "storage error");
            }
        };
        let name = account.name;
        if let Some(old) = self.by_name.insert(name.clone(), index) {
            if old != index {
                tracing::info!(%name, "LOGIN(REPLACES_SESSION)");
                // The same key on a new session: a rekey, or a client that
                // restarted. Unacknowledged notices and cached answers move
                // with it (request ids are random per client run, so a
                // restarted client does not meet its old answers).
                if let Some(prev) = self.sessions.remove(&old) {
                    if self.by_addr.get(&prev.addr) == Some(&old) {
                        self.by_addr.remove(&prev.addr);
                    }
                    if let Some(s) = self.sessions.get_mut(&index) {
                        // The relay allowance is the user's, not the
                        // session's: a new login does not refill it.
                        s.relay_tokens = prev.relay_tokens;
                        s.relay_at = prev.relay_at;
                        s.pushes.extend(prev.pushes);
                        let mut recent = prev.recent;
                        recent.extend(std::mem::take(&mut s.recent));
                        while recent.len() > RECENT_ANSWERS {
                            recent.pop_front();
                        }
                        s.recent = recent;
                    }
                }
            }
        }
        let s = self.sessions.get_mut(&index).expect("session exists");
        s.user = Some(name.clone());
        let (created, addr) = (s.created, s.addr);
        self.anonymous.remove(&(created, index));
        self.by_addr.insert(addr, index);
        let s = &self.sessions[&index];
        let observed = s.addr;
        self.stats.logins += 1;
        tracing::info!(%name, %observed, "LOGIN(OK)");
        self.send(
            index,
            &ServerToClient::LoginOk {
                rid,
                name,
                observed,
                probe_port: self.config.probe_port,
                reset_token: self.reset_token(TOKEN_SESSION, index as u64),
            },
        );
    }

    fn on_request_connect(
        &mut self,
        now: Instant,
        index: u32,
        rid: u32,
        name: String,
        (locals, hard): (Vec<SocketAddr>, bool),
        store: &mut dyn AccountStore,
    ) {
        let Some(me) = self.user_of(index) else {
            return self.fail(index, rid, FailReason::NotLoggedIn, "log in first");
        };
        if name == me {
            return self.fail(index, rid, FailReason::SelfConnect, "that is you");
        }
        match store.by_name(&name) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return self.fail(
                    index,
                    rid,
                    FailReason::UnknownUser,
                    format!("no user named {name}"),
                )
            }
            Err(e) => {
                self.stats.store_errors += 1;
                tracing::error!(error = %e, "CONNECT(STORE_ERROR)");
                return self.fail(index, rid, FailReason::ServerError, "storage error");
            }
        }
        let Some(&target) = self.by_name.get(&name) else {
            return self.fail(
                index,
                rid,
                FailReason::Offline,
                format!("{name} is not online"),
            );
        };
        // The other side asked for us already (crossing requests: both
        // reconnecting after a restart or an outage): this request agrees
        // to that introduction instead of starting a second one, so both
        // punch for the same one.
        let crossing = self.intro_pairs.get(&(name.clone(), me.clone())).copied();
        if let Some(intro_id) = crossing {
            tracing::info!(from = %me, to = %name, "INTRO(CROSSED_MERGED)");
            return self.on_agree(now, index, rid, intro_id, true, (locals, hard));
        }
        // Asked already and not answered yet: the same request, not a new
        // notice for the target.
        if let Some(&intro_id) = self.intro_pairs.get(&(me.clone(), name.clone())) {
            return self.send(
                index,
                &ServerToClient::ConnectPending {
                    rid,
                    intro_id,
                    name,
                },
            );
        }
        let waiting = self
            .intro_pairs
            .range((me.clone(), String::new())..)
            .take_while(|((from, _), _)| *from == me)
            .count();
        if waiting >= MAX_INTROS_PER_USER {
            self.stats.intros_limited += 1;
            return self.fail(
                index,
                rid,
                FailReason::RateLimited,
                format!("{MAX_INTROS_PER_USER} connection requests of yours are waiting for an answer; try again when some are answered or expired"),
            );
        }
        let intro_id = loop {
            let id: u64 = self.rng.gen();
            if id != 0 && !self.intros.contains_key(&id) {
                break id;
            }
        };
        let identity = self.sessions[&index].identity.clone();
        self.intro_pairs
            .insert((me.clone(), name.clone()), intro_id);
        self.intros.insert(
            intro_id,
            Intro {
                from: me.clone(),
                to: name.clone(),
                from_locals: locals,
                from_hard: hard,
                created: now,
            },
        );
        self.arm_sweep(now);
        tracing::info!(from = %me, to = %name, "INTRO(REQUESTED)");
        self.push(
            now,
            target,
            ServerToClient::ConnectRequested {
                intro_id,
                name: me,
                identity,
            },
        );
        self.send(
            index,
            &ServerToClient::ConnectPending {
                rid,
                intro_id,
                name,
            },
        );
    }

    fn on_agree(
        &mut self,
        now: Instant,
        index: u32,
        rid: u32,
        intro_id: u64,
        accept: bool,
        (locals, hard): (Vec<SocketAddr>, bool),
    ) {
        let me = self.user_of(index);
        let matches =
            matches!((&me, self.intros.get(&intro_id)), (Some(me), Some(i)) if &i.to == me);
        if !matches {
            return self.fail(
                index,
                rid,
                FailReason::NoSuchIntro,
                "no pending request with that id",
            );
        }
        let intro = self.intros.remove(&intro_id).expect("checked");
        self.intro_pairs
            .remove(&(intro.from.clone(), intro.to.clone()));
        let requester = self.by_name.get(&intro.from).copied();
        let Some(requester) = requester else {
            return self.fail(
                index,
                rid,
                FailReason::Offline,
                format!("{} went offline", intro.from),
            );
        };
        self.send(index, &ServerToClient::Ok { rid });
        if !accept {
            tracing::info!(from = %intro.from, to = %intro.to, "INTRO(DECLINED)");
            return self.push(
                now,
                requester,
                ServerToClient::ConnectFailed {
                    intro_id,
                    name: intro.to,
                    reason: FailReason::Declined,
                },
            );
        }
        self.stats.introductions += 1;
        tracing::info!(from = %intro.from, to = %intro.to, "INTRO(PUNCH)");
        let ids = self.open_channel(now, intro_id, &intro.from, &intro.to);
        let relay = ids.is_some();
        // Each side's id and its reset token (from, to).
        let [(from_channel, from_token), (to_channel, to_token)] =
            ids.unwrap_or_default().map(|id| match id {
                0 => (0, [0; 16]),
                id => (id, self.reset_token(TOKEN_CHANNEL, id)),
            });
        let (Some(a), Some(b)) = (self.sessions.get(&requester), self.sessions.get(&index)) else {
            return;
        };
        let to_requester = PunchInstruction {
            intro_id,
            name: intro.to.clone(),
            identity: b.identity.clone(),
            public: b.addr,
            locals,
            initiator: true,
            relay,
            peer_hard: hard,
            channel: from_channel,
            channel_token: from_token,
        };
        let to_target = PunchInstruction {
            intro_id,
            name: intro.from.clone(),
            identity: a.identity.clone(),
            public: a.addr,
            locals: intro.from_locals,
            initiator: false,
            relay,
            peer_hard: intro.from_hard,
            channel: to_channel,
            channel_token: to_token,
        };
        self.push(now, requester, ServerToClient::Punch(to_requester));
        self.push(now, index, ServerToClient::Punch(to_target));
    }

    fn remove_session(&mut self, index: u32, why: &str) {
        if let Some(s) = self.sessions.remove(&index) {
            self.anonymous.remove(&(s.created, index));
            if self.by_addr.get(&s.addr) == Some(&index) {
                self.by_addr.remove(&s.addr);
            }
            if let Some(name) = s.user {
                if self.by_name.get(&name) == Some(&index) {
                    self.by_name.remove(&name);
                    self.retain_channels(|c| !c.users.contains(&name));
                    tracing::info!(%name, why, "PRESENCE(GONE)");
                }
            }
        }
    }

    /// Keeps the relay channels `keep` picks, forgetting the others' ids.
    fn retain_channels(&mut self, keep: impl Fn(&Channel) -> bool) {
        let ids = &mut self.channel_ids;
        self.channels.retain(|_, c| {
            let kept = keep(c);
            if !kept {
                ids.remove(&c.ids[0]);
                ids.remove(&c.ids[1]);
            }
            kept
        });
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_sweep {
            Some(t) if t <= now => {}
            _ => return,
        }
        self.next_sweep = None;
        let expired: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                now.saturating_duration_since(s.last_seen) >= self.config.presence_timeout
            })
            .map(|(i, _)| *i)
            .collect();
        for i in expired {
            self.remove_session(i, "heartbeats stopped");
        }
        // Handshakes and IK sessions never confirmed (a replayed
        // initiation's) go after the handshake timeout; the oldest of
        // `anonymous` are the only ones that can be that old.
        let hs_timeout = self.config.handshake_timeout;
        let stale: Vec<(Instant, u32)> = self
            .anonymous
            .iter()
            .take_while(|(at, _)| now.saturating_duration_since(*at) >= hs_timeout)
            // Confirmed and not logged in: it stays (its place in the cap
            // too) until its heartbeats stop.
            .filter(|(_, i)| !self.sessions.get(i).is_some_and(|s| s.confirmed))
            .copied()
            .collect();
        for (at, index) in stale {
            self.anonymous.remove(&(at, index));
            self.pending.remove(&index);
            self.sessions.remove(&index);
        }
        let old: Vec<u64> = self
            .intros
            .iter()
            .filter(|(_, i)| now.saturating_duration_since(i.created) >= self.config.intro_timeout)
            .map(|(id, _)| *id)
            .collect();
        for intro_id in old {
            let intro = self.intros.remove(&intro_id).expect("listed");
            self.intro_pairs
                .remove(&(intro.from.clone(), intro.to.clone()));
            tracing::info!(from = %intro.from, to = %intro.to, "INTRO(TIMED_OUT)");
            for (who, other) in [(&intro.from, &intro.to), (&intro.to, &intro.from)] {
                if let Some(&i) = self.by_name.get(who) {
                    self.push(
                        now,
                        i,
                        ServerToClient::ConnectFailed {
                            intro_id,
                            name: other.clone(),
                            reason: FailReason::TimedOut,
                        },
                    );
                }
            }
        }
        let idle = self.config.relay.idle_timeout;
        self.retain_channels(|c| now.saturating_duration_since(c.last_used) < idle);
        let mut resend = Vec::new();
        for (index, s) in self.sessions.iter_mut() {
            s.pushes.retain(|_, p| p.tries < PUSH_TRIES);
            for p in s.pushes.values_mut().filter(|p| p.next <= now) {
                p.tries += 1;
                p.next = now + PUSH_RESEND;
                resend.push((*index, p.msg.clone()));
            }
        }
        for (index, msg) in resend {
            self.transmit(index, &msg);
        }
        if !self.sessions.is_empty() || !self.pending.is_empty() || !self.intros.is_empty() {
            self.next_sweep = Some(now + SWEEP_INTERVAL);
        }
    }
}

/// The answer to a [`Packet::Probe`] from `from`: where the probe came
/// from. Never larger than the probe (no amplification); `None` for
/// anything that is not a probe. The rendezvous binary also calls this
/// for its second (probe) port.
pub fn answer_probe(from: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    let Ok(Packet::Probe { nonce }) = Packet::decode(datagram) else {
        return None;
    };
    let reply = Packet::ProbeReply {
        nonce,
        observed: from,
    }
    .encode();
    (reply.len() <= datagram.len()).then_some(reply)
}
