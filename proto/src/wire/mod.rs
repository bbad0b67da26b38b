//! The bytes on the wire.
//!
//! Every UDP datagram is one [`Packet`]: a version byte, a type byte, then
//! the type's fields. Handshake packets carry `snow` messages; a
//! [`Packet::Data`] carries an encrypted inner message, one of
//! [`ClientToServer`], [`ServerToClient`] or [`PeerToPeer`] depending on
//! who talks to whom. Each inner message starts with its own type byte; an
//! unknown type decodes to an error the caller counts and drops, so a newer
//! peer never crashes an older one.
//!
//! Type codes 0x10 to 0x1f of [`PeerToPeer`] belong to file transfer:
//! 0x10 [`PeerToPeer::Flow`] carries a [`FlowFrame`], 0x11 acknowledges,
//! 0x12 [`PeerToPeer::Frames`] carries several.

mod client;
mod peer;
mod server;
#[cfg(test)]
mod tests;

pub use client::ClientToServer;
pub use peer::*;
pub use server::{PunchInstruction, ServerToClient, UserEntry};

use crate::codec::{DecodeError, Reader, Writer};
use std::net::SocketAddr;

/// Which Noise pattern a handshake runs (its code is a byte of
/// [`Packet::HandshakeInit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    IK,
    XX,
}

impl Pattern {
    pub fn code(self) -> u8 {
        match self {
            Pattern::IK => 0,
            Pattern::XX => 1,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Pattern::IK),
            1 => Some(Pattern::XX),
            _ => None,
        }
    }
}

/// The protocol version this crate speaks; packets with another are
/// dropped, and answered with a [`version_refusal`] so the sender can say
/// which versions met. `tests::layout_is_frozen_per_version` fails when a
/// frame's bytes change and this does not.
/// Version 2: relay, NAT probes, the `hard` and `probe_port` fields.
/// Version 3: data packets larger than [`MAX_PACKET`] (path MTU
/// discovery), and a file's hash taken over its piece hashes.
/// Version 4: chat rides the flow ([`FlowFrame::Chat`], `ChatAck`,
/// `Skipped`; `PeerToPeer::Message` and `Ack` gone), the version
/// refusal, and reset tokens (`SessionUnknown` and the new
/// `ChannelUnknown` carry one; `LoginOk` and the punch instruction give
/// them).
/// Version 5: a peer's handshake payload carries its reset token, and a
/// peer's `SessionUnknown` that token (inside the Noise messages: no
/// frame changed, so the layout test could not see it); `FailReason` 13,
/// `RateLimited`.
/// Version 6: the server validates addresses and sheds load (the
/// hostile-internet work): a handshake initiation carries a `cookie`, and
/// [`Packet::CookieReply`] asks for one; a server session follows a new
/// address only after [`ServerToClient::PathChallenge`] is answered with
/// [`ClientToServer::PathResponse`] from it; an IK initiation's payload
/// ends with a timestamp (replays are refused); each party of a relay
/// channel has its own secret `channel` id (in the punch instruction);
/// `ListUsers` asks for the names after a cursor, and `UserList` says
/// the total in 32 bits; `FlowFrame::Pause` (a receiver's full disk);
/// `Register` carries an invite token, `FailReason` 14 `InviteRequired`.
/// Version 7: [`PeerToPeer::Frames`], several flow frames (chat) in one
/// packet; chat messages of up to 64 KiB, in parts (`FlowFrame::Chat`
/// carries `offset` and `total`); pieces and a file's hash are BLAKE3
/// (no frame changed for that: the layout test cannot see it).
pub const VERSION: u8 = 7;
/// Packet type 0 is reserved in every version for [`version_refusal`].
pub const VERSION_REFUSAL_TYPE: u8 = 0;

/// What answers a datagram of another protocol version: our version and
/// the reserved type 0, two bytes that any version reads as "another
/// version" (its own decoder stops at the first byte). Never answered in
/// turn, and never larger than what it answers.
pub fn version_refusal() -> [u8; 2] {
    [VERSION, VERSION_REFUSAL_TYPE]
}

/// Whether `buf` looks like a datagram of another version of this
/// protocol (a version near ours, a packet type some version has) rather
/// than noise: returns the version it speaks.
pub fn other_version(buf: &[u8]) -> Option<u8> {
    match buf {
        [v, ty, ..]
            if *v != VERSION && (1..=VERSION.saturating_add(16)).contains(v) && *ty < 32 =>
        {
            Some(*v)
        }
        _ => None,
    }
}

/// Whether `buf`, of another version, deserves a [`version_refusal`]: at
/// least two bytes (no amplification), and not a refusal itself (two
/// sides of different versions must not bounce refusals forever).
pub fn refusable(buf: &[u8]) -> bool {
    other_version(buf).is_some() && buf[1] != VERSION_REFUSAL_TYPE
}
/// The largest datagram we send or accept. 1232 bytes is what fits in the
/// IPv6 minimum MTU (1280) after the IPv6 and UDP headers, so it crosses
/// any path without fragmentation.
pub const MAX_PACKET: usize = 1232;
/// The largest datagram a session's data packet may be: what loopback
/// carries (IPv6 on a 65,536-byte MTU, less the IPv6 and UDP headers).
/// Sessions send [`MAX_PACKET`] until a larger size has been proven on the
/// path (`flow::pmtud`); only data packets may exceed [`MAX_PACKET`].
pub const MAX_DATAGRAM: usize = 65_488;
/// A handshake initiation is padded to at least this size, so that the
/// responder's reply is never larger than the request (no amplification).
pub const MIN_INIT_LEN: usize = 256;
/// version, type, channel: what [`Packet::Relay`] adds around a peer
/// packet.
pub const RELAY_HEADER_LEN: usize = 1 + 1 + 8;
/// The largest datagram that may carry a relayed peer packet.
pub const MAX_RELAYED: usize = MAX_PACKET + RELAY_HEADER_LEN;
/// Over TCP (for networks that drop UDP) each datagram is one frame
/// behind a big-endian length of this many bytes; a frame longer than
/// [`MAX_RELAYED`] ends the connection.
pub const TCP_LENGTH_BYTES: usize = 2;
/// A [`Packet::Probe`] is padded to this many bytes.
pub const PROBE_LEN: usize = 48;
/// version, type, receiver index, counter.
pub const DATA_HEADER_LEN: usize = 1 + 1 + 4 + 8;
/// Room for the inner message of a data packet: the packet minus its
/// header and the AEAD tag.
pub const MAX_INNER: usize = MAX_PACKET - DATA_HEADER_LEN - 16;
/// The longest chat message body, in bytes (64 KiB): a message longer
/// than a packet holds goes in parts ([`FlowFrame::Chat`]'s `offset`).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest user name, in bytes.
pub const MAX_NAME: usize = 32;
/// Longest invite token, in bytes.
pub const MAX_INVITE: usize = 64;
/// Most local endpoints a client reports.
pub const MAX_ENDPOINTS: usize = 8;
/// Most users in one [`ServerToClient::UserList`] page.
pub const USERS_PER_PAGE: usize = 12;
const MAX_DETAIL: usize = 200;

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    HandshakeInit = 1,
    HandshakeResponse = 2,
    HandshakeFinish = 3,
    Data = 4,
    Punch = 5,
    SessionUnknown = 6,
    Relay = 7,
    Probe = 8,
    ProbeReply = 9,
    ChannelUnknown = 10,
    CookieReply = 11,
}

/// A reset token: proof that a "session unknown" or "channel unknown"
/// comes from the server that made the session or channel, even after it
/// restarted and forgot it (it derives tokens from its long-term key, as
/// QUIC's stateless reset does). The client learns the token inside its
/// encrypted session, so a stranger cannot forge the notice.
pub type ResetToken = [u8; 16];

/// A handshake cookie: a MAC over the initiator's address under a secret
/// the server changes every two minutes (zero: none).
pub type Cookie = [u8; 16];

/// One datagram, borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// First handshake message; padded to [`MIN_INIT_LEN`]. `cookie` is
    /// what the server's last [`Packet::CookieReply`] gave this address,
    /// or zero.
    HandshakeInit {
        sender: u32,
        pattern: Pattern,
        noise: &'a [u8],
        cookie: Cookie,
    },
    /// From a server under load, instead of processing an initiation
    /// without a valid cookie: "send it again with this cookie", which
    /// proves you receive at the address you send from (WireGuard's
    /// cookie reply). No state is kept for it, and it is smaller than the
    /// initiation it answers.
    CookieReply {
        receiver: u32,
        cookie: Cookie,
    },
    /// Second handshake message.
    HandshakeResponse {
        sender: u32,
        receiver: u32,
        noise: &'a [u8],
    },
    /// Third handshake message (XX only).
    HandshakeFinish {
        receiver: u32,
        noise: &'a [u8],
    },
    /// An encrypted inner message for the session at `receiver`.
    Data {
        receiver: u32,
        counter: u64,
        ciphertext: &'a [u8],
    },
    /// A hole-punching probe between peers, naming the introduction it
    /// belongs to. Unencrypted; it only opens NAT mappings, and the
    /// handshake that follows authenticates.
    Punch {
        intro_id: u64,
        reply: bool,
    },
    /// "I have no session with that index": lets the other side start a
    /// new handshake at once instead of waiting for a timeout. From the
    /// server, `token` is the session's [`ResetToken`] (given at login);
    /// from a peer, zero.
    SessionUnknown {
        receiver: u32,
        token: ResetToken,
    },
    /// From the server: "I have no relay channel `channel`" (it restarted,
    /// or the channel expired), answering a relayed packet. `token` is the
    /// channel's [`ResetToken`], given in the punch instruction.
    ChannelUnknown {
        channel: u64,
        token: ResetToken,
    },
    /// A peer packet through the rendezvous server's relay, on the
    /// channel of an introduction both peers agreed to: from a client, "pass
    /// this to the other side"; from the server, "the other side sent
    /// this". The server cannot read `payload`: it is a peer packet,
    /// encrypted end to end (or a handshake message).
    Relay {
        channel: u64,
        payload: &'a [u8],
    },
    /// "From where do you see this?": answered by the server on both its
    /// ports with a [`Packet::ProbeReply`]. Two answers that differ in
    /// port mean our NAT maps each destination anew (endpoint-dependent
    /// mapping). Padded to [`PROBE_LEN`] so the answer is never larger.
    Probe {
        nonce: u64,
    },
    ProbeReply {
        nonce: u64,
        observed: SocketAddr,
    },
}

impl<'a> Packet<'a> {
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let max = match buf.get(1) {
            Some(t) if *t == PacketType::Relay as u8 => MAX_RELAYED,
            Some(t) if *t == PacketType::Data as u8 => MAX_DATAGRAM,
            _ => MAX_PACKET,
        };
        if buf.len() > max {
            return Err(DecodeError::Oversized {
                len: buf.len(),
                max,
            });
        }
        let mut r = Reader::new(buf);
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let ty = r.u8()?;
        let p = match ty {
            1 => {
                if buf.len() < MIN_INIT_LEN {
                    return Err(DecodeError::Invalid("unpadded handshake init"));
                }
                let sender = r.u32()?;
                let pattern = Pattern::from_code(r.u8()?).ok_or(DecodeError::Invalid("pattern"))?;
                let noise = r.bytes16(MAX_PACKET)?;
                let cookie = r.array()?;
                // The rest is padding.
                Packet::HandshakeInit {
                    sender,
                    pattern,
                    noise,
                    cookie,
                }
            }
            2 => Packet::HandshakeResponse {
                sender: r.u32()?,
                receiver: r.u32()?,
                noise: r.rest(),
            },
            3 => Packet::HandshakeFinish {
                receiver: r.u32()?,
                noise: r.rest(),
            },
            4 => {
                let receiver = r.u32()?;
                let counter = r.u64()?;
                let ciphertext = r.rest();
                if ciphertext.len() < 16 {
                    return Err(DecodeError::Truncated {
                        needed: 16 - ciphertext.len(),
                    });
                }
                Packet::Data {
                    receiver,
                    counter,
                    ciphertext,
                }
            }
            5 => {
                let p = Packet::Punch {
                    intro_id: r.u64()?,
                    reply: r.bool()?,
                };
                r.finish()?;
                p
            }
            6 => {
                let p = Packet::SessionUnknown {
                    receiver: r.u32()?,
                    token: r.array()?,
                };
                r.finish()?;
                p
            }
            11 => {
                let p = Packet::CookieReply {
                    receiver: r.u32()?,
                    cookie: r.array()?,
                };
                r.finish()?;
                p
            }
            10 => {
                let p = Packet::ChannelUnknown {
                    channel: r.u64()?,
                    token: r.array()?,
                };
                r.finish()?;
                p
            }
            8 => {
                if buf.len() < PROBE_LEN {
                    return Err(DecodeError::Invalid("unpadded probe"));
                }
                // The rest is padding.
                Packet::Probe { nonce: r.u64()? }
            }
            9 => {
                let p = Packet::ProbeReply {
                    nonce: r.u64()?,
                    observed: r.socket_addr()?,
                };
                r.finish()?;
                p
            }
            7 => {
                let channel = r.u64()?;
                let payload = r.rest();
                if payload.is_empty() {
                    return Err(DecodeError::Truncated { needed: 1 });
                }
                Packet::Relay { channel, payload }
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        Ok(p)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        w.u8(VERSION);
        match self {
            Packet::HandshakeInit {
                sender,
                pattern,
                noise,
                cookie,
            } => {
                w.u8(PacketType::HandshakeInit as u8)
                    .u32(*sender)
                    .u8(pattern.code())
                    .bytes16(noise)
                    .bytes(cookie);
                if w.buf.len() < MIN_INIT_LEN {
                    w.buf.resize(MIN_INIT_LEN, 0);
                }
            }
            Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            } => {
                w.u8(PacketType::HandshakeResponse as u8)
                    .u32(*sender)
                    .u32(*receiver)
                    .bytes(noise);
            }
            Packet::HandshakeFinish { receiver, noise } => {
                w.u8(PacketType::HandshakeFinish as u8)
                    .u32(*receiver)
                    .bytes(noise);
            }
            Packet::Data {
                receiver,
                counter,
                ciphertext,
            } => {
                w.u8(PacketType::Data as u8)
                    .u32(*receiver)
                    .u64(*counter)
                    .bytes(ciphertext);
            }
            Packet::Punch { intro_id, reply } => {
                w.u8(PacketType::Punch as u8).u64(*intro_id).bool(*reply);
            }
            Packet::SessionUnknown { receiver, token } => {
                w.u8(PacketType::SessionUnknown as u8)
                    .u32(*receiver)
                    .bytes(token);
            }
            Packet::CookieReply { receiver, cookie } => {
                w.u8(PacketType::CookieReply as u8)
                    .u32(*receiver)
                    .bytes(cookie);
            }
            Packet::ChannelUnknown { channel, token } => {
                w.u8(PacketType::ChannelUnknown as u8)
                    .u64(*channel)
                    .bytes(token);
            }
            Packet::Relay { channel, payload } => {
                w.u8(PacketType::Relay as u8).u64(*channel).bytes(payload);
            }
            Packet::Probe { nonce } => {
                w.u8(PacketType::Probe as u8).u64(*nonce);
                w.buf.resize(PROBE_LEN, 0);
            }
            Packet::ProbeReply { nonce, observed } => {
                w.u8(PacketType::ProbeReply as u8)
                    .u64(*nonce)
                    .socket_addr(observed);
            }
        }
        w.into_inner()
    }
}

/// Why the server refused a request, or why an introduction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    NameTaken,
    NameInvalid,
    KeyAlreadyRegistered,
    NotRegistered,
    UnknownUser,
    Offline,
    Declined,
    TimedOut,
    NotLoggedIn,
    SelfConnect,
    NoSuchIntro,
    ServerError,
    /// Too many of these from one address lately (registrations): try
    /// again later.
    RateLimited,
    /// This server registers only with an invite token, and none or
    /// another was given.
    InviteRequired,
    /// A code this version does not know.
    Other(u8),
}

impl FailReason {
    pub fn code(self) -> u8 {
        match self {
            FailReason::NameTaken => 1,
            FailReason::NameInvalid => 2,
            FailReason::KeyAlreadyRegistered => 3,
            FailReason::NotRegistered => 4,
            FailReason::UnknownUser => 5,
            FailReason::Offline => 6,
            FailReason::Declined => 7,
            FailReason::TimedOut => 8,
            FailReason::NotLoggedIn => 9,
            FailReason::SelfConnect => 10,
            FailReason::NoSuchIntro => 11,
            FailReason::ServerError => 12,
            FailReason::RateLimited => 13,
            FailReason::InviteRequired => 14,
            FailReason::Other(c) => c,
        }
    }

    pub fn from_code(c: u8) -> Self {
        match c {
            1 => FailReason::NameTaken,
            2 => FailReason::NameInvalid,
            3 => FailReason::KeyAlreadyRegistered,
            4 => FailReason::NotRegistered,
            5 => FailReason::UnknownUser,
            6 => FailReason::Offline,
            7 => FailReason::Declined,
            8 => FailReason::TimedOut,
            9 => FailReason::NotLoggedIn,
            10 => FailReason::SelfConnect,
            11 => FailReason::NoSuchIntro,
            12 => FailReason::ServerError,
            13 => FailReason::RateLimited,
            14 => FailReason::InviteRequired,
            c => FailReason::Other(c),
        }
    }

    /// A stable snake_case name, used as the error code in the control API.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::NameTaken => "name_taken",
            FailReason::NameInvalid => "name_invalid",
            FailReason::KeyAlreadyRegistered => "key_already_registered",
            FailReason::NotRegistered => "not_registered",
            FailReason::UnknownUser => "unknown_user",
            FailReason::Offline => "offline",
            FailReason::Declined => "declined",
            FailReason::TimedOut => "timed_out",
            FailReason::NotLoggedIn => "not_logged_in",
            FailReason::SelfConnect => "self_connect",
            FailReason::NoSuchIntro => "no_such_request",
            FailReason::ServerError => "server_error",
            FailReason::RateLimited => "rate_limited",
            FailReason::InviteRequired => "invite_required",
            FailReason::Other(_) => "failed",
        }
    }
}

/// Checks a user name: 1 to [`MAX_NAME`] bytes of lowercase ASCII
/// letters, digits, `-`, `_` and `.`, starting with a letter or digit.
/// Lowercase only, so that `Alice` cannot pass for `alice` in a list.
pub fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err("a name is 1 to 32 characters long");
    }
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
    }) {
        return Err("a name may contain only lowercase ASCII letters, digits, '-', '_' and '.'");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("a name starts with a letter or digit");
    }
    Ok(())
}

pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
