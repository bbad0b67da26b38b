//! The rendezvous client: one daemon's link to the server.
//!
//! States: `Idle` (waiting to retry) → `Handshaking` → `Established`
//! (logged in once the server accepted the challenge signature). While
//! established it sends a `Ping` every heartbeat interval: that keeps both
//! presence at the server and the NAT mapping open. The link starts over
//! with a new handshake when the server stops answering, says it lost the
//! session (`SessionUnknown`, as after a restart), or the keys get old.
//!
//! Requests carry a client-chosen `rid`; the answer comes back as
//! [`LinkEvent::Response`] with the same `rid`, or a timeout error.

use crate::identity::{identity_payload, Identity, PublicIdentity};
use crate::noise::{Handshake, Pattern, Transport, REKEY_AFTER_TIME};
use crate::wire::{
    ClientToServer, Cookie, FailReason, Packet, PunchInstruction, ResetToken, ServerToClient,
};
use crate::Transmit;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// First handshake retry delay; doubles up to [`HANDSHAKE_RETRY_MAX`].
pub const HANDSHAKE_RETRY_MIN: Duration = Duration::from_secs(1);
pub const HANDSHAKE_RETRY_MAX: Duration = Duration::from_secs(30);
/// After this many unanswered IK attempts with a pinned key, one XX
/// attempt finds out whether the server's key changed.
const IK_ATTEMPTS_BEFORE_PROBE: u32 = 3;
/// Missed heartbeats after which the server is considered gone.
const MISSED_HEARTBEATS: u32 = 3;
/// Heartbeats per interval once one went unanswered.
const HEARTBEAT_PROBES: u32 = 5;
/// A check of the path ([`ServerLink::check_now`]) unanswered this long
/// means the way to the server is broken. [`CHECK_PINGS`] pings go in it
/// (at 10% loss all three round trips fail by chance 0.7% of the time); a
/// server a continent away answers in a fraction of it.
pub const CHECK_ANSWER: Duration = Duration::from_secs(1);
pub const CHECK_PINGS: u32 = 3;
/// Most requests waiting for the link to come up.
const MAX_QUEUED: usize = 256;
/// A request without an answer is sent again after this long (the server
/// answers a repeated `rid` from its memory instead of running it twice).
const REQUEST_RESEND: Duration = Duration::from_millis(700);
/// How often a lost XX third message is sent again before the link starts
/// over with a new handshake.
const MAX_FINISH_RESENDS: u8 = 3;
/// Push ids remembered to drop repeats.
const SEEN_PUSHES: usize = 64;

struct Req {
    deadline: Instant,
    resend: Option<(Instant, ClientToServer)>,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub server: SocketAddr,
    /// The server's Noise key, if pinned. Without one the first handshake
    /// is XX and the key learned is reported in [`LinkEvent::Connected`].
    pub server_key: Option<[u8; 32]>,
    /// The registered name to log in with, if any.
    pub name: Option<String>,
    /// Heartbeat interval: 25 s by default, the WireGuard figure that keeps
    /// common NAT mappings open.
    pub heartbeat: Duration,
    /// How long a request waits for its answer.
    pub request_timeout: Duration,
    /// The wall-clock time (since the UNIX epoch) at the `now` the link is
    /// made with: IK initiations carry a timestamp that must grow across
    /// restarts, or the server takes them for replays. The machine reads
    /// no clock: the shell sets it (zero by default, which suits a client
    /// whose key never logs in from two runs).
    pub unix_time: Duration,
}

impl ClientConfig {
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            server_key: None,
            name: None,
            heartbeat: Duration::from_secs(25),
            request_timeout: Duration::from_secs(10),
            unix_time: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    Failed { reason: FailReason, detail: String },
    TimedOut,
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Failed { reason, detail } if detail.is_empty() => {
                f.write_str(reason.as_str())
            }
            RequestError::Failed { detail, .. } => f.write_str(detail),
            RequestError::TimedOut => f.write_str("the rendezvous server did not answer in time"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The handshake finished. `learned` is true when the key was not
    /// pinned before (trust on first use): pin it now.
    Connected {
        server_key: [u8; 32],
        learned: bool,
    },
    /// The server presented a different key from the pinned one. The link
    /// stops until the operator resolves it.
    ServerKeyMismatch {
        pinned: [u8; 32],
        offered: [u8; 32],
    },
    LoggedIn {
        name: String,
        observed: SocketAddr,
        /// The server's probe port (0: none); see [`crate::wire::Packet::Probe`].
        probe_port: u16,
    },
    LoginFailed {
        reason: FailReason,
        detail: String,
    },
    /// The link went down; it reconnects by itself.
    Disconnected {
        reason: &'static str,
    },
    Response {
        rid: u32,
        result: Result<ServerToClient, RequestError>,
    },
    ConnectRequested {
        intro_id: u64,
        name: String,
        identity: PublicIdentity,
    },
    ConnectFailed {
        intro_id: u64,
        name: String,
        reason: FailReason,
    },
    Punch(PunchInstruction),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Connecting,
    Connected,
    LoggedIn,
    KeyMismatch,
}

impl LinkState {
    /// The name the control API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::LoggedIn => "logged_in",
            LinkState::KeyMismatch => "key_mismatch",
        }
    }
}

enum State {
    Idle {
        retry_at: Instant,
    },
    Handshaking {
        hs: Box<Handshake>,
        local_index: u32,
        retry_at: Instant,
        /// The initiation's pattern and Noise message, to send again with
        /// a cookie if the server asks for one (once).
        init: (Pattern, Vec<u8>),
        cookied: bool,
    },
    Established(Box<Established>),
    KeyMismatch,
}

struct Established {
    transport: Transport,
    server_key: [u8; 32],
    challenge: [u8; 16],
    logged_in: bool,
    /// What the server's `SessionUnknown` for this session must carry to
    /// be believed (from the login's answer).
    reset_token: Option<ResetToken>,
    /// The login in flight: its rid, when to send it again, and the bytes.
    /// A lost login is resent like any request; the server answers a
    /// repeated rid from its cache.
    login: Option<(u32, Instant, ClientToServer)>,
    last_rx: Instant,
    next_heartbeat: Instant,
    /// A check of the path ([`ServerLink::check_now`]) under way: since
    /// when, and how many pings went.
    check: Option<(Instant, u32)>,
    /// This session replaced a logged-in one for a rekey: its login is
    /// not news to the layers above.
    quiet: bool,
    /// XX's third message, kept until the server shows it has the session
    /// (any authenticated packet from it): if it was lost, the server
    /// answers our data with `SessionUnknown`, and we send it again
    /// instead of starting over.
    finish: Option<(Vec<u8>, u8)>,
}

pub struct ServerLink {
    identity: Identity,
    config: ClientConfig,
    state: State,
    attempts: u32,
    probe_xx: bool,
    queue: VecDeque<(u32, ClientToServer)>,
    inflight: BTreeMap<u32, Req>,
    internal: BTreeMap<u32, Instant>,
    events: VecDeque<LinkEvent>,
    transmits: VecDeque<Transmit>,
    next_rid: u32,
    observed: Option<SocketAddr>,
    /// A rekey handshake is under way (since the server was last heard
    /// at this instant): the link counts as logged in meanwhile.
    rekeying: Option<Instant>,
    /// Notices already handled, across sessions: the server moves unacked
    /// notices to the new session when we log in again after a rekey.
    seen_pushes: VecDeque<u32>,
    /// A check of the path went unanswered; not yet taken.
    check_failed: bool,
    /// The server's last cookie for us, and when it came: sent with
    /// initiations while it is fresh ([`COOKIE_FRESH`]).
    cookie: Option<(Cookie, Instant)>,
    /// When the link was made, and the last IK timestamp sent.
    started: Instant,
    last_stamp: u64,
    rng: rand::rngs::StdRng,
}

/// A cookie is used this long (the server takes one for two to four
/// minutes).
const COOKIE_FRESH: Duration = Duration::from_secs(100);

impl ServerLink {
    pub fn new(identity: Identity, config: ClientConfig, now: Instant, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self {
            identity,
            config,
            state: State::Idle { retry_at: now },
            attempts: 0,
            probe_xx: false,
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            internal: BTreeMap::new(),
            events: VecDeque::new(),
            transmits: VecDeque::new(),
            // Request ids start at a random point, so that a restarted
            // client's ids do not meet the server's cached answers for its
            // previous run.
            next_rid: rng.gen::<u32>().max(1),
            observed: None,
            rekeying: None,
            seen_pushes: VecDeque::new(),
            check_failed: false,
            cookie: None,
            started: now,
            last_stamp: 0,
            rng,
        }
    }

    /// The timestamp for an IK initiation: wall-clock nanoseconds, always
    /// more than the last.
    fn stamp(&mut self, now: Instant) -> u64 {
        let wall = self.config.unix_time + now.saturating_duration_since(self.started);
        let stamp = (wall.as_nanos() as u64).max(self.last_stamp + 1);
        self.last_stamp = stamp;
        stamp
    }

    fn init_packet(
        &self,
        now: Instant,
        local_index: u32,
        (pattern, noise): &(Pattern, Vec<u8>),
    ) -> Vec<u8> {
        let cookie = self
            .cookie
            .filter(|(_, at)| now.saturating_duration_since(*at) < COOKIE_FRESH)
            .map_or([0; 16], |(c, _)| c);
        Packet::HandshakeInit {
            sender: local_index,
            pattern: *pattern,
            noise,
            cookie,
        }
        .encode()
    }

    pub fn server_addr(&self) -> SocketAddr {
        self.config.server
    }

    pub fn server_key(&self) -> Option<[u8; 32]> {
        self.config.server_key
    }

    pub fn name(&self) -> Option<&str> {
        self.config.name.as_deref()
    }

    /// Our address as the server last saw it.
    pub fn observed(&self) -> Option<SocketAddr> {
        self.observed
    }

    pub fn state(&self) -> LinkState {
        match &self.state {
            State::Handshaking { .. } if self.rekeying.is_some() => LinkState::LoggedIn,
            State::Idle { .. } | State::Handshaking { .. } => LinkState::Connecting,
            State::Established(e) if e.logged_in => LinkState::LoggedIn,
            State::Established(_) => LinkState::Connected,
            State::KeyMismatch => LinkState::KeyMismatch,
        }
    }

    /// Is this local index ours (for demultiplexing)?
    pub fn owns_index(&self, index: u32) -> bool {
        match &self.state {
            State::Handshaking { local_index, .. } => *local_index == index,
            State::Established(e) => e.transport.local_index == index,
            _ => false,
        }
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let state = match &self.state {
            State::Idle { retry_at } => Some(*retry_at),
            State::Handshaking { retry_at, .. } => Some(*retry_at),
            State::Established(e) => {
                let rekey = e.transport.created + REKEY_AFTER_TIME;
                let check = e
                    .check
                    .map(|(since, pings)| since + CHECK_ANSWER * pings / CHECK_PINGS);
                let t = e.next_heartbeat.min(rekey).min(check.unwrap_or(rekey));
                Some(match &e.login {
                    Some((_, at, _)) => t.min(*at),
                    None => t,
                })
            }
            State::KeyMismatch => None,
        };
        // Resends only happen on an established session; counting them
        // otherwise would ask for a wakeup that does nothing.
        let established = matches!(self.state, State::Established(_));
        let requests = self
            .inflight
            .values()
            .flat_map(|r| {
                let resend = r.resend.as_ref().filter(|_| established).map(|x| x.0);
                [Some(r.deadline), resend]
            })
            .flatten()
            .min();
        // `internal` (heartbeat rids awaiting a pong) needs no wakeup of its
        // own: it is pruned on the next timeout, at the next heartbeat.
        [state, requests].into_iter().flatten().min()
    }

    fn fresh_rid(&mut self) -> u32 {
        let rid = self.next_rid;
        self.next_rid = self.next_rid.wrapping_add(1).max(1);
        rid
    }

    /// Sends a request; its answer comes back as a [`LinkEvent::Response`]
    /// with the returned `rid`. Requests made while the link is down wait
    /// for it (until their timeout).
    pub fn request(&mut self, now: Instant, build: impl FnOnce(u32) -> ClientToServer) -> u32 {
        let rid = self.fresh_rid();
        let msg = build(rid);
        self.inflight.insert(
            rid,
            Req {
                deadline: now + self.config.request_timeout,
                resend: None,
            },
        );
        let needs_login = !matches!(msg, ClientToServer::Register { .. });
        match &self.state {
            State::Established(e) if e.logged_in || !needs_login => {
                self.send_request(now, rid, msg)
            }
            _ if self.queue.len() < MAX_QUEUED => self.queue.push_back((rid, msg)),
            _ => {
                self.inflight.remove(&rid);
                self.events.push_back(LinkEvent::Response {
                    rid,
                    result: Err(RequestError::TimedOut),
                });
            }
        }
        rid
    }

    /// Forces a new handshake and login now (the `login` command).
    pub fn reconnect(&mut self, now: Instant) {
        if matches!(self.state, State::KeyMismatch) {
            self.probe_xx = false;
        }
        self.attempts = 0;
        self.state = State::Idle { retry_at: now };
        self.handle_timeout(now);
    }

    /// The way to the server changed (UDP to TCP or back): handshake
    /// again over it now. Unlike [`Self::reconnect`] the attempt count
    /// stays, so a server that never completes a handshake (its key
    /// changed) is still probed with XX in time, however often the way
    /// changes meanwhile.
    pub fn way_changed(&mut self, now: Instant) {
        if matches!(self.state, State::KeyMismatch) {
            return;
        }
        self.state = State::Idle { retry_at: now };
        self.handle_timeout(now);
    }

    /// The host's network changed (an address or link came or went): a
    /// link still trying starts over at once with a short backoff; an
    /// established one checks itself now with a heartbeat instead of at
    /// the next interval (our address may have changed).
    pub fn network_changed(&mut self, now: Instant) {
        match &mut self.state {
            State::Established(e) => e.next_heartbeat = now,
            // Waiting out a backoff, or for an answer that a lost network
            // swallowed: try now. The attempt count, which decides when to
            // probe with XX, stays.
            State::Idle { retry_at } | State::Handshaking { retry_at, .. } => *retry_at = now,
            State::KeyMismatch => return,
        }
        self.handle_timeout(now);
    }

    /// Checks the server path now, if a session is up (our address may
    /// have changed, or our network may drop UDP); a link still
    /// connecting is left to its handshake.
    ///
    /// The check is a ping now and two more within [`CHECK_ANSWER`]; when
    /// none is answered within it the link says
    /// so once ([`Self::take_check_failed`]): the way to the server is in
    /// doubt too, so it is our network, and the transport need not wait
    /// for heartbeats to time out (75 s at the default interval) before it
    /// tries TCP.
    pub fn check_now(&mut self, now: Instant) {
        if let State::Established(e) = &mut self.state {
            if e.check.is_none() {
                e.check = Some((now, 1));
                let rid = self.fresh_rid();
                self.internal.insert(rid, now + CHECK_ANSWER);
                self.send(ClientToServer::Ping { rid });
            }
            self.handle_timeout(now);
        }
    }

    /// Whether a check of the path went unanswered (said once per check).
    pub fn take_check_failed(&mut self) -> bool {
        std::mem::take(&mut self.check_failed)
    }

    /// Replaces the pinned server key (after the operator checked it).
    pub fn set_server_key(&mut self, key: Option<[u8; 32]>) {
        self.config.server_key = key;
    }

    pub fn close(&mut self) {
        if let State::Established(_) = self.state {
            self.send(ClientToServer::Logout);
        }
        self.state = State::KeyMismatch;
    }

    fn send_request(&mut self, now: Instant, rid: u32, msg: ClientToServer) {
        self.send(msg.clone());
        if let Some(r) = self.inflight.get_mut(&rid) {
            r.resend = Some((now + REQUEST_RESEND, msg));
        }
    }

    fn send(&mut self, msg: ClientToServer) {
        let State::Established(e) = &mut self.state else {
            return;
        };
        match e.transport.seal(&msg.encode()) {
            Ok(payload) => self
                .transmits
                .push_back(Transmit::new(self.config.server, payload)),
            Err(err) => tracing::warn!(error = %err, "cannot seal request"),
        }
    }

    fn start_handshake(&mut self, now: Instant) {
        if self.config.server_key.is_some()
            && !self.probe_xx
            && self.attempts >= IK_ATTEMPTS_BEFORE_PROBE
        {
            // The pinned key may be stale: find out with XX, which shows
            // the server's key before we reveal ours. (Counted over every
            // attempt, however it started: a way to the server that keeps
            // changing must not keep us on IK.)
            self.probe_xx = true;
        }
        let pattern = match self.config.server_key {
            Some(_) if !self.probe_xx => Pattern::IK,
            _ => Pattern::XX,
        };
        let hs = Handshake::initiator(
            pattern,
            self.identity.noise_private(),
            self.config.server_key.as_ref(),
        );
        let mut hs = match hs {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot start handshake");
                return;
            }
        };
        let payload = match pattern {
            Pattern::IK => {
                let mut p = identity_payload(&self.identity.public());
                p.extend_from_slice(&self.stamp(now).to_be_bytes());
                p
            }
            Pattern::XX => Vec::new(),
        };
        let noise = match hs.write(&payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot write handshake");
                return;
            }
        };
        let local_index = self.rng.gen::<u32>().max(1);
        let init = (pattern, noise);
        let packet = self.init_packet(now, local_index, &init);
        self.attempts += 1;
        let delay = self.backoff();
        tracing::debug!(?pattern, attempt = self.attempts, "HANDSHAKE(INIT)");
        self.transmits
            .push_back(Transmit::new(self.config.server, packet));
        // A retry is a new handshake with a new ephemeral key, as in
        // WireGuard, not a resend of the same bytes.
        self.state = State::Handshaking {
            hs: Box::new(hs),
            local_index,
            retry_at: now + delay,
            init,
            cookied: false,
        };
    }

    /// Exponential backoff with ±20 % jitter, reset after success.
    fn backoff(&mut self) -> Duration {
        if self.rekeying.is_some() {
            // A rekey on a working link: retry briskly, a lost packet is
            // the likely cause.
            return HANDSHAKE_RETRY_MIN.mul_f64(self.rng.gen_range(0.8..1.2));
        }
        let exp = self.attempts.saturating_sub(1).min(8);
        let base = (HANDSHAKE_RETRY_MIN * 2u32.pow(exp)).min(HANDSHAKE_RETRY_MAX);
        base.mul_f64(self.rng.gen_range(0.8..1.2))
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Request deadlines.
        let expired: Vec<u32> = self
            .inflight
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(rid, _)| *rid)
            .collect();
        for rid in expired {
            self.inflight.remove(&rid);
            self.queue.retain(|(r, _)| *r != rid);
            self.events.push_back(LinkEvent::Response {
                rid,
                result: Err(RequestError::TimedOut),
            });
        }
        self.internal.retain(|_, d| *d > now);
        if let State::Established(e) = &self.state {
            // Before the login, only a registration may go (anything else
            // would be refused as "not logged in").
            let logged_in = e.logged_in;
            let mut again = Vec::new();
            for r in self.inflight.values_mut() {
                if let Some((at, msg)) = &mut r.resend {
                    let allowed = logged_in || matches!(msg, ClientToServer::Register { .. });
                    if *at <= now && allowed {
                        *at = now + REQUEST_RESEND;
                        again.push(msg.clone());
                    }
                }
            }
            for msg in again {
                tracing::debug!("REQUEST(RESEND)");
                self.send(msg);
            }
        }

        if let State::Established(e) = &mut self.state {
            match e.check {
                Some((since, _)) if e.last_rx >= since => e.check = None,
                Some((since, _)) if now >= since + CHECK_ANSWER => {
                    tracing::info!("LINK(CHECK_UNANSWERED)");
                    e.check = None;
                    self.check_failed = true;
                }
                Some((since, pings)) if now >= since + CHECK_ANSWER * pings / CHECK_PINGS => {
                    e.check = Some((since, pings + 1));
                    let rid = self.fresh_rid();
                    self.internal.insert(rid, now + CHECK_ANSWER);
                    self.send(ClientToServer::Ping { rid });
                }
                _ => {}
            }
        }
        match &mut self.state {
            State::Idle { retry_at } if *retry_at <= now => self.start_handshake(now),
            State::Handshaking { retry_at, .. } if *retry_at <= now => {
                let silent_since = self.rekeying.filter(|heard| {
                    now.saturating_duration_since(*heard)
                        >= self.config.heartbeat * MISSED_HEARTBEATS
                });
                if silent_since.is_some() {
                    // The rekey got no answer for as long as a heartbeat
                    // may go unanswered: a lost link now, not lost packets.
                    self.rekeying = None;
                    self.events.push_back(LinkEvent::Disconnected {
                        reason: "the rendezvous server stopped answering",
                    });
                }
                self.start_handshake(now)
            }
            State::Established(e) if e.login.as_ref().is_some_and(|l| l.1 <= now) => {
                if let Some((_, at, msg)) = &mut e.login {
                    *at = now + REQUEST_RESEND;
                    let msg = msg.clone();
                    tracing::debug!("LOGIN(RESEND)");
                    self.send(msg);
                }
            }
            State::Established(e) if e.transport.wants_rekey(now) || e.transport.expired(now) => {
                // A new handshake on the same link, as WireGuard does at
                // REKEY_AFTER_TIME; the server moves our login's state to
                // the new session, and nobody above notices.
                tracing::debug!("LINK(REKEY)");
                self.rekeying = e.logged_in.then_some(e.last_rx);
                self.start_handshake(now);
            }
            State::Established(e) if e.next_heartbeat <= now => {
                let silent = now.saturating_duration_since(e.last_rx);
                if silent >= self.config.heartbeat * MISSED_HEARTBEATS {
                    tracing::info!(?silent, "LINK(HEARTBEAT_TIMEOUT)");
                    self.link_down(now, "the rendezvous server stopped answering");
                } else {
                    // The last heartbeat went unanswered: probe faster, so
                    // a few lost packets do not look like a dead server.
                    let interval = if silent >= self.config.heartbeat {
                        self.config.heartbeat / HEARTBEAT_PROBES
                    } else {
                        self.config.heartbeat
                    };
                    e.next_heartbeat = now + interval;
                    let rid = self.fresh_rid();
                    self.internal.insert(rid, now + self.config.heartbeat);
                    self.send(ClientToServer::Ping { rid });
                }
            }
            _ => {}
        }
    }

    fn link_down(&mut self, now: Instant, reason: &'static str) {
        if matches!(self.state, State::Established(_)) {
            self.events.push_back(LinkEvent::Disconnected { reason });
        }
        self.attempts = 0;
        self.state = State::Idle { retry_at: now };
        self.start_handshake(now);
    }

    /// Handles a datagram from the server address.
    pub fn handle_datagram(&mut self, now: Instant, packet: &Packet<'_>) {
        match *packet {
            Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            } => self.on_response(now, sender, receiver, noise),
            Packet::Data {
                receiver,
                counter,
                ciphertext,
            } => self.on_data(now, receiver, counter, ciphertext),
            Packet::CookieReply { receiver, cookie } => {
                // The server is busy: our initiation goes again with the
                // cookie, once per handshake (a stranger who guessed our
                // index gains nothing but a resend).
                let State::Handshaking {
                    local_index,
                    init,
                    cookied,
                    ..
                } = &mut self.state
                else {
                    return;
                };
                if *local_index != receiver || *cookied {
                    return;
                }
                *cookied = true;
                let (index, init) = (*local_index, init.clone());
                self.cookie = Some((cookie, now));
                tracing::debug!("HANDSHAKE(COOKIE)");
                let packet = self.init_packet(now, index, &init);
                self.transmits
                    .push_back(Transmit::new(self.config.server, packet));
            }
            Packet::SessionUnknown { receiver, token } => {
                let ours = matches!(&self.state, State::Established(e) if e.transport.remote_index == receiver);
                // Believed only with the session's reset token: anyone
                // can send the server's address a few bytes.
                let proven =
                    matches!(&self.state, State::Established(e) if e.reset_token == Some(token));
                if let State::Established(e) = &mut self.state {
                    if let Some((packet, tries)) =
                        e.finish.as_mut().filter(|f| f.1 < MAX_FINISH_RESENDS)
                    {
                        if ours {
                            *tries += 1;
                            tracing::debug!("HANDSHAKE(FINISH_RESENT)");
                            let payload = packet.clone();
                            self.transmits
                                .push_back(Transmit::new(self.config.server, payload));
                            return;
                        }
                    }
                }
                if ours && proven {
                    tracing::info!("LINK(SESSION_UNKNOWN)");
                    self.link_down(now, "the rendezvous server lost our session (restarted?)");
                } else if ours {
                    tracing::debug!("LINK(SESSION_UNKNOWN_UNPROVEN)");
                }
            }
            _ => {}
        }
    }

    fn on_response(&mut self, now: Instant, sender: u32, receiver: u32, noise: &[u8]) {
        let State::Handshaking {
            hs, local_index, ..
        } = &mut self.state
        else {
            return;
        };
        if *local_index != receiver {
            return;
        }
        let Ok(payload) = hs.read(noise) else {
            tracing::debug!("HANDSHAKE(BAD_RESPONSE)");
            return;
        };
        let Ok(challenge) = <[u8; 16]>::try_from(payload.as_slice()) else {
            return;
        };
        let Some(server_key) = hs.remote_static() else {
            return;
        };
        if let Some(pinned) = self.config.server_key {
            if pinned != server_key {
                tracing::error!("LINK(SERVER_KEY_MISMATCH)");
                self.events.push_back(LinkEvent::ServerKeyMismatch {
                    pinned,
                    offered: server_key,
                });
                self.state = State::KeyMismatch;
                return;
            }
        }
        let learned = self.config.server_key.is_none();
        let State::Handshaking {
            mut hs,
            local_index,
            ..
        } = std::mem::replace(&mut self.state, State::Idle { retry_at: now })
        else {
            unreachable!("matched above");
        };
        let mut finish = None;
        if hs.pattern == Pattern::XX {
            let Ok(msg3) = hs.write(&identity_payload(&self.identity.public())) else {
                return;
            };
            let packet = Packet::HandshakeFinish {
                receiver: sender,
                noise: &msg3,
            }
            .encode();
            finish = Some((packet.clone(), 0));
            self.transmits
                .push_back(Transmit::new(self.config.server, packet));
        }
        let Ok(transport) = hs.into_transport(local_index, sender, now) else {
            return;
        };
        self.config.server_key = Some(server_key);
        self.attempts = 0;
        self.probe_xx = false;
        self.state = State::Established(Box::new(Established {
            transport,
            server_key,
            challenge,
            logged_in: false,
            reset_token: None,
            login: None,
            last_rx: now,
            check: None,
            next_heartbeat: now + self.config.heartbeat,
            quiet: self.rekeying.take().is_some(),
            finish,
        }));
        let quiet = matches!(&self.state, State::Established(e) if e.quiet);
        if quiet {
            tracing::debug!("LINK(REKEYED)");
        } else {
            tracing::info!("LINK(CONNECTED)");
            self.events.push_back(LinkEvent::Connected {
                server_key,
                learned,
            });
        }
        self.login(now);
        // Registration does not need a login; everything else waits for it.
        let queued = std::mem::take(&mut self.queue);
        for (rid, msg) in queued {
            if matches!(msg, ClientToServer::Register { .. }) {
                self.send_request(now, rid, msg);
            } else {
                self.queue.push_back((rid, msg));
            }
        }
    }

    fn login(&mut self, now: Instant) {
        let State::Established(e) = &self.state else {
            return;
        };
        if self.config.name.is_none() {
            return;
        }
        let signature = self.identity.sign_login(&e.challenge, &e.server_key);
        let rid = self.fresh_rid();
        let msg = ClientToServer::Login { rid, signature };
        if let State::Established(e) = &mut self.state {
            e.login = Some((rid, now + REQUEST_RESEND, msg.clone()));
        }
        self.send(msg);
    }

    /// True (and the login settled) if `rid` answers the login in flight.
    fn settle_login(&mut self, rid: u32) -> bool {
        match &mut self.state {
            State::Established(e) if e.login.as_ref().is_some_and(|l| l.0 == rid) => {
                e.login = None;
                true
            }
            _ => false,
        }
    }

    fn on_data(&mut self, now: Instant, receiver: u32, counter: u64, ciphertext: &[u8]) {
        let State::Established(e) = &mut self.state else {
            return;
        };
        if e.transport.local_index != receiver {
            return;
        }
        let Ok(plain) = e.transport.open(counter, ciphertext) else {
            tracing::debug!("DROP(AUTH)");
            return;
        };
        e.last_rx = now;
        e.finish = None;
        let msg = match ServerToClient::decode(&plain) {
            Ok(m) => m,
            Err(err) => {
                tracing::debug!(error = %err, "DROP(MALFORMED_INNER)");
                return;
            }
        };
        self.on_message(now, msg);
    }

    fn on_message(&mut self, now: Instant, msg: ServerToClient) {
        match msg {
            ServerToClient::PathChallenge { data } => {
                // We came from a new address (our NAT rebound): show the
                // server we receive there.
                tracing::debug!("PATH(CHALLENGED)");
                self.send(ClientToServer::PathResponse { data });
            }
            ServerToClient::LoginOk {
                rid,
                name,
                observed,
                probe_port,
                reset_token,
            } if self.settle_login(rid) => {
                let mut quiet = false;
                if let State::Established(e) = &mut self.state {
                    e.logged_in = true;
                    e.reset_token = Some(reset_token);
                    quiet = e.quiet && self.observed == Some(observed);
                }
                self.observed = Some(observed);
                if quiet {
                    tracing::debug!(%name, "LINK(LOGGED_IN_AFTER_REKEY)");
                } else {
                    tracing::info!(%name, %observed, "LINK(LOGGED_IN)");
                    self.events.push_back(LinkEvent::LoggedIn {
                        name,
                        observed,
                        probe_port,
                    });
                }
                for (rid, msg) in std::mem::take(&mut self.queue) {
                    self.send_request(now, rid, msg);
                }
            }
            ServerToClient::Failed {
                rid,
                reason,
                detail,
            } if self.settle_login(rid) => {
                tracing::warn!(reason = reason.as_str(), %detail, "LINK(LOGIN_FAILED)");
                self.events
                    .push_back(LinkEvent::LoginFailed { reason, detail });
                // Requests waiting for a login cannot succeed now.
                for (rid, _) in std::mem::take(&mut self.queue) {
                    self.inflight.remove(&rid);
                    self.events.push_back(LinkEvent::Response {
                        rid,
                        result: Err(RequestError::Failed {
                            reason: FailReason::NotLoggedIn,
                            detail: "not logged in: register a name first".into(),
                        }),
                    });
                }
            }
            ServerToClient::Pong { rid, observed } if self.internal.remove(&rid).is_some() => {
                self.observed = Some(observed);
            }
            ServerToClient::RegisterOk { rid, ref name } => {
                // Remember the name and log in with it.
                let registered = self.inflight.contains_key(&rid);
                if registered {
                    let logged_in = matches!(&self.state, State::Established(e) if e.logged_in);
                    let renamed = self.config.name.as_deref() != Some(name);
                    self.config.name = Some(name.clone());
                    if !logged_in || renamed {
                        self.login(now);
                    }
                }
                self.respond(rid, Ok(msg));
            }
            ServerToClient::Failed {
                rid,
                reason,
                detail,
            } => self.respond(rid, Err(RequestError::Failed { reason, detail })),
            ServerToClient::LoginOk { rid, .. }
            | ServerToClient::UserList { rid, .. }
            | ServerToClient::ConnectPending { rid, .. }
            | ServerToClient::Pong { rid, .. }
            | ServerToClient::Ok { rid } => self.respond(rid, Ok(msg)),
            ServerToClient::ConnectRequested {
                intro_id,
                name,
                identity,
            } => self.events.push_back(LinkEvent::ConnectRequested {
                intro_id,
                name,
                identity,
            }),
            ServerToClient::ConnectFailed {
                intro_id,
                name,
                reason,
            } => self.events.push_back(LinkEvent::ConnectFailed {
                intro_id,
                name,
                reason,
            }),
            ServerToClient::Punch(p) => self.events.push_back(LinkEvent::Punch(p)),
            ServerToClient::Push { push_id, msg } => {
                self.send(ClientToServer::PushAck { push_id });
                if self.seen_pushes.contains(&push_id) {
                    return;
                }
                if self.seen_pushes.len() >= SEEN_PUSHES {
                    self.seen_pushes.pop_front();
                }
                self.seen_pushes.push_back(push_id);
                self.on_message(now, *msg);
            }
        }
    }

    fn respond(&mut self, rid: u32, result: Result<ServerToClient, RequestError>) {
        if self.inflight.remove(&rid).is_some() {
            self.events.push_back(LinkEvent::Response { rid, result });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern of every handshake initiation the link sent.
    fn patterns(link: &mut ServerLink) -> Vec<Pattern> {
        std::iter::from_fn(|| link.poll_transmit())
            .filter_map(|t| match Packet::decode(&t.payload) {
                Ok(Packet::HandshakeInit { pattern, .. }) => Some(pattern),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_way_that_keeps_changing_still_probes_a_stale_key_with_xx() {
        let t0 = Instant::now();
        let mut config = ClientConfig::new("192.0.2.1:7000".parse().unwrap());
        // A pinned key the server no longer has: IK never gets an answer.
        config.server_key = Some(Identity::generate().noise_public());
        let mut link = ServerLink::new(Identity::generate(), config, t0, 1);
        link.handle_timeout(t0);
        // The way to the server changes (TCP, back to UDP, …) before any
        // handshake's retry comes due.
        for i in 1..=4u32 {
            link.way_changed(t0 + Duration::from_millis(500) * i);
        }
        let sent = patterns(&mut link);
        assert_eq!(
            sent,
            [
                Pattern::IK,
                Pattern::IK,
                Pattern::IK,
                Pattern::XX,
                Pattern::XX
            ],
            "XX after {IK_ATTEMPTS_BEFORE_PROBE} IK attempts"
        );
    }
}
