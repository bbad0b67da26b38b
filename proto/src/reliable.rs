//! Reliable, ordered, deduplicated delivery of chat messages to one peer.
//!
//! The sender numbers messages with `seq` (the daemon assigns and stores
//! it, so numbering survives restarts); each is retransmitted until
//! acknowledged, with an RFC 6298 retransmission timer. At most
//! [`SEND_WINDOW`] are in flight. The receiver delivers in `seq` order,
//! buffers what arrives early, drops duplicates and acknowledges
//! cumulatively (`upto`) plus selectively (`sacks`).
//!
//! Only the cumulative acknowledgement lets the sender forget a message.
//! A selective one is advisory, as in TCP (RFC 2018 allows the receiver to
//! renege): it stops retransmission, but the message stays in flight until
//! `upto` passes it, because the receiver holds it in memory only, undelivered
//! and unstored, and a receiver that restarts before the gap fills has lost
//! it. A new session ([`Reliable::path_changed`]) forgets all SACK marks.
//!
//! This state belongs to the peer, not to one session: it lives across
//! session restarts, and [`Reliable::path_changed`] resends what was in
//! flight on the new path at once.

use crate::wire::{PeerToPeer, MAX_SACKS};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Most messages in flight.
pub const SEND_WINDOW: usize = 64;
/// How far ahead of the next expected message the receiver buffers.
pub const RECV_WINDOW: u64 = 1024;
/// RFC 6298: initial RTO 1 s; we allow a lower floor than its 1 s minimum
/// (as QUIC and Linux do), and cap the backoff.
const INITIAL_RTO: Duration = Duration::from_secs(1);
const MIN_RTO: Duration = Duration::from_millis(200);
const MAX_RTO: Duration = Duration::from_secs(10);

#[derive(Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub seq: u64,
    pub sent_ms: u64,
    pub body: Vec<u8>,
}

struct InFlight {
    msg: Outgoing,
    sent_at: Instant,
    retransmitted: bool,
    /// Selectively acknowledged: not retransmitted while the session lasts.
    sacked: bool,
    deadline: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReliableEvent {
    /// A message arrived, in order and for the first time.
    Delivered {
        seq: u64,
        sent_ms: u64,
        body: Vec<u8>,
    },
    /// The peer acknowledged our message `seq`.
    Acked { seq: u64 },
}

pub struct Reliable {
    queue: VecDeque<Outgoing>,
    inflight: BTreeMap<u64, InFlight>,
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    recv_next: u64,
    recv_buf: BTreeMap<u64, (u64, Vec<u8>)>,
    ack_needed: bool,
    events: VecDeque<ReliableEvent>,
    /// Counters: duplicates received, retransmissions sent.
    pub duplicates: u64,
    pub retransmissions: u64,
}

impl Reliable {
    /// `recv_next`: every message below it was delivered before (stored by
    /// the daemon).
    pub fn new(recv_next: u64) -> Self {
        Self {
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            srtt: None,
            rttvar: Duration::ZERO,
            rto: INITIAL_RTO,
            recv_next,
            recv_buf: BTreeMap::new(),
            ack_needed: false,
            events: VecDeque::new(),
            duplicates: 0,
            retransmissions: 0,
        }
    }

    /// Queues a message. Messages must be pushed in increasing `seq`.
    pub fn push(&mut self, msg: Outgoing) {
        self.queue.push_back(msg);
    }

    /// Messages not yet acknowledged (queued or in flight).
    pub fn pending(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    pub fn recv_next(&self) -> u64 {
        self.recv_next
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Lowest `seq` not yet acknowledged.
    fn base(&self) -> u64 {
        self.inflight
            .keys()
            .next()
            .copied()
            .or(self.queue.front().map(|m| m.seq))
            .unwrap_or(0)
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<ReliableEvent> {
        self.events.pop_front()
    }

    /// The next packet to send, if any: an acknowledgement first, then
    /// retransmissions that are due, then new messages within the window.
    pub fn poll_packet(&mut self, now: Instant) -> Option<PeerToPeer> {
        if self.ack_needed {
            self.ack_needed = false;
            return Some(PeerToPeer::Ack {
                upto: self.recv_next,
                sacks: self.recv_buf.keys().take(MAX_SACKS).copied().collect(),
            });
        }
        let base = self.base();
        if let Some(f) = self
            .inflight
            .values_mut()
            .find(|f| !f.sacked && f.deadline <= now)
        {
            f.retransmitted = true;
            f.sent_at = now;
            f.deadline = now + self.rto;
            self.retransmissions += 1;
            // Back off the timer for the next loss (RFC 6298 5.5).
            self.rto = (self.rto * 2).min(MAX_RTO);
            return Some(message(&f.msg, base));
        }
        if self.inflight.len() < SEND_WINDOW {
            if let Some(msg) = self.queue.pop_front() {
                let out = message(&msg, base.min(msg.seq));
                self.inflight.insert(
                    msg.seq,
                    InFlight {
                        msg,
                        sent_at: now,
                        retransmitted: false,
                        sacked: false,
                        deadline: now + self.rto,
                    },
                );
                return Some(out);
            }
        }
        None
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inflight
            .values()
            .filter(|f| !f.sacked)
            .map(|f| f.deadline)
            .min()
    }

    /// The path changed or a new session came up: resend what was in
    /// flight now, with a fresh timer.
    pub fn path_changed(&mut self, now: Instant) {
        self.rto = INITIAL_RTO;
        self.srtt = None;
        for f in self.inflight.values_mut() {
            f.deadline = now;
            // The peer may have restarted and lost what it held early.
            f.sacked = false;
        }
    }

    pub fn handle_message(&mut self, seq: u64, base: u64, sent_ms: u64, body: Vec<u8>) {
        self.ack_needed = true;
        if base > self.recv_next {
            // The sender saw everything below `base` acknowledged: we
            // delivered it before losing our state. Skip ahead.
            self.recv_next = base;
            self.recv_buf = self.recv_buf.split_off(&base);
        }
        if seq < self.recv_next || self.recv_buf.contains_key(&seq) {
            self.duplicates += 1;
            return;
        }
        if seq >= self.recv_next + RECV_WINDOW {
            return;
        }
        self.recv_buf.insert(seq, (sent_ms, body));
        while let Some((sent_ms, body)) = self.recv_buf.remove(&self.recv_next) {
            self.events.push_back(ReliableEvent::Delivered {
                seq: self.recv_next,
                sent_ms,
                body,
            });
            self.recv_next += 1;
        }
    }

    pub fn handle_ack(&mut self, now: Instant, upto: u64, sacks: &[u64]) {
        let acked: Vec<u64> = self.inflight.range(..upto).map(|(s, _)| *s).collect();
        for seq in acked {
            let f = self.inflight.remove(&seq).expect("listed");
            // Karn's rule: no RTT sample from a retransmitted message.
            if !f.retransmitted && !f.sacked {
                self.sample_rtt(now.saturating_duration_since(f.sent_at));
            }
            self.events.push_back(ReliableEvent::Acked { seq });
        }
        let mut samples = Vec::new();
        for seq in sacks {
            if let Some(f) = self.inflight.get_mut(seq) {
                if !f.sacked && !f.retransmitted {
                    samples.push(now.saturating_duration_since(f.sent_at));
                }
                f.sacked = true;
            }
        }
        for r in samples {
            self.sample_rtt(r);
        }
    }

    /// RFC 6298 section 2.
    fn sample_rtt(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(r);
                self.rttvar = self.rttvar.mul_f64(0.75) + diff.mul_f64(0.25);
                self.srtt = Some(srtt.mul_f64(0.875) + r.mul_f64(0.125));
            }
        }
        let srtt = self.srtt.expect("set above");
        self.rto =
            (srtt + (self.rttvar * 4).max(Duration::from_millis(10))).clamp(MIN_RTO, MAX_RTO);
    }
}

fn message(m: &Outgoing, base: u64) -> PeerToPeer {
    PeerToPeer::Message {
        seq: m.seq,
        base,
        sent_ms: m.sent_ms,
        body: m.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn out(seq: u64) -> Outgoing {
        Outgoing {
            seq,
            sent_ms: 0,
            body: seq.to_string().into_bytes(),
        }
    }

    fn apply(r: &mut Reliable, now: Instant, p: PeerToPeer) {
        match p {
            PeerToPeer::Message {
                seq,
                base,
                sent_ms,
                body,
            } => r.handle_message(seq, base, sent_ms, body),
            PeerToPeer::Ack { upto, sacks } => r.handle_ack(now, upto, &sacks),
            _ => unreachable!(),
        }
    }

    /// Runs a sender and a receiver over a link that loses, duplicates and
    /// reorders, in virtual time, until everything is acknowledged.
    fn run_lossy(seed: u64, n: u64, loss: f64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut a = Reliable::new(0);
        let mut b = Reliable::new(0);
        for s in 0..n {
            a.push(out(s));
        }
        let mut now = Instant::now();
        let start = now;
        let latency = Duration::from_millis(20);
        // (arrival, to_b, packet)
        let mut wire: Vec<(Instant, bool, PeerToPeer)> = Vec::new();
        let mut delivered = Vec::new();
        let mut acked = 0;
        while acked < n {
            assert!(
                now - start < Duration::from_secs(3600),
                "seed {seed}: stuck"
            );
            for (to_b, r) in [(true, &mut a), (false, &mut b)] {
                while let Some(p) = r.poll_packet(now) {
                    if rng.gen_bool(loss) {
                        continue;
                    }
                    let copies = if rng.gen_bool(0.05) { 2 } else { 1 };
                    for _ in 0..copies {
                        let jitter = Duration::from_millis(rng.gen_range(0..30));
                        wire.push((now + latency + jitter, to_b, p.clone()));
                    }
                }
            }
            while let Some(e) = b.poll_event() {
                if let ReliableEvent::Delivered { seq, .. } = e {
                    delivered.push(seq);
                }
            }
            while let Some(e) = a.poll_event() {
                if let ReliableEvent::Acked { .. } = e {
                    acked += 1;
                }
            }
            let next_wire = wire.iter().map(|w| w.0).min();
            let next = [next_wire, a.poll_timeout(), b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next else { break };
            now = now.max(next);
            let (due, rest): (Vec<_>, Vec<_>) = wire.into_iter().partition(|w| w.0 <= now);
            wire = rest;
            for (_, to_b, p) in due {
                if to_b {
                    apply(&mut b, now, p);
                } else {
                    apply(&mut a, now, p);
                }
            }
        }
        assert_eq!(delivered, (0..n).collect::<Vec<_>>(), "seed {seed}");
        assert_eq!(acked, n);
    }

    #[test]
    fn delivers_in_order_once_over_a_bad_link() {
        for seed in 0..20 {
            run_lossy(seed, 300, 0.2);
        }
    }

    #[test]
    fn delivers_over_a_clean_link() {
        run_lossy(99, 1000, 0.0);
    }

    #[test]
    fn duplicates_are_acknowledged_but_not_delivered_twice() {
        let mut b = Reliable::new(0);
        b.handle_message(0, 0, 0, b"x".to_vec());
        b.handle_message(0, 0, 0, b"x".to_vec());
        assert!(matches!(
            b.poll_event(),
            Some(ReliableEvent::Delivered { seq: 0, .. })
        ));
        assert_eq!(b.poll_event(), None);
        assert_eq!(b.duplicates, 1);
        let now = Instant::now();
        assert_eq!(
            b.poll_packet(now),
            Some(PeerToPeer::Ack {
                upto: 1,
                sacks: vec![]
            })
        );
    }

    #[test]
    fn receiver_that_lost_state_skips_to_base() {
        // The receiver restarted with nothing stored; the sender's base says
        // 0..5 were acknowledged long ago.
        let mut b = Reliable::new(0);
        b.handle_message(6, 5, 0, b"six".to_vec());
        assert_eq!(b.poll_event(), None);
        b.handle_message(5, 5, 0, b"five".to_vec());
        assert!(matches!(
            b.poll_event(),
            Some(ReliableEvent::Delivered { seq: 5, .. })
        ));
        assert!(matches!(
            b.poll_event(),
            Some(ReliableEvent::Delivered { seq: 6, .. })
        ));
        // Stored state is honoured: nothing below recv_next is redelivered.
        let mut c = Reliable::new(10);
        c.handle_message(3, 3, 0, vec![]);
        assert_eq!(c.poll_event(), None);
    }

    #[test]
    fn window_limits_messages_in_flight() {
        let mut a = Reliable::new(0);
        for s in 0..200 {
            a.push(out(s));
        }
        let now = Instant::now();
        let mut sent = 0;
        while a.poll_packet(now).is_some() {
            sent += 1;
        }
        assert_eq!(sent, SEND_WINDOW);
        a.handle_ack(now, 10, &[20]);
        let mut more = 0;
        while a.poll_packet(now).is_some() {
            more += 1;
        }
        // Only the cumulative acknowledgement frees window space.
        assert_eq!(more, 10);
    }

    #[test]
    fn selectively_acked_messages_survive_a_receiver_restart() {
        let mut a = Reliable::new(0);
        for s in 0..3 {
            a.push(out(s));
        }
        let now = Instant::now();
        let mut b = Reliable::new(0);
        // Message 0 is lost; 1 and 2 arrive early and are SACKed.
        let _lost = a.poll_packet(now).unwrap();
        for _ in 0..2 {
            let p = a.poll_packet(now).unwrap();
            apply(&mut b, now, p);
        }
        let ack = b.poll_packet(now).unwrap();
        apply(&mut a, now, ack);
        assert_eq!(
            a.pending(),
            3,
            "SACKed messages stay until cumulatively acked"
        );
        assert!(std::iter::from_fn(|| a.poll_event()).next().is_none());
        // The receiver restarts with nothing stored; a new session.
        let mut b = Reliable::new(0);
        let later = now + Duration::from_millis(50);
        a.path_changed(later);
        let mut delivered = Vec::new();
        for _ in 0..10 {
            while let Some(p) = a.poll_packet(later) {
                apply(&mut b, later, p);
            }
            while let Some(p) = b.poll_packet(later) {
                apply(&mut a, later, p);
            }
            while let Some(ReliableEvent::Delivered { seq, .. }) = b.poll_event() {
                delivered.push(seq);
            }
        }
        assert_eq!(delivered, vec![0, 1, 2]);
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn path_change_resends_at_once() {
        let mut a = Reliable::new(0);
        a.push(out(0));
        let t0 = Instant::now();
        assert!(a.poll_packet(t0).is_some());
        assert!(a.poll_packet(t0).is_none());
        a.path_changed(t0);
        assert!(matches!(
            a.poll_packet(t0),
            Some(PeerToPeer::Message { seq: 0, .. })
        ));
        assert_eq!(a.retransmissions, 1);
    }
}
