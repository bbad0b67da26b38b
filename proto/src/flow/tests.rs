//! A bulk transfer through [`Flow`] over a simulated path, in virtual
//! time: a bottleneck with a rate and a drop-tail queue, propagation delay,
//! seeded random loss, jitter (which reorders) and duplication, in both
//! directions (acknowledgements are lost too). Deterministic per seed.

use super::*;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

const MSS: usize = 1200;

#[derive(Clone, Copy)]
struct Path {
    /// Bottleneck rate, bytes per second.
    rate: f64,
    /// One-way propagation delay.
    delay: Duration,
    /// Queue at the bottleneck, as time to drain it.
    queue: Duration,
    loss: f64,
    jitter: Duration,
    dup: f64,
}

impl Path {
    /// 100 Mbit/s, 50 ms round trip, a queue of one BDP.
    fn wan() -> Self {
        Path {
            rate: 12_500_000.0,
            delay: Duration::from_millis(25),
            queue: Duration::from_millis(50),
            loss: 0.0,
            jitter: Duration::ZERO,
            dup: 0.0,
        }
    }
}

enum Wire {
    Data { pn: u64, chunk: usize },
    Ack(AckFrame),
}

struct Outcome {
    elapsed: Duration,
    goodput: f64,
    sent: u64,
    lost: u64,
    max_queue: Duration,
}

/// Sends `chunks` packets' worth of data from a sender to a receiver; every
/// chunk must arrive (at least once) and be acknowledged.
fn transfer(seed: u64, path: Path, chunks: usize) -> Outcome {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut now = start;
    let mut tx = Flow::new(MSS);
    let mut rx = Flow::new(MSS);
    let mut next_new = 0usize;
    let mut resend: VecDeque<usize> = VecDeque::new();
    let mut carried: HashMap<u64, usize> = HashMap::new();
    let mut acked = vec![false; chunks];
    let mut acked_count = 0;
    let mut received = vec![false; chunks];
    // (arrival, seq for a stable order, to_receiver, what)
    let mut wire: Vec<(Instant, u64, bool, Wire)> = Vec::new();
    let mut wire_seq = 0u64;
    let mut link_free = start;
    let mut max_queue = Duration::ZERO;
    let mut steps = 0u64;

    while acked_count < chunks {
        steps += 1;
        assert!(steps < 5_000_000, "seed {seed}: no progress");
        assert!(
            now - start < Duration::from_secs(3600),
            "seed {seed}: an hour of virtual time, {acked_count}/{chunks} acknowledged"
        );
        // What the sender would send next.
        let has_data = !resend.is_empty() || next_new < chunks || tx.probes_wanted() > 0;
        let send_at = if has_data {
            tx.send_time(now, MSS)
        } else {
            None
        };
        let next_wire = wire.iter().map(|w| w.0).min();
        let next = [send_at, tx.poll_timeout(), rx.poll_timeout(), next_wire]
            .into_iter()
            .flatten()
            .min()
            .expect("something is always scheduled");
        now = now.max(next);

        // Arrivals.
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut wire)
            .into_iter()
            .partition(|w| w.0 <= now);
        wire = rest;
        let mut due = due;
        due.sort_by_key(|w| (w.0, w.1));
        for (_, _, to_rx, what) in due {
            match (to_rx, what) {
                (true, Wire::Data { pn, chunk }) => {
                    if rx.on_received(now, pn, true) {
                        received[chunk] = true;
                    }
                }
                (false, Wire::Ack(ack)) => tx.on_ack(now, &ack),
                _ => unreachable!(),
            }
        }
        // Timers.
        if tx.poll_timeout().is_some_and(|t| t <= now) {
            tx.handle_timeout(now);
        }
        if rx.poll_timeout().is_some_and(|t| t <= now) {
            rx.handle_timeout(now);
        }
        // The sender learns what arrived and what was lost.
        while let Some(ev) = tx.poll_event() {
            match ev {
                FlowEvent::Acked(pn) => {
                    if let Some(c) = carried.remove(&pn) {
                        if !acked[c] {
                            acked[c] = true;
                            acked_count += 1;
                        }
                    }
                }
                FlowEvent::Lost(pn) => {
                    if let Some(c) = carried.remove(&pn) {
                        if !acked[c] {
                            resend.push_back(c);
                        }
                    }
                }
            }
        }
        // Acknowledgements back, lossy, delayed.
        if let Some(ack) = rx.poll_ack(now) {
            if !rng.gen_bool(path.loss) {
                let jitter = path.jitter.mul_f64(rng.gen());
                wire.push((now + path.delay + jitter, wire_seq, false, Wire::Ack(ack)));
                wire_seq += 1;
            }
        }
        // Data out, as far as the flow allows now.
        loop {
            let probe = tx.probes_wanted() > 0;
            let chunk = if let Some(c) = resend.pop_front() {
                c
            } else if next_new < chunks {
                next_new += 1;
                next_new - 1
            } else if probe {
                // Nothing new: probe with the oldest unacknowledged chunk.
                match carried.iter().min_by_key(|(pn, _)| **pn) {
                    Some((_, c)) => *c,
                    None => break,
                }
            } else {
                tx.set_app_limited();
                break;
            };
            if acked[chunk] {
                continue;
            }
            if tx.send_time(now, MSS) != Some(now) {
                // Not yet: put it back.
                resend.push_front(chunk);
                break;
            }
            let pn = tx.on_sent(now, MSS, true);
            carried.insert(pn, chunk);
            // The bottleneck: drop-tail once the queue is full.
            let start_tx = now.max(link_free);
            let queued = start_tx - now;
            if queued > path.queue {
                continue;
            }
            max_queue = max_queue.max(queued);
            link_free = start_tx + Duration::from_secs_f64(MSS as f64 / path.rate);
            if rng.gen_bool(path.loss) {
                continue;
            }
            let copies = if rng.gen_bool(path.dup) { 2 } else { 1 };
            for _ in 0..copies {
                let jitter = path.jitter.mul_f64(rng.gen());
                wire.push((
                    link_free + path.delay + jitter,
                    wire_seq,
                    true,
                    Wire::Data { pn, chunk },
                ));
                wire_seq += 1;
            }
        }
    }
    assert!(
        received.iter().all(|r| *r),
        "seed {seed}: acknowledged but never received"
    );
    let elapsed = now - start;
    Outcome {
        elapsed,
        goodput: (chunks * MSS) as f64 / elapsed.as_secs_f64(),
        sent: tx.stats.sent_packets,
        lost: tx.stats.lost_packets,
        max_queue,
    }
}

fn report(name: &str, path: Path, o: &Outcome) {
    println!(
        "{name}: {:.1} Mbit/s of {:.1} ({:.0}%) in {:?}, {} packets sent, {} declared lost, queue up to {:?}",
        o.goodput * 8.0 / 1e6,
        path.rate * 8.0 / 1e6,
        100.0 * o.goodput / path.rate,
        o.elapsed,
        o.sent,
        o.lost,
        o.max_queue
    );
}

#[test]
fn a_clean_path_fills_the_bottleneck_without_filling_the_queue() {
    let path = Path::wan();
    // Long enough that the steady state, not startup, is what counts.
    let o = transfer(1, path, 40_000);
    report("clean", path, &o);
    assert!(o.goodput > 0.75 * path.rate);
    // Startup overshoots a one-BDP queue once; after that, little loss.
    assert!(o.lost < o.sent / 20, "{} of {} lost", o.lost, o.sent);
}

#[test]
fn random_loss_does_not_collapse_the_rate() {
    // 1% each way, as on the lossy lab link: loss-based control
    // would crawl here; the model-based one keeps most of the link.
    let path = Path {
        loss: 0.01,
        ..Path::wan()
    };
    for seed in [2, 3, 4] {
        let o = transfer(seed, path, 20_000);
        report("1% loss", path, &o);
        assert!(o.goodput > 0.6 * path.rate, "seed {seed}");
    }
}

#[test]
fn reordering_and_duplication_lose_nothing() {
    let path = Path {
        loss: 0.03,
        jitter: Duration::from_millis(20),
        dup: 0.05,
        ..Path::wan()
    };
    for seed in 10..20 {
        let o = transfer(seed, path, 3_000);
        assert!(o.goodput > 0.0);
    }
}

#[test]
fn a_shallow_queue_is_not_flooded() {
    // A queue of 5 ms at the bottleneck: Startup overshoots, loses, and
    // the transfer still finishes with most of the link.
    let path = Path {
        queue: Duration::from_millis(5),
        ..Path::wan()
    };
    let o = transfer(5, path, 20_000);
    report("shallow queue", path, &o);
    assert!(o.goodput > 0.5 * path.rate);
    assert!(o.lost < o.sent / 10, "{} of {} lost", o.lost, o.sent);
}

#[test]
fn the_receiver_acknowledges_ranges_and_spots_duplicates() {
    let now = Instant::now();
    let mut rx = Flow::new(MSS);
    for pn in [0, 1, 2, 5, 6, 9] {
        assert!(rx.on_received(now, pn, true));
    }
    assert!(!rx.on_received(now, 5, true));
    let ack = rx.poll_ack(now).expect("out of order: at once");
    assert_eq!(ack.ranges, vec![(9, 9), (5, 6), (0, 2)]);
    // In order and few: held for MAX_ACK_DELAY.
    assert!(rx.on_received(now, 10, true));
    assert!(rx.poll_ack(now).is_none());
    assert_eq!(rx.poll_timeout(), Some(now + MAX_ACK_DELAY));
    rx.handle_timeout(now + MAX_ACK_DELAY);
    assert!(rx.poll_ack(now + MAX_ACK_DELAY).is_some());
}

#[test]
fn an_ack_for_packets_never_sent_is_ignored() {
    let now = Instant::now();
    let mut tx = Flow::new(MSS);
    tx.on_sent(now, MSS, true);
    tx.on_ack(
        now,
        &AckFrame {
            ranges: vec![(0, 1_000_000)],
            delay: Duration::ZERO,
        },
    );
    assert!(tx.poll_event().is_none());
    assert_eq!(tx.outstanding(), 1);
}
