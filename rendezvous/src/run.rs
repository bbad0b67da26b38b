//! The I/O shell around [`proto::Server`]: one UDP socket, the
//! clock, the key file and the account database.
//!
//! [`bind`] does everything that can fail at start (data directory, key
//! file, database, socket) and returns a [`Bound`] server; [`Bound::run`]
//! then owns the socket, the machine and the store until shutdown. The
//! loop waits on exactly three things: a datagram, the machine's next
//! deadline (`poll_timeout`), and the shutdown future. After each of them
//! it drains every queued transmit before waiting again.
//!
//! This is the only place that reads the clock: the machine gets
//! `Instant::now()` as an argument.

use crate::store::SqliteStore;
use crate::tcp::TcpClients;
use anyhow::Context;
use proto::{answer_probe, RelayConfig, Server, ServerConfig};
use proto::{fingerprint, to_hex, Identity};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UdpSocket};

/// File name of the server's identity inside the data directory.
pub const SERVER_KEY: &str = "server.key";

/// Receive buffer: above the largest packet the server takes
/// ([`proto::wire::MAX_RELAYED`]), so an oversized one arrives whole and is
/// refused by the decoder rather than truncated into something that might
/// parse. Peers' large data packets (up to [`proto::wire::MAX_DATAGRAM`])
/// are never meant for the server: one sent here arrives cut short and
/// fails its authentication.
const RECV_BUF: usize = 2048;

/// How often the counters are logged while running.
const STATS_INTERVAL: Duration = Duration::from_secs(60);
/// How often TCP connections are checked for a logged-in session.
const TCP_REAP_INTERVAL: Duration = Duration::from_secs(5);

/// After a receive error that is not one of the known transient ones, wait
/// this long before the next receive so a persistent failure logs a few
/// lines a second instead of spinning a core.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address to listen on; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Holds `server.key` and `accounts.db`; created (mode 0700) if absent.
    pub data_dir: PathBuf,
    /// A user silent for this long drops off the active list
    /// ([`ServerConfig::presence_timeout`]).
    pub presence_timeout: Duration,
    /// The relay role and its limits.
    pub relay: RelayConfig,
    /// Most TCP clients (on networks that drop UDP) at once; 0 turns TCP
    /// off.
    pub max_tcp: usize,
    /// A second UDP port that only answers NAT probes, so clients can tell
    /// whether their NAT maps each destination anew. `Some(0)` picks a
    /// free port; `None` turns it off.
    pub probe_port: Option<u16>,
    /// Registrations per address per hour
    /// ([`ServerConfig::registrations_per_hour`]); 0: no limit.
    pub registrations_per_hour: u32,
    /// Registration requires one of these tokens, if any
    /// ([`ServerConfig::invite_tokens`]).
    pub invite_tokens: Vec<String>,
}

impl Config {
    /// A config with the default presence timeout and relay limits.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            presence_timeout: ServerConfig::default().presence_timeout,
            relay: RelayConfig::default(),
            max_tcp: 1000,
            probe_port: Some(0),
            registrations_per_hour: ServerConfig::default().registrations_per_hour,
            invite_tokens: Vec::new(),
        }
    }
}

/// Creates the data directory, readable by its owner only: it holds the
/// server's private key.
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

/// Loads `<data_dir>/server.key`, creating the directory and the key if
/// needed. Returns the identity and whether it was just created.
pub fn load_server_key(data_dir: &Path) -> anyhow::Result<(Identity, bool)> {
    ensure_data_dir(data_dir)?;
    let path = data_dir.join(SERVER_KEY);
    // KeyFileError already names the file.
    let (identity, created) = proto::load_or_create_identity(&path)?;
    if created {
        tracing::info!(path = %path.display(), "KEY(CREATED)");
    }
    Ok((identity, created))
}

/// A server with its socket bound and its files open, not yet serving.
pub struct Bound {
    socket: UdpSocket,
    probe: Option<UdpSocket>,
    tcp: Option<TcpClients>,
    local_addr: SocketAddr,
    server: Server,
    store: SqliteStore,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("local_addr", &self.local_addr)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Opens everything the server needs; errors name the file or socket.
pub async fn bind(config: Config) -> anyhow::Result<Bound> {
    let (identity, _) = load_server_key(&config.data_dir)?;
    // DbError names the database file.
    let store = SqliteStore::open_in(&config.data_dir)?;
    let socket = UdpSocket::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on UDP {}", config.listen))?;
    let local_addr = socket
        .local_addr()
        .with_context(|| format!("cannot read the address of UDP socket {}", config.listen))?;
    // TCP on the same address and port, for clients whose networks drop
    // UDP.
    let tcp = if config.max_tcp > 0 {
        let listener = TcpListener::bind(local_addr)
            .await
            .with_context(|| format!("cannot listen on TCP {local_addr}"))?;
        Some(TcpClients::new(
            listener,
            config.max_tcp,
            config.presence_timeout,
        ))
    } else {
        None
    };
    let probe = match config.probe_port {
        Some(port) => {
            let addr = SocketAddr::new(local_addr.ip(), port);
            Some(
                UdpSocket::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on UDP {addr} (probe port)"))?,
            )
        }
        None => None,
    };
    let probe_port = match &probe {
        Some(s) => s.local_addr()?.port(),
        None => 0,
    };
    let server_config = ServerConfig {
        presence_timeout: config.presence_timeout,
        probe_port,
        relay: config.relay.clone(),
        registrations_per_hour: config.registrations_per_hour,
        invite_tokens: config.invite_tokens.clone(),
        ..ServerConfig::default()
    };
    // Fresh OS randomness: indices and challenges must not be guessable.
    let server = Server::new(identity, server_config, rand::random());
    let bound = Bound {
        socket,
        probe,
        tcp,
        local_addr,
        server,
        store,
    };
    let key = bound.public_key();
    tracing::info!(
        listen = %local_addr,
        data_dir = %config.data_dir.display(),
        server_key = %to_hex(&key),
        fingerprint = %fingerprint(&key),
        presence_timeout_s = config.presence_timeout.as_secs(),
        tcp = config.max_tcp > 0,
        probe_port,
        relay = config.relay.enabled,
        relay_max_sessions = config.relay.max_channels,
        relay_rate_per_user = config.relay.rate_per_user,
        registrations_per_hour = config.registrations_per_hour,
        invite_only = !config.invite_tokens.is_empty(),
        "START"
    );
    Ok(bound)
}

/// Binds and serves until `shutdown` completes.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    bind(config).await?.run(shutdown).await
}

impl Bound {
    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's Noise static key, which clients pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.server.public_key()
    }

    /// The startup line for the operator:
    /// `rendezvous: listening on <addr>, server key <hex> (fingerprint <fp>)`.
    pub fn banner(&self) -> String {
        let key = self.public_key();
        format!(
            "rendezvous: listening on {}, server key {} (fingerprint {})",
            self.local_addr,
            to_hex(&key),
            fingerprint(&key)
        )
    }

    /// Serves until `shutdown` completes. Bad packets and send failures are
    /// logged and survived; the loop ends only by shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Bound {
            socket,
            probe,
            mut tcp,
            local_addr,
            mut server,
            mut store,
        } = self;
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; RECV_BUF];
        let mut probe_buf = vec![0u8; RECV_BUF];
        let mut next_stats = Instant::now() + STATS_INTERVAL;
        let mut next_reap = Instant::now() + TCP_REAP_INTERVAL;
        loop {
            // The stats line and the TCP reaper have their own deadlines;
            // the machine's comes from poll_timeout and is None while there
            // is nothing to expire.
            let ours = next_stats.min(next_reap);
            let wake = server.poll_timeout().map_or(ours, |t| t.min(ours));
            tokio::select! {
                // Shutdown first, so a flood of datagrams cannot starve it.
                biased;
                () = &mut shutdown => break,
                received = socket.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        // `get` rather than indexing: the length comes from
                        // the kernel, but nothing here needs to trust it.
                        let datagram = buf.get(..len).unwrap_or(&[]);
                        // The store is called synchronously on this task: a
                        // login or registration is one indexed read or one
                        // small fsynced write, rare next to heartbeats, and
                        // a single writer keeps the machine's order of
                        // events equal to the database's.
                        server.handle_datagram(Instant::now(), from, datagram, &mut store);
                    }
                    Err(e) => on_recv_error(e).await,
                },
                Ok((len, from)) = probe_recv(probe.as_ref(), &mut probe_buf) => {
                    // Answered here, never larger than the probe.
                    let datagram = probe_buf.get(..len).unwrap_or(&[]);
                    if let (Some(reply), Some(p)) = (answer_probe(from, datagram), &probe) {
                        let _ = p.send_to(&reply, from).await;
                    }
                }
                Some((from, frame)) = tcp_next(&mut tcp) => {
                    server.handle_datagram(Instant::now(), from, &frame, &mut store);
                    // Marked at once (not at the next reap), so a full
                    // table never evicts a user who just logged in.
                    if let Some(t) = tcp.as_mut() {
                        t.note_logged_in(from, server.logged_in_at(from));
                    }
                }
                () = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if server.poll_timeout().is_some_and(|t| t <= now) {
                        server.handle_timeout(now);
                    }
                    if now >= next_stats {
                        log_stats(&server, tcp.as_ref(), "periodic");
                        next_stats = now + STATS_INTERVAL;
                    }
                    if now >= next_reap {
                        if let Some(t) = tcp.as_mut() {
                            t.reap(now, |a| server.logged_in_at(a));
                        }
                        next_reap = now + TCP_REAP_INTERVAL;
                    }
                }
            }
            flush(&socket, tcp.as_ref(), &mut server).await;
        }
        log_stats(&server, tcp.as_ref(), "shutdown");
        tracing::info!(listen = %local_addr, "STOP");
        Ok(())
    }
}

/// Sends everything the machine queued. A failed send (unreachable
/// network, an IPv6 destination on an IPv4 socket) loses one datagram,
/// which the protocol's retransmissions already cover.
async fn flush(socket: &UdpSocket, tcp: Option<&TcpClients>, server: &mut Server) {
    while let Some(t) = server.poll_transmit() {
        let payload = t.payload;
        let Some(payload) = (match tcp {
            Some(tcp) => tcp.send_or_return(t.dst, payload),
            None => Some(payload),
        }) else {
            continue;
        };
        if let Err(e) = socket.send_to(&payload, t.dst).await {
            tracing::warn!(dst = %t.dst, len = payload.len(), error = %e, "SEND(FAILED)");
        }
    }
}

async fn on_recv_error(e: std::io::Error) {
    use std::io::ErrorKind;
    match e.kind() {
        // ICMP errors from an earlier send surface here on some systems;
        // they concern one peer, not the socket.
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::Interrupted => {
            tracing::debug!(error = %e, "RECV(TRANSIENT)");
        }
        _ => {
            tracing::warn!(error = %e, "RECV(FAILED)");
            tokio::time::sleep(RECV_ERROR_PAUSE).await;
        }
    }
}

/// The next datagram on the probe port; never, with it off.
async fn probe_recv(
    probe: Option<&UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match probe {
        Some(p) => p.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// The next frame from a TCP client; never, with TCP off.
async fn tcp_next(tcp: &mut Option<TcpClients>) -> Option<(SocketAddr, bytes::BytesMut)> {
    match tcp {
        Some(t) => t.next().await,
        None => std::future::pending().await,
    }
}

fn log_stats(server: &Server, tcp: Option<&TcpClients>, why: &str) {
    let s = server.stats();
    let g = server.gauges();
    tracing::info!(
        why,
        active_users = g.online,
        sessions = g.sessions,
        not_logged_in = g.not_logged_in,
        relay_channels = g.relay_channels,
        tcp_clients = tcp.map_or(0, |t| t.open()),
        tcp_refused = tcp.map_or(0, |t| t.refused),
        tcp_reaped = tcp.map_or(0, |t| t.reaped),
        malformed = s.malformed,
        auth_failed = s.auth_failed,
        unknown_session = s.unknown_session,
        handshakes = s.handshakes,
        logins = s.logins,
        registrations = s.registrations,
        registrations_limited = s.registrations_limited,
        introductions = s.introductions,
        amplification_refused = s.amplification_refused,
        store_errors = s.store_errors,
        relay_channels_opened = s.relay_channels,
        relayed_packets = s.relayed_packets,
        relayed_bytes = s.relayed_bytes,
        relay_over_rate = s.relay_over_rate,
        relay_refused = s.relay_refused,
        other_version = s.other_version,
        cookies_sent = s.cookies_sent,
        handshakes_limited = s.handshakes_limited,
        replays = s.replays,
        not_logged_in_evicted = s.anonymous_evicted,
        paths_challenged = s.paths_challenged,
        paths_validated = s.paths_validated,
        table_full = s.table_full,
        lists_limited = s.lists_limited,
        list_pages = s.list_pages,
        invites_refused = s.invites_refused,
        intros_limited = s.intros_limited,
        "STATS"
    );
}
