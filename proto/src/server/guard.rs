//! What keeps a flood of handshakes from costing the server more than it
//! can give: per-source token buckets and WireGuard-style cookies.
//!
//! Neither keeps state for an address that has not proven it receives at
//! the address it sends from, except a bounded map of buckets (a full
//! map forgets one entry, which can only make a source's limit more
//! lenient, never lock one out).

use crate::canonical;
use crate::wire::Cookie;
use rand::Rng;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The key a source's limits are kept under: its IPv4 address, or its
/// IPv6 /64 (one subscriber's prefix, so rotating the low bits buys
/// nothing).
pub fn source_key(addr: SocketAddr) -> IpAddr {
    source_prefix(addr, 8)
}

/// `addr`'s IPv4 address, or the first `v6_bytes` bytes of its IPv6
/// address.
fn source_prefix(addr: SocketAddr, v6_bytes: usize) -> IpAddr {
    match canonical(addr).ip() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[v6_bytes.min(16)..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

/// A token bucket: `burst` at most, refilled at `per_sec`.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    pub fn full(burst: f64) -> Self {
        Self {
            tokens: burst,
            at: None,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant, per_sec: f64, burst: f64) -> bool {
        let elapsed = self
            .at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.tokens = (self.tokens + elapsed * per_sec).min(burst);
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token, as of the last [`Bucket::take`].
    pub fn wait(&self, per_sec: f64) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::try_from_secs_f64(missing / per_sec).unwrap_or(Duration::MAX)
    }
}

/// Token buckets per source ([`source_key`]), at most `max` of them.
#[derive(Debug)]
pub struct SourceBuckets {
    buckets: BTreeMap<IpAddr, Bucket>,
    per_sec: f64,
    burst: f64,
    max: usize,
    /// How much of an IPv6 address names a source, in bytes.
    v6_bytes: usize,
}

impl SourceBuckets {
    pub fn new(per_sec: f64, burst: f64, max: usize) -> Self {
        Self {
            buckets: BTreeMap::new(),
            per_sec,
            burst,
            max,
            v6_bytes: 8,
        }
    }

    /// Keyed by IPv6 /48 (a site's prefix) rather than /64.
    pub fn by_site(mut self) -> Self {
        self.v6_bytes = 6;
        self
    }

    /// How long until `addr`'s source has a token again.
    pub fn wait(&self, addr: SocketAddr) -> Duration {
        self.buckets
            .get(&source_prefix(addr, self.v6_bytes))
            .map_or(Duration::ZERO, |b| b.wait(self.per_sec))
    }

    /// Takes one token from `addr`'s source; a rate of zero means no
    /// limit.
    pub fn take(&mut self, now: Instant, addr: SocketAddr) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let key = source_prefix(addr, self.v6_bytes);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max {
            // Full: one goes (the first by address, no scan), which only
            // gives that source a fresh allowance.
            self.buckets.pop_first();
        }
        let burst = self.burst;
        self.buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(burst))
            .take(now, self.per_sec, burst)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// How long one cookie secret is used; a cookie made under the previous
/// secret is still taken, so a cookie lives two to four minutes.
pub const COOKIE_SECRET_LIFE: Duration = Duration::from_secs(120);

/// Cookies: a MAC over the address a handshake came from, under a random
/// secret that changes every [`COOKIE_SECRET_LIFE`]. Only whoever
/// receives at that address learns its cookie.
pub struct Cookies {
    current: ring::hmac::Key,
    previous: ring::hmac::Key,
    changed: Option<Instant>,
}

impl Cookies {
    pub fn new(rng: &mut impl Rng) -> Self {
        Self {
            current: Self::secret(rng),
            previous: Self::secret(rng),
            changed: None,
        }
    }

    fn secret(rng: &mut impl Rng) -> ring::hmac::Key {
        let mut s = [0u8; 32];
        rng.fill(&mut s);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &s)
    }

    fn rotate(&mut self, now: Instant, rng: &mut impl Rng) {
        match self.changed {
            None => self.changed = Some(now),
            Some(t) if now.saturating_duration_since(t) >= COOKIE_SECRET_LIFE => {
                self.previous = std::mem::replace(&mut self.current, Self::secret(rng));
                self.changed = Some(now);
            }
            Some(_) => {}
        }
    }

    fn mac(key: &ring::hmac::Key, addr: SocketAddr) -> Cookie {
        let addr = canonical(addr);
        let mut msg = [0u8; 18];
        match addr.ip() {
            IpAddr::V4(v4) => msg[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => msg[..16].copy_from_slice(&v6.octets()),
        }
        msg[16..].copy_from_slice(&addr.port().to_be_bytes());
        let tag = ring::hmac::sign(key, &msg);
        let mut c = [0u8; 16];
        c.copy_from_slice(&tag.as_ref()[..16]);
        c
    }

    /// The cookie for `addr` now.
    pub fn make(&mut self, now: Instant, addr: SocketAddr, rng: &mut impl Rng) -> Cookie {
        self.rotate(now, rng);
        Self::mac(&self.current, addr)
    }

    /// Whether `cookie` is the one `addr` was given lately.
    pub fn check(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        cookie: &Cookie,
        rng: &mut impl Rng,
    ) -> bool {
        if cookie == &[0; 16] {
            return false;
        }
        self.rotate(now, rng);
        let eq = |k| bool::from(Self::mac(k, addr).ct_eq(cookie));
        eq(&self.current) | eq(&self.previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_cookie_is_bound_to_its_address_and_lives_two_secrets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut c = Cookies::new(&mut rng);
        let t = Instant::now();
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        let cookie = c.make(t, a, &mut rng);
        assert!(c.check(t, a, &cookie, &mut rng));
        assert!(!c.check(t, b, &cookie, &mut rng), "another port");
        assert!(!c.check(t, a, &[0; 16], &mut rng));
        let later = t + COOKIE_SECRET_LIFE;
        assert!(c.check(later, a, &cookie, &mut rng), "previous secret");
        let much_later = later + COOKIE_SECRET_LIFE;
        assert!(!c.check(much_later, a, &cookie, &mut rng), "two secrets on");
    }

    #[test]
    fn buckets_are_per_source_and_bounded() {
        let t = Instant::now();
        let mut b = SourceBuckets::new(1.0, 2.0, 3);
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let a2: SocketAddr = "192.0.2.1:2".parse().unwrap();
        assert!(b.take(t, a));
        assert!(b.take(t, a2), "same source, other port: same bucket");
        assert!(!b.take(t, a));
        assert!(b.take(t + Duration::from_secs(1), a), "refilled");
        let v6a: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let v6b: SocketAddr = "[2001:db8::ffff:1]:1".parse().unwrap();
        assert!(b.take(t, v6a) && b.take(t, v6b));
        assert!(!b.take(t, v6a), "one /64");
        for i in 0..100u8 {
            b.take(t, SocketAddr::from(([198, 51, 100, i], 1)));
        }
        assert!(b.len() <= 3);
    }

    #[test]
    fn a_site_shares_one_bucket_and_is_told_when_to_come_back() {
        let t = Instant::now();
        let mut b = SourceBuckets::new(0.5, 1.0, 10).by_site();
        let one: SocketAddr = "[2001:db8:1:1::1]:1".parse().unwrap();
        let other_64: SocketAddr = "[2001:db8:1:ffff::1]:1".parse().unwrap();
        let other_48: SocketAddr = "[2001:db8:2::1]:1".parse().unwrap();
        assert!(b.take(t, one));
        assert!(!b.take(t, other_64), "another /64 of the same /48");
        assert!(b.take(t, other_48));
        assert_eq!(b.wait(one), Duration::from_secs(2));
        assert!(!b.take(t + Duration::from_secs(1), one));
        assert_eq!(b.wait(one), Duration::from_secs(1));
        assert!(b.take(t + Duration::from_secs(2), one));
    }
}
