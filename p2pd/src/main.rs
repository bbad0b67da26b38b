//! `p2pd`: command line, logging, signals; the daemon is in the library.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Peer-to-peer chat daemon: logs in at a rendezvous server, keeps its NAT
/// mapping open, and holds end-to-end encrypted sessions with peers.
/// Control it with `p2pctl`.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Rendezvous server, HOST:PORT.
    #[arg(long, env = "P2PD_SERVER", default_value = "127.0.0.1:7000")]
    server: String,
    /// The server's public key (64 hex digits, as `rendezvous` prints it).
    /// Without it the first key seen is pinned and any later change is
    /// refused.
    #[arg(long, env = "P2PD_SERVER_KEY")]
    server_key: Option<String>,
    /// Directory for the identity key and the database [default:
    /// ~/.local/share/p2p-chat/p2pd; on macOS ~/Library/Application
    /// Support/p2p-chat/p2pd].
    #[arg(long, env = "P2PD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Control socket path [default: $XDG_RUNTIME_DIR/p2p-chat/p2pd.sock,
    /// or p2pd.sock in the data directory without XDG_RUNTIME_DIR].
    #[arg(long, env = "P2PD_SOCKET")]
    socket: Option<PathBuf>,
    /// Local UDP address to bind; port 0 takes the port of the last run
    /// when it is free (peers find us there without the server), else a
    /// free one. The default
    /// takes IPv4 and IPv6 on one socket (IPv4 only where IPv6 is off).
    #[arg(long, env = "P2PD_LISTEN", default_value = "[::]:0")]
    listen: SocketAddr,
    /// Seconds between heartbeats to the server (25 keeps common NAT
    /// mappings open).
    #[arg(long, env = "P2PD_HEARTBEAT", default_value_t = 25)]
    heartbeat: u64,
    /// Seconds of silence after which an idle peer session sends a
    /// keepalive. Keep it under your NAT's UDP mapping timeout (often 30 s)
    /// or idle sessions through it lose their path.
    #[arg(long, env = "P2PD_KEEPALIVE", default_value_t = 25)]
    keepalive: u64,
    /// Where accepted files go when `p2pctl accept-file` gives no `--to`
    /// [default: your downloads directory, e.g. ~/Downloads].
    #[arg(long, env = "P2PD_DOWNLOADS")]
    downloads: Option<PathBuf>,
    /// Days a finished or failed transfer's record is kept (shown by
    /// `p2pctl transfers`) before it is forgotten; the files stay. 0 keeps
    /// them forever.
    #[arg(
        long,
        env = "P2PD_KEEP_TRANSFERS",
        default_value_t = 30,
        value_name = "DAYS"
    )]
    keep_transfers: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not in the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("p2pd: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server = tokio::net::lookup_host(&args.server)
        .await
        .with_context(|| format!("cannot resolve rendezvous server {}", args.server))?
        .find(|a| a.is_ipv4())
        .with_context(|| format!("rendezvous server {} has no IPv4 address", args.server))?;
    let server_key = match &args.server_key {
        Some(hex) => Some(
            proto::key_from_hex(hex)
                .with_context(|| format!("--server-key {hex:?} is not 64 hex digits"))?,
        ),
        None => None,
    };
    if args.heartbeat == 0 {
        anyhow::bail!("--heartbeat must be at least 1 second");
    }
    if let Some(d) = &args.downloads {
        if !d.is_absolute() {
            anyhow::bail!("--downloads must be an absolute path");
        }
    }
    if args.keepalive == 0 {
        anyhow::bail!("--keepalive must be at least 1 second");
    }
    let config = p2pd::Config {
        server,
        server_key,
        data_dir: args
            .data_dir
            .unwrap_or_else(proto::control::paths::default_data_dir),
        socket: args
            .socket
            .unwrap_or_else(proto::control::paths::default_socket),
        listen: args.listen,
        heartbeat: Duration::from_secs(args.heartbeat),
        keepalive: Duration::from_secs(args.keepalive),
        downloads: args
            .downloads
            .unwrap_or_else(proto::control::paths::default_downloads),
        keep_transfers: (args.keep_transfers > 0)
            .then(|| Duration::from_secs(args.keep_transfers.saturating_mul(86_400))),
    };
    p2pd::run(config, shutdown_signal()).await
}

/// SIGINT or SIGTERM (systemd's stop).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
