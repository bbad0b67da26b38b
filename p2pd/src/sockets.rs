//! The extra UDP sockets the node asks for (port prediction: see
//! [`proto::Predictor`]), by the ids it gives them. The node
//! decides when to open and close them, what to send through which, and
//! which datagrams count; this only binds, reads and sends.
//!
//! Every socket's reader is a task owned here (aborted on drop); the node
//! bounds how many are open.

use crate::addrs;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A datagram that arrived on an extra socket.
pub struct Extra {
    pub id: u32,
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

struct Sock {
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

impl Drop for Sock {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

pub struct Sockets {
    /// Bind like the main socket (dual-stack).
    v6: bool,
    socks: HashMap<u32, Sock>,
    tx: mpsc::Sender<Extra>,
}

impl Sockets {
    pub fn new(v6: bool) -> (Self, mpsc::Receiver<Extra>) {
        let (tx, rx) = mpsc::channel(1024);
        let s = Self {
            v6,
            socks: HashMap::new(),
            tx,
        };
        (s, rx)
    }

    /// Binds sockets `first..first + count`; one that cannot be bound (the
    /// open-file limit) is missing, and what the node sends through it is
    /// lost.
    pub fn open(&mut self, first: u32, count: u32) {
        let mut opened = 0;
        for i in 0..count {
            let id = first.wrapping_add(i);
            let std_socket = if self.v6 {
                addrs::bind_dual(0)
            } else {
                addrs::bind_udp(SocketAddr::from(([0, 0, 0, 0], 0)))
            };
            let Ok(socket) = std_socket.and_then(UdpSocket::from_std) else {
                break;
            };
            let socket = Arc::new(socket);
            let reader = tokio::spawn(read(id, socket.clone(), self.tx.clone()));
            self.socks.insert(id, Sock { socket, reader });
            opened += 1;
        }
        tracing::debug!(opened, asked = count, "SOCKETS(OPENED)");
    }

    pub fn close(&mut self, ids: &[u32]) {
        for id in ids {
            self.socks.remove(id);
        }
    }

    pub async fn send(&self, id: u32, payload: &[u8], dst: SocketAddr) {
        if let Some(s) = self.socks.get(&id) {
            let dst = addrs::for_socket(dst, self.v6);
            if let Err(e) = s.socket.send_to(payload, dst).await {
                tracing::debug!(%dst, error = %e, "UDP(SEND_ERROR)");
            }
        }
    }
}

/// Reads what an extra socket receives. Its buffer stays small (a round
/// opens hundreds of sockets): larger datagrams arrive cut short and fail
/// to decrypt, so path MTU discovery settles on the 1,452-byte size on
/// such a path.
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
