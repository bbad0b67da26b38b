//! `p2pctl`: the command line for `p2pd`.
//!
//! Each command is one JSON request line on the daemon's control socket
//! (see `docs/control-api.md`) and one response line; `send` without text
//! pipelines one request per stdin line, and `watch` prints the event
//! stream until the daemon stops or the output is closed.

use clap::{Parser, Subcommand};
use proto::control::{
    Cancelled, Command, Connected, ControlError, Direction, ErrorCode, Event, HistoryEntry,
    LoggedIn, MessageState, PeersResult, PingResult, Registered, Request, Response, Sent,
    TransferInfo, TransferState, UserInfo, Whoami,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Control the p2pd chat daemon.
///
/// NAME is a user name at the rendezvous server: 1 to 32 lowercase ASCII
/// letters, digits, '-', '_' or '.', starting with a letter or digit.
///
/// Exit status: 0 success, 1 other failure (a transfer that failed), 2 bad
/// arguments, 3 daemon not running, 4 unknown user, 5 not connected /
/// offline / nothing pending / no such transfer, 6 refused (declined, key
/// mismatch, name taken, too many registrations), 7 timed out, 8 a file
/// could not be read or written.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Args {
    /// The daemon's control socket [default: $XDG_RUNTIME_DIR/p2p-chat/p2pd.sock,
    /// or p2pd.sock in p2pd's data directory without XDG_RUNTIME_DIR].
    #[arg(long, global = true, env = "P2PD_SOCKET")]
    socket: Option<PathBuf>,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show our name, key fingerprint and the rendezvous link.
    Whoami,
    /// Register NAME for this daemon's key at the rendezvous server, and
    /// log in with it.
    Register {
        name: String,
        /// The invite token of a server that registers only with one
        /// (its operator gives it).
        #[arg(long, value_name = "TOKEN")]
        invite: Option<String>,
    },
    /// Log in to the rendezvous server again now.
    Login,
    /// List the users active at the rendezvous server.
    Users,
    /// Ask NAME for a session; waits until it is up or refused.
    Connect { name: String },
    /// Agree to NAME's connection request; waits until the session is up.
    Accept { name: String },
    /// Decline NAME's connection request.
    Decline { name: String },
    /// Measure the round trip to a connected peer.
    Ping { name: String },
    /// Send TEXT to NAME (at most 65536 bytes of UTF-8 a message). Without
    /// TEXT, each line of standard input is one message (empty lines are
    /// skipped; a line over the limit is reported with its number and the
    /// rest still go; the exit status says if any was refused).
    Send {
        name: String,
        /// The message; several words are joined with spaces.
        text: Vec<String>,
    },
    /// Print events as they happen: messages, connection requests,
    /// peers coming and going.
    Watch,
    /// Show the stored messages with NAME.
    History {
        name: String,
        /// How many of the newest messages (at least 1).
        #[arg(short = 'n', long, default_value_t = 50,
              value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// List peers (sessions, queued messages, pinned keys) and pending
    /// connection requests.
    Peers,
    /// Close the session with NAME.
    Close { name: String },
    /// Offer the file at PATH to NAME, and show progress until NAME has it
    /// (verified) or the transfer fails. NAME sees the offer in `watch` and
    /// `transfers`.
    SendFile {
        name: String,
        path: PathBuf,
        /// Return once the file is offered; follow it with `transfers`.
        #[arg(long)]
        no_wait: bool,
    },
    /// Take an offered file (ID from `watch` or `transfers`; four or more
    /// leading digits will do) and show progress until it is here and
    /// verified. It is written as a hidden .part file and gets its name only
    /// once complete; an existing file is never replaced (a number is added).
    AcceptFile {
        id: String,
        /// Directory to put it in [default: p2pd's --downloads directory].
        #[arg(long)]
        to: Option<PathBuf>,
        /// Return at once; follow it with `transfers`.
        #[arg(long)]
        no_wait: bool,
    },
    /// List file transfers, newest first: state, bytes done, rate and time
    /// left. Shows 100 at a time (see --limit and --offset), or the files
    /// of one directory (--dir).
    Transfers {
        /// How many to show (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// How many of the newest to skip.
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Only the files of this directory transfer (its id).
        #[arg(long, value_name = "ID")]
        dir: Option<String>,
    },
    /// Cancel a transfer in either direction, or decline an offer.
    Cancel { id: String },
    /// Take every file NAME offers from now on into DIR, without asking;
    /// `--off` asks again.
    AutoAccept {
        name: String,
        /// Directory for NAME's files.
        #[arg(required_unless_present = "off")]
        dir: Option<PathBuf>,
        #[arg(long, conflicts_with = "dir")]
        off: bool,
    },
}

/// A failure and the exit status it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        let code = match e.code {
            ErrorCode::BadRequest | ErrorCode::InvalidArgument => 2,
            ErrorCode::UnknownUser => 4,
            ErrorCode::NotConnected
            | ErrorCode::Offline
            | ErrorCode::NoRequest
            | ErrorCode::NotLoggedIn => 5,
            ErrorCode::Refused | ErrorCode::NameTaken | ErrorCode::ServerKeyMismatch => 6,
            ErrorCode::TimedOut => 7,
            ErrorCode::NoTransfer => 5,
            ErrorCode::FileError => 8,
            ErrorCode::Internal => 1,
        };
        Failure {
            code,
            message: e.message,
        }
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure {
        code: 1,
        message: format!("lost the connection to p2pd: {e}"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("p2pctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.code == 0 => ExitCode::SUCCESS,
        Err(f) => {
            // Messages can carry text from the server: keep newlines, escape
            // the rest.
            let lines: Vec<String> = f.message.lines().map(clean).collect();
            eprintln!("p2pctl: {}", lines.join("\n"));
            ExitCode::from(f.code)
        }
    }
}

struct Conn {
    lines: Answers,
    wr: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
}

impl Conn {
    async fn open(path: &std::path::Path) -> Result<Self, Failure> {
        let stream = UnixStream::connect(path).await.map_err(|e| Failure {
            code: 3,
            message: format!(
                "cannot reach p2pd at {}: {e}\n\
                 Is the daemon running? Start it with `systemctl --user start p2pd`, \
                 or run `p2pd --server HOST:PORT` (set --socket or P2PD_SOCKET if it uses another socket).",
                path.display()
            ),
        })?;
        let (rd, wr) = stream.into_split();
        Ok(Conn {
            lines: BufReader::new(rd).lines(),
            wr,
            next_id: 1,
        })
    }

    async fn send(&mut self, command: Command) -> Result<u64, Failure> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_string(&Request { id, command }).map_err(|e| Failure {
            code: 1,
            message: e.to_string(),
        })?;
        line.push('\n');
        self.wr
            .write_all(line.as_bytes())
            .await
            .map_err(io_failure)?;
        Ok(id)
    }

    /// The next line from the daemon, parsed as JSON.
    async fn next(&mut self) -> Result<Value, Failure> {
        next_value(&mut self.lines).await
    }

    /// The response to request `id`, skipping event lines.
    async fn response(&mut self) -> Result<Response, Failure> {
        next_response(&mut self.lines).await
    }

    /// Sends one command and waits for its result.
    async fn call(&mut self, command: Command) -> Result<Value, Failure> {
        self.send(command).await?;
        let r = self.response().await?;
        into_result(r)
    }

    /// Sends one command and waits for its result: as the daemon sent it
    /// (what `--json` prints) and as the type the command answers with.
    async fn call_as<T: DeserializeOwned>(
        &mut self,
        command: Command,
    ) -> Result<(Value, T), Failure> {
        let v = self.call(command).await?;
        let t = typed(&v)?;
        Ok((v, t))
    }
}

type Answers = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

/// The next line from the daemon, parsed as JSON.
async fn next_value(lines: &mut Answers) -> Result<Value, Failure> {
    let line = lines
        .next_line()
        .await
        .map_err(io_failure)?
        .ok_or_else(|| Failure {
            code: 1,
            message: "p2pd closed the connection (did it stop?)".into(),
        })?;
    serde_json::from_str(&line).map_err(|e| Failure {
        code: 1,
        message: format!("unreadable answer from p2pd: {e}"),
    })
}

/// The next response, skipping event lines.
async fn next_response(lines: &mut Answers) -> Result<Response, Failure> {
    loop {
        let v = next_value(lines).await?;
        if v.get("event").is_some() {
            continue;
        }
        return serde_json::from_value(v).map_err(|e| Failure {
            code: 1,
            message: format!("unreadable answer from p2pd: {e}"),
        });
    }
}

/// A result or event line as its type.
fn typed<T: DeserializeOwned>(v: &Value) -> Result<T, Failure> {
    serde_json::from_value(v.clone()).map_err(|e| Failure {
        code: 1,
        message: format!("unreadable answer from p2pd: {e}"),
    })
}

fn into_result(r: Response) -> Result<Value, Failure> {
    if r.ok {
        Ok(r.result.unwrap_or(Value::Null))
    } else {
        Err(r.error.map(Failure::from).unwrap_or(Failure {
            code: 1,
            message: "p2pd reported an error without details".into(),
        }))
    }
}

/// Writes to stdout; a closed pipe (`p2pctl watch | head`) ends the
/// program quietly with success.
fn out(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    let r = writeln!(stdout, "{text}").and_then(|_| stdout.flush());
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure {
            code: 0,
            message: String::new(),
        }),
        Err(e) => Err(Failure {
            code: 1,
            message: format!("cannot write output: {e}"),
        }),
    }
}

fn absolute(p: &std::path::Path) -> Result<PathBuf, Failure> {
    if p.is_absolute() {
        return Ok(p.to_owned());
    }
    std::env::current_dir()
        .map(|d| d.join(p))
        .map_err(|e| Failure {
            code: 2,
            message: format!("cannot resolve {}: {e}", p.display()),
        })
}

/// A second connection, subscribed to events.
async fn watcher(socket: &std::path::Path) -> Result<Conn, Failure> {
    let mut w = Conn::open(socket).await?;
    w.call(Command::Watch).await?;
    Ok(w)
}

/// `12.3 MiB`
fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn rate_text(rate: Option<f64>) -> String {
    rate.map(|r| format!("{}/s", bytes(r as u64)))
        .unwrap_or_default()
}

/// One line for a transfer (`transfers`, and answers).
fn transfer_text(t: &TransferInfo) -> String {
    let short = short_id(&t.id);
    let arrow = match t.direction {
        Direction::Out => "to",
        Direction::In => "from",
    };
    let mut line = format!(
        "{short}  {} {arrow} {}  {}/{}  {}",
        clean(&t.name),
        t.peer,
        bytes(t.done),
        bytes(t.size),
        t.state,
    );
    if let Some(r) = t.rate {
        line.push_str(&format!("  {}", rate_text(Some(r))));
    }
    if let Some(e) = t.eta_s {
        line.push_str(&format!("  {}s left", e.ceil() as u64));
    }
    if let Some(r) = &t.reason {
        line.push_str(&format!("  ({})", clean(r)));
    }
    if t.state == TransferState::Offered && t.direction == Direction::In {
        line.push_str(&format!(
            "  p2pctl accept-file {short} / p2pctl cancel {short}"
        ));
    }
    line
}

/// Follows one transfer's events until it is done or failed: a progress
/// bar on a terminal, a line per 10% otherwise, JSON lines with --json.
async fn follow(
    conn: &mut Conn,
    mut w: Conn,
    (raw, start): (&Value, &TransferInfo),
    json: bool,
) -> Result<(), Failure> {
    use std::io::IsTerminal;
    let id = start.id.clone();
    let name = clean(&start.name);
    let size = start.size;
    if json {
        out(&raw.to_string())?;
    } else {
        let verb = match start.direction {
            Direction::Out => "sending",
            Direction::In => "receiving",
        };
        out(&format!(
            "{verb} {name} ({}), transfer {}",
            bytes(size),
            short_id(&id)
        ))?;
    }
    let tty = !json && std::io::stderr().is_terminal();
    let began = std::time::Instant::now();
    let mut last_tenth = 0;
    // A directory: its files' events carry its id as `group`; it is done
    // when all of them are, and its progress is the sum of theirs.
    let files = start
        .files
        .map(u64::from)
        .filter(|_| start.group.as_deref() == Some(id.as_str()));
    // A directory's files that ended, by id: counted once each, whether
    // the event came or they had ended before we subscribed.
    let mut files_done = std::collections::HashSet::new();
    let mut files_failed = std::collections::HashSet::new();
    if files.is_some() {
        let (_, list) = conn
            .call_as::<Vec<TransferInfo>>(Command::Transfers {
                limit: None,
                offset: None,
                group: Some(id.clone()),
            })
            .await?;
        for t in list {
            if t.group.as_deref() != Some(id.as_str()) {
                continue;
            }
            match t.state {
                TransferState::Done => {
                    files_done.insert(t.id);
                }
                TransferState::Ended => {
                    eprintln!(
                        "p2pctl: {} failed: {}",
                        clean(&t.name),
                        clean(t.reason.as_deref().unwrap_or(""))
                    );
                    files_failed.insert(t.id);
                }
                _ => {}
            }
        }
    }
    let mut sizes: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut per_file: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        if let Some(n) = files.filter(|n| (files_done.len() + files_failed.len()) as u64 >= *n) {
            if tty {
                eprintln!();
            }
            if !files_failed.is_empty() {
                return Err(Failure {
                    code: 1,
                    message: format!("directory {id}: {} of {n} files failed", files_failed.len()),
                });
            }
            if !json {
                let secs = began.elapsed().as_secs_f64();
                let path = start.path.as_deref().map(clean);
                out(&format!(
                    "done: {name} ({n} files) in {secs:.1} s{}",
                    path.map(|p| format!(", {p}")).unwrap_or_default()
                ))?;
            }
            return Ok(());
        }
        let v = w.next().await.map_err(|mut f| {
            f.message = format!(
                "p2pd stopped while transfer {id} was under way; it resumes when p2pd runs again (see p2pctl transfers)"
            );
            f
        })?;
        // Events of other kinds and other transfers pass by.
        let Ok(event) = serde_json::from_value::<Event>(v.clone()) else {
            continue;
        };
        let (ev_id, ev_group) = match &event {
            Event::TransferProgress { id, group, .. }
            | Event::TransferDone { id, group, .. }
            | Event::TransferFailed { id, group, .. }
            | Event::TransferPaused { id, group, .. }
            | Event::TransferResumed { id, group, .. } => (id.as_str(), group.as_deref()),
            _ => continue,
        };
        let ours = ev_id == id || (files.is_some() && ev_group == Some(id.as_str()));
        if !ours {
            continue;
        }
        if json {
            out(&v.to_string())?;
        }
        match &event {
            Event::TransferProgress {
                id: file,
                done,
                size: file_size,
                rate,
                ..
            } if !json => {
                let mut done = *done;
                let mut size = size;
                if files.is_some() {
                    per_file.insert(file.clone(), done);
                    done = per_file.values().sum();
                    sizes.insert(file.clone(), *file_size);
                    // Files offered after the accept add to the total.
                    size = size.max(sizes.values().sum());
                }
                let pct = (done * 100).checked_div(size).unwrap_or(100).min(100);
                let rate = rate_text(*rate);
                if tty {
                    let width = 30;
                    let filled = (pct as usize * width / 100).min(width);
                    eprint!(
                        "\r[{}{}] {pct:>3}% {} of {} {rate}   ",
                        "#".repeat(filled),
                        ".".repeat(width - filled),
                        bytes(done),
                        bytes(size)
                    );
                } else if pct / 10 > last_tenth {
                    last_tenth = pct / 10;
                    out(&format!(
                        "{pct}% ({} of {}) {rate}",
                        bytes(done),
                        bytes(size)
                    ))?;
                }
            }
            // One file of a directory: counted; the loop ends the
            // directory once all are.
            Event::TransferDone { id: file, path, .. } if files.is_some() => {
                let new = files_done.insert(file.clone());
                if new && !json {
                    out(&format!(
                        "got {} ({} of {})",
                        clean(path.as_deref().unwrap_or("")),
                        files_done.len(),
                        files.unwrap_or(0)
                    ))?;
                }
            }
            Event::TransferDone { path, .. } => {
                if tty {
                    eprintln!();
                }
                if !json {
                    let secs = began.elapsed().as_secs_f64();
                    let path = path.as_deref().map(clean).unwrap_or_default();
                    out(&format!(
                        "done: {name} ({}) in {secs:.1} s{}",
                        bytes(size),
                        if path.is_empty() {
                            String::new()
                        } else {
                            format!(", {path}")
                        }
                    ))?;
                }
                return Ok(());
            }
            // One file of a directory failed: say so and go on with the
            // others; the directory as a whole fails at the end.
            Event::TransferFailed {
                id: file, reason, ..
            } if files.is_some() => {
                let new = files_failed.insert(file.clone());
                if new {
                    eprintln!(
                        "p2pctl: transfer {} failed: {}",
                        short_id(file),
                        clean(reason)
                    );
                }
            }
            Event::TransferFailed { reason, .. } => {
                if tty {
                    eprintln!();
                }
                let reason = clean(reason);
                let message = format!("transfer {id} failed: {reason}");
                return Err(Failure { code: 1, message });
            }
            // Paused (a full disk at the receiver): it goes on by itself;
            // say so once, and keep waiting.
            Event::TransferPaused { reason, .. } if !json => {
                if tty {
                    eprintln!();
                }
                eprintln!("p2pctl: paused: {} (waiting)", clean(reason));
            }
            Event::TransferResumed { .. } if !json => eprintln!("p2pctl: resumed"),
            _ => {}
        }
    }
}

/// A transfer id as people see it: its first eight digits.
fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

async fn run(args: Args) -> Result<(), Failure> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(proto::control::paths::default_socket);
    let json = args.json;
    let mut conn = Conn::open(&socket).await?;
    let print = |v: &Value, text: String| -> Result<(), Failure> {
        if json {
            out(&v.to_string())
        } else {
            out(&text)
        }
    };
    match args.command {
        Cmd::Whoami => {
            let (v, w) = conn.call_as::<Whoami>(Command::Whoami).await?;
            let text = format!(
                "name:        {}\nfingerprint: {}\nserver:      {} ({})\nserver key:  {}\nseen as:     {}\ndata:        {}",
                w.name.as_deref().unwrap_or("(not registered)"),
                w.fingerprint,
                w.server,
                w.server_state.replace('_', " "),
                w.server_fingerprint.as_deref().unwrap_or("(not known yet)"),
                w.observed.as_deref().unwrap_or("-"),
                w.data_dir,
            );
            print(&v, text)
        }
        Cmd::Register { name, invite } => {
            let (v, r) = conn
                .call_as::<Registered>(Command::Register { name, invite })
                .await?;
            let text = format!("registered {} (fingerprint {})", r.name, r.fingerprint);
            print(&v, text)
        }
        Cmd::Login => {
            let (v, l) = conn.call_as::<LoggedIn>(Command::Login).await?;
            let text = format!("logged in as {}, seen from {}", l.name, l.observed);
            print(&v, text)
        }
        Cmd::Users => {
            let (v, users) = conn.call_as::<Vec<UserInfo>>(Command::Users).await?;
            let width = users.iter().map(|u| u.name.len()).max().unwrap_or(0);
            let text = users
                .iter()
                .map(|u| format!("{:width$}  {}", u.name, u.fingerprint))
                .collect::<Vec<_>>()
                .join("\n");
            if json {
                out(&v.to_string())
            } else if users.is_empty() {
                out("no active users")
            } else {
                out(&text)
            }
        }
        Cmd::Connect { name } => {
            if !json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                // The answer can take a while: the peer has to accept.
                eprintln!("asking {name}; waiting for them to accept (up to 90 s)...");
            }
            let (v, c) = conn.call_as(Command::Connect { peer: name }).await?;
            print(&v, connected_text(&c))
        }
        Cmd::Accept { name } => {
            let (v, c) = conn.call_as(Command::Accept { peer: name }).await?;
            print(&v, connected_text(&c))
        }
        Cmd::Decline { name } => {
            let v = conn.call(Command::Decline { peer: name.clone() }).await?;
            print(&v, format!("declined {name}"))
        }
        Cmd::Ping { name } => {
            let (v, p) = conn
                .call_as::<PingResult>(Command::Ping { peer: name.clone() })
                .await?;
            print(&v, format!("{name}: round trip {:.2} ms", p.rtt_ms))
        }
        Cmd::Send { name, text } if !text.is_empty() => {
            let text = text.join(" ");
            proto::control::check_text(&text).map_err(Failure::from)?;
            let (
                v,
                Sent {
                    seq,
                    queued,
                    reason,
                    ..
                },
            ) = conn
                .call_as(Command::Send {
                    peer: name.clone(),
                    text,
                })
                .await?;
            let text = if queued {
                let why = reason
                    .map(|r| format!(" ({})", clean(&r)))
                    .unwrap_or_default();
                format!("queued for {name} (#{seq}): it goes out when {name} is reachable{why}")
            } else {
                format!("sent to {name} (#{seq})")
            };
            print(&v, text)
        }
        Cmd::Send { name, .. } => send_stdin(&mut conn, &name, json).await,
        Cmd::SendFile {
            name,
            path,
            no_wait,
        } => {
            let path = absolute(&path)?;
            // Subscribe first: no event of the transfer can be missed.
            let watch = if no_wait {
                None
            } else {
                Some(watcher(&socket).await?)
            };
            let (v, t) = conn
                .call_as::<TransferInfo>(Command::SendFile {
                    peer: name,
                    path: path.display().to_string(),
                })
                .await?;
            match watch {
                None => print(&v, transfer_text(&t)),
                Some(w) => follow(&mut conn, w, (&v, &t), json).await,
            }
        }
        Cmd::AcceptFile { id, to, no_wait } => {
            let to = to.map(|d| absolute(&d)).transpose()?;
            let watch = if no_wait {
                None
            } else {
                Some(watcher(&socket).await?)
            };
            let (v, t) = conn
                .call_as::<TransferInfo>(Command::AcceptFile {
                    transfer: id,
                    to: to.map(|d| d.display().to_string()),
                })
                .await?;
            match watch {
                None => print(&v, transfer_text(&t)),
                Some(w) => follow(&mut conn, w, (&v, &t), json).await,
            }
        }
        Cmd::Transfers { limit, offset, dir } => {
            let (v, list) = conn
                .call_as::<Vec<TransferInfo>>(Command::Transfers {
                    limit: Some(limit),
                    offset: Some(offset),
                    group: dir,
                })
                .await?;
            if json {
                return out(&v.to_string());
            }
            if list.is_empty() {
                return out("no transfers");
            }
            for t in &list {
                out(&transfer_text(t))?;
            }
            Ok(())
        }
        Cmd::AutoAccept { name, dir, off: _ } => {
            let dir = dir.map(|d| absolute(&d)).transpose()?;
            let v = conn
                .call(Command::AutoAccept {
                    peer: name.clone(),
                    dir: dir.as_ref().map(|d| d.display().to_string()),
                })
                .await?;
            let text = match dir {
                Some(d) => format!("files from {name} go to {} without asking", d.display()),
                None => format!("files from {name} wait for accept-file again"),
            };
            print(&v, text)
        }
        Cmd::Cancel { id } => {
            let (v, c) = conn
                .call_as::<Cancelled>(Command::Cancel { transfer: id })
                .await?;
            if json {
                return out(&v.to_string());
            }
            // A directory answers with its files.
            match c {
                Cancelled::Directory(list) => list.iter().try_for_each(|t| out(&transfer_text(t))),
                Cancelled::One(t) => out(&transfer_text(&t)),
            }
        }
        Cmd::Watch => {
            conn.call(Command::Watch).await?;
            loop {
                let v = conn.next().await.map_err(|mut f| {
                    f.message = "p2pd closed the event stream: the daemon stopped, \
                                 or this watcher fell too far behind"
                        .into();
                    f
                })?;
                if json {
                    out(&v.to_string())?;
                } else if let Ok(e) = serde_json::from_value::<Event>(v) {
                    out(&event_text(&e))?;
                }
            }
        }
        Cmd::History { name, limit } => {
            let v = conn
                .call(Command::History {
                    peer: name.clone(),
                    limit: Some(limit),
                })
                .await?;
            if json {
                return out(&v.to_string());
            }
            let entries: Vec<HistoryEntry> = typed(&v)?;
            if entries.is_empty() {
                return out(&format!("no messages with {name}"));
            }
            for e in entries {
                let who = match e.direction {
                    Direction::In => e.peer.clone(),
                    Direction::Out => "me".into(),
                };
                let mark = match e.state {
                    MessageState::Queued => " (queued)",
                    _ => "",
                };
                out(&format!(
                    "{} <{who}> {}{mark}",
                    clock(e.sent_ms),
                    clean(&e.text)
                ))?;
            }
            Ok(())
        }
        Cmd::Peers => {
            let v = conn.call(Command::Peers).await?;
            if json {
                return out(&v.to_string());
            }
            let p: PeersResult = typed(&v)?;
            if let Some(s) = p.server_away_s.filter(|s| *s >= 1.0) {
                out(&format!(
                    "no server ({} for {s:.0} s): sessions up go on, contacts with a known \
                     address are reached directly; new contacts, the user list and the \
                     relay wait for it",
                    p.server.replace('_', " ")
                ))?;
            }
            if p.peers.is_empty() && p.requests.is_empty() {
                return out("no peers");
            }
            for peer in &p.peers {
                let rtt = peer
                    .rtt_ms
                    .map(|r| format!(" rtt {r:.1} ms"))
                    .unwrap_or_default();
                let queued = if peer.queued > 0 {
                    format!(" {} queued", peer.queued)
                } else {
                    String::new()
                };
                // What is wrong, if something is: reconnecting (since when,
                // after what), or a path that stopped answering.
                let trouble = match (peer.unanswered_s, peer.down_s, &peer.reason) {
                    (Some(s), _, _) => format!(" no answer for {s:.0} s"),
                    (None, Some(s), Some(r)) if peer.reconnecting => {
                        format!(" reconnecting for {s:.0} s ({})", clean(r))
                    }
                    (None, Some(s), Some(r)) => format!(" down for {s:.0} s ({})", clean(r)),
                    _ if peer.reconnecting => " connecting".into(),
                    _ => String::new(),
                };
                out(&format!(
                    "{}  {}{trouble}{}{}{rtt}{queued}  {}",
                    peer.name,
                    peer.state,
                    match (&peer.path, &peer.technique) {
                        (Some(p), Some(t)) if t != "relay" => format!(" {p} ({t})"),
                        (Some(p), _) => format!(" {p}"),
                        _ => String::new(),
                    },
                    peer.endpoint
                        .as_ref()
                        .map(|e| format!(" {e}"))
                        .unwrap_or_default(),
                    peer.fingerprint.as_deref().unwrap_or("")
                ))?;
            }
            for r in &p.requests {
                out(&format!(
                    "{}  wants to connect ({}): p2pctl accept {} / p2pctl decline {}",
                    r.name, r.fingerprint, r.name, r.name
                ))?;
            }
            Ok(())
        }
        Cmd::Close { name } => {
            let v = conn.call(Command::Close { peer: name.clone() }).await?;
            print(&v, format!("closed the session with {name}"))
        }
    }
}

/// One message per stdin line, streamed: request lines go out in large
/// writes while the answers come back, with at most `WINDOW` unanswered
/// (the daemon's own queues, and this bound, slow a fast writer down:
/// nothing is dropped). A line the daemon refuses on its own (empty, over
/// the size limit) is reported with its line number and the rest still
/// go; a refusal that would hold for every line (no such peer, the
/// message could not be stored) stops reading. The summary says exactly
/// how many were accepted and refused; the exit status is the first
/// refusal's.
async fn send_stdin(conn: &mut Conn, name: &str, json: bool) -> Result<(), Failure> {
    // Below the daemon's queue of answers per connection.
    const WINDOW: usize = 1024;
    let max = proto::wire::MAX_MESSAGE_BYTES;
    let mut stdin = BufReader::with_capacity(256 * 1024, tokio::io::stdin()).lines();
    // Request lines not written yet, and the stdin line of each request.
    let mut pending = Vec::with_capacity(64 * 1024);
    let mut line_of = std::collections::HashMap::new();
    let mut in_flight = 0usize;
    let mut line_no = 0u64;
    let (mut sent, mut queued, mut refused) = (0u64, 0u64, 0u64);
    let mut first_error: Option<Failure> = None;
    let mut stop = false;
    let mut eof = false;
    loop {
        let reading = !eof && !stop && in_flight < WINDOW;
        // Written when stdin has nothing more at hand (or the window is
        // full): a slow writer's lines go at once, a fast one's together.
        // (Written inside the select, so answers are read meanwhile: the
        // daemon may be waiting for us to read before it reads more.)
        let at_hand = stdin.get_ref().buffer().contains(&b'\n');
        let flush = !pending.is_empty() && (!reading || !at_hand || pending.len() >= 64 * 1024);
        if !reading && in_flight == 0 && pending.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            r = next_response(&mut conn.lines), if in_flight > 0 => {
                let r = r?;
                in_flight -= 1;
                let at = line_of.remove(&r.id).unwrap_or(0);
                match into_result(r) {
                    Ok(v) => {
                        sent += 1;
                        if typed::<Sent>(&v)?.queued {
                            queued += 1;
                        }
                        if json {
                            out(&v.to_string())?;
                        }
                    }
                    Err(f) => {
                        refused += 1;
                        // A line of its own is refused (code 2); any other
                        // refusal would hold for every line.
                        stop |= f.code != 2;
                        eprintln!("p2pctl: line {at}: {}", clean(&f.message));
                        first_error.get_or_insert(f);
                    }
                }
            }
            n = conn.wr.write(&pending), if flush => {
                let n = n.map_err(io_failure)?;
                if n == 0 {
                    return Err(io_failure(std::io::ErrorKind::WriteZero.into()));
                }
                pending.drain(..n);
            }
            line = stdin.next_line(), if reading && !flush => match line {
                Ok(Some(line)) => {
                    line_no += 1;
                    if line.trim().is_empty() {
                        continue;
                    }
                    if line.len() > max {
                        refused += 1;
                        let f = Failure {
                            code: 2,
                            message: format!(
                                "message of {} bytes: at most {max} bytes (UTF-8) a message",
                                line.len()
                            ),
                        };
                        eprintln!("p2pctl: line {line_no}: {}", f.message);
                        first_error.get_or_insert(f);
                        continue;
                    }
                    let id = conn.next_id;
                    conn.next_id += 1;
                    let request = Request { id, command: Command::Send { peer: name.to_owned(), text: line } };
                    serde_json::to_writer(&mut pending, &request).map_err(|e| Failure {
                        code: 1,
                        message: e.to_string(),
                    })?;
                    pending.push(b'\n');
                    line_of.insert(id, line_no);
                    in_flight += 1;
                }
                Ok(None) => eof = true,
                Err(e) => {
                    stop = true;
                    let f = Failure {
                        code: 1,
                        message: format!("cannot read standard input after line {line_no}: {e}"),
                    };
                    eprintln!("p2pctl: {}", f.message);
                    first_error.get_or_insert(f);
                }
            },
        }
    }
    let noun = if sent == 1 { "message" } else { "messages" };
    if let Some(mut f) = first_error {
        let how = if stop {
            "; reading stopped there (lines already sent went out)"
        } else {
            ""
        };
        f.message = format!("{sent} {noun} sent to {name}, {refused} refused{how}");
        return Err(f);
    }
    if !json {
        let extra = if queued > 0 {
            format!(", {queued} queued until {name} is reachable")
        } else {
            String::new()
        };
        out(&format!("sent {sent} {noun} to {name}{extra}"))?;
    }
    Ok(())
}

fn connected_text(c: &Connected) -> String {
    format!(
        "connected to {} at {} ({}, fingerprint {})",
        c.peer, c.endpoint, c.path, c.fingerprint
    )
}

/// Local `HH:MM:SS` of a millisecond Unix time, with the date in front
/// when it is not today.
fn clock(ms: u64) -> String {
    let tm = |secs: i64| {
        let t: libc::time_t = secs as libc::time_t;
        let mut out: libc::tm = unsafe { std::mem::zeroed() };
        // localtime_r: thread-safe, reads the zone from TZ / the system.
        let ok = !unsafe { libc::localtime_r(&t, &mut out) }.is_null();
        ok.then_some(out)
    };
    let secs = (ms / 1000) as i64;
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match (tm(secs), tm(today)) {
        (Some(t), Some(now)) if (t.tm_year, t.tm_yday) == (now.tm_year, now.tm_yday) => {
            format!("{:02}:{:02}:{:02}", t.tm_hour, t.tm_min, t.tm_sec)
        }
        (Some(t), _) => format!(
            "{}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.tm_year + 1900,
            t.tm_mon + 1,
            t.tm_mday,
            t.tm_hour,
            t.tm_min,
            t.tm_sec
        ),
        _ => format!("@{secs}"),
    }
}

/// Text from a peer or the server, made safe for a terminal: control
/// characters (newlines, escape sequences, bells) and the invisible ones
/// that reorder or hide text (bidirectional overrides and isolates,
/// marks, zero-width characters: U+202E can make `exe.txt` show as
/// `txt.exe`) are shown escaped, `\u{202e}`, so a peer cannot forge
/// lines, drive the terminal or disguise a name.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || proto::control::is_hidden_format(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn event_text(e: &Event) -> String {
    match e {
        Event::Message {
            peer,
            sent_ms,
            text,
            ..
        } => format!("{} <{peer}> {}", clock(*sent_ms), clean(text)),
        Event::Delivered { peer, seq } => format!("-- delivered to {peer} (#{seq})"),
        Event::ConnectRequest {
            peer,
            fingerprint,
            auto_accepted: true,
        } => format!("-- {peer} ({fingerprint}) reconnects: accepted (known key)"),
        Event::ConnectRequest { peer, fingerprint, .. } => format!(
            "-- {peer} wants to connect, fingerprint {fingerprint}: p2pctl accept {peer} / p2pctl decline {peer}"
        ),
        Event::ConnectFailed { peer, reason } => {
            format!("-- cannot connect to {peer}: {}", reason.replace('_', " "))
        }
        Event::PeerUp {
            peer,
            endpoint,
            path,
            fingerprint,
        } => format!("-- connected to {peer} at {endpoint} ({path}, {fingerprint})"),
        Event::PeerDown { peer, reason } => format!("-- {peer} disconnected: {}", clean(reason)),
        Event::PathChanged {
            peer,
            endpoint,
            path,
        } => format!("-- {peer} moved to {endpoint} ({path})"),
        Event::KeyMismatch {
            peer,
            pinned,
            offered,
        } => format!(
            "!! REFUSED {peer}: it shows key {offered}, but {pinned} is pinned for that name"
        ),
        Event::Server { state, detail } => {
            format!("-- server {}: {}", state.replace('_', " "), clean(detail))
        }
        Event::Error { message } => format!("!! {}", clean(message)),
        Event::FileOffer {
            id,
            peer,
            name,
            size,
            group,
            files,
        } => {
            // A file of a directory: accepting the directory takes it all.
            let id = group.as_ref().unwrap_or(id);
            let short = short_id(id);
            if let (Some(_), Some(n)) = (group, files) {
                return format!(
                    "-- {peer} offers {} ({}; one of {n} files of a folder): p2pctl accept-file {short} / p2pctl cancel {short}",
                    clean(name),
                    bytes(*size)
                );
            }
            format!(
                "-- {peer} offers {} ({}): p2pctl accept-file {short} / p2pctl cancel {short}",
                clean(name),
                bytes(*size)
            )
        }
        Event::TransferProgress {
            id,
            done,
            size,
            rate,
            ..
        } => format!(
            "-- transfer {}: {} of {} {}",
            short_id(id),
            bytes(*done),
            bytes(*size),
            rate_text(*rate)
        ),
        Event::TransferDone { id, peer, path, .. } => format!(
            "-- transfer {} with {peer} done{}",
            short_id(id),
            path.as_deref()
                .map(|p| format!(": {}", clean(p)))
                .unwrap_or_default()
        ),
        Event::TransferFailed {
            id, peer, reason, ..
        } => format!(
            "-- transfer {} with {peer} failed: {}",
            short_id(id),
            clean(reason)
        ),
        Event::TransferPaused {
            id, peer, reason, ..
        } => format!(
            "-- transfer {} with {peer} paused: {}",
            short_id(id),
            clean(reason)
        ),
        Event::TransferResumed { id, peer, .. } => {
            format!("-- transfer {} with {peer} resumed", short_id(id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn controls_and_bidi_overrides_are_shown_escaped() {
        assert_eq!(clean("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        // A name that would show as "photo_exe.txt" in a terminal.
        assert_eq!(clean("photo_\u{202e}txt.exe"), "photo_\\u{202e}txt.exe");
        assert_eq!(clean("x\u{2067}y\u{200b}z"), "x\\u{2067}y\\u{200b}z");
        // Other scripts, right-to-left ones included, are left alone.
        assert_eq!(clean("שלום, 世界"), "שלום, 世界");
    }
}
