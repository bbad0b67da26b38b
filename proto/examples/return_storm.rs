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

#[path = "support/world.rs"]
mod world;

use proto::{Identity, Server, ServerConfig};
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use world::World;

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
    let server = Server::new(server_id.clone(), config.clone(), 1);
    let mut world = World::new(start, server, server_addr, n);
    // Everyone registers over the first 30 s (not measured), then is
    // logged in and heartbeating (25 s).
    world.add_clients(
        n,
        server_id.noise_public(),
        Duration::from_secs(30),
        &mut rng,
    );
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
