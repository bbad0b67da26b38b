//! What the rendezvous server sees when thousands of clients come back at
//! once: N nodes logged in to one server, then either the server is gone
//! for a while and returns (every client has been retrying with its
//! jittered backoff), or every client's network comes back within one
//! second (each is told of the change at a random moment in it).
//!
//!     cargo run --release -p proto --example return_storm -- [N] [DOWN_S]
//!
//! The machines run sans-IO in virtual time (20 ms each way). The server
//! is one core: each datagram costs it the real CPU time its handling
//! took here, datagrams that arrive while it is busy wait in its socket
//! buffer (212 KiB, Linux's default), and what does not fit is dropped,
//! as the kernel would. Prints, per second after the return: handshake
//! initiations the server received, datagrams, bytes, its busy time and
//! drops; then how long until every client was logged in again.

use proto::wire::Packet;
use proto::{Identity, LinkState, MemoryStore, NoFiles, Node, NodeConfig, Server, ServerConfig};
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const LATENCY: Duration = Duration::from_millis(20);

type Flight = (Instant, u64, SocketAddr, SocketAddr, Vec<u8>);

#[derive(Default, Clone, Copy)]
struct Second {
    inits: u32,
    datagrams: u32,
    bytes: u64,
    cpu: Duration,
    dropped: u32,
}

/// The server's receive buffer (net.core.rmem_default on Linux).
const SOCKET_BUFFER: usize = 212_992;

struct World {
    now: Instant,
    server: Option<Server>,
    server_addr: SocketAddr,
    store: MemoryStore,
    nodes: Vec<Node<NoFiles>>,
    addrs: Vec<SocketAddr>,
    by_addr: BTreeMap<SocketAddr, usize>,
    /// Datagrams in flight: (arrival, sequence, from, to, bytes).
    wire: BinaryHeap<Reverse<Flight>>,
    /// The server is handling datagrams until then; what waits in its
    /// socket buffer, and the bytes of it.
    busy_until: Instant,
    buffer: std::collections::VecDeque<(SocketAddr, Vec<u8>)>,
    queued: usize,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    seq: u64,
    /// What the server saw, by second since `mark`.
    mark: Instant,
    seconds: BTreeMap<u64, Second>,
}

impl World {
    fn drain_node(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        loop {
            let mut any = false;
            while node.poll_event().is_some() {
                any = true;
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

    /// The server handles one datagram now; it is busy for as long as
    /// that took.
    fn serve(&mut self, from: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let t = Instant::now();
        server.handle_datagram(now, from, bytes, &mut self.store);
        let cost = t.elapsed();
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
    fn run(&mut self, until: Instant, mut done: impl FnMut(&World) -> bool) {
        while !done(self) {
            let next_wire = self.wire.peek().map(|Reverse(w)| w.0);
            let next_timer = self.timers.peek().map(|Reverse(t)| t.0);
            let server_timer = self.server.as_ref().and_then(|s| s.poll_timeout());
            let next_buffered = (!self.buffer.is_empty()).then_some(self.busy_until);
            let Some(next) = [next_wire, next_timer, server_timer, next_buffered]
                .into_iter()
                .flatten()
                .min()
            else {
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
            } else if next_wire == Some(next) {
                let Reverse((_, _, from, to, bytes)) = self.wire.pop().expect("peeked");
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

    fn logged_in(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.link_state() == LinkState::LoggedIn)
            .count()
    }

    fn report(&self, title: &str) {
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

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let down: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(120);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let start = Instant::now();
    let server_id = Identity::generate();
    let server_addr: SocketAddr = "10.0.0.1:7000".parse().unwrap();
    let config = ServerConfig {
        max_sessions: n * 2 + 1000,
        ..ServerConfig::default()
    };
    let mut world = World {
        now: start,
        server: Some(Server::new(server_id.clone(), config.clone(), 1)),
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
    };
    // Everyone registers over the first 30 s (not measured), then is
    // logged in and heartbeating (25 s).
    for i in 0..n {
        let addr = SocketAddr::from(([100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8], 4000));
        let mut c = NodeConfig::new(server_addr);
        c.client.server_key = Some(server_id.noise_public());
        let at = start + Duration::from_millis(rng.gen_range(0..30_000));
        let mut node = Node::new(Identity::generate(), c, at, rng.gen(), NoFiles);
        node.register(at, &format!("user{i}"));
        world.nodes.push(node);
        world.addrs.push(addr);
        world.by_addr.insert(addr, i);
        world.timers.push(Reverse((at, i)));
    }
    let setup = start + Duration::from_secs(90);
    world.run(setup, |w| w.now >= setup);
    println!(
        "{n} clients registered and logged in: {}",
        world.logged_in()
    );

    // 1. The server process is gone for DOWN_S seconds, then starts again
    //    (same key, same accounts, no sessions).
    world.server = None;
    let back = world.now + Duration::from_secs(down);
    world.run(back, |w| w.now >= back);
    world.server = Some(Server::new(server_id.clone(), config.clone(), 2));
    world.mark = world.now;
    world.seconds.clear();
    let limit = world.now + Duration::from_secs(120);
    world.run(limit, |w| w.logged_in() == n);
    world.report(&format!(
        "server gone for {down} s, then back: what it sees, by second after its return"
    ));

    // 2. Every client's network comes back within one second (each told
    //    at a random moment in it): they check the link at once.
    world.mark = world.now;
    world.seconds.clear();
    // The server lost its sessions at the same moment (it restarted too):
    // every check meets "session unknown" and logs in again.
    world.server = Some(Server::new(server_id, config, 3));
    let t0 = world.now;
    let mut notices: Vec<(Instant, usize)> = (0..n)
        .map(|i| (t0 + Duration::from_millis(rng.gen_range(0..1000)), i))
        .collect();
    notices.sort();
    for (at, i) in notices {
        world.run(at, |w| w.now >= at);
        world.nodes[i].handle_network_change(at);
        world.drain_node(i);
    }
    let limit = world.now + Duration::from_secs(120);
    world.run(limit, |w| w.logged_in() == n);
    world.report("every client's network back within 1 s, server restarted: by second");
}
