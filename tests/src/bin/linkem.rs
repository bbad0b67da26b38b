//! `linkem`: a userspace link emulator for the NAT lab.
//!
//! Why: the lab kernels are built without the `netem` qdisc, so `tc` cannot
//! add delay, jitter, reordering, duplication or loss to a veth. Instead the
//! lab joins two network namespaces with a pair of TUN devices and this
//! program forwards every IP packet between them, impaired on the way.
//!
//! Use:
//!
//! ```text
//! linkem --a lkA:tunA --b lkB:tunB --delay-ms 25 --loss-pct 1 &
//! # wait for the line "linkem: ready" on stdout, then:
//! ip -n lkA addr add 10.99.0.1/30 dev tunA && ip -n lkA link set tunA up
//! ip -n lkB addr add 10.99.0.2/30 dev tunB && ip -n lkB link set tunB up
//! ```
//!
//! It only ever touches the two TUN devices it creates (one per namespace;
//! they vanish when it exits) and configures nothing: addresses, routes and
//! firewall rules are the caller's.
//!
//! Map: [`Impairment`] is the pure, seeded decision (when does each copy of
//! a packet leave, if at all); [`Link`] queues packets by those times; one
//! thread per direction drives a `Link` from `poll(2)` with the next
//! departure as its timeout. The main thread only waits for signals:
//! SIGUSR1 prints the counters, SIGTERM/SIGINT print them and exit.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: linkem --a NETNS:IFNAME --b NETNS:IFNAME [--delay-ms N] [--jitter-ms N]
              [--loss-pct F] [--dup-pct F] [--reorder-pct F] [--rate-mbit F]
              [--queue N] [--seed N]
NETNS is a name under /var/run/netns; '' or '-' is the current namespace.
Prints 'linkem: ready' once both TUN devices exist. SIGUSR1 prints counters.";

/// Longest delay or jitter accepted: an hour keeps every `Instant` sum far
/// from overflow.
const MAX_DELAY_MS: u64 = 3_600_000;

/// How a direction is impaired; probabilities are in 0..=1.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub dup: f64,
    pub reorder: f64,
    /// Bits per second; 0 = unlimited.
    pub rate_bps: f64,
    /// Packets in flight per direction before tail drop.
    pub queue: usize,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub duplicated: AtomicU64,
    pub queue_dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

/// The decisions for one direction. Pure: time is an argument, randomness
/// comes from a seeded PRNG, so a seed fixes every decision.
pub struct Impairment {
    params: Params,
    rng: StdRng,
    /// When the emulated wire finishes serialising the last packet.
    wire_free: Option<Instant>,
    /// Departures not yet reached: the packets in flight.
    in_flight: BinaryHeap<Reverse<Instant>>,
    pub counters: Arc<Counters>,
}

impl Impairment {
    pub fn new(params: Params, seed: u64) -> Self {
        Impairment {
            params,
            rng: StdRng::seed_from_u64(seed),
            wire_free: None,
            in_flight: BinaryHeap::new(),
            counters: Arc::default(),
        }
    }

    /// Departure times for a packet of `len` bytes arriving at `now`: none
    /// if it is dropped, two if it is duplicated. Order of rules as netem:
    /// loss, duplication, then per copy the queue bound, rate, delay.
    #[must_use]
    pub fn schedule(&mut self, now: Instant, len: usize) -> Vec<Instant> {
        while self.in_flight.peek().is_some_and(|t| t.0 <= now) {
            self.in_flight.pop();
        }
        if self.chance(self.params.loss) {
            self.counters.lost.fetch_add(1, Relaxed);
            return Vec::new();
        }
        let copies = if self.chance(self.params.dup) {
            self.counters.duplicated.fetch_add(1, Relaxed);
            2
        } else {
            1
        };
        let mut out = Vec::with_capacity(copies);
        for _ in 0..copies {
            if self.in_flight.len() >= self.params.queue {
                self.counters.queue_dropped.fetch_add(1, Relaxed);
                continue;
            }
            let mut at = now;
            if self.params.rate_bps > 0.0 {
                let secs = len as f64 * 8.0 / self.params.rate_bps;
                let wire = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
                let start = self.wire_free.map_or(now, |t| t.max(now));
                at = start.checked_add(wire).unwrap_or(start);
                self.wire_free = Some(at);
            }
            if !self.chance(self.params.reorder) {
                at = at.checked_add(self.delay()).unwrap_or(at);
            }
            self.in_flight.push(Reverse(at));
            out.push(at);
        }
        out
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen::<f64>() < p
    }

    /// delay + uniform jitter in [-jitter, +jitter], clamped at zero.
    fn delay(&mut self) -> Duration {
        let base = self.params.delay.as_nanos() as i128;
        let j = self.params.jitter.as_nanos() as i128;
        let offset = if j > 0 { self.rng.gen_range(-j..=j) } else { 0 };
        Duration::from_nanos((base + offset).clamp(0, u64::MAX as i128) as u64)
    }
}

/// An [`Impairment`] plus the packets it is holding.
pub struct Link {
    pub imp: Impairment,
    queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    seq: u64,
}

impl Link {
    pub fn new(imp: Impairment) -> Self {
        Link {
            imp,
            queue: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) {
        for at in self.imp.schedule(now, packet.len()) {
            // The sequence number keeps equal departures in arrival order.
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq, packet.to_vec())));
        }
    }

    /// The next packet due at `now`, in departure order.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.poll_timeout()? > now {
            return None;
        }
        self.queue.pop().map(|Reverse((_, _, p))| p)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }
}

struct Args {
    a: (String, String),
    b: (String, String),
    params: Params,
    seed: u64,
}

fn parse_end(s: &str) -> Result<(String, String), String> {
    let (ns, ifname) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not NETNS:IFNAME"))?;
    let ns = if ns == "-" { "" } else { ns };
    if ns.contains('/') || ns == "." || ns == ".." || ns.contains('\0') {
        return Err(format!("bad namespace name '{ns}'"));
    }
    let bad = |c: char| c == '/' || c == ':' || c == '\0' || c.is_whitespace();
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains(bad) {
        return Err(format!("bad interface name '{ifname}' (1..15 bytes)"));
    }
    Ok((ns.to_owned(), ifname.to_owned()))
}

/// Parses `v` as a number in `lo..=hi`.
fn parse_in<T: FromStr + PartialOrd + Display>(
    flag: &str,
    v: &str,
    lo: T,
    hi: T,
) -> Result<T, String> {
    match v.parse::<T>() {
        Ok(x) if x >= lo && x <= hi => Ok(x),
        _ => Err(format!("{flag}: '{v}' is not a number in {lo}..={hi}")),
    }
}

/// `Ok(None)` means `--help`.
fn parse_args(args: &[String]) -> Result<Option<Args>, String> {
    let (mut a, mut b, mut seed, ms) = (None, None, 1, Duration::from_millis);
    let mut params = Params {
        queue: 1000,
        ..Params::default()
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--a" => a = Some(parse_end(v)?),
            "--b" => b = Some(parse_end(v)?),
            "--delay-ms" => params.delay = ms(parse_in(flag, v, 0, MAX_DELAY_MS)?),
            "--jitter-ms" => params.jitter = ms(parse_in(flag, v, 0, MAX_DELAY_MS)?),
            "--loss-pct" => params.loss = parse_in(flag, v, 0.0, 100.0)? / 100.0,
            "--dup-pct" => params.dup = parse_in(flag, v, 0.0, 100.0)? / 100.0,
            "--reorder-pct" => params.reorder = parse_in(flag, v, 0.0, 100.0)? / 100.0,
            "--rate-mbit" => params.rate_bps = parse_in(flag, v, 0.0, 1e6)? * 1e6,
            "--queue" => params.queue = parse_in(flag, v, 1, usize::MAX)?,
            "--seed" => seed = parse_in(flag, v, 0, u64::MAX)?,
            _ => return Err(format!("unknown argument '{flag}'")),
        }
    }
    let a = a.ok_or("--a is required")?;
    let b = b.ok_or("--b is required")?;
    if params.rate_bps > 0.0 && params.rate_bps < 1e3 {
        // Below 1 kbit/s one 64 KiB packet would take minutes.
        return Err("--rate-mbit: use 0 (unlimited) or at least 0.001".into());
    }
    if a == b {
        return Err("--a and --b name the same device".into());
    }
    Ok(Some(Args { a, b, params, seed }))
}

fn open(path: &str, write: bool) -> Result<File, String> {
    let f = OpenOptions::new().read(true).write(write).open(path);
    f.map_err(|e| format!("open {path}: {e}"))
}

fn setns(ns: &File, what: &str) -> Result<(), String> {
    // SAFETY: plain syscall on a valid namespace fd.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("setns {what}: {e}"));
    }
    Ok(())
}

/// `struct ifreq` from <linux/if.h>, cut to the part TUNSETIFF reads: the
/// name, then `ifr_flags` at the start of the 24-byte union (40 bytes).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `_IOW('T', 202, int)` from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// <linux/if_tun.h>: a layer-3 device, no 4-byte packet-info header, and
/// never attach to a device that already exists (only our own are touched).
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_TUN_EXCL: libc::c_short = 0x8000_u16 as libc::c_short;

/// Creates TUN device `ifname` in the current namespace.
fn create_tun(ifname: &str) -> Result<File, String> {
    let tun = open("/dev/net/tun", true)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req is a properly sized, initialised ifreq that outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("TUNSETIFF {ifname}: {e}"));
    }
    Ok(tun)
}

fn make_end(home: &File, (ns, ifname): &(String, String)) -> Result<File, String> {
    if ns.is_empty() {
        return create_tun(ifname);
    }
    setns(&open(&format!("/var/run/netns/{ns}"), false)?, ns)?;
    let tun = create_tun(ifname);
    setns(home, "back to the original namespace")?;
    tun.map_err(|e| format!("in {ns}: {e}"))
}

/// Forwards `input` to `output` through `link` until a read fails.
fn forward(mut input: &File, mut output: &File, mut link: Link) -> String {
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        while let Some(p) = link.poll_transmit(now) {
            let c = &link.imp.counters;
            // Counted, not fatal: EIO until the caller sets the device up.
            let n = if output.write(&p).is_ok() {
                &c.forwarded
            } else {
                &c.write_errors
            };
            n.fetch_add(1, Relaxed);
        }
        let timeout = link.poll_timeout().map_or(-1, |t| {
            let ns = t.saturating_duration_since(now).as_nanos();
            ns.div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int
        });
        let mut pfd = libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if r <= 0 {
            continue; // timeout or EINTR: send what is due
        }
        match input.read(&mut buf) {
            Ok(0) => return "device closed".into(),
            Ok(n) => link.handle_packet(Instant::now(), &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(e) => return format!("read: {e}"),
        }
    }
}

fn print_counters(dirs: &[(String, Arc<Counters>)]) {
    let mut err = std::io::stderr().lock();
    for (name, c) in dirs {
        let n = |x: &AtomicU64| x.load(Relaxed);
        let _ = writeln!(
            err,
            "linkem: {name}: forwarded={} lost={} duplicated={} queue_dropped={} write_errors={}",
            n(&c.forwarded),
            n(&c.lost),
            n(&c.duplicated),
            n(&c.queue_dropped),
            n(&c.write_errors)
        );
    }
}

fn run(args: Args) -> Result<(), String> {
    let home = open("/proc/self/ns/net", false)?;
    let tun_a = Arc::new(make_end(&home, &args.a)?);
    let tun_b = Arc::new(make_end(&home, &args.b)?);

    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals wait for sigwait() below.
    // SAFETY: plain signal-set manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    // A different seed per direction keeps the two independent.
    let links = [0, 1].map(|i| Link::new(Impairment::new(args.params.clone(), args.seed ^ i)));
    let dirs: Vec<_> = ["a->b", "b->a"]
        .iter()
        .zip(&links)
        .map(|(name, l)| (name.to_string(), l.imp.counters.clone()))
        .collect();
    let ends = [(tun_a.clone(), tun_b.clone()), (tun_b, tun_a)];
    for ((link, (from, to)), (name, _)) in links.into_iter().zip(ends).zip(dirs.clone()) {
        let all = dirs.clone();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let why = forward(&from, &to, link);
                let _ = writeln!(std::io::stderr(), "linkem: {name}: {why}");
                print_counters(&all);
                std::process::exit(1);
            })
            .map_err(|e| format!("spawn: {e}"))?;
    }

    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "linkem: ready").and_then(|_| out.flush());
    drop(out);

    loop {
        let mut sig = 0;
        // SAFETY: set is initialised; sig is a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        print_counters(&dirs);
        if sig != libc::SIGUSR1 {
            return Ok(());
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match parse_args(&args) {
        Ok(None) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            0
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "linkem: {e}\n{USAGE}");
            2
        }
        Ok(Some(args)) => match run(args) {
            Ok(()) => 0,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "linkem: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Unbounded queue: many packets are scheduled at one instant.
    fn imp(edit: impl FnOnce(&mut Params)) -> Impairment {
        let mut p = Params {
            queue: usize::MAX,
            ..Params::default()
        };
        edit(&mut p);
        Impairment::new(p, 7)
    }

    #[test]
    fn loss_matches_the_requested_percentage() {
        let (mut i, now) = (imp(|p| p.loss = 0.10), Instant::now());
        let lost = (0..100_000)
            .filter(|_| i.schedule(now, 100).is_empty())
            .count();
        assert!((9_500..=10_500).contains(&lost), "lost {lost}");
        assert_eq!(i.counters.lost.load(Relaxed), lost as u64);
    }

    #[test]
    fn same_seed_same_decisions() {
        let now = Instant::now();
        let run = |seed| {
            let mut i = imp(|p| {
                (p.delay, p.jitter, p.loss, p.dup, p.reorder) = (20 * MS, 15 * MS, 0.1, 0.1, 0.1)
            });
            i.rng = StdRng::seed_from_u64(seed);
            (0..1000).map(|_| i.schedule(now, 100)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn delays_lie_within_the_jitter() {
        let (mut i, now) = (
            imp(|p| (p.delay, p.jitter) = (25 * MS, 10 * MS)),
            Instant::now(),
        );
        let delays: Vec<Duration> = (0..10_000).map(|_| i.schedule(now, 100)[0] - now).collect();
        assert!(delays.iter().all(|d| (15 * MS..=35 * MS).contains(d)));
        // Both ends are reached, so the jitter alone reorders packets.
        assert!(delays.iter().any(|&d| d < 16 * MS) && delays.iter().any(|&d| d > 34 * MS));
        let mut clamped = imp(|p| (p.delay, p.jitter) = (10 * MS, 25 * MS));
        assert!((0..1000).all(|_| clamped.schedule(now, 100)[0] >= now));
    }

    #[test]
    fn duplication_and_reorder() {
        let (mut i, now) = (imp(|p| (p.delay, p.dup) = (25 * MS, 1.0)), Instant::now());
        assert_eq!(i.schedule(now, 100), vec![now + 25 * MS; 2]);
        assert_eq!(i.counters.duplicated.load(Relaxed), 1);
        let mut r = imp(|p| (p.delay, p.reorder) = (25 * MS, 1.0));
        assert_eq!(r.schedule(now, 100), vec![now]);
    }

    #[test]
    fn rate_spaces_departures_by_serialisation_time() {
        // 8 Mbit/s: a 1000-byte packet takes 1 ms on the wire.
        let (mut i, now) = (
            imp(|p| (p.rate_bps, p.delay) = (8e6, 5 * MS)),
            Instant::now(),
        );
        let deps: Vec<Instant> = (0..10).map(|_| i.schedule(now, 1000)[0]).collect();
        assert_eq!(deps[0], now + 6 * MS);
        assert!(deps.windows(2).all(|w| w[1] - w[0] == MS));
        // An idle wire starts again at `now`.
        let later = now + 1000 * MS;
        assert_eq!(i.schedule(later, 500)[0], later + 5 * MS + MS / 2);
    }

    #[test]
    fn queue_bound_tail_drops() {
        let (mut i, now) = (imp(|p| (p.rate_bps, p.queue) = (8e6, 10)), Instant::now());
        let sent = (0..25)
            .filter(|_| !i.schedule(now, 1000).is_empty())
            .count();
        assert_eq!((sent, i.counters.queue_dropped.load(Relaxed)), (10, 15));
        // Once the queue has drained, packets are accepted again.
        assert_eq!(i.schedule(now + 1000 * MS, 1000).len(), 1);
    }

    #[test]
    fn link_releases_packets_in_departure_order() {
        let (mut l, now) = (Link::new(imp(|p| p.delay = 10 * MS)), Instant::now());
        l.handle_packet(now, b"slow");
        l.imp.params.delay = Duration::ZERO;
        l.handle_packet(now, b"fast");
        assert_eq!(l.poll_transmit(now).as_deref(), Some(&b"fast"[..]));
        assert_eq!(
            (l.poll_transmit(now), l.poll_timeout()),
            (None, Some(now + 10 * MS))
        );
        assert_eq!(
            l.poll_transmit(now + 10 * MS).as_deref(),
            Some(&b"slow"[..])
        );
    }

    #[test]
    fn arguments() {
        let parse = |v: &str| parse_args(&v.split(' ').map(String::from).collect::<Vec<_>>());
        let ok = parse("--a x:t0 --b -:t1 --loss-pct 2.5 --rate-mbit 10")
            .unwrap()
            .unwrap();
        assert_eq!(
            (ok.b.0.as_str(), ok.params.loss, ok.params.queue),
            ("", 0.025, 1000)
        );
        assert!(parse("--help").unwrap().is_none());
        for bad in [
            "--a x:t0",
            "--a x:t0 --b y:t1 --loss-pct 101",
            "--a x:t0 --b y:t1 --delay-ms -1",
            "--a x:t0 --b y:t1 --rate-mbit NaN",
            "--a x:t0 --b y:t1 --rate-mbit 0.0001",
            "--a x:t0 --b y:t1 --queue 0",
            "--a x:t0 --b y:t1 --queue",
            "--a x:t0 --b y:waytoolonginterface",
            "--a ../x:t0 --b y:t1",
            "--a x:t0 --b x:t0",
            "--bogus 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
