//! Path MTU discovery for the flow's packets, after RFC 8899 (DPLPMTUD):
//! the largest datagram a path carries is learned by sending padded probe
//! packets of a larger size and seeing them acknowledged, never from ICMP
//! (which NATs and firewalls drop) and never assumed.
//!
//! A flow starts at [`BASE`], which any path carries. While data waits to
//! be sent, one probe at a time tries the next size of [`SEARCH`]; an
//! acknowledged probe raises the size, [`MAX_PROBES`] lost probes of one
//! size end the search there until [`RAISE_AFTER`]. When full-size packets
//! stop arriving while smaller ones would (a black hole: a route change the
//! session did not see), the owner falls back to [`BASE`] and searches
//! again. A new path (direct to relayed, a new endpoint) starts over.
//!
//! The socket must not let the system fragment (Linux: IP_MTU_DISCOVER set
//! to IP_PMTUDISC_PROBE), or probes of any size would arrive in pieces.

use crate::wire;
use std::time::{Duration, Instant};

/// What every path carries (the IPv6 minimum MTU less headers).
pub const BASE: usize = wire::MAX_PACKET;
/// Sizes tried, smallest first: Ethernet's 1,500-byte MTU less the IPv6
/// and UDP headers; a 9,000-byte jumbo frame's; loopback's.
pub const SEARCH: [usize; 3] = [1452, 8952, wire::MAX_DATAGRAM];
/// Probes of one size lost in a row before it counts as too large (RFC
/// 8899 MAX_PROBES).
pub const MAX_PROBES: u32 = 3;
/// How long a finished search rests before trying larger again (RFC 8899
/// PMTU_RAISE_TIMER).
pub const RAISE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct Pmtud {
    /// The most this path may carry (a relay carries [`BASE`]).
    ceiling: usize,
    /// The largest size proven on the path.
    current: usize,
    /// The index in [`SEARCH`] tried next.
    next: usize,
    fails: u32,
    /// The probe in flight: its packet number.
    probe: Option<u64>,
    resume_at: Option<Instant>,
}

impl Pmtud {
    pub fn new(ceiling: usize) -> Self {
        Pmtud {
            ceiling,
            current: BASE,
            next: 0,
            fails: 0,
            probe: None,
            resume_at: None,
        }
    }

    /// The largest datagram to send now.
    pub fn current(&self) -> usize {
        self.current
    }

    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// The size of the probe to send now, if one is due.
    pub fn probe_size(&self, now: Instant) -> Option<usize> {
        if self.probe.is_some() || self.resume_at.is_some_and(|t| now < t) {
            return None;
        }
        SEARCH
            .get(self.next)
            .copied()
            .filter(|s| *s <= self.ceiling && *s > self.current)
    }

    pub fn on_probe_sent(&mut self, pn: u64) {
        self.probe = Some(pn);
    }

    /// The probe `pn` arrived: its size is proven. Returns the new size.
    pub fn on_acked(&mut self, pn: u64) -> Option<usize> {
        if self.probe != Some(pn) {
            return None;
        }
        self.probe = None;
        let size = SEARCH.get(self.next).copied()?;
        self.current = self.current.max(size);
        self.next += 1;
        self.fails = 0;
        self.resume_at = None;
        Some(self.current)
    }

    /// The probe `pn` was lost.
    pub fn on_lost(&mut self, now: Instant, pn: u64) {
        if self.probe != Some(pn) {
            return;
        }
        self.probe = None;
        self.fails += 1;
        if self.fails >= MAX_PROBES {
            self.fails = 0;
            self.resume_at = Some(now + RAISE_AFTER);
        }
    }

    /// Full-size packets stopped arriving: back to [`BASE`], and search
    /// again from there at once (probes that are lost end the search as
    /// usual, so a real black hole costs three probes). Returns whether the
    /// size dropped.
    pub fn black_hole(&mut self) -> bool {
        if self.current == BASE {
            return false;
        }
        self.current = BASE;
        self.next = 0;
        self.fails = 0;
        self.probe = None;
        self.resume_at = None;
        true
    }

    /// The session moved to another path, carrying at most `ceiling`.
    pub fn new_path(&mut self, ceiling: usize) {
        *self = Pmtud::new(ceiling);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked_through(p: &mut Pmtud, now: Instant, pn: &mut u64) -> Vec<usize> {
        let mut sizes = Vec::new();
        while let Some(s) = p.probe_size(now) {
            *pn += 1;
            p.on_probe_sent(*pn);
            assert_eq!(p.probe_size(now), None, "one probe at a time");
            assert_eq!(p.on_acked(*pn), Some(s));
            sizes.push(s);
        }
        sizes
    }

    #[test]
    fn climbs_to_the_ceiling_one_probe_at_a_time() {
        let now = Instant::now();
        let mut pn = 0;
        let mut p = Pmtud::new(wire::MAX_DATAGRAM);
        assert_eq!(p.current(), BASE);
        assert_eq!(acked_through(&mut p, now, &mut pn), SEARCH.to_vec());
        assert_eq!(p.current(), wire::MAX_DATAGRAM);
        // A relayed path never probes above BASE.
        let mut relayed = Pmtud::new(BASE);
        assert_eq!(relayed.probe_size(now), None);
        relayed.new_path(9000);
        assert_eq!(acked_through(&mut relayed, now, &mut pn), vec![1452, 8952]);
    }

    #[test]
    fn lost_probes_end_the_search_until_the_raise_timer() {
        let now = Instant::now();
        let mut p = Pmtud::new(wire::MAX_DATAGRAM);
        p.on_probe_sent(1);
        assert_eq!(p.on_acked(1), Some(1452));
        for pn in 2..2 + MAX_PROBES as u64 {
            assert_eq!(p.probe_size(now), Some(8952));
            p.on_probe_sent(pn);
            // An acknowledgement of another packet changes nothing.
            assert_eq!(p.on_acked(pn + 100), None);
            p.on_lost(now, pn);
        }
        assert_eq!(p.current(), 1452);
        assert_eq!(p.probe_size(now + RAISE_AFTER / 2), None);
        assert_eq!(p.probe_size(now + RAISE_AFTER), Some(8952));
    }

    #[test]
    fn a_black_hole_falls_back_to_base() {
        let now = Instant::now();
        let mut pn = 0;
        let mut p = Pmtud::new(wire::MAX_DATAGRAM);
        acked_through(&mut p, now, &mut pn);
        assert!(p.black_hole());
        assert_eq!(p.current(), BASE);
        assert!(!p.black_hole(), "already at the base");
        assert_eq!(p.probe_size(now), Some(1452));
    }
}
