//! `attack`: the hostile-internet attacks, rerun against the release
//! binaries on loopback, each printing the bound it meets now. Run it
//! through `scripts/bench-attacks.sh`, which builds them.
//!
//!     attack [ATTACK ...]
//!
//! Attacks (all by default):
//! - `amplify` (D1): a registered client sends one of its authenticated
//!   requests from a victim's address while another user asks to connect
//!   to it (a notice the server resends until acknowledged): bytes the
//!   victim got for the bytes "it" sent.
//! - `garbage`: random datagrams, plausible headers of every packet type
//!   and handshake initiations from one address: bytes back for bytes in.
//! - `flood` (D4): spoofed XX initiations from 65,000 loopback addresses
//!   at `ATTACK_RATE` a second (100,000) for 10 s while 20 users log in
//!   again: their success and login time, the server's CPU and peak RSS.
//! - `register` (D9): 30 registrations from one address: how many go.
//! - `tcp` (D8): 1,000 TCP connections from 125 addresses sending empty
//!   frames: how many the server still holds after 35 s, and whether a
//!   newcomer gets in while the table is full.
//! - `offers` (D2, D3): a peer (a contact the daemon accepted) offers a
//!   16 MiB file in 1-byte pieces, then 20,000 files: what the daemon
//!   refuses, its peak RSS, and how long `p2pctl transfers` takes then.
//! - `nofile` (D10): two daemons under an open-file limit of 64 send
//!   and take a directory of 150 files: how many arrive.
//! - `disk` (D11, as root): the receiver's disk fills while a file is
//!   written: whether both sides pause, the daemon goes on, and the file
//!   arrives whole once there is room.
//! - `bidi` (D12): a peer's message with a right-to-left override: how
//!   `p2pctl history` shows it.
//! - `wire` (D6, D7; as root): an observer who sees the traffic (a raw
//!   socket) forges packets with what it saw and any source address: a
//!   "session unknown" for a live peer session, and relay packets on a
//!   party's secret channel id: whether the session ends, and what is
//!   forwarded.
//! - `transfers` (D3): a daemon with 100,000 transfer records: how long
//!   `p2pctl transfers`, its last page and a lookup by id prefix take.

use e2e::Lab;
use proto::wire::{Packet, Pattern};
use proto::{Identity, LinkState, NoFiles, Node, NodeConfig, NodeEvent};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const ALL: &[&str] = &[
    "amplify",
    "garbage",
    "register",
    "flood",
    "tcp",
    "offers",
    "transfers",
    "nofile",
    "disk",
    "bidi",
    "wire",
];

/// A client on the protocol's own node machine, over a blocking socket.
struct Client {
    node: Node<NoFiles>,
    sock: UdpSocket,
    events: Vec<NodeEvent>,
    /// Takes datagrams from this address only (the server: no direct
    /// path to a peer, so a session goes through the relay).
    only_from: Option<SocketAddr>,
    /// Datagrams received with [`MARKER`] in them.
    marked: usize,
}

/// The payload of forged relay packets, to find them if forwarded.
const MARKER: [u8; 64] = [0x4d; 64];

impl Client {
    fn new(server: SocketAddr, key: [u8; 32], identity: Identity, name: Option<&str>) -> Self {
        Self::new_at("127.0.0.1:0", server, key, identity, name)
    }

    fn new_at(
        bind: &str,
        server: SocketAddr,
        key: [u8; 32],
        identity: Identity,
        name: Option<&str>,
    ) -> Self {
        let sock = UdpSocket::bind(bind).expect("bind");
        let mut c = NodeConfig::new(server);
        c.client.server_key = Some(key);
        c.client.name = name.map(str::to_owned);
        // (Its IK timestamps must grow across the clients of one key.)
        c.client.unix_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let node = Node::new(identity, c, Instant::now(), rand::random(), NoFiles);
        Client {
            node,
            sock,
            events: Vec::new(),
            only_from: None,
            marked: 0,
        }
    }

    /// Sends what the node has to send (through `via`, if given, instead
    /// of its own socket), and takes its events.
    fn flush(&mut self, via: Option<&UdpSocket>) -> usize {
        let now = Instant::now();
        let mut bytes = 0;
        while let Some(t) = self.node.poll_transmit(now) {
            bytes += t.payload.len();
            let _ = via.unwrap_or(&self.sock).send_to(&t.payload, t.dst);
        }
        while let Some(e) = self.node.poll_event() {
            self.events.push(e);
        }
        bytes
    }

    /// Runs the node for up to `limit`, or until `done`.
    fn run(&mut self, limit: Duration, done: impl Fn(&Client) -> bool) -> bool {
        let end = Instant::now() + limit;
        let mut buf = vec![0u8; 65_536];
        loop {
            self.flush(None);
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            let wait = self
                .node
                .poll_timeout()
                .map_or(Duration::from_millis(20), |t| {
                    t.saturating_duration_since(now)
                })
                .clamp(Duration::from_millis(1), Duration::from_millis(20));
            let _ = self.sock.set_read_timeout(Some(wait));
            if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
                if buf[..n].windows(MARKER.len()).any(|w| w == MARKER) {
                    self.marked += 1;
                }
                if self.only_from.is_none_or(|only| only == from) {
                    self.node.handle_datagram(Instant::now(), from, &buf[..n]);
                }
            }
            let now = Instant::now();
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
            }
        }
    }

    fn logged_in(&self) -> bool {
        self.node.link_state() == LinkState::LoggedIn
    }

    /// Registers `name` from `bind` and waits for the login.
    fn register_at(
        bind: &str,
        server: SocketAddr,
        key: [u8; 32],
        name: &str,
    ) -> (Client, Identity) {
        let id = Identity::generate();
        let mut c = Client::new_at(bind, server, key, id.clone(), Some(name));
        c.node.register(Instant::now(), name);
        assert!(
            c.run(Duration::from_secs(10), Client::logged_in),
            "{name} did not log in"
        );
        (c, id)
    }
}

/// The server's address and key, from a lab with a rendezvous running.
fn server_of(lab: &Lab) -> (SocketAddr, [u8; 32]) {
    let addr: SocketAddr = lab
        .server
        .clone()
        .expect("rendezvous")
        .parse()
        .expect("address");
    // The key: a first XX handshake shows it (trust on first use).
    let mut c = Client::new(addr, [0; 32], Identity::generate(), None);
    let mut cfg = NodeConfig::new(addr);
    cfg.client.server_key = None;
    c.node = Node::new(Identity::generate(), cfg, Instant::now(), 1, NoFiles);
    c.run(Duration::from_secs(10), |c| {
        c.events
            .iter()
            .any(|e| matches!(e, NodeEvent::ServerConnected { .. }))
    });
    let key = c
        .events
        .iter()
        .find_map(|e| match e {
            NodeEvent::ServerConnected { server_key, .. } => Some(*server_key),
            _ => None,
        })
        .expect("the server answered");
    (addr, key)
}

/// A real XX initiation (no cookie), under `sender`.
fn xx_init(sender: u32) -> Vec<u8> {
    let mut hs =
        proto::Handshake::initiator(Pattern::XX, Identity::generate().noise_private(), None)
            .expect("handshake");
    let noise = hs.write(&[]).expect("message");
    Packet::HandshakeInit {
        sender,
        pattern: Pattern::XX,
        noise: &noise,
        cookie: [0; 16],
    }
    .encode()
}

/// Bytes waiting on nonblocking `sock`, read and counted.
fn drain(sock: &UdpSocket, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while let Ok((len, _)) = sock.recv_from(buf) {
        n += len;
    }
    n
}

fn row(attack: &str, measured: &str, bound: String) {
    println!("| {attack} | {measured} | {bound} |");
}

fn amplify(lab: &Lab) {
    let (server, key) = server_of(lab);
    let tag = std::process::id();
    let (mut mallory, _) =
        Client::register_at("127.0.0.1:0", server, key, &format!("mallory{tag}"));
    let (mut eve, _) = Client::register_at("127.0.0.5:0", server, key, &format!("eve{tag}"));
    let victim = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    victim.set_nonblocking(true).expect("nonblocking");
    // One authenticated request, sent from the victim's address.
    mallory.node.list_users(Instant::now());
    let from_victim = mallory.flush(Some(&victim));
    std::thread::sleep(Duration::from_millis(50));
    // A notice for mallory, which the server resends until acknowledged.
    eve.node.connect(Instant::now(), &format!("mallory{tag}"));
    let end = Instant::now() + Duration::from_secs(12);
    let mut to_victim = 0;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < end {
        eve.run(Duration::from_millis(20), |_| false);
        mallory.run(Duration::from_millis(20), |_| false);
        to_victim += drain(&victim, &mut buf);
    }
    row(
        "D1 amplification through a registered client's session",
        "one authenticated request from the victim's address, then 12 s of the server's notices",
        format!(
            "{to_victim} bytes to the victim for {from_victim} from it ({:.2}x; limit 3x; was 102x)",
            to_victim as f64 / from_victim.max(1) as f64
        ),
    );
}

fn garbage(lab: &Lab) {
    let (server, _) = server_of(lab);
    let sock = UdpSocket::bind("127.0.0.3:0").expect("bind");
    sock.set_nonblocking(true).expect("nonblocking");
    let mut sent = 0;
    let mut got = 0;
    let mut buf = vec![0u8; 65_536];
    for i in 0..20_000u32 {
        let mut d: Vec<u8> = match i % 4 {
            0 => xx_init(i),
            _ => {
                let len = 2 + (rand::random::<u16>() % 1200) as usize;
                (0..len).map(|_| rand::random::<u8>()).collect()
            }
        };
        if i % 4 == 2 {
            // A plausible header: our version, some packet type.
            d[0] = proto::wire::VERSION;
            d[1] = (i % 12) as u8;
        }
        sent += d.len();
        let _ = sock.send_to(&d, server);
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        got += drain(&sock, &mut buf);
    }
    std::thread::sleep(Duration::from_millis(500));
    got += drain(&sock, &mut buf);
    row(
        "unauthenticated amplification",
        "20,000 datagrams from one address: random, plausible headers, XX initiations",
        format!(
            "{got} bytes back for {sent} ({:.2}x; limit 1x)",
            got as f64 / sent.max(1) as f64
        ),
    );
}

fn register(lab: &Lab) {
    let (server, key) = server_of(lab);
    let tag = std::process::id();
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..30 {
        // All from one address (ports differ).
        let mut c = Client::new_at("127.0.0.4:0", server, key, Identity::generate(), None);
        c.node.register(Instant::now(), &format!("r{tag}x{i}"));
        c.run(Duration::from_secs(5), |c| {
            c.events
                .iter()
                .any(|e| matches!(e, NodeEvent::Response { .. }))
        });
        for e in &c.events {
            match e {
                NodeEvent::Response { result: Ok(_), .. } => ok += 1,
                NodeEvent::Response {
                    result: Err(proto::RequestError::Failed { reason, .. }),
                    ..
                } if *reason == proto::wire::FailReason::RateLimited => limited += 1,
                _ => {}
            }
        }
    }
    row(
        "D9 registrations from one address",
        "30 registrations in a row from 127.0.0.4",
        format!("{ok} registered, {limited} refused \"try again in N s\" (burst 5, then 20 an hour; was unlimited)"),
    );
}

/// /proc/PID/stat's user + system time, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime), counted from after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn flood(lab: &Lab) {
    let (server, key) = server_of(lab);
    let rate: f64 = std::env::var("ATTACK_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000.0);
    let tag = std::process::id();
    let users: Vec<(String, Identity)> = (0..20)
        .map(|i| {
            let name = format!("u{tag}x{i}");
            // (Each from its own address: registrations are limited per
            // address.)
            let (c, id) = Client::register_at(&format!("127.0.6.{}:0", i + 1), server, key, &name);
            drop(c);
            (name, id)
        })
        .collect();
    let pid = lab.pid("rendezvous");
    let rss_before = peak_rss_mib(pid);
    let cpu_before = cpu_seconds(pid);
    let secs = 10.0;
    let flood = std::thread::spawn(move || {
        let socks: Vec<UdpSocket> = (1..=254u8)
            .flat_map(|b| (0..4).map(move |_| b))
            .filter_map(|b| UdpSocket::bind(SocketAddr::from(([127, 1, b, 1 + b % 200], 0))).ok())
            .collect();
        let init = xx_init(7);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut k = 0;
        while start.elapsed().as_secs_f64() < secs {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            while sent < due {
                let _ = socks[k % socks.len()].send_to(&init, server);
                k += 1;
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        (sent, start.elapsed().as_secs_f64(), socks.len())
    });
    std::thread::sleep(Duration::from_secs(2));
    // Every user logs in again (a new process: a new session), in turn.
    let mut times = Vec::new();
    let mut failed = 0;
    for (name, id) in &users {
        let mut c = Client::new(server, key, id.clone(), Some(name));
        let t = Instant::now();
        if c.run(Duration::from_secs(5), Client::logged_in) {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        } else {
            failed += 1;
        }
    }
    let (sent, took, sources) = flood.join().expect("flood thread");
    let cpu = cpu_seconds(pid) - cpu_before;
    let rss = peak_rss_mib(pid);
    times.sort_by(f64::total_cmp);
    let p = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    row(
        "D4 handshake flood",
        &format!(
            "{:.0} spoofed XX initiations a second for {took:.0} s from {sources} sockets on 254 loopback addresses; 20 users log in meanwhile",
            sent as f64 / took
        ),
        format!(
            "{} of 20 logged in (login p50 {:.1} ms, max {:.1} ms); server CPU {:.0} % of a core; server peak RSS {rss_before:.0} → {rss:.0} MiB",
            times.len(),
            p(0.5),
            times.last().copied().unwrap_or(f64::NAN),
            cpu / took * 100.0
        ),
    );
    let _ = failed;
}

fn tcp(lab: &Lab) {
    let (server, _) = server_of(lab);
    let connect_from = |src: [u8; 4]| -> Option<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        s.bind(&SocketAddr::from((src, 0)).into()).ok()?;
        s.connect_timeout(&server.into(), Duration::from_secs(2))
            .ok()?;
        Some(s.into())
    };
    let mut conns = Vec::new();
    for a in 0..125u8 {
        for _ in 0..8 {
            if let Some(s) = connect_from([127, 2, 0, a + 1]) {
                conns.push(s);
            }
        }
    }
    let opened = conns.len();
    std::thread::sleep(Duration::from_millis(500));
    // The table is full of connections that never logged in: a newcomer.
    let newcomer = connect_from([127, 3, 0, 1]);
    std::thread::sleep(Duration::from_millis(500));
    let newcomer_in = newcomer.is_some_and(|s| alive(&s));
    // Empty frames every second for 35 s.
    let end = Instant::now() + Duration::from_secs(35);
    while Instant::now() < end {
        for c in &conns {
            use std::io::Write;
            let _ = (&*c).write_all(&[0, 0]);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let held = conns.iter().filter(|c| alive(c)).count();
    row(
        "D8 TCP slots held by empty frames",
        &format!("{opened} connections from 125 addresses (8 each), empty frames every second"),
        format!(
            "{held} of {opened} still open after 35 s (login grace 30 s); a newcomer while full: {} (was: all 1000 held, newcomers refused)",
            if newcomer_in { "got in" } else { "REFUSED" }
        ),
    );
}

/// Whether the server still holds `s` open (a read would not say EOF).
fn alive(s: &TcpStream) -> bool {
    use std::io::Read;
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 64];
    let open = loop {
        match (&*s).read(&mut b) {
            Ok(0) => break false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
            Err(_) => break false,
        }
    };
    let _ = s.set_nonblocking(false);
    open
}

fn offers(lab: &mut Lab) {
    let (server, key) = server_of(lab);
    let tag = std::process::id();
    let victim = format!("v{tag}");
    lab.start_daemon("v");
    lab.ctl("v", &["register", &victim]).ok();
    let (mut mallory, _) = Client::register_at("127.0.0.7:0", server, key, &format!("m{tag}"));
    mallory.node.connect(Instant::now(), &victim);
    let mallory_name = format!("m{tag}");
    lab.wait_for("mallory's request", Duration::from_secs(20), |lab| {
        mallory.run(Duration::from_millis(50), |_| false);
        let peers = lab.ctl("v", &["--json", "peers"]).json();
        (peers["requests"][0]["name"] == mallory_name.as_str()).then_some(())
    });
    // (`accept` waits for the session: mallory must answer meanwhile.)
    let socket = lab.socket("v");
    let name = mallory_name.clone();
    let accept = std::thread::spawn(move || e2e::p2pctl(&socket, &["accept", &name], None));
    while !accept.is_finished() {
        mallory.run(Duration::from_millis(50), |_| false);
    }
    accept.join().expect("accept").ok();
    assert!(
        mallory.run(Duration::from_secs(20), |c| c.node.is_up(&victim)),
        "no session with the daemon"
    );
    let pid = lab.pid("v");
    let rss_before = peak_rss_mib(pid);
    let ended = |c: &Client, id: u64| {
        c.events.iter().find_map(|e| match e {
            NodeEvent::Transfer {
                event: proto::TransferEvent::Ended { id: i, reason },
                ..
            } if i.0 == id => Some(reason.clone()),
            _ => None,
        })
    };
    let desc = |id: u64, size: u64, piece_size: u32| proto::FileDesc {
        id: proto::TransferId(id),
        path: format!("f{id}.bin"),
        size,
        piece_size,
        hash: [0; 32],
        group: None,
    };
    // 16 MiB in 1-byte pieces.
    mallory
        .node
        .offer_file(Instant::now(), &victim, desc(1, 16 << 20, 1), Vec::new());
    mallory.run(Duration::from_secs(10), |c| ended(c, 1).is_some());
    let tiny = ended(&mallory, 1).unwrap_or_else(|| "NOT REFUSED".into());
    // 20,000 offers, as fast as the flow takes them.
    for id in 100..20_100u64 {
        mallory
            .node
            .offer_file(Instant::now(), &victim, desc(id, 10, 10), Vec::new());
    }
    let count_ended = |c: &Client| {
        c.events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    NodeEvent::Transfer {
                        event: proto::TransferEvent::Ended { .. },
                        ..
                    }
                )
            })
            .count()
    };
    let t = Instant::now();
    mallory.run(Duration::from_secs(60), |c| count_ended(c) > 10_000);
    let took = t.elapsed().as_secs_f64();
    let refused = count_ended(&mallory).saturating_sub(1);
    let reason = (100..20_100u64)
        .find_map(|id| ended(&mallory, id))
        .unwrap_or_default();
    let t = Instant::now();
    let page = lab.ctl("v", &["transfers", "--json"]);
    let list_ms = t.elapsed().as_secs_f64() * 1000.0;
    let shown = page.json().as_array().map_or(0, |a| a.len());
    let rss = peak_rss_mib(pid);
    row(
        "D2 an offer in 1-byte pieces",
        "a contact offers 16 MiB in 2^24 pieces",
        format!("refused before any allocation: \"{tiny}\" (was 1.07 GB RSS to accept)"),
    );
    row(
        "D3 20,000 offers from one peer",
        "a contact offers 20,000 small files at once",
        format!(
            "{refused} refused in {took:.1} s (\"{reason}\"), the first 10,000 wait for an answer; `p2pctl transfers` {list_ms:.0} ms ({shown} shown, paged); daemon peak RSS {rss_before:.0} → {rss:.0} MiB (was: blocked 62 s)"
        ),
    );
    lab.stop("v");
}

fn transfers(lab: &mut Lab) {
    lab.start_daemon("t");
    assert_eq!(lab.stop("t"), 0);
    let db = lab.dir.join("t").join("p2pd.db");
    {
        let mut conn = rusqlite::Connection::open(&db).expect("daemon database");
        let tx = conn.transaction().expect("transaction");
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO transfers (id, peer, direction, name, size, piece_size, hash, state, created_ms) \
                     VALUES (?1, 'mallory', 'in', ?2, 1000, 1000, zeroblob(32), ?3, ?4)",
                )
                .expect("insert");
            for i in 0..100_000i64 {
                let state = if i % 10 == 0 { "offered" } else { "ended" };
                insert
                    .execute(rusqlite::params![
                        0x1000_0000_0000_0000i64 + i * 7919,
                        format!("file{i}"),
                        state,
                        1_700_000_000_000i64 + i
                    ])
                    .expect("row");
            }
        }
        tx.commit().expect("commit");
    }
    lab.start_daemon_in(
        None,
        "t",
        &["--listen", "127.0.0.1:0", "--keep-transfers", "0"],
    );
    let timed = |lab: &Lab, args: &[&str]| {
        let t = Instant::now();
        let out = lab.ctl("t", args);
        assert_eq!(out.code, 0, "{out:?}");
        t.elapsed().as_secs_f64() * 1000.0
    };
    // (Each includes p2pctl's own start and the socket round trip.)
    let ping = timed(lab, &["whoami"]);
    let first = timed(lab, &["transfers", "--json"]);
    let last = timed(lab, &["transfers", "--json", "--offset", "99900"]);
    let lookup = timed(lab, &["cancel", "1000000000013"]);
    row(
        "D3 a daemon with 100,000 transfer records",
        "`p2pctl transfers` (first page, 100), its last page, and a cancel by id prefix, each a whole p2pctl run",
        format!("{first:.1} ms, {last:.1} ms and {lookup:.1} ms (a bare `whoami`: {ping:.1} ms; was 62 s for 20,000)"),
    );
    lab.stop("t");
}

fn nofile() {
    let mut lab = Lab::connected_pair_limited("anofile", Some(64));
    let src = lab.dir.join("out").join("many");
    for i in 0..150u64 {
        let sub = src.join(format!("d{}", i % 7));
        std::fs::create_dir_all(&sub).expect("dir");
        std::fs::write(sub.join(format!("f{i}.txt")), e2e::content(i, 5_000)).expect("file");
    }
    let socket = lab.socket("a");
    let path = src.display().to_string();
    let sender =
        std::thread::spawn(move || e2e::p2pctl(&socket, &["send-file", "bob", &path], None));
    let group = lab.wait_for("the offer", Duration::from_secs(60), |lab| {
        e2e::transfers(lab, "b")
            .into_iter()
            .find(|t| t["state"] == "offered")
            .and_then(|t| t["group"].as_str().map(str::to_owned))
    });
    let inbox = lab.dir.join("inbox");
    lab.ctl(
        "b",
        &["accept-file", &group, "--to", inbox.to_str().unwrap()],
    );
    let sent = sender.join().expect("sender");
    let arrived = walk_count(&inbox.join("many"));
    let log = std::fs::read_to_string(lab.dir.join("b.log")).unwrap_or_default();
    let max_open = log
        .split("max_open=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    row(
        "D10 a low open-file limit",
        "both daemons limited to 64 descriptors; a directory of 150 files",
        format!(
            "{arrived} of 150 files arrived (send-file exit {}), with {max_open} partial files open at once (was: a fixed 64, every transfer failed)",
            sent.code
        ),
    );
}

fn disk() {
    let mut lab = Lab::connected_pair("adisk");
    let inbox = lab.dir.join("small");
    let Some(_tmpfs) = e2e::Tmpfs::mount(&inbox, "16m") else {
        row(
            "D11 a full disk",
            "(needs root: a small file system)",
            "not run".into(),
        );
        return;
    };
    let data = e2e::content(11, 4 << 20);
    let src = lab.dir.join("big.iso");
    std::fs::write(&src, &data).expect("file");
    let socket = lab.socket("a");
    let path = src.display().to_string();
    let sender =
        std::thread::spawn(move || e2e::p2pctl(&socket, &["send-file", "bob", &path], None));
    let state = |lab: &Lab, who: &str| {
        e2e::transfers(lab, who)
            .into_iter()
            .find(|t| t["name"] == "big.iso")
            .map(|t| t["state"].as_str().unwrap_or("").to_owned())
    };
    let id = lab.wait_for("the offer", Duration::from_secs(30), |lab| {
        e2e::transfers(lab, "b")
            .into_iter()
            .find(|t| t["state"] == "offered")
            .and_then(|t| t["id"].as_str().map(str::to_owned))
    });
    lab.signal("a", "STOP");
    lab.ctl(
        "b",
        &[
            "accept-file",
            &id,
            "--to",
            inbox.to_str().unwrap(),
            "--no-wait",
        ],
    );
    let filler = inbox.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 13 << 20]);
    lab.signal("a", "CONT");
    lab.wait_for("the pause", Duration::from_secs(30), |lab| {
        (state(lab, "b").as_deref() == Some("paused")
            && state(lab, "a").as_deref() == Some("paused"))
        .then_some(())
    });
    let alive = lab.ctl("b", &["whoami"]).code == 0;
    std::fs::remove_file(&filler).expect("filler");
    let t = Instant::now();
    lab.wait_for("the file", Duration::from_secs(60), |lab| {
        (state(lab, "b").as_deref() == Some("done")).then_some(())
    });
    let resumed = t.elapsed().as_secs_f64();
    let whole = std::fs::read(inbox.join("big.iso")).is_ok_and(|d| d == data);
    let sent = sender.join().expect("sender");
    row(
        "D11 the disk fills while a file is written",
        "a 16 MiB file system, filled after the receiver accepted a 4 MiB file",
        format!(
            "paused on both sides, the daemon answering: {alive}; room again: arrived {} {resumed:.1} s later, send-file exit {} (was: the daemon stopped at every start)",
            if whole { "whole" } else { "DAMAGED" },
            sent.code
        ),
    );
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk_count(&e.path()),
                Ok(t) if t.is_file() => 1,
                _ => 0,
            })
            .sum()
    })
}

fn bidi() {
    let mut lab = Lab::connected_pair("abidi");
    let text = "invoice\u{202e}fdp.exe";
    lab.ctl("a", &["send", "bob", text]).ok();
    let shown = lab.wait_for("the message", Duration::from_secs(30), |lab| {
        let h = lab.ctl("b", &["history", "alice"]);
        h.stdout
            .lines()
            .find(|l| l.contains("invoice"))
            .map(str::to_owned)
    });
    let json = lab.ctl("b", &["--json", "history", "alice"]).stdout;
    row(
        "D12 a right-to-left override in a peer's text",
        "alice sends \"invoice<U+202E>fdp.exe\" (shows as \"invoiceexe.pdf\" unescaped)",
        format!(
            "`p2pctl history` shows `{}`; `--json` keeps the character exact: {}",
            shown.trim(),
            json.contains('\u{202e}')
        ),
    );
}

/// Raw IPv4 sockets (root only): one sees a copy of every UDP datagram
/// the host receives, the other sends UDP datagrams from any address.
struct Wire {
    sniff: UdpSocket,
    spoof: socket2::Socket,
}

impl Wire {
    fn open() -> Option<Wire> {
        use socket2::{Domain, Protocol, Socket, Type};
        let raw = Type::from(libc::SOCK_RAW);
        let sniff = Socket::new(Domain::IPV4, raw, Some(Protocol::UDP)).ok()?;
        // (IPPROTO_RAW: the caller writes the IP header.)
        let spoof = Socket::new(Domain::IPV4, raw, Some(Protocol::from(libc::IPPROTO_RAW))).ok()?;
        let sniff = UdpSocket::from(std::os::fd::OwnedFd::from(sniff));
        sniff
            .set_read_timeout(Some(Duration::from_millis(20)))
            .ok()?;
        Some(Wire { sniff, spoof })
    }

    /// The next UDP datagram seen (within 20 ms): source, destination
    /// and payload.
    fn next(&self, buf: &mut [u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
        let n = self.sniff.recv(buf).ok()?;
        let ihl = usize::from(buf.first()? & 0x0f) * 4;
        let udp = buf.get(ihl..n).filter(|u| u.len() >= 8)?;
        let ip = |o: usize| std::net::Ipv4Addr::new(buf[o], buf[o + 1], buf[o + 2], buf[o + 3]);
        let port = |o: usize| u16::from_be_bytes([udp[o], udp[o + 1]]);
        Some((
            SocketAddr::from((ip(12), port(0))),
            SocketAddr::from((ip(16), port(2))),
            udp[8..].to_vec(),
        ))
    }

    /// Forgets what was seen so far.
    fn clear(&self, buf: &mut [u8]) {
        while self.sniff.recv(buf).is_ok() {}
    }

    /// Waits up to `limit` for a datagram `from` → `to` that `pick` takes.
    fn find<T>(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        limit: Duration,
        mut pick: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let mut buf = vec![0u8; 65_536];
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some((f, t, p)) = self.next(&mut buf) {
                if (f, t) == (from, to) {
                    if let Some(v) = pick(&p) {
                        return Some(v);
                    }
                }
            }
        }
        None
    }

    /// Sends `payload` to `to` with `from` as its source.
    fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> usize {
        let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
            return 0;
        };
        let total = u16::try_from(28 + payload.len()).expect("a datagram");
        let mut d = Vec::with_capacity(usize::from(total));
        d.extend_from_slice(&[0x45, 0]);
        d.extend_from_slice(&total.to_be_bytes());
        // Id, don't fragment, TTL, UDP, the header checksum (the kernel's).
        d.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        d.extend_from_slice(&from.ip().octets());
        d.extend_from_slice(&to.ip().octets());
        d.extend_from_slice(&from.port().to_be_bytes());
        d.extend_from_slice(&to.port().to_be_bytes());
        d.extend_from_slice(&(total - 20).to_be_bytes());
        // No UDP checksum (allowed over IPv4).
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(payload);
        let dst = socket2::SockAddr::from(SocketAddr::V4(to));
        self.spoof.send_to(&d, &dst).map_or(0, |_| payload.len())
    }
}

fn wire(lab: &Lab) {
    let Some(wire) = Wire::open() else {
        for attack in ["D6 a forged \"session unknown\"", "D7 forged relay packets"] {
            row(attack, "(needs root: raw sockets)", "not run".into());
        }
        return;
    };
    session_unknown(&wire);
    relay(lab, &wire);
}

/// D6: "session unknown" for a live session, as if from the peer.
fn session_unknown(wire: &Wire) {
    let mut lab = Lab::connected_pair("awire");
    let endpoint = |lab: &Lab, who: &str, peer: &str| -> SocketAddr {
        let p = lab.ctl(who, &["--json", "peers"]).json();
        p["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|x| x["name"] == peer))
            .and_then(|x| x["endpoint"].as_str())
            .and_then(|s| s.parse().ok())
            .expect("a direct endpoint")
    };
    let (alice, bob) = (endpoint(&lab, "b", "alice"), endpoint(&lab, "a", "bob"));
    lab.watch("a");
    // Alice's packets to bob name bob's index for the session: the one a
    // "session unknown" from bob names.
    wire.clear(&mut vec![0u8; 65_536]);
    lab.ctl("a", &["send", "bob", "one"]).ok();
    let receiver = wire
        .find(
            alice,
            bob,
            Duration::from_secs(10),
            |p| match Packet::decode(p) {
                Ok(Packet::Data { receiver, .. }) => Some(receiver),
                _ => None,
            },
        )
        .expect("a data packet from alice to bob");
    let before = lab.watched("a").len();
    let forged = 1_000;
    for _ in 0..forged {
        let token: [u8; 16] = rand::random();
        wire.send(
            bob,
            alice,
            &Packet::SessionUnknown { receiver, token }.encode(),
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    let changed = lab.watched("a")[before..]
        .iter()
        .filter(|e| {
            ["peer_down", "peer_up", "path_changed"].contains(&e["event"].as_str().unwrap_or(""))
        })
        .count();
    let sent = Instant::now();
    lab.ctl("a", &["send", "bob", "after the forgeries"]).ok();
    lab.wait_for("the next message", Duration::from_secs(30), |lab| {
        let h = lab.ctl("b", &["history", "alice"]).stdout;
        h.contains("after the forgeries").then_some(())
    });
    row(
        "D6 a forged \"session unknown\"",
        &format!("{forged} \"session unknown\" packets from bob's address (spoofed) with the session's index seen on the wire, random reset tokens"),
        format!(
            "alice's session events after them: {changed}; her next message in bob's history {:.0} ms later (was: the session torn down)",
            sent.elapsed().as_secs_f64() * 1e3
        ),
    );
}

/// D7: relay packets on a party's channel id, from elsewhere.
fn relay(lab: &Lab, wire: &Wire) {
    let (server, key) = server_of(lab);
    let tag = std::process::id();
    let (an, bn) = (format!("ra{tag}"), format!("rb{tag}"));
    let (mut a, _) = Client::register_at("127.0.0.10:0", server, key, &an);
    let (mut b, _) = Client::register_at("127.0.0.11:0", server, key, &bn);
    a.only_from = Some(server);
    b.only_from = Some(server);
    let pump = |a: &mut Client, b: &mut Client| {
        a.run(Duration::from_millis(10), |_| false);
        b.run(Duration::from_millis(10), |_| false);
    };
    a.node.connect(Instant::now(), &bn);
    let end = Instant::now() + Duration::from_secs(30);
    while b.node.pending_requests().is_empty() && Instant::now() < end {
        pump(&mut a, &mut b);
    }
    b.node.answer(Instant::now(), &an, true).expect("a request");
    while !(a.node.is_up(&bn) && b.node.is_up(&an)) {
        assert!(Instant::now() < end, "no relayed session");
        pump(&mut a, &mut b);
    }
    let (a_addr, b_addr) = (
        a.sock.local_addr().expect("address"),
        b.sock.local_addr().expect("address"),
    );
    // Bob's channel id, from his relayed packets to the server.
    wire.clear(&mut vec![0u8; 65_536]);
    let mut seq = 0;
    let mut channel = None;
    while channel.is_none() {
        assert!(Instant::now() < end, "no relay packet seen");
        seq += 1;
        let body = b"to alice".to_vec();
        b.node.send_message(
            Instant::now(),
            &an,
            proto::ChatMessage {
                seq,
                sent_ms: 0,
                body,
            },
        );
        pump(&mut a, &mut b);
        channel = wire.find(
            b_addr,
            server,
            Duration::from_millis(50),
            |p| match Packet::decode(p) {
                Ok(Packet::Relay { channel, .. }) => Some(channel),
                _ => None,
            },
        );
    }
    let channel = channel.expect("seen");
    let stranger = UdpSocket::bind("127.0.0.12:0").expect("bind 127.0.0.12");
    stranger.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; 65_536];
    let (mut to_stranger, mut from_stranger) = (0, 0);
    let payload = [MARKER; 10].concat();
    let (marked_a, marked_b) = (a.marked, b.marked);
    let each = 300;
    for i in 0..each {
        let forged = Packet::Relay {
            channel,
            payload: &payload,
        }
        .encode();
        wire.send(a_addr, server, &forged);
        from_stranger += stranger.send_to(&forged, server).unwrap_or(0);
        let random = Packet::Relay {
            channel: rand::random(),
            payload: &payload,
        }
        .encode();
        wire.send(a_addr, server, &random);
        if i % 10 == 0 {
            pump(&mut a, &mut b);
        }
        to_stranger += drain(&stranger, &mut buf);
    }
    for _ in 0..50 {
        pump(&mut a, &mut b);
        to_stranger += drain(&stranger, &mut buf);
    }
    let forwarded = a.marked + b.marked - marked_a - marked_b;
    // The control: the same packet from bob's own address is his, and
    // forwarded (so the count above would see a forwarded one).
    wire.send(
        b_addr,
        server,
        &Packet::Relay {
            channel,
            payload: &payload,
        }
        .encode(),
    );
    for _ in 0..20 {
        pump(&mut a, &mut b);
    }
    let control = a.marked + b.marked - marked_a - marked_b - forwarded;
    // The relayed session still carries messages.
    let delivered = |c: &Client| {
        c.events
            .iter()
            .filter(|e| matches!(e, NodeEvent::Delivered { .. }))
            .count()
    };
    let before = delivered(&a);
    seq += 1;
    b.node.send_message(
        Instant::now(),
        &an,
        proto::ChatMessage {
            seq,
            sent_ms: 0,
            body: b"after".to_vec(),
        },
    );
    let end = Instant::now() + Duration::from_secs(5);
    while delivered(&a) == before && Instant::now() < end {
        pump(&mut a, &mut b);
    }
    let got = delivered(&a) > before;
    row(
        "D7 forged relay packets",
        &format!("with bob's secret relay channel id seen on the wire: {each} from alice's address (spoofed), {each} from a stranger's, and {each} on random ids (600 B each)"),
        format!(
            "{forwarded} forwarded (the same from bob's own address: {control} forwarded); the stranger got {to_stranger} bytes for {from_stranger} ({:.2}x: a path challenge); the relayed session's next message delivered: {got} (was: charged to and forwarded as the spoofed address)",
            to_stranger as f64 / from_stranger.max(1) as f64
        ),
    );
}

fn main() {
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let run = |a: &str| wanted.is_empty() || wanted.iter().any(|w| w == a);
    for w in &wanted {
        assert!(
            ALL.contains(&w.as_str()),
            "unknown attack {w}; one of {ALL:?}"
        );
    }
    let mut lab = Lab::new("attack");
    lab.start_rendezvous();
    println!("| attack | what was done | bound now |");
    println!("|---|---|---|");
    if run("amplify") {
        amplify(&lab);
    }
    if run("garbage") {
        garbage(&lab);
    }
    if run("register") {
        register(&lab);
    }
    if run("flood") {
        flood(&lab);
    }
    if run("tcp") {
        tcp(&lab);
    }
    if run("offers") {
        offers(&mut lab);
    }
    if run("transfers") {
        transfers(&mut lab);
    }
    if run("nofile") {
        nofile();
    }
    if run("disk") {
        disk();
    }
    if run("bidi") {
        bidi();
    }
    if run("wire") {
        wire(&lab);
    }
    // The server's own counters, from its log at shutdown.
    lab.stop("rendezvous");
    let log = std::fs::read_to_string(lab.dir.join("rendezvous.log")).unwrap_or_default();
    if let Some(stats) = log.lines().rev().find(|l| l.contains("STATS")) {
        let fields = stats.split_once("STATS").map_or(stats, |(_, f)| f);
        println!("\nrendezvous STATS at shutdown:{fields}");
    }
}
