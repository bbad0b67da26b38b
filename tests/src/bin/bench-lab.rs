//! `bench-lab`: file transfer through the NAT lab over an impaired path,
//! for `docs/benchmarks.md`. Needs root (network namespaces, nftables,
//! TUN); run it through `scripts/bench-files-lossy.sh`, which builds the
//! release binaries it starts.
//!
//! Two home routers whose WAN links go through `linkem` (12 ms each way
//! on each link: a 50 ms round trip between the hosts, plus what the
//! hosts add; `LOSS` percent lost on each link in each direction, so
//! about twice that end to end), alice sends bob a file of `SIZE` MiB.

use e2e::natlab::{Nat, Net, SERVER_V4};
use e2e::Lab;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let size_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let loss: String = args.next().unwrap_or_else(|| "0.5".into());
    let Some(mut net) = Net::new("bench") else {
        eprintln!("bench-lab: the NAT lab cannot run here (see above)");
        std::process::exit(2);
    };
    let impair = ["--delay-ms", "12", "--loss-pct", loss.as_str()];
    let ra = net.router_via_link(Nat::Home, &impair);
    let rb = net.router_via_link(Nat::Home, &impair);
    net.block_v6(&ra);
    net.block_v6(&rb);
    let (ha, hb) = (net.host(&ra), net.host(&rb));
    let mut lab = Lab::new("bench");
    lab.server = Some(format!("{SERVER_V4}:7000"));
    let public = net.public.clone();
    lab.start_rendezvous_in(Some(&public), &[]);
    for (name, host) in [("alice", &ha), ("bob", &hb)] {
        lab.start_daemon_in(Some(&host.ns), name, &[]);
        lab.ctl(name, &["register", name]).ok();
    }
    lab.wait_for("logins", Duration::from_secs(30), |lab| {
        let up = |n| lab.ctl(n, &["--json", "whoami"]).json()["server_state"] == "logged_in";
        (up("alice") && up("bob")).then_some(())
    });
    let socket = lab.socket("alice");
    let connect = std::thread::spawn(move || e2e::p2pctl(&socket, &["connect", "bob"], None));
    lab.wait_for("the request", Duration::from_secs(30), |lab| {
        lab.ctl("bob", &["--json", "peers"]).json()["requests"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
            .then_some(())
    });
    lab.ctl("bob", &["accept", "alice"]).ok();
    connect.join().expect("connect").ok();
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
    let start = Instant::now();
    lab.ctl(
        "bob",
        &["accept-file", &id, "--to", inbox.to_str().unwrap()],
    )
    .ok();
    let secs = start.elapsed().as_secs_f64();
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
    if !same {
        std::process::exit(1);
    }
}
