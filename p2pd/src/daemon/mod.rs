//! The daemon task: the thin shell around [`proto::Node`].
//!
//! One task owns the node, the UDP socket and the database, so none of
//! them needs a lock. It waits for the first of: a datagram, a control
//! request, the node's next deadline (or a waiting request's), shutdown.
//! After each, it drains the node in the order the node's contract
//! states: events first (written to the database in one transaction,
//! then answered and broadcast), then datagrams. So a received message is
//! on disk before the acknowledgement that tells the sender to forget it.

mod control;
mod events;
mod records;
mod transfers;

use crate::ctl::{self, Input, Out, Reply};
use crate::files::{self, Files, JobDone};
use crate::sockets::{Extra, Sockets};
use crate::store::Store;
use crate::store::TransferRow;
use crate::tcp::{TcpEvent, TcpEventKind, TcpLink};
use crate::Config;
use crate::{addrs, netwatch};
use anyhow::Context;
use control::{fail_error, request_error, PendingSend, Wait, Waiter};
use proto::control::{
    check_text, AutoAcceptSet, Cancelled, Closed, Command, Connected, ControlError, Declined,
    Direction, ErrorCode, Event, LoggedIn, PeerInfo, PeersResult, PingResult, Registered, Request,
    Response, Sent, TransferInfo, TransferState, UserInfo, Watching, Whoami,
};
use proto::wire::{validate_name, FailReason, ServerToClient};
use proto::ChatMessage;
use proto::SessionPhase;
use proto::{fingerprint, to_hex, PublicIdentity};
use proto::{LinkState, RequestError};
use proto::{Node, NodeConfig, NodeError, NodeEvent};
use proto::{TransportCommand, Via};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

struct Daemon {
    config: Config,
    /// The protocol, with the disk side of file transfers ([`Files`]).
    node: Node<Files>,
    store: Store,
    udp: crate::udp::Udp,
    /// The socket is IPv6 (dual-stack): IPv4 destinations go v4-mapped.
    udp_v6: bool,
    waiters: Vec<Waiter>,
    /// Sends taken in this burst of input, stored together before the
    /// node is drained.
    sends: Vec<PendingSend>,
    watchers: HashMap<u64, Reply>,
    /// The TCP connection to the server the node asked for, while one is
    /// open or opening.
    tcp: Option<TcpLink>,
    tcp_events: mpsc::Sender<TcpEvent>,
    /// Generation of the current TCP link; events of older ones are stale.
    tcp_generation: u64,
    /// Extra sockets the node asked for (port prediction).
    sockets: Sockets,
    /// Recent progress per transfer: (when, bytes done), for rates.
    progress: HashMap<u64, std::collections::VecDeque<(Instant, u64)>>,
    /// When each transfer's progress was last broadcast.
    progress_shown: HashMap<u64, Instant>,
    /// Transfer id → the id of the directory it belongs to.
    groups: HashMap<u64, u64>,
    /// Incoming offers waiting, counted in the store at most once a
    /// second (a flood of offers must not make each cost a count).
    offers_waiting: Option<(Instant, u64)>,
}

/// Most datagrams and most control requests taken in one burst, before
/// the node is drained (and what they brought is stored).
const BURST: usize = 1024;
/// Most bytes of datagrams read in one burst.
const BURST_BYTES: usize = 8 << 20;
/// How often paused transfers look for room to go on.
const RESUME_CHECK: Duration = Duration::from_secs(2);
/// How often old transfer records are pruned (`--keep-transfers`).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Rates are measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// Runs the daemon until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700));
    }
    // One daemon per data directory and per socket, checked before
    // anything is created.
    let _lock = lock_data_dir(&config.data_dir)?;
    let (listener, _socket_guard) = ctl::bind(&config.socket).await?;

    let key_path = config.data_dir.join("identity.key");
    let (identity, created) = proto::load_or_create_identity(&key_path)?;
    if created {
        tracing::info!(path = %key_path.display(), fingerprint = %identity.fingerprint(), "IDENTITY(CREATED)");
    }
    let db_path = config.data_dir.join("p2pd.db");
    let store = Store::open(&db_path)
        .with_context(|| format!("cannot open database {}", db_path.display()))?;

    let mut node_config = NodeConfig::new(config.server);
    node_config.client.heartbeat = config.heartbeat;
    node_config.peer = node_config.peer.with_keepalive(config.keepalive);
    node_config.client.name = store.setting("name")?;
    let pinned_server = match store.setting("server_key")? {
        Some(hex) => proto::key_from_hex(&hex),
        None => None,
    };
    if let (Some(given), Some(pinned)) = (config.server_key, pinned_server) {
        if given != pinned {
            tracing::warn!(
                given = %fingerprint(&given),
                pinned = %fingerprint(&pinned),
                "SERVER_KEY(REPINNED_FROM_COMMAND_LINE)"
            );
        }
    }
    node_config.client.server_key = config.server_key.or(pinned_server);

    let udp = bind_udp_again(&store, config.listen).await?;
    // (P2PD_NO_GSO=1: one datagram per send call, for comparison.)
    let gso = std::env::var_os("P2PD_NO_GSO").is_none();
    let udp = crate::udp::Udp::new(udp, gso).context("cannot set up the UDP socket")?;
    let local = udp.local_addr()?;
    tracing::info!(gso_segments = udp.max_segments(), "UDP(BATCHING)");
    let now = Instant::now();
    // The wall clock at `now`, for the link's IK timestamps (the machine
    // reads no clock itself).
    node_config.client.unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let limit = files::raise_open_file_limit();
    let max_open = files::open_files_cap(limit);
    tracing::info!(limit, max_open, "FILES(OPEN_LIMIT)");
    let (files, mut jobs_inbox) = Files::new(max_open);
    let mut node = Node::new(identity, node_config, now, rand::random(), files);
    node.set_locals(addrs::local_candidates(local, config.server));
    for c in store.contacts()? {
        if let Some(id) = c.identity {
            node.add_contact(now, &c.name, id, c.recv_next);
            node.set_last_path(now, &c.name, c.endpoint, c.relayed);
            if c.resume {
                // Up when we stopped (even killed): the peer may still be
                // sending to our old address; ask for the session again
                // as soon as we are logged in.
                tracing::info!(peer = %c.name, "PEER(RESUME)");
                node.resume(now, &c.name);
            }
        }
    }
    let outbox = store.outbox()?;
    if !outbox.is_empty() {
        tracing::info!(messages = outbox.len(), "OUTBOX(RESTORED)");
    }
    for q in outbox {
        let msg = ChatMessage {
            seq: q.seq,
            sent_ms: q.sent_ms,
            body: q.body.into_bytes(),
        };
        node.send_message(now, &q.peer, msg);
    }

    let (to_daemon, mut inbox) = mpsc::channel::<Input>(1024);
    // Dropping this handle at the end of `run` stops the accept loop; the
    // connection tasks it owns go with it.
    let accept = AbortOnDrop(tokio::spawn(ctl::accept_loop(listener, to_daemon)));
    eprintln!(
        "p2pd: fingerprint {}, udp {}, control socket {}, server {}",
        node.identity().fingerprint(),
        local,
        config.socket.display(),
        config.server
    );
    tracing::info!(udp = %local, socket = %config.socket.display(), server = %config.server, "DAEMON(STARTED)");

    let (tcp_events, mut tcp_inbox) = mpsc::channel::<TcpEvent>(1024);
    let (sockets, mut extra_inbox) = Sockets::new(local.is_ipv6());
    let mut d = Daemon {
        config,
        node,
        store,
        udp_v6: local.is_ipv6(),
        udp,
        waiters: Vec::new(),
        sends: Vec::new(),
        watchers: HashMap::new(),
        tcp: None,
        tcp_events,
        tcp_generation: 0,
        sockets,
        progress: HashMap::new(),
        progress_shown: HashMap::new(),
        groups: HashMap::new(),
        offers_waiting: None,
    };
    d.prune_transfers();
    d.restore_transfers(Instant::now())?;
    d.drain(Instant::now()).await?;
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    let mut resume_check = tokio::time::interval(RESUME_CHECK);

    // Network changes, where the system reports them.
    let watch = match netwatch::NetWatch::new() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::info!(error = %e, "NETWORK(NOT_WATCHED)");
            None
        }
    };
    tokio::pin!(shutdown);
    loop {
        let deadline = d.next_deadline();
        tokio::select! {
            _ = &mut shutdown => break,
            r = d.udp.readable() => if r.is_ok() {
                let _ = d.read_udp();
            },
            input = inbox.recv() => match input {
                Some(input) => d.on_input(Instant::now(), input),
                None => break,
            },
            Some(ev) = tcp_inbox.recv() => d.on_tcp(Instant::now(), ev),
            Some(extra) = extra_inbox.recv() => {
                let Extra { id, from, bytes } = extra;
                d.node.handle_datagram_via(Instant::now(), Via::Socket(id), from, &bytes);
            }
            Some(done) = jobs_inbox.recv() => d.on_job(Instant::now(), done),
            _ = prune.tick() => d.prune_transfers(),
            _ = resume_check.tick() => d.resume_paused(Instant::now()),
            _ = netwatch::next_change(watch.as_ref()) => {
                // Our candidates may have changed with the network.
                let server = d.config.server;
                d.node.set_locals(addrs::local_candidates(local, server));
                d.node.handle_network_change(Instant::now());
            }
            _ = sleep_until(deadline) => {
                let now = Instant::now();
                if d.node.poll_timeout().is_some_and(|t| t <= now) {
                    d.node.handle_timeout(now);
                }
                d.expire_waiters(now);
            }
        }
        // Whatever else is ready joins this burst: its messages are
        // stored in one transaction (one fsync) and acknowledged together
        // (group commit). The burst ends when nothing more is waiting, so
        // a lone message waits for nothing.
        let mut read = 0;
        for _ in 0..BURST {
            let mut took = false;
            // (Bounded in bytes too: what peers send in order is held as
            // events until the drain, whatever their windows say.)
            if read < BURST_BYTES {
                let (n, bytes) = d.read_udp();
                read += bytes;
                took |= n > 0;
            }
            if let Ok(input) = inbox.try_recv() {
                d.on_input(Instant::now(), input);
                took = true;
            }
            // (Finished disk jobs give back the file handles they held.)
            if let Ok(done) = jobs_inbox.try_recv() {
                d.on_job(Instant::now(), done);
                took = true;
            }
            if !took {
                break;
            }
        }
        d.drain(Instant::now()).await?;
    }

    tracing::info!("DAEMON(STOPPING)");
    drop(accept);
    d.node.shutdown(Instant::now());
    d.drain(Instant::now()).await?;
    Ok(())
}

/// Binds the UDP socket; with no port given, the port of the last run
/// when it is free. Peers, and NATs that keep a mapping's port, then
/// still reach us at our last address after a restart, which is how they
/// find us when the server is away.
async fn bind_udp_again(store: &Store, listen: SocketAddr) -> anyhow::Result<UdpSocket> {
    let last: Option<u16> = store.setting("udp_port")?.and_then(|p| p.parse().ok());
    let socket = match last.filter(|p| listen.port() == 0 && *p != 0) {
        Some(port) => match bind_udp(SocketAddr::new(listen.ip(), port)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(port, error = %e, "UDP(LAST_PORT_TAKEN)");
                bind_udp(listen).await?
            }
        },
        None => bind_udp(listen).await?,
    };
    let port = socket.local_addr()?.port();
    if last != Some(port) {
        // (Not worth failing a start over, on a full disk say.)
        if let Err(e) = store.set_setting("udp_port", &port.to_string()) {
            tracing::warn!(error = %e, "STORE(UDP_PORT_NOT_SAVED)");
        }
    }
    Ok(socket)
}

/// Binds the UDP socket. The default `[::]:port` takes both families on
/// one socket (IPV6_V6ONLY cleared, whatever the system default); on a
/// host without IPv6 it falls back to `0.0.0.0:port`.
async fn bind_udp(listen: SocketAddr) -> anyhow::Result<UdpSocket> {
    if listen.ip() != std::net::Ipv6Addr::UNSPECIFIED {
        return addrs::bind_udp(listen)
            .and_then(UdpSocket::from_std)
            .with_context(|| format!("cannot bind UDP socket {listen}"));
    }
    match addrs::bind_dual(listen.port()).and_then(UdpSocket::from_std) {
        Ok(s) => Ok(s),
        Err(e) => {
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), listen.port());
            tracing::info!(error = %e, "UDP(NO_IPV6_USING_IPV4)");
            addrs::bind_udp(v4)
                .and_then(UdpSocket::from_std)
                .with_context(|| format!("cannot bind UDP socket {v4}"))
        }
    }
}

/// Holds an exclusive `flock` on `<data dir>/p2pd.lock` for the daemon's
/// life: two daemons on one database would each deliver the other's
/// outbox. The kernel releases the lock when the process ends, however it
/// ends.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("p2pd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "another p2pd is already using the data directory {}",
            dir.display()
        );
    }
    Ok(file)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// A result for an answer given at once.
fn json<T: serde::Serialize>(v: &T) -> Result<Option<serde_json::Value>, ControlError> {
    Ok(Some(
        serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
    ))
}

/// A transfer id as the control API shows it: 16 hex digits.
fn hex_id(id: u64) -> String {
    format!("{id:016x}")
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    err(ErrorCode::Internal, e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn err(code: ErrorCode, message: impl Into<String>) -> ControlError {
    ControlError::new(code, message)
}

impl Daemon {
    fn next_deadline(&self) -> Option<Instant> {
        let waiters = self.waiters.iter().map(|w| w.deadline).min();
        [self.node.poll_timeout(), waiters]
            .into_iter()
            .flatten()
            .min()
    }

    /// Hands the node what the UDP socket has waiting (one batch read):
    /// how many datagrams, and bytes.
    fn read_udp(&mut self) -> (usize, usize) {
        let Daemon { udp, node, .. } = self;
        let now = Instant::now();
        udp.try_recv(|from, datagram| node.handle_datagram(now, from, datagram))
    }

    fn on_tcp(&mut self, now: Instant, ev: TcpEvent) {
        if ev.generation != self.tcp_generation || self.tcp.is_none() {
            return; // from a link already replaced or dropped
        }
        match ev.kind {
            TcpEventKind::Up => self.node.handle_tcp_up(now),
            TcpEventKind::Frame(frame) => {
                let server = self.config.server;
                self.node
                    .handle_datagram_via(now, Via::ServerTcp, server, &frame);
            }
            TcpEventKind::Down(why) => {
                self.tcp = None;
                self.node.handle_tcp_down(now, &why);
            }
        }
    }

    /// Opens and closes what the node asks for.
    fn on_transport(&mut self, command: TransportCommand) {
        match command {
            TransportCommand::ConnectTcp { server } => {
                self.tcp_generation += 1;
                self.tcp = Some(TcpLink::start(
                    server,
                    self.tcp_generation,
                    self.tcp_events.clone(),
                ));
            }
            TransportCommand::CloseTcp => self.tcp = None,
            TransportCommand::OpenSockets { first, count } => self.sockets.open(first, count),
            TransportCommand::CloseSockets { ids } => self.sockets.close(&ids),
        }
    }

    /// Drains the node: events (stored, then answered and broadcast),
    /// then datagrams, until it has nothing more to say.
    ///
    /// If the events cannot be stored, nothing is sent and the daemon
    /// stops with the error: an acknowledgement must never leave for a
    /// message that is not on disk. The sender keeps it, and delivers it
    /// once the daemon runs again.
    async fn drain(&mut self, now: Instant) -> anyhow::Result<()> {
        loop {
            let sends = std::mem::take(&mut self.sends);
            let mut events = Vec::new();
            while let Some(e) = self.node.poll_event() {
                events.push(e);
            }
            if !sends.is_empty() || !events.is_empty() {
                self.persist(now, sends, &events)?;
                for e in events {
                    self.on_event(now, e);
                }
                continue;
            }
            // File data is read as the flows let it go; an event that
            // comes of it stops the transmits until it is handled.
            let mut sent_any = false;
            // UDP datagrams go together at the end: runs to one address in
            // one system call where the kernel can.
            let mut datagrams = Vec::new();
            while let Some(t) = self.node.poll_transmit(now) {
                sent_any = true;
                match t.via {
                    Via::Udp => {
                        let dst = addrs::for_socket(t.dst, self.udp_v6);
                        datagrams.push((dst, t.payload));
                    }
                    Via::ServerTcp => match &self.tcp {
                        Some(tcp) => tcp.send(t.payload),
                        None => tracing::debug!("TCP(NOT_OPEN_DROP)"),
                    },
                    Via::Socket(id) => self.sockets.send(id, &t.payload, t.dst).await,
                }
            }
            self.udp.send_all(&datagrams).await;
            if !sent_any {
                return Ok(());
            }
        }
    }
}
