//! Chat messages to one peer: ordered, deduplicated, and acknowledged end
//! to end once stored, carried by the peer's flow ([`crate::flow`] via
//! [`crate::transfer::PeerFlow`]), the same packets, loss recovery,
//! congestion control and pacing as file transfer. One reliability layer:
//! the flow numbers packets and sends again what a lost packet carried;
//! this module adds what a chat needs on top, as QUIC streams do on
//! packets.
//!
//! The sender numbers messages with `seq` (the daemon assigns and stores
//! it, so numbering survives restarts) and sends each once as a
//! [`FlowFrame::Chat`]; at most [`SEND_WINDOW`] are unacknowledged. The
//! receiver delivers in `seq` order, buffers what arrives early, drops
//! duplicates, and answers with a cumulative [`FlowFrame::ChatAck`]
//! (`upto`): every message below it was delivered, and the daemon stores
//! a delivered message before anything it sends afterwards leaves.
//!
//! Only `upto` lets the sender forget a message. The flow's own
//! acknowledgement says a packet arrived, not that its message was
//! stored: a message that arrived early waits in the receiver's memory,
//! and a receiver that restarts before the gap fills has lost it. So when
//! the session or the peer's flow starts again ([`Reliable::restart`]),
//! every message not yet below `upto` goes again.
//!
//! This state belongs to the peer, not to one session: it lives across
//! session restarts.

use crate::wire::{FlowFrame, MAX_MESSAGE_BYTES};
use std::collections::{BTreeMap, VecDeque};

/// Most messages sent and not yet acknowledged: enough for a round trip
/// and a receiver's commit at 100,000 messages a second (the flow's
/// congestion control paces the packets; this bounds the memory).
pub const SEND_WINDOW: usize = 4096;
/// Most bytes of message bodies sent and not yet acknowledged (and so
/// what a receiver holds at most of messages not yet delivered in order).
/// One message of any size always goes.
pub const WINDOW_BYTES: usize = 8 << 20;
/// How far ahead of the next expected message the receiver buffers (at
/// most this many, and [`WINDOW_BYTES`] of their bodies): never less
/// than [`SEND_WINDOW`], or a sender's messages past it would be dropped.
pub const RECV_WINDOW: u64 = SEND_WINDOW as u64;
/// A [`FlowFrame::Chat`]'s bytes besides its body: type, `seq`, `base`,
/// `sent_ms`, `offset`, `total`, the body's length.
pub const CHAT_FRAME_HEADER: usize = 1 + 8 + 8 + 8 + 4 + 4 + 2;
/// A [`FlowFrame::ChatAck`]'s bytes.
pub const CHAT_ACK_LEN: usize = 1 + 8;
/// A message goes in parts of at least this many bytes (but its last).
const MIN_PART: usize = 256;
/// Separate ranges of a message held at most while its parts arrive (an
/// honest sender's losses make a few; more is a peer cutting a message
/// into crumbs to cost us time and memory).
const MAX_GAPS: usize = 256;

#[derive(Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub seq: u64,
    pub sent_ms: u64,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReliableEvent {
    /// A message arrived, whole, in order and for the first time.
    Delivered {
        seq: u64,
        sent_ms: u64,
        body: Vec<u8>,
    },
    /// The peer acknowledged our message `seq`.
    Acked { seq: u64 },
}

/// A message arriving in parts.
struct Partial {
    sent_ms: u64,
    body: Vec<u8>,
    /// Byte ranges received, sorted and merged.
    have: Vec<(usize, usize)>,
}

impl Partial {
    fn complete(&self) -> bool {
        self.have == [(0, self.body.len())] || self.body.is_empty()
    }

    /// Copies a part in: `Some(false)` if it brought nothing new, `None`
    /// if it would leave more than [`MAX_GAPS`] separate ranges (a peer
    /// cutting a message into crumbs: the part is dropped).
    fn add(&mut self, offset: usize, part: &[u8]) -> Option<bool> {
        let (s, e) = (offset, offset + part.len());
        // Parts come in order, mostly: the one that extends the last range.
        if let Some(last) = self.have.last_mut() {
            if last.0 <= s && s <= last.1 {
                if e <= last.1 {
                    return Some(false);
                }
                self.body[s..e].copy_from_slice(part);
                last.1 = e;
                return Some(true);
            }
        }
        // Else where it goes among the sorted ranges (binary search).
        let i = self.have.partition_point(|&(a, _)| a <= s);
        if i > 0 && self.have[i - 1].0 <= s && e <= self.have[i - 1].1 {
            return Some(false);
        }
        if self.have.len() >= MAX_GAPS {
            return None;
        }
        self.body[s..e].copy_from_slice(part);
        self.have.insert(i, (s, e));
        // Merge with the neighbours it now touches.
        let mut j = i.saturating_sub(1);
        while j + 1 < self.have.len() {
            if self.have[j + 1].0 <= self.have[j].1 {
                self.have[j].1 = self.have[j].1.max(self.have[j + 1].1);
                self.have.remove(j + 1);
            } else if j >= i {
                break;
            } else {
                j += 1;
            }
        }
        Some(true)
    }
}

pub struct Reliable {
    /// Not sent yet (or to be sent again), in `seq` order.
    queue: VecDeque<ChatMessage>,
    /// Sent (or being sent), waiting for `upto` to pass them.
    sent: BTreeMap<u64, ChatMessage>,
    /// Bytes of the bodies in `sent`.
    sent_bytes: usize,
    /// The message of `sent` going out in parts, and how much went.
    sending: Option<(u64, usize)>,
    recv_next: u64,
    recv_buf: BTreeMap<u64, Partial>,
    /// Bytes of the bodies in `recv_buf`.
    recv_bytes: usize,
    ack_needed: bool,
    events: VecDeque<ReliableEvent>,
    /// Counter: duplicates received.
    pub duplicates: u64,
    /// Counter: parts dropped as malformed or past the window.
    pub dropped: u64,
}

impl Reliable {
    /// `recv_next`: every message below it was delivered before (stored by
    /// the daemon).
    pub fn new(recv_next: u64) -> Self {
        Self {
            queue: VecDeque::new(),
            sent: BTreeMap::new(),
            sent_bytes: 0,
            sending: None,
            recv_next,
            recv_buf: BTreeMap::new(),
            recv_bytes: 0,
            ack_needed: false,
            events: VecDeque::new(),
            duplicates: 0,
            dropped: 0,
        }
    }

    /// Queues a message. Messages must be pushed in increasing `seq`.
    pub fn push(&mut self, msg: ChatMessage) {
        self.queue.push_back(msg);
    }

    /// Messages not yet acknowledged (queued or sent).
    pub fn pending(&self) -> usize {
        self.queue.len() + self.sent.len()
    }

    #[cfg(test)]
    pub fn recv_next(&self) -> u64 {
        self.recv_next
    }

    /// Lowest `seq` not yet acknowledged.
    fn base(&self) -> u64 {
        let sent = self.sent.keys().next().copied();
        let queued = self.queue.front().map(|m| m.seq);
        match (sent, queued) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(0),
        }
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<ReliableEvent> {
        self.events.pop_front()
    }

    /// Whether the window lets the next queued message start.
    fn may_start(&self) -> bool {
        let Some(next) = self.queue.front() else {
            return false;
        };
        self.sent.is_empty()
            || (self.sent.len() < SEND_WINDOW && self.sent_bytes + next.body.len() <= WINDOW_BYTES)
    }

    /// Whether [`Reliable::poll_frame`] has something.
    pub fn wants_to_send(&self) -> bool {
        self.ack_needed || self.sending.is_some() || self.may_start()
    }

    /// Bytes still to send of queued and partly sent messages.
    pub fn bytes_waiting(&self) -> usize {
        let partial = self
            .sending
            .and_then(|(seq, done)| self.sent.get(&seq).map(|m| m.body.len() - done))
            .unwrap_or(0);
        partial + self.queue.iter().map(|m| m.body.len()).sum::<usize>()
    }

    /// The next frame to send, of at most `room` bytes encoded: the
    /// acknowledgement first, then a message (or its next part) within the
    /// window. A message larger than `room` goes in parts.
    pub fn poll_frame(&mut self, room: usize) -> Option<FlowFrame> {
        if self.ack_needed {
            if room < CHAT_ACK_LEN {
                return None;
            }
            self.ack_needed = false;
            return Some(FlowFrame::ChatAck {
                upto: self.recv_next,
            });
        }
        let most = room.checked_sub(CHAT_FRAME_HEADER)?;
        let base = self.base();
        if self.sending.is_none() {
            if !self.may_start() {
                return None;
            }
            let msg = self.queue.front().expect("may_start");
            if most < msg.body.len().min(MIN_PART) {
                return None;
            }
            let msg = self.queue.pop_front().expect("checked");
            self.sent_bytes += msg.body.len();
            self.sending = Some((msg.seq, 0));
            self.sent.insert(msg.seq, msg);
        }
        let (seq, done) = self.sending.expect("set above");
        let msg = &self.sent[&seq];
        let left = msg.body.len() - done;
        if most < left.min(MIN_PART) {
            return None;
        }
        let n = left.min(most);
        let frame = FlowFrame::Chat {
            seq,
            base: base.min(seq),
            sent_ms: msg.sent_ms,
            offset: done as u32,
            total: msg.body.len() as u32,
            body: msg.body[done..done + n].to_vec(),
        };
        self.sending = (done + n < msg.body.len()).then_some((seq, done + n));
        Some(frame)
    }

    /// The session or the peer's flow started again: what the peer may
    /// have held only in memory goes again, and it hears where we are.
    pub fn restart(&mut self) {
        let mut again: VecDeque<ChatMessage> =
            std::mem::take(&mut self.sent).into_values().collect();
        again.extend(self.queue.drain(..));
        self.queue = again;
        self.sent_bytes = 0;
        self.sending = None;
        self.ack_needed = self.recv_next > 0;
    }

    /// A part (or the whole) of message `seq`: `body` is its bytes from
    /// `offset`, of `total`.
    pub fn handle_message(
        &mut self,
        seq: u64,
        base: u64,
        sent_ms: u64,
        (offset, total): (u32, u32),
        body: Vec<u8>,
    ) {
        self.ack_needed = true;
        if base > self.recv_next && base <= i64::MAX as u64 {
            // The sender saw everything below `base` acknowledged: we
            // delivered it before losing our state. Skip ahead.
            self.recv_next = base;
            let kept = self.recv_buf.split_off(&base);
            for p in std::mem::replace(&mut self.recv_buf, kept).into_values() {
                self.recv_bytes -= p.body.len();
            }
        }
        let (offset, total) = (offset as usize, total as usize);
        // (Numbers past i64's range are a peer's nonsense: the store keeps
        // them as SQLite integers, and +1 must not overflow.)
        if seq > i64::MAX as u64 {
            self.dropped += 1;
            return;
        }
        if seq < self.recv_next {
            self.duplicates += 1;
            return;
        }
        if seq >= self.recv_next.saturating_add(RECV_WINDOW)
            || total > MAX_MESSAGE_BYTES
            || offset + body.len() > total
        {
            self.dropped += 1;
            return;
        }
        let entry = match self.recv_buf.get_mut(&seq) {
            Some(p) if p.body.len() == total => p,
            // A part that disagrees with the others on the size.
            Some(_) => {
                self.dropped += 1;
                return;
            }
            None => {
                // Past the byte window only the next message in order is
                // taken (a sender within its window never goes there).
                if self.recv_bytes + total > WINDOW_BYTES && seq != self.recv_next {
                    self.dropped += 1;
                    return;
                }
                self.recv_bytes += total;
                self.recv_buf.entry(seq).or_insert(Partial {
                    sent_ms,
                    body: vec![0; total],
                    have: Vec::new(),
                })
            }
        };
        match entry.add(offset, &body) {
            Some(true) => {}
            Some(false) if body.is_empty() => {}
            Some(false) => {
                self.duplicates += 1;
                return;
            }
            None => {
                self.dropped += 1;
                return;
            }
        }
        while self
            .recv_buf
            .get(&self.recv_next)
            .is_some_and(Partial::complete)
        {
            let p = self.recv_buf.remove(&self.recv_next).expect("checked");
            self.recv_bytes -= p.body.len();
            self.events.push_back(ReliableEvent::Delivered {
                seq: self.recv_next,
                sent_ms: p.sent_ms,
                body: p.body,
            });
            self.recv_next += 1;
        }
    }

    pub fn handle_ack(&mut self, upto: u64) {
        let mut acked: Vec<u64> = self.sent.range(..upto).map(|(s, _)| *s).collect();
        for seq in &acked {
            if let Some(m) = self.sent.remove(seq) {
                self.sent_bytes -= m.body.len();
            }
            if self.sending.is_some_and(|(s, _)| s == *seq) {
                // (Only a peer that lost count acknowledges a message it
                // has not had whole.)
                self.sending = None;
            }
        }
        // Queued again after a restart, and acknowledged meanwhile.
        while self.queue.front().is_some_and(|m| m.seq < upto) {
            acked.push(self.queue.pop_front().expect("checked").seq);
        }
        acked.sort_unstable();
        self.events
            .extend(acked.into_iter().map(|seq| ReliableEvent::Acked { seq }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base-size packet's room for frames.
    const ROOM: usize = 1150;

    fn out(seq: u64) -> ChatMessage {
        ChatMessage {
            seq,
            sent_ms: 0,
            body: seq.to_string().into_bytes(),
        }
    }

    fn apply(r: &mut Reliable, f: FlowFrame) {
        match f {
            FlowFrame::Chat {
                seq,
                base,
                sent_ms,
                offset,
                total,
                body,
            } => r.handle_message(seq, base, sent_ms, (offset, total), body),
            FlowFrame::ChatAck { upto } => r.handle_ack(upto),
            _ => unreachable!(),
        }
    }

    fn delivered(r: &mut Reliable) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(e) = r.poll_event() {
            if let ReliableEvent::Delivered { seq, .. } = e {
                out.push(seq);
            }
        }
        out
    }

    #[test]
    fn delivers_in_order_once_whatever_order_frames_arrive_in() {
        let (mut tx, mut rx) = (Reliable::new(0), Reliable::new(0));
        for s in 0..5 {
            tx.push(out(s));
        }
        let mut frames: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame(ROOM)).collect();
        assert_eq!(frames.len(), 5);
        frames.reverse();
        frames.push(frames[0].clone());
        for f in frames {
            apply(&mut rx, f);
        }
        assert_eq!(delivered(&mut rx), vec![0, 1, 2, 3, 4]);
        assert_eq!(rx.duplicates, 1);
        let ack = rx.poll_frame(ROOM).expect("an acknowledgement");
        assert_eq!(ack, FlowFrame::ChatAck { upto: 5 });
        apply(&mut tx, ack);
        assert_eq!(tx.pending(), 0);
        let acked: Vec<_> = std::iter::from_fn(|| tx.poll_event()).collect();
        assert_eq!(acked.len(), 5);
    }

    #[test]
    fn window_limits_messages_unacknowledged() {
        let mut tx = Reliable::new(0);
        for s in 0..(SEND_WINDOW as u64 + 10) {
            tx.push(out(s));
        }
        let sent = std::iter::from_fn(|| tx.poll_frame(ROOM)).count();
        assert_eq!(sent, SEND_WINDOW);
        tx.handle_ack(3);
        assert_eq!(std::iter::from_fn(|| tx.poll_frame(ROOM)).count(), 3);
    }

    #[test]
    fn a_restart_sends_again_what_was_not_acknowledged_in_order() {
        let (mut tx, mut rx) = (Reliable::new(0), Reliable::new(0));
        for s in 0..4 {
            tx.push(out(s));
        }
        let frames: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame(ROOM)).collect();
        // 0 arrives and is acknowledged; 2 and 3 arrive early and are held
        // in memory; then the receiver restarts and loses them.
        apply(&mut rx, frames[0].clone());
        apply(&mut rx, frames[2].clone());
        apply(&mut rx, frames[3].clone());
        assert_eq!(delivered(&mut rx), vec![0]);
        apply(&mut tx, rx.poll_frame(ROOM).unwrap());
        let mut rx = Reliable::new(rx.recv_next());
        tx.restart();
        tx.push(out(4));
        let again: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame(ROOM)).collect();
        let seqs: Vec<u64> = again
            .iter()
            .map(|f| match f {
                FlowFrame::Chat { seq, .. } => *seq,
                _ => panic!("{f:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        for f in again {
            apply(&mut rx, f);
        }
        assert_eq!(delivered(&mut rx), vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_receiver_that_lost_its_state_skips_to_base() {
        let mut tx = Reliable::new(0);
        for s in 0..3 {
            tx.push(out(s));
        }
        tx.handle_ack(2); // acknowledged before the receiver lost it all
        let mut rx = Reliable::new(0);
        while let Some(f) = tx.poll_frame(ROOM) {
            apply(&mut rx, f);
        }
        assert_eq!(delivered(&mut rx), vec![2]);
    }

    #[test]
    fn an_acknowledgement_after_a_restart_forgets_the_queued_copies() {
        let mut tx = Reliable::new(0);
        for s in 0..3 {
            tx.push(out(s));
        }
        while tx.poll_frame(ROOM).is_some() {}
        tx.restart();
        tx.handle_ack(2);
        assert_eq!(tx.pending(), 1);
        let events: Vec<_> = std::iter::from_fn(|| tx.poll_event()).collect();
        assert_eq!(
            events,
            vec![
                ReliableEvent::Acked { seq: 0 },
                ReliableEvent::Acked { seq: 1 }
            ]
        );
    }

    #[test]
    fn a_long_message_goes_in_parts_and_arrives_whole() {
        // 64 KiB in parts of a packet's room, delivered whole once, in
        // whatever order the parts arrive, duplicates and all; a small
        // message after it waits for it.
        let (mut tx, mut rx) = (Reliable::new(0), Reliable::new(0));
        let long: Vec<u8> = (0..MAX_MESSAGE_BYTES).map(|i| (i % 251) as u8).collect();
        tx.push(ChatMessage {
            seq: 0,
            sent_ms: 7,
            body: long.clone(),
        });
        tx.push(out(1));
        let mut frames: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame(ROOM)).collect();
        assert!(frames.len() > 50, "{} frames", frames.len());
        assert!(frames.iter().all(
            |f| matches!(f, FlowFrame::Chat { body, .. } if body.len() + CHAT_FRAME_HEADER <= ROOM)
        ));
        let dup = frames[3].clone();
        frames.push(dup);
        frames.reverse();
        for f in frames {
            apply(&mut rx, f);
        }
        let mut got = Vec::new();
        while let Some(ReliableEvent::Delivered { seq, body, .. }) = rx.poll_event() {
            got.push((seq, body));
        }
        assert_eq!(got, vec![(0, long), (1, b"1".to_vec())]);
        assert_eq!(rx.duplicates, 1);
        assert_eq!(rx.recv_bytes, 0);
    }

    #[test]
    fn parts_sent_again_after_a_restart_fill_the_same_message() {
        // Half a long message arrives, the sender restarts its flow (all
        // goes again, cut elsewhere): the message is delivered once.
        let (mut tx, mut rx) = (Reliable::new(0), Reliable::new(0));
        let long = vec![9u8; 10_000];
        tx.push(ChatMessage {
            seq: 0,
            sent_ms: 0,
            body: long.clone(),
        });
        let first: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame(ROOM)).collect();
        for f in first.iter().take(first.len() / 2).cloned() {
            apply(&mut rx, f);
        }
        tx.restart();
        while let Some(f) = tx.poll_frame(700) {
            apply(&mut rx, f);
        }
        assert_eq!(delivered(&mut rx), vec![0]);
    }

    #[test]
    fn the_byte_window_bounds_what_is_unacknowledged_and_held() {
        // Messages of 64 KiB: at most WINDOW_BYTES of them in flight; a
        // receiver holds no more than that of messages not yet in order,
        // whatever a sender sends.
        let mut tx = Reliable::new(0);
        for seq in 0..1_000 {
            tx.push(ChatMessage {
                seq,
                sent_ms: 0,
                body: vec![1; MAX_MESSAGE_BYTES],
            });
        }
        let frames: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame(60_000)).collect();
        let started: std::collections::BTreeSet<u64> = frames
            .iter()
            .filter_map(|f| match f {
                FlowFrame::Chat { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), WINDOW_BYTES / MAX_MESSAGE_BYTES);
        // A hostile sender: message 0 never comes, the rest do.
        let mut rx = Reliable::new(0);
        for seq in 1..1_000u64 {
            rx.handle_message(seq, 0, 0, (0, MAX_MESSAGE_BYTES as u32), vec![1; 100]);
        }
        assert!(rx.recv_bytes <= WINDOW_BYTES, "{}", rx.recv_bytes);
        assert!(rx.dropped > 0);
    }

    #[test]
    fn parts_in_any_order_and_overlap_make_the_message_and_crumbs_are_refused() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let body: Vec<u8> = (0..20_000).map(|i| (i % 253) as u8).collect();
        for _ in 0..50 {
            let mut p = Partial {
                sent_ms: 0,
                body: vec![0; body.len()],
                have: Vec::new(),
            };
            // Parts of random sizes covering it all, shuffled, with
            // overlapping extras.
            let mut parts = Vec::new();
            let mut at = 0;
            while at < body.len() {
                let n = rng.gen_range(1..3000).min(body.len() - at);
                parts.push((at, at + n));
                at += n;
            }
            for _ in 0..10 {
                let a = rng.gen_range(0..body.len());
                parts.push((a, (a + rng.gen_range(1..4000)).min(body.len())));
            }
            for i in (1..parts.len()).rev() {
                parts.swap(i, rng.gen_range(0..=i));
            }
            for (a, b) in parts {
                assert!(p.add(a, &body[a..b]).is_some());
                assert!(p.have.windows(2).all(|w| w[0].1 < w[1].0), "{:?}", p.have);
            }
            assert!(p.complete());
            assert_eq!(p.body, body);
        }
        // A peer's crumbs: one byte at every other offset.
        let mut p = Partial {
            sent_ms: 0,
            body: vec![0; 4096],
            have: Vec::new(),
        };
        let refused = (0..2048).filter(|i| p.add(i * 2, &[1]).is_none()).count();
        assert_eq!(p.have.len(), MAX_GAPS);
        assert_eq!(refused, 2048 - MAX_GAPS);
    }
}
