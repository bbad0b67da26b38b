//! What user-list pages cost the rendezvous server with many users online
//! (the hostile-internet issue's D5 figure): N users logged in (default
//! 100,000), then LISTERS of them page through the list as fast as their
//! round trips and the per-session limit allow, for 10 s.
//!
//!     cargo run --release -p proto --example user_list -- [N] [LISTERS]
//!
//! The world is `support/world.rs`'s (one-core server paying the real CPU
//! time of each datagram, 20 ms each way). Pages are counted from what
//! the server's counter; their cost is the server's CPU spent on the
//! listers' datagrams (beside it: its CPU in 10 s of heartbeats alone,
//! and in the 10 s of listing).

#[path = "support/world.rs"]
mod world;

use proto::{Identity, NodeEvent, Server, ServerConfig};
use rand::SeedableRng;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use world::World;

fn cpu(world: &World) -> Duration {
    world.seconds.values().map(|s| s.cpu).sum()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let listers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let start = Instant::now();
    let server_id = Identity::generate();
    let server_addr: SocketAddr = "10.0.0.1:7000".parse().unwrap();
    let config = ServerConfig {
        max_sessions: n + 1000,
        max_anonymous: n + 1000,
        registrations_per_hour: 0,
        handshakes_per_sec: 1_000_000,
        ..ServerConfig::default()
    };
    let server = Server::new(server_id.clone(), config, 1);
    let mut world = World::new(start, server, server_addr, n);
    let spread = (n as u64 / 500).max(10);
    world.add_clients(
        n,
        server_id.noise_public(),
        Duration::from_secs(spread),
        &mut rng,
    );
    let setup = start + Duration::from_secs(spread + 30);
    world.run(setup, |w| w.now >= setup);
    println!("{n} users registered and logged in: {}", world.logged_in());
    let online = world.server.as_ref().unwrap().gauges().online;

    // 10 s of heartbeats alone.
    world.mark = world.now;
    world.seconds.clear();
    let quiet = world.now + Duration::from_secs(10);
    world.run(quiet, |w| w.now >= quiet);
    let base = cpu(&world);

    // 10 s of listing.
    let pages_before = world.server.as_ref().unwrap().stats().list_pages;
    world.watch = world.addrs[..listers].iter().copied().collect();
    world.mark = world.now;
    world.seconds.clear();
    let end = world.now + Duration::from_secs(10);
    let mut users = 0usize;
    let mut refused = 0usize;
    for i in 0..listers {
        let now = world.now;
        world.nodes[i].list_users(now);
        world.drain_node(i);
    }
    while world.now < end {
        let slice = world.now + Duration::from_millis(50);
        world.run(slice, |w| w.now >= slice);
        for i in 0..listers {
            // (drain_node already took the events; ask again when a
            // listing ends: the node has no listing under way then.)
            let _ = &world.nodes[i];
        }
        for i in 0..listers {
            let events: Vec<NodeEvent> = std::mem::take(&mut world.events[i]);
            for e in events {
                match e {
                    NodeEvent::Users { result: Ok(u), .. } => users += u.len(),
                    NodeEvent::Users { result: Err(_), .. } => refused += 1,
                    _ => continue,
                }
                let now = world.now;
                world.nodes[i].list_users(now);
                world.drain_node(i);
            }
        }
    }
    let listing = cpu(&world);
    let stats = world.server.as_ref().unwrap().stats();
    let pages = (stats.list_pages - pages_before) as usize;
    // What the listers' datagrams cost the server (their pages, and a
    // heartbeat or two).
    let per_page = world.watched_cpu.as_secs_f64() / pages.max(1) as f64;
    println!(
        "{online} online; {listers} listers got {pages} pages in 10 s ({users} names in listings that ended), {refused} listings refused (rate limited)"
    );
    println!(
        "server CPU: {:.0} ms in 10 s of heartbeats alone, {:.0} ms with the listing, of which the listers' requests {:.1} ms: {:.1} µs a page; 200 pages a second would take {:.2} % of a core",
        base.as_secs_f64() * 1000.0,
        listing.as_secs_f64() * 1000.0,
        world.watched_cpu.as_secs_f64() * 1000.0,
        per_page * 1e6,
        per_page * 200.0 * 100.0
    );
}
