//! TCP for clients on networks that drop UDP.
//!
//! A TCP client sends and receives exactly the datagrams a UDP client
//! does, each framed behind a 2-byte big-endian length (tokio-util's
//! `LengthDelimitedCodec`; [`proto::wire::TCP_LENGTH_BYTES`]). The machine
//! cannot tell the two apart: a connection is known by its peer address,
//! and what the machine sends to that address goes down the connection.
//! (A UDP client with the very same address and port as a TCP client
//! would be shadowed by it; both would have to share one host and one
//! port number.)
//!
//! Each connection has one task that reads frames into the main loop's
//! channel and writes what the main loop queues for it. The tasks live in
//! a `JoinSet` owned by [`TcpClients`]: dropping it stops them all.

use bytes::{Bytes, BytesMut};
use proto::wire::{MAX_RELAYED, TCP_LENGTH_BYTES};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Frames queued toward one client; beyond this they are dropped, as a
/// full UDP socket buffer would drop datagrams.
const OUT_QUEUE: usize = 256;
/// Connections from one IP address at once: a few hosts behind one NAT,
/// not one host holding every slot.
const MAX_PER_IP: usize = 8;
/// A connection must deliver its first whole frame within this time.
const FIRST_FRAME: Duration = Duration::from_secs(10);

/// The framing both ends use.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(TCP_LENGTH_BYTES)
        .max_frame_length(MAX_RELAYED)
        .new_codec()
}

pub enum TcpEvent {
    Open(SocketAddr, mpsc::Sender<Bytes>),
    Frame(SocketAddr, BytesMut),
    Closed(SocketAddr, String),
}

pub struct TcpClients {
    listener: TcpListener,
    conns: HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    tasks: JoinSet<()>,
    events_tx: mpsc::Sender<TcpEvent>,
    events: mpsc::Receiver<TcpEvent>,
    max: usize,
    idle: Duration,
    /// Connections refused because `max` were open.
    pub refused: u64,
}

impl TcpClients {
    /// `idle`: a connection with no frame for this long is closed (the
    /// presence timeout: a live client sends heartbeats).
    pub fn new(listener: TcpListener, max: usize, idle: Duration) -> Self {
        let (events_tx, events) = mpsc::channel(1024);
        Self {
            listener,
            conns: HashMap::new(),
            tasks: JoinSet::new(),
            events_tx,
            events,
            max,
            idle,
            refused: 0,
        }
    }

    pub fn open(&self) -> usize {
        self.conns.len()
    }

    /// Waits for the next thing to do: a new connection is taken in here;
    /// a frame is returned.
    pub async fn next(&mut self) -> Option<(SocketAddr, BytesMut)> {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, addr)) => self.accept(stream, addr),
                    Err(e) => {
                        tracing::warn!(error = %e, "TCP(ACCEPT_FAILED)");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(ev) = self.events.recv() => match ev {
                    TcpEvent::Open(addr, tx) => {
                        self.conns.insert(addr, tx);
                    }
                    TcpEvent::Frame(addr, frame) => return Some((addr, frame)),
                    TcpEvent::Closed(addr, why) => {
                        self.conns.remove(&addr);
                        tracing::info!(%addr, why, "TCP(CLOSED)");
                    }
                },
                Some(_) = self.tasks.join_next() => {}
            }
        }
    }

    fn accept(&mut self, stream: TcpStream, addr: SocketAddr) {
        // Counted by task, not by `conns` (which fills when the task has
        // started): the limit holds however fast connections arrive.
        if self.tasks.len() >= self.max {
            self.refused += 1;
            tracing::warn!(%addr, open = self.tasks.len(), "TCP(FULL)");
            return;
        }
        let same_ip = self.conns.keys().filter(|a| a.ip() == addr.ip()).count();
        if same_ip >= MAX_PER_IP {
            self.refused += 1;
            tracing::warn!(%addr, "TCP(TOO_MANY_FROM_ONE_ADDRESS)");
            return;
        }
        let _ = stream.set_nodelay(true);
        tracing::info!(%addr, "TCP(OPEN)");
        let events = self.events_tx.clone();
        let idle = self.idle;
        self.tasks.spawn(async move {
            let why = serve(stream, addr, events.clone(), idle).await;
            let _ = events.send(TcpEvent::Closed(addr, why)).await;
        });
    }

    /// Queues `payload` for the client at `dst` if one is connected by
    /// TCP; otherwise gives it back, to be sent by UDP.
    pub fn send_or_return(&self, dst: SocketAddr, payload: Vec<u8>) -> Option<Vec<u8>> {
        match self.conns.get(&dst) {
            Some(tx) => {
                if tx.try_send(Bytes::from(payload)).is_err() {
                    tracing::debug!(%dst, "TCP(QUEUE_FULL_DROP)");
                }
                None
            }
            None => Some(payload),
        }
    }
}

/// One connection: frames in to the main loop, frames out to the client,
/// until either side closes, a frame is bad, or it idles out. Returns why.
async fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<TcpEvent>,
    idle: Duration,
) -> String {
    let (tx, mut rx) = mpsc::channel::<Bytes>(OUT_QUEUE);
    if events.send(TcpEvent::Open(addr, tx)).await.is_err() {
        return "server stopping".into();
    }
    let (mut rd, mut wr) = stream.into_split();
    let mut codec = codec();
    let mut inbuf = BytesMut::with_capacity(4096);
    let mut outbuf = BytesMut::with_capacity(4096);
    // Only whole frames keep a connection open: a trickle of bytes does
    // not.
    let mut deadline = tokio::time::Instant::now() + FIRST_FRAME.min(idle);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return "idle".into(),
            read = rd.read_buf(&mut inbuf) => match read {
                Ok(0) => return "closed by the client".into(),
                Err(e) => return format!("read: {e}"),
                Ok(_) => loop {
                    match codec.decode(&mut inbuf) {
                        Ok(Some(frame)) => {
                            deadline = tokio::time::Instant::now() + idle;
                            if events.send(TcpEvent::Frame(addr, frame)).await.is_err() {
                                return "server stopping".into();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return format!("bad frame: {e}"),
                    }
                },
            },
            out = rx.recv() => match out {
                Some(payload) => {
                    outbuf.clear();
                    if let Err(e) = codec.encode(payload, &mut outbuf) {
                        tracing::debug!(%addr, error = %e, "TCP(ENCODE)");
                        continue;
                    }
                    if let Err(e) = wr.write_all(&outbuf).await {
                        return format!("write: {e}");
                    }
                }
                None => return "server stopping".into(),
            },
        }
    }
}
