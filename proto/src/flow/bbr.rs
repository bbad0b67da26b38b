//! Model-based congestion control after BBR (Cardwell et al., "BBR:
//! Congestion-Based Congestion Control", ACM Queue 2016, and
//! draft-cardwell-iccrg-bbr-congestion-control).
//!
//! Why not NewReno or CUBIC: they read every loss as congestion and halve
//! their window. On a long path with 1% random loss that keeps them at a
//! few Mbit/s whatever the link can carry. BBR instead keeps a model of
//! the path, the bottleneck bandwidth (the highest delivery rate seen over
//! the last 10 round trips) and the round-trip propagation time (the lowest
//! RTT seen over 10 s), paces at the bandwidth and keeps about two
//! bandwidth-delay products in flight. Random loss does not change the
//! model; a real bottleneck does, because the delivery rate stops growing.
//!
//! States, as in BBR v1:
//! * Startup: pacing gain 2/ln 2 (2.885), doubling the rate each round
//!   trip until the bandwidth estimate grew less than 25% in three rounds.
//! * Drain: the inverse gain, until what is in flight fits one BDP.
//! * ProbeBw: cycles the pacing gain through 1.25, 0.75 and six rounds of
//!   1.0 to probe for more bandwidth and drain the queue it made.
//! * ProbeRtt: when the minimum RTT was not refreshed for 10 s, four
//!   packets in flight for 200 ms so the queue empties and a fresh minimum
//!   is measured.
//!
//! Loss is not ignored outright: a round trip that loses more than
//! [`LOSS_THRESH`] of what it delivered (and at least eight packets) caps
//! the window at 0.7 of what was in flight (BBR v2's `inflight_hi` and its
//! multiplicative decrease, simplified), and the cap grows back by an
//! eighth each round without such loss. 1% random loss never comes near
//! it; an overflowing queue does.
//!
//! Sharing a bottleneck with TCP (CUBIC), the queue's depth decides who
//! wins: in a shallow one BBR needs its two BDPs in flight to hold a
//! share, in a deep one (two BDPs of buffer) they take most of the link.
//! So when even the lowest RTT of each round stays well above the minimum
//! (a standing queue another flow keeps full), the window keeps one BDP
//! instead of two ([`Bbr::gain_for_window`]). Measured in the NAT lab (50
//! Mbit/s `tbf` shared with one CUBIC flow, docs/benchmarks.md): a 25 ms
//! queue gives the file 42-50%, a 100 ms queue 48-53%. A 2% loss cap
//! instead of 15% starved the file in the shallow queue (26-28%).

use std::time::{Duration, Instant};

const HIGH_GAIN: f64 = 2.885;
const DRAIN_GAIN: f64 = 1.0 / 2.885;
const CWND_GAIN: f64 = 2.0;
/// A round whose lowest RTT is this many times the minimum, for this many
/// rounds in a row, means a deep standing queue (see
/// [`Bbr::gain_for_window`]). (1.6 took a full shallow queue, 25 ms on a
/// 49 ms path, for a deep one now and then; 1.8 missed deep ones.)...
const DEEP_QUEUE_RTT: f64 = 1.7;
const DEEP_QUEUE_ROUNDS: u32 = 2;
/// ...and at least this much above it: on a path of sub-millisecond RTTs
/// (loopback) scheduling alone doubles a sample.
const DEEP_QUEUE_EXCESS: Duration = Duration::from_millis(5);
/// ...where the window keeps this many BDPs.
const DEEP_QUEUE_GAIN: f64 = 1.0;
const PACING_CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Bandwidth samples are kept for this many round trips.
const BW_WINDOW_ROUNDS: u64 = 10;
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// Startup ends when the bandwidth grew less than this in...
const FULL_BW_GROWTH: f64 = 1.25;
/// ...this many rounds in a row.
const FULL_BW_ROUNDS: u32 = 3;
/// A round that lost more than this fraction of what it delivered, and
/// at least [`LOSS_MIN_PACKETS`] packets, caps the window. (BBR v2 uses
/// 2%; here that gave TCP most of a shallow shared queue.)
pub const LOSS_THRESH: f64 = 0.15;
const LOSS_MIN_PACKETS: u64 = 8;
/// The cap: this fraction of what was in flight (of the window at most).
const LOSS_BETA: f64 = 0.7;
/// The cap grows back by this fraction each round without heavy loss.
const LOSS_REGROWTH: usize = 8;
/// Startup also ends on a round that lost more than this fraction and at
/// least [`STARTUP_LOSS_PACKETS`] packets (BBR v2's startup exit): the
/// queue overflowed, the pipe is full. 1% random loss stays below it.
const STARTUP_LOSS: f64 = 0.02;
const STARTUP_LOSS_PACKETS: u64 = 8;
/// Initial window, in packets (RFC 9002 suggests 10; a fast start on
/// loopback wants more, and pacing spreads them anyway).
const INITIAL_WINDOW_PACKETS: usize = 32;
const MIN_WINDOW_PACKETS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

/// One delivery-rate sample, taken when a packet is acknowledged
/// (draft-cheng-iccrg-delivery-rate-estimation).
#[derive(Debug, Clone, Copy)]
pub struct RateSample {
    /// Bytes per second.
    pub delivery_rate: f64,
    pub rtt: Duration,
    /// The packet was sent when the sender had nothing more to send: the
    /// rate says more about the application than the path.
    pub app_limited: bool,
    /// `delivered` when the acknowledged packet was sent.
    pub prior_delivered: u64,
}

#[derive(Debug, Clone)]
pub struct Bbr {
    mss: usize,
    mode: Mode,
    /// Per-round maxima of the delivery rate: (round, bytes/s).
    bw_samples: Vec<(u64, f64)>,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Option<Instant>,
    /// The lowest RTT sample of the round so far.
    round_min_rtt: Option<Duration>,
    /// Rounds in a row whose lowest RTT was [`DEEP_QUEUE_RTT`] times the
    /// minimum or more.
    deep_rounds: u32,
    round: u64,
    next_round_delivered: u64,
    full_bw: f64,
    full_bw_rounds: u32,
    filled_pipe: bool,
    cycle_index: usize,
    cycle_stamp: Option<Instant>,
    probe_rtt_done: Option<Instant>,
    pacing_gain: f64,
    cwnd_gain: f64,
    cwnd: usize,
    /// Cap from a round with heavy loss (`usize::MAX`: none).
    inflight_hi: usize,
    round_lost: u64,
    round_delivered: u64,
}

impl Bbr {
    pub fn new(mss: usize) -> Self {
        Self {
            mss,
            mode: Mode::Startup,
            bw_samples: Vec::new(),
            min_rtt: None,
            min_rtt_stamp: None,
            round_min_rtt: None,
            deep_rounds: 0,
            round: 0,
            next_round_delivered: 0,
            full_bw: 0.0,
            full_bw_rounds: 0,
            filled_pipe: false,
            cycle_index: 0,
            cycle_stamp: None,
            probe_rtt_done: None,
            pacing_gain: HIGH_GAIN,
            cwnd_gain: HIGH_GAIN,
            cwnd: INITIAL_WINDOW_PACKETS * mss,
            inflight_hi: usize::MAX,
            round_lost: 0,
            round_delivered: 0,
        }
    }

    /// The largest packet changed: the window's floor and allowances
    /// follow it.
    pub fn set_mss(&mut self, mss: usize) {
        self.mss = mss;
        self.cwnd = self.cwnd.max(MIN_WINDOW_PACKETS * mss);
    }

    #[cfg(test)]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The bottleneck bandwidth estimate, bytes per second.
    pub fn bandwidth(&self) -> f64 {
        self.bw_samples.iter().map(|s| s.1).fold(0.0, f64::max)
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    pub fn window(&self) -> usize {
        let w = if self.mode == Mode::ProbeRtt {
            MIN_WINDOW_PACKETS * self.mss
        } else {
            self.cwnd
        };
        w.min(self.inflight_hi).max(MIN_WINDOW_PACKETS * self.mss)
    }

    /// The window's gain: [`CWND_GAIN`] in ProbeBw, unless even the lowest
    /// RTT of each of the last [`DEEP_QUEUE_ROUNDS`] rounds was
    /// [`DEEP_QUEUE_RTT`] times the minimum (and [`DEEP_QUEUE_EXCESS`]
    /// above it): a deep queue that another flow keeps full (a loss-based
    /// TCP in a big buffer), where two BDPs in flight would take most of
    /// the bottleneck; then [`DEEP_QUEUE_GAIN`]. (A shallow queue drains
    /// now and then, and a round's lowest RTT shows it. Alone on a path,
    /// the queue is our own: one BDP still fills the pipe, the queue
    /// drains, and the gain goes back to two.)
    fn gain_for_window(&self) -> f64 {
        if self.mode == Mode::ProbeBw && self.deep_rounds >= DEEP_QUEUE_ROUNDS {
            DEEP_QUEUE_GAIN
        } else {
            self.cwnd_gain
        }
    }

    /// Bytes per second to pace at.
    pub fn pacing_rate(&self) -> f64 {
        let bw = self.bandwidth();
        if bw > 0.0 {
            return self.pacing_gain * bw;
        }
        // No sample yet: the initial window over the RTT (or 1 ms).
        let rtt = self.min_rtt.unwrap_or(Duration::from_millis(1));
        HIGH_GAIN * self.cwnd as f64 / rtt.as_secs_f64().max(1e-6)
    }

    fn bdp(&self) -> Option<f64> {
        let bw = self.bandwidth();
        let rtt = self.min_rtt?;
        (bw > 0.0).then_some(bw * rtt.as_secs_f64())
    }

    /// What the window must hold to keep the path busy: the BDP plus what
    /// arrives while the receiver holds its acknowledgements (up to
    /// `MAX_ACK_DELAY`) and the sender's own scheduling delay, which the
    /// minimum RTT of a fast path does not show. Without it, a loopback
    /// path (min RTT ~50 µs) gets a window of a few packets and a rate to
    /// match. (BBR v2 adds its `extra_acked` for the same reason.)
    fn window_target(&self) -> Option<f64> {
        let bdp = self.bdp()?;
        let aggregation = self.bandwidth() * crate::flow::MAX_ACK_DELAY.as_secs_f64();
        Some(self.gain_for_window() * bdp + aggregation)
    }

    /// Packets were lost.
    pub fn on_loss(&mut self, bytes: usize) {
        self.round_lost += bytes as u64;
    }

    /// A packet was acknowledged: `acked` bytes, `delivered` in all so far,
    /// `in_flight` after the acknowledgement.
    pub fn on_ack(
        &mut self,
        now: Instant,
        sample: RateSample,
        acked: usize,
        delivered: u64,
        in_flight: usize,
    ) {
        self.round_delivered += acked as u64;
        // A new round trip starts when a packet sent after the last round
        // started is acknowledged.
        let new_round = sample.prior_delivered >= self.next_round_delivered;
        if new_round {
            self.next_round_delivered = delivered;
            self.round += 1;
            self.end_round(in_flight);
        }
        self.update_bw(sample);
        self.update_min_rtt(now, sample.rtt);
        self.round_min_rtt = Some(self.round_min_rtt.map_or(sample.rtt, |m| m.min(sample.rtt)));
        if new_round {
            self.check_full_pipe(sample);
        }
        self.update_mode(now, in_flight);
        self.update_cwnd(acked);
    }

    fn end_round(&mut self, in_flight: usize) {
        let deep = match (self.round_min_rtt.take(), self.min_rtt) {
            (Some(r), Some(min)) => {
                r.as_secs_f64() >= DEEP_QUEUE_RTT * min.as_secs_f64()
                    && r >= min + DEEP_QUEUE_EXCESS
            }
            _ => false,
        };
        self.deep_rounds = if deep { self.deep_rounds + 1 } else { 0 };
        let lost = self.round_lost as f64;
        let delivered = self.round_delivered.max(1) as f64;
        tracing::trace!(
            mode = ?self.mode,
            bw_mbit = self.bandwidth() * 8e-6,
            min_rtt = ?self.min_rtt,
            cwnd = self.cwnd,
            inflight_hi = self.inflight_hi,
            in_flight,
            lost_pct = 100.0 * lost / delivered,
            deep_rounds = self.deep_rounds,
            "BBR(ROUND)"
        );
        if self.mode == Mode::Startup
            && self.round_lost >= STARTUP_LOSS_PACKETS * self.mss as u64
            && lost / delivered > STARTUP_LOSS
        {
            self.filled_pipe = true;
        }
        if lost / delivered > LOSS_THRESH && self.round_lost >= LOSS_MIN_PACKETS * self.mss as u64 {
            let cap = (in_flight.min(self.cwnd) as f64 * LOSS_BETA) as usize;
            self.inflight_hi = cap.max(MIN_WINDOW_PACKETS * self.mss);
        } else if self.inflight_hi != usize::MAX {
            // Grow the cap back a little each clean round.
            self.inflight_hi = self
                .inflight_hi
                .saturating_add(self.inflight_hi / LOSS_REGROWTH);
            if self.inflight_hi > 4 * self.cwnd {
                self.inflight_hi = usize::MAX;
            }
        }
        self.round_lost = 0;
        self.round_delivered = 0;
    }

    fn update_bw(&mut self, s: RateSample) {
        if !s.delivery_rate.is_finite() || s.delivery_rate <= 0.0 {
            return;
        }
        // An application-limited sample only counts if it raises the
        // estimate: it shows at least that much is possible. So does one
        // taken in ProbeRtt, whose four-packet window says nothing about
        // the path; and the window of rounds does not move on then, or a
        // fast path (many short rounds in 200 ms) would forget its
        // bandwidth and crawl back from the ProbeRtt rate.
        let limited = s.app_limited || self.mode == Mode::ProbeRtt;
        if limited && s.delivery_rate <= self.bandwidth() {
            return;
        }
        match self.bw_samples.last_mut() {
            Some((r, bw)) if *r == self.round => *bw = bw.max(s.delivery_rate),
            _ => self.bw_samples.push((self.round, s.delivery_rate)),
        }
        if !limited {
            let oldest = self.round.saturating_sub(BW_WINDOW_ROUNDS);
            self.bw_samples.retain(|(r, _)| *r > oldest);
        }
    }

    fn update_min_rtt(&mut self, now: Instant, rtt: Duration) {
        let expired = self
            .min_rtt_stamp
            .is_some_and(|t| now.saturating_duration_since(t) > MIN_RTT_WINDOW);
        if self.min_rtt.is_none_or(|m| rtt <= m) || expired {
            self.min_rtt = Some(rtt);
            self.min_rtt_stamp = Some(now);
            if expired && self.mode != Mode::ProbeRtt && self.filled_pipe {
                self.mode = Mode::ProbeRtt;
                self.pacing_gain = 1.0;
                self.probe_rtt_done = Some(now + PROBE_RTT_TIME);
            }
        }
    }

    fn check_full_pipe(&mut self, s: RateSample) {
        if self.filled_pipe || s.app_limited {
            return;
        }
        let bw = self.bandwidth();
        if bw >= self.full_bw * FULL_BW_GROWTH {
            self.full_bw = bw;
            self.full_bw_rounds = 0;
            return;
        }
        self.full_bw_rounds += 1;
        if self.full_bw_rounds >= FULL_BW_ROUNDS {
            self.filled_pipe = true;
        }
    }

    fn update_mode(&mut self, now: Instant, in_flight: usize) {
        match self.mode {
            Mode::Startup if self.filled_pipe => {
                self.mode = Mode::Drain;
                self.pacing_gain = DRAIN_GAIN;
                self.cwnd_gain = HIGH_GAIN;
            }
            Mode::Drain => {
                if self.bdp().is_some_and(|bdp| in_flight as f64 <= bdp) {
                    self.enter_probe_bw(now);
                }
            }
            Mode::ProbeBw => {
                let phase = self.min_rtt.unwrap_or(Duration::from_millis(1));
                let due = self
                    .cycle_stamp
                    .is_some_and(|t| now.saturating_duration_since(t) >= phase);
                // Leave the 0.75 phase early once the queue drained.
                let drained =
                    self.pacing_gain < 1.0 && self.bdp().is_some_and(|bdp| in_flight as f64 <= bdp);
                if due || drained {
                    self.cycle_index = (self.cycle_index + 1) % PACING_CYCLE.len();
                    self.cycle_stamp = Some(now);
                    self.pacing_gain = PACING_CYCLE[self.cycle_index];
                }
            }
            Mode::ProbeRtt => {
                if self.probe_rtt_done.is_some_and(|t| now >= t) {
                    self.min_rtt_stamp = Some(now);
                    self.enter_probe_bw(now);
                }
            }
            Mode::Startup => {}
        }
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        self.mode = Mode::ProbeBw;
        self.cwnd_gain = CWND_GAIN;
        // Start anywhere but the draining phase (as BBR does, at random;
        // here at the first steady phase, which is deterministic).
        self.cycle_index = 2;
        self.pacing_gain = PACING_CYCLE[self.cycle_index];
        self.cycle_stamp = Some(now);
    }

    fn update_cwnd(&mut self, acked: usize) {
        let floor = MIN_WINDOW_PACKETS * self.mss;
        match self.window_target() {
            Some(target) => {
                let target = target as usize + 3 * self.mss;
                if self.filled_pipe {
                    self.cwnd = (self.cwnd + acked).min(target);
                } else if self.cwnd < target {
                    self.cwnd += acked;
                }
            }
            None => self.cwnd += acked,
        }
        self.cwnd = self.cwnd.max(floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_finds_the_bandwidth_then_drains_and_probes() {
        let mss = 1200;
        let mut b = Bbr::new(mss);
        let mut now = Instant::now();
        let rtt = Duration::from_millis(50);
        let link = 10_000_000.0; // 10 MB/s bottleneck
        let mut delivered = 0u64;
        let mut rate = 1_000_000.0;
        for _ in 0..30 {
            // One round: the delivery rate grows until the link caps it.
            rate = (rate * 2.0_f64).min(link);
            let prior = delivered;
            for _ in 0..400 {
                delivered += mss as u64;
                let s = RateSample {
                    delivery_rate: rate,
                    rtt,
                    app_limited: false,
                    prior_delivered: prior,
                };
                b.on_ack(now, s, mss, delivered, (link * 0.05) as usize);
            }
            now += rtt;
        }
        assert!((b.bandwidth() - link).abs() < 1.0, "{}", b.bandwidth());
        assert_eq!(b.mode(), Mode::ProbeBw);
        let bdp = link * 0.05;
        assert!(b.window() as f64 >= 2.0 * bdp * 0.9, "{}", b.window());
        let aggregation = link * crate::flow::MAX_ACK_DELAY.as_secs_f64();
        assert!(b.window() as f64 <= 2.0 * bdp + aggregation + 4.0 * mss as f64);
    }

    /// Rounds of acknowledgements at `rate` with RTT samples `rtt`.
    fn rounds(b: &mut Bbr, now: &mut Instant, delivered: &mut u64, n: usize, rtt: Duration) {
        let (mss, rate) = (1200, 10_000_000.0);
        for _ in 0..n {
            let prior = *delivered;
            for _ in 0..400 {
                *delivered += mss as u64;
                let s = RateSample {
                    delivery_rate: rate,
                    rtt,
                    app_limited: false,
                    prior_delivered: prior,
                };
                b.on_ack(*now, s, mss, *delivered, 500_000);
            }
            *now += rtt;
        }
    }

    #[test]
    fn a_queue_another_flow_keeps_full_gets_a_smaller_window() {
        let mut b = Bbr::new(1200);
        let (mut now, mut delivered) = (Instant::now(), 0);
        let base = Duration::from_millis(50);
        rounds(&mut b, &mut now, &mut delivered, 30, base);
        assert_eq!(b.mode(), Mode::ProbeBw);
        let bdp = 10_000_000.0 * 0.05;
        let normal = b.window() as f64;
        assert!(normal >= 1.9 * bdp, "{normal}");
        // A queue that comes and goes (lowest RTT of a round at the
        // minimum): the window stays.
        rounds(&mut b, &mut now, &mut delivered, 1, base * 3);
        rounds(&mut b, &mut now, &mut delivered, 1, base);
        rounds(&mut b, &mut now, &mut delivered, 1, base * 3);
        assert_eq!(b.window() as f64, normal);
        // One that stays (every round at three times the minimum): about
        // 1.25 BDPs, plus the aggregation allowance.
        rounds(&mut b, &mut now, &mut delivered, 4, base * 3);
        let aggregation = 10_000_000.0 * crate::flow::MAX_ACK_DELAY.as_secs_f64();
        let w = b.window() as f64;
        assert!(
            w <= DEEP_QUEUE_GAIN * bdp + aggregation + 4.0 * 1200.0,
            "{w}"
        );
        // It drains: the window comes back.
        rounds(&mut b, &mut now, &mut delivered, 3, base);
        assert!(b.window() as f64 >= 1.9 * bdp, "{}", b.window());
    }

    #[test]
    fn random_loss_does_not_shrink_the_model_but_heavy_loss_caps_the_window() {
        let mss = 1200;
        let mut b = Bbr::new(mss);
        let now = Instant::now();
        let s = |prior| RateSample {
            delivery_rate: 5_000_000.0,
            rtt: Duration::from_millis(20),
            app_limited: false,
            prior_delivered: prior,
        };
        let mut delivered = 0;
        for round in 0..20u64 {
            let prior = delivered;
            for _ in 0..100 {
                delivered += mss as u64;
                b.on_ack(now, s(prior), mss, delivered, 100_000);
            }
            // 1% loss every round.
            b.on_loss(mss);
            let _ = round;
        }
        let w = b.window();
        assert!(w > 150_000, "1% loss must not collapse the window: {w}");
        // A round that loses half of what it delivers.
        let prior = delivered;
        for _ in 0..10 {
            delivered += mss as u64;
            b.on_ack(now, s(prior), mss, delivered, 40_000);
            b.on_loss(mss);
        }
        // The next round's first ack ends that round.
        delivered += mss as u64;
        b.on_ack(now, s(delivered), mss, delivered, 40_000);
        assert!(b.window() <= 40_000, "{}", b.window());
    }

    #[test]
    fn probe_rtt_does_not_forget_the_bandwidth() {
        let mss = 1200;
        let mut b = Bbr::new(mss);
        let mut now = Instant::now();
        let rtt = Duration::from_micros(200);
        let mut delivered = 0u64;
        let feed = |b: &mut Bbr, now: Instant, rate: f64, rounds: u32, delivered: &mut u64| {
            for _ in 0..rounds {
                let prior = *delivered;
                for _ in 0..4 {
                    *delivered += mss as u64;
                    let s = RateSample {
                        delivery_rate: rate,
                        rtt,
                        app_limited: false,
                        prior_delivered: prior,
                    };
                    b.on_ack(now, s, mss, *delivered, 4 * mss);
                }
            }
        };
        feed(&mut b, now, 500e6, 50, &mut delivered);
        assert_eq!(b.mode(), Mode::ProbeBw);
        // Past the min-RTT window: ProbeRtt, with its low delivery rate
        // for many short rounds.
        now += MIN_RTT_WINDOW + Duration::from_millis(1);
        feed(&mut b, now, 5e6, 1, &mut delivered);
        assert_eq!(b.mode(), Mode::ProbeRtt);
        feed(&mut b, now, 5e6, 100, &mut delivered);
        assert!(b.bandwidth() >= 500e6, "{}", b.bandwidth());
    }
}
