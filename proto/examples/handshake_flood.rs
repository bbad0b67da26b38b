//! Legitimate users logging in while spoofed handshake initiations flood
//! the rendezvous server (the hostile-internet issue's D4 figure): N
//! clients logged in, then the server restarts and, while RATE spoofed
//! XX initiations a second arrive from random addresses for SECONDS, every
//! client's network changes (each at a random moment in the flood's
//! second second) and it logs in again.
//!
//!     cargo run --release -p proto --example handshake_flood -- [N] [RATE] [SECONDS]
//!
//! The world is `support/world.rs`'s: one-core server paying the real CPU
//! time of each datagram, a 212 KiB socket buffer, 20 ms each way. Prints
//! the server's seconds, then the share of clients logged in again and
//! their login time (from the change to logged in), the server's tables
//! at their largest, and what it sent the flood's addresses against what
//! they sent.

#[path = "support/world.rs"]
mod world;

use proto::{Gauges, Identity, Server, ServerConfig};
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use world::{Flood, World};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let rate: f64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000.0);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let start = Instant::now();
    let server_id = Identity::generate();
    let server_addr: SocketAddr = "10.0.0.1:7000".parse().unwrap();
    let config = ServerConfig::default();
    let server = Server::new(server_id.clone(), config.clone(), 1);
    let mut world = World::new(start, server, server_addr, n);
    world.add_clients(
        n,
        server_id.noise_public(),
        Duration::from_secs(10),
        &mut rng,
    );
    let setup = start + Duration::from_secs(40);
    world.run(setup, |w| w.now >= setup);
    println!(
        "{n} clients registered and logged in: {}",
        world.logged_in()
    );

    // The flood: a real XX initiation (its Noise message is an ephemeral
    // key: no work to read, two DH operations to answer), padded to the
    // minimum, from a new random address each time.
    let mut hs = proto::Handshake::initiator(
        proto::wire::Pattern::XX,
        Identity::generate().noise_private(),
        None,
    )
    .unwrap();
    let noise = hs.write(&[]).unwrap();
    let init = proto::wire::Packet::HandshakeInit {
        sender: 1,
        pattern: proto::wire::Pattern::XX,
        noise: &noise,
        cookie: [0; 16],
    }
    .encode();
    let t0 = world.now;
    world.server = Some(Server::new(server_id, config, 2));
    world.mark = t0;
    world.seconds.clear();
    world.logged_in_at = vec![None; n];
    world.flood = Some(Flood::new(rate, t0, t0 + Duration::from_secs(secs), init));
    let mut told: Vec<(Instant, usize)> = (0..n)
        .map(|i| {
            (
                t0 + Duration::from_millis(1_000 + rng.gen_range(0..1000)),
                i,
            )
        })
        .collect();
    told.sort();
    let mut notice = vec![t0; n];
    let mut peak = Gauges::default();
    let sample = |w: &World, peak: &mut Gauges| {
        if let Some(s) = &w.server {
            let g = s.gauges();
            peak.sessions = peak.sessions.max(g.sessions);
            peak.handshakes = peak.handshakes.max(g.handshakes);
            peak.not_logged_in = peak.not_logged_in.max(g.not_logged_in);
        }
    };
    for (at, i) in told {
        world.run(at, |w| w.now >= at);
        sample(&world, &mut peak);
        world.nodes[i].handle_network_change(at);
        notice[i] = at;
        world.logged_in_at[i] = None;
        world.drain_node(i);
    }
    let end = t0 + Duration::from_secs(secs + 30);
    let flood_end = t0 + Duration::from_secs(secs);
    while world.now < end
        && (world.now < flood_end || world.logged_in_at.iter().any(|t| t.is_none()))
    {
        let slice = world.now + Duration::from_millis(100);
        world.run(slice, |w| w.now >= slice);
        sample(&world, &mut peak);
    }
    world.report(&format!(
        "{rate} spoofed initiations a second for {secs} s; the server restarted at 0 s, {n} clients back from 1 s"
    ));
    let mut lat: Vec<f64> = (0..n)
        .filter_map(|i| {
            world.logged_in_at[i]
                .filter(|t| *t >= notice[i])
                .map(|t| (t - notice[i]).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)));
    let in_flood = (0..n)
        .filter(|&i| world.logged_in_at[i].is_some_and(|t| t < flood_end))
        .count();
    println!(
        "logged in again: {} of {n} ({in_flood} while the flood went on); login time p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        lat.len(),
        pct(0.5).unwrap_or(&f64::NAN),
        pct(0.95).unwrap_or(&f64::NAN),
        lat.last().unwrap_or(&f64::NAN),
    );
    let stats = world.server.as_ref().unwrap().stats().clone();
    println!(
        "server tables at their largest: {} sessions, {} handshakes, {} not logged in (cap {}); cookies sent {}, dropped over rate {}, evicted {}",
        peak.sessions,
        peak.handshakes,
        peak.not_logged_in,
        ServerConfig::default().max_anonymous,
        stats.cookies_sent,
        stats.handshakes_limited,
        stats.anonymous_evicted
    );
    let f = world.flood.as_ref().unwrap();
    println!(
        "to the flood's addresses: {:.1} MB sent for {:.1} MB received ({:.2}x)",
        f.answered as f64 / 1e6,
        f.sent as f64 / 1e6,
        f.answered as f64 / f.sent.max(1) as f64
    );
}
