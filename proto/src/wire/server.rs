//! What the rendezvous server sends a client, inside its session.

use super::*;
use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::PublicIdentity;

/// A user in the active list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub name: String,
    pub sign_key: [u8; 32],
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
    /// The server relays this introduction's packets if no direct path is
    /// found: [`Packet::Relay`] with `channel`, both ways.
    pub relay: bool,
    /// This party's relay channel id (zero without a relay): random and
    /// told to nobody else, so a packet on it comes from this party (the
    /// other party has its own id; the server swaps them as it relays).
    pub channel: u64,
    /// The peer's NAT has endpoint-dependent mapping (see
    /// [`ClientToServer::RequestConnect`]).
    pub peer_hard: bool,
    /// What the server's `ChannelUnknown` for this introduction's relay
    /// channel carries (zero without a relay; see [`super::ResetToken`]).
    pub channel_token: super::ResetToken,
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
        /// What the server's `SessionUnknown` for this session carries
        /// (see [`super::ResetToken`]).
        reset_token: super::ResetToken,
    },
    /// A request failed.
    Failed {
        rid: u32,
        reason: FailReason,
        detail: String,
    },
    /// A page of the users online (in name order), and how many are
    /// online in all.
    UserList {
        rid: u32,
        total: u32,
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
    /// "Answer this from where it reaches you": an authenticated packet
    /// came from a new address, and the session moves there once the
    /// [`ClientToServer::PathResponse`] proves the client receives there
    /// (QUIC's path validation). Until then the server sends that
    /// address at most three times what it received from it.
    PathChallenge {
        data: [u8; 8],
    },
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
                reset_token,
            } => {
                w.u8(2)
                    .u32(*rid)
                    .string(name)
                    .socket_addr(observed)
                    .u16(*probe_port)
                    .bytes(reset_token);
            }
            ServerToClient::Failed {
                rid,
                reason,
                detail,
            } => {
                let detail = truncate_utf8(detail, MAX_DETAIL);
                w.u8(3).u32(*rid).u8(reason.code()).string(detail);
            }
            ServerToClient::UserList { rid, total, users } => {
                w.u8(4).u32(*rid).u32(*total);
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
                w.u64(p.channel).bytes(&p.channel_token);
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
            ServerToClient::PathChallenge { data } => {
                w.u8(12).bytes(data);
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
                reset_token: r.array()?,
            },
            3 => ServerToClient::Failed {
                rid: r.u32()?,
                reason: FailReason::from_code(r.u8()?),
                detail: r.string(MAX_DETAIL)?,
            },
            4 => ServerToClient::UserList {
                rid: r.u32()?,
                total: r.u32()?,
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
                channel: r.u64()?,
                channel_token: r.array()?,
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
            12 => ServerToClient::PathChallenge { data: r.array()? },
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
