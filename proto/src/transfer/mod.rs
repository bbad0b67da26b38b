//! Everything that rides one peer's [`Flow`] (loss recovery, congestion
//! control, pacing), sans-IO: [`PeerFlow`] carries chat ([`crate::reliable`])
//! and file transfers (offers, acceptance with resumption, piece hashes,
//! data, verification, completion) as [`FlowFrame`]s.
//!
//! ```text
//!  sender                                   receiver
//!  offer ── Offer{id, path, size, piece_size, hash} ──▶ Offered (the user decides)
//!        ◀── Accept{id, have: verified pieces} ─────── accept (resume: what it holds)
//!  Hashes{id, first, ..} and Data{id, offset, ..} ───▶ write; a complete piece is
//!        ◀── BadPiece{id, piece} (hash mismatch) ───── verified against its hash
//!        ◀── Done{id} ──────────────────────────────── whole file verified, renamed
//! ```
//!
//! The machine does no I/O. The owner reads file bytes for it through
//! [`FileSource`] when a data packet is due, writes what arrives
//! ([`DiskWork::Write`]), checks pieces and whole files when told
//! ([`DiskWork::VerifyPiece`], [`DiskWork::VerifyFile`]) and
//! reports the result back. Durability is the owner's: a piece counts as
//! held only once the owner verified it (after writing and syncing it),
//! and resumption starts from the pieces the owner says it holds.
//!
//! Each frame travels in its own flow packet. A lost control frame is sent
//! again as it was; lost data is read again from the source. Transfers
//! take turns packet by packet, so several share the path fairly. Chat
//! rides the same flow ([`crate::reliable`]): its frames go before any
//! file data waiting to be sent, so a message waits at most for room in
//! the congestion window, never behind a file.

use crate::flow::pmtud::{self, Pmtud};
use crate::flow::{AckFrame, Flow, FlowEvent};
use crate::reliable::{ChatMessage, Reliable, ReliableEvent};
use crate::wire::{
    max_file_data, FlowFrame, PeerToPeer, DATA_PACKET_OVERHEAD, MAX_FILE_DATA_LARGE, MAX_HASHES,
    MAX_RANGES,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Integrity is checked per piece of this size: big enough that the hash
/// list stays small (32 bytes per MiB), small enough that a bad piece costs
/// little to fetch again.
pub const PIECE_SIZE: u32 = 1 << 20;
/// The smallest piece a file may be offered in, but for a file of one
/// piece: every piece costs the receiver a hash and a byte of state, and a
/// file in 1-byte pieces cost 1 GB to accept.
pub const MIN_PIECE_SIZE: u32 = 16 << 10;
/// The largest piece.
pub const MAX_PIECE_SIZE: u32 = 64 << 20;
/// Most pieces in one file: what an accepted transfer's state is sized by
/// (33 bytes a piece: 2.2 MB at most).
pub const MAX_PIECES: u64 = 1 << 16;
/// Offers from one peer waiting for an answer, at most; past it an offer
/// is refused (`Cancel`) with a reason the sender sees. Enough for a
/// directory of 10,000 files.
pub const MAX_PENDING_OFFERS: usize = 10_000;

/// The piece size to offer a file of `size` bytes in: [`PIECE_SIZE`], or
/// the smallest power of two above it that keeps the piece count within
/// [`MAX_PIECES`]; None past [`MAX_PIECES`] pieces of [`MAX_PIECE_SIZE`]
/// (4 TiB).
pub fn piece_size_for(size: u64) -> Option<u32> {
    let need = size.div_ceil(MAX_PIECES).max(PIECE_SIZE as u64);
    let piece = need.checked_next_power_of_two()?;
    (piece <= MAX_PIECE_SIZE as u64).then_some(piece as u32)
}
/// A control frame's packet size, for the congestion window's
/// arithmetic: they are small, but count them as full base packets.
const CONTROL_SIZE: usize = pmtud::BASE;
/// Chat bytes waiting that make a larger packet worth probing for.
const CHAT_PROBE_BYTES: usize = 64 * 1024;

/// A chat part cut to at most `room` bytes encoded: the head, and the
/// rest as a part of its own (none if it fit, or is not a part).
fn cut_part(frame: FlowFrame, room: usize) -> (FlowFrame, Option<FlowFrame>) {
    let most = room
        .saturating_sub(crate::reliable::CHAT_FRAME_HEADER)
        .max(1);
    match frame {
        FlowFrame::Chat {
            seq,
            base,
            sent_ms,
            offset,
            total,
            mut body,
        } if body.len() > most => {
            let rest = body.split_off(most);
            let tail = FlowFrame::Chat {
                seq,
                base,
                sent_ms,
                offset: offset + most as u32,
                total,
                body: rest,
            };
            let head = FlowFrame::Chat {
                seq,
                base,
                sent_ms,
                offset,
                total,
                body,
            };
            (head, Some(tail))
        }
        other => (other, None),
    }
}

/// A chat frame's encoded length.
fn chat_len(frame: &FlowFrame) -> usize {
    match frame {
        FlowFrame::Chat { body, .. } => crate::reliable::CHAT_FRAME_HEADER + body.len(),
        _ => crate::reliable::CHAT_ACK_LEN,
    }
}

/// A [`PeerToPeer::Frames`] header: type, epoch, packet number.
const FRAMES_HEADER: usize = 1 + 4 + 8;
/// What a chat packet adds to its frames on the wire.
const CHAT_OVERHEAD: usize = FRAMES_HEADER + crate::wire::DATA_HEADER_LEN + 16;
/// Probe timeouts in a row, at a size above the base, after which the
/// large size is taken for a black hole.
const BLACK_HOLE_PTOS: u32 = 2;

/// The hash an offer names: BLAKE3 over the file's piece hashes, in
/// order (BitTorrent v2's piece layer, one level). The receiver checks the
/// piece hashes the sender sends against it before it trusts any, and
/// every piece against its piece hash as it arrives, so the whole file is
/// verified against the offer when the last piece is, without reading it
/// all again.
pub fn file_hash(piece_hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in piece_hashes {
        h.update(p);
    }
    h.finalize().into()
}

/// A piece's hash: BLAKE3 (five times SHA-256's speed here: 0.1 s a GiB
/// against 0.52, on one core).
pub fn piece_hash(piece: &[u8]) -> [u8; 32] {
    blake3::hash(piece).into()
}

/// A transfer's id: chosen at random by the sender, 16 hex digits in the
/// control API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(pub u64);

/// A directory's id: the files sent with it carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

impl std::fmt::Display for TransferId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The directory a file is sent with, and how many files it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub id: GroupId,
    pub files: u32,
}

impl Group {
    /// As the wire carries it: id 0 for none.
    fn to_wire(group: Option<Group>) -> (u64, u32) {
        group.map_or((0, 0), |g| (g.id.0, g.files))
    }

    fn from_wire(id: u64, files: u32) -> Option<Group> {
        (id != 0).then_some(Group {
            id: GroupId(id),
            files,
        })
    }
}

/// A file as its offer describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDesc {
    pub id: TransferId,
    /// The name offered: as the sender chose it (the receiver makes it
    /// safe), `dir/sub/name` for a file of a directory.
    pub path: String,
    pub size: u64,
    /// Integrity is checked by pieces of this size.
    pub piece_size: u32,
    /// [`file_hash`] over the piece hashes.
    pub hash: [u8; 32],
    pub group: Option<Group>,
}

/// Where the sender's bytes come from (the owner's open files).
pub trait FileSource {
    /// Fills `buf` with the bytes of transfer `id` at `offset`; returns how
    /// many were read (fewer only at the end of the file).
    fn read(&mut self, id: TransferId, offset: u64, buf: &mut [u8]) -> std::io::Result<usize>;
}

/// The disk side of file transfers: the node's owner implements it and
/// gives it to the node ([`crate::node::Node::new`]), which reads what it
/// sends through it and hands it what arrives. Work that takes time
/// (writes, checks, the final sync and rename) may be done later, in
/// order; its outcome goes back to the node as an input
/// ([`crate::node::Node::piece_checked`], [`crate::node::Node::file_checked`],
/// or a cancel when a write failed).
pub trait FileIo: FileSource {
    /// Bytes of incoming transfer `id` from `peer`, at `offset`.
    fn write(&mut self, peer: &str, id: TransferId, offset: u64, data: Vec<u8>);
    /// Piece `piece` (`len` bytes at `offset`) of incoming transfer `id`
    /// is complete once the writes before this call are done: read it
    /// back, hash it and compare with `hash`.
    fn verify_piece(
        &mut self,
        peer: &str,
        id: TransferId,
        piece: u32,
        offset: u64,
        len: u64,
        hash: [u8; 32],
    );
    /// Every piece of incoming transfer `id` is verified, and with them
    /// the whole file (see [`file_hash`]): make it durable under its
    /// final name.
    fn finish(&mut self, peer: &str, id: TransferId);
}

/// The disk side of a node that moves no files (a tool, a test of chat):
/// it accepts no offer, so nothing arrives to be written; a read fails.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFiles;

impl FileSource for NoFiles {
    fn read(&mut self, _id: TransferId, _offset: u64, _buf: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("this node sends no files"))
    }
}

impl FileIo for NoFiles {
    fn write(&mut self, _peer: &str, _id: TransferId, _offset: u64, _data: Vec<u8>) {}
    fn verify_piece(&mut self, _: &str, _: TransferId, _: u32, _: u64, _: u64, _: [u8; 32]) {}
    fn finish(&mut self, _peer: &str, _id: TransferId) {}
}

/// What the node reports of a transfer. The disk work (writes, piece and
/// file checks) goes to the [`FileIo`] instead; these are for the owner's
/// records and its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEvent {
    /// A peer offers a file; answer with [`PeerFlow::accept`] or
    /// [`PeerFlow::cancel`].
    Offered(FileDesc),
    /// The peer accepted our offer.
    Accepted { id: TransferId },
    /// Progress: bytes the peer has acknowledged (sending) or verified
    /// pieces cover (receiving).
    Progress { id: TransferId, done: u64 },
    /// The transfer completed (the receiver has the file, verified).
    Finished { id: TransferId },
    /// The transfer ended without the file: declined, cancelled, failed.
    Ended { id: TransferId, reason: String },
    /// The receiver paused our transfer (its disk is full); it resumes
    /// when the receiver asks again ([`TransferEvent::Resumed`]).
    Paused { id: TransferId, reason: String },
    /// The receiver resumed our paused transfer.
    Resumed { id: TransferId },
    /// A source read failed: the owner should cancel with the reason.
    ReadFailed { id: TransferId, error: String },
    /// A file of a directory the peer sends will not come: it could not
    /// read it.
    Skipped {
        id: TransferId,
        path: String,
        group: Group,
        reason: String,
    },
}

/// Disk work for the owner's [`FileIo`], in the order it must be done
/// ([`PeerFlow::poll_disk`]); the node hands each to its `FileIo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskWork {
    /// Write these bytes of an incoming file.
    Write {
        id: TransferId,
        offset: u64,
        data: Vec<u8>,
    },
    /// A piece of an incoming file is complete: read it back, hash it and
    /// call [`PeerFlow::piece_checked`].
    VerifyPiece {
        id: TransferId,
        piece: u32,
        offset: u64,
        len: u64,
        hash: [u8; 32],
    },
    /// Every piece is verified, and with them the whole file (see
    /// [`file_hash`]): make it durable under its final name, and call
    /// [`PeerFlow::file_checked`].
    VerifyFile { id: TransferId },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Send,
    Receive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Offered,
    Active,
    /// Sender: everything acknowledged, waiting for `Done`. Receiver:
    /// checking the whole file.
    Finishing,
    /// The receiver cannot take more now (its disk is full): nothing is
    /// sent or written until it resumes with an `Accept`.
    Paused,
    Done,
    Ended,
}

/// What `transfers` shows of one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferStatus {
    pub id: TransferId,
    pub direction: Direction,
    pub phase: Phase,
    pub path: String,
    pub size: u64,
    pub done: u64,
}

fn piece_count(size: u64, piece_size: u32) -> u32 {
    size.div_ceil(piece_size.max(1) as u64) as u32
}

fn piece_range(size: u64, piece_size: u32, piece: u32) -> (u64, u64) {
    let start = piece as u64 * piece_size as u64;
    (start, (start + piece_size as u64).min(size))
}

/// Ranges (inclusive) of the set bits, for `Accept`.
fn to_ranges(held: &[bool]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (i, h) in held.iter().enumerate() {
        if !h {
            continue;
        }
        let i = i as u32;
        match out.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => out.push((i, i)),
        }
    }
    out
}

struct Outgoing {
    path: String,
    group: (u64, u32),
    size: u64,
    piece_size: u32,
    hash: [u8; 32],
    piece_hashes: Vec<[u8; 32]>,
    phase: Phase,
    /// Byte ranges still to send for the first time, in order.
    todo: VecDeque<(u64, u64)>,
    /// Packets lost: (offset, len), sent again before new data.
    resend: VecDeque<(u64, usize)>,
    hashes_next: u32,
    acked: u64,
    unacked: usize,
}

/// What is known of one piece of an incoming file: a byte each, so an
/// accepted transfer costs its piece hashes and a byte per piece, not a
/// structure per piece.
const FILLING: u8 = 0;
/// All bytes here, waiting for its hash or the owner's check.
const COMPLETE: u8 = 1;
const CHECKING: u8 = 2;
const VERIFIED: u8 = 3;

/// Received byte ranges kept at most per transfer (over every piece being
/// filled): a sender that scatters fragments gets the piece it scatters
/// into asked for again whole (`BadPiece`) instead of costing memory.
const MAX_RANGES_HELD: usize = 16_384;

struct Incoming {
    path: String,
    size: u64,
    piece_size: u32,
    hash: [u8; 32],
    /// Allocated when accepted (an offer costs no memory per piece).
    piece_hashes: Vec<Option<[u8; 32]>>,
    /// Piece hashes received so far.
    hashes_have: usize,
    /// Every piece hash is here and they match the offer's hash: pieces
    /// may be checked.
    hashes_ok: bool,
    /// One of FILLING, COMPLETE, CHECKING, VERIFIED per piece.
    pieces: Vec<u8>,
    /// Received byte ranges (start → end, exclusive, within the piece)
    /// of the pieces partly here, and how many ranges in all.
    filling: BTreeMap<u32, BTreeMap<u64, u64>>,
    ranges: usize,
    /// Complete pieces whose hash has not come yet.
    complete: BTreeSet<u32>,
    verified_count: u32,
    verified: u64,
    phase: Phase,
    /// Pieces that failed their check, in all.
    bad: u32,
}

/// A transfer whose pieces fail their check this often ends: the sender's
/// file is changing, or its disk is failing, and fetching again won't help.
const MAX_BAD_PIECES: u32 = 8;

impl Incoming {
    /// An offer, nothing received yet. `piece_size` is at least 1 and the
    /// piece count was checked by the caller.
    fn new(path: String, size: u64, piece_size: u32, hash: [u8; 32]) -> Self {
        let piece_size = piece_size.max(1);
        Incoming {
            path,
            size,
            piece_size,
            hash,
            piece_hashes: Vec::new(),
            hashes_have: 0,
            hashes_ok: false,
            pieces: Vec::new(),
            filling: BTreeMap::new(),
            ranges: 0,
            complete: BTreeSet::new(),
            verified_count: 0,
            verified: 0,
            phase: Phase::Offered,
            bad: 0,
        }
    }

    /// The per-piece state, once accepted.
    fn allocate(&mut self) {
        let n = piece_count(self.size, self.piece_size) as usize;
        if self.pieces.len() != n {
            self.piece_hashes = vec![None; n];
            self.hashes_have = 0;
            self.pieces = vec![FILLING; n];
            self.filling.clear();
            self.ranges = 0;
            self.complete.clear();
            self.verified_count = 0;
        }
    }

    fn verified_pieces(&self) -> Vec<bool> {
        self.pieces.iter().map(|p| *p == VERIFIED).collect()
    }

    /// What an `Accept` says we hold: the verified pieces as ranges, as
    /// many as the frame takes.
    fn have(&self) -> Vec<(u32, u32)> {
        let mut have = to_ranges(&self.verified_pieces());
        have.truncate(MAX_RANGES);
        have
    }

    fn all_verified(&self) -> bool {
        self.verified_count as usize == self.pieces.len()
    }

    /// Piece `piece` is verified (it was not).
    fn mark_verified(&mut self, piece: u32) {
        self.pieces[piece as usize] = VERIFIED;
        self.verified_count += 1;
        let (s, e) = piece_range(self.size, self.piece_size, piece);
        self.verified += e - s;
    }

    /// Piece `piece` starts over (it failed its check, or was scattered).
    fn refill(&mut self, piece: u32) {
        self.pieces[piece as usize] = FILLING;
        self.complete.remove(&piece);
        if let Some(r) = self.filling.remove(&piece) {
            self.ranges -= r.len();
        }
    }
}

/// What a flow packet carried, to act on its fate.
enum Carried {
    Control(FlowFrame),
    /// Chat frames sent together ([`PeerToPeer::Frames`]).
    Frames(Vec<FlowFrame>),
    Data {
        id: u64,
        offset: u64,
        len: usize,
    },
    /// A path MTU probe.
    Probe,
}

/// Chat and file transfers with one peer, over one flow.
pub struct PeerFlow {
    flow: Flow,
    /// Chat messages with this peer, carried by the same flow.
    chat: Reliable,
    pmtud: Pmtud,
    /// The path the session uses, as last told by the owner.
    path: Option<SocketAddr>,
    /// Our flow's epoch, and the peer's as last seen.
    epoch: u32,
    peer_epoch: Option<u32>,
    /// The peer's earlier epochs: their late packets are dropped, not
    /// taken for yet another restart.
    old_epochs: VecDeque<u32>,
    rng: rand::rngs::StdRng,
    outgoing: BTreeMap<u64, Outgoing>,
    incoming: BTreeMap<u64, Incoming>,
    control: VecDeque<FlowFrame>,
    carried: BTreeMap<u64, Carried>,
    /// The sending transfer whose turn is next.
    turn: u64,
    events: VecDeque<TransferEvent>,
    disk: VecDeque<DiskWork>,
    buf: Vec<u8>,
    /// `Skipped` frames taken (each leaves a record with the owner), and
    /// those dropped past [`MAX_SKIPPED`].
    skipped: usize,
    pub skipped_dropped: u64,
}

/// `Skipped` notices taken from one peer while this flow lives (the
/// daemon's run): each becomes a record, so a peer cannot make more.
pub const MAX_SKIPPED: usize = 10_000;

impl PeerFlow {
    /// `seed` draws the flow epochs (fresh randomness in production);
    /// `chat_recv_next`: every chat message below it was delivered before.
    pub fn new(seed: u64, chat_recv_next: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self {
            flow: Flow::new(pmtud::BASE),
            chat: Reliable::new(chat_recv_next),
            pmtud: Pmtud::new(pmtud::BASE),
            path: None,
            epoch: rng.gen(),
            peer_epoch: None,
            old_epochs: VecDeque::new(),
            rng,
            outgoing: BTreeMap::new(),
            incoming: BTreeMap::new(),
            control: VecDeque::new(),
            carried: BTreeMap::new(),
            turn: 0,
            events: VecDeque::new(),
            disk: VecDeque::new(),
            buf: vec![0; MAX_FILE_DATA_LARGE],
            skipped: 0,
            skipped_dropped: 0,
        }
    }

    /// Queues a chat message (sent before any file data).
    pub fn send_chat(&mut self, msg: ChatMessage) {
        self.chat.push(msg);
    }

    /// Chat messages not yet acknowledged.
    pub fn chat_pending(&self) -> usize {
        self.chat.pending()
    }

    #[must_use]
    pub fn poll_chat_event(&mut self) -> Option<ReliableEvent> {
        self.chat.poll_event()
    }

    /// Whether anything here needs a session with the peer.
    pub fn wants_session(&self) -> bool {
        self.chat.pending() > 0
            || !self.control.is_empty()
            || self
                .outgoing
                .values()
                .any(|t| matches!(t.phase, Phase::Offered | Phase::Active | Phase::Finishing))
            || self
                .incoming
                .values()
                .any(|t| matches!(t.phase, Phase::Active | Phase::Finishing))
    }

    pub fn flow(&self) -> &Flow {
        &self.flow
    }

    /// The largest datagram proven on the path so far.
    #[cfg(test)]
    pub fn datagram_size(&self) -> usize {
        self.pmtud.current()
    }

    /// The session's path, and the largest datagram it may carry (a relay
    /// carries only the base size). A new path starts the path MTU search
    /// over.
    pub fn set_path(&mut self, path: SocketAddr, ceiling: usize) {
        if self.path == Some(path) && self.pmtud.ceiling() == ceiling {
            return;
        }
        self.path = Some(path);
        self.pmtud.new_path(ceiling);
        self.flow.set_mss(pmtud::BASE);
    }

    /// Offers a file (the owner has hashed it per piece of
    /// `file.piece_size`; `file.hash` is [`file_hash`] of `piece_hashes`).
    pub fn offer(&mut self, file: FileDesc, piece_hashes: Vec<[u8; 32]>) {
        let FileDesc {
            id: TransferId(id),
            path,
            size,
            piece_size,
            hash,
            group,
        } = file;
        let group = Group::to_wire(group);
        self.control.push_back(FlowFrame::Offer {
            id,
            path: path.clone(),
            size,
            piece_size,
            hash,
            group: group.0,
            group_files: group.1,
        });
        self.outgoing.insert(
            id,
            Outgoing {
                path,
                size,
                piece_size,
                hash,
                piece_hashes,
                group,
                phase: Phase::Offered,
                todo: VecDeque::new(),
                resend: VecDeque::new(),
                hashes_next: 0,
                acked: 0,
                unacked: 0,
            },
        );
    }

    /// Takes an offered file; `have` marks pieces already held and
    /// verified (from an earlier, interrupted run).
    pub fn accept(&mut self, id: TransferId, have: &[bool]) -> bool {
        let id = id.0;
        let Some(t) = self.incoming.get_mut(&id) else {
            return false;
        };
        if matches!(t.phase, Phase::Done | Phase::Ended) {
            return false;
        }
        t.allocate();
        for (i, h) in have.iter().enumerate().take(t.pieces.len()) {
            if *h && t.pieces[i] != VERIFIED {
                t.refill(i as u32);
                t.mark_verified(i as u32);
            }
        }
        t.phase = Phase::Active;
        let have = t.have();
        self.control.push_back(FlowFrame::Accept { id, have });
        self.check_all_verified(id);
        true
    }

    /// Takes up an incoming transfer again after a restart, from what the
    /// owner stored: the offer, and the pieces it holds verified. The
    /// sender is told at once (and again whenever a session comes up).
    pub fn restore_incoming(&mut self, file: FileDesc, have: &[bool]) {
        let id = file.id;
        self.restore_offer(file);
        self.accept(id, have);
    }

    /// An offer waiting for the user, known from before a restart: it can
    /// be accepted at once (the sender's repeat of it is then a no-op).
    pub fn restore_offer(&mut self, file: FileDesc) {
        self.incoming.insert(
            file.id.0,
            Incoming::new(file.path, file.size, file.piece_size, file.hash),
        );
    }

    /// Tells the peer that file `id` of directory `group` will not be
    /// offered (we could not read it), so it does not wait for it.
    pub fn skip(&mut self, id: TransferId, path: String, group: Group, reason: &str) {
        self.control.push_back(FlowFrame::Skipped {
            id: id.0,
            path,
            group: group.id.0,
            group_files: group.files,
            reason: reason.to_owned(),
        });
    }

    /// The peer offers again a file we already received (our `Done` was
    /// lost): tell it again, and forget the offer.
    pub fn already_have(&mut self, id: TransferId) {
        let id = id.0;
        self.incoming.remove(&id);
        self.control.push_back(FlowFrame::Done { id });
    }

    /// Pauses incoming transfer `id` (the owner cannot write it: a full
    /// disk): what was not verified is dropped and will be fetched again,
    /// and the sender is told to stop sending until [`Self::resume`].
    pub fn pause(&mut self, id: TransferId, reason: &str) -> bool {
        let Some(t) = self.incoming.get_mut(&id.0) else {
            return false;
        };
        if !matches!(t.phase, Phase::Active | Phase::Paused) {
            return false;
        }
        t.phase = Phase::Paused;
        for p in 0..t.pieces.len() as u32 {
            if t.pieces[p as usize] != VERIFIED {
                t.refill(p);
            }
        }
        let id = id.0;
        self.control.retain(|f| f.id() != id);
        self.control.push_back(FlowFrame::Pause {
            id,
            reason: reason.to_owned(),
        });
        true
    }

    /// Resumes paused incoming transfer `id`: the sender is told what we
    /// hold, and sends the rest.
    pub fn resume(&mut self, id: TransferId) -> bool {
        let Some(t) = self.incoming.get_mut(&id.0) else {
            return false;
        };
        if t.phase != Phase::Paused {
            return false;
        }
        t.phase = Phase::Active;
        let have = t.have();
        // A `Pause` still queued or in flight must not be sent again after
        // this `Accept` (a lost one is resent out of order): it would
        // pause the sender for good.
        let id = id.0;
        let pause = |f: &FlowFrame| matches!(f, FlowFrame::Pause { id: i, .. } if *i == id);
        self.control.retain(|f| !pause(f));
        self.carried
            .retain(|_, c| !matches!(c, Carried::Control(f) if pause(f)));
        self.control.push_back(FlowFrame::Accept { id, have });
        true
    }

    /// Tells the peer that transfer `id`, which this side no longer holds
    /// (it ended while the daemon was down), is over.
    pub fn tell_ended(&mut self, id: TransferId, reason: &str) {
        let id = id.0;
        if !self.cancel_raw(id, reason) {
            self.control.push_back(FlowFrame::Cancel {
                id,
                reason: reason.to_owned(),
            });
        }
    }

    /// Cancels (or declines) a transfer in either direction.
    pub fn cancel(&mut self, id: TransferId, reason: &str) -> bool {
        self.cancel_raw(id.0, reason)
    }

    fn cancel_raw(&mut self, id: u64, reason: &str) -> bool {
        let known = self.outgoing.contains_key(&id) || self.incoming.contains_key(&id);
        if !known
            || self
                .phase(id)
                .is_some_and(|p| matches!(p, Phase::Done | Phase::Ended))
        {
            return false;
        }
        self.end(id, reason.to_owned());
        self.control.push_back(FlowFrame::Cancel {
            id,
            reason: reason.to_owned(),
        });
        true
    }

    fn phase(&self, id: u64) -> Option<Phase> {
        self.outgoing
            .get(&id)
            .map(|t| t.phase)
            .or_else(|| self.incoming.get(&id).map(|t| t.phase))
    }

    fn end(&mut self, id: u64, reason: String) {
        if let Some(t) = self.outgoing.get_mut(&id) {
            t.phase = Phase::Ended;
            t.todo.clear();
            t.resend.clear();
        }
        if let Some(t) = self.incoming.get_mut(&id) {
            t.phase = Phase::Ended;
        }
        self.control.retain(|f| f.id() != id);
        self.events.push_back(TransferEvent::Ended {
            id: TransferId(id),
            reason,
        });
    }

    /// The owner's check of a piece it was asked to verify.
    pub fn piece_checked(&mut self, id: TransferId, piece: u32, ok: bool) {
        let id = id.0;
        let Some(t) = self.incoming.get_mut(&id) else {
            return;
        };
        if t.pieces.get(piece as usize) != Some(&CHECKING) || t.phase != Phase::Active {
            return;
        }
        if ok {
            t.mark_verified(piece);
            let done = t.verified;
            self.events.push_back(TransferEvent::Progress {
                id: TransferId(id),
                done,
            });
            self.check_all_verified(id);
        } else {
            tracing::info!(id = format_args!("{id:x}"), piece, "TRANSFER(BAD_PIECE)");
            t.refill(piece);
            t.bad += 1;
            if t.bad > MAX_BAD_PIECES {
                let reason = "pieces keep failing their check: the sender's file is changing";
                self.cancel_raw(id, reason);
                return;
            }
            self.control.push_back(FlowFrame::BadPiece { id, piece });
        }
    }

    fn check_all_verified(&mut self, id: u64) {
        let Some(t) = self.incoming.get_mut(&id) else {
            return;
        };
        if t.phase == Phase::Active && t.all_verified() {
            // Verified pieces were checked against hashes that matched the
            // offer (before a restart too); an empty file has no pieces,
            // and its hash is that of no piece hashes.
            if t.pieces.is_empty() && t.hash != file_hash(&[]) {
                self.cancel_raw(id, "the empty file does not match the offered hash");
                return;
            }
            t.phase = Phase::Finishing;
            self.disk
                .push_back(DiskWork::VerifyFile { id: TransferId(id) });
        }
    }

    /// The owner's check of the whole file: `Ok` once it is durable under
    /// its final name.
    pub fn file_checked(&mut self, id: TransferId, result: Result<(), String>) {
        let id = id.0;
        let Some(t) = self.incoming.get_mut(&id) else {
            return;
        };
        if t.phase != Phase::Finishing {
            return;
        }
        match result {
            Ok(()) => {
                t.phase = Phase::Done;
                self.control.push_back(FlowFrame::Done { id });
                self.events
                    .push_back(TransferEvent::Finished { id: TransferId(id) });
            }
            Err(reason) => {
                self.end(id, reason.clone());
                self.control.push_back(FlowFrame::Cancel { id, reason });
            }
        }
    }

    /// A new session with the peer: what was in flight is gone with the
    /// old one, and the peer may have restarted. Start a fresh flow, send
    /// lost frames again, and ask for what incoming transfers still lack.
    pub fn session_restarted(&mut self) {
        use rand::Rng;
        self.flow = Flow::new(pmtud::BASE);
        self.pmtud.new_path(self.pmtud.ceiling());
        self.epoch = self.rng.gen();
        // The peer's flow may go on under the new session (it saw no
        // restart): accept whatever epoch comes next. Only a switch seen
        // within a flow retires an epoch.
        self.peer_epoch = None;
        // Chat goes again from its own state (below), the rest as it was.
        self.forget_chat_frames();
        for (_, c) in std::mem::take(&mut self.carried) {
            match c {
                Carried::Control(f) => self.control.push_back(f),
                Carried::Frames(fs) => self.control.extend(fs),
                Carried::Data { id, offset, len } => {
                    if let Some(t) = self.outgoing.get_mut(&id) {
                        t.resend.push_back((offset, len));
                        t.unacked = 0;
                    }
                }
                Carried::Probe => {}
            }
        }
        for t in self.outgoing.values_mut() {
            t.unacked = 0;
        }
        self.chat.restart();
        self.announce();
    }

    /// Chat frames queued or in flight are forgotten: the chat sends what
    /// is still unacknowledged again from its own state
    /// ([`Reliable::restart`]).
    fn forget_chat_frames(&mut self) {
        self.control.retain(|f| !f.is_chat());
        self.carried.retain(|_, c| match c {
            Carried::Control(f) => !f.is_chat(),
            Carried::Frames(fs) => !fs.iter().all(FlowFrame::is_chat),
            _ => true,
        });
    }

    /// Offers not yet answered and incoming transfers under way are
    /// announced again (after a session or peer restart); the other side
    /// treats repeats as no-ops.
    fn announce(&mut self) {
        let offers: Vec<FlowFrame> = self
            .outgoing
            .iter()
            .filter(|(_, t)| t.phase == Phase::Offered)
            .map(|(id, t)| FlowFrame::Offer {
                id: *id,
                path: t.path.clone(),
                size: t.size,
                piece_size: t.piece_size,
                hash: t.hash,
                group: t.group.0,
                group_files: t.group.1,
            })
            .collect();
        for f in offers {
            if !self.control.contains(&f) {
                self.control.push_back(f);
            }
        }
        let accepts: Vec<FlowFrame> = self
            .incoming
            .iter()
            .filter(|(_, t)| t.phase == Phase::Active)
            .map(|(id, t)| {
                let have = t.have();
                FlowFrame::Accept { id: *id, have }
            })
            .collect();
        self.control.extend(accepts);
    }

    pub fn status(&self) -> Vec<TransferStatus> {
        let out = self.outgoing.iter().map(|(id, t)| TransferStatus {
            id: TransferId(*id),
            direction: Direction::Send,
            phase: t.phase,
            path: t.path.clone(),
            size: t.size,
            done: t.acked.min(t.size),
        });
        let inc = self.incoming.iter().map(|(id, t)| TransferStatus {
            id: TransferId(*id),
            direction: Direction::Receive,
            phase: t.phase,
            path: t.path.clone(),
            size: t.size,
            done: t.verified,
        });
        out.chain(inc).collect()
    }

    /// One transfer's status, without listing them all.
    pub fn status_of(&self, id: TransferId) -> Option<TransferStatus> {
        if let Some(t) = self.outgoing.get(&id.0) {
            return Some(TransferStatus {
                id,
                direction: Direction::Send,
                phase: t.phase,
                path: t.path.clone(),
                size: t.size,
                done: t.acked.min(t.size),
            });
        }
        self.incoming.get(&id.0).map(|t| TransferStatus {
            id,
            direction: Direction::Receive,
            phase: t.phase,
            path: t.path.clone(),
            size: t.size,
            done: t.verified,
        })
    }

    /// Forgets finished and ended transfers (the owner keeps their record).
    pub fn forget(&mut self, id: TransferId) {
        self.outgoing.remove(&id.0);
        self.incoming.remove(&id.0);
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<TransferEvent> {
        self.events.pop_front()
    }

    /// The next disk work, in order (before the events that follow it).
    #[must_use]
    pub fn poll_disk(&mut self) -> Option<DiskWork> {
        self.disk.pop_front()
    }

    /// A flow packet or acknowledgement from the peer.
    pub fn handle(&mut self, now: Instant, msg: PeerToPeer) {
        match msg {
            PeerToPeer::FlowAck {
                epoch,
                delay_us,
                ranges,
            } => {
                if epoch != self.epoch {
                    return; // for a flow of ours that is gone
                }
                let ack = AckFrame {
                    ranges,
                    delay: Duration::from_micros(delay_us as u64),
                };
                self.flow.on_ack(now, &ack);
                self.drain_flow(now);
            }
            PeerToPeer::Flow { epoch, pn, frame } => self.on_flow(now, epoch, pn, [frame]),
            PeerToPeer::Frames { epoch, pn, frames } => self.on_flow(now, epoch, pn, frames),
            _ => {}
        }
    }

    /// Frames of a flow packet of the peer's: a new epoch first restarts
    /// what the peer may have forgotten.
    fn on_flow(
        &mut self,
        now: Instant,
        epoch: u32,
        pn: u64,
        frames: impl IntoIterator<Item = FlowFrame>,
    ) {
        if self.old_epochs.contains(&epoch) {
            return;
        }
        if self.peer_epoch != Some(epoch) {
            // The peer's flow is new (its session or its daemon
            // restarted): its numbers start again, and it may have
            // forgotten what we told it. Our own flow goes on (its
            // packets the peer lost are declared lost and sent
            // again); changing it too would make the peer restart
            // in turn, and so on.
            if let Some(old) = self.peer_epoch.replace(epoch) {
                self.old_epochs.push_back(old);
                if self.old_epochs.len() > 8 {
                    self.old_epochs.pop_front();
                }
                self.flow.reset_receiving();
                self.announce();
                // It may have lost what it held of our messages:
                // all go again, from the chat's state alone.
                self.forget_chat_frames();
                self.chat.restart();
            }
        }
        if self.flow.on_received(now, pn, true) {
            for frame in frames {
                self.on_frame(frame);
            }
        }
    }

    fn drain_flow(&mut self, now: Instant) {
        while let Some(ev) = self.flow.poll_event() {
            match ev {
                FlowEvent::Acked(pn) => match self.carried.remove(&pn) {
                    Some(Carried::Data { id, len, .. }) => {
                        if let Some(t) = self.outgoing.get_mut(&id) {
                            t.acked += len as u64;
                            t.unacked = t.unacked.saturating_sub(len);
                            let done = t.acked.min(t.size);
                            self.events.push_back(TransferEvent::Progress {
                                id: TransferId(id),
                                done,
                            });
                            if t.phase == Phase::Active
                                && t.todo.is_empty()
                                && t.resend.is_empty()
                                && t.unacked == 0
                            {
                                t.phase = Phase::Finishing;
                            }
                        }
                    }
                    Some(Carried::Probe) => {
                        if let Some(size) = self.pmtud.on_acked(pn) {
                            tracing::debug!(size, "PMTU(RAISED)");
                            self.flow.set_mss(size);
                        }
                    }
                    Some(Carried::Control(_) | Carried::Frames(_)) | None => {}
                },
                FlowEvent::Lost(pn) => match self.carried.remove(&pn) {
                    // What an ended transfer still owes the peer (its
                    // cancel, its done) goes again; the rest is moot.
                    Some(Carried::Control(f))
                        if matches!(f, FlowFrame::Cancel { .. } | FlowFrame::Done { .. })
                            || !matches!(self.phase(f.id()), Some(Phase::Ended)) =>
                    {
                        self.control.push_back(f)
                    }
                    Some(Carried::Control(_)) => {}
                    // (Chat: its frames go again one by one.)
                    Some(Carried::Frames(fs)) => self.control.extend(fs),
                    Some(Carried::Probe) => self.pmtud.on_lost(now, pn),
                    Some(Carried::Data { id, offset, len }) => {
                        if let Some(t) = self.outgoing.get_mut(&id) {
                            t.unacked = t.unacked.saturating_sub(len);
                            if t.phase == Phase::Active || t.phase == Phase::Finishing {
                                t.phase = Phase::Active;
                                t.resend.push_back((offset, len));
                            }
                        }
                    }
                    None => {}
                },
            }
        }
    }

    fn on_frame(&mut self, frame: FlowFrame) {
        match frame {
            FlowFrame::Offer {
                id,
                path,
                size,
                piece_size,
                hash,
                group,
                group_files,
            } => {
                if let Some(t) = self.incoming.get(&id) {
                    // Offered again: the sender restarted, or our answer
                    // was lost with a session. Tell it where we are.
                    match t.phase {
                        Phase::Active => {
                            let have = t.have();
                            self.control.push_back(FlowFrame::Accept { id, have });
                        }
                        Phase::Done => self.control.push_back(FlowFrame::Done { id }),
                        Phase::Paused => self.control.push_back(FlowFrame::Pause {
                            id,
                            reason: "paused by the receiver".into(),
                        }),
                        Phase::Offered | Phase::Finishing | Phase::Ended => {}
                    }
                    return;
                }
                if self.outgoing.contains_key(&id) || id == 0 {
                    return; // 0 names no transfer (chat frames carry it)
                }
                let pending = self
                    .incoming
                    .values()
                    .filter(|t| t.phase == Phase::Offered)
                    .count();
                let refusal = if piece_size == 0 || piece_size > MAX_PIECE_SIZE {
                    Some(format!("unsupported piece size {piece_size}"))
                } else if piece_size < MIN_PIECE_SIZE && size > piece_size as u64 {
                    Some(format!(
                        "pieces of {piece_size} bytes: at least {MIN_PIECE_SIZE} (but a file of one piece)"
                    ))
                } else if size.div_ceil(piece_size as u64) > MAX_PIECES {
                    Some(format!(
                        "more than {MAX_PIECES} pieces: file too large for its piece size"
                    ))
                } else if pending >= MAX_PENDING_OFFERS {
                    Some(format!(
                        "too many offers waiting for an answer ({MAX_PENDING_OFFERS}); offer again once some are answered"
                    ))
                } else {
                    None
                };
                if let Some(reason) = refusal {
                    tracing::info!(
                        id = format_args!("{id:x}"),
                        reason,
                        "TRANSFER(OFFER_REFUSED)"
                    );
                    self.control.push_back(FlowFrame::Cancel { id, reason });
                    return;
                }
                self.incoming
                    .insert(id, Incoming::new(path.clone(), size, piece_size, hash));
                self.events.push_back(TransferEvent::Offered(FileDesc {
                    id: TransferId(id),
                    path,
                    size,
                    piece_size,
                    hash,
                    group: Group::from_wire(group, group_files),
                }));
            }
            FlowFrame::Accept { id, have } => {
                let Some(t) = self.outgoing.get_mut(&id) else {
                    return;
                };
                if matches!(t.phase, Phase::Done | Phase::Ended) {
                    return;
                }
                let first = t.phase == Phase::Offered;
                let resumed = t.phase == Phase::Paused;
                // What the receiver holds; everything else is sent (again).
                let n = piece_count(t.size, t.piece_size);
                let held = |p: u32| have.iter().any(|(a, b)| (*a..=*b).contains(&p));
                t.todo.clear();
                t.resend.clear();
                for p in (0..n).filter(|p| !held(*p)) {
                    let (s, e) = piece_range(t.size, t.piece_size, p);
                    match t.todo.back_mut() {
                        Some((_, end)) if *end == s => *end = e,
                        _ => t.todo.push_back((s, e)),
                    }
                }
                t.acked = (0..n)
                    .filter(|p| held(*p))
                    .map(|p| {
                        let (s, e) = piece_range(t.size, t.piece_size, p);
                        e - s
                    })
                    .sum();
                t.hashes_next = 0;
                t.phase = if t.todo.is_empty() {
                    Phase::Finishing
                } else {
                    Phase::Active
                };
                if first {
                    self.events
                        .push_back(TransferEvent::Accepted { id: TransferId(id) });
                }
                if resumed {
                    self.events
                        .push_back(TransferEvent::Resumed { id: TransferId(id) });
                }
            }
            FlowFrame::Pause { id, reason } => {
                let Some(t) = self.outgoing.get_mut(&id) else {
                    return;
                };
                if !matches!(t.phase, Phase::Active | Phase::Finishing) {
                    return;
                }
                t.phase = Phase::Paused;
                t.todo.clear();
                t.resend.clear();
                self.control.retain(|f| f.id() != id);
                self.events.push_back(TransferEvent::Paused {
                    id: TransferId(id),
                    reason: format!("the peer: {reason}"),
                });
            }
            FlowFrame::Cancel { id, reason } => {
                if self
                    .phase(id)
                    .is_some_and(|p| !matches!(p, Phase::Done | Phase::Ended))
                {
                    self.end(id, format!("the peer: {reason}"));
                }
            }
            FlowFrame::Hashes { id, first, hashes } => {
                let Some(t) = self.incoming.get_mut(&id) else {
                    return;
                };
                if t.hashes_ok || t.phase != Phase::Active {
                    return; // known already, or not asked for
                }
                for (i, h) in hashes.into_iter().enumerate() {
                    let Some(slot) = t.piece_hashes.get_mut(first as usize + i) else {
                        break;
                    };
                    if slot.replace(h).is_none() {
                        t.hashes_have += 1;
                    }
                }
                // Checked once, when the last arrives (not per frame: a
                // long list would make that quadratic).
                if t.hashes_have < t.piece_hashes.len() {
                    return;
                }
                let all: Vec<[u8; 32]> = t.piece_hashes.iter().flatten().copied().collect();
                if file_hash(&all) != t.hash {
                    self.cancel_raw(id, "the piece hashes do not match the offered file hash");
                    return;
                }
                t.hashes_ok = true;
                self.verify_ready(id);
            }
            FlowFrame::Data { id, offset, data } => self.on_data(id, offset, data),
            FlowFrame::BadPiece { id, piece } => {
                let Some(t) = self.outgoing.get_mut(&id) else {
                    return;
                };
                if piece >= piece_count(t.size, t.piece_size) || t.phase == Phase::Ended {
                    return;
                }
                let (s, e) = piece_range(t.size, t.piece_size, piece);
                t.todo.push_front((s, e));
                t.acked = t.acked.saturating_sub(e - s);
                t.phase = Phase::Active;
            }
            FlowFrame::Padding { .. } => {}
            FlowFrame::Skipped {
                id,
                path,
                group,
                group_files,
                reason,
            } => {
                if self.skipped >= MAX_SKIPPED {
                    self.skipped_dropped += 1;
                    tracing::debug!(id = format_args!("{id:x}"), "TRANSFER(SKIPPED_DROPPED)");
                } else if !self.incoming.contains_key(&id) && !self.outgoing.contains_key(&id) {
                    self.skipped += 1;
                    if let Some(group) = Group::from_wire(group, group_files) {
                        self.events.push_back(TransferEvent::Skipped {
                            id: TransferId(id),
                            path,
                            group,
                            reason,
                        });
                    }
                }
            }
            FlowFrame::Chat {
                seq,
                base,
                sent_ms,
                offset,
                total,
                body,
            } => self
                .chat
                .handle_message(seq, base, sent_ms, (offset, total), body),
            FlowFrame::ChatAck { upto } => self.chat.handle_ack(upto),
            FlowFrame::Done { id } => {
                if let Some(t) = self.outgoing.get_mut(&id) {
                    if t.phase != Phase::Done && t.phase != Phase::Ended {
                        t.phase = Phase::Done;
                        t.acked = t.size;
                        let (f, cc) = (&self.flow.stats, self.flow.controller());
                        tracing::debug!(
                            id = format_args!("{id:x}"),
                            sent = f.sent_packets,
                            lost = f.lost_packets,
                            ptos = f.ptos,
                            datagram = self.pmtud.current(),
                            bw_mbit = cc.bandwidth() * 8e-6,
                            min_rtt = ?cc.min_rtt(),
                            "FLOW(STATS)"
                        );
                        self.events
                            .push_back(TransferEvent::Finished { id: TransferId(id) });
                    }
                }
            }
        }
    }

    fn on_data(&mut self, id: u64, offset: u64, data: Vec<u8>) {
        let Some(t) = self.incoming.get_mut(&id) else {
            return;
        };
        if t.phase != Phase::Active || data.is_empty() {
            return;
        }
        let end = offset.saturating_add(data.len() as u64);
        let piece = (offset / t.piece_size as u64) as u32;
        let (ps, pe) = piece_range(t.size, t.piece_size, piece);
        // Data must lie inside one piece of the file.
        if end > pe || offset < ps || end > t.size {
            return;
        }
        if t.pieces.get(piece as usize) != Some(&FILLING) {
            return; // complete or verified already: a duplicate
        }
        let got = t.filling.entry(piece).or_default();
        let (s, e) = (offset - ps, end - ps);
        // Merge [s, e) into the received ranges.
        let mut start = s;
        let mut stop = e;
        // The ranges touching [s, e) are the last ones starting at or
        // before e (they are disjoint and sorted): walk back from there,
        // not from the piece's start.
        let overlapping: Vec<(u64, u64)> = got
            .range(..=e)
            .rev()
            .take_while(|(_, b)| **b >= s)
            .map(|(a, b)| (*a, *b))
            .collect();
        let before = got.len();
        for (a, b) in overlapping {
            start = start.min(a);
            stop = stop.max(b);
            got.remove(&a);
        }
        got.insert(start, stop);
        let complete = got.get(&0) == Some(&(pe - ps));
        t.ranges = t.ranges + got.len() - before;
        if t.ranges > MAX_RANGES_HELD {
            // Scattered fragments: this piece again, whole.
            tracing::debug!(
                id = format_args!("{id:x}"),
                piece,
                "TRANSFER(SCATTERED_PIECE)"
            );
            t.refill(piece);
            self.control.push_back(FlowFrame::BadPiece { id, piece });
            return;
        }
        self.disk.push_back(DiskWork::Write {
            id: TransferId(id),
            offset,
            data,
        });
        if complete {
            t.refill(piece);
            t.pieces[piece as usize] = COMPLETE;
            t.complete.insert(piece);
            self.verify_ready(id);
        }
    }

    /// Asks the owner to check complete pieces whose hash is known.
    fn verify_ready(&mut self, id: u64) {
        let Some(t) = self.incoming.get_mut(&id).filter(|t| t.hashes_ok) else {
            return;
        };
        // Only the complete pieces waiting: no walk over every piece.
        let ready: Vec<(u32, [u8; 32])> = t
            .complete
            .iter()
            .filter_map(|&i| Some((i, t.piece_hashes[i as usize]?)))
            .collect();
        for (i, hash) in ready {
            t.complete.remove(&i);
            t.pieces[i as usize] = CHECKING;
            let (s, e) = piece_range(t.size, t.piece_size, i);
            self.disk.push_back(DiskWork::VerifyPiece {
                id: TransferId(id),
                piece: i,
                offset: s,
                len: e - s,
                hash,
            });
        }
    }

    /// Whether file data waits to be sent (what makes a larger packet
    /// worth probing for).
    fn data_waiting(&self) -> bool {
        self.chat.bytes_waiting() >= CHAT_PROBE_BYTES
            || self
                .outgoing
                .values()
                .any(|t| t.phase == Phase::Active && (!t.todo.is_empty() || !t.resend.is_empty()))
    }

    fn wants_to_send(&self) -> bool {
        self.chat.wants_to_send()
            || !self.control.is_empty()
            || self.outgoing.values().any(|t| {
                t.phase == Phase::Active
                    && (!t.todo.is_empty()
                        || !t.resend.is_empty()
                        || (t.hashes_next as usize) < t.piece_hashes.len())
            })
    }

    /// The next packet to send now, if the flow lets one go: an
    /// acknowledgement first, then control frames, chat, then hashes and
    /// data, one transfer after another.
    pub fn poll_packet(&mut self, now: Instant, src: &mut dyn FileSource) -> Option<PeerToPeer> {
        self.poll(now, Some(src))
    }

    /// Like [`PeerFlow::poll_packet`] but without file data (no source
    /// at hand): acknowledgements, control frames and chat.
    pub fn poll_control(&mut self, now: Instant) -> Option<PeerToPeer> {
        self.poll(now, None)
    }

    fn poll(&mut self, now: Instant, src: Option<&mut dyn FileSource>) -> Option<PeerToPeer> {
        if let Some(ack) = self.flow.poll_ack(now) {
            return Some(PeerToPeer::FlowAck {
                epoch: self.peer_epoch.unwrap_or(0),
                delay_us: ack.delay.as_micros().min(u32::MAX as u128) as u32,
                ranges: ack.ranges,
            });
        }
        if !self.wants_to_send() {
            if self.flow.outstanding() == 0 {
                self.flow.set_app_limited();
            }
            return None;
        }
        let probe = self.pmtud.probe_size(now).filter(|_| self.data_waiting());
        if let Some(size) = probe.filter(|_| src.is_some()) {
            // Padding fills the datagram: flow and frame headers, the
            // padding's length, the packet header and the AEAD tag.
            let len = size - (1 + 4 + 8 + 1 + 2) - crate::wire::DATA_HEADER_LEN - 16;
            let pn = self.flow.on_sent_probe(now, size);
            self.pmtud.on_probe_sent(pn);
            self.carried.insert(pn, Carried::Probe);
            return Some(PeerToPeer::Flow {
                epoch: self.epoch,
                pn,
                frame: FlowFrame::Padding { len: len as u16 },
            });
        }
        if self.flow.send_time(now, self.pmtud.current()) != Some(now) {
            return None;
        }
        // (Chat frames sent again after a loss wait in `control`: they
        // are packed together too.)
        if self.control.front().is_some_and(FlowFrame::is_chat) {
            return self.chat_packet(now);
        }
        if let Some(frame) = self.control.pop_front() {
            return Some(self.send_frame(now, frame));
        }
        if self.chat.wants_to_send() {
            return self.chat_packet(now);
        }
        let src = src?;
        // Round robin over active senders, starting after the last turn.
        let ids: Vec<u64> = self
            .outgoing
            .range(self.turn.wrapping_add(1)..)
            .chain(self.outgoing.range(..=self.turn))
            .filter(|(_, t)| t.phase == Phase::Active)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = self.next_from(now, id, src) {
                self.turn = id;
                return Some(p);
            }
        }
        self.flow.set_app_limited();
        None
    }

    /// Chat frames, as many as one packet takes (one packet a message
    /// would cost a datagram, a seal and an acknowledgement each).
    fn chat_packet(&mut self, now: Instant) -> Option<PeerToPeer> {
        // What the packet's inner message may hold after its header.
        let room = self
            .pmtud
            .current()
            .saturating_sub(crate::wire::DATA_HEADER_LEN + 16 + FRAMES_HEADER);
        let mut frames = Vec::new();
        let mut used = 0;
        // First what goes again, then what is new. A part sent in a
        // larger packet than the path now carries (a black hole, the
        // relay) is cut again to fit.
        while frames.len() < crate::wire::MAX_FRAMES {
            match self.control.front().filter(|f| f.is_chat()).map(chat_len) {
                Some(len) if used + len <= room => {}
                Some(_) if frames.is_empty() => {
                    let frame = self.control.pop_front().expect("checked");
                    let (head, tail) = cut_part(frame, room);
                    if let Some(tail) = tail {
                        self.control.push_front(tail);
                    }
                    used += chat_len(&head);
                    frames.push(head);
                    break;
                }
                _ => break,
            }
            let frame = self.control.pop_front().expect("checked");
            used += chat_len(&frame);
            frames.push(frame);
        }
        // Then new frames, a long message's parts cut to what is left.
        while frames.len() < crate::wire::MAX_FRAMES {
            let Some(frame) = self.chat.poll_frame(room.saturating_sub(used)) else {
                break;
            };
            used += chat_len(&frame);
            frames.push(frame);
        }
        if frames.is_empty() {
            return None;
        }
        let pn = self.flow.on_sent(now, used + CHAT_OVERHEAD, true);
        Some(match frames.len() {
            1 => {
                let frame = frames.pop().expect("one");
                self.carried.insert(pn, Carried::Control(frame.clone()));
                PeerToPeer::Flow {
                    epoch: self.epoch,
                    pn,
                    frame,
                }
            }
            _ => {
                self.carried.insert(pn, Carried::Frames(frames.clone()));
                PeerToPeer::Frames {
                    epoch: self.epoch,
                    pn,
                    frames,
                }
            }
        })
    }

    fn send_frame(&mut self, now: Instant, frame: FlowFrame) -> PeerToPeer {
        let pn = self.flow.on_sent(now, CONTROL_SIZE, true);
        self.carried.insert(pn, Carried::Control(frame.clone()));
        PeerToPeer::Flow {
            epoch: self.epoch,
            pn,
            frame,
        }
    }

    fn next_from(&mut self, now: Instant, id: u64, src: &mut dyn FileSource) -> Option<PeerToPeer> {
        let t = self.outgoing.get_mut(&id)?;
        if (t.hashes_next as usize) < t.piece_hashes.len() {
            let first = t.hashes_next;
            let end = (first as usize + MAX_HASHES).min(t.piece_hashes.len());
            let hashes = t.piece_hashes[first as usize..end].to_vec();
            t.hashes_next = end as u32;
            return Some(self.send_frame(now, FlowFrame::Hashes { id, first, hashes }));
        }
        let most = max_file_data(self.pmtud.current());
        let (offset, len) = if let Some((offset, len)) = t.resend.pop_front() {
            // Sent in a larger packet than the path now carries: in parts.
            if len > most {
                t.resend.push_front((offset + most as u64, len - most));
            }
            (offset, len.min(most))
        } else {
            let (s, e) = t.todo.pop_front()?;
            // Never across a piece boundary: the receiver checks by piece.
            let piece_end = (s / t.piece_size as u64 + 1) * t.piece_size as u64;
            let len = (e.min(piece_end) - s).min(most as u64) as usize;
            if s + (len as u64) < e {
                t.todo.push_front((s + len as u64, e));
            }
            (s, len)
        };
        let buf = &mut self.buf[..len];
        match src.read(TransferId(id), offset, buf) {
            Ok(n) if n == len => {}
            Ok(n) => {
                let error =
                    format!("the file is shorter than offered ({n} of {len} bytes at {offset})");
                self.events.push_back(TransferEvent::ReadFailed {
                    id: TransferId(id),
                    error,
                });
                self.cancel_raw(id, "the file changed while sending");
                return None;
            }
            Err(e) => {
                self.events.push_back(TransferEvent::ReadFailed {
                    id: TransferId(id),
                    error: e.to_string(),
                });
                self.cancel_raw(id, &format!("cannot read the file: {e}"));
                return None;
            }
        }
        let data = buf.to_vec();
        let t = self.outgoing.get_mut(&id)?;
        t.unacked += len;
        let pn = self.flow.on_sent(now, len + DATA_PACKET_OVERHEAD, true);
        self.carried.insert(pn, Carried::Data { id, offset, len });
        Some(PeerToPeer::Flow {
            epoch: self.epoch,
            pn,
            frame: FlowFrame::Data { id, offset, data },
        })
    }

    /// When to call [`PeerFlow::poll_packet`] or
    /// [`PeerFlow::handle_timeout`] next.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let send = if self.wants_to_send() {
            self.flow.send_time(now, self.pmtud.current())
        } else {
            None
        };
        [send, self.flow.poll_timeout()].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.flow.poll_timeout().is_some_and(|t| t <= now) {
            self.flow.handle_timeout(now);
            self.drain_flow(now);
            if self.flow.pto_count() >= BLACK_HOLE_PTOS && self.pmtud.black_hole() {
                // Large packets stopped arriving (a route change the
                // session did not see): back to the size every path
                // carries; what was sent large goes again in parts.
                tracing::info!(size = pmtud::BASE, "PMTU(BLACK_HOLE)");
                self.flow.set_mss(pmtud::BASE);
            }
            self.probe_with_oldest(now);
        }
    }

    /// The session moved to another path (the peer's NAT rebound, the
    /// relay, a new address): what was in flight may be lost on the old
    /// one, so probe at once instead of after the probe timeout's backoff.
    pub fn path_changed(&mut self, now: Instant) {
        if self.flow.outstanding() > 0 {
            self.flow.probe_now(now);
            self.probe_with_oldest(now);
        }
    }

    /// A probe the flow asked for, with nothing new to send: the oldest
    /// packet in flight goes again.
    fn probe_with_oldest(&mut self, now: Instant) {
        if self.flow.probes_wanted() == 0 || self.wants_to_send() {
            return;
        }
        let Some(pn) = self.carried.keys().min().copied() else {
            return;
        };
        match self.carried.remove(&pn) {
            Some(Carried::Control(f)) => self.control.push_back(f),
            Some(Carried::Frames(fs)) => self.control.extend(fs),
            Some(Carried::Data { id, offset, len }) => {
                if let Some(t) = self.outgoing.get_mut(&id) {
                    t.resend.push_back((offset, len));
                    t.unacked = t.unacked.saturating_sub(len);
                }
            }
            Some(Carried::Probe) => {
                // Not worth sending again: take it for lost, and ask for
                // an acknowledgement with a small packet.
                self.pmtud.on_lost(now, pn);
                self.control.push_back(FlowFrame::Padding { len: 0 });
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
