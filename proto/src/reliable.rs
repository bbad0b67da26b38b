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

use crate::wire::FlowFrame;
use std::collections::{BTreeMap, VecDeque};

/// Most messages sent and not yet acknowledged: enough for a round trip
/// and a receiver's commit at 100,000 messages a second (the flow's
/// congestion control paces the packets; this bounds the memory).
pub const SEND_WINDOW: usize = 4096;
/// How far ahead of the next expected message the receiver buffers (at
/// most this many bodies, 4 MiB of them): never less than
/// [`SEND_WINDOW`], or a sender's messages past it would be dropped.
pub const RECV_WINDOW: u64 = SEND_WINDOW as u64;

/// A [`FlowFrame::Chat`]'s bytes besides its body: type, `seq`,
/// `base`, `sent_ms`, the body's length.
pub const CHAT_FRAME_HEADER: usize = 1 + 8 + 8 + 8 + 2;
/// A [`FlowFrame::ChatAck`]'s bytes.
pub const CHAT_ACK_LEN: usize = 1 + 8;

#[derive(Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub seq: u64,
    pub sent_ms: u64,
    pub body: Vec<u8>,
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
    /// Not sent yet (or to be sent again), in `seq` order.
    queue: VecDeque<ChatMessage>,
    /// Sent, waiting for `upto` to pass them.
    sent: BTreeMap<u64, ChatMessage>,
    recv_next: u64,
    recv_buf: BTreeMap<u64, (u64, Vec<u8>)>,
    ack_needed: bool,
    events: VecDeque<ReliableEvent>,
    /// Counter: duplicates received.
    pub duplicates: u64,
}

impl Reliable {
    /// `recv_next`: every message below it was delivered before (stored by
    /// the daemon).
    pub fn new(recv_next: u64) -> Self {
        Self {
            queue: VecDeque::new(),
            sent: BTreeMap::new(),
            recv_next,
            recv_buf: BTreeMap::new(),
            ack_needed: false,
            events: VecDeque::new(),
            duplicates: 0,
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

    /// The encoded length of the frame [`Reliable::poll_frame`] would
    /// give now, if any.
    pub fn next_len(&self) -> Option<usize> {
        if self.ack_needed {
            return Some(CHAT_ACK_LEN);
        }
        if self.sent.len() >= SEND_WINDOW {
            return None;
        }
        self.queue.front().map(|m| CHAT_FRAME_HEADER + m.body.len())
    }

    /// Whether [`Reliable::poll_frame`] has something.
    pub fn wants_to_send(&self) -> bool {
        self.ack_needed || (!self.queue.is_empty() && self.sent.len() < SEND_WINDOW)
    }

    /// The next frame to send: the acknowledgement first, then a message
    /// within the window.
    pub fn poll_frame(&mut self) -> Option<FlowFrame> {
        if self.ack_needed {
            self.ack_needed = false;
            return Some(FlowFrame::ChatAck {
                upto: self.recv_next,
            });
        }
        if self.sent.len() >= SEND_WINDOW {
            return None;
        }
        let base = self.base();
        let msg = self.queue.pop_front()?;
        let frame = FlowFrame::Chat {
            seq: msg.seq,
            base: base.min(msg.seq),
            sent_ms: msg.sent_ms,
            body: msg.body.clone(),
        };
        self.sent.insert(msg.seq, msg);
        Some(frame)
    }

    /// The session or the peer's flow started again: what the peer may
    /// have held only in memory goes again, and it hears where we are.
    pub fn restart(&mut self) {
        let mut again: VecDeque<ChatMessage> =
            std::mem::take(&mut self.sent).into_values().collect();
        again.extend(self.queue.drain(..));
        self.queue = again;
        self.ack_needed = self.recv_next > 0;
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

    pub fn handle_ack(&mut self, upto: u64) {
        let mut acked: Vec<u64> = self.sent.range(..upto).map(|(s, _)| *s).collect();
        for seq in &acked {
            self.sent.remove(seq);
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
                body,
            } => r.handle_message(seq, base, sent_ms, body),
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
        let mut frames: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame()).collect();
        assert_eq!(frames.len(), 5);
        frames.reverse();
        frames.push(frames[0].clone());
        for f in frames {
            apply(&mut rx, f);
        }
        assert_eq!(delivered(&mut rx), vec![0, 1, 2, 3, 4]);
        assert_eq!(rx.duplicates, 1);
        let ack = rx.poll_frame().expect("an acknowledgement");
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
        let sent = std::iter::from_fn(|| tx.poll_frame()).count();
        assert_eq!(sent, SEND_WINDOW);
        tx.handle_ack(3);
        assert_eq!(std::iter::from_fn(|| tx.poll_frame()).count(), 3);
    }

    #[test]
    fn a_restart_sends_again_what_was_not_acknowledged_in_order() {
        let (mut tx, mut rx) = (Reliable::new(0), Reliable::new(0));
        for s in 0..4 {
            tx.push(out(s));
        }
        let frames: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame()).collect();
        // 0 arrives and is acknowledged; 2 and 3 arrive early and are held
        // in memory; then the receiver restarts and loses them.
        apply(&mut rx, frames[0].clone());
        apply(&mut rx, frames[2].clone());
        apply(&mut rx, frames[3].clone());
        assert_eq!(delivered(&mut rx), vec![0]);
        apply(&mut tx, rx.poll_frame().unwrap());
        let mut rx = Reliable::new(rx.recv_next());
        tx.restart();
        tx.push(out(4));
        let again: Vec<FlowFrame> = std::iter::from_fn(|| tx.poll_frame()).collect();
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
        while let Some(f) = tx.poll_frame() {
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
        while tx.poll_frame().is_some() {}
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
}
