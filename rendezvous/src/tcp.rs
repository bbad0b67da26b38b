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
//!
//! Slots are held by accounts, not by whoever connects: a source (an IPv4
//! address, an IPv6 /64) has at most [`MAX_PER_SOURCE`] connections; a
//! connection that carries no logged-in session after [`LOGIN_GRACE`] is
//! closed ([`TcpClients::reap`]); when every slot is taken, the oldest
//! connection not logged in makes room; and only frames that decode as
//! packets keep a connection from idling out (empty frames do not).

use bytes::{Bytes, BytesMut};
use proto::wire::{Packet, MAX_RELAYED, TCP_LENGTH_BYTES};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Frames queued toward one client; beyond this they are dropped, as a
/// full UDP socket buffer would drop datagrams.
const OUT_QUEUE: usize = 256;
/// Connections from one source at once (an IPv4 address, an IPv6 /64):
/// a few hosts behind one NAT, not one host holding every slot.
pub const MAX_PER_SOURCE: usize = 8;
/// A connection must deliver its first whole frame within this time.
const FIRST_FRAME: Duration = Duration::from_secs(10);
/// A connection must carry a logged-in session this long after it opened,
/// or it is closed.
pub const LOGIN_GRACE: Duration = Duration::from_secs(30);

struct Conn {
    tx: mpsc::Sender<Bytes>,
    opened: Instant,
    logged_in: bool,
}

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
    conns: HashMap<SocketAddr, Conn>,
    tasks: JoinSet<()>,
    events_tx: mpsc::Sender<TcpEvent>,
    events: mpsc::Receiver<TcpEvent>,
    max: usize,
    idle: Duration,
    /// Connections refused: `max` were open and all logged in, or their
    /// source had [`MAX_PER_SOURCE`].
    pub refused: u64,
    /// Connections closed to make room, or for not logging in.
    pub reaped: u64,
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
            reaped: 0,
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
                        let opened = Instant::now();
                        self.conns.insert(addr, Conn { tx, opened, logged_in: false });
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
        let source = proto::source_key(addr);
        let same_source = self
            .conns
            .keys()
            .filter(|a| proto::source_key(**a) == source)
            .count();
        if same_source >= MAX_PER_SOURCE {
            self.refused += 1;
            tracing::warn!(%addr, "TCP(TOO_MANY_FROM_ONE_SOURCE)");
            return;
        }
        // Counted by task, not by `conns` (which fills when the task has
        // started): the limit holds however fast connections arrive.
        if self.tasks.len() >= self.max {
            // Full: the oldest connection not logged in makes room (it had
            // its chance; a flood of idle connections cannot keep users
            // out).
            let oldest = self
                .conns
                .iter()
                .filter(|(_, c)| !c.logged_in)
                .min_by_key(|(_, c)| c.opened)
                .map(|(a, _)| *a);
            match oldest {
                Some(old) => {
                    self.conns.remove(&old);
                    self.reaped += 1;
                    tracing::info!(%old, "TCP(FULL_CLOSE_OLDEST_NOT_LOGGED_IN)");
                }
                None => {
                    self.refused += 1;
                    tracing::warn!(%addr, open = self.tasks.len(), "TCP(FULL)");
                    return;
                }
            }
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
            Some(c) => {
                if c.tx.try_send(Bytes::from(payload)).is_err() {
                    tracing::debug!(%dst, "TCP(QUEUE_FULL_DROP)");
                }
                None
            }
            None => Some(payload),
        }
    }
}

impl TcpClients {
    /// Notes whether the connection from `addr` carries a logged-in
    /// session now (after each of its frames).
    pub fn note_logged_in(&mut self, addr: SocketAddr, logged_in: bool) {
        if let Some(c) = self.conns.get_mut(&addr) {
            c.logged_in = logged_in;
        }
    }

    /// Closes connections that carry no logged-in session
    /// ([`LOGIN_GRACE`] after they opened), as `logged_in` says of their
    /// address; notes which are logged in, so a full table evicts the
    /// others first. Returns how many were closed.
    pub fn reap(&mut self, now: Instant, logged_in: impl Fn(SocketAddr) -> bool) -> usize {
        let mut closed = 0;
        self.conns.retain(|addr, c| {
            c.logged_in = logged_in(*addr);
            let keep = c.logged_in || now.saturating_duration_since(c.opened) < LOGIN_GRACE;
            if !keep {
                closed += 1;
                tracing::info!(%addr, "TCP(NOT_LOGGED_IN_CLOSED)");
            }
            keep
        });
        self.reaped += closed as u64;
        closed
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
    // Only whole frames that decode as packets keep a connection open: a
    // trickle of bytes does not, nor do empty frames or noise.
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
                            if frame.is_empty() {
                                continue;
                            }
                            if Packet::decode(&frame).is_ok() {
                                deadline = tokio::time::Instant::now() + idle;
                            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Drives `clients` (accepts, opens, closes) for a moment.
    async fn pump(clients: &mut TcpClients) {
        while tokio::time::timeout(Duration::from_millis(50), clients.next())
            .await
            .is_ok()
        {}
    }

    /// Whether the server closed `s` (EOF or reset within a moment).
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn a_login_counts_before_the_next_reap() {
        // The oldest connection logs in (noted after its frame, no reap
        // since): a newcomer to the full table closes the next one.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = TcpClients::new(listener, 2, Duration::from_secs(60));
        let mut streams = Vec::new();
        for _ in 0..2 {
            streams.push(TcpStream::connect(addr).await.unwrap());
            pump(&mut clients).await;
        }
        clients.note_logged_in(streams[0].local_addr().unwrap(), true);
        streams.push(TcpStream::connect(addr).await.unwrap());
        pump(&mut clients).await;
        assert!(!closed(&mut streams[0]).await, "the logged-in one closed");
        assert!(closed(&mut streams[1]).await);
        assert_eq!(clients.open(), 2);
    }

    #[tokio::test]
    async fn slots_go_to_logged_in_connections() {
        // D8: connections that never log in hold a slot for the grace
        // period at most, a full table closes the oldest of them for a
        // newcomer, and one source has at most MAX_PER_SOURCE.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = TcpClients::new(listener, 3, Duration::from_secs(60));
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(TcpStream::connect(addr).await.unwrap());
            pump(&mut clients).await;
        }
        assert_eq!(clients.open(), 3);
        let first = streams[0].local_addr().unwrap();
        let second = streams[1].local_addr().unwrap();
        // The second is logged in; the table is full: a newcomer closes the
        // oldest not logged in (the first), not the second.
        clients.reap(Instant::now(), |a| a == second);
        streams.push(TcpStream::connect(addr).await.unwrap());
        pump(&mut clients).await;
        assert!(closed(&mut streams[0]).await, "{first} kept");
        assert!(!closed(&mut streams[1]).await);
        assert_eq!(clients.open(), 3);
        // Past the grace period, only the logged-in one stays.
        let later = Instant::now() + LOGIN_GRACE;
        assert_eq!(clients.reap(later, |a| a == second), 2);
        pump(&mut clients).await;
        assert_eq!(clients.open(), 1);
        assert!(!closed(&mut streams[1]).await);
        assert!(closed(&mut streams[2]).await && closed(&mut streams[3]).await);
        // One source: MAX_PER_SOURCE at most (all from 127.0.0.1 here).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = TcpClients::new(listener, 100, Duration::from_secs(60));
        let mut many = Vec::new();
        for _ in 0..MAX_PER_SOURCE + 2 {
            many.push(TcpStream::connect(addr).await.unwrap());
            pump(&mut clients).await;
        }
        assert_eq!(clients.open(), MAX_PER_SOURCE);
        assert_eq!(clients.refused, 2);
    }

    #[tokio::test]
    async fn empty_frames_do_not_keep_a_connection() {
        // D8: a connection sending only empty frames idles out as if it
        // sent nothing; one sending packets stays.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idle = Duration::from_millis(1000);
        let mut clients = TcpClients::new(listener, 10, idle);
        let mut empty = TcpStream::connect(addr).await.unwrap();
        let mut real = TcpStream::connect(addr).await.unwrap();
        let probe = Packet::Probe { nonce: 1 }.encode();
        let mut framed = (probe.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&probe);
        for _ in 0..14 {
            let _ = empty.write_all(&[0, 0]).await;
            real.write_all(&framed).await.unwrap();
            pump(&mut clients).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(closed(&mut empty).await, "empty frames kept it open");
        assert!(!closed(&mut real).await);
    }
}
