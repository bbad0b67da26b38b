//! PeerFlow between two [`PeerFlow`] over a simulated link in virtual
//! time, with in-memory files: loss, reordering and duplication both ways,
//! a corrupted read, restarts of either side, cancellation.

use super::*;
use rand::{Rng, RngCore, SeedableRng};

#[derive(Clone, Copy)]
struct Link {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    dup: f64,
    /// The largest datagram the link carries; larger ones are dropped.
    mtu: usize,
}

const CLEAN: Link = Link {
    delay: Duration::from_millis(10),
    jitter: Duration::ZERO,
    loss: 0.0,
    dup: 0.0,
    mtu: crate::wire::MAX_DATAGRAM,
};

const BAD: Link = Link {
    delay: Duration::from_millis(20),
    jitter: Duration::from_millis(15),
    loss: 0.05,
    dup: 0.03,
    mtu: crate::wire::MAX_DATAGRAM,
};

/// One side: its machine, the files it sends, the files it receives.
struct Side {
    t: PeerFlow,
    sources: BTreeMap<u64, Vec<u8>>,
    /// A read at this (id, offset) returns one flipped byte, once.
    corrupt: Option<(u64, u64)>,
    disk: BTreeMap<u64, Vec<u8>>,
    events: Vec<TransferEvent>,
    /// Disk work done, in order.
    disk_log: Vec<DiskWork>,
    /// Pieces verified, as the owner would store them.
    verified: BTreeMap<u64, Vec<bool>>,
    /// Decline offers instead of accepting them.
    decline: bool,
}

struct Src<'a> {
    sources: &'a BTreeMap<u64, Vec<u8>>,
    corrupt: &'a mut Option<(u64, u64)>,
}

impl FileSource for Src<'_> {
    fn read(&mut self, id: TransferId, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let id = id.0;
        let f = self.sources.get(&id).ok_or(std::io::ErrorKind::NotFound)?;
        let start = (offset as usize).min(f.len());
        let n = buf.len().min(f.len() - start);
        buf[..n].copy_from_slice(&f[start..start + n]);
        if *self.corrupt == Some((id, offset)) {
            buf[0] ^= 0xff;
            *self.corrupt = None;
        }
        Ok(n)
    }
}

/// How the tests offer file `id`: `file-ID`, whole pieces of
/// [`PIECE_SIZE`], no directory.
fn desc(id: u64, size: u64, hash: [u8; 32]) -> FileDesc {
    FileDesc {
        id: TransferId(id),
        path: format!("file-{id}"),
        size,
        piece_size: PIECE_SIZE,
        hash,
        group: None,
    }
}

impl Side {
    fn new() -> Self {
        Side {
            t: PeerFlow::new(rand::random(), 0),
            sources: BTreeMap::new(),
            corrupt: None,
            disk: BTreeMap::new(),
            events: Vec::new(),
            disk_log: Vec::new(),
            verified: BTreeMap::new(),
            decline: false,
        }
    }

    fn offer(&mut self, id: u64, data: Vec<u8>) {
        let pieces: Vec<[u8; 32]> = data.chunks(PIECE_SIZE as usize).map(piece_hash).collect();
        let hash = file_hash(&pieces);
        self.t.offer(desc(id, data.len() as u64, hash), pieces);
        self.sources.insert(id, data);
    }

    /// Acts on disk work and events as a daemon would: writes, checks,
    /// accepts offers.
    fn handle_events(&mut self) {
        loop {
            let mut busy = false;
            while let Some(work) = self.t.poll_disk() {
                busy = true;
                self.do_disk(&work);
                self.disk_log.push(work);
            }
            while let Some(ev) = self.t.poll_event() {
                busy = true;
                match &ev {
                    TransferEvent::Offered(f) if self.decline => {
                        self.t.cancel(f.id, "declined");
                    }
                    TransferEvent::Offered(f) => {
                        self.disk.insert(f.id.0, vec![0; f.size as usize]);
                        self.t.accept(f.id, &[]);
                    }
                    _ => {}
                }
                self.events.push(ev);
            }
            if !busy {
                return;
            }
        }
    }

    fn do_disk(&mut self, work: &DiskWork) {
        match work {
            DiskWork::Write { id, offset, data } => {
                let f = self.disk.get_mut(&id.0).expect("accepted file");
                let o = *offset as usize;
                f[o..o + data.len()].copy_from_slice(data);
            }
            DiskWork::VerifyPiece {
                id,
                piece,
                offset,
                len,
                hash,
            } => {
                let f = &self.disk[&id.0];
                let o = *offset as usize;
                let got: [u8; 32] = piece_hash(&f[o..o + *len as usize]);
                let ok = &got == hash;
                if ok {
                    let n = f.len().div_ceil(PIECE_SIZE as usize);
                    self.verified.entry(id.0).or_insert_with(|| vec![false; n])[*piece as usize] =
                        true;
                }
                self.t.piece_checked(*id, *piece, ok);
            }
            DiskWork::VerifyFile { id } => {
                // The tests compare the file with the sender's.
                self.t.file_checked(*id, Ok(()));
            }
        }
    }

    fn finished(&self, id: u64) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, TransferEvent::Finished { id: i } if i.0 == id))
    }

    fn ended(&self, id: u64) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, TransferEvent::Ended { id: i, .. } if i.0 == id))
    }
}

struct Sim {
    now: Instant,
    start: Instant,
    a: Side,
    b: Side,
    link: Link,
    rng: rand::rngs::StdRng,
    /// (arrival, order, to_b, message)
    wire: Vec<(Instant, u64, bool, PeerToPeer)>,
    order: u64,
}

impl Sim {
    fn new(seed: u64, link: Link) -> Self {
        let now = Instant::now();
        Sim {
            now,
            start: now,
            a: Side::new(),
            b: Side::new(),
            link,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            wire: Vec::new(),
            order: 0,
        }
    }

    fn side(&mut self, to_b: bool) -> &mut Side {
        if to_b {
            &mut self.b
        } else {
            &mut self.a
        }
    }

    /// Runs until `done`, failing after `limit` of virtual time.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) {
        let deadline = self.now + limit;
        let mut idle_steps = 0;
        while !done(self) {
            assert!(
                self.now < deadline,
                "not done after {:?} of virtual time",
                self.now - self.start
            );
            self.step();
            idle_steps += 1;
            assert!(idle_steps < 10_000_000, "no progress");
        }
    }

    fn step(&mut self) {
        let now = self.now;
        // Each side: events, then what it sends now.
        for from_a in [true, false] {
            let side = if from_a { &mut self.a } else { &mut self.b };
            side.handle_events();
            let mut out = Vec::new();
            loop {
                let mut src = Src {
                    sources: &side.sources,
                    corrupt: &mut side.corrupt,
                };
                match side.t.poll_packet(now, &mut src) {
                    Some(p) => out.push(p),
                    None => break,
                }
            }
            for p in out {
                // The datagram: the message sealed in a data packet.
                let size = p.encode().len() + crate::wire::DATA_HEADER_LEN + 16;
                if self.rng.gen_bool(self.link.loss) || size > self.link.mtu {
                    continue;
                }
                let copies = if self.rng.gen_bool(self.link.dup) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let jitter = self.link.jitter.mul_f64(self.rng.gen());
                    self.wire.push((
                        now + self.link.delay + jitter,
                        self.order,
                        from_a,
                        p.clone(),
                    ));
                    self.order += 1;
                }
            }
        }
        // The next thing that happens.
        let next = [
            self.wire.iter().map(|w| w.0).min(),
            self.a.t.poll_timeout(now),
            self.b.t.poll_timeout(now),
        ]
        .into_iter()
        .flatten()
        .min();
        // Nothing scheduled: both sides are idle; let time pass.
        let next = next.unwrap_or(now + Duration::from_secs(1));
        self.now = self.now.max(next);
        let now = self.now;
        let (mut due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.wire)
            .into_iter()
            .partition(|w| w.0 <= now);
        self.wire = rest;
        due.sort_by_key(|w| (w.0, w.1));
        for (_, _, to_b, msg) in due {
            self.side(to_b).t.handle(now, msg);
        }
        for side in [&mut self.a, &mut self.b] {
            if side.t.poll_timeout(now).is_some_and(|t| t <= now) {
                side.t.handle_timeout(now);
            }
        }
    }
}

fn random_file(rng: &mut impl RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

#[test]
fn a_file_arrives_whole_and_verified() {
    let mut sim = Sim::new(1, CLEAN);
    let data = random_file(&mut sim.rng, 3 * PIECE_SIZE as usize + 12_345);
    sim.a.offer(7, data.clone());
    sim.run_until(Duration::from_secs(60), |s| {
        s.a.finished(7) && s.b.finished(7)
    });
    assert_eq!(sim.b.disk[&7], data);
    let st = sim.a.t.status();
    assert_eq!(st[0].done, data.len() as u64);
    assert_eq!(st[0].phase, Phase::Done);
}

#[test]
fn several_transfers_both_ways_survive_loss_reordering_and_duplication() {
    for seed in 2..8 {
        let mut sim = Sim::new(seed, BAD);
        let files: Vec<(u64, bool, Vec<u8>)> = (0..4)
            .map(|i| {
                let len = sim.rng.gen_range(0..2 * PIECE_SIZE as usize);
                (100 + i, i % 2 == 0, random_file(&mut sim.rng, len))
            })
            .collect();
        for (id, from_a, data) in &files {
            let side = if *from_a { &mut sim.a } else { &mut sim.b };
            side.offer(*id, data.clone());
        }
        sim.run_until(Duration::from_secs(600), |s| {
            files.iter().all(|(id, from_a, _)| {
                let (tx, rx) = if *from_a { (&s.a, &s.b) } else { (&s.b, &s.a) };
                tx.finished(*id) && rx.finished(*id)
            })
        });
        for (id, from_a, data) in &files {
            let rx = if *from_a { &sim.b } else { &sim.a };
            assert_eq!(&rx.disk[id], data, "seed {seed} file {id}");
        }
    }
}

#[test]
fn a_corrupted_piece_is_detected_and_fetched_again() {
    let mut sim = Sim::new(9, CLEAN);
    let data = random_file(&mut sim.rng, 2 * PIECE_SIZE as usize);
    sim.a.offer(1, data.clone());
    // The read of the first packet of the second piece comes back wrong
    // (a bad disk, a file changed under us, a bug).
    sim.a.corrupt = Some((1, PIECE_SIZE as u64));
    sim.run_until(Duration::from_secs(60), |s| {
        s.a.finished(1) && s.b.finished(1)
    });
    assert_eq!(sim.b.disk[&1], data);
    assert!(sim.a.corrupt.is_none(), "the corrupt read happened");
}

#[test]
fn the_receiver_restarts_and_resumes_from_its_verified_pieces() {
    // With a new session the sender sees (as after a reconnection), and
    // without (the peer came back under the session's feet, as a rekey).
    for new_session in [true, false] {
        receiver_restart(new_session);
    }
}

fn receiver_restart(new_session: bool) {
    let mut sim = Sim::new(10, BAD);
    let data = random_file(&mut sim.rng, 6 * PIECE_SIZE as usize + 99);
    sim.a.offer(5, data.clone());
    sim.run_until(Duration::from_secs(600), |s| {
        s.b.verified
            .get(&5)
            .is_some_and(|v| v.iter().filter(|x| **x).count() >= 3)
    });
    // The receiver's daemon is killed: its machine is gone; its disk and
    // the verified pieces it stored stay. Packets in flight are lost.
    let have = sim.b.verified[&5].clone();
    let disk = sim.b.disk.remove(&5).unwrap();
    let pieces: Vec<[u8; 32]> = data.chunks(PIECE_SIZE as usize).map(piece_hash).collect();
    let (size, hash) = (data.len() as u64, file_hash(&pieces));
    sim.b = Side::new();
    sim.b.disk.insert(5, disk);
    sim.b.verified.insert(5, have.clone());
    sim.wire.clear();
    sim.b.t.restore_incoming(desc(5, size, hash), &have);
    if new_session {
        sim.a.t.session_restarted();
    }
    sim.run_until(Duration::from_secs(600), |s| {
        s.a.finished(5) && s.b.finished(5)
    });
    assert_eq!(sim.b.disk[&5], data);
    // Resumed, not restarted: the pieces it held were not sent again.
    let written: u64 = sim
        .b
        .disk_log
        .iter()
        .filter_map(|e| match e {
            DiskWork::Write { data, .. } => Some(data.len() as u64),
            _ => None,
        })
        .sum();
    let held = have.iter().filter(|x| **x).count() as u64 * PIECE_SIZE as u64;
    assert!(written <= size - held + 4 * PIECE_SIZE as u64, "{written}");
}

#[test]
fn the_sender_restarts_and_the_receiver_tells_it_where_to_go_on() {
    let mut sim = Sim::new(11, CLEAN);
    let data = random_file(&mut sim.rng, 4 * PIECE_SIZE as usize);
    sim.a.offer(8, data.clone());
    sim.run_until(Duration::from_secs(600), |s| {
        s.b.verified
            .get(&8)
            .is_some_and(|v| v.iter().filter(|x| **x).count() >= 2)
    });
    // The sender's daemon restarts and offers the same transfer again.
    sim.a = Side::new();
    sim.wire.clear();
    sim.a.offer(8, data.clone());
    sim.b.t.session_restarted();
    sim.run_until(Duration::from_secs(600), |s| {
        s.a.finished(8) && s.b.finished(8)
    });
    assert_eq!(sim.b.disk[&8], data);
}

#[test]
fn cancel_and_decline_end_both_sides() {
    let mut sim = Sim::new(12, CLEAN);
    let data = random_file(&mut sim.rng, 3 * PIECE_SIZE as usize);
    sim.a.offer(3, data);
    sim.run_until(Duration::from_secs(60), |s| {
        s.b.verified.get(&3).is_some_and(|v| v.iter().any(|x| *x))
    });
    assert!(sim.b.t.cancel(TransferId(3), "changed my mind"));
    sim.run_until(Duration::from_secs(60), |s| s.a.ended(3) && s.b.ended(3));
    assert!(!sim.a.finished(3));
    // Nothing more is sent for it.
    let before = sim.a.t.flow().stats.sent_packets;
    let later = sim.now + Duration::from_secs(60);
    sim.run_until(Duration::from_secs(120), |s| s.now > later);
    assert!(sim.a.t.flow().stats.sent_packets <= before + 2);
}

#[test]
fn a_declined_offer_ends_both_sides_and_sends_nothing() {
    let mut sim = Sim::new(13, CLEAN);
    sim.b.decline = true;
    let data = random_file(&mut sim.rng, PIECE_SIZE as usize);
    sim.a.offer(4, data);
    sim.run_until(Duration::from_secs(60), |s| s.a.ended(4) && s.b.ended(4));
    assert!(sim.b.disk.is_empty());
    assert!(!sim
        .b
        .disk_log
        .iter()
        .any(|e| matches!(e, DiskWork::Write { .. })));
}

#[test]
fn one_side_starting_a_new_flow_alone_does_not_stall_the_other() {
    // Our session restarted (we saw `Up`), the peer's did not: it keeps
    // its flow and epoch. Both directions must go on.
    for (seed, restart_sender) in [(14, true), (15, false)] {
        let mut sim = Sim::new(seed, BAD);
        let data = random_file(&mut sim.rng, 4 * PIECE_SIZE as usize);
        sim.a.offer(6, data.clone());
        sim.run_until(Duration::from_secs(600), |s| {
            s.b.verified.get(&6).is_some_and(|v| v.iter().any(|x| *x))
        });
        if restart_sender {
            sim.a.t.session_restarted();
        } else {
            sim.b.t.session_restarted();
        }
        sim.run_until(Duration::from_secs(600), |s| {
            s.a.finished(6) && s.b.finished(6)
        });
        assert_eq!(sim.b.disk[&6], data);
    }
}

#[test]
fn an_offer_too_large_to_track_is_refused_not_allocated() {
    let now = Instant::now();
    let mut t = PeerFlow::new(1, 0);
    t.handle(
        now,
        PeerToPeer::Flow {
            epoch: 1,
            pn: 0,
            frame: FlowFrame::Offer {
                id: 9,
                path: "huge".into(),
                size: u64::MAX,
                piece_size: 1,
                hash: [0; 32],
                group: 0,
                group_files: 0,
            },
        },
    );
    assert!(t.poll_event().is_none(), "no offer shown");
    assert!(t.status().is_empty());
}

#[test]
fn piece_hashes_that_do_not_match_the_offer_end_the_transfer() {
    let mut sim = Sim::new(9, CLEAN);
    let data = random_file(&mut sim.rng, 2 * PIECE_SIZE as usize);
    let pieces: Vec<[u8; 32]> = data.chunks(PIECE_SIZE as usize).map(piece_hash).collect();
    // Offered under the hash of other pieces.
    let mut other = pieces.clone();
    other[1][0] ^= 1;
    sim.a
        .t
        .offer(desc(4, data.len() as u64, file_hash(&other)), pieces);
    sim.a.sources.insert(4, data);
    sim.run_until(Duration::from_secs(60), |s| s.a.ended(4) && s.b.ended(4));
    assert!(!sim.b.disk_log.iter().any(|e| matches!(
        e,
        DiskWork::VerifyPiece { .. } | DiskWork::VerifyFile { .. }
    )));
}

#[test]
fn an_empty_file_arrives() {
    let mut sim = Sim::new(10, CLEAN);
    sim.a.offer(3, Vec::new());
    sim.run_until(Duration::from_secs(60), |s| {
        s.a.finished(3) && s.b.finished(3)
    });
    assert!(sim.b.disk[&3].is_empty());
}

/// Both sides on a direct path (path MTU discovery on).
fn direct(sim: &mut Sim) {
    let addr = std::net::SocketAddr::from(([192, 0, 2, 1], 4000));
    sim.a.t.set_path(addr, crate::wire::MAX_DATAGRAM);
    sim.b.t.set_path(addr, crate::wire::MAX_DATAGRAM);
}

#[test]
fn path_mtu_discovery_finds_what_the_link_carries() {
    for (mtu, found) in [
        (crate::wire::MAX_DATAGRAM, crate::wire::MAX_DATAGRAM),
        (9000, 8952),
        (1500, 1452),
        (1400, pmtud::BASE),
    ] {
        let mut sim = Sim::new(11, Link { mtu, ..BAD });
        direct(&mut sim);
        let data = random_file(&mut sim.rng, 4 * PIECE_SIZE as usize);
        sim.a.offer(2, data.clone());
        sim.run_until(Duration::from_secs(600), |s| {
            s.a.finished(2) && s.b.finished(2)
        });
        assert_eq!(sim.b.disk[&2], data, "mtu {mtu}");
        assert_eq!(sim.a.t.datagram_size(), found, "mtu {mtu}");
    }
}

#[test]
fn a_path_that_stops_carrying_large_packets_falls_back_and_loses_nothing() {
    let mut sim = Sim::new(12, CLEAN);
    direct(&mut sim);
    let data = random_file(&mut sim.rng, 24 * PIECE_SIZE as usize);
    sim.a.offer(6, data.clone());
    sim.run_until(Duration::from_secs(60), |s| {
        s.a.t.datagram_size() == crate::wire::MAX_DATAGRAM
            && s.b.verified.get(&6).is_some_and(|v| v.iter().any(|x| *x))
    });
    // A route change the session does not see: large packets vanish.
    sim.link.mtu = 1500;
    sim.run_until(Duration::from_secs(600), |s| {
        s.a.finished(6) && s.b.finished(6)
    });
    assert_eq!(sim.b.disk[&6], data);
    assert_eq!(sim.a.t.datagram_size(), 1452);
}

#[test]
fn a_new_path_starts_from_the_base_size() {
    let mut sim = Sim::new(13, CLEAN);
    direct(&mut sim);
    let data = random_file(&mut sim.rng, 8 * PIECE_SIZE as usize);
    sim.a.offer(8, data.clone());
    sim.run_until(Duration::from_secs(60), |s| {
        s.a.t.datagram_size() == crate::wire::MAX_DATAGRAM
    });
    // Moved to the relay, which carries only the base size.
    let relay = std::net::SocketAddr::from(([198, 51, 100, 1], 3478));
    sim.a.t.set_path(relay, crate::wire::MAX_PACKET);
    sim.b.t.set_path(relay, crate::wire::MAX_PACKET);
    sim.link.mtu = crate::wire::MAX_PACKET;
    assert_eq!(sim.a.t.datagram_size(), pmtud::BASE);
    sim.run_until(Duration::from_secs(600), |s| {
        s.a.finished(8) && s.b.finished(8)
    });
    assert_eq!(sim.b.disk[&8], data);
    assert_eq!(sim.a.t.datagram_size(), pmtud::BASE);
}

#[test]
fn a_file_of_a_directory_the_sender_cannot_read_is_reported_not_awaited() {
    let mut sim = Sim::new(14, BAD);
    let group = Group {
        id: GroupId(77),
        files: 2,
    };
    sim.a.t.skip(
        TransferId(9),
        "photos/b.jpg".into(),
        group,
        "the sender could not read it",
    );
    sim.run_until(Duration::from_secs(60), |s| {
        s.b.events.iter().any(|e| {
            matches!(
                e,
                TransferEvent::Skipped { id: TransferId(9), group: g, .. } if *g == group
            )
        })
    });
    // (A copy sent again after a lost acknowledgement is reported again;
    // the daemon keeps one record per id.)
}

/// Feeds `t` one flow frame.
fn frame(t: &mut PeerFlow, now: Instant, pn: u64, frame: FlowFrame) {
    t.handle(
        now,
        PeerToPeer::Flow {
            epoch: 1,
            pn,
            frame,
        },
    );
}

fn offer(id: u64, size: u64, piece_size: u32) -> FlowFrame {
    FlowFrame::Offer {
        id,
        path: format!("f{id}"),
        size,
        piece_size,
        hash: [0; 32],
        group: 0,
        group_files: 0,
    }
}

/// Control frames `t` queued.
fn cancels(t: &mut PeerFlow) -> Vec<(u64, String)> {
    std::iter::from_fn(|| t.control.pop_front())
        .filter_map(|f| match f {
            FlowFrame::Cancel { id, reason } => Some((id, reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn tiny_pieces_and_too_many_pieces_are_refused_with_a_reason() {
    // D2: 16 MiB in 1-byte pieces (2^24 pieces, 1.07 GB to accept before)
    // is refused, and the sender is told why; so is a piece count past
    // MAX_PIECES. A small file in one small piece is fine.
    let now = Instant::now();
    let mut t = PeerFlow::new(1, 0);
    frame(&mut t, now, 0, offer(1, 16 << 20, 1));
    frame(
        &mut t,
        now,
        1,
        offer(2, (MAX_PIECES + 1) * PIECE_SIZE as u64, PIECE_SIZE),
    );
    frame(&mut t, now, 2, offer(3, 100, 100));
    let refused = cancels(&mut t);
    assert_eq!(refused.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
    assert!(refused[0].1.contains("at least 16384"), "{refused:?}");
    assert!(refused[1].1.contains("pieces"), "{refused:?}");
    assert_eq!(t.status().len(), 1, "only the small file is offered");
    // What a sender picks stays within both bounds.
    for size in [0, 1, 1 << 30, 64 << 30, (64 << 30) + 1, 4 << 40] {
        let p = piece_size_for(size).unwrap();
        assert!(
            p >= PIECE_SIZE && size.div_ceil(p as u64) <= MAX_PIECES,
            "{size}"
        );
    }
    assert_eq!(piece_size_for((4 << 40) + 1), None);
}

#[test]
fn an_accepted_transfer_costs_its_hashes_and_a_byte_a_piece() {
    // D2: the largest acceptable transfer (MAX_PIECES pieces) holds a
    // piece hash slot and one byte of state per piece: about 2.2 MB, and
    // a sender scattering fragments cannot make it hold more than
    // MAX_RANGES_HELD ranges (the piece is asked for again instead).
    let now = Instant::now();
    let mut t = PeerFlow::new(1, 0);
    let size = MAX_PIECES * MIN_PIECE_SIZE as u64;
    frame(&mut t, now, 0, offer(5, size, MIN_PIECE_SIZE));
    assert!(t.accept(TransferId(5), &[]));
    let inc = &t.incoming[&5];
    let bytes = inc.pieces.capacity()
        + inc.piece_hashes.capacity() * std::mem::size_of::<Option<[u8; 32]>>();
    assert_eq!(inc.pieces.len() as u64, MAX_PIECES);
    assert!(bytes <= 2_300_000, "{bytes} bytes");
    // Every other 8 bytes of piece after piece: scattered.
    let mut pn = 1;
    'out: for piece in 0..64u64 {
        for k in 0..(MIN_PIECE_SIZE as u64 / 16) {
            let offset = piece * MIN_PIECE_SIZE as u64 + k * 16;
            frame(
                &mut t,
                now,
                pn,
                FlowFrame::Data {
                    id: 5,
                    offset,
                    data: vec![1; 8],
                },
            );
            pn += 1;
            if pn > 20_000 {
                break 'out;
            }
        }
    }
    let inc = &t.incoming[&5];
    assert!(inc.ranges <= MAX_RANGES_HELD, "{} ranges", inc.ranges);
    let asked_again = std::iter::from_fn(|| t.control.pop_front())
        .filter(|f| matches!(f, FlowFrame::BadPiece { id: 5, .. }))
        .count();
    assert!(asked_again > 0);
}

#[test]
fn pending_offers_per_peer_are_capped_and_the_excess_refused() {
    // D2: past MAX_PENDING_OFFERS unanswered offers, the next is refused
    // with a reason the sender sees; answering some makes room.
    let now = Instant::now();
    let mut t = PeerFlow::new(1, 0);
    for id in 1..=MAX_PENDING_OFFERS as u64 + 1 {
        frame(&mut t, now, id, offer(id, 10, 10));
    }
    let refused = cancels(&mut t);
    assert_eq!(refused.len(), 1, "{:?}", &refused[..refused.len().min(3)]);
    assert_eq!(refused[0].0, MAX_PENDING_OFFERS as u64 + 1);
    assert!(refused[0].1.contains("too many offers"));
    assert!(t.cancel(TransferId(1), "no"));
    let next = MAX_PENDING_OFFERS as u64 + 2;
    frame(&mut t, now, next, offer(next, 10, 10));
    assert!(cancels(&mut t).iter().all(|(id, _)| *id != next));
}

#[test]
fn skipped_notices_per_peer_are_capped() {
    // Each "skipped" notice becomes a record at the receiver: past
    // MAX_SKIPPED from one peer they are dropped and counted.
    let now = Instant::now();
    let mut t = PeerFlow::new(1, 0);
    let skipped = |id: u64| FlowFrame::Skipped {
        id,
        path: format!("d/f{id}"),
        group: 7,
        group_files: 3,
        reason: "unreadable".into(),
    };
    for id in 1..=MAX_SKIPPED as u64 + 5 {
        frame(&mut t, now, id, skipped(id));
    }
    let taken = std::iter::from_fn(|| t.poll_event())
        .filter(|e| matches!(e, TransferEvent::Skipped { .. }))
        .count();
    assert_eq!(taken, MAX_SKIPPED);
    assert_eq!(t.skipped_dropped, 5);
}

#[test]
fn chat_parts_lost_in_large_packets_are_cut_again_to_fit() {
    // Long messages on a direct path that raised its packet size, then
    // stops carrying large packets (a route change): the parts lost in
    // large packets go again cut to what the path carries, and every
    // message arrives whole.
    let mut sim = Sim::new(14, CLEAN);
    direct(&mut sim);
    let body = |seq: u64| -> Vec<u8> {
        (0..crate::wire::MAX_MESSAGE_BYTES)
            .map(|i| (i as u64 ^ seq) as u8)
            .collect()
    };
    for seq in 0..200 {
        sim.a.t.send_chat(crate::reliable::ChatMessage {
            seq,
            sent_ms: 0,
            body: body(seq),
        });
    }
    let mut got = Vec::new();
    sim.run_until(Duration::from_secs(60), |s| {
        s.a.t.datagram_size() == crate::wire::MAX_DATAGRAM
    });
    sim.link.mtu = 1500;
    let deadline = sim.now + Duration::from_secs(600);
    while got.len() < 200 {
        assert!(sim.now < deadline, "{} of 200 delivered", got.len());
        sim.step();
        got.extend(
            std::iter::from_fn(|| sim.b.t.poll_chat_event()).filter_map(|e| match e {
                crate::reliable::ReliableEvent::Delivered { seq, body, .. } => Some((seq, body)),
                _ => None,
            }),
        );
    }
    for (i, (seq, b)) in got.iter().enumerate() {
        assert_eq!((*seq, b == &body(*seq)), (i as u64, true));
    }
}
