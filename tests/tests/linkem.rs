//! `linkem` for real: two network namespaces joined by the binary, UDP
//! datagrams sent across by sockets made inside each namespace.
//!
//! Needs root, `ip` and /dev/net/tun; without them the tests print
//! "SKIPPED" and pass, unless P2P_REQUIRE_NATLAB=1 makes that a failure.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const DATAGRAMS: u32 = 200;

fn lab_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip && std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    assert!(
        std::env::var("P2P_REQUIRE_NATLAB").as_deref() != Ok("1"),
        "P2P_REQUIRE_NATLAB=1 but this needs root, `ip` and /dev/net/tun"
    );
    println!("SKIPPED: needs root and /dev/net/tun");
    false
}

#[track_caller]
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(side: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("lkt{}n{n}{side}", std::process::id());
        ip(&["netns", "add", &name]);
        Netns(name)
    }

    /// A UDP socket bound to `addr` inside this namespace: made on a
    /// thread of its own, since setns changes only the calling thread.
    fn udp(&self, addr: &str) -> UdpSocket {
        let (path, addr) = (format!("/var/run/netns/{}", self.0), addr.to_owned());
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("namespace file");
            // SAFETY: plain syscall on a valid namespace fd.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        })
        .join()
        .expect("socket thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A running linkem, stopped with SIGTERM when dropped.
struct Linkem(Child);

impl Linkem {
    fn start(a: &Netns, b: &Netns, extra: &[&str]) -> Self {
        let (ea, eb) = (format!("{}:lka", a.0), format!("{}:lkb", b.0));
        let mut args = vec!["--a", &ea, "--b", &eb];
        args.extend(extra);
        let mut child = Command::new(e2e::bin("linkem"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start linkem");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        let mut lk = Linkem(child);
        assert_eq!(line, "linkem: ready\n", "linkem {args:?}: {}", lk.stop());
        lk
    }

    /// Stops linkem and returns what it printed on stderr (its counters).
    fn stop(&mut self) -> String {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Linkem {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// Sends DATAGRAMS datagrams from A to B through a linkem run with
/// `extra`; checks each arrives `copies` times, each copy at least `min`
/// after it was sent.
fn send_across(extra: &[&str], copies: usize, min: Duration) {
    if !lab_available() {
        return;
    }
    let (a, b) = (Netns::new("a"), Netns::new("b"));
    let mut lk = Linkem::start(&a, &b, extra);
    for (ns, dev, addr) in [(&a, "lka", "10.99.0.1/30"), (&b, "lkb", "10.99.0.2/30")] {
        ip(&["-n", &ns.0, "addr", "add", addr, "dev", dev]);
        ip(&["-n", &ns.0, "link", "set", dev, "up"]);
    }
    let (tx, rx) = (a.udp("10.99.0.1:0"), b.udp("10.99.0.2:0"));
    let to = rx.local_addr().expect("receiver address");

    // A generous idle limit to end the receiver, not a timing assertion.
    rx.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let receiver = std::thread::spawn(move || {
        let (mut got, mut buf) = (Vec::new(), [0u8; 64]);
        while got.len() < DATAGRAMS as usize * copies {
            let Ok(n) = rx.recv(&mut buf) else { break };
            let index = buf[..n].try_into().map(u32::from_be_bytes);
            got.push((index.expect("4-byte datagram"), Instant::now()));
        }
        got
    });
    let mut sent = Vec::new();
    for i in 0..DATAGRAMS {
        sent.push(Instant::now());
        tx.send_to(&i.to_be_bytes(), to).expect("send");
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = receiver.join().expect("receiver");
    let counters = lk.stop();

    for i in 0..DATAGRAMS {
        let arrivals: Vec<Duration> = got
            .iter()
            .filter(|(n, _)| *n == i)
            .map(|(_, at)| *at - sent[i as usize])
            .collect();
        assert_eq!(
            arrivals.len(),
            copies,
            "datagram {i}: {arrivals:?}\n{counters}"
        );
        for d in arrivals {
            assert!(d >= min, "datagram {i} took only {d:?}\n{counters}");
        }
    }
}

#[test]
fn delays_every_datagram() {
    send_across(&["--delay-ms", "25"], 1, Duration::from_millis(20));
}

#[test]
fn duplicates_every_datagram() {
    let args = ["--delay-ms", "25", "--dup-pct", "100"];
    send_across(&args, 2, Duration::from_millis(20));
}
