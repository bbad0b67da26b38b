//! The hard side of port prediction (the birthday technique; see
//! [`proto::peer::Prediction`]).
//!
//! When our NAT maps each destination to a new port, a peer behind an
//! ordinary NAT cannot reach the mapping our main socket made toward it.
//! So we open [`PREDICTION_PORTS`] extra sockets and send punch probes
//! from each to the peer's public address, once a second for a few
//! seconds: 256 mappings at random ports, while the peer probes random
//! ports of our address. The first socket a valid packet reaches is
//! adopted: what we send to that peer goes through it from then on, and
//! what it receives goes to the node as if it came to the main socket.
//! The other sockets are closed when the round ends.
//!
//! Every socket's reader is a task owned here (aborted on drop); rounds
//! and adopted sockets are bounded.

use crate::addrs;
use proto::peer::PREDICTION_PORTS;
use proto::wire::Packet;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a round keeps its sockets open and probing.
const ROUND: Duration = Duration::from_secs(8);
/// Probes from every socket this often while the round lasts.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Rounds at once; a further request waits for none (it is skipped).
const MAX_ROUNDS: usize = 2;
/// Adopted sockets kept; the oldest goes first.
const MAX_ADOPTED: usize = 16;

/// A datagram that arrived on an extra socket.
pub struct Extra {
    id: u32,
    from: SocketAddr,
    bytes: Vec<u8>,
}

impl Extra {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

struct Sock {
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
    /// The round it belongs to; `None` once adopted.
    round: Option<u64>,
    adopted_at: Option<Instant>,
}

impl Drop for Sock {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Round {
    intro_id: u64,
    dst: SocketAddr,
    until: Instant,
    next_probe: Instant,
}

pub struct Predictor {
    v6: bool,
    next_id: u32,
    socks: HashMap<u32, Sock>,
    rounds: Vec<Round>,
    /// Peer endpoint → the adopted socket that reaches it.
    routes: HashMap<SocketAddr, u32>,
    tx: mpsc::Sender<Extra>,
}

impl Predictor {
    /// `v6`: bind the extra sockets like the main one (dual-stack).
    pub fn new(v6: bool) -> (Self, mpsc::Receiver<Extra>) {
        let (tx, rx) = mpsc::channel(1024);
        let p = Self {
            v6,
            next_id: 0,
            socks: HashMap::new(),
            rounds: Vec::new(),
            routes: HashMap::new(),
            tx,
        };
        (p, rx)
    }

    /// Opens a round's sockets; the first probes go out at the next
    /// [`Predictor::on_timer`].
    pub fn start(&mut self, now: Instant, dst: SocketAddr, intro_id: u64) {
        if self.rounds.len() >= MAX_ROUNDS || self.rounds.iter().any(|r| r.intro_id == intro_id) {
            return;
        }
        let mut opened = 0;
        for _ in 0..PREDICTION_PORTS {
            let std_socket = if self.v6 {
                addrs::bind_dual(0)
            } else {
                addrs::bind_udp(SocketAddr::from(([0, 0, 0, 0], 0)))
            };
            let bound = std_socket.and_then(UdpSocket::from_std);
            let Ok(socket) = bound else {
                break;
            };
            let socket = Arc::new(socket);
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let reader = tokio::spawn(read(id, socket.clone(), self.tx.clone()));
            self.socks.insert(
                id,
                Sock {
                    socket,
                    reader,
                    round: Some(intro_id),
                    adopted_at: None,
                },
            );
            opened += 1;
        }
        tracing::info!(%dst, sockets = opened, "PREDICT(OPEN_PORTS)");
        self.rounds.push(Round {
            intro_id,
            dst,
            until: now + ROUND,
            next_probe: now,
        });
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.rounds.iter().map(|r| r.next_probe.min(r.until)).min()
    }

    /// Sends due probes; ends rounds whose time is up.
    pub async fn on_timer(&mut self, now: Instant) {
        let ended: Vec<u64> = self
            .rounds
            .iter()
            .filter(|r| now >= r.until)
            .map(|r| r.intro_id)
            .collect();
        for intro_id in ended {
            self.rounds.retain(|r| r.intro_id != intro_id);
            self.socks.retain(|_, s| s.round != Some(intro_id));
            tracing::debug!("PREDICT(ROUND_OVER)");
        }
        for r in self.rounds.iter_mut().filter(|r| now >= r.next_probe) {
            r.next_probe = now + PROBE_EVERY;
            let probe = Packet::Punch {
                intro_id: r.intro_id,
                reply: false,
            }
            .encode();
            let dst = addrs::for_socket(r.dst, self.v6);
            for s in self.socks.values().filter(|s| s.round == Some(r.intro_id)) {
                let _ = s.socket.send_to(&probe, dst).await;
            }
        }
    }

    /// A datagram from an extra socket: adopts the socket for its sender
    /// if it is the first valid packet there. Returns the sender (for the
    /// node), or `None` to drop it.
    pub fn on_datagram(&mut self, now: Instant, extra: &Extra) -> Option<SocketAddr> {
        let from = addrs::canonical(extra.from);
        let sock = self.socks.get_mut(&extra.id)?;
        if let Some(round) = sock.round {
            // Only the peer's probe (it knows the introduction id), from
            // the peer's address, adopts a socket; anything else on a
            // round's socket is dropped.
            let dst = self.rounds.iter().find(|r| r.intro_id == round)?.dst;
            match Packet::decode(&extra.bytes) {
                Ok(Packet::Punch { intro_id, .. }) if intro_id == round && from == dst => {}
                _ => return None,
            }
            sock.round = None;
            sock.adopted_at = Some(now);
            tracing::info!(%from, "PREDICT(PORT_FOUND)");
            if let Some(old) = self.routes.insert(from, extra.id) {
                self.socks.remove(&old);
            }
            if self.routes.len() > MAX_ADOPTED {
                let oldest = self
                    .socks
                    .iter()
                    .filter_map(|(id, s)| s.adopted_at.map(|t| (t, *id)))
                    .min();
                if let Some((_, id)) = oldest {
                    self.socks.remove(&id);
                    self.routes.retain(|_, v| *v != id);
                }
            }
        }
        Some(from)
    }

    /// The socket that reaches `dst`, if one was adopted for it.
    pub fn route(&self, dst: SocketAddr) -> Option<&UdpSocket> {
        let id = self.routes.get(&dst)?;
        self.socks.get(id).map(|s| &*s.socket)
    }

    pub fn is_predicted(&self, endpoint: SocketAddr) -> bool {
        self.routes.contains_key(&endpoint)
    }
}

/// Reads what a prediction socket receives. Its buffer stays small (a
/// round opens hundreds of sockets): larger datagrams arrive cut short and
/// fail to decrypt, so path MTU discovery settles on the 1,452-byte size
/// on such a path.
async fn read(id: u32, socket: Arc<UdpSocket>, tx: mpsc::Sender<Extra>) {
    let mut buf = vec![0u8; 2048];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let bytes = buf[..n].to_vec();
                if tx.send(Extra { id, from, bytes }).await.is_err() {
                    return;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
