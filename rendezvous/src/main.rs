//! `rendezvous`: flags, logging and signals; the server itself is the
//! library's [`rendezvous::bind`].

use anyhow::Context;
use clap::Parser;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Rendezvous server for p2p chat: registers names, tracks who is online
/// and introduces peers so they can punch through NATs to each other.
///
/// Logs go to stderr; set RUST_LOG (e.g. `debug`) for more detail.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// UDP address to listen on.
    #[arg(
        long,
        value_name = "ADDR",
        env = "RENDEZVOUS_LISTEN",
        default_value = "0.0.0.0:7000"
    )]
    listen: SocketAddr,

    /// Directory for server.key and accounts.db
    /// [default: the user's data directory + p2p-chat/rendezvous, e.g.
    /// ~/.local/share/p2p-chat/rendezvous].
    #[arg(long, value_name = "DIR", env = "RENDEZVOUS_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Seconds without a packet after which a user is shown offline
    /// (three missed 25 s heartbeats, plus slack).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 80,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    presence_timeout: u64,

    /// Do not relay: peers whose NATs defeat hole punching then cannot
    /// connect. The relay only carries packets between two logged-in users
    /// who both agreed to the connection, encrypted end to end.
    #[arg(long)]
    no_relay: bool,

    /// Most relayed sessions (agreed introductions) held at once.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    relay_max_sessions: usize,

    /// Bytes per second each user may send through the relay (bursts of
    /// one second's worth); 0 for no limit.
    #[arg(long, value_name = "BYTES", default_value_t = 2_000_000)]
    relay_rate: u64,

    /// Most clients connected over TCP at once (for networks that drop
    /// UDP; same address and port as UDP); 0 turns TCP off.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_tcp: usize,

    /// Registrations one network (an IPv4 address, an IPv6 /48) may make
    /// per hour, after a burst of 5; 0 for no limit.
    #[arg(long, value_name = "N", default_value_t = 20)]
    registrations_per_hour: u32,

    /// Register only users who give this invite token (`p2pctl register
    /// NAME --invite TOKEN`); may be given several times. Without it,
    /// anyone may register.
    #[arg(
        long = "invite-token",
        value_name = "TOKEN",
        env = "RENDEZVOUS_INVITE_TOKEN"
    )]
    invite_tokens: Vec<String>,

    /// A second UDP port that only answers NAT probes (clients compare the
    /// address each port sees to learn how their NAT maps); 0 turns it off.
    /// [default: the listen port + 1]
    #[arg(long, value_name = "PORT")]
    probe_port: Option<u16>,

    /// Print the server's public key (hex, for clients to pin) and exit.
    /// Give the same --data-dir as the server; fails if it has no key.
    #[arg(long)]
    print_key: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rendezvous: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; journald stores the
        // escape codes verbatim.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn data_dir(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.data_dir {
        return Ok(dir.clone());
    }
    directories::ProjectDirs::from("", "", "p2p-chat")
        .map(|p| p.data_dir().join("rendezvous"))
        .context("no home directory to put the data in; pass --data-dir")
}

fn run(args: Args) -> anyhow::Result<()> {
    let data_dir = data_dir(&args)?;
    if args.print_key {
        let key = data_dir.join(rendezvous::SERVER_KEY);
        if !key.exists() {
            anyhow::bail!(
                "no server key at {}: start the server once with this --data-dir, \
                 or give the --data-dir it runs with",
                key.display()
            );
        }
        let (identity, _) = rendezvous::load_server_key(&data_dir)?;
        println!("{}", proto::to_hex(&identity.noise_public()));
        return Ok(());
    }
    let config = rendezvous::Config {
        listen: args.listen,
        data_dir,
        presence_timeout: Duration::from_secs(args.presence_timeout),
        relay: proto::RelayConfig {
            enabled: !args.no_relay,
            max_channels: args.relay_max_sessions,
            rate_per_user: args.relay_rate,
            ..Default::default()
        },
        max_tcp: args.max_tcp,
        registrations_per_hour: args.registrations_per_hour,
        invite_tokens: args.invite_tokens,
        probe_port: match args.probe_port {
            Some(0) => None,
            Some(p) => Some(p),
            // Port 0 (tests): any free port for the probe port too.
            None if args.listen.port() == 0 => Some(0),
            None => Some(args.listen.port().wrapping_add(1)),
        },
    };
    // One socket and one loop: a single-threaded runtime is all it needs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Signal handlers are installed before binding, so a SIGTERM that
        // arrives during start-up is not lost.
        let shutdown = shutdown_signal()?;
        let bound = rendezvous::bind(config).await?;
        eprintln!("{}", bound.banner());
        bound.run(shutdown).await
    })
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install a SIGINT handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "SHUTDOWN");
    })
}
