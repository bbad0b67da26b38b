//! The rendezvous server machine fed arbitrary datagrams from a few
//! addresses, with time passing: no panic, and no reply to an address
//! larger than what came from it (handshake-level amplification).
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::{Identity, MemoryStore, Server, ServerConfig};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let id = Identity::from_secret_bytes(&[7u8; 64]).expect("64 bytes");
    let mut server = Server::new(id, ServerConfig::default(), 1);
    let mut store = MemoryStore::default();
    let start = Instant::now();
    let mut now = start;
    // Each datagram: [address byte][time step byte][length byte][bytes...]
    let mut rest = data;
    let mut received = [0usize; 4];
    let mut sent = [0usize; 4];
    let addrs: [SocketAddr; 4] = [
        "192.0.2.1:1000".parse().unwrap(),
        "192.0.2.2:2000".parse().unwrap(),
        "[2001:db8::1]:3000".parse().unwrap(),
        "198.51.100.9:4000".parse().unwrap(),
    ];
    while let [a, dt, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (datagram, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_millis(*dt as u64 * 10);
        let from = addrs[*a as usize % 4];
        received[*a as usize % 4] += datagram.len();
        server.handle_datagram(now, from, datagram, &mut store);
        server.handle_timeout(now);
        while let Some(t) = server.poll_transmit() {
            if let Some(i) = addrs.iter().position(|x| *x == t.dst) {
                sent[i] += t.payload.len();
            }
        }
    }
    // Without a session (none can be made from random bytes), every
    // answer is at most the size of what it answers.
    for i in 0..4 {
        assert!(sent[i] <= received[i], "{} sent for {} received", sent[i], received[i]);
    }
});
