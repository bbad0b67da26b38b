//! Noise handshakes (from `snow`) and the transport for data packets.
//!
//! Handshakes: `Noise_IK_25519_AESGCM_SHA256` when the initiator knows the
//! responder's static key in advance (a peer after an introduction, a
//! server whose key is pinned); `Noise_XX_25519_AESGCM_SHA256` otherwise
//! (first contact with a server, trust on first use).
//!
//! Data packets carry an explicit 64-bit counter used as the AEAD nonce
//! (snow's stateless transport). The receiver checks the counter against a
//! sliding [`ReplayWindow`] before decrypting and marks it seen only after
//! the tag verified; the plaintext of a packet whose tag failed is never
//! returned.

use crate::codec::Writer;
pub use crate::wire::Pattern;
use crate::wire::{self, PacketType};
use std::time::{Duration, Instant};

const PROLOGUE: &[u8] = b"p2p-chat/1";

/// Start a new handshake once a key has sent this many packets. The issue
/// sets "well before 2^23"; 2^20 leaves a wide margin.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 20;
/// Never send or accept more packets than this on one key.
pub const REJECT_AFTER_MESSAGES: u64 = 1 << 23;
/// WireGuard's REKEY_AFTER_TIME: the initiator of the current keys starts a
/// new handshake once they are this old.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// WireGuard's REJECT_AFTER_TIME: keys this old are never used again.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("packet failed authentication")]
    Decrypt,
    #[error("packet counter {0} was seen before or is too old")]
    Replay(u64),
    #[error("key used for too many packets")]
    Exhausted,
}

impl From<snow::Error> for CryptoError {
    fn from(e: snow::Error) -> Self {
        match e {
            snow::Error::Decrypt => CryptoError::Decrypt,
            other => CryptoError::Handshake(other.to_string()),
        }
    }
}

fn params(p: Pattern) -> snow::params::NoiseParams {
    let name = match p {
        Pattern::IK => "Noise_IK_25519_AESGCM_SHA256",
        Pattern::XX => "Noise_XX_25519_AESGCM_SHA256",
    };
    // The strings are constants known to parse.
    name.parse().expect("valid noise params")
}

/// One side of a Noise handshake in progress.
pub struct Handshake {
    hs: snow::HandshakeState,
    pub pattern: Pattern,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("pattern", &self.pattern)
            .field("initiator", &self.hs.is_initiator())
            .finish()
    }
}

impl Handshake {
    /// An initiator. IK needs `remote_static`; XX ignores it.
    pub fn initiator(
        pattern: Pattern,
        local_private: &[u8; 32],
        remote_static: Option<&[u8; 32]>,
    ) -> Result<Self, CryptoError> {
        let mut b = snow::Builder::new(params(pattern))
            .local_private_key(local_private)?
            .prologue(PROLOGUE)?;
        if pattern == Pattern::IK {
            let rs = remote_static
                .ok_or_else(|| CryptoError::Handshake("IK needs the responder's key".into()))?;
            b = b.remote_public_key(rs)?;
        }
        Ok(Self {
            hs: b.build_initiator()?,
            pattern,
        })
    }

    pub fn responder(pattern: Pattern, local_private: &[u8; 32]) -> Result<Self, CryptoError> {
        let hs = snow::Builder::new(params(pattern))
            .local_private_key(local_private)?
            .prologue(PROLOGUE)?
            .build_responder()?;
        Ok(Self { hs, pattern })
    }

    /// Writes the next handshake message carrying `payload`.
    pub fn write(&mut self, payload: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut buf = vec![0u8; payload.len() + 256];
        let n = self.hs.write_message(payload, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads the next handshake message and returns its payload.
    pub fn read(&mut self, msg: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut buf = vec![0u8; msg.len()];
        let n = self.hs.read_message(msg, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn is_finished(&self) -> bool {
        self.hs.is_handshake_finished()
    }

    pub fn remote_static(&self) -> Option<[u8; 32]> {
        self.hs.get_remote_static().and_then(|k| k.try_into().ok())
    }

    pub fn into_transport(
        self,
        local_index: u32,
        remote_index: u32,
        now: Instant,
    ) -> Result<Transport, CryptoError> {
        let initiator = self.hs.is_initiator();
        let state = self.hs.into_stateless_transport_mode()?;
        Ok(Transport {
            state,
            next_send: 0,
            replay: ReplayWindow::default(),
            local_index,
            remote_index,
            created: now,
            initiator,
        })
    }
}

/// The keys of one finished handshake, with their send counter and replay
/// window.
pub struct Transport {
    state: snow::StatelessTransportState,
    next_send: u64,
    replay: ReplayWindow,
    pub local_index: u32,
    pub remote_index: u32,
    pub created: Instant,
    pub initiator: bool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("sent", &self.next_send)
            .finish()
    }
}

impl Transport {
    /// Encrypts `plaintext` into a whole data packet for the remote index.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if self.next_send >= REJECT_AFTER_MESSAGES {
            return Err(CryptoError::Exhausted);
        }
        let counter = self.next_send;
        self.next_send += 1;
        let mut w = Writer::with_capacity(wire::DATA_HEADER_LEN + plaintext.len() + 16);
        w.u8(wire::VERSION)
            .u8(PacketType::Data as u8)
            .u32(self.remote_index)
            .u64(counter);
        let start = w.buf.len();
        w.buf.resize(start + plaintext.len() + 16, 0);
        let n = self
            .state
            .write_message(counter, plaintext, &mut w.buf[start..])?;
        w.buf.truncate(start + n);
        Ok(w.buf)
    }

    /// Checks the counter, then authenticates and decrypts.
    pub fn open(&mut self, counter: u64, ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if counter >= REJECT_AFTER_MESSAGES || !self.replay.check(counter) {
            return Err(CryptoError::Replay(counter));
        }
        let mut out = vec![0u8; ciphertext.len()];
        let n = self
            .state
            .read_message(counter, ciphertext, &mut out)
            .map_err(|_| CryptoError::Decrypt)?;
        out.truncate(n);
        self.replay.mark(counter);
        Ok(out)
    }

    pub fn sent(&self) -> u64 {
        self.next_send
    }

    /// True once these keys should be replaced by a new handshake.
    pub fn wants_rekey(&self, now: Instant) -> bool {
        self.next_send >= REKEY_AFTER_MESSAGES
            || (self.initiator && now.saturating_duration_since(self.created) >= REKEY_AFTER_TIME)
    }

    /// True once these keys must not be used at all.
    pub fn expired(&self, now: Instant) -> bool {
        self.next_send >= REJECT_AFTER_MESSAGES
            || now.saturating_duration_since(self.created) >= REJECT_AFTER_TIME
    }
}

const WINDOW_WORDS: usize = 32;
/// How far behind the highest counter a packet may arrive: one word short
/// of the bitmap, as in RFC 6479, so a word can be cleared while advancing.
pub const REPLAY_WINDOW: u64 = ((WINDOW_WORDS - 1) * 64) as u64;

/// A sliding-window bitmap of seen counters (RFC 6479).
#[derive(Clone)]
pub struct ReplayWindow {
    /// One more than the highest counter marked.
    next: u64,
    bits: [u64; WINDOW_WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            next: 0,
            bits: [0; WINDOW_WORDS],
        }
    }
}

impl ReplayWindow {
    fn slot(c: u64) -> (usize, u64) {
        (((c / 64) % WINDOW_WORDS as u64) as usize, 1u64 << (c % 64))
    }

    /// Would `c` be accepted? Does not change the window.
    pub fn check(&self, c: u64) -> bool {
        if c >= self.next {
            return true;
        }
        if self.next - c > REPLAY_WINDOW {
            return false;
        }
        let (w, b) = Self::slot(c);
        self.bits[w] & b == 0
    }

    /// Records `c` as seen (after its packet authenticated).
    pub fn mark(&mut self, c: u64) {
        if c >= self.next {
            let new_word = c / 64;
            if self.next > 0 {
                let cur_word = (self.next - 1) / 64;
                let diff = new_word.saturating_sub(cur_word).min(WINDOW_WORDS as u64);
                for i in 1..=diff {
                    self.bits[((cur_word + i) % WINDOW_WORDS as u64) as usize] = 0;
                }
            }
            self.next = c + 1;
        }
        let (w, b) = Self::slot(c);
        self.bits[w] |= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{generate_static_keypair, public_from_private};
    use crate::wire::Packet;

    fn pair(pattern: Pattern) -> (Transport, Transport) {
        let a = generate_static_keypair();
        let b = generate_static_keypair();
        let b_pub = public_from_private(&b);
        let mut i = Handshake::initiator(pattern, &a, Some(&b_pub)).unwrap();
        let mut r = Handshake::responder(pattern, &b).unwrap();
        let m1 = i.write(b"one").unwrap();
        assert_eq!(r.read(&m1).unwrap(), b"one");
        let m2 = r.write(b"two").unwrap();
        assert_eq!(i.read(&m2).unwrap(), b"two");
        if pattern == Pattern::XX {
            let m3 = i.write(b"three").unwrap();
            assert_eq!(r.read(&m3).unwrap(), b"three");
        }
        assert!(i.is_finished() && r.is_finished());
        assert_eq!(r.remote_static(), Some(public_from_private(&a)));
        assert_eq!(i.remote_static(), Some(b_pub));
        let now = Instant::now();
        (
            i.into_transport(1, 2, now).unwrap(),
            r.into_transport(2, 1, now).unwrap(),
        )
    }

    fn open_packet(t: &mut Transport, pkt: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match Packet::decode(pkt).unwrap() {
            Packet::Data {
                receiver,
                counter,
                ciphertext,
            } => {
                assert_eq!(receiver, t.local_index);
                t.open(counter, ciphertext)
            }
            other => panic!("not data: {other:?}"),
        }
    }

    #[test]
    fn ik_and_xx_carry_data_both_ways() {
        for p in [Pattern::IK, Pattern::XX] {
            let (mut a, mut b) = pair(p);
            let pkt = a.seal(b"hello").unwrap();
            assert_eq!(open_packet(&mut b, &pkt).unwrap(), b"hello");
            let pkt = b.seal(b"back").unwrap();
            assert_eq!(open_packet(&mut a, &pkt).unwrap(), b"back");
        }
    }

    #[test]
    fn ik_with_wrong_responder_key_fails() {
        let a = generate_static_keypair();
        let b = generate_static_keypair();
        let wrong = public_from_private(&generate_static_keypair());
        let mut i = Handshake::initiator(Pattern::IK, &a, Some(&wrong)).unwrap();
        let mut r = Handshake::responder(Pattern::IK, &b).unwrap();
        let m1 = i.write(b"").unwrap();
        assert!(r.read(&m1).is_err());
    }

    #[test]
    fn replayed_and_tampered_packets_are_refused() {
        let (mut a, mut b) = pair(Pattern::IK);
        let p0 = a.seal(b"zero").unwrap();
        let p1 = a.seal(b"one").unwrap();
        // Reordered delivery is fine, a replay is not.
        assert_eq!(open_packet(&mut b, &p1).unwrap(), b"one");
        assert_eq!(open_packet(&mut b, &p0).unwrap(), b"zero");
        assert_eq!(open_packet(&mut b, &p1), Err(CryptoError::Replay(1)));

        // A tampered packet fails and does not burn its counter.
        let p2 = a.seal(b"two").unwrap();
        let mut bad = p2.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(open_packet(&mut b, &bad), Err(CryptoError::Decrypt));
        assert_eq!(open_packet(&mut b, &p2).unwrap(), b"two");

        // A forged counter is caught by the tag, too.
        let mut moved = a.seal(b"three").unwrap();
        moved[wire::DATA_HEADER_LEN - 1] ^= 0x40;
        assert_eq!(open_packet(&mut b, &moved), Err(CryptoError::Decrypt));
    }

    #[test]
    fn replay_window_slides() {
        let mut w = ReplayWindow::default();
        assert!(w.check(0));
        w.mark(0);
        assert!(!w.check(0));
        w.mark(5000);
        assert!(!w.check(5000));
        assert!(w.check(4999));
        assert!(!w.check(5000 - REPLAY_WINDOW - 1));
        assert!(w.check(5000 - REPLAY_WINDOW + 1));
        // Bits from before the jump were cleared, not inherited.
        assert!(w.check(5000 - 64));
        for c in 5001..5300 {
            assert!(w.check(c));
            w.mark(c);
        }
        for c in 5001..5300 {
            assert!(!w.check(c));
        }
    }

    #[test]
    fn replay_window_matches_a_set_under_random_input() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut top = 0u64;
        for _ in 0..20_000 {
            let c = (top + rng.gen_range(0..200)).saturating_sub(rng.gen_range(0..2300));
            let fresh = !seen.contains(&c);
            let expect = fresh && (c + 1 > top || top - c <= REPLAY_WINDOW);
            assert_eq!(w.check(c), expect, "counter {c}, top {top}");
            if expect {
                w.mark(c);
                seen.insert(c);
                top = top.max(c + 1);
            }
        }
    }

    #[test]
    fn rekey_and_expiry_follow_the_clock() {
        let (a, b) = pair(Pattern::IK);
        let t0 = a.created;
        assert!(!a.wants_rekey(t0));
        assert!(a.wants_rekey(t0 + REKEY_AFTER_TIME));
        // Only the initiator rekeys on time, so both don't at once.
        assert!(!b.wants_rekey(t0 + REKEY_AFTER_TIME));
        assert!(!a.expired(t0 + REKEY_AFTER_TIME));
        assert!(b.expired(t0 + REJECT_AFTER_TIME));
    }
}
