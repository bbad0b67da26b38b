//! Which way each datagram leaves, and when to change ways: the policy
//! of the node's transports, sans-IO. The daemon owns the sockets and the
//! TCP connection; these machines decide what it opens, closes and sends
//! through which, and it reports back what happened.
//!
//! * [`ServerTransport`]: UDP to the rendezvous server, or TCP when the
//!   network drops UDP. While the server link is still connecting and
//!   the server has sent nothing over UDP for [`TCP_FALLBACK_AFTER`], a
//!   TCP connection is asked for (with backoff after failures). While on
//!   TCP, a NAT probe goes to the server over UDP after [`UDP_RETRY_MIN`],
//!   then at doubling intervals up to [`UDP_RETRY`]; an answer moves the
//!   link back to UDP.
//! * [`Predictor`]: the hard side of port prediction (the birthday
//!   technique; see [`crate::peer::Prediction`]). A round asks for
//!   [`PREDICTION_PORTS`] extra sockets and sends a punch probe from each
//!   to the peer once a second; the first socket a probe of the peer
//!   reaches is adopted, and what goes to that peer leaves through it
//!   from then on. The round's other sockets are closed when it ends.

use crate::peer::PREDICTION_PORTS;
use crate::wire::Packet;
use crate::Transmit;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Which way a datagram leaves, or came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Via {
    /// The main UDP socket.
    #[default]
    Udp,
    /// An extra UDP socket the node asked for ([`TransportCommand::OpenSockets`]).
    Socket(u32),
    /// The TCP connection to the rendezvous server.
    ServerTcp,
}

/// What the node asks of the daemon's transports (as
/// [`crate::node::NodeEvent::Transport`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportCommand {
    /// Open a TCP connection to `server` (replacing any other) and report
    /// with [`crate::node::Node::handle_tcp_up`] or
    /// [`crate::node::Node::handle_tcp_down`]; frames it carries come in
    /// as datagrams [`Via::ServerTcp`].
    ConnectTcp { server: SocketAddr },
    /// Close the TCP connection to the server.
    CloseTcp,
    /// Bind UDP sockets (like the main one, on any port) with these ids.
    /// One that cannot be bound is simply missing: what is sent through
    /// it is lost, as on a lossy path.
    OpenSockets { first: u32, count: u32 },
    /// Close these extra sockets.
    CloseSockets { ids: Vec<u32> },
}

/// The link still connecting and not a datagram from the server over UDP
/// for this long: try TCP. Three handshake attempts fit in it, so a
/// server that is only slow or lossy is not taken for a blocked network.
pub const TCP_FALLBACK_AFTER: Duration = Duration::from_secs(3);
/// Backoff between failed TCP connections, doubling up to the maximum.
pub const TCP_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const TCP_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While on TCP, a UDP probe to the server this often; an answer moves the
/// link back to UDP (a server restart or a network change may have been
/// all it was).
pub const UDP_RETRY: Duration = Duration::from_secs(30);
/// The first UDP probe after moving to TCP: a firewall rule lifted, a
/// captive portal passed, is noticed in seconds; the interval doubles up
/// to [`UDP_RETRY`] (a 40-byte probe, six of them in the first minute).
pub const UDP_RETRY_MIN: Duration = Duration::from_secs(2);
/// UDP that served this long since the last move back from TCP counts as
/// settled: a later move to TCP probes from [`UDP_RETRY_MIN`] again
/// (sooner, the interval goes on doubling from where it was).
pub const UDP_SETTLED: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tcp {
    Closed,
    Connecting,
    Up,
}

/// UDP or TCP to the rendezvous server.
#[derive(Debug)]
pub struct ServerTransport {
    server: SocketAddr,
    tcp: Tcp,
    /// When the server last sent us a datagram over UDP (or when UDP got
    /// its last chance).
    udp_heard: Instant,
    /// Since when the server link has been trying to connect, if it is.
    connecting_since: Option<Instant>,
    tcp_retry_at: Instant,
    tcp_backoff: Duration,
    /// While on TCP: when to ask the server over UDP again, and the
    /// interval after that.
    udp_retry_at: Option<Instant>,
    udp_retry: Duration,
    /// When the link last moved back from TCP to UDP.
    udp_back: Option<Instant>,
    /// The nonce of our last UDP probe while on TCP.
    udp_probe: Option<u64>,
    commands: VecDeque<TransportCommand>,
    transmits: VecDeque<Transmit>,
    /// Log in again: the way to the server changed.
    relogin: bool,
}

impl ServerTransport {
    pub fn new(server: SocketAddr, now: Instant) -> Self {
        Self {
            server,
            tcp: Tcp::Closed,
            udp_heard: now,
            connecting_since: None,
            tcp_retry_at: now,
            tcp_backoff: TCP_BACKOFF_MIN,
            udp_retry_at: None,
            udp_retry: UDP_RETRY_MIN,
            udp_back: None,
            udp_probe: None,
            commands: VecDeque::new(),
            transmits: VecDeque::new(),
            relogin: false,
        }
    }

    /// Datagrams to the server go this way.
    pub fn via(&self) -> Via {
        if self.tcp == Tcp::Up {
            Via::ServerTcp
        } else {
            Via::Udp
        }
    }

    pub fn on_tcp(&self) -> bool {
        self.tcp == Tcp::Up
    }

    /// A datagram from the server arrived over UDP.
    pub fn on_udp_datagram(&mut self, now: Instant, packet: &Packet<'_>) {
        self.udp_heard = now;
        let ours =
            matches!(packet, Packet::ProbeReply { nonce, .. } if Some(*nonce) == self.udp_probe);
        if self.tcp == Tcp::Up && ours {
            tracing::info!("SERVER(UDP_BACK_LEAVE_TCP)");
            self.udp_back = Some(now);
            self.udp_probe = None;
            self.udp_retry_at = None;
            self.tcp = Tcp::Closed;
            self.commands.push_back(TransportCommand::CloseTcp);
            self.relogin = true;
        }
    }

    pub fn on_tcp_up(&mut self, now: Instant) {
        if self.tcp != Tcp::Connecting {
            return;
        }
        tracing::info!(server = %self.server, "SERVER(TCP_UP)");
        self.tcp = Tcp::Up;
        // The probes start over at UDP_RETRY_MIN only after UDP served us
        // a while: a network whose UDP comes and goes does not make us
        // switch every few seconds.
        if self
            .udp_back
            .is_none_or(|t| now.saturating_duration_since(t) >= UDP_SETTLED)
        {
            self.udp_retry = UDP_RETRY_MIN;
        }
        self.udp_retry_at = Some(now + self.udp_retry);
        self.tcp_backoff = TCP_BACKOFF_MIN;
        // Handshake again at once, now over TCP.
        self.relogin = true;
    }

    pub fn on_tcp_down(&mut self, now: Instant, why: &str) {
        if self.tcp == Tcp::Closed {
            return;
        }
        tracing::info!(%why, "SERVER(TCP_DOWN)");
        let was_up = self.tcp == Tcp::Up;
        self.tcp = Tcp::Closed;
        self.udp_retry_at = None;
        // UDP gets another chance before the next TCP attempt.
        self.udp_heard = now;
        self.tcp_retry_at = now + self.tcp_backoff;
        self.tcp_backoff = (self.tcp_backoff * 2).min(TCP_BACKOFF_MAX);
        self.relogin |= was_up;
    }

    /// The server link gave up for good (the server's key changed): no
    /// TCP, no probes, no timers, until a new link.
    pub fn halt(&mut self) {
        if self.tcp != Tcp::Closed {
            self.commands.push_back(TransportCommand::CloseTcp);
        }
        self.tcp = Tcp::Closed;
        self.connecting_since = None;
        self.udp_retry_at = None;
        self.udp_probe = None;
    }

    /// The server did not answer a check made because a peer's path was
    /// in doubt too: both ways out are silent, so UDP itself is likely
    /// blocked. Try TCP now (unless on it, or backing off from a failed
    /// attempt) instead of after heartbeats time out; the link stays as
    /// it is, and moves to TCP when the connection is up.
    pub fn udp_suspect(&mut self, now: Instant) {
        if self.tcp != Tcp::Closed || self.tcp_retry_at > now {
            return;
        }
        tracing::info!(server = %self.server, "SERVER(UDP_CHECK_FAILED_TRY_TCP)");
        self.tcp = Tcp::Connecting;
        self.commands.push_back(TransportCommand::ConnectTcp {
            server: self.server,
        });
    }

    /// Whether the server link is trying to connect (it has no session).
    pub fn set_connecting(&mut self, now: Instant, connecting: bool) {
        match (connecting, self.connecting_since) {
            (true, None) => self.connecting_since = Some(now),
            (false, Some(_)) => self.connecting_since = None,
            _ => {}
        }
    }

    /// When to try TCP, if UDP to the server seems blocked: the link has
    /// been connecting, and UDP from the server silent, for
    /// [`TCP_FALLBACK_AFTER`] (after a backoff, if TCP failed before).
    fn fallback_at(&self) -> Option<Instant> {
        let since = self.connecting_since.filter(|_| self.tcp == Tcp::Closed)?;
        let silent_since = self.udp_heard.max(since);
        Some((silent_since + TCP_FALLBACK_AFTER).max(self.tcp_retry_at))
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.fallback_at(), self.udp_retry_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// `nonce` is drawn by the caller, in case a probe is due.
    pub fn handle_timeout(&mut self, now: Instant, nonce: u64) {
        if self.fallback_at().is_some_and(|t| t <= now) {
            tracing::info!(server = %self.server, "SERVER(UDP_SILENT_TRY_TCP)");
            self.tcp = Tcp::Connecting;
            self.commands.push_back(TransportCommand::ConnectTcp {
                server: self.server,
            });
        }
        if self.udp_retry_at.is_some_and(|t| t <= now) {
            self.udp_retry = (self.udp_retry * 2).min(UDP_RETRY);
            self.udp_retry_at = Some(now + self.udp_retry);
            self.udp_probe = Some(nonce);
            self.transmits.push_back(Transmit {
                dst: self.server,
                payload: Packet::Probe { nonce }.encode(),
                via: Via::Udp,
            });
        }
    }

    /// Whether the way to the server changed so that the link must log in
    /// again (once).
    pub fn take_relogin(&mut self) -> bool {
        std::mem::take(&mut self.relogin)
    }

    pub fn poll_command(&mut self) -> Option<TransportCommand> {
        self.commands.pop_front()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }
}

/// How long a round keeps its sockets open and probing.
pub const PREDICTION_ROUND: Duration = Duration::from_secs(8);
/// Probes from every socket this often while the round lasts.
pub const PREDICTION_PROBE_EVERY: Duration = Duration::from_secs(1);
/// Rounds at once; a further request is skipped (each holds hundreds of
/// sockets).
pub const MAX_PREDICTION_ROUNDS: usize = 2;
/// Adopted sockets kept; the oldest goes first.
pub const MAX_ADOPTED: usize = 16;

#[derive(Debug)]
struct Round {
    intro_id: u64,
    dst: SocketAddr,
    until: Instant,
    next_probe: Instant,
    sockets: Vec<u32>,
}

/// The hard side of port prediction: extra sockets, by id.
#[derive(Debug, Default)]
pub struct Predictor {
    next_id: u32,
    rounds: Vec<Round>,
    /// Peer endpoint → (the adopted socket that reaches it, when adopted).
    routes: BTreeMap<SocketAddr, (u32, Instant)>,
    commands: VecDeque<TransportCommand>,
    transmits: VecDeque<Transmit>,
}

impl Predictor {
    /// Opens a round toward `dst` for introduction `intro_id`; its first
    /// probes go at once.
    pub fn start(&mut self, now: Instant, dst: SocketAddr, intro_id: u64) {
        if self.rounds.len() >= MAX_PREDICTION_ROUNDS
            || self.rounds.iter().any(|r| r.intro_id == intro_id)
        {
            tracing::debug!(%dst, "PREDICT(ROUND_SKIPPED)");
            return;
        }
        let count = PREDICTION_PORTS as u32;
        let first = self.next_id;
        self.next_id = self.next_id.wrapping_add(count);
        tracing::info!(%dst, sockets = count, "PREDICT(OPEN_PORTS)");
        self.commands
            .push_back(TransportCommand::OpenSockets { first, count });
        self.rounds.push(Round {
            intro_id,
            dst,
            until: now + PREDICTION_ROUND,
            next_probe: now,
            sockets: (0..count).map(|i| first.wrapping_add(i)).collect(),
        });
        self.handle_timeout(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.rounds.iter().map(|r| r.next_probe.min(r.until)).min()
    }

    /// Sends due probes; ends rounds whose time is up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let (ended, going): (Vec<Round>, Vec<Round>) = std::mem::take(&mut self.rounds)
            .into_iter()
            .partition(|r| now >= r.until);
        self.rounds = going;
        for r in ended {
            tracing::debug!(dst = %r.dst, "PREDICT(ROUND_OVER)");
            if !r.sockets.is_empty() {
                self.commands
                    .push_back(TransportCommand::CloseSockets { ids: r.sockets });
            }
        }
        for r in self.rounds.iter_mut().filter(|r| now >= r.next_probe) {
            r.next_probe = now + PREDICTION_PROBE_EVERY;
            let probe = Packet::Punch {
                intro_id: r.intro_id,
                reply: false,
            }
            .encode();
            for id in &r.sockets {
                self.transmits.push_back(Transmit {
                    dst: r.dst,
                    payload: probe.clone(),
                    via: Via::Socket(*id),
                });
            }
        }
    }

    /// A datagram arrived on extra socket `id`: on a round's socket, only
    /// the peer's probe (it knows the introduction id) from the peer's
    /// address counts, and adopts the socket for that address. Returns
    /// whether the node should take the datagram.
    pub fn on_datagram(
        &mut self,
        now: Instant,
        id: u32,
        from: SocketAddr,
        packet: &Packet<'_>,
    ) -> bool {
        if self.routes.values().any(|(s, _)| *s == id) {
            return true;
        }
        let Some(r) = self.rounds.iter_mut().find(|r| r.sockets.contains(&id)) else {
            return false; // a socket no longer ours
        };
        match packet {
            Packet::Punch { intro_id, .. } if *intro_id == r.intro_id && from == r.dst => {}
            _ => return false,
        }
        r.sockets.retain(|s| *s != id);
        tracing::info!(%from, "PREDICT(PORT_FOUND)");
        if let Some((old, _)) = self.routes.insert(from, (id, now)) {
            self.commands
                .push_back(TransportCommand::CloseSockets { ids: vec![old] });
        }
        if self.routes.len() > MAX_ADOPTED {
            let oldest = self
                .routes
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(a, (s, _))| (*a, *s));
            if let Some((addr, old)) = oldest {
                self.routes.remove(&addr);
                self.commands
                    .push_back(TransportCommand::CloseSockets { ids: vec![old] });
            }
        }
        true
    }

    /// The adopted socket that reaches `dst`, if there is one.
    pub fn route(&self, dst: SocketAddr) -> Option<Via> {
        self.routes.get(&dst).map(|(id, _)| Via::Socket(*id))
    }

    pub fn is_predicted(&self, endpoint: SocketAddr) -> bool {
        self.routes.contains_key(&endpoint)
    }

    pub fn poll_command(&mut self) -> Option<TransportCommand> {
        self.commands.pop_front()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> SocketAddr {
        "192.0.2.1:7000".parse().unwrap()
    }

    #[test]
    fn silent_udp_while_connecting_tries_tcp_with_backoff() {
        let t0 = Instant::now();
        let mut t = ServerTransport::new(server(), t0);
        // Logged in over UDP: no fallback, ever.
        assert_eq!(t.poll_timeout(), None);
        // Connecting from 10 s on, the server silent for longer: TCP after
        // 3 s of connecting, not at once.
        let t0 = t0 + Duration::from_secs(10);
        t.set_connecting(t0, true);
        assert_eq!(t.poll_timeout(), Some(t0 + TCP_FALLBACK_AFTER));
        t.handle_timeout(t0 + Duration::from_secs(1), 1);
        assert_eq!(t.poll_command(), None, "not yet");
        let t1 = t0 + TCP_FALLBACK_AFTER;
        t.handle_timeout(t1, 1);
        assert_eq!(
            t.poll_command(),
            Some(TransportCommand::ConnectTcp { server: server() })
        );
        assert_eq!(t.via(), Via::Udp, "not before it is up");
        // It fails: UDP gets another chance, then TCP again after 1 s,
        // then 2 s, doubling.
        t.on_tcp_down(t1, "refused");
        assert_eq!(t.poll_timeout(), Some(t1 + TCP_FALLBACK_AFTER));
        let t2 = t1 + TCP_FALLBACK_AFTER;
        t.handle_timeout(t2, 1);
        assert!(matches!(
            t.poll_command(),
            Some(TransportCommand::ConnectTcp { .. })
        ));
        t.on_tcp_down(t2, "refused");
        t.handle_timeout(t2 + TCP_FALLBACK_AFTER, 1);
        assert!(matches!(
            t.poll_command(),
            Some(TransportCommand::ConnectTcp { .. })
        ));
        t.on_tcp_down(t2 + TCP_FALLBACK_AFTER, "refused");
        // Third failure: the backoff (4 s) outlasts the UDP chance (3 s).
        let t3 = t2 + TCP_FALLBACK_AFTER;
        assert_eq!(t.poll_timeout(), Some(t3 + Duration::from_secs(4)));
        assert!(!t.take_relogin(), "never up: nothing to log in again for");
    }

    #[test]
    fn udp_that_keeps_coming_and_going_is_probed_less_and_less() {
        let t0 = Instant::now();
        let mut t = ServerTransport::new(server(), t0);
        let observed = "198.51.100.1:1".parse().unwrap();
        let mut now = t0;
        let mut first_probe = Vec::new();
        for cycle in 0..4u64 {
            // To TCP, then the first UDP probe is answered: back to UDP.
            t.udp_suspect(now);
            assert!(matches!(
                t.poll_command(),
                Some(TransportCommand::ConnectTcp { .. })
            ));
            t.on_tcp_up(now);
            let due = t.poll_timeout().expect("a UDP probe is due");
            first_probe.push((due - now).as_secs());
            t.handle_timeout(due, cycle);
            t.poll_transmit().expect("the probe");
            t.on_udp_datagram(
                due,
                &Packet::ProbeReply {
                    nonce: cycle,
                    observed,
                },
            );
            assert_eq!(t.via(), Via::Udp);
            let _ = t.poll_command();
            now = due + Duration::from_secs(10);
        }
        // The interval goes on doubling from where it was.
        assert_eq!(first_probe, [2, 4, 8, 16]);
        // After UDP served five minutes, a move starts over at 2 s.
        now += UDP_SETTLED;
        t.udp_suspect(now);
        t.on_tcp_up(now);
        assert_eq!(t.poll_timeout(), Some(now + UDP_RETRY_MIN));
    }

    #[test]
    fn on_tcp_udp_is_probed_and_an_answer_moves_back() {
        let t0 = Instant::now();
        let mut t = ServerTransport::new(server(), t0);
        t.set_connecting(t0, true);
        t.handle_timeout(t0 + TCP_FALLBACK_AFTER, 0);
        assert!(t.poll_command().is_some());
        let up = t0 + TCP_FALLBACK_AFTER;
        t.on_tcp_up(up);
        assert_eq!(t.via(), Via::ServerTcp);
        assert!(t.take_relogin(), "handshake again over TCP");
        t.set_connecting(up, false);
        // Probes at 2, 6, 14, 30, 60, 90 s: doubling up to UDP_RETRY.
        let mut at = up;
        let mut gaps = Vec::new();
        for nonce in 0..6 {
            let next = t.poll_timeout().expect("a probe is due");
            gaps.push((next - at).as_secs());
            at = next;
            t.handle_timeout(at, nonce);
            assert!(t.poll_transmit().is_some());
        }
        assert_eq!(gaps, [2, 4, 8, 16, 30, 30]);
        let up = at;
        t.handle_timeout(up + UDP_RETRY, 77);
        let probe = t.poll_transmit().expect("a UDP probe");
        assert_eq!(probe.via, Via::Udp);
        assert_eq!(
            Packet::decode(&probe.payload),
            Ok(Packet::Probe { nonce: 77 })
        );
        // Another nonce is not ours.
        let observed = "198.51.100.1:1".parse().unwrap();
        t.on_udp_datagram(up + UDP_RETRY, &Packet::ProbeReply { nonce: 5, observed });
        assert_eq!(t.via(), Via::ServerTcp);
        t.on_udp_datagram(
            up + UDP_RETRY,
            &Packet::ProbeReply {
                nonce: 77,
                observed,
            },
        );
        assert_eq!(t.via(), Via::Udp);
        assert_eq!(t.poll_command(), Some(TransportCommand::CloseTcp));
        assert!(t.take_relogin());
    }

    #[test]
    fn a_prediction_round_probes_adopts_one_socket_and_closes_the_rest() {
        let t0 = Instant::now();
        let peer: SocketAddr = "203.0.113.5:4000".parse().unwrap();
        let mut p = Predictor::default();
        p.start(t0, peer, 9);
        assert_eq!(
            p.poll_command(),
            Some(TransportCommand::OpenSockets {
                first: 0,
                count: PREDICTION_PORTS as u32
            })
        );
        let probes: Vec<Transmit> = std::iter::from_fn(|| p.poll_transmit()).collect();
        assert_eq!(probes.len(), PREDICTION_PORTS);
        assert!(probes.iter().all(|t| t.dst == peer));
        // Once a second while the round lasts.
        assert_eq!(p.poll_timeout(), Some(t0 + PREDICTION_PROBE_EVERY));
        // Strangers and wrong introductions adopt nothing.
        let stranger: SocketAddr = "203.0.113.6:4000".parse().unwrap();
        let punch = |intro_id| Packet::Punch {
            intro_id,
            reply: false,
        };
        assert!(!p.on_datagram(t0, 3, stranger, &punch(9)));
        assert!(!p.on_datagram(t0, 3, peer, &punch(8)));
        assert!(!p.on_datagram(
            t0,
            3,
            peer,
            &Packet::SessionUnknown {
                receiver: 1,
                token: [0; 16]
            }
        ));
        assert_eq!(p.route(peer), None);
        // The peer's probe adopts socket 3.
        assert!(p.on_datagram(t0, 3, peer, &punch(9)));
        assert_eq!(p.route(peer), Some(Via::Socket(3)));
        // After that, anything on it is taken.
        assert!(p.on_datagram(
            t0,
            3,
            peer,
            &Packet::SessionUnknown {
                receiver: 1,
                token: [0; 16]
            }
        ));
        // The round ends: every socket but the adopted one is closed.
        p.handle_timeout(t0 + PREDICTION_ROUND);
        let _ = std::iter::from_fn(|| p.poll_transmit()).count();
        match p.poll_command() {
            Some(TransportCommand::CloseSockets { ids }) => {
                assert_eq!(ids.len(), PREDICTION_PORTS - 1);
                assert!(!ids.contains(&3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(p.route(peer), Some(Via::Socket(3)));
    }

    #[test]
    fn at_most_two_rounds_and_sixteen_adopted_sockets() {
        let t0 = Instant::now();
        let mut p = Predictor::default();
        for i in 0..3 {
            p.start(t0, format!("203.0.113.{}:4000", i + 1).parse().unwrap(), i);
        }
        let opened = std::iter::from_fn(|| p.poll_command()).count();
        assert_eq!(opened, MAX_PREDICTION_ROUNDS);
        let mut closed = Vec::new();
        let mut t = t0;
        for i in 0..(MAX_ADOPTED as u64 + 4) {
            t += PREDICTION_ROUND;
            p.handle_timeout(t);
            let peer: SocketAddr = format!("198.51.100.{}:4000", i + 1).parse().unwrap();
            p.start(t, peer, 100 + i);
            let first = match std::iter::from_fn(|| p.poll_command()).find_map(|c| match c {
                TransportCommand::OpenSockets { first, .. } => Some(first),
                TransportCommand::CloseSockets { ids } => {
                    closed.extend(ids);
                    None
                }
                _ => None,
            }) {
                Some(f) => f,
                None => continue,
            };
            let punch = Packet::Punch {
                intro_id: 100 + i,
                reply: false,
            };
            assert!(p.on_datagram(t, first, peer, &punch));
        }
        while let Some(c) = p.poll_command() {
            if let TransportCommand::CloseSockets { ids } = c {
                closed.extend(ids);
            }
        }
        assert_eq!(p.routes.len(), MAX_ADOPTED);
    }
}
