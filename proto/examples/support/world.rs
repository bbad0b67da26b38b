#![allow(dead_code)] // each example uses part of it
//! The simulated world of the server load examples (`return_storm`,
//! `handshake_flood`): clients (sans-IO nodes) and one rendezvous server
//! in virtual time, 20 ms each way. The server is one core: each datagram
//! costs it the real CPU time its handling took here, datagrams that
//! arrive while it is busy wait in its socket buffer (212 KiB, Linux's
//! default), and what does not fit is dropped, as the kernel would.
//! A flood source can add datagrams from random addresses at a set rate.

use proto::wire::Packet;
use proto::{LinkState, MemoryStore, NoFiles, Node, Server};
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const LATENCY: Duration = Duration::from_millis(20);

pub type Flight = (Instant, u64, SocketAddr, SocketAddr, Vec<u8>);

#[derive(Default, Clone, Copy)]
pub struct Second {
    pub inits: u32,
    pub datagrams: u32,
    pub bytes: u64,
    pub cpu: Duration,
    pub dropped: u32,
    /// Datagrams from the flood source among them.
    pub flood: u32,
}

/// The server's receive buffer (net.core.rmem_default on Linux).
pub const SOCKET_BUFFER: usize = 212_992;

/// Datagrams (`bytes`) from random addresses in 10.128.0.0/9 at `rate`
/// a second until `until`.
pub struct Flood {
    pub rate: f64,
    pub until: Instant,
    pub next: Instant,
    pub bytes: Vec<u8>,
    pub rng: rand::rngs::StdRng,
    /// Bytes the flood sent, and the server sent back to its addresses.
    pub sent: u64,
    pub answered: u64,
}

impl Flood {
    pub fn new(rate: f64, from: Instant, until: Instant, bytes: Vec<u8>) -> Self {
        Flood {
            rate,
            until,
            next: from,
            bytes,
            rng: rand::rngs::StdRng::seed_from_u64(99),
            sent: 0,
            answered: 0,
        }
    }

    fn source(&mut self) -> SocketAddr {
        let n: u32 = self.rng.gen_range(0..1 << 23);
        SocketAddr::from((
            [10, 128 | (n >> 16) as u8, (n >> 8) as u8, n as u8],
            1 + (n % 60_000) as u16,
        ))
    }

    pub fn is_source(a: &SocketAddr) -> bool {
        matches!(a, SocketAddr::V4(v4) if v4.ip().octets()[0] == 10 && v4.ip().octets()[1] >= 128)
    }
}

pub struct World {
    pub now: Instant,
    pub server: Option<Server>,
    pub server_addr: SocketAddr,
    pub store: MemoryStore,
    pub nodes: Vec<Node<NoFiles>>,
    pub addrs: Vec<SocketAddr>,
    pub by_addr: BTreeMap<SocketAddr, usize>,
    /// Datagrams in flight: (arrival, sequence, from, to, bytes).
    pub wire: BinaryHeap<Reverse<Flight>>,
    /// The server is handling datagrams until then; what waits in its
    /// socket buffer, and the bytes of it.
    pub busy_until: Instant,
    pub buffer: std::collections::VecDeque<(SocketAddr, Vec<u8>)>,
    pub queued: usize,
    pub timers: BinaryHeap<Reverse<(Instant, usize)>>,
    pub seq: u64,
    /// What the server saw, by second since `mark`.
    pub mark: Instant,
    pub seconds: BTreeMap<u64, Second>,
    /// Datagrams from random addresses at a set rate, if any.
    pub flood: Option<Flood>,
    /// When each client was last seen logged in for the first time since
    /// `mark` (its login latency is measured from the moment it was told
    /// of a change).
    pub logged_in_at: Vec<Option<Instant>>,
    /// Each client's user listings (`NodeEvent::Users`), kept for the
    /// caller.
    pub events: Vec<Vec<proto::NodeEvent>>,
    /// Server CPU spent on datagrams from these addresses.
    pub watch: std::collections::BTreeSet<SocketAddr>,
    pub watched_cpu: Duration,
}

impl World {
    pub fn drain_node(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        loop {
            let mut any = false;
            while let Some(e) = node.poll_event() {
                any = true;
                if matches!(e, proto::NodeEvent::LoggedIn { .. }) && self.logged_in_at[i].is_none()
                {
                    self.logged_in_at[i] = Some(now);
                }
                if matches!(e, proto::NodeEvent::Users { .. }) {
                    self.events[i].push(e);
                }
            }
            while let Some(t) = node.poll_transmit(now) {
                any = true;
                self.seq += 1;
                self.wire.push(Reverse((
                    now + LATENCY,
                    self.seq,
                    self.addrs[i],
                    t.dst,
                    t.payload,
                )));
            }
            if !any {
                break;
            }
        }
        if let Some(t) = node.poll_timeout() {
            self.timers.push(Reverse((t.max(now), i)));
        }
    }

    /// Adds `n` clients at 100.64.0.0/10, each registering `user{i:06}`
    /// (the server's key pinned) at a random moment in the first `spread`
    /// of the world's time.
    pub fn add_clients(
        &mut self,
        n: usize,
        server_key: [u8; 32],
        spread: Duration,
        rng: &mut impl Rng,
    ) {
        let start = self.now;
        for i in 0..n {
            let addr =
                SocketAddr::from(([100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8], 4000));
            let mut c = proto::NodeConfig::new(self.server_addr);
            c.client.server_key = Some(server_key);
            let at = start + spread.mul_f64(rng.gen::<f64>());
            let mut node = Node::new(proto::Identity::generate(), c, at, rng.gen(), NoFiles);
            node.register(at, &format!("user{i:06}"));
            self.nodes.push(node);
            self.addrs.push(addr);
            self.by_addr.insert(addr, i);
            self.timers.push(Reverse((at, i)));
        }
    }

    /// A world of `n` clients (added by the caller) and `server`.
    pub fn new(start: Instant, server: Server, server_addr: SocketAddr, n: usize) -> Self {
        World {
            now: start,
            server: Some(server),
            server_addr,
            store: MemoryStore::default(),
            nodes: Vec::with_capacity(n),
            addrs: Vec::with_capacity(n),
            by_addr: BTreeMap::new(),
            wire: BinaryHeap::new(),
            busy_until: start,
            buffer: std::collections::VecDeque::new(),
            queued: 0,
            timers: BinaryHeap::new(),
            seq: 0,
            mark: start,
            seconds: BTreeMap::new(),
            flood: None,
            logged_in_at: vec![None; n],
            events: vec![Vec::new(); n],
            watch: Default::default(),
            watched_cpu: Duration::ZERO,
        }
    }

    /// The server handles one datagram now; it is busy for as long as
    /// that took.
    pub fn serve(&mut self, from: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let t = Instant::now();
        server.handle_datagram(now, from, bytes, &mut self.store);
        let cost = t.elapsed();
        if self.watch.contains(&from) {
            self.watched_cpu += cost;
        }
        self.busy_until = now + cost;
        let second = now.saturating_duration_since(self.mark).as_secs();
        self.seconds.entry(second).or_default().cpu += cost;
        self.drain_server();
    }

    fn drain_server(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        while let Some(t) = server.poll_transmit() {
            self.seq += 1;
            // Answers leave when the server is done with what caused them.
            self.wire.push(Reverse((
                self.busy_until.max(self.now) + LATENCY,
                self.seq,
                self.server_addr,
                t.dst,
                t.payload,
            )));
        }
    }

    /// Runs until `until`, or until `done` holds.
    pub fn run(&mut self, until: Instant, mut done: impl FnMut(&World) -> bool) {
        while !done(self) {
            let next_wire = self.wire.peek().map(|Reverse(w)| w.0);
            let next_timer = self.timers.peek().map(|Reverse(t)| t.0);
            let server_timer = self.server.as_ref().and_then(|s| s.poll_timeout());
            let next_buffered = (!self.buffer.is_empty()).then_some(self.busy_until);
            let next_flood = self
                .flood
                .as_ref()
                .filter(|f| f.next < f.until)
                .map(|f| f.next);
            let Some(next) = [
                next_wire,
                next_timer,
                server_timer,
                next_buffered,
                next_flood,
            ]
            .into_iter()
            .flatten()
            .min() else {
                return;
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(next);
            let now = self.now;
            let second = now.saturating_duration_since(self.mark).as_secs();
            if next_buffered == Some(next) {
                // The server takes the next datagram from its buffer.
                let (from, bytes) = self.buffer.pop_front().expect("not empty");
                self.queued -= bytes.len();
                self.serve(from, &bytes);
            } else if next_wire == Some(next) || next_flood == Some(next) {
                let (from, to, bytes) = if next_wire == Some(next) {
                    let Reverse((_, _, from, to, bytes)) = self.wire.pop().expect("peeked");
                    (from, to, bytes)
                } else {
                    let f = self.flood.as_mut().expect("flooding");
                    f.next += Duration::from_secs_f64(1.0 / f.rate);
                    f.sent += f.bytes.len() as u64;
                    self.seconds.entry(second).or_default().flood += 1;
                    (f.source(), self.server_addr, f.bytes.clone())
                };
                if Flood::is_source(&to) {
                    if let Some(f) = self.flood.as_mut() {
                        f.answered += bytes.len() as u64;
                    }
                    continue;
                }
                if to == self.server_addr {
                    if self.server.is_none() {
                        continue;
                    }
                    let s = self.seconds.entry(second).or_default();
                    s.datagrams += 1;
                    s.bytes += bytes.len() as u64;
                    if matches!(Packet::decode(&bytes), Ok(Packet::HandshakeInit { .. })) {
                        s.inits += 1;
                    }
                    if self.busy_until > now || !self.buffer.is_empty() {
                        // Busy: the datagram waits in the socket buffer,
                        // or is dropped when that is full.
                        if self.queued + bytes.len() > SOCKET_BUFFER {
                            s.dropped += 1;
                        } else {
                            self.queued += bytes.len();
                            self.buffer.push_back((from, bytes));
                        }
                        continue;
                    }
                    self.serve(from, &bytes);
                } else if let Some(&i) = self.by_addr.get(&to) {
                    self.nodes[i].handle_datagram(now, from, &bytes);
                    self.drain_node(i);
                }
            } else if next_timer == Some(next) {
                let Reverse((_, i)) = self.timers.pop().expect("peeked");
                // Stale entries (the node's deadline moved) are harmless:
                // a node woken early does nothing and says its next one.
                if self.nodes[i].poll_timeout().is_some_and(|t| t <= now) {
                    self.nodes[i].handle_timeout(now);
                }
                self.drain_node(i);
            } else if let Some(server) = self.server.as_mut() {
                let t = Instant::now();
                server.handle_timeout(now);
                let second = now.saturating_duration_since(self.mark).as_secs();
                self.seconds.entry(second).or_default().cpu += t.elapsed();
                self.drain_server();
            }
        }
    }

    pub fn logged_in(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.link_state() == LinkState::LoggedIn)
            .count()
    }

    pub fn report(&self, title: &str) {
        println!("\n{title}");
        println!(
            "{:>4} {:>9} {:>10} {:>10} {:>10} {:>8}",
            "s", "inits", "datagrams", "KB", "server ms", "dropped"
        );
        for (s, v) in &self.seconds {
            println!(
                "{:>4} {:>9} {:>10} {:>10.0} {:>10.1} {:>8}",
                s,
                v.inits,
                v.datagrams,
                v.bytes as f64 / 1024.0,
                v.cpu.as_secs_f64() * 1000.0,
                v.dropped
            );
        }
        let total: Second = self
            .seconds
            .values()
            .fold(Second::default(), |a, v| Second {
                inits: a.inits + v.inits,
                datagrams: a.datagrams + v.datagrams,
                bytes: a.bytes + v.bytes,
                cpu: a.cpu + v.cpu,
                dropped: a.dropped + v.dropped,
                flood: a.flood + v.flood,
            });
        println!(
            "total: {} inits for {} clients, {} datagrams ({} dropped), {:.0} KB, server CPU {:.0} ms ({:.0} µs per client); {} logged in after {:.1} s",
            total.inits,
            self.nodes.len(),
            total.datagrams,
            total.dropped,
            total.bytes as f64 / 1024.0,
            total.cpu.as_secs_f64() * 1000.0,
            total.cpu.as_secs_f64() * 1e6 / self.nodes.len() as f64,
            self.logged_in(),
            self.now.saturating_duration_since(self.mark).as_secs_f64(),
        );
    }
}
