//! `bench-lab`: file transfer through the NAT lab over an impaired path,
//! for `docs/benchmarks.md`. Needs root (network namespaces, nftables,
//! TUN); run it through `scripts/bench-files-lossy.sh`, which builds the
//! release binaries it starts.
//!
//! Two home routers whose WAN links go through `linkem` (12 ms each way
//! on each link: a 50 ms round trip between the hosts, plus what the
//! hosts add; `LOSS` percent lost on each link in each direction, so
//! about twice that end to end), alice sends bob a file of `SIZE` MiB.
//!
//! With a third argument `RATE` (Mbit/s), alice's router sends no faster
//! than that (`tc tbf`), and a TCP flow from alice's host to the public
//! segment shares that bottleneck while the file goes: the figures show
//! how the two split it. `BENCH_QUEUE_MS` sets the bottleneck's queue
//! (default 100 ms at that rate); `BENCH_NO_TCP=1` leaves the TCP flow out;
//! `BENCH_SHARE_CC` is its congestion control (default `cubic`).
//! Without `RATE`, kernel TCP then sends the same bytes from alice's host
//! to bob's over the same links (through a port forwarded on bob's
//! router), with each congestion control in `BENCH_TCP_CC` (default
//! `bbr`; `bbr,cubic` for both, `none` for neither), for the ratio.
//! `BENCH_RELAY=1` puts both hosts behind symmetric NATs: the file goes
//! through the rendezvous server's relay (its per-user rate limit, 2 MB/s
//! by default, then bounds it).
//!
//!     bench-lab [SIZE_MIB] [LOSS_PCT] [RATE_MBIT]

use e2e::natlab::{Nat, Net, SERVER_V4};
use e2e::Lab;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let loss: String = args.next().unwrap_or_else(|| "0.5".into());
    let rate: Option<u32> = args.next().and_then(|a| a.parse().ok());
    let Some(mut net) = Net::new("bench") else {
        eprintln!("bench-lab: the NAT lab cannot run here (see above)");
        std::process::exit(2);
    };
    let impair = ["--delay-ms", "12", "--loss-pct", loss.as_str()];
    // BENCH_RELAY=1: symmetric NATs on both sides, so the session goes
    // through the rendezvous server's relay.
    let nat = if std::env::var_os("BENCH_RELAY").is_some() {
        Nat::Symmetric
    } else {
        Nat::Home
    };
    let ra = net.router_via_link(nat, &impair);
    let rb = net.router_via_link(nat, &impair);
    net.block_v6(&ra);
    net.block_v6(&rb);
    let (ha, hb) = (net.host(&ra), net.host(&rb));
    // The bottleneck's queue, in ms at its rate (BENCH_QUEUE_MS).
    let queue_ms: u32 = std::env::var("BENCH_QUEUE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    if let Some(mbit) = rate {
        e2e::natlab::exec(
            &ra.ns,
            &[
                "tc",
                "qdisc",
                "add",
                "dev",
                "wan",
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "64kb",
                "latency",
                &format!("{queue_ms}ms"),
            ],
        );
    }
    let mut lab = Lab::new("bench");
    lab.server = Some(format!("{SERVER_V4}:7000"));
    let public = net.public.clone();
    lab.start_rendezvous_in(Some(&public), &[]);
    for (name, host) in [("alice", &ha), ("bob", &hb)] {
        lab.start_daemon_in(Some(&host.ns), name, &[]);
        lab.ctl(name, &["register", name]).ok();
    }
    lab.log_in_and_connect("alice", "bob", Duration::from_secs(30));
    let peer = lab.ctl("alice", &["--json", "peers"]).json()["peers"][0].clone();
    let rtt = lab.ctl("alice", &["--json", "ping", "bob"]).json()["rtt_ms"].clone();

    let data: Vec<u8> = (0..size_mib * 1024 * 1024)
        .map(|i| {
            (i as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(17) as u8
        })
        .collect();
    let src = lab.dir.join("file.bin");
    std::fs::write(&src, &data).expect("write the file");
    lab.ctl(
        "alice",
        &["send-file", "bob", src.to_str().unwrap(), "--no-wait"],
    )
    .ok();
    let id = lab.wait_for("the offer", Duration::from_secs(60), |lab| {
        lab.ctl("bob", &["--json", "transfers"])
            .json()
            .as_array()
            .and_then(|t| {
                t.iter()
                    .find(|t| t["state"] == "offered")
                    .map(|t| t["id"].as_str().unwrap_or("").to_owned())
            })
    });
    let inbox = lab.dir.join("inbox");
    // The competing TCP flow: alice's host to the public segment, through
    // the same bottleneck, for as long as the file takes.
    let tcp = rate
        .filter(|_| std::env::var_os("BENCH_NO_TCP").is_none())
        .map(|_| TcpFlow::start(&ha.ns, &net.public));
    let start = Instant::now();
    lab.ctl(
        "bob",
        &["accept-file", &id, "--to", inbox.to_str().unwrap()],
    )
    .ok();
    let secs = start.elapsed().as_secs_f64();
    let tcp_bytes = tcp.map(|t| t.stop());
    let same = std::fs::read(inbox.join("file.bin"))
        .map(|d| d == data)
        .unwrap_or(false);
    let bytes = (size_mib * 1024 * 1024) as f64;
    println!(
        "path:      {} ({}), ping {rtt} ms",
        peer["path"], peer["endpoint"]
    );
    println!("links:     12 ms and {loss}% loss each way on each router's WAN link");
    println!("file:      {size_mib} MiB, byte-identical: {same}");
    println!(
        "transfer:  {secs:.2} s: {:.1} MB/s, {:.1} Mbit/s",
        bytes / secs / 1e6,
        bytes * 8.0 / secs / 1e6
    );
    if let (Some(mbit), Some(b)) = (rate, tcp_bytes) {
        let file = bytes * 8.0 / secs / 1e6;
        let tcp = b as f64 * 8.0 / secs / 1e6;
        println!("bottleneck: {mbit} Mbit/s, {queue_ms} ms of queue (tc tbf at alice's router), shared with one TCP flow");
        println!(
            "shares:    file {file:.1} Mbit/s ({:.0}%), TCP {tcp:.1} Mbit/s ({:.0}%)",
            100.0 * file / (file + tcp),
            100.0 * tcp / (file + tcp)
        );
    }
    // The same bytes by kernel TCP over the same two impaired links
    // (alice's host to bob's, through a port forwarded on bob's router),
    // with each congestion controller in BENCH_TCP_CC (default "bbr";
    // "none" skips it). Not with a bottleneck: that run measures shares.
    let ccs = std::env::var("BENCH_TCP_CC").unwrap_or_else(|_| "bbr".into());
    if rate.is_none() && ccs != "none" {
        exec_nft_forward(&rb, hb.v4);
        for cc in ccs.split(',') {
            let took = tcp_transfer(&ha.ns, &hb.ns, rb.wan, size_mib * 1024 * 1024, cc);
            let tcp = bytes * 8.0 / took.as_secs_f64() / 1e6;
            let file = bytes * 8.0 / secs / 1e6;
            println!(
                "kernel TCP ({cc}), the same {size_mib} MiB on the same path: {:.2} s, {tcp:.1} Mbit/s; the file went {:.2}x as fast",
                took.as_secs_f64(),
                file / tcp
            );
        }
    }
    if !same {
        std::process::exit(1);
    }
}

/// A TCP connection to `to` with congestion control `cc`.
fn tcp_connect(to: std::net::SocketAddr, cc: &str) -> std::net::TcpStream {
    use std::os::fd::AsRawFd;
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    // SAFETY: setsockopt with a byte string and its length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "congestion control {cc} not available");
    sock.connect(&to.into()).expect("connect");
    sock.into()
}

/// Forwards TCP port 5201 on `router`'s WAN to `to` on its LAN.
fn exec_nft_forward(router: &e2e::natlab::Router, to: std::net::Ipv4Addr) {
    use e2e::natlab::exec;
    exec(
        &router.ns,
        &[
            "nft", "insert", "rule", "inet", "firewall", "forward", "tcp", "dport", "5201",
            "accept",
        ],
    );
    exec(
        &router.ns,
        &[
            "nft",
            &format!(
                "add table ip fwd5201; add chain ip fwd5201 pre {{ type nat hook prerouting priority dstnat; }}; add rule ip fwd5201 pre iifname \"wan\" tcp dport 5201 dnat to {to}"
            ),
        ],
    );
}

/// Sends `len` bytes by TCP from namespace `from` to a listener in `to`
/// reached at `addr`:5201, with congestion control `cc`; the time from
/// connecting until the last byte arrived.
fn tcp_transfer(from: &str, to: &str, addr: std::net::Ipv4Addr, len: usize, cc: &str) -> Duration {
    use std::io::{Read, Write};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to = to.to_owned();
    let server = std::thread::spawn(move || {
        enter(&to);
        let l = std::net::TcpListener::bind(("0.0.0.0", 5201)).expect("listen");
        let _ = ready_tx.send(());
        let (mut c, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        while got < len {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        Instant::now()
    });
    let _ = ready_rx.recv();
    let from = from.to_owned();
    let cc = cc.to_owned();
    let client = std::thread::spawn(move || {
        enter(&from);
        let start = Instant::now();
        let mut c = tcp_connect(std::net::SocketAddr::from((addr, 5201)), &cc);
        let buf = vec![0x5au8; 1 << 16];
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(buf.len());
            c.write_all(&buf[..n]).expect("send");
            sent += n;
        }
        start
    });
    let start = client.join().expect("client");
    let end = server.join().expect("server");
    end - start
}

/// A bulk TCP flow from namespace `from` to a listener in namespace `to`
/// (on the public segment's address), counting what arrives.
struct TcpFlow {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn enter(ns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("namespace");
    // SAFETY: setns on a namespace file we own; it affects this thread,
    // which exists only for the flow.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}");
}

impl TcpFlow {
    fn start(from: &str, to: &str) -> TcpFlow {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let to = to.to_owned();
        let (s, r) = (stop.clone(), received.clone());
        let server = std::thread::spawn(move || {
            enter(&to);
            let l = std::net::TcpListener::bind((SERVER_V4, 5201)).expect("listen");
            let _ = ready_tx.send(());
            let (mut c, _) = l.accept().expect("accept");
            let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = vec![0u8; 1 << 16];
            while !s.load(Ordering::SeqCst) {
                match c.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        r.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Err(_) => continue,
                }
            }
        });
        let _ = ready_rx.recv();
        let from = from.to_owned();
        let s = stop.clone();
        let client = std::thread::spawn(move || {
            enter(&from);
            let cc = std::env::var("BENCH_SHARE_CC").unwrap_or_else(|_| "cubic".into());
            let mut c = tcp_connect(std::net::SocketAddr::from((SERVER_V4, 5201)), &cc);
            let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
            let buf = vec![0x5au8; 1 << 16];
            while !s.load(Ordering::SeqCst) {
                let _ = c.write(&buf);
            }
        });
        // Let TCP reach its share before the file starts.
        std::thread::sleep(Duration::from_secs(3));
        received.store(0, Ordering::SeqCst);
        TcpFlow {
            stop,
            received,
            threads: vec![server, client],
        }
    }

    /// Bytes received since the file started.
    fn stop(self) -> u64 {
        use std::sync::atomic::Ordering;
        let got = self.received.load(Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        got
    }
}
