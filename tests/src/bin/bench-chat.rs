//! `bench-chat`: chat throughput and latency between two running daemons
//! (alice → bob), for `scripts/bench-chat.sh`, which starts them.
//!
//!     bench-chat SOCK_A SOCK_B PID_A PID_B P2PCTL [MESSAGES]
//!
//! Throughput, per message size (100 B, 1 KiB, 64 KiB: MESSAGES, half
//! as many, a fiftieth): lines piped into `p2pctl send
//! bob` (a real process), counted as they arrive in bob's event stream
//! (an event is written after the message is stored): messages and bytes
//! a second end to end, when `p2pctl` was done, CPU per 1,000 messages
//! and RSS of each daemon, and (BENCH_ALLOCS=1, as root, with perf: a run
//! of its own, since counting slows the daemons) the heap allocations
//! each made per message. Latency: one message at a time from a client
//! already connected to alice's socket, until bob's event stream shows
//! it (p50, p99). Then how long a `p2pctl` process takes to start.

use proto::control::{Command, Request};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Daemon {
    pid: u32,
}

impl Daemon {
    /// User + system CPU seconds so far.
    fn cpu(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(11) + t(12)) / 100.0
    }

    /// Resident and peak resident memory, MiB.
    fn rss(&self) -> (f64, f64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let kb = |key: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (kb("VmRSS:"), kb("VmHWM:"))
    }
}

/// Heap allocations of the daemons while it lives, where perf can count
/// them (root, uprobes on libc's malloc, calloc and realloc).
struct Allocs {
    stats: Vec<(std::process::Child, PathBuf)>,
}

impl Allocs {
    fn start(pids: &[u32]) -> Option<Allocs> {
        // (Opt-in: a uprobe on every allocation slows the daemons down
        // several times, so the other figures of such a run are not
        // comparable.)
        std::env::var_os("BENCH_ALLOCS")?;
        let probe = |f: &str| {
            Process::new("perf")
                .args(["probe", "-q", "-x", "/lib/x86_64-linux-gnu/libc.so.6", f])
                .stderr(Stdio::null())
                .status()
        };
        for f in ["malloc", "calloc", "realloc"] {
            probe(f).ok()?;
        }
        let mut stats = Vec::new();
        for pid in pids {
            let out = std::env::temp_dir().join(format!("bench-chat-allocs.{pid}"));
            let child = Process::new("perf")
                .args([
                    "stat",
                    "-x,",
                    "-e",
                    "probe_libc:malloc,probe_libc:calloc,probe_libc:realloc",
                ])
                .args(["-p", &pid.to_string(), "-o"])
                .arg(&out)
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            stats.push((child, out));
        }
        std::thread::sleep(Duration::from_millis(300));
        // A perf that could not attach has exited already.
        let mut all = Allocs { stats };
        all.stats
            .iter_mut()
            .all(|(c, _)| matches!(c.try_wait(), Ok(None)))
            .then_some(all)
    }

    /// Allocations per daemon, in the order given.
    fn stop(self) -> Vec<u64> {
        self.stats
            .into_iter()
            .map(|(mut child, out)| {
                // SAFETY: a signal to our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let _ = child.wait();
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                let _ = std::fs::remove_file(&out);
                text.lines()
                    .filter_map(|l| l.split(',').next()?.parse::<u64>().ok())
                    .sum()
            })
            .collect()
    }
}

fn request(id: u64, command: Command) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Request { id, command }).expect("request");
    line.push(b'\n');
    line
}

/// Bob's event stream: the arrival time of each message event, on a
/// channel.
fn watch(sock: &Path) -> mpsc::Receiver<Instant> {
    let mut s = UnixStream::connect(sock).expect("bob's socket");
    s.write_all(&request(1, Command::Watch)).expect("watch");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::with_capacity(1 << 20, s).lines() {
            let Ok(line) = line else { return };
            // (Cheaper than parsing every line.)
            if line.starts_with(r#"{"event":"message""#) && tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    // The subscription's answer comes before any event: wait for it.
    std::thread::sleep(Duration::from_millis(200));
    rx
}

fn text(i: usize, size: usize) -> String {
    let mut t = format!("message {i} ");
    while t.len() < size {
        t.push(char::from(b'a' + (t.len() % 26) as u8));
    }
    t.truncate(size);
    t
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn throughput(
    a: &Daemon,
    b: &Daemon,
    p2pctl: &Path,
    (sock_a, sock_b): (&Path, &Path),
    events: &mpsc::Receiver<Instant>,
    n: usize,
    size: usize,
) {
    while events.try_recv().is_ok() {}
    let input: Vec<u8> = (0..n)
        .flat_map(|i| format!("{}\n", text(i, size)).into_bytes())
        .collect();
    let allocs = Allocs::start(&[a.pid, b.pid]);
    let (cpu_a, cpu_b) = (a.cpu(), b.cpu());
    let t0 = Instant::now();
    let mut child = Process::new(p2pctl)
        .arg("--socket")
        .arg(sock_a)
        .args(["send", "bob"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("p2pctl");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut got = 0;
    let mut last = t0;
    while got < n {
        match events.recv_timeout(Duration::from_secs(30)) {
            Ok(at) => {
                got += 1;
                last = at;
            }
            Err(_) => break,
        }
    }
    let status = child.wait().expect("p2pctl ran");
    let _ = writer.join();
    let allocs = match allocs.map(Allocs::stop).as_deref() {
        Some([a, b]) => format!(
            " {:.1} / {:.1} |",
            *a as f64 / n as f64,
            *b as f64 / n as f64
        ),
        _ => " (BENCH_ALLOCS=1, as root, with perf) |".into(),
    };
    if got < n {
        // The event stream ended early (a watcher that falls 32 MiB
        // behind is closed by the daemon): count what bob stored.
        let out = Process::new(p2pctl)
            .arg("--socket")
            .arg(sock_b)
            .args(["--json", "history", "alice", "-n", &n.to_string()])
            .output()
            .expect("history");
        let stored = String::from_utf8_lossy(&out.stdout)
            .matches(r#""direction":"in""#)
            .count();
        println!("(the event stream stopped after {got} of {n}; bob's history holds {stored} messages from alice in all)");
    }
    let secs = (last - t0).as_secs_f64();
    let (used_a, used_b) = (a.cpu() - cpu_a, b.cpu() - cpu_b);
    let ((rss_a, peak_a), (rss_b, peak_b)) = (a.rss(), b.rss());
    println!(
        "| {size} B | {got}/{n} | {:.0} msg/s | {:.1} MB/s | {:.0} / {:.0} ms | {:.1} / {:.1} ms | {:.0} / {:.0} MiB (peak {:.0} / {:.0}) |{allocs}{}",
        got as f64 / secs,
        (got * size) as f64 / secs / 1e6,
        secs * 1e3,
        t0.elapsed().as_secs_f64() * 1e3,
        used_a * 1e3 * 1000.0 / n as f64,
        used_b * 1e3 * 1000.0 / n as f64,
        rss_a,
        rss_b,
        peak_a,
        peak_b,
        if status.success() { "" } else { " (p2pctl failed)" },
    );
}

fn latency(sock_a: &Path, events: &mpsc::Receiver<Instant>, n: usize) {
    while events.try_recv().is_ok() {}
    let mut s = UnixStream::connect(sock_a).expect("alice's socket");
    let mut answers = BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    let (mut delivered, mut answered) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let req = request(
            i as u64 + 10,
            Command::Send {
                peer: "bob".into(),
                text: text(i, 100),
            },
        );
        let t0 = Instant::now();
        s.write_all(&req).expect("send");
        line.clear();
        answers.read_line(&mut line).expect("answer");
        answered.push(t0.elapsed());
        match events.recv_timeout(Duration::from_secs(10)) {
            Ok(at) => delivered.push(at - t0),
            Err(_) => break,
        }
    }
    delivered.sort();
    answered.sort();
    println!(
        "one 100-byte message at a time ({} of {n}), from a connected client: `send` answered (stored) p50 {:.3} ms, p99 {:.3} ms; in bob's event stream p50 {:.3} ms, p99 {:.3} ms",
        delivered.len(),
        percentile(&answered, 0.5),
        percentile(&answered, 0.99),
        percentile(&delivered, 0.5),
        percentile(&delivered, 0.99),
    );
}

fn startup(p2pctl: &Path, sock_a: &Path) {
    let runs = |args: &[&str]| {
        let mut t: Vec<Duration> = (0..200)
            .map(|_| {
                let t0 = Instant::now();
                let _ = Process::new(p2pctl)
                    .arg("--socket")
                    .arg(sock_a)
                    .args(args)
                    .stdout(Stdio::null())
                    .status();
                t0.elapsed()
            })
            .collect();
        t.sort();
        percentile(&t, 0.5)
    };
    let version = runs(&["--version"]);
    let whoami = runs(&["whoami"]);
    println!("a p2pctl process, start to exit (p50 of 200): `--version` {version:.2} ms, `whoami` (one request to the daemon) {whoami:.2} ms");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: bench-chat SOCK_A SOCK_B PID_A PID_B P2PCTL [MESSAGES]");
        std::process::exit(2);
    }
    let (sock_a, sock_b) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let a = Daemon {
        pid: args[2].parse().expect("pid"),
    };
    let b = Daemon {
        pid: args[3].parse().expect("pid"),
    };
    let p2pctl = PathBuf::from(&args[4]);
    let n: usize = args.get(5).and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let events = watch(&sock_b);
    println!("durability: each message is in SQLite (WAL, synchronous=FULL) when `send` answers, and in bob's when its event shows and its acknowledgement leaves; one fsync per burst of messages (group commit)");
    println!();
    println!("| size | arrived | end to end | | p2pctl done / all arrived | daemon CPU per 1k msgs (alice / bob) | RSS after (alice / bob) | allocations per message (alice / bob) |");
    println!("|---|---|---|---|---|---|---|---|");
    // (BENCH_CHAT_SIZES=100,1024 leaves the 64 KiB run out: a daemon
    // older than long messages refuses them.)
    let sizes: Vec<usize> = std::env::var("BENCH_CHAT_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1024, proto::wire::MAX_MESSAGE_BYTES]);
    for size in sizes {
        let count = match size {
            0..=512 => n,
            513..=4096 => n / 2,
            _ => (n / 50).max(100),
        };
        throughput(
            &a,
            &b,
            &p2pctl,
            (sock_a.as_path(), sock_b.as_path()),
            &events,
            count,
            size,
        );
    }
    println!();
    latency(&sock_a, &events, 2000);
    startup(&p2pctl, &sock_a);
}
