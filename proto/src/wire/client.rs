//! What a client sends the rendezvous server, inside its session.

use super::*;
use crate::codec::{DecodeError, Reader, Writer};

/// Requests from a client to the rendezvous server. `rid` is chosen by the
/// client and echoed in the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToServer {
    /// `invite`: the operator's invite token, for a server that asks for
    /// one (empty: none).
    Register {
        rid: u32,
        name: String,
        invite: String,
    },
    /// Answers the challenge from the handshake: an ed25519 signature over
    /// `LOGIN_CONTEXT || challenge || server Noise key`.
    Login {
        rid: u32,
        signature: [u8; 64],
    },
    /// A page of the users online: those whose names come after `after`
    /// (from the first when empty), [`USERS_PER_PAGE`] at most.
    ListUsers {
        rid: u32,
        after: String,
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
    /// Answers a [`ServerToClient::PathChallenge`] with its data, from
    /// the address the challenge reached.
    PathResponse {
        data: [u8; 8],
    },
}

impl ClientToServer {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64);
        match self {
            ClientToServer::Register { rid, name, invite } => {
                w.u8(1).u32(*rid).string(name).string(invite);
            }
            ClientToServer::Login { rid, signature } => {
                w.u8(2).u32(*rid).bytes(signature);
            }
            ClientToServer::ListUsers { rid, after } => {
                w.u8(3).u32(*rid).string(after);
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
            ClientToServer::PathResponse { data } => {
                w.u8(9).bytes(data);
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
                invite: r.string(MAX_INVITE)?,
            },
            2 => ClientToServer::Login {
                rid: r.u32()?,
                signature: r.array()?,
            },
            3 => ClientToServer::ListUsers {
                rid: r.u32()?,
                after: r.string(MAX_NAME)?,
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
            9 => ClientToServer::PathResponse { data: r.array()? },
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(m)
    }
}
