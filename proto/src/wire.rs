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
//! 0x10 [`PeerToPeer::Flow`] carries a [`FlowFrame`], 0x11 acknowledges.

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::PublicIdentity;
use crate::noise::Pattern;
use std::net::SocketAddr;

/// The protocol version this crate speaks; packets with another are
/// dropped, and answered with a [`version_refusal`] so the sender can say
/// which versions met. `tests::layout_is_frozen_per_version` fails when a
/// frame's bytes change and this does not.
/// Version 2: relay, NAT probes, the `hard` and `probe_port` fields.
/// Version 3: data packets larger than [`MAX_PACKET`] (path MTU
/// discovery), and a file's hash taken over its piece hashes.
/// Version 4: chat rides the flow ([`FlowFrame::Chat`], `ChatAck`,
/// `Skipped`; `PeerToPeer::Message` and `Ack` gone), and the version
/// refusal.
pub const VERSION: u8 = 4;
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
/// The longest chat message body, in bytes: what fits in one base-size
/// packet with the [`FlowFrame::Chat`] and flow headers.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest user name, in bytes.
pub const MAX_NAME: usize = 32;
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
}

/// One datagram, borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// First handshake message; padded to [`MIN_INIT_LEN`].
    HandshakeInit {
        sender: u32,
        pattern: Pattern,
        noise: &'a [u8],
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
    /// new handshake at once instead of waiting for a timeout.
    SessionUnknown {
        receiver: u32,
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
                // The rest is padding.
                Packet::HandshakeInit {
                    sender,
                    pattern,
                    noise,
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
                let p = Packet::SessionUnknown { receiver: r.u32()? };
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
            } => {
                w.u8(PacketType::HandshakeInit as u8)
                    .u32(*sender)
                    .u8(pattern.code())
                    .bytes16(noise);
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
            Packet::SessionUnknown { receiver } => {
                w.u8(PacketType::SessionUnknown as u8).u32(*receiver);
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

/// A user in the active list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub sign_key: [u8; 32],
}

/// Requests from a client to the rendezvous server. `rid` is chosen by the
/// client and echoed in the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToServer {
    Register {
        rid: u32,
        name: String,
    },
    /// Answers the challenge from the handshake: an ed25519 signature over
    /// `LOGIN_CONTEXT || challenge || server Noise key`.
    Login {
        rid: u32,
        signature: [u8; 64],
    },
    ListUsers {
        rid: u32,
        offset: u16,
    },
    /// `hard`: the sender's NAT maps each destination to a new port
    /// (endpoint-dependent mapping, found with [`Packet::Probe`]); the
    /// peer is told, to try port prediction.
    RequestConnect {
        rid: u32,
        name: String,
        locals: Vec<SocketAddr>,
        hard: bool,
    },
    AgreeConnect {
        rid: u32,
        intro_id: u64,
        accept: bool,
        locals: Vec<SocketAddr>,
        hard: bool,
    },
    /// Also the heartbeat that keeps presence and the NAT mapping alive.
    Ping {
        rid: u32,
    },
    Logout,
    /// Acknowledges a [`ServerToClient::Push`].
    PushAck {
        push_id: u32,
    },
}

impl ClientToServer {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        match self {
            ClientToServer::Register { rid, name } => {
                w.u8(1).u32(*rid).string(name);
            }
            ClientToServer::Login { rid, signature } => {
                w.u8(2).u32(*rid).bytes(signature);
            }
            ClientToServer::ListUsers { rid, offset } => {
                w.u8(3).u32(*rid).u16(*offset);
            }
            ClientToServer::RequestConnect {
                rid,
                name,
                locals,
                hard,
            } => {
                w.u8(4).u32(*rid).string(name);
                w.list(locals, |w, a| {
                    w.socket_addr(a);
                });
                w.bool(*hard);
            }
            ClientToServer::AgreeConnect {
                rid,
                intro_id,
                accept,
                locals,
                hard,
            } => {
                w.u8(5).u32(*rid).u64(*intro_id).bool(*accept);
                w.list(locals, |w, a| {
                    w.socket_addr(a);
                });
                w.bool(*hard);
            }
            ClientToServer::Ping { rid } => {
                w.u8(6).u32(*rid);
            }
            ClientToServer::Logout => {
                w.u8(7);
            }
            ClientToServer::PushAck { push_id } => {
                w.u8(8).u32(*push_id);
            }
        }
        w.into_inner()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let m = match r.u8()? {
            1 => ClientToServer::Register {
                rid: r.u32()?,
                name: r.string(MAX_NAME)?,
            },
            2 => ClientToServer::Login {
                rid: r.u32()?,
                signature: r.array()?,
            },
            3 => ClientToServer::ListUsers {
                rid: r.u32()?,
                offset: r.u16()?,
            },
            4 => ClientToServer::RequestConnect {
                rid: r.u32()?,
                name: r.string(MAX_NAME)?,
                locals: r.list(MAX_ENDPOINTS, Reader::socket_addr)?,
                hard: r.bool()?,
            },
            5 => ClientToServer::AgreeConnect {
                rid: r.u32()?,
                intro_id: r.u64()?,
                accept: r.bool()?,
                locals: r.list(MAX_ENDPOINTS, Reader::socket_addr)?,
                hard: r.bool()?,
            },
            6 => ClientToServer::Ping { rid: r.u32()? },
            7 => ClientToServer::Logout,
            8 => ClientToServer::PushAck { push_id: r.u32()? },
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(m)
    }
}

/// Where to punch, and whom: sent to both sides once the target agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchInstruction {
    pub intro_id: u64,
    pub name: String,
    pub identity: PublicIdentity,
    /// The peer's address as the server saw it (its NAT's public side).
    pub public: SocketAddr,
    /// The addresses the peer found on its own interfaces.
    pub locals: Vec<SocketAddr>,
    /// True for the side that sends the handshake initiation.
    pub initiator: bool,
    /// The server relays this introduction's packets ([`Packet::Relay`]
    /// with `intro_id` as the channel) if no direct path is found.
    pub relay: bool,
    /// The peer's NAT has endpoint-dependent mapping (see
    /// [`ClientToServer::RequestConnect`]).
    pub peer_hard: bool,
}

/// Answers and notices from the rendezvous server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerToClient {
    RegisterOk {
        rid: u32,
        name: String,
    },
    LoginOk {
        rid: u32,
        name: String,
        observed: SocketAddr,
        /// The server's second UDP port, which answers [`Packet::Probe`]
        /// so a client can tell how its NAT maps (0: none).
        probe_port: u16,
    },
    /// A request failed.
    Failed {
        rid: u32,
        reason: FailReason,
        detail: String,
    },
    UserList {
        rid: u32,
        total: u16,
        offset: u16,
        users: Vec<UserEntry>,
    },
    /// Someone asks to connect to you; answer with `AgreeConnect`.
    ConnectRequested {
        intro_id: u64,
        name: String,
        identity: PublicIdentity,
    },
    /// Your request was forwarded; the outcome follows as a
    /// `Punch` or a `ConnectFailed` with the same `intro_id`.
    ConnectPending {
        rid: u32,
        intro_id: u64,
        name: String,
    },
    ConnectFailed {
        intro_id: u64,
        name: String,
        reason: FailReason,
    },
    Punch(PunchInstruction),
    /// Answers a `Ping` (UDP ping): your address as the server sees it.
    Pong {
        rid: u32,
        observed: SocketAddr,
    },
    /// A request without its own answer succeeded.
    Ok {
        rid: u32,
    },
    /// A notice the server sends unasked (`ConnectRequested`,
    /// `ConnectFailed`, `Punch`), resent until the client answers with
    /// `PushAck`; the client ignores a `push_id` it has seen.
    Push {
        push_id: u32,
        msg: Box<ServerToClient>,
    },
}

impl ServerToClient {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128);
        match self {
            ServerToClient::RegisterOk { rid, name } => {
                w.u8(1).u32(*rid).string(name);
            }
            ServerToClient::LoginOk {
                rid,
                name,
                observed,
                probe_port,
            } => {
                w.u8(2)
                    .u32(*rid)
                    .string(name)
                    .socket_addr(observed)
                    .u16(*probe_port);
            }
            ServerToClient::Failed {
                rid,
                reason,
                detail,
            } => {
                let detail = truncate_utf8(detail, MAX_DETAIL);
                w.u8(3).u32(*rid).u8(reason.code()).string(detail);
            }
            ServerToClient::UserList {
                rid,
                total,
                offset,
                users,
            } => {
                w.u8(4).u32(*rid).u16(*total).u16(*offset);
                w.list(users, |w, u| {
                    w.string(&u.name).bytes(&u.sign_key);
                });
            }
            ServerToClient::ConnectRequested {
                intro_id,
                name,
                identity,
            } => {
                w.u8(5).u64(*intro_id).string(name);
                identity.encode(&mut w);
            }
            ServerToClient::ConnectPending {
                rid,
                intro_id,
                name,
            } => {
                w.u8(6).u32(*rid).u64(*intro_id).string(name);
            }
            ServerToClient::ConnectFailed {
                intro_id,
                name,
                reason,
            } => {
                w.u8(7).u64(*intro_id).string(name).u8(reason.code());
            }
            ServerToClient::Punch(p) => {
                w.u8(8).u64(p.intro_id).string(&p.name);
                p.identity.encode(&mut w);
                w.socket_addr(&p.public);
                w.list(&p.locals, |w, a| {
                    w.socket_addr(a);
                });
                w.bool(p.initiator).bool(p.relay).bool(p.peer_hard);
            }
            ServerToClient::Pong { rid, observed } => {
                w.u8(9).u32(*rid).socket_addr(observed);
            }
            ServerToClient::Ok { rid } => {
                w.u8(10).u32(*rid);
            }
            ServerToClient::Push { push_id, msg } => {
                w.u8(11).u32(*push_id).bytes(&msg.encode());
            }
        }
        w.into_inner()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let m = match r.u8()? {
            1 => ServerToClient::RegisterOk {
                rid: r.u32()?,
                name: r.string(MAX_NAME)?,
            },
            2 => ServerToClient::LoginOk {
                rid: r.u32()?,
                name: r.string(MAX_NAME)?,
                observed: r.socket_addr()?,
                probe_port: r.u16()?,
            },
            3 => ServerToClient::Failed {
                rid: r.u32()?,
                reason: FailReason::from_code(r.u8()?),
                detail: r.string(MAX_DETAIL)?,
            },
            4 => ServerToClient::UserList {
                rid: r.u32()?,
                total: r.u16()?,
                offset: r.u16()?,
                users: r.list(USERS_PER_PAGE, |r| {
                    Ok(UserEntry {
                        name: r.string(MAX_NAME)?,
                        sign_key: r.array()?,
                    })
                })?,
            },
            5 => ServerToClient::ConnectRequested {
                intro_id: r.u64()?,
                name: r.string(MAX_NAME)?,
                identity: PublicIdentity::decode(&mut r)?,
            },
            6 => ServerToClient::ConnectPending {
                rid: r.u32()?,
                intro_id: r.u64()?,
                name: r.string(MAX_NAME)?,
            },
            7 => ServerToClient::ConnectFailed {
                intro_id: r.u64()?,
                name: r.string(MAX_NAME)?,
                reason: FailReason::from_code(r.u8()?),
            },
            8 => ServerToClient::Punch(PunchInstruction {
                intro_id: r.u64()?,
                name: r.string(MAX_NAME)?,
                identity: PublicIdentity::decode(&mut r)?,
                public: r.socket_addr()?,
                locals: r.list(MAX_ENDPOINTS, Reader::socket_addr)?,
                initiator: r.bool()?,
                relay: r.bool()?,
                peer_hard: r.bool()?,
            }),
            9 => ServerToClient::Pong {
                rid: r.u32()?,
                observed: r.socket_addr()?,
            },
            10 => ServerToClient::Ok { rid: r.u32()? },
            11 => {
                let push_id = r.u32()?;
                let rest = r.rest();
                if rest.first() == Some(&11) {
                    return Err(DecodeError::Invalid("nested push"));
                }
                let msg = Self::decode(rest)?;
                if !msg.is_pushable() {
                    return Err(DecodeError::Invalid("pushed message type"));
                }
                ServerToClient::Push {
                    push_id,
                    msg: Box::new(msg),
                }
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(m)
    }

    /// Unasked notices, the only messages a `Push` may carry.
    pub fn is_pushable(&self) -> bool {
        matches!(
            self,
            ServerToClient::ConnectRequested { .. }
                | ServerToClient::ConnectFailed { .. }
                | ServerToClient::Punch(_)
        )
    }
}

/// Messages between two peers inside their session.
#[derive(Clone, PartialEq, Eq)]
pub enum PeerToPeer {
    /// Keeps the NAT mapping and the session alive (heartbeat).
    Keepalive,
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The sender closes the session.
    Close,
    /// A numbered packet of the flow that carries chat and file transfers
    /// ([`crate::flow`]): acknowledged by [`PeerToPeer::FlowAck`], its
    /// frame sent again in a new packet if it is lost. `epoch` names the
    /// sender's flow: a new one (a new session, a restarted daemon) numbers
    /// from 0 again, and the receiver starts afresh on a new epoch.
    Flow {
        epoch: u32,
        pn: u64,
        frame: FlowFrame,
    },
    /// Which packets of flow `epoch` arrived: inclusive ranges of packet
    /// numbers, highest first, and how long the largest was held.
    FlowAck {
        epoch: u32,
        delay_us: u32,
        ranges: Vec<(u64, u64)>,
    },
}

/// The frames a flow carries, one per [`PeerToPeer::Flow`] packet: chat
/// messages and their acknowledgement, and file transfer. A transfer is
/// named by `id`, chosen at random by the sender.
#[derive(Clone, PartialEq, Eq)]
pub enum FlowFrame {
    /// "Here is a file": its relative path (components joined by `/`,
    /// sanitised by the receiver), size, the size of the pieces its
    /// integrity is checked by, and the SHA-256 of the whole file.
    ///
    /// Files of a directory share a `group` (0: a single file) and say how
    /// many the group has (`group_files`), so the receiver can take them
    /// as one and know when it has them all; their `path` starts with the
    /// directory's name.
    Offer {
        id: u64,
        path: String,
        size: u64,
        piece_size: u32,
        hash: [u8; 32],
        group: u64,
        group_files: u32,
    },
    /// The receiver takes it; `have` lists the pieces it already holds,
    /// verified (resumption), as inclusive ranges.
    Accept { id: u64, have: Vec<(u32, u32)> },
    /// Either side ends the transfer (declined, cancelled, failed).
    Cancel { id: u64, reason: String },
    /// SHA-256 hashes of pieces `first`, `first + 1`, ...
    Hashes {
        id: u64,
        first: u32,
        hashes: Vec<[u8; 32]>,
    },
    /// File bytes at `offset`.
    Data { id: u64, offset: u64, data: Vec<u8> },
    /// The receiver found piece `piece` corrupt: send it again.
    BadPiece { id: u64, piece: u32 },
    /// The receiver verified the whole file and gave it its name.
    Done { id: u64 },
    /// `len` bytes of nothing: a path MTU probe is a padded flow packet,
    /// acknowledged like any other.
    Padding { len: u16 },
    /// A chat message. `seq` numbers the sender's messages to this peer
    /// across sessions and restarts; `base` is the lowest `seq` the sender
    /// has not yet seen acknowledged, so a receiver that lost its state can
    /// skip ahead instead of waiting forever. `sent_ms` is the sender's
    /// wall clock in Unix milliseconds, for display only.
    Chat {
        seq: u64,
        base: u64,
        sent_ms: u64,
        body: Vec<u8>,
    },
    /// Every chat message below `upto` was delivered and stored.
    ChatAck { upto: u64 },
    /// A file of directory `group` (of `group_files`) that will not be
    /// offered: the sender could not read it. The receiver counts it as
    /// failed instead of waiting for it.
    Skipped {
        id: u64,
        path: String,
        group: u64,
        group_files: u32,
        reason: String,
    },
}

/// Longest relative path in an offer, in bytes.
pub const MAX_FILE_PATH: usize = 1024;
/// Most piece hashes in one [`FlowFrame::Hashes`].
pub const MAX_HASHES: usize = 32;
/// Most ranges in [`FlowFrame::Accept`] and [`PeerToPeer::FlowAck`].
pub const MAX_RANGES: usize = 32;
/// type, epoch, pn, frame type, id, offset, length.
const DATA_FRAME_OVERHEAD: usize = 1 + 4 + 8 + 1 + 8 + 8 + 2;
/// What a data packet adds around the file bytes of a
/// [`FlowFrame::Data`]: packet header, AEAD tag, flow and frame headers.
pub const DATA_PACKET_OVERHEAD: usize = DATA_HEADER_LEN + 16 + DATA_FRAME_OVERHEAD;
/// Most file bytes in one [`FlowFrame::Data`] in a datagram of `datagram`
/// bytes.
pub const fn max_file_data(datagram: usize) -> usize {
    datagram.saturating_sub(DATA_PACKET_OVERHEAD)
}
/// Most file bytes in one [`FlowFrame::Data`] that any path carries
/// (a [`MAX_PACKET`] datagram).
pub const MAX_FILE_DATA: usize = max_file_data(MAX_PACKET);
/// Most file bytes in one [`FlowFrame::Data`] at all (a [`MAX_DATAGRAM`]).
pub const MAX_FILE_DATA_LARGE: usize = max_file_data(MAX_DATAGRAM);

impl std::fmt::Debug for FlowFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Paths and contents are the user's: sizes only.
            FlowFrame::Offer { id, size, .. } => write!(f, "Offer({id:x}, {size} bytes)"),
            FlowFrame::Accept { id, have } => write!(f, "Accept({id:x}, have {have:?})"),
            FlowFrame::Cancel { id, .. } => write!(f, "Cancel({id:x})"),
            FlowFrame::Hashes { id, first, hashes } => {
                write!(f, "Hashes({id:x}, {first}+{})", hashes.len())
            }
            FlowFrame::Data { id, offset, data } => {
                write!(f, "Data({id:x}, {offset}+{})", data.len())
            }
            FlowFrame::BadPiece { id, piece } => write!(f, "BadPiece({id:x}, {piece})"),
            FlowFrame::Done { id } => write!(f, "Done({id:x})"),
            FlowFrame::Padding { len } => write!(f, "Padding({len})"),
            // Message bodies never reach a log.
            FlowFrame::Chat {
                seq, base, body, ..
            } => write!(f, "Chat({seq}, base {base}, {} bytes)", body.len()),
            FlowFrame::ChatAck { upto } => write!(f, "ChatAck({upto})"),
            FlowFrame::Skipped { id, group, .. } => write!(f, "Skipped({id:x}, group {group:x})"),
        }
    }
}

impl FlowFrame {
    /// A chat frame (not about a transfer).
    pub fn is_chat(&self) -> bool {
        matches!(self, FlowFrame::Chat { .. } | FlowFrame::ChatAck { .. })
    }

    pub fn id(&self) -> u64 {
        match self {
            FlowFrame::Offer { id, .. }
            | FlowFrame::Accept { id, .. }
            | FlowFrame::Cancel { id, .. }
            | FlowFrame::Hashes { id, .. }
            | FlowFrame::Data { id, .. }
            | FlowFrame::BadPiece { id, .. }
            | FlowFrame::Done { id }
            | FlowFrame::Skipped { id, .. } => *id,
            FlowFrame::Padding { .. } | FlowFrame::Chat { .. } | FlowFrame::ChatAck { .. } => 0,
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            FlowFrame::Offer {
                id,
                path,
                size,
                piece_size,
                hash,
                group,
                group_files,
            } => {
                w.u8(1)
                    .u64(*id)
                    .string(path)
                    .u64(*size)
                    .u32(*piece_size)
                    .bytes(hash)
                    .u64(*group)
                    .u32(*group_files);
            }
            FlowFrame::Accept { id, have } => {
                w.u8(2).u64(*id);
                w.list(have, |w, (a, b)| {
                    w.u32(*a).u32(*b);
                });
            }
            FlowFrame::Cancel { id, reason } => {
                w.u8(3).u64(*id).string(truncate_utf8(reason, MAX_DETAIL));
            }
            FlowFrame::Hashes { id, first, hashes } => {
                w.u8(4).u64(*id).u32(*first);
                w.list(hashes, |w, h| {
                    w.bytes(h);
                });
            }
            FlowFrame::Data { id, offset, data } => {
                w.u8(5).u64(*id).u64(*offset).bytes16(data);
            }
            FlowFrame::BadPiece { id, piece } => {
                w.u8(6).u64(*id).u32(*piece);
            }
            FlowFrame::Done { id } => {
                w.u8(7).u64(*id);
            }
            FlowFrame::Padding { len } => {
                w.u8(8).u16(*len);
                w.buf.resize(w.buf.len() + *len as usize, 0);
            }
            FlowFrame::Chat {
                seq,
                base,
                sent_ms,
                body,
            } => {
                w.u8(9).u64(*seq).u64(*base).u64(*sent_ms).bytes16(body);
            }
            FlowFrame::ChatAck { upto } => {
                w.u8(10).u64(*upto);
            }
            FlowFrame::Skipped {
                id,
                path,
                group,
                group_files,
                reason,
            } => {
                w.u8(11)
                    .u64(*id)
                    .string(path)
                    .u64(*group)
                    .u32(*group_files)
                    .string(truncate_utf8(reason, MAX_DETAIL));
            }
        }
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => FlowFrame::Offer {
                id: r.u64()?,
                path: r.string(MAX_FILE_PATH)?,
                size: r.u64()?,
                piece_size: r.u32()?,
                hash: r.array()?,
                group: r.u64()?,
                group_files: r.u32()?,
            },
            2 => FlowFrame::Accept {
                id: r.u64()?,
                have: r.list(MAX_RANGES, |r| Ok((r.u32()?, r.u32()?)))?,
            },
            3 => FlowFrame::Cancel {
                id: r.u64()?,
                reason: r.string(MAX_DETAIL)?,
            },
            4 => FlowFrame::Hashes {
                id: r.u64()?,
                first: r.u32()?,
                hashes: r.list(MAX_HASHES, Reader::array)?,
            },
            5 => FlowFrame::Data {
                id: r.u64()?,
                offset: r.u64()?,
                data: r.bytes16(MAX_FILE_DATA_LARGE)?.to_vec(),
            },
            6 => FlowFrame::BadPiece {
                id: r.u64()?,
                piece: r.u32()?,
            },
            7 => FlowFrame::Done { id: r.u64()? },
            8 => FlowFrame::Padding {
                len: r.bytes16(MAX_DATAGRAM)?.len() as u16,
            },
            9 => FlowFrame::Chat {
                seq: r.u64()?,
                base: r.u64()?,
                sent_ms: r.u64()?,
                body: r.bytes16(MAX_MESSAGE_BYTES)?.to_vec(),
            },
            10 => FlowFrame::ChatAck { upto: r.u64()? },
            11 => FlowFrame::Skipped {
                id: r.u64()?,
                path: r.string(MAX_FILE_PATH)?,
                group: r.u64()?,
                group_files: r.u32()?,
                reason: r.string(MAX_DETAIL)?,
            },
            t => return Err(DecodeError::UnknownType(t)),
        })
    }
}

impl std::fmt::Debug for PeerToPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerToPeer::Keepalive => f.write_str("Keepalive"),
            PeerToPeer::Ping { nonce } => write!(f, "Ping({nonce})"),
            PeerToPeer::Pong { nonce } => write!(f, "Pong({nonce})"),
            PeerToPeer::Close => f.write_str("Close"),
            PeerToPeer::Flow { epoch, pn, frame } => {
                write!(f, "Flow({epoch:x}/{pn}, {frame:?})")
            }
            PeerToPeer::FlowAck {
                epoch,
                delay_us,
                ranges,
            } => f
                .debug_struct("FlowAck")
                .field("epoch", epoch)
                .field("delay_us", delay_us)
                .field("ranges", ranges)
                .finish(),
        }
    }
}

impl PeerToPeer {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(32);
        match self {
            PeerToPeer::Keepalive => {
                w.u8(3);
            }
            PeerToPeer::Ping { nonce } => {
                w.u8(4).u64(*nonce);
            }
            PeerToPeer::Pong { nonce } => {
                w.u8(5).u64(*nonce);
            }
            PeerToPeer::Close => {
                w.u8(6);
            }
            PeerToPeer::Flow { epoch, pn, frame } => {
                w.u8(0x10).u32(*epoch).u64(*pn);
                frame.encode(&mut w);
            }
            PeerToPeer::FlowAck {
                epoch,
                delay_us,
                ranges,
            } => {
                w.u8(0x11).u32(*epoch).u32(*delay_us);
                w.list(ranges, |w, (a, b)| {
                    w.u64(*a).u64(*b);
                });
            }
        }
        w.into_inner()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let m = match r.u8()? {
            // 1 and 2 were chat messages and their acknowledgements before
            // chat moved into the flow (FlowFrame::Chat, ChatAck).
            3 => PeerToPeer::Keepalive,
            4 => PeerToPeer::Ping { nonce: r.u64()? },
            5 => PeerToPeer::Pong { nonce: r.u64()? },
            6 => PeerToPeer::Close,
            0x10 => PeerToPeer::Flow {
                epoch: r.u32()?,
                pn: r.u64()?,
                frame: FlowFrame::decode(&mut r)?,
            },
            0x11 => PeerToPeer::FlowAck {
                epoch: r.u32()?,
                delay_us: r.u32()?,
                ranges: r.list(MAX_RANGES, |r| Ok((r.u64()?, r.u64()?)))?,
            },
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(m)
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use rand::{Rng, RngCore, SeedableRng};

    fn hex(b: &[u8]) -> String {
        crate::identity::to_hex(b)
    }

    #[test]
    fn golden_packets() {
        // These bytes are frozen: changing them breaks old peers.
        assert_eq!(
            hex(&Packet::Punch {
                intro_id: 0x0102030405060708,
                reply: true
            }
            .encode()),
            "0405010203040506070801"
        );
        assert_eq!(
            hex(&Packet::SessionUnknown {
                receiver: 0xdeadbeef
            }
            .encode()),
            "0406deadbeef"
        );
        assert_eq!(
            hex(&Packet::Relay {
                channel: 0x0102030405060708,
                payload: &[0x02, 0x06, 0xde, 0xad, 0xbe, 0xef]
            }
            .encode()),
            "040701020304050607080206deadbeef"
        );
        assert_eq!(
            hex(&Packet::Data {
                receiver: 1,
                counter: 2,
                ciphertext: &[0xaa; 16]
            }
            .encode()),
            format!("040400000001{:016x}{}", 2, "aa".repeat(16))
        );
        assert_eq!(
            hex(&PeerToPeer::Flow {
                epoch: 2,
                pn: 1,
                frame: FlowFrame::Done { id: 0xabc }
            }
            .encode()),
            "10000000020000000000000001070000000000000abc"
        );
        assert_eq!(
            hex(&PeerToPeer::FlowAck {
                epoch: 2,
                delay_us: 5,
                ranges: vec![(7, 9)]
            }
            .encode()),
            "110000000200000005010000000000000007".to_owned() + "0000000000000009"
        );
        assert_eq!(
            hex(&PeerToPeer::Flow {
                epoch: 2,
                pn: 1,
                frame: FlowFrame::Padding { len: 3 }
            }
            .encode()),
            "10000000020000000000000001080003000000"
        );
        // Data packets may be as large as MAX_DATAGRAM, no larger.
        let big = vec![0xaa; MAX_DATAGRAM - DATA_HEADER_LEN];
        let data = Packet::Data {
            receiver: 1,
            counter: 2,
            ciphertext: &big,
        }
        .encode();
        assert_eq!(data.len(), MAX_DATAGRAM);
        assert!(Packet::decode(&data).is_ok());
        let mut over = data.clone();
        over.push(0);
        assert!(matches!(
            Packet::decode(&over),
            Err(DecodeError::Oversized { .. })
        ));
        // A relayed packet may exceed MAX_PACKET by its header, no more.
        let full = vec![0xaa; MAX_PACKET];
        let relay = Packet::Relay {
            channel: 1,
            payload: &full,
        }
        .encode();
        assert_eq!(relay.len(), MAX_RELAYED);
        assert!(Packet::decode(&relay).is_ok());
        let mut over = relay.clone();
        over.push(0);
        assert!(matches!(
            Packet::decode(&over),
            Err(DecodeError::Oversized { .. })
        ));
        let init = Packet::HandshakeInit {
            sender: 9,
            pattern: Pattern::XX,
            noise: &[1, 2, 3],
        }
        .encode();
        assert_eq!(init.len(), MIN_INIT_LEN);
        assert_eq!(hex(&init[..12]), "0401000000090100030102".to_owned() + "03");
        assert_eq!(
            hex(&ClientToServer::Register {
                rid: 7,
                name: "bob".into()
            }
            .encode()),
            "0100000007000362".to_owned() + "6f62"
        );
        assert_eq!(
            hex(&PeerToPeer::Flow {
                epoch: 2,
                pn: 1,
                frame: FlowFrame::ChatAck { upto: 3 }
            }
            .encode()),
            "100000000200000000000000010a".to_owned() + "0000000000000003"
        );
        assert_eq!(
            hex(&PeerToPeer::Flow {
                epoch: 2,
                pn: 1,
                frame: FlowFrame::Chat {
                    seq: 4,
                    base: 3,
                    sent_ms: 2,
                    body: b"hi".to_vec()
                }
            }
            .encode()),
            "10000000020000000000000001090000000000000004".to_owned()
                + "0000000000000003000000000000000200026869"
        );
        assert_eq!(
            hex(&ServerToClient::Failed {
                rid: 1,
                reason: FailReason::Offline,
                detail: "x".into()
            }
            .encode()),
            "0300000001060001".to_owned() + "78"
        );
    }

    fn sample_identity() -> PublicIdentity {
        Identity::generate().public()
    }

    /// One of every packet and message, with fixed values: their bytes
    /// are the layout of this version. Each `match` below has no wildcard,
    /// so a new variant does not compile until it has a sample here.
    fn every_frame() -> Vec<Vec<u8>> {
        let id = Identity::from_secret_bytes(&[7u8; 64]).unwrap().public();
        let a: SocketAddr = "192.0.2.1:7000".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:7001".parse().unwrap();
        let packets = [
            Packet::HandshakeInit {
                sender: 1,
                pattern: Pattern::IK,
                noise: &[0x11; 40],
            },
            Packet::HandshakeResponse {
                sender: 2,
                receiver: 3,
                noise: &[0x22; 20],
            },
            Packet::HandshakeFinish {
                receiver: 4,
                noise: &[0x33; 10],
            },
            Packet::Data {
                receiver: 5,
                counter: 6,
                ciphertext: &[0x44; 17],
            },
            Packet::Punch {
                intro_id: 7,
                reply: true,
            },
            Packet::SessionUnknown { receiver: 8 },
            Packet::Relay {
                channel: 9,
                payload: &[0x55; 5],
            },
            Packet::Probe { nonce: 10 },
            Packet::ProbeReply {
                nonce: 11,
                observed: b,
            },
        ];
        let to_server = [
            ClientToServer::Register {
                rid: 1,
                name: "alice".into(),
            },
            ClientToServer::Login {
                rid: 2,
                signature: [0x66; 64],
            },
            ClientToServer::ListUsers { rid: 3, offset: 12 },
            ClientToServer::RequestConnect {
                rid: 4,
                name: "bob".into(),
                locals: vec![a, b],
                hard: true,
            },
            ClientToServer::AgreeConnect {
                rid: 5,
                intro_id: 6,
                accept: true,
                locals: vec![a],
                hard: false,
            },
            ClientToServer::Ping { rid: 7 },
            ClientToServer::Logout,
            ClientToServer::PushAck { push_id: 8 },
        ];
        let punch = PunchInstruction {
            intro_id: 1,
            name: "bob".into(),
            identity: id.clone(),
            public: a,
            locals: vec![b],
            initiator: true,
            relay: true,
            peer_hard: false,
        };
        let to_client = [
            ServerToClient::RegisterOk {
                rid: 1,
                name: "alice".into(),
            },
            ServerToClient::LoginOk {
                rid: 2,
                name: "alice".into(),
                observed: a,
                probe_port: 7001,
            },
            ServerToClient::Failed {
                rid: 3,
                reason: FailReason::Offline,
                detail: "away".into(),
            },
            ServerToClient::UserList {
                rid: 4,
                total: 2,
                offset: 0,
                users: vec![UserEntry {
                    name: "bob".into(),
                    sign_key: [0x77; 32],
                }],
            },
            ServerToClient::ConnectRequested {
                intro_id: 5,
                name: "bob".into(),
                identity: id.clone(),
            },
            ServerToClient::ConnectPending {
                rid: 6,
                intro_id: 7,
                name: "bob".into(),
            },
            ServerToClient::ConnectFailed {
                intro_id: 8,
                name: "bob".into(),
                reason: FailReason::Declined,
            },
            ServerToClient::Punch(punch.clone()),
            ServerToClient::Pong {
                rid: 9,
                observed: b,
            },
            ServerToClient::Ok { rid: 10 },
            ServerToClient::Push {
                push_id: 11,
                msg: Box::new(ServerToClient::Punch(punch)),
            },
        ];
        let frames = [
            FlowFrame::Offer {
                id: 1,
                path: "photos/a.jpg".into(),
                size: 3_000_000,
                piece_size: 1 << 20,
                hash: [0x88; 32],
                group: 2,
                group_files: 3,
            },
            FlowFrame::Accept {
                id: 1,
                have: vec![(0, 2)],
            },
            FlowFrame::Cancel {
                id: 1,
                reason: "no".into(),
            },
            FlowFrame::Hashes {
                id: 1,
                first: 0,
                hashes: vec![[0x99; 32]],
            },
            FlowFrame::Data {
                id: 1,
                offset: 1 << 20,
                data: vec![0xaa; 9],
            },
            FlowFrame::BadPiece { id: 1, piece: 2 },
            FlowFrame::Done { id: 1 },
            FlowFrame::Padding { len: 4 },
            FlowFrame::Chat {
                seq: 5,
                base: 4,
                sent_ms: 1_700_000_000_000,
                body: b"hi".to_vec(),
            },
            FlowFrame::ChatAck { upto: 5 },
            FlowFrame::Skipped {
                id: 3,
                path: "photos/b.jpg".into(),
                group: 2,
                group_files: 3,
                reason: "unreadable".into(),
            },
        ];
        let mut to_peer = vec![
            PeerToPeer::Keepalive,
            PeerToPeer::Ping { nonce: 1 },
            PeerToPeer::Pong { nonce: 1 },
            PeerToPeer::Close,
            PeerToPeer::FlowAck {
                epoch: 2,
                delay_us: 3,
                ranges: vec![(4, 5), (7, 9)],
            },
        ];
        for frame in frames.iter().cloned() {
            to_peer.push(PeerToPeer::Flow {
                epoch: 2,
                pn: 3,
                frame,
            });
        }
        // Every variant has a sample.
        let packet_kind = |p: &Packet| match p {
            Packet::HandshakeInit { .. } => 0,
            Packet::HandshakeResponse { .. } => 1,
            Packet::HandshakeFinish { .. } => 2,
            Packet::Data { .. } => 3,
            Packet::Punch { .. } => 4,
            Packet::SessionUnknown { .. } => 5,
            Packet::Relay { .. } => 6,
            Packet::Probe { .. } => 7,
            Packet::ProbeReply { .. } => 8,
        };
        let client_kind = |m: &ClientToServer| match m {
            ClientToServer::Register { .. } => 0,
            ClientToServer::Login { .. } => 1,
            ClientToServer::ListUsers { .. } => 2,
            ClientToServer::RequestConnect { .. } => 3,
            ClientToServer::AgreeConnect { .. } => 4,
            ClientToServer::Ping { .. } => 5,
            ClientToServer::Logout => 6,
            ClientToServer::PushAck { .. } => 7,
        };
        let server_kind = |m: &ServerToClient| match m {
            ServerToClient::RegisterOk { .. } => 0,
            ServerToClient::LoginOk { .. } => 1,
            ServerToClient::Failed { .. } => 2,
            ServerToClient::UserList { .. } => 3,
            ServerToClient::ConnectRequested { .. } => 4,
            ServerToClient::ConnectPending { .. } => 5,
            ServerToClient::ConnectFailed { .. } => 6,
            ServerToClient::Punch(_) => 7,
            ServerToClient::Pong { .. } => 8,
            ServerToClient::Ok { .. } => 9,
            ServerToClient::Push { .. } => 10,
        };
        let peer_kind = |m: &PeerToPeer| match m {
            PeerToPeer::Keepalive => 0,
            PeerToPeer::Ping { .. } => 1,
            PeerToPeer::Pong { .. } => 2,
            PeerToPeer::Close => 3,
            PeerToPeer::Flow { .. } => 4,
            PeerToPeer::FlowAck { .. } => 5,
        };
        let frame_kind = |f: &FlowFrame| match f {
            FlowFrame::Offer { .. } => 0,
            FlowFrame::Accept { .. } => 1,
            FlowFrame::Cancel { .. } => 2,
            FlowFrame::Hashes { .. } => 3,
            FlowFrame::Data { .. } => 4,
            FlowFrame::BadPiece { .. } => 5,
            FlowFrame::Done { .. } => 6,
            FlowFrame::Padding { .. } => 7,
            FlowFrame::Chat { .. } => 8,
            FlowFrame::ChatAck { .. } => 9,
            FlowFrame::Skipped { .. } => 10,
        };
        fn all<T>(items: &[T], kind: impl Fn(&T) -> usize, n: usize) {
            let mut seen: Vec<usize> = items.iter().map(kind).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "a variant has no sample");
        }
        all(&packets, packet_kind, 9);
        all(&to_server, client_kind, 8);
        all(&to_client, server_kind, 11);
        all(&to_peer, peer_kind, 6);
        all(&frames, frame_kind, 11);
        let mut out: Vec<Vec<u8>> = packets.iter().map(Packet::encode).collect();
        out.extend(to_server.iter().map(ClientToServer::encode));
        out.extend(to_client.iter().map(ServerToClient::encode));
        out.extend(to_peer.iter().map(PeerToPeer::encode));
        out.push(version_refusal().to_vec());
        out
    }

    #[test]
    fn layout_is_frozen_per_version() {
        // The SHA-256 of every sample frame's bytes, per protocol version.
        // When this test fails, a frame's bytes changed: peers of the
        // same version would misread each other. Bump `VERSION` and add
        // a line for it with the digest printed below.
        const FROZEN: &[(u8, &str)] = &[(
            4,
            "aa97c273452b4898ddd330d32ed4719c80c299d8a018af9a997743122b943eea",
        )];
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for f in every_frame() {
            h.update((f.len() as u32).to_be_bytes());
            h.update(&f);
        }
        let digest = hex(&h.finalize());
        let frozen = FROZEN.iter().find(|(v, _)| *v == VERSION).map(|(_, d)| *d);
        assert_eq!(
            frozen,
            Some(digest.as_str()),
            "the wire layout of version {VERSION} changed (or has no digest yet): \
             bump wire::VERSION and freeze ({}, \"{digest}\")",
            VERSION + u8::from(frozen.is_some())
        );
        // And every sample reads back as itself.
        for f in every_frame().iter().take(9) {
            assert!(Packet::decode(f).is_ok(), "{}", hex(f));
        }
    }

    fn random_addr(rng: &mut impl Rng) -> SocketAddr {
        if rng.gen() {
            SocketAddr::from((rng.gen::<[u8; 4]>(), rng.gen()))
        } else {
            SocketAddr::from((rng.gen::<[u8; 16]>(), rng.gen()))
        }
    }

    fn random_name(rng: &mut impl Rng) -> String {
        let n = rng.gen_range(1..=MAX_NAME);
        (0..n).map(|_| rng.gen_range(b'a'..=b'z') as char).collect()
    }

    fn random_c2s(rng: &mut impl Rng) -> ClientToServer {
        let locals = (0..rng.gen_range(0..=MAX_ENDPOINTS))
            .map(|_| random_addr(rng))
            .collect();
        match rng.gen_range(0..8) {
            7 => ClientToServer::PushAck { push_id: rng.gen() },
            0 => ClientToServer::Register {
                rid: rng.gen(),
                name: random_name(rng),
            },
            1 => ClientToServer::Login {
                rid: rng.gen(),
                signature: [rng.gen(); 64],
            },
            2 => ClientToServer::ListUsers {
                rid: rng.gen(),
                offset: rng.gen(),
            },
            3 => ClientToServer::RequestConnect {
                rid: rng.gen(),
                name: random_name(rng),
                locals,
                hard: rng.gen(),
            },
            4 => ClientToServer::AgreeConnect {
                rid: rng.gen(),
                intro_id: rng.gen(),
                accept: rng.gen(),
                locals,
                hard: rng.gen(),
            },
            5 => ClientToServer::Ping { rid: rng.gen() },
            _ => ClientToServer::Logout,
        }
    }

    fn random_s2c(rng: &mut impl Rng, id: &PublicIdentity) -> ServerToClient {
        let m = random_s2c_plain(rng, id);
        if m.is_pushable() && rng.gen() {
            return ServerToClient::Push {
                push_id: rng.gen(),
                msg: Box::new(m),
            };
        }
        m
    }

    fn random_s2c_plain(rng: &mut impl Rng, id: &PublicIdentity) -> ServerToClient {
        match rng.gen_range(0..10) {
            0 => ServerToClient::RegisterOk {
                rid: rng.gen(),
                name: random_name(rng),
            },
            1 => ServerToClient::LoginOk {
                rid: rng.gen(),
                name: random_name(rng),
                observed: random_addr(rng),
                probe_port: rng.gen(),
            },
            2 => ServerToClient::Failed {
                rid: rng.gen(),
                reason: FailReason::from_code(rng.gen()),
                detail: random_name(rng),
            },
            3 => ServerToClient::UserList {
                rid: rng.gen(),
                total: rng.gen(),
                offset: rng.gen(),
                users: (0..rng.gen_range(0..=USERS_PER_PAGE))
                    .map(|_| UserEntry {
                        name: random_name(rng),
                        sign_key: rng.gen(),
                    })
                    .collect(),
            },
            4 => ServerToClient::ConnectRequested {
                intro_id: rng.gen(),
                name: random_name(rng),
                identity: id.clone(),
            },
            5 => ServerToClient::ConnectPending {
                rid: rng.gen(),
                intro_id: rng.gen(),
                name: random_name(rng),
            },
            6 => ServerToClient::ConnectFailed {
                intro_id: rng.gen(),
                name: random_name(rng),
                reason: FailReason::from_code(rng.gen()),
            },
            7 => ServerToClient::Punch(PunchInstruction {
                intro_id: rng.gen(),
                name: random_name(rng),
                identity: id.clone(),
                public: random_addr(rng),
                locals: (0..rng.gen_range(0..=MAX_ENDPOINTS))
                    .map(|_| random_addr(rng))
                    .collect(),
                initiator: rng.gen(),
                relay: rng.gen(),
                peer_hard: rng.gen(),
            }),
            8 => ServerToClient::Pong {
                rid: rng.gen(),
                observed: random_addr(rng),
            },
            _ => ServerToClient::Ok { rid: rng.gen() },
        }
    }

    fn random_p2p(rng: &mut impl Rng) -> PeerToPeer {
        match rng.gen_range(2..8) {
            2 => PeerToPeer::Keepalive,
            3 => PeerToPeer::Ping { nonce: rng.gen() },
            4 => PeerToPeer::Pong { nonce: rng.gen() },
            5 => PeerToPeer::Close,
            6 => PeerToPeer::FlowAck {
                epoch: rng.gen(),
                delay_us: rng.gen(),
                ranges: (0..rng.gen_range(0..=MAX_RANGES))
                    .map(|_| (rng.gen(), rng.gen()))
                    .collect(),
            },
            _ => PeerToPeer::Flow {
                epoch: rng.gen(),
                pn: rng.gen(),
                frame: random_frame(rng),
            },
        }
    }

    fn random_frame(rng: &mut impl Rng) -> FlowFrame {
        let id = rng.gen();
        match rng.gen_range(0..11) {
            0 => FlowFrame::Offer {
                id,
                path: "d/".repeat(rng.gen_range(0..=MAX_FILE_PATH / 2)),
                size: rng.gen(),
                piece_size: rng.gen(),
                hash: rng.gen(),
                group: rng.gen(),
                group_files: rng.gen(),
            },
            1 => FlowFrame::Accept {
                id,
                have: (0..rng.gen_range(0..=MAX_RANGES))
                    .map(|_| (rng.gen(), rng.gen()))
                    .collect(),
            },
            2 => FlowFrame::Cancel {
                id,
                reason: "no".into(),
            },
            3 => FlowFrame::Hashes {
                id,
                first: rng.gen(),
                hashes: (0..rng.gen_range(0..=MAX_HASHES))
                    .map(|_| rng.gen())
                    .collect(),
            },
            4 => {
                let mut data = vec![0u8; rng.gen_range(0..=MAX_FILE_DATA)];
                rng.fill_bytes(&mut data);
                FlowFrame::Data {
                    id,
                    offset: rng.gen(),
                    data,
                }
            }
            5 => FlowFrame::BadPiece {
                id,
                piece: rng.gen(),
            },
            6 => FlowFrame::Padding {
                len: rng.gen_range(0..1000),
            },
            7 => {
                let mut body = vec![0u8; rng.gen_range(0..=MAX_MESSAGE_BYTES)];
                rng.fill_bytes(&mut body);
                FlowFrame::Chat {
                    seq: rng.gen(),
                    base: rng.gen(),
                    sent_ms: rng.gen(),
                    body,
                }
            }
            8 => FlowFrame::ChatAck { upto: rng.gen() },
            9 => FlowFrame::Skipped {
                id,
                path: "d/".repeat(rng.gen_range(0..=MAX_FILE_PATH / 2)),
                group: rng.gen(),
                group_files: rng.gen(),
                reason: "x".repeat(rng.gen_range(0..=MAX_DETAIL)),
            },
            _ => FlowFrame::Done { id },
        }
    }

    #[test]
    fn inner_messages_round_trip_and_fit_in_a_packet() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let id = sample_identity();
        for _ in 0..3000 {
            let m = random_c2s(&mut rng);
            let b = m.encode();
            assert!(b.len() <= MAX_INNER, "{m:?} is {} bytes", b.len());
            assert_eq!(ClientToServer::decode(&b).unwrap(), m);
            let m = random_s2c(&mut rng, &id);
            let b = m.encode();
            assert!(b.len() <= MAX_INNER, "{m:?} is {} bytes", b.len());
            assert_eq!(ServerToClient::decode(&b).unwrap(), m);
            let m = random_p2p(&mut rng);
            let b = m.encode();
            assert!(b.len() <= MAX_INNER, "{m:?} is {} bytes", b.len());
            assert_eq!(PeerToPeer::decode(&b).unwrap(), m);
        }
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let id = sample_identity();
        for _ in 0..300 {
            let encodings = [
                random_c2s(&mut rng).encode(),
                random_s2c(&mut rng, &id).encode(),
                random_p2p(&mut rng).encode(),
            ];
            for (kind, b) in encodings.iter().enumerate() {
                for cut in 0..b.len() {
                    let r = match kind {
                        0 => ClientToServer::decode(&b[..cut]).map(|_| ()),
                        1 => ServerToClient::decode(&b[..cut]).map(|_| ()),
                        _ => PeerToPeer::decode(&b[..cut]).map(|_| ()),
                    };
                    assert!(r.is_err(), "a truncated message decoded");
                }
                // Trailing garbage is refused too.
                let mut long = b.clone();
                long.push(0);
                assert!(ClientToServer::decode(&long).is_err() || kind != 0);
                assert!(ServerToClient::decode(&long).is_err() || kind != 1);
                assert!(PeerToPeer::decode(&long).is_err() || kind != 2);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50_000 {
            let mut b = vec![0u8; rng.gen_range(0..1500)];
            rng.fill_bytes(&mut b);
            if rng.gen_bool(0.5) && b.len() > 2 {
                // Make the header plausible so decoding goes deeper.
                b[0] = VERSION;
                b[1] = rng.gen_range(0..8);
            }
            let _ = Packet::decode(&b);
            let inner = &b[b.len().min(1)..];
            let _ = ClientToServer::decode(inner);
            let _ = ServerToClient::decode(inner);
            let _ = PeerToPeer::decode(inner);
        }
    }

    #[test]
    fn bad_packets_get_specific_errors() {
        assert_eq!(Packet::decode(&[1, 4]), Err(DecodeError::Version(1)));
        assert_eq!(
            Packet::decode(&[VERSION, 99]),
            Err(DecodeError::UnknownType(99))
        );
        let mut punch = vec![0u8; MAX_PACKET + 1];
        punch[..2].copy_from_slice(&[VERSION, PacketType::Punch as u8]);
        assert!(matches!(
            Packet::decode(&punch),
            Err(DecodeError::Oversized { .. })
        ));
        assert_eq!(
            Packet::decode(&[VERSION, 1, 0, 0, 0, 1, 0, 0, 0]),
            Err(DecodeError::Invalid("unpadded handshake init"))
        );
        assert!(Packet::decode(&[VERSION, 4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xaa]).is_err());
        assert_eq!(
            PeerToPeer::decode(&[0x1f]),
            Err(DecodeError::UnknownType(0x1f))
        );
        // A flow packet whose frame type is unknown.
        let mut flow = vec![0x10];
        flow.extend_from_slice(&[0; 12]);
        flow.push(0x7f);
        assert_eq!(
            PeerToPeer::decode(&flow),
            Err(DecodeError::UnknownType(0x7f))
        );
        // File data longer than the largest datagram holds.
        let mut data = vec![0x10];
        data.extend_from_slice(&[0; 12]);
        data.push(5);
        data.extend_from_slice(&[0; 16]);
        data.extend_from_slice(&((MAX_FILE_DATA_LARGE + 1) as u16).to_be_bytes());
        data.extend(std::iter::repeat_n(0, MAX_FILE_DATA_LARGE + 1));
        assert!(matches!(
            PeerToPeer::decode(&data),
            Err(DecodeError::Oversized { .. })
        ));
        let mut big = vec![0x10];
        big.extend_from_slice(&[0; 12]);
        big.push(9);
        big.extend_from_slice(&[0; 24]);
        big.extend_from_slice(&((MAX_MESSAGE_BYTES + 1) as u16).to_be_bytes());
        big.extend(std::iter::repeat_n(0, MAX_MESSAGE_BYTES + 1));
        assert!(matches!(
            PeerToPeer::decode(&big),
            Err(DecodeError::Oversized { .. })
        ));
    }

    #[test]
    fn names_are_validated() {
        for ok in ["bob", "a", "alice-2", "x.y_z", &"a".repeat(32)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-bob",
            "bob smith",
            "bøb",
            "Alice",
            "a/b",
            &"a".repeat(33),
            "\u{0}",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
