//! The control socket.
//!
//! A Unix socket, mode 0600 in a 0700 directory, that refuses connections
//! from other users (peer credentials). Each connection is a task that
//! reads request lines, hands parsed requests to the daemon task, and
//! writes back whatever the daemon sends it (responses, and events once
//! it watches). A bad line gets an error response; the connection stays.

use proto::control::{ControlError, ErrorCode, Request, Response, MAX_REQUEST_LINE};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

/// Lines queued to one connection; a watcher that falls this far behind
/// is dropped rather than letting the daemon's memory grow.
pub const CONNECTION_QUEUE: usize = 4096;
/// Bytes queued to one connection at most (long messages make long
/// lines), with the same consequence.
pub const CONNECTION_QUEUE_BYTES: usize = 32 << 20;
/// Lines already queued to a connection are written together, up to
/// about this many bytes at once.
const WRITE_BATCH: usize = 64 * 1024;
/// How long one line (or batch of lines) may take to write.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a connection task sends the daemon task.
#[derive(Debug)]
pub enum Input {
    Request {
        conn: u64,
        request: Request,
        out: Reply,
    },
    Closed {
        conn: u64,
    },
}

/// A line for a connection.
#[derive(Debug)]
pub enum Out {
    Response(String),
    Event(String),
}

/// The way back to one connection.
#[derive(Debug, Clone)]
pub struct Reply {
    tx: mpsc::Sender<Out>,
    kick: Arc<Notify>,
    /// Bytes of the lines queued and not yet written.
    queued: Arc<AtomicUsize>,
}

impl Reply {
    /// Queues a line for the connection. One that does not read fast
    /// enough to keep [`CONNECTION_QUEUE`] lines (or
    /// [`CONNECTION_QUEUE_BYTES`]) from piling up is closed with a notice,
    /// rather than left hanging with lines missing.
    pub fn send(&self, line: Out) -> bool {
        let len = line.len();
        let queued = self.queued.load(Ordering::Relaxed);
        // (One line alone always goes, however long: a long history.)
        if queued > 0 && queued + len > CONNECTION_QUEUE_BYTES {
            self.kick.notify_one();
            return false;
        }
        match self.tx.try_send(line) {
            Ok(()) => {
                self.queued.fetch_add(len, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.kick.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl Out {
    fn len(&self) -> usize {
        match self {
            Out::Response(l) | Out::Event(l) => l.len(),
        }
    }
}

/// Removes the socket file when the daemon stops.
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another p2pd is already running on {0}")]
    AlreadyRunning(String),
    #[error("cannot create control socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Binds the control socket, removing a stale one left by a daemon that
/// died, and refusing if a live daemon answers on it.
pub async fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), BindError> {
    let shown = path.display().to_string();
    let io = |source| BindError::Io {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            set_mode(dir, 0o700).map_err(io)?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(BindError::AlreadyRunning(shown));
        }
        tracing::info!(path = %shown, "CONTROL(STALE_SOCKET_REMOVED)");
        std::fs::remove_file(path).map_err(io)?;
    }
    // Created 0600 from the start (no window in which another user could
    // connect); the umask is process-wide, and nothing else is creating
    // files at this point of startup.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io)?;
    let guard = SocketGuard(path.to_owned());
    set_mode(path, 0o600).map_err(io)?;
    Ok((listener, guard))
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Accepts connections until dropped (the tasks live in `tasks`, which
/// aborts them all when it is dropped).
pub async fn accept_loop(listener: UnixListener, to_daemon: mpsc::Sender<Input>) {
    let mut tasks = JoinSet::new();
    let me = unsafe { libc::geteuid() };
    let mut next_conn = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "CONTROL(ACCEPT_FAILED)");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == me => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), "CONTROL(REFUSED_OTHER_USER)");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "CONTROL(NO_PEER_CREDENTIALS)");
                continue;
            }
        }
        next_conn += 1;
        tasks.spawn(connection(next_conn, stream, to_daemon.clone()));
        // Reap finished connections so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
}

async fn connection(conn: u64, stream: UnixStream, to_daemon: mpsc::Sender<Input>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(CONNECTION_QUEUE);
    let kick = Arc::new(Notify::new());
    let queued = Arc::new(AtomicUsize::new(0));
    let reply = Reply {
        tx: out_tx,
        kick: kick.clone(),
        queued: queued.clone(),
    };
    // Requests handed to the daemon and not answered yet: after the client
    // stops writing, the connection stays until they are.
    let mut pending = 0usize;
    let mut reading = true;
    let mut watching = false;
    loop {
        if !reading && pending == 0 && !watching {
            break;
        }
        tokio::select! {
            line = next_line(&mut rd, &mut buf), if reading => match line {
                Ok(Some(bytes)) => {
                    let line = proto::control::utf8(&bytes);
                    if line.trim().is_empty() {
                        continue;
                    }
                    match Request::parse(&line) {
                        Ok(request) => {
                            watching |= matches!(request.command, proto::control::Command::Watch);
                            pending += 1;
                            let input = Input::Request { conn, request, out: reply.clone() };
                            if to_daemon.send(input).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let resp = bad_request(&line, &e.to_string());
                            if write_line(&mut wr, &resp).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                Ok(None) => reading = false,
                Err(Some(message)) => {
                    let resp = bad_request("", &message);
                    let _ = write_line(&mut wr, &resp).await;
                    break;
                }
                Err(None) => break,
            },
            _ = kick.notified() => {
                let notice = r#"{"event":"error","message":"p2pd closed this connection: it did not read its answers and events fast enough"}"#;
                let _ = write_line(&mut wr, notice).await;
                tracing::warn!(conn, "CONTROL(TOO_SLOW_CLOSED)");
                break;
            }
            out = out_rx.recv() => {
                // This line and the others already queued, in one write.
                let mut lines = Vec::new();
                let mut next = out;
                while let Some(out) = next.take() {
                    queued.fetch_sub(out.len(), Ordering::Relaxed);
                    let line = match out {
                        Out::Response(line) => {
                            pending = pending.saturating_sub(1);
                            line
                        }
                        Out::Event(line) => line,
                    };
                    lines.extend_from_slice(line.as_bytes());
                    lines.push(b'\n');
                    if lines.len() < WRITE_BATCH {
                        next = out_rx.try_recv().ok();
                    }
                }
                if lines.is_empty() || write_all(&mut wr, &lines).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to_daemon.send(Input::Closed { conn }).await;
}

/// Reads one line of at most [`MAX_REQUEST_LINE`] bytes into `buf`.
/// Cancel-safe: bytes read before a cancellation stay in `buf`, and the
/// caller clears it only after taking a whole line.
/// `Err(Some(message))` for a line too long, `Err(None)` for I/O failure.
async fn next_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>, Option<String>> {
    loop {
        let room = (MAX_REQUEST_LINE + 1).saturating_sub(buf.len()) as u64;
        let n = (&mut *r)
            .take(room)
            .read_until(b'\n', buf)
            .await
            .map_err(|_| None)?;
        if buf.last() == Some(&b'\n') {
            buf.pop();
            return Ok(Some(std::mem::take(buf)));
        }
        if buf.len() > MAX_REQUEST_LINE {
            return Err(Some(format!(
                "request line longer than {MAX_REQUEST_LINE} bytes"
            )));
        }
        if n == 0 {
            // End of input; a last line without a newline still counts.
            return Ok((!buf.is_empty()).then(|| std::mem::take(buf)));
        }
    }
}

fn bad_request(line: &str, detail: &str) -> String {
    // Answer with the request's id when the line has one, so a pipelining
    // client can match the error to its request.
    let id = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_u64()))
        .unwrap_or(0);
    let resp = Response::err(
        id,
        ControlError::new(ErrorCode::BadRequest, format!("bad request: {detail}")),
    );
    serde_json::to_string(&resp).unwrap_or_default()
}

async fn write_line(wr: &mut tokio::net::unix::OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    write_all(wr, &buf).await
}

async fn write_all(wr: &mut tokio::net::unix::OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    // A client that stopped reading must not hold this task forever.
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}
