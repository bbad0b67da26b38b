//! The control API of `p2pd`: JSON lines over a Unix socket.
//!
//! One request per line, each with a client-chosen `id` and a `cmd`; one
//! response per request, carrying the same `id`. Responses come in the
//! order the requests finish, which is not always the order they were
//! sent (`connect` waits for the peer; `send` does not wait for delivery).
//! After a `watch` request the connection also carries events, one per
//! line, each with an `event` field and no `id`.
//!
//! ```text
//! > {"id":1,"cmd":"send","peer":"bob","text":"hi"}
//! < {"id":1,"ok":true,"result":{"peer":"bob","queued":false,"seq":0}}
//! > {"id":2,"cmd":"send","peer":"nobody","text":"hi"}
//! < {"id":2,"ok":false,"error":{"code":"not_connected","message":"..."}}
//! ```
//!
//! The reference with every command, result and event is
//! `docs/control-api.md`; these types are the single definition that both
//! `p2pd` and `p2pctl` use.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where things live by default, shared by `p2pd` and `p2pctl` so both
/// find the same control socket without configuration. (Computed from
/// the environment; nothing is created.)
pub mod paths {
    use super::*;

    /// The daemon's data directory: identity key and database.
    /// `~/.local/share/p2p-chat/p2pd` on Linux,
    /// `~/Library/Application Support/p2p-chat/p2pd` on macOS.
    pub fn default_data_dir() -> PathBuf {
        directories::ProjectDirs::from("", "", "p2p-chat")
            .map(|d| d.data_dir().join("p2pd"))
            .unwrap_or_else(|| PathBuf::from(".p2pd"))
    }

    /// The control socket: in the runtime directory (`$XDG_RUNTIME_DIR`)
    /// where there is one, which is private to the user and cleared at
    /// logout; in the data directory otherwise (macOS).
    pub fn default_socket() -> PathBuf {
        directories::ProjectDirs::from("", "", "p2p-chat")
            .and_then(|d| d.runtime_dir().map(|r| r.join("p2pd.sock")))
            .unwrap_or_else(|| default_data_dir().join("p2pd.sock"))
    }

    /// Where accepted files go by default: the user's downloads directory,
    /// or `~/Downloads`, or `downloads` in the data directory.
    pub fn default_downloads() -> PathBuf {
        directories::UserDirs::new()
            .and_then(|u| {
                u.download_dir()
                    .map(Path::to_path_buf)
                    .or_else(|| Some(u.home_dir().join("Downloads")))
            })
            .unwrap_or_else(|| default_data_dir().join("downloads"))
    }
}

/// Longest request line the daemon reads; longer lines get a
/// `bad_request` error and the connection is closed. Room for a `send`
/// of the longest message with every byte escaped (`\u0001`: 6 bytes).
pub const MAX_REQUEST_LINE: usize = 6 * crate::wire::MAX_MESSAGE_BYTES + 4096;

/// A request line: `{"id": N, "cmd": "...", ...arguments}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    /// Parses a request line. A `send` (the one a pipe repeats thousands
    /// of times a second) is read straight into its fields; anything else,
    /// or a `send` with other fields, goes through the general parser
    /// (`#[serde(flatten)]` of a tagged enum buffers every field first:
    /// dozens of allocations a line), which gives the same result.
    pub fn parse(line: &str) -> Result<Request, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SendLine<'a> {
            id: u64,
            #[serde(borrow)]
            cmd: std::borrow::Cow<'a, str>,
            peer: String,
            text: String,
        }
        if let Ok(l) = serde_json::from_str::<SendLine>(line) {
            if l.cmd == "send" {
                return Ok(Request {
                    id: l.id,
                    command: Command::Send {
                        peer: l.peer,
                        text: l.text,
                    },
                });
            }
        }
        serde_json::from_str(line)
    }
}

/// A command, and (in its doc) the type its result has:
///
/// | command | result |
/// |---|---|
/// | `whoami` | [`Whoami`] |
/// | `register` | [`Registered`] |
/// | `login` | [`LoggedIn`] |
/// | `users` | `Vec<`[`UserInfo`]`>` |
/// | `connect`, `accept` | [`Connected`] |
/// | `decline` | [`Declined`] |
/// | `ping` | [`PingResult`] |
/// | `send` | [`Sent`] |
/// | `history` | `Vec<`[`HistoryEntry`]`>` |
/// | `peers` | [`PeersResult`] |
/// | `close` | [`Closed`] |
/// | `watch` | [`Watching`], then [`Event`] lines |
/// | `send_file`, `accept_file` | [`TransferInfo`] |
/// | `transfers` | `Vec<`[`TransferInfo`]`>` |
/// | `cancel` | [`Cancelled`] |
/// | `auto_accept` | [`AutoAcceptSet`] |
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Who we are, and the state of the server link.
    Whoami,
    /// Registers `name` for our key at the rendezvous server and logs in.
    /// `invite`: the server operator's invite token, for a server that
    /// registers only with one.
    Register {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invite: Option<String>,
    },
    /// Logs in again now (it happens by itself at start and after the
    /// server restarts).
    Login,
    /// Active users at the server.
    Users,
    /// Asks the server to introduce us to `peer`; answers once the session
    /// is up or the introduction failed.
    Connect { peer: String },
    /// Agrees to `peer`'s pending connection request; answers once the
    /// session is up or failed.
    Accept { peer: String },
    /// Declines `peer`'s pending connection request.
    Decline { peer: String },
    /// Round-trip time to a connected peer.
    Ping { peer: String },
    /// Queues a chat message to `peer`: it is stored before the answer and
    /// delivered when the peer is reachable.
    Send { peer: String, text: String },
    /// Stored messages with `peer`, oldest first, at most `limit` (the
    /// newest ones).
    History {
        peer: String,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Peers with a session, queued messages or a pinned key, and pending
    /// connection requests.
    Peers,
    /// Closes the session with `peer`.
    Close { peer: String },
    /// Turns this connection into a stream of [`Event`]s.
    Watch,
    /// Offers the file at `path` (absolute, as the daemon sees it) to
    /// `peer`, a contact; answers at once with the transfer (state
    /// `hashing`); the offer goes out once the file is hashed.
    SendFile { peer: String, path: String },
    /// Takes an offered file into directory `to` (absolute; default the
    /// daemon's downloads directory); answers at once with the transfer.
    AcceptFile {
        transfer: String,
        #[serde(default)]
        to: Option<String>,
    },
    /// Transfers, newest first: `limit` (100 if not given, 1,000 at
    /// most) from `offset`; with `group`, every file of that directory.
    Transfers {
        #[serde(default)]
        limit: Option<u32>,
        #[serde(default)]
        offset: Option<u32>,
        #[serde(default)]
        group: Option<String>,
    },
    /// Cancels a transfer in either direction (declines an offer).
    Cancel { transfer: String },
    /// Takes every file `peer` offers from now on into directory `dir`
    /// (absolute) without asking; no `dir` turns it off. Answers with the
    /// setting.
    AutoAccept {
        peer: String,
        #[serde(default)]
        dir: Option<String>,
    },
}

impl Command {
    /// The command's name, for logs: arguments (message text above all)
    /// never reach a log.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Whoami => "whoami",
            Command::Register { .. } => "register",
            Command::Login => "login",
            Command::Users => "users",
            Command::Connect { .. } => "connect",
            Command::Accept { .. } => "accept",
            Command::Decline { .. } => "decline",
            Command::Ping { .. } => "ping",
            Command::Send { .. } => "send",
            Command::History { .. } => "history",
            Command::Peers => "peers",
            Command::Close { .. } => "close",
            Command::Watch => "watch",
            Command::SendFile { .. } => "send_file",
            Command::AcceptFile { .. } => "accept_file",
            Command::Transfers { .. } => "transfers",
            Command::Cancel { .. } => "cancel",
            Command::AutoAccept { .. } => "auto_accept",
        }
    }
}

/// Characters that reorder or hide text without showing themselves:
/// bidirectional overrides, embeddings and isolates, direction marks,
/// zero-width characters. With U+202E a file named `photo_\u{202e}gpj.exe`
/// shows as `photo_exe.jpg`. Text from peers is shown with them escaped
/// (`p2pctl`), and file names are stored without them (`p2pd`).
pub fn is_hidden_format(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
    )
}

/// `bytes` as text: borrowed when they are valid UTF-8 (checked at the
/// standard library's speed, many times `from_utf8_lossy`'s on long
/// text), else with U+FFFD for what is not.
pub fn utf8(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Checks a chat message's text as `send` takes it: not empty, at most
/// [`crate::wire::MAX_MESSAGE_BYTES`] bytes of UTF-8.
pub fn check_text(text: &str) -> Result<(), ControlError> {
    let max = crate::wire::MAX_MESSAGE_BYTES;
    if text.is_empty() {
        return Err(ControlError::new(
            ErrorCode::InvalidArgument,
            "empty message",
        ));
    }
    if text.len() > max {
        return Err(ControlError::new(
            ErrorCode::InvalidArgument,
            format!("message is {} bytes; the most is {max}", text.len()),
        ));
    }
    Ok(())
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ControlError>,
}

impl Response {
    /// The result as the type the command answers with (see the table at
    /// [`Command`]), or the daemon's error.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ControlError> {
        if !self.ok {
            return Err(self.error.unwrap_or_else(|| {
                ControlError::new(
                    ErrorCode::Internal,
                    "p2pd reported an error without details",
                )
            }));
        }
        let v = self.result.unwrap_or(serde_json::Value::Null);
        serde_json::from_value(v).map_err(|e| {
            ControlError::new(
                ErrorCode::Internal,
                format!("unreadable answer from p2pd: {e}"),
            )
        })
    }

    pub fn ok(id: u64, result: impl Serialize) -> Self {
        Self {
            id,
            ok: true,
            // Serializing our own plain structs cannot fail.
            result: Some(serde_json::to_value(result).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }

    pub fn from_result(id: u64, result: Result<serde_json::Value, ControlError>) -> Self {
        match result {
            Ok(v) => Self::ok(id, v),
            Err(e) => Self::err(id, e),
        }
    }

    /// The line of a successful response carrying `result`, serialized
    /// straight from it (the same bytes as [`Response::ok`] with its
    /// value, without building the value: the hot path of `send`).
    pub fn ok_line<T: Serialize>(id: u64, result: &T) -> Result<String, serde_json::Error> {
        #[derive(Serialize)]
        struct Ok<'a, T> {
            id: u64,
            ok: bool,
            result: &'a T,
        }
        serde_json::to_string(&Ok {
            id,
            ok: true,
            result,
        })
    }

    pub fn err(id: u64, error: ControlError) -> Self {
        Self {
            id,
            ok: false,
            result: None,
            error: Some(error),
        }
    }
}

/// Why a command failed: a stable `code` for scripts and a sentence for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
}

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request line was not valid JSON or not a known command.
    BadRequest,
    /// An argument is invalid (a name, an empty or oversized message).
    InvalidArgument,
    /// Not logged in at the rendezvous server.
    NotLoggedIn,
    /// The server knows no such user.
    UnknownUser,
    /// The user is registered but not online.
    Offline,
    /// The name belongs to another key.
    NameTaken,
    /// The peer declined, or a key did not match the pinned one.
    Refused,
    /// No session with that peer (and no way to reach it by itself).
    NotConnected,
    /// No pending request from that peer.
    NoRequest,
    /// No answer in time.
    TimedOut,
    /// No transfer with that id (or the prefix names more than one).
    NoTransfer,
    /// A file could not be read, written or hashed.
    FileError,
    /// The rendezvous server's key differs from the pinned one.
    ServerKeyMismatch,
    /// The daemon could not do it (storage, internal).
    Internal,
}

/// What `whoami` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    pub name: Option<String>,
    pub fingerprint: String,
    pub server: String,
    /// `connecting`, `connected`, `logged_in` or `key_mismatch`.
    pub server_state: String,
    pub server_fingerprint: Option<String>,
    pub observed: Option<String>,
    pub data_dir: String,
}

/// What `register` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub name: String,
    pub fingerprint: String,
}

/// What `login` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedIn {
    pub name: String,
    /// Our address as the server saw it.
    pub observed: String,
}

/// What `decline` answers (`declined` is always true).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declined {
    pub declined: bool,
}

/// What `close` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    pub peer: String,
}

/// What `watch` answers before the first event (`watching` is always
/// true).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watching {
    pub watching: bool,
}

/// What `auto_accept` answers: the setting now (`dir` none: off).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoAcceptSet {
    pub peer: String,
    pub dir: Option<String>,
}

/// What `cancel` answers: the transfer, or a directory's files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Cancelled {
    Directory(Vec<TransferInfo>),
    One(TransferInfo),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub fingerprint: String,
}

/// What `connect` and `accept` answer once the session is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    pub peer: String,
    pub endpoint: String,
    /// `direct`, `relay-udp` or `relay-tcp`.
    pub path: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
/// (Fields in alphabetical order: serialized straight, by
/// [`Response::ok_line`], they come out as through a JSON value.)
pub struct Sent {
    pub peer: String,
    /// True when the peer is not reachable now (no session, or its path
    /// has not answered for seconds): the message waits in the outbox and
    /// goes out when the peer is reachable.
    pub queued: bool,
    /// Why it is queued, for people (absent when it is not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub peer: String,
    pub rtt_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    /// Outgoing, not yet acknowledged by the peer.
    Queued,
    /// Outgoing, acknowledged by the peer's daemon.
    Delivered,
    /// Incoming.
    Received,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub peer: String,
    pub direction: Direction,
    pub seq: u64,
    /// Milliseconds since the Unix epoch, by the sender's clock.
    pub sent_ms: u64,
    pub state: MessageState,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    /// `punching`, `handshaking`, `established` or `closed`.
    pub state: String,
    /// Where this peer's packets go: its address on a direct path, the
    /// relay's address when relayed.
    pub endpoint: Option<String>,
    /// `direct`, `relay-udp` (through the rendezvous server over UDP) or
    /// `relay-tcp` (the same, over this daemon's TCP connection to it).
    pub path: Option<String>,
    /// How the path was found: `punch`, `port-prediction`, `roaming` or
    /// `relay`.
    pub technique: Option<String>,
    pub rtt_ms: Option<f64>,
    pub fingerprint: Option<String>,
    pub queued: usize,
    /// Not connected: for how many seconds, and why the last session
    /// ended (absent while connected, or if there never was one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Connected, but what was sent has had no answer for this many
    /// seconds (2 or more: the path is in doubt, the relay is tried too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unanswered_s: Option<f64>,
    /// The daemon is asking for a session by itself (messages or files
    /// wait, or a session it had is being resumed).
    #[serde(default)]
    pub reconnecting: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeersResult {
    pub peers: Vec<PeerInfo>,
    /// Connection requests waiting for `accept` or `decline`.
    pub requests: Vec<UserInfo>,
    /// The rendezvous link, as `whoami` names it (`logged_in`,
    /// `connecting`, …).
    #[serde(default)]
    pub server: String,
    /// Not logged in to the server for this many seconds. Sessions that
    /// are up go on; peers with a known direct address are reached there
    /// (a session is asked for one second into the outage); new contacts,
    /// the user list and the relay wait for the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_away_s: Option<f64>,
}

/// One file transfer, as `transfers`, `send_file` and `accept_file` show
/// it. Ids are 16 hex digits; commands take them as `transfer` (a prefix
/// of four or more that names one transfer will do).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferInfo {
    pub id: String,
    pub peer: String,
    pub direction: Direction,
    /// The file's name (as offered; for incoming files, sanitised).
    pub name: String,
    pub size: u64,
    /// Bytes the peer acknowledged (out) or verified (in).
    pub done: u64,
    pub state: TransferState,
    /// Bytes per second over the last seconds, while active.
    pub rate: Option<f64>,
    /// Seconds left at that rate, while active.
    pub eta_s: Option<f64>,
    /// Out: the file sent; in: where it is (or goes) on disk.
    pub path: Option<String>,
    /// Why it ended, if it ended without the file.
    pub reason: Option<String>,
    /// The directory it was sent with (an id like a transfer's; `accept_file`
    /// and `cancel` take it for all its files), and how many files that
    /// directory has.
    pub group: Option<String>,
    pub files: Option<u32>,
}

/// Where a transfer stands; its JSON form is the word in the comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    /// `hashing`: ours, being hashed before the offer goes out.
    Hashing,
    /// `offered`: offered, not yet accepted.
    Offered,
    /// `active`: accepted, data moving.
    Active,
    /// `finishing`: every byte there, the last checks running.
    Finishing,
    /// `paused`: the receiver's disk is full; it goes on by itself when
    /// space returns (`reason` says so).
    Paused,
    /// `done`: the file is at the receiver, verified.
    Done,
    /// `ended`: ended without the file (cancelled, declined, failed).
    Ended,
}

impl TransferState {
    pub const ALL: [TransferState; 7] = [
        TransferState::Hashing,
        TransferState::Offered,
        TransferState::Active,
        TransferState::Finishing,
        TransferState::Paused,
        TransferState::Done,
        TransferState::Ended,
    ];

    /// The word the control API and the database use.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Hashing => "hashing",
            TransferState::Offered => "offered",
            TransferState::Active => "active",
            TransferState::Finishing => "finishing",
            TransferState::Paused => "paused",
            TransferState::Done => "done",
            TransferState::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Over: nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(self, TransferState::Done | TransferState::Ended)
    }
}

impl std::fmt::Display for TransferState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event line on a watching connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A chat message arrived (and is stored).
    Message {
        peer: String,
        seq: u64,
        sent_ms: u64,
        text: String,
    },
    /// The peer's daemon acknowledged our message.
    Delivered {
        peer: String,
        seq: u64,
    },
    /// Someone asks to connect; answer with `accept` or `decline`.
    ConnectRequest {
        peer: String,
        fingerprint: String,
        /// A known contact with its pinned key: accepted by itself.
        auto_accepted: bool,
    },
    ConnectFailed {
        peer: String,
        reason: String,
    },
    PeerUp {
        peer: String,
        endpoint: String,
        path: String,
        fingerprint: String,
    },
    PeerDown {
        peer: String,
        reason: String,
    },
    /// The session with `peer` moved to another path or endpoint.
    PathChanged {
        peer: String,
        endpoint: String,
        path: String,
    },
    /// A peer showed a different key than the one pinned for its name;
    /// the session was refused.
    KeyMismatch {
        peer: String,
        pinned: String,
        offered: String,
    },
    /// The rendezvous link changed state.
    Server {
        /// `connected`, `logged_in`, `down`, `login_failed` or
        /// `key_mismatch`.
        state: String,
        detail: String,
    },
    /// Something went wrong that no request is waiting for.
    Error {
        message: String,
    },
    /// A peer offers a file: `accept_file` or `cancel`.
    FileOffer {
        id: String,
        peer: String,
        name: String,
        size: u64,
        /// Part of a directory: its id and file count.
        group: Option<String>,
        files: Option<u32>,
    },
    /// A transfer advanced (at most a few times a second per transfer).
    TransferProgress {
        id: String,
        peer: String,
        done: u64,
        size: u64,
        rate: Option<f64>,
        group: Option<String>,
    },
    /// The file arrived, verified (in), or the peer has it (out).
    TransferDone {
        id: String,
        peer: String,
        path: Option<String>,
        group: Option<String>,
    },
    /// The transfer ended without the file.
    TransferFailed {
        id: String,
        peer: String,
        reason: String,
        group: Option<String>,
    },
    /// The transfer stopped for now (the receiver's disk is full); a
    /// `transfer_resumed` follows when it goes on.
    TransferPaused {
        id: String,
        peer: String,
        reason: String,
        group: Option<String>,
    },
    TransferResumed {
        id: String,
        peer: String,
        group: Option<String>,
    },
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_send_read_straight_is_what_the_general_parser_reads() {
        for line in [
            r#"{"id":1,"cmd":"send","peer":"bob","text":"hi \"there\" \u00e9"}"#,
            r#"{"cmd":"send","text":"x","peer":"bob","id":2}"#,
            r#"{"id":3,"cmd":"whoami"}"#,
            r#"{"id":4,"cmd":"send","peer":"bob"}"#,
            r#"{"id":5,"cmd":"send","peer":"bob","text":"x","extra":1}"#,
            r#"{"id":6,"cmd":"history","peer":"bob","text":"x"}"#,
        ] {
            let general = serde_json::from_str::<Request>(line).map_err(|e| e.to_string());
            assert_eq!(
                Request::parse(line).map_err(|e| e.to_string()),
                general,
                "{line}"
            );
        }
    }

    #[test]
    fn a_line_serialized_straight_is_the_same_as_through_a_value() {
        let sent = Sent {
            peer: "bob".into(),
            seq: 7,
            queued: true,
            reason: Some("bob is \"away\"".into()),
        };
        let through =
            serde_json::to_string(&Response::ok(3, serde_json::to_value(&sent).unwrap())).unwrap();
        assert_eq!(Response::ok_line(3, &sent).unwrap(), through);
    }
    use super::*;

    #[test]
    fn requests_parse_from_the_documented_lines() {
        let r: Request =
            serde_json::from_str(r#"{"id":1,"cmd":"send","peer":"bob","text":"hi"}"#).unwrap();
        assert_eq!(
            r,
            Request {
                id: 1,
                command: Command::Send {
                    peer: "bob".into(),
                    text: "hi".into()
                }
            }
        );
        let r: Request = serde_json::from_str(r#"{"id":2,"cmd":"history","peer":"bob"}"#).unwrap();
        assert_eq!(
            r.command,
            Command::History {
                peer: "bob".into(),
                limit: None
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"whoami","id":3}"#).unwrap();
        assert_eq!(r.command, Command::Whoami);
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        for line in [
            "",
            "{",
            "null",
            r#"{"id":1}"#,
            r#"{"id":1,"cmd":"launch"}"#,
            r#"{"id":1,"cmd":"send","peer":"bob"}"#,
            r#"{"id":-1,"cmd":"whoami"}"#,
            r#"{"id":1,"cmd":"send","peer":7,"text":"x"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(line).is_err(), "{line}");
        }
    }

    #[test]
    fn responses_and_events_have_the_documented_shape() {
        let ok = Response::ok(
            1,
            Sent {
                peer: "bob".into(),
                seq: 0,
                queued: false,
                reason: None,
            },
        );
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"id":1,"ok":true,"result":{"peer":"bob","queued":false,"seq":0}}"#
        );
        let err = Response::err(2, ControlError::new(ErrorCode::NotConnected, "no"));
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"id":2,"ok":false,"error":{"code":"not_connected","message":"no"}}"#
        );
        for t in TransferState::ALL {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(TransferState::parse(t.as_str()), Some(t));
        }
        let typed: Sent = Response::ok(
            3,
            Sent {
                peer: "bob".into(),
                seq: 7,
                queued: true,
                reason: Some("bob is not connected".into()),
            },
        )
        .into_result()
        .unwrap();
        assert_eq!(typed.seq, 7);
        let e = Response::err(4, ControlError::new(ErrorCode::Offline, "away"))
            .into_result::<Sent>()
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Offline);
        let ev = Event::PeerDown {
            peer: "bob".into(),
            reason: "closed".into(),
        };
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"event":"peer_down","peer":"bob","reason":"closed"}"#
        );
    }
}
