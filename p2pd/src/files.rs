//! The daemon's side of file transfer: the disk.
//!
//! [`proto::transfer`] decides what goes where; this module opens source
//! files and reads them for it ([`FileSource`]), writes what arrives into
//! a partial file next to its destination, and runs the slow work (hashing
//! a file to offer it, checking a piece, syncing a file and giving it its
//! name) on blocking threads, reporting back through a channel. Writes go
//! to one disk thread in the order they arrive, and a piece's check is
//! queued behind its writes there, so the network loop never waits for the
//! page cache while the check still reads what was written.
//!
//! Where an incoming file goes: the name the peer offered is reduced to
//! one safe component ([`sanitize`]), and a name that exists already gets a
//! number ([`unique_dest`]), so a transfer can never write outside the
//! chosen directory nor overwrite anything. Until it is verified the file
//! is `.<name>.<id>.part` in that directory; the final name appears only
//! after the whole file matched the offer's hash and was synced, by a hard
//! link that fails rather than replace an existing file.

use proto::{FileIo, FileSource, TransferId};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What a blocking job found.
pub enum JobDone {
    Hashed {
        id: u64,
        peer: String,
        path: PathBuf,
        /// The name offered: the file's name, or its path from the
        /// directory sent (`photos/2024/a.jpg`).
        name: String,
        group: (u64, u32),
        size: u64,
        piece_size: u32,
        mtime_ns: i64,
        hash: [u8; 32],
        piece_hashes: Vec<[u8; 32]>,
    },
    HashFailed {
        id: u64,
        peer: String,
        path: PathBuf,
        name: String,
        group: (u64, u32),
        error: String,
    },
    /// A piece checked (and synced, when good).
    Piece {
        peer: String,
        id: u64,
        piece: u32,
        ok: bool,
    },
    /// A write into a partial file failed (later writes of that transfer
    /// are dropped).
    WriteFailed {
        peer: String,
        id: u64,
        error: std::io::Error,
    },
    /// The whole file checked: its final path, or why not.
    File {
        peer: String,
        id: u64,
        result: Result<PathBuf, String>,
    },
}

/// An incoming file being written: opened when written to, closed again
/// when too many are open (a directory of thousands of files is accepted
/// at once).
struct Part {
    file: Option<Arc<File>>,
    path: PathBuf,
    /// The name it gets once verified (numbered there if taken by then).
    dest: PathBuf,
    used: u64,
}

/// Partial files, and source files, kept open at once at most (each; the
/// open-file limit may lower it, [`open_files_cap`]).
const MAX_OPEN_PARTS: usize = 64;

/// Work for the disk thread, done in order.
enum DiskJob {
    /// A partial file was (re)opened: its writes count again.
    Opened { id: u64 },
    Write {
        peer: String,
        id: u64,
        file: Arc<File>,
        offset: u64,
        data: Vec<u8>,
    },
    /// Hash the piece (once the writes before it are done) on a blocking
    /// thread; [`JobDone::Piece`] follows.
    Check {
        peer: String,
        id: u64,
        piece: u32,
        offset: u64,
        len: u64,
        hash: [u8; 32],
        file: Arc<File>,
    },
}

/// Jobs queued for the disk thread before the network loop waits (64
/// datagrams' worth: up to 4 MiB of data).
const DISK_QUEUE: usize = 64;

/// A file being sent, with what it was when it was hashed.
struct Source {
    path: PathBuf,
    /// Opened when first read; closed again when too many are open.
    file: Option<File>,
    used: u64,
    size: u64,
    mtime_ns: i64,
}

/// Descriptors kept for everything but files: sockets (the 256 of a port
/// prediction round among them), the database, control connections.
const RESERVED_DESCRIPTORS: u64 = 320;

/// Bytes an unprivileged process may still write on `dir`'s file system
/// (statvfs's available blocks), if it can be told.
pub fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only the struct passed; the path is a valid
    // NUL-terminated string for the call's duration.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Raises the soft open-file limit to the hard one (at most 65,536), as a
/// daemon that may hold many files and sockets should; returns the soft
/// limit in force.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    // (macOS refuses more than OPEN_MAX, 10,240, whatever the hard limit
    // says: that is tried next.)
    for want in [lim.rlim_max.min(65_536), lim.rlim_max.min(10_240)] {
        if lim.rlim_cur >= want {
            break;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = want;
        }
    }
    // (rlim_t is u64 here, not on every target.)
    #[allow(clippy::unnecessary_cast)]
    let soft = lim.rlim_cur as u64;
    soft
}

/// How many partial files (and as many source files) to keep open under
/// an open-file limit of `limit`: half of what the sockets and the
/// database leave each, at most 64, at least 2 (transfers then go on,
/// reopening files as they take turns, instead of failing with "too many
/// open files").
pub fn open_files_cap(limit: u64) -> usize {
    let spare = limit.saturating_sub(RESERVED_DESCRIPTORS) / 4;
    (spare as usize).clamp(2, MAX_OPEN_PARTS)
}
/// Files hashed at once (each reads a piece-sized buffer).
const HASHERS: usize = 2;

pub struct Files {
    /// Partial files, and source files, kept open at once at most.
    max_open: usize,
    sources: HashMap<u64, Source>,
    /// Reads so far: the clock of "least recently used".
    reads: u64,
    hashing: std::sync::Arc<tokio::sync::Semaphore>,
    parts: HashMap<u64, Part>,
    jobs: mpsc::Sender<JobDone>,
    disk: std::sync::mpsc::SyncSender<DiskJob>,
}

impl Files {
    /// Starts the disk thread; call from within the tokio runtime.
    pub fn new(max_open: usize) -> (Self, mpsc::Receiver<JobDone>) {
        let (jobs, rx) = mpsc::channel(1024);
        let (disk, disk_rx) = std::sync::mpsc::sync_channel(DISK_QUEUE);
        let (done, runtime) = (jobs.clone(), tokio::runtime::Handle::current());
        std::thread::Builder::new()
            .name("disk".into())
            .spawn(move || disk_thread(disk_rx, done, runtime))
            .expect("cannot start the disk thread");
        let files = Self {
            max_open,
            sources: HashMap::new(),
            reads: 0,
            hashing: std::sync::Arc::new(tokio::sync::Semaphore::new(HASHERS)),
            parts: HashMap::new(),
            jobs,
            disk,
        };
        (files, rx)
    }

    /// Hashes `path` on a blocking thread; [`JobDone::Hashed`] follows.
    pub fn hash(
        &self,
        id: u64,
        peer: String,
        path: PathBuf,
        name: String,
        group: (u64, u32),
        piece_size: u32,
    ) {
        let jobs = self.jobs.clone();
        let permits = self.hashing.clone();
        // A few at a time: a directory of thousands of files queues here.
        tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let _ = tokio::task::spawn_blocking(move || {
                hash_job(id, peer, path, name, group, piece_size, jobs)
            })
            .await;
        });
    }

    /// Notes a file to send; `size` and `mtime_ns` are what it was when
    /// hashed: a file that changes since is refused as it is read. It is
    /// opened when first read.
    pub fn open_source(
        &mut self,
        id: u64,
        path: &Path,
        size: u64,
        mtime_ns: i64,
    ) -> std::io::Result<()> {
        std::fs::metadata(path)?;
        self.sources.insert(
            id,
            Source {
                path: path.to_owned(),
                file: None,
                used: 0,
                size,
                mtime_ns,
            },
        );
        Ok(())
    }

    pub fn close(&mut self, id: u64) {
        self.sources.remove(&id);
        self.parts.remove(&id);
    }

    /// Creates (if needed) the partial file `path` of an incoming transfer
    /// that goes to `dest` once verified; it is opened when written to.
    pub fn open_part(&mut self, id: u64, path: &Path, dest: &Path) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        self.parts.insert(
            id,
            Part {
                file: None,
                path: path.to_owned(),
                dest: dest.to_owned(),
                used: 0,
            },
        );
        let _ = self.disk.send(DiskJob::Opened { id });
        Ok(())
    }

    /// The open partial file of `id`, opening it (and closing the least
    /// recently used one when `max_open` are open). Jobs queued
    /// for the disk thread keep their own handle.
    fn part_file(&mut self, id: u64) -> std::io::Result<Arc<File>> {
        self.reads += 1;
        let now = self.reads;
        if self.parts.get(&id).is_some_and(|p| p.file.is_none()) {
            close_lru(
                self.parts.values_mut().map(|p| (&mut p.file, p.used)),
                self.max_open,
            );
        }
        let p = self
            .parts
            .get_mut(&id)
            .ok_or_else(|| std::io::Error::other("no partial file open"))?;
        p.used = now;
        if p.file.is_none() {
            // Never created here: a part file that vanished is an error.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p.path)?;
            p.file = Some(Arc::new(f));
        }
        Ok(p.file.clone().expect("opened above"))
    }

    /// Writes of transfer `id` may go to disk again (after a failed write
    /// the disk thread drops the rest of them: a paused transfer that
    /// resumes clears that).
    pub fn writable_again(&mut self, id: u64) {
        let _ = self.disk.send(DiskJob::Opened { id });
    }

    /// Closes the partial file of a transfer but leaves it on disk.
    pub fn keep_part(&mut self, id: u64) {
        self.parts.remove(&id);
    }

    /// Removes the partial file of a transfer that ended without it;
    /// whether there was one.
    pub fn discard_part(&mut self, id: u64) -> bool {
        match self.parts.remove(&id) {
            Some(p) => {
                let _ = std::fs::remove_file(&p.path);
                true
            }
            None => false,
        }
    }

    /// Reports a write that failed before it reached the disk thread the
    /// way the thread reports its own: as [`JobDone::WriteFailed`].
    fn write_failed(&self, peer: String, id: u64, error: std::io::Error) {
        let jobs = self.jobs.clone();
        tokio::spawn(async move {
            let _ = jobs.send(JobDone::WriteFailed { peer, id, error }).await;
        });
    }

    /// Checks a piece once its writes are done; [`JobDone::Piece`]
    /// follows.
    fn check_piece(
        &mut self,
        peer: String,
        id: u64,
        piece: u32,
        offset: u64,
        len: u64,
        hash: [u8; 32],
    ) {
        let file = match self.part_file(id) {
            Ok(f) => f,
            Err(error) => return self.write_failed(peer, id, error),
        };
        let _ = self.disk.send(DiskJob::Check {
            peer,
            id,
            piece,
            offset,
            len,
            hash,
            file,
        });
    }

    /// Syncs the verified file and gives it its final name (never
    /// replacing a file); [`JobDone::File`] follows.
    fn finish_part(&mut self, peer: String, id: u64) {
        let jobs = self.jobs.clone();
        let (file, part_path, dest) = match (self.part_file(id), self.parts.get(&id)) {
            (Ok(f), Some(p)) => (f, p.path.clone(), p.dest.clone()),
            (Err(e), _) => {
                let result = Err(format!("cannot open the received file: {e}"));
                tokio::spawn(async move {
                    let _ = jobs.send(JobDone::File { peer, id, result }).await;
                });
                return;
            }
            _ => return,
        };
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unnamed".into());
        tokio::task::spawn_blocking(move || {
            let result = finish_file(&file, &part_path, &dir, &name);
            let _ = jobs.blocking_send(JobDone::File { peer, id, result });
        });
    }

    /// The partial file is now the final one: forget it without removing.
    pub fn finished(&mut self, id: u64) {
        self.parts.remove(&id);
    }
}

/// Before one more file is opened: when `max` of these (file, last use)
/// are open, closes the least recently used.
fn close_lru<'a, F: 'a>(files: impl Iterator<Item = (&'a mut Option<F>, u64)>, max: usize) {
    let mut open: Vec<_> = files.filter(|(f, _)| f.is_some()).collect();
    if open.len() >= max {
        if let Some(i) = (0..open.len()).min_by_key(|i| open[*i].1) {
            *open.swap_remove(i).0 = None;
        }
    }
}

/// Does the disk jobs in order: writes here, piece checks handed on to a
/// blocking thread (they read what the writes before them wrote).
fn disk_thread(
    jobs: std::sync::mpsc::Receiver<DiskJob>,
    done: mpsc::Sender<JobDone>,
    runtime: tokio::runtime::Handle,
) {
    // Transfers whose writes failed: the rest of their writes is moot.
    let mut failed = HashSet::new();
    while let Ok(job) = jobs.recv() {
        match job {
            DiskJob::Opened { id } => {
                failed.remove(&id);
            }
            DiskJob::Write {
                peer,
                id,
                file,
                offset,
                data,
            } => {
                if failed.contains(&id) {
                    continue;
                }
                if let Err(error) = file.write_all_at(&data, offset) {
                    failed.insert(id);
                    // Never wait here for the network loop: it may be
                    // waiting for room in our queue.
                    let done = done.clone();
                    runtime.spawn(async move {
                        let _ = done.send(JobDone::WriteFailed { peer, id, error }).await;
                    });
                }
            }
            DiskJob::Check {
                peer,
                id,
                piece,
                offset,
                len,
                hash,
                file,
            } => {
                if failed.contains(&id) {
                    continue;
                }
                let done = done.clone();
                runtime.spawn_blocking(move || {
                    let ok = read_hash(&file, offset, len).is_ok_and(|h| h == hash);
                    // Durable before it counts as held (resumption trusts
                    // it). A failed sync is the disk's fault (full, failing),
                    // not the piece's: the transfer ends saying so.
                    if ok {
                        if let Err(error) = file.sync_data() {
                            let _ = done.blocking_send(JobDone::WriteFailed { peer, id, error });
                            return;
                        }
                    }
                    let _ = done.blocking_send(JobDone::Piece {
                        peer,
                        id,
                        piece,
                        ok,
                    });
                });
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn hash_job(
    id: u64,
    peer: String,
    path: PathBuf,
    name: String,
    group: (u64, u32),
    piece_size: u32,
    jobs: mpsc::Sender<JobDone>,
) {
    let done = match hash_file(&path, piece_size) {
        Ok((size, mtime_ns, hash, piece_hashes)) => JobDone::Hashed {
            id,
            peer,
            path,
            name,
            group,
            size,
            piece_size,
            mtime_ns,
            hash,
            piece_hashes,
        },
        Err(e) => JobDone::HashFailed {
            id,
            peer,
            error: e.to_string(),
            path,
            name,
            group,
        },
    };
    let _ = jobs.blocking_send(done);
}

/// The node's disk side: writes and checks go to the disk thread in
/// order, the final sync and rename to a blocking thread; each outcome
/// comes back as a [`JobDone`].
impl FileIo for Files {
    fn write(&mut self, peer: &str, id: TransferId, offset: u64, data: Vec<u8>) {
        let id = id.0;
        let file = match self.part_file(id) {
            Ok(f) => f,
            Err(error) => return self.write_failed(peer.to_owned(), id, error),
        };
        let job = DiskJob::Write {
            peer: peer.to_owned(),
            id,
            file,
            offset,
            data,
        };
        // Waits only while the queue is full.
        if self.disk.send(job).is_err() {
            let error = std::io::Error::other("the disk thread is gone");
            self.write_failed(peer.to_owned(), id, error);
        }
    }

    fn verify_piece(
        &mut self,
        peer: &str,
        id: TransferId,
        piece: u32,
        offset: u64,
        len: u64,
        hash: [u8; 32],
    ) {
        self.check_piece(peer.to_owned(), id.0, piece, offset, len, hash);
    }

    fn finish(&mut self, peer: &str, id: TransferId) {
        self.finish_part(peer.to_owned(), id.0);
    }
}

impl FileSource for Files {
    fn read(&mut self, id: TransferId, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let id = id.0;
        self.reads += 1;
        if self.sources.get(&id).is_some_and(|s| s.file.is_none()) {
            close_lru(
                self.sources.values_mut().map(|s| (&mut s.file, s.used)),
                self.max_open,
            );
        }
        let reads = self.reads;
        let s = self
            .sources
            .get_mut(&id)
            .ok_or_else(|| std::io::Error::other("the file is no longer open"))?;
        s.used = reads;
        if s.file.is_none() {
            s.file = Some(File::open(&s.path)?);
        }
        let file = s.file.as_ref().expect("opened above");
        // At each piece, the file must still be what was hashed and
        // offered (one fstat a MiB).
        // (`is_multiple_of` is newer than the crate's rust-version.)
        #[allow(clippy::manual_is_multiple_of)]
        let piece_start = offset % proto::PIECE_SIZE as u64 == 0;
        if piece_start {
            let meta = file.metadata()?;
            if meta.len() != s.size || mtime_ns(&meta) != s.mtime_ns {
                return Err(std::io::Error::other(
                    "the file changed while it was being sent",
                ));
            }
        }
        let f = file;
        let mut n = 0;
        while n < buf.len() {
            match f.read_at(&mut buf[n..], offset + n as u64)? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}

/// What hashing a file found: size, modification time (ns), the file's
/// hash (`proto::file_hash`) and the hash of each piece (`proto::piece_hash`).
pub type Hashed = (u64, i64, [u8; 32], Vec<[u8; 32]>);

/// Size, modification time, the file's hash and each piece's, in one
/// read.
pub fn hash_file(path: &Path, piece_size: u32) -> std::io::Result<Hashed> {
    let mut f = File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mtime_ns = mtime_ns(&meta);
    let mut pieces = Vec::new();
    let mut buf = vec![0u8; piece_size as usize];
    let mut size = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        pieces.push(proto::piece_hash(&buf[..n]));
        size += n as u64;
        if n < buf.len() {
            break;
        }
    }
    if size != meta.len() {
        return Err(std::io::Error::other(
            "the file changed while it was hashed",
        ));
    }
    Ok((size, mtime_ns, proto::file_hash(&pieces), pieces))
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

fn read_hash(file: &File, offset: u64, len: u64) -> std::io::Result<[u8; 32]> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    Ok(proto::piece_hash(&buf))
}

/// The last step of a verified file (its pieces were checked against
/// hashes that match the offer; see `proto::file_hash`): make it
/// durable and give it its final name.
fn finish_file(file: &File, part: &Path, dir: &Path, name: &str) -> Result<PathBuf, String> {
    file.sync_all()
        .map_err(|e| format!("cannot sync the file: {e}"))?;
    // A hard link never replaces an existing file; on a name taken since,
    // take the next free one.
    for attempt in 0..1000 {
        let dest = numbered(dir, name, attempt);
        match std::fs::hard_link(part, &dest) {
            Ok(()) => {
                let _ = std::fs::remove_file(part);
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
                return Ok(dest);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot name the file {}: {e}", dest.display())),
        }
    }
    Err(format!("no free name for {name} in {}", dir.display()))
}

/// `name`, or `stem (n).ext` for n ≥ 1.
fn numbered(dir: &Path, name: &str, n: u32) -> PathBuf {
    if n == 0 {
        return dir.join(name);
    }
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => dir.join(format!("{stem} ({n}).{ext}")),
        _ => dir.join(format!("{name} ({n})")),
    }
}

/// Creates a new directory `name` in `dir` (created if missing), or
/// `name (1)`, `name (2)`, ... when taken: never an existing one, so a
/// received folder is never merged into another. A dot in a directory's
/// name is not an extension (`v1.2 (1)`, not `v1 (1).2`).
pub fn unique_dir(dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for n in 0..10_000u32 {
        let p = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{name} ({n})"))
        };
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "no free name for {name} in {}",
        dir.display()
    )))
}

/// The first name in `dir` that no file has and `taken` does not hold.
pub fn unique_dest(dir: &Path, name: &str, taken: &[PathBuf]) -> PathBuf {
    (0..u32::MAX)
        .map(|n| numbered(dir, name, n))
        .find(|p| !p.exists() && !taken.contains(p))
        .unwrap_or_else(|| dir.join(name))
}

/// The regular files under `dir` (symbolic links are not followed), with
/// their paths relative to it joined by `/`, in a stable order; at most
/// `max`.
pub fn walk(dir: &Path, max: usize) -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push((e.path(), r));
            } else if t.is_file() {
                out.push((e.path(), r));
                if out.len() > max {
                    return Err(std::io::Error::other(format!("more than {max} files")));
                }
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// A relative path a peer offered, as safe components ([`sanitize`] each;
/// `.`, `..` and empty ones dropped); never empty, at most 32 deep.
pub fn sanitize_path(offered: &str) -> Vec<String> {
    let mut parts: Vec<String> = offered
        .split(['/', '\\'])
        .filter(|c| !c.trim().is_empty() && *c != "." && *c != "..")
        .map(sanitize)
        .collect();
    parts.truncate(32);
    if parts.is_empty() {
        parts.push("unnamed".into());
    }
    parts
}

/// Names Windows reserves (harmless here, but a file sent on to a Windows
/// machine, or a shared folder, would break).
const RESERVED: [&str; 22] = [
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// One safe file name from what a peer offered: the last path component
/// (`/` and `\` both separate), without control characters, not `.` or
/// `..`, not a reserved device name, at most 200 bytes.
pub fn sanitize(offered: &str) -> String {
    let last = offered
        .rsplit(['/', '\\'])
        .find(|c| !c.trim().is_empty() && *c != "." && *c != "..")
        .unwrap_or("");
    // No control characters, nor ones that reorder or hide the name (a
    // right-to-left override makes "x\u{202e}txt.exe" show as "xexe.txt").
    let mut name: String = last
        .chars()
        .filter(|c| !c.is_control() && !proto::control::is_hidden_format(*c))
        .collect();
    // Trailing dots and spaces vanish on some filesystems: drop them.
    name = name.trim_end_matches(['.', ' ']).trim_start().to_owned();
    if name.is_empty() || name == "." || name == ".." {
        name = "unnamed".into();
    }
    let base = name.split('.').next().unwrap_or("").to_ascii_lowercase();
    if RESERVED.contains(&base.as_str()) {
        name = format!("_{name}");
    }
    if name.len() > 200 {
        let mut end = 200;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
        name = name.trim_end_matches(['.', ' ']).to_owned();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_sets_how_many_files_stay_open() {
        assert_eq!(open_files_cap(1024), 64);
        assert_eq!(open_files_cap(65_536), 64);
        // The D10 trial's low limit: transfers take turns.
        assert_eq!(open_files_cap(512), 48);
        assert_eq!(open_files_cap(64), 2);
        assert_eq!(open_files_cap(0), 2);
        // Raising never lowers it, and it answers what is in force.
        assert!(raise_open_file_limit() >= 64);
    }

    #[test]
    fn hostile_names_become_one_safe_component() {
        for (offered, want) in [
            ("report.pdf", "report.pdf"),
            ("../../etc/passwd", "passwd"),
            ("/etc/shadow", "shadow"),
            ("a/b/../c.txt", "c.txt"),
            ("..", "unnamed"),
            ("../..", "unnamed"),
            ("", "unnamed"),
            ("dir\\..\\win.ini", "win.ini"),
            ("evil\u{1b}[2Jname\n.txt", "evil[2Jname.txt"),
            ("CON", "_CON"),
            ("nul.txt", "_nul.txt"),
            ("trailing. . .", "trailing"),
            ("photo .jpg", "photo .jpg"),
            ("photo_\u{202e}gpj.exe", "photo_gpj.exe"),
            ("a\u{200b}b\u{2066}c", "abc"),
        ] {
            assert_eq!(sanitize(offered), want, "{offered:?}");
        }
        let long = "é".repeat(300);
        let s = sanitize(&long);
        assert!(s.len() <= 200 && s.chars().all(|c| c == 'é'));
    }

    #[test]
    fn offered_paths_stay_inside() {
        assert_eq!(
            sanitize_path("photos/2024/a.jpg"),
            ["photos", "2024", "a.jpg"]
        );
        assert_eq!(sanitize_path("../../etc/passwd"), ["etc", "passwd"]);
        assert_eq!(sanitize_path("/abs/./x"), ["abs", "x"]);
        assert_eq!(sanitize_path("a\\..\\b"), ["a", "b"]);
        assert_eq!(sanitize_path(".."), ["unnamed"]);
        assert_eq!(sanitize_path("d/CON"), ["d", "_CON"]);
    }

    #[test]
    fn existing_names_get_a_number() {
        let dir = std::env::temp_dir().join(format!("p2pd-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), b"x").unwrap();
        assert_eq!(unique_dest(&dir, "a.txt", &[]), dir.join("a (1).txt"));
        assert_eq!(
            unique_dest(&dir, "a.txt", &[dir.join("a (1).txt")]),
            dir.join("a (2).txt")
        );
        assert_eq!(unique_dest(&dir, "b", &[]), dir.join("b"));
        std::fs::write(dir.join("b"), b"x").unwrap();
        assert_eq!(unique_dest(&dir, "b", &[]), dir.join("b (1)"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_is_always_a_new_one() {
        let dir = std::env::temp_dir().join(format!("p2pd-dirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = unique_dir(&dir, "v1.2").unwrap();
        assert_eq!(first, dir.join("v1.2"));
        std::fs::write(first.join("kept"), b"x").unwrap();
        // Taken by a directory or by a file: the next number, never the
        // dot taken for an extension.
        assert_eq!(unique_dir(&dir, "v1.2").unwrap(), dir.join("v1.2 (1)"));
        std::fs::write(dir.join("v1.2 (2)"), b"x").unwrap();
        assert_eq!(unique_dir(&dir, "v1.2").unwrap(), dir.join("v1.2 (3)"));
        assert!(first.join("kept").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
