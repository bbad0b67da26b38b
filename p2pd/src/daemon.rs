//! The daemon task: the thin shell around [`proto::node::Node`].
//!
//! One task owns the node, the UDP socket and the database, so none of
//! them needs a lock. It waits for the first of: a datagram, a control
//! request, the node's next deadline (or a waiting request's), shutdown.
//! After each, it drains the node in the order the node's contract
//! states: events first (written to the database in one transaction,
//! then answered and broadcast), then datagrams. So a received message is
//! on disk before the acknowledgement that tells the sender to forget it.

use crate::addrs;
use crate::ctl::{self, Input, Out, Reply};
use crate::files::{self, Files, JobDone};
use crate::sockets::{Extra, Sockets};
use crate::store::Store;
use crate::store::TransferRow;
use crate::tcp::{TcpEvent, TcpEventKind, TcpLink};
use crate::Config;
use anyhow::Context;
use proto::client::{LinkState, RequestError};
use proto::control::{
    check_text, AutoAcceptSet, Cancelled, Closed, Command, Connected, ControlError, Declined,
    Direction, ErrorCode, Event, LoggedIn, PeerInfo, PeersResult, PingResult, Registered, Request,
    Response, Sent, TransferInfo, TransferState, UserInfo, Watching, Whoami,
};
use proto::identity::{fingerprint, to_hex, PublicIdentity};
use proto::node::{Node, NodeConfig, NodeError, NodeEvent};
use proto::peer::SessionPhase;
use proto::reliable::Outgoing;
use proto::transport::{TransportCommand, Via};
use proto::wire::{validate_name, FailReason, ServerToClient};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// How long `connect` waits: the server's introduction timeout (60 s)
/// plus punching and the handshake.
const CONNECT_WAIT: Duration = Duration::from_secs(90);
/// How long `accept` waits for the session after agreeing.
const ACCEPT_WAIT: Duration = Duration::from_secs(40);
const PING_WAIT: Duration = Duration::from_secs(5);
/// Requests answered by the server: a little over the link's own request
/// timeout, which answers first in the normal case.
const SERVER_WAIT: Duration = Duration::from_secs(15);
const HISTORY_DEFAULT: u32 = 50;

enum Wait {
    /// The answer to a server request with this rid.
    Rid(u32, RidKind),
    /// The session with this peer coming up (or failing); with the rid of
    /// our agreement, whose refusal by the server also ends the wait.
    Up(String, Option<u32>),
    Pong(String, u64),
    Login,
    /// The whole user list of this listing id.
    Users(u32),
}

enum RidKind {
    Register,
    Decline,
}

struct Waiter {
    id: u64,
    out: Reply,
    wait: Wait,
    deadline: Instant,
}

struct Daemon {
    config: Config,
    /// The protocol, with the disk side of file transfers ([`Files`]).
    node: Node<Files>,
    store: Store,
    udp: Arc<UdpSocket>,
    /// The socket is IPv6 (dual-stack): IPv4 destinations go v4-mapped.
    udp_v6: bool,
    waiters: Vec<Waiter>,
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
}

/// Most files one directory send may hold.
const MAX_DIR_FILES: usize = 10_000;

/// Integrity is checked by pieces of this size.
const PIECE_SIZE: u32 = proto::transfer::PIECE_SIZE;
/// Progress events per transfer at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
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
    let (identity, created) = proto::keyfile::load_or_create(&key_path)?;
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
        Some(hex) => proto::identity::key_from_hex(&hex),
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

    let udp = bind_udp(config.listen).await?;
    let local = udp.local_addr()?;
    let now = Instant::now();
    let (files, mut jobs_inbox) = Files::new();
    let mut node = Node::new(identity, node_config, now, rand::random(), files);
    node.set_locals(addrs::local_candidates(local, config.server));
    for c in store.contacts()? {
        if let Some(id) = c.identity {
            node.add_contact(now, &c.name, id, c.recv_next);
        }
    }
    let outbox = store.outbox()?;
    if !outbox.is_empty() {
        tracing::info!(messages = outbox.len(), "OUTBOX(RESTORED)");
    }
    for q in outbox {
        let msg = Outgoing {
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
        udp: Arc::new(udp),
        waiters: Vec::new(),
        watchers: HashMap::new(),
        tcp: None,
        tcp_events,
        tcp_generation: 0,
        sockets,
        progress: HashMap::new(),
        progress_shown: HashMap::new(),
        groups: HashMap::new(),
    };
    d.restore_transfers(Instant::now())?;
    d.drain(Instant::now()).await?;

    tokio::pin!(shutdown);
    // One byte more than the largest datagram, so a larger one is seen
    // (and dropped as oversized) rather than cut to fit.
    let mut buf = vec![0u8; proto::wire::MAX_DATAGRAM + 1];
    loop {
        let deadline = d.next_deadline();
        let udp = d.udp.clone();
        tokio::select! {
            _ = &mut shutdown => break,
            r = udp.recv_from(&mut buf) => match r {
                Ok((n, from)) => d.node.handle_datagram(Instant::now(), from, &buf[..n]),
                // An unconnected UDP socket can still report ICMP errors
                // on some systems; they say nothing about our session.
                Err(e) => tracing::debug!(error = %e, "UDP(RECV_ERROR)"),
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
            _ = sleep_until(deadline) => {
                let now = Instant::now();
                if d.node.poll_timeout().is_some_and(|t| t <= now) {
                    d.node.handle_timeout(now);
                }
                d.expire_waiters(now);
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

fn fail_error(reason: FailReason, detail: &str, what: &str) -> ControlError {
    let code = match reason {
        FailReason::NameTaken | FailReason::KeyAlreadyRegistered => ErrorCode::NameTaken,
        FailReason::NameInvalid | FailReason::SelfConnect => ErrorCode::InvalidArgument,
        FailReason::NotRegistered | FailReason::NotLoggedIn => ErrorCode::NotLoggedIn,
        FailReason::UnknownUser => ErrorCode::UnknownUser,
        FailReason::Offline => ErrorCode::Offline,
        FailReason::Declined => ErrorCode::Refused,
        FailReason::TimedOut => ErrorCode::TimedOut,
        FailReason::NoSuchIntro => ErrorCode::NoRequest,
        _ => ErrorCode::Internal,
    };
    let message = if detail.is_empty() {
        format!("{what}: {}", describe(reason))
    } else {
        format!("{what}: {detail}")
    };
    err(code, message)
}

/// A reason in words, for answers that carry no detail from the server.
fn describe(reason: FailReason) -> String {
    match reason {
        FailReason::NameTaken => "the name belongs to another key".into(),
        FailReason::UnknownUser => "no such user".into(),
        FailReason::Offline => "not online".into(),
        FailReason::Declined => "declined".into(),
        FailReason::TimedOut => "no answer in time".into(),
        FailReason::NotLoggedIn => "not logged in".into(),
        FailReason::SelfConnect => "that is you".into(),
        FailReason::NoSuchIntro => "no such request (it expired or was withdrawn)".into(),
        other => other.as_str().replace('_', " "),
    }
}

fn request_error(e: &RequestError, what: &str) -> ControlError {
    match e {
        RequestError::Failed { reason, detail } => fail_error(*reason, detail, what),
        RequestError::TimedOut => err(
            ErrorCode::TimedOut,
            format!("{what}: the rendezvous server did not answer"),
        ),
    }
}

fn respond(out: &Reply, resp: Response) {
    if let Ok(line) = serde_json::to_string(&resp) {
        // A client that stopped reading loses its answers, not the daemon.
        let _ = out.send(Out::Response(line));
    }
}

impl Daemon {
    fn next_deadline(&self) -> Option<Instant> {
        let waiters = self.waiters.iter().map(|w| w.deadline).min();
        [self.node.poll_timeout(), waiters]
            .into_iter()
            .flatten()
            .min()
    }

    fn wait(&mut self, now: Instant, id: u64, out: Reply, wait: Wait, for_: Duration) {
        self.waiters.push(Waiter {
            id,
            out,
            wait,
            deadline: now + for_,
        });
    }

    /// Answers (and removes) every waiter `f` picks.
    fn settle(
        &mut self,
        mut f: impl FnMut(&mut Wait) -> Option<Result<serde_json::Value, ControlError>>,
    ) {
        let mut i = 0;
        while i < self.waiters.len() {
            match f(&mut self.waiters[i].wait) {
                Some(result) => {
                    let w = self.waiters.swap_remove(i);
                    respond(&w.out, Response::from_result(w.id, result));
                }
                None => i += 1,
            }
        }
    }

    fn expire_waiters(&mut self, now: Instant) {
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.deadline <= now);
        self.waiters = keep;
        for w in due {
            let what = match &w.wait {
                Wait::Up(p, _) => format!("no session with {p} in time"),
                Wait::Pong(p, _) => format!("{p} did not answer the ping"),
                Wait::Login => "the rendezvous server did not answer the login".into(),
                Wait::Rid(..) | Wait::Users(_) => "the rendezvous server did not answer".into(),
            };
            respond(&w.out, Response::err(w.id, err(ErrorCode::TimedOut, what)));
        }
    }

    fn send_file(
        &mut self,
        peer: String,
        path: String,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        Self::check_name(&peer)?;
        if !self.node.is_known(&peer) {
            return Err(err(
                ErrorCode::NotConnected,
                format!("{peer} is not a contact yet: `p2pctl connect {peer}` first"),
            ));
        }
        let path = std::path::PathBuf::from(path);
        if !path.is_absolute() {
            return Err(err(ErrorCode::InvalidArgument, "the path must be absolute"));
        }
        let meta = std::fs::metadata(&path)
            .map_err(|e| err(ErrorCode::FileError, format!("{}: {e}", path.display())))?;
        if meta.is_dir() {
            return self.send_dir(peer, path);
        }
        if !meta.is_file() {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let id = self.new_transfer_id()?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unnamed".into());
        tracing::info!(id = %hex_id(id), %peer, size = meta.len(), "TRANSFER(HASHING)");
        self.node.io_mut().hash(
            id,
            peer.clone(),
            path.clone(),
            name.clone(),
            (0, 0),
            PIECE_SIZE,
        );
        json(&TransferInfo {
            id: hex_id(id),
            peer,
            direction: Direction::Out,
            name,
            size: meta.len(),
            done: 0,
            state: TransferState::Hashing,
            rate: None,
            eta_s: None,
            path: Some(path.display().to_string()),
            reason: None,
            group: None,
            files: None,
        })
    }

    /// Offers every regular file under `dir`, as one group: each file's
    /// name is its path from (and including) the directory's name.
    fn send_dir(
        &mut self,
        peer: String,
        dir: std::path::PathBuf,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        let top = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "folder".into());
        let list = files::walk(&dir, MAX_DIR_FILES)
            .map_err(|e| err(ErrorCode::FileError, format!("{}: {e}", dir.display())))?;
        if list.is_empty() {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("{} has no files", dir.display()),
            ));
        }
        if let Some((_, rel)) = list
            .iter()
            .find(|(_, rel)| top.len() + 1 + rel.len() > proto::wire::MAX_FILE_PATH)
        {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!(
                    "{top}/{rel} is longer than {} bytes",
                    proto::wire::MAX_FILE_PATH
                ),
            ));
        }
        let group = self.new_transfer_id()?;
        let n = list.len() as u32;
        let mut size = 0;
        for (path, rel) in list {
            size += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let id = self.new_transfer_id()?;
            self.groups.insert(id, group);
            self.node.io_mut().hash(
                id,
                peer.clone(),
                path,
                format!("{top}/{rel}"),
                (group, n),
                PIECE_SIZE,
            );
        }
        tracing::info!(group = %hex_id(group), %peer, files = n, size, "TRANSFER(HASHING_DIRECTORY)");
        json(&TransferInfo {
            id: hex_id(group),
            peer,
            direction: Direction::Out,
            name: top,
            size,
            done: 0,
            state: TransferState::Hashing,
            rate: None,
            eta_s: None,
            path: Some(dir.display().to_string()),
            reason: None,
            group: Some(hex_id(group)),
            files: Some(n),
        })
    }

    fn new_transfer_id(&self) -> Result<u64, ControlError> {
        loop {
            let id: u64 = rand::random();
            let taken = self.store.id_taken(id).map_err(internal)?
                || self.groups.contains_key(&id)
                || self.groups.values().any(|g| *g == id);
            if id != 0 && !taken {
                return Ok(id);
            }
        }
    }

    /// The group id of a transfer, as the API shows it.
    fn group_of(&self, id: u64) -> Option<String> {
        self.groups
            .get(&id)
            .filter(|g| **g != 0)
            .map(|g| hex_id(*g))
    }

    fn accept_file(
        &mut self,
        now: Instant,
        id: &str,
        to: Option<String>,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        let dir = match to {
            Some(d) => std::path::PathBuf::from(d),
            None => self.config.downloads.clone(),
        };
        if !dir.is_absolute() {
            return Err(err(
                ErrorCode::InvalidArgument,
                "the directory must be absolute",
            ));
        }
        // A directory: its id, or any of its files' ids.
        let by_group = self.find_group(id, true)?;
        let group = match by_group {
            Some(g) => Some(g),
            None => Some(self.find_transfer(id)?)
                .filter(|t| t.group != 0 && !t.outgoing)
                .map(|t| t.group),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| err(ErrorCode::FileError, format!("{}: {e}", dir.display())))?;
        if let Some(group) = group {
            return self.accept_group(now, group, &dir);
        }
        let row = self.find_transfer(id)?;
        if row.outgoing || row.state != TransferState::Offered {
            return Err(err(
                ErrorCode::NoTransfer,
                format!(
                    "transfer {} is not an offer waiting for you",
                    hex_id(row.id)
                ),
            ));
        }
        let name = files::sanitize(&row.name);
        self.accept_into(now, &row, &dir, &name)?;
        json(&self.transfer_info(&self.transfer_row(row.id)?))
    }

    /// Takes every file offered so far of directory `group` into a new
    /// directory under `dir` (its name, numbered if taken); files of it
    /// offered later follow by themselves.
    fn accept_group(
        &mut self,
        now: Instant,
        group: u64,
        dir: &std::path::Path,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        let members: Vec<TransferRow> = self
            .store
            .group_members(group)
            .map_err(internal)?
            .into_iter()
            .filter(|t| !t.outgoing)
            .collect();
        let key = format!("group_root:{}", hex_id(group));
        let root = match self.store.setting(&key).map_err(internal)? {
            Some(r) => std::path::PathBuf::from(r),
            None => {
                let top = members
                    .first()
                    .map(|t| files::sanitize_path(&t.name)[0].clone())
                    .unwrap_or_else(|| "folder".into());
                let root = files::unique_dir(dir, &top)
                    .map_err(|e| err(ErrorCode::FileError, format!("{}: {e}", dir.display())))?;
                self.store
                    .set_setting(&key, &root.display().to_string())
                    .map_err(internal)?;
                root
            }
        };
        for t in members.iter().filter(|t| t.state == TransferState::Offered) {
            self.accept_member(now, t, &root)?;
        }
        let first = members.first();
        json(&TransferInfo {
            id: hex_id(group),
            peer: first.map(|t| t.peer.clone()).unwrap_or_default(),
            direction: Direction::In,
            name: root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size: members.iter().map(|t| t.size).sum(),
            done: 0,
            state: TransferState::Active,
            rate: None,
            eta_s: None,
            path: Some(root.display().to_string()),
            reason: None,
            group: Some(hex_id(group)),
            files: first.map(|t| t.group_files),
        })
    }

    /// One file of a directory, under the directory's `root`.
    fn accept_member(
        &mut self,
        now: Instant,
        row: &TransferRow,
        root: &std::path::Path,
    ) -> Result<(), ControlError> {
        let parts = files::sanitize_path(&row.name);
        let (name, dirs) = parts.split_last().expect("never empty");
        // The first component is the directory itself: `root` stands for it.
        let mut parent = root.to_path_buf();
        for d in dirs.iter().skip(1) {
            parent.push(d);
        }
        std::fs::create_dir_all(&parent)
            .map_err(|e| err(ErrorCode::FileError, format!("{}: {e}", parent.display())))?;
        self.accept_into(now, row, &parent, name)
    }

    /// Accepts `row` as `dir/name` (numbered if taken).
    fn accept_into(
        &mut self,
        now: Instant,
        row: &TransferRow,
        dir: &std::path::Path,
        name: &str,
    ) -> Result<(), ControlError> {
        let taken: Vec<std::path::PathBuf> = self
            .store
            .active_incoming_paths()
            .map_err(internal)?
            .into_iter()
            .map(Into::into)
            .collect();
        let dest = files::unique_dest(dir, name, &taken);
        let final_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.to_owned());
        let part = dir.join(format!(".{final_name}.{}.part", hex_id(row.id)));
        let pieces = row.size.div_ceil(row.piece_size.max(1) as u64) as usize;
        // The same file, received before until the disk was full: go on
        // from what that transfer kept and verified.
        let mut verified = vec![0u8; pieces];
        let kept = self
            .store
            .kept_parts(&row.peer, &row.hash, row.size, row.piece_size)
            .unwrap_or_default()
            .into_iter()
            .filter(|k| k.id != row.id && k.verified.len() == pieces)
            .find_map(|k| {
                let old = std::path::PathBuf::from(k.part.clone()?);
                old.exists().then_some((k, old))
            });
        // (the old row and its part file, to give back if this fails)
        let mut taken = None;
        if let Some((k, old)) = kept {
            if std::fs::rename(&old, &part).is_ok() {
                verified = k.verified.clone();
                let held = verified.iter().filter(|v| **v == 1).count();
                tracing::info!(id = %hex_id(row.id), from = %hex_id(k.id), held, "TRANSFER(RESUMES_KEPT_PART)");
                taken = Some((k.id, old));
            }
        }
        self.node
            .io_mut()
            .open_part(row.id, &part, &dest)
            .map_err(|e| err(ErrorCode::FileError, format!("{}: {e}", part.display())))?;
        self.store
            .accept_transfer(
                row.id,
                &dest.display().to_string(),
                &part.display().to_string(),
                &verified,
            )
            .map_err(internal)?;
        tracing::info!(id = %hex_id(row.id), peer = %row.peer, "TRANSFER(ACCEPTED)");
        if let Some((old_id, _)) = &taken {
            let _ = self.store.forget_part(*old_id);
        }
        let have: Vec<bool> = verified.iter().map(|v| *v == 1).collect();
        if !self.node.accept_file(now, &row.peer, row.id, &have) {
            // Gone meanwhile (the peer cancelled): undo, leave nothing,
            // and a kept part file goes back to where it was.
            let reason = "no longer offered";
            if let Some((_, old)) = &taken {
                if std::fs::rename(&part, old).is_ok() {
                    self.node.io_mut().keep_part(row.id);
                }
            }
            self.end_transfer(row, reason);
            return Err(err(
                ErrorCode::NoTransfer,
                format!("transfer {} is {reason}", hex_id(row.id)),
            ));
        }
        Ok(())
    }

    /// The directory a prefix (four hex digits or more) names, if it names
    /// one; an error if it names several. `incoming`: only directories
    /// received.
    fn find_group(&self, id: &str, incoming: bool) -> Result<Option<u64>, ControlError> {
        let want = id.trim().to_ascii_lowercase();
        if want.len() < 4 {
            return Ok(None);
        }
        let mut groups: Vec<u64> = self
            .store
            .transfers()
            .map_err(internal)?
            .into_iter()
            .filter(|t| t.group != 0 && !(incoming && t.outgoing))
            .map(|t| t.group)
            .filter(|g| hex_id(*g).starts_with(&want))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        if groups.len() > 1 {
            return Err(err(
                ErrorCode::NoTransfer,
                format!("{want} names more than one directory; give more digits"),
            ));
        }
        Ok(groups.first().copied())
    }

    /// A transfer by its whole id.
    fn transfer_row(&self, id: u64) -> Result<TransferRow, ControlError> {
        self.store
            .transfer(id)
            .map_err(internal)?
            .ok_or_else(|| err(ErrorCode::NoTransfer, format!("no transfer {}", hex_id(id))))
    }

    /// A transfer by id, or by a prefix (four hex digits or more) that
    /// names exactly one.
    fn find_transfer(&self, id: &str) -> Result<TransferRow, ControlError> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() < 4 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("{id:?} is not a transfer id (hex digits, four or more)"),
            ));
        }
        let rows = self.store.transfers().map_err(internal)?;
        let mut hits = rows.into_iter().filter(|t| hex_id(t.id).starts_with(&id));
        match (hits.next(), hits.next()) {
            (Some(t), None) => Ok(t),
            (Some(_), Some(_)) => Err(err(
                ErrorCode::NoTransfer,
                format!("{id} names more than one transfer; give more digits"),
            )),
            (None, _) => Err(err(ErrorCode::NoTransfer, format!("no transfer {id}"))),
        }
    }

    fn transfer_list(&self) -> Result<Vec<TransferInfo>, ControlError> {
        Ok(self
            .store
            .transfers()
            .map_err(internal)?
            .iter()
            .map(|t| self.transfer_info(t))
            .collect())
    }

    fn transfer_info(&self, t: &TransferRow) -> TransferInfo {
        let live = self
            .node
            .transfer_status()
            .into_iter()
            .find(|(_, s)| s.id == t.id)
            .map(|(_, s)| s);
        let done = match (&live, t.state) {
            (_, TransferState::Done) => t.size,
            (Some(s), _) => s.done,
            (None, _) if !t.outgoing => {
                let held = t.verified.iter().filter(|v| **v == 1).count() as u64;
                (held * t.piece_size as u64).min(t.size)
            }
            _ => 0,
        };
        let state = match (&live, t.state) {
            (Some(s), TransferState::Active) if s.phase == proto::transfer::Phase::Finishing => {
                TransferState::Finishing
            }
            (_, st) => st,
        };
        let rate = (state == TransferState::Active)
            .then(|| self.rate(t.id))
            .flatten();
        let eta_s = rate
            .filter(|r| *r > 0.0)
            .map(|r| t.size.saturating_sub(done) as f64 / r);
        TransferInfo {
            id: hex_id(t.id),
            peer: t.peer.clone(),
            direction: if t.outgoing {
                Direction::Out
            } else {
                Direction::In
            },
            name: match (t.outgoing, t.group) {
                (true, _) => t.name.clone(),
                (false, 0) => files::sanitize(&t.name),
                (false, _) => files::sanitize_path(&t.name).join("/"),
            },
            size: t.size,
            done,
            state,
            rate,
            eta_s,
            path: t.path.clone(),
            reason: t.reason.clone(),
            group: (t.group != 0).then(|| hex_id(t.group)),
            files: (t.group != 0).then_some(t.group_files),
        }
    }

    fn rate(&self, id: u64) -> Option<f64> {
        let s = self.progress.get(&id)?;
        let (first, last) = (s.front()?, s.back()?);
        let dt = last.0.saturating_duration_since(first.0).as_secs_f64();
        (dt > 0.2).then(|| last.1.saturating_sub(first.1) as f64 / dt)
    }

    fn note_progress(&mut self, now: Instant, id: u64, done: u64) {
        let s = self.progress.entry(id).or_default();
        s.push_back((now, done));
        while s
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            s.pop_front();
        }
    }

    /// Takes up stored transfers after a start: incoming ones under way
    /// resume from their verified pieces, outgoing ones are offered again
    /// (if their file did not change).
    fn restore_transfers(&mut self, now: Instant) -> anyhow::Result<()> {
        for t in self.store.transfers()? {
            if t.group != 0 {
                self.groups.insert(t.id, t.group);
            }
            match (t.outgoing, t.state) {
                (true, TransferState::Offered | TransferState::Active) => {
                    let path = t.path.clone().unwrap_or_default();
                    let unchanged = std::fs::metadata(&path).is_ok_and(|m| {
                        m.len() == t.size && Some(files::mtime_ns(&m)) == t.mtime_ns
                    });
                    let hashes: Vec<[u8; 32]> = t
                        .piece_hashes
                        .chunks_exact(32)
                        .map(|c| c.try_into().unwrap_or([0; 32]))
                        .collect();
                    let opened = unchanged
                        && self
                            .node
                            .io_mut()
                            .open_source(t.id, path.as_ref(), t.size, t.mtime_ns.unwrap_or(0))
                            .is_ok();
                    if !opened {
                        let why = "the file changed or vanished since it was offered";
                        let told = "the sender's file changed or vanished";
                        self.end_at_restart(now, &t, why, told)?;
                        continue;
                    }
                    tracing::info!(id = %hex_id(t.id), peer = %t.peer, "TRANSFER(RESUME_SENDING)");
                    self.node.offer_file(
                        now,
                        &t.peer,
                        t.id,
                        t.name.clone(),
                        t.size,
                        t.piece_size,
                        t.hash,
                        hashes,
                        (t.group, t.group_files),
                    );
                }
                (false, TransferState::Offered) => {
                    self.node.restore_offer(
                        now,
                        &t.peer,
                        t.id,
                        t.name.clone(),
                        t.size,
                        t.piece_size,
                        t.hash,
                    );
                }
                (false, TransferState::Active) => {
                    let Some(part) = t.part.clone() else { continue };
                    // A part file that vanished would make its verified
                    // pieces a lie: the transfer ends instead.
                    let exists = std::path::Path::new(&part).exists();
                    if !exists
                        || self
                            .node
                            .io_mut()
                            .open_part(
                                t.id,
                                part.as_ref(),
                                t.path.as_deref().unwrap_or_default().as_ref(),
                            )
                            .is_err()
                    {
                        let told = "the receiver's partial file is gone";
                        self.end_at_restart(now, &t, "the partial file is gone", told)?;
                        continue;
                    }
                    let have: Vec<bool> = t.verified.iter().map(|v| *v == 1).collect();
                    tracing::info!(id = %hex_id(t.id), peer = %t.peer, held = have.iter().filter(|h| **h).count(), "TRANSFER(RESUME_RECEIVING)");
                    self.node.restore_incoming(
                        now,
                        &t.peer,
                        t.id,
                        t.name.clone(),
                        t.size,
                        t.piece_size,
                        t.hash,
                        &have,
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A transfer that cannot go on after a restart: ended here (`why`,
    /// for `transfers`) and on the peer's side (`told`, without our paths).
    fn end_at_restart(
        &mut self,
        now: Instant,
        t: &TransferRow,
        why: &str,
        told: &str,
    ) -> anyhow::Result<()> {
        self.store
            .transfer_state(t.id, TransferState::Ended, None, Some(why))?;
        self.node.tell_ended(now, &t.peer, t.id, told);
        Ok(())
    }

    fn end_transfer(&mut self, row: &TransferRow, reason: &str) {
        if let Err(e) = self
            .store
            .transfer_state(row.id, TransferState::Ended, None, Some(reason))
        {
            tracing::error!(error = %e, "STORE(TRANSFER_STATE)");
        }
        if !row.outgoing && self.node.io_mut().discard_part(row.id) {
            // Removed: nothing left to resume into.
            let _ = self.store.forget_part(row.id);
        }
        self.node.io_mut().close(row.id);
        self.progress.remove(&row.id);
        self.broadcast(Event::TransferFailed {
            id: hex_id(row.id),
            peer: row.peer.clone(),
            reason: reason.to_owned(),
            group: self.group_of(row.id),
        });
    }

    /// A write into an incoming file failed: end the transfer on both
    /// sides, saying why (a full disk keeps what arrived).
    fn write_failed(&mut self, now: Instant, peer: &str, id: u64, e: std::io::Error) {
        let Ok(row) = self.transfer_row(id) else {
            return;
        };
        if row.state != TransferState::Active {
            return; // ended already: packets still in flight
        }
        let full = e.raw_os_error() == Some(libc::ENOSPC);
        // The peer is told why, not where our files are.
        let (told, reason) = if full {
            // What arrived stays, for the user to look at or to free space
            // and have it sent again.
            self.node.io_mut().keep_part(id);
            (
                "the receiver's disk is full".to_owned(),
                format!(
                    "the receiver's disk is full (what arrived is kept in {}; the same file sent again goes on from there)",
                    row.part.as_deref().unwrap_or("the .part file")
                ),
            )
        } else {
            let r = format!("cannot write the file: {e}");
            ("the receiver cannot write the file".to_owned(), r)
        };
        tracing::warn!(id = %hex_id(id), %reason, "TRANSFER(WRITE_FAILED)");
        self.node.cancel_file(now, peer, id, &told);
        self.end_transfer(&row, &reason);
    }

    fn on_job(&mut self, now: Instant, done: JobDone) {
        match done {
            JobDone::Hashed {
                id,
                peer,
                path,
                name,
                group,
                size,
                mtime_ns,
                hash,
                piece_hashes,
            } => {
                if let Err(e) = self.node.io_mut().open_source(id, &path, size, mtime_ns) {
                    self.broadcast(Event::TransferFailed {
                        id: hex_id(id),
                        peer,
                        reason: format!("{}: {e}", path.display()),
                        group: self.group_of(id),
                    });
                    return;
                }
                let row = TransferRow {
                    id,
                    peer: peer.clone(),
                    outgoing: true,
                    name: name.clone(),
                    path: Some(path.display().to_string()),
                    part: None,
                    size,
                    piece_size: PIECE_SIZE,
                    hash,
                    piece_hashes: piece_hashes.concat(),
                    verified: Vec::new(),
                    mtime_ns: Some(mtime_ns),
                    state: TransferState::Offered,
                    reason: None,
                    created_ms: now_ms(),
                    group: group.0,
                    group_files: group.1,
                };
                if let Err(e) = self.store.insert_transfer(&row) {
                    tracing::error!(error = %e, "STORE(TRANSFER_INSERT)");
                    return;
                }
                tracing::info!(id = %hex_id(id), %peer, size, "TRANSFER(OFFERED)");
                self.node.offer_file(
                    now,
                    &peer,
                    id,
                    name,
                    size,
                    PIECE_SIZE,
                    hash,
                    piece_hashes,
                    group,
                );
            }
            JobDone::HashFailed {
                id,
                peer,
                path,
                name,
                group,
                error,
            } => {
                if group.0 != 0 {
                    // The receiver counts the directory's files: tell it
                    // this one will not come (what, not where or why).
                    let reason = "the sender could not read it";
                    self.node.skip_file(now, &peer, id, name, group, reason);
                }
                self.broadcast(Event::TransferFailed {
                    id: hex_id(id),
                    peer,
                    reason: format!("cannot read {}: {error}", path.display()),
                    group: self.group_of(id),
                });
            }
            JobDone::Piece {
                peer,
                id,
                piece,
                ok,
            } => {
                if ok {
                    if let Err(e) = self.store.piece_verified(id, piece) {
                        tracing::error!(error = %e, "STORE(PIECE)");
                    }
                }
                self.node.piece_checked(now, &peer, id, piece, ok);
            }
            JobDone::WriteFailed { peer, id, error } => self.write_failed(now, &peer, id, error),
            JobDone::File { peer, id, result } => {
                match &result {
                    Ok(path) => {
                        self.node.io_mut().finished(id);
                        let p = path.display().to_string();
                        if let Err(e) =
                            self.store
                                .transfer_state(id, TransferState::Done, Some(&p), None)
                        {
                            tracing::error!(error = %e, "STORE(TRANSFER_STATE)");
                        }
                        tracing::info!(id = %hex_id(id), %peer, "TRANSFER(RECEIVED)");
                        self.broadcast(Event::TransferDone {
                            id: hex_id(id),
                            peer: peer.clone(),
                            path: Some(p),
                            group: self.group_of(id),
                        });
                    }
                    Err(reason) => {
                        tracing::warn!(id = %hex_id(id), %peer, %reason, "TRANSFER(VERIFY_FAILED)");
                    }
                }
                self.node.file_checked(now, &peer, id, result.map(|_| ()));
            }
        }
    }

    fn on_transfer(&mut self, now: Instant, peer: String, event: proto::transfer::TransferEvent) {
        use proto::transfer::TransferEvent as T;
        match event {
            T::Offered {
                id,
                path,
                size,
                piece_size,
                hash,
                group,
                group_files,
            } => {
                if group != 0 {
                    self.groups.insert(id, group);
                }
                // A repeat of an offer we know keeps its record; one we
                // finished or ended is answered as such, not shown again.
                let known = self.store.transfer(id).ok().flatten();
                match known.as_ref().map(|t| t.state) {
                    Some(TransferState::Done) => return self.node.already_have(now, &peer, id),
                    Some(TransferState::Ended) => {
                        self.node.cancel_file(now, &peer, id, "this transfer ended");
                        return;
                    }
                    _ => {}
                }
                if known.is_none() {
                    let row = TransferRow {
                        id,
                        peer: peer.clone(),
                        outgoing: false,
                        name: path.clone(),
                        path: None,
                        part: None,
                        size,
                        piece_size,
                        hash,
                        piece_hashes: Vec::new(),
                        verified: Vec::new(),
                        mtime_ns: None,
                        state: TransferState::Offered,
                        reason: None,
                        created_ms: now_ms(),
                        group,
                        group_files,
                    };
                    if let Err(e) = self.store.insert_transfer(&row) {
                        tracing::error!(error = %e, "STORE(TRANSFER_INSERT)");
                        return;
                    }
                    // From a peer whose files we take without asking.
                    let auto = self
                        .store
                        .setting(&format!("auto_accept:{peer}"))
                        .ok()
                        .flatten()
                        .filter(|d| !d.is_empty());
                    if let Some(dir) = auto {
                        let dir = std::path::PathBuf::from(dir);
                        let _ = std::fs::create_dir_all(&dir);
                        let done = if group != 0 {
                            self.accept_group(now, group, &dir).map(|_| ())
                        } else {
                            self.accept_into(now, &row, &dir, &files::sanitize(&path))
                        };
                        match done {
                            Ok(()) => {
                                tracing::info!(id = %hex_id(id), %peer, "TRANSFER(AUTO_ACCEPTED)");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e.message, "TRANSFER(AUTO_ACCEPT_FAILED)")
                            }
                        }
                    }
                    // A file of a directory already accepted follows it.
                    let root = self
                        .store
                        .setting(&format!("group_root:{}", hex_id(group)))
                        .ok()
                        .flatten()
                        .filter(|_| group != 0);
                    if let Some(root) = root {
                        if let Err(e) = self.accept_member(now, &row, root.as_ref()) {
                            tracing::warn!(error = %e.message, "TRANSFER(GROUP_ACCEPT_FAILED)");
                        }
                        return;
                    }
                }
                tracing::info!(id = %hex_id(id), %peer, size, "TRANSFER(OFFER_RECEIVED)");
                let (name, group, files) = if group != 0 {
                    (
                        files::sanitize_path(&path).join("/"),
                        Some(hex_id(group)),
                        Some(group_files),
                    )
                } else {
                    (files::sanitize(&path), None, None)
                };
                self.broadcast(Event::FileOffer {
                    id: hex_id(id),
                    peer,
                    name,
                    size,
                    group,
                    files,
                });
            }
            T::Skipped {
                id,
                path,
                group,
                group_files,
                reason,
            } => {
                if self.store.transfer(id).ok().flatten().is_some() {
                    return; // told again: known
                }
                let reason = format!("{path}: {reason}");
                let row = TransferRow {
                    id,
                    peer: peer.clone(),
                    outgoing: false,
                    name: path,
                    path: None,
                    part: None,
                    size: 0,
                    piece_size: 0,
                    hash: [0; 32],
                    piece_hashes: Vec::new(),
                    verified: Vec::new(),
                    mtime_ns: None,
                    state: TransferState::Ended,
                    reason: Some(reason.clone()),
                    created_ms: now_ms(),
                    group,
                    group_files,
                };
                if let Err(e) = self.store.insert_transfer(&row) {
                    tracing::error!(error = %e, "STORE(TRANSFER_INSERT)");
                    return;
                }
                self.groups.insert(id, group);
                tracing::info!(id = %hex_id(id), %peer, "TRANSFER(SKIPPED)");
                self.broadcast(Event::TransferFailed {
                    id: hex_id(id),
                    peer,
                    reason,
                    group: Some(hex_id(group)),
                });
            }
            T::Accepted { id } => {
                let _ = self
                    .store
                    .transfer_state(id, TransferState::Active, None, None);
                tracing::info!(id = %hex_id(id), %peer, "TRANSFER(PEER_ACCEPTED)");
            }
            // Disk work goes to the node's `FileIo`, never here.
            T::Write { .. } | T::VerifyPiece { .. } | T::VerifyFile { .. } => {}
            T::Progress { id, done } => {
                self.note_progress(now, id, done);
                let due = self
                    .progress_shown
                    .get(&id)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= PROGRESS_EVERY);
                if due {
                    self.progress_shown.insert(id, now);
                    let size = self
                        .node
                        .transfer_status()
                        .into_iter()
                        .find(|(_, s)| s.id == id)
                        .map_or(0, |(_, s)| s.size);
                    let rate = self.rate(id);
                    let group = self.group_of(id);
                    self.broadcast(Event::TransferProgress {
                        id: hex_id(id),
                        peer,
                        done,
                        size,
                        rate,
                        group,
                    });
                }
            }
            T::Finished { id } => {
                let Ok(row) = self.transfer_row(id) else {
                    return;
                };
                self.progress.remove(&id);
                self.progress_shown.remove(&id);
                if row.outgoing {
                    self.node.io_mut().close(id);
                    let _ = self
                        .store
                        .transfer_state(id, TransferState::Done, None, None);
                    tracing::info!(id = %hex_id(id), %peer, "TRANSFER(SENT)");
                    let group = self.group_of(id);
                    self.broadcast(Event::TransferDone {
                        id: hex_id(id),
                        peer,
                        path: row.path,
                        group,
                    });
                }
            }
            T::Ended { id, reason } => {
                if let Ok(row) = self.transfer_row(id) {
                    if !row.state.is_final() {
                        tracing::info!(id = %hex_id(id), %peer, %reason, "TRANSFER(ENDED)");
                        self.end_transfer(&row, &reason);
                    }
                }
            }
            T::ReadFailed { id, error } => {
                tracing::warn!(id = %hex_id(id), %peer, %error, "TRANSFER(READ_FAILED)");
            }
        }
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

    fn broadcast(&mut self, event: Event) {
        let Ok(line) = serde_json::to_string(&event) else {
            return;
        };
        self.watchers.retain(|conn, out| {
            let ok = out.send(Out::Event(line.clone()));
            if !ok {
                tracing::warn!(conn, "CONTROL(WATCHER_TOO_SLOW_DROPPED)");
            }
            ok
        });
    }

    fn on_input(&mut self, now: Instant, input: Input) {
        match input {
            Input::Closed { conn } => {
                self.watchers.remove(&conn);
            }
            Input::Request { conn, request, out } => {
                let Request { id, command } = request;
                tracing::debug!(conn, id, cmd = command.name(), "CONTROL(REQUEST)");
                match self.command(now, conn, id, command, &out) {
                    Ok(None) => {} // a waiter answers later
                    result => respond(
                        &out,
                        Response::from_result(id, result.map(Option::unwrap_or_default)),
                    ),
                }
            }
        }
    }

    fn check_name(name: &str) -> Result<(), ControlError> {
        validate_name(name).map_err(|e| err(ErrorCode::InvalidArgument, format!("{name:?}: {e}")))
    }

    fn require_login(&self) -> Result<(), ControlError> {
        match self.node.link_state() {
            LinkState::LoggedIn => Ok(()),
            LinkState::KeyMismatch => Err(err(
                ErrorCode::ServerKeyMismatch,
                "the rendezvous server's key changed; see the daemon's log",
            )),
            _ if self.node.link().name().is_none() => Err(err(
                ErrorCode::NotLoggedIn,
                "not registered: run `p2pctl register NAME` first",
            )),
            _ => Err(err(
                ErrorCode::NotLoggedIn,
                format!(
                    "not logged in: the rendezvous server {} is not reachable yet",
                    self.config.server
                ),
            )),
        }
    }

    /// Runs one command: `Ok(Some(result))` answers now, `Ok(None)` means a
    /// waiter will answer.
    fn command(
        &mut self,
        now: Instant,
        conn: u64,
        id: u64,
        command: Command,
        out: &Reply,
    ) -> Result<Option<serde_json::Value>, ControlError> {
        match command {
            Command::SendFile { peer, path } => self.send_file(peer, path),
            Command::AcceptFile { transfer, to } => self.accept_file(now, &transfer, to),
            Command::AutoAccept { peer, dir } => {
                Self::check_name(&peer)?;
                if let Some(d) = &dir {
                    if !std::path::Path::new(d).is_absolute() {
                        return Err(err(
                            ErrorCode::InvalidArgument,
                            "the directory must be absolute",
                        ));
                    }
                }
                self.store
                    .set_setting(&format!("auto_accept:{peer}"), dir.as_deref().unwrap_or(""))
                    .map_err(internal)?;
                tracing::info!(%peer, on = dir.is_some(), "TRANSFER(AUTO_ACCEPT)");
                json(&AutoAcceptSet { peer, dir })
            }
            Command::Transfers => {
                let list = self.transfer_list()?;
                json(&list)
            }
            Command::Cancel { transfer } => {
                // A directory: cancel each of its files not finished.
                let members = match self.find_group(&transfer, false)? {
                    Some(g) => self.store.group_members(g).map_err(internal)?,
                    None => Vec::new(),
                };
                if !members.is_empty() {
                    for row in members.iter().filter(|t| !t.state.is_final()) {
                        self.node
                            .cancel_file(now, &row.peer, row.id, "cancelled by the user");
                        self.end_transfer(row, "cancelled by the user");
                    }
                    let group = hex_id(members[0].group);
                    return json(&Cancelled::Directory(
                        self.transfer_list()?
                            .into_iter()
                            .filter(|t| t.group.as_deref() == Some(group.as_str()))
                            .collect(),
                    ));
                }
                let row = self.find_transfer(&transfer)?;
                if row.state.is_final() {
                    return Err(err(
                        ErrorCode::NoTransfer,
                        format!("transfer {} is already {}", hex_id(row.id), row.state),
                    ));
                }
                let reason = "cancelled by the user";
                self.node.cancel_file(now, &row.peer, row.id, reason);
                self.end_transfer(&row, reason);
                json(&Cancelled::One(
                    self.transfer_info(&self.transfer_row(row.id)?),
                ))
            }
            Command::Whoami => {
                let link = self.node.link();
                json(&Whoami {
                    name: link.name().map(str::to_owned),
                    fingerprint: self.node.identity().fingerprint(),
                    server: self.config.server.to_string(),
                    server_state: link.state().as_str().into(),
                    server_fingerprint: link.server_key().map(|k| fingerprint(&k)),
                    observed: link.observed().map(|a| a.to_string()),
                    data_dir: self.config.data_dir.display().to_string(),
                })
            }
            Command::Register { name } => {
                Self::check_name(&name)?;
                if self.node.link_state() == LinkState::KeyMismatch {
                    self.require_login()?;
                }
                let rid = self.node.register(now, &name);
                self.wait(
                    now,
                    id,
                    out.clone(),
                    Wait::Rid(rid, RidKind::Register),
                    SERVER_WAIT,
                );
                Ok(None)
            }
            Command::Login => {
                if self.node.link().name().is_none() {
                    return Err(err(
                        ErrorCode::NotLoggedIn,
                        "not registered: run `p2pctl register NAME` first",
                    ));
                }
                self.node.relogin(now);
                self.wait(now, id, out.clone(), Wait::Login, SERVER_WAIT);
                Ok(None)
            }
            Command::Users => {
                self.require_login()?;
                let rid = self.node.list_users(now);
                self.wait(now, id, out.clone(), Wait::Users(rid), SERVER_WAIT);
                Ok(None)
            }
            Command::Connect { peer } => {
                Self::check_name(&peer)?;
                if let Some(c) = self.connected(&peer) {
                    return json(&c);
                }
                self.require_login()?;
                self.node.connect(now, &peer);
                self.wait(now, id, out.clone(), Wait::Up(peer, None), CONNECT_WAIT);
                Ok(None)
            }
            Command::Accept { peer } => {
                Self::check_name(&peer)?;
                let rid = self.node.answer(now, &peer, true).map_err(node_error)?;
                self.wait(now, id, out.clone(), Wait::Up(peer, Some(rid)), ACCEPT_WAIT);
                Ok(None)
            }
            Command::Decline { peer } => {
                Self::check_name(&peer)?;
                let rid = self.node.answer(now, &peer, false).map_err(node_error)?;
                self.wait(
                    now,
                    id,
                    out.clone(),
                    Wait::Rid(rid, RidKind::Decline),
                    SERVER_WAIT,
                );
                Ok(None)
            }
            Command::Ping { peer } => {
                Self::check_name(&peer)?;
                let nonce = self.node.ping(now, &peer).map_err(node_error)?;
                self.wait(now, id, out.clone(), Wait::Pong(peer, nonce), PING_WAIT);
                Ok(None)
            }
            Command::Send { peer, text } => {
                Self::check_name(&peer)?;
                check_text(&text)?;
                let up = self.node.is_up(&peer);
                if !up && !self.node.is_known(&peer) {
                    return Err(err(
                        ErrorCode::NotConnected,
                        format!("not connected to {peer}: run `p2pctl connect {peer}` first"),
                    ));
                }
                let sent_ms = now_ms();
                let seq = self
                    .store
                    .enqueue(&peer, sent_ms, &text)
                    .map_err(|e| err(ErrorCode::Internal, format!("message not stored: {e}")))?;
                self.node.send_message(
                    now,
                    &peer,
                    Outgoing {
                        seq,
                        sent_ms,
                        body: text.into_bytes(),
                    },
                );
                json(&Sent {
                    peer,
                    seq,
                    queued: !up,
                })
            }
            Command::History { peer, limit } => {
                Self::check_name(&peer)?;
                let h = self
                    .store
                    .history(&peer, limit.unwrap_or(HISTORY_DEFAULT))
                    .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
                json(&h)
            }
            Command::Peers => {
                let peers = self
                    .node
                    .peer_status()
                    .into_iter()
                    .map(|p| PeerInfo {
                        name: p.name,
                        state: p.phase.as_str().into(),
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        path: p.endpoint.map(|e| self.node.path_name(e).to_owned()),
                        technique: p.technique.map(str::to_owned),
                        rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                        fingerprint: p.fingerprint,
                        queued: p.queued,
                    })
                    .collect();
                let requests = self
                    .node
                    .pending_requests()
                    .into_iter()
                    .map(|(name, id)| UserInfo {
                        name,
                        fingerprint: id.fingerprint(),
                    })
                    .collect();
                json(&PeersResult { peers, requests })
            }
            Command::Close { peer } => {
                Self::check_name(&peer)?;
                self.node.close(now, &peer).map_err(|_| {
                    err(
                        ErrorCode::NotConnected,
                        format!("no session with {peer} to close"),
                    )
                })?;
                json(&Closed { peer })
            }
            Command::Watch => {
                tracing::info!(conn, "CONTROL(WATCH)");
                self.watchers.insert(conn, out.clone());
                json(&Watching { watching: true })
            }
        }
    }

    fn connected(&self, peer: &str) -> Option<Connected> {
        self.node
            .peer_status()
            .into_iter()
            .find(|p| p.name == peer && p.phase == SessionPhase::Established)
            .map(|p| Connected {
                peer: p.name,
                endpoint: p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                path: p
                    .endpoint
                    .map(|e| self.node.path_name(e))
                    .unwrap_or_default()
                    .to_owned(),
                fingerprint: p.fingerprint.unwrap_or_default(),
            })
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
            let mut events = Vec::new();
            while let Some(e) = self.node.poll_event() {
                events.push(e);
            }
            if !events.is_empty() {
                self.persist(&events)?;
                for e in events {
                    self.on_event(now, e);
                }
                continue;
            }
            // File data is read as the flows let it go; an event that
            // comes of it stops the transmits until it is handled.
            let mut sent_any = false;
            while let Some(t) = self.node.poll_transmit(now) {
                sent_any = true;
                match t.via {
                    Via::Udp => {
                        let dst = addrs::for_socket(t.dst, self.udp_v6);
                        if let Err(e) = self.udp.send_to(&t.payload, dst).await {
                            tracing::debug!(dst = %t.dst, error = %e, "UDP(SEND_ERROR)");
                        }
                    }
                    Via::ServerTcp => match &self.tcp {
                        Some(tcp) => tcp.send(t.payload),
                        None => tracing::debug!("TCP(NOT_OPEN_DROP)"),
                    },
                    Via::Socket(id) => self.sockets.send(id, &t.payload, t.dst).await,
                }
            }
            if !sent_any {
                return Ok(());
            }
        }
    }

    /// Writes what the events change, in one transaction.
    fn persist(&mut self, events: &[NodeEvent]) -> anyhow::Result<()> {
        let writes =
            |e: &NodeEvent| matches!(e, NodeEvent::Delivered { .. } | NodeEvent::Acked { .. });
        if !events.iter().any(writes) {
            return Ok(());
        }
        let result = (|| {
            let batch = self.store.batch()?;
            for e in events {
                match e {
                    NodeEvent::Delivered {
                        peer,
                        seq,
                        sent_ms,
                        body,
                    } => batch.received(peer, *seq, *sent_ms, &String::from_utf8_lossy(body))?,
                    NodeEvent::Acked { peer, seq } => batch.delivered(peer, *seq)?,
                    _ => {}
                }
            }
            batch.commit()
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "STORE(WRITE_FAILED)");
            self.broadcast(Event::Error {
                message: format!("p2pd is stopping: it could not store messages: {e}"),
            });
            anyhow::bail!(
                "stopping: could not store received messages ({e}); nothing was acknowledged, \
                 the senders keep them until p2pd runs again"
            );
        }
        Ok(())
    }

    fn on_event(&mut self, now: Instant, event: NodeEvent) {
        match event {
            NodeEvent::ServerConnected {
                server_key,
                learned,
            } => {
                if learned {
                    tracing::warn!(
                        fingerprint = %fingerprint(&server_key),
                        "SERVER_KEY(PINNED_ON_FIRST_USE)"
                    );
                    eprintln!(
                        "p2pd: pinned the rendezvous server's key on first use: {} (fingerprint {})",
                        to_hex(&server_key),
                        fingerprint(&server_key)
                    );
                }
                if let Err(e) = self.store.set_setting("server_key", &to_hex(&server_key)) {
                    tracing::error!(error = %e, "STORE(WRITE_FAILED)");
                }
                self.broadcast(Event::Server {
                    state: "connected".into(),
                    detail: format!("server key {}", fingerprint(&server_key)),
                });
            }
            NodeEvent::ServerKeyMismatch { pinned, offered } => {
                let detail = format!(
                    "REFUSING the rendezvous server: its key is {} but {} was pinned. \
                     If the server really changed its key, restart p2pd with --server-key {}",
                    fingerprint(&offered),
                    fingerprint(&pinned),
                    to_hex(&offered)
                );
                tracing::error!("SERVER_KEY(MISMATCH) {detail}");
                eprintln!("p2pd: {detail}");
                self.broadcast(Event::Server {
                    state: "key_mismatch".into(),
                    detail: detail.clone(),
                });
                self.settle(|w| {
                    matches!(w, Wait::Login | Wait::Rid(..) | Wait::Users(_))
                        .then(|| Err(err(ErrorCode::ServerKeyMismatch, detail.clone())))
                });
            }
            NodeEvent::ServerDown { reason } => {
                tracing::warn!(%reason, "SERVER(DOWN)");
                self.broadcast(Event::Server {
                    state: "down".into(),
                    detail: reason,
                });
            }
            NodeEvent::LoggedIn { name, observed } => {
                tracing::info!(%name, %observed, "SERVER(LOGGED_IN)");
                if let Err(e) = self.store.set_setting("name", &name) {
                    tracing::error!(error = %e, "STORE(WRITE_FAILED)");
                }
                self.broadcast(Event::Server {
                    state: "logged_in".into(),
                    detail: format!("as {name}, seen from {observed}"),
                });
                let v = serde_json::to_value(LoggedIn {
                    name: name.clone(),
                    observed: observed.to_string(),
                })
                .unwrap_or_default();
                self.settle(|w| matches!(w, Wait::Login).then(|| Ok(v.clone())));
            }
            NodeEvent::LoginFailed { reason, detail } => {
                let e = fail_error(reason, &detail, "login failed");
                tracing::warn!(%e, "SERVER(LOGIN_FAILED)");
                self.broadcast(Event::Server {
                    state: "login_failed".into(),
                    detail: e.message.clone(),
                });
                self.settle(|w| matches!(w, Wait::Login).then(|| Err(e.clone())));
            }
            NodeEvent::Response { rid, result } => self.on_response(rid, result),
            NodeEvent::Users { id, result } => {
                let answer = match result {
                    Ok(users) => Ok(serde_json::to_value(
                        users
                            .into_iter()
                            .map(|u| UserInfo {
                                fingerprint: fingerprint(&u.sign_key),
                                name: u.name,
                            })
                            .collect::<Vec<_>>(),
                    )
                    .unwrap_or_default()),
                    Err(e) => Err(request_error(&e, "cannot list users")),
                };
                self.settle(|w| matches!(w, Wait::Users(r) if *r == id).then(|| answer.clone()));
            }
            NodeEvent::ConnectRequest {
                name,
                identity,
                auto_accepted,
            } => {
                tracing::info!(peer = %name, auto_accepted, "INTRO(REQUESTED)");
                self.broadcast(Event::ConnectRequest {
                    peer: name,
                    fingerprint: identity.fingerprint(),
                    auto_accepted,
                });
            }
            NodeEvent::ConnectFailed { name, reason } => {
                let e = fail_error(reason, "", &format!("cannot connect to {name}"));
                tracing::info!(peer = %name, reason = reason.as_str(), "INTRO(FAILED)");
                self.broadcast(Event::ConnectFailed {
                    peer: name.clone(),
                    reason: reason.as_str().into(),
                });
                self.settle(|w| matches!(w, Wait::Up(p, _) if *p == name).then(|| Err(e.clone())));
            }
            NodeEvent::KeyMismatch {
                name,
                pinned,
                offered,
            } => {
                let msg = format!(
                    "REFUSED {name}: it presented key {} but {} is pinned for that name",
                    offered.fingerprint(),
                    pinned.fingerprint()
                );
                tracing::error!("PEER(KEY_MISMATCH) {msg}");
                self.broadcast(Event::KeyMismatch {
                    peer: name.clone(),
                    pinned: pinned.fingerprint(),
                    offered: offered.fingerprint(),
                });
                self.settle(|w| {
                    matches!(w, Wait::Up(p, _) if *p == name)
                        .then(|| Err(err(ErrorCode::Refused, msg.clone())))
                });
            }
            NodeEvent::PeerUp {
                name,
                endpoint,
                identity,
            } => {
                tracing::info!(peer = %name, %endpoint, "PEER(UP)");
                self.pin(&name, &identity);
                let path = self.node.path_name(endpoint).to_owned();
                let c = Connected {
                    peer: name.clone(),
                    endpoint: endpoint.to_string(),
                    path: path.clone(),
                    fingerprint: identity.fingerprint(),
                };
                self.broadcast(Event::PeerUp {
                    peer: name.clone(),
                    endpoint: endpoint.to_string(),
                    path,
                    fingerprint: identity.fingerprint(),
                });
                let v = serde_json::to_value(&c).unwrap_or_default();
                self.settle(|w| matches!(w, Wait::Up(p, _) if *p == name).then(|| Ok(v.clone())));
            }
            NodeEvent::PeerDown { name, reason } => {
                tracing::info!(peer = %name, %reason, "PEER(DOWN)");
                self.broadcast(Event::PeerDown {
                    peer: name.clone(),
                    reason: reason.clone(),
                });
                let e = err(ErrorCode::NotConnected, format!("{name}: {reason}"));
                self.settle(|w| {
                    matches!(w, Wait::Up(p, _) | Wait::Pong(p, _) if *p == name)
                        .then(|| Err(e.clone()))
                });
            }
            NodeEvent::Transport(command) => self.on_transport(command),
            NodeEvent::PathChanged { name, endpoint } => {
                let path = self.node.path_name(endpoint).to_owned();
                tracing::info!(peer = %name, %endpoint, %path, "PEER(PATH_CHANGED)");
                self.broadcast(Event::PathChanged {
                    peer: name,
                    endpoint: endpoint.to_string(),
                    path,
                });
            }
            NodeEvent::Delivered {
                peer,
                seq,
                sent_ms,
                body,
            } => self.broadcast(Event::Message {
                peer,
                seq,
                sent_ms,
                text: String::from_utf8_lossy(&body).into_owned(),
            }),
            NodeEvent::Acked { peer, seq } => self.broadcast(Event::Delivered { peer, seq }),
            NodeEvent::Transfer { peer, event } => self.on_transfer(now, peer, event),
            NodeEvent::Pong { peer, nonce, rtt } => {
                let v = serde_json::to_value(PingResult {
                    peer: peer.clone(),
                    rtt_ms: rtt.as_secs_f64() * 1000.0,
                })
                .unwrap_or_default();
                self.settle(|w| {
                    matches!(w, Wait::Pong(p, n) if *p == peer && *n == nonce)
                        .then(|| Ok(v.clone()))
                });
            }
        }
    }

    fn pin(&mut self, name: &str, identity: &PublicIdentity) {
        if let Err(e) = self.store.pin(name, identity) {
            tracing::error!(error = %e, "STORE(WRITE_FAILED)");
        }
    }

    fn on_response(&mut self, rid: u32, result: Result<ServerToClient, RequestError>) {
        if let Err(e) = &result {
            // An agreement the server refused (the requester went away,
            // the request expired): the accept fails now, not at timeout.
            let e = request_error(e, "cannot accept");
            self.settle(|w| matches!(w, Wait::Up(_, Some(r)) if *r == rid).then(|| Err(e.clone())));
        }
        let Some(i) = self
            .waiters
            .iter()
            .position(|w| matches!(&w.wait, Wait::Rid(r, _) if *r == rid))
        else {
            return;
        };
        let w = &mut self.waiters[i];
        let Wait::Rid(_, kind) = &mut w.wait else {
            return;
        };
        let answer: Result<serde_json::Value, ControlError> = match (kind, result) {
            (RidKind::Register, Ok(ServerToClient::RegisterOk { name, .. })) => {
                if let Err(e) = self.store.set_setting("name", &name) {
                    tracing::error!(error = %e, "STORE(WRITE_FAILED)");
                }
                Ok(serde_json::to_value(Registered {
                    name,
                    fingerprint: self.node.identity().fingerprint(),
                })
                .unwrap_or_default())
            }
            (RidKind::Register, Err(e)) => Err(request_error(&e, "registration refused")),
            (RidKind::Decline, Ok(_)) => {
                Ok(serde_json::to_value(Declined { declined: true }).unwrap_or_default())
            }
            (RidKind::Decline, Err(e)) => Err(request_error(&e, "decline failed")),
            (_, Ok(other)) => Err(err(
                ErrorCode::Internal,
                format!("unexpected answer from the server: {other:?}"),
            )),
        };
        let w = self.waiters.swap_remove(i);
        respond(&w.out, Response::from_result(w.id, answer));
    }
}

fn node_error(e: NodeError) -> ControlError {
    match e {
        NodeError::NoRequest(name) => err(
            ErrorCode::NoRequest,
            format!("no pending connection request from {name}"),
        ),
        NodeError::NotConnected(name) => err(
            ErrorCode::NotConnected,
            format!("not connected to {name}: run `p2pctl connect {name}` first"),
        ),
    }
}
