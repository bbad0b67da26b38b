//! Golden bytes, the frozen layout of this version, and hostile input.

use super::*;
use crate::identity::{Identity, PublicIdentity};
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
        "0705010203040506070801"
    );
    assert_eq!(
        hex(&Packet::SessionUnknown {
            receiver: 0xdeadbeef,
            token: [0xab; 16],
        }
        .encode()),
        "0706deadbeef".to_owned() + &"ab".repeat(16)
    );
    assert_eq!(
        hex(&Packet::ChannelUnknown {
            channel: 0x0102030405060708,
            token: [0xcd; 16],
        }
        .encode()),
        "070a0102030405060708".to_owned() + &"cd".repeat(16)
    );
    assert_eq!(
        hex(&Packet::Relay {
            channel: 0x0102030405060708,
            payload: &[0x02, 0x06, 0xde, 0xad, 0xbe, 0xef]
        }
        .encode()),
        "070701020304050607080206deadbeef"
    );
    assert_eq!(
        hex(&Packet::Data {
            receiver: 1,
            counter: 2,
            ciphertext: &[0xaa; 16]
        }
        .encode()),
        format!("070400000001{:016x}{}", 2, "aa".repeat(16))
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
        cookie: [0xc0; 16],
    }
    .encode();
    assert_eq!(init.len(), MIN_INIT_LEN);
    assert_eq!(
        hex(&init[..13]),
        "0701000000090100030102".to_owned() + "03c0"
    );
    assert_eq!(
        hex(&ClientToServer::Register {
            rid: 7,
            name: "bob".into(),
            invite: String::new(),
        }
        .encode()),
        "0100000007000362".to_owned() + "6f62" + "0000"
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
                offset: 0,
                total: 2,
                body: b"hi".to_vec()
            }
        }
        .encode()),
        "10000000020000000000000001090000000000000004".to_owned()
            + "00000000000000030000000000000002"
            + "000000000000000200026869"
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
            cookie: [0x1c; 16],
        },
        Packet::CookieReply {
            receiver: 1,
            cookie: [0x1c; 16],
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
        Packet::SessionUnknown {
            receiver: 8,
            token: [0x5a; 16],
        },
        Packet::ChannelUnknown {
            channel: 12,
            token: [0x6b; 16],
        },
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
            invite: "welcome".into(),
        },
        ClientToServer::Login {
            rid: 2,
            signature: [0x66; 64],
        },
        ClientToServer::ListUsers {
            rid: 3,
            after: "bob".into(),
        },
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
        ClientToServer::PathResponse { data: [0xd8; 8] },
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
        channel: 0x0123_4567_89ab_cdef,
        channel_token: [0x7c; 16],
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
            reset_token: [0x8d; 16],
        },
        ServerToClient::Failed {
            rid: 3,
            reason: FailReason::Offline,
            detail: "away".into(),
        },
        ServerToClient::UserList {
            rid: 4,
            total: 2,
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
        ServerToClient::PathChallenge { data: [0xc8; 8] },
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
            offset: 1000,
            total: 1002,
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
        FlowFrame::Pause {
            id: 3,
            reason: "disk full".into(),
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
    to_peer.push(PeerToPeer::Frames {
        epoch: 2,
        pn: 4,
        frames: frames.to_vec(),
    });
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
        Packet::ChannelUnknown { .. } => 9,
        Packet::CookieReply { .. } => 10,
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
        ClientToServer::PathResponse { .. } => 8,
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
        ServerToClient::PathChallenge { .. } => 11,
    };
    let peer_kind = |m: &PeerToPeer| match m {
        PeerToPeer::Keepalive => 0,
        PeerToPeer::Ping { .. } => 1,
        PeerToPeer::Pong { .. } => 2,
        PeerToPeer::Close => 3,
        PeerToPeer::Flow { .. } => 4,
        PeerToPeer::FlowAck { .. } => 5,
        PeerToPeer::Frames { .. } => 6,
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
        FlowFrame::Pause { .. } => 11,
    };
    fn all<T>(items: &[T], kind: impl Fn(&T) -> usize, n: usize) {
        let mut seen: Vec<usize> = items.iter().map(kind).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "a variant has no sample");
    }
    all(&packets, packet_kind, 11);
    all(&to_server, client_kind, 9);
    all(&to_client, server_kind, 12);
    all(&to_peer, peer_kind, 7);
    all(&frames, frame_kind, 12);
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
    const FROZEN: &[(u8, &str)] = &[
        (
            4,
            "97a1e665812143236a2cb05b7fc8d024f789fb67a58bf258c48001ebbbe3a505",
        ),
        // 5: a peer's handshake payload carries its reset token (inside
        // the Noise messages, so no frame's layout changed; the version
        // says a version-4 peer cannot read it). FailReason 13.
        (
            5,
            "b3459ad23cb2e973d2de59dec1b8196a24a0f2991bc92983b81b3e9d6d16d4fa",
        ),
        // 6: the cookie in an initiation, `CookieReply`, the path
        // challenge and response, each party's own relay channel id, user
        // lists paged by a name cursor with a 32-bit total, the flow's
        // `Pause` frame, `Register`'s invite token; the IK payload's
        // timestamp (inside the Noise message).
        (
            6,
            "bb4408b52e4a1f4f863ac19cf33704f61fb06b8f8118472d432e963a6b6f5e48",
        ),
        // 7: `PeerToPeer::Frames`, several flow frames in one packet;
        // chat messages in parts (`offset`, `total`).
        (
            7,
            "a0f874a06068f48f0479d4c623869016c4330100082c4fd0bca879bd116ad1f4",
        ),
    ];
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
    for f in every_frame().iter().take(10) {
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
    match rng.gen_range(0..9) {
        8 => ClientToServer::PathResponse { data: rng.gen() },
        7 => ClientToServer::PushAck { push_id: rng.gen() },
        0 => ClientToServer::Register {
            rid: rng.gen(),
            name: random_name(rng),
            invite: "i".repeat(rng.gen_range(0..=MAX_INVITE)),
        },
        1 => ClientToServer::Login {
            rid: rng.gen(),
            signature: [rng.gen(); 64],
        },
        2 => ClientToServer::ListUsers {
            rid: rng.gen(),
            after: random_name(rng),
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
    match rng.gen_range(0..11) {
        10 => ServerToClient::PathChallenge { data: rng.gen() },
        0 => ServerToClient::RegisterOk {
            rid: rng.gen(),
            name: random_name(rng),
        },
        1 => ServerToClient::LoginOk {
            rid: rng.gen(),
            name: random_name(rng),
            observed: random_addr(rng),
            probe_port: rng.gen(),
            reset_token: rng.gen(),
        },
        2 => ServerToClient::Failed {
            rid: rng.gen(),
            reason: FailReason::from_code(rng.gen()),
            detail: random_name(rng),
        },
        3 => ServerToClient::UserList {
            rid: rng.gen(),
            total: rng.gen(),
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
            channel: rng.gen(),
            channel_token: rng.gen(),
        }),
        8 => ServerToClient::Pong {
            rid: rng.gen(),
            observed: random_addr(rng),
        },
        _ => ServerToClient::Ok { rid: rng.gen() },
    }
}

fn random_p2p(rng: &mut impl Rng) -> PeerToPeer {
    match rng.gen_range(2..9) {
        8 => PeerToPeer::Frames {
            epoch: rng.gen(),
            pn: rng.gen(),
            frames: (0..rng.gen_range(2..=8))
                .map(|_| match rng.gen_bool(0.8) {
                    true => FlowFrame::Chat {
                        seq: rng.gen(),
                        base: rng.gen(),
                        sent_ms: rng.gen(),
                        offset: 0,
                        total: 99,
                        body: (0..rng.gen_range(0..100)).map(|_| rng.gen()).collect(),
                    },
                    false => FlowFrame::ChatAck { upto: rng.gen() },
                })
                .collect(),
        },
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
    match rng.gen_range(0..12) {
        11 => FlowFrame::Pause {
            id,
            reason: "x".repeat(rng.gen_range(0..=MAX_DETAIL)),
        },
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
            let mut body = vec![0u8; rng.gen_range(0..=1000)];
            rng.fill_bytes(&mut body);
            let total = rng.gen_range(body.len()..=MAX_MESSAGE_BYTES) as u32;
            FlowFrame::Chat {
                seq: rng.gen(),
                base: rng.gen(),
                sent_ms: rng.gen(),
                offset: rng.gen_range(0..=total - body.len() as u32),
                total,
                body,
            }
        }
        8 => FlowFrame::ChatAck { upto: rng.gen() },
        9 => FlowFrame::Skipped {
            id,
            path: "d/".repeat(rng.gen_range(0..=MAX_FILE_PATH / 2)),
            group: rng.gen(),
            group_files: rng.gen(),
            reason: "x".repeat(rng.gen_range(0..=MAX_SKIP_REASON)),
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
                    _ => match (PeerToPeer::decode(&b[..cut]), PeerToPeer::decode(b)) {
                        // Frames run to the end of the packet (whose
                        // seal protects its length): cut between two,
                        // the first ones read, never more.
                        (
                            Ok(PeerToPeer::Frames { frames: got, .. }),
                            Ok(PeerToPeer::Frames { frames: all, .. }),
                        ) if got.len() < all.len() && all.starts_with(&got) => {
                            Err(DecodeError::Truncated { needed: 0 })
                        }
                        (r, _) => r.map(|_| ()),
                    },
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
            b[1] = rng.gen_range(0..12);
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
    // A chat part past its message's end, or of a message over the limit.
    for (offset, total) in [(10u32, 11u32), (0, MAX_MESSAGE_BYTES as u32 + 1)] {
        let mut part = vec![0x10];
        part.extend_from_slice(&[0; 12]);
        part.push(9);
        part.extend_from_slice(&[0; 24]);
        part.extend_from_slice(&offset.to_be_bytes());
        part.extend_from_slice(&total.to_be_bytes());
        part.extend_from_slice(&2u16.to_be_bytes());
        part.extend_from_slice(b"hi");
        assert!(matches!(
            PeerToPeer::decode(&part),
            Err(DecodeError::Invalid("chat part"))
        ));
    }
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
