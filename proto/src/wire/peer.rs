//! What peers send each other, inside their session: keepalives, pings,
//! and the flow that carries chat and files ([`FlowFrame`]).

use super::*;
use crate::codec::{DecodeError, Reader, Writer};

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
    /// Several frames in one packet of flow `epoch` (chat messages and
    /// their acknowledgement, many to a packet): each is taken as if it
    /// came alone under `pn`. Between 2 and [`MAX_FRAMES`] of them, to
    /// the end of the packet.
    Frames {
        epoch: u32,
        pn: u64,
        frames: Vec<FlowFrame>,
    },
    /// Which packets of flow `epoch` arrived: inclusive ranges of packet
    /// numbers, highest first, and how long the largest was held.
    FlowAck {
        epoch: u32,
        delay_us: u32,
        ranges: Vec<(u64, u64)>,
    },
}

/// Most frames in one [`PeerToPeer::Frames`] packet.
pub const MAX_FRAMES: usize = 64;

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
        /// Where `body` starts in the message, and the message's whole
        /// length (at most [`MAX_MESSAGE_BYTES`]): a long message comes
        /// in parts, each in order of `offset`.
        offset: u32,
        total: u32,
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
    /// The receiver cannot take more now (its disk is full): stop sending
    /// this transfer's data, keep it. The receiver's next `Accept` (with
    /// what it holds) resumes it.
    Pause { id: u64, reason: String },
}

/// Longest relative path in an offer, in bytes.
pub const MAX_FILE_PATH: usize = 1024;
/// Longest reason in [`FlowFrame::Skipped`], in bytes: with a path of
/// [`MAX_FILE_PATH`] the frame still fits a base-size packet (with 200
/// bytes it did not, and such a frame could never be delivered).
pub const MAX_SKIP_REASON: usize = 128;
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
                seq,
                base,
                offset,
                total,
                body,
                ..
            } => write!(
                f,
                "Chat({seq}, base {base}, {} bytes at {offset} of {total})",
                body.len()
            ),
            FlowFrame::ChatAck { upto } => write!(f, "ChatAck({upto})"),
            FlowFrame::Skipped { id, group, .. } => write!(f, "Skipped({id:x}, group {group:x})"),
            FlowFrame::Pause { id, .. } => write!(f, "Pause({id:x})"),
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
            | FlowFrame::Skipped { id, .. }
            | FlowFrame::Pause { id, .. } => *id,
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
                offset,
                total,
                body,
            } => {
                w.u8(9)
                    .u64(*seq)
                    .u64(*base)
                    .u64(*sent_ms)
                    .u32(*offset)
                    .u32(*total)
                    .bytes16(body);
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
                    .string(truncate_utf8(reason, MAX_SKIP_REASON));
            }
            FlowFrame::Pause { id, reason } => {
                w.u8(12).u64(*id).string(truncate_utf8(reason, MAX_DETAIL));
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
            9 => {
                let (seq, base, sent_ms) = (r.u64()?, r.u64()?, r.u64()?);
                let (offset, total) = (r.u32()?, r.u32()?);
                let body = r.bytes16(MAX_DATAGRAM)?.to_vec();
                if total as usize > MAX_MESSAGE_BYTES
                    || offset as usize + body.len() > total as usize
                {
                    return Err(DecodeError::Invalid("chat part"));
                }
                FlowFrame::Chat {
                    seq,
                    base,
                    sent_ms,
                    offset,
                    total,
                    body,
                }
            }
            10 => FlowFrame::ChatAck { upto: r.u64()? },
            11 => FlowFrame::Skipped {
                id: r.u64()?,
                path: r.string(MAX_FILE_PATH)?,
                group: r.u64()?,
                group_files: r.u32()?,
                reason: r.string(MAX_SKIP_REASON)?,
            },
            12 => FlowFrame::Pause {
                id: r.u64()?,
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
            PeerToPeer::Frames { epoch, pn, frames } => {
                write!(f, "Frames({epoch:x}/{pn}, {frames:?})")
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
            PeerToPeer::Frames { epoch, pn, frames } => {
                w.u8(0x12).u32(*epoch).u64(*pn);
                for frame in frames {
                    frame.encode(&mut w);
                }
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
            0x12 => {
                let (epoch, pn) = (r.u32()?, r.u64()?);
                let mut frames = Vec::new();
                while r.remaining() > 0 {
                    if frames.len() == MAX_FRAMES {
                        return Err(DecodeError::Invalid("frame count"));
                    }
                    frames.push(FlowFrame::decode(&mut r)?);
                }
                if frames.len() < 2 {
                    return Err(DecodeError::Invalid("frame count"));
                }
                PeerToPeer::Frames { epoch, pn, frames }
            }
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
