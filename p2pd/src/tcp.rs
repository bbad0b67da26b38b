//! The TCP fallback to the rendezvous server, for networks that drop UDP.
//!
//! The daemon's node speaks datagrams; when UDP from the server stays
//! silent while the link is down, the daemon opens a TCP connection to
//! the same address and port and sends the server's datagrams over it,
//! each framed behind a 2-byte big-endian length (tokio-util's
//! `LengthDelimitedCodec`, [`proto::wire::TCP_LENGTH_BYTES`]). Relayed
//! peer packets ride it too: a peer session through the relay does not
//! know which transport carries it.
//!
//! One task owns the connection (connect, then frames both ways); it is
//! aborted when the [`TcpLink`] is dropped.

use bytes::{Bytes, BytesMut};
use proto::wire::{MAX_RELAYED, TCP_LENGTH_BYTES};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Giving up on a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams queued for the server; beyond this they are dropped, as a
/// full UDP socket buffer would drop them.
const OUT_QUEUE: usize = 256;

/// What a link's task reports, tagged with the link's generation so that
/// news from a link already replaced is recognised and ignored.
pub struct TcpEvent {
    pub generation: u64,
    pub kind: TcpEventKind,
}

pub enum TcpEventKind {
    Up,
    Frame(BytesMut),
    Down(String),
}

pub struct TcpLink {
    out: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(TCP_LENGTH_BYTES)
        .max_frame_length(MAX_RELAYED)
        .new_codec()
}

impl TcpLink {
    /// Connects in the background; `events` gets `Up`, then frames, then
    /// `Down` with the reason.
    pub fn start(server: SocketAddr, generation: u64, events: mpsc::Sender<TcpEvent>) -> Self {
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let task = tokio::spawn(async move {
            let tagged = Tagged { generation, events };
            let why = run(server, rx, &tagged).await;
            tagged.send(TcpEventKind::Down(why)).await;
        });
        Self { out, task }
    }

    /// Queues a datagram for the server (dropped if the queue is full).
    pub fn send(&self, payload: Vec<u8>) {
        if self.out.try_send(Bytes::from(payload)).is_err() {
            tracing::debug!("TCP(QUEUE_FULL_DROP)");
        }
    }
}

struct Tagged {
    generation: u64,
    events: mpsc::Sender<TcpEvent>,
}

impl Tagged {
    /// False once the daemon stopped listening.
    async fn send(&self, kind: TcpEventKind) -> bool {
        let ev = TcpEvent {
            generation: self.generation,
            kind,
        };
        self.events.send(ev).await.is_ok()
    }
}

async fn run(server: SocketAddr, mut out: mpsc::Receiver<Bytes>, events: &Tagged) -> String {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return format!("cannot connect: {e}"),
        Err(_) => return "cannot connect: timed out".into(),
    };
    let _ = stream.set_nodelay(true);
    if !events.send(TcpEventKind::Up).await {
        return "daemon stopping".into();
    }
    let (mut rd, mut wr) = stream.into_split();
    let mut codec = codec();
    let mut inbuf = BytesMut::with_capacity(4096);
    let mut outbuf = BytesMut::with_capacity(4096);
    loop {
        tokio::select! {
            read = rd.read_buf(&mut inbuf) => match read {
                Ok(0) => return "closed by the server".into(),
                Err(e) => return format!("read: {e}"),
                Ok(_) => loop {
                    match codec.decode(&mut inbuf) {
                        Ok(Some(frame)) => {
                            if !events.send(TcpEventKind::Frame(frame)).await {
                                return "daemon stopping".into();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return format!("bad frame from the server: {e}"),
                    }
                },
            },
            payload = out.recv() => match payload {
                Some(payload) => {
                    outbuf.clear();
                    if codec.encode(payload, &mut outbuf).is_err() {
                        continue;
                    }
                    if let Err(e) = wr.write_all(&outbuf).await {
                        return format!("write: {e}");
                    }
                }
                None => return "daemon stopping".into(),
            },
        }
    }
}
