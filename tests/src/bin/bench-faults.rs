//! `bench-faults`: recovery from each fault of the recovery issue in the
//! NAT lab (two home routers; "relayed": a firewall between them, so only
//! the rendezvous server's relay gets through), with the default
//! heartbeat and keepalive (25 s). Needs root; run it through
//! `scripts/bench-recovery.sh --lab`, which builds the release binaries.
//!
//! Each run: a line goes and arrives (the session is up), the fault, then
//! the clock starts when the faulted thing is back (process started or
//! continued, route restored, NAT rebound, UDP blocked) and stops when the
//! next line is in the receiver's history. At the end every line sent must
//! be in the receiver's history once, in order.
//!
//!     bench-faults [RUNS]
//!
//! `BENCH_DOWN_S` (default 60) is how long the network is down,
//! `BENCH_STOP_S` (default 120) how long the daemon is stopped;
//! `BENCH_FAULTS` a comma-separated subset of the faults below;
//! `BENCH_PATHS` `direct`, `relayed` or both (default).

use e2e::natlab::{Host, Nat, Net, Router, SERVER_V4};
use e2e::Lab;
use std::time::{Duration, Instant};

const FAULTS: &[&str] = &[
    "peer-kill",
    "peer-term",
    "rebind-quiet",
    "rebind-talker",
    "rebind-both",
    "server-restart",
    "net-down",
    "sigstop",
    "udp-blocked",
    "server-gone",
];

const WAIT: Duration = Duration::from_secs(120);

struct Pair {
    net: Net,
    lab: Lab,
    ra: Router,
    rb: Router,
    hb: Host,
    /// Lines sent each way, in order: (to bob, to alice).
    sent: (u32, u32),
    /// The next port bob's daemon binds on a kill (a new one each time).
    port: u16,
}

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

impl Pair {
    fn new(relayed: bool) -> Pair {
        let Some(mut net) = Net::new("bfault") else {
            eprintln!("bench-faults: the NAT lab cannot run here (see above)");
            std::process::exit(2);
        };
        let (ra, rb) = (net.router(Nat::Home), net.router(Nat::Home));
        net.block_v6(&ra);
        net.block_v6(&rb);
        if relayed {
            net.block(&ra, &rb);
        }
        let (ha, hb) = (net.host(&ra), net.host(&rb));
        let mut lab = Lab::new("bfault");
        lab.server = Some(format!("{SERVER_V4}:7000"));
        let public = net.public.clone();
        lab.start_rendezvous_in(Some(&public), &[]);
        for (name, host) in [("alice", &ha), ("bob", &hb)] {
            lab.start_daemon_in(Some(&host.ns), name, &["--heartbeat", "25"]);
            lab.ctl(name, &["register", name]).ok();
        }
        lab.log_in_and_connect("alice", "bob", WAIT);
        Pair {
            net,
            lab,
            ra,
            rb,
            hb,
            sent: (0, 0),
            port: 47000,
        }
    }

    /// Sends the next line from `from`; returns it.
    fn send(&mut self, from: &str) -> String {
        let (to, n) = if from == "alice" {
            self.sent.0 += 1;
            ("bob", self.sent.0)
        } else {
            self.sent.1 += 1;
            ("alice", self.sent.1)
        };
        let line = format!("line {n} from {from}");
        self.lab.ctl(from, &["send", to, &line]).ok();
        line
    }

    /// Waits until `to`'s history holds `line`; returns when it did.
    fn arrived(&mut self, to: &str, line: &str) -> Instant {
        let from = if to == "bob" { "alice" } else { "bob" };
        let deadline = Instant::now() + WAIT;
        loop {
            let h = self
                .lab
                .ctl(to, &["--json", "history", from, "-n", "5"])
                .json();
            if h.as_array()
                .is_some_and(|m| m.iter().any(|m| m["text"] == line))
            {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "never arrived: {line}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One line from `from`, timed from `t0`.
    fn timed(&mut self, from: &str, t0: Instant) -> f64 {
        let line = self.send(from);
        let to = if from == "alice" { "bob" } else { "alice" };
        self.arrived(to, &line).duration_since(t0).as_secs_f64()
    }

    fn start_bob(&mut self, extra: &[&str]) {
        let mut args = vec!["--heartbeat", "25"];
        args.extend(extra);
        let ns = self.hb.ns.clone();
        self.lab.start_daemon_in(Some(&ns), "bob", &args);
    }

    /// Runs `fault` once; returns the recovery in seconds.
    fn run(&mut self, fault: &str) -> f64 {
        // The session carries traffic: a line each way.
        for who in ["alice", "bob"] {
            let line = self.send(who);
            let to = if who == "alice" { "bob" } else { "alice" };
            self.arrived(to, &line);
        }
        match fault {
            "peer-kill" => {
                self.lab.kill("bob");
                self.send("alice");
                self.port += 1;
                let listen = format!("0.0.0.0:{}", self.port);
                let t0 = Instant::now();
                self.start_bob(&["--listen", &listen]);
                self.timed("alice", t0)
            }
            "peer-term" => {
                self.lab.stop("bob");
                let t0 = Instant::now();
                self.start_bob(&[]);
                self.timed("alice", t0)
            }
            "rebind-quiet" => {
                // alice's router rebinds; bob talks, alice only listens.
                self.net.rebind(&self.ra);
                self.timed("bob", Instant::now())
            }
            "rebind-talker" => {
                self.net.rebind(&self.ra);
                self.timed("alice", Instant::now())
            }
            "rebind-both" => {
                self.net.rebind(&self.ra);
                self.net.rebind(&self.rb);
                self.timed("alice", Instant::now())
            }
            "server-restart" => {
                self.lab.kill("rendezvous");
                std::thread::sleep(Duration::from_secs(1));
                let t0 = Instant::now();
                let public = self.net.public.clone();
                self.lab.start_rendezvous_in(Some(&public), &[]);
                self.timed("alice", t0)
            }
            "server-gone" => {
                // The server dies; bob is killed and started again (on
                // his port) and must find alice by himself.
                self.lab.kill("rendezvous");
                self.lab.kill("bob");
                let t0 = Instant::now();
                self.start_bob(&[]);
                let took = self.timed("bob", t0);
                let public = self.net.public.clone();
                self.lab.start_rendezvous_in(Some(&public), &[]);
                took
            }
            "net-down" => {
                self.net.link_down(&self.hb);
                self.send("alice");
                std::thread::sleep(env_secs("BENCH_DOWN_S", 60));
                self.net.link_up(&self.hb, &self.rb);
                self.timed("alice", Instant::now())
            }
            "sigstop" => {
                self.lab.signal("bob", "STOP");
                self.send("alice");
                std::thread::sleep(env_secs("BENCH_STOP_S", 120));
                self.lab.signal("bob", "CONT");
                self.timed("alice", Instant::now())
            }
            "udp-blocked" => {
                // From the rule to the first line delivered over TCP; then
                // UDP is let through again (measured as udp-back).
                self.net.block_udp(&self.ra);
                let took = self.timed("bob", Instant::now());
                self.net.unblock_udp(&self.ra);
                let back = Instant::now();
                self.lab.wait_for("the session off TCP", WAIT, |lab| {
                    let p = lab.ctl("alice", &["--json", "peers"]).json();
                    let p = &p["peers"][0];
                    (p["state"] == "established" && p["path"] != "relay-tcp").then_some(())
                });
                println!("udp-back {:.2}", back.elapsed().as_secs_f64());
                took
            }
            other => panic!("unknown fault {other}"),
        }
    }

    /// Every line sent each way is in the receiver's history once, in
    /// order.
    fn all_delivered(&mut self) -> bool {
        let mut ok = true;
        for (to, from, n) in [("bob", "alice", self.sent.0), ("alice", "bob", self.sent.1)] {
            let want: Vec<String> = (1..=n).map(|i| format!("line {i} from {from}")).collect();
            let got: Vec<String> = self
                .lab
                .ctl(to, &["--json", "history", from, "-n", "100000"])
                .json()
                .as_array()
                .map(|h| {
                    h.iter()
                        .filter(|m| m["direction"] == "in")
                        .map(|m| m["text"].as_str().unwrap_or("").to_owned())
                        .collect()
                })
                .unwrap_or_default();
            if got != want {
                eprintln!("{from} to {to}: sent {}, got {}", want.len(), got.len());
                ok = false;
            }
        }
        ok
    }
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let faults: Vec<String> = match std::env::var("BENCH_FAULTS") {
        Ok(f) => f.split(',').map(str::to_owned).collect(),
        Err(_) => FAULTS.iter().map(|f| f.to_string()).collect(),
    };
    let paths: Vec<String> = match std::env::var("BENCH_PATHS") {
        Ok(p) => p.split(',').map(str::to_owned).collect(),
        Err(_) => vec!["direct".into(), "relayed".into()],
    };
    let mut table = Vec::new();
    let mut all_ok = true;
    for path in &paths {
        let relayed = path == "relayed";
        let mut pair = Pair::new(relayed);
        for fault in &faults {
            // Without a server there is no relay.
            if relayed && fault == "server-gone" {
                continue;
            }
            let mut v = Vec::new();
            for _ in 0..runs {
                let took = pair.run(fault);
                println!("{path} {fault} {took:.3}");
                v.push(took);
            }
            table.push((path.clone(), fault.clone(), v));
        }
        let ok = pair.all_delivered();
        println!(
            "{path}: lines sent {} + {}, each once and in order: {}",
            pair.sent.0,
            pair.sent.1,
            if ok { "yes" } else { "NO" }
        );
        all_ok &= ok;
    }
    println!(
        "\n{:<8} {:<15} {:>4} {:>7} {:>7} {:>7}",
        "path", "fault", "runs", "p50 s", "p95 s", "max s"
    );
    for (path, fault, mut v) in table {
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        println!(
            "{path:<8} {fault:<15} {:>4} {:>7.2} {:>7.2} {:>7.2}",
            v.len(),
            pick(0.5),
            pick(0.95),
            v[v.len() - 1]
        );
    }
    if !all_ok {
        std::process::exit(1);
    }
}
