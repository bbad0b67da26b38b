//! Loss recovery and congestion control for the data a session carries:
//! the packet-level layer that chat and file transfer send through.
//! Sans-IO like the rest of the crate.
//!
//! The sender numbers every packet (`pn`, never reused) and remembers what
//! it sent; the receiver acknowledges with ranges of packet numbers
//! ([`AckFrame`]); the sender learns from the acknowledgements which
//! packets arrived and which were lost, exactly as QUIC does (RFC 9002):
//!
//! * a packet is lost when a packet sent at least [`PACKET_THRESHOLD`]
//!   later was acknowledged, or when it is older than 9/8 of the RTT
//!   (the time threshold) while a later one was acknowledged;
//! * when nothing comes back, a probe timeout (PTO: smoothed RTT + 4 ×
//!   variation + the peer's ack delay, doubled each time it fires) asks the
//!   owner to send one or two probe packets;
//! * RTT estimation is RFC 9002's (section 5), ack delay subtracted.
//!
//! How much may be in flight and how fast it leaves comes from a
//! model-based controller ([`bbr`]), not from loss: see its module docs for
//! why. Packets are paced at the controller's rate with a small burst
//! allowance.
//!
//! The owner decides what each packet carries and keeps that by packet
//! number; [`FlowEvent::Acked`] and [`FlowEvent::Lost`] tell it what to
//! forget and what to send again.

pub mod bbr;
pub mod pmtud;
pub mod ranges;

use bbr::{Bbr, RateSample};
use ranges::Ranges;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// RFC 9002 kPacketThreshold.
pub const PACKET_THRESHOLD: u64 = 3;
/// RFC 9002 kTimeThreshold, 9/8.
const TIME_THRESHOLD: f64 = 9.0 / 8.0;
/// RFC 9002 kGranularity.
const GRANULARITY: Duration = Duration::from_millis(1);
/// RFC 9002 kInitialRtt.
const INITIAL_RTT: Duration = Duration::from_millis(333);
/// The longest we delay an acknowledgement (QUIC's default max_ack_delay
/// is 25 ms; less keeps the sender's RTT honest on fast paths).
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(10);
/// Acknowledge at least every this many ack-eliciting packets.
const ACK_EVERY: u32 = 8;
/// The pacer lets this much of its rate leave at once (quinn's choice).
const BURST_INTERVAL: Duration = Duration::from_millis(2);
/// Bounds of the pacer's burst, in packets.
const MIN_BURST: usize = 10;
const MAX_BURST: usize = 256;
/// PTO doubling stops here (RFC 9002 leaves it open; 2^6 × PTO is long).
const MAX_PTO_BACKOFF: u32 = 6;

/// Which packets arrived: ranges of packet numbers, highest first, and how
/// long the receiver held the acknowledgement for the largest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckFrame {
    pub ranges: Vec<(u64, u64)>,
    pub delay: Duration,
}

impl AckFrame {
    pub fn largest(&self) -> Option<u64> {
        self.ranges.first().map(|r| r.1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEvent {
    /// The packet arrived: forget what it carried.
    Acked(u64),
    /// The packet is lost: send what it carried again (in a new packet).
    Lost(u64),
}

#[derive(Debug, Clone)]
struct Sent {
    time: Instant,
    size: usize,
    ack_eliciting: bool,
    // Delivery-rate sampling state when it was sent.
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
    app_limited: bool,
    /// A path MTU probe: its loss says the packet was too large, not that
    /// the path is congested.
    mtu_probe: bool,
}

#[derive(Debug, Clone)]
struct Rtt {
    latest: Duration,
    smoothed: Duration,
    var: Duration,
    min: Duration,
    sampled: bool,
}

impl Rtt {
    fn new() -> Self {
        Self {
            latest: INITIAL_RTT,
            smoothed: INITIAL_RTT,
            var: INITIAL_RTT / 2,
            min: INITIAL_RTT,
            sampled: false,
        }
    }

    /// RFC 9002 section 5.3.
    fn update(&mut self, latest: Duration, ack_delay: Duration) {
        self.latest = latest;
        if !self.sampled {
            self.sampled = true;
            self.min = latest;
            self.smoothed = latest;
            self.var = latest / 2;
            return;
        }
        self.min = self.min.min(latest);
        let delay = ack_delay.min(MAX_ACK_DELAY);
        let adjusted = if latest >= self.min + delay {
            latest - delay
        } else {
            latest
        };
        self.var = self.var.mul_f64(0.75) + self.smoothed.abs_diff(adjusted).mul_f64(0.25);
        self.smoothed = self.smoothed.mul_f64(0.875) + adjusted.mul_f64(0.125);
    }

    fn pto(&self) -> Duration {
        self.smoothed + (self.var * 4).max(GRANULARITY) + MAX_ACK_DELAY
    }
}

/// Counters for the owner's figures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlowStats {
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub ptos: u64,
    pub duplicates: u64,
}

pub struct Flow {
    mss: usize,
    // Sending.
    next_pn: u64,
    sent: BTreeMap<u64, Sent>,
    in_flight: usize,
    largest_acked: Option<u64>,
    loss_time: Option<Instant>,
    pto_count: u32,
    last_eliciting_sent: Option<Instant>,
    probes: u32,
    rtt: Rtt,
    cc: Bbr,
    pacer_tokens: f64,
    pacer_at: Option<Instant>,
    delivered: u64,
    delivered_time: Option<Instant>,
    first_sent_time: Option<Instant>,
    app_limited: bool,
    // Receiving.
    received: Ranges,
    largest_received_at: Option<Instant>,
    unacked_eliciting: u32,
    ack_deadline: Option<Instant>,
    ack_now: bool,
    events: VecDeque<FlowEvent>,
    pub stats: FlowStats,
}

impl Flow {
    /// `mss`: the largest packet this flow sends, in bytes.
    pub fn new(mss: usize) -> Self {
        Self {
            mss,
            next_pn: 0,
            sent: BTreeMap::new(),
            in_flight: 0,
            largest_acked: None,
            loss_time: None,
            pto_count: 0,
            last_eliciting_sent: None,
            probes: 0,
            rtt: Rtt::new(),
            cc: Bbr::new(mss),
            pacer_tokens: 0.0,
            pacer_at: None,
            delivered: 0,
            delivered_time: None,
            first_sent_time: None,
            app_limited: false,
            received: Ranges::default(),
            largest_received_at: None,
            unacked_eliciting: 0,
            ack_deadline: None,
            ack_now: false,
            events: VecDeque::new(),
            stats: FlowStats::default(),
        }
    }

    /// The largest packet changed (path MTU discovery).
    pub fn set_mss(&mut self, mss: usize) {
        self.mss = mss;
        self.cc.set_mss(mss);
    }

    /// Probe timeouts in a row without an acknowledgement.
    pub fn pto_count(&self) -> u32 {
        self.pto_count
    }

    pub fn controller(&self) -> &Bbr {
        &self.cc
    }

    pub fn smoothed_rtt(&self) -> Option<Duration> {
        self.rtt.sampled.then_some(self.rtt.smoothed)
    }

    /// Packets sent and neither acknowledged nor lost.
    pub fn outstanding(&self) -> usize {
        self.sent.len()
    }

    /// Burst the pacer allows: about [`BURST_INTERVAL`] at the current
    /// rate, within [`MIN_BURST`] and [`MAX_BURST`] packets. Timers fire
    /// about a millisecond late at best: a smaller burst would let the
    /// timer, not the controller, set the rate (and the rate samples that
    /// feed the controller would then say no more than that).
    fn burst(&self) -> f64 {
        let mss = self.mss as f64;
        (self.cc.pacing_rate() * BURST_INTERVAL.as_secs_f64())
            .clamp(MIN_BURST as f64 * mss, MAX_BURST as f64 * mss)
    }

    /// Tokens the pacer has at `now`.
    fn tokens(&self, now: Instant) -> f64 {
        match self.pacer_at {
            None => self.burst(),
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                (self.pacer_tokens + elapsed * self.cc.pacing_rate()).min(self.burst())
            }
        }
    }

    /// When a packet of `size` bytes may leave: `None` while the window is
    /// full (wait for acknowledgements), else `now` or a later pacing
    /// time. A probe the PTO asked for may leave at once.
    pub fn send_time(&self, now: Instant, size: usize) -> Option<Instant> {
        if self.probes > 0 {
            return Some(now);
        }
        if self.in_flight + size > self.cc.window() {
            return None;
        }
        let tokens = self.tokens(now);
        if tokens >= size as f64 {
            return Some(now);
        }
        let wait = (size as f64 - tokens) / self.cc.pacing_rate().max(1.0);
        Some(now + Duration::from_secs_f64(wait))
    }

    /// The owner has nothing to send although the flow would let it: rate
    /// samples until the next send say more about it than about the path.
    pub fn set_app_limited(&mut self) {
        self.app_limited = true;
    }

    /// Records a packet the owner sends now; returns its number.
    pub fn on_sent(&mut self, now: Instant, size: usize, ack_eliciting: bool) -> u64 {
        self.record(now, size, ack_eliciting, false)
    }

    /// Records a path MTU probe sent now (whatever the window: one at a
    /// time); its loss is not taken for congestion.
    pub fn on_sent_probe(&mut self, now: Instant, size: usize) -> u64 {
        self.record(now, size, true, true)
    }

    fn record(&mut self, now: Instant, size: usize, ack_eliciting: bool, mtu_probe: bool) -> u64 {
        let pn = self.next_pn;
        self.next_pn += 1;
        self.stats.sent_packets += 1;
        let tokens = self.tokens(now);
        self.pacer_tokens = (tokens - size as f64).max(-(self.mss as f64));
        self.pacer_at = Some(now);
        self.probes = self.probes.saturating_sub(1);
        if self.in_flight == 0 {
            self.first_sent_time = Some(now);
            self.delivered_time = Some(now);
        }
        let app_limited = std::mem::take(&mut self.app_limited);
        self.sent.insert(
            pn,
            Sent {
                time: now,
                size,
                ack_eliciting,
                delivered: self.delivered,
                delivered_time: self.delivered_time.unwrap_or(now),
                first_sent_time: self.first_sent_time.unwrap_or(now),
                app_limited,
                mtu_probe,
            },
        );
        self.in_flight += size;
        if ack_eliciting {
            self.last_eliciting_sent = Some(now);
        }
        pn
    }

    /// The peer's acknowledgement.
    pub fn on_ack(&mut self, now: Instant, ack: &AckFrame) {
        let Some(largest) = ack.largest() else {
            return;
        };
        if largest >= self.next_pn {
            // Acknowledges what we never sent: a confused or hostile peer.
            return;
        }
        self.largest_acked = Some(self.largest_acked.map_or(largest, |l| l.max(largest)));
        let newly: Vec<u64> = ack
            .ranges
            .iter()
            .flat_map(|(s, e)| self.sent.range(*s..=*e).map(|(pn, _)| *pn))
            .collect();
        if newly.is_empty() {
            return;
        }
        // RTT from the largest, if it is newly acknowledged and elicited.
        if let Some(p) = self.sent.get(&largest).filter(|p| p.ack_eliciting) {
            self.rtt
                .update(now.saturating_duration_since(p.time), ack.delay);
        }
        let mut newest: Option<Sent> = None;
        let mut acked_bytes = 0;
        for pn in newly {
            let p = self.sent.remove(&pn).expect("listed");
            self.in_flight -= p.size;
            acked_bytes += p.size;
            self.delivered += p.size as u64;
            if newest.as_ref().is_none_or(|n| p.time >= n.time) {
                newest = Some(p);
            }
            self.events.push_back(FlowEvent::Acked(pn));
        }
        self.delivered_time = Some(now);
        if let Some(p) = newest {
            self.first_sent_time = Some(p.time);
            let send_elapsed = p.time.saturating_duration_since(p.first_sent_time);
            let ack_elapsed = now.saturating_duration_since(p.delivered_time);
            let interval = send_elapsed.max(ack_elapsed).max(GRANULARITY);
            let sample = RateSample {
                delivery_rate: (self.delivered - p.delivered) as f64 / interval.as_secs_f64(),
                rtt: now.saturating_duration_since(p.time),
                app_limited: p.app_limited,
                prior_delivered: p.delivered,
            };
            self.cc
                .on_ack(now, sample, acked_bytes, self.delivered, self.in_flight);
        }
        self.pto_count = 0;
        self.detect_lost(now);
    }

    /// RFC 9002 section 6.1.
    fn detect_lost(&mut self, now: Instant) {
        self.loss_time = None;
        let Some(largest) = self.largest_acked else {
            return;
        };
        let delay = self
            .rtt
            .latest
            .max(self.rtt.smoothed)
            .mul_f64(TIME_THRESHOLD)
            .max(GRANULARITY);
        let mut lost = Vec::new();
        for (pn, p) in self.sent.range(..largest) {
            if largest >= pn + PACKET_THRESHOLD || p.time + delay <= now {
                lost.push(*pn);
            } else {
                let at = p.time + delay;
                self.loss_time = Some(self.loss_time.map_or(at, |t| t.min(at)));
            }
        }
        for pn in lost {
            let p = self.sent.remove(&pn).expect("listed");
            self.in_flight -= p.size;
            if !p.mtu_probe {
                self.cc.on_loss(p.size);
                self.stats.lost_packets += 1;
            }
            self.events.push_back(FlowEvent::Lost(pn));
        }
    }

    fn pto_deadline(&self) -> Option<Instant> {
        let eliciting = self.sent.values().any(|p| p.ack_eliciting);
        let last = self.last_eliciting_sent?;
        eliciting.then(|| last + self.rtt.pto() * 2u32.pow(self.pto_count.min(MAX_PTO_BACKOFF)))
    }

    /// A packet from the peer: false if it is a duplicate (drop it).
    pub fn on_received(&mut self, now: Instant, pn: u64, ack_eliciting: bool) -> bool {
        let gap = self.received.largest().is_some_and(|l| pn != l + 1);
        if !self.received.insert(pn) {
            self.stats.duplicates += 1;
            // The peer is retransmitting what we have: our ack was lost.
            self.ack_now = true;
            return false;
        }
        if self.received.largest() == Some(pn) {
            self.largest_received_at = Some(now);
        }
        if ack_eliciting {
            self.unacked_eliciting += 1;
            // Out of order: tell the sender at once (RFC 9000 13.2.1).
            if gap || self.unacked_eliciting >= ACK_EVERY {
                self.ack_now = true;
            } else if self.ack_deadline.is_none() {
                self.ack_deadline = Some(now + MAX_ACK_DELAY);
            }
        }
        true
    }

    /// Forgets what was received: the peer's flow is a new one (its
    /// numbers start again), while ours goes on.
    pub fn reset_receiving(&mut self) {
        self.received = Ranges::default();
        self.largest_received_at = None;
        self.unacked_eliciting = 0;
        self.ack_deadline = None;
        self.ack_now = false;
    }

    /// The acknowledgement to send now, if one is due.
    pub fn poll_ack(&mut self, now: Instant) -> Option<AckFrame> {
        let due = self.ack_now || self.ack_deadline.is_some_and(|t| now >= t);
        if !due || self.received.is_empty() {
            return None;
        }
        self.ack_now = false;
        self.ack_deadline = None;
        self.unacked_eliciting = 0;
        let delay = self
            .largest_received_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        Some(AckFrame {
            ranges: self.received.descending(),
            delay,
        })
    }

    /// Probe packets the PTO asked for and not yet sent: the owner should
    /// send that many ack-eliciting packets (new data, or the oldest
    /// unacknowledged again) whatever the window says.
    pub fn probes_wanted(&self) -> u32 {
        self.probes
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let recovery = self.loss_time.or_else(|| self.pto_deadline());
        [recovery, self.ack_deadline].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ack_deadline.is_some_and(|t| now >= t) {
            self.ack_now = true;
        }
        if self.loss_time.is_some_and(|t| now >= t) {
            self.detect_lost(now);
            return;
        }
        if self.pto_deadline().is_some_and(|t| now >= t) {
            self.pto_count += 1;
            self.stats.ptos += 1;
            self.probes = 2;
            // The next PTO is measured from the probes, when they go.
            self.last_eliciting_sent = Some(now);
        }
    }

    /// The path changed: probe now (two packets may go whatever the
    /// window), and the next timeout counts from here without backoff.
    pub fn probe_now(&mut self, now: Instant) {
        self.pto_count = 0;
        self.probes = 2;
        self.last_eliciting_sent = Some(now);
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<FlowEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests;
